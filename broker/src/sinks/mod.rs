//! Sinks: where destinations deliver. One module per kind, all behind the
//! [`Sink`] trait; the delivery actor knows nothing else about them.
//!
//! A sink receives batches of [`Delivery`] items that are already filtered
//! and masked, in offset order for one partition, and says what happened
//! with a [`SendOutcome`]: all delivered, the whole batch failed, or (bulk
//! APIs) one result per item. Failures are classified as retryable or
//! permanent by the sink, which knows its protocol (an HTTP 400 is
//! permanent, a 503 retryable); the delivery actor decides about backoff,
//! attempts and the dead-letter queue.
//!
//! Sinks are a seam (DESIGN.md §4): the simulator plugs in its own.

use std::time::Duration;

use auditflow_protocol::{Hash32, Timestamp};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub mod elasticsearch;
pub mod file;
pub mod http;
pub mod postgres;
pub mod s3;
pub mod splunk_hec;
pub mod syslog;
pub mod webhook;

/// One event on its way out of the node.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    /// Partition it is stored in.
    pub partition: u32,
    /// Its offset there.
    pub offset: u64,
    /// The event id: the idempotency key receivers deduplicate on (G3).
    pub event_id: String,
    /// The tenant, for sinks that route or index by it.
    pub tenant: String,
    /// When the cluster stored it.
    pub received_at: Timestamp,
    /// Its chain hash.
    pub hash: Hash32,
    /// The stored event as JSON after masking: `{"partition", "offset",
    /// "received_at", "hash", "event": {...}}` — what sinks write. Keys
    /// come in that order (the event's in DESIGN.md §2's) unless the
    /// destination masks fields, which sorts them.
    pub body: Body,
}

/// A delivery's JSON body, rendered to text once where the delivery is
/// built. Sinks that write the JSON copy the text as it is (serialising a
/// `Body` writes it verbatim); the few that pick fields out of it parse it
/// ([`Body::to_value`]). Building a `serde_json::Value` for every event
/// had been half of the delivery path's CPU (docs/performance.md).
#[derive(Clone, Debug)]
pub struct Body(Box<serde_json::value::RawValue>);

impl Body {
    /// Renders `value` as JSON text.
    pub fn render<T: Serialize + ?Sized>(value: &T) -> Result<Body, serde_json::Error> {
        serde_json::value::to_raw_value(value).map(Body)
    }

    /// Renders a parsed JSON value; a `Value` always renders.
    pub fn from_value(value: &serde_json::Value) -> Body {
        // Serialising a Value cannot fail (its keys are strings).
        Body::render(value).unwrap_or_else(|_| Body(serde_json::value::RawValue::NULL.to_owned()))
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The body parsed, for sinks that read fields of it. The text was
    /// rendered by serde_json, so it parses; `Null` is a defensive fallback.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(self.0.get()).unwrap_or(serde_json::Value::Null)
    }
}

impl PartialEq for Body {
    fn eq(&self, other: &Body) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Serialize for Body {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// Whether trying again can help.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// Transient: the endpoint is down, slow, overloaded. `retry_after` is
    /// the endpoint's own hint (HTTP `Retry-After`), if it gave one.
    Retryable {
        /// The endpoint's hint.
        retry_after: Option<Duration>,
    },
    /// The endpoint refuses this content; retrying the same bytes cannot
    /// succeed (HTTP 4xx other than 408/429, a rejected bulk item, a
    /// constraint violation).
    Permanent,
}

/// A failed send, as recorded in the attempt history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkFailure {
    /// Retryable or permanent.
    pub kind: FailureKind,
    /// Protocol status code, if any (HTTP status, ...).
    pub status: Option<u16>,
    /// What went wrong, for humans.
    pub message: String,
    /// The start of the endpoint's answer, bounded (at most
    /// [`MAX_EXCERPT_BYTES`]).
    pub response_excerpt: Option<String>,
}

/// Longest response excerpt kept in an attempt record.
pub const MAX_EXCERPT_BYTES: usize = 512;

impl SinkFailure {
    /// A retryable failure without status.
    pub fn retryable(message: impl Into<String>) -> SinkFailure {
        SinkFailure {
            kind: FailureKind::Retryable { retry_after: None },
            status: None,
            message: message.into(),
            response_excerpt: None,
        }
    }

    /// A permanent failure without status.
    pub fn permanent(message: impl Into<String>) -> SinkFailure {
        SinkFailure {
            kind: FailureKind::Permanent,
            status: None,
            message: message.into(),
            response_excerpt: None,
        }
    }

    /// Whether trying again can help.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, FailureKind::Retryable { .. })
    }
}

/// Cuts `text` to at most [`MAX_EXCERPT_BYTES`] on a character boundary.
pub fn excerpt(text: &str) -> String {
    if text.len() <= MAX_EXCERPT_BYTES {
        return text.to_string();
    }
    let mut end = MAX_EXCERPT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// What happened to a batch.
#[derive(Clone, Debug, PartialEq)]
pub enum SendOutcome {
    /// Every item was accepted (durably, as far as the endpoint promises).
    Delivered,
    /// Nothing was accepted (or the sink cannot tell which items were).
    Failed(SinkFailure),
    /// One result per item, in batch order (bulk APIs with per-item
    /// status).
    PerItem(Vec<Result<(), SinkFailure>>),
}

/// A delivery endpoint.
pub trait Sink: Send + 'static {
    /// Sends one batch (non-empty, one partition, offset order).
    fn send<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, SendOutcome>;

    /// Sends a batch an operator asked to have written again: a replay
    /// window or a DLQ redrive (G3: replay and redrive always write
    /// again). A sink whose own dedup skips what it believes it already
    /// wrote must not skip these: a redriven event was parked, so it was
    /// never written, and a replayed one may have been lost downstream.
    /// The default is [`Sink::send`], right for sinks whose dedup key is
    /// held by the endpoint itself (a table's unique key, a document id).
    fn send_again<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, SendOutcome> {
        self.send(batch)
    }
}

/// What a sink learns from the node that builds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkContext {
    /// The cluster's id. Sinks that write idempotently key on (cluster,
    /// partition, offset) (G3): an event's place in the log is unique
    /// where its id is not (two tenants may pick the same id, an id may
    /// come back after the dedup window), and the cluster part keeps two
    /// clusters writing one table or index apart.
    pub cluster: String,
    /// Requests the sink may have in flight at once for its partition
    /// (the destination's `max_in_flight`; 1 with strict ordering). Only
    /// [`SinkConfig::concurrent`] sinks use it.
    pub max_in_flight: usize,
}

/// Why a sink could not be built from its settings.
#[derive(Debug, thiserror::Error)]
#[error("sink {kind}: {reason}")]
pub struct SinkConfigError {
    /// The sink kind.
    pub kind: &'static str,
    /// What is wrong with the settings.
    pub reason: String,
}

/// A sink's settings, tagged by `kind` in the destination configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SinkConfig {
    /// JSON lines files.
    File(file::Config),
    /// HTTP webhook.
    Webhook(webhook::Config),
    /// Syslog RFC 5424 over TCP (optionally TLS).
    Syslog(syslog::Config),
    /// PostgreSQL table.
    Postgres(postgres::Config),
    /// S3-compatible object storage.
    S3(s3::Config),
    /// Splunk HTTP Event Collector.
    SplunkHec(splunk_hec::Config),
    /// Elasticsearch / OpenSearch bulk API.
    Elasticsearch(elasticsearch::Config),
}

impl SinkConfig {
    /// The kind's name as written in configuration.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::File(_) => "file",
            SinkConfig::Webhook(_) => "webhook",
            SinkConfig::Syslog(_) => "syslog",
            SinkConfig::Postgres(_) => "postgres",
            SinkConfig::S3(_) => "s3",
            SinkConfig::SplunkHec(_) => "splunk_hec",
            SinkConfig::Elasticsearch(_) => "elasticsearch",
        }
    }

    /// Whether the sink can have several requests in flight for one
    /// partition (`ordering = "none"`); the others write one batch at a
    /// time to one connection, file or object.
    pub fn concurrent(&self) -> bool {
        matches!(self, SinkConfig::Webhook(_))
    }

    /// Builds the sink. Connections are made lazily on first send, so a
    /// destination that is down at start-up does not stop the node.
    pub fn build(&self, ctx: &SinkContext) -> Result<Box<dyn Sink>, SinkConfigError> {
        Ok(match self {
            SinkConfig::File(c) => Box::new(file::FileSink::new(c.clone())?),
            SinkConfig::Webhook(c) => {
                Box::new(webhook::WebhookSink::new(c.clone())?.with_in_flight(ctx.max_in_flight))
            }
            SinkConfig::Syslog(c) => Box::new(syslog::SyslogSink::new(c.clone())?),
            SinkConfig::Postgres(c) => {
                Box::new(postgres::PostgresSink::new(c.clone(), ctx.cluster.clone())?)
            }
            SinkConfig::S3(c) => Box::new(s3::S3Sink::new(c.clone())?),
            SinkConfig::SplunkHec(c) => Box::new(splunk_hec::SplunkHecSink::new(c.clone())?),
            SinkConfig::Elasticsearch(c) => Box::new(elasticsearch::ElasticsearchSink::new(
                c.clone(),
                ctx.cluster.clone(),
            )?),
        })
    }
}

#[cfg(test)]
mod tests {
    use auditflow_protocol::{Event, StoredEvent};

    use super::*;

    #[test]
    fn a_rendered_body_is_the_text_of_the_parsed_value() {
        // The unmasked path renders the stored event directly; the masked
        // one goes through a `Value`. Both must write the same JSON value
        // (keys come in the struct's order in one, sorted in the other).
        let event: Event = serde_json::from_value(serde_json::json!({
            "id": "evt-1", "tenant": "acme", "time": "2026-11-24T10:00:00Z",
            "actor": {"id": "u1", "type": "user"}, "action": "user.login",
            "target": {"type": "session", "id": "s1"}, "outcome": "success",
            "context": {"k": "v"},
            "data": {"z": [1, 2.5, 1e300, "é\n\"q\""], "a": {"n": null, "t": true}, "f": 0.1},
        }))
        .unwrap();
        let stored = StoredEvent {
            partition: 3,
            offset: 9,
            received_at: Timestamp(1_700_000_000_000_000_001),
            hash: Hash32([7; 32]),
            event,
        };
        let direct = Body::render(&stored).unwrap();
        let via_value = Body::from_value(&serde_json::to_value(&stored).unwrap());
        assert_eq!(direct.to_value(), via_value.to_value());
        assert_eq!(direct.to_value(), serde_json::to_value(&stored).unwrap());
        // `data` goes out as the canonical text that was hashed.
        let data = stored.event.data.as_ref().unwrap().as_str();
        assert!(direct.as_str().contains(&format!("\"data\":{data},")));
        // Serialising a body writes its text as it is.
        assert_eq!(serde_json::to_string(&direct).unwrap(), direct.as_str());
    }
}
