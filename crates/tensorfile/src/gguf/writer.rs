//! A streaming GGUF v3 writer.
//!
//! Everything in the header (metadata, names, types, shapes) is known before any data, so
//! [`GgufWriter::new`] writes the whole header up front with each tensor's offset computed, and
//! tensor data follows one tensor (or chunk) at a time: memory never holds more than the
//! caller's current buffer.
//!
//! The layout is gguf-py's and ggml's: magic, version 3, tensor and KV counts, metadata in
//! insertion order, tensor infos with dims in ggml order (reversed torch order, every dim kept),
//! zero padding to the alignment after the info block and after every tensor including the
//! last. A file written here is byte-identical to gguf-py's `GGUFWriter` output for the same
//! content (tested against a committed golden).
//!
//! The writer refuses (with `InvalidInput`) anything [`super::GgufFile`] would refuse to read:
//! duplicate keys or names, mixed-type arrays, too-deep nesting, zero-sized or overflowing
//! shapes, rows that are not whole blocks, more than [`MAX_DIMS`] dims.

use std::collections::HashSet;
use std::io::{self, Write};

use super::reader::{
    ALIGNMENT_KEY, GGUF_MAGIC, GGUF_VERSION, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_METADATA_VALUES,
    MAX_STRING_BYTES, MAX_TENSORS, MetadataValue, ShapeProblem, check_shape,
};
use super::types::GgmlType;

pub use super::reader::DEFAULT_ALIGNMENT;

/// One tensor of the output, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorDesc {
    /// The tensor's name (unique in the file).
    pub name: String,
    /// Dims in ggml order (innermost first); see [`dims_from_torch_shape`].
    pub dims: Vec<u64>,
    /// How the data is encoded; rows (`dims[0]`) must be whole blocks of it.
    pub ggml_type: GgmlType,
}

impl TensorDesc {
    /// A tensor with a torch-order `shape` (converted with [`dims_from_torch_shape`]).
    pub fn from_torch_shape(name: impl Into<String>, shape: &[u64], ggml_type: GgmlType) -> Self {
        TensorDesc {
            name: name.into(),
            dims: dims_from_torch_shape(shape),
            ggml_type,
        }
    }

    /// Number of elements, or `None` on overflow.
    pub fn n_elements(&self) -> Option<u64> {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// Data bytes, or `None` if the shape is invalid for the type (zero dims, overflow,
    /// rows that are not whole blocks).
    pub fn byte_len(&self) -> Option<u64> {
        check_shape(&self.dims, self.ggml_type).ok()
    }
}

/// ggml dims for a torch-order shape: the shape reversed, with every dim kept (leading 1s of
/// the torch shape stay in `n_dims`, which ComfyUI-GGUF needs to rebuild the shape).
pub fn dims_from_torch_shape(shape: &[u64]) -> Vec<u64> {
    shape.iter().rev().copied().collect()
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// The alignment the file will use and whether `general.alignment` must be appended to the
/// metadata. A `general.alignment` in `metadata` wins (readers obey the key); otherwise
/// `alignment` is used, and declared in the metadata when it is not the default.
fn resolve_alignment(
    metadata: &[(String, MetadataValue)],
    alignment: u64,
) -> io::Result<(u64, bool)> {
    match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        Some((_, MetadataValue::U32(a))) if a.is_power_of_two() => Ok((u64::from(*a), false)),
        Some((_, v)) => Err(invalid(format!(
            "`{ALIGNMENT_KEY}` must be a UINT32 nonzero power of two, got {v:?}"
        ))),
        None if alignment.is_power_of_two() && alignment <= u64::from(u32::MAX) => {
            Ok((alignment, alignment != DEFAULT_ALIGNMENT))
        }
        None => Err(invalid(format!(
            "alignment {alignment} is not a nonzero power of two that fits in a UINT32"
        ))),
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends `value` without its type id; checks array homogeneity, depth and the value count.
fn put_value(
    out: &mut Vec<u8>,
    key: &str,
    value: &MetadataValue,
    depth: usize,
    budget: &mut u64,
) -> io::Result<()> {
    *budget = budget
        .checked_sub(1)
        .ok_or_else(|| invalid(format!("more than {MAX_METADATA_VALUES} metadata values")))?;
    match value {
        MetadataValue::U8(v) => out.push(*v),
        MetadataValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::Bool(v) => out.push(u8::from(*v)),
        MetadataValue::String(s) => put_string(out, s),
        MetadataValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::Array(items) => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(invalid(format!(
                    "metadata `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
                )));
            }
            // An empty array has no element type to take; UINT8 is as good as any.
            let elem_type = items.first().map_or(0, MetadataValue::type_id);
            if let Some(odd) = items.iter().find(|v| v.type_id() != elem_type) {
                return Err(invalid(format!(
                    "metadata `{key}`: array mixes {} and {} elements",
                    items[0].type_name(),
                    odd.type_name()
                )));
            }
            out.extend_from_slice(&elem_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, key, item, depth + 1, budget)?;
            }
        }
    }
    Ok(())
}

/// Bytes of string data in a value (string values, nested ones included).
fn string_bytes(v: &MetadataValue) -> u64 {
    match v {
        MetadataValue::String(s) => s.len() as u64,
        MetadataValue::Array(items) => items.iter().map(string_bytes).sum(),
        _ => 0,
    }
}

/// The tensor infos' data lengths, after checking names and shapes.
fn tensor_lens(tensors: &[TensorDesc]) -> io::Result<Vec<u64>> {
    if tensors.len() as u64 > MAX_TENSORS {
        return Err(invalid(format!("more than {MAX_TENSORS} tensors")));
    }
    let mut names = HashSet::with_capacity(tensors.len());
    tensors
        .iter()
        .map(|t| {
            if !names.insert(t.name.as_str()) {
                return Err(invalid(format!("duplicate tensor name `{}`", t.name)));
            }
            if t.dims.len() > MAX_DIMS {
                return Err(invalid(format!(
                    "tensor `{}`: {} dims (at most {MAX_DIMS})",
                    t.name,
                    t.dims.len()
                )));
            }
            check_shape(&t.dims, t.ggml_type).map_err(|p| {
                invalid(match p {
                    ShapeProblem::ZeroElements => {
                        format!("tensor `{}`: has a dim of size 0", t.name)
                    }
                    ShapeProblem::Overflow => {
                        format!("tensor `{}`: element count or size overflows", t.name)
                    }
                    ShapeProblem::NotBlockMultiple => format!(
                        "tensor `{}`: row length {} is not a multiple of the {} block size {}",
                        t.name,
                        t.dims.first().copied().unwrap_or(1),
                        t.ggml_type,
                        t.ggml_type.block_size()
                    ),
                })
            })
        })
        .collect()
}

fn pad_len(n: u64, alignment: u64) -> io::Result<u64> {
    n.checked_next_multiple_of(alignment)
        .map(|p| p - n)
        .ok_or_else(|| invalid("file size overflows".into()))
}

/// The planned file: header bytes (padded to the data section) and per-tensor data lengths.
struct Plan {
    header: Vec<u8>,
    lens: Vec<u64>,
    alignment: u64,
}

fn plan(
    metadata: &[(String, MetadataValue)],
    tensors: &[TensorDesc],
    alignment: u64,
) -> io::Result<Plan> {
    let (alignment, append_alignment) = resolve_alignment(metadata, alignment)?;
    let lens = tensor_lens(tensors)?;
    let extra = append_alignment.then(|| {
        // Checked to fit in resolve_alignment.
        (
            ALIGNMENT_KEY.to_owned(),
            MetadataValue::U32(alignment as u32),
        )
    });
    let all_kv = metadata.iter().chain(extra.as_ref());

    let mut h = Vec::new();
    h.extend_from_slice(&GGUF_MAGIC);
    h.extend_from_slice(&GGUF_VERSION.to_le_bytes());
    h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    h.extend_from_slice(&((metadata.len() + usize::from(append_alignment)) as u64).to_le_bytes());
    let mut keys = HashSet::with_capacity(metadata.len());
    let mut budget = MAX_METADATA_VALUES;
    for (key, value) in all_kv {
        if !keys.insert(key.as_str()) {
            return Err(invalid(format!("duplicate metadata key `{key}`")));
        }
        put_string(&mut h, key);
        h.extend_from_slice(&value.type_id().to_le_bytes());
        put_value(&mut h, key, value, 0, &mut budget)?;
    }
    let strings: u64 = metadata
        .iter()
        .chain(extra.as_ref())
        .map(|(k, v)| k.len() as u64 + string_bytes(v))
        .chain(tensors.iter().map(|t| t.name.len() as u64))
        .sum();
    if strings > MAX_STRING_BYTES {
        return Err(invalid(format!(
            "the header's strings take {strings} bytes (at most {MAX_STRING_BYTES})"
        )));
    }
    let mut offset = 0u64;
    for (t, &len) in tensors.iter().zip(&lens) {
        put_string(&mut h, &t.name);
        h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            h.extend_from_slice(&d.to_le_bytes());
        }
        h.extend_from_slice(&t.ggml_type.id().to_le_bytes());
        h.extend_from_slice(&offset.to_le_bytes());
        offset = len
            .checked_add(pad_len(len, alignment)?)
            .and_then(|l| offset.checked_add(l))
            .ok_or_else(|| invalid("file size overflows".into()))?;
    }
    let pad = pad_len(h.len() as u64, alignment)?;
    h.resize(h.len() + pad as usize, 0);
    Ok(Plan {
        header: h,
        lens,
        alignment,
    })
}

/// The header [`GgufWriter::new`] writes: everything before the first tensor's data,
/// padding included.
pub fn encode_header(
    metadata: &[(String, MetadataValue)],
    tensors: &[TensorDesc],
    alignment: u64,
) -> io::Result<Vec<u8>> {
    plan(metadata, tensors, alignment).map(|p| p.header)
}

/// The exact size of the file [`GgufWriter`] produces for this content.
pub fn output_len(
    metadata: &[(String, MetadataValue)],
    tensors: &[TensorDesc],
    alignment: u64,
) -> io::Result<u64> {
    let p = plan(metadata, tensors, alignment)?;
    p.lens.iter().try_fold(p.header.len() as u64, |acc, &len| {
        pad_len(len, p.alignment)?
            .checked_add(len)
            .and_then(|l| acc.checked_add(l))
            .ok_or_else(|| invalid("file size overflows".into()))
    })
}

/// Writes the header up front, then accepts each tensor's bytes in order, possibly in chunks,
/// padding after each tensor.
#[derive(Debug)]
pub struct GgufWriter<W: Write> {
    out: W,
    names: Vec<String>,
    lens: Vec<u64>,
    alignment: u64,
    current: usize,
    written_in_current: u64,
}

const ZEROS: [u8; 4096] = [0; 4096];

fn write_zeros<W: Write>(out: &mut W, mut n: u64) -> io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

impl<W: Write> GgufWriter<W> {
    /// Validates the content and writes the header to `out`. `alignment` applies when
    /// `metadata` has no `general.alignment` ([`DEFAULT_ALIGNMENT`] = 32 is the usual choice);
    /// a non-default value is declared by appending `general.alignment` (UINT32) to the
    /// metadata.
    pub fn new(
        mut out: W,
        metadata: Vec<(String, MetadataValue)>,
        tensors: &[TensorDesc],
        alignment: u64,
    ) -> io::Result<Self> {
        let plan = plan(&metadata, tensors, alignment)?;
        out.write_all(&plan.header)?;
        Ok(GgufWriter {
            out,
            names: tensors.iter().map(|t| t.name.clone()).collect(),
            lens: plan.lens,
            alignment: plan.alignment,
            current: 0,
            written_in_current: 0,
        })
    }

    /// The name of the tensor the next bytes belong to (`None` once all are written).
    pub fn current_tensor(&self) -> Option<&str> {
        self.names.get(self.current).map(String::as_str)
    }

    /// Bytes still expected for the current tensor.
    pub fn remaining_in_current(&self) -> u64 {
        self.lens
            .get(self.current)
            .map_or(0, |len| len - self.written_in_current)
    }

    /// Appends bytes of the current tensor. A chunk may not cross into the next tensor; the
    /// padding after a tensor is written when its last byte arrives.
    pub fn write_chunk(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some(&len) = self.lens.get(self.current) else {
            return Err(invalid("more tensor data than the header declares".into()));
        };
        let remaining = len - self.written_in_current;
        if bytes.len() as u64 > remaining {
            return Err(invalid(format!(
                "tensor `{}`: chunk of {} bytes exceeds the {remaining} bytes left",
                self.names[self.current],
                bytes.len()
            )));
        }
        self.out.write_all(bytes)?;
        self.written_in_current += bytes.len() as u64;
        if self.written_in_current == len {
            write_zeros(&mut self.out, pad_len(len, self.alignment)?)?;
            self.current += 1;
            self.written_in_current = 0;
        }
        Ok(())
    }

    /// Flushes the sink (a resumable stream flushes at its boundaries, see
    /// [`crate::pipeline::resumable`]).
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// Checks every declared byte was written, flushes, and returns the sink.
    pub fn finish(mut self) -> io::Result<W> {
        if let Some(&len) = self.lens.get(self.current) {
            return Err(invalid(format!(
                "tensor `{}`: {} of {len} bytes written",
                self.names[self.current], self.written_in_current
            )));
        }
        self.out.flush()?;
        Ok(self.out)
    }
}
