//! Process and network faults in a loop, with real node processes in
//! Docker containers, while a client appends (issue 27 point 8).
//!
//! Each round injects, one after the other, on a node chosen in turn:
//! `kill -9` and a restart; a freeze (`docker pause`, the cgroup freezer:
//! SIGSTOP for every thread) and a thaw; a cut off the network (`docker
//! network disconnect`) and a reconnect; and ([`WIPE_DATA_DIR`]) a
//! `kill -9` whose node restarts with an empty data directory. After every fault the two other nodes must go on
//! acknowledging appends, and the faulty node must come back into
//! agreement. At the end every acknowledged event must be on every node at
//! its acknowledged offset with its acknowledged hash, each partition's
//! chain intact, no id stored twice, and the three replicas identical.
//!
//! One round by default (CI); `AUDITFLOW_SLOW=1` runs [`SLOW_ROUNDS`].
//! Needs Docker; skipped where there is none, except under CI (`CI` set),
//! where its absence is a failure.

mod common;

use std::time::Duration;

use auditflow_client::Client;
use common::docker::{docker_or_skip, DockerCluster};
use common::*;

/// Appends in flight.
const WINDOW: usize = 16;
/// Appends that must be acknowledged during each fault and after it.
const PROGRESS: usize = 200;
/// Rounds of `AUDITFLOW_SLOW=1`.
const SLOW_ROUNDS: usize = 5;

/// Whether the loop includes the wiped data directory: a node that
/// starts with no data rejoins as a learner and is promoted once caught
/// up (`partition::rejoin`), so it never votes with what it forgot.
/// `AUDITFLOW_DOCKER_WIPE=0` leaves the step out (to tell a wipe failure
/// from another one).
const WIPE_DATA_DIR: bool = true;

/// One fault of a round.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// `kill -9`, then a restart on the same data.
    Kill,
    /// Frozen, then thawed.
    Freeze,
    /// Off the network, then back.
    Cut,
    /// `kill -9`, the data directory emptied, then a restart.
    Wipe,
}

fn wipe_enabled() -> bool {
    match std::env::var("AUDITFLOW_DOCKER_WIPE").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => WIPE_DATA_DIR,
    }
}

/// Waits until every node answers and all agree on every partition's
/// leader.
async fn wait_agreed(what: &str, client: &Client, all: &[String], partitions: u32) {
    wait_until(what, Duration::from_secs(120), || {
        let (client, all) = (client.clone(), all.to_vec());
        async move { agreed_leaders(&client, &all, partitions).await }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_kills_freezes_cuts_and_wipes() {
    if !docker_or_skip() {
        return;
    }
    let rounds = if std::env::var_os("AUDITFLOW_SLOW").is_some_and(|v| v == "1") {
        SLOW_ROUNDS
    } else {
        1
    };
    let mut faults = vec![Fault::Kill, Fault::Freeze, Fault::Cut];
    if wipe_enabled() {
        faults.push(Fault::Wipe);
    }
    let cluster = DockerCluster::start(ClusterOptions::default());
    let partitions = cluster.partitions;
    let client = cluster.client().await;
    let all = cluster.addrs();
    wait_agreed("the cluster to elect leaders", &client, &all, partitions).await;

    let appenders = Appenders::start(&client, WINDOW);
    appenders.wait_for_more("appends to start", PROGRESS).await;

    let mut step = 0usize;
    for round in 0..rounds {
        for fault in &faults {
            // Each fault on the next node in turn, so every node gets each.
            let victim = step % cluster.nodes.len();
            step += 1;
            let id = cluster.nodes[victim].id;
            eprintln!("round {round}: {fault:?} node {id}");
            match fault {
                Fault::Kill | Fault::Wipe => cluster.kill(victim),
                Fault::Freeze => cluster.pause(victim),
                Fault::Cut => cluster.cut_off(victim),
            }
            appenders
                .wait_for_more(
                    &format!("appends to go on while node {id} is down ({fault:?})"),
                    PROGRESS,
                )
                .await;
            match fault {
                Fault::Kill => cluster.restart(victim),
                Fault::Wipe => {
                    cluster.wipe(victim);
                    cluster.restart(victim);
                }
                Fault::Freeze => cluster.unpause(victim),
                Fault::Cut => cluster.reconnect(victim),
            }
            wait_agreed(
                &format!("node {id} to agree with the others again ({fault:?})"),
                &client,
                &all,
                partitions,
            )
            .await;
            appenders
                .wait_for_more(
                    &format!("appends to go on after node {id} is back ({fault:?})"),
                    PROGRESS,
                )
                .await;
        }
    }
    let acked = appenders.stop().await;
    eprintln!("{} appends acknowledged", acked.len());
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
