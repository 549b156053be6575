//! What delivery actors report, read by `dest status`, the admin API and
//! metrics. The durable parts (cursor, DLQ) come from the store; this
//! board holds the live parts only the running actor knows.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use auditflow_protocol::Timestamp;

use super::breaker::BreakerState;

/// Live state of one (destination, partition) actor.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveStatus {
    /// Last successful send.
    pub last_success: Option<Timestamp>,
    /// Last failure, in one line.
    pub last_error: Option<String>,
    /// Failed attempts on the current head-of-line batch.
    pub attempts: u32,
    /// Breaker state.
    pub breaker: BreakerState,
    /// Events delivered since the actor started.
    pub delivered: u64,
}

impl Default for LiveStatus {
    fn default() -> Self {
        LiveStatus {
            last_success: None,
            last_error: None,
            attempts: 0,
            breaker: BreakerState::Closed,
            delivered: 0,
        }
    }
}

/// Live status of every actor on this node, by (destination, partition).
#[derive(Clone, Debug, Default)]
pub struct StatusBoard {
    inner: Arc<Mutex<BTreeMap<(String, u32), LiveStatus>>>,
}

impl StatusBoard {
    /// Updates the entry of (dest, partition).
    pub fn update(&self, dest: &str, partition: u32, f: impl FnOnce(&mut LiveStatus)) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(map.entry((dest.to_string(), partition)).or_default());
    }

    /// Removes the entry when the actor stops (leadership moved).
    pub fn remove(&self, dest: &str, partition: u32) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&(dest.to_string(), partition));
    }

    /// A copy of every entry.
    pub fn snapshot(&self) -> BTreeMap<(String, u32), LiveStatus> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
