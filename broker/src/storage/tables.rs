//! The redb tables and how values are encoded.
//!
//! One database per node holds every partition; keys start with the
//! partition number so one partition's rows are contiguous and a range scan
//! or delete touches only it.
//!
//! | table       | key                   | value                                  |
//! |-------------|-----------------------|----------------------------------------|
//! | `format`    | `&str`                | format version (`u64`)                 |
//! | `events`    | `(partition, first offset)` | bincode `EventRun` (where a run of events' bytes are) |
//! | `dedup`     | `(partition, id)`     | bincode `DedupEntry`                   |
//! | `sm_meta`   | `(partition, name)`   | bincode: `applied`, `membership`, `head` |
//! | `cursors`   | `(partition, dest)`   | next offset to deliver (`u64`)         |
//! | `dlq`       | `(partition, dest, offset)` | bincode `DlqEntry`               |
//! | `snapshot_staging` | `(partition, byte offset)` | part of a snapshot being received |
//!
//! The Raft log is not here: it is in segment files ([`super::raft_log`]).
//! Nor are stored events' bytes: they are in the event files
//! ([`super::event_files`]), which `events` rows point into.
//!
//! Values are bincode 2 (`standard` configuration) through serde, the same
//! codec as the wire.

use redb::TableDefinition;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::StoreError;

/// Version of this layout; a database with another is refused at open.
/// Version 2 moved the Raft log out of redb, version 3 the stored events'
/// bytes, version 4 made `events` one row per run of offsets.
pub const FORMAT_VERSION: u64 = 4;

/// Format marker.
pub const FORMAT: TableDefinition<&str, u64> = TableDefinition::new("format");
/// Stored events by offset: where their bytes are, one row per run of
/// consecutive offsets keyed by its first ([`super::event_runs`]).
pub const EVENTS: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("events");
/// Dedup index: event id to where it is stored.
pub const DEDUP: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("dedup");
/// State machine metadata.
pub const SM_META: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("sm_meta");

/// Delivery cursors.
pub const CURSORS: TableDefinition<(u32, &str), u64> = TableDefinition::new("cursors");
/// Dead-letter queues.
pub const DLQ: TableDefinition<(u32, &str, u64), &[u8]> = TableDefinition::new("dlq");

/// A snapshot being received, in rows keyed by their position in its
/// stream ([`super::snapshot`]); emptied at start-up and once installed.
pub const SNAPSHOT_STAGING: TableDefinition<(u32, u64), &[u8]> =
    TableDefinition::new("snapshot_staging");

/// `sm_meta` key of the last applied log id.
pub const KEY_APPLIED: &str = "applied";
/// `sm_meta` key of the last applied membership.
pub const KEY_MEMBERSHIP: &str = "membership";
/// `sm_meta` key of the partition's current event file
/// (`event_files::EventFileMeta`).
pub const KEY_EVENT_FILE: &str = "event_file";
/// `sm_meta` key of the partition head.
pub const KEY_HEAD: &str = "head";
/// `sm_meta` key (catalog partition only): the run-time destinations, as
/// `Vec<(name, config JSON)>` sorted by name.
pub const KEY_CATALOG: &str = "catalog";
/// `sm_meta` key: the partition's replay windows
/// (`replicated::delivery::ReplayWindows`).
pub const KEY_REPLAYS: &str = "replays";

/// Encodes a stored value.
pub fn encode<T: Serialize>(value: &T, what: &str) -> Result<Vec<u8>, StoreError> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| {
        StoreError::Encode {
            what: what.into(),
            reason: e.to_string(),
        }
    })
}

/// Encodes a stored value into `buf`, replacing what it held: a caller
/// that stores many values reuses one buffer.
pub fn encode_into<T: Serialize>(
    value: &T,
    buf: &mut Vec<u8>,
    what: &str,
) -> Result<(), StoreError> {
    buf.clear();
    encode_append(value, buf, what)
}

/// Decodes a stored value; anything undecodable is corruption.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    match bincode::serde::decode_from_slice(bytes, bincode::config::standard()) {
        Ok((value, used)) if used == bytes.len() => Ok(value),
        Ok((_, used)) => Err(StoreError::Corrupt {
            what: what.into(),
            reason: format!("{} trailing bytes", bytes.len() - used),
        }),
        Err(e) => Err(StoreError::Corrupt {
            what: what.into(),
            reason: e.to_string(),
        }),
    }
}

/// Appends the encoding of a stored value to `buf`.
pub fn encode_append<T: Serialize>(
    value: &T,
    buf: &mut Vec<u8>,
    what: &str,
) -> Result<(), StoreError> {
    bincode::serde::encode_into_std_write(value, buf, bincode::config::standard())
        .map(|_| ())
        .map_err(|e| StoreError::Encode {
            what: what.into(),
            reason: e.to_string(),
        })
}
