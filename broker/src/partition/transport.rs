//! The Raft transport seam: the messages one node's Raft groups send
//! another's, and the [`RaftTransport`] trait that carries them. `net`
//! implements it over QUIC (`net::peer::QuicPeers`), the simulator over its
//! simulated network; partition code sees only this trait.
//!
//! Every Raft group of a node shares one connection per peer; each RPC is
//! one request and one response, tagged with its partition.

use std::time::Duration;

use futures::future::BoxFuture;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::replicated::NodeId;
use crate::storage::identity::{ClusterId, ClusterSettings};
use crate::storage::types::TypeConfig;

/// Version of the peer messages. Version 2 wraps every request in a
/// [`PeerEnvelope`] naming the cluster, and adds `Hello` and `Rejoin`.
pub const PEER_PROTOCOL_VERSION: u16 = 2;
/// Largest peer frame. Raft batches are split by openraft when a request
/// would exceed it (`PayloadTooLarge`), so this bounds memory per RPC.
pub const MAX_PEER_FRAME_BYTES: usize = 64 * 1024 * 1024;
/// What goes over the wire from one node to another: the request with the
/// cluster it is meant for, so a node of another cluster (a data
/// directory copied from elsewhere, a mistyped peer address) is refused
/// with [`PeerResponse::WrongCluster`] instead of being answered.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerEnvelope {
    /// The sender's cluster; [`ClusterId::UNKNOWN`] only for `Hello`.
    pub cluster: ClusterId,
    /// The sender's node id.
    pub from: NodeId,
    /// The request.
    pub request: PeerRequest,
}

/// A request from one node to another: a Raft RPC for one partition's
/// group, or one of the membership requests around it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    /// RequestVote.
    Vote {
        /// Target group.
        partition: u32,
        /// The RPC.
        rpc: VoteRequest<NodeId>,
    },
    /// AppendEntries (also heartbeats).
    AppendEntries {
        /// Target group.
        partition: u32,
        /// The RPC.
        rpc: AppendEntriesRequest<TypeConfig>,
    },
    /// One chunk of a snapshot.
    InstallSnapshot {
        /// Target group.
        partition: u32,
        /// The RPC.
        rpc: InstallSnapshotRequest<TypeConfig>,
    },
    /// The leader hands the group over: the receiver campaigns at once
    /// (Raft's TimeoutNow). Sent only once the receiver holds the
    /// leader's whole log, so the leader grants it its vote
    /// (`partition::rebalance`).
    Campaign {
        /// Target group.
        partition: u32,
    },
    /// Which cluster do you belong to? Sent by a node without data, to
    /// learn the cluster it is to join (`node::discover`).
    Hello,
    /// The sender may have lost what it acknowledged in `partition`
    /// (empty or damaged data): if the receiver leads the partition, it
    /// removes the sender from the voters (keeping it as a learner) and
    /// answers once that membership is committed
    /// (`partition::rejoin`).
    Rejoin {
        /// Target group.
        partition: u32,
    },
}

impl PeerRequest {
    /// The partition the request is for.
    pub fn partition(&self) -> u32 {
        match self {
            PeerRequest::Vote { partition, .. }
            | PeerRequest::AppendEntries { partition, .. }
            | PeerRequest::InstallSnapshot { partition, .. }
            | PeerRequest::Campaign { partition }
            | PeerRequest::Rejoin { partition } => *partition,
            PeerRequest::Hello => 0,
        }
    }
}

/// The answer to a [`PeerRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    /// Answer to `Vote`.
    Vote(VoteResponse<NodeId>),
    /// Answer to `AppendEntries`.
    AppendEntries(AppendEntriesResponse<NodeId>),
    /// Answer to `InstallSnapshot`.
    InstallSnapshot(InstallSnapshotResponse<NodeId>),
    /// Answer to `Campaign`: the election has started (not that it was
    /// won).
    Campaigning,
    /// Answer to `Hello`: the receiver's cluster and its settings, or
    /// `None` if it has no identity yet either.
    Hello(Option<(ClusterId, ClusterSettings)>),
    /// Answer to `Rejoin`: the sender is no voter in the committed
    /// membership at `demoted_at`.
    Demoted {
        /// Log id of that membership.
        demoted_at: openraft::LogId<NodeId>,
    },
    /// Answer to `Rejoin` from a node that does not lead the partition:
    /// the leader it knows, if any.
    NotLeader(Option<NodeId>),
    /// The receiver belongs to another cluster and answers nothing.
    WrongCluster {
        /// The receiver's cluster.
        receiver: ClusterId,
        /// The cluster the request named.
        sender: ClusterId,
    },
    /// The receiver is rejoining the partition and answers none of its
    /// Raft RPCs yet (it may have lost what it acknowledged).
    Rejoining,
    /// The receiver could not handle the request (unknown partition, group
    /// shut down, snapshot mismatch); the sender retries later.
    Failed(String),
}

/// Why an RPC did not get an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportFailure {
    /// The peer cannot be reached now; back off.
    #[error("peer {0} unreachable: {1}")]
    Unreachable(NodeId, String),
    /// The request was sent but failed in flight; may retry at once.
    #[error("RPC to peer {0} failed: {1}")]
    Network(NodeId, String),
    /// The request is larger than a frame may be.
    #[error("RPC to peer {0} too large: {1} bytes")]
    TooLarge(NodeId, usize),
    /// No answer within the deadline.
    #[error("RPC to peer {0} timed out")]
    Timeout(NodeId),
}

/// The network seam for Raft: production sends over QUIC, the simulator
/// delivers (or drops, delays, duplicates) messages itself.
pub trait RaftTransport: Send + Sync + 'static {
    /// Sends `envelope` to `target` and waits for its answer.
    fn call(
        &self,
        target: NodeId,
        envelope: PeerEnvelope,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerResponse, TransportFailure>>;
}

/// A node's side of the transport: stamps every request with its cluster
/// and node id. Cheap to clone.
#[derive(Clone)]
pub struct PeerLink {
    transport: std::sync::Arc<dyn RaftTransport>,
    cluster: ClusterId,
    from: NodeId,
}

impl PeerLink {
    /// Requests of node `from` of `cluster` over `transport`.
    pub fn new(
        transport: std::sync::Arc<dyn RaftTransport>,
        cluster: ClusterId,
        from: NodeId,
    ) -> PeerLink {
        PeerLink {
            transport,
            cluster,
            from,
        }
    }

    /// Sends `request` to `target` and waits for its answer.
    pub fn call(
        &self,
        target: NodeId,
        request: PeerRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerResponse, TransportFailure>> {
        self.transport.call(
            target,
            PeerEnvelope {
                cluster: self.cluster,
                from: self.from,
                request,
            },
            timeout,
        )
    }
}
