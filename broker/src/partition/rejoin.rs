//! Rejoining a partition after this node lost (or cannot trust) what it
//! acknowledged, and growing a group to every configured member.
//!
//! Raft assumes a voter never forgets what it acknowledged. A node whose
//! data directory was emptied would otherwise come back as a voter with an
//! empty log and could elect a stale leader or complete a quorum that
//! lacks acknowledged entries (G1). So, per partition:
//!
//! 1. **Pending.** The node answers none of the group's Raft RPCs (vote,
//!    append, snapshot, campaign) and does not campaign (openraft's
//!    `elect(false)`): to the others it is a crashed node. It asks the
//!    partition's leader (`PeerRequest::Rejoin`, through the transport
//!    seam) to remove it from the voters, keeping it as a learner.
//! 2. The leader does so with `change_membership(RemoveVoters, retain)`
//!    and answers with the log id of the committed membership
//!    (`demoted_at`). It refuses when the voters left would be fewer than
//!    a majority of the configured members ([`plan_demotion`]), and the
//!    joint configuration needs a majority of the old voters, which the
//!    pending node does not give: two nodes wiped at once stall instead
//!    of losing data.
//! 3. **Learner.** Durably recorded first, then the node takes appends
//!    and snapshots; it still votes for nobody and does not campaign.
//! 4. The leader's [`promote_members`] makes a configured learner a voter
//!    once it is within [`PROMOTE_LAG`] entries of the leader's last log
//!    index.
//! 5. The node is a voter again when a membership *after* `demoted_at`
//!    names it a voter ([`rejoined`]); only then does it clear the state
//!    and campaign.
//!
//! Why it is safe: once the demotion is committed, every voter of the new
//! configuration (a majority of the configured members, all with intact
//! logs) holds it, so any leader elected from then on holds it too and
//! never counts the learner; a candidate with an older configuration
//! needs a vote from one of those voters, whose logs are longer. A
//! membership with a log id above `demoted_at` can only come from a
//! leader holding the demotion (Leader Completeness), so step 5 cannot be
//! fooled by a snapshot or log from before the demotion, also after a
//! crash mid-rejoin: the state is persisted in the identity record.
//!
//! The same path grows a new cluster: `init` makes the founding node the
//! only voter of every group, [`promote_members`] adds the others as
//! learners and promotes them, and the partition refuses appends until a
//! majority of the configured members are voters
//! ([`has_configured_quorum`]), so an acknowledged append is always on a
//! majority of the configured nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, LogId, RaftMetrics};
use tokio::sync::watch;
use tracing::{info, warn};

use super::transport::{PeerLink, PeerRequest, PeerResponse};
use super::{NodeId, Raft};
use crate::storage::identity::RejoinState;
use crate::storage::Store;

/// How long a rejoining node waits between attempts to reach a leader.
/// Short against the election timeout, so a rejoin after a failover is
/// not held up; each attempt is one small RPC.
pub const REJOIN_RETRY: Duration = Duration::from_millis(500);
/// Longest wait for a `Rejoin` answer: the leader commits two membership
/// entries before it answers, a few round trips and fsyncs.
pub const REJOIN_RPC: Duration = Duration::from_secs(10);
/// How often a leader looks for learners to promote and members to add.
pub const PROMOTE_EVERY: Duration = Duration::from_millis(500);
/// Most entries a learner may lag the leader's last log index and still
/// be promoted. Safety does not need it caught up (what it acknowledged
/// as a learner is durable, a prefix of the leader's log); availability
/// does: a voter far behind is a voter that cannot help commit. Under a
/// steady load the last index moves on between looks, so demanding zero
/// lag could postpone a promotion for ever. The same bound as a handover
/// (`rebalance`).
pub const PROMOTE_LAG: u64 = 64;

/// A node's rejoin state of one partition as the peer handler reads it:
/// `None` for a voter like any other.
pub type Gate = watch::Receiver<Option<RejoinState>>;

/// What a leader does with a `Rejoin` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Demotion {
    /// Commit a membership without the node as voter (a no-op change if it
    /// is none already, so the answer names a committed membership).
    Commit,
    /// Refuse: the voters left would not be a majority of the configured
    /// members.
    Refuse(String),
}

/// Smallest majority of `n` members.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// Whether a leader may remove `node` from `voters`, in a cluster of
/// `configured` members.
pub fn plan_demotion(voters: &BTreeSet<NodeId>, node: NodeId, configured: usize) -> Demotion {
    let left = voters.iter().filter(|v| **v != node).count();
    if voters.contains(&node) && left < majority(configured) {
        Demotion::Refuse(format!(
            "removing node {node} would leave {left} voters, fewer than a majority of the \
             {configured} members; waiting for another member to rejoin first"
        ))
    } else {
        Demotion::Commit
    }
}

/// Whether `voters` hold a majority of the `configured` members, so that a
/// commit is on a majority of the cluster (appends are refused before).
pub fn has_configured_quorum(voters: &BTreeSet<NodeId>, configured: &[NodeId]) -> bool {
    configured.iter().filter(|id| voters.contains(id)).count() >= majority(configured.len())
}

/// The members to add as learners: configured, not in the membership.
pub fn additions(in_membership: &BTreeSet<NodeId>, configured: &[NodeId]) -> Vec<NodeId> {
    configured
        .iter()
        .copied()
        .filter(|id| !in_membership.contains(id))
        .collect()
}

/// The configured learners at most [`PROMOTE_LAG`] entries behind the
/// leader's last log index.
pub fn promotions(
    learners: &BTreeSet<NodeId>,
    configured: &[NodeId],
    matched: &BTreeMap<NodeId, Option<LogId<NodeId>>>,
    last_log_index: Option<u64>,
) -> BTreeSet<NodeId> {
    learners
        .iter()
        .copied()
        .filter(|id| configured.contains(id))
        .filter(
            |id| match (matched.get(id).copied().flatten(), last_log_index) {
                (Some(m), Some(last)) => m.index.saturating_add(PROMOTE_LAG) >= last,
                _ => false,
            },
        )
        .collect()
}

/// Whether this node, rejoining in `state`, is a voter again: a uniform
/// membership after the demotion names it.
///
/// Uniform, not joint: while the group is in a joint configuration it
/// still needs a majority of the old voters, which do not include this
/// node, so losing one of them (a second disk) stalls the group for ever.
/// Until the change is complete the cluster is not back to tolerating the
/// loss of one disk, and says so by keeping this node rejoining (seeds
/// 1888, 2895, 7678, 8546 and 9043 of the 10,000-seed sweep: a member was
/// taken for whole while the joint configuration of its promotion was
/// pending, another node's disk was then lost, and the partition elected
/// nobody again).
pub fn rejoined(
    state: RejoinState,
    me: NodeId,
    membership_log_id: Option<LogId<NodeId>>,
    voters: &BTreeSet<NodeId>,
    joint: bool,
) -> bool {
    match state {
        RejoinState::Pending => false,
        RejoinState::Learner { demoted_at } => {
            !joint && membership_log_id > Some(demoted_at) && voters.contains(&me)
        }
    }
}

/// Whether `m`'s membership is a joint configuration (a change under way).
fn is_joint(m: &RaftMetrics<NodeId, BasicNode>) -> bool {
    m.membership_config.membership().get_joint_config().len() > 1
}

/// Whether the group has shut down (its node crashed or stopped): the
/// tasks here then end.
fn stopped(raft: &Raft) -> bool {
    let metrics = raft.metrics();
    metrics.has_changed().is_err() || metrics.borrow().state == openraft::ServerState::Shutdown
}

fn voters(m: &RaftMetrics<NodeId, BasicNode>) -> BTreeSet<NodeId> {
    m.membership_config.membership().voter_ids().collect()
}

/// The leader's side of `Rejoin`: removes `node` from the voters of the
/// group (keeping it as a learner) and answers once that is committed.
pub async fn demote(raft: &Raft, node: NodeId, configured: usize) -> PeerResponse {
    let m = raft.metrics().borrow().clone();
    if m.current_leader != Some(m.id) {
        return PeerResponse::NotLeader(m.current_leader);
    }
    if let Demotion::Refuse(reason) = plan_demotion(&voters(&m), node, configured) {
        return PeerResponse::Failed(reason);
    }
    let remove = ChangeMembers::RemoveVoters(BTreeSet::from([node]));
    match raft.change_membership(remove, true).await {
        Ok(resp) => {
            info!(node, at = %resp.log_id, "removed a rejoining node from the voters");
            PeerResponse::Demoted {
                demoted_at: resp.log_id,
            }
        }
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            PeerResponse::NotLeader(f.leader_id)
        }
        Err(e) => PeerResponse::Failed(e.to_string()),
    }
}

/// The rejoining node's side for one partition: asks leaders until one
/// demotes it, records that, then waits until it is a voter again and
/// clears the state. Ends when the group shuts down.
#[allow(clippy::too_many_arguments)]
pub async fn rejoin(
    me: NodeId,
    partition: u32,
    raft: Raft,
    link: PeerLink,
    peers: Vec<NodeId>,
    store: Store,
    gate: watch::Sender<Option<RejoinState>>,
) {
    raft.runtime_config().elect(false);
    let others: Vec<NodeId> = peers.into_iter().filter(|p| *p != me).collect();
    let mut next = 0usize;
    let mut hint: Option<NodeId> = None;
    // Pending: find a leader that demotes us.
    while *gate.borrow() == Some(RejoinState::Pending) {
        if stopped(&raft) {
            return;
        }
        let Some(target) = hint.take().filter(|h| *h != me).or_else(|| {
            let t = others.get(next % others.len().max(1)).copied();
            next += 1;
            t
        }) else {
            return;
        };
        match link
            .call(target, PeerRequest::Rejoin { partition }, REJOIN_RPC)
            .await
        {
            Ok(PeerResponse::Demoted { demoted_at }) => {
                let state = RejoinState::Learner { demoted_at };
                match store.set_rejoin(partition, Some(state)).await {
                    Ok(()) => {
                        info!(partition, at = %demoted_at, "demoted to learner; catching up");
                        gate.send_replace(Some(state));
                    }
                    Err(e) => {
                        warn!(partition, "cannot record the rejoin state: {e}");
                        tokio::time::sleep(REJOIN_RETRY).await;
                    }
                }
            }
            Ok(PeerResponse::NotLeader(Some(leader))) if leader != target => {
                hint = Some(leader);
            }
            Ok(other) => {
                tracing::debug!(partition, target, "rejoin not granted yet: {other:?}");
                tokio::time::sleep(REJOIN_RETRY).await;
            }
            Err(e) => {
                tracing::debug!(partition, target, "rejoin request failed: {e}");
                tokio::time::sleep(REJOIN_RETRY).await;
            }
        }
    }
    // Learner: wait for a membership after the demotion that makes us a
    // voter.
    let mut metrics = raft.metrics();
    loop {
        let Some(state) = *gate.borrow() else {
            break;
        };
        let done = {
            let m = metrics.borrow_and_update();
            rejoined(
                state,
                me,
                *m.membership_config.log_id(),
                &voters(&m),
                is_joint(&m),
            )
        };
        if done {
            match store.set_rejoin(partition, None).await {
                Ok(()) => {
                    // A damaged log rejoined too: the leader replaced it.
                    store.mark_repaired(partition);
                    info!(partition, "rejoined as a voter");
                    gate.send_replace(None);
                    break;
                }
                Err(e) => {
                    warn!(partition, "cannot record the rejoin state: {e}");
                    tokio::time::sleep(REJOIN_RETRY).await;
                    continue;
                }
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
    raft.runtime_config().elect(true);
}

/// Where this node leads a group: adds configured members missing from its
/// membership as learners, and promotes configured learners that have
/// caught up. Runs for the node's lifetime.
pub async fn promote_members(
    groups: Vec<Raft>,
    members: BTreeMap<NodeId, BasicNode>,
    every: Duration,
) {
    let configured: Vec<NodeId> = members.keys().copied().collect();
    loop {
        tokio::time::sleep(every).await;
        if groups.iter().all(stopped) {
            return;
        }
        for (p, raft) in groups.iter().enumerate() {
            let m = raft.metrics().borrow().clone();
            if m.current_leader != Some(m.id) {
                continue;
            }
            let membership = m.membership_config.membership();
            if is_joint(&m) {
                // A change left half done (its leader lost leadership
                // between the two steps): finish it, to the last
                // configuration. Rejoining members wait for it.
                let goal: BTreeSet<NodeId> = membership
                    .get_joint_config()
                    .last()
                    .cloned()
                    .unwrap_or_default();
                info!(partition = p, ?goal, "completing a joint membership");
                if let Err(e) = raft
                    .change_membership(ChangeMembers::ReplaceAllVoters(goal), true)
                    .await
                {
                    tracing::debug!(partition = p, "cannot complete the membership: {e}");
                }
                continue;
            }
            let present: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
            for id in additions(&present, &configured) {
                if let Some(node) = members.get(&id) {
                    if let Err(e) = raft.add_learner(id, node.clone(), false).await {
                        tracing::debug!(partition = p, id, "cannot add learner: {e}");
                    }
                }
            }
            let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
            let matched = m.replication.clone().unwrap_or_default();
            let ready = promotions(&learners, &configured, &matched, m.last_log_index);
            if !ready.is_empty() {
                info!(
                    partition = p,
                    ?ready,
                    "promoting caught-up learners to voters"
                );
                if let Err(e) = raft
                    .change_membership(ChangeMembers::AddVoterIds(ready), true)
                    .await
                {
                    tracing::debug!(partition = p, "cannot promote: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    fn log(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    #[test]
    fn demotion_keeps_a_majority_of_the_members() {
        let cases: &[(&[NodeId], NodeId, usize, bool)] = &[
            // (voters, node, configured members, allowed)
            (&[1, 2, 3], 2, 3, true),
            (&[1, 3], 3, 3, false),
            (&[1, 3], 2, 3, true),
            (&[1], 2, 3, true),
            (&[1, 2, 3, 4, 5], 5, 5, true),
            (&[1, 2, 3], 3, 5, false),
        ];
        for (voters, node, configured, allowed) in cases {
            let plan = plan_demotion(&set(voters), *node, *configured);
            assert_eq!(
                plan == Demotion::Commit,
                *allowed,
                "{voters:?} minus {node} of {configured}: {plan:?}"
            );
        }
    }

    #[test]
    fn appends_need_a_majority_of_the_configured_members_as_voters() {
        let members = [1, 2, 3];
        assert!(!has_configured_quorum(&set(&[1]), &members));
        assert!(has_configured_quorum(&set(&[1, 3]), &members));
        assert!(has_configured_quorum(&set(&[1, 2, 3]), &members));
        // A voter that is not a configured member does not count.
        assert!(!has_configured_quorum(&set(&[1, 9]), &members));
    }

    #[test]
    fn only_caught_up_configured_learners_are_promoted() {
        let matched = BTreeMap::from([
            (2, Some(log(3, 100))),
            (3, Some(log(3, 100 - PROMOTE_LAG - 1))),
            (9, Some(log(3, 100))),
        ]);
        assert_eq!(
            promotions(&set(&[2, 3, 9]), &[1, 2, 3], &matched, Some(100)),
            set(&[2])
        );
        let at_the_bound = BTreeMap::from([(3, Some(log(3, 100 - PROMOTE_LAG)))]);
        assert_eq!(
            promotions(&set(&[3]), &[1, 2, 3], &at_the_bound, Some(100)),
            set(&[3])
        );
        let nothing = BTreeMap::from([(2, None)]);
        assert_eq!(promotions(&set(&[2]), &[1, 2], &nothing, None), set(&[]));
        assert_eq!(additions(&set(&[1, 2]), &[1, 2, 3]), vec![3]);
    }

    #[test]
    fn only_a_membership_after_the_demotion_ends_a_rejoin() {
        let state = RejoinState::Learner {
            demoted_at: log(4, 20),
        };
        // A snapshot from before the demotion still names us a voter.
        assert!(!rejoined(
            state,
            2,
            Some(log(3, 15)),
            &set(&[1, 2, 3]),
            false
        ));
        assert!(!rejoined(state, 2, Some(log(4, 20)), &set(&[1, 3]), false));
        assert!(!rejoined(state, 2, Some(log(4, 25)), &set(&[1, 3]), false));
        assert!(rejoined(
            state,
            2,
            Some(log(4, 25)),
            &set(&[1, 2, 3]),
            false
        ));
        assert!(rejoined(
            state,
            2,
            Some(log(5, 21)),
            &set(&[1, 2, 3]),
            false
        ));
        // The joint step of the promotion still needs the old voters.
        assert!(!rejoined(
            state,
            2,
            Some(log(4, 25)),
            &set(&[1, 2, 3]),
            true
        ));
        assert!(!rejoined(
            RejoinState::Pending,
            2,
            Some(log(9, 99)),
            &set(&[1, 2, 3]),
            false
        ));
    }
}
