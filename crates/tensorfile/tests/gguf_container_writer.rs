//! The streaming writer's layout details and refusals.

use std::io::ErrorKind;
use std::path::Path;

use tensorfile::gguf::reader::GgufFile;
use tensorfile::gguf::writer::{
    DEFAULT_ALIGNMENT, GgufWriter, TensorDesc, dims_from_torch_shape, encode_header, output_len,
};
use tensorfile::gguf::{GgmlType, MetadataValue};

fn desc(name: &str, dims: &[u64], t: GgmlType) -> TensorDesc {
    TensorDesc {
        name: name.into(),
        dims: dims.to_vec(),
        ggml_type: t,
    }
}

fn refuses(
    metadata: Vec<(String, MetadataValue)>,
    tensors: &[TensorDesc],
    alignment: u64,
) -> String {
    let e = GgufWriter::new(Vec::new(), metadata.clone(), tensors, alignment)
        .expect_err("must be refused");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(output_len(&metadata, tensors, alignment).is_err());
    e.to_string()
}

#[test]
fn torch_shapes_are_reversed_and_keep_leading_ones() {
    assert_eq!(dims_from_torch_shape(&[1, 1, 3072]), vec![3072, 1, 1]);
    assert_eq!(dims_from_torch_shape(&[320, 4, 3, 3]), vec![3, 3, 4, 320]);
    assert_eq!(dims_from_torch_shape(&[]), Vec::<u64>::new());
    let t = TensorDesc::from_torch_shape("pos_embed", &[1, 16, 8], GgmlType::F32);
    assert_eq!(t.dims, vec![8, 16, 1]);
    assert_eq!(t.byte_len(), Some(512));
}

#[test]
fn layout_pads_after_infos_and_after_every_tensor() {
    let tensors = [
        desc("a", &[3], GgmlType::F16),
        desc("b", &[32, 2], GgmlType::Q8_0),
    ];
    let meta = vec![("general.architecture".to_string(), "flux".into())];
    let header = encode_header(&meta, &tensors, DEFAULT_ALIGNMENT).expect("header");
    assert_eq!(header.len() % 32, 0);
    let mut w = GgufWriter::new(Vec::new(), meta.clone(), &tensors, 32).expect("w");
    assert_eq!(w.current_tensor(), Some("a"));
    w.write_chunk(&[1; 6]).expect("a");
    assert_eq!(w.current_tensor(), Some("b"));
    assert_eq!(w.remaining_in_current(), 68);
    w.write_chunk(&[2; 68]).expect("b");
    assert_eq!(w.current_tensor(), None);
    let out = w.finish().expect("finish");
    let h = header.len();
    // a: 6 bytes + 26 zeros; b: 68 bytes + 28 zeros (the last tensor is padded too).
    assert_eq!(out.len(), h + 32 + 96);
    assert_eq!(&out[h..h + 6], &[1; 6]);
    assert!(out[h + 6..h + 32].iter().all(|&b| b == 0));
    assert!(out[h + 32 + 68..].iter().all(|&b| b == 0));
    assert_eq!(
        out.len() as u64,
        output_len(&meta, &tensors, 32).expect("len")
    );
    let f = GgufFile::from_bytes(out, Path::new("x")).expect("reads");
    assert_eq!(f.tensors[1].offset, 32);
    assert_eq!(f.metadata, meta);
}

#[test]
fn alignment_key_in_metadata_wins_and_custom_alignment_is_declared() {
    let tensors = [desc("a", &[3], GgmlType::F32)];
    let meta = vec![("general.alignment".to_string(), MetadataValue::U32(64))];
    let mut w = GgufWriter::new(Vec::new(), meta.clone(), &tensors, 32).expect("w");
    w.write_chunk(&[0; 12]).expect("a");
    let f = GgufFile::from_bytes(w.finish().expect("f"), Path::new("x")).expect("reads");
    assert_eq!((f.alignment, f.metadata.len()), (64, 1));

    let mut w = GgufWriter::new(Vec::new(), vec![], &tensors, 128).expect("w");
    w.write_chunk(&[0; 12]).expect("a");
    let f = GgufFile::from_bytes(w.finish().expect("f"), Path::new("x")).expect("reads");
    assert_eq!(f.alignment, 128);
    assert_eq!(f.get("general.alignment"), Some(&MetadataValue::U32(128)));
}

#[test]
fn refuses_bad_alignments() {
    refuses(vec![], &[], 0);
    refuses(vec![], &[], 48);
    refuses(vec![], &[], 1 << 32);
    refuses(
        vec![("general.alignment".into(), MetadataValue::U64(32))],
        &[],
        32,
    );
    refuses(
        vec![("general.alignment".into(), MetadataValue::U32(12))],
        &[],
        32,
    );
}

#[test]
fn refuses_what_the_reader_would_refuse() {
    let dup_key = vec![("k".to_string(), 1u8.into()), ("k".to_string(), 2u8.into())];
    assert!(refuses(dup_key, &[], 32).contains("duplicate metadata key `k`"));
    let mixed = vec![(
        "m".to_string(),
        MetadataValue::Array(vec![1u8.into(), 1u16.into()]),
    )];
    assert!(refuses(mixed, &[], 32).contains("mixes UINT8 and UINT16"));
    let mut deep = MetadataValue::U8(0);
    for _ in 0..17 {
        deep = MetadataValue::Array(vec![deep]);
    }
    assert!(refuses(vec![("d".into(), deep)], &[], 32).contains("nested deeper"));

    let dup = [
        desc("w", &[4], GgmlType::F32),
        desc("w", &[4], GgmlType::F32),
    ];
    assert!(refuses(vec![], &dup, 32).contains("duplicate tensor name `w`"));
    assert!(refuses(vec![], &[desc("w", &[1; 9], GgmlType::F32)], 32).contains("9 dims"));
    assert!(refuses(vec![], &[desc("w", &[4, 0], GgmlType::F32)], 32).contains("size 0"));
    assert!(
        refuses(vec![], &[desc("w", &[1 << 40, 1 << 40], GgmlType::F32)], 32).contains("overflows")
    );
    assert!(
        refuses(vec![], &[desc("w", &[100, 2], GgmlType::Q4K)], 32)
            .contains("row length 100 is not a multiple of the Q4_K block size 256")
    );
}

#[test]
fn refuses_chunks_that_cross_a_tensor_and_missing_bytes() {
    let tensors = [
        desc("a", &[2], GgmlType::F32),
        desc("b", &[2], GgmlType::F32),
    ];
    let mut w = GgufWriter::new(Vec::new(), vec![], &tensors, 32).expect("w");
    let e = w.write_chunk(&[0; 12]).expect_err("crosses into b");
    assert!(e.to_string().contains("tensor `a`"));
    w.write_chunk(&[0; 8]).expect("a");
    w.write_chunk(&[0; 4]).expect("half of b");
    let e = w.finish().expect_err("b is short");
    assert!(e.to_string().contains("tensor `b`: 4 of 8 bytes written"));

    let mut w = GgufWriter::new(Vec::new(), vec![], &tensors[..1], 32).expect("w");
    w.write_chunk(&[0; 8]).expect("a");
    assert!(w.write_chunk(&[0]).is_err());
    w.finish().expect("complete");
}
