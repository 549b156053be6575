//! A real PostgreSQL server for tests: initdb into a temp dir, a free
//! loopback port, password (scram) auth, started and stopped on request
//! and on drop. Running as root, the server runs as the `postgres` (or
//! `nobody`) user, because PostgreSQL refuses to run as root.
//! Shared by the sink test and the cluster delivery test (`#[path]`).

#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

/// Superuser made by initdb, and its password (scram auth over TCP).
pub const SUPERUSER: &str = "auditflow";
pub const PASSWORD: &str = "s3cret pass";
/// The database the sink writes to.
pub const DB: &str = "audit";
/// How long a server may take to start or stop on a loaded 2-core machine.
pub const SERVER_DEADLINE: Duration = Duration::from_secs(60);

pub fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("AUDITFLOW_PG_BIN") {
        return PathBuf::from(dir);
    }
    for version in ["15", "16", "17"] {
        let dir = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
        if dir.join("postgres").exists() {
            return dir;
        }
    }
    panic!(
        "PostgreSQL server binaries not found: apt-get install postgresql-15 \
         (ops/apt-packages.txt) or set AUDITFLOW_PG_BIN"
    );
}

/// Looks up a user's uid and gid with `id`.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").arg(flag).arg(name).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// A PostgreSQL server in a temp dir; stopped (and removed) on drop.
pub struct PgServer {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub bin: PathBuf,
    /// uid/gid to run as when we are root.
    pub run_as: Option<(u32, u32)>,
    pub child: Option<Child>,
}

impl PgServer {
    /// initdb on a fresh directory; not started.
    pub fn init() -> PgServer {
        let bin = pg_bin();
        let dir = tempfile::tempdir().expect("temp dir");
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let run_as = if root {
            let ids = user_ids("postgres")
                .or_else(|| user_ids("nobody"))
                .expect("running as root needs a `postgres` or `nobody` user");
            Some(ids)
        } else {
            None
        };
        let pwfile = dir.path().join("pw");
        fs::write(&pwfile, PASSWORD).expect("write pwfile");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown dir");
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).expect("chown pwfile");
        }
        let server = PgServer {
            port: free_port(),
            bin,
            run_as,
            child: None,
            dir,
        };
        let out = server
            .command("initdb")
            .arg("-D")
            .arg(server.data())
            .args(["-U", SUPERUSER, "-E", "UTF8", "--no-locale", "--no-sync"])
            .args(["--auth-host=scram-sha-256", "--auth-local=trust"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        server
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.current_dir(self.dir.path());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// The sink's URL (password with a space: percent-encoded).
    pub fn url(&self, user: &str, password: &str) -> String {
        let password = password.replace(' ', "%20");
        format!("postgres://{user}:{password}@127.0.0.1:{}/{DB}", self.port)
    }

    pub fn admin_url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} password='{PASSWORD}' dbname={db}",
            self.port
        )
    }

    /// Starts the server and waits until it accepts connections; creates
    /// the database the first time.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("open log");
        let log2 = log.try_clone().expect("clone log");
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(self.log(), Some(uid), Some(gid)).expect("chown log");
        }
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            // Test speed: durability of the test server does not matter.
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("spawn postgres");
        self.child = Some(child);
        let deadline = Instant::now() + SERVER_DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("postgres exited with {status}: {}", self.log_text());
                }
            }
            if let Ok((client, conn)) =
                tokio_postgres::connect(&self.admin_url("postgres"), NoTls).await
            {
                let task = tokio::spawn(conn);
                let exists = client
                    .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DB])
                    .await
                    .expect("query pg_database");
                if exists.is_none() {
                    client
                        .batch_execute(&format!("CREATE DATABASE {DB}"))
                        .await
                        .expect("create database");
                }
                drop(client);
                let _ = task.await;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not accept connections: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fast shutdown (SIGINT: sessions are terminated, like an operator's
    /// restart), waiting until the process is gone.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        let deadline = Instant::now() + SERVER_DEADLINE;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
            }
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// An admin connection to the sink's database, or `None` while the
    /// server is down.
    pub async fn admin_try(&self) -> Option<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.admin_url(DB), NoTls)
            .await
            .ok()?;
        tokio::spawn(conn);
        Some(client)
    }

    /// An admin connection to the sink's database.
    pub async fn admin(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.admin_url(DB), NoTls)
            .await
            .expect("admin connect");
        tokio::spawn(conn);
        client
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}
