//! The safetensors -> safetensors precision converter.
//!
//! [`plan`] decides, from the header alone, what every output tensor is (name, dtype, shape) and
//! how it is produced; [`Plan::output_len`] gives the exact output size before anything is
//! written; [`convert`] streams the conversion: header first, then tensor by tensor, large tensors
//! in chunks converted in parallel into a reused buffer while the previous chunk is written.
//! Memory is bounded by three chunk buffers (one read, two converted), never by the model: the
//! source is read with positioned reads into page-aligned buffers, not through its memory map
//! (see `read_piece`). [`convert_observing_source`] also hands every source byte, in file
//! order, to the caller, which hashes the source in this same pass.
//!
//! Which tensors change (the rules of issue 3):
//! - 32- and 16-bit targets: every floating tensor is cast to the target dtype.
//! - fp8 targets: tensors with two or more dimensions are cast to fp8; 1-D and scalar float
//!   tensors (biases, norm scales) stay 16-bit: BF16 if the source tensor is F32 or BF16, F16
//!   otherwise (F64, F16, and fp8 sources, which widen exactly). The report names them.
//! - Integer and bool tensors, and float tensors already in their output dtype, are copied
//!   byte for byte.
//! - Float dtypes no cast reads (F8_E8M0, F6, F4, FNUZ variants) are refused, naming the tensor.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use detect::Precision;
use tensorfile::safetensors::{
    Dtype, Header, ReadBuffer, SafetensorsError, SafetensorsFile, TensorEntry,
};
use rayon::prelude::*;
use serde::Serialize;

use tensorfile::cast::{CastError, CastStats, cast_slice, is_cast_source};
use tensorfile::safetensors::writer::{self, SafetensorsWriter, TensorSpec};

/// Bytes per chunk by default (one source and two output buffers of this size are alive at once).
pub const DEFAULT_CHUNK_BYTES: usize = 2 << 20;

/// Elements one rayon task casts: large enough to amortise scheduling, small enough to spread a
/// chunk over every core.
const TASK_ELEMS: usize = 1 << 16;

/// The safetensors dtype a precision target writes, when the precision converter handles it.
pub fn target_dtype(target: Precision) -> Option<Dtype> {
    match target {
        Precision::Fp32 => Some(Dtype::F32),
        Precision::Fp16 => Some(Dtype::F16),
        Precision::Bf16 => Some(Dtype::BF16),
        Precision::Fp8E4m3fn => Some(Dtype::F8E4M3),
        Precision::Fp8E5m2 => Some(Dtype::F8E5M2),
        _ => None,
    }
}

/// How one output tensor is produced from the source tensor of the same index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The source bytes, unchanged (integer and bool tensors; floats already in the output dtype).
    Copy,
    /// Cast from the source dtype to the output spec's dtype.
    Cast,
}

/// Everything about an output decided before writing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The requested precision.
    pub target: Precision,
    /// Output tensors: the source's names and shapes, in the source's data order.
    pub specs: Vec<TensorSpec>,
    /// How each output tensor is made (parallel to `specs`).
    pub actions: Vec<Action>,
    /// Source dtype of each tensor (parallel to `specs`).
    pub source_dtypes: Vec<Dtype>,
    /// Names of the 1-D and scalar float tensors an fp8 target keeps in 16 bits.
    pub kept_16bit: Vec<String>,
    /// Total source tensor bytes the conversion reads.
    pub bytes_in: u64,
}

impl Plan {
    /// The exact size of the output file written with this `metadata`.
    pub fn output_len(&self, metadata: &BTreeMap<String, String>) -> io::Result<u64> {
        writer::output_len(&self.specs, metadata)
    }
}

/// What a conversion did. Serialized as JSON by the CLI; the field names are stable:
///
/// - `target`: the canonical precision name (`fp16`, `fp8_e4m3fn`, ...);
/// - `tensors_converted`: tensors whose dtype changed;
/// - `tensors_copied`: tensors written byte for byte (integer, bool, already in the output dtype);
/// - `tensors_kept_16bit` / `kept_16bit`: how many and which 1-D/scalar float tensors an fp8
///   target left in BF16/F16 (each also counted in one of the two counts above);
/// - `overflowed`: finite source values that became ±inf or were saturated (fp8_e4m3fn ±448);
/// - `non_finite`: NaN and ±inf values in the output tensors;
/// - `bytes_in`: source tensor bytes read; `bytes_out`: bytes written (the whole output file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub target: String,
    pub tensors_converted: u64,
    pub tensors_copied: u64,
    pub tensors_kept_16bit: u64,
    pub kept_16bit: Vec<String>,
    pub overflowed: u64,
    pub non_finite: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Why a conversion failed. Display: `PATH: problem` (errors from [`plan`], which sees only a
/// header, say `safetensors header` until [`ConvertError::with_path`] names the file).
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The precision converter does not produce this precision.
    #[error(
        "{}: cannot convert to {target}: the precision converter writes fp32, fp16, bf16, \
         fp8_e4m3fn and fp8_e5m2",
        shown(path)
    )]
    UnsupportedTarget { path: PathBuf, target: Precision },
    /// A floating tensor whose dtype no cast reads.
    #[error(
        "{}: tensor {tensor:?} has dtype {dtype}, which cannot be converted (supported float \
         dtypes: F64, F32, F16, BF16, F8_E4M3, F8_E5M2)",
        shown(path)
    )]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: Dtype,
    },
    /// The plan was not made from this file's header.
    #[error(
        "{}: the conversion plan does not match this file: {detail}",
        shown(path)
    )]
    PlanMismatch { path: PathBuf, detail: String },
    /// A cast refused its input (a planning bug, never a property of the data).
    #[error("{}: tensor {tensor:?}: {source}", shown(path))]
    Cast {
        path: PathBuf,
        tensor: String,
        source: CastError,
    },
    /// Reading the source failed.
    #[error("{}: reading the source failed: {source}", shown(path))]
    Read { path: PathBuf, source: io::Error },
    /// The source file is no longer the one whose header was validated.
    #[error(
        "{}: the file changed after it was opened (size or header differ)",
        shown(path)
    )]
    SourceChanged { path: PathBuf },
    /// Writing the output failed (disk full, closed pipe...).
    #[error("{}: writing the converted output failed: {source}", shown(path))]
    Write { path: PathBuf, source: io::Error },
}

fn shown(path: &Path) -> std::borrow::Cow<'_, str> {
    if path.as_os_str().is_empty() {
        "safetensors header".into()
    } else {
        path.display().to_string().into()
    }
}

impl ConvertError {
    /// The source file the error is about (empty for [`plan`] errors not yet given a path).
    pub fn path(&self) -> &Path {
        match self {
            ConvertError::UnsupportedTarget { path, .. }
            | ConvertError::UnsupportedDtype { path, .. }
            | ConvertError::PlanMismatch { path, .. }
            | ConvertError::Cast { path, .. }
            | ConvertError::Read { path, .. }
            | ConvertError::SourceChanged { path }
            | ConvertError::Write { path, .. } => path,
        }
    }

    /// The same error about `file`.
    pub fn with_path(mut self, file: &Path) -> Self {
        match &mut self {
            ConvertError::UnsupportedTarget { path, .. }
            | ConvertError::UnsupportedDtype { path, .. }
            | ConvertError::PlanMismatch { path, .. }
            | ConvertError::Cast { path, .. }
            | ConvertError::Read { path, .. }
            | ConvertError::SourceChanged { path }
            | ConvertError::Write { path, .. } => *path = file.to_owned(),
        }
        self
    }

    /// The I/O error, when reading or writing failed (to tell a full disk from bad input).
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            ConvertError::Write { source, .. } | ConvertError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The output dtype of one source tensor, and whether it is a 1-D/scalar tensor kept 16-bit.
fn output_dtype(entry: &TensorEntry, target: Dtype) -> Result<(Dtype, bool), ConvertError> {
    if !entry.dtype.is_float() {
        return Ok((entry.dtype, false));
    }
    if !is_cast_source(entry.dtype) {
        return Err(ConvertError::UnsupportedDtype {
            path: PathBuf::new(),
            tensor: entry.name.clone(),
            dtype: entry.dtype,
        });
    }
    let fp8 = matches!(target, Dtype::F8E4M3 | Dtype::F8E5M2);
    if fp8 && entry.shape.len() < 2 {
        let keep = match entry.dtype {
            Dtype::F32 | Dtype::BF16 => Dtype::BF16,
            _ => Dtype::F16,
        };
        return Ok((keep, true));
    }
    Ok((target, false))
}

/// Plans the conversion of a file with this header to `target` (header only, no data read).
pub fn plan(header: &Header, target: Precision) -> Result<Plan, ConvertError> {
    let dst = target_dtype(target).ok_or(ConvertError::UnsupportedTarget {
        path: PathBuf::new(),
        target,
    })?;
    let n = header.tensors.len();
    let mut plan = Plan {
        target,
        specs: Vec::with_capacity(n),
        actions: Vec::with_capacity(n),
        source_dtypes: Vec::with_capacity(n),
        kept_16bit: Vec::new(),
        bytes_in: 0,
    };
    for entry in &header.tensors {
        let (dtype, kept) = output_dtype(entry, dst)?;
        plan.actions.push(if dtype == entry.dtype {
            Action::Copy
        } else {
            Action::Cast
        });
        if kept {
            plan.kept_16bit.push(entry.name.clone());
        }
        plan.source_dtypes.push(entry.dtype);
        plan.specs.push(TensorSpec {
            name: entry.name.clone(),
            dtype,
            shape: entry.shape.clone(),
        });
        plan.bytes_in = plan.bytes_in.saturating_add(entry.byte_len());
    }
    Ok(plan)
}

/// [`plan`] for an opened file, with its path in errors.
pub fn plan_file(src: &SafetensorsFile, target: Precision) -> Result<Plan, ConvertError> {
    plan(&src.header, target).map_err(|e| e.with_path(&src.path))
}

/// The output's `__metadata__`: the source's, with `extra` (provenance) added over it.
pub fn merged_metadata(
    source: &Header,
    extra: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut m = source.metadata.clone();
    m.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    m
}

/// Tuning for [`convert_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvertOptions {
    /// Output bytes per converted chunk (rounded down to whole elements, at least one element).
    /// Peak memory is about three times this (one source and two output buffers).
    pub chunk_bytes: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            chunk_bytes: DEFAULT_CHUNK_BYTES,
        }
    }
}

/// Converts `src` as `plan` says, writing the output file to `out` with `metadata` as its
/// `__metadata__` (see [`merged_metadata`]). `progress(source_bytes_done, tensors_done)` is
/// called after each written chunk. Writes exactly [`Plan::output_len`] bytes on success.
pub fn convert<W: Write>(
    src: &SafetensorsFile,
    plan: &Plan,
    metadata: &BTreeMap<String, String>,
    out: W,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, ConvertError> {
    convert_with(
        src,
        plan,
        metadata,
        out,
        ConvertOptions::default(),
        progress,
    )
}

/// [`convert`] with explicit [`ConvertOptions`].
pub fn convert_with<W: Write>(
    src: &SafetensorsFile,
    plan: &Plan,
    metadata: &BTreeMap<String, String>,
    out: W,
    options: ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, ConvertError> {
    checked_prefix(src, plan)?;
    convert_source(src, plan, metadata, out, options, progress, None)
}

/// Refuses a plan made for another header or a source changed since it was opened; returns the
/// source's prefix (length and header bytes) as validated.
fn checked_prefix(src: &SafetensorsFile, plan: &Plan) -> Result<Vec<u8>, ConvertError> {
    check_plan(&src.path, &src.header, plan)?;
    src.unchanged_prefix().map_err(|e| read_error(src, e))
}

/// Receives every byte of the source file exactly once, in file order, as the conversion reads
/// it (see [`convert_observing_source`]).
pub type SourceObserver<'a> = &'a mut (dyn FnMut(&[u8]) + Send);

/// [`convert_with`], also handing the whole source file to `observer` in order: the length
/// prefix and header first, then every tensor's bytes as they are read for the conversion. The
/// caller can hash the source without reading it a second time (the content digest in an
/// output's provenance).
pub fn convert_observing_source<W: Write>(
    src: &SafetensorsFile,
    plan: &Plan,
    metadata: &BTreeMap<String, String>,
    out: W,
    options: ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
    observer: SourceObserver<'_>,
) -> Result<Report, ConvertError> {
    let prefix = checked_prefix(src, plan)?;
    observer(&prefix);
    convert_source(src, plan, metadata, out, options, progress, Some(observer))
}

/// The source's error as this crate's: a file changed since its header was validated is
/// [`ConvertError::SourceChanged`], anything else a read failure.
fn read_error(src: &SafetensorsFile, e: SafetensorsError) -> ConvertError {
    match e {
        SafetensorsError::Changed { .. } => ConvertError::SourceChanged {
            path: src.path.clone(),
        },
        e => ConvertError::Read {
            path: src.path.clone(),
            source: e.into_io_error(),
        },
    }
}

/// Reads the source bytes of `piece` into `buf` (a positioned read: see the module docs).
fn read_piece(src: &SafetensorsFile, piece: &Piece, buf: &mut [u8]) -> Result<(), ConvertError> {
    let entry = &src.header.tensors[piece.tensor];
    let offset = piece.start as u64 * (entry.dtype.bits() / 8);
    src.read_tensor_range(entry, offset, buf)
        .map_err(|e| read_error(src, e))
}

/// One unit of output: a whole small tensor, or a chunk of a large one.
#[derive(Debug, Clone, Copy)]
struct Piece {
    tensor: usize,
    /// Element range within the tensor.
    start: usize,
    end: usize,
    last_of_tensor: bool,
}

/// Counts the output bytes that went through the writer.
struct Counting<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The streaming loop. Memory: one source buffer and two output buffers of at most
/// `options.chunk_bytes` each.
fn convert_source<W: Write>(
    source: &SafetensorsFile,
    plan: &Plan,
    metadata: &BTreeMap<String, String>,
    out: W,
    options: ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
    mut observer: Option<SourceObserver<'_>>,
) -> Result<Report, ConvertError> {
    let (path, header) = (source.path.as_path(), &source.header);
    let write_err = |source: io::Error| ConvertError::Write {
        path: path.to_owned(),
        source,
    };
    let mut w = SafetensorsWriter::new(
        Counting {
            inner: out,
            written: 0,
        },
        &plan.specs,
        metadata,
    )
    .map_err(write_err)?;

    let mut report = Report {
        target: plan.target.canonical_name().to_owned(),
        tensors_converted: 0,
        tensors_copied: 0,
        tensors_kept_16bit: plan.kept_16bit.len() as u64,
        kept_16bit: plan.kept_16bit.clone(),
        overflowed: 0,
        non_finite: 0,
        bytes_in: 0,
        bytes_out: 0,
    };
    for action in &plan.actions {
        match action {
            Action::Copy => report.tensors_copied += 1,
            Action::Cast => report.tensors_converted += 1,
        }
    }

    let budget = options.chunk_bytes.max(1);
    // Buffers are sized for the largest piece, so a small model allocates little.
    let largest = |bytes: &dyn Fn(usize) -> u64| {
        (0..plan.specs.len())
            .map(|i| bytes(i).min(budget as u64) as usize)
            .max()
            .unwrap_or(0)
    };
    let in_cap = largest(&|i| header.tensors[i].byte_len());
    let out_cap = largest(&|i| match plan.actions[i] {
        Action::Cast => plan.specs[i].byte_len().unwrap_or(0),
        Action::Copy => 0,
    });
    // Page-aligned (see `ReadBuffer`): the kernel copies into and out of them at full speed.
    let mut input = ReadBuffer::new();
    // `front` holds a converted piece waiting to be written while the next piece is read and
    // converted into `back` on the thread pool.
    let mut front = ReadBuffer::new();
    let mut back = ReadBuffer::new();
    let mut pending: Option<(Piece, usize)> = None;
    let mut bytes_done = 0u64;
    let mut tensors_done = 0u64;

    let mut finish_piece = |piece: Piece, bytes_done: &mut u64, tensors_done: &mut u64| {
        let entry = &header.tensors[piece.tensor];
        *bytes_done += (piece.end - piece.start) as u64 * (entry.dtype.bits() / 8);
        if piece.last_of_tensor {
            *tensors_done += 1;
        }
        progress(*bytes_done, *tensors_done);
    };

    for piece in pieces(header, plan, budget) {
        let entry = &header.tensors[piece.tensor];
        let src_len = (piece.end - piece.start) * (entry.dtype.bits() / 8) as usize;
        match plan.actions[piece.tensor] {
            Action::Copy => {
                if let Some((p, len)) = pending.take() {
                    write_some(&mut w, front.get(len, out_cap)).map_err(write_err)?;
                    finish_piece(p, &mut bytes_done, &mut tensors_done);
                }
                let src = input.get(src_len, in_cap);
                read_piece(source, &piece, src)?;
                if let Some(observe) = observer.as_deref_mut() {
                    observe(src);
                }
                write_some(&mut w, src).map_err(write_err)?;
                report.non_finite += tensorfile::cast::count_non_finite(entry.dtype, src);
                finish_piece(piece, &mut bytes_done, &mut tensors_done);
            }
            Action::Cast => {
                let dst_dtype = plan.specs[piece.tensor].dtype;
                let len = (piece.end - piece.start) * (dst_dtype.bits() / 8) as usize;
                let src = input.get(src_len, in_cap);
                let dst = back.get(len, out_cap);
                let mut cast_result = Ok(CastStats::default());
                let mut write_result = Ok(());
                let observe = observer.as_deref_mut();
                rayon::in_place_scope(|s| {
                    s.spawn(|_| {
                        cast_result = read_piece(source, &piece, src).and_then(|()| {
                            let src = &*src;
                            let mut cast = || {
                                cast_par(entry.dtype, src, dst_dtype, dst).map_err(|source| {
                                    ConvertError::Cast {
                                        path: path.to_owned(),
                                        tensor: entry.name.clone(),
                                        source,
                                    }
                                })
                            };
                            match observe {
                                // Hashing the chunk runs beside its cast, on the same bytes.
                                Some(observe) => rayon::join(|| observe(src), cast).1,
                                None => cast(),
                            }
                        });
                    });
                    if let Some((_, plen)) = pending {
                        write_result = write_some(&mut w, front.get(plen, out_cap));
                    }
                });
                write_result.map_err(write_err)?;
                if let Some((p, _)) = pending.take() {
                    finish_piece(p, &mut bytes_done, &mut tensors_done);
                }
                let stats = cast_result?;
                report.overflowed += stats.overflowed;
                report.non_finite += stats.non_finite;
                std::mem::swap(&mut front, &mut back);
                pending = Some((piece, len));
            }
        }
    }
    if let Some((p, len)) = pending.take() {
        write_some(&mut w, front.get(len, out_cap)).map_err(write_err)?;
        finish_piece(p, &mut bytes_done, &mut tensors_done);
    }
    let counting = w.finish().map_err(write_err)?;
    report.bytes_in = bytes_done;
    report.bytes_out = counting.written;
    Ok(report)
}

/// Writes a chunk; an empty one (an empty tensor) has nothing to write and is skipped, since
/// the writer has already moved past empty tensors.
fn write_some<W: Write>(w: &mut SafetensorsWriter<W>, bytes: &[u8]) -> io::Result<()> {
    if bytes.is_empty() {
        Ok(())
    } else {
        w.write_chunk(bytes)
    }
}

/// Casts a chunk with every core.
fn cast_par(
    src: Dtype,
    src_bytes: &[u8],
    dst: Dtype,
    dst_bytes: &mut [u8],
) -> Result<CastStats, CastError> {
    let (ss, ds) = ((src.bits() / 8) as usize, (dst.bits() / 8) as usize);
    if src_bytes.len() <= TASK_ELEMS * ss {
        return cast_slice(src, src_bytes, dst, dst_bytes);
    }
    src_bytes
        .par_chunks(TASK_ELEMS * ss)
        .zip(dst_bytes.par_chunks_mut(TASK_ELEMS * ds))
        .map(|(s, d)| cast_slice(src, s, dst, d))
        .try_reduce(CastStats::default, |a, b| Ok(a + b))
}

/// The pieces of the output in order: each tensor whole, or in chunks of at most `budget` output
/// bytes (and at most `budget` source bytes for copies).
fn pieces<'p>(
    header: &'p Header,
    plan: &'p Plan,
    budget: usize,
) -> impl Iterator<Item = Piece> + 'p {
    header
        .tensors
        .iter()
        .enumerate()
        .flat_map(move |(i, entry)| {
            let n = entry.n_elements() as usize;
            let out_size = (plan.specs[i].dtype.bits() / 8) as usize;
            let in_size = (entry.dtype.bits() / 8) as usize;
            let per = (budget / out_size.max(in_size).max(1)).max(1);
            let count = n.div_ceil(per).max(1);
            (0..count).map(move |k| Piece {
                tensor: i,
                start: (k * per).min(n),
                end: ((k + 1) * per).min(n),
                last_of_tensor: k + 1 == count,
            })
        })
}

/// Refuses a plan made from another header (its fields are public, so it may have been edited).
fn check_plan(path: &Path, header: &Header, plan: &Plan) -> Result<(), ConvertError> {
    let mismatch = |detail: String| ConvertError::PlanMismatch {
        path: path.to_owned(),
        detail,
    };
    let n = header.tensors.len();
    if plan.specs.len() != n || plan.actions.len() != n || plan.source_dtypes.len() != n {
        return Err(mismatch(format!(
            "{} tensors planned, the file has {n}",
            plan.specs.len()
        )));
    }
    for ((entry, spec), (action, src_dtype)) in header
        .tensors
        .iter()
        .zip(&plan.specs)
        .zip(plan.actions.iter().zip(&plan.source_dtypes))
    {
        if entry.name != spec.name || entry.shape != spec.shape || entry.dtype != *src_dtype {
            return Err(mismatch(format!("tensor {:?} differs", entry.name)));
        }
        // Every byte length and element count below comes from a validated header; these
        // checks keep a hand-made plan from reading or writing out of bounds.
        let n_elem = entry.n_elements();
        let elem_bits_ok = entry.dtype.bits() % 8 == 0 && spec.dtype.bits() % 8 == 0;
        let consistent = match action {
            Action::Copy => spec.dtype == entry.dtype,
            Action::Cast => is_cast_source(entry.dtype) && is_cast_source(spec.dtype),
        };
        if !consistent
            || !elem_bits_ok
            || entry.dtype.bytes_for(n_elem) != Some(entry.byte_len())
            || usize::try_from(n_elem).is_err()
            || spec.byte_len().is_none()
        {
            return Err(mismatch(format!(
                "tensor {:?}: {:?} from {} to {} is not possible",
                entry.name, action, entry.dtype, spec.dtype
            )));
        }
    }
    Ok(())
}
