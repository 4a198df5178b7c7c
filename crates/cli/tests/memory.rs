//! Peak memory of a precision conversion is bounded by its chunk buffers, not by the model
//! (issue 3 §1: a model larger than RAM converts). The model here is small enough for CI but
//! 128 times the converter's chunk budget, in one tensor: a converter holding a tensor (or the
//! model) in memory shows its size in the child's peak RSS.

mod common;

use std::collections::BTreeMap;
use std::io::BufWriter;

use common::*;
use tensorfile::safetensors::Dtype;
use tensorfile::{SafetensorsWriter, TensorSpec};

/// Elements of the large tensor: 64 Mi f32 values, 256 MiB.
const BIG: u64 = 64 << 20;
/// What the child may use: chunk buffers, thread stacks, the binary. Far below the tensor.
const LIMIT_KIB: i64 = 96 * 1024;

/// Runs `convcache ARGS` and returns its exit code and peak RSS in KiB (`wait4`'s rusage of
/// that child only).
#[allow(clippy::zombie_processes)] // reaped by wait4 below, which std's Child cannot do
fn run_measured(s: &Scratch, args: &[&str]) -> (i32, i64) {
    let child = s
        .cmd(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills; the pid is this test's unreaped child,
    // which wait4 reaps (std's `Child` is not used to wait for it afterwards).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t, "wait4");
    assert!(libc::WIFEXITED(status), "convcache did not exit normally");
    (libc::WEXITSTATUS(status), usage.ru_maxrss)
}

#[test]
fn converting_a_tensor_far_larger_than_the_chunk_budget_keeps_memory_bounded() {
    let s = Scratch::new();
    let src = s.root().join("big.safetensors");
    let specs = [
        TensorSpec {
            name: "big.weight".into(),
            dtype: Dtype::F32,
            shape: vec![BIG / 4096, 4096],
        },
        TensorSpec {
            name: "big.bias".into(),
            dtype: Dtype::F32,
            shape: vec![4096],
        },
    ];
    let file = BufWriter::new(std::fs::File::create(&src).expect("create"));
    let mut w = SafetensorsWriter::new(file, &specs, &BTreeMap::new()).expect("writer");
    let row: Vec<u8> = (0..4096u32)
        .flat_map(|i| ((i % 251) as f32 * 0.013 - 1.5).to_le_bytes())
        .collect();
    for _ in 0..(BIG / 4096 + 1) {
        w.write_chunk(&row).expect("write");
    }
    w.finish().expect("finish");

    for target in ["bf16", "fp8", "fp16"] {
        let (code, peak_kib) = run_measured(
            &s,
            &[
                "-q",
                "convert",
                src.to_str().expect("utf-8"),
                "--to",
                target,
            ],
        );
        assert_eq!(code, 0, "{target}");
        eprintln!("{target}: peak RSS {} KiB", peak_kib);
        assert!(
            peak_kib < LIMIT_KIB,
            "{target}: peak RSS {} MiB converting a {} MiB tensor",
            peak_kib >> 10,
            (BIG * 4) >> 20
        );
    }
}
