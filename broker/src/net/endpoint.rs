//! A node's QUIC endpoint: bound once, it serves clients and peers
//! ([`server`](super::server)) and dials peers ([`QuicPeers`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use super::peer::QuicPeers;
use super::tls::{self, TlsError};
use crate::config::{MemoryLimits, TlsConfig};
use crate::node::NodeShared;
use crate::replicated::NodeId;

/// Why a node's endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// TLS material is missing, invalid or expired.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address asked for (`listen` in `node.toml`).
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A bound QUIC endpoint with the node's TLS identity.
pub struct NodeEndpoint {
    endpoint: quinn::Endpoint,
    /// How this node dials its peers (its node certificate as client).
    peer_config: quinn::ClientConfig,
    /// The name peers' certificates are checked against.
    server_name: String,
}

impl NodeEndpoint {
    /// Binds `listen` and loads the node's certificates from `tls`; QUIC
    /// buffers at most `memory.receive_window_bytes` unread per connection.
    pub fn bind(
        tls: &TlsConfig,
        listen: SocketAddr,
        memory: &MemoryLimits,
    ) -> Result<Self, EndpointError> {
        let server_config = tls::server_config(tls, memory.receive_window_bytes)?;
        let peer_config = tls::peer_client_config(tls)?;
        let endpoint_config = tls::endpoint_config(tls)?;
        let bind = |source| EndpointError::Bind {
            addr: listen,
            source,
        };
        let socket = std::net::UdpSocket::bind(listen).map_err(bind)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| bind(std::io::Error::other("no async runtime for QUIC")))?;
        let endpoint = quinn::Endpoint::new(endpoint_config, Some(server_config), socket, runtime)
            .map_err(bind)?;
        Ok(NodeEndpoint {
            endpoint,
            peer_config,
            server_name: tls.server_name.clone(),
        })
    }

    /// The Raft transport to the peers at `addrs`, over this endpoint.
    pub fn peers(&self, addrs: BTreeMap<NodeId, String>) -> Arc<QuicPeers> {
        QuicPeers::new(
            self.endpoint.clone(),
            self.peer_config.clone(),
            self.server_name.clone(),
            addrs,
        )
    }

    /// Answers clients and peers for `node` until the endpoint closes.
    /// Spawn it.
    pub fn serve(&self, node: Arc<NodeShared>) -> impl std::future::Future<Output = ()> {
        super::server::serve(self.endpoint.clone(), node)
    }

    /// Closes every connection and stops accepting new ones.
    pub fn close_now(&self) {
        self.endpoint.close(0u32.into(), b"node shutting down");
    }

    /// Waits at most `wait` for closed connections to be heard by peers.
    pub async fn wait_closed(&self, wait: Duration) {
        if tokio::time::timeout(wait, self.endpoint.wait_idle())
            .await
            .is_err()
        {
            info!("peer connections still closing after {wait:?}; stopping anyway");
        }
    }
}
