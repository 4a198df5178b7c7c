//! Executing a [`Plan`]: the output streams through [`tensorfile::pipeline::stream`] in pieces
//! (windows of rows of a quantized weight, then its tail of scales and `comfy_quant`; chunks of
//! the other tensors), each produced in parallel tasks of whole rows while the previous piece is
//! written.
//!
//! Memory: the pipeline's two piece buffers, one f32 buffer of a task's rows per thread, and
//! the block-scale grid of the weight being quantized (1/16 or 1/32 byte per element), which
//! its tail piece writes swizzled (`to_blocked`).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::{Mutex, PoisonError};

use rayon::prelude::*;
use serde::Serialize;
use tensorfile::blockfp;
use tensorfile::pipeline::{self, StreamError};
use tensorfile::safetensors::writer::encode_header;
use tensorfile::{Dtype, ReadBuffer, SafetensorsFile, TensorSource};

use crate::error::ComfyQuantError;
use crate::plan::{KeptLayer, Plan, QuantFormat, QuantizedWeight, Step};

/// Elements of a stored weight per piece (at least one row).
const WINDOW: usize = 1 << 22;
/// Elements per parallel task (at least one row).
const TASK: usize = 1 << 16;
/// Bytes per piece of a tensor cast or copied.
const CHUNK_BYTES: usize = 1 << 23;
/// Names of kept layers listed in a [`Report`] (all are counted).
pub const KEPT_NAMES_LIMIT: usize = 100;

/// What a conversion did. Serialized as JSON by the CLI; the field names are stable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The target's canonical name (`fp8_scaled`, `nvfp4`, `mxfp8`).
    pub target: String,
    /// The layer rule applied (`flux`, `wan`, ..., `generic`).
    pub layer_rule: String,
    /// The dtype of tensors cast to 16 bits (`BF16`, `F16`).
    pub float_dtype: String,
    /// Weights quantized.
    pub quantized: u64,
    /// Weights quantized per `comfy_quant` format.
    pub formats: BTreeMap<String, u64>,
    /// Quantized weights stored padded (their `comfy_quant` has `orig_shape`).
    pub padded: u64,
    /// Layers the rule selects that the format cannot hold, written in high precision.
    pub kept_high_precision: u64,
    /// The first [`KEPT_NAMES_LIMIT`] of them, with the reason.
    pub kept: Vec<KeptLayer>,
    /// Tensors cast to `float_dtype`.
    pub cast: u64,
    /// Tensors copied unchanged.
    pub copied: u64,
    /// Source bytes read for the output (the planning pass not counted).
    pub bytes_in: u64,
    /// Bytes written (the whole output file).
    pub bytes_out: u64,
}

/// What one piece of the output holds.
#[derive(Debug, Clone, Copy)]
enum Work<'p> {
    /// Stored rows `row..row + rows` of a quantized weight (rows past the source's are padding).
    Rows {
        weight: &'p QuantizedWeight,
        row: usize,
        rows: usize,
    },
    /// A quantized weight's scales and `comfy_quant`.
    Tail { weight: &'p QuantizedWeight },
    /// Elements `start..start + len` of a tensor cast to `dst`.
    Cast {
        src: usize,
        dst: Dtype,
        start: usize,
        len: usize,
    },
    /// Bytes of a tensor from `offset`, unchanged (as many as the piece holds).
    Copy { src: usize, offset: u64 },
    /// No bytes (an empty tensor): its progress only.
    Nothing,
}

/// A unit of the stream: its work, its exact output size, and the progress it makes.
type Piece<'p> = pipeline::Unit<Work<'p>>;

/// Converts `source` as `plan` says, writing a safetensors file with `metadata` to `out`.
/// `progress(source bytes done, source tensors done)` is called after each piece written.
/// Writes exactly [`Plan::output_len`] bytes on success.
pub fn convert<W: Write>(
    source: &dyn TensorSource,
    plan: &Plan,
    metadata: &BTreeMap<String, String>,
    out: W,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, ComfyQuantError> {
    check_plan(source, plan)?;
    source.check_unchanged()?;
    convert_source(source, plan, metadata, out, progress, None)
}

/// Receives every byte of the source file exactly once, in file order, as the conversion reads
/// it (see [`convert_observing_source`]).
pub type SourceObserver<'a> = &'a mut (dyn FnMut(&[u8]) + Send);

/// [`convert`] of a safetensors file served as stored, also handing the whole file to
/// `observer` in order: the length prefix and header first, then every tensor's bytes as the
/// conversion reads them (a validated header's tensors cover the data section exactly, in
/// offset order, and the plan's steps follow them). The caller hashes the source in this pass
/// instead of reading it once more (the content digest of an output's provenance).
pub fn convert_observing_source<W: Write>(
    file: &SafetensorsFile,
    plan: &Plan,
    metadata: &BTreeMap<String, String>,
    out: W,
    progress: &mut dyn FnMut(u64, u64),
    observer: SourceObserver<'_>,
) -> Result<Report, ComfyQuantError> {
    check_plan(file, plan)?;
    let prefix = file
        .unchanged_prefix()
        .map_err(|e| ComfyQuantError::from(tensorfile::SourceError::from(e)))?;
    observer(&prefix);
    convert_source(file, plan, metadata, out, progress, Some(observer))
}

fn check_plan(source: &dyn TensorSource, plan: &Plan) -> Result<(), ComfyQuantError> {
    if source.tensors() != plan.tensors.as_slice() {
        return Err(ComfyQuantError::mismatch(
            source.path(),
            "the source serves other tensors than the plan was made from",
        ));
    }
    Ok(())
}

/// The conversion: the header, then every piece through the pipeline.
fn convert_source<W: Write>(
    source: &dyn TensorSource,
    plan: &Plan,
    metadata: &BTreeMap<String, String>,
    mut out: W,
    progress: &mut dyn FnMut(u64, u64),
    observer: Option<SourceObserver<'_>>,
) -> Result<Report, ComfyQuantError> {
    let path = source.path();
    let write_err = |e: io::Error| ComfyQuantError::Write {
        path: path.to_owned(),
        source: e,
    };
    let pieces = pieces(plan).map_err(|detail| ComfyQuantError::mismatch(path, detail))?;
    let header = encode_header(&plan.specs, metadata)
        .map_err(|e| ComfyQuantError::mismatch(path, e.to_string()))?;
    let bytes_out = pieces
        .iter()
        .fold(header.len() as u64, |n, p| n + p.out_len as u64);
    out.write_all(&header).map_err(write_err)?;
    let producer = Producer {
        source,
        format: plan.format,
        read: Mutex::new(ReadBuffer::new()),
        grid: Mutex::new(Vec::new()),
        fp8_table: Mutex::new(None),
        observer: observer.map(Mutex::new),
    };
    let mut done = (0u64, 0u64);
    pipeline::stream(
        pieces,
        &mut out,
        &|piece: &Piece<'_>, dst: &mut [u8]| producer.produce(piece, dst),
        &mut |piece: &Piece<'_>| {
            done.0 += piece.source_bytes;
            done.1 += piece.tensors_done;
            progress(done.0, done.1);
        },
    )
    .map_err(|e| match e {
        StreamError::Produce(e) => e,
        StreamError::Write(e) => write_err(e),
        // No cancel flag is passed: a caller cancels through the writer it hands over.
    })?;
    out.flush().map_err(write_err)?;
    Ok(report(plan, done.0, bytes_out))
}

fn report(plan: &Plan, bytes_in: u64, bytes_out: u64) -> Report {
    let mut r = Report {
        target: plan.target.canonical_name().to_owned(),
        layer_rule: plan.rule.name().to_owned(),
        float_dtype: plan.float_dtype.as_str().to_owned(),
        kept_high_precision: plan.kept.len() as u64,
        kept: plan.kept.iter().take(KEPT_NAMES_LIMIT).cloned().collect(),
        bytes_in,
        bytes_out,
        ..Report::default()
    };
    for step in &plan.steps {
        match step {
            Step::Quantize(w) => {
                r.quantized += 1;
                r.padded += u64::from((w.stored_rows, w.stored_cols) != (w.rows, w.cols));
            }
            Step::Cast { .. } => r.cast += 1,
            Step::Copy { .. } => r.copied += 1,
        }
    }
    if r.quantized > 0 {
        r.formats
            .insert(plan.format.comfy_quant_name().to_owned(), r.quantized);
    }
    r
}

/// `(start, len)` of consecutive windows of `size` covering `0..n`.
fn windows(n: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(size.max(1))
        .map(move |start| (start, size.min(n - start)))
}

/// The share of `total` source bytes of elements `start..end` of `n`: shares of consecutive
/// windows add up to `total` exactly.
fn share(total: u64, n: usize, start: usize, end: usize) -> u64 {
    let at = |i: usize| (u128::from(total) * i as u128 / n.max(1) as u128) as u64;
    at(end) - at(start)
}

/// The bytes of a quantized weight's tail: its block scales (swizzled), its per-tensor scale
/// and its `comfy_quant`, in spec order.
fn tail_len(format: QuantFormat, w: &QuantizedWeight) -> usize {
    let grid = |cols| {
        let (r, c) = blockfp::blocked_shape(w.stored_rows, cols);
        r * c
    };
    let scales = match format {
        QuantFormat::Fp8 => 4,
        QuantFormat::Nvfp4 => grid(format.row_blocks(w.stored_cols)) + 4,
        QuantFormat::Mxfp8 => grid(format.row_blocks(w.stored_cols)),
    };
    scales + w.comfy_quant.len()
}

/// The pieces of `plan`, in output order; checks that each step writes exactly its planned
/// tensors.
fn pieces(plan: &Plan) -> Result<Vec<Piece<'_>>, String> {
    let format = plan.format;
    let mut all = Vec::new();
    let mut spec_at = 0;
    for step in &plan.steps {
        let t = plan
            .tensors
            .get(step.src())
            .ok_or("a step reads a tensor the source does not have")?;
        let n = usize::try_from(t.n_elements()).map_err(|_| "a tensor too large")?;
        let mut step_pieces = Vec::new();
        let mut push = |work, out_len, source_bytes| {
            step_pieces.push(Piece {
                work,
                out_len,
                source_bytes,
                tensors_done: 0,
                // A step's pieces hand its state on; the step's last one ends it.
                carries_state: true,
            })
        };
        let outputs = match step {
            Step::Quantize(w) => {
                let per = (WINDOW / w.stored_cols.max(1)).max(1);
                for (row, rows) in windows(w.stored_rows, per) {
                    let real = |r: usize| r.min(w.rows) * w.cols;
                    let bytes = share(t.source_bytes, n, real(row), real(row + rows));
                    let work = Work::Rows {
                        weight: w,
                        row,
                        rows,
                    };
                    push(work, rows * format.row_bytes(w.stored_cols), bytes);
                }
                push(Work::Tail { weight: w }, tail_len(format, w), 0);
                match format {
                    QuantFormat::Nvfp4 => 4,
                    QuantFormat::Fp8 | QuantFormat::Mxfp8 => 3,
                }
            }
            &Step::Cast { src, dst } => {
                let per = CHUNK_BYTES / elem_size(t.dtype).max(elem_size(dst)).max(1);
                for (start, len) in windows(n, per) {
                    let work = Work::Cast {
                        src,
                        dst,
                        start,
                        len,
                    };
                    let bytes = share(t.source_bytes, n, start, start + len);
                    push(work, len * elem_size(dst), bytes);
                }
                1
            }
            &Step::Copy { src } => {
                let len = t
                    .byte_len()
                    .and_then(|l| usize::try_from(l).ok())
                    .ok_or("a tensor too large")?;
                for (offset, bytes) in windows(len, CHUNK_BYTES) {
                    let work = Work::Copy {
                        src,
                        offset: offset as u64,
                    };
                    push(
                        work,
                        bytes,
                        share(t.source_bytes, len, offset, offset + bytes),
                    );
                }
                1
            }
        };
        Piece::close_step(&mut step_pieces, Work::Nothing, 0, 1);
        let planned = plan
            .specs
            .get(spec_at..spec_at + outputs)
            .ok_or("fewer output tensors than conversion steps")?
            .iter()
            .map(|s| s.byte_len().and_then(|l| usize::try_from(l).ok()))
            .try_fold(0usize, |a, l| a.checked_add(l?));
        spec_at += outputs;
        let written = step_pieces.iter().map(|p| p.out_len).sum::<usize>();
        if planned != Some(written) {
            return Err(format!(
                "the output tensors of `{}` do not match its conversion",
                t.name.escape_debug()
            ));
        }
        all.extend(step_pieces);
    }
    if spec_at != plan.specs.len() {
        return Err("more output tensors than conversion steps".into());
    }
    Ok(all)
}

fn elem_size(d: Dtype) -> usize {
    (d.bits() / 8) as usize
}

/// Produces the pieces of a conversion. Pieces are produced one at a time, in order, so the
/// locks are never contended.
struct Producer<'a, 'o> {
    source: &'a dyn TensorSource,
    format: QuantFormat,
    /// The source bytes of a cast chunk (page-aligned, reused).
    read: Mutex<ReadBuffer>,
    /// The block-scale grid (row-major, not swizzled) of the weight being quantized.
    grid: Mutex<Vec<u8>>,
    /// fp8 of a 16-bit weight: the code of every input value, for the weight being quantized.
    fp8_table: Mutex<Option<blockfp::Fp8Table>>,
    /// Who is handed every source byte read, in order ([`convert_observing_source`]).
    observer: Option<Mutex<SourceObserver<'o>>>,
}

/// Where a task's source rows come from.
#[derive(Clone, Copy)]
enum Rows<'r> {
    /// Read by the task itself (in parallel).
    Source,
    /// The raw stored bytes of the piece's real rows, read once for the observer.
    Raw(&'r [u8]),
}

impl Producer<'_, '_> {
    /// Hands `bytes` (the next source bytes in file order) to the observer, if there is one.
    fn observe(&self, bytes: &[u8]) {
        if let Some(o) = &self.observer {
            (o.lock().unwrap_or_else(PoisonError::into_inner))(bytes);
        }
    }

    fn produce(&self, piece: &Piece<'_>, dst: &mut [u8]) -> Result<(), ComfyQuantError> {
        let source = self.source;
        match piece.work {
            Work::Rows { weight, row, rows } => {
                let mut grid = self.grid.lock().unwrap_or_else(PoisonError::into_inner);
                let grid_row = self.format.row_blocks(weight.stored_cols);
                if row == 0 {
                    *grid = vec![0u8; weight.stored_rows * grid_row];
                }
                let scales = grid
                    .get_mut(row * grid_row..(row + rows) * grid_row)
                    .ok_or_else(|| ComfyQuantError::mismatch(source.path(), "rows out of order"))?;
                let mut table = self
                    .fp8_table
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if row == 0 {
                    *table = match self.format {
                        // fp8 stores no padding, so a task's values are exactly the source's.
                        QuantFormat::Fp8
                            if source.tensors()[weight.src].dtype == weight.compute =>
                        {
                            blockfp::Fp8Table::new(weight.compute, weight.tensor_scale)
                        }
                        _ => None,
                    };
                }
                if self.observer.is_none() {
                    return self.quantize_rows(
                        weight,
                        row,
                        dst,
                        scales,
                        table.as_ref(),
                        Rows::Source,
                    );
                }
                // The piece's real rows read once, hashed beside their quantization.
                let t = &source.tensors()[weight.src];
                let es = elem_size(t.dtype);
                let real = rows.min(weight.rows.saturating_sub(row)) * weight.cols;
                let mut read = self.read.lock().unwrap_or_else(PoisonError::into_inner);
                let raw = read.get(real * es, WINDOW * es);
                source.read_raw(weight.src, (row * weight.cols * es) as u64, raw)?;
                let raw = &*raw;
                let quantize =
                    || self.quantize_rows(weight, row, dst, scales, table.as_ref(), Rows::Raw(raw));
                rayon::join(|| self.observe(raw), quantize).1
            }
            Work::Tail { weight } => {
                let grid =
                    std::mem::take(&mut *self.grid.lock().unwrap_or_else(PoisonError::into_inner));
                let mut bytes = Vec::with_capacity(dst.len());
                let blocked = |cols| blockfp::to_blocked(&grid, weight.stored_rows, cols);
                match self.format {
                    QuantFormat::Fp8 => bytes.extend(weight.tensor_scale.to_le_bytes()),
                    QuantFormat::Nvfp4 => {
                        bytes.extend(blocked(self.format.row_blocks(weight.stored_cols)));
                        bytes.extend(weight.tensor_scale.to_le_bytes());
                    }
                    QuantFormat::Mxfp8 => {
                        bytes.extend(blocked(self.format.row_blocks(weight.stored_cols)))
                    }
                }
                bytes.extend_from_slice(&weight.comfy_quant);
                if bytes.len() != dst.len() {
                    return Err(ComfyQuantError::mismatch(
                        source.path(),
                        "a quantized weight's scales do not match the plan",
                    ));
                }
                dst.copy_from_slice(&bytes);
                Ok(())
            }
            Work::Cast {
                src,
                dst: to,
                start,
                len,
            } => {
                let t = &source.tensors()[src];
                let es = elem_size(t.dtype);
                let mut read = self.read.lock().unwrap_or_else(PoisonError::into_inner);
                let bytes = read.get(len * es, CHUNK_BYTES);
                source.read_raw(src, (start * es) as u64, bytes)?;
                let bytes = &*bytes;
                let cast = || {
                    tensorfile::cast::cast_slice_par(t.dtype, bytes, to, dst)
                        .map(|_| ())
                        .map_err(|e| ComfyQuantError::tensor(source.path(), &t.name, e.to_string()))
                };
                rayon::join(|| self.observe(bytes), cast).1
            }
            Work::Copy { src, offset } => {
                source.read_raw(src, offset, dst)?;
                self.observe(dst);
                Ok(())
            }
            Work::Nothing => Ok(()),
        }
    }

    /// Quantizes stored rows starting at `row` into `dst` (and their block scales into `grid`),
    /// in parallel tasks of whole rows.
    fn quantize_rows(
        &self,
        w: &QuantizedWeight,
        row: usize,
        dst: &mut [u8],
        grid: &mut [u8],
        fp8_table: Option<&blockfp::Fp8Table>,
        from: Rows<'_>,
    ) -> Result<(), ComfyQuantError> {
        let format = self.format;
        let sc = w.stored_cols;
        let task_rows = (TASK / sc.max(1)).max(1);
        let out_row = format.row_bytes(sc);
        let task = |k: usize, out: &mut [u8], scales: &mut [u8]| {
            let first = row + k * task_rows;
            if let Some(table) = fp8_table {
                // The weight's raw 16-bit values, one code each (fp8 stores no padding).
                return match from {
                    Rows::Raw(raw) => {
                        let at = 2 * (first - row) * w.cols;
                        let raw = raw.get(at..at + 2 * out.len()).ok_or_else(|| {
                            ComfyQuantError::mismatch(self.source.path(), "rows out of range")
                        })?;
                        table.quantize(raw, out);
                        Ok(())
                    }
                    Rows::Source => crate::scratch::with_bytes(2 * out.len(), |raw| {
                        self.source
                            .read_raw(w.src, 2 * (first * w.cols) as u64, raw)?;
                        table.quantize(raw, out);
                        Ok(())
                    }),
                };
            }
            crate::scratch::with_zeroed(out.len() / out_row * sc, |values| {
                match from {
                    Rows::Source => self.read_rows(w, first, values)?,
                    Rows::Raw(raw) => self.widen_rows(w, first - row, raw, values)?,
                }
                match format {
                    QuantFormat::Fp8 => {
                        blockfp::quantize_fp8(values, w.compute, w.tensor_scale, out)
                    }
                    QuantFormat::Nvfp4 => {
                        blockfp::quantize_nvfp4_rows(values, sc, w.tensor_scale, out, scales)
                    }
                    QuantFormat::Mxfp8 => blockfp::quantize_mxfp8_rows(values, sc, out, scales),
                }
                Ok(())
            })
        };
        let outs = dst.par_chunks_mut(task_rows * out_row);
        match format.row_blocks(sc) {
            // fp8 has no block scales.
            0 => outs
                .enumerate()
                .try_for_each(|(k, out)| task(k, out, &mut [])),
            grid_row => outs
                .zip(grid.par_chunks_mut(task_rows * grid_row))
                .enumerate()
                .try_for_each(|(k, (out, scales))| task(k, out, scales)),
        }
    }

    /// [`Producer::read_rows`] from `raw`, the stored bytes of real rows starting `skip` rows
    /// before `values`' first row.
    fn widen_rows(
        &self,
        w: &QuantizedWeight,
        skip: usize,
        raw: &[u8],
        values: &mut [f32],
    ) -> Result<(), ComfyQuantError> {
        let t = &self.source.tensors()[w.src];
        let es = elem_size(t.dtype);
        let row_bytes = w.cols * es;
        let raw = raw.get(skip * row_bytes..).unwrap_or_default();
        for (row, bytes) in values.chunks_mut(w.stored_cols).zip(raw.chunks(row_bytes)) {
            tensorfile::cast::widen_to_f32(t.dtype, bytes, &mut row[..w.cols])
                .map_err(|e| ComfyQuantError::tensor(self.source.path(), &t.name, e.to_string()))?;
        }
        Ok(())
    }

    /// Fills `values` (whole stored rows from `first`, zeroed) with the source's values: rows
    /// and columns past the source's stay zero (comfy-kitchen's padding).
    fn read_rows(
        &self,
        w: &QuantizedWeight,
        first: usize,
        values: &mut [f32],
    ) -> Result<(), ComfyQuantError> {
        let sc = w.stored_cols;
        let real = (values.len() / sc).min(w.rows.saturating_sub(first));
        if real == 0 {
            return Ok(());
        }
        let start = (first * w.cols) as u64;
        if sc == w.cols {
            self.source
                .read_f32(w.src, start, &mut values[..real * sc])?;
        } else {
            for (i, row) in values.chunks_mut(sc).take(real).enumerate() {
                let at = start + (i * w.cols) as u64;
                self.source.read_f32(w.src, at, &mut row[..w.cols])?;
            }
        }
        Ok(())
    }
}
