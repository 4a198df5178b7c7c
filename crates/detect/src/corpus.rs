//! The adversarial corpus: hostile files [`crate::detect`] must refuse with a specific error.
//!
//! One builder shared by the detect tests (which assert each case's expected error kind) and
//! `cargo xtask fixtures` (which writes the files to disk for the fuzzers and the CLI tests),
//! so the two cannot drift apart. Every byte is deterministic.

/// What a case is on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A file with these bytes.
    File(Vec<u8>),
    /// An (empty) directory with a model-like name.
    Directory,
}

/// One adversarial case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// File (or directory) name; the extension matters where the content is not conclusive.
    pub name: &'static str,
    /// What to write.
    pub content: Content,
    /// The [`crate::DetectError::kind`] `detect` must return.
    pub expected: &'static str,
    /// For `gguf` errors: a word the (lowercased) message must contain, naming the problem.
    pub detail: Option<&'static str>,
}

/// A safetensors file: 8-byte length, `json`, then `data_len` bytes of a fixed pattern.
pub fn safetensors_bytes(json: &[u8], data_len: usize) -> Vec<u8> {
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json);
    out.extend((0..data_len).map(|i| (i % 251) as u8));
    out
}

/// The start of a GGUF file: magic, version, tensor count, metadata count.
pub fn gguf_preamble(magic: &[u8; 4], version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut out = magic.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&n_tensors.to_le_bytes());
    out.extend_from_slice(&n_kv.to_le_bytes());
    out
}

/// A GGUF string: u64 length, bytes.
fn gguf_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
}

fn file(
    name: &'static str,
    bytes: Vec<u8>,
    expected: &'static str,
    detail: Option<&'static str>,
) -> Case {
    Case {
        name,
        content: Content::File(bytes),
        expected,
        detail,
    }
}

fn st(name: &'static str, json: &str, data_len: usize, expected: &'static str) -> Case {
    file(
        name,
        safetensors_bytes(json.as_bytes(), data_len),
        expected,
        None,
    )
}

/// Every case, in a fixed order.
pub fn cases() -> Vec<Case> {
    let mut cases = vec![file("empty.safetensors", Vec::new(), "empty", None)];

    // 1..7 bytes: not even the header length.
    const SHORT: [&str; 7] = [
        "short_1.safetensors",
        "short_2.safetensors",
        "short_3.safetensors",
        "short_4.safetensors",
        "short_5.safetensors",
        "short_6.safetensors",
        "short_7.safetensors",
    ];
    for (i, name) in SHORT.into_iter().enumerate() {
        let bytes = safetensors_bytes(b"{}", 0)[..i + 1].to_vec();
        cases.push(file(name, bytes, "truncated", None));
    }

    // Hostile header lengths.
    let mut past_end = 1000u64.to_le_bytes().to_vec();
    past_end.extend_from_slice(b"{\"a\":{\"dtype\":\"F32\"");
    cases.push(file(
        "length_past_end.safetensors",
        past_end,
        "truncated",
        None,
    ));
    let mut over_cap = 200_000_000u64.to_le_bytes().to_vec();
    over_cap.extend_from_slice(b"{}");
    cases.push(file(
        "length_over_cap.safetensors",
        over_cap,
        "header_too_large",
        None,
    ));
    let mut max_len = u64::MAX.to_le_bytes().to_vec();
    max_len.extend_from_slice(b"{}");
    cases.push(file(
        "length_u64_max.safetensors",
        max_len,
        "header_too_large",
        None,
    ));

    // JSON that is not a header.
    cases.extend([
        st("invalid_json.safetensors", r#"{"a" 1}"#, 0, "invalid_json"),
        st(
            "unterminated_json.safetensors",
            r#"{"a":{"dtype":"F32","shape":[1],"#,
            0,
            "invalid_json",
        ),
        st(
            "trailing_garbage.safetensors",
            r#"{}garbage"#,
            0,
            "invalid_json",
        ),
        st("json_array.safetensors", "[1,2,3]", 0, "not_an_object"),
        st("json_number.safetensors", "12345678", 0, "not_an_object"),
        st("json_string.safetensors", r#""header""#, 0, "not_an_object"),
    ]);
    let mut not_utf8 = br#"{"bad"#.to_vec();
    not_utf8.extend_from_slice(&[0xff, 0xfe]);
    not_utf8.extend_from_slice(br#"":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}"#);
    cases.push(file(
        "not_utf8.safetensors",
        safetensors_bytes(&not_utf8, 0),
        "not_utf8",
        None,
    ));

    // Entries that lie about the data.
    cases.extend([
        st(
            "overlapping_offsets.safetensors",
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
            24,
            "overlap",
        ),
        st(
            "gap_between_tensors.safetensors",
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[24,40]}}"#,
            40,
            "gap",
        ),
        st(
            "offsets_past_end.safetensors",
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            8,
            "offset_past_end",
        ),
        st(
            "trailing_data.safetensors",
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            20,
            "trailing_data",
        ),
        st(
            "inverted_offsets.safetensors",
            r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[16,0]}}"#,
            16,
            "inverted_offsets",
        ),
        st(
            "unknown_dtype.safetensors",
            r#"{"a":{"dtype":"F12","shape":[4],"data_offsets":[0,6]}}"#,
            6,
            "unknown_dtype",
        ),
        st(
            "shape_mismatch.safetensors",
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#,
            12,
            "size_mismatch",
        ),
        st(
            "shape_overflow.safetensors",
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,2],"data_offsets":[0,16]}}"#,
            16,
            "shape_overflow",
        ),
        st(
            "byte_size_overflow.safetensors",
            r#"{"a":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,16]}}"#,
            16,
            "shape_overflow",
        ),
        st(
            "partial_byte.safetensors",
            r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
            2,
            "partial_byte",
        ),
        st(
            "duplicate_names.safetensors",
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
            "duplicate_name",
        ),
        st(
            "metadata_not_object.safetensors",
            r#"{"__metadata__":["format","pt"]}"#,
            0,
            "bad_metadata",
        ),
        st(
            "metadata_value_not_string.safetensors",
            r#"{"__metadata__":{"format":"pt","steps":1000}}"#,
            0,
            "bad_metadata",
        ),
        st(
            "entry_missing_offsets.safetensors",
            r#"{"a":{"dtype":"F32","shape":[1]}}"#,
            4,
            "invalid_entry",
        ),
        st(
            "negative_dim.safetensors",
            r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            4,
            "invalid_entry",
        ),
    ]);
    let deep_shape = format!(
        r#"{{"a":{{"dtype":"U8","shape":[{}],"data_offsets":[0,1]}}}}"#,
        vec!["1"; tensorfile::safetensors::MAX_RANK + 1].join(",")
    );
    cases.push(st(
        "rank_too_large.safetensors",
        &deep_shape,
        1,
        "invalid_entry",
    ));

    // GGUF.
    cases.push(file(
        "bad_magic.gguf",
        gguf_preamble(b"GGUX", 3, 0, 0),
        "gguf",
        Some("magic"),
    ));
    cases.push(file(
        "version_1.gguf",
        gguf_preamble(b"GGUF", 1, 0, 0),
        "gguf",
        Some("version"),
    ));
    cases.push(file(
        "version_4.gguf",
        gguf_preamble(b"GGUF", 4, 0, 0),
        "gguf",
        Some("version"),
    ));
    cases.push(file(
        "huge_tensor_count.gguf",
        gguf_preamble(b"GGUF", 3, 1 << 60, 0),
        "gguf",
        Some("count"),
    ));
    let mut huge_string = gguf_preamble(b"GGUF", 3, 0, 1);
    huge_string.extend_from_slice(&(1u64 << 60).to_le_bytes());
    huge_string.extend_from_slice(b"general.architecture");
    cases.push(file(
        "huge_string_length.gguf",
        huge_string,
        "gguf",
        Some("length"),
    ));
    let mut truncated = gguf_preamble(b"GGUF", 3, 0, 1);
    gguf_string(&mut truncated, b"general.file_type");
    truncated.extend_from_slice(&4u32.to_le_bytes()); // UINT32, of which only 2 bytes follow
    truncated.extend_from_slice(&[15, 0]);
    cases.push(file("truncated.gguf", truncated, "gguf", Some("truncated")));
    cases.push(file("magic_only.gguf", b"GGUF".to_vec(), "gguf", None));

    // Neither format, and not a file.
    cases.push(file(
        "not_a_model.dat",
        b"this is a text file, not a model\n".to_vec(),
        "unknown_format",
        None,
    ));
    cases.push(Case {
        name: "a_directory.safetensors",
        content: Content::Directory,
        expected: "is_directory",
        detail: None,
    });
    cases
}
