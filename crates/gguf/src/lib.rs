//! GGUF for diffusion models, usable on its own.
//!
//! - [`quant`]: quantize/dequantize kernels, one type per block format behind one trait,
//!   byte-identical to ggml's reference quantizers.
//! - [`mix`]: ComfyUI-GGUF's per-tensor type policy (convert.py's base step and the patched
//!   llama-quantize's retyping, in one pass).
//! - [`convert`]: the streaming conversion of any tensor source into a GGUF file.
//! - [`source`]: a GGUF file as a (dequantizing) `tensorfile::TensorSource`.
//! - [`dequantize`]: a GGUF file to fp32/fp16/bf16 safetensors.
//!
//! The container itself (types, validating reader, streaming writer) is `tensorfile::gguf`,
//! re-exported here as [`reader`], [`writer`] and [`types`]; diffusion architectures come from
//! `detect::arch`.

pub mod convert;
pub mod dequantize;
pub mod mix;
pub mod quant;
pub mod source;

pub use detect::arch::{Arch, ArchError, detect_arch};
pub use tensorfile::gguf::{
    FileType, GgmlType, GgufError, GgufErrorKind, GgufFile, GgufWriter, MetadataValue, TensorDesc,
    TensorInfo, reader, types, writer,
};
