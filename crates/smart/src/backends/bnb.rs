//! safetensors float -> nf4/fp4/int8 (bitsandbytes layout), and bitsandbytes -> fp32/fp16/bf16.

use std::collections::BTreeMap;
use std::io::Write;

use detect::detection::Format;
use detect::{Detection, Precision};
use tensorfile::TensorSource;

use crate::{
    Backend, BackendOptions, ConversionReport, Job, PlannedConversion, SmartError, Unencodable,
};

/// The `bnb` crate's quantizer and dequantizer.
#[derive(Debug, Clone, Copy, Default)]
pub struct BnbBackend;

/// Bump when the bytes written for some target change.
const VERSION: &str = "bnb-1";

impl Backend for BnbBackend {
    fn supports(&self, source: &Detection, target: Precision) -> bool {
        if source.format != Format::Safetensors {
            return false;
        }
        if source.bitsandbytes.is_some() {
            target.dequantization_dtype().is_some()
        } else {
            source.supported_as_source && target.is_bitsandbytes()
        }
    }

    fn converter_version(&self, target: Precision, options: &BackendOptions) -> String {
        // Double quantization changes the bytes of 4-bit outputs only.
        if options.double_quant && matches!(target, Precision::Nf4 | Precision::Fp4) {
            // v2: quant-state JSON exactly json.dumps (no padding), offsets printed as Python does.
            format!("{VERSION}+double_quant-2")
        } else {
            VERSION.to_string()
        }
    }

    fn plan(&self, job: &Job<'_>) -> Result<Box<dyn PlannedConversion>, SmartError> {
        let source = job
            .open_safetensors()
            .map_err(|e| SmartError::backend(::bnb::BnbError::from(e)))?;
        let plan = if job.source.bitsandbytes.is_some() {
            ::bnb::plan_dequantize_file(&*source, job.target)
        } else {
            let options = ::bnb::Options {
                double_quant: job.options.double_quant,
            };
            ::bnb::plan(&*source, job.target, &options).and_then(|mut plan| {
                // Exact `json.dumps` quant states: the nested offsets are computed before the
                // header.
                ::bnb::resolve_nested_offsets(&*source, &mut plan)?;
                Ok(plan)
            })
        }
        .map_err(SmartError::backend)?;
        let metadata = precision::convert::merged_metadata(source.metadata(), job.extra_metadata);
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
    source: Box<dyn TensorSource>,
    plan: ::bnb::Plan,
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
        let report = ::bnb::convert(&*self.source, &self.plan, &self.metadata, out, progress)
            .map_err(SmartError::backend)?;
        Ok(ConversionReport::Bitsandbytes(report))
    }
}
