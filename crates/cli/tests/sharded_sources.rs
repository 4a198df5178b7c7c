//! Sharded sources (a diffusers-style folder: three shards and their
//! `*.safetensors.index.json`) end to end: one source for detection, every converter and the
//! cache, named after the model folder; every broken index or shard is a one-line input fault
//! (exit 2) and nothing is published.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use cli::sample::SampleSpec;
use common::*;
use detect::Precision;
use smart::backends::gguf::GgufBackend;
use smart::backends::{BnbBackend, PrecisionBackend};
use smart::{Backend, BackendOptions, Job};
use tensorfile::safetensors::Dtype;
use tensorfile::safetensors::writer::{WholeTensor, write_file};

const SHARDS: usize = 3;
const INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";

fn shard_name(k: usize) -> String {
    format!(
        "diffusion_pytorch_model-{:05}-of-{SHARDS:05}.safetensors",
        k + 1
    )
}

/// The sample's tensors as F32 bytes, in file order.
fn sample_tensors(spec: &SampleSpec) -> Vec<(String, Vec<u64>, Vec<u8>)> {
    spec.tensors()
        .iter()
        .enumerate()
        .map(|(t, ts)| {
            let n = ts.shape.iter().product::<u64>();
            let bytes = (0..n)
                .flat_map(|i| spec.value(t, i).to_le_bytes())
                .collect();
            (ts.name.clone(), ts.shape.clone(), bytes)
        })
        .collect()
}

fn metadata() -> BTreeMap<String, String> {
    [("format".to_owned(), "pt".to_owned())].into()
}

fn write_tensors(path: &Path, tensors: &[(String, Vec<u64>, Vec<u8>)]) {
    let whole: Vec<WholeTensor<'_>> = tensors
        .iter()
        .map(|(n, s, b)| (n.as_str(), Dtype::F32, s.clone(), b.clone()))
        .collect();
    write_file(path, &whole, &metadata()).expect("write a shard");
}

fn write_index(dir: &Path, weight_map: &BTreeMap<String, String>) {
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join(INDEX), index.to_string()).expect("write the index");
}

/// Writes `spec` into `dir` as three shards of consecutive tensors and their index; returns
/// the weight map.
fn write_sharded(dir: &Path, spec: &SampleSpec) -> BTreeMap<String, String> {
    std::fs::create_dir_all(dir).expect("mkdir");
    let tensors = sample_tensors(spec);
    let per_shard = tensors.len().div_ceil(SHARDS);
    let mut weight_map = BTreeMap::new();
    for (k, group) in tensors.chunks(per_shard).enumerate() {
        write_tensors(&dir.join(shard_name(k)), group);
        for (name, _, _) in group {
            weight_map.insert(name.clone(), shard_name(k));
        }
    }
    write_index(dir, &weight_map);
    weight_map
}

/// `FLUX.1-dev/transformer/` in the scratch dir, holding `spec` in three shards.
fn flux_folder(s: &Scratch, spec: &SampleSpec) -> PathBuf {
    let dir = s.root().join("FLUX.1-dev").join("transformer");
    write_sharded(&dir, spec);
    dir
}

/// The output of `backend` for `source` in `target`, without provenance keys (so that two
/// sources holding the same tensors give the same bytes).
fn convert_bytes(backend: &dyn Backend, source: &Path, target: Precision) -> Vec<u8> {
    let detection = detect::detect(source).expect("detect");
    let extra = BTreeMap::new();
    let job = Job {
        source_path: source,
        source: &detection,
        target,
        extra_metadata: &extra,
        options: BackendOptions::default(),
        shared_read: None,
    };
    assert!(backend.supports(&detection, target), "{target}");
    let planned = backend.plan(&job).expect("plan");
    let mut out = Vec::new();
    planned.write(&mut out, &mut |_, _| {}).expect("write");
    assert_eq!(planned.output_len(), out.len() as u64);
    out
}

#[test]
fn a_sharded_folder_converts_exactly_like_the_same_tensors_in_one_file() {
    let s = Scratch::new();
    let folder = flux_folder(&s, &SMALL);
    let single = s.root().join("single.safetensors");
    write_tensors(&single, &sample_tensors(&SMALL));
    let q8 = Precision::Gguf(tensorfile::gguf::FileType::Q8_0);
    let cases: [(&dyn Backend, Precision); 3] = [
        (&PrecisionBackend, Precision::Bf16),
        (&GgufBackend, q8),
        (&BnbBackend, Precision::Nf4),
    ];
    for (backend, target) in cases {
        let one = convert_bytes(backend, &single, target);
        assert!(
            convert_bytes(backend, &folder, target) == one,
            "{target}: the folder's output differs"
        );
        let index = folder.join(INDEX);
        assert!(
            convert_bytes(backend, &index, target) == one,
            "{target}: the index's output differs"
        );
    }
}

#[test]
fn detect_reports_a_sharded_folder_as_one_source() {
    let s = Scratch::new();
    let folder = flux_folder(&s, &SMALL);
    let run = s
        .run(&["--json", "detect", folder.to_str().expect("utf-8")])
        .ok();
    let d = &run.json()[0];
    assert_eq!(d["format"], "safetensors", "{d}");
    assert_eq!(d["precision"], "fp32", "{d}");
    assert_eq!(d["architecture"], "flux", "{d}");
    assert_eq!(d["shards"], SHARDS as u64, "{d}");
    assert_eq!(d["tensor_count"], SMALL.tensors().len() as u64, "{d}");
    let size: u64 = std::fs::read_dir(&folder)
        .expect("list")
        .map(|e| e.expect("entry").metadata().expect("stat").len())
        .sum();
    assert_eq!(d["file_size"], size, "{d}");
}

fn set_later_mtime(path: &Path) {
    let later = SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(later))
        .expect("set mtime");
}

fn gguf_dir(s: &Scratch) -> PathBuf {
    s.models().join("diffusion_models").join("gguf")
}

#[test]
fn a_sharded_folder_is_cached_under_the_model_folders_name_until_a_shard_changes() {
    let s = Scratch::new();
    let folder = flux_folder(&s, &SMALL);
    let arg = folder.to_str().expect("utf-8");
    let convert = |src: &str| {
        s.run(&["--json", "convert", src, "--to", "bf16,q8_0"])
            .ok()
            .json()
    };
    let statuses = |v: &serde_json::Value| -> Vec<String> {
        let rows = v.as_array().expect("rows");
        rows.iter()
            .map(|r| r["status"].as_str().expect("status").to_owned())
            .collect()
    };

    let first = convert(arg);
    assert_eq!(statuses(&first), ["converted", "converted"], "{first}");
    let bf16 = s.converted_dir().join("FLUX.1-dev_bf16.safetensors");
    let q8 = gguf_dir(&s).join("FLUX.1-dev_Q8_0.gguf");
    assert_eq!(
        PathBuf::from(first[0]["path"].as_str().expect("path")),
        bf16
    );
    assert_eq!(PathBuf::from(first[1]["path"].as_str().expect("path")), q8);
    assert_is_bf16_of(&bf16, &SMALL);
    let q8_bytes = std::fs::read(&q8).expect("read the GGUF");

    // The same source, named by its folder or its index: a hit.
    let second = convert(arg);
    assert_eq!(statuses(&second), ["cached", "cached"], "{second}");
    let by_index = convert(folder.join(INDEX).to_str().expect("utf-8"));
    assert_eq!(statuses(&by_index), ["cached", "cached"], "{by_index}");

    // A shard touched, same bytes: its digest settles it, still a hit.
    let shard = folder.join(shard_name(1));
    set_later_mtime(&shard);
    let touched = convert(arg);
    assert_eq!(statuses(&touched), ["cached", "cached"], "{touched}");
    assert!(std::fs::read(&q8).expect("read") == q8_bytes);

    // A shard rewritten with other values (same size): stale, converted again.
    let changed = SampleSpec { seed: 77, ..SMALL };
    let tensors = sample_tensors(&changed);
    let per_shard = tensors.len().div_ceil(SHARDS);
    write_tensors(&shard, &tensors[per_shard..2 * per_shard]);
    set_later_mtime(&shard);
    let third = convert(arg);
    assert_eq!(statuses(&third), ["converted", "converted"], "{third}");
    assert!(std::fs::read(&q8).expect("read") != q8_bytes);
    let again = convert(arg);
    assert_eq!(statuses(&again), ["cached", "cached"], "{again}");

    // `cleanup` finds the outputs by the folder as well.
    s.run(&["cleanup", arg, "--keep", "0"]).ok();
    assert!(!bf16.exists() && !q8.exists());
}

/// Several targets of a sharded source in one command read each shard once (the shared read
/// also makes the source digest, as the cache makes it: the outputs, provenance included,
/// equal separate commands').
#[test]
fn several_targets_of_a_sharded_folder_read_it_once_and_match_separate_commands() {
    let s = Scratch::new();
    let folder = flux_folder(&s, &MEDIUM);
    let arg = folder.to_str().expect("utf-8");
    let targets = ["bf16", "Q8_0", "nf4", "fp8"];
    let run = s
        .cmd(&["--json", "convert", arg, "--to", &targets.join(",")])
        .env("CONVCACHE_READ_STATS", "1")
        .output()
        .expect("spawn");
    let run = Run::from(run).ok();
    let rows = run.json().as_array().expect("rows").clone();
    let size: u64 = std::fs::read_dir(&folder)
        .expect("list")
        .map(|e| e.expect("entry").metadata().expect("stat").len())
        .sum();
    let read = bytes_read(&run.stderr);
    assert!(
        read <= size + size / 20,
        "read {read} bytes of a {size}-byte sharded source for {} targets",
        targets.len()
    );
    assert_rows_match_separate_commands(&s, arg, &rows, &targets);
}

/// Runs `convert DIR --to bf16`, `--to q8_0` and `--to bf16,q8_0`: exit 2, one error line per
/// pair naming `names` and holding `needle`, nothing published.
fn assert_sharded_input_fault(s: &Scratch, dir: &Path, names: &Path, needle: &str) {
    // One target, and two in one command (a group that would share one read): one line per
    // pair.
    for target in ["bf16", "q8_0", "bf16,q8_0"] {
        let run = s.run(&["convert", dir.to_str().expect("utf-8"), "--to", target]);
        let err = run.stderr.trim();
        assert_eq!(
            run.code, 2,
            "{needle} -> {target}: exit {}: {err}",
            run.code
        );
        assert_eq!(err.lines().count(), target.split(',').count(), "{err}");
        for line in err.lines() {
            assert!(line.contains(&names.display().to_string()), "{err}");
            assert!(line.contains(needle), "{err}");
        }
        for out in [s.converted_dir(), gguf_dir(s)] {
            let published: Vec<String> = files_in(&out)
                .into_iter()
                .filter(|f| f != ".convcache")
                .collect();
            assert!(published.is_empty(), "{needle}: {published:?}");
        }
    }
}

#[test]
fn every_broken_index_or_shard_is_a_one_line_input_fault_and_nothing_is_published() {
    type Damage = fn(&Path, &mut BTreeMap<String, String>) -> (PathBuf, &'static str);
    let cases: &[(&str, Damage)] = &[
        ("missing shard", |dir, _| {
            let shard = dir.join(shard_name(1));
            std::fs::remove_file(&shard).expect("rm");
            (shard, "shard missing")
        }),
        ("truncated shard", |dir, _| {
            let shard = dir.join(shard_name(2));
            let len = std::fs::metadata(&shard).expect("stat").len();
            std::fs::File::options()
                .write(true)
                .open(&shard)
                .and_then(|f| f.set_len(len - 10))
                .expect("truncate");
            (shard, "")
        }),
        ("listed but absent", |dir, map| {
            map.insert("extra.weight".into(), shard_name(0));
            (dir.join(shard_name(0)), "does not hold it")
        }),
        ("in two shards", |dir, _| {
            let mut first = sample_tensors(&SMALL);
            first.truncate(1);
            let stray = dir.join(shard_name(2));
            let mut third = sample_tensors(&SMALL);
            let per_shard = third.len().div_ceil(SHARDS);
            let mut third: Vec<_> = third.drain(2 * per_shard..).collect();
            third.extend(first);
            write_tensors(&stray, &third);
            (stray, "also stored in")
        }),
        ("not in the index", |dir, map| {
            let name = map.keys().next().expect("a tensor").clone();
            let shard = map.remove(&name).expect("listed");
            (dir.join(shard), "which the index does not list")
        }),
        ("unreferenced shard", |dir, _| {
            let stray = dir.join("diffusion_pytorch_model-00004-of-00003.safetensors");
            std::fs::copy(dir.join(shard_name(0)), &stray).expect("copy");
            (stray, "does not reference it")
        }),
        ("outside the folder", |dir, map| {
            let name = map.keys().next().expect("a tensor").clone();
            map.insert(name, "../other.safetensors".into());
            (dir.join(INDEX), "not a file in the index's folder")
        }),
        ("absolute shard name", |dir, map| {
            let name = map.keys().next().expect("a tensor").clone();
            map.insert(name, "/etc/passwd".into());
            (dir.join(INDEX), "not a file in the index's folder")
        }),
        ("two indexes", |dir, _| {
            std::fs::copy(dir.join(INDEX), dir.join("other.safetensors.index.json")).expect("copy");
            (dir.to_owned(), "holds 2 shard indexes")
        }),
    ];
    for (what, damage) in cases {
        let s = Scratch::new();
        let dir = flux_folder(&s, &SMALL);
        let mut map = write_sharded(&dir, &SMALL);
        let (names, needle) = damage(&dir, &mut map);
        write_index(&dir, &map);
        eprintln!("case: {what}");
        assert_sharded_input_fault(&s, &dir, &names, needle);
    }

    // An index that is not JSON.
    let s = Scratch::new();
    let dir = flux_folder(&s, &SMALL);
    std::fs::write(dir.join(INDEX), b"{\"weight_map\": ").expect("write");
    assert_sharded_input_fault(&s, &dir, &dir.join(INDEX), "invalid shard index");
}
