//! ComfyUI scaled-fp8 sources through the CLI: every target receives de-scaled weights, the
//! scale and marker tensors are dropped, the output is detected as the plain target, and a
//! `comfy_quant` format convcache cannot read is refused (exit 2, nothing published).

mod common;

use std::path::{Path, PathBuf};

use common::{Safetensors, Scratch};
use tensorfile::SafetensorsFile;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tensorfile/tests/golden/scaled_fp8")
        .join(name)
}

/// Copies a golden source into the scratch dir (sources are never written, but tests do not
/// point convcache at the repository).
fn copy_source(s: &Scratch, name: &str) -> PathBuf {
    let path = s.root().join(name);
    std::fs::copy(golden(name), &path).expect("copy golden");
    path
}

fn out_path(run: &common::Run) -> PathBuf {
    PathBuf::from(common::only(&run.json())["path"].as_str().expect("path"))
}

#[test]
fn a_legacy_scaled_source_casts_descaled_and_the_output_converts_on() {
    let s = Scratch::new();
    let src = copy_source(&s, "legacy_source.safetensors");
    let run = s
        .run(&["--json", "convert", src.to_str().unwrap(), "--to", "bf16"])
        .ok();
    let out = out_path(&run);
    let got = Safetensors::read(&out);
    let want = SafetensorsFile::open(&golden("expected_legacy_bf16.safetensors")).unwrap();
    let keys = got.header.keys().filter(|k| *k != "__metadata__").count();
    assert_eq!(keys, want.header.tensors.len(), "scales or marker kept");
    for t in &want.header.tensors {
        assert!(got.tensor(&t.name) == want.tensor_bytes(t), "{}", t.name);
    }
    let d = detect::detect(&out).unwrap();
    assert_eq!(d.precision, Some(detect::Precision::Bf16));
    assert!(d.fp8_scaling.is_none());
    // The output is an ordinary bf16 model: it converts to GGUF.
    s.run(&[
        "convert",
        out.to_str().unwrap(),
        "--to",
        "Q8_0",
        "--arch",
        "flux",
    ])
    .ok();
}

#[test]
fn a_comfy_quant_source_quantizes_to_gguf_descaled() {
    let s = Scratch::new();
    let legacy = copy_source(&s, "legacy_source.safetensors");
    let comfy = copy_source(&s, "comfy_quant_source.safetensors");
    let arch = ["--arch", "flux"];
    let run = |p: &Path| {
        let mut args = vec!["--json", "convert", p.to_str().unwrap(), "--to", "Q8_0"];
        args.extend(arch);
        out_path(&s.run(&args).ok())
    };
    let (a, b) = (run(&legacy), run(&comfy));
    let (a, b) = (
        gguf::GgufFile::open(&a).unwrap(),
        gguf::GgufFile::open(&b).unwrap(),
    );
    // Same fp8 weights and scales in both files: the de-scaled tensors must be identical.
    let mut compared = 0;
    for t in &a.tensors {
        let u = b
            .tensor(&t.name)
            .unwrap_or_else(|| panic!("{} missing", t.name));
        assert_eq!(t.ggml_type, u.ggml_type, "{}", t.name);
        assert!(a.tensor_data(t) == b.tensor_data(u), "{} differs", t.name);
        compared += 1;
    }
    assert!(compared >= 6);
    for name in b.tensors.iter().map(|t| t.name.as_str()) {
        assert!(
            !name.ends_with("_scale") && !name.ends_with("comfy_quant"),
            "{name} written"
        );
    }
}

#[test]
fn an_unreadable_comfy_quant_format_is_refused() {
    let s = Scratch::new();
    let src = copy_source(&s, "comfy_quant_source.safetensors");
    // Rewrite one layer's format in place: same length, so the header stays valid.
    let mut bytes = std::fs::read(&src).unwrap();
    let from = br#"{"format": "float8_e5m2"}"#;
    let to = br#"{"format": "nvfp4"}      "#;
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("the e5m2 layer's comfy_quant");
    bytes[at..at + to.len()].copy_from_slice(to);
    std::fs::write(&src, &bytes).unwrap();
    for target in ["bf16", "Q8_0", "nf4"] {
        let run = s.run(&["convert", src.to_str().unwrap(), "--to", target]);
        assert_eq!(run.code, 2, "{target}: {}", run.stderr);
        assert!(
            run.stderr.contains("comfy_quant_source.safetensors"),
            "{}",
            run.stderr
        );
        assert!(run.stderr.contains("nvfp4"), "{}", run.stderr);
        assert!(s.converted_files().is_empty());
        assert!(common::files_in(&s.models().join("diffusion_models/gguf")).is_empty());
    }
    assert_eq!(
        std::fs::read(&src).unwrap(),
        bytes,
        "the source was written"
    );
}
