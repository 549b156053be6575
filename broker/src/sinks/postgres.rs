//! PostgreSQL: one row per event in a table, written idempotently.
//!
//! Table layout (created on first connect unless `create_table = false`):
//!
//! ```sql
//! CREATE TABLE audit_events (
//!     cluster     text NOT NULL,        -- the cluster's id
//!     partition   integer NOT NULL,
//!     "offset"    bigint NOT NULL,
//!     event_id    text NOT NULL,
//!     tenant      text NOT NULL,
//!     received_at timestamptz NOT NULL, -- microseconds: PostgreSQL's precision
//!     hash        text NOT NULL,        -- chain hash, lowercase hex
//!     event       jsonb NOT NULL,       -- the masked event (`body.event`)
//!     PRIMARY KEY (cluster, partition, "offset") -- the idempotency key (G3)
//! );
//! ```
//!
//! The sink's role needs `INSERT` and `SELECT (cluster, partition,
//! "offset")` on the table (`ON CONFLICT` reads the key), and `CREATE` on
//! the schema if it is to create the table.
//!
//! A batch is one transaction of multi-row `INSERT .. ON CONFLICT (cluster,
//! partition, "offset") DO NOTHING` statements, so a re-sent or overlapping
//! batch (after a retry or a leader change) adds no duplicate rows:
//! delivery is effectively-once. The key is the event's place in the log,
//! never its bare id: two tenants may choose the same id, and an id may
//! come back after the dedup window, and neither may be dropped.
//!
//! Before the first write the sink reads the table's unique indexes: the
//! key must be one of them, and no unique index may leave out one of its
//! columns (the pre-issue-27 layout had `event_id text PRIMARY KEY`, which
//! would drop or refuse other tenants' events). Otherwise every send fails
//! retryably, naming the indexes and the statements that migrate the
//! table; the sink never changes an existing table itself.
//!
//! Failures are classified by SQLSTATE (always quoted in the message):
//! connection problems, timeouts, `08` connection exceptions, `40`
//! serialization failures and deadlocks, `53` insufficient resources and
//! `57` operator interventions are transient. `42` (undefined table,
//! permission denied) and `28` / `3D000` (authentication, missing database)
//! are configuration problems an operator fixes with a grant or a table, so
//! they are *retryable*: parking every event in the DLQ for them would be
//! wrong. `22` data exceptions, `23` integrity violations (other than the
//! key conflict, which is absorbed) and `54` limits are about the data:
//! the batch is retried one row at a time to find the bad rows, which alone
//! come back as permanent failures ([`SendOutcome::PerItem`]).
//!
//! The constructor never connects; the first send does, and a send after a
//! lost connection reconnects, so a database that is down never stops a
//! node. TLS is not supported yet: a URL asking for `sslmode=require` is
//! refused at start-up instead of failing every send.

use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};
use tracing::debug;

use super::{excerpt, Delivery, SendOutcome, Sink, SinkConfigError, SinkFailure};

/// Settings of a PostgreSQL destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Connection URL, `postgres://user:password@host:port/database` (libpq
    /// `key=value` strings work too). Without TLS for now: `sslmode=require`
    /// is refused.
    pub url: String,
    /// Table to write, `name` or `schema.name`. Letters, digits and `_`
    /// only; the name is quoted in SQL, so it is case-sensitive and may be a
    /// reserved word.
    #[serde(default = "default_table")]
    pub table: String,
    /// Create the table on first connect if it is missing. Turn off when an
    /// operator manages the schema and the sink's role may only INSERT.
    #[serde(default = "default_create_table")]
    pub create_table: bool,
    /// Limit on opening a connection (TCP, authentication, setup), so a
    /// black-holed host fails the send instead of hanging it.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Server-side `statement_timeout` of the sink's sessions; the client
    /// also gives up on a statement a little after it, for a server that has
    /// gone silent.
    #[serde(default = "default_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
}

fn default_table() -> String {
    "audit_events".into()
}

fn default_create_table() -> bool {
    true
}

fn default_connect_timeout_ms() -> u64 {
    10_000
}

fn default_statement_timeout_ms() -> u64 {
    30_000
}

/// Columns written per row; also the bind parameters per row.
const COLUMNS: usize = 8;

/// The idempotency key's columns, as the catalog names them.
const KEY_COLUMNS: [&str; 3] = ["cluster", "partition", "offset"];

/// PostgreSQL's wire protocol counts bind parameters in an `i16`-sized
/// field read as unsigned: at most 65535 per statement. Larger batches are
/// split into several statements of the same transaction.
const PARAMS_PER_STATEMENT_MAX: usize = 65_535;

/// Rows per `INSERT` statement (8191).
pub const ROWS_PER_STATEMENT_MAX: usize = PARAMS_PER_STATEMENT_MAX / COLUMNS;
const _: () = assert!(ROWS_PER_STATEMENT_MAX * COLUMNS <= PARAMS_PER_STATEMENT_MAX);

/// How long after `statement_timeout` the client gives up itself. The
/// server's own timeout normally fires first and answers cleanly (57014);
/// this only catches a server or network that stopped answering.
const CLIENT_TIMEOUT_SLACK_MS: u64 = 2_000;

/// Longest identifier PostgreSQL keeps (NAMEDATALEN - 1); longer names are
/// silently truncated by the server, so refuse them instead.
const IDENTIFIER_BYTES_MAX: usize = 63;

/// The PostgreSQL sink.
pub struct PostgresSink {
    config: Config,
    /// The cluster's id, the first column of every row's key.
    cluster: String,
    /// Parsed connection settings, with our timeouts applied.
    pg: tokio_postgres::Config,
    /// The table as it appears in SQL (quoted parts).
    table_sql: String,
    /// `host:port/database`, for messages (never the password).
    target: String,
    /// The open connection, if any: opened by the first send, dropped after
    /// a connection-level error so the next send reconnects.
    conn: Option<Conn>,
    /// Whether this sink has made sure the table exists (create_table).
    table_ready: bool,
}

/// A client and the task driving its socket.
struct Conn {
    client: Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Closing the socket makes the server roll back whatever was open.
        self.task.abort();
    }
}

/// One row, converted and checked before it goes out.
struct Row {
    cluster: String,
    event_id: String,
    partition: i32,
    offset: i64,
    tenant: String,
    received_at: time::OffsetDateTime,
    hash: String,
    event: serde_json::Value,
}

impl Row {
    fn new(cluster: &str, d: &Delivery) -> Result<Row, SinkFailure> {
        let partition = i32::try_from(d.partition).map_err(|_| {
            SinkFailure::permanent(format!("partition {} does not fit `integer`", d.partition))
        })?;
        let offset = i64::try_from(d.offset).map_err(|_| {
            SinkFailure::permanent(format!("offset {} does not fit `bigint`", d.offset))
        })?;
        let received_at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
            d.received_at.0,
        ))
        .map_err(|e| {
            SinkFailure::permanent(format!(
                "received_at {} is not a timestamp: {e}",
                d.received_at.0
            ))
        })?;
        // The other columns already hold partition, offset, time and hash:
        // the jsonb column keeps the (masked) event itself.
        let mut body = d.body.to_value();
        let event = if body.get("event").is_some_and(serde_json::Value::is_object) {
            body["event"].take()
        } else {
            body
        };
        Ok(Row {
            cluster: cluster.to_string(),
            event_id: d.event_id.clone(),
            partition,
            offset,
            tenant: d.tenant.clone(),
            received_at,
            hash: d.hash.to_hex(),
            event,
        })
    }

    fn params(&self) -> [&(dyn ToSql + Sync); COLUMNS] {
        [
            &self.cluster,
            &self.partition,
            &self.offset,
            &self.event_id,
            &self.tenant,
            &self.received_at,
            &self.hash,
            &self.event,
        ]
    }
}

/// What a database error means for the batch.
#[derive(Debug, PartialEq, Eq)]
enum Class {
    /// The connection is gone or unusable: retry on a new one.
    Connection,
    /// Transient on a working connection (serialization failure, resources).
    Transient,
    /// An operator must fix the setup (grant, table, password, database);
    /// retried, because the events themselves are fine.
    Setup,
    /// The rows are refused; retrying the same rows cannot succeed.
    Data,
}

/// Classifies a SQLSTATE (five characters).
fn classify_sqlstate(code: &str) -> Class {
    match code.get(..2).unwrap_or("") {
        "08" => Class::Connection,
        "57" if code.starts_with("57P") => Class::Connection, // shutdowns
        "22" | "23" | "54" => Class::Data,
        "42" | "28" => Class::Setup,
        "3D" | "3F" => Class::Setup, // no such database / schema
        // 40 (serialization, deadlock), 53 (resources), 57014 (statement
        // timeout), 25006 (read-only after a failover), XX, ...: assume the
        // server's trouble is passing rather than park good events.
        _ => Class::Transient,
    }
}

/// What an operator should do about a setup problem.
fn setup_hint(code: &str) -> &'static str {
    match code {
        "42P01" => "the table does not exist: create it, or set create_table = true",
        "42501" => {
            "permission denied: GRANT INSERT, SELECT (cluster, partition, \"offset\") ON the table (ON CONFLICT reads the key) to the sink's role, and CREATE on the schema if it should create the table"
        }
        "3F000" => "the schema does not exist: create it",
        "3D000" => "the database does not exist: create it or fix the url",
        c if c.starts_with("28") => "authentication failed: check user and password in the url",
        _ => "the table does not match what the sink writes: check its columns and types",
    }
}

/// A failed database call, before classification.
enum PgError {
    /// From the driver (connection or server).
    Db(tokio_postgres::Error),
    /// The client-side limit passed.
    TimedOut(&'static str),
    /// The table's keys are not the sink's (see [`key_problem`]).
    Schema(String),
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgError::Db(e)
    }
}

/// Runs `fut` under a client-side time limit.
async fn timed<T>(
    limit: Duration,
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, PgError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(PgError::Db),
        Err(_) => Err(PgError::TimedOut(what)),
    }
}

/// Checks `schema.name` / `name` and returns it quoted for SQL.
fn table_sql(table: &str) -> Result<String, String> {
    let parts: Vec<&str> = table.split('.').collect();
    if parts.len() > 2 {
        return Err(format!(
            "table {table:?}: at most one `.` (schema.name) is allowed"
        ));
    }
    let mut quoted = Vec::with_capacity(parts.len());
    for part in parts {
        let mut chars = part.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "table {table:?}: each part must start with a letter or `_` and hold only ASCII letters, digits and `_`"
            ));
        }
        if part.len() > IDENTIFIER_BYTES_MAX {
            return Err(format!(
                "table {table:?}: {part:?} is longer than {IDENTIFIER_BYTES_MAX} bytes"
            ));
        }
        // Safe to quote as is: the part holds no `"`.
        quoted.push(format!("\"{part}\""));
    }
    Ok(quoted.join("."))
}

/// The `INSERT` for `rows` rows.
fn insert_sql(table_sql: &str, rows: usize) -> String {
    let mut sql = format!(
        "INSERT INTO {table_sql} (cluster, partition, \"offset\", event_id, tenant, received_at, hash, event) VALUES "
    );
    for r in 0..rows {
        let p = r * COLUMNS;
        if r > 0 {
            sql.push(',');
        }
        // Explicit casts fix the parameter types whatever the table's
        // columns are, so a hand-made table with e.g. `bigint` partition
        // still takes an assignment cast instead of a client type error.
        sql.push_str(&format!(
            "(${}::text,${}::int4,${}::int8,${}::text,${}::text,${}::timestamptz,${}::text,${}::jsonb)",
            p + 1,
            p + 2,
            p + 3,
            p + 4,
            p + 5,
            p + 6,
            p + 7,
            p + 8
        ));
    }
    sql.push_str(" ON CONFLICT (cluster, partition, \"offset\") DO NOTHING");
    sql
}

fn create_sql(table_sql: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table_sql} (\
         cluster text NOT NULL, \
         partition integer NOT NULL, \
         \"offset\" bigint NOT NULL, \
         event_id text NOT NULL, \
         tenant text NOT NULL, \
         received_at timestamptz NOT NULL, \
         hash text NOT NULL, \
         event jsonb NOT NULL, \
         PRIMARY KEY (cluster, partition, \"offset\"))"
    )
}

/// The table's unique indexes: name and column names (expression columns
/// left out), for [`key_problem`].
const UNIQUE_INDEXES_SQL: &str = "SELECT i.indexrelid::regclass::text, \
     coalesce(array_agg(a.attname::text ORDER BY k.ord) FILTER (WHERE a.attname IS NOT NULL), '{}') \
     FROM pg_index i \
     CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
     LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
     WHERE i.indrelid = to_regclass($1) AND i.indisunique \
     GROUP BY i.indexrelid ORDER BY 1";

/// What is wrong with a table's unique indexes (pure), if anything: the
/// key (cluster, partition, offset) must be one of them (`ON CONFLICT`
/// needs it), and every other must contain its columns, or it would drop
/// or refuse distinct events (a unique `event_id`: another tenant's event
/// with the same id). The answer says how to migrate.
fn key_problem(table: &str, cluster: &str, unique: &[(String, Vec<String>)]) -> Option<String> {
    let is_key = |cols: &[String]| {
        cols.len() == KEY_COLUMNS.len() && KEY_COLUMNS.iter().all(|k| cols.iter().any(|c| c == k))
    };
    let covers_key = |cols: &[String]| KEY_COLUMNS.iter().all(|k| cols.iter().any(|c| c == k));
    let has_key = unique.iter().any(|(_, cols)| is_key(cols));
    let narrower: Vec<&(String, Vec<String>)> = unique
        .iter()
        .filter(|(_, cols)| !covers_key(cols))
        .collect();
    if has_key && narrower.is_empty() {
        return None;
    }
    let listed: Vec<String> = unique
        .iter()
        .map(|(name, cols)| format!("{name} ({})", cols.join(", ")))
        .collect();
    let mut fix = vec![format!(
        "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS cluster text NOT NULL DEFAULT '{}'",
        cluster.replace('\'', "''")
    )];
    for (name, _) in &narrower {
        fix.push(format!(
            "ALTER TABLE {table} DROP CONSTRAINT {name} (DROP INDEX {name} if it is an index only)"
        ));
    }
    if !has_key {
        fix.push(format!(
            "ALTER TABLE {table} ADD PRIMARY KEY (cluster, partition, \"offset\")"
        ));
    }
    Some(format!(
        "table {table} must be keyed on (cluster, partition, \"offset\") and have no unique key \
         without those columns, but its unique keys are [{}]: events of different tenants may \
         share an id, so an event-id key drops or refuses events. Migrate with: {}",
        listed.join("; "),
        fix.join("; ")
    ))
}

/// Advisory lock key for creating `table`: every sink of every node
/// creating the same table takes the same lock, because concurrent
/// `CREATE TABLE IF NOT EXISTS` can still collide on the catalog (23505).
fn create_lock_key(table_sql: &str) -> i64 {
    let digest = Sha256::digest(format!("auditflow create {table_sql}").as_bytes());
    let mut eight = [0u8; 8];
    eight.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(eight)
}

impl PostgresSink {
    /// Checks the settings. Does not connect: the first send does.
    pub fn new(config: Config, cluster: String) -> Result<PostgresSink, SinkConfigError> {
        let bad = |reason: String| SinkConfigError {
            kind: "postgres",
            reason,
        };
        if cluster.is_empty() {
            return Err(bad(
                "the cluster id (first column of the key) is empty".into()
            ));
        }
        let table_sql = table_sql(&config.table).map_err(bad)?;
        let mut pg: tokio_postgres::Config =
            config.url.parse().map_err(|e| bad(format!("url: {e}")))?;
        if pg.get_hosts().is_empty() {
            return Err(bad("url: no host".into()));
        }
        if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            return Err(bad(
                "url: sslmode=require, but this sink does not support TLS yet".into(),
            ));
        }
        if config.connect_timeout_ms == 0 || config.statement_timeout_ms == 0 {
            return Err(bad(
                "connect_timeout_ms and statement_timeout_ms must be positive".into(),
            ));
        }
        pg.connect_timeout(Duration::from_millis(config.connect_timeout_ms));
        // Notice a peer that vanished without a FIN within minutes, not the
        // kernel's default two hours.
        pg.keepalives_idle(Duration::from_secs(60));
        let options = format!(
            "{} -c statement_timeout={}",
            pg.get_options().unwrap_or(""),
            config.statement_timeout_ms
        );
        pg.options(options.trim_start());
        if pg.get_application_name().is_none() {
            pg.application_name("auditflow");
        }
        let target = target(&pg);
        Ok(PostgresSink {
            config,
            cluster,
            pg,
            table_sql,
            target,
            conn: None,
            table_ready: false,
        })
    }

    fn statement_limit(&self) -> Duration {
        Duration::from_millis(
            self.config
                .statement_timeout_ms
                .saturating_add(CLIENT_TIMEOUT_SLACK_MS),
        )
    }

    /// Turns an error into a failure; forgets the connection when it is the
    /// connection's fault (and the table check after a missing table).
    fn failure(&mut self, e: PgError) -> (Class, SinkFailure) {
        let (class, failure) = match e {
            PgError::Schema(problem) => (
                Class::Setup,
                SinkFailure::retryable(format!("postgres {}: {problem}", self.target)),
            ),
            PgError::TimedOut(what) => (
                Class::Connection,
                SinkFailure::retryable(format!("postgres {}: {what} timed out", self.target)),
            ),
            PgError::Db(e) => match e.as_db_error() {
                None => (
                    Class::Connection,
                    SinkFailure::retryable(format!("postgres {}: {e}", self.target)),
                ),
                Some(db) => {
                    let code = db.code().code();
                    let class = classify_sqlstate(code);
                    let mut message = format!(
                        "postgres {}: SQLSTATE {code}: {}",
                        self.target,
                        db.message()
                    );
                    if class == Class::Setup {
                        message.push_str(&format!(
                            " ({}; table {})",
                            setup_hint(code),
                            self.config.table
                        ));
                    }
                    let detail: Vec<&str> =
                        [db.detail(), db.hint()].into_iter().flatten().collect();
                    let mut failure = if class == Class::Data {
                        SinkFailure::permanent(message)
                    } else {
                        SinkFailure::retryable(message)
                    };
                    if !detail.is_empty() {
                        failure.response_excerpt = Some(excerpt(&detail.join("; ")));
                    }
                    if code == "42P01" || code == "3F000" {
                        // Someone dropped it: check (and create) again.
                        self.table_ready = false;
                    }
                    (class, failure)
                }
            },
        };
        if class == Class::Connection {
            self.conn = None;
        }
        (class, failure)
    }

    /// The open connection, opening one (and the table) if needed.
    async fn client(&mut self) -> Result<&mut Client, PgError> {
        if self.conn.as_ref().is_some_and(|c| c.client.is_closed()) {
            // The server closed it while idle (restart, idle timeout).
            self.conn = None;
        }
        if self.conn.is_none() {
            let limit = Duration::from_millis(self.config.connect_timeout_ms);
            let (client, connection) = timed(limit, "connect", self.pg.connect(NoTls)).await?;
            let target = self.target.clone();
            let task = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    debug!(target = %target, error = %e, "postgres connection ended");
                }
            });
            self.conn = Some(Conn { client, task });
        }
        if !self.table_ready {
            let limit = self.statement_limit();
            let lock_key = create_lock_key(&self.table_sql);
            let create = create_sql(&self.table_sql);
            let table_sql = self.table_sql.clone();
            let conn = self.conn.as_mut().ok_or(PgError::TimedOut("connect"))?;
            // Look first: CREATE TABLE IF NOT EXISTS still needs the CREATE
            // privilege on the schema, which a role that may only INSERT
            // into an existing table lacks.
            let row = timed(
                limit,
                "table check",
                conn.client
                    .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table_sql]),
            )
            .await?;
            let exists: bool = row.try_get(0)?;
            if !exists && self.config.create_table {
                let tx = timed(limit, "begin", conn.client.transaction()).await?;
                timed(
                    limit,
                    "lock",
                    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key]),
                )
                .await?;
                timed(limit, "create table", tx.batch_execute(&create)).await?;
                timed(limit, "commit", tx.commit()).await?;
            }
            if exists || self.config.create_table {
                // A table made before issue 27 is keyed on the bare event
                // id: refuse to write into it rather than keep dropping.
                let rows = timed(
                    limit,
                    "key check",
                    conn.client.query(UNIQUE_INDEXES_SQL, &[&table_sql]),
                )
                .await?;
                let mut unique = Vec::with_capacity(rows.len());
                for row in &rows {
                    unique.push((
                        row.try_get::<_, String>(0)?,
                        row.try_get::<_, Vec<String>>(1)?,
                    ));
                }
                if let Some(problem) = key_problem(&self.table_sql, &self.cluster, &unique) {
                    return Err(PgError::Schema(problem));
                }
                self.table_ready = true;
            }
            // Else the table is missing and not ours to create: the insert
            // reports 42P01, and the next send looks again.
        }
        match self.conn.as_mut() {
            Some(c) => Ok(&mut c.client),
            // Unreachable: set above; answered as a connection problem.
            None => Err(PgError::TimedOut("connect")),
        }
    }

    /// Writes all rows in one transaction.
    async fn insert_all(&mut self, rows: &[Row]) -> Result<(), PgError> {
        let limit = self.statement_limit();
        let table_sql = self.table_sql.clone();
        let client = self.client().await?;
        let tx = timed(limit, "begin", client.transaction()).await?;
        for chunk in rows.chunks(ROWS_PER_STATEMENT_MAX) {
            // Not prepared and cached: one extra round trip per statement is
            // small next to the commit, and batch sizes vary.
            let sql = insert_sql(&table_sql, chunk.len());
            let params: Vec<&(dyn ToSql + Sync)> = chunk.iter().flat_map(Row::params).collect();
            timed(limit, "insert", tx.execute(sql.as_str(), &params)).await?;
        }
        timed(limit, "commit", tx.commit()).await?;
        Ok(())
    }

    /// Writes one row on its own (autocommit).
    async fn insert_one(&mut self, row: &Row) -> Result<(), PgError> {
        let limit = self.statement_limit();
        let sql = insert_sql(&self.table_sql, 1);
        let client = self.client().await?;
        timed(limit, "insert", client.execute(sql.as_str(), &row.params())).await?;
        Ok(())
    }

    /// After a data error: each row alone, in order, to find the bad ones.
    /// Stops at the first non-data failure (order: later rows wait behind
    /// it) and reports it for the rest.
    async fn one_by_one(&mut self, rows: Vec<Result<Row, SinkFailure>>) -> SendOutcome {
        let mut results: Vec<Result<(), SinkFailure>> = Vec::with_capacity(rows.len());
        let total = rows.len();
        for row in rows {
            let result = match row {
                Err(f) => Err(f),
                Ok(row) => match self.insert_one(&row).await {
                    Ok(()) => Ok(()),
                    Err(e) => Err(self.failure(e).1),
                },
            };
            let stop = matches!(&result, Err(f) if f.is_retryable());
            results.push(result);
            if stop {
                break;
            }
        }
        if let Some(Err(f)) = results.last().cloned() {
            while results.len() < total {
                results.push(Err(f.clone()));
            }
        }
        if results.iter().all(Result::is_ok) {
            SendOutcome::Delivered
        } else {
            SendOutcome::PerItem(results)
        }
    }
}

/// `host:port/database` of the first host, for messages.
fn target(pg: &tokio_postgres::Config) -> String {
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => String::new(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let db = pg.get_dbname().or(pg.get_user()).unwrap_or("");
    format!("{host}:{port}/{db}")
}

impl Sink for PostgresSink {
    fn send<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, SendOutcome> {
        Box::pin(async move {
            if batch.is_empty() {
                return SendOutcome::Delivered;
            }
            let rows: Vec<Result<Row, SinkFailure>> =
                batch.iter().map(|d| Row::new(&self.cluster, d)).collect();
            if rows.iter().any(Result::is_err) {
                if batch.len() == 1 {
                    if let Some(Err(f)) = rows.into_iter().next() {
                        return SendOutcome::Failed(f);
                    }
                    return SendOutcome::Delivered;
                }
                return self.one_by_one(rows).await;
            }
            let rows: Vec<Row> = rows.into_iter().flatten().collect();
            match self.insert_all(&rows).await {
                Ok(()) => SendOutcome::Delivered,
                Err(e) => {
                    let (class, failure) = self.failure(e);
                    if class == Class::Data && rows.len() > 1 {
                        debug!(target = %self.target, error = %failure.message,
                            "data error in a batch: retrying rows one by one");
                        self.one_by_one(rows.into_iter().map(Ok).collect()).await
                    } else {
                        SendOutcome::Failed(failure)
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> Config {
        Config {
            url: url.into(),
            table: default_table(),
            create_table: true,
            connect_timeout_ms: 1_000,
            statement_timeout_ms: 1_000,
        }
    }

    #[test]
    fn defaults_and_unknown_fields() {
        let c: Config = toml::from_str("url = \"postgres://u:p@db:5432/audit\"").unwrap();
        assert_eq!(
            c,
            Config {
                url: "postgres://u:p@db:5432/audit".into(),
                table: "audit_events".into(),
                create_table: true,
                connect_timeout_ms: 10_000,
                statement_timeout_ms: 30_000,
            }
        );
        assert!(toml::from_str::<Config>("url = \"x\"\ntabel = \"t\"").is_err());
    }

    #[test]
    fn table_names_are_checked_and_quoted() {
        assert_eq!(table_sql("audit_events").unwrap(), "\"audit_events\"");
        assert_eq!(
            table_sql("audit.Events_2").unwrap(),
            "\"audit\".\"Events_2\""
        );
        assert_eq!(table_sql("_t").unwrap(), "\"_t\"");
        for bad in [
            "",
            "a.b.c",
            "1abc",
            "a b",
            "a;drop",
            "a\"b",
            ".a",
            "a.",
            "é",
            &"x".repeat(64),
        ] {
            assert!(table_sql(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn constructor_checks_but_does_not_connect() {
        // Nothing listens on port 1: building must still succeed.
        let new = |c| PostgresSink::new(c, "c1".into());
        assert!(new(config("postgres://u:p@127.0.0.1:1/db")).is_ok());
        assert!(PostgresSink::new(config("postgres://u:p@127.0.0.1:1/db"), String::new()).is_err());
        assert!(new(config("not a url at all ://")).is_err());
        assert!(new(config("postgres://u:p@h/db?sslmode=require")).is_err());
        let mut c = config("postgres://u:p@h/db");
        c.table = "x; DROP TABLE y".into();
        assert!(new(c).is_err());
        let sink = new(config("postgres://u:secret@db.example:6543/audit")).unwrap();
        assert_eq!(sink.target, "db.example:6543/audit");
    }

    #[test]
    fn insert_sql_numbers_parameters() {
        let sql = insert_sql("\"t\"", 2);
        assert!(
            sql.starts_with("INSERT INTO \"t\" (cluster, partition, \"offset\", event_id, tenant,")
        );
        assert!(sql.contains("($1::text,$2::int4,$3::int8,$4::text,"));
        assert!(sql.contains("($9::text,$10::int4,"));
        assert!(sql.contains("$16::jsonb)"));
        assert!(!sql.contains("$17"));
        assert!(sql.ends_with("ON CONFLICT (cluster, partition, \"offset\") DO NOTHING"));
        assert!(create_sql("\"t\"").ends_with("PRIMARY KEY (cluster, partition, \"offset\"))"));
    }

    /// A table's unique indexes against the key (cluster, partition,
    /// offset): which tables the sink writes into, and what it tells an
    /// operator to run otherwise.
    #[test]
    fn table_keys_are_checked() {
        let idx = |name: &str, cols: &[&str]| {
            (
                name.to_string(),
                cols.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            )
        };
        let key = idx("t_pkey", &["cluster", "partition", "offset"]);
        let ok: [&[(String, Vec<String>)]; 3] = [
            std::slice::from_ref(&key),
            &[idx("k", &["offset", "cluster", "partition"])],
            // A wider unique index refuses nothing the key accepts.
            &[
                key.clone(),
                idx("w", &["cluster", "partition", "offset", "tenant"]),
            ],
        ];
        for unique in ok {
            assert_eq!(key_problem("t", "c1", unique), None, "{unique:?}");
        }
        /// A table's unique indexes, and what the answer must name.
        type Case<'a> = (&'a [(String, Vec<String>)], &'a [&'a str]);
        let bad: [Case; 4] = [
            // The layout before issue 27.
            (
                &[idx("t_pkey", &["event_id"])],
                &[
                    "t_pkey (event_id)",
                    "ADD COLUMN IF NOT EXISTS cluster text NOT NULL DEFAULT 'c1'",
                    "DROP CONSTRAINT t_pkey",
                    "ADD PRIMARY KEY (cluster, partition, \"offset\")",
                ],
            ),
            // The key added, the old one left: still drops events.
            (
                &[key.clone(), idx("t_event_id_key", &["event_id"])],
                &["DROP CONSTRAINT t_event_id_key"],
            ),
            // (tenant, event_id) alone: ON CONFLICT has nothing to use.
            (&[idx("te", &["tenant", "event_id"])], &["ADD PRIMARY KEY"]),
            (&[], &["unique keys are []", "ADD PRIMARY KEY"]),
        ];
        for (unique, needles) in bad {
            let problem = key_problem("t", "c1", unique).expect("a problem");
            for needle in needles {
                assert!(problem.contains(needle), "{needle:?} in {problem}");
            }
        }
        assert!(key_problem("t", "o'k", &[])
            .unwrap()
            .contains("DEFAULT 'o''k'"));
    }

    #[test]
    fn sqlstates_are_classified() {
        for code in ["08006", "08001", "57P01", "57P03"] {
            assert_eq!(classify_sqlstate(code), Class::Connection, "{code}");
        }
        for code in [
            "40001", "40P01", "53100", "53300", "57014", "25006", "XX000",
        ] {
            assert_eq!(classify_sqlstate(code), Class::Transient, "{code}");
        }
        for code in ["42P01", "42501", "42703", "28P01", "3D000", "3F000"] {
            assert_eq!(classify_sqlstate(code), Class::Setup, "{code}");
        }
        for code in ["22P05", "22021", "23514", "23502", "54000"] {
            assert_eq!(classify_sqlstate(code), Class::Data, "{code}");
        }
    }
}
