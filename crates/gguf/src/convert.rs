//! Streams a planned conversion into a GGUF file.
//!
//! Any [`TensorSource`] is read (a safetensors file, its scaled-fp8 view, a GGUF file through
//! [`crate::source::GgufSource`]); each tensor is read in chunks of whole rows, rounded through
//! its base type (the values ComfyUI-GGUF's quantizer would start from), quantized in parallel
//! and written through `tensorfile`'s pipeline while the next chunk is converted. Memory is
//! bounded by the chunk budget, never by the model.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Mutex;

use detect::arch::GgufNaming;
use rayon::prelude::*;
use serde::Serialize;
use tensorfile::pipeline::{self, Piece, StreamError};
use tensorfile::{Dtype, SourceError, TensorSource};

use crate::Arch;
use crate::mix::{self, DroppedTensor, GgufPlan, SourcePlanError};
use crate::quant::{
    self, QuantError, bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits,
};
use crate::reader::MetadataValue;
use crate::source::GgufSource;
use crate::types::{FileType, GgmlType};
use crate::writer::{GgufWriter, TensorDesc};

/// Elements per chunk: 4M f32 values (16 MiB), rounded down to whole rows.
const CHUNK_ELEMS: u64 = 4 << 20;

/// Why writing failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Reading a tensor from the source failed.
    #[error("reading tensor `{name}`: {source}")]
    Source {
        /// The GGUF tensor name.
        name: String,
        /// The source's error (names the file).
        source: SourceError,
    },
    /// The source file changed (or could not be checked) since it was planned.
    #[error(transparent)]
    SourceChanged(SourceError),
    /// The quantizer refused a buffer (its lengths are the converter's doing, not the
    /// input's).
    #[error("quantizing tensor `{name}`: {source}")]
    Quant {
        /// The GGUF tensor name.
        name: String,
        /// The quantizer's error.
        source: QuantError,
    },
    /// A tensor too large to address.
    #[error("tensor `{name}`: size overflows")]
    Size {
        /// The GGUF tensor name.
        name: String,
    },
    /// Writing the output failed.
    #[error("writing the GGUF file: {0}")]
    Io(#[from] io::Error),
}

impl ConvertError {
    /// Whether the fault is in the input (its data, its shapes, a changed file) rather than
    /// in reading or writing files or in the converter.
    pub fn is_input_fault(&self) -> bool {
        match self {
            ConvertError::Source { source, .. } | ConvertError::SourceChanged(source) => {
                source.is_input_fault()
            }
            ConvertError::Size { .. } => true,
            ConvertError::Quant { .. } | ConvertError::Io(_) => false,
        }
    }
}

/// What was written (the converter's report; `smart` shows it as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Always `gguf`.
    pub format: &'static str,
    /// The architecture written in `general.architecture`.
    pub architecture: &'static str,
    /// The target's name (`Q4_K_M`).
    pub file_type: &'static str,
    /// Tensors written.
    pub tensors: u64,
    /// Tensors stored in a block-quantized type.
    pub quantized_tensors: u64,
    /// Tensors per written type.
    pub types: BTreeMap<&'static str, usize>,
    /// Tensors flattened (with a `comfy.gguf.orig_shape`).
    pub reshaped: usize,
    /// Bytes of tensor data written (padding excluded).
    pub data_bytes: u64,
    /// Source tensors left out, sorted by name.
    pub dropped: Vec<DroppedTensor>,
    /// What the user should know about the output.
    pub warnings: Vec<String>,
}

impl Report {
    /// The report of a successful [`write_gguf`] of `plan`.
    fn of(plan: &GgufPlan, data_bytes: u64) -> Report {
        Report {
            format: "gguf",
            architecture: plan.arch.name(),
            file_type: plan.file_type.name(),
            tensors: plan.tensors.len() as u64,
            quantized_tensors: plan
                .tensors
                .iter()
                .filter(|t| t.ggml_type.is_quantized())
                .count() as u64,
            types: plan.type_histogram(),
            reshaped: plan
                .tensors
                .iter()
                .filter(|t| t.orig_shape.is_some())
                .count(),
            data_bytes,
            dropped: plan.dropped.clone(),
            warnings: plan.warnings(),
        }
    }
}

/// The tensor descriptors for the writer.
fn tensor_descs(plan: &GgufPlan) -> Vec<TensorDesc> {
    plan.tensors
        .iter()
        .map(|t| TensorDesc {
            name: t.name.clone(),
            dims: t.ggml_dims(),
            ggml_type: t.ggml_type,
        })
        .collect()
}

/// The plan's metadata followed by `extra` (provenance keys).
fn full_metadata(
    plan: &GgufPlan,
    extra: &[(String, MetadataValue)],
) -> Vec<(String, MetadataValue)> {
    plan.metadata.iter().chain(extra).cloned().collect()
}

/// Key prefixes of the source's metadata that are not carried into a GGUF output: the policy's
/// own namespaces (`general.*`, ComfyUI-GGUF's `comfy.gguf.*`, `tokenizer.*`, which only the
/// source's SentencePiece model fills: a GGUF source's string keys alone would be a partial
/// tokenizer) and convcache's provenance, which describes this output, not the source's origin.
const NOT_CARRIED_PREFIXES: &[&str] = &["general.", "comfy.gguf.", "tokenizer.", "convcache."];

/// Source metadata keys about the safetensors container rather than the model, not carried:
/// `format` (`"pt"`, the framework `save_file` was called from) says nothing about GGUF tensors.
const CONTAINER_KEYS: &[&str] = &["format"];

/// [`write_gguf`]'s `extra_metadata`, as STRING KVs after the policy's keys and never shadowing
/// one of them: the source's own string metadata (safetensors `__metadata__`, such as LTX-2's
/// `config`, which ComfyUI-GGUF hands back to ComfyUI as the model's metadata under the same
/// key), in key order, then the provenance keys.
fn extra_metadata(
    plan: &GgufPlan,
    source: &BTreeMap<String, String>,
    provenance: &BTreeMap<String, String>,
) -> Vec<(String, MetadataValue)> {
    let in_plan = |k: &str| plan.metadata.iter().any(|(pk, _)| pk == k);
    let carried = source.iter().filter(|(k, _)| {
        !NOT_CARRIED_PREFIXES.iter().any(|p| k.starts_with(p))
            && !CONTAINER_KEYS.contains(&k.as_str())
            && !provenance.contains_key(*k)
    });
    carried
        .chain(provenance)
        .filter(|(k, _)| !in_plan(k))
        .map(|(k, v)| (k.clone(), MetadataValue::String(v.clone())))
        .collect()
}

/// The exact size of the file [`write_gguf`] produces.
pub fn output_len(plan: &GgufPlan, extra: &[(String, MetadataValue)]) -> io::Result<u64> {
    crate::writer::output_len(&full_metadata(plan, extra), &tensor_descs(plan), 32)
}

/// Rounds values through `base` the way convert.py's stored tensor comes back when
/// llama-quantize widens it: F16 and BF16 round to nearest even (numpy's `astype(float16)` and
/// gguf-py's BF16 both do), widening is exact. Other bases leave the values alone.
pub fn round_through(base: GgmlType, values: &mut [f32]) {
    match base {
        GgmlType::F16 => values
            .iter_mut()
            .for_each(|v| *v = f16_bits_to_f32(f32_to_f16_bits(*v))),
        GgmlType::BF16 => values
            .iter_mut()
            .for_each(|v| *v = bf16_bits_to_f32(f32_to_bf16_bits(*v))),
        _ => {}
    }
}

/// Writes `plan` as a GGUF file to `out`, reading values from `source` (the planned tensors'
/// `source_index` are indices in it).
///
/// `progress(i, done)` is called after each chunk is written with the index of the tensor in
/// `plan.tensors` and how many of its elements are written.
pub fn write_gguf<W: Write>(
    plan: &GgufPlan,
    extra_metadata: &[(String, MetadataValue)],
    source: &dyn TensorSource,
    out: W,
    progress: &mut dyn FnMut(usize, u64),
) -> Result<Report, ConvertError> {
    write_gguf_chunked(plan, extra_metadata, source, out, progress, CHUNK_ELEMS)
}

fn write_gguf_chunked<W: Write>(
    plan: &GgufPlan,
    extra_metadata: &[(String, MetadataValue)],
    source: &dyn TensorSource,
    out: W,
    progress: &mut dyn FnMut(usize, u64),
    chunk_budget: u64,
) -> Result<Report, ConvertError> {
    let chunks = chunks(plan, chunk_budget)?;
    let mut writer = GgufWriter::new(
        out,
        full_metadata(plan, extra_metadata),
        &tensor_descs(plan),
        32,
    )?;
    let data_bytes = chunks.iter().map(|c| c.out_len as u64).sum();
    let scratch = ScratchPool::default();
    pipeline::stream(
        chunks,
        &mut ChunkSink(&mut writer),
        &|chunk: &Chunk<'_>, dst: &mut [u8]| convert_chunk(chunk, source, dst, &scratch),
        &mut |chunk| progress(chunk.index, chunk.start + chunk.len),
    )
    .map_err(|e| from_stream(e, ConvertError::Io))?;
    writer.finish()?;
    Ok(Report::of(plan, data_bytes))
}

/// The converter's error of a stream that stopped; `write` wraps an output error.
pub(crate) fn from_stream<E>(e: StreamError<E>, write: impl FnOnce(io::Error) -> E) -> E {
    match e {
        StreamError::Produce(e) => e,
        StreamError::Write(e) => write(e),
        // No cancel flag is given to the stream: a cancelled conversion is the output
        // refusing bytes, which arrives as a write error.
    }
}

/// A [`Write`] that hands each buffer, whole, to a GGUF writer's `write_chunk` (the pipeline
/// writes one piece per call, and a piece never crosses a tensor); a flush reaches the file.
struct ChunkSink<'a, W: Write>(&'a mut GgufWriter<W>);

impl<W: Write> Write for ChunkSink<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_chunk(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Every planned tensor cut into chunks of whole rows, at most `chunk_budget` elements each
/// (at least one row).
fn chunks(plan: &GgufPlan, chunk_budget: u64) -> Result<Vec<Chunk<'_>>, ConvertError> {
    let mut chunks = Vec::new();
    for (index, t) in plan.tensors.iter().enumerate() {
        let size_err = || ConvertError::Size {
            name: t.name.clone(),
        };
        let n = t.n_elements();
        let row = t.shape.last().copied().unwrap_or(1).max(1);
        let chunk_elems = (chunk_budget / row)
            .max(1)
            .checked_mul(row)
            .ok_or_else(size_err)?;
        let mut start = 0u64;
        loop {
            let len = chunk_elems.min(n - start);
            let out_len = t
                .ggml_type
                .bytes_for(len)
                .and_then(|b| usize::try_from(b).ok())
                .ok_or_else(size_err)?;
            chunks.push(Chunk {
                index,
                tensor: t,
                start,
                len,
                row,
                out_len,
            });
            start += len;
            if start >= n {
                break;
            }
        }
    }
    Ok(chunks)
}

/// Rows `start..start + len` (in elements) of one planned tensor.
struct Chunk<'p> {
    /// The tensor's index in the plan.
    index: usize,
    tensor: &'p mix::PlannedTensor,
    start: u64,
    len: u64,
    /// Elements per row.
    row: u64,
    /// Bytes written for it.
    out_len: usize,
}

impl Piece for Chunk<'_> {
    fn out_len(&self) -> usize {
        self.out_len
    }
}

/// Values one task reads, rounds and quantizes while they stay in the core's cache, rounded
/// down to whole rows (at least one).
const TASK_ELEMS: u64 = 1 << 15;

/// Reusable f32 buffers for the tasks of [`convert_chunk`]: taken by a task, returned when it
/// ends, so a conversion allocates a few of them, not one per task.
#[derive(Default)]
struct ScratchPool(Mutex<Vec<Vec<f32>>>);

impl ScratchPool {
    fn take(&self) -> Vec<f32> {
        self.0
            .lock()
            .map(|mut pool| pool.pop().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Keeps `buf` for the next task, unless a huge row made it much larger than a task's
    /// values (its memory is then given back now, not at the end of the conversion).
    fn give_back(&self, buf: Vec<f32>) {
        if buf.capacity() > 4 * TASK_ELEMS as usize {
            return;
        }
        if let Ok(mut pool) = self.0.lock() {
            pool.push(buf);
        }
    }
}

/// Reads, rounds (see [`round_through`]) and quantizes `chunk` into `dst` (exactly its output
/// bytes), in tasks of whole rows spread over the thread pool. Each row's bytes depend only on
/// its values, so the split never changes the output.
fn convert_chunk(
    chunk: &Chunk<'_>,
    source: &dyn TensorSource,
    dst: &mut [u8],
    scratch: &ScratchPool,
) -> Result<(), ConvertError> {
    let t = chunk.tensor;
    let size_err = || ConvertError::Size {
        name: t.name.clone(),
    };
    let task_elems = (TASK_ELEMS / chunk.row).max(1) * chunk.row;
    let task_bytes = t
        .ggml_type
        .bytes_for(task_elems)
        .and_then(|b| usize::try_from(b).ok())
        .filter(|&b| b > 0)
        .ok_or_else(size_err)?;
    dst.par_chunks_mut(task_bytes)
        .enumerate()
        .try_for_each(|(i, dst)| {
            let start = i as u64 * task_elems;
            let len = task_elems.min(chunk.len - start) as usize;
            let mut values = scratch.take();
            values.resize(len, 0.0);
            let result = source
                .read_f32(t.source_index, chunk.start + start, &mut values)
                .map_err(|source| ConvertError::Source {
                    name: t.name.clone(),
                    source,
                })
                .and_then(|()| {
                    round_through(t.base_type, &mut values);
                    quant::quantize(t.ggml_type, &values, dst).map_err(|source| {
                        ConvertError::Quant {
                            name: t.name.clone(),
                            source,
                        }
                    })
                });
            scratch.give_back(values);
            result
        })
}

/// Why a source cannot be converted to GGUF, found while planning.
#[derive(Debug, thiserror::Error)]
pub enum ConversionPlanError {
    /// The policy refuses the source's tensors.
    #[error(transparent)]
    Plan(#[from] SourcePlanError),
    /// The output's header cannot be laid out.
    #[error("{}: {source}", path.display())]
    Layout {
        /// The source file.
        path: PathBuf,
        /// What the writer refused.
        source: io::Error,
    },
    /// A text encoder's tokenizer tensor could not be read.
    #[error("{}: reading spiece_model: {source}", path.display())]
    Tokenizer {
        /// The source file.
        path: PathBuf,
        /// The read error.
        source: SourceError,
    },
}

impl ConversionPlanError {
    /// Whether the input is at fault: planning reads only the source's header (a header the
    /// writer cannot lay out holds names or shapes it cannot encode), and a text encoder's
    /// small tokenizer tensor, whose read error says.
    pub fn is_input_fault(&self) -> bool {
        match self {
            ConversionPlanError::Tokenizer { source, .. } => source.is_input_fault(),
            _ => true,
        }
    }
}

/// A T5 encoder's tokenizer as `tokenizer.ggml.*` key-values after the policy's keys, read
/// from the source's `spiece_model` tensor (Comfy-Org's files carry the SentencePiece model
/// there). ComfyUI-GGUF rebuilds umt5-xxl's tokenizer from these keys (for a token embedding
/// of 256384 x 4096) and fails to load the file without them, so a source without a readable
/// one gets a warning.
fn tokenizer_into_plan(
    source: &dyn TensorSource,
    plan: &mut GgufPlan,
    warnings: &mut Vec<String>,
) -> Result<(), ConversionPlanError> {
    use crate::text_encoder::{MAX_SPIECE_MODEL_BYTES, parse_sentencepiece, tokenizer_metadata};
    let found = source.tensors().iter().enumerate().find(|(_, t)| {
        detect::arch::strip_prefix(&t.name) == "spiece_model"
            && matches!(t.dtype, Dtype::U8 | Dtype::I8)
            && t.source_bytes <= MAX_SPIECE_MODEL_BYTES
    });
    let Some((index, t)) = found else {
        if plan.arch == Arch::Umt5xxl {
            warnings.push(
                "no spiece_model tensor (SentencePiece tokenizer) in the source: ComfyUI-GGUF \
                 cannot rebuild umt5-xxl's tokenizer from this GGUF"
                    .into(),
            );
        }
        return Ok(());
    };
    // Bounded above; the tensor's byte length was checked against the file with its header.
    let mut bytes = vec![0u8; t.source_bytes as usize];
    source
        .read_raw(index, 0, &mut bytes)
        .map_err(|e| ConversionPlanError::Tokenizer {
            path: source.path().to_owned(),
            source: e,
        })?;
    match parse_sentencepiece(&bytes) {
        Ok(sp) => {
            // llama.cpp needs one token per embedding row (the list is padded to it).
            let n_vocab = plan
                .tensors
                .iter()
                .find(|t| t.name == "token_embd.weight")
                .and_then(|t| t.shape.first())
                .and_then(|&rows| usize::try_from(rows).ok())
                .unwrap_or(0);
            plan.metadata.extend(tokenizer_metadata(&sp, n_vocab));
        }
        Err(e) => warnings.push(format!("{e}; the GGUF carries no tokenizer")),
    }
    Ok(())
}

/// A source, its GGUF plan and the provenance keys: everything [`GgufConversion::write`]
/// needs, decided before anything is written.
#[derive(Debug)]
pub struct GgufConversion {
    source: Box<dyn TensorSource>,
    plan: GgufPlan,
    extra: Vec<(String, MetadataValue)>,
    output_len: u64,
    /// Warnings about the source, ahead of the plan's in the report.
    warnings: Vec<String>,
}

impl GgufConversion {
    /// Plans converting `source` to `target` ([`mix::plan_source`]), with the source's string
    /// metadata and then `provenance` written as STRING KVs after the policy's keys.
    pub fn plan(
        source: Box<dyn TensorSource>,
        forced_arch: Option<Arch>,
        target: FileType,
        provenance: &BTreeMap<String, String>,
    ) -> Result<GgufConversion, ConversionPlanError> {
        let mut plan = mix::plan_source(source.as_ref(), forced_arch, target)?;
        let mut warnings = Vec::new();
        if plan.arch.gguf_naming() == GgufNaming::LlamaCppT5 {
            tokenizer_into_plan(source.as_ref(), &mut plan, &mut warnings)?;
        }
        let extra = extra_metadata(&plan, source.metadata(), provenance);
        let output_len = output_len(&plan, &extra).map_err(|e| ConversionPlanError::Layout {
            path: source.path().to_owned(),
            source: e,
        })?;
        Ok(GgufConversion {
            source,
            plan,
            extra,
            output_len,
            warnings,
        })
    }

    /// Plans requantizing a GGUF file: as [`GgufConversion::plan`], with the architecture the
    /// file declares unless one is forced, and a warning that quality is lost (`from` names
    /// the source's type, e.g. `Q8_0`).
    pub fn requantize(
        source: GgufSource,
        forced_arch: Option<Arch>,
        target: FileType,
        provenance: &BTreeMap<String, String>,
        from: &str,
    ) -> Result<GgufConversion, ConversionPlanError> {
        let arch = forced_arch.or(source.declared_arch());
        let mut planned = GgufConversion::plan(Box::new(source), arch, target, provenance)?;
        planned.warnings.push(format!(
            "requantizing {from} to {target} loses quality: the values come from the source's \
             quantized blocks, not the original weights"
        ));
        Ok(planned)
    }

    /// The plan.
    pub fn gguf_plan(&self) -> &GgufPlan {
        &self.plan
    }

    /// The exact size of the output.
    pub fn output_len(&self) -> u64 {
        self.output_len
    }

    /// Warnings about the source found while planning (they lead the report's warnings).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Source bytes read for the planned tensors (the total of [`GgufConversion::write`]'s
    /// progress).
    pub fn source_bytes(&self) -> u64 {
        let tensors = self.source.tensors();
        self.plan
            .tensors
            .iter()
            .filter_map(|t| tensors.get(t.source_index))
            .map(|t| t.source_bytes)
            .sum()
    }

    /// Writes the GGUF file to `out`, calling `progress(source bytes read, tensors done)`.
    /// Fails before writing anything if the source changed since it was opened.
    pub fn write(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Report, ConvertError> {
        self.source
            .check_unchanged()
            .map_err(ConvertError::SourceChanged)?;
        let tensors = self.source.tensors();
        let source_bytes = |i: usize| {
            tensors
                .get(self.plan.tensors[i].source_index)
                .map_or(0, |t| t.source_bytes)
        };
        let mut bytes_before = Vec::with_capacity(self.plan.tensors.len());
        let mut total = 0u64;
        for i in 0..self.plan.tensors.len() {
            bytes_before.push(total);
            total += source_bytes(i);
        }
        let mut report = write_gguf(
            &self.plan,
            &self.extra,
            self.source.as_ref(),
            out,
            &mut |i, done| {
                let n = self.plan.tensors[i].n_elements();
                progress(
                    bytes_before[i] + share(source_bytes(i), done, n),
                    i as u64 + u64::from(done == n),
                );
            },
        )?;
        report.warnings.splice(0..0, self.warnings.iter().cloned());
        Ok(report)
    }
}

/// `bytes * done / n` without overflow (0 for an empty tensor).
pub(crate) fn share(bytes: u64, done: u64, n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    (u128::from(bytes) * u128::from(done) / u128::from(n)) as u64
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

    use tensorfile::Dtype;
    use tensorfile::source::{SourceTensor, Stored};

    use super::*;
    use crate::mix::{InputTensor, SourceDtype};
    use crate::reader::GgufFile;
    use crate::source::{GgufSource, GgufSourceError, ORIG_SHAPE_PREFIX};

    /// Deterministic weights with occasional outliers (a cheap LCG, no extra dependency).
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                if i % 97 == 0 { u * 0.7 } else { u * 0.04 }
            })
            .collect()
    }

    /// f32 values by name, served in the order of `tensors`.
    #[derive(Debug)]
    struct MemSource {
        tensors: Vec<SourceTensor>,
        values: HashMap<String, Vec<f32>>,
        metadata: BTreeMap<String, String>,
    }

    impl MemSource {
        fn new(shapes: &[(&str, &[u64])], values: HashMap<String, Vec<f32>>) -> MemSource {
            let tensors = shapes
                .iter()
                .map(|&(name, shape)| SourceTensor {
                    name: name.to_owned(),
                    shape: shape.to_vec(),
                    dtype: Dtype::F32,
                    stored: Stored::Safetensors(Dtype::F32),
                    source_bytes: 0,
                })
                .collect();
            MemSource {
                tensors,
                values,
                metadata: BTreeMap::new(),
            }
        }
    }

    impl TensorSource for MemSource {
        fn path(&self) -> &Path {
            Path::new("mem")
        }

        fn tensors(&self) -> &[SourceTensor] {
            &self.tensors
        }

        fn metadata(&self) -> &BTreeMap<String, String> {
            &self.metadata
        }

        fn read_raw(&self, index: usize, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
            let mut v = vec![0f32; buf.len() / 4];
            self.read_f32(index, offset / 4, &mut v)?;
            for (dst, v) in buf.chunks_exact_mut(4).zip(&v) {
                dst.copy_from_slice(&v.to_le_bytes());
            }
            Ok(())
        }

        fn read_f32(&self, index: usize, start: u64, out: &mut [f32]) -> Result<(), SourceError> {
            let name = &self.tensors[index].name;
            let v = self
                .values
                .get(name)
                .ok_or_else(|| SourceError::invalid(self.path(), name, "no values"))?;
            let s = start as usize;
            out.copy_from_slice(&v[s..s + out.len()]);
            Ok(())
        }
    }

    const SHAPES: &[(&str, &[u64])] = &[
        ("double_blocks.0.img_attn.proj.weight", &[64, 512]),
        ("double_blocks.0.img_attn.qkv.weight", &[96, 256]),
        ("double_blocks.0.img_attn.qkv.bias", &[96]),
        ("double_blocks.0.img_mlp.2.weight", &[32, 320]),
        // Several tasks of whole rows per chunk (see `TASK_ELEMS`), the last one short.
        ("double_blocks.0.img_mlp.0.weight", &[600, 256]),
        // Rows that do not divide the task size (10 rows of 3072 per task, then 5).
        ("double_blocks.0.txt_mlp.0.weight", &[45, 3072]),
        ("img_in.weight", &[64, 64]),
        ("single_blocks.0.linear2.weight", &[16, 100]),
    ];

    fn model(dtype: SourceDtype) -> (Vec<InputTensor<'static>>, MemSource) {
        let tensors = SHAPES
            .iter()
            .map(|&(name, shape)| InputTensor { name, shape, dtype })
            .collect();
        let data = SHAPES
            .iter()
            .enumerate()
            .map(|(i, &(name, shape))| {
                (
                    name.to_owned(),
                    values(i as u64, shape.iter().product::<u64>() as usize),
                )
            })
            .collect();
        (tensors, MemSource::new(SHAPES, data))
    }

    fn write(plan: &GgufPlan, src: &MemSource, chunk: u64) -> Vec<u8> {
        let extra = [(
            "convcache.source".to_owned(),
            MetadataValue::from("x.safetensors"),
        )];
        let mut out = Vec::new();
        let mut calls = 0;
        write_gguf_chunked(plan, &extra, src, &mut out, &mut |_, _| calls += 1, chunk).unwrap();
        assert!(calls >= plan.tensors.len());
        assert_eq!(output_len(plan, &extra).unwrap(), out.len() as u64);
        out
    }

    #[test]
    fn every_tensor_is_its_source_rounded_through_the_base_then_quantized() {
        for target in [
            FileType::Q4KM,
            FileType::Q8_0,
            FileType::Q4_0,
            FileType::MostlyBF16,
        ] {
            for dtype in [SourceDtype::F32, SourceDtype::BF16] {
                let (tensors, src) = model(dtype);
                let plan = mix::plan(&tensors, Some(Arch::Flux), target).unwrap();
                // A chunk budget below one row, one row, several rows, and several tasks:
                // same bytes.
                let bytes = write(&plan, &src, 1 << 22);
                assert_eq!(bytes, write(&plan, &src, 50), "{target}");
                assert_eq!(bytes, write(&plan, &src, 700), "{target}");
                assert_eq!(bytes, write(&plan, &src, 100_000), "{target}");
                let file = GgufFile::from_bytes(bytes, Path::new("mem.gguf")).unwrap();
                assert_eq!(file.architecture(), Some("flux"));
                assert_eq!(
                    file.get("general.file_type").and_then(|v| v.as_u32()),
                    Some(target.id())
                );
                assert_eq!(
                    file.get("convcache.source").and_then(|v| v.as_str()),
                    Some("x.safetensors")
                );
                assert_eq!(file.tensors.len(), plan.tensors.len());
                for (info, p) in file.tensors.iter().zip(&plan.tensors) {
                    assert_eq!((&info.name, info.ggml_type), (&p.name, p.ggml_type));
                    assert_eq!(info.torch_shape(), p.shape);
                    let mut v = src.values[&p.source_name].clone();
                    round_through(p.base_type, &mut v);
                    let expected = quant::quantize_to_vec(p.ggml_type, &v).unwrap();
                    assert_eq!(file.tensor_data(info), &expected[..], "{}", p.name);
                }
            }
        }
    }

    #[test]
    fn an_f32_source_is_quantized_from_its_f16_rounding() {
        let (tensors, src) = model(SourceDtype::F32);
        let plan = mix::plan(&tensors, Some(Arch::Flux), FileType::Q8_0).unwrap();
        let file = GgufFile::from_bytes(write(&plan, &src, 1 << 20), Path::new("m")).unwrap();
        let info = file.tensor("double_blocks.0.img_attn.proj.weight").unwrap();
        let raw = &src.values["double_blocks.0.img_attn.proj.weight"];
        let unrounded = quant::quantize_to_vec(GgmlType::Q8_0, raw).unwrap();
        assert_ne!(file.tensor_data(info), &unrounded[..]);
        // The 1-D bias stays F32 and exact.
        let bias = file.tensor("double_blocks.0.img_attn.qkv.bias").unwrap();
        assert_eq!(bias.ggml_type, GgmlType::F32);
        let exact: Vec<u8> = src.values["double_blocks.0.img_attn.qkv.bias"]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(file.tensor_data(bias), &exact[..]);
    }

    #[test]
    fn a_source_error_names_the_tensor() {
        let (tensors, mut src) = model(SourceDtype::F16);
        src.values.remove("img_in.weight");
        let plan = mix::plan(&tensors, Some(Arch::Flux), FileType::Q8_0).unwrap();
        let err = write_gguf(&plan, &[], &src, Vec::new(), &mut |_, _| {}).unwrap_err();
        assert!(matches!(&err, ConvertError::Source { name, .. } if name == "img_in.weight"));
    }

    fn write_file(dir: &Path, target: FileType) -> (PathBuf, GgufPlan, MemSource) {
        let (tensors, src) = model(SourceDtype::F32);
        let plan = mix::plan(&tensors, Some(Arch::Flux), target).unwrap();
        let path = dir.join(format!("{target}.gguf"));
        std::fs::write(&path, write(&plan, &src, 1 << 20)).unwrap();
        (path, plan, src)
    }

    #[test]
    fn gguf_source_reads_any_element_range_as_ggml_dequantizes_it() {
        let dir = tempfile::tempdir().unwrap();
        let (path, plan, _) = write_file(dir.path(), FileType::Q4KM);
        let source = GgufSource::open(&path).unwrap();
        for p in &plan.tensors {
            let index = source.index_of(&p.name).unwrap();
            let info = source.file().tensor(&p.name).unwrap();
            let whole =
                quant::dequantize_to_vec(info.ggml_type, source.file().tensor_data(info)).unwrap();
            let n = whole.len() as u64;
            for (start, len) in [
                (0, n),
                (1, n - 1),
                (37, 300.min(n - 37)),
                (n - 5, 5),
                (n, 0),
            ] {
                let mut out = vec![0f32; len as usize];
                source.read_f32(index, start, &mut out).unwrap();
                let s = start as usize;
                assert_eq!(
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    whole[s..s + len as usize]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>()
                );
            }
            let mut over = vec![0f32; 2];
            assert!(matches!(
                source.read_f32(index, n - 1, &mut over),
                Err(SourceError::Invalid { .. })
            ));
        }
        assert!(matches!(
            source.read_f32(plan.tensors.len(), 0, &mut []),
            Err(SourceError::Invalid { .. })
        ));
    }

    /// What the GGUF backend plans for a GGUF source: the declared architecture, else the
    /// detected one.
    fn requant_plan(source: &GgufSource, target: FileType) -> GgufPlan {
        mix::plan_source(source, source.declared_arch(), target).unwrap()
    }

    #[test]
    fn a_gguf_file_requantizes_with_the_same_policy() {
        let dir = tempfile::tempdir().unwrap();
        let (path, q8_plan, _) = write_file(dir.path(), FileType::Q8_0);
        let source = GgufSource::open(&path).unwrap();
        assert_eq!(source.declared_arch(), Some(Arch::Flux));
        let plan = requant_plan(&source, FileType::Q4KM);
        let fresh: Vec<_> = {
            let (tensors, _) = model(SourceDtype::F32);
            mix::plan(&tensors, Some(Arch::Flux), FileType::Q4KM)
                .unwrap()
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.ggml_type))
                .collect()
        };
        let requant: Vec<_> = plan
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.ggml_type))
            .collect();
        assert_eq!(requant, fresh);
        let mut out = Vec::new();
        write_gguf(&plan, &[], &source, &mut out, &mut |_, _| {}).unwrap();
        let file = GgufFile::from_bytes(out, Path::new("re.gguf")).unwrap();
        assert_eq!(file.tensors.len(), q8_plan.tensors.len());
    }

    #[test]
    fn an_sd_cpp_style_file_without_architecture_and_with_prefix_requantizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sdcpp.gguf");
        let names = [
            "model.diffusion_model.double_blocks.0.img_attn.proj.weight",
            "model.diffusion_model.img_in.weight",
        ];
        let descs: Vec<TensorDesc> = names
            .iter()
            .map(|n| TensorDesc::from_torch_shape(*n, &[64, 64], GgmlType::F16))
            .collect();
        let mut out = Vec::new();
        let mut w = GgufWriter::new(&mut out, Vec::new(), &descs, 32).unwrap();
        for _ in &names {
            let v: Vec<u8> = values(1, 64 * 64)
                .iter()
                .flat_map(|x| f32_to_f16_bits(*x).to_le_bytes())
                .collect();
            w.write_chunk(&v).unwrap();
        }
        w.finish().unwrap();
        std::fs::write(&path, out).unwrap();
        let source = GgufSource::open(&path).unwrap();
        assert_eq!(source.declared_arch(), None);
        let plan = requant_plan(&source, FileType::Q8_0);
        assert_eq!(plan.arch, Arch::Flux);
        let got: Vec<_> = plan
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.source_name.as_str(), t.ggml_type))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "double_blocks.0.img_attn.proj.weight",
                    names[0],
                    GgmlType::Q8_0
                ),
                ("img_in.weight", names[1], GgmlType::F16),
            ]
        );
        let mut file = Vec::new();
        write_gguf(&plan, &[], &source, &mut file, &mut |_, _| {}).unwrap();
        let file = GgufFile::from_bytes(file, Path::new("re.gguf")).unwrap();
        assert_eq!(file.architecture(), Some("flux"));
    }

    #[test]
    fn orig_shape_gives_the_logical_shape_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sd: &[(&str, &[u64])] = &[
            ("input_blocks.3.0.op.weight", &[32, 32, 3, 3]),
            ("input_blocks.6.0.op.weight", &[32, 32, 3, 3]),
            ("input_blocks.9.0.op.weight", &[32, 32, 3, 3]),
            ("output_blocks.2.1.conv.weight", &[32, 32, 3, 3]),
            ("output_blocks.5.2.conv.weight", &[32, 32, 3, 3]),
            ("output_blocks.8.2.conv.weight", &[32, 32, 3, 3]),
        ];
        let tensors: Vec<_> = sd
            .iter()
            .map(|&(name, shape)| InputTensor {
                name,
                shape,
                dtype: SourceDtype::F32,
            })
            .collect();
        let src = MemSource::new(
            sd,
            sd.iter()
                .map(|&(n, _)| (n.to_owned(), values(3, 9216)))
                .collect(),
        );
        let plan = mix::plan(&tensors, None, FileType::Q4_0).unwrap();
        assert_eq!(plan.tensors[0].shape, vec![36, 256]);
        let path = dir.path().join("sd1.gguf");
        std::fs::write(&path, write(&plan, &src, 1 << 20)).unwrap();
        let source = GgufSource::open(&path).unwrap();
        assert!(source.tensors().iter().all(|t| t.shape == [32, 32, 3, 3]));
        // Requantizing flattens again the same way.
        let again = requant_plan(&source, FileType::Q8_0);
        assert_eq!(again.arch, Arch::Sd1);
        assert_eq!(again.tensors[0].orig_shape, Some(vec![32, 32, 3, 3]));

        // An orig_shape of the wrong type or size is an error naming the tensor.
        let mut bad = plan.clone();
        let key = format!("{ORIG_SHAPE_PREFIX}input_blocks.3.0.op.weight");
        for (k, v) in bad.metadata.iter_mut() {
            if *k == key {
                *v = MetadataValue::Array(vec![MetadataValue::I32(3); 4]);
            }
        }
        let path = dir.path().join("bad.gguf");
        std::fs::write(&path, write(&bad, &src, 1 << 20)).unwrap();
        let err = GgufSource::open(&path).unwrap_err();
        assert!(
            matches!(&err, GgufSourceError::BadOrigShape { name, .. } if name == "input_blocks.3.0.op.weight"),
            "{err}"
        );
    }

    #[test]
    fn source_string_metadata_is_carried_as_kvs_and_provenance_wins() {
        let (_, mut src) = model(SourceDtype::F32);
        for (k, v) in [
            ("config", "{\"transformer\": {\"num_layers\": 48}}"),
            ("modelspec.title", "x"),
            ("format", "pt"),
            ("general.architecture", "sd1"),
            ("general.name", "not ours to set"),
            ("comfy.gguf.orig_shape.img_in.weight", "[1]"),
            ("convcache.target", "fp16"),
            ("convcache.old_key", "from the source's own conversion"),
        ] {
            src.metadata.insert(k.to_owned(), v.to_owned());
        }
        let provenance: BTreeMap<String, String> =
            [("convcache.target".to_owned(), "Q8_0".to_owned())].into();
        let conv =
            GgufConversion::plan(Box::new(src), Some(Arch::Flux), FileType::Q8_0, &provenance)
                .unwrap();
        let mut out = Vec::new();
        conv.write(&mut out, &mut |_, _| {}).unwrap();
        assert_eq!(conv.output_len(), out.len() as u64);
        let file = GgufFile::from_bytes(out, Path::new("mem.gguf")).unwrap();
        let keys: Vec<&str> = file.metadata.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "general.architecture",
                "general.quantization_version",
                "general.file_type",
                "config",
                "modelspec.title",
                "convcache.target",
            ]
        );
        let string = |k: &str| file.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        assert_eq!(
            string("config").as_deref(),
            Some("{\"transformer\": {\"num_layers\": 48}}")
        );
        assert_eq!(string("general.architecture").as_deref(), Some("flux"));
        assert_eq!(string("convcache.target").as_deref(), Some("Q8_0"));
    }
}
