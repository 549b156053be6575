//! The storage's fail-stop signal. After a failed write or `fdatasync`
//! what the disk holds is unknown, and an fsync must never be retried (a
//! retry can report success for pages the kernel already dropped), so
//! the storage stops taking writes for good. [`Halt`] records the first
//! such failure and tells whoever watches (the node, and through it the
//! daemon, which ends the process so a supervisor restarts it and replay
//! rebuilds what is really on disk).

use std::sync::Arc;

use tokio::sync::watch;

use super::StoreError;

/// Whether, and why, a store stopped taking writes; cheap to clone, every
/// clone shares one state.
#[derive(Clone)]
pub struct Halt(Arc<watch::Sender<Option<Arc<StoreError>>>>);

impl Default for Halt {
    fn default() -> Self {
        Halt(Arc::new(watch::Sender::new(None)))
    }
}

impl Halt {
    /// Records that writes stopped because of `cause`. Only the first
    /// cause is kept: later failures are its consequences.
    pub(crate) fn halt(&self, cause: &StoreError) {
        self.0.send_if_modified(|slot| {
            if slot.is_some() {
                return false;
            }
            *slot = Some(Arc::new(cause.shared()));
            true
        });
    }

    /// The failure that stopped writes, if any.
    pub fn cause(&self) -> Option<Arc<StoreError>> {
        self.0.borrow().clone()
    }

    /// A receiver that changes once, when writes stop.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<StoreError>>> {
        self.0.subscribe()
    }

    /// The error for an operation refused because writes stopped earlier.
    pub(crate) fn refusal(&self, what: &str) -> Option<StoreError> {
        self.cause().map(|cause| StoreError::Halted {
            what: what.to_string(),
            reason: cause.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_cause_is_kept_and_watchers_hear_it_once() {
        let halt = Halt::default();
        let mut rx = halt.subscribe();
        assert!(halt.cause().is_none() && halt.refusal("x").is_none());
        assert!(!rx.has_changed().unwrap());
        let first = StoreError::io(
            "raft log: write segment 3",
            std::io::Error::from_raw_os_error(28),
        );
        halt.halt(&first);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        halt.halt(&StoreError::WriterStopped);
        assert!(!rx.has_changed().unwrap(), "a later failure is not news");
        let cause = halt.cause().unwrap();
        assert!(matches!(*cause, StoreError::FullDisk { .. }), "{cause:?}");
        let refused = halt.refusal("database commit").unwrap();
        assert!(matches!(refused, StoreError::Halted { .. }));
        assert!(refused.to_string().contains("disk full"), "{refused}");
    }
}
