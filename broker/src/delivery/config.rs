//! Destination configuration: where events go, which ones, how they are
//! masked, batched and retried.
//!
//! ```toml
//! [[destinations]]
//! name = "siem"
//! batch_size = 500
//! linger_ms = 50
//! mask_key = "change-me"                      # for `hash` rules
//! sink = { kind = "webhook", url = "https://siem.example/ingest" }
//! filter = { tenants = ["acme"], action_prefixes = ["user."], outcomes = ["failure", "denied"] }
//! masking = [ { path = "actor.ip", action = "hash" }, { path = "data.card.number", action = "redact" } ]
//! retry = { initial_ms = 100, multiplier = 2.0, max_ms = 30000, max_attempts = 20 }
//! ordering = "strict"                          # or "none", with max_in_flight
//! ```

use auditflow_protocol::Outcome;
use serde::{Deserialize, Serialize};

use super::backoff::RetryPolicy;
use super::breaker::BreakerPolicy;
use super::mask::MaskRule;
use crate::sinks::SinkConfig;

/// One destination.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Unique name; cursors and the DLQ are kept under it.
    pub name: String,
    /// The sink and its settings.
    pub sink: SinkConfig,
    /// Which events this destination wants (all by default).
    #[serde(default)]
    pub filter: Filter,
    /// Masking applied before anything leaves the node.
    #[serde(default)]
    pub masking: Vec<MaskRule>,
    /// Key of `hash` masking rules (HMAC-SHA256). Required if any rule
    /// hashes; keep it secret so hashes cannot be reversed by guessing.
    #[serde(default)]
    pub mask_key: Option<String>,
    /// Most events per send.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How long to wait for a batch to fill when few events are new.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// Backoff and give-up rules for retryable failures.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// When to stop calling a failing endpoint for a while.
    #[serde(default)]
    pub breaker: BreakerPolicy,
    /// Whether first arrivals must come in offset order (G4).
    #[serde(default)]
    pub ordering: Ordering,
    /// With `ordering = "none"`: most requests in flight at once per
    /// partition ([`DEFAULT_MAX_IN_FLIGHT`] if unset). Refused with
    /// `strict`, where it is always one.
    #[serde(default)]
    pub max_in_flight: Option<u32>,
}

/// Whether a destination needs events to arrive in offset order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ordering {
    /// First arrivals in offset order per partition (G4): one request in
    /// flight, and an event that fails blocks the ones after it.
    #[default]
    Strict,
    /// Arrival order does not matter to the endpoint (a store that sorts
    /// by time or offset): up to `max_in_flight` requests at once, and
    /// events after a failed one go ahead. The cursor still advances only
    /// over a fully delivered prefix, so nothing is skipped on a restart.
    None,
}

/// Requests in flight per partition with `ordering = "none"` when
/// `max_in_flight` is not set.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 8;
/// Largest `max_in_flight`: each request holds a connection and a body.
pub const MAX_IN_FLIGHT: u32 = 64;

fn default_batch_size() -> usize {
    100
}
fn default_linger_ms() -> u64 {
    20
}

/// Which events a destination receives. Empty lists match everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Tenants to include.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// Action prefixes to include (`user.` matches `user.login`).
    #[serde(default)]
    pub action_prefixes: Vec<String>,
    /// Outcomes to include.
    #[serde(default)]
    pub outcomes: Vec<Outcome>,
}

/// Longest destination name.
pub const MAX_NAME_BYTES: usize = 64;

impl DestinationConfig {
    /// Checks the settings; the reason names the field.
    pub fn check(&self) -> Result<(), String> {
        let n = &self.name;
        if n.is_empty()
            || n.len() > MAX_NAME_BYTES
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "destination name {n:?}: 1-{MAX_NAME_BYTES} ASCII letters, digits, '-', '_' or '.'"
            ));
        }
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return Err(format!("destination {n}: batch_size must be 1..=10000"));
        }
        for rule in &self.masking {
            rule.check()
                .map_err(|e| format!("destination {n}: masking: {e}"))?;
        }
        if self.masking.iter().any(|r| r.needs_key())
            && self.mask_key.as_deref().is_none_or(str::is_empty)
        {
            return Err(format!(
                "destination {n}: mask_key is required by `hash` masking rules"
            ));
        }
        self.retry
            .check()
            .map_err(|e| format!("destination {n}: retry: {e}"))?;
        self.breaker
            .check()
            .map_err(|e| format!("destination {n}: breaker: {e}"))?;
        match (self.ordering, self.max_in_flight) {
            (Ordering::Strict, Some(m)) if m != 1 => {
                return Err(format!(
                    "destination {n}: max_in_flight = {m} needs ordering = \"none\" \
                     (strict ordering sends one request at a time)"
                ))
            }
            (Ordering::None, Some(m)) if m == 0 || m > MAX_IN_FLIGHT => {
                return Err(format!(
                    "destination {n}: max_in_flight must be 1..={MAX_IN_FLIGHT}"
                ))
            }
            (Ordering::None, _) if !self.sink.concurrent() => {
                return Err(format!(
                    "destination {n}: ordering = \"none\" is not supported by {} sinks \
                     (only webhook sends requests concurrently)",
                    self.sink.kind()
                ))
            }
            _ => {}
        }
        Ok(())
    }

    /// Requests in flight at once per partition: one with strict
    /// ordering.
    pub fn in_flight(&self) -> usize {
        match self.ordering {
            Ordering::Strict => 1,
            Ordering::None => self.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT) as usize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(extra: serde_json::Value) -> DestinationConfig {
        let mut v = serde_json::json!({
            "name": "d",
            "sink": { "kind": "webhook", "url": "http://127.0.0.1:9/" },
        });
        if let (Some(o), serde_json::Value::Object(more)) = (v.as_object_mut(), extra) {
            o.extend(more);
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn ordering_and_in_flight() {
        let strict = dest(serde_json::json!({}));
        assert_eq!(strict.ordering, Ordering::Strict);
        assert_eq!(strict.in_flight(), 1);
        assert!(strict.check().is_ok());
        let none = dest(serde_json::json!({"ordering": "none"}));
        assert_eq!(none.in_flight(), DEFAULT_MAX_IN_FLIGHT as usize);
        assert!(none.check().is_ok());
        let four = dest(serde_json::json!({"ordering": "none", "max_in_flight": 4}));
        assert_eq!(four.in_flight(), 4);
        assert!(four.check().is_ok());
        for bad in [
            serde_json::json!({"max_in_flight": 4}),
            serde_json::json!({"ordering": "none", "max_in_flight": 0}),
            serde_json::json!({"ordering": "none", "max_in_flight": 65}),
        ] {
            let d = dest(bad.clone());
            assert!(d.check().unwrap_err().contains("max_in_flight"), "{bad}");
        }
        let mut file = none.clone();
        file.sink =
            serde_json::from_value(serde_json::json!({"kind": "file", "dir": "/tmp/x"})).unwrap();
        assert!(file.check().unwrap_err().contains("not supported by file"));
        assert!(serde_json::from_value::<Ordering>(serde_json::json!("loose")).is_err());
    }
}
