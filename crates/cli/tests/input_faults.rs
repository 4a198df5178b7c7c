//! Input faults found by a converter (not by detection) exit 2 with a one-line error naming
//! the file, and publish nothing: `smart` keeps the converter's error kind.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{Scratch, files_in};
use tensorfile::safetensors::Dtype;
use tensorfile::{SafetensorsWriter, TensorSpec};

/// Writes a safetensors file of these tensors; every float is 0.0 except one-element tensors,
/// which hold 1.0 (a valid `scale_weight`).
fn write_model(path: &Path, tensors: &[(&str, Dtype, &[u64])]) {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(name, dtype, shape)| TensorSpec {
            name: (*name).to_owned(),
            dtype: *dtype,
            shape: shape.to_vec(),
        })
        .collect();
    let mut out = Vec::new();
    let mut w = SafetensorsWriter::new(&mut out, &specs, &BTreeMap::new()).expect("header");
    for s in &specs {
        let len = s.byte_len().expect("a small tensor") as usize;
        let bytes = match (s.dtype, len) {
            (Dtype::F32, 4) => 1f32.to_le_bytes().to_vec(),
            _ => vec![0u8; len],
        };
        if len > 0 {
            w.write_chunk(&bytes).expect("tensor data");
        }
    }
    w.finish().expect("complete");
    std::fs::write(path, out).expect("write the model");
}

/// A Flux weight (the key that names the architecture) and a few more float tensors.
const FLUX_WEIGHT: &str = "double_blocks.0.img_attn.proj.weight";

/// Runs `convert SRC --to TARGET` and asserts exit 2, one error line naming the file, and
/// nothing published.
fn assert_input_fault(s: &Scratch, src: &Path, target: &str, needle: &str) {
    let run = s.run(&[
        "convert",
        src.to_str().expect("utf-8 temp path"),
        "--to",
        target,
    ]);
    let err = run.stderr.trim();
    assert_eq!(run.code, 2, "{target}: exit {}: {err}", run.code);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&src.display().to_string()), "{err}");
    assert!(err.contains(needle), "{err}");
    for dir in ["converted", "gguf"] {
        let dir: PathBuf = s.models().join("diffusion_models").join(dir);
        let published: Vec<_> = files_in(&dir)
            .into_iter()
            .filter(|n| n != cache::STATE_DIR)
            .collect();
        assert!(published.is_empty(), "{}: {published:?}", dir.display());
    }
}

#[test]
fn a_duplicate_tensor_name_exits_2() {
    let s = Scratch::new();
    let src = s.root().join("dup.safetensors");
    // Both keys become `double_blocks.0.img_attn.proj.weight` once convert.py's prefix rule
    // removes every `model.diffusion_model.`.
    let once = format!("model.diffusion_model.{FLUX_WEIGHT}");
    let twice = format!("model.diffusion_model.{once}");
    write_model(
        &src,
        &[
            (&once, Dtype::F32, &[64, 64]),
            (&twice, Dtype::F32, &[64, 64]),
        ],
    );
    assert_input_fault(&s, &src, "Q8_0", "two source tensors");
}

#[test]
fn an_unsupported_dtype_exits_2() {
    let s = Scratch::new();
    let src = s.root().join("e8m0.safetensors");
    write_model(
        &src,
        &[
            (FLUX_WEIGHT, Dtype::F32, &[64, 64]),
            ("double_blocks.0.img_attn.norm.scale", Dtype::F8E8M0, &[64]),
        ],
    );
    assert_input_fault(&s, &src, "bf16", "F8_E8M0");
    assert_input_fault(&s, &src, "Q8_0", "double_blocks.0.img_attn.norm.scale");
}

#[test]
fn a_diffusers_layout_file_or_an_unknown_architecture_exits_2() {
    let s = Scratch::new();
    let src = s.root().join("model.safetensors");
    write_model(
        &src,
        &[
            (
                "single_transformer_blocks.0.attn.norm_k.weight",
                Dtype::F32,
                &[128],
            ),
            (
                "transformer_blocks.0.attn.to_q.weight",
                Dtype::F32,
                &[64, 256],
            ),
        ],
    );
    assert_input_fault(&s, &src, "Q8_0", "diffusers layout");
    // Forcing the architecture it is detected as does not get it past the check.
    let run = s.run(&[
        "convert",
        src.to_str().expect("utf-8 temp path"),
        "--to",
        "Q8_0",
        "--arch",
        "flux",
    ]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("diffusers layout"), "{}", run.stderr);

    let unknown = s.root().join("mystery.safetensors");
    write_model(&unknown, &[("foo.weight", Dtype::F32, &[64, 256])]);
    assert_input_fault(&s, &unknown, "Q8_0", "unknown model architecture");
}

#[test]
fn a_scale_weight_on_a_non_fp8_weight_exits_2() {
    let s = Scratch::new();
    let src = s.root().join("scaled_bf16.safetensors");
    write_model(
        &src,
        &[
            (FLUX_WEIGHT, Dtype::BF16, &[64, 64]),
            (
                "double_blocks.0.img_attn.proj.scale_weight",
                Dtype::F32,
                &[1],
            ),
        ],
    );
    assert_input_fault(&s, &src, "Q8_0", "scale_weight");
}
