//! Carries one generation from the worker to the client: tokens pass through untouched, the
//! final event gains the hive's timings and its audit head, a stuck or dead worker becomes an
//! error event, and a client that goes away stops the generation. (The route signs each event
//! on its way out, chained to the one before.)

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use tokio::sync::mpsc;

use crate::audit::Recorded;
use crate::error::Error;
use crate::hive::entry::{EntryState, Lease, Supervision};
use crate::hive::metrics::Metrics;
use crate::hive::requests::Tracked;
use crate::hive::worker_proc::{KillReason, WorkerProc};
use crate::protocol::sse::{SseEvent, events};
use crate::protocol::{DoneEvent, ErrorBody, StopReason};

/// Carries one generation from the worker to the client. It holds the model's queue place until
/// the generation ends, and drops the worker's stream (which stops decoding) as soon as the
/// client goes away.
pub(crate) struct Relay {
    pub(crate) request_id: String,
    pub(crate) audit: crate::audit::Audit,
    /// The hive's own records, queued by a load this request waited on.
    pub(crate) notes: crate::audit::Notes,
    /// Its entry in the hive's table, with the operator's cancel it waits on.
    pub(crate) tracked: Tracked,
    pub(crate) lease: Lease,
    pub(crate) proc: Arc<WorkerProc>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) model: String,
    pub(crate) node: String,
    /// Cancelled when a stopping hive's drain time is over.
    pub(crate) drained: tokio_util::sync::CancellationToken,
    pub(crate) queue_ms: f64,
    pub(crate) load_ms: Option<f64>,
    pub(crate) received: Instant,
    /// Why a record of this request was lost (`audit = "best-effort"`), for the done event.
    pub(crate) lost: Option<String>,
    /// Cancelled once the hive is stopping: then it, not a crash, ended the worker.
    pub(crate) stopping: tokio_util::sync::CancellationToken,
}

/// A busy worker that sends nothing for this long is taken as stuck. Every event counts, the
/// worker's `prefill` progress between prompt chunks and its `progress` while a stop string
/// holds text back included, so a long prompt or a long hold is not mistaken for a hang while
/// a stopped worker still is.
pub(crate) const STALL_TIMEOUT: std::time::Duration = crate::protocol::WORKER_STALL_TIMEOUT;

impl Relay {
    pub(crate) async fn run(mut self, response: reqwest::Response, tx: mpsc::Sender<SseEvent>) {
        let mut upstream = std::pin::pin!(events(response));
        let mut outcome = "error";
        let mut first_token = true;
        let mut stalled = false;
        let mut cut = false;
        let mut ended = false;
        let mut told = false;
        let cancel = self.tracked.cancel.clone();
        let mut cancelled_by = None;
        loop {
            let next = tokio::select! {
                biased;
                () = cancel.token.cancelled() => {
                    let by = cancel.by().unwrap_or_default().to_string();
                    tracing::info!(model = %self.model, by = %by, "cancelled by an operator; ending the generation");
                    outcome = "cancelled";
                    cancelled_by = Some(by);
                    break;
                }
                _ = tx.closed() => {
                    tracing::info!(model = %self.model, "client went away; cancelling generation");
                    outcome = "cancelled";
                    break;
                }
                () = self.drained.cancelled() => {
                    tracing::info!(model = %self.model, "the drain time is over; ending the generation");
                    cut = true;
                    break;
                }
                next = tokio::time::timeout(STALL_TIMEOUT, upstream.next()) => next,
            };
            let event = match next {
                Ok(Some(Ok(event))) => event,
                Ok(Some(Err(err))) => {
                    tracing::warn!(model = %self.model, "worker stream broke: {err}");
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(model = %self.model, pid = self.proc.pid, "worker sent nothing for {}s; killing it as stuck", STALL_TIMEOUT.as_secs());
                    Metrics::add(&self.metrics.stuck_kills, 1);
                    self.proc.kill(KillReason::Stuck);
                    stalled = true;
                    break;
                }
            };
            if event.event == "progress" {
                // Only a sign of life: the timeout starts again.
                continue;
            }
            if event.event == "token" && first_token {
                first_token = false;
                self.metrics
                    .first_token(self.received.elapsed().as_secs_f64());
            }
            let last = event.event == "done" || event.event == "error";
            // The worker said itself why the generation failed: that is what the client hears.
            told |= event.event == "error";
            let mut head = None;
            if event.event == "done" {
                outcome = self.record_done(&event);
                ended = true;
                match self.audit_end(outcome, Some(&event)).await {
                    Ok(Recorded::Kept(h)) => head = Some(h),
                    Ok(Recorded::Lost(why)) => {
                        self.lost.get_or_insert(why);
                    }
                    Err(refused) => {
                        // The generation ran, but it is not reported done: its end is not on
                        // record.
                        outcome = "error";
                        let _ = tx
                            .send(SseEvent::json("error", &ErrorBody::from(&refused)))
                            .await;
                        break;
                    }
                }
            }
            if tx.send(self.forward(event, head)).await.is_err() {
                outcome = "cancelled";
                break;
            }
            if last {
                break;
            }
        }
        if !ended {
            // The request failed or was cancelled: the record is kept if it can be, and there
            // is nothing left to refuse.
            if let Err(e) = self.audit_end(outcome, None).await {
                tracing::error!("{e}");
            }
        }
        if let Some(by) = &cancelled_by {
            // Dropping the worker's stream (when the relay returns) stops the decoding; the
            // client keeps what it was sent and ends as an interrupted request.
            let err = Error::of_kind(
                crate::error::ExitKind::Interrupted,
                format!(
                    "request `{}` was cancelled on `{}` by key {by} (`rbee worker cancel`)",
                    self.request_id, self.node
                ),
            );
            let _ = tx
                .send(SseEvent::json("error", &ErrorBody::from(&err)))
                .await;
        } else if cut {
            let _ = tx.send(self.cut_by_stop()).await;
        } else if outcome == "error" && !ended && !told && !tx.is_closed() {
            let _ = tx.send(self.crashed(stalled).await).await;
        }
        self.metrics
            .request(outcome, self.received.elapsed().as_secs_f64());
        drop(self.lease);
    }

    fn record_done(&self, event: &SseEvent) -> &'static str {
        let Ok(done) = serde_json::from_str::<DoneEvent>(&event.data) else {
            return "error";
        };
        Metrics::add(&self.metrics.tokens, u64::from(done.tokens_out));
        match done.stop_reason {
            StopReason::Deadline => "deadline",
            StopReason::Cancelled => "cancelled",
            _ => "ok",
        }
    }

    /// The node's record of how the request ended; its head goes back to the queen.
    async fn audit_end(
        &self,
        outcome: &'static str,
        done: Option<&SseEvent>,
    ) -> crate::error::Result<Recorded> {
        let done = done.and_then(|e| serde_json::from_str::<DoneEvent>(&e.data).ok());
        let event = match outcome {
            "ok" => "request_completed",
            "deadline" => "request_deadline_exceeded",
            "cancelled" => "request_cancelled",
            _ => "request_failed",
        };
        let fields = serde_json::json!({
            "model": self.model,
            "tokens_in": done.as_ref().map(|d| d.tokens_in),
            "tokens_out": done.as_ref().map(|d| d.tokens_out),
            "stop_reason": done.as_ref().map(|d| d.stop_reason),
            "duration_ms": u64::try_from(self.received.elapsed().as_millis()).unwrap_or(u64::MAX),
            "worker_pid": self.proc.pid,
            "by": self.tracked.cancel.by(),
        });
        if self.load_ms.is_some() {
            // The load's records (`model_verified`, `worker_spawned`) come before the end's.
            self.notes.flush().await;
        }
        self.audit
            .record_work(event, Some(self.request_id.clone()), fields)
            .await
    }

    fn forward(&self, event: SseEvent, head: Option<crate::audit::Head>) -> SseEvent {
        if event.event == "done"
            && let Ok(mut done) = serde_json::from_str::<DoneEvent>(&event.data)
        {
            done.timings_ms.queue = Some(self.queue_ms);
            done.timings_ms.load = self.load_ms;
            done.node_audit = head;
            done.audit_warning = self.lost.clone();
            return SseEvent::json("done", &done);
        }
        // Tokens pass through untouched: no re-encoding on the hot path. The worker's id, if it
        // sent one, is not the hive's signature: the hive signs what it sends on its way out.
        SseEvent { id: None, ..event }
    }

    /// The hive is stopping and its drain time ran out before this generation ended; dropping
    /// the worker's stream (when the relay returns) stops the decoding.
    fn cut_by_stop(&self) -> SseEvent {
        let err = Error::hive(format!(
            "the hive on `{}` is stopping: the generation had not finished when its drain time \
             ({}s) ran out, so it was ended there",
            self.node,
            crate::hive::DRAIN_GRACE.as_secs()
        ));
        SseEvent::json("error", &ErrorBody::from(&err))
    }

    /// What the hive does about the worker that exited, as its supervisor decided: said only
    /// once the decision is made, so that the message is what happens.
    async fn what_next(&self) -> String {
        let entry = self.lease.entry();
        for _ in 0..50 {
            if let Some(next) = decided(&entry.lock(), self.proc.pid, &self.model) {
                return next;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        "the hive has not yet decided whether to restart it".to_string()
    }

    async fn crashed(&self, stalled: bool) -> SseEvent {
        let mut exit = None;
        for _ in 0..20 {
            exit = self.proc.exit_status();
            if exit.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if self.stopping.is_cancelled() {
            let err = Error::hive(format!(
                "the hive is stopping: it let the request run for {}s, then stopped the worker \
                 for `{}` in the middle of it",
                crate::hive::DRAIN_GRACE.as_secs(),
                self.model
            ));
            tracing::warn!("{err}");
            return SseEvent::json("error", &ErrorBody::from(&err));
        }
        let how = match exit {
            _ if stalled => format!(
                "it sent nothing for {}s and was killed as stuck; {}",
                STALL_TIMEOUT.as_secs(),
                self.what_next().await
            ),
            Some(s) => format!("it exited: {s}; {}", self.what_next().await),
            None => "its stream ended".to_string(),
        };
        let err = Error::worker(format!(
            "the worker for `{}` stopped in the middle of the request ({how})",
            self.model
        ));
        tracing::warn!("{err}");
        SseEvent::json("error", &ErrorBody::from(&err))
    }
}

/// The supervisor's decision about the worker `pid`, in words, once it has made one (it takes
/// the process out of the entry when it decides).
fn decided(st: &EntryState, pid: u32, model: &str) -> Option<String> {
    if st.proc.as_ref().is_some_and(|p| p.pid == pid) {
        return None;
    }
    Some(match (&st.supervision, &st.proc) {
        (Supervision::Restarting { at }, _) => format!(
            "the hive restarts it in {:.1}s",
            at.saturating_duration_since(Instant::now()).as_secs_f64()
        ),
        (Supervision::Failed { until }, _) => format!(
            "the hive does not restart it for {}s: {}; `rbee worker restart --model {model}` \
             restarts it now",
            until.saturating_duration_since(Instant::now()).as_secs(),
            st.failed_reason.as_deref().unwrap_or("it kept crashing"),
        ),
        (Supervision::Normal, Some(_)) => "the hive has started a new one".to_string(),
        (Supervision::Normal, None) => "it was stopped on request".to_string(),
    })
}
