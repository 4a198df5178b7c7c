//! The ggml vocabulary: tensor types and llama file types.
//!
//! Ids come from ggml's `enum ggml_type` and gguf-py's `LlamaFileType`; a file type is what
//! `general.file_type` holds (llama's numbering, not ggml's own `ggml_ftype`).

use std::fmt;
use std::str::FromStr;

/// A ggml tensor type that convcache reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 half precision.
    F16,
    /// 32-value blocks: an f16 scale `d` and 4-bit values, `y = (q - 8) * d` (18 bytes).
    Q4_0,
    /// 32-value blocks: f16 scale `d` and min `m`, 4-bit values, `y = q * d + m` (20 bytes).
    Q4_1,
    /// 32-value blocks: an f16 scale `d` and 5-bit values (fifth bits packed in a u32), `y = (q - 16) * d` (22 bytes).
    Q5_0,
    /// 32-value blocks: f16 scale `d` and min `m`, 5-bit values, `y = q * d + m` (24 bytes).
    Q5_1,
    /// 32-value blocks: an f16 scale `d` and 32 signed bytes, `y = q * d` (34 bytes).
    Q8_0,
    /// 2-bit K-quant: 256-value superblocks of 16 sub-blocks, 4-bit scales and mins, f16 `d` and `dmin` (84 bytes).
    Q2K,
    /// 3-bit K-quant: 256-value superblocks of 16 sub-blocks, 6-bit signed scales, f16 `d` (110 bytes).
    Q3K,
    /// 4-bit K-quant: 256-value superblocks of 8 sub-blocks, 6-bit scales and mins, f16 `d` and `dmin` (144 bytes).
    Q4K,
    /// 5-bit K-quant: Q4_K's layout plus a fifth bit per value (176 bytes).
    Q5K,
    /// 6-bit K-quant: 256-value superblocks of 16 sub-blocks, signed 8-bit scales, f16 `d` (210 bytes).
    Q6K,
    /// bfloat16: the top 16 bits of an F32. Id 30, after the quantized types.
    BF16,
}

impl GgmlType {
    /// Every supported type, in id order.
    pub const ALL: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::BF16,
    ];

    /// The id stored in a GGUF tensor info.
    pub const fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// The type with this id, if convcache supports it.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.id() == id)
    }

    /// Elements per block (1 for the float types).
    pub const fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub const fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q2K => 84,
            GgmlType::Q3K => 110,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Whether this is a block-quantized type (not F32/F16/BF16).
    pub const fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes needed for `n_elements` values, or `None` when `n_elements` is not a whole
    /// number of blocks or the size overflows.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n_elements.is_multiple_of(bs) {
            return None;
        }
        (n_elements / bs).checked_mul(self.type_size() as u64)
    }

    /// ggml's name (`Q4_K`, `BF16`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not in the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown GGUF type name `{0}`")]
pub struct UnknownTypeName(pub String);

impl FromStr for GgmlType {
    type Err = UnknownTypeName;
    /// Case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GgmlType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownTypeName(s.to_owned()))
    }
}

/// A llama file type: the value of `general.file_type`, and the name of a quantization mix.
///
/// The variant docs summarise each mix as it applies to diffusion models (ComfyUI-GGUF's
/// rules); text encoders (T5, umt5) follow llama.cpp's `llama-quantize` instead. The
/// per-tensor rules of both (which tensors are quantized, fused-QKV and per-architecture
/// exceptions, shape fallbacks) live in the `gguf` crate's `mix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileType {
    /// Every tensor F32 (id 0).
    AllF32,
    /// F16 weights; small and 1-D tensors (norms, biases) may stay F32 (id 1).
    MostlyF16,
    /// BF16 weights; small and 1-D tensors may stay F32 (id 32).
    MostlyBF16,
    /// Q4_0 weights, ffn_down in Q4_1 (id 2).
    Q4_0,
    /// Q4_1 weights (id 3).
    Q4_1,
    /// Q5_0 weights, ffn_down in Q5_1 (id 8).
    Q5_0,
    /// Q5_1 weights (id 9).
    Q5_1,
    /// Q8_0 weights (id 7).
    Q8_0,
    /// Q2_K weights, v projections in Q3_K (id 10).
    Q2K,
    /// Q3_K weights, the small mix: no tensor is given a wider type (id 11).
    Q3KS,
    /// Q3_K weights, the medium mix: v projections and ffn_down in Q4_K, the first two v projections in Q5_K (id 12).
    Q3KM,
    /// Q3_K weights, the large mix: v projections and ffn_down in Q5_K (id 13).
    Q3KL,
    /// Q4_K weights, the small mix: the first four v projections and ffn_down in Q5_K (id 14).
    Q4KS,
    /// Q4_K weights, the medium mix: v projections and ffn_down in Q6_K (id 15).
    Q4KM,
    /// Q5_K weights, no tensor given a wider type (id 16).
    Q5KS,
    /// Q5_K weights, v projections and ffn_down in Q6_K (id 17).
    Q5KM,
    /// Q6_K weights (id 18).
    Q6K,
}

impl FileType {
    /// Every supported file type.
    pub const ALL: [FileType; 17] = [
        FileType::AllF32,
        FileType::MostlyF16,
        FileType::MostlyBF16,
        FileType::Q4_0,
        FileType::Q4_1,
        FileType::Q5_0,
        FileType::Q5_1,
        FileType::Q8_0,
        FileType::Q2K,
        FileType::Q3KS,
        FileType::Q3KM,
        FileType::Q3KL,
        FileType::Q4KS,
        FileType::Q4KM,
        FileType::Q5KS,
        FileType::Q5KM,
        FileType::Q6K,
    ];

    /// The `general.file_type` value (llama's `LlamaFileType`).
    pub const fn id(self) -> u32 {
        match self {
            FileType::AllF32 => 0,
            FileType::MostlyF16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q5_0 => 8,
            FileType::Q5_1 => 9,
            FileType::Q2K => 10,
            FileType::Q3KS => 11,
            FileType::Q3KM => 12,
            FileType::Q3KL => 13,
            FileType::Q4KS => 14,
            FileType::Q4KM => 15,
            FileType::Q5KS => 16,
            FileType::Q5KM => 17,
            FileType::Q6K => 18,
            FileType::MostlyBF16 => 32,
        }
    }

    /// The file type with this `general.file_type` value, if supported.
    pub fn from_id(id: u32) -> Option<FileType> {
        FileType::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The name used in file names and on the command line (`Q4_K_M`, `F16`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            FileType::AllF32 => "F32",
            FileType::MostlyF16 => "F16",
            FileType::MostlyBF16 => "BF16",
            FileType::Q4_0 => "Q4_0",
            FileType::Q4_1 => "Q4_1",
            FileType::Q5_0 => "Q5_0",
            FileType::Q5_1 => "Q5_1",
            FileType::Q8_0 => "Q8_0",
            FileType::Q2K => "Q2_K",
            FileType::Q3KS => "Q3_K_S",
            FileType::Q3KM => "Q3_K_M",
            FileType::Q3KL => "Q3_K_L",
            FileType::Q4KS => "Q4_K_S",
            FileType::Q4KM => "Q4_K_M",
            FileType::Q5KS => "Q5_K_S",
            FileType::Q5KM => "Q5_K_M",
            FileType::Q6K => "Q6_K",
        }
    }

    /// The tensor type most tensors of this mix get (llama-quantize's default type).
    pub const fn base_type(self) -> GgmlType {
        match self {
            FileType::AllF32 => GgmlType::F32,
            FileType::MostlyF16 => GgmlType::F16,
            FileType::MostlyBF16 => GgmlType::BF16,
            FileType::Q4_0 => GgmlType::Q4_0,
            FileType::Q4_1 => GgmlType::Q4_1,
            FileType::Q5_0 => GgmlType::Q5_0,
            FileType::Q5_1 => GgmlType::Q5_1,
            FileType::Q8_0 => GgmlType::Q8_0,
            FileType::Q2K => GgmlType::Q2K,
            FileType::Q3KS | FileType::Q3KM | FileType::Q3KL => GgmlType::Q3K,
            FileType::Q4KS | FileType::Q4KM => GgmlType::Q4K,
            FileType::Q5KS | FileType::Q5KM => GgmlType::Q5K,
            FileType::Q6K => GgmlType::Q6K,
        }
    }
}

impl fmt::Display for FileType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FileType {
    type Err = UnknownTypeName;
    /// Case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FileType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownTypeName(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ggml_type_names_and_ids_round_trip() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(t.name().parse::<GgmlType>(), Ok(t));
            assert_eq!(t.name().to_lowercase().parse::<GgmlType>(), Ok(t));
        }
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::Q4K.bytes_for(512), Some(288));
        assert_eq!(GgmlType::Q4K.bytes_for(100), None);
    }

    #[test]
    fn file_type_names_and_ids_round_trip() {
        for t in FileType::ALL {
            assert_eq!(FileType::from_id(t.id()), Some(t));
            assert_eq!(t.name().parse::<FileType>(), Ok(t));
            assert_eq!(t.name().to_lowercase().parse::<FileType>(), Ok(t));
        }
        assert_eq!(FileType::Q4KM.id(), 15);
        assert_eq!(FileType::MostlyBF16.id(), 32);
    }
}
