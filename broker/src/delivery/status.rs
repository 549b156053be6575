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
    /// Requests and failures over the last minute.
    pub errors: ErrorWindow,
    /// Retries since the actor started.
    pub retries: u64,
    /// Time spent waiting on backoff since the actor started (ms).
    pub backoff_wait_ms: u64,
    /// Time spent waiting on the open breaker since the actor started (ms).
    pub breaker_wait_ms: u64,
}

/// Length of one bucket of an [`ErrorWindow`] (seconds).
pub const ERROR_BUCKET_SECS: i64 = 10;
/// Buckets of an [`ErrorWindow`]: six of ten seconds, the last minute. A
/// fixed array, so the window's memory is bounded whatever the traffic.
pub const ERROR_BUCKETS: usize = 6;

/// Requests and retryable failures over the last minute, in buckets of
/// [`ERROR_BUCKET_SECS`] keyed by wall-clock time (the clock seam).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorWindow {
    /// (bucket index since the epoch, requests, failures).
    buckets: [(i64, u64, u64); ERROR_BUCKETS],
}

impl ErrorWindow {
    fn bucket(at: Timestamp) -> i64 {
        at.0.div_euclid(1_000_000_000 * ERROR_BUCKET_SECS)
    }

    /// Adds `requests`, of which `failed` failed, answered at `at`.
    pub fn add(&mut self, at: Timestamp, requests: u64, failed: u64) {
        let b = Self::bucket(at);
        let slot = &mut self.buckets[b.rem_euclid(ERROR_BUCKETS as i64) as usize];
        if slot.0 != b {
            *slot = (b, 0, 0);
        }
        slot.1 += requests;
        slot.2 += failed;
    }

    /// (requests, failures) over the minute before `now`.
    pub fn last_minute(&self, now: Timestamp) -> (u64, u64) {
        let current = Self::bucket(now);
        self.buckets
            .iter()
            .filter(|(b, _, _)| *b <= current && current - *b < ERROR_BUCKETS as i64)
            .fold((0, 0), |(r, f), (_, br, bf)| (r + br, f + bf))
    }
}

impl Default for LiveStatus {
    fn default() -> Self {
        LiveStatus {
            last_success: None,
            last_error: None,
            attempts: 0,
            breaker: BreakerState::Closed,
            delivered: 0,
            errors: ErrorWindow::default(),
            retries: 0,
            backoff_wait_ms: 0,
            breaker_wait_ms: 0,
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
            requests_1m: s.errors.last_minute(now).0,
            failed_requests_1m: s.errors.last_minute(now).1,
            retries: s.retries,
            backoff_wait_ms: s.backoff_wait_ms,
            breaker_wait_ms: s.breaker_wait_ms,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000_000;

    #[test]
    fn error_window_keeps_the_last_minute() {
        let mut w = ErrorWindow::default();
        w.add(Timestamp(0), 100, 5);
        w.add(Timestamp(30 * SEC), 50, 10);
        assert_eq!(w.last_minute(Timestamp(31 * SEC)), (150, 15));
        // The first bucket has aged out; its slot is reused for new ones.
        assert_eq!(w.last_minute(Timestamp(65 * SEC)), (50, 10));
        w.add(Timestamp(61 * SEC), 10, 0);
        assert_eq!(w.last_minute(Timestamp(65 * SEC)), (60, 10));
        assert_eq!(w.last_minute(Timestamp(200 * SEC)), (0, 0));
    }
}
