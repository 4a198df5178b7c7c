//! The reader refuses every kind of malformed GGUF with its specific error kind, without
//! panicking or allocating what the file cannot back. Each file is built byte by byte here.

use std::path::Path;

use tensorfile::gguf::reader::{
    GgufErrorKind as K, GgufFile, MAX_ARRAY_DEPTH, MAX_METADATA_VALUES, MAX_STRING_BYTES,
    MAX_TENSORS,
};
use tensorfile::gguf::{GgmlType, GgufError};

/// Little-endian GGUF byte builder.
#[derive(Default, Clone)]
struct B(Vec<u8>);

impl B {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> B {
        let mut b = B::default();
        b.0.extend_from_slice(b"GGUF");
        b.u32(version).u64(n_tensors).u64(n_kv);
        b
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    /// A KV holding a UINT32.
    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.str(key).u32(4).u32(v)
    }
    /// A tensor info.
    fn info(&mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(type_id).u64(offset)
    }
    /// Zero padding to `align`, then `n` data bytes.
    fn data(&mut self, align: usize, n: usize) -> &mut Self {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
        self.0.resize(self.0.len() + n, 0xAB);
        self
    }
    fn parse(&self) -> Result<GgufFile, GgufError> {
        GgufFile::parse_header(&self.0, Path::new("bad.gguf"))
    }
    fn kind(&self) -> K {
        match self.parse() {
            Ok(_) => panic!("accepted a bad file"),
            Err(e) => e.kind().expect("an Invalid error").clone(),
        }
    }
}

/// One F32 tensor `w` of 8 elements with its data: the valid base most cases mutate.
fn valid() -> B {
    let mut b = B::header(3, 1, 1);
    b.kv_u32("general.file_type", 0)
        .info("w", &[8], 0, 0)
        .data(32, 32);
    b
}

#[test]
fn the_valid_base_is_accepted() {
    let f = valid().parse().expect("valid");
    assert_eq!(f.tensors[0].n_elements(), 8);
    assert_eq!(f.tensor_data(&f.tensors[0]), &[0xAB; 32][..]);
    assert_eq!(f.get("general.file_type").and_then(|v| v.as_u32()), Some(0));
    let mut v2 = valid();
    v2.0[4] = 2;
    assert_eq!(v2.parse().expect("v2").version, 2);
}

#[test]
fn bad_magic() {
    let mut b = valid();
    b.0[..4].copy_from_slice(b"GGML");
    assert_eq!(b.kind(), K::BadMagic(*b"GGML"));
}

#[test]
fn unsupported_versions() {
    for v in [0, 1, 4, 0x0300_0000] {
        let mut b = valid();
        b.0[4..8].copy_from_slice(&u32::to_le_bytes(v));
        assert_eq!(b.kind(), K::UnsupportedVersion(v));
    }
}

#[test]
fn empty_and_tiny_files_are_truncated() {
    assert!(matches!(
        B::default().kind(),
        K::Truncated { what: "magic", .. }
    ));
    assert!(matches!(
        B(b"GGUF\x03\0".to_vec()).kind(),
        K::Truncated {
            what: "version",
            ..
        }
    ));
}

#[test]
fn every_prefix_of_a_valid_file_is_refused_without_panic() {
    let full = valid();
    for n in 0..full.0.len() {
        let b = B(full.0[..n].to_vec());
        let kind = b.kind();
        assert!(
            matches!(
                kind,
                K::Truncated { .. }
                    | K::CountTooLarge { .. }
                    | K::LengthTooLarge { .. }
                    | K::OutOfBounds { .. }
            ),
            "prefix {n}: {kind:?}"
        );
    }
}

#[test]
fn truncated_in_tensor_info() {
    let mut b = B::header(3, 1, 0);
    b.str("w").u32(2).u64(8);
    // The count check passes (24 bytes remain), then the second dim is missing.
    b.raw(&[0; 7]);
    assert!(matches!(
        b.kind(),
        K::Truncated {
            what: "tensor dims",
            ..
        }
    ));
}

#[test]
fn tensor_data_past_the_end_is_out_of_bounds() {
    let mut b = valid();
    b.0.truncate(b.0.len() - 1);
    assert!(matches!(b.kind(), K::OutOfBounds { ref tensor, end: Some(_), .. } if tensor == "w"));
}

#[test]
fn hostile_counts() {
    let mut b = B::header(3, u64::MAX, 0);
    b.raw(&[0; 64]);
    assert!(matches!(
        b.kind(),
        K::CountTooLarge {
            what: "tensor",
            count: u64::MAX,
            ..
        }
    ));
    let mut b = B::header(3, 0, 1 << 60);
    b.raw(&[0; 64]);
    assert!(matches!(
        b.kind(),
        K::CountTooLarge {
            what: "metadata",
            ..
        }
    ));
    // Counts that would each fit, but not together.
    let mut b = B::header(3, 2, 2);
    b.raw(&[0; 60]);
    assert!(matches!(b.kind(), K::CountTooLarge { what: "tensor", .. }));
}

#[test]
fn hostile_string_lengths() {
    let mut b = B::header(3, 0, 1);
    b.u64(u64::MAX).raw(&[0; 16]);
    assert!(matches!(
        b.kind(),
        K::LengthTooLarge {
            what: "metadata key",
            len: u64::MAX,
            ..
        }
    ));
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(8).u64(1 << 40).raw(b"abc");
    assert!(matches!(
        b.kind(),
        K::LengthTooLarge {
            what: "metadata string",
            ..
        }
    ));
    let mut b = B::header(3, 1, 0);
    b.u64(1 << 50).raw(&[0; 30]);
    assert!(matches!(
        b.kind(),
        K::LengthTooLarge {
            what: "tensor name",
            ..
        }
    ));
}

#[test]
fn hostile_array_lengths() {
    // 2^61 UINT64 elements: the byte count overflows.
    let mut b = B::header(3, 0, 1);
    b.str("a").u32(9).u32(10).u64(1 << 61).raw(&[0; 16]);
    assert!(matches!(
        b.kind(),
        K::LengthTooLarge {
            what: "metadata array",
            ..
        }
    ));
    // 5 strings need at least 40 bytes; 20 remain.
    let mut b = B::header(3, 0, 1);
    b.str("a").u32(9).u32(8).u64(5).raw(&[0; 20]);
    assert!(matches!(
        b.kind(),
        K::LengthTooLarge {
            what: "metadata array",
            len: 5,
            ..
        }
    ));
}

#[test]
fn too_many_metadata_values() {
    let n = MAX_METADATA_VALUES + 1;
    let mut b = B::header(3, 0, 1);
    b.str("big").u32(9).u32(0).u64(n);
    b.0.resize(b.0.len() + n as usize, 1);
    assert_eq!(b.kind(), K::TooManyValues);
}

#[test]
fn unknown_value_types() {
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(13).u32(0);
    assert!(matches!(b.kind(), K::UnknownValueType { type_id: 13, .. }));
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(9).u32(99).u64(1).u32(0);
    assert!(matches!(b.kind(), K::UnknownValueType { type_id: 99, .. }));
}

#[test]
fn nesting_too_deep() {
    let nest = |depth: usize| {
        let mut b = B::header(3, 0, 1);
        b.str("deep").u32(9);
        for _ in 1..depth {
            b.u32(9).u64(1);
        }
        b.u32(0).u64(1).u8(7);
        b
    };
    let ok = nest(MAX_ARRAY_DEPTH)
        .parse()
        .expect("max depth is accepted");
    assert!(ok.get("deep").and_then(|v| v.as_array()).is_some());
    assert!(
        matches!(nest(MAX_ARRAY_DEPTH + 1).kind(), K::NestingTooDeep { ref key } if key == "deep")
    );
    // Deep enough to overflow the stack if depth were not limited.
    assert!(matches!(nest(200_000).kind(), K::NestingTooDeep { .. }));
}

#[test]
fn invalid_utf8() {
    let mut b = B::header(3, 0, 1);
    b.u64(2).raw(&[0xff, 0xfe]).u32(0).u8(1);
    assert!(matches!(
        b.kind(),
        K::InvalidUtf8 {
            what: "metadata key",
            offset: 24
        }
    ));
}

#[test]
fn duplicate_key() {
    let mut b = B::header(3, 0, 2);
    b.kv_u32("a", 1).kv_u32("a", 2);
    assert_eq!(b.kind(), K::DuplicateKey("a".into()));
}

#[test]
fn bad_alignment() {
    let mut b = B::header(3, 0, 1);
    b.str("general.alignment").u32(10).u64(32);
    assert_eq!(b.kind(), K::BadAlignmentType("UINT64"));
    for a in [0u32, 48, 3] {
        let mut b = B::header(3, 0, 1);
        b.kv_u32("general.alignment", a);
        assert_eq!(b.kind(), K::BadAlignment(a));
    }
    // A valid custom alignment moves the data section.
    let mut b = B::header(3, 1, 1);
    b.kv_u32("general.alignment", 128)
        .info("w", &[4], 0, 0)
        .data(128, 16);
    let f = b.parse().expect("alignment 128");
    assert_eq!((f.alignment, f.data_offset), (128, 128));
}

#[test]
fn unknown_tensor_types() {
    // 4 and 5 were removed from ggml; 20 is IQ4_NL, 24 is I8: real, but not in GgmlType.
    for id in [4u32, 5, 20, 24, 1000] {
        let mut b = B::header(3, 1, 0);
        b.info("w", &[32], id, 0).data(32, 64);
        assert_eq!(
            b.kind(),
            K::UnknownTensorType {
                tensor: "w".into(),
                type_id: id
            }
        );
    }
}

#[test]
fn too_many_dims() {
    let mut b = B::header(3, 1, 0);
    b.info("w", &[1; 9], 0, 0).data(32, 4);
    assert_eq!(
        b.kind(),
        K::TooManyDims {
            tensor: "w".into(),
            n_dims: 9
        }
    );
    // n_dims is checked before any dim is read.
    let mut b = B::header(3, 1, 0);
    b.str("w").u32(u32::MAX).raw(&[0; 40]);
    assert!(matches!(
        b.kind(),
        K::TooManyDims {
            n_dims: u32::MAX,
            ..
        }
    ));
}

#[test]
fn five_dims_and_zero_dims_are_accepted() {
    let mut b = B::header(3, 2, 0);
    b.info("conv3d", &[2, 2, 1, 3, 4], 0, 0)
        .info("scalar", &[], 0, 224)
        .data(32, 256);
    let f = b.parse().expect("5-D and 0-D tensors");
    assert_eq!(f.tensors[0].torch_shape(), vec![4, 3, 1, 2, 2]);
    assert_eq!(f.tensors[0].byte_len(), 192);
    assert_eq!(f.tensors[1].n_elements(), 1);
}

#[test]
fn zero_elements() {
    let mut b = B::header(3, 1, 0);
    b.info("w", &[4, 0], 0, 0).data(32, 32);
    assert_eq!(b.kind(), K::ZeroElements { tensor: "w".into() });
}

#[test]
fn element_count_overflow() {
    for dims in [
        &[1u64 << 32, 1 << 32][..],
        &[u64::MAX, 2],
        &[1 << 63],
        &[1 << 62, 1],
    ] {
        let mut b = B::header(3, 1, 0);
        b.info("w", dims, 0, 0).data(32, 32);
        assert_eq!(
            b.kind(),
            K::ElementCountOverflow { tensor: "w".into() },
            "{dims:?}"
        );
    }
}

#[test]
fn rows_not_whole_blocks() {
    let mut b = B::header(3, 1, 0);
    b.info("w", &[100], GgmlType::Q4K.id(), 0).data(32, 512);
    assert_eq!(
        b.kind(),
        K::NotBlockMultiple {
            tensor: "w".into(),
            ggml_type: GgmlType::Q4K,
            row_len: 100
        }
    );
    // 32 elements in all, but rows of 16: ggml checks the row, not the total.
    let mut b = B::header(3, 1, 0);
    b.info("w", &[16, 2], GgmlType::Q8_0.id(), 0).data(32, 64);
    assert!(matches!(b.kind(), K::NotBlockMultiple { row_len: 16, .. }));
}

#[test]
fn misaligned_offset() {
    let mut b = B::header(3, 2, 0);
    b.info("a", &[4], 0, 0).info("b", &[4], 0, 16).data(32, 64);
    assert_eq!(
        b.kind(),
        K::MisalignedOffset {
            tensor: "b".into(),
            offset: 16,
            alignment: 32
        }
    );
}

#[test]
fn offsets_outside_the_file() {
    let mut b = B::header(3, 1, 0);
    b.info("w", &[4], 0, 4096).data(32, 64);
    assert!(matches!(b.kind(), K::OutOfBounds { end: Some(_), .. }));
    let mut b = B::header(3, 1, 0);
    b.info("w", &[4], 0, u64::MAX - 31).data(32, 64);
    assert!(matches!(b.kind(), K::OutOfBounds { end: None, .. }));
}

#[test]
fn overlapping_tensor_data() {
    let mut b = B::header(3, 2, 0);
    b.info("a", &[16], 0, 0)
        .info("b", &[16], 0, 32)
        .data(32, 96);
    assert_eq!(
        b.kind(),
        K::Overlap {
            first: "a".into(),
            second: "b".into()
        }
    );
    // Out of order in the info block is fine as long as nothing overlaps.
    let mut b = B::header(3, 2, 0);
    b.info("a", &[8], 0, 32).info("b", &[8], 0, 0).data(32, 64);
    b.parse().expect("disjoint, out of order");
}

#[test]
fn duplicate_tensor_names() {
    let mut b = B::header(3, 2, 0);
    b.info("w", &[8], 0, 0).info("w", &[8], 0, 32).data(32, 64);
    assert_eq!(b.kind(), K::DuplicateTensor("w".into()));
}

#[test]
fn errors_display_path_then_problem() {
    let mut b = valid();
    b.0[..4].copy_from_slice(b"GGML");
    let e = b.parse().expect_err("bad magic");
    let msg = e.to_string();
    assert!(msg.starts_with("bad.gguf: not a GGUF file"), "{msg}");
    assert_eq!(e.path(), Path::new("bad.gguf"));
}

#[test]
fn open_reports_io_and_non_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = GgufFile::open(dir.path()).expect_err("a directory");
    assert_eq!(e.kind(), Some(&K::NotAFile));
    let missing = dir.path().join("missing.gguf");
    let e = GgufFile::open(&missing).expect_err("missing");
    assert!(matches!(e, GgufError::Io { .. }));
    assert!(e.to_string().starts_with(&missing.display().to_string()));
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").expect("write");
    let e = GgufFile::open(&empty).expect_err("empty");
    assert!(matches!(e.kind(), Some(K::Truncated { .. })));
    let good = dir.path().join("good.gguf");
    std::fs::write(&good, &valid().0).expect("write");
    let f = GgufFile::open(&good).expect("valid file on disk");
    assert_eq!(f.tensor_data(&f.tensors[0]).len(), 32);
    assert_eq!(f.file_len(), valid().0.len() as u64);
}

/// Writes `head` into a sparse file of `len` bytes: a huge file that costs no disk or memory,
/// which is exactly what a hostile input can be.
fn sparse_file(dir: &Path, head: &[u8], len: u64) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("sparse.gguf");
    let mut f = std::fs::File::create(&path).expect("create");
    f.write_all(head).expect("write");
    f.set_len(len).expect("set_len");
    path
}

#[test]
fn counts_above_the_caps_are_refused_even_when_the_file_is_big_enough() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = MAX_TENSORS + 1;
    let path = sparse_file(dir.path(), &B::header(3, n, 0).0, 24 + n * 24);
    let e = GgufFile::open(&path).expect_err("too many tensors");
    assert!(matches!(
        e.kind(),
        Some(K::CountTooLarge {
            what: "tensor",
            count,
            ..
        }) if *count == n
    ));
}

#[test]
fn strings_beyond_the_budget_are_refused_before_copying() {
    let dir = tempfile::tempdir().expect("tempdir");
    let len = MAX_STRING_BYTES + 1;
    let mut head = B::header(3, 0, 1);
    head.u64(len);
    let path = sparse_file(dir.path(), &head.0, 32 + len + 16);
    let e = GgufFile::open(&path).expect_err("string too large");
    assert_eq!(e.kind(), Some(&K::StringsTooLarge { offset: 24 }));
}

#[test]
fn big_endian_files_are_named_as_such() {
    let mut b = valid();
    b.0[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert_eq!(b.kind(), K::UnsupportedVersion(3u32.swap_bytes()));
    let msg = b.parse().expect_err("big endian").to_string();
    assert!(msg.contains("big-endian"), "{msg}");
}
