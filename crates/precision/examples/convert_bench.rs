//! Rough throughput check of the converter (not a test; `cargo xtask bench` is the benchmark).
//!
//! `cargo run --release -p precision --example convert_bench -- DIR [MIB]` writes a flux-like
//! F32 model of MIB MiB (default 512) into DIR, then converts it to each target and copies the
//! output once with `std::fs::copy` for comparison, printing seconds and GB/s.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::PathBuf;
use std::time::Instant;

use detect::Precision;
use precision::{convert, plan};
use tensorfile::safetensors::{Dtype, SafetensorsFile};
use tensorfile::{SafetensorsWriter, TensorSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: convert_bench DIR [MIB]")?);
    let mib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(512);
    let src_path = dir.join("bench_src.safetensors");
    // 3072 x 3072 f32 weights (36 MiB each) plus a bias per weight.
    let per = 3072u64 * 3072 * 4;
    let count = (mib << 20).div_ceil(per);
    let mut specs = Vec::new();
    for i in 0..count {
        specs.push(TensorSpec {
            name: format!("blocks.{i}.weight"),
            dtype: Dtype::F32,
            shape: vec![3072, 3072],
        });
        specs.push(TensorSpec {
            name: format!("blocks.{i}.bias"),
            dtype: Dtype::F32,
            shape: vec![3072],
        });
    }
    let mut w = SafetensorsWriter::new(
        BufWriter::new(std::fs::File::create(&src_path)?),
        &specs,
        &BTreeMap::new(),
    )?;
    let mut x = 0x1234_5678u32;
    for s in &specs {
        let n = s.shape.iter().product::<u64>() as usize;
        let data: Vec<u8> = (0..n)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                ((x as f32 / u32::MAX as f32 - 0.5) * 0.1).to_le_bytes()
            })
            .collect();
        w.write_chunk(&data)?;
    }
    w.finish()?;
    let src = SafetensorsFile::open(&src_path)?;
    let out_path = dir.join("bench_out.safetensors");
    for target in [
        Precision::Bf16,
        Precision::Fp16,
        Precision::Fp8E4m3fn,
        Precision::Fp8E5m2,
        Precision::Fp32,
    ] {
        let p = plan(&src, target)?;
        let start = Instant::now();
        convert(&src, &p, &BTreeMap::new(), std::io::sink(), &mut |_, _| {})?;
        let sink = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let out = std::fs::File::create(&out_path)?;
        convert(&src, &p, &BTreeMap::new(), out, &mut |_, _| {})?;
        let conv = start.elapsed().as_secs_f64();
        let start = Instant::now();
        std::fs::copy(&out_path, dir.join("bench_copy.safetensors"))?;
        let copy = start.elapsed().as_secs_f64();
        println!(
            "{target:>10}: convert {conv:.3} s ({:.2} GB/s of source; {sink:.3} s to a sink), \
             copy of the output {copy:.3} s, ratio {:.2}",
            p.bytes_in as f64 / conv / 1e9,
            conv / copy
        );
    }
    for f in ["bench_src", "bench_out", "bench_copy"] {
        std::fs::remove_file(dir.join(format!("{f}.safetensors")))?;
    }
    Ok(())
}
