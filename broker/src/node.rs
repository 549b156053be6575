//! A node: its partitions' Raft groups and actors, the shared state the
//! network handlers read, start-up and shutdown.
//!
//! [`start`] wires a node from its seams (store, Raft transport, clock,
//! sinks) and is what the simulator calls; `daemon::run_quic_node` adds the
//! real ones: a redb file and Raft log segment files, a QUIC endpoint and
//! the system clock. Nothing here knows quinn.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr};
use auditflow_protocol::wire::{
    ClusterMetadata, NodeAddr, NodeStatus, PartitionStatus, RequestError, Role,
};
use auditflow_protocol::Hash32;
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use tracing::{info, warn};

use crate::clock::Clock;
use crate::config::NodeConfig;
use crate::partition::actor::PartitionActor;
use crate::partition::network::PartitionNetwork;
use crate::partition::transport::RaftTransport;
use crate::partition::{NodeId, Raft};
use crate::storage::{PartitionReader, Store, StoreError};

/// How long a node waits for the preferred node of a partition to
/// initialise it before doing so itself (if still leaderless).
const INIT_GRACE: Duration = Duration::from_secs(5);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The database could not be opened.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// The Raft configuration is invalid.
    #[error("raft config: {0}")]
    RaftConfig(String),
    /// A Raft group failed to start.
    #[error("raft: {0}")]
    Raft(String),
}

/// One partition on this node.
pub struct PartitionHandle {
    /// Its Raft group.
    pub raft: Raft,
    /// Its write path.
    pub actor: Addr<PartitionActor>,
    /// Read access to its applied state.
    pub reader: PartitionReader,
}

/// What the network handlers share: configuration and partitions.
pub struct NodeShared {
    /// This node's id.
    pub id: NodeId,
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
}

impl NodeShared {
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
    pub fn require_leader(&self, partition: u32) -> Result<(), RequestError> {
        match self.leader_of(partition) {
            Some(id) if id == self.id => Ok(()),
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

/// Starts every partition of a node over the given seams. Must run inside
/// an actix system (the partition actors live on its arbiter). `seed` is
/// the randomness seam of delivery (backoff jitter): from the OS in
/// production, from the run's seed in the simulator.
pub async fn start(
    config: NodeConfig,
    store: &Store,
    transport: Arc<dyn RaftTransport>,
    clock: Arc<dyn Clock>,
    sinks: crate::delivery::supervisor::SinkFactory,
    seed: u64,
) -> Result<Arc<NodeShared>, NodeError> {
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
    // Per partition: raised by the rebalancer during a handover, watched
    // by the partition's delivery actors.
    let (handovers, handover_watches): (Vec<_>, Vec<_>) = (0..config.partitions)
        .map(|_| tokio::sync::watch::channel(false))
        .unzip();
    for p in 0..config.partitions {
        let raft = Raft::new(
            config.id,
            raft_config(&config, p)?,
            PartitionNetwork::new(p, Arc::clone(&transport)),
            store.log_store(p),
            store
                .state_machine(p, config.dedup_window)
                .sharing_followers_commits(config.id),
        )
        .await
        .map_err(|e| NodeError::Raft(format!("partition {p}: {e}")))?;
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
        });
    }
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
            Arc::clone(&transport),
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
        config,
        nodes,
        partitions,
        board,
        clock,
        destinations,
        drain,
        delivery_done: tokio::sync::Mutex::new(delivery_done),
    }))
}

/// Initialises the Raft groups of a fresh cluster, spreading leaders: the
/// preferred node of partition `p` is the `p mod n`-th node by id, and it
/// initialises `p` (which also makes it campaign first). A node that finds
/// a partition still leaderless after [`INIT_GRACE`] (its preferred node is
/// down at first start) initialises it itself; openraft allows several
/// nodes to initialise with the same membership. A group that already has
/// a vote or a log (every group on a restart) is not initialised again.
pub async fn initialize_partitions(node: Arc<NodeShared>) {
    let members: BTreeMap<NodeId, BasicNode> = node
        .config
        .peers
        .iter()
        .map(|p| (p.id, BasicNode::new(p.addr.clone())))
        .collect();
    let ids: Vec<NodeId> = members.keys().copied().collect();
    for (p, handle) in node.partitions.iter().enumerate() {
        // A restart finds its groups initialised: asking again only made
        // openraft log an error on every start.
        if crate::partition::rebalance::preferred_leader(p as u32, &ids) == Some(node.id)
            && !initialised(&handle.raft).await
        {
            let _ = handle.raft.initialize(members.clone()).await;
        }
    }
    tokio::time::sleep(INIT_GRACE).await;
    for (p, handle) in node.partitions.iter().enumerate() {
        let leaderless = handle.raft.metrics().borrow().current_leader.is_none();
        if leaderless && !initialised(&handle.raft).await {
            info!(partition = p, "initialising leaderless partition");
            let _ = handle.raft.initialize(members.clone()).await;
        }
    }
}

/// Whether a group has a vote or a log already, so that openraft would
/// refuse to initialise it. Asked of the group itself: its metrics start
/// out empty and are filled only once it has loaded its state, which a
/// restart raced (openraft then logged "Can not initialize" once in eight
/// runs of the restart test). A group that has stopped counts as
/// initialised: there is nothing to do for it.
async fn initialised(raft: &Raft) -> bool {
    raft.is_initialized().await.unwrap_or(true)
}
