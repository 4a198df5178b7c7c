//! GGUF: safetensors float -> a GGUF mix (ComfyUI-GGUF's convert.py + patched llama-quantize in
//! one pass), GGUF -> another GGUF type (requantized), and GGUF -> fp32/fp16/bf16 safetensors
//! (dequantized, ComfyUI key names and logical shapes kept).
//!
//! Sources are read with positioned reads into chunk-sized buffers rather than through a
//! memory map: pages of a map stay in the process's RSS once touched, and a 20 GB source would
//! otherwise count fully against the memory budget. Peak memory is a few chunk buffers.
//!
//! ComfyUI's scaled-fp8 layout (`*.scale_weight` per-tensor scales and a `scaled_fp8` marker) is
//! converted by multiplying each fp8 weight by its scale while widening to f32 (what ComfyUI
//! computes at load time); the scale tensors and the marker are left out and listed as dropped.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use ::gguf::convert::{self as gconv, GgufSource, TensorSource};
use ::gguf::mix::{DroppedTensor, GgufPlan, SourceDtype, SourceTensor};
use ::gguf::reader::MetadataValue;
use ::gguf::{Arch, FileType};
use detect::detection::Format;
use tensorfile::safetensors::{Dtype, ReadBuffer, SafetensorsError, SafetensorsFile, TensorEntry};
use detect::{Detection, Precision};
use tensorfile::safetensors::writer::{SafetensorsWriter, TensorSpec};

use crate::{Backend, BackendOptions, Job, PlannedConversion, SmartError};

/// The GGUF converter. `arch` forces the architecture (`--arch`) instead of detecting it from
/// the tensor names.
#[derive(Debug, Clone, Copy, Default)]
pub struct GgufBackend {
    pub arch: Option<Arch>,
}

/// Bump when the bytes written for some target change.
const VERSION: &str = "gguf-1";

/// f32 values per chunk (16 MiB of f32).
const CHUNK_ELEMS: u64 = 4 << 20;

/// Suffix of ComfyUI's per-tensor fp8 weight scale.
const SCALE_WEIGHT: &str = ".scale_weight";
/// Suffix of ComfyUI's fp8 activation scale (unused once weights are de-scaled).
const SCALE_INPUT: &str = ".scale_input";
/// ComfyUI's marker tensor of a scaled-fp8 file.
const SCALED_FP8_MARKER: &str = "scaled_fp8";

fn is_dequant_target(target: Precision) -> Option<Dtype> {
    match target {
        Precision::Fp32 => Some(Dtype::F32),
        Precision::Fp16 => Some(Dtype::F16),
        Precision::Bf16 => Some(Dtype::BF16),
        _ => None,
    }
}

impl Backend for GgufBackend {
    fn name(&self) -> &'static str {
        "gguf"
    }

    fn supports(&self, source: &Detection, target: Precision) -> bool {
        match (source.format, target) {
            (Format::Safetensors, Precision::Gguf(_)) => {
                source.supported_as_source && source.bitsandbytes.is_none()
            }
            (Format::Gguf, Precision::Gguf(_)) => true,
            (Format::Gguf, t) => is_dequant_target(t).is_some(),
            _ => false,
        }
    }

    fn converter_version(&self, _target: Precision, options: &BackendOptions) -> String {
        // A forced architecture changes `general.architecture` and possibly the mix.
        match self.forced_arch(options) {
            Some(a) => format!("{VERSION}+arch={}", a.name()),
            None => VERSION.to_string(),
        }
    }

    fn plan(&self, job: &Job<'_>) -> Result<Box<dyn PlannedConversion>, SmartError> {
        match (job.source.format, job.target) {
            (Format::Safetensors, Precision::Gguf(ft)) => {
                let source = AnySource::Safetensors(SafetensorsSource::open(job.source_path)?);
                let planned = plan_gguf(
                    source,
                    job.source_path,
                    self.forced_arch(&job.options),
                    ft,
                    job.extra_metadata,
                    Vec::new(),
                )?;
                Ok(Box::new(planned))
            }
            (Format::Gguf, Precision::Gguf(ft)) => {
                let source = open_gguf(job.source_path)?;
                let from = job
                    .source
                    .precision
                    .map_or_else(|| "GGUF".to_string(), |p| p.canonical_name().to_string());
                let warning = format!(
                    "requantizing {from} to {ft} loses quality: the values come from the \
                     source's quantized blocks, not the original weights"
                );
                Ok(Box::new(plan_gguf(
                    source,
                    job.source_path,
                    self.forced_arch(&job.options),
                    ft,
                    job.extra_metadata,
                    vec![warning],
                )?))
            }
            (Format::Gguf, t) => match is_dequant_target(t) {
                Some(dtype) => Ok(Box::new(plan_dequantize(
                    open_gguf(job.source_path)?,
                    dtype,
                    job.extra_metadata,
                )?)),
                None => Err(unsupported(job)),
            },
            _ => Err(unsupported(job)),
        }
    }
}

impl GgufBackend {
    /// The architecture to force, if any. The single place to read a per-job `--arch` from
    /// once `BackendOptions` carries one (`options.arch.or(self.arch)`).
    fn forced_arch(&self, _options: &BackendOptions) -> Option<Arch> {
        self.arch
    }
}

fn unsupported(job: &Job<'_>) -> SmartError {
    SmartError::Unsupported {
        path: job.source_path.to_path_buf(),
        from: job
            .source
            .precision
            .map_or_else(|| "unknown".to_string(), |p| p.canonical_name().to_string()),
        target: job.target,
    }
}

fn open_gguf(path: &Path) -> Result<AnySource, SmartError> {
    Ok(AnySource::Gguf(
        GgufSource::open(path).map_err(SmartError::backend)?,
    ))
}

// ----- sources -----

/// A safetensors tensor as the reader needs it.
#[derive(Debug)]
struct StTensor {
    /// Its index in the header.
    index: usize,
    /// ComfyUI scaled fp8: multiply by this after widening.
    scale: Option<f32>,
}

/// Why reading a safetensors source failed.
#[derive(Debug, thiserror::Error)]
enum StError {
    /// Names the file, the tensor and the range.
    #[error(transparent)]
    Io(#[from] SafetensorsError),
    #[error("{path}: tensor `{name}`: {problem}")]
    Bad {
        path: PathBuf,
        name: String,
        problem: String,
    },
}

/// A safetensors file read with its positioned reads, widened exactly to f32 with
/// `tensorfile::cast_slice` (the torch `.to(float32)` rules).
#[derive(Debug)]
struct SafetensorsSource {
    file: SafetensorsFile,
    tensors: HashMap<String, StTensor>,
    /// Scale tensors and markers consumed by de-scaling.
    dropped: Vec<DroppedTensor>,
}

impl SafetensorsSource {
    fn open(path: &Path) -> Result<SafetensorsSource, SmartError> {
        let file = SafetensorsFile::open(path).map_err(SmartError::backend)?;
        let header = &file.header;
        let mut dropped = Vec::new();
        let mut scales: HashMap<String, f32> = HashMap::new();
        for t in &header.tensors {
            if let Some(stem) = t.name.strip_suffix(SCALE_WEIGHT) {
                let scale = read_scalar(&file, t)?;
                scales.insert(format!("{stem}.weight"), scale);
                dropped.push(DroppedTensor {
                    name: t.name.clone(),
                    reason: "scaled-fp8 weight scale (applied to its weight)",
                });
            } else if t.name.ends_with(SCALE_INPUT) {
                dropped.push(DroppedTensor {
                    name: t.name.clone(),
                    reason: "scaled-fp8 activation scale (not used by GGUF)",
                });
            } else if t.name == SCALED_FP8_MARKER
                || t.name.ends_with(&format!(".{SCALED_FP8_MARKER}"))
            {
                dropped.push(DroppedTensor {
                    name: t.name.clone(),
                    reason: "scaled-fp8 marker",
                });
            }
        }
        let skipped: std::collections::HashSet<&str> =
            dropped.iter().map(|d| d.name.as_str()).collect();
        let mut tensors = HashMap::new();
        for (index, t) in header.tensors.iter().enumerate() {
            if skipped.contains(t.name.as_str()) {
                continue;
            }
            let scale = scales.remove(&t.name);
            if scale.is_some() && !matches!(t.dtype, Dtype::F8E4M3 | Dtype::F8E5M2) {
                return Err(SmartError::backend(StError::Bad {
                    path: path.to_owned(),
                    name: t.name.clone(),
                    problem: format!("has a scale_weight but is {}, not fp8", t.dtype.as_str()),
                }));
            }
            tensors.insert(t.name.clone(), StTensor { index, scale });
        }
        if let Some(orphan) = scales.keys().next() {
            return Err(SmartError::backend(StError::Bad {
                path: path.to_owned(),
                name: format!("{}{SCALE_WEIGHT}", orphan.trim_end_matches(".weight")),
                problem: "a scale_weight without its weight".into(),
            }));
        }
        Ok(SafetensorsSource {
            file,
            tensors,
            dropped,
        })
    }

    fn source_dtype(dtype: Dtype) -> SourceDtype {
        match dtype {
            Dtype::F32 => SourceDtype::F32,
            Dtype::BF16 => SourceDtype::BF16,
            // convert.py keeps only F32 and BF16 sources' small tensors in F32; F64 takes the
            // F16 branch.
            Dtype::F16 | Dtype::F64 => SourceDtype::F16,
            Dtype::F8E4M3 | Dtype::F8E5M2 => SourceDtype::F8,
            Dtype::I64
            | Dtype::I32
            | Dtype::I16
            | Dtype::I8
            | Dtype::U64
            | Dtype::U32
            | Dtype::U16
            | Dtype::U8
            | Dtype::Bool => SourceDtype::NonFloat,
            _ => SourceDtype::Unsupported,
        }
    }
}

/// The value of a one-element float tensor (a scaled-fp8 `scale_weight`).
fn read_scalar(file: &SafetensorsFile, t: &TensorEntry) -> Result<f32, SmartError> {
    let bad = |problem: String| {
        SmartError::backend(StError::Bad {
            path: file.path.clone(),
            name: t.name.clone(),
            problem,
        })
    };
    if t.n_elements() != 1 || !tensorfile::cast::is_cast_source(t.dtype) {
        return Err(bad(format!(
            "a scale_weight must be one float, found {} {:?}; per-channel scales are not \
             supported",
            t.dtype.as_str(),
            t.shape
        )));
    }
    let mut v = [0f32];
    read_f32s(file, t, 0, &mut v).map_err(SmartError::backend)?;
    if !v[0].is_finite() {
        return Err(bad(format!("scale_weight is {}", v[0])));
    }
    Ok(v[0])
}

/// `out.len()` values of `t` from element `start`, widened exactly to f32.
fn read_f32s(
    file: &SafetensorsFile,
    t: &TensorEntry,
    start: u64,
    out: &mut [f32],
) -> Result<(), StError> {
    let bad = |problem: String| StError::Bad {
        path: file.path.clone(),
        name: t.name.clone(),
        problem,
    };
    let len = out.len() as u64;
    // Checked in elements first, so `start * es` below cannot overflow.
    if start.checked_add(len).is_none_or(|e| e > t.n_elements()) {
        return Err(bad(format!(
            "elements {start}+{len} are outside the tensor"
        )));
    }
    let es = t.dtype.bits() / 8;
    // Read and widened piece by piece: the raw bytes are still in cache when widened, and a
    // chunk of millions of elements needs no second buffer as large as itself. The buffer is
    // the thread's own (this function is called from many small parallel tasks); nothing in
    // the loop can run another task on this thread, so the borrow cannot be re-entered, and
    // a fresh buffer covers the case anyway.
    RAW.with(|raw| {
        let mut fresh = ReadBuffer::new();
        let mut borrowed = raw.try_borrow_mut();
        let raw = match borrowed.as_deref_mut() {
            Ok(raw) => raw,
            Err(_) => &mut fresh,
        };
        let mut at = start;
        for piece in out.chunks_mut(WIDEN_PIECE) {
            let bytes = raw.get(piece.len() * es as usize, WIDEN_PIECE * es as usize);
            file.read_tensor_range(t, at * es, bytes)?;
            tensorfile::widen_to_f32(t.dtype, bytes, piece).map_err(|e| bad(e.to_string()))?;
            // (Non-finite values are the quantizer's to report; the counts are not needed.)
            at += piece.len() as u64;
        }
        Ok(())
    })
}

thread_local! {
    /// The raw-bytes buffer of [`read_f32s`] on this thread.
    static RAW: std::cell::RefCell<ReadBuffer> = std::cell::RefCell::new(ReadBuffer::new());
}

/// Elements read and widened at a time by [`read_f32s`].
const WIDEN_PIECE: usize = 1 << 17;

impl TensorSource for SafetensorsSource {
    type Error = StError;

    fn read_f32(&self, name: &str, start: u64, out: &mut [f32]) -> Result<(), StError> {
        let t = self.tensors.get(name).ok_or_else(|| StError::Bad {
            path: self.file.path.clone(),
            name: name.to_owned(),
            problem: "not in the file".into(),
        })?;
        read_f32s(&self.file, &self.file.header.tensors[t.index], start, out)?;
        if let Some(s) = t.scale {
            out.iter_mut().for_each(|v| *v *= s);
        }
        Ok(())
    }
}

/// Either source, so one planned type serves both GGUF outputs.
#[derive(Debug)]
enum AnySource {
    Safetensors(SafetensorsSource),
    Gguf(GgufSource),
}

/// A read error of either source.
#[derive(Debug, thiserror::Error)]
enum SourceError {
    #[error(transparent)]
    Safetensors(#[from] StError),
    #[error(transparent)]
    Gguf(#[from] ::gguf::convert::GgufSourceError),
}

impl TensorSource for AnySource {
    type Error = SourceError;

    fn read_f32(&self, name: &str, start: u64, out: &mut [f32]) -> Result<(), Self::Error> {
        match self {
            AnySource::Safetensors(s) => Ok(s.read_f32(name, start, out)?),
            AnySource::Gguf(s) => Ok(s.read_f32(name, start, out)?),
        }
    }
}

impl AnySource {
    /// Bytes per source element of `name` (GGUF: the block bytes spread over its values).
    fn bytes_per_element(&self, name: &str) -> f64 {
        match self {
            AnySource::Safetensors(s) => s.tensors.get(name).map_or(0.0, |t| {
                (s.file.header.tensors[t.index].dtype.bits() / 8) as f64
            }),
            AnySource::Gguf(s) => s.file().tensor(name).map_or(0.0, |t| {
                t.ggml_type.type_size() as f64 / t.ggml_type.block_size() as f64
            }),
        }
    }
}

// ----- -> GGUF -----

/// A planned GGUF output.
struct PlannedGguf {
    source: AnySource,
    plan: GgufPlan,
    extra: Vec<(String, MetadataValue)>,
    output_len: u64,
    /// Source bytes read before each planned tensor, and in total.
    bytes_before: Vec<u64>,
    source_bytes: u64,
    warnings: Vec<String>,
}

fn plan_gguf(
    source: AnySource,
    path: &Path,
    forced_arch: Option<Arch>,
    target: FileType,
    extra_metadata: &BTreeMap<String, String>,
    warnings: Vec<String>,
) -> Result<PlannedGguf, SmartError> {
    let with_path =
        |e: &dyn std::fmt::Display| SmartError::backend(format!("{}: {e}", path.display()));
    let mut plan = match &source {
        AnySource::Safetensors(st) => {
            // convert.py's order is the order of the data in the file (see gguf::mix), which is
            // the validated header's order.
            let sources: Vec<SourceTensor<'_>> = st
                .file
                .header
                .tensors
                .iter()
                .filter(|t| st.tensors.contains_key(&t.name))
                .map(|t| SourceTensor {
                    name: &t.name,
                    shape: &t.shape,
                    dtype: SafetensorsSource::source_dtype(t.dtype),
                })
                .collect();
            let mut plan =
                ::gguf::mix::plan(&sources, forced_arch, target).map_err(|e| with_path(&e))?;
            plan.dropped.splice(0..0, st.dropped.iter().cloned());
            plan
        }
        AnySource::Gguf(g) => g.plan(forced_arch, target).map_err(SmartError::backend)?,
    };
    plan.dropped.sort_by(|a, b| a.name.cmp(&b.name));
    let mut warnings = warnings;
    if !plan.fallbacks.is_empty() {
        let n = plan.fallbacks.len();
        let some: Vec<&str> = plan.fallbacks.iter().take(3).map(String::as_str).collect();
        warnings.push(format!(
            "{n} tensor(s) the {target} mix would quantize have rows that are not whole blocks \
             and were stored unquantized, as ComfyUI-GGUF's quantizer does (F16 for K-quants): \
             {}{}",
            some.join(", "),
            if n > 3 { ", ..." } else { "" }
        ));
    }
    // Provenance as STRING KVs, after the policy's keys; never shadow one of them.
    let extra: Vec<(String, MetadataValue)> = extra_metadata
        .iter()
        .filter(|(k, _)| !plan.metadata.iter().any(|(pk, _)| pk == *k))
        .map(|(k, v)| (k.clone(), MetadataValue::String(v.clone())))
        .collect();
    let output_len = gconv::output_len(&plan, &extra).map_err(|e| with_path(&e))?;
    let mut bytes_before = Vec::with_capacity(plan.tensors.len());
    let mut total = 0u64;
    for t in &plan.tensors {
        bytes_before.push(total);
        total += (t.n_elements() as f64 * source.bytes_per_element(&t.source_name)) as u64;
    }
    Ok(PlannedGguf {
        source,
        plan,
        extra,
        output_len,
        bytes_before,
        source_bytes: total,
        warnings,
    })
}

impl PlannedConversion for PlannedGguf {
    fn output_len(&self) -> u64 {
        self.output_len
    }

    fn totals(&self) -> (u64, u64) {
        (self.source_bytes, self.plan.tensors.len() as u64)
    }

    fn write(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<serde_json::Value, SmartError> {
        let plan = &self.plan;
        // A source rewritten since planning would be read with stale offsets.
        if let AnySource::Safetensors(st) = &self.source {
            st.file.check_unchanged().map_err(SmartError::backend)?;
        }
        let report = gconv::write_gguf(plan, &self.extra, &self.source, out, &mut |i, done| {
            let t = &plan.tensors[i];
            let per = self.source.bytes_per_element(&t.source_name);
            let finished = done == t.n_elements();
            progress(
                self.bytes_before[i] + (done as f64 * per) as u64,
                i as u64 + u64::from(finished),
            );
        })
        .map_err(SmartError::backend)?;
        Ok(serde_json::json!({
            "format": "gguf",
            "architecture": plan.arch.name(),
            "file_type": plan.file_type.name(),
            "tensors": report.tensors,
            "quantized_tensors": report.quantized,
            "types": plan.type_histogram(),
            "reshaped": plan.tensors.iter().filter(|t| t.orig_shape.is_some()).count(),
            "data_bytes": report.data_bytes,
            "dropped": plan.dropped.iter().map(|d| serde_json::json!({
                "name": d.name,
                "reason": d.reason,
            })).collect::<Vec<_>>(),
            "warnings": self.warnings,
        }))
    }
}

// ----- GGUF -> safetensors -----

struct PlannedDequant {
    source: GgufSource,
    specs: Vec<TensorSpec>,
    metadata: BTreeMap<String, String>,
    output_len: u64,
    source_bytes: u64,
}

fn plan_dequantize(
    source: AnySource,
    dtype: Dtype,
    extra_metadata: &BTreeMap<String, String>,
) -> Result<PlannedDequant, SmartError> {
    let AnySource::Gguf(source) = source else {
        return Err(SmartError::backend("dequantization needs a GGUF source"));
    };
    let logical = source.logical_tensors().map_err(SmartError::backend)?;
    let specs: Vec<TensorSpec> = logical
        .into_iter()
        .map(|t| TensorSpec {
            name: t.name,
            dtype,
            shape: t.shape,
        })
        .collect();
    let mut metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    metadata.extend(extra_metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
    let output_len = tensorfile::safetensors::writer::output_len(&specs, &metadata)
        .map_err(|e| SmartError::backend(format!("{}: {e}", source.file().path.display())))?;
    let source_bytes = source.file().tensors.iter().map(|t| t.byte_len()).sum();
    Ok(PlannedDequant {
        source,
        specs,
        metadata,
        output_len,
        source_bytes,
    })
}

impl PlannedConversion for PlannedDequant {
    fn output_len(&self) -> u64 {
        self.output_len
    }

    fn totals(&self) -> (u64, u64) {
        (self.source_bytes, self.specs.len() as u64)
    }

    fn write(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<serde_json::Value, SmartError> {
        let path = &self.source.file().path;
        let io =
            |e: std::io::Error| SmartError::backend(format!("{}: writing: {e}", path.display()));
        let mut writer = SafetensorsWriter::new(out, &self.specs, &self.metadata).map_err(io)?;
        let mut values: Vec<f32> = Vec::new();
        let mut wide: Vec<u8> = Vec::new();
        let mut narrow: Vec<u8> = Vec::new();
        let mut bytes_done = 0u64;
        let mut types: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (i, (spec, info)) in self
            .specs
            .iter()
            .zip(&self.source.file().tensors)
            .enumerate()
        {
            *types.entry(info.ggml_type.name()).or_insert(0) += 1;
            let n = info.n_elements();
            let per = info.ggml_type.type_size() as f64 / info.ggml_type.block_size() as f64;
            let mut start = 0u64;
            while start < n {
                let len = CHUNK_ELEMS.min(n - start);
                values.resize(len as usize, 0.0);
                self.source
                    .read_f32(&spec.name, start, &mut values)
                    .map_err(SmartError::backend)?;
                wide.clear();
                wide.extend(values.iter().flat_map(|v| v.to_le_bytes()));
                let chunk: &[u8] = if spec.dtype == Dtype::F32 {
                    &wide
                } else {
                    narrow.resize(values.len() * 2, 0);
                    tensorfile::cast_slice(Dtype::F32, &wide, spec.dtype, &mut narrow).map_err(
                        |e| {
                            SmartError::backend(format!("{}: `{}`: {e}", path.display(), spec.name))
                        },
                    )?;
                    &narrow
                };
                writer.write_chunk(chunk).map_err(io)?;
                start += len;
                progress(
                    bytes_done + (start as f64 * per) as u64,
                    i as u64 + u64::from(start == n),
                );
            }
            bytes_done += info.byte_len();
            if values.capacity() > 2 * CHUNK_ELEMS as usize {
                values = Vec::new();
                wide = Vec::new();
                narrow = Vec::new();
            }
        }
        writer.finish().map_err(io)?;
        Ok(serde_json::json!({
            "format": "safetensors",
            "dtype": self.specs.first().map_or("", |s| s.dtype.as_str()),
            "tensors": self.specs.len(),
            "source_types": types,
            "reshaped": self.specs.iter().zip(&self.source.file().tensors)
                .filter(|(s, t)| s.shape != t.torch_shape()).count(),
            "dropped": [],
            "warnings": [],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_dtypes_follow_convert_py() {
        let st = SafetensorsSource::source_dtype;
        assert_eq!(st(Dtype::F8E5M2), SourceDtype::F8);
        assert_eq!(st(Dtype::I64), SourceDtype::NonFloat);
        assert_eq!(st(Dtype::F4), SourceDtype::Unsupported);
        assert_eq!(st(Dtype::BF16), SourceDtype::BF16);
    }

    #[test]
    fn a_forced_arch_changes_the_converter_version() {
        let o = BackendOptions::default();
        let t = Precision::Gguf(FileType::Q8_0);
        assert_ne!(
            GgufBackend { arch: None }.converter_version(t, &o),
            GgufBackend {
                arch: Some(Arch::Flux)
            }
            .converter_version(t, &o)
        );
    }

    #[test]
    fn dequant_targets() {
        assert_eq!(is_dequant_target(Precision::Bf16), Some(Dtype::BF16));
        assert_eq!(is_dequant_target(Precision::Nf4), None);
    }
}
