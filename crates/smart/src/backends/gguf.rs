//! GGUF: safetensors float -> a GGUF mix (ComfyUI-GGUF's convert.py + patched llama-quantize in
//! one pass), GGUF -> another GGUF type (requantized), and GGUF -> fp32/fp16/bf16 safetensors
//! (dequantized, ComfyUI key names and logical shapes kept).
//!
//! A thin shim over the `gguf` crate: safetensors sources are opened with
//! `tensorfile::open_safetensors` (scaled-fp8 weights served de-scaled, their scales and
//! markers listed as dropped), GGUF sources as `gguf::source::GgufSource`.

use std::io::Write;

use ::gguf::convert::GgufConversion;
use ::gguf::dequantize::Dequantization;
use ::gguf::source::GgufSource;
use detect::detection::Format;
use detect::{Detection, Precision};

use crate::{Backend, BackendOptions, ConversionReport, Job, PlannedConversion, SmartError};

/// The GGUF converter. [`BackendOptions::gguf_arch`] forces the architecture (`--arch`)
/// instead of detecting it from the tensor names.
#[derive(Debug, Clone, Copy, Default)]
pub struct GgufBackend;

/// Bump when the bytes written for some target change (gguf-4: T5/umt5 typed by llama.cpp's
/// rules and carrying its t5encoder.* hyperparameters).
const VERSION: &str = "gguf-4";

impl Backend for GgufBackend {
    fn supports(&self, source: &Detection, target: Precision) -> bool {
        match (source.format, target) {
            (Format::Safetensors, Precision::Gguf(_)) => {
                source.supported_as_source && source.bitsandbytes.is_none()
            }
            (Format::Gguf, Precision::Gguf(_)) => true,
            (Format::Gguf, t) => t.dequantization_dtype().is_some(),
            _ => false,
        }
    }

    fn converter_version(&self, _target: Precision, options: &BackendOptions) -> String {
        // A forced architecture changes `general.architecture` and possibly the mix (it is only
        // set when it differs from the detected one, see `Options::backend_options`).
        match options.gguf_arch {
            Some(a) => format!("{VERSION}+arch={}", a.name()),
            None => VERSION.to_string(),
        }
    }

    fn plan(&self, job: &Job<'_>) -> Result<Box<dyn PlannedConversion>, SmartError> {
        let (path, provenance) = (job.source_path, job.extra_metadata);
        let forced_arch = job.options.gguf_arch;
        let gguf_source =
            || GgufSource::open_shared(path, job.shared_read).map_err(SmartError::backend);
        Ok(match (job.source.format, job.target) {
            (Format::Safetensors, Precision::Gguf(ft)) => {
                let source = job.open_safetensors().map_err(SmartError::backend)?;
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
                let dtype = t.dequantization_dtype().ok_or_else(|| unsupported(job))?;
                Box::new(
                    Dequantization::plan(gguf_source()?, dtype, provenance)
                        .map_err(SmartError::backend)?,
                )
            }
            _ => return Err(unsupported(job)),
        })
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
    ) -> Result<ConversionReport, SmartError> {
        let report = GgufConversion::write(self, out, progress).map_err(SmartError::backend)?;
        Ok(ConversionReport::Gguf(report))
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
    ) -> Result<ConversionReport, SmartError> {
        let report = Dequantization::write(self, out, progress).map_err(SmartError::backend)?;
        Ok(ConversionReport::GgufDequantized(report))
    }
}

#[cfg(test)]
mod tests {
    use ::gguf::{Arch, FileType};

    use super::*;

    #[test]
    fn a_forced_arch_changes_the_converter_version() {
        let t = Precision::Gguf(FileType::Q8_0);
        let forced = BackendOptions {
            gguf_arch: Some(Arch::Flux),
            ..BackendOptions::default()
        };
        assert_ne!(
            GgufBackend.converter_version(t, &BackendOptions::default()),
            GgufBackend.converter_version(t, &forced)
        );
    }
}
