//! The auditflow protocol: what an audit event is and how it travels.
//!
//! This crate is pure: no I/O, no async, no tokio, actix or quinn. Everything a
//! node, a client and the simulator must agree on byte for byte lives here.
//!
//! - [`event`]: the audit event of DESIGN.md §2, the stored event the broker
//!   returns, timestamps and hashes.
//! - [`validate`]: per-field validation with a clear reason per failure (G7).
//! - [`canonical`]: the fixed canonical encoding that hashing covers (G6).
//! - [`chain`]: the per-partition SHA-256 hash chain and its verifier.
//! - [`partition`]: which partition an event belongs to.
//! - [`wire`]: versioned request/response messages for the client API.
//! - [`frame`]: length-prefixed framing with a maximum frame size.

pub mod canonical;
pub mod chain;
pub mod delivery;
pub mod event;
pub mod frame;
pub mod partition;
pub mod sample;
pub mod validate;
pub mod wire;

pub use event::{
    Actor, Event, Hash32, JsonObject, Outcome, Source, StoredEvent, StoredEventRef, Target,
    Timestamp,
};
pub use validate::{Limits, ValidationError};
