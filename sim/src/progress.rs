//! The progress checker (issue 33), after TigerBeetle's liveness mode:
//! once the run has healed and delivered everything, the endpoints turn
//! flaky but stay up, and delivery must keep pace with them.
//!
//! 1. Every endpoint turns slow (each send takes hundreds of ms to
//!    seconds, but succeeds) while the clients append a burst, so a
//!    backlog builds and batches are full when delivery speeds up again
//!    (a per-batch breaker only shows itself on full batches). Slow, not
//!    down: an outage would leave failures in the breakers' windows, and
//!    a breaker may rightly open on those.
//! 2. The endpoints come back, failing each request transiently at the
//!    run's `progress_flaky` rate (5 to 10 %).
//! 3. Delivery must bring every cursor to its head within a bound derived
//!    from the backlog ([`bound`]), and no breaker that has closed since
//!    the endpoints came back may open again: an endpoint answering nine
//!    requests in ten is not down. Unless a failure of the run's own
//!    faults (an outage before the heal) is still among the last
//!    `window_requests` requests to that endpoint and partition: the
//!    breaker's window holds requests, not seconds, so an actor that sent
//!    little since still counts it, and may rightly open on it together
//!    with a few flaky failures (seeds 2390, 2815, 4771 and 6112 of the
//!    10,000-seed sweep at f4eaa28). Such a breaker is judged again once
//!    it has closed.
//!
//! The planted `BreakerPerBatch` (the breaker before issue 33) fails both.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use auditflow_broker::delivery::breaker::BreakerState;

use crate::checker::delivery_done;
use crate::world::World;

/// Events appended while the endpoints are slow: about 160 per partition
/// of four for `siem` (three tenants of seven), 8 full batches of 20. The
/// planted per-batch breaker shows itself in about half the seeds (10 of
/// seeds 0..20); twice the burst caught it in 13 of 20 but made the whole
/// sweep 3.4 times slower instead of 1.7.
const BURST_EVENTS: u64 = 1_500;
/// Events per append request of the burst.
const BURST_BATCH: usize = 50;
/// Delivery's floor in the bound: 100 events a second, five times what
/// the per-batch breaker managed against a 5 % flaky webhook, and a small
/// fraction of what the simulated endpoints take.
const FLOOR_EVENTS_PER_SEC: u64 = 100;
/// Added to the bound: sends still slow when the burst ends finish (up
/// to 2 s), and a breaker left open by the run's faults waits out its
/// open period (at most 1 s here) and closes after a few probes.
const RECOVERY: Duration = Duration::from_secs(5);

/// Longest delivery may take to drain `backlog` events from flaky
/// endpoints.
pub(crate) fn bound(backlog: u64) -> Duration {
    RECOVERY + Duration::from_millis(backlog.saturating_mul(1000) / FLOOR_EVENTS_PER_SEC)
}

/// Events stored but not yet past every destination's cursor, counted on
/// each partition's leader.
fn backlog(world: &World) -> u64 {
    let dests: Vec<String> = world
        .configs
        .values()
        .next()
        .map(|c| c.destinations.iter().map(|d| d.name.clone()).collect())
        .unwrap_or_default();
    let mut total = 0;
    for id in world.ids() {
        let Some(node) = world.net.node(id) else {
            continue;
        };
        for p in &node.partitions {
            let m = p.raft.metrics().borrow().clone();
            if m.current_leader != Some(id) {
                continue;
            }
            let Ok(head) = p.reader.head() else { continue };
            for d in &dests {
                let cursor = p.reader.cursor(d).unwrap_or(0);
                total += head.next_offset.saturating_sub(cursor);
            }
        }
    }
    total
}

/// Runs the progress phase (module documentation). Call after delivery
/// settled; leaves the endpoints healthy again.
pub(crate) async fn progress(world: &Arc<World>) {
    let rate = world.opts.faults.sinks.progress_flaky;
    let dests = world.sinks.destinations();
    // Each destination's breaker window (requests).
    let windows: BTreeMap<String, u64> = world
        .configs
        .values()
        .next()
        .map(|c| {
            c.destinations
                .iter()
                .map(|d| (d.name.clone(), u64::from(d.breaker.window_requests)))
                .collect()
        })
        .unwrap_or_default();
    world.trace(format!(
        "progress: endpoints slow for a burst of {BURST_EVENTS} events, then flaky at {rate}"
    ));
    for d in &dests {
        world.sinks.set_slow(d, true);
    }
    crate::workload::burst(Arc::clone(world), 0, BURST_EVENTS, BURST_BATCH).await;
    let backlog = backlog(world);
    let limit = bound(backlog);
    world.sinks.set_per_request_failures(rate);
    for d in &dests {
        world.sinks.set_slow(d, false);
    }
    world.trace(format!(
        "progress: endpoints up and flaky, backlog {backlog}, bound {limit:?}"
    ));
    let start = world.now();
    // (node, destination, partition) whose breaker closed since the
    // endpoints came back.
    let mut closed: BTreeSet<(u64, String, u32)> = BTreeSet::new();
    let mut reported = false;
    loop {
        for id in world.ids() {
            let Some(node) = world.net.node(id) else {
                continue;
            };
            for ((dest, p), live) in node.board.snapshot() {
                let key = (id, dest, p);
                match live.breaker {
                    BreakerState::Closed => {
                        closed.insert(key);
                    }
                    BreakerState::Open
                        if closed.contains(&key)
                            && world.sinks.fault_within(
                                &key.1,
                                key.2,
                                windows.get(&key.1).copied().unwrap_or(u64::MAX),
                            ) =>
                    {
                        world.trace(format!(
                            "progress: node {id} opened the breaker of {} p{} with a failure \
                             of the run's faults among its last requests; judged again once \
                             it closes",
                            key.1, key.2
                        ));
                        closed.remove(&key);
                    }
                    BreakerState::Open if closed.contains(&key) && !reported => {
                        reported = true;
                        world.violation(format!(
                            "progress: node {id} opened the breaker of {} p{} while its \
                             endpoint fails only {rate} of requests",
                            key.1, key.2
                        ));
                    }
                    _ => {}
                }
            }
        }
        match delivery_done(world) {
            Ok(None) => {
                world.trace(format!(
                    "progress: backlog {backlog} delivered in {:?}",
                    world.now() - start
                ));
                break;
            }
            // Behind, or a state that cannot be read (which the final
            // checks report on their own).
            Ok(Some(behind)) | Err(behind) if world.now() - start > limit => {
                world.violation(format!(
                    "progress: delivery lag not back to zero within {limit:?} of {backlog} \
                     events with endpoints only flaky ({rate} of requests fail): {behind}"
                ));
                break;
            }
            Ok(Some(_)) | Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    world.sinks.set_per_request_failures(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_grows_with_the_backlog() {
        assert_eq!(bound(0), RECOVERY);
        assert_eq!(bound(1000), RECOVERY + Duration::from_secs(10));
    }
}
