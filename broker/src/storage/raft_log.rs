//! The node's Raft log: every partition's entries, votes, commit points,
//! truncations and purges as records appended to segment files.
//!
//! An acknowledged append costs one write of the new records and one
//! `fdatasync`, shared by everything queued at the time (group commit
//! across partitions), instead of a copy-on-write commit of a B-tree that
//! rewrote about 25 pages whatever it held (docs/ARCHITECTURE.md,
//! Performance). redb keeps only the state machine.
//!
//! Record frame: `len: u32 LE`, `crc32: u32 LE` of the payload, payload.
//! The payload is a bincode [`Record`] header, followed for an entry by
//! the bincode `Entry`, so that opening the log indexes entries without
//! decoding them. Each segment starts with [`MAGIC`]; a new segment first
//! repeats every partition's vote, commit point and purge point, so older
//! segments only ever matter for their entries and go once every entry in
//! them is purged (oldest first: a truncation recorded in a newer segment
//! must never outlive the entries it removed).
//!
//! Every write is one batch, opened by a [`Record::Batch`] marker and
//! synced before the next batch is written. Opening replays every segment
//! into an in-memory index (entry index to position). A frame that is cut
//! short or fails its checksum in the newest segment with no intact batch
//! marker after it belongs to the last batch, whose sync the crash
//! interrupted (its pages may have reached the disk in any order): it was
//! never acknowledged and is cut off there. A damaged frame followed by a
//! later batch, or in an older segment, is corruption of synced records:
//! the log refuses to open.
//!
//! The active segment is zero-filled ahead of its records, about
//! [`ZERO_FILL_BYTES`] at a time in the same write as the records that
//! cross the filled end: a write inside already written blocks changes no
//! file metadata, so its `fdatasync` is the data and a cache flush, not
//! also a journal commit for the grown size and new blocks (measured on
//! this ext4: about 40 % less time per write and sync). Opening the log
//! takes an all-zero tail of the newest segment as its end and keeps it;
//! a segment is cut back to its records when the next one starts, so an
//! older segment with a zero tail is damage like any other.
//!
//! Writes go through one writer (a thread in production, the caller in
//! the simulator) in submission order, so openraft's rule that log and
//! vote I/O are serialized holds. After a failed write or sync the log
//! refuses every later write: what the disk holds is then unknown, and
//! the node must restart and replay.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use openraft::RaftLogId;
use redb::StorageBackend;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use super::log_dir::LogDir;
use super::{tables, StoreError, WriterMode};
use crate::metrics::{
    RAFT_LOG_SEGMENTS, RAFT_LOG_WRITES_TOTAL, RAFT_LOG_WRITE_RECORDS, RAFT_LOG_WRITE_SECONDS,
};
use crate::storage::types::{Entry, LogId, Vote};

/// First bytes of every segment.
pub const MAGIC: &[u8; 8] = b"AFRLOG01";
/// A segment is closed and a new one started once it holds this much.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// How far ahead of its records the active segment is zero-filled (at
/// most the segment size).
pub const ZERO_FILL_BYTES: u64 = 1024 * 1024;
/// Largest record payload accepted when reading; a length field above it
/// is damage, not a record.
const MAX_PAYLOAD: u32 = 256 * 1024 * 1024;
const FRAME_HEADER: usize = 8;
/// Jobs waiting for the writer thread (back-pressure when the disk is
/// slow).
const QUEUE_CAPACITY: usize = 4096;
/// Most jobs written with one sync.
const MAX_JOBS_PER_WRITE: usize = 1024;

/// What a record says; an entry record's body is the encoded entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Record {
    /// Opens each write (see the module documentation).
    Batch,
    /// A log entry (the body).
    Entry {
        /// The partition.
        partition: u32,
        /// The entry's id.
        log_id: LogId,
    },
    /// The partition's vote.
    Vote {
        /// The partition.
        partition: u32,
        /// The vote.
        vote: Vote,
    },
    /// The partition's last known commit point.
    Committed {
        /// The partition.
        partition: u32,
        /// The commit point.
        committed: Option<LogId>,
    },
    /// Entries from `from` on are gone.
    Truncate {
        /// The partition.
        partition: u32,
        /// First removed index.
        from: u64,
    },
    /// Entries up to and including `upto` are gone.
    Purge {
        /// The partition.
        partition: u32,
        /// Last purged entry.
        upto: LogId,
    },
}

/// A record ready to write: what it says and its frame.
pub struct Framed {
    record: Record,
    frame: Vec<u8>,
}

impl Framed {
    /// Frames `record` (with no body).
    pub fn meta(record: Record) -> Result<Framed, StoreError> {
        Self::with_body(record, &[])
    }

    /// Frames entry `entry` of `partition`.
    pub fn entry(partition: u32, entry: &Entry) -> Result<Framed, StoreError> {
        let body = tables::encode(entry, "raft log entry")?;
        Self::with_body(
            Record::Entry {
                partition,
                log_id: *entry.get_log_id(),
            },
            &body,
        )
    }

    fn with_body(record: Record, body: &[u8]) -> Result<Framed, StoreError> {
        let header = tables::encode(&record, "raft log record")?;
        let len = header.len() + body.len();
        let len32 = u32::try_from(len)
            .ok()
            .filter(|l| *l <= MAX_PAYLOAD)
            .ok_or_else(|| StoreError::Encode {
                what: "raft log record".into(),
                reason: format!("{len} bytes is over the {MAX_PAYLOAD}-byte limit"),
            })?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        crc.update(body);
        let mut frame = Vec::with_capacity(FRAME_HEADER + len);
        frame.extend_from_slice(&len32.to_le_bytes());
        frame.extend_from_slice(&crc.finalize().to_le_bytes());
        frame.extend_from_slice(&header);
        frame.extend_from_slice(body);
        Ok(Framed { record, frame })
    }

    /// Bytes on disk.
    pub fn len(&self) -> usize {
        self.frame.len()
    }

    /// Whether the frame is empty (never: a frame has a header).
    pub fn is_empty(&self) -> bool {
        self.frame.is_empty()
    }
}

/// What reading one frame at a position found.
enum Parsed<'a> {
    /// A whole, intact record; the body and the frame's length.
    Record(Record, &'a [u8], usize),
    /// No bytes left.
    End,
    /// Cut short or damaged.
    Bad(String),
}

fn parse(buf: &[u8]) -> Parsed<'_> {
    if buf.is_empty() {
        return Parsed::End;
    }
    if buf.len() < FRAME_HEADER {
        return Parsed::Bad(format!("{} bytes, shorter than a frame header", buf.len()));
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len > MAX_PAYLOAD || len == 0 {
        return Parsed::Bad(format!("impossible record length {len}"));
    }
    let end = FRAME_HEADER + len as usize;
    let Some(payload) = buf.get(FRAME_HEADER..end) else {
        return Parsed::Bad(format!(
            "record of {len} bytes cut short at {} bytes",
            buf.len() - FRAME_HEADER
        ));
    };
    if crc32fast::hash(payload) != crc {
        return Parsed::Bad("checksum mismatch".into());
    }
    match bincode::serde::decode_from_slice::<Record, _>(payload, bincode::config::standard()) {
        Ok((record, used)) => Parsed::Record(record, &payload[used..], end),
        Err(e) => Parsed::Bad(format!("undecodable record: {e}")),
    }
}

/// The first position after `bad` where an intact batch marker starts,
/// if any: proof that the damaged frame was synced (a batch is written
/// only after the previous one was synced). Only called on a damaged
/// frame; a torn tail is at most one batch long, and damage inside the log
/// is followed by the next batch, so the scan stays short either way.
fn batch_after(buf: &[u8], bad: usize) -> Option<usize> {
    (bad + 1..buf.len()).find(|&q| matches!(parse(&buf[q..]), Parsed::Record(Record::Batch, _, _)))
}

/// The frame that opens every write.
fn batch_marker() -> Vec<u8> {
    // Cannot fail: a unit record with no body.
    Framed::meta(Record::Batch)
        .map(|f| f.frame)
        .unwrap_or_default()
}

/// Where an entry's frame is.
#[derive(Clone, Copy, Debug)]
struct Loc {
    segment: u64,
    pos: u64,
    len: u32,
    log_id: LogId,
}

/// One partition's part of the log, as replayed and kept up to date.
#[derive(Default)]
struct PartitionLog {
    entries: BTreeMap<u64, Loc>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
}

struct Segment {
    file: Arc<dyn StorageBackend>,
    /// Highest entry index per partition written to this segment.
    max_index: BTreeMap<u32, u64>,
}

#[derive(Default)]
struct State {
    partitions: BTreeMap<u32, PartitionLog>,
    segments: BTreeMap<u64, Segment>,
    active: u64,
    /// End of the active segment's records.
    active_len: u64,
    /// End of the zeros written after them (at least `active_len`).
    active_filled: u64,
    /// Why writing stopped, after a failed write or sync.
    failed: Option<StoreError>,
    /// Commit points set since the last write, already in `partitions`:
    /// written ahead of the next write's records instead of in a write of
    /// their own (openraft saves one at every commit of every partition
    /// and waits for it).
    unsaved_committed: BTreeMap<u32, Option<LogId>>,
}

impl State {
    fn apply(&mut self, record: &Record, segment: u64, pos: u64, len: usize) {
        match *record {
            Record::Entry { partition, log_id } => {
                let p = self.partitions.entry(partition).or_default();
                if p.purged.is_some_and(|purged| log_id.index <= purged.index) {
                    return;
                }
                p.entries.insert(
                    log_id.index,
                    Loc {
                        segment,
                        pos,
                        len: len as u32,
                        log_id,
                    },
                );
                if let Some(s) = self.segments.get_mut(&segment) {
                    let max = s.max_index.entry(partition).or_default();
                    *max = (*max).max(log_id.index);
                }
            }
            Record::Vote { partition, vote } => {
                self.partitions.entry(partition).or_default().vote = Some(vote);
            }
            Record::Committed {
                partition,
                committed,
            } => {
                self.partitions.entry(partition).or_default().committed = committed;
            }
            Record::Truncate { partition, from } => {
                let p = self.partitions.entry(partition).or_default();
                p.entries.split_off(&from);
            }
            Record::Batch => {}
            Record::Purge { partition, upto } => {
                let p = self.partitions.entry(partition).or_default();
                if p.purged.is_some_and(|purged| purged.index >= upto.index) {
                    return;
                }
                p.entries = p.entries.split_off(&(upto.index + 1));
                p.purged = Some(upto);
            }
        }
    }

    /// The records that open a new segment: each partition's metadata.
    fn metadata(&self) -> Vec<Record> {
        let mut out = Vec::new();
        for (&partition, p) in &self.partitions {
            if let Some(vote) = p.vote {
                out.push(Record::Vote { partition, vote });
            }
            if p.committed.is_some() {
                out.push(Record::Committed {
                    partition,
                    committed: p.committed,
                });
            }
            if let Some(upto) = p.purged {
                out.push(Record::Purge { partition, upto });
            }
        }
        out
    }

    /// Oldest segments whose every entry is purged (never the active one).
    fn purgeable(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (&seq, seg) in &self.segments {
            if seq == self.active {
                break;
            }
            let dead = seg.max_index.iter().all(|(p, max)| {
                self.partitions
                    .get(p)
                    .and_then(|p| p.purged)
                    .is_some_and(|purged| purged.index >= *max)
            });
            if !dead {
                break;
            }
            out.push(seq);
        }
        out
    }
}

struct Shared {
    dir: Box<dyn LogDir>,
    state: Mutex<State>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Job {
    records: Vec<Framed>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// A partition's log metadata.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogMeta {
    /// The vote.
    pub vote: Option<Vote>,
    /// The last known commit point.
    pub committed: Option<LogId>,
    /// The last purged entry.
    pub purged: Option<LogId>,
    /// The last stored entry.
    pub last: Option<LogId>,
}

/// The node's Raft log; cheap to clone.
#[derive(Clone)]
pub struct RaftLog {
    shared: Arc<Shared>,
    writer: Writer,
}

#[derive(Clone)]
enum Writer {
    // The sender drops before the join guard (field order), so the last
    // handle closes the queue and then waits for the thread.
    Thread(
        mpsc::Sender<Job>,
        #[allow(dead_code)] Arc<super::writer::JoinOnDrop>,
    ),
    Inline,
}

impl RaftLog {
    /// Opens the log in `dir`: replays its segments, cuts off a write a
    /// crash interrupted at the end of the newest one, and refuses damage
    /// anywhere else.
    pub fn open(dir: Box<dyn LogDir>, mode: WriterMode) -> Result<RaftLog, StoreError> {
        let state = replay(dir.as_ref())?;
        let shared = Arc::new(Shared {
            dir,
            state: Mutex::new(state),
        });
        let writer = match mode {
            WriterMode::Inline => Writer::Inline,
            WriterMode::Thread => {
                let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
                let s = Arc::clone(&shared);
                let handle = std::thread::Builder::new()
                    .name("auditflow-raft-log".into())
                    .spawn(move || writer_loop(&s, rx))
                    .map_err(|e| StoreError::Internal {
                        what: "raft log".into(),
                        reason: format!("cannot start the log writer: {e}"),
                    })?;
                Writer::Thread(tx, Arc::new(super::writer::JoinOnDrop::new(handle)))
            }
        };
        Ok(RaftLog { shared, writer })
    }

    /// Queues `records` and returns a receiver that resolves once they are
    /// written and synced. Jobs are written in submission order.
    pub async fn submit(
        &self,
        records: Vec<Framed>,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        let (done, rx) = oneshot::channel();
        let job = Job { records, done };
        match &self.writer {
            Writer::Thread(tx, _) => tx.send(job).await.map_err(|_| StoreError::WriterStopped)?,
            Writer::Inline => write_batch(&self.shared, vec![job]),
        }
        Ok(rx)
    }

    /// Writes and syncs `records` and waits for them.
    pub async fn write(&self, records: Vec<Framed>) -> Result<(), StoreError> {
        let done = self.submit(records).await?;
        done.await.map_err(|_| StoreError::WriterStopped)?
    }

    /// Sets the partition's commit point without writing it now: it goes
    /// to disk ahead of the next write (not synced by itself: losing it
    /// only makes a restarted node wait for the leader to learn it again).
    pub fn set_committed(&self, partition: u32, committed: Option<LogId>) {
        let mut state = lock(&self.shared.state);
        state.partitions.entry(partition).or_default().committed = committed;
        state.unsaved_committed.insert(partition, committed);
    }

    /// The partition's metadata and last stored entry.
    pub fn meta(&self, partition: u32) -> LogMeta {
        let state = lock(&self.shared.state);
        match state.partitions.get(&partition) {
            Some(p) => LogMeta {
                vote: p.vote,
                committed: p.committed,
                purged: p.purged,
                last: p.entries.values().next_back().map(|l| l.log_id),
            },
            None => LogMeta::default(),
        }
    }

    /// Reads the stored entries of `partition` in `start..end` that `out`
    /// does not hold yet into it.
    pub fn read_into(
        &self,
        partition: u32,
        start: u64,
        end: u64,
        out: &mut BTreeMap<u64, Entry>,
    ) -> Result<(), StoreError> {
        let wanted: Vec<(Loc, Arc<dyn StorageBackend>)> = {
            let state = lock(&self.shared.state);
            let Some(p) = state.partitions.get(&partition) else {
                return Ok(());
            };
            let mut wanted = Vec::new();
            for (i, loc) in p.entries.range(start..end) {
                if out.contains_key(i) {
                    continue;
                }
                let file = state
                    .segments
                    .get(&loc.segment)
                    .map(|s| Arc::clone(&s.file))
                    // The index points past what the log holds: a bug.
                    .ok_or_else(|| StoreError::Internal {
                        what: "raft log".into(),
                        reason: format!("entry {i} is in missing segment {}", loc.segment),
                    })?;
                wanted.push((*loc, file));
            }
            wanted
        };
        // Adjacent frames of one segment are read with one call.
        let mut at = 0;
        while at < wanted.len() {
            let (first, file) = &wanted[at];
            let mut run_end = at + 1;
            let mut bytes = first.len as u64;
            while let Some((next, _)) = wanted.get(run_end) {
                if next.segment != first.segment || next.pos != first.pos + bytes {
                    break;
                }
                bytes += next.len as u64;
                run_end += 1;
            }
            let mut buf = vec![0; bytes as usize];
            file.read(first.pos, &mut buf).map_err(|e| {
                StoreError::io(format!("raft log: read segment {}", first.segment), e)
            })?;
            let mut rest = &buf[..];
            for (loc, _) in &wanted[at..run_end] {
                let what = || format!("raft log segment {} at {}", loc.segment, loc.pos);
                match parse(rest) {
                    Parsed::Record(Record::Entry { log_id, .. }, body, used)
                        if log_id == loc.log_id =>
                    {
                        let entry: Entry = tables::decode(body, &what())?;
                        out.insert(log_id.index, entry);
                        rest = &rest[used..];
                    }
                    Parsed::Bad(reason) => {
                        return Err(StoreError::Corrupt {
                            what: what(),
                            reason,
                        })
                    }
                    _ => {
                        return Err(StoreError::Corrupt {
                            what: what(),
                            reason: format!("expected entry {}", loc.log_id),
                        })
                    }
                }
            }
            at = run_end;
        }
        Ok(())
    }

    /// Number of segment files (for tests and metrics).
    pub fn segments(&self) -> usize {
        lock(&self.shared.state).segments.len()
    }

    /// A handle that reports which partitions keep old segments alive,
    /// without keeping the log open.
    pub fn usage(&self) -> LogUsage {
        LogUsage(Arc::downgrade(&self.shared))
    }
}

/// Which partitions keep old segments alive (see [`RaftLog::usage`]).
///
/// Segments go oldest first once every entry in them is purged, and
/// openraft purges a partition's log only after its snapshot, taken every
/// `snapshot_logs_since_last` entries of that partition. A quiet partition
/// would so keep every segment written since its last snapshot, however
/// busy the others were: the node asks it to snapshot and purge instead.
#[derive(Clone)]
pub struct LogUsage(std::sync::Weak<Shared>);

impl LogUsage {
    /// `None` once the log is closed. Otherwise, if more than `max`
    /// segments exist, each partition with unpurged entries in the oldest
    /// one and the highest such index (purging up to it frees the
    /// segment); empty if within `max`.
    pub fn pinning(&self, max: usize) -> Option<Vec<(u32, u64)>> {
        let shared = self.0.upgrade()?;
        let state = lock(&shared.state);
        if state.segments.len() <= max {
            return Some(Vec::new());
        }
        let Some((_, oldest)) = state.segments.first_key_value() else {
            return Some(Vec::new());
        };
        let pins = oldest
            .max_index
            .iter()
            .filter(|(p, max)| {
                let purged = state.partitions.get(p).and_then(|p| p.purged);
                purged.is_none_or(|purged| purged.index < **max)
            })
            .map(|(p, max)| (*p, *max))
            .collect();
        Some(pins)
    }
}

fn writer_loop(shared: &Shared, mut rx: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_JOBS_PER_WRITE);
    while super::writer::next_batch(&mut rx, &mut batch, MAX_JOBS_PER_WRITE) {
        write_batch(shared, std::mem::take(&mut batch));
    }
}

/// Writes the jobs' records at the end of the active segment with one
/// write and one sync, then updates the index.
fn write_batch(shared: &Shared, jobs: Vec<Job>) {
    let result = write_records(shared, &jobs);
    for job in jobs {
        let _ = job.done.send(match &result {
            Ok(()) => Ok(()),
            Err(e) => Err(e.shared()),
        });
    }
}

fn write_records(shared: &Shared, jobs: &[Job]) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    let (file, segment, start, filled, mut buf) = {
        let mut state = lock(&shared.state);
        if let Some(failed) = &state.failed {
            return Err(StoreError::Halted {
                what: "raft log writes".into(),
                reason: failed.to_string(),
            });
        }
        if state.active_len >= shared.dir.segment_bytes() {
            if let Err(e) = roll(shared.dir.as_ref(), &mut state) {
                let e = StoreError::io(
                    format!("raft log: start a new segment in {}", shared.dir.describe()),
                    e,
                );
                error!("{e}");
                state.failed = Some(e.shared());
                return Err(e);
            }
        }
        let total: usize = jobs.iter().flat_map(|j| &j.records).map(Framed::len).sum();
        let mut buf = Vec::with_capacity(total + 32 * (1 + state.unsaved_committed.len()));
        buf.extend_from_slice(&batch_marker());
        // Not indexed again after the write: the state already holds these
        // (or newer) values.
        for (partition, committed) in std::mem::take(&mut state.unsaved_committed) {
            let record = Record::Committed {
                partition,
                committed,
            };
            if let Ok(framed) = Framed::meta(record) {
                buf.extend_from_slice(&framed.frame);
            }
        }
        let seg = &state.segments[&state.active];
        (
            Arc::clone(&seg.file),
            state.active,
            state.active_len,
            state.active_filled,
            buf,
        )
    };
    let prefix = buf.len() as u64;
    for r in jobs.iter().flat_map(|j| &j.records) {
        buf.extend_from_slice(&r.frame);
    }
    let end = start + buf.len() as u64;
    if end > filled {
        // Zeros for the next writes, in this write and under its sync.
        let step = ZERO_FILL_BYTES.min(shared.dir.segment_bytes()).max(1);
        buf.resize((end + step - start) as usize, 0);
    }
    let io = file.write(start, &buf).and_then(|()| file.sync_data());
    let mut state = lock(&shared.state);
    if let Err(e) = io {
        let e = StoreError::io(format!("raft log: write segment {segment}"), e);
        error!("{e}");
        state.failed = Some(e.shared());
        return Err(e);
    }
    state.active_len = end;
    state.active_filled = filled.max(start + buf.len() as u64);
    let records = jobs.iter().map(|j| j.records.len()).sum::<usize>();
    metrics::counter!(RAFT_LOG_WRITES_TOTAL).increment(1);
    metrics::histogram!(RAFT_LOG_WRITE_RECORDS).record(records as f64);
    metrics::histogram!(RAFT_LOG_WRITE_SECONDS).record(started.elapsed().as_secs_f64());
    let mut pos = start + prefix;
    let mut purged = false;
    for r in jobs.iter().flat_map(|j| &j.records) {
        state.apply(&r.record, segment, pos, r.len());
        purged |= matches!(r.record, Record::Purge { .. });
        pos += r.len() as u64;
    }
    // The purge is synced, so the segments it frees may go: replay never
    // needs them again.
    if purged {
        let dead = state.purgeable();
        for seq in dead {
            state.segments.remove(&seq);
            if let Err(e) = shared.dir.remove(seq) {
                // Left behind it is harmless: replay drops purged entries.
                warn!("raft log: cannot delete purged segment {seq}: {e}");
            }
        }
    }
    metrics::gauge!(RAFT_LOG_SEGMENTS).set(state.segments.len() as f64);
    Ok(())
}

/// Closes the active segment and starts the next one with every
/// partition's metadata.
fn roll(dir: &dyn LogDir, state: &mut State) -> std::io::Result<()> {
    // Every write of this process was synced, but the closing segment may
    // end in bytes an earlier process wrote and never synced (its sync
    // failed): replay treats damage in any but the newest segment as
    // corruption, so it must be on disk before the next one starts, and
    // without the zeros filled ahead of its records, which replay takes
    // as damage in any but the newest segment.
    if let Some(old) = state.segments.get(&state.active) {
        old.file.set_len(state.active_len)?;
        old.file.sync_data()?;
    }
    let seq = state.active + 1;
    let file: Arc<dyn StorageBackend> = Arc::from(dir.open(seq)?);
    let mut buf = MAGIC.to_vec();
    buf.extend_from_slice(&batch_marker());
    for record in state.metadata() {
        let framed = Framed::meta(record).map_err(|e| std::io::Error::other(e.to_string()))?;
        buf.extend_from_slice(&framed.frame);
    }
    file.set_len(0)?;
    file.write(0, &buf)?;
    file.sync_data()?;
    dir.sync()?;
    state.segments.insert(
        seq,
        Segment {
            file,
            max_index: BTreeMap::new(),
        },
    );
    state.active = seq;
    state.active_len = buf.len() as u64;
    state.active_filled = state.active_len;
    Ok(())
}

/// Rebuilds the index from the segments in `dir`.
fn replay(dir: &dyn LogDir) -> Result<State, StoreError> {
    let io_err = |what: String, e: std::io::Error| StoreError::io(format!("raft log: {what}"), e);
    let mut seqs = dir
        .list()
        .map_err(|e| io_err(format!("list {}", dir.describe()), e))?;
    seqs.sort_unstable();
    let mut state = State::default();
    if seqs.is_empty() {
        roll(dir, &mut state)
            .map_err(|e| io_err(format!("create a segment in {}", dir.describe()), e))?;
        return Ok(state);
    }
    let newest = seqs[seqs.len() - 1];
    for seq in seqs {
        let what = || format!("raft log segment {seq} in {}", dir.describe());
        let file: Arc<dyn StorageBackend> =
            Arc::from(dir.open(seq).map_err(|e| io_err(what(), e))?);
        let len = file.len().map_err(|e| io_err(what(), e))?;
        let mut buf = vec![0; len as usize];
        file.read(0, &mut buf).map_err(|e| io_err(what(), e))?;
        state.segments.insert(
            seq,
            Segment {
                file: Arc::clone(&file),
                max_index: BTreeMap::new(),
            },
        );
        state.active = seq;
        if buf.len() < MAGIC.len() && seq == newest && MAGIC.starts_with(&buf) {
            // Created, and the crash came before its first sync.
            file.set_len(0)
                .and_then(|()| file.write(0, MAGIC))
                .and_then(|()| file.sync_data())
                .map_err(|e| io_err(what(), e))?;
            state.active_len = MAGIC.len() as u64;
            state.active_filled = state.active_len;
            continue;
        }
        if !buf.starts_with(MAGIC) {
            return Err(StoreError::Corrupt {
                what: what(),
                reason: "not an auditflow raft log segment (bad magic)".into(),
            });
        }
        let mut pos = MAGIC.len();
        // Where the file ends once replayed: its zeros stay, a torn write
        // is cut off.
        let mut file_end = len;
        loop {
            match parse(&buf[pos..]) {
                Parsed::End => break,
                Parsed::Record(record, _, used) => {
                    state.apply(&record, seq, pos as u64, used);
                    pos += used;
                }
                // The zeros filled ahead of the records (module docs).
                Parsed::Bad(_) if seq == newest && buf[pos..].iter().all(|b| *b == 0) => break,
                Parsed::Bad(reason) if seq == newest && batch_after(&buf, pos).is_none() => {
                    warn!(
                        "{}: cutting off {} bytes at offset {pos} ({reason}): a write the last \
                         stop interrupted",
                        what(),
                        buf.len() - pos
                    );
                    file.set_len(pos as u64)
                        .and_then(|()| file.sync_data())
                        .map_err(|e| io_err(what(), e))?;
                    file_end = pos as u64;
                    break;
                }
                Parsed::Bad(reason) => {
                    return Err(StoreError::Corrupt {
                        what: format!("{} at offset {pos}", what()),
                        reason,
                    })
                }
            }
        }
        state.active_len = pos as u64;
        state.active_filled = file_end;
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::storage::FsLogDir;

    fn open(dir: &std::path::Path, segment_bytes: u64) -> Result<RaftLog, StoreError> {
        let fs = FsLogDir::create(dir, segment_bytes).unwrap();
        RaftLog::open(Box::new(fs), WriterMode::Thread)
    }

    fn id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: id(term, index),
            payload: EntryPayload::Blank,
        }
    }

    async fn append(log: &RaftLog, partition: u32, term: u64, indexes: std::ops::Range<u64>) {
        let records = indexes
            .map(|i| Framed::entry(partition, &entry(term, i)).unwrap())
            .collect();
        log.write(records).await.unwrap();
    }

    fn read(log: &RaftLog, partition: u32, range: std::ops::Range<u64>) -> Vec<LogId> {
        let mut out = BTreeMap::new();
        log.read_into(partition, range.start, range.end, &mut out)
            .unwrap();
        out.values().map(|e| e.log_id).collect()
    }

    /// A closed log holding entries 1..=10 of partition 0 in one segment.
    async fn ten_entries(dir: &std::path::Path) {
        let log = open(dir, SEGMENT_BYTES).unwrap();
        append(&log, 0, 1, 1..11).await;
    }

    fn segment_path(dir: &std::path::Path, seq: u64) -> std::path::PathBuf {
        dir.join(format!("{seq:020}.seg"))
    }

    /// Where a segment's records end (the zeros filled ahead start).
    fn records_end(bytes: &[u8]) -> usize {
        let mut pos = MAGIC.len();
        while let Parsed::Record(_, _, used) = parse(&bytes[pos..]) {
            pos += used;
        }
        pos
    }

    #[tokio::test]
    async fn the_active_segment_is_zero_filled_ahead_and_cut_back_when_the_next_starts() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let seg = segment_path(&dir, 1);
        {
            let log = open(&dir, 8 * ZERO_FILL_BYTES).unwrap();
            append(&log, 0, 1, 1..11).await;
            let bytes = std::fs::read(&seg).unwrap();
            let end = records_end(&bytes);
            assert!(
                bytes.len() >= end + ZERO_FILL_BYTES as usize,
                "filled ahead"
            );
            assert!(bytes[end..].iter().all(|b| *b == 0));
            // Later writes land inside the filled part: the file keeps its
            // length.
            append(&log, 0, 1, 11..21).await;
            assert_eq!(std::fs::metadata(&seg).unwrap().len(), bytes.len() as u64);
        }
        // The zero tail is the end, not a torn write: nothing is cut and
        // appends go on after the records.
        let filled = std::fs::metadata(&seg).unwrap().len();
        {
            let log = open(&dir, 8 * ZERO_FILL_BYTES).unwrap();
            assert_eq!(log.meta(0).last, Some(id(1, 20)));
            assert_eq!(std::fs::metadata(&seg).unwrap().len(), filled);
            append(&log, 0, 1, 21..31).await;
        }
        let log = open(&dir, 8 * ZERO_FILL_BYTES).unwrap();
        assert_eq!(read(&log, 0, 1..100).len(), 30);
        drop(log);

        // Rolling cuts the closed segment back to its records: a zero tail
        // in an older segment is damage.
        let dir = tmp.path().join("small");
        {
            let log = open(&dir, 1024).unwrap();
            for i in 0..20 {
                append(&log, 0, 1, i * 10 + 1..i * 10 + 11).await;
            }
            assert!(log.segments() >= 3);
        }
        let first = std::fs::read(segment_path(&dir, 1)).unwrap();
        assert_eq!(records_end(&first), first.len(), "no zeros left");
        let log = open(&dir, 1024).unwrap();
        assert_eq!(read(&log, 0, 1..1000).len(), 200);
        drop(log);
        let mut padded = first.clone();
        padded.extend(std::iter::repeat_n(0u8, 100));
        std::fs::write(segment_path(&dir, 1), &padded).unwrap();
        let err = open(&dir, 1024).err().expect("zeros in an older segment");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }

    #[tokio::test]
    async fn entries_and_metadata_survive_reopen_and_purged_segments_go() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let vote = Vote::new_committed(3, 2);
        {
            let log = open(&dir, 512).unwrap();
            for chunk in 0..20 {
                append(&log, 0, 1, chunk * 10 + 1..chunk * 10 + 11).await;
                append(&log, 1, 1, chunk * 10 + 1..chunk * 10 + 11).await;
            }
            let meta = |record| Framed::meta(record).unwrap();
            log.write(vec![meta(Record::Vote { partition: 0, vote })])
                .await
                .unwrap();
            log.write(vec![meta(Record::Committed {
                partition: 0,
                committed: Some(id(1, 190)),
            })])
            .await
            .unwrap();
            // Written ahead of the next write, not on its own.
            log.set_committed(1, Some(id(1, 170)));
            assert_eq!(log.meta(1).committed, Some(id(1, 170)));
            // Replace the tail of partition 1 with a newer term.
            log.write(vec![meta(Record::Truncate {
                partition: 1,
                from: 181,
            })])
            .await
            .unwrap();
            append(&log, 1, 2, 181..186).await;
            let before = log.segments();
            assert!(before > 5, "small segments roll: {before}");
            // Partition 0 alone purged: partition 1 still pins every
            // segment.
            log.write(vec![meta(Record::Purge {
                partition: 0,
                upto: id(1, 150),
            })])
            .await
            .unwrap();
            assert_eq!(log.segments(), before);
            log.write(vec![meta(Record::Purge {
                partition: 1,
                upto: id(1, 150),
            })])
            .await
            .unwrap();
            assert!(log.segments() < before, "purged segments are deleted");
            assert_eq!(log.usage().pinning(1000), Some(vec![]));
            let pins = log.usage().pinning(1).unwrap();
            assert!(
                !pins.is_empty() && pins.iter().all(|(_, max)| *max > 150),
                "{pins:?}"
            );
        }
        let log = open(&dir, 512).unwrap();
        let usage = log.usage();
        let m0 = log.meta(0);
        assert_eq!(m0.vote, Some(vote));
        assert_eq!(m0.committed, Some(id(1, 190)));
        assert_eq!(m0.purged, Some(id(1, 150)));
        assert_eq!(m0.last, Some(id(1, 200)));
        assert_eq!(
            read(&log, 0, 0..1000),
            (151..=200).map(|i| id(1, i)).collect::<Vec<_>>()
        );
        let m1 = log.meta(1);
        assert_eq!(m1.vote, None);
        assert_eq!(m1.committed, Some(id(1, 170)));
        assert_eq!(m1.last, Some(id(2, 185)));
        let mut want: Vec<LogId> = (151..=180).map(|i| id(1, i)).collect();
        want.extend((181..=185).map(|i| id(2, i)));
        assert_eq!(read(&log, 1, 0..1000), want);
        drop(log);
        assert_eq!(usage.pinning(0), None, "a closed log reports nothing");
    }

    #[tokio::test]
    async fn a_write_cut_short_at_the_end_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        ten_entries(&dir).await;
        let seg = segment_path(&dir, 1);
        let mut bytes = std::fs::read(&seg).unwrap();
        let good = records_end(&bytes) as u64;
        // Half of the next frame, as a crash during its write leaves it.
        let next = Framed::entry(0, &entry(1, 11)).unwrap();
        bytes.truncate(good as usize);
        bytes.extend_from_slice(&next.frame[..next.len() / 2]);
        std::fs::write(&seg, &bytes).unwrap();

        let log = open(&dir, SEGMENT_BYTES).unwrap();
        assert_eq!(log.meta(0).last, Some(id(1, 10)));
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), good);
        append(&log, 0, 1, 11..12).await;
        assert_eq!(read(&log, 0, 1..100).len(), 11);
    }

    #[tokio::test]
    async fn a_last_batch_torn_out_of_order_is_cut_at_its_first_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        ten_entries(&dir).await;
        // The last batch, as a crash during its sync can leave it: its
        // second frame never reached the disk (zeros), its third did.
        let seg = segment_path(&dir, 1);
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes.truncate(records_end(&bytes));
        bytes.extend_from_slice(&batch_marker());
        let frames: Vec<Framed> = (11..14)
            .map(|i| Framed::entry(0, &entry(1, i)).unwrap())
            .collect();
        bytes.extend_from_slice(&frames[0].frame);
        let hole = bytes.len();
        bytes.extend(std::iter::repeat_n(0u8, frames[1].len()));
        bytes.extend_from_slice(&frames[2].frame);
        std::fs::write(&seg, &bytes).unwrap();

        let log = open(&dir, SEGMENT_BYTES).unwrap();
        assert_eq!(log.meta(0).last, Some(id(1, 11)), "cut at the hole");
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), hole as u64);
    }

    #[tokio::test]
    async fn damage_before_the_end_is_refused_with_the_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        {
            let log = open(&dir, 1024).unwrap();
            append(&log, 0, 1, 1..100).await;
            append(&log, 0, 1, 100..200).await;
            assert!(log.segments() >= 2);
        }
        let seg = segment_path(&dir, 1);
        let mut bytes = std::fs::read(&seg).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&seg, &bytes).unwrap();
        let err = open(&dir, 1024).err().expect("damaged log refused");
        let text = err.to_string();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{text}");
        assert!(text.contains("segment 1"), "{text}");
        // Refusing wrote nothing.
        assert_eq!(std::fs::read(&seg).unwrap(), bytes);
    }

    #[tokio::test]
    async fn damage_inside_the_newest_segment_is_refused_not_cut_off() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        {
            let log = open(&dir, SEGMENT_BYTES).unwrap();
            for i in 0..10 {
                append(&log, 0, 1, i * 10 + 1..i * 10 + 11).await;
            }
        }
        let seg = segment_path(&dir, 1);
        let mut bytes = std::fs::read(&seg).unwrap();
        let mid = records_end(&bytes) / 2;
        bytes[mid] ^= 0x01;
        std::fs::write(&seg, &bytes).unwrap();
        let err = open(&dir, SEGMENT_BYTES)
            .err()
            .expect("damaged log refused");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert_eq!(std::fs::read(&seg).unwrap(), bytes, "nothing cut off");
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_segment_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(segment_path(&dir, 1), b"definitely not a raft log").unwrap();
        let err = open(&dir, SEGMENT_BYTES).err().expect("refused");
        assert!(err.to_string().contains("bad magic"), "{err}");
    }
}
