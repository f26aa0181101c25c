//! What commands print: results on stdout (a table, or JSON with `--json`), everything else on
//! stderr, nothing on stderr under `-q` but errors.

use std::io::Write;

use serde::Serialize;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    pub(crate) json: bool,
    pub(crate) quiet: bool,
}

impl Output {
    /// A progress or status note for a person.
    pub(crate) fn note(&self, message: impl std::fmt::Display) {
        if !self.quiet {
            eprintln!("{message}");
        }
    }

    /// One JSON value on one line of stdout; a failure to write it is kept for the command's
    /// exit (`unwritten`).
    pub(crate) fn json_line(&self, value: &impl Serialize) {
        keep(self.try_json_line(value));
    }

    /// One JSON value on one line of stdout, saying whether it could be written (a
    /// `BrokenPipe` means its reader has gone: the command then ends quietly, as ripgrep does).
    pub(crate) fn try_json_line(&self, value: &impl Serialize) -> std::io::Result<()> {
        let line = serde_json::to_string(value).map_err(std::io::Error::other)?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()
    }

    /// The result of a command: JSON with `--json`, else the text.
    pub(crate) fn result(&self, value: &impl Serialize, text: impl FnOnce() -> String) {
        if self.json {
            self.json_line(value);
        } else {
            let text = text();
            let mut out = std::io::stdout().lock();
            let newline = !text.is_empty() && !text.ends_with('\n');
            keep(
                write!(out, "{text}")
                    .and_then(|()| if newline { writeln!(out) } else { Ok(()) })
                    .and_then(|()| out.flush()),
            );
        }
    }
}

/// The first failure to write a result on stdout (other than its reader going away), which
/// turns the command's success into that error: a list redirected to a full disk must not
/// exit 0 with nothing written.
static UNWRITTEN: std::sync::Mutex<Option<std::io::Error>> = std::sync::Mutex::new(None);

fn keep(result: std::io::Result<()>) {
    if let Err(e) = result
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        let mut unwritten = UNWRITTEN.lock().unwrap_or_else(|p| p.into_inner());
        unwritten.get_or_insert(e);
    }
}

/// The failure `Output` kept, if a result could not be written.
pub(crate) fn unwritten() -> Option<crate::error::Error> {
    let mut unwritten = UNWRITTEN.lock().unwrap_or_else(|p| p.into_inner());
    unwritten
        .take()
        .map(|e| crate::error::IoError::doing("write the result to stdout", e).into())
}

/// What a failed write of a command's output on stdout means: its reader has gone
/// (`| head`), which ends the command quietly with success, as `infer` does (the reader had
/// what it wanted), or a real failure (a full disk), which is the command's error.
pub(crate) fn ended_by(e: std::io::Error) -> crate::error::Result<()> {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(crate::error::IoError::doing("write to stdout", e).into())
    }
}

/// Resolves once stdout's reader has gone (the read end of its pipe is closed), which a command
/// that prints nothing for a while (waiting in a queue, prefilling) would otherwise learn only
/// at its next write. Never resolves for a stdout that cannot go away that way (a regular file,
/// `/dev/null`).
pub(crate) async fn stdout_closed() {
    match tokio::task::spawn_blocking(wait_stdout_closed).await {
        Ok(true) => {}
        _ => std::future::pending().await,
    }
}

/// Blocks until stdout reports an error or a hang-up: a pipe's write end does once no reader is
/// left, a socket once its peer is gone. Polling for no event at all reports only those; a file
/// that is always writable reports nothing. `false` when stdout cannot be polled.
fn wait_stdout_closed() -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let stdout = std::io::stdout();
    loop {
        let mut fds = [PollFd::new(stdout.as_fd(), PollFlags::empty())];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {
                let revents = fds[0].revents().unwrap_or_else(PollFlags::empty);
                if revents.intersects(PollFlags::POLLNVAL) {
                    return false;
                }
                if revents.intersects(PollFlags::POLLERR | PollFlags::POLLHUP) {
                    return true;
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return false,
        }
    }
}

/// Left-aligned columns separated by two spaces.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                s.push_str(cell);
                s.push_str(&" ".repeat(pad + 2));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let t = table(
            &["NODE", "STATE"],
            &[
                vec!["local".into(), "running".into()],
                vec!["gpu-lab-1".into(), "stopped".into()],
            ],
        );
        assert_eq!(
            t,
            "NODE       STATE\nlocal      running\ngpu-lab-1  stopped\n"
        );
    }
}
