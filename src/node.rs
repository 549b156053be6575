//! `auditflow node --config node.toml`: one node of a deployment.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use auditflow_broker::config::NodeConfig;
use auditflow_broker::node::run_quic_node;

/// Arguments of `auditflow node`.
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// The node's configuration file.
    #[arg(long, env = "AUDITFLOW_NODE_CONFIG")]
    pub config: PathBuf,
    /// Worker threads for networking and Raft (the partition actors run on
    /// the main thread).
    #[arg(long, env = "AUDITFLOW_NODE_THREADS", default_value_t = 2)]
    pub threads: usize,
}

/// Runs the node until SIGINT or SIGTERM, then shuts it down cleanly.
pub fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    let config = NodeConfig::load(&args.config)?;
    let threads = args.threads.max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // actix runs its actors on a LocalSet of this runtime; openraft and
    // quinn tasks run on its worker threads.
    let system = actix_rt::System::with_tokio_rt(move || runtime);
    system.block_on(async move {
        let node = run_quic_node(config).await?;
        wait_for_stop_signal().await;
        tracing::info!("stopping");
        node.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
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
