//! The clock seam: broker wall-clock time (`received_at`) comes only from
//! here, so the simulator can substitute simulated time.

use std::time::{SystemTime, UNIX_EPOCH};

use auditflow_protocol::Timestamp;

/// A source of wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Now, as Unix nanoseconds.
    fn now(&self) -> Timestamp;
}

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Timestamp(i64::try_from(nanos).unwrap_or(i64::MAX))
    }
}
