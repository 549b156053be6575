//! The simulated network between nodes: Raft RPCs and client requests go
//! through it with seeded delays, loss, duplication, held-back messages
//! (delays and holds reorder them), partitions that start and heal, and
//! paused nodes whose messages wait until they resume.
//! The rates are the run's [`NetFaults`].
//!
//! Messages are encoded and decoded with the real frame codec on the way,
//! so what crosses the simulated wire is what would cross the real one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use auditflow_broker::node::NodeShared;
use auditflow_broker::partition::transport::{
    PeerEnvelope, PeerResponse, RaftTransport, TransportFailure, MAX_PEER_FRAME_BYTES,
    PEER_PROTOCOL_VERSION,
};
use auditflow_broker::partition::NodeId;
use auditflow_protocol::frame;
use auditflow_protocol::wire::{Request, RequestError, Response, PROTOCOL_VERSION};
use futures::future::BoxFuture;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::options::NetFaults;

struct State {
    rng: StdRng,
    config: NetFaults,
    nodes: BTreeMap<NodeId, Arc<NodeShared>>,
    /// Directed links that drop everything: (from, to).
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Paused nodes and when they resume.
    paused: BTreeMap<NodeId, tokio::time::Instant>,
    messages: u64,
}

/// The network; clones share it.
#[derive(Clone)]
pub struct SimNet {
    state: Arc<Mutex<State>>,
}

/// Client requests come from outside the cluster: node id 0.
pub const CLIENT: NodeId = 0;

struct Fate {
    deliver: bool,
    duplicate: bool,
    there: Duration,
    back: Duration,
}

impl SimNet {
    /// A network seeded with `seed`.
    pub fn new(seed: u64, config: NetFaults) -> SimNet {
        SimNet {
            state: Arc::new(Mutex::new(State {
                rng: StdRng::seed_from_u64(seed),
                config,
                nodes: BTreeMap::new(),
                cut: BTreeSet::new(),
                paused: BTreeMap::new(),
                messages: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A node is up and reachable at `id`.
    pub fn attach(&self, id: NodeId, node: Arc<NodeShared>) {
        self.lock().nodes.insert(id, node);
    }

    /// A node is down.
    pub fn detach(&self, id: NodeId) -> Option<Arc<NodeShared>> {
        self.lock().nodes.remove(&id)
    }

    /// The running node `id`.
    pub fn node(&self, id: NodeId) -> Option<Arc<NodeShared>> {
        self.lock().nodes.get(&id).cloned()
    }

    /// Drops messages from `from` to `to` (one direction).
    pub fn cut(&self, from: NodeId, to: NodeId) {
        self.lock().cut.insert((from, to));
    }

    /// Cuts `id` off from every other node and from clients, both ways.
    pub fn isolate(&self, id: NodeId, all: &[NodeId]) {
        let mut s = self.lock();
        for other in all.iter().copied().chain([CLIENT]) {
            if other != id {
                s.cut.insert((id, other));
                s.cut.insert((other, id));
            }
        }
    }

    /// Heals every partition.
    pub fn heal(&self) {
        self.lock().cut.clear();
    }

    /// Pauses node `id` for `length`, as a GC or VM stall would: nothing
    /// it sends leaves and nothing sent to it is taken in until it
    /// resumes; then what was held arrives late, except what its sender
    /// stopped waiting for (a timed-out request is dropped with its
    /// exchange). Only its messages stop: its timers and its disk
    /// go on, which a truly frozen process's would not.
    pub fn pause(&self, id: NodeId, length: Duration) {
        let until = tokio::time::Instant::now() + length;
        self.lock().paused.insert(id, until);
    }

    /// Waits until node `id` is not paused.
    async fn resumed(&self, id: NodeId) {
        loop {
            let until = self.lock().paused.get(&id).copied();
            match until {
                Some(t) if t > tokio::time::Instant::now() => tokio::time::sleep_until(t).await,
                _ => return,
            }
        }
    }

    /// No more loss, duplicates, held-back messages or pauses (a quiet
    /// network for the end of a run); delays stay.
    pub fn quiet(&self) {
        let mut s = self.lock();
        s.paused.clear();
        s.config.loss = 0.0;
        s.config.duplicate = 0.0;
        s.config.reorder = 0.0;
    }

    /// Messages sent so far.
    pub fn messages(&self) -> u64 {
        self.lock().messages
    }

    fn fate(&self, from: NodeId, to: NodeId) -> Fate {
        let mut s = self.lock();
        s.messages += 1;
        let cfg = s.config.clone();
        let cut = s.cut.contains(&(from, to));
        let lost = s.rng.gen_bool(cfg.loss);
        let duplicate = s.rng.gen_bool(cfg.duplicate);
        let mut there = cfg.delay.draw(&mut s.rng);
        let back = cfg.delay.draw(&mut s.rng);
        if s.rng.gen_bool(cfg.reorder) {
            there += cfg.reorder_delay.draw(&mut s.rng);
        }
        Fate {
            deliver: !cut && !lost,
            duplicate,
            there,
            back,
        }
    }

    fn link_up(&self, from: NodeId, to: NodeId) -> bool {
        !self.lock().cut.contains(&(from, to))
    }

    /// The Raft transport of node `from`.
    pub fn transport(&self, from: NodeId) -> SimTransport {
        SimTransport {
            net: self.clone(),
            from,
        }
    }

    /// Sends a client request to node `to`, waiting at most `timeout`.
    pub async fn client_request(
        &self,
        to: NodeId,
        request: Request,
        timeout: Duration,
    ) -> Response {
        let fate = self.fate(CLIENT, to);
        let net = self.clone();
        let exchange = async move {
            tokio::time::sleep(fate.there).await;
            if !fate.deliver {
                return None;
            }
            net.resumed(to).await;
            let node = net.node(to)?;
            let bytes = frame::encode(PROTOCOL_VERSION, &request, usize::MAX).ok()?;
            let payload = frame::payload_of(&bytes, usize::MAX).ok()?;
            let request: Request = frame::decode(PROTOCOL_VERSION, payload).ok()?;
            let response = auditflow_broker::api::client_api::handle(&node, request).await;
            net.resumed(to).await;
            tokio::time::sleep(fate.back).await;
            net.link_up(to, CLIENT).then_some(response)
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Some(r)) => r,
            _ => Response::Error(RequestError::Unavailable {
                partition: 0,
                reason: "simulated timeout".into(),
            }),
        }
    }
}

/// Raft RPCs of one node over the simulated network.
pub struct SimTransport {
    net: SimNet,
    from: NodeId,
}

async fn deliver(net: &SimNet, to: NodeId, request: PeerEnvelope) -> Option<PeerResponse> {
    let node = net.node(to)?;
    let bytes = frame::encode(PEER_PROTOCOL_VERSION, &request, MAX_PEER_FRAME_BYTES).ok()?;
    let payload = frame::payload_of(&bytes, MAX_PEER_FRAME_BYTES).ok()?;
    let request: PeerEnvelope = frame::decode(PEER_PROTOCOL_VERSION, payload).ok()?;
    Some(auditflow_broker::api::peer_api::handle(&node, request).await)
}

impl RaftTransport for SimTransport {
    fn call(
        &self,
        target: NodeId,
        request: PeerEnvelope,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerResponse, TransportFailure>> {
        let net = self.net.clone();
        let from = self.from;
        let fate = net.fate(from, target);
        if fate.duplicate && fate.deliver {
            let net2 = net.clone();
            let copy = request.clone();
            let delay = fate.back;
            tokio::spawn(async move {
                net2.resumed(from).await;
                tokio::time::sleep(delay).await;
                net2.resumed(target).await;
                let _ = deliver(&net2, target, copy).await;
            });
        }
        Box::pin(async move {
            if net.node(target).is_none() {
                tokio::time::sleep(fate.there).await;
                return Err(TransportFailure::Unreachable(target, "node is down".into()));
            }
            let exchange = async {
                net.resumed(from).await;
                tokio::time::sleep(fate.there).await;
                if !fate.deliver {
                    return None;
                }
                net.resumed(target).await;
                let response = deliver(&net, target, request).await?;
                net.resumed(target).await;
                tokio::time::sleep(fate.back).await;
                net.resumed(from).await;
                net.link_up(target, from).then_some(response)
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(Some(r)) => Ok(r),
                Ok(None) => {
                    // Lost: the sender only learns by its timeout.
                    tokio::time::sleep(timeout.saturating_sub(fate.there)).await;
                    Err(TransportFailure::Timeout(target))
                }
                Err(_) => Err(TransportFailure::Timeout(target)),
            }
        })
    }
}
