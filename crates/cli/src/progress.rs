//! Progress bars on stderr, with ETA, for a conversion.

use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One conversion's progress bar; hidden when progress is disabled.
#[derive(Debug)]
pub struct Bar {
    bar: ProgressBar,
    /// The phase shown; a new phase restarts the count and the ETA.
    phase: Mutex<&'static str>,
}

impl Bar {
    /// A bar labelled `label` (e.g. `flux.safetensors -> bf16`), drawn only if `enabled`.
    pub fn new(label: String, enabled: bool) -> Bar {
        let bar = if enabled {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{msg} {prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        } else {
            ProgressBar::hidden()
        };
        bar.set_message(label);
        Bar {
            bar,
            phase: Mutex::new(""),
        }
    }

    /// Updates the counts in `phase`: bytes and tensors done, of their totals.
    pub fn update(
        &self,
        phase: &'static str,
        bytes_done: u64,
        bytes_total: u64,
        tensors_done: u64,
        tensors_total: u64,
    ) {
        if self.bar.is_hidden() {
            return;
        }
        // A poisoned lock only means another progress call panicked; the phase is still usable.
        let mut current = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        if *current != phase {
            *current = phase;
            self.bar.reset();
        }
        self.bar.set_length(bytes_total);
        self.bar.set_position(bytes_done);
        self.bar.set_prefix(if tensors_total > 0 {
            format!("{phase} {tensors_done}/{tensors_total} tensors")
        } else {
            phase.to_owned()
        });
    }

    /// Removes the bar from the terminal.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
