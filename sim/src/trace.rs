//! The trace of a run: one line per thing that happened (a fault, an
//! acknowledgement, a leader change, a sink's answer), each stamped with
//! simulated time. Every line goes into a SHA-256 whose hex digest is the
//! run's trace hash, so two runs of a seed can be compared by one string
//! (G9); only the last lines are kept, to print for a failing seed.

use std::collections::VecDeque;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// The trace: every line is hashed; the last ones are kept for printing.
pub(crate) struct Trace {
    /// Hash of every line so far, in order.
    hasher: Sha256,
    /// The last `keep` lines: a run writes thousands, a reader wants the
    /// ones just before things went wrong.
    tail: VecDeque<String>,
    /// How many lines `tail` keeps (0: none).
    keep: usize,
}

impl Trace {
    /// A trace that keeps its last `keep` lines.
    pub(crate) fn new(keep: usize) -> Trace {
        Trace {
            hasher: Sha256::new(),
            tail: VecDeque::new(),
            keep,
        }
    }

    /// Records `text` as happening at simulated time `at`.
    pub(crate) fn line(&mut self, at: Duration, text: String) {
        let line = format!("{:>9.3}s {text}", at.as_secs_f64());
        self.hasher.update(line.as_bytes());
        self.hasher.update(b"\n");
        if self.keep == 0 {
            return;
        }
        if self.tail.len() == self.keep {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    /// The hex trace hash and the kept lines, oldest first.
    pub(crate) fn finish(self) -> (String, Vec<String>) {
        (
            hex::encode(self.hasher.finalize()),
            self.tail.into_iter().collect(),
        )
    }
}
