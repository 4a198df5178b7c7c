//! `convcache`: parse the command line, run it, exit with its code (0 ok, 1 a conversion
//! failed, 2 bad input or usage; clap exits 2 on usage errors itself).

use clap::Parser;

fn main() -> std::process::ExitCode {
    cli::run(cli::args::Cli::parse()).code()
}
