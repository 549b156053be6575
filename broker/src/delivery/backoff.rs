//! Retry schedule (pure): exponential backoff with full jitter, and when to
//! give up.
//!
//! The first retry of an item is cheap: a transient failure (one 503 from
//! a busy load balancer) is retried after a few jittered milliseconds
//! ([`RetryPolicy::first_retry_ms`]), not after the destination's full
//! backoff unit. While the same item keeps failing the bound doubles
//! (by the multiplier) from there, 5, 10, 20, 40, 80 ms with the
//! defaults, and then goes on from [`RetryPolicy::initial_ms`]: 100,
//! 200, ... ms. So an item that fails twice at a 5 % error rate (one in
//! twenty of the failures) costs a few milliseconds more, not 50 on
//! average, and a dead endpoint is still backed off, after its breaker
//! has opened on the tenth failure in a row (issue 33).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a destination retries retryable failures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Bound of the first retry's delay (full jitter): short, so a
    /// one-off transient failure costs milliseconds.
    #[serde(default = "default_first_retry_ms")]
    pub first_retry_ms: u64,
    /// Delay bound once the quick retries (from `first_retry_ms`,
    /// growing by `multiplier`) have reached it; it grows from here.
    #[serde(default = "default_initial_ms")]
    pub initial_ms: u64,
    /// Growth per attempt.
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    /// Largest delay bound.
    #[serde(default = "default_max_ms")]
    pub max_ms: u64,
    /// Park the event after this many failed attempts. Unset: retry until
    /// `max_age_secs`, or forever (events wait on disk, G2/G8).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Park the event once it has been failing this long.
    #[serde(default)]
    pub max_age_secs: Option<u64>,
}

fn default_first_retry_ms() -> u64 {
    5
}
fn default_initial_ms() -> u64 {
    100
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_max_ms() -> u64 {
    30_000
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            first_retry_ms: default_first_retry_ms(),
            initial_ms: default_initial_ms(),
            multiplier: default_multiplier(),
            max_ms: default_max_ms(),
            max_attempts: None,
            max_age_secs: None,
        }
    }
}

impl RetryPolicy {
    /// Checks the values.
    pub fn check(&self) -> Result<(), String> {
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err("multiplier must be a number >= 1".into());
        }
        if self.initial_ms == 0 || self.max_ms < self.initial_ms {
            return Err("need 0 < initial_ms <= max_ms".into());
        }
        if self.max_attempts == Some(0) {
            return Err("max_attempts must be at least 1".into());
        }
        Ok(())
    }

    /// Upper bound of the delay after the `attempt`-th failure (1-based):
    /// `first_retry * multiplier^(attempt-1)` while that is below
    /// `initial` (the quick retries), then `initial *
    /// multiplier^(attempt-1-quick)`, capped at `max`.
    pub fn bound(&self, attempt: u32) -> Duration {
        let attempt = attempt.max(1);
        let quick = self.quick_retries();
        let ms = if attempt <= quick {
            self.first_retry_ms as f64 * self.multiplier.powi((attempt - 1) as i32)
        } else {
            let exp = (attempt - 1 - quick).min(64) as i32;
            // A first retry configured above `initial` is not undercut.
            (self.initial_ms as f64 * self.multiplier.powi(exp)).max(self.first_retry_ms as f64)
        };
        Duration::from_millis(ms.min(self.max_ms as f64) as u64)
    }

    /// How many retries are quick: those whose bound, growing from
    /// `first_retry` by `multiplier`, stays below `initial` (at least the
    /// first; at most 16, and just the first when the bound cannot grow).
    fn quick_retries(&self) -> u32 {
        if self.first_retry_ms == 0 || self.multiplier <= 1.0 {
            return 1;
        }
        let mut n = 1;
        let mut next = self.first_retry_ms as f64 * self.multiplier;
        while n < 16 && next < self.initial_ms as f64 {
            n += 1;
            next *= self.multiplier;
        }
        n
    }

    /// The delay after the `attempt`-th failure with full jitter: uniform
    /// in `[0, bound]`, from `unit` in `[0, 1)` (the caller's randomness
    /// seam). A server's `Retry-After` hint raises it (capped at `max`).
    pub fn delay(&self, attempt: u32, unit: f64, retry_after: Option<Duration>) -> Duration {
        let jittered = self.bound(attempt).mul_f64(unit.clamp(0.0, 1.0));
        match retry_after {
            Some(hint) => jittered.max(hint.min(Duration::from_millis(self.max_ms))),
            None => jittered,
        }
    }

    /// Whether to stop retrying after `attempts` failures spanning `age`.
    pub fn exhausted(&self, attempts: u32, age: Duration) -> bool {
        self.max_attempts.is_some_and(|m| attempts >= m)
            || self
                .max_age_secs
                .is_some_and(|s| age >= Duration::from_secs(s))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn delay_is_within_bounds(attempt in 1u32..100, unit in 0.0f64..1.0, initial in 1u64..1000, extra in 0u64..100_000) {
            let p = RetryPolicy { initial_ms: initial, max_ms: initial + extra, ..RetryPolicy::default() };
            let d = p.delay(attempt, unit, None);
            prop_assert!(d <= p.bound(attempt));
            prop_assert!(p.bound(attempt) <= Duration::from_millis(p.max_ms));
            prop_assert!(p.bound(attempt) <= p.bound(attempt + 1));
        }

        #[test]
        fn the_first_retry_is_cheap_and_backoff_grows_after(unit in 0.0f64..1.0) {
            let p = RetryPolicy::default();
            prop_assert!(p.delay(1, unit, None) <= Duration::from_millis(p.first_retry_ms));
        }

        #[test]
        fn bounds_never_shrink(attempt in 1u32..100, first in 0u64..500, initial in 1u64..1000, mult in 1.0f64..4.0) {
            let p = RetryPolicy { first_retry_ms: first, initial_ms: initial, multiplier: mult, max_ms: 1_000_000, ..RetryPolicy::default() };
            prop_assert!(p.bound(attempt) <= p.bound(attempt + 1));
        }

        #[test]
        fn retry_after_is_honoured_up_to_the_cap(hint_ms in 0u64..100_000) {
            let p = RetryPolicy::default();
            let d = p.delay(1, 0.0, Some(Duration::from_millis(hint_ms)));
            prop_assert_eq!(d, Duration::from_millis(hint_ms.min(p.max_ms)));
        }
    }

    #[test]
    fn quick_retries_grow_to_the_backoff_unit() {
        let p = RetryPolicy::default();
        let bounds: Vec<u128> = (1..=8).map(|a| p.bound(a).as_millis()).collect();
        assert_eq!(bounds, [5, 10, 20, 40, 80, 100, 200, 400]);
        let flat = RetryPolicy {
            multiplier: 1.0,
            ..RetryPolicy::default()
        };
        assert_eq!(flat.bound(1).as_millis(), 5);
        assert_eq!(flat.bound(2).as_millis(), 100);
        assert_eq!(flat.bound(9).as_millis(), 100);
    }

    #[test]
    fn gives_up_by_attempts_or_age() {
        let p = RetryPolicy {
            max_attempts: Some(3),
            max_age_secs: Some(60),
            ..RetryPolicy::default()
        };
        assert!(!p.exhausted(2, Duration::from_secs(1)));
        assert!(p.exhausted(3, Duration::from_secs(1)));
        assert!(p.exhausted(1, Duration::from_secs(61)));
        assert!(!RetryPolicy::default().exhausted(1_000_000, Duration::from_secs(1 << 30)));
    }
}
