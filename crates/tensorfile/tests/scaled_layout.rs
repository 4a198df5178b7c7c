//! The scaled-fp8 layout parser refuses what it cannot serve correctly, naming the tensor; the
//! view hides exactly the scale, marker and comfy_quant tensors.

use std::collections::BTreeMap;
use std::path::Path;

use tensorfile::safetensors::Dtype;
use tensorfile::{SourceError, open_safetensors};

type Tensor = (&'static str, Dtype, Vec<u64>, Vec<u8>);

fn write(path: &Path, tensors: &[Tensor], meta: &[(&str, &str)]) {
    let meta: BTreeMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tensorfile::safetensors::writer::write_file(path, tensors, &meta).expect("test setup");
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn fp8_weight(name: &'static str) -> Tensor {
    // e4m3fn codes: 0x38 = 1.0, 0x40 = 2.0, 0xB8 = -1.0, 0x00 = 0.
    (
        name,
        Dtype::F8E4M3,
        vec![2, 2],
        vec![0x38, 0x40, 0xB8, 0x00],
    )
}

fn refused(tensors: &[Tensor], meta: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().expect("test setup");
    let path = dir.path().join("m.safetensors");
    write(&path, tensors, meta);
    match open_safetensors(&path) {
        Err(e @ SourceError::Invalid { .. }) => {
            assert!(e.is_input_fault());
            assert!(
                e.to_string().starts_with(&path.display().to_string()),
                "{e}"
            );
            e.to_string()
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_legacy_file_is_served_descaled_with_scales_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    write(
        &path,
        &[
            ("scaled_fp8", Dtype::F8E4M3, vec![0], vec![]),
            fp8_weight("a.weight"),
            ("a.scale_weight", Dtype::F32, vec![], f32s(&[0.5])),
            ("a.scale_input", Dtype::F32, vec![], f32s(&[1.0])),
            ("a.bias", Dtype::BF16, vec![2], vec![0x80, 0x3f, 0, 0x40]),
        ],
        &[],
    );
    let src = open_safetensors(&path).unwrap();
    let names: Vec<&str> = src.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a.weight", "a.bias"]);
    let hidden: Vec<&str> = src.hidden().iter().map(|h| h.name.as_str()).collect();
    assert_eq!(hidden, ["scaled_fp8", "a.scale_weight", "a.scale_input"]);
    let w = &src.tensors()[0];
    assert_eq!(w.dtype, Dtype::F32);
    let mut v = [0f32; 4];
    src.read_f32(0, 0, &mut v).unwrap();
    assert_eq!(v, [0.5, 1.0, -0.5, 0.0]);
    let mut raw = [0u8; 8];
    src.read_raw(0, 8, &mut raw).unwrap();
    assert_eq!(raw, f32s(&[-0.5, 0.0])[..]);
    // Out of range is an error, not a panic.
    assert!(src.read_f32(0, 3, &mut v).is_err());
}

/// Flux.2 dev's `flux2_dev_fp8mixed` layout (fp8 weights with `weight_scale` and
/// `input_scale`, no `.comfy_quant` tensors; crates/detect/tests/real_key_sets) is read with
/// its layer formats from `_quantization_metadata`; without them the scales could not be
/// applied, and the file is refused instead of being served unscaled.
#[test]
fn weight_scales_without_layer_formats_are_refused() {
    let tensors = [
        fp8_weight("double_blocks.0.img_mlp.0.weight"),
        (
            "double_blocks.0.img_mlp.0.weight_scale",
            Dtype::F32,
            vec![],
            f32s(&[0.5]),
        ),
        (
            "double_blocks.0.img_mlp.0.input_scale",
            Dtype::F32,
            vec![],
            f32s(&[1.0]),
        ),
        (
            "double_blocks.0.img_attn.proj.weight",
            Dtype::BF16,
            vec![2],
            vec![0x80, 0x3f, 0, 0x40],
        ),
    ];
    let e = refused(&tensors, &[]);
    assert!(
        e.contains("double_blocks.0.img_mlp.0.weight_scale") && e.contains("no comfy_quant"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    write(
        &path,
        &tensors,
        &[(
            "_quantization_metadata",
            r#"{"format_version": "1.0", "layers": {"double_blocks.0.img_mlp.0": {"format": "float8_e4m3fn"}}}"#,
        )],
    );
    let src = open_safetensors(&path).unwrap();
    let mut v = [0f32; 4];
    src.read_f32(0, 0, &mut v).unwrap();
    assert_eq!(v, [0.5, 1.0, -0.5, 0.0]);
    // A bf16 file with a stray scale name is not quantized: served as it is.
    let plain = [
        ("a.weight", Dtype::BF16, vec![2], vec![0x80, 0x3f, 0, 0x40]),
        ("a.weight_scale", Dtype::F32, vec![], f32s(&[0.5])),
    ];
    let path = dir.path().join("plain.safetensors");
    write(&path, &plain, &[]);
    assert_eq!(open_safetensors(&path).unwrap().tensors().len(), 2);
}

#[test]
fn broken_layouts_are_refused_by_tensor() {
    let e = refused(
        &[
            ("a.weight", Dtype::BF16, vec![2], vec![0; 4]),
            ("a.scale_weight", Dtype::F32, vec![], f32s(&[0.5])),
        ],
        &[],
    );
    assert!(
        e.contains("a.weight") && e.contains("not float8_e4m3fn"),
        "{e}"
    );
    let e = refused(&[("b.scale_weight", Dtype::F32, vec![], f32s(&[0.5]))], &[]);
    assert!(e.contains("without its weight"), "{e}");
    let e = refused(
        &[
            fp8_weight("a.weight"),
            ("a.scale_weight", Dtype::F32, vec![2], f32s(&[0.5, 0.5])),
        ],
        &[],
    );
    assert!(e.contains("per-channel"), "{e}");
    let e = refused(
        &[
            fp8_weight("a.weight"),
            ("a.scale_weight", Dtype::F32, vec![], f32s(&[f32::NAN])),
        ],
        &[],
    );
    assert!(e.contains("NaN"), "{e}");
    let e = refused(
        &[
            ("a.comfy_quant", Dtype::U8, vec![3], b"{no".to_vec()),
            fp8_weight("a.weight"),
            ("a.weight_scale", Dtype::F32, vec![], f32s(&[0.5])),
        ],
        &[],
    );
    assert!(e.contains("not JSON"), "{e}");
    let e = refused(
        &[
            fp8_weight("a.weight"),
            ("a.weight_scale", Dtype::F32, vec![], f32s(&[0.5])),
            ("scaled_fp8", Dtype::F8E4M3, vec![0], vec![]),
        ],
        &[(
            "_quantization_metadata",
            r#"{"layers":{"a":{"format":"float8_e4m3fn"}}}"#,
        )],
    );
    assert!(e.contains("mixes"), "{e}");
    let e = refused(
        &[fp8_weight("a.weight")],
        &[(
            "_quantization_metadata",
            r#"{"layers":{"a":{"format":"mxfp8"}}}"#,
        )],
    );
    assert!(e.contains("mxfp8") && e.contains("cannot be read"), "{e}");
}
