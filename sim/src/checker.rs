//! The checker: after the quiet period, every guarantee of the append path
//! is verified against what clients were told and what every replica
//! holds. (Election safety is checked continuously by the leader monitor.)
//!
//! - G1: every acknowledged append is on every replica at its offset with
//!   its hash.
//! - G5: no id is stored twice in a partition.
//! - G6: every replica's hash chain verifies, and replicas are identical.
//! - Liveness: once faults heal, every partition converges.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use auditflow_protocol::chain::ChainVerifier;
use auditflow_protocol::StoredEvent;
use openraft::ServerState;

use crate::world::World;

/// Longest the cluster may take to converge after faults heal.
const SETTLE: Duration = Duration::from_secs(60);

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Restarts nodes whose Raft groups stopped on a storage failure: a node
/// fail-stops on a fatal disk error and its supervisor restarts it.
pub(crate) async fn reap_failed(world: &World) {
    for id in world.ids() {
        let Some(node) = world.net.node(id) else {
            continue;
        };
        let failed = node
            .partitions
            .iter()
            .any(|p| p.raft.metrics().borrow().state == ServerState::Shutdown);
        drop(node);
        if failed {
            world.trace(format!(
                "node {id} fail-stopped after a storage error; restarting"
            ));
            world.crash(id).await;
            if let Err(e) = world.boot(id).await {
                world.violation(e);
            }
        }
    }
}

/// Waits until every partition has one leader and identical heads and
/// applied indexes on all three nodes.
pub(crate) async fn settle(world: &World) {
    let start = world.now();
    loop {
        reap_failed(world).await;
        if converged(world) {
            world.trace("settled".into());
            return;
        }
        if world.now() - start > SETTLE {
            world.violation(format!(
                "liveness: no convergence within {SETTLE:?} after healing"
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn converged(world: &World) -> bool {
    let nodes: Vec<_> = world
        .ids()
        .into_iter()
        .filter_map(|id| world.net.node(id))
        .collect();
    if nodes.len() != world.ids().len() {
        return false;
    }
    for p in 0..world.opts.partitions as usize {
        let mut views = BTreeSet::new();
        let mut leaders = BTreeSet::new();
        for n in &nodes {
            let m = n.partitions[p].raft.metrics().borrow().clone();
            let head = match n.partitions[p].reader.head() {
                Ok(h) => h,
                Err(_) => return false,
            };
            views.insert((
                m.last_applied.map(|l| l.index),
                head.next_offset,
                head.last_hash,
            ));
            leaders.insert(m.current_leader);
            if m.last_applied.map(|l| l.index) != m.last_log_index {
                return false;
            }
        }
        if views.len() != 1 || leaders.len() != 1 || leaders.contains(&None) {
            return false;
        }
    }
    true
}

fn read_all(world: &World, node: u64, p: usize) -> Result<Vec<StoredEvent>, String> {
    let shared = world.net.node(node).ok_or("node down")?;
    let reader = &shared.partitions[p].reader;
    let mut out = Vec::new();
    loop {
        let page = reader
            .read(out.len() as u64, 1000)
            .map_err(|e| e.to_string())?;
        if page.is_empty() {
            return Ok(out);
        }
        out.extend(page);
    }
}

/// Checks G1, G5 and G6 on every replica.
pub(crate) async fn check(world: &World) {
    let acked = lock(&world.acked).clone();
    let mut reference: BTreeMap<usize, Vec<StoredEvent>> = BTreeMap::new();
    for id in world.ids() {
        for p in 0..world.opts.partitions as usize {
            let events = match read_all(world, id, p) {
                Ok(e) => e,
                Err(e) => {
                    world.violation(format!("node {id} partition {p} unreadable: {e}"));
                    continue;
                }
            };
            let mut chain = ChainVerifier::new(p as u32);
            let mut ids = BTreeSet::new();
            for e in &events {
                if let Err(err) = chain.push(e) {
                    world.violation(format!("G6: node {id} partition {p}: {err}"));
                    break;
                }
                if !ids.insert(e.event.id.clone()) {
                    world.violation(format!(
                        "G5: node {id} partition {p} stores {} twice",
                        e.event.id
                    ));
                }
            }
            match reference.get(&p) {
                None => {
                    reference.insert(p, events);
                }
                Some(r) if *r != events => world.violation(format!(
                    "G6: node {id} partition {p} differs from node 1 ({} vs {} events)",
                    events.len(),
                    r.len()
                )),
                Some(_) => {}
            }
        }
    }
    let mut lost = 0;
    for (event_id, a) in &acked {
        let found = reference
            .get(&(a.partition as usize))
            .and_then(|events| events.get(a.offset as usize));
        match found {
            Some(e) if e.event.id == *event_id && e.hash == a.hash => {}
            other => {
                lost += 1;
                if lost <= 5 {
                    world.violation(format!(
                        "G1: acknowledged {event_id} at p{} o{} is not there (found {:?})",
                        a.partition,
                        a.offset,
                        other.map(|e| (&e.event.id, e.hash))
                    ));
                }
            }
        }
    }
    if lost > 5 {
        world.violation(format!("G1: {lost} acknowledged events lost in all"));
    }
    for (p, events) in &reference {
        let last = events.last().map(|e| e.hash.to_hex()).unwrap_or_default();
        world.trace(format!(
            "final p{p}: {} events, head hash {last}",
            events.len()
        ));
    }
}
