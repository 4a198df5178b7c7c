//! The converter end to end: torch goldens, the tensor rules, chunking, the report, errors.

#![allow(clippy::unwrap_used)] // test code

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use detect::Precision;
use precision::convert::{ConvertError, ConvertOptions, Report, convert_observing_source};
use precision::{convert, convert_with, merged_metadata, plan};
use proptest::prelude::*;
use tensorfile::safetensors::{Dtype, SafetensorsFile};

const TARGETS: [Precision; 5] = [
    Precision::Fp32,
    Precision::Fp16,
    Precision::Bf16,
    Precision::Fp8E4m3fn,
    Precision::Fp8E5m2,
];

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// Writes a safetensors file from (name, dtype, shape, bytes).
fn write_model(
    path: &Path,
    tensors: &[(&str, Dtype, Vec<u64>, Vec<u8>)],
    meta: &BTreeMap<String, String>,
) {
    tensorfile::safetensors::writer::write_file(path, tensors, meta).expect("write the model");
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Converts `src` to `target` in memory with the source's metadata.
fn run(src: &SafetensorsFile, target: Precision, chunk_bytes: usize) -> (Vec<u8>, Report) {
    let p = plan(src, target).unwrap();
    let meta = merged_metadata(&src.header.metadata, &BTreeMap::new());
    let mut out = Vec::new();
    let report = convert_with(
        src,
        &p,
        &meta,
        &mut out,
        ConvertOptions { chunk_bytes },
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(out.len() as u64, p.output_len(&meta).unwrap());
    assert_eq!(report.bytes_out, out.len() as u64);
    (out, report)
}

/// [`run`] through `convert_observing_source`, also returning every byte the observer saw.
fn run_observed(
    src: &SafetensorsFile,
    target: Precision,
    chunk_bytes: usize,
) -> (Vec<u8>, Report, Vec<u8>) {
    let p = plan(src, target).unwrap();
    let meta = merged_metadata(&src.header.metadata, &BTreeMap::new());
    let mut out = Vec::new();
    let mut seen = Vec::new();
    let report = convert_observing_source(
        src,
        &p,
        &meta,
        &mut out,
        ConvertOptions { chunk_bytes },
        &mut |_, _| {},
        &mut |bytes: &[u8]| seen.extend_from_slice(bytes),
    )
    .unwrap();
    (out, report, seen)
}

fn reopen(dir: &Path, name: &str, bytes: &[u8]) -> SafetensorsFile {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    SafetensorsFile::open(&path).unwrap()
}

#[test]
fn e2e_matches_torch_for_every_target() {
    let dir = tempfile::tempdir().unwrap();
    let src = SafetensorsFile::open(&golden("e2e_source.safetensors")).unwrap();
    for target in TARGETS {
        let (bytes, report) = run(&src, target, 64);
        let ours = reopen(dir.path(), "out.safetensors", &bytes);
        let torch = SafetensorsFile::open(&golden(&format!(
            "e2e_{}.safetensors",
            target.canonical_name()
        )))
        .unwrap();
        assert_eq!(ours.header.tensors.len(), torch.header.tensors.len());
        for t in &torch.header.tensors {
            let (o, ob) = ours.tensor(&t.name).unwrap();
            assert_eq!(
                (o.dtype, &o.shape),
                (t.dtype, &t.shape),
                "{target}: {}",
                t.name
            );
            assert!(
                ob == torch.tensor_bytes(t),
                "{target}: tensor {} differs from torch",
                t.name
            );
        }
        // Names and order follow the source; metadata is kept.
        let names = |f: &SafetensorsFile| -> Vec<String> {
            f.header.tensors.iter().map(|t| t.name.clone()).collect()
        };
        assert_eq!(names(&ours), names(&src));
        assert_eq!(ours.header.metadata, src.header.metadata);
        assert_eq!(ours.header.metadata["golden"], "convcache precision e2e");
        // The golden weight holds 1e6, -500 and 70000 (and a NaN and -inf).
        match target {
            Precision::Fp16 => assert_eq!((report.overflowed, report.non_finite), (2, 4)),
            Precision::Fp8E4m3fn => assert_eq!((report.overflowed, report.non_finite), (3, 1)),
            Precision::Fp8E5m2 => assert_eq!((report.overflowed, report.non_finite), (2, 4)),
            _ => assert_eq!(report.overflowed, 0),
        }
    }
}

#[test]
fn fp8_targets_keep_1d_and_scalars_16bit_and_copy_integers() {
    let src = SafetensorsFile::open(&golden("e2e_source.safetensors")).unwrap();
    for target in [Precision::Fp8E4m3fn, Precision::Fp8E5m2] {
        let p = plan(&src, target).unwrap();
        let dtype_of = |name: &str| {
            p.specs
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.dtype)
                .unwrap()
        };
        let fp8 = target.safetensors_dtype().unwrap();
        assert_eq!(dtype_of("model.diffusion_model.proj.weight"), fp8);
        assert_eq!(dtype_of("model.diffusion_model.f64w"), fp8);
        assert_eq!(dtype_of("model.diffusion_model.fp8w"), fp8);
        assert_eq!(dtype_of("model.diffusion_model.proj.bias"), Dtype::BF16); // f32 1-D
        assert_eq!(dtype_of("logit_scale"), Dtype::F16); // f16 scalar
        assert_eq!(dtype_of("model.diffusion_model.norm.fp8"), Dtype::F16); // fp8 1-D
        assert_eq!(dtype_of("position_ids"), Dtype::I64);
        assert_eq!(dtype_of("mask"), Dtype::Bool);
        let mut kept = p.kept_16bit.clone();
        kept.sort();
        assert_eq!(
            kept,
            [
                "logit_scale",
                "model.diffusion_model.norm.fp8",
                "model.diffusion_model.proj.bias"
            ]
        );
        let (bytes, report) = run(&src, target, 1 << 20);
        assert_eq!(report.tensors_kept_16bit, 3);
        assert_eq!(report.kept_16bit.len(), 3);
        // Integer and bool tensors: byte for byte; logit_scale (already f16): copied.
        let dir = tempfile::tempdir().unwrap();
        let out = reopen(dir.path(), "o.safetensors", &bytes);
        for name in ["position_ids", "mask", "counts", "logit_scale"] {
            assert_eq!(
                out.tensor(name).unwrap().1,
                src.tensor(name).unwrap().1,
                "{name}"
            );
        }
        // fp8w is already e5m2: copied for that target.
        let copied = if target == Precision::Fp8E5m2 { 5 } else { 4 };
        assert_eq!(report.tensors_copied, copied);
        assert_eq!(
            report.tensors_converted,
            src.header.tensors.len() as u64 - copied
        );
    }
}

#[test]
fn f32_1e6_to_fp16_counts_one_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    write_model(
        &path,
        &[(
            "w",
            Dtype::F32,
            vec![2, 2],
            f32_bytes(&[1e6, 1.0, -2.0, 0.5]),
        )],
        &BTreeMap::new(),
    );
    let src = SafetensorsFile::open(&path).unwrap();
    let (_, report) = run(&src, Precision::Fp16, 1 << 20);
    assert_eq!(report.overflowed, 1);
    assert_eq!(report.non_finite, 1);
    assert_eq!(report.tensors_converted, 1);
    assert_eq!(report.bytes_in, 16);
    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "target",
        "tensors_converted",
        "tensors_copied",
        "tensors_kept_16bit",
        "kept_16bit",
        "overflowed",
        "non_finite",
        "bytes_in",
        "bytes_out",
    ] {
        assert!(json.get(key).is_some(), "report JSON lacks {key}");
    }
    assert_eq!(json["target"], "fp16");
}

#[test]
fn output_is_detected_as_the_target_precision() {
    let dir = tempfile::tempdir().unwrap();
    let src = SafetensorsFile::open(&golden("e2e_source.safetensors")).unwrap();
    for target in TARGETS {
        let (bytes, _) = run(&src, target, 1 << 20);
        let path = dir.path().join(format!("o_{target}.safetensors"));
        std::fs::write(&path, &bytes).unwrap();
        let d = detect::detect(&path).unwrap();
        assert_eq!(d.precision, Some(target), "{target}");
    }
}

#[test]
fn provenance_is_merged_over_source_metadata() {
    let src = SafetensorsFile::open(&golden("e2e_source.safetensors")).unwrap();
    let mut extra = BTreeMap::new();
    extra.insert("convcache.target".to_string(), "bf16".to_string());
    extra.insert("format".to_string(), "pt".to_string());
    let m = merged_metadata(&src.header.metadata, &extra);
    assert_eq!(m["golden"], "convcache precision e2e");
    assert_eq!(m["convcache.target"], "bf16");
    let p = plan(&src, Precision::Bf16).unwrap();
    let mut out = Vec::new();
    convert(&src, &p, &m, &mut out, &mut |_, _| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(reopen(dir.path(), "o.safetensors", &out).header.metadata, m);
}

#[test]
fn unsupported_targets_and_dtypes_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e8m0.safetensors");
    write_model(
        &path,
        &[
            ("ok", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0])),
            ("blk.scales", Dtype::F8E8M0, vec![4], vec![127; 4]),
        ],
        &BTreeMap::new(),
    );
    let src = SafetensorsFile::open(&path).unwrap();
    let err = precision::plan(&src, Precision::Fp16).unwrap_err();
    assert!(matches!(err, ConvertError::UnsupportedDtype { .. }));
    let msg = err.to_string();
    assert!(msg.starts_with(&path.display().to_string()), "{msg}");
    assert!(
        msg.contains("blk.scales") && msg.contains("F8_E8M0"),
        "{msg}"
    );

    let err = plan(&src, Precision::Nf4).unwrap_err();
    assert!(matches!(err, ConvertError::UnsupportedTarget { .. }));
    assert!(err.to_string().contains("nf4"), "{err}");
}

#[test]
fn progress_reaches_the_totals() {
    let src = SafetensorsFile::open(&golden("e2e_source.safetensors")).unwrap();
    let p = plan(&src, Precision::Fp8E4m3fn).unwrap();
    let mut calls = Vec::new();
    let mut out = Vec::new();
    convert_with(
        &src,
        &p,
        &BTreeMap::new(),
        &mut out,
        ConvertOptions { chunk_bytes: 100 },
        &mut |b, t| calls.push((b, t)),
    )
    .unwrap();
    assert!(
        calls
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1)
    );
    assert_eq!(
        calls.last().copied(),
        Some((p.bytes_in, src.header.tensors.len() as u64))
    );
    assert!(
        calls.len() > src.header.tensors.len(),
        "large tensors come in chunks"
    );
}

/// A sink that fails after `left` bytes, like a full disk.
struct FullDisk {
    left: usize,
}

impl Write for FullDisk {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "no space left"));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn write_errors_are_reported_with_the_io_error() {
    let src = SafetensorsFile::open(&golden("e2e_source.safetensors")).unwrap();
    let p = plan(&src, Precision::Bf16).unwrap();
    for left in [0, 10, 1500] {
        let err = convert_with(
            &src,
            &p,
            &BTreeMap::new(),
            FullDisk { left },
            ConvertOptions { chunk_bytes: 64 },
            &mut |_, _| {},
        )
        .unwrap_err();
        assert_eq!(
            err.io_error().map(|e| e.kind()),
            Some(io::ErrorKind::StorageFull)
        );
        assert!(err.to_string().contains("e2e_source.safetensors"), "{err}");
    }
}

#[test]
fn a_plan_for_another_file_is_refused() {
    let src = SafetensorsFile::open(&golden("e2e_source.safetensors")).unwrap();
    let mut p = plan(&src, Precision::Fp16).unwrap();
    p.specs[0].dtype = Dtype::I32;
    p.actions[0] = precision::Action::Copy;
    let err = convert(&src, &p, &BTreeMap::new(), Vec::new(), &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, ConvertError::PlanMismatch { .. }), "{err}");
}

fn dtype_strategy() -> impl Strategy<Value = Dtype> {
    prop_oneof![
        Just(Dtype::F64),
        Just(Dtype::F32),
        Just(Dtype::F16),
        Just(Dtype::BF16),
        Just(Dtype::F8E4M3),
        Just(Dtype::F8E5M2),
        Just(Dtype::I32),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Chunked conversion (tiny chunks, odd sizes) writes the same bytes as whole tensors, and
    /// the same report.
    #[test]
    fn chunked_equals_whole(
        tensors in prop::collection::vec(
            (dtype_strategy(), prop::collection::vec(0u64..7, 0..3), any::<u64>()),
            1..6,
        ),
        chunk_bytes in 1usize..300,
        target_ix in 0usize..5,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let mut model = Vec::new();
        for (i, (dtype, shape, seed)) in tensors.iter().enumerate() {
            let n: u64 = shape.iter().product();
            let len = (n * dtype.bits() / 8) as usize;
            // Random bytes: every bit pattern, NaNs and infinities included.
            let mut x = *seed | 1;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect();
            model.push((format!("t{i}"), *dtype, shape.clone(), bytes));
        }
        let refs: Vec<(&str, Dtype, Vec<u64>, Vec<u8>)> = model
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
            .collect();
        write_model(&path, &refs, &BTreeMap::new());
        let src = SafetensorsFile::open(&path).unwrap();
        let target = TARGETS[target_ix];
        let (whole, whole_report) = run(&src, target, usize::MAX / 2);
        let (chunked, chunked_report) = run(&src, target, chunk_bytes);
        prop_assert!(whole == chunked);
        prop_assert_eq!(whole_report, chunked_report.clone());
        // Observing the source changes nothing in the output, and the observer sees the whole
        // file, in order (what lets smart hash the source in the conversion's own pass).
        let (observed_out, observed_report, seen) = run_observed(&src, target, chunk_bytes);
        prop_assert!(observed_out == chunked);
        prop_assert_eq!(observed_report, chunked_report);
        prop_assert!(seen == std::fs::read(&path).unwrap());
        // And each tensor equals a direct cast_slice of the source tensor.
        let out = reopen(dir.path(), "o.safetensors", &whole);
        for (t, o) in src.header.tensors.iter().zip(&out.header.tensors) {
            let sb = src.tensor_bytes(t);
            let mut expect = vec![0u8; out.tensor_bytes(o).len()];
            if t.dtype == o.dtype {
                expect.copy_from_slice(sb);
            } else {
                tensorfile::cast_slice(t.dtype, sb, o.dtype, &mut expect).unwrap();
            }
            prop_assert!(expect == out.tensor_bytes(o), "tensor {}", t.name);
        }
    }
}

#[test]
fn a_source_changed_after_opening_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let model = |name: &str, n: usize| {
        vec![(
            name.to_string(),
            Dtype::F32,
            vec![n as u64],
            f32_bytes(&vec![1.5; n]),
        )]
    };
    let write = |m: Vec<(String, Dtype, Vec<u64>, Vec<u8>)>| {
        let refs: Vec<(&str, Dtype, Vec<u64>, Vec<u8>)> = m
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
            .collect();
        write_model(&path, &refs, &BTreeMap::new());
    };
    write(model("a", 8));
    let src = SafetensorsFile::open(&path).unwrap();
    let p = plan(&src, Precision::Fp16).unwrap();
    // Same size, different header.
    write(model("b", 8));
    let err = convert(&src, &p, &BTreeMap::new(), Vec::new(), &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, ConvertError::SourceChanged { .. }), "{err}");
    // Different size.
    write(model("a", 4));
    let err = convert(&src, &p, &BTreeMap::new(), Vec::new(), &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, ConvertError::SourceChanged { .. }), "{err}");
    assert!(err.to_string().starts_with(&path.display().to_string()));
}

/// Tensors large enough for the parallel split inside a chunk (more than 65536 elements per
/// chunk) and for several chunks per tensor: same bytes and counts as one sequential cast.
#[test]
fn large_tensors_split_across_chunks_and_threads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    let n = 300_007usize;
    let mut x = 0x9E37_79B9u32;
    let vals: Vec<f32> = (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            match i % 1000 {
                0 => 1e6,
                1 => f32::NAN,
                _ => (x as f32 / u32::MAX as f32 - 0.5) * 100.0,
            }
        })
        .collect();
    write_model(
        &path,
        &[("w", Dtype::F32, vec![1, n as u64], f32_bytes(&vals))],
        &BTreeMap::new(),
    );
    let src = SafetensorsFile::open(&path).unwrap();
    for target in TARGETS {
        let dst = target.safetensors_dtype().unwrap();
        let mut expect = vec![0u8; n * (dst.bits() / 8) as usize];
        let stats =
            tensorfile::cast_slice(Dtype::F32, src.tensor("w").unwrap().1, dst, &mut expect)
                .unwrap();
        for chunk_bytes in [1 << 20, 400_000, usize::MAX / 2] {
            let (bytes, report) = run(&src, target, chunk_bytes);
            let out = reopen(dir.path(), "o.safetensors", &bytes);
            assert!(out.tensor("w").unwrap().1 == expect.as_slice(), "{target}");
            assert_eq!(
                (report.overflowed, report.non_finite),
                (stats.overflowed, stats.non_finite)
            );
        }
        if target == Precision::Fp16 {
            assert_eq!(stats.overflowed, 301);
        }
    }
}

/// A header whose JSON lists tensors in another order than their data: the observer still sees
/// the file's bytes in file order (the converter walks tensors by offset).
#[test]
fn the_observer_sees_the_file_in_order_whatever_the_json_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let json = br#"{"z":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[3],"data_offsets":[8,20]},"__metadata__":{"k":"v"}}"#;
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(json);
    file.extend(f32_bytes(&[1.0, -2.5, 3.25, 1e6, f32::NAN]));
    std::fs::write(&path, &file).unwrap();
    let src = SafetensorsFile::open(&path).unwrap();
    for target in TARGETS {
        for chunk in [1, 4, 1 << 20] {
            let (out, _, seen) = run_observed(&src, target, chunk);
            assert!(seen == file, "{target} chunk {chunk}");
            assert!(out == run(&src, target, chunk).0);
        }
    }
}
