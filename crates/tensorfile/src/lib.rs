//! Tensor files: the bottom layer every convcache converter reads and writes through.
//!
//! - [`safetensors`]: a hardened safetensors header parser (validates every length, offset and
//!   shape before use), bounds-checked positioned reads of a validated file, page-aligned read
//!   buffers, and the streaming writer ([`safetensors::writer`]) every safetensors output goes
//!   through.
//! - [`cast`]: element conversions between the float dtypes, bit-identical to PyTorch's
//!   `.to(dtype)`.
//! - [`gguf`]: the GGUF container (types, validating reader, streaming writer).
//! - [`source`]: [`TensorSource`], the one way converters read tensors (name, dtype, shape,
//!   any element range as raw bytes or exact f32), implemented for safetensors files here.
//! - [`scaled`]: ComfyUI's quantized layouts (legacy `scaled_fp8`, and per-layer `comfy_quant`
//!   fp8, nvfp4 and mxfp8), parsed once, and the view that serves their weights dequantized.
//! - [`blockfp`]: the fp8, nvfp4 and mxfp8 kernels (quantize, dequantize, the blocked scale
//!   layout), byte for byte as comfy-kitchen's eager ones.
//! - [`diffusers`]: diffusers-layout models (Flux, SD3, the SDXL/SD1 UNet, Wan, Z-Image)
//!   served in ComfyUI's key layout (renames, fused q/k/v, swapped modulation halves).
//! - [`shared_read`]: one read of a source for several conversions at once (a bounded window
//!   of chunks the conversions read through); [`read_count`]: bytes of model files read.
//! - [`pipeline`]: the streaming pipeline every converter writes through (produce the next
//!   piece on the thread pool while the previous one is written).
//!
//! This crate depends on no other convcache crate.
//!
//! Unix only, like the whole workspace: files are read with positioned reads
//! (`std::os::unix::fs::FileExt`) and a source is recognised as the same file by its device and
//! inode.
//!
//! # Example
//!
//! Write a small F16 tensor with the streaming writer, then read it back widened to f32:
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::fs::File;
//! use tensorfile::{Dtype, SafetensorsWriter, TensorSource, TensorSpec, open_safetensors};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let name = format!("tensorfile-doc-{}.safetensors", std::process::id());
//! let path = std::env::temp_dir().join(name);
//! let spec = TensorSpec { name: "w".into(), dtype: Dtype::F16, shape: vec![2, 2] };
//! let mut writer = SafetensorsWriter::new(File::create(&path)?, &[spec], &BTreeMap::new())?;
//! for v in [1.0f32, -2.5, 0.25, 3.0] {
//!     writer.write_chunk(&half::f16::from_f32(v).to_le_bytes())?;
//! }
//! writer.finish()?;
//!
//! let source: Box<dyn TensorSource> = open_safetensors(&path)?;
//! let index = source.index_of("w").ok_or("no tensor `w`")?;
//! let mut values = [0f32; 4];
//! source.read_f32(index, 0, &mut values)?;
//! assert_eq!(values, [1.0, -2.5, 0.25, 3.0]);
//!
//! drop(source);
//! std::fs::remove_file(&path)?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

#[cfg(not(unix))]
compile_error!("convcache builds on unix only (positioned reads, device and inode identity)");

pub mod blockfp;
pub mod cast;
pub mod diffusers;
pub mod gguf;
pub mod pipeline;
pub mod read_count;
pub mod safetensors;
pub mod scaled;
pub mod sharded;
pub mod shared_read;
pub mod source;

pub use cast::{CastError, CastStats, cast_slice, widen_to_f32};
pub use safetensors::{Dtype, ReadBuffer, SafetensorsFile, SafetensorsWriter, TensorSpec};
pub use source::{
    SourceError, SourceTensor, TensorSource, open_safetensors, open_safetensors_shared,
};
