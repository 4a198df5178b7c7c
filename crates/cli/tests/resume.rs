//! Resume end to end: a conversion interrupted (SIGINT, SIGKILL) after its journal recorded a
//! checkpoint is continued by the next `convert`, which says so and publishes the bytes of an
//! uninterrupted conversion.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

fn path_of(v: &serde_json::Value) -> std::path::PathBuf {
    std::path::PathBuf::from(v["path"].as_str().expect("a path"))
}

/// Starts `convert SRC --to TARGET` checkpointing at every boundary, and returns it once its
/// journal records a checkpoint past `min_offset` bytes.
#[allow(clippy::zombie_processes)] // the caller waits for the child; a failed assert ends the test
fn start_until_checkpoint(
    s: &Scratch,
    src: &Path,
    target: &str,
    out: &Path,
    min_offset: u64,
) -> std::process::Child {
    let child = s
        .cmd(&["convert", &src.display().to_string(), "--to", target])
        .env("CONVCACHE_CHECKPOINT_MS", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    loop {
        assert!(!out.exists(), "finished before it could be interrupted");
        if cache::journal::read_journal(out).is_some_and(|j| j.checkpoint.offset > min_offset) {
            return child;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The bytes of an uninterrupted conversion of `src` (same path, so the same provenance), made
/// in a models dir of its own.
fn clean_conversion(s: &Scratch, src: &Path, target: &str) -> Vec<u8> {
    let models = s.root().join("clean-models");
    let run = Run::from(
        std::process::Command::new(env!("CARGO_BIN_EXE_convcache"))
            .current_dir(s.root())
            .env_remove("CONVCACHE_MODELS_DIR")
            .args(["--json", "--models-dir"])
            .arg(&models)
            .args(["convert", &src.display().to_string(), "--to", target])
            .output()
            .expect("spawn"),
    )
    .ok();
    std::fs::read(path_of(only(&run.json()))).expect("read the clean output")
}

fn interrupted_then_resumed(signal: libc::c_int) {
    let s = Scratch::new();
    let src = s.source("big.safetensors", LARGE);
    let out = s.converted_dir().join("big_fp16.safetensors");
    let child = start_until_checkpoint(&s, &src.path, "fp16", &out, 1 << 20);
    // SAFETY: kill only sends a signal to the child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
    let done = child.wait_with_output().expect("wait");
    if signal == libc::SIGINT {
        assert_eq!(done.status.code(), Some(130));
    }
    assert!(!out.exists(), "an interrupted conversion publishes nothing");
    let journal = cache::journal::read_journal(&out).expect("the journal is kept");
    assert!(
        s.converted_dir().join(&journal.temporary).is_file(),
        "the temporary is kept"
    );

    let v = s
        .run(&["--json", "convert", src.arg(), "--to", "fp16"])
        .ok()
        .json();
    let row = only(&v);
    assert_eq!(row["status"], "converted", "{row}");
    let from = row["resumed_from"]
        .as_u64()
        .expect("the row says it resumed");
    assert!(from >= journal.checkpoint.offset, "{row}");
    assert_is_f16_of(&out, &LARGE);
    assert!(
        std::fs::read(&out).expect("read") == clean_conversion(&s, &src.path, "fp16"),
        "the resumed output differs from an uninterrupted conversion"
    );
    let left: Vec<String> = s
        .converted_files()
        .into_iter()
        .filter(|f| f != "big_fp16.safetensors" && f != ".convcache")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!cache::journal::journal_path(&out).exists());
    src.assert_unchanged();
}

#[test]
fn an_interrupted_conversion_is_resumed_by_the_next_convert() {
    interrupted_then_resumed(libc::SIGINT);
}

#[test]
fn a_killed_conversion_is_resumed_by_the_next_convert() {
    interrupted_then_resumed(libc::SIGKILL);
}

#[test]
fn no_resume_starts_over_and_text_output_says_when_it_resumed() {
    let s = Scratch::new();
    let src = s.source("big.safetensors", LARGE);
    let out = s.converted_dir().join("big_fp16.safetensors");
    let child = start_until_checkpoint(&s, &src.path, "fp16", &out, 1 << 20);
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    child.wait_with_output().expect("wait");
    let text = s
        .run(&["convert", src.arg(), "--to", "fp16", "--no-resume"])
        .ok();
    assert!(!text.stdout.contains("resumed"), "{}", text.stdout);
    assert_is_f16_of(&out, &LARGE);

    std::fs::remove_file(&out).expect("remove the output");
    let child = start_until_checkpoint(&s, &src.path, "fp16", &out, 1 << 20);
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    child.wait_with_output().expect("wait");
    let text = s.run(&["convert", src.arg(), "--to", "fp16"]).ok();
    assert!(text.stdout.contains("resumed from byte"), "{}", text.stdout);
    assert_is_f16_of(&out, &LARGE);
}

#[test]
fn cleanup_keeps_a_resumable_temporary_and_removes_it_once_its_source_is_gone() {
    let s = Scratch::new();
    let src = s.source("big.safetensors", LARGE);
    let out = s.converted_dir().join("big_fp16.safetensors");
    let child = start_until_checkpoint(&s, &src.path, "fp16", &out, 1 << 20);
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) },
        0
    );
    child.wait_with_output().expect("wait");
    let journal = cache::journal::read_journal(&out).expect("a journal");
    let tmp = s.converted_dir().join(&journal.temporary);

    s.run(&["cleanup", "--max-size", "1T"]).ok();
    assert!(tmp.is_file(), "a resumable temporary survives cleanup");
    assert!(cache::journal::journal_path(&out).is_file());

    std::fs::remove_file(&src.path).expect("remove the source");
    s.run(&["cleanup", "--max-size", "1T"]).ok();
    assert!(
        !tmp.exists(),
        "cleanup removes a temporary whose source is gone"
    );
    assert!(!cache::journal::journal_path(&out).exists());
}

#[test]
fn a_killed_command_of_several_targets_resumes_through_the_shared_read() {
    let s = Scratch::new();
    let src = s.source("big.safetensors", LARGE);
    let out = s.converted_dir().join("big_fp16.safetensors");
    // fp16 and bf16 of one source share one read of it.
    let mut child = s
        .cmd(&["convert", src.arg(), "--to", "fp16,bf16"])
        .env("CONVCACHE_CHECKPOINT_MS", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    while cache::journal::read_journal(&out).is_none_or(|j| j.checkpoint.offset <= 1 << 20) {
        assert!(!out.exists(), "finished before it could be killed");
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");

    let v = s
        .run(&["--json", "convert", src.arg(), "--to", "fp16,bf16"])
        .ok()
        .json();
    let rows = v.as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{v}");
    assert!(rows[0]["resumed_from"].as_u64().is_some(), "{v}");
    for (row, target) in rows.iter().zip(["fp16", "bf16"]) {
        assert_eq!(row["status"], "converted", "{row}");
        assert!(
            std::fs::read(path_of(row)).expect("read") == clean_conversion(&s, &src.path, target),
            "{target}: differs from an uninterrupted conversion"
        );
    }
}
