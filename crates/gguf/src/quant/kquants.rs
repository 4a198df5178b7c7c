//! The 256-value super-block formats Q2_K, Q3_K, Q4_K, Q5_K and Q6_K
//! (ggml: src/ggml-quants.c `quantize_row_q*_K_ref`, `dequantize_row_q*_K`).
//!
//! Each quantizer has two phases: a per-sub-block scale search (`make_qkx2_quants`,
//! `make_q3_quants`, `make_qx_quants`), which is where the time goes and which has an AVX2
//! twin in `super::x86`, and a cheap scalar finish (scale packing, re-quantization, bit
//! packing) shared by both paths.

// Index loops mirror ggml's C loops one for one, which keeps the port auditable.
#![allow(clippy::needless_range_loop)]

use super::BlockFormat;
use super::common::{nearest_int, read_f16, write_f16};
use super::legacy::{fixed, fixed_mut};
use crate::types::GgmlType;

const QK_K: usize = 256;
/// ggml's GROUP_MAX_EPS: below this a sub-block counts as all zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Result of a Q2_K/Q4_K/Q5_K scale search over the sub-blocks of one super-block.
#[derive(Debug, Clone)]
pub(crate) struct MinScaleSearch<const NSUB: usize> {
    pub scales: [f32; NSUB],
    /// `the_min` of each sub-block (the negated offset, ≥ 0 or −0.0).
    pub mins: [f32; NSUB],
    /// Per-value levels from the search (kept for sub-blocks whose final scale is zero).
    pub l: [u8; QK_K],
}

/// Parameters of one `make_qkx2_quants` use.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Qkx2Params {
    pub nmax: i32,
    pub rmin: f32,
    pub rdelta: f32,
    pub nstep: i32,
    pub use_mad: bool,
}

pub(crate) const Q2K_PARAMS: Qkx2Params = Qkx2Params {
    nmax: 3,
    rmin: -0.5,
    rdelta: 0.1,
    nstep: 15,
    use_mad: true,
};
pub(crate) const Q4K_PARAMS: Qkx2Params = Qkx2Params {
    nmax: 15,
    rmin: -1.0,
    rdelta: 0.1,
    nstep: 20,
    use_mad: false,
};
pub(crate) const Q5K_PARAMS: Qkx2Params = Qkx2Params {
    nmax: 31,
    rmin: -0.5,
    rdelta: 0.1,
    nstep: 15,
    use_mad: false,
};

/// ggml's `make_qkx2_quants`: weighted search over 1 + nstep + 1 candidate scales for an
/// affine (scale, min) fit. Returns (scale, the_min) and fills `l`.
pub(crate) fn make_qkx2_quants(x: &[f32], w: &[f32], l: &mut [u8], p: Qkx2Params) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let nmaxf = p.nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let err = |d: f32| if p.use_mad { d.abs() } else { d * d };
    let mut best_error = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, p.nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += w[i] * err(diff);
    }
    if p.nstep < 1 {
        return (scale, -min);
    }
    let mut laux = [0u8; 32];
    for is in 0..=p.nstep {
        iscale = (p.rmin + p.rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, p.nmax);
            laux[i] = q as u8;
            let lf = q as f32;
            let wl = w[i] * lf;
            sum_l += wl;
            sum_l2 += wl * lf;
            sum_xl += wl * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += w[i] * err(diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` with rmse_type 1 and no weights (Q6_K): symmetric levels in
/// −nmax..nmax−1 (stored +nmax), best of 19 candidate scales. Returns the (signed) scale.
pub(crate) fn make_qx_quants(x: &[f32], l: &mut [u8], nmax: i32) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    // w = x·x and (w·x) are the same IEEE results in every pass; computing them once changes
    // no bit. Sub-blocks are at most 16 values.
    let n = x.len().min(16);
    let (x, l) = (&x[..n], &mut l[..n]);
    let mut w = [0.0f32; 16];
    let mut wx = [0.0f32; 16];
    for i in 0..n {
        w[i] = x[i] * x[i];
        wx[i] = w[i] * x[i];
    }
    let nmaxf = nmax as f32;
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for i in 0..n {
            let qf = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1) as f32;
            sumlx += wx[i] * qf;
            suml2 += w[i] * qf * qf;
        }
        (sumlx, suml2)
    };
    let fill = |iscale: f32, l: &mut [u8]| {
        for i in 0..n {
            l[i] = (nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1) + nmax) as u8;
        }
    };
    let iscale = -nmaxf / max;
    let (sumlx, suml2) = sums(iscale);
    fill(iscale, l);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmaxf + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            fill(iscale, l);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `make_q3_quants` with do_rmse (Q3_K): levels in −nmax..nmax−1 refined one value at
/// a time for up to five passes. Fills `l` with level + nmax (or 0 for an all-zero
/// sub-block) and returns the scale.
pub(crate) fn make_q3_quants(x: &[f32], l: &mut [i8], nmax: i32) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for (i, &v) in x.iter().enumerate() {
        let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        l[i] = q as i8;
        let w = v * v;
        let qf = q as f32;
        sumlx += w * v * qf;
        suml2 += w * qf * qf;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for (i, &v) in x.iter().enumerate() {
            let w = v * v;
            let li = l[i] as f32;
            let mut slx = sumlx - w * v * li;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * li * li;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != l[i] as i32 {
                    let nf = new_l as f32;
                    slx += w * v * nf;
                    sl2 += w * nf * nf;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    for li in l.iter_mut() {
        *li += nmax as i8;
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

/// Q4_K/Q5_K scale search, scalar: per 32-value sub-block, weights av_x + |x|.
pub(crate) fn search_q45k_scalar(x: &[f32; QK_K], p: Qkx2Params) -> MinScaleSearch<8> {
    let mut out = MinScaleSearch {
        scales: [0.0; 8],
        mins: [0.0; 8],
        l: [0; QK_K],
    };
    let mut w = [0.0f32; 32];
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (wl, &v) in w.iter_mut().zip(xs) {
            *wl = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(xs, &w, &mut out.l[32 * j..32 * j + 32], p);
        out.scales[j] = s;
        out.mins[j] = m;
    }
    out
}

/// Q2_K scale search, scalar: per 16-value sub-block, weights |x|, absolute error.
pub(crate) fn search_q2k_scalar(x: &[f32; QK_K]) -> MinScaleSearch<16> {
    let mut out = MinScaleSearch {
        scales: [0.0; 16],
        mins: [0.0; 16],
        l: [0; QK_K],
    };
    let mut w = [0.0f32; 16];
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        for (wl, &v) in w.iter_mut().zip(xs) {
            *wl = v.abs();
        }
        let (s, m) = make_qkx2_quants(xs, &w, &mut out.l[16 * j..16 * j + 16], Q2K_PARAMS);
        out.scales[j] = s;
        out.mins[j] = m;
    }
    out
}

/// Q6_K scale search, scalar: `make_qx_quants(16, 32, ..)` per 16-value sub-block.
pub(crate) fn search_q6k_scalar(x: &[f32; QK_K]) -> ([f32; 16], [u8; QK_K]) {
    let mut scales = [0.0f32; 16];
    let mut l = [0u8; QK_K];
    for j in 0..16 {
        scales[j] = make_qx_quants(&x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16], 32);
    }
    (scales, l)
}

/// Re-quantization of one sub-block against its stored (scale, min), vectorized when `simd`.
#[inline]
fn requant_affine(x: &[f32], dm: f32, d: f32, nmax: i32, out: &mut [u8], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: callers pass simd = true only after detecting AVX2.
        unsafe { super::x86::requant_affine(x, dm, d, nmax, out) };
        return;
    }
    let _ = simd;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = nearest_int((v + dm) / d).clamp(0, nmax) as u8;
    }
}

/// Symmetric re-quantization (`clamp(nearest_int(x / d), lo, hi) + offset`).
#[inline]
fn requant_symmetric(x: &[f32], d: f32, lo: i32, hi: i32, offset: i32, out: &mut [u8], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: callers pass simd = true only after detecting AVX2.
        unsafe { super::x86::requant_symmetric(x, d, lo, hi, offset, out) };
        return;
    }
    let _ = simd;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (nearest_int(v / d).clamp(lo, hi) + offset) as u8;
    }
}

/// Largest value with ggml's strict `>` from a zero start.
fn running_max(v: &[f32]) -> f32 {
    let mut m = 0.0f32;
    for &s in v {
        if s > m {
            m = s;
        }
    }
    m
}

/// Q4_K/Q5_K scale decoding (ggml's `get_scale_min_k4`).
#[inline(always)]
fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Shared finish of Q4_K/Q5_K: packs the 6-bit scales/mins into `scales12`, returns
/// (d, dmin) as stored, and re-quantizes `l` with the stored scales.
fn finish_q45k(
    x: &[f32; QK_K],
    s: &mut MinScaleSearch<8>,
    nmax: i32,
    scales12: &mut [u8],
    simd: bool,
) -> (u16, u16) {
    let max_scale = running_max(&s.scales);
    let max_min = running_max(&s.mins);
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    scales12.fill(0);
    for j in 0..8 {
        // The u8 wrap comes before the clamp, as in C.
        let ls = (nearest_int(inv_scale * s.scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * s.mins[j]) as u8).min(63);
        if j < 4 {
            scales12[j] = ls;
            scales12[j + 4] = lm;
        } else {
            scales12[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            scales12[j - 4] |= (ls >> 4) << 6;
            scales12[j] |= (lm >> 4) << 6;
        }
    }
    let d_bits = super::common::f32_to_f16_bits(max_scale / 63.0);
    let dmin_bits = super::common::f32_to_f16_bits(max_min / 63.0);
    let d_all = super::common::f16_bits_to_f32(d_bits);
    let dmin_all = super::common::f16_bits_to_f32(dmin_bits);
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, scales12);
        let d = d_all * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * m as f32;
        let r = 32 * j..32 * j + 32;
        requant_affine(&x[r.clone()], dm, d, nmax, &mut s.l[r], simd);
    }
    (d_bits, dmin_bits)
}

fn write_q4k(x: &[f32; QK_K], mut s: MinScaleSearch<8>, y: &mut [u8; 144], simd: bool) {
    let (d, dmin) = finish_q45k(x, &mut s, 15, &mut y[4..16], simd);
    y[0..2].copy_from_slice(&d.to_le_bytes());
    y[2..4].copy_from_slice(&dmin.to_le_bytes());
    for c in 0..4 {
        for l in 0..32 {
            y[16 + 32 * c + l] = s.l[64 * c + l] | (s.l[64 * c + l + 32] << 4);
        }
    }
}

fn write_q5k(x: &[f32; QK_K], mut s: MinScaleSearch<8>, y: &mut [u8; 176], simd: bool) {
    let (d, dmin) = finish_q45k(x, &mut s, 31, &mut y[4..16], simd);
    y[0..2].copy_from_slice(&d.to_le_bytes());
    y[2..4].copy_from_slice(&dmin.to_le_bytes());
    let (qh, ql) = y[16..].split_at_mut(32);
    qh.fill(0);
    let (mut m1, mut m2) = (1u8, 2u8);
    for c in 0..4 {
        for j in 0..32 {
            let mut l1 = s.l[64 * c + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = s.l[64 * c + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[32 * c + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
}

fn write_q2k(x: &[f32; QK_K], mut s: MinScaleSearch<16>, y: &mut [u8; 84], simd: bool) {
    let max_scale = running_max(&s.scales);
    let max_min = running_max(&s.mins);
    let (scales, rest) = y.split_at_mut(16);
    let (qs, dd) = rest.split_at_mut(64);
    if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for j in 0..16 {
            scales[j] = nearest_int(iscale * s.scales[j]) as u8;
        }
        write_f16(dd, 0, max_scale / 15.0);
    } else {
        scales.fill(0);
        write_f16(dd, 0, 0.0);
    }
    if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for j in 0..16 {
            scales[j] |= (nearest_int(iscale * s.mins[j]) << 4) as u8;
        }
        write_f16(dd, 2, max_min / 15.0);
    } else {
        write_f16(dd, 2, 0.0);
    }
    let d_all = read_f16(dd, 0);
    let dmin_all = read_f16(dd, 2);
    for j in 0..16 {
        let d = d_all * (scales[j] & 0x0f) as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * (scales[j] >> 4) as f32;
        let r = 16 * j..16 * j + 16;
        requant_affine(&x[r.clone()], dm, d, 3, &mut s.l[r], simd);
    }
    pack_2bit(&s.l, qs);
}

/// Packs 256 two-bit levels: element e goes to byte 32·(e/128) + e%32 at shift 2·((e%128)/32).
fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8]) {
    for h in 0..2 {
        for i in 0..32 {
            let b = 128 * h + i;
            qs[32 * h + i] = l[b] | (l[b + 32] << 2) | (l[b + 64] << 4) | (l[b + 96] << 6);
        }
    }
}

fn write_q6k(
    x: &[f32; QK_K],
    scales_f: [f32; 16],
    mut l: [u8; QK_K],
    y: &mut [u8; 210],
    simd: bool,
) {
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for &s in &scales_f {
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        y.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    write_f16(y, 208, 1.0 / iscale);
    let d_all = read_f16(y, 208);
    for (j, &s) in scales_f.iter().enumerate() {
        y[192 + j] = nearest_int(iscale * s).min(127) as i8 as u8;
    }
    for j in 0..16 {
        let d = d_all * (y[192 + j] as i8) as f32;
        if d == 0.0 {
            continue;
        }
        let r = 16 * j..16 * j + 16;
        requant_symmetric(&x[r.clone()], d, -32, 31, 32, &mut l[r], simd);
    }
    let (ql, rest) = y.split_at_mut(128);
    let qh = &mut rest[..64];
    for h in 0..2 {
        for i in 0..32 {
            let b = 128 * h + i;
            let (q1, q2, q3, q4) = (l[b], l[b + 32], l[b + 64], l[b + 96]);
            ql[64 * h + i] = (q1 & 0x0f) | ((q3 & 0x0f) << 4);
            ql[64 * h + i + 32] = (q2 & 0x0f) | ((q4 & 0x0f) << 4);
            qh[32 * h + i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}

/// Q3_K scale search, scalar: `make_q3_quants(16, 4, ..)` per 16-value sub-block.
/// Returns (scales, levels + 4, or 0 for all-zero sub-blocks).
pub(crate) fn search_q3k_scalar(x: &[f32; QK_K]) -> ([f32; 16], [u8; QK_K]) {
    let mut l = [0i8; 16];
    let mut levels = [0u8; QK_K];
    let mut scales_f = [0.0f32; 16];
    for j in 0..16 {
        scales_f[j] = make_q3_quants(&x[16 * j..16 * j + 16], &mut l, 4);
        for (o, &v) in levels[16 * j..16 * j + 16].iter_mut().zip(&l) {
            *o = v as u8;
        }
    }
    (scales_f, levels)
}

fn quantize_q3k(x: &[f32; QK_K], y: &mut [u8; 110], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    let (scales_f, mut l) = if simd {
        // SAFETY: callers pass simd = true only after detecting AVX2.
        unsafe { super::x86::search_q3k_avx2(x) }
    } else {
        search_q3k_scalar(x)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (scales_f, mut l) = search_q3k_scalar(x);
    let mut max_scale = 0.0f32;
    let mut amax = 0.0f32;
    for &sc in &scales_f {
        if sc.abs() > amax {
            amax = sc.abs();
            max_scale = sc;
        }
    }
    let (hmask, rest) = y.split_at_mut(32);
    let (qs, rest) = rest.split_at_mut(64);
    let (scales, dd) = rest.split_at_mut(12);
    scales.fill(0);
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for j in 0..16 {
            let q = nearest_int(iscale * scales_f[j]) as i8 as i32;
            let v = (q.clamp(-32, 31) + 32) as u8;
            if j < 8 {
                scales[j] = v & 0x0f;
            } else {
                scales[j - 8] |= (v & 0x0f) << 4;
            }
            scales[8 + j % 4] |= (v >> 4) << (2 * (j / 4));
        }
        write_f16(dd, 0, 1.0 / iscale);
    } else {
        write_f16(dd, 0, 0.0);
    }
    let d_all = read_f16(dd, 0);
    for j in 0..16 {
        let d = d_all * (q3k_scale(scales, j) - 32) as f32;
        if d == 0.0 {
            continue;
        }
        let r = 16 * j..16 * j + 16;
        requant_symmetric(&x[r.clone()], d, -4, 3, 4, &mut l[r], simd);
    }
    hmask.fill(0);
    for (e, v) in l.iter_mut().enumerate() {
        if *v > 3 {
            hmask[e % 32] |= 1 << (e / 32);
            *v -= 4;
        }
    }
    pack_2bit(&l, qs);
}

/// The 6-bit Q3_K scale of sub-block j (0..63, meaning value − 32).
#[inline(always)]
fn q3k_scale(scales: &[u8], j: usize) -> i32 {
    let low = if j < 8 {
        scales[j] & 0x0f
    } else {
        scales[j - 8] >> 4
    };
    (low | (((scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i32
}

/// Q2_K: 2-bit levels, 16 sub-blocks of 16 with 4-bit scales and mins (84 bytes).
#[derive(Debug, Clone, Copy, Default)]
pub struct Q2K;
/// Q3_K: 3-bit symmetric levels, 16 sub-blocks of 16 with 6-bit scales (110 bytes).
#[derive(Debug, Clone, Copy, Default)]
pub struct Q3K;
/// Q4_K: 4-bit levels, 8 sub-blocks of 32 with 6-bit scales and mins (144 bytes).
#[derive(Debug, Clone, Copy, Default)]
pub struct Q4K;
/// Q5_K: 5-bit levels, 8 sub-blocks of 32 with 6-bit scales and mins (176 bytes).
#[derive(Debug, Clone, Copy, Default)]
pub struct Q5K;
/// Q6_K: 6-bit symmetric levels, 16 sub-blocks of 16 with 8-bit scales (210 bytes).
#[derive(Debug, Clone, Copy, Default)]
pub struct Q6K;

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

impl BlockFormat for Q2K {
    const TYPE: GgmlType = GgmlType::Q2K;
    const BLOCK_ELEMS: usize = QK_K;
    const BLOCK_BYTES: usize = 84;

    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        let x = fixed(src);
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 was detected on this CPU just above.
            let s = unsafe { super::x86::search_q2k_avx2(x) };
            return write_q2k(x, s, fixed_mut(dst), true);
        }
        write_q2k(x, search_q2k_scalar(x), fixed_mut(dst), false);
    }

    fn quantize_block_scalar(src: &[f32], dst: &mut [u8]) {
        let x = fixed(src);
        write_q2k(x, search_q2k_scalar(x), fixed_mut(dst), false);
    }

    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let (x, y): (&[u8; 84], &mut [f32; QK_K]) = (fixed(src), fixed_mut(dst));
        let d = read_f16(x, 80);
        let min = read_f16(x, 82);
        for e in 0..QK_K {
            let sc = x[e / 16];
            let dl = d * (sc & 0x0f) as f32;
            let ml = min * (sc >> 4) as f32;
            let q = (x[16 + 32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
            y[e] = dl * q as f32 - ml;
        }
    }
}

impl BlockFormat for Q3K {
    const TYPE: GgmlType = GgmlType::Q3K;
    const BLOCK_ELEMS: usize = QK_K;
    const BLOCK_BYTES: usize = 110;

    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            return quantize_q3k(fixed(src), fixed_mut(dst), true);
        }
        quantize_q3k(fixed(src), fixed_mut(dst), false);
    }

    fn quantize_block_scalar(src: &[f32], dst: &mut [u8]) {
        quantize_q3k(fixed(src), fixed_mut(dst), false);
    }

    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let (x, y): (&[u8; 110], &mut [f32; QK_K]) = (fixed(src), fixed_mut(dst));
        let d_all = read_f16(x, 108);
        let scales = &x[96..108];
        for j in 0..16 {
            let dl = d_all * (q3k_scale(scales, j) - 32) as f32;
            for ii in 0..16 {
                let e = 16 * j + ii;
                let q = ((x[32 + 32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3) as i32;
                let high = x[e % 32] & (1 << (e / 32)) != 0;
                y[e] = dl * (q - if high { 0 } else { 4 }) as f32;
            }
        }
    }
}

impl BlockFormat for Q4K {
    const TYPE: GgmlType = GgmlType::Q4K;
    const BLOCK_ELEMS: usize = QK_K;
    const BLOCK_BYTES: usize = 144;

    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        let x = fixed(src);
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 was detected on this CPU just above.
            let s = unsafe { super::x86::search_q45k_avx2(x, Q4K_PARAMS) };
            return write_q4k(x, s, fixed_mut(dst), true);
        }
        write_q4k(x, search_q45k_scalar(x, Q4K_PARAMS), fixed_mut(dst), false);
    }

    fn quantize_block_scalar(src: &[f32], dst: &mut [u8]) {
        let x = fixed(src);
        write_q4k(x, search_q45k_scalar(x, Q4K_PARAMS), fixed_mut(dst), false);
    }

    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let (x, y): (&[u8; 144], &mut [f32; QK_K]) = (fixed(src), fixed_mut(dst));
        let d = read_f16(x, 0);
        let min = read_f16(x, 2);
        let scales = &x[4..16];
        for j in 0..8 {
            let (sc, m) = get_scale_min_k4(j, scales);
            let d1 = d * sc as f32;
            let m1 = min * m as f32;
            let (c, hi) = (j / 2, j % 2 == 1);
            for l in 0..32 {
                let b = x[16 + 32 * c + l];
                let q = if hi { b >> 4 } else { b & 0x0f };
                y[32 * j + l] = d1 * q as f32 - m1;
            }
        }
    }
}

impl BlockFormat for Q5K {
    const TYPE: GgmlType = GgmlType::Q5K;
    const BLOCK_ELEMS: usize = QK_K;
    const BLOCK_BYTES: usize = 176;

    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        let x = fixed(src);
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 was detected on this CPU just above.
            let s = unsafe { super::x86::search_q45k_avx2(x, Q5K_PARAMS) };
            return write_q5k(x, s, fixed_mut(dst), true);
        }
        write_q5k(x, search_q45k_scalar(x, Q5K_PARAMS), fixed_mut(dst), false);
    }

    fn quantize_block_scalar(src: &[f32], dst: &mut [u8]) {
        let x = fixed(src);
        write_q5k(x, search_q45k_scalar(x, Q5K_PARAMS), fixed_mut(dst), false);
    }

    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let (x, y): (&[u8; 176], &mut [f32; QK_K]) = (fixed(src), fixed_mut(dst));
        let d = read_f16(x, 0);
        let min = read_f16(x, 2);
        let scales = &x[4..16];
        let qh = &x[16..48];
        for j in 0..8 {
            let (sc, m) = get_scale_min_k4(j, scales);
            let d1 = d * sc as f32;
            let m1 = min * m as f32;
            let (c, hi) = (j / 2, j % 2 == 1);
            for l in 0..32 {
                let b = x[48 + 32 * c + l];
                let low = if hi { b >> 4 } else { b & 0x0f };
                let high = if qh[l] & (1 << j) != 0 { 16 } else { 0 };
                y[32 * j + l] = d1 * (low + high) as f32 - m1;
            }
        }
    }
}

impl BlockFormat for Q6K {
    const TYPE: GgmlType = GgmlType::Q6K;
    const BLOCK_ELEMS: usize = QK_K;
    const BLOCK_BYTES: usize = 210;

    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        let x = fixed(src);
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 was detected on this CPU just above.
            let (s, l) = unsafe { super::x86::search_q6k_avx2(x) };
            return write_q6k(x, s, l, fixed_mut(dst), true);
        }
        let (s, l) = search_q6k_scalar(x);
        write_q6k(x, s, l, fixed_mut(dst), false);
    }

    fn quantize_block_scalar(src: &[f32], dst: &mut [u8]) {
        let x = fixed(src);
        let (s, l) = search_q6k_scalar(x);
        write_q6k(x, s, l, fixed_mut(dst), false);
    }

    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let (x, y): (&[u8; 210], &mut [f32; QK_K]) = (fixed(src), fixed_mut(dst));
        let d = read_f16(x, 208);
        for e in 0..QK_K {
            let (h, r) = (e / 128, e % 128);
            let (g, l) = (r / 32, r % 32);
            let b = x[64 * h + l + 32 * (g & 1)];
            let low = if g < 2 { b & 0x0f } else { b >> 4 };
            let high = (x[128 + 32 * h + l] >> (2 * g)) & 3;
            let q = (low | (high << 4)) as i32 - 32;
            let sc = x[192 + e / 16] as i8;
            y[e] = d * sc as f32 * q as f32;
        }
    }
}
