//! The Splunk HEC sink against a strict stand-in for the HTTP Event
//! Collector on loopback. There is no Splunk here, so the stand-in checks
//! requests the way HEC does and answers with HEC's own status codes and
//! bodies (`{"text", "code"}`, Splunk documentation "Troubleshoot HTTP
//! Event Collector"):
//!
//! - path `/services/collector/event` (else 404);
//! - `Authorization: Splunk <token>`: missing → 401 code 2 "Token is
//!   required", malformed → 401 code 3 "Invalid authorization", unknown →
//!   403 code 4 "Invalid token";
//! - `X-Splunk-Request-Channel` a GUID (the token has indexer
//!   acknowledgement on): missing → 400 code 10, not a GUID → 400 code 11;
//! - the body: empty → 400 code 5 "No data"; concatenated JSON objects,
//!   else 400 code 6 "Invalid data format"; each with an `event` (else code
//!   12 "Event field is required") that is not blank (else code 13 "Event
//!   field cannot be blank"); a numeric `time` (else code 6); `fields`
//!   values strings or string arrays (else code 15); `index` in the token's
//!   allowed list (else code 7 "Incorrect index"). Errors carry
//!   `invalid-event-number` and, like HEC, the events before the invalid
//!   one are indexed.
//!
//! It can also be told to be busy (503 code 9 with `Retry-After: 3`) and
//! to refuse given event ids as invalid data (to drive the sink's search
//! for the faulty event in a batch).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use auditflow_broker::sinks::splunk_hec::{Config, SplunkHecSink};
use auditflow_broker::sinks::{Delivery, FailureKind, SendOutcome, Sink, SinkConfig};
use auditflow_protocol::{Hash32, Timestamp};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

const TOKEN: &str = "11111111-2222-3333-4444-555555555555";

#[derive(Default)]
struct Inner {
    /// Indexed events, in order (the HEC event objects as received).
    indexed: Vec<Value>,
    /// Channels seen.
    channels: BTreeSet<String>,
    /// Requests that reached the collector.
    requests: u64,
    /// Indexes the token may write to.
    allowed_indexes: BTreeSet<String>,
    /// Event ids (from `fields.event_id`) refused as invalid data.
    refuse: BTreeSet<String>,
    /// Answer 503 code 9 "Server is busy".
    busy: bool,
    /// Next ackId (acknowledgement is on).
    next_ack: u64,
}

#[derive(Clone)]
struct Hec {
    inner: Arc<Mutex<Inner>>,
    addr: SocketAddr,
}

impl Hec {
    async fn start() -> Hec {
        let inner = Arc::new(Mutex::new(Inner {
            allowed_indexes: ["main", "audit"].map(String::from).into(),
            ..Inner::default()
        }));
        let app = Router::new()
            .route("/services/collector/event", post(collect))
            .fallback(|| async {
                (
                    StatusCode::NOT_FOUND,
                    r#"{"text":"The requested URL was not found on this server.","code":404}"#,
                )
            })
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Hec { inner, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().expect("hec lock"))
    }

    fn indexed_ids(&self) -> Vec<String> {
        self.with(|i| {
            i.indexed
                .iter()
                .map(|e| {
                    e["fields"]["event_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect()
        })
    }
}

fn hec(status: StatusCode, text: &str, code: u64, invalid: Option<usize>) -> Response {
    let mut body = json!({"text": text, "code": code});
    if let Some(n) = invalid {
        body["invalid-event-number"] = json!(n);
    }
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn is_guid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn blank(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.trim().is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Checks one event object; `Err` is the HEC error (text, code).
fn check_event(i: &Inner, v: &Value) -> Result<(), (StatusCode, &'static str, u64)> {
    let invalid = (StatusCode::BAD_REQUEST, "Invalid data format", 6);
    let Some(obj) = v.as_object() else {
        return Err(invalid);
    };
    let Some(event) = obj.get("event") else {
        return Err((StatusCode::BAD_REQUEST, "Event field is required", 12));
    };
    if blank(event) {
        return Err((StatusCode::BAD_REQUEST, "Event field cannot be blank", 13));
    }
    if let Some(time) = obj.get("time") {
        if !time.is_number() {
            return Err(invalid);
        }
    }
    for key in ["host", "source", "sourcetype", "index"] {
        if obj.get(key).is_some_and(|v| !v.is_string()) {
            return Err(invalid);
        }
    }
    if let Some(index) = obj.get("index").and_then(Value::as_str) {
        if !i.allowed_indexes.contains(index) {
            return Err((StatusCode::BAD_REQUEST, "Incorrect index", 7));
        }
    }
    if let Some(fields) = obj.get("fields") {
        let ok = fields.as_object().is_some_and(|f| {
            f.values().all(|v| {
                v.is_string() || v.as_array().is_some_and(|a| a.iter().all(Value::is_string))
            })
        });
        if !ok {
            return Err((
                StatusCode::BAD_REQUEST,
                "Error in handling indexed fields",
                15,
            ));
        }
    }
    let id = obj
        .get("fields")
        .and_then(|f| f.get("event_id"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    if i.refuse.contains(id) {
        return Err(invalid);
    }
    Ok(())
}

async fn collect(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut i = inner.lock().expect("hec lock");
    i.requests += 1;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    match header("authorization") {
        None => return hec(StatusCode::UNAUTHORIZED, "Token is required", 2, None),
        Some(auth) => match auth.strip_prefix("Splunk ") {
            None => return hec(StatusCode::UNAUTHORIZED, "Invalid authorization", 3, None),
            Some(token) if token != TOKEN => {
                return hec(StatusCode::FORBIDDEN, "Invalid token", 4, None)
            }
            Some(_) => {}
        },
    }
    match header("x-splunk-request-channel") {
        None => return hec(StatusCode::BAD_REQUEST, "Data channel is missing", 10, None),
        Some(c) if !is_guid(c) => {
            return hec(StatusCode::BAD_REQUEST, "Invalid data channel", 11, None)
        }
        Some(c) => {
            let c = c.to_string();
            i.channels.insert(c);
        }
    }
    if i.busy {
        let mut r = hec(StatusCode::SERVICE_UNAVAILABLE, "Server is busy", 9, None);
        r.headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from_static("3"));
        return r;
    }
    if body.trim().is_empty() {
        return hec(StatusCode::BAD_REQUEST, "No data", 5, None);
    }
    // HEC reads the objects in order and indexes each valid one; the first
    // invalid one ends the request with its number.
    for (n, parsed) in serde_json::Deserializer::from_str(&body)
        .into_iter::<Value>()
        .enumerate()
    {
        let Ok(v) = parsed else {
            return hec(StatusCode::BAD_REQUEST, "Invalid data format", 6, Some(n));
        };
        if let Err((status, text, code)) = check_event(&i, &v) {
            return hec(status, text, code, Some(n));
        }
        i.indexed.push(v);
    }
    let ack = i.next_ack;
    i.next_ack += 1;
    (
        StatusCode::OK,
        json!({"text": "Success", "code": 0, "ackId": ack}).to_string(),
    )
        .into_response()
}

fn delivery(offset: u64) -> Delivery {
    let id = format!("evt-{offset}");
    Delivery {
        partition: 3,
        offset,
        event_id: id.clone(),
        tenant: "acme".into(),
        received_at: Timestamp(1_700_000_100_000_000_000),
        hash: Hash32::ZERO,
        body: auditflow_broker::sinks::Body::from_value(&json!({
            "partition": 3,
            "offset": offset,
            "event": {
                "id": id,
                "time": "2023-11-14T22:13:20.250Z",
                "action": "user.login",
                "source": {"service": "api", "host": "api-7"},
            },
        })),
    }
}

fn config(url: &str) -> Config {
    serde_json::from_value(json!({"url": url, "token": TOKEN, "timeout_ms": 5000})).expect("config")
}

fn batch(offsets: std::ops::Range<u64>) -> Vec<Delivery> {
    offsets.map(delivery).collect()
}

#[tokio::test]
async fn a_batch_is_indexed_with_metadata_and_indexed_fields() {
    let hec = Hec::start().await;
    let mut cfg = config(&hec.url());
    cfg.index = Some("audit".into());
    cfg.sourcetype = "auditflow:event".into();
    let mut sink = SplunkHecSink::new(cfg).expect("sink");
    let events = batch(0..5);

    assert_eq!(sink.send(&events).await, SendOutcome::Delivered);

    let indexed = hec.with(|i| i.indexed.clone());
    assert_eq!(indexed.len(), 5);
    assert_eq!(hec.with(|i| i.requests), 1, "one request per batch");
    for (e, d) in indexed.iter().zip(&events) {
        assert_eq!(e["event"], d.body.to_value());
        assert_eq!(e["time"], json!(1_700_000_000.25), "the producer's time");
        assert_eq!(e["host"], "api-7");
        assert_eq!(e["index"], "audit");
        assert_eq!(e["source"], "auditflow");
        assert_eq!(e["sourcetype"], "auditflow:event");
        assert_eq!(e["fields"]["event_id"], d.event_id.as_str());
        assert_eq!(e["fields"]["tenant"], "acme");
        assert_eq!(e["fields"]["partition"], "3");
        assert_eq!(e["fields"]["offset"], d.offset.to_string());
    }
    // One channel per sink, kept across requests.
    assert_eq!(sink.send(&batch(5..6)).await, SendOutcome::Delivered);
    assert_eq!(hec.with(|i| i.channels.len()), 1);
}

#[tokio::test]
async fn token_problems_are_retryable_and_say_so() {
    let hec = Hec::start().await;
    let mut cfg = config(&hec.url());
    cfg.token = "wrong".into();
    let mut sink = SplunkHecSink::new(cfg).expect("sink");
    let SendOutcome::Failed(f) = sink.send(&batch(0..3)).await else {
        panic!("expected a failed batch")
    };
    assert_eq!(f.status, Some(403));
    assert!(f.is_retryable(), "a bad token must not park events: {f:?}");
    assert!(
        f.message.contains("Invalid token") && f.message.contains("fix `token`"),
        "{}",
        f.message
    );
    assert!(f
        .response_excerpt
        .as_deref()
        .is_some_and(|e| e.contains("\"code\":4")));
    assert!(hec.indexed_ids().is_empty());
}

#[tokio::test]
async fn an_index_the_token_may_not_use_is_retryable() {
    let hec = Hec::start().await;
    let mut cfg = config(&hec.url());
    cfg.index = Some("secret".into());
    let mut sink = SplunkHecSink::new(cfg).expect("sink");
    let SendOutcome::Failed(f) = sink.send(&batch(0..2)).await else {
        panic!("expected a failed batch")
    };
    assert_eq!(f.status, Some(400));
    assert!(
        f.is_retryable() && f.message.contains("Incorrect index"),
        "{f:?}"
    );
}

#[tokio::test]
async fn a_refused_event_is_found_and_fails_alone() {
    let hec = Hec::start().await;
    let mut sink = SplunkHecSink::new(config(&hec.url())).expect("sink");
    hec.with(|i| i.refuse.insert("evt-2".into()));
    let events = batch(0..5);

    let SendOutcome::PerItem(results) = sink.send(&events).await else {
        panic!("expected per-item results")
    };
    assert_eq!(results.len(), 5);
    for (n, r) in results.iter().enumerate() {
        if n == 2 {
            let f = r.as_ref().expect_err("refused");
            assert_eq!(f.kind, FailureKind::Permanent);
            assert_eq!(f.status, Some(400));
            assert!(f.message.contains("Invalid data format"), "{}", f.message);
        } else {
            assert!(r.is_ok(), "event {n}: {r:?}");
        }
    }
    // Every good event is indexed (those before the refused one twice:
    // at-least-once rather than trusting a partial request), none lost.
    let ids: BTreeSet<String> = hec.indexed_ids().into_iter().collect();
    let want: BTreeSet<String> = ["evt-0", "evt-1", "evt-3", "evt-4"]
        .map(String::from)
        .into();
    assert_eq!(ids, want);
}

#[tokio::test]
async fn a_single_refused_event_fails_permanently() {
    let hec = Hec::start().await;
    let mut sink = SplunkHecSink::new(config(&hec.url())).expect("sink");
    hec.with(|i| i.refuse.insert("evt-0".into()));
    let SendOutcome::Failed(f) = sink.send(&batch(0..1)).await else {
        panic!("expected a failed batch")
    };
    assert_eq!((f.kind, f.status), (FailureKind::Permanent, Some(400)));
    assert_eq!(hec.with(|i| i.requests), 1);
}

#[tokio::test]
async fn busy_is_retryable_with_the_hint() {
    let hec = Hec::start().await;
    let mut sink = SplunkHecSink::new(config(&hec.url())).expect("sink");
    hec.with(|i| i.busy = true);
    let SendOutcome::Failed(f) = sink.send(&batch(0..3)).await else {
        panic!("expected a failed batch")
    };
    assert_eq!(f.status, Some(503));
    assert_eq!(
        f.kind,
        FailureKind::Retryable {
            retry_after: Some(Duration::from_secs(3))
        }
    );
    assert!(f.message.contains("Server is busy"), "{}", f.message);
    hec.with(|i| i.busy = false);
    assert_eq!(sink.send(&batch(0..3)).await, SendOutcome::Delivered);
    assert_eq!(hec.indexed_ids(), ["evt-0", "evt-1", "evt-2"]);
}

#[tokio::test]
async fn a_wrong_path_and_a_collector_that_is_down_are_retryable() {
    let hec = Hec::start().await;
    let mut cfg = config(&format!("{}/wrong", hec.url()));
    cfg.timeout_ms = 2000;
    let mut sink = SplunkHecSink::new(cfg).expect("sink");
    let SendOutcome::Failed(f) = sink.send(&batch(0..1)).await else {
        panic!("expected a failed batch")
    };
    assert_eq!(f.status, Some(404));
    assert!(f.is_retryable() && f.message.contains("fix `url`"), "{f:?}");

    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let mut sink = SplunkHecSink::new(config(&format!("http://{addr}"))).expect("sink");
    let SendOutcome::Failed(f) = sink.send(&batch(0..1)).await else {
        panic!("expected a failed batch")
    };
    assert_eq!(f.kind, FailureKind::Retryable { retry_after: None });
    assert!(f.message.contains("cannot connect"), "{}", f.message);
}

#[tokio::test]
async fn the_stand_in_refuses_what_hec_refuses() {
    // The stand-in is only worth its checks: raw requests that break HEC's
    // rules get HEC's answers.
    let hec = Hec::start().await;
    let client = reqwest::Client::new();
    let url = format!("{}/services/collector/event", hec.url());
    let channel = "0b6f1f8e-5a1c-4c8e-9d55-3f7e2b1a9c00";
    let post = |auth: Option<&str>, channel: Option<&str>, body: &str| {
        let mut r = client.post(&url).body(body.to_string());
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        if let Some(c) = channel {
            r = r.header("x-splunk-request-channel", c);
        }
        async move {
            let resp = r.send().await.expect("send");
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            (status, body["code"].as_u64())
        }
    };
    let auth = format!("Splunk {TOKEN}");
    let ok = r#"{"time": 1.5, "event": {"a": 1}}"#;
    assert_eq!(post(None, Some(channel), ok).await, (401, Some(2)));
    assert_eq!(post(Some(TOKEN), Some(channel), ok).await, (401, Some(3)));
    assert_eq!(
        post(Some("Splunk nope"), Some(channel), ok).await,
        (403, Some(4))
    );
    assert_eq!(post(Some(&auth), None, ok).await, (400, Some(10)));
    assert_eq!(post(Some(&auth), Some("chan"), ok).await, (400, Some(11)));
    assert_eq!(post(Some(&auth), Some(channel), "").await, (400, Some(5)));
    assert_eq!(
        post(Some(&auth), Some(channel), "{not json").await,
        (400, Some(6))
    );
    assert_eq!(
        post(Some(&auth), Some(channel), r#"{"time": "x", "event": 1}"#).await,
        (400, Some(6))
    );
    assert_eq!(
        post(Some(&auth), Some(channel), r#"{"time": 1}"#).await,
        (400, Some(12))
    );
    assert_eq!(
        post(Some(&auth), Some(channel), r#"{"event": ""}"#).await,
        (400, Some(13))
    );
    assert_eq!(
        post(
            Some(&auth),
            Some(channel),
            r#"{"event": 1, "fields": {"n": 1}}"#
        )
        .await,
        (400, Some(15))
    );
    assert_eq!(
        post(Some(&auth), Some(channel), &format!("{ok}\n{ok}")).await,
        (200, Some(0))
    );
    assert_eq!(hec.with(|i| i.indexed.len()), 2);
}

#[tokio::test]
async fn configured_through_the_destination_settings() {
    let hec = Hec::start().await;
    let config: SinkConfig = serde_json::from_value(json!({
        "kind": "splunk_hec",
        "url": hec.url(),
        "token": TOKEN,
        "index": "main",
    }))
    .expect("settings");
    let ctx = auditflow_broker::sinks::SinkContext {
        cluster: "test-cluster".into(),
    };
    let mut sink = config.build(&ctx).expect("sink");
    assert_eq!(sink.send(&batch(0..2)).await, SendOutcome::Delivered);
    assert_eq!(hec.indexed_ids(), ["evt-0", "evt-1"]);
}
