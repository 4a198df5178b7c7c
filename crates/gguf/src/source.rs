//! A GGUF file as a [`TensorSource`]: every tensor served as f32 (dequantized as ggml does),
//! under its logical torch shape, by element range.
//!
//! That is how a GGUF file is requantized ([`crate::convert`]) or dequantized into another
//! container ([`crate::dequantize`]): the converters read it as they read any other source.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tensorfile::source::{Stored, check_range, read_raw_via_f32, tensor};
use tensorfile::{Dtype, SourceError, SourceTensor, TensorSource};

use crate::Arch;
use crate::quant;
use crate::reader::{GgufError, GgufFile, MetadataValue, TensorInfo};

/// The metadata key ComfyUI-GGUF reads a flattened tensor's torch shape from.
pub const ORIG_SHAPE_PREFIX: &str = "comfy.gguf.orig_shape.";

/// Why a GGUF file cannot serve as a conversion source.
#[derive(Debug, thiserror::Error)]
pub enum GgufSourceError {
    /// The header is invalid or could not be read.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The file could not be opened for reading tensor data.
    #[error("{}: reading tensor data: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// A `comfy.gguf.orig_shape` entry that does not describe the tensor.
    #[error("{}: tensor `{name}`: {problem}", path.display())]
    BadOrigShape {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// What is wrong.
        problem: String,
    },
}

impl GgufSourceError {
    /// Whether the fault is in the input file rather than in reading it.
    pub fn is_input_fault(&self) -> bool {
        match self {
            GgufSourceError::Gguf(e) => e.kind().is_some(),
            GgufSourceError::Io { .. } => false,
            GgufSourceError::BadOrigShape { .. } => true,
        }
    }
}

/// A GGUF file whose tensors are served as f32 (dequantized as ggml does), by element range.
///
/// The header comes from [`GgufFile::open`] (validated); the data is read with positioned
/// reads of just the blocks a range needs, so memory stays bounded by the caller's chunk.
#[derive(Debug)]
pub struct GgufSource {
    file: GgufFile,
    raw: File,
    /// The shared window tensor data is read through ([`GgufSource::open_shared`]).
    window: Option<tensorfile::shared_read::Reader>,
    tensors: Vec<SourceTensor>,
    metadata: BTreeMap<String, String>,
}

impl GgufSource {
    /// Opens and validates `path`, its `comfy.gguf.orig_shape` entries included.
    pub fn open(path: &Path) -> Result<GgufSource, GgufSourceError> {
        Self::open_shared(path, None)
    }

    /// [`GgufSource::open`], reading tensor data through `seat`'s window
    /// ([`tensorfile::shared_read`]) when `seat` reads this very file: several conversions of
    /// one GGUF source read it once.
    pub fn open_shared(
        path: &Path,
        seat: Option<&tensorfile::shared_read::Seat>,
    ) -> Result<GgufSource, GgufSourceError> {
        let file = GgufFile::open(path)?;
        let raw = File::open(path).map_err(|source| GgufSourceError::Io {
            path: path.to_owned(),
            source,
        })?;
        let window = seat.and_then(|s| s.join(&raw));
        // A T5 text encoder's llama.cpp names are served as ComfyUI's keys, mapped back the
        // way ComfyUI-GGUF's CLIPLoaderGGUF does, so every target writes ComfyUI's names.
        let t5 = matches!(file.architecture(), Some("t5" | "t5encoder"));
        let tensors = file
            .tensors
            .iter()
            .map(|t| {
                Ok(SourceTensor {
                    name: if t5 {
                        crate::text_encoder::comfyui_gguf_t5_key(&t.name)
                    } else {
                        t.name.clone()
                    },
                    shape: logical_shape(&file, t)?,
                    dtype: Dtype::F32,
                    stored: Stored::Ggml(t.ggml_type),
                    source_bytes: t.byte_len(),
                })
            })
            .collect::<Result<_, GgufSourceError>>()?;
        let metadata = file
            .metadata
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect();
        Ok(GgufSource {
            file,
            raw,
            window,
            tensors,
            metadata,
        })
    }

    /// The validated header.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The architecture the file declares (`general.architecture`), when it names one: it
    /// wins over detection from the tensor names (sd.cpp files declare none). A variant that
    /// is written under its parent's name (Chroma and Flux.2 as `flux`, LTX-2 as `ltxv`, ...)
    /// is recovered from the tensor names when they detect as a variant of that name.
    pub fn declared_arch(&self) -> Option<Arch> {
        let declared = self.file.architecture()?;
        let by_names = detect::arch::detect_arch(
            self.tensors
                .iter()
                .map(|t| detect::arch::strip_prefix(&t.name)),
        )
        .ok()
        .filter(|a| a.gguf_name() == declared);
        by_names.or_else(|| declared.parse().ok())
    }
}

impl GgufSource {
    /// Tensor data at `at`: through the shared window when there is one, else a positioned
    /// read, counted in [`tensorfile::read_count`].
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        if let Some(window) = &self.window {
            return window.read_exact_at(buf, at);
        }
        self.raw.read_exact_at(buf, at)?;
        tensorfile::read_count::add(buf.len() as u64);
        Ok(())
    }
}

/// The torch shape of `t`: its `comfy.gguf.orig_shape` (checked: INT32 array, positive dims,
/// same element count), else its dims reversed.
fn logical_shape(file: &GgufFile, t: &TensorInfo) -> Result<Vec<u64>, GgufSourceError> {
    let key = format!("{ORIG_SHAPE_PREFIX}{}", t.name);
    let Some(value) = file.get(&key) else {
        return Ok(t.torch_shape());
    };
    let bad = |problem: &str| GgufSourceError::BadOrigShape {
        path: file.path.clone(),
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

impl TensorSource for GgufSource {
    fn path(&self) -> &Path {
        &self.file.path
    }

    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }

    /// The file's string-valued metadata.
    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Little-endian f32 bytes of the dequantized values, in whole elements.
    fn read_raw(&self, index: usize, byte_offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        read_raw_via_f32(self, index, byte_offset, buf)
    }

    fn read_f32(&self, index: usize, start: u64, out: &mut [f32]) -> Result<(), SourceError> {
        let served = tensor(self, index)?;
        check_range(self, served, start, out.len() as u64)?;
        if out.is_empty() {
            return Ok(());
        }
        let t = &self.file.tensors[index];
        let path = &self.file.path;
        let end = start + out.len() as u64;
        // Rows are whole blocks (validated by the reader), so element i is in block i / bs.
        let ty = t.ggml_type;
        let bs = ty.block_size() as u64;
        let (b0, b1) = (start / bs, end.div_ceil(bs));
        let type_size = ty.type_size() as u64;
        let outside = || SourceError::invalid(path, &t.name, "the tensor's data lies past u64");
        let at = self
            .file
            .data_offset
            .checked_add(t.offset)
            .and_then(|o| o.checked_add(b0 * type_size))
            .ok_or_else(outside)?;
        let mut raw = vec![0u8; usize::try_from((b1 - b0) * type_size).map_err(|_| outside())?];
        self.read_exact_at(&mut raw, at)
            .map_err(|e| SourceError::Io {
                path: path.clone(),
                source: io::Error::new(
                    e.kind(),
                    format!("reading tensor `{}` elements {start}..{end}: {e}", t.name),
                ),
            })?;
        let quant_err = |e| SourceError::invalid(path, &t.name, format_args!("dequantizing: {e}"));
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
