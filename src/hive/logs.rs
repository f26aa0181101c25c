//! The node's logs as the queen reads them (`GET /v1/logs`): the last lines of the hive's log or
//! of a model's worker log, then, when following, each line written after; and rotation by
//! size, so that no log grows without bound on the node.

use std::io::Write;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A log is rotated once it passes this size; `ROTATED` older files are kept beside it
/// (`hive.log.1` is the newest).
pub(crate) const ROTATE_BYTES: u64 = 10 << 20;
/// The hive's setting for that size, in bytes, read from its environment when it starts
/// (`ROTATE_BYTES` when unset or unreadable): a test makes a log pass it in a few requests.
pub(crate) const ROTATE_ENV: &str = "RBEE_LOG_MAX_BYTES";
pub(crate) const ROTATED: u32 = 3;
/// The most lines one read returns before following.
pub(crate) const MAX_LINES: usize = 10_000;
/// How often a followed log is looked at for new lines.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// `worker-<model>.log`: each model's worker writes its stderr (llama.cpp's and its own lines)
/// there, so that its log can be read apart from the hive's.
pub(crate) fn worker_log_name(model: &str) -> String {
    format!("worker-{model}.log")
}

/// Shifts `path` to `path.1` (and older ones one up, the oldest dropped).
pub(crate) fn rotate(path: &Path) {
    let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
    for n in (1..ROTATED).rev() {
        let _ = std::fs::rename(numbered(n), numbered(n + 1));
    }
    let _ = std::fs::rename(path, numbered(1));
}

/// The size past which a log is rotated: `ROTATE_ENV`, else `ROTATE_BYTES`.
fn rotate_bytes() -> u64 {
    std::env::var(ROTATE_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|b| *b > 0)
        .unwrap_or(ROTATE_BYTES)
}

/// Rotates a log about to be handed to a new process when it has passed the size.
pub(crate) fn rotate_if_large(path: &Path) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > rotate_bytes()) {
        rotate(path);
    }
}

/// The hive's own log file: appended to, rotated when it passes its size (`rotate_bytes`).
pub(crate) struct RotatingLog {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
    limit: u64,
}

impl RotatingLog {
    pub(crate) fn open(path: &Path) -> std::io::Result<RotatingLog> {
        rotate_if_large(path);
        let file = append(path)?;
        let size = file.metadata().map_or(0, |m| m.len());
        Ok(RotatingLog {
            path: path.to_path_buf(),
            file,
            size,
            limit: rotate_bytes(),
        })
    }
}

fn append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

impl Write for RotatingLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.size > self.limit {
            rotate(&self.path);
            self.file = append(&self.path)?;
            self.size = 0;
        }
        let n = self.file.write(buf)?;
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// The last `n` lines of `text` (a last line without its newline counts).
fn last_lines(text: &str, n: usize) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| (*l).to_string())
        .collect()
}

/// Sends the last `n` lines of `path` (those of the newest rotated file first, when the log
/// was rotated since and holds fewer), then, with `follow`, every line written to it after,
/// until the reader goes away or `stop` is cancelled. A log rotated meanwhile is read anew
/// from its start.
pub(crate) async fn tail(
    path: PathBuf,
    n: usize,
    follow: bool,
    tx: mpsc::Sender<String>,
    stop: CancellationToken,
) {
    let text = tokio::fs::read(&path).await.unwrap_or_default();
    let mut offset = text.len() as u64;
    // A partial last line is held back while following, until its newline arrives.
    let (whole, mut partial) = match text.iter().rposition(|b| *b == b'\n') {
        Some(i) if follow => (&text[..=i], text[i + 1..].to_vec()),
        None if follow => (&text[..0], text.clone()),
        _ => (&text[..], Vec::new()),
    };
    let whole = String::from_utf8_lossy(whole);
    let held = whole.lines().count();
    if held < n {
        let older = tokio::fs::read(format!("{}.1", path.display()))
            .await
            .unwrap_or_default();
        for line in last_lines(&String::from_utf8_lossy(&older), n - held) {
            if tx.send(line).await.is_err() {
                return;
            }
        }
    }
    for line in last_lines(&whole, n) {
        if tx.send(line).await.is_err() {
            return;
        }
    }
    if !follow {
        return;
    }
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tx.closed() => return,
            () = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
        let len = tokio::fs::metadata(&path).await.map_or(0, |m| m.len());
        if len < offset {
            offset = 0;
            partial.clear();
        }
        if len == offset {
            continue;
        }
        let Ok(mut file) = tokio::fs::File::open(&path).await else {
            continue;
        };
        if file.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
            continue;
        }
        let mut fresh = Vec::new();
        let Ok(read) = file.read_to_end(&mut fresh).await else {
            continue;
        };
        offset += read as u64;
        partial.extend_from_slice(&fresh);
        while let Some(i) = partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = partial.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line[..i]).into_owned();
            if tx.send(line).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_last_lines_are_the_last_ones() {
        assert_eq!(super::last_lines("a\nb\nc\n", 2), vec!["b", "c"]);
        assert_eq!(super::last_lines("a\nb", 5), vec!["a", "b"]);
        assert!(super::last_lines("", 3).is_empty());
    }
}
