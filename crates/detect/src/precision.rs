//! The precision vocabulary.
//!
//! One enum for every precision convcache detects or targets. Each has one canonical name —
//! the one output file names use — and parsing accepts the aliases users type.

use std::fmt;
use std::str::FromStr;

use tensorfile::gguf::{FileType, GgmlType};

use tensorfile::safetensors::Dtype;

/// A precision a model file can be in, or a conversion can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Precision {
    /// IEEE float32 (`fp32`).
    Fp32,
    /// IEEE float16 (`fp16`).
    Fp16,
    /// bfloat16 (`bf16`).
    Bf16,
    /// float8 e4m3fn, finite-only, max 448 (`fp8_e4m3fn`; `fp8` is an alias).
    Fp8E4m3fn,
    /// float8 e5m2 (`fp8_e5m2`).
    Fp8E5m2,
    /// bitsandbytes NF4.
    Nf4,
    /// bitsandbytes FP4.
    Fp4,
    /// LLM.int8 (row-wise absmax int8, bitsandbytes layout).
    Int8,
    /// ComfyUI fp8 with a per-tensor scale (`fp8_scaled`): `comfy_quant` `float8_e4m3fn` layers
    /// (`weight` F8_E4M3, `weight_scale` F32), or the legacy `scaled_fp8` layout.
    Fp8Scaled,
    /// ComfyUI / comfy-kitchen NVFP4 (`nvfp4`): E2M1 weights in blocks of 16 with E4M3 block
    /// scales and a per-tensor scale.
    Nvfp4,
    /// ComfyUI / comfy-kitchen MXFP8 (`mxfp8`): E4M3 weights in blocks of 32 with E8M0 block
    /// scales.
    Mxfp8,
    /// A GGUF file of this llama file type (a quantization mix, or plain F32/F16/BF16 GGUF).
    Gguf(FileType),
}

/// The safetensors precisions and the tensor dtype each stands for, in both directions.
const SAFETENSORS_DTYPES: [(Precision, Dtype); 5] = [
    (Precision::Fp32, Dtype::F32),
    (Precision::Fp16, Dtype::F16),
    (Precision::Bf16, Dtype::BF16),
    (Precision::Fp8E4m3fn, Dtype::F8E4M3),
    (Precision::Fp8E5m2, Dtype::F8E5M2),
];

/// The container a precision lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Container {
    /// A `.safetensors` file.
    Safetensors,
    /// A `.gguf` file.
    Gguf,
}

impl Precision {
    /// Every precision, safetensors ones first.
    pub fn all() -> impl Iterator<Item = Precision> {
        [
            Precision::Fp32,
            Precision::Fp16,
            Precision::Bf16,
            Precision::Fp8E4m3fn,
            Precision::Fp8E5m2,
            Precision::Nf4,
            Precision::Fp4,
            Precision::Int8,
            Precision::Fp8Scaled,
            Precision::Nvfp4,
            Precision::Mxfp8,
        ]
        .into_iter()
        .chain(FileType::ALL.into_iter().map(Precision::Gguf))
    }

    /// The canonical name: used in output file names and JSON.
    ///
    /// GGUF precisions use ggml's spelling (`Q4_K_M`, `F16`); plain-float GGUF targets are
    /// typed `gguf_f16` on the command line so they never collide with safetensors `fp16`.
    pub fn canonical_name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
            Precision::Fp8E4m3fn => "fp8_e4m3fn",
            Precision::Fp8E5m2 => "fp8_e5m2",
            Precision::Nf4 => "nf4",
            Precision::Fp4 => "fp4",
            Precision::Int8 => "int8",
            Precision::Fp8Scaled => "fp8_scaled",
            Precision::Nvfp4 => "nvfp4",
            Precision::Mxfp8 => "mxfp8",
            Precision::Gguf(t) => t.name(),
        }
    }

    /// The container an output of this precision is written in.
    pub fn container(self) -> Container {
        match self {
            Precision::Gguf(_) => Container::Gguf,
            _ => Container::Safetensors,
        }
    }

    /// Whether this is a bitsandbytes precision.
    pub fn is_bitsandbytes(self) -> bool {
        matches!(self, Precision::Nf4 | Precision::Fp4 | Precision::Int8)
    }

    /// Whether this is one of ComfyUI's quantized layouts (`fp8_scaled`, `nvfp4`, `mxfp8`):
    /// safetensors files whose quantized layers carry a `comfy_quant` format and scales.
    pub fn is_comfy_quant(self) -> bool {
        matches!(
            self,
            Precision::Fp8Scaled | Precision::Nvfp4 | Precision::Mxfp8
        )
    }

    /// The comfy_quant precision of a file whose quantized layers are mostly in this
    /// `comfy_quant` format (`float8_e4m3fn`, `float8_e5m2`, `nvfp4`, `mxfp8`): both fp8
    /// flavours are `fp8_scaled`, as ComfyUI runs them on the same GPUs.
    pub fn from_comfy_quant_format(format: &str) -> Option<Precision> {
        match format {
            "float8_e4m3fn" | "float8_e5m2" => Some(Precision::Fp8Scaled),
            "nvfp4" => Some(Precision::Nvfp4),
            "mxfp8" => Some(Precision::Mxfp8),
            _ => None,
        }
    }

    /// A name that [`FromStr`] parses back to this precision: the canonical name, except
    /// `gguf_f32`/`gguf_f16`/`gguf_bf16` for the plain-float GGUF file types (whose canonical
    /// names `F32`/`F16`/`BF16` parse as the safetensors precisions).
    pub fn target_name(self) -> &'static str {
        match self {
            Precision::Gguf(FileType::AllF32) => "gguf_f32",
            Precision::Gguf(FileType::MostlyF16) => "gguf_f16",
            Precision::Gguf(FileType::MostlyBF16) => "gguf_bf16",
            p => p.canonical_name(),
        }
    }

    /// The safetensors precision a tensor dtype stands for, when convcache has one:
    /// F32, F16, BF16, F8_E4M3 and F8_E5M2. Integer dtypes, F64 and the newer F8/F6/F4
    /// formats have none.
    pub fn from_safetensors_dtype(dtype: Dtype) -> Option<Precision> {
        SAFETENSORS_DTYPES
            .iter()
            .find(|&&(_, d)| d == dtype)
            .map(|&(p, _)| p)
    }

    /// The dtype a safetensors output in this precision holds its converted tensors in (the
    /// inverse of [`Precision::from_safetensors_dtype`]); `None` for bitsandbytes and GGUF.
    pub fn safetensors_dtype(self) -> Option<Dtype> {
        SAFETENSORS_DTYPES
            .iter()
            .find(|&&(p, _)| p == self)
            .map(|&(_, d)| d)
    }

    /// The dtype a dequantization (of a GGUF or bitsandbytes file) to this precision writes:
    /// F32, F16 or BF16. fp8 is not a dequantization target.
    pub fn dequantization_dtype(self) -> Option<Dtype> {
        match self {
            Precision::Fp32 | Precision::Fp16 | Precision::Bf16 => self.safetensors_dtype(),
            _ => None,
        }
    }

    /// The GGUF file type a file is in when most of its bytes are tensors of `ggml_type`
    /// (used when `general.file_type` is absent). The K-quant mixes are ambiguous from one
    /// tensor type; the `_M` mix is reported, as llama-quantize names `Q4_K` = `Q4_K_M`.
    pub fn gguf_from_dominant_type(ggml_type: GgmlType) -> Precision {
        Precision::Gguf(match ggml_type {
            GgmlType::F32 => FileType::AllF32,
            GgmlType::F16 => FileType::MostlyF16,
            GgmlType::BF16 => FileType::MostlyBF16,
            GgmlType::Q4_0 => FileType::Q4_0,
            GgmlType::Q4_1 => FileType::Q4_1,
            GgmlType::Q5_0 => FileType::Q5_0,
            GgmlType::Q5_1 => FileType::Q5_1,
            GgmlType::Q8_0 => FileType::Q8_0,
            GgmlType::Q2K => FileType::Q2K,
            GgmlType::Q3K => FileType::Q3KM,
            GgmlType::Q4K => FileType::Q4KM,
            GgmlType::Q5K => FileType::Q5KM,
            GgmlType::Q6K => FileType::Q6K,
        })
    }

    /// Parses a name that appears as a file-name suffix in `container` (exact canonical
    /// name for safetensors; case-insensitive ggml name for GGUF).
    pub fn from_suffix(suffix: &str, container: Container) -> Option<Precision> {
        match container {
            Container::Safetensors => Precision::all()
                .filter(|p| p.container() == Container::Safetensors)
                .find(|p| p.canonical_name() == suffix),
            Container::Gguf => suffix.parse::<FileType>().ok().map(Precision::Gguf),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.canonical_name())
    }
}

/// A precision name nobody knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown precision `{0}` (known: fp32, fp16, bf16, fp8_e4m3fn, fp8_e5m2, nf4, fp4, int8, \
     fp8_scaled, nvfp4, mxfp8, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, \
     Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, gguf_f32, gguf_f16, gguf_bf16)"
)]
pub struct PrecisionParseError(pub String);

impl FromStr for Precision {
    type Err = PrecisionParseError;

    /// Accepts canonical names and aliases, case-insensitively, with `-` and `_` equivalent.
    ///
    /// Bare `f16`/`F16` and `f32` mean the safetensors precisions (that is what people type);
    /// plain-float GGUF targets are `gguf_f32`, `gguf_f16`, `gguf_bf16`. Quantized GGUF names
    /// may carry a `gguf_` prefix, and `Q3_K`, `Q4_K`, `Q5_K` mean their `_M` mixes, as in
    /// llama-quantize.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase().replace('-', "_");
        let p = match lower.as_str() {
            "fp32" | "float32" | "f32" | "float" => Precision::Fp32,
            "fp16" | "float16" | "half" | "f16" => Precision::Fp16,
            "bf16" | "bfloat16" => Precision::Bf16,
            "fp8" | "float8" | "fp8_e4m3fn" | "fp8_e4m3" | "float8_e4m3fn" | "f8_e4m3"
            | "e4m3fn" | "e4m3" => Precision::Fp8E4m3fn,
            "fp8_e5m2" | "float8_e5m2" | "f8_e5m2" | "e5m2" => Precision::Fp8E5m2,
            "nf4" | "bnb_nf4" => Precision::Nf4,
            "fp4" | "bnb_fp4" => Precision::Fp4,
            "int8" | "uint8" | "i8" | "u8" | "llm.int8" | "llm_int8" | "bnb_int8" => {
                Precision::Int8
            }
            "fp8_scaled" | "fp8scaled" | "fp8_e4m3fn_scaled" | "float8_e4m3fn_scaled" => {
                Precision::Fp8Scaled
            }
            "nvfp4" => Precision::Nvfp4,
            "mxfp8" => Precision::Mxfp8,
            "gguf_f32" => Precision::Gguf(FileType::AllF32),
            "gguf_f16" => Precision::Gguf(FileType::MostlyF16),
            "gguf_bf16" => Precision::Gguf(FileType::MostlyBF16),
            other => {
                let bare = other.strip_prefix("gguf_").unwrap_or(other);
                let mix = match bare {
                    "q3_k" => "q3_k_m",
                    "q4_k" => "q4_k_m",
                    "q5_k" => "q5_k_m",
                    b => b,
                };
                match mix.parse::<FileType>() {
                    // Only quantized mixes parse here: the plain-float spellings are above.
                    Ok(t) if t.base_type().is_quantized() => Precision::Gguf(t),
                    _ => return Err(PrecisionParseError(s.to_owned())),
                }
            }
        };
        Ok(p)
    }
}

impl serde::Serialize for Precision {
    /// As its canonical name: the stable JSON spelling.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.canonical_name())
    }
}

/// Why a conversion is unnecessary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The source already is in the target precision and container.
    AlreadyTarget,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::AlreadyTarget => {
                f.write_str("the source already is in the target precision")
            }
        }
    }
}

/// Whether converting a `source` file to `target` is unnecessary, and why.
///
/// Aliases need no special case: every spelling of a precision (`fp8`, `FP8_E4M3FN`,
/// `uint8`/`int8`, `q4_k_m`/`Q4_K_M`/`gguf_q4_k_m`) parses to the same [`Precision`] value.
/// The container is part of the value, so a safetensors fp16 source and a `gguf_f16` target
/// are different (a conversion is needed), while a GGUF file whose `general.file_type` is F16
/// (detected as `Precision::Gguf(FileType::MostlyF16)`) is already a `gguf_f16` target.
/// Likewise a ComfyUI quantized file is detected as its layout (`fp8_scaled` for fp8
/// `comfy_quant` and legacy `scaled_fp8` files, `nvfp4`, `mxfp8`), not as the dtype its weights
/// are stored in: it is already a target of that layout, and never of a plain `fp8_e4m3fn`.
pub fn should_skip(source: Precision, target: Precision) -> Option<SkipReason> {
    (source == target).then_some(SkipReason::AlreadyTarget)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names_parse_back() {
        for p in Precision::all() {
            let name = match p {
                Precision::Gguf(FileType::AllF32) => "gguf_f32",
                Precision::Gguf(FileType::MostlyF16) => "gguf_f16",
                Precision::Gguf(FileType::MostlyBF16) => "gguf_bf16",
                _ => p.canonical_name(),
            };
            assert_eq!(name.parse::<Precision>(), Ok(p), "{name}");
            assert_eq!(
                Precision::from_suffix(p.canonical_name(), p.container()),
                Some(p)
            );
        }
    }

    #[test]
    fn aliases() {
        assert_eq!("fp8".parse(), Ok(Precision::Fp8E4m3fn));
        assert_eq!("FP8".parse(), Ok(Precision::Fp8E4m3fn));
        assert_eq!("float16".parse(), Ok(Precision::Fp16));
        assert_eq!("half".parse(), Ok(Precision::Fp16));
        assert_eq!("bfloat16".parse(), Ok(Precision::Bf16));
        assert_eq!("f32".parse(), Ok(Precision::Fp32));
        assert_eq!("uint8".parse(), Ok(Precision::Int8));
        assert_eq!("q4_k_m".parse(), Ok(Precision::Gguf(FileType::Q4KM)));
        assert!("q4_k_x".parse::<Precision>().is_err());
    }

    #[test]
    fn comfy_quant_targets() {
        for alias in [
            "fp8_scaled",
            "FP8_SCALED",
            "fp8-scaled",
            "fp8scaled",
            "fp8_e4m3fn_scaled",
            "Float8_E4M3FN_Scaled",
        ] {
            assert_eq!(alias.parse(), Ok(Precision::Fp8Scaled), "{alias}");
        }
        assert_eq!("NVFP4".parse(), Ok(Precision::Nvfp4));
        assert_eq!("mxfp8".parse(), Ok(Precision::Mxfp8));
        for p in [Precision::Fp8Scaled, Precision::Nvfp4, Precision::Mxfp8] {
            assert!(p.is_comfy_quant() && !p.is_bitsandbytes());
            assert_eq!(p.container(), Container::Safetensors);
            // Not a plain dtype: the precision converter does not claim them.
            assert_eq!(p.safetensors_dtype(), None);
            assert_eq!(p.dequantization_dtype(), None);
        }
        assert_eq!(
            Precision::from_comfy_quant_format("float8_e5m2"),
            Some(Precision::Fp8Scaled)
        );
        assert_eq!(Precision::from_comfy_quant_format("int8_tensorwise"), None);
        assert!(should_skip(Precision::Nvfp4, Precision::Nvfp4).is_some());
        assert!(should_skip(Precision::Fp8Scaled, Precision::Fp8E4m3fn).is_none());
    }

    #[test]
    fn safetensors_dtypes_map_both_ways() {
        for p in Precision::all() {
            match p.safetensors_dtype() {
                Some(d) => assert_eq!(Precision::from_safetensors_dtype(d), Some(p)),
                None => assert!(
                    p.is_bitsandbytes() || p.is_comfy_quant() || p.container() == Container::Gguf
                ),
            }
        }
        assert_eq!(
            Precision::Fp8E4m3fn.safetensors_dtype(),
            Some(Dtype::F8E4M3)
        );
        assert_eq!(Precision::from_safetensors_dtype(Dtype::F64), None);
        assert_eq!(Precision::Bf16.dequantization_dtype(), Some(Dtype::BF16));
        assert_eq!(Precision::Fp8E5m2.dequantization_dtype(), None);
        assert_eq!(Precision::Nf4.dequantization_dtype(), None);
    }

    #[test]
    fn skip_only_when_equal() {
        assert!(should_skip(Precision::Fp16, Precision::Fp16).is_some());
        assert!(should_skip(Precision::Fp16, Precision::Gguf(FileType::MostlyF16)).is_none());
    }
}
