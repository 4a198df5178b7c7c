//! Property tests: whatever `GgufWriter` writes, `GgufFile` reads back equal, and writing what
//! was read reproduces the same bytes.

use std::path::Path;

use proptest::prelude::*;
use tensorfile::gguf::reader::{GgufFile, MAX_DIMS};
use tensorfile::gguf::writer::{GgufWriter, TensorDesc, output_len};
use tensorfile::gguf::{GgmlType, MetadataValue};

/// Equality with floats compared by bits (NaN payloads and -0.0 must survive).
fn same(a: &MetadataValue, b: &MetadataValue) -> bool {
    match (a, b) {
        (MetadataValue::F32(x), MetadataValue::F32(y)) => x.to_bits() == y.to_bits(),
        (MetadataValue::F64(x), MetadataValue::F64(y)) => x.to_bits() == y.to_bits(),
        (MetadataValue::Array(x), MetadataValue::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        _ => a == b,
    }
}

/// A value of GGUF type `t` (not ARRAY).
fn scalar(t: u32) -> BoxedStrategy<MetadataValue> {
    match t {
        0 => any::<u8>().prop_map(MetadataValue::U8).boxed(),
        1 => any::<i8>().prop_map(MetadataValue::I8).boxed(),
        2 => any::<u16>().prop_map(MetadataValue::U16).boxed(),
        3 => any::<i16>().prop_map(MetadataValue::I16).boxed(),
        4 => any::<u32>().prop_map(MetadataValue::U32).boxed(),
        5 => any::<i32>().prop_map(MetadataValue::I32).boxed(),
        6 => any::<u32>()
            .prop_map(|b| MetadataValue::F32(f32::from_bits(b)))
            .boxed(),
        7 => any::<bool>().prop_map(MetadataValue::Bool).boxed(),
        8 => ".{0,12}".prop_map(MetadataValue::String).boxed(),
        10 => any::<u64>().prop_map(MetadataValue::U64).boxed(),
        11 => any::<i64>().prop_map(MetadataValue::I64).boxed(),
        _ => any::<u64>()
            .prop_map(|b| MetadataValue::F64(f64::from_bits(b)))
            .boxed(),
    }
}

/// A value of any of the 13 types; arrays are homogeneous, nested up to `depth` levels.
fn value(depth: u32) -> BoxedStrategy<MetadataValue> {
    let types: Vec<u32> = if depth == 0 {
        vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12]
    } else {
        (0..13).collect()
    };
    prop::sample::select(types)
        .prop_flat_map(move |t| {
            if t == 9 {
                // Element type first, so all elements share it (inner arrays may differ).
                prop::sample::select((0..13).collect::<Vec<u32>>())
                    .prop_flat_map(move |et| {
                        let elem = if et == 9 {
                            value(depth - 1)
                                .prop_map(|v| MetadataValue::Array(vec![v]))
                                .boxed()
                        } else {
                            scalar(et)
                        };
                        // Non-empty: an empty array does not keep its element type.
                        prop::collection::vec(elem, 1..5).prop_map(MetadataValue::Array)
                    })
                    .boxed()
            } else {
                scalar(t)
            }
        })
        .boxed()
}

fn metadata() -> impl Strategy<Value = Vec<(String, MetadataValue)>> {
    prop::collection::vec(value(3), 0..8).prop_map(|vals| {
        vals.into_iter()
            .enumerate()
            .map(|(i, v)| (format!("test.key{i}"), v))
            .collect()
    })
}

/// A tensor of any GgmlType with a valid shape (rows of whole blocks, up to MAX_DIMS dims).
fn tensor(i: usize) -> impl Strategy<Value = TensorDesc> {
    (
        prop::sample::select(GgmlType::ALL.to_vec()),
        1u64..4,
        prop::collection::vec(1u64..4, 0..MAX_DIMS),
    )
        .prop_map(move |(t, blocks, rest)| {
            let mut dims = vec![blocks * t.block_size() as u64];
            dims.extend(rest);
            TensorDesc {
                name: format!("blk.{i}.weight"),
                dims,
                ggml_type: t,
            }
        })
}

fn tensors() -> impl Strategy<Value = Vec<TensorDesc>> {
    (0usize..6).prop_flat_map(|n| (0..n).map(tensor).collect::<Vec<_>>())
}

fn fill(desc: &TensorDesc, seed: u64) -> Vec<u8> {
    let n = desc.byte_len().expect("valid shape") as usize;
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write(
    metadata: &[(String, MetadataValue)],
    tensors: &[TensorDesc],
    datas: &[Vec<u8>],
    alignment: u64,
    chunk: usize,
) -> Vec<u8> {
    let mut w = GgufWriter::new(Vec::new(), metadata.to_vec(), tensors, alignment).expect("header");
    for d in datas {
        for c in d.chunks(chunk) {
            w.write_chunk(c).expect("chunk");
        }
    }
    w.finish().expect("finish")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn write_read_write_round_trips(
        metadata in metadata(),
        tensors in tensors(),
        alignment in prop::sample::select(vec![1u64, 8, 32, 64, 256]),
        chunk in 1usize..300,
        seed in any::<u64>(),
    ) {
        let datas: Vec<Vec<u8>> =
            tensors.iter().enumerate().map(|(i, t)| fill(t, seed ^ i as u64)).collect();
        let bytes = write(&metadata, &tensors, &datas, alignment, chunk);
        prop_assert_eq!(bytes.len() as u64, output_len(&metadata, &tensors, alignment).expect("len"));

        let file = GgufFile::from_bytes(bytes.clone(), Path::new("rt.gguf")).expect("reads back");
        prop_assert_eq!(file.version, 3);
        prop_assert_eq!(file.alignment, alignment);
        prop_assert_eq!(file.data_offset % alignment, 0);
        // A non-default alignment is declared by one appended key.
        let extra = usize::from(alignment != 32);
        prop_assert_eq!(file.metadata.len(), metadata.len() + extra);
        for ((k, v), (k2, v2)) in metadata.iter().zip(&file.metadata) {
            prop_assert_eq!(k, k2);
            prop_assert!(same(v, v2), "{k}: {v:?} != {v2:?}");
        }
        if extra == 1 {
            prop_assert_eq!(
                file.get("general.alignment"),
                Some(&MetadataValue::U32(alignment as u32))
            );
        }
        prop_assert_eq!(file.tensors.len(), tensors.len());
        let mut expected_offset = 0u64;
        for ((info, desc), data) in file.tensors.iter().zip(&tensors).zip(&datas) {
            prop_assert_eq!(&info.name, &desc.name);
            prop_assert_eq!(&info.dims, &desc.dims);
            prop_assert_eq!(info.ggml_type, desc.ggml_type);
            // ggml's rule: each offset is the running sum of padded sizes.
            prop_assert_eq!(info.offset, expected_offset);
            expected_offset += info.byte_len().next_multiple_of(alignment);
            prop_assert_eq!(file.tensor_data(info), &data[..]);
        }
        // The data section ends padded, the last tensor included.
        prop_assert_eq!(file.file_len(), file.data_offset + expected_offset);

        // Writing what was read reproduces the bytes.
        let descs: Vec<TensorDesc> = file.tensors.iter().map(|t| TensorDesc {
            name: t.name.clone(), dims: t.dims.clone(), ggml_type: t.ggml_type,
        }).collect();
        let again = write(&file.metadata, &descs, &datas, 32, 1 << 20);
        prop_assert!(again == bytes, "rewrite differs");
    }

    /// No input makes the reader panic; most random mutations of a valid file are refused
    /// with a typed error, the rest parse.
    #[test]
    fn mutated_files_never_panic(
        metadata in metadata(),
        tensors in tensors(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let datas: Vec<Vec<u8>> = tensors.iter().map(|t| fill(t, 7)).collect();
        let mut bytes = write(&metadata, &tensors, &datas, 32, 4096);
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        let _ = GgufFile::parse_header(&bytes, Path::new("m.gguf"));
        let n = cut.index(bytes.len());
        if let Ok(f) = GgufFile::parse_header(&bytes[..n], Path::new("m.gguf")) {
            for t in &f.tensors {
                prop_assert_eq!(f.tensor_data(t).len() as u64, t.byte_len());
            }
        }
    }
}

#[test]
fn empty_arrays_round_trip_as_uint8_arrays() {
    let metadata = vec![
        ("e".to_string(), MetadataValue::Array(vec![])),
        (
            "n".to_string(),
            MetadataValue::Array(vec![MetadataValue::Array(vec![])]),
        ),
    ];
    let bytes = write(&metadata, &[], &[], 32, 1);
    let file = GgufFile::from_bytes(bytes.clone(), Path::new("e.gguf")).expect("reads");
    assert_eq!(file.metadata, metadata);
    // Element type UINT8 (0), count 0, right after the key "e" and the ARRAY type id.
    let at = 24 + 8 + 1 + 4;
    assert_eq!(&bytes[at..at + 12], &[0u8; 12]);
}
