//! The deterministic simulator (DESIGN.md §6): the real broker — partition
//! actors, openraft groups, the redb store and the pure apply code — on one
//! thread with paused time, where a seed decides everything else.
//!
//! - [`disk`]: redb over a simulated disk that loses unsynced writes when
//!   its node crashes, and fails on request.
//! - [`net`]: the simulated network for Raft RPCs and client requests.
//! - [`sink`]: the simulated endpoints the real delivery engine delivers
//!   to, with seeded outages, slowness, errors and refusals, and the
//!   recorder of what they accepted.
//! - [`world`]: one run: nodes, the client workload, the fault injector.
//! - `checker`: the guarantees checked after the run.

mod checker;
pub mod disk;
pub mod net;
pub mod sink;
pub mod world;

pub use world::{run, Report, SimOptions};
