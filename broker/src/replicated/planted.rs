//! Planted bugs: deliberately broken variants of the code that keeps G4,
//! G5, G6 and masking, which only the simulator switches on, to show that
//! its checkers catch each (DESIGN.md §6: "the checker itself is tested").
//!
//! The switch is per thread, like the seeded Raft RNG of [`super::runtime`]:
//! the simulator runs a whole run on one thread and sets it before the run
//! ([`plant`]); production never calls [`plant`], no configuration reaches
//! it, and each check is one thread-local read. It lives in this leaf so
//! that storage and delivery may both read it.

use std::cell::Cell;

/// One planted bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PlantedBug {
    /// Delivery sends each batch of two or more with its first two events
    /// swapped (breaks G4, order).
    G4Order,
    /// The state machine's dedup lookup forgets every stored id (breaks
    /// G5: a re-sent event is stored again).
    G5Duplicates,
    /// The state machine chains an append batch that starts at an odd
    /// offset to the zero hash instead of the previous event's (breaks
    /// G6).
    G6Chain,
    /// Delivery sends events without applying the destination's masking
    /// rules.
    Masking,
    /// The delivery breaker as it was before issue 33: one result per
    /// batch (failed if any item failed), no rate rule, a whole batch as
    /// the probe, closed by one success. A flaky endpoint then keeps it
    /// open; the simulator's progress checker must notice.
    BreakerPerBatch,
}

thread_local! {
    static PLANTED: Cell<Option<PlantedBug>> = const { Cell::new(None) };
}

/// Plants `bug` on this thread (`None` removes it). The simulator calls it
/// around a run; nothing else may.
#[doc(hidden)]
pub fn plant(bug: Option<PlantedBug>) {
    PLANTED.with(|p| p.set(bug));
}

/// Whether `bug` is planted on this thread.
pub fn planted(bug: PlantedBug) -> bool {
    PLANTED.with(|p| p.get()) == Some(bug)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bug_is_planted_only_on_the_thread_that_planted_it() {
        assert!(!planted(PlantedBug::G4Order));
        plant(Some(PlantedBug::G4Order));
        assert!(planted(PlantedBug::G4Order));
        assert!(!planted(PlantedBug::Masking));
        let elsewhere = std::thread::spawn(|| planted(PlantedBug::G4Order))
            .join()
            .unwrap_or(true);
        assert!(!elsewhere);
        plant(None);
        assert!(!planted(PlantedBug::G4Order));
    }
}
