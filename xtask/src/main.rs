//! `cargo xtask <task>`. (Filled by the fixtures work.)
fn main() {}
