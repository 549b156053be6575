//! A strict stand-in for the `_bulk` API on
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
//!   `_index` (none in the URL) → else 400 "index is missing"; an `_id`
//!   of at most 512 bytes → else 400 `action_request_validation_exception`
//!   "id [..] is too long";
//! - per item: a document that is not a JSON object, an invalid index name,
//!   or an id it was told to reject (the `_id` or the document's
//!   `event.id`) → 400 `mapper_parsing_exception` /
//!   `invalid_index_name_exception`; an id it was told to throttle → 429
//!   `es_rejected_execution_exception`; `create` of an existing `_id` → 409
//!   `version_conflict_engine_exception`; otherwise 201 stored;
//! - `filter_path` is applied as Elasticsearch does for the paths the sink
//!   asks for.
//!
//! It can also answer the whole request with 503 + `Retry-After: 3`, or
//! 413 when the body is over a size limit.

//! Shared by the sink test and the cluster delivery test (`#[path]`).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};

pub const USER: &str = "elastic";
pub const PASSWORD: &str = "changeme";
/// An API key in the `encoded` form Elasticsearch hands out.
pub const API_KEY: &str = "VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw==";

#[derive(Default)]
pub struct Inner {
    /// Stored documents by (index, id).
    pub docs: BTreeMap<(String, String), Value>,
    /// Bulk requests that passed authentication.
    pub requests: u64,
    /// Query parameters of the last request.
    pub last_query: BTreeMap<String, String>,
    /// Ids refused with a mapper_parsing_exception.
    pub reject: BTreeSet<String>,
    /// Ids answered with 429.
    pub throttle: BTreeSet<String>,
    /// Answer the whole request with 503 and `Retry-After: 3`.
    pub unavailable: bool,
    /// Answer 413 above this many body bytes.
    pub max_body_bytes: Option<usize>,
}

#[derive(Clone)]
pub struct Es {
    pub inner: Arc<Mutex<Inner>>,
    pub addr: SocketAddr,
}

impl Es {
    pub async fn start() -> Es {
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

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().expect("es lock"))
    }

    pub fn ids(&self) -> Vec<(String, String)> {
        self.with(|i| i.docs.keys().cloned().collect())
    }
}

/// Elasticsearch's error body for a whole request.
pub fn es_error(status: StatusCode, kind: &str, reason: &str) -> Response {
    let err = json!({"type": kind, "reason": reason});
    let body = json!({"error": {"root_cause": [err.clone()], "type": kind, "reason": reason}, "status": status.as_u16()});
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

pub fn item_error(status: u16, index: &str, id: &str, kind: &str, reason: &str) -> Value {
    json!({"_index": index, "_id": id, "status": status, "error": {"type": kind, "reason": reason, "index": index}})
}

pub fn valid_index_name(name: &str) -> bool {
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
pub fn authenticated(headers: &HeaderMap) -> Result<(), Response> {
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

pub async fn bulk(
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
        if let Some(long) = id.as_ref().filter(|id| id.len() > 512) {
            // Elasticsearch refuses the whole request for this.
            return es_error(
                StatusCode::BAD_REQUEST,
                "action_request_validation_exception",
                &format!(
                    "Validation Failed: 1: id [{long}] is too long, must be no longer than 512 bytes but was: {};",
                    long.len()
                ),
            );
        }
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
        } else if doc.is_none() || told(&i.reject, &id, doc.as_ref()) {
            item_error(
                400,
                &index,
                &id,
                "mapper_parsing_exception",
                &format!("failed to parse field [event.data.amount] of type [long] in document with id '{id}'"),
            )
        } else if told(&i.throttle, &id, doc.as_ref()) {
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
pub fn filter(full: &Value, paths: &str) -> Value {
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

/// Whether `set` names this item: its `_id`, or the event id inside the
/// document (the sink's `_id` is the event's place in the log, which a
/// cluster test does not know in advance).
fn told(set: &BTreeSet<String>, id: &str, doc: Option<&Value>) -> bool {
    set.contains(id)
        || doc
            .and_then(|d| d.pointer("/event/id"))
            .and_then(Value::as_str)
            .is_some_and(|event_id| set.contains(event_id))
}
