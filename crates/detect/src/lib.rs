//! What is this model file, and in which precision?
//!
//! - [`precision`]: the precision vocabulary (fp32 ... Q6_K), aliases, canonical names and
//!   [`should_skip`].
//! - [`arch`]: diffusion architecture detection from tensor key sets (ComfyUI-GGUF's rules),
//!   and the per-architecture tables of tensors kept in high precision.
//! - [`detection`]: [`detect`] — format, precision, dtype histogram and architecture, from the
//!   header only; the file name only as a last resort, reported as a guess.
//!
//! `corpus` (hidden) builds the adversarial files shared by the tests and `cargo xtask
//! fixtures`.

pub mod arch;
#[doc(hidden)]
pub mod corpus;
pub mod detection;
pub mod precision;

pub use detection::{
    BnbLayout, BnbQuantType, DetectError, Detection, DtypeCount, Evidence, Format, Fp8Scaling,
    detect,
};
pub use precision::{Precision, PrecisionParseError, SkipReason, should_skip};
