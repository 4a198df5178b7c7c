//! `fixtures/archs/`: the key layouts of the newer architectures and of the text encoders,
//! with tiny dims (one file each).
//!
//! Key names are those of the files ComfyUI users load, as found in real key lists (each
//! function cites its evidence; `crates/detect/tests/real_key_sets/` holds the lists and
//! `crates/detect/tests/real_key_sets.rs` detects each one). Widths are
//! small but the input width (the GGUF row) of the block linears is 256, so a K-quant target
//! quantizes them and the per-tensor type tables are the real ones; the embedders and heads
//! keep narrower rows. Values as in the other fixtures.

use std::collections::BTreeMap;

use tensorfile::safetensors::Dtype;

use super::{Content, Entry, FileSpec};
use crate::layouts::{Init, Layout};

/// The GGUF row width of the block linears.
const ROW: u64 = 256;
/// Their output width (kept small: the files stay small).
const OUT: u64 = 32;

/// Every file of `fixtures/archs/`, with its detected architecture.
pub fn specs() -> Vec<FileSpec> {
    let bf16 = |_: &[u64]| Dtype::BF16;
    let f16 = |_: &[u64]| Dtype::F16;
    let mut v = vec![
        spec("flux2_bf16.safetensors", &flux2(), "bf16", bf16),
        spec("chroma_bf16.safetensors", &chroma(), "bf16", bf16),
        spec("hyvid15_bf16.safetensors", &hyvid15(), "bf16", bf16),
        spec("z_image_bf16.safetensors", &z_image(), "bf16", bf16),
        spec(
            "wan22_ti2v_5b_bf16.safetensors",
            &wan22(48, 48),
            "bf16",
            bf16,
        ),
        spec(
            "wan22_i2v_a14b_high_noise_bf16.safetensors",
            &wan22(36, 16),
            "bf16",
            bf16,
        ),
        spec("t5xxl_fp16.safetensors", &t5(false), "fp16", f16),
        spec(
            "t5xxl_fp8_e4m3fn.safetensors",
            &t5(false),
            "fp8_e4m3fn",
            |s: &[u64]| {
                if s.len() >= 2 {
                    Dtype::F8E4M3
                } else {
                    Dtype::F16
                }
            },
        ),
        spec("clip_l_fp16.safetensors", &clip(12, false), "fp16", f16),
        spec("clip_g_fp16.safetensors", &clip(32, true), "fp16", f16),
    ];
    let mut ltx = FileSpec::from_layout(
        "ltxav_bf16.safetensors".into(),
        &ltxav_checkpoint(),
        "bf16",
        bf16,
        LTX_PREFIX,
    );
    ltx.metadata = BTreeMap::from([("format".into(), "pt".into())]);
    // LTX-2 checkpoints carry their transformer config, which ComfyUI's model detection
    // reads (and ComfyUI-GGUF hands back from the GGUF's string metadata).
    ltx.metadata.insert(
        "config".into(),
        r#"{"transformer": {"num_layers": 1, "attention_head_dim": 64, "cross_attention_dim": 64, "audio_attention_head_dim": 64}}"#.into(),
    );
    v.push(ltx);
    let mut umt5 = spec("umt5xxl_bf16.safetensors", &t5(true), "bf16", bf16);
    // Comfy-Org's umt5 files carry the SentencePiece model as a U8 tensor.
    umt5.entries.push(Entry {
        name: "spiece_model".into(),
        seed_name: "spiece_model".into(),
        shape: vec![spiece_model().len() as u64],
        dtype: Dtype::U8,
        content: Content::Bytes(spiece_model),
    });
    umt5.sort_like_safetensors();
    v.push(umt5);
    v.sort_by(|a, b| a.file.cmp(&b.file));
    v
}

fn spec(
    file: &str,
    layout: &Layout,
    precision: &'static str,
    dtype_of: impl Fn(&[u64]) -> Dtype,
) -> FileSpec {
    let mut s = FileSpec::from_layout(file.into(), layout, precision, dtype_of, "");
    s.metadata = BTreeMap::from([("format".into(), "pt".into())]);
    s
}

/// Flux.2: Flux's blocks without biases, shared modulation (`double_stream_modulation_*`:
/// 6 vectors, `single_stream_modulation`: 3), no `vector_in`. Evidence: the key list of
/// Comfy-Org's `flux2_dev_fp8mixed.safetensors` in invoke-ai/InvokeAI
/// `tests/backend/model_manager/load/state_dicts/flux2_transformer_fp8mixed_keys.py`.
fn flux2() -> Layout {
    let mut l = Layout::new("flux2");
    l.linear("img_in", OUT, 128, false);
    l.linear("txt_in", OUT, ROW, false);
    l.linear("time_in.in_layer", OUT, ROW, false);
    l.linear("time_in.out_layer", OUT, OUT, false);
    l.linear("guidance_in.in_layer", OUT, ROW, false);
    l.linear("guidance_in.out_layer", OUT, OUT, false);
    l.linear("double_stream_modulation_img.lin", 6 * OUT, ROW, false);
    l.linear("double_stream_modulation_txt.lin", 6 * OUT, ROW, false);
    l.linear("single_stream_modulation.lin", 3 * OUT, ROW, false);
    flux_blocks(&mut l, false);
    l.linear("final_layer.adaLN_modulation.1", 2 * OUT, ROW, false);
    l.linear("final_layer.linear", 128, ROW, false);
    l
}

/// Chroma: Flux's blocks (with biases), no modulation linears and no `time_in`/`guidance_in`/
/// `final_layer.adaLN_modulation`; the `distilled_guidance_layer` approximator makes the
/// modulation instead: `in_proj` [hidden, 64], square `layers.N.{in,out}_layer`
/// [hidden, hidden], `norms.N.scale` [hidden], `out_proj` [model width, hidden]. Evidence: the
/// shapes of lodestone's checkpoint in huggingface/diffusers#11010 and the keys
/// diffusers' `convert_chroma_transformer_checkpoint_to_diffusers` consumes.
fn chroma() -> Layout {
    // Narrower than the blocks' rows (the files stay small), wide enough that each of its
    // matrices has more than 1024 elements as the real ones do.
    let hidden = 64;
    let mut l = Layout::new("chroma");
    l.linear("img_in", OUT, 64, true);
    l.linear("txt_in", OUT, ROW, true);
    l.linear("distilled_guidance_layer.in_proj", hidden, 64, true);
    for i in 0..2 {
        let p = format!("distilled_guidance_layer.layers.{i}");
        l.linear(&format!("{p}.in_layer"), hidden, hidden, true);
        l.linear(&format!("{p}.out_layer"), hidden, hidden, true);
        l.param(
            format!("distilled_guidance_layer.norms.{i}.scale"),
            &[hidden],
            Init::Norm,
        );
    }
    l.linear("distilled_guidance_layer.out_proj", OUT, hidden, true);
    flux_blocks(&mut l, true);
    l.linear("final_layer.linear", 64, ROW, true);
    l
}

fn flux_blocks(l: &mut Layout, bias: bool) {
    let p = "double_blocks.0";
    for s in ["img", "txt"] {
        l.linear(&format!("{p}.{s}_attn.qkv"), 3 * OUT, ROW, bias);
        l.param(
            format!("{p}.{s}_attn.norm.query_norm.scale"),
            &[32],
            Init::Norm,
        );
        l.param(
            format!("{p}.{s}_attn.norm.key_norm.scale"),
            &[32],
            Init::Norm,
        );
        l.linear(&format!("{p}.{s}_attn.proj"), OUT, ROW, bias);
        l.linear(&format!("{p}.{s}_mlp.0"), OUT, ROW, bias);
        l.linear(&format!("{p}.{s}_mlp.2"), OUT, ROW, bias);
    }
    let p = "single_blocks.0";
    l.linear(&format!("{p}.linear1"), 3 * OUT, ROW, bias);
    l.linear(&format!("{p}.linear2"), OUT, ROW, bias);
    l.param(format!("{p}.norm.query_norm.scale"), &[32], Init::Norm);
    l.param(format!("{p}.norm.key_norm.scale"), &[32], Init::Norm);
}

/// The prefix of the transformer's keys in LTX-2's single-file checkpoint.
const LTX_PREFIX: &str = "model.diffusion_model.";

/// LTX-2 as ComfyUI users load it (`ltx-2-19b-dev*.safetensors`): one checkpoint whose
/// transformer keys carry `model.diffusion_model.`, beside unprefixed components (the text
/// projection `text_embedding_projection.*`, and `vae.*`, `audio_vae.*`, `vocoder.*`, of which
/// the fixture keeps only the text projection: their inner names are not in the evidence).
/// Evidence: ModelTC/LightX2V `lightx2v/models/networks/ltx2/weights/{pre,post,transformer}_weights.py`
/// (the transformer's names, prefixed), modelscope/DiffSynth-Studio
/// `diffsynth/utils/state_dict_converters/ltx2_{dit,text_encoder}.py` (the prefix, the
/// connectors under it and the unprefixed `text_embedding_projection.`).
fn ltxav_checkpoint() -> Layout {
    let mut l = ltxav().prefixed(LTX_PREFIX);
    l.linear("text_embedding_projection.aggregate_embed", OUT, ROW, false);
    l
}

/// LTX-2's transformer (ComfyUI's `ltxav`): LTX-Video's keys plus the audio stream and the
/// audio/video cross attention. `adaln_single.linear` makes 6 vectors per stream, the
/// cross-attention scale/shift ones 4 and the gates 1 (the per-block tables' row counts).
fn ltxav() -> Layout {
    let mut l = Layout::new("ltxav");
    let adaln = |l: &mut Layout, p: &str, coeff: u64| {
        l.linear(
            &format!("{p}.emb.timestep_embedder.linear_1"),
            OUT,
            ROW,
            true,
        );
        l.linear(
            &format!("{p}.emb.timestep_embedder.linear_2"),
            OUT,
            OUT,
            true,
        );
        l.linear(&format!("{p}.linear"), coeff * OUT, ROW, true);
    };
    l.linear("patchify_proj", ROW, 128, true);
    adaln(&mut l, "adaln_single", 6);
    l.linear("caption_projection.linear_1", OUT, ROW, true);
    l.linear("caption_projection.linear_2", OUT, OUT, true);
    l.linear("audio_patchify_proj", ROW, 128, true);
    adaln(&mut l, "audio_adaln_single", 6);
    adaln(&mut l, "av_ca_video_scale_shift_adaln_single", 4);
    adaln(&mut l, "av_ca_a2v_gate_adaln_single", 1);
    adaln(&mut l, "av_ca_audio_scale_shift_adaln_single", 4);
    adaln(&mut l, "av_ca_v2a_gate_adaln_single", 1);
    l.linear("audio_caption_projection.linear_1", OUT, ROW, true);
    l.linear("audio_caption_projection.linear_2", OUT, OUT, true);
    let p = "transformer_blocks.0";
    for a in [
        "attn1",
        "attn2",
        "audio_attn1",
        "audio_attn2",
        "audio_to_video_attn",
        "video_to_audio_attn",
    ] {
        for m in ["to_q", "to_k", "to_v"] {
            l.linear(&format!("{p}.{a}.{m}"), OUT, ROW, true);
        }
        l.linear(&format!("{p}.{a}.to_out.0"), ROW, OUT, true);
        l.param(format!("{p}.{a}.q_norm.weight"), &[OUT], Init::Norm);
        l.param(format!("{p}.{a}.k_norm.weight"), &[OUT], Init::Norm);
    }
    for ff in ["ff", "audio_ff"] {
        l.linear(&format!("{p}.{ff}.net.0.proj"), 2 * OUT, ROW, true);
        l.linear(&format!("{p}.{ff}.net.2"), ROW, OUT, true);
    }
    l.param(format!("{p}.scale_shift_table"), &[6, ROW], Init::Weight);
    l.param(
        format!("{p}.audio_scale_shift_table"),
        &[6, ROW],
        Init::Weight,
    );
    l.param(
        format!("{p}.scale_shift_table_a2v_ca_audio"),
        &[5, ROW],
        Init::Weight,
    );
    l.param(
        format!("{p}.scale_shift_table_a2v_ca_video"),
        &[5, ROW],
        Init::Weight,
    );
    l.param("scale_shift_table", &[2, ROW], Init::Weight);
    l.param("audio_scale_shift_table", &[2, ROW], Init::Weight);
    l.linear("proj_out", 128, ROW, true);
    l.linear("audio_proj_out", 128, ROW, true);
    l
}

/// HunyuanVideo 1.5: HunyuanVideo's double blocks (no single blocks), a 5-D Conv3d
/// `img_in.proj`, `time_in.mlp.{0,2}`, the vision input (`vision_in.proj`: LayerNorm 0,
/// Linear 1 and 3, LayerNorm 4), the ByT5 input (`byt5_in.layernorm`, `fc1`..`fc3`) and
/// `cond_type_embedding` [3, model width]. Evidence: the keys of the HunyuanVideo 1.5 GGUFs (made
/// from the ComfyUI file by ComfyUI-GGUF, which keeps names) that the tt-forge model loader
/// `_convert_hunyuan_video15_transformer_to_diffusers` maps (jayn7/HunyuanVideo-1.5_I2V_720p-GGUF),
/// and ComfyUI's `model_detection.py`, which reads `vision_in.proj.0.weight`'s first dim as
/// the vision width.
fn hyvid15() -> Layout {
    let mut l = Layout::new("hyvid15");
    l.param("img_in.proj.weight", &[OUT, 65, 1, 1, 1], Init::Weight);
    l.param("img_in.proj.bias", &[OUT], Init::Bias);
    l.linear("txt_in.input_embedder", OUT, ROW, true);
    l.linear("txt_in.t_embedder.mlp.0", OUT, ROW, true);
    l.linear("txt_in.t_embedder.mlp.2", OUT, OUT, true);
    l.linear("txt_in.c_embedder.linear_1", OUT, ROW, true);
    l.linear("txt_in.c_embedder.linear_2", OUT, OUT, true);
    for i in 0..2 {
        let p = format!("txt_in.individual_token_refiner.blocks.{i}");
        l.norm(&format!("{p}.norm1"), OUT);
        l.linear(&format!("{p}.self_attn_qkv"), 3 * OUT, ROW, true);
        l.linear(&format!("{p}.self_attn_proj"), OUT, ROW, true);
        l.norm(&format!("{p}.norm2"), OUT);
        l.linear(&format!("{p}.mlp.fc1"), OUT, ROW, true);
        l.linear(&format!("{p}.mlp.fc2"), OUT, ROW, true);
        l.linear(&format!("{p}.adaLN_modulation.1"), 2 * OUT, ROW, true);
    }
    l.linear("time_in.mlp.0", OUT, ROW, true);
    l.linear("time_in.mlp.2", OUT, OUT, true);
    l.norm("vision_in.proj.0", ROW);
    l.linear("vision_in.proj.1", OUT, ROW, true);
    l.linear("vision_in.proj.3", OUT, OUT, true);
    l.norm("vision_in.proj.4", OUT);
    l.norm("byt5_in.layernorm", ROW);
    l.linear("byt5_in.fc1", OUT, ROW, true);
    l.linear("byt5_in.fc2", OUT, OUT, true);
    l.linear("byt5_in.fc3", OUT, OUT, true);
    // More than 1024 elements, as the real [3, 2048] table, so it keeps its type-table row.
    l.param("cond_type_embedding.weight", &[3, 2 * ROW], Init::Weight);
    let p = "double_blocks.0";
    for s in ["img", "txt"] {
        l.linear(&format!("{p}.{s}_mod.linear"), 2 * OUT, ROW, true);
        l.linear(&format!("{p}.{s}_attn_qkv"), 3 * OUT, ROW, true);
        l.param(format!("{p}.{s}_attn_q_norm.weight"), &[32], Init::Norm);
        l.param(format!("{p}.{s}_attn_k_norm.weight"), &[32], Init::Norm);
        l.linear(&format!("{p}.{s}_attn_proj"), OUT, ROW, true);
        l.linear(&format!("{p}.{s}_mlp.fc1"), OUT, ROW, true);
        l.linear(&format!("{p}.{s}_mlp.fc2"), OUT, ROW, true);
    }
    l.linear("final_layer.adaLN_modulation.1", 2 * OUT, ROW, true);
    l.linear("final_layer.linear", 32, ROW, true);
    l
}

/// Z-Image: Lumina 2's layout at its own widths, with the learned pad tokens [1, dim] and
/// the modulation `adaLN_modulation.0` [4 * dim, 256]. Evidence: the key list (names and
/// shapes) of a Z-Image Turbo checkpoint in ComfyUI's layout in invoke-ai/InvokeAI
/// `tests/backend/model_manager/load/state_dicts/z_image_transformer_comfyui_keys.py`.
fn z_image() -> Layout {
    let mut l = Layout::new("z_image");
    l.linear("x_embedder", ROW, 64, true);
    l.linear("t_embedder.mlp.0", OUT, ROW, true);
    l.linear("t_embedder.mlp.2", OUT, OUT, true);
    l.param("cap_embedder.0.weight", &[ROW], Init::Norm);
    l.linear("cap_embedder.1", OUT, ROW, true);
    l.param("x_pad_token", &[1, ROW], Init::Weight);
    l.param("cap_pad_token", &[1, ROW], Init::Weight);
    for (p, modulated) in [
        ("noise_refiner.0", true),
        ("context_refiner.0", false),
        ("layers.0", true),
    ] {
        l.linear(&format!("{p}.attention.qkv"), 3 * OUT, ROW, false);
        l.linear(&format!("{p}.attention.out"), ROW, OUT, false);
        l.param(format!("{p}.attention.q_norm.weight"), &[32], Init::Norm);
        l.param(format!("{p}.attention.k_norm.weight"), &[32], Init::Norm);
        l.param(format!("{p}.attention_norm1.weight"), &[ROW], Init::Norm);
        l.param(format!("{p}.attention_norm2.weight"), &[ROW], Init::Norm);
        l.linear(&format!("{p}.feed_forward.w1"), OUT, ROW, false);
        l.linear(&format!("{p}.feed_forward.w2"), ROW, OUT, false);
        l.linear(&format!("{p}.feed_forward.w3"), OUT, ROW, false);
        l.param(format!("{p}.ffn_norm1.weight"), &[ROW], Init::Norm);
        l.param(format!("{p}.ffn_norm2.weight"), &[ROW], Init::Norm);
        if modulated {
            l.linear(&format!("{p}.adaLN_modulation.0"), 4 * ROW, OUT, true);
        }
    }
    l.linear("final_layer.linear", 64, ROW, true);
    l.linear("final_layer.adaLN_modulation.1", ROW, OUT, true);
    l
}

/// Wan 2.2: Wan 2.1's keys. The 5B TI2V model has 48 latent channels in and out (the
/// Wan 2.2 VAE); the A14B experts (high noise and low noise, the same layout) take 36 in for
/// I2V (16 for T2V) and give 16 out. Only the widths differ from Wan 2.1. `time_projection.1`
/// makes the 6 modulation vectors of the blocks; the real model's `text_embedding.2` and
/// `time_embedding.2` are square (the fixture narrows their outputs, as every linear's, to stay
/// small). Names and ranks: Comfy-Org's `wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors` in
/// invoke-ai/InvokeAI `tests/backend/model_manager/load/state_dicts/wan22_t2v_14b_scaled_fp8_keys.py`.
fn wan22(in_dim: u64, out_dim: u64) -> Layout {
    let dim = ROW;
    let mut l = Layout::new("wan");
    l.param(
        "patch_embedding.weight",
        &[dim, in_dim, 1, 2, 2],
        Init::Weight,
    );
    l.param("patch_embedding.bias", &[dim], Init::Bias);
    l.linear("text_embedding.0", dim, 64, true);
    l.linear("text_embedding.2", OUT, dim, true);
    l.linear("time_embedding.0", dim, 64, true);
    l.linear("time_embedding.2", OUT, dim, true);
    l.linear("time_projection.1", 6 * OUT, dim, true);
    let p = "blocks.0";
    l.param(format!("{p}.modulation"), &[1, 6, dim], Init::Weight);
    for attn in ["self_attn", "cross_attn"] {
        for m in ["q", "k", "v"] {
            l.linear(&format!("{p}.{attn}.{m}"), OUT, dim, true);
        }
        l.linear(&format!("{p}.{attn}.o"), dim, OUT, true);
        l.param(format!("{p}.{attn}.norm_q.weight"), &[OUT], Init::Norm);
        l.param(format!("{p}.{attn}.norm_k.weight"), &[OUT], Init::Norm);
    }
    l.norm(&format!("{p}.norm3"), dim);
    l.linear(&format!("{p}.ffn.0"), OUT, dim, true);
    l.linear(&format!("{p}.ffn.2"), dim, OUT, true);
    l.param("head.modulation", &[1, 2, dim], Init::Weight);
    l.linear("head.head", out_dim * 4, dim, true);
    l
}

/// T5 v1.1 encoder (T5-XXL's keys, ComfyUI's `t5xxl_*.safetensors`), or umt5 (Wan's encoder),
/// which has a relative attention bias in every block.
fn t5(umt5: bool) -> Layout {
    let d = ROW;
    let mut l = Layout::new(if umt5 { "umt5xxl" } else { "t5xxl" });
    l.param("shared.weight", &[128, d], Init::Weight);
    for b in 0..2 {
        let p = format!("encoder.block.{b}");
        for m in ["q", "k", "v"] {
            l.linear(&format!("{p}.layer.0.SelfAttention.{m}"), OUT, d, false);
        }
        l.linear(&format!("{p}.layer.0.SelfAttention.o"), d, OUT, false);
        if umt5 || b == 0 {
            l.param(
                format!("{p}.layer.0.SelfAttention.relative_attention_bias.weight"),
                &[32, 4],
                Init::Weight,
            );
        }
        l.param(format!("{p}.layer.0.layer_norm.weight"), &[d], Init::Norm);
        l.linear(&format!("{p}.layer.1.DenseReluDense.wi_0"), OUT, d, false);
        l.linear(&format!("{p}.layer.1.DenseReluDense.wi_1"), OUT, d, false);
        l.linear(&format!("{p}.layer.1.DenseReluDense.wo"), d, OUT, false);
        l.param(format!("{p}.layer.1.layer_norm.weight"), &[d], Init::Norm);
    }
    l.param("encoder.final_layer_norm.weight", &[d], Init::Norm);
    l
}

/// CLIP text model (`text_model.*`): 12 layers for CLIP-L, 32 for CLIP-G (OpenCLIP bigG),
/// which ComfyUI tells apart by `layers.30`.
fn clip(layers: u64, projection: bool) -> Layout {
    let d = 16;
    let mut l = Layout::new(if layers > 30 { "clip_g" } else { "clip_l" });
    l.param(
        "text_model.embeddings.token_embedding.weight",
        &[256, d],
        Init::Weight,
    );
    l.param(
        "text_model.embeddings.position_embedding.weight",
        &[77, d],
        Init::Weight,
    );
    for i in 0..layers {
        let p = format!("text_model.encoder.layers.{i}");
        for m in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            l.linear(&format!("{p}.self_attn.{m}"), d, d, true);
        }
        l.norm(&format!("{p}.layer_norm1"), d);
        l.norm(&format!("{p}.layer_norm2"), d);
        l.linear(&format!("{p}.mlp.fc1"), 4 * d, d, true);
        l.linear(&format!("{p}.mlp.fc2"), d, 4 * d, true);
    }
    l.norm("text_model.final_layer_norm", d);
    if projection {
        l.param("text_projection.weight", &[d, d], Init::Weight);
    }
    l
}

/// A small serialized SentencePiece `ModelProto` with umt5's special ids (pad 0, eos 1,
/// unk 2): pieces of every type, fractional scores, both normalizer flags set explicitly.
fn spiece_model() -> Vec<u8> {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn field_bytes(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }
    fn field_varint(field: u64, v: u64, out: &mut Vec<u8>) {
        varint(field << 3, out);
        varint(v, out);
    }
    let pieces: &[(&str, f32, u64)] = &[
        ("<pad>", 0.0, 3),
        ("</s>", 0.0, 3),
        ("<unk>", 0.0, 2),
        ("\u{2581}", -2.5, 1),
        ("\u{2581}a", -3.25, 1),
        ("b", -4.0, 1),
        ("\u{2581}\u{00e9}t\u{00e9}", -5.5, 1),
        ("<0x0A>", 0.0, 6),
        ("<extra_id_0>", 0.0, 4),
        ("<unused>", 0.0, 5),
    ];
    let mut out = Vec::new();
    for (text, score, kind) in pieces {
        let mut p = Vec::new();
        field_bytes(1, text.as_bytes(), &mut p);
        varint(2 << 3 | 5, &mut p);
        p.extend_from_slice(&score.to_le_bytes());
        field_varint(3, *kind, &mut p);
        field_bytes(1, &p, &mut out);
    }
    let mut trainer = Vec::new();
    field_varint(40, 2, &mut trainer);
    field_varint(41, u64::MAX, &mut trainer); // bos_id -1: int32 sign-extended
    field_varint(42, 1, &mut trainer);
    field_varint(43, 0, &mut trainer);
    field_bytes(2, &trainer, &mut out);
    let mut normalizer = Vec::new();
    field_bytes(1, b"identity", &mut normalizer);
    field_varint(3, 1, &mut normalizer);
    field_varint(4, 0, &mut normalizer);
    field_bytes(3, &normalizer, &mut out);
    out
}
