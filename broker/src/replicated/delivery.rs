//! What the dead-letter queue and delivery commands record (replicated
//! through Raft with the partition, so a new leader sees the same).

use serde::{Deserialize, Serialize};

pub use auditflow_protocol::delivery::{
    push_attempt, AttemptRecord, DlqEntry, RedriveSelection, MAX_ATTEMPTS_KEPT,
};

/// Delivery state changes, proposed by delivery actors and operators and
/// applied by every replica.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DeliveryCommand {
    /// Events below `next_offset` were delivered (or filtered out): move
    /// the cursor forward (never back: a stale actor cannot undo progress).
    Advance {
        /// Destination.
        dest: String,
        /// New cursor.
        next_offset: u64,
    },
    /// Park (or update) entries; optionally advance the cursor past them.
    Park {
        /// Destination.
        dest: String,
        /// Entries by offset.
        entries: Vec<(u64, DlqEntry)>,
        /// New cursor, if the stream moves on.
        next_offset: Option<u64>,
    },
    /// Mark parked entries for another delivery attempt.
    Redrive {
        /// Destination.
        dest: String,
        /// Which entries.
        selection: RedriveSelection,
    },
    /// Redriven entries were delivered: remove them from the DLQ.
    Resolve {
        /// Destination.
        dest: String,
        /// Their offsets.
        offsets: Vec<u64>,
    },
    /// Set the cursor back to `next_offset` (never forward: that would skip
    /// events). No longer proposed, replay uses a window now; kept so the
    /// log entries of earlier versions still decode and apply.
    SetCursor {
        /// Destination.
        dest: String,
        /// New cursor.
        next_offset: u64,
    },
    /// Add or replace a run-time destination in the catalog (applied by
    /// the catalog partition only).
    PutDestination {
        /// Destination.
        dest: String,
        /// Its configuration as JSON (checked before it was proposed).
        config_json: String,
    },
    /// Remove a run-time destination from the catalog.
    RemoveDestination {
        /// Destination.
        dest: String,
    },
    /// Open (or replace) the destination's replay window `[from, until)`:
    /// those events are re-delivered alongside the live stream, whose
    /// cursor does not move. `until` is clamped to the cursor when
    /// applied; an empty window closes the replay.
    Replay {
        /// Destination.
        dest: String,
        /// First offset to re-deliver.
        from: u64,
        /// End (exclusive); `None`: the cursor.
        until: Option<u64>,
    },
    /// The replay window moved on from `expect` to `next` (closed at its
    /// end). Ignored unless the window still starts at `expect`, so a
    /// stale proposal cannot skip part of a replay that replaced it.
    ReplayAdvance {
        /// Destination.
        dest: String,
        /// Where the window starts now.
        expect: u64,
        /// Where it starts next.
        next: u64,
    },
}

/// Replay windows of one partition: destination → (next offset, end).
pub type ReplayWindows = std::collections::BTreeMap<String, (u64, u64)>;

impl DeliveryCommand {
    /// The destination it concerns.
    pub fn dest(&self) -> &str {
        match self {
            DeliveryCommand::Advance { dest, .. }
            | DeliveryCommand::Park { dest, .. }
            | DeliveryCommand::Redrive { dest, .. }
            | DeliveryCommand::Resolve { dest, .. }
            | DeliveryCommand::SetCursor { dest, .. }
            | DeliveryCommand::PutDestination { dest, .. }
            | DeliveryCommand::RemoveDestination { dest }
            | DeliveryCommand::Replay { dest, .. }
            | DeliveryCommand::ReplayAdvance { dest, .. } => dest,
        }
    }
}
