//! The nemesis: the faults of a run, injected until the workload ends, at
//! the rates of the run's [`FaultOptions`](crate::options::FaultOptions).
//! One task for the cluster (crashes and restarts, power failures,
//! partitions, disk I/O errors, pauses) and one for the destinations' endpoints
//! (outages and slowness); the network's per-message faults and the
//! sinks' per-send faults are decided where the message or send is.

use std::sync::Arc;
use std::time::Duration;

use auditflow_broker::partition::NodeId;

use crate::options::ClusterFaults;
use crate::world::{lock, World};

/// What one step of the cluster nemesis does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ClusterFault {
    /// Every node crashes, and restarts after an outage.
    PowerFailure,
    /// One running node crashes (only while every node is up).
    Crash,
    /// A node that is down restarts.
    Restart,
    /// One node is cut off from everything.
    Isolate,
    /// One directed link drops everything.
    Cut,
    /// Every partition heals.
    Heal,
    /// A running node's disk fails its next I/O.
    DiskError,
    /// A running node pauses.
    Pause,
    /// A node's wall clock jumps forward or back.
    ClockJump,
    /// Nothing this step.
    Nothing,
}

/// The fault of one step, given a uniform draw `u` in [0, 1): the
/// probabilities of `o` laid end to end, crash or restart depending on
/// whether every node is up (`all_up`), and what is left of 1 is
/// [`ClusterFault::Nothing`]. A pure function so its shares are tested.
fn choose(o: &ClusterFaults, all_up: bool, u: f64) -> ClusterFault {
    let node = if all_up {
        (o.crash, ClusterFault::Crash)
    } else {
        (o.restart, ClusterFault::Restart)
    };
    let mut edge = 0.0;
    for (p, fault) in [
        (o.power_failure, ClusterFault::PowerFailure),
        node,
        (o.isolate, ClusterFault::Isolate),
        (o.cut, ClusterFault::Cut),
        (o.heal, ClusterFault::Heal),
        (o.disk_error, ClusterFault::DiskError),
        (o.pause, ClusterFault::Pause),
        (o.clock_jump, ClusterFault::ClockJump),
    ] {
        edge += p;
        if u < edge {
            return fault;
        }
    }
    ClusterFault::Nothing
}

/// Injects cluster faults until `end`, one per step: crashes and
/// restarts, power failures, isolation and asymmetric cuts that heal,
/// disk read, write and sync failures, pauses. Outside power failures at most one
/// node is down, so a quorum can always form again.
pub(crate) async fn nemesis(world: &Arc<World>, end: Duration) {
    let o = world.opts.faults.cluster.clone();
    while world.now() < end {
        tokio::time::sleep(world.gen_span(o.interval)).await;
        crate::checker::reap_failed(world).await;
        let ids = world.ids();
        let up = world.up();
        let down: Vec<NodeId> = ids.iter().copied().filter(|i| !up.contains(i)).collect();
        let pick = |v: &[NodeId]| v[world.gen_range(0..v.len() as u64) as usize];
        let fault = choose(&o, down.is_empty(), world.gen_unit());
        match fault {
            ClusterFault::PowerFailure => {
                world.trace("fault: power failure, every node crashes".into());
                for id in &ids {
                    world.crash(*id).await;
                }
                tokio::time::sleep(world.gen_span(o.power_outage)).await;
                world.trace("power back: every node restarts".into());
                for id in &ids {
                    if let Err(e) = world.boot(*id).await {
                        world.violation(e);
                    }
                }
            }
            ClusterFault::Restart => {
                let id = pick(&down);
                // Drawn only when enabled, so that runs without lost
                // disks draw exactly as before.
                if o.lost_disk > 0.0 && world.gen_unit() < o.lost_disk {
                    // One lost disk at a time: with a second node short of
                    // data the cluster stalls (safely) until an operator
                    // acts, which the run's liveness check would count.
                    if world.others_whole(id) {
                        world.trace(format!("fault: node {id} lost its disk"));
                        world.disks[&id].wipe();
                    } else {
                        world.trace(format!(
                            "node {id} keeps its disk: another node is down or rejoining"
                        ));
                    }
                }
                if o.synced_damage > 0.0 && world.gen_unit() < o.synced_damage {
                    let damage = world.disks[&id].damage_synced(&mut *lock(&world.rng));
                    if let Some(what) = damage {
                        world.trace(format!("fault: node {id} disk damaged: {what}"));
                    }
                }
                world.trace(format!("fault: restart node {id}"));
                if let Err(e) = world.boot(id).await {
                    world.violation(e);
                }
            }
            ClusterFault::Crash => {
                let id = pick(&up);
                world.trace(format!("fault: crash node {id}"));
                world.crash(id).await;
            }
            ClusterFault::Isolate => {
                let id = pick(&ids);
                world.trace(format!("fault: isolate node {id}"));
                world.net.isolate(id, &ids);
            }
            ClusterFault::Cut => {
                let a = pick(&ids);
                let others: Vec<NodeId> = ids.iter().copied().filter(|i| *i != a).collect();
                let b = pick(&others);
                world.trace(format!("fault: cut link {a} -> {b}"));
                world.net.cut(a, b);
            }
            ClusterFault::Heal => {
                world.trace("fault: heal network".into());
                world.net.heal();
            }
            ClusterFault::DiskError if !up.is_empty() => {
                let id = pick(&up);
                match world.gen_range(0..3) {
                    0 => {
                        world.trace(format!("fault: node {id} disk fails its next read"));
                        world.disks[&id].fail_reads(1);
                    }
                    1 => {
                        world.trace(format!("fault: node {id} disk fails its next write"));
                        world.disks[&id].fail_writes(1);
                    }
                    _ => {
                        world.trace(format!("fault: node {id} disk fails its next sync"));
                        world.disks[&id].fail_syncs(1);
                    }
                }
            }
            ClusterFault::Pause if !up.is_empty() => {
                let id = pick(&up);
                let length = world.gen_span(o.pause_duration);
                world.trace(format!("fault: node {id} pauses for {length:?}"));
                world.net.pause(id, length);
            }
            ClusterFault::ClockJump => {
                let id = pick(&ids);
                let size = world.gen_span(o.clock_jump_size).as_nanos() as i64;
                let ns = if world.gen_bool(0.5) { size } else { -size };
                world.trace(format!("fault: node {id} clock jumps {}ms", ns / 1_000_000));
                world.clocks[&id].jump(ns);
            }
            ClusterFault::DiskError | ClusterFault::Pause | ClusterFault::Nothing => continue,
        }
        *lock(&world.faults) += 1;
    }
}

/// Sink faults until `end`, one at a time: an endpoint goes down or gets
/// slow for a while, then recovers. Per-send faults (transient errors,
/// duplicates, slow sends) come from the sinks themselves.
pub(crate) async fn sink_nemesis(world: Arc<World>, end: Duration) {
    let o = world.opts.faults.sinks.clone();
    let dests = world.sinks.destinations();
    if dests.is_empty() {
        return;
    }
    while world.now() < end {
        tokio::time::sleep(world.gen_span(o.interval)).await;
        let dest = dests[world.gen_range(0..dests.len() as u64) as usize].clone();
        let u = world.gen_unit();
        let length = world.gen_span(o.fault_duration);
        if u < o.outage {
            world.trace(format!("sink fault: {dest} down for {length:?}"));
            world.sinks.set_down(&dest, true);
        } else if u < o.outage + o.slow {
            world.trace(format!("sink fault: {dest} slow for {length:?}"));
            world.sinks.set_slow(&dest, true);
        } else {
            continue;
        }
        *lock(&world.faults) += 1;
        tokio::time::sleep(length).await;
        world.trace(format!("sink {dest} recovered"));
        world.sinks.set_down(&dest, false);
        world.sinks.set_slow(&dest, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::FaultOptions;

    /// Over an even grid of draws, each fault gets its probability's
    /// share of a step, crash or restart by whether every node is up, and
    /// a step with no probabilities left does nothing.
    #[test]
    fn a_step_picks_each_fault_at_its_probability() {
        let o = FaultOptions::from_seed(7).cluster;
        const N: usize = 100_000;
        for all_up in [true, false] {
            let mut counts = std::collections::BTreeMap::new();
            for i in 0..N {
                let u = (i as f64 + 0.5) / N as f64;
                *counts.entry(choose(&o, all_up, u)).or_insert(0usize) += 1;
            }
            let share = |f| counts.get(&f).copied().unwrap_or(0) as f64 / N as f64;
            let node = if all_up { o.crash } else { o.restart };
            for (fault, p) in [
                (ClusterFault::PowerFailure, o.power_failure),
                (ClusterFault::Isolate, o.isolate),
                (ClusterFault::Cut, o.cut),
                (ClusterFault::Heal, o.heal),
                (ClusterFault::DiskError, o.disk_error),
                (ClusterFault::Pause, o.pause),
                (ClusterFault::ClockJump, o.clock_jump),
            ] {
                assert!((share(fault) - p).abs() < 1e-3, "{fault:?}");
            }
            let (node_fault, other) = if all_up {
                (ClusterFault::Crash, ClusterFault::Restart)
            } else {
                (ClusterFault::Restart, ClusterFault::Crash)
            };
            assert!((share(node_fault) - node).abs() < 1e-3);
            assert_eq!(share(other), 0.0);
        }
        let none = FaultOptions::none().cluster;
        assert_eq!(choose(&none, true, 0.0), ClusterFault::Nothing);
    }
}
