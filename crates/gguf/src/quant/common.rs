//! Scalar primitives shared by every format, each reproducing the exact bits of its ggml
//! counterpart (ggml: src/ggml-quants.c `nearest_int`, src/ggml-impl.h fp16/bf16 helpers).

/// ggml's `nearest_int`: round half to even through the 1.5·2²³ bias.
///
/// Kept as the bit trick rather than `round_ties_even` because ggml's release builds do not
/// check the ±4194303 range, and out-of-range inputs (a tiny sub-block scale next to a huge
/// value) must wrap exactly as they do in C.
#[inline(always)]
pub(crate) fn nearest_int(f: f32) -> i32 {
    let v = f + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// A C `float` → narrow-integer conversion as x86-64 performs it: `cvttss2si` truncates to
/// a 32-bit int (NaN and out-of-range give `INT_MIN`), and the narrow store keeps the low
/// bits. Rust's saturating `as` differs only outside the i32 range, which non-finite inputs
/// reach.
#[inline(always)]
pub(crate) fn c_trunc_i32(f: f32) -> i32 {
    if f.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&f) {
        i32::MIN
    } else {
        f as i32
    }
}

/// fp32 → IEEE binary16 bits exactly as ggml's software conversion (round to nearest even,
/// subnormals kept, overflow to infinity, every NaN to the quiet `0x7E00` with its sign).
#[inline]
pub fn f32_to_f16_bits(f: f32) -> u16 {
    let scale_to_inf = f32::from_bits(0x7780_0000); // 2^112
    let scale_to_zero = f32::from_bits(0x0880_0000); // 2^-110
    let mut base = (f.abs() * scale_to_inf) * scale_to_zero;
    let w = f.to_bits();
    let shl1_w = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let mut bias = shl1_w & 0xff00_0000;
    if bias < 0x7100_0000 {
        bias = 0x7100_0000;
    }
    base += f32::from_bits((bias >> 1) + 0x0780_0000);
    let bits = base.to_bits();
    let exp_bits = (bits >> 13) & 0x0000_7c00;
    let mantissa_bits = bits & 0x0000_0fff;
    let nonsign = exp_bits + mantissa_bits;
    let low = if shl1_w > 0xff00_0000 {
        0x7e00
    } else {
        nonsign
    };
    ((sign >> 16) | low) as u16
}

/// IEEE binary16 bits → fp32, exact (NaN payloads quieted, as ggml's conversion does).
#[inline]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let w = (h as u32) << 16;
    let sign = w & 0x8000_0000;
    let two_w = w.wrapping_add(w);
    let exp_offset = 0xe0u32 << 23;
    let exp_scale = f32::from_bits(0x0780_0000); // 2^-112
    let normalized = f32::from_bits((two_w >> 4) + exp_offset) * exp_scale;
    let magic_mask = 126u32 << 23;
    let denormalized = f32::from_bits((two_w >> 17) | magic_mask) - 0.5;
    let denormalized_cutoff = 1u32 << 27;
    let result = sign
        | if two_w < denormalized_cutoff {
            denormalized.to_bits()
        } else {
            normalized.to_bits()
        };
    f32::from_bits(result)
}

/// fp32 → bfloat16 bits as ggml's `ggml_compute_fp32_to_bf16`: round to nearest even, NaN
/// forced quiet by setting bit 6 of the upper half, subnormals kept.
#[inline]
pub fn f32_to_bf16_bits(f: f32) -> u16 {
    let u = f.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// bfloat16 bits → fp32 (exact).
#[inline]
pub fn bf16_bits_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Reads a little-endian fp16 field and widens it.
#[inline(always)]
pub(crate) fn read_f16(b: &[u8], at: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Stores `f` as a little-endian fp16 field.
#[inline(always)]
pub(crate) fn write_f16(b: &mut [u8], at: usize, f: f32) {
    b[at..at + 2].copy_from_slice(&f32_to_f16_bits(f).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_is_ties_to_even_in_range() {
        for v in [
            0.5f32,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            3.49,
            -3.51,
            4_194_303.0,
            -4_194_303.0,
        ] {
            assert_eq!(nearest_int(v), v.round_ties_even() as i32, "{v}");
        }
    }

    #[test]
    fn f16_matches_half_for_non_nan_and_quiets_nan() {
        let mut s = 0x9e37_79b9u32;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let f = f32::from_bits(s);
            let ours = f32_to_f16_bits(f);
            if f.is_nan() {
                assert_eq!(ours & 0x7fff, 0x7e00);
                assert_eq!(ours & 0x8000, ((s >> 16) & 0x8000) as u16);
            } else {
                assert_eq!(ours, half::f16::from_f32(f).to_bits(), "{f:e}");
            }
        }
        for h in 0..=u16::MAX {
            let a = f16_bits_to_f32(h);
            let b = half::f16::from_bits(h).to_f32();
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{h:#x}"
            );
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_quiets_nan() {
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80); // tie to even
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82); // tie to even
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x0000_8001)), 0x0001); // subnormal kept
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7f80); // rounds up to infinity
    }

    #[test]
    fn c_trunc_matches_cvttss2si() {
        assert_eq!(c_trunc_i32(f32::NAN), i32::MIN);
        assert_eq!(c_trunc_i32(f32::INFINITY), i32::MIN);
        assert_eq!(c_trunc_i32(-3.9), -3);
        assert_eq!(c_trunc_i32(16.49), 16);
    }
}
