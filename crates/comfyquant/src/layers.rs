//! Which layers a ComfyUI quantized target quantizes.
//!
//! The rule the people making these files use (Comfy-Org's comfy-quants and its Flux fork):
//! the Linear weights of the transformer blocks. Everything else stays high precision: norms,
//! embedders, modulation (adaLN), and the first and last layers (`img_in`, `txt_in`,
//! `final_layer`, ...), which live outside the blocks.
//!
//! Per architecture (detected from the tensor names by [`detect::arch`]), a weight is quantized
//! when
//! 1. its name (without `model.diffusion_model.`) starts with one of the architecture's block
//!    prefixes ([`LayerRule::blocks`]; the generic rule takes any numbered `*blocks.N.` or
//!    `*layers.N.` segment);
//! 2. no segment of its name is a norm (contains `norm`), a modulation (`mod`, `*_mod`, `mod*`,
//!    contains `adaln`, case-insensitive) or an embedder (contains `embed`);
//! 3. the GGUF tables of the architecture do not keep it either
//!    ([`detect::arch::Arch::is_quant_excluded`], [`detect::arch::Arch::is_hiprec`]: e.g.
//!    HiDream's MoE gate);
//! 4. it is a `*.weight` of a float dtype.
//!
//! Such a weight is then quantized if the format can hold it: 2-D and not empty (checked
//! here), with finite values (checked by the planner on the data).
//!
//! comfy-quants' Flux fork also quantizes the modulation linears (`img_mod.lin`, ...); issue 12
//! keeps modulation high precision, as every official comfy-quants config does.

use detect::arch::{Arch, detect_arch, strip_prefix};
use tensorfile::SourceTensor;
use tensorfile::cast::is_cast_source;

/// The layer rule of one architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerRule {
    /// The architecture, `None` for the generic rule.
    pub arch: Option<Arch>,
    /// Name prefixes of the transformer blocks (empty: any numbered `*blocks.N.` /
    /// `*layers.N.` segment).
    pub blocks: &'static [&'static str],
}

/// The block prefixes of each architecture with a table; the others use the generic rule.
const BLOCKS: &[(Arch, &[&str])] = &[
    (Arch::Flux, &["double_blocks.", "single_blocks."]),
    (Arch::Sd3, &["joint_blocks."]),
    (Arch::Aura, &["double_layers.", "single_layers."]),
    (
        Arch::Hidream,
        &["double_stream_blocks.", "single_stream_blocks."],
    ),
    (Arch::Cosmos, &["blocks."]),
    (Arch::QwenImage, &["transformer_blocks."]),
    (Arch::Ltxv, &["transformer_blocks."]),
    (Arch::Hyvid, &["double_blocks.", "single_blocks."]),
    (Arch::Wan, &["blocks."]),
    (Arch::Lumina2, &["layers."]),
    (Arch::Flux2, &["double_blocks.", "single_blocks."]),
    (Arch::Chroma, &["double_blocks.", "single_blocks."]),
    (Arch::Ltxav, &["transformer_blocks."]),
    (Arch::Hyvid15, &["double_blocks.", "single_blocks."]),
    (Arch::ZImage, &["layers."]),
    // Text encoders: the encoder's blocks (T5's `relative_attention_bias` is excluded by
    // the GGUF table, its layer norms by the norm rule).
    (Arch::T5xxl, &["encoder.block."]),
    (Arch::Umt5xxl, &["encoder.block."]),
    (Arch::ClipL, &["text_model.encoder.layers."]),
    (Arch::ClipG, &["text_model.encoder.layers."]),
];

/// Why a weight the rule selects is written in high precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Quantize it (2-D, float, selected by the rule).
    Quantize,
    /// Not a layer the rule quantizes (kept high precision by design).
    NotSelected,
    /// Selected, but the format cannot hold it: the reason.
    Unfit(&'static str),
}

impl LayerRule {
    /// The rule for a model with these tensors: its architecture's table, or the generic rule
    /// when the architecture is unknown, has no table, or is in the diffusers layout.
    pub fn for_tensors(tensors: &[SourceTensor]) -> LayerRule {
        let arch = detect_arch(tensors.iter().map(|t| strip_prefix(&t.name))).ok();
        let blocks = arch.and_then(|a| BLOCKS.iter().find(|(b, _)| *b == a));
        match blocks {
            Some(&(arch, blocks)) => LayerRule {
                arch: Some(arch),
                blocks,
            },
            None => LayerRule {
                arch: None,
                blocks: &[],
            },
        }
    }

    /// The table's name: the architecture's, or `generic`.
    pub fn name(&self) -> &'static str {
        self.arch.map_or("generic", Arch::name)
    }

    /// What to do with tensor `t`.
    pub fn verdict(&self, t: &SourceTensor) -> Verdict {
        let name = strip_prefix(&t.name);
        let selected = name.ends_with(".weight")
            && is_cast_source(t.dtype)
            && self.in_block(name)
            && !name.split('.').any(is_kept_segment)
            && !self
                .arch
                .is_some_and(|a| a.is_quant_excluded(name) || a.is_hiprec(name));
        if !selected {
            Verdict::NotSelected
        } else if t.shape.len() != 2 {
            Verdict::Unfit("not a 2-D weight")
        } else if t.shape.contains(&0) {
            Verdict::Unfit("an empty weight")
        } else {
            Verdict::Quantize
        }
    }

    fn in_block(&self, name: &str) -> bool {
        if self.blocks.is_empty() {
            let segments: Vec<&str> = name.split('.').collect();
            segments.windows(2).any(|w| {
                (w[0].ends_with("blocks") || w[0].ends_with("layers"))
                    && !w[1].is_empty()
                    && w[1].bytes().all(|b| b.is_ascii_digit())
            })
        } else {
            self.blocks.iter().any(|p| name.starts_with(p))
        }
    }
}

/// A name segment that marks a norm, a modulation or an embedder.
fn is_kept_segment(segment: &str) -> bool {
    let s = segment.to_ascii_lowercase();
    s.contains("norm")
        || s.contains("embed")
        || s.contains("adaln")
        || s.starts_with("mod")
        || s.ends_with("_mod")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensorfile::Dtype;
    use tensorfile::source::Stored;

    fn t(name: &str, shape: &[u64]) -> SourceTensor {
        SourceTensor {
            name: name.into(),
            shape: shape.to_vec(),
            dtype: Dtype::BF16,
            stored: Stored::Safetensors(Dtype::BF16),
            source_bytes: 0,
        }
    }

    fn rule_of(names: &[&str]) -> LayerRule {
        let tensors: Vec<SourceTensor> = names.iter().map(|n| t(n, &[4, 4])).collect();
        LayerRule::for_tensors(&tensors)
    }

    #[test]
    fn flux_quantizes_block_linears_only() {
        let rule = rule_of(&["double_blocks.0.img_attn.proj.weight"]);
        assert_eq!(rule.name(), "flux");
        let q = |n: &str| rule.verdict(&t(n, &[64, 64]));
        for n in [
            "double_blocks.0.img_attn.qkv.weight",
            "double_blocks.0.txt_mlp.2.weight",
            "model.diffusion_model.single_blocks.3.linear1.weight",
            "single_blocks.0.linear2.weight",
        ] {
            assert_eq!(q(n), Verdict::Quantize, "{n}");
        }
        for n in [
            "img_in.weight",
            "txt_in.weight",
            "time_in.in_layer.weight",
            "vector_in.out_layer.weight",
            "guidance_in.in_layer.weight",
            "final_layer.linear.weight",
            "final_layer.adaLN_modulation.1.weight",
            "double_blocks.0.img_mod.lin.weight",
            "double_blocks.0.txt_mod.lin.weight",
            "single_blocks.0.modulation.lin.weight",
            "double_blocks.0.img_attn.norm.query_norm.scale",
            "double_blocks.0.img_attn.qkv.bias",
        ] {
            assert_eq!(q(n), Verdict::NotSelected, "{n}");
        }
        let odd = rule.verdict(&t("double_blocks.0.img_attn.odd.weight", &[64]));
        assert_eq!(odd, Verdict::Unfit("not a 2-D weight"));
    }

    #[test]
    fn other_architectures_use_their_blocks() {
        let wan = rule_of(&[
            "blocks.0.self_attn.norm_q.weight",
            "text_embedding.2.weight",
            "head.modulation",
        ]);
        assert_eq!(wan.name(), "wan");
        let q = |r: &LayerRule, n: &str| r.verdict(&t(n, &[32, 32])) == Verdict::Quantize;
        assert!(q(&wan, "blocks.7.ffn.0.weight"));
        assert!(!q(&wan, "blocks.7.norm3.weight"));
        assert!(!q(&wan, "text_embedding.2.weight"));
        assert!(!q(&wan, "head.head.weight"));

        let sd3 = rule_of(&["joint_blocks.0.x_block.attn.qkv.weight"]);
        assert_eq!(sd3.name(), "sd3");
        assert!(q(&sd3, "joint_blocks.0.context_block.mlp.fc2.weight"));
        assert!(!q(&sd3, "joint_blocks.0.x_block.adaLN_modulation.1.weight"));
        assert!(!q(&sd3, "x_embedder.proj.weight"));

        let qwen = rule_of(&[
            "time_text_embed.timestep_embedder.linear_2.weight",
            "transformer_blocks.0.attn.norm_added_q.weight",
            "transformer_blocks.0.img_mlp.net.0.proj.weight",
        ]);
        assert_eq!(qwen.name(), "qwen_image");
        assert!(q(&qwen, "transformer_blocks.3.attn.add_k_proj.weight"));
        assert!(!q(&qwen, "transformer_blocks.3.img_mod.1.weight"));
        assert!(!q(&qwen, "proj_out.weight"));

        let hidream = rule_of(&[
            "caption_projection.0.linear.weight",
            "double_stream_blocks.0.block.ff_i.shared_experts.w3.weight",
        ]);
        assert_eq!(hidream.name(), "hidream");
        assert!(q(
            &hidream,
            "double_stream_blocks.1.block.attn1.to_q.weight"
        ));
        assert!(!q(
            &hidream,
            "double_stream_blocks.1.block.ff_i.gate.weight"
        ));
        assert!(!q(
            &hidream,
            "double_stream_blocks.1.block.adaLN_modulation.1.weight"
        ));
    }

    #[test]
    fn unknown_models_use_numbered_blocks() {
        let generic = rule_of(&["encoder.layers.0.fc.weight"]);
        assert_eq!(generic.name(), "generic");
        let q = |n: &str| generic.verdict(&t(n, &[32, 32])) == Verdict::Quantize;
        assert!(q("encoder.layers.0.fc.weight"));
        assert!(q("transformer_blocks.12.attn.to_out.0.weight"));
        assert!(!q("encoder.layers.0.layer_norm.weight"));
        assert!(!q("blocks.weight"));
        assert!(!q("proj_in.weight"));
    }
}
