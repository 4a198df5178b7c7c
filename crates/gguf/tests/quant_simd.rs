//! The dispatched (SIMD where available) kernels write exactly the bytes of the portable
//! scalar kernels, on random inputs of varied magnitude and shape and on arbitrary non-NaN
//! bit patterns; every kernel survives NaN inputs without panicking.

use gguf::GgmlType;
use gguf::quant::{dequantize_to_vec, quantize_scalar, quantize_to_vec};
use proptest::prelude::*;

/// A super-block of values: a per-block magnitude, a pattern of zeroed sub-blocks and an
/// optional outlier, so the search's edge branches (degenerate, D ≤ 0, zero scale) are hit.
fn superblock() -> impl Strategy<Value = Vec<f32>> {
    (
        prop::collection::vec(-1.0f32..1.0, 256),
        prop::sample::select(vec![1e-30f32, 1e-12, 1e-4, 0.02, 1.0, 500.0, 6e4]),
        any::<u16>(),
        prop::option::of((0usize..256, -1e5f32..1e5)),
        any::<bool>(),
    )
        .prop_map(|(mut v, scale, zero_mask, outlier, positive)| {
            for (i, x) in v.iter_mut().enumerate() {
                *x *= scale;
                if positive {
                    *x = x.abs();
                }
                if zero_mask & (1 << (i / 16)) != 0 {
                    *x = 0.0;
                }
            }
            if let Some((i, o)) = outlier {
                v[i] = o;
            }
            v
        })
}

/// The types with a SIMD path (plus Q3_K, whose single path must also stay deterministic).
const SIMD_TYPES: [GgmlType; 6] = [
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn simd_equals_scalar(blocks in prop::collection::vec(superblock(), 1..4)) {
        let x: Vec<f32> = blocks.concat();
        for ty in SIMD_TYPES {
            let fast = quantize_to_vec(ty, &x).expect("quantize");
            let mut slow = vec![0u8; fast.len()];
            quantize_scalar(ty, &x, &mut slow).expect("quantize");
            prop_assert_eq!(&fast, &slow, "{}", ty);
        }
    }

    /// Any finite or infinite bit pattern (overflowing sums, infinite scales): both paths
    /// agree. NaN inputs are only required not to panic: Rust, like C, leaves the payload of
    /// a NaN produced from two NaN operands unspecified, and `nearest_int`'s bit trick turns
    /// the payload into a level, so neither path nor ggml has defined bytes for them.
    #[test]
    fn arbitrary_bits_agree_and_never_panic(bits in prop::collection::vec(any::<u32>(), 256)) {
        let raw: Vec<f32> = bits.iter().map(|b| f32::from_bits(*b)).collect();
        let no_nan: Vec<f32> = raw
            .iter()
            .map(|v| if v.is_nan() { f32::INFINITY.copysign(*v) } else { *v })
            .collect();
        for ty in GgmlType::ALL {
            let fast = quantize_to_vec(ty, &no_nan).expect("quantize");
            let mut slow = vec![0u8; fast.len()];
            quantize_scalar(ty, &no_nan, &mut slow).expect("quantize");
            prop_assert_eq!(&fast, &slow, "{}", ty);
            let with_nan = quantize_to_vec(ty, &raw).expect("quantize");
            let back = dequantize_to_vec(ty, &with_nan).expect("dequantize");
            prop_assert_eq!(back.len(), raw.len());
        }
    }

    #[test]
    fn arbitrary_bytes_dequantize(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
        for ty in GgmlType::ALL {
            let whole = bytes.len() / ty.type_size() * ty.type_size();
            let out = dequantize_to_vec(ty, &bytes[..whole]).expect("whole blocks");
            prop_assert_eq!(out.len(), whole / ty.type_size() * ty.block_size());
            if whole != bytes.len() {
                prop_assert!(dequantize_to_vec(ty, &bytes).is_err());
            }
        }
    }
}
