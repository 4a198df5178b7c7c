//! `convcache convert` of several sources and targets in one command: one row per pair, each
//! source read once for all of its targets, outputs identical to separate commands, a failed
//! pair that stops nothing else, and two commands with overlapping pairs converting each pair
//! once.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;

use common::*;
use serde_json::Value;

const TARGETS: &str = "fp16,fp8,Q8_0,nf4";

fn path_of(v: &Value) -> PathBuf {
    PathBuf::from(
        v["path"]
            .as_str()
            .unwrap_or_else(|| panic!("no path in {v}")),
    )
}

#[test]
fn several_sources_and_targets_read_each_source_once_and_match_separate_commands() {
    let together = Scratch::new();
    let a = together.source("a.safetensors", MEDIUM);
    let b = together.source("b.safetensors", LARGE);
    let run = together
        .cmd(&["--json", "convert", a.arg(), b.arg(), "--to", TARGETS])
        .env("CONVCACHE_READ_STATS", "1")
        .output()
        .expect("spawn");
    let run = Run::from(run).ok();
    let rows = run.json();
    let rows = rows.as_array().expect("array");
    let targets: Vec<&str> = TARGETS.split(',').collect();
    assert_eq!(rows.len(), 2 * targets.len(), "one row per pair");
    for (i, r) in rows.iter().enumerate() {
        let source = if i < targets.len() { &a } else { &b };
        assert_eq!(r["source"], source.arg(), "rows in source order: {r}");
        assert_eq!(r["status"], "converted", "{r}");
    }
    // Each source once: at most 1.05x their sizes, plus the headers each converter reads for
    // itself (checked against the file as it is now).
    let sources = (a.bytes.len() + b.bytes.len()) as u64;
    let read = bytes_read(&run.stderr);
    assert!(
        read <= sources + sources / 20,
        "read {read} bytes of sources of {sources} bytes"
    );

    // The same pairs as separate commands, from the same source paths (so the same provenance):
    // byte-identical outputs.
    for (i, r) in rows.iter().enumerate() {
        let source = if i < targets.len() { &a } else { &b };
        let target = targets[i % targets.len()];
        let out = path_of(r);
        let bytes = std::fs::read(&out).expect("read output");
        std::fs::remove_file(&out).expect("remove output");
        let alone = together
            .run(&["--json", "convert", source.arg(), "--to", target])
            .ok()
            .json();
        let alone = only(&alone);
        assert_eq!(alone["status"], "converted", "{alone}");
        assert_eq!(path_of(alone), out);
        assert!(
            std::fs::read(&out).expect("read output") == bytes,
            "{target} of {} differs from a separate command",
            source.arg()
        );
    }
    a.assert_unchanged();
    b.assert_unchanged();

    // Everything converted: a second command answers every pair from the cache.
    let again = together
        .run(&["--json", "convert", a.arg(), b.arg(), "--to", TARGETS])
        .ok()
        .json();
    for r in again.as_array().expect("array") {
        assert_eq!(r["status"], "cached", "{r}");
    }
}

/// Targets whose converters read the source out of file order or twice (ComfyUI's layouts
/// read their weights once to plan the scales, then again): outputs still equal separate
/// commands' (bytes the shared window has dropped are read from the disk again).
#[test]
fn targets_that_read_the_source_twice_still_match_separate_commands() {
    let s = Scratch::new();
    let src = s.source("flux_twice.safetensors", LARGE);
    let targets = ["fp8_scaled", "bf16", "nvfp4", "Q4_K_M"];
    let rows = s
        .run(&["--json", "convert", src.arg(), "--to", &targets.join(",")])
        .ok()
        .json();
    let rows = rows.as_array().expect("array").clone();
    assert_rows_match_separate_commands(&s, src.arg(), &rows, &targets);
    src.assert_unchanged();
}

/// A GGUF source is read once for all of its targets too (dequantized and requantized), and
/// its outputs equal separate commands'.
#[test]
fn a_gguf_source_is_read_once_for_several_targets() {
    let s = Scratch::new();
    let src = s.source("flux_gguf.safetensors", MEDIUM);
    let q8 = path_of(only(
        &s.run(&["--json", "convert", src.arg(), "--to", "Q8_0"])
            .ok()
            .json(),
    ));
    let gguf = s.root().join("flux_gguf.gguf");
    std::fs::rename(&q8, &gguf).expect("move the GGUF out of the cache");
    let gguf_arg = gguf.to_str().expect("utf-8");
    let targets = ["fp16", "bf16", "Q4_K_M", "Q5_0"];
    let run = s
        .cmd(&["--json", "convert", gguf_arg, "--to", &targets.join(",")])
        .env("CONVCACHE_READ_STATS", "1")
        .output()
        .expect("spawn");
    let run = Run::from(run).ok();
    let rows = run.json().as_array().expect("array").clone();
    let size = std::fs::metadata(&gguf).expect("stat").len();
    let read = bytes_read(&run.stderr);
    assert!(
        read <= size + size / 20,
        "read {read} bytes of a {size}-byte GGUF source for {} targets",
        targets.len()
    );
    assert_rows_match_separate_commands(&s, gguf_arg, &rows, &targets);
}

#[test]
fn a_bad_source_fails_its_pairs_only() {
    let s = Scratch::new();
    let good = s.source("good.safetensors", SMALL);
    let bad = s.root().join("bad.safetensors");
    std::fs::write(&bad, b"not a model").expect("write");
    let bad = bad.to_str().expect("utf-8 path");
    let run = s.run(&[
        "--json",
        "convert",
        bad,
        good.arg(),
        "--to",
        "fp16,Q8_0",
        "--jobs",
        "1",
    ]);
    assert_eq!(run.code, 2, "bad input: {}", run.stderr);
    let v = run.json();
    let rows = v.as_array().expect("array");
    let statuses: Vec<&str> = rows.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(
        statuses,
        ["failed", "failed", "converted", "converted"],
        "{v}"
    );
    assert_eq!(run.stderr.lines().count(), 2, "{}", run.stderr);
}

#[test]
fn two_commands_with_overlapping_pairs_convert_each_pair_once() {
    for _ in 0..2 {
        let s = Scratch::new();
        let src = s.source("overlap.safetensors", LARGE);
        let children: Vec<_> = ["fp8,Q8_0,nf4", "nf4,Q8_0,fp16"]
            .into_iter()
            .map(|to| {
                s.cmd(&["--json", "convert", src.arg(), "--to", to])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn")
            })
            .collect();
        let mut by_target: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for child in children {
            let run = Run::from(child.wait_with_output().expect("wait")).ok();
            for r in run.json().as_array().expect("array") {
                by_target
                    .entry(r["target"].as_str().expect("target").to_string())
                    .or_default()
                    .push(r.clone());
            }
        }
        assert_eq!(by_target.len(), 4, "{by_target:?}");
        for (target, rows) in &by_target {
            let converted = rows.iter().filter(|r| r["status"] == "converted").count();
            assert_eq!(converted, 1, "{target} converted once: {rows:?}");
            for r in rows {
                assert!(r["status"] == "converted" || r["status"] == "cached", "{r}");
                assert_eq!(r["path"], rows[0]["path"]);
            }
        }
        src.assert_unchanged();
    }
}
