//! Executing a [`Plan`]: the output streams through [`tensorfile::pipeline::stream`] in pieces
//! (windows of a tensor; the tail of a quantized weight), each converted in parallel tasks of
//! whole blocks or rows while the previous piece is written.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Mutex, PoisonError};

use rayon::prelude::*;
use serde::Serialize;
use tensorfile::cast::{CastStats, cast_slice};
use tensorfile::pipeline::{self, StreamError};
use tensorfile::safetensors::Dtype;
use tensorfile::safetensors::writer::encode_header;
use tensorfile::{ReadBuffer, SourceTensor, TensorSource};

use crate::codes::{DYNAMIC_MAP_BITS, FP4_BITS, NF4_BITS};
use crate::error::BnbError;
use crate::kernels::{
    self, BLOCKSIZE, NESTED_BLOCKSIZE, QuantType, Quantizer4, decode_nested_absmax,
    dequantize_int8_rows, double_quant, quantize_4bit, quantize_int8_rows,
};
use crate::plan::{Plan, Step};
use crate::quant_state::QuantStateJson;

/// Elements per window: bounds the memory of one piece (its source bytes, its output, one f32
/// sub-chunk per thread), whatever the tensor's size.
const WINDOW: usize = 1 << 22;
/// Elements per parallel task inside a window (a multiple of the 4-bit block size).
const SUB: usize = 1 << 16;
/// Bytes per piece of a tensor copied unchanged.
const COPY_BYTES: usize = 1 << 23;

/// What a conversion did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Target precision (canonical name: `nf4`, `fp4`, `int8`, or `fp16`/`bf16`/`fp32` for a
    /// dequantization).
    pub target: String,
    /// The dtype of unquantized float tensors (and the 4-bit quant states' `dtype`), or the
    /// dequantization's output dtype (`BF16`, `F16`, `F32`).
    pub float_dtype: String,
    /// Whether absmax was double-quantized.
    pub double_quant: bool,
    /// Weights quantized.
    pub quantized: u64,
    /// Weights dequantized.
    pub dequantized: u64,
    /// Tensors cast to `float_dtype`.
    pub cast: u64,
    /// Tensors copied unchanged.
    pub copied: u64,
    /// Source tensor bytes read (auxiliaries of a dequantized weight included).
    pub source_bytes: u64,
    /// Output tensors written.
    pub output_tensors: u64,
    /// Output file size (header included).
    pub output_bytes: u64,
    /// Finite values that overflowed to ±inf in casts (e.g. f32 values beyond bf16/fp16 range).
    pub cast_overflowed: u64,
    /// NaN/inf values produced by casts.
    pub cast_non_finite: u64,
}

/// What one piece of the output holds. Tensors are positions in the source's tensor list.
#[derive(Debug, Clone, Copy)]
enum Work<'p> {
    /// The packed codes of elements `start..start + len` of a 4-bit weight; the absmax of their
    /// blocks is kept for the tail.
    Codes4 {
        src: usize,
        state: &'p QuantStateJson,
        start: usize,
        len: usize,
    },
    /// The rest of a 4-bit weight's tensors: absmax, quant_map, [nested_absmax,
    /// nested_quant_map,] the quant-state JSON.
    Tail4 {
        state: &'p QuantStateJson,
        json_len: usize,
        weight: &'p str,
    },
    /// The int8 codes of rows `row..row + rows` of a weight; their SCB is kept for the tail.
    Rows8 { src: usize, row: usize, rows: usize },
    /// An int8 weight's `SCB` and `weight_format`.
    Tail8 { weight: &'p str },
    /// Elements `start..start + len` of a tensor cast to `dst`.
    Cast {
        src: usize,
        dst: Dtype,
        start: usize,
        len: usize,
    },
    /// Bytes of a tensor from `offset`, unchanged (as many as the piece holds).
    Copy { src: usize, offset: u64 },
    /// Elements `start..start + len` of a 4-bit weight decoded to `dst` (the absmax are decoded
    /// by the first window).
    Dequant4 {
        weight: usize,
        absmax: usize,
        nested: Option<(usize, usize)>,
        state: &'p QuantStateJson,
        dst: Dtype,
        start: usize,
        len: usize,
    },
    /// Rows `row..row + rows` of an int8 weight decoded to `dst` (its SCB is read by the first).
    DequantRows8 {
        weight: usize,
        scb: usize,
        dst: Dtype,
        row: usize,
        rows: usize,
    },
    /// No bytes: the progress of a step with nothing to write (an empty tensor).
    Nothing,
}

/// A unit of the stream: its work, its exact output size, and the progress it makes.
type Piece<'p> = pipeline::Unit<Work<'p>>;

/// What a weight's pieces hand to the next piece of the same weight. Pieces are produced one
/// at a time, in order, so the lock is never contended.
#[derive(Debug, Default)]
struct Carry {
    /// The source bytes of the current window (page-aligned, reused).
    read: ReadBuffer,
    /// The absmax of the 4-bit weight being quantized, or the decoded absmax of the one being
    /// dequantized.
    absmax: Vec<f32>,
    /// The SCB of the int8 weight being quantized or dequantized.
    scb: Vec<f32>,
    /// Cast statistics so far.
    stats: CastStats,
}

/// Runs `plan` (from [`crate::plan()`], [`crate::plan_dequantize`] or
/// [`crate::plan_dequantize_file`]) over `source`, writing a safetensors file with `metadata`
/// to `out`. `progress` gets (source bytes done, source tensors done) after each piece written;
/// it ends at ([`Plan::source_bytes`], [`Plan::source_tensors`]).
pub fn convert<W: Write>(
    source: &dyn TensorSource,
    plan: &Plan,
    metadata: &BTreeMap<String, String>,
    mut out: W,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, BnbError> {
    source.check_unchanged()?;
    run(source, plan, metadata, &mut out, progress).map_err(|e| e.in_file(source.path()))
}

/// Refuses a plan made from other tensors than `source` serves.
fn check_same_tensors(source: &dyn TensorSource, plan: &Plan) -> Result<(), BnbError> {
    let ours = source.tensors();
    if let Some((t, _)) = plan
        .tensors
        .iter()
        .zip(ours)
        .find(|(planned, served)| planned != served)
    {
        return Err(BnbError::PlanMismatch(format!(
            "tensor `{}` differs",
            t.name.escape_debug()
        )));
    }
    if ours.len() != plan.tensors.len() {
        return Err(BnbError::PlanMismatch(format!(
            "the source has {} tensors, the plan {}",
            ours.len(),
            plan.tensors.len()
        )));
    }
    Ok(())
}

fn run<W: Write>(
    source: &dyn TensorSource,
    plan: &Plan,
    metadata: &BTreeMap<String, String>,
    out: &mut W,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, BnbError> {
    check_same_tensors(source, plan)?;
    let mut report = Report {
        target: plan.target.canonical_name().to_string(),
        float_dtype: plan.float_dtype.as_str().to_string(),
        double_quant: plan.double_quant,
        output_tensors: plan.specs.len() as u64,
        output_bytes: plan.output_len(metadata)?,
        ..Report::default()
    };
    for step in &plan.steps {
        match step {
            Step::Quant4 { .. } | Step::Int8 { .. } => report.quantized += 1,
            Step::Cast { .. } => report.cast += 1,
            Step::Copy { .. } => report.copied += 1,
            Step::Dequant4 { .. } | Step::DequantInt8 { .. } => report.dequantized += 1,
        }
    }
    let pieces = pieces(plan)?;
    out.write_all(&encode_header(&plan.specs, metadata)?)?;
    let converter = Converter {
        source,
        tensors: &plan.tensors,
        carry: Mutex::new(Carry::default()),
    };
    let mut done = (0u64, 0u64);
    pipeline::stream(
        pieces,
        out,
        &|piece: &Piece<'_>, dst: &mut [u8]| converter.produce(piece, dst),
        &mut |piece: &Piece<'_>| {
            done.0 += piece.source_bytes;
            done.1 += piece.tensors_done;
            progress(done.0, done.1);
        },
    )
    .map_err(|e| match e {
        StreamError::Produce(e) => e,
        StreamError::Write(e) => BnbError::Io(e),
        // No cancel flag is passed: a caller cancels through the writer it hands over.
    })?;
    out.flush()?;
    let stats = converter
        .carry
        .into_inner()
        .map_or_else(|poisoned| poisoned.into_inner().stats, |carry| carry.stats);
    report.source_bytes = done.0;
    report.cast_overflowed = stats.overflowed;
    report.cast_non_finite = stats.non_finite;
    Ok(report)
}

fn elem_size(d: Dtype) -> usize {
    (d.bits() / 8) as usize
}

fn n_elements(t: &SourceTensor) -> Result<usize, BnbError> {
    usize::try_from(t.n_elements())
        .map_err(|_| BnbError::tensor(&t.name, "too many elements for this platform"))
}

/// Rows and columns of a 2-D tensor.
fn rows_cols(t: &SourceTensor) -> Result<(usize, usize), BnbError> {
    let dim = |d: u64| {
        usize::try_from(d)
            .map_err(|_| BnbError::tensor(&t.name, "too many elements for this platform"))
    };
    match t.shape[..] {
        [rows, cols] => {
            n_elements(t)?;
            Ok((dim(rows)?, dim(cols)?))
        }
        _ => Err(BnbError::tensor(&t.name, "is not 2-D")),
    }
}

/// `(start, len)` of consecutive windows of `size` covering `0..n`.
fn windows(n: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(size)
        .map(move |start| (start, size.min(n - start)))
}

/// The share of `total` source bytes of elements `start..end` of `n`: shares of consecutive
/// windows add up to `total` exactly.
fn share(total: u64, n: usize, start: usize, end: usize) -> u64 {
    let at = |i: usize| (u128::from(total) * i as u128 / n.max(1) as u128) as u64;
    at(end) - at(start)
}

/// The pieces of `plan`, in output order; checks that they write exactly the planned tensors.
fn pieces(plan: &Plan) -> Result<Vec<Piece<'_>>, BnbError> {
    let tensors = &plan.tensors;
    let mut all = Vec::new();
    let mut spec_at = 0;
    for step in &plan.steps {
        let mut step_pieces = Vec::new();
        let mut window = |work, out_len, source_bytes| {
            step_pieces.push(Piece {
                work,
                out_len,
                source_bytes,
                tensors_done: 0,
                // A step's pieces hand its state on; the step's last one ends it.
                carries_state: true,
            })
        };
        // The tensor read window by window (the others' bytes count when the step ends).
        let main = match step {
            Step::Quant4 {
                src,
                state,
                json_len,
            } => {
                let t = &tensors[*src];
                let n = n_elements(t)?;
                for (start, len) in windows(n, WINDOW) {
                    let work = Work::Codes4 {
                        src: *src,
                        state,
                        start,
                        len,
                    };
                    let bytes = share(t.source_bytes, n, start, start + len);
                    window(work, len.div_ceil(2), bytes);
                }
                let blocks = n.div_ceil(BLOCKSIZE);
                let stats = match state.nested {
                    Some(_) => blocks + 16 * 4 + 4 * blocks.div_ceil(NESTED_BLOCKSIZE) + 256 * 4,
                    None => 4 * blocks + 16 * 4,
                };
                let tail = Work::Tail4 {
                    state,
                    json_len: *json_len,
                    weight: &t.name,
                };
                window(tail, stats + json_len, 0);
                *src
            }
            Step::Int8 { src } => {
                let t = &tensors[*src];
                let (rows, cols) = rows_cols(t)?;
                let n = rows * cols;
                for (row, nr) in windows(rows, (WINDOW / cols.max(1)).max(1)) {
                    let work = Work::Rows8 {
                        src: *src,
                        row,
                        rows: nr,
                    };
                    let bytes = share(t.source_bytes, n, row * cols, (row + nr) * cols);
                    window(work, nr * cols, bytes);
                }
                window(Work::Tail8 { weight: &t.name }, 4 * rows + 1, 0);
                *src
            }
            Step::Cast { src, dst } => {
                let t = &tensors[*src];
                let n = n_elements(t)?;
                for (start, len) in windows(n, WINDOW) {
                    let work = Work::Cast {
                        src: *src,
                        dst: *dst,
                        start,
                        len,
                    };
                    let bytes = share(t.source_bytes, n, start, start + len);
                    window(work, len * elem_size(*dst), bytes);
                }
                *src
            }
            Step::Copy { src } => {
                let t = &tensors[*src];
                let len = t
                    .byte_len()
                    .and_then(|l| usize::try_from(l).ok())
                    .ok_or_else(|| BnbError::tensor(&t.name, "too large for this platform"))?;
                for (offset, n) in windows(len, COPY_BYTES) {
                    let work = Work::Copy {
                        src: *src,
                        offset: offset as u64,
                    };
                    window(work, n, share(t.source_bytes, len, offset, offset + n));
                }
                *src
            }
            Step::Dequant4 {
                weight,
                absmax,
                nested,
                state,
                dst,
                ..
            } => {
                let t = &tensors[*weight];
                let n = usize::try_from(state.n_elements().unwrap_or(u64::MAX)).map_err(|_| {
                    BnbError::tensor(&t.name, "too many elements for this platform")
                })?;
                for (start, len) in windows(n, WINDOW) {
                    let work = Work::Dequant4 {
                        weight: *weight,
                        absmax: *absmax,
                        nested: *nested,
                        state,
                        dst: *dst,
                        start,
                        len,
                    };
                    let bytes = share(t.source_bytes, n, start, start + len);
                    window(work, len * elem_size(*dst), bytes);
                }
                *weight
            }
            Step::DequantInt8 {
                weight, scb, dst, ..
            } => {
                let t = &tensors[*weight];
                let (rows, cols) = rows_cols(t)?;
                let n = rows * cols;
                // An empty weight writes nothing (its SCB is not even read).
                let rows_written = if n == 0 { 0 } else { rows };
                for (row, nr) in windows(rows_written, (WINDOW / cols.max(1)).max(1)) {
                    let work = Work::DequantRows8 {
                        weight: *weight,
                        scb: *scb,
                        dst: *dst,
                        row,
                        rows: nr,
                    };
                    let bytes = share(t.source_bytes, n, row * cols, (row + nr) * cols);
                    window(work, nr * cols * elem_size(*dst), bytes);
                }
                *weight
            }
        };
        // The step's other tensors (auxiliaries of a dequantized weight) count with its last
        // piece, as do the tensors it finishes.
        let sources = step.sources();
        let others = sources
            .iter()
            .filter(|&&i| i != main)
            .map(|&i| tensors[i].source_bytes)
            .sum::<u64>();
        Piece::close_step(
            &mut step_pieces,
            Work::Nothing,
            others,
            sources.len() as u64,
        );
        let specs = plan
            .specs
            .get(spec_at..spec_at + step.outputs())
            .unwrap_or_default();
        spec_at += step.outputs();
        let planned = specs
            .iter()
            .map(|s| s.byte_len().and_then(|l| usize::try_from(l).ok()))
            .try_fold(0usize, |a, l| a.checked_add(l?));
        let written = step_pieces.iter().map(|p| p.out_len).sum::<usize>();
        if planned != Some(written) {
            return Err(BnbError::PlanMismatch(format!(
                "the output tensors of `{}` do not match its conversion",
                tensors[main].name.escape_debug()
            )));
        }
        all.extend(step_pieces);
    }
    if spec_at != plan.specs.len() {
        return Err(BnbError::PlanMismatch(
            "more output tensors than conversion steps".into(),
        ));
    }
    Ok(all)
}

fn cast_err(name: &str, e: tensorfile::CastError) -> BnbError {
    BnbError::tensor(name, e.to_string())
}

/// Decodes `bytes` of dtype `src` to f32, rounding through `via` first when it differs (torch's
/// `.to(via).float()`).
fn to_f32(
    name: &str,
    src: Dtype,
    bytes: &[u8],
    via: Dtype,
) -> Result<(Vec<f32>, CastStats), BnbError> {
    let n = bytes.len() / elem_size(src);
    let mut stats = CastStats::default();
    let staged;
    let (from, from_bytes) = if via != src && via != Dtype::F32 {
        let mut buf = vec![0u8; n * elem_size(via)];
        stats += cast_slice(src, bytes, via, &mut buf).map_err(|e| cast_err(name, e))?;
        staged = buf;
        (via, &staged[..])
    } else {
        (src, bytes)
    };
    let mut out = vec![0f32; n];
    stats += tensorfile::widen_to_f32(from, from_bytes, &mut out).map_err(|e| cast_err(name, e))?;
    Ok((out, stats))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn table_bytes(bits: &[u32]) -> Vec<u8> {
    bits.iter().flat_map(|b| b.to_le_bytes()).collect()
}

/// Reads elements `start..start + len` of tensor `index` (`t`) into `buf`.
fn read_window<'b>(
    source: &dyn TensorSource,
    index: usize,
    t: &SourceTensor,
    start: usize,
    len: usize,
    buf: &'b mut ReadBuffer,
) -> Result<&'b [u8], BnbError> {
    let es = elem_size(t.dtype);
    let bytes = buf.get(len * es, WINDOW * es);
    source.read_raw(index, (start * es) as u64, bytes)?;
    Ok(bytes)
}

/// All bytes of a small (auxiliary) tensor.
fn read_small(source: &dyn TensorSource, index: usize) -> Result<Vec<u8>, BnbError> {
    let t = &source.tensors()[index];
    let len = t
        .byte_len()
        .and_then(|l| usize::try_from(l).ok())
        .ok_or_else(|| BnbError::tensor(&t.name, "too large for this platform"))?;
    let mut bytes = vec![0u8; len];
    source.read_raw(index, 0, &mut bytes)?;
    Ok(bytes)
}

/// Quantizes one window of `t` (its source `bytes`) to 4-bit `codes` and the `absmax` of its
/// blocks, in parallel tasks of [`SUB`] elements.
fn quantize_window(
    t: &SourceTensor,
    state: &QuantStateJson,
    bytes: &[u8],
    codes: &mut [u8],
    absmax: &mut [f32],
) -> Result<CastStats, BnbError> {
    let q = Quantizer4::new(state.quant_type);
    let es = elem_size(t.dtype);
    let len = bytes.len() / es;
    codes
        .par_chunks_mut(SUB / 2)
        .zip(absmax.par_chunks_mut(SUB / BLOCKSIZE))
        .enumerate()
        .map(|(i, (c, a))| {
            let e0 = i * SUB;
            let e1 = (e0 + SUB).min(len);
            let (x, stats) = to_f32(&t.name, t.dtype, &bytes[e0 * es..e1 * es], state.dtype)?;
            quantize_4bit(&q, &x, c, a);
            Ok::<_, BnbError>(stats)
        })
        .try_reduce(CastStats::default, |a, b| Ok(a + b))
}

/// Computes the nested (double-quant) offset of every 4-bit weight of `plan` from `source`, so
/// the quant-state JSON tensors get their exact `json.dumps` length instead of a reservation
/// padded with spaces. Reads each such weight once more; call it before
/// [`Plan::output_len`] and [`convert`]. Plans without double quantization are unchanged.
pub fn resolve_nested_offsets(source: &dyn TensorSource, plan: &mut Plan) -> Result<(), BnbError> {
    resolve(source, plan).map_err(|e| e.in_file(source.path()))
}

fn resolve(source: &dyn TensorSource, plan: &mut Plan) -> Result<(), BnbError> {
    check_same_tensors(source, plan)?;
    let Plan {
        steps,
        specs,
        tensors,
        ..
    } = plan;
    let mut read = ReadBuffer::new();
    let mut codes = vec![0u8; WINDOW / 2];
    for step in steps.iter_mut() {
        let Step::Quant4 {
            src,
            state,
            json_len,
        } = step
        else {
            continue;
        };
        if state.nested.is_none() {
            continue;
        }
        let t = &tensors[*src];
        let n = n_elements(t)?;
        let mut absmax = vec![0f32; n.div_ceil(BLOCKSIZE)];
        for (start, len) in windows(n, WINDOW) {
            let bytes = read_window(source, *src, t, start, len, &mut read)?;
            let am = &mut absmax[start / BLOCKSIZE..(start + len).div_ceil(BLOCKSIZE)];
            quantize_window(t, state, bytes, &mut codes[..len.div_ceil(2)], am)?;
        }
        let offset = f64::from(double_quant(&absmax).offset);
        if let Some(nested) = &mut state.nested {
            nested.offset = offset;
        }
        let exact = state.to_json_bytes().len();
        let name = format!(
            "{}{}{}",
            t.name,
            detect::detection::BNB_QUANT_STATE_MARK,
            state.quant_type.name()
        );
        let spec = specs
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| BnbError::tensor(&t.name, "quant-state tensor missing from the plan"))?;
        spec.shape = vec![exact as u64];
        *json_len = exact;
    }
    Ok(())
}

/// How f32 results are rounded to BF16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bf16Rounding {
    /// torch's `.to(torch.bfloat16)`.
    Torch,
    /// bnb's native CPU kernel (`float_to_bf16`: add 0x7FFF + lsb, shift), which differs from
    /// torch only in NaN bits.
    BnbNative,
}

/// Writes f32 values as `dst` into `out`.
fn emit(
    name: &str,
    vals: &[f32],
    dst: Dtype,
    bf16: Bf16Rounding,
    out: &mut [u8],
) -> Result<CastStats, BnbError> {
    match dst {
        Dtype::BF16 if bf16 == Bf16Rounding::BnbNative => {
            for (o, &v) in out.chunks_exact_mut(2).zip(vals) {
                o.copy_from_slice(&kernels::f32_to_bf16_bnb(v).to_le_bytes());
            }
            Ok(CastStats::default())
        }
        Dtype::F32 => {
            for (o, &v) in out.chunks_exact_mut(4).zip(vals) {
                o.copy_from_slice(&v.to_le_bytes());
            }
            Ok(CastStats::default())
        }
        _ => cast_slice(Dtype::F32, &f32_bytes(vals), dst, out).map_err(|e| cast_err(name, e)),
    }
}

/// Produces the pieces of a conversion.
struct Converter<'a> {
    source: &'a dyn TensorSource,
    tensors: &'a [SourceTensor],
    carry: Mutex<Carry>,
}

impl Converter<'_> {
    /// Fills `dst` with `piece`'s bytes.
    fn produce(&self, piece: &Piece<'_>, dst: &mut [u8]) -> Result<(), BnbError> {
        let mut carry = self.carry.lock().unwrap_or_else(PoisonError::into_inner);
        let Carry {
            read,
            absmax,
            scb,
            stats,
        } = &mut *carry;
        let source = self.source;
        match piece.work {
            Work::Codes4 {
                src,
                state,
                start,
                len,
            } => {
                let t = &self.tensors[src];
                if start == 0 {
                    *absmax = vec![0f32; n_elements(t)?.div_ceil(BLOCKSIZE)];
                }
                let bytes = read_window(source, src, t, start, len, read)?;
                let am = &mut absmax[start / BLOCKSIZE..(start + len).div_ceil(BLOCKSIZE)];
                *stats += quantize_window(t, state, bytes, dst, am)?;
            }
            Work::Tail4 {
                state,
                json_len,
                weight,
            } => {
                let absmax = std::mem::take(absmax);
                let tail = tail4(weight, state, json_len, &absmax)?;
                fill(dst, &tail, weight)?;
            }
            Work::Rows8 { src, row, rows } => {
                let t = &self.tensors[src];
                let (total_rows, cols) = rows_cols(t)?;
                if row == 0 {
                    *scb = vec![0f32; total_rows];
                }
                let es = elem_size(t.dtype);
                let bytes = read_window(source, src, t, row * cols, rows * cols, read)?;
                let task_rows = (SUB / cols).max(1);
                *stats += dst
                    .par_chunks_mut(task_rows * cols)
                    .zip(scb[row..row + rows].par_chunks_mut(task_rows))
                    .enumerate()
                    .map(|(i, (qc, sc))| {
                        let a = i * task_rows * cols;
                        let b = a + qc.len();
                        let (x, stats) =
                            to_f32(&t.name, t.dtype, &bytes[a * es..b * es], Dtype::F16)?;
                        let mut q = vec![0i8; qc.len()];
                        quantize_int8_rows(&x, cols, &mut q, sc);
                        for (d, v) in qc.iter_mut().zip(q) {
                            *d = v as u8;
                        }
                        Ok::<_, BnbError>(stats)
                    })
                    .try_reduce(CastStats::default, |a, b| Ok(a + b))?;
            }
            Work::Tail8 { weight } => {
                let mut tail = f32_bytes(&std::mem::take(scb));
                // weight_format 0 = "row", the only layout bnb loads.
                tail.push(0);
                fill(dst, &tail, weight)?;
            }
            Work::Cast {
                src,
                dst: dtype,
                start,
                len,
            } => {
                let t = &self.tensors[src];
                let bytes = read_window(source, src, t, start, len, read)?;
                *stats += tensorfile::cast::cast_slice_par(t.dtype, bytes, dtype, dst)
                    .map_err(|err| cast_err(&t.name, err))?;
            }
            Work::Copy { src, offset } => source.read_raw(src, offset, dst)?,
            Work::Dequant4 {
                weight,
                absmax: absmax_index,
                nested,
                state,
                dst: dtype,
                start,
                len,
            } => {
                let t = &self.tensors[weight];
                let bs = usize::try_from(state.blocksize).unwrap_or(BLOCKSIZE);
                if start == 0 {
                    *absmax = decoded_absmax(source, absmax_index, nested, state)?;
                    let n = usize::try_from(state.n_elements().unwrap_or(u64::MAX))
                        .unwrap_or(usize::MAX);
                    // The planner checked these; a mismatch means the plan and data disagree.
                    if absmax.len() != n.div_ceil(bs) {
                        return Err(BnbError::tensor(
                            &t.name,
                            "absmax count does not match the shape",
                        ));
                    }
                }
                // Windows start at multiples of WINDOW, which is even and a multiple of every
                // bnb block size, so a window's codes start on a byte and its absmax on an
                // entry.
                debug_assert!(WINDOW.is_multiple_of(bs));
                let packed = read.get(len.div_ceil(2), WINDOW / 2);
                source.read_raw(weight, (start / 2) as u64, packed)?;
                let packed = &*packed;
                let am = &absmax[start / bs..];
                let table = state.quant_type.dequant_table(&state.shape);
                // bnb's CPU `dequantize_4bit` uses its native kernel unless the last dimension
                // is odd (then the PyTorch fallback, which rounds with torch).
                let bf16 = if state.shape.last().is_some_and(|d| d % 2 == 0) {
                    Bf16Rounding::BnbNative
                } else {
                    Bf16Rounding::Torch
                };
                let ds = elem_size(dtype);
                *stats += dst
                    .par_chunks_mut(SUB * ds)
                    .enumerate()
                    .map(|(i, o)| {
                        let mut vals = vec![0f32; o.len() / ds];
                        kernels::dequantize_4bit(&table, packed, am, bs, i * SUB, &mut vals);
                        emit(&t.name, &vals, dtype, bf16, o)
                    })
                    .try_reduce(CastStats::default, |a, b| Ok(a + b))?;
            }
            Work::DequantRows8 {
                weight,
                scb: scb_index,
                dst: dtype,
                row,
                rows,
            } => {
                let t = &self.tensors[weight];
                let (total_rows, cols) = rows_cols(t)?;
                if row == 0 {
                    *scb = f32s(&read_small(source, scb_index)?);
                    if scb.len() != total_rows
                        || t.byte_len() != Some(total_rows.saturating_mul(cols) as u64)
                    {
                        return Err(BnbError::tensor(
                            &t.name,
                            "SCB or weight size does not match the shape",
                        ));
                    }
                }
                let codes = read.get(rows * cols, WINDOW);
                source.read_raw(weight, (row * cols) as u64, codes)?;
                let codes = &*codes;
                let task_rows = (SUB / cols).max(1);
                let ds = elem_size(dtype);
                let scb = &scb[row..row + rows];
                *stats += dst
                    .par_chunks_mut(task_rows * cols * ds)
                    .enumerate()
                    .map(|(i, o)| {
                        let r = i * task_rows;
                        let nr = o.len() / ds / cols;
                        let q: Vec<i8> = codes[r * cols..(r + nr) * cols]
                            .iter()
                            .map(|&b| b as i8)
                            .collect();
                        let mut vals = vec![0f32; nr * cols];
                        dequantize_int8_rows(&q, cols, &scb[r..r + nr], &mut vals);
                        emit(&t.name, &vals, dtype, Bf16Rounding::Torch, o)
                    })
                    .try_reduce(CastStats::default, |a, b| Ok(a + b))?;
            }
            Work::Nothing => {}
        }
        Ok(())
    }
}

/// Copies a piece built whole into its slot of the stream.
fn fill(dst: &mut [u8], bytes: &[u8], tensor: &str) -> Result<(), BnbError> {
    if dst.len() != bytes.len() {
        return Err(BnbError::tensor(
            tensor,
            format!("{} bytes planned, {} produced", dst.len(), bytes.len()),
        ));
    }
    dst.copy_from_slice(bytes);
    Ok(())
}

/// The tensors after a 4-bit weight's codes, from its `absmax`: absmax (or its double
/// quantization), quant_map, [nested_absmax, nested_quant_map,] the quant-state JSON padded to
/// `json_len`.
fn tail4(
    weight: &str,
    state: &QuantStateJson,
    json_len: usize,
    absmax: &[f32],
) -> Result<Vec<u8>, BnbError> {
    let quant_map = match state.quant_type {
        QuantType::Nf4 => table_bytes(&NF4_BITS),
        QuantType::Fp4 => table_bytes(&FP4_BITS),
    };
    let mut state = state.clone();
    let mut tail = Vec::new();
    if let Some(nj) = &mut state.nested {
        let nq = double_quant(absmax);
        nj.offset = f64::from(nq.offset);
        tail.extend(&nq.codes);
        tail.extend(&quant_map);
        tail.extend(f32_bytes(&nq.nested_absmax));
        tail.extend(table_bytes(&DYNAMIC_MAP_BITS));
    } else {
        tail.extend(f32_bytes(absmax));
        tail.extend(&quant_map);
    }
    let mut json = state.to_json_bytes();
    if json.len() > json_len {
        return Err(BnbError::tensor(
            weight,
            "quant-state JSON longer than reserved",
        ));
    }
    // Only an unresolved double-quant state (no `resolve_nested_offsets`) can be shorter than its
    // reservation, the offset's digits being unknown when the header is written; JSON parsers
    // ignore the trailing spaces.
    json.resize(json_len, b' ');
    tail.extend(json);
    Ok(tail)
}

/// A 4-bit weight's absmax as f32, decoding a double-quantized one.
fn decoded_absmax(
    source: &dyn TensorSource,
    absmax: usize,
    nested: Option<(usize, usize)>,
    state: &QuantStateJson,
) -> Result<Vec<f32>, BnbError> {
    match (nested, &state.nested) {
        (Some((na, nm)), Some(nj)) => {
            let map: [f32; 256] = f32s(&read_small(source, nm)?).try_into().map_err(|_| {
                BnbError::tensor(
                    &source.tensors()[nm].name,
                    "nested_quant_map is not 256 values",
                )
            })?;
            let nbs = usize::try_from(nj.blocksize).unwrap_or(NESTED_BLOCKSIZE);
            Ok(decode_nested_absmax(
                &map,
                &read_small(source, absmax)?,
                &f32s(&read_small(source, na)?),
                nbs,
                nj.offset as f32,
            ))
        }
        _ => Ok(f32s(&read_small(source, absmax)?)),
    }
}
