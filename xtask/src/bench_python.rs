//! The Python package's cases of `cargo xtask bench` (issue 14's numbers): a cache hit through
//! `convcache.smart_convert` (< 5 ms), and a conversion through Python against the CLI's own
//! time for the same conversion (within 3%).
//!
//! The package is built into its own virtual environment (`target/bench-package-venv`, `pip
//! install ./crates/python`, maturin from PyPI) the first time a case needs it in a run. Each
//! repetition is timed inside Python around the `smart_convert` call (the interpreter's start
//! and `import convcache` are not the conversion's); the peak RSS is the process's.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::{Case, Env, Model, Sample, Tool, measure};
use crate::DynResult;

/// The cache-hit case's id (it runs `--hit-reps` repetitions).
pub const HIT: &str = "python-cache-hit";
/// The conversion case's id (sub-second rows at a 3% bound: at least 5 repetitions).
pub const CONVERT: &str = "python-f32-to-bf16";

/// What a package tool does in one process.
#[derive(Debug, Clone, Copy)]
pub enum PackageTool {
    /// `smart_convert(src, to)` into a fresh models dir, per repetition.
    Convert { to: &'static str },
    /// One untimed conversion, then `smart_convert(src, to)` answered from the cache.
    CacheHit { to: &'static str },
}

impl PackageTool {
    /// The row's label.
    pub fn label(self) -> String {
        match self {
            PackageTool::Convert { to } => {
                format!("python: convcache.smart_convert(src, '{to}') (time of the call)")
            }
            PackageTool::CacheHit { to } => {
                format!("python: convcache.smart_convert(src, '{to}') cache hit (time of the call)")
            }
        }
    }
}

/// The cases, appended to the bench's table.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            id: HIT,
            what: "convcache.smart_convert in Python when a valid conversion exists (~2 GB f32 source)",
            model: Model::FluxF32,
            tools: vec![Tool::Package(PackageTool::CacheHit { to: "bf16" })],
            checked: &[0],
            peer: None,
            baseline: None,
            baseline_fsync: None,
            durable_peer: None,
            durable_rows: &[],
            wired: true,
            goal: "< 5 ms per call",
            min_speedup: None,
            max_vs_cp: None,
            max_ms: Some(5.0),
            rss_limit: false,
        },
        Case {
            id: CONVERT,
            what: "f32 -> bf16 of the ~2 GB Flux-like model through the Python package and the CLI",
            model: Model::FluxF32,
            tools: vec![
                Tool::Convert {
                    to: "bf16",
                    extra: &[],
                },
                Tool::Package(PackageTool::Convert { to: "bf16" }),
            ],
            checked: &[1],
            peer: Some(0),
            baseline: None,
            baseline_fsync: None,
            durable_peer: Some(0),
            durable_rows: &[0, 1],
            wired: true,
            goal: "the Python call within 3% of the CLI's time (speed-up >= 0.97x)",
            min_speedup: Some(0.97),
            max_vs_cp: None,
            max_ms: None,
            rss_limit: true,
        },
    ]
}

/// Python with the package installed from this working tree, built once per bench run.
fn package_python(root: &Path) -> Result<PathBuf, String> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let venv = root.join("target/bench-package-venv");
            let py = venv.join("bin/python");
            let run = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
            if !py.is_file() && !run(Command::new("python3").args(["-m", "venv"]).arg(&venv)) {
                return Err("missing: `python3 -m venv` failed".into());
            }
            eprintln!("pip install ./crates/python into {}", venv.display());
            let installed = run(Command::new(&py).current_dir(root).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "./crates/python",
            ]));
            match installed {
                true => Ok(py),
                false => Err("missing: pip install ./crates/python failed".into()),
            }
        })
        .clone()
}

/// The script a package tool runs: `SRC TARGET MODELS_DIR MODE REPS TIMES_FILE`; writes one
/// line per repetition, the call's seconds.
const SCRIPT: &str = r#"
import os, shutil, sys, time
import convcache
src, to, models, mode, reps, out = sys.argv[1:7]
times = []
if mode == "hit":
    convcache.smart_convert(src, to, models_dir=models)
for _ in range(int(reps)):
    if mode == "convert":
        shutil.rmtree(models, ignore_errors=True)
        os.makedirs(models)
        os.sync()
    t = time.perf_counter()
    path, new = convcache.smart_convert(src, to, models_dir=models)
    times.append(time.perf_counter() - t)
    assert new == (mode == "convert"), (path, new)
with open(out, "w") as f:
    f.write("\n".join(repr(t) for t in times))
"#;

/// Runs a package tool: one process for all repetitions; each sample is a call's time with
/// the process's peak RSS.
pub fn run(env: &Env, src: &Path, tool: PackageTool, reps: usize) -> DynResult<Vec<Sample>> {
    let py = package_python(&env.root)?;
    let models = env.fresh_models_dir()?;
    let times = env.scratch.join("python-times.txt");
    let _ = fs::remove_file(&times);
    let (mode, to) = match tool {
        PackageTool::Convert { to } => ("convert", to),
        PackageTool::CacheHit { to } => ("hit", to),
    };
    let mut c = Command::new(py);
    c.args(["-c", SCRIPT])
        .arg(src)
        .arg(to)
        .arg(&models)
        .arg(mode)
        .arg(reps.to_string())
        .arg(&times)
        .stdout(Stdio::null());
    let process = measure(&mut c, &env.scratch.join("stderr.txt"))?;
    let _ = fs::remove_dir_all(&models);
    let text = fs::read_to_string(&times)?;
    let samples: Vec<Sample> = text
        .lines()
        .map(|l| {
            l.trim().parse::<f64>().map(|s| Sample {
                wall: Duration::from_secs_f64(s),
                max_rss_kib: process.max_rss_kib,
            })
        })
        .collect::<Result<_, _>>()?;
    if samples.len() != reps {
        return Err(format!("{} timings for {reps} repetitions", samples.len()).into());
    }
    Ok(samples)
}
