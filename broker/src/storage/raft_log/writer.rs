//! Writing: jobs group-committed with one write and one sync, the zeros
//! filled ahead of the records, and rolling to a new segment.

use std::collections::BTreeMap;
use std::sync::Arc;

use redb::StorageBackend;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use super::format::{batch_marker, segment_header, Framed, Record};
use super::index::{Segment, State};
use super::{lock, Shared};
use crate::metrics::{
    RAFT_LOG_SEGMENTS, RAFT_LOG_WRITES_TOTAL, RAFT_LOG_WRITE_RECORDS, RAFT_LOG_WRITE_SECONDS,
};
use crate::storage::log_dir::LogDir;
use crate::storage::StoreError;

/// How far ahead of its records the active segment is zero-filled (at
/// most the segment size).
pub const ZERO_FILL_BYTES: u64 = 1024 * 1024;

/// Jobs waiting for the writer thread (back-pressure when the disk is
/// slow).
pub(super) const QUEUE_CAPACITY: usize = 4096;
/// Most jobs written with one sync.
const MAX_JOBS_PER_WRITE: usize = 1024;

pub(super) struct Job {
    pub(super) records: Vec<Framed>,
    pub(super) done: oneshot::Sender<Result<(), StoreError>>,
}

pub(super) fn writer_loop(shared: &Shared, mut rx: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_JOBS_PER_WRITE);
    while crate::storage::writer::next_batch(&mut rx, &mut batch, MAX_JOBS_PER_WRITE) {
        write_batch(shared, std::mem::take(&mut batch));
    }
    close(shared);
}

/// At a clean stop: one last batch marker (with the commit points held
/// back), synced. Replay takes an intact marker as proof that everything
/// before it was synced, so damage to the final batch of a log closed
/// cleanly is found as damage rather than cut off as a torn write.
pub(super) fn close(shared: &Shared) {
    if lock(&shared.state).failed.is_none() {
        if let Err(e) = write_records(shared, &[]) {
            warn!("raft log: cannot write the closing marker: {e}");
        }
    }
}

/// [`writer_loop`] in a task ([`crate::storage::WriterMode::Task`]): the
/// same group commit, waiting asynchronously.
pub(super) async fn task_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_JOBS_PER_WRITE);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        crate::storage::writer::take_queued(&mut rx, &mut batch, MAX_JOBS_PER_WRITE);
        write_batch(&shared, std::mem::take(&mut batch));
    }
}

/// Writes the jobs' records at the end of the active segment with one
/// write and one sync, then updates the index.
pub(super) fn write_batch(shared: &Shared, jobs: Vec<Job>) {
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
                shared.halt.halt(&e);
                return Err(e);
            }
        }
        let total: usize = jobs.iter().flat_map(|j| &j.records).map(Framed::len).sum();
        let mut buf = Vec::with_capacity(total + 32 * (1 + state.unsaved_committed.len()));
        buf.extend_from_slice(&batch_marker());
        // Not indexed again after the write: the state already holds these
        // (or newer) values.
        let held = std::mem::take(&mut state.unsaved_committed)
            .into_iter()
            .map(|(partition, committed)| Record::Committed {
                partition,
                committed,
            })
            .chain(
                std::mem::take(&mut state.unsaved_repaired)
                    .into_iter()
                    .map(|partition| Record::Repaired { partition }),
            );
        for record in held {
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
        shared.halt.halt(&e);
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
pub(super) fn roll(dir: &dyn LogDir, state: &mut State) -> std::io::Result<()> {
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
    let mut buf = segment_header(seq).to_vec();
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
