//! What a file at a cache path is: complete or not, its precision, its provenance.

use std::path::{Path, PathBuf};

use detect::Precision;

use crate::provenance::Provenance;

/// What [`examine`] found in a file at a cache path.
#[derive(Debug, Clone)]
pub struct Examined {
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// The precision detected from the header (not the name).
    pub precision: Option<Precision>,
    /// Usable provenance, if the file carries one.
    pub provenance: Option<Provenance>,
    /// Whether any `convcache.` key is present (a broken record is not a foreign file).
    pub has_provenance_keys: bool,
    /// Why the file is not a complete, readable model; `None` when it is.
    pub problem: Option<String>,
}

impl Examined {
    /// Complete and in `target` precision.
    pub fn is_complete_in(&self, target: Precision) -> bool {
        self.problem.is_none() && self.precision == Some(target)
    }

    /// The reason this file cannot serve as `target`, if any (incomplete, wrong precision).
    pub fn defect_for(&self, target: Precision) -> Option<String> {
        if let Some(p) = &self.problem {
            return Some(p.clone());
        }
        match self.precision {
            Some(p) if p == target => None,
            Some(p) => Some(format!("it holds {p}, not {target}")),
            None => Some("its precision cannot be detected".into()),
        }
    }
}

/// Examines the file at `path` (following a symlink: a link at a cache path is read, never
/// deleted). `None` when nothing is there.
///
/// Never fails on the file's contents: a truncated, corrupt or foreign file is reported in
/// [`Examined::problem`]. Completeness is `detect`'s validation: for safetensors the header
/// must parse and its data section must end exactly at the end of the file; GGUF files go
/// through the validated GGUF reader. The format is sniffed from the content, so temporaries
/// (`.tmp`) are examined like outputs.
pub fn examine(path: &Path) -> Option<Examined> {
    let meta = std::fs::metadata(path).ok()?;
    let mut ex = Examined {
        path: path.to_path_buf(),
        size: meta.len(),
        precision: None,
        provenance: None,
        has_provenance_keys: false,
        problem: None,
    };
    if !meta.is_file() {
        ex.problem = Some("not a regular file".into());
        return Some(ex);
    }
    match detect::detect(path) {
        Ok(d) => {
            // A precision guessed from the file name proves nothing about the contents.
            ex.precision = d
                .precision
                .filter(|_| d.evidence == detect::detection::Evidence::Header);
            ex.has_provenance_keys = Provenance::has_any_key(&d.metadata);
            ex.provenance = Provenance::from_metadata(&d.metadata);
            if d.file_size != ex.size {
                ex.problem = Some(format!(
                    "its size changed while it was read ({} then {} bytes)",
                    d.file_size, ex.size
                ));
            }
        }
        Err(e) => {
            ex.problem = Some(e.to_string());
            // A damaged output of convcache's (data truncated or extended) still says whose it
            // is in its header, which decides whether it may be replaced.
            ex.has_provenance_keys = header_has_provenance_keys(path, ex.size);
        }
    }
    Some(ex)
}

/// Whether the metadata at the start of `path` (a file of `size` bytes) has provenance keys,
/// whatever follows it: a safetensors header that parses as JSON, or GGUF key-values that
/// validate (read from the first [`GGUF_METADATA_PREFIX`] bytes). Lengths are checked against
/// the file size and caps before anything is allocated.
fn header_has_provenance_keys(path: &Path, size: u64) -> bool {
    use std::io::Read;
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let mut first = [0u8; 8];
    if file.read_exact(&mut first).is_err() {
        return false;
    }
    if first[..4] == *b"GGUF" {
        let len = size.min(GGUF_METADATA_PREFIX);
        let mut prefix = first.to_vec();
        if file.take(len - 8).read_to_end(&mut prefix).is_err() {
            return false;
        }
        return gguf::reader::read_metadata_prefix(&prefix)
            .is_ok_and(|kv| kv.iter().any(|(k, _)| Provenance::is_key(k)));
    }
    let len = u64::from_le_bytes(first);
    if len > tensorfile::safetensors::MAX_HEADER_LEN || len > size.saturating_sub(8) {
        return false;
    }
    let mut json = vec![0u8; len as usize];
    if file.read_exact(&mut json).is_err() {
        return false;
    }
    let Ok(serde_json::Value::Object(header)) = serde_json::from_slice(&json) else {
        return false;
    };
    match header.get("__metadata__") {
        Some(serde_json::Value::Object(meta)) => meta.keys().any(|k| Provenance::is_key(k)),
        _ => false,
    }
}

/// How much of a damaged GGUF file is read for its key-values (ours hold a few KiB).
const GGUF_METADATA_PREFIX: u64 = 16 << 20;
