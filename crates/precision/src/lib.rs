#![warn(missing_docs)]
//! Precision conversion of safetensors files, bit-identical to PyTorch's `.to(dtype)`.
//!
//! - [`mod@convert`]: the streaming safetensors -> safetensors converter ([`plan`], [`convert()`]),
//!   with the rules for which tensors change.
//!
//! The element casts and the safetensors writer live in `tensorfile`.
//!
//! # Example
//!
//! Plan and convert a one-tensor F32 file to bf16, into memory:
//!
//! ```
//! use std::collections::BTreeMap;
//! use detect::Precision;
//! use tensorfile::{Dtype, SafetensorsWriter, TensorSpec, open_safetensors};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("tiny.safetensors");
//! let spec = TensorSpec { name: "w".into(), dtype: Dtype::F32, shape: vec![2] };
//! let file = std::fs::File::create(&path)?;
//! let mut writer = SafetensorsWriter::new(file, &[spec], &BTreeMap::new())?;
//! writer.write_chunk(&[1.5f32.to_le_bytes(), (-2.0f32).to_le_bytes()].concat())?;
//! writer.finish()?;
//!
//! let source = open_safetensors(&path)?;
//! let plan = precision::plan(source.as_ref(), Precision::Bf16)?;
//! let metadata = precision::merged_metadata(source.metadata(), &BTreeMap::new());
//! let mut out = Vec::new();
//! let report = precision::convert(source.as_ref(), &plan, &metadata, &mut out, &mut |_, _| {})?;
//! assert_eq!((report.tensors_converted, report.bytes_out), (1, out.len() as u64));
//! assert_eq!(plan.output_len(&metadata)?, out.len() as u64);
//! // The data section ends the file: bf16 1.5 = 0x3FC0 and -2.0 = 0xC000, little-endian.
//! assert!(out.ends_with(&[0xC0, 0x3F, 0x00, 0xC0]));
//! # Ok(())
//! # }
//! ```

pub mod convert;

pub use convert::{
    Action, ConvertError, ConvertOptions, Plan, Report, SourceObserver, convert,
    convert_observing_source, convert_with, merged_metadata, plan,
};
