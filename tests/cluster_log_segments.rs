//! The Raft log's segment files stay bounded when no partition reaches its
//! snapshot threshold: the node asks the partitions keeping the oldest
//! segment to snapshot and purge, deletes the freed segments, and still
//! serves every event, also after a restart that replays what is left.

mod common;

use std::path::Path;
use std::time::Duration;

use auditflow_broker::config::RaftTuning;
use auditflow_broker::partition::compaction::MAX_SEGMENTS;
use common::*;

const EVENTS: u64 = 30_000;
const BATCH: u64 = 100;

fn segments(dir: &Path, node: u64) -> usize {
    let log = dir.join(format!("node{node}/auditflow.raftlog"));
    std::fs::read_dir(&log)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_partitions_are_compacted_so_old_segments_go() {
    let opts = ClusterOptions {
        raft: RaftTuning {
            heartbeat_ms: 100,
            election_timeout_min_ms: 600,
            election_timeout_max_ms: 1200,
            // No partition reaches its snapshot threshold in this test:
            // only the node's segment bound can free segments.
            snapshot_logs_since_last: 1_000_000,
            max_in_snapshot_log_to_keep: 0,
            // The smallest segment the configuration accepts.
            log_segment_bytes: auditflow_broker::config::MIN_SEGMENT_BYTES,
            ..RaftTuning::default()
        },
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start(opts);
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;

    let mut n = 0;
    while n < EVENTS {
        let end = (n + BATCH).min(EVENTS);
        let events = (n..end)
            .map(|i| event(&format!("seg-{i}"), &format!("t{}", i % 13), i))
            .collect();
        for r in client.append_batch(events).await.expect("append batch") {
            r.expect("event stored");
        }
        n = end;
    }
    let dir = cluster.dir.path().to_path_buf();
    let most = (1..=3).map(|id| segments(&dir, id)).max().unwrap_or(0);
    assert!(
        most > MAX_SEGMENTS + 2,
        "the workload must outgrow the bound to test it: {most} segments"
    );

    for id in 1..=3u64 {
        wait_until(
            &format!("node {id} to delete purged segments"),
            Duration::from_secs(120),
            || {
                let dir = dir.clone();
                async move { (segments(&dir, id) <= MAX_SEGMENTS + 1).then_some(()) }
            },
        )
        .await;
    }

    // Nothing was lost, and a node replays what is left after a restart.
    let stored = |addr: String| {
        let client = client.clone();
        async move {
            let mut total = 0;
            for p in 0..8 {
                let head = client.read_from(&addr, p, 0, 1, 0).await.ok()?;
                total += head.head_offset;
            }
            Some(total)
        }
    };
    for node in &cluster.nodes {
        assert_eq!(stored(node.addr.clone()).await, Some(EVENTS));
    }
    cluster.stop(2);
    cluster.spawn(2);
    cluster.wait_ready(&client).await;
    let addr = cluster.nodes[2].addr.clone();
    wait_until(
        "the restarted node to serve",
        Duration::from_secs(60),
        || {
            let addr = addr.clone();
            async move { (stored(addr).await == Some(EVENTS)).then_some(()) }
        },
    )
    .await;
}
