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

/// The cluster id sinks key their writes on (`SinkContext::cluster`).
///
/// LEAD: swap for the cluster id created at init and stored with the
/// node's data (branch `identity`) once it is merged; this is the one
/// place it is chosen. Until then: the SHA-256 of the cluster CA
/// certificate (first 16 hex digits), the same on every node of a
/// cluster and different between clusters, never a shared constant
/// (two clusters writing one table would take each other's events for
/// duplicates).
fn sink_cluster_id(ca_cert: &std::path::Path) -> Result<String, DaemonError> {
    use sha2::Digest;
    let pem = std::fs::read(ca_cert).map_err(|source| DaemonError::Io {
        what: format!("read CA certificate {}", ca_cert.display()),
        source,
    })?;
    let digest = sha2::Sha256::digest(&pem);
    Ok(format!("ca-{}", hex::encode(&digest[..8])))
}

/// Starts a node with the production seams: redb file and log segments,
/// QUIC, system clock.
pub async fn run_quic_node(config: NodeConfig) -> Result<RunningNode, DaemonError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| DaemonError::Io {
        what: format!("create data directory {}", config.data_dir.display()),
        source,
    })?;
    let db_path: PathBuf = config.data_dir.join(DB_FILE);
    let store = Store::open_with_segments(&db_path, config.raft.log_segment_bytes)?;
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
    let transport = endpoint.peers(
        config
            .peers
            .iter()
            .map(|p| (p.id, p.addr.clone()))
            .collect(),
    );
    let config_tls_ca = config.tls.ca_cert.clone();
    let shared = node::start(
        config,
        &store,
        Arc::new(transport),
        Arc::new(SystemClock),
        crate::delivery::supervisor::real_sinks(crate::sinks::SinkContext {
            cluster: sink_cluster_id(&config_tls_ca)?,
        }),
        // Delivery's randomness seam: seeded from the OS.
        rand::random(),
    )
    .await?;
    tokio::spawn(endpoint.serve(Arc::clone(&shared)));
    tokio::spawn(node::initialize_partitions(Arc::clone(&shared)));
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
