//! openraft's network factory over the [`RaftTransport`] seam.

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;

use super::transport::{PeerLink, PeerRequest, PeerResponse, TransportFailure};
use crate::partition::{NodeId, TypeConfig};

/// Creates per-target RPC clients for one partition's group.
#[derive(Clone)]
pub struct PartitionNetwork {
    partition: u32,
    link: PeerLink,
}

impl PartitionNetwork {
    /// The network of `partition`'s group over `link`.
    pub fn new(partition: u32, link: PeerLink) -> Self {
        PartitionNetwork { partition, link }
    }
}

impl RaftNetworkFactory<TypeConfig> for PartitionNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> PeerClient {
        PeerClient {
            partition: self.partition,
            target,
            link: self.link.clone(),
        }
    }
}

/// Sends one group's RPCs to one peer.
pub struct PeerClient {
    partition: u32,
    target: NodeId,
    link: PeerLink,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

fn rpc_error<E: std::error::Error>(
    failure: TransportFailure,
    option: &RPCOption,
    entries: Option<usize>,
) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
    match failure {
        TransportFailure::Unreachable(..) => RPCError::Unreachable(Unreachable::new(&failure)),
        TransportFailure::Timeout(target) => RPCError::Timeout(Timeout {
            action: openraft::RPCTypes::AppendEntries,
            id: 0,
            target,
            timeout: option.hard_ttl(),
        }),
        TransportFailure::TooLarge(..) => match entries {
            // Ask openraft to send half as many entries next time.
            Some(n) if n > 1 => {
                RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint((n / 2) as u64))
            }
            _ => RPCError::Network(NetworkError::new(&failure)),
        },
        TransportFailure::Network(..) => RPCError::Network(NetworkError::new(&failure)),
    }
}

fn unexpected(resp: PeerResponse) -> NetworkError {
    let msg = match resp {
        PeerResponse::Failed(reason) => reason,
        PeerResponse::Rejoining => "the peer is rejoining and answers no Raft RPC yet".into(),
        PeerResponse::WrongCluster { receiver, sender } => {
            format!("the peer belongs to cluster {receiver}, not to this node's cluster {sender}")
        }
        other => format!("unexpected response {other:?}"),
    };
    NetworkError::new(&std::io::Error::other(msg))
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let entries = rpc.entries.len();
        let req = PeerRequest::AppendEntries {
            partition: self.partition,
            rpc,
        };
        match self.link.call(self.target, req, option.hard_ttl()).await {
            Ok(PeerResponse::AppendEntries(r)) => Ok(r),
            Ok(other) => Err(RPCError::Network(unexpected(other))),
            Err(f) => Err(rpc_error(f, &option, Some(entries))),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        let req = PeerRequest::InstallSnapshot {
            partition: self.partition,
            rpc,
        };
        match self.link.call(self.target, req, option.hard_ttl()).await {
            Ok(PeerResponse::InstallSnapshot(r)) => Ok(r),
            Ok(other) => Err(RPCError::Network(unexpected(other))),
            Err(f) => Err(rpc_error(f, &option, None)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        let req = PeerRequest::Vote {
            partition: self.partition,
            rpc,
        };
        match self.link.call(self.target, req, option.hard_ttl()).await {
            Ok(PeerResponse::Vote(r)) => Ok(r),
            Ok(other) => Err(RPCError::Network(unexpected(other))),
            Err(f) => Err(rpc_error(f, &option, None)),
        }
    }
}
