//! Quantization kernels, one type per block format, byte-identical to ggml's reference
//! quantizers.
//!
//! Every format in [`GgmlType::ALL`] has a zero-sized type implementing [`BlockFormat`]
//! ([`Q4_0`], [`Q4K`], [`F16`], ...). The entry points most callers want are [`quantize`] and
//! [`dequantize`], which dispatch on a [`GgmlType`], check lengths, and split large inputs
//! across the rayon pool by whole blocks.
//!
//! # What "byte-identical" means here
//!
//! For the same f32 input, [`quantize`] writes the bytes that ggml's `ggml_quantize_chunk`
//! writes without an importance matrix (the `quantize_row_*_ref` procedures that
//! `llama-quantize` runs) on x86-64, where ggml-base is built without FMA; [`dequantize`]
//! returns the f32 bits of ggml's `dequantize_row_*`. Every sum is accumulated in index order
//! and every product in the order ggml writes it; nothing is fused into an FMA. The goldens in
//! `tests/golden/quant/` were produced by ggml itself (see `make_goldens.py` there).
//!
//! # Speed
//!
//! The K-quant scale searches (the costly part of Q2_K..Q6_K) have an AVX2 path that runs
//! eight sub-blocks in the eight lanes of a vector, each lane performing exactly the scalar
//! sequence of IEEE operations (branches become per-lane masks), so the bytes do not change;
//! Q8_0 has one too. The path is chosen at run time; [`quantize_scalar`] always takes the
//! portable path (used on other CPUs, and by the tests that check both paths agree).
//!
//! # NaN inputs
//!
//! Inputs containing NaN quantize without panicking, but their bytes are not guaranteed to
//! equal ggml's: a NaN's payload reaches the levels through `nearest_int`'s bit trick, and
//! neither C nor Rust specifies which payload an operation on two NaNs returns.

mod common;
mod float;
mod kquants;
mod legacy;
#[cfg(target_arch = "x86_64")]
mod x86;

use rayon::prelude::*;

pub use common::{bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits};
pub use float::{BF16, F16, F32};
pub use kquants::{Q2K, Q3K, Q4K, Q5K, Q6K};
pub use legacy::{Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};

use crate::types::GgmlType;

/// Why a quantize or dequantize call was refused. Nothing is written when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// The number of values is not a whole number of blocks.
    #[error("{ty}: {len} values is not a multiple of the block size {block}")]
    PartialBlock {
        /// The block format.
        ty: GgmlType,
        /// Values given.
        len: usize,
        /// Values per block.
        block: usize,
    },
    /// The quantized bytes are not a whole number of blocks.
    #[error("{ty}: {bytes} bytes is not a multiple of the block size {block_bytes} bytes")]
    PartialBlockBytes {
        /// The block format.
        ty: GgmlType,
        /// Bytes given.
        bytes: usize,
        /// Bytes per block.
        block_bytes: usize,
    },
    /// The quantized buffer does not have the size the values need.
    #[error("{ty}: {values} values need {expected} bytes, the buffer has {actual}")]
    ByteLength {
        /// The block format.
        ty: GgmlType,
        /// Values given.
        values: usize,
        /// Bytes they need.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
}

/// One ggml block format: how `BLOCK_ELEMS` f32 values become `BLOCK_BYTES` bytes and back.
///
/// The block functions take exactly one block; the row functions take any whole number of
/// blocks and check lengths.
pub trait BlockFormat {
    /// The ggml type this format writes.
    const TYPE: GgmlType;
    /// Values per block (1 for the float types).
    const BLOCK_ELEMS: usize;
    /// Bytes per block.
    const BLOCK_BYTES: usize;

    /// Quantizes one block with the fastest path this CPU supports.
    ///
    /// # Panics
    /// If `src.len() != BLOCK_ELEMS` or `dst.len() != BLOCK_BYTES`.
    fn quantize_block(src: &[f32], dst: &mut [u8]);

    /// Quantizes one block with the portable scalar path; same bytes as
    /// [`quantize_block`](Self::quantize_block).
    ///
    /// # Panics
    /// If `src.len() != BLOCK_ELEMS` or `dst.len() != BLOCK_BYTES`.
    fn quantize_block_scalar(src: &[f32], dst: &mut [u8]) {
        Self::quantize_block(src, dst)
    }

    /// Dequantizes one block. Every byte pattern is accepted.
    ///
    /// # Panics
    /// If `src.len() != BLOCK_BYTES` or `dst.len() != BLOCK_ELEMS`.
    fn dequantize_block(src: &[u8], dst: &mut [f32]);

    /// Quantizes whole blocks, sequentially on this thread.
    fn quantize_row(src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
        check_lengths(Self::TYPE, src.len(), dst.len())?;
        for (x, y) in src
            .chunks_exact(Self::BLOCK_ELEMS)
            .zip(dst.chunks_exact_mut(Self::BLOCK_BYTES))
        {
            Self::quantize_block(x, y);
        }
        Ok(())
    }

    /// Quantizes whole blocks with the scalar path, sequentially on this thread.
    fn quantize_row_scalar(src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
        check_lengths(Self::TYPE, src.len(), dst.len())?;
        for (x, y) in src
            .chunks_exact(Self::BLOCK_ELEMS)
            .zip(dst.chunks_exact_mut(Self::BLOCK_BYTES))
        {
            Self::quantize_block_scalar(x, y);
        }
        Ok(())
    }

    /// Dequantizes whole blocks, sequentially on this thread.
    fn dequantize_row(src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
        check_lengths(Self::TYPE, dst.len(), src.len())?;
        for (x, y) in src
            .chunks_exact(Self::BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(Self::BLOCK_ELEMS))
        {
            Self::dequantize_block(x, y);
        }
        Ok(())
    }
}

/// Checks that `values` f32s form whole blocks of `ty` and need exactly `bytes` bytes.
pub fn check_lengths(ty: GgmlType, values: usize, bytes: usize) -> Result<(), QuantError> {
    let block = ty.block_size();
    if !values.is_multiple_of(block) {
        return Err(QuantError::PartialBlock {
            ty,
            len: values,
            block,
        });
    }
    // values / block * type_size cannot overflow for a slice that fits in memory
    // (type_size ≤ 4 · block for every type), but stay checked on principle.
    let expected = (values / block).checked_mul(ty.type_size());
    if expected != Some(bytes) {
        return Err(QuantError::ByteLength {
            ty,
            values,
            expected: expected.unwrap_or(usize::MAX),
            actual: bytes,
        });
    }
    Ok(())
}

/// Values per parallel task: big enough to amortize scheduling, small enough to balance
/// (16 K-quant super-blocks).
const PAR_CHUNK_VALUES: usize = 4096;
/// Below this many values the call stays on the calling thread.
const PAR_MIN_VALUES: usize = 1 << 15;

fn run_quantize<F: BlockFormat>(src: &[f32], dst: &mut [u8], scalar: bool) {
    let row = if scalar {
        F::quantize_row_scalar
    } else {
        F::quantize_row
    };
    // Lengths were checked by the caller, so the per-chunk calls cannot fail; the `let _`
    // keeps the signature uniform without an unwrap.
    if src.len() < PAR_MIN_VALUES {
        let _ = row(src, dst);
        return;
    }
    let per = PAR_CHUNK_VALUES.div_ceil(F::BLOCK_ELEMS) * F::BLOCK_ELEMS;
    let per_bytes = per / F::BLOCK_ELEMS * F::BLOCK_BYTES;
    src.par_chunks(per)
        .zip(dst.par_chunks_mut(per_bytes))
        .for_each(|(x, y)| {
            let _ = row(x, y);
        });
}

fn run_dequantize<F: BlockFormat>(src: &[u8], dst: &mut [f32]) {
    if dst.len() < PAR_MIN_VALUES {
        let _ = F::dequantize_row(src, dst);
        return;
    }
    let per = PAR_CHUNK_VALUES.div_ceil(F::BLOCK_ELEMS) * F::BLOCK_ELEMS;
    let per_bytes = per / F::BLOCK_ELEMS * F::BLOCK_BYTES;
    src.par_chunks(per_bytes)
        .zip(dst.par_chunks_mut(per))
        .for_each(|(x, y)| {
            let _ = F::dequantize_row(x, y);
        });
}

macro_rules! dispatch {
    ($ty:expr, $f:ident, $($arg:expr),*) => {
        match $ty {
            GgmlType::F32 => $f::<F32>($($arg),*),
            GgmlType::F16 => $f::<F16>($($arg),*),
            GgmlType::BF16 => $f::<BF16>($($arg),*),
            GgmlType::Q4_0 => $f::<Q4_0>($($arg),*),
            GgmlType::Q4_1 => $f::<Q4_1>($($arg),*),
            GgmlType::Q5_0 => $f::<Q5_0>($($arg),*),
            GgmlType::Q5_1 => $f::<Q5_1>($($arg),*),
            GgmlType::Q8_0 => $f::<Q8_0>($($arg),*),
            GgmlType::Q2K => $f::<Q2K>($($arg),*),
            GgmlType::Q3K => $f::<Q3K>($($arg),*),
            GgmlType::Q4K => $f::<Q4K>($($arg),*),
            GgmlType::Q5K => $f::<Q5K>($($arg),*),
            GgmlType::Q6K => $f::<Q6K>($($arg),*),
        }
    };
}

/// Quantizes `src` (a whole number of `ty` blocks, any number of rows) into `dst`, which must
/// hold exactly the bytes those blocks need. Large inputs are split across the current rayon
/// pool by whole blocks; the bytes never depend on the split.
pub fn quantize(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    check_lengths(ty, src.len(), dst.len())?;
    dispatch!(ty, run_quantize, src, dst, false);
    Ok(())
}

/// [`quantize`] restricted to the portable scalar kernels (no SIMD). Same bytes, slower.
pub fn quantize_scalar(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    check_lengths(ty, src.len(), dst.len())?;
    dispatch!(ty, run_quantize, src, dst, true);
    Ok(())
}

/// Dequantizes `src` (whole blocks of `ty`) into `dst`, which must hold exactly the values
/// those blocks encode. The f32 bits equal ggml's `dequantize_row_*` (`to_float`).
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check_lengths(ty, dst.len(), src.len())?;
    dispatch!(ty, run_dequantize, src, dst);
    Ok(())
}

/// Quantizes `src` into a new vector of exactly the bytes it needs.
pub fn quantize_to_vec(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>, QuantError> {
    let block = ty.block_size();
    if !src.len().is_multiple_of(block) {
        return Err(QuantError::PartialBlock {
            ty,
            len: src.len(),
            block,
        });
    }
    let mut out = vec![0u8; src.len() / block * ty.type_size()];
    quantize(ty, src, &mut out)?;
    Ok(out)
}

/// Dequantizes whole blocks into a new vector. The output size comes from `src.len()`, so a
/// caller never allocates more than `src` implies (at most 16 f32 per quantized byte).
pub fn dequantize_to_vec(ty: GgmlType, src: &[u8]) -> Result<Vec<f32>, QuantError> {
    let bytes = ty.type_size();
    if !src.len().is_multiple_of(bytes) {
        return Err(QuantError::PartialBlockBytes {
            ty,
            bytes: src.len(),
            block_bytes: bytes,
        });
    }
    let mut out = vec![0f32; src.len() / bytes * ty.block_size()];
    dequantize(ty, src, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lengths_are_typed_errors_not_panics() {
        let mut out = [0u8; 18];
        assert!(matches!(
            quantize(GgmlType::Q4_0, &[0.0; 31], &mut out),
            Err(QuantError::PartialBlock { .. })
        ));
        assert!(matches!(
            quantize(GgmlType::Q4_0, &[0.0; 64], &mut out),
            Err(QuantError::ByteLength {
                expected: 36,
                actual: 18,
                ..
            })
        ));
        let mut vals = [0f32; 256];
        assert!(dequantize(GgmlType::Q4K, &[0u8; 143], &mut vals).is_err());
        assert!(dequantize_to_vec(GgmlType::Q6K, &[0u8; 211]).is_err());
        assert!(quantize(GgmlType::Q4K, &[0.0; 256], &mut [0u8; 144]).is_ok());
    }
}
