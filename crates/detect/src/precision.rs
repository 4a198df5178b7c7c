//! The precision vocabulary.
//!
//! One enum for every precision convcache detects or targets. Each has one canonical name —
//! the one output file names use — and parsing accepts the aliases users type.

use std::fmt;
use std::str::FromStr;

use gguf::FileType;

/// A precision a model file can be in, or a conversion can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
    Fp8E4m3fn,
    Fp8E5m2,
    /// bitsandbytes NF4.
    Nf4,
    /// bitsandbytes FP4.
    Fp4,
    /// LLM.int8 (row-wise absmax int8, bitsandbytes layout).
    Int8,
    /// A GGUF file of this llama file type (a quantization mix, or plain F32/F16/BF16 GGUF).
    Gguf(FileType),
}

/// The container a precision lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Container {
    Safetensors,
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
     Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, \
     Q5_K_M, Q6_K, gguf_f32, gguf_f16, gguf_bf16)"
)]
pub struct PrecisionParseError(pub String);

impl FromStr for Precision {
    type Err = PrecisionParseError;

    /// Accepts canonical names and aliases, case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        let p = match lower.as_str() {
            "fp32" | "float32" | "f32" | "float" => Precision::Fp32,
            "fp16" | "float16" | "half" => Precision::Fp16,
            "bf16" | "bfloat16" => Precision::Bf16,
            "fp8" | "fp8_e4m3fn" | "fp8_e4m3" | "float8_e4m3fn" | "f8_e4m3" | "e4m3fn" => {
                Precision::Fp8E4m3fn
            }
            "fp8_e5m2" | "float8_e5m2" | "f8_e5m2" | "e5m2" => Precision::Fp8E5m2,
            "nf4" | "bnb_nf4" => Precision::Nf4,
            "fp4" | "bnb_fp4" => Precision::Fp4,
            "int8" | "uint8" | "i8" | "u8" | "llm.int8" | "llm_int8" | "bnb_int8" => {
                Precision::Int8
            }
            "gguf_f32" => Precision::Gguf(FileType::AllF32),
            "gguf_f16" => Precision::Gguf(FileType::MostlyF16),
            "gguf_bf16" => Precision::Gguf(FileType::MostlyBF16),
            other => match other.parse::<FileType>() {
                // Plain F32/F16/BF16 spelled bare are safetensors precisions above (f32) or
                // ambiguous (f16, bf16 -> bf16 handled above); only quantized mixes parse here.
                Ok(t) if t.base_type().is_quantized() => Precision::Gguf(t),
                Ok(FileType::MostlyF16) => Precision::Fp16,
                _ => return Err(PrecisionParseError(s.to_owned())),
            },
        };
        Ok(p)
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
            SkipReason::AlreadyTarget => f.write_str("the source already is in the target precision"),
        }
    }
}

/// Whether converting a `source` file to `target` is unnecessary, and why.
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
            assert_eq!(Precision::from_suffix(p.canonical_name(), p.container()), Some(p));
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
    fn skip_only_when_equal() {
        assert!(should_skip(Precision::Fp16, Precision::Fp16).is_some());
        assert!(should_skip(Precision::Fp16, Precision::Gguf(FileType::MostlyF16)).is_none());
    }
}
