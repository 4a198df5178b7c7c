//! Errors of the comfyquant converter.

use std::io;
use std::path::{Path, PathBuf};

use detect::Precision;
use tensorfile::SourceError;

/// Why a plan or a conversion failed. Every message names the source file.
#[derive(Debug, thiserror::Error)]
pub enum ComfyQuantError {
    /// The target is not one of ComfyUI's quantized layouts.
    #[error(
        "{}: cannot convert to {target}: the comfyquant converter writes fp8_scaled, nvfp4 and \
         mxfp8",
        path.display()
    )]
    UnsupportedTarget {
        /// The source file.
        path: PathBuf,
        /// The requested precision.
        target: Precision,
    },
    /// A tensor the converter cannot write (bad input).
    #[error("{}: tensor `{tensor}`: {problem}", path.display())]
    Tensor {
        /// The source file.
        path: PathBuf,
        /// The tensor's name (escaped).
        tensor: String,
        /// What is wrong.
        problem: String,
    },
    /// Reading the source failed, it changed, or it cannot be served (the message names it).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Writing the output failed.
    #[error("{}: writing the converted output failed: {source}", path.display())]
    Write {
        /// The source file (the output is a writer, which has no path).
        path: PathBuf,
        /// The write error.
        source: io::Error,
    },
    /// The plan was not made from this source, or its steps do not add up to its tensors (a
    /// caller's or planner's mistake, never a property of the data).
    #[error("{}: the conversion plan does not match this file: {detail}", path.display())]
    PlanMismatch {
        /// The source file.
        path: PathBuf,
        /// What differs.
        detail: String,
    },
}

impl ComfyQuantError {
    /// Whether the input is at fault (a source or target the converter refuses, or a source
    /// that changed) rather than reading, writing or a plan mismatch.
    pub fn is_input_fault(&self) -> bool {
        match self {
            ComfyQuantError::UnsupportedTarget { .. } | ComfyQuantError::Tensor { .. } => true,
            ComfyQuantError::Source(e) => e.is_input_fault(),
            ComfyQuantError::Write { .. } | ComfyQuantError::PlanMismatch { .. } => false,
        }
    }

    pub(crate) fn tensor(path: &Path, name: &str, problem: impl Into<String>) -> Self {
        ComfyQuantError::Tensor {
            path: path.to_owned(),
            tensor: name.escape_debug().to_string(),
            problem: problem.into(),
        }
    }

    pub(crate) fn mismatch(path: &Path, detail: impl Into<String>) -> Self {
        ComfyQuantError::PlanMismatch {
            path: path.to_owned(),
            detail: detail.into(),
        }
    }
}
