//! Precision conversion of safetensors files. (Converter filled by the precision work.)
//!
//! - [`writer`]: the streaming safetensors writer every safetensors output goes through.

pub mod writer;

pub use writer::{SafetensorsWriter, TensorSpec};
