//! Issue 27, acceptance 1: a node whose data directory is emptied never
//! costs acknowledged events.
//!
//! The bug this pins: a node that started with an empty data directory
//! initialised itself as a fresh voter and voted at once. In the
//! sequence below node 2 (wiped) then voted for node 3 (paused through
//! the appends, so holding almost none of them), node 3 was elected and
//! overwrote the acknowledged events on node 2 and, once node 1 came
//! back, on node 1: 2,109 of 3,000 acknowledged events were gone from the
//! majority and the replicas disagreed. Now the wiped node learns the
//! cluster from a peer, answers no Raft RPC until a leader has made it a
//! learner, and is promoted back to voter only once caught up.
//!
//! Three real node processes, nodes left running through the steps:
//! 1. node 3 paused (SIGSTOP) while 3,000 events are appended and
//!    acknowledged;
//! 2. node 1 killed;
//! 3. node 2 killed, its data directory emptied, node 2 restarted;
//! 4. node 3 resumed (SIGCONT);
//! 5. node 1 restarted; the cluster settles.
//!
//! Then every acknowledged event is on all three nodes at its
//! acknowledged offset with its acknowledged hash, and no id is stored
//! twice.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;

const EVENTS: usize = 3_000;
/// Appends in flight: enough to finish 3,000 in seconds on two cores.
const WORKERS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_never_costs_acknowledged_events() {
    let mut cluster = Cluster::start(ClusterOptions::default());
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;

    // 1. Node 3 paused while 3,000 events are appended and acknowledged.
    let pid3 = cluster.nodes[2]
        .child
        .as_ref()
        .map(|c| c.id())
        .expect("node 3 runs");
    signal(pid3, libc::SIGSTOP);
    let acked: Arc<tokio::sync::Mutex<BTreeMap<String, auditflow_protocol::wire::Ack>>> =
        Arc::default();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let client = client.clone();
        let acked = Arc::clone(&acked);
        workers.push(tokio::spawn(async move {
            for n in (w..EVENTS).step_by(WORKERS) {
                let (id, ack) = append_numbered(&client, n).await;
                acked.lock().await.insert(id, ack);
            }
        }));
    }
    for w in workers {
        w.await.expect("append worker");
    }
    let acked = acked.lock().await.clone();
    assert_eq!(acked.len(), EVENTS);

    // 2. Node 1 killed.
    cluster.kill(0);
    // 3. Node 2 killed, its data directory emptied, restarted.
    cluster.kill(1);
    let dir = cluster.data_dir(1);
    std::fs::remove_dir_all(&dir).expect("empty node 2's data directory");
    std::fs::create_dir_all(&dir).expect("recreate node 2's data directory");
    cluster.spawn(1);
    // 4. Node 3 resumed.
    signal(pid3, libc::SIGCONT);
    // 5. Node 1 restarted; settle.
    cluster.spawn(0);
    cluster.wait_ready(&client).await;

    let replicas = verify_acked(
        &client,
        &cluster.ids_and_addrs(),
        cluster.partitions,
        &acked,
    )
    .await;
    // The replicas agree on every acknowledged offset (verify_acked read
    // each node up to the highest one).
    for (i, r) in replicas.iter().enumerate().skip(1) {
        for (p, events) in r {
            let reference = &replicas[0][p];
            let n = events.len().min(reference.len());
            assert_eq!(
                events[..n].iter().map(|e| e.hash).collect::<Vec<_>>(),
                reference[..n].iter().map(|e| e.hash).collect::<Vec<_>>(),
                "node {} partition {p} differs from node 1",
                cluster.nodes[i].id
            );
        }
    }
}
