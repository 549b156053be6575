//! The Splunk HEC sink against the strict stand-in for the HTTP Event
//! Collector (`servers/splunk_hec.rs`, which lists what it checks), with
//! and without indexer acknowledgement.

#[path = "servers/splunk_hec.rs"]
mod splunk_hec;

use std::collections::BTreeSet;
use std::time::Duration;

use auditflow_broker::sinks::splunk_hec::{Config, SplunkHecSink};
use auditflow_broker::sinks::{Delivery, FailureKind, SendOutcome, Sink, SinkConfig};
use auditflow_protocol::{Hash32, Timestamp};
use serde_json::{json, Value};
use splunk_hec::{Hec, TOKEN};

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
        max_in_flight: 1,
    };
    let mut sink = config.build(&ctx).expect("sink");
    assert_eq!(sink.send(&batch(0..2)).await, SendOutcome::Delivered);
    assert_eq!(hec.indexed_ids(), ["evt-0", "evt-1"]);
}

fn ack_config(url: &str, timeout_ms: u64) -> Config {
    let mut c = config(url);
    c.indexer_ack = true;
    c.ack_poll_ms = 20;
    c.ack_timeout_ms = timeout_ms;
    c
}

#[tokio::test]
async fn with_acks_a_batch_is_delivered_only_once_hec_acknowledges_it() {
    let hec = Hec::start().await;
    // Acks come late: the sink must keep asking until one is true.
    hec.with(|i| i.ack_delay = Duration::from_millis(200));
    let mut sink = SplunkHecSink::new(ack_config(&hec.url(), 10_000)).expect("sink");
    assert_eq!(sink.send(&batch(0..3)).await, SendOutcome::Delivered);
    assert_eq!(sink.send(&batch(3..5)).await, SendOutcome::Delivered);
    hec.with(|i| {
        assert_eq!(i.channels.len(), 1);
        let channel = i.acks.values().next().expect("the sink's channel");
        assert_eq!(channel.next, 2, "one ackId per request, from 0");
        assert!(channel.pending.is_empty(), "both acknowledged");
        assert!(i.ack_queries >= 2, "{} ack queries", i.ack_queries);
    });
    assert_eq!(
        hec.indexed_ids(),
        ["evt-0", "evt-1", "evt-2", "evt-3", "evt-4"]
    );
}

#[tokio::test]
async fn a_withheld_ack_fails_retryably_and_the_resent_batch_is_delivered() {
    let hec = Hec::start().await;
    hec.with(|i| i.withhold_acks = true);
    let mut sink = SplunkHecSink::new(ack_config(&hec.url(), 300)).expect("sink");
    let events = batch(0..3);
    let SendOutcome::Failed(f) = sink.send(&events).await else {
        panic!("a batch HEC never acknowledged is not delivered")
    };
    assert_eq!(f.kind, FailureKind::Retryable { retry_after: None });
    assert!(
        f.message.contains("did not acknowledge ackId 0"),
        "{}",
        f.message
    );
    assert!(hec.with(|i| i.ack_queries) >= 1);
    // Released: the same batch again, now acknowledged. HEC holds it
    // twice (at-least-once, `fields.event_id` tells), none is lost.
    hec.with(|i| i.withhold_acks = false);
    assert_eq!(sink.send(&events).await, SendOutcome::Delivered);
    assert_eq!(
        hec.indexed_ids(),
        ["evt-0", "evt-1", "evt-2", "evt-0", "evt-1", "evt-2"]
    );
}

#[tokio::test]
async fn acks_asked_of_a_token_without_them_are_a_configuration_error() {
    let hec = Hec::start().await;
    hec.with(|i| i.acks_enabled = false);
    let mut sink = SplunkHecSink::new(ack_config(&hec.url(), 1000)).expect("sink");
    let SendOutcome::Failed(f) = sink.send(&batch(0..2)).await else {
        panic!("no ackId: not delivered")
    };
    assert!(f.is_retryable(), "{f:?}");
    assert!(f.message.contains("indexer_ack = false"), "{}", f.message);
    // Without indexer_ack the same token delivers at once.
    let mut sink = SplunkHecSink::new(config(&hec.url())).expect("sink");
    assert_eq!(sink.send(&batch(2..3)).await, SendOutcome::Delivered);
}

#[tokio::test]
async fn the_stand_in_acknowledges_as_hec_documents() {
    let hec = Hec::start().await;
    let client = reqwest::Client::new();
    let auth = format!("Splunk {TOKEN}");
    let (a, b) = (
        "0b6f1f8e-5a1c-4c8e-9d55-3f7e2b1a9c00",
        "7c1d2e3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f",
    );
    let post = |path: &str, channel: Option<&str>, body: &str| {
        let mut r = client
            .post(format!("{}/services/collector/{path}", hec.url()))
            .header("authorization", &auth)
            .body(body.to_string());
        if let Some(c) = channel {
            r = r.header("x-splunk-request-channel", c);
        }
        async move {
            let resp = r.send().await.expect("send");
            let status = resp.status().as_u16();
            let body: Value =
                serde_json::from_str(&resp.text().await.unwrap_or_default()).unwrap_or(Value::Null);
            (status, body)
        }
    };
    let ok = r#"{"event": {"a": 1}}"#;
    // ackIds count from 0 per channel.
    assert_eq!(post("event", Some(a), ok).await.1["ackId"], 0);
    assert_eq!(post("event", Some(a), ok).await.1["ackId"], 1);
    assert_eq!(post("event", Some(b), ok).await.1["ackId"], 0);
    let (status, body) = post("event", None, ok).await;
    assert_eq!((status, body["code"].as_u64()), (400, Some(10)));
    // Status per id; a true one is forgotten once reported.
    let (status, body) = post("ack", Some(a), r#"{"acks":[0,1,5]}"#).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"acks": {"0": true, "1": true, "5": false}}));
    let (_, body) = post("ack", Some(a), r#"{"acks":[0]}"#).await;
    assert_eq!(body, json!({"acks": {"0": false}}));
    // Withheld: false until released.
    hec.with(|i| i.withhold_acks = true);
    let (_, body) = post("ack", Some(b), r#"{"acks":[0]}"#).await;
    assert_eq!(body, json!({"acks": {"0": false}}));
    hec.with(|i| i.withhold_acks = false);
    let (_, body) = post("ack", Some(b), r#"{"acks":[0]}"#).await;
    assert_eq!(body, json!({"acks": {"0": true}}));
    let (status, body) = post("ack", None, r#"{"acks":[0]}"#).await;
    assert_eq!((status, body["code"].as_u64()), (400, Some(10)));
    // Acknowledgement off: no channel needed, no ackId, no ack endpoint.
    hec.with(|i| i.acks_enabled = false);
    let (status, body) = post("event", None, ok).await;
    assert_eq!(status, 200);
    assert!(body.get("ackId").is_none(), "{body}");
    let (status, body) = post("ack", Some(a), r#"{"acks":[0]}"#).await;
    assert_eq!((status, body["code"].as_u64()), (400, Some(14)));
}
