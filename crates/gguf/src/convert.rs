//! Streams a planned conversion into a GGUF file.
//!
//! The caller supplies the source values through [`TensorSource`] (so this crate needs no
//! safetensors reader); each tensor is read in row chunks, rounded through its base type (the
//! values ComfyUI-GGUF's quantizer would start from), quantized in parallel and written before the
//! next chunk is read. Memory is bounded by the chunk budget, never by the model.
//!
//! [`GgufSource`] makes a GGUF file a [`TensorSource`] (its tensors dequantized block range by
//! block range, with positioned reads, so neither the file nor its page mappings stay in memory):
//! that is how a GGUF file is requantized ([`GgufSource::plan`]) or dequantized by a caller
//! that writes another container.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::mix::{self, GgufPlan, PlanError, SourceDtype, SourceTensor};
use crate::quant::{
    self, QuantError, bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits,
};
use crate::reader::{GgufError, GgufFile, MetadataValue, TensorInfo};
use crate::types::{FileType, GgmlType};
use crate::writer::{GgufWriter, TensorDesc};
use detect::arch::Arch;

/// Elements per chunk: 4M f32 values (16 MiB), rounded down to whole rows.
const CHUNK_ELEMS: u64 = 4 << 20;

/// Where the values of a source tensor come from.
pub trait TensorSource: Sync {
    /// The source's own error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Fills `out` with elements `start..start + out.len()` of tensor `source_name`, widened
    /// exactly to f32 (row-major, torch order).
    fn read_f32(&self, source_name: &str, start: u64, out: &mut [f32]) -> Result<(), Self::Error>;
}

/// Why writing failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError<E: std::error::Error + 'static> {
    #[error("reading tensor `{name}`: {source}")]
    Source { name: String, source: E },
    #[error("quantizing tensor `{name}`: {source}")]
    Quant { name: String, source: QuantError },
    #[error("tensor `{name}`: size overflows")]
    Size { name: String },
    #[error("writing the GGUF file: {0}")]
    Io(#[from] io::Error),
}

/// What was written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Tensors written.
    pub tensors: u64,
    /// Tensors stored in a block-quantized type.
    pub quantized: u64,
    /// Values read from the source.
    pub elements: u64,
    /// Bytes of tensor data written (padding excluded).
    pub data_bytes: u64,
}

/// The tensor descriptors for the writer.
pub fn tensor_descs(plan: &GgufPlan) -> Vec<TensorDesc> {
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
pub fn full_metadata(
    plan: &GgufPlan,
    extra: &[(String, MetadataValue)],
) -> Vec<(String, MetadataValue)> {
    plan.metadata.iter().chain(extra).cloned().collect()
}

/// The exact size of the file [`write_gguf`] produces.
pub fn output_len(plan: &GgufPlan, extra: &[(String, MetadataValue)]) -> io::Result<u64> {
    crate::writer::output_len(&full_metadata(plan, extra), &tensor_descs(plan), 32)
}

/// Rounds values through `base` the way convert.py's stored tensor comes back when
/// llama-quantize widens it: F16 and BF16 round to nearest even (numpy's `astype(float16)` and
/// gguf-py's BF16 both do), widening is exact. Other bases leave the values alone.
pub fn round_through(base: GgmlType, values: &mut [f32]) {
    values
        .par_chunks_mut(1 << 14)
        .for_each(|c| round_through_serial(base, c));
}

/// [`round_through`] on the calling thread.
fn round_through_serial(base: GgmlType, values: &mut [f32]) {
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

/// Writes `plan` as a GGUF file to `out`, reading values from `source`.
///
/// `progress(i, done)` is called after each chunk with the index of the tensor in
/// `plan.tensors` and how many of its elements are written.
pub fn write_gguf<W: Write, S: TensorSource>(
    plan: &GgufPlan,
    extra_metadata: &[(String, MetadataValue)],
    source: &S,
    out: W,
    progress: &mut dyn FnMut(usize, u64),
) -> Result<Report, ConvertError<S::Error>> {
    write_gguf_chunked(plan, extra_metadata, source, out, progress, CHUNK_ELEMS)
}

fn write_gguf_chunked<W: Write, S: TensorSource>(
    plan: &GgufPlan,
    extra_metadata: &[(String, MetadataValue)],
    source: &S,
    out: W,
    progress: &mut dyn FnMut(usize, u64),
    chunk_budget: u64,
) -> Result<Report, ConvertError<S::Error>> {
    let mut writer = GgufWriter::new(
        out,
        full_metadata(plan, extra_metadata),
        &tensor_descs(plan),
        32,
    )?;
    let mut report = Report::default();
    // `front` holds a converted chunk being written while the next one is converted into
    // `back` on the thread pool.
    let mut front: Vec<u8> = Vec::new();
    let mut back: Vec<u8> = Vec::new();
    let mut pending: Option<Pending> = None;
    let scratch = ScratchPool::default();
    let size_err = |t: &mix::PlannedTensor| ConvertError::Size {
        name: t.name.clone(),
    };
    let mut finish = |p: Pending, report: &mut Report| {
        report.data_bytes += p.bytes as u64;
        report.elements += p.elements;
        progress(p.tensor, p.done);
        if p.last_of_tensor {
            report.tensors += 1;
            if plan.tensors[p.tensor].ggml_type.is_quantized() {
                report.quantized += 1;
            }
        }
    };
    for (index, t) in plan.tensors.iter().enumerate() {
        let n = t.n_elements();
        let row = t.shape.last().copied().unwrap_or(1).max(1);
        let rows_per_chunk = (chunk_budget / row).max(1);
        let chunk_elems = rows_per_chunk.checked_mul(row).ok_or_else(|| size_err(t))?;
        if n == 0 {
            // Nothing to write; the tensor still counts, in order.
            if let Some(p) = pending.take() {
                writer.write_chunk(&front[..p.bytes])?;
                finish(p, &mut report);
            }
            finish(
                Pending {
                    tensor: index,
                    done: 0,
                    elements: 0,
                    bytes: 0,
                    last_of_tensor: true,
                },
                &mut report,
            );
            continue;
        }
        let mut start = 0u64;
        while start < n {
            let len = chunk_elems.min(n - start);
            let out_len = t
                .ggml_type
                .bytes_for(len)
                .and_then(|b| usize::try_from(b).ok())
                .ok_or_else(|| size_err(t))?;
            if back.len() < out_len {
                back.resize(out_len, 0);
            }
            let mut converted = Ok(());
            let mut written = Ok(());
            let chunk = Chunk {
                tensor: t,
                start,
                len,
                row,
            };
            let (dst, scratch) = (&mut back[..out_len], &scratch);
            rayon::in_place_scope(|s| {
                s.spawn(|_| converted = convert_chunk(&chunk, source, dst, scratch));
                if let Some(p) = &pending {
                    written = writer.write_chunk(&front[..p.bytes]);
                }
            });
            written?;
            if let Some(p) = pending.take() {
                finish(p, &mut report);
            }
            converted?;
            std::mem::swap(&mut front, &mut back);
            start += len;
            pending = Some(Pending {
                tensor: index,
                done: start,
                elements: len,
                bytes: out_len,
                last_of_tensor: start == n,
            });
        }
        // A huge tensor should not keep its buffers for the rest of the file.
        let keep = (chunk_budget as usize).saturating_mul(8);
        if back.capacity() > keep {
            back = Vec::new();
        }
    }
    if let Some(p) = pending.take() {
        writer.write_chunk(&front[..p.bytes])?;
        finish(p, &mut report);
    }
    writer.finish()?;
    Ok(report)
}

/// A converted chunk waiting to be written.
struct Pending {
    tensor: usize,
    /// Elements of the tensor done once this chunk is written.
    done: u64,
    elements: u64,
    bytes: usize,
    last_of_tensor: bool,
}

/// Rows `start..start + len` (in elements) of one planned tensor.
struct Chunk<'p> {
    tensor: &'p mix::PlannedTensor,
    start: u64,
    len: u64,
    /// Elements per row.
    row: u64,
}

/// Values one task reads, rounds and quantizes while they stay in the core's cache, rounded
/// down to whole rows (at least one).
const TASK_ELEMS: u64 = 1 << 15;

/// Reusable f32 buffers for the tasks of [`convert_chunk`]: taken by a task, returned when it
/// ends, so a conversion allocates a few of them, not one per task.
#[derive(Default)]
struct ScratchPool(std::sync::Mutex<Vec<Vec<f32>>>);

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
fn convert_chunk<S: TensorSource>(
    chunk: &Chunk<'_>,
    source: &S,
    dst: &mut [u8],
    scratch: &ScratchPool,
) -> Result<(), ConvertError<S::Error>> {
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
                .read_f32(&t.source_name, chunk.start + start, &mut values)
                .map_err(|source| ConvertError::Source {
                    name: t.name.clone(),
                    source,
                })
                .and_then(|()| {
                    round_through_serial(t.base_type, &mut values);
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

/// Why a GGUF file cannot serve as a conversion source.
#[derive(Debug, thiserror::Error)]
pub enum GgufSourceError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: reading tensor data: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: no tensor `{name}`")]
    UnknownTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}`: elements {start}..{end} are outside the tensor")]
    Range {
        path: PathBuf,
        name: String,
        start: u64,
        end: u64,
    },
    #[error("{path}: tensor `{name}`: {problem}")]
    BadOrigShape {
        path: PathBuf,
        name: String,
        problem: String,
    },
    #[error("{path}: dequantizing tensor `{name}`: {source}")]
    Quant {
        path: PathBuf,
        name: String,
        source: QuantError,
    },
    #[error("{path}: {source}")]
    Plan { path: PathBuf, source: PlanError },
}

/// The metadata key ComfyUI-GGUF reads a flattened tensor's torch shape from.
pub const ORIG_SHAPE_PREFIX: &str = "comfy.gguf.orig_shape.";

/// One tensor of a GGUF source as a model sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalTensor {
    /// The tensor's name in the file (ComfyUI's key).
    pub name: String,
    /// Torch shape: `comfy.gguf.orig_shape.<name>` when present, else the dims reversed.
    pub shape: Vec<u64>,
    /// How it is stored.
    pub ggml_type: GgmlType,
}

/// A GGUF file whose tensors are read as f32 (dequantized as ggml does), by element range.
///
/// The header comes from [`GgufFile::open`] (validated); the data is read with positioned
/// reads of just the blocks a range needs, so memory stays bounded by the caller's chunk.
#[derive(Debug)]
pub struct GgufSource {
    file: GgufFile,
    raw: File,
    index: HashMap<String, usize>,
}

impl GgufSource {
    /// Opens and validates `path`.
    pub fn open(path: &Path) -> Result<GgufSource, GgufSourceError> {
        let file = GgufFile::open(path)?;
        let raw = File::open(path).map_err(|source| GgufSourceError::Io {
            path: path.to_owned(),
            source,
        })?;
        let index = file
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufSource { file, raw, index })
    }

    /// The validated header.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    fn info(&self, name: &str) -> Result<&TensorInfo, GgufSourceError> {
        self.index
            .get(name)
            .map(|&i| &self.file.tensors[i])
            .ok_or_else(|| GgufSourceError::UnknownTensor {
                path: self.file.path.clone(),
                name: name.to_owned(),
            })
    }

    /// The tensors in file order, with their torch shapes (orig_shape applied).
    pub fn logical_tensors(&self) -> Result<Vec<LogicalTensor>, GgufSourceError> {
        self.file
            .tensors
            .iter()
            .map(|t| {
                Ok(LogicalTensor {
                    name: t.name.clone(),
                    shape: self.logical_shape(t)?,
                    ggml_type: t.ggml_type,
                })
            })
            .collect()
    }

    /// The torch shape of `t`: its `comfy.gguf.orig_shape` (checked: INT32 array, positive
    /// dims, same element count), else its dims reversed.
    pub fn logical_shape(&self, t: &TensorInfo) -> Result<Vec<u64>, GgufSourceError> {
        let key = format!("{ORIG_SHAPE_PREFIX}{}", t.name);
        let Some(value) = self.file.get(&key) else {
            return Ok(t.torch_shape());
        };
        let bad = |problem: &str| GgufSourceError::BadOrigShape {
            path: self.file.path.clone(),
            name: t.name.clone(),
            problem: problem.to_owned(),
        };
        let items = value
            .as_array()
            .ok_or_else(|| bad("orig_shape is not an array"))?;
        let mut shape = Vec::with_capacity(items.len().min(8));
        for item in items {
            match item {
                MetadataValue::I32(d) if *d > 0 => shape.push(*d as u64),
                MetadataValue::I32(_) => return Err(bad("orig_shape has a dim below 1")),
                _ => {
                    return Err(bad(
                        "orig_shape is not an array of INT32 (ComfyUI-GGUF refuses it)",
                    ));
                }
            }
        }
        let n = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad("orig_shape overflows"))?;
        if n != t.n_elements() {
            return Err(bad(&format!(
                "orig_shape {shape:?} has {n} elements, the tensor {}",
                t.n_elements()
            )));
        }
        Ok(shape)
    }

    /// The architecture: `forced`, else `general.architecture` when it names one, else
    /// detected from the tensor names (ComfyUI-GGUF's compatibility mode).
    pub fn arch(&self, forced: Option<Arch>) -> Result<Arch, GgufSourceError> {
        if let Some(a) = forced {
            return Ok(a);
        }
        if let Some(a) = self
            .file
            .architecture()
            .and_then(|s| s.parse::<Arch>().ok())
        {
            return Ok(a);
        }
        // sd.cpp writes no architecture and may keep ComfyUI's `model.diffusion_model.` prefix.
        let names = self.file.tensors.iter().map(|t| t.name.as_str());
        let prefix = detect::arch::KeyPrefix::detect(names.clone());
        let stripped: Vec<String> = names
            .filter_map(|n| prefix.apply(n).map(|c| c.into_owned()))
            .collect();
        detect::arch::detect_arch(stripped.iter().map(String::as_str)).map_err(|e| {
            GgufSourceError::Plan {
                path: self.file.path.clone(),
                source: PlanError::Arch(e),
            }
        })
    }

    /// Plans requantizing this file to `target`, as if its dequantized tensors were an F32
    /// state dict (F16/BF16/F32 tensors keep their own dtype), with ComfyUI-GGUF's policy.
    pub fn plan(
        &self,
        forced_arch: Option<Arch>,
        target: FileType,
    ) -> Result<GgufPlan, GgufSourceError> {
        let arch = self.arch(forced_arch)?;
        let logical = self.logical_tensors()?;
        let sources: Vec<SourceTensor<'_>> = logical
            .iter()
            .map(|t| SourceTensor {
                name: &t.name,
                shape: &t.shape,
                dtype: match t.ggml_type {
                    GgmlType::F16 => SourceDtype::F16,
                    GgmlType::BF16 => SourceDtype::BF16,
                    _ => SourceDtype::F32,
                },
            })
            .collect();
        mix::plan(&sources, Some(arch), target).map_err(|source| GgufSourceError::Plan {
            path: self.file.path.clone(),
            source,
        })
    }
}

impl TensorSource for GgufSource {
    type Error = GgufSourceError;

    fn read_f32(&self, source_name: &str, start: u64, out: &mut [f32]) -> Result<(), Self::Error> {
        let t = self.info(source_name)?;
        let path = &self.file.path;
        let end = start.checked_add(out.len() as u64);
        let range_err = || GgufSourceError::Range {
            path: path.clone(),
            name: t.name.clone(),
            start,
            end: end.unwrap_or(u64::MAX),
        };
        let end = match end {
            Some(e) if e <= t.n_elements() => e,
            _ => return Err(range_err()),
        };
        if out.is_empty() {
            return Ok(());
        }
        // Rows are whole blocks (validated by the reader), so element i is in block i / bs.
        let ty = t.ggml_type;
        let bs = ty.block_size() as u64;
        let (b0, b1) = (start / bs, end.div_ceil(bs));
        let type_size = ty.type_size() as u64;
        let at = self
            .file
            .data_offset
            .checked_add(t.offset)
            .and_then(|o| o.checked_add(b0 * type_size))
            .ok_or_else(range_err)?;
        let mut raw = vec![0u8; usize::try_from((b1 - b0) * type_size).map_err(|_| range_err())?];
        self.raw
            .read_exact_at(&mut raw, at)
            .map_err(|source| GgufSourceError::Io {
                path: path.clone(),
                source,
            })?;
        let quant_err = |source| GgufSourceError::Quant {
            path: path.clone(),
            name: t.name.clone(),
            source,
        };
        if start.is_multiple_of(bs) && end.is_multiple_of(bs) {
            quant::dequantize(ty, &raw, out).map_err(quant_err)?;
        } else {
            let mut values = vec![0f32; ((b1 - b0) * bs) as usize];
            quant::dequantize(ty, &raw, &mut values).map_err(quant_err)?;
            let skip = (start - b0 * bs) as usize;
            out.copy_from_slice(&values[skip..skip + out.len()]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::mix::{SourceDtype, SourceTensor};

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

    #[derive(Debug, thiserror::Error)]
    #[error("no tensor {0}")]
    struct Missing(String);

    struct MemSource(HashMap<String, Vec<f32>>);

    impl TensorSource for MemSource {
        type Error = Missing;
        fn read_f32(&self, name: &str, start: u64, out: &mut [f32]) -> Result<(), Missing> {
            let v = self.0.get(name).ok_or_else(|| Missing(name.into()))?;
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

    fn model(dtype: SourceDtype) -> (Vec<SourceTensor<'static>>, MemSource) {
        let tensors = SHAPES
            .iter()
            .map(|&(name, shape)| SourceTensor { name, shape, dtype })
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
        (tensors, MemSource(data))
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
                    let mut v = src.0[&p.source_name].clone();
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
        let raw = &src.0["double_blocks.0.img_attn.proj.weight"];
        let unrounded = quant::quantize_to_vec(GgmlType::Q8_0, raw).unwrap();
        assert_ne!(file.tensor_data(info), &unrounded[..]);
        // The 1-D bias stays F32 and exact.
        let bias = file.tensor("double_blocks.0.img_attn.qkv.bias").unwrap();
        assert_eq!(bias.ggml_type, GgmlType::F32);
        let exact: Vec<u8> = src.0["double_blocks.0.img_attn.qkv.bias"]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(file.tensor_data(bias), &exact[..]);
    }

    #[test]
    fn a_source_error_names_the_tensor() {
        let (tensors, mut src) = model(SourceDtype::F16);
        src.0.remove("img_in.weight");
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
                source.read_f32(&p.name, start, &mut out).unwrap();
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
                source.read_f32(&p.name, n - 1, &mut over),
                Err(GgufSourceError::Range { .. })
            ));
        }
        assert!(matches!(
            source.read_f32("nope", 0, &mut []),
            Err(GgufSourceError::UnknownTensor { .. })
        ));
    }

    #[test]
    fn a_gguf_file_requantizes_with_the_same_policy() {
        let dir = tempfile::tempdir().unwrap();
        let (path, q8_plan, _) = write_file(dir.path(), FileType::Q8_0);
        let source = GgufSource::open(&path).unwrap();
        assert_eq!(source.arch(None).unwrap(), Arch::Flux);
        let plan = source.plan(None, FileType::Q4KM).unwrap();
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
        assert_eq!(source.arch(None).unwrap(), Arch::Flux);
        let plan = source.plan(None, FileType::Q8_0).unwrap();
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
            .map(|&(name, shape)| SourceTensor {
                name,
                shape,
                dtype: SourceDtype::F32,
            })
            .collect();
        let src = MemSource(
            sd.iter()
                .map(|&(n, _)| (n.to_owned(), values(3, 9216)))
                .collect(),
        );
        let plan = mix::plan(&tensors, None, FileType::Q4_0).unwrap();
        assert_eq!(plan.tensors[0].shape, vec![36, 256]);
        let path = dir.path().join("sd1.gguf");
        std::fs::write(&path, write(&plan, &src, 1 << 20)).unwrap();
        let source = GgufSource::open(&path).unwrap();
        let logical = source.logical_tensors().unwrap();
        assert!(logical.iter().all(|t| t.shape == [32, 32, 3, 3]));
        // Requantizing flattens again the same way.
        let again = source.plan(None, FileType::Q8_0).unwrap();
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
        let err = GgufSource::open(&path)
            .unwrap()
            .logical_tensors()
            .unwrap_err();
        assert!(
            matches!(&err, GgufSourceError::BadOrigShape { name, .. } if name == "input_blocks.3.0.op.weight"),
            "{err}"
        );
    }
}
