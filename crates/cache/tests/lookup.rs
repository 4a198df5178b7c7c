//! Lookup, listing, cleanup and eviction against real files in temporary models dirs.
//!
//! Outputs are written here directly (a small safetensors file with provenance), standing in
//! for what `smart` publishes; `smart`'s own tests cover the conversion side.

#![allow(clippy::unwrap_used)] // test code: a failed setup step should fail the test loudly

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use cache::provenance::SourceStat;
use cache::{
    Cache, Kind, LookupOptions, LookupStatus, ModelsDir, OutputSlot, Provenance, RoomRequest,
    digest, use_stamp_path,
};
use detect::Precision;
use tensorfile::safetensors::Dtype;
use tensorfile::{SafetensorsWriter, TensorSpec};

const VERSION: &str = "test-converter/1";

/// Sets the use stamp of `output` to `time`, as a use at that time would have.
fn record_use_at(output: &Path, time: SystemTime) {
    let stamp = use_stamp_path(output);
    fs::create_dir_all(stamp.parent().unwrap()).unwrap();
    fs::File::create(&stamp)
        .unwrap()
        .set_modified(time)
        .unwrap();
}

/// Writes a safetensors file with one 2-D tensor of `dtype` filled with `fill`.
fn write_model(path: &Path, dtype: Dtype, n: u64, fill: u8, meta: &BTreeMap<String, String>) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let spec = TensorSpec {
        name: "w".into(),
        dtype,
        shape: vec![2, n],
    };
    let len = spec.byte_len().unwrap() as usize;
    let f = fs::File::create(path).unwrap();
    let mut w = SafetensorsWriter::new(f, &[spec], meta).unwrap();
    w.write_chunk(&vec![fill; len]).unwrap();
    w.finish().unwrap();
}

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    cache: Cache,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let cache = Cache::new(ModelsDir::at(root.join("models")));
    Env {
        _tmp: tmp,
        root,
        cache,
    }
}

fn source(env: &Env, rel: &str, fill: u8) -> PathBuf {
    let p = env.root.join(rel);
    write_model(&p, Dtype::F32, 8, fill, &BTreeMap::new());
    p
}

/// Writes what a conversion of `src` to `target` would publish at `at`.
fn publish(src: &Path, target: Precision, at: &Path) -> Provenance {
    let prov = Provenance::new(
        &SourceStat::of(src).unwrap(),
        digest::digest_file(src).unwrap(),
        target,
        VERSION,
    );
    let dtype = match target {
        Precision::Fp16 => Dtype::F16,
        Precision::Bf16 => Dtype::BF16,
        Precision::Fp32 => Dtype::F32,
        _ => Dtype::F8E4M3,
    };
    write_model(at, dtype, 8, 1, &prov.to_metadata());
    prov
}

fn opts() -> LookupOptions {
    LookupOptions {
        converter_version: Some(VERSION.into()),
        ..Default::default()
    }
}

fn file_digest(p: &Path) -> String {
    digest::digest_bytes(&fs::read(p).unwrap())
}

fn set_mtime(p: &Path, t: SystemTime) {
    fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[test]
fn missing_then_hit_without_hashing_the_source() {
    let e = env();
    let src = source(&e, "models/checkpoints/flux_fp32.safetensors", 3);
    let before = file_digest(&src);
    let l = e.cache.lookup(&src, Precision::Bf16, &opts()).unwrap();
    assert_eq!(l.status, LookupStatus::Missing);
    let expected = e
        .root
        .join("models/diffusion_models/converted/flux_bf16.safetensors");
    assert_eq!(l.path, expected);

    publish(&src, Precision::Bf16, &l.path);
    let l = e.cache.lookup(&src, Precision::Bf16, &opts()).unwrap();
    assert_eq!(l.status, LookupStatus::Hit);
    assert_eq!(l.path, expected);
    assert!(
        l.source_digest.is_none(),
        "a fast hit does not hash the source"
    );
    assert_eq!(file_digest(&src), before);
}

#[test]
fn source_changed_size_is_stale() {
    let e = env();
    let src = source(&e, "flux.safetensors", 3);
    let out = e.cache.standard_path(&src, Precision::Fp16);
    publish(&src, Precision::Fp16, &out);
    write_model(&src, Dtype::F32, 16, 3, &BTreeMap::new());
    let l = e.cache.lookup(&src, Precision::Fp16, &opts()).unwrap();
    assert!(
        matches!(&l.status, LookupStatus::Stale(r) if r.contains("size")),
        "{:?}",
        l.status
    );
    assert_eq!(l.path, out, "reconverted in place");
}

#[test]
fn same_size_content_change_is_caught_by_mtime_or_by_verify_digest() {
    let e = env();
    let src = source(&e, "flux.safetensors", 3);
    let out = e.cache.standard_path(&src, Precision::Fp16);
    publish(&src, Precision::Fp16, &out);
    let old_mtime = fs::metadata(&src).unwrap().modified().unwrap();

    // Same size, other content, new mtime: the mtime differs, the digest decides: stale.
    write_model(&src, Dtype::F32, 8, 4, &BTreeMap::new());
    set_mtime(&src, old_mtime + Duration::from_secs(5));
    let l = e.cache.lookup(&src, Precision::Fp16, &opts()).unwrap();
    assert!(matches!(l.status, LookupStatus::Stale(_)), "{:?}", l.status);

    // Mtime restored: size and mtime match, which the default lookup trusts (documented
    // limitation); verify_digest hashes and catches it.
    set_mtime(&src, old_mtime);
    let l = e.cache.lookup(&src, Precision::Fp16, &opts()).unwrap();
    assert_eq!(l.status, LookupStatus::Hit);
    let strict_digest = LookupOptions {
        verify_digest: true,
        ..opts()
    };
    let l = e
        .cache
        .lookup(&src, Precision::Fp16, &strict_digest)
        .unwrap();
    assert!(
        matches!(&l.status, LookupStatus::Stale(r) if r.contains("content")),
        "{:?}",
        l.status
    );
}

#[test]
fn touched_or_moved_source_with_same_content_is_a_hit_by_digest() {
    let e = env();
    let src = source(&e, "a/flux.safetensors", 3);
    let out = e.cache.standard_path(&src, Precision::Fp16);
    publish(&src, Precision::Fp16, &out);
    let record = cache::OutputRecord::of_file(&out, file_digest(&out)).unwrap();
    cache::write_output_record(&out, &record).unwrap();
    set_mtime(&src, SystemTime::now() + Duration::from_secs(100));
    let hashed = digest::files_hashed_on_this_thread();
    let l = e.cache.lookup(&src, Precision::Fp16, &opts()).unwrap();
    assert_eq!(l.status, LookupStatus::Hit);
    assert!(l.source_digest.is_some());
    assert_eq!(digest::files_hashed_on_this_thread(), hashed + 1);
    // The answer is used (a lookup alone writes nothing).
    e.cache.record_hit(&l);
    // The facts it was found under are remembered: the next lookups do not hash it again.
    for _ in 0..2 {
        let l = e.cache.lookup(&src, Precision::Fp16, &opts()).unwrap();
        assert_eq!((l.status, &l.path), (LookupStatus::Hit, &out));
    }
    assert_eq!(digest::files_hashed_on_this_thread(), hashed + 1);

    let moved = e.root.join("b/flux.safetensors");
    fs::create_dir_all(moved.parent().unwrap()).unwrap();
    fs::rename(&src, &moved).unwrap();
    let l = e.cache.lookup(&moved, Precision::Fp16, &opts()).unwrap();
    assert_eq!(l.status, LookupStatus::Hit);
    assert_eq!(l.path, out);
    assert_eq!(digest::files_hashed_on_this_thread(), hashed + 2);
    e.cache.record_hit(&l);

    // Remembered again for the new path: no hash.
    let l = e.cache.lookup(&moved, Precision::Fp16, &opts()).unwrap();
    assert_eq!((l.status, &l.path), (LookupStatus::Hit, &out));
    assert_eq!(digest::files_hashed_on_this_thread(), hashed + 2);

    // Remembered facts vouch only for an output naming the digest they were found with: an
    // output of other content published at the path since (its record carrying the facts, as a
    // lookup racing with that publish could leave it) is not a hit for them.
    let other = source(&e, "c/other.safetensors", 11);
    let mut prov = Provenance::new(
        &SourceStat::of(&moved).unwrap(),
        digest::digest_file(&other).unwrap(),
        Precision::Fp16,
        VERSION,
    );
    prov.source_mtime_ns -= 1_000_000_000;
    let remembered = cache::read_output_record(&out)
        .unwrap()
        .unwrap()
        .source_seen;
    assert!(remembered.is_some(), "the facts were remembered");
    write_model(&out, Dtype::F16, 8, 1, &prov.to_metadata());
    let record = cache::OutputRecord {
        source_seen: remembered,
        ..cache::OutputRecord::of_file(&out, file_digest(&out)).unwrap()
    };
    cache::write_output_record(&out, &record).unwrap();
    let l = e.cache.lookup(&moved, Precision::Fp16, &opts()).unwrap();
    assert!(!l.status.is_usable(), "{:?}", l.status);
}

#[test]
fn same_basename_in_two_folders_gets_two_outputs_both_found() {
    let e = env();
    let a = source(&e, "one/flux.safetensors", 3);
    let b = source(&e, "two/flux.safetensors", 9);
    let la = e.cache.lookup(&a, Precision::Bf16, &opts()).unwrap();
    publish(&a, Precision::Bf16, &la.path);

    let lb = e.cache.lookup(&b, Precision::Bf16, &opts()).unwrap();
    assert_eq!(lb.status, LookupStatus::Missing);
    assert_ne!(lb.path, la.path);
    let short = &digest::digest_file(&b).unwrap()[..8];
    assert_eq!(
        lb.path.file_name().unwrap().to_str().unwrap(),
        format!("flux-{short}_bf16.safetensors")
    );
    publish(&b, Precision::Bf16, &lb.path);

    let la2 = e.cache.lookup(&a, Precision::Bf16, &opts()).unwrap();
    let lb2 = e.cache.lookup(&b, Precision::Bf16, &opts()).unwrap();
    assert_eq!((la2.status, &la2.path), (LookupStatus::Hit, &la.path));
    assert_eq!((lb2.status, &lb2.path), (LookupStatus::Hit, &lb.path));
    // Both are listed with their own source.
    let sources: Vec<_> = e
        .cache
        .list(Kind::All)
        .unwrap()
        .into_iter()
        .map(|x| x.source.unwrap())
        .collect();
    assert_eq!(sources.len(), 2);
    assert!(sources.contains(&fs::canonicalize(&a).unwrap()));
    assert!(sources.contains(&fs::canonicalize(&b).unwrap()));
}

#[test]
fn foreign_file_is_unverified_unless_strict_never_in_the_wrong_precision_and_never_replaced() {
    let e = env();
    let src = source(&e, "flux.safetensors", 3);
    let out = e.cache.standard_path(&src, Precision::Fp16);
    write_model(&out, Dtype::F16, 4, 0, &BTreeMap::new());
    let l = e.cache.lookup(&src, Precision::Fp16, &opts()).unwrap();
    assert_eq!((l.status, &l.path), (LookupStatus::Unverified, &out));
    let strict = LookupOptions {
        strict: true,
        ..opts()
    };
    // Not used with --strict, and not replaced either: the conversion gets the
    // digest-suffixed name, and the note says why.
    let l = e.cache.lookup(&src, Precision::Fp16, &strict).unwrap();
    let suffixed = out.with_file_name(format!(
        "flux-{}_fp16.safetensors",
        digest::short(&digest::digest_file(&src).unwrap())
    ));
    assert_eq!((&l.status, &l.path), (&LookupStatus::Missing, &suffixed));
    let note = l.note.unwrap();
    assert!(
        note.contains("another tool") && note.contains("--strict"),
        "{note}"
    );

    // In the wrong precision it is not used either, nor replaced.
    write_model(&out, Dtype::BF16, 4, 0, &BTreeMap::new());
    let l = e.cache.lookup(&src, Precision::Fp16, &opts()).unwrap();
    assert_eq!((&l.status, &l.path), (&LookupStatus::Missing, &suffixed));
    assert!(l.note.unwrap().contains("bf16"));

    // Once converted under that name, it is the hit, strict or not, ahead of the other file.
    publish(&src, Precision::Fp16, &suffixed);
    let record = cache::OutputRecord::of_file(&suffixed, file_digest(&suffixed)).unwrap();
    cache::write_output_record(&suffixed, &record).unwrap();
    write_model(&out, Dtype::F16, 4, 0, &BTreeMap::new());
    for o in [opts(), strict] {
        let l = e.cache.lookup(&src, Precision::Fp16, &o).unwrap();
        assert_eq!((l.status, &l.path), (LookupStatus::Hit, &suffixed));
    }
}

#[test]
fn a_user_file_where_an_output_was_deleted_is_not_replaced() {
    let e = env();
    let src = source(&e, "flux.safetensors", 3);
    let out = e.cache.standard_path(&src, Precision::Fp16);
    publish(&src, Precision::Fp16, &out);
    let record = cache::OutputRecord::of_file(&out, file_digest(&out)).unwrap();
    cache::write_output_record(&out, &record).unwrap();
    // The output is deleted by hand (its record stays) and the user puts a model of theirs,
    // of another size, under the name.
    fs::remove_file(&out).unwrap();
    write_model(&out, Dtype::BF16, 4, 0, &BTreeMap::new());
    assert_ne!(fs::metadata(&out).unwrap().len(), record.size);
    let l = e.cache.lookup(&src, Precision::Fp16, &opts()).unwrap();
    assert_eq!(l.status, LookupStatus::Missing, "not used, not replaced");
    assert_ne!(l.path, out);
    assert!(l.note.unwrap().contains("another tool"));
}

#[test]
fn corrupted_outputs_are_never_hits() {
    let e = env();
    let src = source(&e, "flux.safetensors", 3);
    let out = e.cache.standard_path(&src, Precision::Fp16);
    let broken = |l: &cache::Lookup| matches!(l.status, LookupStatus::Broken(_));

    // Published as `smart` publishes: with its output record, which marks the file as
    // convcache's even once its header no longer parses (so it is replaced, not kept as a
    // file another tool made).
    publish(&src, Precision::Fp16, &out);
    let record = cache::OutputRecord::of_file(&out, file_digest(&out)).unwrap();
    cache::write_output_record(&out, &record).unwrap();
    // Truncated.
    let bytes = fs::read(&out).unwrap();
    fs::write(&out, &bytes[..bytes.len() - 1]).unwrap();
    let l = e.cache.lookup(&src, Precision::Fp16, &opts()).unwrap();
    assert!(broken(&l), "{:?}", l.status);
    // Bytes appended.
    let mut longer = bytes.clone();
    longer.push(0);
    fs::write(&out, &longer).unwrap();
    assert!(broken(
        &e.cache.lookup(&src, Precision::Fp16, &opts()).unwrap()
    ));
    // A header byte flipped (the JSON no longer parses).
    let mut flipped = bytes.clone();
    flipped[8] ^= 0xff;
    fs::write(&out, &flipped).unwrap();
    assert!(broken(
        &e.cache.lookup(&src, Precision::Fp16, &opts()).unwrap()
    ));
    // Shorter than a header: nothing says whose it is any more (no header, and not the size
    // its record says), so it is never served and never replaced: the conversion goes beside.
    fs::write(&out, b"abc").unwrap();
    let l = e.cache.lookup(&src, Precision::Fp16, &opts()).unwrap();
    assert!(!l.status.is_usable() && l.path != out, "{:?}", l.status);
    // Wrong precision under the name, with a provenance claiming the right one.
    let prov = Provenance::new(
        &SourceStat::of(&src).unwrap(),
        digest::digest_file(&src).unwrap(),
        Precision::Fp16,
        VERSION,
    );
    write_model(&out, Dtype::BF16, 8, 1, &prov.to_metadata());
    assert!(broken(
        &e.cache.lookup(&src, Precision::Fp16, &opts()).unwrap()
    ));
    // Right precision, provenance made for another target.
    let mut other = prov.clone();
    other.target = Precision::Bf16;
    write_model(&out, Dtype::F16, 8, 1, &other.to_metadata());
    assert!(broken(
        &e.cache.lookup(&src, Precision::Fp16, &opts()).unwrap()
    ));
    // A provenance record that does not parse.
    let mut meta = prov.to_metadata();
    meta.insert("convcache.source_size".into(), "many".into());
    write_model(&out, Dtype::F16, 8, 1, &meta);
    assert!(broken(
        &e.cache.lookup(&src, Precision::Fp16, &opts()).unwrap()
    ));
}

#[test]
fn other_converter_version_is_stale_when_asked() {
    let e = env();
    let src = source(&e, "flux.safetensors", 3);
    let out = e.cache.standard_path(&src, Precision::Fp16);
    publish(&src, Precision::Fp16, &out);
    let newer = LookupOptions {
        converter_version: Some("test-converter/2".into()),
        ..Default::default()
    };
    let l = e.cache.lookup(&src, Precision::Fp16, &newer).unwrap();
    assert!(matches!(&l.status, LookupStatus::Stale(r) if r.contains("converter")));
    let any = LookupOptions::default();
    assert_eq!(
        e.cache.lookup(&src, Precision::Fp16, &any).unwrap().status,
        LookupStatus::Hit
    );
}

#[test]
fn lookup_reports_each_target() {
    let e = env();
    let src = source(&e, "flux.safetensors", 3);
    publish(
        &src,
        Precision::Fp16,
        &e.cache.standard_path(&src, Precision::Fp16),
    );
    let out = e.cache.standard_path(&src, Precision::Bf16);
    write_model(&out, Dtype::F32, 4, 0, &BTreeMap::new());
    let r: Vec<_> = [Precision::Fp16, Precision::Bf16, Precision::Fp8E4m3fn]
        .into_iter()
        .map(|t| e.cache.lookup(&src, t, &opts()).unwrap())
        .collect();
    // bf16: another tool's file in the wrong precision at the standard path; the conversion
    // would go to the digest-suffixed name, where nothing is yet.
    assert_eq!(
        r.iter()
            .map(|c| (c.path.exists(), c.status.is_usable()))
            .collect::<Vec<_>>(),
        vec![(true, true), (false, false), (false, false)]
    );
    assert_eq!(r[2].status, LookupStatus::Missing);
    // GGUF targets live in their own dir, with ggml's spelling.
    let q = "Q4_K_M".parse().unwrap();
    let g = e.cache.lookup(&src, q, &opts()).unwrap();
    assert_eq!(g.status, LookupStatus::Missing);
    assert_eq!(
        g.path,
        e.root.join("models/diffusion_models/gguf/flux_Q4_K_M.gguf")
    );
    let json = serde_json::to_value(&r[0].status).unwrap();
    assert_eq!(json["status"], "hit");
}

/// A cache with: 3 outputs of `src` (fp16, bf16, fp8) used at known times, a foreign file, a
/// symlink to a file outside named like an output, a temporary, an unrelated file.
struct Populated {
    e: Env,
    src: PathBuf,
    outputs: Vec<PathBuf>,
    outside: PathBuf,
    link: PathBuf,
    foreign: PathBuf,
    temp: PathBuf,
    unrelated: PathBuf,
    /// Digests of the source and of the file outside, taken when populated.
    digests: (String, String),
}

fn populated() -> Populated {
    let e = env();
    let src = source(&e, "flux.safetensors", 3);
    let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut outputs = Vec::new();
    for (i, t) in [Precision::Fp16, Precision::Bf16, Precision::Fp8E4m3fn]
        .into_iter()
        .enumerate()
    {
        let p = e.cache.standard_path(&src, t);
        publish(&src, t, &p);
        set_mtime(&p, base);
        record_use_at(&p, base + Duration::from_secs(10 * i as u64));
        outputs.push(p);
    }
    let dir = e.cache.models_dir().converted_dir();
    let outside = e.root.join("precious_fp16.safetensors");
    write_model(&outside, Dtype::F16, 64, 0, &BTreeMap::new());
    let link = dir.join("precious_fp16.safetensors");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let foreign = dir.join("other_fp16.safetensors");
    write_model(&foreign, Dtype::F16, 64, 0, &BTreeMap::new());
    set_mtime(&foreign, base);
    let temp = cache::temp_path(&dir.join("flux_fp32.safetensors"), 999_999);
    fs::write(&temp, b"partial").unwrap();
    let unrelated = dir.join("notes.txt");
    fs::write(&unrelated, b"hello").unwrap();
    let digests = (file_digest(&src), file_digest(&outside));
    Populated {
        digests,
        e,
        src,
        outputs,
        outside,
        link,
        foreign,
        temp,
        unrelated,
    }
}

impl Populated {
    fn untouched(&self) {
        assert!(self.outside.is_file());
        assert!(fs::symlink_metadata(&self.link).unwrap().is_symlink());
        assert!(self.foreign.is_file());
        assert!(self.temp.is_file());
        assert!(self.unrelated.is_file());
        assert_eq!(
            file_digest(&self.src),
            self.digests.0,
            "source bytes unchanged"
        );
        assert_eq!(file_digest(&self.outside), self.digests.1);
    }
}

#[test]
fn list_and_stats_see_regular_outputs_only() {
    let p = populated();
    let list = p.e.cache.list(Kind::All).unwrap();
    let names: Vec<_> = list
        .iter()
        .map(|x| x.path.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        vec![
            "flux_bf16.safetensors",
            "flux_fp16.safetensors",
            "flux_fp8_e4m3fn.safetensors",
            "other_fp16.safetensors"
        ]
    );
    assert_eq!(list[0].basename, "flux");
    assert_eq!(list[2].precision, Precision::Fp8E4m3fn);
    assert!(list[3].source.is_none());
    assert!(p.e.cache.list(Kind::Gguf).unwrap().is_empty());
    let s = p.e.cache.stats(Kind::Precision).unwrap();
    assert_eq!(s.count, 4);
    assert_eq!(s.total_bytes, list.iter().map(|x| x.size).sum::<u64>());
    assert_eq!(s.by_precision["fp16"].count, 2);
    assert_eq!(s.by_precision["bf16"].count, 1);
    let json = serde_json::to_value(&list).unwrap();
    assert_eq!(json[0]["precision"], "bf16");
    assert_eq!(json[0]["last_used"], 1_700_000_010u64);
    assert_eq!(
        json[0]["provenance"]["source_digest"],
        digest::digest_file(&p.src).unwrap()
    );
    assert!(json[3]["source"].is_null());
}

#[test]
fn cleanup_all_keeps_n_per_source() {
    let p = populated();
    let other = source(&p.e, "elsewhere/sdxl.safetensors", 5);
    let other_out = p.e.cache.standard_path(&other, Precision::Fp16);
    publish(&other, Precision::Fp16, &other_out);
    let removed: Vec<_> =
        p.e.cache
            .cleanup_all(1, false)
            .unwrap()
            .into_iter()
            .map(|r| r.path)
            .collect();
    assert_eq!(removed, vec![p.outputs[1].clone(), p.outputs[0].clone()]);
    assert!(
        other_out.is_file(),
        "the other source keeps its only output"
    );
    assert!(p.outputs[2].is_file());
    p.untouched();
}

#[test]
fn cleanup_keeps_the_most_recently_used_of_that_source() {
    let p = populated();
    let before = file_digest(&p.src);
    let dry = p.e.cache.cleanup(&p.src, 1, true).unwrap();
    assert_eq!(dry.len(), 2);
    assert!(
        p.outputs.iter().all(|o| o.is_file()),
        "dry run removes nothing"
    );

    let removed = p.e.cache.cleanup(&p.src, 1, false).unwrap();
    let removed: Vec<_> = removed.into_iter().map(|r| r.path).collect();
    // Used at +0 (fp16), +10 (bf16), +20 (fp8): fp8 is kept.
    assert_eq!(removed, vec![p.outputs[1].clone(), p.outputs[0].clone()]);
    assert!(p.outputs[2].is_file());
    assert!(!p.outputs[0].exists() && !p.outputs[1].exists());
    p.untouched();
    assert_eq!(file_digest(&p.src), before);
}

#[test]
fn evict_removes_least_recently_used_and_nothing_else() {
    let p = populated();
    let sizes: Vec<u64> = p
        .outputs
        .iter()
        .map(|o| fs::metadata(o).unwrap().len())
        .collect();
    let all = p.e.cache.stats(Kind::All).unwrap().total_bytes;
    // Room for everything but one output: the least recently used (fp16) goes.
    let ev = p.e.cache.evict_to(all - 1, false).unwrap();
    assert_eq!(ev.removed.len(), 1);
    assert_eq!(ev.removed[0].path, p.outputs[0]);
    assert_eq!(ev.bytes_after, all - sizes[0]);

    // A hit counts as a use: bf16 used now, so fp8 goes before it.
    let hit = p.e.cache.lookup(&p.src, Precision::Bf16, &opts()).unwrap();
    assert_eq!(
        (hit.status.clone(), &hit.path),
        (LookupStatus::Hit, &p.outputs[1])
    );
    p.e.cache.record_hit(&hit);
    let ev = p.e.cache.evict_to(all - sizes[0] - 1, true).unwrap();
    assert_eq!(ev.removed[0].path, p.outputs[2]);
    assert!(p.outputs[2].is_file(), "dry run");

    // Down to zero: every output with provenance goes; the rest stays.
    let ev = p.e.cache.evict_to(0, false).unwrap();
    assert_eq!(ev.removed.len(), 2);
    assert!(ev.bytes_after > 0, "the foreign file still counts");
    p.untouched();
}

#[test]
fn a_locked_output_is_never_removed() {
    let p = populated();
    let lock = OutputSlot::acquire(&p.outputs[0], None).unwrap();
    let ev = p.e.cache.evict_to(0, false).unwrap();
    assert!(!ev.removed.iter().any(|r| r.path == p.outputs[0]));
    assert!(p.outputs[0].is_file());
    drop(lock);
    assert!(p.e.cache.remove_output(&p.outputs[0], false).unwrap());
    assert!(!p.outputs[0].exists());
}

#[test]
fn remove_output_refuses_anything_outside_or_unrecognised() {
    let p = populated();
    let c = &p.e.cache;
    assert!(!c.remove_output(&p.link, false).unwrap());
    assert!(!c.remove_output(&p.foreign, false).unwrap());
    assert!(!c.remove_output(&p.unrelated, false).unwrap());
    assert!(!c.remove_output(&p.temp, false).unwrap());
    assert!(!c.remove_output(&p.outside, false).unwrap());
    // An output-like file with provenance but outside the output dirs.
    let elsewhere = p.e.root.join("flux_fp16.safetensors");
    fs::copy(&p.outputs[0], &elsewhere).unwrap();
    assert!(!c.remove_output(&elsewhere, false).unwrap());
    assert!(elsewhere.is_file());
    p.untouched();
}

#[test]
fn sweep_removes_temporaries_of_dead_writers_only() {
    let p = populated();
    let dir = p.e.cache.models_dir().converted_dir();
    let live_out = dir.join("live_fp16.safetensors");
    let live_temp = cache::temp_path(&live_out, std::process::id());
    fs::write(&live_temp, b"in progress").unwrap();
    let _held = OutputSlot::acquire(&live_out, None).unwrap();
    let removed = p.e.cache.sweep_temporaries().unwrap();
    assert_eq!(removed, vec![p.temp.clone()]);
    assert!(live_temp.is_file());
}

/// Writes a Q8_0 GGUF file at `at` with `extra` string key-values.
fn write_gguf(at: &Path, extra: &BTreeMap<String, String>) {
    use tensorfile::gguf::{FileType, GgmlType, GgufWriter, MetadataValue, TensorDesc};
    fs::create_dir_all(at.parent().unwrap()).unwrap();
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            MetadataValue::String("flux".into()),
        ),
        (
            "general.file_type".to_string(),
            MetadataValue::U32(FileType::Q8_0.id()),
        ),
    ];
    meta.extend(
        extra
            .iter()
            .map(|(k, v)| (k.clone(), MetadataValue::String(v.clone()))),
    );
    let t = TensorDesc::from_torch_shape("img_in.weight", &[4, 64], GgmlType::Q8_0);
    let len = t.byte_len().unwrap() as usize;
    let mut w = GgufWriter::new(fs::File::create(at).unwrap(), meta, &[t], 32).unwrap();
    w.write_chunk(&vec![0u8; len]).unwrap();
    w.finish().unwrap();
}

#[test]
fn gguf_outputs_carry_provenance_in_key_values() {
    let e = env();
    let src = source(&e, "flux.safetensors", 3);
    let q8: Precision = "Q8_0".parse().unwrap();
    let out = e.cache.standard_path(&src, q8);
    assert_eq!(out, e.cache.models_dir().gguf_dir().join("flux_Q8_0.gguf"));
    let prov = Provenance::new(
        &SourceStat::of(&src).unwrap(),
        digest::digest_file(&src).unwrap(),
        q8,
        VERSION,
    );
    write_gguf(&out, &prov.to_metadata());
    let l = e.cache.lookup(&src, q8, &opts()).unwrap();
    assert_eq!((l.status, &l.path), (LookupStatus::Hit, &out));
    let listed = e.cache.list(Kind::Gguf).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].provenance.as_ref(), Some(&prov));
    // Its tensor data cut short: still known as convcache's by its key-values, so broken
    // (and replaced by the next conversion), not kept as another tool's file.
    let record = cache::OutputRecord::of_file(&out, file_digest(&out)).unwrap();
    cache::write_output_record(&out, &record).unwrap();
    let bytes = fs::read(&out).unwrap();
    fs::write(&out, &bytes[..bytes.len() - 7]).unwrap();
    let l = e.cache.lookup(&src, q8, &opts()).unwrap();
    assert!(
        matches!(l.status, LookupStatus::Broken(_)),
        "{:?}",
        l.status
    );
    assert_eq!(l.path, out);
    // Without provenance: unverified; another quantization under the name: broken.
    write_gguf(&out, &BTreeMap::new());
    let l = e.cache.lookup(&src, q8, &opts()).unwrap();
    assert_eq!(l.status, LookupStatus::Unverified);
    let q4: Precision = "Q4_0".parse().unwrap();
    let wrong = e.cache.standard_path(&src, q4);
    write_gguf(&wrong, &BTreeMap::new());
    let l = e.cache.lookup(&src, q4, &opts()).unwrap();
    assert_eq!(l.status, LookupStatus::Missing, "not used, not replaced");
    assert_ne!(l.path, wrong);
    assert!(l.note.unwrap().contains("another tool"));
}

#[test]
fn make_room_frees_only_what_is_missing_least_recently_used_first() {
    let p = populated();
    let c = &p.e.cache;
    let sizes: Vec<u64> = p
        .outputs
        .iter()
        .map(|o| fs::metadata(o).unwrap().len())
        .collect();
    let new_output = c.standard_path(&p.src, Precision::Fp32);
    let cached: u64 = c.list(Kind::All).unwrap().iter().map(|e| e.size).sum();
    let request = |max, disk_available, spare: &'static [PathBuf]| {
        let new_output = new_output.clone();
        move |dry_run| {
            c.make_room(
                &RoomRequest {
                    output: &new_output,
                    output_bytes: 1000,
                    disk_available,
                    max_cache_bytes: max,
                    spare,
                },
                dry_run,
            )
            .unwrap()
        }
    };
    // It fits: nothing to do.
    let room = request(Some(cached + 1000), u64::MAX, &[])(false);
    assert!(room.enough && room.shortfall.is_none() && room.removed.is_empty());

    // One byte over the budget: the least recently used output alone; a dry run removes
    // nothing and says the same.
    let over_by_one = request(Some(cached + 999), u64::MAX, &[]);
    let would = over_by_one(true);
    assert_eq!(would.shortfall.budget, 1);
    assert_eq!(would.removed.len(), 1);
    assert_eq!(
        (would.removed[0].path.clone(), would.removed[0].size),
        (p.outputs[0].clone(), sizes[0])
    );
    assert!(would.enough && p.outputs[0].is_file());
    assert_eq!(over_by_one(false), would);
    assert!(!p.outputs[0].exists());

    // More than every output of convcache holds: not enough, and every one is listed (the
    // foreign file, the symlink's target and the source are never candidates).
    let room = request(Some(0), u64::MAX, &[])(true);
    assert!(!room.enough);
    assert_eq!(room.removed.len(), 2);
    assert_eq!(room.removed_bytes(), sizes[1] + sizes[2]);

    // Short on disk: outputs on the same filesystem count by the blocks they free.
    let room = request(None, 0, &[])(true);
    assert_eq!(room.shortfall.disk, 1000);
    assert!(room.enough && room.removed.len() == 1, "{room:?}");
    assert_eq!(room.removed[0].path, p.outputs[1]);
    p.untouched();
}

#[test]
fn make_room_spares_what_it_is_told_to() {
    let p = populated();
    let c = &p.e.cache;
    let new_output = c.standard_path(&p.src, Precision::Fp32);
    let spare = vec![p.outputs[0].clone()];
    let room = c
        .make_room(
            &RoomRequest {
                output: &new_output,
                output_bytes: 1000,
                disk_available: 0,
                max_cache_bytes: None,
                spare: &spare,
            },
            false,
        )
        .unwrap();
    assert_eq!(room.removed.len(), 1);
    assert_eq!(room.removed[0].path, p.outputs[1]);
    assert!(p.outputs[0].is_file());
}
