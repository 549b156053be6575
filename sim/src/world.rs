//! One simulation run, the driver: three real nodes (openraft groups,
//! partition actors, redb over [`SimDisk`], the real apply code) on one
//! thread with paused time; the seeded client workload (`workload`) and
//! faults (`nemesis`, at the rates of the run's options); then a quiet
//! period and the checker. The `World` is what they all share.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use auditflow_broker::clock::Clock;
use auditflow_broker::config::{NodeConfig, PeerConfig, RaftTuning, TlsConfig};
use auditflow_broker::delivery::backoff::RetryPolicy;
use auditflow_broker::delivery::breaker::BreakerPolicy;
use auditflow_broker::delivery::config::Ordering;
use auditflow_broker::delivery::mask::{MaskAction, MaskRule};
use auditflow_broker::delivery::{DestinationConfig, Filter};
use auditflow_broker::node::{self, NodeError, NodeShared};
use auditflow_broker::partition::actor::Shutdown;
use auditflow_broker::partition::transport::RaftTransport;
use auditflow_broker::partition::NodeId;
use auditflow_broker::sinks::SinkConfig;
use auditflow_broker::storage::identity::ClusterId;
use auditflow_broker::storage::Store;
use auditflow_protocol::{Event, Limits, Timestamp};
use openraft::ServerState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::checker;
use crate::disk::SimDisk;
use crate::nemesis::{nemesis, sink_nemesis};
use crate::net::SimNet;
use crate::options::{FaultOptions, SimOptions, Span};
use crate::sink::{Refusal, SimSinks};
use crate::trace::Trace;
use crate::workload::{client, reader, Acked, Observed};

/// What a run found.
#[derive(Clone, Debug)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// SHA-256 over the whole trace: equal for equal seeds (G9).
    pub trace_hash: String,
    /// Guarantee violations; empty when the run passed.
    pub violations: Vec<String>,
    /// Appends acknowledged.
    pub acked: usize,
    /// Faults injected.
    pub faults: usize,
    /// Messages through the simulated network.
    pub messages: u64,
    /// Simulated time of the whole run, quiet period included.
    pub simulated: Duration,
    /// Deliveries the simulated endpoints accepted (duplicates included).
    pub deliveries: usize,
    /// Sends to the simulated endpoints (accepted or not).
    pub sink_sends: u64,
    /// The last lines of the trace, for a failing seed.
    pub trace_tail: Vec<String>,
    /// The fault rates the run had, to print beside a failing seed.
    pub options: FaultOptions,
}

impl Report {
    /// The report of a run that could not start.
    fn refused(opts: &SimOptions, why: String) -> Report {
        Report {
            seed: opts.seed,
            trace_hash: String::new(),
            violations: vec![why],
            acked: 0,
            faults: 0,
            messages: 0,
            simulated: Duration::ZERO,
            deliveries: 0,
            sink_sends: 0,
            trace_tail: Vec::new(),
            options: opts.faults.clone(),
        }
    }
}

/// Simulated wall clock: a fixed epoch plus simulated time elapsed, plus
/// the jumps this clock made (each node has its own, so one node's clock
/// can be stepped while the others' run on).
#[derive(Debug)]
pub(crate) struct SimClock {
    start: tokio::time::Instant,
    /// Sum of the jumps so far (ns; negative: set back).
    jumped_ns: std::sync::atomic::AtomicI64,
}

impl SimClock {
    fn new(start: tokio::time::Instant) -> SimClock {
        SimClock {
            start,
            jumped_ns: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// Steps the clock by `ns` (back if negative), as an NTP step or a
    /// VM restored from a snapshot would.
    pub(crate) fn jump(&self, ns: i64) {
        self.jumped_ns
            .fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Simulated wall-clock time 0: 2026-01-01T00:00:00Z. Fixed, so no real
/// clock leaks into a run (G9).
pub(crate) const EPOCH_NANOS: i64 = 1_767_225_600_000_000_000;

impl Clock for SimClock {
    fn now(&self) -> Timestamp {
        let jumped = self.jumped_ns.load(std::sync::atomic::Ordering::Relaxed);
        Timestamp(EPOCH_NANOS + self.start.elapsed().as_nanos() as i64 + jumped)
    }
}

/// How long a node without data asks its peers for the cluster before it
/// gives up and stays down (a few rounds of `Hello`).
const DISCOVERY_PATIENCE: Duration = Duration::from_secs(3);

/// Shared state of a run.
pub(crate) struct World {
    /// What the run was asked to do.
    pub opts: SimOptions,
    /// Carries every Raft RPC and client request; knows which nodes
    /// are up.
    pub net: SimNet,
    /// Each node's disk; it outlives the node's incarnations.
    pub disks: BTreeMap<NodeId, SimDisk>,
    /// Each node's configuration, the same at every boot.
    pub configs: BTreeMap<NodeId, NodeConfig>,
    /// The store of each running node, dropped when it crashes.
    pub stores: Mutex<BTreeMap<NodeId, Store>>,
    /// Simulated time of the run (never jumps).
    pub clock: Arc<SimClock>,
    /// Each node's wall clock (the clock seam): they jump.
    pub clocks: BTreeMap<NodeId, Arc<SimClock>>,
    /// The workload's and the nemesis' randomness (the network and the
    /// sinks have their own, so their draws do not shift these).
    pub rng: Mutex<StdRng>,
    /// Shared with the simulated sinks, which trace their sends.
    pub trace: Arc<Mutex<Trace>>,
    /// The destinations' simulated endpoints and what they received.
    pub sinks: SimSinks,
    /// What every node builds its sinks with.
    pub sink_factory: auditflow_broker::delivery::supervisor::SinkFactory,
    /// Every acknowledged append, by event id: what G1 holds the
    /// cluster to.
    pub acked: Mutex<BTreeMap<String, Acked>>,
    /// Events ever sent, by id (to re-send the same content).
    pub sent: Mutex<Vec<Event>>,
    /// What reads and tails returned.
    pub observed: Mutex<Vec<Observed>>,
    /// Guarantee violations found so far.
    pub violations: Mutex<Vec<String>>,
    /// (partition, leader id term, leader id node) → the node seen leading.
    pub leaders: Mutex<BTreeMap<(u32, u64, NodeId), NodeId>>,
    /// Faults injected so far (for the report).
    pub faults: Mutex<usize>,
    /// Each node's disk's count of injected faults when it last booted:
    /// a storage failure of the node since then is explained by one only
    /// if the count grew.
    pub booted_at_fault: Mutex<BTreeMap<NodeId, u64>>,
}

/// Locks `m`, ignoring poisoning: a panic in the one simulation thread
/// ends the run anyway.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl World {
    /// Simulated time since the run started.
    pub(crate) fn now(&self) -> Duration {
        self.clock.start.elapsed()
    }

    /// Adds a line to the trace.
    pub(crate) fn trace(&self, text: String) {
        let at = self.now();
        lock(&self.trace).line(at, text);
    }

    /// Records a guarantee violation (and traces it).
    pub(crate) fn violation(&self, text: String) {
        self.trace(format!("VIOLATION {text}"));
        lock(&self.violations).push(text);
    }

    /// A draw from the run's RNG.
    pub(crate) fn gen_range(&self, range: std::ops::Range<u64>) -> u64 {
        lock(&self.rng).gen_range(range)
    }

    /// `true` with probability `p`, from the run's RNG.
    pub(crate) fn gen_bool(&self, p: f64) -> bool {
        lock(&self.rng).gen_bool(p)
    }

    /// A uniform draw in [0, 1) from the run's RNG.
    pub(crate) fn gen_unit(&self) -> f64 {
        lock(&self.rng).gen()
    }

    /// A duration in `span`, from the run's RNG.
    pub(crate) fn gen_span(&self, span: Span) -> Duration {
        span.draw(&mut *lock(&self.rng))
    }

    /// Every node of the cluster.
    pub(crate) fn ids(&self) -> Vec<NodeId> {
        self.configs.keys().copied().collect()
    }

    /// The nodes running now.
    pub(crate) fn up(&self) -> Vec<NodeId> {
        self.ids()
            .into_iter()
            .filter(|id| self.net.node(*id).is_some())
            .collect()
    }

    /// Starts node `id` on its disk (fresh or after a crash). A start that
    /// fails on an injected I/O fault leaves the node down, as a process
    /// that exits with an error would be; it is started again later (at
    /// the latest when the run heals). Any other failure to start is a
    /// violation for the caller to report.
    pub(crate) async fn boot(&self, id: NodeId) -> Result<(), String> {
        // A boot that failed while the disk injected a fault is part of the
        // run (the node stays down until the nemesis restarts it); any
        // other failure is a bug. Told by the disk's count, not the text.
        let injected = self.disks[&id].injected_faults();
        match self.try_boot(id).await {
            Err(e) if self.disks[&id].injected_faults() > injected => {
                self.trace(format!("{e}; stays down"));
                Ok(())
            }
            other => other,
        }
    }

    /// Whether node `id`'s disk injected a fault since the node booted
    /// (or its last boot was damaged by one).
    pub(crate) fn injected_since_boot(&self, id: NodeId) -> bool {
        let at_boot = lock(&self.booted_at_fault).get(&id).copied();
        at_boot.is_none_or(|n| self.disks[&id].injected_faults() > n)
    }

    /// Whether every node but `id` is up with all its data (rejoining no
    /// partition).
    pub(crate) fn others_whole(&self, id: NodeId) -> bool {
        self.ids().into_iter().filter(|o| *o != id).all(|o| {
            self.net
                .node(o)
                .is_some_and(|n| n.partitions.iter().all(|p| p.rejoin.borrow().is_none()))
        })
    }

    /// Creates the cluster on node 1's disk, as `auditflow init` does.
    async fn init(&self) -> Result<(), String> {
        let store = self.open_store(1)?;
        let cluster = ClusterId(self.gen_range(1..u64::MAX) as u128);
        node::init(&self.configs[&1], &store, cluster)
            .await
            .map_err(|e| format!("init: {e}"))?;
        self.trace(format!("init: cluster {cluster} founded by node 1"));
        Ok(())
    }

    /// Opens node `id`'s disk with the run's storage writer.
    fn open_store(&self, id: NodeId) -> Result<Store, String> {
        let (db, log, events) = self.disks[&id].open();
        let writer = self.opts.faults.writer.mode();
        Store::with_backend(db, log, events, &format!("node{id}"), writer)
            .map_err(|e| format!("node {id} cannot open its disk: {e}"))
    }

    async fn try_boot(&self, id: NodeId) -> Result<(), String> {
        lock(&self.booted_at_fault).insert(id, self.disks[&id].injected_faults());
        let store = self.open_store(id)?;
        let config = self.configs[&id].clone();
        let transport: Arc<dyn RaftTransport> = Arc::new(self.net.transport(id));
        let identity = match node::identify(
            &config,
            &store,
            Arc::clone(&transport),
            Some(DISCOVERY_PATIENCE),
        )
        .await
        {
            Ok(identity) => identity,
            Err(NodeError::NoCluster(_)) => {
                // As a real node would keep asking: it stays down until
                // the next restart or the heal.
                self.trace(format!(
                    "node {id} has no data and no peer answered; stays down"
                ));
                return Ok(());
            }
            Err(e) => return Err(format!("node {id} cannot start: {e}")),
        };
        if !identity.rejoin.is_empty() {
            self.trace(format!(
                "node {id} rejoins partitions {:?}",
                identity.rejoin.keys().collect::<Vec<_>>()
            ));
        }
        let shared = node::start(
            config,
            identity,
            &store,
            transport,
            self.clocks[&id].clone(),
            Arc::clone(&self.sink_factory),
            // Delivery's randomness (backoff jitter), from the run's seed.
            self.gen_range(0..u64::MAX),
        )
        .await
        .map_err(|e| format!("node {id} cannot start: {e}"))?;
        lock(&self.stores).insert(id, store);
        self.net.attach(id, shared);
        Ok(())
    }

    /// Crashes node `id`: unsynced writes are lost, everything in memory
    /// is gone.
    pub(crate) async fn crash(&self, id: NodeId) {
        let Some(node) = self.net.detach(id) else {
            return;
        };
        // The disk dies first, so nothing the node does while it is torn
        // down (a clean close of redb) can reach it. Its unsynced writes
        // may tear instead of vanishing whole.
        let p = self.opts.faults.cluster.torn_write;
        let torn = if p > 0.0 {
            self.disks[&id].crash_torn(p, &mut *lock(&self.rng))
        } else {
            self.disks[&id].crash();
            Vec::new()
        };
        for t in torn {
            self.trace(format!("node {id} torn write: {t}"));
        }
        shutdown(&node).await;
        lock(&self.stores).remove(&id);
    }
}

async fn shutdown(node: &NodeShared) {
    for p in &node.partitions {
        p.actor.do_send(Shutdown);
        let _ = p.raft.shutdown().await;
    }
}

/// Runs one simulation. Must be called outside any async runtime: it
/// builds its own single-threaded one with paused time and the seed.
pub fn run(opts: &SimOptions) -> Report {
    if let Err(e) = opts.validate() {
        return Report::refused(opts, format!("invalid options: {e}"));
    }
    auditflow_broker::replicated::runtime::seed_thread_rng(opts.seed);
    let mut seed_bytes = opts.seed.to_le_bytes().to_vec();
    seed_bytes.extend_from_slice(b"auditflow-sim");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .rng_seed(tokio::runtime::RngSeed::from_bytes(&seed_bytes))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return Report::refused(opts, format!("cannot build the simulation runtime: {e}"))
        }
    };
    let system = actix_rt::System::with_tokio_rt(move || runtime);
    let opts = opts.clone();
    // The whole run is on this thread, where the broker reads the switch.
    auditflow_broker::replicated::planted::plant(opts.planted_bug);
    let report = system.block_on(simulate(opts));
    auditflow_broker::replicated::planted::plant(None);
    report
}

fn node_config(id: NodeId, partitions: u32) -> NodeConfig {
    NodeConfig {
        id,
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16)),
        admin_listen: None,
        data_dir: "sim".into(),
        partitions,
        dedup_window: 1_000_000,
        peers: (1..=3)
            .map(|i| PeerConfig {
                id: i,
                addr: format!("sim-node-{i}"),
            })
            .collect(),
        tls: TlsConfig {
            ca_cert: "unused".into(),
            cert: "unused".into(),
            key: "unused".into(),
            server_name: "localhost".into(),
        },
        raft: RaftTuning {
            heartbeat_ms: 50,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            // Small, so runs exercise snapshots and log purges.
            snapshot_logs_since_last: 100,
            max_in_snapshot_log_to_keep: 20,
            // Often, so runs exercise leadership handovers.
            rebalance_leaders_ms: 2_000,
            ..RaftTuning::default()
        },
        limits: Limits::default(),
        memory: Default::default(),
        destinations: destinations().into_iter().map(|(d, _)| d).collect(),
    }
}

/// The run's destinations and how their endpoints refuse events: `siem`
/// wants three of the seven tenants, gives up on an event after a few
/// attempts (so outages park events in its DLQ) and talks to a bulk
/// endpoint; `archive` wants everything, retries for ever and talks to an
/// endpoint that refuses whole batches. Retry and breaker settings are
/// short so delivery catches up within the quiet period.
fn destinations() -> Vec<(DestinationConfig, Refusal)> {
    let sink = SinkConfig::File(auditflow_broker::sinks::file::Config {
        dir: "unused".into(),
        prefix: "events".into(),
        max_bytes: 1 << 20,
        max_age_secs: None,
        fsync: Default::default(),
    });
    vec![
        (
            DestinationConfig {
                name: "siem".into(),
                sink: sink.clone(),
                filter: Filter {
                    tenants: vec!["t0".into(), "t1".into(), "t2".into()],
                    ..Filter::default()
                },
                masking: vec![MaskRule {
                    path: "actor.id".into(),
                    action: MaskAction::Redact,
                }],
                mask_key: None,
                batch_size: 20,
                linger_ms: 10,
                retry: RetryPolicy {
                    first_retry_ms: 5,
                    initial_ms: 50,
                    multiplier: 2.0,
                    max_ms: 1000,
                    max_attempts: Some(6),
                    max_age_secs: None,
                },
                breaker: BreakerPolicy {
                    open_ms: 500,
                    ..BreakerPolicy::default()
                },
                ordering: Ordering::Strict,
                max_in_flight: None,
            },
            Refusal::PerItem,
        ),
        (
            DestinationConfig {
                name: "archive".into(),
                sink,
                filter: Filter::default(),
                masking: Vec::new(),
                mask_key: None,
                batch_size: 50,
                linger_ms: 20,
                retry: RetryPolicy {
                    first_retry_ms: 5,
                    initial_ms: 50,
                    multiplier: 2.0,
                    max_ms: 2000,
                    max_attempts: None,
                    max_age_secs: None,
                },
                breaker: BreakerPolicy {
                    open_ms: 1000,
                    ..BreakerPolicy::default()
                },
                ordering: Ordering::Strict,
                max_in_flight: None,
            },
            Refusal::WholeBatch,
        ),
    ]
}

async fn simulate(opts: SimOptions) -> Report {
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let net = SimNet::new(rng.gen(), opts.faults.network.clone());
    let ids: Vec<NodeId> = vec![1, 2, 3];
    let start = tokio::time::Instant::now();
    let trace = Arc::new(Mutex::new(Trace::new(opts.trace_lines)));
    let refusals: Vec<(String, Refusal)> = destinations()
        .into_iter()
        .map(|(d, r)| (d.name, r))
        .collect();
    let sinks = SimSinks::new(
        opts.seed,
        rng.gen(),
        &opts.faults.sinks,
        &refusals,
        start,
        Arc::clone(&trace),
    );
    let sink_factory = (opts.sinks)(&sinks);
    let world = Arc::new(World {
        net,
        disks: ids.iter().map(|id| (*id, (opts.disk)(*id))).collect(),
        configs: ids
            .iter()
            .map(|id| (*id, node_config(*id, opts.partitions)))
            .collect(),
        stores: Mutex::default(),
        clock: Arc::new(SimClock::new(start)),
        clocks: ids
            .iter()
            .map(|id| (*id, Arc::new(SimClock::new(start))))
            .collect(),
        rng: Mutex::new(StdRng::seed_from_u64(rng.gen())),
        trace,
        sinks,
        sink_factory,
        acked: Mutex::default(),
        sent: Mutex::default(),
        observed: Mutex::default(),
        violations: Mutex::default(),
        leaders: Mutex::default(),
        faults: Mutex::new(0),
        booted_at_fault: Mutex::default(),
        opts: opts.clone(),
    });
    world.trace(format!(
        "seed {} partitions {} faults: {}",
        opts.seed, opts.partitions, opts.faults
    ));
    if let Err(e) = world.init().await {
        world.violation(e);
    }
    for id in &ids {
        if let Err(e) = world.boot(*id).await {
            world.violation(e);
        }
    }
    let end = opts.duration;
    let monitor = tokio::spawn(monitor_leaders(Arc::clone(&world)));
    let mut clients = Vec::new();
    for c in 0..opts.clients {
        clients.push(tokio::spawn(client(Arc::clone(&world), c, end)));
    }
    clients.push(tokio::spawn(reader(Arc::clone(&world), end)));
    let sink_faults = tokio::spawn(sink_nemesis(Arc::clone(&world), end));
    nemesis(&world, end).await;
    let _ = sink_faults.await;
    for c in clients {
        let _ = c.await;
    }
    // Quiet period: everything healed and restarted, no loss.
    world.trace("heal: network healed, every node up".into());
    world.net.heal();
    world.net.quiet();
    world.sinks.heal();
    for disk in world.disks.values() {
        disk.heal();
    }
    // Twice: a node without data boots only once a peer that has the
    // cluster is up, which may come later in the first round.
    for _ in 0..2 {
        for id in world.ids() {
            if world.net.node(id).is_none() {
                if let Err(e) = world.boot(id).await {
                    world.violation(e);
                }
            }
        }
    }
    checker::settle(&world).await;
    checker::settle_delivery(&world).await;
    crate::progress::progress(&world).await;
    monitor.abort();
    checker::check(&world).await;
    for id in world.ids() {
        if let Some(node) = world.net.detach(id) {
            shutdown(&node).await;
        }
    }
    let violations = lock(&world.violations).clone();
    let acked = lock(&world.acked).len();
    let faults = *lock(&world.faults);
    let (trace_hash, trace_tail) =
        std::mem::replace(&mut *lock(&world.trace), Trace::new(0)).finish();
    let deliveries = world.sinks.arrivals().len();
    let sink_sends = world.sinks.sends();
    Report {
        seed: opts.seed,
        trace_hash,
        violations,
        acked,
        faults,
        messages: world.net.messages(),
        simulated: world.now(),
        deliveries,
        sink_sends,
        trace_tail,
        options: opts.faults.clone(),
    }
}

/// Watches every node's Raft metrics: at most one leader per term per
/// partition (Raft election safety).
async fn monitor_leaders(world: Arc<World>) {
    let mut votes: BTreeMap<(NodeId, usize), String> = BTreeMap::new();
    loop {
        for id in world.ids() {
            let Some(node) = world.net.node(id) else {
                continue;
            };
            for (p, handle) in node.partitions.iter().enumerate() {
                let m = handle.raft.metrics().borrow().clone();
                let vote = m.vote.to_string();
                if votes.get(&(id, p)) != Some(&vote) {
                    world.trace(format!("p{p} node {id} vote {vote} {:?}", m.state));
                    votes.insert((id, p), vote);
                }
                if m.state == ServerState::Leader {
                    // openraft 0.9 (without `single-term-leader`) orders
                    // leader ids by (term, node): two nodes may lead in
                    // one term, one after the other, and entries carry the
                    // full leader id. Election safety is then: a leader
                    // leads under a vote that names it and that a quorum
                    // committed, and one leader id belongs to one node.
                    let leader_id = m.vote.leader_id();
                    if leader_id.voted_for() != Some(id) || !m.vote.is_committed() {
                        world.violation(format!(
                            "partition {p}: node {id} leads under vote {}",
                            m.vote
                        ));
                    }
                    let key = (p as u32, leader_id.term, leader_id.node_id);
                    let prev = lock(&world.leaders).insert(key, id);
                    match prev {
                        None => world.trace(format!(
                            "p{p} leader node {id} vote {} last log {:?} applied {:?}",
                            m.vote,
                            m.last_log_index,
                            m.last_applied.map(|l| l.index)
                        )),
                        Some(prev) if prev != id => world.violation(format!(
                            "partition {p}: leader id {} claimed by nodes {prev} and {id}",
                            leader_id
                        )),
                        Some(_) => {}
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
