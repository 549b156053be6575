//! What the partitions' Raft groups replicate, typed in a leaf that
//! imports nothing of the broker but the protocol crate: the log payload
//! ([`Command`]), the delivery state every replica keeps (cursors, DLQ,
//! replay windows, [`delivery`]) and the seeded async runtime openraft runs
//! on ([`runtime`]); [`planted`] holds the simulator's switch for planted
//! bugs. Storage applies these, partition proposes them,
//! delivery and the API build them; none of those need each other for it.

pub mod command;
pub mod delivery;
pub mod planted;
pub mod runtime;

pub use command::{Command, CommandResponse, NodeId};
pub use delivery::{DeliveryCommand, ReplayWindows};
