//! Progress on stderr for a person at a terminal: byte bars for uploads and spinners for waits,
//! all under one `MultiProgress`; nothing under `-q` or `--json`, or when stderr is no terminal.

use std::borrow::Cow;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::output::Output;

const TICK: Duration = Duration::from_millis(100);

/// Where one invocation's bars and spinners go; clones share the same lines. Every bar clears
/// its line when dropped, so what is left on the terminal is what the command printed.
#[derive(Clone)]
pub(crate) struct Progress {
    multi: MultiProgress,
}

/// Whether progress may be drawn: stderr is a terminal and neither `-q` nor `--json` was given.
pub(crate) fn allowed(out: Output, stderr_is_terminal: bool) -> bool {
    stderr_is_terminal && !out.quiet && !out.json
}

impl Progress {
    pub(crate) fn new(out: Output) -> Progress {
        Progress::drawn(allowed(out, std::io::stderr().is_terminal()))
    }

    /// Draws nothing: for work whose own bar already tells the story (each item of a batch).
    pub(crate) fn hidden() -> Progress {
        Progress::drawn(false)
    }

    /// A bar over `total` items, with a message the caller keeps current.
    pub(crate) fn items(&self, total: u64) -> ProgressBar {
        let style = ProgressStyle::with_template(
            "[{bar:30}] {pos}/{len} done, {msg} ({elapsed}, ETA {eta})",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = self.multi.add(ProgressBar::new(total).with_style(style));
        if !self.multi.is_hidden() {
            bar.enable_steady_tick(TICK);
        }
        bar
    }

    fn drawn(visible: bool) -> Progress {
        let target = if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Progress {
            multi: MultiProgress::with_draw_target(target),
        }
    }

    /// A bar over `total` bytes, named `label`, for the caller to advance.
    pub(crate) fn bytes(&self, label: &str, total: u64) -> ProgressBar {
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        self.multi.add(
            ProgressBar::new(total)
                .with_style(style)
                .with_message(label.to_string()),
        )
    }

    /// A spinner saying `message` for as long as it lives.
    pub(crate) fn spinner(&self, message: impl Into<Cow<'static, str>>) -> ProgressBar {
        let style = ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let spinner = self.multi.add(
            ProgressBar::new_spinner()
                .with_style(style)
                .with_message(message),
        );
        if !self.multi.is_hidden() {
            spinner.enable_steady_tick(TICK);
        }
        spinner
    }

    /// Runs `f`, which writes to stderr, with the bars out of its way.
    pub(crate) fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.multi.suspend(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_person_at_a_terminal_sees_progress() {
        let out = |json, quiet| Output { json, quiet };
        assert!(allowed(out(false, false), true));
        assert!(!allowed(out(false, false), false), "a pipe");
        assert!(!allowed(out(false, true), true), "-q");
        assert!(!allowed(out(true, false), true), "--json");
    }

    #[test]
    fn hidden_progress_hands_out_hidden_bars_that_still_count() {
        let progress = Progress::drawn(false);
        let bar = progress.bytes("rbee to a", 10);
        bar.inc(4);
        assert!(bar.is_hidden());
        assert_eq!(bar.position(), 4);
        assert!(progress.spinner("waiting").is_hidden());
        assert_eq!(progress.suspend(|| 7), 7);
    }
}
