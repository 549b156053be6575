//! What `/healthz` says (pure): whether this node can still do its work,
//! for a liveness probe or a supervisor deciding to restart it.
//!
//! Unhealthy when its storage halted (a failed write or sync: the node
//! fail-stops and its process is about to end), when a partition's Raft
//! core stopped on an error, or when a partition has had no known leader
//! for longer than the node's `raft.leaderless_max_ms` (a minute by
//! default; [`crate::config::RaftTuning`]). Healthy otherwise, including while
//! a cluster first elects its leaders.

use std::time::{Duration, Instant};

use openraft::error::Fatal;
use serde::Serialize;

use crate::partition::NodeId;
use crate::storage::StoreError;

/// The `/healthz` answer when unhealthy (`503`), as JSON.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct Health {
    /// `true` when nothing below is wrong.
    pub healthy: bool,
    /// What is wrong, one entry per problem.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
}

/// One thing that makes a node unhealthy.
#[derive(Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    /// Storage stopped taking writes.
    StorageHalted {
        /// The failure that stopped it.
        cause: String,
    },
    /// A partition's Raft core stopped on an error.
    RaftStopped {
        /// The partition.
        partition: u32,
        /// Why.
        cause: String,
    },
    /// A partition has had no known leader for `seconds`.
    NoLeader {
        /// The partition.
        partition: u32,
        /// For how long, in whole seconds.
        seconds: u64,
    },
}

/// Judges a node from its store's halt, each partition's Raft core state
/// and how long partitions have been leaderless (see [`Leaderless`]); a
/// partition leaderless for longer than `max` is a problem. A core
/// stopped on request (`Fatal::Stopped`) is a shutdown, not a fault.
pub fn assess(
    halted: Option<&StoreError>,
    cores: impl IntoIterator<Item = (u32, Result<(), Fatal<NodeId>>)>,
    leaderless: &[(u32, Duration)],
    max: Duration,
) -> Health {
    let mut problems = Vec::new();
    if let Some(cause) = halted {
        problems.push(Problem::StorageHalted {
            cause: cause.to_string(),
        });
    }
    for (partition, state) in cores {
        match state {
            Ok(()) | Err(Fatal::Stopped) => {}
            Err(cause) => problems.push(Problem::RaftStopped {
                partition,
                cause: cause.to_string(),
            }),
        }
    }
    for &(partition, for_) in leaderless {
        if for_ > max {
            problems.push(Problem::NoLeader {
                partition,
                seconds: for_.as_secs(),
            });
        }
    }
    Health {
        healthy: problems.is_empty(),
        problems,
    }
}

/// Since when each partition has had no known leader, from observations
/// (a partition first seen leaderless counts from that observation).
#[derive(Debug, Default)]
pub struct Leaderless {
    /// Per partition, since when it has been seen without a leader.
    since: Vec<Option<Instant>>,
}

impl Leaderless {
    /// Records at `now` which partitions have a known leader (in order).
    pub fn observe(&mut self, now: Instant, has_leader: impl IntoIterator<Item = bool>) {
        for (p, led) in has_leader.into_iter().enumerate() {
            if self.since.len() <= p {
                self.since.resize(p + 1, None);
            }
            let since = &mut self.since[p];
            if led {
                *since = None;
            } else if since.is_none() {
                *since = Some(now);
            }
        }
    }

    /// The partitions without a leader at the last observation, and for
    /// how long as of `now`.
    pub fn durations(&self, now: Instant) -> Vec<(u32, Duration)> {
        self.since
            .iter()
            .enumerate()
            .filter_map(|(p, since)| since.map(|s| (p as u32, now.saturating_duration_since(s))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(
        halted: Option<StoreError>,
        cores: Vec<(u32, Result<(), Fatal<NodeId>>)>,
        leaderless: &[(u32, u64)],
        want: &[&str],
    ) {
        let leaderless: Vec<(u32, Duration)> = leaderless
            .iter()
            .map(|&(p, s)| (p, Duration::from_secs(s)))
            .collect();
        let health = assess(halted.as_ref(), cores, &leaderless, Duration::from_secs(60));
        let got: Vec<String> = health
            .problems
            .iter()
            .map(|p| serde_json::to_string(p).unwrap())
            .collect();
        assert_eq!(health.healthy, want.is_empty(), "{got:?}");
        assert_eq!(got.len(), want.len(), "{got:?} / {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(g.contains(w), "{g} should contain {w}");
        }
    }

    #[test]
    fn what_makes_a_node_unhealthy() {
        let full = || {
            StoreError::io(
                "raft log: write segment 4",
                std::io::Error::from_raw_os_error(28),
            )
        };
        // Healthy: cores running or stopped on request, short elections.
        check(
            None,
            vec![(0, Ok(())), (1, Err(Fatal::Stopped))],
            &[(2, 59)],
            &[],
        );
        check(
            Some(full()),
            vec![(0, Ok(()))],
            &[],
            &[r#""kind":"storage_halted","cause":"raft log: write segment 4: disk full"#],
        );
        check(
            None,
            vec![(0, Ok(())), (1, Err(Fatal::Panicked))],
            &[],
            &[r#"{"kind":"raft_stopped","partition":1,"cause":"panicked"}"#],
        );
        check(
            None,
            vec![],
            &[(3, 61), (4, 10)],
            &[r#"{"kind":"no_leader","partition":3,"seconds":61}"#],
        );
        check(
            Some(full()),
            vec![(5, Err(Fatal::Panicked))],
            &[(0, 600)],
            &["storage_halted", "raft_stopped", "no_leader"],
        );
    }

    #[test]
    fn leaderless_time_counts_from_the_first_sighting_and_resets_with_a_leader() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut l = Leaderless::default();
        l.observe(t0, [true, false, false]);
        assert_eq!(l.durations(t0 + s(5)), [(1, s(5)), (2, s(5))]);
        l.observe(t0 + s(10), [true, true, false]);
        assert_eq!(l.durations(t0 + s(70)), [(2, s(70))]);
        // Leader lost again: counts from the new sighting.
        l.observe(t0 + s(80), [false, true, true]);
        assert_eq!(l.durations(t0 + s(81)), [(0, s(1))]);
    }
}
