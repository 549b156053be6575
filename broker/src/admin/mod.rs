//! The per-node admin HTTP server (DESIGN.md §5).
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` | Prometheus text exposition of this node's metrics ([`crate::metrics`], sampled by [`sampler`]) |
//! | `GET /healthz` | `200 ok` while the node can do its work; `503` with JSON naming each problem (`storage_halted`, `raft_stopped` per partition, `no_leader` per partition leaderless longer than `raft.leaderless_max_ms`, a minute by default: [`health`]) |
//! | `GET /readyz` | `200` when every partition has a known leader and this node applied everything committed; else `503` with the reasons as JSON |
//! | `GET /status` | this node's view of every partition (`NodeStatus`) as JSON |
//! | `GET /destinations` | delivery status of the partitions this node leads, as JSON |
//! | `GET /` | an HTML status page ([`page`]) |
//!
//! It is plain HTTP on its own TCP port (`admin_listen` in `node.toml`),
//! separate from the QUIC endpoint so that probes and scrapers need no
//! client certificate. It only reads: nothing here changes the node.

pub mod health;
pub mod page;
pub mod sampler;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::metrics;
use crate::node::NodeShared;
use crate::partition::Raft;

/// Content type of the Prometheus text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Longest wait for a partition's Raft core to report its committed index
/// in `/readyz`: a core that does not answer this fast is not ready.
pub const READY_STATE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long `/readyz` lets the state machine catch up with the committed
/// index it read before calling the node not ready. Short, so the whole
/// probe (partitions are checked concurrently) answers within a
/// Kubernetes probe's default one-second timeout.
pub const READY_APPLY_WAIT: Duration = Duration::from_millis(300);

/// How often [`serve`] looks at which partitions have a leader, for
/// `/healthz`'s leaderless time.
const LEADER_WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// The admin routes over `node`. `/healthz` counts leaderless time from
/// its own requests; [`serve`] also watches between them.
pub fn router(node: Arc<NodeShared>) -> Router {
    router_with(node, Arc::default())
}

fn router_with(node: Arc<NodeShared>, leaderless: Arc<Mutex<health::Leaderless>>) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(prometheus))
        .route(
            "/healthz",
            get(move |State(node): State<Arc<NodeShared>>| healthz(node, Arc::clone(&leaderless))),
        )
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/destinations", get(destinations))
        .with_state(node)
}

/// Serves the admin routes on `listener` for as long as the process runs,
/// with the metrics recorder installed and sampled. Spawn it.
pub async fn serve(listener: TcpListener, node: Arc<NodeShared>) {
    match metrics::install() {
        Ok(handle) => {
            tokio::spawn(sampler::run_sampler(Arc::clone(&node), handle));
        }
        Err(e) => warn!("/metrics will answer 503: {e}"),
    }
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|e| format!("(unknown: {e})"));
    info!(node = node.id, %addr, "admin HTTP serving");
    let leaderless = Arc::new(Mutex::new(health::Leaderless::default()));
    tokio::spawn(watch_leaders(Arc::clone(&node), Arc::clone(&leaderless)));
    if let Err(e) = axum::serve(listener, router_with(node, leaderless)).await {
        warn!(%addr, "admin HTTP server stopped: {e}");
    }
}

/// Records which partitions have a leader every [`LEADER_WATCH_INTERVAL`],
/// for as long as the process runs.
async fn watch_leaders(node: Arc<NodeShared>, leaderless: Arc<Mutex<health::Leaderless>>) {
    let mut tick = tokio::time::interval(LEADER_WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        observe_leaders(&node, &leaderless);
    }
}

fn observe_leaders(node: &NodeShared, leaderless: &Mutex<health::Leaderless>) {
    let led = node
        .partitions
        .iter()
        .map(|p| p.raft.metrics().borrow().current_leader.is_some());
    lock(leaderless).observe(std::time::Instant::now(), led);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only plain data behind it: a panic cannot leave it half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `200 ok`, or `503` with the [`health::Health`] naming the problems.
async fn healthz(node: Arc<NodeShared>, leaderless: Arc<Mutex<health::Leaderless>>) -> Response {
    observe_leaders(&node, &leaderless);
    let durations = lock(&leaderless).durations(std::time::Instant::now());
    let halted = node.storage_halted();
    let max = Duration::from_millis(node.config.raft.leaderless_max_ms);
    let health = health::assess(halted.as_deref(), node.core_states(), &durations, max);
    if health.healthy {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(health)).into_response()
    }
}

async fn prometheus() -> Response {
    match metrics::install() {
        Ok(handle) => ([(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], {
            metrics::collect_process();
            handle.render()
        })
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn status(State(node): State<Arc<NodeShared>>) -> Json<auditflow_protocol::wire::NodeStatus> {
    Json(node.status())
}

/// A JSON error body.
#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

async fn destinations(State(node): State<Arc<NodeShared>>) -> Response {
    match node.dest_status() {
        Ok(d) => Json(d).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(ErrorBody {
                error: e.to_string(),
            }),
        )
            .into_response(),
    }
}

async fn status_page(State(node): State<Arc<NodeShared>>) -> Html<String> {
    let dests = node.dest_status().map_err(|e| e.to_string());
    Html(page::render(
        &node.status(),
        dests.as_ref().map(Vec::as_slice).map_err(Clone::clone),
    ))
}

/// The `/readyz` body.
#[derive(Debug, Serialize)]
pub struct Readiness {
    /// Whether the node is ready.
    pub ready: bool,
    /// Why not, one line per partition that is not ready.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

async fn readyz(State(node): State<Arc<NodeShared>>) -> (StatusCode, Json<Readiness>) {
    let r = readiness(&node).await;
    let code = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(r))
}

/// Checks every partition concurrently (see [`partition_ready`]).
pub async fn readiness(node: &NodeShared) -> Readiness {
    let checks = node
        .partitions
        .iter()
        .enumerate()
        .map(|(p, h)| partition_ready(p as u32, &h.raft));
    let reasons: Vec<String> = futures::future::join_all(checks)
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect();
    Readiness {
        ready: reasons.is_empty(),
        reasons,
    }
}

/// Ready when the partition has a known leader and this node's state
/// machine has applied at least the index its Raft core knew committed
/// when asked (waiting up to [`READY_APPLY_WAIT`] for the apply).
async fn partition_ready(partition: u32, raft: &Raft) -> Result<(), String> {
    let committed = tokio::time::timeout(
        READY_STATE_TIMEOUT,
        raft.with_raft_state(|st| st.committed.map(|c| c.index)),
    )
    .await
    .map_err(|_| {
        format!("partition {partition}: Raft did not answer within {READY_STATE_TIMEOUT:?}")
    })?
    .map_err(|e| format!("partition {partition}: Raft stopped: {e}"))?;
    let mut watch = raft.metrics();
    let deadline = tokio::time::Instant::now() + READY_APPLY_WAIT;
    loop {
        let (leader, applied) = {
            let m = watch.borrow_and_update();
            (m.current_leader, m.last_applied.map(|l| l.index))
        };
        // `None < Some(_)`: nothing committed is trivially applied.
        let reason = match leader {
            None => format!("partition {partition}: no leader known"),
            Some(_) if applied < committed => format!(
                "partition {partition}: applied index {} behind committed index {}",
                opt_index(applied),
                opt_index(committed)
            ),
            Some(_) => return Ok(()),
        };
        match tokio::time::timeout_at(deadline, watch.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) => return Err(format!("partition {partition}: Raft group shut down")),
            Err(_) => return Err(reason),
        }
    }
}

fn opt_index(i: Option<u64>) -> String {
    i.map(|i| i.to_string()).unwrap_or_else(|| "none".into())
}
