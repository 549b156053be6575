//! The webhook sink against a real HTTP receiver on loopback that checks
//! requests the way a Standard Webhooks consumer does: it verifies the
//! signature with its own HMAC-SHA256 (not the sink's code), refuses stale
//! timestamps and missing ids, and can be told to refuse events (400), to
//! be overloaded (503 with `Retry-After: 3`), or to hang.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use auditflow_broker::sinks::webhook::{BatchMode, Config, WebhookSink};
use auditflow_broker::sinks::{Delivery, FailureKind, SendOutcome, Sink, SinkConfig};
use auditflow_protocol::{Hash32, Timestamp};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

/// The secret of the tests, and its key bytes decoded independently.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Standard Webhooks' default tolerance for timestamps.
const TIMESTAMP_TOLERANCE_SECS: i64 = 5 * 60;

/// One accepted request.
#[derive(Clone, Debug)]
struct Request {
    headers: BTreeMap<String, String>,
    body: Value,
}

#[derive(Default)]
struct Inner {
    /// Verify signatures with this key (None: expect unsigned requests).
    key: Option<Vec<u8>>,
    /// Accepted requests, in arrival order.
    accepted: Vec<Request>,
    /// Every request that reached the handler, accepted or not.
    requests: u64,
    /// Event ids answered with 400.
    reject: BTreeSet<String>,
    /// Answer everything with 503 and `Retry-After: 3`.
    overloaded: bool,
    /// Never answer (to exercise the client timeout).
    hang: bool,
    /// Event ids answered with 503 (a transient failure).
    busy: BTreeSet<String>,
    /// Hold every request this long before answering, so concurrent
    /// ones overlap.
    delay_ms: u64,
    /// Requests being handled now, and the most at once.
    in_flight: u64,
    max_in_flight: u64,
}

/// The receiver; clones share state.
#[derive(Clone)]
struct Receiver {
    inner: Arc<Mutex<Inner>>,
    addr: SocketAddr,
}

impl Receiver {
    async fn start(key: Option<Vec<u8>>) -> Receiver {
        let inner = Arc::new(Mutex::new(Inner {
            key,
            ..Inner::default()
        }));
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { inner, addr }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().expect("receiver lock"))
    }

    fn accepted(&self) -> Vec<Request> {
        self.with(|i| i.accepted.clone())
    }
}

/// The receiver's own Standard Webhooks verification: HMAC-SHA256 over
/// `{id}.{timestamp}.{body}`, compared in constant time against each
/// space-separated `v1,` signature.
fn verify(key: &[u8], id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    header.split(' ').any(|sig| {
        let Some(b64) = sig.strip_prefix("v1,") else {
            return false;
        };
        let Ok(expected) = base64::engine::general_purpose::STANDARD.decode(b64) else {
            return false;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        mac.verify_slice(&expected).is_ok()
    })
}

async fn hook(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let (key, hang, delay) = {
        let mut i = inner.lock().expect("receiver lock");
        i.requests += 1;
        i.in_flight += 1;
        i.max_in_flight = i.max_in_flight.max(i.in_flight);
        (i.key.clone(), i.hang, i.delay_ms)
    };
    if hang {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(Duration::from_millis(delay)).await;
    inner.lock().expect("receiver lock").in_flight -= 1;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let bad = |why: &str| (StatusCode::BAD_REQUEST, why.to_string()).into_response();
    if header("content-type").as_deref() != Some("application/json") {
        return bad("content-type must be application/json");
    }
    let (Some(id), Some(ts)) = (header("webhook-id"), header("webhook-timestamp")) else {
        return bad("missing webhook-id or webhook-timestamp");
    };
    let Ok(ts_secs) = ts.parse::<i64>() else {
        return bad("webhook-timestamp is not an integer");
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    if (now - ts_secs).abs() > TIMESTAMP_TOLERANCE_SECS {
        return bad("webhook-timestamp too far from now");
    }
    match (&key, header("webhook-signature")) {
        (Some(key), Some(sig)) if verify(key, &id, &ts, body.as_bytes(), &sig) => {}
        (Some(_), _) => return (StatusCode::UNAUTHORIZED, "bad signature").into_response(),
        (None, Some(_)) => return bad("unexpected signature"),
        (None, None) => {}
    }
    let Ok(value) = serde_json::from_str::<Value>(&body) else {
        return bad("body is not JSON");
    };
    let mut i = inner.lock().expect("receiver lock");
    if i.overloaded {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "3")],
            "overloaded",
        )
            .into_response();
    }
    let ids: Vec<String> = match &value {
        Value::Array(items) => items.iter().map(event_id).collect(),
        one => vec![event_id(one)],
    };
    if ids.iter().any(|id| i.busy.contains(id)) {
        return (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
    }
    if let Some(refused) = ids.iter().find(|id| i.reject.contains(*id)) {
        return bad(&format!("event {refused} refused"));
    }
    let headers = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    i.accepted.push(Request {
        headers,
        body: value,
    });
    StatusCode::NO_CONTENT.into_response()
}

fn event_id(v: &Value) -> String {
    v["event"]["id"].as_str().unwrap_or_default().to_string()
}

fn delivery(partition: u32, offset: u64) -> Delivery {
    let id = format!("evt-{partition}-{offset}");
    Delivery {
        partition,
        offset,
        event_id: id.clone(),
        tenant: "acme".into(),
        received_at: Timestamp(1_700_000_000_000_000_000),
        hash: Hash32([offset as u8; 32]),
        body: auditflow_broker::sinks::Body::from_value(&json!({
            "partition": partition,
            "offset": offset,
            "received_at": "2023-11-14T22:13:20Z",
            "event": {"id": id, "tenant": "acme", "action": "user.login", "note": "ünïcode \"quoted\""},
        })),
    }
}

fn config(url: &str, secret: Option<&str>, mode: BatchMode) -> Config {
    Config {
        url: url.into(),
        secret: secret.map(str::to_string),
        timeout_ms: 5_000,
        headers: [("x-api-key".to_string(), "k-123".to_string())].into(),
        batch_mode: mode,
        tls_ca: None,
    }
}

fn key() -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .expect("test secret")
}

fn retry_hint(f: &auditflow_broker::sinks::SinkFailure) -> Option<Duration> {
    match f.kind {
        FailureKind::Retryable { retry_after } => retry_after,
        FailureKind::Permanent => None,
    }
}

#[tokio::test]
async fn single_mode_sends_signed_events_with_ids_and_positions() {
    let rx = Receiver::start(Some(key())).await;
    let mut sink =
        WebhookSink::new(config(&rx.url(), Some(SECRET), BatchMode::Single)).expect("sink");
    let batch: Vec<Delivery> = (10..13).map(|o| delivery(4, o)).collect();

    assert_eq!(sink.send(&batch).await, SendOutcome::Delivered);

    let got = rx.accepted();
    assert_eq!(got.len(), 3);
    for (req, d) in got.iter().zip(&batch) {
        assert_eq!(
            req.body,
            d.body.to_value(),
            "body is the delivered JSON, unchanged"
        );
        assert_eq!(req.headers["webhook-id"], d.event_id);
        assert_eq!(req.headers["auditflow-event-id"], d.event_id);
        assert_eq!(req.headers["auditflow-partition"], "4");
        assert_eq!(req.headers["auditflow-offset"], d.offset.to_string());
        assert_eq!(
            req.headers["x-api-key"], "k-123",
            "configured headers are sent"
        );
        assert!(req.headers["webhook-signature"].starts_with("v1,"));
    }
    // Re-sending keeps the webhook-id: the receiver's deduplication key.
    assert_eq!(sink.send(&batch[..1]).await, SendOutcome::Delivered);
    assert_eq!(rx.accepted()[3].headers["webhook-id"], batch[0].event_id);
}

#[tokio::test]
async fn a_wrong_secret_fails_verification_at_the_receiver() {
    let rx = Receiver::start(Some(key())).await;
    let other = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(b"another secret, 24+ bytes")
    );
    let mut sink =
        WebhookSink::new(config(&rx.url(), Some(&other), BatchMode::Single)).expect("sink");
    let SendOutcome::PerItem(results) = sink.send(&[delivery(0, 1)]).await else {
        panic!("expected per-item results")
    };
    // The receiver answers 401: permanent (other 4xx), with the status.
    let f = results[0].as_ref().expect_err("refused");
    assert_eq!(f.status, Some(401));
    assert_eq!(f.kind, FailureKind::Permanent);
    assert_eq!(f.response_excerpt.as_deref(), Some("bad signature"));
    assert!(rx.accepted().is_empty());
}

#[tokio::test]
async fn unsigned_without_a_secret() {
    let rx = Receiver::start(None).await;
    let mut sink = WebhookSink::new(config(&rx.url(), None, BatchMode::Single)).expect("sink");
    assert_eq!(sink.send(&[delivery(0, 1)]).await, SendOutcome::Delivered);
    assert!(!rx.accepted()[0].headers.contains_key("webhook-signature"));
}

#[tokio::test]
async fn array_mode_posts_one_signed_array() {
    let rx = Receiver::start(Some(key())).await;
    let mut sink =
        WebhookSink::new(config(&rx.url(), Some(SECRET), BatchMode::Array)).expect("sink");
    let batch: Vec<Delivery> = (5..9).map(|o| delivery(2, o)).collect();

    assert_eq!(sink.send(&batch).await, SendOutcome::Delivered);

    let got = rx.accepted();
    assert_eq!(got.len(), 1, "one request for the batch");
    let bodies: Vec<Value> = batch.iter().map(|d| d.body.to_value()).collect();
    assert_eq!(got[0].body, Value::Array(bodies));
    assert_eq!(got[0].headers["webhook-id"], "2-5-8");
    assert_eq!(got[0].headers["auditflow-offset"], "5");
    assert_eq!(got[0].headers["auditflow-last-offset"], "8");
    assert_eq!(got[0].headers["auditflow-count"], "4");
}

#[tokio::test]
async fn a_refused_event_fails_alone_in_single_mode() {
    let rx = Receiver::start(Some(key())).await;
    let mut sink =
        WebhookSink::new(config(&rx.url(), Some(SECRET), BatchMode::Single)).expect("sink");
    let batch: Vec<Delivery> = (0..4).map(|o| delivery(1, o)).collect();
    rx.with(|i| i.reject.insert(batch[1].event_id.clone()));

    let SendOutcome::PerItem(results) = sink.send(&batch).await else {
        panic!("expected per-item results")
    };
    assert_eq!(results.len(), 4);
    assert!(results[0].is_ok() && results[2].is_ok() && results[3].is_ok());
    let f = results[1].as_ref().expect_err("refused");
    assert_eq!(f.kind, FailureKind::Permanent);
    assert_eq!(f.status, Some(400));
    assert!(
        f.response_excerpt
            .as_deref()
            .is_some_and(|e| e.contains("refused")),
        "{f:?}"
    );
    let ids: Vec<String> = rx.accepted().iter().map(|r| event_id(&r.body)).collect();
    assert_eq!(ids, ["evt-1-0", "evt-1-2", "evt-1-3"]);
}

#[tokio::test]
async fn a_refused_array_fails_the_batch_permanently() {
    let rx = Receiver::start(None).await;
    let mut sink = WebhookSink::new(config(&rx.url(), None, BatchMode::Array)).expect("sink");
    let batch: Vec<Delivery> = (0..3).map(|o| delivery(1, o)).collect();
    rx.with(|i| i.reject.insert(batch[2].event_id.clone()));
    let SendOutcome::Failed(f) = sink.send(&batch).await else {
        panic!("expected a failed batch")
    };
    assert_eq!((f.kind, f.status), (FailureKind::Permanent, Some(400)));
}

#[tokio::test]
async fn overload_is_retryable_with_the_hint_and_stops_the_batch() {
    let rx = Receiver::start(Some(key())).await;
    let mut sink =
        WebhookSink::new(config(&rx.url(), Some(SECRET), BatchMode::Single)).expect("sink");
    rx.with(|i| i.overloaded = true);
    let batch: Vec<Delivery> = (0..3).map(|o| delivery(1, o)).collect();

    let SendOutcome::PerItem(results) = sink.send(&batch).await else {
        panic!("expected per-item results")
    };
    assert_eq!(results.len(), 3);
    for r in &results {
        let f = r.as_ref().expect_err("overloaded");
        assert_eq!(f.status, Some(503));
        assert_eq!(retry_hint(f), Some(Duration::from_secs(3)));
        assert!(f.is_retryable());
    }
    // Order (G4): after the first retryable failure nothing else is sent.
    assert_eq!(rx.with(|i| i.requests), 1);

    // Array mode: the whole batch, same hint.
    let mut sink =
        WebhookSink::new(config(&rx.url(), Some(SECRET), BatchMode::Array)).expect("sink");
    let SendOutcome::Failed(f) = sink.send(&batch).await else {
        panic!("expected a failed batch")
    };
    assert_eq!(retry_hint(&f), Some(Duration::from_secs(3)));

    // Recovery.
    rx.with(|i| i.overloaded = false);
    assert_eq!(sink.send(&batch).await, SendOutcome::Delivered);
}

#[tokio::test]
async fn a_receiver_that_is_down_or_hangs_is_retryable() {
    // A port nobody listens on: bind, note it, close.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let mut sink = WebhookSink::new(config(
        &format!("http://{addr}/hook"),
        None,
        BatchMode::Array,
    ))
    .expect("sink");
    let SendOutcome::Failed(f) = sink.send(&[delivery(0, 0)]).await else {
        panic!("expected a failed batch")
    };
    assert_eq!(f.kind, FailureKind::Retryable { retry_after: None });
    assert_eq!(f.status, None);
    assert!(f.message.contains("cannot connect"), "{}", f.message);

    let rx = Receiver::start(None).await;
    rx.with(|i| i.hang = true);
    let mut cfg = config(&rx.url(), None, BatchMode::Single);
    cfg.timeout_ms = 200;
    let mut sink = WebhookSink::new(cfg).expect("sink");
    let SendOutcome::PerItem(results) = sink.send(&[delivery(0, 0), delivery(0, 1)]).await else {
        panic!("expected per-item results")
    };
    let f = results[0].as_ref().expect_err("timed out");
    assert!(f.is_retryable() && f.message.contains("timed out"), "{f:?}");
    assert_eq!(results[1], results[0], "the rest waits behind it");
    assert_eq!(rx.with(|i| i.requests), 1);
}

#[tokio::test]
async fn configured_through_the_destination_settings() {
    let rx = Receiver::start(Some(key())).await;
    let config: SinkConfig = serde_json::from_value(json!({
        "kind": "webhook",
        "url": rx.url(),
        "secret": SECRET,
        "headers": {"x-api-key": "k-123"},
    }))
    .expect("settings");
    let ctx = auditflow_broker::sinks::SinkContext {
        cluster: "test-cluster".into(),
        max_in_flight: 1,
    };
    let mut sink = config.build(&ctx).expect("sink");
    assert_eq!(sink.send(&[delivery(0, 0)]).await, SendOutcome::Delivered);
    assert_eq!(rx.accepted().len(), 1);
    // Unknown fields are refused (a typo must not silently disable signing).
    let typo = serde_json::from_value::<SinkConfig>(json!({
        "kind": "webhook", "url": rx.url(), "secert": SECRET,
    }));
    assert!(typo.is_err());
}

#[tokio::test]
async fn unordered_single_mode_overlaps_requests_and_reports_every_result() {
    let rx = Receiver::start(None).await;
    rx.with(|i| {
        i.delay_ms = 100;
        i.busy.insert("evt-0-1".into());
    });
    let batch: Vec<Delivery> = (0..8).map(|o| delivery(0, o)).collect();
    let mut sink = WebhookSink::new(config(&rx.url(), None, BatchMode::Single))
        .expect("sink")
        .with_in_flight(4);
    let SendOutcome::PerItem(results) = sink.send(&batch).await else {
        panic!("expected per-item results")
    };
    // Every event was sent; only the busy one failed, and the ones after
    // it were not held back.
    assert_eq!(results.len(), 8);
    for (o, r) in results.iter().enumerate() {
        if o == 1 {
            assert!(r.as_ref().is_err_and(|f| f.is_retryable()), "{r:?}");
        } else {
            assert_eq!(r, &Ok(()), "event {o}");
        }
    }
    assert_eq!(rx.with(|i| i.requests), 8);
    let most = rx.with(|i| i.max_in_flight);
    assert!(
        (2..=4).contains(&most),
        "at most 4 at once, and overlapping: {most}"
    );

    // One in flight (strict ordering): one at a time, and the busy event
    // stops the batch.
    let rx = Receiver::start(None).await;
    rx.with(|i| {
        i.delay_ms = 20;
        i.busy.insert("evt-0-1".into());
    });
    let mut sink = WebhookSink::new(config(&rx.url(), None, BatchMode::Single)).expect("sink");
    let SendOutcome::PerItem(results) = sink.send(&batch).await else {
        panic!("expected per-item results")
    };
    assert_eq!(results[0], Ok(()));
    assert!(results[1..].iter().all(Result::is_err));
    assert_eq!(rx.with(|i| (i.requests, i.max_in_flight)), (2, 1));
}

#[tokio::test]
async fn unordered_array_mode_cuts_the_batch_into_concurrent_arrays() {
    let rx = Receiver::start(None).await;
    rx.with(|i| {
        i.delay_ms = 100;
        i.busy.insert("evt-2-4".into());
    });
    let batch: Vec<Delivery> = (0..7).map(|o| delivery(2, o)).collect();
    let mut sink = WebhookSink::new(config(&rx.url(), None, BatchMode::Array))
        .expect("sink")
        .with_in_flight(3);
    let SendOutcome::PerItem(results) = sink.send(&batch).await else {
        panic!("expected per-item results")
    };
    // Arrays of 3, 3 and 1: the middle one holds the busy event.
    let ok: Vec<bool> = results.iter().map(Result::is_ok).collect();
    assert_eq!(ok, [true, true, true, false, false, false, true]);
    let mut ids: Vec<String> = rx
        .accepted()
        .iter()
        .map(|r| r.headers["webhook-id"].clone())
        .collect();
    ids.sort();
    assert_eq!(ids, ["2-0-2", "2-6-6"]);
    assert_eq!(rx.with(|i| i.requests), 3);
    assert!(rx.with(|i| i.max_in_flight) >= 2);
}
