//! Validation of producer events (G7): a clear reason per failing field.
//!
//! Pure and total: every input yields `Ok` or a [`ValidationError`] naming
//! the field, never a panic. The broker validates before proposing to Raft,
//! so nothing invalid is ever stored, and each event of a batch is judged on
//! its own.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::canonical;
use crate::event::{Event, JsonObject};

/// Size limits, configurable per cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest canonical encoding of one event. 64 KiB by default: audit
    /// events are small records; anything larger is almost always a payload
    /// dumped by mistake and would bloat every replica and destination.
    pub max_event_bytes: usize,
    /// Largest batch, summed over canonical event sizes. 4 MiB bounds the
    /// memory one request can pin on a node and the size of one Raft entry.
    pub max_batch_bytes: usize,
    /// Most events in one batch, bounding per-request work.
    pub max_batch_events: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_event_bytes: 64 * 1024,
            max_batch_bytes: 4 * 1024 * 1024,
            max_batch_events: 10_000,
        }
    }
}

/// Why an event was rejected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    /// Dotted path of the offending field, e.g. `actor.ip`; `event` for the
    /// event as a whole.
    pub field: String,
    /// What is wrong with it, in words.
    pub reason: String,
}

impl ValidationError {
    /// A failure of `field` for `reason`.
    pub fn new(field: impl Into<String>, reason: impl fmt::Display) -> Self {
        ValidationError {
            field: field.into(),
            reason: reason.to_string(),
        }
    }
}

/// Longest event id in bytes (DESIGN.md §2).
pub const MAX_ID_BYTES: usize = 128;
/// Longest tenant name: tenants are identifiers, not descriptions.
pub const MAX_TENANT_BYTES: usize = 128;
/// Longest action name.
pub const MAX_ACTION_BYTES: usize = 128;
/// Longest identifier (actor id, target id).
pub const MAX_IDENT_BYTES: usize = 512;
/// Longest kind (`actor.type`, `target.type`).
pub const MAX_KIND_BYTES: usize = 64;
/// Longest free-text short field (names, hosts, services, keys).
pub const MAX_TEXT_BYTES: usize = 256;
/// Most entries in `context`.
pub const MAX_CONTEXT_ENTRIES: usize = 64;
/// Longest `context` value.
pub const MAX_CONTEXT_VALUE_BYTES: usize = 4096;
/// Latest acceptable `time`: year 2200. Nanosecond `i64` timestamps end
/// in 2262, and an audit event dated centuries ahead is a producer bug.
pub const MAX_TIME_UNIX_NANOS: i64 = 7_258_118_400_000_000_000;

/// Rewrites the event's JSON `data` into its canonical text, so that the
/// hash never depends on how the sender formatted it; fails if it is not a
/// JSON object. Run on every event that arrives from outside the cluster
/// (the binary decoder trusts its input to be canonical already).
pub fn canonicalize_event(event: &mut Event) -> Result<(), ValidationError> {
    if let Some(data) = &event.data {
        let canonical =
            JsonObject::parse(data.as_str()).map_err(|e| ValidationError::new("data", e))?;
        event.data = Some(canonical);
    }
    Ok(())
}

/// Checks every field of `event` and its encoded size.
pub fn validate_event(event: &Event, limits: &Limits) -> Result<(), ValidationError> {
    check_text("id", &event.id, MAX_ID_BYTES)?;
    check_ident_chars("tenant", &event.tenant, MAX_TENANT_BYTES, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
    })?;
    if event.time.0 <= 0 {
        return Err(ValidationError::new(
            "time",
            "must be after 1970-01-01T00:00:00Z",
        ));
    }
    if event.time.0 > MAX_TIME_UNIX_NANOS {
        return Err(ValidationError::new(
            "time",
            "must be before 2200-01-01T00:00:00Z",
        ));
    }
    check_text("actor.id", &event.actor.id, MAX_IDENT_BYTES)?;
    check_kind("actor.type", &event.actor.kind)?;
    if let Some(name) = &event.actor.name {
        check_text("actor.name", name, MAX_TEXT_BYTES)?;
    }
    if let Some(ip) = &event.actor.ip {
        if ip.parse::<std::net::IpAddr>().is_err() {
            return Err(ValidationError::new(
                "actor.ip",
                format!("{ip:?} is not an IPv4 or IPv6 address"),
            ));
        }
    }
    check_action(&event.action)?;
    check_kind("target.type", &event.target.kind)?;
    check_text("target.id", &event.target.id, MAX_IDENT_BYTES)?;
    if let Some(source) = &event.source {
        if let Some(s) = &source.service {
            check_text("source.service", s, MAX_TEXT_BYTES)?;
        }
        if let Some(h) = &source.host {
            check_text("source.host", h, MAX_TEXT_BYTES)?;
        }
    }
    if event.context.len() > MAX_CONTEXT_ENTRIES {
        return Err(ValidationError::new(
            "context",
            format!(
                "has {} entries, at most {MAX_CONTEXT_ENTRIES} allowed",
                event.context.len()
            ),
        ));
    }
    for (k, v) in &event.context {
        check_text(&format!("context.{k}"), k, MAX_TEXT_BYTES)
            .map_err(|e| ValidationError::new("context", format!("key {k:?}: {}", e.reason)))?;
        if v.len() > MAX_CONTEXT_VALUE_BYTES {
            return Err(ValidationError::new(
                format!("context.{k}"),
                format!(
                    "is {} bytes, at most {MAX_CONTEXT_VALUE_BYTES} allowed",
                    v.len()
                ),
            ));
        }
    }
    if let Some(v) = &event.schema_version {
        check_text("schema_version", v, MAX_KIND_BYTES)?;
    }
    if let Some(k) = &event.partition_key {
        check_text("partition_key", k, MAX_TEXT_BYTES)?;
    }
    let size = canonical::encoded_len(event);
    if size > limits.max_event_bytes {
        return Err(ValidationError::new(
            "event",
            format!(
                "encodes to {size} bytes, at most {} allowed",
                limits.max_event_bytes
            ),
        ));
    }
    Ok(())
}

/// Non-empty, bounded, no control characters.
fn check_text(field: &str, s: &str, max: usize) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if s.len() > max {
        return Err(ValidationError::new(
            field,
            format!("is {} bytes, at most {max} allowed", s.len()),
        ));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(ValidationError::new(
            field,
            format!("contains control character {c:?}"),
        ));
    }
    Ok(())
}

fn check_ident_chars(
    field: &str,
    s: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
) -> Result<(), ValidationError> {
    check_text(field, s, max)?;
    if let Some(c) = s.chars().find(|c| !allowed(*c)) {
        return Err(ValidationError::new(
            field,
            format!("contains {c:?}; only ASCII letters, digits, '.', '_' and '-' are allowed"),
        ));
    }
    Ok(())
}

fn check_kind(field: &str, s: &str) -> Result<(), ValidationError> {
    check_ident_chars(field, s, MAX_KIND_BYTES, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
    })
}

/// `segment(.segment)*`, each segment ASCII letters, digits, `_` or `-`.
fn check_action(s: &str) -> Result<(), ValidationError> {
    check_ident_chars("action", s, MAX_ACTION_BYTES, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
    })?;
    if s.split('.').any(str::is_empty) {
        return Err(ValidationError::new(
            "action",
            "must be dot-separated non-empty segments, e.g. user.login",
        ));
    }
    Ok(())
}
