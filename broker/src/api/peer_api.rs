//! What a node answers to a peer's Raft RPC.

use crate::node::NodeShared;
use crate::partition::transport::{PeerRequest, PeerResponse};

/// Hands one Raft RPC to the partition's group.
pub async fn handle(node: &NodeShared, request: PeerRequest) -> PeerResponse {
    let partition = request.partition();
    let Ok(handle) = node.partition(partition) else {
        return PeerResponse::Failed(format!("unknown partition {partition}"));
    };
    let raft = &handle.raft;
    match request {
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
    }
}
