//! Fuzzes the command line: the `--max-size` parser on arbitrary text, and clap's parsing of
//! arbitrary argv (NUL-separated arguments after `convcache`). Neither may panic; an accepted
//! size must print back to the same byte count.
#![no_main]

use clap::Parser;
use cli::args::Cli;
use cli::size::{human_bytes, parse_size};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(n) = parse_size(&text) {
        assert_eq!(parse_size(&n.to_string()), Ok(n));
        assert!(!human_bytes(n).is_empty());
    }
    let mut argv = vec![std::ffi::OsString::from("convcache")];
    argv.extend(
        data.split(|b| *b == 0)
            .take(64)
            .map(|a| std::ffi::OsString::from(String::from_utf8_lossy(a).into_owned())),
    );
    match Cli::try_parse_from(argv) {
        Ok(cli) => {
            // Every accepted command line renders for debugging without panicking.
            let _ = format!("{cli:?}");
        }
        Err(e) => {
            let _ = e.render().to_string();
        }
    }
});
