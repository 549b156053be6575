//! Leader rebalancing: hands each partition back to its preferred node once
//! that node is back and caught up.
//!
//! A cluster starts with leaders spread (partition `p` prefers the
//! `p mod n`-th node by id, see [`preferred_leader`]), but every failover
//! moves leaders to the survivors and nothing moved them back: after a
//! node restart one node could lead every partition, doing all client
//! handling, replication and delivery while the others idle. So each node
//! periodically looks at the partitions it leads and hands the ones it
//! does not prefer to their preferred node, as Kafka's preferred-leader
//! election does. Only a partition it already led, in the same term, a
//! round ago: a leader refuses votes for a lease after its election
//! (below), which also keeps leadership from moving again right after a
//! failover.
//!
//! openraft 0.9 has no leadership transfer. The handover builds one from
//! what it has, in the order Raft's own transfer extension prescribes:
//! 1. the partition actor holds new appends (they queue) and answers once
//!    the ones it proposed are answered, so the log stops growing;
//! 2. the leader waits until the target holds its whole log and it is
//!    applied;
//! 3. it asks the target to campaign at once (`PeerRequest::Campaign`, Raft's
//!    TimeoutNow). The target's vote request carries a log as long as the
//!    leader's, so the leader grants it (openraft's leader lease guards
//!    followers that hear from a leader, not the leader's own vote), and
//!    with its own vote that is a majority of three;
//! 4. once another node leads, the hold ends and queued appends are
//!    answered with a redirect to it, which clients follow.
//!
//! Delivery progress records are proposed by the delivery actors, which
//! wait while a handover is flagged ([`wait_out_handover`]): one that
//! landed between the check of step 2 and the vote made the leader refuse
//! the vote (its log was longer), as the simulator showed. One already on
//! its way when the flag rose can still do that; it, like a handover that
//! does not complete in time, ends the hold all the same, and the worst
//! outcome is an ordinary election, as after any failure. A
//! partition whose handover failed is left alone for [`COOL_DOWN_ROUNDS`]
//! rounds, so a preferred node that is down or slow is not tried again at
//! every round.

use std::collections::BTreeMap;
use std::time::Duration;

use actix::Addr;
use openraft::{BasicNode, RaftMetrics};
use tokio::sync::watch;
use tracing::{info, warn};

use super::actor::{Hold, PartitionActor, Release};
use super::{NodeId, Raft};
use crate::metrics::LEADER_HANDOVERS_TOTAL;
use crate::partition::transport::{PeerLink, PeerRequest, PeerResponse};

/// How far behind the leader's log (in entries) the preferred node may be
/// for a handover to start; the hold then lets it catch up the rest.
pub const MAX_LAG_ENTRIES: u64 = 64;
/// Rounds a partition is skipped after a failed handover.
pub const COOL_DOWN_ROUNDS: u32 = 6;
/// Longest wait for the target to hold the whole log once appends are
/// held.
const CATCH_UP: Duration = Duration::from_secs(1);
/// Longest wait for the `Campaign` RPC's answer.
const CAMPAIGN_RPC: Duration = Duration::from_secs(1);
/// Longest a delivery progress record waits for a handover to end, in
/// case the flag is never lowered.
pub const MAX_RECORD_HOLD: Duration = Duration::from_secs(10);

/// Waits until no handover of the partition is under way (at most
/// [`MAX_RECORD_HOLD`]). Delivery actors call it before proposing a
/// progress record: one appended after the leader compared logs would
/// make the leader refuse the vote (its log is longer), and the handover
/// would end in an election instead.
pub async fn wait_out_handover(handing_over: &watch::Receiver<bool>) {
    let mut rx = handing_over.clone();
    // A closed channel (rebalancing off, node stopping) waits for nothing.
    let _ = tokio::time::timeout(MAX_RECORD_HOLD, rx.wait_for(|h| !*h)).await;
}

/// The node that should lead `partition`: the `partition mod n`-th of
/// `nodes` by id. The same rule spreads leaders at cluster init.
pub fn preferred_leader(partition: u32, nodes: &[NodeId]) -> Option<NodeId> {
    let mut ids = nodes.to_vec();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return None;
    }
    Some(ids[partition as usize % ids.len()])
}

/// What a handover decision needs from a group's metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaderView {
    /// This node's current term.
    pub term: u64,
    /// The group's current leader as this node sees it.
    pub leader: Option<NodeId>,
    /// Index of the last entry in this node's log.
    pub last_log_index: Option<u64>,
    /// Index of the last entry this node has applied.
    pub last_applied: Option<u64>,
    /// Voters of the group.
    pub voters: Vec<NodeId>,
    /// For a leader: the last index each follower is known to hold.
    pub matched: BTreeMap<NodeId, Option<u64>>,
}

impl LeaderView {
    /// The view of a group's metrics.
    pub fn of(m: &RaftMetrics<NodeId, BasicNode>) -> LeaderView {
        LeaderView {
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            voters: m.membership_config.membership().voter_ids().collect(),
            matched: m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .map(|(id, log)| (*id, log.map(|l| l.index)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// Whether `me` should hand `partition` over, and to whom: only a leader
/// that is not the partition's preferred node and already led in the same
/// term a round ago (`led_last_round`), to a preferred node that is a voter
/// and at most [`MAX_LAG_ENTRIES`] behind.
///
/// The round of leadership matters: openraft's leader refuses every vote
/// for a lease (`election_timeout_max`) after its election, so a campaign
/// started sooner would only raise the term and force an election.
pub fn handover_target(
    me: NodeId,
    preferred: NodeId,
    view: &LeaderView,
    led_last_round: Option<u64>,
) -> Option<NodeId> {
    if view.leader != Some(me)
        || led_last_round != Some(view.term)
        || preferred == me
        || !view.voters.contains(&preferred)
    {
        return None;
    }
    let last = view.last_log_index?;
    let held = (*view.matched.get(&preferred)?)?;
    (held.saturating_add(MAX_LAG_ENTRIES) >= last).then_some(preferred)
}

/// Whether `to` may campaign now: this node still leads, has applied its
/// whole log and `to` holds all of it, so the leader's vote goes to it.
pub fn ready_to_hand_over(me: NodeId, to: NodeId, view: &LeaderView) -> bool {
    view.leader == Some(me)
        && view.last_log_index.is_some()
        && view.last_applied == view.last_log_index
        && view.matched.get(&to).copied().flatten() == view.last_log_index
}

/// The pause before the next rebalancing round, `elapsed` after the node
/// started. A new cluster's founder leads every partition at first (it is
/// the only voter until the others join, `partition::rejoin`): so for the
/// first
/// [`QUICK_ROUNDS_FOR`] `every`s the rounds come as often as a leader's
/// vote lease allows (twice `election_timeout_max`, a round must outlast
/// the lease, see [`handover_target`]), spreading leaders within seconds
/// instead of after several `every`s; then every `every`.
pub fn round_interval(
    elapsed: Duration,
    every: Duration,
    election_timeout_max: Duration,
) -> Duration {
    let quick = (election_timeout_max * 2).min(every);
    if elapsed < every * QUICK_ROUNDS_FOR {
        quick
    } else {
        every
    }
}

/// For how many `every`s after a start rebalancing rounds come quickly
/// ([`round_interval`]).
pub const QUICK_ROUNDS_FOR: u32 = 3;

/// One partition as the rebalancer sees it.
pub struct Group {
    /// Its Raft group.
    pub raft: Raft,
    /// Its write path, which holds appends during a handover.
    pub actor: Addr<PartitionActor>,
    /// Raised during a handover; its delivery actors hold their progress
    /// records meanwhile ([`wait_out_handover`]).
    pub handing_over: watch::Sender<bool>,
}

/// Every `every`, hands the partitions this node leads but does not prefer
/// to their preferred node. Ends when the Raft groups have stopped.
pub async fn rebalance_leaders(
    me: NodeId,
    nodes: Vec<NodeId>,
    groups: Vec<Group>,
    transport: PeerLink,
    every: Duration,
    election_timeout_max: Duration,
) {
    let Some(preferred) = (0..groups.len() as u32)
        .map(|p| preferred_leader(p, &nodes))
        .collect::<Option<Vec<NodeId>>>()
    else {
        return;
    };
    let mut cool_down = vec![0u32; groups.len()];
    // The term each partition was led by this node in at the last round.
    let mut led: Vec<Option<u64>> = vec![None; groups.len()];
    let started = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(round_interval(
            started.elapsed(),
            every,
            election_timeout_max,
        ))
        .await;
        for (p, group) in groups.iter().enumerate() {
            let view = {
                let m = group.raft.metrics();
                let m = m.borrow();
                if m.running_state.is_err() {
                    return;
                }
                LeaderView::of(&m)
            };
            let led_last_round = led[p];
            led[p] = (view.leader == Some(me)).then_some(view.term);
            if cool_down[p] > 0 {
                cool_down[p] -= 1;
                continue;
            }
            let partition = p as u32;
            let Some(to) = handover_target(me, preferred[p], &view, led_last_round) else {
                continue;
            };
            let result =
                match hand_over(me, partition, group, &transport, to, election_timeout_max).await {
                    Ok(()) => {
                        info!(partition, to, "handed leadership to the preferred node");
                        "done"
                    }
                    Err(reason) => {
                        warn!(partition, to, "leadership handover failed: {reason}");
                        cool_down[p] = COOL_DOWN_ROUNDS;
                        "failed"
                    }
                };
            metrics::counter!(
                LEADER_HANDOVERS_TOTAL,
                "partition" => partition.to_string(),
                "result" => result
            )
            .increment(1);
        }
    }
}

/// Hands `group`'s leadership to `to` (see the module documentation).
async fn hand_over(
    me: NodeId,
    partition: u32,
    group: &Group,
    transport: &PeerLink,
    to: NodeId,
    election_timeout_max: Duration,
) -> Result<(), String> {
    let elected_within = election_timeout_max * 2;
    let hold = CATCH_UP + CAMPAIGN_RPC + elected_within;
    group.handing_over.send_replace(true);
    let held = tokio::time::timeout(CATCH_UP, group.actor.send(Hold { for_at_most: hold })).await;
    let result = match held {
        Ok(Ok(())) => campaign(me, partition, group, transport, to, elected_within).await,
        Ok(Err(e)) => Err(format!("partition actor: {e}")),
        Err(_) => Err(format!(
            "appends in flight not answered within {CATCH_UP:?}"
        )),
    };
    group.actor.do_send(Release);
    group.handing_over.send_replace(false);
    result
}

async fn campaign(
    me: NodeId,
    partition: u32,
    group: &Group,
    transport: &PeerLink,
    to: NodeId,
    elected_within: Duration,
) -> Result<(), String> {
    group
        .raft
        .wait(Some(CATCH_UP))
        .metrics(
            |m| ready_to_hand_over(me, to, &LeaderView::of(m)),
            "preferred node holds the whole log",
        )
        .await
        .map_err(|e| format!("node {to} did not catch up: {e}"))?;
    match transport
        .call(to, PeerRequest::Campaign { partition }, CAMPAIGN_RPC)
        .await
    {
        Ok(PeerResponse::Campaigning) => {}
        Ok(PeerResponse::Failed(reason)) => return Err(format!("node {to} refused: {reason}")),
        Ok(other) => return Err(format!("node {to} answered {other:?}")),
        Err(e) => return Err(e.to_string()),
    }
    group
        .raft
        .wait(Some(elected_within))
        .metrics(
            |m| m.current_leader.is_some_and(|l| l != me),
            "another node leads",
        )
        .await
        .map_err(|e| format!("no new leader: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn view(leader: NodeId, last: u64, matched: &[(NodeId, Option<u64>)]) -> LeaderView {
        LeaderView {
            term: 7,
            leader: Some(leader),
            last_log_index: Some(last),
            last_applied: Some(last),
            voters: vec![1, 2, 3],
            matched: matched.iter().copied().collect(),
        }
    }

    #[test]
    fn rounds_come_quickly_only_after_a_start() {
        let (every, lease) = (Duration::from_secs(10), Duration::from_millis(1200));
        let at = |s: u64| round_interval(Duration::from_secs(s), every, lease);
        assert_eq!(at(0), Duration::from_millis(2400));
        assert_eq!(at(29), Duration::from_millis(2400));
        assert_eq!(at(30), every);
        // Never more often than `every` itself.
        let short = Duration::from_secs(2);
        assert_eq!(round_interval(Duration::ZERO, short, lease), short);
    }

    #[test]
    fn preferred_leaders_spread_like_init() {
        let nodes = [3, 1, 2];
        let leaders: Vec<_> = (0..8)
            .map(|p| preferred_leader(p, &nodes).unwrap())
            .collect();
        assert_eq!(leaders, [1, 2, 3, 1, 2, 3, 1, 2]);
        assert_eq!(preferred_leader(0, &[]), None);
    }

    #[test]
    fn only_a_leader_that_is_not_preferred_hands_over() {
        let v = view(1, 100, &[(2, Some(100)), (3, Some(100))]);
        assert_eq!(handover_target(1, 2, &v, Some(7)), Some(2));
        // Preferred already leads.
        assert_eq!(handover_target(1, 1, &v, Some(7)), None);
        // Not the leader.
        assert_eq!(handover_target(2, 3, &v, Some(7)), None);
        // The preferred node is not a voter.
        assert_eq!(handover_target(1, 4, &v, Some(7)), None);
    }

    #[test]
    fn a_leader_hands_over_only_after_leading_a_whole_round_in_its_term() {
        let v = view(1, 100, &[(2, Some(100))]);
        // Just elected: its lease would refuse the campaign.
        assert_eq!(handover_target(1, 2, &v, None), None);
        // Led a round ago, but in an earlier term: re-elected since.
        assert_eq!(handover_target(1, 2, &v, Some(6)), None);
        assert_eq!(handover_target(1, 2, &v, Some(7)), Some(2));
    }

    #[test]
    fn a_lagging_or_unknown_preferred_node_is_not_handed_anything() {
        let lag = view(1, 100 + MAX_LAG_ENTRIES + 1, &[(2, Some(100))]);
        assert_eq!(handover_target(1, 2, &lag, Some(7)), None);
        let edge = view(1, 100 + MAX_LAG_ENTRIES, &[(2, Some(100))]);
        assert_eq!(handover_target(1, 2, &edge, Some(7)), Some(2));
        let never = view(1, 10, &[(2, None)]);
        assert_eq!(handover_target(1, 2, &never, Some(7)), None);
        let absent = view(1, 10, &[(3, Some(10))]);
        assert_eq!(handover_target(1, 2, &absent, Some(7)), None);
    }

    #[test]
    fn campaign_waits_for_the_whole_log_applied_and_replicated() {
        let mut v = view(1, 50, &[(2, Some(50))]);
        assert!(ready_to_hand_over(1, 2, &v));
        v.matched.insert(2, Some(49));
        assert!(!ready_to_hand_over(1, 2, &v));
        v.matched.insert(2, Some(50));
        v.last_applied = Some(49);
        assert!(!ready_to_hand_over(1, 2, &v));
        v.last_applied = Some(50);
        v.leader = Some(3);
        assert!(!ready_to_hand_over(1, 2, &v));
    }

    proptest! {
        /// Whatever the metrics say, a handover only ever goes to the
        /// preferred node, from a leader that led a round ago in the same
        /// term, and only when campaigning is safe for the log the leader
        /// has.
        #[test]
        fn handover_never_targets_anyone_but_a_caught_up_preferred_voter(
            me in 1u64..4,
            preferred in 1u64..5,
            leader in proptest::option::of(1u64..4),
            last in proptest::option::of(0u64..500),
            matched in proptest::collection::btree_map(1u64..5, proptest::option::of(0u64..500), 0..4),
            term in 1u64..4,
            led_last_round in proptest::option::of(1u64..4),
        ) {
            let v = LeaderView {
                term,
                leader,
                last_log_index: last,
                last_applied: last,
                voters: vec![1, 2, 3],
                matched,
            };
            if let Some(to) = handover_target(me, preferred, &v, led_last_round) {
                prop_assert_eq!(to, preferred);
                prop_assert_eq!(led_last_round, Some(term));
                prop_assert_ne!(to, me);
                prop_assert_eq!(v.leader, Some(me));
                prop_assert!(v.voters.contains(&to));
                let held = v.matched[&to].unwrap();
                prop_assert!(held + MAX_LAG_ENTRIES >= v.last_log_index.unwrap());
            }
            if ready_to_hand_over(me, preferred, &v) {
                prop_assert_eq!(v.matched[&preferred], v.last_log_index);
            }
        }
    }
}
