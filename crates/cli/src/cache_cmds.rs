//! `check`, `list`, `stats` and `cleanup`: presentation over [`cache::Cache`].
//!
//! A cache operation that fails (reading or changing the cache dirs) exits 1, as a failed
//! conversion; problems with what the user named (a source, an argument) exit 2 and are caught
//! before.

use std::path::Path;

use cache::{Cache, Entry, Kind, ModelsDir, Stats};
use serde_json::{Value, json};

use crate::args::{CheckArgs, CleanupArgs, KindArg, KindArgs};
use crate::convert_cmd::exit_for;
use crate::output::{Exit, Failure, Ui};
use indicatif::HumanBytes;

/// The cache kind of a `--kind` value.
pub fn kind(k: KindArg) -> Kind {
    match k {
        KindArg::Precision => Kind::Precision,
        KindArg::Gguf => Kind::Gguf,
        KindArg::All => Kind::All,
    }
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// A source argument must be a readable regular file (or a folder holding a shard index, or a
/// diffusers repository folder standing for one of those); say so in the one-line form.
pub fn check_source(source: &Path) -> Result<(), Failure> {
    let resolved = tensorfile::diffusers::resolve_source(source);
    let source = resolved.as_path();
    let sharded = || tensorfile::sharded::locate_index(source).is_ok_and(|i| i.is_some());
    match std::fs::metadata(source) {
        Ok(m) if m.is_file() || sharded() => Ok(()),
        Ok(_) => Err(Failure::input(format!(
            "{}: not a regular file",
            source.display()
        ))),
        Err(e) => Err(Failure::input(format!("{}: {e}", source.display()))),
    }
}

/// The status word of a check, as in `check --json`.
pub fn check_status_word(s: smart::CheckStatus) -> &'static str {
    use smart::CheckStatus as S;
    match s {
        S::SourceIsTarget => "source_is_target",
        S::Hit => "hit",
        S::Unverified => "unverified",
        S::Missing => "missing",
        S::Stale => "stale",
        S::Broken => "broken",
        S::Foreign => "foreign",
    }
}

/// One `check --json` row.
pub fn check_json(source: &Path, c: &smart::Check) -> Value {
    json!({
        "source": path_str(source),
        "target": c.target.canonical_name(),
        "status": check_status_word(c.status),
        "valid": c.valid,
        "exists": c.exists,
        "path": path_str(&c.path),
        "reason": c.reason,
    })
}

/// `convcache check SRC... --to T,...`: what `convert` would do, per source and target,
/// converting nothing. A source that cannot be checked is an error line; the others are still
/// answered.
pub fn check(ui: &Ui, models: ModelsDir, args: &CheckArgs) -> Result<Exit, Failure> {
    let conversion = &args.conversion;
    let request = crate::convert_cmd::request(ui, conversion, models);
    let mut exit = Exit::Ok;
    let mut rows = Vec::new();
    for source in &conversion.sources {
        match smart::check(source, &conversion.targets, &request) {
            Ok(checks) => rows.extend(checks.into_iter().map(|c| (source, c))),
            Err(e) => {
                let failure = Failure {
                    exit: exit_for(&e),
                    message: e.to_string(),
                };
                if conversion.sources.len() == 1 {
                    return Err(failure);
                }
                exit = exit.max(failure.exit);
                ui.error(&failure);
            }
        }
    }
    if ui.json {
        let rows: Vec<Value> = rows.iter().map(|(s, c)| check_json(s, c)).collect();
        ui.print_json(&Value::Array(rows));
    } else {
        for (_, c) in &rows {
            let reason = c
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            ui.print(format!(
                "{:<12} {:<16} {}{reason}",
                c.target.canonical_name(),
                check_status_word(c.status),
                c.path.display()
            ));
        }
    }
    Ok(exit)
}

/// One `list --json` entry.
pub fn entry_json(e: &Entry) -> Value {
    let last_used = e
        .last_used
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json!({
        "basename": e.basename,
        "model_kind": e.model_kind.folder(),
        "precision": e.precision.canonical_name(),
        "path": path_str(&e.path),
        "size": e.size,
        "source": e.source.as_deref().map(path_str),
        "last_used": last_used,
        "problem": e.problem,
    })
}

/// `convcache list`.
pub fn list(ui: &Ui, cache: &Cache, args: &KindArgs) -> Result<Exit, Failure> {
    let entries = cache.list(kind(args.kind)).map_err(Failure::failed)?;
    if ui.json {
        ui.print_json(&Value::Array(entries.iter().map(entry_json).collect()));
    } else if entries.is_empty() {
        ui.note(format!(
            "no conversions in {}",
            cache.models_dir().root().display()
        ));
    } else {
        for e in &entries {
            let source = match (&e.problem, e.source.as_deref()) {
                (Some(problem), _) => format!("(not usable: {problem})"),
                (None, Some(source)) => path_str(source),
                (None, None) => "(made by another tool)".into(),
            };
            ui.print(format!(
                "{:<12} {:>11}  {}  <- {source}",
                e.precision.canonical_name(),
                HumanBytes(e.size).to_string(),
                e.path.display()
            ));
        }
    }
    Ok(Exit::Ok)
}

/// The `stats --json` object.
pub fn stats_json(s: &Stats) -> Value {
    let by: serde_json::Map<String, Value> = s
        .by_precision
        .iter()
        .map(|(k, t)| (k.clone(), json!({"count": t.count, "bytes": t.bytes})))
        .collect();
    json!({
        "count": s.count,
        "total_bytes": s.total_bytes,
        "by_precision": by,
        "by_kind": s
            .by_kind
            .iter()
            .map(|(k, t)| (k.clone(), json!({"count": t.count, "bytes": t.bytes})))
            .collect::<serde_json::Map<String, Value>>(),
        "unusable": {"count": s.unusable.count, "bytes": s.unusable.bytes},
    })
}

/// The text form of [`Stats`].
pub fn stats_text(s: &Stats) -> String {
    let mut out = format!("{} conversion(s), {}", s.count, HumanBytes(s.total_bytes));
    for (name, t) in &s.by_precision {
        out.push_str(&format!(
            "\n  {name:<12} {:>4}  {:>11}",
            t.count,
            HumanBytes(t.bytes).to_string()
        ));
    }
    // Only when there is something besides diffusion models (the usual case stays as it was).
    if s.by_kind.keys().any(|k| k != "diffusion_models") {
        for (kind, t) in &s.by_kind {
            out.push_str(&format!(
                "\n  {kind:<16} {:>4}  {:>11}",
                t.count,
                HumanBytes(t.bytes).to_string()
            ));
        }
    }
    if s.unusable.count > 0 {
        out.push_str(&format!(
            "\n  {} file(s) with an output's name that cannot serve, {} (see `list`)",
            s.unusable.count,
            HumanBytes(s.unusable.bytes)
        ));
    }
    out
}

/// `convcache stats`.
pub fn stats(ui: &Ui, cache: &Cache, args: &KindArgs) -> Result<Exit, Failure> {
    let s = cache.stats(kind(args.kind)).map_err(Failure::failed)?;
    if ui.json {
        ui.print_json(&stats_json(&s));
    } else {
        ui.print(stats_text(&s));
    }
    Ok(Exit::Ok)
}

/// `convcache cleanup`.
pub fn cleanup(ui: &Ui, cache: &Cache, args: &CleanupArgs) -> Result<Exit, Failure> {
    // Leftovers of killed conversions go first (never in a dry run).
    if !args.dry_run {
        let _ = cache.sweep_temporaries();
    }
    // clap guarantees exactly one policy, and no source with --max-size.
    let (policy, removed, before, after) = match (args.keep, args.max_size, &args.source) {
        (Some(keep), _, source) => {
            let stats = cache.stats(Kind::All).map_err(Failure::failed)?;
            let before = stats.total_bytes + stats.unusable.bytes;
            let removed = match source {
                Some(source) => {
                    // A deleted source's conversions are still found by the path they record;
                    // anything else that is not a file is a mistake.
                    if source.exists() {
                        check_source(source)?;
                    }
                    let removed = cache
                        .cleanup(source, keep, args.dry_run)
                        .map_err(Failure::failed)?;
                    if !source.exists() && removed.is_empty() {
                        ui.note(format!(
                            "convcache: note: {}: no such file, and no conversion beyond the \
                             {keep} kept records it as its source",
                            source.display()
                        ));
                    }
                    removed
                }
                None => cache
                    .cleanup_all(keep, args.dry_run)
                    .map_err(Failure::failed)?,
            };
            let freed: u64 = removed.iter().map(|r| r.size).sum();
            ("keep", removed, before, before.saturating_sub(freed))
        }
        (None, Some(max), _) => {
            let e = cache.evict_to(max, args.dry_run).map_err(Failure::failed)?;
            ("max_size", e.removed, e.bytes_before, e.bytes_after)
        }
        _ => {
            return Err(Failure::input(
                "cleanup: give --keep N (with or without SRC), or --max-size SIZE",
            ));
        }
    };
    let freed: u64 = removed.iter().map(|r| r.size).sum();
    if ui.json {
        let rows: Vec<Value> = removed
            .iter()
            .map(|r| json!({"path": path_str(&r.path), "size": r.size}))
            .collect();
        ui.print_json(&json!({
            "dry_run": args.dry_run,
            "policy": policy,
            "removed": rows,
            "freed_bytes": freed,
            "bytes_before": before,
            "bytes_after": after,
        }));
    } else {
        let verb = if args.dry_run {
            "would remove"
        } else {
            "removed"
        };
        for r in &removed {
            ui.print(format!(
                "{verb} {} ({})",
                r.path.display(),
                HumanBytes(r.size)
            ));
        }
        ui.print(format!(
            "{verb} {} file(s), {}; the cache holds {}",
            removed.len(),
            HumanBytes(freed),
            HumanBytes(after)
        ));
    }
    Ok(Exit::Ok)
}
