//! Resume: a conversion cancelled part-way keeps its temporary and journal, and the next
//! conversion of the same pair continues it and publishes the bytes of an uninterrupted one;
//! a journal or temporary that does not check out is never trusted.

#![allow(clippy::unwrap_used)] // test code: a failed setup step should fail the test loudly

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cache::ModelsDir;
use cache::journal::{journal_path, read_journal, write_journal};
use detect::Precision;
use smart::{Observer, Options, Pair, SmartError, Stage, Status, smart_convert};
use tensorfile::safetensors::Dtype;
use tensorfile::{SafetensorsWriter, TensorSpec};

/// A Flux-like f32 model with many pieces for every converter: small attention weights, and
/// one 6M-element weight that bitsandbytes quantizes in two windows (state carried between
/// them) and GGUF in two chunks.
fn write_model(path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut specs = Vec::new();
    for i in 0..6 {
        for (name, shape) in [
            ("img_attn.proj.weight", vec![256, 256]),
            ("img_attn.qkv.weight", vec![768, 256]),
            ("img_attn.qkv.bias", vec![768]),
        ] {
            specs.push(TensorSpec {
                name: format!("double_blocks.{i}.{name}"),
                dtype: Dtype::F32,
                shape,
            });
        }
    }
    specs.push(TensorSpec {
        name: "double_blocks.0.img_mlp.0.weight".into(),
        dtype: Dtype::F32,
        shape: vec![1536, 4096],
    });
    let mut w =
        SafetensorsWriter::new(File::create(path).unwrap(), &specs, &BTreeMap::new()).unwrap();
    let mut x = 0x9e37_79b9u32;
    for spec in &specs {
        let n: u64 = spec.shape.iter().product();
        let mut bytes = Vec::with_capacity(n as usize * 4);
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = (x as f32 / u32::MAX as f32) * 0.2 - 0.1;
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        w.write_chunk(&bytes).unwrap();
    }
    w.finish().unwrap();
}

/// Sets the cancel flag once the conversion has converted `fraction` of the source.
struct CancelAt {
    fraction: f64,
    flag: Arc<AtomicBool>,
}

impl Observer for CancelAt {
    fn bytes(&self, _pair: Pair<'_>, stage: Stage, done: u64, total: u64) {
        if stage == Stage::Converting && done as f64 >= self.fraction * total as f64 && done > 0 {
            self.flag.store(true, Ordering::Relaxed);
        }
    }
}

struct Env {
    tmp: tempfile::TempDir,
    src: PathBuf,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("checkpoints/flux.safetensors");
        write_model(&src);
        Env { tmp, src }
    }

    fn models(&self, name: &str) -> ModelsDir {
        ModelsDir::at(self.tmp.path().join(name))
    }

    /// Options that checkpoint at every boundary.
    fn options(&self, models: &str) -> Options<'static> {
        let mut o = Options::new(self.models(models));
        o.checkpoint_every = Duration::ZERO;
        o
    }

    fn convert(&self, models: &str, target: Precision) -> smart::Outcome {
        smart_convert(&self.src, target, &self.options(models)).unwrap()
    }

    /// Converts, cancelling at `fraction`; returns the output path the cancelled run was for.
    fn cancel_at(&self, models: &str, target: Precision, fraction: f64) -> PathBuf {
        let flag = Arc::new(AtomicBool::new(false));
        let observer = CancelAt {
            fraction,
            flag: flag.clone(),
        };
        let mut o = self.options(models);
        o.cancel = Some(flag);
        o.observer = Some(&observer);
        match smart_convert(&self.src, target, &o) {
            Err(SmartError::Cancelled(out)) => out,
            other => panic!("{target:?} at {fraction}: not cancelled: {other:?}"),
        }
    }
}

/// The temporary a cancelled conversion of `out` left, per its journal.
fn kept_temporary(out: &Path) -> PathBuf {
    let journal = read_journal(out).expect("a journal is kept after a cancel");
    let tmp = out.with_file_name(&journal.temporary);
    assert!(tmp.is_file(), "the journaled temporary is kept");
    assert!(fs::metadata(&tmp).unwrap().len() >= journal.checkpoint.offset);
    tmp
}

const TARGETS: [&str; 4] = ["fp16", "Q4_K_M", "nf4", "fp8_scaled"];

#[test]
fn a_cancelled_conversion_resumes_to_the_bytes_of_a_clean_one() {
    let env = Env::new();
    for target in TARGETS {
        let target: Precision = target.parse().unwrap();
        let clean = env.convert("clean", target);
        assert_eq!(clean.status, Status::Converted);
        assert_eq!(clean.resumed_from, None);
        let clean_bytes = fs::read(&clean.path).unwrap();
        for (i, fraction) in [0.3, 0.8].into_iter().enumerate() {
            let models = format!("m-{}-{i}", target.canonical_name());
            let out = env.cancel_at(&models, target, fraction);
            assert!(!out.exists(), "a cancelled conversion publishes nothing");
            kept_temporary(&out);
            let resumed = env.convert(&models, target);
            assert_eq!(resumed.status, Status::Converted);
            let from = resumed
                .resumed_from
                .unwrap_or_else(|| panic!("{target:?} at {fraction}: the rerun did not resume"));
            assert!(from > 0 && from < clean_bytes.len() as u64);
            assert!(
                fs::read(&resumed.path).unwrap() == clean_bytes,
                "{target:?} at {fraction}: the resumed output differs from a clean conversion"
            );
            assert!(!journal_path(&out).exists(), "the journal goes at publish");
            assert_only_the_output(&out);
            // And the resumed output is an ordinary cache hit.
            assert_eq!(env.convert(&models, target).status, Status::Cached);
        }
    }
}

/// Nothing but the output and the state folder is left in its directory.
fn assert_only_the_output(out: &Path) {
    let dir = out.parent().unwrap();
    let left: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".convcache" && Some(n.as_str()) != out.file_name().unwrap().to_str())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Cancels a conversion, applies `lie` to what it left, and checks the rerun starts over and
/// publishes the clean bytes.
fn lie_is_not_trusted(target: &str, lie: impl Fn(&Path, &Path)) {
    let env = Env::new();
    let target: Precision = target.parse().unwrap();
    let clean = fs::read(env.convert("clean", target).path).unwrap();
    let out = env.cancel_at("m", target, 0.6);
    let tmp = kept_temporary(&out);
    lie(&out, &tmp);
    let rerun = env.convert("m", target);
    assert_eq!(rerun.status, Status::Converted);
    assert_eq!(
        rerun.resumed_from, None,
        "a journal that lies is never trusted"
    );
    assert!(fs::read(&rerun.path).unwrap() == clean);
    assert_only_the_output(&out);
}

#[test]
fn a_flipped_byte_in_the_temporary_is_not_trusted() {
    lie_is_not_trusted("Q4_K_M", |out, tmp| {
        let offset = read_journal(out).unwrap().checkpoint.offset;
        let mut bytes = fs::read(tmp).unwrap();
        bytes[(offset / 2) as usize] ^= 1;
        fs::write(tmp, bytes).unwrap();
    });
}

#[test]
fn a_truncated_temporary_is_not_trusted() {
    lie_is_not_trusted("fp16", |out, tmp| {
        let offset = read_journal(out).unwrap().checkpoint.offset;
        File::options()
            .write(true)
            .open(tmp)
            .unwrap()
            .set_len(offset - 1)
            .unwrap();
    });
}

#[test]
fn a_journal_with_a_wrong_digest_or_another_identity_is_not_trusted() {
    lie_is_not_trusted("nf4", |out, _| {
        let mut j = read_journal(out).unwrap();
        j.checkpoint.digest = "0".repeat(32);
        write_journal(out, &j, false).unwrap();
    });
    lie_is_not_trusted("Q4_K_M", |out, _| {
        let mut j = read_journal(out).unwrap();
        j.identity.converter_version.push_str("-old");
        write_journal(out, &j, false).unwrap();
    });
    lie_is_not_trusted("fp16", |out, _| {
        // A later checkpoint than the bytes hashed: the digest no longer covers them.
        let mut j = read_journal(out).unwrap();
        j.checkpoint.offset -= 1;
        write_journal(out, &j, false).unwrap();
    });
}

#[test]
fn a_header_other_than_the_conversion_would_write_is_not_trusted_even_with_a_matching_digest() {
    for target in ["fp16", "Q4_K_M"] {
        lie_is_not_trusted(target, |out, tmp| {
            // A consistent lie: a header byte changed and the journal's digest made to match,
            // as a converter whose header changed without a version bump would leave it.
            let mut j = read_journal(out).unwrap();
            let mut bytes = fs::read(tmp).unwrap();
            bytes[24] ^= 0x20;
            fs::write(tmp, &bytes).unwrap();
            j.checkpoint.digest =
                cache::digest::digest_bytes(&bytes[..j.checkpoint.offset as usize]);
            write_journal(out, &j, false).unwrap();
        });
    }
}

#[test]
fn a_changed_source_is_converted_from_the_start() {
    let env = Env::new();
    let target: Precision = "Q4_K_M".parse().unwrap();
    let out = env.cancel_at("m", target, 0.6);
    kept_temporary(&out);
    // Same bytes, a new mtime: the journal's source identity no longer holds.
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    File::options()
        .write(true)
        .open(&env.src)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let rerun = env.convert("m", target);
    assert_eq!(rerun.status, Status::Converted);
    assert_eq!(rerun.resumed_from, None);
    assert_only_the_output(&out);
}

#[test]
fn no_resume_starts_over_and_removes_the_interrupted_temporary() {
    let env = Env::new();
    let target: Precision = "nf4".parse().unwrap();
    let clean = fs::read(env.convert("clean", target).path).unwrap();
    let out = env.cancel_at("m", target, 0.6);
    kept_temporary(&out);
    let mut o = env.options("m");
    o.resume = false;
    let rerun = smart_convert(&env.src, target, &o).unwrap();
    assert_eq!(rerun.resumed_from, None);
    assert!(fs::read(&rerun.path).unwrap() == clean);
    assert_only_the_output(&out);
}
