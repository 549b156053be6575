//! Leaders go back to their preferred nodes after a failover (issue 3:
//! "partition leaders spread over the nodes"), without losing or
//! duplicating appends made while they move.
//!
//! Three real node processes; appends run throughout. The node preferred by
//! partitions 0, 3 and 6 is killed with SIGKILL, so they fail over to the
//! other two; it is restarted, and every partition must come back to its
//! preferred node (`partition::rebalance`): no election moves them there
//! by itself, since nothing fails after the restart. Every acknowledged
//! event is then stored once, where its ack said, on every node.

mod common;

use std::time::Duration;

use auditflow_broker::config::RaftTuning;
use auditflow_broker::partition::rebalance::preferred_leader;
use common::*;

const WINDOW: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_return_to_their_preferred_nodes_after_a_restart() {
    let opts = ClusterOptions {
        raft: RaftTuning {
            heartbeat_ms: 100,
            election_timeout_min_ms: 600,
            election_timeout_max_ms: 1200,
            rebalance_leaders_ms: 1_500,
            ..RaftTuning::default()
        },
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start(opts);
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;
    let ids: Vec<u64> = cluster.nodes.iter().map(|n| n.id).collect();
    let partitions = cluster.partitions;
    let preferred: Vec<u64> = (0..partitions)
        .map(|p| preferred_leader(p, &ids).expect("nodes"))
        .collect();
    // Every partition led by its preferred node, as all running nodes see it.
    let on_preferred = |running: Vec<String>| {
        let (client, preferred) = (client.clone(), preferred.clone());
        move || {
            let (client, preferred, running) = (client.clone(), preferred.clone(), running.clone());
            async move {
                (agreed_leaders(&client, &running, partitions).await? == preferred).then_some(())
            }
        }
    };
    wait_until(
        "leaders spread as at init",
        Duration::from_secs(60),
        on_preferred(cluster.running()),
    )
    .await;

    // Appends run through the failover, the restart and the handovers.
    let appenders = Appenders::start(&client, WINDOW);
    appenders.wait_for_more("appends to start", 500).await;

    let victim = preferred[0];
    let victim_idx = cluster.index_of(victim);
    cluster.kill(victim_idx);
    let survivors = cluster.running();
    wait_failed_over(
        "the victim's partitions to fail over",
        &client,
        &survivors,
        partitions,
        victim,
    )
    .await;
    appenders
        .wait_for_more("appends to continue after failover", 500)
        .await;

    cluster.spawn(victim_idx);
    wait_until(
        "every partition back on its preferred node",
        Duration::from_secs(120),
        on_preferred(cluster.running()),
    )
    .await;
    // The handovers are visible: the nodes that led the victim's
    // partitions count one done handover per partition at least.
    let mut handovers = 0.0;
    for n in &cluster.nodes {
        let text = scrape_metrics(n.admin_addr).await;
        handovers += sum_metric(
            &text,
            "auditflow_leader_handovers_total",
            &[("result", "done")],
        );
    }
    let moved = preferred.iter().filter(|l| **l == victim).count();
    assert!(
        handovers >= moved as f64,
        "{handovers} handovers counted for {moved} partitions moved back"
    );
    appenders
        .wait_for_more("appends to continue after the handovers", 500)
        .await;
    let acked = appenders.stop().await;
    let nodes = cluster.ids_and_addrs();
    verify_acked(&client, &nodes, partitions, &acked).await;
}
