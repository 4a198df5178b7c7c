//! The converters, adapted to [`crate::Backend`].
//!
//! - [`PrecisionBackend`]: safetensors float -> fp32/fp16/bf16/fp8 (crate `precision`).
//! - [`BnbBackend`]: safetensors float -> nf4/fp4/int8, and bitsandbytes -> fp32/fp16/bf16
//!   (crate `bnb`).
//! - [`gguf::GgufBackend`]: safetensors float -> GGUF mixes, GGUF -> GGUF, GGUF ->
//!   fp32/fp16/bf16 (crate `gguf`).
//! - [`ComfyQuantBackend`]: safetensors -> ComfyUI's fp8_scaled/nvfp4/mxfp8 (crate
//!   `comfyquant`).

mod bnb;
mod comfy;
pub mod gguf;
mod precision;

pub use self::bnb::BnbBackend;
pub use self::comfy::ComfyQuantBackend;
pub use self::precision::PrecisionBackend;

use crate::Backend;

/// The backends [`crate::smart_convert`] uses, in the order they are asked. Their `supports`
/// sets do not overlap.
pub const DEFAULT: &[&dyn Backend] = &[
    &BnbBackend,
    &PrecisionBackend,
    &gguf::GgufBackend,
    &ComfyQuantBackend,
];
