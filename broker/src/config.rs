//! Node configuration (`node.toml`).
//!
//! Relative paths are resolved against the directory of the file, so a
//! cluster directory can be moved as a whole.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use auditflow_protocol::Limits;
use serde::{Deserialize, Serialize};

use crate::replicated::NodeId;

/// Default partition count: enough to spread leaders over three nodes and
/// to pipeline, few enough that per-partition overhead stays small.
pub const DEFAULT_PARTITIONS: u32 = 8;
/// Default dedup window per partition (G5): ids of the last million events
/// of a partition are remembered; the index lives on disk, not in memory.
pub const DEFAULT_DEDUP_WINDOW: u64 = 1_000_000;

/// Default size of a Raft log segment file: large enough that rolling is
/// rare, small enough that a compacted segment frees its space soon. The
/// same size storage takes when it is not told (`Store::open`).
pub const DEFAULT_LOG_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Smallest Raft log segment accepted (64 KiB): smaller would start a
/// file for nearly every write.
pub const MIN_SEGMENT_BYTES: u64 = 64 * 1024;
/// Largest Raft log segment accepted (4 GiB): a segment is read whole at
/// start-up.
pub const MAX_SEGMENT_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// Memory bounds of a node, in bytes and connections (`[memory]`; G8).
///
/// What a node holds for clients is bounded by these: a request's bytes
/// (its frame and decoded form) are counted from when its length is read
/// until it is answered, against its connection and the node; appends
/// queued for a Raft slot are part of that, and bounded per partition too
/// so one hot partition cannot hold all of it; QUIC buffers at most
/// `receive_window_bytes` unread per connection. A node therefore holds at
/// most about `request_bytes_total + max_connections ×
/// receive_window_bytes` for clients, besides its fixed overhead (Raft
/// and storage caches; `docs/performance.md` has measurements). Past a
/// bound the client gets `Overloaded` with a retry hint, never a stall.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryLimits {
    /// Bytes of appends waiting for a Raft slot per partition (canonical
    /// event bytes plus a fixed per-event overhead). Default 16 MiB: four
    /// full entries, so a busy partition's next entries are always full.
    pub queued_append_bytes_per_partition: u64,
    /// Bytes of client requests being read or handled per connection
    /// (twice the frame length each). Default 32 MiB; at least four times
    /// `limits.max_batch_bytes` (a frame and its decoded form, with room
    /// for the encoding's overhead), so a full batch always fits alone. A
    /// request needing more than this is refused as too large.
    pub request_bytes_per_connection: u64,
    /// Bytes of client requests being read or handled on the node, over
    /// all connections. Default 128 MiB.
    pub request_bytes_total: u64,
    /// Client connections at once (peers do not count). Default 512.
    pub max_connections: u32,
    /// Bytes QUIC buffers unread per connection (its flow-control
    /// window). Default 512 KiB: above a LAN's bandwidth-delay product,
    /// and 512 connections of it are 256 MiB.
    pub receive_window_bytes: u64,
}

/// Smallest QUIC receive window accepted: below it flow control stalls a
/// stream on every packet.
pub const MIN_RECEIVE_WINDOW_BYTES: u64 = 64 * 1024;

impl Default for MemoryLimits {
    fn default() -> Self {
        MemoryLimits {
            queued_append_bytes_per_partition: 16 * 1024 * 1024,
            request_bytes_per_connection: 32 * 1024 * 1024,
            request_bytes_total: 128 * 1024 * 1024,
            max_connections: 512,
            receive_window_bytes: 512 * 1024,
        }
    }
}

impl MemoryLimits {
    /// Checks that the bounds fit together: a full batch of
    /// `max_batch_bytes` fits a connection's bound, a connection's the
    /// node's.
    pub fn check(&self, max_batch_bytes: usize) -> Result<(), String> {
        let full_batch = 4 * max_batch_bytes as u64;
        if self.request_bytes_per_connection < full_batch {
            return Err(format!(
                "memory.request_bytes_per_connection must be at least {full_batch} (four times limits.max_batch_bytes), got {}",
                self.request_bytes_per_connection
            ));
        }
        if self.request_bytes_total < self.request_bytes_per_connection {
            return Err(format!(
                "memory.request_bytes_total ({}) must be at least memory.request_bytes_per_connection ({})",
                self.request_bytes_total, self.request_bytes_per_connection
            ));
        }
        if self.queued_append_bytes_per_partition == 0 || self.max_connections == 0 {
            return Err(
                "memory.queued_append_bytes_per_partition and memory.max_connections must be positive"
                    .into(),
            );
        }
        if self.receive_window_bytes < MIN_RECEIVE_WINDOW_BYTES
            || self.receive_window_bytes > u64::from(u32::MAX)
        {
            return Err(format!(
                "memory.receive_window_bytes must be {MIN_RECEIVE_WINDOW_BYTES}..={}, got {}",
                u32::MAX,
                self.receive_window_bytes
            ));
        }
        Ok(())
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: toml::de::Error,
    },
    /// The values are inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// One member of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerConfig {
    /// Node id, unique, ≥ 1.
    pub id: NodeId,
    /// `host:port` (UDP) of the node's QUIC endpoint.
    pub addr: String,
}

/// TLS material. Every node certificate is signed by the cluster CA and is
/// used both as server certificate and, towards peers, as client identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsConfig {
    /// PEM of the cluster CA.
    pub ca_cert: PathBuf,
    /// PEM of this node's certificate.
    pub cert: PathBuf,
    /// PEM of this node's private key.
    pub key: PathBuf,
    /// Name peers are verified against (a SAN of every node certificate).
    #[serde(default = "default_server_name")]
    pub server_name: String,
}

fn default_server_name() -> String {
    "localhost".into()
}

/// Raft timing and log compaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RaftTuning {
    /// Leader heartbeat period.
    pub heartbeat_ms: u64,
    /// Lower bound of the randomised election timeout.
    ///
    /// A follower that stops hearing from its leader campaigns after the
    /// leader's lease (`election_timeout_max_ms`) plus a random election
    /// timeout, so a crashed leader's partitions take `min + max` to
    /// `2 * max` (3-4 s with the defaults) before an election starts
    /// (openraft 0.9, `RaftCore::handle_tick_election`); a follower that
    /// has seen a longer log than its own waits another `2 * max`.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomised election timeout.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and compact the log) after this many entries.
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log after a snapshot, so that briefly lagging
    /// followers catch up from the log rather than a full snapshot.
    pub max_in_snapshot_log_to_keep: u64,
    /// Size of a Raft log segment file; the node keeps up to 32
    /// (`partition::compaction::MAX_SEGMENTS`) before it asks quiet
    /// partitions to compact.
    pub log_segment_bytes: u64,
    /// How often a node hands the partitions it leads back to their
    /// preferred node once that node is back and caught up
    /// (`partition::rebalance`); 0 turns rebalancing off, and leaders then
    /// stay wherever failovers put them.
    pub rebalance_leaders_ms: u64,
    /// How long a partition may have no known leader before `/healthz`
    /// calls the node unhealthy (`admin::health`). An election takes 3-4 s
    /// with the defaults; a minute without one means this node cannot
    /// reach a majority, which an operator must hear about, and is long
    /// enough that a rolling restart of the other nodes does not trip it.
    /// Must be more than two election timeouts (`2 *
    /// election_timeout_max_ms`), so one ordinary failover never does.
    pub leaderless_max_ms: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_ms: 150,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            snapshot_logs_since_last: 20_000,
            max_in_snapshot_log_to_keep: 1_000,
            log_segment_bytes: DEFAULT_LOG_SEGMENT_BYTES,
            rebalance_leaders_ms: 10_000,
            leaderless_max_ms: 60_000,
        }
    }
}

/// The configuration of one node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeConfig {
    /// This node's id; must appear in `peers`.
    pub id: NodeId,
    /// Local UDP address to bind.
    pub listen: SocketAddr,
    /// Local TCP address of the admin HTTP server (`/metrics`, `/healthz`,
    /// `/readyz`, `/status`, `/destinations` and a status page at `/`);
    /// none when absent. Plain HTTP: bind it to loopback or a management
    /// network, it has no authentication.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// Directory holding `auditflow.redb` (the state machine) and
    /// `auditflow.raftlog/` (the Raft log).
    pub data_dir: PathBuf,
    /// Partition count, fixed at cluster init.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// Dedup window per partition, in events.
    #[serde(default = "default_dedup_window")]
    pub dedup_window: u64,
    /// Every member of the cluster, this node included.
    pub peers: Vec<PeerConfig>,
    /// TLS material.
    pub tls: TlsConfig,
    /// Raft tuning.
    #[serde(default)]
    pub raft: RaftTuning,
    /// Event and batch limits.
    #[serde(default)]
    pub limits: Limits,
    /// Where events are delivered (the same list on every node).
    #[serde(default)]
    pub destinations: Vec<crate::delivery::DestinationConfig>,
    /// Memory bounds (`[memory]`).
    #[serde(default)]
    pub memory: MemoryLimits,
}

fn default_partitions() -> u32 {
    DEFAULT_PARTITIONS
}

fn default_dedup_window() -> u64 {
    DEFAULT_DEDUP_WINDOW
}

impl NodeConfig {
    /// Reads, resolves relative paths and checks a config file.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg: NodeConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        cfg.check()?;
        Ok(cfg)
    }

    /// Makes relative paths relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.data_dir,
            &mut self.tls.ca_cert,
            &mut self.tls.cert,
            &mut self.tls.key,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Checks consistency.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.partitions == 0 || self.partitions > 4096 {
            return Err(ConfigError::Invalid(format!(
                "partitions must be 1..=4096, got {}",
                self.partitions
            )));
        }
        if !self.peers.iter().any(|p| p.id == self.id) {
            return Err(ConfigError::Invalid(format!(
                "node id {} is not among the peers",
                self.id
            )));
        }
        let mut ids: Vec<NodeId> = self.peers.iter().map(|p| p.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.peers.len() || ids.first() == Some(&0) {
            return Err(ConfigError::Invalid(
                "peer ids must be unique and ≥ 1".into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for d in &self.destinations {
            d.check().map_err(ConfigError::Invalid)?;
            if !names.insert(d.name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "destination name {:?} is used twice",
                    d.name
                )));
            }
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0
            || r.election_timeout_min_ms <= r.heartbeat_ms
            || r.election_timeout_max_ms <= r.election_timeout_min_ms
        {
            return Err(ConfigError::Invalid(
                "need 0 < heartbeat_ms < election_timeout_min_ms < election_timeout_max_ms".into(),
            ));
        }
        if r.rebalance_leaders_ms != 0 && r.rebalance_leaders_ms <= r.election_timeout_max_ms {
            // A leader refuses votes for a lease of election_timeout_max_ms
            // after it was elected; a handover waits one round beyond it.
            return Err(ConfigError::Invalid(format!(
                "raft.rebalance_leaders_ms must be 0 (off) or more than election_timeout_max_ms ({}), got {}",
                r.election_timeout_max_ms, r.rebalance_leaders_ms
            )));
        }
        if r.leaderless_max_ms <= 2 * r.election_timeout_max_ms {
            return Err(ConfigError::Invalid(format!(
                "raft.leaderless_max_ms must be more than 2 * election_timeout_max_ms ({}), got {}",
                2 * r.election_timeout_max_ms,
                r.leaderless_max_ms
            )));
        }
        self.memory
            .check(self.limits.max_batch_bytes)
            .map_err(ConfigError::Invalid)?;
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&r.log_segment_bytes) {
            return Err(ConfigError::Invalid(format!(
                "raft.log_segment_bytes must be {MIN_SEGMENT_BYTES}..={MAX_SEGMENT_BYTES}, got {}",
                r.log_segment_bytes
            )));
        }
        Ok(())
    }

    /// The address of peer `id`.
    pub fn peer_addr(&self, id: NodeId) -> Option<&str> {
        self.peers
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.addr.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(raft: &str) -> NodeConfig {
        toml::from_str(&config_text(raft)).expect("config parses")
    }

    fn config_text(raft: &str) -> String {
        format!(
            r#"
id = 1
listen = "127.0.0.1:7101"
data_dir = "node1"
peers = [{{ id = 1, addr = "127.0.0.1:7101" }}, {{ id = 2, addr = "127.0.0.1:7102" }}]
[tls]
ca_cert = "ca.pem"
cert = "node1.pem"
key = "node1.key"
[raft]
{raft}
"#
        )
    }

    #[test]
    fn rebalancing_is_on_by_default_and_may_be_turned_off() {
        let on = config("");
        assert_eq!(on.raft.rebalance_leaders_ms, 10_000);
        assert!(on.check().is_ok());
        assert!(config("rebalance_leaders_ms = 0").check().is_ok());
    }

    #[test]
    fn memory_bounds_have_defaults_and_must_fit_together() {
        let c = config("");
        assert_eq!(c.memory, MemoryLimits::default());
        assert!(c.memory.check(c.limits.max_batch_bytes).is_ok());
        let with = |f: &dyn Fn(&mut MemoryLimits)| {
            let mut m = MemoryLimits::default();
            f(&mut m);
            m.check(4 << 20)
        };
        // (change, refused with this in the message)
        type Change<'a> = &'a dyn Fn(&mut MemoryLimits);
        let bad: [(Change, &str); 5] = [
            (
                &|m| m.request_bytes_per_connection = (16 << 20) - 1,
                "four times",
            ),
            (
                &|m| m.request_bytes_total = (32 << 20) - 1,
                "request_bytes_total",
            ),
            (&|m| m.max_connections = 0, "max_connections"),
            (
                &|m| m.queued_append_bytes_per_partition = 0,
                "queued_append",
            ),
            (&|m| m.receive_window_bytes = 1000, "receive_window_bytes"),
        ];
        for (change, needle) in bad {
            let err = with(change).expect_err(needle);
            assert!(err.contains(needle), "{err}");
        }
        let text = "[memory]\nmax_connections = 8\nrequest_bytes_total = 40000000";
        let m: NodeConfig = toml::from_str(&format!("{}{text}", config_text(""))).expect("parses");
        assert_eq!(m.memory.max_connections, 8);
        assert_eq!(m.memory.receive_window_bytes, 512 * 1024);
        assert!(m.check().is_ok());
    }

    #[test]
    fn a_rebalance_round_within_the_leader_lease_is_refused() {
        // The default election_timeout_max_ms is 2000.
        let err = config("rebalance_leaders_ms = 2000").check().unwrap_err();
        assert!(err.to_string().contains("rebalance_leaders_ms"), "{err}");
        assert!(config("rebalance_leaders_ms = 2001").check().is_ok());
    }

    #[test]
    fn a_leaderless_limit_one_failover_could_reach_is_refused() {
        assert_eq!(config("").raft.leaderless_max_ms, 60_000);
        // The default election_timeout_max_ms is 2000.
        let err = config("leaderless_max_ms = 4000").check().unwrap_err();
        assert!(err.to_string().contains("leaderless_max_ms"), "{err}");
        assert!(config("leaderless_max_ms = 4001").check().is_ok());
    }
}
