//! What a node answers to a peer's request: Raft RPCs for its groups,
//! and the membership requests around them (`Hello`, `Rejoin`).
//!
//! A request naming another cluster is refused (only `Hello` is answered
//! to anyone: a node without data asks it to learn its cluster). A
//! partition this node is rejoining answers no Raft RPC until a leader
//! has demoted it, and no vote or campaign until it is a voter again
//! (`partition::rejoin`).

use crate::node::NodeShared;
use crate::partition::rejoin;
use crate::partition::transport::{PeerEnvelope, PeerRequest, PeerResponse};
use crate::storage::identity::RejoinState;

/// Answers one peer request.
pub async fn handle(node: &NodeShared, envelope: PeerEnvelope) -> PeerResponse {
    let PeerEnvelope {
        cluster,
        from,
        request,
    } = envelope;
    if let PeerRequest::Hello = request {
        return PeerResponse::Hello(Some((node.cluster, node.settings)));
    }
    if cluster != node.cluster {
        return PeerResponse::WrongCluster {
            receiver: node.cluster,
            sender: cluster,
        };
    }
    let partition = request.partition();
    let Ok(handle) = node.partition(partition) else {
        return PeerResponse::Failed(format!("unknown partition {partition}"));
    };
    let raft = &handle.raft;
    let rejoining = *handle.rejoin.borrow();
    // A replica whose Raft log lost acknowledged entries rejoins like a
    // lost disk (node::start marks it Pending), so this gate is the one
    // that keeps it from voting with the damaged range.
    match request {
        PeerRequest::Vote { .. } | PeerRequest::Campaign { .. } if rejoining.is_some() => {
            PeerResponse::Rejoining
        }
        PeerRequest::AppendEntries { .. } | PeerRequest::InstallSnapshot { .. }
            if rejoining == Some(RejoinState::Pending) =>
        {
            PeerResponse::Rejoining
        }
        PeerRequest::Vote { rpc, .. } => match raft.vote(rpc).await {
            Ok(r) => PeerResponse::Vote(r),
            Err(e) => PeerResponse::Failed(e.to_string()),
        },
        PeerRequest::AppendEntries { rpc, .. } => match raft.append_entries(rpc).await {
            Ok(r) => PeerResponse::AppendEntries(r),
            Err(e) => PeerResponse::Failed(e.to_string()),
        },
        PeerRequest::InstallSnapshot { rpc, .. } => match raft.install_snapshot(rpc).await {
            Ok(r) => PeerResponse::InstallSnapshot(r),
            Err(e) => PeerResponse::Failed(e.to_string()),
        },
        PeerRequest::Campaign { .. } => match raft.trigger().elect().await {
            Ok(()) => PeerResponse::Campaigning,
            Err(e) => PeerResponse::Failed(e.to_string()),
        },
        PeerRequest::Rejoin { .. } => {
            if !node.config.peers.iter().any(|p| p.id == from) {
                return PeerResponse::Failed(format!("node {from} is not a configured member"));
            }
            rejoin::demote(raft, from, node.config.peers.len()).await
        }
        PeerRequest::Hello => PeerResponse::Hello(Some((node.cluster, node.settings))),
    }
}
