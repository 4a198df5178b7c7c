//! Hardened safetensors reading: the header parser and a memory-mapped view.
//!
//! A safetensors file is an 8-byte little-endian header length `N`, `N` bytes of UTF-8 JSON,
//! then the data section. Nothing in the header is trusted before it is checked, in the same
//! spirit as the reference `safetensors` crate:
//! - `N` against the file size and a 100 MB cap ([`MAX_HEADER_LEN`]), before anything is
//!   allocated;
//! - the JSON: UTF-8, an object, `__metadata__` a string-to-string map, no duplicate names;
//! - every tensor: a known dtype, a shape whose element count and byte size do not overflow
//!   and equal the length of its `data_offsets`, offsets inside the data section;
//! - all tensors together: contiguous, non-overlapping, covering exactly the data section.
//!
//! [`read_header`] reads only the `8 + N` header bytes, never tensor data, so detecting a
//! 20 GB model costs the same as a 20 KB one. [`SafetensorsFile`] keeps the validated file open:
//! the tensor reads and "changed since validated" check every converter shares.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

pub mod writer;

pub use writer::{SafetensorsWriter, TensorSpec};

/// A safetensors dtype string.
///
/// The F8/F6/F4 variants beyond E4M3/E5M2 are known (so a file using them is recognised) but no
/// converter reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    /// IEEE 754 double precision.
    F64,
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16: the top 16 bits of an F32 (8-bit exponent, 7-bit mantissa).
    BF16,
    /// torch's `float8_e4m3fn`: no infinities, largest finite ±448, NaN `0x7F`/`0xFF`.
    F8E4M3,
    /// torch's `float8_e5m2`: F16 with the low 8 mantissa bits dropped (has ±inf).
    F8E5M2,
    /// OCP MX scale: an unsigned power of two (8 exponent bits, no mantissa).
    F8E8M0,
    /// E4M3 without negative zero or infinities; `0x80` is the only NaN (AMD's fp8).
    F8E4M3FNUZ,
    /// E5M2 without negative zero or infinities; `0x80` is the only NaN (AMD's fp8).
    F8E5M2FNUZ,
    /// OCP MX 6-bit float, 2 exponent and 3 mantissa bits.
    F6E2M3,
    /// OCP MX 6-bit float, 3 exponent and 2 mantissa bits.
    F6E3M2,
    /// OCP MX 4-bit float (E2M1), two per byte.
    F4,
    /// Signed 64-bit integer.
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Signed 16-bit integer.
    I16,
    /// Signed byte.
    I8,
    /// Unsigned 64-bit integer.
    U64,
    /// Unsigned 32-bit integer.
    U32,
    /// Unsigned 16-bit integer.
    U16,
    /// Unsigned byte.
    U8,
    /// One byte per value, 0 or 1 (`BOOL` in the header).
    Bool,
    /// Complex number: two F32 parts, real then imaginary.
    C64,
}

impl Dtype {
    /// Every dtype.
    pub const ALL: [Dtype; 22] = [
        Dtype::F64,
        Dtype::F32,
        Dtype::F16,
        Dtype::BF16,
        Dtype::F8E4M3,
        Dtype::F8E5M2,
        Dtype::F8E8M0,
        Dtype::F8E4M3FNUZ,
        Dtype::F8E5M2FNUZ,
        Dtype::F6E2M3,
        Dtype::F6E3M2,
        Dtype::F4,
        Dtype::I64,
        Dtype::I32,
        Dtype::I16,
        Dtype::I8,
        Dtype::U64,
        Dtype::U32,
        Dtype::U16,
        Dtype::U8,
        Dtype::Bool,
        Dtype::C64,
    ];

    /// The string in the header.
    pub const fn as_str(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::F8E4M3FNUZ => "F8_E4M3FNUZ",
            Dtype::F8E5M2FNUZ => "F8_E5M2FNUZ",
            Dtype::F6E2M3 => "F6_E2M3",
            Dtype::F6E3M2 => "F6_E3M2",
            Dtype::F4 => "F4",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U64 => "U64",
            Dtype::U32 => "U32",
            Dtype::U16 => "U16",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
            Dtype::C64 => "C64",
        }
    }

    /// Size of one element in bits (sub-byte types: 4 or 6).
    pub const fn bits(self) -> u64 {
        match self {
            Dtype::F64 | Dtype::I64 | Dtype::U64 | Dtype::C64 => 64,
            Dtype::F32 | Dtype::I32 | Dtype::U32 => 32,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 | Dtype::U16 => 16,
            Dtype::F8E4M3
            | Dtype::F8E5M2
            | Dtype::F8E8M0
            | Dtype::F8E4M3FNUZ
            | Dtype::F8E5M2FNUZ
            | Dtype::I8
            | Dtype::U8
            | Dtype::Bool => 8,
            Dtype::F6E2M3 | Dtype::F6E3M2 => 6,
            Dtype::F4 => 4,
        }
    }

    /// Bytes for `n` elements, or `None` on overflow or a partial byte.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let bits = n.checked_mul(self.bits())?;
        (bits % 8 == 0).then_some(bits / 8)
    }

    /// Whether this is a floating-point dtype.
    pub const fn is_float(self) -> bool {
        matches!(
            self,
            Dtype::F64
                | Dtype::F32
                | Dtype::F16
                | Dtype::BF16
                | Dtype::F8E4M3
                | Dtype::F8E5M2
                | Dtype::F8E8M0
                | Dtype::F8E4M3FNUZ
                | Dtype::F8E5M2FNUZ
                | Dtype::F6E2M3
                | Dtype::F6E3M2
                | Dtype::F4
        )
    }

    /// Whether convcache's converters can read this dtype as a source.
    pub const fn is_convertible_float(self) -> bool {
        matches!(
            self,
            Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F8E4M3 | Dtype::F8E5M2
        )
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A dtype string that is not safetensors'.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown safetensors dtype `{0}`")]
pub struct UnknownDtype(pub String);

impl FromStr for Dtype {
    type Err = UnknownDtype;
    /// Exact (case-sensitive), as in the format.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| UnknownDtype(s.to_owned()))
    }
}

/// The largest header accepted, as in the reference `safetensors` crate (100 MB).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// The largest tensor rank accepted. Real tensors have at most 5 or 6 dimensions; the limit only
/// keeps a hostile `shape` array from growing memory far beyond the header's own size.
pub const MAX_RANK: usize = 64;

/// A validated safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `__metadata__` (empty when absent).
    pub metadata: BTreeMap<String, String>,
    /// Every tensor, sorted by data offset (which is also file order).
    pub tensors: Vec<TensorEntry>,
    /// Where the data section starts in the file: `8 + N`.
    pub data_start: u64,
}

impl Header {
    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Bytes in the data section (validated to equal the file size minus [`Header::data_start`]).
    pub fn data_len(&self) -> u64 {
        self.tensors.last().map_or(0, |t| t.data_offsets.1)
    }
}

/// One tensor of a validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// The tensor's key.
    pub name: String,
    /// Its dtype.
    pub dtype: Dtype,
    /// Its shape, outermost dimension first (torch order). Empty for a scalar.
    pub shape: Vec<u64>,
    /// `[begin, end)` of its bytes, relative to [`Header::data_start`].
    pub data_offsets: (u64, u64),
}

impl TensorEntry {
    /// Number of elements (1 for a scalar). For entries of a validated header this never
    /// overflows; for hand-built entries an overflowing shape saturates at `u64::MAX`.
    pub fn n_elements(&self) -> u64 {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .unwrap_or(u64::MAX)
    }

    /// Bytes of data: `end - begin` of [`TensorEntry::data_offsets`] (validated to equal shape
    /// × dtype size).
    pub fn byte_len(&self) -> u64 {
        self.data_offsets.1.saturating_sub(self.data_offsets.0)
    }
}

/// Why a safetensors header was refused. Messages are one line; names from the file are quoted
/// and escaped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The file cannot even hold the 8-byte header length.
    #[error("the file is {file_len} bytes, too short for the 8-byte header length (truncated)")]
    TooShort {
        /// Size of the file.
        file_len: u64,
    },
    /// The header length is over [`MAX_HEADER_LEN`].
    #[error("header length {header_len} exceeds the {MAX_HEADER_LEN}-byte limit")]
    HeaderTooLarge {
        /// The length stored in the first 8 bytes.
        header_len: u64,
    },
    /// The header length points past the end of the file.
    #[error("header length {header_len} runs past the end of the {file_len}-byte file (truncated)")]
    HeaderPastEnd {
        /// The length stored in the first 8 bytes.
        header_len: u64,
        /// Size of the file.
        file_len: u64,
    },
    /// [`parse_header`] was given fewer bytes than the header occupies (a caller error).
    #[error("only {got} header bytes were given, {needed} are needed")]
    IncompletePrefix {
        /// `8 + N`.
        needed: u64,
        /// Bytes given.
        got: u64,
    },
    /// The header is not UTF-8.
    #[error("the header is not UTF-8 (invalid byte at header offset {valid_up_to})")]
    NotUtf8 {
        /// Length of the valid UTF-8 prefix.
        valid_up_to: u64,
    },
    /// The header is JSON (or text) that is not an object.
    #[error("the header is {found}, not a JSON object")]
    NotAnObject {
        /// What it is instead (`an array`, `a number`, ...).
        found: &'static str,
    },
    /// The header is not valid JSON.
    #[error("the header is not valid JSON: {message}")]
    InvalidJson {
        /// serde_json's description, with line and column.
        message: String,
    },
    /// A key appears twice.
    #[error("tensor {name:?} appears more than once")]
    DuplicateName {
        /// The repeated key.
        name: String,
    },
    /// `__metadata__` is not a string-to-string object.
    #[error("`__metadata__` {problem}")]
    BadMetadata {
        /// What is wrong with it.
        problem: String,
    },
    /// A tensor entry is not `{"dtype": string, "shape": [int], "data_offsets": [int, int]}`.
    #[error("tensor {name:?}: malformed entry: {problem}")]
    InvalidEntry {
        /// The tensor's key.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A dtype string that is not safetensors'.
    #[error("tensor {name:?}: unknown dtype {dtype:?}")]
    UnknownDtype {
        /// The tensor's key.
        name: String,
        /// The dtype string.
        dtype: String,
    },
    /// The element count or byte size of a shape overflows 64 bits.
    #[error("tensor {name:?}: shape {shape:?} of {dtype} overflows")]
    ShapeOverflow {
        /// The tensor's key.
        name: String,
        /// Its shape.
        shape: Vec<u64>,
        /// Its dtype.
        dtype: Dtype,
    },
    /// A sub-byte dtype whose elements do not fill whole bytes.
    #[error("tensor {name:?}: {n_elements} elements of {dtype} do not fill whole bytes")]
    PartialByte {
        /// The tensor's key.
        name: String,
        /// Element count.
        n_elements: u64,
        /// Its dtype.
        dtype: Dtype,
    },
    /// Shape × dtype size differs from the length of `data_offsets`.
    #[error(
        "tensor {name:?}: shape {shape:?} of {dtype} is {expected} bytes but its data_offsets span {actual}"
    )]
    SizeMismatch {
        /// The tensor's key.
        name: String,
        /// Its shape.
        shape: Vec<u64>,
        /// Its dtype.
        dtype: Dtype,
        /// Bytes the shape needs.
        expected: u64,
        /// Bytes the offsets span.
        actual: u64,
    },
    /// `data_offsets` end before they begin.
    #[error("tensor {name:?}: data_offsets [{begin}, {end}] end before they begin")]
    InvertedOffsets {
        /// The tensor's key.
        name: String,
        /// Start offset.
        begin: u64,
        /// End offset.
        end: u64,
    },
    /// `data_offsets` reach past the end of the file.
    #[error(
        "tensor {name:?}: data ends at {end}, past the end of the {data_len}-byte data section"
    )]
    OffsetPastEnd {
        /// The tensor's key.
        name: String,
        /// End offset.
        end: u64,
        /// Bytes in the data section.
        data_len: u64,
    },
    /// Two tensors share bytes.
    #[error(
        "tensor {name:?}: data starts at {begin}, inside tensor {previous:?} which ends at {previous_end}"
    )]
    Overlap {
        /// The later tensor.
        name: String,
        /// Its start offset.
        begin: u64,
        /// The tensor it overlaps.
        previous: String,
        /// That tensor's end offset.
        previous_end: u64,
    },
    /// Bytes between two tensors (or before the first) belong to no tensor.
    #[error("tensor {name:?}: data starts at {begin}, leaving unowned bytes from {expected}")]
    Gap {
        /// The tensor after the gap.
        name: String,
        /// Its start offset.
        begin: u64,
        /// Where it should start (the previous tensor's end).
        expected: u64,
    },
    /// The tensors end before the file does.
    #[error(
        "the tensors cover {covered} bytes but the data section has {data_len} (trailing bytes)"
    )]
    TrailingData {
        /// Where the last tensor ends.
        covered: u64,
        /// Bytes in the data section.
        data_len: u64,
    },
}

impl HeaderError {
    /// A stable snake_case name of the error kind (what tests and the adversarial corpus match).
    pub fn kind(&self) -> &'static str {
        match self {
            HeaderError::TooShort { .. } => "too_short",
            HeaderError::HeaderTooLarge { .. } => "header_too_large",
            HeaderError::HeaderPastEnd { .. } => "header_past_end",
            HeaderError::IncompletePrefix { .. } => "incomplete_prefix",
            HeaderError::NotUtf8 { .. } => "not_utf8",
            HeaderError::NotAnObject { .. } => "not_an_object",
            HeaderError::InvalidJson { .. } => "invalid_json",
            HeaderError::DuplicateName { .. } => "duplicate_name",
            HeaderError::BadMetadata { .. } => "bad_metadata",
            HeaderError::InvalidEntry { .. } => "invalid_entry",
            HeaderError::UnknownDtype { .. } => "unknown_dtype",
            HeaderError::ShapeOverflow { .. } => "shape_overflow",
            HeaderError::PartialByte { .. } => "partial_byte",
            HeaderError::SizeMismatch { .. } => "size_mismatch",
            HeaderError::InvertedOffsets { .. } => "inverted_offsets",
            HeaderError::OffsetPastEnd { .. } => "offset_past_end",
            HeaderError::Overlap { .. } => "overlap",
            HeaderError::Gap { .. } => "gap",
            HeaderError::TrailingData { .. } => "trailing_data",
        }
    }

    /// Whether the file ends before its header does (fewer than 8 bytes, or a header length
    /// past the end): the file is truncated rather than malformed.
    pub fn is_truncation(&self) -> bool {
        matches!(
            self,
            HeaderError::TooShort { .. } | HeaderError::HeaderPastEnd { .. }
        )
    }
}

/// Why a safetensors file could not be read. Display: `PATH: problem`, one line.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    /// Opening, reading or mapping the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The path is not a regular file (a directory, a device, a FIFO...).
    #[error("{}: not a regular file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The header is invalid.
    #[error("{}: {source}", path.display())]
    Header {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: HeaderError,
    },
    /// The file changed after its header was validated: its size, its header bytes, or (on
    /// unix) the file its path names.
    #[error("{}: {}", path.display(), changed_message(*expected, *found))]
    Changed {
        /// The file.
        path: PathBuf,
        /// Size when the header was read.
        expected: u64,
        /// Size found later (equal to `expected` when only the header or the file differs).
        found: u64,
    },
}

fn changed_message(expected: u64, found: u64) -> String {
    format!("the file changed after its header was validated (size {expected}, now {found})")
}

impl SafetensorsError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            SafetensorsError::Io { path, .. }
            | SafetensorsError::NotAFile { path }
            | SafetensorsError::Header { path, .. }
            | SafetensorsError::Changed { path, .. } => path,
        }
    }

    /// The problem as an [`io::Error`] without the path, for callers whose own errors name the
    /// file (for [`SafetensorsError::Io`], the I/O error itself, with its kind).
    pub fn into_io_error(self) -> io::Error {
        match self {
            SafetensorsError::Io { source, .. } => source,
            SafetensorsError::Changed {
                expected, found, ..
            } => io::Error::other(changed_message(expected, found)),
            e => io::Error::other(e.to_string()),
        }
    }

    /// The header problem, when that is what the error is.
    pub fn header_error(&self) -> Option<&HeaderError> {
        match self {
            SafetensorsError::Header { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Checks the 8-byte header length `N` against the cap and the file size; returns `N`.
pub fn check_header_len(first8: [u8; 8], file_len: u64) -> Result<u64, HeaderError> {
    if file_len < 8 {
        return Err(HeaderError::TooShort { file_len });
    }
    let header_len = u64::from_le_bytes(first8);
    if header_len > MAX_HEADER_LEN {
        return Err(HeaderError::HeaderTooLarge { header_len });
    }
    // header_len <= 100 MB, so 8 + header_len cannot overflow.
    if 8 + header_len > file_len {
        return Err(HeaderError::HeaderPastEnd {
            header_len,
            file_len,
        });
    }
    Ok(header_len)
}

/// Parses and validates a header.
///
/// `prefix` starts at byte 0 of the file and holds at least the `8 + N` header bytes (more is
/// ignored); `file_len` is the size of the whole file, against which the length and all offsets
/// are checked.
pub fn parse_header(prefix: &[u8], file_len: u64) -> Result<Header, HeaderError> {
    if file_len < 8 {
        return Err(HeaderError::TooShort { file_len });
    }
    let first8: [u8; 8] =
        prefix
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or(HeaderError::IncompletePrefix {
                needed: 8,
                got: prefix.len() as u64,
            })?;
    let header_len = check_header_len(first8, file_len)?;
    let data_start = 8 + header_len;
    let json = usize::try_from(data_start)
        .ok()
        .and_then(|end| prefix.get(8..end))
        .ok_or(HeaderError::IncompletePrefix {
            needed: data_start,
            got: prefix.len() as u64,
        })?;
    parse_json(json, data_start, file_len - data_start)
}

/// Reads and validates the header of `path`, reading only the header bytes.
pub fn read_header(path: &Path) -> Result<Header, SafetensorsError> {
    let mut file = File::open(path).map_err(|source| SafetensorsError::Io {
        path: path.to_owned(),
        source,
    })?;
    let file_len = regular_file_len(&file, path)?;
    read_header_from(&mut file, path, file_len)
}

fn regular_file_len(file: &File, path: &Path) -> Result<u64, SafetensorsError> {
    let meta = file.metadata().map_err(|source| SafetensorsError::Io {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(SafetensorsError::NotAFile {
            path: path.to_owned(),
        });
    }
    Ok(meta.len())
}

/// Reads the header from an open file positioned at its start, whose size is `file_len`.
pub fn read_header_from(
    file: &mut File,
    path: &Path,
    file_len: u64,
) -> Result<Header, SafetensorsError> {
    let header_err = |source| SafetensorsError::Header {
        path: path.to_owned(),
        source,
    };
    let io_err = |source| SafetensorsError::Io {
        path: path.to_owned(),
        source,
    };
    if file_len < 8 {
        return Err(header_err(HeaderError::TooShort { file_len }));
    }
    let mut first8 = [0u8; 8];
    file.read_exact(&mut first8).map_err(io_err)?;
    let header_len = check_header_len(first8, file_len).map_err(header_err)?;
    // Bounded by MAX_HEADER_LEN and by the file size, both checked above.
    let mut json = vec![0u8; header_len as usize];
    file.read_exact(&mut json).map_err(io_err)?;
    let data_start = 8 + header_len;
    parse_json(&json, data_start, file_len - data_start).map_err(header_err)
}

/// What the first byte of a non-object header makes it.
fn describe_non_object(first: Option<u8>) -> &'static str {
    match first {
        None => "empty",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b'0'..=b'9' | b'-') => "a number",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        Some(b' ' | b'\t' | b'\n' | b'\r') => "text starting with whitespace",
        Some(_) => "text not starting with `{`",
    }
}

fn parse_json(json: &[u8], data_start: u64, data_len: u64) -> Result<Header, HeaderError> {
    let text = std::str::from_utf8(json).map_err(|e| HeaderError::NotUtf8 {
        valid_up_to: e.valid_up_to() as u64,
    })?;
    // The reference crate requires the object to start at the first byte; trailing spaces
    // (writers pad the header to a multiple of 8) are fine.
    if text.as_bytes().first() != Some(&b'{') {
        return Err(HeaderError::NotAnObject {
            found: describe_non_object(text.as_bytes().first().copied()),
        });
    }
    let entries = deserialize_entries(text)?;

    let mut metadata = None;
    let mut seen = HashSet::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, raw) in entries {
        if !seen.insert(name.clone()) {
            return Err(HeaderError::DuplicateName { name });
        }
        match raw {
            RawValue::Metadata(value) => metadata = Some(validate_metadata(value)?),
            RawValue::Tensor(raw) => tensors.push(validate_tensor(name, raw, data_len)?),
        }
    }

    // Names break ties between zero-length tensors, so the order never depends on the JSON's.
    tensors.sort_by(|a, b| {
        a.data_offsets
            .cmp(&b.data_offsets)
            .then_with(|| a.name.cmp(&b.name))
    });
    let mut expected = 0u64;
    let mut previous: Option<&str> = None;
    for t in &tensors {
        let begin = t.data_offsets.0;
        if begin > expected {
            return Err(HeaderError::Gap {
                name: t.name.clone(),
                begin,
                expected,
            });
        }
        if begin < expected {
            return Err(HeaderError::Overlap {
                name: t.name.clone(),
                begin,
                previous: previous.unwrap_or_default().to_owned(),
                previous_end: expected,
            });
        }
        expected = t.data_offsets.1;
        previous = Some(&t.name);
    }
    if expected != data_len {
        return Err(HeaderError::TrailingData {
            covered: expected,
            data_len,
        });
    }
    Ok(Header {
        metadata: metadata.unwrap_or_default(),
        tensors,
        data_start,
    })
}

fn json_type_name(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn validate_metadata(value: serde_json::Value) -> Result<BTreeMap<String, String>, HeaderError> {
    let serde_json::Value::Object(map) = value else {
        return Err(HeaderError::BadMetadata {
            problem: format!("is {}, not an object of strings", json_type_name(&value)),
        });
    };
    map.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            other => Err(HeaderError::BadMetadata {
                problem: format!("value of {k:?} is {}, not a string", json_type_name(&other)),
            }),
        })
        .collect()
}

fn validate_tensor(
    name: String,
    raw: RawTensor,
    data_len: u64,
) -> Result<TensorEntry, HeaderError> {
    let dtype = match raw.dtype.parse::<Dtype>() {
        Ok(d) => d,
        Err(UnknownDtype(dtype)) => return Err(HeaderError::UnknownDtype { name, dtype }),
    };
    let shape = raw.shape.0;
    let Some(n_elements) = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)) else {
        return Err(HeaderError::ShapeOverflow { name, shape, dtype });
    };
    let Some(bits) = n_elements.checked_mul(dtype.bits()) else {
        return Err(HeaderError::ShapeOverflow { name, shape, dtype });
    };
    if bits % 8 != 0 {
        return Err(HeaderError::PartialByte {
            name,
            n_elements,
            dtype,
        });
    }
    let expected = bits / 8;
    let (begin, end) = raw.data_offsets;
    if end < begin {
        return Err(HeaderError::InvertedOffsets { name, begin, end });
    }
    if end - begin != expected {
        return Err(HeaderError::SizeMismatch {
            name,
            shape,
            dtype,
            expected,
            actual: end - begin,
        });
    }
    if end > data_len {
        return Err(HeaderError::OffsetPastEnd {
            name,
            end,
            data_len,
        });
    }
    Ok(TensorEntry {
        name,
        dtype,
        shape,
        data_offsets: (begin, end),
    })
}

// ----- JSON decoding -----
//
// The header is decoded straight into typed entries (not a `serde_json::Value` tree), keeping
// duplicate keys so they can be refused, and remembering which key was being decoded so a bad
// entry is reported by name.

enum RawValue {
    Metadata(serde_json::Value),
    Tensor(RawTensor),
}

#[derive(Deserialize)]
struct RawTensor {
    dtype: String,
    shape: Shape,
    data_offsets: (u64, u64),
}

/// A shape array of at most [`MAX_RANK`] dimensions.
struct Shape(Vec<u64>);

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ShapeVisitor;
        impl<'de> Visitor<'de> for ShapeVisitor {
            type Value = Shape;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an array of at most {MAX_RANK} non-negative integers")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
                let mut dims = Vec::new();
                while let Some(d) = seq.next_element::<u64>()? {
                    if dims.len() == MAX_RANK {
                        return Err(de::Error::custom(format_args!(
                            "shape has more than {MAX_RANK} dimensions"
                        )));
                    }
                    dims.push(d);
                }
                Ok(Shape(dims))
            }
        }
        deserializer.deserialize_seq(ShapeVisitor)
    }
}

struct EntriesSeed<'a> {
    /// The key whose value is being decoded, so a failure can name it.
    current: &'a mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = Vec<(String, RawValue)>;
    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntriesSeed<'_> {
    type Value = Vec<(String, RawValue)>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of tensor entries")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            *self.current = Some(key);
            let value = if self.current.as_deref() == Some("__metadata__") {
                RawValue::Metadata(map.next_value()?)
            } else {
                RawValue::Tensor(map.next_value()?)
            };
            if let Some(key) = self.current.take() {
                entries.push((key, value));
            }
        }
        Ok(entries)
    }
}

fn deserialize_entries(text: &str) -> Result<Vec<(String, RawValue)>, HeaderError> {
    let mut current = None;
    let mut de = serde_json::Deserializer::from_str(text);
    let result = EntriesSeed {
        current: &mut current,
    }
    .deserialize(&mut de)
    .and_then(|entries| de.end().map(|()| entries));
    result.map_err(|e| match (e.classify(), current) {
        (serde_json::error::Category::Data, Some(name)) if name == "__metadata__" => {
            HeaderError::BadMetadata {
                problem: e.to_string(),
            }
        }
        (serde_json::error::Category::Data, Some(name)) => HeaderError::InvalidEntry {
            name,
            problem: e.to_string(),
        },
        _ => HeaderError::InvalidJson {
            message: e.to_string(),
        },
    })
}

// ----- the opened file -----

/// Where [`ReadBuffer`] bytes start: a page boundary.
const READ_BUFFER_ALIGN: usize = 4096;

/// A reusable buffer for [`SafetensorsFile::read_tensor_range`] whose bytes start on a page
/// boundary.
///
/// The kernel's copy into a destination that is not cache-line aligned can be several times
/// slower: on the AMD EPYC of BENCHMARKS.md, reading 2 GB from the page cache takes 0.32 s into
/// an aligned buffer and 1.3 s into a `Vec` (the allocator's large blocks start 16 bytes into
/// a page).
#[derive(Debug, Default)]
pub struct ReadBuffer {
    raw: Vec<u8>,
}

impl ReadBuffer {
    /// An empty buffer: nothing is allocated until the first [`ReadBuffer::get`].
    pub fn new() -> ReadBuffer {
        ReadBuffer::default()
    }

    /// The first `len` bytes of the buffer, growing it first if needed, then to at least
    /// `capacity` bytes at once so that later calls do not reallocate. Bytes already there are
    /// kept when it does not grow (`len` within what an earlier call asked for); a grown buffer
    /// starts zeroed.
    pub fn get(&mut self, len: usize, capacity: usize) -> &mut [u8] {
        let offset = |raw: &Vec<u8>| match raw.as_ptr().align_offset(READ_BUFFER_ALIGN) {
            o if o < READ_BUFFER_ALIGN => o,
            _ => 0,
        };
        if self.raw.len() < offset(&self.raw) + len {
            self.raw = vec![0u8; len.max(capacity) + READ_BUFFER_ALIGN];
        }
        let at = offset(&self.raw);
        &mut self.raw[at..at + len]
    }
}

/// A safetensors file with a validated header, kept open for reading tensor data.
///
/// Converters use [`SafetensorsFile::read_tensor_range`] (positioned reads of the file whose
/// header was validated, into reused buffers), not the map: a map's touched pages count as
/// resident memory (a converted 20 GB model would show 20 GB RSS) and a truncated file raises
/// SIGBUS. The map serves only [`SafetensorsFile::tensor_bytes`]: tests, fixtures and the small
/// quant-state tensors a bitsandbytes dequantization plan reads.
#[derive(Debug)]
pub struct SafetensorsFile {
    /// The file.
    pub path: PathBuf,
    /// Its validated header.
    pub header: Header,
    file_len: u64,
    file: File,
    mmap: memmap2::Mmap,
    /// The header's tensors as a [`crate::TensorSource`] serves them.
    source_tensors: Vec<crate::SourceTensor>,
    /// The shared window its tensor reads go through ([`SafetensorsFile::open_shared`]).
    window: Option<crate::shared_read::Reader>,
}

impl SafetensorsFile {
    /// Opens `path`, validates its header (reading only the header bytes) and maps it.
    pub fn open(path: &Path) -> Result<Self, SafetensorsError> {
        let io_err = |source| SafetensorsError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(io_err)?;
        let file_len = regular_file_len(&file, path)?;
        let header = read_header_from(&mut file, path, file_len)?;
        // SAFETY: the map is read-only and private to this process. Like every reader of
        // memory-mapped model files, this assumes no other process truncates or rewrites the
        // file while it is open (convcache never writes a source; outputs are written to a
        // temporary file and renamed, which does not touch mapped pages of the old inode).
        // The size is re-checked below, so a header validated against one size is never used
        // with a map of another.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err)?;
        if mmap.len() as u64 != file_len {
            return Err(SafetensorsError::Changed {
                path: path.to_owned(),
                expected: file_len,
                found: mmap.len() as u64,
            });
        }
        Ok(SafetensorsFile {
            path: path.to_owned(),
            file_len,
            file,
            mmap,
            source_tensors: crate::source::safetensors_tensors(&header),
            header,
            window: None,
        })
    }

    /// Reads tensor data through `seat`'s window from now on, if it reads this very file.
    pub(crate) fn attach(&mut self, seat: &crate::shared_read::Seat) {
        self.window = seat.join(&self.file);
    }

    /// The header's tensors as this file serves them as a [`crate::TensorSource`].
    pub fn source_tensors(&self) -> &[crate::SourceTensor] {
        &self.source_tensors
    }

    /// Size of the file in bytes when its header was validated.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The bytes of `tensor`, an entry of this file's [`SafetensorsFile::header`], through the
    /// memory map (see the type's documentation).
    ///
    /// # Panics
    /// If `tensor` is not from this header and its offsets fall outside the file (validated
    /// entries of this header always fit).
    pub fn tensor_bytes(&self, tensor: &TensorEntry) -> &[u8] {
        let start = self.header.data_start + tensor.data_offsets.0;
        let end = self.header.data_start + tensor.data_offsets.1;
        &self.mmap[start as usize..end as usize]
    }

    /// The tensor called `name` and its bytes (through the memory map).
    pub fn tensor(&self, name: &str) -> Option<(&TensorEntry, &[u8])> {
        let t = self.header.tensor(name)?;
        Some((t, self.tensor_bytes(t)))
    }

    /// Fills `buf` with the bytes of `entry` starting `offset` bytes into the tensor, with a
    /// positioned read of the opened file.
    ///
    /// A range past the end of `entry` (or of the file, for a hand-made entry) is refused before
    /// reading. Errors are [`SafetensorsError::Io`] naming the file, the tensor and the range.
    pub fn read_tensor_range(
        &self,
        entry: &TensorEntry,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), SafetensorsError> {
        let len = buf.len() as u64;
        let err = |kind, problem: &dyn fmt::Display| SafetensorsError::Io {
            path: self.path.clone(),
            source: io::Error::new(
                kind,
                format!(
                    "tensor {:?}, {len} bytes at offset {offset}: {problem}",
                    entry.name
                ),
            ),
        };
        let at = offset
            .checked_add(len)
            .filter(|&end| end <= entry.byte_len())
            .and_then(|_| self.header.data_start.checked_add(entry.data_offsets.0))
            .and_then(|start| start.checked_add(offset))
            .filter(|&at| at.checked_add(len).is_some_and(|end| end <= self.file_len))
            .ok_or_else(|| {
                let outside = format!("outside the tensor's {} bytes", entry.byte_len());
                err(io::ErrorKind::InvalidInput, &outside)
            })?;
        self.read_exact_at(buf, at).map_err(|e| err(e.kind(), &e))
    }

    /// Fails with [`SafetensorsError::Changed`] unless the opened file keeps its size and header
    /// and (on unix) the path still names it: converters call this before writing, so a source
    /// rewritten after planning is refused rather than read with stale offsets. (Elsewhere a
    /// path replaced by another file goes unnoticed; the opened file is still read consistently.)
    pub fn check_unchanged(&self) -> Result<(), SafetensorsError> {
        self.unchanged_prefix().map(|_| ())
    }

    /// [`SafetensorsFile::check_unchanged`], returning the prefix it read and validated (the
    /// length prefix and the header, as [`SafetensorsFile::read_prefix`] gives them): a reader
    /// that hashes the file starts from the very bytes that were checked.
    pub fn unchanged_prefix(&self) -> Result<Vec<u8>, SafetensorsError> {
        let io_err = |source| SafetensorsError::Io {
            path: self.path.clone(),
            source,
        };
        let changed = |found| SafetensorsError::Changed {
            path: self.path.clone(),
            expected: self.file_len,
            found,
        };
        let len = self.file.metadata().map_err(io_err)?.len();
        if len != self.file_len {
            return Err(changed(len));
        }
        let prefix = self.read_prefix()?;
        if parse_header(&prefix, len).ok().as_ref() != Some(&self.header) {
            return Err(changed(len));
        }
        let opened = self.file.metadata().map_err(io_err)?;
        let named = std::fs::metadata(&self.path).map_err(io_err)?;
        if (named.dev(), named.ino()) != (opened.dev(), opened.ino()) {
            return Err(changed(named.len()));
        }
        Ok(prefix)
    }

    /// The file's first [`Header::data_start`] bytes as they are now: the length prefix and the
    /// header JSON (padding included). With the tensor bytes that follow, in order, they are the
    /// whole file (the header was validated to cover the data section exactly), which lets a
    /// converter hash the source in the same pass that reads it.
    pub fn read_prefix(&self) -> Result<Vec<u8>, SafetensorsError> {
        // data_start <= 8 + MAX_HEADER_LEN (validated header), and the file is at least that long.
        let mut prefix = vec![0u8; self.header.data_start as usize];
        self.read_exact_at(&mut prefix, 0)
            .map_err(|source| SafetensorsError::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(prefix)
    }

    /// Tensor data: through the shared window when there is one. The length prefix and
    /// header ([`SafetensorsFile::read_prefix`]) are read directly: they are checked against
    /// the file as it is now, and the window may already have passed them.
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        if let Some(window) = &self.window
            && at >= self.header.data_start
        {
            return window.read_exact_at(buf, at);
        }
        self.file.read_exact_at(buf, at)?;
        crate::read_count::add(buf.len() as u64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn read_buffers_are_page_aligned_and_sized() {
        let mut b = ReadBuffer::new();
        for (len, cap) in [
            (0, 0),
            (10, 100),
            (5000, 0),
            (3, 0),
            (1 << 20, 2 << 20),
            (100, 0),
        ] {
            let s = b.get(len, cap);
            assert_eq!(s.len(), len);
            assert_eq!(s.as_ptr() as usize % READ_BUFFER_ALIGN, 0);
            s.fill(7);
        }
        // Not growing keeps the bytes (the converter swaps a filled buffer and reads it back).
        let kept = b.get(1 << 20, 0);
        kept[12345] = 42;
        assert_eq!(b.get(20000, 0)[12345], 42);
        assert_eq!(b.get(1 << 20, 0)[12345], 42);
    }

    use super::*;

    /// Tensor `a` (8 bytes) then `b` (4 bytes); a same-size file with another header is
    /// precision's `a_source_changed_after_opening_is_refused`.
    #[test]
    fn tensor_ranges_are_bounded_and_changed_files_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let json = br#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}}"#;
        let bytes = [
            &(json.len() as u64).to_le_bytes()[..],
            json,
            &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
        ]
        .concat();
        std::fs::write(&path, &bytes).unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        let (a, b, mut buf) = (&f.header.tensors[0], &f.header.tensors[1], [0u8; 4]);
        f.read_tensor_range(a, 4, &mut buf).unwrap();
        assert_eq!(buf, [4, 5, 6, 7]);
        // Past the end of `a`, although `b`'s bytes follow in the file.
        let e = f.read_tensor_range(a, 6, &mut buf).unwrap_err();
        assert!(e.to_string().contains(r#"tensor "a""#), "{e}");
        f.check_unchanged().unwrap();
        // Truncated by someone else: an error naming the tensor, not a SIGBUS.
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        let e = f.read_tensor_range(b, 0, &mut buf).unwrap_err();
        assert!(
            e.to_string().contains(r#"tensor "b""#) && e.to_string().contains("fill"),
            "{e}"
        );
        assert!(
            matches!(f.check_unchanged(), Err(SafetensorsError::Changed { found, .. }) if found == f.file_len() - 2)
        );
        // The path names another file with the same bytes.
        std::fs::write(dir.path().join("copy"), &bytes).unwrap();
        std::fs::rename(dir.path().join("copy"), &path).unwrap();
        assert_eq!(cfg!(unix), f.check_unchanged().is_err());
    }
}
