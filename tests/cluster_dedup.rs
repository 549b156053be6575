//! Acceptance (issue 3, point 2): re-appending an acknowledged event id
//! returns the original offset and stores nothing new, also after the
//! partition's leader has changed.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reappend_returns_original_offset_across_leader_change() {
    let mut cluster = Cluster::start(ClusterOptions::default());
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;

    let first = client
        .append(event("dedup-1", "acme", 1))
        .await
        .expect("first append");
    assert!(!first.duplicate);
    // Some other events after it, so that "the end of the log" and "the
    // original offset" differ.
    for n in 2..20 {
        client
            .append(event(&format!("dedup-{n}"), "acme", n))
            .await
            .expect("append");
    }
    let again = client
        .append(event("dedup-1", "acme", 1))
        .await
        .expect("re-append");
    assert!(again.duplicate, "re-append is reported as a duplicate");
    assert_eq!(
        (again.partition, again.offset, again.hash),
        (first.partition, first.offset, first.hash)
    );

    // Kill the partition's leader; re-append through the new one.
    let meta = client.metadata().await.expect("metadata");
    let leader = meta.leaders[first.partition as usize].expect("leader");
    let head_before = {
        let addr = &cluster.nodes[cluster.index_of(leader)].addr;
        client
            .read_from(addr, first.partition, 0, 1, 0)
            .await
            .expect("read")
            .head_offset
    };
    cluster.kill(cluster.index_of(leader));
    let survivor = cluster
        .nodes
        .iter()
        .find(|n| n.child.is_some())
        .map(|n| n.addr.clone())
        .expect("a live node");
    wait_until("a new leader", Duration::from_secs(60), || {
        let client = client.clone();
        async move {
            let meta = client.metadata().await.ok()?;
            meta.leaders[first.partition as usize].filter(|l| *l != leader)
        }
    })
    .await;
    let after = client
        .append(event("dedup-1", "acme", 1))
        .await
        .expect("re-append after failover");
    assert!(after.duplicate);
    assert_eq!((after.offset, after.hash), (first.offset, first.hash));

    // Nothing new was stored: the id appears once and the head did not grow
    // beyond what the original appends produced.
    let page = client
        .read_from(&survivor, first.partition, 0, 1000, 0)
        .await
        .expect("read");
    assert_eq!(page.head_offset, head_before);
    let copies = page
        .events
        .iter()
        .filter(|e| e.event.id == "dedup-1")
        .count();
    assert_eq!(copies, 1);
}
