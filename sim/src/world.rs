//! One simulation run: three real nodes (openraft groups, partition actors,
//! redb over [`SimDisk`], the real apply code) on one thread with paused
//! time; a seeded client workload; seeded faults; then a quiet period and
//! the checker.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use auditflow_broker::clock::Clock;
use auditflow_broker::config::{NodeConfig, PeerConfig, RaftTuning, TlsConfig};
use auditflow_broker::delivery::backoff::RetryPolicy;
use auditflow_broker::delivery::breaker::BreakerPolicy;
use auditflow_broker::delivery::mask::{MaskAction, MaskRule};
use auditflow_broker::delivery::{DestinationConfig, Filter};
use auditflow_broker::node::{self, NodeShared};
use auditflow_broker::partition::actor::Shutdown;
use auditflow_broker::partition::NodeId;
use auditflow_broker::sinks::SinkConfig;
use auditflow_broker::storage::{Store, WriterMode};
use auditflow_protocol::partition::partition_of;
use auditflow_protocol::wire::{AppendResult, Request, RequestError, Response};
use auditflow_protocol::{Actor, Event, Hash32, Limits, Outcome, Target, Timestamp};
use openraft::ServerState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use crate::checker;
use crate::disk::SimDisk;
use crate::net::{NetConfig, SimNet};
use crate::sink::{sim_sinks, Refusal, SimSinks, SinkHook};

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
}

/// Simulated wall clock: a fixed epoch plus simulated time elapsed.
#[derive(Debug)]
pub(crate) struct SimClock {
    start: tokio::time::Instant,
}

const EPOCH_NANOS: i64 = 1_767_225_600_000_000_000; // 2026-01-01T00:00:00Z

impl Clock for SimClock {
    fn now(&self) -> Timestamp {
        Timestamp(EPOCH_NANOS + self.start.elapsed().as_nanos() as i64)
    }
}

/// The trace: every line is hashed; the last ones are kept for printing.
pub(crate) struct Trace {
    hasher: Sha256,
    tail: std::collections::VecDeque<String>,
    keep: usize,
}

impl Trace {
    fn new(keep: usize) -> Trace {
        Trace {
            hasher: Sha256::new(),
            tail: std::collections::VecDeque::new(),
            keep,
        }
    }

    pub(crate) fn line(&mut self, at: Duration, text: String) {
        let line = format!("{:>9.3}s {text}", at.as_secs_f64());
        self.hasher.update(line.as_bytes());
        self.hasher.update(b"\n");
        if self.keep == 0 {
            return;
        }
        if self.tail.len() == self.keep {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }
}

/// An acknowledged append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Acked {
    pub partition: u32,
    pub offset: u64,
    pub hash: Hash32,
}

/// An event a read or a tail returned: it must be the one the log keeps
/// at that offset (no read ever sees data that is later lost or changed).
#[derive(Clone, Debug)]
pub(crate) struct Observed {
    pub node: NodeId,
    pub partition: u32,
    pub offset: u64,
    pub id: String,
    pub hash: Hash32,
}

/// Shared state of a run.
pub(crate) struct World {
    pub opts: SimOptions,
    pub net: SimNet,
    pub disks: BTreeMap<NodeId, SimDisk>,
    pub configs: BTreeMap<NodeId, NodeConfig>,
    pub stores: Mutex<BTreeMap<NodeId, Store>>,
    pub clock: Arc<SimClock>,
    pub rng: Mutex<StdRng>,
    /// Shared with the simulated sinks, which trace their sends.
    pub trace: Arc<Mutex<Trace>>,
    /// The destinations' simulated endpoints and what they received.
    pub sinks: SimSinks,
    /// What every node builds its sinks with.
    pub sink_factory: auditflow_broker::delivery::supervisor::SinkFactory,
    pub acked: Mutex<BTreeMap<String, Acked>>,
    /// Events ever sent, by id (to re-send the same content).
    pub sent: Mutex<Vec<Event>>,
    /// What reads and tails returned.
    pub observed: Mutex<Vec<Observed>>,
    pub violations: Mutex<Vec<String>>,
    /// (partition, leader id term, leader id node) → the node seen leading.
    pub leaders: Mutex<BTreeMap<(u32, u64, NodeId), NodeId>>,
    pub faults: Mutex<usize>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl World {
    pub(crate) fn now(&self) -> Duration {
        self.clock.start.elapsed()
    }

    pub(crate) fn trace(&self, text: String) {
        let at = self.now();
        lock(&self.trace).line(at, text);
    }

    pub(crate) fn violation(&self, text: String) {
        self.trace(format!("VIOLATION {text}"));
        lock(&self.violations).push(text);
    }

    fn gen_range(&self, range: std::ops::Range<u64>) -> u64 {
        lock(&self.rng).gen_range(range)
    }

    fn gen_bool(&self, p: f64) -> bool {
        lock(&self.rng).gen_bool(p)
    }

    pub(crate) fn ids(&self) -> Vec<NodeId> {
        self.configs.keys().copied().collect()
    }

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
        match self.try_boot(id).await {
            Err(e) if e.contains("simulated") => {
                self.trace(format!("{e}; stays down"));
                Ok(())
            }
            other => other,
        }
    }

    async fn try_boot(&self, id: NodeId) -> Result<(), String> {
        let disk = &self.disks[&id];
        let (db, log, events) = disk.open();
        let store = Store::with_backend(db, log, events, &format!("node{id}"), WriterMode::Inline)
            .map_err(|e| format!("node {id} cannot open its disk: {e}"))?;
        let config = self.configs[&id].clone();
        let shared = node::start(
            config,
            &store,
            Arc::new(self.net.transport(id)),
            self.clock.clone(),
            Arc::clone(&self.sink_factory),
            // Delivery's randomness (backoff jitter), from the run's seed.
            self.gen_range(0..u64::MAX),
        )
        .await
        .map_err(|e| format!("node {id} cannot start: {e}"))?;
        lock(&self.stores).insert(id, store);
        self.net.attach(id, Arc::clone(&shared));
        actix_rt::spawn(node::initialize_partitions(shared));
        Ok(())
    }

    /// Crashes node `id`: unsynced writes are lost, everything in memory
    /// is gone.
    pub(crate) async fn crash(&self, id: NodeId) {
        let Some(node) = self.net.detach(id) else {
            return;
        };
        // The disk dies first, so nothing the node does while it is torn
        // down (a clean close of redb) can reach it.
        self.disks[&id].crash();
        shutdown(&node).await;
        lock(&self.stores).remove(&id);
    }

    fn event(&self, n: u64) -> Event {
        let tenant = format!("t{}", self.gen_range(0..7));
        Event {
            id: format!("e{n}"),
            tenant,
            time: Timestamp(EPOCH_NANOS + n as i64),
            actor: Actor {
                id: format!("u{}", self.gen_range(0..50)),
                kind: "user".into(),
                name: None,
                ip: None,
            },
            action: "doc.read".into(),
            target: Target {
                kind: "doc".into(),
                id: format!("d{n}"),
            },
            outcome: Outcome::Success,
            source: None,
            context: Default::default(),
            data: None,
            schema_version: None,
            partition_key: None,
        }
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
            return Report {
                seed: opts.seed,
                trace_hash: String::new(),
                violations: vec![format!("cannot build the simulation runtime: {e}")],
                acked: 0,
                faults: 0,
                messages: 0,
                simulated: Duration::ZERO,
                deliveries: 0,
                sink_sends: 0,
                trace_tail: Vec::new(),
            }
        }
    };
    let system = actix_rt::System::with_tokio_rt(move || runtime);
    let opts = opts.clone();
    system.block_on(simulate(opts))
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
                    initial_ms: 50,
                    multiplier: 2.0,
                    max_ms: 1000,
                    max_attempts: Some(6),
                    max_age_secs: None,
                },
                breaker: BreakerPolicy {
                    failure_threshold: 4,
                    open_ms: 500,
                },
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
                    initial_ms: 50,
                    multiplier: 2.0,
                    max_ms: 2000,
                    max_attempts: None,
                    max_age_secs: None,
                },
                breaker: BreakerPolicy {
                    failure_threshold: 5,
                    open_ms: 1000,
                },
            },
            Refusal::WholeBatch,
        ),
    ]
}

async fn simulate(opts: SimOptions) -> Report {
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let net_cfg = if opts.faults {
        NetConfig::default()
    } else {
        NetConfig {
            loss: 0.0,
            duplicate: 0.0,
            ..NetConfig::default()
        }
    };
    let net = SimNet::new(rng.gen(), net_cfg);
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
        opts.faults,
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
        clock: Arc::new(SimClock { start }),
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
        opts: opts.clone(),
    });
    world.trace(format!("seed {} partitions {}", opts.seed, opts.partitions));
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
    if opts.faults {
        let sink_faults = tokio::spawn(sink_nemesis(Arc::clone(&world), end));
        nemesis(&world, end).await;
        let _ = sink_faults.await;
    } else {
        tokio::time::sleep(end).await;
    }
    for c in clients {
        let _ = c.await;
    }
    // Quiet period: everything healed and restarted, no loss.
    world.trace("heal: network healed, every node up".into());
    world.net.heal();
    world.net.set_faults(0.0, 0.0);
    world.sinks.heal();
    for disk in world.disks.values() {
        disk.heal();
    }
    for id in world.ids() {
        if world.net.node(id).is_none() {
            if let Err(e) = world.boot(id).await {
                world.violation(e);
            }
        }
    }
    checker::settle(&world).await;
    checker::settle_delivery(&world).await;
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
    let trace = std::mem::replace(&mut *lock(&world.trace), Trace::new(0));
    let deliveries = world.sinks.arrivals().len();
    let sink_sends = world.sinks.sends();
    Report {
        seed: opts.seed,
        trace_hash: hex::encode(trace.hasher.finalize()),
        violations,
        acked,
        faults,
        messages: world.net.messages(),
        simulated: world.now(),
        deliveries,
        sink_sends,
        trace_tail: trace.tail.into_iter().collect(),
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

/// A client: appends new events and re-sends old ones (same content, same
/// id), following redirects and retrying; records acknowledgements.
async fn client(world: Arc<World>, c: usize, end: Duration) {
    let mut leaders: BTreeMap<u32, NodeId> = BTreeMap::new();
    let mut hook_rng = StdRng::seed_from_u64(world.gen_range(0..u64::MAX));
    let mut n = 0u64;
    while world.now() < end {
        let resend = world.gen_bool(0.1) && !lock(&world.sent).is_empty();
        let event = if resend {
            let sent = lock(&world.sent);
            let i = lock(&world.rng).gen_range(0..sent.len());
            sent[i].clone()
        } else {
            n += 1;
            let e = world.event(c as u64 * 1_000_000_000 + n);
            lock(&world.sent).push(e.clone());
            e
        };
        let partition = partition_of(&event, world.opts.partitions);
        let mut attempts = 0;
        while attempts < 50 && world.now() < end + Duration::from_secs(5) {
            attempts += 1;
            let up = world.ids();
            let target = leaders
                .get(&partition)
                .copied()
                .unwrap_or_else(|| up[world.gen_range(0..up.len() as u64) as usize]);
            let request = Request::Append {
                partition,
                events: vec![event.clone()],
            };
            let hooked = world
                .opts
                .client_hook
                .as_ref()
                .and_then(|h| h(&request, &mut hook_rng));
            let response = match hooked {
                Some(r) => r,
                None => {
                    world
                        .net
                        .client_request(target, request, Duration::from_secs(2))
                        .await
                }
            };
            match response {
                Response::Appended(results) => {
                    match results.into_iter().next() {
                        Some(AppendResult::Stored(ack)) => record_ack(&world, &event.id, ack),
                        Some(AppendResult::Rejected(e)) => {
                            world.violation(format!("event {} rejected: {e}", event.id))
                        }
                        None => world.violation("append answered without a result".into()),
                    }
                    break;
                }
                Response::Error(RequestError::NotLeader {
                    leader: Some(l), ..
                }) => {
                    leaders.insert(partition, l.id);
                }
                Response::Error(_) => {
                    leaders.remove(&partition);
                    let pause = world.gen_range(5..100);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                other => {
                    world.violation(format!("unexpected answer to an append: {other:?}"));
                    break;
                }
            }
        }
        let think = world.gen_range(0..30);
        tokio::time::sleep(Duration::from_millis(think)).await;
    }
}

/// A reader: random reads from any node, and a tail of every partition
/// that follows its position from node to node (long polls), as a client
/// failing over would. Records what it saw for the checker; a tail must
/// get its events contiguously from where it asked.
async fn reader(world: Arc<World>, end: Duration) {
    let partitions = world.opts.partitions;
    let mut tails: BTreeMap<u32, u64> = (0..partitions).map(|p| (p, 0)).collect();
    while world.now() < end {
        let up = world.ids();
        let node = up[world.gen_range(0..up.len() as u64) as usize];
        let partition = world.gen_range(0..u64::from(partitions)) as u32;
        let tail = world.gen_bool(0.5);
        let from_offset = if tail {
            tails[&partition]
        } else {
            world.gen_range(0..tails[&partition] + 20)
        };
        let request = Request::Read {
            partition,
            from_offset,
            limit: 50,
            wait_ms: if tail { 500 } else { 0 },
        };
        let response = world
            .net
            .client_request(node, request, Duration::from_secs(2))
            .await;
        if let Response::Events(page) = response {
            let mut expect = from_offset;
            for e in &page.events {
                if e.partition != partition || e.offset != expect {
                    world.violation(format!(
                        "read: node {node} p{partition} from o{from_offset} returned p{} o{} where o{expect} was due",
                        e.partition, e.offset
                    ));
                    break;
                }
                expect += 1;
                lock(&world.observed).push(Observed {
                    node,
                    partition,
                    offset: e.offset,
                    id: e.event.id.clone(),
                    hash: e.hash,
                });
            }
            if tail && expect > from_offset {
                world.trace(format!(
                    "tail p{partition} o{from_offset}..o{expect} from node {node}"
                ));
                tails.insert(partition, expect);
            }
        }
        let think = world.gen_range(10..200);
        tokio::time::sleep(Duration::from_millis(think)).await;
    }
}

fn record_ack(world: &World, id: &str, ack: auditflow_protocol::wire::Ack) {
    let got = Acked {
        partition: ack.partition,
        offset: ack.offset,
        hash: ack.hash,
    };
    let mut acked = lock(&world.acked);
    match acked.get(id) {
        Some(prev) if *prev != got => {
            let msg = format!("G5: {id} acknowledged at {prev:?} and again at {got:?}");
            drop(acked);
            world.violation(msg);
        }
        Some(_) => {}
        None => {
            acked.insert(id.to_string(), got.clone());
            drop(acked);
            world.trace(format!(
                "ack {id} p{} o{} {}",
                got.partition,
                got.offset,
                &got.hash.to_hex()[..12]
            ));
        }
    }
}

/// Injects faults until `end`: crashes and restarts, isolation and
/// asymmetric cuts that heal, disk read, write and sync failures.
async fn nemesis(world: &Arc<World>, end: Duration) {
    while world.now() < end {
        let pause = world.gen_range(300..2500);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        crate::checker::reap_failed(world).await;
        let ids = world.ids();
        let up = world.up();
        let down: Vec<NodeId> = ids.iter().copied().filter(|i| !up.contains(i)).collect();
        let pick = |v: &[NodeId]| v[world.gen_range(0..v.len() as u64) as usize];
        let choice = world.gen_range(0..100);
        *lock(&world.faults) += 1;
        if choice < 5 {
            world.trace("fault: power failure, every node crashes".into());
            for id in &ids {
                world.crash(*id).await;
            }
            let outage = world.gen_range(100..2000);
            tokio::time::sleep(Duration::from_millis(outage)).await;
            world.trace("power back: every node restarts".into());
            for id in &ids {
                if let Err(e) = world.boot(*id).await {
                    world.violation(e);
                }
            }
        } else if !down.is_empty() && choice < 35 {
            let id = pick(&down);
            world.trace(format!("fault: restart node {id}"));
            if let Err(e) = world.boot(id).await {
                world.violation(e);
            }
        } else if down.is_empty() && choice < 30 {
            let id = pick(&up);
            world.trace(format!("fault: crash node {id}"));
            world.crash(id).await;
        } else if choice < 50 {
            let id = pick(&ids);
            world.trace(format!("fault: isolate node {id}"));
            world.net.isolate(id, &ids);
        } else if choice < 60 {
            let a = pick(&ids);
            let b = pick(&ids);
            if a != b {
                world.trace(format!("fault: cut link {a} -> {b}"));
                world.net.cut(a, b);
            }
        } else if choice < 80 {
            world.trace("fault: heal network".into());
            world.net.heal();
        } else if choice < 90 && !up.is_empty() {
            let id = pick(&up);
            match world.gen_range(0..3) {
                0 => {
                    world.trace(format!("fault: node {id} disk fails its next read"));
                    world.disks[&id].fail_reads(1);
                }
                1 => {
                    world.trace(format!("fault: node {id} disk fails its next write"));
                    world.disks[&id].fail_writes(1);
                }
                _ => {
                    world.trace(format!("fault: node {id} disk fails its next sync"));
                    world.disks[&id].fail_syncs(1);
                }
            }
        } else {
            *lock(&world.faults) -= 1;
        }
    }
}

/// Sink faults until `end`, one at a time: an endpoint goes down or gets
/// slow for a while, then recovers. Transient errors and duplicates come
/// from the sinks themselves.
async fn sink_nemesis(world: Arc<World>, end: Duration) {
    let dests = world.sinks.destinations();
    if dests.is_empty() {
        return;
    }
    while world.now() < end {
        let pause = world.gen_range(500..3000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let dest = dests[world.gen_range(0..dests.len() as u64) as usize].clone();
        let outage = world.gen_bool(0.6);
        let length = Duration::from_millis(world.gen_range(300..5000));
        *lock(&world.faults) += 1;
        if outage {
            world.trace(format!("sink fault: {dest} down for {length:?}"));
            world.sinks.set_down(&dest, true);
        } else {
            world.trace(format!("sink fault: {dest} slow for {length:?}"));
            world.sinks.set_slow(&dest, true);
        }
        tokio::time::sleep(length).await;
        world.trace(format!("sink {dest} recovered"));
        world.sinks.set_down(&dest, false);
        world.sinks.set_slow(&dest, false);
    }
}
