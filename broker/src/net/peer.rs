//! Node-to-node Raft RPC over QUIC: [`QuicPeers`] implements the Raft
//! transport seam (`partition::transport`, where the messages are).
//!
//! Every Raft group of a node shares one QUIC connection per peer; each RPC
//! is one bidirectional stream carrying one request frame and one response
//! frame (see `auditflow_protocol::frame`), tagged with its partition.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use auditflow_framing::{read_frame, write_frame};
use auditflow_protocol::frame;
use futures::future::BoxFuture;

use crate::metrics::{PEER_REDIALS_TOTAL, PEER_SLOW_TIMEOUT_RUNS_TOTAL};
use crate::partition::transport::{
    PeerEnvelope, PeerResponse, RaftTransport, TransportFailure, MAX_PEER_FRAME_BYTES,
    PEER_PROTOCOL_VERSION,
};
use crate::replicated::NodeId;

/// After a failed connect, further RPCs to that peer fail at once for this
/// long instead of each group queueing its own connect attempt to a node
/// that is down.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(300);
/// Longest wait for a QUIC handshake with a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// RPCs in a row that may time out on one connection before it is dropped
/// and the next RPC dials again. A peer restarted on the same address is
/// normally recognised at once (its stateless reset, `tls::endpoint_config`),
/// but not if it came back with another key (a rotated certificate): the
/// old connection then looks alive until its 5 s idle timeout, longer than
/// a restarted follower waits before it campaigns. A live but slow peer
/// costs nothing: a connection that received datagrams since the first of
/// those timeouts (the peer's QUIC stack acknowledges what it is sent even
/// while its node is too busy to answer in time, as under overload) is
/// kept. Dropping it would fail every group's RPCs in flight on it and
/// pile resends onto the busy peer.
const TIMEOUTS_BEFORE_REDIAL: u32 = 3;

/// State of the connection to one peer.
#[derive(Default)]
struct PeerSlot {
    conn: Option<quinn::Connection>,
    last_failure: Option<Instant>,
}

/// One peer: its connection, and how many RPCs on it timed out in a row
/// (kept outside the lock, since every RPC updates it).
#[derive(Default)]
struct Peer {
    slot: tokio::sync::Mutex<PeerSlot>,
    timeouts: std::sync::atomic::AtomicU32,
    /// Datagrams the connection had received at the first timeout of the
    /// current run ([`UNKNOWN_RX`] if it could not be read then).
    rx_at_first_timeout: std::sync::atomic::AtomicU64,
}

/// [`Peer::rx_at_first_timeout`] when the count could not be read: the
/// connection is judged by its timeouts alone.
const UNKNOWN_RX: u64 = u64::MAX;

/// [`RaftTransport`] over QUIC: one lazily (re)established connection per
/// peer, shared by all groups.
pub struct QuicPeers {
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    server_name: String,
    addrs: BTreeMap<NodeId, String>,
    /// One async mutex per peer serialises (re)connects, so concurrent
    /// groups never open several connections to the same peer.
    peers: BTreeMap<NodeId, Peer>,
}

impl QuicPeers {
    /// Peers reachable through `endpoint`, authenticating with
    /// `client_config` (which carries the node's certificate).
    pub fn new(
        endpoint: quinn::Endpoint,
        client_config: quinn::ClientConfig,
        server_name: String,
        addrs: BTreeMap<NodeId, String>,
    ) -> Arc<Self> {
        let peers = addrs.keys().map(|id| (*id, Peer::default())).collect();
        Arc::new(QuicPeers {
            endpoint,
            client_config,
            server_name,
            addrs,
            peers,
        })
    }

    async fn connection(&self, target: NodeId) -> Result<quinn::Connection, TransportFailure> {
        let peer = self
            .peers
            .get(&target)
            .ok_or_else(|| TransportFailure::Unreachable(target, "unknown node id".into()))?;
        let mut slot = peer.slot.lock().await;
        if let Some(conn) = &slot.conn {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
            slot.conn = None;
        }
        if let Some(t) = slot.last_failure {
            if t.elapsed() < RECONNECT_BACKOFF {
                return Err(TransportFailure::Unreachable(
                    target,
                    "recent connect failed".into(),
                ));
            }
        }
        match self.connect(target).await {
            Ok(conn) => {
                slot.conn = Some(conn.clone());
                slot.last_failure = None;
                // RPCs that timed out waiting for this dial are not the new
                // connection's doing.
                peer.timeouts.store(0, std::sync::atomic::Ordering::Relaxed);
                Ok(conn)
            }
            Err(e) => {
                slot.last_failure = Some(Instant::now());
                Err(e)
            }
        }
    }

    async fn connect(&self, target: NodeId) -> Result<quinn::Connection, TransportFailure> {
        let unreachable = |e: String| TransportFailure::Unreachable(target, e);
        let addr = self
            .addrs
            .get(&target)
            .ok_or_else(|| unreachable("unknown node id".into()))?;
        let sock = tokio::net::lookup_host(addr.as_str())
            .await
            .map_err(|e| unreachable(format!("resolve {addr}: {e}")))?
            .next()
            .ok_or_else(|| unreachable(format!("{addr} resolves to nothing")))?;
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), sock, &self.server_name)
            .map_err(|e| unreachable(e.to_string()))?;
        match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(unreachable(e.to_string())),
            Err(_) => Err(unreachable("handshake timed out".into())),
        }
    }

    async fn call_once(
        self: Arc<Self>,
        target: NodeId,
        request: PeerEnvelope,
    ) -> Result<PeerResponse, TransportFailure> {
        let bytes =
            frame::encode(PEER_PROTOCOL_VERSION, &request, MAX_PEER_FRAME_BYTES).map_err(|e| {
                match e {
                    frame::FrameError::TooLarge { len, .. } => {
                        TransportFailure::TooLarge(target, len)
                    }
                    other => TransportFailure::Network(target, other.to_string()),
                }
            })?;
        let conn = self.connection(target).await?;
        let net = |e: String| TransportFailure::Network(target, e);
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| net(e.to_string()))?;
        write_frame(&mut send, &bytes)
            .await
            .map_err(|e| net(e.to_string()))?;
        let payload = read_frame(&mut recv, MAX_PEER_FRAME_BYTES)
            .await
            .map_err(|e| net(e.to_string()))?;
        frame::decode::<PeerResponse>(PEER_PROTOCOL_VERSION, &payload)
            .map_err(|e| net(e.to_string()))
    }
}

impl RaftTransport for Arc<QuicPeers> {
    fn call(
        &self,
        target: NodeId,
        request: PeerEnvelope,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerResponse, TransportFailure>> {
        let this = Arc::clone(self);
        Box::pin(async move {
            let result =
                match tokio::time::timeout(timeout, Arc::clone(&this).call_once(target, request))
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Err(TransportFailure::Timeout(target)),
                };
            this.count_timeouts(target, &result);
            result
        })
    }
}

impl QuicPeers {
    /// Counts RPCs to `target` that timed out in a row, and drops the
    /// connection after [`TIMEOUTS_BEFORE_REDIAL`] of them. Never waits:
    /// the RPC has already used up its time.
    fn count_timeouts(&self, target: NodeId, result: &Result<PeerResponse, TransportFailure>) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(peer) = self.peers.get(&target) else {
            return;
        };
        match result {
            Err(TransportFailure::Timeout(_)) => {
                let received = |slot: &PeerSlot| {
                    slot.conn
                        .as_ref()
                        .map_or(UNKNOWN_RX, |c| c.stats().udp_rx.datagrams)
                };
                let before = peer.timeouts.fetch_add(1, Relaxed);
                if before == 0 {
                    let rx = peer.slot.try_lock().map_or(UNKNOWN_RX, |s| received(&s));
                    peer.rx_at_first_timeout.store(rx, Relaxed);
                }
                if before + 1 < TIMEOUTS_BEFORE_REDIAL {
                    return;
                }
                // A slot held by another task is being dialled (for up to
                // CONNECT_TIMEOUT) or read; the next timeout tries again.
                let Ok(mut slot) = peer.slot.try_lock() else {
                    return;
                };
                peer.timeouts.store(0, Relaxed);
                let first = peer.rx_at_first_timeout.load(Relaxed);
                let now = received(&slot);
                if first != UNKNOWN_RX && now != UNKNOWN_RX && now > first {
                    // Alive, only slow: keep the connection.
                    metrics::counter!(PEER_SLOW_TIMEOUT_RUNS_TOTAL, "peer" => target.to_string())
                        .increment(1);
                    return;
                }
                // RPCs still in flight keep their handle; the next one
                // dials a new connection.
                if slot.conn.take().is_some() {
                    metrics::counter!(PEER_REDIALS_TOTAL, "peer" => target.to_string())
                        .increment(1);
                    tracing::info!(
                        peer = target,
                        "{TIMEOUTS_BEFORE_REDIAL} RPCs in a row timed out; dialling a new connection"
                    );
                }
            }
            // Only a timeout leaves a dead connection in place: a failed
            // connect or a closed connection already dial again.
            Err(_) => {}
            Ok(_) => {
                if peer.timeouts.load(Relaxed) != 0 {
                    peer.timeouts.store(0, Relaxed);
                }
            }
        }
    }
}
