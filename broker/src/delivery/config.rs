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
}

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
        Ok(())
    }
}
