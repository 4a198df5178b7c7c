#![warn(missing_docs)]
//! GGUF for diffusion models, usable on its own.
//!
//! - [`quant`]: quantize/dequantize kernels, one type per block format behind one trait,
//!   byte-identical to ggml's reference quantizers.
//! - [`mix`]: ComfyUI-GGUF's per-tensor type policy (convert.py's base step and the patched
//!   llama-quantize's retyping, in one pass).
//! - [`convert`]: the streaming conversion of any tensor source into a GGUF file.
//! - [`source`]: a GGUF file as a (dequantizing) `tensorfile::TensorSource`.
//! - [`dequantize`]: a GGUF file to fp32/fp16/bf16 safetensors.
//!
//! The container itself (types, validating reader, streaming writer) is `tensorfile::gguf`,
//! re-exported here as [`reader`], [`writer`] and [`types`]; diffusion architectures come from
//! `detect::arch`.
//!
//! ```
//! use std::collections::BTreeMap;
//!
//! use gguf::convert::GgufConversion;
//! use gguf::{Arch, FileType, GgmlType, GgufFile};
//! use tensorfile::{Dtype, SafetensorsWriter, TensorSpec};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A one-layer model: a 64x256 F32 weight.
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("model.safetensors");
//! let spec = TensorSpec {
//!     name: "double_blocks.0.img_attn.proj.weight".into(),
//!     dtype: Dtype::F32,
//!     shape: vec![64, 256],
//! };
//! let values: Vec<u8> = (0..64 * 256).flat_map(|i| (i as f32 * 1e-4).to_le_bytes()).collect();
//! let mut writer = SafetensorsWriter::new(std::fs::File::create(&path)?, &[spec], &BTreeMap::new())?;
//! writer.write_chunk(&values)?;
//! writer.finish()?;
//!
//! // Plan (header work only), then stream the GGUF file.
//! let source = tensorfile::open_safetensors(&path)?;
//! let conversion = GgufConversion::plan(source, Some(Arch::Flux), FileType::Q8_0, &BTreeMap::new())?;
//! let mut out = Vec::new();
//! let report = conversion.write(&mut out, &mut |_, _| {})?;
//! assert_eq!(out.len() as u64, conversion.output_len());
//! assert_eq!(report.quantized_tensors, 1);
//!
//! let file = GgufFile::from_bytes(out, &dir.path().join("model.gguf"))?;
//! assert_eq!(file.architecture(), Some("flux"));
//! assert_eq!(file.tensors[0].ggml_type, GgmlType::Q8_0);
//! # Ok(())
//! # }
//! ```

pub mod convert;
pub mod dequantize;
pub mod mix;
pub mod quant;
pub mod source;
pub mod text_encoder;

pub use detect::arch::{Arch, ArchError, detect_arch};
pub use tensorfile::gguf::{
    FileType, GgmlType, GgufError, GgufErrorKind, GgufFile, GgufWriter, MetadataValue, TensorDesc,
    TensorInfo, reader, types, writer,
};
