//! Who this data directory belongs to: the cluster id, this node's id,
//! the cluster-wide settings fixed at init, and which partitions this
//! node is rejoining after it lost (or could not trust) its data.
//!
//! The record is one row of the `identity` table in the node's redb
//! database, written in its own durable transaction, so it goes through
//! the same disk seam as everything else (the simulator's lost disk wipes
//! it with the rest) and redb's commit makes each write atomic. The value
//! carries its own version and checksum on top of redb's:
//!
//! | bytes | field                                           |
//! |-------|-------------------------------------------------|
//! | 4     | magic `AFID`                                    |
//! | 2     | record version, big-endian (now 1)              |
//! | 4     | CRC-32 (crc32fast) of the body, big-endian      |
//! | rest  | body: bincode 2 (`standard`) of [`Identity`]    |
//!
//! A record that fails any of these checks is refused as corrupt: a node
//! must not guess who it is.

use std::collections::BTreeMap;
use std::fmt;

use openraft::LogId;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{writer, StoreError};
use crate::replicated::NodeId;

/// The identity table: one row, key [`KEY`].
pub const IDENTITY: TableDefinition<&str, &[u8]> = TableDefinition::new("identity");
/// Key of the one row.
pub const KEY: &str = "identity";
/// First bytes of the value.
const MAGIC: &[u8; 4] = b"AFID";
/// Version of the record layout; another is refused.
pub const IDENTITY_VERSION: u16 = 1;
/// Magic, version and checksum.
const HEADER_BYTES: usize = 4 + 2 + 4;

/// A cluster's id, drawn at init: 128 random bits, shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClusterId(pub u128);

impl ClusterId {
    /// What a node that has no identity yet sends: accepted by peers only
    /// for `Hello`.
    pub const UNKNOWN: ClusterId = ClusterId(0);
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Settings that shape replicated state, fixed at init: every node must
/// run with the same, or the replicas would compute different states
/// from the same log (other partitions for a tenant, other dedup answers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// Number of partitions (tenant → partition mapping, Raft groups).
    pub partitions: u32,
    /// Offsets per partition whose ids dedup remembers (G5).
    pub dedup_window: u64,
}

/// Where a partition's rejoin stands on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejoinState {
    /// This node may hold less than it acknowledged: it answers no Raft
    /// RPC of the partition until a leader has removed it from the voters.
    Pending,
    /// The leader committed a membership without this node as voter at
    /// `demoted_at`: it takes appends and snapshots as a learner, votes
    /// for nobody and does not campaign until a membership after
    /// `demoted_at` makes it a voter again.
    Learner {
        /// Log id of the committed membership that demoted this node.
        demoted_at: LogId<NodeId>,
    },
}

/// The identity record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The cluster this data belongs to.
    pub cluster: ClusterId,
    /// The node this data belongs to.
    pub node: NodeId,
    /// The cluster-wide settings.
    pub settings: ClusterSettings,
    /// Set by `init` on the founding node until it has initialised every
    /// Raft group (with itself as the only voter); cleared then, so a
    /// founder that later loses its log never bootstraps a second cluster.
    pub bootstrap: bool,
    /// Partitions this node is rejoining; absent means a voter like any.
    pub rejoin: BTreeMap<u32, RejoinState>,
}

/// Encodes `identity` as the stored value (header and body).
pub fn encode(identity: &Identity) -> Result<Vec<u8>, StoreError> {
    let body = super::tables::encode(identity, "identity")?;
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&IDENTITY_VERSION.to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a stored value, checking magic, version and checksum.
pub fn decode(bytes: &[u8]) -> Result<Identity, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        what: "identity record".into(),
        reason,
    };
    if bytes.len() < HEADER_BYTES || &bytes[..4] != MAGIC {
        return Err(corrupt("no identity header".into()));
    }
    let version = u16::from_be_bytes([bytes[4], bytes[5]]);
    if version != IDENTITY_VERSION {
        return Err(StoreError::Incompatible {
            what: "identity record".into(),
            reason: format!("version {version}, this build reads {IDENTITY_VERSION}"),
        });
    }
    let stored = u32::from_be_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]);
    let body = &bytes[HEADER_BYTES..];
    let actual = crc32fast::hash(body);
    if stored != actual {
        return Err(corrupt(format!(
            "checksum {actual:08x}, stored {stored:08x}"
        )));
    }
    super::tables::decode(body, "identity record")
}

impl super::Store {
    /// The identity stored with this node's data, if any.
    pub fn identity(&self) -> Result<Option<Identity>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = match txn.open_table(IDENTITY) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match table.get(KEY)? {
            Some(v) => decode(v.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Stores `identity` durably (it is on disk when this returns),
    /// replacing what was there.
    pub async fn write_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        let bytes = encode(identity)?;
        self.writer
            .write(writer::Commit::Durable, move |txn| {
                txn.open_table(IDENTITY)?.insert(KEY, bytes.as_slice())?;
                Ok(())
            })
            .await
    }

    /// Changes the stored identity with `change`, durably, in one writer
    /// job: read, change and write are one transaction, so concurrent
    /// changes (partitions rejoining side by side) never undo each other.
    /// `Ok(false)` if there is no identity to change.
    pub async fn update_identity<F>(&self, mut change: F) -> Result<bool, StoreError>
    where
        F: FnMut(&mut Identity) + Send + 'static,
    {
        self.writer
            .write(writer::Commit::Durable, move |txn| {
                let mut table = txn.open_table(IDENTITY)?;
                let current = match table.get(KEY)? {
                    Some(v) => decode(v.value())?,
                    None => return Ok(false),
                };
                let mut next = current.clone();
                change(&mut next);
                if next != current {
                    table.insert(KEY, encode(&next)?.as_slice())?;
                }
                Ok(true)
            })
            .await
    }

    /// Records where `partition`'s rejoin stands (`None`: a voter again).
    pub async fn set_rejoin(
        &self,
        partition: u32,
        state: Option<RejoinState>,
    ) -> Result<(), StoreError> {
        self.update_identity(move |id| match state {
            Some(s) => {
                id.rejoin.insert(partition, s);
            }
            None => {
                id.rejoin.remove(&partition);
            }
        })
        .await
        .map(|_| ())
    }

    /// Marks `partitions` as rejoining ([`RejoinState::Pending`]) in the
    /// stored identity, durably: at its next start the node answers none
    /// of their Raft RPCs until a leader has demoted it, then catches up
    /// as a learner. For a caller that finds a partition's acknowledged
    /// data damaged and truncates it before the node starts.
    pub async fn mark_rejoining(&self, partitions: &[u32]) -> Result<(), StoreError> {
        // Without an identity the node rejoins every partition anyway.
        let partitions = partitions.to_vec();
        self.update_identity(move |id| {
            for p in &partitions {
                id.rejoin.insert(*p, RejoinState::Pending);
            }
        })
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Identity {
        Identity {
            cluster: ClusterId(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
            node: 2,
            settings: ClusterSettings {
                partitions: 8,
                dedup_window: 1_000_000,
            },
            bootstrap: false,
            rejoin: BTreeMap::from([
                (0, RejoinState::Pending),
                (
                    3,
                    RejoinState::Learner {
                        demoted_at: LogId::new(openraft::CommittedLeaderId::new(4, 1), 17),
                    },
                ),
            ]),
        }
    }

    #[test]
    fn a_record_reads_back_as_written() -> Result<(), StoreError> {
        let bytes = encode(&sample())?;
        assert_eq!(&bytes[..4], b"AFID");
        assert_eq!(decode(&bytes)?, sample());
        Ok(())
    }

    #[test]
    fn any_flipped_bit_is_refused() -> Result<(), StoreError> {
        let bytes = encode(&sample())?;
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[i] ^= 1 << bit;
                assert!(
                    decode(&damaged).is_err(),
                    "byte {i} bit {bit} went unnoticed"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn a_short_or_foreign_value_is_refused() {
        assert!(matches!(decode(b""), Err(StoreError::Corrupt { .. })));
        assert!(matches!(
            decode(b"AFIDxxxxxxxxxxxx"),
            Err(StoreError::Incompatible { .. })
        ));
        assert!(matches!(
            decode(b"NOPE\0\x01\0\0\0\0"),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn cluster_ids_show_as_32_hex_digits() {
        assert_eq!(
            ClusterId(0xab).to_string(),
            "000000000000000000000000000000ab"
        );
    }
}
