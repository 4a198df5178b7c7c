#![warn(missing_docs)]
//! ComfyUI's own quantized formats as targets: `fp8_scaled`, `nvfp4` and `mxfp8` safetensors
//! that ComfyUI loads natively (`comfy/ops.py`, `mixed_precision_ops`), made streaming on the
//! CPU from any [`tensorfile::TensorSource`].
//!
//! - [`plan()`]: decides every output tensor from the source's tensor list and the
//!   [`LayerRule`] of its architecture, reading each selected weight once (its maximum |value|
//!   for the per-tensor scale, and whether the format can hold it), so the exact output size
//!   is known before anything is written.
//! - [`convert()`]: streams the output through `tensorfile::pipeline`, quantizing rows in
//!   parallel with `tensorfile::blockfp` (byte-identical to comfy-kitchen's eager quantizers).
//!
//! Per quantized layer `L` the output has, in this order (what ComfyUI's
//! `_load_quantized_module` reads):
//!
//! | target | `L.weight` | `L.weight_scale` | `L.weight_scale_2` |
//! |---|---|---|---|
//! | `fp8_scaled` | F8_E4M3 `[out, in]` | F32 scalar (amax/448) | — |
//! | `nvfp4` | U8 `[R16, C16/2]` (E2M1 pairs, even element high) | F8_E4M3 block-16 scales, swizzled | F32 scalar (amax/2688) |
//! | `mxfp8` | F8_E4M3 `[R32, C32]` | U8 E8M0 block-32 scales, swizzled | — |
//!
//! and `L.comfy_quant`, U8, the bytes of `json.dumps({"format": ...})` (`float8_e4m3fn`,
//! `nvfp4`, `mxfp8`), plus `"orig_shape": [rows, cols]` when the weight is stored padded
//! (`R16` is the rows rounded up to 16 when either dim is not a multiple of 16, ...). No
//! `input_scale` is written (ComfyUI would use it as a static activation scale).
//!
//! Every other tensor: 16-bit floats, integers and dtypes no cast reads are copied; F32, F64 and
//! fp8 tensors (including weights of layers kept high precision) are cast to the source's
//! 16-bit dtype (BF16 for an f32 model).
//!
//! # Example
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::io::Write;
//! use detect::Precision;
//! use tensorfile::{Dtype, SafetensorsWriter, TensorSpec, open_safetensors};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("tiny.safetensors");
//! let bf16 = |name: &str, shape: Vec<u64>| TensorSpec { name: name.into(), dtype: Dtype::BF16, shape };
//! let specs = [
//!     bf16("double_blocks.0.img_attn.proj.weight", vec![16, 32]),
//!     bf16("final_layer.linear.weight", vec![4, 16]),
//! ];
//! let mut writer = SafetensorsWriter::new(std::fs::File::create(&path)?, &specs, &BTreeMap::new())?;
//! writer.write_all(&vec![0x3f; 2 * (16 * 32 + 4 * 16)])?;
//! writer.finish()?;
//!
//! let source = open_safetensors(&path)?;
//! let plan = comfyquant::plan(source.as_ref(), Precision::Fp8Scaled)?;
//! let names: Vec<&str> = plan.specs.iter().map(|s| s.name.as_str()).collect();
//! assert_eq!(names, [
//!     "double_blocks.0.img_attn.proj.weight",
//!     "double_blocks.0.img_attn.proj.weight_scale",
//!     "double_blocks.0.img_attn.proj.comfy_quant",
//!     "final_layer.linear.weight", // the last layer stays bf16
//! ]);
//! let mut out = Vec::new();
//! let report = comfyquant::convert(source.as_ref(), &plan, &BTreeMap::new(), &mut out, &mut |_, _| {})?;
//! assert_eq!((report.quantized, report.bytes_out), (1, out.len() as u64));
//! # Ok(())
//! # }
//! ```

mod convert;
mod error;
pub mod layers;
mod plan;
mod scratch;

pub use convert::{KEPT_NAMES_LIMIT, Report, SourceObserver, convert, convert_observing_source};
pub use error::ComfyQuantError;
pub use layers::LayerRule;
pub use plan::{KeptLayer, Plan, QuantFormat, plan};
