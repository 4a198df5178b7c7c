//! The converters, adapted to [`crate::Backend`].
//!
//! - [`PrecisionBackend`]: safetensors float -> fp32/fp16/bf16/fp8 (crate `precision`).
//! - [`BnbBackend`]: safetensors float -> nf4/fp4/int8, and bitsandbytes -> fp32/fp16/bf16
//!   (crate `bnb`).
//! - GGUF: not yet; a `GgufBackend` implementing [`crate::Backend`] goes here and into
//!   [`default_backends`].

mod bnb;
pub mod gguf;
mod precision;

pub use self::bnb::BnbBackend;
pub use self::precision::PrecisionBackend;

use crate::Backend;

/// The backends [`crate::smart_convert`] uses, in the order they are asked.
pub fn default_backends() -> Vec<&'static dyn Backend> {
    vec![&BnbBackend, &PrecisionBackend]
}
