//! The one trait converters plug in through, their typed reports and their errors.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use detect::{Detection, Precision};

use crate::SmartError;

/// Options that change a converter's output bytes (derived from [`crate::Options`] for one
/// source by [`crate::Options::backend_options`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendOptions {
    /// bitsandbytes 4-bit: double-quantize absmax.
    pub double_quant: bool,
    /// GGUF targets: the architecture to use instead of the one detected from tensor names.
    /// `None` when it was not forced or names the detected one.
    pub gguf_arch: Option<gguf::Arch>,
}

/// One conversion to plan.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    /// The source file.
    pub source_path: &'a Path,
    /// What `detect` found in it.
    pub source: &'a Detection,
    /// The requested precision.
    pub target: Precision,
    /// Key-values to add to the output's metadata (the provenance), over the source's own.
    pub extra_metadata: &'a BTreeMap<String, String>,
    /// The request's converter settings.
    pub options: BackendOptions,
    /// The one read of the source this conversion shares with others running at once
    /// ([`crate::many`]); `None`: it reads the source on its own.
    pub shared_read: Option<&'a tensorfile::shared_read::Seat>,
}

impl Job<'_> {
    /// The safetensors source as converters read it ([`tensorfile::open_safetensors`]), through
    /// the shared read when there is one.
    pub fn open_safetensors(
        &self,
    ) -> Result<Box<dyn tensorfile::TensorSource>, tensorfile::SourceError> {
        tensorfile::open_safetensors_shared(self.source_path, self.shared_read)
    }
}

/// A converter: safetensors precisions, bitsandbytes, GGUF.
///
/// `smart` picks the first backend whose [`Backend::supports`] says yes, asks it for a
/// [`PlannedConversion`] (header work only, so the exact output size is known before anything is
/// written), checks free space against [`PlannedConversion::output_len`], then streams
/// [`PlannedConversion::write`] into a temporary file.
pub trait Backend: Sync {
    /// Whether this backend converts `source` to `target`.
    fn supports(&self, source: &Detection, target: Precision) -> bool;

    /// The version recorded in an output's provenance. It must change whenever the bytes this
    /// backend writes for (`target`, `options`) change: a cached output with another version is
    /// stale and gets reconverted.
    fn converter_version(&self, target: Precision, options: &BackendOptions) -> String;

    /// Plans `job`: opens and validates the source, decides every output tensor.
    fn plan(&self, job: &Job<'_>) -> Result<Box<dyn PlannedConversion>, SmartError>;

    /// Whether conversions of `source` to `target` support
    /// [`PlannedConversion::write_observing_source`]: they read the whole source file once, in
    /// order, so `smart` hashes it in that same pass (planning with a placeholder digest)
    /// instead of reading it a second time first.
    fn observes_source(&self, source: &Detection, target: Precision) -> bool {
        let _ = (source, target);
        false
    }
}

/// A conversion whose output is fully decided.
pub trait PlannedConversion {
    /// The exact size in bytes of the output [`PlannedConversion::write`] produces.
    fn output_len(&self) -> u64;

    /// (source bytes, source tensors) the conversion reads: the totals of progress reports.
    fn totals(&self) -> (u64, u64);

    /// Writes the whole output to `out` (sequentially), calling `progress(source bytes done,
    /// tensors done)` as it goes. Returns the converter's report.
    fn write(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ConversionReport, SmartError>;

    /// [`PlannedConversion::write`], also handing every byte of the source file to `observer`
    /// exactly once, in file order. Only called when [`Backend::observes_source`] said so for
    /// the job.
    fn write_observing_source(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
        observer: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<ConversionReport, SmartError> {
        let _ = (out, progress, observer);
        Err(SmartError::backend(CannotObserve))
    }
}

/// [`PlannedConversion::write_observing_source`] called on a converter that did not offer it.
#[derive(Debug, thiserror::Error)]
#[error("this converter cannot hand over the source while converting")]
pub(crate) struct CannotObserve;

impl ConverterError for CannotObserve {
    fn is_input_fault(&self) -> bool {
        false
    }
}

/// What a converter did: its own report. Serialized as the report itself (untagged).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum ConversionReport {
    /// safetensors float -> float (crate `precision`).
    Precision(precision::convert::Report),
    /// bitsandbytes quantization or dequantization (crate `bnb`).
    Bitsandbytes(bnb::Report),
    /// safetensors or GGUF -> GGUF.
    Gguf(gguf::convert::Report),
    /// GGUF -> safetensors float.
    GgufDequantized(gguf::dequantize::DequantReport),
    /// safetensors -> ComfyUI fp8_scaled/nvfp4/mxfp8 (crate `comfyquant`).
    ComfyQuant(comfyquant::Report),
}

/// A converter's error that knows whether the input is at fault (bad, unsupported or changed
/// content: exit 2 in the CLI) or reading, writing or the converter itself failed (exit 1).
pub trait ConverterError: std::error::Error + Send + Sync + 'static {
    /// Whether the input is at fault.
    fn is_input_fault(&self) -> bool;
}

/// A converter error whose message does not name the file, with the file: `PATH: error`.
#[derive(Debug, thiserror::Error)]
#[error("{}: {error}", path.display())]
pub struct InFile<E: ConverterError> {
    /// The source file.
    pub path: PathBuf,
    /// The converter's error.
    pub error: E,
}

impl<E: ConverterError> ConverterError for InFile<E> {
    fn is_input_fault(&self) -> bool {
        self.error.is_input_fault()
    }
}

/// A planned output that cannot be encoded (its header or total size overflows, the error of
/// the writers' `output_len`): the input's fault.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Unencodable(pub std::io::Error);

impl ConverterError for Unencodable {
    fn is_input_fault(&self) -> bool {
        true
    }
}

impl ConverterError for tensorfile::safetensors::SafetensorsError {
    fn is_input_fault(&self) -> bool {
        !matches!(self, tensorfile::safetensors::SafetensorsError::Io { .. })
    }
}

impl ConverterError for tensorfile::source::SourceError {
    fn is_input_fault(&self) -> bool {
        tensorfile::source::SourceError::is_input_fault(self)
    }
}

impl ConverterError for tensorfile::gguf::reader::GgufError {
    fn is_input_fault(&self) -> bool {
        self.kind().is_some()
    }
}

impl ConverterError for precision::convert::ConvertError {
    fn is_input_fault(&self) -> bool {
        precision::convert::ConvertError::is_input_fault(self)
    }
}

impl ConverterError for bnb::BnbError {
    fn is_input_fault(&self) -> bool {
        bnb::BnbError::is_input_fault(self)
    }
}

impl ConverterError for comfyquant::ComfyQuantError {
    fn is_input_fault(&self) -> bool {
        comfyquant::ComfyQuantError::is_input_fault(self)
    }
}

/// The gguf crate's errors each know their kind.
macro_rules! gguf_error_kinds {
    ($($t:ty),*) => {$(
        impl ConverterError for $t {
            fn is_input_fault(&self) -> bool {
                <$t>::is_input_fault(self)
            }
        }
    )*};
}

gguf_error_kinds!(
    gguf::mix::SourcePlanError,
    gguf::source::GgufSourceError,
    gguf::convert::ConvertError,
    gguf::convert::ConversionPlanError,
    gguf::dequantize::DequantError
);
