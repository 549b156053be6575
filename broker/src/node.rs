//! A node: its partitions' Raft groups and actors, the shared state the
//! network handlers read, start-up and shutdown.
//!
//! [`start`] wires a node from its seams (store, Raft transport, clock,
//! sinks) and is what the simulator calls; `daemon::run_quic_node` adds the
//! real ones: a redb file and Raft log segment files, a QUIC endpoint and
//! the system clock. Nothing here knows quinn.
//!
//! Before a node starts it needs its identity ([`identify`]): the one
//! stored with its data, checked against its configuration, or, for a
//! node without data, the cluster's as a peer tells it ([`discover`]), in
//! which case it rejoins every partition as a learner
//! (`partition::rejoin`). Only [`init`] creates a cluster; a node never
//! initialises a Raft group on its own.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr};
use auditflow_protocol::wire::{
    ClusterMetadata, NodeAddr, NodeStatus, PartitionStatus, RequestError, Role,
};
use auditflow_protocol::Hash32;
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::clock::Clock;
use crate::config::NodeConfig;
use crate::partition::actor::PartitionActor;
use crate::partition::network::PartitionNetwork;
use crate::partition::rejoin::{self, Gate};
use crate::partition::transport::{PeerLink, PeerRequest, PeerResponse, RaftTransport};
use crate::partition::{NodeId, Raft};
use crate::storage::identity::{ClusterId, ClusterSettings, Identity, RejoinState};
use crate::storage::{PartitionReader, Store, StoreError};

/// Longest wait for a peer's answer to `Hello`.
const HELLO_RPC: Duration = Duration::from_secs(2);
/// Pause between rounds of `Hello` to every peer while none has an
/// identity (before `init`) or none answers.
const HELLO_RETRY: Duration = Duration::from_millis(500);

/// How often [`NodeShared::failed`] looks at the Raft cores. Not their
/// metrics watch: it changes on every apply, thousands of times a second
/// under load, while a core that stops is rare and a quarter second late
/// costs nothing (a halted store is heard at once, through its watch).
const CORE_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Storage failed: it could not be opened, or it stopped taking writes
    /// while the Raft groups were starting.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// The Raft configuration is invalid.
    #[error("raft config: {0}")]
    RaftConfig(String),
    /// A partition's Raft state could not be read from storage at start-up
    /// (openraft's error names what: the vote, the log, the state machine,
    /// a snapshot; and the storage error it got).
    #[error("partition {partition}: cannot read its Raft state: {source}")]
    RaftStorage {
        /// The partition.
        partition: u32,
        /// What openraft could not read, and why (boxed: it is large).
        source: Box<openraft::StorageError<NodeId>>,
    },
    /// A partition's Raft group failed to start for another reason.
    #[error("partition {partition}: raft: {source}")]
    Raft {
        /// The partition.
        partition: u32,
        /// openraft's error (boxed: it is large).
        source: Box<openraft::error::Fatal<NodeId>>,
    },
    /// A founding node could not initialise a partition's group.
    #[error("partition {partition}: cannot initialise its Raft group: {reason}")]
    Init {
        /// The partition.
        partition: u32,
        /// openraft's refusal.
        reason: String,
    },
    /// The data directory belongs to another node.
    #[error(
        "the data directory belongs to node {stored} of cluster {cluster}, but this node is \
         configured as node {configured}; point `data_dir` at node {configured}'s data"
    )]
    WrongNode {
        /// The node id stored with the data.
        stored: NodeId,
        /// The node id in the configuration.
        configured: NodeId,
        /// The cluster of the data.
        cluster: ClusterId,
    },
    /// The configuration disagrees with a cluster-wide setting fixed at
    /// init.
    #[error(
        "`{setting}` is {configured} in this node's configuration, but cluster {cluster} was \
         initialised with {setting} = {cluster_value}; settings that shape replicated state \
         cannot differ between nodes: set {setting} = {cluster_value}"
    )]
    Settings {
        /// The setting's name in `node.toml`.
        setting: &'static str,
        /// The cluster's value.
        cluster_value: u64,
        /// The configured value.
        configured: u64,
        /// The cluster.
        cluster: ClusterId,
    },
    /// `init` on a data directory that already has an identity.
    #[error("the data directory already belongs to node {node} of cluster {cluster}")]
    AlreadyInitialised {
        /// Its cluster.
        cluster: ClusterId,
        /// Its node.
        node: NodeId,
    },
    /// A node without data found no peer that knows the cluster in time.
    #[error("no peer answered with a cluster identity within {0:?}")]
    NoCluster(Duration),
}

/// Why a running node stopped for good and its process must end
/// (fail-stop), so that systemd, Kubernetes or `auditflow up` restart it
/// and it replays what its disk really holds. Serving on with a store
/// that takes no writes would leave a node that answers and does nothing.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FailStop {
    /// Storage stopped taking writes after a failed write or sync.
    #[error("storage halted: {0}")]
    StorageHalted(Arc<StoreError>),
    /// A partition's Raft core stopped on a fatal error (a storage error
    /// it got, or a panic).
    #[error("partition {partition}: Raft core stopped: {source}")]
    RaftStopped {
        /// The partition.
        partition: u32,
        /// Why it stopped (boxed: it is large).
        source: Box<openraft::error::Fatal<NodeId>>,
    },
}

impl FailStop {
    /// The process exit code for this failure (BSD `sysexits.h`):
    /// `EX_IOERR` (74) for storage, `EX_SOFTWARE` (70) for a Raft core.
    pub fn exit_code(&self) -> u8 {
        match self {
            FailStop::StorageHalted(_) => 74,
            FailStop::RaftStopped { .. } => 70,
        }
    }
}

/// Whether a node must fail-stop, from its store's halt and each
/// partition's Raft core state (pure). A halted store wins: a core that
/// stopped afterwards stopped because of it. A core stopped on request
/// (`Fatal::Stopped`, a clean shutdown) is not a failure.
pub fn fail_stop(
    halted: Option<Arc<StoreError>>,
    cores: impl IntoIterator<Item = (u32, Result<(), openraft::error::Fatal<NodeId>>)>,
) -> Option<FailStop> {
    if let Some(cause) = halted {
        return Some(FailStop::StorageHalted(cause));
    }
    cores
        .into_iter()
        .find_map(|(partition, state)| match state {
            Ok(()) | Err(openraft::error::Fatal::Stopped) => None,
            Err(source) => Some(FailStop::RaftStopped {
                partition,
                source: Box::new(source),
            }),
        })
}

/// One partition on this node.
pub struct PartitionHandle {
    /// Its Raft group.
    pub raft: Raft,
    /// Its write path.
    pub actor: Addr<PartitionActor>,
    /// Read access to its applied state.
    pub reader: PartitionReader,
    /// Whether this node is rejoining the partition (`None`: a voter like
    /// any other); the peer handler refuses Raft RPCs by it.
    pub rejoin: Gate,
}

/// What the network handlers share: configuration and partitions.
pub struct NodeShared {
    /// This node's id.
    pub id: NodeId,
    /// The cluster it belongs to; peer requests naming another are
    /// refused.
    pub cluster: ClusterId,
    /// The cluster-wide settings (equal to the configuration's).
    pub settings: ClusterSettings,
    /// Its configuration.
    pub config: NodeConfig,
    /// Every node's id and address.
    pub nodes: Arc<Vec<NodeAddr>>,
    /// Partitions by index.
    pub partitions: Vec<PartitionHandle>,
    /// Live delivery status of the actors on this node.
    pub board: crate::delivery::status::StatusBoard,
    /// Wall clock.
    pub clock: Arc<dyn Clock>,
    /// Destinations this node delivers to: `node.toml`'s and the run-time
    /// catalog's, kept current by [`crate::delivery::catalog::follow`].
    pub destinations: tokio::sync::watch::Receiver<crate::delivery::catalog::Destinations>,
    /// Tells the delivery supervisors to record progress and stop.
    drain: tokio::sync::watch::Sender<bool>,
    /// Closes once every delivery supervisor has ended (each holds a
    /// sender).
    delivery_done: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<()>>,
    /// The store's halt: set once storage stopped taking writes.
    halt: crate::storage::Halt,
}

impl NodeShared {
    /// Why this node must stop for good, if it must (see [`fail_stop`]).
    /// The simulator asks after every step; the daemon waits on
    /// [`NodeShared::failed`].
    pub fn failure(&self) -> Option<FailStop> {
        fail_stop(self.halt.cause(), self.core_states())
    }

    /// Each partition's Raft core state, as its metrics report it; a core
    /// task that ended without recording why (its metrics sender is gone
    /// while they still say it runs) counts as `Fatal::Panicked`, since
    /// only a panic ends it so.
    pub fn core_states(&self) -> Vec<(u32, Result<(), openraft::error::Fatal<NodeId>>)> {
        self.partitions
            .iter()
            .enumerate()
            .map(|(p, h)| {
                let metrics = h.raft.metrics();
                let ended = metrics.has_changed().is_err();
                let state = match metrics.borrow().running_state.clone() {
                    Ok(()) if ended => Err(openraft::error::Fatal::Panicked),
                    state => state,
                };
                (p as u32, state)
            })
            .collect()
    }

    /// Why this node's storage stopped taking writes, if it did.
    pub fn storage_halted(&self) -> Option<Arc<StoreError>> {
        self.halt.cause()
    }

    /// Resolves once this node must fail-stop, with why: at once when its
    /// store halts, within [`CORE_CHECK_INTERVAL`] when a Raft core stops.
    pub async fn failed(&self) -> FailStop {
        let mut halted = self.halt.subscribe();
        let mut halt_open = true;
        let mut tick = tokio::time::interval(CORE_CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Some(f) = self.failure() {
                return f;
            }
            tokio::select! {
                changed = halted.changed(), if halt_open => halt_open = changed.is_ok(),
                _ = tick.tick() => {}
            }
        }
    }

    /// Stops delivery on this node after recording, through Raft, what
    /// each actor delivered but had not recorded yet (it records at most
    /// every 100 ms while streaming), so the partitions' next leaders
    /// resume exactly where this node stopped rather than re-sending up to
    /// 100 ms of events. Waits at most `within`; what is not recorded by
    /// then is delivered again by the next leader (at-least-once). Call it
    /// while the Raft groups and peer connections are still up.
    pub async fn drain_delivery(&self, within: Duration) {
        self.drain.send_replace(true);
        let mut done = self.delivery_done.lock().await;
        // `recv` yields `None` once every supervisor dropped its sender.
        if tokio::time::timeout(within, done.recv()).await.is_err() {
            warn!(node = self.id, "delivery did not drain within {within:?}");
        }
    }

    /// The partition, or a `BadRequest` naming the valid range.
    pub fn partition(&self, partition: u32) -> Result<&PartitionHandle, RequestError> {
        self.partitions
            .get(partition as usize)
            .ok_or_else(|| RequestError::BadRequest {
                reason: format!(
                    "no partition {partition}; the cluster has {}",
                    self.partitions.len()
                ),
            })
    }

    /// The leader of `partition` as this node knows it.
    pub fn leader_of(&self, partition: u32) -> Option<NodeId> {
        self.partitions
            .get(partition as usize)
            .and_then(|p| p.raft.metrics().borrow().current_leader)
    }

    /// `Ok` if this node leads `partition`; otherwise the redirect (or
    /// "unavailable" while no leader is known) the client should follow.
    /// Also "unavailable" while the group's voters are not a majority of
    /// the configured members (a cluster still forming after `init`): a
    /// commit then would not be on a majority of the cluster (G1).
    pub fn require_leader(&self, partition: u32) -> Result<(), RequestError> {
        match self.leader_of(partition) {
            Some(id) if id == self.id => {
                let voters = self
                    .partition(partition)?
                    .raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .collect();
                let members: Vec<NodeId> = self.config.peers.iter().map(|p| p.id).collect();
                if rejoin::has_configured_quorum(&voters, &members) {
                    Ok(())
                } else {
                    Err(RequestError::Unavailable {
                        partition,
                        reason: format!(
                            "voters {voters:?} are not yet a majority of the {} members; \
                             waiting for members to join",
                            members.len()
                        ),
                    })
                }
            }
            Some(id) => Err(RequestError::NotLeader {
                partition,
                leader: self.node_addr(id),
            }),
            None => Err(RequestError::Unavailable {
                partition,
                reason: "no leader elected".into(),
            }),
        }
    }

    /// Status of every (destination, partition) this node leads.
    pub fn dest_status(
        &self,
    ) -> Result<Vec<auditflow_protocol::delivery::DestinationStatus>, RequestError> {
        crate::delivery::status::dest_status(self.id, &self.board, self.clock.now(), |p| {
            self.partition(p).map(|h| &h.reader)
        })
    }

    /// Id and address of node `id`.
    pub fn node_addr(&self, id: NodeId) -> Option<NodeAddr> {
        self.nodes.iter().find(|n| n.id == id).cloned()
    }

    /// Cluster layout for clients.
    pub fn metadata(&self) -> ClusterMetadata {
        ClusterMetadata {
            partition_count: self.config.partitions,
            nodes: self.nodes.as_ref().clone(),
            leaders: (0..self.config.partitions)
                .map(|p| self.leader_of(p))
                .collect(),
            limits: self.config.limits,
        }
    }

    /// This node's view of every partition.
    pub fn status(&self) -> NodeStatus {
        let partitions = self
            .partitions
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let m = p.raft.metrics().borrow().clone();
                let head = p.reader.head().ok();
                PartitionStatus {
                    partition: i as u32,
                    role: match m.state {
                        ServerState::Leader => Role::Leader,
                        ServerState::Follower => Role::Follower,
                        ServerState::Candidate => Role::Candidate,
                        ServerState::Learner => Role::Learner,
                        ServerState::Shutdown => Role::Shutdown,
                    },
                    leader: m.current_leader,
                    term: m.current_term,
                    last_log_index: m.last_log_index,
                    applied_index: m.last_applied.map(|l| l.index),
                    snapshot_index: m.snapshot.map(|l| l.index),
                    purged_index: m.purged.map(|l| l.index),
                    next_offset: head.map(|h| h.next_offset).unwrap_or(0),
                    last_hash: head.map(|h| h.last_hash).unwrap_or(Hash32::ZERO),
                }
            })
            .collect();
        NodeStatus {
            node: self.node_addr(self.id).unwrap_or(NodeAddr {
                id: self.id,
                addr: self.config.listen.to_string(),
            }),
            partitions,
        }
    }
}

fn raft_config(config: &NodeConfig, partition: u32) -> Result<Arc<openraft::Config>, NodeError> {
    let r = &config.raft;
    let cfg = openraft::Config {
        cluster_name: format!("auditflow-p{partition}"),
        heartbeat_interval: r.heartbeat_ms,
        election_timeout_min: r.election_timeout_min_ms,
        election_timeout_max: r.election_timeout_max_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(r.snapshot_logs_since_last),
        max_in_snapshot_log_to_keep: r.max_in_snapshot_log_to_keep,
        // Chunks well under the peer frame limit.
        snapshot_max_chunk_size: 4 * 1024 * 1024,
        install_snapshot_timeout: 10_000,
        ..Default::default()
    };
    Ok(Arc::new(
        cfg.validate()
            .map_err(|e| NodeError::RaftConfig(e.to_string()))?,
    ))
}

/// Starts every partition of a node over the given seams, as the node of
/// `identity` (from [`identify`]). Must run inside an actix system (the
/// partition actors live on its arbiter). `seed` is the randomness seam
/// of delivery (backoff jitter): from the OS in production, from the
/// run's seed in the simulator.
///
/// A founding node (`identity.bootstrap`) initialises each group with
/// itself as the only voter; a partition this node is rejoining, or whose
/// group has neither vote nor log although the node has an identity (its
/// Raft log is gone), goes through `partition::rejoin`.
pub async fn start(
    config: NodeConfig,
    identity: Identity,
    store: &Store,
    transport: Arc<dyn RaftTransport>,
    clock: Arc<dyn Clock>,
    sinks: crate::delivery::supervisor::SinkFactory,
    seed: u64,
) -> Result<Arc<NodeShared>, NodeError> {
    check_identity(&config, &identity)?;
    let link = PeerLink::new(transport, identity.cluster, config.id);
    let members: BTreeMap<NodeId, BasicNode> = config
        .peers
        .iter()
        .map(|p| (p.id, BasicNode::new(p.addr.clone())))
        .collect();
    let nodes: Arc<Vec<NodeAddr>> = Arc::new(
        config
            .peers
            .iter()
            .map(|p| NodeAddr {
                id: p.id,
                addr: p.addr.clone(),
            })
            .collect(),
    );
    let mut partitions = Vec::with_capacity(config.partitions as usize);
    let mut rejoining = Vec::new();
    // Per partition: raised by the rebalancer during a handover, watched
    // by the partition's delivery actors.
    let (handovers, handover_watches): (Vec<_>, Vec<_>) = (0..config.partitions)
        .map(|_| tokio::sync::watch::channel(false))
        .unzip();
    for p in 0..config.partitions {
        let raft = Raft::new(
            config.id,
            raft_config(&config, p)?,
            PartitionNetwork::new(p, link.clone()),
            store.log_store(p),
            store
                .state_machine(p, config.dedup_window)
                .sharing_followers_commits(config.id),
        )
        .await
        .map_err(|source| start_error(store, p, source))?;
        let initialised = raft
            .is_initialized()
            .await
            .map_err(|source| start_error(store, p, source))?;
        let mut state = identity.rejoin.get(&p).copied();
        if identity.bootstrap && !initialised {
            // `NodeConfig::check` makes sure the node is among its peers.
            let address = members
                .get(&config.id)
                .cloned()
                .unwrap_or_else(|| BasicNode::new(config.listen.to_string()));
            raft.initialize(BTreeMap::from([(config.id, address)]))
                .await
                .map_err(|e| NodeError::Init {
                    partition: p,
                    reason: e.to_string(),
                })?;
            info!(
                partition = p,
                "initialised with this founding node as its voter"
            );
        } else if !identity.bootstrap && !initialised && state.is_none() {
            // An identity but neither vote nor log: what this node
            // acknowledged is gone.
            warn!(
                partition = p,
                "no Raft state for this partition; rejoining as a learner"
            );
            store.set_rejoin(p, Some(RejoinState::Pending)).await?;
            state = Some(RejoinState::Pending);
        } else if state.is_none() && store.is_damaged(p) {
            // Replay found synced records of this partition damaged: the
            // log lost entries this node acknowledged, so it must not vote
            // or count toward a commit with it. The same path as a lost
            // disk: demoted to learner, repaired by the leader's appends or
            // snapshot, promoted back once caught up.
            warn!(
                partition = p,
                "raft log damaged in synced records; rejoining as a learner"
            );
            store.set_rejoin(p, Some(RejoinState::Pending)).await?;
            state = Some(RejoinState::Pending);
        }
        if state.is_some() {
            // Before the first election timeout can fire.
            raft.runtime_config().elect(false);
        }
        let (gate, rejoin) = watch::channel(state);
        if state.is_some() {
            rejoining.push((p, raft.clone(), gate));
        }
        let actor = PartitionActor::new(
            p,
            raft.clone(),
            Arc::clone(&clock),
            config.limits,
            Arc::clone(&nodes),
        )
        .with_queued_bytes_max(config.memory.queued_append_bytes_per_partition)
        .start();
        partitions.push(PartitionHandle {
            raft,
            actor,
            reader: store.reader(p),
            rejoin,
        });
    }
    if identity.bootstrap {
        store.update_identity(|id| id.bootstrap = false).await?;
    }
    let member_ids: Vec<NodeId> = members.keys().copied().collect();
    for (p, raft, gate) in rejoining {
        actix_rt::spawn(rejoin::rejoin(
            config.id,
            p,
            raft,
            link.clone(),
            member_ids.clone(),
            store.clone(),
            gate,
        ));
    }
    actix_rt::spawn(rejoin::promote_members(
        partitions.iter().map(|h| h.raft.clone()).collect(),
        members,
        rejoin::PROMOTE_EVERY,
    ));
    if config.raft.rebalance_leaders_ms > 0 {
        use crate::partition::rebalance::{rebalance_leaders, Group};
        actix_rt::spawn(rebalance_leaders(
            config.id,
            config.peers.iter().map(|p| p.id).collect(),
            partitions
                .iter()
                .zip(handovers)
                .map(|(h, handing_over)| Group {
                    raft: h.raft.clone(),
                    actor: h.actor.clone(),
                    handing_over,
                })
                .collect(),
            link.clone(),
            Duration::from_millis(config.raft.rebalance_leaders_ms),
            Duration::from_millis(config.raft.election_timeout_max_ms),
        ));
    }
    actix_rt::spawn(crate::partition::compaction::compact_quiet_partitions(
        store.log_usage(),
        partitions.iter().map(|h| h.raft.clone()).collect(),
        config.raft.max_in_snapshot_log_to_keep,
    ));
    let board = crate::delivery::status::StatusBoard::default();
    let statics: Vec<Arc<crate::delivery::DestinationConfig>> =
        config.destinations.iter().cloned().map(Arc::new).collect();
    let (destinations_tx, destinations) = tokio::sync::watch::channel(Arc::new(statics.clone()));
    let catalog = auditflow_protocol::delivery::CATALOG_PARTITION as usize;
    if let Some(handle) = partitions.get(catalog) {
        actix_rt::spawn(crate::delivery::catalog::follow(
            handle.reader.clone(),
            statics,
            destinations_tx,
        ));
    }
    let (drain, draining) = tokio::sync::watch::channel(false);
    let (delivery_running, delivery_done) = tokio::sync::mpsc::channel(1);
    let delivery = crate::delivery::supervisor::DeliveryContext {
        node: config.id,
        destinations: destinations.clone(),
        board: board.clone(),
        clock: Arc::clone(&clock),
        sinks,
        seeds: Arc::new(std::sync::Mutex::new(
            <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed),
        )),
        draining,
        running: delivery_running,
    };
    for ((p, handle), handing_over) in partitions.iter().enumerate().zip(handover_watches) {
        actix_rt::spawn(crate::delivery::supervisor::supervise(
            delivery.clone(),
            p as u32,
            handle.raft.clone(),
            handle.reader.clone(),
            handing_over,
        ));
    }
    Ok(Arc::new(NodeShared {
        id: config.id,
        cluster: identity.cluster,
        settings: identity.settings,
        config,
        nodes,
        partitions,
        board,
        clock,
        destinations,
        drain,
        delivery_done: tokio::sync::Mutex::new(delivery_done),
        halt: store.halt().clone(),
    }))
}

/// Why partition `partition`'s group did not start, typed: the storage
/// error itself if the store halted (openraft only keeps its text), what
/// openraft could not read if it was a storage error, else openraft's.
fn start_error(store: &Store, partition: u32, source: openraft::error::Fatal<NodeId>) -> NodeError {
    if let Some(cause) = store.halt().cause() {
        return NodeError::Store(cause.shared());
    }
    match source {
        openraft::error::Fatal::StorageError(source) => NodeError::RaftStorage {
            partition,
            source: Box::new(source),
        },
        source => NodeError::Raft {
            partition,
            source: Box::new(source),
        },
    }
}

/// The cluster-wide settings `config` asks for.
pub fn settings_of(config: &NodeConfig) -> ClusterSettings {
    ClusterSettings {
        partitions: config.partitions,
        dedup_window: config.dedup_window,
    }
}

/// Refuses a configuration that disagrees with the stored identity: another
/// node id, or another value of a cluster-wide setting (naming both).
pub fn check_identity(config: &NodeConfig, identity: &Identity) -> Result<(), NodeError> {
    if identity.node != config.id {
        return Err(NodeError::WrongNode {
            stored: identity.node,
            configured: config.id,
            cluster: identity.cluster,
        });
    }
    let configured = settings_of(config);
    let pairs: [(&'static str, u64, u64); 2] = [
        (
            "partitions",
            identity.settings.partitions.into(),
            configured.partitions.into(),
        ),
        (
            "dedup_window",
            identity.settings.dedup_window,
            configured.dedup_window,
        ),
    ];
    for (setting, cluster_value, configured) in pairs {
        if cluster_value != configured {
            return Err(NodeError::Settings {
                setting,
                cluster_value,
                configured,
                cluster: identity.cluster,
            });
        }
    }
    Ok(())
}

/// Creates a cluster: stores an identity with a new cluster id and the
/// configuration's settings, marked as the founder, in a data directory
/// that has none. The node then initialises every group with itself as the
/// only voter at its next start, and the others join it. `cluster` comes
/// from the caller's randomness (the OS, or the simulator's seed).
pub async fn init(
    config: &NodeConfig,
    store: &Store,
    cluster: ClusterId,
) -> Result<Identity, NodeError> {
    if let Some(existing) = store.identity()? {
        return Err(NodeError::AlreadyInitialised {
            cluster: existing.cluster,
            node: existing.node,
        });
    }
    let identity = Identity {
        cluster,
        node: config.id,
        settings: settings_of(config),
        bootstrap: true,
        rejoin: BTreeMap::new(),
    };
    store.write_identity(&identity).await?;
    info!(%cluster, node = config.id, "cluster initialised");
    Ok(identity)
}

/// This node's identity: the stored one, checked against `config`; or, for
/// a data directory without one, the cluster's as a peer tells it
/// ([`discover`]), stored with every partition marked as rejoining, so the
/// node never votes with the data it lacks. Waits for a peer at most
/// `patience` (for ever if `None`: a node waiting for `init`).
pub async fn identify(
    config: &NodeConfig,
    store: &Store,
    transport: Arc<dyn RaftTransport>,
    patience: Option<Duration>,
) -> Result<Identity, NodeError> {
    if let Some(identity) = store.identity()? {
        check_identity(config, &identity)?;
        return Ok(identity);
    }
    let found = match patience {
        Some(p) => tokio::time::timeout(p, discover(config, transport))
            .await
            .map_err(|_| NodeError::NoCluster(p))?,
        None => discover(config, transport).await,
    };
    let (cluster, settings) = found;
    let identity = Identity {
        cluster,
        node: config.id,
        settings,
        bootstrap: false,
        rejoin: (0..settings.partitions)
            .map(|p| (p, RejoinState::Pending))
            .collect(),
    };
    check_identity(config, &identity)?;
    store.write_identity(&identity).await?;
    info!(%cluster, node = config.id, "joined the cluster a peer named; rejoining every partition");
    Ok(identity)
}

/// Asks the other configured nodes, in rounds, which cluster they belong
/// to, until one names it.
pub async fn discover(
    config: &NodeConfig,
    transport: Arc<dyn RaftTransport>,
) -> (ClusterId, ClusterSettings) {
    let link = PeerLink::new(transport, ClusterId::UNKNOWN, config.id);
    let mut rounds: u64 = 0;
    loop {
        for peer in config.peers.iter().filter(|p| p.id != config.id) {
            if let Ok(PeerResponse::Hello(Some(found))) =
                link.call(peer.id, PeerRequest::Hello, HELLO_RPC).await
            {
                return found;
            }
        }
        if rounds.is_multiple_of(20) {
            info!(
                "no data and no peer knows a cluster yet: waiting for `auditflow init` on one \
                 node, or for a peer that has it"
            );
        }
        rounds += 1;
        tokio::time::sleep(HELLO_RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(node: NodeId, partitions: u32, dedup_window: u64) -> Identity {
        Identity {
            cluster: ClusterId(7),
            node,
            settings: ClusterSettings {
                partitions,
                dedup_window,
            },
            bootstrap: false,
            rejoin: BTreeMap::new(),
        }
    }

    fn config(id: NodeId, partitions: u32, dedup_window: u64) -> NodeConfig {
        let toml = format!(
            "id = {id}\nlisten = \"127.0.0.1:7001\"\ndata_dir = \"d\"\npartitions = {partitions}\n\
             dedup_window = {dedup_window}\n\
             peers = [{{ id = 1, addr = \"a:1\" }}, {{ id = 2, addr = \"a:2\" }}]\n\
             [tls]\nca_cert = \"c\"\ncert = \"c\"\nkey = \"k\"\n"
        );
        match toml::from_str(&toml) {
            Ok(c) => c,
            Err(e) => panic!("test config: {e}"),
        }
    }

    #[test]
    fn a_configuration_must_match_the_stored_identity() {
        let ok = check_identity(&config(1, 8, 100), &identity(1, 8, 100));
        assert!(ok.is_ok(), "{ok:?}");
        let node = check_identity(&config(2, 8, 100), &identity(1, 8, 100));
        assert!(
            matches!(
                node,
                Err(NodeError::WrongNode {
                    stored: 1,
                    configured: 2,
                    ..
                })
            ),
            "{node:?}"
        );
        let parts = check_identity(&config(1, 4, 100), &identity(1, 8, 100));
        let text = parts
            .as_ref()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            matches!(
                parts,
                Err(NodeError::Settings {
                    setting: "partitions",
                    cluster_value: 8,
                    configured: 4,
                    ..
                })
            ),
            "{text}"
        );
        assert!(text.contains('8') && text.contains('4'), "{text}");
        let dedup = check_identity(&config(1, 8, 50), &identity(1, 8, 100));
        assert!(
            matches!(
                dedup,
                Err(NodeError::Settings {
                    setting: "dedup_window",
                    cluster_value: 100,
                    configured: 50,
                    ..
                })
            ),
            "{dedup:?}"
        );
    }

    use openraft::error::Fatal;
    use openraft::{ErrorSubject, ErrorVerb};

    fn storage_fatal() -> Fatal<NodeId> {
        Fatal::StorageError(crate::storage::log_store::raft_err(
            ErrorSubject::Logs,
            ErrorVerb::Write,
            StoreError::WriterStopped,
        ))
    }

    fn full_disk() -> Arc<StoreError> {
        Arc::new(StoreError::io(
            "raft log: write segment 2",
            std::io::Error::from_raw_os_error(28),
        ))
    }

    /// Which cores and halts make a node fail-stop, and what it says.
    #[test]
    fn a_halted_store_or_a_core_stopped_by_an_error_fails_the_node() {
        // openraft's own state type: its size is not ours to change.
        #[allow(clippy::result_large_err)]
        let ok = || Ok(());
        type Case = (
            Option<Arc<StoreError>>,
            Vec<(u32, Result<(), Fatal<NodeId>>)>,
            Option<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (None, vec![(0, ok()), (1, ok())], None),
            // A clean shutdown is not a failure.
            (None, vec![(0, Err(Fatal::Stopped)), (1, ok())], None),
            (
                None,
                vec![(0, ok()), (1, Err(storage_fatal()))],
                Some("partition 1: Raft core stopped"),
            ),
            (
                None,
                vec![(0, ok()), (3, Err(Fatal::Panicked))],
                Some("partition 3: Raft core stopped: panicked"),
            ),
            // The halt is the cause; the cores stopped because of it.
            (
                Some(full_disk()),
                vec![(0, Err(storage_fatal()))],
                Some("storage halted: raft log: write segment 2: disk full"),
            ),
            (Some(full_disk()), vec![], Some("storage halted")),
        ];
        for (halted, cores, want) in cases {
            let got = fail_stop(halted, cores.clone()).map(|f| f.to_string());
            match (got, want) {
                (None, None) => {}
                (Some(got), Some(want)) => assert!(got.starts_with(want), "{got} / {want}"),
                (got, want) => panic!("{cores:?}: got {got:?}, want {want:?}"),
            }
        }
        assert_eq!(
            fail_stop(Some(full_disk()), []).map(|f| f.exit_code()),
            Some(74)
        );
        assert_eq!(
            fail_stop(None, [(0, Err(Fatal::Panicked))]).map(|f| f.exit_code()),
            Some(70)
        );
    }
}
