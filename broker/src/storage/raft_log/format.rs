//! The record frame: `len: u32 LE`, `crc32: u32 LE` of the payload,
//! payload (see the module documentation of [`super`]).

use openraft::RaftLogId;
use serde::{Deserialize, Serialize};

use crate::storage::types::{Entry, LogId, Vote};
use crate::storage::{tables, StoreError};

/// First bytes of every segment.
pub const MAGIC: &[u8; 8] = b"AFRLOG01";

/// Largest record payload accepted when reading; a length field above it
/// is damage, not a record.
const MAX_PAYLOAD: u32 = 256 * 1024 * 1024;
const FRAME_HEADER: usize = 8;

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
pub(super) enum Parsed<'a> {
    /// A whole, intact record; the body and the frame's length.
    Record(Record, &'a [u8], usize),
    /// No bytes left.
    End,
    /// Cut short or damaged.
    Bad(String),
}

pub(super) fn parse(buf: &[u8]) -> Parsed<'_> {
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
pub(super) fn batch_after(buf: &[u8], bad: usize) -> Option<usize> {
    (bad + 1..buf.len()).find(|&q| matches!(parse(&buf[q..]), Parsed::Record(Record::Batch, _, _)))
}

/// The frame that opens every write.
pub(super) fn batch_marker() -> Vec<u8> {
    // Cannot fail: a unit record with no body.
    Framed::meta(Record::Batch)
        .map(|f| f.frame)
        .unwrap_or_default()
}
