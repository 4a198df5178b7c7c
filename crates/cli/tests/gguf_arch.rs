//! The cache identity of a GGUF output records the architecture that was used, so `check` and
//! `convert` agree with or without `--arch` when it names the detected architecture.

mod common;

use cli::sample::SampleSpec;
use common::{Scratch, only};

/// The `status` of the one row of a `--json` `convert` or `check`.
fn status(s: &Scratch, args: &[&str]) -> String {
    let mut argv = vec!["--json"];
    argv.extend_from_slice(args);
    let v = s.run(&argv).ok().json();
    only(&v)["status"].as_str().expect("a status").to_owned()
}

#[test]
fn forcing_the_detected_arch_makes_the_same_output_as_detecting_it() {
    let s = Scratch::new();
    let src = s.source("flux_sample.safetensors", SampleSpec::DEMO);
    let src = src.arg();
    let to = ["--to", "Q8_0"];
    let convert = |extra: &[&str]| status(&s, &[&["convert", src][..], &to, extra].concat());
    let check = |extra: &[&str]| status(&s, &[&["check", src][..], &to, extra].concat());

    assert_eq!(convert(&["--arch", "flux"]), "converted");
    assert_eq!(check(&[]), "hit");
    assert_eq!(check(&["--arch", "flux"]), "hit");
    assert_eq!(convert(&[]), "cached");
    // An architecture other than the detected one is a different output.
    assert_eq!(check(&["--arch", "sd3"]), "stale");
}
