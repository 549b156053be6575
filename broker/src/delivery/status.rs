//! What delivery actors report, read by `dest status`, the admin API and
//! metrics. The durable parts (cursor, DLQ) come from the store; this
//! board holds the live parts only the running actor knows.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use auditflow_protocol::delivery::DestinationStatus;
use auditflow_protocol::wire::RequestError;
use auditflow_protocol::Timestamp;

use super::breaker::BreakerState;
use crate::storage::PartitionReader;

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

/// Status of every (destination, partition) this node leads.
///
/// `reader_of` gives a partition's reader, or the error a request for it
/// answers (no such partition); `node` is this node's id, `now` the time
/// the ages are measured at.
pub fn dest_status<'a>(
    node: u64,
    board: &StatusBoard,
    now: Timestamp,
    reader_of: impl Fn(u32) -> Result<&'a PartitionReader, RequestError>,
) -> Result<Vec<DestinationStatus>, RequestError> {
    let live = board.snapshot();
    let mut out = Vec::new();
    for ((dest, partition), s) in live {
        let reader = reader_of(partition)?;
        let cursor = reader.cursor(&dest).map_err(RequestError::internal)?;
        let head = reader.head().map_err(RequestError::internal)?.next_offset;
        let oldest = if cursor < head {
            reader
                .read(cursor, 1)
                .map_err(RequestError::internal)?
                .first()
                .map(|e| (now.0.saturating_sub(e.received_at.0) / 1_000_000).max(0) as u64)
        } else {
            None
        };
        out.push(DestinationStatus {
            dlq_size: reader.dlq_len(&dest).map_err(RequestError::internal)?,
            replay: reader.replay(&dest).map_err(RequestError::internal)?,
            dest,
            partition,
            node,
            cursor,
            head,
            lag_events: head.saturating_sub(cursor),
            oldest_undelivered_age_ms: oldest,
            last_success: s.last_success,
            last_error: s.last_error,
            attempts: s.attempts,
            breaker: match s.breaker {
                BreakerState::Closed => "closed",
                BreakerState::Open => "open",
                BreakerState::HalfOpen => "half_open",
            }
            .into(),
            delivered: s.delivered,
        });
    }
    Ok(out)
}
