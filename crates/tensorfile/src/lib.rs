//! Tensor files: the bottom layer every convcache converter reads and writes through.
//!
//! - [`safetensors`]: a hardened safetensors header parser (validates every length, offset and
//!   shape before use), bounds-checked positioned reads of a validated file, page-aligned read
//!   buffers, and the streaming writer ([`safetensors::writer`]) every safetensors output goes
//!   through.
//! - [`cast`]: element conversions between the float dtypes, bit-identical to PyTorch's
//!   `.to(dtype)`.
//! - [`gguf`]: the GGUF container (types, validating reader, streaming writer).
//!
//! This crate depends on no other convcache crate.

pub mod cast;
pub mod gguf;
pub mod safetensors;

pub use cast::{CastError, CastStats, cast_slice, widen_to_f32};
pub use safetensors::{Dtype, ReadBuffer, SafetensorsFile, SafetensorsWriter, TensorSpec};
