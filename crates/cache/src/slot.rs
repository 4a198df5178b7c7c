//! The output slot: everything a converter does to the files of one output, under its lock.
//!
//! A writer takes the slot ([`OutputSlot::acquire`]: the output's lock), looks again (another
//! process may have finished while it waited), then either records the hit
//! ([`OutputSlot::record_hit`]) or writes a [`Temporary`] and publishes it
//! ([`OutputSlot::publish`]). The slot owns the order that makes a crash harmless:
//! - temporaries are created and renamed only under the lock, so a temporary whose output's
//!   lock is free belongs to a dead writer and may be removed;
//! - the temporary is made durable (unless the caller publishes unsynced), then its output
//!   record is written and made durable, then it is renamed into place, then the directory is
//!   made durable: no crash leaves an output without the record that says how far to trust it,
//!   and a crash between the record and the rename leaves a record of other bytes beside the
//!   previous file, which a lookup then hashes and reports broken unless its bytes are those;
//! - the temporary is removed when the [`Temporary`] is dropped unpublished (an error), with its
//!   resume journal ([`crate::journal`]), unless the writer keeps it to be resumed
//!   ([`Temporary::keep_for_resume`], after a cancel); a temporary kept so, or left by a killed
//!   writer, is resumed by the next writer ([`OutputSlot::resume`]) or removed by it.
//!
//! The lock is released when the slot is dropped.

use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use crate::journal::{read_journal, remove_journal};
use crate::naming::parse_output_name;
use crate::provenance::system_time_ns;
use crate::record::{
    OutputRecord, SourceSeen, current_boot_id, read_output_record, write_output_record,
};
use crate::store::Lookup;
use crate::{CacheError, examine};

/// Name of the hidden folder (inside each output dir) holding lock files, use stamps and output
/// records.
pub const STATE_DIR: &str = ".convcache";

/// How often a cancellable wait for another process's lock checks the flag.
const LOCK_POLL: Duration = Duration::from_millis(20);

/// How close to now a source's mtime may be for a lookup's sighting of it to be remembered
/// ([`Upkeep::source_seen`]): coarse filesystem clocks tick in up to 2 s, and a write in the same
/// tick after the source was hashed would go unnoticed.
const RACY_MTIME: Duration = Duration::from_secs(2);

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// `<dir>/.convcache/<name><suffix>`: a file the cache keeps about `output`.
pub(crate) fn state_path(output: &Path, suffix: &str) -> PathBuf {
    let dir = output.parent().unwrap_or(Path::new("."));
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(STATE_DIR).join(format!("{name}{suffix}"))
}

/// `<dir>/.convcache/<name>.used`: the use stamp of an output (its mtime is the last time the
/// output was produced or served).
pub fn use_stamp_path(output: &Path) -> PathBuf {
    state_path(output, ".used")
}

/// `.<name>.<pid>.tmp` beside `output`: where process `pid` writes `output` before publishing it.
pub fn temp_path(output: &Path, pid: u32) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    output.with_file_name(format!(".{name}.{pid}.tmp"))
}

/// Parses a temporary's name into (output name, writer pid).
pub(crate) fn parse_temp_name(name: &str) -> Option<(&str, u32)> {
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (output, pid) = rest.rsplit_once('.')?;
    let pid = pid.parse().ok()?;
    parse_output_name(output)?;
    Some((output, pid))
}

/// Opens (creating it and its folder if needed) the lock file of `output`, unlocked. The lock
/// file is never deleted, so every process locks the same inode.
fn open_lock(output: &Path) -> Result<File, CacheError> {
    let path = state_path(output, ".lock");
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent, "create the cache state folder"))?;
    }
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path, "open the lock file"))
}

/// Sets the use stamp of `output` to `time`.
pub(crate) fn record_use_at(output: &Path, time: SystemTime) -> Result<(), CacheError> {
    let path = use_stamp_path(output);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent, "create the cache state folder"))?;
    }
    let f = File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path, "open the use stamp"))?;
    f.set_modified(time)
        .map_err(io_err(&path, "set the time of the use stamp"))
}

/// What a lookup learned that would spare later lookups work, to be written only when its
/// answer is used ([`OutputSlot::record_hit`], [`crate::Cache::record_hit`]): a lookup itself
/// writes nothing, so `check` and `list` leave the cache as they found it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Upkeep {
    /// The output's data was verified under other facts than its record's (hashed after a
    /// touch or after an unsynced publish in another boot, or synced after an unsynced publish
    /// in this boot): re-record it as durable, with these facts.
    pub refresh: Option<RecordedFacts>,
    /// The source was found, with the digest the output's provenance records, under other
    /// facts than the provenance's (touched, moved, copied back).
    pub source_seen: Option<SourceSeen>,
}

/// An output's size, mtime and digest as a lookup verified them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordedFacts {
    pub size: u64,
    pub mtime_ns: i128,
    pub digest: String,
}

/// One output's lock, held: what a converter writes it under. See the module docs.
#[derive(Debug)]
pub struct OutputSlot {
    output: PathBuf,
    /// Locked for as long as the slot lives (released on drop).
    _lock: File,
}

impl OutputSlot {
    /// Takes the lock of the output at `output` (creating the output dir and its state folder),
    /// waiting while another process holds it. With `cancel`, the wait polls the flag and
    /// stops with [`CacheError::Cancelled`] once it is set, so that an interrupt does not wait
    /// for another conversion to end.
    pub fn acquire(output: &Path, cancel: Option<&AtomicBool>) -> Result<OutputSlot, CacheError> {
        let dir = output.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io_err(dir, "create the output directory"))?;
        let lock = open_lock(output)?;
        let lock_err = |e| io_err(&state_path(output, ".lock"), "lock")(e);
        match cancel {
            None => lock.lock().map_err(lock_err)?,
            Some(cancel) => loop {
                match lock.try_lock() {
                    Ok(()) => break,
                    Err(TryLockError::WouldBlock) => {}
                    Err(TryLockError::Error(e)) => return Err(lock_err(e)),
                }
                if cancel.load(Ordering::Relaxed) {
                    return Err(CacheError::Cancelled(output.to_path_buf()));
                }
                std::thread::sleep(LOCK_POLL);
            },
        }
        Ok(OutputSlot {
            output: output.to_path_buf(),
            _lock: lock,
        })
    }

    /// The lock of `output` if nobody holds it (`None` while a writer does).
    pub(crate) fn try_acquire(output: &Path) -> Result<Option<OutputSlot>, CacheError> {
        let lock = open_lock(output)?;
        match lock.try_lock() {
            Ok(()) => Ok(Some(OutputSlot {
                output: output.to_path_buf(),
                _lock: lock,
            })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(io_err(&state_path(output, ".lock"), "lock")(e)),
        }
    }

    /// The output this slot is for.
    pub fn output(&self) -> &Path {
        &self.output
    }

    /// Records that `lookup`'s answer, this output, was used now, and writes what the lookup
    /// learned. Best effort (a read-only models dir must still serve hits): what cannot be
    /// written only makes the next lookup slower.
    pub fn record_hit(&self, lookup: &Lookup) {
        let _ = record_use_at(&self.output, SystemTime::now());
        if lookup.path == self.output {
            self.write_upkeep(&lookup.upkeep);
        }
    }

    /// Records that the output was used now (after a publish).
    pub fn record_use(&self) {
        let _ = record_use_at(&self.output, SystemTime::now());
    }

    /// Writes what a lookup learned about this output (see [`Upkeep`]), each part only if it
    /// still holds for the files as they are now.
    pub(crate) fn write_upkeep(&self, upkeep: &Upkeep) {
        if let Some(facts) = &upkeep.refresh {
            self.refresh_record(facts);
        }
        if let Some(seen) = &upkeep.source_seen {
            self.remember_source(seen);
        }
    }

    /// Re-records the output as durable with `facts`, unless it changed since they were taken
    /// (then the next lookup hashes it again).
    fn refresh_record(&self, facts: &RecordedFacts) {
        let output = &self.output;
        let Ok(rec) = OutputRecord::of_file(output, facts.digest.clone()) else {
            return;
        };
        if (rec.size, rec.mtime_ns) != (facts.size, facts.mtime_ns) {
            return;
        }
        // The new record says the data is durable (an unsynced mark is dropped): make it so.
        if File::open(output).and_then(|f| f.sync_all()).is_ok() {
            let _ = write_output_record(output, &rec);
        }
    }

    /// Adds `seen` to the output's record ([`OutputRecord::source_seen`]), unless the source's
    /// mtime is too recent to trust, the output has no usable record, or the output's provenance
    /// no longer names the digest `seen` was found with (another conversion was published since
    /// the lookup).
    fn remember_source(&self, seen: &SourceSeen) {
        let output = &self.output;
        let now = system_time_ns(SystemTime::now());
        if (now - seen.mtime_ns).abs() < RACY_MTIME.as_nanos() as i128 {
            return;
        }
        let names_digest = examine(output)
            .and_then(|ex| ex.provenance)
            .is_some_and(|p| p.source_digest == seen.digest);
        let Ok(Some(mut record)) = read_output_record(output) else {
            return;
        };
        if names_digest {
            record.source_seen = Some(seen.clone());
            let _ = write_output_record(output, &record);
        }
    }

    /// Removes this output's temporaries left by earlier writers (none is alive: they write
    /// only under this lock), but the one named `spare`, and returns the removed paths.
    pub(crate) fn remove_dead_temporaries(
        &self,
        spare: Option<&str>,
    ) -> Result<Vec<PathBuf>, CacheError> {
        let output = &self.output;
        let Some(dir) = output.parent() else {
            return Ok(Vec::new());
        };
        let Some(out_name) = output.file_name().and_then(|n| n.to_str()) else {
            return Ok(Vec::new());
        };
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(dir, "list")(e)),
        };
        let mut removed = Vec::new();
        for ent in rd.flatten() {
            let name = ent.file_name();
            let is_ours = name
                .to_str()
                .filter(|n| Some(*n) != spare)
                .and_then(parse_temp_name)
                .is_some_and(|(o, _)| o == out_name);
            let regular = ent.metadata().is_ok_and(|m| m.file_type().is_file());
            if is_ours && regular {
                let p = ent.path();
                match fs::remove_file(&p) {
                    Ok(()) => removed.push(p),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&p, "remove the stale temporary")(e)),
                }
            }
        }
        Ok(removed)
    }

    /// Removes the temporaries of dead writers of this output and its resume journal, then
    /// creates this process's temporary beside it (`.<name>.<pid>.tmp`, which must not exist
    /// yet).
    ///
    /// `sync`: make the output durable before it is published (the default). Without it the
    /// output is published from the page cache and its record carries this boot's id (see
    /// [`OutputRecord::unsynced_boot_id`]); where the boot cannot be identified, it is synced
    /// anyway ([`Temporary::is_synced`] says which).
    pub fn create_temporary(&self, sync: bool) -> Result<Temporary, CacheError> {
        self.discard_journal()?;
        self.remove_dead_temporaries(None)?;
        let unsynced_boot_id = if sync { None } else { current_boot_id() };
        let path = temp_path(&self.output, std::process::id());
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path, "create the temporary output"))?;
        Ok(Temporary::adopt(path, file, unsynced_boot_id, &self.output))
    }

    /// Publishes `temporary` as this output, whose content digest is `digest` (of every byte
    /// the caller wrote, as they are in the file now): sets its mtime 1 s into the past (so that
    /// any later write to the output changes the mtime in its record), makes it durable (unless
    /// unsynced), stops here with [`CacheError::Cancelled`] if `cancel` is set (the sync can
    /// take seconds; this is the last point where an interrupt leaves everything as it was),
    /// writes the output record, renames the temporary into place and makes the rename durable
    /// (unless unsynced).
    pub fn publish(
        &self,
        mut temporary: Temporary,
        digest: String,
        cancel: Option<&AtomicBool>,
    ) -> Result<(), CacheError> {
        let tmp = temporary.path.clone();
        let synced = temporary.is_synced();
        backdate(&temporary.file, &tmp)?;
        if synced {
            temporary
                .file
                .sync_all()
                .map_err(io_err(&tmp, "flush the temporary output to disk"))?;
        }
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(CacheError::Cancelled(self.output.clone()));
        }
        // The rename keeps the temporary's size and mtime, so its record is the output's. The
        // record is durable either way.
        let record = OutputRecord {
            unsynced_boot_id: temporary.unsynced_boot_id.clone(),
            ..OutputRecord::of_file(&tmp, digest)?
        };
        write_output_record(&self.output, &record)?;
        // Before the rename: a journal never outlives its temporary's publication.
        remove_journal(&self.output);
        fs::rename(&tmp, &self.output)
            .map_err(io_err(&self.output, "publish the output (rename)"))?;
        temporary.published = true;
        if synced {
            let dir = self.output.parent().unwrap_or(Path::new("."));
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(dir, "sync the output directory"))?;
        }
        Ok(())
    }
}

/// A writer's temporary output (see [`OutputSlot::create_temporary`]): removed when dropped
/// unless it was published.
#[derive(Debug)]
pub struct Temporary {
    path: PathBuf,
    file: File,
    /// Set when the output is published unsynced: the boot it is written in.
    unsynced_boot_id: Option<String>,
    published: bool,
    /// The output it is for (whose resume journal goes with it).
    output: PathBuf,
    /// Left in place when dropped unpublished ([`Temporary::keep_for_resume`]).
    keep: bool,
}

impl Temporary {
    /// A temporary at `path` (open in `file`) for `output`.
    pub(crate) fn adopt(
        path: PathBuf,
        file: File,
        unsynced_boot_id: Option<String>,
        output: &Path,
    ) -> Temporary {
        Temporary {
            path,
            file,
            unsynced_boot_id,
            published: false,
            output: output.to_path_buf(),
            keep: false,
        }
    }

    /// Removes the resume journal: the temporary is about to change before its last
    /// checkpoint (a header value patched), so it can no longer be resumed.
    pub fn forget_journal(&self) {
        remove_journal(&self.output);
    }

    /// Keeps the temporary and its resume journal when it is dropped unpublished (a cancelled
    /// conversion, to be resumed), if there is a journal naming it. Returns whether it is kept.
    pub fn keep_for_resume(&mut self) -> bool {
        let name = self.path.file_name().and_then(|n| n.to_str());
        self.keep = read_journal(&self.output).is_some_and(|j| Some(j.temporary.as_str()) == name);
        self.keep
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file, to write the output into (`&File` implements `Write`).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether [`OutputSlot::publish`] makes it durable before publishing it (so a writer can
    /// start its writeback early).
    pub fn is_synced(&self) -> bool {
        self.unsynced_boot_id.is_none()
    }
}

impl Drop for Temporary {
    fn drop(&mut self) {
        if !self.published && !self.keep {
            let _ = fs::remove_file(&self.path);
            remove_journal(&self.output);
        }
    }
}

/// Sets the finished temporary's mtime one second before both its current mtime and now, so
/// that any later write to the published output (even within the same filesystem clock tick as
/// the publish) gives it an mtime other than the one in its output record.
fn backdate(file: &File, tmp: &Path) -> Result<(), CacheError> {
    let now = SystemTime::now();
    let mtime = file.metadata().and_then(|m| m.modified()).map_err(io_err(
        tmp,
        "read the modification time of the temporary output",
    ))?;
    let base = mtime.min(now);
    let past = base.checked_sub(Duration::from_secs(1)).unwrap_or(base);
    file.set_modified(past).map_err(io_err(
        tmp,
        "set the modification time of the temporary output",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_parse_back() {
        let out = Path::new("/m/live_fp16.safetensors");
        let tmp = temp_path(out, 4242);
        assert_eq!(tmp, Path::new("/m/.live_fp16.safetensors.4242.tmp"));
        let name = tmp.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_temp_name(name), Some(("live_fp16.safetensors", 4242)));
        assert_eq!(parse_temp_name(".notes.txt.1.tmp"), None);
        assert_eq!(parse_temp_name(".live_fp16.safetensors.x.tmp"), None);
    }

    #[test]
    fn an_unpublished_temporary_is_removed_and_a_published_one_is_the_output() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("m_bf16.safetensors");
        let slot = OutputSlot::acquire(&out, None).unwrap();
        let tmp = slot.create_temporary(true).unwrap();
        let at = tmp.path().to_path_buf();
        assert!(at.is_file());
        drop(tmp);
        assert!(!at.exists());

        let tmp = slot.create_temporary(true).unwrap();
        std::io::Write::write_all(&mut tmp.file(), b"0123456789").unwrap();
        let digest = crate::digest::digest_file(tmp.path()).unwrap();
        slot.publish(tmp, digest.clone(), None).unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"0123456789");
        assert!(!at.exists());
        let rec = read_output_record(&out).unwrap().unwrap();
        assert_eq!(rec, OutputRecord::of_file(&out, digest).unwrap());

        // A cancel before the rename publishes nothing and leaves no temporary.
        let tmp = slot.create_temporary(true).unwrap();
        let cancel = AtomicBool::new(true);
        let err = slot.publish(tmp, "0".repeat(32), Some(&cancel));
        assert!(matches!(err, Err(CacheError::Cancelled(p)) if p == out));
        assert!(!at.exists());
        assert_eq!(fs::read(&out).unwrap(), b"0123456789");
    }
}
