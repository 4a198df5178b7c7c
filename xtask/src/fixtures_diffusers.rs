//! Diffusers-layout fixtures (`fixtures/diffusers/`) and the sharded bench model.
//!
//! Key names and shape patterns are those of the diffusers model classes
//! (`FluxTransformer2DModel`, `SD3Transformer2DModel`, `UNet2DConditionModel`,
//! `WanTransformer3DModel`, `ZImageTransformer2DModel`, `Lumina2Transformer2DModel`,
//! `Flux2Transformer2DModel`, at huggingface/diffusers @ 58eb52c0 for the last two); widths are
//! tiny. Each model sits in a repository-like folder (`<repo>/transformer/` or `<repo>/unet/`):
//! Flux as three shards and Flux.2 as two, each with a
//! `diffusion_pytorch_model.safetensors.index.json`, the others as one
//! `diffusion_pytorch_model.safetensors`.
//!
//! [`split_flux`] writes a ComfyUI-layout Flux file as a sharded diffusers folder (ComfyUI's
//! `flux_to_diffusers` direction: q/k/v and q/k/v/mlp split, final modulation halves swapped),
//! used for the bench's sharded case: converting the folder must give the bytes of converting
//! the file.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::Path;

use tensorfile::safetensors::writer::{SafetensorsWriter, TensorSpec};
use tensorfile::safetensors::{Dtype, ReadBuffer, SafetensorsFile};

use super::{FileSpec, manifest_entry};
use crate::DynResult;
use crate::layouts::{FluxDims, Init, Layout};

/// The index's file name.
const INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";
/// The single-file name.
const SINGLE: &str = "diffusion_pytorch_model.safetensors";

/// The name of shard `i` (0-based) of `n`.
fn shard_name(i: usize, n: usize) -> String {
    format!(
        "diffusion_pytorch_model-{:05}-of-{:05}.safetensors",
        i + 1,
        n
    )
}

/// Flux.1 in diffusers' `FluxTransformer2DModel` names.
pub fn flux(d: FluxDims) -> Layout {
    let h = d.hidden;
    let mut l = Layout::new("flux");
    l.linear("x_embedder", h, 64, true);
    l.linear("time_text_embed.timestep_embedder.linear_1", h, 256, true);
    l.linear("time_text_embed.timestep_embedder.linear_2", h, h, true);
    l.linear("time_text_embed.guidance_embedder.linear_1", h, 256, true);
    l.linear("time_text_embed.guidance_embedder.linear_2", h, h, true);
    l.linear("time_text_embed.text_embedder.linear_1", h, d.vec_in, true);
    l.linear("time_text_embed.text_embedder.linear_2", h, h, true);
    l.linear("context_embedder", h, d.context, true);
    for i in 0..d.double_blocks {
        let p = format!("transformer_blocks.{i}");
        l.linear(&format!("{p}.norm1.linear"), 6 * h, h, true);
        l.linear(&format!("{p}.norm1_context.linear"), 6 * h, h, true);
        for m in [
            "to_q",
            "to_k",
            "to_v",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
        ] {
            l.linear(&format!("{p}.attn.{m}"), h, h, true);
        }
        for n in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
            l.param(format!("{p}.attn.{n}.weight"), &[d.head_dim], Init::Norm);
        }
        l.linear(&format!("{p}.attn.to_out.0"), h, h, true);
        l.linear(&format!("{p}.attn.to_add_out"), h, h, true);
        for ff in ["ff", "ff_context"] {
            l.linear(&format!("{p}.{ff}.net.0.proj"), 4 * h, h, true);
            l.linear(&format!("{p}.{ff}.net.2"), h, 4 * h, true);
        }
    }
    for i in 0..d.single_blocks {
        let p = format!("single_transformer_blocks.{i}");
        l.linear(&format!("{p}.norm.linear"), 3 * h, h, true);
        l.linear(&format!("{p}.proj_mlp"), 4 * h, h, true);
        for m in ["to_q", "to_k", "to_v"] {
            l.linear(&format!("{p}.attn.{m}"), h, h, true);
        }
        l.param(format!("{p}.attn.norm_q.weight"), &[d.head_dim], Init::Norm);
        l.param(format!("{p}.attn.norm_k.weight"), &[d.head_dim], Init::Norm);
        l.linear(&format!("{p}.proj_out"), h, 5 * h, true);
    }
    l.linear("norm_out.linear", 2 * h, h, true);
    l.linear("proj_out", 64, h, true);
    l
}

/// The committed Flux fixture's widths: two blocks of each kind, so three shards all hold some.
const FLUX_SMALL: FluxDims = FluxDims {
    hidden: 64,
    head_dim: 16,
    vec_in: 100,
    context: 256,
    double_blocks: 2,
    single_blocks: 2,
};

/// SD3.5-medium-like `SD3Transformer2DModel`: block 0 has the second (dual) attention, the last
/// block's context stream is pre-only. Width 128 = 64 x 2 blocks (ComfyUI takes the depth from
/// `pos_embed.proj.weight`'s rows / 64); the blocks' linears read 32 columns.
pub fn sd3() -> Layout {
    let h = 128;
    let hd = 16;
    let depth = 2;
    // The blocks' linears read 32 columns instead of h: only rows matter to the mapping, and
    // the file stays small.
    let k = 32;
    let mut l = Layout::new("sd3");
    l.param("pos_embed.pos_embed", &[1, 64, h], Init::Weight);
    l.conv2d("pos_embed.proj", h, 16, 2);
    l.linear("time_text_embed.timestep_embedder.linear_1", h, 256, true);
    l.linear("time_text_embed.timestep_embedder.linear_2", h, h, true);
    l.linear("time_text_embed.text_embedder.linear_1", h, 160, true);
    l.linear("time_text_embed.text_embedder.linear_2", h, h, true);
    l.linear("context_embedder", h, 256, true);
    for i in 0..depth {
        let p = format!("transformer_blocks.{i}");
        let pre_only = i == depth - 1;
        let dual = i == 0;
        l.linear(
            &format!("{p}.norm1.linear"),
            if dual { 9 } else { 6 } * h,
            k,
            true,
        );
        l.linear(
            &format!("{p}.norm1_context.linear"),
            if pre_only { 2 } else { 6 } * h,
            k,
            true,
        );
        for m in [
            "to_q",
            "to_k",
            "to_v",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
        ] {
            l.linear(&format!("{p}.attn.{m}"), h, k, true);
        }
        for n in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
            l.param(format!("{p}.attn.{n}.weight"), &[hd], Init::Norm);
        }
        l.linear(&format!("{p}.attn.to_out.0"), h, k, true);
        if dual {
            for m in ["to_q", "to_k", "to_v", "to_out.0"] {
                l.linear(&format!("{p}.attn2.{m}"), h, k, true);
            }
            l.param(format!("{p}.attn2.norm_q.weight"), &[hd], Init::Norm);
            l.param(format!("{p}.attn2.norm_k.weight"), &[hd], Init::Norm);
        }
        l.linear(&format!("{p}.ff.net.0.proj"), 4 * h, k, true);
        l.linear(&format!("{p}.ff.net.2"), h, 4 * k, true);
        if !pre_only {
            l.linear(&format!("{p}.attn.to_add_out"), h, k, true);
            l.linear(&format!("{p}.ff_context.net.0.proj"), 4 * h, k, true);
            l.linear(&format!("{p}.ff_context.net.2"), h, 4 * k, true);
        }
    }
    l.linear("norm_out.linear", 2 * h, h, true);
    l.linear("proj_out", 2 * 2 * 16, h, true);
    l
}

/// A diffusers `ResnetBlock2D`.
fn resnet(l: &mut Layout, p: &str, inp: u64, out: u64, temb: u64) {
    l.norm(&format!("{p}.norm1"), inp);
    l.conv2d(&format!("{p}.conv1"), out, inp, 3);
    l.linear(&format!("{p}.time_emb_proj"), out, temb, true);
    l.norm(&format!("{p}.norm2"), out);
    l.conv2d(&format!("{p}.conv2"), out, out, 3);
    if inp != out {
        l.conv2d(&format!("{p}.conv_shortcut"), out, inp, 1);
    }
}

/// A diffusers `Transformer2DModel` (SDXL: Linear proj_in/proj_out).
fn attention(l: &mut Layout, p: &str, c: u64, depth: u64, context: u64) {
    l.norm(&format!("{p}.norm"), c);
    l.linear(&format!("{p}.proj_in"), c, c, true);
    for t in 0..depth {
        let b = format!("{p}.transformer_blocks.{t}");
        for attn in ["attn1", "attn2"] {
            let kv = if attn == "attn1" { c } else { context };
            l.linear(&format!("{b}.{attn}.to_q"), c, c, false);
            l.linear(&format!("{b}.{attn}.to_k"), c, kv, false);
            l.linear(&format!("{b}.{attn}.to_v"), c, kv, false);
            l.linear(&format!("{b}.{attn}.to_out.0"), c, c, true);
        }
        l.linear(&format!("{b}.ff.net.0.proj"), 8 * c, c, true);
        l.linear(&format!("{b}.ff.net.2"), c, 4 * c, true);
        for n in ["norm1", "norm2", "norm3"] {
            l.norm(&format!("{b}.{n}"), c);
        }
    }
    l.linear(&format!("{p}.proj_out"), c, c, true);
}

/// SDXL's `UNet2DConditionModel` layout (three levels, two resnets each; attention at levels 1
/// and 2, two-deep at level 2), channels 8/16/16 (SDXL: 320/640/1280).
pub fn sdxl_unet() -> Layout {
    let (temb, ctx) = (32, 32);
    let ch = [8u64, 16, 16];
    let depth = [0u64, 1, 2];
    let mut l = Layout::new("sdxl");
    l.conv2d("conv_in", ch[0], 4, 3);
    l.linear("time_embedding.linear_1", temb, ch[0], true);
    l.linear("time_embedding.linear_2", temb, temb, true);
    l.linear("add_embedding.linear_1", temb, 176, true);
    l.linear("add_embedding.linear_2", temb, temb, true);
    let mut c_in = ch[0];
    for x in 0..3 {
        for i in 0..2 {
            resnet(
                &mut l,
                &format!("down_blocks.{x}.resnets.{i}"),
                c_in,
                ch[x],
                temb,
            );
            c_in = ch[x];
            if depth[x] > 0 {
                attention(
                    &mut l,
                    &format!("down_blocks.{x}.attentions.{i}"),
                    ch[x],
                    depth[x],
                    ctx,
                );
            }
        }
        if x < 2 {
            l.conv2d(
                &format!("down_blocks.{x}.downsamplers.0.conv"),
                ch[x],
                ch[x],
                3,
            );
        }
    }
    resnet(&mut l, "mid_block.resnets.0", ch[2], ch[2], temb);
    attention(&mut l, "mid_block.attentions.0", ch[2], 2, ctx);
    resnet(&mut l, "mid_block.resnets.1", ch[2], ch[2], temb);
    for x in 0..3 {
        let level = 2 - x;
        for i in 0..3 {
            // The skip connection widens the input (its width does not matter here).
            resnet(
                &mut l,
                &format!("up_blocks.{x}.resnets.{i}"),
                2 * ch[level],
                ch[level],
                temb,
            );
            if depth[level] > 0 {
                attention(
                    &mut l,
                    &format!("up_blocks.{x}.attentions.{i}"),
                    ch[level],
                    depth[level],
                    ctx,
                );
            }
        }
        if x < 2 {
            l.conv2d(
                &format!("up_blocks.{x}.upsamplers.0.conv"),
                ch[level],
                ch[level],
                3,
            );
        }
    }
    l.norm("conv_norm_out", ch[0]);
    l.conv2d("conv_out", 4, ch[0], 3);
    l
}

/// Wan 2.1 I2V-like `WanTransformer3DModel` (image embedder and image cross-attention keys).
pub fn wan() -> Layout {
    let (dim, ffn, img) = (32, 64, 48);
    let mut l = Layout::new("wan");
    l.param("patch_embedding.weight", &[dim, 16, 1, 2, 2], Init::Weight);
    l.param("patch_embedding.bias", &[dim], Init::Bias);
    l.linear("condition_embedder.time_embedder.linear_1", dim, 256, true);
    l.linear("condition_embedder.time_embedder.linear_2", dim, dim, true);
    l.linear("condition_embedder.time_proj", 6 * dim, dim, true);
    l.linear("condition_embedder.text_embedder.linear_1", dim, 256, true);
    l.linear("condition_embedder.text_embedder.linear_2", dim, dim, true);
    l.norm("condition_embedder.image_embedder.norm1", img);
    l.linear(
        "condition_embedder.image_embedder.ff.net.0.proj",
        img,
        img,
        true,
    );
    l.linear("condition_embedder.image_embedder.ff.net.2", dim, img, true);
    l.norm("condition_embedder.image_embedder.norm2", dim);
    for i in 0..2 {
        let p = format!("blocks.{i}");
        l.param(format!("{p}.scale_shift_table"), &[1, 6, dim], Init::Weight);
        for attn in ["attn1", "attn2"] {
            for m in ["to_q", "to_k", "to_v", "to_out.0"] {
                l.linear(&format!("{p}.{attn}.{m}"), dim, dim, true);
            }
            l.param(format!("{p}.{attn}.norm_q.weight"), &[dim], Init::Norm);
            l.param(format!("{p}.{attn}.norm_k.weight"), &[dim], Init::Norm);
        }
        l.linear(&format!("{p}.attn2.add_k_proj"), dim, dim, true);
        l.linear(&format!("{p}.attn2.add_v_proj"), dim, dim, true);
        l.param(format!("{p}.attn2.norm_added_k.weight"), &[dim], Init::Norm);
        l.norm(&format!("{p}.norm2"), dim);
        l.linear(&format!("{p}.ffn.net.0.proj"), ffn, dim, true);
        l.linear(&format!("{p}.ffn.net.2"), dim, ffn, true);
    }
    l.param("scale_shift_table", &[1, 2, dim], Init::Weight);
    l.linear("proj_out", 16 * 2 * 2, dim, true);
    l
}

/// Z-Image's `ZImageTransformer2DModel` (ComfyUI's lumina2 family): one main layer, two noise
/// refiners (with adaLN) and two context refiners (without).
pub fn z_image() -> Layout {
    let (dim, hd, hidden, cap) = (64, 16, 160, 96);
    let mut l = Layout::new("lumina2");
    l.linear("all_x_embedder.2-1", dim, 64, true);
    l.linear("t_embedder.mlp.0", dim, 256, true);
    l.linear("t_embedder.mlp.2", dim, dim, true);
    l.param("cap_embedder.0.weight", &[cap], Init::Norm);
    l.linear("cap_embedder.1", dim, cap, true);
    l.param("x_pad_token", &[1, dim], Init::Weight);
    l.param("cap_pad_token", &[1, dim], Init::Weight);
    let blocks = [
        ("layers.0", true),
        ("noise_refiner.0", true),
        ("noise_refiner.1", true),
        ("context_refiner.0", false),
        ("context_refiner.1", false),
    ];
    for (p, adaln) in blocks {
        for m in ["to_q", "to_k", "to_v", "to_out.0"] {
            l.linear(&format!("{p}.attention.{m}"), dim, dim, false);
        }
        l.param(format!("{p}.attention.norm_q.weight"), &[hd], Init::Norm);
        l.param(format!("{p}.attention.norm_k.weight"), &[hd], Init::Norm);
        for n in [
            "attention_norm1",
            "attention_norm2",
            "ffn_norm1",
            "ffn_norm2",
        ] {
            l.param(format!("{p}.{n}.weight"), &[dim], Init::Norm);
        }
        l.linear(&format!("{p}.feed_forward.w1"), hidden, dim, false);
        l.linear(&format!("{p}.feed_forward.w2"), dim, hidden, false);
        l.linear(&format!("{p}.feed_forward.w3"), hidden, dim, false);
        if adaln {
            l.linear(&format!("{p}.adaLN_modulation.0"), 4 * dim, dim, true);
        }
    }
    l.linear("all_final_layer.2-1.linear", 64, dim, true);
    l.linear("all_final_layer.2-1.adaLN_modulation.1", dim, dim, true);
    l
}

/// Lumina-Image-2.0's `Lumina2Transformer2DModel`: two main layers, two noise refiners (with
/// `LuminaRMSNormZero`) and two context refiners (without); grouped-query attention like the
/// real model's (24 heads, 8 key/value heads): here 4 heads of 16 and 2 key/value heads, so
/// `to_q` has twice the rows of `to_k` / `to_v`. The feed-forward width is diffusers'
/// `LuminaFeedForward` of `inner_dim = 4 * dim` (multiple_of 256, no multiplier).
pub fn lumina2() -> Layout {
    let (dim, hd, heads, kv_heads, cap, patch_out) = (64, 16, 4, 2, 96, 64);
    let ffn = 256;
    let mut l = Layout::new("lumina2");
    l.linear("x_embedder", dim, patch_out, true);
    l.linear(
        "time_caption_embed.timestep_embedder.linear_1",
        dim,
        256,
        true,
    );
    l.linear(
        "time_caption_embed.timestep_embedder.linear_2",
        dim,
        dim,
        true,
    );
    l.param(
        "time_caption_embed.caption_embedder.0.weight",
        &[cap],
        Init::Norm,
    );
    l.linear("time_caption_embed.caption_embedder.1", dim, cap, true);
    let blocks = [
        ("noise_refiner.0", true),
        ("noise_refiner.1", true),
        ("context_refiner.0", false),
        ("context_refiner.1", false),
        ("layers.0", true),
        ("layers.1", true),
    ];
    for (p, modulated) in blocks {
        l.linear(&format!("{p}.attn.to_q"), heads * hd, dim, false);
        l.linear(&format!("{p}.attn.to_k"), kv_heads * hd, dim, false);
        l.linear(&format!("{p}.attn.to_v"), kv_heads * hd, dim, false);
        l.linear(&format!("{p}.attn.to_out.0"), dim, heads * hd, false);
        l.param(format!("{p}.attn.norm_q.weight"), &[hd], Init::Norm);
        l.param(format!("{p}.attn.norm_k.weight"), &[hd], Init::Norm);
        l.linear(&format!("{p}.feed_forward.linear_1"), ffn, dim, false);
        l.linear(&format!("{p}.feed_forward.linear_2"), dim, ffn, false);
        l.linear(&format!("{p}.feed_forward.linear_3"), ffn, dim, false);
        if modulated {
            l.linear(&format!("{p}.norm1.linear"), 4 * dim, dim, true);
            l.param(format!("{p}.norm1.norm.weight"), &[dim], Init::Norm);
        } else {
            l.param(format!("{p}.norm1.weight"), &[dim], Init::Norm);
        }
        for n in ["ffn_norm1", "norm2", "ffn_norm2"] {
            l.param(format!("{p}.{n}.weight"), &[dim], Init::Norm);
        }
    }
    l.linear("norm_out.linear_1", dim, dim, true);
    l.linear("norm_out.linear_2", patch_out, dim, true);
    l
}

/// Flux.2's `Flux2Transformer2DModel` (dev: with the guidance embedder): no biases anywhere,
/// the shared modulations at the top, SwiGLU feed-forwards (`linear_in` twice the hidden
/// width), the single blocks' fused `to_qkv_mlp_proj`. 4 heads of 16, mlp_ratio 3, 128 input
/// channels (patch 1), two blocks of each kind.
pub fn flux2() -> Layout {
    let (h, hd, ctx) = (64, 16, 96);
    let mlp = 3 * h;
    let mut l = Layout::new("flux2");
    l.linear("x_embedder", h, 128, false);
    l.linear("context_embedder", h, ctx, false);
    for e in ["timestep_embedder", "guidance_embedder"] {
        l.linear(&format!("time_guidance_embed.{e}.linear_1"), h, 256, false);
        l.linear(&format!("time_guidance_embed.{e}.linear_2"), h, h, false);
    }
    l.linear("double_stream_modulation_img.linear", 6 * h, h, false);
    l.linear("double_stream_modulation_txt.linear", 6 * h, h, false);
    l.linear("single_stream_modulation.linear", 3 * h, h, false);
    for i in 0..2 {
        let p = format!("transformer_blocks.{i}");
        for m in [
            "to_q",
            "to_k",
            "to_v",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
        ] {
            l.linear(&format!("{p}.attn.{m}"), h, h, false);
        }
        for n in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
            l.param(format!("{p}.attn.{n}.weight"), &[hd], Init::Norm);
        }
        l.linear(&format!("{p}.attn.to_out.0"), h, h, false);
        l.linear(&format!("{p}.attn.to_add_out"), h, h, false);
        for ff in ["ff", "ff_context"] {
            l.linear(&format!("{p}.{ff}.linear_in"), 2 * mlp, h, false);
            l.linear(&format!("{p}.{ff}.linear_out"), h, mlp, false);
        }
    }
    for i in 0..2 {
        let p = format!("single_transformer_blocks.{i}");
        l.linear(
            &format!("{p}.attn.to_qkv_mlp_proj"),
            3 * h + 2 * mlp,
            h,
            false,
        );
        l.param(format!("{p}.attn.norm_q.weight"), &[hd], Init::Norm);
        l.param(format!("{p}.attn.norm_k.weight"), &[hd], Init::Norm);
        l.linear(&format!("{p}.attn.to_out"), h, h + mlp, false);
    }
    l.linear("norm_out.linear", 2 * h, h, false);
    l.linear("proj_out", 128, h, false);
    l
}

/// One fixture model: its folder under `fixtures/`, layout and shard count (1: a single file).
struct Model {
    dir: &'static str,
    layout: Layout,
    shards: usize,
}

fn models() -> Vec<Model> {
    vec![
        Model {
            dir: "diffusers/FLUX.1-tiny/transformer",
            layout: flux(FLUX_SMALL),
            shards: 3,
        },
        Model {
            dir: "diffusers/sd3-tiny/transformer",
            layout: sd3(),
            shards: 1,
        },
        Model {
            dir: "diffusers/sdxl-tiny/unet",
            layout: sdxl_unet(),
            shards: 1,
        },
        Model {
            dir: "diffusers/wan-tiny/transformer",
            layout: wan(),
            shards: 1,
        },
        Model {
            dir: "diffusers/z-image-tiny/transformer",
            layout: z_image(),
            shards: 1,
        },
        Model {
            dir: "diffusers/lumina2-tiny/transformer",
            layout: lumina2(),
            shards: 1,
        },
        Model {
            dir: "diffusers/FLUX.2-tiny/transformer",
            layout: flux2(),
            shards: 2,
        },
    ]
}

/// Splits `n` (sizes, in order) into `shards` contiguous runs of about equal total: the first
/// index of each run.
fn split_points(sizes: &[u64], shards: usize) -> Vec<usize> {
    let total: u64 = sizes.iter().sum();
    let mut starts = vec![0];
    let mut acc = 0u64;
    for (i, &s) in sizes.iter().enumerate() {
        let k = starts.len() as u64;
        if starts.len() < shards && i > 0 && acc * shards as u64 >= total * k {
            starts.push(i);
        }
        acc += s;
    }
    starts
}

/// Writes the diffusers fixtures under `out` and adds them to `manifest`.
pub fn write(out: &Path, manifest: &mut BTreeMap<String, serde_json::Value>) -> DynResult<()> {
    for m in models() {
        let dir = out.join(m.dir);
        fs::create_dir_all(&dir)?;
        let spec = FileSpec::from_layout(String::new(), &m.layout, "bf16", |_| Dtype::BF16, "");
        if m.shards == 1 {
            let mut s = spec;
            s.file = SINGLE.into();
            s.write(&dir.join(SINGLE))?;
            let rel = format!("{}/{SINGLE}", m.dir);
            manifest.insert(
                rel,
                manifest_entry(
                    &dir.join(SINGLE),
                    Some(m.layout.arch),
                    Some("bf16"),
                    "diffusers",
                )?,
            );
            continue;
        }
        // Module order, cut into runs of about equal bytes.
        let sizes: Vec<u64> = m
            .layout
            .tensors
            .iter()
            .map(|t| t.shape.iter().product::<u64>() * 2)
            .collect();
        let starts = split_points(&sizes, m.shards);
        let mut weight_map = BTreeMap::new();
        let mut total = 0u64;
        for (k, &start) in starts.iter().enumerate() {
            let end = starts.get(k + 1).copied().unwrap_or(sizes.len());
            let names: Vec<&str> = m.layout.tensors[start..end]
                .iter()
                .map(|t| t.name.as_str())
                .collect();
            let mut shard = spec.clone();
            shard.file = shard_name(k, m.shards);
            shard.entries.retain(|e| names.contains(&e.name.as_str()));
            for e in &shard.entries {
                weight_map.insert(e.name.clone(), shard.file.clone());
                total += e.shape.iter().product::<u64>() * 2;
            }
            let path = dir.join(&shard.file);
            shard.write(&path)?;
            manifest.insert(
                format!("{}/{}", m.dir, shard.file),
                manifest_entry(&path, None, Some("bf16"), "diffusers")?,
            );
        }
        write_index(&dir.join(INDEX), &weight_map, total)?;
        manifest.insert(
            format!("{}/{INDEX}", m.dir),
            manifest_entry(
                &dir.join(INDEX),
                Some(m.layout.arch),
                Some("bf16"),
                "diffusers",
            )?,
        );
    }
    Ok(())
}

fn write_index(path: &Path, weight_map: &BTreeMap<String, String>, total: u64) -> DynResult<()> {
    let doc = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    });
    let mut text = serde_json::to_string_pretty(&doc)?;
    text.push('\n');
    fs::write(path, text)?;
    Ok(())
}

/// A diffusers tensor cut from a ComfyUI one: its name and the rows it takes, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cut {
    name: String,
    /// `(first row, rows)` ranges of the ComfyUI tensor, concatenated.
    rows: Vec<(u64, u64)>,
}

/// The diffusers tensors of ComfyUI Flux tensor `name` with `rows` rows (ComfyUI's
/// `flux_to_diffusers`, in its own direction); `None` for a name it does not map.
fn flux_cuts(name: &str, rows: u64, hidden: u64) -> Option<Vec<Cut>> {
    let cut = |n: String, r: Vec<(u64, u64)>| Cut { name: n, rows: r };
    let all = |n: String| Some(vec![cut(n, vec![(0, rows)])]);
    let (stem, end) = name.rsplit_once('.')?;
    if let Some(rest) = stem.strip_prefix("double_blocks.") {
        let (i, m) = rest.split_once('.')?;
        let p = format!("transformer_blocks.{i}");
        let split3 = |names: [&str; 3]| {
            Some(
                names
                    .iter()
                    .enumerate()
                    .map(|(k, n)| {
                        cut(
                            format!("{p}.attn.{n}.{end}"),
                            vec![(k as u64 * hidden, hidden)],
                        )
                    })
                    .collect(),
            )
        };
        return match m {
            "img_attn.qkv" => split3(["to_q", "to_k", "to_v"]),
            "txt_attn.qkv" => split3(["add_q_proj", "add_k_proj", "add_v_proj"]),
            "img_attn.proj" => all(format!("{p}.attn.to_out.0.{end}")),
            "txt_attn.proj" => all(format!("{p}.attn.to_add_out.{end}")),
            "img_mod.lin" => all(format!("{p}.norm1.linear.{end}")),
            "txt_mod.lin" => all(format!("{p}.norm1_context.linear.{end}")),
            "img_mlp.0" => all(format!("{p}.ff.net.0.proj.{end}")),
            "img_mlp.2" => all(format!("{p}.ff.net.2.{end}")),
            "txt_mlp.0" => all(format!("{p}.ff_context.net.0.proj.{end}")),
            "txt_mlp.2" => all(format!("{p}.ff_context.net.2.{end}")),
            "img_attn.norm.query_norm" => all(format!("{p}.attn.norm_q.weight")),
            "img_attn.norm.key_norm" => all(format!("{p}.attn.norm_k.weight")),
            "txt_attn.norm.query_norm" => all(format!("{p}.attn.norm_added_q.weight")),
            "txt_attn.norm.key_norm" => all(format!("{p}.attn.norm_added_k.weight")),
            _ => None,
        };
    }
    if let Some(rest) = stem.strip_prefix("single_blocks.") {
        let (i, m) = rest.split_once('.')?;
        let p = format!("single_transformer_blocks.{i}");
        return match m {
            "linear1" => Some(vec![
                cut(format!("{p}.attn.to_q.{end}"), vec![(0, hidden)]),
                cut(format!("{p}.attn.to_k.{end}"), vec![(hidden, hidden)]),
                cut(format!("{p}.attn.to_v.{end}"), vec![(2 * hidden, hidden)]),
                cut(
                    format!("{p}.proj_mlp.{end}"),
                    vec![(3 * hidden, rows - 3 * hidden)],
                ),
            ]),
            "linear2" => all(format!("{p}.proj_out.{end}")),
            "modulation.lin" => all(format!("{p}.norm.linear.{end}")),
            "norm.query_norm" => all(format!("{p}.attn.norm_q.weight")),
            "norm.key_norm" => all(format!("{p}.attn.norm_k.weight")),
            _ => None,
        };
    }
    let half = rows / 2;
    match stem {
        "final_layer.adaLN_modulation.1" => Some(vec![cut(
            format!("norm_out.linear.{end}"),
            vec![(half, half), (0, half)],
        )]),
        "final_layer.linear" => all(format!("proj_out.{end}")),
        "img_in" => all(format!("x_embedder.{end}")),
        "txt_in" => all(format!("context_embedder.{end}")),
        "time_in.in_layer" => all(format!("time_text_embed.timestep_embedder.linear_1.{end}")),
        "time_in.out_layer" => all(format!("time_text_embed.timestep_embedder.linear_2.{end}")),
        "guidance_in.in_layer" => all(format!("time_text_embed.guidance_embedder.linear_1.{end}")),
        "guidance_in.out_layer" => all(format!("time_text_embed.guidance_embedder.linear_2.{end}")),
        "vector_in.in_layer" => all(format!("time_text_embed.text_embedder.linear_1.{end}")),
        "vector_in.out_layer" => all(format!("time_text_embed.text_embedder.linear_2.{end}")),
        _ => None,
    }
}

/// Writes the ComfyUI-layout Flux file `src` as a diffusers folder of `shards` shards in `dir`
/// (a `transformer/` folder): every tensor cut as ComfyUI's `flux_to_diffusers` names it, read
/// and written a bounded chunk at a time.
pub fn split_flux(src: &Path, dir: &Path, shards: usize) -> DynResult<()> {
    let file = SafetensorsFile::open(src)?;
    let hidden = file
        .header
        .tensors
        .iter()
        .find(|t| t.name == "img_in.bias")
        .and_then(|t| t.shape.first().copied())
        .ok_or("no img_in.bias: not a ComfyUI-layout Flux file")?;
    // (diffusers tensor, its ComfyUI source entry, rows cut, shape).
    let mut out = Vec::new();
    for (e, t) in file.header.tensors.iter().enumerate() {
        let rows = t.shape.first().copied().unwrap_or(1);
        let cuts = flux_cuts(&t.name, rows, hidden)
            .ok_or_else(|| format!("{}: no diffusers name", t.name))?;
        for c in cuts {
            let mut shape = t.shape.clone();
            if let Some(r) = shape.first_mut() {
                *r = c.rows.iter().map(|r| r.1).sum();
            }
            out.push((c, e, shape, t.dtype));
        }
    }
    let sizes: Vec<u64> = out
        .iter()
        .map(|(_, _, s, d)| d.bytes_for(s.iter().product()).unwrap_or(0))
        .collect();
    let starts = split_points(&sizes, shards);
    fs::create_dir_all(dir)?;
    let mut weight_map = BTreeMap::new();
    let total: u64 = sizes.iter().sum();
    let mut buf = ReadBuffer::new();
    for (k, &start) in starts.iter().enumerate() {
        let end = starts.get(k + 1).copied().unwrap_or(out.len());
        let mut part: Vec<_> = out[start..end].iter().collect();
        part.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let name = shard_name(k, shards);
        let specs: Vec<TensorSpec> = part
            .iter()
            .map(|(c, _, shape, dtype)| TensorSpec {
                name: c.name.clone(),
                dtype: *dtype,
                shape: shape.clone(),
            })
            .collect();
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let tmp = dir.join(format!("{name}.partial"));
        let mut w = SafetensorsWriter::new(
            BufWriter::with_capacity(1 << 20, File::create(&tmp)?),
            &specs,
            &meta,
        )?;
        for (c, e, _, _) in &part {
            let entry = &file.header.tensors[*e];
            let rows = entry.shape.first().copied().unwrap_or(1);
            let row_bytes = entry.byte_len() / rows.max(1);
            for &(first, n) in &c.rows {
                let mut at = first * row_bytes;
                let stop = (first + n) * row_bytes;
                while at < stop {
                    let len = usize::try_from((stop - at).min(8 << 20))?;
                    let bytes = buf.get(len, 8 << 20);
                    file.read_tensor_range(entry, at, bytes)?;
                    w.write_chunk(bytes)?;
                    at += len as u64;
                }
            }
            weight_map.insert(c.name.clone(), name.clone());
        }
        w.finish()?.flush()?;
        fs::rename(&tmp, dir.join(&name))?;
    }
    write_index(&dir.join(INDEX), &weight_map, total)?;
    Ok(())
}

/// The bench's sharded model: `flux_large_bf16.safetensors` in `dir` written as the diffusers
/// repository `flux_large_bf16_diffusers/` (three shards under `transformer/`), unless its
/// index is already there (and `force` is off). Written into a temporary folder and renamed,
/// so an interrupted run leaves no half folder behind.
pub fn write_large_sharded(dir: &Path, force: bool) -> DynResult<std::path::PathBuf> {
    let repo = dir.join(LARGE_SHARDED);
    if !force && repo.join("transformer").join(INDEX).is_file() {
        eprintln!("up to date: {}", repo.display());
        return Ok(repo);
    }
    let tmp = dir.join(format!("{LARGE_SHARDED}.partial"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    eprintln!("writing {} (3 shards)", repo.display());
    split_flux(
        &dir.join("flux_large_bf16.safetensors"),
        &tmp.join("transformer"),
        3,
    )?;
    if repo.exists() {
        fs::remove_dir_all(&repo)?;
    }
    fs::rename(&tmp, &repo)?;
    Ok(repo)
}

/// The folder [`write_large_sharded`] writes in the bench models dir.
pub const LARGE_SHARDED: &str = "flux_large_bf16_diffusers";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layouts;

    #[test]
    fn split_points_cover_everything_in_order() {
        let s = split_points(&[10, 10, 10, 10, 10, 10], 3);
        assert_eq!(s, vec![0, 2, 4]);
        assert_eq!(split_points(&[100], 3), vec![0]);
    }

    /// The bench's split of a ComfyUI Flux file has the key set and shapes of the diffusers
    /// fixture layout, so both describe the same real layout.
    #[test]
    fn flux_cuts_give_the_diffusers_layout() {
        let d = FLUX_SMALL;
        let comfy = layouts::flux(d);
        let mut got: Vec<(String, Vec<u64>)> = Vec::new();
        for t in &comfy.tensors {
            for c in flux_cuts(&t.name, t.shape[0], d.hidden).expect(&t.name) {
                let mut shape = t.shape.clone();
                shape[0] = c.rows.iter().map(|r| r.1).sum();
                got.push((c.name, shape));
            }
        }
        let mut want: Vec<(String, Vec<u64>)> = flux(d)
            .tensors
            .into_iter()
            .map(|t| (t.name, t.shape))
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn split_flux_writes_a_sharded_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("flux.safetensors");
        FileSpec::from_layout(
            String::new(),
            &layouts::flux(FLUX_SMALL),
            "bf16",
            |_| Dtype::BF16,
            "",
        )
        .write(&src)
        .unwrap();
        let dir = tmp.path().join("m/transformer");
        split_flux(&src, &dir, 3).unwrap();
        let source = tensorfile::open_safetensors(&dir).unwrap();
        let plain = SafetensorsFile::open(&src).unwrap();
        // Served back in ComfyUI's layout, every tensor is the original, byte for byte.
        assert_eq!(source.tensors().len(), plain.header.tensors.len());
        for e in &plain.header.tensors {
            let i = source.index_of(&e.name).expect(&e.name);
            let mut a = vec![0u8; e.byte_len() as usize];
            let mut b = vec![0u8; e.byte_len() as usize];
            source.read_raw(i, 0, &mut a).unwrap();
            plain.read_tensor_range(e, 0, &mut b).unwrap();
            assert!(a == b, "{}", e.name);
        }
    }
}
