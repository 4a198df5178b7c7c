//! Single-threaded quantization throughput, for comparison with ggml's reference quantizer
//! (`tests/golden/quant/bench_ggml.py` times `ggml_quantize_chunk` on the same shape).
//!
//! ```text
//! cargo run --release -p gguf --example quant_bench -- TYPE N_ROWS [--scalar] [--row-len N] [--runs R]
//! ```
//! Rows are 4096 values by default, filled with approximately N(0, 0.02) values from the
//! tests' xorshift32 generator. Prints the best of R runs (default 5) in MB/s of f32 input;
//! best-of rather than mean because the benchmark machine may be shared.

use std::process::ExitCode;
use std::time::Instant;

use gguf::GgmlType;
use gguf::quant::{quantize, quantize_scalar};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: quant_bench TYPE N_ROWS [--scalar] [--row-len N] [--runs R]";
    let (Some(ty), Some(rows)) = (args.first(), args.get(1)) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let Ok(ty) = ty.parse::<GgmlType>() else {
        eprintln!("unknown type {ty}\n{usage}");
        return ExitCode::from(2);
    };
    let Ok(rows) = rows.parse::<usize>() else {
        eprintln!("bad row count {rows}\n{usage}");
        return ExitCode::from(2);
    };
    let scalar = args.iter().any(|a| a == "--scalar");
    let row_len = args
        .iter()
        .position(|a| a == "--row-len")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(4096);
    let n = rows * row_len;
    let Some(bytes) = ty.bytes_for(n as u64) else {
        eprintln!("{n} values is not a whole number of {ty} blocks");
        return ExitCode::from(2);
    };

    let mut s = 0x1234_5678u32;
    let x: Vec<f32> = (0..n)
        .map(|_| {
            let mut k = 0i64;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                k += (s >> 8) as i64;
            }
            (k - (1 << 25)) as f32 * (1.0 / 16_777_216.0) * 0.02
        })
        .collect();
    let mut out = vec![0u8; bytes as usize];

    let pool = match rayon::ThreadPoolBuilder::new().num_threads(1).build() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("thread pool: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(5);
    let mut best = f64::INFINITY;
    let mut best_cpu = f64::INFINITY;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let r = pool.install(|| {
            // The pool's single worker runs the whole call, so its thread CPU time is the
            // kernel's CPU time even when the machine is shared.
            let c0 = thread_cpu_seconds();
            let r = if scalar {
                quantize_scalar(ty, &x, &mut out)
            } else {
                quantize(ty, &x, &mut out)
            };
            r.map(|()| thread_cpu_seconds().zip(c0).map(|(b, a)| b - a))
        });
        match r {
            Ok(cpu) => {
                best = best.min(t.elapsed().as_secs_f64());
                if let Some(c) = cpu {
                    best_cpu = best_cpu.min(c);
                }
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mb_s = (n * 4) as f64 / best / 1e6;
    let cpu = if best_cpu.is_finite() {
        format!(
            "; thread CPU {:.4} s, {:.1} MB/s",
            best_cpu,
            (n * 4) as f64 / best_cpu / 1e6
        )
    } else {
        String::new()
    };
    println!(
        "convcache {ty} {} rows={rows} row_len={row_len}: wall {:.4} s, {:.1} Mvalues/s, {:.1} MB/s{cpu}",
        if scalar { "scalar" } else { "dispatched" },
        best,
        n as f64 / best / 1e6,
        mb_s
    );
    ExitCode::SUCCESS
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`), or `None` if unavailable.
fn thread_cpu_seconds() -> Option<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9)
}
