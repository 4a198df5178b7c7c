//! [`TensorSource`]: the one way converters read tensors, whatever the file.
//!
//! A source lists its tensors ([`SourceTensor`]: name, shape, the dtype it serves, what the file
//! stores) and reads any element range of one of them, as raw bytes of the served dtype
//! ([`TensorSource::read_raw`]) or widened exactly to f32 ([`TensorSource::read_f32`]).
//! Implementations: a validated [`SafetensorsFile`] (every tensor as stored), the view of ComfyUI
//! quantized files ([`crate::scaled::ScaledView`]: scaled-fp8, nvfp4 and mxfp8 weights
//! dequantized, scale and marker tensors hidden), a shard index and its shards
//! ([`crate::sharded::ShardedSource`]), a diffusers-layout model served in ComfyUI's layout
//! ([`crate::diffusers::DiffusersView`]) and a GGUF file (dequantizing; in the `gguf` crate,
//! which has the block kernels).
//!
//! Reads are positioned reads into the caller's buffers (never a long-lived map: its touched
//! pages would count against the process's memory, see [`crate::safetensors::ReadBuffer`]), so
//! many threads read one source at once and memory is the caller's chunk, never the model.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::cast::widen_to_f32;
use crate::gguf::GgmlType;
use crate::safetensors::{Dtype, Header, ReadBuffer, SafetensorsError, SafetensorsFile};

/// What the file holds for a tensor (as opposed to the dtype a source serves it in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// A safetensors dtype.
    Safetensors(Dtype),
    /// A ggml type (GGUF).
    Ggml(GgmlType),
}

/// One tensor of a [`TensorSource`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTensor {
    /// Its name in the source (or, for a view, the name it is served under).
    pub name: String,
    /// Logical shape, torch order (row-major, last dimension fastest).
    pub shape: Vec<u64>,
    /// The dtype [`TensorSource::read_raw`] serves.
    pub dtype: Dtype,
    /// What the file stores.
    pub stored: Stored,
    /// Bytes of the source file read to serve the whole tensor (progress accounting).
    pub source_bytes: u64,
}

impl SourceTensor {
    /// Number of elements (1 for a scalar). Saturates; validated sources never overflow.
    pub fn n_elements(&self) -> u64 {
        self.shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .unwrap_or(u64::MAX)
    }

    /// Bytes of the served dtype for the whole tensor, if it fits in a `u64`.
    pub fn byte_len(&self) -> Option<u64> {
        self.dtype.bytes_for(self.n_elements())
    }
}

/// A tensor the source does not serve, and why (scale tensors folded into their weight,
/// markers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HiddenTensor {
    /// Its name in the file.
    pub name: String,
    /// Why it is not served.
    pub reason: &'static str,
}

/// Why reading a source failed. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The file could not be read (an I/O fault, not bad input).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure, with the tensor and range in its message.
        source: io::Error,
    },
    /// The file changed after its header was validated.
    #[error("{}: the file changed while it was being read; run the command again", path.display())]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// The file's content cannot be served correctly (bad input).
    #[error("{}: tensor `{tensor}`: {problem}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The tensor concerned.
        tensor: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A sharded source whose index or shards are invalid, missing or unreadable.
    #[error(transparent)]
    Sharded(#[from] crate::sharded::ShardError),
    /// A diffusers-layout source whose keys cannot all be served in ComfyUI's layout (boxed:
    /// it is rare and large, and every read returns this type).
    #[error(transparent)]
    Diffusers(Box<crate::diffusers::DiffusersError>),
}

impl From<crate::diffusers::DiffusersError> for SourceError {
    fn from(e: crate::diffusers::DiffusersError) -> SourceError {
        SourceError::Diffusers(Box::new(e))
    }
}

impl SourceError {
    /// The file concerned.
    pub fn path(&self) -> &Path {
        match self {
            SourceError::Io { path, .. }
            | SourceError::Changed { path }
            | SourceError::Invalid { path, .. } => path,
            SourceError::Sharded(e) => e.path(),
            SourceError::Diffusers(e) => e.path(),
        }
    }

    /// Whether the fault is in the input (bad or changed file) rather than in reading it.
    pub fn is_input_fault(&self) -> bool {
        match self {
            SourceError::Io { .. } => false,
            SourceError::Sharded(e) => e.is_input_fault(),
            _ => true,
        }
    }

    /// [`SourceError::Invalid`] for `tensor` of `path`.
    pub fn invalid(path: &Path, tensor: &str, problem: impl fmt::Display) -> SourceError {
        SourceError::Invalid {
            path: path.to_owned(),
            tensor: tensor.to_owned(),
            problem: problem.to_string(),
        }
    }
}

impl From<SafetensorsError> for SourceError {
    fn from(e: SafetensorsError) -> SourceError {
        match e {
            SafetensorsError::Changed { path, .. } => SourceError::Changed { path },
            SafetensorsError::Io { path, source } => SourceError::Io { path, source },
            e => SourceError::Invalid {
                path: e.path().to_owned(),
                tensor: String::new(),
                problem: e.to_string(),
            },
        }
    }
}

/// Where converters read tensors from.
///
/// `index` arguments are positions in [`TensorSource::tensors`]; ranges are checked against the
/// tensor (an out-of-range read is an error, never a panic or a read of another tensor).
pub trait TensorSource: Sync + fmt::Debug {
    /// The file, for messages.
    fn path(&self) -> &Path;

    /// Every tensor the source serves, in the order the file holds their data (reading them in
    /// this order reads the file sequentially).
    fn tensors(&self) -> &[SourceTensor];

    /// The file's own string metadata (safetensors `__metadata__`).
    fn metadata(&self) -> &BTreeMap<String, String>;

    /// Tensors of the file this source does not serve, with the reason.
    fn hidden(&self) -> &[HiddenTensor] {
        &[]
    }

    /// Fills `buf` with the bytes of tensor `index` in its served dtype, starting `byte_offset`
    /// bytes into the tensor.
    fn read_raw(&self, index: usize, byte_offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;

    /// Fills `out` with elements `start..start + out.len()` of tensor `index`, widened exactly
    /// to f32 (torch's `.to(torch.float32)`).
    fn read_f32(&self, index: usize, start: u64, out: &mut [f32]) -> Result<(), SourceError> {
        read_f32_via_raw(self, index, start, out)
    }

    /// Fails with [`SourceError::Changed`] when the file is no longer the one whose header was
    /// validated (size, header or identity): converters call it before writing.
    fn check_unchanged(&self) -> Result<(), SourceError> {
        Ok(())
    }

    /// The index of the tensor called `name`.
    fn index_of(&self, name: &str) -> Option<usize> {
        self.tensors().iter().position(|t| t.name == name)
    }
}

/// Elements read and widened at a time by [`read_f32_via_raw`]: the raw bytes are still in
/// cache when they are widened, and a chunk of millions of elements needs no second buffer as
/// large as itself.
const WIDEN_PIECE: usize = 1 << 17;

thread_local! {
    /// The raw-bytes buffer of [`read_f32_via_raw`] on this thread.
    static RAW: RefCell<ReadBuffer> = RefCell::new(ReadBuffer::new());
}

/// [`TensorSource::read_f32`] through [`TensorSource::read_raw`] and [`widen_to_f32`], piece by
/// piece through a per-thread page-aligned buffer.
pub fn read_f32_via_raw<S: TensorSource + ?Sized>(
    source: &S,
    index: usize,
    start: u64,
    out: &mut [f32],
) -> Result<(), SourceError> {
    let t = tensor(source, index)?;
    check_range(source, t, start, out.len() as u64)?;
    let dtype = t.dtype;
    let es = (dtype.bits() / 8) as usize;
    if es == 0 || dtype.bits() % 8 != 0 {
        return Err(SourceError::invalid(
            source.path(),
            &t.name,
            format!("{dtype} values cannot be read as floats"),
        ));
    }
    // The buffer is the thread's own (this is called from many small parallel tasks); nothing
    // in the loop runs another task on this thread, so the borrow is not re-entered, and a
    // fresh buffer covers the case anyway.
    RAW.with(|raw| {
        let mut fresh = ReadBuffer::new();
        let mut borrowed = raw.try_borrow_mut();
        let raw = match borrowed.as_deref_mut() {
            Ok(raw) => raw,
            Err(_) => &mut fresh,
        };
        let mut at = start;
        for piece in out.chunks_mut(WIDEN_PIECE) {
            let bytes = raw.get(piece.len() * es, WIDEN_PIECE * es);
            source.read_raw(index, at * es as u64, bytes)?;
            widen_to_f32(dtype, bytes, piece)
                .map_err(|e| SourceError::invalid(source.path(), &t.name, e))?;
            at += piece.len() as u64;
        }
        Ok(())
    })
}

/// [`TensorSource::read_raw`] for a tensor served as F32 that the source computes
/// ([`TensorSource::read_f32`]: dequantized, de-scaled): little-endian f32 bytes, in whole
/// elements.
pub fn read_raw_via_f32<S: TensorSource + ?Sized>(
    source: &S,
    index: usize,
    byte_offset: u64,
    buf: &mut [u8],
) -> Result<(), SourceError> {
    if !byte_offset.is_multiple_of(4) || !buf.len().is_multiple_of(4) {
        return Err(SourceError::invalid(
            source.path(),
            &tensor(source, index)?.name,
            "computed f32 values are read in whole elements",
        ));
    }
    let mut values = vec![0f32; buf.len() / 4];
    source.read_f32(index, byte_offset / 4, &mut values)?;
    for (dst, v) in buf.chunks_exact_mut(4).zip(&values) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
    Ok(())
}

/// The 16-bit float dtype a quantized output keeps its unquantized floats in: the source's
/// dominant 16-bit float dtype (by elements), BF16 when it has no 16-bit floats (an f32 model).
///
/// The dtypes counted are the ones the source serves. A scaled-fp8 weight, served de-scaled as
/// F32, counts for neither, so such a model gets the dtype its unquantized floats are in (bf16
/// for the fp8_scaled Flux releases), which is also what its loaders compute in.
pub fn compute_dtype(tensors: &[SourceTensor]) -> Dtype {
    let count = |d: Dtype| -> u64 {
        tensors
            .iter()
            .filter(|t| t.dtype == d)
            .map(SourceTensor::n_elements)
            .fold(0u64, u64::saturating_add)
    };
    if count(Dtype::F16) > count(Dtype::BF16) {
        Dtype::F16
    } else {
        Dtype::BF16
    }
}

/// Tensor `index` of `source`, or an error naming the file.
pub fn tensor<S: TensorSource + ?Sized>(
    source: &S,
    index: usize,
) -> Result<&SourceTensor, SourceError> {
    source.tensors().get(index).ok_or_else(|| {
        SourceError::invalid(
            source.path(),
            &format!("#{index}"),
            "no such tensor in the source",
        )
    })
}

/// Refuses elements `start..start + len` unless they lie inside `t`.
pub fn check_range<S: TensorSource + ?Sized>(
    source: &S,
    t: &SourceTensor,
    start: u64,
    len: u64,
) -> Result<(), SourceError> {
    if start.checked_add(len).is_none_or(|e| e > t.n_elements()) {
        return Err(SourceError::invalid(
            source.path(),
            &t.name,
            format!("elements {start}+{len} are outside the tensor"),
        ));
    }
    Ok(())
}

/// The tensors of a validated safetensors header, as a source serves them unchanged.
pub fn safetensors_tensors(header: &Header) -> Vec<SourceTensor> {
    header
        .tensors
        .iter()
        .map(|e| SourceTensor {
            name: e.name.clone(),
            shape: e.shape.clone(),
            dtype: e.dtype,
            stored: Stored::Safetensors(e.dtype),
            source_bytes: e.byte_len(),
        })
        .collect()
}

/// A validated safetensors file serves every tensor as stored. Reading the tensors in order
/// reads the file sequentially: a validated header's tensors cover the data section exactly, in
/// offset order.
impl TensorSource for SafetensorsFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn tensors(&self) -> &[SourceTensor] {
        self.source_tensors()
    }

    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.header.metadata
    }

    fn read_raw(&self, index: usize, byte_offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let entry = self.header.tensors.get(index).ok_or_else(|| {
            SourceError::invalid(&self.path, &format!("#{index}"), "no such tensor")
        })?;
        Ok(self.read_tensor_range(entry, byte_offset, buf)?)
    }

    fn check_unchanged(&self) -> Result<(), SourceError> {
        Ok(SafetensorsFile::check_unchanged(self)?)
    }
}

/// Opens a safetensors file as converters read it: through [`crate::scaled::ScaledView`] (weights
/// dequantized, scales and markers hidden) when it has a ComfyUI scaled-fp8, nvfp4 or mxfp8
/// layout, as stored otherwise.
/// A layout that cannot be served correctly is refused ([`SourceError::Invalid`]).
///
/// A shard index, or a folder holding one, opens as one [`crate::sharded::ShardedSource`]
/// (refused when a shard has a scaled-fp8 layout: the de-scaling view reads one file).
///
/// A model in a diffusers layout (one file or sharded) is served in ComfyUI's layout through
/// [`crate::diffusers::DiffusersView`]; a diffusers repository folder stands for its model
/// ([`crate::diffusers::resolve_source`]).
pub fn open_safetensors(path: &Path) -> Result<Box<dyn TensorSource>, SourceError> {
    open_safetensors_shared(path, None)
}

/// [`open_safetensors`], reading tensor data through `seat`'s windows
/// ([`crate::shared_read`]) for the files (the one file, or the shards) `seat` reads.
pub fn open_safetensors_shared(
    path: &Path,
    seat: Option<&crate::shared_read::Seat>,
) -> Result<Box<dyn TensorSource>, SourceError> {
    use crate::diffusers::DiffusersView;
    let resolved = crate::diffusers::resolve_source(path);
    let path = resolved.as_path();
    if crate::sharded::locate_index(path)?.is_some() {
        let sharded = crate::sharded::ShardedSource::open_shared(path, seat)?;
        if let Some(shard) = sharded.scaled_shard() {
            let path = shard.to_owned();
            return Err(crate::sharded::ShardError::ScaledShard { path }.into());
        }
        return Ok(match DiffusersView::wrap(sharded)? {
            Ok(view) => Box::new(view),
            Err(sharded) => Box::new(sharded),
        });
    }
    let file = SafetensorsFile::open_shared(path, seat)?;
    match crate::scaled::ScaledLayout::of_file(&file) {
        Ok(None) => Ok(match DiffusersView::wrap(file)? {
            Ok(view) => Box::new(view),
            Err(file) => Box::new(file),
        }),
        Ok(Some(layout)) => Ok(Box::new(crate::scaled::ScaledView::new(file, layout)?)),
        Err(e) => Err(SourceError::Invalid {
            path: path.to_owned(),
            tensor: e.tensor,
            problem: e.problem,
        }),
    }
}
