//! GGUF: safetensors float -> a GGUF mix (ComfyUI-GGUF's convert.py + patched llama-quantize in
//! one pass), GGUF -> another GGUF type (requantized), and GGUF -> fp32/fp16/bf16 safetensors
//! (dequantized, ComfyUI key names and logical shapes kept).
//!
//! A thin shim over the `gguf` crate: safetensors sources are opened with
//! `tensorfile::open_safetensors` (scaled-fp8 weights served de-scaled, their scales and
//! markers listed as dropped), GGUF sources as `gguf::source::GgufSource`.

use std::io::Write;

use ::gguf::Arch;
use ::gguf::convert::GgufConversion;
use ::gguf::dequantize::Dequantization;
use ::gguf::source::GgufSource;
use detect::detection::Format;
use detect::{Detection, Precision};
use tensorfile::Dtype;

use crate::{Backend, BackendOptions, Job, PlannedConversion, SmartError};

/// The GGUF converter. `arch` forces the architecture (`--arch`) instead of detecting it from
/// the tensor names.
#[derive(Debug, Clone, Copy, Default)]
pub struct GgufBackend {
    pub arch: Option<Arch>,
}

/// Bump when the bytes written for some target change.
const VERSION: &str = "gguf-1";

fn is_dequant_target(target: Precision) -> Option<Dtype> {
    match target {
        Precision::Fp32 => Some(Dtype::F32),
        Precision::Fp16 => Some(Dtype::F16),
        Precision::Bf16 => Some(Dtype::BF16),
        _ => None,
    }
}

impl Backend for GgufBackend {
    fn name(&self) -> &'static str {
        "gguf"
    }

    fn supports(&self, source: &Detection, target: Precision) -> bool {
        match (source.format, target) {
            (Format::Safetensors, Precision::Gguf(_)) => {
                source.supported_as_source && source.bitsandbytes.is_none()
            }
            (Format::Gguf, Precision::Gguf(_)) => true,
            (Format::Gguf, t) => is_dequant_target(t).is_some(),
            _ => false,
        }
    }

    fn converter_version(&self, _target: Precision, options: &BackendOptions) -> String {
        // A forced architecture changes `general.architecture` and possibly the mix.
        match self.forced_arch(options) {
            Some(a) => format!("{VERSION}+arch={}", a.name()),
            None => VERSION.to_string(),
        }
    }

    fn plan(&self, job: &Job<'_>) -> Result<Box<dyn PlannedConversion>, SmartError> {
        let (path, provenance) = (job.source_path, job.extra_metadata);
        let forced_arch = self.forced_arch(&job.options);
        let gguf_source = || GgufSource::open(path).map_err(SmartError::backend);
        Ok(match (job.source.format, job.target) {
            (Format::Safetensors, Precision::Gguf(ft)) => {
                let source = tensorfile::open_safetensors(path).map_err(SmartError::backend)?;
                Box::new(
                    GgufConversion::plan(source, forced_arch, ft, provenance)
                        .map_err(SmartError::backend)?,
                )
            }
            (Format::Gguf, Precision::Gguf(ft)) => {
                let from = job.source.precision.map_or("GGUF", |p| p.canonical_name());
                Box::new(
                    GgufConversion::requantize(gguf_source()?, forced_arch, ft, provenance, from)
                        .map_err(SmartError::backend)?,
                )
            }
            (Format::Gguf, t) => {
                let dtype = is_dequant_target(t).ok_or_else(|| unsupported(job))?;
                Box::new(
                    Dequantization::plan(gguf_source()?, dtype, provenance)
                        .map_err(SmartError::backend)?,
                )
            }
            _ => return Err(unsupported(job)),
        })
    }
}

impl GgufBackend {
    /// The architecture to force, if any. The single place to read a per-job `--arch` from
    /// once `BackendOptions` carries one (`options.arch.or(self.arch)`).
    fn forced_arch(&self, _options: &BackendOptions) -> Option<Arch> {
        self.arch
    }
}

fn unsupported(job: &Job<'_>) -> SmartError {
    SmartError::Unsupported {
        path: job.source_path.to_path_buf(),
        from: job
            .source
            .precision
            .map_or_else(|| "unknown".to_string(), |p| p.canonical_name().to_string()),
        target: job.target,
    }
}

/// A typed report as the JSON `smart` hands on (until the reports are typed end to end).
fn to_json(report: &impl serde::Serialize) -> Result<serde_json::Value, SmartError> {
    serde_json::to_value(report).map_err(SmartError::backend)
}

impl PlannedConversion for GgufConversion {
    fn output_len(&self) -> u64 {
        GgufConversion::output_len(self)
    }

    fn totals(&self) -> (u64, u64) {
        (self.source_bytes(), self.gguf_plan().tensors.len() as u64)
    }

    fn write(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<serde_json::Value, SmartError> {
        to_json(&GgufConversion::write(self, out, progress).map_err(SmartError::backend)?)
    }
}

impl PlannedConversion for Dequantization {
    fn output_len(&self) -> u64 {
        Dequantization::output_len(self)
    }

    fn totals(&self) -> (u64, u64) {
        (self.source_bytes(), self.tensor_count() as u64)
    }

    fn write(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<serde_json::Value, SmartError> {
        to_json(&Dequantization::write(self, out, progress).map_err(SmartError::backend)?)
    }
}

#[cfg(test)]
mod tests {
    use ::gguf::FileType;

    use super::*;

    #[test]
    fn a_forced_arch_changes_the_converter_version() {
        let o = BackendOptions::default();
        let t = Precision::Gguf(FileType::Q8_0);
        assert_ne!(
            GgufBackend { arch: None }.converter_version(t, &o),
            GgufBackend {
                arch: Some(Arch::Flux)
            }
            .converter_version(t, &o)
        );
    }

    #[test]
    fn dequant_targets() {
        assert_eq!(is_dequant_target(Precision::Bf16), Some(Dtype::BF16));
        assert_eq!(is_dequant_target(Precision::Nf4), None);
    }
}
