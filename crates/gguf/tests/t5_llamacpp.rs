//! T5 / umt5 GGUFs are typed and quantized exactly as llama.cpp's own `llama-quantize` does.
//!
//! `golden/t5_llamacpp/expected.json` (made by `make_golden.py` there with llama-cpp-python's
//! `llama_model_quantize`) lists, for two tiny F16 T5 encoders made by convcache and every
//! quantized file type, each tensor llama.cpp writes: name, type and a sha256 prefix of its
//! data. convcache converts the same inputs and must give the same list: same tensors in the
//! same order, same types (token embedding, attn_v / ffn_down upgrades by llama.cpp's layer
//! counters, `attn_rel_b` and norms kept, shape fallbacks) and the same bytes.

#![allow(clippy::unwrap_used)] // test code: a failed setup step should fail the test loudly

#[path = "support/sha256.rs"]
mod sha256;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gguf::convert::GgufConversion;
use gguf::source::GgufSource;
use gguf::{Arch, FileType, GgufFile, MetadataValue};
use sha256::sha256;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/t5_llamacpp")
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(golden_dir().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// convcache's conversion of the committed input `file` to `target`, read back.
fn convert(file: &str, target: FileType) -> (GgufConversion, GgufFile) {
    let source = GgufSource::open(&golden_dir().join(file)).unwrap();
    let arch = source.declared_arch();
    let planned = GgufConversion::plan(Box::new(source), arch, target, &BTreeMap::new()).unwrap();
    let mut out = Vec::new();
    planned.write(&mut out, &mut |_, _| {}).unwrap();
    let read = GgufFile::from_bytes(out, Path::new("out.gguf")).unwrap();
    (planned, read)
}

/// (name, type, sha256 prefix) of every tensor, in file order.
fn listing(file: &GgufFile) -> Vec<(String, String, String)> {
    file.tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.ggml_type.name().to_owned(),
                sha256(file.tensor_data(t))[..16].to_owned(),
            )
        })
        .collect()
}

#[test]
fn every_file_type_equals_llama_quantize_tensor_for_tensor() {
    let expected = expected();
    let inputs = expected["inputs"].as_object().unwrap();
    assert_eq!(inputs.len(), 2);
    for (file, outputs) in inputs {
        let outputs = outputs.as_object().unwrap();
        // Every quantized file type convcache offers (the plain floats are not llama-quantize's).
        let offered: Vec<FileType> = FileType::ALL
            .into_iter()
            .filter(|t| t.base_type().is_quantized())
            .collect();
        assert_eq!(outputs.len(), offered.len(), "{file}");
        for target in offered {
            let want: Vec<(String, String, String)> = outputs[target.name()]
                .as_array()
                .unwrap_or_else(|| panic!("{file}: no {target} in the golden"))
                .iter()
                .map(|t| {
                    let f = |i: usize| t[i].as_str().unwrap().to_owned();
                    (f(0), f(1), f(2))
                })
                .collect();
            let (_, got) = convert(file, target);
            let got = listing(&got);
            assert_eq!(got.len(), want.len(), "{file} {target}: tensor count");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g, w, "{file} {target}");
            }
        }
    }
}

#[test]
fn the_golden_exercises_the_rules_it_checks() {
    // Guards against a golden that would pass with the diffusion-model rules: the rules that
    // differ from them show in it.
    let expected = expected();
    let t5 = &expected["inputs"]["t5_d256_F16.gguf"];
    let ty = |ft: &str, name: &str| {
        t5[ft]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t[0] == name)
            .map(|t| t[1].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("{ft} {name}"))
    };
    // The token embedding is quantized like a tied output: Q6_K, Q8_0 kept for Q8_0.
    assert_eq!(ty("Q4_K_M", "token_embd.weight"), "Q6_K");
    assert_eq!(ty("Q4_0", "token_embd.weight"), "Q6_K");
    assert_eq!(ty("Q8_0", "token_embd.weight"), "Q8_0");
    // attn_rel_b and the norms are never quantized.
    assert_eq!(ty("Q4_K_M", "enc.blk.0.attn_rel_b.weight"), "F32");
    assert_eq!(ty("Q4_K_M", "enc.output_norm.weight"), "F32");
    // use_more_bits counts attn_v in name order (0, 1, 10, 11, 2, ...): of 12, positions
    // 0, 3, 6, 9, 10, 11 get Q6_K, i.e. blocks 0, 11, 4, 7, 8, 9.
    let q6: Vec<usize> = (0..12)
        .filter(|b| ty("Q4_K_M", &format!("enc.blk.{b}.attn_v.weight")) == "Q6_K")
        .collect();
    assert_eq!(q6, [0, 4, 7, 8, 9, 11]);
    // No ffn_down upgrade for Q4_0 without an imatrix (ComfyUI-GGUF's patch gives Q4_1).
    assert_eq!(ty("Q4_0", "enc.blk.2.ffn_down.weight"), "Q4_0");
    // Rows of 32: llama.cpp's fallbacks (Q4_K to Q5_0, Q6_K to Q8_0), not F16.
    assert_eq!(ty("Q4_K_M", "enc.blk.2.attn_o.weight"), "Q5_0");
    assert_eq!(ty("Q4_K_M", "enc.blk.0.ffn_down.weight"), "Q8_0");
    let umt5 = &expected["inputs"]["umt5_d160_F16.gguf"];
    let token = umt5["Q4_K_M"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t[0] == "token_embd.weight")
        .unwrap();
    // d_model 160 is not a multiple of 256: the output rule's Q8_0.
    assert_eq!(token[1], "Q8_0");
}

#[test]
fn t5_ggufs_carry_the_hyperparameters_llama_cpp_needs() {
    let (planned, out) = convert("umt5_d160_F16.gguf", FileType::Q4KM);
    assert_eq!(planned.gguf_plan().arch, Arch::Umt5xxl);
    let get = |k: &str| out.get(k).cloned();
    let u = |v: u32| Some(MetadataValue::U32(v));
    assert_eq!(get("t5encoder.context_length"), u(512));
    assert_eq!(get("t5encoder.embedding_length"), u(160));
    assert_eq!(get("t5encoder.feed_forward_length"), u(64));
    assert_eq!(get("t5encoder.block_count"), u(2));
    assert_eq!(get("t5encoder.attention.head_count"), u(2));
    assert_eq!(get("t5encoder.attention.key_length"), u(16));
    assert_eq!(get("t5encoder.attention.value_length"), u(16));
    assert_eq!(get("t5encoder.attention.relative_buckets_count"), u(32));
    for k in [
        "t5encoder.attention.layer_norm_epsilon",
        "t5encoder.attention.layer_norm_rms_epsilon",
    ] {
        assert_eq!(get(k), Some(MetadataValue::F32(1e-6)), "{k}");
    }
    // The fallbacks are reported.
    let warnings = planned.gguf_plan().warnings();
    assert!(
        warnings.iter().any(|w| w.contains("llama.cpp's fallback")),
        "{warnings:?}"
    );
}
