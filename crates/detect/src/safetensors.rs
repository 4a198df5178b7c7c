//! Hardened safetensors header parsing. (Parser filled by the detect work; [`Dtype`] is pinned.)

use std::fmt;
use std::str::FromStr;

/// A safetensors dtype string.
///
/// The F8/F6/F4 variants beyond E4M3/E5M2 are known (so a file using them is recognised) but no
/// converter reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    F8E4M3,
    F8E5M2,
    F8E8M0,
    F8E4M3FNUZ,
    F8E5M2FNUZ,
    F6E2M3,
    F6E3M2,
    F4,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Bool,
    C64,
}

impl Dtype {
    /// Every dtype.
    pub const ALL: [Dtype; 22] = [
        Dtype::F64,
        Dtype::F32,
        Dtype::F16,
        Dtype::BF16,
        Dtype::F8E4M3,
        Dtype::F8E5M2,
        Dtype::F8E8M0,
        Dtype::F8E4M3FNUZ,
        Dtype::F8E5M2FNUZ,
        Dtype::F6E2M3,
        Dtype::F6E3M2,
        Dtype::F4,
        Dtype::I64,
        Dtype::I32,
        Dtype::I16,
        Dtype::I8,
        Dtype::U64,
        Dtype::U32,
        Dtype::U16,
        Dtype::U8,
        Dtype::Bool,
        Dtype::C64,
    ];

    /// The string in the header.
    pub const fn as_str(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::F8E4M3FNUZ => "F8_E4M3FNUZ",
            Dtype::F8E5M2FNUZ => "F8_E5M2FNUZ",
            Dtype::F6E2M3 => "F6_E2M3",
            Dtype::F6E3M2 => "F6_E3M2",
            Dtype::F4 => "F4",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U64 => "U64",
            Dtype::U32 => "U32",
            Dtype::U16 => "U16",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
            Dtype::C64 => "C64",
        }
    }

    /// Size of one element in bits (sub-byte types: 4 or 6).
    pub const fn bits(self) -> u64 {
        match self {
            Dtype::F64 | Dtype::I64 | Dtype::U64 | Dtype::C64 => 64,
            Dtype::F32 | Dtype::I32 | Dtype::U32 => 32,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 | Dtype::U16 => 16,
            Dtype::F8E4M3
            | Dtype::F8E5M2
            | Dtype::F8E8M0
            | Dtype::F8E4M3FNUZ
            | Dtype::F8E5M2FNUZ
            | Dtype::I8
            | Dtype::U8
            | Dtype::Bool => 8,
            Dtype::F6E2M3 | Dtype::F6E3M2 => 6,
            Dtype::F4 => 4,
        }
    }

    /// Bytes for `n` elements, or `None` on overflow or a partial byte.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let bits = n.checked_mul(self.bits())?;
        (bits % 8 == 0).then_some(bits / 8)
    }

    /// Whether this is a floating-point dtype.
    pub const fn is_float(self) -> bool {
        matches!(
            self,
            Dtype::F64
                | Dtype::F32
                | Dtype::F16
                | Dtype::BF16
                | Dtype::F8E4M3
                | Dtype::F8E5M2
                | Dtype::F8E8M0
                | Dtype::F8E4M3FNUZ
                | Dtype::F8E5M2FNUZ
                | Dtype::F6E2M3
                | Dtype::F6E3M2
                | Dtype::F4
        )
    }

    /// Whether convcache's converters can read this dtype as a source.
    pub const fn is_convertible_float(self) -> bool {
        matches!(
            self,
            Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F8E4M3 | Dtype::F8E5M2
        )
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A dtype string that is not safetensors'.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown safetensors dtype `{0}`")]
pub struct UnknownDtype(pub String);

impl FromStr for Dtype {
    type Err = UnknownDtype;
    /// Exact (case-sensitive), as in the format.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| UnknownDtype(s.to_owned()))
    }
}
