//! `convert --make-room` under a size budget (and on a small tmpfs), and `--progress jsonl`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use cli::sample::SampleSpec;
use common::*;
use serde_json::Value;

/// A cache holding the bf16 outputs of three sources converted one after another (so the first
/// is the least recently used), and a file convcache did not make, older than all of them.
struct Filled {
    s: Scratch,
    /// The outputs, least recently used first, and their sizes.
    outputs: Vec<PathBuf>,
    sizes: Vec<u64>,
    foreign: PathBuf,
    /// The source to convert next: its output is smaller than any of `outputs` (its path is
    /// shorter, and the provenance in the header records it).
    next: Source,
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .len()
}

fn set_mtime(p: &Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(p)
        .and_then(|f| f.set_modified(t))
        .expect("set mtime");
}

fn filled() -> Filled {
    let s = Scratch::new();
    let mut outputs = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let spec = SampleSpec {
            seed: 100 + i as u64,
            ..SMALL
        };
        let src = s.source(&format!("{name}_a_longer_source_name.safetensors"), spec);
        let v = s
            .run(&["--json", "convert", src.arg(), "--to", "bf16"])
            .ok()
            .json();
        outputs.push(PathBuf::from(only(&v)["path"].as_str().expect("path")));
        // Distinct use times, whatever the clock's resolution.
        std::thread::sleep(Duration::from_millis(20));
    }
    let foreign = s.converted_dir().join("zz_bf16.safetensors");
    std::fs::write(&foreign, vec![7u8; 4096]).expect("write foreign");
    set_mtime(
        &foreign,
        SystemTime::now() - Duration::from_secs(30 * 86400),
    );
    let next = s.source("d.safetensors", SampleSpec { seed: 7, ..SMALL });
    let sizes = outputs.iter().map(|p| size(p)).collect();
    Filled {
        s,
        outputs,
        sizes,
        foreign,
        next,
    }
}

impl Filled {
    /// The bytes of every file with an output's name in the converted dir (what the budget
    /// counts).
    fn cached_bytes(&self) -> u64 {
        self.sizes.iter().sum::<u64>() + size(&self.foreign)
    }

    fn convert(&self, extra: &[&str]) -> Run {
        let mut args = vec!["--json", "convert", self.next.arg(), "--to", "bf16"];
        args.extend_from_slice(extra);
        self.s.run(&args)
    }
}

fn removed_of(row: &Value) -> Vec<(PathBuf, u64)> {
    row["removed"]
        .as_array()
        .unwrap_or_else(|| panic!("no removed list in {row}"))
        .iter()
        .map(|r| {
            (
                PathBuf::from(r["path"].as_str().expect("path")),
                r["size"].as_u64().expect("size"),
            )
        })
        .collect()
}

#[test]
fn make_room_evicts_the_least_recently_used_output_only_never_a_foreign_file() {
    let f = filled();
    // The budget is what the cache holds now: the new output needs its own size freed, which
    // the oldest output alone covers.
    let budget = f.cached_bytes();
    let v = f
        .convert(&["--max-cache-size", &budget.to_string(), "--make-room"])
        .ok()
        .json();
    let row = only(&v);
    assert_eq!(row["status"], "converted", "{row}");
    assert_eq!(removed_of(row), [(f.outputs[0].clone(), f.sizes[0])]);
    assert!(!f.outputs[0].exists());
    assert!(f.outputs[1].exists() && f.outputs[2].exists());
    assert!(
        f.foreign.exists(),
        "a file convcache did not make is never evicted"
    );
    let out = PathBuf::from(row["path"].as_str().expect("path"));
    assert!(f.cached_bytes() - f.sizes[0] + size(&out) <= budget);
    f.next.assert_unchanged();

    // The text output names what was evicted.
    let f = filled();
    let budget = f.cached_bytes().to_string();
    let run =
        f.s.run(&[
            "convert",
            f.next.arg(),
            "--to",
            "bf16",
            "--max-cache-size",
            &budget,
            "--make-room",
        ])
        .ok();
    assert!(run.stdout.contains("evicted 1"), "{}", run.stdout);
    assert!(
        run.stdout.contains(f.outputs[0].to_str().expect("utf-8")),
        "{}",
        run.stdout
    );
}

#[test]
fn make_room_skips_an_output_whose_lock_is_held() {
    let f = filled();
    let _held = cache::OutputSlot::acquire(&f.outputs[0], None).expect("lock");
    let budget = f.cached_bytes().to_string();
    let v = f
        .convert(&["--max-cache-size", &budget, "--make-room"])
        .ok()
        .json();
    let row = only(&v);
    assert_eq!(removed_of(row), [(f.outputs[1].clone(), f.sizes[1])]);
    assert!(f.outputs[0].exists(), "a locked output is never evicted");
    assert!(f.outputs[2].exists() && f.foreign.exists());
}

#[test]
fn make_room_never_evicts_an_output_of_the_same_command() {
    let f = filled();
    // Every output of the cache but the last is locked (being written, as far as eviction
    // knows): for the target that comes second, only the other target's output could make room.
    let _held: Vec<_> = f
        .outputs
        .iter()
        .map(|o| cache::OutputSlot::acquire(o, None).expect("lock"))
        .collect();
    // Room for one more output of about their size, not two.
    let budget = (f.cached_bytes() + f.sizes[2] * 3 / 2).to_string();
    let args = [
        "--json",
        "convert",
        f.next.arg(),
        "--to",
        "bf16,fp16",
        "--max-cache-size",
        &budget,
        "--make-room",
    ];
    let run = f.s.run(&args);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let v = run.json();
    let rows = v.as_array().expect("rows");
    // The two targets convert at once: whichever finds room first converts, the other fails.
    let converted: Vec<&Value> = rows.iter().filter(|r| r["status"] == "converted").collect();
    let failed: Vec<&Value> = rows.iter().filter(|r| r["status"] == "failed").collect();
    assert_eq!((converted.len(), failed.len()), (1, 1), "{v}");
    let first = PathBuf::from(converted[0]["path"].as_str().expect("path"));
    assert!(first.exists(), "the other target's output was evicted");
    let error = failed[0]["error"].as_str().expect("error");
    assert!(error.contains("could not free enough"), "{error}");
    for o in &f.outputs {
        assert!(o.exists());
    }
}

#[test]
fn without_make_room_the_error_says_what_it_would_free() {
    let f = filled();
    let budget = f.cached_bytes().to_string();
    let run = f.s.run(&[
        "convert",
        f.next.arg(),
        "--to",
        "bf16",
        "--max-cache-size",
        &budget,
    ]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let line = run.stderr.trim();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.contains("size limit"), "{line}");
    assert!(
        line.contains(&format!("--make-room would free {} bytes", f.sizes[0])),
        "{line}"
    );
    for o in &f.outputs {
        assert!(o.exists(), "nothing is evicted without --make-room");
    }
    assert!(!f.s.converted_dir().join("d_bf16.safetensors").exists());

    // The budget from the environment; a budget smaller than the output itself cannot be met.
    let run = Run::from(
        f.s.cmd(&["convert", f.next.arg(), "--to", "bf16"])
            .env("CONVCACHE_MAX_SIZE", "10KiB")
            .output()
            .expect("spawn"),
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("could not free enough"),
        "{}",
        run.stderr
    );
    let run = Run::from(
        f.s.cmd(&["convert", f.next.arg(), "--to", "bf16"])
            .env("CONVCACHE_MAX_SIZE", "ten")
            .output()
            .expect("spawn"),
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("CONVCACHE_MAX_SIZE"), "{}", run.stderr);
}

/// The real free-space path: a 6 MiB tmpfs holds one ~4 MB bf16 output of MEDIUM, not two.
#[test]
fn make_room_on_a_small_tmpfs_evicts_what_the_disk_needs() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let s = Scratch::new();
    let first = s.source("first.safetensors", MEDIUM);
    let second = s.source("second.safetensors", SampleSpec { seed: 3, ..MEDIUM });
    let mount = s.root().join("small-disk");
    std::fs::create_dir(&mount).expect("mkdir");
    let script = r#"mount -t tmpfs -o size=6m tmpfs "$1" || exit 99
mkdir -p "$1/diffusion_models/converted"
head -c 1000 /dev/zero > "$1/diffusion_models/converted/zz_bf16.safetensors"
"$2" --models-dir "$1" -q convert "$3" --to bf16 >/dev/null || exit 98
"$2" --models-dir "$1" convert "$4" --to bf16
echo "rc=$?"
"$2" --models-dir "$1" --json convert "$4" --to bf16 --make-room
echo "rc=$?"
ls -A "$1/diffusion_models/converted""#;
    let run = Run::from(
        Command::new("unshare")
            .args(["--mount", "sh", "-c", script, "sh"])
            .arg(&mount)
            .arg(env!("CARGO_BIN_EXE_convcache"))
            .arg(&first.path)
            .arg(&second.path)
            .current_dir(s.root())
            .env_remove("CONVCACHE_MODELS_DIR")
            .env_remove("CONVCACHE_MAX_SIZE")
            .output()
            .expect("run unshare (util-linux)"),
    );
    if run.code == 99 {
        eprintln!("skipped: cannot mount a tmpfs here: {}", run.stderr);
        return;
    }
    assert_ne!(run.code, 98, "the first conversion failed: {}", run.stderr);
    let (before, after) = run.stdout.split_once("rc=1\n").unwrap_or_else(|| {
        panic!(
            "the second conversion did not fail\nstdout {}\nstderr {}",
            run.stdout, run.stderr
        )
    });
    assert!(before.is_empty(), "{before}");
    assert!(
        run.stderr.contains("not enough free space"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("--make-room would free"),
        "{}",
        run.stderr
    );
    let (json, listing) = after.split_once("rc=0\n").unwrap_or_else(|| {
        panic!(
            "--make-room did not succeed\nstdout {}\nstderr {}",
            run.stdout, run.stderr
        )
    });
    let v: Value = serde_json::from_str(json).expect("JSON");
    let row = only(&v);
    assert_eq!(row["status"], "converted");
    let removed = removed_of(row);
    assert_eq!(removed.len(), 1, "{row}");
    assert!(removed[0].0.ends_with("first_bf16.safetensors"), "{row}");
    let mut left: Vec<&str> = listing.lines().filter(|l| *l != ".convcache").collect();
    left.sort();
    assert_eq!(left, ["second_bf16.safetensors", "zz_bf16.safetensors"]);
    first.assert_unchanged();
    second.assert_unchanged();
}

/// `--progress jsonl` on a real conversion: the documented schema.
#[test]
fn progress_jsonl_follows_the_schema() {
    let s = Scratch::new();
    let src = s.source("flux.safetensors", MEDIUM);
    for (target, stages) in [
        (
            "bf16",
            &["planning", "converting", "verifying", "publishing"][..],
        ),
        (
            "nf4",
            &[
                "planning",
                "hashing",
                "converting",
                "verifying",
                "publishing",
            ],
        ),
    ] {
        let run = s
            .run(&["convert", src.arg(), "--to", target, "--progress", "jsonl"])
            .ok();
        let events: Vec<Value> = run
            .stderr
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let text = |e: &Value, k: &str| -> String {
            e[k].as_str()
                .unwrap_or_else(|| panic!("{k} is not a string in {e}"))
                .to_owned()
        };
        let count = |e: &Value, k: &str| -> u64 {
            e[k].as_u64()
                .unwrap_or_else(|| panic!("{k} is not a count in {e}"))
        };
        let mut seen_stages = Vec::new();
        let mut last_time = 0.0;
        // (stage, bytes_done, bytes_total, tensors_done) of the last progress event.
        let mut last: Option<(String, u64, u64, u64)> = None;
        let mut progress_events = 0;
        for e in &events {
            let time = e["time"]
                .as_f64()
                .unwrap_or_else(|| panic!("no time in {e}"));
            assert!(time >= last_time, "time went back: {e}");
            last_time = time;
            assert_eq!(text(e, "source"), src.arg());
            assert_eq!(text(e, "target"), target);
            match text(e, "event").as_str() {
                "stage" => {
                    seen_stages.push(text(e, "stage"));
                    // A stage's last progress event completes it.
                    if let Some((_, done, total, _)) = &last {
                        assert_eq!(done, total, "a stage ended short: {e}");
                    }
                    last = None;
                }
                "progress" => {
                    let stage = text(e, "stage");
                    assert_eq!(Some(&stage), seen_stages.last(), "{e}");
                    let (done, total) = (count(e, "bytes_done"), count(e, "bytes_total"));
                    let (t_done, t_total) = (count(e, "tensors_done"), count(e, "tensors_total"));
                    assert!(done <= total && t_done <= t_total, "{e}");
                    // The sample's tensors, known from the conversion's first event on.
                    let tensors = match stage.as_str() {
                        "converting" => MEDIUM.tensors().len() as u64,
                        _ => 0,
                    };
                    assert_eq!(t_total, tensors, "{e}");
                    if let Some((s, d, tot, t)) = &last {
                        assert!(
                            *s == stage && *d <= done && *tot == total && *t <= t_done,
                            "{e}"
                        );
                    }
                    last = Some((stage, done, total, t_done));
                    progress_events += 1;
                }
                "finished" => {
                    if let Some((_, done, total, _)) = &last {
                        assert_eq!(done, total, "the last stage ended short: {e}");
                    }
                    assert_eq!(text(e, "status"), "converted", "{e}");
                    assert!(text(e, "path").ends_with(".safetensors"), "{e}");
                    assert!(e["removed"].as_array().is_some_and(Vec::is_empty), "{e}");
                    assert!(e["error"].is_null(), "{e}");
                }
                other => panic!("unknown event {other}: {e}"),
            }
        }
        assert_eq!(seen_stages, stages);
        assert!(progress_events > 0);
        assert_eq!(
            events.last().map(|e| text(e, "event")).as_deref(),
            Some("finished")
        );
        // Throttled: at most one line every 250 ms, besides the one that ends each stage (not
        // one per chunk or tensor).
        let allowed = (last_time / 0.25) as usize + 1 + 2 * stages.len();
        assert!(
            progress_events <= allowed,
            "{progress_events} progress events in {last_time} s"
        );
    }
    // Without --progress, and not on a terminal: nothing on stderr.
    let run = s.run(&["convert", src.arg(), "--to", "fp16"]).ok();
    assert!(run.stderr.is_empty(), "{}", run.stderr);
}

#[test]
fn make_room_never_evicts_the_source() {
    let f = filled();
    // The least recently used output is the source of this conversion.
    let source = f.outputs[0].to_str().expect("utf-8").to_owned();
    let budget = f.cached_bytes().to_string();
    let v =
        f.s.run(&[
            "--json",
            "convert",
            &source,
            "--to",
            "fp16",
            "--max-cache-size",
            &budget,
            "--make-room",
        ])
        .ok()
        .json();
    let row = only(&v);
    assert_eq!(row["status"], "converted", "{row}");
    let removed = removed_of(row);
    assert_eq!(
        removed.first(),
        Some(&(f.outputs[1].clone(), f.sizes[1])),
        "{row}"
    );
    assert!(removed.iter().all(|(p, _)| *p != f.outputs[0]), "{row}");
    assert!(f.outputs[0].exists() && f.foreign.exists());
}
