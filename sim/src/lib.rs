//! The deterministic simulator (DESIGN.md §6): the real broker — partition
//! actors, openraft groups, the redb store and the pure apply code — on one
//! thread with paused time, where a seed decides everything else.
//!
//! - [`options`]: what a run does (seed, size, the seams tests plug broken
//!   components into) and its fault rates: probabilities drawn from the
//!   seed, validated, printed on one line.
//! - [`disk`]: redb over a simulated disk that loses unsynced writes when
//!   its node crashes, and fails on request.
//! - [`net`]: the simulated network for Raft RPCs and client requests.
//! - [`sink`]: the simulated endpoints the real delivery engine delivers
//!   to, with seeded outages, slowness, errors and refusals, and the
//!   recorder of what they accepted.
//! - [`world`]: one run, the driver: boots the nodes, starts the workload
//!   and the nemesis, heals, and hands over to the checker.
//! - `workload`: the clients (appends, re-sends, retries) and the reader.
//! - `nemesis`: the faults of the cluster and of the destinations.
//! - `trace`: the run's log and its hash (G9).
//! - `checker`: the guarantees checked after the run.
//! - `progress`: the progress phase before them: delivery keeps pace
//!   with endpoints that are flaky but up.

mod checker;
pub mod disk;
mod nemesis;
pub mod net;
pub mod options;
mod progress;
pub mod sink;
mod trace;
mod workload;
pub mod world;

pub use options::{ClientHook, FaultOptions, OptionsError, PlantedBug, SimOptions};
pub use world::{run, Report};
