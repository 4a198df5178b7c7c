//! What is this model file, and in which precision?
//!
//! - [`precision`]: the precision vocabulary (fp32 ... Q6_K), aliases, canonical names and
//!   [`should_skip`].
//! - [`safetensors`]: a hardened safetensors header parser (validates everything before use)
//!   and a memory-mapped view of a validated file.
//! - [`detection`]: [`detect`] — format, precision, dtype histogram and architecture, from the
//!   header only; the file name only as a last resort, reported as a guess.
//!
//! `corpus` (hidden) builds the adversarial files shared by the tests and `cargo xtask
//! fixtures`.

#[doc(hidden)]
pub mod corpus;
pub mod detection;
pub mod precision;
pub mod safetensors;

pub use detection::{
    BnbLayout, BnbQuantType, DetectError, Detection, DtypeCount, Evidence, Format, Fp8Scaling,
    detect,
};
pub use precision::{Precision, PrecisionParseError, SkipReason, should_skip};
