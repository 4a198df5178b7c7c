//! `convcache convert` end to end: results, the cache, races, crashes, stale sources,
//! name clashes and a full disk, through the built binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use cli::sample::SampleSpec;
use common::*;
use serde_json::Value;

fn path_of(v: &Value) -> PathBuf {
    PathBuf::from(
        v["path"]
            .as_str()
            .unwrap_or_else(|| panic!("no path in {v}")),
    )
}

#[test]
fn f32_to_bf16_fp16_fp8_then_again_is_cached() {
    let s = Scratch::new();
    let src = s.source("flux_sample.safetensors", SMALL);
    let first = s
        .run(&["--json", "convert", src.arg(), "--to", "bf16,fp16,fp8"])
        .ok()
        .json();
    let rows = first.as_array().expect("convert --json prints an array");
    assert_eq!(rows.len(), 3);
    let conv = s.converted_dir();
    for (row, (target, name)) in rows.iter().zip([
        ("bf16", "flux_sample_bf16.safetensors"),
        ("fp16", "flux_sample_fp16.safetensors"),
        ("fp8_e4m3fn", "flux_sample_fp8_e4m3fn.safetensors"),
    ]) {
        assert_eq!(row["status"], "converted", "{row}");
        assert_eq!(row["target"], target, "{row}");
        assert_eq!(row["source"], src.arg(), "{row}");
        assert_eq!(row["error"], Value::Null, "{row}");
        assert!(row.get("report").is_some(), "{row}");
        assert_eq!(path_of(row), conv.join(name), "{row}");
    }
    assert_is_bf16_of(&path_of(&rows[0]), &SMALL);
    assert_is_f16_of(&path_of(&rows[1]), &SMALL);

    // fp8: 2-D weights become F8_E4M3; 1-D biases and norm scales stay 16-bit (bf16 from f32).
    let fp8 = Safetensors::read(&path_of(&rows[2]));
    for t in SMALL.tensors() {
        let want = if t.shape.len() >= 2 {
            "F8_E4M3"
        } else {
            "BF16"
        };
        assert_eq!(fp8.dtype(&t.name), want, "{}", t.name);
    }

    let before: Vec<(Vec<u8>, SystemTime)> = rows
        .iter()
        .map(|r| {
            let p = path_of(r);
            (
                std::fs::read(&p).expect("read"),
                std::fs::metadata(&p)
                    .and_then(|m| m.modified())
                    .expect("mtime"),
            )
        })
        .collect();
    let second = s
        .run(&["--json", "convert", src.arg(), "--to", "bf16,fp16,fp8"])
        .ok()
        .json();
    for ((a, b), (bytes, mtime)) in rows
        .iter()
        .zip(second.as_array().expect("array"))
        .zip(before)
    {
        assert_eq!(b["status"], "cached", "{b}");
        assert_eq!(a["path"], b["path"]);
        let p = path_of(b);
        assert!(
            std::fs::read(&p).expect("read") == bytes,
            "cache hit rewrote {p:?}"
        );
        assert_eq!(
            std::fs::metadata(&p)
                .and_then(|m| m.modified())
                .expect("mtime"),
            mtime
        );
    }
    src.assert_unchanged();
}

#[test]
fn converting_to_the_source_precision_returns_the_source() {
    let s = Scratch::new();
    let src = s.source("m.safetensors", SMALL);
    let v = s
        .run(&["--json", "convert", src.arg(), "--to", "float32"])
        .ok()
        .json();
    let row = only(&v);
    assert_eq!(row["status"], "source_is_target", "{row}");
    assert_eq!(row["target"], "fp32");
    assert_eq!(path_of(row), src.path);
    assert!(s.converted_files().is_empty());
    src.assert_unchanged();
}

#[test]
fn text_output_prints_the_path_and_quiet_prints_only_the_path() {
    let s = Scratch::new();
    let src = s.source("m.safetensors", SMALL);
    let out = s.converted_dir().join("m_bf16.safetensors");
    let run = s.run(&["convert", src.arg(), "--to", "bf16"]).ok();
    assert!(
        run.stdout.contains(out.to_str().expect("utf-8")),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("converted"), "{}", run.stdout);
    let run = s.run(&["-q", "convert", src.arg(), "--to", "bf16"]).ok();
    assert_eq!(run.stdout, format!("{}\n", out.display()));
    assert!(run.stderr.is_empty(), "{}", run.stderr);
}

#[test]
fn racing_processes_convert_once_and_agree_on_the_path() {
    let s = Scratch::new();
    let src = s.source("race.safetensors", MEDIUM);
    let children: Vec<_> = (0..4)
        .map(|_| {
            s.cmd(&["--json", "convert", src.arg(), "--to", "bf16"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let rows: Vec<Value> = children
        .into_iter()
        .map(|c| {
            let run = Run::from(c.wait_with_output().expect("wait")).ok();
            only(&run.json()).clone()
        })
        .collect();
    let converted = rows.iter().filter(|r| r["status"] == "converted").count();
    assert_eq!(converted, 1, "exactly one conversion: {rows:?}");
    for r in &rows {
        assert!(r["status"] == "converted" || r["status"] == "cached", "{r}");
        assert_eq!(r["path"], rows[0]["path"]);
    }
    let out = path_of(&rows[0]);
    assert_is_bf16_of(&out, &MEDIUM);
    assert_no_temporaries(&s, &["race_bf16.safetensors"]);
    src.assert_unchanged();
}

/// Only `expected` and the cache's state folder (`.convcache`: locks, use stamps) remain.
fn assert_no_temporaries(s: &Scratch, expected: &[&str]) {
    let left: Vec<String> = s
        .converted_files()
        .into_iter()
        .filter(|f| !expected.contains(&f.as_str()) && f != ".convcache")
        .collect();
    assert!(left.is_empty(), "left behind in the cache dir: {left:?}");
}

/// Whatever is at `out` is a complete file (or nothing is there).
fn assert_absent_or_complete(out: &Path) {
    if out.exists() {
        Safetensors::read(out);
    }
}

#[test]
fn sigkill_mid_conversion_leaves_nothing_corrupt_and_a_rerun_converts() {
    let s = Scratch::new();
    let src = s.source("big.safetensors", LARGE);
    let out = s.converted_dir().join("big_bf16.safetensors");
    let mut child = s
        .cmd(&["-q", "convert", src.arg(), "--to", "bf16"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // Kill as soon as a temporary (anything but the final and the state folder) has data.
    let started = Instant::now();
    let mut saw_temporary = false;
    loop {
        assert_absent_or_complete(&out);
        let temp = s
            .converted_files()
            .into_iter()
            .find(|f| f != "big_bf16.safetensors" && f != ".convcache");
        if let Some(t) = temp {
            let len = std::fs::metadata(s.converted_dir().join(&t))
                .map(|m| m.len())
                .unwrap_or(0);
            if len > 0 {
                saw_temporary = true;
                break;
            }
        }
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    assert!(
        saw_temporary,
        "the conversion finished before it could be killed; the test source is too small"
    );
    assert!(
        !out.exists(),
        "a killed conversion must not publish: {}",
        out.display()
    );
    src.assert_unchanged();

    let v = s
        .run(&["--json", "convert", src.arg(), "--to", "bf16"])
        .ok()
        .json();
    let row = only(&v);
    assert_eq!(row["status"], "converted", "{row}");
    assert_eq!(path_of(row), out);
    assert_is_bf16_of(&out, &LARGE);
    assert_no_temporaries(&s, &["big_bf16.safetensors"]);
    src.assert_unchanged();
}

/// Starts `convert SRC --to bf16` and returns it once its temporary holds data.
#[allow(clippy::zombie_processes)] // the caller waits for the child; a failed assert ends the test
fn start_and_wait_for_a_temporary(s: &Scratch, src: &Path, out: &Path) -> std::process::Child {
    let child = s
        .cmd(&["convert", &src.display().to_string(), "--to", "bf16"])
        // No resume checkpoint before the interrupt: the temporary is removed (a journaled one
        // is kept, see tests/resume.rs).
        .env("CONVCACHE_CHECKPOINT_MS", "3600000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    loop {
        assert!(!out.exists(), "finished before it could be interrupted");
        let temp = s
            .converted_files()
            .into_iter()
            .find(|f| f != "big_bf16.safetensors" && f != ".convcache");
        let len = temp
            .and_then(|t| std::fs::metadata(s.converted_dir().join(t)).ok())
            .map_or(0, |m| m.len());
        if len > 0 {
            return child;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn an_interrupt_mid_conversion_removes_the_temporary_and_exits_130() {
    for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        let s = Scratch::new();
        let src = s.source("big.safetensors", LARGE);
        let out = s.converted_dir().join("big_bf16.safetensors");
        let child = start_and_wait_for_a_temporary(&s, &src.path, &out);
        // SAFETY: kill only sends a signal to the child this test spawned and has not reaped.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
        let done = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&done.stderr);
        assert_eq!(done.status.code(), Some(130), "{name}: {stderr}");
        assert!(stderr.contains("cancelled"), "{name}: {stderr}");
        assert!(stderr.contains("big_bf16.safetensors"), "{name}: {stderr}");
        assert!(
            !out.exists(),
            "{name}: an interrupted conversion must not publish"
        );
        assert_no_temporaries(&s, &[]);
        src.assert_unchanged();
    }
}

#[test]
fn a_source_modified_after_conversion_is_reconverted() {
    let s = Scratch::new();
    let src = s.source("m.safetensors", SMALL);
    let first = s
        .run(&["--json", "convert", src.arg(), "--to", "bf16"])
        .ok()
        .json();
    let out = path_of(only(&first));
    assert_is_bf16_of(&out, &SMALL);

    // Same size, different values, a clearly later mtime.
    let changed = SampleSpec { seed: 99, ..SMALL };
    changed.write(&src.path).expect("rewrite");
    let later = SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&src.path)
        .and_then(|f| f.set_modified(later))
        .expect("set mtime");
    let second = s
        .run(&["--json", "convert", src.arg(), "--to", "bf16"])
        .ok()
        .json();
    let row = only(&second);
    assert_eq!(row["status"], "converted", "{row}");
    assert_eq!(path_of(row), out);
    assert_is_bf16_of(&out, &changed);
    let third = s
        .run(&["--json", "convert", src.arg(), "--to", "bf16"])
        .ok()
        .json();
    assert_eq!(only(&third)["status"], "cached");
    assert_no_temporaries(&s, &["m_bf16.safetensors"]);
}

#[test]
fn the_same_basename_in_two_folders_gets_two_outputs() {
    let s = Scratch::new();
    let a = s.source("a/flux.safetensors", SMALL);
    let b_spec = SampleSpec { seed: 5, ..SMALL };
    let b = s.source("b/flux.safetensors", b_spec);
    let pa = path_of(only(
        &s.run(&["--json", "convert", a.arg(), "--to", "bf16"])
            .ok()
            .json(),
    ));
    let vb = s
        .run(&["--json", "convert", b.arg(), "--to", "bf16"])
        .ok()
        .json();
    assert_eq!(only(&vb)["status"], "converted", "{vb}");
    let pb = path_of(only(&vb));
    assert_ne!(pa, pb, "two sources, one output path");
    assert!(pa.exists() && pb.exists());
    assert_is_bf16_of(&pa, &SMALL);
    assert_is_bf16_of(&pb, &b_spec);
    for (src, path) in [(&a, &pa), (&b, &pb)] {
        let v = s
            .run(&["--json", "convert", src.arg(), "--to", "bf16"])
            .ok()
            .json();
        assert_eq!(only(&v)["status"], "cached", "{v}");
        assert_eq!(&path_of(only(&v)), path);
        src.assert_unchanged();
    }
    assert_is_bf16_of(&pa, &SMALL);
    assert_is_bf16_of(&pb, &b_spec);
}

/// `convcache` with a file-size limit (RLIMIT_FSIZE, as `ulimit -f`): the output cannot grow
/// past `limit` bytes, as on a full disk. SIGXFSZ keeps its default (kill) disposition here:
/// convcache itself must make an oversized write an error, not a crash.
fn with_file_size_limit(mut cmd: Command, limit: u64) -> Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only an async-signal-safe call is made (setrlimit), with
    // no allocation and no locks.
    unsafe {
        cmd.pre_exec(move || {
            let rl = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &rl) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

#[test]
fn a_full_disk_gives_a_clear_error_and_publishes_nothing() {
    let s = Scratch::new();
    let src = s.source("m.safetensors", MEDIUM);
    // The bf16 output is about 4 MB; allow 1 MB.
    let cmd = with_file_size_limit(s.cmd(&["convert", src.arg(), "--to", "bf16"]), 1 << 20);
    let run = Run::from(
        { cmd }
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("run"),
    );
    assert_eq!(run.code, 1, "stderr: {}", run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one error line:\n{}", run.stderr);
    assert!(lines[0].starts_with("convcache: "), "{}", lines[0]);
    assert!(
        lines[0].contains(s.converted_dir().to_str().expect("utf-8"))
            || lines[0].contains(src.arg()),
        "the error names the file: {}",
        lines[0]
    );
    let out = s.converted_dir().join("m_bf16.safetensors");
    assert!(
        !out.exists(),
        "nothing may be published after a failed write"
    );
    assert_no_temporaries(&s, &[]);
    src.assert_unchanged();

    // With room again, the same command succeeds.
    let v = s
        .run(&["--json", "convert", src.arg(), "--to", "bf16"])
        .ok()
        .json();
    assert_eq!(only(&v)["status"], "converted");
    assert_is_bf16_of(&out, &MEDIUM);
}

#[test]
fn a_small_tmpfs_gives_a_no_space_error_and_publishes_nothing() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "skipped: mounting a tmpfs needs root (the file-size-limit test covers non-root)"
        );
        return;
    }
    let s = Scratch::new();
    let src = s.source("m.safetensors", MEDIUM);
    let mount = s.root().join("small-disk");
    std::fs::create_dir(&mount).expect("mkdir");
    // A private mount namespace: the 1 MiB tmpfs (the bf16 output needs about 4 MB) exists only
    // for this shell, which runs convcache and then lists what is left in the cache dir.
    let script = r#"mount -t tmpfs -o size=1m tmpfs "$1" || exit 99
"$2" --models-dir "$1" convert "$3" --to bf16
rc=$?
echo "rc=$rc"
ls -A "$1/diffusion_models/converted""#;
    let run = Run::from(
        Command::new("unshare")
            .args(["--mount", "sh", "-c", script, "sh"])
            .arg(&mount)
            .arg(env!("CARGO_BIN_EXE_convcache"))
            .arg(&src.path)
            .current_dir(s.root())
            .env_remove("CONVCACHE_MODELS_DIR")
            .output()
            .expect("run unshare (util-linux)"),
    );
    assert_ne!(run.code, 99, "cannot mount a tmpfs: {}", run.stderr);
    let mut lines = run.stdout.lines();
    assert_eq!(
        lines.next(),
        Some("rc=1"),
        "stdout {}\nstderr {}",
        run.stdout,
        run.stderr
    );
    let left: Vec<&str> = lines.filter(|l| *l != ".convcache").collect();
    assert!(left.is_empty(), "left in the cache dir: {left:?}");
    let errors: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(errors.len(), 1, "{}", run.stderr);
    assert!(errors[0].starts_with("convcache: "), "{}", errors[0]);
    assert!(errors[0].contains("m_bf16.safetensors"), "{}", errors[0]);
    assert!(errors[0].contains("space"), "{}", errors[0]);
    src.assert_unchanged();
}

#[test]
fn a_failed_target_does_not_stop_the_others_and_json_stays_valid() {
    let s = Scratch::new();
    let src = s.source("m.safetensors", SMALL);
    // Block both names the fp16 output can take with directories (the standard one is left
    // alone as something convcache did not make, and the digest-suffixed one cannot be
    // replaced): that target fails, bf16 still converts.
    let digest = cache::digest::digest_file(&src.path).expect("digest");
    let short = cache::digest::short(&digest);
    for name in [
        "m_fp16.safetensors".to_string(),
        format!("m-{short}_fp16.safetensors"),
    ] {
        std::fs::create_dir_all(s.converted_dir().join(name)).expect("mkdir");
    }
    let run = s.run(&["--json", "convert", src.arg(), "--to", "bf16,fp16"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let v = run.json();
    let rows = v.as_array().expect("array");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["status"], "converted", "{v}");
    assert_eq!(rows[1]["status"], "failed", "{v}");
    assert_eq!(rows[1]["path"], Value::Null);
    assert!(rows[1]["error"].is_string(), "{v}");
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    src.assert_unchanged();
}

/// Writes `spec` cast to bf16 at `path` without provenance, as another tool would.
fn write_foreign_bf16(path: &Path, spec: &SampleSpec) {
    use std::io::Write;
    let specs: Vec<tensorfile::TensorSpec> = spec
        .tensors()
        .into_iter()
        .map(|t| tensorfile::TensorSpec {
            dtype: tensorfile::safetensors::Dtype::BF16,
            ..t
        })
        .collect();
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let file = std::fs::File::create(path).expect("create");
    let mut w = tensorfile::SafetensorsWriter::new(
        std::io::BufWriter::new(file),
        &specs,
        &std::collections::BTreeMap::new(),
    )
    .expect("header");
    for (t, ts) in specs.iter().enumerate() {
        let n = ts.shape.iter().product::<u64>();
        w.write_chunk(&expected_bf16(spec, t, n)).expect("write");
    }
    w.finish().expect("finish").flush().expect("flush");
}

#[test]
fn a_file_from_another_tool_is_used_unverified_and_strict_converts_beside_it() {
    let s = Scratch::new();
    let src = s.source("m.safetensors", SMALL);
    let out = s.converted_dir().join("m_bf16.safetensors");
    // Another tool's bf16 file of a different model at the output path.
    let other = SampleSpec { seed: 77, ..SMALL };
    write_foreign_bf16(&out, &other);

    let v = s
        .run(&["--json", "convert", src.arg(), "--to", "bf16"])
        .ok()
        .json();
    assert_eq!(only(&v)["status"], "cached_unverified", "{v}");
    assert_eq!(path_of(only(&v)), out);
    assert_is_bf16_of(&out, &other);

    // --strict converts, under the digest-suffixed name: the other tool's file is never
    // replaced (it may be the user's only copy), and the note says so.
    let v = s
        .run(&["--json", "convert", src.arg(), "--to", "bf16", "--strict"])
        .ok()
        .json();
    assert_eq!(only(&v)["status"], "converted", "{v}");
    let converted = path_of(only(&v));
    let digest = cache::digest::digest_file(&src.path).expect("digest");
    let short = cache::digest::short(&digest);
    assert_eq!(
        converted,
        s.converted_dir()
            .join(format!("m-{short}_bf16.safetensors"))
    );
    let note = only(&v)["note"].as_str().expect("a note").to_string();
    assert!(
        note.contains("another tool") && note.contains("left in place"),
        "{note}"
    );
    assert_is_bf16_of(&converted, &SMALL);
    assert_is_bf16_of(&out, &other);
    // From then on the verified conversion answers, with or without --strict.
    for strict in [true, false] {
        let mut args = vec!["--json", "convert", src.arg(), "--to", "bf16"];
        if strict {
            args.push("--strict");
        }
        let v = s.run(&args).ok().json();
        assert_eq!(only(&v)["status"], "cached", "{v}");
        assert_eq!(path_of(only(&v)), converted);
    }
    let converted_name = converted
        .file_name()
        .expect("name")
        .to_str()
        .expect("utf-8");
    assert_no_temporaries(&s, &["m_bf16.safetensors", converted_name]);
    src.assert_unchanged();
}

#[test]
fn the_models_dir_comes_from_the_environment_without_the_flag() {
    let s = Scratch::new();
    let src = s.source("m.safetensors", SMALL);
    let env_models = s.root().join("env-models");
    let run = Run::from(
        Command::new(env!("CARGO_BIN_EXE_convcache"))
            .current_dir(s.root())
            .env("CONVCACHE_MODELS_DIR", &env_models)
            .args(["--json", "convert", src.arg(), "--to", "fp16"])
            .output()
            .expect("run"),
    )
    .ok();
    let out = path_of(only(&run.json()));
    assert_eq!(
        out,
        env_models.join("diffusion_models/converted/m_fp16.safetensors")
    );
    assert_is_f16_of(&out, &SMALL);
    assert!(!s.models().exists());
}

#[test]
fn progress_bars_are_drawn_on_a_terminal_only() {
    let s = Scratch::new();
    let src = s.source("big.safetensors", LARGE);
    // `script` (util-linux) gives convcache a pseudo-terminal as stdout and stderr.
    let cmd = format!(
        "'{}' --models-dir '{}' convert '{}' --to fp16",
        env!("CARGO_BIN_EXE_convcache"),
        s.models().display(),
        src.path.display()
    );
    let run = Run::from(
        Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .current_dir(s.root())
            .env_remove("CONVCACHE_MODELS_DIR")
            .stdin(Stdio::null())
            .output()
            .expect("run script (util-linux)"),
    )
    .ok();
    assert!(
        run.stdout.contains("ETA"),
        "no progress bar on a terminal:\n{}",
        run.stdout
    );
    assert!(run.stdout.contains("tensors"), "{}", run.stdout);
    assert!(
        run.stdout.contains("big_fp16.safetensors"),
        "{}",
        run.stdout
    );

    // The same conversion with stderr piped (the cache hit is instant, so convert to bf16).
    let piped = s.run(&["convert", src.arg(), "--to", "bf16"]).ok();
    assert!(
        piped.stderr.is_empty(),
        "progress on a pipe: {}",
        piped.stderr
    );
    assert!(!piped.stdout.contains("ETA"), "{}", piped.stdout);
    src.assert_unchanged();
}

/// `--no-fsync` publishes the same kind of verified output, marked in its output record with
/// this boot's id (Linux), and is then answered from the cache like any other conversion.
#[test]
fn no_fsync_publishes_a_marked_output_that_is_then_a_hit() {
    let s = Scratch::new();
    let src = s.source("flux_sample.safetensors", SMALL);
    let v = s
        .run(&["--json", "convert", src.arg(), "--to", "bf16", "--no-fsync"])
        .ok()
        .json();
    let row = only(&v);
    assert_eq!(row["status"], "converted", "{row}");
    let out = path_of(row);
    assert_is_bf16_of(&out, &SMALL);
    let record = s
        .converted_dir()
        .join(".convcache/flux_sample_bf16.safetensors.digest");
    let record: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    if cfg!(target_os = "linux") {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
        assert_eq!(record["unsynced_boot_id"], boot.trim(), "{record}");
    } else {
        assert!(record.get("unsynced_boot_id").is_none(), "{record}");
    }
    let again = s
        .run(&["--json", "convert", src.arg(), "--to", "bf16"])
        .ok()
        .json();
    assert_eq!(only(&again)["status"], "cached");
    // That first hit made the output durable and dropped the mark.
    let record = s
        .converted_dir()
        .join(".convcache/flux_sample_bf16.safetensors.digest");
    let record: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert!(record.get("unsynced_boot_id").is_none(), "{record}");
    assert_no_temporaries(&s, &["flux_sample_bf16.safetensors"]);
    src.assert_unchanged();
}
