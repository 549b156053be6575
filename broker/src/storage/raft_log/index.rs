//! The in-memory index of the log: where each partition's entries are,
//! its vote, commit point and purge point, and which segments hold what.

use std::collections::BTreeMap;
use std::sync::Arc;

use redb::StorageBackend;

use super::format::Record;
use super::replay::Lost;
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
    /// Damage to synced records found by replay, until repaired.
    pub(super) damage: Option<Damage>,
    /// Highest entry index any record of this partition named, purged or
    /// truncated ones included: how far a damaged partition must be
    /// repaired.
    pub(super) seen_max: u64,
}

/// A partition's damaged log (see [`Record::Damaged`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Damage {
    /// First index that may be lost.
    pub(super) from: u64,
    /// Repaired once the commit point reaches it.
    pub(super) until: u64,
    /// Whether a `Damaged` record says so (after it in the log); replay
    /// writes one for damage it finds that none records yet.
    pub(super) recorded: bool,
}

impl PartitionLog {
    /// The index the next entry would have.
    pub(super) fn next_index(&self) -> u64 {
        match (self.entries.keys().next_back(), self.purged) {
            (Some(last), _) => last + 1,
            (None, Some(purged)) => purged.index + 1,
            (None, None) => 0,
        }
    }

    /// Marks the log lost from `from` on, as replay found it.
    pub(super) fn found_damage(&mut self, from: u64) {
        match &mut self.damage {
            Some(d) if d.from <= from => {}
            Some(d) => {
                d.from = from;
                d.recorded = false;
            }
            None => {
                self.damage = Some(Damage {
                    from,
                    until: 0,
                    recorded: false,
                })
            }
        }
    }
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
    /// `Repaired` records not written yet: written ahead of the next
    /// write like commit points (one lost in a crash only keeps the
    /// partition marked until its commit point passes again).
    pub(super) unsaved_repaired: Vec<u32>,
    /// Whether replay met damage it could not attribute: a partition
    /// first seen after it may have lost its earlier records there.
    pub(super) unattributed: bool,
}

impl State {
    pub(super) fn apply(&mut self, record: &Record, segment: u64, pos: u64, len: usize) {
        match *record {
            Record::Entry { partition, log_id } => {
                let p = self.partitions.entry(partition).or_default();
                p.seen_max = p.seen_max.max(log_id.index);
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
            Record::Damaged {
                partition,
                from,
                until,
            } => {
                let p = self.partitions.entry(partition).or_default();
                let d = p.damage.get_or_insert(Damage {
                    from,
                    until,
                    recorded: true,
                });
                if from <= d.from {
                    d.recorded = true;
                }
                d.from = d.from.min(from);
                d.until = d.until.max(until);
            }
            Record::Repaired { partition } => {
                self.partitions.entry(partition).or_default().damage = None;
            }
            Record::Purge { partition, upto } => {
                let p = self.partitions.entry(partition).or_default();
                p.seen_max = p.seen_max.max(upto.index);
                if p.purged.is_some_and(|purged| purged.index >= upto.index) {
                    return;
                }
                p.entries = p.entries.split_off(&(upto.index + 1));
                p.purged = Some(upto);
            }
        }
    }

    /// Marks what replay found lost in synced records.
    pub(super) fn found_damage(&mut self, lost: Lost) {
        match lost {
            Lost::Record { partition, index } => {
                let p = self.partitions.entry(partition).or_default();
                let from = index.unwrap_or_else(|| p.next_index());
                p.found_damage(from);
            }
            Lost::Unknown => {
                for p in self.partitions.values_mut() {
                    let from = p.next_index();
                    p.found_damage(from);
                }
                self.unattributed = true;
            }
        }
    }

    /// Replays `record` found intact at `pos` in `segment`.
    pub(super) fn replay(&mut self, record: &Record, segment: u64, pos: u64, len: usize) {
        if let Some(partition) = record.partition() {
            if self.unattributed && !self.partitions.contains_key(&partition) {
                self.partitions
                    .entry(partition)
                    .or_default()
                    .found_damage(0);
            }
        }
        self.apply(record, segment, pos, len);
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
            if let Some(d) = p.damage {
                out.push(Record::Damaged {
                    partition,
                    from: d.from,
                    until: d.until,
                });
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
