//! Test harness: a real three-node cluster of `auditflow node` processes on
//! loopback, with the means to kill, stop, pause and restart nodes.
//!
//! Tests wait for conditions by polling with a deadline ([`wait_until`]),
//! never by fixed sleeps.

#![allow(dead_code)]

pub mod docker;
pub mod receiver;

use std::future::Future;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use auditflow_broker::config::{NodeConfig, PeerConfig, RaftTuning, TlsConfig};
use auditflow_broker::net::tls::ensure_dev_certs;
use auditflow_client::{Client, ClientConfig};
use auditflow_protocol::{Actor, Event, Limits, Outcome, Target, Timestamp};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_auditflow");

/// Polls `check` every 100 ms until it returns `Some`, or panics with
/// `what` after `deadline`.
pub async fn wait_until<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits up to `deadline` for `child` to exit, polling every 100 ms (a
/// blocking wait has no deadline); `None` if it is still running then.
pub fn wait_exit(
    child: &mut std::process::Child,
    deadline: Duration,
) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child process") {
            return Some(status);
        }
        if start.elapsed() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A free UDP port on loopback (bound then released; good enough for tests).
/// Never the same port twice in one test process: two clusters started
/// at the same moment could otherwise both be handed a port the kernel
/// had just released.
pub fn free_port() -> u16 {
    unique_port(|| {
        UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral UDP port")
    })
}

/// A free TCP port on loopback (bound then released), for admin HTTP; never
/// the same twice in one test process.
pub fn free_tcp_port() -> u16 {
    unique_port(|| {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral TCP port")
    })
}

fn unique_port(mut bind: impl FnMut() -> u16) -> u16 {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = bind();
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// One node process.
pub struct NodeProc {
    pub id: u64,
    pub addr: String,
    /// The node's admin HTTP server (`/metrics`, `/healthz`, ...).
    pub admin_addr: SocketAddr,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub child: Option<Child>,
}

/// A cluster of node processes in a temporary directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeProc>,
    pub partitions: u32,
    /// Whether `wait_ready` has seen the cluster formed once (every node a
    /// voter, leaders spread).
    pub formed: std::sync::atomic::AtomicBool,
}

/// Options of a test cluster.
#[derive(Clone)]
pub struct ClusterOptions {
    pub partitions: u32,
    pub raft: RaftTuning,
    pub limits: Limits,
    /// Memory bounds of every node.
    pub memory: auditflow_broker::config::MemoryLimits,
    pub destinations: Vec<auditflow_broker::delivery::DestinationConfig>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            partitions: 8,
            raft: RaftTuning {
                heartbeat_ms: 100,
                election_timeout_min_ms: 600,
                election_timeout_max_ms: 1200,
                ..RaftTuning::default()
            },
            limits: Limits::default(),
            memory: Default::default(),
            destinations: Vec::new(),
        }
    }
}

/// The config of node `id` of a test cluster; paths are relative to the
/// cluster directory (data in `node<id>`, certificates in `certs/`).
pub fn node_config(
    id: u64,
    listen: SocketAddr,
    admin_listen: Option<SocketAddr>,
    peers: &[PeerConfig],
    opts: &ClusterOptions,
) -> NodeConfig {
    NodeConfig {
        id,
        listen,
        admin_listen,
        data_dir: PathBuf::from(format!("node{id}")),
        partitions: opts.partitions,
        dedup_window: 1_000_000,
        peers: peers.to_vec(),
        tls: TlsConfig {
            ca_cert: "certs/ca.pem".into(),
            cert: format!("certs/node{id}.pem").into(),
            key: format!("certs/node{id}.key").into(),
            server_name: "localhost".into(),
        },
        raft: opts.raft.clone(),
        limits: opts.limits,
        destinations: opts.destinations.clone(),
        memory: opts.memory,
    }
}

/// Writes `dir/client.toml` with `peers` as seeds.
pub fn write_client_config(dir: &Path, peers: &[PeerConfig]) {
    let seeds: Vec<String> = peers.iter().map(|p| format!("{:?}", p.addr)).collect();
    std::fs::write(
        dir.join("client.toml"),
        format!(
            "seeds = [{}]\nca_cert = \"certs/ca.pem\"\nserver_name = \"localhost\"\nrequest_timeout_ms = 3000\nretry_deadline_ms = 60000\n",
            seeds.join(", ")
        ),
    )
    .expect("write client.toml");
}

/// The node that leads the most partitions among `leaders` (one entry
/// per partition); ties go to the highest id.
pub fn most_leading(leaders: impl IntoIterator<Item = u64>) -> Option<u64> {
    let mut counts: std::collections::BTreeMap<u64, usize> = Default::default();
    for l in leaders {
        *counts.entry(l).or_default() += 1;
    }
    counts.into_iter().max_by_key(|(_, c)| *c).map(|(id, _)| id)
}

impl Cluster {
    /// Writes certificates and configs and starts three nodes.
    pub fn start(opts: ClusterOptions) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids = [1u64, 2, 3];
        ensure_dev_certs(&dir.path().join("certs"), &ids).expect("dev certs");
        let peers: Vec<PeerConfig> = ids
            .iter()
            .map(|id| PeerConfig {
                id: *id,
                addr: format!("127.0.0.1:{}", free_port()),
            })
            .collect();
        let mut nodes = Vec::new();
        for p in &peers {
            let admin_addr = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
            let cfg = node_config(
                p.id,
                p.addr.parse().expect("addr"),
                Some(admin_addr),
                &peers,
                &opts,
            );
            let config_path = dir.path().join(format!("node{}.toml", p.id));
            std::fs::write(&config_path, toml::to_string(&cfg).expect("toml")).expect("write");
            nodes.push(NodeProc {
                id: p.id,
                addr: p.addr.clone(),
                admin_addr,
                config_path,
                log_path: dir.path().join(format!("node{}.log", p.id)),
                child: None,
            });
        }
        write_client_config(dir.path(), &peers);
        let mut cluster = Cluster {
            formed: std::sync::atomic::AtomicBool::new(false),
            dir,
            nodes,
            partitions: opts.partitions,
        };
        cluster.init(0);
        for i in 0..3 {
            cluster.spawn(i);
        }
        cluster
    }

    /// `auditflow init` on node `i` (stopped): it founds the cluster, the
    /// others join it when they start.
    pub fn init(&self, i: usize) {
        let out = Command::new(BIN)
            .arg("init")
            .arg("--config")
            .arg(&self.nodes[i].config_path)
            .env("AUDITFLOW_LOG", "warn")
            .output()
            .expect("run auditflow init");
        assert!(
            out.status.success(),
            "auditflow init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Path of the client config.
    pub fn client_config_path(&self) -> PathBuf {
        self.dir.path().join("client.toml")
    }

    /// Starts node `i` (0-based) if it is not running.
    pub fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if node.child.is_some() {
            return;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .expect("log file");
        let child = Command::new(BIN)
            .arg("node")
            .arg("--config")
            .arg(&node.config_path)
            .env("AUDITFLOW_LOG", "warn,auditflow=info")
            .stdout(Stdio::from(log.try_clone().expect("dup log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn node");
        node.child = Some(child);
    }

    /// The process id of node `i`, which must be running.
    pub fn pid(&self, i: usize) -> u32 {
        self.nodes[i].child.as_ref().expect("node running").id()
    }

    /// Resident memory of every node (KiB), all of which must be running.
    pub fn rss_kib(&self) -> Vec<u64> {
        (0..self.nodes.len())
            .map(|i| rss_kib(self.pid(i)))
            .collect()
    }

    /// kill -9 node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM node `i` and wait for it to exit.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            signal(c.id(), libc::SIGTERM);
            let start = Instant::now();
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if start.elapsed() > Duration::from_secs(15) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Index of the node id.
    pub fn index_of(&self, id: u64) -> usize {
        self.nodes.iter().position(|n| n.id == id).expect("node id")
    }

    /// Index of the node leading the most partitions, by the cluster's
    /// metadata (the victim of failover tests: it moves the most).
    pub async fn busiest_leader(&self, client: &Client) -> usize {
        let meta = client.metadata().await.expect("metadata");
        let busiest = most_leading(meta.leaders.into_iter().flatten()).expect("a leader");
        self.index_of(busiest)
    }

    /// A connected client.
    pub async fn client(&self) -> Client {
        let cfg = ClientConfig::load(&self.client_config_path()).expect("client config");
        wait_until("client connect", Duration::from_secs(30), || {
            let cfg = cfg.clone();
            async move { Client::connect(cfg).await.ok() }
        })
        .await
    }

    /// Every node's (id, address), for [`verify_acked`].
    pub fn ids_and_addrs(&self) -> Vec<(u64, String)> {
        self.nodes.iter().map(|n| (n.id, n.addr.clone())).collect()
    }

    /// Addresses of the nodes this harness has running.
    pub fn running(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.addr.clone())
            .collect()
    }

    /// Waits until every partition has a leader that every running node
    /// agrees on and, while every node runs, no node is a learner (a new
    /// cluster grows from its founder, and a rejoining node is a learner
    /// until it caught up). The first time, for a new cluster, also until
    /// each partition is led by its preferred node (`p mod n`-th by id), as
    /// the leader rebalancing spreads them, so tests start from the same
    /// spread leaders as before.
    pub async fn wait_ready(&self, client: &Client) {
        use std::sync::atomic::Ordering::Relaxed;
        let running = self.running();
        let partitions = self.partitions;
        let all = running.len() == self.nodes.len();
        let spread = !self.formed.load(Relaxed);
        let ids: Vec<u64> = self.nodes.iter().map(|n| n.id).collect();
        wait_until(
            if spread {
                "the cluster to form: agreed, spread leaders and every node a voter"
            } else {
                "all partitions to have agreed leaders"
            },
            Duration::from_secs(60),
            || {
                let client = client.clone();
                let running = running.clone();
                let ids = ids.clone();
                async move {
                    let leaders = agreed_leaders(&client, &running, partitions).await?;
                    if all && any_learner(&client).await {
                        return None;
                    }
                    if spread {
                        let preferred = |p: usize| ids[p % ids.len()];
                        if leaders.iter().enumerate().any(|(p, l)| *l != preferred(p)) {
                            return None;
                        }
                    }
                    Some(())
                }
            },
        )
        .await;
        self.formed.store(true, Relaxed);
    }

    /// Prints every node log (for failing tests).
    pub fn dump_logs(&self) {
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("===== node {} log (last lines) =====", n.id);
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }

    /// Data directory of node `i`.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{}", self.nodes[i].id))
    }

    /// The cluster's directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// Resident memory of a process (KiB); 0 if it cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a child we spawned.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// A valid event with the given id and tenant.
pub fn event(id: &str, tenant: &str, n: u64) -> Event {
    Event {
        id: id.to_string(),
        tenant: tenant.to_string(),
        time: Timestamp(1_764_000_000_000_000_000 + n as i64),
        actor: Actor {
            id: format!("user-{}", n % 97),
            kind: "user".into(),
            name: None,
            ip: Some("10.0.0.1".into()),
        },
        action: "document.read".into(),
        target: Target {
            kind: "document".into(),
            id: format!("doc-{n}"),
        },
        outcome: Outcome::Success,
        source: None,
        context: [("request".to_string(), format!("r{n}"))]
            .into_iter()
            .collect(),
        data: None,
        schema_version: None,
        partition_key: None,
    }
}

/// Sum of the samples of `name` whose labels include every `key="value"`
/// of `labels`, in a Prometheus text exposition.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let (n, l) = series.split_once('{').unwrap_or((series, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

/// Reads partition `p` from one node until it holds `want` events.
pub async fn read_all(
    client: &Client,
    addr: &str,
    p: u32,
    want: u64,
) -> Vec<auditflow_protocol::StoredEvent> {
    wait_until(
        &format!("{addr} to hold {want} events in partition {p}"),
        Duration::from_secs(120),
        || async move {
            let mut out = Vec::new();
            let mut from = 0;
            loop {
                let page = client.read_from(addr, p, from, 1000, 0).await.ok()?;
                if page.events.is_empty() {
                    break;
                }
                from = page.next_offset;
                out.extend(page.events);
            }
            (out.len() as u64 >= want).then_some(out)
        },
    )
    .await
}

/// Whether any node that answers reports itself a learner of a partition.
pub async fn any_learner(client: &Client) -> bool {
    client.status_all().await.into_iter().any(|(_, st)| {
        st.map(|st| {
            st.partitions
                .iter()
                .any(|p| p.role == auditflow_protocol::wire::Role::Learner)
        })
        .unwrap_or(true)
    })
}

/// Each partition's leader, if every node in `running` answers and they
/// all agree on it.
pub async fn agreed_leaders(
    client: &Client,
    running: &[String],
    partitions: u32,
) -> Option<Vec<u64>> {
    let mut leaders: Vec<Option<u64>> = vec![None; partitions as usize];
    for (addr, st) in client.status_all().await {
        if !running.contains(&addr) {
            continue;
        }
        let st = st.ok()?;
        for p in st.partitions {
            let l = p.leader?;
            match leaders[p.partition as usize] {
                None => leaders[p.partition as usize] = Some(l),
                Some(prev) if prev != l => return None,
                _ => {}
            }
        }
    }
    leaders.into_iter().collect()
}

/// Appends the `n`-th event of the cluster tests' workload (id
/// `evt-{n:06}`, one of 13 tenants) and returns its id and ack; panics if
/// the client gives up.
pub async fn append_numbered(client: &Client, n: usize) -> (String, auditflow_protocol::wire::Ack) {
    let id = format!("evt-{n:06}");
    let e = event(&id, &format!("tenant-{}", n % 13), n as u64);
    match client.append(e).await {
        Ok(ack) => (id, ack),
        Err(err) => panic!("append {id} failed: {err}"),
    }
}

/// How [`append_batches`] treats a batch the cluster does not take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appends {
    /// Every event must be stored on the first try (a healthy cluster).
    AllStored,
    /// A batch that fails as a whole is sent again until taken (within a
    /// minute; ids are deduplicated, so it is stored once), and events
    /// refused one by one are left out: for clusters under faults.
    Retried,
}

/// Appends events `from..to` made by `make`, in batches of 250, and
/// returns the acknowledged ones by id with their (partition, offset).
pub async fn append_batches(
    client: &Client,
    from: u64,
    to: u64,
    make: impl Fn(u64) -> Event,
    mode: Appends,
) -> std::collections::BTreeMap<String, (u32, u64)> {
    let mut acked = std::collections::BTreeMap::new();
    let mut n = from;
    while n < to {
        let end = (n + 250).min(to);
        let events: Vec<Event> = (n..end).map(&make).collect();
        let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        let results = match mode {
            Appends::AllStored => client.append_batch(events).await.expect("append"),
            Appends::Retried => {
                wait_until(
                    "a batch of appends to be taken",
                    Duration::from_secs(60),
                    || {
                        let client = client.clone();
                        let events = events.clone();
                        async move { client.append_batch(events).await.ok() }
                    },
                )
                .await
            }
        };
        for (id, r) in ids.into_iter().zip(results) {
            match (r, mode) {
                (Ok(ack), _) => {
                    acked.insert(id, (ack.partition, ack.offset));
                }
                (Err(e), Appends::AllStored) => panic!("{id} not stored: {e:?}"),
                (Err(_), Appends::Retried) => {}
            }
        }
        n = end;
    }
    acked
}

/// The `n`-th event of the delivery tests' workload: id `ev-{n:06}`, one
/// of four tenants.
pub fn delivery_event(n: u64) -> Event {
    event(&format!("ev-{n:06}"), &format!("tenant-{}", n % 4), n)
}

/// The Prometheus text a node's admin server serves at `/metrics`.
pub async fn scrape_metrics(admin_addr: SocketAddr) -> String {
    reqwest::get(format!("http://{admin_addr}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text")
}

/// Reads every partition from each node in `nodes` (id, address) up to the
/// highest acknowledged offset and checks what an auditor would: each
/// partition's hash chain is intact, no id is stored twice, and every
/// acknowledged event is stored where its ack said, with the ack's hash.
/// Returns each node's partitions, for comparing replicas.
pub async fn verify_acked(
    client: &Client,
    nodes: &[(u64, String)],
    partitions: u32,
    acked: &std::collections::BTreeMap<String, auditflow_protocol::wire::Ack>,
) -> Vec<std::collections::BTreeMap<u32, Vec<auditflow_protocol::StoredEvent>>> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut heads: BTreeMap<u32, u64> = BTreeMap::new();
    for ack in acked.values() {
        let head = heads.entry(ack.partition).or_insert(0);
        *head = (*head).max(ack.offset + 1);
    }
    let mut replicas = Vec::new();
    for (node, addr) in nodes {
        let mut parts = BTreeMap::new();
        let mut ids = BTreeSet::new();
        for p in 0..partitions {
            let want = heads.get(&p).copied().unwrap_or(0);
            let events = read_all(client, addr, p, want).await;
            let mut chain = auditflow_protocol::chain::ChainVerifier::new(p);
            for e in &events {
                chain
                    .push(e)
                    .unwrap_or_else(|err| panic!("node {node} partition {p}: {err}"));
                assert!(
                    ids.insert(e.event.id.clone()),
                    "node {node}: id {} stored twice",
                    e.event.id
                );
            }
            parts.insert(p, events);
        }
        for (id, ack) in acked {
            let stored = parts[&ack.partition]
                .get(ack.offset as usize)
                .unwrap_or_else(|| panic!("node {node}: acked {id} missing"));
            assert_eq!(&stored.event.id, id, "node {node}: offset of {id}");
            assert_eq!(stored.hash, ack.hash, "node {node}: hash of {id}");
        }
        replicas.push(parts);
    }
    replicas
}

/// The cluster tests' background workload: `window` workers append
/// numbered events ([`append_numbered`]) until stopped, and every ack is
/// kept for [`verify_acked`].
pub struct Appenders {
    acked: std::sync::Arc<
        tokio::sync::Mutex<std::collections::BTreeMap<String, auditflow_protocol::wire::Ack>>,
    >,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Appenders {
    /// Starts `window` workers appending through `client`.
    pub fn start(client: &Client, window: usize) -> Appenders {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let acked: Arc<tokio::sync::Mutex<std::collections::BTreeMap<_, _>>> = Default::default();
        let next = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..window)
            .map(|_| {
                let (client, acked, next, stop) = (
                    client.clone(),
                    Arc::clone(&acked),
                    Arc::clone(&next),
                    Arc::clone(&stop),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let n = next.fetch_add(1, Ordering::SeqCst);
                        let (id, ack) = append_numbered(&client, n).await;
                        acked.lock().await.insert(id, ack);
                    }
                })
            })
            .collect();
        Appenders {
            acked,
            stop,
            workers,
        }
    }

    /// Appends acknowledged so far.
    pub async fn count(&self) -> usize {
        self.acked.lock().await.len()
    }

    /// Waits (60 s at most) until `more` appends beyond those acknowledged
    /// now are acknowledged: `what` is the condition, for the failure
    /// message.
    pub async fn wait_for_more(&self, what: &str, more: usize) {
        let target = self.count().await + more;
        wait_until(what, Duration::from_secs(60), || {
            let acked = std::sync::Arc::clone(&self.acked);
            async move { (acked.lock().await.len() >= target).then_some(()) }
        })
        .await;
    }

    /// Stops the workers once their appends in flight are answered; every
    /// ack, by event id.
    pub async fn stop(self) -> std::collections::BTreeMap<String, auditflow_protocol::wire::Ack> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for w in self.workers {
            w.await.expect("append worker");
        }
        let acked = self.acked.lock().await.clone();
        acked
    }
}

/// Waits (60 s at most) until the nodes in `others` agree on a leader for
/// every partition and none of them is `victim`.
pub async fn wait_failed_over(
    what: &str,
    client: &Client,
    others: &[String],
    partitions: u32,
    victim: u64,
) {
    wait_until(what, Duration::from_secs(60), || {
        let (client, others) = (client.clone(), others.to_vec());
        async move {
            let leaders = agreed_leaders(&client, &others, partitions).await?;
            (!leaders.contains(&victim)).then_some(())
        }
    })
    .await;
}
