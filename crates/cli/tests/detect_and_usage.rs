//! `convcache detect` and usage errors, through the built binary.

mod common;

use common::{SMALL, Scratch};

#[test]
fn detect_json_reports_format_precision_histogram_and_architecture() {
    let s = Scratch::new();
    let src = s.source("flux_sample.safetensors", SMALL);
    let run = s.run(&["--json", "detect", src.arg()]).ok();
    let v = run.json();
    let arr = v.as_array().expect("detect --json prints an array");
    assert_eq!(arr.len(), 1);
    let d = &arr[0];
    assert_eq!(d["path"], src.arg());
    assert_eq!(d["format"], "safetensors");
    assert_eq!(d["precision"], "fp32");
    assert_eq!(d["file_size"], src.bytes.len() as u64);
    let tensors = SMALL.tensors();
    assert_eq!(d["tensor_count"], tensors.len() as u64);
    let hist = d["histogram"].as_array().expect("histogram array");
    assert_eq!(hist.len(), 1, "{hist:?}");
    assert_eq!(hist[0]["dtype"], "F32");
    assert_eq!(hist[0]["tensors"], tensors.len() as u64);
    let data: u64 = tensors.iter().map(|t| t.byte_len().expect("len")).sum();
    assert_eq!(hist[0]["bytes"], data);
    for key in [
        "evidence",
        "architecture",
        "fp8_scaling",
        "bitsandbytes",
        "metadata",
        "gguf_file_type",
    ] {
        assert!(d.get(key).is_some(), "missing `{key}` in {d}");
    }
    assert!(
        d["architecture"]
            .to_string()
            .to_lowercase()
            .contains("flux"),
        "flux key names should be recognised: {}",
        d["architecture"]
    );
    assert!(run.stderr.is_empty(), "{}", run.stderr);
    src.assert_unchanged();
}

#[test]
fn detect_text_names_the_file_and_its_precision() {
    let s = Scratch::new();
    let src = s.source("m.safetensors", SMALL);
    let run = s.run(&["detect", src.arg()]).ok();
    assert!(run.stdout.contains(src.arg()), "{}", run.stdout);
    assert!(run.stdout.contains("fp32"), "{}", run.stdout);
    assert!(run.stdout.contains("F32"), "{}", run.stdout);
}

#[test]
fn detect_bad_files_give_one_line_each_exit_2_and_the_good_one_is_still_printed() {
    let s = Scratch::new();
    let good = s.source("good.safetensors", SMALL);
    let garbage = s.root().join("garbage.safetensors");
    std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\xffnot a header").expect("write");
    let missing = s.root().join("missing.safetensors");
    let run = s.run(&[
        "--json",
        "detect",
        garbage.to_str().expect("utf-8"),
        good.arg(),
        missing.to_str().expect("utf-8"),
    ]);
    assert_eq!(run.code, 2, "stderr: {}", run.stderr);
    let v = run.json();
    let arr = v.as_array().expect("array");
    assert_eq!(arr.len(), 1, "only the good file: {v}");
    assert_eq!(arr[0]["path"], good.arg());
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "one line per bad file:\n{}", run.stderr);
    assert!(lines[0].starts_with("convcache: "), "{}", lines[0]);
    assert!(lines[0].contains("garbage.safetensors"), "{}", lines[0]);
    assert!(lines[1].starts_with("convcache: "), "{}", lines[1]);
    assert!(lines[1].contains("missing.safetensors"), "{}", lines[1]);
    good.assert_unchanged();
}

#[test]
fn usage_errors_exit_2_and_print_nothing_on_stdout() {
    let s = Scratch::new();
    for args in [
        &[][..],
        &["frobnicate"],
        &["convert", "x.safetensors"],
        &["convert", "x.safetensors", "--to", "fp9"],
        &["check", "x.safetensors"],
        &["cleanup", "--dry-run"],
        &["cleanup", "x.safetensors"],
        &["cleanup", "--max-size", "20X"],
        &["cleanup", "--max-size", "18446744073709551616"],
        &[
            "cleanup",
            "x.safetensors",
            "--keep",
            "1",
            "--max-size",
            "1G",
        ],
        &["list", "--kind", "nope"],
        &["detect"],
    ] {
        let run = s.run(args);
        assert_eq!(run.code, 2, "{args:?}: stderr {}", run.stderr);
        assert!(run.stdout.is_empty(), "{args:?}: stdout {}", run.stdout);
        assert!(!run.stderr.is_empty(), "{args:?}: no message");
        // One line, as every error (a bare `convcache` shows the usage instead).
        if !args.is_empty() {
            assert_eq!(run.stderr.lines().count(), 1, "{args:?}: {}", run.stderr);
            assert!(
                run.stderr.starts_with("convcache: usage: "),
                "{}",
                run.stderr
            );
        }
    }
    assert!(
        !s.models().exists(),
        "a usage error must not create the models dir"
    );
}

#[test]
fn a_missing_source_is_bad_input_exit_2_with_one_line() {
    let s = Scratch::new();
    let missing = s.root().join("nope.safetensors");
    let run = s.run(&["convert", missing.to_str().expect("utf-8"), "--to", "bf16"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.starts_with("convcache: "), "{}", run.stderr);
    assert!(run.stderr.contains("nope.safetensors"), "{}", run.stderr);
    assert!(
        s.converted_files().iter().all(|f| f == ".convcache"),
        "{:?}",
        s.converted_files()
    );
}
