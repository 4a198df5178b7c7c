//! safetensors (plain, scaled fp8, or any layout `tensorfile` serves) -> ComfyUI's quantized
//! layouts `fp8_scaled`, `nvfp4`, `mxfp8` (crate `comfyquant`).
//!
//! The source is opened with `tensorfile::open_safetensors`, so a ComfyUI quantized source is
//! read dequantized (its scales and markers not written again). Planning reads the selected
//! weights once (their per-tensor scales); a plain file is hashed while it is converted, as the
//! precision converter does (a view in its own pass).

use std::collections::BTreeMap;
use std::io::Write;

use super::Source;
use detect::detection::Format;
use detect::{Detection, Precision};

use crate::{
    Backend, BackendOptions, ConversionReport, Job, PlannedConversion, SmartError, Unencodable,
};

/// The `comfyquant` converter.
#[derive(Debug, Clone, Copy, Default)]
pub struct ComfyQuantBackend;

/// Bump when the bytes written for some target change.
const VERSION: &str = "comfyquant-1";

impl Backend for ComfyQuantBackend {
    fn supports(&self, source: &Detection, target: Precision) -> bool {
        source.format == Format::Safetensors
            && source.supported_as_source
            && source.bitsandbytes.is_none()
            && target.is_comfy_quant()
    }

    fn converter_version(&self, _target: Precision, _options: &BackendOptions) -> String {
        VERSION.to_string()
    }

    fn observes_source(&self, source: &Detection, _target: Precision) -> bool {
        super::served_as_stored(source)
    }

    fn plan(&self, job: &Job<'_>) -> Result<Box<dyn PlannedConversion>, SmartError> {
        let source = Source::open(job, self.observes_source(job.source, job.target))?;
        let plan = comfyquant::plan(source.get(), job.target).map_err(SmartError::backend)?;
        let metadata =
            precision::convert::merged_metadata(source.get().metadata(), job.extra_metadata);
        let output_len = plan
            .output_len(&metadata)
            .map_err(|e| SmartError::backend_in(job.source_path, Unencodable(e)))?;
        Ok(Box::new(Planned {
            source,
            plan,
            metadata,
            output_len,
        }))
    }
}

struct Planned {
    source: Source,
    plan: comfyquant::Plan,
    metadata: BTreeMap<String, String>,
    output_len: u64,
}

impl PlannedConversion for Planned {
    fn output_len(&self) -> u64 {
        self.output_len
    }

    fn totals(&self) -> (u64, u64) {
        (self.plan.source_bytes(), self.plan.source_tensors())
    }

    fn write(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ConversionReport, SmartError> {
        let report =
            comfyquant::convert(self.source.get(), &self.plan, &self.metadata, out, progress)
                .map_err(SmartError::backend)?;
        Ok(ConversionReport::ComfyQuant(report))
    }

    fn write_observing_source(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
        observer: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<ConversionReport, SmartError> {
        let file = self.source.observed_file()?;
        let report = comfyquant::convert_observing_source(
            file,
            &self.plan,
            &self.metadata,
            out,
            progress,
            observer,
        )
        .map_err(SmartError::backend)?;
        Ok(ConversionReport::ComfyQuant(report))
    }
}
