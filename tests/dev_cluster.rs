//! `auditflow up`, the run command of the README, end to end.
//!
//! The real binary starts its three node processes with dev certificates
//! and the default file destination. An appended event is stored and
//! delivered to `DIR/delivered/`. A node killed with SIGKILL is reported
//! while the other two keep serving (appends go on through the
//! failover), and `up` restarts it, saying so. Ctrl-C stops `up` and every
//! node it started. `up` run again on the same directory serves the same
//! data, and restarts every node when all three are killed at once.

mod common;

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use auditflow_client::{Client, ClientConfig};
use auditflow_protocol::partition::partition_for;
use common::{event, signal, wait_until, BIN};

/// A base port for `up`: its nodes take the UDP ports `base..base+3` and
/// their admin servers the TCP ports `base+100..base+103`, so all six must
/// be free. Chosen at random below Linux's ephemeral range (32768 and up,
/// where other tests' connections take ports at any moment) and checked
/// by binding (good enough for tests, like `common::free_port`).
fn free_base_port() -> u16 {
    for _ in 0..200 {
        let base = 20_000 + rand::random::<u16>() % 12_000;
        let udp_free = (0..3).all(|i| UdpSocket::bind(("127.0.0.1", base + i)).is_ok());
        let tcp_free = (0..3).all(|i| TcpListener::bind(("127.0.0.1", base + 100 + i)).is_ok());
        if udp_free && tcp_free {
            return base;
        }
    }
    panic!("no free base port for up");
}

/// `auditflow up` running on `dir`; killed with its nodes when dropped.
struct Up {
    child: Child,
    dir: PathBuf,
    out: PathBuf,
}

impl Up {
    fn start(dir: &Path, base_port: u16, run: usize) -> Up {
        std::fs::create_dir_all(dir).expect("create the cluster directory");
        let out = dir.join(format!("up-{run}.out"));
        let file = std::fs::File::create(&out).expect("create up output");
        let child = Command::new(BIN)
            .args(["up", "--dir"])
            .arg(dir)
            .args(["--base-port", &base_port.to_string()])
            .env("AUDITFLOW_LOG", "warn")
            .stdout(file.try_clone().expect("clone output file"))
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .expect("start auditflow up");
        Up {
            child,
            dir: dir.to_path_buf(),
            out,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits up to `deadline` for `up` to exit.
    fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        common::wait_exit(&mut self.child, deadline)
            .unwrap_or_else(|| panic!("up still running after {deadline:?}:\n{}", self.output()))
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in node_pids(&self.dir) {
            signal(pid, libc::SIGKILL);
        }
    }
}

/// Pids of the `auditflow node` processes whose config is in `dir`,
/// indexed by node number (1-based) through the config's file name.
fn node_pid(dir: &Path, node: u32) -> Option<u32> {
    let config = dir.join(format!("node{node}.toml"));
    let config = config.to_string_lossy();
    processes().into_iter().find_map(|(pid, args)| {
        (args.iter().any(|a| a == "node") && args.iter().any(|a| *a == config)).then_some(pid)
    })
}

fn node_pids(dir: &Path) -> Vec<u32> {
    (1..=3).filter_map(|n| node_pid(dir, n)).collect()
}

/// Every process's pid and arguments (Linux `/proc`).
fn processes() -> Vec<(u32, Vec<String>)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some((pid, args))
        })
        .collect()
}

async fn connect(dir: &Path) -> Client {
    let path = dir.join("client.toml");
    wait_until("client.toml written", Duration::from_secs(60), || async {
        path.exists().then_some(())
    })
    .await;
    let cfg = ClientConfig::load(&path).expect("client config");
    wait_until("client connect", Duration::from_secs(60), || {
        let cfg = cfg.clone();
        async move { Client::connect(cfg).await.ok() }
    })
    .await
}

/// Waits until event `id` of `partition` is readable at `offset`.
async fn wait_readable(client: &Client, partition: u32, offset: u64, id: &str) {
    wait_until(
        &format!("event {id} readable"),
        Duration::from_secs(30),
        || async {
            let page = client.read(partition, offset, 1).await.ok()?;
            page.events.first().filter(|e| e.event.id == id).map(|_| ())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_a_cluster_that_survives_a_killed_node_and_restarts_with_its_data() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("cluster");
    let base_port = free_base_port();

    // 1. up: a cluster with the default destination.
    let mut up = Up::start(&dir, base_port, 1);
    let client = connect(&dir).await;
    let first = client
        .append(event("dev-first", "acme", 1))
        .await
        .expect("append to the dev cluster");
    wait_readable(&client, first.partition, first.offset, "dev-first").await;
    let delivered = dir
        .join("delivered")
        .join(format!("events-p{}.jsonl", first.partition));
    wait_until(
        "the event delivered to the default file destination",
        Duration::from_secs(60),
        || async {
            let text = std::fs::read_to_string(&delivered).ok()?;
            text.contains("\"dev-first\"").then_some(())
        },
    )
    .await;
    // bench reads the nodes' CPU from their /metrics (the admin ports are
    // the base port + 100 and the next two).
    let admin: Vec<String> = (0..3)
        .map(|i| format!("127.0.0.1:{}", base_port + 100 + i))
        .collect();
    let bench = Command::new(BIN)
        .args(["bench", "--events", "300", "--window", "8", "--config"])
        .arg(dir.join("client.toml"))
        .args(["--node-metrics", &admin.join(",")])
        .env("AUDITFLOW_LOG", "warn")
        .output()
        .expect("run bench");
    let out = String::from_utf8_lossy(&bench.stdout);
    assert!(
        bench.status.success(),
        "bench: {out}{}",
        String::from_utf8_lossy(&bench.stderr)
    );
    let per_event: f64 = out
        .lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("node CPU: ")?;
            rest.split(", ")
                .nth(1)?
                .strip_suffix(" us per event")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no node CPU line in bench output:\n{out}"));
    assert!(per_event > 0.0, "nodes used CPU for the events:\n{out}");
    // An address that is not a node's admin server is a clear error.
    let wrong = Command::new(BIN)
        .args(["bench", "--events", "10", "--config"])
        .arg(dir.join("client.toml"))
        .args(["--node-metrics", &format!("127.0.0.1:{}", base_port)])
        .env("AUDITFLOW_LOG", "warn")
        .output()
        .expect("run bench");
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success());
    assert!(err.contains("cannot read node metrics"), "stderr: {err}");

    let banner = up.output();
    assert!(banner.contains("client conf:"), "banner:\n{banner}");
    assert_eq!(node_pids(&dir).len(), 3, "up started three nodes");

    // 2. A node killed on its own: reported, the others keep serving.
    // The next event goes to a partition node 2 leads, so it needs a
    // failover (leaders are spread over the nodes at start).
    // The founder (node 1) leads every partition at first; the leader
    // rebalancing spreads them within seconds.
    let meta = wait_until(
        "leaders of every partition, node 2 among them",
        Duration::from_secs(60),
        || async {
            let meta = client.metadata().await.ok()?;
            (meta.leaders.iter().all(Option::is_some) && meta.leaders.contains(&Some(2)))
                .then_some(meta)
        },
    )
    .await;
    let led_by_2 = meta
        .leaders
        .iter()
        .position(|l| *l == Some(2))
        .expect("node 2 leads a partition") as u32;
    let tenant = (0..)
        .map(|n| format!("tenant-{n}"))
        .find(|t| partition_for(t, None, meta.partition_count) == led_by_2)
        .expect("a tenant of that partition");
    let victim = node_pid(&dir, 2).expect("node 2 running");
    signal(victim, libc::SIGKILL);
    // Both lines: up writes them one after the other, and the file may
    // be read between the two.
    let report = wait_until(
        "up reports node 2's exit and its restart",
        Duration::from_secs(30),
        || async {
            let out = up.output();
            (out.contains("node 2 exited") && out.contains("restarting node 2 in")).then_some(out)
        },
    )
    .await;
    assert!(
        up.child.try_wait().expect("wait").is_none(),
        "up keeps running after losing one node:\n{report}"
    );
    // The client retries through the failover of node 2's partition.
    let second = client
        .append(event("dev-second", &tenant, 2))
        .await
        .expect("append with one node down");
    assert_eq!(second.partition, led_by_2);
    wait_readable(&client, second.partition, second.offset, "dev-second").await;
    // up starts node 2 again (after a second's backoff) and says so.
    wait_until("node 2 restarted", Duration::from_secs(30), || async {
        let back = node_pid(&dir, 2).is_some_and(|pid| pid != victim);
        (back && up.output().contains("node 2 restarted")).then_some(())
    })
    .await;

    // 3. Ctrl-C stops up and the two nodes it still runs.
    signal(up.child.id(), libc::SIGINT);
    let status = up.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "up after Ctrl-C: {status}\n{}",
        up.output()
    );
    assert!(
        node_pids(&dir).is_empty(),
        "no node outlives up:\n{}",
        up.output()
    );
    drop(client);

    // 4. up again on the same directory: the same cluster, with its data.
    let mut up = Up::start(&dir, base_port, 2);
    let client = connect(&dir).await;
    wait_readable(&client, first.partition, first.offset, "dev-first").await;
    wait_readable(&client, second.partition, second.offset, "dev-second").await;
    let again = client
        .append(event("dev-first", "acme", 1))
        .await
        .expect("re-append after restart");
    assert_eq!(
        (again.partition, again.offset),
        (first.partition, first.offset),
        "the restarted cluster still knows the first event's id"
    );
    drop(client);

    // 5. Every node killed at once: up restarts all three, and the
    // cluster serves its data again.
    let before = wait_until("three nodes running", Duration::from_secs(30), || async {
        let pids = node_pids(&dir);
        (pids.len() == 3).then_some(pids)
    })
    .await;
    for pid in &before {
        signal(*pid, libc::SIGKILL);
    }
    // up says so just after it started each (a new process may show in
    // /proc before the line is written).
    wait_until("three nodes restarted", Duration::from_secs(60), || async {
        let pids = node_pids(&dir);
        let out = up.output();
        let said = (1..=3).all(|n| out.contains(&format!("node {n} restarted")));
        (said && pids.len() == 3 && pids.iter().all(|p| !before.contains(p))).then_some(())
    })
    .await;
    let client = connect(&dir).await;
    wait_readable(&client, first.partition, first.offset, "dev-first").await;
    drop(client);
    signal(up.child.id(), libc::SIGINT);
    let status = up.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "up after Ctrl-C: {status}\n{}",
        up.output()
    );
}
