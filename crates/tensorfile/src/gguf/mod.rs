//! The GGUF container: the ggml type vocabulary ([`types`]), a validating reader ([`reader`])
//! and a streaming writer ([`writer`]). Quantization kernels and the conversion policy live in
//! the `gguf` crate.

pub mod reader;
pub mod types;
pub mod writer;

pub use reader::{GgufError, GgufErrorKind, GgufFile, MetadataValue, TensorInfo};
pub use types::{FileType, GgmlType};
pub use writer::{GgufWriter, TensorDesc};
