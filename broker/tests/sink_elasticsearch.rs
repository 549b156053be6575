//! The Elasticsearch sink against a strict stand-in for the `_bulk` API on
//! loopback. There is no Elasticsearch here, so the stand-in checks
//! requests the way Elasticsearch does and answers with its status codes
//! and error bodies:
//!
//! - credentials (basic or `ApiKey`) → else 401 `security_exception`;
//! - `Content-Type: application/x-ndjson` → else 406 "Content-Type header
//!   [..] is not supported";
//! - a body that ends in a newline → else 400 `illegal_argument_exception`
//!   "The bulk request must be terminated by a newline [\n]"; not empty →
//!   else 400 `action_request_validation_exception` "no requests added";
//! - action lines that are JSON objects with one known action → else 400
//!   `illegal_argument_exception` "Malformed action/metadata line"; with an
//!   `_index` (none in the URL) → else 400 "index is missing";
//! - per item: a document that is not a JSON object, an invalid index name,
//!   or an id it was told to reject → 400 `mapper_parsing_exception` /
//!   `invalid_index_name_exception`; an id it was told to throttle → 429
//!   `es_rejected_execution_exception`; `create` of an existing `_id` → 409
//!   `version_conflict_engine_exception`; otherwise 201 stored;
//! - `filter_path` is applied as Elasticsearch does for the paths the sink
//!   asks for.
//!
//! It can also answer the whole request with 503 + `Retry-After: 3`, or
//! 413 when the body is over a size limit.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use auditflow_broker::sinks::elasticsearch::{Config, ElasticsearchSink};
use auditflow_broker::sinks::{Delivery, FailureKind, SendOutcome, Sink, SinkConfig, SinkFailure};
use auditflow_protocol::{Hash32, Timestamp};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};

const USER: &str = "elastic";
const PASSWORD: &str = "changeme";
/// An API key in the `encoded` form Elasticsearch hands out.
const API_KEY: &str = "VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw==";

#[derive(Default)]
struct Inner {
    /// Stored documents by (index, id).
    docs: BTreeMap<(String, String), Value>,
    /// Bulk requests that passed authentication.
    requests: u64,
    /// Query parameters of the last request.
    last_query: BTreeMap<String, String>,
    /// Ids refused with a mapper_parsing_exception.
    reject: BTreeSet<String>,
    /// Ids answered with 429.
    throttle: BTreeSet<String>,
    /// Answer the whole request with 503 and `Retry-After: 3`.
    unavailable: bool,
    /// Answer 413 above this many body bytes.
    max_body_bytes: Option<usize>,
}

#[derive(Clone)]
struct Es {
    inner: Arc<Mutex<Inner>>,
    addr: SocketAddr,
}

impl Es {
    async fn start() -> Es {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .route("/_bulk", post(bulk))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Es { inner, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().expect("es lock"))
    }

    fn ids(&self) -> Vec<(String, String)> {
        self.with(|i| i.docs.keys().cloned().collect())
    }
}

/// Elasticsearch's error body for a whole request.
fn es_error(status: StatusCode, kind: &str, reason: &str) -> Response {
    let err = json!({"type": kind, "reason": reason});
    let body = json!({"error": {"root_cause": [err.clone()], "type": kind, "reason": reason}, "status": status.as_u16()});
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn item_error(status: u16, index: &str, id: &str, kind: &str, reason: &str) -> Value {
    json!({"_index": index, "_id": id, "status": status, "error": {"type": kind, "reason": reason, "index": index}})
}

fn valid_index_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 255
        && !name.starts_with(['-', '_', '+'])
        && !name
            .chars()
            .any(|c| c.is_ascii_uppercase() || " \\/*?\"<>|,#:".contains(c))
}

// A test server's error path: the size of axum's Response is not a concern.
#[allow(clippy::result_large_err)]
fn authenticated(headers: &HeaderMap) -> Result<(), Response> {
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
    );
    let api_key = format!("ApiKey {API_KEY}");
    match headers.get("authorization").and_then(|v| v.to_str().ok()) {
        None => Err(es_error(
            StatusCode::UNAUTHORIZED,
            "security_exception",
            "missing authentication credentials for REST request [/_bulk]",
        )),
        Some(a) if a == basic || a == api_key => Ok(()),
        Some(_) => Err(es_error(
            StatusCode::UNAUTHORIZED,
            "security_exception",
            "unable to authenticate user for REST request [/_bulk]",
        )),
    }
}

async fn bulk(
    State(inner): State<Arc<Mutex<Inner>>>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Err(r) = authenticated(&headers) {
        return r;
    }
    let mut i = inner.lock().expect("es lock");
    i.requests += 1;
    i.last_query = query.clone();
    if i.unavailable {
        let mut r = es_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster_block_exception",
            "blocked by: [SERVICE_UNAVAILABLE/2/no master];",
        );
        r.headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from_static("3"));
        return r;
    }
    if i.max_body_bytes.is_some_and(|max| body.len() > max) {
        return (StatusCode::PAYLOAD_TOO_LARGE, "").into_response();
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type.split(';').next().map(str::trim) != Some("application/x-ndjson") {
        let body = json!({"error": format!("Content-Type header [{content_type}] is not supported"), "status": 406});
        return (StatusCode::NOT_ACCEPTABLE, body.to_string()).into_response();
    }
    if body.is_empty() {
        return es_error(
            StatusCode::BAD_REQUEST,
            "action_request_validation_exception",
            "Validation Failed: 1: no requests added;",
        );
    }
    if !body.ends_with('\n') {
        return es_error(
            StatusCode::BAD_REQUEST,
            "illegal_argument_exception",
            "The bulk request must be terminated by a newline [\\n]",
        );
    }
    let lines: Vec<&str> = body.split_terminator('\n').collect();
    // First pass: the request's shape, refused as a whole like ES does.
    let mut ops = Vec::new();
    let mut n = 0;
    while n < lines.len() {
        let action: Option<Value> = serde_json::from_str(lines[n]).ok();
        let Some((verb, meta)) = action
            .as_ref()
            .and_then(Value::as_object)
            .filter(|o| o.len() == 1)
            .and_then(|o| o.iter().next())
            .filter(|(k, v)| {
                ["create", "index", "update", "delete"].contains(&k.as_str()) && v.is_object()
            })
        else {
            return es_error(
                StatusCode::BAD_REQUEST,
                "illegal_argument_exception",
                &format!(
                    "Malformed action/metadata line [{}], expected START_OBJECT or END_OBJECT",
                    n + 1
                ),
            );
        };
        let Some(index) = meta.get("_index").and_then(Value::as_str) else {
            return es_error(
                StatusCode::BAD_REQUEST,
                "action_request_validation_exception",
                "Validation Failed: 1: index is missing;",
            );
        };
        let id = meta.get("_id").and_then(Value::as_str).map(str::to_string);
        let source = if verb == "delete" {
            None
        } else {
            n += 1;
            match lines.get(n) {
                Some(line) => Some(*line),
                None => {
                    return es_error(
                        StatusCode::BAD_REQUEST,
                        "illegal_argument_exception",
                        "The bulk request must be terminated by a newline [\\n]",
                    )
                }
            }
        };
        ops.push((verb.clone(), index.to_string(), id, source));
        n += 1;
    }
    // Second pass: each item on its own.
    let mut items = Vec::new();
    let mut errors = false;
    for (verb, index, id, source) in ops {
        let id = id.unwrap_or_else(|| format!("auto-{}", i.docs.len()));
        let doc: Option<Value> = source
            .and_then(|s| serde_json::from_str(s).ok())
            .filter(Value::is_object);
        let result = if verb != "create" {
            item_error(
                400,
                &index,
                &id,
                "illegal_argument_exception",
                "this stand-in only implements create",
            )
        } else if !valid_index_name(&index) {
            item_error(
                400,
                &index,
                &id,
                "invalid_index_name_exception",
                &format!("Invalid index name [{index}]"),
            )
        } else if doc.is_none() || i.reject.contains(&id) {
            item_error(
                400,
                &index,
                &id,
                "mapper_parsing_exception",
                &format!("failed to parse field [event.data.amount] of type [long] in document with id '{id}'"),
            )
        } else if i.throttle.contains(&id) {
            item_error(
                429,
                &index,
                &id,
                "es_rejected_execution_exception",
                "rejected execution of coordinating operation",
            )
        } else {
            match i.docs.entry((index.clone(), id.clone())) {
                std::collections::btree_map::Entry::Occupied(_) => item_error(
                    409,
                    &index,
                    &id,
                    "version_conflict_engine_exception",
                    &format!(
                        "[{id}]: version conflict, document already exists (current version [1])"
                    ),
                ),
                std::collections::btree_map::Entry::Vacant(slot) => {
                    slot.insert(doc.unwrap_or_default());
                    json!({"_index": index, "_id": id, "_version": 1, "result": "created", "status": 201})
                }
            }
        };
        errors |= result.get("error").is_some();
        items.push(json!({ verb: result }));
    }
    let full = json!({"took": 3, "errors": errors, "items": items});
    let answer = match query.get("filter_path") {
        Some(paths) => filter(&full, paths),
        None => full,
    };
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        answer.to_string(),
    )
        .into_response()
}

/// Elasticsearch's `filter_path` for paths of the form `errors` and
/// `items.*.a.b` (what the sink asks for): only the named fields are kept,
/// and objects left empty disappear.
fn filter(full: &Value, paths: &str) -> Value {
    let mut out = serde_json::Map::new();
    let item_paths: Vec<Vec<&str>> = paths
        .split(',')
        .filter_map(|p| p.strip_prefix("items.*."))
        .map(|p| p.split('.').collect())
        .collect();
    if paths.split(',').any(|p| p == "errors") {
        out.insert("errors".into(), full["errors"].clone());
    }
    if !item_paths.is_empty() {
        let items: Vec<Value> = full["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|item| {
                let (verb, result) = item.as_object()?.iter().next()?;
                let mut kept = json!({});
                for path in &item_paths {
                    // A path missing from this item is left out.
                    let Some(src) = path.iter().try_fold(result, |v, key| v.get(key)) else {
                        continue;
                    };
                    let mut dst = &mut kept;
                    for key in &path[..path.len() - 1] {
                        dst = dst
                            .as_object_mut()?
                            .entry(key.to_string())
                            .or_insert_with(|| json!({}));
                    }
                    dst.as_object_mut()?
                        .insert(path[path.len() - 1].to_string(), src.clone());
                }
                // Like Elasticsearch, an item with nothing left is dropped
                // (which is why the sink asks for `status`, which every
                // item has: positions must survive the filter).
                if kept.as_object().is_some_and(|o| o.is_empty()) {
                    return None;
                }
                Some(json!({ verb.clone(): kept }))
            })
            .collect();
        out.insert("items".into(), Value::Array(items));
    }
    Value::Object(out)
}

fn delivery(tenant: &str, offset: u64) -> Delivery {
    let id = format!("evt-{offset}");
    Delivery {
        partition: 1,
        offset,
        event_id: id.clone(),
        tenant: tenant.into(),
        received_at: Timestamp(1_700_000_000_000_000_000),
        hash: Hash32::ZERO,
        body: json!({
            "partition": 1,
            "offset": offset,
            "event": {"id": id, "tenant": tenant, "action": "doc.read", "context": {"note": "line1\nline2"}},
        }),
    }
}

fn config(url: &str) -> Config {
    serde_json::from_value(json!({
        "url": url,
        "index": "audit-{tenant}",
        "username": USER,
        "password": PASSWORD,
        "timeout_ms": 5000,
    }))
    .expect("config")
}

fn batch(offsets: std::ops::Range<u64>) -> Vec<Delivery> {
    offsets.map(|o| delivery("Acme", o)).collect()
}

fn per_item(outcome: SendOutcome) -> Vec<Result<(), SinkFailure>> {
    match outcome {
        SendOutcome::PerItem(r) => r,
        other => panic!("expected per-item results, got {other:?}"),
    }
}

#[tokio::test]
async fn a_batch_is_stored_by_tenant_index_and_event_id() {
    let es = Es::start().await;
    let mut cfg = config(&es.url());
    cfg.pipeline = Some("audit-enrich".into());
    let mut sink = ElasticsearchSink::new(cfg).expect("sink");
    let events = [
        delivery("Acme", 0),
        delivery("globex", 1),
        delivery("Acme", 2),
    ];

    assert_eq!(sink.send(&events).await, SendOutcome::Delivered);

    assert_eq!(es.with(|i| i.requests), 1, "one bulk request per batch");
    let docs = es.with(|i| i.docs.clone());
    assert_eq!(docs.len(), 3);
    for d in &events {
        let index = format!("audit-{}", d.tenant.to_lowercase());
        let stored = &docs[&(index, d.event_id.clone())];
        assert_eq!(stored, &d.body, "the document is the delivered body");
    }
    let query = es.with(|i| i.last_query.clone());
    assert_eq!(
        query.get("pipeline").map(String::as_str),
        Some("audit-enrich")
    );
    assert!(query.contains_key("filter_path"));
}

#[tokio::test]
async fn a_partial_failure_reports_each_item() {
    let es = Es::start().await;
    let mut sink = ElasticsearchSink::new(config(&es.url())).expect("sink");
    es.with(|i| {
        i.reject.insert("evt-1".into());
        i.throttle.insert("evt-3".into());
    });
    let events = batch(0..5);

    let results = per_item(sink.send(&events).await);

    assert_eq!(results.len(), 5);
    assert!(
        results[0].is_ok() && results[2].is_ok() && results[4].is_ok(),
        "{results:?}"
    );
    let refused = results[1].as_ref().expect_err("refused");
    assert_eq!(refused.kind, FailureKind::Permanent);
    assert_eq!(refused.status, Some(400));
    assert!(
        refused.message.contains("mapper_parsing_exception")
            && refused
                .message
                .contains("failed to parse field [event.data.amount]"),
        "{}",
        refused.message
    );
    let throttled = results[3].as_ref().expect_err("throttled");
    assert_eq!(throttled.status, Some(429));
    assert!(throttled.is_retryable());
    let stored: Vec<String> = es.ids().into_iter().map(|(_, id)| id).collect();
    assert_eq!(stored, ["evt-0", "evt-2", "evt-4"]);
}

#[tokio::test]
async fn re_sending_is_idempotent() {
    let es = Es::start().await;
    let mut sink = ElasticsearchSink::new(config(&es.url())).expect("sink");
    es.with(|i| i.throttle.insert("evt-2".into()));
    let events = batch(0..4);
    let first = per_item(sink.send(&events).await);
    assert!(first[2].as_ref().is_err_and(SinkFailure::is_retryable));

    // The delivery actor re-sends from the blocked item on, or (after a
    // failover) the whole batch: already stored documents answer 409,
    // which is success, and nothing is stored twice.
    es.with(|i| i.throttle.clear());
    assert_eq!(sink.send(&events).await, SendOutcome::Delivered);
    assert_eq!(sink.send(&events).await, SendOutcome::Delivered);
    assert_eq!(es.ids().len(), 4);
    assert_eq!(es.with(|i| i.requests), 3);
}

#[tokio::test]
async fn an_invalid_index_for_one_tenant_fails_only_that_item() {
    let es = Es::start().await;
    let mut cfg = config(&es.url());
    cfg.index = "{tenant}".into();
    let mut sink = ElasticsearchSink::new(cfg).expect("sink");
    let events = [
        delivery("acme", 0),
        delivery("_system", 1),
        delivery("acme", 2),
    ];
    let results = per_item(sink.send(&events).await);
    assert!(results[0].is_ok() && results[2].is_ok());
    let f = results[1].as_ref().expect_err("bad index");
    assert_eq!(f.kind, FailureKind::Permanent);
    assert!(f.message.contains("starts with"), "{}", f.message);
    assert_eq!(es.ids().len(), 2);
}

#[tokio::test]
async fn whole_request_failures_are_retryable() {
    let es = Es::start().await;

    // Unavailable, with the server's hint.
    let mut sink = ElasticsearchSink::new(config(&es.url())).expect("sink");
    es.with(|i| i.unavailable = true);
    let SendOutcome::Failed(f) = sink.send(&batch(0..2)).await else {
        panic!("expected a failed batch")
    };
    assert_eq!(f.status, Some(503));
    assert_eq!(
        f.kind,
        FailureKind::Retryable {
            retry_after: Some(Duration::from_secs(3))
        }
    );
    assert!(f
        .response_excerpt
        .as_deref()
        .is_some_and(|e| e.contains("cluster_block_exception")));
    es.with(|i| i.unavailable = false);

    // Too large: retryable, saying what to change.
    es.with(|i| i.max_body_bytes = Some(100));
    let SendOutcome::Failed(f) = sink.send(&batch(0..2)).await else {
        panic!("expected a failed batch")
    };
    assert_eq!(f.status, Some(413));
    assert!(
        f.is_retryable() && f.message.contains("batch size"),
        "{f:?}"
    );
    es.with(|i| i.max_body_bytes = None);

    // Wrong credentials: a configuration problem, not the events'.
    let mut cfg = config(&es.url());
    cfg.password = Some("wrong".into());
    let mut sink = ElasticsearchSink::new(cfg).expect("sink");
    let SendOutcome::Failed(f) = sink.send(&batch(0..2)).await else {
        panic!("expected a failed batch")
    };
    assert_eq!(f.status, Some(401));
    assert!(
        f.is_retryable() && f.message.contains("credentials"),
        "{f:?}"
    );
    assert!(es.ids().is_empty());

    // Down.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let mut sink = ElasticsearchSink::new(config(&format!("http://{addr}"))).expect("sink");
    let SendOutcome::Failed(f) = sink.send(&batch(0..1)).await else {
        panic!("expected a failed batch")
    };
    assert_eq!(f.kind, FailureKind::Retryable { retry_after: None });
    assert!(f.message.contains("cannot connect"), "{}", f.message);
}

#[tokio::test]
async fn api_key_authentication() {
    let es = Es::start().await;
    let config: SinkConfig = serde_json::from_value(json!({
        "kind": "elasticsearch",
        "url": es.url(),
        "index": "audit-{tenant}-{date}",
        "api_key": API_KEY,
    }))
    .expect("settings");
    let mut sink = config.build().expect("sink");
    assert_eq!(sink.send(&batch(0..2)).await, SendOutcome::Delivered);
    assert_eq!(
        es.ids(),
        [
            ("audit-acme-2023.11.14".to_string(), "evt-0".to_string()),
            ("audit-acme-2023.11.14".to_string(), "evt-1".to_string())
        ]
    );
}

#[tokio::test]
async fn the_stand_in_refuses_what_elasticsearch_refuses() {
    // The stand-in is only worth its checks: raw requests that break the
    // bulk format get Elasticsearch's answers.
    let es = Es::start().await;
    let client = reqwest::Client::new();
    let url = format!("{}/_bulk", es.url());
    let post = |content_type: &str, body: &str| {
        let r = client
            .post(&url)
            .basic_auth(USER, Some(PASSWORD))
            .header("content-type", content_type)
            .body(body.to_string());
        async move {
            let resp = r.send().await.expect("send");
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            (status, body)
        }
    };
    let nd = "application/x-ndjson";
    let ok = "{\"create\":{\"_index\":\"a\",\"_id\":\"1\"}}\n{\"f\":1}\n";

    let (s, b) = post(nd, ok.trim_end()).await;
    assert_eq!(s, 400);
    assert_eq!(b["error"]["type"], "illegal_argument_exception");
    assert_eq!(
        b["error"]["reason"],
        "The bulk request must be terminated by a newline [\\n]"
    );

    let (s, b) = post("text/plain", ok).await;
    assert_eq!(s, 406, "{b}");

    let (s, b) = post(nd, "{\"create\":{\"_id\":\"1\"}}\n{\"f\":1}\n").await;
    assert_eq!(s, 400);
    assert_eq!(
        b["error"]["reason"],
        "Validation Failed: 1: index is missing;"
    );

    let (s, b) = post(nd, "\"create\"\n{\"f\":1}\n").await;
    assert_eq!(s, 400);
    assert_eq!(b["error"]["type"], "illegal_argument_exception");

    let (s, _) = post(nd, "").await;
    assert_eq!(s, 400);

    let unauthenticated = client
        .post(&url)
        .header("content-type", nd)
        .body(ok)
        .send()
        .await
        .expect("send");
    assert_eq!(unauthenticated.status().as_u16(), 401);

    // Items: created, then a duplicate create is a 409 conflict.
    let (s, b) = post(nd, &format!("{ok}{ok}")).await;
    assert_eq!(s, 200);
    assert_eq!(b["errors"], true);
    assert_eq!(b["items"][0]["create"]["status"], 201);
    assert_eq!(b["items"][1]["create"]["status"], 409);
    assert_eq!(
        b["items"][1]["create"]["error"]["type"],
        "version_conflict_engine_exception"
    );
}
