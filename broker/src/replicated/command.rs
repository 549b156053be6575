//! The Raft log payload: what one entry asks every replica's state machine
//! to do, and what applying it answers the proposer.

use std::sync::Arc;

use auditflow_protocol::wire::AppendResult;
use auditflow_protocol::{Event, Timestamp};
use serde::{Deserialize, Serialize};

use super::delivery::DeliveryCommand;

/// A node id: 1-based, fixed in the cluster configuration.
pub type NodeId = u64;

/// What one Raft log entry asks the partition state machine to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Append a group-committed batch of already validated events. The
    /// leader stamps `received_at` once, before proposing, so that every
    /// replica assigns the same value when it applies the entry.
    Append {
        /// Leader clock at proposal time.
        received_at: Timestamp,
        /// The events, in the order their offsets will be assigned. Shared,
        /// because openraft clones an entry each time it reads one back
        /// (to replicate it to each follower and to apply it); encoded as
        /// a plain sequence.
        events: Arc<[Event]>,
    },
    /// Change delivery state: cursors and the dead-letter queue.
    Delivery(DeliveryCommand),
}

/// What applying a [`Command`] produced, returned to the proposer.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub enum CommandResponse {
    /// Blank and membership entries produce nothing.
    #[default]
    Empty,
    /// One result per event of an [`Command::Append`], in order.
    Appended(Vec<AppendResult>),
    /// A delivery command was applied: the destination's cursor after it
    /// and how many DLQ entries it touched.
    Delivery {
        /// The cursor after the command.
        cursor: u64,
        /// DLQ entries added, updated, marked or removed.
        touched: u64,
    },
}
