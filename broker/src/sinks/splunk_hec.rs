//! Splunk HTTP Event Collector (HEC): one POST per batch to
//! `{url}/services/collector/event`, the body being one JSON object per
//! event, concatenated (newline-separated, which HEC accepts):
//!
//! ```json
//! {"time":1700000000.123,"host":"api-1","source":"auditflow","sourcetype":"auditflow",
//!  "index":"audit","event":{...the delivered body...},
//!  "fields":{"event_id":"..","tenant":"..","partition":"3","offset":"42"}}
//! ```
//!
//! - `time` is the producer's event time (`event.time`, what analysts search
//!   by), falling back to the broker's `received_at`; epoch seconds with
//!   millisecond precision (a float: more digits would not survive f64).
//! - `host` is the event's `source.host` when it has one, otherwise left to
//!   HEC (the collector's host).
//! - `fields` are indexed fields; HEC only accepts string values there, so
//!   numbers are sent as strings. `event_id` is the idempotency key (G3):
//!   HEC cannot deduplicate, so re-deliveries are found with it.
//! - `Authorization: Splunk <token>`, and `X-Splunk-Request-Channel` (one
//!   random UUID per sink) so tokens with indexer acknowledgement enabled
//!   accept the requests.
//!
//! Indexer acknowledgement (`indexer_ack = true`; the token must have it
//! on): a 200 then only means "received", and HEC may still lose the
//! events before they are indexed. Its answer carries an `ackId` (per
//! channel, counting from 0); the sink polls `POST
//! {url}/services/collector/ack` with `{"acks":[id]}` on the same channel
//! every `ack_poll_ms` until HEC answers `{"acks":{"<id>":true}}`, and only
//! then reports the batch delivered, so the cursor moves only past indexed
//! events. No acknowledgement within `ack_timeout_ms` (HEC restarted and
//! forgot the id, or indexing is stuck) is a retryable failure: the batch
//! is sent again (at-least-once, `fields.event_id` to deduplicate). A 200
//! without an `ackId` means the token has acknowledgement off, which is a
//! configuration error (retryable, saying so), as is HEC code 14 ("ACK is
//! disabled") from the ack endpoint.
//!
//! Answers (HEC puts `{"text", "code"}` in every body):
//! - 2xx: delivered.
//! - Content errors (codes 5 no data, 6 invalid data format, 12 event
//!   field required, 13 event field blank, 15 indexed fields): the content
//!   is refused. A one-event batch fails permanently. In a larger batch only
//!   one event is usually at fault (HEC names it in `invalid-event-number`),
//!   so the sink re-sends the events one by one and reports per event:
//!   only the faulty one is parked. HEC may already have indexed the events
//!   before the faulty one, so those can arrive twice: at-least-once, with
//!   `fields.event_id` to deduplicate, rather than a risk of loss.
//! - Token and routing errors (codes 1–4 token disabled/missing/invalid,
//!   7 incorrect index, 10/11 channel, 14 ack disabled, 16): a configuration
//!   problem an operator fixes; every event would fail the same way, so
//!   they are retryable with a message that says what to fix (parking every
//!   event because of a bad token would be wrong).
//! - Busy/unhealthy (8, 9, 18–20), 408, 413, 429, 5xx and transport errors:
//!   retryable, `Retry-After` honoured.
//! - Other 4xx without a known code: permanent.

use std::fmt;
use std::path::PathBuf;

use futures::future::BoxFuture;
use reqwest::header::HeaderValue;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::http;
use super::{Delivery, SendOutcome, Sink, SinkConfigError, SinkFailure};

/// The HEC endpoint for JSON events, appended to the base URL.
pub const EVENT_PATH: &str = "services/collector/event";
/// The HEC endpoint for indexer acknowledgement status.
pub const ACK_PATH: &str = "services/collector/ack";
/// Longest `ack_timeout_ms` may be: the whole send, acknowledgement
/// included, must end within the delivery actor's 60 s send limit, so the
/// sink's own timeout (which says what happened) fires first.
pub const ACK_TIMEOUT_MS_MAX: u64 = 45_000;

/// Body bytes read from a HEC answer: its answers are small JSON objects;
/// anything longer is only kept for the excerpt.
const ANSWER_BYTES_MAX: usize = 16 * 1024;

/// Settings of a Splunk HEC destination.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Base URL of the collector, e.g. `https://splunk.example:8088`. A
    /// URL that already ends in `/services/collector/event` is used as is.
    pub url: String,
    /// The HEC token (sent as `Authorization: Splunk <token>`).
    pub token: String,
    /// Target index; the token's default index if absent.
    #[serde(default)]
    pub index: Option<String>,
    /// Splunk `sourcetype` of the events.
    #[serde(default = "default_name")]
    pub sourcetype: String,
    /// Splunk `source` of the events.
    #[serde(default = "default_name")]
    pub source: String,
    /// Time limit of one request, connecting to reading the answer.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Extra CA certificate (PEM) to trust, for a collector with a private
    /// PKI (Splunk's default certificate is self-signed).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Accept any server certificate. Only for test setups: it gives up
    /// authenticating the collector, which then sees the token.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// Wait for indexer acknowledgement before counting a batch delivered
    /// (the token must have it enabled). See the module documentation.
    #[serde(default)]
    pub indexer_ack: bool,
    /// How often to ask HEC whether a batch is indexed.
    #[serde(default = "default_ack_poll_ms")]
    pub ack_poll_ms: u64,
    /// Longest wait for an acknowledgement before the batch is sent again
    /// (at most [`ACK_TIMEOUT_MS_MAX`]).
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
}

fn default_ack_poll_ms() -> u64 {
    500
}

fn default_ack_timeout_ms() -> u64 {
    30_000
}

fn default_name() -> String {
    "auditflow".into()
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// Written by hand so the token never reaches a log line.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .field("index", &self.index)
            .field("sourcetype", &self.sourcetype)
            .field("source", &self.source)
            .field("timeout_ms", &self.timeout_ms)
            .field("tls_ca", &self.tls_ca)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .field("indexer_ack", &self.indexer_ack)
            .field("ack_poll_ms", &self.ack_poll_ms)
            .field("ack_timeout_ms", &self.ack_timeout_ms)
            .finish()
    }
}

/// The Splunk HEC sink.
pub struct SplunkHecSink {
    /// The settings, checked.
    config: Config,
    /// The full event endpoint URL.
    endpoint: String,
    /// The full acknowledgement endpoint URL.
    ack_endpoint: String,
    /// `Splunk <token>`, marked sensitive so HTTP debug logs hide it.
    authorization: HeaderValue,
    /// `X-Splunk-Request-Channel`: one per sink, as HEC acknowledgement
    /// expects one channel per sending client.
    channel: String,
    /// Pooled connections to the collector.
    client: reqwest::Client,
}

/// The event endpoint for a configured base URL.
pub fn endpoint(url: &str) -> String {
    let trimmed = url.trim_end_matches('/');
    if trimmed.ends_with(EVENT_PATH) {
        trimmed.to_string()
    } else {
        http::join(trimmed, EVENT_PATH)
    }
}

/// The acknowledgement endpoint for a configured base URL (or event URL).
pub fn ack_endpoint(url: &str) -> String {
    let trimmed = url.trim_end_matches('/');
    let base = trimmed.strip_suffix(EVENT_PATH).unwrap_or(trimmed);
    http::join(base.trim_end_matches('/'), ACK_PATH)
}

/// The body asking for the status of `ack_id`.
pub fn ack_query(ack_id: u64) -> String {
    json!({ "acks": [ack_id] }).to_string()
}

/// What an ack status answer says about `ack_id` (pure): `Some(true)` once
/// indexed, `Some(false)` not yet (or no longer known), `None` if the
/// answer is not an ack status at all.
pub fn ack_status(body: &str, ack_id: u64) -> Option<bool> {
    let v: Value = serde_json::from_str(body).ok()?;
    let acks = v.get("acks")?.as_object()?;
    Some(
        acks.get(&ack_id.to_string())
            .and_then(Value::as_bool)
            .unwrap_or(false),
    )
}

/// Epoch seconds with millisecond precision from Unix nanoseconds.
fn epoch_secs(nanos: i64) -> f64 {
    // Milliseconds keep every digit within f64's 15–16 significant ones
    // (10 digits of seconds + 3 of fraction); integer division first so
    // the float is the nearest to an exact millisecond value.
    nanos.div_euclid(1_000_000) as f64 / 1000.0
}

/// The HEC event object for one delivery (pure).
pub fn hec_event(config: &Config, d: &Delivery) -> Value {
    let body = d.body.to_value();
    let event = body.get("event");
    let nanos = event
        .and_then(|e| e.get("time"))
        .and_then(|t| t.as_str())
        .and_then(|t| auditflow_protocol::Timestamp::parse_rfc3339(t).ok())
        .unwrap_or(d.received_at)
        .unix_nanos();
    let mut obj = Map::new();
    obj.insert("time".into(), json!(epoch_secs(nanos)));
    let host = event
        .and_then(|e| e.get("source"))
        .and_then(|s| s.get("host"))
        .and_then(Value::as_str)
        .filter(|h| !h.is_empty());
    if let Some(host) = host {
        obj.insert("host".into(), json!(host));
    }
    obj.insert("source".into(), json!(config.source));
    obj.insert("sourcetype".into(), json!(config.sourcetype));
    if let Some(index) = &config.index {
        obj.insert("index".into(), json!(index));
    }
    obj.insert("event".into(), body);
    obj.insert(
        "fields".into(),
        json!({
            "event_id": d.event_id,
            "tenant": d.tenant,
            "partition": d.partition.to_string(),
            "offset": d.offset.to_string(),
        }),
    );
    Value::Object(obj)
}

/// The request body for a batch: the event objects, one per line (pure).
pub fn hec_payload(config: &Config, batch: &[Delivery]) -> Vec<u8> {
    let mut out = Vec::new();
    for d in batch {
        // Writing a Value into a Vec cannot fail (no I/O, string keys).
        let _ = serde_json::to_writer(&mut out, &hec_event(config, d));
        out.push(b'\n');
    }
    out
}

/// The parts of a HEC answer body the sink uses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct HecAnswer {
    /// HEC's message.
    #[serde(default)]
    pub text: String,
    /// HEC's status code (not the HTTP one).
    #[serde(default)]
    pub code: Option<u64>,
    /// Zero-based position of the event HEC refused, for content errors.
    #[serde(default, rename = "invalid-event-number")]
    pub invalid_event_number: Option<u64>,
    /// The acknowledgement id of an accepted request (indexer
    /// acknowledgement on).
    #[serde(default, rename = "ackId")]
    pub ack_id: Option<u64>,
}

/// What a HEC answer means for the batch.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Accepted; with the `ackId` HEC gave, if any.
    Delivered(Option<u64>),
    /// The content was refused (permanent); `invalid_event` is HEC's index
    /// of the faulty event, if it said.
    ContentRefused {
        /// The failure to record.
        failure: SinkFailure,
        /// HEC's `invalid-event-number`.
        invalid_event: Option<u64>,
    },
    /// Any other failure (retryable or permanent), for the whole batch.
    Failed(SinkFailure),
}

/// HEC codes that refuse the content of the request.
const CONTENT_CODES: [u64; 5] = [5, 6, 12, 13, 15];

/// Classifies a HEC answer (pure). See the module comment for the table.
pub fn classify(status: u16, body: &str, retry_after: Option<std::time::Duration>) -> Verdict {
    let answer: HecAnswer = serde_json::from_str(body).unwrap_or_default();
    if (200..300).contains(&status) {
        return Verdict::Delivered(answer.ack_id);
    }
    let said = if answer.text.is_empty() {
        format!("HTTP {status}")
    } else {
        match answer.code {
            Some(code) => format!("HTTP {status}, HEC code {code}: {}", answer.text),
            None => format!("HTTP {status}: {}", answer.text),
        }
    };
    let retry = |why: &str| {
        Verdict::Failed(http::retryable_with(
            Some(status),
            format!("{said} ({why})"),
            retry_after,
            body,
        ))
    };
    match answer.code {
        Some(code) if CONTENT_CODES.contains(&code) && (400..500).contains(&status) => {
            let message = match answer.invalid_event_number {
                Some(n) => format!("{said} (event {n} of the request)"),
                None => said.clone(),
            };
            Verdict::ContentRefused {
                failure: http::permanent_with(Some(status), message, body),
                invalid_event: answer.invalid_event_number,
            }
        }
        Some(1..=4) => retry("the HEC token is missing, invalid or disabled: fix `token`"),
        Some(7) => retry("the token may not write to this index: fix `index` or the token"),
        Some(10 | 11 | 14 | 16) => {
            retry("HEC refuses the channel or request form: check the token's settings")
        }
        Some(8 | 9 | 18..=20) => retry("HEC is busy or unhealthy"),
        _ => match status {
            401 | 403 => retry("authentication refused: fix `token`"),
            404 => retry("no HEC endpoint at this URL: fix `url`"),
            413 => retry("request too large: lower the destination's batch size"),
            _ => match http::classify(status, body, retry_after) {
                Some(mut f) => {
                    f.message = said;
                    Verdict::Failed(f)
                }
                None => Verdict::Delivered(answer.ack_id),
            },
        },
    }
}

impl SplunkHecSink {
    /// Checks the settings and builds the HTTP client.
    pub fn new(config: Config) -> Result<SplunkHecSink, SinkConfigError> {
        let bad = |reason: &str| SinkConfigError {
            kind: "splunk_hec",
            reason: reason.to_string(),
        };
        http::parse_url("splunk_hec", &config.url)?;
        if config.token.trim().is_empty() {
            return Err(bad("token is empty"));
        }
        let mut authorization = HeaderValue::from_str(&format!("Splunk {}", config.token))
            .map_err(|_| bad("token has characters not allowed in an HTTP header"))?;
        authorization.set_sensitive(true);
        if config.index.as_deref().is_some_and(str::is_empty) {
            return Err(bad("index is empty (leave it out for the token's default)"));
        }
        if config.sourcetype.is_empty() || config.source.is_empty() {
            return Err(bad("source and sourcetype must not be empty"));
        }
        if config.indexer_ack {
            if config.ack_poll_ms == 0 || config.ack_poll_ms > config.ack_timeout_ms {
                return Err(bad("ack_poll_ms must be between 1 and ack_timeout_ms"));
            }
            if config.ack_timeout_ms > ACK_TIMEOUT_MS_MAX {
                return Err(bad(&format!(
                    "ack_timeout_ms must be at most {ACK_TIMEOUT_MS_MAX} (a send may take 60 s)"
                )));
            }
        }
        let client = http::client_with(
            "splunk_hec",
            &http::ClientOptions {
                timeout_ms: config.timeout_ms,
                tls_ca: config.tls_ca.as_ref(),
                insecure_skip_verify: config.insecure_skip_verify,
            },
        )?;
        Ok(SplunkHecSink {
            endpoint: endpoint(&config.url),
            ack_endpoint: ack_endpoint(&config.url),
            authorization,
            channel: uuid::Uuid::now_v7().to_string(),
            config,
            client,
        })
    }

    /// Posts one request carrying `batch`.
    async fn post(&self, batch: &[Delivery]) -> Verdict {
        let request = self
            .client
            .post(&self.endpoint)
            .header(reqwest::header::AUTHORIZATION, self.authorization.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Splunk-Request-Channel", &self.channel)
            .body(hec_payload(&self.config, batch));
        match http::exchange(&self.endpoint, request, ANSWER_BYTES_MAX).await {
            Ok(answer) => classify(answer.status, &answer.body, answer.retry_after),
            Err(f) => Verdict::Failed(f),
        }
    }

    /// Posts `batch` and, with indexer acknowledgement on, waits until HEC
    /// acknowledges it: only then is it [`Verdict::Delivered`].
    async fn deliver(&self, batch: &[Delivery]) -> Verdict {
        match self.post(batch).await {
            Verdict::Delivered(ack) if self.config.indexer_ack => match ack {
                Some(id) => match self.wait_for_ack(id).await {
                    Ok(()) => Verdict::Delivered(Some(id)),
                    Err(f) => Verdict::Failed(f),
                },
                None => Verdict::Failed(SinkFailure::retryable(format!(
                    "{}: HEC accepted the request without an ackId: indexer acknowledgement is \
                     off for this token; turn it on, or set indexer_ack = false",
                    self.endpoint
                ))),
            },
            other => other,
        }
    }

    /// Polls the ack endpoint every `ack_poll_ms` until `ack_id` is
    /// acknowledged; a retryable failure after `ack_timeout_ms`, or on an
    /// answer that is not an ack status.
    async fn wait_for_ack(&self, ack_id: u64) -> Result<(), SinkFailure> {
        let poll = std::time::Duration::from_millis(self.config.ack_poll_ms);
        let timeout = std::time::Duration::from_millis(self.config.ack_timeout_ms);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            tokio::time::sleep(
                poll.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
            )
            .await;
            let request = self
                .client
                .post(&self.ack_endpoint)
                .header(reqwest::header::AUTHORIZATION, self.authorization.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("X-Splunk-Request-Channel", &self.channel)
                .body(ack_query(ack_id));
            let answer = http::exchange(&self.ack_endpoint, request, ANSWER_BYTES_MAX).await?;
            if !(200..300).contains(&answer.status) {
                return Err(
                    match classify(answer.status, &answer.body, answer.retry_after) {
                        Verdict::Failed(f) => f,
                        Verdict::ContentRefused { failure, .. } => failure,
                        Verdict::Delivered(_) => SinkFailure::retryable(format!(
                            "{}: HTTP {}",
                            self.ack_endpoint, answer.status
                        )),
                    },
                );
            }
            match ack_status(&answer.body, ack_id) {
                Some(true) => return Ok(()),
                Some(false) => {}
                None => {
                    return Err(http::retryable_with(
                        Some(answer.status),
                        format!("{}: not an acknowledgement status", self.ack_endpoint),
                        None,
                        &answer.body,
                    ))
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(SinkFailure::retryable(format!(
                    "HEC did not acknowledge ackId {ack_id} on channel {} within {timeout:?}: \
                     sent again",
                    self.channel
                )));
            }
        }
    }

    async fn post_one(&self, d: &Delivery) -> Result<(), SinkFailure> {
        match self.deliver(std::slice::from_ref(d)).await {
            Verdict::Delivered(_) => Ok(()),
            Verdict::ContentRefused { failure, .. } | Verdict::Failed(failure) => Err(failure),
        }
    }
}

impl Sink for SplunkHecSink {
    fn send<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, SendOutcome> {
        Box::pin(async move {
            if batch.is_empty() {
                return SendOutcome::Delivered;
            }
            let this = &*self;
            match this.deliver(batch).await {
                Verdict::Delivered(_) => SendOutcome::Delivered,
                Verdict::Failed(f) => SendOutcome::Failed(f),
                Verdict::ContentRefused { failure, .. } if batch.len() == 1 => {
                    SendOutcome::Failed(failure)
                }
                // Find the faulty event(s) by sending alone; bounded by the
                // batch size, and only on content errors, which the sink's
                // own encoding should never cause.
                Verdict::ContentRefused { .. } => {
                    http::one_by_one(batch, |d| this.post_one(d)).await
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use auditflow_protocol::{Hash32, Timestamp};

    use super::*;
    use crate::sinks::FailureKind;

    fn config() -> Config {
        serde_json::from_value(json!({"url": "https://h:8088", "token": "tok"})).unwrap()
    }

    fn delivery(offset: u64, event: Value) -> Delivery {
        Delivery {
            partition: 2,
            offset,
            event_id: format!("e{offset}"),
            tenant: "acme".into(),
            received_at: Timestamp(1_700_000_000_500_000_000),
            hash: Hash32::ZERO,
            body: crate::sinks::Body::from_value(
                &json!({"partition": 2, "offset": offset, "event": event}),
            ),
        }
    }

    #[test]
    fn defaults_and_endpoint() {
        let c = config();
        assert_eq!(c.sourcetype, "auditflow");
        assert_eq!(c.source, "auditflow");
        assert_eq!(c.timeout_ms, 10_000);
        assert!(!c.insecure_skip_verify && c.index.is_none());
        assert!(!format!("{c:?}").contains("tok\""));
        assert_eq!(
            endpoint("https://h:8088"),
            "https://h:8088/services/collector/event"
        );
        assert_eq!(
            endpoint("https://h:8088/"),
            "https://h:8088/services/collector/event"
        );
        assert_eq!(
            endpoint("https://h/splunk/services/collector/event"),
            "https://h/splunk/services/collector/event"
        );
        assert!(
            serde_json::from_value::<Config>(json!({"url": "u", "token": "t", "x": 1})).is_err()
        );
    }

    #[test]
    fn ack_endpoint_query_and_status() {
        assert_eq!(
            ack_endpoint("https://h:8088/"),
            "https://h:8088/services/collector/ack"
        );
        assert_eq!(
            ack_endpoint("https://h/splunk/services/collector/event"),
            "https://h/splunk/services/collector/ack"
        );
        assert_eq!(ack_query(3), r#"{"acks":[3]}"#);
        let cases = [
            (r#"{"acks":{"3":true}}"#, Some(true)),
            (r#"{"acks":{"3":false,"4":true}}"#, Some(false)),
            // Forgotten (HEC restarted, or asked twice): not acknowledged.
            (r#"{"acks":{}}"#, Some(false)),
            (r#"{"text":"ACK is disabled","code":14}"#, None),
            ("<html>", None),
        ];
        for (body, want) in cases {
            assert_eq!(ack_status(body, 3), want, "{body}");
        }
        let c = config();
        assert!(!c.indexer_ack);
        assert_eq!((c.ack_poll_ms, c.ack_timeout_ms), (500, 30_000));
    }

    #[test]
    fn bad_settings_are_refused() {
        let mut c = config();
        c.indexer_ack = true;
        c.ack_timeout_ms = ACK_TIMEOUT_MS_MAX + 1;
        assert!(SplunkHecSink::new(c).is_err());
        let mut c = config();
        c.indexer_ack = true;
        c.ack_poll_ms = 0;
        assert!(SplunkHecSink::new(c).is_err());
        let mut c = config();
        c.token = " ".into();
        assert!(SplunkHecSink::new(c).is_err());
        let mut c = config();
        c.token = "a\nb".into();
        assert!(SplunkHecSink::new(c).is_err());
        let mut c = config();
        c.index = Some(String::new());
        assert!(SplunkHecSink::new(c).is_err());
        let mut c = config();
        c.url = "splunk:8088".into();
        assert!(SplunkHecSink::new(c).is_err());
        assert!(SplunkHecSink::new(config()).is_ok());
    }

    #[test]
    fn event_objects_carry_time_host_and_string_fields() {
        let mut c = config();
        c.index = Some("audit".into());
        let d = delivery(
            42,
            json!({"id": "e42", "time": "2023-11-14T22:13:20.123456789Z", "source": {"host": "api-1"}}),
        );
        let v = hec_event(&c, &d);
        assert_eq!(v["time"], json!(1_700_000_000.123));
        assert_eq!(v["host"], "api-1");
        assert_eq!(v["source"], "auditflow");
        assert_eq!(v["sourcetype"], "auditflow");
        assert_eq!(v["index"], "audit");
        assert_eq!(v["event"], d.body.to_value());
        assert_eq!(
            v["fields"],
            json!({"event_id": "e42", "tenant": "acme", "partition": "2", "offset": "42"})
        );
        // No event time: received_at; no host: left out; no index: left out.
        let d = delivery(1, json!({"id": "e1"}));
        let v = hec_event(&config(), &d);
        assert_eq!(v["time"], json!(1_700_000_000.5));
        assert!(v.get("host").is_none() && v.get("index").is_none());
    }

    #[test]
    fn payload_is_concatenated_objects() {
        let batch = [
            delivery(1, json!({"id": "e1"})),
            delivery(2, json!({"id": "e2"})),
        ];
        let body = hec_payload(&config(), &batch);
        let text = String::from_utf8(body).unwrap();
        assert!(text.ends_with('\n'));
        let objects: Vec<Value> = serde_json::Deserializer::from_str(&text)
            .into_iter::<Value>()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[1]["fields"]["event_id"], "e2");
    }

    #[test]
    fn answers_are_classified() {
        let hint = Some(Duration::from_secs(3));
        assert_eq!(
            classify(200, r#"{"text":"Success","code":0}"#, None),
            Verdict::Delivered(None)
        );
        assert_eq!(
            classify(200, r#"{"text":"Success","code":0,"ackId":7}"#, None),
            Verdict::Delivered(Some(7))
        );
        // Content errors: permanent, with HEC's event number.
        let v = classify(
            400,
            r#"{"text":"Invalid data format","code":6,"invalid-event-number":2}"#,
            None,
        );
        let Verdict::ContentRefused {
            failure,
            invalid_event,
        } = v
        else {
            panic!("{v:?}")
        };
        assert_eq!(invalid_event, Some(2));
        assert_eq!(failure.kind, FailureKind::Permanent);
        assert_eq!(failure.status, Some(400));
        assert!(
            failure.message.contains("Invalid data format"),
            "{}",
            failure.message
        );
        assert!(failure.response_excerpt.is_some());
        for code in [5, 12, 13, 15] {
            let body = format!(r#"{{"text":"x","code":{code}}}"#);
            assert!(
                matches!(classify(400, &body, None), Verdict::ContentRefused { .. }),
                "{code}"
            );
        }
        // Token and routing problems: retryable, saying what to fix.
        for (status, code) in [
            (403, 1),
            (401, 2),
            (401, 3),
            (403, 4),
            (400, 7),
            (400, 10),
            (400, 11),
            (400, 14),
        ] {
            let body = format!(r#"{{"text":"x","code":{code}}}"#);
            let Verdict::Failed(f) = classify(status, &body, None) else {
                panic!("{code}")
            };
            assert!(f.is_retryable(), "{code}");
            assert_eq!(f.status, Some(status));
        }
        let Verdict::Failed(f) = classify(403, r#"{"text":"Invalid token","code":4}"#, None) else {
            panic!()
        };
        assert!(f.message.contains("fix `token`"), "{}", f.message);
        // Busy: retryable with the hint.
        let Verdict::Failed(f) = classify(503, r#"{"text":"Server is busy","code":9}"#, hint)
        else {
            panic!()
        };
        assert_eq!(f.kind, FailureKind::Retryable { retry_after: hint });
        // No HEC body: by HTTP status.
        for s in [401, 403, 404, 408, 413, 429, 500, 502] {
            let Verdict::Failed(f) = classify(s, "<html>", None) else {
                panic!("{s}")
            };
            assert!(f.is_retryable(), "{s}");
        }
        let Verdict::Failed(f) = classify(405, "", None) else {
            panic!()
        };
        assert_eq!(f.kind, FailureKind::Permanent);
    }
}
