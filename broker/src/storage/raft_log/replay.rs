//! Opening: replaying every segment into the index. [`scan`] is the pure
//! part, table-tested: what one segment's bytes hold, where its records
//! end and which of its frames are damaged, telling a write a crash
//! interrupted (never acknowledged: cut off) from damage to synced records
//! (acknowledged data lost: the partitions it touches are marked damaged).
//! [`replay`] drives it over the directory and applies what it found.

use std::collections::BTreeMap;
use std::sync::Arc;

use redb::StorageBackend;
use tracing::{error, warn};

use super::format::{
    batch_after, check_header, parse, segment_header, Header, Parsed, Record, SEGMENT_HEADER,
};
use super::index::{Segment, State};
use super::writer::roll;
use crate::storage::log_dir::LogDir;
use crate::storage::StoreError;

/// What one segment holds, in file order.
#[derive(Debug, PartialEq)]
pub(super) enum Found {
    /// An intact record at `pos`, `len` bytes long.
    Record {
        /// The record.
        record: Record,
        /// Its frame's position in the segment.
        pos: u64,
        /// Its frame's length.
        len: usize,
    },
    /// Synced bytes `pos..end` are damaged.
    Damage {
        /// Where the damage starts.
        pos: u64,
        /// Where the next trusted frame starts.
        end: u64,
        /// What was lost.
        lost: Lost,
    },
}

/// What a damaged span held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Lost {
    /// One frame whose length and record header are intact: this record
    /// of this partition (an entry: its index) is lost.
    Record {
        /// The partition.
        partition: u32,
        /// The entry's index, if it was an entry.
        index: Option<u64>,
    },
    /// Frames whose headers are unreadable: any partition's records.
    Unknown,
}

/// How a segment's records end.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Tail {
    /// At the end of the file (`end`).
    End(u64),
    /// At `end`, followed by the zeros filled ahead (newest segment only).
    Zeros(u64),
    /// At `at`, followed by a write a crash interrupted: no intact batch
    /// marker after it proves it was synced (newest segment only).
    Torn(u64),
    /// The file is a prefix of its header: created, and a crash came
    /// before its first sync (newest segment only).
    Unsynced,
}

/// What [`scan`] found in one segment.
#[derive(Debug, PartialEq)]
pub(super) struct Scan {
    /// Records and damage, in file order.
    pub(super) found: Vec<Found>,
    /// How the records end.
    pub(super) tail: Tail,
}

/// Reads segment `seq` (`newest`: the last one, the only one a crash can
/// leave unsynced bytes in). Only a segment that is not one of this log
/// at all is an error: damage inside one is reported in the scan.
pub(super) fn scan(buf: &[u8], seq: u64, newest: bool, what: &str) -> Result<Scan, StoreError> {
    match check_header(buf, seq) {
        Header::Intact => {}
        Header::Unsynced if newest => {
            return Ok(Scan {
                found: Vec::new(),
                tail: Tail::Unsynced,
            })
        }
        Header::Version1 => {
            return Err(StoreError::Incompatible {
                what: what.into(),
                reason: "a raft log segment of format 1; this build reads format 2 \
                         (start this node from an empty data directory)"
                    .into(),
            })
        }
        Header::Unsynced => {
            return Err(StoreError::Corrupt {
                what: what.into(),
                reason: "segment shorter than its header".into(),
            })
        }
        Header::Bad(reason) => {
            return Err(StoreError::Corrupt {
                what: what.into(),
                reason,
            })
        }
    }
    let mut found = Vec::new();
    let mut pos = SEGMENT_HEADER;
    let tail = loop {
        let lost = match parse(&buf[pos..]) {
            Parsed::End => break Tail::End(pos as u64),
            Parsed::Record(record, _, len) => {
                found.push(Found::Record {
                    record,
                    pos: pos as u64,
                    len,
                });
                pos += len;
                continue;
            }
            Parsed::BadBody(record, len) => (
                Lost::Record {
                    partition: record.partition().unwrap_or(0),
                    index: match record {
                        Record::Entry { log_id, .. } => Some(log_id.index),
                        _ => None,
                    },
                },
                Some(len),
            ),
            Parsed::Bad(_) => (Lost::Unknown, None),
        };
        // The zeros filled ahead of the records (module docs).
        if newest && buf[pos..].iter().all(|b| *b == 0) {
            break Tail::Zeros(pos as u64);
        }
        let proof = batch_after(buf, pos);
        if newest && proof.is_none() {
            break Tail::Torn(pos as u64);
        }
        // Synced: a later batch proves it, or an older segment, cut back
        // to its records and synced before the next one started.
        let end = match (lost.1, proof) {
            (Some(len), _) => pos + len,
            (None, Some(next)) => next,
            (None, None) => buf.len(),
        };
        found.push(Found::Damage {
            pos: pos as u64,
            end: end as u64,
            lost: lost.0,
        });
        pos = end;
    };
    Ok(Scan { found, tail })
}

/// Rebuilds the index from the segments in `dir`. `applied` is each
/// partition's last applied index as the state machine durably holds it:
/// entries at or below it were in this node's log, so a cut-off tail that
/// leaves a partition's log below it lost synced entries (see
/// [`mark_below_applied`]). Damage found and not yet recorded in the log
/// is in `State::damage_to_record`.
pub(super) fn replay(dir: &dyn LogDir, applied: &BTreeMap<u32, u64>) -> Result<State, StoreError> {
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
    let mut cut = false;
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
        let scanned = scan(&buf, seq, seq == newest, &what())?;
        for found in &scanned.found {
            match found {
                Found::Record { record, pos, len } => state.replay(record, seq, *pos, *len),
                Found::Damage { pos, end, lost } => {
                    error!(
                        "{}: bytes {pos}..{end} are damaged, and they were synced ({lost:?}): \
                         the partitions they held will not vote or serve reads until repaired",
                        what()
                    );
                    metrics::counter!(crate::metrics::RAFT_LOG_DAMAGE_TOTAL).increment(1);
                    state.found_damage(*lost);
                }
            }
        }
        let (records_end, file_end) = match scanned.tail {
            Tail::End(end) => (end, len),
            Tail::Zeros(end) => (end, len),
            Tail::Torn(at) => {
                warn!(
                    "{}: cutting off {} bytes at offset {at}: a write the last stop \
                     interrupted",
                    what(),
                    len - at
                );
                file.set_len(at)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| io_err(what(), e))?;
                cut = true;
                (at, at)
            }
            Tail::Unsynced => {
                let header = segment_header(seq);
                file.set_len(0)
                    .and_then(|()| file.write(0, &header))
                    .and_then(|()| file.sync_data())
                    .map_err(|e| io_err(what(), e))?;
                (header.len() as u64, header.len() as u64)
            }
        };
        state.active_len = records_end;
        state.active_filled = file_end;
    }
    if cut {
        mark_below_applied(&mut state, applied);
    }
    Ok(state)
}

/// After a torn tail was cut: a partition whose log now ends below what
/// its state machine durably applied lost entries it held, so the cut-off
/// batch was synced, and damaged, not torn.
///
/// Not every such case is damage: openraft 0.9 lets a follower apply an
/// entry it has accepted before its log write is synced, and a snapshot
/// install is durable a moment before the log is purged up to it. Both
/// are marked too: the partition then waits to be repaired from its
/// leader, which costs availability, never safety.
pub(super) fn mark_below_applied(state: &mut State, applied: &BTreeMap<u32, u64>) {
    for (&partition, &index) in applied {
        let p = state.partitions.entry(partition).or_default();
        let next = p.next_index();
        if index >= next {
            warn!(
                "raft log: partition {partition} applied entry {index} but its log ends \
                 before {next}: the cut-off write was synced"
            );
            p.found_damage(next);
            p.seen_max = p.seen_max.max(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::super::format::{batch_marker, Framed};
    use super::*;
    use crate::storage::types::{Entry, LogId};

    fn entry(partition: u32, index: u64) -> Framed {
        let e = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        };
        Framed::entry(partition, &e).unwrap()
    }

    /// A segment: header, then each batch as a marker and its entries
    /// `(partition, index)`.
    fn segment(batches: &[&[(u32, u64)]]) -> (Vec<u8>, Vec<usize>) {
        let mut out = segment_header(1).to_vec();
        let mut starts = Vec::new();
        for batch in batches {
            starts.push(out.len());
            out.extend_from_slice(&batch_marker());
            for (p, i) in *batch {
                out.extend_from_slice(entry(*p, *i).bytes());
            }
        }
        (out, starts)
    }

    /// What a scan found, in short: `E p/i` an entry, `B` a batch
    /// marker, `D p/i` a lost entry, `D ?` unknown damage; then the tail.
    fn check(buf: &[u8], newest: bool, want: &str) {
        let scan = scan(buf, 1, newest, "test").unwrap();
        let mut got: Vec<String> = scan
            .found
            .iter()
            .map(|f| match f {
                Found::Record {
                    record: Record::Batch,
                    ..
                } => "B".to_string(),
                Found::Record {
                    record: Record::Entry { partition, log_id },
                    ..
                } => format!("E{partition}/{}", log_id.index),
                Found::Record { record, .. } => format!("{record:?}"),
                Found::Damage {
                    lost: Lost::Record { partition, index },
                    ..
                } => format!("D{partition}/{}", index.unwrap_or(u64::MAX)),
                Found::Damage {
                    lost: Lost::Unknown,
                    ..
                } => "D?".to_string(),
            })
            .collect();
        got.push(match scan.tail {
            Tail::End(_) => "end".into(),
            Tail::Zeros(_) => "zeros".into(),
            Tail::Torn(_) => "torn".into(),
            Tail::Unsynced => "unsynced".into(),
        });
        assert_eq!(got.join(" "), want);
    }

    /// Position and length of the `n`th frame after `start`.
    fn frame_at(buf: &[u8], start: usize, n: usize) -> (usize, usize) {
        let mut pos = start;
        for _ in 0..n {
            let Parsed::Record(_, _, len) = parse(&buf[pos..]) else {
                panic!("no frame at {pos}")
            };
            pos += len;
        }
        let Parsed::Record(_, _, len) = parse(&buf[pos..]) else {
            panic!("no frame at {pos}")
        };
        (pos, len)
    }

    /// The last byte of the `n`th frame after `start` (in its body).
    fn body_of(buf: &[u8], start: usize, n: usize) -> usize {
        let (pos, len) = frame_at(buf, start, n);
        pos + len - 1
    }

    #[test]
    fn scans() {
        let (good, starts) = segment(&[&[(0, 1), (1, 1)], &[(0, 2), (1, 2)], &[(0, 3)]]);
        let all = "B E0/1 E1/1 B E0/2 E1/2 B E0/3";
        check(&good, true, &format!("{all} end"));
        check(&good, false, &format!("{all} end"));

        let mut zeros = good.clone();
        zeros.resize(good.len() + 4096, 0);
        check(&zeros, true, &format!("{all} zeros"));

        // A flip in an entry's body: that entry is lost, nothing else.
        let mut body = good.clone();
        body[body_of(&good, starts[1], 2)] ^= 0x01;
        check(&body, true, "B E0/1 E1/1 B E0/2 D1/2 B E0/3 end");

        // The same flip in the final batch: nothing after it proves the
        // batch was synced, so in the newest segment it is a torn write.
        let mut last = good.clone();
        last[body_of(&good, starts[2], 1)] ^= 0x01;
        check(&last, true, "B E0/1 E1/1 B E0/2 E1/2 B torn");
        // ... and damage in an older one (synced before the next began).
        check(&last, false, "B E0/1 E1/1 B E0/2 E1/2 B D0/3 end");
        // A clean stop's closing marker proves the final batch synced.
        let mut closed = last.clone();
        closed.extend_from_slice(&batch_marker());
        check(&closed, true, "B E0/1 E1/1 B E0/2 E1/2 B D0/3 B end");

        // A flip in a length: the rest of the batch is unknown, skipped
        // to the next marker.
        let mut len = good.clone();
        len[starts[1] + batch_marker().len() + 1] ^= 0x40;
        check(&len, true, "B E0/1 E1/1 B D? B E0/3 end");

        // A torn last batch: its second frame never reached the disk.
        let (two, starts2) = segment(&[&[(0, 1)], &[(0, 2), (0, 3), (0, 4)]]);
        let mut torn = two.clone();
        let (hole, hole_len) = frame_at(&two, starts2[1], 2);
        torn[hole..hole + hole_len].fill(0);
        check(&torn, true, "B E0/1 B E0/2 torn");
        // Cut short at the end.
        check(&two[..two.len() - 3], true, "B E0/1 B E0/2 E0/3 torn");
        check(&two[..two.len() - 3], false, "B E0/1 B E0/2 E0/3 D? end");
        // Zeros in an older segment are damage, not the end.
        check(&zeros, false, &format!("{all} D? end"));

        check(&segment_header(1)[..3], true, "unsynced");
    }

    #[test]
    fn segment_headers_are_checked() {
        let (good, _) = segment(&[&[(0, 1)]]);
        let mut v1 = good.clone();
        v1[..8].copy_from_slice(b"AFRLOG01");
        assert!(matches!(
            scan(&v1, 1, true, "s"),
            Err(StoreError::Incompatible { .. })
        ));
        for i in [0, 9, 17] {
            let mut bad = good.clone();
            bad[i] ^= 0x04;
            assert!(
                matches!(scan(&bad, 1, true, "s"), Err(StoreError::Corrupt { .. })),
                "flip at {i}"
            );
        }
        assert!(matches!(
            scan(&good, 2, true, "s"),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            scan(&good[..5], 1, false, "s"),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
