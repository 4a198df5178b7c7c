//! Diffusers-layout models served in ComfyUI's key layout: a [`DiffusersView`] over any
//! [`TensorSource`] (one file, or a [`crate::sharded::ShardedSource`]) that renames every key,
//! fuses q/k/v (and q/k/v/mlp for Flux's single blocks) and swaps the shift and scale halves of
//! the final modulation, so every converter writes files ComfyUI's ordinary loaders and
//! ComfyUI-GGUF read.
//!
//! Where ComfyUI has a map, the map is ComfyUI's, applied in the direction its loader applies
//! it to a diffusers file (`comfy.sd.load_diffusion_model_state_dict` →
//! `model_detection.convert_diffusers_mmdit` / `unet_to_diffusers`), from `comfy/utils.py`
//! (Comfy-Org/ComfyUI @ a125cd84):
//!
//! - [`Layout::Flux`]: `flux_to_diffusers` (Flux.1 dev/schnell and their fine-tunes). RMSNorm
//!   weights become `*.query_norm.scale` / `*.key_norm.scale`, the names of the reference
//!   checkpoints.
//! - [`Layout::Sd3`]: `mmdit_to_diffusers` (the last joint block's `norm1_context` is swapped
//!   too; `depth` is `pos_embed.proj.weight`'s rows / 64, as in ComfyUI).
//! - [`Layout::Unet`]: `unet_to_diffusers` (SDXL's and SD1's `unet/`), with the block counts
//!   read from the key set (ComfyUI reads them from the matched model config; they agree for
//!   every model it knows).
//! - [`Layout::ZImage`]: `z_image_to_diffusers` (Z-Image, detected as `lumina2`); keys the map
//!   does not name pass through under their own name, as ComfyUI passes them.
//!
//! ComfyUI has no map for the others (none in `comfy/utils.py` / `convert_diffusers_mmdit` as of
//! Comfy-Org/ComfyUI @ 0b61ce5b: a Flux.2 diffusers file falls into its Flux.1 branch, a
//! Lumina 2 one into none). Theirs are the inverse of diffusers' own conversion (original
//! checkpoint → diffusers), checked against the names and shapes of ComfyUI's model:
//!
//! - [`Layout::Wan`]: diffusers' `scripts/convert_wan_to_diffusers.py`
//!   `TRANSFORMER_KEYS_RENAME_DICT` (renames only).
//! - [`Layout::Lumina2`]: huggingface/diffusers @ 58eb52c0, `src/diffusers/loaders/
//!   single_file_utils.py` `convert_lumina2_to_diffusers` (what
//!   `Lumina2Transformer2DModel.from_single_file` runs; diffusers has no standalone Lumina 2
//!   script): `LUMINA_KEY_MAP`, `ATTENTION_NORM_MAP`, `CONTEXT_REFINER_MAP`, `FINAL_LAYER_MAP`
//!   renamed back, and `convert_lumina_attn_to_diffusers`' split of `attention.qkv` undone: q,
//!   k and v concatenated along dim 0. Lumina 2's attention is grouped-query, so q is larger
//!   than k and v (ComfyUI's `JointAttention` in `comfy/ldm/lumina/model.py` @ 617048a5 splits
//!   `qkv` at `n_heads`, `n_kv_heads`, `n_kv_heads` heads). No halves are swapped: both final
//!   layers modulate by a scale only. The original checkpoint's unused `norm_final.weight`,
//!   which the diffusers conversion drops, is not in ComfyUI's `NextDiT` either.
//! - [`Layout::Flux2`]: diffusers @ 58eb52c0, `scripts/convert_flux2_to_diffusers.py` (the same
//!   maps as `single_file_utils.py` `convert_flux2_transformer_checkpoint_to_diffusers`):
//!   `FLUX2_TRANSFORMER_KEYS_RENAME_DICT`, `FLUX2_TRANSFORMER_DOUBLE_BLOCK_KEY_MAP`,
//!   `FLUX2_TRANSFORMER_SINGLE_BLOCK_KEY_MAP` renamed back (norm weights to `.scale`, as for
//!   Flux.1); `convert_flux2_double_stream_blocks`' `torch.chunk(qkv, 3)` undone (q, k, v
//!   concatenated); `convert_ada_layer_norm_weights`' `swap_scale_shift` of
//!   `final_layer.adaLN_modulation.1` undone (it is its own inverse). The single blocks' q/k/v/mlp
//!   projection is fused on both sides. The names are those of ComfyUI's `Flux` built with
//!   Flux.2's parameters (`model_detection.py` @ 0b61ce5b: `global_modulation`, `mlp_silu_act`,
//!   no `qkv_bias` / `ops_bias`; `comfy/ldm/flux/model.py`, `layers.py`).
//!
//! Qwen-Image needs no view: ComfyUI's Qwen-Image model uses the diffusers key names.
//!
//! Renames are total: a key the map does not know makes the source unsupported
//! ([`DiffusersError::UnknownKey`]) rather than reaching an output under a diffusers name
//! (ComfyUI drops such keys silently). A fused tensor needs every part, all of one dtype and
//! of one row shape, with q, k and v of the sizes ComfyUI's attention splits them at.
//!
//! A fused tensor is the concatenation of its parts along dim 0, so its bytes are the parts'
//! bytes one after the other: a read of any range is served piecewise from the parts, memory
//! bounded by the caller's buffer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::source::{HiddenTensor, SourceError, SourceTensor, TensorSource, check_range, tensor};

/// The diffusers file name of a model kept in one file.
pub const SINGLE_FILE_NAME: &str = "diffusion_pytorch_model.safetensors";

/// The folders of a diffusers repository that hold the diffusion model, in the order looked for.
pub const MODEL_FOLDERS: &[&str] = &["transformer", "unet"];

/// A diffusers layout convcache serves in ComfyUI's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Flux.1 (`FluxTransformer2DModel`).
    Flux,
    /// Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`).
    Sd3,
    /// The SDXL / SD1 UNet (`UNet2DConditionModel`).
    Unet,
    /// Wan 2.x (`WanTransformer3DModel`).
    Wan,
    /// Z-Image (`ZImageTransformer2DModel`, ComfyUI's lumina2 family).
    ZImage,
    /// Lumina-Image-2.0 (`Lumina2Transformer2DModel`; ComfyUI's lumina2 `NextDiT`).
    Lumina2,
    /// Flux.2 dev and Klein (`Flux2Transformer2DModel`; ComfyUI's flux model with Flux.2's
    /// parameters).
    Flux2,
}

impl Layout {
    /// A short name for messages and `detect`'s JSON.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Flux => "flux",
            Layout::Sd3 => "sd3",
            Layout::Unet => "unet",
            Layout::Wan => "wan",
            Layout::ZImage => "z_image",
            Layout::Lumina2 => "lumina2",
            Layout::Flux2 => "flux2",
        }
    }

    /// What serving this layout in ComfyUI's does to the tensors, for messages.
    pub fn changes(self) -> &'static str {
        match self {
            Layout::Flux => "renamed, q/k/v and q/k/v/mlp fused, final modulation halves swapped",
            Layout::Sd3 => "renamed, q/k/v fused, modulation halves swapped",
            Layout::Flux2 => "renamed, q/k/v fused, final modulation halves swapped",
            Layout::ZImage | Layout::Lumina2 => "renamed, q/k/v fused",
            Layout::Unet | Layout::Wan => "renamed",
        }
    }

    /// The layout a key set is in, by the keys ComfyUI's loader tests (plus one key of each
    /// that no reference-layout file has, so a ComfyUI-layout file is never claimed).
    pub fn of_names(names: &HashSet<&str>) -> Option<Layout> {
        let has = |k: &str| names.contains(k);
        // Lumina 2 names its attention `attn` where Z-Image (and the reference layout) has
        // `attention`.
        if has("x_embedder.weight") && has("noise_refiner.0.attn.to_k.weight") {
            Some(Layout::Lumina2)
        } else if has("noise_refiner.0.attention.norm_k.weight")
            && has("noise_refiner.0.attention.to_k.weight")
        {
            Some(Layout::ZImage)
        } else if has("x_embedder.weight") && has("double_stream_modulation_img.linear.weight") {
            // Flux.2 has Flux.1's block names plus the shared modulations: tested first.
            Some(Layout::Flux2)
        } else if has("x_embedder.weight")
            && (has("transformer_blocks.0.attn.add_q_proj.weight")
                || has("single_transformer_blocks.0.attn.norm_k.weight"))
        {
            Some(Layout::Flux)
        } else if has("transformer_blocks.0.attn.add_q_proj.weight") && has("pos_embed.proj.weight")
        {
            Some(Layout::Sd3)
        } else if has("conv_in.weight") && has("down_blocks.0.resnets.0.conv1.weight") {
            Some(Layout::Unet)
        } else if has("condition_embedder.time_proj.weight") && has("blocks.0.attn1.to_q.weight") {
            Some(Layout::Wan)
        } else {
            None
        }
    }
}

impl Layout {
    /// Whether fused q, k and v parts of `rows` rows each fit ComfyUI's attention. ComfyUI's
    /// maps narrow q, k and v at multiples of one size; Lumina 2's attention is grouped-query
    /// (`JointAttention` splits its `qkv` at `n_heads`, `n_kv_heads`, `n_kv_heads` heads), so
    /// there k and v are of one size and q a whole multiple of it.
    fn check_qkv_rows(self, rows: &[u64]) -> Result<(), &'static str> {
        match (self, rows) {
            (Layout::Lumina2, &[q, k, v]) => {
                if k == v && k > 0 && q % k == 0 {
                    Ok(())
                } else {
                    Err(
                        "ComfyUI's grouped-query attention needs k and v of one size and q a \
                         whole multiple of it",
                    )
                }
            }
            (Layout::Lumina2, _) => Err("Lumina 2 fuses exactly q, k and v"),
            _ => {
                if rows.iter().all(|&r| r == rows[0]) {
                    Ok(())
                } else {
                    Err("ComfyUI splits them at multiples of one size")
                }
            }
        }
    }
}

/// Why a diffusers-layout source cannot be served in ComfyUI's layout. Display: one line,
/// naming the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiffusersError {
    /// A key the layout's map does not know.
    #[error(
        "{}: diffusers {layout} layout: tensor `{key}` has no name in ComfyUI's layout; this \
         model variant is not supported",
        path.display()
    )]
    UnknownKey {
        /// The source.
        path: PathBuf,
        /// The layout.
        layout: &'static str,
        /// The key.
        key: String,
    },
    /// A fused tensor lacks one of its parts.
    #[error("{}: diffusers {layout} layout: `{tensor}` needs `{part}`, which is missing", path.display())]
    MissingPart {
        /// The source.
        path: PathBuf,
        /// The layout.
        layout: &'static str,
        /// The ComfyUI tensor.
        tensor: String,
        /// The missing diffusers key.
        part: String,
    },
    /// The parts of a fused tensor cannot be concatenated (dtypes or row shapes differ, or a
    /// part's dtype is not whole bytes).
    #[error("{}: diffusers {layout} layout: cannot fuse `{tensor}`: {problem}", path.display())]
    BadParts {
        /// The source.
        path: PathBuf,
        /// The layout.
        layout: &'static str,
        /// The ComfyUI tensor.
        tensor: String,
        /// What is wrong.
        problem: String,
    },
    /// Two diffusers keys map to one ComfyUI tensor (or a renamed key collides with a kept one).
    #[error(
        "{}: diffusers {layout} layout: `{first}` and `{second}` both become `{tensor}`",
        path.display()
    )]
    Collision {
        /// The source.
        path: PathBuf,
        /// The layout.
        layout: &'static str,
        /// The ComfyUI tensor.
        tensor: String,
        /// One diffusers key.
        first: String,
        /// The other.
        second: String,
    },
}

impl DiffusersError {
    /// The source concerned.
    pub fn path(&self) -> &Path {
        match self {
            DiffusersError::UnknownKey { path, .. }
            | DiffusersError::MissingPart { path, .. }
            | DiffusersError::BadParts { path, .. }
            | DiffusersError::Collision { path, .. } => path,
        }
    }
}

/// How one diffusers tensor enters its ComfyUI tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Renamed, unchanged.
    Whole,
    /// Part `slot` of a concatenation of `of` parts along dim 0.
    Part { slot: u8, of: u8 },
    /// Renamed with its two halves along dim 0 swapped (ComfyUI's `swap_scale_shift`: diffusers
    /// stores shift, scale; the reference layout scale, shift).
    SwapHalves,
}

/// A diffusers key's ComfyUI tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    name: String,
    role: Role,
}

fn whole(name: String) -> Option<Target> {
    Some(Target {
        name,
        role: Role::Whole,
    })
}

fn part(name: String, slot: u8, of: u8) -> Option<Target> {
    Some(Target {
        name,
        role: Role::Part { slot, of },
    })
}

fn swapped(name: String) -> Option<Target> {
    Some(Target {
        name,
        role: Role::SwapHalves,
    })
}

/// `key` as `prefix.<n>.<rest>`.
fn block<'a>(key: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let tail = key.strip_prefix(prefix)?.strip_prefix('.')?;
    let (n, rest) = tail.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0'))
    {
        return None;
    }
    Some((n.parse().ok()?, rest))
}

/// `rest` as `<stem>.weight` / `<stem>.bias`: the stem and the end.
fn weight_or_bias(rest: &str) -> Option<(&str, &str)> {
    rest.strip_suffix(".weight")
        .map(|s| (s, "weight"))
        .or_else(|| rest.strip_suffix(".bias").map(|s| (s, "bias")))
}

/// The facts of the key set some maps need.
#[derive(Debug, Default)]
struct Context {
    /// SD3: `pos_embed.proj.weight` rows / 64 (ComfyUI's `depth`).
    sd3_depth: usize,
    /// UNet: resnets per down block (ComfyUI's `num_res_blocks`).
    unet_res_blocks: Vec<usize>,
    /// UNet: `(up block, attention)` pairs present.
    unet_up_attentions: HashSet<(usize, usize)>,
}

impl Context {
    fn of(layout: Layout, tensors: &[SourceTensor]) -> Context {
        let mut ctx = Context::default();
        match layout {
            Layout::Sd3 => {
                ctx.sd3_depth = tensors
                    .iter()
                    .find(|t| t.name == "pos_embed.proj.weight")
                    .and_then(|t| t.shape.first())
                    .map_or(0, |&rows| (rows / 64) as usize);
            }
            Layout::Unet => {
                let mut res: BTreeMap<usize, HashSet<usize>> = BTreeMap::new();
                for t in tensors {
                    if let Some((x, rest)) = block(&t.name, "down_blocks") {
                        let entry = res.entry(x).or_default();
                        if let Some((i, _)) = block(rest, "resnets") {
                            entry.insert(i);
                        }
                    }
                    if let Some((x, rest)) = block(&t.name, "up_blocks")
                        && let Some((i, _)) = block(rest, "attentions")
                    {
                        ctx.unet_up_attentions.insert((x, i));
                    }
                }
                // ComfyUI's count_blocks: levels 0.. while present.
                let mut x = 0;
                while let Some(r) = res.get(&x) {
                    ctx.unet_res_blocks.push(r.len());
                    x += 1;
                }
            }
            _ => {}
        }
        ctx
    }
}

/// Flux double-block renames (`flux_to_diffusers`' `block_map`).
const FLUX_DOUBLE: &[(&str, &str)] = &[
    ("attn.to_out.0.weight", "img_attn.proj.weight"),
    ("attn.to_out.0.bias", "img_attn.proj.bias"),
    ("norm1.linear.weight", "img_mod.lin.weight"),
    ("norm1.linear.bias", "img_mod.lin.bias"),
    ("norm1_context.linear.weight", "txt_mod.lin.weight"),
    ("norm1_context.linear.bias", "txt_mod.lin.bias"),
    ("attn.to_add_out.weight", "txt_attn.proj.weight"),
    ("attn.to_add_out.bias", "txt_attn.proj.bias"),
    ("ff.net.0.proj.weight", "img_mlp.0.weight"),
    ("ff.net.0.proj.bias", "img_mlp.0.bias"),
    ("ff.net.2.weight", "img_mlp.2.weight"),
    ("ff.net.2.bias", "img_mlp.2.bias"),
    ("ff_context.net.0.proj.weight", "txt_mlp.0.weight"),
    ("ff_context.net.0.proj.bias", "txt_mlp.0.bias"),
    ("ff_context.net.2.weight", "txt_mlp.2.weight"),
    ("ff_context.net.2.bias", "txt_mlp.2.bias"),
    ("attn.norm_q.weight", "img_attn.norm.query_norm.scale"),
    ("attn.norm_k.weight", "img_attn.norm.key_norm.scale"),
    ("attn.norm_added_q.weight", "txt_attn.norm.query_norm.scale"),
    ("attn.norm_added_k.weight", "txt_attn.norm.key_norm.scale"),
];

/// Flux single-block renames.
const FLUX_SINGLE: &[(&str, &str)] = &[
    ("norm.linear.weight", "modulation.lin.weight"),
    ("norm.linear.bias", "modulation.lin.bias"),
    ("proj_out.weight", "linear2.weight"),
    ("proj_out.bias", "linear2.bias"),
    ("attn.norm_q.weight", "norm.query_norm.scale"),
    ("attn.norm_k.weight", "norm.key_norm.scale"),
];

/// Flux top-level renames (`MAP_BASIC`, diffusers → ComfyUI; `norm_out.linear` is swapped).
const FLUX_BASIC: &[(&str, &str)] = &[
    ("proj_out.bias", "final_layer.linear.bias"),
    ("proj_out.weight", "final_layer.linear.weight"),
    ("x_embedder.bias", "img_in.bias"),
    ("x_embedder.weight", "img_in.weight"),
    (
        "time_text_embed.timestep_embedder.linear_1.bias",
        "time_in.in_layer.bias",
    ),
    (
        "time_text_embed.timestep_embedder.linear_1.weight",
        "time_in.in_layer.weight",
    ),
    (
        "time_text_embed.timestep_embedder.linear_2.bias",
        "time_in.out_layer.bias",
    ),
    (
        "time_text_embed.timestep_embedder.linear_2.weight",
        "time_in.out_layer.weight",
    ),
    ("context_embedder.bias", "txt_in.bias"),
    ("context_embedder.weight", "txt_in.weight"),
    (
        "time_text_embed.text_embedder.linear_1.bias",
        "vector_in.in_layer.bias",
    ),
    (
        "time_text_embed.text_embedder.linear_1.weight",
        "vector_in.in_layer.weight",
    ),
    (
        "time_text_embed.text_embedder.linear_2.bias",
        "vector_in.out_layer.bias",
    ),
    (
        "time_text_embed.text_embedder.linear_2.weight",
        "vector_in.out_layer.weight",
    ),
    (
        "time_text_embed.guidance_embedder.linear_1.bias",
        "guidance_in.in_layer.bias",
    ),
    (
        "time_text_embed.guidance_embedder.linear_1.weight",
        "guidance_in.in_layer.weight",
    ),
    (
        "time_text_embed.guidance_embedder.linear_2.bias",
        "guidance_in.out_layer.bias",
    ),
    (
        "time_text_embed.guidance_embedder.linear_2.weight",
        "guidance_in.out_layer.weight",
    ),
    ("controlnet_x_embedder.bias", "pos_embed_input.bias"),
    ("controlnet_x_embedder.weight", "pos_embed_input.weight"),
];

fn lookup(table: &[(&str, &str)], key: &str) -> Option<String> {
    table
        .iter()
        .find(|(d, _)| *d == key)
        .map(|(_, c)| (*c).to_owned())
}

fn flux_target(key: &str) -> Option<Target> {
    if let Some((i, rest)) = block(key, "transformer_blocks") {
        let to = format!("double_blocks.{i}");
        if let Some((stem, end)) = weight_or_bias(rest) {
            let slot = |s: &str| match s {
                "q" => Some(0),
                "k" => Some(1),
                "v" => Some(2),
                _ => None,
            };
            if let Some(s) = stem.strip_prefix("attn.to_").and_then(slot) {
                return part(format!("{to}.img_attn.qkv.{end}"), s, 3);
            }
            if let Some(s) = stem
                .strip_prefix("attn.add_")
                .and_then(|s| s.strip_suffix("_proj"))
                .and_then(slot)
            {
                return part(format!("{to}.txt_attn.qkv.{end}"), s, 3);
            }
        }
        return whole(format!("{to}.{}", lookup(FLUX_DOUBLE, rest)?));
    }
    if let Some((i, rest)) = block(key, "single_transformer_blocks") {
        let to = format!("single_blocks.{i}");
        if let Some((stem, end)) = weight_or_bias(rest) {
            let s = match stem {
                "attn.to_q" => Some(0),
                "attn.to_k" => Some(1),
                "attn.to_v" => Some(2),
                "proj_mlp" => Some(3),
                _ => None,
            };
            if let Some(s) = s {
                return part(format!("{to}.linear1.{end}"), s, 4);
            }
        }
        return whole(format!("{to}.{}", lookup(FLUX_SINGLE, rest)?));
    }
    match key {
        "norm_out.linear.weight" => swapped("final_layer.adaLN_modulation.1.weight".into()),
        "norm_out.linear.bias" => swapped("final_layer.adaLN_modulation.1.bias".into()),
        _ => whole(lookup(FLUX_BASIC, key)?),
    }
}

/// SD3 joint-block renames (`MMDIT_MAP_BLOCK`, diffusers → ComfyUI).
const SD3_BLOCK: &[(&str, &str)] = &[
    (
        "norm1_context.linear.bias",
        "context_block.adaLN_modulation.1.bias",
    ),
    (
        "norm1_context.linear.weight",
        "context_block.adaLN_modulation.1.weight",
    ),
    ("attn.to_add_out.bias", "context_block.attn.proj.bias"),
    ("attn.to_add_out.weight", "context_block.attn.proj.weight"),
    ("ff_context.net.0.proj.bias", "context_block.mlp.fc1.bias"),
    (
        "ff_context.net.0.proj.weight",
        "context_block.mlp.fc1.weight",
    ),
    ("ff_context.net.2.bias", "context_block.mlp.fc2.bias"),
    ("ff_context.net.2.weight", "context_block.mlp.fc2.weight"),
    ("attn.norm_added_q.weight", "context_block.attn.ln_q.weight"),
    ("attn.norm_added_k.weight", "context_block.attn.ln_k.weight"),
    ("norm1.linear.bias", "x_block.adaLN_modulation.1.bias"),
    ("norm1.linear.weight", "x_block.adaLN_modulation.1.weight"),
    ("attn.to_out.0.bias", "x_block.attn.proj.bias"),
    ("attn.to_out.0.weight", "x_block.attn.proj.weight"),
    ("attn.norm_q.weight", "x_block.attn.ln_q.weight"),
    ("attn.norm_k.weight", "x_block.attn.ln_k.weight"),
    ("attn2.to_out.0.bias", "x_block.attn2.proj.bias"),
    ("attn2.to_out.0.weight", "x_block.attn2.proj.weight"),
    ("attn2.norm_q.weight", "x_block.attn2.ln_q.weight"),
    ("attn2.norm_k.weight", "x_block.attn2.ln_k.weight"),
    ("ff.net.0.proj.bias", "x_block.mlp.fc1.bias"),
    ("ff.net.0.proj.weight", "x_block.mlp.fc1.weight"),
    ("ff.net.2.bias", "x_block.mlp.fc2.bias"),
    ("ff.net.2.weight", "x_block.mlp.fc2.weight"),
];

/// SD3 top-level renames (`MMDIT_MAP_BASIC`; `norm_out.linear` is swapped).
const SD3_BASIC: &[(&str, &str)] = &[
    ("context_embedder.bias", "context_embedder.bias"),
    ("context_embedder.weight", "context_embedder.weight"),
    (
        "time_text_embed.timestep_embedder.linear_1.bias",
        "t_embedder.mlp.0.bias",
    ),
    (
        "time_text_embed.timestep_embedder.linear_1.weight",
        "t_embedder.mlp.0.weight",
    ),
    (
        "time_text_embed.timestep_embedder.linear_2.bias",
        "t_embedder.mlp.2.bias",
    ),
    (
        "time_text_embed.timestep_embedder.linear_2.weight",
        "t_embedder.mlp.2.weight",
    ),
    ("pos_embed.proj.bias", "x_embedder.proj.bias"),
    ("pos_embed.proj.weight", "x_embedder.proj.weight"),
    (
        "time_text_embed.text_embedder.linear_1.bias",
        "y_embedder.mlp.0.bias",
    ),
    (
        "time_text_embed.text_embedder.linear_1.weight",
        "y_embedder.mlp.0.weight",
    ),
    (
        "time_text_embed.text_embedder.linear_2.bias",
        "y_embedder.mlp.2.bias",
    ),
    (
        "time_text_embed.text_embedder.linear_2.weight",
        "y_embedder.mlp.2.weight",
    ),
    ("pos_embed.pos_embed", "pos_embed"),
    ("proj_out.bias", "final_layer.linear.bias"),
    ("proj_out.weight", "final_layer.linear.weight"),
];

fn sd3_target(key: &str, ctx: &Context) -> Option<Target> {
    if let Some((i, rest)) = block(key, "transformer_blocks") {
        let to = format!("joint_blocks.{i}");
        if let Some((stem, end)) = weight_or_bias(rest) {
            let qkv = |s: &str| match s {
                "q" => Some(0),
                "k" => Some(1),
                "v" => Some(2),
                _ => None,
            };
            if let Some(s) = stem.strip_prefix("attn.to_").and_then(qkv) {
                return part(format!("{to}.x_block.attn.qkv.{end}"), s, 3);
            }
            if let Some(s) = stem
                .strip_prefix("attn.add_")
                .and_then(|s| s.strip_suffix("_proj"))
                .and_then(qkv)
            {
                return part(format!("{to}.context_block.attn.qkv.{end}"), s, 3);
            }
            if let Some(s) = stem.strip_prefix("attn2.to_").and_then(qkv) {
                return part(format!("{to}.x_block.attn2.qkv.{end}"), s, 3);
            }
            // The last block (`depth - 1`) is context_pre_only: its modulation is shift, scale.
            if stem == "norm1_context.linear" && ctx.sd3_depth > 0 && i == ctx.sd3_depth - 1 {
                return swapped(format!("{to}.context_block.adaLN_modulation.1.{end}"));
            }
        }
        return whole(format!("{to}.{}", lookup(SD3_BLOCK, rest)?));
    }
    match key {
        "norm_out.linear.weight" => swapped("final_layer.adaLN_modulation.1.weight".into()),
        "norm_out.linear.bias" => swapped("final_layer.adaLN_modulation.1.bias".into()),
        _ => whole(lookup(SD3_BASIC, key)?),
    }
}

/// `UNET_MAP_RESNET`, diffusers → ComfyUI.
const UNET_RESNET: &[(&str, &str)] = &[
    ("conv1.weight", "in_layers.2.weight"),
    ("conv1.bias", "in_layers.2.bias"),
    ("time_emb_proj.weight", "emb_layers.1.weight"),
    ("time_emb_proj.bias", "emb_layers.1.bias"),
    ("conv2.weight", "out_layers.3.weight"),
    ("conv2.bias", "out_layers.3.bias"),
    ("conv_shortcut.weight", "skip_connection.weight"),
    ("conv_shortcut.bias", "skip_connection.bias"),
    ("norm1.weight", "in_layers.0.weight"),
    ("norm1.bias", "in_layers.0.bias"),
    ("norm2.weight", "out_layers.0.weight"),
    ("norm2.bias", "out_layers.0.bias"),
];

/// `UNET_MAP_ATTENTIONS` (same name on both sides).
const UNET_ATTENTIONS: &[&str] = &[
    "proj_in.weight",
    "proj_in.bias",
    "proj_out.weight",
    "proj_out.bias",
    "norm.weight",
    "norm.bias",
];

/// `TRANSFORMER_BLOCKS` (same name on both sides).
const UNET_TRANSFORMER: &[&str] = &[
    "norm1.weight",
    "norm1.bias",
    "norm2.weight",
    "norm2.bias",
    "norm3.weight",
    "norm3.bias",
    "attn1.to_q.weight",
    "attn1.to_k.weight",
    "attn1.to_v.weight",
    "attn1.to_out.0.weight",
    "attn1.to_out.0.bias",
    "attn2.to_q.weight",
    "attn2.to_k.weight",
    "attn2.to_v.weight",
    "attn2.to_out.0.weight",
    "attn2.to_out.0.bias",
    "ff.net.0.proj.weight",
    "ff.net.0.proj.bias",
    "ff.net.2.weight",
    "ff.net.2.bias",
];

/// `UNET_MAP_BASIC`, diffusers → ComfyUI.
const UNET_BASIC: &[(&str, &str)] = &[
    ("class_embedding.linear_1.weight", "label_emb.0.0.weight"),
    ("class_embedding.linear_1.bias", "label_emb.0.0.bias"),
    ("class_embedding.linear_2.weight", "label_emb.0.2.weight"),
    ("class_embedding.linear_2.bias", "label_emb.0.2.bias"),
    ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
    ("add_embedding.linear_1.bias", "label_emb.0.0.bias"),
    ("add_embedding.linear_2.weight", "label_emb.0.2.weight"),
    ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
    ("conv_in.weight", "input_blocks.0.0.weight"),
    ("conv_in.bias", "input_blocks.0.0.bias"),
    ("conv_norm_out.weight", "out.0.weight"),
    ("conv_norm_out.bias", "out.0.bias"),
    ("conv_out.weight", "out.2.weight"),
    ("conv_out.bias", "out.2.bias"),
    ("time_embedding.linear_1.weight", "time_embed.0.weight"),
    ("time_embedding.linear_1.bias", "time_embed.0.bias"),
    ("time_embedding.linear_2.weight", "time_embed.2.weight"),
    ("time_embedding.linear_2.bias", "time_embed.2.bias"),
];

/// An attention module's key (`proj_in`, ..., or `transformer_blocks.<t>.<b>`) under `to`.
fn unet_attention(rest: &str, to: &str) -> Option<Target> {
    if UNET_ATTENTIONS.contains(&rest) {
        return whole(format!("{to}.{rest}"));
    }
    let (t, b) = block(rest, "transformer_blocks")?;
    UNET_TRANSFORMER
        .contains(&b)
        .then(|| format!("{to}.transformer_blocks.{t}.{b}"))
        .and_then(whole)
}

fn unet_target(key: &str, ctx: &Context) -> Option<Target> {
    let nrb = &ctx.unet_res_blocks;
    if let Some((x, rest)) = block(key, "down_blocks") {
        let r = *nrb.get(x)?;
        let first = 1 + (r + 1) * x;
        if let Some((i, k)) = block(rest, "resnets") {
            return (i < r)
                .then(|| lookup(UNET_RESNET, k))
                .flatten()
                .and_then(|c| whole(format!("input_blocks.{}.0.{c}", first + i)));
        }
        if let Some((i, k)) = block(rest, "attentions") {
            return (i < r)
                .then(|| unet_attention(k, &format!("input_blocks.{}.1", first + i)))
                .flatten();
        }
        let end = rest.strip_prefix("downsamplers.0.conv.")?;
        return matches!(end, "weight" | "bias")
            .then(|| whole(format!("input_blocks.{}.0.op.{end}", first + r)))
            .flatten();
    }
    if let Some(rest) = key.strip_prefix("mid_block.") {
        if let Some((i, k)) = block(rest, "resnets") {
            let n = [0, 2].get(i)?;
            return whole(format!("middle_block.{n}.{}", lookup(UNET_RESNET, k)?));
        }
        let (0, k) = block(rest, "attentions")? else {
            return None;
        };
        return unet_attention(k, "middle_block.1");
    }
    if let Some((x, rest)) = block(key, "up_blocks") {
        let levels = nrb.len();
        let r = *nrb.get(levels.checked_sub(x + 1)?)?;
        let l = r + 1;
        let first = (r + 1) * x;
        if let Some((i, k)) = block(rest, "resnets") {
            return (i < l)
                .then(|| lookup(UNET_RESNET, k))
                .flatten()
                .and_then(|c| whole(format!("output_blocks.{}.0.{c}", first + i)));
        }
        if let Some((i, k)) = block(rest, "attentions") {
            return (i < l)
                .then(|| unet_attention(k, &format!("output_blocks.{}.1", first + i)))
                .flatten();
        }
        let end = rest.strip_prefix("upsamplers.0.conv.")?;
        let c = if ctx.unet_up_attentions.contains(&(x, l - 1)) {
            2
        } else {
            1
        };
        return matches!(end, "weight" | "bias")
            .then(|| whole(format!("output_blocks.{}.{c}.conv.{end}", first + l - 1)))
            .flatten();
    }
    whole(lookup(UNET_BASIC, key)?)
}

/// The inverse of diffusers' `TRANSFORMER_KEYS_RENAME_DICT` (convert_wan_to_diffusers.py):
/// per-block module renames, diffusers → Wan's reference names.
const WAN_BLOCK: &[(&str, &str)] = &[
    ("attn1.to_q", "self_attn.q"),
    ("attn1.to_k", "self_attn.k"),
    ("attn1.to_v", "self_attn.v"),
    ("attn1.to_out.0", "self_attn.o"),
    ("attn1.norm_q", "self_attn.norm_q"),
    ("attn1.norm_k", "self_attn.norm_k"),
    ("attn2.to_q", "cross_attn.q"),
    ("attn2.to_k", "cross_attn.k"),
    ("attn2.to_v", "cross_attn.v"),
    ("attn2.to_out.0", "cross_attn.o"),
    ("attn2.norm_q", "cross_attn.norm_q"),
    ("attn2.norm_k", "cross_attn.norm_k"),
    ("attn2.add_k_proj", "cross_attn.k_img"),
    ("attn2.add_v_proj", "cross_attn.v_img"),
    ("attn2.norm_added_k", "cross_attn.norm_k_img"),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    // The reference model's norms run norm1, norm3, norm2; diffusers renumbers them.
    ("norm2", "norm3"),
];

/// Wan top-level module renames, diffusers → reference.
const WAN_BASIC: &[(&str, &str)] = &[
    (
        "condition_embedder.time_embedder.linear_1",
        "time_embedding.0",
    ),
    (
        "condition_embedder.time_embedder.linear_2",
        "time_embedding.2",
    ),
    (
        "condition_embedder.text_embedder.linear_1",
        "text_embedding.0",
    ),
    (
        "condition_embedder.text_embedder.linear_2",
        "text_embedding.2",
    ),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    (
        "condition_embedder.image_embedder.ff.net.0.proj",
        "img_emb.proj.1",
    ),
    (
        "condition_embedder.image_embedder.ff.net.2",
        "img_emb.proj.3",
    ),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("proj_out", "head.head"),
    ("patch_embedding", "patch_embedding"),
];

fn wan_target(key: &str) -> Option<Target> {
    if let Some((i, rest)) = block(key, "blocks") {
        if rest == "scale_shift_table" {
            return whole(format!("blocks.{i}.modulation"));
        }
        let (stem, end) = weight_or_bias(rest)?;
        return whole(format!("blocks.{i}.{}.{end}", lookup(WAN_BLOCK, stem)?));
    }
    match key {
        "scale_shift_table" => whole("head.modulation".into()),
        "condition_embedder.image_embedder.pos_embed" => whole("img_emb.emb_pos".into()),
        _ => {
            let (stem, end) = weight_or_bias(key)?;
            whole(format!("{}.{end}", lookup(WAN_BASIC, stem)?))
        }
    }
}

/// `z_image_to_diffusers`' per-block renames (identical names but for these).
const Z_IMAGE_BLOCK: &[(&str, &str)] = &[
    ("attention.norm_q.weight", "attention.q_norm.weight"),
    ("attention.norm_k.weight", "attention.k_norm.weight"),
    ("attention.to_out.0.weight", "attention.out.weight"),
    ("attention.to_out.0.bias", "attention.out.bias"),
];

/// `z_image_to_diffusers`' `MAP_BASIC` entries whose names differ.
const Z_IMAGE_BASIC: &[(&str, &str)] = &[
    (
        "all_final_layer.2-1.linear.weight",
        "final_layer.linear.weight",
    ),
    ("all_final_layer.2-1.linear.bias", "final_layer.linear.bias"),
    (
        "all_final_layer.2-1.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.weight",
    ),
    (
        "all_final_layer.2-1.adaLN_modulation.1.bias",
        "final_layer.adaLN_modulation.1.bias",
    ),
    ("all_x_embedder.2-1.weight", "x_embedder.weight"),
    ("all_x_embedder.2-1.bias", "x_embedder.bias"),
];

/// Z-Image: ComfyUI's map covers `layers.<n>` for the counted layers and refiners 0 and 1
/// (its `n_refiner_layers` default); every other key passes through as it is.
fn z_image_target(key: &str) -> Option<Target> {
    for (prefix, counted) in [
        ("layers", true),
        ("context_refiner", false),
        ("noise_refiner", false),
    ] {
        if let Some((i, rest)) = block(key, prefix)
            && (counted || i < 2)
        {
            if let Some((stem, end)) = weight_or_bias(rest) {
                let slot = match stem {
                    "attention.to_q" => Some(0),
                    "attention.to_k" => Some(1),
                    "attention.to_v" => Some(2),
                    _ => None,
                };
                if let Some(s) = slot {
                    return part(format!("{prefix}.{i}.attention.qkv.{end}"), s, 3);
                }
            }
            if let Some(c) = lookup(Z_IMAGE_BLOCK, rest) {
                return whole(format!("{prefix}.{i}.{c}"));
            }
        }
    }
    whole(lookup(Z_IMAGE_BASIC, key).unwrap_or_else(|| key.to_owned()))
}

/// Lumina 2 per-block renames, diffusers → ComfyUI's `JointTransformerBlock`: the inverse of
/// `convert_lumina2_to_diffusers`' `LUMINA_KEY_MAP` / `ATTENTION_NORM_MAP` (q, k and v are
/// fused separately). Every block has them.
const LUMINA2_BLOCK: &[(&str, &str)] = &[
    ("attn.to_out.0.weight", "attention.out.weight"),
    ("attn.norm_q.weight", "attention.q_norm.weight"),
    ("attn.norm_k.weight", "attention.k_norm.weight"),
    ("feed_forward.linear_1.weight", "feed_forward.w1.weight"),
    ("feed_forward.linear_2.weight", "feed_forward.w2.weight"),
    ("feed_forward.linear_3.weight", "feed_forward.w3.weight"),
    ("norm2.weight", "attention_norm2.weight"),
    ("ffn_norm1.weight", "ffn_norm1.weight"),
    ("ffn_norm2.weight", "ffn_norm2.weight"),
];

/// Lumina 2 modulated blocks (`layers`, `noise_refiner`): diffusers' `LuminaRMSNormZero`
/// (`norm1.linear`, `norm1.norm`) is ComfyUI's `adaLN_modulation.1` and `attention_norm1`.
const LUMINA2_MODULATED: &[(&str, &str)] = &[
    ("norm1.linear.weight", "adaLN_modulation.1.weight"),
    ("norm1.linear.bias", "adaLN_modulation.1.bias"),
    ("norm1.norm.weight", "attention_norm1.weight"),
];

/// Lumina 2 top-level renames (`LUMINA_KEY_MAP`, `FINAL_LAYER_MAP`, diffusers → ComfyUI). The
/// final layer's modulation is a scale only, in the same order on both sides: no swap.
const LUMINA2_BASIC: &[(&str, &str)] = &[
    ("x_embedder.weight", "x_embedder.weight"),
    ("x_embedder.bias", "x_embedder.bias"),
    (
        "time_caption_embed.timestep_embedder.linear_1.weight",
        "t_embedder.mlp.0.weight",
    ),
    (
        "time_caption_embed.timestep_embedder.linear_1.bias",
        "t_embedder.mlp.0.bias",
    ),
    (
        "time_caption_embed.timestep_embedder.linear_2.weight",
        "t_embedder.mlp.2.weight",
    ),
    (
        "time_caption_embed.timestep_embedder.linear_2.bias",
        "t_embedder.mlp.2.bias",
    ),
    (
        "time_caption_embed.caption_embedder.0.weight",
        "cap_embedder.0.weight",
    ),
    (
        "time_caption_embed.caption_embedder.1.weight",
        "cap_embedder.1.weight",
    ),
    (
        "time_caption_embed.caption_embedder.1.bias",
        "cap_embedder.1.bias",
    ),
    (
        "norm_out.linear_1.weight",
        "final_layer.adaLN_modulation.1.weight",
    ),
    (
        "norm_out.linear_1.bias",
        "final_layer.adaLN_modulation.1.bias",
    ),
    ("norm_out.linear_2.weight", "final_layer.linear.weight"),
    ("norm_out.linear_2.bias", "final_layer.linear.bias"),
];

/// Lumina-Image-2.0: only the names ComfyUI's `NextDiT` has (no q/k/v or output bias, no
/// modulation in the context refiners), so a variant with other modules is refused.
fn lumina2_target(key: &str) -> Option<Target> {
    for (prefix, modulated) in [
        ("layers", true),
        ("noise_refiner", true),
        ("context_refiner", false),
    ] {
        let Some((i, rest)) = block(key, prefix) else {
            continue;
        };
        let to = format!("{prefix}.{i}");
        let slot = match rest {
            "attn.to_q.weight" => Some(0),
            "attn.to_k.weight" => Some(1),
            "attn.to_v.weight" => Some(2),
            _ => None,
        };
        if let Some(s) = slot {
            return part(format!("{to}.attention.qkv.weight"), s, 3);
        }
        let own = if modulated {
            lookup(LUMINA2_MODULATED, rest)
        } else {
            // An unmodulated block's `norm1` is the RMSNorm itself.
            (rest == "norm1.weight").then(|| "attention_norm1.weight".to_owned())
        };
        let c = own.or_else(|| lookup(LUMINA2_BLOCK, rest))?;
        return whole(format!("{to}.{c}"));
    }
    whole(lookup(LUMINA2_BASIC, key)?)
}

/// Flux.2 double-block renames: the inverse of `FLUX2_TRANSFORMER_DOUBLE_BLOCK_KEY_MAP`
/// (norm weights back to the reference checkpoints' `.scale`, as for Flux.1).
const FLUX2_DOUBLE: &[(&str, &str)] = &[
    ("attn.norm_q.weight", "img_attn.norm.query_norm.scale"),
    ("attn.norm_k.weight", "img_attn.norm.key_norm.scale"),
    ("attn.to_out.0.weight", "img_attn.proj.weight"),
    ("ff.linear_in.weight", "img_mlp.0.weight"),
    ("ff.linear_out.weight", "img_mlp.2.weight"),
    ("attn.norm_added_q.weight", "txt_attn.norm.query_norm.scale"),
    ("attn.norm_added_k.weight", "txt_attn.norm.key_norm.scale"),
    ("attn.to_add_out.weight", "txt_attn.proj.weight"),
    ("ff_context.linear_in.weight", "txt_mlp.0.weight"),
    ("ff_context.linear_out.weight", "txt_mlp.2.weight"),
];

/// Flux.2 single-block renames: the inverse of `FLUX2_TRANSFORMER_SINGLE_BLOCK_KEY_MAP` (the
/// q/k/v/mlp projection is fused on both sides).
const FLUX2_SINGLE: &[(&str, &str)] = &[
    ("attn.to_qkv_mlp_proj.weight", "linear1.weight"),
    ("attn.to_out.weight", "linear2.weight"),
    ("attn.norm_q.weight", "norm.query_norm.scale"),
    ("attn.norm_k.weight", "norm.key_norm.scale"),
];

/// Flux.2 top-level renames: the inverse of `FLUX2_TRANSFORMER_KEYS_RENAME_DICT`
/// (`norm_out.linear` is swapped).
const FLUX2_BASIC: &[(&str, &str)] = &[
    ("x_embedder.weight", "img_in.weight"),
    ("context_embedder.weight", "txt_in.weight"),
    (
        "time_guidance_embed.timestep_embedder.linear_1.weight",
        "time_in.in_layer.weight",
    ),
    (
        "time_guidance_embed.timestep_embedder.linear_2.weight",
        "time_in.out_layer.weight",
    ),
    (
        "time_guidance_embed.guidance_embedder.linear_1.weight",
        "guidance_in.in_layer.weight",
    ),
    (
        "time_guidance_embed.guidance_embedder.linear_2.weight",
        "guidance_in.out_layer.weight",
    ),
    (
        "double_stream_modulation_img.linear.weight",
        "double_stream_modulation_img.lin.weight",
    ),
    (
        "double_stream_modulation_txt.linear.weight",
        "double_stream_modulation_txt.lin.weight",
    ),
    (
        "single_stream_modulation.linear.weight",
        "single_stream_modulation.lin.weight",
    ),
    ("proj_out.weight", "final_layer.linear.weight"),
];

/// Flux.2: weights only (ComfyUI builds Flux.2 with `qkv_bias` and `ops_bias` off, so a bias
/// has no place in its model and is refused).
fn flux2_target(key: &str) -> Option<Target> {
    if let Some((i, rest)) = block(key, "transformer_blocks") {
        let to = format!("double_blocks.{i}");
        let img = match rest {
            "attn.to_q.weight" => Some(0),
            "attn.to_k.weight" => Some(1),
            "attn.to_v.weight" => Some(2),
            _ => None,
        };
        if let Some(s) = img {
            return part(format!("{to}.img_attn.qkv.weight"), s, 3);
        }
        let txt = match rest {
            "attn.add_q_proj.weight" => Some(0),
            "attn.add_k_proj.weight" => Some(1),
            "attn.add_v_proj.weight" => Some(2),
            _ => None,
        };
        if let Some(s) = txt {
            return part(format!("{to}.txt_attn.qkv.weight"), s, 3);
        }
        return whole(format!("{to}.{}", lookup(FLUX2_DOUBLE, rest)?));
    }
    if let Some((i, rest)) = block(key, "single_transformer_blocks") {
        return whole(format!("single_blocks.{i}.{}", lookup(FLUX2_SINGLE, rest)?));
    }
    match key {
        "norm_out.linear.weight" => swapped("final_layer.adaLN_modulation.1.weight".into()),
        _ => whole(lookup(FLUX2_BASIC, key)?),
    }
}

fn target(layout: Layout, key: &str, ctx: &Context) -> Option<Target> {
    match layout {
        Layout::Flux => flux_target(key),
        Layout::Sd3 => sd3_target(key, ctx),
        Layout::Unet => unet_target(key, ctx),
        Layout::Wan => wan_target(key),
        Layout::ZImage => z_image_target(key),
        Layout::Lumina2 => lumina2_target(key),
        Layout::Flux2 => flux2_target(key),
    }
}

/// A contiguous byte range of one inner tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    /// The inner tensor.
    index: usize,
    /// Where the range starts in it.
    byte_start: u64,
    /// Its length.
    byte_len: u64,
}

/// The ComfyUI-layout tensors of a diffusers-layout key set, each as pieces of the inner ones.
#[derive(Debug, Clone)]
pub struct Mapping {
    layout: Layout,
    tensors: Vec<SourceTensor>,
    pieces: Vec<Vec<Piece>>,
}

impl Mapping {
    /// The mapping of `tensors` (a source's, in its order), or `None` when they are not in a
    /// diffusers layout convcache maps. `path` is for messages.
    pub fn plan(path: &Path, tensors: &[SourceTensor]) -> Result<Option<Mapping>, DiffusersError> {
        let names: HashSet<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        let Some(layout) = Layout::of_names(&names) else {
            return Ok(None);
        };
        let ctx = Context::of(layout, tensors);
        let lname = layout.name();
        // ComfyUI tensor -> (first inner index, role, parts by slot).
        struct Group {
            first: usize,
            role: Role,
            parts: Vec<Option<usize>>,
        }
        let mut groups: HashMap<String, Group> = HashMap::new();
        for (index, t) in tensors.iter().enumerate() {
            let Some(Target { name, role }) = target(layout, &t.name, &ctx) else {
                return Err(DiffusersError::UnknownKey {
                    path: path.to_owned(),
                    layout: lname,
                    key: t.name.clone(),
                });
            };
            let (slot, of) = match role {
                Role::Part { slot, of } => (slot as usize, of as usize),
                _ => (0, 1),
            };
            let group = groups.entry(name.clone()).or_insert_with(|| Group {
                first: index,
                role,
                parts: vec![None; of],
            });
            let same_kind = match (group.role, role) {
                (Role::Part { of: a, .. }, Role::Part { of: b, .. }) => a == b,
                (a, b) => a == b,
            };
            match group.parts.get(slot) {
                Some(None) if same_kind => group.parts[slot] = Some(index),
                _ => {
                    let other = group
                        .parts
                        .iter()
                        .flatten()
                        .next()
                        .copied()
                        .unwrap_or(index);
                    return Err(DiffusersError::Collision {
                        path: path.to_owned(),
                        layout: lname,
                        tensor: name,
                        first: tensors[other].name.clone(),
                        second: t.name.clone(),
                    });
                }
            }
        }
        let mut order: Vec<(String, Group)> = groups.into_iter().collect();
        order.sort_by_key(|(_, g)| g.first);
        let mut out = Mapping {
            layout,
            tensors: Vec::with_capacity(order.len()),
            pieces: Vec::with_capacity(order.len()),
        };
        for (name, group) in order {
            let bad = |problem: String| DiffusersError::BadParts {
                path: path.to_owned(),
                layout: lname,
                tensor: name.clone(),
                problem,
            };
            let mut parts = Vec::with_capacity(group.parts.len());
            for (slot, p) in group.parts.iter().enumerate() {
                match p {
                    Some(i) => parts.push(&tensors[*i]),
                    None => {
                        return Err(DiffusersError::MissingPart {
                            path: path.to_owned(),
                            layout: lname,
                            tensor: name.clone(),
                            part: part_name(&tensors[group.first].name, group.parts.len(), slot),
                        });
                    }
                }
            }
            let head = parts[0];
            let byte_len = |t: &SourceTensor| {
                t.byte_len()
                    .ok_or_else(|| bad(format!("`{}` is too large", t.name)))
            };
            let (shape, pieces) = match group.role {
                Role::Whole => (
                    head.shape.clone(),
                    vec![Piece {
                        index: group.parts[0].unwrap_or(group.first),
                        byte_start: 0,
                        byte_len: byte_len(head)?,
                    }],
                ),
                Role::SwapHalves => {
                    let rows = head.shape.first().copied().unwrap_or(0);
                    if head.shape.is_empty() || rows % 2 != 0 || head.dtype.bits() % 8 != 0 {
                        return Err(bad(format!(
                            "`{}` ({} {:?}) has no two halves to swap",
                            head.name, head.dtype, head.shape
                        )));
                    }
                    let half = byte_len(head)? / 2;
                    let index = group.first;
                    (
                        head.shape.clone(),
                        vec![
                            Piece {
                                index,
                                byte_start: half,
                                byte_len: half,
                            },
                            Piece {
                                index,
                                byte_start: 0,
                                byte_len: half,
                            },
                        ],
                    )
                }
                Role::Part { .. } => {
                    let mut rows = 0u64;
                    let mut pieces = Vec::with_capacity(parts.len());
                    for (t, &i) in parts.iter().zip(group.parts.iter().flatten()) {
                        if t.dtype != head.dtype {
                            return Err(bad(format!(
                                "`{}` is {} but `{}` is {}",
                                head.name, head.dtype, t.name, t.dtype
                            )));
                        }
                        if t.shape.is_empty() || t.shape[1..] != head.shape[1..] {
                            return Err(bad(format!(
                                "`{}` has shape {:?}, `{}` {:?}",
                                head.name, head.shape, t.name, t.shape
                            )));
                        }
                        if head.dtype.bits() % 8 != 0 {
                            return Err(bad(format!("{} values are not whole bytes", t.dtype)));
                        }
                        rows = rows
                            .checked_add(t.shape[0])
                            .ok_or_else(|| bad("too many rows".into()))?;
                        pieces.push(Piece {
                            index: i,
                            byte_start: 0,
                            byte_len: byte_len(t)?,
                        });
                    }
                    let qkv = &parts[..3.min(parts.len())];
                    let qkv_rows: Vec<u64> = qkv.iter().map(|t| t.shape[0]).collect();
                    if let Err(need) = layout.check_qkv_rows(&qkv_rows) {
                        return Err(bad(format!(
                            "its q, k and v parts have sizes {}; {need}",
                            qkv_rows
                                .iter()
                                .map(u64::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )));
                    }
                    let mut shape = head.shape.clone();
                    shape[0] = rows;
                    (shape, pieces)
                }
            };
            let source_bytes = parts
                .iter()
                .map(|t| t.source_bytes)
                .fold(0u64, u64::saturating_add);
            out.tensors.push(SourceTensor {
                name,
                shape,
                dtype: head.dtype,
                stored: head.stored,
                source_bytes,
            });
            out.pieces.push(pieces);
        }
        Ok(Some(out))
    }

    /// The layout mapped.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The ComfyUI-layout tensors.
    pub fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }
}

/// The diffusers key of part `slot` of a group of `of` parts whose first present part is
/// `known` (for the missing-part message).
fn part_name(known: &str, of: usize, slot: usize) -> String {
    let (stem, end) = match known.rsplit_once('.') {
        Some((s, e)) => (s, e),
        None => (known, ""),
    };
    let names: &[&str] = if stem.ends_with("_proj") && stem.contains(".attn.add_") {
        &["add_q_proj", "add_k_proj", "add_v_proj"]
    } else if of == 4 {
        &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    } else {
        &["to_q", "to_k", "to_v"]
    };
    let Some(want) = names.get(slot) else {
        return format!("part {slot} of {known}");
    };
    // Replace the known part's own suffix by the wanted one.
    for n in names {
        if let Some(base) = stem.strip_suffix(n) {
            return format!("{base}{want}.{end}");
        }
    }
    format!("part {slot} of {known}")
}

/// A diffusers-layout source served in ComfyUI's layout (see the module docs).
#[derive(Debug)]
pub struct DiffusersView<S> {
    inner: S,
    mapping: Mapping,
}

impl<S: TensorSource> DiffusersView<S> {
    /// `inner` served in ComfyUI's layout, or `inner` itself back when it is not in a diffusers
    /// layout convcache maps.
    pub fn wrap(inner: S) -> Result<Result<DiffusersView<S>, S>, DiffusersError> {
        match Mapping::plan(inner.path(), inner.tensors())? {
            Some(mapping) => Ok(Ok(DiffusersView { inner, mapping })),
            None => Ok(Err(inner)),
        }
    }

    /// The layout mapped.
    pub fn layout(&self) -> Layout {
        self.mapping.layout
    }

    /// The source read.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn pieces(&self, index: usize) -> Result<(&SourceTensor, &[Piece]), SourceError> {
        let t = tensor(self, index)?;
        Ok((t, &self.mapping.pieces[index]))
    }
}

impl<S: TensorSource> TensorSource for DiffusersView<S> {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn tensors(&self) -> &[SourceTensor] {
        &self.mapping.tensors
    }

    fn metadata(&self) -> &BTreeMap<String, String> {
        self.inner.metadata()
    }

    fn hidden(&self) -> &[HiddenTensor] {
        self.inner.hidden()
    }

    fn read_raw(&self, index: usize, byte_offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let (t, pieces) = self.pieces(index)?;
        let total: u64 = pieces.iter().map(|p| p.byte_len).sum();
        if byte_offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > total)
        {
            return Err(SourceError::invalid(
                self.path(),
                &t.name,
                format!("bytes {byte_offset}+{} are outside the tensor", buf.len()),
            ));
        }
        let mut at = byte_offset;
        let mut buf = buf;
        let mut start = 0u64;
        for p in pieces {
            if buf.is_empty() {
                break;
            }
            let end = start + p.byte_len;
            if at < end {
                let local = at - start;
                let n = ((end - at) as usize).min(buf.len());
                let (head, rest) = buf.split_at_mut(n);
                self.inner.read_raw(p.index, p.byte_start + local, head)?;
                buf = rest;
                at += n as u64;
            }
            start = end;
        }
        Ok(())
    }

    fn read_f32(&self, index: usize, start: u64, out: &mut [f32]) -> Result<(), SourceError> {
        let (t, pieces) = self.pieces(index)?;
        check_range(self, t, start, out.len() as u64)?;
        if let [p] = pieces
            && p.byte_start == 0
        {
            return self.inner.read_f32(p.index, start, out);
        }
        // Multi-piece tensors are of a whole-byte dtype (checked by the plan).
        let es = t.dtype.bits() / 8;
        let mut at = start;
        let mut out = out;
        let mut first = 0u64;
        for p in pieces {
            if out.is_empty() {
                break;
            }
            let n_el = p.byte_len / es;
            let end = first + n_el;
            if at < end {
                let local = at - first;
                let n = ((end - at) as usize).min(out.len());
                let (head, rest) = out.split_at_mut(n);
                self.inner
                    .read_f32(p.index, p.byte_start / es + local, head)?;
                out = rest;
                at += n as u64;
            }
            first = end;
        }
        Ok(())
    }

    fn check_unchanged(&self) -> Result<(), SourceError> {
        self.inner.check_unchanged()
    }
}

/// What a path given as a source stands for in a diffusers repository: a repository root
/// holding `transformer/` or `unet/` stands for that folder; a folder without a shard index
/// holding [`SINGLE_FILE_NAME`] stands for that file. Any other path is returned as it is
/// (a folder with a shard index is a sharded source: [`crate::sharded::locate_index`]).
pub fn resolve_source(path: &Path) -> PathBuf {
    let mut path = path.to_owned();
    // A root, then its model folder: at most two steps.
    for _ in 0..2 {
        if !fs::metadata(&path).is_ok_and(|m| m.is_dir())
            || crate::sharded::locate_index(&path).is_ok_and(|i| i.is_some())
        {
            return path;
        }
        let single = path.join(SINGLE_FILE_NAME);
        if fs::metadata(&single).is_ok_and(|m| m.is_file()) {
            return single;
        }
        match MODEL_FOLDERS
            .iter()
            .map(|f| path.join(f))
            .find(|f| fs::metadata(f).is_ok_and(|m| m.is_dir()))
        {
            Some(folder) => path = folder,
            None => return path,
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::Dtype;
    use crate::source::Stored;

    fn t(name: &str, shape: &[u64]) -> SourceTensor {
        SourceTensor {
            name: name.into(),
            shape: shape.to_vec(),
            dtype: Dtype::BF16,
            stored: Stored::Safetensors(Dtype::BF16),
            source_bytes: shape.iter().product::<u64>() * 2,
        }
    }

    #[test]
    fn block_parsing_is_strict() {
        assert_eq!(
            block("transformer_blocks.12.attn", "transformer_blocks"),
            Some((12, "attn"))
        );
        assert_eq!(
            block("transformer_blocks.012.attn", "transformer_blocks"),
            None
        );
        assert_eq!(
            block("transformer_blocks.+1.attn", "transformer_blocks"),
            None
        );
        assert_eq!(
            block("single_transformer_blocks.1.a", "transformer_blocks"),
            None
        );
    }

    fn flux_block(dtype_k: Dtype, rows_k: u64) -> Vec<SourceTensor> {
        let mut ts = vec![t("x_embedder.weight", &[4, 4])];
        for m in [
            "to_q",
            "to_k",
            "to_v",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
        ] {
            let rows = if m == "to_k" { rows_k } else { 4 };
            ts.push(t(
                &format!("transformer_blocks.0.attn.{m}.weight"),
                &[rows, 4],
            ));
        }
        ts[2].dtype = dtype_k;
        ts
    }

    #[test]
    fn fused_parts_must_agree() {
        let path = Path::new("m");
        let ok = Mapping::plan(path, &flux_block(Dtype::BF16, 4))
            .expect("plan")
            .expect("flux");
        let qkv = ok
            .tensors()
            .iter()
            .find(|t| t.name == "double_blocks.0.img_attn.qkv.weight")
            .expect("fused");
        assert_eq!(qkv.shape, [12, 4]);
        for (ts, needle) in [
            (flux_block(Dtype::F16, 4), "is BF16 but"),
            (flux_block(Dtype::BF16, 8), "multiples of one size"),
        ] {
            let err = Mapping::plan(path, &ts).expect_err("refused").to_string();
            assert!(err.contains(needle), "{err}");
            assert!(err.starts_with("m: "), "{err}");
        }
        let mut odd = flux_block(Dtype::BF16, 4);
        odd.push(t("norm_out.linear.weight", &[3, 4]));
        let err = Mapping::plan(path, &odd).expect_err("refused").to_string();
        assert!(err.contains("no two halves"), "{err}");
        let mut twice = flux_block(Dtype::BF16, 4);
        twice.push(t("double_blocks.0.img_attn.qkv.weight", &[12, 4]));
        let err = Mapping::plan(path, &twice)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("has no name"), "{err}");
    }

    fn lumina2_block(rows_q: u64, rows_k: u64, rows_v: u64) -> Vec<SourceTensor> {
        vec![
            t("x_embedder.weight", &[8, 4]),
            t("noise_refiner.0.attn.to_q.weight", &[rows_q, 8]),
            t("noise_refiner.0.attn.to_k.weight", &[rows_k, 8]),
            t("noise_refiner.0.attn.to_v.weight", &[rows_v, 8]),
        ]
    }

    #[test]
    fn lumina2_fuses_grouped_query_attention_and_nothing_else() {
        let path = Path::new("m");
        let ok = Mapping::plan(path, &lumina2_block(8, 4, 4))
            .expect("plan")
            .expect("lumina2");
        assert_eq!(ok.layout(), Layout::Lumina2);
        let qkv = ok
            .tensors()
            .iter()
            .find(|t| t.name == "noise_refiner.0.attention.qkv.weight")
            .expect("fused");
        assert_eq!(qkv.shape, [16, 8]);
        // k and v of different sizes, or q not a whole number of k's heads.
        for (q, k, v) in [(8, 4, 2), (6, 4, 4)] {
            let err = Mapping::plan(path, &lumina2_block(q, k, v))
                .expect_err("refused")
                .to_string();
            assert!(err.contains("grouped-query"), "{err}");
        }
        // ComfyUI's NextDiT has no q/k/v bias and no modulation in its context refiners.
        for extra in [
            "noise_refiner.0.attn.to_q.bias",
            "context_refiner.0.norm1.linear.weight",
            "context_refiner.0.norm1.norm.weight",
            "layers.0.norm1.weight",
        ] {
            let mut ts = lumina2_block(8, 4, 4);
            ts.push(t(extra, &[8]));
            let err = Mapping::plan(path, &ts).expect_err("refused");
            assert!(
                matches!(&err, DiffusersError::UnknownKey { key, layout: "lumina2", .. }
                    if key == extra),
                "{err}"
            );
        }
    }

    #[test]
    fn flux2_is_told_from_flux_and_takes_no_bias() {
        let path = Path::new("m");
        let mut ts = flux_block(Dtype::BF16, 4);
        ts.push(t("double_stream_modulation_img.linear.weight", &[24, 4]));
        ts.push(t("norm_out.linear.weight", &[8, 4]));
        let m = Mapping::plan(path, &ts).expect("plan").expect("flux2");
        assert_eq!(m.layout(), Layout::Flux2);
        let names: Vec<&str> = m.tensors().iter().map(|t| t.name.as_str()).collect();
        for want in [
            "img_in.weight",
            "double_blocks.0.img_attn.qkv.weight",
            "double_blocks.0.txt_attn.qkv.weight",
            "double_stream_modulation_img.lin.weight",
            "final_layer.adaLN_modulation.1.weight",
        ] {
            assert!(names.contains(&want), "{names:?}");
        }
        // ComfyUI builds Flux.2 without biases; Flux.1's modules are not Flux.2's.
        for extra in [
            "transformer_blocks.0.attn.to_q.bias",
            "norm_out.linear.bias",
            "transformer_blocks.0.ff.net.0.proj.weight",
            "single_transformer_blocks.0.proj_mlp.weight",
        ] {
            let mut bad = ts.clone();
            bad.push(t(extra, &[4]));
            let err = Mapping::plan(path, &bad).expect_err("refused");
            assert!(
                matches!(&err, DiffusersError::UnknownKey { key, layout: "flux2", .. }
                    if key == extra),
                "{err}"
            );
        }
    }

    #[test]
    fn missing_part_is_named() {
        let ts = [
            t("x_embedder.weight", &[4, 4]),
            t("transformer_blocks.0.attn.add_q_proj.weight", &[4, 4]),
            t("transformer_blocks.0.attn.add_k_proj.weight", &[4, 4]),
            t("transformer_blocks.0.attn.add_v_proj.weight", &[4, 4]),
            t("transformer_blocks.0.attn.to_q.weight", &[4, 4]),
            t("transformer_blocks.0.attn.to_v.weight", &[4, 4]),
        ];
        let err = Mapping::plan(Path::new("m"), &ts).expect_err("refused");
        assert!(
            matches!(&err, DiffusersError::MissingPart { part, .. }
                if part == "transformer_blocks.0.attn.to_k.weight"),
            "{err}"
        );
    }
}
