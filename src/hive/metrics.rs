//! The hive's Prometheus metrics (`GET /metrics`, text exposition format).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::protocol::{WorkerInfo, WorkerState};

const SECONDS_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

#[derive(Default)]
pub(crate) struct Metrics {
    pub(crate) spawns: AtomicU64,
    pub(crate) exits: AtomicU64,
    pub(crate) restarts: AtomicU64,
    pub(crate) breaker_opens: AtomicU64,
    pub(crate) stuck_kills: AtomicU64,
    pub(crate) tokens: AtomicU64,
    outcomes: Mutex<BTreeMap<&'static str, u64>>,
    duration: Histogram,
    ttft: Histogram,
}

#[derive(Default)]
struct Histogram {
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    fn observe(&self, seconds: f64) {
        let mut h = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if h.0.is_empty() {
            h.0 = vec![0; SECONDS_BUCKETS.len()];
        }
        for (i, bound) in SECONDS_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.0[i] += 1;
            }
        }
        h.1 += seconds;
        h.2 += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let h = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, bound) in SECONDS_BUCKETS.iter().enumerate() {
            let count = h.0.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.2);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", h.1, h.2);
    }
}

impl Metrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// One finished request: `ok`, `deadline`, `cancelled`, `rejected` or `error`.
    pub(crate) fn request(&self, outcome: &'static str, seconds: f64) {
        *self
            .outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(outcome)
            .or_default() += 1;
        self.duration.observe(seconds);
    }

    pub(crate) fn first_token(&self, seconds: f64) {
        self.ttft.observe(seconds);
    }

    pub(crate) fn render(&self, workers: &[WorkerInfo]) -> String {
        let mut out = String::new();
        let states = [
            (WorkerState::Loading, "loading"),
            (WorkerState::Ready, "ready"),
            (WorkerState::Busy, "busy"),
            (WorkerState::Restarting, "restarting"),
            (WorkerState::Failed, "failed"),
        ];
        let _ = writeln!(
            out,
            "# HELP rbee_workers Workers by state.\n# TYPE rbee_workers gauge"
        );
        for (state, name) in states {
            let n = workers.iter().filter(|w| w.state == state).count();
            let _ = writeln!(out, "rbee_workers{{state=\"{name}\"}} {n}");
        }
        let counters = [
            (
                "rbee_worker_spawns_total",
                "Worker processes started.",
                &self.spawns,
            ),
            (
                "rbee_worker_exits_total",
                "Worker processes that exited unexpectedly.",
                &self.exits,
            ),
            (
                "rbee_worker_restarts_total",
                "Workers restarted by the supervisor.",
                &self.restarts,
            ),
            (
                "rbee_breaker_opens_total",
                "Times restarting was held back.",
                &self.breaker_opens,
            ),
            (
                "rbee_worker_stuck_kills_total",
                "Workers killed as stuck.",
                &self.stuck_kills,
            ),
            (
                "rbee_tokens_generated_total",
                "Tokens generated.",
                &self.tokens,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP rbee_requests_total Requests by outcome.\n# TYPE rbee_requests_total counter"
        );
        let outcomes = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        for outcome in ["ok", "deadline", "cancelled", "rejected", "error"] {
            let n = outcomes.get(outcome).copied().unwrap_or(0);
            let _ = writeln!(out, "rbee_requests_total{{outcome=\"{outcome}\"}} {n}");
        }
        drop(outcomes);
        self.duration.render(
            &mut out,
            "rbee_request_duration_seconds",
            "Time from a request's arrival to its end.",
        );
        self.ttft.render(
            &mut out,
            "rbee_time_to_first_token_seconds",
            "Time from a request's arrival to its first token.",
        );
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
}
