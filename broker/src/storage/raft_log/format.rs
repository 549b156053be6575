//! The segment header and the record frame (see the module documentation
//! of [`super`] and docs/storage-format.md).
//!
//! Format 2 (`AFRLOG02`): a segment starts with `magic | seq: u64 LE |
//! crc32: u32 LE` of the 16 bytes before it; a frame is `len: u32 LE |
//! head_crc: u32 LE | body_crc: u32 LE | payload`, where `head_crc` covers
//! the length and the record header and `body_crc` the body. Two checksums
//! rather than one so that damage to an entry's body (nearly all of a
//! frame's bytes) still leaves a trusted length and record header: replay
//! then knows exactly which partition and index was lost, and where the
//! next frame starts.

use openraft::RaftLogId;
use serde::{Deserialize, Serialize};

use crate::storage::types::{Entry, LogId, Vote};
use crate::storage::{tables, StoreError};

/// First bytes of every segment (format 2).
pub const MAGIC: &[u8; 8] = b"AFRLOG02";
/// The magic of format 1 (one CRC over the payload, no segment number):
/// refused as [`StoreError::Incompatible`], never misread.
pub const MAGIC_V1: &[u8; 8] = b"AFRLOG01";
/// Magic, segment number and the CRC of both.
pub const SEGMENT_HEADER: usize = 20;

/// Largest record payload accepted when reading; a length field above it
/// is damage, not a record.
const MAX_PAYLOAD: u32 = 256 * 1024 * 1024;
/// `len`, `head_crc`, `body_crc`.
pub(super) const FRAME_HEADER: usize = 12;

/// What a record says; an entry record's body is the encoded entry.
///
/// Variants are only ever appended: the variant index is on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Replay found damage to the partition's synced records: its log
    /// lost entries from `from` on, and it must not vote or serve reads
    /// until its commit point reaches `until` (then everything it ever
    /// held has been replaced by its leader's committed entries).
    Damaged {
        /// The partition.
        partition: u32,
        /// First index that may be lost.
        from: u64,
        /// Highest index the partition held or had applied.
        until: u64,
    },
    /// The partition's damage is repaired (its commit point reached the
    /// damage's `until`).
    Repaired {
        /// The partition.
        partition: u32,
    },
}

impl Record {
    /// The partition the record is about (`None` for a batch marker).
    pub fn partition(&self) -> Option<u32> {
        match *self {
            Record::Batch => None,
            Record::Entry { partition, .. }
            | Record::Vote { partition, .. }
            | Record::Committed { partition, .. }
            | Record::Truncate { partition, .. }
            | Record::Purge { partition, .. }
            | Record::Damaged { partition, .. }
            | Record::Repaired { partition } => Some(partition),
        }
    }
}

/// A record ready to write: what it says and its frame.
pub struct Framed {
    pub(super) record: Record,
    pub(super) frame: Vec<u8>,
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
        let mut head_crc = crc32fast::Hasher::new();
        head_crc.update(&len32.to_le_bytes());
        head_crc.update(&header);
        let mut frame = Vec::with_capacity(FRAME_HEADER + len);
        frame.extend_from_slice(&len32.to_le_bytes());
        frame.extend_from_slice(&head_crc.finalize().to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
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

    /// The frame's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.frame
    }
}

/// What reading one frame at a position found.
#[derive(Debug, PartialEq)]
pub(super) enum Parsed<'a> {
    /// A whole, intact record; the body and the frame's length.
    Record(Record, &'a [u8], usize),
    /// No bytes left.
    End,
    /// Length and record header intact, body damaged: the record and the
    /// frame's length are known.
    BadBody(Record, usize),
    /// Cut short, or the length or record header damaged.
    Bad(String),
}

pub(super) fn parse(buf: &[u8]) -> Parsed<'_> {
    if buf.is_empty() {
        return Parsed::End;
    }
    if buf.len() < FRAME_HEADER {
        return Parsed::Bad(format!("{} bytes, shorter than a frame header", buf.len()));
    }
    let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let (len, head_crc, body_crc) = (word(0), word(4), word(8));
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
    let (record, used) = match bincode::serde::decode_from_slice::<Record, _>(
        payload,
        bincode::config::standard(),
    ) {
        Ok(decoded) => decoded,
        Err(e) => return Parsed::Bad(format!("undecodable record header: {e}")),
    };
    let mut crc = crc32fast::Hasher::new();
    crc.update(&buf[0..4]);
    crc.update(&payload[..used]);
    if crc.finalize() != head_crc {
        return Parsed::Bad("record header checksum mismatch".into());
    }
    let body = &payload[used..];
    if crc32fast::hash(body) != body_crc {
        return Parsed::BadBody(record, end);
    }
    Parsed::Record(record, body, end)
}

/// The header of segment `seq`.
pub(super) fn segment_header(seq: u64) -> [u8; SEGMENT_HEADER] {
    let mut out = [0; SEGMENT_HEADER];
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&out[..16]);
    out[16..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// What a segment's first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Header {
    /// The header of this segment, intact.
    Intact,
    /// Shorter than a header and a prefix of it: created, then a crash
    /// came before its first sync.
    Unsynced,
    /// A segment of format 1.
    Version1,
    /// Anything else: the header is damaged, or the file is not a segment
    /// of this log (or of this position in it).
    Bad(String),
}

/// Checks the header of segment `seq` at the start of `buf`.
pub(super) fn check_header(buf: &[u8], seq: u64) -> Header {
    let want = segment_header(seq);
    if buf.len() < SEGMENT_HEADER && want.starts_with(buf) {
        return Header::Unsynced;
    }
    if buf.starts_with(MAGIC_V1) {
        return Header::Version1;
    }
    if buf.starts_with(&want) {
        return Header::Intact;
    }
    if !buf.starts_with(MAGIC) {
        return Header::Bad("not an auditflow raft log segment (bad magic)".into());
    }
    Header::Bad(format!(
        "damaged segment header (expected segment {seq}, checksum {:08x})",
        u32::from_le_bytes([want[16], want[17], want[18], want[19]])
    ))
}

/// The first position after `bad` where an intact batch marker starts,
/// if any: proof that everything before it was synced (a batch is written
/// only after the previous one was synced). Only called on a damaged
/// frame.
pub(super) fn batch_after(buf: &[u8], bad: usize) -> Option<usize> {
    let marker = batch_marker();
    (bad + 1..buf.len()).find(|&q| buf[q..].starts_with(&marker))
}

/// The frame that opens every write.
pub(super) fn batch_marker() -> Vec<u8> {
    // Cannot fail: a unit record with no body.
    Framed::meta(Record::Batch)
        .map(|f| f.frame)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_of_a_frame_is_checked() {
        let framed = Framed::meta(Record::Truncate {
            partition: 3,
            from: 77,
        })
        .unwrap();
        let good = framed.bytes().to_vec();
        assert_eq!(
            parse(&good),
            Parsed::Record(framed.record.clone(), &[][..], good.len())
        );
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            let parsed = parse(&bad);
            // The body CRC of a bodyless record is the only byte range
            // whose damage leaves the record itself trusted.
            let ok = match &parsed {
                Parsed::Bad(_) => true,
                Parsed::BadBody(r, _) => (8..12).contains(&i) && *r == framed.record,
                _ => false,
            };
            assert!(ok, "flip at {i}: {parsed:?}");
        }
    }

    #[test]
    fn the_batch_marker_is_a_fixed_frame() {
        assert_eq!(
            batch_marker(),
            [1, 0, 0, 0, 0xad, 0xde, 0x42, 0xfb, 0, 0, 0, 0, 0],
            "documented in docs/storage-format.md"
        );
    }

    #[test]
    fn segment_headers() {
        let h = segment_header(7);
        let cases: Vec<(Vec<u8>, Header)> = vec![
            (h.to_vec(), Header::Intact),
            (h[..5].to_vec(), Header::Unsynced),
            (Vec::new(), Header::Unsynced),
            (
                b"AFRLOG01\x01\x00\x00\x00\x00\x00\x00\x00".to_vec(),
                Header::Version1,
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(check_header(&bytes, 7), want, "{bytes:?}");
        }
        assert!(
            matches!(check_header(&h, 8), Header::Bad(_)),
            "wrong segment"
        );
        for i in 0..SEGMENT_HEADER {
            let mut bad = h;
            bad[i] ^= 0x01;
            assert!(
                matches!(check_header(&bad, 7), Header::Bad(_)),
                "flip at {i}"
            );
        }
    }
}
