//! Text encoders end to end (the `fixtures/archs/` T5, umt5 and CLIP files, copied into a
//! scratch dir): casts, fp8 and GGUF go to `text_encoders/{converted,gguf}`, `list` and
//! `stats` show them with their kind; CLIP has no GGUF (exit 2, one line, nothing published)
//! while its casts work.

mod common;

use std::path::PathBuf;

use common::*;

fn fixture(s: &Scratch, name: &str) -> PathBuf {
    let from = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/archs")
        .join(name);
    let to = s.root().join(name);
    std::fs::copy(from, &to).expect("copy fixture");
    to
}

#[test]
fn text_encoders_convert_into_their_own_folders_and_are_listed() {
    let s = Scratch::new();
    let t5 = fixture(&s, "t5xxl_fp16.safetensors");
    let umt5 = fixture(&s, "umt5xxl_bf16.safetensors");
    let te = s.models().join("text_encoders");
    let d = s
        .run(&["--json", "detect", t5.to_str().unwrap()])
        .ok()
        .json();
    assert_eq!(d[0]["architecture"], "t5xxl");
    assert_eq!(d[0]["model_kind"], "text_encoders");
    let text = s.run(&["detect", umt5.to_str().unwrap()]).ok().stdout;
    assert!(
        text.contains("umt5xxl") && text.contains("text encoder"),
        "{text}"
    );

    let run = s
        .run(&[
            "--json",
            "-q",
            "convert",
            t5.to_str().unwrap(),
            "--to",
            "bf16,fp8,Q4_K_M",
        ])
        .ok();
    let rows = run.json();
    let paths: Vec<PathBuf> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| PathBuf::from(r["path"].as_str().unwrap()))
        .collect();
    assert_eq!(
        paths,
        [
            te.join("converted/t5xxl_bf16.safetensors"),
            te.join("converted/t5xxl_fp8_e4m3fn.safetensors"),
            te.join("gguf/t5xxl_Q4_K_M.gguf"),
        ]
    );
    assert_eq!(rows[2]["report"]["architecture"], "t5xxl");
    // A second run answers from the cache.
    let again = s
        .run(&[
            "--json",
            "-q",
            "convert",
            t5.to_str().unwrap(),
            "--to",
            "Q4_K_M",
        ])
        .ok()
        .json();
    assert_eq!(again[0]["status"], "cached");
    s.run(&["-q", "convert", umt5.to_str().unwrap(), "--to", "Q8_0"])
        .ok();
    assert!(te.join("gguf/umt5xxl_Q8_0.gguf").is_file());
    // Nothing went to the diffusion models' folders.
    assert!(files_in(&s.models().join("diffusion_models/gguf")).is_empty());
    assert!(s.converted_files().is_empty());

    let list = s.run(&["--json", "list"]).ok().json();
    let kinds: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["model_kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["text_encoders"; 4]);
    let stats = s.run(&["--json", "stats"]).ok().json();
    assert_eq!(stats["by_kind"]["text_encoders"]["count"], 4, "{stats}");
    let text = s.run(&["stats"]).ok().stdout;
    assert!(text.contains("text_encoders"), "{text}");
    // cleanup reaches them.
    s.run(&["-q", "cleanup", t5.to_str().unwrap(), "--keep", "0"])
        .ok();
    assert_eq!(
        files_in(&te.join("converted"))
            .into_iter()
            .filter(|f| f.ends_with(".safetensors"))
            .count(),
        0
    );
}

#[test]
fn t5_fp8_scaled_quantizes_the_encoder_blocks_only() {
    let s = Scratch::new();
    let t5 = fixture(&s, "t5xxl_fp16.safetensors");
    s.run(&["-q", "convert", t5.to_str().unwrap(), "--to", "fp8_scaled"])
        .ok();
    let out = Safetensors::read(
        &s.models()
            .join("text_encoders/converted/t5xxl_fp8_scaled.safetensors"),
    );
    assert_eq!(
        out.dtype("encoder.block.0.layer.0.SelfAttention.q.weight"),
        "F8_E4M3"
    );
    assert_eq!(
        out.dtype("encoder.block.1.layer.1.DenseReluDense.wi_0.weight"),
        "F8_E4M3"
    );
    for kept in [
        "shared.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "encoder.block.0.layer.0.layer_norm.weight",
        "encoder.final_layer_norm.weight",
    ] {
        assert_eq!(out.dtype(kept), "F16", "{kept}");
    }
}

#[test]
fn umt5_casts_keep_the_tokenizer_bytes() {
    let s = Scratch::new();
    let umt5 = fixture(&s, "umt5xxl_bf16.safetensors");
    let src = Safetensors::read(&umt5);
    s.run(&[
        "-q",
        "convert",
        umt5.to_str().unwrap(),
        "--to",
        "fp16,fp8_scaled",
    ])
    .ok();
    for out in ["umt5xxl_fp16.safetensors", "umt5xxl_fp8_scaled.safetensors"] {
        let o = Safetensors::read(&s.models().join("text_encoders/converted").join(out));
        assert_eq!(o.dtype("spiece_model"), "U8", "{out}");
        assert_eq!(
            o.tensor("spiece_model"),
            src.tensor("spiece_model"),
            "{out}"
        );
    }
}

#[test]
fn clip_gets_casts_but_no_gguf() {
    let s = Scratch::new();
    let clip = fixture(&s, "clip_l_fp16.safetensors");
    let run = s.run(&["-q", "convert", clip.to_str().unwrap(), "--to", "Q8_0"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", run.stderr);
    assert!(lines[0].contains("clip_l_fp16.safetensors"), "{}", lines[0]);
    assert!(lines[0].contains("cannot load CLIP"), "{}", lines[0]);
    assert!(
        files_in(&s.models().join("text_encoders/gguf"))
            .iter()
            .all(|f| f.starts_with('.'))
    );
    s.run(&["-q", "convert", clip.to_str().unwrap(), "--to", "bf16,fp8"])
        .ok();
    let conv = files_in(&s.models().join("text_encoders/converted"));
    assert!(conv.contains("clip_l_bf16.safetensors"), "{conv:?}");
    assert!(conv.contains("clip_l_fp8_e4m3fn.safetensors"), "{conv:?}");
}
