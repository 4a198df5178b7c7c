//! The 32-value formats Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0
//! (ggml: src/ggml-quants.c `quantize_row_q*_ref`, `dequantize_row_q*`).
//!
//! These use truncation (`(int8_t)(v + 8.5f)`) or `roundf`, not `nearest_int`; the float to
//! integer conversions go through [`c_trunc_i32`] so even non-finite inputs give x86-64's bytes.

// Index loops mirror ggml's C loops one for one, which keeps the port auditable.
#![allow(clippy::needless_range_loop)]

use super::BlockFormat;
use super::common::{c_trunc_i32, read_f16, write_f16};
use crate::types::GgmlType;

const QK: usize = 32;

/// The signed value with the largest magnitude (first one wins on ties), as the Q4_0/Q5_0
/// quantizers pick it.
#[inline(always)]
fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Minimum and maximum with ggml's strict comparisons and ±FLT_MAX starting points.
#[inline(always)]
fn min_max(x: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

#[inline(always)]
fn inverse_or_zero(d: f32) -> f32 {
    // C's `d ? 1.0f/d : 0.0f`: NaN counts as true.
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

/// Q4_0: 32 values as 4-bit offsets from −8 times one fp16 scale (18 bytes).
#[derive(Debug, Clone, Copy, Default)]
pub struct Q4_0;

impl BlockFormat for Q4_0 {
    const TYPE: GgmlType = GgmlType::Q4_0;
    const BLOCK_ELEMS: usize = QK;
    const BLOCK_BYTES: usize = 18;

    fn quantize_block(x: &[f32], y: &mut [u8]) {
        let (x, y): (&[f32; QK], &mut [u8; 18]) = (fixed(x), fixed_mut(y));
        let max = signed_absmax(x);
        let d = max / -8.0;
        let id = inverse_or_zero(d);
        write_f16(y, 0, d);
        for j in 0..QK / 2 {
            let x0 = x[j] * id;
            let x1 = x[j + QK / 2] * id;
            let q0 = (c_trunc_i32(x0 + 8.5) as i8 as i32).min(15) as u8;
            let q1 = (c_trunc_i32(x1 + 8.5) as i8 as i32).min(15) as u8;
            y[2 + j] = q0 | (q1 << 4);
        }
    }

    fn dequantize_block(x: &[u8], y: &mut [f32]) {
        let (x, y): (&[u8; 18], &mut [f32; QK]) = (fixed(x), fixed_mut(y));
        let d = read_f16(x, 0);
        for j in 0..QK / 2 {
            let q = x[2 + j];
            y[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
            y[j + QK / 2] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Q4_1: 32 values as 4-bit steps above an fp16 minimum (20 bytes).
#[derive(Debug, Clone, Copy, Default)]
pub struct Q4_1;

impl BlockFormat for Q4_1 {
    const TYPE: GgmlType = GgmlType::Q4_1;
    const BLOCK_ELEMS: usize = QK;
    const BLOCK_BYTES: usize = 20;

    fn quantize_block(x: &[f32], y: &mut [u8]) {
        let (x, y): (&[f32; QK], &mut [u8; 20]) = (fixed(x), fixed_mut(y));
        let (min, max) = min_max(x);
        let d = (max - min) / 15.0;
        let id = inverse_or_zero(d);
        write_f16(y, 0, d);
        write_f16(y, 2, min);
        for j in 0..QK / 2 {
            let x0 = (x[j] - min) * id;
            let x1 = (x[j + QK / 2] - min) * id;
            let q0 = (c_trunc_i32(x0 + 0.5) as i8 as i32).min(15) as u8;
            let q1 = (c_trunc_i32(x1 + 0.5) as i8 as i32).min(15) as u8;
            y[4 + j] = q0 | (q1 << 4);
        }
    }

    fn dequantize_block(x: &[u8], y: &mut [f32]) {
        let (x, y): (&[u8; 20], &mut [f32; QK]) = (fixed(x), fixed_mut(y));
        let d = read_f16(x, 0);
        let m = read_f16(x, 2);
        for j in 0..QK / 2 {
            let q = x[4 + j];
            y[j] = (q & 0x0f) as f32 * d + m;
            y[j + QK / 2] = (q >> 4) as f32 * d + m;
        }
    }
}

/// Q5_0: 32 values as 5-bit offsets from −16 times one fp16 scale (22 bytes).
#[derive(Debug, Clone, Copy, Default)]
pub struct Q5_0;

impl BlockFormat for Q5_0 {
    const TYPE: GgmlType = GgmlType::Q5_0;
    const BLOCK_ELEMS: usize = QK;
    const BLOCK_BYTES: usize = 22;

    fn quantize_block(x: &[f32], y: &mut [u8]) {
        let (x, y): (&[f32; QK], &mut [u8; 22]) = (fixed(x), fixed_mut(y));
        let max = signed_absmax(x);
        let d = max / -16.0;
        let id = inverse_or_zero(d);
        write_f16(y, 0, d);
        let mut qh = 0u32;
        for j in 0..QK / 2 {
            let x0 = x[j] * id;
            let x1 = x[j + QK / 2] * id;
            let q0 = (c_trunc_i32(x0 + 16.5) as i8 as i32).min(31) as u8;
            let q1 = (c_trunc_i32(x1 + 16.5) as i8 as i32).min(31) as u8;
            y[6 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
            qh |= (((q0 & 0x10) >> 4) as u32) << j;
            qh |= (((q1 & 0x10) >> 4) as u32) << (j + QK / 2);
        }
        y[2..6].copy_from_slice(&qh.to_le_bytes());
    }

    fn dequantize_block(x: &[u8], y: &mut [f32]) {
        let (x, y): (&[u8; 22], &mut [f32; QK]) = (fixed(x), fixed_mut(y));
        let d = read_f16(x, 0);
        let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
        for j in 0..QK / 2 {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            let q = x[6 + j] as u32;
            y[j] = (((q & 0x0f) | h0) as i32 - 16) as f32 * d;
            y[j + QK / 2] = (((q >> 4) | h1) as i32 - 16) as f32 * d;
        }
    }
}

/// Q5_1: 32 values as 5-bit steps above an fp16 minimum (24 bytes).
#[derive(Debug, Clone, Copy, Default)]
pub struct Q5_1;

impl BlockFormat for Q5_1 {
    const TYPE: GgmlType = GgmlType::Q5_1;
    const BLOCK_ELEMS: usize = QK;
    const BLOCK_BYTES: usize = 24;

    fn quantize_block(x: &[f32], y: &mut [u8]) {
        let (x, y): (&[f32; QK], &mut [u8; 24]) = (fixed(x), fixed_mut(y));
        let (min, max) = min_max(x);
        let d = (max - min) / 31.0;
        let id = inverse_or_zero(d);
        write_f16(y, 0, d);
        write_f16(y, 2, min);
        let mut qh = 0u32;
        for j in 0..QK / 2 {
            let x0 = (x[j] - min) * id;
            let x1 = (x[j + QK / 2] - min) * id;
            // No clamp in ggml: (uint8_t)(x0 + 0.5f).
            let q0 = c_trunc_i32(x0 + 0.5) as u8;
            let q1 = c_trunc_i32(x1 + 0.5) as u8;
            y[8 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
            qh |= (((q0 & 0x10) >> 4) as u32) << j;
            qh |= (((q1 & 0x10) >> 4) as u32) << (j + QK / 2);
        }
        y[4..8].copy_from_slice(&qh.to_le_bytes());
    }

    fn dequantize_block(x: &[u8], y: &mut [f32]) {
        let (x, y): (&[u8; 24], &mut [f32; QK]) = (fixed(x), fixed_mut(y));
        let d = read_f16(x, 0);
        let m = read_f16(x, 2);
        let qh = u32::from_le_bytes([x[4], x[5], x[6], x[7]]);
        for j in 0..QK / 2 {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            let q = x[8 + j] as u32;
            y[j] = ((q & 0x0f) | h0) as f32 * d + m;
            y[j + QK / 2] = ((q >> 4) | h1) as f32 * d + m;
        }
    }
}

/// Q8_0: 32 signed bytes times one fp16 scale (34 bytes).
#[derive(Debug, Clone, Copy, Default)]
pub struct Q8_0;

impl BlockFormat for Q8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
    const BLOCK_ELEMS: usize = QK;
    const BLOCK_BYTES: usize = 34;

    fn quantize_block(x: &[f32], y: &mut [u8]) {
        let (x, y): (&[f32; QK], &mut [u8; 34]) = (fixed(x), fixed_mut(y));
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was detected on this CPU just above.
            if unsafe { super::x86::quantize_q8_0_avx2(x, y) } {
                return;
            }
        }
        q8_0_scalar(x, y);
    }

    fn quantize_block_scalar(x: &[f32], y: &mut [u8]) {
        q8_0_scalar(fixed(x), fixed_mut(y));
    }

    fn dequantize_block(x: &[u8], y: &mut [f32]) {
        let (x, y): (&[u8; 34], &mut [f32; QK]) = (fixed(x), fixed_mut(y));
        let d = read_f16(x, 0);
        for j in 0..QK {
            y[j] = (x[2 + j] as i8) as f32 * d;
        }
    }
}

/// ggml's `quantize_row_q8_0_ref` for one block.
fn q8_0_scalar(x: &[f32; QK], y: &mut [u8; 34]) {
    let mut amax = 0.0f32;
    for &v in x {
        // C's MAX(a, b) = a > b ? a : b, which differs from f32::max on NaN.
        let a = v.abs();
        amax = if amax > a { amax } else { a };
    }
    let d = amax / 127.0;
    let id = inverse_or_zero(d);
    write_f16(y, 0, d);
    for j in 0..QK {
        // roundf: half away from zero, which is f32::round.
        y[2 + j] = c_trunc_i32((x[j] * id).round()) as u8;
    }
}

/// Views a block slice as an array; the length is the trait's documented precondition.
#[inline(always)]
#[track_caller]
pub(crate) fn fixed<T, const N: usize>(s: &[T]) -> &[T; N] {
    match s.try_into() {
        Ok(a) => a,
        Err(_) => panic!("block slice has {} elements, expected {N}", s.len()),
    }
}

/// Mutable counterpart of [`fixed`].
#[inline(always)]
#[track_caller]
pub(crate) fn fixed_mut<T, const N: usize>(s: &mut [T]) -> &mut [T; N] {
    let len = s.len();
    match s.try_into() {
        Ok(a) => a,
        Err(_) => panic!("block slice has {len} elements, expected {N}"),
    }
}
