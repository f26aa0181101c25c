//! Appending to an audit log: a lock file around read-last + append (many `rbee` processes at
//! once), one fsync per record, torn last lines cut, kept aside and recorded, rotation by size
//! with the chain carried into the new file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{GENESIS, Head, Record, now_rfc3339};
use crate::error::{Error, Result};

/// Rotate when the current file passes this size (`RBEE_AUDIT_MAX_BYTES` overrides).
const MAX_BYTES: u64 = 64 << 20;
/// How much of the file's end is read to find the last record.
const TAIL_BYTES: u64 = 256 << 10;

/// An actor's audit log.
#[derive(Debug, Clone)]
pub(crate) struct Audit {
    pub(crate) path: PathBuf,
    pub(crate) actor: String,
}

impl Audit {
    pub(crate) fn new(path: PathBuf, actor: impl Into<String>) -> Audit {
        Audit {
            path,
            actor: actor.into(),
        }
    }

    /// Appends one record; returns the chain's new head.
    pub(crate) fn record(
        &self,
        event: &str,
        request_id: Option<&str>,
        fields: Value,
    ) -> Result<Head> {
        append(&self.path, &self.actor, event, request_id, fields)
    }

    /// The same, off the async runtime's threads (a record waits for its fsync).
    pub(crate) async fn record_async(
        &self,
        event: &'static str,
        request_id: Option<String>,
        fields: Value,
    ) -> Result<Head> {
        let audit = self.clone();
        tokio::task::spawn_blocking(move || audit.record(event, request_id.as_deref(), fields))
            .await
            .map_err(|e| Error::internal(format!("audit task failed: {e}")))?
    }

    /// Records, logging instead of failing: for events whose action must go on regardless.
    pub(crate) async fn note(
        &self,
        event: &'static str,
        request_id: Option<String>,
        fields: Value,
    ) {
        if let Err(e) = self.record_async(event, request_id, fields).await {
            tracing::error!(event, "cannot write the audit record: {e}");
        }
    }
}

fn audit_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::internal(format!("audit log `{}`: {e}", path.display()))
}

pub fn append(
    path: &Path,
    actor: &str,
    event: &str,
    request_id: Option<&str>,
    fields: Value,
) -> Result<Head> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| audit_error(path, e))?;
    }
    let lock_file = open(&path.with_extension("lock"), false).map_err(|e| audit_error(path, e))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, e)| audit_error(path, format!("cannot lock: {e}")))?;
    let mut file = open(path, true).map_err(|e| audit_error(path, e))?;
    let mut last = tail(path, &mut file, actor)?;
    if file.metadata().map_err(|e| audit_error(path, e))?.len() > max_bytes() {
        let (new_file, head) = rotate(path, actor, last.as_ref())?;
        file = new_file;
        last = Some(head);
    }
    let fields = match fields {
        Value::Object(map) => map,
        Value::Null => Map::new(),
        other => Map::from_iter([("value".to_string(), other)]),
    };
    let record = write(
        &mut file,
        path,
        actor,
        event,
        request_id,
        fields,
        last.as_ref(),
    )?;
    Ok(record.head())
}

fn max_bytes() -> u64 {
    std::env::var("RBEE_AUDIT_MAX_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MAX_BYTES)
}

fn open(path: &Path, append: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(append)
        .write(!append)
        .create(true)
        .mode(0o600)
        .open(path)
}

#[allow(clippy::too_many_arguments)]
fn write(
    file: &mut File,
    path: &Path,
    actor: &str,
    event: &str,
    request_id: Option<&str>,
    fields: Map<String, Value>,
    last: Option<&Head>,
) -> Result<Record> {
    let mut record = Record {
        seq: last.map_or(1, |h| h.seq + 1),
        ts: now_rfc3339(),
        actor: actor.to_string(),
        event: event.to_string(),
        request_id: request_id.map(str::to_string),
        fields,
        prev: last.map_or_else(|| GENESIS.to_string(), |h| h.hash.clone()),
        hash: String::new(),
    };
    record.hash = record.compute_hash();
    let mut line = serde_json::to_string(&record).map_err(|e| audit_error(path, e))?;
    line.push('\n');
    file.write_all(line.as_bytes())
        .and_then(|()| file.sync_data())
        .map_err(|e| audit_error(path, e))?;
    Ok(record)
}

/// The head of the chain at the end of the file. A torn last line (no newline) is cut off,
/// kept in a side file, and the cut is recorded before anything else.
fn tail(path: &Path, file: &mut File, actor: &str) -> Result<Option<Head>> {
    let len = file.metadata().map_err(|e| audit_error(path, e))?.len();
    if len == 0 {
        return Ok(previous_file_head(path));
    }
    let start = len.saturating_sub(TAIL_BYTES);
    let mut buf = Vec::new();
    file.seek(SeekFrom::Start(start))
        .and_then(|_| file.read_to_end(&mut buf))
        .map_err(|e| audit_error(path, e))?;
    let complete = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let torn = buf[complete..].to_vec();
    let body = &buf[..complete];
    let last_line = body[..body.len().saturating_sub(1)]
        .rsplit(|b| *b == b'\n')
        .next()
        .unwrap_or_default();
    let last = if last_line.is_empty() {
        previous_file_head(path)
    } else {
        let record: Record = serde_json::from_slice(last_line).map_err(|_| {
            audit_error(
                path,
                "its last record is unreadable; run `rbee audit verify` to find where it breaks",
            )
        })?;
        Some(record.head())
    };
    if torn.is_empty() {
        return Ok(last);
    }
    let kept = path.with_extension(format!(
        "torn.{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    ));
    std::fs::write(&kept, &torn).map_err(|e| audit_error(path, e))?;
    file.set_len(start + complete as u64)
        .map_err(|e| audit_error(path, e))?;
    tracing::warn!(bytes = torn.len(), kept = %kept.display(), "audit log had a torn last line");
    let fields = serde_json::json!({
        "cut_bytes": torn.len(),
        "cut_sha256": hex::encode(Sha256::digest(&torn)),
        "kept_in": kept.display().to_string(),
    });
    let Value::Object(fields) = fields else {
        return Err(audit_error(path, "recovery record"));
    };
    let record = write(
        file,
        path,
        actor,
        "audit_recovered",
        None,
        fields,
        last.as_ref(),
    )?;
    Ok(Some(record.head()))
}

/// Rotated files: `audit.jsonl.1` (oldest), `.2`, ...
pub(crate) fn rotated(path: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for n in 1.. {
        let file = PathBuf::from(format!("{}.{n}", path.display()));
        if !file.exists() {
            break;
        }
        files.push(file);
    }
    files
}

fn previous_file_head(path: &Path) -> Option<Head> {
    let last = rotated(path).pop()?;
    let text = std::fs::read_to_string(last).ok()?;
    let line = text.lines().last()?;
    serde_json::from_str::<Record>(line).ok().map(|r| r.head())
}

fn rotate(path: &Path, actor: &str, last: Option<&Head>) -> Result<(File, Head)> {
    let n = rotated(path).len() + 1;
    let to = PathBuf::from(format!("{}.{n}", path.display()));
    std::fs::rename(path, &to).map_err(|e| audit_error(path, e))?;
    let mut file = open(path, true).map_err(|e| audit_error(path, e))?;
    let mut fields = Map::new();
    fields.insert("previous_file".into(), to.display().to_string().into());
    let record = write(&mut file, path, actor, "audit_rotated", None, fields, last)?;
    Ok((file, record.head()))
}
