//! The auditflow node.
//!
//! - [`partition`]: openraft groups per partition, the pure apply logic and
//!   the partition actor.
//! - [`storage`]: one redb database per node holding every partition's Raft
//!   log and state machine, written by a single group-committing writer.
//! - [`clock`]: the wall-clock seam.

pub mod clock;
pub mod partition;
pub mod storage;
