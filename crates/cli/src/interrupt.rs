//! Ctrl-C (SIGINT), SIGTERM and SIGHUP while converting.
//!
//! The first signal sets the flag `smart` checks ([`smart::Options::cancel`]): the running
//! conversion, hashing pass or lock wait stops soon after, nothing is published (the temporary
//! is kept with its resume journal for the next run to continue, or removed when no checkpoint
//! was journaled yet), and the command exits with [`crate::output::Exit::Interrupted`]. A second
//! signal exits at once (the next run resumes or removes what is left). Commands that write no
//! temporary keep the default handling: the signal ends them.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// Exit status of a second signal, which exits without cleaning up (128 + SIGINT, the shell's
/// convention for an interrupted command).
const SECOND_SIGNAL_EXIT: i32 = 130;

/// Installs the handlers and returns the flag they set. A signal whose handler could not be
/// installed keeps its default action (the next run removes what an interrupted conversion
/// left); the flag is returned whenever any handler sets it, so that it is always read.
pub fn install() -> Option<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let mut any = false;
    for signal in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        // In this order: the conditional exit acts on the second signal only, since the flag is
        // set after it runs for the first.
        let exits = signal_hook::flag::register_conditional_shutdown(
            signal,
            SECOND_SIGNAL_EXIT,
            flag.clone(),
        );
        if exits.is_ok() && signal_hook::flag::register(signal, flag.clone()).is_ok() {
            any = true;
        }
    }
    any.then_some(flag)
}

/// Whether an interrupt arrived (the flag [`install`] returned is set).
pub fn arrived(flag: Option<&AtomicBool>) -> bool {
    flag.is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
}
