//! Client API messages, version [`PROTOCOL_VERSION`].
//!
//! One request and one response per QUIC bidirectional stream, each a frame
//! (see [`crate::frame`]). A malformed request fails only its own stream.

use serde::{Deserialize, Serialize};

use crate::delivery::{DestinationInfo, DestinationStatus, DlqEntry, RedriveSelection};
use crate::event::{Event, Hash32, StoredEvent, Timestamp};
use crate::validate::{Limits, ValidationError};

/// Version of the messages in this module.
pub const PROTOCOL_VERSION: u16 = 1;
/// ALPN of the client API.
pub const ALPN_CLIENT: &[u8] = b"auditflow-client/1";
/// ALPN of node-to-node traffic (Raft RPC); requires a node certificate.
pub const ALPN_PEER: &[u8] = b"auditflow-peer/1";

/// A client request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Append events that all belong to `partition`.
    Append {
        /// The partition every event maps to (see [`crate::partition`]).
        partition: u32,
        /// The events, each with a non-empty id.
        events: Vec<Event>,
    },
    /// Read stored events of one partition from this node's replica.
    Read {
        /// Partition to read.
        partition: u32,
        /// First offset wanted.
        from_offset: u64,
        /// Most events wanted (the node may return fewer).
        limit: u32,
        /// When nothing is there yet, wait up to this long for new events
        /// (long poll for `tail --follow`); 0 answers at once.
        wait_ms: u32,
    },
    /// Partition count, nodes and current leaders.
    Metadata,
    /// This node's view of every partition.
    Status,
    /// Delivery status of the (destination, partition) pairs this node
    /// leads.
    DestStatus,
    /// Parked events of a destination in one partition (any replica).
    DlqList {
        /// Destination.
        dest: String,
        /// Partition.
        partition: u32,
        /// First offset wanted.
        from_offset: u64,
        /// Most entries wanted.
        limit: u32,
    },
    /// Deliver parked events again (to the partition's leader).
    Redrive {
        /// Destination.
        dest: String,
        /// Partition.
        partition: u32,
        /// Which entries.
        selection: RedriveSelection,
    },
    /// Re-deliver stored events `[from, until)` to one destination (to the
    /// partition's leader), alongside its live stream, whose cursor does
    /// not move. Other destinations are not touched. The end is clamped to
    /// the destination's cursor: later events are still to be delivered
    /// by the stream anyway. A new replay replaces the running one.
    Replay {
        /// Destination.
        dest: String,
        /// Partition.
        partition: u32,
        /// Where to start.
        from: ReplayFrom,
        /// Where to stop (exclusive); `None`: at the cursor.
        until: Option<ReplayFrom>,
    },
    /// Add (or replace) a run-time destination, replicated through the
    /// catalog partition (to its leader). Its settings as JSON, in the
    /// shape of a `[[destinations]]` entry of `node.toml`.
    DestAdd {
        /// The destination's configuration as JSON.
        config_json: String,
    },
    /// Remove a run-time destination (to the catalog partition's leader).
    /// Its cursors and DLQ entries are kept: adding it again resumes.
    DestRemove {
        /// Destination.
        dest: String,
    },
    /// Every destination this node delivers to.
    DestList,
}

/// Where a replay starts or ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplayFrom {
    /// This offset.
    Offset(u64),
    /// The first event stored at or after this time.
    Time(Timestamp),
}

/// A response to one [`Request`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// One result per appended event, in request order.
    Appended(Vec<AppendResult>),
    /// A page of stored events.
    Events(EventsPage),
    /// Cluster layout.
    Metadata(ClusterMetadata),
    /// This node's status.
    Status(NodeStatus),
    /// Delivery status of the pairs this node leads.
    DestStatus(Vec<DestinationStatus>),
    /// Parked events, in offset order.
    Dlq(Vec<(u64, DlqEntry)>),
    /// A redrive or replay was applied: `count` entries were marked for
    /// redrive, or `count` offsets are queued for re-delivery.
    Done {
        /// Entries marked (redrive) or offsets to re-deliver (replay).
        count: u64,
    },
    /// Destinations, by name.
    Destinations(Vec<DestinationInfo>),
    /// The request as a whole failed.
    Error(RequestError),
}

/// The fate of one event of an append.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppendResult {
    /// Stored (or already stored: see [`Ack::duplicate`]) and replicated.
    Stored(Ack),
    /// Not stored, for the given reason; the rest of the batch is unaffected.
    Rejected(EventError),
}

/// Acknowledgement of a durably stored event (G1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Partition the event is in.
    pub partition: u32,
    /// Its offset there.
    pub offset: u64,
    /// Its chain hash.
    pub hash: Hash32,
    /// True when the id was already stored and this append stored nothing
    /// new (G5); offset and hash are the original's.
    pub duplicate: bool,
}

/// Why one event of a batch was not stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum EventError {
    /// The event failed validation.
    #[error("invalid event: {0}")]
    Invalid(ValidationError),
    /// The id is already stored with different content: an idempotency key
    /// reused for another event, which dedup must not silently swallow.
    #[error("event id already used by different content stored at offset {offset}")]
    IdConflict {
        /// Offset of the event that owns the id.
        offset: u64,
    },
    /// The event maps to another partition than the request named.
    #[error("event belongs to partition {expected}")]
    WrongPartition {
        /// The partition the event maps to.
        expected: u32,
    },
}

/// A node's identity and client address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    /// Node id (1-based, unique in the cluster).
    pub id: u64,
    /// `host:port` of its QUIC endpoint.
    pub addr: String,
}

/// Why a whole request failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RequestError {
    /// This node does not lead the partition; retry at `leader`.
    #[error("node does not lead partition {partition}; leader: {leader:?}")]
    NotLeader {
        /// The partition.
        partition: u32,
        /// The leader this node knows of, if any.
        leader: Option<NodeAddr>,
    },
    /// The partition cannot take writes now (no leader, no quorum); retry.
    #[error("partition {partition} unavailable: {reason}")]
    Unavailable {
        /// The partition.
        partition: u32,
        /// Why.
        reason: String,
    },
    /// The node is overloaded or at its disk quota; retry later.
    #[error("retry later: {reason}")]
    RetryLater {
        /// Why.
        reason: String,
    },
    /// The batch exceeds the cluster's limits.
    #[error("batch too large: {reason}")]
    BatchTooLarge {
        /// Which limit and by how much.
        reason: String,
    },
    /// The request is malformed (bad frame, unknown partition, ...).
    #[error("bad request: {reason}")]
    BadRequest {
        /// What is wrong.
        reason: String,
    },
    /// A failure inside the node; the request may be retried.
    #[error("internal error: {reason}")]
    Internal {
        /// What failed.
        reason: String,
    },
    /// The node is at one of its memory bounds (bytes queued for a
    /// partition, bytes of requests in flight on this connection or on
    /// the node, connections): nothing of the request was stored; send it
    /// again after about `retry_after_ms` (the client library waits that
    /// long plus jitter). Last variant, so older variants keep their
    /// encoding.
    #[error("overloaded: {reason}; retry after {retry_after_ms} ms")]
    Overloaded {
        /// Which bound, and its size.
        reason: String,
        /// The node's hint: how long until the bound has room again.
        retry_after_ms: u32,
    },
}

impl RequestError {
    /// An [`Internal`](RequestError::Internal) error whose reason is `e`'s
    /// message: a failure inside the node (storage, encoding) that the
    /// client can only report or retry.
    pub fn internal(e: impl std::fmt::Display) -> RequestError {
        RequestError::Internal {
            reason: e.to_string(),
        }
    }

    /// Whether retrying the same request (elsewhere or later) can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RequestError::NotLeader { .. }
                | RequestError::Unavailable { .. }
                | RequestError::RetryLater { .. }
                | RequestError::Internal { .. }
                | RequestError::Overloaded { .. }
        )
    }
}

/// A page of a partition read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsPage {
    /// The partition read.
    pub partition: u32,
    /// Events in offset order, starting at the requested offset.
    pub events: Vec<StoredEvent>,
    /// Offset to ask for next.
    pub next_offset: u64,
    /// Offset the node will assign next: everything below is stored here.
    pub head_offset: u64,
}

/// Cluster layout as one node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMetadata {
    /// Partitions, fixed at cluster init.
    pub partition_count: u32,
    /// Every node of the cluster.
    pub nodes: Vec<NodeAddr>,
    /// Current leader of each partition, by partition index.
    pub leaders: Vec<Option<u64>>,
    /// The cluster's event and batch limits.
    pub limits: Limits,
}

/// Raft role of a node in one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Leads the partition.
    Leader,
    /// Follows a leader.
    Follower,
    /// Campaigning.
    Candidate,
    /// Non-voting member or not part of the group.
    Learner,
    /// The group is shutting down.
    Shutdown,
}

/// One node's view of one partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionStatus {
    /// The partition.
    pub partition: u32,
    /// This node's role.
    pub role: Role,
    /// Leader known to this node.
    pub leader: Option<u64>,
    /// Current Raft term.
    pub term: u64,
    /// Index of the last Raft log entry on this node.
    pub last_log_index: Option<u64>,
    /// Index of the last applied entry.
    pub applied_index: Option<u64>,
    /// Index of the last entry in this node's snapshot.
    pub snapshot_index: Option<u64>,
    /// Entries up to here are purged from this node's log.
    pub purged_index: Option<u64>,
    /// Next event offset this node will assign.
    pub next_offset: u64,
    /// Chain hash of the last stored event.
    pub last_hash: Hash32,
}

/// One node's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node.
    pub node: NodeAddr,
    /// Its view of each partition.
    pub partitions: Vec<PartitionStatus>,
}
