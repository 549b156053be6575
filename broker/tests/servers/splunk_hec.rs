//! A strict stand-in for Splunk's HTTP Event Collector (HEC) on
//! loopback. There is no Splunk here, so the stand-in checks requests the
//! way HEC does and answers with HEC's own status codes and bodies
//! (`{"text", "code"}`, Splunk documentation "Troubleshoot HTTP Event
//! Collector" and "About HTTP Event Collector Indexer Acknowledgment"):
//!
//! - path `/services/collector/event` (else 404);
//! - `Authorization: Splunk <token>`: missing → 401 code 2 "Token is
//!   required", malformed → 401 code 3 "Invalid authorization", unknown →
//!   403 code 4 "Invalid token";
//! - `X-Splunk-Request-Channel` (or `?channel=`) a GUID, required while
//!   the token has indexer acknowledgement on: missing → 400 code 10 "Data
//!   channel is missing", not a GUID → 400 code 11 "Invalid data channel";
//! - the body: empty → 400 code 5 "No data"; concatenated JSON objects,
//!   else 400 code 6 "Invalid data format"; each with an `event` (else code
//!   12 "Event field is required") that is not blank (else code 13 "Event
//!   field cannot be blank"); a numeric `time` (else code 6); `fields`
//!   values strings or string arrays (else code 15); `index` in the token's
//!   allowed list (else code 7 "Incorrect index"). Errors carry
//!   `invalid-event-number` and, like HEC, the events before the invalid
//!   one are indexed.
//! - Indexer acknowledgement (on by default, [`Inner::acks_enabled`]): an
//!   accepted request answers `{"text":"Success","code":0,"ackId":N}`, N
//!   counting from 0 per channel. `POST /services/collector/ack` with the
//!   channel and `{"acks":[ids]}` answers `{"acks":{"<id>":bool,...}}`;
//!   an id reported `true` is then forgotten (asked again: `false`), as
//!   HEC does. With acknowledgement off, accepted requests carry no
//!   `ackId`, no channel is needed, and the ack endpoint answers 400 code
//!   14 "ACK is disabled".
//!
//! It can also be told to be busy (503 code 9 with `Retry-After: 3`), to
//! refuse given event ids as invalid data (to drive the sink's search for
//! the faulty event in a batch), to delay acknowledgements
//! ([`Inner::ack_delay`]) or to withhold them ([`Inner::withhold_acks`]).
//!
//! Shared by the sink test and the cluster delivery test (`#[path]`).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

/// The token the stand-in accepts.
pub const TOKEN: &str = "11111111-2222-3333-4444-555555555555";

/// The stand-in's state; tests read and set it through [`Hec::with`].
#[derive(Default)]
pub struct Inner {
    /// Indexed events, in order (the HEC event objects as received).
    pub indexed: Vec<Value>,
    /// Channels seen.
    pub channels: BTreeSet<String>,
    /// Requests that reached the collector.
    pub requests: u64,
    /// Indexes the token may write to.
    pub allowed_indexes: BTreeSet<String>,
    /// Event ids (from `fields.event_id`) refused as invalid data.
    pub refuse: BTreeSet<String>,
    /// Answer 503 code 9 "Server is busy".
    pub busy: bool,
    /// Whether the token has indexer acknowledgement on.
    pub acks_enabled: bool,
    /// Per channel: the next ackId, and the ids not yet reported indexed
    /// with when each request was accepted.
    pub acks: BTreeMap<String, Channel>,
    /// An ack turns `true` only this long after its request was accepted.
    pub ack_delay: Duration,
    /// While set, no ack turns `true` (indexing stuck, or HEC restarted
    /// and forgot its ids).
    pub withhold_acks: bool,
    /// Ack status queries answered.
    pub ack_queries: u64,
}

/// One channel's acknowledgement state.
#[derive(Default)]
pub struct Channel {
    /// The next ackId handed out.
    pub next: u64,
    /// Pending ackIds and when their requests were accepted.
    pub pending: BTreeMap<u64, Instant>,
}

/// A running stand-in.
#[derive(Clone)]
pub struct Hec {
    pub inner: Arc<Mutex<Inner>>,
    pub addr: SocketAddr,
}

impl Hec {
    /// Starts the stand-in on a free loopback port, acknowledgement on.
    pub async fn start() -> Hec {
        let inner = Arc::new(Mutex::new(Inner {
            allowed_indexes: ["main", "audit"].map(String::from).into(),
            acks_enabled: true,
            ..Inner::default()
        }));
        let app = Router::new()
            .route("/services/collector/event", post(collect))
            .route("/services/collector/ack", post(ack))
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

    /// The base URL to configure.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Runs `f` on the state.
    pub fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().expect("hec lock"))
    }

    /// `fields.event_id` of every indexed event, in order.
    pub fn indexed_ids(&self) -> Vec<String> {
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

/// A HEC answer.
pub fn hec(status: StatusCode, text: &str, code: u64, invalid: Option<usize>) -> Response {
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

/// Whether `s` is a GUID as HEC wants channels.
pub fn is_guid(s: &str) -> bool {
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

/// The request's channel (header, or `?channel=`), if any; a channel
/// that is not a GUID is refused with HEC's answer.
fn channel_of(
    headers: &HeaderMap,
    query: &BTreeMap<String, String>,
) -> Result<Option<String>, Box<Response>> {
    let c = headers
        .get("x-splunk-request-channel")
        .and_then(|v| v.to_str().ok())
        .or(query.get("channel").map(String::as_str));
    match c {
        None => Ok(None),
        Some(c) if !is_guid(c) => Err(Box::new(hec(
            StatusCode::BAD_REQUEST,
            "Invalid data channel",
            11,
            None,
        ))),
        Some(c) => Ok(Some(c.to_string())),
    }
}

/// HEC's answer to a request without the right token, if so.
fn refuse_token(headers: &HeaderMap) -> Option<Response> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    match auth {
        None => Some(hec(StatusCode::UNAUTHORIZED, "Token is required", 2, None)),
        Some(auth) => match auth.strip_prefix("Splunk ") {
            None => Some(hec(
                StatusCode::UNAUTHORIZED,
                "Invalid authorization",
                3,
                None,
            )),
            Some(token) if token != TOKEN => {
                Some(hec(StatusCode::FORBIDDEN, "Invalid token", 4, None))
            }
            Some(_) => None,
        },
    }
}

async fn collect(
    State(inner): State<Arc<Mutex<Inner>>>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut i = inner.lock().expect("hec lock");
    i.requests += 1;
    if let Some(refused) = refuse_token(&headers) {
        return refused;
    }
    let channel = match channel_of(&headers, &query) {
        Err(refused) => return *refused,
        Ok(None) if i.acks_enabled => {
            return hec(StatusCode::BAD_REQUEST, "Data channel is missing", 10, None)
        }
        Ok(c) => c,
    };
    if let Some(c) = &channel {
        i.channels.insert(c.clone());
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
    let ok = |body: Value| (StatusCode::OK, body.to_string()).into_response();
    match channel {
        Some(c) if i.acks_enabled => {
            let channel = i.acks.entry(c).or_default();
            let id = channel.next;
            channel.next += 1;
            channel.pending.insert(id, Instant::now());
            ok(json!({"text": "Success", "code": 0, "ackId": id}))
        }
        _ => ok(json!({"text": "Success", "code": 0})),
    }
}

/// `POST /services/collector/ack`: the status of the asked ackIds of the
/// request's channel; one reported `true` is forgotten, as HEC does.
async fn ack(
    State(inner): State<Arc<Mutex<Inner>>>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut i = inner.lock().expect("hec lock");
    if let Some(refused) = refuse_token(&headers) {
        return refused;
    }
    if !i.acks_enabled {
        return hec(StatusCode::BAD_REQUEST, "ACK is disabled", 14, None);
    }
    let channel = match channel_of(&headers, &query) {
        Err(refused) => return *refused,
        Ok(None) => return hec(StatusCode::BAD_REQUEST, "Data channel is missing", 10, None),
        Ok(Some(c)) => c,
    };
    let asked: Option<Vec<u64>> = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v.get("acks").cloned())
        .and_then(|a| serde_json::from_value(a).ok());
    let Some(asked) = asked else {
        return hec(StatusCode::BAD_REQUEST, "Invalid data format", 6, None);
    };
    i.ack_queries += 1;
    let (withhold, delay) = (i.withhold_acks, i.ack_delay);
    let pending = &mut i.acks.entry(channel).or_default().pending;
    let mut status = serde_json::Map::new();
    for id in asked {
        let done = !withhold && pending.get(&id).is_some_and(|at| at.elapsed() >= delay);
        if done {
            pending.remove(&id);
        }
        status.insert(id.to_string(), json!(done));
    }
    (StatusCode::OK, json!({ "acks": status }).to_string()).into_response()
}
