//! Delivery acceptance (issue 4, points 1, 2 and 4) against real servers on
//! loopback: rsyslogd (syslog, octet counting), PostgreSQL 15, moto (S3)
//! and an HTTP webhook receiver, fed by a real three-node cluster.
//!
//! - 10,000 events reach every destination exactly as filtered and masked,
//!   in offset order per partition; the masked values never appear in any
//!   server's copy.
//! - PostgreSQL is stopped for the second half of the appends: the other
//!   destinations keep flowing (they catch up to the head while it is down)
//!   and the nodes' memory stays flat while its backlog builds; once it is
//!   back it receives everything, in order, one row per event.
//! - The node leading most partitions is killed while delivery to
//!   PostgreSQL runs: the new leaders resume from the replicated cursor,
//!   and PostgreSQL ends with exactly one row per event.
//!
//! - An Elasticsearch bulk item rejected for certain events (the strict
//!   `_bulk` stand-in) parks exactly those events with their history while
//!   the rest of each bulk request is stored; redrive after the fix
//!   delivers them.
//!
//! The server fixtures are the sink tests' own (broker/tests/servers).

mod common;
#[path = "../broker/tests/servers/elasticsearch.rs"]
mod elasticsearch;
#[path = "../broker/tests/servers/moto.rs"]
mod moto;
#[path = "../broker/tests/servers/postgres.rs"]
mod postgres;
#[path = "../broker/tests/servers/rsyslog.rs"]
mod rsyslog;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use auditflow_broker::delivery::DestinationConfig;
use auditflow_protocol::delivery::RedriveSelection;
use auditflow_protocol::{Event, Outcome};
use common::receiver::Receiver;
use common::*;
use serde_json::{json, Value};

/// Events appended by the main test.
const EVENTS: u64 = 10_000;
/// Values that masking must keep on the node.
const SECRET_IP: &str = "10.0.0.1";
const SECRET_CARD: &str = "4111111111111111";
/// How long a destination may take to catch up on this 2-core machine.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(300);

/// Event `n`: tenants, actions and outcomes vary so filters select
/// different subsets; every event carries the two secrets.
fn audit_event(n: u64) -> Event {
    let mut e = event(&format!("ev-{n:06}"), &format!("tenant-{}", n % 4), n);
    e.action = if n % 3 == 0 {
        "user.login".into()
    } else {
        "document.read".into()
    };
    e.outcome = [
        Outcome::Success,
        Outcome::Failure,
        Outcome::Denied,
        Outcome::Error,
    ][(n % 4 / 2 + n % 2 * 2) as usize % 4];
    e.data = serde_json::from_value(json!({ "card": { "number": SECRET_CARD }, "amount": n }))
        .expect("data is an object");
    e
}

fn matches(filter: &str, n: u64) -> bool {
    let e = audit_event(n);
    match filter {
        "syslog" => ["tenant-0", "tenant-1"].contains(&e.tenant.as_str()),
        "pg" => true,
        "s3" => e.action.starts_with("user."),
        "hook" => matches!(e.outcome, Outcome::Failure | Outcome::Denied),
        other => panic!("unknown destination {other}"),
    }
}

fn destination(name: &str, sink: Value, filter: Value) -> DestinationConfig {
    serde_json::from_value(json!({
        "name": name,
        "sink": sink,
        "filter": filter,
        "masking": [
            { "path": "actor.ip", "action": "hash" },
            { "path": "data.card.number", "action": "redact" },
        ],
        "mask_key": "real-sinks-test-key",
        "batch_size": 200,
        "linger_ms": 10,
        "retry": { "initial_ms": 50, "max_ms": 500 },
        "breaker": { "failure_threshold": 5, "open_ms": 300 },
    }))
    .expect("destination config")
}

/// Appends events `from..to` in batches; returns id → (partition, offset).
async fn append_range(
    client: &auditflow_client::Client,
    from: u64,
    to: u64,
) -> BTreeMap<String, (u32, u64)> {
    append_batches(client, from, to, audit_event, Appends::AllStored).await
}

/// Checks arrivals `(id, partition, offset)` in arrival order: the offset
/// of each id is the acknowledged one, and per partition the first
/// arrivals come in increasing offset order.
fn assert_in_order(
    name: &str,
    arrivals: &[(String, u32, u64)],
    acked: &BTreeMap<String, (u32, u64)>,
) {
    let mut seen = BTreeSet::new();
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    for (id, partition, offset) in arrivals {
        assert_eq!(
            acked.get(id),
            Some(&(*partition, *offset)),
            "{name}: {id} arrived with another position"
        );
        if seen.insert(id.clone()) {
            if let Some(prev) = last.insert(*partition, *offset) {
                assert!(
                    prev < *offset,
                    "{name}: partition {partition} out of order: {prev} then {offset}"
                );
            }
        }
    }
}

fn assert_masked(name: &str, text: &str) {
    assert!(
        !text.contains(SECRET_IP) && !text.contains(SECRET_CARD),
        "{name}: a masked value left the node in clear: {text}"
    );
}

/// The ids each destination should hold once caught up.
fn wanted(name: &str, acked: &BTreeMap<String, (u32, u64)>) -> BTreeSet<String> {
    acked
        .keys()
        .filter(|id| matches(name, id[3..].parse().expect("numbered id")))
        .cloned()
        .collect()
}

/// Rows of the PostgreSQL destination, in the order they were inserted.
async fn pg_rows(pg: &postgres::PgServer) -> Option<Vec<(String, u32, u64, String)>> {
    let admin = pg.admin_try().await?;
    let rows = admin
        .query(
            "SELECT event_id, partition, \"offset\", event::text FROM audit_events ORDER BY seq",
            &[],
        )
        .await
        .ok()?;
    Some(
        rows.iter()
            .map(|r| {
                let partition: i32 = r.get(1);
                let offset: i64 = r.get(2);
                (r.get(0), partition as u32, offset as u64, r.get(3))
            })
            .collect(),
    )
}

/// The table made up front with an insertion sequence, so the test can
/// see the order rows arrived in (the sink inserts named columns only).
async fn create_pg_table(pg: &postgres::PgServer) {
    pg.admin()
        .await
        .batch_execute(
            "CREATE TABLE audit_events (
                 seq bigserial,
                 cluster text NOT NULL,
                 partition integer NOT NULL,
                 \"offset\" bigint NOT NULL,
                 event_id text NOT NULL,
                 tenant text NOT NULL,
                 received_at timestamptz NOT NULL,
                 hash text NOT NULL,
                 event jsonb NOT NULL,
                 PRIMARY KEY (cluster, partition, \"offset\"))",
        )
        .await
        .expect("create table");
}

fn pg_sink(pg: &postgres::PgServer) -> Value {
    json!({
        "kind": "postgres",
        "url": pg.url(postgres::SUPERUSER, postgres::PASSWORD),
        "table": "audit_events",
        "create_table": false,
        "connect_timeout_ms": 2000,
    })
}

async fn wait_for_pg(
    pg: &postgres::PgServer,
    want: &BTreeSet<String>,
) -> Vec<(String, u32, u64, String)> {
    wait_until("PostgreSQL caught up", DELIVERY_DEADLINE, || async {
        let rows = pg_rows(pg).await?;
        let got: BTreeSet<String> = rows.iter().map(|r| r.0.clone()).collect();
        (&got == want).then_some(rows)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_syslog_postgres_s3_and_webhook_filtered_masked_in_order() {
    let mut syslog = rsyslog::Rsyslog::new(None);
    syslog.start().await;
    let mut pg = postgres::PgServer::init();
    pg.start().await;
    create_pg_table(&pg).await;
    let mut s3 = moto::Moto::new();
    s3.start().await;
    s3.create_bucket().await;
    let keys = moto::Keys {
        id: "test".into(),
        secret: "test".into(),
    };
    let hook = Receiver::start().await;

    let opts = ClusterOptions {
        destinations: vec![
            destination(
                "syslog",
                json!({ "kind": "syslog", "addr": syslog.addr() }),
                json!({ "tenants": ["tenant-0", "tenant-1"] }),
            ),
            destination("pg", pg_sink(&pg), json!({})),
            destination(
                "s3",
                json!({
                    "kind": "s3",
                    "endpoint": s3.endpoint(),
                    "bucket": moto::BUCKET,
                    "access_key_id": keys.id,
                    "secret_access_key": keys.secret,
                }),
                json!({ "action_prefixes": ["user."] }),
            ),
            destination(
                "hook",
                json!({ "kind": "webhook", "url": hook.url() }),
                json!({ "outcomes": ["failure", "denied"] }),
            ),
        ],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(opts);
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;

    // First half with every destination up.
    let mut acked = append_range(&client, 0, EVENTS / 2).await;
    wait_for_pg(&pg, &wanted("pg", &acked)).await;

    // PostgreSQL goes down; the second half is appended.
    pg.stop();
    let rss_before = cluster.rss_kib();
    acked.extend(append_range(&client, EVENTS / 2, EVENTS).await);
    assert_eq!(acked.len() as u64, EVENTS);

    // The others flow while it is down: they reach the head.
    let want_hook = wanted("hook", &acked);
    wait_until("webhook caught up", DELIVERY_DEADLINE, || async {
        let got: BTreeSet<String> = hook.received().into_iter().map(|r| r.id).collect();
        (got == want_hook).then_some(())
    })
    .await;
    let want_syslog = wanted("syslog", &acked);
    let syslog_lines = syslog.wait_for(want_syslog.len()).await;
    let want_s3 = wanted("s3", &acked);
    let objects = wait_until("S3 caught up", DELIVERY_DEADLINE, || async {
        let objects = s3.objects(&keys).await;
        let got: BTreeSet<String> = objects
            .iter()
            .flat_map(|o| o.body.lines())
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["event"]["id"].as_str().map(str::to_string))
            .collect();
        (got == want_s3).then_some(objects)
    })
    .await;
    // Status agrees: the others have no lag; pg holds the backlog.
    let statuses: Vec<_> = wait_until(
        "status shows pg's backlog",
        Duration::from_secs(30),
        || async {
            let s: Vec<_> = client
                .dest_status_all()
                .await
                .into_iter()
                .flat_map(|(_, s)| s.unwrap_or_default())
                .collect();
            let others_clear = s
                .iter()
                .filter(|s| s.dest != "pg")
                .all(|s| s.lag_events == 0);
            let pg_lag: u64 = s
                .iter()
                .filter(|s| s.dest == "pg")
                .map(|s| s.lag_events)
                .sum();
            (others_clear && pg_lag > 0).then_some(s)
        },
    )
    .await;
    let pg_lag: u64 = statuses
        .iter()
        .filter(|s| s.dest == "pg")
        .map(|s| s.lag_events)
        .sum();
    assert!(
        statuses
            .iter()
            .filter(|s| s.dest == "pg")
            .any(|s| s.last_error.is_some() && s.oldest_undelivered_age_ms.is_some()),
        "pg's outage is visible: {statuses:?}"
    );
    // Memory stays flat while the backlog builds: delivery reads from
    // redb in batches and never holds the backlog.
    let rss_after = cluster.rss_kib();
    eprintln!("pg backlog {pg_lag} events; node RSS KiB before {rss_before:?} after {rss_after:?}");
    for (before, after) in rss_before.iter().zip(&rss_after) {
        assert!(
            *after < before + 64 * 1024,
            "node memory grew with the backlog: {before} KiB -> {after} KiB"
        );
    }

    // PostgreSQL is back: everything arrives, one row per event, in order.
    pg.start().await;
    let rows = wait_for_pg(&pg, &wanted("pg", &acked)).await;
    assert_eq!(rows.len() as u64, EVENTS, "one row per event");
    let arrivals: Vec<_> = rows.iter().map(|r| (r.0.clone(), r.1, r.2)).collect();
    assert_in_order("pg", &arrivals, &acked);
    for r in &rows {
        assert_masked("pg", &r.3);
        let event: Value = serde_json::from_str(&r.3).expect("jsonb");
        assert_eq!(event["data"]["card"]["number"], "[REDACTED]");
        assert!(event["actor"]["ip"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("hmac-sha256:")));
    }

    // Webhook: order, filter, masking.
    let received = hook.received();
    let arrivals: Vec<_> = received
        .iter()
        .map(|r| (r.id.clone(), r.partition, r.offset))
        .collect();
    assert_in_order("hook", &arrivals, &acked);
    for r in &received {
        assert_masked("hook", &r.body.to_string());
    }

    // Syslog: exactly the filtered set, in order, masked.
    let arrivals: Vec<_> = syslog_lines
        .iter()
        .map(|r| {
            let sd = &r.sd["auditflow@32473"];
            (
                sd["id"].clone(),
                sd["partition"].parse().expect("partition"),
                sd["offset"].parse().expect("offset"),
            )
        })
        .collect();
    let got: BTreeSet<String> = arrivals.iter().map(|a| a.0.clone()).collect();
    assert_eq!(got, want_syslog, "syslog got exactly the filtered events");
    assert_in_order("syslog", &arrivals, &acked);
    for r in &syslog_lines {
        assert_masked("syslog", &r.body.to_string());
    }

    // S3: per partition, objects in key order hold increasing offsets.
    let mut by_key: Vec<_> = objects.iter().collect();
    by_key.sort_by(|a, b| a.key.cmp(&b.key));
    let arrivals: Vec<_> = by_key
        .iter()
        .flat_map(|o| o.body.lines())
        .map(|l| {
            assert_masked("s3", l);
            let v: Value = serde_json::from_str(l).expect("NDJSON line");
            (
                v["event"]["id"].as_str().expect("id").to_string(),
                v["partition"].as_u64().expect("partition") as u32,
                v["offset"].as_u64().expect("offset"),
            )
        })
        .collect();
    assert_in_order("s3", &arrivals, &acked);

    // Everything caught up and visible as such.
    wait_until(
        "every destination at the head",
        Duration::from_secs(60),
        || async {
            let s: Vec<_> = client
                .dest_status_all()
                .await
                .into_iter()
                .flat_map(|(_, s)| s.unwrap_or_default())
                .collect();
            (s.len() == 4 * 8 && s.iter().all(|s| s.lag_events == 0 && s.dlq_size == 0))
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_has_one_row_per_event_after_a_leader_kill() {
    let mut pg = postgres::PgServer::init();
    pg.start().await;
    create_pg_table(&pg).await;
    let opts = ClusterOptions {
        destinations: vec![destination("pg", pg_sink(&pg), json!({}))],
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start(opts);
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;
    let mut acked = append_range(&client, 0, 3000).await;

    // Kill the node leading most partitions while rows are going in.
    wait_until("delivery under way", Duration::from_secs(60), || async {
        let rows = pg_rows(&pg).await?;
        (rows.len() > 200).then_some(())
    })
    .await;
    let idx = cluster.busiest_leader(&client).await;
    cluster.kill(idx);
    acked.extend(append_range(&client, 3000, 6000).await);
    cluster.spawn(idx);

    let rows = wait_for_pg(&pg, &acked.keys().cloned().collect()).await;
    assert_eq!(rows.len(), acked.len(), "exactly one row per event");
    let arrivals: Vec<_> = rows.iter().map(|r| (r.0.clone(), r.1, r.2)).collect();
    assert_in_order("pg", &arrivals, &acked);
    // No gap: every partition's rows are offsets 0..n.
    let mut per_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for (_, p, o) in &arrivals {
        per_partition.entry(*p).or_default().push(*o);
    }
    for (p, mut offsets) in per_partition {
        offsets.sort_unstable();
        let expected: Vec<u64> = (0..offsets.len() as u64).collect();
        assert_eq!(offsets, expected, "partition {p} has a gap");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elasticsearch_item_rejections_park_exactly_those_events() {
    let es = elasticsearch::Es::start().await;
    let refused: BTreeSet<String> = (0..1000u64)
        .filter(|n| n % 111 == 7)
        .map(|n| format!("ev-{n:06}"))
        .collect();
    es.with(|i| i.reject.extend(refused.iter().cloned()));
    let opts = ClusterOptions {
        destinations: vec![destination(
            "es",
            json!({
                "kind": "elasticsearch",
                "url": es.url(),
                "index": "audit-{tenant}",
                "username": elasticsearch::USER,
                "password": elasticsearch::PASSWORD,
            }),
            json!({}),
        )],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(opts);
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;
    let acked = append_range(&client, 0, 1000).await;
    // Document ids are (cluster, partition, offset); the event id is in
    // the document.
    let stored_ids = || -> BTreeSet<String> {
        es.with(|i| {
            i.docs
                .values()
                .filter_map(|d| d.pointer("/event/id").and_then(Value::as_str))
                .map(str::to_string)
                .collect()
        })
    };

    // Everything else is stored, whatever bulk request it shared with a
    // refused event; exactly the refused ones are parked, with history.
    let accepted: BTreeSet<String> = acked
        .keys()
        .filter(|id| !refused.contains(*id))
        .cloned()
        .collect();
    wait_until("accepted events stored", DELIVERY_DEADLINE, || async {
        (stored_ids() == accepted).then_some(())
    })
    .await;
    let parked = wait_until("refused events parked", Duration::from_secs(60), || async {
        let mut parked = BTreeMap::new();
        for p in 0..8 {
            for (offset, entry) in client.dlq_list("es", p, 0, 1000).await.ok()? {
                parked.insert(entry.event_id.clone(), ((p, offset), entry));
            }
        }
        (parked.len() == refused.len()).then_some(parked)
    })
    .await;
    assert_eq!(parked.keys().cloned().collect::<BTreeSet<_>>(), refused);
    for (id, (at, entry)) in &parked {
        assert_eq!(acked.get(id), Some(at), "parked at its own offset");
        let last = entry.attempts.last().expect("attempt history");
        assert_eq!(last.status, Some(400), "{entry:?}");
        assert!(
            last.error.contains("mapper_parsing_exception"),
            "the reason is kept: {entry:?}"
        );
    }

    // The mapping is fixed; redrive delivers the parked events.
    es.with(|i| i.reject.clear());
    for p in 0..8 {
        client
            .redrive("es", p, RedriveSelection::All)
            .await
            .expect("redrive");
    }
    let all: BTreeSet<String> = acked.keys().cloned().collect();
    wait_until(
        "redriven events stored",
        Duration::from_secs(60),
        || async { (stored_ids() == all).then_some(()) },
    )
    .await;
    wait_until("DLQ empty", Duration::from_secs(30), || async {
        for p in 0..8 {
            if !client.dlq_list("es", p, 0, 10).await.ok()?.is_empty() {
                return None;
            }
        }
        Some(())
    })
    .await;
}
