//! The syslog sink against a real `rsyslogd` that each test starts in the
//! foreground on a free loopback port (`imtcp`, octet-counted framing),
//! with a configuration, work directory, pid file and output file in a
//! temp dir, and stops.
//!
//! rsyslogd parses each message as RFC 5424 and writes its PRI, timestamp,
//! header fields, raw structured data and MSG as one line to a file; the
//! tests parse those lines back. So they prove what a real receiver makes
//! of the bytes: every event arrives, in offset order, with the right
//! PRI (facility 13, severity from the outcome), MSGID, structured data
//! (escaping of `"`, `\` and `]` included) and JSON body; a 20 KiB event
//! survives framing; a receiver that is down gives a retryable failure
//! (lazy connect), and after a restart on the same port the sink
//! reconnects by itself and delivers; over TLS (rsyslog's GnuTLS driver,
//! which negotiates TLS 1.2 here, and its OpenSSL driver, TLS 1.3)
//! delivery works with the right CA and fails retryably with a wrong CA
//! or server name.
//!
//! Needs Debian `rsyslog`, `rsyslog-gnutls` and `rsyslog-openssl` (listed
//! in ops/apt-packages.txt); `AUDITFLOW_RSYSLOGD` overrides the binary.

#[path = "servers/rsyslog.rs"]
mod rsyslog;

use std::collections::BTreeMap;
use std::path::Path;

use auditflow_broker::sinks::syslog::{Config, SeverityMap, SyslogSink, TlsConfig};
use auditflow_broker::sinks::{Delivery, SendOutcome, Sink};
use auditflow_protocol::{Hash32, Timestamp};
use rsyslog::{has_driver, make_certs, Received, Rsyslog};
use serde_json::json;

/// The sink's host name, checked in what rsyslog received.
const HOSTNAME: &str = "node-1";
/// A tenant that needs every SD-PARAM escape.
const TENANT: &str = r#"acme "blue" \ team]"#;

const OUTCOMES: [&str; 4] = ["success", "failure", "denied", "error"];

/// Event time of `offset`: distinct per event, with nanoseconds that the
/// syslog timestamp (microseconds) cuts off.
fn event_time(offset: u64) -> Timestamp {
    Timestamp(1_715_000_000_123_456_789 + offset as i64 * 1_000_000_007)
}

fn delivery(partition: u32, offset: u64) -> Delivery {
    let event_id = format!("evt-{partition}-{offset} \"q\" ]");
    let received_at = Timestamp(1_716_000_000_000_000_000 + offset as i64);
    let hash = Hash32([offset as u8; 32]);
    // Offset 7 is big: far over rsyslog's default 8 KiB message size, so
    // framing and the receiver's limit are exercised.
    let blob = if offset == 7 {
        "x".repeat(20_000)
    } else {
        String::new()
    };
    let event = json!({
        "id": event_id,
        "tenant": TENANT,
        "time": event_time(offset),
        "actor": {"id": "u-1", "type": "user", "name": "Zoë"},
        "action": format!("user.login.attempt.with.a.long.name.{offset}"),
        "target": {"type": "session", "id": format!("s-{offset}")},
        "outcome": OUTCOMES[offset as usize % 4],
        "data": {"blob": blob, "line": "two\nlines"},
    });
    Delivery {
        partition,
        offset,
        event_id,
        tenant: TENANT.into(),
        received_at,
        hash,
        body: auditflow_broker::sinks::Body::from_value(&json!({
            "partition": partition,
            "offset": offset,
            "received_at": received_at,
            "hash": hash,
            "event": event,
        })),
    }
}

fn batch(partition: u32, offsets: std::ops::Range<u64>) -> Vec<Delivery> {
    offsets.map(|o| delivery(partition, o)).collect()
}

fn config(addr: String) -> Config {
    Config {
        addr,
        tls: None,
        app_name: "auditflow".into(),
        hostname: Some(HOSTNAME.into()),
        facility: 13,
        severity: SeverityMap::default(),
        utf8_bom: false,
        connect_timeout_ms: 5_000,
        write_timeout_ms: 10_000,
    }
}

/// Checks that `got` are exactly the messages of `sent`, in order.
fn assert_messages(got: &[Received], sent: &[Delivery]) {
    assert_eq!(got.len(), sent.len(), "{got:#?}");
    for (r, d) in got.iter().zip(sent) {
        let outcome = OUTCOMES[d.offset as usize % 4];
        let severity = match outcome {
            "success" => 6,
            "failure" => 5,
            "denied" => 4,
            _ => 3,
        };
        assert_eq!(r.pri, 13 * 8 + severity, "offset {}", d.offset);
        let time = Timestamp::parse_rfc3339(&r.time).expect("rsyslog timestamp");
        let micros = event_time(d.offset).unix_nanos() / 1_000 * 1_000;
        assert_eq!(time.unix_nanos(), micros, "offset {}: {}", d.offset, r.time);
        assert_eq!(r.hostname, HOSTNAME);
        assert_eq!(r.app_name, "auditflow");
        assert_eq!(r.procid, "-");
        let action = format!("user.login.attempt.with.a.long.name.{}", d.offset);
        assert_eq!(r.msgid, action[..32]);
        let sd = r.sd.get("auditflow@32473").expect("auditflow SD element");
        let expected: BTreeMap<String, String> = [
            ("id", d.event_id.clone()),
            ("partition", d.partition.to_string()),
            ("offset", d.offset.to_string()),
            ("tenant", TENANT.to_string()),
            ("hash", d.hash.to_hex()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(sd, &expected);
        assert_eq!(r.sd.len(), 1);
        assert_eq!(r.body, d.body.to_value());
    }
}

fn assert_retryable(outcome: &SendOutcome, needles: &[&str]) {
    match outcome {
        SendOutcome::Failed(f) => {
            assert!(f.is_retryable(), "not retryable: {f:?}");
            for needle in needles {
                assert!(
                    f.message.contains(needle),
                    "{needle:?} not in {:?}",
                    f.message
                );
            }
        }
        other => panic!("expected a retryable failure, got {other:?}"),
    }
}

#[tokio::test]
async fn delivers_batches_in_order_with_structured_data() {
    let mut server = Rsyslog::new(None);
    server.start().await;
    let mut sink = SyslogSink::new(config(server.addr())).expect("sink");
    let mut sent = Vec::new();
    for range in [0..5, 5..12, 12..13, 13..30] {
        let b = batch(2, range);
        assert_eq!(sink.send(&b).await, SendOutcome::Delivered);
        sent.extend(b);
    }
    let got = server.wait_for(sent.len()).await;
    assert_messages(&got, &sent);
    server.stop();
}

#[tokio::test]
async fn fails_retryably_while_down_and_reconnects_after_a_restart() {
    let mut server = Rsyslog::new(None);
    let addr = server.addr();
    // Built while the receiver is down: connecting is lazy.
    let mut sink = SyslogSink::new(config(server.addr())).expect("sink");
    let first = batch(0, 0..4);
    assert_retryable(&sink.send(&first).await, &[addr.as_str(), "connect"]);

    server.start().await;
    assert_eq!(sink.send(&first).await, SendOutcome::Delivered);
    server.wait_for(4).await;

    // The receiver goes away: the closed connection is noticed, the
    // reconnect is refused, the batch comes back as retryable.
    server.stop();
    let second = batch(0, 4..9);
    assert_retryable(&sink.send(&second).await, &[addr.as_str(), "connect"]);
    assert_retryable(&sink.send(&second).await, &[addr.as_str()]);

    // Back on the same port: the sink reconnects by itself.
    server.start().await;
    assert_eq!(sink.send(&second).await, SendOutcome::Delivered);
    let third = batch(0, 9..12);
    assert_eq!(sink.send(&third).await, SendOutcome::Delivered);
    let got = server.wait_for(12).await;
    let sent: Vec<Delivery> = first.into_iter().chain(second).chain(third).collect();
    assert_messages(&got, &sent);
}

/// TLS against one of rsyslog's drivers.
async fn tls_round_trip(driver: &str) {
    assert!(
        has_driver(driver),
        "rsyslog's {driver} driver is missing: apt-get install rsyslog-gnutls rsyslog-openssl \
         (ops/apt-packages.txt)"
    );
    let certs_dir = tempfile::tempdir().expect("temp dir");
    let good = make_certs(certs_dir.path(), "good");
    let other = make_certs(certs_dir.path(), "other");
    let mut server = Rsyslog::new(Some((driver, &good)));
    server.start().await;
    let tls_config = |ca: &Path, name: &str| Config {
        tls: Some(TlsConfig {
            ca_cert: ca.to_path_buf(),
            server_name: name.into(),
        }),
        ..config(server.addr())
    };

    // A CA that did not sign the receiver's certificate, or a name the
    // certificate does not carry: refused, retryably (an operator fixes
    // the settings or the receiver, then delivery resumes).
    let mut wrong_ca = SyslogSink::new(tls_config(&other.ca, "localhost")).expect("sink");
    assert_retryable(&wrong_ca.send(&batch(1, 0..1)).await, &["TLS handshake"]);
    let mut wrong_name = SyslogSink::new(tls_config(&good.ca, "syslog.example")).expect("sink");
    assert_retryable(&wrong_name.send(&batch(1, 0..1)).await, &["TLS handshake"]);

    let mut sink = SyslogSink::new(tls_config(&good.ca, "localhost")).expect("sink");
    let sent = batch(1, 0..10);
    assert_eq!(sink.send(&sent[..6]).await, SendOutcome::Delivered);
    assert_eq!(sink.send(&sent[6..]).await, SendOutcome::Delivered);
    let got = server.wait_for(sent.len()).await;
    assert_messages(&got, &sent);

    // A restart of a TLS receiver: reconnect with a new handshake.
    server.stop();
    server.start().await;
    let more = batch(1, 10..13);
    assert_eq!(sink.send(&more).await, SendOutcome::Delivered);
    let got = server.wait_for(13).await;
    assert_messages(&got[10..], &more);
}

#[tokio::test]
async fn tls_with_gnutls_driver() {
    tls_round_trip("gtls").await;
}

#[tokio::test]
async fn tls_with_openssl_driver() {
    tls_round_trip("ossl").await;
}
