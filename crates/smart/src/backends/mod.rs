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

/// Whether `source` is served as the one file's stored bytes (not a scaled view, not several
/// shards, not a diffusers layout served renamed and fused), so a converter that reads every
/// tensor in order can hand the file to the hasher in order (`Backend::observes_source`).
pub(crate) fn served_as_stored(source: &detect::Detection) -> bool {
    source.fp8_scaling.is_none() && source.shards.is_none() && source.diffusers.is_none()
}

/// The source as the converters of a job read it: the file itself when the conversion hands
/// it to the hasher in order, else `tensorfile`'s view of it.
pub(crate) enum Source {
    /// The file, served as stored.
    File(tensorfile::SafetensorsFile),
    /// Any layout `tensorfile::open_safetensors` serves.
    View(Box<dyn tensorfile::TensorSource>),
}

impl Source {
    /// Opens the job's source as [`Source::File`] when `as_stored`, else as a view, through the
    /// job's shared read when there is one.
    pub(crate) fn open(job: &crate::Job<'_>, as_stored: bool) -> Result<Source, crate::SmartError> {
        Ok(if as_stored {
            Source::File(
                tensorfile::SafetensorsFile::open_shared(job.source_path, job.shared_read)
                    .map_err(crate::SmartError::backend)?,
            )
        } else {
            Source::View(job.open_safetensors().map_err(crate::SmartError::backend)?)
        })
    }

    /// The file, for `PlannedConversion::write_observing_source`, which is only called when
    /// `Backend::observes_source` said so, which it does not for a view.
    pub(crate) fn observed_file(&self) -> Result<&tensorfile::SafetensorsFile, crate::SmartError> {
        match self {
            Source::File(f) => Ok(f),
            Source::View(_) => Err(crate::SmartError::backend(crate::backend::CannotObserve)),
        }
    }

    /// The source to read.
    pub(crate) fn get(&self) -> &dyn tensorfile::TensorSource {
        match self {
            Source::File(f) => f,
            Source::View(v) => v.as_ref(),
        }
    }
}
