//! What a file at a cache path is: complete or not, its precision, its provenance.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
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
/// [`Examined::problem`].
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
    match shim::detect(path) {
        Ok(d) => {
            ex.precision = d.precision;
            ex.has_provenance_keys = Provenance::has_any_key(&d.metadata);
            ex.provenance = Provenance::from_metadata(&d.metadata);
            if d.file_size != ex.size {
                ex.problem = Some(format!(
                    "its size changed while it was read ({} then {} bytes)",
                    d.file_size, ex.size
                ));
            }
        }
        Err(e) => ex.problem = Some(e.to_string()),
    }
    if ex.problem.is_none() && path.extension().is_some_and(|e| e == "safetensors") {
        match safetensors_expected_len(path, ex.size) {
            Ok(expected) if expected == ex.size => {}
            Ok(expected) => {
                ex.problem = Some(format!(
                    "incomplete: the header describes {expected} bytes, the file has {}",
                    ex.size
                ))
            }
            Err(e) => ex.problem = Some(e),
        }
    }
    Some(ex)
}

/// Upper bound on a safetensors header we accept here (the reference implementation's limit).
const MAX_HEADER: u64 = 100 << 20;

/// The file size a safetensors header implies: 8 + header length + the end of the last tensor's
/// data. Checked independently of `detect` because "complete" is the cache's decision: a file
/// cut short after its header, or with bytes appended, is not a valid output.
fn safetensors_expected_len(path: &Path, file_size: u64) -> Result<u64, String> {
    let mut f = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| "incomplete: shorter than a safetensors header".to_string())?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || n > file_size.saturating_sub(8) {
        return Err(format!(
            "incomplete: header length {n} does not fit in {file_size} bytes"
        ));
    }
    // n is bounded by MAX_HEADER and by the file size, so this allocation is bounded.
    let mut json = vec![0u8; n as usize];
    f.read_exact(&mut json)
        .map_err(|e| format!("incomplete header: {e}"))?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|e| format!("corrupt header: {e}"))?;
    let mut end = 0u64;
    for (name, t) in &header {
        if name == "__metadata__" {
            continue;
        }
        let offsets = t
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .ok_or_else(|| format!("corrupt header: tensor `{name}` has no data_offsets"))?;
        let e = offsets[1]
            .as_u64()
            .ok_or_else(|| format!("corrupt header: tensor `{name}` has a bad data offset"))?;
        end = end.max(e);
    }
    Ok(8 + n + end)
}

/// Stand-in for `detect::detect` until the detect crate's detection lands (same fields).
/// TEMPORARY: dominant dtype by bytes of a safetensors header; no GGUF, no bitsandbytes.
mod shim {
    use super::*;
    use detect::safetensors::Dtype;

    pub struct Detection {
        pub precision: Option<Precision>,
        pub metadata: BTreeMap<String, String>,
        pub file_size: u64,
    }

    pub fn detect(path: &Path) -> Result<Detection, String> {
        let file_size = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
        let mut f = File::open(path).map_err(|e| e.to_string())?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(|e| e.to_string())?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER || n > file_size.saturating_sub(8) {
            return Err("bad header length".into());
        }
        let mut json = vec![0u8; n as usize];
        f.read_exact(&mut json).map_err(|e| e.to_string())?;
        let header: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&json).map_err(|e| e.to_string())?;
        let mut metadata = BTreeMap::new();
        let mut bytes: BTreeMap<Dtype, u64> = BTreeMap::new();
        for (k, v) in &header {
            if k == "__metadata__" {
                if let Some(m) = v.as_object() {
                    for (mk, mv) in m {
                        if let Some(s) = mv.as_str() {
                            metadata.insert(mk.clone(), s.to_string());
                        }
                    }
                }
                continue;
            }
            let dt: Dtype = v
                .get("dtype")
                .and_then(|d| d.as_str())
                .and_then(|d| d.parse().ok())
                .ok_or("bad dtype")?;
            let o = v
                .get("data_offsets")
                .and_then(|o| o.as_array())
                .ok_or("no offsets")?;
            let (a, b) = (
                o.first().and_then(|x| x.as_u64()).unwrap_or(0),
                o.get(1).and_then(|x| x.as_u64()).unwrap_or(0),
            );
            *bytes.entry(dt).or_default() += b.saturating_sub(a);
        }
        let precision = bytes
            .iter()
            .filter(|(d, _)| d.is_float())
            .max_by_key(|(_, b)| **b)
            .and_then(|(d, _)| match d {
                Dtype::F32 => Some(Precision::Fp32),
                Dtype::F16 => Some(Precision::Fp16),
                Dtype::BF16 => Some(Precision::Bf16),
                Dtype::F8E4M3 => Some(Precision::Fp8E4m3fn),
                Dtype::F8E5M2 => Some(Precision::Fp8E5m2),
                _ => None,
            });
        Ok(Detection {
            precision,
            metadata,
            file_size,
        })
    }
}
