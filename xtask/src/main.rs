//! `cargo xtask <task>`: project tasks that are not part of the product.
//!
//! - `fixtures`: deterministic small test models in `fixtures/` (committed), `--check` compares
//!   them with a fresh run, `--large` writes benchmark-size models into `target/bench-models/`.
//! - `fuzz`: runs the `cargo fuzz` targets of `fuzz/` for a while each.
//! - `bench`: times convcache against the Python tools people use, and writes BENCHMARKS.md.

mod adversarial;
mod bench;
mod fixtures;
mod fuzz;
mod layouts;
mod rng;
mod torture;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Result type of the tasks: they report and exit, so any error will do.
pub type DynResult<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "convcache project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Write the deterministic test models (byte-identical on every run and machine).
    Fixtures {
        /// Output directory (default: `fixtures/` at the repository root).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Regenerate into a temporary directory and fail if anything differs from `--out`.
        #[arg(long)]
        check: bool,
        /// Write the benchmark-size models into `target/bench-models/` instead.
        #[arg(long)]
        large: bool,
        /// With `--large`: rewrite even when a file of the right size exists.
        #[arg(long)]
        force: bool,
    },
    /// Run the cargo-fuzz targets (installs cargo-fuzz if missing). Not part of CI.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (default: every `[[bin]]` of fuzz/Cargo.toml).
        targets: Vec<String>,
    },
    /// Benchmark convcache against the Python peers and write BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Fault injection against the built convcache (kills, races, disk full, corruption).
    Torture(torture::TortureArgs),
}

/// The repository root (xtask lives one level below it).
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn run(cli: Cli) -> DynResult<ExitCode> {
    match cli.task {
        Task::Fixtures {
            out,
            check,
            large,
            force,
        } => {
            if large {
                for p in fixtures::write_large(&repo_root().join("target/bench-models"), force)? {
                    println!("{}", p.display());
                }
                return Ok(ExitCode::SUCCESS);
            }
            let out = out.unwrap_or_else(|| repo_root().join("fixtures"));
            if check {
                let differing = fixtures::check(&out)?;
                if differing.is_empty() {
                    println!("fixtures up to date: {}", out.display());
                    return Ok(ExitCode::SUCCESS);
                }
                eprintln!(
                    "fixtures differ from a fresh `cargo xtask fixtures` in {}:",
                    out.display()
                );
                for f in &differing {
                    eprintln!("  {f}");
                }
                return Ok(ExitCode::FAILURE);
            }
            let written = fixtures::write_small(&out)?;
            println!("wrote {} files into {}", written.len(), out.display());
            Ok(ExitCode::SUCCESS)
        }
        Task::Fuzz { seconds, targets } => fuzz::run(seconds, &targets),
        Task::Bench(args) => bench::run(&args),
        Task::Torture(args) => torture::run(&args),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
