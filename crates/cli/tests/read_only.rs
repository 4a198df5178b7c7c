//! `check`, `list` and `stats` never write: not an output, not a record, not a use stamp, not a
//! lock file, not a temporary of a dead writer. What their lookups learn is written by the next
//! `convert` that uses the answer.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

/// Every path under `dir` (directories included, symlinks not followed) with its size and
/// mtime in nanoseconds.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, u128)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for ent in std::fs::read_dir(&d).expect("read dir") {
            let path = ent.expect("dir entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            let mtime = meta
                .modified()
                .expect("mtime")
                .duration_since(UNIX_EPOCH)
                .expect("after the epoch")
                .as_nanos();
            if meta.is_dir() {
                todo.push(path.clone());
            }
            out.insert(path, (meta.len(), mtime));
        }
    }
    out
}

fn set_mtime(path: &Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open")
        .set_modified(t)
        .expect("set mtime");
}

#[test]
fn check_list_and_stats_change_no_file() {
    let s = Scratch::new();
    let src = s.source("m.safetensors", SMALL);
    // bf16 published without fsync (its record marked for a sync at the first hit), fp16 with.
    s.run(&["convert", src.arg(), "--to", "bf16", "--no-fsync"])
        .ok();
    s.run(&["convert", src.arg(), "--to", "fp16"]).ok();
    let bf16 = s.converted_dir().join("m_bf16.safetensors");
    let fp16 = s.converted_dir().join("m_fp16.safetensors");
    // Each of these makes a lookup learn something a conversion would write down: the fp16
    // output touched (same bytes: its record is refreshed), the source touched (same bytes: its
    // new facts are remembered), a temporary of a dead writer (removed).
    set_mtime(&fp16, SystemTime::now());
    set_mtime(&src.path, SystemTime::now() - Duration::from_secs(60));
    let dead = s.converted_dir().join(".m_bf16.safetensors.999999.tmp");
    std::fs::write(&dead, b"half a model").expect("write temporary");

    let before = snapshot(s.root());
    let commands: [&[&str]; 8] = [
        &["check", src.arg(), "--to", "bf16,fp16,fp8,Q8_0"],
        &["--json", "check", src.arg(), "--to", "bf16,fp16,nf4"],
        &["check", src.arg(), "--to", "bf16,fp16", "--strict"],
        &["list"],
        &["--json", "list"],
        &["stats"],
        &["--json", "stats"],
        &["list", "--kind", "gguf"],
    ];
    for command in commands {
        s.run(command).ok();
        assert_eq!(
            snapshot(s.root()),
            before,
            "{command:?} created, changed or removed a file"
        );
    }
    let rows = s
        .run(&["--json", "check", src.arg(), "--to", "bf16,fp16"])
        .ok()
        .json();
    for row in rows.as_array().expect("array") {
        assert_eq!(row["status"], "hit", "{row}");
    }

    // The answers used, the conversion writes what the lookups learned.
    s.run(&["convert", src.arg(), "--to", "bf16,fp16"]).ok();
    assert!(!dead.exists(), "convert removes a dead writer's temporary");
    for out in [&bf16, &fp16] {
        let record = cache::read_output_record(out)
            .expect("readable record")
            .expect("a record");
        assert_eq!(record.unsynced_boot_id, None, "{}", out.display());
        let seen = record
            .source_seen
            .expect("the source's new facts remembered");
        assert_eq!(seen.size, src.bytes.len() as u64);
        let published = cache::OutputRecord::of_file(out, record.digest.clone()).expect("stat");
        assert_eq!(
            (record.size, record.mtime_ns),
            (published.size, published.mtime_ns)
        );
    }
}
