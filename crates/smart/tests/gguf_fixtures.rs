//! Every fixture architecture converts to GGUF exactly as ComfyUI-GGUF's tools do.
//!
//! `crates/gguf/tests/golden/convert/expected.json` holds, per fixture and target, the sha256 of
//! the file ComfyUI-GGUF's `convert.py` plus the patched llama-quantize (types transcribed from
//! `lcpp.patch`, bytes from ggml's own quantizer) produce, and the per-tensor type table (see
//! `make_goldens.py` there). Without provenance keys our output must be that file, byte for byte.

#![allow(clippy::unwrap_used)] // test code: a failed setup step should fail the test loudly

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gguf::{FileType, GgufFile};
use smart::backends::gguf::GgufBackend;
use smart::{Backend, BackendOptions, Job};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn expected() -> serde_json::Value {
    let path = repo().join("crates/gguf/tests/golden/convert/expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[path = "../../gguf/tests/support/sha256.rs"]
mod sha256;
use sha256::sha256;

/// Our dequantization of every tensor of `gguf_path` (stored shape, F32), for
/// `check_outputs.py` to compare with gguf-py's.
fn write_our_dequantization(gguf_path: &Path, out: &Path) {
    use gguf::source::GgufSource;
    use tensorfile::TensorSource;
    let source = GgufSource::open(gguf_path).unwrap();
    let specs: Vec<tensorfile::TensorSpec> = source
        .file()
        .tensors
        .iter()
        .map(|t| tensorfile::TensorSpec {
            name: t.name.clone(),
            dtype: tensorfile::safetensors::Dtype::F32,
            shape: t.torch_shape(),
        })
        .collect();
    let f = std::fs::File::create(out).unwrap();
    let mut w = tensorfile::SafetensorsWriter::new(f, &specs, &BTreeMap::new()).unwrap();
    for (i, t) in source.file().tensors.iter().enumerate() {
        let mut v = vec![0f32; t.n_elements() as usize];
        source.read_f32(i, 0, &mut v).unwrap();
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.write_chunk(&bytes).unwrap();
    }
    w.finish().unwrap();
}

fn target_of(name: &str) -> FileType {
    match name {
        "F16" => FileType::MostlyF16,
        "BF16" => FileType::MostlyBF16,
        other => other.parse().unwrap(),
    }
}

/// Converts `fixture` to `target` through the backend (no provenance keys) and returns the file
/// and the report.
fn convert(fixture: &Path, target: FileType) -> (Vec<u8>, serde_json::Value) {
    let detection = detect::detect(fixture).unwrap();
    let extra = BTreeMap::new();
    let job = Job {
        source_path: fixture,
        source: &detection,
        target: detect::Precision::Gguf(target),
        extra_metadata: &extra,
        options: BackendOptions::default(),
        shared_read: None,
    };
    let backend = GgufBackend;
    assert!(backend.supports(&detection, job.target));
    let planned = backend.plan(&job).unwrap();
    let mut out = Vec::new();
    let mut last = (0, 0);
    let report = planned
        .write(&mut out, &mut |bytes, tensors| {
            assert!(bytes >= last.0 && tensors >= last.1, "progress went back");
            last = (bytes, tensors);
        })
        .unwrap();
    let report = serde_json::to_value(report).unwrap();
    assert_eq!(planned.output_len(), out.len() as u64);
    assert_eq!(last, planned.totals(), "progress ends at the totals");
    (out, report)
}

#[test]
fn every_fixture_and_mix_is_byte_identical_to_comfyui_gguf() {
    let golden = expected();
    let layouts = golden["layouts"].as_array().unwrap();
    let check_dir = std::env::var_os("GGUF_CHECK_DIR").map(PathBuf::from);
    let mut identical = 0;
    let mut failures = Vec::new();
    for o in golden["outputs"].as_array().unwrap() {
        let fixture = o["fixture"].as_str().unwrap();
        let target_name = o["target"].as_str().unwrap();
        let target = target_of(target_name);
        let path = repo().join("fixtures").join(fixture);
        let (bytes, report) = convert(&path, target);
        if let Some(dir) = &check_dir {
            std::fs::create_dir_all(dir).unwrap();
            let stem = fixture.trim_end_matches(".safetensors");
            let out = dir.join(format!("{stem}_{target_name}.gguf"));
            std::fs::write(&out, &bytes).unwrap();
            write_our_dequantization(
                &out,
                &dir.join(format!("{stem}_{target_name}.ours.safetensors")),
            );
        }
        let file = GgufFile::from_bytes(bytes.clone(), Path::new(fixture)).unwrap();
        let layout = &layouts[o["layout"].as_u64().unwrap() as usize];
        let want_names: Vec<&str> = layout["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let want_types: Vec<&str> = o["types"].as_str().unwrap().split(',').collect();
        let got_names: Vec<&str> = file.tensors.iter().map(|t| t.name.as_str()).collect();
        let got_types: Vec<&str> = file.tensors.iter().map(|t| t.ggml_type.name()).collect();
        let keys: Vec<&str> = file.metadata.iter().map(|(k, _)| k.as_str()).collect();
        let want_keys: Vec<&str> = o["kv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            got_names, want_names,
            "{fixture} -> {target_name}: tensor order"
        );
        assert_eq!(keys, want_keys, "{fixture} -> {target_name}: metadata keys");
        let dims: Vec<Vec<u64>> = file.tensors.iter().map(|t| t.dims.clone()).collect();
        let want_dims: Vec<Vec<u64>> = serde_json::from_value(layout["dims"].clone()).unwrap();
        assert_eq!(dims, want_dims, "{fixture} -> {target_name}: dims");
        // The report's histogram agrees with the file.
        let mut hist = BTreeMap::new();
        for t in &got_types {
            *hist.entry(t.to_string()).or_insert(0u64) += 1;
        }
        let report_hist: BTreeMap<String, u64> =
            serde_json::from_value(report["types"].clone()).unwrap();
        assert_eq!(hist, report_hist);

        if got_types == want_types {
            if sha256(&bytes) == o["sha256"].as_str().unwrap() {
                identical += 1;
            } else {
                failures.push(format!(
                    "{fixture} -> {target_name}: same types, other bytes"
                ));
            }
        } else {
            // The one intended difference: a plain BF16 target stores every non-F32 tensor as
            // BF16, where convert.py keeps an fp8 source's weights F16 (it picks BF16 for the
            // file only because BF16 biases are the most common dtype).
            let plain_fp8 = fixture.ends_with("_fp8.safetensors") && target_name == "BF16";
            let only_f16_vs_bf16 = got_types
                .iter()
                .zip(&want_types)
                .all(|(g, w)| g == w || (*g == "BF16" && *w == "F16"));
            if !(plain_fp8 && only_f16_vs_bf16) {
                failures.push(format!(
                    "{fixture} -> {target_name}: types differ: {:?}",
                    got_names
                        .iter()
                        .zip(got_types.iter().zip(&want_types))
                        .filter(|(_, (g, w))| g != w)
                        .map(|(n, (g, w))| format!("{n}: {g} (want {w})"))
                        .collect::<Vec<_>>()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // 105 outputs, of which the plain outputs of the 5 fp8 fixtures differ by design.
    assert_eq!(identical, 100);
}

#[test]
fn dropped_tensors_are_reported() {
    let fixtures = repo().join("fixtures");
    let (_, report) = convert(
        &fixtures.join("flux_checkpoint_bf16.safetensors"),
        FileType::Q8_0,
    );
    let dropped: Vec<&str> = report["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert!(!dropped.is_empty());
    assert!(
        dropped.iter().all(|n| n.starts_with("first_stage_model.")),
        "{dropped:?}"
    );
    assert_eq!(report["architecture"], "flux");
    assert_eq!(report["file_type"], "Q8_0");
    assert_eq!(report["warnings"].as_array().unwrap().len(), 0);

    // Flux's small rows (64) cannot hold a K-quant block: the fallback is reported.
    let (_, report) = convert(&fixtures.join("flux_f32.safetensors"), FileType::Q4KM);
    let warnings = report["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let w = warnings[0].as_str().unwrap();
    assert!(
        w.contains("not whole blocks") && w.contains("Q4_K_M"),
        "{w}"
    );

    // sd3_mixed: integer and boolean tensors are left out; the 0-d scalar becomes [1].
    let (bytes, report) = convert(&fixtures.join("sd3_mixed.safetensors"), FileType::Q4KM);
    let dropped: Vec<&str> = report["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(dropped, ["text_attention_mask", "text_position_ids"]);
    let file = GgufFile::from_bytes(bytes, Path::new("sd3_mixed.gguf")).unwrap();
    let scalar = file.tensor("logit_scale").unwrap();
    assert_eq!(scalar.dims, vec![1]);
    assert_eq!(scalar.ggml_type, gguf::GgmlType::F32);
}
