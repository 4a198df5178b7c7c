//! `check`, `list`, `stats`, `cleanup` and `demo` through the built binary.

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::Value;

/// Converts `src` to bf16, fp16 and fp8 and returns the three output paths.
fn three_conversions(s: &Scratch, src: &Source) -> Vec<PathBuf> {
    let v = s
        .run(&["--json", "convert", src.arg(), "--to", "bf16,fp16,fp8"])
        .ok()
        .json();
    v.as_array()
        .expect("array")
        .iter()
        .map(|r| PathBuf::from(r["path"].as_str().expect("path")))
        .collect()
}

#[test]
fn check_reports_per_target_and_converts_nothing() {
    let s = Scratch::new();
    let src = s.source("m.safetensors", SMALL);
    let v = s
        .run(&["--json", "check", src.arg(), "--to", "bf16,fp16"])
        .ok()
        .json();
    let rows = v.as_array().expect("check --json prints an array");
    assert_eq!(rows.len(), 2);
    for r in rows {
        assert_eq!(r["exists"], false, "{r}");
        assert_eq!(r["source"], src.arg());
    }
    assert!(
        s.converted_files().iter().all(|f| f == ".convcache"),
        "check converted something: {:?}",
        s.converted_files()
    );

    s.run(&["convert", src.arg(), "--to", "bf16"]).ok();
    let v = s
        .run(&["--json", "check", src.arg(), "--to", "bf16,fp16,fp32"])
        .ok()
        .json();
    let rows = v.as_array().expect("array");
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["target"], "bf16");
    assert_eq!(rows[0]["status"], "hit", "{v}");
    assert_eq!(rows[0]["valid"], true, "{v}");
    assert_eq!(rows[0]["exists"], true, "{v}");
    assert_eq!(
        rows[0]["path"],
        s.converted_dir()
            .join("m_bf16.safetensors")
            .to_str()
            .expect("utf-8")
    );
    assert_eq!(rows[1]["target"], "fp16");
    assert_eq!(rows[1]["exists"], false, "{v}");
    assert_eq!(rows[1]["status"], "missing", "{v}");
    assert_eq!(rows[2]["status"], "source_is_target", "{v}");
    assert_eq!(rows[2]["path"], src.arg());
    let files: Vec<String> = s
        .converted_files()
        .into_iter()
        .filter(|f| f != ".convcache")
        .collect();
    assert_eq!(files, ["m_bf16.safetensors"]);
    src.assert_unchanged();
}

#[test]
fn list_and_stats_json_shapes() {
    let s = Scratch::new();
    let src = s.source("m.safetensors", SMALL);
    let paths = three_conversions(&s, &src);

    let list = s.run(&["--json", "list"]).ok().json();
    let entries = list.as_array().expect("list --json prints an array");
    assert_eq!(entries.len(), 3, "{list}");
    let mut total = 0;
    for e in entries {
        let p = PathBuf::from(e["path"].as_str().expect("path"));
        assert!(paths.contains(&p), "{e}");
        let size = std::fs::metadata(&p).expect("stat").len();
        assert_eq!(e["size"], size, "{e}");
        total += size;
        assert_eq!(e["basename"], "m", "{e}");
        assert!(e["precision"].is_string(), "{e}");
        assert!(e.get("source").is_some(), "{e}");
    }
    let mut precisions: Vec<&str> = entries
        .iter()
        .map(|e| e["precision"].as_str().expect("precision"))
        .collect();
    precisions.sort();
    assert_eq!(precisions, ["bf16", "fp16", "fp8_e4m3fn"]);

    let gguf_only = s.run(&["--json", "list", "--kind", "gguf"]).ok().json();
    assert_eq!(gguf_only, Value::Array(vec![]));

    let stats = s.run(&["--json", "stats"]).ok().json();
    assert_eq!(stats["count"], 3, "{stats}");
    assert_eq!(stats["total_bytes"], total, "{stats}");
    let by = stats["by_precision"]
        .as_object()
        .expect("by_precision object");
    assert_eq!(by.len(), 3, "{stats}");
    assert_eq!(by["bf16"]["count"], 1, "{stats}");
    assert_eq!(
        by["bf16"]["bytes"],
        std::fs::metadata(&paths[0]).expect("stat").len()
    );
    src.assert_unchanged();
}

#[test]
fn cleanup_dry_run_removes_nothing_and_a_real_cleanup_keeps_n() {
    let s = Scratch::new();
    let src = s.source("m.safetensors", SMALL);
    let paths = three_conversions(&s, &src);
    // Use bf16 last, so it is the most recently used.
    s.run(&["convert", src.arg(), "--to", "bf16"]).ok();

    let v = s
        .run(&["--json", "cleanup", src.arg(), "--keep", "1", "--dry-run"])
        .ok()
        .json();
    assert_eq!(v["dry_run"], true, "{v}");
    assert_eq!(v["removed"].as_array().expect("removed").len(), 2, "{v}");
    for p in &paths {
        assert!(p.exists(), "--dry-run removed {}", p.display());
    }
    let v = s
        .run(&["--json", "cleanup", "--max-size", "0", "--dry-run"])
        .ok()
        .json();
    assert_eq!(v["removed"].as_array().expect("removed").len(), 3, "{v}");
    for p in &paths {
        assert!(p.exists(), "--dry-run removed {}", p.display());
    }

    let v = s
        .run(&["--json", "cleanup", src.arg(), "--keep", "1"])
        .ok()
        .json();
    assert_eq!(v["dry_run"], false, "{v}");
    assert_eq!(v["removed"].as_array().expect("removed").len(), 2, "{v}");
    assert!(paths[0].exists(), "the most recently used (bf16) is kept");
    assert!(!paths[1].exists() && !paths[2].exists());
    src.assert_unchanged();

    let v = s.run(&["--json", "cleanup", "--max-size", "0"]).ok().json();
    assert_eq!(v["removed"].as_array().expect("removed").len(), 1, "{v}");
    assert!(!paths[0].exists());
    src.assert_unchanged();
}

#[test]
fn demo_runs_on_nothing_and_shows_a_cache_hit() {
    let s = Scratch::new();
    let run = s.run(&["--json", "demo"]).ok();
    let v = run.json();
    let first = v["first"].as_array().expect("first");
    let second = v["second"].as_array().expect("second");
    assert!(!first.is_empty());
    assert_eq!(first.len(), second.len());
    for (a, b) in first.iter().zip(second) {
        assert_eq!(a["status"], "converted", "{a}");
        assert_eq!(b["status"], "cached", "{b}");
        assert_eq!(a["path"], b["path"]);
    }
    assert_eq!(v["stats"]["count"], first.len() as u64, "{v}");
    assert!(
        !s.models().exists(),
        "demo works in its own temporary dir, not in --models-dir"
    );
    let text = s.run(&["demo"]).ok();
    assert!(text.stdout.contains("cached"), "{}", text.stdout);
}

#[test]
fn cleanup_keep_without_a_source_keeps_n_per_source_and_a_deleted_source_is_still_found() {
    let s = Scratch::new();
    let a = s.source("a.safetensors", SMALL);
    let b = s.source("b.safetensors", SMALL);
    let a_paths = three_conversions(&s, &a);
    let b_paths = three_conversions(&s, &b);
    // bf16 last, so it is each source's most recently used.
    s.run(&["convert", a.arg(), "--to", "bf16"]).ok();
    s.run(&["convert", b.arg(), "--to", "bf16"]).ok();

    let v = s.run(&["--json", "cleanup", "--keep", "1"]).ok().json();
    assert_eq!(v["policy"], "keep", "{v}");
    assert_eq!(v["removed"].as_array().expect("removed").len(), 4, "{v}");
    for paths in [&a_paths, &b_paths] {
        assert!(paths[0].exists(), "each source keeps its bf16");
        assert!(!paths[1].exists() && !paths[2].exists(), "{v}");
    }

    // A deleted source's conversions are found by the path they record, even named through
    // `..` (the folder is resolved as it would have been for the file).
    std::fs::remove_file(&b.path).expect("delete b");
    std::fs::create_dir_all(s.root().join("sub")).expect("mkdir");
    let roundabout = s.root().join("sub/../b.safetensors");
    let v = s
        .run(&[
            "--json",
            "cleanup",
            roundabout.to_str().expect("utf-8"),
            "--keep",
            "0",
        ])
        .ok()
        .json();
    assert_eq!(v["removed"].as_array().expect("removed").len(), 1, "{v}");
    assert!(!b_paths[0].exists());
    assert!(a_paths[0].exists(), "another source's conversion stays");
    a.assert_unchanged();
}

/// `convert` and `cleanup` remove it; the read-only commands leave it (see `read_only.rs`).
#[test]
fn a_temporary_left_by_a_killed_conversion_is_removed_by_the_next_command() {
    for command in [
        &["convert", "SRC", "--to", "bf16"][..],
        &["cleanup", "--max-size", "1T"],
    ] {
        let s = Scratch::new();
        let src = s.source("m.safetensors", SMALL);
        let command: Vec<&str> = command
            .iter()
            .map(|&a| if a == "SRC" { src.arg() } else { a })
            .collect();
        let out = three_conversions(&s, &src).remove(0);
        // What a killed writer leaves: a temporary named after the output and its pid, with
        // nobody holding the output's lock.
        let name = out.file_name().expect("name").to_str().expect("utf-8");
        let temp = s.converted_dir().join(format!(".{name}.999999.tmp"));
        std::fs::write(&temp, b"half a model").expect("write temporary");
        s.run(&command).ok();
        assert!(!temp.exists(), "{command:?} left {}", temp.display());
        assert!(out.exists(), "{command:?} removed the output itself");

        // A live writer's temporary (its output's lock held) is left alone.
        std::fs::write(&temp, b"being written").expect("write temporary");
        let lock = cache::OutputSlot::acquire(&out, None).expect("lock");
        s.run(&command).ok();
        assert!(
            temp.exists(),
            "{command:?} removed a live writer's temporary"
        );
        drop(lock);
    }
}

#[test]
fn list_and_stats_go_by_the_header_not_the_name() {
    let s = Scratch::new();
    let src = s.source("m.safetensors", SMALL);
    let good = three_conversions(&s, &src).remove(0);
    // A text file and a copy of the bf16 output, both under fp16 output names.
    std::fs::write(s.converted_dir().join("notes_fp16.safetensors"), b"hello").expect("write");
    std::fs::copy(&good, s.converted_dir().join("x_fp16.safetensors")).expect("copy");

    let list = s.run(&["--json", "list"]).ok().json();
    let problem_of = |name: &str| {
        list.as_array()
            .expect("array")
            .iter()
            .find(|e| e["path"].as_str().is_some_and(|p| p.ends_with(name)))
            .map(|e| e["problem"].clone())
            .expect(name)
    };
    assert!(problem_of("notes_fp16.safetensors").is_string(), "{list}");
    let copied = problem_of("x_fp16.safetensors");
    assert!(
        copied.as_str().is_some_and(|p| p.contains("bf16")),
        "{list}"
    );
    assert_eq!(problem_of("m_bf16.safetensors"), Value::Null, "{list}");

    let stats = s.run(&["--json", "stats"]).ok().json();
    assert_eq!(stats["count"], 3, "{stats}");
    assert_eq!(stats["by_precision"]["fp16"]["count"], 1, "{stats}");
    assert_eq!(stats["unusable"]["count"], 2, "{stats}");
    let text = s.run(&["list"]).ok();
    assert!(text.stdout.contains("not usable"), "{}", text.stdout);
    src.assert_unchanged();
}
