//! Which ggml type each tensor of a diffusion model gets, as ComfyUI-GGUF's path decides it.
//!
//! ComfyUI-GGUF makes a quantized file in two steps: `tools/convert.py` writes an F16/BF16 "base"
//! GGUF (some tensors F32), then a patched `llama-quantize` re-types the tensors it is allowed to
//! quantize. [`plan`] reproduces both decisions in one pass so a converter can stream the source
//! once: for every tensor it records the *base* type (what convert.py would have stored, which
//! fixes the values the quantizer sees) and the *final* type written to the file.
//!
//! Tensor order is convert.py's: the source keys sorted (safetensors' `keys()` order), which
//! matters because some mixes upgrade only the first N matching tensors.
//!
//! Text encoders (T5, umt5) are typed by stock llama.cpp's rules instead ([`GgufMixer::LlamaCpp`]):
//! the T5 GGUFs ComfyUI users load were made with llama.cpp's own `llama-quantize`, whose
//! `llama_tensor_get_type` (`src/llama-quant.cpp`) picks the types on llama.cpp's tensor names.

use std::collections::BTreeMap;
use std::path::PathBuf;

use detect::arch::{self, Arch, GgufMixer, GgufNaming, KeyPrefix};
use tensorfile::source::Stored;
use tensorfile::{Dtype, TensorSource};

use crate::reader::MetadataValue;
use crate::types::{FileType, GgmlType};

/// convert.py keeps tensors at or under this many elements in F32 (when the source is F32/BF16).
const QUANTIZATION_THRESHOLD: u64 = 1024;
/// sd1/sdxl tensors with at least this many elements may be flattened to rows of 256.
const REARRANGE_THRESHOLD: u64 = 512;
/// convert.py refuses longer names (the patched ggml allows 127 bytes plus the NUL).
pub const MAX_TENSOR_NAME_LEN: usize = 127;
/// ComfyUI-GGUF's loader and gguf-py read more, ggml reads at most this many dims.
const MAX_GGML_DIMS: usize = 4;

/// The element type of a source tensor, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceDtype {
    /// float32.
    F32,
    /// float16.
    F16,
    /// bfloat16.
    BF16,
    /// Either fp8 flavour: convert.py widens these to F16.
    F8,
    /// Integers and booleans (position ids, masks): not weights, left out of the file.
    NonFloat,
    /// A float format convcache cannot read (F64, the newer sub-byte floats): an error.
    Unsupported,
}

impl SourceDtype {
    /// The policy's view of what a source file stores (not the dtype it is served in: a
    /// de-scaled fp8 weight is served as F32 but planned as the fp8 convert.py widens to F16).
    pub fn of(stored: Stored) -> SourceDtype {
        match stored {
            Stored::Safetensors(dtype) => match dtype {
                Dtype::F32 => SourceDtype::F32,
                Dtype::BF16 => SourceDtype::BF16,
                // convert.py keeps only F32 and BF16 sources' small tensors in F32; F64 takes
                // the F16 branch.
                Dtype::F16 | Dtype::F64 => SourceDtype::F16,
                Dtype::F8E4M3 | Dtype::F8E5M2 => SourceDtype::F8,
                Dtype::I64
                | Dtype::I32
                | Dtype::I16
                | Dtype::I8
                | Dtype::U64
                | Dtype::U32
                | Dtype::U16
                | Dtype::U8
                | Dtype::Bool => SourceDtype::NonFloat,
                _ => SourceDtype::Unsupported,
            },
            // A GGUF source is planned as if its dequantized tensors were an F32 state dict;
            // F16 and BF16 tensors keep their own dtype.
            Stored::Ggml(GgmlType::F16) => SourceDtype::F16,
            Stored::Ggml(GgmlType::BF16) => SourceDtype::BF16,
            Stored::Ggml(_) => SourceDtype::F32,
        }
    }
}

/// One tensor of the source state dict.
#[derive(Debug, Clone, Copy)]
pub struct InputTensor<'a> {
    /// Its key in the source.
    pub name: &'a str,
    /// Torch order.
    pub shape: &'a [u64],
    /// What the source stores.
    pub dtype: SourceDtype,
}

/// What happens to one source tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTensor {
    /// Its position in the tensors given to [`plan`] (for [`plan_source`], its index in the
    /// source).
    pub source_index: usize,
    /// The key in the source file (prefix included).
    pub source_name: String,
    /// The GGUF tensor name (prefix stripped).
    pub name: String,
    /// The shape stored in the file, torch order (flattened for sd1/sdxl reshapes).
    pub shape: Vec<u64>,
    /// The original torch shape when the tensor was flattened (`comfy.gguf.orig_shape.<name>`).
    pub orig_shape: Option<Vec<u64>>,
    /// The type convert.py's base file would hold: the values the quantizer starts from are the
    /// source rounded through this type.
    pub base_type: GgmlType,
    /// The type written.
    pub ggml_type: GgmlType,
}

impl PlannedTensor {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Dims in ggml order, as written in the tensor info (leading torch 1s kept).
    pub fn ggml_dims(&self) -> Vec<u64> {
        self.shape.iter().rev().copied().collect()
    }

    /// Bytes of this tensor's data in the file.
    pub fn byte_len(&self) -> Option<u64> {
        self.ggml_type.bytes_for(self.n_elements())
    }
}

/// A tensor left out of the output, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DroppedTensor {
    /// Its key in the source.
    pub name: String,
    /// Why it is not written.
    pub reason: &'static str,
}

/// The whole output: metadata in file order, tensors in file order.
#[derive(Debug, Clone)]
pub struct GgufPlan {
    /// The architecture written in `general.architecture`.
    pub arch: Arch,
    /// The target.
    pub file_type: FileType,
    /// Every metadata key, in file order.
    pub metadata: Vec<(String, MetadataValue)>,
    /// Every tensor written, in file order.
    pub tensors: Vec<PlannedTensor>,
    /// Source tensors left out.
    pub dropped: Vec<DroppedTensor>,
    /// Tensors the mix would quantize whose rows are not whole blocks of the chosen type: they
    /// took the fallback (F16 for K-quants, else the base type).
    pub fallbacks: Vec<String>,
}

impl GgufPlan {
    /// Count of tensors per written type, for reports.
    pub fn type_histogram(&self) -> BTreeMap<&'static str, usize> {
        let mut h = BTreeMap::new();
        for t in &self.tensors {
            *h.entry(t.ggml_type.name()).or_insert(0) += 1;
        }
        h
    }

    /// What the user should know about this plan: the tensors that took the unquantized
    /// fallback.
    pub fn warnings(&self) -> Vec<String> {
        if self.fallbacks.is_empty() {
            return Vec::new();
        }
        let n = self.fallbacks.len();
        let some: Vec<&str> = self.fallbacks.iter().take(3).map(String::as_str).collect();
        let how = match self.arch.gguf_mixer() {
            GgufMixer::ComfyUiGguf => {
                "were stored unquantized, as ComfyUI-GGUF's quantizer does (F16 for K-quants)"
            }
            GgufMixer::LlamaCpp => {
                "took llama.cpp's fallback type (Q2_K/Q3_K to Q4_0, Q4_K to Q5_0, Q5_K to Q5_1, \
                 Q6_K to Q8_0, F16 when that does not fit either)"
            }
        };
        vec![format!(
            "{n} tensor(s) the {} mix would quantize have rows that are not whole blocks \
             and {how}: {}{}",
            self.file_type,
            some.join(", "),
            if n > 3 { ", ..." } else { "" }
        )]
    }
}

/// Why a state dict cannot be converted.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The architecture cannot be told from the tensor names.
    #[error(transparent)]
    Arch(#[from] arch::ArchError),
    /// A float dtype convcache cannot read.
    #[error("tensor `{name}` has dtype that cannot be converted to GGUF")]
    UnsupportedDtype {
        /// The tensor.
        name: String,
    },
    /// A name ggml cannot hold.
    #[error("tensor name `{name}` is longer than {MAX_TENSOR_NAME_LEN} bytes")]
    NameTooLong {
        /// The tensor.
        name: String,
    },
    /// A shape whose element count does not fit in a u64 (or an orig_shape dim in an i32).
    #[error("tensor `{name}`: element count overflows")]
    ShapeOverflow {
        /// The tensor.
        name: String,
    },
    /// Two keys that are the same once the prefix is stripped.
    #[error("two source tensors map to the GGUF name `{name}`")]
    DuplicateName {
        /// The GGUF name.
        name: String,
    },
    /// Every tensor was dropped.
    #[error("no tensors left to convert")]
    Empty,
    /// The architecture gets no GGUF output (CLIP text encoders).
    #[error("{arch} has no GGUF output: {reason}")]
    NoGguf {
        /// The architecture.
        arch: Arch,
        /// Why.
        reason: &'static str,
    },
    /// A tensor of a text encoder that its GGUF naming cannot express, so the loader could
    /// not give it back.
    #[error(
        "tensor `{name}` is not part of a {arch} encoder as ComfyUI-GGUF's text-encoder loader \
         maps it (a GGUF would lose it)"
    )]
    UnmappedTensor {
        /// The tensor.
        name: String,
        /// The architecture.
        arch: Arch,
    },
}

/// Why a source cannot be planned: [`PlanError`] with the file named.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct SourcePlanError {
    /// The source file.
    pub path: PathBuf,
    /// What is wrong with its tensors.
    pub source: PlanError,
}

impl SourcePlanError {
    /// Always true: planning reads only the source's header, so every refusal is about the
    /// input.
    pub fn is_input_fault(&self) -> bool {
        true
    }
}

/// Plans the GGUF file for `source`, as [`plan`] does for its served tensors (in the source's
/// order, typed by what the file stores: see [`SourceDtype::of`]). The tensors the source
/// hides (scale tensors folded into their weights, markers) are listed as dropped; `dropped`
/// is sorted by name.
pub fn plan_source(
    source: &dyn TensorSource,
    forced_arch: Option<Arch>,
    target: FileType,
) -> Result<GgufPlan, SourcePlanError> {
    let inputs: Vec<InputTensor<'_>> = source
        .tensors()
        .iter()
        .map(|t| InputTensor {
            name: &t.name,
            shape: &t.shape,
            dtype: SourceDtype::of(t.stored),
        })
        .collect();
    let mut plan = plan(&inputs, forced_arch, target).map_err(|e| SourcePlanError {
        path: source.path().to_owned(),
        source: e,
    })?;
    plan.dropped.splice(
        0..0,
        source.hidden().iter().map(|h| DroppedTensor {
            name: h.name.clone(),
            reason: h.reason,
        }),
    );
    plan.dropped.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(plan)
}

/// convert.py's prefix handling: which keys survive, under which names; the other keys (VAE and
/// text encoders of a full checkpoint) are recorded in `dropped`.
fn strip_prefixes<'a>(
    tensors: &[InputTensor<'a>],
    dropped: &mut Vec<DroppedTensor>,
) -> Vec<(String, usize, InputTensor<'a>)> {
    let prefix = KeyPrefix::detect(tensors.iter().map(|t| t.name));
    let mut kept = Vec::with_capacity(tensors.len());
    for (index, t) in tensors.iter().enumerate() {
        match prefix.apply(t.name) {
            Some(n) => kept.push((n.into_owned(), index, *t)),
            None => dropped.push(DroppedTensor {
                name: t.name.to_owned(),
                reason: "outside the diffusion model (key prefix)",
            }),
        }
    }
    kept
}

/// A kept tensor: (GGUF name, name in the arch tables, source index, tensor).
type NamedTensor<'a> = (String, String, usize, InputTensor<'a>);

/// The GGUF name of each kept tensor under `arch`'s naming, beside the name the arch tables
/// match (the prefix-stripped source name). A T5 encoder's tied `encoder.embed_tokens.weight`
/// (a copy of `shared.weight`, which llama.cpp also writes once) is dropped; any other key
/// outside the encoder is refused rather than left out.
fn gguf_names<'a>(
    arch: Arch,
    stripped: Vec<(String, usize, InputTensor<'a>)>,
    dropped: &mut Vec<DroppedTensor>,
) -> Result<Vec<NamedTensor<'a>>, PlanError> {
    match arch.gguf_naming() {
        GgufNaming::Reference => Ok(stripped
            .into_iter()
            .map(|(n, i, t)| (n.clone(), n, i, t))
            .collect()),
        GgufNaming::LlamaCppT5 => {
            let has_shared = stripped.iter().any(|(n, _, _)| n == "shared.weight");
            let mut out = Vec::with_capacity(stripped.len());
            for (n, i, t) in stripped {
                if n == "encoder.embed_tokens.weight" && has_shared {
                    dropped.push(DroppedTensor {
                        name: t.name.to_owned(),
                        reason: "tied copy of shared.weight",
                    });
                    continue;
                }
                match crate::text_encoder::t5_gguf_name(&n) {
                    Some(g) => out.push((g, n, i, t)),
                    // Integer tensors (Comfy-Org's `spiece_model` tokenizer bytes) are not
                    // weights; the main loop drops them.
                    None if t.dtype == SourceDtype::NonFloat => out.push((n.clone(), n, i, t)),
                    None => return Err(PlanError::UnmappedTensor { name: n, arch }),
                }
            }
            Ok(out)
        }
    }
}

fn contains_any(name: &str, patterns: &[&str]) -> bool {
    patterns.iter().any(|p| name.contains(p))
}

/// ggml's `ggml_n_dims`: trailing ggml dims of 1 (leading torch 1s) do not count; at least 1.
fn ggml_n_dims(torch_shape: &[u64]) -> usize {
    let leading_ones = torch_shape.iter().take_while(|&&d| d == 1).count();
    (torch_shape.len() - leading_ones).max(1)
}

/// The name groups the patched quantizer upgrades.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NameGroup {
    VProjection,
    FusedQkv,
    FfnDown,
}

fn name_group(name: &str) -> Option<NameGroup> {
    const V: &[&str] = &[
        "attn_v.weight",
        ".to_v.weight",
        ".v.weight",
        ".attn.w1v.weight",
        ".attn.w2v.weight",
        "_attn.v_proj.weight",
        ".add_v_proj.weight",
    ];
    const QKV: &[&str] = &["attn_qkv.weight", "attn.qkv.weight", "attention.qkv.weight"];
    const FFN: &[&str] = &[
        "ffn_down",
        ".ffn.2.weight",
        ".ff.net.2.weight",
        ".mlp.layer2.weight",
        ".adaln_modulation_mlp.2.weight",
        ".feed_forward.w2.weight",
        ".img_mlp.net.2.weight",
        ".txt_mlp.net.2.weight",
    ];
    if contains_any(name, V) {
        Some(NameGroup::VProjection)
    } else if contains_any(name, QKV) {
        Some(NameGroup::FusedQkv)
    } else if contains_any(name, FFN) || (name.contains("experts.") && name.contains(".w2.weight"))
    {
        Some(NameGroup::FfnDown)
    } else {
        None
    }
}

/// The patched `llama-quantize`'s type for a quantizable tensor.
fn mix_type(target: FileType, name: &str, arch: Arch, v_seen: usize) -> GgmlType {
    use FileType as F;
    use GgmlType as G;
    let base = target.base_type();
    let by_group = match name_group(name) {
        Some(NameGroup::VProjection) => match target {
            F::Q2K => G::Q3K,
            F::Q3KM if v_seen < 2 => G::Q5K,
            F::Q3KM => G::Q4K,
            F::Q3KL => G::Q5K,
            F::Q4KM | F::Q5KM => G::Q6K,
            F::Q4KS if v_seen < 4 => G::Q5K,
            _ => base,
        },
        Some(NameGroup::FusedQkv) => match target {
            F::Q3KM | F::Q3KL => G::Q4K,
            F::Q4KM => G::Q5K,
            F::Q5KM => G::Q6K,
            _ => base,
        },
        Some(NameGroup::FfnDown) => match target {
            F::Q3KM => G::Q4K,
            F::Q3KL | F::Q4KS => G::Q5K,
            F::Q4KM | F::Q5KM => G::Q6K,
            F::Q4_0 => G::Q4_1,
            F::Q5_0 => G::Q5_1,
            _ => base,
        },
        None => base,
    };
    if arch == Arch::QwenImage
        && (name.contains("transformer_blocks.0.") || name.contains("transformer_blocks.59."))
    {
        return match target {
            F::Q2K | F::Q3KS | F::Q3KM | F::Q3KL => G::Q4K,
            F::Q4KM => G::Q5K,
            F::Q5KM => G::Q6K,
            _ => by_group,
        };
    }
    by_group
}

/// Stock llama.cpp's per-tensor type choice ([`GgufMixer::LlamaCpp`]), ported from
/// `src/llama-quant.cpp` (ggml-org/llama.cpp, the quantizer of llama-cpp-python 0.3.36 that
/// the golden in `tests/golden/t5_llamacpp/` was made with) for the file types convcache offers
/// (no imatrix, no IQ types, no MoE, not Falcon, no 70B): `tensor_allows_quantization`,
/// `llama_tensor_get_type_impl` and `tensor_type_fallback`. It keeps the counters of
/// `quantize_state_impl`, so tensors must be typed in llama-quantize's order: its
/// `weights_map`, sorted by name (T5's `enc.blk.N.` names are not ordered by layer number,
/// so `enc.blk.10` comes before `enc.blk.2`, and the "layer" the rules see is that position).
struct LlamaCppMix {
    /// `n_attention_wv`: the tensors of the attn_v category in the file.
    n_attention_wv: usize,
    /// `i_attention_wv`: attn_v tensors typed so far.
    i_attention_wv: usize,
    /// `n_ffn_down`: `hparams.n_layer_all`, the `block_count` the plan writes.
    n_layer: usize,
    /// `i_ffn_down`: ffn_down tensors typed so far.
    i_ffn_down: usize,
    /// `has_tied_embeddings`: no `output.weight`, so the token embedding takes the output
    /// tensor's rule (a T5 encoder has no output head).
    tied_embeddings: bool,
}

/// `tensor_get_category`'s categories that matter for the file types convcache offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LlamaCppCategory {
    TokenEmbd,
    Output,
    /// `attn_v`, `attn_qkv`, `attn_kv_b` (`category_is_attn_v`).
    AttentionV,
    /// `attn_output` (T5's output projection is `attn_o`, which is not in it).
    AttentionOutput,
    FfnDown,
    Other,
}

impl LlamaCppCategory {
    /// `tensor_get_category`, in its order.
    fn of(name: &str) -> LlamaCppCategory {
        if name == "output.weight" {
            LlamaCppCategory::Output
        } else if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
            LlamaCppCategory::TokenEmbd
        } else if ["attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight"]
            .iter()
            .any(|p| name.contains(p))
        {
            LlamaCppCategory::AttentionV
        } else if ["attn_k.weight", "attn_q.weight"]
            .iter()
            .any(|p| name.contains(p))
        {
            // Their rules are IQ-only.
            LlamaCppCategory::Other
        } else if name.contains("attn_output.weight") {
            LlamaCppCategory::AttentionOutput
        } else if name.contains("ffn_up") || name.contains("ffn_gate") {
            // Their rules are IQ-only.
            LlamaCppCategory::Other
        } else if name.contains("ffn_down") {
            LlamaCppCategory::FfnDown
        } else {
            LlamaCppCategory::Other
        }
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one
/// between them.
fn use_more_bits(i_layer: usize, n_layers: usize) -> bool {
    // Past the first test i_layer >= n_layers / 8, so the subtraction cannot underflow.
    i_layer < n_layers / 8 || i_layer >= 7 * n_layers / 8 || (i_layer - n_layers / 8) % 3 == 2
}

impl LlamaCppMix {
    /// `init_quantize_state_counters` over the file's tensor names.
    fn new<'a>(names: impl Iterator<Item = &'a str> + Clone) -> LlamaCppMix {
        LlamaCppMix {
            n_attention_wv: names
                .clone()
                .filter(|n| LlamaCppCategory::of(n) == LlamaCppCategory::AttentionV)
                .count(),
            i_attention_wv: 0,
            n_layer: crate::text_encoder::t5_block_count(names.clone()),
            i_ffn_down: 0,
            tied_embeddings: !names.clone().any(|n| n == "output.weight"),
        }
    }

    /// `tensor_allows_quantization` (default params: the output tensor may be quantized), with
    /// the name rules that can match a llama.cpp T5 encoder: at least 2 dims, a name ending in
    /// `weight`, no norm, no relative position bias (`attn_rel_b`). Its other exclusions name
    /// tensors of other architectures (Mamba, RWKV, MoE routers, vision towers).
    fn allows_quantization(name: &str, torch_shape: &[u64]) -> bool {
        ggml_n_dims(torch_shape) >= 2
            && name.ends_with("weight")
            && !name.contains("_norm.weight")
            && !name.contains("attn_rel_b.weight")
            && !name.contains("ffn_gate_inp.weight")
            && !name.contains(".position_embd")
    }

    /// `llama_tensor_get_type` for a tensor that allows quantization, whose rows hold `ncols`
    /// elements (ggml's `ne[0]`): the type, and whether `tensor_type_fallback` changed it.
    fn tensor_type(&mut self, target: FileType, name: &str, ncols: u64) -> (GgmlType, bool) {
        use FileType as F;
        use GgmlType as G;
        let default = target.base_type();
        let fits = |t: GgmlType| ncols.is_multiple_of(t.block_size() as u64);
        let category = LlamaCppCategory::of(name);
        let chosen = match category {
            LlamaCppCategory::Output | LlamaCppCategory::TokenEmbd
                if category == LlamaCppCategory::Output || self.tied_embeddings =>
            {
                if !fits(default) {
                    G::Q8_0
                } else if default != G::Q8_0 {
                    G::Q6K
                } else {
                    default
                }
            }
            LlamaCppCategory::AttentionV => {
                let i = self.i_attention_wv;
                self.i_attention_wv += 1;
                match target {
                    // n_gqa() is 1 for T5 (no grouped-query attention): not the Q4_K branch.
                    F::Q2K => G::Q3K,
                    F::Q3KM if i < 2 => G::Q5K,
                    F::Q3KM => G::Q4K,
                    F::Q3KL => G::Q5K,
                    F::Q4KM | F::Q5KM if use_more_bits(i, self.n_attention_wv) => G::Q6K,
                    F::Q4KS if i < 4 => G::Q5K,
                    _ => default,
                }
            }
            LlamaCppCategory::FfnDown => {
                // n_expert is 1: the layer is the running count, not parsed from the name.
                let (i, n) = (self.i_ffn_down, self.n_layer);
                self.i_ffn_down += 1;
                match target {
                    F::Q2K => G::Q3K,
                    F::Q3KM if i < n / 16 => G::Q5K,
                    F::Q3KM => G::Q4K,
                    F::Q3KL => G::Q5K,
                    F::Q4KM | F::Q5KM if use_more_bits(i, n) => G::Q6K,
                    F::Q4KS if i < n / 8 => G::Q5K,
                    _ => default,
                }
            }
            LlamaCppCategory::AttentionOutput => match target {
                F::Q2K => G::Q3K,
                F::Q3KM => G::Q4K,
                F::Q3KL => G::Q5K,
                _ => default,
            },
            _ => default,
        };
        if fits(chosen) {
            return (chosen, false);
        }
        // tensor_type_fallback. For the 32-element block types llama.cpp has no fallback and
        // refuses the whole file ("no tensor type fallback is defined"); convcache stores F16,
        // llama.cpp's own last resort. Real T5 / umt5 rows (4096, 10240) never get here.
        let fallback = match chosen {
            G::Q2K | G::Q3K => Some(G::Q4_0),
            G::Q4K => Some(G::Q5_0),
            G::Q5K => Some(G::Q5_1),
            G::Q6K => Some(G::Q8_0),
            _ => None,
        };
        (fallback.filter(|&t| fits(t)).unwrap_or(G::F16), true)
    }
}

/// Plans the GGUF file ComfyUI-GGUF's tools would make of `tensors` for `target`.
///
/// `forced_arch` overrides detection (`--arch`). `tensors` must be in the source's data order
/// (see the module docs).
///
/// The plain targets are convert.py's file with one rule made explicit: `MostlyF16` stores
/// every tensor that convert.py does not keep in F32 as F16 (a BF16 source's included), and
/// `MostlyBF16` stores them as BF16 (an fp8 or F16 source's included), where convert.py picks
/// per tensor (BF16 for a BF16 tensor, else F16) and names the file after the most common source
/// dtype. For a single-dtype source both agree; `AllF32` stores everything in F32.
pub fn plan(
    tensors: &[InputTensor<'_>],
    forced_arch: Option<Arch>,
    target: FileType,
) -> Result<GgufPlan, PlanError> {
    let mut dropped = Vec::new();
    let stripped = strip_prefixes(tensors, &mut dropped);
    let arch = match forced_arch {
        Some(a) => a,
        None => arch::detect_arch(stripped.iter().map(|(n, _, _)| n.as_str()))?,
    };
    if let Some(reason) = arch.gguf_refusal() {
        return Err(PlanError::NoGguf { arch, reason });
    }
    // (GGUF name, name in the arch tables, source index, tensor).
    let mut named = gguf_names(arch, stripped, &mut dropped)?;
    let mut seen = std::collections::HashSet::with_capacity(named.len());
    for (name, _, _, _) in &named {
        if !seen.insert(name.as_str()) {
            return Err(PlanError::DuplicateName { name: name.clone() });
        }
    }
    drop(seen);
    if target.base_type().is_quantized() {
        named.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    }
    let quantized_target = target.base_type().is_quantized();

    let mut planned = Vec::with_capacity(named.len());
    let mut high_dim = Vec::new();
    let mut v_seen = 0usize;
    let mut llama_cpp = LlamaCppMix::new(named.iter().map(|(n, _, _, _)| n.as_str()));
    let mut fallbacks = Vec::new();
    for (name, table_name, source_index, src) in named {
        if arch.is_ignored(&table_name) {
            dropped.push(DroppedTensor {
                name,
                reason: "ignored for this architecture",
            });
            continue;
        }
        let n = src
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| PlanError::ShapeOverflow { name: name.clone() })?;
        if n == 0 {
            // An empty tensor (e.g. ComfyUI's `scaled_fp8` marker) crashes ggml's loader.
            dropped.push(DroppedTensor {
                name,
                reason: "empty tensor",
            });
            continue;
        }
        if src.dtype == SourceDtype::NonFloat {
            dropped.push(DroppedTensor {
                name,
                reason: "integer or boolean tensor (not a weight)",
            });
            continue;
        }
        if src.dtype == SourceDtype::Unsupported {
            return Err(PlanError::UnsupportedDtype { name });
        }
        if name.len() > MAX_TENSOR_NAME_LEN {
            return Err(PlanError::NameTooLong { name });
        }

        let high_precision_source = matches!(src.dtype, SourceDtype::F32 | SourceDtype::BF16);
        // llama.cpp's convert_hf_to_gguf.py stores 1-D tensors and norms in F32 whatever the
        // source ("most of the codebase that takes in 1D tensors or norms only handles F32"):
        // the base llama-quantize copies them from.
        let llama_cpp_f32 = arch.gguf_mixer() == GgufMixer::LlamaCpp
            && (src.shape.len() <= 1 || name.ends_with("_norm.weight"));
        let keep_f32 = llama_cpp_f32
            || high_precision_source
                && (src.shape.len() == 1
                    || n <= QUANTIZATION_THRESHOLD
                    || arch.is_hiprec(&table_name));
        let base_type = match target {
            FileType::AllF32 => GgmlType::F32,
            _ if keep_f32 => GgmlType::F32,
            FileType::MostlyF16 => GgmlType::F16,
            FileType::MostlyBF16 => GgmlType::BF16,
            _ if src.dtype == SourceDtype::BF16 => GgmlType::BF16,
            _ => GgmlType::F16,
        };

        if src.shape.len() > MAX_GGML_DIMS {
            // ComfyUI-GGUF's fix_5d_tensors end state: F32 with every dim.
            high_dim.push(PlannedTensor {
                source_index,
                source_name: src.name.to_owned(),
                name,
                shape: src.shape.to_vec(),
                orig_shape: None,
                base_type: GgmlType::F32,
                ggml_type: GgmlType::F32,
            });
            continue;
        }

        let mut shape = if src.shape.is_empty() {
            vec![1]
        } else {
            src.shape.to_vec()
        };
        let mut orig_shape = None;
        if arch.shape_fix()
            && shape.len() > 1
            && n >= REARRANGE_THRESHOLD
            && n % 256 == 0
            && shape.last().is_some_and(|&d| d % 256 != 0)
        {
            orig_shape = Some(std::mem::replace(&mut shape, vec![n / 256, 256]));
        }

        let row = *shape.last().unwrap_or(&1);
        let ggml_type = match arch.gguf_mixer() {
            _ if !quantized_target => base_type,
            GgufMixer::ComfyUiGguf => {
                let quantizable = name.ends_with("weight")
                    && !name.contains("_norm.weight")
                    && ggml_n_dims(&shape) == 2
                    && !arch.is_quant_excluded(&table_name);
                if quantizable {
                    let chosen = mix_type(target, &name, arch, v_seen);
                    if name_group(&name) == Some(NameGroup::VProjection) {
                        v_seen += 1;
                    }
                    if row % chosen.block_size() as u64 == 0 {
                        chosen
                    } else {
                        fallbacks.push(name.clone());
                        if chosen.block_size() == 256 {
                            // The patch's fallback for K-quants is F16, whatever the base.
                            GgmlType::F16
                        } else {
                            base_type
                        }
                    }
                } else {
                    base_type
                }
            }
            GgufMixer::LlamaCpp => {
                if LlamaCppMix::allows_quantization(&name, &shape) {
                    let (chosen, fell_back) = llama_cpp.tensor_type(target, &name, row);
                    if fell_back {
                        fallbacks.push(name.clone());
                    }
                    chosen
                } else {
                    // llama-quantize copies the tensor in the type its input file holds.
                    base_type
                }
            }
        };
        planned.push(PlannedTensor {
            source_index,
            source_name: src.name.to_owned(),
            name,
            shape,
            orig_shape,
            base_type,
            ggml_type,
        });
    }

    // fix_5d_tensors puts each high-dim tensor right after its `.bias` sibling.
    for t in high_dim {
        let at = planned
            .iter()
            .position(|p| p.name.replace(".bias", ".weight") == t.name)
            .map_or(planned.len(), |i| i + 1);
        planned.insert(at, t);
    }
    if planned.is_empty() {
        return Err(PlanError::Empty);
    }

    let file_type = target;
    let mut metadata: Vec<(String, MetadataValue)> = vec![(
        "general.architecture".into(),
        MetadataValue::String(arch.gguf_name().into()),
    )];
    let version_and_type = [
        (
            "general.quantization_version".to_owned(),
            MetadataValue::U32(2),
        ),
        (
            "general.file_type".to_owned(),
            MetadataValue::U32(file_type.id()),
        ),
    ];
    let mut orig_shapes = Vec::new();
    for t in &planned {
        if let Some(s) = &t.orig_shape {
            // The loader accepts only INT32 arrays here.
            let dims = s
                .iter()
                .map(|&d| i32::try_from(d).map(MetadataValue::I32))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| PlanError::ShapeOverflow {
                    name: t.name.clone(),
                })?;
            orig_shapes.push((
                format!("comfy.gguf.orig_shape.{}", t.name),
                MetadataValue::Array(dims),
            ));
        }
    }
    // convert.py writes the two keys before the tensors' orig shapes. llama-quantize b3962
    // copies every key in order and then sets these two again; the ggml of that tag
    // (`gguf_get_or_add_key`) overwrites an existing key in place, so the order stays.
    metadata.extend(version_and_type);
    if arch.gguf_naming() == GgufNaming::LlamaCppT5 {
        // The hyperparameters llama.cpp's T5 encoder loader reads (it refuses a file without
        // them, llama-quantize included); ComfyUI-GGUF ignores them.
        metadata.extend(crate::text_encoder::t5_hparams(
            planned
                .iter()
                .map(|t| (t.name.as_str(), t.shape.as_slice())),
        ));
    }
    metadata.extend(orig_shapes);

    Ok(GgufPlan {
        arch,
        file_type,
        metadata,
        tensors: planned,
        dropped,
        fallbacks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t<'a>(name: &'a str, shape: &'a [u64], dtype: SourceDtype) -> InputTensor<'a> {
        InputTensor { name, shape, dtype }
    }

    fn type_of(plan: &GgufPlan, name: &str) -> GgmlType {
        plan.tensors
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("{name} not planned"))
            .ggml_type
    }

    const F32: SourceDtype = SourceDtype::F32;

    fn flux_like(dtype: SourceDtype) -> Vec<InputTensor<'static>> {
        vec![
            t("double_blocks.0.img_attn.proj.weight", &[3072, 3072], dtype),
            t("double_blocks.0.img_attn.qkv.weight", &[9216, 3072], dtype),
            t("double_blocks.0.img_attn.qkv.bias", &[9216], dtype),
            t(
                "double_blocks.0.img_attn.norm.key_norm.scale",
                &[128],
                dtype,
            ),
            t("double_blocks.0.img_mlp.2.weight", &[3072, 12288], dtype),
            t("img_in.weight", &[3072, 64], dtype),
            t("final_layer.linear.weight", &[64, 3072], dtype),
            t("single_blocks.0.linear2.weight", &[3072, 15360], dtype),
            t("single_blocks.0.odd.weight", &[64, 100], dtype),
            t("tiny.weight", &[16, 16], dtype),
        ]
    }

    #[test]
    fn flux_q4_k_m_types() {
        let plan = plan(&flux_like(F32), None, FileType::Q4KM).unwrap();
        assert_eq!(plan.arch, Arch::Flux);
        assert_eq!(
            type_of(&plan, "double_blocks.0.img_attn.proj.weight"),
            GgmlType::Q4K
        );
        assert_eq!(
            type_of(&plan, "double_blocks.0.img_attn.qkv.weight"),
            GgmlType::Q5K
        );
        assert_eq!(
            type_of(&plan, "double_blocks.0.img_attn.qkv.bias"),
            GgmlType::F32
        );
        assert_eq!(
            type_of(&plan, "double_blocks.0.img_attn.norm.key_norm.scale"),
            GgmlType::F32
        );
        // Flux's MLP down matches no FFN pattern.
        assert_eq!(
            type_of(&plan, "double_blocks.0.img_mlp.2.weight"),
            GgmlType::Q4K
        );
        // Blacklisted: keeps the F16 base of an F32 source.
        assert_eq!(type_of(&plan, "img_in.weight"), GgmlType::F16);
        assert_eq!(type_of(&plan, "final_layer.linear.weight"), GgmlType::F16);
        assert_eq!(
            type_of(&plan, "single_blocks.0.linear2.weight"),
            GgmlType::Q4K
        );
        // Row of 100: the K-quant fallback is F16.
        assert_eq!(type_of(&plan, "single_blocks.0.odd.weight"), GgmlType::F16);
        assert_eq!(
            plan.fallbacks,
            ["single_blocks.0.odd.weight", "tiny.weight"]
        );
        // <= 1024 elements: F32 base, then row 16 cannot hold a K block -> F16.
        let tiny = plan
            .tensors
            .iter()
            .find(|p| p.name == "tiny.weight")
            .unwrap();
        assert_eq!(
            (tiny.base_type, tiny.ggml_type),
            (GgmlType::F32, GgmlType::F16)
        );
        // llama-quantize order: sorted names.
        let names: Vec<_> = plan.tensors.iter().map(|p| p.name.clone()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        let keys: Vec<_> = plan.metadata.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "general.architecture",
                "general.quantization_version",
                "general.file_type"
            ]
        );
        assert_eq!(plan.metadata[2].1, MetadataValue::U32(15));
    }

    #[test]
    fn bf16_source_keeps_bf16_base_and_f16_source_keeps_f16_for_small_tensors() {
        let plan = plan(&flux_like(SourceDtype::BF16), None, FileType::Q8_0).unwrap();
        assert_eq!(type_of(&plan, "img_in.weight"), GgmlType::BF16);
        assert_eq!(
            type_of(&plan, "double_blocks.0.img_attn.qkv.bias"),
            GgmlType::F32
        );
        assert_eq!(
            type_of(&plan, "double_blocks.0.img_attn.qkv.weight"),
            GgmlType::Q8_0
        );
        let plan = plan_f16();
        assert_eq!(
            type_of(&plan, "double_blocks.0.img_attn.qkv.bias"),
            GgmlType::F16
        );
    }

    fn plan_f16() -> GgufPlan {
        plan(&flux_like(SourceDtype::F16), None, FileType::Q8_0).unwrap()
    }

    #[test]
    fn legacy_fallback_keeps_base_and_ffn_down_upgrades() {
        let tensors = vec![
            t("double_blocks.0.img_attn.proj.weight", &[64, 64], F32),
            t("double_blocks.0.img_attn.x.weight", &[64, 48], F32),
            t("blocks.0.ffn.2.weight", &[64, 64], F32),
        ];
        let plan = plan(&tensors, Some(Arch::Flux), FileType::Q4_0).unwrap();
        assert_eq!(
            type_of(&plan, "double_blocks.0.img_attn.proj.weight"),
            GgmlType::Q4_0
        );
        assert_eq!(
            type_of(&plan, "double_blocks.0.img_attn.x.weight"),
            GgmlType::F16
        );
        assert_eq!(type_of(&plan, "blocks.0.ffn.2.weight"), GgmlType::Q4_1);
    }

    #[test]
    fn q3_k_m_upgrades_only_the_first_two_v_projections_in_file_order() {
        let tensors = vec![
            t("input_blocks.3.0.op.weight", &[320, 320, 3, 3], F32),
            t("input_blocks.6.0.op.weight", &[640, 640, 3, 3], F32),
            t("output_blocks.2.2.conv.weight", &[1280, 1280, 3, 3], F32),
            t("output_blocks.5.2.conv.weight", &[1280, 1280, 3, 3], F32),
            t("label_emb.0.0.weight", &[1280, 2816], F32),
            t("b.attn1.to_v.weight", &[512, 512], F32),
            t("a.attn1.to_v.weight", &[512, 512], F32),
            t("c.attn1.to_v.weight", &[512, 512], F32),
        ];
        let plan = plan(&tensors, None, FileType::Q3KM).unwrap();
        assert_eq!(plan.arch, Arch::Sdxl);
        assert_eq!(type_of(&plan, "a.attn1.to_v.weight"), GgmlType::Q5K);
        assert_eq!(type_of(&plan, "b.attn1.to_v.weight"), GgmlType::Q5K);
        assert_eq!(type_of(&plan, "c.attn1.to_v.weight"), GgmlType::Q4K);
    }

    #[test]
    fn sd_convolutions_are_flattened_with_their_original_shape_recorded() {
        let tensors = vec![
            t("input_blocks.0.0.weight", &[320, 4, 3, 3], F32),
            t("input_blocks.3.0.op.weight", &[320, 320, 3, 3], F32),
            t("input_blocks.6.0.op.weight", &[640, 640, 3, 3], F32),
            t("input_blocks.9.0.op.weight", &[1280, 1280, 3, 3], F32),
            t("output_blocks.2.1.conv.weight", &[1280, 1280, 3, 3], F32),
            t("output_blocks.5.2.conv.weight", &[1280, 1280, 3, 3], F32),
            t("output_blocks.8.2.conv.weight", &[640, 640, 3, 3], F32),
            t("middle_block.1.proj_in.weight", &[1280, 320], F32),
            t("middle_block.1.norm.weight", &[1280], F32),
        ];
        let plan = plan(&tensors, None, FileType::Q4KS).unwrap();
        assert_eq!(plan.arch, Arch::Sd1);
        let conv = plan
            .tensors
            .iter()
            .find(|p| p.name == "input_blocks.3.0.op.weight")
            .unwrap();
        assert_eq!(conv.shape, vec![3600, 256]);
        assert_eq!(conv.orig_shape, Some(vec![320, 320, 3, 3]));
        assert_eq!(conv.ggml_type, GgmlType::Q4K);
        // [320, 4, 3, 3] has 11520 elements = 45 * 256: flattened, but excluded by name.
        let first = plan
            .tensors
            .iter()
            .find(|p| p.name == "input_blocks.0.0.weight")
            .unwrap();
        assert_eq!(first.ggml_type, GgmlType::F16);
        assert!(first.orig_shape.is_some());
        let key = "comfy.gguf.orig_shape.input_blocks.3.0.op.weight";
        let (_, v) = plan.metadata.iter().find(|(k, _)| k == key).unwrap();
        assert_eq!(
            *v,
            MetadataValue::Array([320, 320, 3, 3].map(MetadataValue::I32).to_vec())
        );
        // llama-quantize b3962 re-sets the two keys in place: orig shapes stay last.
        let keys: Vec<_> = plan.metadata.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            &keys[..3],
            [
                "general.architecture",
                "general.quantization_version",
                "general.file_type"
            ]
        );
        assert_eq!(keys.len(), 3 + 8);
        assert!(
            keys[3..]
                .iter()
                .all(|k| k.starts_with("comfy.gguf.orig_shape."))
        );
        assert_eq!(type_of(&plan, "middle_block.1.norm.weight"), GgmlType::F32);
    }

    #[test]
    fn five_dim_tensors_are_f32_after_their_bias() {
        let tensors = vec![
            t("blocks.0.self_attn.norm_q.weight", &[1536], F32),
            t("text_embedding.2.weight", &[1536, 1536], F32),
            t("head.modulation", &[1, 2, 1536], F32),
            t("patch_embedding.weight", &[1536, 16, 1, 2, 2], F32),
            t("patch_embedding.bias", &[1536], F32),
            t("blocks.0.self_attn.v.weight", &[1536, 1536], F32),
        ];
        let plan = plan(&tensors, None, FileType::Q4KM).unwrap();
        assert_eq!(plan.arch, Arch::Wan);
        let i = plan
            .tensors
            .iter()
            .position(|p| p.name == "patch_embedding.bias")
            .unwrap();
        let five = &plan.tensors[i + 1];
        assert_eq!(five.name, "patch_embedding.weight");
        assert_eq!(five.ggml_type, GgmlType::F32);
        assert_eq!(five.ggml_dims(), vec![2, 2, 1, 16, 1536]);
        assert_eq!(type_of(&plan, "blocks.0.self_attn.v.weight"), GgmlType::Q6K);
        assert_eq!(type_of(&plan, "head.modulation"), GgmlType::F32);
        assert_eq!(type_of(&plan, "text_embedding.2.weight"), GgmlType::F16);
    }

    #[test]
    fn prefix_is_stripped_and_other_components_dropped() {
        let tensors = vec![
            t(
                "model.diffusion_model.double_blocks.0.img_attn.proj.weight",
                &[256, 256],
                F32,
            ),
            t(
                "first_stage_model.decoder.conv_in.weight",
                &[512, 4, 3, 3],
                F32,
            ),
            t("model.diffusion_model.img_in.weight", &[256, 64], F32),
        ];
        let plan = plan(&tensors, None, FileType::MostlyF16).unwrap();
        let names: Vec<_> = plan.tensors.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["double_blocks.0.img_attn.proj.weight", "img_in.weight"]
        );
        assert_eq!(plan.dropped.len(), 1);
        assert_eq!(
            plan.dropped[0].name,
            "first_stage_model.decoder.conv_in.weight"
        );
        assert!(plan.tensors.iter().all(|p| p.ggml_type == GgmlType::F16));
        let keys: Vec<_> = plan.metadata.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "general.architecture",
                "general.quantization_version",
                "general.file_type"
            ]
        );
    }

    #[test]
    fn plain_targets_keep_file_order_and_quantized_targets_sort_by_name() {
        // Data-offset order of a mixed file: 4-byte dtypes first.
        let tensors = vec![
            t("img_in.bias", &[64], F32),
            t("double_blocks.0.img_attn.proj.bias", &[64], F32),
            t("img_in.weight", &[64, 64], SourceDtype::BF16),
            t(
                "double_blocks.0.img_attn.proj.weight",
                &[256, 256],
                SourceDtype::BF16,
            ),
        ];
        let names = |p: &GgufPlan| p.tensors.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        let plain = plan(&tensors, None, FileType::MostlyBF16).unwrap();
        assert_eq!(
            names(&plain),
            tensors
                .iter()
                .map(|t| t.name.to_owned())
                .collect::<Vec<_>>()
        );
        let quant = plan(&tensors, None, FileType::Q8_0).unwrap();
        let mut sorted = names(&plain);
        sorted.sort();
        assert_eq!(names(&quant), sorted);
    }

    /// A T5 v1.1 XXL encoder's tensors (ComfyUI keys, real shapes; no data is planned).
    fn t5_xxl(blocks: usize) -> Vec<(String, Vec<u64>)> {
        let (d, inner, ff) = (4096, 4096, 10240);
        let mut v = vec![("shared.weight".to_owned(), vec![32128, d])];
        for b in 0..blocks {
            let p = format!("encoder.block.{b}.layer");
            for m in ["q", "k", "v"] {
                v.push((format!("{p}.0.SelfAttention.{m}.weight"), vec![inner, d]));
            }
            v.push((format!("{p}.0.SelfAttention.o.weight"), vec![d, inner]));
            if b == 0 {
                v.push((
                    format!("{p}.0.SelfAttention.relative_attention_bias.weight"),
                    vec![32, 64],
                ));
            }
            v.push((format!("{p}.0.layer_norm.weight"), vec![d]));
            v.push((format!("{p}.1.DenseReluDense.wi_0.weight"), vec![ff, d]));
            v.push((format!("{p}.1.DenseReluDense.wi_1.weight"), vec![ff, d]));
            v.push((format!("{p}.1.DenseReluDense.wo.weight"), vec![d, ff]));
            v.push((format!("{p}.1.layer_norm.weight"), vec![d]));
        }
        v.push(("encoder.final_layer_norm.weight".to_owned(), vec![d]));
        v
    }

    fn plan_owned(tensors: &[(String, Vec<u64>)], target: FileType) -> GgufPlan {
        let inputs: Vec<_> = tensors
            .iter()
            .map(|(n, s)| t(n, s, SourceDtype::F16))
            .collect();
        plan(&inputs, None, target).unwrap()
    }

    #[test]
    fn use_more_bits_is_llama_cpps() {
        // llama-quant.cpp: i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2.
        let more: Vec<usize> = (0..24).filter(|&i| use_more_bits(i, 24)).collect();
        assert_eq!(more, [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]);
        let more: Vec<usize> = (0..2).filter(|&i| use_more_bits(i, 2)).collect();
        assert_eq!(more, [1]);
    }

    #[test]
    fn t5_xxl_q4_k_m_follows_llama_quantize_on_real_shapes() {
        let plan = plan_owned(&t5_xxl(24), FileType::Q4KM);
        assert_eq!(plan.arch, Arch::T5xxl);
        assert!(plan.fallbacks.is_empty(), "{:?}", plan.fallbacks);
        // llama-quantize types in name order (enc.blk.0, 1, 10, ..., 19, 2, 20, ..., 23, 3,
        // ..., 9): use_more_bits' positions 0, 1, 2, 5, 8, ... are these blocks.
        let q6 = |kind: &str| -> Vec<usize> {
            let mut b: Vec<usize> = (0..24)
                .filter(|b| type_of(&plan, &format!("enc.blk.{b}.{kind}.weight")) == GgmlType::Q6K)
                .collect();
            b.sort_unstable();
            b
        };
        let want = [0, 1, 3, 6, 7, 8, 9, 10, 13, 16, 19, 21];
        assert_eq!(q6("attn_v"), want);
        assert_eq!(q6("ffn_down"), want);
        assert_eq!(type_of(&plan, "enc.blk.2.attn_v.weight"), GgmlType::Q4K);
        assert_eq!(type_of(&plan, "enc.blk.5.attn_o.weight"), GgmlType::Q4K);
        assert_eq!(type_of(&plan, "token_embd.weight"), GgmlType::Q6K);
        assert_eq!(type_of(&plan, "enc.blk.0.attn_rel_b.weight"), GgmlType::F16);
        // An F16 source's norms are F32, as llama.cpp's converter stores them.
        assert_eq!(type_of(&plan, "enc.output_norm.weight"), GgmlType::F32);
        assert_eq!(type_of(&plan, "enc.blk.3.ffn_norm.weight"), GgmlType::F32);
        // Q3_K_M: the first two attn_v in name order (blocks 0 and 1) Q5_K; ffn_down of the
        // first 24/16 = 1 Q5_K, the rest Q4_K.
        let plan = plan_owned(&t5_xxl(24), FileType::Q3KM);
        assert_eq!(type_of(&plan, "enc.blk.1.attn_v.weight"), GgmlType::Q5K);
        assert_eq!(type_of(&plan, "enc.blk.10.attn_v.weight"), GgmlType::Q4K);
        assert_eq!(type_of(&plan, "enc.blk.0.ffn_down.weight"), GgmlType::Q5K);
        assert_eq!(type_of(&plan, "enc.blk.1.ffn_down.weight"), GgmlType::Q4K);
        assert_eq!(type_of(&plan, "token_embd.weight"), GgmlType::Q6K);
        let keys: Vec<_> = plan.metadata.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.contains(&"t5encoder.block_count"));
        let blocks = plan
            .metadata
            .iter()
            .find(|(k, _)| k == "t5encoder.block_count")
            .map(|(_, v)| v.clone());
        assert_eq!(blocks, Some(MetadataValue::U32(24)));
    }

    #[test]
    fn llama_cpp_rows_no_type_fits_are_f16() {
        // llama.cpp has no fallback for the 32-element block types and refuses the file;
        // convcache stores F16 (its last resort for K-quants) and reports it.
        let mut tensors = t5_xxl(1);
        for (n, s) in &mut tensors {
            if n.ends_with("DenseReluDense.wo.weight") {
                *s = vec![4096, 48];
            }
            if n.ends_with("wi_0.weight") || n.ends_with("wi_1.weight") {
                *s = vec![48, 4096];
            }
        }
        for target in [FileType::Q8_0, FileType::Q4KM] {
            let plan = plan_owned(&tensors, target);
            assert_eq!(
                type_of(&plan, "enc.blk.0.ffn_down.weight"),
                GgmlType::F16,
                "{target}"
            );
            assert_eq!(plan.fallbacks, ["enc.blk.0.ffn_down.weight"], "{target}");
            assert!(plan.warnings()[0].contains("llama.cpp's fallback"));
        }
    }

    #[test]
    fn source_dtypes_follow_convert_py() {
        let st = |d| SourceDtype::of(Stored::Safetensors(d));
        assert_eq!(st(Dtype::F8E5M2), SourceDtype::F8);
        assert_eq!(st(Dtype::I64), SourceDtype::NonFloat);
        assert_eq!(st(Dtype::F4), SourceDtype::Unsupported);
        assert_eq!(st(Dtype::BF16), SourceDtype::BF16);
        assert_eq!(st(Dtype::F64), SourceDtype::F16);
        let gg = |t| SourceDtype::of(Stored::Ggml(t));
        assert_eq!(gg(GgmlType::BF16), SourceDtype::BF16);
        assert_eq!(gg(GgmlType::Q4K), SourceDtype::F32);
    }

    #[test]
    fn refusals_and_drops() {
        let tensors = vec![
            t("double_blocks.0.img_attn.proj.weight", &[256, 256], F32),
            t("scaled_fp8", &[0], SourceDtype::F8),
            t("text_position_ids", &[1, 77], SourceDtype::NonFloat),
            t("logit_scale", &[], F32),
        ];
        let plan = plan(&tensors, None, FileType::Q8_0).unwrap();
        let dropped: Vec<_> = plan.dropped.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(dropped, ["scaled_fp8", "text_position_ids"]);
        let scalar = plan
            .tensors
            .iter()
            .find(|p| p.name == "logit_scale")
            .unwrap();
        assert_eq!(
            (scalar.shape.as_slice(), scalar.ggml_type),
            (&[1u64][..], GgmlType::F32)
        );
        let bad = vec![
            t("double_blocks.0.img_attn.proj.weight", &[256, 256], F32),
            t("step", &[1], SourceDtype::Unsupported),
        ];
        assert!(matches!(
            super::plan(&bad, None, FileType::Q8_0),
            Err(PlanError::UnsupportedDtype { .. })
        ));
        let unknown = vec![t("foo.weight", &[256, 256], F32)];
        assert!(matches!(
            super::plan(&unknown, None, FileType::Q8_0),
            Err(PlanError::Arch(arch::ArchError::Unknown))
        ));
        let huge = vec![t(
            "double_blocks.0.img_attn.proj.weight",
            &[u64::MAX, 4],
            F32,
        )];
        assert!(matches!(
            super::plan(&huge, None, FileType::Q8_0),
            Err(PlanError::ShapeOverflow { .. })
        ));
    }
}
