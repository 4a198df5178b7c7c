//! The `convcache` command line: argument parsing and presentation over the library crates.
//!
//! The binary (`src/main.rs`) only parses and calls [`run`]; every decision about models, the
//! cache and conversions lives in `detect`, `cache` and `smart`. This library part exists so the
//! end-to-end tests can build the same sample model `convcache demo` uses.
//!
//! - [`args`]: the clap definition (commands, flags).
//! - [`size`]: the strict `--max-size` parser (`20G`, `512MiB`, `1.5GB`).
//! - [`sample`]: the deterministic flux-like sample model.
//! - [`output`]: exit codes, one-line errors, JSON and text on stdout.
//! - [`progress`]: progress bars with ETA on stderr.

pub mod args;
pub mod output;
pub mod progress;
pub mod sample;
pub mod size;

use output::{Exit, Failure, Ui};

/// Runs a parsed command line and returns its exit code.
pub fn run(cli: args::Cli) -> Exit {
    let ui = Ui {
        json: cli.json,
        quiet: cli.quiet,
    };
    ui.error(&Failure::failed(
        "this command is not available in this build yet",
    ));
    Exit::Failed
}
