//! Diffusion architecture detection from tensor key sets, and the per-architecture tables that
//! ComfyUI-GGUF's conversion applies.
//!
//! The rules are those of ComfyUI-GGUF's `tools/convert.py` (`detect_arch`, `is_model_arch`,
//! `strip_prefix`, the `Model*` templates) and `tools/lcpp.patch` (which tensors are never
//! quantized), taken from the `auto_convert` branch (city96/ComfyUI-GGUF @ 4dfc025): it is the
//! one that knows `qwen_image`, and its flux/sd3 diffusers probes no longer collide with
//! Qwen-Image's `transformer_blocks.*` keys (main's would reject Qwen-Image as diffusers flux).
//! Its key sets are a superset of main's otherwise.
//!
//! Detection: architectures are tried in [`Arch::DETECTION_ORDER`]; one matches when every key
//! of any one of its [`Arch::keys_detect`] tuples is present; the first match wins. If the
//! matching architecture has a [`Arch::keys_banned`] key, the file is in the diffusers layout
//! and is refused: ComfyUI-GGUF only loads the reference layout (fused q/k/v, original names).
//!
//! Beyond convert.py's list, the table has the variants it folds into another architecture,
//! told apart by ComfyUI's `comfy/model_detection.py` keys and tried before the row they
//! refine (Flux.2 and Chroma before flux, LTX-2 before ltxv, HunyuanVideo 1.5 before hyvid,
//! Z-Image before lumina2; each written under its parent's `general.architecture`, the name
//! ComfyUI-GGUF's loader accepts), and the text encoders of ComfyUI's `detect_te_model`
//! (T5-XXL, umt5-xxl, CLIP-L, CLIP-G), whose [`ModelKind`] sends their outputs to
//! `text_encoders/`. Every per-architecture fact lives in this one table. The variants' keys
//! are checked against the key lists of real files (`tests/real_key_sets/`).

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

/// A diffusion-model architecture, as named in `general.architecture`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    /// Flux (`flux`).
    Flux,
    /// Stable Diffusion 3 (`sd3`).
    Sd3,
    /// AuraFlow (`aura`).
    Aura,
    /// HiDream (`hidream`).
    Hidream,
    /// Cosmos (`cosmos`).
    Cosmos,
    /// LTX-Video (`ltxv`).
    Ltxv,
    /// HunyuanVideo (`hyvid`).
    Hyvid,
    /// Wan (`wan`).
    Wan,
    /// Stable Diffusion XL (`sdxl`).
    Sdxl,
    /// Stable Diffusion 1.x (`sd1`).
    Sd1,
    /// Lumina 2 (`lumina2`).
    Lumina2,
    /// Qwen-Image (`qwen_image`).
    QwenImage,
    /// Flux.2 (`flux2`; written as `flux`, which ComfyUI-GGUF loads it as).
    Flux2,
    /// Chroma and Chroma Radiance (`chroma`; written as `flux`).
    Chroma,
    /// LTX-2, audio and video (`ltxav`, ComfyUI's name; written as `ltxv`, and ComfyUI tells
    /// the two apart by its keys and the `config` metadata).
    Ltxav,
    /// HunyuanVideo 1.5 (`hyvid15`; written as `hyvid`).
    Hyvid15,
    /// Z-Image (`z_image`; written as `lumina2`, which ComfyUI-GGUF loads it as).
    ZImage,
    /// T5-XXL v1.1 text encoder (`t5xxl`; written as `t5encoder`).
    T5xxl,
    /// umt5-xxl text encoder of Wan (`umt5xxl`; written as `t5encoder`).
    Umt5xxl,
    /// CLIP-L text encoder (`clip_l`; no GGUF).
    ClipL,
    /// CLIP-G (OpenCLIP bigG) text encoder (`clip_g`; no GGUF).
    ClipG,
}

/// A tensor-name rule of the quantization blacklist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPattern {
    /// The name contains this substring.
    Contains(&'static str),
    /// The name is exactly this.
    Exact(&'static str),
}

impl KeyPattern {
    /// Whether `name` matches.
    pub fn matches(self, name: &str) -> bool {
        match self {
            KeyPattern::Contains(s) => name.contains(s),
            KeyPattern::Exact(s) => name == s,
        }
    }
}

use KeyPattern::{Contains as C, Exact as E};

/// What kind of model a file holds, which decides the models folder its outputs go to.
/// Serialized as its folder name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum ModelKind {
    /// A diffusion model (`models/diffusion_models/`).
    #[default]
    #[serde(rename = "diffusion_models")]
    DiffusionModel,
    /// A text encoder (`models/text_encoders/`).
    #[serde(rename = "text_encoders")]
    TextEncoder,
}

impl ModelKind {
    /// Every kind, in listing order.
    pub const ALL: [ModelKind; 2] = [ModelKind::DiffusionModel, ModelKind::TextEncoder];

    /// The ComfyUI models folder of this kind (`diffusion_models`, `text_encoders`); also the
    /// name in JSON.
    pub fn folder(self) -> &'static str {
        match self {
            ModelKind::DiffusionModel => "diffusion_models",
            ModelKind::TextEncoder => "text_encoders",
        }
    }

    /// The kind of a detected architecture string: an [`Arch`] name, or a
    /// `general.architecture` a GGUF text encoder carries (ComfyUI-GGUF's `TXT_ARCH_LIST`:
    /// `t5`, `t5encoder`, `llama`, `qwen2vl`, `qwen3`, `qwen3vl`). Anything else (unknown
    /// included) is a diffusion model, the cache's default folder.
    pub fn of_architecture(architecture: Option<&str>) -> ModelKind {
        const GGUF_TEXT: &[&str] = &["t5", "t5encoder", "llama", "qwen2vl", "qwen3", "qwen3vl"];
        match architecture {
            Some(a) if GGUF_TEXT.contains(&a) => ModelKind::TextEncoder,
            Some(a) => a
                .parse::<Arch>()
                .map_or(ModelKind::DiffusionModel, Arch::kind),
            None => ModelKind::DiffusionModel,
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelKind::DiffusionModel => "diffusion model",
            ModelKind::TextEncoder => "text encoder",
        })
    }
}

/// How a GGUF output names an architecture's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufNaming {
    /// The source's names (prefix stripped): what ComfyUI-GGUF's diffusion loader reads.
    Reference,
    /// llama.cpp's T5 encoder names (`token_embd`, `enc.blk.N.attn_q`, ...), which
    /// ComfyUI-GGUF's `CLIPLoaderGGUF` maps back with its `T5_SD_MAP`.
    LlamaCppT5,
}

/// Whose quantizer rules pick each tensor's type in a quantized GGUF output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufMixer {
    /// ComfyUI-GGUF's patched `llama-quantize` (b3962 + `lcpp.patch`) over `tools/convert.py`'s
    /// base file: the diffusion models' rules, with the row's `no_quant` exclusions.
    ComfyUiGguf,
    /// Stock llama.cpp `llama-quantize` (`llama_tensor_get_type`), as the T5 / umt5 GGUFs
    /// ComfyUI users download were made: its own rules on llama.cpp tensor names decide what is
    /// quantized (the row's `no_quant` applies only to the non-GGUF targets).
    LlamaCpp,
}

/// Per-architecture data; one row per [`Arch`], in detection order.
struct ArchSpec {
    arch: Arch,
    name: &'static str,
    detect: &'static [&'static [&'static str]],
    banned: &'static [&'static str],
    hiprec: &'static [&'static str],
    ignore: &'static [&'static str],
    shape_fix: bool,
    ndims_fix: bool,
    no_quant: &'static [KeyPattern],
    kind: ModelKind,
    /// `general.architecture` when it differs from `name`: one ComfyUI-GGUF's loader accepts.
    gguf_name: Option<&'static str>,
    gguf_naming: GgufNaming,
    gguf_mixer: GgufMixer,
    /// Why no GGUF output is made, when none can be loaded.
    gguf_refusal: Option<&'static str>,
}

/// The defaults of a diffusion-model row (the fields a row does not set).
const DIFFUSION: ArchSpec = ArchSpec {
    arch: Arch::Flux,
    name: "",
    detect: &[],
    banned: &[],
    hiprec: &[],
    ignore: &[],
    shape_fix: false,
    ndims_fix: false,
    no_quant: &[],
    kind: ModelKind::DiffusionModel,
    gguf_name: None,
    gguf_naming: GgufNaming::Reference,
    gguf_mixer: GgufMixer::ComfyUiGguf,
    gguf_refusal: None,
};

/// ComfyUI's CLIP text encoders: ComfyUI-GGUF's `CLIPLoaderGGUF` has no key map for them
/// (only T5, LLaMA-family and Qwen-VL), so a GGUF of one cannot be loaded.
const CLIP_GGUF_REFUSAL: &str = "ComfyUI-GGUF cannot load CLIP text encoders from GGUF \
     (its CLIPLoaderGGUF maps only T5/umt5 and LLaMA-family names back); convert CLIP to \
     fp16, bf16 or fp8 instead";

/// Text-encoder tensors kept unquantized by the non-GGUF targets (fp8_scaled, nvfp4, ...): the
/// token embedding and T5's relative attention bias. GGUF outputs follow llama.cpp's own rules
/// instead ([`GgufMixer::LlamaCpp`]: `attn_rel_b` stays unquantized, the token embedding is
/// quantized as llama.cpp's tied output).
const T5_NO_QUANT: &[KeyPattern] = &[
    E("shared.weight"),
    E("encoder.embed_tokens.weight"),
    C("relative_attention_bias."),
];

/// CLIP's embeddings and projection stay high precision in every quantized target.
const CLIP_NO_QUANT: &[KeyPattern] = &[
    C("embeddings."),
    E("text_projection.weight"),
    E("text_projection"),
    E("logit_scale"),
];

/// Flux's rules, with auto_convert's Flux.2 additions (Flux.2 is `flux` to ComfyUI-GGUF).
const FLUX_NO_QUANT: &[KeyPattern] = &[
    C("txt_in."),
    C("img_in."),
    C("time_in."),
    C("vector_in."),
    C("guidance_in."),
    C("final_layer."),
    // Flux.2
    C("single_stream_modulation."),
    C("double_stream_modulation_"),
];

/// Chroma: Flux's rules, and its guidance approximator (`distilled_guidance_layer`, which
/// replaces Flux's modulation inputs) kept in the base precision.
const CHROMA_NO_QUANT: &[KeyPattern] = &[
    C("txt_in."),
    C("img_in."),
    C("time_in."),
    C("vector_in."),
    C("guidance_in."),
    C("final_layer."),
    C("single_stream_modulation."),
    C("double_stream_modulation_"),
    C("distilled_guidance_layer."),
    // Chroma Radiance's pixel-space head.
    C("nerf_image_embedder."),
    C("nerf_final_layer"),
    C("img_in_patch."),
];

const LTXV_NO_QUANT: &[KeyPattern] = &[
    C("adaln_single."),
    C("caption_projection."),
    C("patchify_proj."),
    C("proj_out."),
    C("scale_shift_table"),
];

/// HunyuanVideo's rules and 1.5's `cond_type_embedding` (ComfyUI-GGUF PR #364: quantized,
/// its shape no longer matches).
const HYVID15_NO_QUANT: &[KeyPattern] = &[
    C("txt_in."),
    C("img_in."),
    C("time_in."),
    C("vector_in."),
    C("guidance_in."),
    C("final_layer."),
    C("cond_type_embedding."),
];

const LUMINA2_NO_QUANT: &[KeyPattern] = &[
    C("t_embedder."),
    C("x_embedder."),
    C("final_layer."),
    C("cap_embedder."),
    C("context_refiner."),
    C("noise_refiner."),
    C("x_pad_token."),
    C("cap_pad_token."),
];

const FLUX_LIKE_NO_QUANT: &[KeyPattern] = &[
    C("txt_in."),
    C("img_in."),
    C("time_in."),
    C("vector_in."),
    C("guidance_in."),
    C("final_layer."),
];

const UNET_NO_QUANT: &[KeyPattern] = &[
    C("class_embedding."),
    C("time_embedding."),
    C("add_embedding."),
    C("time_embed."),
    C("label_emb."),
    C("conv_in."),
    C("conv_out."),
    E("input_blocks.0.0.weight"),
    E("out.2.weight"),
];

/// The tables, in convert.py's `arch_list` order (auto_convert branch), with the variants
/// convert.py folds into an architecture (Flux.2 and Chroma into flux, LTX-2 into ltxv,
/// HunyuanVideo 1.5 into hyvid, Z-Image into lumina2) each right before the row it refines,
/// told apart by ComfyUI's `model_detection.py` keys, and the text encoders last (ComfyUI's
/// `detect_te_model` keys).
const SPECS: [ArchSpec; 21] = [
    ArchSpec {
        arch: Arch::Flux2,
        name: "flux2",
        detect: &[&[
            "double_blocks.0.img_attn.proj.weight",
            "double_stream_modulation_img.lin.weight",
        ]],
        gguf_name: Some("flux"),
        no_quant: FLUX_NO_QUANT,
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::Chroma,
        name: "chroma",
        detect: &[
            &[
                "double_blocks.0.img_attn.proj.weight",
                "distilled_guidance_layer.norms.0.scale",
            ],
            &[
                "double_blocks.0.img_attn.proj.weight",
                "distilled_guidance_layer.norms.0.weight",
            ],
            &[
                "double_blocks.0.img_attn.proj.weight",
                "distilled_guidance_layer.0.norms.0.scale",
            ],
            &[
                "double_blocks.0.img_attn.proj.weight",
                "distilled_guidance_layer.0.norms.0.weight",
            ],
        ],
        gguf_name: Some("flux"),
        no_quant: CHROMA_NO_QUANT,
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::Flux,
        name: "flux",
        detect: &[
            &["single_transformer_blocks.0.attn.norm_k.weight"],
            &["double_blocks.0.img_attn.proj.weight"],
        ],
        banned: &["single_transformer_blocks.0.attn.norm_k.weight"],
        hiprec: &[],
        ignore: &[],
        shape_fix: false,
        ndims_fix: false,
        no_quant: FLUX_NO_QUANT,
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::Sd3,
        name: "sd3",
        detect: &[
            &["transformer_blocks.0.ff_context.net.0.proj.weight"],
            &["joint_blocks.0.x_block.attn.qkv.weight"],
        ],
        banned: &["transformer_blocks.0.ff_context.net.0.proj.weight"],
        hiprec: &[],
        ignore: &[],
        shape_fix: false,
        ndims_fix: false,
        no_quant: &[
            C("final_layer."),
            C("time_text_embed."),
            C("context_embedder."),
            C("t_embedder."),
            C("y_embedder."),
            C("x_embedder."),
            E("proj_out.weight"),
            E("pos_embed"),
        ],
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::Aura,
        name: "aura",
        detect: &[
            &["double_layers.3.modX.1.weight"],
            &["joint_transformer_blocks.3.ff_context.out_projection.weight"],
        ],
        banned: &["joint_transformer_blocks.3.ff_context.out_projection.weight"],
        hiprec: &[],
        ignore: &[],
        shape_fix: false,
        ndims_fix: false,
        no_quant: &[
            C("t_embedder."),
            C("init_x_linear."),
            E("modF.1.weight"),
            E("cond_seq_linear.weight"),
            E("final_linear.weight"),
            E("positional_encoding"),
            E("register_tokens"),
        ],
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::Hidream,
        name: "hidream",
        detect: &[&[
            "caption_projection.0.linear.weight",
            "double_stream_blocks.0.block.ff_i.shared_experts.w3.weight",
        ]],
        banned: &[],
        hiprec: &[".ff_i.gate.weight", "img_emb.emb_pos"],
        ignore: &[],
        shape_fix: false,
        ndims_fix: false,
        no_quant: &[
            C("p_embedder."),
            C("t_embedder."),
            C("x_embedder."),
            C("final_layer."),
            C(".ff_i.gate.weight"),
            C("caption_projection."),
        ],
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::Cosmos,
        name: "cosmos",
        detect: &[&[
            "blocks.0.mlp.layer1.weight",
            "blocks.0.adaln_modulation_cross_attn.1.weight",
        ]],
        banned: &[],
        hiprec: &["pos_embedder"],
        ignore: &["_extra_state", "accum_"],
        shape_fix: false,
        ndims_fix: false,
        no_quant: &[
            C("p_embedder."),
            C("t_embedder."),
            C("t_embedding_norm."),
            C("x_embedder."),
            C("pos_embedder."),
            C("final_layer."),
        ],
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::QwenImage,
        name: "qwen_image",
        detect: &[&[
            "time_text_embed.timestep_embedder.linear_2.weight",
            "transformer_blocks.0.attn.norm_added_q.weight",
            "transformer_blocks.0.img_mlp.net.0.proj.weight",
        ]],
        banned: &[],
        hiprec: &[],
        ignore: &[],
        shape_fix: false,
        ndims_fix: false,
        no_quant: &[
            C("img_in."),
            C("txt_in."),
            C("time_text_embed."),
            C("proj_out."),
            C("norm_out."),
        ],
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::Ltxav,
        name: "ltxav",
        detect: &[&[
            "adaln_single.emb.timestep_embedder.linear_1.bias",
            "audio_adaln_single.linear.weight",
        ]],
        // The audio stream's tables (`audio_scale_shift_table`,
        // `scale_shift_table_a2v_ca_*`) are raw parameters like the video ones; LTX-2.5's
        // `learnable_registers` too (ComfyUI-GGUF #477: from BF16 they load with doubled dims).
        hiprec: &["scale_shift_table", "learnable_registers"],
        // ltxv's substrings also cover `audio_adaln_single.`, `av_ca_*_adaln_single.`,
        // `audio_caption_projection.`, `audio_patchify_proj.` and `audio_proj_out.`.
        no_quant: LTXV_NO_QUANT,
        gguf_name: Some("ltxv"),
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::Ltxv,
        name: "ltxv",
        detect: &[&[
            "adaln_single.emb.timestep_embedder.linear_2.weight",
            "transformer_blocks.27.scale_shift_table",
            "caption_projection.linear_2.weight",
        ]],
        banned: &[],
        hiprec: &["scale_shift_table"],
        ignore: &[],
        shape_fix: false,
        ndims_fix: false,
        no_quant: LTXV_NO_QUANT,
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::Hyvid15,
        name: "hyvid15",
        detect: &[&[
            "double_blocks.0.img_attn_proj.weight",
            "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight",
            "cond_type_embedding.weight",
        ]],
        ndims_fix: true,
        no_quant: HYVID15_NO_QUANT,
        gguf_name: Some("hyvid"),
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::Hyvid,
        name: "hyvid",
        detect: &[&[
            "double_blocks.0.img_attn_proj.weight",
            "txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight",
        ]],
        banned: &[],
        hiprec: &[],
        ignore: &[],
        shape_fix: false,
        ndims_fix: true,
        no_quant: FLUX_LIKE_NO_QUANT,
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::Wan,
        name: "wan",
        detect: &[&[
            "blocks.0.self_attn.norm_q.weight",
            "text_embedding.2.weight",
            "head.modulation",
        ]],
        banned: &[],
        hiprec: &[
            ".modulation",
            ".encoder.padding_tokens",
            "trainable_cond_mask",
            "casual_audio_encoder.weights",
            "casual_audio_encoder.encoder.conv",
        ],
        ignore: &[],
        shape_fix: false,
        ndims_fix: true,
        no_quant: &[
            C("modulation."),
            C("patch_embedding."),
            C("text_embedding."),
            C("time_projection."),
            C("time_embedding."),
            C("img_emb."),
            C("head."),
            // Wan S2V
            C("cond_encoder."),
            C("frame_packer."),
            C("audio_injector."),
            C("casual_audio_encoder."),
            C("trainable_cond_mask."),
        ],
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::Sdxl,
        name: "sdxl",
        detect: &[
            &[
                "down_blocks.0.downsamplers.0.conv.weight",
                "add_embedding.linear_1.weight",
            ],
            &[
                "input_blocks.3.0.op.weight",
                "input_blocks.6.0.op.weight",
                "output_blocks.2.2.conv.weight",
                "output_blocks.5.2.conv.weight",
            ],
            &["label_emb.0.0.weight"],
        ],
        banned: &[],
        hiprec: &[],
        ignore: &[],
        shape_fix: true,
        ndims_fix: false,
        no_quant: UNET_NO_QUANT,
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::Sd1,
        name: "sd1",
        detect: &[
            &["down_blocks.0.downsamplers.0.conv.weight"],
            &[
                "input_blocks.3.0.op.weight",
                "input_blocks.6.0.op.weight",
                "input_blocks.9.0.op.weight",
                "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight",
                "output_blocks.8.2.conv.weight",
            ],
        ],
        banned: &[],
        hiprec: &[],
        ignore: &[],
        shape_fix: true,
        ndims_fix: false,
        no_quant: UNET_NO_QUANT,
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::ZImage,
        name: "z_image",
        detect: &[&[
            "cap_embedder.1.weight",
            "context_refiner.0.attention.qkv.weight",
            "x_pad_token",
            "cap_pad_token",
        ]],
        hiprec: &["x_pad_token", "cap_pad_token"],
        no_quant: LUMINA2_NO_QUANT,
        gguf_name: Some("lumina2"),
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::Lumina2,
        name: "lumina2",
        detect: &[&[
            "cap_embedder.1.weight",
            "context_refiner.0.attention.qkv.weight",
        ]],
        banned: &[],
        // Z-Image, which is detected as lumina2.
        hiprec: &["x_pad_token", "cap_pad_token"],
        ignore: &[],
        shape_fix: false,
        ndims_fix: false,
        no_quant: LUMINA2_NO_QUANT,
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::Umt5xxl,
        name: "umt5xxl",
        // umt5 has a relative attention bias in every block, T5 v1.1 only in the first.
        detect: &[&[
            "encoder.block.0.layer.0.SelfAttention.q.weight",
            "encoder.block.0.layer.1.DenseReluDense.wi_1.weight",
            "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
        ]],
        no_quant: T5_NO_QUANT,
        kind: ModelKind::TextEncoder,
        gguf_name: Some("t5encoder"),
        gguf_naming: GgufNaming::LlamaCppT5,
        gguf_mixer: GgufMixer::LlamaCpp,
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::T5xxl,
        name: "t5xxl",
        detect: &[&[
            "encoder.block.0.layer.0.SelfAttention.q.weight",
            "encoder.block.0.layer.1.DenseReluDense.wi_1.weight",
        ]],
        no_quant: T5_NO_QUANT,
        kind: ModelKind::TextEncoder,
        gguf_name: Some("t5encoder"),
        gguf_naming: GgufNaming::LlamaCppT5,
        gguf_mixer: GgufMixer::LlamaCpp,
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::ClipG,
        name: "clip_g",
        detect: &[&[
            "text_model.embeddings.token_embedding.weight",
            "text_model.encoder.layers.30.mlp.fc1.weight",
        ]],
        no_quant: CLIP_NO_QUANT,
        kind: ModelKind::TextEncoder,
        gguf_refusal: Some(CLIP_GGUF_REFUSAL),
        ..DIFFUSION
    },
    ArchSpec {
        arch: Arch::ClipL,
        name: "clip_l",
        detect: &[&[
            "text_model.embeddings.token_embedding.weight",
            "text_model.encoder.layers.0.mlp.fc1.weight",
        ]],
        no_quant: CLIP_NO_QUANT,
        kind: ModelKind::TextEncoder,
        gguf_refusal: Some(CLIP_GGUF_REFUSAL),
        ..DIFFUSION
    },
];

impl Arch {
    /// Every architecture, in the order detection tries them (convert.py's `arch_list`):
    /// sdxl before sd1, whose diffusers probe is a subset of sdxl's; each variant before the
    /// architecture whose keys it extends; umt5 before T5, CLIP-G before CLIP-L.
    pub const DETECTION_ORDER: [Arch; 21] = [
        Arch::Flux2,
        Arch::Chroma,
        Arch::Flux,
        Arch::Sd3,
        Arch::Aura,
        Arch::Hidream,
        Arch::Cosmos,
        Arch::QwenImage,
        Arch::Ltxav,
        Arch::Ltxv,
        Arch::Hyvid15,
        Arch::Hyvid,
        Arch::Wan,
        Arch::Sdxl,
        Arch::Sd1,
        Arch::ZImage,
        Arch::Lumina2,
        Arch::Umt5xxl,
        Arch::T5xxl,
        Arch::ClipG,
        Arch::ClipL,
    ];

    fn spec(self) -> &'static ArchSpec {
        // Every arch has a row (unit-tested); the fallback is never taken.
        SPECS.iter().find(|s| s.arch == self).unwrap_or(&SPECS[0])
    }

    /// convcache's name of the architecture (`detect`'s answer, the `--arch` value).
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// The `general.architecture` a GGUF output carries: one of ComfyUI-GGUF's
    /// `IMG_ARCH_LIST` for a diffusion model (a variant takes the name of the architecture
    /// ComfyUI-GGUF loads it as), `t5encoder` (in its `TXT_ARCH_LIST`) for T5 and umt5.
    pub fn gguf_name(self) -> &'static str {
        self.spec().gguf_name.unwrap_or(self.spec().name)
    }

    /// Diffusion model or text encoder.
    pub fn kind(self) -> ModelKind {
        self.spec().kind
    }

    /// How a GGUF output names this architecture's tensors.
    pub fn gguf_naming(self) -> GgufNaming {
        self.spec().gguf_naming
    }

    /// Whose quantizer rules type this architecture's quantized GGUF tensors.
    pub fn gguf_mixer(self) -> GgufMixer {
        self.spec().gguf_mixer
    }

    /// Why this architecture gets no GGUF output (`None`: it does).
    pub fn gguf_refusal(self) -> Option<&'static str> {
        self.spec().gguf_refusal
    }

    /// Key tuples; the architecture matches when all keys of any one tuple are present.
    pub fn keys_detect(self) -> &'static [&'static [&'static str]] {
        self.spec().detect
    }

    /// Keys whose presence (after a match) marks the diffusers layout, which is refused.
    pub fn keys_banned(self) -> &'static [&'static str] {
        self.spec().banned
    }

    /// Name substrings of tensors kept in high precision (F32 for F32/BF16 sources): raw
    /// `nn.Parameter`s that ComfyUI cannot load from BF16 or quantized data.
    pub fn keys_hiprec(self) -> &'static [&'static str] {
        self.spec().hiprec
    }

    /// Name substrings of tensors left out of the output.
    pub fn keys_ignore(self) -> &'static [&'static str] {
        self.spec().ignore
    }

    /// Whether convert.py's sd1/sdxl reshape applies: a tensor with more than one dim, at least
    /// convert.py's `REARRANGE_THRESHOLD` (512) elements, an element count divisible by 256 and a last torch dim
    /// not divisible by 256 is stored as `(n/256, 256)` with its original shape recorded in
    /// `comfy.gguf.orig_shape.<name>` (INT32 array, torch order).
    pub fn shape_fix(self) -> bool {
        self.spec().shape_fix
    }

    /// Whether tensors with more than convert.py's `MAX_TENSOR_DIMS` (4) dims are tolerated (hyvid, wan: they
    /// end up as F32 with all their dims); for other architectures such a tensor is an error.
    pub fn ndims_fix(self) -> bool {
        self.spec().ndims_fix
    }

    /// The patched llama-quantize's per-architecture rules for tensors that are never quantized
    /// (they keep the base type). Besides these, only tensors with exactly 2 dims whose name
    /// ends in `weight` and does not contain `_norm.weight` are quantized.
    pub fn no_quant_patterns(self) -> &'static [KeyPattern] {
        self.spec().no_quant
    }

    /// Whether `name` contains a [`Arch::keys_hiprec`] substring.
    pub fn is_hiprec(self, name: &str) -> bool {
        self.keys_hiprec().iter().any(|k| name.contains(k))
    }

    /// Whether `name` contains a [`Arch::keys_ignore`] substring.
    pub fn is_ignored(self, name: &str) -> bool {
        self.keys_ignore().iter().any(|k| name.contains(k))
    }

    /// Whether `name` matches a [`Arch::no_quant_patterns`] rule.
    pub fn is_quant_excluded(self, name: &str) -> bool {
        self.no_quant_patterns().iter().any(|p| p.matches(name))
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An `--arch` value that names no architecture.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown architecture `{0}` (expected one of: flux, flux2, chroma, sd3, aura, hidream, cosmos, qwen_image, ltxv, ltxav, hyvid, hyvid15, wan, sdxl, sd1, lumina2, z_image, t5xxl, umt5xxl, clip_l, clip_g)"
)]
pub struct UnknownArchName(pub String);

impl FromStr for Arch {
    type Err = UnknownArchName;
    /// Case-insensitive; `-` is accepted for `_` (`qwen-image`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        Arch::DETECTION_ORDER
            .into_iter()
            .find(|a| a.name() == norm)
            .ok_or_else(|| UnknownArchName(s.to_owned()))
    }
}

/// Why no architecture could be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchError {
    /// The keys are those of `arch` in the diffusers layout.
    #[error(
        "this is a {arch} model in the diffusers layout; only the reference (non-diffusers) layout \
         can be converted, because ComfyUI-GGUF loads original key names with fused q/k/v \
         projections. Use the model's original single-file checkpoint instead"
    )]
    DiffusersLayout {
        /// The architecture the keys match.
        arch: Arch,
    },
    /// No architecture's key set is present.
    #[error(
        "unknown model architecture: the tensor names match none of flux, flux2, chroma, sd3, \
         aura, hidream, cosmos, qwen_image, ltxv, ltxav, hyvid, hyvid15, wan, sdxl, sd1, \
         lumina2, z_image, nor a T5-XXL, umt5-xxl, CLIP-L or CLIP-G text encoder (a full \
         checkpoint with VAE and text encoders must have its diffusion model extracted; --arch \
         forces one)"
    )]
    Unknown,
}

/// Detects the architecture from tensor names (already stripped of their prefix) by
/// convert.py's rule: the first architecture in [`Arch::DETECTION_ORDER`] with any key tuple
/// fully present wins, and is refused if it also has a banned (diffusers) key.
pub fn detect_arch<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<Arch, ArchError> {
    let keys: HashSet<&str> = keys.into_iter().collect();
    for arch in Arch::DETECTION_ORDER {
        let matched = arch
            .keys_detect()
            .iter()
            .any(|tuple| tuple.iter().all(|k| keys.contains(k)));
        if matched {
            if arch.keys_banned().iter().any(|k| keys.contains(k)) {
                return Err(ArchError::DiffusersLayout { arch });
            }
            return Ok(arch);
        }
    }
    Err(ArchError::Unknown)
}

/// The prefix ComfyUI's loaders and most checkpoints put before diffusion-model keys.
pub const DIFFUSION_MODEL_PREFIX: &str = "model.diffusion_model.";

/// `name` without a leading `model.diffusion_model.` (the per-name rule of ComfyUI-GGUF's
/// loader). For a whole state dict, use [`KeyPrefix`], which is convert.py's rule.
pub fn strip_prefix(name: &str) -> &str {
    name.strip_prefix(DIFFUSION_MODEL_PREFIX).unwrap_or(name)
}

/// The prefix convert.py's `strip_prefix` removes from a whole state dict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPrefix {
    /// Keys are used as they are.
    None,
    /// Some key starts with `model.diffusion_model.` (a full checkpoint).
    DiffusionModel,
    /// No key has the above, but some key starts with `model.`.
    Model,
    /// Every key starts with `net.` (Cosmos).
    Net,
}

impl KeyPrefix {
    /// Chooses the prefix as convert.py does: `model.diffusion_model.` if any key starts with
    /// it, else `model.` if any key starts with it, else `net.` if all keys start with it.
    pub fn detect<'a>(keys: impl IntoIterator<Item = &'a str> + Clone) -> KeyPrefix {
        if keys
            .clone()
            .into_iter()
            .any(|k| k.starts_with("model.diffusion_model."))
        {
            KeyPrefix::DiffusionModel
        } else if keys.clone().into_iter().any(|k| k.starts_with("model.")) {
            KeyPrefix::Model
        } else {
            let mut it = keys.into_iter().peekable();
            if it.peek().is_some() && it.all(|k| k.starts_with("net.")) {
                KeyPrefix::Net
            } else {
                KeyPrefix::None
            }
        }
    }

    /// The prefix string (empty for [`KeyPrefix::None`]).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyPrefix::None => "",
            KeyPrefix::DiffusionModel => "model.diffusion_model.",
            KeyPrefix::Model => "model.",
            KeyPrefix::Net => "net.",
        }
    }

    /// The key as convert.py keeps it: `None` when the key does not contain the prefix (it
    /// is dropped, e.g. VAE and text-encoder keys of a full checkpoint), else the key with
    /// every occurrence of the prefix removed (Python's `str.replace`).
    pub fn apply(self, key: &str) -> Option<Cow<'_, str>> {
        let p = self.as_str();
        if p.is_empty() {
            return Some(Cow::Borrowed(key));
        }
        if let Some(rest) = key.strip_prefix(p)
            && !rest.contains(p)
        {
            return Some(Cow::Borrowed(rest));
        }
        key.contains(p).then(|| Cow::Owned(key.replace(p, "")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_in_detection_order() {
        for (spec, arch) in SPECS.iter().zip(Arch::DETECTION_ORDER) {
            assert_eq!(spec.arch, arch);
            assert_eq!(arch.spec().name, spec.name);
        }
    }
}
