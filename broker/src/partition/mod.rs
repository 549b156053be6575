//! Partitions: one openraft group per partition, driven by a
//! [`PartitionActor`](actor::PartitionActor).
//!
//! - [`actor`]: the partition actor that group-commits appends.
//! - [`transport`]: the Raft transport seam (peer messages and the
//!   [`RaftTransport`](transport::RaftTransport) trait that `net` implements
//!   over QUIC and the simulator over its network).
//! - [`network`]: openraft's network factory over that seam.
//! - [`compaction`]: asks quiet partitions to purge so old Raft log
//!   segments can go.
//! - [`rebalance`]: hands partitions back to their preferred leader after
//!   failovers moved them.
//! - [`rejoin`]: a node that lost its data rejoins a group as a learner
//!   and is promoted once caught up; leaders grow groups to every member.
//!
//! The openraft type configuration is `storage::types` (it names storage's
//! snapshot type); the log payload is `replicated::Command`.

pub mod actor;
pub mod compaction;
pub mod network;
pub mod rebalance;
pub mod rejoin;
pub mod transport;

pub use crate::replicated::{Command, CommandResponse, NodeId};
pub use crate::storage::types::{Raft, TypeConfig};
