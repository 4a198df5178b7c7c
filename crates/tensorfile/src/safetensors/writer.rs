//! A streaming safetensors writer.
//!
//! The whole header is known before any data (names, dtypes, shapes), so it is written first and
//! tensor data follows one tensor (or chunk) at a time: memory never holds more than the caller's
//! current buffer.

use std::collections::BTreeMap;
use std::io::{self, Write};

use super::Dtype;

/// One tensor of the output, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The key in the header.
    pub name: String,
    /// The element type of the data the caller writes.
    pub dtype: Dtype,
    /// Dims in torch order; empty for a scalar.
    pub shape: Vec<u64>,
}

impl TensorSpec {
    /// Data bytes of this tensor, or `None` on overflow.
    pub fn byte_len(&self) -> Option<u64> {
        let n = self
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        self.dtype.bytes_for(n)
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// The serialized header (8-byte length prefix included), padded with spaces to a multiple of 8
/// as the reference writer does. `__metadata__` comes first, then tensors in the given order.
pub fn encode_header(
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
) -> io::Result<Vec<u8>> {
    let mut json = String::from("{");
    let mut first = true;
    let mut push_key = |json: &mut String, key: &str| {
        if !first {
            json.push(',');
        }
        first = false;
        json.push_str(&serde_json::to_string(key).expect("a string always serializes"));
        json.push(':');
    };
    if !metadata.is_empty() {
        push_key(&mut json, "__metadata__");
        json.push_str(&serde_json::to_string(metadata).expect("a string map always serializes"));
    }
    let mut offset = 0u64;
    for spec in specs {
        let len = spec
            .byte_len()
            .ok_or_else(|| invalid(format!("tensor `{}`: size overflows", spec.name)))?;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| invalid("total size overflows".into()))?;
        push_key(&mut json, &spec.name);
        json.push_str(&format!(
            "{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{},{}]}}",
            spec.dtype.as_str(),
            serde_json::to_string(&spec.shape).expect("a u64 list always serializes"),
            offset,
            end
        ));
        offset = end;
    }
    json.push('}');
    while (json.len() + 8) % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    Ok(out)
}

/// The exact size of the file that [`SafetensorsWriter`] produces for these tensors.
pub fn output_len(specs: &[TensorSpec], metadata: &BTreeMap<String, String>) -> io::Result<u64> {
    let header = encode_header(specs, metadata)?.len() as u64;
    specs.iter().try_fold(header, |acc, s| {
        s.byte_len()
            .and_then(|l| acc.checked_add(l))
            .ok_or_else(|| invalid("total size overflows".into()))
    })
}

/// Writes the header up front, then accepts each tensor's bytes in order, possibly in chunks.
#[derive(Debug)]
pub struct SafetensorsWriter<W: Write> {
    out: W,
    lens: Vec<(String, u64)>,
    current: usize,
    written_in_current: u64,
}

impl<W: Write> SafetensorsWriter<W> {
    /// Writes the header to `out`.
    pub fn new(
        mut out: W,
        specs: &[TensorSpec],
        metadata: &BTreeMap<String, String>,
    ) -> io::Result<Self> {
        out.write_all(&encode_header(specs, metadata)?)?;
        let lens = specs
            .iter()
            .map(|s| (s.name.clone(), s.byte_len().unwrap_or(0)))
            .collect();
        let mut w = SafetensorsWriter {
            out,
            lens,
            current: 0,
            written_in_current: 0,
        };
        w.skip_empty();
        Ok(w)
    }

    fn skip_empty(&mut self) {
        while self.current < self.lens.len() && self.lens[self.current].1 == self.written_in_current
        {
            self.current += 1;
            self.written_in_current = 0;
        }
    }

    /// The name of the tensor the next bytes belong to.
    pub fn current_tensor(&self) -> Option<&str> {
        self.lens.get(self.current).map(|(n, _)| n.as_str())
    }

    /// Appends bytes of the current tensor. A chunk may not cross into the next tensor.
    pub fn write_chunk(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some((name, len)) = self.lens.get(self.current) else {
            return Err(invalid("more tensor data than the header declares".into()));
        };
        let remaining = len - self.written_in_current;
        if bytes.len() as u64 > remaining {
            return Err(invalid(format!(
                "tensor `{name}`: chunk of {} bytes exceeds the {remaining} bytes left",
                bytes.len()
            )));
        }
        self.out.write_all(bytes)?;
        self.written_in_current += bytes.len() as u64;
        self.skip_empty();
        Ok(())
    }

    /// Checks every declared byte was written, flushes, and returns the sink.
    pub fn finish(mut self) -> io::Result<W> {
        if let Some((name, len)) = self.lens.get(self.current) {
            return Err(invalid(format!(
                "tensor `{name}`: {} of {len} bytes written",
                self.written_in_current
            )));
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One whole tensor for [`write_file`]: name, dtype, shape, and its bytes.
pub type WholeTensor<'a> = (&'a str, Dtype, Vec<u64>, Vec<u8>);

/// Writes a small safetensors file whose tensors are all in memory (fixtures, tests, samples):
/// the header from `tensors` and `metadata`, then each tensor's bytes. Refused like
/// [`SafetensorsWriter`] when a tensor's bytes do not match its dtype and shape.
pub fn write_file(
    path: &std::path::Path,
    tensors: &[WholeTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> io::Result<()> {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(name, dtype, shape, _)| TensorSpec {
            name: (*name).to_owned(),
            dtype: *dtype,
            shape: shape.clone(),
        })
        .collect();
    let mut w = SafetensorsWriter::new(
        io::BufWriter::new(std::fs::File::create(path)?),
        &specs,
        metadata,
    )?;
    for (_, _, _, bytes) in tensors {
        w.write_all(bytes)?;
    }
    w.finish()?.flush()
}

/// Tensor data as a byte stream: a write may span tensors (it is split at their boundaries), so
/// a converter's piece can hold several small tensors. Writing past the last tensor fails.
impl<W: Write> Write for SafetensorsWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let Some((_, len)) = self.lens.get(self.current) else {
            return Err(invalid("more tensor data than the header declares".into()));
        };
        let n = (len - self.written_in_current).min(buf.len() as u64) as usize;
        self.write_chunk(&buf[..n])?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_padded_and_sizes_add_up() {
        let specs = vec![
            TensorSpec {
                name: "a".into(),
                dtype: Dtype::F16,
                shape: vec![2, 3],
            },
            TensorSpec {
                name: "b".into(),
                dtype: Dtype::F32,
                shape: vec![],
            },
        ];
        let mut meta = BTreeMap::new();
        meta.insert("k".to_string(), "v".to_string());
        let mut w = SafetensorsWriter::new(Vec::new(), &specs, &meta).unwrap();
        w.write_chunk(&[0u8; 4]).unwrap();
        w.write_chunk(&[0u8; 8]).unwrap();
        w.write_chunk(&[1u8; 4]).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() as u64, output_len(&specs, &meta).unwrap());
        let n = u64::from_le_bytes(out[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let v: serde_json::Value = serde_json::from_slice(&out[8..8 + n]).unwrap();
        assert_eq!(v["a"]["data_offsets"], serde_json::json!([0, 12]));
        assert_eq!(v["b"]["data_offsets"], serde_json::json!([12, 16]));
        assert_eq!(v["__metadata__"]["k"], "v");
    }

    #[test]
    fn refuses_short_and_overlong_data() {
        let specs = vec![TensorSpec {
            name: "a".into(),
            dtype: Dtype::U8,
            shape: vec![4],
        }];
        let meta = BTreeMap::new();
        let mut w = SafetensorsWriter::new(Vec::new(), &specs, &meta).unwrap();
        assert!(w.write_chunk(&[0u8; 5]).is_err());
        w.write_chunk(&[0u8; 3]).unwrap();
        assert!(w.finish().is_err());
    }
}
