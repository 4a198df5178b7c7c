//! Planning: every output tensor (name, dtype, shape) decided before anything is written, so
//! the exact output size is known.
//!
//! A quantized weight needs its maximum |value| first (its per-tensor scale), and a weight whose
//! values the format cannot hold (NaN or ±inf; for mxfp8 a block too small for an E8M0 scale)
//! must be written in high precision instead, which changes the header: so [`plan`] reads every
//! weight the layer rule selects once, in parallel chunks (memory: one chunk per thread). The
//! conversion reads them a second time to quantize.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::Path;

use detect::Precision;
use rayon::prelude::*;
use serde::Serialize;
use tensorfile::blockfp;
use tensorfile::cast::is_cast_source;
use tensorfile::safetensors::writer::output_len;
use tensorfile::{Dtype, SourceTensor, TensorSource, TensorSpec};

use crate::error::ComfyQuantError;
use crate::layers::{LayerRule, Verdict};

/// Elements read per parallel task of the planning pass (a multiple of the mxfp8 block).
const SCAN_ELEMS: usize = 1 << 16;

/// An mxfp8 block (32 values) whose largest |value| is below this gets E8M0 scale code 0, which
/// comfy-kitchen decodes as 0.0 and divides by (NaN / ±448 bytes, see NOTES §3.4): a weight with
/// such a block is kept high precision. 2^-117 is just above 448 * 2^-127, with margin for the
/// rounding of log2. Only f32 (or bf16) weights of about 1e-35 have such blocks.
const MXFP8_MIN_BLOCK_MAX: f32 = f32::from_bits(10 << 23);

/// One of ComfyUI's quantized layer formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantFormat {
    /// `float8_e4m3fn` with a per-tensor scale (`fp8_scaled`).
    Fp8,
    /// `nvfp4`: E2M1 in blocks of 16, E4M3 block scales, per-tensor scale.
    Nvfp4,
    /// `mxfp8`: E4M3 in blocks of 32, E8M0 block scales.
    Mxfp8,
}

impl QuantFormat {
    /// The format a target writes, `None` for targets that are not ComfyUI layouts.
    pub fn of_target(target: Precision) -> Option<QuantFormat> {
        match target {
            Precision::Fp8Scaled => Some(QuantFormat::Fp8),
            Precision::Nvfp4 => Some(QuantFormat::Nvfp4),
            Precision::Mxfp8 => Some(QuantFormat::Mxfp8),
            _ => None,
        }
    }

    /// The `format` of its `comfy_quant` JSON (a key of ComfyUI's `QUANT_ALGOS`).
    pub fn comfy_quant_name(self) -> &'static str {
        match self {
            QuantFormat::Fp8 => "float8_e4m3fn",
            QuantFormat::Nvfp4 => "nvfp4",
            QuantFormat::Mxfp8 => "mxfp8",
        }
    }

    /// The stored `[rows, cols]` of a `[rows, cols]` weight: comfy-kitchen pads both dims of
    /// the block formats when either is not a multiple of the block (fp8 is never padded).
    pub fn stored_shape(self, rows: usize, cols: usize) -> (usize, usize) {
        match self {
            QuantFormat::Fp8 => (rows, cols),
            QuantFormat::Nvfp4 => blockfp::nvfp4_padded_shape(rows, cols),
            QuantFormat::Mxfp8 => blockfp::mxfp8_padded_shape(rows, cols),
        }
    }

    /// Bytes of `weight` per stored row of `cols` columns.
    pub(crate) fn row_bytes(self, cols: usize) -> usize {
        match self {
            QuantFormat::Fp8 | QuantFormat::Mxfp8 => cols,
            QuantFormat::Nvfp4 => cols / 2,
        }
    }

    /// Block scales per stored row of `cols` columns (0 for fp8).
    pub(crate) fn row_blocks(self, cols: usize) -> usize {
        match self {
            QuantFormat::Fp8 => 0,
            QuantFormat::Nvfp4 => cols / blockfp::NVFP4_GROUP,
            QuantFormat::Mxfp8 => cols / blockfp::MXFP8_GROUP,
        }
    }
}

/// A layer the rule selects that is written in high precision because the format cannot hold
/// it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeptLayer {
    /// The weight's name.
    pub name: String,
    /// Why (`not a 2-D weight`, `NaN or infinite values`, ...).
    pub reason: String,
}

/// A weight to quantize.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct QuantizedWeight {
    /// Its position in the source.
    pub(crate) src: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// The stored (padded) shape.
    pub(crate) stored_rows: usize,
    pub(crate) stored_cols: usize,
    /// fp8: `weight_scale`; nvfp4: `weight_scale_2`; mxfp8: unused (0).
    pub(crate) tensor_scale: f32,
    /// The dtype comfy-kitchen's fp8 quantizer computes in: the weight's own 16-bit dtype, F32
    /// for anything else (f32, de-scaled or dequantized weights).
    pub(crate) compute: Dtype,
    /// The bytes of its `comfy_quant` tensor.
    pub(crate) comfy_quant: Vec<u8>,
}

/// How consecutive output tensors are made from one source tensor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    /// A weight quantized: `weight`, `weight_scale`, [`weight_scale_2`,] `comfy_quant`.
    Quantize(QuantizedWeight),
    /// A float tensor cast to the plan's 16-bit dtype.
    Cast { src: usize, dst: Dtype },
    /// Bytes copied unchanged.
    Copy { src: usize },
}

impl Step {
    pub(crate) fn src(&self) -> usize {
        match self {
            Step::Quantize(w) => w.src,
            Step::Cast { src, .. } | Step::Copy { src } => *src,
        }
    }
}

/// Everything about an output decided before writing it.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The requested precision.
    pub target: Precision,
    /// Its layer format.
    pub format: QuantFormat,
    /// The layer rule applied.
    pub rule: LayerRule,
    /// The 16-bit dtype F32/F64/fp8 tensors that are not quantized are written in: the
    /// source's dominant 16-bit dtype, BF16 when it has none (`tensorfile::source::compute_dtype`).
    pub float_dtype: Dtype,
    /// Every output tensor, in file order.
    pub specs: Vec<TensorSpec>,
    /// Layers the rule selects that the format cannot hold (written in high precision).
    pub kept: Vec<KeptLayer>,
    /// The source tensors the plan was made from.
    pub(crate) tensors: Vec<SourceTensor>,
    pub(crate) steps: Vec<Step>,
}

impl Plan {
    /// The exact size of the output file with this `metadata`.
    pub fn output_len(&self, metadata: &BTreeMap<String, String>) -> io::Result<u64> {
        output_len(&self.specs, metadata)
    }

    /// Source bytes the conversion reads (the total of its progress).
    pub fn source_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.source_bytes).sum()
    }

    /// Source tensors the conversion reads.
    pub fn source_tensors(&self) -> u64 {
        self.tensors.len() as u64
    }

    /// Weights quantized.
    pub fn quantized(&self) -> u64 {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Quantize(_)))
            .count() as u64
    }
}

/// Plans converting `source` to `target` (`fp8_scaled`, `nvfp4` or `mxfp8`): decides each
/// layer by the [`LayerRule`] of the model's architecture and reads every selected weight once
/// (its maximum |value|; whether the format can hold it).
pub fn plan(source: &dyn TensorSource, target: Precision) -> Result<Plan, ComfyQuantError> {
    let path = source.path();
    let format =
        QuantFormat::of_target(target).ok_or_else(|| ComfyQuantError::UnsupportedTarget {
            path: path.to_owned(),
            target,
        })?;
    let tensors = source.tensors();
    let rule = LayerRule::for_tensors(tensors);
    let float_dtype = tensorfile::source::compute_dtype(tensors);
    let mut plan = Plan {
        target,
        format,
        rule,
        float_dtype,
        specs: Vec::with_capacity(tensors.len()),
        kept: Vec::new(),
        tensors: tensors.to_vec(),
        steps: Vec::with_capacity(tensors.len()),
    };
    for (i, t) in tensors.iter().enumerate() {
        let unfit = match rule.verdict(t) {
            Verdict::NotSelected => None,
            Verdict::Unfit(reason) => Some(reason),
            Verdict::Quantize => {
                let (rows, cols) = dims(path, t)?;
                let scan = scan_weight(source, i, rows, cols, format)?;
                match scan.unfit(format) {
                    Some(reason) => Some(reason),
                    None => {
                        let w = quantized_weight(i, t, rows, cols, format, scan.amax);
                        plan.specs.extend(weight_specs(&t.name, format, &w));
                        plan.steps.push(Step::Quantize(w));
                        continue;
                    }
                }
            }
        };
        if let Some(reason) = unfit {
            plan.kept.push(KeptLayer {
                name: t.name.clone(),
                reason: reason.to_owned(),
            });
        }
        let (step, dtype) = high_precision(i, t, float_dtype);
        plan.steps.push(step);
        plan.specs.push(TensorSpec {
            name: t.name.clone(),
            dtype,
            shape: t.shape.clone(),
        });
    }
    check_unique(path, &plan.specs)?;
    Ok(plan)
}

/// How a tensor that is not quantized is written: 16-bit floats, integers and dtypes no cast
/// reads as they are; F32, F64 and fp8 cast to the plan's 16-bit dtype.
fn high_precision(i: usize, t: &SourceTensor, float_dtype: Dtype) -> (Step, Dtype) {
    if is_cast_source(t.dtype) && !matches!(t.dtype, Dtype::BF16 | Dtype::F16) {
        (
            Step::Cast {
                src: i,
                dst: float_dtype,
            },
            float_dtype,
        )
    } else {
        (Step::Copy { src: i }, t.dtype)
    }
}

fn dims(path: &Path, t: &SourceTensor) -> Result<(usize, usize), ComfyQuantError> {
    let too_large = || ComfyQuantError::tensor(path, &t.name, "too large for this platform");
    let [rows, cols] = t.shape[..] else {
        return Err(ComfyQuantError::tensor(path, &t.name, "is not 2-D"));
    };
    let rows = usize::try_from(rows).map_err(|_| too_large())?;
    let cols = usize::try_from(cols).map_err(|_| too_large())?;
    // The padded size (and its bytes) must fit too.
    let padded = |d: usize| d.checked_add(128).ok_or_else(too_large);
    padded(rows)?
        .checked_mul(padded(cols)?)
        .ok_or_else(too_large)?;
    Ok((rows, cols))
}

fn quantized_weight(
    src: usize,
    t: &SourceTensor,
    rows: usize,
    cols: usize,
    format: QuantFormat,
    amax: f32,
) -> QuantizedWeight {
    let compute = match t.dtype {
        Dtype::BF16 | Dtype::F16 => t.dtype,
        _ => Dtype::F32,
    };
    let tensor_scale = match format {
        QuantFormat::Fp8 => blockfp::fp8_tensor_scale(amax, compute),
        QuantFormat::Nvfp4 => blockfp::nvfp4_tensor_scale(amax),
        QuantFormat::Mxfp8 => 0.0,
    };
    let (stored_rows, stored_cols) = format.stored_shape(rows, cols);
    QuantizedWeight {
        src,
        rows,
        cols,
        stored_rows,
        stored_cols,
        tensor_scale,
        compute,
        comfy_quant: comfy_quant_json(format, (rows, cols), (stored_rows, stored_cols)),
    }
}

/// `json.dumps({"format": ...})` (Python's separators, as ComfyUI writes it), with
/// `"orig_shape": [rows, cols]` when the stored weight is padded: ComfyUI's loader takes the
/// shape from the model (and reads only `format` and `full_precision_matrix_mult`), so the key
/// is for readers of the file, which cannot tell padding from data otherwise.
fn comfy_quant_json(format: QuantFormat, shape: (usize, usize), stored: (usize, usize)) -> Vec<u8> {
    let mut json = format!("{{\"format\": \"{}\"", format.comfy_quant_name());
    if stored != shape {
        json.push_str(&format!(", \"orig_shape\": [{}, {}]", shape.0, shape.1));
    }
    json.push('}');
    json.into_bytes()
}

/// The output tensors of a quantized weight, in the order they are written.
fn weight_specs(weight: &str, format: QuantFormat, w: &QuantizedWeight) -> Vec<TensorSpec> {
    let layer = weight.strip_suffix(".weight").unwrap_or(weight);
    let spec = |suffix: &str, dtype, shape: Vec<usize>| TensorSpec {
        name: format!("{layer}.{suffix}"),
        dtype,
        shape: shape.into_iter().map(|d| d as u64).collect(),
    };
    let (sr, sc) = (w.stored_rows, w.stored_cols);
    let blocked = |grid_cols| {
        let (r, c) = blockfp::blocked_shape(sr, grid_cols);
        vec![r, c]
    };
    let mut specs = match format {
        QuantFormat::Fp8 => vec![
            spec("weight", Dtype::F8E4M3, vec![sr, sc]),
            spec("weight_scale", Dtype::F32, vec![]),
        ],
        QuantFormat::Nvfp4 => vec![
            spec("weight", Dtype::U8, vec![sr, format.row_bytes(sc)]),
            spec(
                "weight_scale",
                Dtype::F8E4M3,
                blocked(format.row_blocks(sc)),
            ),
            spec("weight_scale_2", Dtype::F32, vec![]),
        ],
        QuantFormat::Mxfp8 => vec![
            spec("weight", Dtype::F8E4M3, vec![sr, sc]),
            spec("weight_scale", Dtype::U8, blocked(format.row_blocks(sc))),
        ],
    };
    specs.push(spec("comfy_quant", Dtype::U8, vec![w.comfy_quant.len()]));
    specs
}

fn check_unique(path: &Path, specs: &[TensorSpec]) -> Result<(), ComfyQuantError> {
    let mut seen = HashSet::new();
    match specs.iter().find(|s| !seen.insert(s.name.as_str())) {
        Some(s) => Err(ComfyQuantError::tensor(
            path,
            &s.name,
            "two output tensors would have this name (the source already has a tensor named \
             like a quantized layer's scale or comfy_quant)",
        )),
        None => Ok(()),
    }
}

/// What the planning pass found in a weight.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Scan {
    /// Largest |value| among the finite values.
    amax: f32,
    non_finite: bool,
    /// An mxfp8 block with 0 < max |value| < [`MXFP8_MIN_BLOCK_MAX`].
    tiny_block: bool,
}

impl Scan {
    fn merge(self, other: Scan) -> Scan {
        Scan {
            amax: self.amax.max(other.amax),
            non_finite: self.non_finite || other.non_finite,
            tiny_block: self.tiny_block || other.tiny_block,
        }
    }

    /// Why the format cannot hold the weight, if it cannot.
    fn unfit(&self, format: QuantFormat) -> Option<&'static str> {
        if self.non_finite {
            Some("NaN or infinite values")
        } else if format == QuantFormat::Mxfp8 && self.tiny_block {
            Some("a block of 32 values too small for an E8M0 scale (max |value| below 2^-117)")
        } else {
            None
        }
    }

    /// The scan of `values`, rows of `row_len` values each (mxfp8 blocks start at each row).
    /// Works on the bits: for finite floats, `|x|` orders as its bits with the sign cleared,
    /// which keeps the loops free of branches (vectorized).
    fn of(values: &[f32], row_len: usize) -> Scan {
        let mut scan = Scan::default();
        for row in values.chunks(row_len.max(1)) {
            for block in row.chunks(blockfp::MXFP8_GROUP) {
                let (max, non_finite) =
                    block_max(block.iter().map(|x| x.to_bits()), 0x7fff_ffff, 0x7f80_0000);
                scan.add_block(f32::from_bits(max), non_finite);
            }
        }
        scan
    }

    /// The scan of raw little-endian 16-bit values of `dtype` (BF16 or F16), rows of `row_len`
    /// values each: the same answer as [`Scan::of`] of their exact widening to f32, without
    /// widening them. Without `blocks` (a format with no E8M0 block scales), `tiny_block` is
    /// not looked for, and the values are scanned in lanes reduced once at the end.
    fn of_16_bit(raw: &[u8], dtype: Dtype, row_len: usize, blocks: bool) -> Scan {
        let (infinity, widen): (i16, fn(u32) -> f32) = match dtype {
            Dtype::BF16 => (0x7f80, |b| f32::from_bits(b << 16)),
            _ => (0x7c00, |b| half::f16::from_bits(b as u16).to_f32()),
        };
        let mut scan = Scan::default();
        if !blocks {
            let (max, non_finite) = lanes_max_16(raw, infinity);
            scan.add_block(widen(u32::from(max)), non_finite);
            scan.tiny_block = false;
            return scan;
        }
        for row in raw.chunks(2 * row_len.max(1)) {
            for block in row.chunks(2 * blockfp::MXFP8_GROUP) {
                let (max, non_finite) = lanes_max_16(block, infinity);
                scan.add_block(widen(u32::from(max)), non_finite);
            }
        }
        scan
    }

    /// Adds a block whose largest finite magnitude is `max`.
    fn add_block(&mut self, max: f32, non_finite: bool) {
        self.non_finite |= non_finite;
        self.amax = self.amax.max(max);
        self.tiny_block |= max > 0.0 && max < MXFP8_MIN_BLOCK_MAX;
    }
}

/// The largest magnitude (bits with the sign cleared) below `infinity` among the raw
/// little-endian 16-bit values `raw`, and whether any reached it (a NaN or an infinity).
/// Magnitudes fit in `i16`, whose lane-wise max SSE2 has; 32 lanes are reduced once.
fn lanes_max_16(raw: &[u8], infinity: i16) -> (u16, bool) {
    const LANES: usize = 32;
    let (mut max, mut over) = ([0i16; LANES], [0i16; LANES]);
    let mut fold = |lane: usize, pair: &[u8]| {
        let m = (u16::from_le_bytes([pair[0], pair[1]]) & 0x7fff) as i16;
        let finite = m < infinity;
        max[lane] = max[lane].max(if finite { m } else { 0 });
        over[lane] |= i16::from(!finite);
    };
    let chunks = raw.chunks_exact(2 * LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        let chunk: &[u8; 2 * LANES] = chunk.try_into().expect("chunks_exact");
        for lane in 0..LANES {
            fold(lane, &chunk[2 * lane..2 * lane + 2]);
        }
    }
    for (lane, pair) in rest.chunks_exact(2).enumerate() {
        fold(lane, pair);
    }
    let m = max.iter().copied().max().unwrap_or(0);
    (m as u16, over.iter().any(|&o| o != 0))
}

/// The largest magnitude bits (`bits & magnitude`) below `infinity` among `bits`, and whether
/// any reached it (a NaN or an infinity).
#[inline(always)]
fn block_max(bits: impl Iterator<Item = u32>, magnitude: u32, infinity: u32) -> (u32, bool) {
    bits.fold((0, false), |(max, non_finite), b| {
        let m = b & magnitude;
        let finite = m < infinity;
        (max.max(if finite { m } else { 0 }), non_finite | !finite)
    })
}

/// Reads weight `index` (`rows` x `cols`) once, in parallel chunks of whole rows (or, for rows
/// longer than a chunk, of block-aligned parts of a row).
fn scan_weight(
    source: &dyn TensorSource,
    index: usize,
    rows: usize,
    cols: usize,
    format: QuantFormat,
) -> Result<Scan, ComfyQuantError> {
    let blocks = format == QuantFormat::Mxfp8;
    let dtype = source.tensors()[index].dtype;
    let segments: Vec<(usize, usize)> = if cols <= SCAN_ELEMS {
        let per = SCAN_ELEMS / cols;
        (0..rows)
            .step_by(per)
            .map(|r| (r * cols, per.min(rows - r) * cols))
            .collect()
    } else {
        (0..rows)
            .flat_map(|r| {
                (0..cols)
                    .step_by(SCAN_ELEMS)
                    .map(move |c| (r * cols + c, SCAN_ELEMS.min(cols - c)))
            })
            .collect()
    };
    segments
        .par_iter()
        .map(|&(start, len)| {
            match dtype {
                // 16-bit weights are scanned as they are stored (half the bytes, no widening).
                Dtype::BF16 | Dtype::F16 => crate::scratch::with_bytes(2 * len, |raw| {
                    source.read_raw(index, 2 * start as u64, raw)?;
                    Ok(Scan::of_16_bit(raw, dtype, cols.min(len), blocks))
                }),
                _ => crate::scratch::with_zeroed(len, |values| {
                    source.read_f32(index, start as u64, values)?;
                    Ok(Scan::of(values, cols.min(len)))
                }),
            }
        })
        .try_reduce(Scan::default, |a, b| Ok(a.merge(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comfy_quant_json_is_what_python_writes() {
        let j = |f, shape, stored| String::from_utf8(comfy_quant_json(f, shape, stored)).unwrap();
        assert_eq!(
            j(QuantFormat::Nvfp4, (64, 64), (64, 64)),
            r#"{"format": "nvfp4"}"#
        );
        assert_eq!(
            j(QuantFormat::Fp8, (3, 5), (3, 5)),
            r#"{"format": "float8_e4m3fn"}"#
        );
        assert_eq!(
            j(QuantFormat::Mxfp8, (130, 96), (160, 96)),
            r#"{"format": "mxfp8", "orig_shape": [130, 96]}"#
        );
    }

    #[test]
    fn scans_of_16_bit_weights_equal_scans_of_their_widening() {
        // Every 16-bit pattern (NaN, infinities, subnormals, both zeros) in rows of 96 values
        // (3 mxfp8 blocks), and runs of tiny values that make a tiny block.
        for dtype in [Dtype::BF16, Dtype::F16] {
            let widen = |b: u16| match dtype {
                Dtype::BF16 => f32::from_bits(u32::from(b) << 16),
                _ => half::f16::from_bits(b).to_f32(),
            };
            let mut bits: Vec<u16> = (0..=u16::MAX).collect();
            bits.extend(std::iter::repeat_n(1u16, 96));
            for chunk in bits.chunks(96 * 8) {
                let raw: Vec<u8> = chunk.iter().flat_map(|b| b.to_le_bytes()).collect();
                let values: Vec<f32> = chunk.iter().map(|&b| widen(b)).collect();
                let (a, b) = (
                    Scan::of_16_bit(&raw, dtype, 96, true),
                    Scan::of(&values, 96),
                );
                assert_eq!(a, b, "{dtype:?} at {:#06x}", chunk[0]);
                let lanes = Scan::of_16_bit(&raw, dtype, 96, false);
                assert_eq!((lanes.amax, lanes.non_finite), (b.amax, b.non_finite));
            }
            let finite: Vec<u8> = [0x0001u16, 0x3c00, 0x8002]
                .iter()
                .flat_map(|b| b.to_le_bytes())
                .collect();
            let s = Scan::of_16_bit(&finite, dtype, 3, false);
            assert_eq!(s.amax, widen(0x3c00));
            assert!(!s.non_finite);
        }
    }

    #[test]
    fn scans_find_amax_non_finite_and_tiny_blocks() {
        let mut v = vec![0.5f32; 64];
        v[3] = -2.0;
        let s = Scan::of(&v, 64);
        assert_eq!((s.amax, s.non_finite, s.tiny_block), (2.0, false, false));
        v[40] = f32::NAN;
        assert!(Scan::of(&v, 64).non_finite);
        // A row of 32 tiny values next to a row of normal ones.
        let mut v = vec![1e-36f32; 32];
        v.extend([1.0f32; 32]);
        let s = Scan::of(&v, 32);
        assert!(s.tiny_block);
        assert!(s.unfit(QuantFormat::Mxfp8).is_some());
        assert_eq!(s.unfit(QuantFormat::Nvfp4), None);
        // All-zero blocks are fine (code 0 and zero data, as comfy-kitchen writes them).
        assert!(!Scan::of(&[0.0f32, -0.0], 2).tiny_block);
    }
}
