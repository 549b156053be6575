//! Storage: per node, one Raft log in segment files, one redb database
//! holding every partition's state machine, and the stored events' bytes
//! in event files the database points into.
//!
//! - [`raft_log`]: the node's Raft log, group-committed segment files.
//! - [`log_dir`]: where the segments live (the log's disk seam; the event
//!   files use the same seam).
//! - [`event_files`]: stored events' bytes, one append-only file per
//!   partition.
//! - [`tables`]: the redb table layout and value codec.
//! - [`Halt`]: set once a failed write or sync stopped writes for good;
//!   the node watches it to fail-stop.
//! - [`writer`]: the single writer thread that group-commits every redb
//!   write.
//! - [`log_store`]: openraft's log storage for one partition.
//! - [`state_machine`]: openraft's state machine for one partition, over
//!   the pure apply logic in [`apply`].
//! - [`types`]: openraft's type configuration (it names [`snapshot`]'s
//!   data type, hence here).
//! - [`snapshot`]: a partition's snapshot as a stream, read from redb as
//!   it is sent and staged in redb as it is received.
//! - [`identity`]: the cluster id, node id, cluster-wide settings and
//!   rejoin state stored with the node's data.
//! - [`PartitionReader`]: what the client API reads (stored events, the
//!   head, a watch for long polls).
//!
//! The disk is a seam (DESIGN.md §4): [`Store::open`] uses files,
//! [`Store::with_backend`] any redb `StorageBackend` and [`LogDir`]s, such
//! as the simulator's in-memory disk that loses unsynced writes on a
//! crash.

pub mod apply;
mod error;
pub mod event_files;
pub mod event_runs;
mod halt;
pub mod identity;
pub mod log_dir;
pub mod log_store;
pub mod raft_log;
pub mod snapshot;
pub mod state_machine;
pub mod tables;
pub mod types;
pub mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use auditflow_protocol::StoredEvent;
use redb::{Database, ReadableDatabase, ReadableTable};
use tokio::sync::watch;

pub use error::StoreError;
pub use halt::Halt;
pub use log_dir::{FsLogDir, LogDir};
pub use log_store::LogStore;
pub use raft_log::{LogUsage, RaftLog};
pub use state_machine::StateMachine;
pub use writer::{Commit, StorageWriter, WriterMode};

use crate::storage::apply::PartitionHead;
use event_files::{EventFileMeta, EventFiles, EventRef};
use tables::{
    CURSORS, DEDUP, DLQ, EVENTS, FORMAT, FORMAT_VERSION, KEY_EVENT_FILE, KEY_HEAD, SM_META,
    SNAPSHOT_STAGING,
};

/// redb's page cache per node. redb's default is 1 GiB, which a node would
/// fill as its log grows (a delivery backlog looked like a leak); the hot
/// set (recent log entries, cursors, the dedup index's recent keys) fits
/// in far less, and the OS page cache still holds the rest.
pub const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// A node's storage (Raft log and state machine database); cheap to
/// clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    events: Arc<EventFiles>,
    writer: StorageWriter,
    log: RaftLog,
    heads: Arc<Mutex<BTreeMap<u32, Arc<watch::Sender<u64>>>>>,
    /// Per partition: where a snapshot install stands (set by its state
    /// machine, read by its log store's purge).
    installs: Arc<Mutex<BTreeMap<u32, Arc<watch::Sender<InstallState>>>>>,
    snapshot_lengths: snapshot::MeasuredLengths,
    /// Set once a failed write or sync stopped writes for good.
    halt: Halt,
}

impl Store {
    /// Opens (or creates) the database file at `path`, the Raft log in
    /// the directory beside it ([`Store::log_dir_of`]) and the event files
    /// in another ([`Store::events_dir_of`]). A file that is not a valid
    /// redb database of this layout, a damaged log segment or an event
    /// file shorter than the database says is refused with an error
    /// naming it; nothing is written to it. The one exception is a
    /// database whose creation never finished, which is created again
    /// ([`forget_unfinished_creation`]).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_with_segments(path, raft_log::SEGMENT_BYTES)
    }

    /// [`Store::open`] with Raft log segments of `segment_bytes`.
    pub fn open_with_segments(path: &Path, segment_bytes: u64) -> Result<Store, StoreError> {
        let log_path = Self::log_dir_of(path);
        let log_dir = FsLogDir::create(&log_path, segment_bytes).map_err(|e| {
            StoreError::io(
                format!("raft log: create log directory {}", log_path.display()),
                e,
            )
        })?;
        let events_path = Self::events_dir_of(path);
        let events_dir = FsLogDir::create(&events_path, segment_bytes).map_err(|e| {
            StoreError::io(
                format!(
                    "event file: create event directory {}",
                    events_path.display()
                ),
                e,
            )
        })?;
        let what = format!("database {}", path.display());
        forget_unfinished_file(path, &log_dir, &events_dir, &what)?;
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| StoreError::from_redb(what, e))?;
        Self::init(
            db,
            Box::new(log_dir),
            Box::new(events_dir),
            path.to_path_buf(),
            WriterMode::Thread,
        )
    }

    /// Where [`Store::open`] keeps the event files of the database at
    /// `path`: the same name with the extension `events`.
    pub fn events_dir_of(path: &Path) -> PathBuf {
        path.with_extension("events")
    }

    /// Where [`Store::open`] keeps the Raft log of the database at `path`:
    /// the same name with the extension `raftlog`.
    pub fn log_dir_of(path: &Path) -> PathBuf {
        path.with_extension("raftlog")
    }

    /// Opens a store over any redb backend, log directory and event
    /// directory (the simulator's disk).
    pub fn with_backend(
        backend: impl redb::StorageBackend,
        log_dir: impl LogDir,
        events_dir: impl LogDir,
        name: &str,
        mode: WriterMode,
    ) -> Result<Store, StoreError> {
        forget_unfinished_creation(&backend, &log_dir, &events_dir, &format!("database {name}"))?;
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create_with_backend(backend)
            .map_err(|e| StoreError::from_redb(format!("database {name}"), e))?;
        Self::init(
            db,
            Box::new(log_dir),
            Box::new(events_dir),
            PathBuf::from(name),
            mode,
        )
    }

    fn init(
        db: Database,
        log_dir: Box<dyn LogDir>,
        events_dir: Box<dyn LogDir>,
        path: PathBuf,
        mode: WriterMode,
    ) -> Result<Store, StoreError> {
        check_format(&db, &path)?;
        let events = Arc::new(EventFiles::open(events_dir, &event_file_metas(&db)?)?);
        let halt = Halt::default();
        let log = RaftLog::open(log_dir, mode, &applied_indexes(&db)?, halt.clone())?;
        let db = Arc::new(db);
        let writer = match mode {
            WriterMode::Thread => {
                StorageWriter::start(Arc::clone(&db), Arc::clone(&events), halt.clone()).map_err(
                    |e| StoreError::Internal {
                        what: format!("database {}", path.display()),
                        reason: format!("cannot start the writer thread: {e}"),
                    },
                )?
            }
            WriterMode::Inline => {
                StorageWriter::inline(Arc::clone(&db), Arc::clone(&events), halt.clone())
            }
            WriterMode::Task => {
                StorageWriter::task(Arc::clone(&db), Arc::clone(&events), halt.clone())
            }
        };
        Ok(Store {
            db,
            events,
            writer,
            log,
            heads: Arc::default(),
            installs: Arc::default(),
            snapshot_lengths: snapshot::MeasuredLengths::default(),
            halt,
        })
    }

    /// Whether, and why, this store stopped taking writes for good (a
    /// failed write or sync of the Raft log, the database or the event
    /// files): the node must then stop and restart (fail-stop).
    pub fn halt(&self) -> &Halt {
        &self.halt
    }

    fn install_gate(&self, partition: u32) -> Arc<watch::Sender<InstallState>> {
        per_partition(&self.installs, partition, || InstallState::Idle)
    }

    fn head_sender(&self, partition: u32) -> Arc<watch::Sender<u64>> {
        per_partition(&self.heads, partition, || {
            read_head(&self.db, partition)
                .map(|h| h.next_offset)
                .unwrap_or(0)
        })
    }

    /// The Raft log of `partition`.
    pub fn log_store(&self, partition: u32) -> LogStore {
        LogStore::new(
            partition,
            self.log.clone(),
            self.writer.clone(),
            self.install_gate(partition),
        )
    }

    /// Which partitions keep old Raft log segments alive.
    pub fn log_usage(&self) -> LogUsage {
        self.log.usage()
    }

    /// The state machine of `partition`, remembering ids of the last
    /// `dedup_window` offsets.
    pub fn state_machine(&self, partition: u32, dedup_window: u64) -> StateMachine {
        StateMachine::new(
            partition,
            Arc::clone(&self.db),
            Arc::clone(&self.events),
            self.writer.clone(),
            dedup_window,
            self.head_sender(partition),
            self.install_gate(partition),
            self.snapshot_lengths.clone(),
        )
    }

    /// The partitions whose Raft log replay found damaged in synced
    /// records and that are not repaired yet, each with the first index
    /// that may be lost ([`RaftLog::damaged`]). Such a partition must not
    /// vote, campaign or serve reads until it is repaired.
    pub fn damaged(&self) -> Vec<(u32, u64)> {
        self.log.damaged()
    }

    /// Clears `partition`'s damage once its rejoin has ended
    /// ([`RaftLog::mark_repaired`]).
    pub fn mark_repaired(&self, partition: u32) {
        self.log.mark_repaired(partition);
    }

    /// Whether `partition`'s log is damaged and not repaired yet.
    pub fn is_damaged(&self, partition: u32) -> bool {
        self.log.is_damaged(partition)
    }

    /// Read access to the applied state of `partition`.
    pub fn reader(&self, partition: u32) -> PartitionReader {
        PartitionReader {
            log: self.log.clone(),
            partition,
            db: Arc::clone(&self.db),
            events: Arc::clone(&self.events),
            head: self.head_sender(partition).subscribe(),
        }
    }
}

/// Where a partition's snapshot install stands, as its log store's purge
/// needs to know: openraft 0.9 asks to purge up to a received snapshot
/// while the state machine may still be installing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstallState {
    /// No install since the last one that completed (or since start-up).
    Idle,
    /// A snapshot is being received or installed.
    Pending,
    /// The last install failed: the state machine holds less than the
    /// snapshot, and a purge up to it must not happen.
    Failed,
}

/// The watch of `partition` in `map`, created with `init()` the first time:
/// every handle of a partition (state machine, log store, readers) shares
/// one.
fn per_partition<T>(
    map: &Mutex<BTreeMap<u32, Arc<watch::Sender<T>>>>,
    partition: u32,
    init: impl FnOnce() -> T,
) -> Arc<watch::Sender<T>> {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    Arc::clone(
        map.entry(partition)
            .or_insert_with(|| Arc::new(watch::Sender::new(init()))),
    )
}

/// Creates the tables of a new database, or checks the format marker of an
/// existing one.
fn check_format(db: &Database, path: &Path) -> Result<(), StoreError> {
    let txn = writer::begin(db, true)?;
    {
        let mut format = txn.open_table(FORMAT)?;
        let found = format.get("version")?.map(|v| v.value());
        match found {
            Some(v) if v == FORMAT_VERSION => {}
            Some(v) => {
                return Err(StoreError::Incompatible {
                    what: format!("database {}", path.display()),
                    reason: format!(
                        "layout version {v}, this build reads {FORMAT_VERSION} (versions 2 to 4 \
                         moved the Raft log and the events' bytes out of the database and \
                         changed how events are located; start from an empty data directory)"
                    ),
                })
            }
            None => {
                format.insert("version", FORMAT_VERSION)?;
            }
        }
        txn.open_table(EVENTS)?;
        txn.open_table(DEDUP)?;
        txn.open_table(SM_META)?;
        txn.open_table(CURSORS)?;
        txn.open_table(DLQ)?;
        // What a snapshot transfer cut short by a stop left behind.
        txn.open_table(SNAPSHOT_STAGING)?.retain(|_, _| false)?;
    }
    txn.commit()?;
    Ok(())
}

/// Every partition's last applied index, as the database durably holds
/// it: the Raft log's floor for telling a torn tail from lost entries.
fn applied_indexes(db: &Database) -> Result<BTreeMap<u32, u64>, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(SM_META)?;
    let mut out = BTreeMap::new();
    for row in table.iter()? {
        let (k, v) = row?;
        let (partition, name) = k.value();
        if name == tables::KEY_APPLIED {
            let applied: Option<types::LogId> = tables::decode(v.value(), tables::KEY_APPLIED)?;
            if let Some(applied) = applied {
                out.insert(partition, applied.index);
            }
        }
    }
    Ok(out)
}

/// Every partition's current event file, as the database says.
fn event_file_metas(db: &Database) -> Result<BTreeMap<u32, EventFileMeta>, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(SM_META)?;
    let mut out = BTreeMap::new();
    for row in table.iter()? {
        let (k, v) = row?;
        let (partition, name) = k.value();
        if name == KEY_EVENT_FILE {
            out.insert(partition, tables::decode(v.value(), KEY_EVENT_FILE)?);
        }
    }
    Ok(out)
}

fn read_head(db: &Database, partition: u32) -> Result<PartitionHead, StoreError> {
    let txn = db.begin_read()?;
    Ok(state_machine::read_sm_meta(&txn, partition, KEY_HEAD)?.unwrap_or_default())
}

/// Reads one partition's applied state.
#[derive(Clone)]
pub struct PartitionReader {
    /// Whether the partition's log is damaged: reads wait for the repair.
    log: RaftLog,
    partition: u32,
    db: Arc<Database>,
    events: Arc<EventFiles>,
    head: watch::Receiver<u64>,
}

impl PartitionReader {
    /// The run-time destination catalog as applied on this node's replica
    /// (`(name, config JSON)`, by name); empty except in the catalog
    /// partition.
    pub fn catalog(&self) -> Result<Vec<(String, String)>, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(
            state_machine::read_sm_meta(&txn, self.partition, tables::KEY_CATALOG)?
                .unwrap_or_default(),
        )
    }

    /// The replay window of `dest` in progress, if any: next offset and
    /// end (exclusive).
    pub fn replay(&self, dest: &str) -> Result<Option<(u64, u64)>, StoreError> {
        let txn = self.db.begin_read()?;
        let windows: crate::replicated::delivery::ReplayWindows =
            state_machine::read_sm_meta(&txn, self.partition, tables::KEY_REPLAYS)?
                .unwrap_or_default();
        Ok(windows.get(dest).copied())
    }

    /// The partition's head as applied on this node.
    pub fn head(&self) -> Result<PartitionHead, StoreError> {
        read_head(&self.db, self.partition)
    }

    /// Whether the partition's Raft log is damaged and not repaired yet:
    /// its replica may lack acknowledged events, and reads are refused.
    pub fn is_damaged(&self) -> bool {
        self.log.is_damaged(self.partition)
    }

    /// Up to `limit` stored events from `from` on, in offset order.
    /// Refused ([`StoreError::Refused`]) while the partition's log is
    /// damaged: this replica may lack events it acknowledged, and a
    /// reader must not take its gaps for the log.
    pub fn read(&self, from: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        if self.is_damaged() {
            return Err(StoreError::Refused {
                what: format!("read of partition {}", self.partition),
                reason: "this node's raft log of the partition is damaged and is being \
                         repaired from its leader; read from another node or retry later"
                    .into(),
            });
        }
        let txn = self.db.begin_read()?;
        let table = txn.open_table(EVENTS)?;
        let mut taken = 0;
        let refs: Vec<EventRef> = event_runs::refs_from(&table, self.partition, from, |_| {
            taken += 1;
            taken <= limit
        })?
        .into_iter()
        .map(|(_, at)| at)
        .collect();
        let mut out = Vec::with_capacity(refs.len());
        self.events.read_many(self.partition, &refs, |bytes| {
            out.push(tables::decode(bytes, "stored event")?);
            Ok(())
        })?;
        Ok(out)
    }

    /// The next offset destination `dest` delivers (0 if it never did).
    pub fn cursor(&self, dest: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CURSORS)?;
        Ok(table
            .get((self.partition, dest))?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    /// Up to `limit` DLQ entries of `dest` from `from` on, in offset order.
    pub fn dlq(
        &self,
        dest: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, crate::replicated::delivery::DlqEntry)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DLQ)?;
        let mut out = Vec::new();
        for row in table.range((self.partition, dest, from)..=(self.partition, dest, u64::MAX))? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row?;
            out.push((k.value().2, tables::decode(v.value(), "dlq entry")?));
        }
        Ok(out)
    }

    /// Number of DLQ entries of `dest`.
    pub fn dlq_len(&self, dest: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DLQ)?;
        let mut n = 0;
        for row in table.range((self.partition, dest, 0)..=(self.partition, dest, u64::MAX))? {
            row?;
            n += 1;
        }
        Ok(n)
    }

    /// A receiver of the next offset, changed after every apply: long
    /// polls wait on it instead of polling the database.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.head.clone()
    }
}

#[cfg(test)]
mod tests;

/// Length of redb's magic number, the first bytes of its file.
const REDB_MAGIC_BYTES: usize = 9;

/// Empties a database file whose creation never finished, so that redb
/// creates it again instead of refusing it for ever.
///
/// redb creates a database in two flushed steps: the header without its
/// magic number, then with it ("only after the data structure is
/// initialized and written to disk, to ensure that it's crash safe"). A
/// process that fails between the two (an fsync error, a crash) leaves a
/// file whose magic bytes are zero, which redb then refuses as "Not a
/// redb database: magic number mismatch" at every later start (seed 6115
/// of the 10,000-seed sweep: a node that lost its disk failed the first
/// sync of its new database and never came up again). Such a file never
/// held a committed transaction, and a store writes its Raft log and
/// event files only after the database opened, so: all-zero magic bytes
/// with no log segment and no event file is an unfinished creation, and
/// emptied. Anything else that is not a database (another file, a
/// damaged magic number, zeroes beside a log) is still refused.
fn forget_unfinished_creation(
    backend: &impl redb::StorageBackend,
    log_dir: &impl LogDir,
    events_dir: &impl LogDir,
    what: &str,
) -> Result<(), StoreError> {
    let io = |e: std::io::Error| StoreError::io(what.to_string(), e);
    let len = backend.len().map_err(io)?;
    let mut magic = [0u8; REDB_MAGIC_BYTES];
    if len >= REDB_MAGIC_BYTES as u64 {
        backend.read(0, &mut magic).map_err(io)?;
    }
    if unfinished_creation(len, &magic, log_dir, events_dir).map_err(io)? {
        tracing::warn!(
            "{what}: its creation never finished (no magic number, no log): creating it again"
        );
        backend.set_len(0).map_err(io)?;
        backend.sync_data().map_err(io)?;
    }
    Ok(())
}

/// [`forget_unfinished_creation`] for a database file at `path`.
fn forget_unfinished_file(
    path: &Path,
    log_dir: &impl LogDir,
    events_dir: &impl LogDir,
    what: &str,
) -> Result<(), StoreError> {
    use std::io::Read;
    let io = |e: std::io::Error| StoreError::io(what.to_string(), e);
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    let len = file.metadata().map_err(io)?.len();
    let mut magic = [0u8; REDB_MAGIC_BYTES];
    if len >= REDB_MAGIC_BYTES as u64 {
        file.read_exact(&mut magic).map_err(io)?;
    }
    if unfinished_creation(len, &magic, log_dir, events_dir).map_err(io)? {
        tracing::warn!(
            "{what}: its creation never finished (no magic number, no log): creating it again"
        );
        file.set_len(0).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    Ok(())
}

/// Whether a database file of `len` bytes starting with `magic` is an
/// unfinished creation: not empty, magic bytes all zero (or too short to
/// hold them), and no log segment or event file beside it.
fn unfinished_creation(
    len: u64,
    magic: &[u8; REDB_MAGIC_BYTES],
    log_dir: &impl LogDir,
    events_dir: &impl LogDir,
) -> std::io::Result<bool> {
    if len == 0 || magic.iter().any(|b| *b != 0) {
        return Ok(false);
    }
    Ok(log_dir.list()?.is_empty() && events_dir.list()?.is_empty())
}
