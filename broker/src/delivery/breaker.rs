//! Circuit breaker (pure): after repeated failures, stop calling an
//! endpoint for a while, then let one probe through.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// When the breaker opens and for how long.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerPolicy {
    /// Consecutive failed sends that open the breaker.
    #[serde(default = "default_threshold")]
    pub failure_threshold: u32,
    /// How long it stays open before a probe.
    #[serde(default = "default_open_ms")]
    pub open_ms: u64,
}

fn default_threshold() -> u32 {
    5
}
fn default_open_ms() -> u64 {
    10_000
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failure_threshold: default_threshold(),
            open_ms: default_open_ms(),
        }
    }
}

/// Breaker state, as shown in delivery status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Sending normally.
    Closed,
    /// Not sending until the open period ends.
    Open,
    /// Open period over: the next send is a probe.
    HalfOpen,
}

/// A circuit breaker; time is passed in so the simulator can drive it.
#[derive(Clone, Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    failures: u32,
    open_until: Option<Instant>,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(policy: BreakerPolicy) -> Breaker {
        Breaker {
            policy,
            failures: 0,
            open_until: None,
        }
    }

    /// The state at `now`.
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.open_until {
            None => BreakerState::Closed,
            Some(until) if now < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// How long to wait before sending at `now` (zero unless open).
    pub fn wait(&self, now: Instant) -> Duration {
        match self.open_until {
            Some(until) if now < until => until - now,
            _ => Duration::ZERO,
        }
    }

    /// Records a successful send: closes the breaker.
    pub fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
    }

    /// Records a failed send at `now`; opens (or re-opens after a failed
    /// probe) when the threshold is reached.
    pub fn failure(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        if self.failures >= self.policy.failure_threshold.max(1) {
            self.open_until = Some(now + Duration::from_millis(self.policy.open_ms));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_half_opens_then_closes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerPolicy {
            failure_threshold: 2,
            open_ms: 1000,
        });
        b.failure(t0);
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.failure(t0);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert_eq!(b.wait(t0), Duration::from_millis(1000));
        let later = t0 + Duration::from_millis(1001);
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        b.failure(later);
        assert_eq!(b.state(later), BreakerState::Open);
        b.success();
        assert_eq!(b.state(later), BreakerState::Closed);
    }
}
