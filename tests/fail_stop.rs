//! Issue 27, point 3: fail-stop for real. A node whose disk fails stops
//! serving and ends its process with a non-zero exit and a message naming
//! the cause, so that its supervisor restarts it; with space again it
//! replays its log and catches up.
//!
//! Before, a failed write or fsync halted the node's storage for good
//! while the process kept running: it answered `/healthz` with ok and did
//! nothing else, and no supervisor restarted it.
//!
//! Node 1's data directory is moved onto a 12 MiB tmpfs (mounting needs
//! root; skipped where that is refused, except under CI, where `CI` is
//! set and the test must run). Appends fill it while nodes 2 and 3 keep
//! the quorum; node 1 exits with code 74 (`EX_IOERR`) naming the full
//! disk. The tmpfs is then grown, node 1 restarted, and every acknowledged
//! event checked on every node.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::*;

/// Size of node 1's disk: room for the cluster's start and a few MiB of
/// events.
const DISK: &str = "12m";
/// Bytes of filler per event.
const FILLER_BYTES: usize = 32 * 1024;

fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success())
}

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .expect("cp");
    assert!(
        status.success(),
        "copy {} to {}",
        from.display(),
        to.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_disk_fills_exits_naming_the_cause_and_recovers() {
    let mut cluster = Cluster::start(ClusterOptions::default());
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;
    let mut acked = BTreeMap::new();
    let (id, ack) = append_numbered(&client, 0).await;
    acked.insert(id, ack);

    // Node 1's data onto a small disk.
    cluster.stop(0);
    let data = cluster.data_dir(0);
    let moved = data.with_extension("orig");
    std::fs::rename(&data, &moved).expect("move node 1's data");
    std::fs::create_dir(&data).expect("mount point");
    if !mount_tmpfs(&data, DISK) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root, but mounting a tmpfs failed"
        );
        eprintln!("skipped: cannot mount a tmpfs (not root?)");
        return;
    }
    let _mounted = Mounted(data.clone());
    copy_dir(&moved, &data);
    cluster.spawn(0);

    // Fill it: nodes 2 and 3 keep acknowledging, node 1 runs out of space.
    let filler = "x".repeat(FILLER_BYTES);
    let mut n = 1u64;
    let status = loop {
        if let Some(status) = cluster.nodes[0]
            .child
            .as_mut()
            .and_then(|c| c.try_wait().expect("wait"))
        {
            break status;
        }
        assert!(n < 5_000, "node 1 never ran out of its {DISK} disk");
        let events: Vec<_> = (n..n + 16)
            .map(|i| {
                let mut e = event(&format!("fill-{i:05}"), &format!("tenant-{}", i % 7), i);
                e.data = serde_json::from_value(serde_json::json!({ "filler": filler }))
                    .expect("object");
                e
            })
            .collect();
        let results = client.append_batch(events.clone()).await.expect("append");
        for (e, r) in events.iter().zip(results) {
            acked.insert(e.id.clone(), r.expect("stored by the majority"));
        }
        n += 16;
    };
    cluster.nodes[0].child = None;
    let log = std::fs::read_to_string(&cluster.nodes[0].log_path).unwrap_or_default();
    assert_eq!(status.code(), Some(74), "node 1 exit: {status}\n{log}");
    assert!(
        log.contains("fail-stop: storage halted") && log.contains("disk full"),
        "the message names the cause:\n{log}"
    );

    // Space again (as an operator frees it): node 1 replays and catches up.
    let grown = Command::new("mount")
        .args(["-o", "remount,size=512m"])
        .arg(&data)
        .status()
        .is_ok_and(|s| s.success());
    assert!(grown, "grow node 1's tmpfs");
    cluster.spawn(0);
    cluster.wait_ready(&client).await;
    let (id, ack) = append_numbered(&client, 100_000).await;
    acked.insert(id, ack);
    verify_acked(
        &client,
        &cluster.ids_and_addrs(),
        cluster.partitions,
        &acked,
    )
    .await;
    cluster.stop(0);
}
