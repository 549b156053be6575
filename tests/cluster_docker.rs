//! Network faults with real containers: a node cut off the network, and a
//! node frozen, while appends run (issue 3's failover, with the faults a
//! loopback test cannot make).
//!
//! Three node containers on a private Docker network. The node leading the
//! most partitions is disconnected from the network (its process runs on,
//! isolated: it keeps its leader state until it hears otherwise), its
//! partitions must fail over to the other two and appends go on; it is
//! reconnected and must catch up. Then another node is frozen with
//! `docker pause`, the same must hold, and it is thawed. Every
//! acknowledged event is then stored once, where its ack said, with an
//! intact chain, on every node, and the three replicas are identical.
//!
//! Needs Docker; skipped where there is none, except under CI (`CI` set),
//! where its absence is a failure.

mod common;

use std::time::Duration;

use auditflow_client::Client;
use common::docker::{docker_or_skip, DockerCluster};
use common::*;

const WINDOW: usize = 16;

/// Index of the node leading the most partitions, as `addrs` agree.
async fn busiest(client: &Client, cluster: &DockerCluster, addrs: &[String]) -> usize {
    let leaders = wait_until("agreed leaders", Duration::from_secs(60), || {
        let (client, addrs) = (client.clone(), addrs.to_vec());
        async move { agreed_leaders(&client, &addrs, cluster.partitions).await }
    })
    .await;
    let id = most_leading(leaders).expect("a leader");
    cluster
        .nodes
        .iter()
        .position(|n| n.id == id)
        .expect("leader is a node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_survive_a_node_cut_off_and_a_node_frozen() {
    if !docker_or_skip() {
        return;
    }
    let cluster = DockerCluster::start(ClusterOptions::default());
    let partitions = cluster.partitions;
    let client = cluster.client().await;
    let all = cluster.addrs();

    let appenders = Appenders::start(&client, WINDOW);
    appenders.wait_for_more("appends to start", 300).await;

    // Each fault: the faulty node's partitions move to the other two, and
    // appends go on while it lasts; once it ends, the node is back in
    // agreement with the others.
    for fault in ["cut off", "frozen"] {
        let victim = busiest(&client, &cluster, &all).await;
        let victim_id = cluster.nodes[victim].id;
        match fault {
            "cut off" => cluster.cut_off(victim),
            _ => cluster.pause(victim),
        }
        let others: Vec<String> = all
            .iter()
            .filter(|a| **a != cluster.nodes[victim].addr)
            .cloned()
            .collect();
        wait_failed_over(
            &format!("node {victim_id}'s partitions to fail over ({fault})"),
            &client,
            &others,
            partitions,
            victim_id,
        )
        .await;
        appenders
            .wait_for_more(
                &format!("appends to go on while node {victim_id} is {fault}"),
                300,
            )
            .await;
        match fault {
            "cut off" => cluster.reconnect(victim),
            _ => cluster.unpause(victim),
        }
        wait_until(
            &format!("node {victim_id} to agree with the others again ({fault})"),
            Duration::from_secs(60),
            || {
                let (client, all) = (client.clone(), all.clone());
                async move { agreed_leaders(&client, &all, partitions).await }
            },
        )
        .await;
        appenders
            .wait_for_more(
                &format!("appends to go on after node {victim_id} was {fault}"),
                300,
            )
            .await;
    }
    let acked = appenders.stop().await;
    let nodes = cluster.ids_and_addrs();
    let replicas = verify_acked(&client, &nodes, partitions, &acked).await;
    assert_eq!(
        replicas[0], replicas[1],
        "nodes 1 and 2 hold identical data"
    );
    assert_eq!(
        replicas[0], replicas[2],
        "nodes 1 and 3 hold identical data"
    );
}
