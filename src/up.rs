//! `auditflow up`: a local three-node cluster for development.
//!
//! Generates a dev CA and node certificates, writes one `node.toml` per
//! node and a `client.toml`, then runs each node as a child process (so a
//! node can be killed on its own, as in production). A node that exits
//! (killed, or fail-stopped on a storage error) is restarted with
//! exponential backoff, as systemd or Kubernetes would. Running it again
//! on the same directory restarts the same cluster with its data.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use auditflow_broker::config::{NodeConfig, PeerConfig, RaftTuning, TlsConfig};
use auditflow_broker::delivery::DestinationConfig;
use auditflow_broker::net::tls::ensure_dev_certs;
use auditflow_protocol::Limits;

/// Nodes in the dev cluster: the smallest that tolerates one failure.
const NODES: u64 = 3;
/// How long children get to stop after Ctrl-C before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often `up` looks for nodes that exited on their own.
const EXIT_POLL: Duration = Duration::from_millis(200);
/// Wait before the first restart of a node that exited: long enough not
/// to spin on a node that fails at once, short enough that a killed node
/// is back before its peers' leases run out.
const RESTART_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between restarts (the doubling stops here).
const RESTART_MAX: Duration = Duration::from_secs(30);
/// A node that ran this long before exiting was working: its next restart
/// starts from [`RESTART_FIRST`] again.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// Quick exits in a row after which `up` stops restarting a node: it
/// fails at start-up (a bad config, a refused data directory), and
/// restarting it forever would only fill its log.
const MAX_QUICK_EXITS: u32 = 6;
/// Node `id`'s admin HTTP port is `base_port + ADMIN_PORT_OFFSET + id - 1`
/// (7201..7203 for the default base 7101): clear of the QUIC ports.
const ADMIN_PORT_OFFSET: u64 = 100;

/// Arguments of `auditflow up`.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Directory for certificates, configs, data and logs.
    #[arg(long, default_value = ".auditflow")]
    pub dir: PathBuf,
    /// UDP port of node 1; nodes 2 and 3 use the next ports. Admin HTTP
    /// (metrics, health, status page) listens on TCP `base_port + 100`
    /// and the next ports.
    #[arg(long, default_value_t = 7101)]
    pub base_port: u16,
    /// Partition count (used only when the cluster is created).
    #[arg(long, default_value_t = auditflow_broker::config::DEFAULT_PARTITIONS)]
    pub partitions: u32,
    /// Create the cluster without the default file destination (used only
    /// when the cluster is created): appends are stored and replicated but
    /// delivered nowhere until a destination is added (`auditflow dest
    /// add`), e.g. to measure the append path alone with `bench`.
    #[arg(long)]
    pub no_default_destination: bool,
}

/// Prepares the directory and runs the three nodes until Ctrl-C.
pub fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    let dir = args.dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let nodes = prepare(&args, Vec::new())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(supervise(&dir, nodes))
}

/// A node of the dev cluster: its config file and admin HTTP address.
pub struct DevNode {
    /// Its `node.toml`.
    pub config: PathBuf,
    /// Its admin HTTP address, if enabled.
    pub admin: Option<std::net::SocketAddr>,
    /// Whether its config has the default file destination.
    pub default_destination: bool,
}

/// Writes certificates and configs that do not exist yet; returns the
/// nodes. A new cluster gets the default file destination (unless
/// `args.no_default_destination`) plus `extra`.
pub fn prepare(args: &UpArgs, extra: Vec<DestinationConfig>) -> anyhow::Result<Vec<DevNode>> {
    let dir = &args.dir;
    let ids: Vec<u64> = (1..=NODES).collect();
    ensure_dev_certs(&dir.join("certs"), &ids)?;
    let peers: Vec<PeerConfig> = ids
        .iter()
        .map(|id| PeerConfig {
            id: *id,
            addr: format!("127.0.0.1:{}", u64::from(args.base_port) + id - 1),
        })
        .collect();
    // The default destination: JSON lines files, one per partition, shared
    // by the three local nodes (whichever leads a partition writes it).
    let default = if args.no_default_destination {
        None
    } else {
        let delivered = dir.join("delivered");
        std::fs::create_dir_all(&delivered)
            .with_context(|| format!("create {}", delivered.display()))?;
        let delivered = delivered
            .canonicalize()
            .with_context(|| format!("resolve {}", delivered.display()))?;
        Some(default_destination(&delivered)?)
    };
    let mut nodes = Vec::new();
    for id in &ids {
        let path = dir.join(format!("node{id}.toml"));
        let (admin, destinations) = if path.exists() {
            // An existing cluster keeps its layout: the partition count is
            // fixed at init.
            let cfg = NodeConfig::load(&path)?;
            (cfg.admin_listen, cfg.destinations)
        } else {
            let admin_port = u64::from(args.base_port) + ADMIN_PORT_OFFSET + id - 1;
            let admin_port = u16::try_from(admin_port)
                .with_context(|| format!("admin port {admin_port} of node {id} is too large"))?;
            let cfg = NodeConfig {
                id: *id,
                listen: format!("127.0.0.1:{}", u64::from(args.base_port) + id - 1).parse()?,
                admin_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], admin_port))),
                data_dir: PathBuf::from(format!("node{id}")),
                partitions: args.partitions,
                dedup_window: auditflow_broker::config::DEFAULT_DEDUP_WINDOW,
                peers: peers.clone(),
                tls: TlsConfig {
                    ca_cert: PathBuf::from("certs/ca.pem"),
                    cert: PathBuf::from(format!("certs/node{id}.pem")),
                    key: PathBuf::from(format!("certs/node{id}.key")),
                    server_name: "localhost".into(),
                },
                raft: RaftTuning::default(),
                limits: Limits::default(),
                memory: Default::default(),
                destinations: default
                    .iter()
                    .cloned()
                    .chain(extra.iter().cloned())
                    .collect(),
            };
            std::fs::write(&path, toml::to_string_pretty(&cfg)?)
                .with_context(|| format!("write {}", path.display()))?;
            (cfg.admin_listen, cfg.destinations)
        };
        nodes.push(DevNode {
            config: path,
            admin,
            default_destination: destinations.iter().any(|d| d.name == DEFAULT_DESTINATION),
        });
    }
    let client = dir.join("client.toml");
    if !client.exists() {
        let seeds: Vec<String> = peers.iter().map(|p| format!("{:?}", p.addr)).collect();
        let text = format!(
            "# Written by `auditflow up`: how clients reach this dev cluster.\n\
             seeds = [{}]\nca_cert = \"certs/ca.pem\"\nserver_name = \"localhost\"\n",
            seeds.join(", ")
        );
        std::fs::write(&client, text).with_context(|| format!("write {}", client.display()))?;
    }
    Ok(nodes)
}

/// Name of the file destination a dev cluster starts with.
pub(crate) const DEFAULT_DESTINATION: &str = "local-file";

/// The file destination every dev cluster starts with (unless created
/// with `--no-default-destination`).
fn default_destination(dir: &Path) -> anyhow::Result<DestinationConfig> {
    let text = format!(
        "name = {DEFAULT_DESTINATION:?}\nsink = {{ kind = \"file\", dir = {:?} }}\n",
        dir.display().to_string()
    );
    toml::from_str(&text).context("default destination")
}

/// Runs `init` on node 1 when no node has an identity yet (a new dev
/// cluster); an existing one (any node has data) is left as it is, so a
/// wiped node rejoins it instead of founding another cluster.
fn init_if_new(nodes: &[DevNode]) -> anyhow::Result<()> {
    let mut configs = Vec::new();
    for node in nodes {
        let config = NodeConfig::load(&node.config)?;
        if auditflow_broker::daemon::stored_identity(&config)
            .with_context(|| format!("read the identity of {}", node.config.display()))?
            .is_some()
        {
            return Ok(());
        }
        configs.push(config);
    }
    let (Some(first), Some(first_node)) = (configs.first(), nodes.first()) else {
        return Ok(());
    };
    let exe = std::env::current_exe().context("locate the auditflow binary")?;
    let status = std::process::Command::new(&exe)
        .arg("init")
        .arg("--config")
        .arg(&first_node.config)
        .stdout(std::process::Stdio::null())
        .status()
        .context("run auditflow init")?;
    anyhow::ensure!(
        status.success(),
        "auditflow init for node {} failed",
        first.id
    );
    Ok(())
}

/// Starts one `auditflow node` child process per node, logging to
/// `DIR/node{i}.log`, each with one runtime thread unless
/// `AUDITFLOW_NODE_THREADS` says otherwise; they are killed if the handles
/// are dropped.
pub fn spawn_nodes(dir: &Path, nodes: &[DevNode]) -> anyhow::Result<Vec<tokio::process::Child>> {
    init_if_new(nodes)?;
    nodes
        .iter()
        .enumerate()
        .map(|(i, node)| spawn_node(dir, i, node))
        .collect()
}

/// Starts node `i` (0-based) as [`spawn_nodes`] does.
fn spawn_node(dir: &Path, i: usize, node: &DevNode) -> anyhow::Result<tokio::process::Child> {
    let exe = std::env::current_exe().context("cannot find own executable")?;
    // The three nodes share this machine's cores: with one thread each for
    // everything async they used less CPU per event and had a lower tail
    // latency (docs/performance.md). The variable overrides.
    let threads = std::env::var("AUDITFLOW_NODE_THREADS").unwrap_or_else(|_| "1".into());
    let log_path = dir.join(format!("node{}.log", i + 1));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("open {}", log_path.display()))?;
    tokio::process::Command::new(&exe)
        .arg("node")
        .arg("--config")
        .arg(&node.config)
        .env("AUDITFLOW_NODE_THREADS", &threads)
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start node {}", i + 1))
}

/// When to start a node again after it exited (pure): exponential backoff
/// from [`RESTART_FIRST`] to [`RESTART_MAX`] over quick exits in a row,
/// reset by a run of [`STABLE_RUN`]; none after [`MAX_QUICK_EXITS`].
#[derive(Debug, Default)]
pub struct Backoff {
    /// Exits in a row, each after less than [`STABLE_RUN`].
    quick_exits: u32,
}

impl Backoff {
    /// The wait before the next start of a node that exited after running
    /// for `ran`, or `None` to give up on it.
    pub fn after_exit(&mut self, ran: Duration) -> Option<Duration> {
        if ran >= STABLE_RUN {
            self.quick_exits = 0;
        }
        self.quick_exits += 1;
        if self.quick_exits > MAX_QUICK_EXITS {
            return None;
        }
        let doublings = (self.quick_exits - 1).min(16);
        Some((RESTART_FIRST * 2u32.pow(doublings)).min(RESTART_MAX))
    }
}

/// SIGTERM to every node (a clean Raft shutdown), then kill whatever is
/// still running after the grace period.
pub async fn stop_nodes(children: &mut [tokio::process::Child]) {
    for child in children.iter_mut() {
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) on a pid we spawned; no memory is involved.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    for child in children.iter_mut() {
        if tokio::time::timeout(STOP_GRACE, child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
}

async fn supervise(dir: &Path, nodes: Vec<DevNode>) -> anyhow::Result<ExitCode> {
    let children = spawn_nodes(dir, &nodes)?;
    let client = dir.join("client.toml");
    println!(
        "auditflow: three-node cluster starting in {}",
        dir.display()
    );
    println!("  node logs:   {}/node{{1,2,3}}.log", dir.display());
    println!("  client conf: {}", client.display());
    for (i, (node, child)) in nodes.iter().zip(&children).enumerate() {
        // The pid, so a node can be killed on its own to watch a failover.
        let pid = child
            .id()
            .map(|p| format!(" (pid {p})"))
            .unwrap_or_default();
        match node.admin {
            Some(a) => println!(
                "  node {}{pid} admin: http://{a}/ (status page; also /metrics /healthz /readyz /status /destinations)",
                i + 1
            ),
            None => println!(
                "  node {}{pid} admin: off (no admin_listen in {})",
                i + 1,
                node.config.display()
            ),
        }
    }
    if nodes.iter().any(|n| n.default_destination) {
        println!(
            "  delivered:   {}/delivered/events-p*.jsonl (destination \"{DEFAULT_DESTINATION}\")",
            dir.display()
        );
    } else {
        println!("  delivered:   nowhere yet (no destination; see `auditflow dest add --help`)");
    }
    println!();
    println!("Append and watch events (in another shell):");
    println!("  export AUDITFLOW_CONFIG={}", client.display());
    println!(
        "  echo '{{\"tenant\":\"acme\",\"time\":\"2026-11-24T12:00:00Z\",\"actor\":{{\"id\":\"alice\",\"type\":\"user\"}},\"action\":\"user.login\",\"target\":{{\"type\":\"app\",\"id\":\"console\"}},\"outcome\":\"success\"}}' | auditflow append"
    );
    println!("  auditflow status");
    println!("  auditflow dest status");
    println!("  auditflow tail --partition 0 --follow");
    println!();
    println!(
        "Ctrl-C stops the cluster; `auditflow up` on the same --dir restarts it with its data."
    );
    println!(
        "A node that exits (or is killed) is reported and restarted; the others keep serving."
    );

    let code = watch_nodes(dir, &nodes, children).await;
    println!("stopped.");
    Ok(code)
}

/// Tells the user that node `i` exited with `status`, `left` nodes still
/// running, and when it restarts (`restart`), or how to start it again by
/// hand if `up` gave up on it.
fn report_exit(
    dir: &Path,
    i: usize,
    node: &DevNode,
    status: &str,
    left: usize,
    restart: Option<Duration>,
) {
    let n = i + 1;
    eprintln!(
        "node {n} exited ({status}); its log: {}/node{n}.log",
        dir.display()
    );
    match restart {
        Some(wait) => eprintln!("  restarting node {n} in {wait:?}"),
        None => eprintln!(
            "  node {n} exited {MAX_QUICK_EXITS} times in a row within {STABLE_RUN:?} of starting: not restarting it"
        ),
    }
    if left > 0 {
        let quorum = NODES as usize / 2 + 1;
        if left >= quorum {
            eprintln!("  the other {left} nodes keep serving (a majority is up).");
        } else {
            eprintln!(
                "  only {left} node is running: no partition has a majority, appends wait until a node is back."
            );
        }
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "auditflow".into());
        if restart.is_none() {
            eprintln!(
                "  to start it again (outside this supervisor): {exe} node --config {}",
                node.config.display()
            );
        }
    }
}

/// A node under `up`'s watch.
enum Slot {
    /// Running since `started`.
    Running {
        child: tokio::process::Child,
        started: std::time::Instant,
    },
    /// Exited; starts again at `at`.
    Waiting { at: std::time::Instant },
    /// Exited too often in a row: left down.
    GaveUp,
}

/// Runs until Ctrl-C (or SIGTERM), then stops the nodes still running.
///
/// A node that exits on its own is reported, and the others keep running,
/// as a real cluster does when it loses a node: that is what lets a
/// developer kill one (`kill -9`) and watch the cluster fail over. `up`
/// then restarts it with exponential backoff ([`Backoff`]), as systemd or
/// Kubernetes would restart a node that fail-stopped, and says so; it
/// gives up on a node that keeps failing at start-up, with the command to
/// start it by hand. Once it has given up on every node, `up` exits with a
/// failure code.
async fn watch_nodes(
    dir: &Path,
    nodes: &[DevNode],
    children: Vec<tokio::process::Child>,
) -> ExitCode {
    let now = std::time::Instant::now();
    let mut slots: Vec<Slot> = children
        .into_iter()
        .map(|child| Slot::Running {
            child,
            started: now,
        })
        .collect();
    let mut backoffs: Vec<Backoff> = nodes.iter().map(|_| Backoff::default()).collect();
    let stop = crate::node::wait_for_stop_signal();
    tokio::pin!(stop);
    let mut poll = tokio::time::interval(EXIT_POLL);
    let code = loop {
        tokio::select! {
            _ = &mut stop => {
                println!("\nstopping the cluster...");
                break ExitCode::SUCCESS;
            }
            _ = poll.tick() => {
                let now = std::time::Instant::now();
                let mut exited = Vec::new();
                for (i, slot) in slots.iter_mut().enumerate() {
                    match slot {
                        Slot::Running { child, started } => {
                            let status = match child.try_wait() {
                                Ok(None) => continue,
                                Ok(Some(status)) => status.to_string(),
                                Err(e) => format!("cannot be watched: {e}"),
                            };
                            let restart = backoffs[i].after_exit(now - *started);
                            *slot = match restart {
                                Some(wait) => Slot::Waiting { at: now + wait },
                                None => Slot::GaveUp,
                            };
                            exited.push((i, status, restart));
                        }
                        Slot::Waiting { at } if *at <= now => {
                            *slot = match spawn_node(dir, i, &nodes[i]) {
                                Ok(child) => {
                                    let pid = child.id().map(|p| format!(" (pid {p})")).unwrap_or_default();
                                    eprintln!("node {} restarted{pid}", i + 1);
                                    Slot::Running { child, started: now }
                                }
                                Err(e) => {
                                    let restart = backoffs[i].after_exit(Duration::ZERO);
                                    eprintln!("node {} cannot be restarted: {e:#}", i + 1);
                                    match restart {
                                        Some(wait) => Slot::Waiting { at: now + wait },
                                        None => Slot::GaveUp,
                                    }
                                }
                            };
                        }
                        Slot::Waiting { .. } | Slot::GaveUp => {}
                    }
                }
                let left = slots.iter().filter(|s| matches!(s, Slot::Running { .. })).count();
                for (i, status, restart) in exited {
                    report_exit(dir, i, &nodes[i], &status, left, restart);
                }
                if slots.iter().all(|s| matches!(s, Slot::GaveUp)) {
                    eprintln!("every node has exited; see their logs.");
                    break ExitCode::FAILURE;
                }
            }
        }
    };
    let mut rest: Vec<tokio::process::Child> = slots
        .into_iter()
        .filter_map(|s| match s {
            Slot::Running { child, .. } => Some(child),
            _ => None,
        })
        .collect();
    stop_nodes(&mut rest).await;
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path, no_default_destination: bool) -> UpArgs {
        UpArgs {
            dir: dir.to_path_buf(),
            base_port: 7101,
            partitions: 8,
            no_default_destination,
        }
    }

    #[test]
    fn a_new_cluster_gets_the_default_destination_unless_asked_not_to() {
        let with = tempfile::tempdir().unwrap();
        let nodes = prepare(&args(with.path(), false), Vec::new()).unwrap();
        assert_eq!(nodes.len(), 3);
        for n in &nodes {
            assert!(n.default_destination);
            let cfg = NodeConfig::load(&n.config).unwrap();
            let names: Vec<&str> = cfg.destinations.iter().map(|d| d.name.as_str()).collect();
            assert_eq!(names, [DEFAULT_DESTINATION]);
        }

        let without = tempfile::tempdir().unwrap();
        let nodes = prepare(&args(without.path(), true), Vec::new()).unwrap();
        for n in &nodes {
            assert!(!n.default_destination);
            assert!(NodeConfig::load(&n.config).unwrap().destinations.is_empty());
        }
        assert!(with.path().join("delivered").is_dir());
        assert!(
            !without.path().join("delivered").exists(),
            "no directory for a destination the cluster does not have"
        );
        // The flag only applies at creation: an existing cluster keeps
        // what it was created with.
        let again = prepare(&args(with.path(), true), Vec::new()).unwrap();
        assert!(again.iter().all(|n| n.default_destination));
    }

    /// Restart waits: doubling over quick exits, capped, reset by a long
    /// run, and none once a node keeps failing at start-up.
    #[test]
    fn restarts_back_off_reset_after_a_long_run_and_give_up() {
        let s = Duration::from_secs;
        let mut b = Backoff::default();
        let quick: Vec<Option<Duration>> = (0..7).map(|_| b.after_exit(s(2))).collect();
        assert_eq!(
            quick,
            [
                Some(s(1)),
                Some(s(2)),
                Some(s(4)),
                Some(s(8)),
                Some(s(16)),
                Some(s(30)),
                None
            ]
        );
        let mut b = Backoff::default();
        assert_eq!(b.after_exit(s(0)), Some(s(1)));
        assert_eq!(b.after_exit(s(5)), Some(s(2)));
        // It had been serving for a while: killed, not failing at start.
        assert_eq!(b.after_exit(STABLE_RUN), Some(s(1)));
        assert_eq!(b.after_exit(s(1)), Some(s(2)));
    }
}
