//! The bench cases of one command with several targets or several sources (issue 15): each
//! compares one `convcache convert` doing everything with the same conversions run one after
//! another as separate commands, every source cold (dropped from the page cache with
//! `posix_fadvise(DONTNEED)`) before each command, as a model on a disk that was not just read.
//!
//! - `one-read`: `--to bf16,fp8,Q8_0,nf4` of the ~1 GB bf16 model. The source bytes read come
//!   from convcache's own reader (`CONVCACHE_READ_STATS=1`): at most 1.05x the source's size;
//!   at least 1.3x faster than the four targets one after another.
//! - `one-read-sharded`: the same four targets of the same model as a three-shard diffusers
//!   folder (`transformer/`, diffusers key names): each shard read once through its own window.
//!   Reported against the same 1.05x; the GGUF target reads in ComfyUI-GGUF's tensor order
//!   (ComfyUI names, sorted), which is not the diffusers files' order, so what it needs outside
//!   the window it reads again.
//! - `several-models`: three ~340 MB bf16 models x `fp8,Q8_0` with the default `--jobs`, against
//!   the six conversions one by one: the ratio (target 1.2x on 2 cores), and the command's peak
//!   RSS under 1 GiB.

use std::fmt::Write as _;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Case, Env, Model, Sample, fmt_rss, fmt_time, measure, median, met};
use crate::{DynResult, fixtures};

/// Id of the one-source, four-target case.
pub(super) const ONE_READ: &str = "one-read";
/// Id of the one-sharded-source, four-target case.
pub(super) const ONE_READ_SHARDED: &str = "one-read-sharded";
/// Id of the three-sources, two-target case.
pub(super) const SEVERAL_MODELS: &str = "several-models";

const ONE_READ_TARGETS: &[&str] = &["bf16", "fp8", "Q8_0", "nf4"];
const SEVERAL_TARGETS: &[&str] = &["fp8", "Q8_0"];

/// Whether `id` is one of this module's cases.
pub(super) fn handles(id: &str) -> bool {
    [ONE_READ, ONE_READ_SHARDED, SEVERAL_MODELS].contains(&id)
}

/// The two cases, for the case table (their rows are made here, not from `tools`).
pub(super) fn cases() -> Vec<Case> {
    let case = |id, what, goal| Case {
        id,
        what,
        model: if id == ONE_READ_SHARDED {
            Model::FluxBf16Diffusers
        } else {
            Model::FluxBf16
        },
        tools: Vec::new(),
        checked: &[],
        peer: None,
        baseline: None,
        baseline_fsync: None,
        durable_peer: None,
        durable_rows: &[],
        wired: true,
        goal,
        min_speedup: None,
        max_vs_cp: None,
        max_ms: None,
        rss_limit: false,
    };
    vec![
        case(
            ONE_READ,
            "one command to bf16, fp8, Q8_0 and nf4 of the ~1 GB bf16 Flux-like model, cold source",
            "reads the source at most 1.05x its size (convcache's reader's count), >= 1.3x \
             faster than the four targets one after another with the same cold start",
        ),
        case(
            ONE_READ_SHARDED,
            "one command to bf16, fp8, Q8_0 and nf4 of the same model as a 3-shard diffusers folder, cold source",
            "reads the shards once (the goal of `one-read`: at most 1.05x, convcache's reader's \
             count), faster than the four targets one after another",
        ),
        case(
            SEVERAL_MODELS,
            "one command, three ~340 MB bf16 Flux-like models x fp8 and Q8_0, default --jobs, cold sources",
            ">= 1.2x faster than the six conversions one by one (2 cores), peak RSS < 1 GiB",
        ),
    ]
}

/// Drops `path` (a file, or every file under a folder) from the page cache (after `sync`, so
/// its pages are clean and can go).
fn make_cold(path: &Path) -> DynResult<()> {
    if path.is_dir() {
        for entry in fs::read_dir(path)? {
            make_cold(&entry?.path())?;
        }
        return Ok(());
    }
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let f = fs::File::open(path)?;
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(format!("posix_fadvise({}): error {rc}", path.display()).into());
    }
    Ok(())
}

/// The bytes of model files a `convert` run read, from its `CONVCACHE_READ_STATS` line.
fn bytes_read(stderr: &Path) -> DynResult<u64> {
    let text = fs::read_to_string(stderr)?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("convcache: read stats: ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .ok_or_else(|| format!("no read stats line in: {}", text.trim()).into())
}

/// One timed `convcache convert SOURCES --to TARGETS` into a fresh models dir, every source
/// cold first. (time, peak RSS, bytes of model files read)
fn one_command(env: &Env, sources: &[PathBuf], to: &str) -> DynResult<(Sample, u64)> {
    let dir = env.fresh_models_dir()?;
    for s in sources {
        make_cold(s)?;
    }
    let mut c = env.convert_cmd(&sources[0], to, &dir);
    c.args(&sources[1..]).env("CONVCACHE_READ_STATS", "1");
    let err_log = env.scratch.join("stderr-multi.txt");
    let sample = measure(&mut c, &err_log)?;
    Ok((sample, bytes_read(&err_log)?))
}

/// The same pairs as separate commands one after another, each source cold before each
/// command: (total time, largest peak RSS, total bytes read).
fn one_by_one(env: &Env, sources: &[PathBuf], targets: &[&str]) -> DynResult<(Sample, u64)> {
    let dir = env.fresh_models_dir()?;
    let err_log = env.scratch.join("stderr-one.txt");
    let (mut wall, mut rss, mut bytes) = (Duration::ZERO, 0, 0);
    for s in sources {
        for t in targets {
            make_cold(s)?;
            let mut c = env.convert_cmd(s, t, &dir);
            c.env("CONVCACHE_READ_STATS", "1");
            let sample = measure(&mut c, &err_log)?;
            wall += sample.wall;
            rss = rss.max(sample.max_rss_kib);
            bytes += bytes_read(&err_log)?;
        }
    }
    Ok((
        Sample {
            wall,
            max_rss_kib: rss,
        },
        bytes,
    ))
}

/// Medians of `reps` runs of both sides.
struct Runs {
    together: (Duration, u64, u64),
    apart: (Duration, u64, u64),
}

fn run_both(
    env: &Env,
    sources: &[PathBuf],
    targets: &[&str],
    reps: usize,
    case: &str,
) -> DynResult<Runs> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        eprintln!("[{case}] repetition {} of {reps}", rep + 1);
        a.push(one_command(env, sources, &targets.join(","))?);
        b.push(one_by_one(env, sources, targets)?);
    }
    let summary = |v: &[(Sample, u64)]| {
        let wall = median(v.iter().map(|(s, _)| s.wall).collect());
        let rss = v.iter().map(|(s, _)| s.max_rss_kib).max().unwrap_or(0);
        let mut bytes: Vec<u64> = v.iter().map(|(_, b)| *b).collect();
        bytes.sort_unstable();
        (wall, rss, bytes[bytes.len() / 2])
    };
    Ok(Runs {
        together: summary(&a),
        apart: summary(&b),
    })
}

/// The section of `case` (one of [`handles`]'s), adding its verdicts.
pub(super) fn section(env: &Env, case: &Case, reps: usize, verdicts: &mut Vec<String>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "### `{}`: {}\n", case.id, case.what);
    let _ = writeln!(
        s,
        "Goal: {}. {reps} repetitions of each side, median time reported; every source \
         dropped from the page cache (`posix_fadvise(DONTNEED)` after `sync`) before each \
         command; bytes read are convcache's own count (`CONVCACHE_READ_STATS=1`).\n",
        case.goal
    );
    let result = if case.id == ONE_READ || case.id == ONE_READ_SHARDED {
        one_read(env, case, reps, &mut s, verdicts)
    } else {
        several_models(env, reps, &mut s, verdicts)
    };
    if let Err(e) = result {
        eprintln!("    not measured: {e}");
        let _ = writeln!(s, "Not measured: {e}\n");
        verdicts.push(format!("| `{}` | - | not measured |", case.id));
    }
    s
}

fn table(s: &mut String, runs: &Runs, what: [&str; 2], source_bytes: u64) {
    let _ = writeln!(
        s,
        "| run | time | peak RSS | source bytes read | x source size |\n|---|---|---|---|---|"
    );
    for (label, (wall, rss, bytes)) in [(what[0], runs.together), (what[1], runs.apart)] {
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {bytes} | {:.3}x |",
            fmt_time(wall),
            fmt_rss(rss),
            bytes as f64 / source_bytes as f64
        );
    }
}

/// Bytes of `path`: a file's size, or the sizes of every file under a folder.
fn size_of(path: &Path) -> DynResult<u64> {
    if !path.is_dir() {
        return Ok(fs::metadata(path)?.len());
    }
    let mut total = 0;
    for entry in fs::read_dir(path)? {
        total += size_of(&entry?.path())?;
    }
    Ok(total)
}

fn one_read(
    env: &Env,
    case: &Case,
    reps: usize,
    s: &mut String,
    verdicts: &mut Vec<String>,
) -> DynResult<()> {
    let id = case.id;
    let src = env.model(case.model);
    let size = size_of(&src)?;
    let runs = run_both(env, std::slice::from_ref(&src), ONE_READ_TARGETS, reps, id)?;
    let label = format!("convcache convert --to {}", ONE_READ_TARGETS.join(","));
    table(
        s,
        &runs,
        [&label, "the four targets one after another"],
        size,
    );
    let read_ratio = runs.together.2 as f64 / size as f64;
    let speedup = runs.apart.0.as_secs_f64() / runs.together.0.as_secs_f64().max(1e-9);
    let _ = writeln!(s, "\nSpeed-up over one after another: {speedup:.2}x.\n");
    eprintln!("    read {read_ratio:.3}x the source, {speedup:.2}x faster than one by one");
    verdicts.push(format!(
        "| `{id}`: source read <= 1.05x its size | {read_ratio:.3}x | {} |",
        met(read_ratio <= 1.05)
    ));
    verdicts.push(format!(
        "| `{id}`: >= 1.3x faster than one after another | {speedup:.2}x | {} |",
        met(speedup >= 1.3)
    ));
    Ok(())
}

fn several_models(
    env: &Env,
    reps: usize,
    s: &mut String,
    verdicts: &mut Vec<String>,
) -> DynResult<()> {
    let sources = fixtures::write_specs(&env.models, fixtures::several_specs(), false)?;
    let mut size = 0;
    for p in &sources {
        size += fs::metadata(p)?.len();
    }
    let runs = run_both(env, &sources, SEVERAL_TARGETS, reps, SEVERAL_MODELS)?;
    let label = format!(
        "convcache convert (3 sources) --to {} (default --jobs)",
        SEVERAL_TARGETS.join(",")
    );
    table(s, &runs, [&label, "the six conversions one by one"], size);
    let speedup = runs.apart.0.as_secs_f64() / runs.together.0.as_secs_f64().max(1e-9);
    let _ = writeln!(s, "\nSpeed-up over one by one: {speedup:.2}x.\n");
    eprintln!(
        "    {speedup:.2}x faster than one by one, peak RSS {}",
        fmt_rss(runs.together.1)
    );
    verdicts.push(format!(
        "| `{SEVERAL_MODELS}`: >= 1.2x faster than one by one | {speedup:.2}x | {} |",
        met(speedup >= 1.2)
    ));
    verdicts.push(format!(
        "| `{SEVERAL_MODELS}`: peak RSS < 1 GiB | {} | {} |",
        fmt_rss(runs.together.1),
        met(runs.together.1 < 1 << 20)
    ));
    Ok(())
}
