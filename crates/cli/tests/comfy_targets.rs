//! ComfyUI's quantized targets (`fp8_scaled`, `nvfp4`, `mxfp8`) through the CLI: each converts
//! a Flux-like model into `diffusion_models/converted/{base}_{target}.safetensors`, verified
//! (re-detected as the target) and cached; an output asked for its own target is the answer
//! itself; a scaled-fp8 file is not a plain fp8 one.

mod common;

use std::path::PathBuf;

use cli::sample::SampleSpec;
use common::*;
use serde_json::Value;

/// Hidden size 64: every weight's dims are multiples of the nvfp4 and mxfp8 blocks.
const SAMPLE: SampleSpec = SampleSpec {
    hidden: 64,
    blocks: 2,
    seed: 7,
};

fn path_of(v: &Value) -> PathBuf {
    PathBuf::from(
        v["path"]
            .as_str()
            .unwrap_or_else(|| panic!("no path in {v}")),
    )
}

/// (canonical name, another spelling, `comfy_quant` format).
type Target = (&'static str, &'static str, &'static str);

/// Converts the sample to each of `targets`, then again (cached, through another spelling),
/// then each output to its own target (the output itself).
fn converts_is_cached_and_is_its_own_target(targets: &[Target]) {
    let s = Scratch::new();
    let src = s.source("flux_sample_fp32.safetensors", SAMPLE);
    let list = |pick: fn(&Target) -> &str| targets.iter().map(pick).collect::<Vec<_>>().join(",");
    let v = s
        .run(&["--json", "convert", src.arg(), "--to", &list(|t| t.0)])
        .ok()
        .json();
    let rows = v.as_array().expect("an array");
    assert_eq!(rows.len(), targets.len());
    // Per double block: img_attn.qkv, img_attn.proj, img_mlp.0, img_mlp.2; per single block:
    // linear1. img_in, time_in and final_layer stay high precision.
    let quantized = 4 * SAMPLE.blocks + SAMPLE.blocks;
    for (row, &(target, _, format)) in rows.iter().zip(targets) {
        assert_eq!(row["status"], "converted", "{row}");
        assert_eq!(row["target"], target, "{row}");
        let out = path_of(row);
        assert_eq!(
            out,
            s.converted_dir()
                .join(format!("flux_sample_{target}.safetensors"))
        );
        let report = &row["report"];
        assert_eq!(report["quantized"], quantized, "{row}");
        assert_eq!(report["layer_rule"], "flux", "{row}");
        assert_eq!(report["formats"][format], quantized, "{row}");

        let st = Safetensors::read(&out);
        // The f32 model's high-precision layers are bf16.
        for name in ["img_in.weight", "final_layer.linear.weight", "img_in.bias"] {
            assert_eq!(st.dtype(name), "BF16", "{target} {name}");
        }
        let marker = st.tensor("double_blocks.1.img_attn.qkv.comfy_quant");
        assert_eq!(marker, format!("{{\"format\": \"{format}\"}}").as_bytes());
        assert!(st.header.get("img_in.comfy_quant").is_none());

        let d = detect::detect(&out).expect("detect");
        assert_eq!(
            d.precision.map(|p| p.canonical_name()),
            Some(target),
            "{:?}",
            d.notes
        );
    }

    // Again: cached, through another spelling.
    let again = s
        .run(&["--json", "convert", src.arg(), "--to", &list(|t| t.1)])
        .ok()
        .json();
    for (a, b) in rows.iter().zip(again.as_array().expect("an array")) {
        assert_eq!(b["status"], "cached", "{b}");
        assert_eq!(a["path"], b["path"]);
    }

    // An output asked for its own target is the answer, as is.
    for (row, &(target, _, _)) in rows.iter().zip(targets) {
        let out = path_of(row);
        let bytes = std::fs::read(&out).expect("read");
        let v = s
            .run(&[
                "--json",
                "convert",
                out.to_str().expect("utf-8"),
                "--to",
                target,
            ])
            .ok()
            .json();
        let r = only(&v);
        assert_eq!(r["status"], "source_is_target", "{r}");
        assert_eq!(path_of(r), out);
        assert!(std::fs::read(&out).expect("read") == bytes);
    }
    src.assert_unchanged();
}

#[test]
fn fp8_scaled_converts_is_cached_and_is_its_own_target() {
    converts_is_cached_and_is_its_own_target(&[(
        "fp8_scaled",
        "fp8_e4m3fn_scaled",
        "float8_e4m3fn",
    )]);
}

#[test]
fn nvfp4_and_mxfp8_convert_are_cached_and_are_their_own_target() {
    converts_is_cached_and_is_its_own_target(&[
        ("nvfp4", "NVFP4", "nvfp4"),
        ("mxfp8", "MXFP8", "mxfp8"),
    ]);
}

#[test]
fn a_scaled_fp8_output_is_not_a_plain_fp8_file() {
    let s = Scratch::new();
    let src = s.source("flux_sample.safetensors", SAMPLE);
    let v = s
        .run(&["--json", "convert", src.arg(), "--to", "fp8_scaled"])
        .ok()
        .json();
    let scaled = path_of(only(&v));
    // To plain fp8 it converts (de-scaled), into its own name.
    let v = s
        .run(&[
            "--json",
            "convert",
            scaled.to_str().expect("utf-8"),
            "--to",
            "fp8",
        ])
        .ok()
        .json();
    let r = only(&v);
    assert_eq!(r["status"], "converted", "{r}");
    let plain = path_of(r);
    assert_eq!(
        plain,
        s.converted_dir().join("flux_sample_fp8_e4m3fn.safetensors")
    );
    let st = Safetensors::read(&plain);
    assert!(!st.header.keys().any(|k| k.ends_with(".comfy_quant")));
    assert!(!st.header.keys().any(|k| k.ends_with(".weight_scale")));
    assert_eq!(
        detect::detect(&plain).expect("detect").precision,
        Some(detect::Precision::Fp8E4m3fn)
    );
}
