//! The diffusers fixtures (`fixtures/diffusers/`, `cargo xtask fixtures`) read through
//! `open_safetensors` equal ComfyUI's own conversion of them, byte for byte: the goldens in
//! `tests/golden/diffusers/` were made by `make_goldens.py` there, which runs ComfyUI's maps
//! (comfy/utils.py, model_detection.py) in the direction its loader applies them, and for the
//! layouts ComfyUI has no map for (Wan, Lumina 2, Flux.2) the inverse of diffusers' own
//! conversion, checked by running that conversion on the result.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tensorfile::safetensors::SafetensorsFile;
use tensorfile::sharded::ShardedSource;
use tensorfile::{Dtype, TensorSource, open_safetensors, widen_to_f32};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/diffusers")
        .join(name)
}

/// The diffusers tensors as stored (no view), for tensors ComfyUI keeps unchanged.
fn raw(folder: &Path) -> Box<dyn TensorSource> {
    let index = folder.join("diffusion_pytorch_model.safetensors.index.json");
    if index.exists() {
        Box::new(ShardedSource::open(&index).expect("golden test"))
    } else {
        Box::new(
            SafetensorsFile::open(&folder.join("diffusion_pytorch_model.safetensors"))
                .expect("golden test"),
        )
    }
}

fn all_bytes(s: &dyn TensorSource, i: usize) -> Vec<u8> {
    let mut b = vec![0u8; s.tensors()[i].byte_len().expect("golden test") as usize];
    s.read_raw(i, 0, &mut b).expect("golden test");
    b
}

fn check(model: &str, repo: &str, folder: &str, arch_key: &str) {
    let repo = root().join("fixtures/diffusers").join(repo);
    // The repository root stands for its model folder.
    let view = open_safetensors(&repo).expect("golden test");
    let raw = raw(&repo.join(folder));
    let table: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(golden(&format!("{model}.json"))).expect("golden test"),
    )
    .expect("golden test");
    let computed =
        SafetensorsFile::open(&golden(&format!("{model}.safetensors"))).expect("golden test");

    let served: BTreeSet<&str> = view.tensors().iter().map(|t| t.name.as_str()).collect();
    let want: BTreeSet<&str> = table.keys().map(String::as_str).collect();
    assert_eq!(served, want, "{model}: key sets");
    assert!(served.contains(arch_key), "{model}: {arch_key}");

    for (name, row) in &table {
        let i = view.index_of(name).expect("golden test");
        let t = &view.tensors()[i];
        let shape: Vec<u64> = row["shape"]
            .as_array()
            .expect("golden test")
            .iter()
            .map(|v| v.as_u64().expect("golden test"))
            .collect();
        assert_eq!(t.shape, shape, "{model}: {name}");
        assert_eq!(t.dtype, Dtype::BF16, "{model}: {name}");
        assert_eq!(row["dtype"], "bfloat16");
        let expected = match row["from"].as_str() {
            Some(from) => all_bytes(raw.as_ref(), raw.index_of(from).expect("golden test")),
            None => all_bytes(&computed, computed.index_of(name).expect("golden test")),
        };
        let got = all_bytes(view.as_ref(), i);
        assert!(got == expected, "{model}: {name} differs from ComfyUI's");

        // Any range is served piecewise, across the parts' borders.
        let step = 998; // not a divisor of any part's byte length
        let mut at = 2usize;
        while at < got.len() {
            let n = step.min(got.len() - at);
            let mut b = vec![0u8; n];
            view.read_raw(i, at as u64, &mut b).expect("golden test");
            assert_eq!(b, got[at..at + n], "{model}: {name} bytes {at}+{n}");
            at += n;
        }
        let n_el = got.len() / 2;
        if n_el > 3 {
            let mut f = vec![0f32; n_el - 3];
            view.read_f32(i, 1, &mut f).expect("golden test");
            let mut want = vec![0f32; n_el - 3];
            widen_to_f32(Dtype::BF16, &got[2..2 + 2 * (n_el - 3)], &mut want).expect("golden test");
            assert_eq!(f, want, "{model}: {name} as f32");
        }
    }
    // Past the end is an error, not a read of another tensor.
    let last = view.tensors().len() - 1;
    let len = view.tensors()[last].byte_len().expect("golden test");
    assert!(view.read_raw(last, len - 1, &mut [0u8; 2]).is_err());
}

#[test]
fn sharded_flux_matches_comfyui() {
    check(
        "flux",
        "FLUX.1-tiny",
        "transformer",
        "single_blocks.1.linear1.weight",
    );
}

#[test]
fn sd3_matches_comfyui() {
    check(
        "sd3",
        "sd3-tiny",
        "transformer",
        "joint_blocks.1.context_block.adaLN_modulation.1.weight",
    );
}

#[test]
fn sdxl_unet_matches_comfyui() {
    check("sdxl", "sdxl-tiny", "unet", "output_blocks.5.2.conv.weight");
}

#[test]
fn wan_matches_the_reference_names() {
    check(
        "wan",
        "wan-tiny",
        "transformer",
        "blocks.1.cross_attn.k_img.weight",
    );
}

#[test]
fn z_image_matches_comfyui() {
    check(
        "z_image",
        "z-image-tiny",
        "transformer",
        "context_refiner.1.attention.qkv.weight",
    );
}

#[test]
fn lumina2_matches_the_inverse_of_diffusers_conversion() {
    check(
        "lumina2",
        "lumina2-tiny",
        "transformer",
        "context_refiner.1.attention.qkv.weight",
    );
}

#[test]
fn sharded_flux2_matches_the_inverse_of_diffusers_conversion() {
    check(
        "flux2",
        "FLUX.2-tiny",
        "transformer",
        "final_layer.adaLN_modulation.1.weight",
    );
}

/// The state dict of ComfyUI's lumina2 `NextDiT` (comfy/ldm/lumina/model.py @ 617048a5:
/// `NextDiT.__init__`, `JointTransformerBlock`, `JointAttention`, `FeedForward`,
/// `FinalLayer`; `TimestepEmbedder` of mmdit.py), for Lumina-Image-2.0's configuration
/// (model_detection.py: no Z-Image modulation, no pad tokens, `qk_norm`) at the fixture's
/// sizes: dim 64, 4 heads and 2 key/value heads of 16, patch 2, 16 channels, caption features
/// 96, 2 layers and 2 refiners of each kind, feed-forward `multiple_of` 256 with multiplier 4.
fn comfy_nextdit(dim: u64, heads: u64, kv_heads: u64, cap: u64) -> Vec<(String, Vec<u64>)> {
    let hd = dim / heads;
    let ffn = 256 * (4 * dim).div_ceil(256);
    let patch_in = 2 * 2 * 16;
    let t = dim.min(1024);
    let mut sd: Vec<(String, Vec<u64>)> = Vec::new();
    let mut p = |name: String, shape: &[u64]| sd.push((name, shape.to_vec()));
    p("x_embedder.weight".into(), &[dim, patch_in]);
    p("x_embedder.bias".into(), &[dim]);
    for (prefix, modulation) in [
        ("noise_refiner", true),
        ("context_refiner", false),
        ("layers", true),
    ] {
        for i in 0..2 {
            let b = format!("{prefix}.{i}");
            p(
                format!("{b}.attention.qkv.weight"),
                &[(heads + 2 * kv_heads) * hd, dim],
            );
            p(format!("{b}.attention.out.weight"), &[dim, heads * hd]);
            p(format!("{b}.attention.q_norm.weight"), &[hd]);
            p(format!("{b}.attention.k_norm.weight"), &[hd]);
            p(format!("{b}.feed_forward.w1.weight"), &[ffn, dim]);
            p(format!("{b}.feed_forward.w2.weight"), &[dim, ffn]);
            p(format!("{b}.feed_forward.w3.weight"), &[ffn, dim]);
            for n in [
                "attention_norm1",
                "ffn_norm1",
                "attention_norm2",
                "ffn_norm2",
            ] {
                p(format!("{b}.{n}.weight"), &[dim]);
            }
            if modulation {
                p(format!("{b}.adaLN_modulation.1.weight"), &[4 * dim, t]);
                p(format!("{b}.adaLN_modulation.1.bias"), &[4 * dim]);
            }
        }
    }
    p("t_embedder.mlp.0.weight".into(), &[t, 256]);
    p("t_embedder.mlp.0.bias".into(), &[t]);
    p("t_embedder.mlp.2.weight".into(), &[t, t]);
    p("t_embedder.mlp.2.bias".into(), &[t]);
    p("cap_embedder.0.weight".into(), &[cap]);
    p("cap_embedder.1.weight".into(), &[dim, cap]);
    p("cap_embedder.1.bias".into(), &[dim]);
    p("final_layer.linear.weight".into(), &[patch_in, dim]);
    p("final_layer.linear.bias".into(), &[patch_in]);
    p("final_layer.adaLN_modulation.1.weight".into(), &[dim, t]);
    p("final_layer.adaLN_modulation.1.bias".into(), &[dim]);
    sd
}

/// The state dict of ComfyUI's `Flux` built with Flux.2's parameters (model_detection.py @
/// 0b61ce5b: `global_modulation`, `mlp_silu_act`, no `qkv_bias` / `ops_bias`, no `vector_in`;
/// comfy/ldm/flux/model.py `Flux.__init__`, layers.py `DoubleStreamBlock` without its own
/// modulation, `SingleStreamBlock`, `build_mlp`'s SiLU-gated MLP, `LastLayer`, `Modulation`),
/// dev with its guidance embedder, at the fixture's sizes: hidden 64 in 4 heads, mlp_ratio 3,
/// 128 input channels at patch 1, context 96, 2 blocks of each kind. RMSNorm weights under
/// `.scale`, the spelling of the reference checkpoints, which ComfyUI's Flux
/// `process_unet_state_dict` turns into the modules' `.weight`.
fn comfy_flux2(h: u64, heads: u64, ctx: u64) -> Vec<(String, Vec<u64>)> {
    let hd = h / heads;
    let mlp = 3 * h;
    let mut sd: Vec<(String, Vec<u64>)> = Vec::new();
    let mut p = |name: String, shape: &[u64]| sd.push((name, shape.to_vec()));
    p("img_in.weight".into(), &[h, 128]);
    p("time_in.in_layer.weight".into(), &[h, 256]);
    p("time_in.out_layer.weight".into(), &[h, h]);
    p("guidance_in.in_layer.weight".into(), &[h, 256]);
    p("guidance_in.out_layer.weight".into(), &[h, h]);
    p("txt_in.weight".into(), &[h, ctx]);
    for i in 0..2 {
        for s in ["img", "txt"] {
            let b = format!("double_blocks.{i}.{s}");
            p(format!("{b}_attn.qkv.weight"), &[3 * h, h]);
            p(format!("{b}_attn.norm.query_norm.scale"), &[hd]);
            p(format!("{b}_attn.norm.key_norm.scale"), &[hd]);
            p(format!("{b}_attn.proj.weight"), &[h, h]);
            p(format!("{b}_mlp.0.weight"), &[2 * mlp, h]);
            p(format!("{b}_mlp.2.weight"), &[h, mlp]);
        }
    }
    for i in 0..2 {
        let b = format!("single_blocks.{i}");
        p(format!("{b}.linear1.weight"), &[3 * h + 2 * mlp, h]);
        p(format!("{b}.linear2.weight"), &[h, h + mlp]);
        p(format!("{b}.norm.query_norm.scale"), &[hd]);
        p(format!("{b}.norm.key_norm.scale"), &[hd]);
    }
    p("final_layer.linear.weight".into(), &[128, h]);
    p("final_layer.adaLN_modulation.1.weight".into(), &[2 * h, h]);
    p(
        "double_stream_modulation_img.lin.weight".into(),
        &[6 * h, h],
    );
    p(
        "double_stream_modulation_txt.lin.weight".into(),
        &[6 * h, h],
    );
    p("single_stream_modulation.lin.weight".into(), &[3 * h, h]);
    sd
}

/// What the view serves is, name for name and shape for shape, the state dict ComfyUI's own
/// model has at the fixture's sizes: nothing missing, nothing extra.
#[test]
fn lumina2_and_flux2_views_are_comfyuis_state_dicts() {
    for (repo, want) in [
        ("lumina2-tiny", comfy_nextdit(64, 4, 2, 96)),
        ("FLUX.2-tiny", comfy_flux2(64, 4, 96)),
    ] {
        let view =
            open_safetensors(&root().join("fixtures/diffusers").join(repo)).expect("golden test");
        let served: std::collections::BTreeMap<&str, &[u64]> = view
            .tensors()
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        let want: std::collections::BTreeMap<&str, &[u64]> = want
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        assert_eq!(served, want, "{repo}");
    }
}

/// Files already in ComfyUI's layout are never claimed as diffusers (their names would be
/// rewritten), nor is Qwen-Image, whose diffusers names are ComfyUI's.
#[test]
fn reference_layouts_and_qwen_image_are_served_as_they_are() {
    use tensorfile::diffusers::Mapping;
    use tensorfile::source::{SourceTensor, Stored};
    for arch in [
        "flux",
        "sd3",
        "sdxl",
        "sd1",
        "wan",
        "archs/flux2",
        "archs/z_image",
    ] {
        let path = root().join(format!("fixtures/{arch}_bf16.safetensors"));
        let file = SafetensorsFile::open(&path).expect("golden test");
        assert!(
            Mapping::plan(&path, file.tensors())
                .expect("golden test")
                .is_none(),
            "{arch}"
        );
        let view = open_safetensors(&path).expect("golden test");
        assert_eq!(view.tensors(), file.tensors(), "{arch}");
    }
    let t = |name: &str| SourceTensor {
        name: name.into(),
        shape: vec![4, 4],
        dtype: Dtype::BF16,
        stored: Stored::Safetensors(Dtype::BF16),
        source_bytes: 32,
    };
    let keys = [
        // Qwen-Image (ComfyUI loads these names as they are).
        &[
            "img_in.weight",
            "txt_in.weight",
            "time_text_embed.timestep_embedder.linear_2.weight",
            "transformer_blocks.0.attn.add_q_proj.weight",
            "transformer_blocks.0.attn.norm_added_q.weight",
            "transformer_blocks.0.img_mlp.net.0.proj.weight",
        ][..],
        // Lumina 2 / Z-Image reference layout (`x_embedder.weight` like diffusers Flux).
        &[
            "x_embedder.weight",
            "cap_embedder.1.weight",
            "context_refiner.0.attention.qkv.weight",
            "noise_refiner.0.attention.k_norm.weight",
        ][..],
    ];
    for set in keys {
        let tensors: Vec<SourceTensor> = set.iter().map(|n| t(n)).collect();
        assert!(
            Mapping::plan(Path::new("m"), &tensors)
                .expect("golden test")
                .is_none(),
            "{set:?}"
        );
    }
}
