//! Issue 27, acceptance 6: Splunk HEC with indexer acknowledgement
//! advances delivery only once HEC acknowledges that it indexed a batch.
//!
//! Before, the sink took HTTP 200 as delivered; with acknowledgement on, a
//! 200 only says "received", and HEC can still lose the events before they
//! are indexed, while the cursor had already moved past them. Here a real
//! three-node cluster delivers to the strict HEC stand-in
//! (`broker/tests/servers/splunk_hec.rs`) whose acknowledgements are
//! withheld: HEC receives batches, again and again as each wait for an
//! ack times out and the batch is re-sent, and no cursor moves. Once the
//! acks are released, every cursor reaches its partition's head and HEC
//! holds every acknowledged event: nothing lost, duplicates allowed.

mod common;
#[path = "../broker/tests/servers/splunk_hec.rs"]
mod splunk_hec;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use auditflow_broker::delivery::DestinationConfig;
use auditflow_client::Client;
use auditflow_protocol::delivery::DestinationStatus;
use common::*;
use serde_json::json;
use splunk_hec::{Hec, TOKEN};

/// Events appended.
const EVENTS: u64 = 60;
/// Partitions of the test cluster.
const PARTITIONS: u32 = 2;

fn hec_destination(url: &str) -> DestinationConfig {
    serde_json::from_value(json!({
        "name": "hec",
        "sink": {
            "kind": "splunk_hec",
            "url": url,
            "token": TOKEN,
            "indexer_ack": true,
            "ack_poll_ms": 50,
            "ack_timeout_ms": 1000,
            "timeout_ms": 5000,
        },
        "batch_size": 20,
        "linger_ms": 10,
        "retry": { "initial_ms": 50, "max_ms": 300 },
        "breaker": { "failure_threshold": 1000, "open_ms": 300 },
    }))
    .expect("destination config")
}

/// The `hec` destination's status per partition, once every partition's
/// leader reports it.
async fn hec_statuses(client: &Client) -> Option<Vec<DestinationStatus>> {
    let statuses: Vec<DestinationStatus> = client
        .dest_status_all()
        .await
        .into_iter()
        .filter_map(|(_, s)| s.ok())
        .flatten()
        .filter(|s| s.dest == "hec")
        .collect();
    let partitions: BTreeSet<u32> = statuses.iter().map(|s| s.partition).collect();
    (partitions.len() == PARTITIONS as usize).then_some(statuses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_delivery_advances_only_after_the_indexer_acknowledges() {
    let hec = Hec::start().await;
    hec.with(|i| i.withhold_acks = true);
    let cluster = Cluster::start(ClusterOptions {
        partitions: PARTITIONS,
        destinations: vec![hec_destination(&hec.url())],
        ..ClusterOptions::default()
    });
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;
    let mut acked: BTreeMap<String, (u32, u64)> = BTreeMap::new();
    for n in 0..EVENTS {
        let id = format!("hec-{n:03}");
        let ack = client
            .append(event(&id, &format!("tenant-{}", n % 5), n))
            .await
            .expect("append");
        acked.insert(id, (ack.partition, ack.offset));
    }

    // Withheld: a batch reaches HEC from every partition and is re-sent
    // after its ack timed out (only the head of each partition's line is
    // retried: later events wait behind it, G4), and no cursor has moved.
    wait_until(
        "batches re-sent without an acknowledgement",
        Duration::from_secs(120),
        || async {
            let mut sent: BTreeMap<String, usize> = BTreeMap::new();
            for id in hec.indexed_ids() {
                *sent.entry(id).or_default() += 1;
            }
            let partitions: BTreeSet<u32> = acked
                .iter()
                .filter(|(id, _)| sent.contains_key(*id))
                .map(|(_, (p, _))| *p)
                .collect();
            let resent = sent.values().any(|n| *n >= 2);
            (resent && partitions.len() == PARTITIONS as usize).then_some(())
        },
    )
    .await;
    // A leader that took a partition over just now (leaders move to
    // their preferred nodes in the first rounds) reports no error until
    // its own first send times out: wait for it, while every cursor stays
    // at zero throughout.
    wait_until(
        "every partition's leader to report the missing acknowledgement",
        Duration::from_secs(60),
        || async {
            let statuses = hec_statuses(&client).await?;
            assert_eq!(statuses.iter().map(|s| s.head).sum::<u64>(), EVENTS);
            for s in &statuses {
                assert_eq!(
                    s.cursor, 0,
                    "partition {}: the cursor moved without an acknowledgement: {s:?}",
                    s.partition
                );
            }
            statuses
                .iter()
                .all(|s| {
                    s.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("did not acknowledge"))
                })
                .then_some(())
        },
    )
    .await;

    // Released: every cursor reaches its head, and HEC holds every
    // acknowledged event.
    hec.with(|i| i.withhold_acks = false);
    wait_until(
        "cursors at the heads once HEC acknowledges",
        Duration::from_secs(120),
        || async {
            let statuses = hec_statuses(&client).await?;
            let stored: u64 = statuses.iter().map(|s| s.head).sum();
            (stored == EVENTS && statuses.iter().all(|s| s.cursor == s.head)).then_some(())
        },
    )
    .await;
    let indexed: BTreeSet<String> = hec.indexed_ids().into_iter().collect();
    let missing: Vec<&String> = acked.keys().filter(|id| !indexed.contains(*id)).collect();
    assert!(missing.is_empty(), "not in HEC: {missing:?}");
}
