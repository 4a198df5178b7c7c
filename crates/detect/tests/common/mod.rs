//! Builders for valid test files (the hostile ones come from `detect::corpus`).
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use tensorfile::gguf::GgmlType;
use tensorfile::safetensors::Dtype;

/// A valid safetensors file: tensors laid out in the given order, data a fixed byte pattern,
/// the header padded with spaces to a multiple of 8 as the reference writer does.
pub fn safetensors(tensors: &[(&str, Dtype, &[u64])], metadata: &[(&str, &str)]) -> Vec<u8> {
    let (json, data_len) = safetensors_json(tensors, metadata);
    let mut json = json.into_bytes();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend((0..data_len).map(|i| (i % 253) as u8));
    out
}

/// The header JSON for `tensors` (offsets in the given order) and the data length.
pub fn safetensors_json(
    tensors: &[(&str, Dtype, &[u64])],
    metadata: &[(&str, &str)],
) -> (String, u64) {
    let mut obj = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        obj.insert("__metadata__".into(), m.into());
    }
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let n: u64 = shape.iter().product();
        let len = dtype.bytes_for(n).expect("whole bytes");
        obj.insert(
            name.to_string(),
            serde_json::json!({
                "dtype": dtype.as_str(),
                "shape": shape,
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    (serde_json::Value::Object(obj).to_string(), offset)
}

/// A GGUF metadata value for [`gguf_file`].
pub enum Kv<'a> {
    Str(&'a str),
    U32(u32),
    F32(f32),
    Bool(bool),
    StrArray(&'a [&'a str]),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A valid GGUF v3 file, built byte by byte (alignment 32, zero padding, data zeros).
/// `dims` are in ggml order (innermost first).
pub fn gguf_file(kvs: &[(&str, Kv)], tensors: &[(&str, GgmlType, &[u64])]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (key, value) in kvs {
        put_str(&mut out, key);
        match value {
            Kv::Str(s) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            Kv::U32(x) => {
                out.extend_from_slice(&4u32.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
            Kv::F32(x) => {
                out.extend_from_slice(&6u32.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
            Kv::Bool(b) => {
                out.extend_from_slice(&7u32.to_le_bytes());
                out.push(u8::from(*b));
            }
            Kv::StrArray(items) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&8u32.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for s in *items {
                    put_str(&mut out, s);
                }
            }
        }
    }
    let align = |x: u64| x.div_ceil(32) * 32;
    let mut offset = 0u64;
    let mut sizes = Vec::new();
    for (name, ty, dims) in tensors {
        put_str(&mut out, name);
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in *dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&ty.id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        let size = ty.bytes_for(dims.iter().product()).expect("whole blocks");
        sizes.push(size);
        offset = align(offset + size);
    }
    out.resize(align(out.len() as u64) as usize, 0);
    for size in sizes {
        let len = out.len() as u64;
        out.resize(align(len + size) as usize, 0);
    }
    out
}

/// A temporary directory with `name` written into it.
pub fn write_temp(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("write");
    (dir, path)
}

/// Whether `path` starts a one-line error message.
pub fn assert_one_line_naming(message: &str, path: &Path) {
    assert!(
        message.starts_with(&format!("{}: ", path.display())),
        "message does not start with the path: {message}"
    );
    assert!(!message.contains('\n'), "multi-line message: {message:?}");
}
