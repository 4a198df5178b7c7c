//! Precision conversion of safetensors files, bit-identical to PyTorch's `.to(dtype)`.
//!
//! - [`cast`]: element casts between F64/F32/F16/BF16/F8_E4M3/F8_E5M2 with torch's exact
//!   rounding, saturation and NaN rules.
//! - [`mod@convert`]: the streaming safetensors -> safetensors converter ([`plan`], [`convert()`]),
//!   with the rules for which tensors change.
//! - [`writer`]: the streaming safetensors writer every safetensors output goes through.

pub mod cast;
pub mod convert;
pub mod writer;

pub use cast::{CastError, CastStats, cast_slice, widen_to_f32};
pub use convert::{
    Action, ConvertError, ConvertOptions, Plan, Report, SourceObserver, convert,
    convert_observing_source, convert_with, merged_metadata, plan, plan_file, target_dtype,
};
pub use writer::{SafetensorsWriter, TensorSpec};
