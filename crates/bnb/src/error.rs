//! Errors of the bitsandbytes converter.

use std::io;
use std::path::{Path, PathBuf};

use detect::Precision;
use tensorfile::SourceError;

/// Why a bitsandbytes plan or conversion failed.
///
/// Errors about a file carry its path (`Display`: "PATH: problem"); errors found while planning
/// from a header alone name the tensor instead.
#[derive(Debug, thiserror::Error)]
pub enum BnbError {
    /// The target is not one this crate produces (quantize: nf4, fp4, int8; dequantize: fp16,
    /// bf16, fp32).
    #[error("target {target} is not a bitsandbytes {what} target")]
    UnsupportedTarget {
        /// The requested precision.
        target: Precision,
        /// "quantization" or "dequantization".
        what: &'static str,
    },
    /// A tensor the plan cannot handle.
    #[error("tensor `{tensor}`: {problem}")]
    Tensor {
        /// The tensor's key (escaped).
        tensor: String,
        /// What is wrong.
        problem: String,
    },
    /// A quant-state JSON blob was refused.
    #[error("quant state: {problem}")]
    QuantState {
        /// What is wrong.
        problem: String,
    },
    /// A problem in a specific file.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The problem.
        #[source]
        source: Box<BnbError>,
    },
    /// Reading the source failed, or it changed after it was opened, or it cannot be served
    /// (the message names the file).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Writing the output failed.
    #[error("writing the output: {0}")]
    Io(#[from] io::Error),
    /// The plan does not belong to this source (its tensors differ).
    #[error("the plan was made for another file: {0}")]
    PlanMismatch(String),
}

impl BnbError {
    /// Whether the fault is in the input (the source file, its layout, the requested target)
    /// rather than in reading or writing files.
    pub fn is_input_fault(&self) -> bool {
        match self {
            BnbError::UnsupportedTarget { .. }
            | BnbError::Tensor { .. }
            | BnbError::QuantState { .. } => true,
            BnbError::File { source, .. } => source.is_input_fault(),
            BnbError::Source(e) => e.is_input_fault(),
            // A plan handed another source is the caller's mistake, not the file's.
            BnbError::Io(_) | BnbError::PlanMismatch(_) => false,
        }
    }

    pub(crate) fn tensor(name: &str, problem: impl Into<String>) -> Self {
        BnbError::Tensor {
            tensor: name.escape_debug().to_string(),
            problem: problem.into(),
        }
    }

    /// Wraps the error with the file it is about (once; source errors name it already, and an
    /// unsupported target is about the request, not the file).
    pub(crate) fn in_file(self, path: &Path) -> Self {
        match self {
            e @ (BnbError::File { .. }
            | BnbError::Source(_)
            | BnbError::UnsupportedTarget { .. }) => e,
            e => BnbError::File {
                path: path.to_owned(),
                source: Box::new(e),
            },
        }
    }
}
