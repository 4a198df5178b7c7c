//! The safetensors header parser: random valid headers round-trip, hostile bytes never panic,
//! and the memory-mapped view hands out exactly each tensor's bytes.

mod common;

use std::collections::BTreeMap;

use proptest::prelude::*;
use tensorfile::safetensors::{
    Dtype, HeaderError, MAX_HEADER_LEN, SafetensorsFile, TensorEntry, parse_header, read_header,
};

fn dtype() -> impl Strategy<Value = Dtype> {
    proptest::sample::select(Dtype::ALL.to_vec())
}

/// Up to 12 tensors with distinct names and whole-byte sizes (sub-byte dtypes need even or
/// multiple-of-4 element counts), zero-size tensors included.
fn tensors() -> impl Strategy<Value = Vec<(String, Dtype, Vec<u64>)>> {
    proptest::collection::btree_map(
        "[a-z_.]{1,12}|\\PC{1,6}",
        (dtype(), proptest::collection::vec(0u64..7, 0..5)),
        0..12,
    )
    .prop_map(|m| {
        m.into_iter()
            .filter(|(_, (d, shape))| d.bytes_for(shape.iter().product()).is_some())
            .map(|(name, (d, shape))| (name, d, shape))
            .collect()
    })
}

fn metadata() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map("\\PC{0,8}", "\\PC{0,16}", 0..4)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn valid_headers_round_trip(
        tensors in tensors(),
        metadata in metadata(),
        order_seed in any::<u64>(),
        padding in 0usize..16,
    ) {
        let specs: Vec<(&str, Dtype, &[u64])> =
            tensors.iter().map(|(n, d, s)| (n.as_str(), *d, s.as_slice())).collect();
        let meta: Vec<(&str, &str)> =
            metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (json, data_len) = common::safetensors_json(&specs, &meta);
        // Shuffle the JSON key order: offsets, not key order, define the layout.
        let value: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&json).unwrap();
        let mut entries: Vec<_> = value.into_iter().collect();
        let n = entries.len().max(1);
        entries.rotate_left((order_seed as usize) % n);
        if order_seed % 2 == 1 {
            entries.reverse();
        }
        let mut json = serde_json::Value::Object(entries.into_iter().collect()).to_string();
        json.push_str(&" ".repeat(padding));
        let mut file = (json.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(json.as_bytes());
        file.resize(file.len() + data_len as usize, 0x5a);

        let header = parse_header(&file, file.len() as u64).unwrap();
        prop_assert_eq!(header.data_start, 8 + json.len() as u64);
        prop_assert_eq!(&header.metadata, &metadata);
        let mut expected: Vec<TensorEntry> = Vec::new();
        let mut offset = 0;
        for (name, d, shape) in &tensors {
            let len = d.bytes_for(shape.iter().product()).unwrap();
            expected.push(TensorEntry {
                name: name.clone(),
                dtype: *d,
                shape: shape.clone(),
                data_offsets: (offset, offset + len),
            });
            offset += len;
        }
        expected.sort_by(|a, b| a.data_offsets.cmp(&b.data_offsets).then(a.name.cmp(&b.name)));
        prop_assert_eq!(&header.tensors, &expected);
        for t in &header.tensors {
            prop_assert_eq!(Some(t.byte_len()), t.dtype.bytes_for(t.n_elements()));
        }
        prop_assert_eq!(header.data_len(), data_len);
        // Extra bytes after the header in the prefix are ignored.
        prop_assert_eq!(parse_header(&file[..header.data_start as usize], file.len() as u64), Ok(header));
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), extra in 0u64..64) {
        let _ = parse_header(&bytes, bytes.len() as u64);
        let _ = parse_header(&bytes, bytes.len() as u64 + extra);
    }

    #[test]
    fn random_json_after_a_valid_length_never_panics(json in "\\PC{0,64}|\\{[\\[\\]{}\":,0-9a-zA-Z_ -]{0,80}") {
        let file = detect::corpus::safetensors_bytes(json.as_bytes(), 16);
        let _ = parse_header(&file, file.len() as u64);
    }

    #[test]
    fn mutated_valid_headers_never_panic(
        tensors in tensors(),
        position in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let specs: Vec<(&str, Dtype, &[u64])> =
            tensors.iter().map(|(n, d, s)| (n.as_str(), *d, s.as_slice())).collect();
        let mut file = common::safetensors(&specs, &[("format", "pt")]);
        let i = position.index(file.len());
        file[i] = byte;
        let _ = parse_header(&file, file.len() as u64);
    }
}

fn header_bytes(json: &str, data_len: usize) -> Vec<u8> {
    detect::corpus::safetensors_bytes(json.as_bytes(), data_len)
}

#[test]
fn limits_are_checked_before_anything_is_read() {
    // A huge length with almost no bytes behind it fails on the length, not on allocation.
    let mut f = (MAX_HEADER_LEN + 1).to_le_bytes().to_vec();
    f.push(b'{');
    assert_eq!(
        parse_header(&f, f.len() as u64),
        Err(HeaderError::HeaderTooLarge {
            header_len: MAX_HEADER_LEN + 1
        })
    );
    // Exactly at the cap is allowed by the length check (then fails on the missing bytes).
    let f = MAX_HEADER_LEN.to_le_bytes();
    assert_eq!(parse_header(&f, 8).unwrap_err().kind(), "header_past_end");
    assert_eq!(
        parse_header(&[1, 2, 3], 3),
        Err(HeaderError::TooShort { file_len: 3 })
    );
    // A caller that passes too few bytes gets a clear error, not a panic.
    let f = header_bytes("{}", 0);
    assert_eq!(
        parse_header(&f[..5], f.len() as u64),
        Err(HeaderError::IncompletePrefix { needed: 8, got: 5 })
    );
    assert_eq!(
        parse_header(&f[..9], f.len() as u64),
        Err(HeaderError::IncompletePrefix { needed: 10, got: 9 })
    );
}

#[test]
fn zero_length_tensors_and_empty_headers_are_valid() {
    let f = header_bytes("{}", 0);
    let h = parse_header(&f, f.len() as u64).unwrap();
    assert!(h.tensors.is_empty() && h.metadata.is_empty());
    // ComfyUI's empty `scaled_fp8` marker next to real data, at the same offset.
    let f = header_bytes(
        r#"{"w":{"dtype":"F8_E4M3","shape":[2,2],"data_offsets":[0,4]},"scaled_fp8":{"dtype":"F8_E4M3","shape":[0],"data_offsets":[0,0]}}"#,
        4,
    );
    let h = parse_header(&f, f.len() as u64).unwrap();
    let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["scaled_fp8", "w"]);
}

#[test]
fn errors_name_the_tensor_and_stay_on_one_line() {
    let f = header_bytes(
        r#"{"evil\nname":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#,
        12,
    );
    let e = parse_header(&f, f.len() as u64).unwrap_err();
    assert_eq!(e.kind(), "size_mismatch");
    let msg = e.to_string();
    assert!(msg.contains(r#""evil\nname""#), "{msg}");
    assert!(!msg.contains('\n'));
    assert_eq!(
        msg,
        r#"tensor "evil\nname": shape [4] of F32 is 16 bytes but its data_offsets span 12"#
    );
}

#[test]
fn every_dtype_string_is_known() {
    for d in Dtype::ALL {
        let json = format!(
            r#"{{"t":{{"dtype":"{}","shape":[8],"data_offsets":[0,{}]}}}}"#,
            d.as_str(),
            d.bytes_for(8).unwrap()
        );
        let f = header_bytes(&json, d.bytes_for(8).unwrap() as usize);
        let h = parse_header(&f, f.len() as u64).unwrap();
        assert_eq!(h.tensors[0].dtype, d);
    }
    // Case matters, as in the format.
    let f = header_bytes(
        r#"{"t":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}"#,
        4,
    );
    assert_eq!(
        parse_header(&f, f.len() as u64),
        Err(HeaderError::UnknownDtype {
            name: "t".into(),
            dtype: "f32".into()
        })
    );
}

#[test]
fn read_header_and_the_mapped_view_agree() {
    let bytes = common::safetensors(
        &[
            ("norm", Dtype::F32, &[3]),
            ("w", Dtype::BF16, &[2, 5]),
            ("flag", Dtype::Bool, &[]),
        ],
        &[("format", "pt")],
    );
    let (_dir, path) = common::write_temp("m.safetensors", &bytes);
    let header = read_header(&path).unwrap();
    assert_eq!(header.metadata["format"], "pt");
    let file = SafetensorsFile::open(&path).unwrap();
    assert_eq!(file.header, header);
    assert_eq!(file.file_len(), bytes.len() as u64);
    let start = header.data_start as usize;
    let (w, data) = file.tensor("w").unwrap();
    assert_eq!(w.shape, [2, 5]);
    assert_eq!(data, &bytes[start + 12..start + 32]);
    let flag = header.tensor("flag").unwrap();
    assert_eq!(flag.n_elements(), 1);
    assert_eq!(file.tensor_bytes(flag), &bytes[start + 32..start + 33]);
}

#[test]
fn read_errors_carry_the_path() {
    let (_dir, path) = common::write_temp("bad.safetensors", &header_bytes("[]", 0));
    let e = read_header(&path).unwrap_err();
    assert_eq!(
        e.header_error(),
        Some(&HeaderError::NotAnObject { found: "an array" })
    );
    assert_eq!(
        e.to_string(),
        format!(
            "{}: the header is an array, not a JSON object",
            path.display()
        )
    );
    let e = SafetensorsFile::open(path.parent().unwrap()).unwrap_err();
    assert_eq!(e.path(), path.parent().unwrap());
    assert!(e.to_string().ends_with(": not a regular file"), "{e}");
}
