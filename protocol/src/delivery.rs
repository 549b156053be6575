//! Delivery records shared by the broker and its clients: parked events
//! with their attempt history, redrive selections, delivery status.

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// One failed attempt to deliver an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// When the attempt ended.
    pub at: Timestamp,
    /// What went wrong.
    pub error: String,
    /// Protocol status code, if any.
    pub status: Option<u16>,
    /// The start of the endpoint's answer.
    pub response_excerpt: Option<String>,
    /// How long the attempt took.
    pub latency_ms: u64,
    /// Whether the sink called it permanent.
    pub permanent: bool,
}

/// Most attempts kept per entry: the first few and the most recent ones
/// tell the story; a destination down for days must not grow entries
/// without bound (G8).
pub const MAX_ATTEMPTS_KEPT: usize = 20;

/// Appends `record` to `history`, keeping the first half and the latest.
pub fn push_attempt(history: &mut Vec<AttemptRecord>, record: AttemptRecord) {
    if history.len() >= MAX_ATTEMPTS_KEPT {
        history.remove(MAX_ATTEMPTS_KEPT / 2);
    }
    history.push(record);
}

/// A parked event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DlqEntry {
    /// The event id.
    pub event_id: String,
    /// When it was parked.
    pub parked_at: Timestamp,
    /// Why, in one line.
    pub reason: String,
    /// The attempts that led here.
    pub attempts: Vec<AttemptRecord>,
    /// An operator asked for it to be delivered again.
    pub redrive: bool,
}

/// Which parked events a redrive selects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RedriveSelection {
    /// Every parked event of the destination.
    All,
    /// These offsets.
    Offsets(Vec<u64>),
    /// Parked within `[from, until)` (either bound open).
    ParkedBetween {
        /// Earliest parking time.
        from: Option<Timestamp>,
        /// Latest parking time (exclusive).
        until: Option<Timestamp>,
    },
}

impl RedriveSelection {
    /// Whether the entry at `offset` is selected.
    pub fn selects(&self, offset: u64, entry: &DlqEntry) -> bool {
        match self {
            RedriveSelection::All => true,
            RedriveSelection::Offsets(o) => o.contains(&offset),
            RedriveSelection::ParkedBetween { from, until } => {
                from.is_none_or(|f| entry.parked_at >= f)
                    && until.is_none_or(|u| entry.parked_at < u)
            }
        }
    }
}

/// The partition whose Raft group replicates the run-time destination
/// catalog. Every node replicates every partition, so every node has it.
pub const CATALOG_PARTITION: u32 = 0;

/// One destination, as `dest list` shows it. Settings are not included:
/// they can hold secrets (signing keys, passwords, the masking key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationInfo {
    /// Name.
    pub name: String,
    /// Sink kind (`webhook`, `file`, ...).
    pub kind: String,
    /// Added at run time (`true`) or from `node.toml` (`false`).
    pub runtime: bool,
}

/// Delivery state of one (destination, partition), as its leader sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationStatus {
    /// Destination name.
    pub dest: String,
    /// Partition.
    pub partition: u32,
    /// Node reporting (the partition leader).
    pub node: u64,
    /// Next offset to deliver.
    pub cursor: u64,
    /// Next offset the partition will store.
    pub head: u64,
    /// Events stored but not yet delivered, filtered out or parked.
    pub lag_events: u64,
    /// Age of the oldest undelivered event, if any.
    pub oldest_undelivered_age_ms: Option<u64>,
    /// Last successful send.
    pub last_success: Option<Timestamp>,
    /// Last failure, in one line.
    pub last_error: Option<String>,
    /// Failed attempts on the current head-of-line batch.
    pub attempts: u32,
    /// `closed`, `open` or `half_open`.
    pub breaker: String,
    /// Parked events.
    pub dlq_size: u64,
    /// Events delivered by this leader since it took over.
    pub delivered: u64,
    /// A replay in progress: the next offset it re-delivers and its end
    /// (exclusive).
    pub replay: Option<(u64, u64)>,
    /// Requests to the destination answered in the last minute.
    #[serde(default)]
    pub requests_1m: u64,
    /// Of them, failed retryably: `failed_requests_1m / requests_1m` is
    /// the error rate an alert can watch.
    #[serde(default)]
    pub failed_requests_1m: u64,
    /// Retries since this leader took over.
    #[serde(default)]
    pub retries: u64,
    /// Time spent waiting on backoff since this leader took over (ms).
    #[serde(default)]
    pub backoff_wait_ms: u64,
    /// Time spent waiting on the open breaker since this leader took over
    /// (ms).
    #[serde(default)]
    pub breaker_wait_ms: u64,
}

impl DestinationStatus {
    /// Share of requests that failed retryably over the last minute, in
    /// [0, 1] (0 without requests).
    pub fn error_rate_1m(&self) -> f64 {
        if self.requests_1m == 0 {
            0.0
        } else {
            self.failed_requests_1m as f64 / self.requests_1m as f64
        }
    }
}
