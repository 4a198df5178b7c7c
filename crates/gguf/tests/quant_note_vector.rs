//! The golden test vector of ggml-quants.md §10 (16 rows × 4096, xorshift32 input).
//!
//! The note's first-8-byte values come from ggml's reference quantizer on x86-64. Its
//! whole-buffer FNV values (and its "FMA-contracted" values) could not be reproduced from its
//! own input description: its input hash differs too, while every first block matches. So the
//! full-buffer hashes are checked against ggml's own output in
//! `quant_goldens::ggml_goldens_note_vector_full_hashes`, and the FMA trap is checked here
//! against hashes measured on this input with ggml-quants.c (ggml d99724f2) built
//! `gcc -O3 -march=native` on an AVX2+FMA x86-64 (GCC contracts `a*b+c` into FMAs there).

mod quant_support;

use gguf::GgmlType;
use gguf::quant::{quantize_scalar, quantize_to_vec};

fn first8(ty: GgmlType, x: &[f32], scalar: bool) -> String {
    let bytes = if scalar {
        let mut out = vec![0u8; ty.bytes_for(x.len() as u64).expect("whole blocks") as usize];
        quantize_scalar(ty, x, &mut out).expect("quantize");
        out
    } else {
        quantize_to_vec(ty, x).expect("quantize")
    };
    bytes[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn note_vector_first_bytes_match_ggml_x86_64() {
    let x = quant_support::note_vector();
    assert_eq!(x.len(), 16 * 4096);
    let expected = [
        (GgmlType::Q4_0, "e99a8c7949a46388"),
        (GgmlType::Q2K, "cf7afd9aef9bedb9"),
        (GgmlType::Q3K, "bb5335166697ac32"),
        (GgmlType::Q4K, "d403dd0ffef7ffbb"),
        (GgmlType::Q5K, "ee010110fbb7ffb7"),
        (GgmlType::Q6K, "8e82d5704bfe216a"),
    ];
    for (ty, want) in expected {
        assert_eq!(first8(ty, &x, false), want, "{ty}");
        assert_eq!(first8(ty, &x, true), want, "{ty} (scalar)");
    }
}

#[test]
fn note_vector_is_not_the_fma_contracted_output() {
    let x = quant_support::note_vector();
    let fused = [
        (GgmlType::Q2K, "f649b42346c0de5a"),
        (GgmlType::Q4K, "423d775cae0514ba"),
        (GgmlType::Q5K, "17e49164fb3ec115"),
        (GgmlType::Q6K, "0299e7a059762752"),
    ];
    for (ty, fma) in fused {
        let mut bytes = quantize_to_vec(ty, &x).expect("quantize");
        assert_ne!(
            quant_support::fnv1a64(&bytes),
            fma,
            "{ty}: like the FMA build"
        );
        quantize_scalar(ty, &x, &mut bytes).expect("quantize");
        assert_ne!(
            quant_support::fnv1a64(&bytes),
            fma,
            "{ty}: scalar like the FMA build"
        );
    }
}

#[test]
fn note_vector_sizes() {
    let x = quant_support::note_vector();
    let sizes = [
        (GgmlType::Q4_0, 36864),
        (GgmlType::Q4_1, 40960),
        (GgmlType::Q5_0, 45056),
        (GgmlType::Q5_1, 49152),
        (GgmlType::Q8_0, 69632),
        (GgmlType::Q2K, 21504),
        (GgmlType::Q3K, 28160),
        (GgmlType::Q4K, 36864),
        (GgmlType::Q5K, 45056),
        (GgmlType::Q6K, 53760),
        (GgmlType::F16, 131072),
        (GgmlType::BF16, 131072),
    ];
    for (ty, n) in sizes {
        assert_eq!(quantize_to_vec(ty, &x).expect("quantize").len(), n, "{ty}");
    }
}
