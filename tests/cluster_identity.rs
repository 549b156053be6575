//! Issue 27, acceptance 3 and identity: a node refuses to start with a
//! configuration that disagrees with its cluster.
//!
//! Settings that shape replicated state (the partition count, the dedup
//! window) are fixed when the cluster is initialised and stored with every
//! node's data. They used to be per node and never compared: a node with
//! another partition count routed tenants to other partitions than its
//! peers. Now a node whose configuration differs stops at start-up with
//! an error naming both values, whether it has data of its own or has to
//! learn the cluster from a peer (an emptied data directory); a data
//! directory of another node id is refused the same way.

mod common;

use std::time::Duration;

use common::*;

/// Rewrites node `i`'s config with `edit` applied.
fn edit_config(cluster: &Cluster, i: usize, edit: impl FnOnce(&mut toml::Table)) {
    let path = &cluster.nodes[i].config_path;
    let mut table: toml::Table = std::fs::read_to_string(path)
        .expect("read config")
        .parse()
        .expect("parse config");
    edit(&mut table);
    std::fs::write(path, table.to_string()).expect("write config");
}

/// Starts node `i`, which must exit with an error; returns its log.
fn refused_start(cluster: &mut Cluster, i: usize) -> String {
    cluster.spawn(i);
    let child = cluster.nodes[i].child.as_mut().expect("spawned");
    let status = wait_exit(child, Duration::from_secs(60)).expect("the node refuses to start");
    cluster.nodes[i].child = None;
    assert!(!status.success(), "exit status {status}");
    std::fs::read_to_string(&cluster.nodes[i].log_path).expect("read log")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_configured_unlike_its_cluster_refuses_to_start() {
    let mut cluster = Cluster::start(ClusterOptions::default());
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;
    append_numbered(&client, 1).await;

    // Node 3, with its data, configured with 4 partitions instead of 8.
    cluster.stop(2);
    edit_config(&cluster, 2, |t| {
        t.insert("partitions".into(), toml::Value::Integer(4));
    });
    let log = refused_start(&mut cluster, 2);
    assert!(
        log.contains("`partitions` is 4 in this node's configuration")
            && log.contains("initialised with partitions = 8"),
        "{log}"
    );

    // The same node, data emptied: it learns the cluster's settings from
    // a peer and refuses all the same.
    let dir = cluster.data_dir(2);
    std::fs::remove_dir_all(&dir).expect("empty node 3's data directory");
    let _ = std::fs::remove_file(&cluster.nodes[2].log_path);
    let log = refused_start(&mut cluster, 2);
    assert!(
        log.contains("`partitions` is 4 in this node's configuration")
            && log.contains("initialised with partitions = 8"),
        "{log}"
    );

    // Node 2 pointed at node 1's data directory (node 1 stopped).
    cluster.stop(0);
    cluster.stop(1);
    edit_config(&cluster, 1, |t| {
        t.insert("data_dir".into(), toml::Value::String("node1".into()));
    });
    let _ = std::fs::remove_file(&cluster.nodes[1].log_path);
    let log = refused_start(&mut cluster, 1);
    assert!(
        log.contains("belongs to node 1 of cluster") && log.contains("configured as node 2"),
        "{log}"
    );
}
