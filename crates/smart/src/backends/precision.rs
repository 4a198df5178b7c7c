//! safetensors float -> fp32/fp16/bf16/fp8_e4m3fn/fp8_e5m2.
//!
//! A ComfyUI scaled-fp8 source is read through `tensorfile`'s de-scaling view, so its weights
//! arrive as `w.to(f32) * scale` and its scale and marker tensors are not written; such a
//! source is hashed in a separate pass (the view does not read the file in order).

use std::collections::BTreeMap;
use std::io::Write;

use super::Source;
use crate::{
    Backend, BackendOptions, ConversionReport, Job, PlannedConversion, SmartError, Unencodable,
};
use detect::detection::Format;
use detect::{Detection, Precision};
use precision::convert::{self as conv, Plan};

/// The `precision` crate's converter.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrecisionBackend;

/// Bump when the bytes written for some target change.
const VERSION: &str = "precision-1";

impl Backend for PrecisionBackend {
    fn supports(&self, source: &Detection, target: Precision) -> bool {
        source.format == Format::Safetensors
            && source.supported_as_source
            && source.bitsandbytes.is_none()
            && target.safetensors_dtype().is_some()
    }

    fn converter_version(&self, _target: Precision, _options: &BackendOptions) -> String {
        VERSION.to_string()
    }

    fn observes_source(&self, source: &Detection, _target: Precision) -> bool {
        super::served_as_stored(source)
    }

    fn plan(&self, job: &Job<'_>) -> Result<Box<dyn PlannedConversion>, SmartError> {
        let src = Source::open(job, self.observes_source(job.source, job.target))?;
        let plan = conv::plan(src.get(), job.target).map_err(SmartError::backend)?;
        let metadata = conv::merged_metadata(src.get().metadata(), job.extra_metadata);
        let output_len = plan
            .output_len(&metadata)
            .map_err(|e| SmartError::backend_in(job.source_path, Unencodable(e)))?;
        Ok(Box::new(Planned {
            src,
            plan,
            metadata,
            output_len,
        }))
    }
}

struct Planned {
    src: Source,
    plan: Plan,
    metadata: BTreeMap<String, String>,
    output_len: u64,
}

impl PlannedConversion for Planned {
    fn output_len(&self) -> u64 {
        self.output_len
    }

    fn totals(&self) -> (u64, u64) {
        (self.plan.bytes_in, self.plan.specs.len() as u64)
    }

    fn write(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ConversionReport, SmartError> {
        let report = conv::convert(self.src.get(), &self.plan, &self.metadata, out, progress)
            .map_err(SmartError::backend)?;
        Ok(ConversionReport::Precision(report))
    }

    fn write_observing_source(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
        observer: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<ConversionReport, SmartError> {
        let file = self.src.observed_file()?;
        let report = conv::convert_observing_source(
            file,
            &self.plan,
            &self.metadata,
            out,
            conv::ConvertOptions::default(),
            progress,
            observer,
        )
        .map_err(SmartError::backend)?;
        Ok(ConversionReport::Precision(report))
    }
}
