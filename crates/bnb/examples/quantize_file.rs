//! Quantizes (or dequantizes) one safetensors file, for manual checks with bitsandbytes
//! (`tests/golden/check_loadable.py`).
//!
//! `cargo run -p bnb --example quantize_file -- IN OUT nf4|fp4|int8|fp16|bf16|fp32 [--double-quant]`
//! (fp16/bf16/fp32 dequantize a bitsandbytes file.)

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::PathBuf;
use std::process::ExitCode;

use detect::Precision;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: quantize_file IN OUT nf4|fp4|int8|fp16|bf16|fp32 [--double-quant]");
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<String, Box<dyn std::error::Error>> {
    let (input, output) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let target: Precision = args[2].parse()?;
    let options = bnb::Options {
        double_quant: args.iter().any(|a| a == "--double-quant"),
    };
    let src = tensorfile::open_safetensors(&input)?;
    let plan = if target.is_bitsandbytes() {
        let mut plan = bnb::plan(&*src, target, &options)?;
        bnb::resolve_nested_offsets(&*src, &mut plan)?;
        plan
    } else {
        bnb::plan_dequantize_file(&*src, target)?
    };
    let out = BufWriter::new(std::fs::File::create(&output)?);
    let report = bnb::convert(&*src, &plan, &BTreeMap::new(), out, &mut |_, _| {})?;
    Ok(serde_json::to_string_pretty(&report)?)
}
