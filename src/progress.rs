//! Progress display for long steps: indicatif bars and spinners on a
//! terminal; on a pipe or log file they draw nothing, and the callers print
//! plain lines for the steps that matter instead.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Whether progress is drawn (stderr is a terminal).
pub fn on_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// A spinner with a message and the elapsed time.
pub struct Spinner(ProgressBar);

impl Spinner {
    /// Starts a spinner.
    pub fn new(msg: &str) -> Spinner {
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}") {
            bar.set_style(style);
        }
        bar.set_message(msg.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Spinner(bar)
    }

    /// Changes the message.
    pub fn set(&self, msg: String) {
        self.0.set_message(msg);
    }

    /// Removes the spinner.
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// A bar counting up to `total`.
pub fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "[{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} {what} ({{per_sec}}, eta {{eta}})"
    )) {
        bar.set_style(style);
    }
    bar
}
