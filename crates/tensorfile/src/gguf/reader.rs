//! GGUF v2/v3 reader.
//!
//! [`GgufFile::open`] memory-maps a file and validates the whole header before anything is
//! trusted: every count and length is checked against the bytes that remain before memory is
//! reserved for it, value and tensor types must be known, shapes must have a nonzero,
//! non-overflowing element count whose rows are whole blocks, and every tensor's data must be
//! aligned, inside the file and disjoint from every other tensor's. Tensor data is then served
//! as slices of the map ([`GgufFile::tensor_data`]), so opening a 20 GB file reads only its
//! header pages.
//!
//! Deliberate differences from ggml's C reader (`ggml/src/gguf.cpp`):
//! - tensors may have up to [`MAX_DIMS`] dims, not 4: ComfyUI-GGUF's Wan/HunyuanVideo files
//!   carry a 5-D F32 tensor (gguf-py and ComfyUI read them), and convcache writes the same;
//! - tensor offsets need not be the running padded sum, only aligned, in bounds and disjoint
//!   (what gguf-py requires); convcache's own writer always produces the running sum;
//! - nested arrays are accepted (the spec allows them; gguf-py reads and writes them).
//!
//! Every rejection is a [`GgufError::Invalid`] whose [`GgufErrorKind`] names the problem.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::types::GgmlType;

/// The 4 bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The version convcache writes. Version 2 is read too (same layout, 64-bit counts).
pub const GGUF_VERSION: u32 = 3;
/// The alignment used when a file has no `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides [`DEFAULT_ALIGNMENT`] (must be a UINT32 power of two).
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Most dims a tensor may have. ggml's C code stops at 4 ([`GGML_MAX_DIMS`]); ComfyUI-GGUF's
/// video models store one 5-D tensor, and 8 leaves room without inviting absurd shapes.
pub const MAX_DIMS: usize = 8;
/// ggml's own limit on dims (`GGML_MAX_DIMS`); tensors above it load only in gguf-py/ComfyUI.
pub const GGML_MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays accepted. Parsing recurses per level, so a hostile file
/// must not choose the depth.
pub const MAX_ARRAY_DEPTH: usize = 16;
/// Most metadata values (array elements included) in one file. Each parsed value costs about
/// 32 bytes of memory while a UINT8 element costs 1 byte of file, so file size alone would
/// bound memory only loosely; real files stay far below this (an LLM tokenizer has ~1M).
pub const MAX_METADATA_VALUES: u64 = 1 << 22;
/// Most tensors in one file (the largest real models have some 10^5).
pub const MAX_TENSORS: u64 = 1 << 20;
/// Most bytes of strings (keys, string values, tensor names) in one header. Lengths are also
/// checked against the file size, but a sparse file can be huge and cost nothing, so the copy
/// into memory needs its own bound.
pub const MAX_STRING_BYTES: u64 = 1 << 28;
/// Up-front reservation limit for a vector whose length comes from the file; beyond it the
/// vector grows only as entries are actually parsed.
const MAX_RESERVE: u64 = 1 << 12;

fn reserve(n: u64) -> usize {
    n.min(MAX_RESERVE) as usize
}

/// The 13 GGUF metadata value type ids, in id order.
const TYPE_NAMES: [&str; 13] = [
    "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY",
    "UINT64", "INT64", "FLOAT64",
];
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;

/// Fewest bytes a value of this type occupies in a file; `None` for an unknown type.
fn min_value_size(type_id: u32) -> Option<u64> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        TYPE_STRING => 8,
        TYPE_ARRAY => 12,
        _ => return None,
    })
}

/// A metadata value: all 13 GGUF value types, arrays nested.
///
/// An array's element type is the type of its elements; an empty array does not record one
/// (it is written back as an array of UINT8).
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    /// UINT8 (type 0).
    U8(u8),
    /// INT8 (type 1).
    I8(i8),
    /// UINT16 (type 2).
    U16(u16),
    /// INT16 (type 3).
    I16(i16),
    /// UINT32 (type 4).
    U32(u32),
    /// INT32 (type 5).
    I32(i32),
    /// FLOAT32 (type 6).
    F32(f32),
    /// BOOL (type 7), one byte.
    Bool(bool),
    /// STRING (type 8): u64 length, UTF-8 bytes.
    String(String),
    /// ARRAY (type 9): element type, u64 count, untagged elements, which may be arrays.
    Array(Vec<MetadataValue>),
    /// UINT64 (type 10).
    U64(u64),
    /// INT64 (type 11).
    I64(i64),
    /// FLOAT64 (type 12).
    F64(f64),
}

impl MetadataValue {
    /// The GGUF value type id of this value (UINT8 = 0 ... FLOAT64 = 12).
    pub const fn type_id(&self) -> u32 {
        match self {
            MetadataValue::U8(_) => 0,
            MetadataValue::I8(_) => 1,
            MetadataValue::U16(_) => 2,
            MetadataValue::I16(_) => 3,
            MetadataValue::U32(_) => 4,
            MetadataValue::I32(_) => 5,
            MetadataValue::F32(_) => 6,
            MetadataValue::Bool(_) => 7,
            MetadataValue::String(_) => TYPE_STRING,
            MetadataValue::Array(_) => TYPE_ARRAY,
            MetadataValue::U64(_) => 10,
            MetadataValue::I64(_) => 11,
            MetadataValue::F64(_) => 12,
        }
    }

    /// The GGUF name of this value's type (`UINT32`, `STRING`, `ARRAY`, ...).
    pub fn type_name(&self) -> &'static str {
        TYPE_NAMES[self.type_id() as usize]
    }

    /// The string, if this is a STRING.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if this is an ARRAY.
    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            MetadataValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The boolean, if this is a BOOL.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            MetadataValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The value as an i128 if it is of any integer type (not BOOL, not a float).
    fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            MetadataValue::U8(v) => v.into(),
            MetadataValue::I8(v) => v.into(),
            MetadataValue::U16(v) => v.into(),
            MetadataValue::I16(v) => v.into(),
            MetadataValue::U32(v) => v.into(),
            MetadataValue::I32(v) => v.into(),
            MetadataValue::U64(v) => v.into(),
            MetadataValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as u32 if it has any integer type and fits (writers disagree on the integer
    /// type of fields such as `general.file_type`).
    pub fn as_u32(&self) -> Option<u32> {
        self.as_integer().and_then(|v| u32::try_from(v).ok())
    }

    /// The value as u64 if it has any integer type and fits.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_integer().and_then(|v| u64::try_from(v).ok())
    }

    /// The value as i64 if it has any integer type and fits.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_integer().and_then(|v| i64::try_from(v).ok())
    }

    /// The value as f64 if it is a FLOAT32 or FLOAT64 (exact for both).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetadataValue::F32(v) => Some(v.into()),
            MetadataValue::F64(v) => Some(v),
            _ => None,
        }
    }
}

macro_rules! metadata_from {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl From<$t> for MetadataValue {
            fn from(v: $t) -> Self {
                MetadataValue::$v(v)
            }
        }
    )*};
}
metadata_from!(
    u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
    bool => Bool, String => String, u64 => U64, i64 => I64, f64 => F64,
    Vec<MetadataValue> => Array,
);

impl From<&str> for MetadataValue {
    fn from(v: &str) -> Self {
        MetadataValue::String(v.to_owned())
    }
}

/// One tensor's entry in the info block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name, unique in its file.
    pub name: String,
    /// Dims in ggml order (innermost first), as stored.
    pub dims: Vec<u64>,
    /// How the data is encoded.
    pub ggml_type: GgmlType,
    /// Offset relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements (the product of the dims; 1 for zero dims). Exact for every tensor
    /// of a [`GgufFile`], whose sizes were validated; saturates for a hand-made info.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// Bytes of data. Exact for every tensor of a [`GgufFile`]; saturates for a hand-made
    /// info whose size overflows.
    pub fn byte_len(&self) -> u64 {
        let bs = self.ggml_type.block_size() as u64;
        (self.n_elements() / bs).saturating_mul(self.ggml_type.type_size() as u64)
    }

    /// The shape in torch order (dims reversed), leading 1s included.
    pub fn torch_shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

/// What is wrong with a GGUF file. Offsets are absolute byte positions in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GgufErrorKind {
    /// The path is a directory or another non-regular file.
    NotAFile,
    /// The file does not start with `GGUF`.
    BadMagic([u8; 4]),
    /// Only versions 2 and 3 are read.
    UnsupportedVersion(u32),
    /// The header ends in the middle of `what`, which starts at `offset`.
    Truncated {
        /// The field being read (`tensor name`, `metadata value`, ...).
        what: &'static str,
        /// Where the field starts.
        offset: u64,
    },
    /// A tensor or metadata count that the remaining bytes cannot hold, or above
    /// [`MAX_TENSORS`] / [`MAX_METADATA_VALUES`].
    CountTooLarge {
        /// What is counted (`tensor`, `metadata`).
        what: &'static str,
        /// The count in the header.
        count: u64,
        /// Bytes left in the file after the header's counts.
        remaining: u64,
    },
    /// A string or array length (at `offset`) that the remaining bytes cannot hold.
    LengthTooLarge {
        /// The field being read (`metadata string`, `metadata array`, ...).
        what: &'static str,
        /// The length in the header (bytes for a string, elements for an array).
        len: u64,
        /// Where the length field starts.
        offset: u64,
        /// Bytes left in the file after the length field.
        remaining: u64,
    },
    /// The header's strings exceed [`MAX_STRING_BYTES`] in total (at the string at `offset`).
    StringsTooLarge {
        /// Where the string that crossed the limit starts.
        offset: u64,
    },
    /// A string that is not UTF-8.
    InvalidUtf8 {
        /// The field being read (`metadata key`, `tensor name`, ...).
        what: &'static str,
        /// Where the string (its length prefix) starts.
        offset: u64,
    },
    /// A metadata value type id that is not one of the 13.
    UnknownValueType {
        /// The type id read.
        type_id: u32,
        /// Where the type id starts.
        offset: u64,
    },
    /// Arrays nested deeper than [`MAX_ARRAY_DEPTH`].
    NestingTooDeep {
        /// The metadata key holding the array.
        key: String,
    },
    /// More than [`MAX_METADATA_VALUES`] metadata values.
    TooManyValues,
    /// A metadata key that appears twice.
    DuplicateKey(String),
    /// `general.alignment` has a type other than UINT32.
    BadAlignmentType(&'static str),
    /// `general.alignment` is zero or not a power of two.
    BadAlignment(u32),
    /// A tensor type id that is not in [`GgmlType`].
    UnknownTensorType {
        /// The tensor's name.
        tensor: String,
        /// The type id read.
        type_id: u32,
    },
    /// More than [`MAX_DIMS`] dims.
    TooManyDims {
        /// The tensor's name.
        tensor: String,
        /// The dim count read.
        n_dims: u32,
    },
    /// A dim of size 0.
    ZeroElements {
        /// The tensor's name.
        tensor: String,
    },
    /// The element count or byte size does not fit in an i64.
    ElementCountOverflow {
        /// The tensor's name.
        tensor: String,
    },
    /// The row length (`dims[0]`) is not a whole number of blocks of the tensor's type.
    NotBlockMultiple {
        /// The tensor's name.
        tensor: String,
        /// The tensor's type.
        ggml_type: GgmlType,
        /// `dims[0]`, in elements.
        row_len: u64,
    },
    /// A tensor offset that is not a multiple of the alignment.
    MisalignedOffset {
        /// The tensor's name.
        tensor: String,
        /// The tensor's offset, relative to the data section.
        offset: u64,
        /// The file's alignment (`general.alignment`, default 32).
        alignment: u64,
    },
    /// A tensor whose data would end past the end of the file (`end` is `None` on overflow).
    OutOfBounds {
        /// The tensor's name.
        tensor: String,
        /// Where the tensor's data would end (absolute).
        end: Option<u64>,
        /// The file's length in bytes.
        file_len: u64,
    },
    /// Two tensors whose data overlap.
    Overlap {
        /// The tensor whose data starts first.
        first: String,
        /// The tensor starting inside `first`'s data.
        second: String,
    },
    /// A tensor name that appears twice.
    DuplicateTensor(String),
}

impl fmt::Display for GgufErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use GgufErrorKind as K;
        match self {
            K::NotAFile => write!(f, "not a regular file"),
            K::BadMagic(m) => write!(f, "not a GGUF file (magic {m:02x?}, expected \"GGUF\")"),
            K::UnsupportedVersion(v) if matches!(v.swap_bytes(), 2 | 3) => write!(
                f,
                "big-endian GGUF file (version {}); only little-endian files are supported",
                v.swap_bytes()
            ),
            K::UnsupportedVersion(v) => {
                write!(
                    f,
                    "unsupported GGUF version {v} (versions 2 and 3 are supported)"
                )
            }
            K::Truncated { what, offset } => {
                write!(
                    f,
                    "truncated: {what} at byte {offset} runs past the end of the file"
                )
            }
            K::CountTooLarge {
                what,
                count,
                remaining,
            } => write!(
                f,
                "{what} count {count} cannot fit in the {remaining} bytes left in the file"
            ),
            K::LengthTooLarge {
                what,
                len,
                offset,
                remaining,
            } => write!(
                f,
                "{what} length {len} at byte {offset} cannot fit in the {remaining} bytes left in the file"
            ),
            K::StringsTooLarge { offset } => write!(
                f,
                "the string at byte {offset} takes the header's strings past {MAX_STRING_BYTES} bytes"
            ),
            K::InvalidUtf8 { what, offset } => write!(f, "{what} at byte {offset} is not UTF-8"),
            K::UnknownValueType { type_id, offset } => {
                write!(f, "unknown metadata value type {type_id} at byte {offset}")
            }
            K::NestingTooDeep { key } => write!(
                f,
                "metadata `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
            ),
            K::TooManyValues => write!(f, "more than {MAX_METADATA_VALUES} metadata values"),
            K::DuplicateKey(k) => write!(f, "duplicate metadata key `{k}`"),
            K::BadAlignmentType(t) => {
                write!(f, "`{ALIGNMENT_KEY}` has type {t}, expected UINT32")
            }
            K::BadAlignment(a) => {
                write!(f, "`{ALIGNMENT_KEY}` = {a} is not a nonzero power of two")
            }
            K::UnknownTensorType { tensor, type_id } => {
                write!(
                    f,
                    "tensor `{tensor}`: unknown or unsupported ggml type id {type_id}"
                )
            }
            K::TooManyDims { tensor, n_dims } => {
                write!(
                    f,
                    "tensor `{tensor}`: {n_dims} dims (at most {MAX_DIMS} supported)"
                )
            }
            K::ZeroElements { tensor } => write!(f, "tensor `{tensor}`: has a dim of size 0"),
            K::ElementCountOverflow { tensor } => {
                write!(f, "tensor `{tensor}`: element count or size overflows")
            }
            K::NotBlockMultiple {
                tensor,
                ggml_type,
                row_len,
            } => write!(
                f,
                "tensor `{tensor}`: row length {row_len} is not a multiple of the {ggml_type} block size {}",
                ggml_type.block_size()
            ),
            K::MisalignedOffset {
                tensor,
                offset,
                alignment,
            } => write!(
                f,
                "tensor `{tensor}`: data offset {offset} is not a multiple of the alignment {alignment}"
            ),
            K::OutOfBounds {
                tensor,
                end: Some(end),
                file_len,
            } => write!(
                f,
                "tensor `{tensor}`: data ends at byte {end}, past the end of the file ({file_len} bytes)"
            ),
            K::OutOfBounds {
                tensor, end: None, ..
            } => write!(f, "tensor `{tensor}`: data offset overflows"),
            K::Overlap { first, second } => {
                write!(f, "tensors `{first}` and `{second}` have overlapping data")
            }
            K::DuplicateTensor(n) => write!(f, "duplicate tensor name `{n}`"),
        }
    }
}

/// Why a GGUF file was refused. Displays as `PATH: problem`.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened, inspected or mapped.
    #[error("{}: {source}", path.display())]
    Io {
        /// The GGUF file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file is not a valid GGUF file; `kind` says why.
    #[error("{}: {kind}", path.display())]
    Invalid {
        /// The GGUF file.
        path: PathBuf,
        /// What is wrong.
        kind: GgufErrorKind,
    },
}

impl GgufError {
    /// What is wrong with the contents, if that is the problem (not an I/O error).
    pub fn kind(&self) -> Option<&GgufErrorKind> {
        match self {
            GgufError::Invalid { kind, .. } => Some(kind),
            GgufError::Io { .. } => None,
        }
    }

    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            GgufError::Io { path, .. } | GgufError::Invalid { path, .. } => path,
        }
    }
}

/// The bytes behind a [`GgufFile`].
enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Storage::Mapped(m) => write!(f, "Mapped({} bytes)", m.len()),
            Storage::Owned(v) => write!(f, "Owned({} bytes)", v.len()),
        }
    }
}

/// An opened, validated GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    /// The path it was opened from (or given to [`GgufFile::from_bytes`]).
    pub path: PathBuf,
    /// The GGUF version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, MetadataValue)>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    /// Data alignment: `general.alignment`, else [`DEFAULT_ALIGNMENT`].
    pub alignment: u64,
    /// Absolute offset of the data section (the end of the info block, aligned).
    pub data_offset: u64,
    storage: Storage,
}

impl GgufFile {
    /// Opens, memory-maps and validates `path`. Only the header pages are read.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io_err = |source| GgufError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(GgufError::Invalid {
                path: path.to_owned(),
                kind: GgufErrorKind::NotAFile,
            });
        }
        let storage = if meta.len() == 0 {
            // Mapping an empty file fails on some platforms; parsing reports the truncation.
            Storage::Owned(Vec::new())
        } else {
            // SAFETY: the map is only read. Mapped memory changes if another process modifies
            // the file while it is open; convcache never writes a file in place (outputs are
            // published by rename), and every offset read from the map is bounds-checked, so
            // a concurrent writer can at worst make us read inconsistent values, which the
            // parser treats like any other hostile input.
            Storage::Mapped(unsafe { Mmap::map(&file) }.map_err(io_err)?)
        };
        Self::from_storage(storage, path)
    }

    /// Validates a whole file held in memory (`bytes.len()` is the file length). Used by
    /// tests and the fuzzer.
    pub fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<GgufFile, GgufError> {
        Self::from_storage(Storage::Owned(bytes), path)
    }

    /// Validates `bytes` as a whole file, copying them; the bytes-only entry point for fuzzing.
    pub fn parse_header(bytes: &[u8], path: &Path) -> Result<GgufFile, GgufError> {
        Self::from_bytes(bytes.to_vec(), path)
    }

    fn from_storage(storage: Storage, path: &Path) -> Result<GgufFile, GgufError> {
        let header = parse(storage.bytes()).map_err(|kind| GgufError::Invalid {
            path: path.to_owned(),
            kind,
        })?;
        Ok(GgufFile {
            path: path.to_owned(),
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            alignment: header.alignment,
            data_offset: header.data_offset,
            storage,
        })
    }

    /// The value of metadata `key`.
    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// `general.architecture`, if present and a string.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(|v| v.as_str())
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The data bytes of `tensor`, which must be one of this file's tensors (for any other
    /// info whose range is not inside the file, the slice is empty).
    pub fn tensor_data(&self, tensor: &TensorInfo) -> &[u8] {
        let bytes = self.storage.bytes();
        let start = self.data_offset.checked_add(tensor.offset);
        let end = start.and_then(|s| s.checked_add(tensor.byte_len()));
        match (start, end) {
            (Some(s), Some(e)) => usize::try_from(s)
                .ok()
                .zip(usize::try_from(e).ok())
                .and_then(|(s, e)| bytes.get(s..e))
                .unwrap_or(&[]),
            _ => &[],
        }
    }

    /// The file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.storage.bytes().len() as u64
    }
}

/// The parsed, validated header.
struct Header {
    version: u32,
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

type ParseResult<T> = std::result::Result<T, GgufErrorKind>;

/// Sequential little-endian reads with bounds checks.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// String bytes still allowed ([`MAX_STRING_BYTES`]).
    string_budget: u64,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn take(&mut self, n: usize, what: &'static str) -> ParseResult<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.bytes.len() => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => Err(GgufErrorKind::Truncated {
                what,
                offset: self.offset(),
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> ParseResult<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &'static str) -> ParseResult<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> ParseResult<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A length-prefixed UTF-8 string; the length is checked before anything is copied.
    fn string(&mut self, what: &'static str) -> ParseResult<String> {
        let start = self.offset();
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(GgufErrorKind::LengthTooLarge {
                what,
                len,
                offset: start,
                remaining: self.remaining(),
            });
        }
        if len > self.string_budget {
            return Err(GgufErrorKind::StringsTooLarge { offset: start });
        }
        self.string_budget -= len;
        // `len <= remaining <= usize::MAX`, so the cast is lossless.
        let raw = self.take(len as usize, what)?;
        match std::str::from_utf8(raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufErrorKind::InvalidUtf8 {
                what,
                offset: start,
            }),
        }
    }
}

/// The metadata key-values of a GGUF file from a prefix of it (`bytes`), validated as in a
/// whole file, without looking at the tensor infos or data that follow: enough to read what a
/// damaged file (truncated, or with bad tensor data) says about itself.
pub fn read_metadata_prefix(bytes: &[u8]) -> Result<Vec<(String, MetadataValue)>, GgufErrorKind> {
    let mut c = Cursor {
        bytes,
        pos: 0,
        string_budget: MAX_STRING_BYTES,
    };
    let (_, _, n_kv) = parse_prelude(&mut c)?;
    check_kv_count(&c, n_kv)?;
    parse_metadata(&mut c, n_kv)
}

/// Magic, version and the counts: (version, tensor count, metadata count).
fn parse_prelude(c: &mut Cursor<'_>) -> ParseResult<(u32, u64, u64)> {
    let magic: [u8; 4] = c.array("magic")?;
    if magic != GGUF_MAGIC {
        return Err(GgufErrorKind::BadMagic(magic));
    }
    let version = c.u32("version")?;
    if version != 2 && version != 3 {
        return Err(GgufErrorKind::UnsupportedVersion(version));
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    Ok((version, n_tensors, n_kv))
}

// Smallest possible entries: a KV is key length (8) + type (4) + a 1-byte value; a tensor
// info is name length (8) + n_dims (4) + type (4) + offset (8).
const MIN_KV: u64 = 13;
const MIN_TENSOR_INFO: u64 = 24;

/// Refuses a metadata count the remaining bytes cannot hold (before anything is reserved).
fn check_kv_count(c: &Cursor<'_>, n_kv: u64) -> ParseResult<u64> {
    let kv_bytes = n_kv.checked_mul(MIN_KV);
    match kv_bytes {
        Some(b) if n_kv <= MAX_METADATA_VALUES && b <= c.remaining() => Ok(b),
        _ => Err(GgufErrorKind::CountTooLarge {
            what: "metadata",
            count: n_kv,
            remaining: c.remaining(),
        }),
    }
}

/// The `n_kv` key-values (a checked count), keys unique.
fn parse_metadata(c: &mut Cursor<'_>, n_kv: u64) -> ParseResult<Vec<(String, MetadataValue)>> {
    let mut metadata = Vec::with_capacity(reserve(n_kv));
    let mut keys = HashSet::with_capacity(reserve(n_kv));
    let mut budget = MAX_METADATA_VALUES;
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let value = read_value(c, &key, 0, &mut budget)?;
        if !keys.insert(key.clone()) {
            return Err(GgufErrorKind::DuplicateKey(key));
        }
        metadata.push((key, value));
    }
    Ok(metadata)
}

/// Parses and validates a whole file.
fn parse(bytes: &[u8]) -> ParseResult<Header> {
    let file_len = bytes.len() as u64;
    let mut c = Cursor {
        bytes,
        pos: 0,
        string_budget: MAX_STRING_BYTES,
    };
    let (version, n_tensors, n_kv) = parse_prelude(&mut c)?;
    let kv_bytes = check_kv_count(&c, n_kv)?;
    let ti_bytes = n_tensors.checked_mul(MIN_TENSOR_INFO);
    if n_tensors > MAX_TENSORS
        || ti_bytes
            .and_then(|a| a.checked_add(kv_bytes))
            .is_none_or(|b| b > c.remaining())
    {
        return Err(GgufErrorKind::CountTooLarge {
            what: "tensor",
            count: n_tensors,
            remaining: c.remaining(),
        });
    }
    let metadata = parse_metadata(&mut c, n_kv)?;

    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, MetadataValue::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, MetadataValue::U32(a))) => return Err(GgufErrorKind::BadAlignment(*a)),
        Some((_, v)) => return Err(GgufErrorKind::BadAlignmentType(v.type_name())),
    };

    let mut tensors = Vec::with_capacity(reserve(n_tensors));
    let mut names = HashSet::with_capacity(reserve(n_tensors));
    let mut byte_lens = Vec::with_capacity(reserve(n_tensors));
    for _ in 0..n_tensors {
        let (info, len) = read_tensor_info(&mut c)?;
        if !names.insert(info.name.clone()) {
            return Err(GgufErrorKind::DuplicateTensor(info.name));
        }
        tensors.push(info);
        byte_lens.push(len);
    }

    // The info block ends at most at the file end, so this cannot overflow by much; checked
    // anyway because alignment can be up to 2^31.
    let end_of_infos = c.offset();
    let data_offset =
        end_of_infos
            .checked_next_multiple_of(alignment)
            .ok_or(GgufErrorKind::Truncated {
                what: "data section",
                offset: end_of_infos,
            })?;

    let mut ranges = Vec::with_capacity(tensors.len());
    for (i, (t, &len)) in tensors.iter().zip(&byte_lens).enumerate() {
        if t.offset % alignment != 0 {
            return Err(GgufErrorKind::MisalignedOffset {
                tensor: t.name.clone(),
                offset: t.offset,
                alignment,
            });
        }
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(s), Some(e)) if e <= file_len => ranges.push((s, e, i)),
            _ => {
                return Err(GgufErrorKind::OutOfBounds {
                    tensor: t.name.clone(),
                    end,
                    file_len,
                });
            }
        }
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        let ((_, end_a, a), (start_b, _, b)) = (w[0], w[1]);
        if end_a > start_b {
            return Err(GgufErrorKind::Overlap {
                first: tensors[a].name.clone(),
                second: tensors[b].name.clone(),
            });
        }
    }

    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

/// Reads a type id and the value after it.
fn read_value(
    c: &mut Cursor<'_>,
    key: &str,
    depth: usize,
    budget: &mut u64,
) -> ParseResult<MetadataValue> {
    let offset = c.offset();
    let type_id = c.u32("metadata value type")?;
    read_typed(c, type_id, offset, key, depth, budget)
}

/// Reads one value of type `type_id` (whose id was read at `type_offset`).
fn read_typed(
    c: &mut Cursor<'_>,
    type_id: u32,
    type_offset: u64,
    key: &str,
    depth: usize,
    budget: &mut u64,
) -> ParseResult<MetadataValue> {
    *budget = budget.checked_sub(1).ok_or(GgufErrorKind::TooManyValues)?;
    const W: &str = "metadata value";
    Ok(match type_id {
        0 => MetadataValue::U8(c.array::<1>(W)?[0]),
        1 => MetadataValue::I8(i8::from_le_bytes(c.array(W)?)),
        2 => MetadataValue::U16(u16::from_le_bytes(c.array(W)?)),
        3 => MetadataValue::I16(i16::from_le_bytes(c.array(W)?)),
        4 => MetadataValue::U32(u32::from_le_bytes(c.array(W)?)),
        5 => MetadataValue::I32(i32::from_le_bytes(c.array(W)?)),
        6 => MetadataValue::F32(f32::from_le_bytes(c.array(W)?)),
        // gguf-py and ggml read any nonzero byte as true.
        7 => MetadataValue::Bool(c.array::<1>(W)?[0] != 0),
        TYPE_STRING => MetadataValue::String(c.string("metadata string")?),
        TYPE_ARRAY => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(GgufErrorKind::NestingTooDeep {
                    key: key.to_owned(),
                });
            }
            let elem_offset = c.offset();
            let elem_type = c.u32("array element type")?;
            let Some(min_size) = min_value_size(elem_type) else {
                return Err(GgufErrorKind::UnknownValueType {
                    type_id: elem_type,
                    offset: elem_offset,
                });
            };
            let len_offset = c.offset();
            let len = c.u64("array length")?;
            if len.checked_mul(min_size).is_none_or(|b| b > c.remaining()) {
                return Err(GgufErrorKind::LengthTooLarge {
                    what: "metadata array",
                    len,
                    offset: len_offset,
                    remaining: c.remaining(),
                });
            }
            if len > *budget {
                return Err(GgufErrorKind::TooManyValues);
            }
            let mut items = Vec::with_capacity(reserve(len));
            for _ in 0..len {
                items.push(read_typed(
                    c,
                    elem_type,
                    elem_offset,
                    key,
                    depth + 1,
                    budget,
                )?);
            }
            MetadataValue::Array(items)
        }
        10 => MetadataValue::U64(u64::from_le_bytes(c.array(W)?)),
        11 => MetadataValue::I64(i64::from_le_bytes(c.array(W)?)),
        12 => MetadataValue::F64(f64::from_le_bytes(c.array(W)?)),
        _ => {
            return Err(GgufErrorKind::UnknownValueType {
                type_id,
                offset: type_offset,
            });
        }
    })
}

/// Reads one tensor info and checks its shape; returns it with its data length.
fn read_tensor_info(c: &mut Cursor<'_>) -> ParseResult<(TensorInfo, u64)> {
    let name = c.string("tensor name")?;
    let n_dims = c.u32("tensor n_dims")?;
    if n_dims as usize > MAX_DIMS {
        return Err(GgufErrorKind::TooManyDims {
            tensor: name,
            n_dims,
        });
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(c.u64("tensor dims")?);
    }
    let type_id = c.u32("tensor type")?;
    let offset = c.u64("tensor offset")?;
    let Some(ggml_type) = GgmlType::from_id(type_id) else {
        return Err(GgufErrorKind::UnknownTensorType {
            tensor: name,
            type_id,
        });
    };
    let len = match check_shape(&dims, ggml_type) {
        Ok(len) => len,
        Err(problem) => return Err(problem.into_kind(name, ggml_type, &dims)),
    };
    Ok((
        TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        },
        len,
    ))
}

/// A shape problem, before the tensor name is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShapeProblem {
    ZeroElements,
    Overflow,
    NotBlockMultiple,
}

impl ShapeProblem {
    fn into_kind(self, tensor: String, ggml_type: GgmlType, dims: &[u64]) -> GgufErrorKind {
        match self {
            ShapeProblem::ZeroElements => GgufErrorKind::ZeroElements { tensor },
            ShapeProblem::Overflow => GgufErrorKind::ElementCountOverflow { tensor },
            ShapeProblem::NotBlockMultiple => GgufErrorKind::NotBlockMultiple {
                tensor,
                ggml_type,
                row_len: dims.first().copied().unwrap_or(1),
            },
        }
    }
}

/// Checks a ggml-order shape for `ggml_type` as ggml does (no zero dims, element count and
/// byte size within i64, rows of whole blocks) and returns the data length in bytes.
pub(crate) fn check_shape(
    dims: &[u64],
    ggml_type: GgmlType,
) -> std::result::Result<u64, ShapeProblem> {
    if dims.contains(&0) {
        return Err(ShapeProblem::ZeroElements);
    }
    let n = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or(ShapeProblem::Overflow)?;
    let row_len = dims.first().copied().unwrap_or(1);
    if row_len % ggml_type.block_size() as u64 != 0 {
        return Err(ShapeProblem::NotBlockMultiple);
    }
    ggml_type
        .bytes_for(n)
        .filter(|&b| b <= i64::MAX as u64)
        .ok_or(ShapeProblem::Overflow)
}
