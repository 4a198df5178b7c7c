//! `open_safetensors` serves ComfyUI's nvfp4 and mxfp8 files (and fp8_scaled ones) dequantized:
//! the goldens' weights read back as comfy-kitchen's f32 dequantization, in any element range,
//! in their logical shape when `orig_shape` records it; broken block-scaled layers are refused,
//! naming the tensor.

use std::collections::BTreeMap;
use std::path::Path;

use tensorfile::blockfp::{self, MXFP8_GROUP, NVFP4_GROUP};
use tensorfile::safetensors::Dtype;
use tensorfile::scaled::ScaledLayout;
use tensorfile::{
    SafetensorsFile, SafetensorsWriter, SourceError, TensorSource, TensorSpec, open_safetensors,
    widen_to_f32,
};

type Tensor = (String, Dtype, Vec<u64>, Vec<u8>);

fn golden(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/comfy_quant")
        .join(file)
}

/// Every tensor of a file, in file order.
fn read_all(path: &Path) -> Vec<Tensor> {
    let file = SafetensorsFile::open(path).expect("test file");
    file.header
        .tensors
        .iter()
        .map(|t| {
            let mut bytes = vec![0u8; t.byte_len() as usize];
            file.read_tensor_range(t, 0, &mut bytes).expect("test file");
            (t.name.clone(), t.dtype, t.shape.clone(), bytes)
        })
        .collect()
}

fn write(path: &Path, tensors: &[Tensor]) {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, d, s, _)| TensorSpec {
            name: n.clone(),
            dtype: *d,
            shape: s.clone(),
        })
        .collect();
    let file = std::fs::File::create(path).expect("test setup");
    let mut w = SafetensorsWriter::new(file, &specs, &BTreeMap::new()).expect("test setup");
    for (_, _, _, b) in tensors {
        if !b.is_empty() {
            w.write_chunk(b).expect("test setup");
        }
    }
    w.finish().expect("test setup");
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    let mut v = vec![0f32; bytes.len() / 4];
    widen_to_f32(Dtype::F32, bytes, &mut v).expect("f32 bytes");
    v
}

/// comfy-kitchen's f32 dequantization of each golden weight, by layer name.
fn expected(fmt: &str) -> BTreeMap<String, (Vec<u64>, Vec<f32>)> {
    read_all(&golden(&format!("dequant_{fmt}.safetensors")))
        .into_iter()
        .map(|(name, _, shape, bytes)| (name, (shape, f32s(&bytes))))
        .collect()
}

fn read_whole(src: &dyn TensorSource, index: usize) -> Vec<f32> {
    let mut v = vec![0f32; src.tensors()[index].n_elements() as usize];
    src.read_f32(index, 0, &mut v)
        .expect("a whole served tensor");
    v
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The goldens as stored: no `orig_shape`, so padded weights are served padded, with the
/// logical values in the top-left corner and +0.0 in the padding.
#[test]
fn the_golden_files_are_served_dequantized() {
    for (fmt, group, hidden_per_layer) in [
        ("fp8_scaled", 1, 2),
        ("nvfp4", NVFP4_GROUP, 3),
        ("mxfp8", MXFP8_GROUP, 2),
    ] {
        let src = open_safetensors(&golden(&format!("{fmt}.safetensors"))).unwrap();
        let expected = expected(fmt);
        assert_eq!(src.tensors().len(), expected.len(), "{fmt}");
        assert_eq!(
            src.hidden().len(),
            hidden_per_layer * expected.len(),
            "{fmt}"
        );
        for (i, t) in src.tensors().iter().enumerate() {
            let layer = t
                .name
                .strip_suffix(".weight")
                .expect("only weights are served");
            let (shape, values) = &expected[layer];
            let (rows, cols) = (shape[0] as usize, shape[1] as usize);
            let padded = match group {
                1 => (rows, cols),
                NVFP4_GROUP => blockfp::nvfp4_padded_shape(rows, cols),
                _ => blockfp::mxfp8_padded_shape(rows, cols),
            };
            assert_eq!(t.dtype, Dtype::F32, "{}", t.name);
            assert_eq!(t.shape, [padded.0 as u64, padded.1 as u64], "{}", t.name);
            let served = read_whole(src.as_ref(), i);
            for (r, row) in served.chunks_exact(padded.1).enumerate() {
                let (logical, padding) = row.split_at(cols.min(row.len()));
                if r < rows {
                    assert_eq!(
                        bits(logical),
                        bits(&values[r * cols..][..cols]),
                        "{} row {r}",
                        t.name
                    );
                    assert!(
                        padding.iter().all(|v| v.to_bits() == 0),
                        "{} row {r}",
                        t.name
                    );
                } else {
                    assert!(row.iter().all(|v| v.to_bits() == 0), "{} row {r}", t.name);
                }
            }
        }
    }
}

/// A copy of the golden `fmt` file whose comfy_quant JSON records each weight's logical shape.
fn with_orig_shapes(fmt: &str, path: &Path) {
    let expected = expected(fmt);
    let tensors: Vec<Tensor> = read_all(&golden(&format!("{fmt}.safetensors")))
        .into_iter()
        .map(
            |(name, dtype, shape, bytes)| match name.strip_suffix(".comfy_quant") {
                Some(layer) => {
                    let s = &expected[layer].0;
                    let json = format!(
                        r#"{{"format": "{fmt}", "orig_shape": [{}, {}]}}"#,
                        s[0], s[1]
                    );
                    (name, dtype, vec![json.len() as u64], json.into_bytes())
                }
                None => (name, dtype, shape, bytes),
            },
        )
        .collect();
    write(path, &tensors);
}

#[test]
fn orig_shape_gives_the_logical_shape_and_every_range_reads_the_same() {
    let dir = tempfile::tempdir().unwrap();
    for fmt in ["nvfp4", "mxfp8"] {
        let path = dir.path().join(format!("{fmt}.safetensors"));
        with_orig_shapes(fmt, &path);
        let src = open_safetensors(&path).unwrap();
        let expected = expected(fmt);
        for (i, t) in src.tensors().iter().enumerate() {
            let (shape, values) = &expected[t.name.strip_suffix(".weight").unwrap()];
            assert_eq!(&t.shape, shape, "{}", t.name);
            let whole = read_whole(src.as_ref(), i);
            assert_eq!(bits(&whole), bits(values), "{fmt} {}", t.name);
            // Ranges that start and end inside rows and blocks, cross rows and (for the
            // 130-row weight) the 128-row tile of the scales.
            let n = whole.len();
            let cols = shape[1] as usize;
            let mut ranges = vec![(0, 1), (n - 1, 1), (1, n - 2), (cols - 1, 2), (3, 17)];
            ranges.extend([(cols, cols), (n / 2, n / 3), (127 * cols + 5, cols + 9)]);
            for (start, len) in ranges.into_iter().filter(|&(s, l)| s + l <= n && l > 0) {
                let mut part = vec![0f32; len];
                src.read_f32(i, start as u64, &mut part).unwrap();
                assert_eq!(
                    bits(&part),
                    bits(&whole[start..start + len]),
                    "{} {start}+{len}",
                    t.name
                );
                let mut raw = vec![0u8; len * 4];
                src.read_raw(i, start as u64 * 4, &mut raw).unwrap();
                assert_eq!(f32s(&raw), part);
            }
            let mut over = [0f32; 2];
            assert!(src.read_f32(i, n as u64 - 1, &mut over).is_err());
        }
    }
}

#[test]
fn a_file_mixing_formats_is_served_and_counted_per_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.safetensors");
    let mut tensors = Vec::new();
    for (fmt, layer) in [
        ("fp8_scaled", "w_bf16_64x128"),
        ("nvfp4", "w_f32_20x40"),
        ("mxfp8", "w_bf16_130x96"),
    ] {
        tensors.extend(
            read_all(&golden(&format!("{fmt}.safetensors")))
                .into_iter()
                .filter(|(name, ..)| name.starts_with(&format!("{layer}."))),
        );
    }
    tensors.push((
        "plain.bias".into(),
        Dtype::BF16,
        vec![2],
        vec![0x80, 0x3F, 0, 0x40],
    ));
    write(&path, &tensors);
    let layout = ScaledLayout::of_file(&SafetensorsFile::open(&path).unwrap())
        .unwrap()
        .unwrap();
    let formats: Vec<(&str, u64)> = layout
        .formats
        .iter()
        .map(|(f, n)| (f.as_str(), *n))
        .collect();
    assert_eq!(formats, [("float8_e4m3fn", 1), ("mxfp8", 1), ("nvfp4", 1)]);
    let src = open_safetensors(&path).unwrap();
    let names: Vec<&str> = src.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "w_bf16_64x128.weight",
            "w_f32_20x40.weight",
            "w_bf16_130x96.weight",
            "plain.bias"
        ]
    );
    let fp8 = expected("fp8_scaled");
    assert_eq!(
        bits(&read_whole(src.as_ref(), 0)),
        bits(&fp8["w_bf16_64x128"].1)
    );
    assert_eq!(src.tensors()[3].dtype, Dtype::BF16);
}

/// A small nvfp4 layer `a` ([16, 32] values): weight, blocked scales, per-tensor scale, marker.
fn nvfp4_layer() -> Vec<Tensor> {
    let (br, bc) = blockfp::blocked_shape(16, 2);
    vec![
        (
            "a.comfy_quant".into(),
            Dtype::U8,
            vec![19],
            br#"{"format": "nvfp4"}"#.to_vec(),
        ),
        ("a.weight".into(), Dtype::U8, vec![16, 16], vec![0x12; 256]),
        (
            "a.weight_scale".into(),
            Dtype::F8E4M3,
            vec![br as u64, bc as u64],
            vec![0x38; br * bc],
        ),
        (
            "a.weight_scale_2".into(),
            Dtype::F32,
            vec![],
            0.5f32.to_le_bytes().to_vec(),
        ),
    ]
}

fn refused(tensors: &[Tensor]) -> String {
    let dir = tempfile::tempdir().expect("test setup");
    let path = dir.path().join("m.safetensors");
    write(&path, tensors);
    match open_safetensors(&path) {
        Err(e @ SourceError::Invalid { .. }) => {
            assert!(e.is_input_fault());
            e.to_string()
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn replace(mut tensors: Vec<Tensor>, t: Tensor) -> Vec<Tensor> {
    let at = tensors
        .iter()
        .position(|x| x.0 == t.0)
        .expect("a tensor of the layer");
    tensors[at] = t;
    tensors
}

#[test]
fn a_well_formed_small_layer_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    write(&path, &nvfp4_layer());
    let src = open_safetensors(&path).unwrap();
    assert_eq!(src.tensors().len(), 1);
    assert_eq!(src.tensors()[0].shape, [16, 32]);
    // 0x12: codes 1 (0.5) and 2 (1.0), times 0.5 * e4m3(0x38 = 1.0).
    let v = read_whole(src.as_ref(), 0);
    assert!(v.chunks_exact(2).all(|p| p == [0.25, 0.5]), "{v:?}");
}

#[test]
fn broken_block_scaled_layers_are_refused_by_tensor() {
    let layer = nvfp4_layer;
    let e = refused(&replace(
        layer(),
        (
            "a.weight_scale".into(),
            Dtype::F8E4M3,
            vec![128, 2],
            vec![0x38; 256],
        ),
    ));
    assert!(
        e.contains("a.weight_scale") && e.contains("blocked layout"),
        "{e}"
    );
    let e = refused(&replace(
        layer(),
        (
            "a.weight_scale".into(),
            Dtype::F32,
            vec![128, 4],
            vec![0; 2048],
        ),
    ));
    assert!(e.contains("a.weight_scale") && e.contains("F32"), "{e}");
    let e = refused(&layer()[..3]);
    assert!(
        e.contains("a.weight") && e.contains("weight_scale_2"),
        "{e}"
    );
    let e = refused(&replace(
        layer(),
        (
            "a.weight_scale_2".into(),
            Dtype::BF16,
            vec![],
            vec![0, 0x3F],
        ),
    ));
    assert!(
        e.contains("a.weight_scale_2") && e.contains("one F32"),
        "{e}"
    );
    let e = refused(&replace(
        layer(),
        (
            "a.weight_scale_2".into(),
            Dtype::F32,
            vec![],
            f32::INFINITY.to_le_bytes().to_vec(),
        ),
    ));
    assert!(e.contains("a.weight_scale_2") && e.contains("inf"), "{e}");
    // A 1-D weight and one whose rows are not whole blocks.
    let e = refused(&replace(
        layer(),
        ("a.weight".into(), Dtype::U8, vec![256], vec![0; 256]),
    ));
    assert!(
        e.contains("a.weight") && e.contains("U8 [rows, cols/2]"),
        "{e}"
    );
    let e = refused(&replace(
        layer(),
        ("a.weight".into(), Dtype::U8, vec![64, 4], vec![0; 256]),
    ));
    assert!(
        e.contains("a.weight") && e.contains("not a multiple of 16"),
        "{e}"
    );
    // An orig_shape with more than a block of padding, or larger than the weight.
    for json in [
        r#"{"format": "nvfp4", "orig_shape": [16, 16]}"#,
        r#"{"format": "nvfp4", "orig_shape": [17, 32]}"#,
        r#"{"format": "nvfp4", "orig_shape": [0, 32]}"#,
    ] {
        let marker = (
            "a.comfy_quant".into(),
            Dtype::U8,
            vec![json.len() as u64],
            json.into(),
        );
        let e = refused(&replace(layer(), marker));
        assert!(e.contains("a.weight") && e.contains("orig_shape"), "{e}");
    }
    let json = r#"{"format": "nvfp4", "orig_shape": "16x32"}"#;
    let marker = (
        "a.comfy_quant".into(),
        Dtype::U8,
        vec![json.len() as u64],
        json.into(),
    );
    let e = refused(&replace(layer(), marker));
    assert!(e.contains("a.comfy_quant") && e.contains("not JSON"), "{e}");
    // fp8 has no padding: its orig_shape, if any, is the weight's shape.
    let json = br#"{"format": "float8_e4m3fn", "orig_shape": [2, 1]}"#.to_vec();
    let e = refused(&[
        (
            "c.comfy_quant".into(),
            Dtype::U8,
            vec![json.len() as u64],
            json,
        ),
        ("c.weight".into(), Dtype::F8E4M3, vec![2, 2], vec![0x38; 4]),
        (
            "c.weight_scale".into(),
            Dtype::F32,
            vec![],
            1f32.to_le_bytes().to_vec(),
        ),
    ]);
    assert!(e.contains("c.weight") && e.contains("orig_shape"), "{e}");
    // Activation pre-scaling cannot be folded into a plain weight.
    let mut with_pre = layer();
    with_pre.push((
        "a.pre_quant_scale".into(),
        Dtype::F32,
        vec![32],
        vec![0; 128],
    ));
    let e = refused(&with_pre);
    assert!(e.contains("a.pre_quant_scale"), "{e}");
    // mxfp8: E8M0 scales of the wrong shape; a weight_scale_2 on a layer that is not nvfp4.
    let json = br#"{"format": "mxfp8"}"#.to_vec();
    let mx = vec![
        (
            "b.comfy_quant".into(),
            Dtype::U8,
            vec![json.len() as u64],
            json,
        ),
        (
            "b.weight".into(),
            Dtype::F8E4M3,
            vec![32, 64],
            vec![0x38; 2048],
        ),
        (
            "b.weight_scale".into(),
            Dtype::U8,
            vec![128, 4],
            vec![127; 512],
        ),
    ];
    let e = refused(&replace(
        mx.clone(),
        (
            "b.weight_scale".into(),
            Dtype::U8,
            vec![32, 2],
            vec![127; 64],
        ),
    ));
    assert!(
        e.contains("b.weight_scale") && e.contains("[128, 4]"),
        "{e}"
    );
    let mut stray = mx.clone();
    stray.push(("b.weight_scale_2".into(), Dtype::F32, vec![], vec![0; 4]));
    let e = refused(&stray);
    assert!(
        e.contains("b.weight_scale_2") && e.contains("not nvfp4"),
        "{e}"
    );
    // The same layer, well formed, is served: 1.0 * 2^0.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mx.safetensors");
    write(&path, &mx);
    let src = open_safetensors(&path).unwrap();
    assert!(read_whole(src.as_ref(), 0).iter().all(|&v| v == 1.0));
}
