//! Acceptance (issue 3, point 1): three real node processes; 20,000 events
//! appended with 64 in flight; the node leading most partitions is killed
//! with SIGKILL midway; appends continue after failover; the killed node
//! restarts; every acknowledged event is readable from every node, in
//! offset order per partition, with an intact hash chain, and no event is
//! stored twice.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use auditflow_protocol::wire::Ack;
use common::*;

const EVENTS: usize = 20_000;
const WINDOW: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_survive_leader_kill_and_every_replica_converges() {
    let mut cluster = Cluster::start(ClusterOptions::default());
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;

    let acked: Arc<tokio::sync::Mutex<BTreeMap<String, Ack>>> = Default::default();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..WINDOW {
        let client = client.clone();
        let acked = Arc::clone(&acked);
        let next = Arc::clone(&next);
        let done = Arc::clone(&done);
        workers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= EVENTS {
                    return;
                }
                let (id, ack) = append_numbered(&client, n).await;
                acked.lock().await.insert(id, ack);
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }

    // Midway, kill the node leading the most partitions.
    wait_until("half of the events acked", Duration::from_secs(300), || {
        let done = Arc::clone(&done);
        async move { (done.load(Ordering::SeqCst) >= EVENTS / 2).then_some(()) }
    })
    .await;
    let victim_idx = cluster.busiest_leader(&client).await;
    cluster.kill(victim_idx);
    let at_kill = done.load(Ordering::SeqCst);

    // Appends continue without the victim.
    wait_until(
        "appends to continue after failover",
        Duration::from_secs(120),
        || {
            let done = Arc::clone(&done);
            async move { (done.load(Ordering::SeqCst) >= at_kill + 1_000).then_some(()) }
        },
    )
    .await;
    cluster.spawn(victim_idx);

    for w in workers {
        w.await.expect("worker");
    }
    let acked = acked.lock().await.clone();
    assert_eq!(acked.len(), EVENTS, "every append was acknowledged");

    // Every node, including the restarted one, converges to the same data.
    let nodes = cluster.ids_and_addrs();
    let replicas = verify_acked(&client, &nodes, cluster.partitions, &acked).await;
    assert_eq!(replicas[0], replicas[1], "node 1 and 2 hold identical data");
    assert_eq!(replicas[0], replicas[2], "node 1 and 3 hold identical data");
}
