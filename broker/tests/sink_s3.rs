//! The S3 sink against a real S3-compatible server, moto (PyPI
//! `moto[server]`, listed in ops/pip-packages.txt), that each test starts
//! on a free loopback port and stops.
//!
//! Proves: one NDJSON object per batch under
//! `{prefix}/p{partition:05}/{first:020}-{last:020}.ndjson`, read back by an
//! independent client (boto3) with content type and metadata; a re-sent
//! batch overwrites its object (the object count does not change); the
//! signature is right (moto verifies SigV4 once auth is switched on) and a
//! wrong secret, missing rights or a missing bucket are retryable setup
//! problems; a server that is down, stopped or restarted gives retryable
//! failures and then delivers.

#[path = "servers/moto.rs"]
mod moto;

use auditflow_broker::sinks::s3::{Config, S3Sink};
use auditflow_broker::sinks::{Delivery, SendOutcome, Sink};
use auditflow_protocol::{Hash32, Timestamp};
use moto::{Keys, Moto, BUCKET};
use serde_json::{json, Value};

fn config(endpoint: String, keys: &Keys) -> Config {
    Config {
        endpoint,
        region: "us-east-1".into(),
        bucket: BUCKET.into(),
        prefix: "auditflow".into(),
        access_key_id: keys.id.clone(),
        secret_access_key: keys.secret.clone(),
        session_token: None,
        path_style: true,
        timeout_ms: 10_000,
        tls_ca: None,
    }
}

fn delivery(partition: u32, offset: u64) -> Delivery {
    let event_id = format!("evt-{partition}-{offset}");
    let received_at = Timestamp(1_700_000_000_000_000_000 + offset as i64);
    let hash = Hash32([offset as u8; 32]);
    Delivery {
        partition,
        offset,
        event_id: event_id.clone(),
        tenant: "acme".into(),
        received_at,
        hash,
        body: auditflow_broker::sinks::Body::from_value(&json!({
            "partition": partition,
            "offset": offset,
            "received_at": received_at,
            "hash": hash,
            "event": {"id": event_id, "tenant": "acme", "action": "doc.read",
                      "data": {"text": "line\nbreak \"quoted\""}},
        })),
    }
}

fn batch(partition: u32, offsets: std::ops::Range<u64>) -> Vec<Delivery> {
    offsets.map(|o| delivery(partition, o)).collect()
}

fn key(partition: u32, first: u64, last: u64) -> String {
    format!("auditflow/p{partition:05}/{first:020}-{last:020}.ndjson")
}

fn assert_retryable(outcome: &SendOutcome, needle: &str) {
    match outcome {
        SendOutcome::Failed(f) => {
            assert!(f.is_retryable(), "not retryable: {f:?}");
            assert!(
                f.message.contains(needle),
                "{needle:?} not in {:?}",
                f.message
            );
        }
        other => panic!("expected a retryable failure, got {other:?}"),
    }
}

fn lines(body: &str) -> Vec<Value> {
    assert!(body.ends_with('\n'), "NDJSON ends with a newline");
    body.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[tokio::test]
async fn batches_become_signed_ndjson_objects() {
    let mut moto = Moto::new();
    moto.start().await;
    let (writer, reader) = moto.setup_with_auth().await;
    let mut sink = S3Sink::new(config(moto.endpoint(), &writer)).expect("sink");

    let mut first = batch(3, 0..3);
    // A producer-chosen id that is not plain ASCII: metadata is encoded.
    first[2].event_id = "évt 3%".into();
    let second = batch(3, 3..5);
    let other = batch(12, 7..8);
    for b in [&first, &second, &other] {
        assert_eq!(sink.send(b).await, SendOutcome::Delivered);
    }

    let objects = moto.objects(&writer).await;
    let keys: Vec<&str> = objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, [key(3, 0, 2), key(3, 3, 4), key(12, 7, 7)]);
    for (o, b) in objects.iter().zip([&first, &second, &other]) {
        let expected: Vec<Value> = b.iter().map(|d| d.body.to_value()).collect();
        assert_eq!(lines(&o.body), expected, "{}", o.key);
        assert_eq!(o.content_type, "application/x-ndjson");
        assert_eq!(o.metadata["first-event-id"], b[0].event_id);
        assert_eq!(o.metadata["partition"], b[0].partition.to_string());
        assert_eq!(o.metadata["first-offset"], b[0].offset.to_string());
        assert_eq!(o.metadata["count"], b.len().to_string());
    }
    assert_eq!(objects[0].metadata["last-event-id"], "%C3%A9vt%203%25");
    assert_eq!(objects[1].metadata["last-event-id"], "evt-3-4");

    // A re-sent batch overwrites its own object: same keys, same content.
    assert_eq!(sink.send(&first).await, SendOutcome::Delivered);
    let again = moto.objects(&writer).await;
    assert_eq!(again.len(), 3);
    assert_eq!(again[0].body, objects[0].body);

    // Setup problems are retryable, with a message saying what to fix.
    let wrong_secret = Keys {
        id: writer.id.clone(),
        secret: "not-the-secret".into(),
    };
    let mut sink = S3Sink::new(config(moto.endpoint(), &wrong_secret)).expect("sink");
    assert_retryable(&sink.send(&batch(3, 5..6)).await, "SignatureDoesNotMatch");
    let mut sink = S3Sink::new(config(moto.endpoint(), &reader)).expect("sink");
    assert_retryable(&sink.send(&batch(3, 5..6)).await, "AccessDenied");
    let mut c = config(moto.endpoint(), &writer);
    c.bucket = "no-such-bucket".into();
    let mut sink = S3Sink::new(c).expect("sink");
    assert_retryable(&sink.send(&batch(3, 5..6)).await, "NoSuchBucket");
    // None of them wrote anything.
    assert_eq!(moto.objects(&writer).await.len(), 3);
}

#[tokio::test]
async fn outages_are_retryable_and_delivery_resumes() {
    let mut moto = Moto::new();
    let keys = Keys {
        id: "AKIDTEST".into(),
        secret: "secret".into(),
    };
    // Down at start-up: building the sink must not need the server.
    let mut sink = S3Sink::new(config(moto.endpoint(), &keys)).expect("sink");
    assert_retryable(&sink.send(&batch(0, 0..2)).await, "cannot connect");

    moto.start().await;
    moto.create_bucket().await;
    assert_eq!(sink.send(&batch(0, 0..2)).await, SendOutcome::Delivered);

    moto.stop();
    assert_retryable(&sink.send(&batch(0, 2..4)).await, "s3 audit/");

    // Restarted with its memory wiped: the bucket is gone, which is a
    // setup problem (retryable), until someone creates it again.
    moto.start().await;
    assert_retryable(&sink.send(&batch(0, 2..4)).await, "NoSuchBucket");
    moto.create_bucket().await;
    assert_eq!(sink.send(&batch(0, 2..4)).await, SendOutcome::Delivered);
    let objects = moto.objects(&keys).await;
    let keys: Vec<&str> = objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, [key(0, 2, 3)]);
}
