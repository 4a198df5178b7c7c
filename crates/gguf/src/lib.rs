//! GGUF for diffusion models, usable on its own.
//!
//! - [`types`]: the vocabulary — ggml tensor types ([`GgmlType`]) with ids, block sizes and
//!   bytes per block, and llama file types ([`FileType`], the value of `general.file_type`).
//! - [`reader`]: a GGUF v2/v3 reader that validates every count, length, shape and offset
//!   against the file before trusting it, over a memory map.
//! - [`writer`]: a streaming writer (metadata in insertion order, tensor infos, aligned data
//!   written one tensor at a time).
//! - [`arch`]: diffusion architecture detection from tensor key sets (ComfyUI-GGUF's rules).
//! - [`quant`]: quantize/dequantize kernels, one type per block format behind one trait,
//!   byte-identical to ggml's reference quantizers.
//!
//! This crate depends on no other convcache crate.

pub mod arch;
pub mod convert;
pub mod mix;
pub mod quant;
pub mod reader;
pub mod types;
pub mod writer;

pub use arch::{Arch, ArchError, detect_arch};
pub use reader::{GgufError, GgufErrorKind, GgufFile, MetadataValue, TensorInfo};
pub use types::{FileType, GgmlType};
pub use writer::{GgufWriter, TensorDesc};
