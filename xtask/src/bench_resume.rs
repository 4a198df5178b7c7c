//! The `resume` bench case: a Q4_K_M conversion of the ~1 GB bf16 Flux-like model killed
//! (SIGKILL) once its resume journal records 80% of the output, then rerun; the rerun's time
//! against an uninterrupted conversion (issue 15: at most 35%), and both outputs' sha256.
//!
//! No hook in convcache: the harness reads the journal (`.convcache/<name>.journal`, JSON,
//! `checkpoint.offset` of `identity.output_len`) that every conversion keeps and kills the
//! process itself. The killed run checkpoints every 100 ms (`CONVCACHE_CHECKPOINT_MS`, so the
//! kill lands near 80%); the timed runs use the default interval.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Case, DynResult, Env, fmt_time, measure, median, met};

/// The case id.
pub(super) const ID: &str = "resume";

/// Where the journal says the conversion is killed.
const KILL_AT: f64 = 0.8;
/// The issue's bound: rerun time / uninterrupted time.
const MAX_RATIO: f64 = 0.35;
const TARGET: &str = "Q4_K_M";

/// The case's row in the table.
pub(super) fn case() -> Case {
    Case {
        id: ID,
        what: "Q4_K_M of the ~1 GB bf16 Flux-like model killed at 80% (by its journal), then rerun",
        model: super::Model::FluxBf16,
        tools: Vec::new(),
        checked: &[],
        peer: None,
        baseline: None,
        baseline_fsync: None,
        durable_peer: None,
        durable_rows: &[],
        wired: true,
        goal: "the rerun takes at most 35% of an uninterrupted conversion, same sha256",
        min_speedup: None,
        max_vs_cp: None,
        max_ms: None,
        rss_limit: false,
    }
}

/// `sha256sum FILE`.
fn sha256(path: &Path) -> DynResult<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.split_whitespace().next() {
        Some(h) if out.status.success() => Ok(h.to_string()),
        _ => Err(format!("sha256sum {} failed", path.display()).into()),
    }
}

/// The only output file (not hidden) under `models`' GGUF dir.
fn output_in(models: &Path) -> DynResult<PathBuf> {
    let dir = models.join("diffusion_models/gguf");
    fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.'))
        })
        .ok_or_else(|| format!("no output in {}", dir.display()).into())
}

/// (checkpoint offset, planned size) from the journal of `output`.
fn journal_progress(output: &Path) -> Option<(u64, u64)> {
    let name = output.file_name()?.to_str()?;
    let path = output
        .parent()?
        .join(".convcache")
        .join(format!("{name}.journal"));
    let v: Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    Some((
        v.get("checkpoint")?.get("offset")?.as_u64()?,
        v.get("identity")?.get("output_len")?.as_u64()?,
    ))
}

/// One repetition: (uninterrupted time, rerun time, fraction killed at, resumed from, equal).
struct Rep {
    clean: Duration,
    rerun: Duration,
    killed_at: f64,
    resumed_from: Option<u64>,
    same_sha: bool,
}

fn one_rep(env: &Env, src: &Path) -> DynResult<Rep> {
    let log = env.scratch.join("resume.stderr");
    // Uninterrupted.
    let models = env.fresh_models_dir()?;
    let clean = measure(&mut env.convert_cmd(src, TARGET, &models), &log)?.wall;
    let clean_out = output_in(&models)?;
    let clean_sha = sha256(&clean_out)?;
    let name = clean_out.file_name().ok_or("no name")?.to_owned();

    // Killed once the journal shows 80%.
    let models = env.fresh_models_dir()?;
    let out = models.join("diffusion_models/gguf").join(&name);
    // Checkpoints every 100 ms for this run only (it is not timed), so that the kill lands at
    // about 80% rather than up to one default interval (1 s) later.
    let mut child = env
        .convert_cmd(src, TARGET, &models)
        .env("CONVCACHE_CHECKPOINT_MS", "100")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let started = Instant::now();
    let killed_at = loop {
        if let Some((offset, len)) = journal_progress(&out)
            && offset as f64 >= KILL_AT * len as f64
        {
            child.kill()?;
            break offset as f64 / len as f64;
        }
        if child.try_wait()?.is_some() {
            return Err("the conversion finished before the journal reached 80%".into());
        }
        if started.elapsed() > Duration::from_secs(3600) {
            child.kill()?;
            return Err("no progress".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    child.wait()?;

    // The rerun, timed, with its JSON row for `resumed_from` (`measure` sends stdout to null:
    // a shell that execs convcache with stdout in a file keeps the measured pid convcache's).
    let json = env.scratch.join("resume.json");
    let mut rerun_cmd = Command::new("sh");
    rerun_cmd
        .arg("-c")
        .arg(r#"out="$1"; shift; exec "$@" > "$out""#)
        .arg("sh")
        .arg(&json)
        .arg(&env.convcache)
        .args(["--quiet", "--json", "--models-dir"])
        .arg(&models)
        .arg("convert")
        .arg(src)
        .args(["--to", TARGET]);
    let rerun = measure(&mut rerun_cmd, &log)?.wall;
    let row: Value = serde_json::from_slice(&fs::read(&json)?)?;
    let resumed_from = row
        .get(0)
        .and_then(|r| r.get("resumed_from"))
        .and_then(Value::as_u64);
    let same_sha = sha256(&out)? == clean_sha;
    Ok(Rep {
        clean,
        rerun,
        killed_at,
        resumed_from,
        same_sha,
    })
}

/// The case's section of BENCHMARKS.md; pushes its verdict lines.
pub(super) fn section(env: &Env, case: &Case, reps: usize, verdicts: &mut Vec<String>) -> String {
    let src = env.model(case.model);
    let mut s = String::new();
    let _ = writeln!(s, "### `{}`: {}\n", case.id, case.what);
    let _ = writeln!(
        s,
        "Goal: {}. Each repetition converts the model uninterrupted (timed), then starts the \
         same conversion in a fresh models dir, kills it (SIGKILL) as soon as its resume \
         journal records {:.0}% of the output (that run checkpoints every 100 ms; the timed \
         runs at the default 1 s), and times the rerun, which checks the journal, re-reads the kept part of the temporary and \
         converts the rest. {reps} repetitions, medians.\n",
        case.goal,
        KILL_AT * 100.0
    );
    let mut reps_done = Vec::new();
    let mut problems = Vec::new();
    for i in 0..reps {
        eprintln!("[{ID}] repetition {}/{reps}", i + 1);
        match one_rep(env, &src) {
            Ok(r) => {
                eprintln!(
                    "    uninterrupted {}, killed at {:.1}%, rerun {} (resumed from {:?}), same sha256: {}",
                    fmt_time(r.clean),
                    r.killed_at * 100.0,
                    fmt_time(r.rerun),
                    r.resumed_from,
                    r.same_sha
                );
                reps_done.push(r);
            }
            Err(e) => {
                eprintln!("    not measured: {e}");
                problems.push(e.to_string());
            }
        }
    }
    if reps_done.is_empty() {
        let why = problems.join("; ").replace('|', "/");
        let _ = writeln!(s, "Not measured: {why}\n");
        verdicts.push(format!("| `{ID}`: {} | - | not measured |", case.goal));
        return s;
    }
    let clean = median(reps_done.iter().map(|r| r.clean).collect());
    let rerun = median(reps_done.iter().map(|r| r.rerun).collect());
    let ratio = rerun.as_secs_f64() / clean.as_secs_f64().max(1e-9);
    let all_same = reps_done.iter().all(|r| r.same_sha);
    let all_resumed = reps_done.iter().all(|r| r.resumed_from.is_some());
    let _ = writeln!(
        s,
        "| run | median time |\n|---|---|\n| uninterrupted | {} |\n| rerun after the kill | {} ({ratio:.2}x) |\n",
        fmt_time(clean),
        fmt_time(rerun)
    );
    for r in &reps_done {
        let _ = writeln!(
            s,
            "- killed at {:.1}% of the output; rerun resumed from byte {}; same sha256: {}",
            r.killed_at * 100.0,
            r.resumed_from
                .map_or_else(|| "- (not resumed)".to_string(), |b| b.to_string()),
            if r.same_sha { "yes" } else { "**no**" }
        );
    }
    s.push('\n');
    verdicts.push(format!(
        "| `{ID}`: rerun <= {MAX_RATIO}x of an uninterrupted conversion, same sha256 | {ratio:.2}x, sha256 {} | {} |",
        if all_same { "equal" } else { "**differs**" },
        met(ratio <= MAX_RATIO && all_same && all_resumed)
    ));
    s
}
