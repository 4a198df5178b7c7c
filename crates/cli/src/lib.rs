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
//! - [`progress`]: progress on stderr: bars with ETA, or JSON-lines events.
//! - [`interrupt`]: Ctrl-C and SIGTERM stop a conversion cleanly.
//! - [`detect_cmd`], [`convert_cmd`], [`cache_cmds`], [`demo`]: one module per command family,
//!   turning library results into text or the JSON documented in `docs/cli.md`.

pub mod args;
pub mod cache_cmds;
pub mod convert_cmd;
pub mod demo;
pub mod detect_cmd;
pub mod interrupt;
pub mod output;
pub mod progress;
pub mod sample;
pub mod size;

use args::{Cli, Command};
use cache::{Cache, ModelsDir};
use output::{Exit, Failure, Ui};

/// Runs a parsed command line and returns its exit code. Errors have been printed.
pub fn run(cli: Cli) -> Exit {
    // A `ulimit -f` smaller than an output must fail the write (EFBIG, reported and cleaned up)
    // rather than kill the process with SIGXFSZ half-way.
    smart::ignore_file_size_signal();
    let ui = Ui {
        json: cli.json,
        quiet: cli.quiet,
    };
    match dispatch(&ui, &cli) {
        Ok(exit) => exit,
        Err(failure) => {
            ui.error(&failure);
            failure.exit
        }
    }
}

fn models_dir(cli: &Cli) -> Result<ModelsDir, Failure> {
    ModelsDir::resolve(cli.models_dir.as_deref()).map_err(Failure::input)
}

fn dispatch(ui: &Ui, cli: &Cli) -> Result<Exit, Failure> {
    match &cli.command {
        Command::Detect(a) => Ok(detect_cmd::run(ui, a)),
        Command::Demo => demo::run(ui),
        Command::Convert(a) => convert_cmd::run(ui, models_dir(cli)?, a),
        Command::Check(a) => cache_cmds::check(ui, models_dir(cli)?, a),
        Command::List(a) => cache_cmds::list(ui, &Cache::new(models_dir(cli)?), a),
        Command::Stats(a) => cache_cmds::stats(ui, &Cache::new(models_dir(cli)?), a),
        Command::Cleanup(a) => cache_cmds::cleanup(ui, &Cache::new(models_dir(cli)?), a),
    }
}
