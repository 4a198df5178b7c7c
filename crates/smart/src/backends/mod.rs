//! The converters, adapted to [`crate::Backend`].
//!
//! - [`PrecisionBackend`]: safetensors float -> fp32/fp16/bf16/fp8 (crate `precision`).
//! - [`BnbBackend`]: safetensors float -> nf4/fp4/int8, and bitsandbytes -> fp32/fp16/bf16
//!   (crate `bnb`).
//! - [`gguf::GgufBackend`]: safetensors float -> GGUF mixes, GGUF -> GGUF, GGUF ->
//!   fp32/fp16/bf16 (crate `gguf`).

mod bnb;
pub mod gguf;
mod precision;

pub use self::bnb::BnbBackend;
pub use self::precision::PrecisionBackend;

use crate::Backend;

/// The GGUF backend with the architecture detected from tensor names.
static GGUF_DETECTED_ARCH: gguf::GgufBackend = gguf::GgufBackend { arch: None };

/// The backends [`crate::smart_convert`] uses, in the order they are asked (the GGUF one
/// detecting the architecture). Their `supports` sets do not overlap.
pub fn default_backends() -> Vec<&'static dyn Backend> {
    with_gguf(&GGUF_DETECTED_ARCH)
}

/// The default backends with this GGUF backend (e.g. one with a forced architecture).
pub fn with_gguf(gguf: &gguf::GgufBackend) -> Vec<&dyn Backend> {
    vec![&BnbBackend, &PrecisionBackend, gguf]
}
