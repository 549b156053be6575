//! Acceptance (issue 3, point 3): a node stopped while 10,000 events are
//! appended, then restarted, catches up — through a snapshot, because the
//! leaders compacted their logs past its position — and serves identical
//! data.

mod common;

use std::time::Duration;

use auditflow_broker::config::RaftTuning;
use auditflow_protocol::StoredEvent;
use common::*;

const EVENTS: u64 = 10_000;
const BATCH: u64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_node_catches_up_through_snapshot() {
    let opts = ClusterOptions {
        raft: RaftTuning {
            heartbeat_ms: 100,
            election_timeout_min_ms: 600,
            election_timeout_max_ms: 1200,
            // Compact aggressively so the stopped node falls behind the
            // leaders' logs.
            snapshot_logs_since_last: 20,
            max_in_snapshot_log_to_keep: 0,
            ..RaftTuning::default()
        },
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start(opts);
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;
    // Some data before the stop, so the stopped node has a non-empty log.
    append_range(&client, 0, 500).await;

    let lagging = 2usize;
    let lagging_addr = cluster.nodes[lagging].addr.clone();
    let before = client
        .status_all()
        .await
        .into_iter()
        .find(|(a, _)| *a == lagging_addr)
        .and_then(|(_, s)| s.ok())
        .expect("status of the node to stop");
    cluster.stop(lagging);
    cluster.wait_ready(&client).await;

    append_range(&client, 500, EVENTS).await;

    // The leaders compacted past where the stopped node was.
    let statuses = client.status_all().await;
    let mut compacted_past = 0;
    for (addr, st) in &statuses {
        if *addr == lagging_addr {
            continue;
        }
        let Ok(st) = st else { continue };
        for p in &st.partitions {
            let was = before.partitions[p.partition as usize].last_log_index;
            if p.leader == Some(st.node.id) && p.purged_index > was {
                compacted_past += 1;
            }
        }
    }
    assert!(
        compacted_past > 0,
        "some leader purged its log past the stopped node"
    );

    cluster.spawn(lagging);
    cluster.wait_ready(&client).await;

    let leader_addr = cluster.nodes[0].addr.clone();
    for p in 0..cluster.partitions {
        let reference = read_everything(&client, &leader_addr, p).await;
        let want = reference.len();
        let caught_up = wait_until(
            &format!("node 3 to catch up partition {p}"),
            Duration::from_secs(120),
            || {
                let client = client.clone();
                let addr = lagging_addr.clone();
                async move {
                    let events = read_everything(&client, &addr, p).await;
                    (events.len() >= want).then_some(events)
                }
            },
        )
        .await;
        assert_eq!(
            caught_up, reference,
            "partition {p} identical on the restarted node"
        );
    }
    let after = client
        .status_all()
        .await
        .into_iter()
        .find(|(a, _)| *a == lagging_addr)
        .and_then(|(_, s)| s.ok())
        .expect("status of the restarted node");
    assert!(
        after
            .partitions
            .iter()
            .any(|p| p.snapshot_index > before.partitions[p.partition as usize].last_log_index),
        "the restarted node installed a snapshot"
    );
}

async fn append_range(client: &auditflow_client::Client, from: u64, to: u64) {
    let mut n = from;
    while n < to {
        let end = (n + BATCH).min(to);
        let events = (n..end)
            .map(|i| event(&format!("cu-{i}"), &format!("t{}", i % 7), i))
            .collect();
        let results = client.append_batch(events).await.expect("append batch");
        for r in results {
            r.expect("event stored");
        }
        n = end;
    }
}

async fn read_everything(
    client: &auditflow_client::Client,
    addr: &str,
    p: u32,
) -> Vec<StoredEvent> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let Ok(page) = client.read_from(addr, p, from, 1000, 0).await else {
            return out;
        };
        if page.events.is_empty() {
            return out;
        }
        from = page.next_offset;
        out.extend(page.events);
    }
}
