//! Issue 27, acceptance 2: one byte flipped inside a synced, acknowledged
//! Raft-log batch of a stopped node costs no acknowledged event.
//!
//! The bug this pins: replay cut a damaged final batch as if it were a
//! torn write, even when it was synced and acknowledged, and refused to
//! open on damage anywhere else; the node then either voted with a log
//! that lacked entries it had acknowledged or did not start at all. Now
//! replay tells the damage from a torn tail (format 2: a CRC over each
//! frame's header and one over its body, batch markers proving the batch
//! before them synced), cuts the partition back to its intact prefix, and
//! the node rejoins that partition as a learner: it neither votes nor
//! serves reads of it until the leader has repaired it.
//!
//! Three real node processes: events appended and acknowledged; node 2
//! stopped cleanly (its closing marker proves its last batch synced); the
//! last byte of the largest frame of its oldest segment (an entry body)
//! flipped; node 2 restarted. Then node 2 says it rejoins a damaged
//! partition, is promoted back, and every acknowledged event is on every
//! node at its acknowledged offset with its acknowledged hash.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const EVENTS: usize = 400;
/// Segment header: magic, segment number, CRC (docs/storage-format.md).
const SEGMENT_HEADER: usize = 20;
/// Frame header: `len`, `head_crc`, `body_crc` (docs/storage-format.md).
const FRAME_HEADER: usize = 12;

/// The Raft log segments of a data directory, oldest first.
fn segments(data_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(data_dir).expect("data dir").flatten() {
        if dir.path().extension().is_some_and(|e| e == "raftlog") {
            for seg in std::fs::read_dir(dir.path()).expect("log dir").flatten() {
                if seg.path().extension().is_some_and(|e| e == "seg") {
                    out.push(seg.path());
                }
            }
        }
    }
    out.sort();
    out
}

/// Position and length of the largest frame of a segment: an entry with
/// events in its body (metadata records and batch markers are a few
/// bytes).
fn largest_frame(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut pos = SEGMENT_HEADER;
    let mut best: Option<(usize, usize)> = None;
    while pos + FRAME_HEADER <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().ok()?) as usize;
        if len == 0 || pos + FRAME_HEADER + len > bytes.len() {
            break; // the zeros filled ahead, or the end
        }
        let frame = FRAME_HEADER + len;
        if best.is_none_or(|(_, l)| frame > l) {
            best = Some((pos, frame));
        }
        pos += frame;
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_synced_batch_is_repaired_from_a_peer() {
    let mut cluster = Cluster::start(ClusterOptions::default());
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;

    let mut acked = BTreeMap::new();
    for n in 0..EVENTS {
        let (id, ack) = append_numbered(&client, n).await;
        acked.insert(id, ack);
    }

    // A clean stop: the closing batch marker proves every batch synced.
    cluster.stop(1);
    let segs = segments(&cluster.data_dir(1));
    let seg = segs.first().expect("node 2 has a raft log segment");
    let mut bytes = std::fs::read(seg).expect("read segment");
    let (pos, len) = largest_frame(&bytes).expect("an entry frame");
    assert!(
        len > 64,
        "an entry with an event, not metadata: {len} bytes"
    );
    bytes[pos + len - 1] ^= 0x01;
    std::fs::write(seg, &bytes).expect("write the flipped byte");

    cluster.spawn(1);
    let node2 = cluster.nodes[1].addr.clone();
    let log = cluster.nodes[1].log_path.clone();
    // Node 2 found the damage and rejoins the partition: it votes for
    // nobody and takes no appends until a leader has demoted it.
    wait_until(
        "node 2 to report the damaged partition and rejoin it",
        Duration::from_secs(60),
        || {
            let log = log.clone();
            async move {
                let text = std::fs::read_to_string(&log).ok()?;
                (text.contains("lost synced entries")
                    && text.contains("damaged in synced records; rejoining as a learner"))
                .then_some(())
            }
        },
    )
    .await;
    // Reads of a partition are refused while it is damaged; once every
    // partition reads again, node 2 is repaired.
    let partitions = cluster.partitions;
    wait_until(
        "node 2 to serve every partition again",
        Duration::from_secs(90),
        || {
            let client = client.clone();
            let node2 = node2.clone();
            async move {
                for p in 0..partitions {
                    client.read_from(&node2, p, 0, 1, 0).await.ok()?;
                }
                Some(())
            }
        },
    )
    .await;
    cluster.wait_ready(&client).await;

    let replicas = verify_acked(&client, &cluster.ids_and_addrs(), partitions, &acked).await;
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
