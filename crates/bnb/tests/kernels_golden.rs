//! Kernel outputs against pip bitsandbytes 0.50.2 on CPU (`tests/golden/make_goldens.py`).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::PathBuf;

use bnb::codes::DYNAMIC_MAP_BITS;
use bnb::kernels::{
    BLOCKSIZE, QuantType, Quantizer4, absmax_mean, decode_nested_absmax, dequantize_4bit,
    dequantize_int8_rows, double_quant_with_offset, quantize_4bit, quantize_int8_rows,
};
use bnb::quant_state::{NestedJson, QuantStateJson, parse_quant_state};
use tensorfile::cast_slice;
use tensorfile::safetensors::{Dtype, SafetensorsFile, TensorEntry};

fn golden(name: &str) -> SafetensorsFile {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    SafetensorsFile::open(&p).expect("golden file opens")
}

fn get<'a>(f: &'a SafetensorsFile, key: &str) -> (&'a TensorEntry, &'a [u8]) {
    f.tensor(key)
        .unwrap_or_else(|| panic!("golden has no `{key}`"))
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0u8; bytes.len() / (dtype.bits() as usize / 8) * 4];
    cast_slice(dtype, bytes, Dtype::F32, &mut out).unwrap();
    out.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn from_f32(v: &[f32], dtype: Dtype) -> Vec<u8> {
    let f: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = vec![0u8; v.len() * (dtype.bits() as usize / 8)];
    cast_slice(Dtype::F32, &f, dtype, &mut out).unwrap();
    out
}

/// Byte equality with a short message (first differing byte) instead of two huge dumps.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: {} vs bnb {}",
            got[i], want[i]
        );
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// (case, dtype key, dtype) of every 4-bit input in the golden file.
fn inputs() -> Vec<(String, &'static str, Dtype)> {
    let mut v = Vec::new();
    for case in ["rand", "odd", "zerotail", "ties", "nonfinite"] {
        for (k, d) in [
            ("f32", Dtype::F32),
            ("f16", Dtype::F16),
            ("bf16", Dtype::BF16),
        ] {
            v.push((case.to_string(), k, d));
        }
    }
    v.push(("big".into(), "bf16", Dtype::BF16));
    v
}

#[test]
fn four_bit_codes_absmax_and_state_identical_to_bnb() {
    let g = golden("kernels.safetensors");
    let mut checked = 0;
    for (case, dk, dtype) in inputs() {
        let (e, bytes) = get(&g, &format!("in.{case}.{dk}"));
        let x = to_f32(dtype, bytes);
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            let key = format!("q.{case}.{dk}.{}.plain", qt.name());
            let mut codes = vec![0u8; x.len().div_ceil(2)];
            let mut absmax = vec![0f32; x.len().div_ceil(BLOCKSIZE)];
            quantize_4bit(&Quantizer4::new(qt), &x, &mut codes, &mut absmax);
            assert_same(
                &codes,
                get(&g, &format!("{key}.weight")).1,
                &format!("{key} codes"),
            );
            assert_same(
                &f32_bytes(&absmax),
                get(&g, &format!("{key}.absmax")).1,
                &format!("{key} absmax"),
            );
            let qmap: Vec<f32> = qt.table().to_vec();
            assert_eq!(f32_bytes(&qmap), get(&g, &format!("{key}.quant_map")).1);
            let state = QuantStateJson {
                quant_type: qt,
                blocksize: 64,
                dtype,
                shape: e.shape.clone(),
                nested: None,
            };
            let json = get(
                &g,
                &format!("{key}.quant_state.bitsandbytes__{}", qt.name()),
            )
            .1;
            assert_eq!(state.to_json_bytes(), json, "{key} json");
            assert_eq!(parse_quant_state(json).unwrap(), state);
            checked += 1;
        }
    }
    assert_eq!(checked, 32);
}

#[test]
fn double_quant_identical_to_bnb_given_its_offset() {
    let g = golden("kernels.safetensors");
    let mut offsets_equal = 0;
    let mut checked = 0;
    for (case, dk, dtype) in inputs() {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            let key = format!("q.{case}.{dk}.{}.dq", qt.name());
            let Some((_, raw)) = g.tensor(&format!("{key}.raw_absmax")) else {
                continue;
            };
            let raw = to_f32(Dtype::F32, raw);
            let offset = to_f32(Dtype::F32, get(&g, &format!("{key}.offset")).1)[0];
            let nq = double_quant_with_offset(&raw, offset);
            assert_same(
                &nq.codes,
                get(&g, &format!("{key}.absmax")).1,
                &format!("{key} nested codes"),
            );
            assert_eq!(
                f32_bytes(&nq.nested_absmax),
                get(&g, &format!("{key}.nested_absmax")).1,
                "{key} nested absmax"
            );
            let map: Vec<u8> = DYNAMIC_MAP_BITS
                .iter()
                .flat_map(|b| b.to_le_bytes())
                .collect();
            assert_eq!(map, get(&g, &format!("{key}.nested_quant_map")).1);
            // Our own mean: torch's f32 reduction may differ in the last ulp.
            let ours = absmax_mean(&raw);
            assert!(
                (ours.to_bits() as i64 - offset.to_bits() as i64).abs() <= 1,
                "{key}: offset {ours} vs bnb {offset}"
            );
            offsets_equal += usize::from(ours == offset);
            let state = QuantStateJson {
                quant_type: qt,
                blocksize: 64,
                dtype,
                shape: get(&g, &format!("in.{case}.{dk}")).0.shape.clone(),
                nested: Some(NestedJson {
                    blocksize: 256,
                    offset: f64::from(offset),
                }),
            };
            let json = get(
                &g,
                &format!("{key}.quant_state.bitsandbytes__{}", qt.name()),
            )
            .1;
            assert_eq!(state.to_json_bytes(), json, "{key} json");
            assert_eq!(parse_quant_state(json).unwrap(), state);
            checked += 1;
        }
    }
    assert_eq!(checked, 14);
    eprintln!("offset bit-equal to bnb's in {offsets_equal} of {checked} cases");
}

#[test]
fn four_bit_dequantization_identical_to_bnb() {
    let g = golden("kernels.safetensors");
    let mut checked = 0;
    for (case, dk, dtype) in inputs() {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for variant in ["plain", "dq"] {
                let key = format!("q.{case}.{dk}.{}.{variant}", qt.name());
                let Some((_, want)) = g.tensor(&format!("{key}.dequant")) else {
                    continue;
                };
                let json = get(
                    &g,
                    &format!("{key}.quant_state.bitsandbytes__{}", qt.name()),
                )
                .1;
                let state = parse_quant_state(json).unwrap();
                let absmax_bytes = get(&g, &format!("{key}.absmax")).1;
                let absmax = match &state.nested {
                    None => to_f32(Dtype::F32, absmax_bytes),
                    Some(nj) => {
                        let map: [f32; 256] =
                            to_f32(Dtype::F32, get(&g, &format!("{key}.nested_quant_map")).1)
                                .try_into()
                                .unwrap();
                        let na = to_f32(Dtype::F32, get(&g, &format!("{key}.nested_absmax")).1);
                        decode_nested_absmax(&map, absmax_bytes, &na, 256, nj.offset as f32)
                    }
                };
                let n = state.n_elements().unwrap() as usize;
                let mut out = vec![0f32; n];
                let packed = get(&g, &format!("{key}.weight")).1;
                dequantize_4bit(
                    &qt.dequant_table(&state.shape),
                    packed,
                    &absmax,
                    64,
                    0,
                    &mut out,
                );
                // bnb's native kernel (even last dimension) rounds to bf16 with its own bit
                // trick, which differs from torch's cast for NaN only.
                let got = if dtype == Dtype::BF16 && state.shape.last().unwrap().is_multiple_of(2) {
                    out.iter()
                        .flat_map(|&v| bnb::kernels::f32_to_bf16_bnb(v).to_le_bytes())
                        .collect()
                } else {
                    from_f32(&out, dtype)
                };
                assert_same(&got, want, &format!("{key} dequant"));
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 30 + 12 + 1);
}

#[test]
fn int8_identical_to_bnb() {
    let g = golden("kernels.safetensors");
    let dtypes = [
        ("f32", Dtype::F32),
        ("f16", Dtype::F16),
        ("bf16", Dtype::BF16),
    ];
    for (case, (dk, dtype)) in ["rows", "rows_nonfinite"]
        .into_iter()
        .flat_map(|c| dtypes.map(|d| (c, d)))
    {
        let (e, bytes) = get(&g, &format!("in.{case}.{dk}"));
        // bnb's Int8Params casts the weight to fp16 first.
        let x16 = {
            let mut h = vec![0u8; bytes.len() / (dtype.bits() as usize / 8) * 2];
            cast_slice(dtype, bytes, Dtype::F16, &mut h).unwrap();
            to_f32(Dtype::F16, &h)
        };
        let (rows, cols) = (e.shape[0] as usize, e.shape[1] as usize);
        let mut q = vec![0i8; rows * cols];
        let mut scb = vec![0f32; rows];
        quantize_int8_rows(&x16, cols, &mut q, &mut scb);
        let qb: Vec<u8> = q.iter().map(|&v| v as u8).collect();
        assert_same(
            &qb,
            get(&g, &format!("i8.{case}.{dk}.CB")).1,
            &format!("{case} {dk} CB"),
        );
        // A NaN row's SCB is NaN in both; torch's NaN bits depend on its loop structure.
        let scb: Vec<f32> = scb
            .iter()
            .map(|&v| {
                if v.is_nan() {
                    f32::from_bits(0x7fff_ffff)
                } else {
                    v
                }
            })
            .collect();
        assert_eq!(
            f32_bytes(&scb),
            get(&g, &format!("i8.{case}.{dk}.SCB")).1,
            "{case} {dk} SCB"
        );
        let mut back = vec![0f32; rows * cols];
        dequantize_int8_rows(&q, cols, &scb, &mut back);
        assert_same(
            &f32_bytes(&back),
            get(&g, &format!("i8.{case}.{dk}.dequant")).1,
            &format!("{case} {dk} dequant"),
        );
    }
}
