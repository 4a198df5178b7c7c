//! Detection. (Filled by the detect work.)
use std::path::{Path, PathBuf};

/// What [`detect`] found.
#[derive(Debug, Clone)]
pub struct Detection {
    pub path: PathBuf,
}

/// Why a file could not be detected.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Detects `path`'s format and precision from its header.
pub fn detect(path: &Path) -> Result<Detection, DetectError> {
    Ok(Detection {
        path: path.to_owned(),
    })
}
