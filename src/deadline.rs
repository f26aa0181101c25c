//! The budget of one invocation: a deadline on this machine's monotonic clock, carried between
//! hops as the remaining milliseconds so that clock skew between machines does not matter.

use std::time::{Duration, Instant};

use axum::http::HeaderMap;

use crate::config::MAX_DURATION;

pub(crate) const BUDGET_HEADER: &str = "x-rbee-budget-ms";

/// Kept back at each hop for the answer's way back, so the caller sees the stop before its own
/// deadline fires.
pub(crate) const RETURN_MARGIN: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    started: Instant,
    deadline: Instant,
}

impl Budget {
    /// A budget of `total` from now; one past `MAX_DURATION` (which no parser lets through) is
    /// cut to it rather than overflow the clock.
    pub(crate) fn new(total: Duration) -> Budget {
        let started = Instant::now();
        let total = total.min(MAX_DURATION);
        Budget {
            started,
            deadline: started.checked_add(total).unwrap_or(started),
        }
    }

    /// The whole budget, as it was given.
    pub(crate) fn total(&self) -> Duration {
        self.deadline - self.started
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    pub(crate) fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    pub(crate) fn is_spent(&self) -> bool {
        self.remaining().is_zero()
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// What the next hop may spend: the remainder less the margin for the way back.
    pub(crate) fn for_next_hop(&self) -> Duration {
        self.remaining().saturating_sub(RETURN_MARGIN)
    }

    pub(crate) fn header_value(&self) -> String {
        self.for_next_hop().as_millis().to_string()
    }

    /// The budget a request arrived with; `None` when it carried none or an unreadable one.
    pub(crate) fn from_headers(headers: &HeaderMap) -> Option<Budget> {
        let ms: u64 = headers
            .get(BUDGET_HEADER)?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(Budget::new(Duration::from_millis(ms)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_hop_gets_less_than_is_left() {
        let budget = Budget::new(Duration::from_secs(2));
        let next = budget.for_next_hop();
        assert!(next < Duration::from_secs(2));
        assert!(next >= Duration::from_millis(1900));
        let spent = Budget::new(Duration::from_millis(10));
        assert_eq!(spent.for_next_hop(), Duration::ZERO);
    }

    #[test]
    fn header_round_trip() {
        let mut headers = HeaderMap::new();
        headers.insert(BUDGET_HEADER, "1500".parse().expect("valid header value"));
        let budget = Budget::from_headers(&headers).expect("budget");
        assert!(budget.remaining() <= Duration::from_millis(1500));
        assert!(budget.remaining() > Duration::from_millis(1000));
        headers.insert(BUDGET_HEADER, "soon".parse().expect("valid header value"));
        assert!(Budget::from_headers(&headers).is_none());
    }
}
