//! Delivery: every stored event to every destination that wants it, in
//! order per partition, or visibly parked in that destination's DLQ.
//!
//! - [`config`]: destinations (sink, filter, masking, batching, retry).
//! - [`filter`], [`mask`], [`backoff`], [`breaker`]: the pure rules, shared
//!   with the simulator.
//! - The delivery commands replicated through Raft are typed in
//!   `replicated::delivery` (cursors and DLQ live in the partition state
//!   machine, so a new leader resumes where the old one stopped).
//! - [`core`]: the sans-IO delivery state machine of one (destination,
//!   partition): every decision of delivery, driven by [`actor`].
//! - [`actor`]: the `DeliveryActor` of one (destination, partition), a thin
//!   driver of its core.
//! - [`supervisor`]: starts and stops actors as partition leadership moves.
//! - [`status`]: what each actor reports for `dest status` and metrics.

pub mod actor;
pub mod backoff;
pub mod breaker;
pub mod catalog;
pub mod config;
pub mod core;
pub mod filter;
pub mod mask;
pub mod status;
pub mod supervisor;

pub use config::{DestinationConfig, Filter};
