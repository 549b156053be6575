//! The Elasticsearch sink against the strict stand-in for the `_bulk` API
//! in servers/elasticsearch.rs (see there for what it checks).

#[path = "servers/elasticsearch.rs"]
mod elasticsearch;

use std::time::Duration;

use auditflow_broker::sinks::elasticsearch::{Config, ElasticsearchSink};
use auditflow_broker::sinks::{
    Delivery, FailureKind, SendOutcome, Sink, SinkConfig, SinkContext, SinkFailure,
};
use auditflow_protocol::{Hash32, Timestamp};
use elasticsearch::{Es, API_KEY, PASSWORD, USER};
use serde_json::{json, Value};

/// The cluster id the sinks under test write for.
const CLUSTER: &str = "test-cluster";

/// The document id of offset `offset` (partition 1) of [`CLUSTER`].
fn doc(offset: u64) -> String {
    format!("{CLUSTER}:1:{offset}")
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
        body: auditflow_broker::sinks::Body::from_value(&json!({
            "partition": 1,
            "offset": offset,
            "event": {"id": id, "tenant": tenant, "action": "doc.read", "context": {"note": "line1\nline2"}},
        })),
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
async fn a_batch_is_stored_by_tenant_index_and_place_in_the_log() {
    let es = Es::start().await;
    let mut cfg = config(&es.url());
    cfg.pipeline = Some("audit-enrich".into());
    let mut sink = ElasticsearchSink::new(cfg, CLUSTER.into()).expect("sink");
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
        let stored = &docs[&(index, doc(d.offset))];
        assert_eq!(
            stored,
            &d.body.to_value(),
            "the document is the delivered body"
        );
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
    let mut sink = ElasticsearchSink::new(config(&es.url()), CLUSTER.into()).expect("sink");
    es.with(|i| {
        i.reject.insert(doc(1));
        i.throttle.insert(doc(3));
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
    assert_eq!(stored, [doc(0), doc(2), doc(4)]);
}

#[tokio::test]
async fn re_sending_is_idempotent() {
    let es = Es::start().await;
    let mut sink = ElasticsearchSink::new(config(&es.url()), CLUSTER.into()).expect("sink");
    es.with(|i| i.throttle.insert(doc(2)));
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

/// Acceptance 5 of issue 27. The bug: documents were created with `_id` =
/// the event id and a 409 counted as delivered, so another tenant's event
/// with the same id, in an index without `{tenant}`, was dropped while
/// the cursor moved on.
#[tokio::test]
async fn two_tenants_events_sharing_an_id_are_both_kept() {
    let es = Es::start().await;
    let mut cfg = config(&es.url());
    cfg.index = "audit".into();
    let mut sink = ElasticsearchSink::new(cfg, CLUSTER.into()).expect("sink");
    let (acme, mut globex) = (delivery("acme", 0), delivery("globex", 1));
    globex.event_id = acme.event_id.clone();
    globex.body = auditflow_broker::sinks::Body::from_value(&json!({
        "partition": 1, "offset": 1,
        "event": {"id": acme.event_id, "tenant": "globex", "action": "doc.read"},
    }));
    let both = [acme.clone(), globex.clone()];
    assert_eq!(sink.send(&both).await, SendOutcome::Delivered);
    let docs = es.with(|i| i.docs.clone());
    assert_eq!(docs.len(), 2, "{docs:?}");
    assert_eq!(docs[&("audit".to_string(), doc(1))], globex.body.to_value());
    assert_eq!(docs[&("audit".to_string(), doc(0))], acme.body.to_value());

    // A redelivery of the same events (a retry, a failover) is a 409 per
    // item, counted as delivered, and stores nothing twice; another
    // cluster's events at the same offsets are its own documents.
    assert_eq!(sink.send(&both).await, SendOutcome::Delivered);
    assert_eq!(sink.send(&both[1..]).await, SendOutcome::Delivered);
    assert_eq!(es.ids().len(), 2);
    let mut cfg = config(&es.url());
    cfg.index = "audit".into();
    let mut other = ElasticsearchSink::new(cfg, "other-cluster".into()).expect("sink");
    assert_eq!(other.send(&both).await, SendOutcome::Delivered);
    assert_eq!(es.ids().len(), 4);
}

#[tokio::test]
async fn an_invalid_index_for_one_tenant_fails_only_that_item() {
    let es = Es::start().await;
    let mut cfg = config(&es.url());
    cfg.index = "{tenant}".into();
    let mut sink = ElasticsearchSink::new(cfg, CLUSTER.into()).expect("sink");
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
    let mut sink = ElasticsearchSink::new(config(&es.url()), CLUSTER.into()).expect("sink");
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
    let mut sink = ElasticsearchSink::new(cfg, CLUSTER.into()).expect("sink");
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
    let mut sink =
        ElasticsearchSink::new(config(&format!("http://{addr}")), CLUSTER.into()).expect("sink");
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
    let mut sink = config
        .build(&SinkContext {
            cluster: CLUSTER.into(),
            max_in_flight: 1,
        })
        .expect("sink");
    assert_eq!(sink.send(&batch(0..2)).await, SendOutcome::Delivered);
    assert_eq!(
        es.ids(),
        [
            ("audit-acme-2023.11.14".to_string(), doc(0)),
            ("audit-acme-2023.11.14".to_string(), doc(1))
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

    // An `_id` longer than 512 bytes is refused, as Elasticsearch does.
    let long = format!(
        "{{\"create\":{{\"_index\":\"a\",\"_id\":\"{}\"}}}}\n{{\"f\":1}}\n",
        "x".repeat(513)
    );
    let (s, b) = post(nd, &long).await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error"]["type"], "action_request_validation_exception");

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
