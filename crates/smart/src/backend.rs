//! The one trait converters plug in through.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use detect::{Detection, Precision};

use crate::SmartError;

/// Options that change a converter's output bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendOptions {
    /// bitsandbytes 4-bit: double-quantize absmax.
    pub double_quant: bool,
}

/// One conversion to plan.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    /// The source file.
    pub source_path: &'a Path,
    /// What `detect` found in it.
    pub source: &'a Detection,
    pub target: Precision,
    /// Key-values to add to the output's metadata (the provenance), over the source's own.
    pub extra_metadata: &'a BTreeMap<String, String>,
    pub options: BackendOptions,
}

/// A converter: safetensors precisions, bitsandbytes, (later) GGUF.
///
/// `smart` picks the first backend whose [`Backend::supports`] says yes, asks it for a
/// [`PlannedConversion`] (header work only, so the exact output size is known before anything is
/// written), checks free space against [`PlannedConversion::output_len`], then streams
/// [`PlannedConversion::write`] into a temporary file.
pub trait Backend: Sync {
    /// A short name for messages (`precision`, `bitsandbytes`).
    fn name(&self) -> &'static str;

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
    /// tensors done)` as it goes. Returns the converter's report as JSON.
    fn write(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<serde_json::Value, SmartError>;

    /// [`PlannedConversion::write`], also handing every byte of the source file to `observer`
    /// exactly once, in file order. Only called when [`Backend::observes_source`] said so for
    /// the job.
    fn write_observing_source(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
        observer: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<serde_json::Value, SmartError> {
        let _ = (out, progress, observer);
        Err(SmartError::backend(
            "this converter cannot hand over the source while converting",
        ))
    }
}
