//! The restart decision: a pure function of the policy, a worker's failure history and the
//! clock. The supervisor only carries decisions out.

use std::collections::VecDeque;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::time::Instant;

use crate::config::RestartPolicy;

/// A worker that ran this long before exiting gets its attempt count back.
pub(crate) const HEALTHY_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Start it again after `delay`; this is restart number `attempt` in a row.
    Restart { attempt: u32, delay: Duration },
    /// Stop restarting until `until` (or an operator acts).
    GiveUp { reason: GiveUp, until: Instant },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// `max_attempts` restarts in a row all failed.
    Attempts(u32),
    /// `breaker_failures` failures within `breaker_window`.
    Breaker(u32),
}

#[derive(Debug, Default, Clone)]
pub(crate) struct History {
    /// Restarts in a row since the worker last ran healthy.
    consecutive: u32,
    /// Failure times within the breaker window.
    failures: VecDeque<Instant>,
}

impl History {
    /// Records an unexpected exit after `uptime` and decides what to do. `seed` drives the
    /// backoff's jitter, so a test can fix it.
    pub(crate) fn on_exit(
        &mut self,
        policy: &RestartPolicy,
        now: Instant,
        uptime: Duration,
        seed: u64,
    ) -> Decision {
        if uptime >= HEALTHY_AFTER {
            self.consecutive = 0;
        }
        self.failures.push_back(now);
        while self
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.breaker_window)
        {
            self.failures.pop_front();
        }
        let failures = u32::try_from(self.failures.len()).unwrap_or(u32::MAX);
        if policy.breaker_failures > 0 && failures >= policy.breaker_failures {
            let until = now + policy.breaker_window;
            return Decision::GiveUp {
                reason: GiveUp::Breaker(failures),
                until,
            };
        }
        if self.consecutive >= policy.max_attempts {
            let until = now + policy.breaker_window;
            return Decision::GiveUp {
                reason: GiveUp::Attempts(self.consecutive),
                until,
            };
        }
        self.consecutive += 1;
        Decision::Restart {
            attempt: self.consecutive,
            delay: backoff(policy, self.consecutive, seed),
        }
    }

    /// An operator restart, or a window that has passed: start afresh.
    pub(crate) fn reset(&mut self) {
        self.consecutive = 0;
        self.failures.clear();
    }
}

/// The delay before restart number `attempt`: `backoff_initial`, doubling, capped at
/// `backoff_max`, plus up to as much again of jitter (backon's exponential backoff).
pub(crate) fn backoff(policy: &RestartPolicy, attempt: u32, seed: u64) -> Duration {
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(policy.backoff_initial)
        .with_max_delay(policy.backoff_max)
        .with_factor(2.0)
        .with_jitter()
        .with_jitter_seed(seed)
        .without_max_times()
        .build();
    delays
        .nth(attempt.saturating_sub(1) as usize)
        .unwrap_or(policy.backoff_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy::default()
    }

    #[tokio::test(start_paused = true)]
    async fn delays_double_within_jitter_up_to_the_cap() {
        let p = policy();
        let mut h = History::default();
        let mut expected = Duration::from_secs(1);
        for attempt in 1..=3 {
            let now = Instant::now();
            match h.on_exit(&p, now, Duration::from_secs(1), attempt as u64) {
                Decision::Restart { attempt: a, delay } => {
                    assert_eq!(a, attempt);
                    assert!(delay >= expected && delay < expected * 2, "{delay:?}");
                }
                other => panic!("attempt {attempt}: {other:?}"),
            }
            expected *= 2;
            tokio::time::advance(Duration::from_secs(10)).await;
        }
        let capped = RestartPolicy {
            max_attempts: 20,
            breaker_failures: 0,
            ..p
        };
        assert!(backoff(&capped, 12, 1) <= capped.backoff_max * 2);
        assert!(backoff(&capped, 12, 1) >= capped.backoff_max);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_attempts_until_the_window_passes() {
        let p = policy();
        let mut h = History::default();
        for _ in 0..3 {
            assert!(matches!(
                h.on_exit(&p, Instant::now(), Duration::ZERO, 0),
                Decision::Restart { .. }
            ));
            tokio::time::advance(Duration::from_secs(30)).await;
        }
        let now = Instant::now();
        let decision = h.on_exit(&p, now, Duration::ZERO, 0);
        assert_eq!(
            decision,
            Decision::GiveUp {
                reason: GiveUp::Attempts(3),
                until: now + p.breaker_window
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_on_failures_within_its_window_only() {
        let p = RestartPolicy {
            max_attempts: 100,
            breaker_failures: 3,
            breaker_window: Duration::from_secs(60),
            ..policy()
        };
        let mut h = History::default();
        // Two failures, then a long healthy run: the window forgets them.
        h.on_exit(&p, Instant::now(), Duration::ZERO, 0);
        h.on_exit(&p, Instant::now(), Duration::ZERO, 0);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(matches!(
            h.on_exit(&p, Instant::now(), Duration::ZERO, 0),
            Decision::Restart { .. }
        ));
        h.on_exit(&p, Instant::now(), Duration::ZERO, 0);
        let third = h.on_exit(&p, Instant::now(), Duration::ZERO, 0);
        assert!(
            matches!(
                third,
                Decision::GiveUp {
                    reason: GiveUp::Breaker(3),
                    ..
                }
            ),
            "{third:?}"
        );
        h.reset();
        assert!(matches!(
            h.on_exit(&p, Instant::now(), Duration::ZERO, 0),
            Decision::Restart { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_run_gives_the_attempts_back() {
        let p = RestartPolicy {
            breaker_failures: 0,
            ..policy()
        };
        let mut h = History::default();
        for _ in 0..3 {
            h.on_exit(&p, Instant::now(), Duration::ZERO, 0);
        }
        let decision = h.on_exit(&p, Instant::now(), HEALTHY_AFTER, 0);
        assert!(
            matches!(decision, Decision::Restart { attempt: 1, .. }),
            "{decision:?}"
        );
    }
}
