//! The checker: after the quiet period, every guarantee of the append path
//! is verified against what clients were told and what every replica
//! holds. (Election safety is checked continuously by the leader monitor.)
//!
//! - G1: every acknowledged append is on every replica at its offset with
//!   its hash.
//! - G5: no id is stored twice in a partition.
//! - G6: every replica's hash chain verifies, and replicas are identical.
//! - Liveness: once faults heal, every partition converges, and every
//!   destination's cursor reaches the head of every partition.
//! - G2: every stored event a destination's filter matches reached that
//!   destination's endpoint or sits in its DLQ with a reason and attempt
//!   history; events the endpoint refuses are in the DLQ and were never
//!   accepted; events the filter excludes were never sent.
//! - G4: per destination and partition, the first arrivals of event ids
//!   are in increasing offset order, and an id never arrives with two
//!   different offsets (or an offset that stores another event).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use auditflow_broker::delivery::DestinationConfig;
use auditflow_broker::replicated::delivery::DlqEntry;
use auditflow_protocol::chain::ChainVerifier;
use auditflow_protocol::StoredEvent;

use crate::world::World;

/// Longest the cluster may take to converge after faults heal.
const SETTLE: Duration = Duration::from_secs(60);
/// Longest delivery may take to catch up once the cluster converged: the
/// backlog of a whole run drains in seconds with the sim's short retry
/// settings, so this only bounds a stuck destination.
const DELIVERY_SETTLE: Duration = Duration::from_secs(120);
/// Violations reported per kind before only counting them.
const REPORTED: usize = 5;

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a running node's Raft core stands, read off its metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Core {
    /// Running.
    Running,
    /// Stopped on a storage error: a fail-stop, which an injected disk
    /// fault explains (the node is restarted, as its supervisor would).
    StorageFailed(String),
    /// Stopped without an error while the node was meant to run.
    Stopped,
    /// The core task panicked: openraft reports `Fatal::Panicked`, or the
    /// task ended without recording why (its metrics sender is gone while
    /// the metrics still say it runs), which only a panic does.
    Panicked,
}

/// Classifies a core from its metrics' `running_state` and whether the
/// metrics sender is gone (the core task ended). Pure, so it is table
/// tested.
fn classify<E: openraft::NodeId>(
    running_state: &Result<(), openraft::error::Fatal<E>>,
    ended: bool,
) -> Core {
    use openraft::error::Fatal;
    match running_state {
        Ok(()) if ended => Core::Panicked,
        Ok(()) => Core::Running,
        Err(Fatal::Panicked) => Core::Panicked,
        Err(Fatal::StorageError(e)) => Core::StorageFailed(e.to_string()),
        Err(Fatal::Stopped) => Core::Stopped,
    }
}

/// Restarts nodes that fail-stopped, as a supervisor restarts a node
/// process that exited: their storage halted on a failed write or sync,
/// or a Raft group stopped (`NodeShared::failure`, what a real node's
/// process ends on). A halt or core storage failure that no injected
/// disk fault explains, and a core that panicked or stopped by itself,
/// are violations (the node restarts too, so the run goes on to the
/// other checks).
pub(crate) async fn reap_failed(world: &World) {
    for id in world.ids() {
        let Some(node) = world.net.node(id) else {
            continue;
        };
        // The same fail-stop a real node's process ends on; here it
        // crashes and boots again.
        let failure = node.failure();
        let mut failed = false;
        if let Some(cause) = node.storage_halted() {
            if !world.injected_since_boot(id) {
                world.violation(format!(
                    "node {id}: storage halted with no injected fault to explain it: {cause}"
                ));
            }
            failed = true;
        }
        for (p, handle) in node.partitions.iter().enumerate() {
            let metrics = handle.raft.metrics();
            let ended = metrics.has_changed().is_err();
            let state = metrics.borrow().running_state.clone();
            match classify(&state, ended) {
                Core::Running => {}
                Core::StorageFailed(e) if world.injected_since_boot(id) => {
                    world.trace(format!("node {id} p{p} raft stopped: {e}"));
                    failed = true;
                }
                Core::StorageFailed(e) => {
                    world.violation(format!(
                        "node {id} p{p}: raft core stopped on a storage error no injected fault explains: {e}"
                    ));
                    failed = true;
                }
                other => {
                    world.violation(format!("node {id} p{p}: raft core {other:?}"));
                    failed = true;
                }
            }
        }
        drop(node);
        if failed {
            let why = failure.map_or_else(|| "raft core stopped".to_string(), |f| f.to_string());
            world.trace(format!("node {id} fail-stopped ({why}); restarting"));
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

/// Waits until, on every node, every destination's cursor has reached
/// the head of every partition: all delivered or parked.
pub(crate) async fn settle_delivery(world: &World) {
    let start = world.now();
    loop {
        reap_failed(world).await;
        let behind = match delivery_done(world) {
            Ok(None) => {
                world.trace("delivery settled".into());
                return;
            }
            Ok(Some(behind)) => behind,
            Err(e) => {
                world.violation(format!("delivery state unreadable: {e}"));
                return;
            }
        };
        if world.now() - start > DELIVERY_SETTLE {
            world.violation(format!(
                "liveness: delivery not finished within {DELIVERY_SETTLE:?} after convergence ({behind})"
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn destinations(world: &World) -> Vec<DestinationConfig> {
    world
        .configs
        .values()
        .next()
        .map(|c| c.destinations.clone())
        .unwrap_or_default()
}

/// `None` once every cursor reached its head, else where one is behind.
pub(crate) fn delivery_done(world: &World) -> Result<Option<String>, String> {
    let dests = destinations(world);
    for id in world.ids() {
        let node = world.net.node(id).ok_or("node down")?;
        for (i, p) in node.partitions.iter().enumerate() {
            let head = p.reader.head().map_err(|e| e.to_string())?.next_offset;
            for d in &dests {
                let cursor = p.reader.cursor(&d.name).map_err(|e| e.to_string())?;
                if cursor < head {
                    let m = p.raft.metrics().borrow().clone();
                    return Ok(Some(format!(
                        "node {id} p{i}: {} cursor {cursor}, head {head}; raft {:?} leader {:?} applied {:?} log {:?}",
                        d.name, m.state, m.current_leader, m.last_applied, m.last_log_index
                    )));
                }
            }
        }
    }
    Ok(None)
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
    check_reads(world, &reference);
    check_delivery(world, &reference);
    for (p, events) in &reference {
        let last = events.last().map(|e| e.hash.to_hex()).unwrap_or_default();
        world.trace(format!(
            "final p{p}: {} events, head hash {last}",
            events.len()
        ));
    }
}

/// Every event a read or tail returned during the run is the one the log
/// keeps at that offset: nothing read was later lost or changed.
fn check_reads(world: &World, reference: &BTreeMap<usize, Vec<StoredEvent>>) {
    let observed = std::mem::take(&mut *lock(&world.observed));
    let mut bad = Tally::new(world, "read");
    for o in &observed {
        let kept = reference
            .get(&(o.partition as usize))
            .and_then(|events| events.get(o.offset as usize));
        match kept {
            Some(e) if e.event.id == o.id && e.hash == o.hash => {}
            _ => bad.report(format!(
                "node {} returned {} at p{} o{}, which the log does not keep there ({:?})",
                o.node,
                o.id,
                o.partition,
                o.offset,
                kept.map(|e| e.event.id.as_str())
            )),
        }
    }
    drop(bad);
    world.trace(format!("reads: {} events observed", observed.len()));
}

/// Counts violations of one kind and reports the first few.
struct Tally<'a> {
    world: &'a World,
    kind: &'static str,
    count: usize,
}

impl<'a> Tally<'a> {
    fn new(world: &'a World, kind: &'static str) -> Tally<'a> {
        Tally {
            world,
            kind,
            count: 0,
        }
    }

    fn report(&mut self, text: String) {
        self.count += 1;
        if self.count <= REPORTED {
            self.world.violation(format!("{}: {text}", self.kind));
        }
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        if self.count > REPORTED {
            self.world
                .violation(format!("{}: {} violations in all", self.kind, self.count));
        }
    }
}

/// Whether `body` (what `dest`'s endpoint received for stored event `e`)
/// carries the event exactly as `dest`'s masking rules leave it, computed
/// here from the stored event with the pure masking rules.
fn check_masked(dest: &DestinationConfig, e: &StoredEvent, body: &str) -> Result<(), String> {
    let mut expected = serde_json::to_value(&e.event).map_err(|err| err.to_string())?;
    let key = dest.mask_key.as_deref().unwrap_or("").as_bytes();
    auditflow_broker::delivery::mask::apply(&dest.masking, key, &mut expected);
    let got: serde_json::Value = serde_json::from_str(body).map_err(|err| err.to_string())?;
    match got.get("event") {
        Some(event) if *event == expected => Ok(()),
        _ => Err(format!(
            "unmasked or changed: sent {body}, masking rules give {expected}"
        )),
    }
}

/// G2 and G4 against what the simulated endpoints recorded, the stored
/// events (`reference`, identical on every replica by now) and each
/// destination's DLQ as the first node's state machine holds it.
fn check_delivery(world: &World, reference: &BTreeMap<usize, Vec<StoredEvent>>) {
    let arrivals = world.sinks.arrivals();
    let Some(reader_node) = world.ids().first().and_then(|id| world.net.node(*id)) else {
        world.violation("G2: no node to read the DLQ from".into());
        return;
    };
    for dest in destinations(world) {
        let name = dest.name.as_str();
        let mut g2 = Tally::new(world, "G2");
        let mut g4 = Tally::new(world, "G4");
        let mut masking = Tally::new(world, "masking");
        let mut dlqs: BTreeMap<usize, BTreeMap<u64, DlqEntry>> = BTreeMap::new();
        for p in reference.keys() {
            match reader_node.partitions[*p].reader.dlq(name, 0, usize::MAX) {
                Ok(entries) => {
                    dlqs.insert(*p, entries.into_iter().collect());
                }
                Err(e) => g2.report(format!("{name} p{p}: DLQ unreadable: {e}")),
            }
        }
        // G4: first arrivals in offset order; one offset per id. A parked
        // event no longer blocks the ones after it (G4), so whenever it
        // arrives (a deposed leader still sending it, say) is in order.
        let mut delivered: BTreeSet<(u32, u64)> = BTreeSet::new();
        let mut offset_of: BTreeMap<&str, (u32, u64)> = BTreeMap::new();
        let mut last_first: BTreeMap<u32, u64> = BTreeMap::new();
        let mut count = 0usize;
        for a in arrivals.iter().filter(|a| &*a.dest == name) {
            count += 1;
            let at = (a.partition, a.offset);
            let stored = reference
                .get(&(a.partition as usize))
                .and_then(|events| events.get(a.offset as usize))
                .map(|e| e.event.id.as_str());
            if let Some(e) = reference
                .get(&(a.partition as usize))
                .and_then(|events| events.get(a.offset as usize))
                .filter(|e| e.event.id == a.event_id)
            {
                if let Err(why) = check_masked(&dest, e, &a.body) {
                    masking.report(format!(
                        "{name} received {} (p{} o{}) {why}",
                        a.event_id, a.partition, a.offset
                    ));
                }
            }
            if stored != Some(a.event_id.as_str()) {
                g4.report(format!(
                    "{name} received {} as p{} o{}, where the log stores {stored:?}",
                    a.event_id, a.partition, a.offset
                ));
            }
            let parked = dlqs
                .get(&(a.partition as usize))
                .is_some_and(|d| d.contains_key(&a.offset));
            match offset_of.get(a.event_id.as_str()) {
                Some(prev) if *prev != at => g4.report(format!(
                    "{name} received {} as p{} o{} and as p{} o{}",
                    a.event_id, prev.0, prev.1, a.partition, a.offset
                )),
                Some(_) => {}
                None => {
                    offset_of.insert(&a.event_id, at);
                    if !parked {
                        if let Some(last) = last_first.insert(a.partition, a.offset) {
                            if last >= a.offset {
                                g4.report(format!(
                                    "{name} p{}: {} (o{}) first arrived after o{last}",
                                    a.partition, a.event_id, a.offset
                                ));
                            }
                        }
                    }
                }
            }
            delivered.insert(at);
        }
        // G2: every matching stored event delivered or parked.
        let mut parked = 0usize;
        for (p, events) in reference {
            let Some(dlq) = dlqs.get(p) else {
                continue;
            };
            parked += dlq.len();
            for e in events {
                let at = (*p as u32, e.offset);
                let id = e.event.id.as_str();
                let was_delivered = delivered.contains(&at);
                if !dest.filter.matches(&e.event) {
                    if was_delivered {
                        g2.report(format!(
                            "{name} received {id} (p{p} o{}), which its filter excludes",
                            e.offset
                        ));
                    }
                    continue;
                }
                let entry = dlq.get(&e.offset).filter(|d| d.event_id == id);
                if let Some(entry) = entry {
                    if entry.reason.is_empty() || entry.attempts.is_empty() {
                        g2.report(format!(
                            "{name}: DLQ entry of {id} (p{p} o{}) lacks a reason or attempts",
                            e.offset
                        ));
                    }
                }
                if world.sinks.refuses(name, id) {
                    if entry.is_none() {
                        g2.report(format!(
                            "{name} refuses {id} (p{p} o{}) but it is not in the DLQ",
                            e.offset
                        ));
                    }
                    if was_delivered {
                        g2.report(format!(
                            "{name} refuses {id} (p{p} o{}) but recorded it",
                            e.offset
                        ));
                    }
                } else if !was_delivered && entry.is_none() {
                    g2.report(format!(
                        "{name}: {id} (p{p} o{}) neither delivered nor in the DLQ",
                        e.offset
                    ));
                }
            }
        }
        world.trace(format!(
            "delivery {name}: {count} arrivals, {} distinct, {parked} parked",
            delivered.len()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::error::Fatal;
    use openraft::{ErrorSubject, ErrorVerb, StorageError, StorageIOError};

    #[test]
    fn a_core_that_ended_without_an_error_panicked() {
        let storage = StorageError::<u64>::from(StorageIOError::new(
            ErrorSubject::Logs,
            ErrorVerb::Write,
            openraft::AnyError::error("simulated write failure"),
        ));
        let check = |state: Result<(), Fatal<u64>>, ended, expected: &str| {
            let got = format!("{:?}", classify(&state, ended));
            assert!(got.starts_with(expected), "{state:?} ended {ended}: {got}");
        };
        check(Ok(()), false, "Running");
        check(Ok(()), true, "Panicked");
        check(Err(Fatal::Panicked), true, "Panicked");
        check(Err(Fatal::Stopped), true, "Stopped");
        check(
            Err(Fatal::StorageError(storage.clone())),
            true,
            "StorageFailed",
        );
        check(Err(Fatal::StorageError(storage)), false, "StorageFailed");
    }
}
