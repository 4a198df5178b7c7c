//! `detect`: format, precision, histogram and layouts from the header, and the JSON shape.

mod common;

use common::{Kv, gguf_file, safetensors, write_temp};
use detect::{BnbQuantType, Evidence, Format, Precision, detect, should_skip};
use tensorfile::gguf::{FileType, GgmlType};
use tensorfile::safetensors::Dtype;

#[test]
fn dominant_dtype_by_bytes_not_first_tensor() {
    // Writers put F32 norms and scales first; most bytes are BF16.
    let bytes = safetensors(
        &[
            ("a.norm.scale", Dtype::F32, &[64]),
            ("b.norm.scale", Dtype::F32, &[64]),
            ("c.weight", Dtype::BF16, &[64, 64]),
            ("d.bias", Dtype::F32, &[64]),
            ("e.weight", Dtype::BF16, &[64, 32]),
        ],
        &[],
    );
    let (_dir, path) = write_temp("model.safetensors", &bytes);
    let d = detect(&path).unwrap();
    assert_eq!(d.format, Format::Safetensors);
    assert_eq!(d.precision, Some(Precision::Bf16));
    assert_eq!(d.evidence, Evidence::Header);
    assert!(d.supported_as_source);
    assert_eq!(d.tensor_count, 5);
    assert_eq!(d.file_size, bytes.len() as u64);
    let hist: Vec<_> = d
        .histogram
        .iter()
        .map(|h| (h.dtype.as_str(), h.tensors, h.bytes))
        .collect();
    assert_eq!(hist, [("BF16", 2, 12288), ("F32", 3, 768)]);
}

#[test]
fn many_small_tensors_do_not_outvote_a_big_one() {
    let mut specs: Vec<(String, Dtype, Vec<u64>)> = (0..20)
        .map(|i| (format!("n{i}"), Dtype::F32, vec![4]))
        .collect();
    specs.push(("w".into(), Dtype::F16, vec![1024]));
    let specs: Vec<(&str, Dtype, &[u64])> = specs
        .iter()
        .map(|(n, d, s)| (n.as_str(), *d, s.as_slice()))
        .collect();
    let (_dir, path) = write_temp("m.safetensors", &safetensors(&specs, &[]));
    let d = detect(&path).unwrap();
    assert_eq!(d.precision, Some(Precision::Fp16));
    assert_eq!(d.histogram[0].dtype, "F16");
}

#[test]
fn fp8_files_and_comfyui_scaled_fp8() {
    let (_dir, path) = write_temp(
        "flux.safetensors",
        &safetensors(
            &[
                ("model.diffusion_model.scaled_fp8", Dtype::F8E4M3, &[0]),
                ("model.diffusion_model.a.scale_weight", Dtype::F32, &[]),
                ("model.diffusion_model.a.weight", Dtype::F8E4M3, &[32, 32]),
                ("model.diffusion_model.b.scale_input", Dtype::F32, &[]),
                ("model.diffusion_model.b.scale_weight", Dtype::F32, &[]),
                ("model.diffusion_model.b.weight", Dtype::F8E4M3, &[32, 32]),
                ("model.diffusion_model.b.bias", Dtype::BF16, &[32]),
            ],
            &[],
        ),
    );
    let d = detect(&path).unwrap();
    // The legacy scaled layout is ComfyUI fp8_scaled (issue 12), not a plain fp8 file.
    assert_eq!(d.precision, Some(Precision::Fp8Scaled));
    let s = d.fp8_scaling.unwrap();
    assert_eq!(
        s.marker.as_deref(),
        Some("model.diffusion_model.scaled_fp8")
    );
    assert_eq!(s.marker_dtype.as_deref(), Some("F8_E4M3"));
    assert_eq!((s.scale_weights, s.scale_inputs), (2, 1));

    // Plain e5m2, no scaling.
    let (_dir, path) = write_temp(
        "e5m2.safetensors",
        &safetensors(
            &[("w", Dtype::F8E5M2, &[16, 16]), ("n", Dtype::F32, &[16])],
            &[],
        ),
    );
    let d = detect(&path).unwrap();
    assert_eq!(d.precision, Some(Precision::Fp8E5m2));
    assert_eq!(d.fp8_scaling, None);
}

/// The keys bitsandbytes' `Linear4bit` saves for one 64x64 weight (bnb-format.md §1).
fn bnb4(quant: &str, double_quant: bool) -> Vec<u8> {
    let qs = format!("m.l.weight.quant_state.bitsandbytes__{quant}");
    let mut specs: Vec<(&str, Dtype, &[u64])> = vec![
        ("m.l.bias", Dtype::BF16, &[64]),
        ("m.l.weight", Dtype::U8, &[2048, 1]),
        ("m.l.weight.quant_map", Dtype::F32, &[16]),
        (qs.as_str(), Dtype::U8, &[82]),
    ];
    if double_quant {
        specs.extend([
            ("m.l.weight.absmax", Dtype::U8, &[64][..]),
            ("m.l.weight.nested_absmax", Dtype::F32, &[1]),
            ("m.l.weight.nested_quant_map", Dtype::F32, &[256]),
        ]);
    } else {
        specs.push(("m.l.weight.absmax", Dtype::F32, &[64]));
    }
    safetensors(&specs, &[])
}

#[test]
fn bitsandbytes_layouts_decide_the_precision() {
    for (quant, expected, qt) in [
        ("nf4", Precision::Nf4, BnbQuantType::Nf4),
        ("fp4", Precision::Fp4, BnbQuantType::Fp4),
    ] {
        for dq in [false, true] {
            let (_dir, path) = write_temp("q.safetensors", &bnb4(quant, dq));
            let d = detect(&path).unwrap();
            assert_eq!(d.precision, Some(expected), "{quant} dq={dq}");
            let b = d.bitsandbytes.unwrap();
            assert_eq!(
                (b.quant_type, b.quantized_weights, b.double_quant),
                (qt, 1, dq)
            );
        }
    }

    // LLM.int8: I8 weight, `P.SCB` (not `P.weight.SCB`), 0-dim U8 weight_format.
    let (_dir, path) = write_temp(
        "i8.safetensors",
        &safetensors(
            &[
                ("m.l.SCB", Dtype::F32, &[64]),
                ("m.l.bias", Dtype::F16, &[64]),
                ("m.l.weight", Dtype::I8, &[64, 64]),
                ("m.l.weight_format", Dtype::U8, &[]),
            ],
            &[],
        ),
    );
    let d = detect(&path).unwrap();
    assert_eq!(d.precision, Some(Precision::Int8));
    assert_eq!(d.bitsandbytes.unwrap().quant_type, BnbQuantType::Int8);

    // I8 weights without SCB are not LLM.int8: the float tensors decide.
    let (_dir, path) = write_temp(
        "plain_i8.safetensors",
        &safetensors(
            &[
                ("m.l.bias", Dtype::F16, &[64]),
                ("m.l.weight", Dtype::I8, &[64, 64]),
            ],
            &[],
        ),
    );
    let d = detect(&path).unwrap();
    assert_eq!(d.precision, Some(Precision::Fp16));
    assert_eq!(d.bitsandbytes, None);
}

#[test]
fn newer_float_formats_are_known_but_not_a_source() {
    let (_dir, path) = write_temp(
        "nvfp4.safetensors",
        &safetensors(
            &[("w", Dtype::F4, &[64, 64]), ("n", Dtype::BF16, &[64])],
            &[],
        ),
    );
    let d = detect(&path).unwrap();
    assert_eq!(d.precision, None);
    assert_eq!(d.evidence, Evidence::Undetermined);
    assert!(!d.supported_as_source);
    assert!(d.notes.iter().any(|n| n.contains("F4")), "{:?}", d.notes);
}

#[test]
fn the_file_name_is_only_a_last_resort() {
    // No float tensors at all: the name decides, and says so.
    let ints = safetensors(&[("ids", Dtype::I64, &[8])], &[]);
    let (_dir, path) = write_temp("tokens_fp16.safetensors", &ints);
    let d = detect(&path).unwrap();
    assert_eq!(d.precision, Some(Precision::Fp16));
    assert_eq!(d.evidence, Evidence::FilenameGuess);

    let (_dir, path) = write_temp("tokens.safetensors", &ints);
    let d = detect(&path).unwrap();
    assert_eq!((d.precision, d.evidence), (None, Evidence::Undetermined));

    // A misleading name loses to the header.
    let (_dir, path) = write_temp(
        "flux_fp16.safetensors",
        &safetensors(&[("w", Dtype::BF16, &[4])], &[]),
    );
    let d = detect(&path).unwrap();
    assert_eq!(
        (d.precision, d.evidence),
        (Some(Precision::Bf16), Evidence::Header)
    );
}

#[test]
fn format_comes_from_content_before_extension() {
    // Safetensors bytes under a pickle extension.
    let (_dir, path) = write_temp(
        "pytorch_model.bin",
        &safetensors(&[("w", Dtype::F32, &[2])], &[]),
    );
    assert_eq!(detect(&path).unwrap().format, Format::Safetensors);

    // torch.save zip archive and legacy pickle.
    for (name, bytes) in [
        (
            "model.ckpt",
            b"PK\x03\x04\x14\0\0\0archive/data.pkl".to_vec(),
        ),
        (
            "model.pt",
            b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.".to_vec(),
        ),
        ("weights.pth", b"PK\x03\x04".to_vec()),
        ("noext", b"\x80\x04\x95\x10\0\0\0\0\0\0\0}".to_vec()),
    ] {
        let (_dir, path) = write_temp(name, &bytes);
        let d = detect(&path).unwrap();
        assert_eq!(d.format, Format::Pickle, "{name}");
        assert_eq!(d.precision, None);
        assert!(!d.supported_as_source);
        assert!(d.notes[0].contains("not supported as a source"));
    }
}

#[test]
fn metadata_and_json_fields_are_stable() {
    let (_dir, path) = write_temp(
        "m.safetensors",
        &safetensors(
            &[("n", Dtype::F32, &[2]), ("w", Dtype::BF16, &[4, 4])],
            &[("format", "pt"), ("modelspec.title", "x")],
        ),
    );
    let d = detect(&path).unwrap();
    assert_eq!(d.metadata["format"], "pt");
    let v = serde_json::to_value(&d).unwrap();
    let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        keys,
        [
            "path",
            "format",
            "precision",
            "evidence",
            "supported_as_source",
            "histogram",
            "architecture",
            "model_kind",
            "fp8_scaling",
            "bitsandbytes",
            "metadata",
            "file_size",
            "tensor_count",
            "gguf_file_type",
            "notes"
        ]
    );
    assert_eq!(v["format"], "safetensors");
    assert_eq!(v["precision"], "bf16");
    assert_eq!(v["evidence"], "header");
    assert_eq!(
        v["histogram"][0],
        serde_json::json!({"dtype": "BF16", "tensors": 1, "bytes": 32})
    );
    assert_eq!(v["metadata"]["modelspec.title"], "x");
    assert_eq!(v["gguf_file_type"], serde_json::Value::Null);
}

#[test]
fn a_sparse_20_gb_file_is_detected_from_its_header_alone() {
    const BIG: u64 = 100_000;
    let (json, data_len) = common::safetensors_json(
        &[("norm", Dtype::F32, &[64]), ("w", Dtype::BF16, &[BIG, BIG])],
        &[],
    );
    assert_eq!(data_len, 256 + 2 * BIG * BIG);
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    let (_dir, path) = write_temp("huge.safetensors", &bytes);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let file_len = bytes.len() as u64 + data_len;
    file.set_len(file_len).unwrap(); // sparse: no data is written
    drop(file);

    let d = detect(&path).unwrap();
    assert_eq!(d.precision, Some(Precision::Bf16));
    assert_eq!(d.file_size, file_len);
    assert!(file_len > 20_000_000_000);
    assert_eq!(d.histogram[0].bytes, 2 * BIG * BIG);
}

#[test]
fn gguf_precision_comes_from_general_file_type() {
    let bytes = gguf_file(
        &[
            ("general.architecture", Kv::Str("flux")),
            ("general.file_type", Kv::U32(FileType::Q4KM.id())),
            ("general.quantization_version", Kv::U32(2)),
            ("general.name", Kv::Str("flux1-dev")),
            ("test.flag", Kv::Bool(true)),
            ("test.scale", Kv::F32(0.5)),
            ("test.list", Kv::StrArray(&["a", "b"])),
        ],
        &[
            ("img_in.bias", GgmlType::F32, &[64]),
            (
                "double_blocks.0.img_attn.qkv.weight",
                GgmlType::Q4K,
                &[256, 64],
            ),
            (
                "double_blocks.0.img_mlp.0.weight",
                GgmlType::Q6K,
                &[256, 16],
            ),
        ],
    );
    let (_dir, path) = write_temp("flux_Q4_K_M.gguf", &bytes);
    let d = detect(&path).unwrap();
    assert_eq!(d.format, Format::Gguf);
    assert_eq!(d.precision, Some(Precision::Gguf(FileType::Q4KM)));
    assert_eq!(d.evidence, Evidence::Header);
    assert_eq!(d.gguf_file_type.as_deref(), Some("Q4_K_M"));
    assert_eq!(d.architecture.as_deref(), Some("flux"));
    assert_eq!(d.tensor_count, 3);
    assert_eq!(d.metadata["general.name"], "flux1-dev");
    assert_eq!(d.metadata["general.file_type"], "15");
    assert_eq!(d.metadata["test.flag"], "true");
    assert_eq!(d.metadata["test.scale"], "0.5");
    assert!(!d.metadata.contains_key("test.list"));
    let hist: Vec<_> = d
        .histogram
        .iter()
        .map(|h| (h.dtype.as_str(), h.tensors, h.bytes))
        .collect();
    assert_eq!(
        hist,
        [
            ("Q4_K", 1, 64 * 144),
            ("Q6_K", 1, 16 * 210),
            ("F32", 1, 256)
        ]
    );
    assert!(should_skip(d.precision.unwrap(), "q4_k_m".parse().unwrap()).is_some());
}

#[test]
fn gguf_without_file_type_uses_the_dominant_tensor_type() {
    let bytes = gguf_file(
        &[("general.architecture", Kv::Str("sdxl"))],
        &[
            ("a.bias", GgmlType::F32, &[320]),
            ("a.weight", GgmlType::Q8_0, &[320, 320]),
        ],
    );
    let (_dir, path) = write_temp("unet.gguf", &bytes);
    let d = detect(&path).unwrap();
    assert_eq!(d.precision, Some(Precision::Gguf(FileType::Q8_0)));
    assert_eq!(d.gguf_file_type, None);
    assert!(d.notes.iter().any(|n| n.contains("general.file_type")));

    // An F16 GGUF is already a `gguf_f16` target, and not an `fp16` (safetensors) one.
    let bytes = gguf_file(
        &[("general.file_type", Kv::U32(1))],
        &[
            ("a.weight", GgmlType::F16, &[64, 64]),
            ("a.bias", GgmlType::F32, &[64]),
        ],
    );
    let (_dir, path) = write_temp("unet-f16.gguf", &bytes);
    let d = detect(&path).unwrap();
    let p = d.precision.unwrap();
    assert_eq!(p, Precision::Gguf(FileType::MostlyF16));
    assert_eq!(serde_json::to_value(&d).unwrap()["precision"], "F16");
    assert!(should_skip(p, "gguf_f16".parse().unwrap()).is_some());
    assert!(should_skip(p, "fp16".parse().unwrap()).is_none());
}

#[test]
fn safetensors_architecture_comes_from_the_tensor_names() {
    let (_dir, path) = write_temp(
        "flux.safetensors",
        &safetensors(
            &[
                (
                    "model.diffusion_model.double_blocks.0.img_attn.proj.weight",
                    Dtype::BF16,
                    &[8, 8],
                ),
                ("model.diffusion_model.img_in.weight", Dtype::BF16, &[8, 4]),
            ],
            &[],
        ),
    );
    assert_eq!(detect(&path).unwrap().architecture.as_deref(), Some("flux"));

    let (_dir, path) = write_temp(
        "other.safetensors",
        &safetensors(&[("encoder.layer.0.weight", Dtype::F16, &[4])], &[]),
    );
    assert_eq!(detect(&path).unwrap().architecture, None);
}

#[test]
fn f64_models_have_no_precision_name_but_remain_a_source() {
    let (_dir, path) = write_temp(
        "sci.safetensors",
        &safetensors(&[("w", Dtype::F64, &[8, 8]), ("b", Dtype::F32, &[8])], &[]),
    );
    let d = detect(&path).unwrap();
    assert_eq!((d.precision, d.evidence), (None, Evidence::Undetermined));
    assert!(d.supported_as_source);
    assert!(d.notes[0].contains("F64"), "{:?}", d.notes);
}

#[test]
fn gguf_errors_stay_on_one_line_even_with_hostile_names() {
    // Two tensors with the same name containing a newline: the reader refuses the duplicate.
    let name = "evil\nname";
    let bytes = gguf_file(
        &[],
        &[(name, GgmlType::F32, &[8]), (name, GgmlType::F32, &[8])],
    );
    let (_dir, path) = write_temp("dup.gguf", &bytes);
    let e = detect(&path).unwrap_err();
    assert_eq!(e.kind(), "gguf");
    let msg = e.to_string();
    common::assert_one_line_naming(&msg, &path);
    assert!(msg.contains(r"evil\nname"), "{msg}");
}

#[test]
fn json_survives_a_non_utf8_path() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"m\xff.safetensors"));
    std::fs::write(&path, safetensors(&[("w", Dtype::F16, &[2])], &[])).unwrap();
    let v = serde_json::to_value(detect(&path).unwrap()).unwrap();
    assert!(
        v["path"]
            .as_str()
            .unwrap()
            .ends_with("m\u{fffd}.safetensors")
    );
    assert_eq!(v["precision"], "fp16");
}
