//! The resume journal: how far an interrupted conversion's temporary is durably written.
//!
//! A converter writing an output checkpoints now and then, at a point where the converter
//! carries no state (`tensorfile::pipeline::resumable`): it makes the temporary's data durable
//! (unless the output is published unsynced), then replaces `.convcache/<name>.journal`
//! (JSON, [`Journal`]) with what the conversion is ([`ConversionIdentity`]: the source's path,
//! size, mtime and the digest written in the header, the target, the converter version, the
//! output's planned size), which temporary it writes, and the [`Checkpoint`]: pieces done, the
//! byte offset reached and the digest of the temporary's bytes before it.
//!
//! An interrupted conversion (a cancel, SIGKILL, a power loss) leaves both. The next conversion
//! of the same output, under the output's lock, trusts them only if everything checks out
//! ([`OutputSlot::resume`]): the identity is the one it is about to write (so the source is
//! unchanged by path, size and mtime, the policy of the cache's fast path), the temporary holds
//! at least the checkpoint's bytes, and those bytes hash to the checkpoint's digest (they are
//! read back: a journal is never taken on its word). It then continues after the checkpoint.
//! A journal or temporary that does not check out is removed, and the conversion starts over.
//!
//! Sweeps ([`crate::Cache::sweep_temporaries`], by `convert` and `cleanup`) keep a dead
//! writer's temporary only while its journal names it, is younger than [`RESUME_KEEP`] and its
//! source is still there with the journaled size and mtime; otherwise both go.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tensorfile::safetensors::ReadBuffer;

use crate::digest::{CHUNK_SIZE, StreamDigest};
use crate::record::current_boot_id;
use crate::slot::{OutputSlot, Temporary, state_path};

use crate::{CacheError, SourceStat};

/// How long an interrupted conversion stays resumable: sweeps remove older journals and their
/// temporaries.
pub const RESUME_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// The journal format written now; another is not trusted.
const FORMAT: u32 = 1;

/// The largest journal read (a real one is about 500 bytes plus the paths).
const MAX_JOURNAL_BYTES: u64 = 64 << 10;

/// What a conversion is. A conversion resumes another only if they are equal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConversionIdentity {
    /// The source's path (as [`SourceStat::path`] has it).
    pub source_path: PathBuf,
    /// The source's size in bytes.
    pub source_size: u64,
    /// The source's modification time, nanoseconds since the Unix epoch.
    pub source_mtime_ns: i128,
    /// The source digest written in the output's header: a placeholder when `placeholder`.
    pub source_digest: String,
    /// The header holds a placeholder for the source digest, to be overwritten once the
    /// conversion is complete.
    pub placeholder: bool,
    /// The target's canonical name.
    pub target: String,
    /// The converter version in the provenance.
    pub converter_version: String,
    /// The output's planned size in bytes.
    pub output_len: u64,
}

/// A point the conversion can continue from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// Pieces of the converter's stream in the temporary.
    pub pieces: u64,
    /// Bytes of the temporary they make up.
    pub offset: u64,
    /// The digest ([`crate::digest`]) of those bytes.
    pub digest: String,
}

/// The journal of an interrupted conversion (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Journal {
    /// The journal format.
    pub format: u32,
    /// The temporary's file name (in the output's directory).
    pub temporary: String,
    /// What is being converted.
    pub identity: ConversionIdentity,
    /// How far the temporary is durably written.
    pub checkpoint: Checkpoint,
}

impl Journal {
    /// A journal of `identity` written into `temporary`, up to `checkpoint`.
    pub fn new(temporary: &Path, identity: ConversionIdentity, checkpoint: Checkpoint) -> Self {
        Journal {
            format: FORMAT,
            temporary: temporary
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            identity,
            checkpoint,
        }
    }
}

/// `.convcache/<name>.journal`: the resume journal of `output`.
pub fn journal_path(output: &Path) -> PathBuf {
    state_path(output, ".journal")
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// The journal of `output`, if there is one that parses (of this format, naming a temporary of
/// this output).
pub fn read_journal(output: &Path) -> Option<Journal> {
    let path = journal_path(output);
    let mut bytes = Vec::new();
    File::open(&path)
        .ok()?
        .take(MAX_JOURNAL_BYTES)
        .read_to_end(&mut bytes)
        .ok()?;
    let journal: Journal = serde_json::from_slice(&bytes).ok()?;
    let out_name = output.file_name()?.to_str()?;
    let names_ours =
        crate::slot::parse_temp_name(&journal.temporary).is_some_and(|(o, _)| o == out_name);
    (journal.format == FORMAT && names_ours).then_some(journal)
}

/// Replaces the journal of `output` with `journal` (a temporary file renamed over it, so a
/// crash leaves the old journal or the new one). `sync`: make it durable before the rename.
pub fn write_journal(output: &Path, journal: &Journal, sync: bool) -> Result<(), CacheError> {
    let path = journal_path(output);
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let json = serde_json::to_vec(journal).map_err(|e| CacheError::Io {
        path: path.clone(),
        op: "encode the resume journal",
        source: std::io::Error::other(e),
    })?;
    let mut f = File::create(&tmp).map_err(io_err(&tmp, "create the resume journal"))?;
    f.write_all(&json)
        .and_then(|()| if sync { f.sync_data() } else { Ok(()) })
        .map_err(io_err(&tmp, "write the resume journal"))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io_err(&path, "replace the resume journal (rename)"))
}

/// Removes the journal of `output` (and a leftover of its replacement), if any.
pub(crate) fn remove_journal(output: &Path) {
    let path = journal_path(output);
    let _ = fs::remove_file(&path);
    let mut tmp = path.into_os_string();
    tmp.push(".tmp");
    let _ = fs::remove_file(PathBuf::from(tmp));
}

/// The temporary a sweep keeps for `output` (its file name): the one its journal names, while
/// the journal is younger than [`RESUME_KEEP`] and the source is there with the journaled size
/// and mtime. `None` when nothing is to be kept (the journal, if any, is then removed).
pub(crate) fn keepable_temporary(output: &Path) -> Option<String> {
    let keep = read_journal(output).filter(|j| {
        let young = fs::metadata(journal_path(output))
            .and_then(|m| m.modified())
            .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() < RESUME_KEEP);
        let id = &j.identity;
        let source_there = SourceStat::of(&id.source_path)
            .is_ok_and(|s| (s.size, s.mtime_ns) == (id.source_size, id.source_mtime_ns));
        young && source_there
    });
    if keep.is_none() {
        remove_journal(output);
    }
    keep.map(|j| j.temporary)
}

/// A temporary adopted from an interrupted conversion ([`OutputSlot::resume`]).
#[derive(Debug)]
pub struct Resumed {
    /// The temporary, truncated to the checkpoint and positioned there for writing.
    pub temporary: Temporary,
    /// Where the conversion continues.
    pub checkpoint: Checkpoint,
    /// The digest of the temporary's bytes before the checkpoint, to be fed the rest.
    pub digest: StreamDigest,
}

impl OutputSlot {
    /// Adopts the temporary of an interrupted conversion of this output if its journal is a
    /// journal of `identity` and the temporary checks out (module documentation). `Ok(Err(why))`
    /// when there is nothing to resume: the journal and temporary, if any, are then removed.
    ///
    /// `hold_head`: the digest handed back holds its first chunk for patching (see
    /// [`StreamDigest::holding_head`]). `sync` as for [`OutputSlot::create_temporary`].
    pub fn resume(
        &self,
        identity: &ConversionIdentity,
        hold_head: bool,
        sync: bool,
    ) -> Result<Result<Resumed, String>, CacheError> {
        let output = self.output();
        let Some(journal) = read_journal(output) else {
            self.discard_journal()?;
            return Ok(Err("no usable resume journal".into()));
        };
        let refused = |why: &str| -> Result<Result<Resumed, String>, CacheError> {
            self.discard_journal()?;
            Ok(Err(why.to_string()))
        };
        if journal.identity != *identity {
            return refused(
                "the journal is of another conversion (the source, target or converter changed)",
            );
        }
        let Checkpoint { pieces, offset, .. } = journal.checkpoint;
        if pieces == 0 || offset == 0 || offset > identity.output_len {
            return refused("the journal's checkpoint is out of range");
        }
        let path = output.with_file_name(&journal.temporary);
        // Only a regular file is continued (and cut back): never what a link points to.
        if !fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file()) {
            return refused("the journaled temporary is missing or not a regular file");
        }
        let opened = File::options().read(true).write(true).open(&path);
        let Ok(mut file) = opened else {
            return refused("the journaled temporary is missing");
        };
        let len = file
            .metadata()
            .map_err(io_err(&path, "stat the temporary"))?;
        if !len.is_file() || len.len() < offset {
            return refused("the temporary is shorter than the journal says");
        }
        let mut digest = if hold_head {
            StreamDigest::holding_head()
        } else {
            StreamDigest::new()
        };
        let mut buf = ReadBuffer::new();
        let mut done = 0u64;
        while done < offset {
            let n = (offset - done).min(CHUNK_SIZE as u64) as usize;
            let chunk = buf.get(n, CHUNK_SIZE);
            std::os::unix::fs::FileExt::read_exact_at(&file, chunk, done)
                .map_err(io_err(&path, "read the temporary back"))?;
            digest.update(chunk);
            done += n as u64;
        }
        if digest.digest_so_far() != journal.checkpoint.digest {
            return refused("the temporary's bytes do not match the journal's digest");
        }
        file.set_len(offset)
            .and_then(|()| file.seek(SeekFrom::Start(offset)).map(drop))
            .map_err(io_err(&path, "cut the temporary back to its checkpoint"))?;
        self.remove_dead_temporaries(Some(&journal.temporary))?;
        let unsynced_boot_id = if sync { None } else { current_boot_id() };
        Ok(Ok(Resumed {
            temporary: Temporary::adopt(path, file, unsynced_boot_id, output),
            checkpoint: journal.checkpoint,
            digest,
        }))
    }

    /// Removes this output's journal and the temporary it names (nobody writes them: the
    /// caller holds the lock).
    pub fn discard_journal(&self) -> Result<(), CacheError> {
        let output = self.output();
        if let Some(j) = read_journal(output) {
            let p = output.with_file_name(&j.temporary);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p, "remove the interrupted temporary")(e)),
            }
        }
        remove_journal(output);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cache;
    use crate::ModelsDir;

    /// A models dir with an interrupted conversion of `src`: a temporary of 1000 bytes and a
    /// journal checkpointed at 600. Returns (cache, output, temporary).
    fn interrupted(t: &Path) -> (Cache, PathBuf, PathBuf, PathBuf) {
        let src = t.join("src/m.safetensors");
        fs::create_dir_all(src.parent().unwrap()).unwrap();
        fs::write(&src, b"a source").unwrap();
        let models = ModelsDir::at(t.join("models"));
        let out = models.converted_dir().join("m_bf16.safetensors");
        let slot = OutputSlot::acquire(&out, None).unwrap();
        let mut tmp = slot.create_temporary(false).unwrap();
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        std::io::Write::write_all(&mut tmp.file(), &bytes).unwrap();
        let stat = SourceStat::of(&src).unwrap();
        let identity = ConversionIdentity {
            source_path: stat.path,
            source_size: stat.size,
            source_mtime_ns: stat.mtime_ns,
            source_digest: "1".repeat(32),
            placeholder: false,
            target: "bf16".into(),
            converter_version: "v".into(),
            output_len: 1000,
        };
        let checkpoint = Checkpoint {
            pieces: 3,
            offset: 600,
            digest: crate::digest::digest_bytes(&bytes[..600]),
        };
        write_journal(&out, &Journal::new(tmp.path(), identity, checkpoint), false).unwrap();
        assert!(tmp.keep_for_resume());
        let tmp_path = tmp.path().to_path_buf();
        drop(tmp);
        drop(slot);
        (Cache::new(models), out, tmp_path, src)
    }

    #[test]
    fn a_resumable_temporary_survives_sweeps_and_resumes_at_its_checkpoint() {
        let t = tempfile::tempdir().unwrap();
        let (cache, out, tmp, _src) = interrupted(t.path());
        assert!(cache.sweep_temporaries().unwrap().is_empty());
        assert!(tmp.is_file() && journal_path(&out).is_file());

        let journal = read_journal(&out).unwrap();
        let slot = OutputSlot::acquire(&out, None).unwrap();
        let mut other = journal.identity.clone();
        other.target = "fp16".into();
        // A journal of another conversion: refused, and both files go.
        let refused = slot.resume(&other, false, false).unwrap();
        assert!(refused.is_err());
        assert!(!tmp.exists() && !journal_path(&out).exists());
    }

    #[test]
    fn resume_adopts_the_temporary_cut_to_its_checkpoint() {
        let t = tempfile::tempdir().unwrap();
        let (_cache, out, tmp, _src) = interrupted(t.path());
        let identity = read_journal(&out).unwrap().identity;
        let slot = OutputSlot::acquire(&out, None).unwrap();
        let resumed = slot.resume(&identity, false, false).unwrap().unwrap();
        assert_eq!(resumed.checkpoint.offset, 600);
        assert_eq!(resumed.temporary.path(), tmp);
        assert_eq!(fs::metadata(&tmp).unwrap().len(), 600);
        assert_eq!(resumed.digest.len(), 600);
        assert_eq!(resumed.digest.digest_so_far(), resumed.checkpoint.digest);
    }

    #[test]
    fn a_journaled_temporary_that_is_a_link_is_never_continued() {
        let t = tempfile::tempdir().unwrap();
        let (_cache, out, tmp, _src) = interrupted(t.path());
        let outside = t.path().join("outside.bin");
        fs::copy(&tmp, &outside).unwrap();
        fs::remove_file(&tmp).unwrap();
        std::os::unix::fs::symlink(&outside, &tmp).unwrap();
        let identity = read_journal(&out).unwrap().identity;
        let slot = OutputSlot::acquire(&out, None).unwrap();
        assert!(slot.resume(&identity, false, false).unwrap().is_err());
        assert_eq!(
            fs::metadata(&outside).unwrap().len(),
            1000,
            "the link's target is untouched"
        );
    }

    #[test]
    fn sweeps_remove_journals_a_week_old_or_whose_source_is_gone_or_changed() {
        type Spoil = fn(&Path, &Path);
        let spoils: [(&str, Spoil); 4] = [
            ("old", |out, _| {
                let week_ago = SystemTime::now() - RESUME_KEEP - Duration::from_secs(60);
                File::options()
                    .write(true)
                    .open(journal_path(out))
                    .unwrap()
                    .set_modified(week_ago)
                    .unwrap();
            }),
            ("source gone", |_, src| fs::remove_file(src).unwrap()),
            ("source changed", |_, src| {
                fs::write(src, b"another source").unwrap()
            }),
            ("temporary gone", |out, _| {
                let j = read_journal(out).unwrap();
                fs::remove_file(out.with_file_name(j.temporary)).unwrap();
            }),
        ];
        for (what, spoil) in spoils {
            let t = tempfile::tempdir().unwrap();
            let (cache, out, tmp, src) = interrupted(t.path());
            spoil(&out, &src);
            cache.sweep_temporaries().unwrap();
            assert!(!tmp.exists(), "{what}: the temporary is swept");
            assert!(!journal_path(&out).exists(), "{what}: the journal is swept");
        }
    }

    #[test]
    fn a_locked_outputs_journal_and_temporary_are_not_swept() {
        let t = tempfile::tempdir().unwrap();
        let (cache, out, tmp, src) = interrupted(t.path());
        fs::remove_file(src).unwrap();
        let _writer = OutputSlot::acquire(&out, None).unwrap();
        cache.sweep_temporaries().unwrap();
        assert!(tmp.is_file() && journal_path(&out).is_file());
    }
}
