//! Bounded resources on hostile input: every file of the adversarial corpus
//! (`fixtures/adversarial/`, written by `cargo xtask fixtures` from `detect::corpus::cases()`)
//! makes `convcache detect` and `convcache convert` (a precision, a bitsandbytes and a GGUF
//! target) fail with exit 2 and a one-line error naming the file, within a second of CPU time
//! and 64 MiB of peak RSS above the same command on a tiny valid model.
//!
//! CPU time and peak RSS come from `wait4(2)`'s rusage of each child, so the bounds hold
//! however loaded the machine is (no wall-clock timing).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// 64 MiB, in the KiB that `ru_maxrss` counts on Linux.
const RSS_MARGIN_KIB: i64 = 64 * 1024;
/// Generous: every rejection happens while reading a header of a few bytes.
const CPU_LIMIT_SECONDS: f64 = 1.0;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/cli sits two levels below the repository root")
        .to_path_buf()
}

#[derive(Debug)]
struct Usage {
    code: i32,
    cpu_seconds: f64,
    max_rss_kib: i64,
    stderr: String,
}

/// Runs the built `convcache` with `args` and reaps it with wait4 for its resource usage.
fn run(args: &[&std::ffi::OsStr], scratch: &Path) -> Usage {
    let err_path = scratch.join("stderr.txt");
    let err = File::create(&err_path).expect("create the stderr file");
    let child = Command::new(env!("CARGO_BIN_EXE_convcache"))
        .args(args)
        .env_remove("CONVCACHE_MODELS_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("spawn convcache");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain old data, zero is a valid value for every field.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, which `child` never reaps (it is only dropped).
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4 failed: {}", std::io::Error::last_os_error());
    drop(child);
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    assert!(
        libc::WIFEXITED(status),
        "convcache {args:?} died: {status:#x}"
    );
    Usage {
        code: libc::WEXITSTATUS(status),
        cpu_seconds: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss,
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// The command lines run on every file: detect, and convert to a precision, a bitsandbytes
/// and a GGUF target.
fn commands<'a>(file: &'a Path, models: &'a Path) -> Vec<(&'static str, Vec<&'a std::ffi::OsStr>)> {
    let mut v = vec![("detect", vec![os("detect"), file.as_os_str()])];
    for target in ["bf16", "nf4", "Q4_K_M"] {
        v.push((
            target,
            vec![
                os("--models-dir"),
                models.as_os_str(),
                os("convert"),
                file.as_os_str(),
                os("--to"),
                os(target),
            ],
        ));
    }
    v
}

#[test]
fn adversarial_inputs_fail_fast_in_bounded_memory() {
    let root = repo_root();
    let corpus = root.join("fixtures/adversarial");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask fixtures`)", corpus.display()))
        .map(|e| e.expect("list the corpus").path())
        .filter(|p| p.file_name().is_some_and(|n| n != "expected.json"))
        .collect();
    files.sort();
    assert!(files.len() >= 30, "only {} corpus files", files.len());

    let scratch = tempfile::tempdir().expect("tempdir");
    let models = scratch.path().join("models");

    // Baselines: the same commands on tiny valid models (a real detection and conversion).
    let valid = root.join("fixtures/flux_f32.safetensors");
    let mut baseline = std::collections::BTreeMap::new();
    let baseline_models = scratch.path().join("baseline-models");
    for (name, args) in commands(&valid, &baseline_models) {
        let u = run(&args, scratch.path());
        // A target without a converter in this build is refused (exit 2) before any work;
        // its baseline is then the cheapest run, which makes the bound stricter.
        assert!(u.code == 0 || u.code == 2, "baseline {name}: {u:?}");
        baseline.insert(name, u.max_rss_kib);
    }

    let mut failures = Vec::new();
    let (mut runs, mut max_cpu, mut max_over) = (0u32, 0f64, i64::MIN);
    for file in &files {
        for (name, args) in commands(file, &models) {
            let u = run(&args, scratch.path());
            let shown = file.display().to_string();
            let err = u.stderr.trim();
            let limit = baseline[name] + RSS_MARGIN_KIB;
            runs += 1;
            max_cpu = max_cpu.max(u.cpu_seconds);
            max_over = max_over.max(u.max_rss_kib - baseline[name]);
            if u.code != 2 {
                failures.push(format!("{name} {shown}: exit {} ({err})", u.code));
            }
            if err.lines().count() != 1 || !err.contains(&shown) {
                failures.push(format!(
                    "{name} {shown}: not a one-line error naming it: {err:?}"
                ));
            }
            if u.cpu_seconds >= CPU_LIMIT_SECONDS {
                failures.push(format!("{name} {shown}: {:.3} s of CPU", u.cpu_seconds));
            }
            if u.max_rss_kib > limit {
                failures.push(format!(
                    "{name} {shown}: peak RSS {} KiB over the bound of {limit} KiB",
                    u.max_rss_kib
                ));
            }
        }
    }
    // The figures RELIABILITY.md quotes (`--nocapture` shows them).
    eprintln!(
        "hostile inputs: {} files, {runs} runs, max CPU {max_cpu:.3} s, max peak RSS over \
         baseline {max_over} KiB",
        files.len()
    );
    // Nothing may have been published for any of them.
    let published: Vec<_> = ["diffusion_models/converted", "diffusion_models/gguf"]
        .iter()
        .filter_map(|d| std::fs::read_dir(models.join(d)).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.'))
        })
        .collect();
    assert!(
        published.is_empty(),
        "published for hostile input: {published:?}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
