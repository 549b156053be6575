//! The nemesis: the faults of a run, injected until the workload ends.
//! One task for the cluster (crashes and restarts, power failures,
//! partitions, disk I/O errors) and one for the destinations' endpoints
//! (outages and slowness); the network's message faults and the sinks'
//! per-request faults are decided where the message or request is.

use std::sync::Arc;
use std::time::Duration;

use auditflow_broker::partition::NodeId;

use crate::world::{lock, World};

/// Injects faults until `end`: crashes and restarts, isolation and
/// asymmetric cuts that heal, disk read, write and sync failures.
pub(crate) async fn nemesis(world: &Arc<World>, end: Duration) {
    while world.now() < end {
        let pause = world.gen_range(300..2500);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        crate::checker::reap_failed(world).await;
        let ids = world.ids();
        let up = world.up();
        let down: Vec<NodeId> = ids.iter().copied().filter(|i| !up.contains(i)).collect();
        let pick = |v: &[NodeId]| v[world.gen_range(0..v.len() as u64) as usize];
        let choice = world.gen_range(0..100);
        *lock(&world.faults) += 1;
        if choice < 5 {
            world.trace("fault: power failure, every node crashes".into());
            for id in &ids {
                world.crash(*id).await;
            }
            let outage = world.gen_range(100..2000);
            tokio::time::sleep(Duration::from_millis(outage)).await;
            world.trace("power back: every node restarts".into());
            for id in &ids {
                if let Err(e) = world.boot(*id).await {
                    world.violation(e);
                }
            }
        } else if !down.is_empty() && choice < 35 {
            let id = pick(&down);
            world.trace(format!("fault: restart node {id}"));
            if let Err(e) = world.boot(id).await {
                world.violation(e);
            }
        } else if down.is_empty() && choice < 30 {
            let id = pick(&up);
            world.trace(format!("fault: crash node {id}"));
            world.crash(id).await;
        } else if choice < 50 {
            let id = pick(&ids);
            world.trace(format!("fault: isolate node {id}"));
            world.net.isolate(id, &ids);
        } else if choice < 60 {
            let a = pick(&ids);
            let b = pick(&ids);
            if a != b {
                world.trace(format!("fault: cut link {a} -> {b}"));
                world.net.cut(a, b);
            }
        } else if choice < 80 {
            world.trace("fault: heal network".into());
            world.net.heal();
        } else if choice < 90 && !up.is_empty() {
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
        } else {
            *lock(&world.faults) -= 1;
        }
    }
}

/// Sink faults until `end`, one at a time: an endpoint goes down or gets
/// slow for a while, then recovers. Transient errors and duplicates come
/// from the sinks themselves.
pub(crate) async fn sink_nemesis(world: Arc<World>, end: Duration) {
    let dests = world.sinks.destinations();
    if dests.is_empty() {
        return;
    }
    while world.now() < end {
        let pause = world.gen_range(500..3000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let dest = dests[world.gen_range(0..dests.len() as u64) as usize].clone();
        let outage = world.gen_bool(0.6);
        let length = Duration::from_millis(world.gen_range(300..5000));
        *lock(&world.faults) += 1;
        if outage {
            world.trace(format!("sink fault: {dest} down for {length:?}"));
            world.sinks.set_down(&dest, true);
        } else {
            world.trace(format!("sink fault: {dest} slow for {length:?}"));
            world.sinks.set_slow(&dest, true);
        }
        tokio::time::sleep(length).await;
        world.trace(format!("sink {dest} recovered"));
        world.sinks.set_down(&dest, false);
        world.sinks.set_slow(&dest, false);
    }
}
