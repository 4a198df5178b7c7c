//! `cargo xtask bench`: convcache against the Python tools people use, in the same run.
//!
//! Each measurement is one child process: wall time from spawn to exit, and the child's peak
//! resident set size from `wait4(2)` (not xtask's own). Every tool of a case runs `--reps`
//! times on a warm page cache and the median is reported. Results go to BENCHMARKS.md with the
//! machine description; numbers are only ever what this harness measured.
//!
//! The [`cases`] table is where cases are added: a case lists its tools (convcache, its Python
//! peer, and baselines such as `cp`), which tool is the peer the ratio is computed against, and
//! whether it runs by default.

use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::{DynResult, fixtures, repo_root};

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Python interpreter that has the peers installed (or $CONVCACHE_BENCH_PYTHON). Default:
    /// `target/bench-venv`, created and filled from `xtask/peers/requirements.txt` (pinned
    /// versions) when missing.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Repetitions per tool (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Repetitions of the cache-hit case.
    #[arg(long, default_value_t = 25)]
    hit_reps: usize,
    /// Cases to run (default: every wired case). `--list` shows them.
    #[arg(long = "case", value_name = "ID")]
    cases: Vec<String>,
    /// List the cases and exit.
    #[arg(long)]
    list: bool,
    /// Use the convcache binary already in target/release instead of building it.
    #[arg(long)]
    no_build: bool,
    /// Where to write the report (default: BENCHMARKS.md at the repository root).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Which benchmark model a case reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Model {
    /// ~2 GB f32 Flux-like (`flux_large_f32.safetensors`).
    FluxF32,
    /// ~1 GB bf16 Flux-like, same tensors (`flux_large_bf16.safetensors`).
    FluxBf16,
}

impl Model {
    fn file(self) -> &'static str {
        match self {
            Model::FluxF32 => "flux_large_f32.safetensors",
            Model::FluxBf16 => "flux_large_bf16.safetensors",
        }
    }
}

/// One command a case times.
#[derive(Debug, Clone)]
enum Tool {
    /// `cp` of a file as large as the case's output: the I/O floor.
    CpOutputSize,
    /// `convcache convert SRC --to T` into a fresh models dir each repetition.
    Convert { to: &'static str },
    /// `convcache convert SRC --to T` when the output already exists (after one untimed run).
    CacheHit { to: &'static str },
    /// A script of `xtask/peers/` run with the bench Python: `SCRIPT SRC OUT ARGS...`.
    Python {
        script: &'static str,
        args: &'static [&'static str],
    },
    /// `python -c "import ..."`: the interpreter and import cost inside the Python rows.
    PythonImports { modules: &'static str },
}

impl Tool {
    fn label(&self) -> String {
        match self {
            Tool::CpOutputSize => "cp (file of the output's size)".into(),
            Tool::Convert { to } => format!("convcache convert --to {to}"),
            Tool::CacheHit { to } => format!("convcache convert --to {to} (cache hit)"),
            Tool::Python { script, args } => {
                let mut s = format!("python peers/{script}");
                for a in *args {
                    s.push(' ');
                    s.push_str(a);
                }
                s
            }
            Tool::PythonImports { modules } => {
                format!("python -c 'import {modules}' (startup only)")
            }
        }
    }
}

/// A benchmark case.
#[derive(Debug, Clone)]
struct Case {
    id: &'static str,
    what: &'static str,
    model: Model,
    tools: Vec<Tool>,
    /// Index into `tools` of the peer every other row's ratio is computed against.
    peer: Option<usize>,
    /// Index into `tools` of the I/O baseline.
    baseline: Option<usize>,
    /// Cases that are not wired yet are listed in BENCHMARKS.md and run only when named.
    wired: bool,
    /// The target the issue sets.
    goal: &'static str,
}

/// The case table. Add a case here; `wired: false` keeps it out of the default run until the
/// convcache side exists.
fn cases() -> Vec<Case> {
    vec![
        Case {
            id: "f32-to-bf16",
            what: "f32 -> bf16 of the ~2 GB Flux-like model",
            model: Model::FluxF32,
            tools: vec![
                Tool::Convert { to: "bf16" },
                Tool::Python {
                    script: "seed_convert.py",
                    args: &["bf16"],
                },
                Tool::CpOutputSize,
                Tool::PythonImports {
                    modules: "torch, safetensors.torch",
                },
            ],
            peer: Some(1),
            baseline: Some(2),
            wired: true,
            goal: ">= 3x faster than the seed's path, <= 1.3x the time of cp, peak RSS < 512 MiB",
        },
        Case {
            id: "cache-hit",
            what: "convcache convert when a valid conversion exists (~2 GB f32 source)",
            model: Model::FluxF32,
            tools: vec![Tool::CacheHit { to: "bf16" }],
            peer: None,
            baseline: None,
            wired: true,
            goal: "< 20 ms whatever the model's size",
        },
        Case {
            id: "gguf-q8_0",
            what: "Q8_0 GGUF of the ~1 GB bf16 Flux-like model",
            model: Model::FluxBf16,
            tools: vec![
                Tool::Convert { to: "Q8_0" },
                // ComfyUI-GGUF's convert.py base step; the ggml quantizer step is added here
                // when a diffusion-patched quantizer is available to the harness.
                Tool::Python {
                    script: "gguf_base_step.py",
                    args: &["flux"],
                },
            ],
            peer: Some(1),
            baseline: None,
            wired: false,
            goal: ">= 3x faster end to end than convert.py + ggml quantizer, peak RSS < 512 MiB",
        },
        Case {
            id: "gguf-q4_k_m",
            what: "Q4_K_M GGUF of the ~1 GB bf16 Flux-like model",
            model: Model::FluxBf16,
            tools: vec![
                Tool::Convert { to: "Q4_K_M" },
                Tool::Python {
                    script: "gguf_base_step.py",
                    args: &["flux"],
                },
            ],
            peer: Some(1),
            baseline: None,
            wired: false,
            goal: ">= 3x faster end to end than convert.py + ggml quantizer, peak RSS < 512 MiB",
        },
        Case {
            id: "bnb-nf4",
            what: "NF4 (bitsandbytes layout) of the ~1 GB bf16 Flux-like model",
            model: Model::FluxBf16,
            tools: vec![
                Tool::Convert { to: "nf4" },
                Tool::Python {
                    script: "bnb_quantize.py",
                    args: &["nf4"],
                },
            ],
            peer: Some(1),
            baseline: None,
            wired: true,
            goal: ">= 5x faster than bitsandbytes' CPU quantize_4bit, peak RSS < 512 MiB",
        },
    ]
}

/// One finished child process.
#[derive(Debug, Clone, Copy)]
struct Sample {
    wall: Duration,
    max_rss_kib: u64,
}

/// The outcome of one tool in one case.
#[derive(Debug, Clone)]
enum Outcome {
    Measured {
        samples: Vec<Sample>,
    },
    /// Not runnable here (binary not built, command not implemented yet, peer missing), with
    /// the reason.
    Missing(String),
}

/// Spawns `cmd`, waits for it with `wait4`, and returns its wall time and peak RSS. A non-zero
/// exit is an error carrying the first lines of its stderr.
fn measure(cmd: &mut Command, stderr_path: &Path) -> DynResult<Sample> {
    let stderr = fs::File::create(stderr_path)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr));
    let start = Instant::now();
    let child = cmd.spawn()?;
    let pid = libc::pid_t::try_from(child.id())?;
    let mut status: libc::c_int = 0;
    // SAFETY: `rusage` is a plain C struct of integers; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet reaped (std's `Child` only reaps in `wait`, which
    // is never called); both out-pointers are valid for the call's duration.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    drop(child);
    if rc != pid {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()).into());
    }
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !ok {
        let text = fs::read_to_string(stderr_path).unwrap_or_default();
        let head: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(3)
            .collect();
        let code = if libc::WIFEXITED(status) {
            format!("exit {}", libc::WEXITSTATUS(status))
        } else {
            format!("signal {}", libc::WTERMSIG(status))
        };
        return Err(format!("{code}: {}", head.join(" / ")).into());
    }
    // Linux reports ru_maxrss in KiB.
    let max_rss_kib = u64::try_from(usage.ru_maxrss).unwrap_or(0);
    Ok(Sample { wall, max_rss_kib })
}

/// Reads a file once so every tool starts from the same warm page cache.
fn warm(path: &Path) -> DynResult<()> {
    let mut f = fs::File::open(path)?;
    let mut buf = vec![0u8; 8 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

struct Env {
    root: PathBuf,
    python: Option<PathBuf>,
    python_problem: String,
    convcache: PathBuf,
    models: PathBuf,
    scratch: PathBuf,
}

impl Env {
    fn model(&self, m: Model) -> PathBuf {
        self.models.join(m.file())
    }

    /// The converted file convcache writes for a source and target, found by listing the models
    /// dir (the naming belongs to the cache crate).
    fn fresh_models_dir(&self) -> DynResult<PathBuf> {
        let dir = self.scratch.join("models");
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    fn convert_cmd(&self, src: &Path, to: &str, models_dir: &Path) -> Command {
        let mut c = Command::new(&self.convcache);
        c.arg("--quiet")
            .arg("--models-dir")
            .arg(models_dir)
            .arg("convert")
            .arg(src)
            .args(["--to", to]);
        c
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs every repetition of one tool.
fn run_tool(env: &Env, case: &Case, tool: &Tool, reps: usize) -> Outcome {
    match run_tool_inner(env, case, tool, reps) {
        Ok(samples) => Outcome::Measured { samples },
        Err(e) => Outcome::Missing(e.to_string()),
    }
}

fn run_tool_inner(env: &Env, case: &Case, tool: &Tool, reps: usize) -> DynResult<Vec<Sample>> {
    let src = env.model(case.model);
    let err_log = env.scratch.join("stderr.txt");
    let out_file = env.scratch.join("out.bin");
    let mut samples = Vec::new();
    match tool {
        Tool::CpOutputSize => {
            // The bf16 model has the same tensors as the f32 one: the size of an f32 -> bf16
            // output, up to a header of a few bytes.
            let same_size = env.model(Model::FluxBf16);
            warm(&same_size)?;
            for _ in 0..reps {
                let _ = fs::remove_file(&out_file);
                let mut c = Command::new("cp");
                c.arg(&same_size).arg(&out_file);
                samples.push(measure(&mut c, &err_log)?);
            }
            let _ = fs::remove_file(&out_file);
        }
        Tool::Convert { to } => {
            if !env.convcache.is_file() {
                return Err(format!("missing: {} not built", env.convcache.display()).into());
            }
            for _ in 0..reps {
                let dir = env.fresh_models_dir()?;
                samples.push(measure(&mut env.convert_cmd(&src, to, &dir), &err_log)?);
            }
            let _ = fs::remove_dir_all(env.scratch.join("models"));
        }
        Tool::CacheHit { to } => {
            if !env.convcache.is_file() {
                return Err(format!("missing: {} not built", env.convcache.display()).into());
            }
            let dir = env.fresh_models_dir()?;
            measure(&mut env.convert_cmd(&src, to, &dir), &err_log)
                .map_err(|e| format!("priming conversion failed: {e}"))?;
            for _ in 0..reps {
                samples.push(measure(&mut env.convert_cmd(&src, to, &dir), &err_log)?);
            }
            let _ = fs::remove_dir_all(&dir);
        }
        Tool::Python { script, args } => {
            let py = env
                .python
                .as_ref()
                .ok_or_else(|| env.python_problem.clone())?;
            let script_path = env.root.join("xtask/peers").join(script);
            for _ in 0..reps {
                let _ = fs::remove_file(&out_file);
                let mut c = Command::new(py);
                c.arg(&script_path).arg(&src).arg(&out_file).args(*args);
                samples.push(measure(&mut c, &err_log)?);
            }
            let _ = fs::remove_file(&out_file);
        }
        Tool::PythonImports { modules } => {
            let py = env
                .python
                .as_ref()
                .ok_or_else(|| env.python_problem.clone())?;
            for _ in 0..reps {
                let mut c = Command::new(py);
                c.args(["-c", &format!("import {modules}")]);
                samples.push(measure(&mut c, &err_log)?);
            }
        }
    }
    Ok(samples)
}

/// Python for the peers: `--python`, else `target/bench-venv` (created and pip-installed from
/// the pinned requirements when the imports fail).
fn ensure_python(root: &Path, explicit: Option<&Path>) -> Result<PathBuf, String> {
    let probe = |py: &Path| {
        Command::new(py)
            .args(["-c", "import torch, safetensors, gguf, bitsandbytes, numpy"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if let Some(py) = explicit {
        return if probe(py) {
            Ok(py.to_path_buf())
        } else {
            Err(format!("missing: {} cannot import the peers", py.display()))
        };
    }
    let venv = root.join("target/bench-venv");
    let py = venv.join("bin/python");
    if py.is_file() && probe(&py) {
        return Ok(py);
    }
    eprintln!("creating {} with the pinned peers", venv.display());
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err("missing: `python3 -m venv` failed".into());
    }
    let req = root.join("xtask/peers/requirements.txt");
    let ok = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "-r"])
        .arg(&req)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok && probe(&py) {
        Ok(py)
    } else {
        Err(format!("missing: pip install -r {} failed", req.display()))
    }
}

fn build_convcache(root: &Path) -> DynResult<()> {
    eprintln!("cargo build --release -p cli");
    let st = Command::new("cargo")
        .current_dir(root)
        .args(["build", "--release", "-p", "cli"])
        .status()?;
    if !st.success() {
        eprintln!("building convcache failed; its rows will be reported as missing");
    }
    Ok(())
}

fn read_first(path: &str, key: &str) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn machine_description(python: Option<&Path>) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = read_first("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown".into());
    let mem = read_first("/proc/meminfo", "MemTotal")
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or("unknown".into(), |kib| {
            format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0)
        });
    let load = fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let kernel = command_line("uname", &["-sr"]).unwrap_or_default();
    let rustc = command_line("rustc", &["--version"]).unwrap_or_default();
    let mut s = String::new();
    let _ = writeln!(s, "- CPU: {model}, {cpus} logical CPUs");
    let _ = writeln!(s, "- Memory: {mem}");
    let _ = writeln!(s, "- OS: {kernel}; {rustc}");
    let _ = writeln!(s, "- Load average when the run started: {load}");
    if let Some(py) = python {
        let versions = command_line(
            &py.to_string_lossy(),
            &[
                "-c",
                "import sys; from importlib.metadata import version as v; \
                 print(f'Python {sys.version.split()[0]}, ' + ', '.join(f'{p} {v(p)}' for p in \
                 ('torch', 'safetensors', 'gguf', 'bitsandbytes', 'numpy')))",
            ],
        )
        .unwrap_or_else(|| "unknown".into());
        let _ = writeln!(s, "- Peers: {versions}");
    }
    s
}

fn fmt_time(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.1} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

fn fmt_rss(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

/// The Markdown section of one case.
fn case_report(case: &Case, outcomes: &[Outcome], reps_note: &str) -> String {
    let med = |o: &Outcome| match o {
        Outcome::Measured { samples } => Some(median(samples.iter().map(|s| s.wall).collect())),
        Outcome::Missing(_) => None,
    };
    let peer = case.peer.and_then(|i| med(&outcomes[i]));
    let base = case.baseline.and_then(|i| med(&outcomes[i]));
    let mut s = String::new();
    let _ = writeln!(s, "### `{}`: {}\n", case.id, case.what);
    let _ = writeln!(s, "Goal: {}. {reps_note}\n", case.goal);
    let _ = writeln!(
        s,
        "| tool | median time | min .. max | peak RSS (max) | speed-up vs peer | time / cp |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for (tool, o) in case.tools.iter().zip(outcomes) {
        match o {
            Outcome::Measured { samples } => {
                let times: Vec<Duration> = samples.iter().map(|x| x.wall).collect();
                let m = median(times.clone());
                let lo = times.iter().min().copied().unwrap_or_default();
                let hi = times.iter().max().copied().unwrap_or_default();
                let rss = samples.iter().map(|x| x.max_rss_kib).max().unwrap_or(0);
                // Ratios mean something for the conversion rows, not for the start-up row.
                let (peer, base) = if matches!(tool, Tool::PythonImports { .. }) {
                    (None, None)
                } else {
                    (peer, base)
                };
                let vs_peer = peer.map_or("".into(), |p| {
                    format!("{:.2}x", p.as_secs_f64() / m.as_secs_f64())
                });
                let vs_cp = base.map_or("".into(), |b| {
                    format!("{:.2}", m.as_secs_f64() / b.as_secs_f64())
                });
                let _ = writeln!(
                    s,
                    "| {} | {} | {} .. {} | {} | {vs_peer} | {vs_cp} |",
                    tool.label(),
                    fmt_time(m),
                    fmt_time(lo),
                    fmt_time(hi),
                    fmt_rss(rss),
                );
            }
            Outcome::Missing(why) => {
                let why = why.replace('|', "/");
                let _ = writeln!(s, "| {} | not measured: {why} | | | | |", tool.label());
            }
        }
    }
    s.push('\n');
    s
}

fn cases_table(all: &[Case], ran: &[&str]) -> String {
    let mut s = String::from("| case | model | tools | default run | in this report |\n");
    s.push_str("|---|---|---|---|---|\n");
    for c in all {
        let tools: Vec<String> = c.tools.iter().map(Tool::label).collect();
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {} | {} |",
            c.id,
            c.model.file(),
            tools.join("; "),
            if c.wired { "yes" } else { "not wired yet" },
            if ran.contains(&c.id) { "yes" } else { "no" },
        );
    }
    s
}

pub fn run(args: &BenchArgs) -> DynResult<ExitCode> {
    let all = cases();
    if args.list {
        print!("{}", cases_table(&all, &[]));
        return Ok(ExitCode::SUCCESS);
    }
    for id in &args.cases {
        if !all.iter().any(|c| c.id == id) {
            return Err(format!("unknown case `{id}` (see --list)").into());
        }
    }
    let selected: Vec<&Case> = all
        .iter()
        .filter(|c| {
            if args.cases.is_empty() {
                c.wired
            } else {
                args.cases.iter().any(|id| id == c.id)
            }
        })
        .collect();
    if args.reps == 0 || args.hit_reps == 0 {
        return Err("--reps and --hit-reps must be at least 1".into());
    }

    let root = repo_root();
    let models = root.join("target/bench-models");
    fixtures::write_large(&models, false)?;
    if !args.no_build {
        build_convcache(&root)?;
    }
    let explicit_python = args
        .python
        .clone()
        .or_else(|| std::env::var_os("CONVCACHE_BENCH_PYTHON").map(PathBuf::from));
    let (python, python_problem) = match ensure_python(&root, explicit_python.as_deref()) {
        Ok(p) => (Some(p), String::new()),
        Err(e) => {
            eprintln!("{e}");
            (None, e)
        }
    };
    let scratch = root.join("target/bench-scratch");
    fs::create_dir_all(&scratch)?;
    let env = Env {
        root: root.clone(),
        python: python.clone(),
        python_problem,
        convcache: root.join("target/release/convcache"),
        models,
        scratch,
    };

    let started = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let machine = machine_description(python.as_deref());
    let mut sections = String::new();
    for case in &selected {
        warm(&env.model(case.model))?;
        let reps = if case.id == "cache-hit" {
            args.hit_reps
        } else {
            args.reps
        };
        let mut outcomes = Vec::new();
        for tool in &case.tools {
            eprintln!("[{}] {} x{reps}", case.id, tool.label());
            let o = run_tool(&env, case, tool, reps);
            match &o {
                Outcome::Measured { samples } => eprintln!(
                    "    median {}, peak RSS {}",
                    fmt_time(median(samples.iter().map(|s| s.wall).collect())),
                    fmt_rss(samples.iter().map(|s| s.max_rss_kib).max().unwrap_or(0))
                ),
                Outcome::Missing(why) => eprintln!("    not measured: {why}"),
            }
            outcomes.push(o);
        }
        sections.push_str(&case_report(
            case,
            &outcomes,
            &format!("{reps} repetitions per tool, median reported."),
        ));
    }
    let _ = fs::remove_dir_all(&env.scratch);

    let ran: Vec<&str> = selected.iter().map(|c| c.id).collect();
    let commit = command_line(
        "git",
        &[
            "-C",
            &root.to_string_lossy(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    )
    .unwrap_or_default();
    let mut doc = String::new();
    doc.push_str("# Benchmarks\n\n");
    let _ = writeln!(
        doc,
        "Written by `cargo xtask bench` on {started} at commit `{commit}`. Every number below was \
         measured by that run; rerun the command to update this file rather than editing it.\n"
    );
    doc.push_str("## Machine\n\n");
    doc.push_str(&machine);
    doc.push_str("\n## Method\n\n");
    doc.push_str(METHOD);
    doc.push_str("\n## Results\n\n");
    doc.push_str(&sections);
    doc.push_str("## Cases\n\n");
    doc.push_str(&cases_table(&all, &ran));
    doc.push('\n');
    doc.push_str(PLANNED);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("BENCHMARKS.md"));
    fs::write(&out, doc)?;
    println!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}

const METHOD: &str = "\
- Models: `cargo xtask fixtures --large` writes a Flux-like model (real Flux key names and \
shape patterns, hidden size 1536, 4 double and 4 single blocks, ~500 M parameters) as \
`flux_large_f32.safetensors` (~2 GB) and `flux_large_bf16.safetensors` (~1 GB) into \
`target/bench-models/`.
- Each row is one tool run as a child process, several times; time is wall-clock from spawn \
to exit, peak RSS is the child's `ru_maxrss` from `wait4(2)` (the largest over the \
repetitions). The source is read once before each case, so every tool starts from a warm \
page cache; outputs go to `target/bench-scratch/` on the same disk and are deleted between \
repetitions.
- `ru_maxrss` counts every resident page of the process, including pages of memory-mapped \
files (file-backed and reclaimable, but resident): a tool that maps its whole source shows \
up to the source's size here.
- Python rows include interpreter start-up and imports; the `python -c 'import ...'` row \
shows that share.
- \"speed-up vs peer\" is the peer's median time divided by the row's; \"time / cp\" is the \
row's median divided by that of `cp` of a file as large as the output.
- The machine may be shared with other work; the load average at the start is recorded \
above.
";

const PLANNED: &str = "\
Cases not wired yet run only when named (`cargo xtask bench --case ID`); their convcache rows \
say \"not measured\" until the command exists. Still to add:
- GGUF (`gguf-q8_0`, `gguf-q4_k_m`): the peer is ComfyUI-GGUF's path, its convert.py base \
step (`xtask/peers/gguf_base_step.py`, the same per-tensor F32/F16/BF16 choice through pip \
`gguf`) followed by ggml's quantizer over the same tensors with the same thread count. The \
second step needs a ggml quantizer that accepts diffusion architectures (llama.cpp with \
ComfyUI-GGUF's `lcpp.patch`); it becomes a second Python/exec row of those cases.
- bitsandbytes FP4 and int8 cases next to `bnb-nf4` (its peer, \
`xtask/peers/bnb_quantize.py`, runs bitsandbytes' CPU `quantize_4bit` over every Linear \
weight and takes `fp4` as well).
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_ids_are_unique_and_peers_in_range() {
        let all = cases();
        let mut ids: Vec<_> = all.iter().map(|c| c.id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), all.len());
        for c in &all {
            for i in c.peer.iter().chain(c.baseline.iter()) {
                assert!(*i < c.tools.len(), "{}", c.id);
            }
        }
    }

    #[test]
    fn measures_a_child_and_reports_failures() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("err");
        let s = measure(&mut Command::new("true"), &log).unwrap();
        assert!(s.max_rss_kib > 0);
        let mut c = Command::new("sh");
        c.args(["-c", "echo boom >&2; exit 3"]);
        let e = measure(&mut c, &log).unwrap_err().to_string();
        assert!(e.contains("exit 3") && e.contains("boom"), "{e}");
    }

    #[test]
    fn peak_rss_is_the_childs() {
        // A child that touches ~64 MiB must report at least that, whatever xtask uses.
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("err");
        let mut c = Command::new("dd");
        c.args(["if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"]);
        let s = measure(&mut c, &log).unwrap();
        assert!(s.max_rss_kib > 60 * 1024, "{} KiB", s.max_rss_kib);
    }
}
