//! Networking on quinn: the only broker module that knows about QUIC.
//!
//! - [`tls`]: certificates and rustls configurations.
//! - [`server`]: the accept loop, dispatching by ALPN.
//! - [`client_api`]: answers to client requests.
//! - [`peer`]: Raft RPC messages, the transport seam, its QUIC version.
//! - [`peer_api`]: answers to peers' Raft RPCs.
//! - [`raft_network`]: openraft's network factory over the seam.

pub mod client_api;
pub mod delivery_api;
pub mod peer;
pub mod peer_api;
pub mod raft_network;
pub mod server;
pub mod tls;
