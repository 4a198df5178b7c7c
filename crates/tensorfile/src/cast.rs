//! Element casts between floating-point dtypes, bit-identical to PyTorch 2.x `tensor.to(dtype)`
//! on CPU.
//!
//! Facts established with torch 2.15 (`tests/golden/make_goldens.py` records them as goldens):
//!
//! - Every cast rounds to nearest, ties to even. A cast from F64 to anything narrower than F32
//!   goes **through F32**, so it rounds twice (`1 + 2^-11 + 2^-40` becomes `1.0` in F16, not
//!   `1 + 2^-10`); casts from 8- and 16-bit sources go through F32 too, which is exact.
//! - F32 -> F8_E4M3 (fp8_e4m3fn, no infinities): finite values beyond the largest normal
//!   saturate to ±448 (`|x| > 464`; 464 itself ties to 448), **and so do ±inf**; NaN becomes
//!   `0x7F` with the source's sign (`0xFF`). (Older torch produced NaN for `|x| >= 480`; torch
//!   2.15 saturates.)
//! - F32 -> F8_E5M2 rounds directly from F32 (not via F16), overflows to ±inf (`|x| >= 61440`),
//!   keeps ±inf, and NaN becomes `0x7F`/`0xFF` by sign.
//! - F32 -> F16 overflows to ±inf; NaN keeps its sign, sets the quiet bit and keeps the top
//!   mantissa bits (the x86 F16C instruction's rule).
//! - To BF16: NaN becomes `0xFFFF` (sign and payload dropped) when the source is F32 or F64, but
//!   `0x7FC0` when the source is F16, F8_E4M3 or F8_E5M2 (different kernels inside torch).
//! - To F32/F64: NaN keeps sign and payload with the quiet bit set, except BF16 -> F32, which is a
//!   plain 16-bit shift (a signalling NaN stays signalling). F8_E4M3's NaN `0x7F` widens to
//!   `0x7FF00000`; F8_E5M2 widens like F16 (`x << 8`).
//! - Subnormals are kept (no flush to zero), signed zeros keep their sign.
//!
//! torch itself encodes NaN differently in the scalar loop that finishes each parallel chunk for
//! F64 -> BF16 (`0x7FC0` instead of `0xFFFF`) and F16 -> F32 (`0x7FFFFFFF` instead of the
//! payload-keeping NaN); which elements land there depends on torch's thread count. We follow the
//! vectorised loop, which converts all but at most 15 elements per chunk. Values other than NaN
//! never depend on the position.

use std::ops::{Add, AddAssign};

use crate::safetensors::Dtype;
use half::f16;
use half::slice::HalfFloatSliceExt;
use serde::Serialize;

/// What a cast did to the values, for the conversion report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CastStats {
    /// Finite source values that became ±inf or were saturated to the destination's largest
    /// finite value (F8_E4M3). An infinite source saturated to ±448 is not counted here.
    pub overflowed: u64,
    /// NaN or ±inf values in the output.
    pub non_finite: u64,
}

impl Add for CastStats {
    type Output = CastStats;
    fn add(self, rhs: CastStats) -> CastStats {
        CastStats {
            overflowed: self.overflowed + rhs.overflowed,
            non_finite: self.non_finite + rhs.non_finite,
        }
    }
}

impl AddAssign for CastStats {
    fn add_assign(&mut self, rhs: CastStats) {
        *self = *self + rhs;
    }
}

impl std::iter::Sum for CastStats {
    fn sum<I: Iterator<Item = CastStats>>(iter: I) -> CastStats {
        iter.fold(CastStats::default(), Add::add)
    }
}

/// Why a cast could not run. These are caller mistakes or unsupported dtypes, never data errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CastError {
    /// The source dtype is not one [`cast_slice`] reads (see [`is_cast_source`]).
    #[error("cannot cast from {0}: not a supported source dtype")]
    UnsupportedSource(Dtype),
    /// The destination dtype is not one [`cast_slice`] writes (see [`is_cast_target`]).
    #[error("cannot cast to {0}: not a supported destination dtype")]
    UnsupportedTarget(Dtype),
    /// The source slice ends in the middle of an element.
    #[error("{len} source bytes are not a whole number of {dtype} elements")]
    RaggedSource {
        /// The source dtype.
        dtype: Dtype,
        /// Length of the source slice in bytes.
        len: usize,
    },
    /// The destination slice does not hold exactly as many elements as the source.
    #[error("destination has {actual} bytes, the cast produces {expected}")]
    DestinationLength {
        /// Bytes the cast writes.
        expected: usize,
        /// Bytes the destination slice has.
        actual: usize,
    },
}

/// Whether [`cast_slice`] reads this dtype.
pub const fn is_cast_source(d: Dtype) -> bool {
    matches!(
        d,
        Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F8E4M3 | Dtype::F8E5M2
    )
}

/// Whether [`cast_slice`] writes this dtype.
pub const fn is_cast_target(d: Dtype) -> bool {
    is_cast_source(d)
}

/// Bytes per element of a castable dtype.
const fn elem_size(d: Dtype) -> usize {
    (d.bits() / 8) as usize
}

/// Elements one task of [`cast_slice_par`] casts: large enough to amortise scheduling, small
/// enough to spread a chunk over every core.
const PAR_TASK_ELEMS: usize = 1 << 16;

/// [`cast_slice`] spread over the rayon pool in tasks of 64K elements (casts are elementwise,
/// so the split never changes the bytes); the statistics are summed.
pub fn cast_slice_par(
    src: Dtype,
    src_bytes: &[u8],
    dst: Dtype,
    dst_bytes: &mut [u8],
) -> Result<CastStats, CastError> {
    use rayon::prelude::*;
    let (ss, ds) = ((src.bits() / 8) as usize, (dst.bits() / 8) as usize);
    if ss == 0 || ds == 0 || src_bytes.len() <= PAR_TASK_ELEMS * ss {
        return cast_slice(src, src_bytes, dst, dst_bytes);
    }
    src_bytes
        .par_chunks(PAR_TASK_ELEMS * ss)
        .zip(dst_bytes.par_chunks_mut(PAR_TASK_ELEMS * ds))
        .map(|(s, d)| cast_slice(src, s, dst, d))
        .try_reduce(CastStats::default, |a, b| Ok(a + b))
}

/// Casts the little-endian elements in `src_bytes` (dtype `src`) into `dst_bytes` (dtype `dst`),
/// exactly as `torch.Tensor.to` does on CPU (see the module docs for the rules).
///
/// `dst_bytes` must hold exactly as many elements as `src_bytes`. When `src == dst` the bytes
/// are copied.
pub fn cast_slice(
    src: Dtype,
    src_bytes: &[u8],
    dst: Dtype,
    dst_bytes: &mut [u8],
) -> Result<CastStats, CastError> {
    if !is_cast_source(src) {
        return Err(CastError::UnsupportedSource(src));
    }
    if !is_cast_target(dst) {
        return Err(CastError::UnsupportedTarget(dst));
    }
    let (ss, ds) = (elem_size(src), elem_size(dst));
    if !src_bytes.len().is_multiple_of(ss) {
        return Err(CastError::RaggedSource {
            dtype: src,
            len: src_bytes.len(),
        });
    }
    let n = src_bytes.len() / ss;
    let expected = n.checked_mul(ds).ok_or(CastError::DestinationLength {
        expected: usize::MAX,
        actual: dst_bytes.len(),
    })?;
    if dst_bytes.len() != expected {
        return Err(CastError::DestinationLength {
            expected,
            actual: dst_bytes.len(),
        });
    }
    if src == dst {
        dst_bytes.copy_from_slice(src_bytes);
        return Ok(CastStats {
            overflowed: 0,
            non_finite: count_non_finite(dst, dst_bytes),
        });
    }
    Ok(cast_dispatch(src, src_bytes, dst, dst_bytes))
}

/// Widens the little-endian elements in `src_bytes` (dtype `src`) to F32 values in `out`: the
/// values and counts of [`cast_slice`] to [`Dtype::F32`], bit for bit, without the byte buffer
/// in between. For converters that compute on F32 (quantizers).
///
/// `out` must hold exactly as many elements as `src_bytes`.
pub fn widen_to_f32(src: Dtype, src_bytes: &[u8], out: &mut [f32]) -> Result<CastStats, CastError> {
    if !is_cast_source(src) {
        return Err(CastError::UnsupportedSource(src));
    }
    let ss = elem_size(src);
    if !src_bytes.len().is_multiple_of(ss) {
        return Err(CastError::RaggedSource {
            dtype: src,
            len: src_bytes.len(),
        });
    }
    if src_bytes.len() / ss != out.len() {
        return Err(CastError::DestinationLength {
            expected: src_bytes.len() / ss * 4,
            actual: out.len() * 4,
        });
    }
    let mut stats = CastStats::default();
    for (s, o) in src_bytes.chunks(CHUNK * ss).zip(out.chunks_mut(CHUNK)) {
        stats.overflowed += load_f32(src, s, o);
        stats.non_finite += o.iter().map(|v| !v.is_finite() as u32).sum::<u32>() as u64;
    }
    Ok(stats)
}

/// Runs [`cast_loop`] compiled for AVX2 when the CPU has it, else for the build's baseline.
/// The loop is integer and IEEE arithmetic only (no fused or reassociated operations), so both
/// compilations give the same bits; AVX2 doubles the lanes of the vectorised loops (the f32 ->
/// bf16 one in particular, which is compute-bound once its chunk is in cache).
fn cast_dispatch(src: Dtype, src_bytes: &[u8], dst: Dtype, dst_bytes: &mut [u8]) -> CastStats {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { cast_loop_avx2(src, src_bytes, dst, dst_bytes) };
    }
    cast_loop(src, src_bytes, dst, dst_bytes)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn cast_loop_avx2(src: Dtype, src_bytes: &[u8], dst: Dtype, dst_bytes: &mut [u8]) -> CastStats {
    cast_loop(src, src_bytes, dst, dst_bytes)
}

/// The cast of checked, equally long `src_bytes` and `dst_bytes` (`src != dst`).
#[inline(always)]
fn cast_loop(src: Dtype, src_bytes: &[u8], dst: Dtype, dst_bytes: &mut [u8]) -> CastStats {
    if src == Dtype::F32 && dst == Dtype::BF16 {
        return f32_to_bf16_direct(src_bytes, dst_bytes);
    }
    let (ss, ds) = (elem_size(src), elem_size(dst));
    let mut stats = CastStats::default();
    let mut vals = [0f32; CHUNK];
    for (s, d) in src_bytes
        .chunks(CHUNK * ss)
        .zip(dst_bytes.chunks_mut(CHUNK * ds))
    {
        let vals = &mut vals[..s.len() / ss];
        stats.overflowed += load_f32(src, s, vals);
        stats += store_f32(src, vals, dst, d);
    }
    stats
}

/// Elements per round trip through the F32 intermediate: small enough for L1.
const CHUNK: usize = 1024;

/// NaN and ±inf elements in `bytes` of dtype `d` (0 for non-float dtypes).
pub fn count_non_finite(d: Dtype, bytes: &[u8]) -> u64 {
    match d {
        Dtype::F64 => bytes
            .chunks_exact(8)
            .filter(|c| u64_le(c) & 0x7FF0_0000_0000_0000 == 0x7FF0_0000_0000_0000)
            .count() as u64,
        Dtype::F32 => bytes
            .chunks_exact(4)
            .filter(|c| u32_le(c) & 0x7F80_0000 == 0x7F80_0000)
            .count() as u64,
        Dtype::F16 => bytes
            .chunks_exact(2)
            .filter(|c| u16_le(c) & 0x7C00 == 0x7C00)
            .count() as u64,
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .filter(|c| u16_le(c) & 0x7F80 == 0x7F80)
            .count() as u64,
        Dtype::F8E4M3 => bytes.iter().filter(|&&b| b & 0x7F == 0x7F).count() as u64,
        Dtype::F8E5M2 => bytes.iter().filter(|&&b| b & 0x7C == 0x7C).count() as u64,
        _ => 0,
    }
}

#[inline(always)]
fn u16_le(c: &[u8]) -> u16 {
    u16::from_le_bytes([c[0], c[1]])
}
#[inline(always)]
fn u32_le(c: &[u8]) -> u32 {
    u32::from_le_bytes([c[0], c[1], c[2], c[3]])
}
#[inline(always)]
fn u64_le(c: &[u8]) -> u64 {
    u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
}

/// The hot path of the product (f32 checkpoints to bf16): one pass, no intermediate, written so
/// that the compiler vectorises it (fixed-size arrays, no branches, plain integer lanes).
///
/// Counting overflows and non-finite outputs per element took as long as the cast itself, and
/// real checkpoints almost never have any: each block only ORs its outputs' exponent fields
/// into a flag, and the rare flagged block is counted again exactly by [`f32_to_bf16_stats`].
#[inline(always)]
fn f32_to_bf16_direct(src: &[u8], dst: &mut [u8]) -> CastStats {
    let (src, _) = src.as_chunks::<4>();
    let (dst, _) = dst.as_chunks_mut::<2>();
    let mut stats = CastStats::default();
    for (s, d) in src.chunks(CHUNK).zip(dst.chunks_mut(CHUNK)) {
        // (out & 0x7F80) + 0x80 reaches 0x8000 exactly when the exponent is all ones.
        let mut exponent_full = 0u16;
        for (s, d) in s.iter().zip(d.iter_mut()) {
            let out = f32_bits_to_bf16(u32::from_le_bytes(*s), BF16_NAN_FROM_F32);
            exponent_full |= (out & 0x7F80) + 0x80;
            *d = out.to_le_bytes();
        }
        if exponent_full & 0x8000 != 0 {
            stats += f32_to_bf16_stats(s, d);
        }
    }
    stats
}

/// The counts of one block cast by [`f32_to_bf16_direct`]: outputs that are ±inf or NaN, and
/// those among them whose source was finite.
#[cold]
fn f32_to_bf16_stats(src: &[[u8; 4]], dst: &[[u8; 2]]) -> CastStats {
    let mut stats = CastStats::default();
    for (s, d) in src.iter().zip(dst) {
        let in_finite = u32::from_le_bytes(*s) & 0x7F80_0000 != 0x7F80_0000;
        let out_non_finite = u16::from_le_bytes(*d) & 0x7F80 == 0x7F80;
        stats.overflowed += u64::from(in_finite && out_non_finite);
        stats.non_finite += u64::from(out_non_finite);
    }
    stats
}

/// torch's F32/F64 -> BF16 NaN (vectorised kernel).
pub(crate) const BF16_NAN_FROM_F32: u16 = 0xFFFF;
/// torch's F16/F8 -> BF16 NaN (scalar `c10::BFloat16` constructor).
const BF16_NAN_FROM_NARROW: u16 = 0x7FC0;

#[inline(always)]
pub(crate) fn f32_bits_to_bf16(bits: u32, nan: u16) -> u16 {
    if bits & 0x7FFF_FFFF > 0x7F80_0000 {
        nan
    } else {
        // Round to nearest even at bit 16; a carry into the exponent gives inf, as it should.
        ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
    }
}

/// F64 -> F32 with the NaN rule pinned down (Rust leaves NaN payloads of `as` unspecified).
#[inline(always)]
fn f64_to_f32(x: f64) -> f32 {
    if x.is_nan() {
        let b = x.to_bits();
        let sign = ((b >> 32) as u32) & 0x8000_0000;
        f32::from_bits(sign | 0x7FC0_0000 | (((b >> 29) as u32) & 0x007F_FFFF))
    } else {
        x as f32
    }
}

/// F32 -> F64, NaN quieted with its payload kept.
#[inline(always)]
fn f32_to_f64_bits(x: f32) -> u64 {
    let b = x.to_bits();
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        (((b & 0x8000_0000) as u64) << 32)
            | 0x7FF8_0000_0000_0000
            | (((b & 0x007F_FFFF) as u64) << 29)
    } else {
        (x as f64).to_bits()
    }
}

/// F32 bits -> fp8 e4m3fn, torch 2.15's saturating rule.
///
/// Every case is computed and then selected, without branches, so loops over it vectorise.
#[inline(always)]
pub(crate) fn f32_bits_to_e4m3fn(bits: u32) -> u8 {
    let sign = (bits >> 24) & 0x80;
    let abs = bits & 0x7FFF_FFFF;
    // Below 2^-6 the result is subnormal with unit 2^-9: let the FPU round x + 2^14 at that unit
    // (round-to-nearest-even is Rust's fixed floating-point environment). Only used below 2^-6.
    const MAGIC: f32 = 16384.0;
    let subnormal = (f32::from_bits(abs) + MAGIC)
        .to_bits()
        .wrapping_sub(MAGIC.to_bits());
    // Normal: round to nearest even at bit 20, rebias the exponent (127 -> 7).
    let odd = (abs >> 20) & 1;
    let normal = (abs + 0x7_FFFF + odd).wrapping_sub(120 << 23) >> 20;
    let mut mag = if abs < 0x3C80_0000 { subnormal } else { normal };
    // |x| >= 464 (inf included): 464 ties to even 448, everything above saturates.
    mag = if abs >= 0x43E8_0000 { 0x7E } else { mag };
    mag = if abs > 0x7F80_0000 { 0x7F } else { mag };
    (sign | mag) as u8
}

/// F32 bits -> fp8 e5m2 (no saturation), branch-free like [`f32_bits_to_e4m3fn`].
#[inline(always)]
pub(crate) fn f32_bits_to_e5m2(bits: u32) -> u8 {
    let sign = (bits >> 24) & 0x80;
    let abs = bits & 0x7FFF_FFFF;
    // Subnormal result (below 2^-14), unit 2^-16.
    const MAGIC: f32 = 128.0;
    let subnormal = (f32::from_bits(abs) + MAGIC)
        .to_bits()
        .wrapping_sub(MAGIC.to_bits());
    let odd = (abs >> 21) & 1;
    let normal = (abs + 0xF_FFFF + odd).wrapping_sub(112 << 23) >> 21;
    let mut mag = if abs < 0x3880_0000 { subnormal } else { normal };
    // |x| >= 61440 ties or rounds up past 57344: inf.
    mag = if abs >= 0x4770_0000 { 0x7C } else { mag };
    mag = if abs > 0x7F80_0000 { 0x7F } else { mag };
    (sign | mag) as u8
}

const fn f16_bits_to_f32_bits(h: u16) -> u32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let e = ((h >> 10) & 0x1F) as u32;
    let m = (h & 0x3FF) as u32;
    if e == 31 {
        if m == 0 {
            sign | 0x7F80_0000
        } else {
            sign | 0x7FC0_0000 | (m << 13)
        }
    } else if e == 0 {
        if m == 0 {
            sign
        } else {
            // m * 2^-24, normalised.
            let p = 31 - m.leading_zeros();
            sign | ((p + 127 - 24) << 23) | ((m << (23 - p)) & 0x007F_FFFF)
        }
    } else {
        sign | ((e + 112) << 23) | (m << 13)
    }
}

const fn e4m3fn_to_f32_bits(b: u8) -> u32 {
    let sign = ((b & 0x80) as u32) << 24;
    let e = ((b >> 3) & 0xF) as u32;
    let m = (b & 7) as u32;
    if e == 15 && m == 7 {
        // torch widens the NaN pattern bit by bit: all-ones exponent, mantissa 111 at the top.
        sign | 0x7FF0_0000
    } else if e == 0 {
        if m == 0 {
            sign
        } else {
            // m * 2^-9, normalised.
            let p = 31 - m.leading_zeros();
            sign | ((p + 127 - 9) << 23) | ((m << (23 - p)) & 0x007F_FFFF)
        }
    } else {
        sign | ((e + 120) << 23) | (m << 20)
    }
}

const fn build_lut(e4m3: bool) -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = if e4m3 {
            e4m3fn_to_f32_bits(i as u8)
        } else {
            f16_bits_to_f32_bits((i as u16) << 8)
        };
        i += 1;
    }
    t
}

/// F8_E4M3 -> F32 bits, all 256 patterns.
pub(crate) static E4M3FN_TO_F32: [u32; 256] = build_lut(true);
/// F8_E5M2 -> F32 bits, all 256 patterns.
pub(crate) static E5M2_TO_F32: [u32; 256] = build_lut(false);

/// Widens `src` elements to F32 into `out` (same count, at most [`CHUNK`]). Returns how many
/// finite values overflowed (only F64 can).
fn load_f32(src: Dtype, bytes: &[u8], out: &mut [f32]) -> u64 {
    match src {
        Dtype::F64 => {
            let mut overflowed = 0u32;
            for (c, o) in bytes.as_chunks::<8>().0.iter().zip(out.iter_mut()) {
                let x = f64::from_bits(u64::from_le_bytes(*c));
                *o = f64_to_f32(x);
                overflowed += (x.is_finite() & o.is_infinite()) as u32;
            }
            overflowed as u64
        }
        Dtype::F32 => {
            for (c, o) in bytes.as_chunks::<4>().0.iter().zip(out.iter_mut()) {
                *o = f32::from_bits(u32::from_le_bytes(*c));
            }
            0
        }
        Dtype::F16 => {
            let mut halves = [f16::ZERO; CHUNK];
            let halves = &mut halves[..out.len()];
            for (c, h) in bytes.as_chunks::<2>().0.iter().zip(halves.iter_mut()) {
                *h = f16::from_bits(u16::from_le_bytes(*c));
            }
            // `half` uses F16C when the CPU has it, else the same rule in software; both match
            // torch's vectorised kernel (verified against the all-patterns golden).
            halves.convert_to_f32_slice(out);
            0
        }
        Dtype::BF16 => {
            for (c, o) in bytes.as_chunks::<2>().0.iter().zip(out.iter_mut()) {
                *o = f32::from_bits((u16::from_le_bytes(*c) as u32) << 16);
            }
            0
        }
        Dtype::F8E4M3 => {
            for (&b, o) in bytes.iter().zip(out.iter_mut()) {
                *o = f32::from_bits(E4M3FN_TO_F32[b as usize]);
            }
            0
        }
        Dtype::F8E5M2 => {
            for (&b, o) in bytes.iter().zip(out.iter_mut()) {
                *o = f32::from_bits(E5M2_TO_F32[b as usize]);
            }
            0
        }
        _ => unreachable!("checked by cast_slice"),
    }
}

/// Narrows (or widens) F32 values (at most [`CHUNK`]) to `dst`, counting overflows of finite
/// values and non-finite outputs.
fn store_f32(src: Dtype, vals: &[f32], dst: Dtype, out: &mut [u8]) -> CastStats {
    // Per-call counts fit in 32 bits (CHUNK elements); narrow counters vectorise better.
    let mut overflowed = 0u32;
    let mut non_finite = 0u32;
    match dst {
        Dtype::F64 => {
            for (&v, o) in vals.iter().zip(out.as_chunks_mut::<8>().0.iter_mut()) {
                *o = f32_to_f64_bits(v).to_le_bytes();
                non_finite += !v.is_finite() as u32;
            }
        }
        Dtype::F32 => {
            for (&v, o) in vals.iter().zip(out.as_chunks_mut::<4>().0.iter_mut()) {
                *o = v.to_bits().to_le_bytes();
                non_finite += !v.is_finite() as u32;
            }
        }
        Dtype::F16 => {
            let mut halves = [f16::ZERO; CHUNK];
            let halves = &mut halves[..vals.len()];
            halves.convert_from_f32_slice(vals);
            for ((&h, &v), o) in halves
                .iter()
                .zip(vals)
                .zip(out.as_chunks_mut::<2>().0.iter_mut())
            {
                let bits = h.to_bits();
                *o = bits.to_le_bytes();
                let out_non_finite = bits & 0x7C00 == 0x7C00;
                let in_finite = v.to_bits() & 0x7F80_0000 != 0x7F80_0000;
                overflowed += (in_finite & out_non_finite) as u32;
                non_finite += out_non_finite as u32;
            }
        }
        Dtype::BF16 => {
            let nan = match src {
                Dtype::F64 | Dtype::F32 => BF16_NAN_FROM_F32,
                _ => BF16_NAN_FROM_NARROW,
            };
            for (&v, o) in vals.iter().zip(out.as_chunks_mut::<2>().0.iter_mut()) {
                let bits = f32_bits_to_bf16(v.to_bits(), nan);
                *o = bits.to_le_bytes();
                let out_non_finite = bits & 0x7F80 == 0x7F80;
                let in_finite = v.to_bits() & 0x7F80_0000 != 0x7F80_0000;
                overflowed += (in_finite & out_non_finite) as u32;
                non_finite += out_non_finite as u32;
            }
        }
        Dtype::F8E4M3 => {
            for (&v, o) in vals.iter().zip(out.iter_mut()) {
                let bits = v.to_bits();
                *o = f32_bits_to_e4m3fn(bits);
                let abs = bits & 0x7FFF_FFFF;
                overflowed += ((abs > 0x43E8_0000) & (abs < 0x7F80_0000)) as u32;
                non_finite += (*o & 0x7F == 0x7F) as u32;
            }
        }
        Dtype::F8E5M2 => {
            for (&v, o) in vals.iter().zip(out.iter_mut()) {
                let bits = v.to_bits();
                *o = f32_bits_to_e5m2(bits);
                let out_non_finite = *o & 0x7C == 0x7C;
                let in_finite = bits & 0x7F80_0000 != 0x7F80_0000;
                overflowed += (in_finite & out_non_finite) as u32;
                non_finite += out_non_finite as u32;
            }
        }
        _ => unreachable!("checked by cast_slice"),
    }
    CastStats {
        overflowed: overflowed as u64,
        non_finite: non_finite as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cast_one_f32(x: f32, dst: Dtype) -> (Vec<u8>, CastStats) {
        let mut out = vec![0u8; elem_size(dst)];
        let stats = cast_slice(Dtype::F32, &x.to_le_bytes(), dst, &mut out).unwrap();
        (out, stats)
    }

    #[test]
    fn e4m3fn_saturates_finite_overflow_and_infinities() {
        assert_eq!(cast_one_f32(1e6, Dtype::F8E4M3).0, [0x7E]);
        assert_eq!(cast_one_f32(-1e6, Dtype::F8E4M3).0, [0xFE]);
        assert_eq!(cast_one_f32(f32::INFINITY, Dtype::F8E4M3).0, [0x7E]);
        assert_eq!(cast_one_f32(f32::NEG_INFINITY, Dtype::F8E4M3).0, [0xFE]);
        assert_eq!(cast_one_f32(f32::NAN, Dtype::F8E4M3).0, [0x7F]);
        assert_eq!(cast_one_f32(-f32::NAN, Dtype::F8E4M3).0, [0xFF]);
        let (_, s) = cast_one_f32(500.0, Dtype::F8E4M3);
        assert_eq!(
            s,
            CastStats {
                overflowed: 1,
                non_finite: 0
            }
        );
        let (_, s) = cast_one_f32(f32::INFINITY, Dtype::F8E4M3);
        assert_eq!(s, CastStats::default());
    }

    #[test]
    fn e5m2_keeps_infinities_and_overflows_to_inf() {
        assert_eq!(cast_one_f32(f32::INFINITY, Dtype::F8E5M2).0, [0x7C]);
        assert_eq!(cast_one_f32(61440.0, Dtype::F8E5M2).0, [0x7C]);
        assert_eq!(cast_one_f32(57344.0, Dtype::F8E5M2).0, [0x7B]);
        let (_, s) = cast_one_f32(1e6, Dtype::F8E5M2);
        assert_eq!(
            s,
            CastStats {
                overflowed: 1,
                non_finite: 1
            }
        );
    }

    #[test]
    fn f16_overflow_is_counted() {
        let (out, s) = cast_one_f32(1e6, Dtype::F16);
        assert_eq!(out, 0x7C00u16.to_le_bytes());
        assert_eq!(
            s,
            CastStats {
                overflowed: 1,
                non_finite: 1
            }
        );
        let (_, s) = cast_one_f32(f32::INFINITY, Dtype::F16);
        assert_eq!(
            s,
            CastStats {
                overflowed: 0,
                non_finite: 1
            }
        );
    }

    #[test]
    fn f64_to_f16_rounds_twice_through_f32() {
        let x: f64 = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        let mut out = [0u8; 2];
        cast_slice(Dtype::F64, &x.to_le_bytes(), Dtype::F16, &mut out).unwrap();
        assert_eq!(u16::from_le_bytes(out), 0x3C00);
    }

    #[test]
    fn lengths_are_checked() {
        let mut out = [0u8; 3];
        assert!(matches!(
            cast_slice(Dtype::F32, &[0u8; 4], Dtype::F16, &mut out),
            Err(CastError::DestinationLength {
                expected: 2,
                actual: 3
            })
        ));
        assert!(matches!(
            cast_slice(Dtype::F32, &[0u8; 5], Dtype::F16, &mut out),
            Err(CastError::RaggedSource { .. })
        ));
        assert!(matches!(
            cast_slice(Dtype::F8E8M0, &[0u8; 1], Dtype::F16, &mut out),
            Err(CastError::UnsupportedSource(Dtype::F8E8M0))
        ));
        assert!(matches!(
            cast_slice(Dtype::F32, &[0u8; 4], Dtype::I32, &mut [0u8; 4]),
            Err(CastError::UnsupportedTarget(Dtype::I32))
        ));
    }

    /// The block-flagged counts of the f32 -> bf16 path equal a count element by element,
    /// whether the specials sit at the start, middle or end of a block or in a short tail.
    #[test]
    fn f32_to_bf16_counts_match_an_element_by_element_count() {
        let specials = [
            f32::INFINITY.to_bits(),
            f32::NEG_INFINITY.to_bits(),
            f32::NAN.to_bits(),
            0xFF80_0001,        // a negative signalling NaN
            f32::MAX.to_bits(), // rounds up to inf: an overflow
            0x7F7F_8000,        // the smallest f32 that rounds to inf
            0x7F7F_7FFF,        // the largest that does not
        ];
        let n = 3 * CHUNK + 37;
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut random = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Finite values of ordinary magnitude, as in a checkpoint.
            ((x >> 32) as u32 & 0x3FFF_FFFF) | ((x as u32) & 0x8000_0000)
        };
        let positions = [0, 1, CHUNK - 1, CHUNK, CHUNK + 500, 3 * CHUNK, n - 1];
        for (k, &special) in specials.iter().enumerate() {
            for plant in [&positions[..1], &positions[k % 3..], &positions[..]] {
                let mut values: Vec<u32> = (0..n).map(|_| random()).collect();
                for &p in plant {
                    values[p] = special;
                }
                let src: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                let mut dst = vec![0u8; n * 2];
                let stats = cast_dispatch(Dtype::F32, &src, Dtype::BF16, &mut dst);
                let mut expected = CastStats::default();
                for (i, &v) in values.iter().enumerate() {
                    let out = f32_bits_to_bf16(v, BF16_NAN_FROM_F32);
                    assert_eq!(u16::from_le_bytes([dst[2 * i], dst[2 * i + 1]]), out);
                    let out_non_finite = out & 0x7F80 == 0x7F80;
                    expected.non_finite += u64::from(out_non_finite);
                    expected.overflowed +=
                        u64::from(out_non_finite && v & 0x7F80_0000 != 0x7F80_0000);
                }
                assert_eq!(stats, expected, "special {special:#x} at {plant:?}");
                // The planted values are all there is to count (the last special stays finite).
                let planted = if special == 0x7F7F_7FFF {
                    0
                } else {
                    plant.len()
                };
                assert_eq!(expected.non_finite, planted as u64);
            }
        }
    }

    /// Every dtype the casts read and write.
    fn float_dtypes() -> Vec<Dtype> {
        Dtype::ALL
            .into_iter()
            .filter(|&d| is_cast_source(d))
            .collect()
    }

    /// `n` pseudo-random bytes (xorshift64 from `seed`): every bit pattern, NaNs included.
    fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }

    /// `widen_to_f32` gives the bits `cast_slice` to F32 gives, for every source dtype, on
    /// random bit patterns (NaNs, infinities, subnormals) longer than one block.
    #[test]
    fn widening_matches_the_cast_to_f32() {
        let bytes = random_bytes(0x1234_5678_9ABC_DEF1, 8 * (4 * CHUNK + 77));
        for src in float_dtypes() {
            let n = bytes.len() / 8;
            let input = &bytes[..n * elem_size(src)];
            let mut cast = vec![0u8; n * 4];
            let cast_stats = cast_slice(src, input, Dtype::F32, &mut cast).unwrap();
            let mut widened = vec![0f32; n];
            let stats = widen_to_f32(src, input, &mut widened).unwrap();
            assert_eq!(stats, cast_stats, "{src}");
            assert!(stats.non_finite > 0, "{src}: no specials drawn");
            for (i, (w, c)) in widened.iter().zip(cast.as_chunks::<4>().0).enumerate() {
                assert_eq!(w.to_bits(), u32::from_le_bytes(*c), "{src} element {i}");
            }
        }
        assert!(matches!(
            widen_to_f32(Dtype::BF16, &[0u8; 4], &mut [0f32; 3]),
            Err(CastError::DestinationLength { .. })
        ));
        assert!(matches!(
            widen_to_f32(Dtype::I32, &[0u8; 4], &mut [0f32; 1]),
            Err(CastError::UnsupportedSource(Dtype::I32))
        ));
    }

    /// The AVX2 compilation of the cast loop gives the same bits and counts as the baseline
    /// one, for every pair of dtypes, on random bit patterns (NaNs, infinities, subnormals).
    #[test]
    fn the_dispatched_loop_matches_the_baseline_loop() {
        let bytes = random_bytes(0x2545_F491_4F6C_DD1D, 8 * 5000);
        for src in float_dtypes() {
            for dst in float_dtypes() {
                if src == dst {
                    continue;
                }
                let (ss, ds) = (elem_size(src), elem_size(dst));
                let n = bytes.len() / 8;
                let input = &bytes[..n * ss];
                let mut a = vec![0u8; n * ds];
                let mut b = vec![0u8; n * ds];
                let sa = cast_loop(src, input, dst, &mut a);
                let sb = cast_dispatch(src, input, dst, &mut b);
                assert!(a == b, "{src} -> {dst}");
                assert_eq!(sa, sb, "{src} -> {dst}");
            }
        }
    }
}
