#![warn(missing_docs)]
//! The three-stage conversion: the source already is the target; a valid cached output; or
//! convert under a lock with verification and atomic publish.
//!
//! [`smart_convert`]:
//! 1. `detect::detect(source)`; if `detect::should_skip(source precision, target)`, the source
//!    itself is the answer ([`Status::SourceIsTarget`]).
//! 2. [`cache::Cache::lookup`] with the chosen backend's converter version: a valid output is the
//!    answer ([`Status::Cached`], or [`Status::CachedUnverified`] for a file without
//!    provenance). The hit is recorded as a use (for least-recently-used eviction).
//! 3. Otherwise: take the output's exclusive lock (`File::lock` on
//!    `<output dir>/.convcache/<name>.lock`), look again (another process may have just
//!    finished), remove temporaries of dead writers, plan, check free space and the file-size
//!    limit against the exact output size, stream into `.<name>.<pid>.tmp` in the output dir
//!    (the source's digest computed from the bytes the converter reads, when it reads them all
//!    in order; writeback to the disk started as the data is written), fsync, verify
//!    (re-detect: precision = target, complete, size = planned, provenance as written), write
//!    the output record (size, mtime and digest of the bytes written, see [`cache::record`]),
//!    rename into place, fsync the directory ([`Status::Converted`]). With
//!    [`Options::sync_output`] off, the two fsyncs are skipped and the record marks the output
//!    for one re-verification after a restart.
//!
//! A hit is served only if the output's data is what was published: its size and mtime equal
//! its output record (no hashing), or else its digest does; an output whose data changed is
//! reconverted. An output without a record is served with [`Outcome::note`] saying so (and
//! reconverted when [`Options::strict`]).
//!
//! On any error the temporary is removed and nothing appears at the cache path. A cancelled or
//! killed conversion leaves its temporary with a resume journal ([`cache::journal`]): the next
//! conversion of that output continues it when everything checks out ([`Options::resume`]),
//! else removes it; sweeps ([`cache::Cache::sweep_temporaries`]) remove those that can no
//! longer be resumed.
//!
//! Converters plug in through [`Backend`] (see [`backends`]).
//!
//! A caller follows a conversion through an [`Observer`] ([`Options::observer`]): the
//! [`Stage`]s of each (source, target) [`Pair`], bytes done of bytes total, each tensor
//! finished, and the answer.
//!
//! When the output will not fit (free space, or [`Options::max_cache_size`]), the error says
//! how much evicting least recently used outputs would free; with [`Options::make_room`] they
//! are evicted ([`cache::Cache::make_room`]) and listed in [`Outcome::removed`].
//!
//! [`Options`] is the one description of a request besides its source and target: the CLI
//! builds it once; the converters' [`BackendOptions`] and the cache's [`LookupOptions`] are
//! derived from it, each in one place ([`Options::backend_options`],
//! [`Options::lookup_options`]).
//!
//! The cache identity of an output (its converter version) records the options that were used,
//! resolved against the source: a forced GGUF architecture that is the one detected in the
//! source is no force at all, so `convert --arch flux` of a flux model and a plain `convert`
//! (or `check`) make and find the same output.
//!
//! # Example
//!
//! Convert a one-tensor F32 file to fp16 in a temporary models dir, then ask again:
//!
//! ```
//! use std::collections::BTreeMap;
//! use detect::Precision;
//! use smart::{Options, Status, smart_convert};
//! use tensorfile::{Dtype, SafetensorsWriter, TensorSpec};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let source = dir.path().join("tiny.safetensors");
//! let spec = TensorSpec { name: "w".into(), dtype: Dtype::F32, shape: vec![2] };
//! let file = std::fs::File::create(&source)?;
//! let mut writer = SafetensorsWriter::new(file, &[spec], &BTreeMap::new())?;
//! writer.write_chunk(&[1.5f32.to_le_bytes(), (-2.0f32).to_le_bytes()].concat())?;
//! writer.finish()?;
//!
//! let options = Options::new(cache::ModelsDir::at(dir.path().join("models")));
//! let first = smart_convert(&source, Precision::Fp16, &options)?;
//! assert_eq!(first.status, Status::Converted);
//! assert!(first.path.ends_with("models/diffusion_models/converted/tiny_fp16.safetensors"));
//! let again = smart_convert(&source, Precision::Fp16, &options)?;
//! assert_eq!((again.status, again.path), (Status::Cached, first.path));
//! # Ok(())
//! # }
//! ```

mod backend;
pub mod backends;
pub mod many;
mod publish;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cache::{
    Cache, CacheError, KnownDigest, LookupOptions, LookupStatus, ModelsDir, Removed, Room,
};
use detect::{DetectError, Detection, Precision};

pub use backend::{
    Backend, BackendOptions, ConversionReport, ConverterError, InFile, Job, PlannedConversion,
    Unencodable,
};
pub use publish::ignore_file_size_signal;

/// What [`smart_convert`] and [`check`] need besides the source and target: the request, built
/// once by the caller.
#[derive(Clone)]
pub struct Options<'a> {
    /// Where outputs are looked up and published.
    pub models_dir: ModelsDir,
    /// Reconvert files at the cache path that carry no provenance (made by another tool).
    pub strict: bool,
    /// Hash the source and the cached output on every lookup, not only when their size or
    /// mtime changed.
    pub verify_digest: bool,
    /// bitsandbytes 4-bit targets: double-quantize absmax.
    pub double_quant: bool,
    /// Told of stages, bytes, tensors and the answer, as the conversion goes.
    pub observer: Option<&'a dyn Observer>,
    /// Set to stop (an interrupt): a conversion, a hashing pass or a wait for another
    /// process's lock fails with [`SmartError::Cancelled`] soon after and nothing is
    /// published; the temporary is kept with its resume journal once a checkpoint was
    /// journaled (see [`Options::resume`]), else removed. A call made once it is set does
    /// nothing.
    pub cancel: Option<Arc<AtomicBool>>,
    /// The source's digest from an earlier call ([`Outcome::known_digest`]): used instead of
    /// hashing the source while its path, size and mtime are unchanged (not with
    /// `verify_digest`).
    pub known_digest: Option<KnownDigest>,
    /// GGUF targets: force this architecture instead of detecting it from tensor names (the
    /// output and its identity are those of a plain conversion when it names the detected one).
    pub gguf_arch: Option<gguf::Arch>,
    /// Wait for the output's data to reach the disk (fsync) before publishing it (the default).
    /// `false` publishes as soon as the data is in the page cache, for when the conversion
    /// itself must be fast: the output record then carries this boot's id; the first hit in
    /// this boot syncs the output, and after a restart it is hashed once before it is served,
    /// so a conversion cut short by a crash is never served; tools that read the file directly
    /// right after a power loss could still see a torn file. Where the boot cannot be
    /// identified (not Linux), outputs are always synced.
    pub sync_output: bool,
    /// The cache's size budget: an output that would take the listed outputs (itself included)
    /// over it does not fit, like one the disk has no room for.
    pub max_cache_size: Option<u64>,
    /// When the output does not fit, evict least recently used outputs until it does
    /// ([`cache::Cache::make_room`]) instead of failing.
    pub make_room: bool,
    /// Files never evicted to make room: the outputs this request's caller already answered
    /// with (earlier targets of the same command). The source is always spared.
    pub spare: Vec<PathBuf>,
    /// This conversion's seat at a read of the source shared with other conversions running
    /// at once ([`many::convert_many`] sets it): the converter reads through it, and the
    /// source digest is the shared read's.
    pub shared_read: Option<many::SharedSeat>,
    /// The outputs other conversions of the same request are writing at once
    /// ([`many::convert_many`] sets it): they count against the size budget, and conversions
    /// check for room one at a time.
    pub room_in_flight: Option<Arc<many::RoomInFlight>>,
    /// Continue an interrupted conversion of the same output from its last durable checkpoint
    /// when its journal and temporary check out ([`cache::journal`]; the default). `false`
    /// removes them and starts over.
    pub resume: bool,
    /// The least time between two checkpoints of a conversion's resume journal (each one
    /// syncs the data written so far, unless unsynced): an interruption loses about this much
    /// work. Default 1 s; tests use zero (a checkpoint at every boundary).
    pub checkpoint_every: std::time::Duration,
    /// Whether a cancelled conversion keeps its journaled temporary for the next run to
    /// resume (the CLI's Ctrl-C: the default), or removes it and its journal (the Python
    /// package's cancel, which promises that nothing is left behind).
    pub keep_on_cancel: bool,
}

/// Collapses a possibly multi-line message into one line (its non-empty lines, trimmed, joined
/// by `; `): how both edges, the CLI's stderr and the Python package's exceptions, show an
/// error, whatever a library put in its Display.
pub fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Environment variable: the least milliseconds between two resume checkpoints (default
/// 1000), read by [`Options::new`] for tests and benchmarks that interrupt short conversions
/// (the CLI and the Python package alike).
pub const CHECKPOINT_MS_ENV: &str = "CONVCACHE_CHECKPOINT_MS";

impl<'a> Options<'a> {
    /// Defaults: not strict, no digest on every lookup, no double quantization, no observer,
    /// no size budget, no eviction; resume on, a checkpoint at most every second (or every
    /// [`CHECKPOINT_MS_ENV`] milliseconds).
    pub fn new(models_dir: ModelsDir) -> Options<'a> {
        let checkpoint_ms = std::env::var(CHECKPOINT_MS_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        Options {
            models_dir,
            strict: false,
            verify_digest: false,
            double_quant: false,
            observer: None,
            cancel: None,
            known_digest: None,
            gguf_arch: None,
            sync_output: true,
            max_cache_size: None,
            make_room: false,
            spare: Vec::new(),
            shared_read: None,
            room_in_flight: None,
            resume: true,
            checkpoint_every: std::time::Duration::from_millis(checkpoint_ms),
            keep_on_cancel: true,
        }
    }

    /// The converters' options for `source`: a forced GGUF architecture is kept only when it
    /// differs from the one detected in the source, so that it changes the output (and its
    /// converter version) only when it changes what is converted.
    pub fn backend_options(&self, source: &Detection) -> BackendOptions {
        BackendOptions {
            double_quant: self.double_quant,
            gguf_arch: self
                .gguf_arch
                .filter(|a| source.architecture.as_deref() != Some(a.name())),
        }
    }

    /// The cache's view of this request, for an output made by `converter_version` (`None`: no
    /// backend makes this target from this source).
    pub fn lookup_options(&self, converter_version: Option<String>) -> LookupOptions {
        LookupOptions {
            strict: self.strict,
            verify_digest: self.verify_digest,
            converter_version,
            cancel: self.cancel.clone(),
            known_digest: self.known_digest.clone(),
            model_kind: cache::ModelKind::default(),
        }
    }

    /// Whether [`Options::cancel`] is set.
    fn cancelled(&self) -> bool {
        self.cancel
            .as_deref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// Diffusion model or text encoder, which picks the models folder of the outputs: `--arch`
/// does not change it (it only forces GGUF's table), the source's own keys do.
fn model_kind(detection: &Detection) -> cache::ModelKind {
    detection.model_kind
}

impl std::fmt::Debug for Options<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("models_dir", &self.models_dir)
            .field("strict", &self.strict)
            .field("verify_digest", &self.verify_digest)
            .field("double_quant", &self.double_quant)
            .field("observer", &self.observer.is_some())
            .field("cancel", &self.cancel)
            .field("known_digest", &self.known_digest)
            .field("gguf_arch", &self.gguf_arch)
            .field("sync_output", &self.sync_output)
            .field("max_cache_size", &self.max_cache_size)
            .field("make_room", &self.make_room)
            .field("spare", &self.spare)
            .field("shared_read", &self.shared_read.is_some())
            .field("room_in_flight", &self.room_in_flight)
            .finish()
    }
}

/// Which stage answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The source already is in the target precision; `path` is the source.
    SourceIsTarget,
    /// A valid earlier conversion.
    Cached,
    /// A file without provenance at the cache path, in the target precision.
    CachedUnverified,
    /// Converted now.
    Converted,
}

/// What [`smart_convert`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    /// Which of the three stages answered.
    pub status: Status,
    /// The file in the target precision.
    pub path: PathBuf,
    /// The source, as given.
    pub source: PathBuf,
    /// The requested precision.
    #[serde(serialize_with = "ser_precision")]
    pub target: Precision,
    /// The source's detected precision.
    #[serde(serialize_with = "ser_opt_precision")]
    pub source_precision: Option<Precision>,
    /// The converter's report ([`Status::Converted`] only).
    pub report: Option<ConversionReport>,
    /// Why the file at the cache path was replaced (stale, broken, foreign), if it was.
    pub replaced: Option<String>,
    /// What a cached answer could not verify (an output without an output record).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Outputs evicted to make room for this one ([`Options::make_room`]), least recently used
    /// first.
    pub removed: Vec<Removed>,
    /// The source's digest and the facts it holds for, when this call knew it: pass it as
    /// [`Options::known_digest`] to the next call on the same source (another target) so that
    /// the source is not hashed again.
    #[serde(skip)]
    pub known_digest: Option<KnownDigest>,
    /// The byte of the output from which this conversion continued an interrupted one
    /// ([`Options::resume`]); the bytes before it were checked against the interrupted one's
    /// journal, not converted again (so the report's counts cover the part converted now).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<u64>,
}

fn ser_precision<S: serde::Serializer>(p: &Precision, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(p.canonical_name())
}

fn ser_opt_precision<S: serde::Serializer>(p: &Option<Precision>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => s.serialize_str(p.canonical_name()),
        None => s.serialize_none(),
    }
}

/// A stage of one conversion, in the order they come (a stage may repeat: a conversion planned
/// again converts again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Detecting the source, looking in the cache, taking the output's lock (header work).
    Planning,
    /// Computing the source's content digest in a pass of its own (bytes of the source).
    Hashing,
    /// Writing the output (bytes of the source read, tensors finished).
    Converting,
    /// Re-detecting the written temporary.
    Verifying,
    /// Syncing, recording and renaming the output into place.
    Publishing,
}

impl Stage {
    /// The stage's name (`planning`, `hashing`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Stage::Planning => "planning",
            Stage::Hashing => "hashing",
            Stage::Converting => "converting",
            Stage::Verifying => "verifying",
            Stage::Publishing => "publishing",
        }
    }
}

/// The (source, target) pair an [`Observer`] event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair<'a> {
    /// The source, as given.
    pub source: &'a Path,
    /// The requested precision.
    pub target: Precision,
}

/// Follows conversions as they go ([`Options::observer`]). Every method has a default that
/// does nothing. Calls come from the converting thread, in order for one pair; they should
/// return quickly (they are made per tensor and per chunk).
pub trait Observer: Send + Sync {
    /// `pair` enters `stage`.
    fn stage(&self, pair: Pair<'_>, stage: Stage) {
        let _ = (pair, stage);
    }

    /// The conversion is planned, before [`Stage::Converting`]: it writes an output of
    /// `output_bytes`, reading `source_bytes` of the source and `tensors` tensors.
    fn planned(&self, pair: Pair<'_>, output_bytes: u64, source_bytes: u64, tensors: u64) {
        let _ = (pair, output_bytes, source_bytes, tensors);
    }

    /// `done` of `total` bytes of `stage` ([`Stage::Hashing`]: source bytes hashed;
    /// [`Stage::Converting`]: source bytes converted). Within a stage `done` never decreases,
    /// and a stage that completes reports `done == total` last.
    fn bytes(&self, pair: Pair<'_>, stage: Stage, done: u64, total: u64) {
        let _ = (pair, stage, done, total);
    }

    /// Tensor `index` (from 0, in the order the converter writes them) of `count` is converted.
    fn tensor(&self, pair: Pair<'_>, index: u64, count: u64) {
        let _ = (pair, index, count);
    }

    /// `pair` is answered or failed; no more events for it follow.
    fn finished(&self, pair: Pair<'_>, result: Result<&Outcome, &SmartError>) {
        let _ = (pair, result);
    }
}

/// Why a conversion failed. Every message names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum SmartError {
    /// The source could not be read or recognised.
    #[error(transparent)]
    Detect(#[from] DetectError),
    /// A cache operation failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The source's precision could not be determined.
    #[error("{0}: cannot determine the source's precision")]
    UnknownSourcePrecision(PathBuf),
    /// The source is in a layout or dtype convcache cannot read (`why`: detection's notes).
    #[error("{path}: cannot be converted: {why}")]
    UnreadableSource {
        /// The source file.
        path: PathBuf,
        /// Detection's notes.
        why: String,
    },
    /// No backend converts this source to this target.
    #[error("{path}: no converter turns {from} into {target}")]
    Unsupported {
        /// The source file.
        path: PathBuf,
        /// The source's detected precision (canonical name).
        from: String,
        /// The requested precision.
        target: Precision,
    },
    /// The cache path of the output is the source itself (a mislabelled file in the cache dir).
    #[error("{0}: the source is at the cache path of its own conversion; move or rename it first")]
    SourceIsOutput(PathBuf),
    /// Not enough free space for the output, found before writing.
    #[error(
        "{path}: not enough free space: the output needs {needed} bytes, {available} are available; {}",
        room_advice(room, *evicted)
    )]
    NoSpace {
        /// The output's path.
        path: PathBuf,
        /// The output's exact size in bytes.
        needed: u64,
        /// Bytes free on its filesystem.
        available: u64,
        /// What evicting least recently used outputs frees (or, with `evicted`, freed).
        room: Room,
        /// Whether those outputs were evicted ([`Options::make_room`]).
        evicted: bool,
    },
    /// The output would take the cache over [`Options::max_cache_size`], found before writing.
    #[error(
        "{path}: the output ({needed} bytes) would take the cache {over} bytes over its size limit of {max} bytes; {}",
        room_advice(room, *evicted)
    )]
    OverBudget {
        /// The output's path.
        path: PathBuf,
        /// The output's exact size in bytes.
        needed: u64,
        /// The budget in bytes.
        max: u64,
        /// Bytes over the budget before anything was evicted.
        over: u64,
        /// What evicting least recently used outputs frees (or, with `evicted`, freed).
        room: Room,
        /// Whether those outputs were evicted ([`Options::make_room`]).
        evicted: bool,
    },
    /// The output would exceed the process's file-size limit (`ulimit -f`).
    #[error("{path}: the output needs {needed} bytes, over the file-size limit of {limit} bytes")]
    FileSizeLimit {
        /// The output's path.
        path: PathBuf,
        /// The output's exact size in bytes.
        needed: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// The disk filled up (ENOSPC) or the file-size limit was hit (EFBIG) while writing.
    #[error("{path}: no space left while writing the output ({source}); nothing was published")]
    DiskFull {
        /// The output's path.
        path: PathBuf,
        /// The write error.
        source: std::io::Error,
    },
    /// A filesystem operation failed.
    #[error("{path}: cannot {op}: {source}")]
    Io {
        /// The file or directory operated on.
        path: PathBuf,
        /// What could not be done, as the message's verb phrase.
        op: &'static str,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The converter failed (its message names the file).
    #[error("{source}")]
    Backend {
        /// Whether the input is at fault (see [`ConverterError`]).
        input_fault: bool,
        /// The converter's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The written output did not verify; nothing was published.
    #[error("{path}: the converted output failed verification: {problem}; nothing was published")]
    Verify {
        /// The output's path.
        path: PathBuf,
        /// What the verification found.
        problem: String,
    },
    /// [`Options::cancel`] was set.
    #[error("{0}: conversion cancelled; nothing was published")]
    Cancelled(PathBuf),
}

/// The end of a no-room message: what evicting least recently used outputs would free (or
/// freed, when `evicted`).
fn room_advice(room: &Room, evicted: bool) -> String {
    let (n, bytes) = (room.removed.len(), room.removed_bytes());
    match (evicted, room.enough) {
        (false, true) => format!(
            "--make-room would free {bytes} bytes by evicting the {n} least recently used output(s)"
        ),
        (false, false) => format!(
            "--make-room could not free enough: the evictable outputs hold only {bytes} bytes"
        ),
        (true, true) => {
            format!(
                "{n} least recently used output(s) ({bytes} bytes) were evicted, still not enough"
            )
        }
        (true, false) => {
            format!("evicting every evictable output ({n}, {bytes} bytes) was not enough")
        }
    }
}

impl SmartError {
    /// Wraps a converter error, keeping its kind.
    pub fn backend(e: impl ConverterError) -> SmartError {
        SmartError::Backend {
            input_fault: e.is_input_fault(),
            source: Box::new(e),
        }
    }

    /// Wraps a converter error whose message does not name the file: `PATH: error`.
    pub fn backend_in(path: &Path, error: impl ConverterError) -> SmartError {
        SmartError::backend(InFile {
            path: path.to_path_buf(),
            error,
        })
    }

    /// Whether the input is at fault: the source cannot be read as a model, holds what its
    /// converter refuses, cannot become the target, or sits at its own output path. Otherwise
    /// the conversion itself failed (I/O, full disk, verification, cancelled).
    pub fn is_input_fault(&self) -> bool {
        match self {
            SmartError::Detect(_)
            | SmartError::UnknownSourcePrecision(_)
            | SmartError::Unsupported { .. }
            | SmartError::UnreadableSource { .. }
            | SmartError::SourceIsOutput(_)
            | SmartError::Cache(CacheError::NotAFile(_)) => true,
            SmartError::Cache(CacheError::Sharded(e)) => e.is_input_fault(),
            SmartError::Backend { input_fault, .. } => *input_fault,
            _ => false,
        }
    }

    /// Whether the call stopped because [`Options::cancel`] was set.
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self,
            SmartError::Cancelled(_) | SmartError::Cache(CacheError::Cancelled(_))
        )
    }
}

/// Whether the source `detection` describes is its own answer for `target` (stage 1 of
/// [`smart_convert`]), and why: [`detect::should_skip`] on its precision, for a source that can
/// be its own answer at all (one readable file in ComfyUI's layout: a sharded or diffusers
/// source in the target precision is still converted into one ComfyUI-layout file, which
/// ComfyUI's loaders read).
pub fn skips(detection: &Detection, target: Precision) -> Option<detect::SkipReason> {
    let source = detection.precision?;
    if !can_be_its_own_answer(detection) {
        return None;
    }
    detect::should_skip(source, target)
}

/// Converts `source` to `target` with the default backends, or answers from the source itself
/// or the cache. See the crate docs for the stages.
pub fn smart_convert(
    source: &Path,
    target: Precision,
    options: &Options<'_>,
) -> Result<Outcome, SmartError> {
    smart_convert_with(source, target, options, backends::DEFAULT)
}

/// [`smart_convert`] with an explicit list of backends (the first that supports the job is
/// used).
pub fn smart_convert_with(
    source: &Path,
    target: Precision,
    options: &Options<'_>,
    backends: &[&dyn Backend],
) -> Result<Outcome, SmartError> {
    let pair = Pair { source, target };
    if let Some(o) = options.observer {
        o.stage(pair, Stage::Planning);
    }
    let result = answer(source, target, options, backends);
    if let Some(o) = options.observer {
        o.finished(pair, result.as_ref());
    }
    result
}

/// [`smart_convert_with`] without the observer's first and last events.
fn answer(
    source: &Path,
    target: Precision,
    options: &Options<'_>,
    backends: &[&dyn Backend],
) -> Result<Outcome, SmartError> {
    if options.cancelled() {
        return Err(SmartError::Cancelled(source.to_path_buf()));
    }
    // A diffusers repository folder is converted as the model it holds.
    let resolved = tensorfile::diffusers::resolve_source(source);
    let source = resolved.as_path();
    let detection = detect::detect(source)?;
    let source_precision = detection.precision;
    let outcome = |status, path: PathBuf, note, known_digest| Outcome {
        status,
        path,
        source: source.to_path_buf(),
        target,
        source_precision,
        report: None,
        replaced: None,
        note,
        removed: Vec::new(),
        known_digest,
        resumed_from: None,
    };
    let Some(sp) = source_precision else {
        return Err(SmartError::UnknownSourcePrecision(source.to_path_buf()));
    };

    // Stage 1: nothing to do.
    if skips(&detection, target).is_some() {
        return Ok(outcome(
            Status::SourceIsTarget,
            source.to_path_buf(),
            None,
            None,
        ));
    }

    // Stage 2: a valid earlier conversion.
    let backend_options = options.backend_options(&detection);
    let backend = backends
        .iter()
        .copied()
        .find(|b| b.supports(&detection, target));
    let mut lookup_options =
        options.lookup_options(backend.map(|b| b.converter_version(target, &backend_options)));
    lookup_options.model_kind = model_kind(&detection);
    let cache = Cache::new(options.models_dir.clone());
    // Leftovers of killed writers go on the next run, hit or miss. Best effort: a read-only
    // models dir must still answer hits.
    let _ = cache.sweep_temporaries();
    let lookup = cache.lookup(source, target, &lookup_options)?;
    if let Some(status) = usable(&lookup.status) {
        // A read-only models dir must not turn a hit into a failure: the stamp is best effort.
        cache.record_hit(&lookup);
        let known = publish::known_digest(&lookup);
        return Ok(outcome(status, lookup.path, lookup.note, known));
    }

    // Stage 3: convert.
    let Some(backend) = backend else {
        if !detection.supported_as_source {
            return Err(SmartError::UnreadableSource {
                path: source.to_path_buf(),
                why: detection.notes.join("; "),
            });
        }
        return Err(SmartError::Unsupported {
            path: source.to_path_buf(),
            from: sp.canonical_name().to_string(),
            target,
        });
    };
    let job = publish::Convert {
        cache: &cache,
        source,
        detection: &detection,
        target,
        backend,
        backend_options,
        lookup_options: &lookup_options,
        options,
    };
    let done = job.run(lookup)?;
    Ok(Outcome {
        report: done.report,
        replaced: done.replaced,
        removed: done.removed,
        resumed_from: done.resumed_from,
        ..outcome(done.status, done.path, done.note, done.known_digest)
    })
}

/// The verdict of [`check`] for one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    /// The source already is in the target precision (`path` is the source).
    SourceIsTarget,
    /// A valid cached output.
    Hit,
    /// A file without provenance in the target precision (used unless strict).
    Unverified,
    /// Nothing at the path.
    Missing,
    /// An output made before the source or the converter changed.
    Stale,
    /// Incomplete, corrupt, wrong precision or unreadable provenance.
    Broken,
    /// A file without provenance, rejected because strict.
    Foreign,
}

/// One target of [`check`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// The target checked.
    #[serde(serialize_with = "ser_precision")]
    pub target: Precision,
    /// The verdict.
    pub status: CheckStatus,
    /// Whether [`smart_convert`] would answer without converting.
    pub valid: bool,
    /// Whether a file is at `path`.
    pub exists: bool,
    /// The file that would be answered, or where a conversion would be published.
    pub path: PathBuf,
    /// Why a file at `path` is stale or broken; for a hit, what could not be verified (no
    /// output record).
    pub reason: Option<String>,
}

/// Whether the source can be its own answer: one readable file in ComfyUI's layout (shards
/// and a diffusers layout always convert, the output being one ComfyUI-layout file; a source
/// convcache cannot read is refused, never handed back).
fn can_be_its_own_answer(detection: &Detection) -> bool {
    detection.supported_as_source && detection.shards.is_none() && detection.diffusers.is_none()
}

/// What [`smart_convert`] would do for each target, without converting or recording a use:
/// the same detection, skip rule, backend choice (its converter version) and lookup.
pub fn check(
    source: &Path,
    targets: &[Precision],
    options: &Options<'_>,
) -> Result<Vec<Check>, SmartError> {
    check_with(source, targets, options, backends::DEFAULT)
}

/// [`check`] with explicit backends.
pub fn check_with(
    source: &Path,
    targets: &[Precision],
    options: &Options<'_>,
    backends: &[&dyn Backend],
) -> Result<Vec<Check>, SmartError> {
    let resolved = tensorfile::diffusers::resolve_source(source);
    let source = resolved.as_path();
    let detection = detect::detect(source)?;
    if detection.precision.is_none() {
        return Err(SmartError::UnknownSourcePrecision(source.to_path_buf()));
    }
    let cache = Cache::new(options.models_dir.clone());
    let backend_options = options.backend_options(&detection);
    let mut earlier: Option<cache::Lookup> = None;
    let mut out = Vec::with_capacity(targets.len());
    for &target in targets {
        if skips(&detection, target).is_some() {
            out.push(Check {
                target,
                status: CheckStatus::SourceIsTarget,
                valid: true,
                exists: true,
                path: source.to_path_buf(),
                reason: None,
            });
            continue;
        }
        let mut lookup_options = options.lookup_options(
            backends
                .iter()
                .find(|b| b.supports(&detection, target))
                .map(|b| b.converter_version(target, &backend_options)),
        );
        lookup_options.model_kind = model_kind(&detection);
        // Reuse the digest across targets (it is only valid while the source is unchanged,
        // which lookup_again checks).
        let l = match &earlier {
            Some(e) => cache.lookup_again(source, target, &lookup_options, e)?,
            None => cache.lookup(source, target, &lookup_options)?,
        };
        let (status, reason) = match &l.status {
            LookupStatus::Hit => (CheckStatus::Hit, l.note.clone()),
            LookupStatus::Unverified => (CheckStatus::Unverified, None),
            LookupStatus::Missing => (CheckStatus::Missing, None),
            LookupStatus::Stale(r) => (CheckStatus::Stale, Some(r.clone())),
            LookupStatus::Broken(r) => (CheckStatus::Broken, Some(r.clone())),
            LookupStatus::Foreign => (CheckStatus::Foreign, None),
        };
        out.push(Check {
            target,
            status,
            valid: l.status.is_usable(),
            exists: std::fs::symlink_metadata(&l.path).is_ok(),
            path: l.path.clone(),
            reason,
        });
        if l.source_digest.is_some() || earlier.is_none() {
            earlier = Some(l);
        }
    }
    Ok(out)
}

fn usable(status: &LookupStatus) -> Option<Status> {
    match status {
        LookupStatus::Hit => Some(Status::Cached),
        LookupStatus::Unverified => Some(Status::CachedUnverified),
        _ => None,
    }
}
