//! A node killed and restarted at once rejoins without forcing elections.
//!
//! Three real node processes, appends running throughout. One node is
//! killed with SIGKILL and started again straight away, on the same
//! address, well before its peers' QUIC connections to the dead process
//! time out (5 s idle). Its peers must notice at once that those
//! connections are gone (the new process answers them with stateless
//! resets it can only send because its reset and connection-id keys are
//! derived from its private key, `net::tls::endpoint_config`) and reach
//! it on new ones. Before that, Raft sent the restarted node nothing for
//! 5 s; it timed out as a follower, campaigned, and its higher term
//! deposed the leaders of the partitions it followed. The same must hold
//! when the node comes back with a renewed certificate and key, which its
//! peers' old connections cannot recognise.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use auditflow_broker::net::tls::renew_dev_node_cert;
use auditflow_client::Client;
use common::*;

const WINDOW: usize = 16;

/// Each partition's (leader, term) as every node in `running` reports it,
/// once they all answer and agree.
async fn leaders_and_terms(
    client: &Client,
    running: &[String],
    partitions: u32,
) -> Option<Vec<(u64, u64)>> {
    let mut seen: Vec<Option<(u64, u64)>> = vec![None; partitions as usize];
    for (addr, st) in client.status_all().await {
        if !running.contains(&addr) {
            continue;
        }
        for p in st.ok()?.partitions {
            let now = (p.leader?, p.term);
            match seen[p.partition as usize] {
                None => seen[p.partition as usize] = Some(now),
                Some(prev) if prev != now => return None,
                _ => {}
            }
        }
    }
    seen.into_iter().collect()
}

/// Whether every node in `running` answers and all hold the same events of
/// every partition.
async fn same_heads(client: &Client, running: &[String], partitions: u32) -> Option<()> {
    let mut heads: BTreeMap<u32, u64> = BTreeMap::new();
    let mut answered = 0;
    for (addr, st) in client.status_all().await {
        if !running.contains(&addr) {
            continue;
        }
        answered += 1;
        for p in st.ok()?.partitions {
            let head = *heads.entry(p.partition).or_insert(p.next_offset);
            if head != p.next_offset {
                return None;
            }
        }
    }
    (answered == running.len() && heads.len() == partitions as usize).then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_at_once_rejoins_without_an_election() {
    restart_at_once(false).await;
}

/// With a new private key the restarted node's stateless resets are not
/// recognised; its peers must notice from their RPCs timing out
/// (`net::peer`, `TIMEOUTS_BEFORE_REDIAL`) and dial it again before it
/// times out as a follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_at_once_with_a_renewed_certificate_rejoins_without_an_election() {
    restart_at_once(true).await;
}

/// Kills node 1 under appends and starts it again at once (with a renewed
/// certificate and key if `renew`); no partition it did not lead may change
/// leader or term.
async fn restart_at_once(renew: bool) {
    let mut cluster = Cluster::start(ClusterOptions::default());
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;
    let partitions = cluster.partitions;

    let appenders = Appenders::start(&client, WINDOW);
    appenders.wait_for_more("appends to start", 300).await;
    let running = cluster.running();
    let agreed_terms = || {
        wait_until(
            "leaders and terms the nodes agree on",
            Duration::from_secs(60),
            || {
                let (client, running) = (client.clone(), running.clone());
                async move { leaders_and_terms(&client, &running, partitions).await }
            },
        )
    };
    let before = agreed_terms().await;

    let victim_idx = 0;
    let victim = cluster.nodes[victim_idx].id;
    cluster.kill(victim_idx);
    if renew {
        renew_dev_node_cert(&cluster.path().join("certs"), victim).expect("renew certificate");
    }
    let log_before = std::fs::metadata(&cluster.nodes[victim_idx].log_path)
        .map(|m| m.len() as usize)
        .unwrap_or(0);
    cluster.spawn(victim_idx);

    appenders
        .wait_for_more("appends to continue after the restart", 300)
        .await;
    appenders.stop().await;
    wait_until(
        "the restarted node to hold every partition's events",
        Duration::from_secs(60),
        || {
            let (client, running) = (client.clone(), running.clone());
            async move { same_heads(&client, &running, partitions).await }
        },
    )
    .await;
    let after = agreed_terms().await;

    // A restart is routine: the node logs no error for it (it used to ask
    // openraft to initialise its groups again, and openraft refused with
    // an error per group). Replication RPC errors report slow peers, which
    // a loaded test machine may have.
    let log = std::fs::read(&cluster.nodes[victim_idx].log_path).expect("victim log");
    let since_restart = String::from_utf8_lossy(&log[log_before.min(log.len())..]).into_owned();
    let errors: Vec<&str> = since_restart
        .lines()
        .filter(|l| l.contains("ERROR") && !l.contains("RPCError"))
        .collect();
    assert!(
        errors.is_empty(),
        "node {victim} logged errors on a restart: {errors:#?}"
    );
    // Written to a file, the log is plain text (no terminal colours).
    assert!(
        !since_restart.contains('\u{1b}'),
        "node {victim}'s log file holds terminal escape codes"
    );

    // With a renewed key the peers found the dead connections by their
    // timeouts, and say so.
    if renew {
        let mut redials = 0.0;
        for n in cluster.nodes.iter().filter(|n| n.id != victim) {
            let text = scrape_metrics(n.admin_addr).await;
            redials += sum_metric(
                &text,
                "auditflow_peer_redials_total",
                &[("peer", &victim.to_string())],
            );
        }
        assert!(redials >= 1.0, "no peer counted a redial to node {victim}");
    }

    // The partitions the victim led may have held an election if its
    // restart took longer than their election timeout; the others had a
    // live leader all along, and the restarted follower must not have
    // disturbed it.
    for p in 0..partitions as usize {
        let (leader, term) = before[p];
        if leader == victim {
            continue;
        }
        assert_eq!(
            after[p],
            (leader, term),
            "partition {p}, led by node {leader} in term {term}, changed leader or term \
             when its follower node {victim} was restarted"
        );
    }
}
