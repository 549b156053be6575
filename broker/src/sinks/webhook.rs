//! HTTP webhook: JSON POSTs signed per the Standard Webhooks specification
//! (<https://www.standardwebhooks.com>), so receivers can use any of its
//! libraries to verify them.
//!
//! Every request carries:
//! - `webhook-id`: the message id receivers deduplicate on. Single mode:
//!   the event id (the idempotency key, G3), identical on every re-send.
//!   Array mode: `{partition}-{first offset}-{last offset}`, identical when
//!   the same batch is re-sent; a retried batch may be cut differently, so
//!   array receivers that need exact deduplication use the event ids
//!   inside the body (each element carries `event.id`).
//! - `webhook-timestamp`: Unix seconds at sending, so receivers can refuse
//!   replays of old messages.
//! - `webhook-signature` (only with a `secret`): `v1,` + base64 of
//!   HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{body}`, keyed with
//!   the base64-decoded part of the `whsec_` secret.
//! - `auditflow-event-id`, `auditflow-partition`, `auditflow-offset`: the
//!   (first) event's position, for routing and logging without parsing
//!   the body; arrays add `auditflow-last-offset` and `auditflow-count`.
//!
//! Answers: 2xx is success; 408, 429, 5xx and transport errors are
//! retryable (`Retry-After` honoured); other 4xx are permanent. In single
//! mode each event has its own result (a 400 parks only that event).
//!
//! Concurrency (`ordering = "none"`, `max_in_flight` > 1): single mode
//! sends up to that many events at once and reports every event's result
//! (events after a failed one are not held back); array mode cuts the
//! batch into that many arrays, sent at once. With one in flight (strict
//! ordering) single mode stops at the first retryable failure, so nothing
//! after it arrives first.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use futures::future::BoxFuture;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use reqwest::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::http;
use super::{Delivery, SendOutcome, Sink, SinkConfigError, SinkFailure};

/// The prefix of Standard Webhooks symmetric secrets.
pub const SECRET_PREFIX: &str = "whsec_";

/// Headers the sink sets itself; configured extra headers may not
/// override them, or a typo could silently break signatures or ids.
const RESERVED_HEADERS: [&str; 5] = [
    "content-type",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-length",
];

/// How events are put in requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchMode {
    /// One POST per event, body = the event. Per-event results: a refused
    /// event is parked alone. The default, because it is what webhook
    /// receivers expect.
    #[default]
    Single,
    /// One POST per batch, body = a JSON array of events: fewer requests
    /// for receivers that accept arrays; a refusal fails the whole batch.
    Array,
}

/// Settings of a webhook destination.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Endpoint URL (http or https). Redirects are not followed.
    pub url: String,
    /// Standard Webhooks secret (`whsec_` + base64 of the key); requests
    /// are unsigned if absent. A bare base64 key is accepted too.
    #[serde(default)]
    pub secret: Option<String>,
    /// Time limit of one request, connecting to reading the answer.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Extra headers (e.g. an API key for the receiver's gateway). May not
    /// override the headers the sink sets (`webhook-*`, content type).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// One event per request, or arrays.
    #[serde(default)]
    pub batch_mode: BatchMode,
    /// Extra CA certificate (PEM) to trust for https, for private PKIs.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// Written by hand so the secret and header values (API keys) never reach
/// a log line.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header_names: Vec<&String> = self.headers.keys().collect();
        f.debug_struct("Config")
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("timeout_ms", &self.timeout_ms)
            .field("headers", &header_names)
            .field("batch_mode", &self.batch_mode)
            .field("tls_ca", &self.tls_ca)
            .finish()
    }
}

/// The webhook sink.
pub struct WebhookSink {
    /// The settings, checked.
    config: Config,
    /// Extra headers, parsed once.
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The HMAC key, decoded from the secret; `None` sends unsigned.
    key: Option<Vec<u8>>,
    /// Pooled connections to the endpoint.
    client: reqwest::Client,
    /// Requests at once (1: in order, one at a time).
    in_flight: usize,
}

/// Decodes a Standard Webhooks secret (`whsec_` + base64) into the HMAC
/// key. The prefix is optional, like in the specification's libraries.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, String> {
    let b64 = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("secret is not base64 after `{SECRET_PREFIX}`: {e}"))?;
    if key.is_empty() {
        // An empty key signs, but anyone can forge it: refuse.
        return Err("secret is empty".into());
    }
    Ok(key)
}

/// The `webhook-signature` value for a message: `v1,` + base64 of
/// HMAC-SHA256(key, `{id}.{timestamp}.{body}`).
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length: new_from_slice cannot fail here.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("v1,{sig}")
}

/// The `webhook-id` of an array request: `{partition}-{first}-{last}`
/// offsets, the same whenever the same batch is sent again.
pub fn array_id(batch: &[Delivery]) -> String {
    match (batch.first(), batch.last()) {
        (Some(first), Some(last)) => {
            format!("{}-{}-{}", first.partition, first.offset, last.offset)
        }
        _ => String::new(),
    }
}

/// The headers of one request, in sending order (pure: the time comes in).
/// `batch` is the events in the body: one in single mode.
pub fn request_headers(
    key: Option<&[u8]>,
    id: &str,
    timestamp: i64,
    batch: &[Delivery],
    body: &[u8],
) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("content-type", "application/json".to_string()),
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
    ];
    if let Some(key) = key {
        headers.push(("webhook-signature", signature(key, id, timestamp, body)));
    }
    if let Some(first) = batch.first() {
        headers.push(("auditflow-event-id", first.event_id.clone()));
        headers.push(("auditflow-partition", first.partition.to_string()));
        headers.push(("auditflow-offset", first.offset.to_string()));
    }
    if batch.len() > 1 {
        if let Some(last) = batch.last() {
            headers.push(("auditflow-last-offset", last.offset.to_string()));
        }
        headers.push(("auditflow-count", batch.len().to_string()));
    }
    headers
}

impl WebhookSink {
    /// Checks the settings and builds the HTTP client.
    pub fn new(config: Config) -> Result<WebhookSink, SinkConfigError> {
        let bad = |reason: String| SinkConfigError {
            kind: "webhook",
            reason,
        };
        http::parse_url("webhook", &config.url)?;
        let key = match &config.secret {
            Some(s) => Some(secret_key(s).map_err(bad)?),
            None => None,
        };
        let mut headers = Vec::with_capacity(config.headers.len());
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| bad(format!("header {name:?}: {e}")))?;
            // HeaderName is lowercase, so this also catches `Webhook-Id`.
            if RESERVED_HEADERS.contains(&name.as_str()) || name.as_str().starts_with("auditflow-")
            {
                return Err(bad(format!("header {name} is set by the sink")));
            }
            let value = HeaderValue::from_str(value)
                .map_err(|e| bad(format!("header {name} value: {e}")))?;
            headers.push((name, value));
        }
        let client = http::client("webhook", config.timeout_ms, config.tls_ca.as_ref())?;
        Ok(WebhookSink {
            config,
            headers,
            key,
            client,
            in_flight: 1,
        })
    }

    /// Lets `n` requests be in flight at once (the destination's
    /// `max_in_flight` with `ordering = "none"`); at least one.
    pub fn with_in_flight(mut self, n: usize) -> WebhookSink {
        self.in_flight = n.max(1);
        self
    }

    /// POSTs one body carrying `batch` (one event in single mode).
    async fn post(&self, id: &str, batch: &[Delivery], body: Vec<u8>) -> Result<(), SinkFailure> {
        // A clock before 1970 is a broken host; 0 makes receivers refuse
        // the message as too old, which shows up as a visible failure.
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let mut req = self.client.post(&self.config.url);
        for (name, value) in request_headers(self.key.as_deref(), id, timestamp, batch, &body) {
            req = req.header(name, value);
        }
        for (name, value) in &self.headers {
            req = req.header(name.clone(), value.clone());
        }
        http::send(&self.config.url, req.body(body))
            .await
            .map(|_| ())
    }

    /// POSTs `batch` as one JSON array.
    async fn post_array(&self, batch: &[Delivery]) -> Result<(), SinkFailure> {
        let bodies: Vec<&super::Body> = batch.iter().map(|d| &d.body).collect();
        let body = serde_json::to_vec(&bodies)
            .map_err(|e| SinkFailure::permanent(format!("batch does not encode as JSON: {e}")))?;
        self.post(&array_id(batch), batch, body).await
    }

    async fn post_one(&self, d: &Delivery) -> Result<(), SinkFailure> {
        let body = d.body.as_str().as_bytes().to_vec();
        self.post(&d.event_id, std::slice::from_ref(d), body).await
    }
}

impl Sink for WebhookSink {
    fn send<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, SendOutcome> {
        Box::pin(async move {
            if batch.is_empty() {
                return SendOutcome::Delivered;
            }
            let this = &*self;
            match this.config.batch_mode {
                BatchMode::Array if this.in_flight > 1 && batch.len() > 1 => {
                    let chunk = batch.len().div_ceil(this.in_flight);
                    let posts: Vec<_> = batch.chunks(chunk).map(|c| this.post_array(c)).collect();
                    let results = futures::future::join_all(posts).await;
                    let per_item: Vec<_> = batch
                        .chunks(chunk)
                        .zip(results)
                        .flat_map(|(c, r)| std::iter::repeat_n(r, c.len()))
                        .collect();
                    http::per_item_outcome(per_item, batch.len())
                }
                BatchMode::Array => match this.post_array(batch).await {
                    Ok(()) => SendOutcome::Delivered,
                    Err(f) => SendOutcome::Failed(f),
                },
                BatchMode::Single if this.in_flight > 1 => {
                    // Futures start only when polled: `buffered` keeps at
                    // most `in_flight` of them going.
                    let posts: Vec<_> = batch.iter().map(|d| this.post_one(d)).collect();
                    let results = futures::stream::iter(posts)
                        .buffered(this.in_flight)
                        .collect::<Vec<_>>()
                        .await;
                    http::per_item_outcome(results, batch.len())
                }
                BatchMode::Single => http::one_by_one(batch, |d| this.post_one(d)).await,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use auditflow_protocol::{Hash32, Timestamp};

    use super::*;

    fn delivery(partition: u32, offset: u64) -> Delivery {
        Delivery {
            partition,
            offset,
            event_id: format!("e{offset}"),
            tenant: "t".into(),
            received_at: Timestamp(1),
            hash: Hash32::ZERO,
            body: crate::sinks::Body::from_value(&serde_json::json!({"offset": offset})),
        }
    }

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification.
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        // The prefix is optional.
        assert_eq!(secret_key("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap(), key);
        assert!(secret_key("whsec_").is_err());
        assert!(secret_key("whsec_!!!").is_err());
    }

    #[test]
    fn headers_of_single_and_array_requests() {
        let key = b"k".to_vec();
        let one = [delivery(3, 7)];
        let h = request_headers(Some(&key), "e7", 100, &one, b"{}");
        let get =
            |h: &[(&str, String)], n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone());
        assert_eq!(get(&h, "webhook-id").as_deref(), Some("e7"));
        assert_eq!(get(&h, "webhook-timestamp").as_deref(), Some("100"));
        assert_eq!(
            get(&h, "webhook-signature"),
            Some(signature(&key, "e7", 100, b"{}"))
        );
        assert_eq!(get(&h, "auditflow-partition").as_deref(), Some("3"));
        assert_eq!(get(&h, "auditflow-offset").as_deref(), Some("7"));
        assert_eq!(get(&h, "auditflow-count"), None);

        let many = [delivery(2, 5), delivery(2, 6), delivery(2, 9)];
        assert_eq!(array_id(&many), "2-5-9");
        let h = request_headers(None, &array_id(&many), 100, &many, b"[]");
        assert_eq!(get(&h, "webhook-signature"), None);
        assert_eq!(get(&h, "auditflow-event-id").as_deref(), Some("e5"));
        assert_eq!(get(&h, "auditflow-last-offset").as_deref(), Some("9"));
        assert_eq!(get(&h, "auditflow-count").as_deref(), Some("3"));
    }

    #[test]
    fn bad_settings_are_refused() {
        let cfg = |url: &str, secret: Option<&str>, header: Option<(&str, &str)>| Config {
            url: url.into(),
            secret: secret.map(str::to_string),
            timeout_ms: 1000,
            headers: header
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into_iter()
                .collect(),
            batch_mode: BatchMode::Single,
            tls_ca: None,
        };
        assert!(WebhookSink::new(cfg("ftp://x", None, None)).is_err());
        assert!(WebhookSink::new(cfg("not a url", None, None)).is_err());
        assert!(WebhookSink::new(cfg("http://x", Some("whsec_!!!"), None)).is_err());
        assert!(WebhookSink::new(cfg("http://x", None, Some(("Webhook-Id", "x")))).is_err());
        assert!(WebhookSink::new(cfg("http://x", None, Some(("bad name", "x")))).is_err());
        assert!(WebhookSink::new(cfg("http://x", None, Some(("x-key", "a\nb")))).is_err());
        assert!(WebhookSink::new(cfg("http://x", None, Some(("x-api-key", "s")))).is_ok());
        assert!(WebhookSink::new(cfg("http://127.0.0.1:9/hook", None, None)).is_ok());
    }

    #[test]
    fn config_defaults_and_unknown_fields() {
        let c: Config = serde_json::from_value(serde_json::json!({"url": "http://h/x"})).unwrap();
        assert_eq!(c.timeout_ms, 10_000);
        assert_eq!(c.batch_mode, BatchMode::Single);
        assert!(c.secret.is_none() && c.headers.is_empty());
        let c = Config {
            secret: Some("whsec_c2VjcmV0".into()),
            headers: [("x-api-key".to_string(), "hunter2".to_string())].into(),
            ..c
        };
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("c2VjcmV0") && !shown.contains("hunter2"),
            "{shown}"
        );
        let c: Config =
            serde_json::from_value(serde_json::json!({"url": "u", "batch_mode": "array"})).unwrap();
        assert_eq!(c.batch_mode, BatchMode::Array);
        assert!(
            serde_json::from_value::<Config>(serde_json::json!({"url": "u", "sekret": "x"}))
                .is_err()
        );
    }
}
