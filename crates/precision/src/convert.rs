//! The safetensors -> safetensors precision converter.
//!
//! [`plan`] decides, from the source's tensor list alone, what every output tensor is (name,
//! dtype, shape) and how it is produced; [`Plan::output_len`] gives the exact output size before
//! anything is written; [`convert`] streams the conversion through `tensorfile::pipeline`:
//! header first, then tensor by tensor, large tensors in chunks converted in parallel while the
//! previous chunk is written. Memory is bounded by three chunk buffers (one read, two
//! converted), never by the model: the source is read with positioned reads into page-aligned
//! buffers, not through a memory map. [`convert_observing_source`] also hands every source
//! byte, in file order, to the caller, which hashes the source in this same pass.
//!
//! The source is any [`TensorSource`]: a safetensors file, a scaled-fp8 file seen through
//! `tensorfile::scaled` (its weights served de-scaled as F32, so a 16-bit target rounds
//! `w.to(f32) * scale` once, as torch does), or a GGUF file (dequantized to F32).
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

use std::sync::Mutex;

use detect::Precision;
use serde::Serialize;
use tensorfile::cast::{CastError, CastStats, cast_slice_par, count_non_finite, is_cast_source};
use tensorfile::pipeline::{self, StreamError};
use tensorfile::safetensors::writer::{self, SafetensorsWriter, TensorSpec};
use tensorfile::safetensors::{Dtype, ReadBuffer, SafetensorsFile};
use tensorfile::{SourceError, SourceTensor, TensorSource};

/// Bytes per chunk by default (one source and two output buffers of this size are alive at once).
pub const DEFAULT_CHUNK_BYTES: usize = 2 << 20;

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
    /// Output tensors: the source's names and shapes, in the source's order.
    pub specs: Vec<TensorSpec>,
    /// How each output tensor is made (parallel to `specs`).
    pub actions: Vec<Action>,
    /// Dtype each source tensor is served in (parallel to `specs`).
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

/// What a conversion did. Serialized as JSON by the CLI; the field names are stable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The canonical precision name (`fp16`, `fp8_e4m3fn`, ...).
    pub target: String,
    /// Tensors whose dtype changed.
    pub tensors_converted: u64,
    /// Tensors written byte for byte (integer, bool, already in the output dtype).
    pub tensors_copied: u64,
    /// How many 1-D/scalar float tensors an fp8 target left in BF16/F16 (each also counted in
    /// one of the two counts above).
    pub tensors_kept_16bit: u64,
    /// The names of those tensors.
    pub kept_16bit: Vec<String>,
    /// Finite source values that became ±inf or were saturated (fp8_e4m3fn ±448).
    pub overflowed: u64,
    /// NaN and ±inf values in the output tensors.
    pub non_finite: u64,
    /// Source tensor bytes read.
    pub bytes_in: u64,
    /// Bytes written (the whole output file).
    pub bytes_out: u64,
}

/// Why a conversion failed. Display: `PATH: problem`, PATH being the source file.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The precision converter does not produce this precision.
    #[error(
        "{}: cannot convert to {target}: the precision converter writes fp32, fp16, bf16, \
         fp8_e4m3fn and fp8_e5m2",
        path.display()
    )]
    UnsupportedTarget {
        /// The source file.
        path: PathBuf,
        /// The requested precision.
        target: Precision,
    },
    /// A floating tensor whose dtype no cast reads.
    #[error(
        "{}: tensor {tensor:?} has dtype {dtype}, which cannot be converted (supported float \
         dtypes: F64, F32, F16, BF16, F8_E4M3, F8_E5M2)",
        path.display()
    )]
    UnsupportedDtype {
        /// The source file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// Its dtype.
        dtype: Dtype,
    },
    /// The plan was not made from this file's header.
    #[error(
        "{}: the conversion plan does not match this file: {detail}",
        path.display()
    )]
    PlanMismatch {
        /// The source file.
        path: PathBuf,
        /// What differs.
        detail: String,
    },
    /// A cast refused its input (a planning bug, never a property of the data).
    #[error("{}: tensor {tensor:?}: {source}", path.display())]
    Cast {
        /// The source file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What the cast refused.
        source: CastError,
    },
    /// Reading the source failed.
    #[error("{}: reading the source failed: {source}", path.display())]
    Read {
        /// The source file.
        path: PathBuf,
        /// The read error.
        source: io::Error,
    },
    /// The source's content cannot be served correctly (bad input).
    #[error("{}: tensor {tensor:?}: {problem}", path.display())]
    InvalidSource {
        /// The source file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What is wrong with its content.
        problem: String,
    },
    /// The source file is no longer the one whose header was validated.
    #[error(
        "{}: the file changed after it was opened (size or header differ)",
        path.display()
    )]
    SourceChanged {
        /// The source file.
        path: PathBuf,
    },
    /// Writing the output failed (disk full, closed pipe...).
    #[error("{}: writing the converted output failed: {source}", path.display())]
    Write {
        /// The file being converted (the output is a writer, which has no path).
        path: PathBuf,
        /// The write error.
        source: io::Error,
    },
}

impl ConvertError {
    /// Whether the input is at fault (a source convcache cannot convert, or that changed),
    /// rather than reading, writing or a planning bug (`Cast`, `PlanMismatch`: never
    /// properties of the data).
    pub fn is_input_fault(&self) -> bool {
        matches!(
            self,
            ConvertError::UnsupportedTarget { .. }
                | ConvertError::UnsupportedDtype { .. }
                | ConvertError::InvalidSource { .. }
                | ConvertError::SourceChanged { .. }
        )
    }

    /// The I/O error, when reading or writing failed (to tell a full disk from bad input).
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            ConvertError::Write { source, .. } | ConvertError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<SourceError> for ConvertError {
    fn from(e: SourceError) -> ConvertError {
        match e {
            SourceError::Io { path, source } => ConvertError::Read { path, source },
            SourceError::Changed { path } => ConvertError::SourceChanged { path },
            SourceError::Invalid {
                path,
                tensor,
                problem,
            } => ConvertError::InvalidSource {
                path,
                tensor,
                problem,
            },
            // Only opening a sharded source fails this way, never a converter's read.
            SourceError::Sharded(e) => ConvertError::InvalidSource {
                path: e.path().to_owned(),
                tensor: String::new(),
                problem: e.to_string(),
            },
            // Only opening a diffusers-layout source fails this way.
            SourceError::Diffusers(e) => ConvertError::InvalidSource {
                path: e.path().to_owned(),
                tensor: String::new(),
                problem: e.to_string(),
            },
        }
    }
}

/// The output dtype of one source tensor, and whether it is a 1-D/scalar tensor kept 16-bit.
fn output_dtype(
    path: &Path,
    t: &SourceTensor,
    target: Dtype,
) -> Result<(Dtype, bool), ConvertError> {
    if !t.dtype.is_float() {
        return Ok((t.dtype, false));
    }
    if !is_cast_source(t.dtype) {
        return Err(ConvertError::UnsupportedDtype {
            path: path.to_owned(),
            tensor: t.name.clone(),
            dtype: t.dtype,
        });
    }
    let fp8 = matches!(target, Dtype::F8E4M3 | Dtype::F8E5M2);
    if fp8 && t.shape.len() < 2 {
        let keep = match t.dtype {
            Dtype::F32 | Dtype::BF16 => Dtype::BF16,
            _ => Dtype::F16,
        };
        return Ok((keep, true));
    }
    Ok((target, false))
}

/// Plans the conversion of `source` to `target` (its tensor list only, no data read).
pub fn plan<S: TensorSource + ?Sized>(source: &S, target: Precision) -> Result<Plan, ConvertError> {
    let (path, tensors) = (source.path(), source.tensors());
    let dst = target
        .safetensors_dtype()
        .ok_or_else(|| ConvertError::UnsupportedTarget {
            path: path.to_owned(),
            target,
        })?;
    let n = tensors.len();
    let mut plan = Plan {
        target,
        specs: Vec::with_capacity(n),
        actions: Vec::with_capacity(n),
        source_dtypes: Vec::with_capacity(n),
        kept_16bit: Vec::new(),
        bytes_in: 0,
    };
    for t in tensors {
        let (dtype, kept) = output_dtype(path, t, dst)?;
        plan.actions.push(if dtype == t.dtype {
            Action::Copy
        } else {
            Action::Cast
        });
        if kept {
            plan.kept_16bit.push(t.name.clone());
        }
        plan.source_dtypes.push(t.dtype);
        plan.specs.push(TensorSpec {
            name: t.name.clone(),
            dtype,
            shape: t.shape.clone(),
        });
        plan.bytes_in = plan.bytes_in.saturating_add(t.source_bytes);
    }
    Ok(plan)
}

/// The output's `__metadata__`: the source's, with `extra` (provenance) added over it.
pub fn merged_metadata(
    source: &BTreeMap<String, String>,
    extra: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut m = source.clone();
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
pub fn convert<S: TensorSource + ?Sized, W: Write>(
    src: &S,
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
pub fn convert_with<S: TensorSource + ?Sized, W: Write>(
    src: &S,
    plan: &Plan,
    metadata: &BTreeMap<String, String>,
    out: W,
    options: ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, ConvertError> {
    check_plan(src, plan)?;
    src.check_unchanged()?;
    convert_source(src, plan, metadata, out, options, progress, None)
}

/// Receives every byte of the source file exactly once, in file order, as the conversion reads
/// it (see [`convert_observing_source`]).
pub type SourceObserver<'a> = &'a mut (dyn FnMut(&[u8]) + Send);

/// [`convert_with`] of a safetensors file served as stored, also handing the whole file to
/// `observer` in order: the length prefix and header first, then every tensor's bytes as they
/// are read for the conversion (a validated header's tensors cover the data section exactly, in
/// offset order). The caller can hash the source without reading it a second time (the
/// content digest in an output's provenance).
pub fn convert_observing_source<W: Write>(
    src: &SafetensorsFile,
    plan: &Plan,
    metadata: &BTreeMap<String, String>,
    out: W,
    options: ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
    observer: SourceObserver<'_>,
) -> Result<Report, ConvertError> {
    check_plan(src, plan)?;
    let prefix = src
        .unchanged_prefix()
        .map_err(|e| ConvertError::from(SourceError::from(e)))?;
    observer(&prefix);
    convert_source(src, plan, metadata, out, options, progress, Some(observer))
}

/// One unit of output: a whole small tensor, or a chunk of a large one.
#[derive(Debug, Clone, Copy)]
struct Piece {
    tensor: usize,
    /// Element range within the tensor.
    start: usize,
    end: usize,
    last_of_tensor: bool,
    /// Output bytes.
    out_len: usize,
    /// Source bytes it stands for (progress).
    source_bytes: u64,
}

impl pipeline::Piece for Piece {
    fn out_len(&self) -> usize {
        self.out_len
    }
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

/// The conversion itself: the header, then every piece through the pipeline. Memory: one
/// source buffer and the pipeline's two output buffers, of at most `options.chunk_bytes` each.
fn convert_source<S: TensorSource + ?Sized, W: Write>(
    source: &S,
    plan: &Plan,
    metadata: &BTreeMap<String, String>,
    out: W,
    options: ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
    observer: Option<SourceObserver<'_>>,
) -> Result<Report, ConvertError> {
    let path = source.path();
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
    let tensors = source.tensors();
    // The read buffer is sized for the largest piece, so a small model allocates little.
    // Page-aligned (see `ReadBuffer`): the kernel copies into it at full speed. Only one piece
    // is produced at a time, so the locks are never contended.
    let in_cap = (0..plan.specs.len())
        .filter(|&i| plan.actions[i] == Action::Cast)
        .map(|i| tensors[i].byte_len().unwrap_or(0).min(budget as u64) as usize)
        .max()
        .unwrap_or(0);
    let input = Mutex::new(ReadBuffer::new());
    let stats = Mutex::new(CastStats::default());
    let observer = observer.map(Mutex::new);
    let produce = |piece: &Piece, dst: &mut [u8]| -> Result<(), ConvertError> {
        let t = &tensors[piece.tensor];
        let es = (t.dtype.bits() / 8) as usize;
        let offset = (piece.start * es) as u64;
        let observe = |bytes: &[u8]| {
            if let Some(o) = &observer {
                let mut o = o.lock().unwrap_or_else(|e| e.into_inner());
                o(bytes);
            }
        };
        let piece_stats = match plan.actions[piece.tensor] {
            Action::Copy => {
                source.read_raw(piece.tensor, offset, dst)?;
                observe(dst);
                CastStats {
                    non_finite: count_non_finite(t.dtype, dst),
                    ..CastStats::default()
                }
            }
            Action::Cast => {
                let mut input = input.lock().unwrap_or_else(|e| e.into_inner());
                let src = input.get((piece.end - piece.start) * es, in_cap);
                source.read_raw(piece.tensor, offset, src)?;
                let src = &*src;
                let dst_dtype = plan.specs[piece.tensor].dtype;
                let mut cast = || {
                    cast_slice_par(t.dtype, src, dst_dtype, dst).map_err(|e| ConvertError::Cast {
                        path: path.to_owned(),
                        tensor: t.name.clone(),
                        source: e,
                    })
                };
                if observer.is_some() {
                    // Hashing the chunk runs beside its cast, on the same bytes.
                    rayon::join(|| observe(src), cast).1?
                } else {
                    cast()?
                }
            }
        };
        *stats.lock().unwrap_or_else(|e| e.into_inner()) += piece_stats;
        Ok(())
    };
    let mut bytes_done = 0u64;
    let mut tensors_done = 0u64;
    let streamed = pipeline::stream(
        pieces(tensors, plan, budget),
        &mut w,
        &produce,
        &mut |piece: &Piece| {
            bytes_done += piece.source_bytes;
            tensors_done += u64::from(piece.last_of_tensor);
            progress(bytes_done, tensors_done);
        },
    );
    match streamed {
        Ok(()) => {}
        Err(StreamError::Produce(e)) => return Err(e),
        Err(StreamError::Write(e)) => return Err(write_err(e)),
    }
    let counting = w.finish().map_err(write_err)?;
    let stats = stats.into_inner().unwrap_or_else(|e| e.into_inner());
    report.overflowed = stats.overflowed;
    report.non_finite = stats.non_finite;
    report.bytes_in = bytes_done;
    report.bytes_out = counting.written;
    Ok(report)
}

/// The pieces of the output in order: each tensor whole, or in chunks of at most `budget` output
/// bytes (and at most `budget` source bytes).
fn pieces<'p>(
    tensors: &'p [SourceTensor],
    plan: &'p Plan,
    budget: usize,
) -> impl Iterator<Item = Piece> + 'p {
    tensors.iter().enumerate().flat_map(move |(i, t)| {
        let n = t.n_elements() as usize;
        let out_size = (plan.specs[i].dtype.bits() / 8) as usize;
        let in_size = (t.dtype.bits() / 8) as usize;
        let per = (budget / out_size.max(in_size).max(1)).max(1);
        let count = n.div_ceil(per).max(1);
        (0..count).map(move |k| {
            let (start, end) = ((k * per).min(n), ((k + 1) * per).min(n));
            Piece {
                tensor: i,
                start,
                end,
                last_of_tensor: k + 1 == count,
                out_len: (end - start) * out_size,
                // Proportional, exact for sources that serve what they store.
                source_bytes: (u128::from(t.source_bytes) * (end - start) as u128)
                    .checked_div(n as u128)
                    .unwrap_or(0) as u64,
            }
        })
    })
}

/// Refuses a plan made for another source (its fields are public, so it may have been edited).
fn check_plan<S: TensorSource + ?Sized>(source: &S, plan: &Plan) -> Result<(), ConvertError> {
    let mismatch = |detail: String| ConvertError::PlanMismatch {
        path: source.path().to_owned(),
        detail,
    };
    let tensors = source.tensors();
    let n = tensors.len();
    if plan.specs.len() != n || plan.actions.len() != n || plan.source_dtypes.len() != n {
        return Err(mismatch(format!(
            "{} tensors planned, the file has {n}",
            plan.specs.len()
        )));
    }
    for ((t, spec), (action, src_dtype)) in tensors
        .iter()
        .zip(&plan.specs)
        .zip(plan.actions.iter().zip(&plan.source_dtypes))
    {
        if t.name != spec.name || t.shape != spec.shape || t.dtype != *src_dtype {
            return Err(mismatch(format!("tensor {:?} differs", t.name)));
        }
        // Every byte length and element count below comes from a validated source; these
        // checks keep a hand-made plan from reading or writing out of bounds.
        let n_elem = t.n_elements();
        let elem_bits_ok = t.dtype.bits() % 8 == 0 && spec.dtype.bits() % 8 == 0;
        let consistent = match action {
            Action::Copy => spec.dtype == t.dtype,
            Action::Cast => is_cast_source(t.dtype) && is_cast_source(spec.dtype),
        };
        if !consistent
            || !elem_bits_ok
            || t.byte_len().is_none()
            || usize::try_from(n_elem).is_err()
            || spec.byte_len().is_none()
        {
            return Err(mismatch(format!(
                "tensor {:?}: {:?} from {} to {} is not possible",
                t.name, action, t.dtype, spec.dtype
            )));
        }
    }
    Ok(())
}
