//! `convcache`: the command line.
fn main() {}
