//! The container against gguf-py (pip `gguf` 0.19), through committed goldens.
//!
//! `tests/golden/gguf_container/make_golden.py` wrote `basic.gguf` and `align64.gguf` with gguf-py's
//! `GGUFWriter` and a JSON sidecar of their content. Here we (a) read each golden and check it
//! equals the sidecar, and (b) write the same content with `GgufWriter` and require the bytes to
//! be identical to gguf-py's file.
//!
//! The other direction (gguf-py reading our output) was checked with
//! `tests/golden/gguf_container/check_with_gguf_py.py` on the file that
//! `writer_sample_round_trips_and_can_be_dumped` writes when `GGUF_PY_CHECK_DIR` is set:
//!
//! ```text
//! GGUF_PY_CHECK_DIR=/tmp/gguf-check cargo test -p tensorfile --test gguf_container_golden
//! /work/pyref/bin/python crates/gguf/tests/golden/gguf_container/check_with_gguf_py.py /tmp/gguf-check
//! ```
//!
//! Last run: "OK: 27 metadata keys and 15 tensors match (gguf-py 0.19.0)".

use std::path::{Path, PathBuf};

use serde_json::Value;
use tensorfile::gguf::reader::GgufFile;
use tensorfile::gguf::writer::{GgufWriter, TensorDesc, dims_from_torch_shape, output_len};
use tensorfile::gguf::{GgmlType, MetadataValue};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/gguf_container")
}

fn from_hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("sidecar hex"))
        .collect()
}

/// Builds a MetadataValue from the sidecar's typed tree.
fn typed_value(v: &Value) -> MetadataValue {
    let val = &v["value"];
    let int = || {
        val.as_i64()
            .map(i128::from)
            .or(val.as_u64().map(i128::from))
            .expect("int")
    };
    match v["type"].as_str().expect("type") {
        "UINT8" => MetadataValue::U8(int().try_into().expect("u8")),
        "INT8" => MetadataValue::I8(int().try_into().expect("i8")),
        "UINT16" => MetadataValue::U16(int().try_into().expect("u16")),
        "INT16" => MetadataValue::I16(int().try_into().expect("i16")),
        "UINT32" => MetadataValue::U32(int().try_into().expect("u32")),
        "INT32" => MetadataValue::I32(int().try_into().expect("i32")),
        "UINT64" => MetadataValue::U64(int().try_into().expect("u64")),
        "INT64" => MetadataValue::I64(int().try_into().expect("i64")),
        // gguf-py packs a Python float with struct "f": round to nearest, as `as f32` does.
        "FLOAT32" => MetadataValue::F32(val.as_f64().expect("f32") as f32),
        "FLOAT64" => MetadataValue::F64(val.as_f64().expect("f64")),
        "BOOL" => MetadataValue::Bool(val.as_bool().expect("bool")),
        "STRING" => MetadataValue::String(val.as_str().expect("string").to_owned()),
        "ARRAY" => MetadataValue::Array(
            val.as_array()
                .expect("array")
                .iter()
                .map(typed_value)
                .collect(),
        ),
        t => panic!("unknown sidecar type {t}"),
    }
}

struct Golden {
    bytes: Vec<u8>,
    sidecar: Value,
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<(TensorDesc, u64, Vec<u8>)>,
}

fn load(name: &str) -> Golden {
    let dir = golden_dir();
    let bytes = std::fs::read(dir.join(format!("{name}.gguf"))).expect("golden gguf");
    let sidecar: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).expect("json"))
            .expect("sidecar json");
    let metadata = sidecar["metadata"]
        .as_array()
        .expect("metadata")
        .iter()
        .map(|e| (e["key"].as_str().expect("key").to_owned(), typed_value(e)))
        .collect();
    let tensors = sidecar["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .map(|t| {
            let desc = TensorDesc {
                name: t["name"].as_str().expect("name").to_owned(),
                dims: t["dims"]
                    .as_array()
                    .expect("dims")
                    .iter()
                    .map(|d| d.as_u64().expect("dim"))
                    .collect(),
                ggml_type: t["ggml_type"]
                    .as_str()
                    .expect("type")
                    .parse()
                    .expect("ggml type"),
            };
            let offset = t["offset"].as_u64().expect("offset");
            (desc, offset, from_hex(t["data_hex"].as_str().expect("hex")))
        })
        .collect();
    Golden {
        bytes,
        sidecar,
        metadata,
        tensors,
    }
}

fn check_reads_as_sidecar(name: &str) {
    let g = load(name);
    let path = golden_dir().join(format!("{name}.gguf"));
    let file = GgufFile::open(&path).expect("gguf-py's file opens");
    assert_eq!(file.version, 3);
    assert_eq!(
        file.file_len(),
        g.sidecar["file_len"].as_u64().expect("len")
    );
    assert_eq!(file.alignment, g.sidecar["alignment"].as_u64().expect("al"));
    assert_eq!(
        file.data_offset,
        g.sidecar["data_offset"].as_u64().expect("data offset")
    );
    assert_eq!(file.metadata, g.metadata, "{name}: metadata");
    assert_eq!(file.tensors.len(), g.tensors.len());
    for (info, (desc, offset, data)) in file.tensors.iter().zip(&g.tensors) {
        assert_eq!(info.name, desc.name);
        assert_eq!(info.dims, desc.dims, "{}", desc.name);
        assert_eq!(info.ggml_type, desc.ggml_type, "{}", desc.name);
        assert_eq!(info.offset, *offset, "{}", desc.name);
        assert_eq!(file.tensor_data(info), &data[..], "{}", desc.name);
    }
}

fn check_writes_identical_bytes(name: &str) {
    let g = load(name);
    let descs: Vec<TensorDesc> = g.tensors.iter().map(|(d, _, _)| d.clone()).collect();
    let expected_len = output_len(&g.metadata, &descs, 32).expect("plan");
    let mut w = GgufWriter::new(Vec::new(), g.metadata.clone(), &descs, 32).expect("header");
    for (_, _, data) in &g.tensors {
        // Two chunks per tensor, to exercise chunked writing.
        let (a, b) = data.split_at(data.len() / 2);
        w.write_chunk(a).expect("chunk");
        w.write_chunk(b).expect("chunk");
    }
    let out = w.finish().expect("finish");
    assert_eq!(out.len() as u64, expected_len);
    assert_eq!(out.len(), g.bytes.len(), "{name}: length");
    if let Some(i) = out.iter().zip(&g.bytes).position(|(a, b)| a != b) {
        panic!("{name}: first differing byte at {i}");
    }
}

#[test]
fn reads_gguf_py_basic_golden() {
    check_reads_as_sidecar("basic");
}

#[test]
fn reads_gguf_py_align64_golden() {
    check_reads_as_sidecar("align64");
    let g = load("align64");
    assert_eq!(g.sidecar["alignment"], 64);
}

#[test]
fn writes_bytes_identical_to_gguf_py_basic() {
    check_writes_identical_bytes("basic");
}

#[test]
fn writes_bytes_identical_to_gguf_py_align64() {
    check_writes_identical_bytes("align64");
}

/// A file exercising what the goldens cannot (gguf-py's writer has no empty arrays, and the
/// goldens keep to a few types): every GgmlType, a 5-D tensor, n_dims 0, every metadata type,
/// nested arrays, an empty array. It must read back equal here; with `GGUF_PY_CHECK_DIR` set it
/// is also dumped, with a JSON description, for `check_with_gguf_py.py`.
#[test]
fn writer_sample_round_trips_and_can_be_dumped() {
    let mut metadata: Vec<(String, MetadataValue)> = vec![
        ("general.architecture".into(), "wan".into()),
        ("s.u8".into(), MetadataValue::U8(7)),
        ("s.i8".into(), MetadataValue::I8(-7)),
        ("s.u16".into(), MetadataValue::U16(65535)),
        ("s.i16".into(), MetadataValue::I16(-1)),
        ("s.u32".into(), MetadataValue::U32(15)),
        ("s.i32".into(), MetadataValue::I32(i32::MIN)),
        ("s.f32".into(), MetadataValue::F32(-0.0)),
        ("s.bool".into(), MetadataValue::Bool(false)),
        ("s.string".into(), "".into()),
        ("s.u64".into(), MetadataValue::U64(u64::MAX)),
        ("s.i64".into(), MetadataValue::I64(i64::MIN)),
        ("s.f64".into(), MetadataValue::F64(f64::MAX)),
    ];
    let arrays: Vec<(&str, Vec<MetadataValue>)> = vec![
        ("a.u8", vec![0u8.into(), 255u8.into()]),
        ("a.i8", vec![(-1i8).into()]),
        ("a.u16", vec![1u16.into(), 2u16.into()]),
        ("a.i16", vec![(-2i16).into()]),
        ("a.u32", vec![3u32.into()]),
        ("a.i32", vec![(-4i32).into(), 5i32.into()]),
        ("a.f32", vec![0.25f32.into()]),
        ("a.bool", vec![true.into(), false.into()]),
        ("a.string", vec!["x".into(), "".into()]),
        ("a.u64", vec![6u64.into()]),
        ("a.i64", vec![(-6i64).into()]),
        ("a.f64", vec![1e-300f64.into()]),
        (
            "a.nested",
            vec![
                MetadataValue::Array(vec![1u64.into()]),
                MetadataValue::Array(vec!["y".into()]),
                MetadataValue::Array(vec![MetadataValue::Array(vec![2i8.into()])]),
            ],
        ),
        ("a.empty", vec![]),
    ];
    for (k, v) in arrays {
        metadata.push((k.into(), MetadataValue::Array(v)));
    }
    let mut tensors: Vec<TensorDesc> = GgmlType::ALL
        .iter()
        .map(|&t| TensorDesc {
            name: format!("t.{}", t.name()),
            dims: vec![t.block_size() as u64 * 2, 3],
            ggml_type: t,
        })
        .collect();
    tensors.push(TensorDesc {
        name: "patch_embedding.weight".into(),
        dims: dims_from_torch_shape(&[4, 2, 1, 2, 2]),
        ggml_type: GgmlType::F32,
    });
    tensors.push(TensorDesc {
        name: "scalar".into(),
        dims: vec![],
        ggml_type: GgmlType::F32,
    });
    let datas: Vec<Vec<u8>> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let n = t.byte_len().expect("valid shape") as usize;
            (0..n).map(|j| (j * 31 + i * 7) as u8).collect()
        })
        .collect();
    let mut w = GgufWriter::new(Vec::new(), metadata.clone(), &tensors, 32).expect("header");
    for d in &datas {
        w.write_chunk(d).expect("data");
    }
    let bytes = w.finish().expect("finish");
    let file = GgufFile::from_bytes(bytes.clone(), Path::new("sample.gguf")).expect("reads");
    // MetadataValue's PartialEq treats -0.0 == 0.0, so compare encodings too (below).
    assert_eq!(file.metadata, metadata);
    for ((info, desc), data) in file.tensors.iter().zip(&tensors).zip(&datas) {
        assert_eq!(info.name, desc.name);
        assert_eq!(info.dims, desc.dims);
        assert_eq!(info.ggml_type, desc.ggml_type);
        assert_eq!(file.tensor_data(info), &data[..]);
    }
    assert_eq!(
        file.tensor("patch_embedding.weight")
            .map(|t| t.torch_shape()),
        Some(vec![4, 2, 1, 2, 2])
    );

    if let Some(dir) = std::env::var_os("GGUF_PY_CHECK_DIR") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("sample.gguf"), &bytes).expect("write");
        let desc = serde_json::json!({
            "metadata": metadata.iter().map(|(k, v)| serde_json::json!({"key": k, "value": to_json(v)})).collect::<Vec<_>>(),
            "tensors": tensors.iter().zip(&datas).map(|(t, d)| serde_json::json!({
                "name": t.name, "ggml_type": t.ggml_type.name(), "dims": t.dims,
                "data_hex": d.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            })).collect::<Vec<_>>(),
        });
        std::fs::write(
            dir.join("sample.json"),
            serde_json::to_vec_pretty(&desc).expect("json"),
        )
        .expect("write json");
    }
}

fn to_json(v: &MetadataValue) -> Value {
    let (t, val) = match v {
        MetadataValue::U8(x) => ("UINT8", Value::from(*x)),
        MetadataValue::I8(x) => ("INT8", Value::from(*x)),
        MetadataValue::U16(x) => ("UINT16", Value::from(*x)),
        MetadataValue::I16(x) => ("INT16", Value::from(*x)),
        MetadataValue::U32(x) => ("UINT32", Value::from(*x)),
        MetadataValue::I32(x) => ("INT32", Value::from(*x)),
        // Exact bits, so the checker compares -0.0 and extremes exactly.
        MetadataValue::F32(x) => ("FLOAT32", Value::from(x.to_bits())),
        MetadataValue::Bool(x) => ("BOOL", Value::from(*x)),
        MetadataValue::String(x) => ("STRING", Value::from(x.as_str())),
        MetadataValue::Array(xs) => (
            "ARRAY",
            Value::from(xs.iter().map(to_json).collect::<Vec<_>>()),
        ),
        MetadataValue::U64(x) => ("UINT64", Value::from(*x)),
        MetadataValue::I64(x) => ("INT64", Value::from(*x)),
        MetadataValue::F64(x) => ("FLOAT64", Value::from(x.to_bits())),
    };
    serde_json::json!({"type": t, "value": val})
}
