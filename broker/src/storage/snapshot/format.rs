//! The record stream a snapshot travels as: what a record is, and
//! reading one back with the running digest.

use std::borrow::Cow;
use std::io::{self, Read};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::replicated::delivery::ReplayWindows;
use crate::storage::apply::PartitionHead;
use crate::storage::StoreError;

/// Version of the record stream; a snapshot of another version is refused.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// The largest record a stream may carry (an event is far smaller; the
/// header carries the destination catalog). A longer length prefix is
/// damage, and is refused before anything is allocated for it.
pub const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

/// One record of the stream. Values are the stored bytes of their tables.
#[derive(Serialize, Deserialize)]
pub(super) enum Record<'a> {
    Header {
        format: u32,
        partition: u32,
        head: PartitionHead,
        catalog: Vec<(String, String)>,
        replays: ReplayWindows,
    },
    Cursor {
        #[serde(borrow)]
        dest: Cow<'a, str>,
        next: u64,
    },
    Dlq {
        #[serde(borrow)]
        dest: Cow<'a, str>,
        offset: u64,
        #[serde(borrow, serialize_with = "as_bytes")]
        entry: Cow<'a, [u8]>,
    },
    Event {
        offset: u64,
        #[serde(borrow, serialize_with = "as_bytes")]
        stored: Cow<'a, [u8]>,
    },
    Dedup {
        #[serde(borrow)]
        id: Cow<'a, str>,
        #[serde(borrow, serialize_with = "as_bytes")]
        entry: Cow<'a, [u8]>,
    },
    End {
        records: u64,
        /// SHA-256 of every byte before this record.
        digest: [u8; 32],
    },
}

/// Writes a byte field as serde bytes rather than a sequence of `u8`:
/// the same bincode encoding (length, then the bytes), in one copy instead
/// of a call per byte. Reading borrows it back either way.
fn as_bytes<B: AsRef<[u8]>, S: serde::Serializer>(bytes: &B, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(bytes.as_ref())
}

pub(super) fn corrupt(reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what: "snapshot".into(),
        reason: reason.into(),
    }
}

pub(super) fn io_err(e: StoreError) -> io::Error {
    e.into()
}

/// A failed read of the stream: the reader's own storage error if it
/// carries one (a failing disk under the staged rows is not damage to the
/// snapshot), damage otherwise.
fn read_err(e: io::Error, context: &str) -> StoreError {
    if e.get_ref().is_some_and(|inner| inner.is::<StoreError>()) {
        if let Some(Ok(inner)) = e.into_inner().map(|inner| inner.downcast::<StoreError>()) {
            return *inner;
        }
        return corrupt(context);
    }
    corrupt(format!("{context}{e}"))
}

/// Reads the next record and adds its bytes to `digest`; `None` at a clean
/// end of the stream. With the record, the digest of the bytes before it.
pub(super) fn next_record<'b>(
    reader: &mut dyn Read,
    scratch: &'b mut Vec<u8>,
    digest: &mut Sha256,
) -> Result<Option<(Record<'b>, [u8; 32])>, StoreError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = reader.read(&mut len[got..]).map_err(|e| read_err(e, ""))?;
        if n == 0 {
            return match got {
                0 => Ok(None),
                _ => Err(corrupt("cut inside a record length")),
            };
        }
        got += n;
    }
    let len_bytes = len;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_RECORD_BYTES {
        return Err(corrupt(format!(
            "a record of {len} bytes, more than {MAX_RECORD_BYTES}"
        )));
    }
    scratch.clear();
    scratch.resize(len, 0);
    reader
        .read_exact(scratch)
        .map_err(|e| read_err(e, "cut inside a record: "))?;
    let before = digest.clone().finalize().into();
    digest.update(len_bytes);
    digest.update(&scratch[..]);
    let (record, used) =
        bincode::serde::borrow_decode_from_slice(scratch, bincode::config::standard())
            .map_err(|e| corrupt(e.to_string()))?;
    if used != scratch.len() {
        return Err(corrupt("trailing bytes in a record"));
    }
    Ok(Some((record, before)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_fields_encode_as_a_sequence_of_u8_would() {
        // The same record with its bytes as a plain `Vec<u8>` field (a
        // serde sequence): the stream format does not depend on the
        // shortcut.
        #[derive(Serialize)]
        enum Plain {
            _Header,
            _Cursor,
            _Dlq,
            Event { offset: u64, stored: Vec<u8> },
        }
        let stored: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        let fast = Record::Event {
            offset: 300,
            stored: Cow::Borrowed(&stored),
        };
        let plain = Plain::Event {
            offset: 300,
            stored: stored.clone(),
        };
        let config = bincode::config::standard();
        let fast_bytes = bincode::serde::encode_to_vec(&fast, config).unwrap();
        assert_eq!(
            fast_bytes,
            bincode::serde::encode_to_vec(&plain, config).unwrap()
        );
        let (back, _): (Record<'_>, usize) =
            bincode::serde::borrow_decode_from_slice(&fast_bytes, config).unwrap();
        assert!(
            matches!(back, Record::Event { offset: 300, stored: ref s } if s.as_ref() == stored.as_slice())
        );
    }
}
