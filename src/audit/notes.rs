//! One writer of an actor's notes (the records of what it did on its own: a worker's exit, a
//! restart, a load), in the order they were sent. The work that sends a note never waits for
//! the log's lock: a log held by another writer (a stuck rbee, a hung disk) delays the notes,
//! which are kept in order and written once the lock is free, not the restart or the load.

use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::Audit;

/// The longest a caller that asked to wait for its note (`note`) waits; its note stays queued
/// past it. A healthy writer holds the lock for one fsync, or for a rotation's hash of a full
/// file (well under a second).
pub(crate) const NOTE_WAIT: Duration = Duration::from_secs(3);

struct Note {
    /// None for a marker that writes nothing (`flush`).
    event: Option<&'static str>,
    fields: Value,
    written: Option<oneshot::Sender<()>>,
}

#[derive(Clone)]
pub(crate) struct Notes {
    tx: mpsc::UnboundedSender<Note>,
}

impl Notes {
    /// Starts the writer on the current runtime; it ends when every `Notes` is dropped and the
    /// queue is written.
    pub(crate) fn start(audit: Audit) -> Notes {
        let (tx, mut rx) = mpsc::unbounded_channel::<Note>();
        tokio::spawn(async move {
            while let Some(note) = rx.recv().await {
                if let Some(event) = note.event {
                    audit.note(event, None, note.fields).await;
                }
                if let Some(written) = note.written {
                    let _ = written.send(());
                }
            }
        });
        Notes { tx }
    }

    /// Queues a note and goes on.
    pub(crate) fn send(&self, event: &'static str, fields: Value) {
        self.queue(Some(event), fields, None);
    }

    /// Waits, at most `NOTE_WAIT`, until the notes queued so far are written: for a reply that
    /// should follow records sent on the way (a load's).
    pub(crate) async fn flush(&self) -> bool {
        self.wait(None, Value::Null, NOTE_WAIT).await
    }

    /// Queues a note and waits until it is written, at most `NOTE_WAIT`: for a reply that
    /// should follow its record (an operator's restart, a model table's update). False when
    /// the wait ran out.
    pub(crate) async fn note(&self, event: &'static str, fields: Value) -> bool {
        self.wait_for(event, fields, NOTE_WAIT).await
    }

    /// Queues a note and waits until it and every note before it are written, at most `wait`;
    /// false when the wait ran out (the notes stay queued).
    pub(crate) async fn wait_for(
        &self,
        event: &'static str,
        fields: Value,
        wait: Duration,
    ) -> bool {
        self.wait(Some(event), fields, wait).await
    }

    async fn wait(&self, event: Option<&'static str>, fields: Value, wait: Duration) -> bool {
        let (written, done) = oneshot::channel();
        self.queue(event, fields, Some(written));
        let finished = tokio::time::timeout(wait, done).await.is_ok();
        if !finished {
            tracing::warn!(
                event = event.unwrap_or("(flush)"),
                "the audit log's lock is held by another writer; the record is queued and will \
                 be written once it is free"
            );
        }
        finished
    }

    fn queue(
        &self,
        event: Option<&'static str>,
        fields: Value,
        written: Option<oneshot::Sender<()>>,
    ) {
        let note = Note {
            event,
            fields,
            written,
        };
        if self.tx.send(note).is_err() {
            // The writer runs as long as a sender lives, so only a panic in it gets here.
            tracing::error!(
                event = event.unwrap_or("(flush)"),
                "the audit writer has stopped; the record is lost"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(path: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("a record");
                v["event"].as_str().expect("an event").to_string()
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn notes_sent_while_another_writer_holds_the_lock_wait_in_order_without_holding_the_sender()
     {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let notes = Notes::start(Audit::new(path.clone(), "hive:t"));
        let long = Duration::from_secs(30);
        assert!(notes.wait_for("first", serde_json::json!({}), long).await);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path.with_extension("lock"))
            .expect("open the lock");
        let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .expect("take the lock");
        let started = std::time::Instant::now();
        notes.send("second", serde_json::json!({}));
        let waited = notes
            .wait_for("third", serde_json::json!({}), Duration::from_millis(300))
            .await;
        assert!(!waited, "a note was written while the lock was held");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(events(&path), ["first"]);
        drop(held);
        assert!(notes.wait_for("fourth", serde_json::json!({}), long).await);
        assert_eq!(events(&path), ["first", "second", "third", "fourth"]);
        crate::audit::verify(&path).expect("the chain verifies");
    }
}
