//! Executing a [`Plan`]: streaming, tensor by tensor, large tensors in parallel windows.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;
use tensorfile::SafetensorsWriter;
use tensorfile::cast::{CastStats, cast_slice};
use tensorfile::safetensors::{Dtype, SafetensorsError, SafetensorsFile, TensorEntry};

use crate::codes::{DYNAMIC_MAP_BITS, FP4_BITS, NF4_BITS};
use crate::error::BnbError;
use crate::kernels::{
    self, BLOCKSIZE, NESTED_BLOCKSIZE, QuantType, Quantizer4, decode_nested_absmax,
    dequantize_int8_rows, double_quant, quantize_4bit, quantize_int8_rows,
};
use crate::plan::{Plan, QS_MARK, Step};

/// Elements per sequential window: bounds the extra memory of one tensor's conversion (output
/// window plus one f32 sub-chunk per thread), whatever the tensor's size.
const WINDOW: usize = 1 << 22;
/// Elements per parallel task inside a window (a multiple of the 4-bit block size).
const SUB: usize = 1 << 16;
/// Bytes per read of a tensor copied unchanged.
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

/// Where a conversion reads tensor bytes from, window by window: for a file,
/// [`SafetensorsFile::read_tensor_range`] (positioned reads, not its memory map).
pub trait TensorSource: Sync {
    /// The source's path, for error messages.
    fn path(&self) -> &Path;
    /// Every tensor of the source.
    fn entries(&self) -> &[TensorEntry];
    /// Fills `buf` with `entry`'s bytes starting `offset` bytes into the tensor. `entry` is one
    /// of [`TensorSource::entries`]; reading past its end is an error.
    fn read(&self, entry: &TensorEntry, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// A validated safetensors file, read with its positioned reads.
impl TensorSource for SafetensorsFile {
    fn path(&self) -> &Path {
        &self.path
    }
    fn entries(&self) -> &[TensorEntry] {
        &self.header.tensors
    }
    fn read(&self, entry: &TensorEntry, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_tensor_range(entry, offset, buf)
            .map_err(SafetensorsError::into_io_error)
    }
}

/// `len` bytes of `e` from `offset`.
fn read_vec<S: TensorSource>(
    src: &S,
    e: &TensorEntry,
    offset: usize,
    len: usize,
) -> Result<Vec<u8>, BnbError> {
    let mut buf = vec![0u8; len];
    src.read(e, offset as u64, &mut buf)
        .map_err(|source| BnbError::Read { source })?;
    Ok(buf)
}

/// All bytes of a (small, auxiliary) tensor.
fn read_all<S: TensorSource>(src: &S, e: &TensorEntry) -> Result<Vec<u8>, BnbError> {
    let len = usize::try_from(e.byte_len())
        .map_err(|_| BnbError::tensor(&e.name, "too large for this platform"))?;
    read_vec(src, e, 0, len)
}

/// Runs `plan` (from [`crate::plan()`], [`crate::plan_dequantize`] or
/// [`crate::plan_dequantize_file`]) over `src`, writing a safetensors file with `metadata` to
/// `out`. `progress` gets (source bytes done, source tensors done) after each step and each
/// window of a large tensor.
pub fn convert<W: Write>(
    src: &SafetensorsFile,
    plan: &Plan,
    metadata: &BTreeMap<String, String>,
    out: W,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, BnbError> {
    src.check_unchanged().map_err(|e| {
        BnbError::Read {
            source: e.into_io_error(),
        }
        .in_file(&src.path)
    })?;
    convert_from(src, plan, metadata, out, progress)
}

/// [`convert`] executing a dequantization plan (the same function; named for readability).
pub fn convert_dequantize<W: Write>(
    src: &SafetensorsFile,
    plan: &Plan,
    metadata: &BTreeMap<String, String>,
    out: W,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, BnbError> {
    convert(src, plan, metadata, out, progress)
}

/// [`convert`] over any [`TensorSource`].
pub fn convert_from<S: TensorSource, W: Write>(
    src: &S,
    plan: &Plan,
    metadata: &BTreeMap<String, String>,
    out: W,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, BnbError> {
    run(src, plan, metadata, out, progress).map_err(|e| e.in_file(src.path()))
}

fn run<S: TensorSource, W: Write>(
    src: &S,
    plan: &Plan,
    metadata: &BTreeMap<String, String>,
    out: W,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, BnbError> {
    let entries: HashMap<&str, &TensorEntry> =
        src.entries().iter().map(|e| (e.name.as_str(), e)).collect();
    for step in &plan.steps {
        for e in step.sources() {
            if entries.get(e.name.as_str()) != Some(&e) {
                return Err(BnbError::PlanMismatch(format!(
                    "tensor `{}` differs or is missing",
                    e.name.escape_debug()
                )));
            }
        }
    }
    let mut report = Report {
        target: plan.target.canonical_name().to_string(),
        float_dtype: plan.float_dtype.as_str().to_string(),
        double_quant: plan.double_quant,
        output_tensors: plan.specs.len() as u64,
        output_bytes: plan.output_len(metadata)?,
        ..Report::default()
    };
    let mut w = SafetensorsWriter::new(out, &plan.specs, metadata)?;
    let mut ctx = Ctx {
        bytes_done: 0,
        tensors_done: 0,
        progress,
        stats: CastStats::default(),
    };
    for step in &plan.steps {
        match step {
            Step::Quant4 {
                src: e,
                state,
                json_len,
            } => {
                quant4(src, e, state, *json_len, &mut w, &mut ctx)?;
                report.quantized += 1;
            }
            Step::Int8 { src: e } => {
                int8(src, e, &mut w, &mut ctx)?;
                report.quantized += 1;
            }
            Step::Cast { src: e, dst } => {
                cast(src, e, *dst, &mut w, &mut ctx)?;
                report.cast += 1;
            }
            Step::Copy { src: e } => {
                let len = usize::try_from(e.byte_len())
                    .map_err(|_| BnbError::tensor(&e.name, "too large for this platform"))?;
                for start in (0..len).step_by(COPY_BYTES) {
                    let n = COPY_BYTES.min(len - start);
                    w.write_chunk(&read_vec(src, e, start, n)?)?;
                    ctx.advance(n as u64, 0);
                }
                ctx.advance(0, 1);
                report.copied += 1;
            }
            Step::Dequant4 {
                weight,
                absmax,
                nested,
                aux,
                state,
                dst,
            } => {
                dequant4(
                    src,
                    weight,
                    absmax,
                    nested.as_ref(),
                    state,
                    *dst,
                    &mut w,
                    &mut ctx,
                )?;
                let aux_bytes: u64 = aux.iter().map(TensorEntry::byte_len).sum::<u64>()
                    + absmax.byte_len()
                    + nested
                        .as_ref()
                        .map_or(0, |(a, b)| a.byte_len() + b.byte_len());
                ctx.advance(
                    aux_bytes,
                    2 + aux.len() as u64 + 2 * nested.is_some() as u64,
                );
                report.dequantized += 1;
            }
            Step::DequantInt8 {
                weight,
                scb,
                aux,
                dst,
            } => {
                dequant_int8(src, weight, scb, *dst, &mut w, &mut ctx)?;
                let aux_bytes: u64 =
                    aux.iter().map(TensorEntry::byte_len).sum::<u64>() + scb.byte_len();
                ctx.advance(aux_bytes, 2 + aux.len() as u64);
                report.dequantized += 1;
            }
        }
    }
    w.finish()?;
    report.source_bytes = ctx.bytes_done;
    report.cast_overflowed = ctx.stats.overflowed;
    report.cast_non_finite = ctx.stats.non_finite;
    Ok(report)
}

struct Ctx<'a> {
    bytes_done: u64,
    tensors_done: u64,
    progress: &'a mut dyn FnMut(u64, u64),
    stats: CastStats,
}

impl Ctx<'_> {
    fn advance(&mut self, bytes: u64, tensors: u64) {
        self.bytes_done += bytes;
        self.tensors_done += tensors;
        (self.progress)(self.bytes_done, self.tensors_done);
    }
}

fn elem_size(d: Dtype) -> usize {
    (d.bits() / 8) as usize
}

fn n_elements(e: &TensorEntry) -> Result<usize, BnbError> {
    usize::try_from(e.n_elements())
        .map_err(|_| BnbError::tensor(&e.name, "too many elements for this platform"))
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

/// Receives one window's packed codes and the number of source bytes it covered.
type CodesSink<'a> = dyn FnMut(&[u8], usize) -> Result<(), BnbError> + 'a;

/// Quantizes `e` window by window: fills `absmax` and hands each window's packed codes to
/// `on_codes`. Returns the cast statistics.
fn quantize_windows<S: TensorSource>(
    src: &S,
    e: &TensorEntry,
    state: &crate::quant_state::QuantStateJson,
    absmax: &mut [f32],
    on_codes: &mut CodesSink<'_>,
) -> Result<CastStats, BnbError> {
    let q = Quantizer4::new(state.quant_type);
    let n = n_elements(e)?;
    let es = elem_size(e.dtype);
    let mut total = CastStats::default();
    for start in (0..n).step_by(WINDOW) {
        let len = WINDOW.min(n - start);
        let bytes = read_vec(src, e, start * es, len * es)?;
        let mut codes = vec![0u8; len.div_ceil(2)];
        let am = &mut absmax[start / BLOCKSIZE..(start + len).div_ceil(BLOCKSIZE)];
        let stats = codes
            .par_chunks_mut(SUB / 2)
            .zip(am.par_chunks_mut(SUB / BLOCKSIZE))
            .enumerate()
            .map(|(i, (c, a))| {
                let e0 = i * SUB;
                let e1 = (e0 + SUB).min(len);
                let (x, stats) = to_f32(&e.name, e.dtype, &bytes[e0 * es..e1 * es], state.dtype)?;
                quantize_4bit(&q, &x, c, a);
                Ok::<_, BnbError>(stats)
            })
            .try_reduce(CastStats::default, |a, b| Ok(a + b))?;
        total += stats;
        on_codes(&codes, len * es)?;
    }
    Ok(total)
}

/// Computes the nested (double-quant) offset of every 4-bit weight of `plan` from the source, so
/// the quant-state JSON tensors get their exact `json.dumps` length instead of a reservation
/// padded with spaces. Reads each such weight once more; call it before
/// [`Plan::output_len`] and [`convert`]. Plans without double quantization are unchanged.
pub fn resolve_nested_offsets<S: TensorSource>(src: &S, plan: &mut Plan) -> Result<(), BnbError> {
    for step in plan.steps.iter_mut() {
        let Step::Quant4 {
            src: e,
            state,
            json_len,
        } = step
        else {
            continue;
        };
        if state.nested.is_none() {
            continue;
        }
        let mut absmax = vec![0f32; n_elements(e)?.div_ceil(BLOCKSIZE)];
        quantize_windows(src, e, state, &mut absmax, &mut |_, _| Ok(()))?;
        let offset = f64::from(double_quant(&absmax).offset);
        if let Some(nested) = &mut state.nested {
            nested.offset = offset;
        }
        let exact = state.to_json_bytes().len();
        let name = format!("{}{QS_MARK}{}", e.name, state.quant_type.name());
        let spec = plan
            .specs
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| BnbError::tensor(&e.name, "quant-state tensor missing from the plan"))?;
        spec.shape = vec![exact as u64];
        *json_len = exact;
    }
    Ok(())
}

fn quant4<S: TensorSource, W: Write>(
    src: &S,
    e: &TensorEntry,
    state: &crate::quant_state::QuantStateJson,
    json_len: usize,
    w: &mut SafetensorsWriter<W>,
    ctx: &mut Ctx<'_>,
) -> Result<(), BnbError> {
    let n = n_elements(e)?;
    let mut absmax = vec![0f32; n.div_ceil(BLOCKSIZE)];
    let stats = quantize_windows(src, e, state, &mut absmax, &mut |codes, src_bytes| {
        w.write_chunk(codes)?;
        ctx.advance(src_bytes as u64, 0);
        Ok(())
    })?;
    ctx.stats += stats;
    let quant_map = match state.quant_type {
        QuantType::Nf4 => table_bytes(&NF4_BITS),
        QuantType::Fp4 => table_bytes(&FP4_BITS),
    };
    let mut state = state.clone();
    if let Some(nj) = &mut state.nested {
        let nq = double_quant(&absmax);
        nj.offset = f64::from(nq.offset);
        w.write_chunk(&nq.codes)?;
        w.write_chunk(&quant_map)?;
        w.write_chunk(&f32_bytes(&nq.nested_absmax))?;
        w.write_chunk(&table_bytes(&DYNAMIC_MAP_BITS))?;
    } else {
        w.write_chunk(&f32_bytes(&absmax))?;
        w.write_chunk(&quant_map)?;
    }
    let mut json = state.to_json_bytes();
    if json.len() > json_len {
        return Err(BnbError::tensor(
            &e.name,
            "quant-state JSON longer than reserved",
        ));
    }
    // Only an unresolved double-quant state (no `resolve_nested_offsets`) can be shorter than its
    // reservation, the offset's digits being unknown when the header is written; JSON parsers
    // ignore the trailing spaces.
    json.resize(json_len, b' ');
    w.write_chunk(&json)?;
    ctx.advance(0, 1);
    Ok(())
}

fn int8<S: TensorSource, W: Write>(
    src: &S,
    e: &TensorEntry,
    w: &mut SafetensorsWriter<W>,
    ctx: &mut Ctx<'_>,
) -> Result<(), BnbError> {
    let rows = usize::try_from(e.shape[0]).unwrap_or(usize::MAX);
    let cols = usize::try_from(e.shape[1]).unwrap_or(usize::MAX);
    n_elements(e)?;
    let es = elem_size(e.dtype);
    let mut scb = vec![0f32; rows];
    let window_rows = (WINDOW / cols).max(1);
    let task_rows = (SUB / cols).max(1);
    for r0 in (0..rows).step_by(window_rows) {
        let nr = window_rows.min(rows - r0);
        let bytes = read_vec(src, e, r0 * cols * es, nr * cols * es)?;
        let mut q = vec![0i8; nr * cols];
        let s = &mut scb[r0..r0 + nr];
        let stats = q
            .par_chunks_mut(task_rows * cols)
            .zip(s.par_chunks_mut(task_rows))
            .enumerate()
            .map(|(i, (qc, sc))| {
                let a = i * task_rows * cols;
                let b = a + qc.len();
                let (x, stats) = to_f32(&e.name, e.dtype, &bytes[a * es..b * es], Dtype::F16)?;
                quantize_int8_rows(&x, cols, qc, sc);
                Ok::<_, BnbError>(stats)
            })
            .try_reduce(CastStats::default, |a, b| Ok(a + b))?;
        ctx.stats += stats;
        let qb: Vec<u8> = q.iter().map(|&v| v as u8).collect();
        w.write_chunk(&qb)?;
        ctx.advance((nr * cols * es) as u64, 0);
    }
    w.write_chunk(&f32_bytes(&scb))?;
    // weight_format 0 = "row", the only layout bnb loads.
    w.write_chunk(&[0u8])?;
    ctx.advance(0, 1);
    Ok(())
}

fn cast<S: TensorSource, W: Write>(
    src: &S,
    e: &TensorEntry,
    dst: Dtype,
    w: &mut SafetensorsWriter<W>,
    ctx: &mut Ctx<'_>,
) -> Result<(), BnbError> {
    let n = n_elements(e)?;
    let (ss, ds) = (elem_size(e.dtype), elem_size(dst));
    for start in (0..n).step_by(WINDOW) {
        let len = WINDOW.min(n - start);
        let bytes = read_vec(src, e, start * ss, len * ss)?;
        let mut out = vec![0u8; len * ds];
        let stats = out
            .par_chunks_mut(SUB * ds)
            .enumerate()
            .map(|(i, o)| {
                let a = i * SUB;
                let b = a + o.len() / ds;
                cast_slice(e.dtype, &bytes[a * ss..b * ss], dst, o)
                    .map_err(|err| cast_err(&e.name, err))
            })
            .try_reduce(CastStats::default, |a, b| Ok(a + b))?;
        ctx.stats += stats;
        w.write_chunk(&out)?;
        ctx.advance((len * ss) as u64, 0);
    }
    ctx.advance(0, 1);
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

/// Writes f32 values as `dst`.
fn emit<W: Write>(
    name: &str,
    vals: &[f32],
    dst: Dtype,
    bf16: Bf16Rounding,
    w: &mut SafetensorsWriter<W>,
    ctx: &mut Ctx<'_>,
) -> Result<(), BnbError> {
    if dst == Dtype::BF16 && bf16 == Bf16Rounding::BnbNative {
        let out: Vec<u8> = vals
            .iter()
            .flat_map(|&v| kernels::f32_to_bf16_bnb(v).to_le_bytes())
            .collect();
        w.write_chunk(&out)?;
        return Ok(());
    }
    let f = f32_bytes(vals);
    if dst == Dtype::F32 {
        w.write_chunk(&f)?;
    } else {
        let mut out = vec![0u8; vals.len() * elem_size(dst)];
        ctx.stats += cast_slice(Dtype::F32, &f, dst, &mut out).map_err(|e| cast_err(name, e))?;
        w.write_chunk(&out)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn dequant4<S: TensorSource, W: Write>(
    src: &S,
    weight: &TensorEntry,
    absmax_e: &TensorEntry,
    nested: Option<&(TensorEntry, TensorEntry)>,
    state: &crate::quant_state::QuantStateJson,
    dst: Dtype,
    w: &mut SafetensorsWriter<W>,
    ctx: &mut Ctx<'_>,
) -> Result<(), BnbError> {
    let n = usize::try_from(state.n_elements().unwrap_or(u64::MAX))
        .map_err(|_| BnbError::tensor(&weight.name, "too many elements for this platform"))?;
    let bs = usize::try_from(state.blocksize).unwrap_or(BLOCKSIZE);
    let absmax = match (nested, &state.nested) {
        (Some((na, nm)), Some(nj)) => {
            let map_v = f32s(&read_all(src, nm)?);
            let map: [f32; 256] = map_v
                .try_into()
                .map_err(|_| BnbError::tensor(&nm.name, "nested_quant_map is not 256 values"))?;
            let nbs = usize::try_from(nj.blocksize).unwrap_or(NESTED_BLOCKSIZE);
            decode_nested_absmax(
                &map,
                &read_all(src, absmax_e)?,
                &f32s(&read_all(src, na)?),
                nbs,
                nj.offset as f32,
            )
        }
        _ => f32s(&read_all(src, absmax_e)?),
    };
    // The planner checked these; a mismatch here means the plan and data disagree.
    if absmax.len() != n.div_ceil(bs) || weight.byte_len() != n.div_ceil(2) as u64 {
        return Err(BnbError::tensor(
            &weight.name,
            "absmax or code count does not match the shape",
        ));
    }
    let table = state.quant_type.dequant_table(&state.shape);
    // bnb's CPU `dequantize_4bit` uses its native kernel unless the last dimension is odd (then
    // the PyTorch fallback, which rounds with torch).
    let bf16 = if state.shape.last().is_some_and(|d| d % 2 == 0) {
        Bf16Rounding::BnbNative
    } else {
        Bf16Rounding::Torch
    };
    // Windows start at multiples of WINDOW, which is even and a multiple of every bnb block
    // size, so a window's codes start on a byte and its absmax on an entry.
    debug_assert!(WINDOW.is_multiple_of(bs));
    for start in (0..n).step_by(WINDOW) {
        let len = WINDOW.min(n - start);
        let packed = read_vec(src, weight, start / 2, len.div_ceil(2))?;
        let am = &absmax[start / bs..];
        let mut vals = vec![0f32; len];
        vals.par_chunks_mut(SUB).enumerate().for_each(|(i, o)| {
            kernels::dequantize_4bit(&table, &packed, am, bs, i * SUB, o);
        });
        emit(&weight.name, &vals, dst, bf16, w, ctx)?;
        ctx.advance(len.div_ceil(2) as u64, 0);
    }
    Ok(())
}

fn dequant_int8<S: TensorSource, W: Write>(
    src: &S,
    weight: &TensorEntry,
    scb_e: &TensorEntry,
    dst: Dtype,
    w: &mut SafetensorsWriter<W>,
    ctx: &mut Ctx<'_>,
) -> Result<(), BnbError> {
    let rows = usize::try_from(weight.shape[0]).unwrap_or(usize::MAX);
    let cols = usize::try_from(weight.shape[1]).unwrap_or(usize::MAX);
    let scb = f32s(&read_all(src, scb_e)?);
    if rows == 0 || cols == 0 {
        return Ok(()); // an empty weight has no bytes to write
    }
    if scb.len() != rows || weight.byte_len() != rows.saturating_mul(cols) as u64 {
        return Err(BnbError::tensor(
            &weight.name,
            "SCB or weight size does not match the shape",
        ));
    }
    let window_rows = (WINDOW / cols).max(1);
    for r0 in (0..rows).step_by(window_rows) {
        let nr = window_rows.min(rows - r0);
        let raw = read_vec(src, weight, r0 * cols, nr * cols)?;
        let qi: Vec<i8> = raw.iter().map(|&b| b as i8).collect();
        let mut vals = vec![0f32; nr * cols];
        let task_rows = (SUB / cols).max(1);
        vals.par_chunks_mut(task_rows * cols)
            .zip(qi.par_chunks(task_rows * cols))
            .enumerate()
            .for_each(|(i, (o, qc))| {
                let r = r0 + i * task_rows;
                dequantize_int8_rows(qc, cols, &scb[r..r + qc.len() / cols], o);
            });
        emit(&weight.name, &vals, dst, Bf16Rounding::Torch, w, ctx)?;
        ctx.advance((nr * cols) as u64, 0);
    }
    Ok(())
}
