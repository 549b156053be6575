//! Partitions: one openraft group per partition, driven by a
//! [`PartitionActor`](actor::PartitionActor).
//!
//! - [`types`]: the openraft type configuration and the log payload.
//! - [`runtime`]: the async runtime seam with a seedable RNG.
//! - [`apply`]: the pure state-machine logic (offsets, hashes, dedup).
//! - [`compaction`]: asks quiet partitions to purge so old Raft log
//!   segments can go.
//! - [`rebalance`]: hands partitions back to their preferred leader after
//!   failovers moved them.

pub mod actor;
pub mod apply;
pub mod compaction;
pub mod rebalance;
pub mod runtime;
pub mod types;

pub use types::{Command, CommandResponse, NodeId, Raft, TypeConfig};
