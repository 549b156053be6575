//! The per-partition hash chain (G6).
//!
//! ```text
//! hash(offset) = SHA-256( "AFCH" 0x01
//!                         prev_hash[32]            -- Hash32::ZERO at offset 0
//!                         u32(partition) u64(offset) i64(received_at_unix_nanos)
//!                         canonical(event) )       -- see crate::canonical
//! ```
//!
//! Covering the partition, offset and broker receive time means an event can
//! be neither moved nor re-dated without breaking every later hash.

use sha2::{Digest, Sha256};

use crate::canonical;
use crate::event::{Event, Hash32, StoredEvent, Timestamp};

/// Domain-separation prefix of chain hashes, version 1.
pub const CHAIN_PREFIX: &[u8; 5] = b"AFCH\x01";

/// The chain hash of one event given the hash of its predecessor.
pub fn chain_hash(
    prev: &Hash32,
    partition: u32,
    offset: u64,
    received_at: Timestamp,
    event: &Event,
) -> Hash32 {
    chain_hash_canonical(
        prev,
        partition,
        offset,
        received_at,
        &canonical::encode_event(event),
    )
}

/// As [`chain_hash`], for a caller that already holds the canonical bytes.
pub fn chain_hash_canonical(
    prev: &Hash32,
    partition: u32,
    offset: u64,
    received_at: Timestamp,
    canonical_event: &[u8],
) -> Hash32 {
    let mut h = Sha256::new();
    h.update(CHAIN_PREFIX);
    h.update(prev.0);
    h.update(partition.to_be_bytes());
    h.update(offset.to_be_bytes());
    h.update(received_at.0.to_be_bytes());
    h.update(canonical_event);
    Hash32(h.finalize().into())
}

/// SHA-256 of the canonical encoding: identifies an event's content, used by
/// the dedup index to tell a retry from a reused id.
pub fn content_digest(event: &Event) -> Hash32 {
    content_digest_canonical(&canonical::encode_event(event))
}

/// As [`content_digest`], for a caller that already holds the canonical
/// bytes.
pub fn content_digest_canonical(canonical_event: &[u8]) -> Hash32 {
    Hash32(Sha256::digest(canonical_event).into())
}

/// Why a sequence of stored events does not form an intact chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// An event belongs to another partition than the one being checked.
    #[error("offset {offset}: event is from partition {found}, expected {expected}")]
    WrongPartition {
        /// Offset of the offending event.
        offset: u64,
        /// Partition being verified.
        expected: u32,
        /// Partition the event claims.
        found: u32,
    },
    /// Offsets are not dense and increasing.
    #[error("expected offset {expected}, found {found}: events missing, inserted or reordered")]
    Gap {
        /// The offset that should come next.
        expected: u64,
        /// The offset found instead.
        found: u64,
    },
    /// The recomputed hash differs from the stored one.
    #[error(
        "offset {offset}: hash mismatch (stored {stored}, recomputed {computed}): event altered"
    )]
    HashMismatch {
        /// Offset of the offending event.
        offset: u64,
        /// Hash stored with the event.
        stored: Hash32,
        /// Hash recomputed from the content and its predecessor.
        computed: Hash32,
    },
}

/// Incremental verifier of one partition's chain, fed events in offset order.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    partition: u32,
    next_offset: u64,
    prev: Hash32,
}

impl ChainVerifier {
    /// Verifies from offset 0.
    pub fn new(partition: u32) -> Self {
        Self::resume(partition, 0, Hash32::ZERO)
    }

    /// Verifies from `next_offset`, trusting `prev` as the hash before it.
    pub fn resume(partition: u32, next_offset: u64, prev: Hash32) -> Self {
        ChainVerifier {
            partition,
            next_offset,
            prev,
        }
    }

    /// Checks the next event of the partition.
    pub fn push(&mut self, e: &StoredEvent) -> Result<(), ChainError> {
        if e.partition != self.partition {
            return Err(ChainError::WrongPartition {
                offset: e.offset,
                expected: self.partition,
                found: e.partition,
            });
        }
        if e.offset != self.next_offset {
            return Err(ChainError::Gap {
                expected: self.next_offset,
                found: e.offset,
            });
        }
        let computed = chain_hash(&self.prev, e.partition, e.offset, e.received_at, &e.event);
        if computed != e.hash {
            return Err(ChainError::HashMismatch {
                offset: e.offset,
                stored: e.hash,
                computed,
            });
        }
        self.prev = e.hash;
        self.next_offset += 1;
        Ok(())
    }

    /// The offset the next pushed event must have.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Hash of the last verified event.
    pub fn last_hash(&self) -> Hash32 {
        self.prev
    }
}
