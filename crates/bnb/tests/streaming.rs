//! Large tensors go through several windows and parallel tasks; the bytes must not depend on
//! that split. Also hostile bitsandbytes files are refused, not trusted.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::Path;

use bnb::kernels::{
    BLOCKSIZE, QuantType, Quantizer4, dequantize_4bit, dequantize_int8_rows, quantize_4bit,
    quantize_int8_rows,
};
use bnb::{Options, convert, plan};
use detect::Precision;
use tensorfile::safetensors::Dtype;
use tensorfile::source::Stored;
use tensorfile::{SourceError, SourceTensor, TensorSource};

/// One tensor in memory.
#[derive(Debug)]
struct Mem {
    tensors: Vec<SourceTensor>,
    metadata: BTreeMap<String, String>,
    data: Vec<u8>,
}

impl TensorSource for Mem {
    fn path(&self) -> &Path {
        Path::new("memory")
    }
    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }
    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    fn read_raw(&self, _index: usize, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let a = offset as usize;
        buf.copy_from_slice(&self.data[a..a + buf.len()]);
        Ok(())
    }
}

/// A one-tensor bf16 source `name` of `shape` with deterministic, varied values.
fn source(name: &str, shape: [u64; 2]) -> (Mem, Vec<f32>) {
    let n = (shape[0] * shape[1]) as usize;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let vals: Vec<f32> = (0..n)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            // bf16-exact values with a few outliers and zero stretches
            let v = if i % 100_003 < 64 {
                0.0
            } else {
                u * (1.0 + (i % 7) as f32)
            };
            f32::from_bits(v.to_bits() & 0xffff_0000)
        })
        .collect();
    let data: Vec<u8> = vals
        .iter()
        .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
        .collect();
    let tensors = vec![SourceTensor {
        name: name.into(),
        shape: shape.to_vec(),
        dtype: Dtype::BF16,
        stored: Stored::Safetensors(Dtype::BF16),
        source_bytes: data.len() as u64,
    }];
    let metadata = BTreeMap::new();
    (
        Mem {
            tensors,
            metadata,
            data,
        },
        vals,
    )
}

fn tensor<'a>(out: &'a [u8], name: &str) -> &'a [u8] {
    let n = u64::from_le_bytes(out[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&out[8..8 + n]).unwrap();
    let o = &h[name]["data_offsets"];
    let (a, b) = (
        o[0].as_u64().unwrap() as usize,
        o[1].as_u64().unwrap() as usize,
    );
    &out[8 + n + a..8 + n + b]
}

#[test]
fn four_bit_bytes_do_not_depend_on_windows_or_threads() {
    // 4_325_437 elements: more than one 4M-element window, odd, with a partial final block.
    let (src, vals) = source("blk.weight", [1_123, 3_851]);
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        let target = if qt == QuantType::Nf4 {
            Precision::Nf4
        } else {
            Precision::Fp4
        };
        let p = plan(&src, target, &Options::default()).unwrap();
        let mut out = Vec::new();
        convert(&src, &p, &BTreeMap::new(), &mut out, &mut |_, _| {}).unwrap();
        let mut codes = vec![0u8; vals.len().div_ceil(2)];
        let mut absmax = vec![0f32; vals.len().div_ceil(BLOCKSIZE)];
        quantize_4bit(&Quantizer4::new(qt), &vals, &mut codes, &mut absmax);
        assert!(
            tensor(&out, "blk.weight") == codes.as_slice(),
            "{qt:?} codes"
        );
        let am: Vec<u8> = absmax.iter().flat_map(|a| a.to_le_bytes()).collect();
        assert!(
            tensor(&out, "blk.weight.absmax") == am.as_slice(),
            "{qt:?} absmax"
        );
    }
}

#[test]
fn int8_bytes_do_not_depend_on_windows_or_threads() {
    let (src, vals) = source("lin.weight", [2_100, 2_011]);
    let p = plan(&src, Precision::Int8, &Options::default()).unwrap();
    let mut out = Vec::new();
    convert(&src, &p, &BTreeMap::new(), &mut out, &mut |_, _| {}).unwrap();
    // bf16 -> f16 -> f32 is what bnb quantizes; these values are f16-exact except tiny ones,
    // so round through f16 explicitly.
    let x16: Vec<f32> = vals
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect();
    let mut q = vec![0i8; vals.len()];
    let mut scb = vec![0f32; 2_100];
    quantize_int8_rows(&x16, 2_011, &mut q, &mut scb);
    let qb: Vec<u8> = q.iter().map(|&v| v as u8).collect();
    assert!(tensor(&out, "lin.weight") == qb.as_slice());
    let sb: Vec<u8> = scb.iter().flat_map(|a| a.to_le_bytes()).collect();
    assert!(tensor(&out, "lin.SCB") == sb.as_slice());
    assert_eq!(tensor(&out, "lin.weight_format"), [0u8]);
}

#[test]
fn dequantization_bytes_do_not_depend_on_windows_or_threads() {
    let dir = tempfile::tempdir().unwrap();
    for (name, shape, target) in [
        ("blk.weight", [1_123, 3_851], Precision::Nf4),
        ("lin.weight", [2_100, 2_011], Precision::Int8),
    ] {
        let (src, _) = source(name, shape);
        let p = plan(&src, target, &Options::default()).unwrap();
        let mut quantized = Vec::new();
        convert(&src, &p, &BTreeMap::new(), &mut quantized, &mut |_, _| {}).unwrap();
        let path = dir.path().join("q.safetensors");
        std::fs::write(&path, &quantized).unwrap();
        let q = tensorfile::open_safetensors(&path).unwrap();
        let back = bnb::plan_dequantize_file(&*q, Precision::Fp32).unwrap();
        let mut out = Vec::new();
        convert(&*q, &back, &BTreeMap::new(), &mut out, &mut |_, _| {}).unwrap();
        let n = (shape[0] * shape[1]) as usize;
        let f32s = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let mut want = vec![0f32; n];
        if target == Precision::Nf4 {
            let table = QuantType::Nf4.dequant_table(&shape);
            let absmax = f32s(tensor(&quantized, &format!("{name}.absmax")));
            let codes = tensor(&quantized, name);
            dequantize_4bit(&table, codes, &absmax, BLOCKSIZE, 0, &mut want);
        } else {
            let codes: Vec<i8> = tensor(&quantized, name).iter().map(|&b| b as i8).collect();
            let scb = f32s(tensor(&quantized, "lin.SCB"));
            dequantize_int8_rows(&codes, shape[1] as usize, &scb, &mut want);
        }
        let want: Vec<u8> = want.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert!(tensor(&out, name) == want.as_slice(), "{target}");
    }
}

/// Writes a safetensors file of (name, dtype, shape, bytes).
fn write_file(dir: &Path, tensors: &[(&str, Dtype, Vec<u64>, Vec<u8>)]) -> std::path::PathBuf {
    let specs: Vec<tensorfile::TensorSpec> = tensors
        .iter()
        .map(|(n, d, s, _)| tensorfile::TensorSpec {
            name: n.to_string(),
            dtype: *d,
            shape: s.clone(),
        })
        .collect();
    let path = dir.join("f.safetensors");
    let mut w = tensorfile::SafetensorsWriter::new(
        std::fs::File::create(&path).unwrap(),
        &specs,
        &BTreeMap::new(),
    )
    .unwrap();
    for (_, _, _, b) in tensors {
        w.write_chunk(b).unwrap();
    }
    w.finish().unwrap();
    path
}

#[test]
fn hostile_bitsandbytes_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let json = |shape: &str| {
        format!(
            r#"{{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": {shape}}}"#
        )
        .into_bytes()
    };
    let qmap = vec![0u8; 64];
    let good = |shape: &str, weight: usize, absmax: u64, extra: bool| {
        let j = json(shape);
        let mut v = vec![
            (
                "w.weight",
                Dtype::U8,
                vec![weight as u64, 1],
                vec![0x77u8; weight],
            ),
            (
                "w.weight.absmax",
                Dtype::F32,
                vec![absmax],
                vec![0u8; absmax as usize * 4],
            ),
            ("w.weight.quant_map", Dtype::F32, vec![16], qmap.clone()),
            (
                "w.weight.quant_state.bitsandbytes__nf4",
                Dtype::U8,
                vec![j.len() as u64],
                j,
            ),
        ];
        if extra {
            v.push(("w.weight.surprise", Dtype::U8, vec![1], vec![0]));
        }
        v
    };
    let open = |t: &[(&str, Dtype, Vec<u64>, Vec<u8>)]| {
        tensorfile::open_safetensors(&write_file(dir.path(), t)).unwrap()
    };
    // The well-formed file plans and converts.
    let ok = open(&good("[4, 64]", 128, 4, false));
    let p = bnb::plan_dequantize_file(&*ok, Precision::Bf16).unwrap();
    let mut out = Vec::new();
    bnb::convert(&*ok, &p, &BTreeMap::new(), &mut out, &mut |_, _| {}).unwrap();
    // A shape claiming far more elements than the packed bytes hold.
    for (bad, what) in [
        (good("[4000000, 4000000]", 128, 4, false), "packed codes"),
        (good("[4, 64]", 127, 4, false), "packed codes"),
        (good("[4, 64]", 128, 5, false), "absmax"),
        (good("[4, 64]", 128, 4, true), "unexpected key"),
        (good("[4, 64", 128, 4, false), "not valid JSON"),
    ] {
        let f = open(&bad);
        let e = bnb::plan_dequantize_file(&*f, Precision::Bf16)
            .unwrap_err()
            .to_string();
        assert!(e.contains(what), "{e}");
        assert!(e.starts_with(&f.path().display().to_string()), "{e}");
    }
    let mut missing = good("[4, 64]", 128, 4, false);
    missing.remove(1);
    let f = open(&missing);
    let e = bnb::plan_dequantize_file(&*f, Precision::Bf16)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("w.weight.absmax") && e.contains("missing"),
        "{e}"
    );
}

/// A writer that always fails, as a full disk does.
struct FullDisk;

impl std::io::Write for FullDisk {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("no space left"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A source whose reads fail with `fault`.
#[derive(Debug)]
struct Failing {
    inner: Mem,
    io: bool,
}

impl TensorSource for Failing {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn tensors(&self) -> &[SourceTensor] {
        self.inner.tensors()
    }
    fn metadata(&self) -> &BTreeMap<String, String> {
        self.inner.metadata()
    }
    fn read_raw(&self, _: usize, _: u64, _: &mut [u8]) -> Result<(), SourceError> {
        let path = self.path().to_owned();
        Err(if self.io {
            SourceError::Io {
                path,
                source: std::io::Error::other("bad sector"),
            }
        } else {
            SourceError::Changed { path }
        })
    }
}

#[test]
fn error_kinds_tell_input_faults_from_io_faults() {
    // Input: a target bnb does not make, a source that changed.
    let (src, _) = source("lin.weight", [4, 64]);
    let e = plan(&src, Precision::Fp8E4m3fn, &Options::default()).unwrap_err();
    assert!(e.is_input_fault(), "{e}");
    let changed = Failing {
        inner: source("lin.weight", [4, 64]).0,
        io: false,
    };
    let p = plan(&changed, Precision::Nf4, &Options::default()).unwrap();
    let e = convert(&changed, &p, &BTreeMap::new(), Vec::new(), &mut |_, _| {}).unwrap_err();
    assert!(e.is_input_fault(), "{e}");
    // I/O: reading the source, writing the output.
    let unreadable = Failing {
        inner: source("lin.weight", [4, 64]).0,
        io: true,
    };
    let e = convert(
        &unreadable,
        &p,
        &BTreeMap::new(),
        Vec::new(),
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(!e.is_input_fault(), "{e}");
    let p = plan(&src, Precision::Nf4, &Options::default()).unwrap();
    let e = convert(&src, &p, &BTreeMap::new(), FullDisk, &mut |_, _| {}).unwrap_err();
    assert!(!e.is_input_fault(), "{e}");
    assert!(e.to_string().contains("no space left"), "{e}");
}
