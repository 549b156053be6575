//! A webhook receiver for delivery tests: a real HTTP server on loopback
//! that records what arrives, in arrival order, and can be told to fail.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;

/// One received event.
#[derive(Clone, Debug, PartialEq)]
pub struct Received {
    pub partition: u32,
    pub offset: u64,
    pub id: String,
    pub body: serde_json::Value,
}

#[derive(Default)]
struct Inner {
    received: Vec<Received>,
    /// Ids answered with 400 (permanent failure).
    reject: BTreeSet<String>,
    /// Answer everything with 503 (an outage).
    down: bool,
    /// Answer this share of requests (percent) with 503, at random.
    fail_percent: u32,
    /// State of the xorshift generator behind `fail_percent` (no `rand`
    /// dependency for one coin).
    rng: u64,
    requests: u64,
    /// Every request, failed or not: (partition of its first event, when).
    log: Vec<(Option<u32>, Instant)>,
}

/// The receiver; clones share state.
#[derive(Clone, Default)]
pub struct Receiver {
    inner: Arc<Mutex<Inner>>,
    pub addr: Option<SocketAddr>,
}

impl Receiver {
    /// Starts serving on a free loopback port.
    pub async fn start() -> Receiver {
        let mut r = Receiver::default();
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(r.inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        r.addr = Some(listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        r
    }

    /// The URL to configure.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr.expect("started"))
    }

    pub fn received(&self) -> Vec<Received> {
        self.inner.lock().unwrap().received.clone()
    }

    pub fn requests(&self) -> u64 {
        self.inner.lock().unwrap().requests
    }

    pub fn set_down(&self, down: bool) {
        self.inner.lock().unwrap().down = down;
    }

    pub fn reject(&self, ids: impl IntoIterator<Item = String>) {
        self.inner.lock().unwrap().reject.extend(ids);
    }

    /// Answers `percent` % of requests with 503 at random (0: none).
    pub fn set_fail_percent(&self, percent: u32, seed: u64) {
        let mut inner = self.inner.lock().unwrap();
        inner.fail_percent = percent.min(100);
        inner.rng = seed | 1;
    }

    /// Every request so far: (partition of its first event, arrival time).
    pub fn request_log(&self) -> Vec<(Option<u32>, Instant)> {
        self.inner.lock().unwrap().log.clone()
    }

    pub fn accept_all(&self) {
        self.inner.lock().unwrap().reject.clear();
    }
}

fn parse_one(v: &serde_json::Value) -> Option<Received> {
    Some(Received {
        partition: v.get("partition")?.as_u64()? as u32,
        offset: v.get("offset")?.as_u64()?,
        id: v.get("event")?.get("id")?.as_str()?.to_string(),
        body: v.clone(),
    })
}

async fn hook(
    State(inner): State<Arc<Mutex<Inner>>>,
    _headers: HeaderMap,
    body: String,
) -> (StatusCode, String) {
    let mut inner = inner.lock().unwrap();
    inner.requests += 1;
    let partition = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| match v {
            serde_json::Value::Array(a) => a.first().cloned(),
            one => Some(one),
        })
        .and_then(|v| v.get("partition")?.as_u64())
        .map(|p| p as u32);
    inner.log.push((partition, Instant::now()));
    let coin = if inner.fail_percent > 0 {
        // xorshift64
        let mut x = inner.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        inner.rng = x;
        x % 100 < u64::from(inner.fail_percent)
    } else {
        false
    };
    if inner.down || coin {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "down for maintenance".into(),
        );
    }
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "body is not JSON".into());
    };
    let items: Vec<serde_json::Value> = match value {
        serde_json::Value::Array(a) => a,
        one => vec![one],
    };
    let mut parsed = Vec::new();
    for item in &items {
        let Some(r) = parse_one(item) else {
            return (StatusCode::BAD_REQUEST, "not an auditflow delivery".into());
        };
        if inner.reject.contains(&r.id) {
            return (StatusCode::BAD_REQUEST, format!("event {} refused", r.id));
        }
        parsed.push(r);
    }
    inner.received.extend(parsed);
    (StatusCode::OK, "ok".into())
}
