//! `cargo xtask torture [--short] [--seed N]`: fault injection against the built `convcache`
//! binary, proving the cache's promises (RELIABILITY.md) for every converter class.
//!
//! Everything runs in a temporary work dir over a generated flux-like F32 source (real Flux key
//! names, tens of MB so conversions take a moment). For each target (bf16, fp8_e4m3fn, Q4_K_M,
//! Q8_0, nf4, int8) a clean reference conversion is made first; conversions are deterministic,
//! so every later output of the unchanged source must be byte-identical to it. Then:
//! - `kills`: SIGKILL after a random delay or when the temporary reaches a random size; every
//!   file at the cache path must be the reference (or absent), the next call must produce the
//!   reference, and no temporary may remain after it;
//! - `resumes`: SIGKILL once or twice in a row at a random point of the output (read from the
//!   resume journal; checkpoints at every boundary), then rerun: the cache path never holds
//!   anything but the reference, a journal left by the kill is always resumed from (the row
//!   says `resumed_from`, at or past the journal's checkpoint), and the result is the reference;
//! - `races`: 8 processes on the same conversion (exactly one `converted`, the others `cached`,
//!   one path), and 8 processes on different targets of one source;
//! - `disk-full`: `prlimit --fsize` below the output size, and a small tmpfs filled by another
//!   writer at a random moment: exit 1 with a one-line error, nothing published, no
//!   temporaries, an earlier cached output unchanged;
//! - `corruptions`: of an output convcache published: truncation, a flipped header byte, a
//!   flipped tensor-data byte, a file of another precision under the name: never served as a
//!   hit, reconverted to the reference (beside the corrupted file, which is kept, when the
//!   corruption left no mark of convcache's in it: a truncation into the header). Two more cases probe documented limits and count as
//!   "gaps" when served (failing the run only with `--fail-on-gaps`): a data byte flipped with
//!   the output's mtime put back (a hit compares size and mtime with the output record, it does
//!   not re-read the data), and a data byte flipped in an output whose record was deleted
//!   (served on its provenance alone);
//! - `source`: modified, renamed, replaced, deleted between calls: stale outputs never served;
//! - `cleanup`: `cleanup --keep` and `--max-size` with symlinks, hard links, foreign files, a
//!   locked output and a live writer's temporary in the cache dirs;
//! - the source's bytes are hashed before and after everything.
//!
//! Exits non-zero on any violation. Targets the binary cannot convert yet are reported as "not
//! available" and skipped.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tensorfile::safetensors::Dtype;
use tensorfile::safetensors::writer::{SafetensorsWriter, TensorSpec};

use crate::{DynResult, repo_root};

/// Options of `cargo xtask torture`.
#[derive(Debug, clap::Args)]
pub struct TortureArgs {
    /// A few injections per converter and a smaller source (CI: under 3 minutes on 2 cores).
    #[arg(long)]
    short: bool,
    /// Seed of every random choice (kill points, sizes, flipped bytes); printed in the summary.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Use this convcache binary instead of building target/release/convcache.
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Do not run `cargo build --release -p cli` first.
    #[arg(long)]
    no_build: bool,
    /// Only these targets (canonical names; default: bf16, fp8_e4m3fn, Q4_K_M, Q8_0, nf4, int8).
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// Fail when a documented limit is hit (an output corrupted with its mtime restored, or
    /// without its output record, served as a hit).
    #[arg(long)]
    fail_on_gaps: bool,
    /// Keep the work dir (printed) for inspection.
    #[arg(long)]
    keep: bool,
}

const DEFAULT_TARGETS: [&str; 6] = ["bf16", "fp8_e4m3fn", "Q4_K_M", "Q8_0", "nf4", "int8"];
const RACERS: usize = 8;
/// The corruptions of a cached output. The last two are documented limits: counted as gaps
/// when served, violations only with `--fail-on-gaps`.
const CORRUPTIONS: [&str; 6] = [
    "truncated",
    "header_byte",
    "data_byte",
    "other_precision",
    "data_byte_mtime_restored",
    "data_byte_no_record",
];
/// A CLI call taking longer than this is stuck (a lock never released): a violation.
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// SplitMix64: small, seeded, reproducible.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug, Default)]
struct Counts {
    kills: u64,
    kills_mid_write: u64,
    kills_after_finish: u64,
    races_same: u64,
    races_mixed: u64,
    racers_killed: u64,
    racing_processes: u64,
    fsize_injections: u64,
    tmpfs_injections: u64,
    tmpfs_injections_hit: u64,
    corruptions: BTreeMap<&'static str, u64>,
    /// Corruptions that left no mark of convcache's in the file (a truncation into the header):
    /// the file was kept and the conversion went beside it.
    converted_beside: u64,
    gaps: Vec<String>,
    source_mutations: u64,
    cleanup_runs: u64,
    cli_calls: u64,
    resume_kills: u64,
    /// Reruns that continued a killed conversion.
    resumed: u64,
}

struct Torture {
    bin: PathBuf,
    work: PathBuf,
    source: PathBuf,
    rng: Rng,
    counts: Counts,
    violations: Vec<String>,
    short: bool,
}

/// A finished CLI call.
#[derive(Debug)]
struct Call {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Call {
    /// The first object of a `convert --json` / `check --json` array.
    fn first(&self) -> Option<Value> {
        serde_json::from_str::<Value>(&self.stdout)
            .ok()?
            .as_array()?
            .first()
            .cloned()
    }
    fn status(&self) -> String {
        self.first()
            .and_then(|v| v.get("status").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_default()
    }
    fn path(&self) -> Option<PathBuf> {
        self.first()
            .and_then(|v| v.get("path").and_then(Value::as_str).map(PathBuf::from))
    }
}

/// A target and what a clean conversion of the source gives.
#[derive(Debug, Clone)]
struct Reference {
    target: String,
    /// The output's file name (same in every models dir).
    rel: PathBuf,
    /// The reference output (in the `ref` models dir).
    file: PathBuf,
    hash: u128,
    size: u64,
    seconds: f64,
}

fn hash_file(path: &Path) -> std::io::Result<u128> {
    let mut h = twox_hash::XxHash3_128::new();
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.write(&buf[..n]);
    }
    Ok(h.finish_128())
}

fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

/// Temporaries (`.NAME.PID.tmp`) in `dir`.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| e.file_name().to_str().is_some_and(is_temp_name))
        .map(|e| e.path())
        .collect()
}

/// The largest temporary of `output` in its dir, if any.
fn temp_size(output: &Path) -> Option<u64> {
    let dir = output.parent()?;
    let name = output.file_name()?.to_str()?;
    let prefix = format!(".{name}.");
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".tmp"))
        })
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .max()
}

fn kill(child: &mut Child) {
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGKILL);
    }
}

/// Writes a flux-like F32 model (the BFL key layout, so every converter and the GGUF
/// architecture detection accept it) with `blocks` double and single blocks of width 256.
fn write_source(path: &Path, blocks: u64, seed: u64) -> DynResult<()> {
    let h = 256u64;
    let head = 64u64;
    let mut specs: Vec<TensorSpec> = Vec::new();
    let mut linear = |name: &str, out: u64, inp: u64| {
        specs.push(TensorSpec {
            name: format!("{name}.weight"),
            dtype: Dtype::F32,
            shape: vec![out, inp],
        });
        specs.push(TensorSpec {
            name: format!("{name}.bias"),
            dtype: Dtype::F32,
            shape: vec![out],
        });
    };
    linear("img_in", h, 64);
    linear("time_in.in_layer", h, 256);
    linear("time_in.out_layer", h, h);
    linear("vector_in.in_layer", h, 768);
    linear("vector_in.out_layer", h, h);
    linear("guidance_in.in_layer", h, 256);
    linear("guidance_in.out_layer", h, h);
    linear("txt_in", h, 512);
    let mut norms = Vec::new();
    for i in 0..blocks {
        for s in ["img", "txt"] {
            let p = format!("double_blocks.{i}.{s}");
            linear(&format!("{p}_mod.lin"), 6 * h, h);
            linear(&format!("{p}_attn.qkv"), 3 * h, h);
            linear(&format!("{p}_attn.proj"), h, h);
            linear(&format!("{p}_mlp.0"), 4 * h, h);
            linear(&format!("{p}_mlp.2"), h, 4 * h);
            norms.push(format!("{p}_attn.norm.query_norm.scale"));
            norms.push(format!("{p}_attn.norm.key_norm.scale"));
        }
    }
    for i in 0..blocks {
        let p = format!("single_blocks.{i}");
        linear(&format!("{p}.linear1"), 7 * h, h);
        linear(&format!("{p}.linear2"), h, 5 * h);
        linear(&format!("{p}.modulation.lin"), 3 * h, h);
        norms.push(format!("{p}.norm.query_norm.scale"));
        norms.push(format!("{p}.norm.key_norm.scale"));
    }
    linear("final_layer.adaLN_modulation.1", 2 * h, h);
    linear("final_layer.linear", 64, h);
    for n in norms {
        specs.push(TensorSpec {
            name: n,
            dtype: Dtype::F32,
            shape: vec![head],
        });
    }
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    let tmp = path.with_extension("partial");
    let out = BufWriter::new(File::create(&tmp)?);
    let mut w = SafetensorsWriter::new(out, &specs, &BTreeMap::new())?;
    let mut rng = Rng(seed);
    for s in &specs {
        let n: u64 = s.shape.iter().product();
        let scale = if s.name.ends_with(".scale") {
            0.0
        } else {
            0.05
        };
        let mut buf = Vec::with_capacity(n as usize * 4);
        for _ in 0..n {
            // Sum of two uniforms: a cheap bell shape, like trained weights.
            let v = ((rng.unit() + rng.unit() - 1.0) * scale + if scale == 0.0 { 1.0 } else { 0.0 })
                as f32;
            buf.extend_from_slice(&v.to_le_bytes());
        }
        w.write_chunk(&buf)?;
    }
    w.finish()?.flush()?;
    fs::rename(&tmp, path)?;
    Ok(())
}

impl Torture {
    fn violation(&mut self, section: &str, target: &str, what: String) {
        let line = format!("[{section}/{target}] {what}");
        eprintln!("VIOLATION {line}");
        self.violations.push(line);
    }

    fn command(&self, models: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--models-dir").arg(models).arg("--json").args(args);
        c.env_remove("CONVCACHE_MODELS_DIR");
        c
    }

    fn wait_output(&mut self, mut child: Child) -> Call {
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if start.elapsed() > CALL_TIMEOUT => {
                    kill(&mut child);
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Err(_) => break,
            }
        }
        let out = child.wait_with_output();
        self.counts.cli_calls += 1;
        match out {
            Ok(o) => Call {
                code: o.status.code(),
                stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            },
            Err(e) => Call {
                code: None,
                stdout: String::new(),
                stderr: e.to_string(),
            },
        }
    }

    fn spawn(&self, mut c: Command) -> DynResult<Child> {
        Ok(c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    }

    fn call(&mut self, models: &Path, args: &[&str]) -> DynResult<Call> {
        let child = self.spawn(self.command(models, args))?;
        Ok(self.wait_output(child))
    }

    fn convert(&mut self, models: &Path, source: &Path, target: &str) -> DynResult<Call> {
        let src = source.to_string_lossy().into_owned();
        self.call(models, &["convert", &src, "--to", target])
    }

    /// The file at the cache path is absent or exactly the reference.
    fn check_cache_path(&mut self, section: &str, r: &Reference, models: &Path) {
        let p = models.join(&r.rel);
        if fs::symlink_metadata(&p).is_err() {
            return;
        }
        match hash_file(&p) {
            Ok(h) if h == r.hash => {}
            Ok(_) => {
                let size = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                let det = detect::detect(&p)
                    .map(|d| format!("{:?}", d.precision))
                    .unwrap_or_else(|e| e.to_string());
                self.violation(
                    section,
                    &r.target,
                    format!(
                        "{} is not the reference output ({size} of {} bytes; detect: {det})",
                        p.display(),
                        r.size
                    ),
                );
            }
            Err(e) => self.violation(section, &r.target, format!("{}: {e}", p.display())),
        }
    }

    /// A convert call that must succeed with the reference output and leave no temporaries.
    fn expect_reference(
        &mut self,
        section: &str,
        r: &Reference,
        models: &Path,
        call: &Call,
        allowed: &[&str],
    ) {
        let status = call.status();
        if call.code != Some(0) || !allowed.contains(&status.as_str()) {
            self.violation(
                section,
                &r.target,
                format!(
                    "expected {allowed:?}, got exit {:?} status `{status}`: {}",
                    call.code,
                    call.stderr.trim()
                ),
            );
            return;
        }
        let expected = models.join(&r.rel);
        if call.path().as_deref() != Some(expected.as_path()) {
            self.violation(
                section,
                &r.target,
                format!(
                    "answered {:?}, expected {}",
                    call.path(),
                    expected.display()
                ),
            );
        }
        self.check_cache_path(section, r, models);
        let temps = expected.parent().map(temporaries).unwrap_or_default();
        if !temps.is_empty() {
            self.violation(
                section,
                &r.target,
                format!("temporaries left after a completed call: {temps:?}"),
            );
        }
    }

    fn reference(&mut self, target: &str) -> DynResult<Option<Reference>> {
        let models = self.work.join("ref");
        let source = self.source.clone();
        let start = Instant::now();
        let call = self.convert(&models, &source, target)?;
        let seconds = start.elapsed().as_secs_f64();
        if call.code != Some(0) || call.status() != "converted" {
            println!(
                "  {target}: not available (exit {:?}, status `{}`): {}",
                call.code,
                call.status(),
                call.stderr.trim()
            );
            return Ok(None);
        }
        let Some(file) = call.path() else {
            return Ok(None);
        };
        let rel = file.strip_prefix(&models)?.to_path_buf();
        // Compare by the canonical name (`fp8` -> `fp8_e4m3fn`), as the outputs record it.
        let target = call
            .first()
            .and_then(|v| v.get("target").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| target.to_string());
        let target = target.as_str();
        // A second clean conversion must give the same bytes, or byte comparison means nothing.
        let again_dir = self.work.join("ref-again");
        let again = self.convert(&again_dir, &source, target)?;
        let h1 = hash_file(&file)?;
        let h2 = again
            .path()
            .map(|p| hash_file(&p))
            .transpose()?
            .unwrap_or(0);
        if h1 != h2 {
            self.violation(
                "reference",
                target,
                "two clean conversions of the same source differ".into(),
            );
        }
        let _ = fs::remove_dir_all(&again_dir);
        let size = fs::metadata(&file)?.len();
        println!(
            "  {target}: {} ({size} bytes, {seconds:.2} s)",
            rel.display()
        );
        Ok(Some(Reference {
            target: target.to_string(),
            rel,
            file,
            hash: h1,
            size,
            seconds,
        }))
    }

    /// (a) SIGKILL at random points.
    fn kills(&mut self, r: &Reference, n: usize) -> DynResult<()> {
        let models = self.work.join(format!("kill-{}", r.target));
        let output = models.join(&r.rel);
        let source = self.source.clone();
        for i in 0..n {
            let _ = fs::remove_file(&output);
            let by_size = i % 2 == 1;
            let src = source.to_string_lossy().into_owned();
            let mut child =
                self.spawn(self.command(&models, &["convert", &src, "--to", &r.target]))?;
            let start = Instant::now();
            let mut finished = false;
            if by_size {
                let threshold = self.rng.below(r.size);
                loop {
                    if child.try_wait()?.is_some() {
                        finished = true;
                        break;
                    }
                    if temp_size(&output).is_some_and(|s| s >= threshold)
                        || start.elapsed() > CALL_TIMEOUT
                    {
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            } else {
                let delay = self.rng.unit() * r.seconds.max(0.05) * 1.3;
                let until = start + Duration::from_secs_f64(delay);
                while Instant::now() < until {
                    if child.try_wait()?.is_some() {
                        finished = true;
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(500));
                }
            }
            if !finished {
                kill(&mut child);
            }
            let _ = child.wait();
            self.counts.kills += 1;
            if finished {
                self.counts.kills_after_finish += 1;
            } else if temp_size(&output).is_some() {
                self.counts.kills_mid_write += 1;
            }
            // Right after the kill: the cache path holds nothing or the complete reference.
            self.check_cache_path("kill", r, &models);
            let call = self.convert(&models, &source, &r.target)?;
            self.expect_reference("kill", r, &models, &call, &["converted", "cached"]);
        }
        Ok(())
    }

    /// The resume journal of `output` (`.convcache/<name>.journal`): (checkpoint offset,
    /// temporary name), if there is one that parses.
    fn journal(output: &Path) -> Option<(u64, String)> {
        let name = output.file_name()?.to_str()?;
        let path = output
            .parent()?
            .join(".convcache")
            .join(format!("{name}.journal"));
        let v: Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
        let offset = v.get("checkpoint")?.get("offset")?.as_u64()?;
        let temporary = v.get("temporary")?.as_str()?.to_owned();
        Some((offset, temporary))
    }

    /// (a') SIGKILL at random points (journal offsets), once or twice in a row, then rerun.
    fn resumes(&mut self, r: &Reference, n: usize) -> DynResult<()> {
        let models = self.work.join(format!("resume-{}", r.target));
        let output = models.join(&r.rel);
        let src = self.source.to_string_lossy().into_owned();
        for _ in 0..n {
            let _ = fs::remove_file(&output);
            for _ in 0..1 + self.rng.below(2) {
                let threshold = self.rng.below(r.size);
                let mut c = self.command(&models, &["convert", &src, "--to", &r.target]);
                c.env("CONVCACHE_CHECKPOINT_MS", "0");
                let mut child = self.spawn(c)?;
                let start = Instant::now();
                let mut finished = false;
                loop {
                    if child.try_wait()?.is_some() {
                        finished = true;
                        break;
                    }
                    if Self::journal(&output).is_some_and(|(o, _)| o >= threshold)
                        || start.elapsed() > CALL_TIMEOUT
                    {
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                if !finished {
                    kill(&mut child);
                }
                let _ = child.wait();
                self.counts.resume_kills += 1;
                self.check_cache_path("resume", r, &models);
                if let Some((_, tmp)) = Self::journal(&output)
                    && !models.join(&r.rel).with_file_name(&tmp).is_file()
                {
                    self.violation(
                        "resume",
                        &r.target,
                        "a journal without its temporary".into(),
                    );
                }
            }
            let journal = Self::journal(&output);
            let call = self.convert(&models, &self.source.clone(), &r.target)?;
            let resumed_from = call
                .first()
                .and_then(|v| v.get("resumed_from").and_then(Value::as_u64));
            match (journal, resumed_from) {
                (Some((offset, _)), Some(from)) if from >= offset => self.counts.resumed += 1,
                (Some((offset, _)), from) => self.violation(
                    "resume",
                    &r.target,
                    format!(
                        "a journal at byte {offset} was not resumed from (resumed_from {from:?})"
                    ),
                ),
                (None, Some(from)) => self.violation(
                    "resume",
                    &r.target,
                    format!("resumed from byte {from} without a journal"),
                ),
                (None, None) => {}
            }
            self.expect_reference("resume", r, &models, &call, &["converted", "cached"]);
            let journal_left = Self::journal(&output).is_some();
            if journal_left {
                self.violation(
                    "resume",
                    &r.target,
                    "a journal left after publishing".into(),
                );
            }
        }
        Ok(())
    }

    /// (b) 8 processes on the same conversion.
    fn race_same(&mut self, r: &Reference, rounds: usize) -> DynResult<()> {
        let models = self.work.join(format!("race-{}", r.target));
        let output = models.join(&r.rel);
        let src = self.source.to_string_lossy().into_owned();
        for round in 0..rounds {
            let _ = fs::remove_file(&output);
            let mut children: Vec<Child> = (0..RACERS)
                .map(|_| self.spawn(self.command(&models, &["convert", &src, "--to", &r.target])))
                .collect::<DynResult<_>>()?;
            // Odd rounds: one racer (maybe the lock holder, maybe a waiter) is SIGKILLed at a
            // random moment; the others must still end with the reference, converted once.
            let victim = (round % 2 == 1).then(|| self.rng.below(RACERS as u64) as usize);
            if let Some(v) = victim {
                let delay = self.rng.unit() * r.seconds.max(0.05) * 1.3;
                std::thread::sleep(Duration::from_secs_f64(delay));
                kill(&mut children[v]);
                self.counts.racers_killed += 1;
            }
            let calls: Vec<Call> = children.into_iter().map(|c| self.wait_output(c)).collect();
            self.counts.races_same += 1;
            self.counts.racing_processes += RACERS as u64;
            let survivors: Vec<&Call> = calls
                .iter()
                .enumerate()
                .filter(|(i, _)| Some(*i) != victim)
                .map(|(_, c)| c)
                .collect();
            let converted = survivors
                .iter()
                .filter(|c| c.status() == "converted")
                .count();
            let cached = survivors.iter().filter(|c| c.status() == "cached").count();
            // With a victim, it may have been the one that converted (then none of the others
            // did); without, exactly one converts.
            let ok = if victim.is_some() {
                converted <= 1 && converted + cached == survivors.len()
            } else {
                converted == 1 && cached == RACERS - 1
            };
            if !ok {
                let detail: Vec<String> = survivors
                    .iter()
                    .map(|c| format!("{:?}/{} {}", c.code, c.status(), c.stderr.trim()))
                    .collect();
                self.violation(
                    "race",
                    &r.target,
                    format!(
                        "{converted} converted and {cached} cached of {} (racer killed: {victim:?}): {detail:?}",
                        survivors.len()
                    ),
                );
            }
            for c in survivors {
                self.expect_reference("race", r, &models, c, &["converted", "cached"]);
            }
        }
        Ok(())
    }

    /// (b) 8 processes on different targets of the same source (cycling through `refs`).
    fn race_mixed(&mut self, refs: &[Reference], rounds: usize) -> DynResult<()> {
        if refs.is_empty() {
            return Ok(());
        }
        let models = self.work.join("race-mixed");
        let src = self.source.to_string_lossy().into_owned();
        for round in 0..rounds {
            let _ = fs::remove_dir_all(&models);
            let mine: Vec<&Reference> = (0..RACERS)
                .map(|i| &refs[(i + round) % refs.len()])
                .collect();
            let children: Vec<Child> = mine
                .iter()
                .map(|r| self.spawn(self.command(&models, &["convert", &src, "--to", &r.target])))
                .collect::<DynResult<_>>()?;
            let calls: Vec<Call> = children.into_iter().map(|c| self.wait_output(c)).collect();
            self.counts.races_mixed += 1;
            self.counts.racing_processes += RACERS as u64;
            for r in refs {
                let same: Vec<&Call> = mine
                    .iter()
                    .zip(&calls)
                    .filter(|(m, _)| m.target == r.target)
                    .map(|(_, c)| c)
                    .collect();
                if same.is_empty() {
                    continue;
                }
                let converted = same.iter().filter(|c| c.status() == "converted").count();
                if converted != 1 {
                    self.violation(
                        "race-mixed",
                        &r.target,
                        format!("{converted} of {} callers converted", same.len()),
                    );
                }
                for c in same {
                    self.expect_reference("race-mixed", r, &models, c, &["converted", "cached"]);
                }
            }
        }
        Ok(())
    }

    /// An earlier cached output in `models` (another target) and its hash.
    fn earlier(
        &mut self,
        r: &Reference,
        refs: &[Reference],
        models: &Path,
    ) -> Option<(PathBuf, u128)> {
        let other = refs.iter().find(|o| o.target != r.target)?;
        let dst = models.join(&other.rel);
        fs::create_dir_all(dst.parent()?).ok()?;
        fs::copy(&other.file, &dst).ok()?;
        Some((dst, other.hash))
    }

    fn check_failed_cleanly(&mut self, section: &str, r: &Reference, models: &Path, call: &Call) {
        let output = models.join(&r.rel);
        if call.code != Some(1) {
            self.violation(
                section,
                &r.target,
                format!(
                    "expected exit 1, got {:?} (status `{}`): {}",
                    call.code,
                    call.status(),
                    call.stderr.trim()
                ),
            );
        }
        let err = call.stderr.trim();
        if err.lines().count() != 1
            || !err.contains(&*output.parent().unwrap_or(models).to_string_lossy())
        {
            self.violation(
                section,
                &r.target,
                format!("the error is not one line naming the output: {err:?}"),
            );
        }
        if fs::symlink_metadata(&output).is_ok() {
            self.violation(
                section,
                &r.target,
                format!("{} was published", output.display()),
            );
        }
        let temps = output.parent().map(temporaries).unwrap_or_default();
        if !temps.is_empty() {
            self.violation(section, &r.target, format!("temporaries left: {temps:?}"));
        }
    }

    /// (c) disk full: a file-size limit, then a small tmpfs filled at a random moment.
    fn disk_full(&mut self, r: &Reference, refs: &[Reference], n: usize) -> DynResult<()> {
        let models = self.work.join(format!("full-{}", r.target));
        let src = self.source.to_string_lossy().into_owned();
        let earlier = self.earlier(r, refs, &models);
        let has_prlimit = Command::new("prlimit")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_prlimit {
            println!(
                "  {}: prlimit (util-linux) not found; no file-size limits",
                r.target
            );
        }
        for _ in 0..if has_prlimit { n } else { 0 } {
            let limit = self.rng.below(r.size);
            let mut c = Command::new("prlimit");
            c.arg(format!("--fsize={limit}"))
                .arg("--")
                .arg(&self.bin)
                .arg("--models-dir")
                .arg(&models)
                .args(["convert", &src, "--to", &r.target]);
            let call = {
                let child = self.spawn(c)?;
                self.wait_output(child)
            };
            self.counts.fsize_injections += 1;
            self.check_failed_cleanly("disk-full", r, &models, &call);
        }
        if let Some((p, h)) = &earlier
            && hash_file(p).ok() != Some(*h)
        {
            self.violation(
                "disk-full",
                &r.target,
                format!("earlier output {} changed", p.display()),
            );
        }
        self.tmpfs_full(r, refs, n)
    }

    fn tmpfs_full(&mut self, r: &Reference, refs: &[Reference], n: usize) -> DynResult<()> {
        let mnt = self.work.join(format!("tmpfs-{}", r.target));
        fs::create_dir_all(&mnt)?;
        let other = refs
            .iter()
            .find(|o| o.target != r.target)
            .map_or(0, |o| o.size);
        // Room for the earlier output and this one, so the free-space check passes and the
        // disk fills only when the filler below strikes.
        let size = (r.size + other) * 3 / 2 + (4 << 20);
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}")])
            .arg("tmpfs")
            .arg(&mnt)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            println!(
                "  {}: tmpfs not available here (not root?); file-size limit only",
                r.target
            );
            return Ok(());
        }
        let result = self.tmpfs_rounds(r, refs, n, &mnt);
        let _ = Command::new("umount").arg(&mnt).status();
        result
    }

    fn tmpfs_rounds(
        &mut self,
        r: &Reference,
        refs: &[Reference],
        n: usize,
        mnt: &Path,
    ) -> DynResult<()> {
        let models = mnt.join("models");
        let src = self.source.to_string_lossy().into_owned();
        let earlier = self.earlier(r, refs, &models);
        let output = models.join(&r.rel);
        let filler = mnt.join("filler");
        for _ in 0..n {
            let _ = fs::remove_file(&output);
            let _ = fs::remove_file(&filler);
            let child = self.spawn(self.command(&models, &["convert", &src, "--to", &r.target]))?;
            // Strike when the temporary reaches a random size in its first half (later strikes
            // mostly lose the race against a converter writing at memory speed).
            let threshold = self.rng.below(r.size / 2);
            let mut child = child;
            let start = Instant::now();
            while child.try_wait()?.is_none()
                && temp_size(&output).is_none_or(|s| s < threshold)
                && start.elapsed() < CALL_TIMEOUT
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            // Another writer takes every free byte.
            if let Ok(mut f) = File::create(&filler) {
                fill_at_once(&f, mnt);
                let small = [0u8; 4096];
                while f.write(&small[..]).is_ok_and(|k| k > 0) {}
            }
            let call = self.wait_output(child);
            self.counts.tmpfs_injections += 1;
            if call.code == Some(0) {
                // The conversion won the race against the filler: it must be the reference.
                self.expect_reference("tmpfs-full", r, &models, &call, &["converted"]);
            } else {
                self.counts.tmpfs_injections_hit += 1;
                self.check_failed_cleanly("tmpfs-full", r, &models, &call);
            }
            let _ = fs::remove_file(&filler);
        }
        if let Some((p, h)) = &earlier
            && hash_file(p).ok() != Some(*h)
        {
            self.violation(
                "tmpfs-full",
                &r.target,
                format!("earlier output {} changed", p.display()),
            );
        }
        // With space again, the next call converts correctly.
        let _ = fs::remove_file(&output);
        let call = self.convert(&models, &self.source.clone(), &r.target)?;
        self.expect_reference("tmpfs-full", r, &models, &call, &["converted"]);
        Ok(())
    }

    /// The byte range of the header (safetensors JSON / GGUF up to the tensor data).
    fn header_range(path: &Path) -> DynResult<(u64, u64)> {
        let mut f = File::open(path)?;
        let mut magic = [0u8; 8];
        f.read_exact(&mut magic)?;
        if &magic[..4] == b"GGUF" {
            let g = gguf::GgufFile::open(path)?;
            Ok((0, g.data_offset))
        } else {
            Ok((8, 8 + u64::from_le_bytes(magic)))
        }
    }

    /// (d) corrupt the cached output; it must never be served.
    fn corruptions(&mut self, r: &Reference, refs: &[Reference], rounds: usize) -> DynResult<()> {
        let models = self.work.join(format!("corrupt-{}", r.target));
        let output = models.join(&r.rel);
        let src = self.source.to_string_lossy().into_owned();
        let (h0, h1) = Self::header_range(&r.file)?;
        for _ in 0..rounds {
            for kind in CORRUPTIONS {
                fs::create_dir_all(output.parent().unwrap_or(&models))?;
                // Start from an output convcache itself published (with its output record).
                let base = self.convert(&models, &self.source.clone(), &r.target)?;
                self.expect_reference("corrupt", r, &models, &base, &["converted", "cached"]);
                let published_mtime = fs::metadata(&output)?.modified()?;
                let mut detail = String::new();
                match kind {
                    "truncated" => {
                        let len = self.rng.below(r.size);
                        OpenOptions::new().write(true).open(&output)?.set_len(len)?;
                        detail = format!("to {len} bytes");
                    }
                    "other_precision" => {
                        let other = refs
                            .iter()
                            .find(|o| {
                                o.target != r.target && o.rel.extension() == r.rel.extension()
                            })
                            .map_or(self.source.clone(), |o| o.file.clone());
                        fs::copy(other, &output)?;
                    }
                    _ => {
                        let at = if kind == "header_byte" {
                            h0 + self.rng.below(h1 - h0)
                        } else {
                            h1 + self.rng.below(r.size - h1)
                        };
                        let bit = 1u8 << self.rng.below(8);
                        let mut f = OpenOptions::new().read(true).write(true).open(&output)?;
                        let mut b = [0u8];
                        f.seek(SeekFrom::Start(at))?;
                        f.read_exact(&mut b)?;
                        f.seek(SeekFrom::Start(at))?;
                        f.write_all(&[b[0] ^ bit])?;
                        // Where it landed, as text around the byte (for a header) or offset.
                        let from = at.saturating_sub(24).max(h0);
                        let mut around = vec![0u8; 48];
                        f.seek(SeekFrom::Start(from))?;
                        let n = f.read(&mut around)?;
                        detail = format!("byte {at} {:#04x}->{:#04x}", b[0], b[0] ^ bit);
                        if kind == "header_byte" {
                            let near = String::from_utf8_lossy(&around[..n]).into_owned();
                            detail = format!("{detail}, in {near:?}");
                        }
                        if kind == "data_byte_mtime_restored" {
                            f.set_modified(published_mtime)?;
                        }
                    }
                }
                if kind == "data_byte_no_record" {
                    let name = output.file_name().unwrap_or_default().to_string_lossy();
                    let record = output
                        .parent()
                        .unwrap_or(&models)
                        .join(format!(".convcache/{name}.digest"));
                    let _ = fs::remove_file(record);
                }
                *self.counts.corruptions.entry(kind).or_default() += 1;
                // Documented limits (RELIABILITY.md): a hit compares the output's size and mtime
                // with its output record without re-reading it, and an output without a record
                // is served on its provenance alone.
                let documented =
                    kind == "data_byte_mtime_restored" || kind == "data_byte_no_record";
                let check = self.call(&models, &["check", &src, "--to", &r.target])?;
                let check_valid = check
                    .first()
                    .and_then(|v| v.get("valid").and_then(Value::as_bool));
                let call = self.convert(&models, &self.source.clone(), &r.target)?;
                let served = call.status() == "cached" || call.status() == "cached_unverified";
                if served || check_valid != Some(false) {
                    let what = format!(
                        "{kind} corruption ({detail}) served (check valid={check_valid:?}, convert `{}`)",
                        call.status()
                    );
                    if documented {
                        self.counts.gaps.push(format!("{}: {what}", r.target));
                    } else {
                        self.violation("corrupt", &r.target, what);
                    }
                    // Start the next case from a clean publish, not from the served corruption.
                    let _ = fs::remove_file(&output);
                    continue;
                }
                let standard = models.join(&r.rel);
                if let Some(beside) = call.path().filter(|p| *p != standard) {
                    // The corruption erased every mark of convcache's (a truncation into the
                    // header, say): like any file convcache did not make, it is kept, and the
                    // conversion goes beside it under the digest-suffixed name.
                    let reference = hash_file(&beside).is_ok_and(|h| h == r.hash);
                    if call.status() != "converted" || !reference || !output.exists() {
                        self.violation(
                            "corrupt",
                            &r.target,
                            format!(
                                "{kind} ({detail}): answered {} (`{}`, reference bytes: \
                                 {reference}), the corrupted file {}",
                                beside.display(),
                                call.status(),
                                if output.exists() { "kept" } else { "gone" }
                            ),
                        );
                    }
                    self.counts.converted_beside += 1;
                    let _ = fs::remove_file(&output);
                    let _ = fs::remove_file(&beside);
                    continue;
                }
                self.expect_reference("corrupt", r, &models, &call, &["converted"]);
            }
        }
        Ok(())
    }

    /// (e) the source modified, renamed, replaced, deleted between calls.
    fn source_changes(&mut self, r: &Reference) -> DynResult<()> {
        let root = self.work.join(format!("source-{}", r.target));
        let models = root.join("models");
        let dir = root.join("in");
        fs::create_dir_all(&dir)?;
        let src = dir.join(self.source.file_name().unwrap_or_default());
        fs::copy(&self.source, &src)?;
        let first = self.convert(&models, &src, &r.target)?;
        let out = first.path().unwrap_or_default();
        self.expect_fresh("initial", r, &first, &src);

        // Modified in place (same size, one data byte).
        std::thread::sleep(Duration::from_millis(20));
        {
            let len = fs::metadata(&src)?.len();
            let (_, h1) = Self::header_range(&src)?;
            let at = h1 + self.rng.below(len - h1);
            let mut f = OpenOptions::new().read(true).write(true).open(&src)?;
            let mut b = [0u8];
            f.seek(SeekFrom::Start(at))?;
            f.read_exact(&mut b)?;
            f.seek(SeekFrom::Start(at))?;
            f.write_all(&[b[0] ^ 0x01])?;
        }
        self.counts.source_mutations += 1;
        let call = self.convert(&models, &src, &r.target)?;
        self.expect_fresh("modified", r, &call, &src);

        // Renamed: the old name has no source; the new name must not be answered stale.
        let renamed = dir.join("renamed_model.safetensors");
        fs::rename(&src, &renamed)?;
        self.counts.source_mutations += 1;
        let call = self.convert(&models, &src, &r.target)?;
        if call.code != Some(2) || call.status() == "cached" {
            self.violation(
                "source",
                &r.target,
                format!(
                    "renamed-away source: exit {:?} status `{}`",
                    call.code,
                    call.status()
                ),
            );
        }
        let call = self.convert(&models, &renamed, &r.target)?;
        self.expect_fresh_or_cached("renamed", r, &call, &renamed);

        // Replaced: another model (same layout, other values) at the old path.
        let blocks = if self.short { 1 } else { 2 };
        write_source(&src, blocks, self.rng.next())?;
        self.counts.source_mutations += 1;
        let call = self.convert(&models, &src, &r.target)?;
        self.expect_fresh("replaced", r, &call, &src);

        // Deleted: nothing may be answered for it.
        fs::remove_file(&src)?;
        self.counts.source_mutations += 1;
        let call = self.convert(&models, &src, &r.target)?;
        if call.code != Some(2) || call.path().is_some() {
            self.violation(
                "source",
                &r.target,
                format!(
                    "deleted source: exit {:?} answered {:?}",
                    call.code,
                    call.path()
                ),
            );
        }
        let _ = out;
        Ok(())
    }

    fn expect_fresh_or_cached(&mut self, what: &str, r: &Reference, call: &Call, src: &Path) {
        self.expect_output_of(what, r, call, src, &["converted", "cached"]);
    }

    fn expect_fresh(&mut self, what: &str, r: &Reference, call: &Call, src: &Path) {
        self.expect_output_of(what, r, call, src, &["converted"]);
    }

    /// The call answered an output whose provenance describes `src` as it is now.
    fn expect_output_of(
        &mut self,
        what: &str,
        r: &Reference,
        call: &Call,
        src: &Path,
        ok: &[&str],
    ) {
        let status = call.status();
        if call.code != Some(0) || !ok.contains(&status.as_str()) {
            self.violation(
                "source",
                &r.target,
                format!(
                    "{what}: expected {ok:?}, got exit {:?} `{status}`: {}",
                    call.code,
                    call.stderr.trim()
                ),
            );
            return;
        }
        let Some(path) = call.path() else { return };
        let meta = fs::metadata(src).ok();
        let abs = fs::canonicalize(src).unwrap_or_else(|_| src.to_path_buf());
        let good = detect::detect(&path).is_ok_and(|d| {
            let m = &d.metadata;
            let mtime_ns = meta.as_ref().and_then(|m| m.modified().ok()).and_then(|t| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_nanos().to_string())
            });
            d.precision.map(|p| p.canonical_name().to_string()) == Some(r.target.clone())
                && m.get("convcache.source_size")
                    == meta.as_ref().map(|m| m.len().to_string()).as_ref()
                && m.get("convcache.source_mtime_ns") == mtime_ns.as_ref()
                && m.get("convcache.source_path").map(PathBuf::from).as_deref()
                    == Some(abs.as_path())
        });
        if !good {
            self.violation(
                "source",
                &r.target,
                format!(
                    "{what}: {} does not describe {} as it is now",
                    path.display(),
                    src.display()
                ),
            );
        }
    }

    /// (f) cleanup and eviction among hazards.
    fn cleanup(&mut self, refs: &[Reference]) -> DynResult<()> {
        if refs.len() < 2 {
            return Ok(());
        }
        let root = self.work.join("cleanup");
        let models = root.join("models");
        let outside = root.join("outside");
        fs::create_dir_all(&outside)?;
        let mut outputs = Vec::new();
        for r in refs {
            let p = models.join(&r.rel);
            fs::create_dir_all(p.parent().unwrap_or(&models))?;
            fs::copy(&r.file, &p)?;
            outputs.push(p);
        }
        let conv = models.join("diffusion_models/converted");
        let gguf_dir = models.join("diffusion_models/gguf");
        fs::create_dir_all(&conv)?;
        fs::create_dir_all(&gguf_dir)?;
        // Outside files: a valid output with provenance, and a plain file.
        let victim = outside.join("victim_fp16.safetensors");
        fs::copy(&refs[0].file, &victim)?;
        let plain = outside.join("keep.txt");
        fs::write(&plain, b"not the cache's")?;
        let mut protected: Vec<(PathBuf, u128)> = vec![
            (victim.clone(), hash_file(&victim)?),
            (plain.clone(), hash_file(&plain)?),
        ];
        // Hazards in the cache dirs.
        std::os::unix::fs::symlink(&victim, conv.join("linked_fp16.safetensors"))?;
        std::os::unix::fs::symlink(&outside, conv.join("linkdir_bf16.safetensors"))?;
        std::os::unix::fs::symlink(&victim, gguf_dir.join("linked_Q8_0.gguf"))?;
        let hard_out = outside.join("hardlinked.safetensors");
        fs::hard_link(&outputs[0], &hard_out)?;
        protected.push((hard_out.clone(), hash_file(&hard_out)?));
        let foreign = conv.join("foreign_bf16.safetensors");
        fs::copy(repo_root().join("fixtures/flux_bf16.safetensors"), &foreign)
            .or_else(|_| fs::write(&foreign, b"foreign").map(|_| 0))?;
        let notes = conv.join("notes.txt");
        fs::write(&notes, b"user notes")?;
        let keep_in_cache = vec![
            conv.join("linked_fp16.safetensors"),
            conv.join("linkdir_bf16.safetensors"),
            gguf_dir.join("linked_Q8_0.gguf"),
            foreign.clone(),
            notes.clone(),
        ];
        // An output being written: its lock held and a live writer's temporary beside it.
        let busy = outputs[outputs.len() - 1].clone();
        let busy_name = busy
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let lock_dir = busy.parent().unwrap_or(&models).join(".convcache");
        fs::create_dir_all(&lock_dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(lock_dir.join(format!("{busy_name}.lock")))?;
        lock.lock()?;
        let temp = busy.with_file_name(format!(".{busy_name}.{}.tmp", std::process::id()));
        fs::write(&temp, b"half-written")?;
        let src = self.source.to_string_lossy().into_owned();
        for args in [
            vec!["cleanup", &src, "--keep", "0", "--dry-run"],
            vec!["cleanup", "--max-size", "0", "--dry-run"],
        ] {
            let before = outputs.iter().filter(|p| p.exists()).count();
            let call = self.call(&models, &args)?;
            self.counts.cleanup_runs += 1;
            let after = outputs.iter().filter(|p| p.exists()).count();
            if call.code != Some(0) || before != after {
                self.violation(
                    "cleanup",
                    "all",
                    format!(
                        "dry run {args:?}: exit {:?}, {before} -> {after} outputs: {}",
                        call.code,
                        call.stderr.trim()
                    ),
                );
            }
        }
        for args in [
            vec!["cleanup", &src, "--keep", "1"],
            vec!["cleanup", "--max-size", "0"],
        ] {
            let call = self.call(&models, &args)?;
            self.counts.cleanup_runs += 1;
            if call.code != Some(0) {
                self.violation(
                    "cleanup",
                    "all",
                    format!("{args:?}: exit {:?}: {}", call.code, call.stderr.trim()),
                );
            }
        }
        for p in &outputs {
            if p != &busy && p.exists() {
                self.violation(
                    "cleanup",
                    "all",
                    format!("{} survived --max-size 0", p.display()),
                );
            }
        }
        if !busy.exists() || !temp.exists() {
            self.violation(
                "cleanup",
                "all",
                format!(
                    "the output being written ({}) or its temporary was removed",
                    busy.display()
                ),
            );
        }
        for p in &keep_in_cache {
            if fs::symlink_metadata(p).is_err() {
                self.violation(
                    "cleanup",
                    "all",
                    format!("{} (not the cache's) was removed", p.display()),
                );
            }
        }
        for (p, h) in &protected {
            if hash_file(p).ok() != Some(*h) {
                self.violation(
                    "cleanup",
                    "all",
                    format!("{} outside the cache changed", p.display()),
                );
            }
        }
        // Released: now it may go.
        drop(lock);
        fs::remove_file(&temp)?;
        let call = self.call(&models, &["cleanup", "--max-size", "0"])?;
        self.counts.cleanup_runs += 1;
        if call.code != Some(0) || busy.exists() {
            self.violation(
                "cleanup",
                "all",
                format!("released output not evicted: exit {:?}", call.code),
            );
        }
        Ok(())
    }
}

/// Takes (nearly) all free space of the filesystem at `mnt` in one `fallocate(2)`, so the
/// disk is full at once rather than after a race with the converter's writes.
fn fill_at_once(f: &File, mnt: &Path) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::AsRawFd;
    let Ok(c) = std::ffi::CString::new(mnt.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: statvfs is plain old data (all-zero is valid), filled by statvfs(3) from a valid
    // NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return;
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    let mut len = free;
    // Shrinking retries: the exact free space moves by a page while the converter writes.
    while len > 4096 {
        // SAFETY: fallocate on an open file descriptor we own.
        if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) } == 0 {
            return;
        }
        len -= len / 64 + 4096;
    }
}

fn build(args: &TortureArgs) -> DynResult<PathBuf> {
    if let Some(b) = &args.bin {
        return Ok(b.clone());
    }
    if !args.no_build {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "-p", "cli"])
            .current_dir(repo_root())
            .status()?;
        if !status.success() {
            return Err("cargo build --release -p cli failed".into());
        }
    }
    Ok(repo_root().join("target/release/convcache"))
}

/// Runs the torture suite; see the module docs.
pub fn run(args: &TortureArgs) -> DynResult<ExitCode> {
    let bin = build(args)?;
    let base = repo_root().join("target/torture");
    fs::create_dir_all(&base)?;
    let work_dir = tempfile::Builder::new().prefix("run-").tempdir_in(&base)?;
    let work = work_dir.path().to_path_buf();
    let started = Instant::now();
    let (kills, rounds, fulls, corrupt_rounds, blocks) = if args.short {
        (3, 2, 1, 1, 1)
    } else {
        (26, 3, 4, 3, 2)
    };
    let resume_rounds = if args.short { 2 } else { 12 };
    let source = work.join("src/flux_torture.safetensors");
    fs::create_dir_all(work.join("src"))?;
    write_source(&source, blocks, args.seed ^ 0x5eed)?;
    let source_hash = hash_file(&source)?;
    let source_size = fs::metadata(&source)?.len();
    println!(
        "torture: seed {}, {} mode, source {} ({source_size} bytes), work dir {}",
        args.seed,
        if args.short { "short" } else { "full" },
        source.display(),
        work.display()
    );
    let mut t = Torture {
        bin,
        work: work.clone(),
        source: source.clone(),
        rng: Rng(args.seed),
        counts: Counts::default(),
        violations: Vec::new(),
        short: args.short,
    };
    let targets: Vec<String> = if args.targets.is_empty() {
        DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect()
    } else {
        args.targets.clone()
    };
    println!("references:");
    let mut refs = Vec::new();
    let mut unavailable = Vec::new();
    for target in &targets {
        match t.reference(target)? {
            Some(r) => refs.push(r),
            None => unavailable.push(target.clone()),
        }
    }
    for r in refs.clone() {
        let t0 = Instant::now();
        t.kills(&r, kills)?;
        t.resumes(&r, resume_rounds)?;
        t.race_same(&r, rounds)?;
        t.disk_full(&r, &refs, fulls)?;
        t.corruptions(&r, &refs, corrupt_rounds)?;
        t.source_changes(&r)?;
        println!(
            "  {}: done in {:.1} s",
            r.target,
            t0.elapsed().as_secs_f64()
        );
    }
    t.race_mixed(&refs, rounds)?;
    t.cleanup(&refs)?;
    if hash_file(&source)? != source_hash {
        t.violation("source", "all", "the source's bytes changed".into());
    }

    let c = &t.counts;
    println!(
        "\nsummary (seed {}, {:.0} s):",
        args.seed,
        started.elapsed().as_secs_f64()
    );
    println!(
        "  converters: {} tested{}",
        refs.len(),
        if unavailable.is_empty() {
            String::new()
        } else {
            format!(", not available: {}", unavailable.join(", "))
        }
    );
    println!(
        "  kills: {} (mid-write {}, after finishing {}, before the temporary {})",
        c.kills,
        c.kills_mid_write,
        c.kills_after_finish,
        c.kills - c.kills_mid_write - c.kills_after_finish
    );
    println!(
        "  races: {} same-output + {} mixed-target rounds, {} racing processes ({} racers killed)",
        c.races_same, c.races_mixed, c.racing_processes, c.racers_killed
    );
    println!(
        "  disk-full injections: {} file-size limits, {} tmpfs fills ({} hit a running conversion)",
        c.fsize_injections, c.tmpfs_injections, c.tmpfs_injections_hit
    );
    let corrupt_total: u64 = c.corruptions.values().sum();
    println!("  corruptions: {corrupt_total} {:?}", c.corruptions);
    println!(
        "  corrupted files left no mark of convcache's, kept, converted beside: {}",
        c.converted_beside
    );
    println!(
        "  resume: {} kills, {} reruns resumed from a journal",
        c.resume_kills, c.resumed
    );
    println!("  source mutations: {}", c.source_mutations);
    println!("  cleanup runs: {}", c.cleanup_runs);
    println!("  cli calls: {}", c.cli_calls);
    println!("  source unchanged: {}", hash_file(&source)? == source_hash);
    if !c.gaps.is_empty() {
        println!(
            "  GAPS ({}): documented limits hit (corrupted outputs served; see RELIABILITY.md):",
            c.gaps.len()
        );
        for g in &c.gaps {
            println!("    {g}");
        }
    }
    println!("  violations: {}", t.violations.len());
    for v in &t.violations {
        println!("    {v}");
    }
    if args.keep {
        let kept = work_dir.keep();
        println!("work dir kept: {}", kept.display());
    }
    let failed = !t.violations.is_empty() || (args.fail_on_gaps && !t.counts.gaps.is_empty());
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
