//! `rbee serve`'s Prometheus metrics (`GET /metrics`, text exposition format): requests by
//! model, node and outcome, time to first token, tokens in and out, and each model's queue.

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub(crate) const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

const SECONDS_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

type Labels = Vec<(&'static str, String)>;

pub(crate) struct Metrics {
    requests: Family<Labels, Counter>,
    tokens: Family<Labels, Counter>,
    queued: Family<Labels, Gauge>,
    ttft: Family<Labels, Histogram>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let requests = Family::<Labels, Counter>::default();
        let tokens = Family::<Labels, Counter>::default();
        let queued = Family::<Labels, Gauge>::default();
        let ttft = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(SECONDS_BUCKETS.iter().copied())) as fn() -> Histogram,
        );
        let mut registry = Registry::default();
        registry.register(
            "rbee_serve_requests",
            "API requests by model, node and outcome",
            requests.clone(),
        );
        registry.register(
            "rbee_serve_tokens",
            "Tokens by model and direction (in: prompt, out: generated)",
            tokens.clone(),
        );
        registry.register(
            "rbee_serve_queued",
            "Requests waiting for a slot, by model",
            queued.clone(),
        );
        registry.register(
            "rbee_serve_time_to_first_token_seconds",
            "Time from a request's admission to its first token, by model",
            ttft.clone(),
        );
        Metrics {
            requests,
            tokens,
            queued,
            ttft,
            registry,
        }
    }
}

impl Metrics {
    /// One request that ended, on `node` (`-` when none took it), as `outcome`.
    pub(crate) fn request(&self, model: &str, node: &str, outcome: &str) {
        self.requests
            .get_or_create(&vec![
                ("model", model.to_string()),
                ("node", node.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }

    pub(crate) fn tokens(&self, model: &str, tokens_in: u32, tokens_out: u32) {
        let counter = |direction: &str| {
            self.tokens.get_or_create(&vec![
                ("model", model.to_string()),
                ("direction", direction.to_string()),
            ])
        };
        counter("in").inc_by(u64::from(tokens_in));
        counter("out").inc_by(u64::from(tokens_out));
    }

    pub(crate) fn first_token(&self, model: &str, seconds: f64) {
        self.ttft
            .get_or_create(&vec![("model", model.to_string())])
            .observe(seconds);
    }

    /// The exposition, with each model's queue as it is now.
    pub(crate) fn render<'a>(&self, queued: impl Iterator<Item = (&'a str, usize)>) -> String {
        for (model, n) in queued {
            self.queued
                .get_or_create(&vec![("model", model.to_string())])
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
    fn exposition_counts_requests_tokens_first_tokens_and_queues() {
        let m = Metrics::default();
        m.request("m", "n1", "ok");
        m.request("m", "n1", "ok");
        m.request("m", "-", "busy");
        m.tokens("m", 10, 5);
        m.first_token("m", 0.03);
        let text = m.render([("m", 3)].into_iter());
        assert!(
            text.contains("rbee_serve_requests_total{model=\"m\",node=\"n1\",outcome=\"ok\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("rbee_serve_tokens_total{model=\"m\",direction=\"out\"} 5\n"));
        assert!(text.contains("rbee_serve_queued{model=\"m\"} 3\n"));
        assert!(
            text.contains("rbee_serve_time_to_first_token_seconds_count{model=\"m\"} 1\n"),
            "{text}"
        );
    }
}
