//! Elasticsearch / OpenSearch bulk API: one `POST {url}/_bulk` per batch,
//! the body NDJSON (`Content-Type: application/x-ndjson`, every line
//! ending in `\n`, the last one too):
//!
//! ```text
//! {"create":{"_index":"auditflow-acme","_id":"<cluster>:<partition>:<offset>"}}
//! {...the delivered body...}
//! ```
//!
//! Idempotent (G3): `create` with `_id` = the event's place in the log
//! (cluster id, partition, offset; see [`doc_id`]) writes a document once;
//! re-delivering it (after a retry or a failover) gets a 409
//! `version_conflict_engine_exception`, which means "already there" and so
//! counts as delivered. Never the bare event id: two tenants' events may
//! share an id (in one index unless the template has `{tenant}`), and an
//! id may come back after the dedup window; a 409 on either would drop an
//! event. The event id stays in the document (`event.id`). Idempotency
//! holds within an index, so the index of an event only depends on the
//! event (`{tenant}`, `{date}` of `received_at`), never on when it is sent.
//!
//! Per-item results (`SendOutcome::PerItem`), from the bulk answer's
//! `items[i].create.status` and `error.type`/`error.reason`:
//! - 2xx, 409: delivered.
//! - 429 (rejected execution, read-only index block), 5xx: retryable.
//! - 401/403 (privileges), 404 (index missing and auto-creation off):
//!   configuration problems an operator fixes, so retryable rather than
//!   parking every event.
//! - Anything else (400 `mapper_parsing_exception`, ...): the document is
//!   refused; permanent, with the reason.
//!
//! Whole-request answers: 401/403 (credentials), 404 (wrong URL), 408,
//! 413 (too large: lower the batch size), 429, 5xx and transport errors
//! are retryable; other 4xx permanent. The request asks for `filter_path`
//! so the answer holds only what is read here, keeping it small.

use std::fmt;
use std::path::PathBuf;

use futures::future::BoxFuture;
use reqwest::header::HeaderValue;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::http;
use super::{Delivery, SendOutcome, Sink, SinkConfigError, SinkFailure};

/// The bulk answer fields the sink reads; everything else is filtered out
/// by the server.
const FILTER_PATH: &str = "errors,items.*.status,items.*.error.type,items.*.error.reason";

/// Bound on the bulk answer read. With `filter_path` an item costs ~30
/// bytes when accepted and a few hundred when refused (type + reason), so
/// 16 MiB covers batches of tens of thousands of refused items; a longer
/// answer is not trusted and the batch is retried (idempotent).
const ANSWER_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Longest `_id` Elasticsearch accepts, in bytes.
pub const DOC_ID_BYTES_MAX: usize = 512;

/// Longest cluster id the sink takes: with a partition (10 digits) and
/// an offset (20) it keeps the `_id` under [`DOC_ID_BYTES_MAX`].
const CLUSTER_ID_BYTES_MAX: usize = 256;

/// The document id of a delivery (pure): `{cluster}:{partition}:{offset}`.
/// Partition and offset are digits, so the two last `:`-separated fields
/// read back unambiguously whatever the cluster id holds.
pub fn doc_id(cluster: &str, d: &Delivery) -> String {
    format!("{cluster}:{}:{}", d.partition, d.offset)
}

/// Longest index name Elasticsearch accepts, in bytes.
const INDEX_NAME_BYTES_MAX: usize = 255;

/// Settings of an Elasticsearch / OpenSearch destination.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Base URL of the cluster (or a coordinating node / proxy), e.g.
    /// `https://es.example:9200`; `/_bulk` is appended.
    pub url: String,
    /// Index name template. `{tenant}` becomes the event's tenant (lower
    /// case, characters not allowed in index names replaced by `_`),
    /// `{date}` the UTC day it was received (`2026.11.24`), for daily
    /// indices. Use a data stream or alias name for ILM setups.
    #[serde(default = "default_index")]
    pub index: String,
    /// Basic-auth user name (with `password`).
    #[serde(default)]
    pub username: Option<String>,
    /// Basic-auth password.
    #[serde(default)]
    pub password: Option<String>,
    /// API key, the `encoded` form Elasticsearch returns (base64 of
    /// `id:key`); sent as `Authorization: ApiKey <api_key>`. Exclusive
    /// with `username`/`password`.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Time limit of one bulk request, connecting to reading the answer.
    /// Longer than the webhook's: a large bulk request is indexed before
    /// the cluster answers.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Ingest pipeline to run the documents through (`?pipeline=`).
    #[serde(default)]
    pub pipeline: Option<String>,
    /// Extra CA certificate (PEM) to trust, for a cluster with a private
    /// PKI (Elasticsearch generates its own CA by default).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Accept any server certificate. Only for test clusters: it gives up
    /// authenticating the cluster, which then sees the credentials.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

fn default_index() -> String {
    "auditflow".into()
}

fn default_timeout_ms() -> u64 {
    30_000
}

/// Written by hand so the password and API key never reach a log line.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("Config")
            .field("url", &self.url)
            .field("index", &self.index)
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .field("api_key", &redacted(&self.api_key))
            .field("timeout_ms", &self.timeout_ms)
            .field("pipeline", &self.pipeline)
            .field("tls_ca", &self.tls_ca)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .finish()
    }
}

/// How the sink authenticates.
enum Auth {
    /// No credentials (security off, or a proxy adds them).
    None,
    /// HTTP basic.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// `Authorization: ApiKey ...`, marked sensitive.
    Header(HeaderValue),
}

/// The Elasticsearch / OpenSearch sink.
pub struct ElasticsearchSink {
    /// The settings, checked.
    config: Config,
    /// The cluster's id, the first part of every document id.
    cluster: String,
    /// `{url}/_bulk?filter_path=..[&pipeline=..]`.
    bulk_url: String,
    /// Credentials.
    auth: Auth,
    /// Pooled connections to the cluster.
    client: reqwest::Client,
}

/// Makes a tenant usable inside an index name: lower case (index names
/// must be), and anything but ASCII letters, digits, `-`, `_`, `.` becomes
/// `_` (index names refuse `\ / * ? " < > | , #`, spaces and `:`).
pub fn sanitize_tenant(tenant: &str) -> String {
    tenant
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-' | '_' | '.') => c,
            _ => '_',
        })
        .collect()
}

/// Checks an index name against Elasticsearch's rules.
pub fn check_index_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(format!("index name {name:?} is not allowed"));
    }
    if name.len() > INDEX_NAME_BYTES_MAX {
        return Err(format!(
            "index name is longer than {INDEX_NAME_BYTES_MAX} bytes"
        ));
    }
    if name.starts_with(['-', '_', '+']) {
        return Err(format!("index name {name:?} starts with -, _ or +"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_ascii_uppercase() || c.is_whitespace() || "\\/*?\"<>|,#:{}".contains(*c))
    {
        return Err(format!("index name {name:?} contains {c:?}"));
    }
    Ok(())
}

/// The index of one delivery (pure): the template with `{tenant}` and
/// `{date}` filled in, checked.
pub fn index_for(template: &str, d: &Delivery) -> Result<String, String> {
    let mut name = template.replace("{tenant}", &sanitize_tenant(&d.tenant));
    if name.contains("{date}") {
        let date = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(d.received_at.0))
            .map_err(|e| format!("received_at out of range: {e}"))?
            .date();
        let day = format!(
            "{:04}.{:02}.{:02}",
            date.year(),
            u8::from(date.month()),
            date.day()
        );
        name = name.replace("{date}", &day);
    }
    check_index_name(&name)?;
    Ok(name)
}

/// A bulk request body (pure): the NDJSON text and, per batch item, where
/// it is in the request (`Ok(position)`) or why it was left out (an index
/// name that its tenant makes invalid: refused without asking the server).
pub struct BulkRequest {
    /// NDJSON, every line ending in `\n`.
    pub body: Vec<u8>,
    /// Per batch item: its position among the request's items, or its
    /// failure.
    pub items: Vec<Result<usize, SinkFailure>>,
}

/// Builds the NDJSON body of a batch (pure); documents of `cluster`.
pub fn bulk_body(cluster: &str, index_template: &str, batch: &[Delivery]) -> BulkRequest {
    let mut body = Vec::new();
    let mut items = Vec::with_capacity(batch.len());
    let mut position = 0;
    for d in batch {
        match index_for(index_template, d) {
            Ok(index) => {
                let action = json!({"create": {"_index": index, "_id": doc_id(cluster, d)}});
                // Writing a Value into a Vec cannot fail; compact JSON has
                // no raw newlines (they are escaped inside strings), so
                // each document stays on its line.
                let _ = serde_json::to_writer(&mut body, &action);
                body.push(b'\n');
                let _ = serde_json::to_writer(&mut body, &d.body);
                body.push(b'\n');
                items.push(Ok(position));
                position += 1;
            }
            Err(reason) => items.push(Err(SinkFailure::permanent(reason))),
        }
    }
    BulkRequest { body, items }
}

/// The result of one bulk item from its status and error (pure).
pub fn classify_item(status: u16, error_type: &str, reason: &str) -> Result<(), SinkFailure> {
    // 409 on `create`: a document with this `_id` exists, i.e. an earlier
    // delivery of the same event: idempotent success.
    if (200..300).contains(&status) || status == 409 {
        return Ok(());
    }
    let what = if error_type.is_empty() {
        format!("item status {status}")
    } else {
        format!("item status {status}: {error_type}: {reason}")
    };
    // 401/403/404 are fixable by an operator without touching the event,
    // so they wait rather than park.
    let retryable = matches!(status, 429 | 500..=599 | 401 | 403 | 404);
    Err(if retryable {
        let why = match status {
            401 | 403 => " (no privilege to write this index: fix the credentials' role)",
            404 => " (index missing and not auto-created: create it or its template)",
            _ => "",
        };
        http::retryable_with(Some(status), format!("{what}{why}"), None, "")
    } else {
        http::permanent_with(Some(status), what, "")
    })
}

/// Classifies a bulk answer for a request of `n` items (pure): one result
/// per request item, or one failure for all.
pub fn classify_answer(
    status: u16,
    body: &str,
    complete: bool,
    retry_after: Option<std::time::Duration>,
    n: usize,
) -> Result<Vec<Result<(), SinkFailure>>, SinkFailure> {
    if !(200..300).contains(&status) {
        let why = match status {
            401 | 403 => Some("credentials refused: fix username/password or api_key"),
            404 => Some("no bulk endpoint at this URL: fix `url`"),
            413 => Some("request too large: lower the destination's batch size or raise http.max_content_length"),
            _ => None,
        };
        let message = format!("HTTP {status}");
        return Err(match why {
            Some(why) => http::retryable_with(
                Some(status),
                format!("{message} ({why})"),
                retry_after,
                body,
            ),
            None => match http::classify(status, body, retry_after) {
                Some(f) => f,
                None => http::retryable_with(Some(status), message, retry_after, body),
            },
        });
    }
    // Not knowing which items were stored, retrying all is safe: items
    // already stored answer 409 next time.
    let unreadable = |why: String| http::retryable_with(Some(status), why, retry_after, body);
    if !complete {
        return Err(unreadable(format!(
            "bulk answer incomplete (longer than {ANSWER_BYTES_MAX} bytes or cut off)"
        )));
    }
    let answer: Value = serde_json::from_str(body)
        .map_err(|e| unreadable(format!("bulk answer is not JSON: {e}")))?;
    let errors = answer.get("errors").and_then(Value::as_bool);
    let items = answer.get("items").and_then(Value::as_array);
    let items = match (errors, items) {
        // Without errors, `filter_path` may drop `items` entirely when no
        // item has a field left: all stored.
        (Some(false), None) => return Ok(vec![Ok(()); n]),
        (_, Some(items)) => items,
        (_, None) => return Err(unreadable("bulk answer has no items".into())),
    };
    if items.len() != n {
        return Err(unreadable(format!(
            "bulk answer has {} items for {n} sent",
            items.len()
        )));
    }
    Ok(items
        .iter()
        .map(|item| {
            // `{"create": {...}}`: one key, the action.
            let result = item.as_object().and_then(|o| o.values().next());
            let Some(status) = result
                .and_then(|r| r.get("status"))
                .and_then(Value::as_u64)
                .and_then(|s| u16::try_from(s).ok())
            else {
                return Err(SinkFailure::retryable("bulk item without a status"));
            };
            let error = result.and_then(|r| r.get("error"));
            let field = |name: &str| {
                error
                    .and_then(|e| e.get(name))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            classify_item(status, &field("type"), &field("reason"))
        })
        .collect())
}

impl ElasticsearchSink {
    /// Checks the settings and builds the HTTP client.
    pub fn new(config: Config, cluster: String) -> Result<ElasticsearchSink, SinkConfigError> {
        let bad = |reason: String| SinkConfigError {
            kind: "elasticsearch",
            reason,
        };
        if cluster.is_empty() || cluster.len() > CLUSTER_ID_BYTES_MAX {
            return Err(bad(format!(
                "the cluster id (first part of document ids) must be 1..={CLUSTER_ID_BYTES_MAX} bytes"
            )));
        }
        let mut bulk_url = http::parse_url("elasticsearch", &http::join(&config.url, "_bulk"))?;
        {
            let mut query = bulk_url.query_pairs_mut();
            query.append_pair("filter_path", FILTER_PATH);
            if let Some(pipeline) = &config.pipeline {
                if pipeline.is_empty() {
                    return Err(bad("pipeline is empty (leave it out for none)".into()));
                }
                query.append_pair("pipeline", pipeline);
            }
        }
        // Check the template with a plain tenant, so a bad template fails
        // at start-up instead of parking every event.
        let unknown = config.index.replace("{tenant}", "").replace("{date}", "");
        if unknown.contains(['{', '}']) {
            return Err(bad(format!(
                "index {:?}: only {{tenant}} and {{date}} can be filled in",
                config.index
            )));
        }
        let sample = config
            .index
            .replace("{tenant}", "t")
            .replace("{date}", "2026.01.01");
        check_index_name(&sample).map_err(|e| bad(format!("index {:?}: {e}", config.index)))?;
        let auth = match (&config.username, &config.password, &config.api_key) {
            (None, None, None) => Auth::None,
            (Some(username), Some(password), None) => Auth::Basic {
                username: username.clone(),
                password: password.clone(),
            },
            (None, None, Some(key)) => {
                let mut value = HeaderValue::from_str(&format!("ApiKey {key}"))
                    .map_err(|_| bad("api_key has characters not allowed in a header".into()))?;
                value.set_sensitive(true);
                Auth::Header(value)
            }
            (_, _, Some(_)) => {
                return Err(bad("use either api_key or username/password".into()));
            }
            _ => return Err(bad("username and password go together".into())),
        };
        let client = http::client_with(
            "elasticsearch",
            &http::ClientOptions {
                timeout_ms: config.timeout_ms,
                tls_ca: config.tls_ca.as_ref(),
                insecure_skip_verify: config.insecure_skip_verify,
            },
        )?;
        Ok(ElasticsearchSink {
            config,
            cluster,
            bulk_url: bulk_url.to_string(),
            auth,
            client,
        })
    }
}

impl Sink for ElasticsearchSink {
    fn send<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, SendOutcome> {
        Box::pin(async move {
            if batch.is_empty() {
                return SendOutcome::Delivered;
            }
            let request = bulk_body(&self.cluster, &self.config.index, batch);
            let sent = request.items.iter().filter(|i| i.is_ok()).count();
            let answers = if sent == 0 {
                Vec::new()
            } else {
                let mut req = self
                    .client
                    .post(&self.bulk_url)
                    .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
                    .header(reqwest::header::ACCEPT, "application/json");
                req = match &self.auth {
                    Auth::None => req,
                    Auth::Basic { username, password } => req.basic_auth(username, Some(password)),
                    Auth::Header(value) => {
                        req.header(reqwest::header::AUTHORIZATION, value.clone())
                    }
                };
                // The URL in messages without the query: short and stable.
                let url = http::join(&self.config.url, "_bulk");
                let answer =
                    match http::exchange(&url, req.body(request.body), ANSWER_BYTES_MAX).await {
                        Ok(a) => a,
                        Err(f) => return SendOutcome::Failed(f),
                    };
                match classify_answer(
                    answer.status,
                    &answer.body,
                    answer.complete,
                    answer.retry_after,
                    sent,
                ) {
                    Ok(results) => results,
                    Err(mut f) => {
                        f.message = format!("{url}: {}", f.message);
                        return SendOutcome::Failed(f);
                    }
                }
            };
            let results: Vec<Result<(), SinkFailure>> = request
                .items
                .into_iter()
                .map(|item| match item {
                    Ok(position) => answers.get(position).cloned().unwrap_or_else(|| {
                        Err(SinkFailure::retryable("bulk answer is missing this item"))
                    }),
                    Err(f) => Err(f),
                })
                .collect();
            if results.iter().all(Result::is_ok) {
                SendOutcome::Delivered
            } else {
                SendOutcome::PerItem(results)
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
        serde_json::from_value(json!({"url": "http://127.0.0.1:9200"})).unwrap()
    }

    fn delivery(offset: u64, tenant: &str) -> Delivery {
        Delivery {
            partition: 0,
            offset,
            event_id: format!("e{offset}"),
            tenant: tenant.into(),
            // 2023-11-14T22:13:20Z
            received_at: Timestamp(1_700_000_000_000_000_000),
            hash: Hash32::ZERO,
            body: crate::sinks::Body::from_value(
                &json!({"offset": offset, "event": {"id": format!("e{offset}"), "note": "a\nb"}}),
            ),
        }
    }

    #[test]
    fn defaults_and_bad_settings() {
        let c = config();
        assert_eq!(c.index, "auditflow");
        assert_eq!(c.timeout_ms, 30_000);
        assert!(ElasticsearchSink::new(c.clone(), "c1".into()).is_ok());
        assert!(ElasticsearchSink::new(c.clone(), String::new()).is_err());
        assert!(ElasticsearchSink::new(c.clone(), "c".repeat(257)).is_err());
        let with = |f: &dyn Fn(&mut Config)| {
            let mut c = config();
            f(&mut c);
            ElasticsearchSink::new(c, "c1".into())
        };
        assert!(with(&|c| c.index = "Audit".into()).is_err());
        assert!(with(&|c| c.index = "_audit".into()).is_err());
        assert!(with(&|c| c.index = "a-{tenantt}".into()).is_err());
        assert!(with(&|c| c.index = "a-{tenant}-{date}".into()).is_ok());
        assert!(with(&|c| c.username = Some("u".into())).is_err());
        assert!(with(&|c| {
            c.username = Some("u".into());
            c.password = Some("p".into());
        })
        .is_ok());
        assert!(with(&|c| {
            c.api_key = Some("k".into());
            c.password = Some("p".into());
        })
        .is_err());
        assert!(with(&|c| c.pipeline = Some(String::new())).is_err());
        assert!(with(&|c| c.url = "es:9200".into()).is_err());
        let mut c = config();
        c.api_key = Some("secret-key".into());
        assert!(!format!("{c:?}").contains("secret-key"));
    }

    #[test]
    fn index_names_are_filled_in_and_checked() {
        let d = delivery(1, "Acme Corp/EU");
        assert_eq!(
            index_for("audit-{tenant}", &d).unwrap(),
            "audit-acme_corp_eu"
        );
        assert_eq!(
            index_for("audit-{tenant}-{date}", &d).unwrap(),
            "audit-acme_corp_eu-2023.11.14"
        );
        assert_eq!(index_for("audit", &d).unwrap(), "audit");
        // A tenant that makes the name start badly is refused per item.
        assert!(index_for("{tenant}", &delivery(1, "-x")).is_err());
        assert!(index_for("{tenant}", &delivery(1, "..")).is_err());
        assert!(index_for("a{tenant}", &delivery(1, &"x".repeat(300))).is_err());
    }

    #[test]
    fn ndjson_has_action_and_document_lines() {
        let batch = [
            delivery(1, "acme"),
            delivery(2, "-bad"),
            delivery(3, "acme"),
        ];
        let req = bulk_body("c1", "{tenant}", &batch);
        let text = String::from_utf8(req.body).unwrap();
        assert!(text.ends_with('\n'));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(
            serde_json::from_str::<Value>(lines[0]).unwrap(),
            json!({"create": {"_index": "acme", "_id": "c1:0:1"}})
        );
        assert_eq!(
            serde_json::from_str::<Value>(lines[1]).unwrap(),
            batch[0].body.to_value()
        );
        assert_eq!(
            serde_json::from_str::<Value>(lines[2]).unwrap(),
            json!({"create": {"_index": "acme", "_id": "c1:0:3"}})
        );
        assert!(matches!(req.items[0], Ok(0)));
        assert!(matches!(&req.items[1], Err(f) if f.kind == FailureKind::Permanent));
        assert!(matches!(req.items[2], Ok(1)));
    }

    /// Document ids are the event's place in the log, never its id: two
    /// tenants' events with one id in one index are two documents.
    #[test]
    fn document_ids_are_cluster_partition_offset() {
        let (a, mut b) = (delivery(7, "acme"), delivery(8, "globex"));
        b.event_id = a.event_id.clone();
        assert_eq!(doc_id("c1", &a), "c1:0:7");
        assert_ne!(doc_id("c1", &a), doc_id("c1", &b));
        assert_ne!(doc_id("c1", &a), doc_id("c2", &a));
        assert_eq!(
            doc_id("c:1", &a).rsplitn(3, ':').collect::<Vec<_>>(),
            ["7", "0", "c:1"]
        );
        let longest = Delivery {
            partition: u32::MAX,
            offset: u64::MAX,
            ..a
        };
        assert!(doc_id(&"c".repeat(CLUSTER_ID_BYTES_MAX), &longest).len() <= DOC_ID_BYTES_MAX);
    }

    #[test]
    fn items_are_classified() {
        assert_eq!(classify_item(201, "", ""), Ok(()));
        assert_eq!(
            classify_item(409, "version_conflict_engine_exception", "exists"),
            Ok(())
        );
        let f = classify_item(400, "mapper_parsing_exception", "failed to parse [x]").unwrap_err();
        assert_eq!(f.kind, FailureKind::Permanent);
        assert!(f
            .message
            .contains("mapper_parsing_exception: failed to parse [x]"));
        for s in [429, 500, 503, 403, 404] {
            assert!(
                classify_item(s, "x", "y").unwrap_err().is_retryable(),
                "{s}"
            );
        }
    }

    #[test]
    fn answers_are_classified() {
        let hint = Some(Duration::from_secs(3));
        let body = r#"{"errors":true,"items":[{"create":{"status":201}},{"create":{"status":409,"error":{"type":"version_conflict_engine_exception","reason":"exists"}}},{"create":{"status":400,"error":{"type":"mapper_parsing_exception","reason":"bad"}}},{"create":{"status":429,"error":{"type":"es_rejected_execution_exception","reason":"busy"}}}]}"#;
        let r = classify_answer(200, body, true, None, 4).unwrap();
        assert_eq!(r[0], Ok(()));
        assert_eq!(r[1], Ok(()));
        assert_eq!(r[2].as_ref().unwrap_err().kind, FailureKind::Permanent);
        assert!(r[3].as_ref().unwrap_err().is_retryable());
        // filter_path leaves only `errors` when all is well.
        assert_eq!(
            classify_answer(200, r#"{"errors":false}"#, true, None, 2).unwrap(),
            vec![Ok(()), Ok(())]
        );
        // Unreadable or mismatched answers: retry all (idempotent).
        for (b, complete, n) in [
            ("<html>", true, 1),
            (body, false, 4),
            (body, true, 3),
            ("{}", true, 1),
        ] {
            assert!(classify_answer(200, b, complete, None, n)
                .unwrap_err()
                .is_retryable());
        }
        for s in [401, 403, 404, 408, 413, 429, 500, 503] {
            let f = classify_answer(s, "", true, hint, 1).unwrap_err();
            assert_eq!(f.kind, FailureKind::Retryable { retry_after: hint }, "{s}");
            assert_eq!(f.status, Some(s));
        }
        let f = classify_answer(400, "bad", true, None, 1).unwrap_err();
        assert_eq!(f.kind, FailureKind::Permanent);
    }
}
