//! The auditflow node.
//!
//! - [`admin`]: the per-node admin HTTP server: Prometheus metrics, health
//!   and readiness probes, status JSON and a status page.
//! - [`partition`]: openraft groups per partition, the pure apply logic and
//!   the partition actor that group-commits appends.
//! - [`storage`]: per node, one Raft log in segment files and one redb
//!   database holding every partition's state machine, each written by a
//!   single group-committing writer.
//! - [`delivery`]: delivery actors per (destination, partition), DLQ,
//!   filters, masking, backoff.
//! - [`sinks`]: the delivery endpoints behind one `Sink` trait.
//! - [`net`]: quinn endpoint, client API, Raft RPC transport, TLS.
//! - [`node`]: wiring a node from its seams; start-up and shutdown.
//! - [`config`]: the `node.toml` file.
//! - [`clock`]: the wall-clock seam.

pub mod admin;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod net;
pub mod node;
pub mod partition;
pub mod sinks;
pub mod storage;
