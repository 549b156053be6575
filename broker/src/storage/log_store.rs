//! The Raft log of one partition (openraft `RaftLogStorage`, storage v2).
//!
//! `append` must make entries readable when it returns but may report them
//! durable later. Entries are kept in an in-memory cache from the moment
//! they are queued: until their transaction committed (`pending`), so the
//! leader can replicate them while its own fsync is still running (the
//! leader's disk write and the followers' overlap instead of adding up),
//! and for a while after (`flushed`, bounded), because replication and the
//! state machine read back what was just appended, and decoding it from
//! redb again was a visible share of a node's CPU.
//! Vote, truncation and purge wait for their commit before returning.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, ErrorSubject, ErrorVerb, OptionalSend, RaftLogId};
use redb::{Database, ReadableDatabase};

use super::tables::{self, KEY_COMMITTED, KEY_PURGED, KEY_VOTE, RAFT_LOG, RAFT_META};
use super::writer::StorageWriter;
use super::StoreError;
use crate::partition::types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// The Raft log of one partition; clones share state.
#[derive(Clone)]
pub struct LogStore {
    partition: u32,
    db: Arc<Database>,
    writer: StorageWriter,
    /// Recent entries, by index.
    cache: Arc<Mutex<EntryCache>>,
}

/// Most committed entries kept in memory per partition.
const CACHE_MAX_ENTRIES: usize = 1024;
/// Most bytes (encoded) of committed entries kept in memory per partition.
const CACHE_MAX_BYTES: usize = 8 * 1024 * 1024;

/// Recently appended entries of one partition.
#[derive(Default)]
struct EntryCache {
    /// Queued but not yet committed; newer than anything stored at the
    /// same index (a truncation removes both), so they win on reads.
    pending: BTreeMap<u64, Entry>,
    /// Committed, with their encoded size; the oldest leave first once
    /// [`CACHE_MAX_ENTRIES`] or [`CACHE_MAX_BYTES`] is exceeded.
    flushed: BTreeMap<u64, (Entry, usize)>,
    flushed_bytes: usize,
}

impl EntryCache {
    /// Moves the entries of a committed append from `pending` to `flushed`,
    /// unless a truncation and a newer append replaced them meanwhile.
    fn committed(&mut self, ids: &[(LogId, usize)]) {
        for (id, size) in ids {
            if self.pending.get(&id.index).map(|e| e.get_log_id()) == Some(id) {
                if let Some(e) = self.pending.remove(&id.index) {
                    if let Some((_, old)) = self.flushed.insert(id.index, (e, *size)) {
                        self.flushed_bytes -= old;
                    }
                    self.flushed_bytes += size;
                }
            }
        }
        while self.flushed.len() > CACHE_MAX_ENTRIES || self.flushed_bytes > CACHE_MAX_BYTES {
            match self.flushed.pop_first() {
                Some((_, (_, size))) => self.flushed_bytes -= size,
                None => break,
            }
        }
    }

    /// Keeps only the entries whose index satisfies `keep`.
    fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        self.pending.retain(|i, _| keep(*i));
        let mut freed = 0;
        self.flushed.retain(|i, (_, size)| {
            let k = keep(*i);
            if !k {
                freed += *size;
            }
            k
        });
        self.flushed_bytes -= freed;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn raft_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: StoreError) -> StorageError {
    StorageError::IO {
        source: openraft::StorageIOError::new(subject, verb, AnyError::new(&e)),
    }
}

impl LogStore {
    pub(crate) fn new(partition: u32, db: Arc<Database>, writer: StorageWriter) -> LogStore {
        LogStore {
            partition,
            db,
            writer,
            cache: Arc::default(),
        }
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RAFT_META)?;
        match table.get((self.partition, key))? {
            Some(v) => Ok(Some(tables::decode(v.value(), key)?)),
            None => Ok(None),
        }
    }

    async fn write_meta<T: serde::Serialize>(
        &self,
        key: &'static str,
        value: &T,
        durable: bool,
    ) -> Result<(), StoreError> {
        let bytes = tables::encode(value, key)?;
        let p = self.partition;
        self.writer
            .write(durable, move |txn| {
                let mut table = txn.open_table(RAFT_META)?;
                table.insert((p, key), bytes.as_slice())?;
                Ok(())
            })
            .await
    }

    fn read_range(&self, start: u64, end: Option<u64>) -> Result<Vec<Entry>, StoreError> {
        let hi = end.unwrap_or(u64::MAX);
        if start >= hi {
            return Ok(Vec::new());
        }
        let mut out: BTreeMap<u64, Entry> = BTreeMap::new();
        {
            let cache = lock(&self.cache);
            let range = (Bound::Included(start), Bound::Excluded(hi));
            for (i, (e, _)) in cache.flushed.range(range) {
                out.insert(*i, e.clone());
            }
            for (i, e) in cache.pending.range(range) {
                out.insert(*i, e.clone());
            }
        }
        let covered = end.is_some_and(|e| out.len() as u64 == e - start);
        if !covered {
            // Only what the cache lacks is decoded.
            let txn = self.db.begin_read()?;
            let table = txn.open_table(RAFT_LOG)?;
            for row in table.range((self.partition, start)..(self.partition, hi))? {
                let (k, v) = row?;
                let index = k.value().1;
                if let std::collections::btree_map::Entry::Vacant(slot) = out.entry(index) {
                    slot.insert(tables::decode(v.value(), "raft log entry")?);
                }
            }
        }
        Ok(out.into_values().collect())
    }

    fn last_committed_entry(&self) -> Result<Option<LogId>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RAFT_LOG)?;
        let last = table
            .range((self.partition, 0)..=(self.partition, u64::MAX))?
            .next_back();
        match last {
            Some(row) => {
                let (_, v) = row?;
                let e: Entry = tables::decode(v.value(), "raft log entry")?;
                Ok(Some(*e.get_log_id()))
            }
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => Some(e.saturating_add(1)),
            Bound::Excluded(e) => Some(*e),
            Bound::Unbounded => None,
        };
        self.read_range(start, end)
            .map_err(|e| raft_err(ErrorSubject::Logs, ErrorVerb::Read, e))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let err = |e| raft_err(ErrorSubject::Logs, ErrorVerb::Read, e);
        let purged: Option<LogId> = self
            .read_meta::<Option<LogId>>(KEY_PURGED)
            .map_err(err)?
            .flatten();
        let stored = self.last_committed_entry().map_err(err)?;
        let pending = lock(&self.cache)
            .pending
            .values()
            .next_back()
            .map(|e| *e.get_log_id());
        let last = pending.or(stored).or(purged);
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(KEY_VOTE, vote, true)
            .await
            .map_err(|e| raft_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(KEY_VOTE)
            .map_err(|e| raft_err(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not durable: it only lets a restarted node apply what it already
        // has sooner; losing it costs waiting for the leader's next message.
        self.write_meta(KEY_COMMITTED, &committed, false)
            .await
            .map_err(|e| raft_err(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self
            .read_meta::<Option<LogId>>(KEY_COMMITTED)
            .map_err(|e| raft_err(ErrorSubject::Store, ErrorVerb::Read, e))?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut rows = Vec::with_capacity(entries.len());
        for e in &entries {
            let bytes = tables::encode(e, "raft log entry").map_err(|err| {
                raft_err(ErrorSubject::Log(*e.get_log_id()), ErrorVerb::Write, err)
            })?;
            rows.push((e.get_log_id().index, bytes));
        }
        let ids: Vec<(LogId, usize)> = entries
            .iter()
            .zip(&rows)
            .map(|(e, (_, bytes))| (*e.get_log_id(), bytes.len()))
            .collect();
        {
            let mut cache = lock(&self.cache);
            for e in entries {
                cache.pending.insert(e.get_log_id().index, e);
            }
        }
        let p = self.partition;
        let done = self
            .writer
            .submit(true, move |txn| {
                let mut table = txn.open_table(RAFT_LOG)?;
                for (index, bytes) in &rows {
                    table.insert((p, *index), bytes.as_slice())?;
                }
                Ok(())
            })
            .await
            .map_err(|e| raft_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        let cache = Arc::clone(&self.cache);
        tokio::spawn(async move {
            let result = match done.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
                Err(_) => Err(std::io::Error::other("storage writer stopped")),
            };
            if result.is_ok() {
                lock(&cache).committed(&ids);
            }
            callback.log_io_completed(result);
        });
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let from = log_id.index;
        lock(&self.cache).retain(|i| i < from);
        let p = self.partition;
        self.writer
            .write(true, move |txn| {
                let mut table = txn.open_table(RAFT_LOG)?;
                table.retain_in((p, from)..=(p, u64::MAX), |_, _| false)?;
                Ok(())
            })
            .await
            .map_err(|e| raft_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let upto = log_id.index;
        lock(&self.cache).retain(|i| i > upto);
        let p = self.partition;
        let marker = tables::encode(&Some(log_id), KEY_PURGED)
            .map_err(|e| raft_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        // Not durable: losing a purge brings back entries that are still
        // valid; the marker and the deletion commit together.
        self.writer
            .write(false, move |txn| {
                {
                    let mut meta = txn.open_table(RAFT_META)?;
                    meta.insert((p, KEY_PURGED), marker.as_slice())?;
                }
                let mut table = txn.open_table(RAFT_LOG)?;
                table.retain_in((p, 0)..=(p, upto), |_, _| false)?;
                Ok(())
            })
            .await
            .map_err(|e| raft_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}
