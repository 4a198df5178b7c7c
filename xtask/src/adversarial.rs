//! The adversarial corpus on disk: the hostile files `detect` must refuse, each with the error
//! kind it must be refused with.
//!
//! The cases themselves are built by `detect::corpus` (shared with detect's tests, which assert
//! every expected error), so the files written here are exactly the ones the tests check.

use std::fs;
use std::io;
use std::path::Path;

use detect::corpus::{self, Content};

/// Name of the manifest mapping each case to its expected `DetectError::kind`.
pub const MANIFEST: &str = "expected.json";

/// Written inside the directory case so that it survives in git (which drops empty directories).
const DIRECTORY_NOTE: &str = "README.txt";

/// Writes every corpus case into `dir` (created if missing), plus [`MANIFEST`]. Returns the
/// relative paths of the files written, in a fixed order; the directory case appears as the
/// note file inside it. Deterministic: the same bytes on every run and machine.
pub fn write_corpus(dir: &Path) -> io::Result<Vec<String>> {
    fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let mut manifest = serde_json::Map::new();
    for case in corpus::cases() {
        let path = dir.join(case.name);
        match &case.content {
            Content::File(bytes) => {
                if path.is_dir() {
                    fs::remove_dir_all(&path)?;
                }
                fs::write(&path, bytes)?;
                written.push(case.name.to_owned());
            }
            Content::Directory => {
                if path.is_file() {
                    fs::remove_file(&path)?;
                }
                fs::create_dir_all(&path)?;
                fs::write(
                    path.join(DIRECTORY_NOTE),
                    "This directory is an adversarial case: detect must refuse a directory.\n",
                )?;
                written.push(format!("{}/{DIRECTORY_NOTE}", case.name));
            }
        }
        manifest.insert(
            case.name.to_owned(),
            serde_json::json!({ "expected": case.expected, "detail": case.detail }),
        );
    }
    let mut json = serde_json::to_string_pretty(&serde_json::Value::Object(manifest))
        .map_err(io::Error::other)?;
    json.push('\n');
    fs::write(dir.join(MANIFEST), json)?;
    written.push(MANIFEST.to_owned());
    Ok(written)
}
