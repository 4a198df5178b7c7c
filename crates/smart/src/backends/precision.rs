//! safetensors float -> fp32/fp16/bf16/fp8_e4m3fn/fp8_e5m2.

use std::collections::BTreeMap;
use std::io::Write;

use detect::detection::Format;
use tensorfile::safetensors::SafetensorsFile;
use detect::{Detection, Precision};
use precision::convert::{self as conv, Plan};

use crate::{Backend, BackendOptions, Job, PlannedConversion, SmartError};

/// The `precision` crate's converter.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrecisionBackend;

/// Bump when the bytes written for some target change.
const VERSION: &str = "precision-1";

impl Backend for PrecisionBackend {
    fn name(&self) -> &'static str {
        "precision"
    }

    fn supports(&self, source: &Detection, target: Precision) -> bool {
        source.format == Format::Safetensors
            && source.supported_as_source
            && source.bitsandbytes.is_none()
            && conv::target_dtype(target).is_some()
    }

    fn converter_version(&self, _target: Precision, _options: &BackendOptions) -> String {
        VERSION.to_string()
    }

    fn observes_source(&self, _source: &Detection, _target: Precision) -> bool {
        true
    }

    fn plan(&self, job: &Job<'_>) -> Result<Box<dyn PlannedConversion>, SmartError> {
        let src = SafetensorsFile::open(job.source_path).map_err(SmartError::backend)?;
        let plan = conv::plan_file(&src, job.target).map_err(SmartError::backend)?;
        let metadata = conv::merged_metadata(&src.header, job.extra_metadata);
        let output_len = plan
            .output_len(&metadata)
            .map_err(|e| SmartError::backend(format!("{}: {e}", job.source_path.display())))?;
        Ok(Box::new(Planned {
            src,
            plan,
            metadata,
            output_len,
        }))
    }
}

struct Planned {
    src: SafetensorsFile,
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
    ) -> Result<serde_json::Value, SmartError> {
        let report = conv::convert(&self.src, &self.plan, &self.metadata, out, progress)
            .map_err(SmartError::backend)?;
        serde_json::to_value(report).map_err(SmartError::backend)
    }

    fn write_observing_source(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
        observer: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<serde_json::Value, SmartError> {
        let report = conv::convert_observing_source(
            &self.src,
            &self.plan,
            &self.metadata,
            out,
            conv::ConvertOptions::default(),
            progress,
            observer,
        )
        .map_err(SmartError::backend)?;
        serde_json::to_value(report).map_err(SmartError::backend)
    }
}
