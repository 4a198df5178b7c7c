//! Provenance: what an output was made from, embedded in the output itself.
//!
//! Stored as flat string key-values under the `convcache.` prefix: in safetensors outputs in
//! `__metadata__`, in GGUF outputs as string key-values. Keeping it inside the output (not in a
//! sidecar) means a copied or moved output keeps its provenance, and an output can never be
//! paired with the wrong record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use detect::Precision;

use crate::CacheError;

/// Prefix of every provenance key.
const PREFIX: &str = "convcache.";

/// Version of the key layout below.
const PROVENANCE_VERSION: &str = "1";

const K_VERSION: &str = "convcache.provenance_version";
const K_NAME: &str = "convcache.source_name";
const K_PATH: &str = "convcache.source_path";
const K_SIZE: &str = "convcache.source_size";
const K_MTIME: &str = "convcache.source_mtime_ns";
const K_DIGEST: &str = "convcache.source_digest";
const K_ALGO: &str = "convcache.digest_algorithm";
const K_TARGET: &str = "convcache.target";
const K_CONVERTER: &str = "convcache.converter_version";

/// Where an output came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Provenance {
    /// The source's file name.
    pub source_name: String,
    /// The source's absolute path when converted (the fast identity check; a moved source is
    /// still recognised by its digest).
    pub source_path: PathBuf,
    /// The source's size in bytes.
    pub source_size: u64,
    /// The source's modification time, nanoseconds since the Unix epoch.
    pub source_mtime_ns: i128,
    /// The source's content digest ([`crate::digest`]).
    pub source_digest: String,
    /// The precision the output is in.
    #[serde(serialize_with = "ser_precision")]
    pub target: Precision,
    /// Which converter (and version) wrote it.
    pub converter_version: String,
}

fn ser_precision<S: serde::Serializer>(p: &Precision, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(p.canonical_name())
}

/// The precision whose canonical name is exactly `name` (case-sensitive, so GGUF `F16` and
/// safetensors `fp16` stay apart).
fn precision_from_canonical(name: &str) -> Option<Precision> {
    Precision::all().find(|p| p.canonical_name() == name)
}

/// Nanoseconds since the Unix epoch (negative before it).
pub fn system_time_ns(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

/// The identity facts of a source file that can be read without hashing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStat {
    /// Absolute (canonical when possible) path.
    pub path: PathBuf,
    /// File name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i128,
}

impl SourceStat {
    /// Stats `source` (following symlinks: a linked model is identified by its target's content).
    ///
    /// A sharded source (a shard index, or a folder holding one) is identified by its index:
    /// `path` and `name` are the index's, `size` is the index's and every shard's sizes added,
    /// `mtime_ns` the latest of their modification times (so rewriting or touching any one of
    /// them changes the fast identity, and the content digest then decides).
    pub fn of(source: &Path) -> Result<SourceStat, CacheError> {
        if let Some(index) = tensorfile::sharded::locate_index(source)? {
            let index = tensorfile::sharded::ShardIndex::read(&index)?;
            let mut stat = SourceStat::of_file(&index.path)?;
            for shard in &index.shards {
                let s = SourceStat::of_file(shard)?;
                stat.size = stat.size.saturating_add(s.size);
                stat.mtime_ns = stat.mtime_ns.max(s.mtime_ns);
            }
            return Ok(stat);
        }
        SourceStat::of_file(source)
    }

    /// [`SourceStat::of`] for one regular file.
    fn of_file(source: &Path) -> Result<SourceStat, CacheError> {
        let meta = std::fs::metadata(source).map_err(|e| CacheError::Io {
            path: source.to_path_buf(),
            op: "stat the source",
            source: e,
        })?;
        if !meta.is_file() {
            return Err(CacheError::NotAFile(source.to_path_buf()));
        }
        let path = absolute(source);
        let mtime = meta.modified().map_err(|e| CacheError::Io {
            path: source.to_path_buf(),
            op: "read the modification time of",
            source: e,
        })?;
        Ok(SourceStat {
            name: source
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path,
            size: meta.len(),
            mtime_ns: system_time_ns(mtime),
        })
    }
}

/// The path the provenance records for `source` ([`absolute`]); for a sharded source (a folder
/// holding a shard index), its index's, as [`SourceStat::of`] records it.
pub fn identity_path(source: &Path) -> PathBuf {
    // A diffusers repository folder is the model it holds (as `convert` reads it).
    let source = tensorfile::diffusers::resolve_source(source);
    let source = source.as_path();
    match tensorfile::sharded::locate_index(source) {
        Ok(Some(index)) => absolute(&index),
        _ => absolute(source),
    }
}

/// `path` made absolute: canonical if it exists, else joined to the current dir. Non-UTF-8
/// bytes are replaced (lossy), exactly as the provenance stores the path, so that comparisons
/// with a stored path hold for every path.
pub fn absolute(path: &Path) -> PathBuf {
    // A file that no longer exists (a deleted source) still resolves through its folder's
    // links and `..`, so that it names what the provenance recorded.
    let in_canonical_parent = || -> std::io::Result<PathBuf> {
        let name = path.file_name().ok_or(std::io::ErrorKind::NotFound)?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Ok(std::fs::canonicalize(parent)?.join(name))
    };
    let p = std::fs::canonicalize(path)
        .or_else(|_| in_canonical_parent())
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf());
    PathBuf::from(p.to_string_lossy().into_owned())
}

impl Provenance {
    /// The provenance of an output of `source` (already stat'ed and hashed) in `target`.
    pub fn new(
        source: &SourceStat,
        digest: String,
        target: Precision,
        converter_version: impl Into<String>,
    ) -> Provenance {
        Provenance {
            source_name: source.name.clone(),
            source_path: source.path.clone(),
            source_size: source.size,
            source_mtime_ns: source.mtime_ns,
            source_digest: digest,
            target,
            converter_version: converter_version.into(),
        }
    }

    /// The flat `convcache.*` key-values to embed in the output.
    pub fn to_metadata(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert(K_VERSION.into(), PROVENANCE_VERSION.into());
        m.insert(K_NAME.into(), self.source_name.clone());
        m.insert(
            K_PATH.into(),
            self.source_path.to_string_lossy().into_owned(),
        );
        m.insert(K_SIZE.into(), self.source_size.to_string());
        m.insert(K_MTIME.into(), self.source_mtime_ns.to_string());
        m.insert(K_DIGEST.into(), self.source_digest.clone());
        m.insert(K_ALGO.into(), crate::digest::ALGORITHM.into());
        m.insert(K_TARGET.into(), self.target.canonical_name().into());
        m.insert(K_CONVERTER.into(), self.converter_version.clone());
        m
    }

    /// Reads provenance back from an output's metadata.
    ///
    /// `None` when there is none at all (a file another tool made) or when it is unusable:
    /// missing or malformed keys, an unknown layout version or digest algorithm. An unusable
    /// record is treated like no record: the file is not trusted as convcache's.
    pub fn from_metadata(m: &BTreeMap<String, String>) -> Option<Provenance> {
        if m.get(K_VERSION).map(String::as_str) != Some(PROVENANCE_VERSION)
            || m.get(K_ALGO).map(String::as_str) != Some(crate::digest::ALGORITHM)
        {
            return None;
        }
        let digest = m.get(K_DIGEST)?;
        if digest.len() != 32 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(Provenance {
            source_name: m.get(K_NAME)?.clone(),
            source_path: PathBuf::from(m.get(K_PATH)?),
            source_size: m.get(K_SIZE)?.parse().ok()?,
            source_mtime_ns: m.get(K_MTIME)?.parse().ok()?,
            source_digest: digest.to_ascii_lowercase(),
            target: precision_from_canonical(m.get(K_TARGET)?)?,
            converter_version: m.get(K_CONVERTER)?.clone(),
        })
    }

    /// Whether the metadata holds any `convcache.` key (even an unusable record).
    pub fn has_any_key(m: &BTreeMap<String, String>) -> bool {
        m.keys().any(|k| Provenance::is_key(k))
    }

    /// Whether `key` is one of the provenance keys' namespace.
    pub fn is_key(key: &str) -> bool {
        key.starts_with(PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tensorfile::gguf::FileType;

    fn sample(target: Precision) -> Provenance {
        Provenance {
            source_name: "flux.safetensors".into(),
            source_path: "/m/checkpoints/flux.safetensors".into(),
            source_size: 1234,
            source_mtime_ns: -5,
            source_digest: "0123456789abcdef0123456789abcdef".into(),
            target,
            converter_version: "precision 0.1.0".into(),
        }
    }

    #[test]
    fn roundtrips_and_rejects_broken_records() {
        for t in Precision::all() {
            let p = sample(t);
            assert_eq!(Provenance::from_metadata(&p.to_metadata()), Some(p));
        }
        let good = sample(Precision::Gguf(FileType::MostlyF16)).to_metadata();
        assert_eq!(good[K_TARGET], "F16");
        for (k, v) in [
            (K_SIZE, "12x"),
            (K_DIGEST, "zz"),
            (K_TARGET, "f16"),
            (K_VERSION, "2"),
            (K_ALGO, "md5"),
        ] {
            let mut m = good.clone();
            m.insert(k.into(), v.into());
            assert_eq!(Provenance::from_metadata(&m), None, "{k}={v}");
            assert!(Provenance::has_any_key(&m));
        }
        let mut m = good.clone();
        m.remove(K_NAME);
        assert_eq!(Provenance::from_metadata(&m), None);
        assert!(!Provenance::has_any_key(&BTreeMap::new()));
    }

    proptest! {
        #[test]
        fn from_metadata_never_panics(kv in proptest::collection::btree_map("convcache\\.[a-z_]{1,20}", "\\PC{0,40}", 0..12)) {
            let _ = Provenance::from_metadata(&kv);
        }
    }
}
