//! Transport-free request handlers: what a node answers, whatever carried
//! the request. `net` decodes frames from QUIC streams and calls these; the
//! simulator calls them over its simulated network. Nothing here knows
//! quinn.
//!
//! - [`client_api`]: client requests (append, read, status, metadata).
//! - [`delivery_api`]: delivery requests (destination status, DLQ,
//!   redrive, replay, run-time destinations).
//! - [`peer_api`]: peers' Raft RPCs, into this node's Raft groups.

pub mod client_api;
pub mod delivery_api;
pub mod peer_api;
