//! Which partition an event belongs to.
//!
//! `partition = u64_be(SHA-256(u32(len(tenant)) tenant opt(key))[0..8]) mod count`.
//! A cryptographic hash rather than std's `DefaultHasher`, because the
//! mapping must be identical in every process, version and language, for the
//! lifetime of the cluster (the partition count is fixed at init).

use sha2::{Digest, Sha256};

use crate::event::Event;

/// The partition for `tenant` and an optional partition key.
pub fn partition_for(tenant: &str, key: Option<&str>, partition_count: u32) -> u32 {
    let count = u64::from(partition_count.max(1));
    let mut h = Sha256::new();
    h.update((tenant.len() as u32).to_be_bytes());
    h.update(tenant.as_bytes());
    match key {
        None => h.update([0u8]),
        Some(k) => {
            h.update([1u8]);
            h.update((k.len() as u32).to_be_bytes());
            h.update(k.as_bytes());
        }
    }
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % count) as u32
}

/// The partition of `event`.
pub fn partition_of(event: &Event, partition_count: u32) -> u32 {
    partition_for(
        &event.tenant,
        event.partition_key.as_deref(),
        partition_count,
    )
}
