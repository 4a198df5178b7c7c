//! Rough in-memory throughput of `cast_slice` per dtype pair, single thread (not a test).

use std::time::Instant;

use tensorfile::cast_slice;
use tensorfile::safetensors::Dtype;

fn main() {
    let n = 16 << 20;
    let src: Vec<u8> = (0..n as u32)
        .flat_map(|i| ((i as f32).sin() * 0.1).to_le_bytes())
        .collect();
    for dst in [
        Dtype::BF16,
        Dtype::F16,
        Dtype::F8E4M3,
        Dtype::F8E5M2,
        Dtype::F64,
    ] {
        let mut out = vec![0u8; n * (dst.bits() / 8) as usize];
        let start = Instant::now();
        for _ in 0..3 {
            cast_slice(Dtype::F32, &src, dst, &mut out).ok();
        }
        let s = start.elapsed().as_secs_f64() / 3.0;
        println!(
            "F32 -> {dst}: {:.2} GB/s of source",
            src.len() as f64 / s / 1e9
        );
    }
}
