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
use crate::storage::types::TypeConfig;

/// Version of the peer messages.
pub const PEER_PROTOCOL_VERSION: u16 = 1;
/// Largest peer frame. Raft batches are split by openraft when a request
/// would exceed it (`PayloadTooLarge`), so this bounds memory per RPC.
pub const MAX_PEER_FRAME_BYTES: usize = 64 * 1024 * 1024;
/// A Raft RPC for one partition's group.
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
}

impl PeerRequest {
    /// The partition the request is for.
    pub fn partition(&self) -> u32 {
        match self {
            PeerRequest::Vote { partition, .. }
            | PeerRequest::AppendEntries { partition, .. }
            | PeerRequest::InstallSnapshot { partition, .. }
            | PeerRequest::Campaign { partition } => *partition,
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
    /// Sends `request` to `target` and waits for its answer.
    fn call(
        &self,
        target: NodeId,
        request: PeerRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerResponse, TransportFailure>>;
}
