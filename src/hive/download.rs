//! Downloading a model's file on the node, from the URL its `source` names: into `<path>.part`
//! (resumed with a range request after an interruption), one transfer per file at a time (a
//! lock beside the partial file), free disk checked before the bytes come, retried with backoff
//! when the connection stalls or breaks, and moved into place only once its SHA-256 matches.
//! Progress goes out as events while it runs.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::error::{Error, IoContext, Result};
use crate::protocol::pull::{PullProgress, Pulled};
use crate::protocol::sse::SseEvent;

/// The node's Hugging Face token for gated repositories, in `remote_dir`, mode 0600.
pub(crate) const TOKEN_FILE: &str = "hf-token";
/// A connection that sends nothing for this long is stalled: dropped and resumed.
const STALL: Duration = Duration::from_secs(30);
/// The hive's setting for the stall limit (a duration: `30s`, `500ms`), read from its
/// environment when a download starts; `STALL` when unset or unreadable. The retries' backoff
/// follows it: from a thirtieth of the limit (at most 1 s) up to the limit itself.
pub(crate) const STALL_ENV: &str = "RBEE_DOWNLOAD_STALL";
const CONNECT: Duration = Duration::from_secs(30);
/// Tries after the first, each resuming where the last one stopped.
const RETRIES: usize = 5;
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How often a transfer waiting for another one's lock looks again.
const LOCK_POLL: Duration = Duration::from_millis(200);

/// What to fetch, where to, and what it must hash to.
pub(crate) struct Download {
    pub(crate) model: String,
    pub(crate) path: PathBuf,
    pub(crate) sha256: String,
    pub(crate) url: String,
    /// Sent as a bearer token; reqwest drops it when a redirect leaves the host.
    pub(crate) token: Option<String>,
}

/// `<path>.part`: where a transfer (a download, or a push over SSH) writes until it verifies.
pub(crate) fn part_path(path: &Path) -> PathBuf {
    suffixed(path, ".part")
}

/// `<path>.part.lock`: held (flock) by the one transfer that writes `<path>.part`.
pub(crate) fn lock_path(path: &Path) -> PathBuf {
    suffixed(path, ".part.lock")
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// A URL as it may be shown: without its query, which may carry a signature.
pub(crate) fn shown(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

/// The node's Hugging Face token, when it has one. A token file that others may read is
/// refused rather than used.
pub(crate) fn read_token(dir: &Path) -> Result<Option<String>> {
    let path = dir.join(TOKEN_FILE);
    let meta = match std::fs::metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).at("read", &path).map_err(Error::from),
    };
    if meta.mode() & 0o077 != 0 {
        return Err(Error::config(format!(
            "the token file `{}` may be read by others (mode {:o}); `chmod 600` it",
            path.display(),
            meta.mode() & 0o777
        )));
    }
    let token = std::fs::read_to_string(&path).at("read", &path)?;
    let token = token.trim();
    Ok((!token.is_empty()).then(|| token.to_string()))
}

/// Fetches `dl` unless its file is already there and verified; `events` gets `waiting`,
/// `progress` and `retrying` events meanwhile. A client that stops listening (the channel
/// closes) ends the transfer, keeping the partial file for the next pull.
pub(crate) async fn run(dl: Download, events: &mpsc::Sender<SseEvent>) -> Result<Pulled> {
    if let Some(present) = present(&dl).await? {
        return Ok(present);
    }
    let dir = dl
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    tokio::fs::create_dir_all(&dir).await.at("create", &dir)?;
    let _lock = lock(&dl, events).await?;
    // The transfer that held the lock may have put the file in place meanwhile.
    if let Some(present) = present(&dl).await? {
        return Ok(present);
    }
    let part = part_path(&dl.path);
    let resumed_from = part_len(&part).await;
    let stall = stall_limit();
    let client = reqwest::Client::builder()
        .connect_timeout(CONNECT)
        .read_timeout(stall)
        .user_agent(concat!("rbee/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::internal(format!("http client: {e}")))?;
    let mut delays = ExponentialBuilder::default()
        .with_min_delay((stall / 30).min(Duration::from_secs(1)))
        .with_max_delay(stall)
        .with_jitter()
        .with_max_times(RETRIES)
        .build();
    let mut fetched = 0;
    let mut started_over = false;
    loop {
        match attempt(&client, stall, &dl, &part, &dir, events, &mut fetched).await {
            Ok(over) => {
                started_over |= over;
                break;
            }
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Transient(why)) => {
                let Some(delay) = delays.next() else {
                    return Err(Error::worker(format!(
                        "downloading `{}` from {} failed after {RETRIES} retries, the last: \
                         {why}; the partial file is kept: pull again to resume it",
                        dl.model,
                        shown(&dl.url),
                    )));
                };
                tracing::warn!(model = %dl.model, "download interrupted ({why}); retrying in {delay:?}");
                let retry = serde_json::json!({
                    "reason": why,
                    "in_ms": u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                });
                if events
                    .send(SseEvent::json("retrying", &retry))
                    .await
                    .is_err()
                {
                    return Err(abandoned(&dl));
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
    let sha = hash(&part).await?;
    if !sha.eq_ignore_ascii_case(&dl.sha256) {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(Error::worker(format!(
            "the file downloaded for `{}` from {} has sha256 {sha}, but the configuration \
             expects {}; it was refused and removed (check the model's `source` and `sha256`)",
            dl.model,
            shown(&dl.url),
            dl.sha256
        )));
    }
    tokio::fs::rename(&part, &dl.path)
        .await
        .at("move into place", &dl.path)?;
    let bytes = part_len(&dl.path).await;
    let resumed = resumed_from > 0 && !started_over;
    Ok(Pulled {
        model: dl.model,
        action: if resumed { "resumed" } else { "downloaded" }.to_string(),
        bytes,
        fetched,
        resumed_from: if resumed { resumed_from } else { 0 },
        sha256: sha,
    })
}

/// Why one try ended early: worth another try (the connection broke or stalled, the server
/// was busy), or not (the server refused, the disk is full).
enum Failure {
    Transient(String),
    Fatal(Error),
}

/// One request, resuming `part` from its length; `Ok(true)` when the server sent the whole file
/// again (so the partial file started over).
async fn attempt(
    client: &reqwest::Client,
    stall: Duration,
    dl: &Download,
    part: &Path,
    dir: &Path,
    events: &mpsc::Sender<SseEvent>,
    fetched: &mut u64,
) -> std::result::Result<bool, Failure> {
    use reqwest::StatusCode;
    let have = part_len(part).await;
    let mut request = client.get(&dl.url);
    if have > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    if let Some(token) = &dl.token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|e| broke(&e, stall))?;
    let status = response.status();
    let length = response.content_length();
    let (append, total) = match status {
        StatusCode::PARTIAL_CONTENT => {
            let range = response
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|h| h.to_str().ok())
                .and_then(content_range);
            match range {
                Some((start, total)) if start == have => (true, total.or(length.map(|l| have + l))),
                _ => {
                    // Not the range asked for: start over rather than write bytes out of place.
                    let _ = tokio::fs::remove_file(part).await;
                    return Err(Failure::Transient(
                        "the server answered another range than asked; starting over".into(),
                    ));
                }
            }
        }
        StatusCode::OK => (false, length),
        // The partial file already holds everything: it is checked as it is.
        StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => return Ok(false),
        s if s.is_server_error()
            || s == StatusCode::TOO_MANY_REQUESTS
            || s == StatusCode::REQUEST_TIMEOUT =>
        {
            return Err(Failure::Transient(format!("the server answered {s}")));
        }
        s => {
            let hint = if matches!(s, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                format!(
                    " (a gated repository needs a token in `<remote_dir>/{TOKEN_FILE}`, mode 0600)"
                )
            } else {
                String::new()
            };
            return Err(Failure::Fatal(Error::worker(format!(
                "downloading `{}`: {} answered {s}{hint}",
                dl.model,
                shown(&dl.url)
            ))));
        }
    };
    let already = if append { have } else { 0 };
    if let Some(needed) = total.map(|t| t.saturating_sub(already)) {
        let free = free_bytes(dir).map_err(Failure::Fatal)?;
        if needed > free {
            return Err(Failure::Fatal(Error::worker(format!(
                "`{}` needs {} more on the node, but the filesystem of `{}` has {} free; free \
                 some space or point the model's `path` elsewhere",
                dl.model,
                megabytes(needed),
                dir.display(),
                megabytes(free)
            ))));
        }
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .mode(0o600)
        .open(part)
        .await
        .at("open", part)
        .map_err(|e| Failure::Fatal(e.into()))?;
    let mut written = already;
    let mut last = Instant::now();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| broke(&e, stall))?;
        file.write_all(&chunk)
            .await
            .at("write", part)
            .map_err(|e| Failure::Fatal(e.into()))?;
        written += chunk.len() as u64;
        *fetched += chunk.len() as u64;
        if last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            let progress = PullProgress {
                bytes: written,
                total,
            };
            if events
                .send(SseEvent::json("progress", &progress))
                .await
                .is_err()
            {
                let _ = file.flush().await;
                return Err(Failure::Fatal(abandoned(dl)));
            }
        }
    }
    file.flush()
        .await
        .at("write", part)
        .map_err(|e| Failure::Fatal(e.into()))?;
    file.sync_data()
        .await
        .at("sync", part)
        .map_err(|e| Failure::Fatal(e.into()))?;
    if let Some(total) = total
        && written < total
    {
        return Err(Failure::Transient(format!(
            "the connection ended after {written} of {total} bytes"
        )));
    }
    let _ = events
        .send(SseEvent::json(
            "progress",
            &PullProgress {
                bytes: written,
                total,
            },
        ))
        .await;
    Ok(!append && have > 0)
}

/// The stall limit in force: `STALL_ENV` when it holds a duration above zero, else `STALL`.
fn stall_limit() -> Duration {
    std::env::var(STALL_ENV)
        .ok()
        .and_then(|v| humantime::parse_duration(v.trim()).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(STALL)
}

/// A request or body read that failed: a transient failure, told as a stall when nothing came
/// within the limit.
fn broke(err: &reqwest::Error, stall: Duration) -> Failure {
    if err.is_timeout() {
        Failure::Transient(format!(
            "the server sent nothing for {} (stalled)",
            humantime::format_duration(stall)
        ))
    } else {
        Failure::Transient(crate::error::root_cause(err))
    }
}

/// `bytes START-END/TOTAL` -> (START, TOTAL when known).
fn content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let start = range.split_once('-')?.0.trim().parse().ok()?;
    Some((start, total.trim().parse().ok()))
}

fn abandoned(dl: &Download) -> Error {
    Error::deadline(format!(
        "the download of `{}` was left: nobody waits for it any more; the partial file is \
         kept for the next pull",
        dl.model
    ))
}

/// The file in place, when it matches its SHA-256.
async fn present(dl: &Download) -> Result<Option<Pulled>> {
    let Ok(meta) = tokio::fs::metadata(&dl.path).await else {
        return Ok(None);
    };
    if !meta.is_file() {
        return Err(Error::worker(format!(
            "`{}` is in the way of the model `{}`: it is not a regular file",
            dl.path.display(),
            dl.model
        )));
    }
    let sha = hash(&dl.path).await?;
    Ok(sha.eq_ignore_ascii_case(&dl.sha256).then(|| Pulled {
        model: dl.model.clone(),
        action: "present".to_string(),
        bytes: meta.len(),
        fetched: 0,
        resumed_from: 0,
        sha256: sha,
    }))
}

async fn hash(path: &Path) -> Result<String> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        crate::hive::verify::sha256_file(&owned, &tokio_util::sync::CancellationToken::new())
    })
    .await
    .map_err(|e| Error::internal(format!("hashing task failed: {e}")))?
}

async fn part_len(path: &Path) -> u64 {
    tokio::fs::metadata(path).await.map_or(0, |m| m.len())
}

/// Takes the transfer lock of `dl`'s file, waiting (and saying so once) while another transfer
/// holds it.
async fn lock(
    dl: &Download,
    events: &mpsc::Sender<SseEvent>,
) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    let path = lock_path(&dl.path);
    let mut told = false;
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .at("open", &path)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {}
            Err((_, e)) => {
                return Err(Error::worker(format!(
                    "cannot lock `{}`: {e}",
                    path.display()
                )));
            }
        }
        if !told {
            told = true;
            let waiting = serde_json::json!({
                "reason": format!("another transfer of `{}` is under way; waiting for it", dl.model),
            });
            if events
                .send(SseEvent::json("waiting", &waiting))
                .await
                .is_err()
            {
                return Err(abandoned(dl));
            }
        }
        if events.is_closed() {
            return Err(abandoned(dl));
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
}

/// Bytes an unprivileged user may still write on the filesystem holding `dir`.
pub(crate) fn free_bytes(dir: &Path) -> Result<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(|e| {
        Error::worker(format!(
            "cannot read the free space of `{}`: {e}",
            dir.display()
        ))
    })?;
    #[allow(clippy::useless_conversion)]
    Ok(u64::from(stat.blocks_available()).saturating_mul(u64::from(stat.fragment_size())))
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_are_read() {
        assert_eq!(content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(content_range("items 1-2/3"), None);
    }

    #[test]
    fn shown_urls_lose_their_query() {
        assert_eq!(shown("https://h/m.gguf?sig=secret"), "https://h/m.gguf");
        assert_eq!(shown("https://h/m.gguf"), "https://h/m.gguf");
    }

    #[test]
    fn a_token_file_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_token(dir.path()).expect("none"), None);
        let path = dir.path().join(TOKEN_FILE);
        std::fs::write(&path, "hf_abc\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = read_token(dir.path()).expect_err("readable by others");
        assert_eq!(err.code(), 3);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(
            read_token(dir.path()).expect("read").as_deref(),
            Some("hf_abc")
        );
    }
}
