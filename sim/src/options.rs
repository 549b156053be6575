//! What a run does: the seed, its size, and the seams tests plug broken
//! components into.

use std::sync::Arc;
use std::time::Duration;

use auditflow_protocol::wire::{Request, Response};
use rand::rngs::StdRng;

use crate::disk::SimDisk;
use crate::sink::{sim_sinks, SinkHook};
use auditflow_broker::partition::NodeId;

/// What a run does.
#[derive(Clone)]
pub struct SimOptions {
    /// Everything random derives from it.
    pub seed: u64,
    /// Simulated time with workload and faults (a quiet period follows).
    pub duration: Duration,
    /// Partitions.
    pub partitions: u32,
    /// Concurrent clients.
    pub clients: usize,
    /// Inject faults (crashes, partitions, disk errors, lossy network).
    pub faults: bool,
    /// Builds each node's disk (tests plug in broken disks here).
    pub disk: Arc<dyn Fn(NodeId) -> SimDisk + Send + Sync>,
    /// Sees every client request and may answer it instead of the
    /// cluster (tests plug in a broken node that acks before commit).
    pub client_hook: Option<ClientHook>,
    /// Builds the sink factory of every node from the run's simulated
    /// endpoints (tests plug in a broken sink here).
    pub sinks: SinkHook,
    /// How many of the trace's last lines the report keeps.
    pub trace_lines: usize,
}

/// See [`SimOptions::client_hook`]: given the request, returns `Some`
/// response to answer without asking the cluster.
pub type ClientHook = Arc<dyn Fn(&Request, &mut StdRng) -> Option<Response> + Send + Sync>;

impl SimOptions {
    /// Defaults for `seed`: 20 simulated seconds, 4 partitions, 4 clients,
    /// faults on, correct disks.
    pub fn new(seed: u64) -> SimOptions {
        SimOptions {
            seed,
            duration: Duration::from_secs(20),
            partitions: 4,
            clients: 4,
            faults: true,
            disk: Arc::new(|_| SimDisk::default()),
            client_hook: None,
            sinks: sim_sinks(),
            trace_lines: 200,
        }
    }
}
