//! `auditflow node --config node.toml`: one node of a deployment.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use auditflow_broker::config::NodeConfig;
use auditflow_broker::daemon::run_quic_node;

/// Arguments of `auditflow node`.
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// The node's configuration file.
    #[arg(long, env = "AUDITFLOW_NODE_CONFIG")]
    pub config: PathBuf,
    /// Threads of the async runtime (networking, Raft, actors). With 1,
    /// everything async runs on the main thread, which saves the cross-thread
    /// wake-ups where several nodes share few cores (`up` starts its nodes
    /// so); with more, networking and Raft run on that many worker threads
    /// and the actors on the main thread. The storage writers have threads
    /// of their own either way.
    #[arg(long, env = "AUDITFLOW_NODE_THREADS", default_value_t = 2)]
    pub threads: usize,
}

/// Arguments of `auditflow init`.
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// The configuration of the node that founds the cluster (stopped).
    #[arg(long, env = "AUDITFLOW_NODE_CONFIG")]
    pub config: PathBuf,
}

/// Creates a cluster in the founding node's data directory: a new cluster
/// id, this node's id and the cluster-wide settings (partitions, dedup
/// window) from its configuration. Run once, on one node, before the
/// nodes first start; the others join it.
pub fn init(args: InitArgs) -> anyhow::Result<ExitCode> {
    let config = NodeConfig::load(&args.config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let identity = runtime.block_on(auditflow_broker::daemon::init_cluster(&config))?;
    println!(
        "cluster {} initialised: node {} founds it with {} partitions and a dedup window of {}.",
        identity.cluster,
        identity.node,
        identity.settings.partitions,
        identity.settings.dedup_window
    );
    println!(
        "Start every node with `auditflow node --config <its node.toml>`; the others join this one."
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs the node until SIGINT or SIGTERM, then shuts it down cleanly; or
/// until it must fail-stop (its storage halted, a Raft core stopped),
/// then exits at once with a non-zero code and a message naming the
/// cause, so that systemd, Kubernetes or `auditflow up` restart it.
pub fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    no_transparent_huge_pages();
    let config = NodeConfig::load(&args.config)?;
    let mut builder = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut multi = tokio::runtime::Builder::new_multi_thread();
        multi.worker_threads(args.threads);
        multi
    };
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // actix runs its actors on a LocalSet of this runtime; openraft and
    // quinn tasks run on its worker threads (or beside the actors, on the
    // main thread, when there are none).
    let system = actix_rt::System::with_tokio_rt(move || runtime);
    system.block_on(async move {
        let node = run_quic_node(config).await?;
        tokio::select! {
            _ = wait_for_stop_signal() => {}
            failure = node.failed() => {
                let code = failure.exit_code();
                tracing::error!("fail-stop: {failure}; exiting with code {code}");
                eprintln!("auditflow node: fail-stop: {failure}");
                // At once: a clean stop needs the writes that just failed,
                // and what the disk holds is replayed at the next start.
                std::process::exit(i32::from(code));
            }
        }
        tracing::info!("stopping");
        node.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// Turns transparent huge pages off for this process, unless
/// `MIMALLOC_ALLOW_THP` says otherwise. mimalloc asks for huge pages, so
/// each first touch of freed-and-returned heap memory had the kernel clear
/// 2 MiB: 7 % of a node's runtime thread at W=256. Without them node CPU
/// per event was lower in six of seven alternating pairs of benchmark runs
/// (docs/performance.md).
fn no_transparent_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    // SAFETY: prctl(2) with PR_SET_THP_DISABLE only sets a flag of this
    // process's memory map; no memory of ours is passed.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::debug!(
            "cannot turn transparent huge pages off: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
