//! Issue 27, acceptance 4: replay and redrive to a file destination write
//! the events again once the delivered files have been moved away.
//!
//! The bug: the file sink skipped every offset at or below the last one it
//! had written, whatever the files still held. After an operator moved the
//! delivered files away, `auditflow replay` reported events queued and
//! wrote none; a DLQ redrive to a file was resolved without a line, since
//! the live stream had already written later offsets. The sink now skips
//! only what its files hold, and replays and redrives skip nothing.
//!
//! Against a real cluster of three node processes, all writing one
//! directory (each partition's files are written by its leader).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use auditflow_broker::delivery::DestinationConfig;
use auditflow_protocol::delivery::RedriveSelection;
use auditflow_protocol::wire::ReplayFrom;
use common::*;
use serde_json::json;

/// Longest any delivery step below may take.
const DEADLINE: Duration = Duration::from_secs(90);
const PARTITIONS: u32 = 4;

fn file_destination(dir: &Path) -> DestinationConfig {
    serde_json::from_value(json!({
        "name": "files",
        "sink": { "kind": "file", "dir": dir },
        "batch_size": 50,
        "linger_ms": 5,
        // Two attempts, then parked: the blocked directory below parks
        // events within seconds.
        "retry": { "initial_ms": 20, "max_ms": 100, "max_attempts": 2 },
        "breaker": { "failure_threshold": 100000, "open_ms": 100 },
    }))
    .expect("destination config")
}

/// Event ids in every file of `dir`, with how often each is there.
fn ids_in(dir: &Path) -> BTreeMap<String, usize> {
    let mut ids = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return ids;
    };
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in text.lines() {
            let id = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.pointer("/event/id")?.as_str().map(str::to_string));
            if let Some(id) = id {
                *ids.entry(id).or_default() += 1;
            }
        }
    }
    ids
}

/// Waits until the files of `dir` hold exactly `want`, each once.
async fn wait_files(what: &str, dir: &Path, want: &BTreeSet<String>) {
    let once: BTreeMap<String, usize> = want.iter().map(|id| (id.clone(), 1)).collect();
    wait_until(what, DEADLINE, || {
        let got = ids_in(dir);
        let once = once.clone();
        async move { (got == once).then_some(()) }
    })
    .await;
}

/// Waits until every partition's delivery to the file destination has
/// recorded its cursor at the head of what `acked` holds there, and no
/// replay window is open.
///
/// The files hold an event before its cursor advance is committed, so a
/// test that sees the files complete and replays at once raced that
/// advance: the replay window is clamped to the cursor, so fewer events
/// were queued than stored, and the live stream, not the replay, wrote
/// the rest again.
async fn wait_caught_up(
    what: &str,
    client: &auditflow_client::Client,
    acked: &BTreeMap<String, (u32, u64)>,
) {
    let mut heads: BTreeMap<u32, u64> = (0..PARTITIONS).map(|p| (p, 0)).collect();
    for (p, offset) in acked.values() {
        let head = heads.entry(*p).or_default();
        *head = (*head).max(offset + 1);
    }
    wait_until(what, DEADLINE, || {
        let (client, heads) = (client.clone(), heads.clone());
        async move {
            let statuses: Vec<_> = client
                .dest_status_all()
                .await
                .into_iter()
                .flat_map(|(_, s)| s.unwrap_or_default())
                .filter(|s| s.dest == "files")
                .collect();
            heads
                .iter()
                .all(|(p, head)| {
                    statuses
                        .iter()
                        .any(|s| s.partition == *p && s.cursor >= *head && s.replay.is_none())
                })
                .then_some(())
        }
    })
    .await;
}

/// Appends events `from..to`; their ids and (partition, offset).
async fn append(
    client: &auditflow_client::Client,
    from: u64,
    to: u64,
) -> BTreeMap<String, (u32, u64)> {
    let events: Vec<_> = (from..to)
        .map(|i| event(&format!("ev-{i:06}"), &format!("tenant-{}", i % 5), i))
        .collect();
    let results = client.append_batch(events).await.expect("append");
    (from..to)
        .zip(results)
        .map(|(i, r)| {
            let ack = r.expect("stored");
            (format!("ev-{i:06}"), (ack.partition, ack.offset))
        })
        .collect()
}

/// Moves every file of `dir` into `to` (created), as an operator
/// archiving the delivered files would.
fn move_files(dir: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create archive");
    for entry in std::fs::read_dir(dir).expect("list").flatten() {
        std::fs::rename(entry.path(), to.join(entry.file_name())).expect("move");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_redrive_write_every_event_again_after_files_moved_away() {
    let root = tempfile::tempdir().expect("tempdir");
    let out: PathBuf = root.path().join("out");
    let cluster = Cluster::start(ClusterOptions {
        partitions: PARTITIONS,
        destinations: vec![file_destination(&out)],
        ..ClusterOptions::default()
    });
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;

    // Delivered, then archived away.
    let first = append(&client, 0, 200).await;
    let first_ids: BTreeSet<String> = first.keys().cloned().collect();
    wait_files("first events delivered", &out, &first_ids).await;
    wait_caught_up("first events' cursors at the head", &client, &first).await;
    move_files(&out, &root.path().join("archive-1"));
    assert!(ids_in(&out).is_empty());

    // Replay: every event is written again.
    let mut queued = 0;
    for p in 0..PARTITIONS {
        queued += client
            .replay("files", p, ReplayFrom::Offset(0), None)
            .await
            .expect("replay");
    }
    assert_eq!(queued, 200, "every stored event is queued for replay");
    wait_files("replay wrote every event again", &out, &first_ids).await;
    wait_caught_up("replay windows closed", &client, &first).await;

    // Redrive: the directory is blocked (a file where it should be), so
    // the next events are parked after their attempts.
    move_files(&out, &root.path().join("archive-2"));
    std::fs::remove_dir(&out).expect("remove out");
    std::fs::write(&out, b"not a directory").expect("block out");
    let parked_events = append(&client, 200, 260).await;
    let parked = wait_until("blocked events parked", DEADLINE, || {
        let client = client.clone();
        async move {
            let mut parked = BTreeSet::new();
            for p in 0..PARTITIONS {
                for (_, entry) in client.dlq_list("files", p, 0, 1000).await.ok()? {
                    parked.insert(entry.event_id);
                }
            }
            (parked.len() == 60).then_some(parked)
        }
    })
    .await;
    assert_eq!(parked, parked_events.keys().cloned().collect());
    // Unblocked: later events are delivered, so the files of every
    // partition with parked events hold offsets above them. (Not every
    // partition has events: five tenants hash onto four partitions.)
    std::fs::remove_file(&out).expect("unblock out");
    let later = append(&client, 260, 400).await;
    let later_ids: BTreeSet<String> = later.keys().cloned().collect();
    wait_files("later events delivered", &out, &later_ids).await;
    let max_offsets = |events: &BTreeMap<String, (u32, u64)>| {
        let mut max = BTreeMap::new();
        for (p, o) in events.values() {
            let m = max.entry(*p).or_insert(*o);
            *m = (*m).max(*o);
        }
        max
    };
    let max_later = max_offsets(&later);
    assert!(!parked_events.is_empty());
    for (p, max_parked) in max_offsets(&parked_events) {
        assert!(
            max_later.get(&p) > Some(&max_parked),
            "partition {p}: later events after the parked ones"
        );
    }

    // The redrive writes the parked events; the DLQ empties.
    for p in 0..PARTITIONS {
        client
            .redrive("files", p, RedriveSelection::All)
            .await
            .expect("redrive");
    }
    let all: BTreeSet<String> = later_ids.union(&parked).cloned().collect();
    wait_files("redriven events written", &out, &all).await;
    wait_until("DLQ empty", DEADLINE, || {
        let client = client.clone();
        async move {
            for p in 0..PARTITIONS {
                if !client.dlq_list("files", p, 0, 10).await.ok()?.is_empty() {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
}
