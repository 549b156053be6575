//! The Raft log of one partition (openraft `RaftLogStorage`, storage v2),
//! over the node's segmented [`RaftLog`].
//!
//! `append` must make entries readable when it returns but may report them
//! durable later. Entries are kept in an in-memory cache from the moment
//! they are queued: until their write was synced (`pending`), so the
//! leader can replicate them while its own fsync is still running (the
//! leader's disk write and the followers' overlap instead of adding up),
//! and for a while after (`flushed`, bounded), because replication and the
//! state machine read back what was just appended, and decoding it from
//! disk again was a visible share of a node's CPU.
//! Vote, truncation and purge wait for their sync before returning.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, ErrorSubject, ErrorVerb, OptionalSend, RaftLogId};

use tracing::warn;

use super::raft_log::{Framed, RaftLog, Record};
use super::writer::{Commit, StorageWriter};
use super::{InstallState, StoreError};
use crate::storage::types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// The Raft log of one partition; clones share state.
#[derive(Clone)]
pub struct LogStore {
    partition: u32,
    log: RaftLog,
    /// The state machine's writer: a purge first makes the applied state
    /// durable, so the log never drops what a crash would need again.
    sm_writer: StorageWriter,
    /// Recent entries, by index.
    cache: Arc<Mutex<EntryCache>>,
    /// Where the state machine's snapshot install stands.
    installing: Arc<tokio::sync::watch::Sender<InstallState>>,
}

/// How long a purge waits for a snapshot install to finish: long enough
/// for a large partition's install, since a failed purge stops the Raft
/// group (shorter in unit tests, which wait it out).
const PURGE_WAITS_FOR_INSTALL: std::time::Duration = if cfg!(test) {
    std::time::Duration::from_secs(1)
} else {
    std::time::Duration::from_secs(120)
};

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
    pub(crate) fn new(
        partition: u32,
        log: RaftLog,
        sm_writer: StorageWriter,
        installing: Arc<tokio::sync::watch::Sender<InstallState>>,
    ) -> LogStore {
        LogStore {
            partition,
            log,
            sm_writer,
            cache: Arc::default(),
            installing,
        }
    }

    /// Makes the state machine's commits durable and returns what it has
    /// applied.
    async fn durable_applied(&self) -> Result<Option<LogId>, StoreError> {
        let partition = self.partition;
        self.sm_writer
            .write(Commit::Durable, move |txn| {
                super::state_machine::applied_in(txn, partition)
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
            // Only what the cache lacks is read and decoded.
            self.log.read_into(self.partition, start, hi, &mut out)?;
        }
        Ok(out.into_values().collect())
    }

    async fn write_meta(&self, record: Record) -> Result<(), StoreError> {
        self.log.write(vec![Framed::meta(record)?]).await
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

    /// What replication sends after `prev_log_id = start - 1`: only a run
    /// of entries starting exactly at `start`, since AppendEntries asserts
    /// the first entry follows its prev_log_id.
    ///
    /// A range with its start already purged does happen: a replication
    /// task of a leader that has just been deposed can still read after
    /// the node, now a follower, built a snapshot and purged its log (the
    /// simulator found it: a stale T7 task sent prev_log_id 71 with entries
    /// from 144, and the follower's debug assertion fired). Nothing is
    /// returned then; openraft sends a heartbeat in its place, and the task
    /// is dropped with its session.
    ///
    /// At most [`MAX_APPEND_ENTRIES_BYTES`] (at least one entry), read a
    /// growing chunk at a time: openraft asks for up to
    /// `max_payload_entries` (300) entries, which with 4 MiB entries of
    /// 64 KiB events was over a gigabyte decoded for one lagging follower,
    /// and an AppendEntries that cannot cross within its timeout (the
    /// heartbeat interval in openraft 0.9) is sent again and again.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        let mut entries: Vec<Entry> = Vec::new();
        let mut bytes = 0usize;
        let mut next = start;
        let mut chunk = 1u64;
        while next < end {
            let hi = next.saturating_add(chunk).min(end);
            let got = self.try_get_log_entries(next..hi).await?;
            let run = contiguous_from(next, &got);
            if run < got.len() {
                warn!(
                    partition = self.partition,
                    start,
                    end,
                    first = got.first().map(|e| e.log_id.index),
                    "raft log: entries from {next} are gone (purged); replication sends {} of them",
                    entries.len() + run
                );
            }
            let complete = run as u64 == hi - next;
            for e in got.into_iter().take(run) {
                let size = entry_bytes(&e);
                if !entries.is_empty() && bytes.saturating_add(size) > MAX_APPEND_ENTRIES_BYTES {
                    return Ok(entries);
                }
                bytes = bytes.saturating_add(size);
                entries.push(e);
            }
            if !complete || bytes >= MAX_APPEND_ENTRIES_BYTES {
                break;
            }
            next = hi;
            // Grow towards what the rest of the budget holds at the size
            // seen so far, so small entries take a few reads, large ones
            // are not read only to be dropped.
            let average = (bytes / entries.len().max(1)).max(1);
            let fits = ((MAX_APPEND_ENTRIES_BYTES - bytes) / average).max(1) as u64;
            chunk = chunk.saturating_mul(2).min(fits);
        }
        Ok(entries)
    }
}

/// Most bytes (by [`entry_bytes`]) one AppendEntries carries, beyond its
/// first entry: one full append batch (`limits.max_batch_bytes`, 4 MiB by
/// default) crosses loopback or a LAN and is written well within the
/// 150 ms RPC timeout; more only makes a resend costlier.
pub const MAX_APPEND_ENTRIES_BYTES: usize = 4 * 1024 * 1024;

/// About how many bytes `entry` takes encoded: its events' canonical
/// bytes plus a small allowance per event and per entry.
pub fn entry_bytes(entry: &Entry) -> usize {
    const ENTRY_OVERHEAD: usize = 64;
    const EVENT_OVERHEAD: usize = 16;
    match &entry.payload {
        openraft::EntryPayload::Normal(crate::storage::types::Command::Append {
            events, ..
        }) => events.iter().fold(ENTRY_OVERHEAD, |n, e| {
            n.saturating_add(auditflow_protocol::canonical::encoded_len(e) + EVENT_OVERHEAD)
        }),
        _ => ENTRY_OVERHEAD,
    }
}

/// How many of `entries` form an unbroken run of indexes from `start`.
fn contiguous_from(start: u64, entries: &[Entry]) -> usize {
    entries
        .iter()
        .zip(start..)
        .take_while(|(e, index)| e.log_id.index == *index)
        .count()
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let meta = self.log.meta(self.partition);
        let pending = lock(&self.cache)
            .pending
            .values()
            .next_back()
            .map(|e| *e.get_log_id());
        Ok(LogState {
            last_purged_log_id: meta.purged,
            last_log_id: pending.or(meta.last).or(meta.purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let record = Record::Vote {
            partition: self.partition,
            vote: *vote,
        };
        self.write_meta(record)
            .await
            .map_err(|e| raft_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.log.meta(self.partition).vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced, nor even written at once: it only lets a restarted
        // node apply what it already has sooner; losing it costs waiting
        // for the leader's next message.
        self.log.set_committed(self.partition, committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.log.meta(self.partition).committed)
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
        let mut records = Vec::with_capacity(entries.len());
        let mut ids = Vec::with_capacity(entries.len());
        for e in &entries {
            let framed = Framed::entry(self.partition, e).map_err(|err| {
                raft_err(ErrorSubject::Log(*e.get_log_id()), ErrorVerb::Write, err)
            })?;
            ids.push((*e.get_log_id(), framed.len()));
            records.push(framed);
        }
        {
            let mut cache = lock(&self.cache);
            for e in entries {
                cache.pending.insert(e.get_log_id().index, e);
            }
        }
        let done = self
            .log
            .submit(records)
            .await
            .map_err(|e| raft_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        let cache = Arc::clone(&self.cache);
        tokio::spawn(async move {
            let result = match done.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
                Err(_) => Err(std::io::Error::other("raft log writer stopped")),
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
        let record = Record::Truncate {
            partition: self.partition,
            from,
        };
        self.write_meta(record)
            .await
            .map_err(|e| raft_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let err = |e| raft_err(ErrorSubject::Logs, ErrorVerb::Delete, e);
        // The state machine must hold, durably, everything the purge drops,
        // or a crash leaves a log that starts after the state machine's
        // state, and openraft refuses to start the node, for good. Its
        // commits are not durable, so one is forced here. After a snapshot
        // is built, openraft purges only applied entries; but it asks to
        // purge up to an installed snapshot before the state machine has
        // installed it (the simulator found it: the install then failed on
        // a disk error). So a purge past the applied state waits while an
        // install is pending, and fails without purging if the state
        // machine still does not reach it, at once if the install failed.
        // (With no install, openraft's contract lets the log be purged on
        // its own, as its storage suite does.)
        let covers = |applied: Option<LogId>| applied.is_some_and(|a| a.index >= log_id.index);
        let mut applied = self.durable_applied().await.map_err(err)?;
        let install = *self.installing.borrow();
        if !covers(applied) && install != InstallState::Idle {
            if install == InstallState::Pending {
                let mut rx = self.installing.subscribe();
                let wait = rx.wait_for(|s| *s != InstallState::Pending);
                let _ = tokio::time::timeout(PURGE_WAITS_FOR_INSTALL, wait).await;
                applied = self.durable_applied().await.map_err(err)?;
            }
            if !covers(applied) {
                return Err(err(StoreError::Refused {
                    what: format!("raft log: purge up to {log_id}"),
                    reason: format!(
                        "the state machine holds only up to {}",
                        applied.map_or_else(|| "nothing".to_string(), |a| a.to_string())
                    ),
                }));
            }
        }
        lock(&self.cache).retain(|i| i > log_id.index);
        let record = Record::Purge {
            partition: self.partition,
            upto: log_id,
        };
        // Synced, because the segments it frees are deleted right after.
        self.write_meta(record).await.map_err(err)
    }
}
