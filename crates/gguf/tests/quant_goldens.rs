//! Quantized bytes and dequantized f32 bits against goldens made by ggml itself
//! (`tests/golden/quant/make_goldens.py`: `ggml_quantize_chunk` without imatrix and the type
//! traits' `to_float`), for every type, on ordinary weights, zero blocks, outliers,
//! subnormals, f16-range extremes, constant blocks and exact ties, plus a 512-row sweep.

mod quant_support;

use gguf::GgmlType;
use gguf::quant::{dequantize, quantize, quantize_scalar};
use quant_support::{f32_bytes, fnv1a64, golden_dir};
use serde_json::Value;

fn manifest() -> Value {
    let text = std::fs::read_to_string(golden_dir().join("manifest.json")).expect("manifest");
    serde_json::from_str(&text).expect("manifest json")
}

fn case(m: &Value, name: &str) -> Value {
    m["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("case {name} missing"))
        .clone()
}

fn input_of(c: &Value) -> Vec<f32> {
    let name = c["name"].as_str().expect("name");
    match name {
        "sweep" => quant_support::sweep(),
        "note_vector" => quant_support::note_vector(),
        _ => {
            let raw = std::fs::read(golden_dir().join(c["input"].as_str().expect("input")))
                .expect("input file");
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        }
    }
}

/// Checks every type of one case; returns a list of mismatches instead of stopping at the
/// first so a failure shows the whole picture.
fn check_case(name: &str) {
    let m = manifest();
    let c = case(&m, name);
    let x = input_of(&c);
    assert_eq!(
        fnv1a64(&f32_bytes(&x)),
        c["input_fnv"],
        "{name}: input differs from the script's"
    );
    let stored = c
        .get("quant")
        .map(|q| std::fs::read(golden_dir().join(q.as_str().expect("quant"))).expect("quant file"));
    let mut failures = Vec::new();
    for ty in GgmlType::ALL {
        let rec = &c["outputs"][ty.name()];
        let len = rec["len"].as_u64().expect("len") as usize;
        let mut ours = vec![0u8; len];
        quantize(ty, &x, &mut ours).expect("quantize");
        let mut scalar = vec![0u8; len];
        quantize_scalar(ty, &x, &mut scalar).expect("quantize_scalar");
        let golden: Option<&[u8]> = stored.as_ref().map(|s| {
            let off = rec["offset"].as_u64().expect("offset") as usize;
            &s[off..off + len]
        });
        if fnv1a64(&ours) != rec["quant_fnv"] {
            let detail = golden
                .and_then(|g| {
                    g.iter().zip(&ours).position(|(a, b)| a != b).map(|p| {
                        format!(" first differing byte {p} (block {})", p / ty.type_size())
                    })
                })
                .unwrap_or_default();
            failures.push(format!("{name}/{ty}: quantized bytes differ{detail}"));
        }
        if scalar != ours {
            failures.push(format!(
                "{name}/{ty}: scalar path differs from the dispatched path"
            ));
        }
        // Dequantize ggml's own bytes when stored, else ours (equal when the check above passed).
        let src = golden.unwrap_or(&ours);
        let mut deq = vec![0f32; x.len()];
        dequantize(ty, src, &mut deq).expect("dequantize");
        if fnv1a64(&f32_bytes(&deq)) != rec["dequant_fnv"] {
            failures.push(format!("{name}/{ty}: dequantized f32 bits differ"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn ggml_goldens_ordinary_weights() {
    check_case("weights");
}

#[test]
fn ggml_goldens_zero_blocks() {
    check_case("zeros");
}

#[test]
fn ggml_goldens_one_huge_outlier() {
    check_case("outlier");
}

#[test]
fn ggml_goldens_subnormals() {
    check_case("subnormal");
}

#[test]
fn ggml_goldens_f16_range_extremes() {
    check_case("f16_extremes");
}

#[test]
fn ggml_goldens_constant_blocks_and_ties() {
    check_case("constant_and_ties");
}

#[test]
fn ggml_goldens_512_row_sweep() {
    check_case("sweep");
}

#[test]
fn ggml_goldens_note_vector_full_hashes() {
    check_case("note_vector");
}

/// The per-format row API (sequential, one thread) and the parallel entry point write the
/// same bytes: the split into rayon tasks never shows in the output.
#[test]
fn row_api_equals_parallel_entry_point() {
    use gguf::quant::{BlockFormat, Q2K, Q3K, Q4_0, Q4K, Q5K, Q6K, Q8_0};
    let x = quant_support::sweep();
    fn check<F: BlockFormat>(x: &[f32]) {
        let mut seq = vec![0u8; x.len() / F::BLOCK_ELEMS * F::BLOCK_BYTES];
        F::quantize_row(x, &mut seq).expect("row");
        let mut par = vec![0u8; seq.len()];
        quantize(F::TYPE, x, &mut par).expect("quantize");
        assert_eq!(seq, par, "{}", F::TYPE);
        let mut back_seq = vec![0f32; x.len()];
        F::dequantize_row(&seq, &mut back_seq).expect("row");
        let mut back_par = vec![0f32; x.len()];
        dequantize(F::TYPE, &par, &mut back_par).expect("dequantize");
        assert_eq!(f32_bytes(&back_seq), f32_bytes(&back_par), "{}", F::TYPE);
    }
    check::<Q4_0>(&x);
    check::<Q8_0>(&x);
    check::<Q2K>(&x);
    check::<Q3K>(&x);
    check::<Q4K>(&x);
    check::<Q5K>(&x);
    check::<Q6K>(&x);
}
