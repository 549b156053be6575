//! Networking on quinn: the only broker module that knows about QUIC.
//!
//! - [`tls`]: certificates and rustls configurations.
//! - [`server`]: the accept loop: frames off QUIC streams, dispatched by
//!   ALPN to the transport-free handlers in `api`.
//! - [`peer`]: [`QuicPeers`](peer::QuicPeers), the Raft transport seam
//!   (`partition::transport`) over QUIC.
//! - [`endpoint`]: binding a node's QUIC endpoint and closing it.
//! - [`budget`]: the request path's memory bounds (bytes of requests in
//!   flight per connection and per node, client connections).

pub mod budget;
pub mod endpoint;
pub mod peer;
pub mod server;
pub mod tls;
