//! What a file at a cache path is: complete or not, its precision, its provenance.

use std::path::{Path, PathBuf};

use detect::Precision;

use crate::provenance::Provenance;

/// What [`examine`] found in a file at a cache path.
#[derive(Debug, Clone)]
pub struct Examined {
    /// The file examined.
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
/// whatever data follows it: a safetensors header that validates except for the length of the
/// data section (truncated or extended), or GGUF key-values that validate (read from the first
/// [`GGUF_METADATA_PREFIX`] bytes). Both go through `tensorfile`'s readers; lengths are checked
/// against the file size and caps before anything is allocated.
fn header_has_provenance_keys(path: &Path, size: u64) -> bool {
    use std::io::Read;
    use tensorfile::safetensors::{HeaderError, check_header_len, parse_header};
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let mut first = [0u8; 8];
    if file.read_exact(&mut first).is_err() {
        return false;
    }
    let mut prefix = first.to_vec();
    if first[..4] == *b"GGUF" {
        let len = size.min(GGUF_METADATA_PREFIX);
        if file.take(len - 8).read_to_end(&mut prefix).is_err() {
            return false;
        }
        return tensorfile::gguf::reader::read_metadata_prefix(&prefix)
            .is_ok_and(|kv| kv.iter().any(|(k, _)| Provenance::is_key(k)));
    }
    let Ok(header_len) = check_header_len(first, size) else {
        return false;
    };
    if file.take(header_len).read_to_end(&mut prefix).is_err() {
        return false;
    }
    // The data section is as long as the tensors say: parsed against an unbounded file first,
    // the only complaint left about a valid header is the length it covers.
    let data_start = 8 + header_len;
    let header = match parse_header(&prefix, u64::MAX) {
        Err(HeaderError::TrailingData { covered, .. }) => {
            parse_header(&prefix, data_start.saturating_add(covered))
        }
        other => other,
    };
    header.is_ok_and(|h| h.metadata.keys().any(|k| Provenance::is_key(k)))
}

/// How much of a damaged GGUF file is read for its key-values (ours hold a few KiB).
const GGUF_METADATA_PREFIX: u64 = 16 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tensorfile::{Dtype, SafetensorsWriter, TensorSpec};

    fn write_model(path: &Path, meta: &BTreeMap<String, String>) -> Vec<u8> {
        let spec = TensorSpec {
            name: "w".into(),
            dtype: Dtype::F16,
            shape: vec![2, 8],
        };
        let mut w = SafetensorsWriter::new(Vec::new(), &[spec], meta).unwrap();
        w.write_chunk(&[7u8; 32]).unwrap();
        let bytes = w.finish().unwrap();
        std::fs::write(path, &bytes).unwrap();
        bytes
    }

    /// A damaged output still says whose it is (which decides whether it may be replaced);
    /// a damaged file without provenance does not claim to be ours.
    #[test]
    fn a_truncated_or_extended_output_keeps_its_provenance_keys() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("m_fp16.safetensors");
        let meta = BTreeMap::from([("convcache.target".to_string(), "fp16".to_string())]);
        for (meta, ours) in [(meta, true), (BTreeMap::new(), false)] {
            let bytes = write_model(&out, &meta);
            let ex = examine(&out).unwrap();
            assert_eq!((ex.problem.is_none(), ex.has_provenance_keys), (true, ours));
            let mut longer = bytes.clone();
            longer.push(0);
            for damaged in [
                &bytes[..bytes.len() - 1],
                &longer[..],
                &bytes[..bytes.len() - 32],
            ] {
                std::fs::write(&out, damaged).unwrap();
                let ex = examine(&out).unwrap();
                assert!(ex.problem.is_some());
                assert_eq!(ex.has_provenance_keys, ours, "{} bytes", damaged.len());
            }
            // The header itself cut short: nothing can be read from it.
            std::fs::write(&out, &bytes[..20]).unwrap();
            assert!(!examine(&out).unwrap().has_provenance_keys);
        }
    }
}
