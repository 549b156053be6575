//! The node's Raft log: every partition's entries, votes, commit points,
//! truncations and purges as records appended to segment files.
//!
//! An acknowledged append costs one write of the new records and one
//! `fdatasync`, shared by everything queued at the time (group commit
//! across partitions), instead of a copy-on-write commit of a B-tree that
//! rewrote about 25 pages whatever it held (docs/performance.md). redb
//! keeps only the state machine.
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
//!
//! Files: [`format`] the record frame, [`index`] where each entry is (the
//! in-memory state replay rebuilds), [`writer`] the group-committed
//! writes and segment rolls, [`replay`] reading the segments back at
//! open.

mod format;
mod index;
mod replay;
mod writer;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use redb::StorageBackend;
use tokio::sync::{mpsc, oneshot};

use super::log_dir::LogDir;
use super::{tables, Halt, StoreError, WriterMode};
use crate::storage::types::{Entry, LogId, Vote};

use format::{parse, Parsed};
pub use format::{Framed, Record, MAGIC, MAGIC_V1, SEGMENT_HEADER};
use index::{Loc, State};
use replay::replay;
pub use writer::ZERO_FILL_BYTES;
use writer::{task_loop, write_batch, writer_loop, Job, QUEUE_CAPACITY};

/// A segment is closed and a new one started once it holds this much.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

struct Shared {
    dir: Box<dyn LogDir>,
    state: Mutex<State>,
    /// Told when a failed write or sync stops the log for good.
    halt: Halt,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
        #[allow(dead_code)] Arc<crate::storage::writer::JoinOnDrop>,
    ),
    Inline,
    /// A task of the current runtime runs the writer thread's loop
    /// ([`WriterMode::Task`], the simulator's production writer).
    Task(mpsc::Sender<Job>),
}

impl RaftLog {
    /// Opens the log in `dir`: replays its segments, cuts off a write a
    /// crash interrupted at the end of the newest one, and marks the
    /// partitions whose synced records are damaged (see
    /// [`RaftLog::damaged`]): their logs are cut back to the intact
    /// prefix, durably, before anything else is written. `applied` is each
    /// partition's last applied index as the state machine durably holds
    /// it. A segment that is not one of this log, or of format 1, is
    /// refused. A failed write or sync later is also reported to `halt`.
    pub fn open(
        dir: Box<dyn LogDir>,
        mode: WriterMode,
        applied: &BTreeMap<u32, u64>,
        halt: Halt,
    ) -> Result<RaftLog, StoreError> {
        let state = replay(dir.as_ref(), applied)?;
        let shared = Arc::new(Shared {
            dir,
            state: Mutex::new(state),
            halt,
        });
        record_damage(&shared, applied)?;
        let writer = match mode {
            WriterMode::Inline => Writer::Inline,
            WriterMode::Task => {
                let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
                tokio::spawn(task_loop(Arc::clone(&shared), rx));
                Writer::Task(tx)
            }
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
                Writer::Thread(
                    tx,
                    Arc::new(crate::storage::writer::JoinOnDrop::new(handle)),
                )
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
            Writer::Thread(tx, _) | Writer::Task(tx) => {
                tx.send(job).await.map_err(|_| StoreError::WriterStopped)?
            }
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
    ///
    /// A damaged partition is repaired once its commit point reaches the
    /// highest index it held: openraft commits on a follower only up to
    /// what its log shares with the leader's, so everything the damaged
    /// log held has then been replaced by committed entries.
    pub fn set_committed(&self, partition: u32, committed: Option<LogId>) {
        let mut state = lock(&self.shared.state);
        let p = state.partitions.entry(partition).or_default();
        p.committed = committed;
        let repaired = p
            .damage
            .is_some_and(|d| committed.is_some_and(|c| c.index >= d.until));
        if repaired {
            p.damage = None;
            state.unsaved_repaired.push(partition);
            tracing::info!(
                "raft log: partition {partition} is repaired (committed up to {})",
                committed.map_or(0, |c| c.index)
            );
            metrics::gauge!(crate::metrics::RAFT_LOG_DAMAGED_PARTITIONS)
                .set(damaged_count(&state) as f64);
        }
        state.unsaved_committed.insert(partition, committed);
    }

    /// Marks `partition`'s damage repaired by other means than its commit
    /// point: its rejoin ended (`partition::rejoin`), so the leader has
    /// replaced its log and a membership after the demotion made it a
    /// voter again. Without this a damaged log that held an uncommitted
    /// tail longer than its leader's log would refuse reads until that
    /// many new entries arrived. Durable ahead of the next write.
    pub fn mark_repaired(&self, partition: u32) {
        let mut state = lock(&self.shared.state);
        let Some(p) = state.partitions.get_mut(&partition) else {
            return;
        };
        if p.damage.take().is_some() {
            state.unsaved_repaired.push(partition);
            tracing::info!("raft log: partition {partition} is repaired (rejoined)");
            metrics::gauge!(crate::metrics::RAFT_LOG_DAMAGED_PARTITIONS)
                .set(damaged_count(&state) as f64);
        }
    }

    /// The partitions whose log replay found damaged in synced records
    /// and that are not repaired yet, each with the first index that may
    /// be lost. Such a partition must not vote, campaign or serve reads:
    /// its log lacks entries it acknowledged.
    pub fn damaged(&self) -> Vec<(u32, u64)> {
        let state = lock(&self.shared.state);
        state
            .partitions
            .iter()
            .filter_map(|(id, p)| p.damage.map(|d| (*id, d.from)))
            .collect()
    }

    /// Whether `partition` is damaged and not repaired yet.
    pub fn is_damaged(&self, partition: u32) -> bool {
        let state = lock(&self.shared.state);
        state
            .partitions
            .get(&partition)
            .is_some_and(|p| p.damage.is_some())
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

fn damaged_count(state: &State) -> usize {
    state
        .partitions
        .values()
        .filter(|p| p.damage.is_some())
        .count()
}

/// Makes the damage replay found and no record names yet durable: per
/// partition a `Damaged` record (so that a restart before the repair still
/// knows), a `Truncate` from the first lost index (the entries after a
/// hole are no log) and a cleared commit point (openraft would otherwise
/// re-apply entries the log no longer has; it takes the state machine's
/// applied index instead). Written and synced before the writer starts.
fn record_damage(shared: &Shared, applied: &BTreeMap<u32, u64>) -> Result<(), StoreError> {
    let mut records = Vec::new();
    {
        let mut state = lock(&shared.state);
        for (&partition, p) in &mut state.partitions {
            let Some(d) = &mut p.damage else { continue };
            if d.recorded {
                continue;
            }
            let until = [
                d.until,
                p.seen_max,
                applied.get(&partition).copied().unwrap_or(0),
                p.committed.map_or(0, |c| c.index),
            ]
            .into_iter()
            .max()
            .unwrap_or(0);
            tracing::error!(
                "raft log: partition {partition} lost synced entries from index {}: it will \
                 not vote or serve reads until its log is repaired from its leader up to \
                 index {until}",
                d.from
            );
            records.push(Record::Damaged {
                partition,
                from: d.from,
                until,
            });
            records.push(Record::Truncate {
                partition,
                from: d.from,
            });
            records.push(Record::Committed {
                partition,
                committed: None,
            });
        }
        metrics::gauge!(crate::metrics::RAFT_LOG_DAMAGED_PARTITIONS)
            .set(damaged_count(&state) as f64);
    }
    if records.is_empty() {
        return Ok(());
    }
    let framed = records
        .into_iter()
        .map(Framed::meta)
        .collect::<Result<Vec<_>, _>>()?;
    let (done, mut rx) = oneshot::channel();
    write_batch(
        shared,
        vec![Job {
            records: framed,
            done,
        }],
    );
    rx.try_recv().map_err(|_| StoreError::WriterStopped)?
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

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::format::batch_marker;
    use super::*;
    use crate::storage::FsLogDir;

    fn open(dir: &std::path::Path, segment_bytes: u64) -> Result<RaftLog, StoreError> {
        let fs = FsLogDir::create(dir, segment_bytes).unwrap();
        RaftLog::open(
            Box::new(fs),
            WriterMode::Thread,
            &BTreeMap::new(),
            Halt::default(),
        )
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
        let mut pos = SEGMENT_HEADER;
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
        // Every partition it held is damaged from the end of its records.
        let log = open(&dir, 1024).unwrap();
        assert_eq!(log.damaged().len(), 1, "zeros in an older segment");
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

    /// Position and length of the frame of entry `index` of `partition`
    /// in a segment's bytes.
    fn frame_of(bytes: &[u8], partition: u32, index: u64) -> (usize, usize) {
        let mut pos = SEGMENT_HEADER;
        loop {
            match parse(&bytes[pos..]) {
                Parsed::Record(
                    Record::Entry {
                        partition: p,
                        log_id,
                    },
                    _,
                    len,
                ) if p == partition && log_id.index == index => return (pos, len),
                Parsed::Record(_, _, len) => pos += len,
                other => panic!("entry {partition}/{index} not found: {other:?}"),
            }
        }
    }

    /// Flips the last byte (in the body) of entry `index` of partition 0
    /// in segment `seq`.
    /// Returns the segment's bytes after the flip and where it is.
    fn flip_entry(dir: &std::path::Path, seq: u64, index: u64) -> (Vec<u8>, usize) {
        let seg = segment_path(dir, seq);
        let mut bytes = std::fs::read(&seg).unwrap();
        let (pos, len) = frame_of(&bytes, 0, index);
        bytes[pos + len - 1] ^= 0x01;
        std::fs::write(&seg, &bytes).unwrap();
        (bytes, pos + len - 1)
    }

    #[tokio::test]
    async fn a_flip_in_a_synced_batch_marks_the_partition_damaged_not_cut() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        {
            let log = open(&dir, SEGMENT_BYTES).unwrap();
            for i in 0..10 {
                append(&log, 0, 1, i * 10 + 1..i * 10 + 11).await;
                append(&log, 1, 1, i * 10 + 1..i * 10 + 11).await;
            }
        }
        // Entry 35 sits in the middle of the log: later batches prove its
        // batch was synced.
        let (damaged, flipped) = flip_entry(&dir, 1, 35);
        let log = open(&dir, SEGMENT_BYTES).unwrap();
        assert_eq!(log.damaged(), vec![(0, 35)]);
        assert!(log.is_damaged(0) && !log.is_damaged(1));
        assert_eq!(
            log.meta(0).last,
            Some(id(1, 34)),
            "cut back to the intact prefix"
        );
        assert_eq!(log.meta(0).committed, None);
        assert_eq!(read(&log, 1, 1..1000).len(), 100, "partition 1 is whole");
        let seg = std::fs::read(segment_path(&dir, 1)).unwrap();
        assert!(seg[..=flipped] == damaged[..=flipped], "nothing cut off");
        assert!(seg.len() >= damaged.len());
        drop(log);

        // Still damaged after another restart, before any repair.
        let log = open(&dir, SEGMENT_BYTES).unwrap();
        assert_eq!(log.damaged(), vec![(0, 35)]);
        // The leader's entries replace the lost ones; the commit point
        // reaching the highest index the log held repairs it.
        append(&log, 0, 2, 35..101).await;
        log.set_committed(0, Some(id(2, 99)));
        assert!(log.is_damaged(0), "not yet past index 100");
        log.set_committed(0, Some(id(2, 100)));
        assert!(log.damaged().is_empty());
        drop(log);
        let log = open(&dir, SEGMENT_BYTES).unwrap();
        assert!(log.damaged().is_empty(), "the repair is durable");
        let got = read(&log, 0, 1..1000);
        assert_eq!(got.len(), 100);
        assert_eq!(got[34], id(2, 35));
    }

    #[tokio::test]
    async fn a_flip_in_the_final_batch_of_a_cleanly_closed_log_is_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        // One batch, then the closing marker of a clean stop.
        ten_entries(&dir).await;
        flip_entry(&dir, 1, 7);
        let log = open(&dir, SEGMENT_BYTES).unwrap();
        assert_eq!(log.damaged(), vec![(0, 7)]);
        assert_eq!(log.meta(0).last, Some(id(1, 6)));
    }

    #[tokio::test]
    async fn a_cut_tail_below_what_was_applied_is_damage_not_a_torn_write() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        ten_entries(&dir).await;
        // As a kill leaves it: no closing marker after the last batch.
        let seg = segment_path(&dir, 1);
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes.truncate(records_end(&bytes) - batch_marker().len());
        std::fs::write(&seg, &bytes).unwrap();
        let (bytes, _) = flip_entry(&dir, 1, 7);
        let with_applied = |applied: &[(u32, u64)]| {
            let fs = FsLogDir::create(&dir, SEGMENT_BYTES).unwrap();
            RaftLog::open(
                Box::new(fs),
                WriterMode::Thread,
                &applied.iter().copied().collect(),
                Halt::default(),
            )
        };
        // Nothing applied past the cut: a torn write, cut off.
        std::fs::write(&seg, &bytes).unwrap();
        let log = with_applied(&[(0, 5)]).unwrap();
        assert!(log.damaged().is_empty());
        assert_eq!(log.meta(0).last, Some(id(1, 6)));
        drop(log);
        // The state machine durably applied entry 9: the batch was synced.
        std::fs::write(&seg, &bytes).unwrap();
        let log = with_applied(&[(0, 9)]).unwrap();
        assert_eq!(log.damaged(), vec![(0, 7)]);
    }

    #[tokio::test]
    async fn damage_in_an_older_segment_marks_its_partitions() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        {
            let log = open(&dir, 1024).unwrap();
            append(&log, 0, 1, 1..100).await;
            append(&log, 0, 1, 100..200).await;
            assert!(log.segments() >= 2);
        }
        // A length field: the rest of the segment is unreadable.
        let seg = segment_path(&dir, 1);
        let mut bytes = std::fs::read(&seg).unwrap();
        let (pos, _) = frame_of(&bytes, 0, 3);
        bytes[pos + 1] ^= 0xff;
        std::fs::write(&seg, &bytes).unwrap();
        let log = open(&dir, 1024).unwrap();
        assert_eq!(log.damaged(), vec![(0, 3)]);
        assert_eq!(log.meta(0).last, Some(id(1, 2)));
    }

    #[tokio::test]
    async fn a_damaged_segment_header_or_an_old_format_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        ten_entries(&dir).await;
        let seg = segment_path(&dir, 1);
        let good = std::fs::read(&seg).unwrap();
        for i in [3, 10, 18] {
            let mut bad = good.clone();
            bad[i] ^= 0x02;
            std::fs::write(&seg, &bad).unwrap();
            let err = open(&dir, SEGMENT_BYTES).err().expect("refused");
            assert!(
                matches!(err, StoreError::Corrupt { .. }),
                "flip at {i}: {err}"
            );
            assert!(err.to_string().contains("segment 1"), "{err}");
            assert_eq!(std::fs::read(&seg).unwrap(), bad, "refusing wrote nothing");
        }
        let mut old = good.clone();
        old[..8].copy_from_slice(MAGIC_V1);
        std::fs::write(&seg, &old).unwrap();
        let err = open(&dir, SEGMENT_BYTES).err().expect("refused");
        assert!(matches!(err, StoreError::Incompatible { .. }), "{err}");
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
