//! ComfyUI scaled-fp8 sources (the legacy `scaled_fp8` layout and the per-layer `comfy_quant`
//! layout, with per-layer tensors or `_quantization_metadata`) convert de-scaled: every weight
//! equals torch's `(w.to(torch.float32) * scale).to(target)`, every other tensor `t.to(target)`,
//! and no scale, marker or `comfy_quant` tensor is written. The expected files were made by
//! torch (`crates/tensorfile/tests/golden/scaled_fp8/make_goldens.py`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use detect::Precision;
use precision::{convert, merged_metadata, plan};
use tensorfile::{SafetensorsFile, open_safetensors};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tensorfile/tests/golden/scaled_fp8")
        .join(name)
}

fn convert_to_file(source: &str, target: Precision, dir: &Path) -> SafetensorsFile {
    let src = open_safetensors(&golden(source)).expect("test setup");
    let p = plan(src.as_ref(), target).expect("test setup");
    let meta = merged_metadata(src.metadata(), &BTreeMap::new());
    let mut out = Vec::new();
    convert(src.as_ref(), &p, &meta, &mut out, &mut |_, _| {}).expect("test setup");
    assert_eq!(out.len() as u64, p.output_len(&meta).expect("test setup"));
    let path = dir.join(format!("{source}.{target}.safetensors"));
    std::fs::write(&path, out).expect("test setup");
    SafetensorsFile::open(&path).expect("test setup")
}

#[test]
fn every_scaled_layout_converts_to_torchs_descaled_values() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("legacy_source.safetensors", "legacy"),
        ("comfy_quant_source.safetensors", "comfy_quant"),
        ("comfy_quant_metadata_source.safetensors", "comfy_quant"),
    ];
    for (source, expected) in cases {
        for (target, suffix) in [
            (Precision::Fp32, "fp32"),
            (Precision::Fp16, "fp16"),
            (Precision::Bf16, "bf16"),
        ] {
            let out = convert_to_file(source, target, dir.path());
            let want = SafetensorsFile::open(&golden(&format!(
                "expected_{expected}_{suffix}.safetensors"
            )))
            .unwrap();
            let names = |f: &SafetensorsFile| {
                let mut n: Vec<String> = f.header.tensors.iter().map(|t| t.name.clone()).collect();
                n.sort();
                n
            };
            assert_eq!(names(&out), names(&want), "{source} -> {target}: key set");
            for t in &want.header.tensors {
                let (got, bytes) = out.tensor(&t.name).unwrap();
                assert_eq!((got.dtype, &got.shape), (t.dtype, &t.shape), "{}", t.name);
                assert!(
                    bytes == want.tensor_bytes(t),
                    "{source} -> {target}: tensor {} differs from torch",
                    t.name
                );
            }
            let d = detect::detect(&out.path).unwrap();
            assert_eq!(d.precision, Some(target), "{source} -> {target}");
            assert!(d.fp8_scaling.is_none(), "{source} -> {target}");
            // Convertible again, and nothing tells ComfyUI the plain weights are quantized.
            assert!(d.supported_as_source, "{source} -> {target}: {:?}", d.notes);
            assert!(!out.header.metadata.contains_key("_quantization_metadata"));
        }
    }
}

#[test]
fn detection_names_each_layout() {
    for (source, layout, layers) in [
        ("legacy_source.safetensors", "scaled_fp8", 3),
        ("comfy_quant_source.safetensors", "comfy_quant", 4),
        ("comfy_quant_metadata_source.safetensors", "comfy_quant", 4),
    ] {
        let d = detect::detect(&golden(source)).unwrap();
        let s = d.fp8_scaling.expect(source);
        assert_eq!((s.layout, s.scale_weights), (layout, layers), "{source}");
        assert_eq!(s.scale_inputs, 1, "{source}");
        assert!(d.supported_as_source);
    }
    let s = detect::detect(&golden("comfy_quant_source.safetensors"))
        .unwrap()
        .fp8_scaling
        .unwrap();
    assert_eq!(
        s.formats,
        BTreeMap::from([
            ("float8_e4m3fn".to_string(), 3),
            ("float8_e5m2".to_string(), 1)
        ])
    );
}
