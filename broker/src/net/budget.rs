//! Memory bounds of the request path, in bytes and connections (G8).
//!
//! A [`Budget`] is the pure accounting: a limit and what is in use; taking
//! past the limit is refused, never queued, so a node under more load than
//! it has room for answers `Overloaded` (retry later) instead of growing.
//! [`SharedBudget`] shares one between the tasks of a node, and a
//! [`Reservation`] gives its amount back when dropped, so a request that
//! fails or is cancelled anywhere cannot leak room.
//!
//! The QUIC server takes, for each client request, twice the request's
//! frame length (the frame and its decoded form live at once) from the
//! request's connection and from the node, before it reads the body, and
//! holds it until the response is written; and one unit per client
//! connection from the node's connection budget.

use std::sync::{Arc, Mutex};

/// A bound and how much of it is in use (pure). The unit is the caller's:
/// bytes for requests, one per connection for connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// The bound.
    limit: u64,
    /// Taken and not given back.
    used: u64,
}

/// Why a [`Budget`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not now: in use plus the request would pass the limit. Room comes
    /// back as requests finish.
    Full {
        /// In use when asked.
        used: u64,
        /// The bound.
        limit: u64,
    },
    /// Never: the request alone is larger than the bound.
    TooLarge {
        /// The bound.
        limit: u64,
    },
}

impl Budget {
    /// An empty budget of `limit`.
    pub fn new(limit: u64) -> Budget {
        Budget { limit, used: 0 }
    }

    /// Takes `n` if it fits under the limit.
    pub fn take(&mut self, n: u64) -> Result<(), Refused> {
        if n > self.limit {
            return Err(Refused::TooLarge { limit: self.limit });
        }
        match self.used.checked_add(n) {
            Some(total) if total <= self.limit => {
                self.used = total;
                Ok(())
            }
            _ => Err(Refused::Full {
                used: self.used,
                limit: self.limit,
            }),
        }
    }

    /// Gives back `n` taken earlier. Giving back more than is in use is a
    /// caller's mistake; the count stops at zero rather than wrapping.
    pub fn give_back(&mut self, n: u64) {
        debug_assert!(n <= self.used, "gave back {n} of {} in use", self.used);
        self.used = self.used.saturating_sub(n);
    }

    /// In use.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// The bound.
    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// A [`Budget`] shared by the tasks of a node.
#[derive(Clone, Debug)]
pub struct SharedBudget(Arc<Mutex<Budget>>);

/// An amount taken from one or more shared budgets; given back to each
/// when dropped.
#[derive(Debug)]
pub struct Reservation {
    /// Where it was taken from.
    from: Vec<SharedBudget>,
    /// How much, from each.
    amount: u64,
}

impl SharedBudget {
    /// An empty shared budget of `limit`.
    pub fn new(limit: u64) -> SharedBudget {
        SharedBudget(Arc::new(Mutex::new(Budget::new(limit))))
    }

    /// Runs `f` on the budget. A poisoned lock still holds a consistent
    /// count (every update is one assignment), so it is used as is.
    fn with<T>(&self, f: impl FnOnce(&mut Budget) -> T) -> T {
        let mut b = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut b)
    }

    /// In use.
    pub fn used(&self) -> u64 {
        self.with(|b| b.used())
    }

    /// Takes `amount` from every one of `budgets`, or from none: the
    /// answer then names the first that refused (its index) and why.
    pub fn reserve(
        budgets: &[&SharedBudget],
        amount: u64,
    ) -> Result<Reservation, (usize, Refused)> {
        let mut taken = Reservation {
            from: Vec::with_capacity(budgets.len()),
            amount,
        };
        for (i, budget) in budgets.iter().enumerate() {
            // One budget locked at a time: no lock order to get wrong.
            // Dropping `taken` on refusal gives back what was taken.
            budget.with(|b| b.take(amount)).map_err(|r| (i, r))?;
            taken.from.push((*budget).clone());
        }
        Ok(taken)
    }
}

impl Reservation {
    /// The amount held from each budget.
    pub fn amount(&self) -> u64 {
        self.amount
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        for budget in &self.from {
            budget.with(|b| b.give_back(self.amount));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps on one budget of 10: (take or give back, amount, result,
    /// in use after).
    #[test]
    fn a_budget_takes_up_to_its_limit() {
        enum Op {
            Take(u64),
            Back(u64),
        }
        use Op::*;
        let full = |used| Err(Refused::Full { used, limit: 10 });
        let steps: [(Op, Result<(), Refused>, u64); 9] = [
            (Take(4), Ok(()), 4),
            (Take(6), Ok(()), 10),
            (Take(1), full(10), 10),
            (Take(0), Ok(()), 10),
            (Back(5), Ok(()), 5),
            (Take(6), full(5), 5),
            (Take(11), Err(Refused::TooLarge { limit: 10 }), 5),
            (Take(u64::MAX), Err(Refused::TooLarge { limit: 10 }), 5),
            (Take(5), Ok(()), 10),
        ];
        let mut b = Budget::new(10);
        for (i, (op, want, used)) in steps.into_iter().enumerate() {
            let got = match op {
                Take(n) => b.take(n),
                Back(n) => {
                    b.give_back(n);
                    Ok(())
                }
            };
            assert_eq!(got, want, "step {i}");
            assert_eq!(b.used(), used, "step {i}");
        }
        assert_eq!(b.limit(), 10);
    }

    #[test]
    fn the_count_cannot_overflow() {
        let mut b = Budget::new(u64::MAX);
        assert_eq!(b.take(u64::MAX - 1), Ok(()));
        assert_eq!(
            b.take(2),
            Err(Refused::Full {
                used: u64::MAX - 1,
                limit: u64::MAX
            })
        );
    }

    /// A request counts against its connection and the node: taken from
    /// both or neither, and given back to both when it ends.
    #[test]
    fn a_reservation_takes_from_all_or_none_and_gives_back() {
        let node = SharedBudget::new(100);
        let (a, b) = (SharedBudget::new(60), SharedBudget::new(60));
        let r1 = SharedBudget::reserve(&[&a, &node], 50).expect("fits");
        assert_eq!((a.used(), node.used()), (50, 50));
        // The connection has room, the node not: nothing is taken.
        let refused = SharedBudget::reserve(&[&b, &node], 60).expect_err("node full");
        assert_eq!(
            refused,
            (
                1,
                Refused::Full {
                    used: 50,
                    limit: 100
                }
            )
        );
        assert_eq!((b.used(), node.used()), (0, 50));
        // The connection is the bound.
        let refused = SharedBudget::reserve(&[&a, &node], 20).expect_err("connection full");
        assert_eq!(refused.0, 0);
        assert_eq!(node.used(), 50);
        let r2 = SharedBudget::reserve(&[&b, &node], 50).expect("fits");
        assert_eq!(r2.amount(), 50);
        assert_eq!(node.used(), 100);
        drop(r1);
        assert_eq!((a.used(), b.used(), node.used()), (0, 50, 50));
        drop(r2);
        assert_eq!((a.used(), b.used(), node.used()), (0, 0, 0));
    }
}
