//! The newer architectures and the text encoders (`fixtures/archs/`, real key layouts with
//! tiny dims): each is detected from its key set, converted to Q4_K_M with the per-tensor
//! types of its table, written under the `general.architecture` ComfyUI-GGUF's loaders
//! accept, with the source's metadata (LTX-2's `config`); T5 names map back to ComfyUI's keys
//! through the loader's own map; CLIP is refused. `gguf_py_listing.json` (made by
//! `golden/archs/make_golden.py` with gguf-py) is what gguf-py reads in these outputs.

#![allow(clippy::unwrap_used)] // test code: a failed setup step should fail the test loudly

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gguf::convert::GgufConversion;
use gguf::mix::PlanError;
use gguf::text_encoder::comfyui_gguf_t5_key;
use gguf::{Arch, FileType, GgmlType, GgufFile, MetadataValue};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/archs")
        .join(name)
}

fn convert(file: &str, target: FileType) -> (GgufConversion, GgufFile) {
    let source = tensorfile::open_safetensors(&fixture(file)).unwrap();
    let planned = GgufConversion::plan(source, None, target, &BTreeMap::new()).unwrap();
    let mut out = Vec::new();
    planned.write(&mut out, &mut |_, _| {}).unwrap();
    assert_eq!(out.len() as u64, planned.output_len());
    (
        planned,
        GgufFile::from_bytes(out, Path::new("out.gguf")).unwrap(),
    )
}

/// (fixture, detected arch, general.architecture, [(GGUF tensor, Q4_K_M type)]).
type Case = (
    &'static str,
    Arch,
    &'static str,
    &'static [(&'static str, GgmlType)],
);

use GgmlType::{BF16, F16, F32, Q4K, Q5_0, Q5K, Q6K, Q8_0};

/// The Q4_K_M type tables. BF16 sources keep unquantized 2-D tensors in BF16 and 1-D or
/// <= 1024-element ones in F32; F16 sources keep F16. Rows not divisible by 256 fall back to
/// F16 (K-quants).
const CASES: &[Case] = &[
    (
        "flux2_bf16.safetensors",
        Arch::Flux2,
        "flux",
        &[
            ("double_blocks.0.img_attn.qkv.weight", Q5K),
            ("double_blocks.0.img_attn.proj.weight", Q4K),
            ("double_blocks.0.img_mlp.2.weight", Q4K),
            ("single_blocks.0.linear1.weight", Q4K),
            ("double_stream_modulation_img.lin.weight", BF16),
            ("double_stream_modulation_txt.lin.weight", BF16),
            ("single_stream_modulation.lin.weight", BF16),
            ("img_in.weight", BF16),
            ("txt_in.weight", BF16),
            ("final_layer.linear.weight", BF16),
            ("time_in.out_layer.weight", F32),
            ("double_blocks.0.img_attn.norm.query_norm.scale", F32),
        ],
    ),
    (
        "chroma_bf16.safetensors",
        Arch::Chroma,
        "flux",
        &[
            ("double_blocks.0.img_attn.qkv.weight", Q5K),
            ("double_blocks.0.txt_mlp.0.weight", Q4K),
            ("single_blocks.0.linear2.weight", Q4K),
            ("distilled_guidance_layer.in_proj.weight", BF16),
            ("distilled_guidance_layer.layers.0.in_layer.weight", BF16),
            ("distilled_guidance_layer.out_proj.weight", BF16),
            ("distilled_guidance_layer.norms.1.scale", F32),
            ("img_in.weight", BF16),
            ("final_layer.linear.weight", BF16),
        ],
    ),
    (
        "ltxav_bf16.safetensors",
        Arch::Ltxav,
        "ltxv",
        &[
            ("transformer_blocks.0.attn1.to_q.weight", Q4K),
            ("transformer_blocks.0.attn1.to_v.weight", Q6K),
            ("transformer_blocks.0.audio_attn2.to_v.weight", Q6K),
            ("transformer_blocks.0.audio_to_video_attn.to_k.weight", Q4K),
            ("transformer_blocks.0.video_to_audio_attn.to_v.weight", Q6K),
            ("transformer_blocks.0.ff.net.0.proj.weight", Q4K),
            ("transformer_blocks.0.audio_ff.net.0.proj.weight", Q4K),
            // Rows of 32: the K-quant fallback.
            ("transformer_blocks.0.attn1.to_out.0.weight", F16),
            ("transformer_blocks.0.ff.net.2.weight", F16),
            ("transformer_blocks.0.scale_shift_table", F32),
            ("transformer_blocks.0.audio_scale_shift_table", F32),
            ("transformer_blocks.0.scale_shift_table_a2v_ca_audio", F32),
            ("transformer_blocks.0.scale_shift_table_a2v_ca_video", F32),
            ("scale_shift_table", F32),
            ("audio_scale_shift_table", F32),
            ("adaln_single.linear.weight", BF16),
            ("audio_adaln_single.linear.weight", BF16),
            ("av_ca_video_scale_shift_adaln_single.linear.weight", BF16),
            ("av_ca_a2v_gate_adaln_single.linear.weight", BF16),
            ("audio_caption_projection.linear_1.weight", BF16),
            ("audio_patchify_proj.weight", BF16),
            ("patchify_proj.weight", BF16),
            ("audio_proj_out.weight", BF16),
            ("proj_out.weight", BF16),
        ],
    ),
    (
        "hyvid15_bf16.safetensors",
        Arch::Hyvid15,
        "hyvid",
        &[
            ("double_blocks.0.img_attn_qkv.weight", Q5K),
            ("double_blocks.0.txt_attn_proj.weight", Q4K),
            ("double_blocks.0.img_mlp.fc2.weight", Q4K),
            ("double_blocks.0.img_mod.linear.weight", Q4K),
            ("byt5_in.fc1.weight", Q4K),
            ("vision_in.proj.1.weight", Q4K),
            // Rows of 32: the K-quant fallback.
            ("byt5_in.fc2.weight", F16),
            // The LayerNorms of the vision and ByT5 inputs.
            ("vision_in.proj.0.weight", F32),
            ("byt5_in.layernorm.weight", F32),
            ("cond_type_embedding.weight", BF16),
            (
                "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight",
                BF16,
            ),
            ("time_in.mlp.0.weight", BF16),
            ("time_in.mlp.2.weight", F32),
            ("final_layer.linear.weight", BF16),
            // 5-D Conv3d: F32 with all its dims.
            ("img_in.proj.weight", F32),
        ],
    ),
    (
        "z_image_bf16.safetensors",
        Arch::ZImage,
        "lumina2",
        &[
            ("layers.0.attention.qkv.weight", Q5K),
            ("layers.0.feed_forward.w1.weight", Q4K),
            ("layers.0.feed_forward.w3.weight", Q4K),
            ("layers.0.feed_forward.w2.weight", F16),
            ("layers.0.attention.out.weight", F16),
            ("noise_refiner.0.attention.qkv.weight", BF16),
            ("context_refiner.0.feed_forward.w1.weight", BF16),
            ("cap_embedder.1.weight", BF16),
            ("x_embedder.weight", BF16),
            ("x_pad_token", F32),
            ("cap_pad_token", F32),
        ],
    ),
    (
        "wan22_ti2v_5b_bf16.safetensors",
        Arch::Wan,
        "wan",
        &[
            ("blocks.0.self_attn.q.weight", Q4K),
            ("blocks.0.self_attn.v.weight", Q6K),
            ("blocks.0.cross_attn.v.weight", Q6K),
            ("blocks.0.ffn.0.weight", Q4K),
            ("blocks.0.ffn.2.weight", F16),
            ("blocks.0.modulation", F32),
            ("head.modulation", F32),
            ("head.head.weight", BF16),
            ("text_embedding.2.weight", BF16),
            ("time_projection.1.weight", BF16),
            ("patch_embedding.weight", F32),
        ],
    ),
    (
        "wan22_i2v_a14b_high_noise_bf16.safetensors",
        Arch::Wan,
        "wan",
        &[
            ("blocks.0.self_attn.k.weight", Q4K),
            ("blocks.0.self_attn.v.weight", Q6K),
            ("head.head.weight", BF16),
            ("patch_embedding.weight", F32),
        ],
    ),
    (
        "t5xxl_fp16.safetensors",
        Arch::T5xxl,
        "t5encoder",
        &[
            // llama.cpp's rules (golden/t5_llamacpp checks them against llama-quantize):
            // of 2 attn_v / ffn_down, use_more_bits upgrades only the second.
            ("enc.blk.0.attn_q.weight", Q4K),
            ("enc.blk.0.attn_k.weight", Q4K),
            ("enc.blk.0.attn_v.weight", Q4K),
            ("enc.blk.1.attn_v.weight", Q6K),
            ("enc.blk.1.ffn_gate.weight", Q4K),
            ("enc.blk.1.ffn_up.weight", Q4K),
            // Rows of 32: llama.cpp's fallbacks Q4_K -> Q5_0, Q6_K -> Q8_0.
            ("enc.blk.0.ffn_down.weight", Q5_0),
            ("enc.blk.1.ffn_down.weight", Q8_0),
            ("enc.blk.0.attn_o.weight", Q5_0),
            ("enc.blk.0.attn_rel_b.weight", F16),
            // Norms F32, as llama.cpp's converter stores them.
            ("enc.blk.0.attn_norm.weight", F32),
            ("enc.output_norm.weight", F32),
            // Quantized as llama.cpp's tied output.
            ("token_embd.weight", Q6K),
        ],
    ),
    (
        "t5xxl_fp8_e4m3fn.safetensors",
        Arch::T5xxl,
        "t5encoder",
        &[
            ("enc.blk.0.attn_q.weight", Q4K),
            ("enc.blk.1.attn_v.weight", Q6K),
            ("token_embd.weight", Q6K),
            ("enc.blk.0.attn_rel_b.weight", F16),
        ],
    ),
    (
        "umt5xxl_bf16.safetensors",
        Arch::Umt5xxl,
        "t5encoder",
        &[
            ("enc.blk.1.attn_q.weight", Q4K),
            ("enc.blk.1.attn_v.weight", Q6K),
            ("token_embd.weight", Q6K),
            ("enc.blk.0.attn_rel_b.weight", F32),
            ("enc.blk.1.attn_rel_b.weight", F32),
            ("enc.blk.1.ffn_norm.weight", F32),
        ],
    ),
];

#[test]
fn each_architecture_is_detected_and_typed_by_its_table() {
    for &(file, arch, gguf_name, table) in CASES {
        let (planned, out) = convert(file, FileType::Q4KM);
        let plan = planned.gguf_plan();
        assert_eq!(plan.arch, arch, "{file}");
        assert_eq!(out.architecture(), Some(gguf_name), "{file}");
        for &(name, want) in table {
            let t = out
                .tensors
                .iter()
                .find(|t| t.name == name)
                .unwrap_or_else(|| panic!("{file}: no tensor {name}"));
            assert_eq!(t.ggml_type, want, "{file}: {name}");
        }
        // Nothing of the source is lost but integer tensors.
        let source = tensorfile::open_safetensors(&fixture(file)).unwrap();
        let dropped: Vec<&str> = plan.dropped.iter().map(|d| d.name.as_str()).collect();
        for t in source.tensors() {
            let kept = plan.tensors.iter().any(|p| p.source_name == t.name);
            assert!(
                kept || dropped.contains(&t.name.as_str()),
                "{file}: {}",
                t.name
            );
        }
    }
}

#[test]
fn t5_names_map_back_through_comfyui_ggufs_loader() {
    for file in [
        "t5xxl_fp16.safetensors",
        "t5xxl_fp8_e4m3fn.safetensors",
        "umt5xxl_bf16.safetensors",
    ] {
        let (planned, out) = convert(file, FileType::Q8_0);
        for p in &planned.gguf_plan().tensors {
            assert_eq!(comfyui_gguf_t5_key(&p.name), p.source_name, "{file}");
        }
        assert_eq!(out.tensors.len(), planned.gguf_plan().tensors.len());
    }
    // The tokenizer bytes of a Comfy-Org umt5 file are not a weight.
    let (planned, _) = convert("umt5xxl_bf16.safetensors", FileType::Q8_0);
    assert!(
        planned
            .gguf_plan()
            .dropped
            .iter()
            .any(|d| d.name == "spiece_model")
    );
}

/// LTX-2's single-file checkpoint: the transformer's `model.diffusion_model.` keys go into the
/// GGUF without the prefix (the names ComfyUI-GGUF's loader reads); the unprefixed text
/// projection is no part of the diffusion model and is dropped, as convert.py drops it.
#[test]
fn ltx2_checkpoint_gguf_holds_the_transformer_only() {
    let (planned, out) = convert("ltxav_bf16.safetensors", FileType::Q4KM);
    let source = tensorfile::open_safetensors(&fixture("ltxav_bf16.safetensors")).unwrap();
    let transformer: Vec<&str> = source
        .tensors()
        .iter()
        .filter_map(|t| t.name.strip_prefix("model.diffusion_model."))
        .collect();
    assert!(transformer.len() > 100, "{}", transformer.len());
    let names: Vec<&str> = out.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names.len(), transformer.len());
    for name in transformer {
        assert!(names.contains(&name), "{name}");
    }
    let dropped: Vec<&str> = planned
        .gguf_plan()
        .dropped
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(
        dropped,
        ["text_embedding_projection.aggregate_embed.weight"]
    );
}

#[test]
fn ltx2_gguf_carries_the_config_metadata() {
    let source = tensorfile::open_safetensors(&fixture("ltxav_bf16.safetensors")).unwrap();
    let config = source.metadata().get("config").unwrap().clone();
    let (_, out) = convert("ltxav_bf16.safetensors", FileType::Q8_0);
    let got = out.metadata.iter().find(|(k, _)| k == "config");
    assert_eq!(got.map(|(_, v)| v), Some(&MetadataValue::String(config)));
}

#[test]
fn clip_text_encoders_are_refused_with_the_reason() {
    for (file, arch) in [
        ("clip_l_fp16.safetensors", Arch::ClipL),
        ("clip_g_fp16.safetensors", Arch::ClipG),
    ] {
        let source = tensorfile::open_safetensors(&fixture(file)).unwrap();
        let err = match GgufConversion::plan(source, None, FileType::Q8_0, &BTreeMap::new()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{file}: a CLIP GGUF was planned"),
        };
        assert!(err.contains(file), "{err}");
        assert!(err.contains("ComfyUI-GGUF cannot load CLIP"), "{err}");
        let keys = tensorfile::open_safetensors(&fixture(file)).unwrap();
        let names: Vec<&str> = keys.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(gguf::detect_arch(names).unwrap(), arch);
        let inputs: Vec<gguf::mix::InputTensor<'_>> = Vec::new();
        assert!(matches!(
            gguf::mix::plan(&inputs, Some(arch), FileType::Q8_0),
            Err(PlanError::NoGguf { .. })
        ));
    }
}

/// What gguf-py read in each output (`golden/archs/gguf_py_listing.json`): every tensor's
/// name, type and shape and every metadata key with its value (convcache's provenance keys
/// left out), for the Q4_K_M output convcache writes of each fixture.
#[test]
fn outputs_are_what_gguf_py_read() {
    let golden_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/archs/gguf_py_listing.json");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&golden_path).unwrap()).unwrap();
    let files = golden["files"].as_object().unwrap();
    assert!(files.len() >= 9, "{}", files.len());
    for (file, want) in files {
        let (_, out) = convert(file, FileType::Q4KM);
        let tensors: Vec<serde_json::Value> = out
            .tensors
            .iter()
            .map(|t| {
                serde_json::json!([
                    t.name,
                    t.ggml_type.name(),
                    t.dims.iter().rev().collect::<Vec<_>>()
                ])
            })
            .collect();
        assert_eq!(
            &serde_json::Value::Array(tensors),
            &want["tensors"],
            "{file}"
        );
        let mut meta = serde_json::Map::new();
        for (k, v) in &out.metadata {
            if k.starts_with("convcache.") {
                continue;
            }
            meta.insert(k.clone(), json_of(v));
        }
        assert_eq!(
            &serde_json::Value::Object(meta),
            &want["metadata"],
            "{file}"
        );
    }
}

fn json_of(v: &MetadataValue) -> serde_json::Value {
    match v {
        MetadataValue::String(s) => serde_json::json!(s),
        MetadataValue::U32(n) => serde_json::json!(n),
        MetadataValue::I32(n) => serde_json::json!(n),
        MetadataValue::F32(x) => serde_json::json!(f64::from(*x)),
        MetadataValue::Bool(b) => serde_json::json!(b),
        MetadataValue::Array(a) => serde_json::Value::Array(a.iter().map(json_of).collect()),
        other => serde_json::json!(format!("{other:?}")),
    }
}

#[test]
fn umt5_gguf_carries_the_tokenizer_comfyui_gguf_rebuilds() {
    let (planned, out) = convert("umt5xxl_bf16.safetensors", FileType::Q8_0);
    assert!(planned.gguf_plan().metadata.len() > 3);
    let get = |k: &str| out.metadata.iter().find(|(n, _)| n == k).map(|(_, v)| v);
    assert_eq!(
        get("tokenizer.ggml.model"),
        Some(&MetadataValue::String("t5".into()))
    );
    let Some(MetadataValue::Array(tokens)) = get("tokenizer.ggml.tokens") else {
        panic!("no tokens")
    };
    // The 10 pieces, padded to the 128 embedding rows as llama.cpp's converter pads.
    assert_eq!(tokens.len(), 128);
    assert_eq!(tokens[4], MetadataValue::String("\u{2581}a".into()));
    assert_eq!(tokens[10], MetadataValue::String("[PAD10]".into()));
    assert_eq!(
        get("tokenizer.ggml.eos_token_id"),
        Some(&MetadataValue::U32(1))
    );
    assert_eq!(
        get("tokenizer.ggml.padding_token_id"),
        Some(&MetadataValue::U32(0))
    );
    assert_eq!(
        get("tokenizer.ggml.remove_extra_whitespaces"),
        Some(&MetadataValue::Bool(false))
    );
    // T5-XXL (no spiece_model) gets none and no warning; it is not needed there.
    let (planned, out) = convert("t5xxl_fp16.safetensors", FileType::Q8_0);
    assert!(
        out.metadata
            .iter()
            .all(|(k, _)| !k.starts_with("tokenizer."))
    );
    assert!(planned.warnings().is_empty(), "{:?}", planned.warnings());
}

#[test]
fn a_t5_gguf_source_serves_comfyuis_keys_and_round_trips() {
    let (planned, _) = convert("umt5xxl_bf16.safetensors", FileType::Q8_0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("umt5xxl_Q8_0.gguf");
    let mut out = Vec::new();
    planned.write(&mut out, &mut |_, _| {}).unwrap();
    std::fs::write(&path, out).unwrap();
    let source = gguf::source::GgufSource::open(&path).unwrap();
    let original = tensorfile::open_safetensors(&fixture("umt5xxl_bf16.safetensors")).unwrap();
    let mut want: Vec<&str> = original
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| *n != "spiece_model")
        .collect();
    want.sort();
    use tensorfile::TensorSource;
    let mut got: Vec<&str> = source.tensors().iter().map(|t| t.name.as_str()).collect();
    got.sort();
    assert_eq!(got, want);
    assert_eq!(source.declared_arch(), Some(Arch::Umt5xxl));
    // Requantized, the names go back to llama.cpp's.
    let again =
        GgufConversion::requantize(source, None, FileType::Q4KM, &BTreeMap::new(), "Q8_0").unwrap();
    assert!(
        again
            .gguf_plan()
            .tensors
            .iter()
            .all(|t| comfyui_gguf_t5_key(&t.name) == t.source_name)
    );
    assert_eq!(again.gguf_plan().arch, Arch::Umt5xxl);
}

/// ComfyUI's `t5xxl_fp8_e4m3fn_scaled` layout (the legacy `scaled_fp8` marker and a
/// `scale_weight` per fp8 weight), built from the fp8 fixture: detected as T5-XXL, its weights
/// de-scaled, its scales and marker dropped, the rest named as for any T5.
#[test]
fn scaled_fp8_t5_converts_like_any_t5() {
    use tensorfile::safetensors::Dtype;
    use tensorfile::safetensors::writer::write_file;
    let src = tensorfile::SafetensorsFile::open(&fixture("t5xxl_fp8_e4m3fn.safetensors")).unwrap();
    let bytes = std::fs::read(fixture("t5xxl_fp8_e4m3fn.safetensors")).unwrap();
    let header = &src.header;
    let data_start =
        bytes.len() - header.tensors.iter().map(|t| t.byte_len()).sum::<u64>() as usize;
    let half = 0.5f32.to_le_bytes();
    let mut tensors: Vec<(String, Dtype, Vec<u64>, Vec<u8>)> = Vec::new();
    for t in &header.tensors {
        let (a, b) = t.data_offsets;
        let data = bytes[data_start + a as usize..data_start + b as usize].to_vec();
        tensors.push((t.name.clone(), t.dtype, t.shape.clone(), data));
        if t.dtype == Dtype::F8E4M3 {
            let layer = t.name.strip_suffix(".weight").unwrap();
            tensors.push((
                format!("{layer}.scale_weight"),
                Dtype::F32,
                vec![],
                half.to_vec(),
            ));
        }
    }
    tensors.push(("scaled_fp8".into(), Dtype::F8E4M3, vec![0], Vec::new()));
    let whole: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t5xxl_fp8_e4m3fn_scaled.safetensors");
    write_file(&path, &whole, &BTreeMap::new()).unwrap();

    let source = tensorfile::open_safetensors(&path).unwrap();
    let planned = GgufConversion::plan(source, None, FileType::Q8_0, &BTreeMap::new()).unwrap();
    let plan = planned.gguf_plan();
    assert_eq!(plan.arch, Arch::T5xxl);
    assert!(plan.dropped.iter().any(|d| d.name == "scaled_fp8"));
    assert!(
        plan.dropped
            .iter()
            .any(|d| d.name == "encoder.block.0.layer.0.SelfAttention.q.scale_weight")
    );
    assert!(
        plan.tensors
            .iter()
            .all(|t| !t.name.contains("scale_weight"))
    );
    for t in &plan.tensors {
        assert_eq!(comfyui_gguf_t5_key(&t.name), t.source_name);
    }
    let q = plan
        .tensors
        .iter()
        .find(|t| t.name == "enc.blk.0.attn_q.weight")
        .unwrap();
    assert_eq!(q.ggml_type, GgmlType::Q8_0);
}

/// Q8_0 (block 32) and Q5_K_M tables of LTX-2 and T5: rows of 32 quantize at Q8_0, the
/// excluded tensors keep their base type at every target.
#[test]
fn other_targets_follow_the_same_tables() {
    type Table = &'static [(&'static str, GgmlType)];
    let cases: &[(&str, FileType, Table)] = &[
        (
            "ltxav_bf16.safetensors",
            FileType::Q8_0,
            &[
                ("transformer_blocks.0.attn1.to_out.0.weight", GgmlType::Q8_0),
                ("transformer_blocks.0.ff.net.2.weight", GgmlType::Q8_0),
                ("transformer_blocks.0.attn1.to_v.weight", GgmlType::Q8_0),
                ("transformer_blocks.0.scale_shift_table", F32),
                ("audio_adaln_single.linear.weight", BF16),
            ],
        ),
        (
            "ltxav_bf16.safetensors",
            FileType::Q5KM,
            &[
                ("transformer_blocks.0.attn1.to_q.weight", GgmlType::Q5K),
                ("transformer_blocks.0.attn1.to_v.weight", Q6K),
                ("transformer_blocks.0.audio_ff.net.2.weight", F16),
                ("audio_proj_out.weight", BF16),
            ],
        ),
        (
            "t5xxl_fp16.safetensors",
            FileType::Q8_0,
            &[
                ("enc.blk.0.attn_o.weight", GgmlType::Q8_0),
                ("enc.blk.1.ffn_down.weight", GgmlType::Q8_0),
                ("enc.blk.0.attn_rel_b.weight", F16),
                ("token_embd.weight", GgmlType::Q8_0),
            ],
        ),
        (
            "t5xxl_fp16.safetensors",
            FileType::Q5KM,
            &[
                ("enc.blk.0.attn_q.weight", GgmlType::Q5K),
                ("enc.blk.1.attn_v.weight", Q6K),
                ("token_embd.weight", Q6K),
            ],
        ),
    ];
    for &(file, target, table) in cases {
        let (_, out) = convert(file, target);
        for &(name, want) in table {
            let t = out.tensors.iter().find(|t| t.name == name).unwrap();
            assert_eq!(t.ggml_type, want, "{file} {target}: {name}");
        }
    }
}
