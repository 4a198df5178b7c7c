//! ComfyUI scaled-fp8 sources are quantized from their de-scaled weights (`w.to(f32) * scale`,
//! rounded through the compute dtype like any f32 weight); their scales and marker are dropped.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bnb::kernels::{BLOCKSIZE, QuantType, Quantizer4, dequantize_4bit, quantize_4bit};
use bnb::{Options, Plan, convert, plan, plan_dequantize_file};
use detect::Precision;
use tensorfile::safetensors::{Dtype, SafetensorsFile};
use tensorfile::{cast_slice, open_safetensors, widen_to_f32};

/// Writes a safetensors file of (name, dtype, shape, bytes) to `path`.
fn write_file(path: &Path, tensors: &[(&str, Dtype, Vec<u64>, Vec<u8>)]) {
    tensorfile::safetensors::writer::write_file(path, tensors, &BTreeMap::new())
        .expect("write the model");
}

/// Converts `src` as `plan_of` plans it (nested offsets resolved) into `out` and opens it.
fn convert_file(
    src: &Path,
    out: &Path,
    plan_of: impl Fn(&dyn tensorfile::TensorSource) -> Plan,
) -> SafetensorsFile {
    let source = open_safetensors(src).unwrap();
    let mut p = plan_of(&*source);
    bnb::resolve_nested_offsets(&*source, &mut p).unwrap();
    let mut bytes = Vec::new();
    convert(&*source, &p, &BTreeMap::new(), &mut bytes, &mut |_, _| {}).unwrap();
    std::fs::write(out, &bytes).unwrap();
    SafetensorsFile::open(out).unwrap()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn keys(f: &SafetensorsFile) -> BTreeSet<String> {
    f.header.tensors.iter().map(|t| t.name.clone()).collect()
}

#[test]
fn legacy_scaled_fp8_weights_are_quantized_de_scaled() {
    let dir = tempfile::tempdir().unwrap();
    // 6 x 100: a partial final block. Every finite e4m3 code (0x7f and 0xff are NaN).
    let (rows, cols) = (6usize, 100usize);
    let n = rows * cols;
    let codes: Vec<u8> = (0..n as u32)
        .map(|i| (i * 37 % 256) as u8)
        .map(|c| if c & 0x7f == 0x7f { 0x7e } else { c })
        .collect();
    let scale = 0.017_164_964_f32;
    let bias: Vec<u8> = [0.5f32, -1.25, 3.0, 0.0, 2.0, -0.75]
        .iter()
        .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
        .collect();
    let src = dir.path().join("scaled.safetensors");
    write_file(
        &src,
        &[
            ("scaled_fp8", Dtype::F8E4M3, vec![0], vec![]),
            ("blk.bias", Dtype::BF16, vec![rows as u64], bias.clone()),
            (
                "blk.weight",
                Dtype::F8E4M3,
                vec![rows as u64, cols as u64],
                codes.clone(),
            ),
            (
                "blk.scale_weight",
                Dtype::F32,
                vec![],
                scale.to_le_bytes().to_vec(),
            ),
        ],
    );
    let out = convert_file(&src, &dir.path().join("nf4.safetensors"), |s| {
        plan(s, Precision::Nf4, &Options::default()).unwrap()
    });

    // Scales and marker are gone; the rest is the plain nf4 layout.
    let expected_keys: BTreeSet<String> = [
        "blk.bias",
        "blk.weight",
        "blk.weight.absmax",
        "blk.weight.quant_map",
        "blk.weight.quant_state.bitsandbytes__nf4",
    ]
    .map(String::from)
    .into();
    assert_eq!(keys(&out), expected_keys);
    assert_eq!(out.tensor("blk.bias").unwrap().1, bias.as_slice());
    let detected = detect::detect(&out.path).unwrap();
    assert_eq!(detected.precision, Some(Precision::Nf4));
    assert_eq!(detected.fp8_scaling, None);

    // Quantizing `w.to(f32) * scale`, rounded to the model's bf16, directly.
    let mut w = vec![0f32; n];
    widen_to_f32(Dtype::F8E4M3, &codes, &mut w).unwrap();
    let product: Vec<u8> = w.iter().flat_map(|v| (v * scale).to_le_bytes()).collect();
    let mut bf16 = vec![0u8; n * 2];
    cast_slice(Dtype::F32, &product, Dtype::BF16, &mut bf16).unwrap();
    let mut x = vec![0f32; n];
    widen_to_f32(Dtype::BF16, &bf16, &mut x).unwrap();
    let mut want_codes = vec![0u8; n.div_ceil(2)];
    let mut want_absmax = vec![0f32; n.div_ceil(BLOCKSIZE)];
    quantize_4bit(
        &Quantizer4::new(QuantType::Nf4),
        &x,
        &mut want_codes,
        &mut want_absmax,
    );
    assert_eq!(out.tensor("blk.weight").unwrap().1, want_codes.as_slice());
    assert_eq!(
        f32s(out.tensor("blk.weight.absmax").unwrap().1),
        want_absmax
    );
    let state = out
        .tensor("blk.weight.quant_state.bitsandbytes__nf4")
        .unwrap()
        .1;
    assert!(
        std::str::from_utf8(state)
            .unwrap()
            .contains("\"dtype\": \"bfloat16\", \"shape\": [6, 100]"),
        "{}",
        String::from_utf8_lossy(state)
    );

    // Dequantized, the weight is the de-scaled one (within nf4's error), not the raw fp8 values.
    let back = convert_file(&out.path, &dir.path().join("back.safetensors"), |s| {
        plan_dequantize_file(s, Precision::Fp32).unwrap()
    });
    assert_eq!(
        keys(&back),
        ["blk.bias", "blk.weight"].map(String::from).into()
    );
    let got = f32s(back.tensor("blk.weight").unwrap().1);
    let mut want = vec![0f32; n];
    let table = QuantType::Nf4.dequant_table(&[rows as u64, cols as u64]);
    dequantize_4bit(&table, &want_codes, &want_absmax, BLOCKSIZE, 0, &mut want);
    assert_eq!(got, want);
    for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
        let block_max = want_absmax[i / BLOCKSIZE];
        assert!((g - v).abs() <= block_max * 0.2, "element {i}: {g} vs {v}");
    }
}

fn scaled_golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tensorfile/tests/golden/scaled_fp8")
        .join(name)
}

/// Against torch: quantizing a scaled-fp8 source gives what quantizing torch's de-scaled model
/// (`(w.to(torch.float32) * scale).to(dtype)`) gives, byte for byte, for the legacy and both
/// comfy_quant layouts. 4-bit weights round through bf16 (the model's float dtype), the whole
/// file matching torch's bf16 model's; int8 weights round once to fp16, as bnb's `Int8Params`
/// does, matching torch's fp16 model's quantized tensors.
#[test]
fn scaled_sources_quantize_as_torchs_de_scaled_model() {
    let dir = tempfile::tempdir().unwrap();
    for (source, layout) in [
        ("legacy_source.safetensors", "legacy"),
        ("comfy_quant_source.safetensors", "comfy_quant"),
        ("comfy_quant_metadata_source.safetensors", "comfy_quant"),
    ] {
        for (target, via) in [(Precision::Nf4, "bf16"), (Precision::Int8, "fp16")] {
            let quantize = |s: &dyn tensorfile::TensorSource| {
                plan(s, target, &Options { double_quant: true }).unwrap()
            };
            let got = convert_file(
                &scaled_golden(source),
                &dir.path().join(format!("got_{target}.safetensors")),
                quantize,
            );
            let want = convert_file(
                &scaled_golden(&format!("expected_{layout}_{via}.safetensors")),
                &dir.path().join(format!("want_{target}.safetensors")),
                quantize,
            );
            assert_eq!(keys(&got), keys(&want), "{source} {target}");
            let mut compared = 0;
            for t in &want.header.tensors {
                let (g, gb) = got.tensor(&t.name).unwrap();
                if target == Precision::Int8 && t.dtype == Dtype::F16 {
                    continue; // unquantized: the model's bf16 here, fp16 in torch's fp16 model
                }
                assert_eq!((g.dtype, &g.shape), (t.dtype, &t.shape), "{}", t.name);
                assert!(
                    gb == want.tensor_bytes(t),
                    "{source} {target}: `{}` differs",
                    t.name
                );
                compared += 1;
            }
            // Every layer is quantized: 3 or 4 scaled ones plus the unscaled img_in.
            assert!(compared >= 4 * 3, "{source} {target}: {compared}");
        }
    }
}
