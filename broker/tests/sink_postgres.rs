//! The PostgreSQL sink against a real PostgreSQL 15 that each test starts
//! (initdb into a temp dir, a free loopback port, password auth) and stops.
//!
//! Proves: exact rows and columns; re-sent and overlapping batches leave one
//! row per event (G3); batches larger than one statement's parameter limit;
//! schema-qualified tables; a database that is down, stopped or restarted
//! gives retryable failures and then delivers (lazy connect, reconnect);
//! a bad row in a batch comes back alone as a permanent failure
//! (`PerItem`), the good rows are written; a missing table or grant is a
//! retryable setup problem naming the SQLSTATE.
//!
//! Needs PostgreSQL's server binaries (Debian `postgresql-15`, listed in
//! ops/apt-packages.txt); `AUDITFLOW_PG_BIN` overrides where they are.
//! Running as root, the server runs as the `postgres` (or `nobody`) user,
//! because PostgreSQL refuses to run as root.

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use auditflow_broker::sinks::postgres::{Config, PostgresSink};
use auditflow_broker::sinks::{Delivery, FailureKind, SendOutcome, Sink};
use auditflow_protocol::{Hash32, Timestamp};
use serde_json::json;
use tokio_postgres::NoTls;

/// Superuser made by initdb, and its password (scram auth over TCP).
const SUPERUSER: &str = "auditflow";
const PASSWORD: &str = "s3cret pass";
/// The database the sink writes to.
const DB: &str = "audit";
/// How long a server may take to start or stop on a loaded 2-core machine.
const SERVER_DEADLINE: Duration = Duration::from_secs(60);

fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("AUDITFLOW_PG_BIN") {
        return PathBuf::from(dir);
    }
    for version in ["15", "16", "17"] {
        let dir = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
        if dir.join("postgres").exists() {
            return dir;
        }
    }
    panic!(
        "PostgreSQL server binaries not found: apt-get install postgresql-15 \
         (ops/apt-packages.txt) or set AUDITFLOW_PG_BIN"
    );
}

/// Looks up a user's uid and gid with `id`.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").arg(flag).arg(name).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// A PostgreSQL server in a temp dir; stopped (and removed) on drop.
struct PgServer {
    dir: tempfile::TempDir,
    port: u16,
    bin: PathBuf,
    /// uid/gid to run as when we are root.
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
}

impl PgServer {
    /// initdb on a fresh directory; not started.
    fn init() -> PgServer {
        let bin = pg_bin();
        let dir = tempfile::tempdir().expect("temp dir");
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let run_as = if root {
            let ids = user_ids("postgres")
                .or_else(|| user_ids("nobody"))
                .expect("running as root needs a `postgres` or `nobody` user");
            Some(ids)
        } else {
            None
        };
        let pwfile = dir.path().join("pw");
        fs::write(&pwfile, PASSWORD).expect("write pwfile");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown dir");
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).expect("chown pwfile");
        }
        let server = PgServer {
            port: free_port(),
            bin,
            run_as,
            child: None,
            dir,
        };
        let out = server
            .command("initdb")
            .arg("-D")
            .arg(server.data())
            .args(["-U", SUPERUSER, "-E", "UTF8", "--no-locale", "--no-sync"])
            .args(["--auth-host=scram-sha-256", "--auth-local=trust"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.current_dir(self.dir.path());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// The sink's URL (password with a space: percent-encoded).
    fn url(&self, user: &str, password: &str) -> String {
        let password = password.replace(' ', "%20");
        format!("postgres://{user}:{password}@127.0.0.1:{}/{DB}", self.port)
    }

    fn admin_url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} password='{PASSWORD}' dbname={db}",
            self.port
        )
    }

    /// Starts the server and waits until it accepts connections; creates
    /// the database the first time.
    async fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("open log");
        let log2 = log.try_clone().expect("clone log");
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(self.log(), Some(uid), Some(gid)).expect("chown log");
        }
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            // Test speed: durability of the test server does not matter.
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("spawn postgres");
        self.child = Some(child);
        let deadline = Instant::now() + SERVER_DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("postgres exited with {status}: {}", self.log_text());
                }
            }
            if let Ok((client, conn)) =
                tokio_postgres::connect(&self.admin_url("postgres"), NoTls).await
            {
                let task = tokio::spawn(conn);
                let exists = client
                    .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DB])
                    .await
                    .expect("query pg_database");
                if exists.is_none() {
                    client
                        .batch_execute(&format!("CREATE DATABASE {DB}"))
                        .await
                        .expect("create database");
                }
                drop(client);
                let _ = task.await;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not accept connections: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fast shutdown (SIGINT: sessions are terminated, like an operator's
    /// restart), waiting until the process is gone.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        let deadline = Instant::now() + SERVER_DEADLINE;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
            }
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// An admin connection to the sink's database.
    async fn admin(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.admin_url(DB), NoTls)
            .await
            .expect("admin connect");
        tokio::spawn(conn);
        client
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

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
        body: json!({
            "partition": partition,
            "offset": offset,
            "received_at": received_at,
            "hash": hash,
            "event": event,
        }),
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
    let mut sink = PostgresSink::new(config(pg.url(SUPERUSER, PASSWORD))).expect("sink");

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
        assert_eq!(&event, &d.body["event"]);
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
    let mut sink2 = PostgresSink::new(qualified).expect("sink");
    assert_eq!(sink2.send(&batch(1, 0..4)).await, SendOutcome::Delivered);
    assert_eq!(count(&admin, "audit.\"Events\"").await, 4);
}

#[tokio::test]
async fn outages_are_retryable_and_delivery_resumes() {
    let mut pg = PgServer::init();
    // Down at start-up: building the sink must not need the database.
    let mut sink = PostgresSink::new(config(pg.url(SUPERUSER, PASSWORD))).expect("sink");
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
    let mut sink = PostgresSink::new(config(pg.url(SUPERUSER, PASSWORD))).expect("sink");
    let mut items = batch(0, 0..3);
    items[1].body["event"]["data"] = json!({"note": "nul \u{0000} here"});
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
            "CREATE TABLE checked (event_id text PRIMARY KEY, partition int, \"offset\" bigint, \
             tenant text CHECK (tenant <> 'forbidden'), received_at timestamptz, hash text, event jsonb)",
        )
        .await
        .expect("create checked");
    let mut c = config(pg.url(SUPERUSER, PASSWORD));
    c.table = "checked".into();
    c.create_table = false;
    let mut sink = PostgresSink::new(c).expect("sink");
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
    let mut sink = PostgresSink::new(c).expect("sink");
    let items = batch(0, 0..2);
    assert_retryable(&sink.send(&items).await, "SQLSTATE 42P01");

    // The table exists but the role may not write: 42501, retried.
    admin
        .batch_execute(
            "CREATE TABLE managed (event_id text PRIMARY KEY, partition int, \"offset\" bigint, \
             tenant text, received_at timestamptz, hash text, event jsonb)",
        )
        .await
        .expect("create managed");
    let outcome = sink.send(&items).await;
    assert_retryable(&outcome, "SQLSTATE 42501");
    assert_retryable(&outcome, "GRANT INSERT");

    // The operator grants: delivered, nothing was lost meanwhile.
    admin
        .batch_execute("GRANT INSERT, SELECT (event_id) ON managed TO writer")
        .await
        .expect("grant");
    assert_eq!(sink.send(&items).await, SendOutcome::Delivered);
    assert_eq!(count(&admin, "managed").await, 2);

    // With create_table = true but no CREATE right on the schema, an
    // existing table is used as is.
    let mut c = config(pg.url("writer", "w"));
    c.table = "managed".into();
    let mut sink = PostgresSink::new(c).expect("sink");
    assert_eq!(sink.send(&batch(0, 2..3)).await, SendOutcome::Delivered);

    // A wrong password is a setup problem too.
    let mut sink = PostgresSink::new(config(pg.url("writer", "nope"))).expect("sink");
    assert_retryable(&sink.send(&items).await, "28P01");
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
