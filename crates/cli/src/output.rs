//! Presentation: stdout for results (text or JSON), stderr for one-line errors, notes and
//! progress bars.

use std::fmt;
use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use serde_json::Value;

/// How a command ended, as an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Exit {
    /// 0: everything asked for was done.
    Ok = 0,
    /// 1: the operation failed (a conversion, or reading or cleaning the cache dirs).
    Failed = 1,
    /// 2: bad input (a source that cannot be read, is not a model or cannot become the
    /// target) or bad usage.
    BadInput = 2,
    /// 130: interrupted (Ctrl-C, SIGTERM, SIGHUP): the conversion stopped and nothing was
    /// published; its temporary is kept with its resume journal for the next run to continue
    /// (once a checkpoint was journaled), else removed.
    Interrupted = 130,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> ExitCode {
        ExitCode::from(self as u8)
    }
}

/// clap's rendering of a usage error as one line: `convcache: usage: PROBLEM (see --help)`.
/// clap writes the problem on its first lines (a list of missing arguments indented under
/// them), then a blank line, usage and a hint, which the line replaces.
pub fn usage_error_line(rendered: &str) -> String {
    let problem: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty())
        .collect();
    let problem = problem.join(" ");
    let problem = problem.strip_prefix("error: ").unwrap_or(&problem);
    format!("convcache: usage: {problem} (see convcache --help)")
}

/// An error to show as `convcache: PATH: problem` and the exit code it leads to.
#[derive(Debug)]
pub struct Failure {
    /// The exit code.
    pub exit: Exit,
    /// One line, normally `PATH: problem`.
    pub message: String,
}

impl Failure {
    /// A bad-input failure (exit 2).
    pub fn input(message: impl fmt::Display) -> Self {
        Failure {
            exit: Exit::BadInput,
            message: message.to_string(),
        }
    }

    /// A failed operation (exit 1).
    pub fn failed(message: impl fmt::Display) -> Self {
        Failure {
            exit: Exit::Failed,
            message: message.to_string(),
        }
    }
}

/// Every error is exactly one line on stderr, whatever a library put in its Display.
pub use smart::one_line;

/// Where and how results go.
#[derive(Debug, Clone, Copy)]
pub struct Ui {
    /// JSON on stdout instead of text.
    pub json: bool,
    /// No notes, no progress.
    pub quiet: bool,
}

impl Ui {
    /// Prints an error line on stderr.
    pub fn error(&self, failure: &Failure) {
        let _ = writeln!(
            io::stderr().lock(),
            "convcache: {}",
            one_line(&failure.message)
        );
    }

    /// Prints a note on stderr (text mode, not quiet).
    pub fn note(&self, text: impl fmt::Display) {
        if !self.json && !self.quiet {
            let _ = writeln!(io::stderr().lock(), "{text}");
        }
    }

    /// Whether progress bars are drawn: stderr is a terminal, and neither `--json` nor `-q`.
    pub fn progress_enabled(&self) -> bool {
        !self.json && !self.quiet && io::stderr().is_terminal()
    }

    /// Prints a JSON document on stdout.
    pub fn print_json(&self, value: &Value) {
        let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".to_owned());
        print_stdout(&format!("{text}\n"));
    }

    /// Prints text on stdout (text mode only).
    pub fn print(&self, text: impl fmt::Display) {
        if !self.json {
            print_stdout(&format!("{text}\n"));
        }
    }
}

/// Writes to stdout, ignoring a closed pipe (`convcache list | head` must not panic).
fn print_stdout(text: &str) {
    let mut out = io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_become_one_line() {
        assert_eq!(
            one_line("a.safetensors: bad\n  header\n"),
            "a.safetensors: bad; header"
        );
        assert_eq!(one_line("x: y"), "x: y");
    }

    #[test]
    fn exit_codes_are_the_documented_numbers() {
        assert_eq!(Exit::Ok as u8, 0);
        assert_eq!(Exit::Failed as u8, 1);
        assert_eq!(Exit::BadInput as u8, 2);
        assert_eq!(Exit::Interrupted as u8, 130);
    }

    #[test]
    fn usage_errors_are_one_line() {
        use clap::Parser;
        for (argv, expect) in [
            (&["convcache", "convert", "m"][..], "--to"),
            (&["convcache", "convert", "m", "--to", "fp9"], "fp9"),
            (&["convcache", "frobnicate"], "frobnicate"),
            (&["convcache", "cleanup", "--dry-run"], "--keep"),
        ] {
            let err = crate::args::Cli::try_parse_from(argv).unwrap_err();
            let line = usage_error_line(&err.to_string());
            assert!(!line.contains('\n'), "{line}");
            assert!(line.starts_with("convcache: usage: "), "{line}");
            assert!(line.contains(expect), "{argv:?}: {line}");
            assert!(!line.contains("usage: error:"), "{line}");
        }
    }
}
