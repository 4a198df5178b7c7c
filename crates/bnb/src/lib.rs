//! bitsandbytes NF4, FP4 and LLM.int8 quantization of safetensors models, in the layout
//! bitsandbytes itself serializes (so `QuantState.from_dict`, `Params4bit.from_prequantized`,
//! Forge and diffusers load the result), and dequantization back to fp16/bf16/fp32.
//!
//! # Usage
//! Sources are [`tensorfile::TensorSource`]s, opened with [`tensorfile::open_safetensors`]: a
//! ComfyUI scaled-fp8 model is thus quantized from its de-scaled weights (`w.to(f32) * scale`,
//! rounded through the compute dtype like any f32 weight), its scales and marker dropped.
//! [`plan()`] decides from the source's tensor list which tensors are quantized and what the
//! output holds ([`Plan::specs`], exact size via [`Plan::output_len`]); [`convert()`] streams
//! the conversion through [`tensorfile::pipeline::stream`] in pieces (windows of 4M elements
//! read with positioned reads into page-aligned buffers and converted in parallel tasks of
//! whole blocks or rows; the tail of each 4-bit weight), producing the next piece while the
//! previous one is written. Memory is bounded by two windows plus one tensor's absmax (1/16 of
//! its element count in bytes), never by the model. [`plan_dequantize_file`] (or
//! [`plan_dequantize`] for int8-only files) + [`convert()`] turns a bitsandbytes file back into
//! floats. bitsandbytes keys are recognised by `detect` ([`detect::detection::BnbKeys`]), for
//! detection and dequantization alike.
//!
//! # Layout (per quantized `P.weight`)
//! - 4-bit: `P.weight` U8 `[(n+1)/2, 1]` (element `2k` in the high nibble), `P.weight.absmax`
//!   F32 `[ceil(n/64)]` (U8 codes with double quant), `P.weight.quant_map` F32 `[16]`, with
//!   double quant `P.weight.nested_absmax` F32 `[ceil(B/256)]` and `P.weight.nested_quant_map`
//!   F32 `[256]`, and `P.weight.quant_state.bitsandbytes__nf4|fp4` U8: the JSON bytes exactly as
//!   `json.dumps` writes bnb's dict. Nothing else under `P.weight.`.
//! - int8: `P.weight` I8 `[out, in]`, `P.SCB` F32 `[out]`, `P.weight_format` U8 scalar 0.
//! - Everything else float is written in the compute dtype ([`tensorfile::source::compute_dtype`]: the source's
//!   16-bit dtype, bf16 for f32 sources), which is also the 4-bit quant states' `dtype`.
//!
//! # Fidelity to bitsandbytes 0.50.2 (CPU), checked against goldens from pip bitsandbytes
//! - NF4 and FP4 codes and absmax: identical to bnb's CPU `quantize_4bit` (a pure-PyTorch
//!   bucketize), including zero blocks (code 7/0, absmax 0), the partial final block (true
//!   division, absmax clamped to 1e-38) and odd lengths. bnb's CUDA kernel agrees on NF4 except
//!   zero blocks (CUDA writes 0x00) and rare last-ulp tail-block cases; CUDA's FP4 thresholds
//!   are truncated decimals, so FP4 codes can differ from CUDA-made files by one step on rare
//!   values. Both decode to the same or neighbouring values in every loader.
//! - Double quant: the 8-bit codes are bnb 0.50's CPU LUT quantizer's (a 65536-bin grid, not
//!   CUDA's exact nearest-code search); the offset (`absmax.mean()`) is computed in f64 and
//!   rounded once, while torch's f32 sum depends on its thread count, so the offset may differ
//!   from a given bnb run in the last ulp (and then a few codes may differ). Given the same
//!   offset, the codes are identical. The JSON blob is exactly `json.dumps`' bytes when the plan
//!   went through [`resolve_nested_offsets`] (one extra read of each 4-bit weight, which is what
//!   convcache does); without it, the offset's digits are unknown when the header is written and
//!   the blob is padded with spaces to a reserved length.
//! - int8: identical to bnb's `int8_vectorwise_quant` on CPU (fp16 weight, `SCB.reciprocal() *
//!   127`, round half to even); an all-zero row gives 0 codes and SCB 0.
//! - Dequantization: identical to bnb's CPU `dequantize_4bit` / `int8_vectorwise_dequant`
//!   (f32 products; bf16 rounding by bnb's native bit trick for 4-bit weights with an even last
//!   dimension, torch's cast otherwise; FP4 nibble 8 decodes to -0.0 there, as in bnb's native
//!   and CUDA kernels, and to +0.0 on bnb's odd-last-dimension fallback).
//! - Non-finite inputs: NaN/inf blocks get bnb's CPU codes and absmax (a NaN block is all code
//!   15, as `torch.bucketize` ranks NaN last); an int8 row holding NaN gets codes 0 and a NaN
//!   SCB whose NaN bits may differ from torch's.

#![warn(missing_docs)]

pub mod codes;
pub mod convert;
pub mod error;
pub mod kernels;
pub mod plan;
pub mod quant_state;

pub use convert::{Report, convert, resolve_nested_offsets};
pub use error::BnbError;
pub use kernels::QuantType;
pub use plan::{Options, Plan, is_quantized_weight, plan, plan_dequantize, plan_dequantize_file};
pub use quant_state::{QuantStateJson, parse_quant_state};
