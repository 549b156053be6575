//! The in-memory index of the log: where each partition's entries are,
//! its vote, commit point and purge point, and which segments hold what.

use std::collections::BTreeMap;
use std::sync::Arc;

use redb::StorageBackend;

use super::format::Record;
use crate::storage::types::{LogId, Vote};
use crate::storage::StoreError;

/// Where an entry's frame is.
#[derive(Clone, Copy, Debug)]
pub(super) struct Loc {
    pub(super) segment: u64,
    pub(super) pos: u64,
    pub(super) len: u32,
    pub(super) log_id: LogId,
}

/// One partition's part of the log, as replayed and kept up to date.
#[derive(Default)]
pub(super) struct PartitionLog {
    pub(super) entries: BTreeMap<u64, Loc>,
    pub(super) vote: Option<Vote>,
    pub(super) committed: Option<LogId>,
    pub(super) purged: Option<LogId>,
}

pub(super) struct Segment {
    pub(super) file: Arc<dyn StorageBackend>,
    /// Highest entry index per partition written to this segment.
    pub(super) max_index: BTreeMap<u32, u64>,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) partitions: BTreeMap<u32, PartitionLog>,
    pub(super) segments: BTreeMap<u64, Segment>,
    pub(super) active: u64,
    /// End of the active segment's records.
    pub(super) active_len: u64,
    /// End of the zeros written after them (at least `active_len`).
    pub(super) active_filled: u64,
    /// Why writing stopped, after a failed write or sync.
    pub(super) failed: Option<StoreError>,
    /// Commit points set since the last write, already in `partitions`:
    /// written ahead of the next write's records instead of in a write of
    /// their own (openraft saves one at every commit of every partition
    /// and waits for it).
    pub(super) unsaved_committed: BTreeMap<u32, Option<LogId>>,
}

impl State {
    pub(super) fn apply(&mut self, record: &Record, segment: u64, pos: u64, len: usize) {
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
    pub(super) fn metadata(&self) -> Vec<Record> {
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
    pub(super) fn purgeable(&self) -> Vec<u64> {
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
