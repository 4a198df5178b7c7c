//! The newer architectures are detected from the key sets of the real files ComfyUI users
//! load, and the fixtures of `fixtures/archs/` have those files' names.
//!
//! `real_key_sets/*.json` each hold one real file's key list (or the part of it a public
//! source recorded), with the source cited in the file: names, and shapes and dtypes where
//! the source gives them. Nothing in them is made up: keys a source did not show are left out,
//! unknown shapes are `null`. Each file says which architecture the keys are.
//!
//! - Every key set is detected as its architecture, by the per-name rule `detect` uses and by
//!   convert.py's whole-state-dict prefix rule the GGUF planner uses.
//! - A key set whose header the source recorded completely (every shape and dtype, and what
//!   the header's metadata is) is written as a sparse safetensors file of its real size and
//!   detected from the file: architecture, precision and the scaled-fp8 layout.
//! - A key set tied to a fixture (`fixtures`) has the fixture's key set: the same names
//!   (quantization bookkeeping aside, and only for the stack entries the fixture has), each of
//!   the same rank.

#![allow(clippy::unwrap_used)] // test code: a failed setup step should fail the test loudly

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use detect::arch::{Arch, KeyPrefix, detect_arch, strip_prefix};
use detect::detect;
use serde_json::Value;
use tensorfile::safetensors::Dtype;

/// One tensor of a real key set: name (as in the file), shape and dtype where known.
struct RealTensor {
    name: String,
    shape: Option<Vec<u64>>,
    dtype: Option<Dtype>,
}

struct KeySet {
    file: PathBuf,
    json: Value,
    tensors: Vec<RealTensor>,
}

impl KeySet {
    fn arch(&self) -> Arch {
        self.json["arch"].as_str().unwrap().parse().unwrap()
    }

    fn label(&self) -> String {
        self.file
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }
}

fn key_sets() -> Vec<KeySet> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/real_key_sets");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|file| {
            let json: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert!(
                json["source"].as_str().is_some_and(|s| !s.is_empty()),
                "{}: every key set cites its source",
                file.display()
            );
            // Some sources recorded the names without the file's prefix.
            let prefix = json["prefix"].as_str().unwrap_or("").to_owned();
            let tensors = json["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| RealTensor {
                    name: format!("{prefix}{}", t[0].as_str().unwrap()),
                    shape: t[1]
                        .as_array()
                        .map(|s| s.iter().map(|d| d.as_u64().unwrap()).collect()),
                    dtype: t[2].as_str().map(|d| d.parse().unwrap()),
                })
                .collect();
            KeySet {
                file,
                json,
                tensors,
            }
        })
        .collect()
}

#[test]
fn every_real_key_set_is_detected_as_its_architecture() {
    let sets = key_sets();
    let mut covered = BTreeSet::new();
    for set in &sets {
        let names: Vec<&str> = set.tensors.iter().map(|t| t.name.as_str()).collect();
        // `detect`'s rule: each name without a leading `model.diffusion_model.`.
        let by_name = detect_arch(names.iter().map(|n| strip_prefix(n)));
        assert_eq!(by_name, Ok(set.arch()), "{}", set.label());
        // The GGUF planner's rule (convert.py): one prefix for the whole state dict, keys
        // outside it (a checkpoint's VAE, text projection) dropped.
        let prefix = KeyPrefix::detect(names.iter().copied());
        let kept: Vec<String> = names
            .iter()
            .filter_map(|n| prefix.apply(n).map(|k| k.into_owned()))
            .collect();
        assert_eq!(
            detect_arch(kept.iter().map(String::as_str)),
            Ok(set.arch()),
            "{}",
            set.label()
        );
        covered.insert(set.arch());
    }
    // Every new architecture a real key list was found for (see the report of issue 13:
    // none was found for the text encoders' ComfyUI files).
    let expected: BTreeSet<Arch> = [
        Arch::Flux2,
        Arch::Chroma,
        Arch::Ltxav,
        Arch::Hyvid15,
        Arch::ZImage,
        Arch::Wan,
    ]
    .into();
    assert_eq!(covered, expected);
}

/// Writes `tensors` as a safetensors file whose data is a hole: the header is the real one
/// (for the recorded subset), the file has its real length, and no disk is used for data.
fn sparse_safetensors(path: &Path, tensors: &[RealTensor]) {
    let specs: Vec<(&str, Dtype, &[u64])> = tensors
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.dtype.unwrap(),
                t.shape.as_deref().unwrap(),
            )
        })
        .collect();
    let (json, data_len) = common::safetensors_json(&specs, &[]);
    let mut json = json.into_bytes();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut f = File::create(path).unwrap();
    f.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&json).unwrap();
    f.set_len(8 + json.len() as u64 + data_len).unwrap();
}

#[test]
fn real_headers_are_detected_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for set in key_sets() {
        let Some(precision) = set.json["precision"].as_str() else {
            continue;
        };
        assert!(
            set.tensors
                .iter()
                .all(|t| t.shape.is_some() && t.dtype.is_some()),
            "{}: a header test needs every shape and dtype",
            set.label()
        );
        let path = dir
            .path()
            .join(set.label().replace(".json", ".safetensors"));
        sparse_safetensors(&path, &set.tensors);
        let d = detect(&path).unwrap_or_else(|e| panic!("{}: {e}", set.label()));
        assert_eq!(
            d.architecture.as_deref(),
            Some(set.arch().name()),
            "{}",
            set.label()
        );
        assert_eq!(
            d.precision.map(|p| p.canonical_name()),
            Some(precision),
            "{}",
            set.label()
        );
        assert_eq!(d.model_kind, set.arch().kind(), "{}", set.label());
        match set.json["scaled_layout"].as_str() {
            Some(layout) => {
                let s = d.fp8_scaling.as_ref().unwrap();
                assert_eq!(s.layout, layout, "{}", set.label());
                let count = |suffix: &str| {
                    set.tensors
                        .iter()
                        .filter(|t| t.name.ends_with(suffix))
                        .count() as u64
                };
                assert_eq!(s.scale_weights, count(".scale_weight"), "{}", set.label());
                assert_eq!(s.scale_inputs, count(".scale_input"), "{}", set.label());
                assert_eq!(s.marker.as_deref(), Some("scaled_fp8"), "{}", set.label());
            }
            None => assert!(d.fp8_scaling.is_none(), "{}", set.label()),
        }
        checked += 1;
    }
    // Flux.2 klein 9B, Z-Image bf16 and scaled fp8, Wan 2.2 scaled fp8.
    assert_eq!(checked, 4);
}

/// ComfyUI's quantization bookkeeping, which a bf16 fixture has no counterpart of.
fn is_bookkeeping(name: &str) -> bool {
    name == "scaled_fp8"
        || [
            ".scale_weight",
            ".scale_input",
            ".weight_scale",
            ".input_scale",
            ".comfy_quant",
        ]
        .iter()
        .any(|s| name.ends_with(s))
}

/// The stack entry a key belongs to (`double_blocks.0.`, `distilled_guidance_layer.norms.4.`):
/// its name up to the first index that follows a stack's name. A real key of a stack entry
/// the fixture does not have (Chroma's guidance layers 2 to 4) is not expected in the
/// fixture; every other real key is.
fn stack_entry(name: &str) -> Option<String> {
    const STACKS: &[&str] = &[
        "double_blocks",
        "single_blocks",
        "blocks",
        "layers",
        "transformer_blocks",
        "noise_refiner",
        "context_refiner",
        "norms",
    ];
    let segs: Vec<&str> = name.split('.').collect();
    let at = segs.windows(2).position(|w| {
        STACKS.contains(&w[0]) && !w[1].is_empty() && w[1].bytes().all(|b| b.is_ascii_digit())
    })?;
    Some(segs[..at + 2].join(".") + ".")
}

/// name -> shape of a fixture, from its header.
fn fixture_shapes(file: &str) -> BTreeMap<String, Vec<u64>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(file);
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: BTreeMap<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            (k, shape)
        })
        .collect()
}

#[test]
fn fixtures_have_the_real_key_sets() {
    let mut compared = 0;
    for set in key_sets() {
        let Some(fixtures) = set.json["fixtures"].as_array() else {
            continue;
        };
        // Compared without `model.diffusion_model.`: a source may have recorded the names
        // without it, and a fixture may leave it out.
        let real: BTreeMap<&str, &RealTensor> = set
            .tensors
            .iter()
            .filter(|t| !is_bookkeeping(&t.name))
            .map(|t| (strip_prefix(&t.name), t))
            .collect();
        for fixture in fixtures {
            let fixture = fixture.as_str().unwrap();
            let shapes: BTreeMap<String, Vec<u64>> = fixture_shapes(fixture)
                .into_iter()
                .map(|(k, v)| (strip_prefix(&k).to_owned(), v))
                .collect();
            let entries: BTreeSet<String> = shapes.keys().filter_map(|k| stack_entry(k)).collect();
            for (name, shape) in &shapes {
                let real = real.get(name.as_str()).unwrap_or_else(|| {
                    panic!(
                        "{fixture}: `{name}` is not in the real key set {}",
                        set.label()
                    )
                });
                if let Some(real_shape) = &real.shape {
                    assert_eq!(
                        shape.len(),
                        real_shape.len(),
                        "{fixture}: `{name}` is {shape:?}, the real tensor {real_shape:?}"
                    );
                }
            }
            for name in real.keys() {
                if stack_entry(name).is_none_or(|e| entries.contains(&e)) {
                    assert!(
                        shapes.contains_key(*name),
                        "{fixture}: the real key `{name}` ({}) is missing",
                        set.label()
                    );
                }
            }
            compared += 1;
        }
    }
    // flux2, chroma, ltxav, hyvid15, z_image, and both Wan 2.2 fixtures.
    assert_eq!(compared, 7);
}

/// Comfy-Org's `flux2_dev_fp8mixed` has fp8 weights with `weight_scale` and no `.comfy_quant`
/// tensors: the layers' formats are in its header, which the source did not record. Its
/// tensors alone are still Flux.2, but not a file convcache may read as plain fp8/bf16 (the
/// scales would be dropped): detection says so instead of naming a precision to convert from.
#[test]
fn flux2_fp8mixed_tensors_without_their_layer_formats_are_not_read_unscaled() {
    let set = key_sets()
        .into_iter()
        .find(|s| s.label() == "flux2_dev_fp8mixed.json")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flux2_dev_fp8mixed.safetensors");
    sparse_safetensors(&path, &set.tensors);
    let d = detect(&path).unwrap();
    assert_eq!(d.architecture.as_deref(), Some("flux2"));
    assert!(!d.supported_as_source);
    assert!(
        d.notes
            .iter()
            .any(|n| n.contains("double_blocks.0.img_mlp.0.weight_scale")),
        "{:?}",
        d.notes
    );
}
