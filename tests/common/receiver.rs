//! A webhook receiver for delivery tests: a real HTTP server on loopback
//! that records what arrives, in arrival order, and can be told to fail.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

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
    requests: u64,
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
    if inner.down {
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
