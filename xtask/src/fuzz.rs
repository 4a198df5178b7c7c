//! `cargo xtask fuzz`: runs each cargo-fuzz target for a fixed time, seeded from `fixtures/`.
//!
//! Works on a stable-only machine: `-s none` avoids the nightly-only sanitizer flags, and the
//! remaining `-Z` flags cargo-fuzz passes are allowed with `RUSTC_BOOTSTRAP=1` when no nightly
//! toolchain is the default.

use std::fs;
use std::path::Path;
use std::process::{Command, ExitCode};

use crate::{DynResult, fixtures, repo_root};

/// Seed files above this size are left out of the corpus: libFuzzer's default `-max_len` is
/// 4096 and large seeds only slow it down.
const MAX_SEED_BYTES: u64 = 64 * 1024;

/// The `[[bin]]` names of `fuzz/Cargo.toml`.
pub fn list_targets(manifest: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
            continue;
        }
        if in_bin
            && let Some(rest) = line.strip_prefix("name")
            && let Some(value) = rest.trim_start().strip_prefix('=')
        {
            targets.push(value.trim().trim_matches('"').to_string());
        }
    }
    targets
}

fn has_cargo_fuzz() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Which files seed which target: safetensors files for the header fuzzer, GGUF files for the
/// GGUF reader, and the adversarial corpus (small hostile files) for both. They go into the
/// gitignored working corpus `fuzz/corpus-tmp/TARGET`, where libFuzzer also writes what it
/// finds; the small committed corpus `fuzz/corpus/TARGET` is read alongside, never written.
fn seed_corpus(root: &Path, target: &str) -> DynResult<usize> {
    let corpus = root.join("fuzz/corpus-tmp").join(target);
    fs::create_dir_all(&corpus)?;
    let wanted_ext = if target.contains("gguf") {
        "gguf"
    } else {
        "safetensors"
    };
    let mut n = 0;
    for (name, bytes) in fixtures::fuzz_seeds()? {
        if name.ends_with(wanted_ext) {
            fs::write(corpus.join(name), bytes)?;
            n += 1;
        }
    }
    for dir in [root.join("fixtures"), root.join("fixtures/adversarial")] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let adversarial = dir.ends_with("adversarial");
            let ext_ok = path.extension().is_some_and(|e| e == wanted_ext);
            if meta.is_file()
                && meta.len() <= MAX_SEED_BYTES
                && (ext_ok || adversarial)
                && let Some(name) = path.file_name()
            {
                fs::copy(&path, corpus.join(name))?;
                n += 1;
            }
        }
    }
    Ok(n)
}

pub fn run(seconds: u64, requested: &[String]) -> DynResult<ExitCode> {
    let root = repo_root();
    let fuzz_dir = root.join("fuzz");
    let manifest = fs::read_to_string(fuzz_dir.join("Cargo.toml"))
        .map_err(|e| format!("{}: {e}", fuzz_dir.join("Cargo.toml").display()))?;
    let all = list_targets(&manifest);
    let targets: Vec<String> = if requested.is_empty() {
        all.clone()
    } else {
        for t in requested {
            if !all.contains(t) {
                return Err(format!("unknown fuzz target `{t}` (have: {})", all.join(", ")).into());
            }
        }
        requested.to_vec()
    };

    if !has_cargo_fuzz() {
        eprintln!("installing cargo-fuzz (cargo install cargo-fuzz --locked)");
        let st = Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked"])
            .status()?;
        if !st.success() {
            return Err("cargo install cargo-fuzz failed".into());
        }
    }

    let mut failed = Vec::new();
    for target in &targets {
        let seeds = seed_corpus(&root, target)?;
        eprintln!("fuzzing {target} for {seconds} s ({seeds} seed files)");
        let st = Command::new("cargo")
            .current_dir(&root)
            // cargo-fuzz passes a few `-Z` flags even without a sanitizer; this lets the stable
            // compiler accept them.
            .env("RUSTC_BOOTSTRAP", "1")
            .args([
                "fuzz",
                "run",
                "--fuzz-dir",
                "fuzz",
                "-s",
                "none",
                target,
                &format!("fuzz/corpus-tmp/{target}"),
                &format!("fuzz/corpus/{target}"),
                "--",
                &format!("-max_total_time={seconds}"),
            ])
            .status()?;
        if !st.success() {
            failed.push(target.clone());
        }
    }
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "fuzz targets that failed (crash artifacts under fuzz/artifacts/): {}",
            failed.join(", ")
        );
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_bin_names_only() {
        let m = "[package]\nname = \"convcache-fuzz\"\n\n[[bin]]\nname = \"a\"\npath = \"x\"\n\n\
                 [dependencies]\nname = \"nope\"\n[[bin]]\nname = \"b\"\n";
        assert_eq!(list_targets(m), vec!["a".to_string(), "b".to_string()]);
    }
}
