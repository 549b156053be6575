//! openraft's type configuration for every partition group, and aliases of
//! openraft's types over it. In storage, because it names the snapshot
//! type storage defines; the log payload it carries is
//! [`crate::replicated::Command`].

use crate::replicated::runtime::SeededRuntime;
pub use crate::replicated::{Command, CommandResponse, NodeId};

openraft::declare_raft_types!(
    /// The openraft type configuration shared by every partition group.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = super::snapshot::SnapshotData,
        AsyncRuntime = SeededRuntime,
);

/// A Raft group handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// A Raft log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// A vote.
pub type Vote = openraft::Vote<NodeId>;
/// Membership as stored with its log id.
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
/// A snapshot.
pub type Snapshot = openraft::Snapshot<TypeConfig>;
/// Storage error as openraft wants it.
pub type StorageError = openraft::StorageError<NodeId>;
