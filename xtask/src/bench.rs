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

#[path = "bench_python.rs"]
mod bench_python;
/// The cases of one command with several targets or sources.
#[path = "bench_multi.rs"]
mod multi;
#[path = "bench_resume.rs"]
mod resume;
#[path = "bench_sharded.rs"]
mod sharded;

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Python interpreter that has the peers installed (or $CONVCACHE_BENCH_PYTHON). Default:
    /// `target/bench-venv`, created and filled from `xtask/peers/requirements.txt` (pinned
    /// versions) when missing.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Repetitions per tool (the median is reported; at least 5 for `f32-to-bf16`).
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
    /// The bf16 model as a three-shard diffusers repository folder.
    FluxBf16Diffusers,
}

impl Model {
    fn file(self) -> &'static str {
        match self {
            Model::FluxF32 => "flux_large_f32.safetensors",
            Model::FluxBf16 => "flux_large_bf16.safetensors",
            Model::FluxBf16Diffusers => fixtures::diffusers::LARGE_SHARDED,
        }
    }
}

/// One command a case times.
#[derive(Debug, Clone)]
enum Tool {
    /// `cp` of a file as large as the case's output: the I/O floor.
    CpOutputSize,
    /// `dd ... bs=8M conv=fsync` of the same file: the I/O floor of a writer that, like
    /// convcache, makes its output durable before publishing it.
    CpFsyncOutputSize,
    /// `convcache convert SRC --to T [EXTRA...]` into a fresh models dir each repetition.
    Convert {
        to: &'static str,
        extra: &'static [&'static str],
    },
    /// `convcache convert MODEL --to T` of another model than the case's (a comparison row).
    ConvertModel { model: Model, to: &'static str },
    /// The Python package (`convcache.smart_convert`), see [`bench_python`].
    Package(bench_python::PackageTool),
    /// `convcache convert SRC --to T` when the output already exists (after one untimed run).
    CacheHit { to: &'static str },
    /// A script of `xtask/peers/` run with the bench Python: `SCRIPT SRC OUT ARGS...`.
    Python {
        script: &'static str,
        args: &'static [&'static str],
    },
    /// `python -c "import ..."`: the interpreter and import cost inside the Python rows.
    PythonImports { modules: &'static str },
    /// ComfyUI-GGUF's path as two processes run back to back: `gguf_base_step.py SRC BASE flux`
    /// then `ggml_quantize.py BASE OUT TARGET THREADS` (THREADS = the CPU count, what convcache
    /// uses). A sample's time is the sum of both, its peak RSS the larger of the two.
    GgufPeer { target: &'static str },
}

impl Tool {
    fn label(&self) -> String {
        match self {
            Tool::CpOutputSize => "cp (file of the output's size)".into(),
            Tool::CpFsyncOutputSize => {
                "dd bs=8M conv=fsync (cp + fsync of a file of the output's size)".into()
            }
            Tool::GgufPeer { target } => format!(
                "python peers/gguf_base_step.py flux, then peers/ggml_quantize.py {target} \
                 (ggml_quantize_chunk, {} threads)",
                threads()
            ),
            Tool::Convert { to, extra } => {
                let mut s = format!("convcache convert --to {to}");
                for a in *extra {
                    s.push(' ');
                    s.push_str(a);
                }
                s
            }
            Tool::ConvertModel { model, to } => {
                format!("convcache convert {} --to {to}", model.file())
            }
            Tool::CacheHit { to } => format!("convcache convert --to {to} (cache hit)"),
            Tool::Package(t) => t.label(),
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
    /// Index into `tools` of the I/O baseline with fsync.
    baseline_fsync: Option<usize>,
    /// Index into `tools` of the peer run with the durability of convcache's default (its
    /// output fsynced before it exits).
    durable_peer: Option<usize>,
    /// Rows whose output is durable when they exit (convcache's default, the fsyncing peers).
    /// Each row is compared with the peer and the I/O baseline of its own durability: these
    /// with `durable_peer` and `baseline_fsync`, the others with `peer` and `baseline`.
    durable_rows: &'static [usize],
    /// Cases that are not wired yet are listed in BENCHMARKS.md and run only when named.
    wired: bool,
    /// The target the issue sets.
    goal: &'static str,
    /// Rows (indices into `tools`, convcache's) the targets are checked on: speed-up over the
    /// peer, time over cp, median time, peak RSS under 512 MiB.
    checked: &'static [usize],
    min_speedup: Option<f64>,
    max_vs_cp: Option<f64>,
    max_ms: Option<f64>,
    rss_limit: bool,
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
                Tool::Convert {
                    to: "bf16",
                    extra: &[],
                },
                Tool::Convert {
                    to: "bf16",
                    extra: &["--no-fsync"],
                },
                Tool::Python {
                    script: "seed_convert.py",
                    args: &["bf16"],
                },
                Tool::Python {
                    script: "seed_convert.py",
                    args: &["bf16", "--fsync"],
                },
                Tool::CpOutputSize,
                Tool::CpFsyncOutputSize,
                Tool::PythonImports {
                    modules: "torch, safetensors.torch",
                },
            ],
            checked: &[0, 1],
            peer: Some(2),
            baseline: Some(4),
            baseline_fsync: Some(5),
            durable_peer: Some(3),
            durable_rows: &[0, 3, 5],
            wired: true,
            goal: ">= 3x faster than the seed's path, <= 1.3x the time of cp, peak RSS < 512 MiB \
                   (each convcache row against the seed's path and the copy of its own durability)",
            min_speedup: Some(3.0),
            max_vs_cp: Some(1.3),
            max_ms: None,
            rss_limit: true,
        },
        Case {
            id: "cache-hit",
            what: "convcache convert when a valid conversion exists (~2 GB f32 source)",
            model: Model::FluxF32,
            tools: vec![Tool::CacheHit { to: "bf16" }],
            checked: &[0],
            peer: None,
            baseline: None,
            baseline_fsync: None,
            durable_peer: None,
            durable_rows: &[],
            wired: true,
            goal: "< 20 ms whatever the model's size",
            min_speedup: None,
            max_vs_cp: None,
            max_ms: Some(20.0),
            rss_limit: false,
        },
        Case {
            id: "gguf-q8_0",
            what: "Q8_0 GGUF of the ~1 GB bf16 Flux-like model",
            model: Model::FluxBf16,
            tools: vec![
                Tool::Convert {
                    to: "Q8_0",
                    extra: &[],
                },
                Tool::GgufPeer { target: "Q8_0" },
            ],
            checked: &[0],
            peer: Some(1),
            baseline: None,
            baseline_fsync: None,
            durable_peer: None,
            durable_rows: &[],
            wired: true,
            goal: ">= 3x faster end to end than convert.py + ggml quantizer, peak RSS < 512 MiB",
            min_speedup: Some(3.0),
            max_vs_cp: None,
            max_ms: None,
            rss_limit: true,
        },
        Case {
            id: "gguf-q4_k_m",
            what: "Q4_K_M GGUF of the ~1 GB bf16 Flux-like model",
            model: Model::FluxBf16,
            tools: vec![
                Tool::Convert {
                    to: "Q4_K_M",
                    extra: &[],
                },
                Tool::GgufPeer { target: "Q4_K_M" },
            ],
            checked: &[0],
            peer: Some(1),
            baseline: None,
            baseline_fsync: None,
            durable_peer: None,
            durable_rows: &[],
            wired: true,
            goal: ">= 3x faster end to end than convert.py + ggml quantizer, peak RSS < 512 MiB",
            min_speedup: Some(3.0),
            max_vs_cp: None,
            max_ms: None,
            rss_limit: true,
        },
        bnb_case(
            "bnb-nf4",
            "NF4 (bitsandbytes layout) of the ~1 GB bf16 Flux-like model",
            &["nf4"],
        ),
        bnb_case(
            "bnb-fp4",
            "FP4 (bitsandbytes layout) of the ~1 GB bf16 Flux-like model",
            &["fp4"],
        ),
        Case {
            id: "bnb-int8",
            what: "LLM.int8 (bitsandbytes Linear8bitLt layout) of the ~1 GB bf16 Flux-like model",
            model: Model::FluxBf16,
            tools: vec![
                Tool::Convert {
                    to: "int8",
                    extra: &[],
                },
                Tool::Python {
                    script: "bnb_int8.py",
                    args: &[],
                },
            ],
            checked: &[0],
            peer: Some(1),
            baseline: None,
            baseline_fsync: None,
            durable_peer: None,
            durable_rows: &[],
            wired: true,
            goal: "side by side with bitsandbytes' CPU int8_vectorwise_quant (no issue sets a \
                   speed target for int8), peak RSS < 512 MiB",
            min_speedup: None,
            max_vs_cp: None,
            max_ms: None,
            rss_limit: true,
        },
        comfy_case(
            "comfy-fp8_scaled",
            "ComfyUI fp8_scaled (per-tensor float8_e4m3fn) of the ~1 GB bf16 Flux-like model",
            &["fp8_scaled"],
            &["fp8_scaled", "--fsync"],
        ),
        comfy_case(
            "comfy-nvfp4",
            "ComfyUI nvfp4 (E2M1, block-16 scales, blocked layout) of the ~1 GB bf16 Flux-like model",
            &["nvfp4"],
            &["nvfp4", "--fsync"],
        ),
        sharded::case(),
        Case {
            id: KERNELS,
            what: "single-thread K-quant kernels against ggml's reference quantizer",
            model: Model::FluxBf16,
            tools: Vec::new(),
            checked: &[],
            peer: None,
            baseline: None,
            baseline_fsync: None,
            durable_peer: None,
            durable_rows: &[],
            wired: true,
            goal: ">= 2x ggml's reference quantizer per thread for Q4_K, Q5_K and Q6_K",
            min_speedup: None,
            max_vs_cp: None,
            max_ms: None,
            rss_limit: false,
        },
        resume::case(),
    ]
    .into_iter()
    .chain(bench_python::cases())
    .chain(multi::cases())
    .collect()
}

/// A bitsandbytes 4-bit case: convcache against bitsandbytes' own CPU `quantize_4bit`.
/// `quant` is the one-element argument list of the peer, the quant type (`nf4`, `fp4`), which
/// is also convcache's target.
fn bnb_case(id: &'static str, what: &'static str, quant: &'static [&'static str; 1]) -> Case {
    Case {
        id,
        what,
        model: Model::FluxBf16,
        tools: vec![
            Tool::Convert {
                to: quant[0],
                extra: &[],
            },
            Tool::Python {
                script: "bnb_quantize.py",
                args: quant,
            },
        ],
        checked: &[0],
        peer: Some(1),
        baseline: None,
        baseline_fsync: None,
        durable_peer: None,
        durable_rows: &[],
        wired: true,
        goal: ">= 5x faster than bitsandbytes' CPU quantize_4bit, peak RSS < 512 MiB",
        min_speedup: Some(5.0),
        max_vs_cp: None,
        max_ms: None,
        rss_limit: true,
    }
}

/// A ComfyUI quantized target: convcache against the same quantization done in Python with
/// comfy-kitchen's eager functions tensor by tensor (`comfy_quantize.py`, the way a conversion
/// script such as comfy-quants does it). `target` is the peer's argument list (the target, which
/// is also convcache's) and `target_fsync` the same with `--fsync`. As in `f32-to-bf16`, each
/// convcache row is held to the peer of its own durability: the default (fsynced) row to the
/// peer with `--fsync`, the `--no-fsync` row to the plain peer.
fn comfy_case(
    id: &'static str,
    what: &'static str,
    target: &'static [&'static str; 1],
    target_fsync: &'static [&'static str; 2],
) -> Case {
    Case {
        id,
        what,
        model: Model::FluxBf16,
        tools: vec![
            Tool::Convert {
                to: target[0],
                extra: &[],
            },
            Tool::Convert {
                to: target[0],
                extra: &["--no-fsync"],
            },
            Tool::Python {
                script: "comfy_quantize.py",
                args: target,
            },
            Tool::Python {
                script: "comfy_quantize.py",
                args: target_fsync,
            },
        ],
        checked: &[0, 1],
        peer: Some(2),
        baseline: None,
        baseline_fsync: None,
        durable_peer: Some(3),
        durable_rows: &[0, 3],
        wired: true,
        goal: ">= 5x faster than comfy-kitchen's eager quantizers called tensor by tensor from \
               Python, peak RSS < 512 MiB (each convcache row against the peer of its own \
               durability)",
        min_speedup: Some(5.0),
        max_vs_cp: None,
        max_ms: None,
        rss_limit: true,
    }
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

/// Lets the disk go idle before a timed run: the previous repetition's output was just deleted
/// (its freed blocks, and the dirty pages of an output nobody synced, are otherwise still being
/// processed by the filesystem when the next run starts, and slow whichever tool comes next).
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Spawns `cmd`, waits for it with `wait4`, and returns its wall time and peak RSS. A non-zero
/// exit is an error carrying the first lines of its stderr.
fn measure(cmd: &mut Command, stderr_path: &Path) -> DynResult<Sample> {
    let stderr = fs::File::create(stderr_path)?;
    settle();
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
    if path.is_dir() {
        // A repository folder: every file in it.
        for e in fs::read_dir(path)? {
            warm(&e?.path())?;
        }
        return Ok(());
    }
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
    /// Extra lines for the current case's section (per-step times of two-process peers).
    notes: std::cell::RefCell<Vec<String>>,
}

/// Threads convcache's rayon pool uses by default, and the count given to the ggml peer.
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Id of the kernel-speed case, which runs two benchmark programs instead of timing children.
const KERNELS: &str = "kernels";

/// Parses `... wall W s, ... thread CPU C s, M MB/s` as printed by both `quant_bench` and
/// `bench_ggml.py`: (wall seconds, thread CPU seconds, MB/s by thread CPU).
fn parse_kernel_line(line: &str) -> Option<(f64, f64, f64)> {
    let num_after = |key: &str| -> Option<f64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace()
            .next()?
            .trim_end_matches(',')
            .parse()
            .ok()
    };
    let wall = num_after("wall ")?;
    let cpu = num_after("thread CPU ")?;
    let tail = &line[line.find("thread CPU ")?..];
    let mbs = tail
        .split(", ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((wall, cpu, mbs))
}

/// Runs a benchmark program and returns the line it printed with the figures.
fn kernel_run(cmd: &mut Command) -> Result<(String, (f64, f64, f64)), String> {
    let out = cmd.output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        return Err(format!("{}: {}", out.status, tail.join(" / ")));
    }
    let line = text
        .lines()
        .find(|l| l.contains("thread CPU"))
        .ok_or_else(|| format!("no figures in the output: {}", text.trim()))?;
    let figures = parse_kernel_line(line).ok_or_else(|| format!("cannot parse: {line}"))?;
    Ok((line.trim().to_string(), figures))
}

/// The kernel section: per type, convcache's `quant_bench` example and ggml's reference
/// quantizer (`bench_ggml.py`, `ggml_quantize_chunk` through ctypes), both single-threaded over
/// the same 256 x 4096 values, best of 5 runs each. The ratio uses thread CPU time, which a
/// busy shared machine disturbs least; wall-clock figures are shown too.
fn kernels_section(env: &Env, case: &Case, verdicts: &mut Vec<String>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### `{}`: {}
",
        case.id, case.what
    );
    let _ = writeln!(
        s,
        "Goal: {}. `cargo run --release -p gguf --example quant_bench -- TYPE 256` against \
         `python crates/gguf/tests/golden/quant/bench_ggml.py TYPE 256` (256 rows of 4096 \
         values, one thread each, best of 5 runs; speed-up = ggml's thread CPU time / \
         convcache's).\n",
        case.goal
    );
    let _ = writeln!(
        s,
        "| type | convcache: thread CPU (wall) | convcache MB/s | ggml: thread CPU (wall) | ggml MB/s | speed-up per thread |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    let mut raw = Vec::new();
    for ty in ["Q4_K", "Q5_K", "Q6_K"] {
        eprintln!("[{KERNELS}] {ty}");
        let mut ours = Command::new("cargo");
        ours.current_dir(&env.root).args([
            "run",
            "--release",
            "--quiet",
            "-p",
            "gguf",
            "--example",
            "quant_bench",
            "--",
            ty,
            "256",
        ]);
        let ours = kernel_run(&mut ours);
        let theirs = match env.python.as_ref() {
            Some(py) => {
                let mut c = Command::new(py);
                c.arg(
                    env.root
                        .join("crates/gguf/tests/golden/quant/bench_ggml.py"),
                )
                .args([ty, "256"]);
                kernel_run(&mut c)
            }
            None => Err(env.python_problem.clone()),
        };
        let cell = |r: &Result<(String, (f64, f64, f64)), String>| match r {
            Ok((_, (wall, cpu, mbs))) => (
                format!("{} ({})", fmt_secs(*cpu), fmt_secs(*wall)),
                format!("{mbs:.1}"),
            ),
            Err(e) => (
                format!("not measured: {}", e.replace('|', "/")),
                String::new(),
            ),
        };
        let (o1, o2) = cell(&ours);
        let (t1, t2) = cell(&theirs);
        let ratio = match (&ours, &theirs) {
            (Ok((_, (_, a, _))), Ok((_, (_, b, _)))) if *a > 0.0 => format!("{:.2}x", b / a),
            _ => String::new(),
        };
        let met = match (&ours, &theirs) {
            (Ok((_, (_, a, _))), Ok((_, (_, b, _)))) if *a > 0.0 => met(b / a >= 2.0),
            _ => "not measured".to_string(),
        };
        verdicts.push(format!(
            "| `{KERNELS}` {ty}: >= 2x ggml per thread | {} | {met} |",
            if ratio.is_empty() { "-" } else { &ratio }
        ));
        eprintln!("    convcache {o1}, ggml {t1}, {ratio}");
        let _ = writeln!(s, "| {ty} | {o1} | {o2} | {t1} | {t2} | {ratio} |");
        for (line, _) in [&ours, &theirs].into_iter().flatten() {
            raw.push(line.clone());
        }
    }
    s.push_str("\nThe programs' own lines:\n\n```text\n");
    for l in raw {
        s.push_str(&l);
        s.push('\n');
    }
    s.push_str("```\n\n");
    s
}

fn fmt_secs(x: f64) -> String {
    fmt_time(Duration::from_secs_f64(x.max(0.0)))
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
        Tool::CpFsyncOutputSize => {
            let same_size = env.model(Model::FluxBf16);
            warm(&same_size)?;
            for _ in 0..reps {
                let _ = fs::remove_file(&out_file);
                let mut c = Command::new("dd");
                c.arg(format!("if={}", same_size.display()))
                    .arg(format!("of={}", out_file.display()))
                    .args(["bs=8M", "conv=fsync"]);
                samples.push(measure(&mut c, &err_log)?);
            }
            let _ = fs::remove_file(&out_file);
        }
        Tool::GgufPeer { target } => {
            let py = env
                .python
                .as_ref()
                .ok_or_else(|| env.python_problem.clone())?;
            let peers = env.root.join("xtask/peers");
            let base = env.scratch.join("base.gguf");
            let mut steps = Vec::new();
            for _ in 0..reps {
                let _ = fs::remove_file(&base);
                let _ = fs::remove_file(&out_file);
                let mut step1 = Command::new(py);
                step1
                    .arg(peers.join("gguf_base_step.py"))
                    .arg(&src)
                    .arg(&base)
                    .arg("flux");
                let a =
                    measure(&mut step1, &err_log).map_err(|e| format!("gguf_base_step.py: {e}"))?;
                let mut step2 = Command::new(py);
                step2
                    .arg(peers.join("ggml_quantize.py"))
                    .arg(&base)
                    .arg(&out_file)
                    .arg(target)
                    .arg(threads().to_string());
                let b =
                    measure(&mut step2, &err_log).map_err(|e| format!("ggml_quantize.py: {e}"))?;
                eprintln!(
                    "    base step {}, {}; quantize step {}, {}",
                    fmt_time(a.wall),
                    fmt_rss(a.max_rss_kib),
                    fmt_time(b.wall),
                    fmt_rss(b.max_rss_kib)
                );
                steps.push(format!(
                    "{} ({}) + {} ({})",
                    fmt_time(a.wall),
                    fmt_rss(a.max_rss_kib),
                    fmt_time(b.wall),
                    fmt_rss(b.max_rss_kib)
                ));
                samples.push(Sample {
                    wall: a.wall + b.wall,
                    max_rss_kib: a.max_rss_kib.max(b.max_rss_kib),
                });
            }
            let _ = fs::remove_file(&base);
            let _ = fs::remove_file(&out_file);
            env.notes.borrow_mut().push(format!(
                "ComfyUI-GGUF path, {target}, per repetition: base step time (peak RSS) + \
                 ggml quantize step time (peak RSS): {}.",
                steps.join("; ")
            ));
        }
        Tool::Convert { .. } | Tool::ConvertModel { .. } => {
            if !env.convcache.is_file() {
                return Err(format!("missing: {} not built", env.convcache.display()).into());
            }
            let (src, to, extra) = match tool {
                Tool::ConvertModel { model, to } => {
                    let other = env.model(*model);
                    warm(&other)?;
                    (other, *to, &[][..])
                }
                Tool::Convert { to, extra } => (src, *to, *extra),
                _ => unreachable!("matched above"),
            };
            for _ in 0..reps {
                let dir = env.fresh_models_dir()?;
                let mut c = env.convert_cmd(&src, to, &dir);
                c.args(extra);
                samples.push(measure(&mut c, &err_log)?);
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
        Tool::Package(t) => samples = bench_python::run(env, &src, *t, reps)?,
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
            .args([
                "-c",
                "import torch, safetensors, gguf, bitsandbytes, numpy, comfy_kitchen",
            ])
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
                 ('torch', 'safetensors', 'gguf', 'bitsandbytes', 'numpy', 'comfy-kitchen')))",
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

fn met(ok: bool) -> String {
    if ok { "met" } else { "**not met**" }.to_string()
}

/// Checks the issue's targets for a case on each of its checked rows (convcache's) and appends
/// one `| goal | measured | verdict |` line per target and row.
fn case_verdicts(case: &Case, outcomes: &[Outcome], verdicts: &mut Vec<String>) {
    let med = |i: Option<usize>| match i.and_then(|i| outcomes.get(i)) {
        Some(Outcome::Measured { samples }) => {
            Some(median(samples.iter().map(|s| s.wall).collect()).as_secs_f64())
        }
        _ => None,
    };
    for &row in case.checked {
        // With several checked rows, each line names its row.
        let who = match (case.checked.len() > 1, case.tools.get(row)) {
            (true, Some(tool)) => format!(" (`{}`)", tool.label()),
            _ => String::new(),
        };
        let ours = med(Some(row));
        let rss = match outcomes.get(row) {
            Some(Outcome::Measured { samples }) => samples.iter().map(|x| x.max_rss_kib).max(),
            _ => None,
        };
        let mut line = |goal: String, measured: Option<String>, ok: Option<bool>| {
            let (m, v) = match (measured, ok) {
                (Some(m), Some(ok)) => (m, met(ok)),
                _ => ("-".to_string(), "not measured".to_string()),
            };
            verdicts.push(format!("| `{}`{who}: {goal} | {m} | {v} |", case.id));
        };
        // Like with like: a row that fsyncs its output is held to a peer and a copy that do too.
        let durable = case.durable_rows.contains(&row);
        let (peer, baseline, baseline_name) = match durable {
            true => (case.durable_peer, case.baseline_fsync, "cp + fsync"),
            false => (case.peer, case.baseline, "cp"),
        };
        if let Some(min) = case.min_speedup {
            let r = ours.zip(med(peer)).map(|(o, p)| p / o);
            line(
                format!("speed-up >= {min}x vs {}", tool_name(case, peer)),
                r.map(|r| format!("{r:.2}x")),
                r.map(|r| r >= min),
            );
        }
        if let Some(max) = case.max_vs_cp {
            let r = ours.zip(med(baseline)).map(|(o, b)| o / b);
            line(
                format!("time <= {max}x {baseline_name}"),
                r.map(|r| format!("{r:.2}x")),
                r.map(|r| r <= max),
            );
        }
        if let Some(max_ms) = case.max_ms {
            line(
                format!("median < {max_ms} ms"),
                ours.map(fmt_secs),
                ours.map(|o| o * 1000.0 < max_ms),
            );
        }
        if case.rss_limit {
            line(
                "peak RSS < 512 MiB".to_string(),
                rss.map(fmt_rss),
                rss.map(|k| k < 512 * 1024),
            );
        }
    }
}

fn tool_name(case: &Case, tool: Option<usize>) -> String {
    tool.and_then(|i| case.tools.get(i))
        .map_or("the peer".into(), |t| format!("`{}`", t.label()))
}

/// The Markdown section of one case.
fn case_report(case: &Case, outcomes: &[Outcome], reps_note: &str, notes: &[String]) -> String {
    let med = |o: &Outcome| match o {
        Outcome::Measured { samples } => Some(median(samples.iter().map(|s| s.wall).collect())),
        Outcome::Missing(_) => None,
    };
    let peer = case.peer.and_then(|i| med(&outcomes[i]));
    let durable_peer = case.durable_peer.and_then(|i| med(&outcomes[i]));
    let base = case.baseline.and_then(|i| med(&outcomes[i]));
    let base_fsync = case.baseline_fsync.and_then(|i| med(&outcomes[i]));
    let mut s = String::new();
    let _ = writeln!(s, "### `{}`: {}\n", case.id, case.what);
    let _ = writeln!(s, "Goal: {}. {reps_note}\n", case.goal);
    let _ = writeln!(
        s,
        "| tool | median time | min .. max | peak RSS (max) | speed-up vs peer (same durability) | time / cp | time / (cp + fsync) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for (row, (tool, o)) in case.tools.iter().zip(outcomes).enumerate() {
        let peer = match case.durable_rows.contains(&row) {
            true => durable_peer,
            false => peer,
        };
        match o {
            Outcome::Measured { samples } => {
                let times: Vec<Duration> = samples.iter().map(|x| x.wall).collect();
                let m = median(times.clone());
                let lo = times.iter().min().copied().unwrap_or_default();
                let hi = times.iter().max().copied().unwrap_or_default();
                let rss = samples.iter().map(|x| x.max_rss_kib).max().unwrap_or(0);
                // Ratios mean something for the conversion rows, not for the start-up row.
                let (peer, base, base_fsync) = if matches!(tool, Tool::PythonImports { .. }) {
                    (None, None, None)
                } else {
                    (peer, base, base_fsync)
                };
                let vs_peer = peer.map_or("".into(), |p| {
                    format!("{:.2}x", p.as_secs_f64() / m.as_secs_f64())
                });
                let vs_cp = base.map_or("".into(), |b| {
                    format!("{:.2}", m.as_secs_f64() / b.as_secs_f64())
                });
                let vs_fsync = base_fsync.map_or("".into(), |b| {
                    format!("{:.2}", m.as_secs_f64() / b.as_secs_f64())
                });
                let _ = writeln!(
                    s,
                    "| {} | {} | {} .. {} | {} | {vs_peer} | {vs_cp} | {vs_fsync} |",
                    tool.label(),
                    fmt_time(m),
                    fmt_time(lo),
                    fmt_time(hi),
                    fmt_rss(rss),
                );
            }
            Outcome::Missing(why) => {
                let why = why.replace('|', "/");
                let _ = writeln!(s, "| {} | not measured: {why} | | | | | |", tool.label());
            }
        }
    }
    s.push('\n');
    for n in notes {
        let _ = writeln!(s, "{n}\n");
    }
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
            if c.id == KERNELS {
                "synthetic, 256 x 4096 f32"
            } else {
                c.model.file()
            },
            if c.id == KERNELS {
                "gguf example quant_bench; bench_ggml.py (ggml_quantize_chunk)".to_string()
            } else {
                tools.join("; ")
            },
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
    // The binary is built from the working tree, which other work may have changed: name the
    // uncommitted source files so the commit named in the report is not over-read.
    let dirty = command_line(
        "git",
        &[
            "-C",
            &root.to_string_lossy(),
            "diff",
            "--name-only",
            "HEAD",
            "--",
            "crates",
        ],
    )
    .unwrap_or_default();
    let dirty: Vec<&str> = dirty
        .lines()
        .filter(|p| p.ends_with(".rs") || p.ends_with(".toml"))
        .collect();
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
        notes: Default::default(),
    };

    let started = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let machine = machine_description(python.as_deref());
    let mut sections = String::new();
    let mut verdicts = Vec::new();
    for case in &selected {
        if case.id == KERNELS {
            sections.push_str(&kernels_section(&env, case, &mut verdicts));
            continue;
        }
        if multi::handles(case.id) {
            sections.push_str(&multi::section(&env, case, args.reps, &mut verdicts));
            continue;
        }
        if case.id == resume::ID {
            warm(&env.model(case.model))?;
            sections.push_str(&resume::section(&env, case, args.reps, &mut verdicts));
            continue;
        }
        env.notes.borrow_mut().clear();
        warm(&env.model(case.model))?;
        let reps = if case.id == "cache-hit" || case.id == bench_python::HIT {
            args.hit_reps
        } else if case.id == "f32-to-bf16" || case.id == bench_python::CONVERT {
            // Sub-second rows compared at a 1.3x bound: more repetitions, a steadier median.
            args.reps.max(5)
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
        case_verdicts(case, &outcomes, &mut verdicts);
        sections.push_str(&case_report(
            case,
            &outcomes,
            &format!("{reps} repetitions per tool, median reported."),
            &env.notes.borrow(),
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
    if !dirty.is_empty() {
        let _ = writeln!(
            doc,
            "The working tree had uncommitted changes when the run started (the convcache \
             binary is built from the working tree, so they may be in it): {}.\n",
            dirty
                .iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    doc.push_str("## Machine\n\n");
    doc.push_str(&machine);
    doc.push_str("\n## Method\n\n");
    doc.push_str(METHOD);
    doc.push_str("\n## Targets\n\n");
    doc.push_str(
        "Each target of the issues, checked by the harness on convcache's rows of this run \
         (medians; peak RSS is the largest over the repetitions). Where a case has two \
         convcache rows, each line names its row.\n\n",
    );
    doc.push_str("| target | measured | verdict |\n|---|---|---|\n");
    for v in &verdicts {
        doc.push_str(v);
        doc.push('\n');
    }
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
`target/bench-models/`, and the bf16 one again as a three-shard diffusers repository \
(`flux_large_bf16_diffusers/transformer/`, diffusers key names, q/k/v split as ComfyUI's \
`flux_to_diffusers` names them).
- Each row is one tool run as a child process, several times; time is wall-clock from spawn \
to exit, peak RSS is the child's `ru_maxrss` from `wait4(2)` (the largest over the \
repetitions). The source is read once before each case, so every tool starts from a warm \
page cache; outputs go to `target/bench-scratch/` on the same disk and are deleted between \
repetitions, then `sync` runs (untimed) so that every repetition starts with an idle disk.
- `ru_maxrss` counts every resident page of the process, including pages of memory-mapped \
files (file-backed and reclaimable, but resident): a tool that maps its whole source shows \
up to the source's size here.
- Python rows include interpreter start-up and imports; the `python -c 'import ...'` row \
shows that share.
- \"speed-up vs peer\" is the peer's median time divided by the row's; \"time / cp\" is the \
row's median divided by that of `cp` of a file as large as the output, \"time / (cp + fsync)\" \
by that of `dd bs=8M conv=fsync` of the same file.
- Durability: by default convcache fsyncs its output before publishing it (and starts the \
writeback while converting); the seed's path and plain `cp` leave their output in the page \
cache, to be written back later. Rows are held to peers of the same durability: \
`f32-to-bf16` times convcache both ways, the default row against the seed's path followed by \
an fsync of its output (`seed_convert.py ... --fsync`) and against `cp + fsync`, and the \
`--no-fsync` row (published from the page cache, re-verified by convcache after a restart) \
against the plain seed's path and plain `cp`. \"speed-up vs peer (same durability)\" follows \
the same pairing; both \"time / cp\" columns are shown for every row. On a disk slower than the \
conversion, the default row is bounded by the disk's write speed, whatever the converter does: \
it cannot come within 1.3x of a `cp` that does not wait for the disk.
- GGUF peer: ComfyUI-GGUF's path as two processes run back to back, both timed: \
`xtask/peers/gguf_base_step.py` (convert.py's F16/BF16 base step through pip `gguf`), then \
`xtask/peers/ggml_quantize.py` (the patched llama-quantize's per-tensor type choice, bytes from \
`ggml_quantize_chunk` of pip llama-cpp-python's libggml-base, rows split over as many threads as \
convcache uses, one tensor in memory at a time). Its time is the sum of the two, its peak RSS \
the larger (the second step's includes the pages of the base GGUF it maps, as \
llama-quantize maps its input). On the small Flux fixture its Q8_0 and Q4_K_M outputs have the sha256 recorded in \
`crates/gguf/tests/golden/convert/expected.json`.
- ComfyUI quantized peer (`comfy-fp8_scaled`, `comfy-nvfp4`): `xtask/peers/comfy_quantize.py` \
reads the source tensor by tensor (`safe_open`), quantizes the layers convcache's Flux rule \
selects with comfy-kitchen's eager `quantize_per_tensor_fp8` / `quantize_nvfp4` and \
comfy-quants' per-tensor scale, and writes the collected dict with `save_file`, the way a \
conversion script does; torch uses all CPUs. As in `f32-to-bf16`, convcache's default row is \
held to the peer run with `--fsync` (output and directory fsynced), its `--no-fsync` row to the \
plain peer. `comfy_check.py` checks that convcache's output is \
the peer's, tensor for tensor, and that comfy-kitchen dequantizes it to what convcache reads.
- The machine may be shared with other work; the load average at the start is recorded \
above.
";

const PLANNED: &str = "\
Every case is wired; `cargo xtask bench --case ID` runs some of them.
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
            for i in c
                .peer
                .iter()
                .chain(c.baseline.iter())
                .chain(c.baseline_fsync.iter())
                .chain(c.durable_peer.iter())
                .chain(c.durable_rows.iter())
                .chain(c.checked.iter())
            {
                assert!(*i < c.tools.len(), "{}", c.id);
            }
            // The fsyncing peer and baseline are compared as durable rows.
            for i in c.durable_peer.iter().chain(c.baseline_fsync.iter()) {
                assert!(c.durable_rows.contains(i), "{}", c.id);
            }
            // Targets are checked on convcache's own rows.
            for &i in c.checked {
                assert!(
                    matches!(
                        c.tools[i],
                        Tool::Convert { .. } | Tool::CacheHit { .. } | Tool::Package(_)
                    ),
                    "{}",
                    c.id
                );
            }
        }
    }

    #[test]
    fn parses_both_kernel_benchmark_lines() {
        let ours = "convcache Q4_K dispatched rows=256 row_len=4096: wall 0.0136 s, 77.2 \
                    Mvalues/s, 308.9 MB/s; thread CPU 0.0134 s, 312.9 MB/s";
        assert_eq!(parse_kernel_line(ours), Some((0.0136, 0.0134, 312.9)));
        let ggml = "ggml Q4_K (ggml_quantize_chunk) rows=256 row_len=4096: wall 0.0955 s, 11.0 \
                    Mvalues/s, 43.9 MB/s; thread CPU 0.0923 s, 45.4 MB/s";
        assert_eq!(parse_kernel_line(ggml), Some((0.0955, 0.0923, 45.4)));
        assert_eq!(parse_kernel_line("wall 1 s"), None);
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
