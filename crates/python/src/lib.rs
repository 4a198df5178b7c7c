#![warn(missing_docs)]
//! `convcache._native`: the Python package's native module, calling [`smart`], [`cache`] and
//! [`detect`] in-process (no CLI child process).
//!
//! The package's Python layer (`python/convcache/__init__.py`) re-exports these functions and
//! adds what only Python knows: ComfyUI's `folder_paths` (its models dir, and model names of
//! its `diffusion_models` and `checkpoints` folders as sources).
//!
//! What Python callers rely on, and where it is decided:
//! - Conversions run on a thread of their own with the GIL released ([`run_conversion`]); the
//!   calling thread waits in slices of [`SIGNAL_POLL`], checking for signals, so Ctrl-C
//!   (`KeyboardInterrupt`) sets [`smart::Options::cancel`] — the flag the CLI's signal handler
//!   sets — and the conversion stops, removing its temporary, before the exception propagates.
//! - The `progress(bytes_done, bytes_total, stage)` callback is an [`smart::Observer`]
//!   ([`Progress`]), throttled to one call per [`PROGRESS_INTERVAL`] within a stage; returning
//!   `False` sets the same cancel flag.
//! - Errors: [`smart::SmartError`]'s kind picks the exception ([`error_to_py`]): `Cancelled`,
//!   `SourceError` (the input is at fault, exit 2 in the CLI) or `ConversionError` (exit 1); the
//!   message is the CLI's error line, which names the file.
//! - Dict-shaped answers are the typed reports' serde form, as the CLI's `--json` prints them
//!   ([`json_to_py`]).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ::detect::Precision;
use ::detect::precision::Container;
use cache::{Cache, Entry, Kind, ModelsDir, Stats};
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList};
use serde_json::Value;
use smart::{Observer, Pair, SmartError, Stage, Status, one_line};

pyo3::create_exception!(
    convcache,
    ConvcacheError,
    PyException,
    "Base class of convcache's errors; the message names the file concerned."
);
pyo3::create_exception!(
    convcache,
    SourceError,
    ConvcacheError,
    "The input is at fault: the source cannot be read as a model, holds what its converter \
     refuses, or cannot become the target (the CLI's exit 2)."
);
pyo3::create_exception!(
    convcache,
    ConversionError,
    ConvcacheError,
    "The conversion (or a cache operation) failed: I/O, a full disk, verification (the CLI's \
     exit 1). Nothing was published."
);
pyo3::create_exception!(
    convcache,
    Cancelled,
    ConvcacheError,
    "The conversion was cancelled (the progress callback returned False); nothing was \
     published and the temporary was removed."
);

/// How long the waiting thread sleeps between checks for signals (Ctrl-C).
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// The least time between two progress calls within one stage (a stage's first and last calls
/// are always made).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// The exception for a failed smart call.
fn error_to_py(e: &SmartError) -> PyErr {
    let message = one_line(&e.to_string());
    if e.is_cancelled() {
        Cancelled::new_err(message)
    } else if e.is_input_fault() {
        SourceError::new_err(message)
    } else {
        ConversionError::new_err(message)
    }
}

/// A failed cache operation (listing, cleaning up) is neither the source's fault nor a
/// conversion's: the base class.
fn cache_error_to_py(e: &cache::CacheError) -> PyErr {
    ConvcacheError::new_err(one_line(&e.to_string()))
}

/// A target name as the CLI's `--to` accepts it.
fn parse_target(target: &str) -> PyResult<Precision> {
    Precision::from_str(target).map_err(|e| PyValueError::new_err(format!("{target}: {e}")))
}

/// The models dir: `models_dir` when given, else as the CLI resolves it
/// (`CONVCACHE_MODELS_DIR`, a ComfyUI install above the current directory, `./models`).
fn models(models_dir: Option<PathBuf>) -> PyResult<ModelsDir> {
    ModelsDir::resolve(models_dir.as_deref()).map_err(|e| cache_error_to_py(&e))
}

/// A JSON value (a typed report's serde form) as Python objects.
fn json_to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u.into_pyobject(py)?.into_any(),
            (None, Some(i)) => i.into_pyobject(py)?.into_any(),
            (None, None) => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Value::String(s) => s.into_pyobject(py)?.into_any(),
        Value::Array(items) => {
            let items = items
                .iter()
                .map(|v| json_to_py(py, v))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, v) in map {
                dict.set_item(k, json_to_py(py, v)?)?;
            }
            dict.into_any()
        }
    })
}

/// A path as a Python `str` (undecodable bytes as `os.fsdecode` gives them).
fn path_to_py<'py>(py: Python<'py>, path: &Path) -> PyResult<Bound<'py, PyAny>> {
    Ok(path.as_os_str().into_pyobject(py)?.into_any())
}

/// The progress callback as an [`Observer`]: throttled calls with the GIL taken for each; a
/// `False` answer or an exception sets the cancel flag (the exception is kept and raised once
/// the conversion has stopped).
struct Progress {
    callback: Py<PyAny>,
    cancel: Arc<AtomicBool>,
    state: Mutex<ProgressState>,
}

#[derive(Default)]
struct ProgressState {
    /// The stage of the last call and when it was made.
    last: Option<(Stage, Instant)>,
    /// Bytes total of the stage under way (0 until known).
    total: u64,
    /// The callback's exception, if it raised one.
    error: Option<PyErr>,
}

impl Progress {
    fn call(&self, stage: Stage, done: u64, total: u64, force: bool) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.error.is_some() || self.cancel.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        let due = match state.last {
            Some((s, at)) => s != stage || now.duration_since(at) >= PROGRESS_INTERVAL,
            None => true,
        };
        if !(force || due) {
            return;
        }
        state.last = Some((stage, now));
        let answer = Python::attach(|py| {
            self.callback
                .call1(py, (done, total, stage.name()))
                .map(|v| v.bind(py).is(PyBool::new(py, false)))
        });
        match answer {
            Ok(false) => {}
            Ok(true) => self.cancel.store(true, Ordering::Relaxed),
            Err(e) => {
                state.error = Some(e);
                self.cancel.store(true, Ordering::Relaxed);
            }
        }
    }

    fn take_error(&self) -> Option<PyErr> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .error
            .take()
    }
}

impl Observer for Progress {
    fn stage(&self, _pair: Pair<'_>, stage: Stage) {
        let total = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if matches!(stage, Stage::Planning) {
                state.total = 0;
            }
            state.total
        };
        // Verifying and publishing follow a finished conversion: all bytes are done.
        let done = match stage {
            Stage::Verifying | Stage::Publishing => total,
            _ => 0,
        };
        self.call(stage, done, total, true);
    }

    fn planned(&self, _pair: Pair<'_>, _output_bytes: u64, source_bytes: u64, _tensors: u64) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total = source_bytes;
    }

    fn bytes(&self, _pair: Pair<'_>, stage: Stage, done: u64, total: u64) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total = total;
        self.call(stage, done, total, done == total);
    }
}

/// Runs `job` (which reads `options.cancel`) on a thread of its own with the GIL released,
/// while this thread checks for signals every [`SIGNAL_POLL`]. A signal handler's exception
/// (`KeyboardInterrupt`) sets `cancel`, waits for the job to stop, and is returned.
fn run_conversion<T: Send>(
    py: Python<'_>,
    cancel: &AtomicBool,
    job: impl FnOnce() -> T + Send,
) -> PyResult<T> {
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        // Shared with the GIL-free wait below (a receiver alone is not `Sync`).
        let rx = Mutex::new(rx);
        let worker = scope.spawn(move || {
            // The receiver outlives the worker (joined below); a failed send cannot happen.
            let _ = tx.send(job());
        });
        let mut interrupted = None;
        let result = loop {
            match py.detach(|| {
                rx.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .recv_timeout(SIGNAL_POLL)
            }) {
                Ok(result) => break Some(result),
                Err(mpsc::RecvTimeoutError::Disconnected) => break None,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if interrupted.is_none()
                        && let Err(e) = py.check_signals()
                    {
                        cancel.store(true, Ordering::Relaxed);
                        interrupted = Some(e);
                    }
                }
            }
        };
        // The worker has sent its result (or panicked, which the join absorbs, so the scope
        // does not panic again); joining does not wait on Python.
        let _ = py.detach(|| worker.join());
        if let Some(e) = interrupted {
            return Err(e);
        }
        match result {
            Some(r) => Ok(r),
            None => Err(ConversionError::new_err(
                "the conversion thread stopped without an answer (a panic); nothing was published",
            )),
        }
    })
}

/// Converts `source_path` to `target_precision`, or answers from the source itself or the
/// cache. Returns `(path, was_newly_converted)`. A cancelled conversion removes its temporary
/// unless `keep_partial` (then a journaled temporary is kept for the next call to resume).
#[pyfunction]
#[pyo3(signature = (source_path, target_precision, *, models_dir=None, strict=false, progress=None, keep_partial=false))]
fn smart_convert<'py>(
    py: Python<'py>,
    source_path: PathBuf,
    target_precision: &str,
    models_dir: Option<PathBuf>,
    strict: bool,
    progress: Option<Bound<'py, PyAny>>,
    keep_partial: bool,
) -> PyResult<(Bound<'py, PyAny>, bool)> {
    let target = parse_target(target_precision)?;
    let cancel = Arc::new(AtomicBool::new(false));
    let observer = match progress {
        Some(p) if p.is_none() => None,
        Some(p) if !p.is_callable() => {
            return Err(pyo3::exceptions::PyTypeError::new_err(
                "progress must be a callable taking (bytes_done, bytes_total, stage)",
            ));
        }
        Some(p) => Some(Progress {
            callback: p.unbind(),
            cancel: cancel.clone(),
            state: Mutex::default(),
        }),
        None => None,
    };
    let mut options = smart::Options::new(models(models_dir)?);
    options.strict = strict;
    options.keep_on_cancel = keep_partial;
    options.cancel = Some(cancel.clone());
    options.observer = observer.as_ref().map(|o| o as &dyn Observer);
    let result = run_conversion(py, &cancel, || {
        smart::smart_convert(&source_path, target, &options)
    })?;
    if let Some(e) = observer.as_ref().and_then(Progress::take_error) {
        return Err(e);
    }
    let outcome = result.map_err(|e| error_to_py(&e))?;
    Ok((
        path_to_py(py, &outcome.path)?,
        outcome.status == Status::Converted,
    ))
}

/// What `convcache check` answers for `targets` (converting nothing), with the GIL released
/// (a lookup may hash the source).
fn check(
    py: Python<'_>,
    source: &Path,
    targets: &[Precision],
    models_dir: Option<PathBuf>,
) -> PyResult<Vec<smart::Check>> {
    let cancel = Arc::new(AtomicBool::new(false));
    let mut options = smart::Options::new(models(models_dir)?);
    options.cancel = Some(cancel.clone());
    run_conversion(py, &cancel, || smart::check(source, targets, &options))?
        .map_err(|e| error_to_py(&e))
}

/// `{precision: (exists, path)}` for each of `precisions` (keys as given): `exists` is whether
/// a valid conversion is there, as `convcache check` decides it (`valid`), and `path` the file
/// that would answer or where a conversion would be published.
#[pyfunction]
#[pyo3(signature = (source_path, precisions, *, models_dir=None))]
fn batch_check_conversions<'py>(
    py: Python<'py>,
    source_path: PathBuf,
    precisions: Vec<String>,
    models_dir: Option<PathBuf>,
) -> PyResult<Bound<'py, PyDict>> {
    let targets = precisions
        .iter()
        .map(|p| parse_target(p))
        .collect::<PyResult<Vec<_>>>()?;
    let checks = check(py, &source_path, &targets, models_dir)?;
    let dict = PyDict::new(py);
    for (name, c) in precisions.iter().zip(&checks) {
        dict.set_item(name, (c.valid, path_to_py(py, &c.path)?))?;
    }
    Ok(dict)
}

/// Whether an entry belongs to a `conversion_type`. Selection is by the output's precision over
/// every dir the cache lists, so output dirs the cache adds are covered.
#[derive(Debug, Clone, Copy)]
enum ConversionType {
    /// Safetensors casts and ComfyUI's quantized layouts (not bitsandbytes).
    Precision,
    /// bitsandbytes NF4/FP4/int8.
    Bitsandbytes,
    /// GGUF files.
    Gguf,
    /// Everything.
    All,
}

impl ConversionType {
    fn parse(name: &str) -> PyResult<ConversionType> {
        Ok(match name {
            "precision" => ConversionType::Precision,
            "bitsandbytes" => ConversionType::Bitsandbytes,
            "gguf" => ConversionType::Gguf,
            "all" => ConversionType::All,
            other => {
                return Err(PyValueError::new_err(format!(
                    "conversion_type {other:?}: expected 'precision', 'bitsandbytes', 'gguf' or 'all'"
                )));
            }
        })
    }

    fn includes(self, precision: Precision) -> bool {
        match self {
            ConversionType::All => true,
            ConversionType::Gguf => precision.container() == Container::Gguf,
            ConversionType::Bitsandbytes => precision.is_bitsandbytes(),
            ConversionType::Precision => {
                precision.container() == Container::Safetensors && !precision.is_bitsandbytes()
            }
        }
    }
}

/// The `conversion_type` a target's outputs belong to: `'precision'`, `'bitsandbytes'` or
/// `'gguf'`.
#[pyfunction]
fn conversion_type_of(target: &str) -> PyResult<&'static str> {
    let target = parse_target(target)?;
    Ok(if ConversionType::Bitsandbytes.includes(target) {
        "bitsandbytes"
    } else if ConversionType::Gguf.includes(target) {
        "gguf"
    } else {
        "precision"
    })
}

/// The listed outputs of a conversion type (`convcache list`'s entries, filtered).
fn entries(conversion_type: &str, models_dir: Option<PathBuf>) -> PyResult<Vec<Entry>> {
    let kind = ConversionType::parse(conversion_type)?;
    let cache = Cache::new(models(models_dir)?);
    let all = cache.list(Kind::All).map_err(|e| cache_error_to_py(&e))?;
    Ok(all
        .into_iter()
        .filter(|e| kind.includes(e.precision))
        .collect())
}

/// `[(basename, precision, path)]` of the cached outputs, as `convcache list` lists them.
#[pyfunction]
#[pyo3(signature = (conversion_type="all", *, models_dir=None))]
fn list_converted_models<'py>(
    py: Python<'py>,
    conversion_type: &str,
    models_dir: Option<PathBuf>,
) -> PyResult<Vec<(String, &'static str, Bound<'py, PyAny>)>> {
    entries(conversion_type, models_dir)?
        .into_iter()
        .map(|e| {
            Ok((
                e.basename,
                e.precision.canonical_name(),
                path_to_py(py, &e.path)?,
            ))
        })
        .collect()
}

/// `convcache stats --json`'s fields (`count`, `total_bytes`, `by_precision`, `unusable`),
/// plus `total_size_gb` (GiB) and `models_by_precision` (`{precision: count}`).
#[pyfunction]
#[pyo3(signature = (conversion_type="all", *, models_dir=None))]
fn get_conversion_stats<'py>(
    py: Python<'py>,
    conversion_type: &str,
    models_dir: Option<PathBuf>,
) -> PyResult<Bound<'py, PyAny>> {
    let stats = Stats::from_entries(&entries(conversion_type, models_dir)?);
    let mut value =
        serde_json::to_value(&stats).map_err(|e| ConvcacheError::new_err(e.to_string()))?;
    if let Value::Object(map) = &mut value {
        map.insert(
            "total_size_gb".into(),
            Value::from(stats.total_bytes as f64 / (1u64 << 30) as f64),
        );
        let by: serde_json::Map<String, Value> = stats
            .by_precision
            .iter()
            .map(|(k, t)| (k.clone(), Value::from(t.count)))
            .collect();
        map.insert("models_by_precision".into(), Value::Object(by));
    }
    json_to_py(py, &value)
}

/// Keeps the `keep_count` most recently used outputs of `source_path` (of `conversion_type`)
/// and removes the others, as `convcache cleanup SRC --keep N`; returns the removed paths (with
/// `dry_run`, those that would be removed).
#[pyfunction]
#[pyo3(signature = (source_path, conversion_type="all", keep_count=3, *, dry_run=false, models_dir=None))]
fn cleanup_old_conversions<'py>(
    py: Python<'py>,
    source_path: PathBuf,
    conversion_type: &str,
    keep_count: usize,
    dry_run: bool,
    models_dir: Option<PathBuf>,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let kind = ConversionType::parse(conversion_type)?;
    let cache = Cache::new(models(models_dir)?);
    let removed = py
        .detach(|| {
            // Leftovers of killed conversions go first, as in the CLI (never in a dry run).
            if !dry_run {
                let _ = cache.sweep_temporaries();
            }
            cache.cleanup_matching(&source_path, keep_count, dry_run, |e| {
                kind.includes(e.precision)
            })
        })
        .map_err(|e| cache_error_to_py(&e))?;
    removed.iter().map(|r| path_to_py(py, &r.path)).collect()
}

/// Everything `convcache detect --json` says about one file.
#[pyfunction]
#[pyo3(name = "detect")]
fn detect_file<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyAny>> {
    let detection = py
        .detach(|| ::detect::detect(&path))
        .map_err(|e| SourceError::new_err(one_line(&e.to_string())))?;
    let value =
        serde_json::to_value(&detection).map_err(|e| ConvcacheError::new_err(e.to_string()))?;
    json_to_py(py, &value)
}

/// The file's precision (canonical name) from its header, or `None` when it cannot be
/// determined; a file that cannot be read raises `SourceError`.
#[pyfunction]
fn detect_model_precision(py: Python<'_>, path: PathBuf) -> PyResult<Option<&'static str>> {
    let detection = py
        .detach(|| ::detect::detect(&path))
        .map_err(|e| SourceError::new_err(one_line(&e.to_string())))?;
    Ok(detection.precision.map(Precision::canonical_name))
}

/// `(True, reason)` when the source already is the target (`smart_convert` answers with the
/// source itself), else `(False, reason)`.
#[pyfunction]
fn should_skip_conversion(
    py: Python<'_>,
    source_path: PathBuf,
    target: &str,
) -> PyResult<(bool, String)> {
    let target = parse_target(target)?;
    let detection = py
        .detach(|| ::detect::detect(&source_path))
        .map_err(|e| SourceError::new_err(one_line(&e.to_string())))?;
    let Some(source) = detection.precision else {
        return Err(error_to_py(&SmartError::UnknownSourcePrecision(
            source_path,
        )));
    };
    Ok(match smart::skips(&detection, target) {
        Some(reason) => (true, reason.to_string()),
        None if detection.shards.is_some() && source == target => (
            false,
            "the source is sharded: it is merged into one file".to_owned(),
        ),
        None => (
            false,
            format!(
                "the source is {}, not {}",
                source.canonical_name(),
                target.canonical_name()
            ),
        ),
    })
}

/// The file `smart_convert(source_path, target)` would answer with, or where its conversion
/// would be published (`convcache check`'s `path`), converting nothing.
#[pyfunction]
#[pyo3(signature = (source_path, target, *, models_dir=None))]
fn get_converted_model_path<'py>(
    py: Python<'py>,
    source_path: PathBuf,
    target: &str,
    models_dir: Option<PathBuf>,
) -> PyResult<Bound<'py, PyAny>> {
    let target = parse_target(target)?;
    let checks = check(py, &source_path, &[target], models_dir)?;
    match checks.first() {
        Some(c) => path_to_py(py, &c.path),
        None => Err(ConvcacheError::new_err("no answer for the target")),
    }
}

/// The full `convcache check --json` rows for `targets` (dicts with `source`, `target`,
/// `status`, `valid`, `exists`, `path`, `reason`).
#[pyfunction]
#[pyo3(signature = (source_path, targets, *, models_dir=None))]
fn check_conversions<'py>(
    py: Python<'py>,
    source_path: PathBuf,
    targets: Vec<String>,
    models_dir: Option<PathBuf>,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let targets = targets
        .iter()
        .map(|p| parse_target(p))
        .collect::<PyResult<Vec<_>>>()?;
    let checks = check(py, &source_path, &targets, models_dir)?;
    checks
        .iter()
        .map(|c| {
            let mut value =
                serde_json::to_value(c).map_err(|e| ConvcacheError::new_err(e.to_string()))?;
            if let Value::Object(map) = &mut value {
                map.insert(
                    "source".into(),
                    Value::from(source_path.display().to_string()),
                );
            }
            json_to_py(py, &value)
        })
        .collect()
}

/// The models dir a call without `models_dir` uses (as the CLI resolves it).
#[pyfunction]
#[pyo3(signature = (models_dir=None))]
fn resolve_models_dir(py: Python<'_>, models_dir: Option<PathBuf>) -> PyResult<Bound<'_, PyAny>> {
    path_to_py(py, models(models_dir)?.root())
}

/// Every target name, canonical spelling (`fp16`, `nf4`, `fp8_scaled`, `Q4_K_M`, `gguf_f16`...),
/// in the CLI's order.
#[pyfunction]
fn supported_targets() -> Vec<&'static str> {
    Precision::all().map(Precision::target_name).collect()
}

/// The module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("ConvcacheError", py.get_type::<ConvcacheError>())?;
    m.add("SourceError", py.get_type::<SourceError>())?;
    m.add("ConversionError", py.get_type::<ConversionError>())?;
    m.add("Cancelled", py.get_type::<Cancelled>())?;
    m.add("MODELS_DIR_ENV", cache::MODELS_DIR_ENV)?;
    m.add_function(wrap_pyfunction!(smart_convert, m)?)?;
    m.add_function(wrap_pyfunction!(batch_check_conversions, m)?)?;
    m.add_function(wrap_pyfunction!(check_conversions, m)?)?;
    m.add_function(wrap_pyfunction!(list_converted_models, m)?)?;
    m.add_function(wrap_pyfunction!(get_conversion_stats, m)?)?;
    m.add_function(wrap_pyfunction!(cleanup_old_conversions, m)?)?;
    m.add_function(wrap_pyfunction!(detect_file, m)?)?;
    m.add_function(wrap_pyfunction!(detect_model_precision, m)?)?;
    m.add_function(wrap_pyfunction!(should_skip_conversion, m)?)?;
    m.add_function(wrap_pyfunction!(get_converted_model_path, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_models_dir, m)?)?;
    m.add_function(wrap_pyfunction!(supported_targets, m)?)?;
    m.add_function(wrap_pyfunction!(conversion_type_of, m)?)?;
    Ok(())
}
