//! The hive's Prometheus metrics (`GET /metrics`, text exposition format 0.0.4): one
//! prometheus-client registry holding every counter, gauge and histogram.

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::protocol::{WorkerInfo, WorkerState};

/// The `Content-Type` of what `render` returns.
pub(crate) const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

const SECONDS_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

const OUTCOMES: [&str; 5] = ["ok", "deadline", "cancelled", "rejected", "error"];

const STATES: [(WorkerState, &str); 5] = [
    (WorkerState::Loading, "loading"),
    (WorkerState::Ready, "ready"),
    (WorkerState::Busy, "busy"),
    (WorkerState::Restarting, "restarting"),
    (WorkerState::Failed, "failed"),
];

/// One label, such as `outcome="ok"`.
type Label = [(&'static str, &'static str); 1];

pub(crate) struct Metrics {
    pub(crate) spawns: Counter,
    pub(crate) exits: Counter,
    pub(crate) restarts: Counter,
    pub(crate) breaker_opens: Counter,
    pub(crate) stuck_kills: Counter,
    pub(crate) tokens: Counter,
    outcomes: Family<Label, Counter>,
    /// Unexpected exits by model and what they most likely were.
    exits_by: Family<[(&'static str, String); 2], Counter>,
    workers: Family<Label, Gauge>,
    duration: Histogram,
    ttft: Histogram,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let seconds = || Histogram::new(SECONDS_BUCKETS.iter().copied());
        let m = Metrics {
            spawns: Counter::default(),
            exits: Counter::default(),
            restarts: Counter::default(),
            breaker_opens: Counter::default(),
            stuck_kills: Counter::default(),
            tokens: Counter::default(),
            outcomes: Family::default(),
            exits_by: Family::default(),
            workers: Family::default(),
            duration: seconds(),
            ttft: seconds(),
            registry: Registry::default(),
        };
        // Every outcome and state is exposed from the start, at zero.
        for outcome in OUTCOMES {
            let _ = m.outcomes.get_or_create(&[("outcome", outcome)]);
        }
        for (_, state) in STATES {
            let _ = m.workers.get_or_create(&[("state", state)]);
        }
        let mut registry = Registry::default();
        // The registry appends `_total` to counter names and a full stop to help texts.
        registry.register("rbee_workers", "Workers by state", m.workers.clone());
        let counters = [
            ("rbee_worker_spawns", "Worker processes started", &m.spawns),
            (
                "rbee_worker_exits",
                "Worker processes that exited unexpectedly",
                &m.exits,
            ),
            (
                "rbee_worker_restarts",
                "Workers restarted by the supervisor",
                &m.restarts,
            ),
            (
                "rbee_breaker_opens",
                "Times restarting was held back",
                &m.breaker_opens,
            ),
            (
                "rbee_worker_stuck_kills",
                "Workers killed as stuck",
                &m.stuck_kills,
            ),
            ("rbee_tokens_generated", "Tokens generated", &m.tokens),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register("rbee_requests", "Requests by outcome", m.outcomes.clone());
        registry.register(
            "rbee_worker_exits_by_reason",
            "Unexpected worker exits by model and reason (crash, stuck, health, oom, likely_oom, signal)",
            m.exits_by.clone(),
        );
        registry.register(
            "rbee_request_duration_seconds",
            "Time from a request's arrival to its end",
            m.duration.clone(),
        );
        registry.register(
            "rbee_time_to_first_token_seconds",
            "Time from a request's arrival to its first token",
            m.ttft.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub(crate) fn add(counter: &Counter, n: u64) {
        counter.inc_by(n);
    }

    /// One unexpected exit of `model`'s worker, by what it most likely was.
    pub(crate) fn exit_of(&self, model: &str, reason: &'static str) {
        self.exits_by
            .get_or_create(&[("model", model.to_string()), ("reason", reason.to_string())])
            .inc();
    }

    /// One finished request: `ok`, `deadline`, `cancelled`, `rejected` or `error`.
    pub(crate) fn request(&self, outcome: &'static str, seconds: f64) {
        self.outcomes.get_or_create(&[("outcome", outcome)]).inc();
        self.duration.observe(seconds);
    }

    pub(crate) fn first_token(&self, seconds: f64) {
        self.ttft.observe(seconds);
    }

    /// The exposition, with the workers gauge set from `workers`.
    pub(crate) fn render(&self, workers: &[WorkerInfo]) -> String {
        for (state, name) in STATES {
            let n = workers.iter().filter(|w| w.state == state).count();
            self.workers
                .get_or_create(&[("state", name)])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        if let Err(e) = prometheus_text::encode(&mut out, &self.registry) {
            tracing::warn!("encoding the metrics failed: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_counts_what_happened() {
        let m = Metrics::default();
        Metrics::add(&m.restarts, 2);
        m.request("ok", 0.3);
        m.request("deadline", 1.2);
        m.first_token(0.07);
        let text = m.render(&[]);
        assert!(text.contains("rbee_worker_restarts_total 2\n"), "{text}");
        assert!(text.contains("rbee_requests_total{outcome=\"ok\"} 1\n"));
        assert!(text.contains("rbee_request_duration_seconds_bucket{le=\"0.5\"} 1\n"));
        assert!(text.contains("rbee_request_duration_seconds_bucket{le=\"2.5\"} 2\n"));
        assert!(text.contains("rbee_request_duration_seconds_count 2\n"));
        assert!(text.contains("rbee_time_to_first_token_seconds_bucket{le=\"0.1\"} 1\n"));
    }

    /// The families, their types and the series a scrape sees before anything happened: what
    /// dashboards and alerts are written against.
    #[test]
    fn exposition_keeps_its_names_types_labels_and_buckets() {
        let text = Metrics::default().render(&[]);
        for (name, kind) in [
            ("rbee_workers", "gauge"),
            ("rbee_worker_spawns_total", "counter"),
            ("rbee_worker_exits_total", "counter"),
            ("rbee_worker_restarts_total", "counter"),
            ("rbee_breaker_opens_total", "counter"),
            ("rbee_worker_stuck_kills_total", "counter"),
            ("rbee_tokens_generated_total", "counter"),
            ("rbee_requests_total", "counter"),
            ("rbee_request_duration_seconds", "histogram"),
            ("rbee_time_to_first_token_seconds", "histogram"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "no `# TYPE {name} {kind}` in\n{text}"
            );
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{text}"
            );
        }
        for (_, state) in STATES {
            assert!(
                text.contains(&format!("\nrbee_workers{{state=\"{state}\"}} 0\n")),
                "{text}"
            );
        }
        for outcome in OUTCOMES {
            assert!(
                text.contains(&format!(
                    "\nrbee_requests_total{{outcome=\"{outcome}\"}} 0\n"
                )),
                "{text}"
            );
        }
        for name in [
            "rbee_request_duration_seconds",
            "rbee_time_to_first_token_seconds",
        ] {
            for le in [
                "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30", "60", "120", "+Inf",
            ] {
                assert!(
                    text.contains(&format!("\n{name}_bucket{{le=\"{le}\"}} 0\n")),
                    "no {name} bucket {le} in\n{text}"
                );
            }
            assert_eq!(
                text.matches(&format!("{name}_bucket{{")).count(),
                12,
                "{text}"
            );
        }
        assert!(
            !text.contains(".."),
            "a help text ends in two full stops:\n{text}"
        );
    }

    #[test]
    fn the_workers_gauge_follows_the_registry() {
        let m = Metrics::default();
        let worker = |state| WorkerInfo {
            id: String::new(),
            model: String::new(),
            state,
            pid: None,
            socket: None,
            restart_count: 0,
            last_exit: None,
            last_exit_reason: None,
            last_restart: None,
            started_at: None,
            load_ms: None,
            offload: None,
            requests_served: 0,
            in_flight: 0,
            slots: 4,
            queued: 0,
            idle_s: None,
            last_backoff_ms: None,
            breaker: String::new(),
            breaker_closes_at: None,
            failed_reason: None,
        };
        let text = m.render(&[
            worker(WorkerState::Ready),
            worker(WorkerState::Ready),
            worker(WorkerState::Busy),
        ]);
        assert!(text.contains("rbee_workers{state=\"ready\"} 2\n"), "{text}");
        assert!(text.contains("rbee_workers{state=\"busy\"} 1\n"), "{text}");
        let text = m.render(&[]);
        assert!(text.contains("rbee_workers{state=\"ready\"} 0\n"), "{text}");
    }
}
