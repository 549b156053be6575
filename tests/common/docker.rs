//! A three-node cluster in Docker containers on a private network of its
//! own, so that a test can cut one node off the network and reconnect it,
//! or freeze it (`docker pause`), which loopback processes cannot do.
//!
//! No image can be pulled here, so the image is made from the binary under
//! test and the shared libraries `ldd` names (a fully static glibc binary
//! would break name resolution), imported from a tarball. Everything a
//! cluster creates (image, network, containers) carries one unique name
//! and is removed when it is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use auditflow_broker::config::PeerConfig;
use auditflow_broker::net::tls::ensure_dev_certs;

use super::{node_config, write_client_config, ClusterOptions, BIN};

/// The port every node listens on inside its container.
const PORT: u16 = 7000;

/// One node's container.
pub struct DockerNode {
    /// Node id.
    pub id: u64,
    /// Container name.
    pub container: String,
    /// Its address on the cluster network.
    pub ip: String,
    /// `ip:port`, what peers and clients dial.
    pub addr: String,
}

/// A cluster of three node containers.
pub struct DockerCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<DockerNode>,
    pub partitions: u32,
    image: String,
    network: String,
}

/// Whether a Docker engine answers.
pub fn docker_available() -> bool {
    Command::new("docker")
        .arg("info")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Whether a Docker test can run: `false` (the test returns, skipped)
/// where no Docker engine answers. Under CI (`CI` set) Docker must be
/// there, so its absence fails the test instead of skipping it.
pub fn docker_or_skip() -> bool {
    if docker_available() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI machines have Docker, but `docker info` failed"
    );
    eprintln!("skipped: no Docker engine answers `docker info`");
    false
}

/// Runs `docker args`; its stdout, or its stderr as the error.
fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) -> String {
    docker(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Imports an image holding the binary under test at `/auditflow` and the
/// shared libraries it links, at their own paths.
fn build_image(image: &str, staging: &Path) {
    let root = staging.join("rootfs");
    std::fs::create_dir_all(&root).expect("image staging dir");
    std::fs::copy(BIN, root.join("auditflow")).expect("copy binary");
    let ldd = Command::new("ldd").arg(BIN).output().expect("run ldd");
    let listing = String::from_utf8_lossy(&ldd.stdout).into_owned();
    // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and
    // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no path.
    for lib in listing
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
    {
        let dest = root.join(lib.strip_prefix("/").expect("absolute"));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("lib dir");
        // Copying follows the symlinks the loader paths usually are.
        std::fs::copy(&lib, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", lib.display()));
    }
    let tar = staging.join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .expect("run tar");
    assert!(status.success(), "tar of the image root failed");
    must(&[
        "import",
        "-c",
        "ENTRYPOINT [\"/auditflow\"]",
        tar.to_str().expect("utf-8 path"),
        image,
    ]);
    std::fs::remove_dir_all(&root).ok();
    std::fs::remove_file(&tar).ok();
}

/// Creates a bridge network on a free /24 of 172.30.0.0/16; its prefix
/// ("172.30.N").
fn create_network(name: &str) -> String {
    let start = std::process::id() % 200;
    let mut last = String::new();
    for i in 0..50 {
        let prefix = format!("172.30.{}", (start + i) % 250 + 1);
        let subnet = format!("--subnet={prefix}.0/24");
        match docker(&["network", "create", "--driver", "bridge", &subnet, name]) {
            Ok(_) => return prefix,
            Err(e) => last = e,
        }
    }
    panic!("no free subnet for the test network: {last}");
}

impl DockerCluster {
    /// Builds the image, creates the network, writes certificates and
    /// configs and starts three node containers.
    pub fn start(opts: ClusterOptions) -> DockerCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let tag = format!("auditflow-test-{}", std::process::id());
        // Made before anything is created, so that its drop removes
        // whatever a failure below leaves behind.
        let mut cluster = DockerCluster {
            dir,
            nodes: Vec::new(),
            partitions: opts.partitions,
            image: format!("{tag}:latest"),
            network: tag.clone(),
        };
        build_image(&cluster.image, cluster.dir.path());
        let prefix = create_network(&cluster.network);
        let ids = [1u64, 2, 3];
        ensure_dev_certs(&cluster.dir.path().join("certs"), &ids).expect("dev certs");
        let peers: Vec<PeerConfig> = ids
            .iter()
            .map(|id| PeerConfig {
                id: *id,
                addr: format!("{prefix}.{}:{PORT}", 10 + id),
            })
            .collect();
        let listen = SocketAddr::from(([0, 0, 0, 0], PORT));
        for p in &peers {
            let cfg = node_config(p.id, listen, None, &peers, &opts);
            let path = cluster.dir.path().join(format!("node{}.toml", p.id));
            std::fs::write(&path, toml::to_string(&cfg).expect("toml")).expect("write config");
            cluster.nodes.push(DockerNode {
                id: p.id,
                container: format!("{tag}-node{}", p.id),
                ip: format!("{prefix}.{}", 10 + p.id),
                addr: p.addr.clone(),
            });
        }
        write_client_config(cluster.dir.path(), &peers);
        // Node 1 founds the cluster; its data directory is on the mounted
        // host directory, so `init` runs here, before the containers.
        let init = Command::new(BIN)
            .arg("init")
            .arg("--config")
            .arg(cluster.dir.path().join("node1.toml"))
            .env("AUDITFLOW_LOG", "warn")
            .output()
            .expect("run auditflow init");
        assert!(
            init.status.success(),
            "auditflow init failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let mount = format!("{}:/cluster", cluster.dir.path().display());
        // As the test's own user, so the test can remove a node's data
        // directory (a lost disk) without root.
        // SAFETY: getuid and getgid cannot fail and touch no memory.
        let user = unsafe { format!("{}:{}", libc::getuid(), libc::getgid()) };
        for n in &cluster.nodes {
            let config = format!("/cluster/node{}.toml", n.id);
            must(&[
                "run",
                "-d",
                "--name",
                &n.container,
                "--network",
                &cluster.network,
                "--ip",
                &n.ip,
                "-v",
                &mount,
                "-w",
                "/cluster",
                "--user",
                &user,
                "-e",
                "AUDITFLOW_LOG=warn,auditflow=info",
                &cluster.image,
                "node",
                "--config",
                &config,
            ]);
        }
        cluster
    }

    /// Path of the client config (seeds are the containers' addresses).
    pub fn client_config_path(&self) -> PathBuf {
        self.dir.path().join("client.toml")
    }

    /// A client of the cluster, once one connects (containers take a while
    /// to start).
    pub async fn client(&self) -> auditflow_client::Client {
        use auditflow_client::{Client, ClientConfig};
        let cfg = ClientConfig::load(&self.client_config_path()).expect("client config");
        super::wait_until("client connect", std::time::Duration::from_secs(60), || {
            let cfg = cfg.clone();
            async move { Client::connect(cfg).await.ok() }
        })
        .await
    }

    /// Takes node `i` off the network: its peers and clients can no longer
    /// reach it, nor it them; the process runs on.
    pub fn cut_off(&self, i: usize) {
        must(&[
            "network",
            "disconnect",
            &self.network,
            &self.nodes[i].container,
        ]);
    }

    /// Puts node `i` back on the network at its address.
    pub fn reconnect(&self, i: usize) {
        let n = &self.nodes[i];
        must(&[
            "network",
            "connect",
            "--ip",
            &n.ip,
            &self.network,
            &n.container,
        ]);
    }

    /// Freezes node `i` (cgroup freezer: like SIGSTOP, for every thread).
    pub fn pause(&self, i: usize) {
        must(&["pause", &self.nodes[i].container]);
    }

    /// Thaws node `i`.
    pub fn unpause(&self, i: usize) {
        must(&["unpause", &self.nodes[i].container]);
    }

    /// Kills node `i`'s process with SIGKILL (`kill -9`): no clean
    /// shutdown, the container stops.
    pub fn kill(&self, i: usize) {
        must(&["kill", "--signal", "KILL", &self.nodes[i].container]);
    }

    /// Starts node `i`'s stopped container again, with its data directory
    /// as the kill left it.
    pub fn restart(&self, i: usize) {
        must(&["start", &self.nodes[i].container]);
    }

    /// Empties node `i`'s data directory (a lost or replaced disk); call
    /// it while the node is stopped.
    pub fn wipe(&self, i: usize) {
        let dir = self.dir.path().join(format!("node{}", self.nodes[i].id));
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("remove {}: {e}", dir.display()));
    }

    /// Every node's (id, address), for `verify_acked`.
    pub fn ids_and_addrs(&self) -> Vec<(u64, String)> {
        self.nodes.iter().map(|n| (n.id, n.addr.clone())).collect()
    }

    /// Addresses of every node.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// Prints the end of every node's log (for failing tests).
    pub fn dump_logs(&self) {
        for n in &self.nodes {
            let out = Command::new("docker")
                .args(["logs", "--tail", "60", &n.container])
                .output();
            eprintln!("===== node {} log (last lines) =====", n.id);
            if let Ok(out) = out {
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
                eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }
}

impl Drop for DockerCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for n in &self.nodes {
            // A paused container cannot be removed before it is thawed.
            let _ = docker(&["unpause", &n.container]);
            let _ = docker(&["rm", "-f", &n.container]);
        }
        let _ = docker(&["network", "rm", &self.network]);
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}
