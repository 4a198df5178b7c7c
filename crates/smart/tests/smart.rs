//! The three stages end to end, in process, on small safetensors models in temporary dirs.

#![allow(clippy::unwrap_used)] // test code: a failed setup step should fail the test loudly

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use cache::{ModelsDir, Provenance, digest};
use detect::{Detection, Precision};
use smart::backends::PrecisionBackend;
use smart::{
    Backend, BackendOptions, ConversionReport, Job, Observer, Options, Outcome, Pair,
    PlannedConversion, SmartError, Stage, Status, smart_convert, smart_convert_with,
};
use tensorfile::safetensors::Dtype;
use tensorfile::{SafetensorsWriter, TensorSpec};

/// Writes a small flux-like model: one 2-D weight and a 1-D bias, `dtype` floats from `seed`.
fn write_model(path: &Path, dtype: Dtype, seed: u32, rows: u64) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let specs = vec![
        TensorSpec {
            name: "double_blocks.0.img_attn.qkv.weight".into(),
            dtype,
            shape: vec![rows, 32],
        },
        TensorSpec {
            name: "double_blocks.0.img_attn.qkv.bias".into(),
            dtype,
            shape: vec![rows],
        },
    ];
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let f = fs::File::create(path).unwrap();
    let mut w = SafetensorsWriter::new(f, &specs, &meta).unwrap();
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    for spec in &specs {
        let n = spec.shape.iter().product::<u64>();
        let mut bytes = Vec::new();
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = (x as f32 / u32::MAX as f32) * 4.0 - 2.0;
            match dtype {
                Dtype::F32 => bytes.extend_from_slice(&v.to_le_bytes()),
                Dtype::F16 => bytes.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                Dtype::BF16 => bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                _ => unreachable!("test models are f32/f16/bf16"),
            }
        }
        w.write_chunk(&bytes).unwrap();
    }
    w.finish().unwrap();
}

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    models: ModelsDir,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let models = ModelsDir::at(root.join("models"));
        Env {
            _tmp: tmp,
            root,
            models,
        }
    }

    fn source(&self, rel: &str, seed: u32) -> PathBuf {
        let p = self.root.join(rel);
        write_model(&p, Dtype::F32, seed, 64);
        p
    }

    fn options(&self) -> Options<'static> {
        Options::new(self.models.clone())
    }

    fn converted(&self) -> PathBuf {
        self.models.converted_dir()
    }

    /// Every file in the converted dir (hidden ones included), the state folder excluded.
    fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.converted())
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != cache::STATE_DIR)
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

fn hash(p: &Path) -> String {
    digest::digest_bytes(&fs::read(p).unwrap())
}

fn detected(p: &Path) -> Detection {
    detect::detect(p).unwrap()
}

// ---------- the stages ----------

#[test]
fn source_already_in_target_is_the_answer() {
    let e = Env::new();
    let src = e.root.join("flux_fp16.safetensors");
    write_model(&src, Dtype::F16, 1, 16);
    let before = hash(&src);
    let o = smart_convert(&src, Precision::Fp16, &e.options()).unwrap();
    assert_eq!(o.status, Status::SourceIsTarget);
    assert_eq!(o.path, src);
    assert_eq!(o.source_precision, Some(Precision::Fp16));
    assert!(e.files().is_empty(), "nothing written: {:?}", e.files());
    assert_eq!(hash(&src), before);
}

#[test]
fn converts_then_serves_from_the_cache() {
    let e = Env::new();
    let src = e.source("checkpoints/flux_fp32.safetensors", 1);
    let before = hash(&src);
    let o = smart_convert(&src, Precision::Bf16, &e.options()).unwrap();
    assert_eq!(o.status, Status::Converted);
    assert_eq!(o.path, e.converted().join("flux_bf16.safetensors"));
    assert_eq!(o.source_precision, Some(Precision::Fp32));
    let report = serde_json::to_value(o.report.clone().unwrap()).unwrap();
    assert_eq!(report["target"], "bf16");
    let d = detected(&o.path);
    assert_eq!(d.precision, Some(Precision::Bf16));
    let prov = Provenance::from_metadata(&d.metadata).unwrap();
    assert_eq!(prov.source_digest, digest::digest_file(&src).unwrap());
    assert_eq!(prov.target, Precision::Bf16);
    assert_eq!(d.metadata["format"], "pt", "the source's metadata is kept");
    assert_eq!(e.files(), vec!["flux_bf16.safetensors"]);
    let json = serde_json::to_value(&o).unwrap();
    assert_eq!(json["status"], "converted");
    assert_eq!(json["target"], "bf16");
    assert_eq!(json["source_precision"], "fp32");

    let output_bytes = hash(&o.path);
    let again = smart_convert(&src, Precision::Bf16, &e.options()).unwrap();
    assert_eq!(again.status, Status::Cached);
    assert_eq!(again.path, o.path);
    assert!(again.report.is_none());
    assert_eq!(hash(&o.path), output_bytes, "a hit rewrites nothing");
    assert_eq!(hash(&src), before);
}

/// A bytes event as an [`Observer`] saw it, with the tensors finished before it.
#[derive(Debug, Clone, Copy)]
struct Progress {
    phase: Stage,
    bytes_done: u64,
    bytes_total: u64,
    tensors_done: u64,
    tensors_total: u64,
}

/// Records every event of one pair.
#[derive(Default)]
struct Recorder {
    stages: Mutex<Vec<Stage>>,
    progress: Mutex<Vec<Progress>>,
    /// Tensor events: (index, count).
    tensors: Mutex<Vec<(u64, u64)>>,
    finished: Mutex<Vec<Result<Status, String>>>,
}

impl Observer for Recorder {
    fn stage(&self, _: Pair<'_>, stage: Stage) {
        self.stages.lock().unwrap().push(stage);
    }

    fn bytes(&self, _: Pair<'_>, stage: Stage, done: u64, total: u64) {
        let (tensors_done, tensors_total) = match self.tensors.lock().unwrap().last() {
            Some(&(i, n)) if stage == Stage::Converting => (i + 1, n),
            _ => (0, 0),
        };
        self.progress.lock().unwrap().push(Progress {
            phase: stage,
            bytes_done: done,
            bytes_total: total,
            tensors_done,
            tensors_total,
        });
    }

    fn tensor(&self, _: Pair<'_>, index: u64, count: u64) {
        self.tensors.lock().unwrap().push((index, count));
    }

    fn finished(&self, _: Pair<'_>, result: Result<&Outcome, &SmartError>) {
        let r = result.map(|o| o.status).map_err(|e| e.to_string());
        self.finished.lock().unwrap().push(r);
    }
}

#[test]
fn progress_reaches_the_totals() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    let recorder = Recorder::default();
    let mut options = e.options();
    options.observer = Some(&recorder);
    smart_convert(&src, Precision::Fp16, &options).unwrap();
    let seen = recorder.progress.into_inner().unwrap();
    let conv: Vec<_> = seen
        .iter()
        .filter(|p| p.phase == Stage::Converting)
        .collect();
    let last = conv.last().unwrap();
    assert_eq!(last.bytes_done, last.bytes_total);
    assert_eq!(last.tensors_done, 2);
    assert_eq!(last.tensors_total, 2);
    assert_eq!(last.bytes_total, 64 * 32 * 4 + 64 * 4);
    assert!(conv.windows(2).all(|w| w[0].bytes_done <= w[1].bytes_done));
    // The precision converter reads the source once: its digest is computed in that pass, with
    // no hashing phase before it.
    assert!(!seen.iter().any(|p| p.phase == Stage::Hashing));
}

#[test]
fn the_observer_sees_every_stage_and_tensor_in_order_then_the_answer() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    for (target, stages) in [
        (
            Precision::Fp16,
            &[
                Stage::Planning,
                Stage::Converting,
                Stage::Verifying,
                Stage::Publishing,
            ][..],
        ),
        // bitsandbytes hashes the source in a pass of its own.
        (
            Precision::Nf4,
            &[
                Stage::Planning,
                Stage::Hashing,
                Stage::Converting,
                Stage::Verifying,
                Stage::Publishing,
            ],
        ),
    ] {
        let recorder = Recorder::default();
        let mut options = e.options();
        options.observer = Some(&recorder);
        smart_convert(&src, target, &options).unwrap();
        assert_eq!(*recorder.stages.lock().unwrap(), stages, "{target}");
        assert_eq!(
            *recorder.tensors.lock().unwrap(),
            [(0, 2), (1, 2)],
            "each tensor once, in order"
        );
        let progress = recorder.progress.into_inner().unwrap();
        for stage in [Stage::Hashing, Stage::Converting] {
            let of_stage: Vec<_> = progress.iter().filter(|p| p.phase == stage).collect();
            assert!(
                of_stage
                    .windows(2)
                    .all(|w| w[0].bytes_done <= w[1].bytes_done),
                "{target} {stage:?}: bytes went back"
            );
            if let Some(last) = of_stage.last() {
                assert_eq!(last.bytes_done, last.bytes_total, "{target} {stage:?}");
            }
        }
        assert_eq!(
            *recorder.finished.lock().unwrap(),
            [Ok(Status::Converted)],
            "{target}"
        );

        // A hit: planning, then the answer.
        let recorder = Recorder::default();
        let mut options = e.options();
        options.observer = Some(&recorder);
        smart_convert(&src, target, &options).unwrap();
        assert_eq!(*recorder.stages.lock().unwrap(), [Stage::Planning]);
        assert_eq!(
            *recorder.finished.lock().unwrap(),
            [Ok(Status::Cached)],
            "{target}"
        );
    }
}

/// The provenance digest computed during the conversion (a placeholder in the header, patched
/// after the data) is the source's digest, and the output record's digest is that of the
/// patched file: the output is a hit, and stays one when only the source's mtime changes.
#[test]
fn the_digest_computed_in_the_conversion_pass_is_the_source_digest() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    for target in [Precision::Fp16, Precision::Bf16, Precision::Fp8E4m3fn] {
        let o = smart_convert(&src, target, &e.options()).unwrap();
        assert_eq!(o.status, Status::Converted);
        let ex = cache::examine(&o.path).unwrap();
        let prov = ex.provenance.expect("provenance");
        assert_eq!(
            prov.source_digest,
            cache::digest::digest_file(&src).unwrap()
        );
        let record = cache::read_output_record(&o.path)
            .unwrap()
            .expect("a record");
        assert_eq!(record.digest, cache::digest::digest_file(&o.path).unwrap());
        let mut options = e.options();
        options.verify_digest = true;
        let again = smart_convert(&src, target, &options).unwrap();
        assert_eq!(again.status, Status::Cached, "{target}");
    }
    // Touching the source (same bytes) keeps the outputs valid: the digests agree.
    let f = fs::File::options().write(true).open(&src).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    drop(f);
    let again = smart_convert(&src, Precision::Fp16, &e.options()).unwrap();
    assert_eq!(again.status, Status::Cached);
}

/// ComfyUI's quantized targets hash a plain source while converting it, too: the provenance
/// digest is the source's, and the tensors are those of the same conversion without a hasher
/// (16-bit and f32 weights, padded and unpadded rows).
#[test]
fn comfy_targets_hash_the_source_in_the_conversion_pass() {
    let e = Env::new();
    for (dtype, rows) in [(Dtype::BF16, 64), (Dtype::F16, 40), (Dtype::F32, 40)] {
        let src = e.root.join(format!("flux_{dtype}_{rows}.safetensors"));
        write_model(&src, dtype, 7, rows);
        for target in [Precision::Fp8Scaled, Precision::Nvfp4, Precision::Mxfp8] {
            let o = smart_convert(&src, target, &e.options()).unwrap();
            assert_eq!(o.status, Status::Converted);
            let prov = cache::examine(&o.path)
                .unwrap()
                .provenance
                .expect("provenance");
            assert_eq!(
                prov.source_digest,
                digest::digest_file(&src).unwrap(),
                "{dtype} {target}"
            );
            let file = tensorfile::SafetensorsFile::open(&src).unwrap();
            let plan = comfyquant::plan(&file, target).unwrap();
            let mut plain = Vec::new();
            comfyquant::convert(&file, &plan, &BTreeMap::new(), &mut plain, &mut |_, _| {})
                .unwrap();
            let plain_path = e.root.join("plain.safetensors");
            fs::write(&plain_path, &plain).unwrap();
            let (a, b) = (
                tensorfile::SafetensorsFile::open(&o.path).unwrap(),
                tensorfile::SafetensorsFile::open(&plain_path).unwrap(),
            );
            assert!(plan.quantized() > 0, "{dtype} {target}: nothing quantized");
            assert_eq!(a.header.tensors.len(), b.header.tensors.len());
            for t in &b.header.tensors {
                assert!(
                    a.tensor(&t.name).unwrap().1 == b.tensor(&t.name).unwrap().1,
                    "{dtype} {target} {}",
                    t.name
                );
            }
        }
    }
}

#[test]
fn modified_source_is_reconverted_in_place() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    let first = smart_convert(&src, Precision::Fp16, &e.options()).unwrap();
    let first_bytes = hash(&first.path);
    // Other values and another size.
    write_model(&src, Dtype::F32, 2, 96);
    let before = hash(&src);
    let o = smart_convert(&src, Precision::Fp16, &e.options()).unwrap();
    assert_eq!(o.status, Status::Converted);
    assert_eq!(o.path, first.path);
    assert!(o.replaced.as_deref().unwrap().starts_with("stale"));
    assert_ne!(hash(&o.path), first_bytes);
    let prov = Provenance::from_metadata(&detected(&o.path).metadata).unwrap();
    assert_eq!(prov.source_digest, digest::digest_file(&src).unwrap());
    assert_eq!(e.files(), vec!["flux_fp16.safetensors"]);
    assert_eq!(hash(&src), before);
}

#[test]
fn same_basename_from_two_folders_gets_two_outputs() {
    let e = Env::new();
    let a = e.source("one/flux.safetensors", 1);
    let b = e.source("two/flux.safetensors", 2);
    let oa = smart_convert(&a, Precision::Bf16, &e.options()).unwrap();
    let ob = smart_convert(&b, Precision::Bf16, &e.options()).unwrap();
    assert_eq!(
        (oa.status, ob.status),
        (Status::Converted, Status::Converted)
    );
    assert_ne!(oa.path, ob.path);
    let short = &digest::digest_file(&b).unwrap()[..8];
    assert_eq!(
        ob.path,
        e.converted().join(format!("flux-{short}_bf16.safetensors"))
    );
    let oa2 = smart_convert(&a, Precision::Bf16, &e.options()).unwrap();
    let ob2 = smart_convert(&b, Precision::Bf16, &e.options()).unwrap();
    assert_eq!((oa2.status, &oa2.path), (Status::Cached, &oa.path));
    assert_eq!((ob2.status, &ob2.path), (Status::Cached, &ob.path));
}

#[test]
fn foreign_file_is_used_unverified_or_converted_beside_when_strict() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    let foreign = e.converted().join("flux_bf16.safetensors");
    write_model(&foreign, Dtype::BF16, 7, 16);
    let foreign_bytes = hash(&foreign);
    let o = smart_convert(&src, Precision::Bf16, &e.options()).unwrap();
    assert_eq!((o.status, &o.path), (Status::CachedUnverified, &foreign));

    let mut strict = e.options();
    strict.strict = true;
    let o = smart_convert(&src, Precision::Bf16, &strict).unwrap();
    assert_eq!(o.status, Status::Converted);
    assert_ne!(o.path, foreign, "another tool's file is never replaced");
    assert!(
        o.note.as_deref().unwrap_or("").contains("left in place"),
        "{o:?}"
    );
    assert!(Provenance::from_metadata(&detected(&o.path).metadata).is_some());
    assert_eq!(hash(&foreign), foreign_bytes);
    let again = smart_convert(&src, Precision::Bf16, &strict).unwrap();
    assert_eq!((again.status, &again.path), (Status::Cached, &o.path));
}

#[test]
fn corrupted_cache_files_are_reconverted_never_served() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    let good = smart_convert(&src, Precision::Fp16, &e.options()).unwrap();
    let good_bytes = fs::read(&good.path).unwrap();
    type Corrupt<'a> = Box<dyn Fn(&Path) + 'a>;
    let corruptions: Vec<(&str, Corrupt)> = vec![
        (
            "truncated",
            Box::new(|p: &Path| fs::write(p, &good_bytes[..good_bytes.len() - 10]).unwrap()),
        ),
        (
            "header flipped",
            Box::new(|p: &Path| {
                let mut b = good_bytes.clone();
                b[8] ^= 0x55;
                fs::write(p, b).unwrap()
            }),
        ),
    ];
    for (what, corrupt) in corruptions {
        corrupt(&good.path);
        let o = smart_convert(&src, Precision::Fp16, &e.options()).unwrap();
        assert_eq!(o.status, Status::Converted, "{what}");
        assert!(
            o.replaced.as_deref().unwrap().starts_with("broken"),
            "{what}"
        );
        assert_eq!(fs::read(&o.path).unwrap(), good_bytes, "{what}");
    }
    // Another model written over the output (no provenance, not the recorded size) is
    // somebody's file now: never served, never replaced; the conversion goes beside it.
    write_model(&good.path, Dtype::BF16, 1, 64);
    let theirs = hash(&good.path);
    let o = smart_convert(&src, Precision::Fp16, &e.options()).unwrap();
    assert_eq!(o.status, Status::Converted);
    assert_ne!(o.path, good.path);
    assert_eq!(o.replaced, None);
    assert!(
        o.note.as_deref().unwrap_or("").contains("another tool"),
        "{o:?}"
    );
    assert_eq!(hash(&good.path), theirs);
}

#[test]
fn temporaries_of_dead_writers_are_removed() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    let out = e.converted().join("flux_fp16.safetensors");
    fs::create_dir_all(e.converted()).unwrap();
    // As left by a process killed mid-write (pids far above any pid_max).
    let dead = cache::temp_path(&out, 4_000_000_001);
    let other = cache::temp_path(&e.converted().join("other_bf16.safetensors"), 4_000_000_002);
    fs::write(&dead, b"partial").unwrap();
    fs::write(&other, b"partial").unwrap();
    let o = smart_convert(&src, Precision::Fp16, &e.options()).unwrap();
    assert_eq!(o.status, Status::Converted);
    assert_eq!(e.files(), vec!["flux_fp16.safetensors"]);

    // A cache hit also clears leftovers of a killed writer (of any output in the dir).
    fs::write(&dead, b"partial").unwrap();
    let o = smart_convert(&src, Precision::Fp16, &e.options()).unwrap();
    assert_eq!(o.status, Status::Cached);
    assert_eq!(e.files(), vec!["flux_fp16.safetensors"]);
}

#[test]
fn unsupported_target_is_a_clear_error() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    // A bitsandbytes file only dequantizes to fp32/fp16/bf16; nothing makes fp8 of it.
    let nf4 = smart_convert(&src, Precision::Nf4, &e.options())
        .unwrap()
        .path;
    let err = smart_convert(&nf4, Precision::Fp8E4m3fn, &e.options()).unwrap_err();
    assert!(matches!(err, SmartError::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("flux_nf4.safetensors"), "{err}");
}

#[test]
fn a_source_at_its_own_cache_path_is_never_overwritten() {
    let e = Env::new();
    // An f32 file misnamed as the bf16 output of itself: a file convcache did not make, so
    // the conversion goes beside it.
    let src = e.converted().join("flux_bf16.safetensors");
    write_model(&src, Dtype::F32, 1, 64);
    let before = hash(&src);
    let o = smart_convert(&src, Precision::Bf16, &e.options()).unwrap();
    assert_eq!(o.status, Status::Converted);
    assert_ne!(o.path, src);
    assert_eq!(hash(&src), before);
}

#[test]
fn bitsandbytes_targets_go_through_the_bnb_backend() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    let o = smart_convert(&src, Precision::Nf4, &e.options()).unwrap();
    assert_eq!(o.status, Status::Converted);
    assert_eq!(o.path, e.converted().join("flux_nf4.safetensors"));
    assert_eq!(detected(&o.path).precision, Some(Precision::Nf4));
    assert_eq!(
        smart_convert(&src, Precision::Nf4, &e.options())
            .unwrap()
            .status,
        Status::Cached
    );
    // Double quantization writes other bytes: the earlier output is stale for it.
    let mut dq = e.options();
    dq.double_quant = true;
    let o = smart_convert(&src, Precision::Nf4, &dq).unwrap();
    assert_eq!(o.status, Status::Converted);
    assert_eq!(
        smart_convert(&src, Precision::Nf4, &dq).unwrap().status,
        Status::Cached
    );
}

// ---------- failures: nothing published, no temporary left ----------

/// How the test backend misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// The writer fails after half the output.
    FailMidway,
    /// The header's first JSON byte is corrupted.
    CorruptHeader,
    /// Claims an output too large for any disk.
    Huge,
    /// Claims a tiny output and writes the real one.
    UnderReport,
}

/// The precision backend with injected faults, counting conversions.
struct TestBackend {
    fault: Fault,
    writes: Arc<AtomicUsize>,
}

impl TestBackend {
    fn new(fault: Fault) -> TestBackend {
        TestBackend {
            fault,
            writes: Arc::new(AtomicUsize::new(0)),
        }
    }
}

struct TestPlanned {
    inner: Box<dyn PlannedConversion>,
    fault: Fault,
    writes: Arc<AtomicUsize>,
}

/// Passes bytes through, failing after `fail_after` or patching byte 8.
struct FaultyWriter<'a> {
    inner: &'a mut dyn Write,
    pos: u64,
    fail_after: Option<u64>,
    corrupt_byte_8: bool,
}

impl Write for FaultyWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(limit) = self.fail_after
            && self.pos + buf.len() as u64 > limit
        {
            return Err(io::Error::other("injected failure"));
        }
        let mut b = buf.to_vec();
        if self.corrupt_byte_8 && self.pos <= 8 && self.pos + b.len() as u64 > 8 {
            b[(8 - self.pos) as usize] = b'x';
        }
        self.inner.write_all(&b)?;
        self.pos += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl PlannedConversion for TestPlanned {
    fn output_len(&self) -> u64 {
        match self.fault {
            Fault::Huge => u64::MAX / 4,
            Fault::UnderReport => 1,
            _ => self.inner.output_len(),
        }
    }
    fn totals(&self) -> (u64, u64) {
        self.inner.totals()
    }
    fn write(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ConversionReport, SmartError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        let mut w = FaultyWriter {
            inner: out,
            pos: 0,
            fail_after: (self.fault == Fault::FailMidway).then(|| self.inner.output_len() / 2),
            corrupt_byte_8: self.fault == Fault::CorruptHeader,
        };
        self.inner.write(&mut w, progress)
    }
}

impl Backend for TestBackend {
    fn supports(&self, source: &Detection, target: Precision) -> bool {
        PrecisionBackend.supports(source, target)
    }
    fn converter_version(&self, target: Precision, options: &BackendOptions) -> String {
        PrecisionBackend.converter_version(target, options)
    }
    fn plan(&self, job: &Job<'_>) -> Result<Box<dyn PlannedConversion>, SmartError> {
        Ok(Box::new(TestPlanned {
            inner: PrecisionBackend.plan(job)?,
            fault: self.fault,
            writes: self.writes.clone(),
        }))
    }
}

fn writes_of(b: &TestBackend) -> usize {
    b.writes.load(Ordering::SeqCst)
}

fn assert_nothing_published(e: &Env, src: &Path, before: &str) {
    assert_eq!(e.files(), Vec::<String>::new(), "no output, no temporary");
    assert_eq!(hash(src), before);
}

#[test]
fn writer_error_midway_leaves_nothing() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    let before = hash(&src);
    let b = TestBackend::new(Fault::FailMidway);
    let err = smart_convert_with(&src, Precision::Fp16, &e.options(), &[&b]).unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert_eq!(writes_of(&b), 1);
    assert_nothing_published(&e, &src, &before);
    // The next run converts normally.
    let o = smart_convert(&src, Precision::Fp16, &e.options()).unwrap();
    assert_eq!(o.status, Status::Converted);
}

#[test]
fn converter_errors_keep_their_kind() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    let b = TestBackend::new(Fault::FailMidway);
    let err = smart_convert_with(&src, Precision::Fp16, &e.options(), &[&b]).unwrap_err();
    assert!(
        matches!(
            err,
            SmartError::Backend {
                input_fault: false,
                ..
            }
        ),
        "{err}"
    );
    assert!(!err.is_input_fault(), "{err}");
    // The two-tensor test model names no architecture: the input's fault.
    let err = smart_convert(&src, "Q8_0".parse().unwrap(), &e.options()).unwrap_err();
    assert!(err.is_input_fault(), "{err}");
    assert!(err.to_string().contains("flux.safetensors"), "{err}");
}

#[test]
fn output_failing_verification_is_not_published() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    let before = hash(&src);
    let b = TestBackend::new(Fault::CorruptHeader);
    let err = smart_convert_with(&src, Precision::Fp16, &e.options(), &[&b]).unwrap_err();
    assert!(matches!(err, SmartError::Verify { .. }), "{err}");
    assert_nothing_published(&e, &src, &before);
}

#[test]
fn not_enough_space_fails_before_writing() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    let before = hash(&src);
    let b = TestBackend::new(Fault::Huge);
    let err = smart_convert_with(&src, Precision::Fp16, &e.options(), &[&b]).unwrap_err();
    assert!(matches!(err, SmartError::NoSpace { .. }), "{err}");
    assert!(err.to_string().contains("flux_fp16.safetensors"), "{err}");
    assert_eq!(writes_of(&b), 0);
    assert_nothing_published(&e, &src, &before);
}

#[test]
fn a_call_made_after_cancelling_does_nothing() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    let before = hash(&src);
    let mut options = e.options();
    options.cancel = Some(Arc::new(AtomicBool::new(true)));
    let err = smart_convert(&src, Precision::Fp16, &options).unwrap_err();
    assert!(matches!(err, SmartError::Cancelled(_)), "{err}");
    assert!(err.is_cancelled());
    assert_nothing_published(&e, &src, &before);
}

/// Converts `src` to `target` with a cancel flag that the progress callback sets at the first
/// report of `phase` (an interrupt arriving then); returns the error.
fn cancel_during(e: &Env, src: &Path, target: Precision, phase: Stage) -> SmartError {
    /// Sets the flag at the first bytes event of its stage.
    struct CancelAt(Stage, Arc<AtomicBool>);
    impl Observer for CancelAt {
        fn bytes(&self, _: Pair<'_>, stage: Stage, _: u64, _: u64) {
            if stage == self.0 {
                self.1.store(true, Ordering::SeqCst);
            }
        }
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let on_progress = CancelAt(phase, cancel.clone());
    let mut options = Options::new(e.models.clone());
    options.cancel = Some(cancel.clone());
    options.observer = Some(&on_progress);
    let err = smart_convert(src, target, &options).unwrap_err();
    assert!(
        cancel.load(Ordering::SeqCst),
        "the phase was never reported"
    );
    err
}

#[test]
fn cancelling_mid_conversion_removes_the_temporary_and_publishes_nothing() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    let before = hash(&src);
    let err = cancel_during(&e, &src, Precision::Fp16, Stage::Converting);
    assert!(matches!(err, SmartError::Cancelled(_)), "{err}");
    assert!(err.to_string().contains("nothing was published"), "{err}");
    assert_nothing_published(&e, &src, &before);
    // Nothing was left half-done: the next run converts.
    let o = smart_convert(&src, Precision::Fp16, &e.options()).unwrap();
    assert_eq!(o.status, Status::Converted);
}

#[test]
fn cancelling_while_hashing_the_source_stops_before_converting() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    let before = hash(&src);
    // bitsandbytes conversions hash the source in a pass of their own, before converting.
    let err = cancel_during(&e, &src, Precision::Nf4, Stage::Hashing);
    // Stopped by the hashing pass itself, not by the first write after it.
    assert!(
        matches!(&err, SmartError::Cache(cache::CacheError::Cancelled(p)) if *p == src),
        "{err}"
    );
    assert!(err.is_cancelled());
    assert!(err.to_string().contains("flux.safetensors"), "{err}");
    assert_nothing_published(&e, &src, &before);
}

#[test]
fn cancelling_while_another_process_holds_the_lock_returns_at_once() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    let before = hash(&src);
    let out = e.converted().join("flux_fp16.safetensors");
    fs::create_dir_all(e.converted()).unwrap();
    // Another writer of the same output holds its lock for as long as this test runs.
    let _held = cache::OutputSlot::acquire(&out, None).unwrap();
    let cancel = Arc::new(AtomicBool::new(false));
    let waiting = {
        let (cancel, src, models) = (cancel.clone(), src.clone(), e.models.clone());
        std::thread::spawn(move || {
            let mut options = Options::new(models);
            options.cancel = Some(cancel);
            smart_convert(&src, Precision::Fp16, &options)
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(!waiting.is_finished(), "it must wait for the lock");
    cancel.store(true, Ordering::SeqCst);
    let err = waiting.join().unwrap().unwrap_err();
    assert!(
        matches!(&err, SmartError::Cancelled(p) if *p == out),
        "{err}"
    );
    assert_nothing_published(&e, &src, &before);
}

/// Runs `name` (a test of this file) in a child process with `CONVCACHE_TEST_CHILD` set, and
/// returns whether it passed. Used where the test changes process-wide state (rlimits).
///
/// The child's output is piped, never inherited: under a file-size limit, writing to an inherited
/// stdout that is a large log file would fail with EFBIG too.
fn run_child(name: &str) -> bool {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", name, "--test-threads=1", "--nocapture"])
        .env("CONVCACHE_TEST_CHILD", "1")
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "child {name} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

#[test]
fn file_size_limit_is_reported_and_nothing_published() {
    if std::env::var_os("CONVCACHE_TEST_CHILD").is_none() {
        assert!(run_child(
            "file_size_limit_is_reported_and_nothing_published"
        ));
        return;
    }
    // Child: a 4 KiB file-size limit, SIGXFSZ ignored so writes fail with EFBIG.
    smart::ignore_file_size_signal();
    let lim = libc::rlimit {
        rlim_cur: 4096,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass; this child process runs only this test.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) }, 0);
    let e = Env::new();
    let src = e.root.join("flux.safetensors");
    {
        // The source itself must be written before the limit matters: 64x32 f32 is 8 KiB.
        let lim_off = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim_off) }, 0);
        write_model(&src, Dtype::F32, 1, 64);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) }, 0);
    }
    let before = hash(&src);

    // Known up front: refused before writing.
    let err = smart_convert(&src, Precision::Fp16, &e.options()).unwrap_err();
    assert!(matches!(err, SmartError::FileSizeLimit { .. }), "{err}");
    assert_nothing_published(&e, &src, &before);

    // Discovered while writing (EFBIG): a clear no-space error.
    let b = TestBackend::new(Fault::UnderReport);
    let err = smart_convert_with(&src, Precision::Fp16, &e.options(), &[&b]).unwrap_err();
    assert!(matches!(err, SmartError::DiskFull { .. }), "{err}");
    assert!(err.to_string().contains("flux_fp16.safetensors"), "{err}");
    assert_nothing_published(&e, &src, &before);
}

// ---------- concurrency ----------

#[test]
fn threads_racing_convert_once_and_agree_on_the_path() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    let before = hash(&src);
    let b = TestBackend::new(Fault::None);
    let n = 6;
    let barrier = Barrier::new(n);
    let outcomes: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    let options = e.options();
                    barrier.wait();
                    smart_convert_with(&src, Precision::Bf16, &options, &[&b]).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(writes_of(&b), 1, "converted exactly once");
    let converted = outcomes
        .iter()
        .filter(|o| o.status == Status::Converted)
        .count();
    assert_eq!(converted, 1);
    assert!(outcomes.iter().all(|o| o.path == outcomes[0].path));
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o.status, Status::Converted | Status::Cached))
    );
    assert_eq!(e.files(), vec!["flux_bf16.safetensors"]);
    assert_eq!(hash(&src), before);
}

#[test]
fn check_agrees_with_what_convert_would_do() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    smart_convert(&src, Precision::Fp16, &e.options()).unwrap();
    smart_convert(&src, Precision::Nf4, &e.options()).unwrap();
    let targets = [
        Precision::Fp32,
        Precision::Fp16,
        Precision::Bf16,
        Precision::Nf4,
    ];
    let c = smart::check(&src, &targets, &e.options()).unwrap();
    let got: Vec<_> = c.iter().map(|c| (c.status, c.valid, c.exists)).collect();
    use smart::CheckStatus as S;
    assert_eq!(
        got,
        vec![
            (S::SourceIsTarget, true, true),
            (S::Hit, true, true),
            (S::Missing, false, false),
            (S::Hit, true, true),
        ]
    );
    assert_eq!(c[0].path, src);
    // Another converter setting (double quantization) makes the nf4 output stale.
    let mut dq = e.options();
    dq.double_quant = true;
    let c = smart::check(&src, &[Precision::Nf4], &dq).unwrap();
    assert_eq!(c[0].status, S::Stale);
    assert!(c[0].reason.as_deref().unwrap().contains("converter"));
    let json = serde_json::to_value(&c[0]).unwrap();
    assert_eq!(json["status"], "stale");
    assert_eq!(json["target"], "nf4");
    // The source changed: stale.
    write_model(&src, Dtype::F32, 3, 80);
    let c = smart::check(&src, &[Precision::Fp16], &e.options()).unwrap();
    assert_eq!(c[0].status, S::Stale);
    // check converts nothing.
    assert_eq!(
        e.files(),
        vec!["flux_fp16.safetensors", "flux_nf4.safetensors"]
    );
}

#[test]
fn non_utf8_source_names_convert_and_hit() {
    use std::os::unix::ffi::OsStrExt;
    let e = Env::new();
    let name = std::ffi::OsStr::from_bytes(b"fl\xffux_fp32.safetensors");
    let src = e.root.join(name);
    write_model(&src, Dtype::F32, 1, 16);
    let o = smart_convert(&src, Precision::Fp16, &e.options()).unwrap();
    assert_eq!(o.status, Status::Converted);
    assert_eq!(o.path, e.converted().join("fl\u{fffd}ux_fp16.safetensors"));
    let o = smart_convert(&src, Precision::Fp16, &e.options()).unwrap();
    assert_eq!(o.status, Status::Cached);
}

#[test]
fn same_size_rewrite_with_mtime_restored_needs_verify_digest() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    let first = smart_convert(&src, Precision::Fp16, &e.options()).unwrap();
    let first_bytes = hash(&first.path);
    let mtime = fs::metadata(&src).unwrap().modified().unwrap();
    // Same shapes, other values: same size. Then the old mtime is put back.
    write_model(&src, Dtype::F32, 9, 64);
    fs::File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    // Size and mtime match the provenance: the default lookup trusts them (documented).
    let o = smart_convert(&src, Precision::Fp16, &e.options()).unwrap();
    assert_eq!(o.status, Status::Cached);
    // verify_digest hashes the source and sees the change.
    let mut paranoid = e.options();
    paranoid.verify_digest = true;
    let o = smart_convert(&src, Precision::Fp16, &paranoid).unwrap();
    assert_eq!(o.status, Status::Converted);
    assert_ne!(hash(&o.path), first_bytes);
    assert_eq!(
        smart_convert(&src, Precision::Fp16, &paranoid)
            .unwrap()
            .status,
        Status::Cached
    );
}

#[test]
fn gguf_targets_go_through_the_default_backends() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    let q8: Precision = "Q8_0".parse().unwrap();
    // The two-tensor test model is not a recognisable architecture: a clear error, nothing
    // published.
    let err = smart_convert(&src, q8, &e.options()).unwrap_err();
    assert!(!matches!(err, SmartError::Unsupported { .. }), "{err}");
    let gguf_files = || -> Vec<std::ffi::OsString> {
        fs::read_dir(e.models.gguf_dir())
            .map(|rd| {
                rd.flatten()
                    .map(|d| d.file_name())
                    .filter(|n| n != cache::STATE_DIR)
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(gguf_files().is_empty(), "{:?}", gguf_files());
    // Forcing the architecture (`--arch flux`) converts, and the result is cached.
    let mut options = e.options();
    options.gguf_arch = Some(gguf::Arch::Flux);
    let o = smart_convert(&src, q8, &options).unwrap();
    assert_eq!(o.status, Status::Converted);
    assert_eq!(o.path, e.models.gguf_dir().join("flux_Q8_0.gguf"));
    assert_eq!(detected(&o.path).precision, Some(q8));
    assert_eq!(
        smart_convert(&src, q8, &options).unwrap().status,
        Status::Cached
    );
    // The forced architecture is part of the converter version: without it, stale.
    let c = smart::check(&src, &[q8], &e.options()).unwrap();
    assert_eq!(c[0].status, smart::CheckStatus::Stale);
}

/// A source whose own metadata is so large that the provenance digest lands past the output's
/// first digest chunk, where the in-pass placeholder cannot be patched: the conversion is
/// redone with the digest the first pass computed, and the result is as valid as any other.
#[test]
fn a_header_too_large_to_patch_falls_back_to_a_known_digest() {
    let e = Env::new();
    let src = e.root.join("in/huge_meta.safetensors");
    fs::create_dir_all(src.parent().unwrap()).unwrap();
    let specs = vec![TensorSpec {
        name: "w".into(),
        dtype: Dtype::F32,
        shape: vec![4, 4],
    }];
    let mut meta = BTreeMap::new();
    // Sorts before `convcache.*`, so it pushes the provenance keys beyond the first 8 MiB.
    meta.insert("aaa".to_string(), "x".repeat(digest::CHUNK_SIZE + 1000));
    let mut w = SafetensorsWriter::new(fs::File::create(&src).unwrap(), &specs, &meta).unwrap();
    w.write_chunk(&[0x3f; 64]).unwrap();
    w.finish().unwrap();
    let o = smart_convert(&src, Precision::Fp16, &e.options()).unwrap();
    assert_eq!(o.status, Status::Converted);
    let prov = cache::examine(&o.path).unwrap().provenance.unwrap();
    assert_eq!(prov.source_digest, digest::digest_file(&src).unwrap());
    let record = cache::read_output_record(&o.path).unwrap().unwrap();
    assert_eq!(record.digest, digest::digest_file(&o.path).unwrap());
    let mut options = e.options();
    options.verify_digest = true;
    assert_eq!(
        smart_convert(&src, Precision::Fp16, &options)
            .unwrap()
            .status,
        Status::Cached
    );
    assert_eq!(e.files(), vec!["huge_meta_fp16.safetensors"]);
}

#[test]
fn a_known_digest_spares_the_next_target_a_pass_over_the_source() {
    let e = Env::new();
    let src = e.source("flux.safetensors", 1);
    let first = smart_convert(&src, Precision::Nf4, &e.options()).unwrap();
    let known = first
        .known_digest
        .clone()
        .expect("a conversion knows the source digest");
    assert_eq!(known.digest, digest::digest_file(&src).unwrap());

    // bitsandbytes hashes the source in a pass of its own, unless the digest is known.
    let mut options = e.options();
    options.known_digest = Some(known.clone());
    let hashed = digest::files_hashed_on_this_thread();
    let second = smart_convert(&src, Precision::Fp4, &options).unwrap();
    assert_eq!(second.status, Status::Converted);
    assert_eq!(digest::files_hashed_on_this_thread(), hashed);
    let prov = Provenance::from_metadata(&detected(&second.path).metadata).unwrap();
    assert_eq!(prov.source_digest, known.digest);
    // A hit hands it on too.
    let hit = smart_convert(&src, Precision::Nf4, &e.options()).unwrap();
    assert_eq!(hit.known_digest, Some(known.clone()));

    // The source changed since: the digest is not used.
    write_model(&src, Dtype::F32, 2, 64);
    let third = smart_convert(&src, Precision::Int8, &options).unwrap();
    let prov = Provenance::from_metadata(&detected(&third.path).metadata).unwrap();
    assert_eq!(prov.source_digest, digest::digest_file(&src).unwrap());
    assert_ne!(prov.source_digest, known.digest);
}
