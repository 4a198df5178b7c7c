//! `tensorfile::blockfp` against the goldens comfy-kitchen 0.2.40 made
//! (`tests/golden/comfy_quant/`, see its README.md): every weight of `source.safetensors`
//! quantized to fp8_scaled, nvfp4 and mxfp8 gives the goldens' bytes, and the goldens' bytes
//! dequantize to comfy-kitchen's f32 values, bit for bit.

use std::path::{Path, PathBuf};

use tensorfile::blockfp::{
    MXFP8_GROUP, NVFP4_GROUP, abs_max, blocked_shape, dequantize_fp8, dequantize_mxfp8_rows,
    dequantize_nvfp4_rows, fp8_tensor_scale, from_blocked, mxfp8_padded_shape,
    mxfp8_zero_scale_blocks, nvfp4_padded_shape, nvfp4_tensor_scale, quantize_fp8,
    quantize_mxfp8_rows, quantize_nvfp4_rows, to_blocked,
};
use tensorfile::safetensors::Dtype;
use tensorfile::{SafetensorsFile, widen_to_f32};

fn golden_path(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/comfy_quant")
        .join(file)
}

struct Golden(SafetensorsFile);

impl Golden {
    fn open(file: &str) -> Golden {
        Golden(SafetensorsFile::open(&golden_path(file)).expect("golden file"))
    }

    fn names(&self) -> Vec<String> {
        self.0
            .header
            .tensors
            .iter()
            .map(|t| t.name.clone())
            .collect()
    }

    fn has(&self, name: &str) -> bool {
        self.0.header.tensor(name).is_some()
    }

    /// dtype, shape and bytes of tensor `name`.
    fn tensor(&self, name: &str) -> (Dtype, Vec<u64>, Vec<u8>) {
        let t = self
            .0
            .header
            .tensor(name)
            .unwrap_or_else(|| panic!("no tensor {name}"));
        let mut bytes = vec![0u8; t.byte_len() as usize];
        self.0
            .read_tensor_range(t, 0, &mut bytes)
            .expect("golden tensor read");
        (t.dtype, t.shape.clone(), bytes)
    }

    fn bytes(&self, name: &str) -> Vec<u8> {
        self.tensor(name).2
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        let (dtype, _, bytes) = self.tensor(name);
        let mut v = vec![0f32; bytes.len() / (dtype.bits() as usize / 8)];
        widen_to_f32(dtype, &bytes, &mut v).expect("golden floats");
        v
    }
}

/// Fails with how many bytes differ and where the first one is.
fn assert_same_bytes(ours: &[u8], theirs: &[u8], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let differ: Vec<usize> = (0..ours.len()).filter(|&i| ours[i] != theirs[i]).collect();
    assert!(
        differ.is_empty(),
        "{what}: {} bytes differ, first at {} (ours {:#04x}, golden {:#04x})",
        differ.len(),
        differ[0],
        ours[differ[0]],
        theirs[differ[0]]
    );
}

fn assert_same_f32(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: element {i}: {a} vs {b}");
    }
}

/// `values` ([rows, cols]) zero-padded to [padded_rows, padded_cols].
fn pad(values: &[f32], cols: usize, padded_rows: usize, padded_cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; padded_rows * padded_cols];
    for (r, row) in values.chunks_exact(cols).enumerate() {
        out[r * padded_cols..][..cols].copy_from_slice(row);
    }
    out
}

/// The top-left [rows, cols] of a row-major matrix with `padded_cols` columns.
fn cut(values: &[f32], padded_cols: usize, rows: usize, cols: usize) -> Vec<f32> {
    values
        .chunks_exact(padded_cols)
        .take(rows)
        .flat_map(|row| &row[..cols])
        .copied()
        .collect()
}

/// A source weight: name, dtype, rows, cols, values widened to f32.
struct Weight {
    name: String,
    dtype: Dtype,
    rows: usize,
    cols: usize,
    values: Vec<f32>,
}

fn source_weights() -> Vec<Weight> {
    let src = Golden::open("source.safetensors");
    let weights: Vec<Weight> = src
        .names()
        .into_iter()
        .map(|name| {
            let (dtype, shape, _) = src.tensor(&name);
            Weight {
                values: src.f32s(&name),
                dtype,
                rows: shape[0] as usize,
                cols: shape[1] as usize,
                name,
            }
        })
        .collect();
    assert_eq!(weights.len(), 13, "the goldens have 13 weights");
    weights
}

/// nvfp4 of whole rows, `rows_at_once` rows per call: rows are independent, so any split gives
/// the same bytes.
fn quantize_nvfp4(values: &[f32], cols: usize, s2: f32, rows_at_once: usize) -> (Vec<u8>, Vec<u8>) {
    let mut packed = vec![0u8; values.len() / 2];
    let mut grid = vec![0u8; values.len() / NVFP4_GROUP];
    let step = rows_at_once * cols;
    for ((v, p), g) in values
        .chunks(step)
        .zip(packed.chunks_mut(step / 2))
        .zip(grid.chunks_mut(step / NVFP4_GROUP))
    {
        quantize_nvfp4_rows(v, cols, s2, p, g);
    }
    (packed, grid)
}

fn quantize_mxfp8(values: &[f32], cols: usize, rows_at_once: usize) -> (Vec<u8>, Vec<u8>) {
    let mut codes = vec![0u8; values.len()];
    let mut grid = vec![0u8; values.len() / MXFP8_GROUP];
    let step = rows_at_once * cols;
    for ((v, c), g) in values
        .chunks(step)
        .zip(codes.chunks_mut(step))
        .zip(grid.chunks_mut(step / MXFP8_GROUP))
    {
        quantize_mxfp8_rows(v, cols, c, g);
    }
    (codes, grid)
}

#[test]
fn fp8_scaled_matches_the_goldens() {
    let golden = Golden::open("fp8_scaled.safetensors");
    for w in source_weights() {
        let name = &w.name;
        let scale = fp8_tensor_scale(abs_max(&w.values), w.dtype);
        assert_same_bytes(
            &scale.to_le_bytes(),
            &golden.bytes(&format!("{name}.weight_scale")),
            &format!("{name} weight_scale"),
        );
        let mut codes = vec![0u8; w.values.len()];
        quantize_fp8(&w.values, w.dtype, scale, &mut codes);
        let (dtype, shape, bytes) = golden.tensor(&format!("{name}.weight"));
        assert_eq!(
            (dtype, shape),
            (Dtype::F8E4M3, vec![w.rows as u64, w.cols as u64])
        );
        assert_same_bytes(&codes, &bytes, &format!("{name} fp8 weight"));
        assert_eq!(
            golden.bytes(&format!("{name}.comfy_quant")),
            br#"{"format": "float8_e4m3fn"}"#
        );
    }
}

#[test]
fn nvfp4_matches_the_goldens() {
    let golden = Golden::open("nvfp4.safetensors");
    let variants = Golden::open("variants.safetensors");
    for w in source_weights() {
        let name = &w.name;
        let s2 = nvfp4_tensor_scale(abs_max(&w.values));
        assert_same_bytes(
            &s2.to_le_bytes(),
            &golden.bytes(&format!("{name}.weight_scale_2")),
            &format!("{name} weight_scale_2"),
        );
        let (rows, cols) = nvfp4_padded_shape(w.rows, w.cols);
        let padded = pad(&w.values, w.cols, rows, cols);
        for rows_at_once in [rows, 1, 5] {
            let (packed, grid) = quantize_nvfp4(&padded, cols, s2, rows_at_once);
            let (dtype, shape, bytes) = golden.tensor(&format!("{name}.weight"));
            assert_eq!(
                (dtype, shape),
                (Dtype::U8, vec![rows as u64, cols as u64 / 2])
            );
            assert_same_bytes(&packed, &bytes, &format!("{name} nvfp4 weight"));
            let (dtype, shape, bytes) = golden.tensor(&format!("{name}.weight_scale"));
            let (br, bc) = blocked_shape(rows, cols / NVFP4_GROUP);
            assert_eq!((dtype, shape), (Dtype::F8E4M3, vec![br as u64, bc as u64]));
            let blocked = to_blocked(&grid, rows, cols / NVFP4_GROUP);
            assert_same_bytes(&blocked, &bytes, &format!("{name} nvfp4 weight_scale"));
        }
        // comfy-quants' layout: rows not padded (only columns must be whole blocks).
        let key = format!("{name}.nvfp4_rows_unpadded");
        if variants.has(&format!("{key}.weight")) {
            let (packed, grid) = quantize_nvfp4(&w.values, w.cols, s2, w.rows);
            assert_same_bytes(&packed, &variants.bytes(&format!("{key}.weight")), &key);
            let blocked = to_blocked(&grid, w.rows, w.cols / NVFP4_GROUP);
            assert_same_bytes(
                &blocked,
                &variants.bytes(&format!("{key}.weight_scale")),
                &key,
            );
        }
    }
}

#[test]
fn mxfp8_matches_the_goldens() {
    let golden = Golden::open("mxfp8.safetensors");
    let variants = Golden::open("variants.safetensors");
    let mut zero_scale_blocks = Vec::new();
    for w in source_weights() {
        let name = &w.name;
        let (rows, cols) = mxfp8_padded_shape(w.rows, w.cols);
        let padded = pad(&w.values, w.cols, rows, cols);
        for rows_at_once in [rows, 1, 3] {
            let (codes, grid) = quantize_mxfp8(&padded, cols, rows_at_once);
            let (dtype, shape, bytes) = golden.tensor(&format!("{name}.weight"));
            assert_eq!(
                (dtype, shape),
                (Dtype::F8E4M3, vec![rows as u64, cols as u64])
            );
            assert_same_bytes(&codes, &bytes, &format!("{name} mxfp8 weight"));
            let (dtype, shape, bytes) = golden.tensor(&format!("{name}.weight_scale"));
            let (br, bc) = blocked_shape(rows, cols / MXFP8_GROUP);
            assert_eq!((dtype, shape), (Dtype::U8, vec![br as u64, bc as u64]));
            let blocked = to_blocked(&grid, rows, cols / MXFP8_GROUP);
            assert_same_bytes(&blocked, &bytes, &format!("{name} mxfp8 weight_scale"));
            if rows_at_once == rows {
                zero_scale_blocks.push((name.clone(), mxfp8_zero_scale_blocks(&codes, &grid)));
            }
        }
        let key = format!("{name}.mxfp8_rows_unpadded");
        if variants.has(&format!("{key}.weight")) {
            let (codes, grid) = quantize_mxfp8(&w.values, w.cols, w.rows);
            assert_same_bytes(&codes, &variants.bytes(&format!("{key}.weight")), &key);
            let blocked = to_blocked(&grid, w.rows, w.cols / MXFP8_GROUP);
            assert_same_bytes(
                &blocked,
                &variants.bytes(&format!("{key}.weight_scale")),
                &key,
            );
        }
    }
    // The edge tensor's 1e-38 block is the only one too small for an E8M0 scale.
    let flagged: Vec<_> = zero_scale_blocks.iter().filter(|(_, n)| *n > 0).collect();
    assert_eq!(flagged, [&("w_f32_edge_32x64".to_owned(), 1)]);
}

#[test]
fn the_goldens_dequantize_to_comfy_kitchens_f32_values() {
    let fp8 = Golden::open("fp8_scaled.safetensors");
    let nvfp4 = Golden::open("nvfp4.safetensors");
    let mxfp8 = Golden::open("mxfp8.safetensors");
    let expected = [
        Golden::open("dequant_fp8_scaled.safetensors"),
        Golden::open("dequant_nvfp4.safetensors"),
        Golden::open("dequant_mxfp8.safetensors"),
    ];
    for w in source_weights() {
        let name = &w.name;
        let (rows, cols) = (w.rows, w.cols);

        let codes = fp8.bytes(&format!("{name}.weight"));
        let scale = fp8.f32s(&format!("{name}.weight_scale"))[0];
        let mut out = vec![0f32; codes.len()];
        dequantize_fp8(&codes, scale, &mut out);
        assert_same_f32(&out, &expected[0].f32s(name), &format!("{name} fp8"));

        let (_, shape, packed) = nvfp4.tensor(&format!("{name}.weight"));
        let (pr, pc) = (shape[0] as usize, shape[1] as usize * 2);
        let grid = from_blocked(&nvfp4.bytes(&format!("{name}.weight_scale")), pr, pc / 16);
        let s2 = nvfp4.f32s(&format!("{name}.weight_scale_2"))[0];
        let mut out = vec![0f32; pr * pc];
        dequantize_nvfp4_rows(&packed, &grid, pc, s2, &mut out);
        let out = cut(&out, pc, rows, cols);
        assert_same_f32(&out, &expected[1].f32s(name), &format!("{name} nvfp4"));

        let (_, shape, codes) = mxfp8.tensor(&format!("{name}.weight"));
        let (pr, pc) = (shape[0] as usize, shape[1] as usize);
        let grid = from_blocked(&mxfp8.bytes(&format!("{name}.weight_scale")), pr, pc / 32);
        let mut out = vec![0f32; pr * pc];
        dequantize_mxfp8_rows(&codes, &grid, pc, &mut out);
        let out = cut(&out, pc, rows, cols);
        assert_same_f32(&out, &expected[2].f32s(name), &format!("{name} mxfp8"));
    }
}
