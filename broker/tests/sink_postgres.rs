//! The PostgreSQL sink against a real PostgreSQL 15 that each test starts
//! (initdb into a temp dir, a free loopback port, password auth) and stops.
//!
//! Proves: exact rows and columns; re-sent and overlapping batches leave one
//! row per event (G3); batches larger than one statement's parameter limit;
//! schema-qualified tables; a database that is down, stopped or restarted
//! gives retryable failures and then delivers (lazy connect, reconnect);
//! a bad row in a batch comes back alone as a permanent failure
//! (`PerItem`), the good rows are written; a missing table or grant is a
//! retryable setup problem naming the SQLSTATE; rows are keyed on
//! (cluster, partition, offset), so two tenants' events sharing an id are
//! both kept, and a table keyed on the bare id is refused until migrated.
//!
//! Needs PostgreSQL's server binaries (Debian `postgresql-15`, listed in
//! ops/apt-packages.txt); `AUDITFLOW_PG_BIN` overrides where they are.
//! Running as root, the server runs as the `postgres` (or `nobody`) user,
//! because PostgreSQL refuses to run as root.

use std::path::{Path, PathBuf};

#[path = "servers/postgres.rs"]
mod postgres;

use auditflow_broker::sinks::postgres::{Config, PostgresSink};
use auditflow_broker::sinks::{Delivery, FailureKind, SendOutcome, Sink};
use auditflow_protocol::{Hash32, Timestamp};
use postgres::{PgServer, PASSWORD, SUPERUSER};
use serde_json::json;

/// The cluster id the sinks under test write for.
const CLUSTER: &str = "test-cluster";

fn config(url: String) -> Config {
    Config {
        url,
        table: "audit_events".into(),
        create_table: true,
        connect_timeout_ms: 5_000,
        statement_timeout_ms: 10_000,
    }
}

fn delivery(partition: u32, offset: u64) -> Delivery {
    let event_id = format!("evt-{partition}-{offset}");
    let received_at = Timestamp(1_700_000_000_123_456_000 + offset as i64 * 1_000);
    let hash = Hash32([offset as u8; 32]);
    let event = json!({
        "id": event_id,
        "tenant": "acme",
        "action": "user.login",
        "outcome": "success",
        "data": {"n": offset},
    });
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
            "event": event,
        })),
    }
}

fn batch(partition: u32, offsets: std::ops::Range<u64>) -> Vec<Delivery> {
    offsets.map(|o| delivery(partition, o)).collect()
}

async fn count(admin: &tokio_postgres::Client, table: &str) -> i64 {
    admin
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0)
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

#[tokio::test]
async fn rows_are_exact_and_resends_write_no_duplicates() {
    let mut pg = PgServer::init();
    pg.start().await;
    let mut sink =
        PostgresSink::new(config(pg.url(SUPERUSER, PASSWORD)), CLUSTER.into()).expect("sink");

    let first = batch(2, 10..13);
    assert_eq!(sink.send(&first).await, SendOutcome::Delivered);

    let admin = pg.admin().await;
    let rows = admin
        .query(
            "SELECT event_id, partition, \"offset\", tenant, received_at, hash, event \
             FROM audit_events ORDER BY \"offset\"",
            &[],
        )
        .await
        .expect("select");
    assert_eq!(rows.len(), 3);
    for (row, d) in rows.iter().zip(&first) {
        assert_eq!(row.get::<_, String>("event_id"), d.event_id);
        assert_eq!(row.get::<_, i32>("partition"), 2);
        assert_eq!(row.get::<_, i64>("offset"), d.offset as i64);
        assert_eq!(row.get::<_, String>("tenant"), "acme");
        let at: time::OffsetDateTime = row.get("received_at");
        // PostgreSQL keeps microseconds; the test timestamps have no more.
        assert_eq!(at.unix_timestamp_nanos(), i128::from(d.received_at.0));
        assert_eq!(row.get::<_, String>("hash"), d.hash.to_hex());
        let event: serde_json::Value = row.get("event");
        assert_eq!(&event, &d.body.to_value()["event"]);
    }

    // The same batch again (a retry after a lost answer): no new rows.
    assert_eq!(sink.send(&first).await, SendOutcome::Delivered);
    assert_eq!(count(&admin, "audit_events").await, 3);
    // An overlapping batch (a new leader re-sending from its cursor).
    assert_eq!(sink.send(&batch(2, 11..15)).await, SendOutcome::Delivered);
    let per_event: Vec<(String, i64)> = admin
        .query(
            "SELECT event_id, count(*) FROM audit_events GROUP BY event_id ORDER BY 1",
            &[],
        )
        .await
        .expect("group")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected: Vec<(String, i64)> = (10..15).map(|o| (format!("evt-2-{o}"), 1)).collect();
    assert_eq!(per_event, expected);

    // More rows than one statement may carry parameters for: split into
    // several statements of one transaction.
    let big = batch(5, 0..10_000);
    assert_eq!(sink.send(&big).await, SendOutcome::Delivered);
    assert_eq!(sink.send(&big).await, SendOutcome::Delivered);
    assert_eq!(count(&admin, "audit_events").await, 5 + 10_000);

    // A schema-qualified table is created there.
    admin
        .batch_execute("CREATE SCHEMA audit")
        .await
        .expect("create schema");
    let mut qualified = config(pg.url(SUPERUSER, PASSWORD));
    qualified.table = "audit.Events".into();
    let mut sink2 = PostgresSink::new(qualified, CLUSTER.into()).expect("sink");
    assert_eq!(sink2.send(&batch(1, 0..4)).await, SendOutcome::Delivered);
    assert_eq!(count(&admin, "audit.\"Events\"").await, 4);
}

#[tokio::test]
async fn outages_are_retryable_and_delivery_resumes() {
    let mut pg = PgServer::init();
    // Down at start-up: building the sink must not need the database.
    let mut sink =
        PostgresSink::new(config(pg.url(SUPERUSER, PASSWORD)), CLUSTER.into()).expect("sink");
    assert_retryable(&sink.send(&batch(0, 0..2)).await, "127.0.0.1");

    pg.start().await;
    assert_eq!(sink.send(&batch(0, 0..2)).await, SendOutcome::Delivered);

    // Stopped while the sink holds a connection.
    pg.stop();
    assert_retryable(&sink.send(&batch(0, 2..4)).await, "127.0.0.1");
    assert_retryable(&sink.send(&batch(0, 2..4)).await, "127.0.0.1");

    // Back: the sink reconnects by itself.
    pg.start().await;
    assert_eq!(sink.send(&batch(0, 2..4)).await, SendOutcome::Delivered);
    let admin = pg.admin().await;
    assert_eq!(count(&admin, "audit_events").await, 4);
}

#[tokio::test]
async fn a_bad_row_fails_alone_and_the_rest_are_written() {
    let mut pg = PgServer::init();
    pg.start().await;
    let admin = pg.admin().await;

    // A NUL character cannot be stored in jsonb (22P05).
    let mut sink =
        PostgresSink::new(config(pg.url(SUPERUSER, PASSWORD)), CLUSTER.into()).expect("sink");
    let mut items = batch(0, 0..3);
    let mut body = items[1].body.to_value();
    body["event"]["data"] = json!({"note": "nul \u{0000} here"});
    items[1].body = auditflow_broker::sinks::Body::from_value(&body);
    match sink.send(&items).await {
        SendOutcome::PerItem(results) => {
            assert_eq!(results.len(), 3);
            assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
            let f = results[1].as_ref().expect_err("item 1 must fail");
            assert_eq!(f.kind, FailureKind::Permanent);
            assert!(f.message.contains("SQLSTATE 22P05"), "{}", f.message);
        }
        other => panic!("expected PerItem, got {other:?}"),
    }
    let ids: Vec<String> = admin
        .query("SELECT event_id FROM audit_events ORDER BY 1", &[])
        .await
        .expect("select")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, ["evt-0-0", "evt-0-2"]);

    // A table an operator made, with a CHECK the sink's rows can violate
    // (23514), and create_table = false.
    admin
        .batch_execute(
            "CREATE TABLE checked (cluster text, partition int, \"offset\" bigint, event_id text, \
             tenant text CHECK (tenant <> 'forbidden'), received_at timestamptz, hash text, event jsonb, \
             PRIMARY KEY (cluster, partition, \"offset\"))",
        )
        .await
        .expect("create checked");
    let mut c = config(pg.url(SUPERUSER, PASSWORD));
    c.table = "checked".into();
    c.create_table = false;
    let mut sink = PostgresSink::new(c, CLUSTER.into()).expect("sink");
    let mut items = batch(1, 0..4);
    items[2].tenant = "forbidden".into();
    match sink.send(&items).await {
        SendOutcome::PerItem(results) => {
            let bad: Vec<usize> = (0..4).filter(|&i| results[i].is_err()).collect();
            assert_eq!(bad, [2]);
            let f = results[2].as_ref().expect_err("item 2");
            assert_eq!(f.kind, FailureKind::Permanent);
            assert!(f.message.contains("SQLSTATE 23514"), "{}", f.message);
        }
        other => panic!("expected PerItem, got {other:?}"),
    }
    assert_eq!(count(&admin, "checked").await, 3);
    // A single bad row is a plain permanent failure.
    match sink.send(&items[2..3]).await {
        SendOutcome::Failed(f) => assert_eq!(f.kind, FailureKind::Permanent),
        other => panic!("expected Failed, got {other:?}"),
    }
}

#[tokio::test]
async fn missing_table_and_grant_are_retryable_setup_problems() {
    let mut pg = PgServer::init();
    pg.start().await;
    let admin = pg.admin().await;
    admin
        .batch_execute("CREATE ROLE writer LOGIN PASSWORD 'w'")
        .await
        .expect("create role");

    // No table and create_table = false: 42P01, retried (not parked).
    let mut c = config(pg.url("writer", "w"));
    c.table = "managed".into();
    c.create_table = false;
    let mut sink = PostgresSink::new(c, CLUSTER.into()).expect("sink");
    let items = batch(0, 0..2);
    assert_retryable(&sink.send(&items).await, "SQLSTATE 42P01");

    // The table exists but the role may not write: 42501, retried.
    admin
        .batch_execute(
            "CREATE TABLE managed (cluster text, partition int, \"offset\" bigint, event_id text, \
             tenant text, received_at timestamptz, hash text, event jsonb, \
             PRIMARY KEY (cluster, partition, \"offset\"))",
        )
        .await
        .expect("create managed");
    let outcome = sink.send(&items).await;
    assert_retryable(&outcome, "SQLSTATE 42501");
    assert_retryable(&outcome, "GRANT INSERT");

    // The operator grants: delivered, nothing was lost meanwhile.
    admin
        .batch_execute("GRANT INSERT, SELECT (cluster, partition, \"offset\") ON managed TO writer")
        .await
        .expect("grant");
    assert_eq!(sink.send(&items).await, SendOutcome::Delivered);
    assert_eq!(count(&admin, "managed").await, 2);

    // With create_table = true but no CREATE right on the schema, an
    // existing table is used as is.
    let mut c = config(pg.url("writer", "w"));
    c.table = "managed".into();
    let mut sink = PostgresSink::new(c, CLUSTER.into()).expect("sink");
    assert_eq!(sink.send(&batch(0, 2..3)).await, SendOutcome::Delivered);

    // A wrong password is a setup problem too.
    let mut sink =
        PostgresSink::new(config(pg.url("writer", "nope")), CLUSTER.into()).expect("sink");
    assert_retryable(&sink.send(&items).await, "28P01");
}

/// Acceptance 5 of issue 27. The bug: rows were keyed on the bare event id
/// (`ON CONFLICT (event_id) DO NOTHING`), so another tenant's event with
/// the same id was dropped while the cursor moved on. Rows are keyed on
/// (cluster, partition, offset) now; a table with the old key is refused
/// with the statements that migrate it, and written once migrated.
#[tokio::test]
async fn two_tenants_events_sharing_an_id_are_both_kept() {
    let mut pg = PgServer::init();
    pg.start().await;
    let admin = pg.admin().await;
    let mut sink =
        PostgresSink::new(config(pg.url(SUPERUSER, PASSWORD)), CLUSTER.into()).expect("sink");
    let acme = delivery(0, 7);
    let mut globex = delivery(0, 8);
    globex.event_id = acme.event_id.clone();
    globex.tenant = "globex".into();
    let both = [acme.clone(), globex.clone()];
    assert_eq!(sink.send(&both).await, SendOutcome::Delivered);
    let rows: Vec<(String, String, i64)> = admin
        .query(
            "SELECT event_id, tenant, \"offset\" FROM audit_events ORDER BY \"offset\"",
            &[],
        )
        .await
        .expect("select")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let id = acme.event_id.clone();
    assert_eq!(
        rows,
        [(id.clone(), "acme".into(), 7), (id, "globex".into(), 8)]
    );
    // A redelivery of the same events stores nothing twice.
    assert_eq!(sink.send(&both).await, SendOutcome::Delivered);
    assert_eq!(sink.send(&both[1..]).await, SendOutcome::Delivered);
    assert_eq!(count(&admin, "audit_events").await, 2);
    // Another cluster writing the same table keeps its own rows.
    let mut other =
        PostgresSink::new(config(pg.url(SUPERUSER, PASSWORD)), "other".into()).expect("sink");
    assert_eq!(other.send(&both).await, SendOutcome::Delivered);
    assert_eq!(count(&admin, "audit_events").await, 4);

    // A table made by an earlier version, keyed on the event id: refused,
    // retryably (nothing parked), naming the migration; nothing written.
    admin
        .batch_execute(
            "CREATE TABLE old_events (event_id text PRIMARY KEY, partition integer NOT NULL, \
             \"offset\" bigint NOT NULL, tenant text NOT NULL, received_at timestamptz NOT NULL, \
             hash text NOT NULL, event jsonb NOT NULL)",
        )
        .await
        .expect("create old table");
    let mut c = config(pg.url(SUPERUSER, PASSWORD));
    c.table = "old_events".into();
    let mut sink = PostgresSink::new(c, CLUSTER.into()).expect("sink");
    let outcome = sink.send(&both).await;
    assert_retryable(&outcome, "old_events_pkey (event_id)");
    assert_retryable(&outcome, "ADD PRIMARY KEY (cluster, partition, \"offset\")");
    assert_retryable(&outcome, "ALTER TABLE \"old_events\" ADD COLUMN");
    assert_eq!(count(&admin, "old_events").await, 0);
    // The operator runs the statements the message names: written.
    let SendOutcome::Failed(f) = outcome else {
        panic!("expected a failure")
    };
    let migration = f
        .message
        .split_once("Migrate with: ")
        .map(|(_, m)| m.replace(" (DROP INDEX old_events_pkey if it is an index only)", ""))
        .expect("migration statements");
    admin.batch_execute(&migration).await.expect("migrate");
    assert_eq!(sink.send(&both).await, SendOutcome::Delivered);
    assert_eq!(sink.send(&both).await, SendOutcome::Delivered);
    assert_eq!(count(&admin, "old_events").await, 2);
}

/// The data dir must not be left behind (the TempDir guard removes it even
/// though the server wrote it as another user).
#[tokio::test]
async fn the_guard_cleans_up() {
    let pg = PgServer::init();
    let dir: PathBuf = pg.dir.path().to_path_buf();
    assert!(Path::new(&dir).join("data").exists());
    drop(pg);
    assert!(!dir.exists());
}
