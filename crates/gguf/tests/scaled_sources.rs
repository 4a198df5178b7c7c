//! ComfyUI scaled-fp8 sources (both layouts) convert to GGUF de-scaled: every weight is torch's
//! `w.to(torch.float32) * scale` (the goldens of `tensorfile/tests/golden/scaled_fp8`, made by
//! torch), planned as the fp8 tensor the file stores, and the scale, input-scale, marker and
//! `comfy_quant` tensors are listed as dropped, never written.

#![allow(clippy::unwrap_used)] // test code: a failed setup step should fail the test loudly

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gguf::convert::GgufConversion;
use gguf::{Arch, FileType, GgmlType, GgufFile};
use tensorfile::SafetensorsFile;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tensorfile/tests/golden/scaled_fp8")
        .join(name)
}

fn convert(source: &str, target: FileType) -> (GgufConversion, GgufFile) {
    let source = tensorfile::open_safetensors(&golden(source)).unwrap();
    let planned = GgufConversion::plan(source, Some(Arch::Flux), target, &BTreeMap::new()).unwrap();
    let mut out = Vec::new();
    let report = planned.write(&mut out, &mut |_, _| {}).unwrap();
    assert_eq!(out.len() as u64, planned.output_len());
    assert_eq!(report.tensors, planned.gguf_plan().tensors.len() as u64);
    (
        planned,
        GgufFile::from_bytes(out, Path::new("out.gguf")).unwrap(),
    )
}

#[test]
fn scaled_weights_are_written_de_scaled_and_their_scales_dropped() {
    let expected = SafetensorsFile::open(&golden("expected_comfy_quant_fp32.safetensors")).unwrap();
    for (source, hidden) in [
        (
            "comfy_quant_source.safetensors",
            &[
                "double_blocks.0.img_attn.qkv.comfy_quant",
                "double_blocks.0.img_attn.qkv.input_scale",
                "double_blocks.0.img_attn.qkv.weight_scale",
                "single_blocks.0.linear2.weight_scale",
            ][..],
        ),
        (
            "comfy_quant_metadata_source.safetensors",
            &["double_blocks.0.img_attn.qkv.weight_scale"][..],
        ),
    ] {
        let (planned, file) = convert(source, FileType::AllF32);
        let dropped: Vec<&str> = planned
            .gguf_plan()
            .dropped
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        for name in hidden {
            assert!(
                dropped.contains(name),
                "{source}: {name} not in {dropped:?}"
            );
        }
        assert_eq!(
            file.tensors.len(),
            expected.header.tensors.len(),
            "{source}"
        );
        for t in &file.tensors {
            let (entry, bytes) = expected.tensor(&t.name).unwrap();
            assert_eq!(t.torch_shape(), entry.shape, "{source}: {}", t.name);
            assert_eq!(file.tensor_data(t), bytes, "{source}: {}", t.name);
        }
    }
}

#[test]
fn a_de_scaled_weight_is_planned_as_the_fp8_tensor_it_is_stored_as() {
    let source = tensorfile::open_safetensors(&golden("legacy_source.safetensors")).unwrap();
    let planned =
        GgufConversion::plan(source, Some(Arch::Flux), FileType::Q8_0, &BTreeMap::new()).unwrap();
    let plan = planned.gguf_plan();
    let weight = plan
        .tensors
        .iter()
        .find(|t| t.name == "double_blocks.0.img_attn.qkv.weight")
        .unwrap();
    // convert.py widens fp8 to F16 before llama-quantize sees it.
    assert_eq!(weight.base_type, GgmlType::F16);
    assert_eq!(weight.ggml_type, GgmlType::Q8_0);
    assert!(plan.dropped.iter().any(|d| d.name == "scaled_fp8"));
    assert!(plan.tensors.iter().all(|t| !t.name.contains("scale_")));
}
