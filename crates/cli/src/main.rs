//! `convcache`: parse the command line, run it, exit with its code (0 ok, 1 a conversion
//! failed, 2 bad input or usage, 130 interrupted).

use clap::Parser;
use clap::error::ErrorKind;

fn main() -> std::process::ExitCode {
    match cli::args::Cli::try_parse() {
        Ok(parsed) => cli::run(parsed).code(),
        // Help and version go to stdout as clap writes them; so does the help shown for a
        // bare `convcache`.
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            eprintln!("{}", cli::output::usage_error_line(&e.to_string()));
            cli::output::Exit::BadInput.code()
        }
    }
}
