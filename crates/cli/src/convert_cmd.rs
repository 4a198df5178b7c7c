//! `convcache convert SRC --to T[,T...]`: presentation over [`smart::smart_convert`].

use std::path::PathBuf;
use std::time::Duration;

use cache::ModelsDir;
use detect::Precision;
use serde_json::{Value, json};
use smart::{ConversionReport, Outcome, SmartError, Status};

use crate::args::{ConversionArgs, ConvertArgs, ProgressArg};
use crate::output::{Exit, Failure, Ui, one_line};
use crate::progress::{Bars, JsonLines};
use crate::size::parse_size;

/// The environment variable holding the default of `convert --max-cache-size`.
pub const MAX_SIZE_ENV: &str = "CONVCACHE_MAX_SIZE";

/// Set (non-empty), `convert` ends with a note on stderr of the bytes of model files it read
/// from the disk (`convcache: read stats: N bytes of model files read`), for benchmarks.
pub const READ_STATS_ENV: &str = "CONVCACHE_READ_STATS";

/// One target's result, as printed.
#[derive(Debug)]
pub struct Row {
    pub source: PathBuf,
    pub target: Precision,
    pub result: Result<Outcome, SmartError>,
    pub elapsed: Duration,
}

/// The JSON status word of an outcome.
pub fn status_word(s: &Status) -> &'static str {
    match s {
        Status::SourceIsTarget => "source_is_target",
        Status::Cached => "cached",
        Status::CachedUnverified => "cached_unverified",
        Status::Converted => "converted",
    }
}

/// The JSON of outputs evicted to make room: `[{"path", "size"}]`, least recently used first.
pub fn removed_json(removed: &[cache::Removed]) -> Value {
    removed
        .iter()
        .map(|r| json!({ "path": r.path.display().to_string(), "size": r.size }))
        .collect()
}

/// The exit code a failed conversion leads to: 2 when the input is at fault (see
/// [`SmartError::is_input_fault`]: the source cannot be read as a model, holds what its
/// converter refuses, cannot become the target...), else 1 (the conversion itself failed:
/// I/O, full disk, verification).
pub fn exit_for(e: &SmartError) -> Exit {
    if e.is_cancelled() {
        Exit::Interrupted
    } else if e.is_input_fault() {
        Exit::BadInput
    } else {
        Exit::Failed
    }
}

impl Row {
    /// The `convert --json` object of this row.
    pub fn json(&self) -> Value {
        let source = self.source.display().to_string();
        let target = self.target.canonical_name();
        match &self.result {
            Ok(o) => json!({
                "source": source,
                "target": target,
                "status": status_word(&o.status),
                "path": o.path.display().to_string(),
                "report": o.report,
                "replaced": o.replaced,
                "note": o.note,
                "removed": removed_json(&o.removed),
                "resumed_from": o.resumed_from,
                "error": null,
            }),
            Err(e) => json!({
                "source": source,
                "target": target,
                "status": "failed",
                "path": null,
                "report": null,
                "replaced": null,
                "note": null,
                "removed": [],
                "resumed_from": null,
                "error": one_line(&e.to_string()),
            }),
        }
    }

    /// The text line of this row (successes only; failures are error lines on stderr).
    pub fn text(&self) -> Option<String> {
        let o = self.result.as_ref().ok()?;
        let mut notes = vec![if self.elapsed.as_secs_f64() < 1.0 {
            format!("{:.1} ms", self.elapsed.as_secs_f64() * 1000.0)
        } else {
            format!("{:.2} s", self.elapsed.as_secs_f64())
        }];
        if let Some(r) = &o.report {
            notes.extend(report_notes(r));
        }
        if let Some(why) = &o.replaced {
            notes.push(format!("replaced: {why}"));
        }
        if let Some(from) = o.resumed_from {
            notes.push(format!("resumed from byte {from}"));
        }
        if let Some(note) = &o.note {
            notes.push(note.clone());
        }
        if !o.removed.is_empty() {
            let bytes: u64 = o.removed.iter().map(|r| r.size).sum();
            let paths: Vec<String> = o
                .removed
                .iter()
                .map(|r| r.path.display().to_string())
                .collect();
            notes.push(format!(
                "made room: evicted {} ({bytes} bytes): {}",
                o.removed.len(),
                paths.join(", ")
            ));
        }
        Some(format!(
            "{:<16} {:<12} {}  ({})",
            status_word(&o.status),
            self.target.canonical_name(),
            o.path.display(),
            notes.join("; ")
        ))
    }
}

/// The parts of a converter report worth a glance: values that did not survive the cast and
/// tensors an fp8 target kept in 16 bits.
pub fn report_notes(report: &ConversionReport) -> Vec<String> {
    // (tensors kept 16-bit, values overflowed, values non-finite)
    let (kept, overflowed, non_finite) = match report {
        ConversionReport::Precision(r) => (r.tensors_kept_16bit, r.overflowed, r.non_finite),
        ConversionReport::Bitsandbytes(r) => (0, r.cast_overflowed, r.cast_non_finite),
        ConversionReport::ComfyQuant(r) => (r.kept_high_precision, 0, 0),
        ConversionReport::Gguf(_) | ConversionReport::GgufDequantized(_) => (0, 0, 0),
    };
    let mut notes = Vec::new();
    if kept > 0 {
        notes.push(format!("{kept} tensor(s) kept 16-bit"));
    }
    if overflowed > 0 {
        notes.push(format!("{overflowed} value(s) overflowed"));
    }
    if non_finite > 0 {
        notes.push(format!("{non_finite} value(s) became non-finite"));
    }
    notes
}

/// Converts each source to each target as `request` says ([`smart::many::convert_many`]: every
/// pair planned first, hits answered at once, each source read once for all of its targets,
/// at most `jobs` conversions at once). A failed pair does not stop the others, and an output of
/// this command is never evicted to make room for another. One row per pair, in order.
pub fn convert_all(
    request: &smart::Options<'_>,
    sources: &[PathBuf],
    targets: &[Precision],
    jobs: usize,
) -> Vec<Row> {
    smart::many::convert_many(sources, targets, request, jobs)
        .into_iter()
        .map(|p| Row {
            source: p.source,
            target: p.target,
            result: p.result,
            elapsed: p.elapsed,
        })
        .collect()
}

/// Prints rows (JSON array, text lines, or `-q` bare paths) and error lines; returns the exit.
pub fn present(ui: &Ui, rows: &[Row]) -> Exit {
    let mut exit = Exit::Ok;
    for r in rows {
        if let Err(e) = &r.result {
            ui.error(&Failure::failed(e));
            exit = exit.max(exit_for(e));
        }
    }
    if ui.json {
        ui.print_json(&Value::Array(rows.iter().map(Row::json).collect()));
    } else {
        for r in rows {
            match (&r.result, ui.quiet) {
                (Ok(o), true) => ui.print(o.path.display()),
                (Ok(_), false) => {
                    if let Some(t) = r.text() {
                        ui.print(t)
                    }
                }
                (Err(_), _) => {}
            }
        }
    }
    exit
}

/// The request the flags `convert` and `check` share make, for `models`; the caller adds what
/// only it knows (cancel flag, `--no-fsync`). Notes an `--arch` that no target uses.
pub fn request<'a>(ui: &Ui, conversion: &ConversionArgs, models: ModelsDir) -> smart::Options<'a> {
    if conversion.arch.is_some()
        && !conversion
            .targets
            .iter()
            .any(|t| t.container() == detect::precision::Container::Gguf)
    {
        ui.note("convcache: note: --arch only applies to GGUF targets; ignored");
    }
    let mut request = smart::Options::new(models);
    request.strict = conversion.strict;
    request.double_quant = conversion.double_quant;
    request.gguf_arch = conversion.arch;
    request
}

/// `convcache convert`.
pub fn run(ui: &Ui, models: ModelsDir, args: &ConvertArgs) -> Result<Exit, Failure> {
    let conversion = &args.conversion;
    let mut request = request(ui, conversion, models);
    request.sync_output = !args.no_fsync;
    request.make_room = args.make_room;
    request.resume = !args.no_resume;
    request.max_cache_size = match (args.max_cache_size, std::env::var_os(MAX_SIZE_ENV)) {
        (Some(size), _) => Some(size),
        (None, Some(v)) if !v.is_empty() => {
            let v = v.to_string_lossy();
            Some(parse_size(&v).map_err(|e| Failure::input(format!("{MAX_SIZE_ENV}={v}: {e}")))?)
        }
        (None, _) => None,
    };
    let (bars, lines);
    let how = args.progress.unwrap_or(match ui.progress_enabled() {
        true => ProgressArg::Bars,
        false => ProgressArg::None,
    });
    request.observer = match how {
        ProgressArg::Bars => {
            bars = Bars::default();
            Some(&bars)
        }
        ProgressArg::Jsonl => {
            lines = JsonLines::default();
            Some(&lines)
        }
        ProgressArg::None => None,
    };
    request.cancel = crate::interrupt::install();
    let jobs = args
        .jobs
        .map_or_else(smart::many::default_jobs, usize::from);
    let rows = convert_all(&request, &conversion.sources, &conversion.targets, jobs);
    if std::env::var_os(READ_STATS_ENV).is_some_and(|v| !v.is_empty()) {
        // Asked for explicitly: shown even with --json or -q.
        eprintln!(
            "convcache: read stats: {} bytes of model files read",
            tensorfile::read_count::bytes_read()
        );
    }
    let exit = present(ui, &rows);
    // Interrupted, even if the conversion under way had passed its last check and published.
    Ok(match crate::interrupt::arrived(request.cancel.as_deref()) {
        true => Exit::Interrupted,
        false => exit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_notes_pick_the_counts_that_matter() {
        let r = ConversionReport::Precision(precision::convert::Report {
            target: "fp8_e4m3fn".into(),
            tensors_converted: 4,
            tensors_copied: 0,
            tensors_kept_16bit: 3,
            kept_16bit: vec!["a".into(), "b".into(), "c".into()],
            overflowed: 2,
            non_finite: 0,
            bytes_in: 0,
            bytes_out: 0,
        });
        assert_eq!(
            report_notes(&r),
            ["3 tensor(s) kept 16-bit", "2 value(s) overflowed"]
        );
        let r = ConversionReport::Bitsandbytes(bnb::Report {
            cast_overflowed: 0,
            cast_non_finite: 5,
            ..bnb::Report::default()
        });
        assert_eq!(report_notes(&r), ["5 value(s) became non-finite"]);
        let r = ConversionReport::Bitsandbytes(bnb::Report::default());
        assert!(report_notes(&r).is_empty());
    }
}
