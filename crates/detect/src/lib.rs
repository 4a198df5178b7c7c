#![warn(missing_docs)]
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
//!
//! ```
//! use std::collections::BTreeMap;
//! use detect::{Precision, detect, should_skip};
//! use tensorfile::{Dtype, SafetensorsWriter, TensorSpec};
//!
//! // Aliases and case-insensitive GGUF names resolve to one canonical precision.
//! assert_eq!("fp8".parse::<Precision>().unwrap(), Precision::Fp8E4m3fn);
//! assert_eq!("q4_k_m".parse::<Precision>().unwrap().canonical_name(), "Q4_K_M");
//!
//! // The precision comes from the header, never the name.
//! let path = std::env::temp_dir().join(format!("detect-doc-{}_fp32.safetensors", std::process::id()));
//! let spec = TensorSpec { name: "w".into(), dtype: Dtype::BF16, shape: vec![2] };
//! let mut w = SafetensorsWriter::new(std::fs::File::create(&path)?, &[spec], &BTreeMap::new())?;
//! w.write_chunk(&[0x80, 0x3f, 0x00, 0x40])?;
//! w.finish()?;
//! let d = detect(&path)?;
//! assert_eq!(d.precision, Some(Precision::Bf16));
//! assert!(should_skip(Precision::Bf16, "bf16".parse()?).is_some());
//! std::fs::remove_file(&path)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

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
