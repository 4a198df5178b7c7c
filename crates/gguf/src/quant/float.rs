//! The unquantized element types F32, F16 and BF16 as one-value "blocks"
//! (ggml: src/ggml.c `ggml_quantize_chunk` → `ggml_fp32_to_fp16_row`,
//! `ggml_fp32_to_bf16_row_ref`, `memcpy`).

use super::common::{bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits};
use super::{BlockFormat, QuantError, check_lengths};
use crate::types::GgmlType;

/// F32: little-endian IEEE binary32, copied unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct F32;

/// F16: IEEE binary16, rounded to nearest even as ggml does (NaN becomes `0x7E00`).
#[derive(Debug, Clone, Copy, Default)]
pub struct F16;

/// BF16: bfloat16, rounded to nearest even with ggml's quiet-NaN rule, subnormals kept.
#[derive(Debug, Clone, Copy, Default)]
pub struct BF16;

impl BlockFormat for F32 {
    const TYPE: GgmlType = GgmlType::F32;
    const BLOCK_ELEMS: usize = 1;
    const BLOCK_BYTES: usize = 4;

    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        let s: &[f32; 1] = super::legacy::fixed(src);
        dst.copy_from_slice(&s[0].to_le_bytes());
    }

    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let b: &[u8; 4] = super::legacy::fixed(src);
        let d: &mut [f32; 1] = super::legacy::fixed_mut(dst);
        d[0] = f32::from_le_bytes(*b);
    }

    fn quantize_row(src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
        check_lengths(Self::TYPE, src.len(), dst.len())?;
        for (v, out) in src.iter().zip(dst.chunks_exact_mut(4)) {
            out.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }

    fn quantize_row_scalar(src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
        Self::quantize_row(src, dst)
    }

    fn dequantize_row(src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
        check_lengths(Self::TYPE, dst.len(), src.len())?;
        for (b, out) in src.chunks_exact(4).zip(dst.iter_mut()) {
            *out = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }
}

macro_rules! half_format {
    ($name:ident, $ty:expr, $to:path, $from:path) => {
        impl BlockFormat for $name {
            const TYPE: GgmlType = $ty;
            const BLOCK_ELEMS: usize = 1;
            const BLOCK_BYTES: usize = 2;

            fn quantize_block(src: &[f32], dst: &mut [u8]) {
                let s: &[f32; 1] = super::legacy::fixed(src);
                dst.copy_from_slice(&$to(s[0]).to_le_bytes());
            }

            fn dequantize_block(src: &[u8], dst: &mut [f32]) {
                let b: &[u8; 2] = super::legacy::fixed(src);
                let d: &mut [f32; 1] = super::legacy::fixed_mut(dst);
                d[0] = $from(u16::from_le_bytes(*b));
            }

            fn quantize_row(src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
                check_lengths(Self::TYPE, src.len(), dst.len())?;
                for (v, out) in src.iter().zip(dst.chunks_exact_mut(2)) {
                    out.copy_from_slice(&$to(*v).to_le_bytes());
                }
                Ok(())
            }

            fn quantize_row_scalar(src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
                Self::quantize_row(src, dst)
            }

            fn dequantize_row(src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
                check_lengths(Self::TYPE, dst.len(), src.len())?;
                for (b, out) in src.chunks_exact(2).zip(dst.iter_mut()) {
                    *out = $from(u16::from_le_bytes([b[0], b[1]]));
                }
                Ok(())
            }
        }
    };
}

half_format!(F16, GgmlType::F16, f32_to_f16_bits, f16_bits_to_f32);
half_format!(BF16, GgmlType::BF16, f32_to_bf16_bits, bf16_bits_to_f32);
