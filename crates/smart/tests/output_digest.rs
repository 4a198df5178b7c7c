//! The output record: a published output whose data changed is never served.
//!
//! Each test converts a small model, then damages, touches or un-records the output and checks
//! what the lookup says and what `smart_convert` does.

#![allow(clippy::unwrap_used)] // test code: a failed setup step should fail the test loudly

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use cache::{
    Cache, LookupOptions, LookupStatus, ModelsDir, OutputRecord, digest, output_record_path,
    read_output_record, use_stamp_path,
};
use detect::Precision;
use smart::{CheckStatus, Options, Status, check, smart_convert};
use tensorfile::safetensors::Dtype;
use tensorfile::{SafetensorsWriter, TensorSpec};

/// A small f32 model: one 2-D weight and a 1-D bias with values from `seed`.
fn write_model(path: &Path, seed: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let specs = vec![
        TensorSpec {
            name: "double_blocks.0.img_attn.qkv.weight".into(),
            dtype: Dtype::F32,
            shape: vec![64, 32],
        },
        TensorSpec {
            name: "double_blocks.0.img_attn.qkv.bias".into(),
            dtype: Dtype::F32,
            shape: vec![64],
        },
    ];
    let f = File::create(path).unwrap();
    let mut w = SafetensorsWriter::new(f, &specs, &BTreeMap::new()).unwrap();
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    for spec in &specs {
        let mut bytes = Vec::new();
        for _ in 0..spec.shape.iter().product::<u64>() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = (x as f32 / u32::MAX as f32) * 4.0 - 2.0;
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        w.write_chunk(&bytes).unwrap();
    }
    w.finish().unwrap();
}

struct Env {
    _tmp: tempfile::TempDir,
    src: PathBuf,
    models: ModelsDir,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("checkpoints/flux.safetensors");
        write_model(&src, 7);
        let models = ModelsDir::at(tmp.path().join("models"));
        Env {
            _tmp: tmp,
            src,
            models,
        }
    }

    fn options(&self) -> Options<'static> {
        Options::new(self.models.clone())
    }

    fn convert(&self, options: &Options<'_>) -> smart::Outcome {
        smart_convert(&self.src, Precision::Bf16, options).unwrap()
    }

    fn lookup(&self, options: &LookupOptions) -> cache::Lookup {
        Cache::new(self.models.clone())
            .lookup(&self.src, Precision::Bf16, options)
            .unwrap()
    }

    fn check(&self, options: &Options<'_>) -> smart::Check {
        check(&self.src, &[Precision::Bf16], options)
            .unwrap()
            .remove(0)
    }
}

fn mtime(p: &Path) -> SystemTime {
    fs::metadata(p).unwrap().modified().unwrap()
}

fn set_mtime(p: &Path, t: SystemTime) {
    File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// Flips the low bit of one byte in the middle of the output's tensor data, in place.
fn flip_data_byte(p: &Path) {
    let mut f = File::options().read(true).write(true).open(p).unwrap();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).unwrap();
    let data_start = 8 + u64::from_le_bytes(len);
    let size = f.metadata().unwrap().len();
    assert!(size > data_start + 2, "the output has tensor data");
    let at = data_start + (size - data_start) / 2;
    let mut b = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 1]).unwrap();
}

fn broken_reason(status: &LookupStatus) -> &str {
    match status {
        LookupStatus::Broken(r) => r,
        other => panic!("expected broken, got {other:?}"),
    }
}

#[test]
fn publish_records_the_outputs_size_mtime_and_digest() {
    let e = Env::new();
    let o = e.convert(&e.options());
    assert_eq!(o.status, Status::Converted);
    let rec = read_output_record(&o.path).unwrap().unwrap();
    assert_eq!(rec.digest, digest::digest_file(&o.path).unwrap());
    assert_eq!(rec.algorithm, digest::ALGORITHM);
    assert_eq!(rec.size, fs::metadata(&o.path).unwrap().len());
    assert_eq!(
        rec,
        OutputRecord::of_file(&o.path, rec.digest.clone()).unwrap()
    );
    // Published in the past, so a write in the same clock tick still changes the mtime.
    assert!(mtime(&o.path) < SystemTime::now() - Duration::from_millis(500));
    let json: serde_json::Value =
        serde_json::from_slice(&fs::read(output_record_path(&o.path)).unwrap()).unwrap();
    for key in ["size", "mtime_ns", "digest", "algorithm"] {
        assert!(json.get(key).is_some(), "{key} in {json}");
    }
    assert!(o.note.is_none());
}

#[test]
fn flipped_tensor_byte_is_broken_and_reconverted_to_the_clean_bytes() {
    let e = Env::new();
    let o = e.convert(&e.options());
    let clean = fs::read(&o.path).unwrap();
    flip_data_byte(&o.path);
    assert_ne!(fs::read(&o.path).unwrap(), clean);
    // Still a complete bf16 file with intact provenance: only the output record tells.
    assert_eq!(
        cache::examine(&o.path).unwrap().defect_for(Precision::Bf16),
        None
    );

    let l = e.lookup(&LookupOptions::default());
    assert_eq!(l.path, o.path);
    assert!(
        broken_reason(&l.status).contains("output data changed since it was published"),
        "{:?}",
        l.status
    );
    let c = e.check(&e.options());
    assert_eq!(c.status, CheckStatus::Broken);
    assert!(!c.valid);

    let again = e.convert(&e.options());
    assert_eq!(again.status, Status::Converted);
    assert_eq!(again.path, o.path);
    assert!(
        again
            .replaced
            .as_deref()
            .is_some_and(|r| r.contains("output data changed")),
        "{:?}",
        again.replaced
    );
    assert_eq!(
        fs::read(&again.path).unwrap(),
        clean,
        "identical to a clean conversion"
    );
    let served = e.convert(&e.options());
    assert_eq!(served.status, Status::Cached);
    assert!(served.note.is_none());
}

#[test]
fn flip_with_the_mtime_restored_is_caught_only_by_verify_digest() {
    let e = Env::new();
    let o = e.convert(&e.options());
    let clean = fs::read(&o.path).unwrap();
    let published = mtime(&o.path);
    flip_data_byte(&o.path);
    set_mtime(&o.path, published);

    // Size and mtime match the record: trusted without hashing (the documented gap).
    assert_eq!(
        e.lookup(&LookupOptions::default()).status,
        LookupStatus::Hit
    );
    assert_eq!(e.convert(&e.options()).status, Status::Cached);

    let verify = LookupOptions {
        verify_digest: true,
        ..LookupOptions::default()
    };
    assert!(broken_reason(&e.lookup(&verify).status).contains("output data changed"));
    let mut paranoid = e.options();
    paranoid.verify_digest = true;
    let again = e.convert(&paranoid);
    assert_eq!(again.status, Status::Converted);
    assert_eq!(fs::read(&again.path).unwrap(), clean);
    assert_eq!(e.convert(&paranoid).status, Status::Cached);
}

#[test]
fn a_hit_hashes_neither_source_nor_output_and_rewrites_no_record() {
    let e = Env::new();
    let o = e.convert(&e.options());
    let record = output_record_path(&o.path);
    let (bytes, stamp) = (fs::read(&record).unwrap(), mtime(&record));

    let before = digest::files_hashed_on_this_thread();
    let l = e.lookup(&LookupOptions::default());
    assert_eq!(l.status, LookupStatus::Hit);
    assert!(l.note.is_none());
    assert_eq!(e.convert(&e.options()).status, Status::Cached);
    assert_eq!(digest::files_hashed_on_this_thread(), before, "no hashing");
    assert_eq!(fs::read(&record).unwrap(), bytes);
    assert_eq!(mtime(&record), stamp);

    // verify_digest hashes both the source and the output.
    let verify = LookupOptions {
        verify_digest: true,
        ..LookupOptions::default()
    };
    assert_eq!(e.lookup(&verify).status, LookupStatus::Hit);
    assert_eq!(digest::files_hashed_on_this_thread(), before + 2);
}

#[test]
fn touched_output_with_the_same_bytes_is_a_hit_and_its_record_is_refreshed() {
    let e = Env::new();
    let o = e.convert(&e.options());
    let old = read_output_record(&o.path).unwrap().unwrap();
    set_mtime(&o.path, SystemTime::now());

    let before = digest::files_hashed_on_this_thread();
    let l = e.lookup(&LookupOptions::default());
    assert_eq!(l.status, LookupStatus::Hit);
    assert_eq!(digest::files_hashed_on_this_thread(), before + 1);
    // The answer is used (a lookup alone writes nothing).
    Cache::new(e.models.clone()).record_hit(&l);
    let new = read_output_record(&o.path).unwrap().unwrap();
    assert_eq!(new.digest, old.digest);
    assert_ne!(new.mtime_ns, old.mtime_ns);
    assert_eq!(
        new,
        OutputRecord::of_file(&o.path, old.digest.clone()).unwrap()
    );
    // O(1) again.
    assert_eq!(
        e.lookup(&LookupOptions::default()).status,
        LookupStatus::Hit
    );
    assert_eq!(digest::files_hashed_on_this_thread(), before + 1);
}

#[test]
fn missing_or_malformed_record_is_a_noted_hit_and_reconverted_when_strict() {
    let e = Env::new();
    let o = e.convert(&e.options());
    let record = output_record_path(&o.path);
    fs::remove_file(&record).unwrap();

    let l = e.lookup(&LookupOptions::default());
    assert_eq!(l.status, LookupStatus::Hit);
    assert!(
        l.note
            .as_deref()
            .is_some_and(|n| n.contains("no output record")),
        "{:?}",
        l.note
    );
    let c = e.check(&e.options());
    assert_eq!(c.status, CheckStatus::Hit);
    assert!(c.reason.is_some());
    let served = e.convert(&e.options());
    assert_eq!(served.status, Status::Cached);
    assert!(served.note.is_some());
    assert!(serde_json::to_value(&served).unwrap()["note"].is_string());

    let mut strict = e.options();
    strict.strict = true;
    let again = e.convert(&strict);
    assert_eq!(again.status, Status::Converted);
    assert!(again.replaced.as_deref().unwrap().contains("strict"));
    assert!(read_output_record(&o.path).unwrap().is_some());
    let served = e.convert(&strict);
    assert_eq!(served.status, Status::Cached);
    assert!(served.note.is_none());

    fs::write(&record, b"{\"size\": 1").unwrap();
    let l = e.lookup(&LookupOptions::default());
    assert_eq!(l.status, LookupStatus::Hit);
    assert!(
        l.note.as_deref().unwrap().contains("malformed"),
        "{:?}",
        l.note
    );
    assert_eq!(e.convert(&strict).status, Status::Converted);
    assert!(read_output_record(&o.path).unwrap().is_some());
}

#[test]
fn record_of_other_bytes_never_serves_a_file() {
    // What a crash between writing the record and the rename would leave: the record of the
    // next output beside the previous file.
    let e = Env::new();
    let o = e.convert(&e.options());
    let mut other = OutputRecord {
        digest: "0123456789abcdef0123456789abcdef".into(),
        ..read_output_record(&o.path).unwrap().unwrap()
    };
    other.mtime_ns += 1;
    cache::write_output_record(&o.path, &other).unwrap();
    assert!(broken_reason(&e.lookup(&LookupOptions::default()).status).contains("changed"));
    assert_eq!(e.convert(&e.options()).status, Status::Converted);
    assert_eq!(e.convert(&e.options()).status, Status::Cached);
}

#[test]
fn cleanup_and_eviction_remove_the_record_with_its_output() {
    let e = Env::new();
    let a = e.convert(&e.options()).path;
    let b = smart_convert(&e.src, Precision::Fp16, &e.options())
        .unwrap()
        .path;
    let cache = Cache::new(e.models.clone());
    for p in [&a, &b] {
        assert!(output_record_path(p).is_file());
    }
    let removed = cache.cleanup(&e.src, 1, false).unwrap();
    assert_eq!(removed.len(), 1);
    let gone = &removed[0].path;
    let kept = if *gone == a { &b } else { &a };
    assert!(!gone.exists());
    assert!(!output_record_path(gone).exists());
    assert!(!use_stamp_path(gone).exists());
    assert!(output_record_path(kept).is_file());

    let ev = cache.evict_to(0, false).unwrap();
    assert_eq!(ev.removed.len(), 1);
    assert!(!kept.exists());
    assert!(!output_record_path(kept).exists());
    let state = fs::read_dir(a.parent().unwrap().join(cache::STATE_DIR)).unwrap();
    let left: Vec<String> = state
        .flatten()
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `sync_output: false` (`--no-fsync`): the same bytes are published, the record carries this
/// boot's id, a hit in this boot hashes nothing; in another boot (simulated by rewriting the
/// id) an intact output is verified once and re-recorded as durable, a torn one is reconverted.
#[test]
fn an_output_published_without_fsync_is_reverified_after_a_restart() {
    let Some(boot) = cache::current_boot_id() else {
        // Without a boot id outputs are always synced: the record has no mark.
        let e = Env::new();
        let mut options = e.options();
        options.sync_output = false;
        let o = e.convert(&options);
        let rec = read_output_record(&o.path).unwrap().unwrap();
        assert_eq!(rec.unsynced_boot_id, None);
        return;
    };
    let e = Env::new();
    let synced = e.convert(&e.options());
    let synced_bytes = fs::read(&synced.path).unwrap();
    fs::remove_file(&synced.path).unwrap();

    let mut options = e.options();
    options.sync_output = false;
    let o = e.convert(&options);
    assert_eq!(o.status, Status::Converted);
    assert!(fs::read(&o.path).unwrap() == synced_bytes, "the same bytes");
    let rec = read_output_record(&o.path).unwrap().unwrap();
    assert_eq!(rec.unsynced_boot_id.as_deref(), Some(boot.as_str()));
    assert_eq!(rec.digest, digest::digest_file(&o.path).unwrap());

    // This boot: a hit without hashing; the first one syncs the output and drops the mark.
    let before = digest::files_hashed_on_this_thread();
    assert_eq!(e.convert(&e.options()).status, Status::Cached);
    assert_eq!(digest::files_hashed_on_this_thread(), before);
    let settled = read_output_record(&o.path).unwrap().unwrap();
    assert_eq!(settled.unsynced_boot_id, None);
    assert_eq!(settled.digest, rec.digest);

    // "After a restart", data intact: hashed once, then durable.
    let restarted = OutputRecord {
        unsynced_boot_id: Some("a-previous-boot".into()),
        ..rec.clone()
    };
    cache::write_output_record(&o.path, &restarted).unwrap();
    let before = digest::files_hashed_on_this_thread();
    assert_eq!(e.convert(&e.options()).status, Status::Cached);
    assert_eq!(digest::files_hashed_on_this_thread(), before + 1);
    assert_eq!(
        read_output_record(&o.path)
            .unwrap()
            .unwrap()
            .unsynced_boot_id,
        None
    );
    let before = digest::files_hashed_on_this_thread();
    assert_eq!(e.convert(&e.options()).status, Status::Cached);
    assert_eq!(digest::files_hashed_on_this_thread(), before);

    // "After a restart", data lost in the crash (same size and mtime, zeroed pages): reconverted.
    cache::write_output_record(&o.path, &restarted).unwrap();
    let published = mtime(&o.path);
    let mut torn = fs::read(&o.path).unwrap();
    let n = torn.len();
    torn[n / 2..].fill(0);
    fs::write(&o.path, &torn).unwrap();
    set_mtime(&o.path, published);
    let l = e.lookup(&LookupOptions::default());
    assert!(broken_reason(&l.status).contains("restart"));
    let again = e.convert(&e.options());
    assert_eq!(again.status, Status::Converted);
    assert!(
        fs::read(&again.path).unwrap() == synced_bytes,
        "the clean bytes again"
    );
    assert_eq!(
        read_output_record(&again.path)
            .unwrap()
            .unwrap()
            .unsynced_boot_id,
        None
    );
}
