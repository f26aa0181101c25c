//! Appending to an audit log: a lock file around read-last + append (many `rbee` processes at
//! once), one fsync per record, torn last lines cut, kept aside and recorded, rotation by size
//! with the chain carried into the new file, and a bound on the rotated files kept: the oldest
//! past it is dropped, and an `audit_pruned` record and a warning name it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{GENESIS, Head, Record, now_rfc3339};
use crate::config::AuditPolicy;
use crate::error::{DeadlineError, Error, Result};

/// Rotate when the current file passes this size (`RBEE_AUDIT_MAX_BYTES` overrides).
const MAX_BYTES: u64 = 64 << 20;
/// Rotated files kept at most (`RBEE_AUDIT_KEEP` overrides): with `MAX_BYTES`, 1 GiB of past
/// records besides the current file.
const KEEP_ROTATED: usize = 16;
/// Longest line a record may take; the fields are bounded well below it (`super::bounded`),
/// so only a bug reaches it, and it is refused rather than written.
const MAX_RECORD_BYTES: usize = 64 << 10;

/// An actor's audit log, and what the actor does with work it cannot record there.
#[derive(Debug, Clone)]
pub(crate) struct Audit {
    pub(crate) path: PathBuf,
    pub(crate) actor: String,
    pub(crate) policy: AuditPolicy,
    /// The latest an append may wait for the writers' lock (an invocation's deadline); without
    /// it an append waits as long as the lock is held.
    pub(crate) until: Option<Instant>,
}

/// What became of the record of some work, when the work went on.
#[derive(Debug)]
pub(crate) enum Recorded {
    Kept(Head),
    /// Not recorded, and served anyway (`best-effort`): why, for the client's warning.
    Lost(String),
}

impl Audit {
    pub(crate) fn new(path: PathBuf, actor: impl Into<String>) -> Audit {
        Audit {
            path,
            actor: actor.into(),
            policy: AuditPolicy::Required,
            until: None,
        }
    }

    /// Appends wait for the lock no later than `deadline`.
    pub(crate) fn until(self, deadline: Instant) -> Audit {
        Audit {
            until: Some(deadline),
            ..self
        }
    }

    pub(crate) fn with_policy(self, policy: AuditPolicy) -> Audit {
        Audit { policy, ..self }
    }

    /// Records work that must not go unrecorded. Under `required` a record that cannot be
    /// written refuses the work (exit 10, with the reason); under `best-effort` the work goes on
    /// and the reason comes back for the client's warning.
    pub(crate) async fn record_work(
        &self,
        event: &'static str,
        request_id: Option<String>,
        fields: Value,
    ) -> Result<Recorded> {
        match self.record_async(event, request_id, fields).await {
            Ok(head) => Ok(Recorded::Kept(head)),
            Err(e) => {
                tracing::error!(
                    event,
                    policy = self.policy.name(),
                    "cannot write the audit record: {e}"
                );
                match self.policy {
                    AuditPolicy::Required => Err(self.refusal(&e)),
                    AuditPolicy::BestEffort => Ok(Recorded::Lost(e.to_string())),
                }
            }
        }
    }

    /// The error that refuses work this log could not record.
    pub(crate) fn refusal(&self, e: &Error) -> Error {
        Error::Audit(format!(
            "`{}` refused the work because it cannot record it in its audit trail: {e}; make \
             the audit log writable, or set `audit = \"best-effort\"` for the node to serve \
             without it",
            self.actor
        ))
    }

    /// Appends one record; returns the chain's new head.
    pub(crate) fn record(
        &self,
        event: &str,
        request_id: Option<&str>,
        fields: Value,
    ) -> Result<Head> {
        append_until(
            &self.path,
            &self.actor,
            event,
            request_id,
            fields,
            self.until,
        )
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
    Error::Audit(format!("audit log `{}`: {e}", path.display()))
}

pub fn append(
    path: &Path,
    actor: &str,
    event: &str,
    request_id: Option<&str>,
    fields: Value,
) -> Result<Head> {
    append_until(path, actor, event, request_id, fields, None)
}

/// `append`, waiting for another writer's lock no later than `by`, if given.
fn append_until(
    path: &Path,
    actor: &str,
    event: &str,
    request_id: Option<&str>,
    fields: Value,
    by: Option<Instant>,
) -> Result<Head> {
    let bounds = Bounds {
        max_bytes: max_bytes(),
        keep: keep_rotated(),
        lock_by: by,
    };
    append_within(path, actor, event, request_id, fields, bounds)
}

/// How large the current file grows, how many rotated files are kept, and until when to wait
/// for another writer's lock (without it, as long as it is held).
#[derive(Debug, Clone, Copy)]
struct Bounds {
    max_bytes: u64,
    keep: usize,
    lock_by: Option<Instant>,
}

fn append_within(
    path: &Path,
    actor: &str,
    event: &str,
    request_id: Option<&str>,
    fields: Value,
    bounds: Bounds,
) -> Result<Head> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| audit_error(path, e))?;
    }
    let lock_path = path.with_extension("lock");
    let lock_file = open(&lock_path, false).map_err(|e| audit_error(path, e))?;
    let _lock = lock(lock_file, &lock_path, bounds.lock_by).map_err(|e| match e {
        // The wait was bounded by the invocation's deadline: it is that deadline that ran out.
        LockFailure::TimedOut(why) => Error::Deadline(DeadlineError::During(format!(
            "audit log `{}`: {why}",
            path.display()
        ))),
        LockFailure::Failed(why) => audit_error(path, why),
    })?;
    let mut file = open(path, true).map_err(|e| audit_error(path, e))?;
    let mut last = tail(path, &mut file, actor)?;
    if file.metadata().map_err(|e| audit_error(path, e))?.len() > bounds.max_bytes {
        let (new_file, head) = rotate(path, actor, last.as_ref())?;
        file = new_file;
        last = Some(head);
        while rotated(path).len() > bounds.keep {
            last = Some(prune_oldest(
                path,
                actor,
                &mut file,
                last.as_ref(),
                bounds.keep,
            )?);
        }
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

/// Why the writers' lock was not taken.
#[derive(Debug)]
enum LockFailure {
    /// Another writer held it until the wait's bound.
    TimedOut(String),
    Failed(String),
}

/// Takes the writers' lock: waiting as long as it is held, or polling (flock has no timed wait)
/// until `by`.
fn lock(
    mut file: File,
    lock_path: &Path,
    by: Option<Instant>,
) -> std::result::Result<Flock<File>, LockFailure> {
    let Some(by) = by else {
        return Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| LockFailure::Failed(format!("cannot lock: {e}")));
    };
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((back, nix::errno::Errno::EWOULDBLOCK | nix::errno::Errno::EINTR)) => file = back,
            Err((_, e)) => return Err(LockFailure::Failed(format!("cannot lock: {e}"))),
        }
        let now = Instant::now();
        if now >= by {
            return Err(LockFailure::TimedOut(format!(
                "could not take its lock `{}` within {:.1}s (another writer holds it: a stuck \
                 rbee, or a hung disk); the record was not written",
                lock_path.display(),
                now.duration_since(started).as_secs_f64()
            )));
        }
        std::thread::sleep(pause.min(by - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

fn keep_rotated() -> usize {
    std::env::var("RBEE_AUDIT_KEEP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(KEEP_ROTATED)
        .max(1)
}

/// Drops the oldest rotated file (the others move down one number, so the files stay
/// `.1`, `.2`, ...), and says so: an `audit_pruned` record in the chain names the file, its
/// size, SHA-256 and the last record it held (where verifying now starts), and a warning on
/// stderr and in the log names it too. A witness of a record in it then reads as pruned, not
/// as a log cut in secret.
fn prune_oldest(
    path: &Path,
    actor: &str,
    file: &mut File,
    last: Option<&Head>,
    keep: usize,
) -> Result<Head> {
    let files = rotated(path);
    let Some(oldest) = files.first() else {
        return Err(audit_error(path, "no rotated file to drop"));
    };
    let through = last_head_of(oldest)
        .ok_or_else(|| audit_error(oldest, "the oldest rotated file ends in no record"))?;
    let bytes = std::fs::read(oldest).map_err(|e| audit_error(oldest, e))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    std::fs::remove_file(oldest).map_err(|e| audit_error(oldest, e))?;
    for pair in files.windows(2) {
        std::fs::rename(&pair[1], &pair[0]).map_err(|e| audit_error(&pair[1], e))?;
    }
    let mut fields = Map::new();
    fields.insert("dropped_file".into(), oldest.display().to_string().into());
    fields.insert("bytes".into(), bytes.len().into());
    fields.insert("sha256".into(), sha256.clone().into());
    fields.insert("through_seq".into(), through.seq.into());
    fields.insert("through_hash".into(), through.hash.clone().into());
    fields.insert("keep".into(), keep.into());
    let record = write(file, path, actor, "audit_pruned", None, fields, last)?;
    let warning = format!(
        "audit log `{}`: dropped the oldest rotated file (records up to seq {}, {} bytes, \
         sha256 {sha256}) to keep {keep} rotated files (`RBEE_AUDIT_KEEP`); record seq {} says so",
        path.display(),
        through.seq,
        bytes.len(),
        record.seq
    );
    tracing::warn!("{warning}");
    eprintln!("rbee: warning: {warning}");
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
    let (request_id, fields) = super::bounded_record(request_id, fields);
    let mut record = Record {
        seq: last.map_or(1, |h| h.seq + 1),
        ts: now_rfc3339(),
        actor: actor.to_string(),
        event: event.to_string(),
        request_id,
        fields,
        prev: last.map_or_else(|| GENESIS.to_string(), |h| h.hash.clone()),
        hash: String::new(),
    };
    record.hash = record.compute_hash();
    let mut line = serde_json::to_string(&record).map_err(|e| audit_error(path, e))?;
    line.push('\n');
    if line.len() > MAX_RECORD_BYTES {
        return Err(audit_error(
            path,
            format!(
                "a `{event}` record of {} bytes is over the {MAX_RECORD_BYTES} a record may take",
                line.len()
            ),
        ));
    }
    let before = file.metadata().map_err(|e| audit_error(path, e))?.len();
    if let Err(e) = file
        .write_all(line.as_bytes())
        .and_then(|()| file.sync_data())
    {
        // A record that could not be made durable is taken back, so a full disk leaves no
        // torn line behind and the refused work leaves no record claiming it was done.
        let _ = file.set_len(before);
        return Err(audit_error(path, e));
    }
    Ok(record)
}

/// The head of the chain at the end of the file. A torn last line (no newline) is cut off,
/// kept in a side file, and the cut is recorded before anything else.
fn tail(path: &Path, file: &mut File, actor: &str) -> Result<Option<Head>> {
    let len = file.metadata().map_err(|e| audit_error(path, e))?.len();
    if len == 0 {
        return Ok(previous_file_head(path));
    }
    let complete = after_last_newline(file, len).map_err(|e| audit_error(path, e))?;
    let last = match last_record(file, complete).map_err(|e| audit_error(path, e))? {
        LastLine::None => previous_file_head(path),
        LastLine::Record(record) => Some(record.head()),
        LastLine::Unreadable => {
            return Err(audit_error(
                path,
                "its last record is unreadable; run `rbee audit verify` to find where it breaks",
            ));
        }
    };
    if complete == len {
        return Ok(last);
    }
    let kept = path.with_extension(format!(
        "torn.{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    ));
    let (cut_bytes, cut_sha256) =
        keep_aside(file, complete, len, &kept).map_err(|e| audit_error(path, e))?;
    file.set_len(complete).map_err(|e| audit_error(path, e))?;
    tracing::warn!(bytes = cut_bytes, kept = %kept.display(), "audit log had a torn last line");
    let fields = serde_json::json!({
        "cut_bytes": cut_bytes,
        "cut_sha256": cut_sha256,
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

/// How far back the file is read at a time when looking for a line's start.
const CHUNK: usize = 64 << 10;

/// The position just past the last newline before `end`, or 0 when there is none. The file is
/// read backwards a chunk at a time, so a line of any length is found.
fn after_last_newline(file: &mut File, end: u64) -> std::io::Result<u64> {
    let mut buf = vec![0; CHUNK];
    let mut pos = end;
    while pos > 0 {
        let start = pos.saturating_sub(CHUNK as u64);
        let n = usize::try_from(pos - start).unwrap_or(CHUNK);
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|b| *b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        pos = start;
    }
    Ok(0)
}

enum LastLine {
    /// No complete line, or an empty one.
    None,
    Record(Record),
    Unreadable,
}

/// The last complete line of `file[..complete]` (`complete` is just past a newline, or 0),
/// whatever its length.
fn last_record(file: &mut File, complete: u64) -> std::io::Result<LastLine> {
    if complete == 0 {
        return Ok(LastLine::None);
    }
    let end = complete - 1;
    let start = after_last_newline(file, end)?;
    let mut line = vec![0; usize::try_from(end - start).unwrap_or(usize::MAX)];
    file.seek(SeekFrom::Start(start))?;
    file.read_exact(&mut line)?;
    if line.is_empty() {
        return Ok(LastLine::None);
    }
    Ok(match serde_json::from_slice::<Record>(&line) {
        Ok(record) => LastLine::Record(record),
        Err(_) => LastLine::Unreadable,
    })
}

/// Copies `file[start..end]` into `kept`, a chunk at a time; returns its length and SHA-256.
fn keep_aside(
    file: &mut File,
    start: u64,
    end: u64,
    kept: &Path,
) -> std::io::Result<(u64, String)> {
    let mut out = open(kept, false)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; CHUNK];
    let mut pos = start;
    file.seek(SeekFrom::Start(start))?;
    while pos < end {
        let n = usize::try_from(end - pos).map_or(CHUNK, |left| left.min(CHUNK));
        file.read_exact(&mut buf[..n])?;
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        pos += n as u64;
    }
    out.sync_data()?;
    Ok((end - start, hex::encode(hasher.finalize())))
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
    last_head_of(&rotated(path).pop()?)
}

/// The head of the last record in the file at `path`.
fn last_head_of(path: &Path) -> Option<Head> {
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let complete = after_last_newline(&mut file, len).ok()?;
    match last_record(&mut file, complete).ok()? {
        LastLine::Record(record) => Some(record.head()),
        LastLine::None | LastLine::Unreadable => None,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_log() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        (dir, path)
    }

    /// A record with a field of `len` bytes, chained after `prev`, as a line: what an older
    /// writer (or another tool) may have left at the end of a log.
    fn big_record_line(seq: u64, prev: &str, len: usize) -> (String, String) {
        let mut fields = Map::new();
        fields.insert("blob".into(), Value::String("x".repeat(len)));
        let mut record = Record {
            seq,
            ts: now_rfc3339(),
            actor: "t".into(),
            event: "big".into(),
            request_id: None,
            fields,
            prev: prev.to_string(),
            hash: String::new(),
        };
        record.hash = record.compute_hash();
        let line = serde_json::to_string(&record).expect("JSON") + "\n";
        (line, record.hash)
    }

    #[test]
    fn the_last_record_is_found_whatever_its_size() {
        for len in [10, CHUNK - 300, CHUNK, 300 << 10, 3 << 20] {
            let (_dir, path) = temp_log();
            let first = append(&path, "t", "first", None, Value::Null).expect("append");
            let (line, hash) = big_record_line(2, &first.hash, len);
            let mut file = OpenOptions::new().append(true).open(&path).expect("open");
            file.write_all(line.as_bytes()).expect("write");
            let head = append(&path, "t", "after", None, Value::Null).expect("append after");
            assert_eq!(head.seq, 3, "len {len}");
            let verified = super::super::verify(&path).expect("a valid chain");
            assert_eq!(verified.hashes.get(&2), Some(&hash));
            assert_eq!(verified.records, 3);
        }
    }

    #[test]
    fn a_torn_tail_of_any_size_is_kept_aside_and_recorded() {
        let (_dir, path) = temp_log();
        append(&path, "t", "first", None, Value::Null).expect("append");
        let torn = vec![b'y'; 200 << 10];
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(&torn).expect("write");
        append(&path, "t", "after", None, Value::Null).expect("append after");
        let verified = super::super::verify(&path).expect("a valid chain");
        let recovered = &verified.records_list[1];
        assert_eq!(recovered.event, "audit_recovered");
        assert_eq!(recovered.fields["cut_bytes"], torn.len());
        let kept = recovered.fields["kept_in"].as_str().expect("kept_in");
        assert_eq!(std::fs::read(kept).expect("kept"), torn);
    }

    #[test]
    fn a_lock_held_past_the_wait_fails_the_append_without_writing_and_a_free_one_is_taken() {
        let (_dir, path) = temp_log();
        append(&path, "t", "first", None, Value::Null).expect("append");
        let before = std::fs::read(&path).expect("read");
        let other = open(&path.with_extension("lock"), false).expect("open the lock");
        let held = Flock::lock(other, FlockArg::LockExclusiveNonblock).expect("lock");
        let started = Instant::now();
        let by = started + Duration::from_millis(200);
        let refused = append_until(&path, "t", "second", None, Value::Null, Some(by));
        assert!(
            matches!(refused, Err(Error::Deadline(DeadlineError::During(_)))),
            "{refused:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(
            std::fs::read(&path).expect("read"),
            before,
            "a record was written"
        );
        drop(held);
        let head = append_until(
            &path,
            "t",
            "second",
            None,
            Value::Null,
            Some(Instant::now()),
        )
        .expect("a free lock is taken even at the deadline");
        assert_eq!(head.seq, 2);
    }

    #[test]
    fn past_the_bound_the_oldest_rotated_file_is_dropped_and_recorded_and_the_rest_verifies() {
        let (_dir, path) = temp_log();
        let bounds = Bounds {
            max_bytes: 600,
            keep: 2,
            lock_by: None,
        };
        for i in 0..40 {
            let fields = serde_json::json!({ "i": i });
            append_within(&path, "t", "note", None, fields, bounds).expect("append");
        }
        let files = rotated(&path);
        assert_eq!(files.len(), 2, "{files:?}");
        let verified = super::super::verify(&path).expect("what is kept verifies");
        let pruned: Vec<&Record> = verified
            .records_list
            .iter()
            .filter(|r| r.event == "audit_pruned")
            .collect();
        let through = verified.pruned_through.expect("a pruned start");
        assert!(through > 0);
        assert!(verified.records_list[0].seq == through + 1);
        let last = pruned.last().expect("an audit_pruned record");
        assert_eq!(last.fields["through_seq"], through);
        assert!(
            last.fields["sha256"]
                .as_str()
                .is_some_and(|s| s.len() == 64)
        );
        // The newest record is the 40th note plus every rotation and prune record.
        let mut notes = verified.records_list.iter().filter(|r| r.event == "note");
        assert_eq!(notes.next_back().expect("notes").fields["i"], 39);
    }

    #[test]
    fn no_record_exceeds_its_bound() {
        let (_dir, path) = temp_log();
        let huge = "h".repeat(1 << 20);
        let fields = serde_json::json!({ "note": huge, "nested": { "list": [huge] } });
        append(&path, "t", "huge", Some(&huge), fields).expect("append");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.len() < 2048, "{} bytes", text.len());
        let record: Record = serde_json::from_str(text.trim()).expect("record");
        assert_eq!(record.request_id, None);
        assert_eq!(record.fields["request_id"]["len"], 1 << 20);
        assert_eq!(record.fields["note"]["len"], 1 << 20);
        assert_eq!(record.fields["nested"]["list"][0]["len"], 1 << 20);
        assert_eq!(
            record.fields["note"]["sha256"],
            hex::encode(Sha256::digest(huge.as_bytes()))
        );
    }
}
