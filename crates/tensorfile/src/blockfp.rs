//! comfy-kitchen's block-float quantizers (fp8 per tensor, nvfp4, mxfp8).
//!
//! placeholder until the blockfp branch lands: the agreed signatures of `tensorfile::blockfp`
//! (see the issue-12 API note) with simple bodies of the right sizes whose bytes depend on each
//! value's position (the top bits of its f32), so the `comfyquant` crate compiles and its
//! layout and alignment tests run. They are NOT comfy-kitchen's formats. The lead replaces this
//! file with the real module at merge.

use crate::safetensors::Dtype;

/// Elements per nvfp4 block.
pub const NVFP4_GROUP: usize = 16;
/// Elements per mxfp8 block.
pub const MXFP8_GROUP: usize = 32;

// placeholder until the blockfp branch lands
/// comfy-quants' per-tensor fp8 scale.
pub fn fp8_tensor_scale(amax: f32, source: Dtype) -> f32 {
    let _ = source;
    if amax > 0.0 {
        (amax / 448.0).max(1e-12)
    } else {
        1.0
    }
}

// placeholder until the blockfp branch lands
/// comfy-kitchen's `quantize_per_tensor_fp8` to E4M3FN.
pub fn quantize_fp8(values: &[f32], source: Dtype, scale: f32, out: &mut [u8]) {
    let _ = (source, scale);
    for (o, v) in out.iter_mut().zip(values) {
        *o = top_byte(*v);
    }
}

/// The sign and high exponent bits of `v` (placeholder code).
fn top_byte(v: f32) -> u8 {
    (v.to_bits() >> 24) as u8
}

/// One placeholder scale per block: the top byte of its largest |value|.
fn block_tops(values: &[f32], group: usize, block_scales: &mut [u8]) {
    for (s, block) in block_scales.iter_mut().zip(values.chunks(group)) {
        *s = top_byte(block.iter().fold(0f32, |m, v| m.max(v.abs())));
    }
}

// placeholder until the blockfp branch lands
/// nvfp4 per-tensor scale as stored in `weight_scale_2`.
pub fn nvfp4_tensor_scale(amax: f32) -> f32 {
    amax / 2688.0
}

fn padded(rows: usize, cols: usize, m: usize) -> (usize, usize) {
    if rows.is_multiple_of(m) && cols.is_multiple_of(m) {
        (rows, cols)
    } else {
        (rows.next_multiple_of(m), cols.next_multiple_of(m))
    }
}

// placeholder until the blockfp branch lands
/// The stored (padded) `[rows, cols]` of an nvfp4 weight.
pub fn nvfp4_padded_shape(rows: usize, cols: usize) -> (usize, usize) {
    padded(rows, cols, NVFP4_GROUP)
}

// placeholder until the blockfp branch lands
/// The stored (padded) `[rows, cols]` of an mxfp8 weight.
pub fn mxfp8_padded_shape(rows: usize, cols: usize) -> (usize, usize) {
    padded(rows, cols, MXFP8_GROUP)
}

// placeholder until the blockfp branch lands
/// Quantizes whole rows of a padded weight to nvfp4.
pub fn quantize_nvfp4_rows(
    values: &[f32],
    cols: usize,
    tensor_scale: f32,
    packed: &mut [u8],
    block_scales: &mut [u8],
) {
    let _ = (cols, tensor_scale);
    for (p, pair) in packed.iter_mut().zip(values.chunks(2)) {
        *p = (top_byte(pair[0]) & 0xF0) | (top_byte(pair[pair.len() - 1]) >> 4);
    }
    block_tops(values, NVFP4_GROUP, block_scales);
}

// placeholder until the blockfp branch lands
/// Quantizes whole rows of a padded weight to mxfp8.
pub fn quantize_mxfp8_rows(values: &[f32], cols: usize, codes: &mut [u8], block_scales: &mut [u8]) {
    let _ = cols;
    for (c, v) in codes.iter_mut().zip(values) {
        *c = top_byte(*v);
    }
    block_tops(values, MXFP8_GROUP, block_scales);
}

// placeholder until the blockfp branch lands
/// The stored 2-D shape of a `[rows, cols]` scale grid in the cuBLAS blocked layout.
pub fn blocked_shape(rows: usize, cols: usize) -> (usize, usize) {
    (rows.next_multiple_of(128), cols.next_multiple_of(4))
}

// placeholder until the blockfp branch lands
/// A `[rows, cols]` scale grid in the cuBLAS blocked layout.
pub fn to_blocked(grid: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let (r, c) = blocked_shape(rows, cols);
    let mut out = vec![0; r * c];
    for (dst, src) in out.chunks_mut(c).zip(grid.chunks(cols.max(1))) {
        dst[..src.len()].copy_from_slice(src);
    }
    out
}

// placeholder until the blockfp branch lands
/// The inverse of [`to_blocked`].
pub fn from_blocked(blocked: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let _ = blocked;
    vec![0; rows * cols]
}

// placeholder until the blockfp branch lands
/// comfy-kitchen's fp8 dequantizer (f32).
pub fn dequantize_fp8(codes: &[u8], scale: f32, out: &mut [f32]) {
    let _ = (codes, scale);
    out.fill(0.0);
}

// placeholder until the blockfp branch lands
/// comfy-kitchen's nvfp4 dequantizer (f32).
pub fn dequantize_nvfp4_rows(
    packed: &[u8],
    block_scales: &[u8],
    cols: usize,
    tensor_scale: f32,
    out: &mut [f32],
) {
    let _ = (packed, block_scales, cols, tensor_scale);
    out.fill(0.0);
}

// placeholder until the blockfp branch lands
/// comfy-kitchen's mxfp8 dequantizer (f32).
pub fn dequantize_mxfp8_rows(codes: &[u8], block_scales: &[u8], cols: usize, out: &mut [f32]) {
    let _ = (codes, block_scales, cols);
    out.fill(0.0);
}
