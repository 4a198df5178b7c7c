//! Scaled-down tensor layouts of real diffusion architectures.
//!
//! Key names and shape *patterns* are the real ones (ComfyUI / reference state-dict names, the
//! keys ComfyUI-GGUF's `convert.py` detects each architecture by); only the widths are small.
//! The widths are chosen so the files keep the cases converters must handle: rows divisible by
//! 256, rows divisible by 32 but not 256, rows not divisible by 32, 4-D conv kernels, a 5-D
//! Conv3d kernel, 3-D parameters with a leading 1, 1-D norms and biases.

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// Weights: normal, std 0.02, with rare outliers (x16).
    Weight,
    /// Norm scales: 1 + normal * 0.1.
    Norm,
    /// Biases: normal, std 0.01.
    Bias,
}

/// One tensor of a layout, in torch order.
#[derive(Debug, Clone)]
pub struct TensorDef {
    pub name: String,
    pub shape: Vec<u64>,
    pub init: Init,
}

/// A model: its ComfyUI-GGUF architecture string and tensors in module order.
#[derive(Debug, Clone)]
pub struct Layout {
    pub arch: &'static str,
    pub tensors: Vec<TensorDef>,
}

impl Layout {
    pub(crate) fn new(arch: &'static str) -> Self {
        Layout {
            arch,
            tensors: Vec::new(),
        }
    }

    pub(crate) fn param(&mut self, name: impl Into<String>, shape: &[u64], init: Init) {
        self.tensors.push(TensorDef {
            name: name.into(),
            shape: shape.to_vec(),
            init,
        });
    }

    /// `nn.Linear`: `weight [out, in]`, optional `bias [out]`.
    pub(crate) fn linear(&mut self, name: &str, out: u64, inp: u64, bias: bool) {
        self.param(format!("{name}.weight"), &[out, inp], Init::Weight);
        if bias {
            self.param(format!("{name}.bias"), &[out], Init::Bias);
        }
    }

    /// `nn.Conv2d`: `weight [out, in, k, k]`, `bias [out]`.
    fn conv2d(&mut self, name: &str, out: u64, inp: u64, k: u64) {
        self.param(format!("{name}.weight"), &[out, inp, k, k], Init::Weight);
        self.param(format!("{name}.bias"), &[out], Init::Bias);
    }

    /// LayerNorm / GroupNorm with affine parameters.
    pub(crate) fn norm(&mut self, name: &str, dim: u64) {
        self.param(format!("{name}.weight"), &[dim], Init::Norm);
        self.param(format!("{name}.bias"), &[dim], Init::Bias);
    }

    /// The same layout with every key prefixed (ComfyUI checkpoint layout).
    pub fn prefixed(&self, prefix: &str) -> Layout {
        Layout {
            arch: self.arch,
            tensors: self
                .tensors
                .iter()
                .map(|t| TensorDef {
                    name: format!("{prefix}{}", t.name),
                    ..t.clone()
                })
                .collect(),
        }
    }
}

/// Widths of a Flux (BFL reference layout) model.
#[derive(Debug, Clone, Copy)]
pub struct FluxDims {
    pub hidden: u64,
    pub head_dim: u64,
    /// Width of the CLIP pooled vector (768 in Flux).
    pub vec_in: u64,
    /// Width of the T5 context (4096 in Flux).
    pub context: u64,
    pub double_blocks: u64,
    pub single_blocks: u64,
}

impl FluxDims {
    /// The committed fixture: rows of 64 (/32), 256 (/256), 320 (/32, not /256) and 100 (not /32).
    pub const SMALL: FluxDims = FluxDims {
        hidden: 64,
        head_dim: 16,
        vec_in: 100,
        context: 256,
        double_blocks: 1,
        single_blocks: 1,
    };
}

/// Flux.1-dev: detected by `double_blocks.0.img_attn.proj.weight`.
pub fn flux(d: FluxDims) -> Layout {
    let h = d.hidden;
    let mut l = Layout::new("flux");
    l.linear("img_in", h, 64, true);
    l.linear("time_in.in_layer", h, 256, true);
    l.linear("time_in.out_layer", h, h, true);
    l.linear("vector_in.in_layer", h, d.vec_in, true);
    l.linear("vector_in.out_layer", h, h, true);
    l.linear("guidance_in.in_layer", h, 256, true);
    l.linear("guidance_in.out_layer", h, h, true);
    l.linear("txt_in", h, d.context, true);
    for i in 0..d.double_blocks {
        for s in ["img", "txt"] {
            let p = format!("double_blocks.{i}.{s}");
            l.linear(&format!("{p}_mod.lin"), 6 * h, h, true);
            l.linear(&format!("{p}_attn.qkv"), 3 * h, h, true);
            l.param(
                format!("{p}_attn.norm.query_norm.scale"),
                &[d.head_dim],
                Init::Norm,
            );
            l.param(
                format!("{p}_attn.norm.key_norm.scale"),
                &[d.head_dim],
                Init::Norm,
            );
            l.linear(&format!("{p}_attn.proj"), h, h, true);
            l.linear(&format!("{p}_mlp.0"), 4 * h, h, true);
            l.linear(&format!("{p}_mlp.2"), h, 4 * h, true);
        }
    }
    for i in 0..d.single_blocks {
        let p = format!("single_blocks.{i}");
        l.linear(&format!("{p}.linear1"), 3 * h + 4 * h, h, true);
        l.linear(&format!("{p}.linear2"), h, h + 4 * h, true);
        l.param(
            format!("{p}.norm.query_norm.scale"),
            &[d.head_dim],
            Init::Norm,
        );
        l.param(
            format!("{p}.norm.key_norm.scale"),
            &[d.head_dim],
            Init::Norm,
        );
        l.linear(&format!("{p}.modulation.lin"), 3 * h, h, true);
    }
    l.linear("final_layer.adaLN_modulation.1", 2 * h, h, true);
    l.linear("final_layer.linear", 64, h, true);
    l
}

/// The ComfyUI checkpoint layout of [`flux`]: `model.diffusion_model.` keys plus a few VAE keys,
/// which converters working on the diffusion model must leave alone or drop.
pub fn flux_checkpoint() -> Layout {
    let mut l = flux(FluxDims::SMALL).prefixed("model.diffusion_model.");
    l.conv2d("first_stage_model.decoder.conv_in", 32, 16, 3);
    l.norm("first_stage_model.decoder.norm_out", 32);
    l
}

/// SD3.5-medium-like MMDiT: detected by `joint_blocks.0.x_block.attn.qkv.weight`. The last
/// block's context stream is pre-only (adaLN of 2h, no proj, no MLP) as in the real model;
/// `pos_embed` is 3-D with a leading 1.
pub fn sd3() -> Layout {
    let h = 32;
    let hd = 16;
    let depth = 2;
    let mut l = Layout::new("sd3");
    l.param("pos_embed", &[1, 64, h], Init::Weight);
    l.conv2d("x_embedder.proj", h, 16, 2);
    l.linear("t_embedder.mlp.0", h, 256, true);
    l.linear("t_embedder.mlp.2", h, h, true);
    l.linear("y_embedder.mlp.0", h, 160, true);
    l.linear("y_embedder.mlp.2", h, h, true);
    l.linear("context_embedder", h, 256, true);
    for i in 0..depth {
        for stream in ["x_block", "context_block"] {
            let p = format!("joint_blocks.{i}.{stream}");
            let pre_only = stream == "context_block" && i == depth - 1;
            let mods = if pre_only { 2 } else { 6 };
            l.linear(&format!("{p}.adaLN_modulation.1"), mods * h, h, true);
            l.linear(&format!("{p}.attn.qkv"), 3 * h, h, true);
            l.param(format!("{p}.attn.ln_q.weight"), &[hd], Init::Norm);
            l.param(format!("{p}.attn.ln_k.weight"), &[hd], Init::Norm);
            if !pre_only {
                l.linear(&format!("{p}.attn.proj"), h, h, true);
                l.linear(&format!("{p}.mlp.fc1"), 4 * h, h, true);
                l.linear(&format!("{p}.mlp.fc2"), h, 4 * h, true);
            }
        }
    }
    l.linear("final_layer.adaLN_modulation.1", 2 * h, h, true);
    l.linear("final_layer.linear", 2 * 2 * 16, h, true);
    l
}

/// Wan 2.1-like video DiT: detected by `blocks.0.self_attn.norm_q.weight` +
/// `text_embedding.2.weight` + `head.modulation`. `patch_embedding.weight` is the 5-D Conv3d
/// kernel; `*.modulation` are 3-D parameters with a leading 1.
pub fn wan() -> Layout {
    let dim = 32;
    let ffn = 192;
    let mut l = Layout::new("wan");
    l.param("patch_embedding.weight", &[dim, 16, 1, 2, 2], Init::Weight);
    l.param("patch_embedding.bias", &[dim], Init::Bias);
    l.linear("text_embedding.0", dim, 256, true);
    l.linear("text_embedding.2", dim, dim, true);
    l.linear("time_embedding.0", dim, 256, true);
    l.linear("time_embedding.2", dim, dim, true);
    l.linear("time_projection.1", 6 * dim, dim, true);
    for i in 0..2 {
        let p = format!("blocks.{i}");
        l.param(format!("{p}.modulation"), &[1, 6, dim], Init::Weight);
        for attn in ["self_attn", "cross_attn"] {
            for m in ["q", "k", "v", "o"] {
                l.linear(&format!("{p}.{attn}.{m}"), dim, dim, true);
            }
            l.param(format!("{p}.{attn}.norm_q.weight"), &[dim], Init::Norm);
            l.param(format!("{p}.{attn}.norm_k.weight"), &[dim], Init::Norm);
        }
        l.norm(&format!("{p}.norm3"), dim);
        l.linear(&format!("{p}.ffn.0"), ffn, dim, true);
        l.linear(&format!("{p}.ffn.2"), dim, ffn, true);
    }
    l.param("head.modulation", &[1, 2, dim], Init::Weight);
    l.linear("head.head", 16 * 2 * 2, dim, true);
    l
}

/// LDM UNet pieces shared by SD1 and SDXL.
struct Unet<'a> {
    l: &'a mut Layout,
    temb: u64,
    context: u64,
    /// SDXL's transformers use Linear proj_in/proj_out; SD1's use 1x1 convs.
    linear_proj: bool,
}

impl Unet<'_> {
    fn resblock(&mut self, p: &str, inp: u64, out: u64) {
        self.l.norm(&format!("{p}.in_layers.0"), inp);
        self.l.conv2d(&format!("{p}.in_layers.2"), out, inp, 3);
        self.l
            .linear(&format!("{p}.emb_layers.1"), out, self.temb, true);
        self.l.norm(&format!("{p}.out_layers.0"), out);
        self.l.conv2d(&format!("{p}.out_layers.3"), out, out, 3);
        if inp != out {
            self.l.conv2d(&format!("{p}.skip_connection"), out, inp, 1);
        }
    }

    fn transformer(&mut self, p: &str, c: u64, depth: u64) {
        self.l.norm(&format!("{p}.norm"), c);
        if self.linear_proj {
            self.l.linear(&format!("{p}.proj_in"), c, c, true);
        } else {
            self.l.conv2d(&format!("{p}.proj_in"), c, c, 1);
        }
        for d in 0..depth {
            let b = format!("{p}.transformer_blocks.{d}");
            for attn in ["attn1", "attn2"] {
                let kv_in = if attn == "attn1" { c } else { self.context };
                self.l.linear(&format!("{b}.{attn}.to_q"), c, c, false);
                self.l.linear(&format!("{b}.{attn}.to_k"), c, kv_in, false);
                self.l.linear(&format!("{b}.{attn}.to_v"), c, kv_in, false);
                self.l.linear(&format!("{b}.{attn}.to_out.0"), c, c, true);
            }
            // GEGLU: the projection is twice the inner width.
            self.l.linear(&format!("{b}.ff.net.0.proj"), 8 * c, c, true);
            self.l.linear(&format!("{b}.ff.net.2"), c, 4 * c, true);
            for n in ["norm1", "norm2", "norm3"] {
                self.l.norm(&format!("{b}.{n}"), c);
            }
        }
        if self.linear_proj {
            self.l.linear(&format!("{p}.proj_out"), c, c, true);
        } else {
            self.l.conv2d(&format!("{p}.proj_out"), c, c, 1);
        }
    }
}

/// SD1.5-like UNet (LDM key names), sparse: the input/output blocks that carry the down- and
/// upsamplers ComfyUI-GGUF detects SD1 by (`input_blocks.{3,6,9}.0.op`,
/// `output_blocks.2.1.conv`, `output_blocks.{5,8}.2.conv`), and one of each block kind.
/// Channels 16/32/32/32 (SD1: 320/640/1280/1280), context 48 (SD1: 768).
pub fn sd1() -> Layout {
    let mut l = Layout::new("sd1");
    let mut u = Unet {
        l: &mut l,
        temb: 64,
        context: 48,
        linear_proj: false,
    };
    u.l.linear("time_embed.0", 64, 16, true);
    u.l.linear("time_embed.2", 64, 64, true);
    u.l.conv2d("input_blocks.0.0", 16, 4, 3);
    u.resblock("input_blocks.1.0", 16, 16);
    u.transformer("input_blocks.1.1", 16, 1);
    u.l.conv2d("input_blocks.3.0.op", 16, 16, 3);
    u.resblock("input_blocks.4.0", 16, 32);
    u.transformer("input_blocks.4.1", 32, 1);
    u.l.conv2d("input_blocks.6.0.op", 32, 32, 3);
    u.l.conv2d("input_blocks.9.0.op", 32, 32, 3);
    u.transformer("middle_block.1", 32, 1);
    u.l.conv2d("output_blocks.2.1.conv", 32, 32, 3);
    u.l.conv2d("output_blocks.5.2.conv", 32, 32, 3);
    u.l.conv2d("output_blocks.8.2.conv", 32, 32, 3);
    u.resblock("output_blocks.11.0", 32, 16);
    u.l.norm("out.0", 16);
    u.l.conv2d("out.2", 4, 16, 3);
    l
}

/// SDXL-like UNet (LDM key names), sparse: `label_emb` (the ADM vector input, SDXL's
/// detection key), the downsamplers `input_blocks.{3,6}.0.op`, the upsamplers
/// `output_blocks.{2,5}.2.conv`, Linear proj_in/out and two-deep transformers.
/// Channels 16/32/32 (SDXL: 320/640/1280), context 64 (SDXL: 2048), ADM 176 (SDXL: 2816).
pub fn sdxl() -> Layout {
    let mut l = Layout::new("sdxl");
    let mut u = Unet {
        l: &mut l,
        temb: 64,
        context: 64,
        linear_proj: true,
    };
    u.l.linear("time_embed.0", 64, 16, true);
    u.l.linear("time_embed.2", 64, 64, true);
    u.l.linear("label_emb.0.0", 64, 176, true);
    u.l.linear("label_emb.0.2", 64, 64, true);
    u.l.conv2d("input_blocks.0.0", 16, 4, 3);
    u.resblock("input_blocks.1.0", 16, 16);
    u.l.conv2d("input_blocks.3.0.op", 16, 16, 3);
    u.resblock("input_blocks.4.0", 16, 32);
    u.transformer("input_blocks.4.1", 32, 2);
    u.l.conv2d("input_blocks.6.0.op", 32, 32, 3);
    u.l.conv2d("output_blocks.2.2.conv", 32, 32, 3);
    u.l.conv2d("output_blocks.5.2.conv", 32, 32, 3);
    u.resblock("output_blocks.8.0", 32, 16);
    u.l.norm("out.0", 16);
    u.l.conv2d("out.2", 4, 16, 3);
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has(l: &Layout, k: &str) -> bool {
        l.tensors.iter().any(|t| t.name == k)
    }

    #[test]
    fn layouts_carry_the_detection_keys() {
        assert!(has(
            &flux(FluxDims::SMALL),
            "double_blocks.0.img_attn.proj.weight"
        ));
        assert!(has(&sd3(), "joint_blocks.0.x_block.attn.qkv.weight"));
        let w = wan();
        for k in [
            "blocks.0.self_attn.norm_q.weight",
            "text_embedding.2.weight",
            "head.modulation",
        ] {
            assert!(has(&w, k), "{k}");
        }
        let x = sdxl();
        assert!(has(&x, "label_emb.0.0.weight"));
        for k in [
            "input_blocks.3.0.op.weight",
            "input_blocks.6.0.op.weight",
            "output_blocks.2.2.conv.weight",
            "output_blocks.5.2.conv.weight",
        ] {
            assert!(has(&x, k), "{k}");
        }
        let s = sd1();
        for k in [
            "input_blocks.3.0.op.weight",
            "input_blocks.6.0.op.weight",
            "input_blocks.9.0.op.weight",
            "output_blocks.2.1.conv.weight",
            "output_blocks.5.2.conv.weight",
            "output_blocks.8.2.conv.weight",
        ] {
            assert!(has(&s, k), "{k}");
        }
        // sdxl is tried before sd1: an sd1 file must not carry sdxl's keys.
        assert!(!has(&s, "label_emb.0.0.weight"));
        assert!(!has(&s, "output_blocks.2.2.conv.weight"));
    }

    #[test]
    fn names_are_unique() {
        for l in [flux(FluxDims::SMALL), sd3(), wan(), sd1(), sdxl()] {
            let mut names: Vec<_> = l.tensors.iter().map(|t| &t.name).collect();
            names.sort();
            let n = names.len();
            names.dedup();
            assert_eq!(n, names.len(), "{}", l.arch);
        }
    }
}
