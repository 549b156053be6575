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
    // A replica whose log lost acknowledged entries must not help elect a
    // leader that lacks them (storage-format.md, Replay): it still takes
    // entries and snapshots, which is how it is repaired.
    let damaged = handle.reader.is_damaged();
    match request {
        PeerRequest::Vote { .. } | PeerRequest::Campaign { .. } if damaged => {
            PeerResponse::Failed(format!(
                "partition {partition}: this node's raft log is damaged and being repaired; \
                 it does not vote"
            ))
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
    }
}
