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
//! - [`scaled`]: ComfyUI's scaled-fp8 layouts (legacy `scaled_fp8` and per-layer
//!   `comfy_quant`), parsed once, and the view that serves their weights de-scaled.
//! - [`pipeline`]: the streaming pipeline every converter writes through (produce the next
//!   piece on the thread pool while the previous one is written).
//!
//! This crate depends on no other convcache crate.

pub mod cast;
pub mod gguf;
pub mod pipeline;
pub mod safetensors;
pub mod scaled;
pub mod source;

pub use cast::{CastError, CastStats, cast_slice, widen_to_f32};
pub use safetensors::{Dtype, ReadBuffer, SafetensorsFile, SafetensorsWriter, TensorSpec};
pub use source::{SourceError, SourceTensor, TensorSource, open_safetensors};
