//! AVX2 twins of the K-quant scale searches.
//!
//! Lane j of every vector holds sub-block j, and each lane performs exactly the scalar
//! sequence of IEEE single-precision operations of `super::kquants` (same operands, same order,
//! sums accumulated in index order, no FMA), so the results are bit-identical. Branches of
//! the scalar code become per-lane masks: a lane takes a branch's results only where the
//! scalar condition holds, and compares use the ordered/unordered predicate that matches the
//! C expression (`a > b` is `_CMP_GT_OQ`, `x ? ..` on a float is `_CMP_NEQ_UQ`).

// Index loops mirror ggml's C loops one for one, which keeps the port auditable.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::kquants::{MinScaleSearch, Q2K_PARAMS, Qkx2Params};

const QK_K: usize = 256;

/// `nearest_int` per lane (the 1.5·2²³ bias trick, wrapping exactly like the scalar one).
#[inline]
#[target_feature(enable = "avx2")]
fn nearest_int_v(v: __m256) -> __m256i {
    let t = _mm256_add_ps(v, _mm256_set1_ps(12_582_912.0));
    _mm256_sub_epi32(
        _mm256_and_si256(_mm256_castps_si256(t), _mm256_set1_epi32(0x007f_ffff)),
        _mm256_set1_epi32(0x0040_0000),
    )
}

#[inline]
#[target_feature(enable = "avx2")]
fn abs_v(v: __m256) -> __m256 {
    _mm256_andnot_ps(_mm256_set1_ps(-0.0), v)
}

#[inline]
#[target_feature(enable = "avx2")]
fn any(mask: __m256) -> bool {
    _mm256_movemask_ps(mask) != 0
}

/// Per-lane `make_qkx2_quants` over N values. `xt[i]`/`wt[i]` hold value i of each of the
/// eight sub-blocks. Returns (scale, the_min, levels as f32).
#[inline]
#[target_feature(enable = "avx2")]
fn qkx2_lanes<const N: usize>(
    xt: &[__m256; N],
    wt: &[__m256; N],
    p: Qkx2Params,
) -> (__m256, __m256, [__m256; N]) {
    let zero = _mm256_setzero_ps();
    let nmax_i = _mm256_set1_epi32(p.nmax);
    let zero_i = _mm256_setzero_si256();
    let err = |d: __m256| {
        if p.use_mad {
            abs_v(d)
        } else {
            _mm256_mul_ps(d, d)
        }
    };
    // `xm` caches x − min (the same IEEE subtraction the scalar loop repeats), refreshed
    // whenever a lane accepts a new min.
    let level = |iscale: __m256, xm: __m256| {
        let q = nearest_int_v(_mm256_mul_ps(iscale, xm));
        _mm256_cvtepi32_ps(_mm256_max_epi32(_mm256_min_epi32(q, nmax_i), zero_i))
    };

    let mut min = xt[0];
    let mut max = xt[0];
    let mut sum_w = wt[0];
    let mut sum_x = _mm256_mul_ps(sum_w, xt[0]);
    for i in 1..N {
        // minps(a, b) is `a < b ? a : b`, exactly `if (x < min) min = x`.
        min = _mm256_min_ps(xt[i], min);
        max = _mm256_max_ps(xt[i], max);
        sum_w = _mm256_add_ps(sum_w, wt[i]);
        sum_x = _mm256_add_ps(sum_x, _mm256_mul_ps(wt[i], xt[i]));
    }
    min = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(min, zero), min);
    let degenerate = _mm256_cmp_ps::<_CMP_EQ_OQ>(max, min);
    let min_start = min;
    let nmaxf = p.nmax as f32;
    let iscale = _mm256_div_ps(_mm256_set1_ps(nmaxf), _mm256_sub_ps(max, min));
    let mut scale = _mm256_div_ps(_mm256_set1_ps(1.0), iscale);

    let mut xm = [zero; N];
    for i in 0..N {
        xm[i] = _mm256_sub_ps(xt[i], min);
    }
    let mut l = [zero; N];
    let mut best_error = zero;
    for i in 0..N {
        let lf = level(iscale, xm[i]);
        l[i] = lf;
        let diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(scale, lf), min), xt[i]);
        best_error = _mm256_add_ps(best_error, _mm256_mul_ps(wt[i], err(diff)));
    }

    let mut laux = [zero; N];
    for is in 0..=p.nstep {
        // `min` may have been replaced by an earlier candidate, as in the scalar loop.
        let iscale = _mm256_div_ps(
            _mm256_set1_ps(p.rmin + p.rdelta * is as f32 + nmaxf),
            _mm256_sub_ps(max, min),
        );
        let (mut sum_l, mut sum_l2, mut sum_xl) = (zero, zero, zero);
        for i in 0..N {
            let lf = level(iscale, xm[i]);
            laux[i] = lf;
            let wl = _mm256_mul_ps(wt[i], lf);
            sum_l = _mm256_add_ps(sum_l, wl);
            sum_l2 = _mm256_add_ps(sum_l2, _mm256_mul_ps(wl, lf));
            sum_xl = _mm256_add_ps(sum_xl, _mm256_mul_ps(wl, xt[i]));
        }
        let d = _mm256_sub_ps(_mm256_mul_ps(sum_w, sum_l2), _mm256_mul_ps(sum_l, sum_l));
        let d_pos = _mm256_cmp_ps::<_CMP_GT_OQ>(d, zero);
        if !any(d_pos) {
            continue;
        }
        let mut this_scale = _mm256_div_ps(
            _mm256_sub_ps(_mm256_mul_ps(sum_w, sum_xl), _mm256_mul_ps(sum_x, sum_l)),
            d,
        );
        let mut this_min = _mm256_div_ps(
            _mm256_sub_ps(_mm256_mul_ps(sum_l2, sum_x), _mm256_mul_ps(sum_l, sum_xl)),
            d,
        );
        let min_pos = _mm256_cmp_ps::<_CMP_GT_OQ>(this_min, zero);
        this_min = _mm256_andnot_ps(min_pos, this_min);
        this_scale = _mm256_blendv_ps(this_scale, _mm256_div_ps(sum_xl, sum_l2), min_pos);
        let mut cur_error = zero;
        for i in 0..N {
            let diff = _mm256_sub_ps(
                _mm256_add_ps(_mm256_mul_ps(this_scale, laux[i]), this_min),
                xt[i],
            );
            cur_error = _mm256_add_ps(cur_error, _mm256_mul_ps(wt[i], err(diff)));
        }
        let better = _mm256_and_ps(d_pos, _mm256_cmp_ps::<_CMP_LT_OQ>(cur_error, best_error));
        if !any(better) {
            continue;
        }
        for i in 0..N {
            l[i] = _mm256_blendv_ps(l[i], laux[i], better);
        }
        best_error = _mm256_blendv_ps(best_error, cur_error, better);
        scale = _mm256_blendv_ps(scale, this_scale, better);
        min = _mm256_blendv_ps(min, this_min, better);
        for i in 0..N {
            xm[i] = _mm256_sub_ps(xt[i], min);
        }
    }

    // Degenerate lanes returned early in the scalar code: L = 0, scale 0, the_min = −min.
    let min = _mm256_blendv_ps(min, min_start, degenerate);
    let the_min = _mm256_xor_ps(min, _mm256_set1_ps(-0.0));
    let scale = _mm256_andnot_ps(degenerate, scale);
    for li in l.iter_mut() {
        *li = _mm256_andnot_ps(degenerate, *li);
    }
    (scale, the_min, l)
}

/// Loads value `i` of eight sub-blocks that start `stride` values apart.
#[inline]
#[target_feature(enable = "avx2")]
fn gather8(x: &[f32], base: usize, stride: usize, i: usize) -> __m256 {
    let s = stride;
    let b = base + i;
    _mm256_setr_ps(
        x[b],
        x[b + s],
        x[b + 2 * s],
        x[b + 3 * s],
        x[b + 4 * s],
        x[b + 5 * s],
        x[b + 6 * s],
        x[b + 7 * s],
    )
}

#[inline]
#[target_feature(enable = "avx2")]
fn lanes(v: __m256) -> [f32; 8] {
    let mut out = [0.0f32; 8];
    // SAFETY: `out` is 8 f32 = 32 writable bytes; storeu has no alignment requirement.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
    out
}

#[inline]
#[target_feature(enable = "avx2")]
fn lanes_i(v: __m256i) -> [i32; 8] {
    let mut out = [0i32; 8];
    // SAFETY: `out` is 8 i32 = 32 writable bytes; storeu has no alignment requirement.
    unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), v) };
    out
}

/// AVX2 Q4_K/Q5_K search: the eight 32-value sub-blocks in the eight lanes.
#[target_feature(enable = "avx2")]
pub(crate) fn search_q45k_avx2(x: &[f32; QK_K], p: Qkx2Params) -> MinScaleSearch<8> {
    let zero = _mm256_setzero_ps();
    let mut xt = [zero; 32];
    let mut wt = [zero; 32];
    let mut sum_x2 = zero;
    for i in 0..32 {
        xt[i] = gather8(x, 0, 32, i);
        sum_x2 = _mm256_add_ps(sum_x2, _mm256_mul_ps(xt[i], xt[i]));
    }
    let av_x = _mm256_sqrt_ps(_mm256_div_ps(sum_x2, _mm256_set1_ps(32.0)));
    for i in 0..32 {
        wt[i] = _mm256_add_ps(av_x, abs_v(xt[i]));
    }
    let (scale, the_min, l) = qkx2_lanes(&xt, &wt, p);
    let mut out = MinScaleSearch {
        scales: lanes(scale),
        mins: lanes(the_min),
        l: [0; QK_K],
    };
    for (i, li) in l.iter().enumerate() {
        let v = lanes_i(_mm256_cvttps_epi32(*li));
        for (j, &q) in v.iter().enumerate() {
            out.l[32 * j + i] = q as u8;
        }
    }
    out
}

/// AVX2 Q2_K search: sixteen 16-value sub-blocks as two groups of eight lanes.
#[target_feature(enable = "avx2")]
pub(crate) fn search_q2k_avx2(x: &[f32; QK_K]) -> MinScaleSearch<16> {
    let zero = _mm256_setzero_ps();
    let mut out = MinScaleSearch {
        scales: [0.0; 16],
        mins: [0.0; 16],
        l: [0; QK_K],
    };
    for g in 0..2 {
        let mut xt = [zero; 16];
        let mut wt = [zero; 16];
        for i in 0..16 {
            xt[i] = gather8(x, 128 * g, 16, i);
            wt[i] = abs_v(xt[i]);
        }
        let (scale, the_min, l) = qkx2_lanes(&xt, &wt, Q2K_PARAMS);
        out.scales[8 * g..8 * g + 8].copy_from_slice(&lanes(scale));
        out.mins[8 * g..8 * g + 8].copy_from_slice(&lanes(the_min));
        for (i, li) in l.iter().enumerate() {
            let v = lanes_i(_mm256_cvttps_epi32(*li));
            for (j, &q) in v.iter().enumerate() {
                out.l[128 * g + 16 * j + i] = q as u8;
            }
        }
    }
    out
}

/// AVX2 Q6_K search: per-lane `make_qx_quants(16, 32, .., rmse_type 1)` over sixteen
/// 16-value sub-blocks as two groups of eight lanes. Returns (scales, levels + 32).
#[target_feature(enable = "avx2")]
pub(crate) fn search_q6k_avx2(x: &[f32; QK_K]) -> ([f32; 16], [u8; QK_K]) {
    const NMAX: i32 = 32;
    let zero = _mm256_setzero_ps();
    let lo = _mm256_set1_epi32(-NMAX);
    let hi = _mm256_set1_epi32(NMAX - 1);
    let mut scales = [0.0f32; 16];
    let mut levels = [0u8; QK_K];
    for g in 0..2 {
        let mut xt = [zero; 16];
        let mut wx = [zero; 16];
        let mut max = zero;
        let mut amax = zero;
        for i in 0..16 {
            let v = gather8(x, 128 * g, 16, i);
            xt[i] = v;
            // (w·x) with w = x·x, the first product of `w*x[i]*l`.
            wx[i] = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
            let ax = abs_v(v);
            let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(ax, amax);
            amax = _mm256_blendv_ps(amax, ax, gt);
            max = _mm256_blendv_ps(max, v, gt);
        }
        let all_zero = _mm256_cmp_ps::<_CMP_LT_OQ>(amax, _mm256_set1_ps(1e-15));
        let pass = |iscale: __m256, l: &mut [__m256i; 16]| {
            let (mut sumlx, mut suml2) = (zero, zero);
            for i in 0..16 {
                let q = nearest_int_v(_mm256_mul_ps(iscale, xt[i]));
                let q = _mm256_max_epi32(_mm256_min_epi32(q, hi), lo);
                l[i] = q;
                let qf = _mm256_cvtepi32_ps(q);
                let w = _mm256_mul_ps(xt[i], xt[i]);
                sumlx = _mm256_add_ps(sumlx, _mm256_mul_ps(wx[i], qf));
                suml2 = _mm256_add_ps(suml2, _mm256_mul_ps(_mm256_mul_ps(w, qf), qf));
            }
            (sumlx, suml2)
        };
        let mut l = [_mm256_setzero_si256(); 16];
        let iscale = _mm256_div_ps(_mm256_set1_ps(-(NMAX as f32)), max);
        let (sumlx, suml2) = pass(iscale, &mut l);
        let nonzero = _mm256_cmp_ps::<_CMP_NEQ_UQ>(suml2, zero);
        let mut scale = _mm256_and_ps(nonzero, _mm256_div_ps(sumlx, suml2));
        let mut best = _mm256_mul_ps(scale, sumlx);
        let mut cand = [_mm256_setzero_si256(); 16];
        for is in -9i32..=9 {
            if is == 0 {
                continue;
            }
            let num = -(NMAX as f32 + 0.1 * is as f32);
            let iscale = _mm256_div_ps(_mm256_set1_ps(num), max);
            let (sumlx, suml2) = pass(iscale, &mut cand);
            let take = _mm256_and_ps(
                _mm256_cmp_ps::<_CMP_GT_OQ>(suml2, zero),
                _mm256_cmp_ps::<_CMP_GT_OQ>(
                    _mm256_mul_ps(sumlx, sumlx),
                    _mm256_mul_ps(best, suml2),
                ),
            );
            if !any(take) {
                continue;
            }
            let take_i = _mm256_castps_si256(take);
            for i in 0..16 {
                l[i] = _mm256_blendv_epi8(l[i], cand[i], take_i);
            }
            scale = _mm256_blendv_ps(scale, _mm256_div_ps(sumlx, suml2), take);
            best = _mm256_blendv_ps(best, _mm256_mul_ps(scale, sumlx), take);
        }
        let keep = _mm256_castps_si256(all_zero);
        scales[8 * g..8 * g + 8].copy_from_slice(&lanes(_mm256_andnot_ps(all_zero, scale)));
        for (i, li) in l.iter().enumerate() {
            let stored = _mm256_andnot_si256(keep, _mm256_add_epi32(*li, _mm256_set1_epi32(NMAX)));
            for (j, &q) in lanes_i(stored).iter().enumerate() {
                levels[128 * g + 16 * j + i] = q as u8;
            }
        }
    }
    (scales, levels)
}

/// `out[i] = clamp(nearest_int((x[i] + dm) / d), 0, nmax)`, eight values at a time; each
/// lane is the scalar expression. `x.len()` must be a multiple of 8 and equal `out.len()`.
#[target_feature(enable = "avx2")]
pub(crate) fn requant_affine(x: &[f32], dm: f32, d: f32, nmax: i32, out: &mut [u8]) {
    let (dmv, dv) = (_mm256_set1_ps(dm), _mm256_set1_ps(d));
    let (lo, hi) = (_mm256_setzero_si256(), _mm256_set1_epi32(nmax));
    for (xs, os) in x.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
        // SAFETY: `xs` has exactly 8 f32; loadu has no alignment requirement.
        let v = unsafe { _mm256_loadu_ps(xs.as_ptr()) };
        let q = nearest_int_v(_mm256_div_ps(_mm256_add_ps(v, dmv), dv));
        let q = _mm256_max_epi32(_mm256_min_epi32(q, hi), lo);
        for (o, q) in os.iter_mut().zip(lanes_i(q)) {
            *o = q as u8;
        }
    }
}

/// `out[i] = clamp(nearest_int(x[i] / d), lo, hi) + offset`, eight values at a time.
#[target_feature(enable = "avx2")]
pub(crate) fn requant_symmetric(x: &[f32], d: f32, lo: i32, hi: i32, offset: i32, out: &mut [u8]) {
    let dv = _mm256_set1_ps(d);
    let (lov, hiv, offv) = (
        _mm256_set1_epi32(lo),
        _mm256_set1_epi32(hi),
        _mm256_set1_epi32(offset),
    );
    for (xs, os) in x.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
        // SAFETY: `xs` has exactly 8 f32; loadu has no alignment requirement.
        let v = unsafe { _mm256_loadu_ps(xs.as_ptr()) };
        let q = nearest_int_v(_mm256_div_ps(v, dv));
        let q = _mm256_add_epi32(_mm256_max_epi32(_mm256_min_epi32(q, hiv), lov), offv);
        for (o, q) in os.iter_mut().zip(lanes_i(q)) {
            *o = q as u8;
        }
    }
}

/// Q8_0 block with AVX2. Returns `false` (writing nothing) when the block holds a NaN: C's
/// sequential `MAX(amax, |v|)` then depends on where the NaN sits, which only the scalar
/// scan reproduces. Without NaN the maximum is order-independent (|v| is never −0.0), and
/// `roundf` (half away from zero) is rebuilt exactly as trunc(p) ± 1 when |p − trunc(p)| ≥ ½.
#[target_feature(enable = "avx2")]
pub(crate) fn quantize_q8_0_avx2(x: &[f32; 32], y: &mut [u8; 34]) -> bool {
    let mut v = [_mm256_setzero_ps(); 4];
    let mut nan = _mm256_setzero_ps();
    let mut amax = _mm256_setzero_ps();
    for (k, vk) in v.iter_mut().enumerate() {
        // SAFETY: x has 32 values, so 8k..8k+8 is in bounds; loadu needs no alignment.
        *vk = unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * k)) };
        nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(*vk, *vk));
        amax = _mm256_max_ps(amax, abs_v(*vk));
    }
    if any(nan) {
        return false;
    }
    let amax = lanes(amax)
        .into_iter()
        .fold(0.0f32, |m, a| if m > a { m } else { a });
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[0..2].copy_from_slice(&super::common::f32_to_f16_bits(d).to_le_bytes());
    let idv = _mm256_set1_ps(id);
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    let sign = _mm256_set1_ps(-0.0);
    for (k, vk) in v.iter().enumerate() {
        let p = _mm256_mul_ps(*vk, idv);
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
        let away = _mm256_cmp_ps::<_CMP_GE_OQ>(abs_v(_mm256_sub_ps(p, t)), half);
        let step = _mm256_or_ps(_mm256_and_ps(p, sign), one);
        let r = _mm256_add_ps(t, _mm256_and_ps(away, step));
        // cvttps2dq gives INT_MIN for NaN/out of range, like the scalar `c_trunc_i32`.
        let q = lanes_i(_mm256_cvttps_epi32(r));
        for (o, q) in y[2 + 8 * k..2 + 8 * k + 8].iter_mut().zip(q) {
            *o = q as u8;
        }
    }
    true
}

/// AVX2 Q3_K search: per-lane `make_q3_quants(16, 4, .., do_rmse)` over sixteen 16-value
/// sub-blocks as two groups of eight lanes. The one-value-at-a-time refinement runs in every
/// lane in value order; a lane leaves the pass loop after a pass without change (the scalar
/// `break`), by dropping out of the `active` mask. Returns (scales, levels + 4 or 0).
#[target_feature(enable = "avx2")]
pub(crate) fn search_q3k_avx2(x: &[f32; QK_K]) -> ([f32; 16], [u8; QK_K]) {
    const NMAX: i32 = 4;
    let zero = _mm256_setzero_ps();
    let lo = _mm256_set1_epi32(-NMAX);
    let hi = _mm256_set1_epi32(NMAX - 1);
    let clamp_level = |v: __m256| {
        let q = nearest_int_v(v);
        _mm256_cvtepi32_ps(_mm256_max_epi32(_mm256_min_epi32(q, hi), lo))
    };
    let mut scales = [0.0f32; 16];
    let mut levels = [0u8; QK_K];
    for g in 0..2 {
        let mut xt = [zero; 16];
        let mut w = [zero; 16];
        let mut wx = [zero; 16];
        let mut max = zero;
        let mut amax = zero;
        for i in 0..16 {
            let v = gather8(x, 128 * g, 16, i);
            xt[i] = v;
            w[i] = _mm256_mul_ps(v, v);
            wx[i] = _mm256_mul_ps(w[i], v);
            let ax = abs_v(v);
            let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(ax, amax);
            amax = _mm256_blendv_ps(amax, ax, gt);
            max = _mm256_blendv_ps(max, v, gt);
        }
        let all_zero = _mm256_cmp_ps::<_CMP_LT_OQ>(amax, _mm256_set1_ps(1e-15));
        let iscale = _mm256_div_ps(_mm256_set1_ps(-(NMAX as f32)), max);
        let mut l = [zero; 16];
        let (mut sumlx, mut suml2) = (zero, zero);
        for i in 0..16 {
            let q = clamp_level(_mm256_mul_ps(iscale, xt[i]));
            l[i] = q;
            sumlx = _mm256_add_ps(sumlx, _mm256_mul_ps(wx[i], q));
            suml2 = _mm256_add_ps(suml2, _mm256_mul_ps(_mm256_mul_ps(w[i], q), q));
        }
        let mut active = _mm256_cmp_ps::<_CMP_EQ_OQ>(zero, zero);
        for _ in 0..5 {
            let mut changed = zero;
            for i in 0..16 {
                let slx = _mm256_sub_ps(sumlx, _mm256_mul_ps(wx[i], l[i]));
                let slx_pos = _mm256_cmp_ps::<_CMP_GT_OQ>(slx, zero);
                let sl2 = _mm256_sub_ps(suml2, _mm256_mul_ps(_mm256_mul_ps(w[i], l[i]), l[i]));
                let new_l = clamp_level(_mm256_div_ps(_mm256_mul_ps(xt[i], sl2), slx));
                let differs = _mm256_cmp_ps::<_CMP_NEQ_OQ>(new_l, l[i]);
                let slx2 = _mm256_add_ps(slx, _mm256_mul_ps(wx[i], new_l));
                let sl22 = _mm256_add_ps(sl2, _mm256_mul_ps(_mm256_mul_ps(w[i], new_l), new_l));
                let better = _mm256_and_ps(
                    _mm256_cmp_ps::<_CMP_GT_OQ>(sl22, zero),
                    _mm256_cmp_ps::<_CMP_GT_OQ>(
                        _mm256_mul_ps(_mm256_mul_ps(slx2, slx2), suml2),
                        _mm256_mul_ps(_mm256_mul_ps(sumlx, sumlx), sl22),
                    ),
                );
                let take = _mm256_and_ps(
                    _mm256_and_ps(active, slx_pos),
                    _mm256_and_ps(differs, better),
                );
                l[i] = _mm256_blendv_ps(l[i], new_l, take);
                sumlx = _mm256_blendv_ps(sumlx, slx2, take);
                suml2 = _mm256_blendv_ps(suml2, sl22, take);
                changed = _mm256_or_ps(changed, take);
            }
            active = _mm256_and_ps(active, changed);
            if !any(active) {
                break;
            }
        }
        let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(suml2, zero);
        let scale = _mm256_and_ps(pos, _mm256_div_ps(sumlx, suml2));
        scales[8 * g..8 * g + 8].copy_from_slice(&lanes(_mm256_andnot_ps(all_zero, scale)));
        let keep = _mm256_castps_si256(all_zero);
        for (i, li) in l.iter().enumerate() {
            let q = _mm256_add_epi32(_mm256_cvttps_epi32(*li), _mm256_set1_epi32(NMAX));
            let q = _mm256_andnot_si256(keep, q);
            for (j, &v) in lanes_i(q).iter().enumerate() {
                levels[128 * g + 16 * j + i] = v as u8;
            }
        }
    }
    (scales, levels)
}
