//! The output record: the digest of a published output, kept next to its lock and use stamp.
//!
//! The provenance inside an output describes its *source*; nothing in it covers the output's
//! own tensor data, so a byte flipped there leaves a complete file with intact provenance. The
//! converter therefore records, when it publishes, the output's size, mtime and content digest
//! ([`crate::digest`]) in `.convcache/<name>.digest` (JSON, [`OutputRecord`]).
//!
//! A lookup compares the output's size and mtime with the record (a stat and a small read, so a
//! hit stays O(1) whatever the model size). Only when they differ (something wrote the file),
//! or when asked to verify, is the output hashed and its digest compared. Writes in place
//! change the mtime; to make that hold even for a write in the same clock tick as the publish,
//! the converter sets the published file's mtime one second into the past before recording it.
//!
//! A record cannot live inside the output (a digest cannot cover itself without a fixed
//! layout), which is why it is a sidecar; a sidecar that goes missing costs the data check,
//! never correctness of what the provenance promises.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::provenance::system_time_ns;
use crate::slot::{RecordedFacts, state_path};
use crate::{CacheError, digest};

/// The largest record read (a real one is about 150 bytes).
const MAX_RECORD_BYTES: u64 = 4096;

/// What the converter recorded about an output when it published it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutputRecord {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i128,
    /// The content digest ([`crate::digest`]), 32 lowercase hex digits.
    pub digest: String,
    /// [`digest::ALGORITHM`] when written.
    pub algorithm: String,
    /// Set when the output was published without waiting for its data to reach the disk
    /// (`--no-fsync`): the boot it was written in. In that same boot the page cache is the
    /// file's truth: the first lookup that finds the output syncs it (reporting a failed
    /// writeback as a broken output) and re-records it without this mark. After a restart (a
    /// crash may have lost unwritten pages) the output is first hashed against
    /// [`OutputRecord::digest`], then made durable and re-recorded the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsynced_boot_id: Option<String>,
    /// The source as a lookup last found it with the digest the provenance records, when its
    /// path, size or mtime differ from the provenance's (the source was touched, moved or
    /// copied back): later lookups that find the source so recognise it without hashing it
    /// again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_seen: Option<SourceSeen>,
}

/// Identity facts of a source file, as [`OutputRecord::source_seen`] keeps them, with the
/// source digest they were found to have: they count only for an output whose provenance
/// records that digest (another output published at the path since is not vouched for).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceSeen {
    /// The source's path, as [`crate::SourceStat::path`] has it.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i128,
    /// The source digest these facts were found with.
    pub digest: String,
}

/// The current boot's identity (Linux: `/proc/sys/kernel/random/boot_id`), or `None` where the
/// system does not say. Without it an output cannot be published unsynced.
pub fn current_boot_id() -> Option<String> {
    #[cfg(target_os = "linux")]
    {
        let id = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let id = id.trim();
        (!id.is_empty() && id.len() <= 64).then(|| id.to_string())
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// `<dir>/.convcache/<name>.digest`: the output record of an output.
pub fn output_record_path(output: &Path) -> PathBuf {
    state_path(output, ".digest")
}

/// Size and mtime (ns) of the file at `path`, following symlinks.
pub(crate) fn size_and_mtime(path: &Path) -> std::io::Result<(u64, i128)> {
    let meta = fs::metadata(path)?;
    Ok((meta.len(), system_time_ns(meta.modified()?)))
}

impl OutputRecord {
    /// The record of the file at `file` (its current size and mtime) with `digest`, a digest of
    /// its content the caller computed.
    pub fn of_file(file: &Path, digest: String) -> Result<OutputRecord, CacheError> {
        let (size, mtime_ns) = size_and_mtime(file).map_err(io_err(file, "stat the output"))?;
        Ok(OutputRecord {
            size,
            mtime_ns,
            digest,
            algorithm: digest::ALGORITHM.to_string(),
            unsynced_boot_id: None,
            source_seen: None,
        })
    }

    /// Whether the output was published unsynced in another boot than this one (or the boot
    /// cannot be told): its data must be hashed before it is trusted.
    pub(crate) fn needs_reverify(&self) -> bool {
        match &self.unsynced_boot_id {
            None => false,
            Some(then) => current_boot_id().as_ref() != Some(then),
        }
    }

    /// Whether this record can be compared with a digest computed now.
    fn is_usable(&self) -> bool {
        self.algorithm == digest::ALGORITHM
            && self.digest.len() == 32
            && self.digest.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

/// Reads the record of `output`: `Ok(None)` when there is none, `Err(why)` when one is there but
/// cannot be used (unreadable, malformed, another digest algorithm).
pub fn read_output_record(output: &Path) -> Result<Option<OutputRecord>, String> {
    let path = output_record_path(output);
    let bytes = match File::open(&path) {
        Ok(f) => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_RECORD_BYTES + 1), &mut buf)
                .map_err(|e| format!("its output record {} cannot be read: {e}", path.display()))?;
            buf
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(format!(
                "its output record {} cannot be read: {e}",
                path.display()
            ));
        }
    };
    if bytes.len() as u64 > MAX_RECORD_BYTES {
        return Err(format!(
            "its output record {} is over {MAX_RECORD_BYTES} bytes",
            path.display()
        ));
    }
    let record: OutputRecord = serde_json::from_slice(&bytes)
        .map_err(|e| format!("its output record {} is malformed: {e}", path.display()))?;
    if !record.is_usable() {
        return Err(format!(
            "its output record {} has an unknown digest (`{}`)",
            path.display(),
            record.algorithm
        ));
    }
    Ok(Some(record))
}

/// Writes the record of `output` atomically (a fixed temporary in the state folder, fsynced,
/// renamed over the record, the folder fsynced). The caller holds the output's lock, which is
/// what makes the fixed temporary name safe.
pub fn write_output_record(output: &Path, record: &OutputRecord) -> Result<(), CacheError> {
    let path = output_record_path(output);
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir, "create the cache state folder"))?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let json = serde_json::to_vec(record).map_err(|e| CacheError::Io {
        path: path.clone(),
        op: "encode the output record",
        source: std::io::Error::other(e),
    })?;
    let mut f = File::create(&tmp).map_err(io_err(&tmp, "create the output record"))?;
    f.write_all(&json)
        .and_then(|()| f.sync_all())
        .map_err(io_err(&tmp, "write the output record"))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io_err(&path, "publish the output record (rename)"))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "sync the cache state folder"))
}

/// Removes the record of `output` (and a leftover temporary of it), if any.
pub(crate) fn remove_output_record(output: &Path) {
    let path = output_record_path(output);
    let _ = fs::remove_file(&path);
    let mut tmp = path.into_os_string();
    tmp.push(".tmp");
    let _ = fs::remove_file(PathBuf::from(tmp));
}

/// The outcome of checking an output's data against its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DataCheck {
    /// Matches the record (by size and mtime, or by digest); with the facts to re-record it
    /// with when they differ from the record's (or the record's unsynced mark is to go).
    Verified(Option<RecordedFacts>),
    /// Not verified (no usable record), with the reason to report.
    Unrecorded(String),
    /// The data is not what was published.
    Changed(String),
}

/// Checks the output at `output` against its record: size and mtime equal to the record settle
/// it without hashing unless `always_hash`; otherwise the output is hashed and its digest
/// compared. Writes nothing: a match under a changed mtime (or after an unsynced publish) comes
/// with the facts to re-record, for the caller to write when it uses the output.
pub(crate) fn check_output_data(output: &Path, always_hash: bool) -> DataCheck {
    let record = match read_output_record(output) {
        Ok(Some(r)) => r,
        Ok(None) => {
            return DataCheck::Unrecorded(
                "its data is not verified: it has no output record (made before output \
                 digests, or the record was deleted)"
                    .into(),
            );
        }
        Err(why) => return DataCheck::Unrecorded(format!("its data is not verified: {why}")),
    };
    let (size, mtime_ns) = match size_and_mtime(output) {
        Ok(v) => v,
        Err(e) => return DataCheck::Changed(format!("it cannot be stat'ed: {e}")),
    };
    if size != record.size {
        return DataCheck::Changed(format!(
            "output data changed since it was published ({size} bytes, {} recorded)",
            record.size
        ));
    }
    let reverify = record.needs_reverify();
    let facts = |digest: &str| RecordedFacts {
        size,
        mtime_ns,
        digest: digest.to_string(),
    };
    if mtime_ns == record.mtime_ns && !always_hash && !reverify {
        if record.unsynced_boot_id.is_some() {
            // Published unsynced in this boot: wait for its writeback (still in flight, or
            // failed: the page cache may then be all that held the data). Syncing changes no
            // file. Re-recorded without the mark when used, later hits are O(1) again.
            if let Err(e) = File::open(output).and_then(|f| f.sync_data()) {
                return DataCheck::Changed(format!(
                    "its data could not be written to disk after an unsynced publish: {e}"
                ));
            }
            return DataCheck::Verified(Some(facts(&record.digest)));
        }
        return DataCheck::Verified(None);
    }
    let now = match digest::digest_file(output) {
        Ok(d) => d,
        Err(e) => return DataCheck::Changed(format!("its data cannot be read: {e}")),
    };
    if !now.eq_ignore_ascii_case(&record.digest) {
        if reverify {
            return DataCheck::Changed(
                "its data did not survive a restart (it was published with --no-fsync, and the \
                 system stopped before the data reached the disk)"
                    .into(),
            );
        }
        return DataCheck::Changed("output data changed since it was published".into());
    }
    let refresh = mtime_ns != record.mtime_ns || reverify;
    DataCheck::Verified(refresh.then(|| facts(&now)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slot::{OutputSlot, Upkeep};

    /// [`check_output_data`], then what a conversion that uses the verified output writes.
    fn check_and_use(out: &Path) -> DataCheck {
        let verdict = check_output_data(out, false);
        if let DataCheck::Verified(refresh) = &verdict {
            let upkeep = Upkeep {
                refresh: refresh.clone(),
                source_seen: None,
            };
            OutputSlot::acquire(out, None)
                .unwrap()
                .write_upkeep(&upkeep);
        }
        verdict
    }

    #[test]
    fn roundtrips_and_rejects_unusable_records() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("m_bf16.safetensors");
        assert_eq!(read_output_record(&out), Ok(None));
        let rec = OutputRecord {
            size: 12,
            mtime_ns: -1_700_000_000_123_456_789,
            digest: "0123456789abcdef0123456789abcdef".into(),
            algorithm: digest::ALGORITHM.into(),
            unsynced_boot_id: None,
            source_seen: None,
        };
        write_output_record(&out, &rec).unwrap();
        assert_eq!(read_output_record(&out), Ok(Some(rec.clone())));
        let path = output_record_path(&out);
        assert_eq!(path, t.path().join(".convcache/m_bf16.safetensors.digest"));

        let bad = [
            serde_json::to_vec(&OutputRecord {
                algorithm: "md5".into(),
                ..rec.clone()
            })
            .unwrap(),
            serde_json::to_vec(&OutputRecord {
                digest: "xyz".into(),
                ..rec.clone()
            })
            .unwrap(),
            b"{\"size\":".to_vec(),
            vec![b' '; MAX_RECORD_BYTES as usize + 1],
        ];
        for b in bad {
            fs::write(&path, &b).unwrap();
            assert!(read_output_record(&out).is_err());
        }
        remove_output_record(&out);
        assert_eq!(read_output_record(&out), Ok(None));
    }

    #[test]
    fn a_changed_output_is_caught_by_size_or_digest() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("m_bf16.safetensors");
        fs::write(&out, b"0123456789").unwrap();
        let rec = OutputRecord::of_file(&out, digest::digest_file(&out).unwrap()).unwrap();
        write_output_record(&out, &rec).unwrap();
        assert_eq!(check_output_data(&out, false), DataCheck::Verified(None));
        assert_eq!(check_output_data(&out, true), DataCheck::Verified(None));
        fs::write(&out, b"0123456788").unwrap();
        assert!(matches!(
            check_output_data(&out, false),
            DataCheck::Changed(_)
        ));
        fs::write(&out, b"01234567").unwrap();
        assert!(
            matches!(check_output_data(&out, false), DataCheck::Changed(r) if r.contains("bytes"))
        );
        fs::remove_file(output_record_path(&out)).unwrap();
        assert!(matches!(
            check_output_data(&out, false),
            DataCheck::Unrecorded(_)
        ));
    }

    /// An output published unsynced is trusted in its own boot; in any other boot it is
    /// hashed once, found intact (then re-recorded as durable) or lost to the crash.
    #[test]
    fn an_unsynced_output_is_reverified_after_a_restart() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("m_bf16.safetensors");
        fs::write(&out, b"0123456789").unwrap();
        let digest = digest::digest_file(&out).unwrap();
        let unsynced = |boot: &str| OutputRecord {
            unsynced_boot_id: Some(boot.into()),
            ..OutputRecord::of_file(&out, digest.clone()).unwrap()
        };
        let this_boot = current_boot_id();
        if let Some(boot) = &this_boot {
            let rec = unsynced(boot);
            assert!(!rec.needs_reverify());
            write_output_record(&out, &rec).unwrap();
            // Checking writes nothing.
            assert!(matches!(
                check_output_data(&out, false),
                DataCheck::Verified(Some(_))
            ));
            assert_eq!(read_output_record(&out).unwrap().unwrap(), rec);
            assert!(matches!(check_and_use(&out), DataCheck::Verified(_)));
            // Same boot: trusted without hashing, synced, then recorded as durable.
            let now = read_output_record(&out).unwrap().unwrap();
            assert_eq!(now.unsynced_boot_id, None);
            assert_eq!(now.digest, rec.digest);
        }
        // Another boot, data intact: verified by digest, then recorded as durable.
        let rec = unsynced("another-boot");
        assert!(rec.needs_reverify());
        write_output_record(&out, &rec).unwrap();
        assert!(matches!(check_and_use(&out), DataCheck::Verified(_)));
        let now = read_output_record(&out).unwrap().unwrap();
        assert_eq!(now.unsynced_boot_id, None);
        assert_eq!(now.digest, digest);
        // Another boot, data torn by the crash (same size and mtime, other bytes): not served.
        let mtime = fs::metadata(&out).unwrap().modified().unwrap();
        write_output_record(&out, &rec).unwrap();
        fs::write(&out, b"0123\0\0\0\0\0\0").unwrap();
        File::options()
            .write(true)
            .open(&out)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert!(matches!(
            check_output_data(&out, false),
            DataCheck::Changed(r) if r.contains("restart")
        ));
        // A record without the mark (older records) reads as durable.
        let json = br#"{"size":10,"mtime_ns":5,"digest":"0123456789abcdef0123456789abcdef","algorithm":"xxh3-128/chunked-8MiB"}"#;
        fs::write(output_record_path(&out), json).unwrap();
        assert_eq!(
            read_output_record(&out).unwrap().unwrap().unsynced_boot_id,
            None
        );
    }
}
