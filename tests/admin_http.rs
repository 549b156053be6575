//! Admin HTTP (DESIGN.md §5) against a real cluster: every node answers
//! `/healthz`, `/readyz`, `/status`, `/destinations`, `/` and `/metrics`
//! with what the cluster really did, and a real Prometheus server scrapes
//! all three nodes and sees one leader per partition.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use auditflow_broker::delivery::DestinationConfig;
use auditflow_protocol::delivery::DestinationStatus;
use auditflow_protocol::wire::NodeStatus;
use common::*;
use serde_json::{json, Value};

/// Events each test appends.
const EVENTS: u64 = 40;

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("HTTP client")
}

/// `GET http://{addr}{path}`: status and body, or `None` if unreachable.
async fn get(http: &reqwest::Client, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let resp = http.get(format!("http://{addr}{path}")).send().await.ok()?;
    let code = resp.status().as_u16();
    Some((code, resp.text().await.ok()?))
}

/// A JSON-lines file destination in `dir`.
fn file_destination(dir: &Path) -> DestinationConfig {
    serde_json::from_value(json!({
        "name": "local-file",
        "sink": { "kind": "file", "dir": dir.display().to_string() },
    }))
    .expect("destination config")
}

async fn append_events(cluster: &Cluster, prefix: &str) {
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;
    // Several tenants, so the events spread over partitions and leaders.
    for n in 0..EVENTS {
        client
            .append(event(&format!("{prefix}-{n}"), &format!("t{}", n % 8), n))
            .await
            .expect("append");
    }
    let again = client
        .append(event(&format!("{prefix}-0"), "t0", 0))
        .await
        .expect("re-append");
    assert!(again.duplicate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_the_cluster() {
    let sink_dir = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start(ClusterOptions {
        destinations: vec![file_destination(sink_dir.path())],
        ..ClusterOptions::default()
    });
    let http = http();
    let partitions = cluster.partitions as usize;

    // Health answers ok before the cluster has elected anyone: a first
    // election is not a problem (`raft.leaderless_max_ms`).
    for n in &cluster.nodes {
        let (code, body) = wait_until("/healthz", Duration::from_secs(30), || {
            get(&http, n.admin_addr, "/healthz")
        })
        .await;
        assert_eq!((code, body.as_str()), (200, "ok"), "node {}", n.id);
    }

    // Nodes turn transparent huge pages off for themselves (the kernel
    // clearing 2 MiB per first touch of the allocator's memory cost them
    // CPU: docs/performance.md). Kernels without THP have no line.
    for n in &cluster.nodes {
        let pid = n.child.as_ref().expect("node running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        if let Some(line) = status.lines().find(|l| l.starts_with("THP_enabled:")) {
            assert_eq!(
                line.split_whitespace().nth(1),
                Some("0"),
                "node {}: {line}",
                n.id
            );
        }
    }

    append_events(&cluster, "admin").await;

    for n in &cluster.nodes {
        // Readiness: 200 once leaders are known and this node applied
        // everything committed; a 503 says why in JSON.
        let body = wait_until("/readyz 200", Duration::from_secs(60), || async {
            match get(&http, n.admin_addr, "/readyz").await? {
                (200, body) => Some(body),
                (503, body) => {
                    let v: Value = serde_json::from_str(&body).expect("503 body is JSON");
                    assert_eq!(v["ready"], false);
                    assert!(v["reasons"].as_array().is_some_and(|r| !r.is_empty()));
                    None
                }
                (code, body) => panic!("/readyz answered {code}: {body}"),
            }
        })
        .await;
        let v: Value = serde_json::from_str(&body).expect("readyz JSON");
        assert_eq!(v["ready"], true);

        // Status: this node's view of every partition; once it has applied
        // everything, the partitions hold exactly the appended events.
        let status = wait_until(
            "/status to show every event",
            Duration::from_secs(30),
            || async {
                let (code, body) = get(&http, n.admin_addr, "/status").await?;
                assert_eq!(code, 200, "/status: {body}");
                let st: NodeStatus = serde_json::from_str(&body).expect("status JSON");
                let stored: u64 = st.partitions.iter().map(|p| p.next_offset).sum();
                (stored == EVENTS).then_some(st)
            },
        )
        .await;
        assert_eq!(status.node.id, n.id);
        assert_eq!(status.partitions.len(), partitions);
        assert!(status.partitions.iter().all(|p| p.leader.is_some()));

        let (code, body) = get(&http, n.admin_addr, "/destinations")
            .await
            .expect("/destinations");
        assert_eq!(code, 200, "/destinations: {body}");
        let dests: Vec<DestinationStatus> = serde_json::from_str(&body).expect("dest JSON");
        assert!(dests
            .iter()
            .all(|d| d.dest == "local-file" && d.node == n.id));

        let (code, page) = get(&http, n.admin_addr, "/").await.expect("/");
        assert_eq!(code, 200);
        assert!(page.contains("<meta http-equiv=\"refresh\""));
        assert!(page.contains(&format!("auditflow node {}", n.id)));
        assert!(page.contains("<h2>Partitions</h2>"));
    }

    // Metrics: counters where the appends were answered, sampled gauges on
    // every node. Sums across nodes match what the cluster did.
    let texts = wait_until(
        "metrics to account for every event",
        Duration::from_secs(60),
        || async {
            let mut texts = Vec::new();
            for n in &cluster.nodes {
                let (code, text) = get(&http, n.admin_addr, "/metrics").await?;
                assert_eq!(code, 200);
                texts.push(text);
            }
            let sum = |name, labels: &[(&str, &str)]| -> f64 {
                texts.iter().map(|t| sum_metric(t, name, labels)).sum()
            };
            let done = sum("auditflow_append_events_total", &[("result", "stored")])
                == EVENTS as f64
                && sum("auditflow_partition_leader", &[]) == partitions as f64
                && sum("auditflow_partition_next_offset", &[]) == (3 * EVENTS) as f64
                // At least: a leader change may deliver a batch twice.
                && sum("auditflow_delivered_events_total", &[]) >= EVENTS as f64
                && sum("auditflow_delivery_lag_events", &[]) == 0.0;
            done.then_some(texts)
        },
    )
    .await;
    let sum = |name, labels: &[(&str, &str)]| -> f64 {
        texts.iter().map(|t| sum_metric(t, name, labels)).sum()
    };
    assert!(sum("auditflow_append_events_total", &[("result", "duplicate")]) >= 1.0);
    assert_eq!(
        sum("auditflow_append_events_total", &[("result", "rejected")]),
        0.0
    );
    // One histogram observation per answered batch, at least one per event.
    assert!(sum("auditflow_append_batch_seconds_count", &[]) >= (EVENTS + 1) as f64);
    // Every (destination, partition) is reported by its leader.
    let reported: std::collections::BTreeSet<&str> = texts
        .iter()
        .flat_map(|t| t.lines())
        .filter(|l| l.starts_with("auditflow_delivery_lag_events{"))
        .filter_map(|l| l.split("partition=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(reported.len(), partitions, "{reported:?}");
    // Append metrics exist where appends were answered (partition leaders).
    for (kind, name) in [
        ("counter", "auditflow_append_events_total"),
        ("histogram", "auditflow_append_batch_seconds"),
    ] {
        assert!(
            texts
                .iter()
                .any(|t| t.contains(&format!("# TYPE {name} {kind}"))),
            "no node reports {name} as a {kind}"
        );
    }
    for t in &texts {
        for (kind, name) in [
            ("gauge", "auditflow_partition_leader"),
            ("gauge", "auditflow_raft_term"),
            ("gauge", "auditflow_raft_last_log_index"),
            ("gauge", "auditflow_raft_applied_index"),
            ("gauge", "auditflow_partition_next_offset"),
            ("counter", "auditflow_storage_commits_total"),
            ("counter", "auditflow_raft_log_writes_total"),
            ("histogram", "auditflow_raft_log_write_records"),
            ("histogram", "auditflow_raft_log_write_seconds"),
            ("gauge", "auditflow_raft_log_segments"),
            ("histogram", "auditflow_storage_commit_jobs"),
            ("histogram", "auditflow_storage_commit_seconds"),
        ] {
            assert!(
                t.contains(&format!("# TYPE {name} {kind}")),
                "{name} is not a {kind} in\n{t}"
            );
        }
        assert!(t.contains("# HELP auditflow_partition_leader "));
        // Every node applied every event's entry: terms and indexes are set.
        assert!(sum_metric(t, "auditflow_raft_applied_index", &[]) > 0.0);
        assert!(sum_metric(t, "auditflow_raft_term", &[]) >= partitions as f64);
        // Every node fsynced its log (votes, appended entries), each write
        // carrying at least one record, and applied in redb commits of at
        // least one job.
        let synced = sum_metric(t, "auditflow_raft_log_writes_total", &[]);
        assert!(synced >= 1.0, "no synced log write counted in\n{t}");
        assert!(
            sum_metric(t, "auditflow_raft_log_write_records_sum", &[])
                >= sum_metric(t, "auditflow_raft_log_write_records_count", &[]),
        );
        assert!(sum_metric(t, "auditflow_raft_log_segments", &[]) >= 1.0);
        assert!(sum_metric(t, "auditflow_storage_commits_total", &[]) >= 1.0);
        assert!(
            sum_metric(t, "auditflow_storage_commit_jobs_sum", &[])
                >= sum_metric(t, "auditflow_storage_commit_jobs_count", &[]),
        );
        // The standard process metrics, read from /proc at the scrape: a
        // node that stored and replicated events has used CPU, holds
        // memory and runs its runtime and writer threads.
        assert!(
            t.contains("# TYPE process_cpu_seconds_total gauge"),
            "no process CPU seconds (a gauge, for sub-second precision) in\n{t}"
        );
        assert!(sum_metric(t, "process_cpu_seconds_total", &[]) > 0.0);
        assert!(sum_metric(t, "process_resident_memory_bytes", &[]) > 1e6);
        assert!(sum_metric(t, "process_threads", &[]) >= 3.0);
        assert!(sum_metric(t, "process_open_fds", &[]) >= 1.0);
        assert!(sum_metric(t, "process_start_time_seconds", &[]) > 1.7e9);
    }
}

/// A Prometheus server process, killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` every second, with its config,
    /// data and log in `dir`.
    fn start(dir: &Path, targets: &[SocketAddr]) -> Prometheus {
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: auditflow\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .expect("write prometheus.yml");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log).expect("prometheus log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::from(out.try_clone().expect("dup log")))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("run `prometheus` (Debian package prometheus, see ops/apt-packages.txt)");
        Prometheus { child, addr, log }
    }

    /// The instant vector of `query`, as (labels, value) pairs.
    async fn query(&self, http: &reqwest::Client, query: &str) -> Option<Vec<(Value, f64)>> {
        let resp = http
            .get(format!("http://{}/api/v1/query", self.addr))
            .query(&[("query", query)])
            .send()
            .await
            .ok()?;
        let v: Value = resp.json().await.ok()?;
        if v["status"] != "success" {
            return None;
        }
        v["data"]["result"]
            .as_array()?
            .iter()
            .map(|r| {
                let value = r["value"][1].as_str()?.parse::<f64>().ok()?;
                Some((r["metric"].clone(), value))
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("===== prometheus log =====\n{text}");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_node() {
    let cluster = Cluster::start(ClusterOptions::default());
    let prom_dir = tempfile::tempdir().expect("tempdir");
    let targets: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.admin_addr).collect();
    let prom = Prometheus::start(prom_dir.path(), &targets);
    let http = http();
    let partitions = f64::from(cluster.partitions);

    append_events(&cluster, "prom").await;

    wait_until(
        "Prometheus to see all three targets up",
        Duration::from_secs(60),
        || async {
            let up = prom.query(&http, "up").await?;
            let instances: Vec<String> = up
                .iter()
                .filter(|(_, v)| *v == 1.0)
                .filter_map(|(m, _)| m["instance"].as_str().map(String::from))
                .collect();
            targets
                .iter()
                .all(|t| instances.contains(&t.to_string()))
                .then_some(())
        },
    )
    .await;
    wait_until(
        "Prometheus to see one leader per partition",
        Duration::from_secs(60),
        || async {
            let r = prom.query(&http, "sum(auditflow_partition_leader)").await?;
            (r.first()?.1 == partitions).then_some(())
        },
    )
    .await;
    wait_until(
        "Prometheus to see every stored event",
        Duration::from_secs(60),
        || async {
            let r = prom
                .query(
                    &http,
                    "sum(auditflow_append_events_total{result=\"stored\"})",
                )
                .await?;
            (r.first()?.1 == EVENTS as f64).then_some(())
        },
    )
    .await;
}
