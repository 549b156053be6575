//! The auditflow node.
//!
//! Modules, leaves first; a module imports only those above it in this
//! list (checked by `ops/check-arch`):
//!
//! - [`clock`]: the wall-clock seam.
//! - [`metrics`]: metric names and recording; imports nothing of the broker.
//! - [`replicated`]: what the Raft groups replicate: commands, the delivery
//!   state they change, the seeded openraft runtime.
//! - [`storage`]: per node, one Raft log in segment files and one redb
//!   database holding every partition's state machine, each written by a
//!   single group-committing writer; the pure apply core; openraft's type
//!   configuration.
//! - [`sinks`]: the delivery endpoints behind one `Sink` trait.
//! - [`partition`]: the partition actor that group-commits appends, the
//!   Raft transport seam, compaction and leader rebalancing.
//! - [`delivery`]: delivery actors per (destination, partition), DLQ,
//!   filters, masking, backoff.
//! - [`config`]: the `node.toml` file and its defaults.
//! - [`node`]: wiring a node from its seams; start-up and shutdown.
//! - [`api`]: transport-free request handlers (client, delivery, peer).
//! - [`admin`]: the admin HTTP server: Prometheus metrics, health and
//!   readiness probes, status JSON and a status page.
//! - [`net`]: quinn only: endpoint, TLS, frames over streams, peer links.
//! - [`daemon`]: a node process with the production seams.

pub mod admin;
pub mod api;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod delivery;
pub mod metrics;
pub mod net;
pub mod node;
pub mod partition;
pub mod replicated;
pub mod sinks;
pub mod storage;
