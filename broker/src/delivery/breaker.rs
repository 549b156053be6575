//! Circuit breaker (pure): stop calling an endpoint that is really down,
//! and keep calling one that only fails now and then.
//!
//! The semantics follow resilience4j's `CircuitBreaker` and Envoy's
//! outlier detection. The breaker counts *requests*, not batches: a
//! single-mode webhook sends one request per event, and a batch of 100
//! with one 503 in it is 99 successes and a failure, not a failed send.
//! (Counting batches was issue 33: at 5 % transient errors almost every
//! batch of 100 had a failure, so the breaker stayed open and delivery
//! crawled at 20 events/s.)
//!
//! - Closed: every result goes into a sliding window of the last
//!   [`BreakerPolicy::window_requests`] requests. A success resets the
//!   count of consecutive failures. The breaker opens on
//!   [`BreakerPolicy::failure_threshold`] consecutive failed requests, or
//!   when at least [`BreakerPolicy::minimum_requests`] are in the window
//!   and more than [`BreakerPolicy::failure_rate_percent`] of them failed.
//! - Open: nothing is sent for [`BreakerPolicy::open_ms`].
//! - Half-open: one request at a time goes through ([`Permit::Go`] with
//!   1); [`BreakerPolicy::half_open_successes`] successes in a row close
//!   the breaker, any failure opens it again for another period.
//!
//! The defaults never trip on a 5 % transient error rate: ten consecutive
//! failures at 5 % happen with probability 1e-13 per request, and a window
//! of 20 to 100 requests with more than half failed is as unlikely. At
//! 20 % they are rare, not impossible: ten in a row come about once in
//! ten million requests, and more than half of the first 20 requests
//! failed about once in 10^4 windows.
//! A dead endpoint opens it after ten requests, which with the cheap first
//! retries of [`super::backoff`] takes well under a second.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::replicated::planted::{planted, PlantedBug};

/// Largest sliding window: bounds the breaker's memory (one byte a
/// request) whatever the configuration says.
pub const MAX_WINDOW_REQUESTS: u32 = 1_000;

/// When the breaker opens, for how long, and what closes it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerPolicy {
    /// Consecutive failed requests that open the breaker.
    #[serde(default = "default_threshold")]
    pub failure_threshold: u32,
    /// Failure rate over the window (percent) above which it opens.
    #[serde(default = "default_rate")]
    pub failure_rate_percent: u32,
    /// Requests in the sliding window the rate is measured over.
    #[serde(default = "default_window")]
    pub window_requests: u32,
    /// Fewest requests in the window before the rate counts, so a couple
    /// of early failures do not open it.
    #[serde(default = "default_minimum")]
    pub minimum_requests: u32,
    /// How long it stays open before a probe.
    #[serde(default = "default_open_ms")]
    pub open_ms: u64,
    /// Successful probes (one request each) that close it again.
    #[serde(default = "default_half_open_successes")]
    pub half_open_successes: u32,
}

fn default_threshold() -> u32 {
    10
}
fn default_rate() -> u32 {
    50
}
fn default_window() -> u32 {
    100
}
fn default_minimum() -> u32 {
    20
}
fn default_open_ms() -> u64 {
    10_000
}
fn default_half_open_successes() -> u32 {
    3
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failure_threshold: default_threshold(),
            failure_rate_percent: default_rate(),
            window_requests: default_window(),
            minimum_requests: default_minimum(),
            open_ms: default_open_ms(),
            half_open_successes: default_half_open_successes(),
        }
    }
}

impl BreakerPolicy {
    /// Checks the values; the reason names the field.
    pub fn check(&self) -> Result<(), String> {
        if self.failure_threshold == 0 {
            return Err("failure_threshold must be at least 1".into());
        }
        if self.failure_rate_percent == 0 || self.failure_rate_percent > 100 {
            return Err("failure_rate_percent must be 1..=100".into());
        }
        if self.window_requests == 0 || self.window_requests > MAX_WINDOW_REQUESTS {
            return Err(format!("window_requests must be 1..={MAX_WINDOW_REQUESTS}"));
        }
        if self.minimum_requests == 0 || self.minimum_requests > self.window_requests {
            return Err("minimum_requests must be 1..=window_requests".into());
        }
        if self.half_open_successes == 0 {
            return Err("half_open_successes must be at least 1".into());
        }
        Ok(())
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
    /// Open period over: probes, one request at a time.
    HalfOpen,
}

/// May the caller send now?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permit {
    /// Yes, at most this many requests (1 while half-open).
    Go(usize),
    /// No: the breaker is open this much longer.
    Wait(Duration),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { successes: u32 },
}

/// A circuit breaker; time is passed in so the simulator can drive it.
#[derive(Clone, Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    phase: Phase,
    /// Consecutive failed requests while closed.
    consecutive: u32,
    /// The last results while closed (true: failed), at most
    /// `window_requests` (itself at most [`MAX_WINDOW_REQUESTS`]).
    window: VecDeque<bool>,
    /// Failures in `window`.
    window_failures: u32,
    /// Times it opened, for status.
    opened: u64,
    /// The planted pre-issue-33 behaviour (simulator only).
    per_batch: bool,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(mut policy: BreakerPolicy) -> Breaker {
        // The simulator's planted bug (`PlantedBug::BreakerPerBatch`), read
        // once: the actor that owns the breaker lives on the thread that
        // planted it.
        let per_batch = planted(PlantedBug::BreakerPerBatch);
        if per_batch {
            // The old breaker had no rate rule and closed on one success.
            policy.failure_rate_percent = 100;
            policy.half_open_successes = 1;
        }
        policy.window_requests = policy.window_requests.clamp(1, MAX_WINDOW_REQUESTS);
        Breaker {
            window: VecDeque::with_capacity(policy.window_requests as usize),
            policy,
            phase: Phase::Closed,
            consecutive: 0,
            window_failures: 0,
            opened: 0,
            per_batch,
        }
    }

    /// Whether the old per-batch counting is planted.
    pub fn per_batch(&self) -> bool {
        self.per_batch
    }

    /// The state at `now`.
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { until } if now < until => BreakerState::Open,
            Phase::Open { .. } | Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// How long to wait before sending at `now` (zero unless open).
    pub fn wait(&self, now: Instant) -> Duration {
        match self.phase {
            Phase::Open { until } if now < until => until - now,
            _ => Duration::ZERO,
        }
    }

    /// Whether, and how many requests, may be sent at `now`.
    pub fn permit(&self, now: Instant) -> Permit {
        match self.state(now) {
            BreakerState::Closed => Permit::Go(usize::MAX),
            BreakerState::Open => Permit::Wait(self.wait(now)),
            // The planted breaker probes with a whole batch.
            BreakerState::HalfOpen if self.per_batch() => Permit::Go(usize::MAX),
            BreakerState::HalfOpen => Permit::Go(1),
        }
    }

    /// Times the breaker opened.
    pub fn opened(&self) -> u64 {
        self.opened
    }

    /// Records the requests of one send at `now`, in order: `successes`
    /// answered requests, then a failed one if `failed`.
    pub fn record(&mut self, successes: u64, failed: bool, now: Instant) {
        // Past the window's length, more successes change nothing but the
        // consecutive count, which the first one already reset.
        let window = u64::from(self.policy.window_requests);
        for _ in 0..successes.min(window.max(u64::from(self.policy.half_open_successes))) {
            self.one(true, now);
        }
        if failed {
            self.one(false, now);
        }
    }

    fn one(&mut self, ok: bool, now: Instant) {
        match self.phase {
            Phase::Open { until } if now < until => {
                // A late answer to a request sent before it opened: the
                // open period decides.
            }
            Phase::Open { .. } | Phase::HalfOpen { .. } => {
                let successes = match self.phase {
                    Phase::HalfOpen { successes } => successes,
                    _ => 0,
                };
                if !ok {
                    return self.open(now);
                }
                let successes = successes + 1;
                if successes >= self.policy.half_open_successes {
                    self.close();
                } else {
                    self.phase = Phase::HalfOpen { successes };
                }
            }
            Phase::Closed => {
                if self.window.len() >= self.policy.window_requests as usize
                    && self.window.pop_front() == Some(true)
                {
                    self.window_failures -= 1;
                }
                self.window.push_back(!ok);
                if ok {
                    self.consecutive = 0;
                    return;
                }
                self.window_failures += 1;
                self.consecutive = self.consecutive.saturating_add(1);
                let calls = self.window.len() as u64;
                let over_rate = calls >= u64::from(self.policy.minimum_requests)
                    && u64::from(self.window_failures) * 100
                        > u64::from(self.policy.failure_rate_percent) * calls;
                if self.consecutive >= self.policy.failure_threshold.max(1) || over_rate {
                    self.open(now);
                }
            }
        }
    }

    fn open(&mut self, now: Instant) {
        self.phase = Phase::Open {
            until: now + Duration::from_millis(self.policy.open_ms),
        };
        self.opened += 1;
        self.consecutive = 0;
        self.window.clear();
        self.window_failures = 0;
    }

    fn close(&mut self) {
        self.phase = Phase::Closed;
        self.consecutive = 0;
        self.window.clear();
        self.window_failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::replicated::planted::plant;

    /// One step of a breaker table: at `ms`, record `successes` then a
    /// failure if `failed`, then expect `state` and `permit`.
    struct Step {
        ms: u64,
        successes: u64,
        failed: bool,
        state: BreakerState,
        permit: Permit,
    }

    fn check(policy: BreakerPolicy, steps: &[Step]) {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy);
        for (i, s) in steps.iter().enumerate() {
            let now = t0 + Duration::from_millis(s.ms);
            b.record(s.successes, s.failed, now);
            assert_eq!(b.state(now), s.state, "step {i}: state");
            assert_eq!(b.permit(now), s.permit, "step {i}: permit");
        }
    }

    fn step(ms: u64, successes: u64, failed: bool, state: BreakerState, permit: Permit) -> Step {
        Step {
            ms,
            successes,
            failed,
            state,
            permit,
        }
    }

    use BreakerState::*;
    const GO: Permit = Permit::Go(usize::MAX);
    const PROBE: Permit = Permit::Go(1);

    fn small() -> BreakerPolicy {
        BreakerPolicy {
            failure_threshold: 3,
            failure_rate_percent: 50,
            window_requests: 10,
            minimum_requests: 4,
            open_ms: 1000,
            half_open_successes: 2,
        }
    }

    #[test]
    fn opens_on_consecutive_failures_and_a_success_resets_the_count() {
        check(
            small(),
            &[
                step(0, 5, true, Closed, GO),
                step(0, 0, true, Closed, GO),
                // A success in between: the count starts over.
                step(0, 1, true, Closed, GO),
                step(0, 0, true, Closed, GO),
                step(0, 0, true, Open, Permit::Wait(Duration::from_millis(1000))),
            ],
        );
    }

    #[test]
    fn opens_on_the_failure_rate_only_past_the_minimum() {
        // Never three failures in a row: 50 % is not above 50 %, 4 of 7
        // is. Before the minimum of 4, 2 of 3 does not count.
        check(
            small(),
            &[
                step(0, 0, true, Closed, GO),
                step(0, 0, true, Closed, GO),
                step(0, 2, false, Closed, GO),
                step(0, 1, true, Closed, GO),
                step(0, 0, true, Open, Permit::Wait(Duration::from_millis(1000))),
            ],
        );
    }

    #[test]
    fn half_open_probes_one_request_and_closes_after_m_successes() {
        let wait = |ms| Permit::Wait(Duration::from_millis(ms));
        check(
            small(),
            &[
                step(0, 0, true, Closed, GO),
                step(0, 0, true, Closed, GO),
                step(0, 0, true, Open, wait(1000)),
                // A late answer while open changes nothing.
                step(500, 3, false, Open, wait(500)),
                step(1000, 0, false, HalfOpen, PROBE),
                // A failed probe: open for another period.
                step(1000, 0, true, Open, wait(1000)),
                step(2000, 1, false, HalfOpen, PROBE),
                step(2000, 1, false, Closed, GO),
            ],
        );
    }

    #[test]
    fn planted_per_batch_breaker_behaves_as_before_issue_33() {
        plant(Some(PlantedBug::BreakerPerBatch));
        let policy = small();
        check(
            policy,
            &[
                step(0, 0, true, Closed, GO),
                step(0, 0, true, Closed, GO),
                step(0, 0, true, Open, Permit::Wait(Duration::from_millis(1000))),
                // The probe is a whole batch, and one success closes it.
                step(1000, 0, false, HalfOpen, GO),
                step(1000, 1, false, Closed, GO),
            ],
        );
        plant(None);
    }

    #[test]
    fn policy_check_names_the_field() {
        assert!(BreakerPolicy::default().check().is_ok());
        let bad = |f: fn(&mut BreakerPolicy)| {
            let mut p = BreakerPolicy::default();
            f(&mut p);
            p.check().unwrap_err()
        };
        assert!(bad(|p| p.failure_threshold = 0).contains("failure_threshold"));
        assert!(bad(|p| p.failure_rate_percent = 101).contains("failure_rate_percent"));
        assert!(bad(|p| p.window_requests = 5000).contains("window_requests"));
        assert!(bad(|p| p.minimum_requests = 200).contains("minimum_requests"));
        assert!(bad(|p| p.half_open_successes = 0).contains("half_open_successes"));
    }

    proptest! {
        /// The defaults never open on independent transient failures at
        /// up to 10 % of requests, over a long run of them. (At 20 % an
        /// opening is rare but possible: see the module doc.)
        #[test]
        fn defaults_never_trip_on_transient_errors(seed in any::<u64>(), percent in 1u32..=10) {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut b = Breaker::new(BreakerPolicy::default());
            let now = Instant::now();
            for _ in 0..20_000 {
                let failed = rng.gen_ratio(percent, 100);
                b.record(u64::from(!failed), failed, now);
            }
            prop_assert_eq!(b.opened(), 0);
        }

        /// A dead endpoint opens the default breaker after exactly
        /// `failure_threshold` requests, whatever succeeded before.
        #[test]
        fn a_dead_endpoint_opens_it_after_the_threshold(before in 0u64..500) {
            let mut b = Breaker::new(BreakerPolicy::default());
            let now = Instant::now();
            b.record(before, false, now);
            for _ in 1..BreakerPolicy::default().failure_threshold {
                b.record(0, true, now);
                prop_assert_eq!(b.state(now), BreakerState::Closed);
            }
            b.record(0, true, now);
            prop_assert_eq!(b.state(now), BreakerState::Open);
        }
    }
}
