//! A node process with the production seams: a redb file and Raft log
//! segment files, a QUIC endpoint (`net`), the admin HTTP server (`admin`)
//! and the system clock, around the node that [`node::start`] wires. The
//! binary's `node` and `up` commands run this; the simulator wires
//! [`node::start`] with its own seams instead.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::clock::SystemClock;
use crate::config::NodeConfig;
use crate::net::endpoint::{EndpointError, NodeEndpoint};
use crate::node::{self, NodeError, NodeShared};
use crate::partition::actor::Shutdown;
use crate::storage::{Store, StoreError};

/// File name of the node's database inside its data directory.
pub const DB_FILE: &str = "auditflow.redb";
/// Longest a clean stop waits for delivery to record its progress (an
/// idle actor answers at once and a send under way finishes first; a sink
/// that hangs is not waited for).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a clean stop waits for its QUIC connections to finish closing.
/// Not longer: when the peers are stopping too, connections to them can
/// sit in draining for seconds (measured 2-4 s in one `up` stop out of
/// five), and Raft does not need the close frame to move on.
const CLOSE_WAIT: Duration = Duration::from_millis(500);

/// Why a node process could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The database could not be opened.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// The QUIC endpoint could not be set up.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The node's Raft groups could not be started.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The data directory could not be created or the admin listener bound.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A node serving on QUIC.
pub struct RunningNode {
    /// The shared state.
    pub shared: Arc<NodeShared>,
    endpoint: NodeEndpoint,
    store: Store,
}

impl RunningNode {
    /// Resolves once the node must stop for good (fail-stop): its storage
    /// halted or a Raft core stopped on an error. The caller ends the
    /// process with [`node::FailStop::exit_code`]; a clean shutdown would
    /// need the writes that just failed.
    pub async fn failed(&self) -> node::FailStop {
        self.shared.failed().await
    }

    /// Stops serving, shuts every Raft group down and closes the database.
    pub async fn shutdown(self) {
        // Before the endpoint closes: recording progress needs the peers.
        self.shared.drain_delivery(DRAIN_TIMEOUT).await;
        self.endpoint.close_now();
        for p in &self.shared.partitions {
            if let Err(e) = p.actor.send(Shutdown).await {
                warn!("partition actor already gone: {e}");
            }
        }
        // Gives peers a chance to hear the close.
        self.endpoint.wait_closed(CLOSE_WAIT).await;
        drop(self.store);
    }
}

/// Opens the store in `config.data_dir`, creating the directory.
fn open_store(config: &NodeConfig) -> Result<Store, DaemonError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| DaemonError::Io {
        what: format!("create data directory {}", config.data_dir.display()),
        source,
    })?;
    let db_path: PathBuf = config.data_dir.join(DB_FILE);
    Ok(Store::open_with_segments(
        &db_path,
        config.raft.log_segment_bytes,
    )?)
}

/// `auditflow init`: creates a new cluster with this (stopped) node as its
/// founder ([`node::init`]), with a cluster id from the OS's randomness.
/// The other nodes learn it from the founder when they start.
pub async fn init_cluster(
    config: &NodeConfig,
) -> Result<crate::storage::identity::Identity, DaemonError> {
    let store = open_store(config)?;
    let cluster = crate::storage::identity::ClusterId(rand::random::<u128>().max(1));
    Ok(node::init(config, &store, cluster).await?)
}

/// The identity stored in `config.data_dir`, if any (the node must be
/// stopped: the database is locked while it runs).
pub fn stored_identity(
    config: &NodeConfig,
) -> Result<Option<crate::storage::identity::Identity>, DaemonError> {
    if !config.data_dir.join(DB_FILE).exists() {
        return Ok(None);
    }
    Ok(open_store(config)?.identity()?)
}

/// Starts a node with the production seams: redb file and log segments,
/// QUIC, system clock. A node without data waits until a peer knows the
/// cluster (after `auditflow init` on one node) before it serves.
pub async fn run_quic_node(config: NodeConfig) -> Result<RunningNode, DaemonError> {
    let store = open_store(&config)?;
    let endpoint = NodeEndpoint::bind(&config.tls, config.listen, &config.memory)?;
    let admin = match config.admin_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Io {
                    what: format!("bind admin HTTP listener {addr} (admin_listen)"),
                    source,
                })?,
        ),
        None => None,
    };
    let transport: Arc<dyn crate::partition::transport::RaftTransport> = Arc::new(
        endpoint.peers(
            config
                .peers
                .iter()
                .map(|p| (p.id, p.addr.clone()))
                .collect(),
        ),
    );
    // Before serving: a node without data learns its cluster from a peer
    // (or waits for `init`), and one whose data or settings disagree with
    // its configuration stops here with the reason.
    let identity = node::identify(&config, &store, Arc::clone(&transport), None).await?;
    info!(node = config.id, cluster = %identity.cluster, "identity");
    let sink_cluster = identity.cluster.to_string();
    let shared = node::start(
        config,
        identity,
        &store,
        transport,
        Arc::new(SystemClock),
        // Sinks key idempotent writes on (cluster, partition, offset):
        // the cluster id created at init, the same on every node and
        // different between clusters that might share a table or index.
        crate::delivery::supervisor::real_sinks(crate::sinks::SinkContext {
            cluster: sink_cluster,
            // Set per destination by `real_sinks`.
            max_in_flight: 1,
        }),
        // Delivery's randomness seam: seeded from the OS.
        rand::random(),
    )
    .await?;
    tokio::spawn(endpoint.serve(Arc::clone(&shared)));
    if let Some(listener) = admin {
        tokio::spawn(crate::admin::serve(listener, Arc::clone(&shared)));
    }
    info!(node = shared.id, listen = %shared.config.listen, "node started");
    Ok(RunningNode {
        shared,
        endpoint,
        store,
    })
}
