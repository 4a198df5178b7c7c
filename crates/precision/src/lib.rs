#![warn(missing_docs)]
//! Precision conversion of safetensors files, bit-identical to PyTorch's `.to(dtype)`.
//!
//! - [`mod@convert`]: the streaming safetensors -> safetensors converter ([`plan`], [`convert()`]),
//!   with the rules for which tensors change.
//!
//! The element casts and the safetensors writer live in `tensorfile`.

pub mod convert;

pub use convert::{
    Action, ConvertError, ConvertOptions, Plan, Report, SourceObserver, convert,
    convert_observing_source, convert_with, merged_metadata, plan,
};
