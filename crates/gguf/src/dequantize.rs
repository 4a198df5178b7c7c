//! GGUF -> fp32/fp16/bf16 safetensors: every tensor dequantized as ggml does and rounded once to
//! the target, ComfyUI key names and logical (`orig_shape`) shapes kept.
//!
//! The file is read through [`GgufSource`] like any other source and streamed through
//! `tensorfile`'s pipeline (the next chunk is dequantized on the thread pool while the previous
//! one is written), so memory is a few chunks, never the model.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;

use rayon::prelude::*;
use serde::Serialize;
use tensorfile::pipeline::{self, Piece};
use tensorfile::safetensors::writer;
use tensorfile::{CastError, Dtype, SafetensorsWriter, SourceError, TensorSource, TensorSpec};

use crate::convert::{from_stream, share};
use crate::mix::DroppedTensor;
use crate::source::GgufSource;

/// Elements per chunk: 4M values (16 MiB of f32).
const CHUNK_ELEMS: u64 = 4 << 20;
/// Elements one task dequantizes and casts while they stay in the core's cache (whole blocks
/// of every ggml type).
const TASK_ELEMS: usize = 1 << 16;

/// Why dequantizing failed.
#[derive(Debug, thiserror::Error)]
pub enum DequantError {
    /// The target is not a float safetensors dtype this converter writes.
    #[error("{}: cannot dequantize to {dtype}: the targets are F32, F16 and BF16", path.display())]
    Target {
        /// The source file.
        path: PathBuf,
        /// The refused target.
        dtype: Dtype,
    },
    /// The output's header cannot be laid out.
    #[error("{}: {source}", path.display())]
    Layout {
        /// The source file.
        path: PathBuf,
        /// What the writer refused.
        source: io::Error,
    },
    /// Reading the source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A value cannot be cast to the target.
    #[error("{}: `{tensor}`: {source}", path.display())]
    Cast {
        /// The source file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The cast's error.
        source: CastError,
    },
    /// Writing the output failed.
    #[error("{}: writing: {source}", path.display())]
    Write {
        /// The source file.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
}

impl DequantError {
    /// Whether the fault is in the input rather than in reading or writing files.
    pub fn is_input_fault(&self) -> bool {
        match self {
            DequantError::Source(e) => e.is_input_fault(),
            DequantError::Write { .. } => false,
            DequantError::Target { .. }
            | DequantError::Layout { .. }
            | DequantError::Cast { .. } => true,
        }
    }
}

/// What was written (the converter's report; `smart` shows it as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DequantReport {
    /// Always `safetensors`.
    pub format: &'static str,
    /// The dtype of every tensor written.
    pub dtype: &'static str,
    /// Tensors written.
    pub tensors: usize,
    /// Source tensors per ggml type.
    pub source_types: BTreeMap<&'static str, u64>,
    /// Tensors written under their `orig_shape` rather than their stored shape.
    pub reshaped: usize,
    /// Always empty: every tensor is kept.
    pub dropped: Vec<DroppedTensor>,
    /// Always empty.
    pub warnings: Vec<String>,
}

/// A planned dequantization: the output header is decided, nothing is written yet.
#[derive(Debug)]
pub struct Dequantization {
    source: GgufSource,
    specs: Vec<TensorSpec>,
    metadata: BTreeMap<String, String>,
    output_len: u64,
}

impl Dequantization {
    /// Plans writing every tensor of `source` as `dtype` (F32, F16 or BF16), with
    /// `format: pt` and `extra_metadata` in the header.
    pub fn plan(
        source: GgufSource,
        dtype: Dtype,
        extra_metadata: &BTreeMap<String, String>,
    ) -> Result<Dequantization, DequantError> {
        if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(DequantError::Target {
                path: source.path().to_owned(),
                dtype,
            });
        }
        let specs: Vec<TensorSpec> = source
            .tensors()
            .iter()
            .map(|t| TensorSpec {
                name: t.name.clone(),
                dtype,
                shape: t.shape.clone(),
            })
            .collect();
        let mut metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        metadata.extend(extra_metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        let output_len =
            writer::output_len(&specs, &metadata).map_err(|e| DequantError::Layout {
                path: source.path().to_owned(),
                source: e,
            })?;
        Ok(Dequantization {
            source,
            specs,
            metadata,
            output_len,
        })
    }

    /// The exact size of the output.
    pub fn output_len(&self) -> u64 {
        self.output_len
    }

    /// Tensors written.
    pub fn tensor_count(&self) -> usize {
        self.specs.len()
    }

    /// Bytes of tensor data read from the source (the total of the progress).
    pub fn source_bytes(&self) -> u64 {
        self.source.tensors().iter().map(|t| t.source_bytes).sum()
    }

    /// Writes the safetensors file to `out`, calling `progress(source bytes read, tensors
    /// done)`.
    pub fn write(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<DequantReport, DequantError> {
        let path = self.source.path();
        let write_err = |source| DequantError::Write {
            path: path.to_owned(),
            source,
        };
        let tensors = self.source.tensors();
        let mut pieces = Vec::new();
        let mut bytes_before = 0u64;
        for (index, (t, spec)) in tensors.iter().zip(&self.specs).enumerate() {
            let n = t.n_elements();
            let mut start = 0u64;
            loop {
                let len = CHUNK_ELEMS.min(n - start);
                pieces.push(Slice {
                    index,
                    start,
                    len,
                    bytes_before,
                    out_len: spec
                        .dtype
                        .bytes_for(len)
                        .and_then(|b| usize::try_from(b).ok())
                        .ok_or_else(|| SourceError::invalid(path, &t.name, "size overflows"))?,
                });
                start += len;
                if start >= n {
                    break;
                }
            }
            bytes_before += t.source_bytes;
        }
        let mut writer =
            SafetensorsWriter::new(out, &self.specs, &self.metadata).map_err(write_err)?;
        pipeline::stream(
            pieces,
            &mut writer,
            &|piece: &Slice, dst: &mut [u8]| self.produce(piece, dst),
            &mut |piece| {
                let t = &tensors[piece.index];
                let done = piece.start + piece.len;
                progress(
                    piece.bytes_before + share(t.source_bytes, done, t.n_elements()),
                    piece.index as u64 + u64::from(done == t.n_elements()),
                );
            },
        )
        .map_err(|e| from_stream(e, write_err))?;
        writer.finish().map_err(write_err)?;
        let mut source_types = BTreeMap::new();
        for t in &self.source.file().tensors {
            *source_types.entry(t.ggml_type.name()).or_insert(0) += 1;
        }
        Ok(DequantReport {
            format: "safetensors",
            dtype: self.specs.first().map_or("", |s| s.dtype.as_str()),
            tensors: self.specs.len(),
            source_types,
            reshaped: self
                .specs
                .iter()
                .zip(&self.source.file().tensors)
                .filter(|(s, t)| s.shape != t.torch_shape())
                .count(),
            dropped: Vec::new(),
            warnings: Vec::new(),
        })
    }

    /// Dequantizes `piece` into `dst` (its bytes in the target dtype), in tasks of whole
    /// blocks over the thread pool: each value depends only on its block, so the split never
    /// changes the output.
    fn produce(&self, piece: &Slice, dst: &mut [u8]) -> Result<(), DequantError> {
        let spec = &self.specs[piece.index];
        let es = (spec.dtype.bits() / 8) as usize;
        dst.par_chunks_mut(TASK_ELEMS * es)
            .enumerate()
            .try_for_each(|(i, dst)| {
                let start = piece.start + (i * TASK_ELEMS) as u64;
                if spec.dtype == Dtype::F32 {
                    return Ok(self.source.read_raw(piece.index, start * 4, dst)?);
                }
                let mut wide = vec![0u8; dst.len() / es * 4];
                self.source.read_raw(piece.index, start * 4, &mut wide)?;
                tensorfile::cast_slice(Dtype::F32, &wide, spec.dtype, dst).map_err(|source| {
                    DequantError::Cast {
                        path: self.source.path().to_owned(),
                        tensor: spec.name.clone(),
                        source,
                    }
                })?;
                Ok(())
            })
    }
}

/// Elements `start..start + len` of tensor `index`.
struct Slice {
    index: usize,
    start: u64,
    len: u64,
    /// Source bytes of the tensors before it.
    bytes_before: u64,
    out_len: usize,
}

impl Piece for Slice {
    fn out_len(&self) -> usize {
        self.out_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant;
    use crate::types::GgmlType;
    use crate::writer::{GgufWriter, TensorDesc};

    /// Tensors larger than a task and not a whole number of tasks (and a small F32 one) come
    /// out as each whole tensor dequantized and cast at once.
    #[test]
    fn every_tensor_is_its_whole_dequantization_cast_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let tensors: [(&str, &[u64], GgmlType); 3] = [
            ("a.weight", &[3, 70016], GgmlType::Q8_0),
            ("b.weight", &[2, 512], GgmlType::Q4K),
            ("c.bias", &[5, 13], GgmlType::F32),
        ];
        let descs: Vec<TensorDesc> = tensors
            .iter()
            .map(|&(n, s, t)| TensorDesc::from_torch_shape(n, s, t))
            .collect();
        let mut file = Vec::new();
        let mut w = GgufWriter::new(&mut file, Vec::new(), &descs, 32).unwrap();
        let mut stored = Vec::new();
        for (i, &(_, shape, ty)) in tensors.iter().enumerate() {
            let n = shape.iter().product::<u64>() as usize;
            let values: Vec<f32> = (0..n)
                .map(|j| ((j * 7 + i) % 251) as f32 * 0.013 - 1.6)
                .collect();
            let bytes = quant::quantize_to_vec(ty, &values).unwrap();
            w.write_chunk(&bytes).unwrap();
            stored.push(bytes);
        }
        w.finish().unwrap();
        std::fs::write(&path, file).unwrap();

        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let source = GgufSource::open(&path).unwrap();
            let planned = Dequantization::plan(source, dtype, &BTreeMap::new()).unwrap();
            let out_path = dir.path().join(format!("{dtype}.safetensors"));
            let mut out = std::fs::File::create(&out_path).unwrap();
            let report = planned.write(&mut out, &mut |_, _| {}).unwrap();
            assert_eq!(report.tensors, 3);
            assert_eq!(
                std::fs::metadata(&out_path).unwrap().len(),
                planned.output_len()
            );
            let st = tensorfile::SafetensorsFile::open(&out_path).unwrap();
            for (&(name, shape, ty), bytes) in tensors.iter().zip(&stored) {
                let (entry, got) = st.tensor(name).unwrap();
                assert_eq!((entry.dtype, &entry.shape[..]), (dtype, shape));
                let wide: Vec<u8> = quant::dequantize_to_vec(ty, bytes)
                    .unwrap()
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                let mut want = vec![0u8; got.len()];
                tensorfile::cast_slice(Dtype::F32, &wide, dtype, &mut want).unwrap();
                assert_eq!(got, &want[..], "{name} as {dtype}");
            }
        }
    }
}
