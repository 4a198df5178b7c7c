//! Whole-model conversions against files bitsandbytes itself wrote (`tests/golden/make_goldens.py`:
//! `Linear4bit` / `Linear8bitLt` state dicts of a tiny flux-like model, saved with safetensors).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bnb::{BnbError, Options, Plan, convert, plan, plan_dequantize, plan_dequantize_file};
use detect::Precision;
use tensorfile::safetensors::{Dtype, SafetensorsFile};
use tensorfile::{SafetensorsWriter, TensorSource, TensorSpec, cast_slice};

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn golden(name: &str) -> SafetensorsFile {
    SafetensorsFile::open(&golden_path(name)).unwrap()
}

/// `f` as converters read it.
fn source(f: &SafetensorsFile) -> Box<dyn TensorSource> {
    tensorfile::open_safetensors(&f.path).unwrap()
}

/// Runs `plan` over `src` into a temporary file and opens it; checks the planned size.
fn run(src: &SafetensorsFile, plan: &Plan, dir: &Path, name: &str) -> SafetensorsFile {
    let meta = BTreeMap::new();
    let mut out = Vec::new();
    let mut last = (0, 0);
    let report = convert(&*source(src), plan, &meta, &mut out, &mut |b, t| {
        assert!(b >= last.0 && t >= last.1, "progress goes forward");
        last = (b, t);
    })
    .unwrap();
    assert_eq!(out.len() as u64, plan.output_len(&meta).unwrap());
    assert_eq!(report.output_bytes, out.len() as u64);
    // Progress ends at the totals a progress bar is sized with.
    assert_eq!(last, (src.header.data_len(), plan.source_tensors()));
    assert_eq!(report.source_bytes, src.header.data_len());
    let path = dir.join(name);
    std::fs::write(&path, &out).unwrap();
    SafetensorsFile::open(&path).unwrap()
}

fn keys(f: &SafetensorsFile) -> BTreeSet<String> {
    f.header.tensors.iter().map(|t| t.name.clone()).collect()
}

/// Every tensor of `want` is in `got` with the same dtype, shape and bytes, and no other keys.
fn assert_same_file(got: &SafetensorsFile, want: &SafetensorsFile, what: &str) {
    assert_eq!(keys(got), keys(want), "{what}: key set");
    for w in &want.header.tensors {
        let (g, gb) = got.tensor(&w.name).unwrap();
        assert_eq!(
            (g.dtype, &g.shape),
            (w.dtype, &w.shape),
            "{what}: `{}`",
            w.name
        );
        assert!(
            gb == want.tensor_bytes(w),
            "{what}: bytes of `{}` differ",
            w.name
        );
    }
}

#[test]
fn nf4_fp4_int8_models_identical_to_bitsandbytes() {
    let dir = tempfile::tempdir().unwrap();
    let src = golden("model_src.safetensors");
    for (target, file) in [
        (Precision::Nf4, "model_nf4.safetensors"),
        (Precision::Fp4, "model_fp4.safetensors"),
        (Precision::Int8, "model_int8.safetensors"),
    ] {
        let p = plan(&*source(&src), target, &Options::default()).unwrap();
        let got = run(&src, &p, dir.path(), file);
        assert_same_file(&got, &golden(file), file);
    }
}

#[test]
fn double_quant_model_matches_bitsandbytes() {
    let dir = tempfile::tempdir().unwrap();
    let src = golden("model_src.safetensors");
    let p = plan(
        &*source(&src),
        Precision::Nf4,
        &Options { double_quant: true },
    )
    .unwrap();
    let got = run(&src, &p, dir.path(), "dq.safetensors");
    let want = golden("model_nf4_dq.safetensors");
    // Our JSON is bnb's followed by spaces (its length is fixed before the offset is known);
    // the shape differs by that padding only.
    let relaxed = |name: &str, g: &[u8], w: &[u8]| {
        if name.ends_with("quant_state.bitsandbytes__nf4") {
            let trimmed = std::str::from_utf8(g).unwrap().trim_end_matches(' ');
            assert_eq!(trimmed.as_bytes(), w, "{name}");
            return true;
        }
        false
    };
    assert_eq!(keys(&got), keys(&want));
    for w in &want.header.tensors {
        let (g, gb) = got.tensor(&w.name).unwrap();
        assert_eq!(g.dtype, w.dtype, "{}", w.name);
        if !relaxed(&w.name, gb, want.tensor_bytes(w)) {
            assert_eq!(g.shape, w.shape, "{}", w.name);
            assert!(gb == want.tensor_bytes(w), "bytes of `{}` differ", w.name);
        }
    }
}

/// With the nested offsets resolved before the header is written, the quant-state JSON is
/// exactly `json.dumps`' bytes, no padding: the whole file matches bitsandbytes' tensors.
#[test]
fn resolved_double_quant_model_is_byte_identical_to_bitsandbytes() {
    let dir = tempfile::tempdir().unwrap();
    let src = golden("model_src.safetensors");
    let mut p = plan(
        &*source(&src),
        Precision::Nf4,
        &Options { double_quant: true },
    )
    .unwrap();
    bnb::resolve_nested_offsets(&*source(&src), &mut p).unwrap();
    let got = run(&src, &p, dir.path(), "dq_exact.safetensors");
    let want = golden("model_nf4_dq.safetensors");
    assert_eq!(keys(&got), keys(&want));
    for w in &want.header.tensors {
        let (g, gb) = got.tensor(&w.name).unwrap();
        assert_eq!((g.dtype, &g.shape), (w.dtype, &w.shape), "{}", w.name);
        assert!(gb == want.tensor_bytes(w), "bytes of `{}` differ", w.name);
    }
}

/// An f32 model is quantized from its bf16 rounding (the compute dtype, as Forge loads it) and
/// its other float tensors are written in bf16; a bf16-exact f32 source thus gives bnb's file.
#[test]
fn f32_source_quantizes_through_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let src = golden("model_src.safetensors");
    let specs: Vec<TensorSpec> = src
        .header
        .tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: if t.dtype == Dtype::BF16 {
                Dtype::F32
            } else {
                t.dtype
            },
            shape: t.shape.clone(),
        })
        .collect();
    let path = dir.path().join("f32.safetensors");
    let mut w = SafetensorsWriter::new(
        std::fs::File::create(&path).unwrap(),
        &specs,
        &BTreeMap::new(),
    )
    .unwrap();
    for t in &src.header.tensors {
        let b = src.tensor_bytes(t);
        if t.dtype == Dtype::BF16 {
            let mut f = vec![0u8; b.len() * 2];
            cast_slice(Dtype::BF16, b, Dtype::F32, &mut f).unwrap();
            w.write_chunk(&f).unwrap();
        } else {
            w.write_chunk(b).unwrap();
        }
    }
    w.finish().unwrap();
    let f32src = SafetensorsFile::open(&path).unwrap();
    let p = plan(&*source(&f32src), Precision::Nf4, &Options::default()).unwrap();
    assert_eq!(p.float_dtype, Dtype::BF16);
    let got = run(&f32src, &p, dir.path(), "nf4.safetensors");
    assert_same_file(&got, &golden("model_nf4.safetensors"), "f32 -> nf4");
}

#[test]
fn dequantization_identical_to_bitsandbytes() {
    let dir = tempfile::tempdir().unwrap();
    let src = golden("model_src.safetensors");
    for (file, dq_file) in [
        (
            "model_nf4_dq.safetensors",
            "model_nf4_dq_dequant.safetensors",
        ),
        ("model_int8.safetensors", "model_int8_dequant.safetensors"),
    ] {
        let q = golden(file);
        let p = plan_dequantize_file(&*source(&q), Precision::Bf16).unwrap();
        let got = run(&q, &p, dir.path(), &format!("dq_{file}"));
        // Key set and non-weight tensors of the original model; weights as bnb decodes them.
        assert_eq!(keys(&got), keys(&src), "{file}");
        let dq = golden(dq_file);
        for t in &src.header.tensors {
            let (g, gb) = got.tensor(&t.name).unwrap();
            assert_eq!((g.dtype, &g.shape), (t.dtype, &t.shape), "{}", t.name);
            let want = match dq.tensor(&t.name) {
                Some((_, b)) => b,
                None => src.tensor_bytes(t),
            };
            assert!(gb == want, "{file}: bytes of `{}` differ", t.name);
        }
    }
    // int8 files need only the header; 4-bit ones need the quant-state JSON.
    assert!(
        plan_dequantize(
            source(&golden("model_int8.safetensors")).tensors(),
            Precision::Fp32
        )
        .is_ok()
    );
    assert!(
        plan_dequantize(
            source(&golden("model_nf4.safetensors")).tensors(),
            Precision::Fp32
        )
        .is_err()
    );
}

#[test]
fn own_outputs_dequantize_back_to_the_model_layout() {
    // Round trip through our own writer and reader on every precision target.
    let dir = tempfile::tempdir().unwrap();
    let src = golden("model_src.safetensors");
    for target in [Precision::Fp4, Precision::Nf4] {
        for dq in [false, true] {
            let p = plan(&*source(&src), target, &Options { double_quant: dq }).unwrap();
            let ours = run(&src, &p, dir.path(), "q.safetensors");
            let back = plan_dequantize_file(&*source(&ours), Precision::Fp32).unwrap();
            let out = run(&ours, &back, dir.path(), "back.safetensors");
            assert_eq!(keys(&out), keys(&src));
            for t in &out.header.tensors {
                assert_eq!(t.shape, src.header.tensor(&t.name).unwrap().shape);
            }
        }
    }
}

#[test]
fn refusals_name_the_problem() {
    let src = golden("model_src.safetensors");
    assert!(matches!(
        plan(&*source(&src), Precision::Fp16, &Options::default()),
        Err(BnbError::UnsupportedTarget { .. })
    ));
    let q = golden("model_nf4.safetensors");
    let e = plan(&*source(&q), Precision::Nf4, &Options::default()).unwrap_err();
    assert!(e.to_string().contains("already bitsandbytes"), "{e}");
    let e = plan_dequantize_file(&*source(&src), Precision::Bf16).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with(&src.path.display().to_string()), "{msg}");
    assert!(msg.contains("no bitsandbytes-quantized tensor"), "{msg}");
    assert!(plan_dequantize_file(&*source(&q), Precision::Nf4).is_err());
}

/// Which tensors are quantized: Linear weights (embedders included), not biases, norms,
/// convolutions, embeddings or integer tensors.
#[test]
fn quantizes_exactly_the_linear_weights() {
    let src = golden("model_src.safetensors");
    let p = plan(&*source(&src), Precision::Nf4, &Options::default()).unwrap();
    let quantized: BTreeSet<&str> = p
        .specs
        .iter()
        .filter_map(|s| s.name.strip_suffix(".weight.quant_state.bitsandbytes__nf4"))
        .collect();
    let expected: BTreeSet<&str> = [
        "model.diffusion_model.img_in",
        "model.diffusion_model.time_in.in_layer",
        "model.diffusion_model.double_blocks.0.img_attn.qkv",
        "model.diffusion_model.final_layer.linear",
    ]
    .into();
    assert_eq!(quantized, expected);
}
