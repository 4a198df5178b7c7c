//! Progress on stderr, as [`smart::Observer`]s: bars with ETA ([`Bars`]), or JSON-lines events
//! ([`JsonLines`], schema in docs/cli.md).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use detect::Precision;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use smart::{Observer, Outcome, Pair, SmartError, Stage};

use crate::convert_cmd::{removed_json, status_word};
use crate::output::one_line;

/// A pair as a map key.
type PairKey = (PathBuf, Precision);

fn key(pair: Pair<'_>) -> PairKey {
    (pair.source.to_path_buf(), pair.target)
}

/// Locks `m`; a poisoned lock only means another progress call panicked, the state is usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One bar per pair being converted, drawn on stderr (pairs converted at once get a line
/// each).
#[derive(Debug, Default)]
pub struct Bars {
    bars: Mutex<HashMap<PairKey, Bar>>,
    lines: MultiProgress,
}

/// One pair's bar and what its prefix shows.
#[derive(Debug)]
struct Bar {
    bar: ProgressBar,
    stage: Stage,
    /// (tensors done, tensors in all) of the conversion.
    tensors: (u64, u64),
}

impl Bar {
    /// A bar labelled `flux.safetensors -> bf16`, a line of `lines`.
    fn new(pair: Pair<'_>, lines: &MultiProgress) -> Bar {
        let bar = lines.add(ProgressBar::new(0));
        let style = ProgressStyle::with_template(
            "{msg} {prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(200));
        bar.set_message(format!(
            "{} -> {}",
            pair.source
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            pair.target.canonical_name()
        ));
        Bar {
            bar,
            stage: Stage::Planning,
            tensors: (0, 0),
        }
    }

    fn show_prefix(&self) {
        let (done, total) = self.tensors;
        self.bar.set_prefix(match (self.stage, total) {
            (Stage::Converting, 1..) => format!("{} {done}/{total} tensors", self.stage.name()),
            _ => self.stage.name().to_owned(),
        });
    }
}

impl Bars {
    /// Runs `f` on `pair`'s bar, made at its first event.
    fn with_bar(&self, pair: Pair<'_>, f: impl FnOnce(&mut Bar)) {
        let mut bars = lock(&self.bars);
        f(bars
            .entry(key(pair))
            .or_insert_with(|| Bar::new(pair, &self.lines)));
    }
}

impl Observer for Bars {
    fn stage(&self, pair: Pair<'_>, stage: Stage) {
        self.with_bar(pair, |b| {
            // A new stage restarts the count and the ETA.
            b.stage = stage;
            b.bar.reset();
            b.show_prefix();
        });
    }

    fn bytes(&self, pair: Pair<'_>, _stage: Stage, done: u64, total: u64) {
        self.with_bar(pair, |b| {
            b.bar.set_length(total);
            b.bar.set_position(done);
        });
    }

    fn planned(&self, pair: Pair<'_>, _output_bytes: u64, _source_bytes: u64, tensors: u64) {
        self.with_bar(pair, |b| b.tensors = (0, tensors));
    }

    fn tensor(&self, pair: Pair<'_>, index: u64, count: u64) {
        self.with_bar(pair, |b| {
            b.tensors = (index + 1, count);
            b.show_prefix();
        });
    }

    fn finished(&self, pair: Pair<'_>, _result: Result<&Outcome, &SmartError>) {
        if let Some(b) = lock(&self.bars).remove(&key(pair)) {
            b.bar.finish_and_clear();
            self.lines.remove(&b.bar);
        }
    }
}

/// The least time between two `progress` lines of one pair.
const JSONL_INTERVAL: Duration = Duration::from_millis(250);

/// Events as JSON lines on stderr: every stage change and every pair's end; progress at most
/// every [`JSONL_INTERVAL`] per pair, and always when a stage's bytes are all done.
#[derive(Debug)]
pub struct JsonLines {
    started: Instant,
    pairs: Mutex<HashMap<PairKey, JsonPair>>,
}

/// What was last written for one pair.
#[derive(Debug, Default)]
struct JsonPair {
    /// When the last `progress` line was written.
    written_at: Option<Instant>,
    /// Its (bytes done, tensors done), to skip a line that would repeat it.
    written: Option<(u64, u64)>,
    /// (tensors done, tensors in all), from tensor events.
    tensors: (u64, u64),
}

impl Default for JsonLines {
    fn default() -> Self {
        JsonLines {
            started: Instant::now(),
            pairs: Mutex::new(HashMap::new()),
        }
    }
}

impl JsonLines {
    /// Writes `event`: the fields every event has, then `fields`.
    fn write(&self, event: &str, pair: Pair<'_>, fields: Value) {
        let mut line = json!({
            "event": event,
            "time": self.started.elapsed().as_secs_f64(),
            "source": pair.source.display().to_string(),
            "target": pair.target.canonical_name(),
        });
        if let (Value::Object(line), Value::Object(fields)) = (&mut line, fields) {
            line.extend(fields);
        }
        let line = serde_json::to_string(&line).unwrap_or_else(|_| "null".to_owned());
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }
}

impl Observer for JsonLines {
    fn stage(&self, pair: Pair<'_>, stage: Stage) {
        let mut pairs = lock(&self.pairs);
        let state = pairs.entry(key(pair)).or_default();
        state.written = None;
        self.write("stage", pair, json!({ "stage": stage.name() }));
    }

    fn bytes(&self, pair: Pair<'_>, stage: Stage, done: u64, total: u64) {
        let mut pairs = lock(&self.pairs);
        let state = pairs.entry(key(pair)).or_default();
        let now = Instant::now();
        let due = state
            .written_at
            .is_none_or(|at| now.duration_since(at) >= JSONL_INTERVAL);
        let (tensors_done, tensors_total) = match stage {
            Stage::Converting => state.tensors,
            _ => (0, 0),
        };
        if (!due && done != total) || state.written == Some((done, tensors_done)) {
            return;
        }
        state.written_at = Some(now);
        state.written = Some((done, tensors_done));
        self.write(
            "progress",
            pair,
            json!({
                "stage": stage.name(),
                "bytes_done": done,
                "bytes_total": total,
                "tensors_done": tensors_done,
                "tensors_total": tensors_total,
            }),
        );
    }

    fn planned(&self, pair: Pair<'_>, _output_bytes: u64, _source_bytes: u64, tensors: u64) {
        lock(&self.pairs).entry(key(pair)).or_default().tensors = (0, tensors);
    }

    fn tensor(&self, pair: Pair<'_>, index: u64, count: u64) {
        lock(&self.pairs).entry(key(pair)).or_default().tensors = (index + 1, count);
    }

    fn finished(&self, pair: Pair<'_>, result: Result<&Outcome, &SmartError>) {
        lock(&self.pairs).remove(&key(pair));
        let fields = match result {
            Ok(o) => json!({
                "status": status_word(&o.status),
                "path": o.path.display().to_string(),
                "removed": removed_json(&o.removed),
                "error": null,
            }),
            Err(e) => json!({
                "status": "failed",
                "path": null,
                "removed": [],
                "error": one_line(&e.to_string()),
            }),
        };
        self.write("finished", pair, fields);
    }
}
