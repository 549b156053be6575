//! `auditflow`: the one binary. A node of a deployment (`node`), a local
//! three-node dev cluster (`up`), and the client CLI (`append`, `read`,
//! `tail`, `status`, `bench`). Subcommands stay thin: the work lives in the
//! library crates.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod bench_delivery;
mod bench_memory;
mod client_cmds;
mod delivery_cmds;
mod node;
mod sim;
mod up;

/// mimalloc instead of glibc malloc: the node allocates and frees many
/// small buffers per event on several threads (measured in docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A clustered broker for audit logs.
#[derive(Parser, Debug)]
#[command(name = "auditflow", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a local three-node cluster with dev certificates.
    Up(up::UpArgs),
    /// Run one node of a deployment.
    Node(node::NodeArgs),
    /// Create a cluster on its founding node (stopped), before first start.
    Init(node::InitArgs),
    /// Append events read as JSON lines from stdin or a file.
    Append(client_cmds::AppendArgs),
    /// Read stored events of a partition from one node.
    Read(client_cmds::ReadArgs),
    /// Print stored events of a partition, optionally following new ones.
    Tail(client_cmds::TailArgs),
    /// Show nodes, partitions, leaders, terms and indexes.
    Status(client_cmds::StatusArgs),
    /// Load-test a running cluster and print throughput and latency.
    Bench(bench::BenchArgs),
    /// Delivery benchmark: starts its own local cluster, measures delivery
    /// throughput to a file and a webhook and the drain of a backlog.
    BenchDelivery(bench_delivery::DeliveryBenchArgs),
    /// Delivery status of destinations.
    #[command(subcommand)]
    Dest(delivery_cmds::DestCommand),
    /// Dead-letter queues: list, show, redrive.
    #[command(subcommand)]
    Dlq(delivery_cmds::DlqCommand),
    /// Re-deliver stored events to one destination from an offset or time.
    Replay(delivery_cmds::ReplayArgs),
    /// Run the deterministic simulator (one seed, or a sweep).
    Sim(sim::SimArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A simulation restarts thousands of simulated nodes: their info logs
    // would bury the report, and the trace already tells what happened.
    let default_filter = match cli.command {
        Command::Sim(_) => "error",
        _ => "warn,auditflow=info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AUDITFLOW_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a node's log in a file or a
        // journal would otherwise be full of escape codes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Up(a) => up::run(a),
        Command::Node(a) => node::run(a),
        Command::Init(a) => node::init(a),
        Command::Append(a) => client_cmds::append(a),
        Command::Read(a) => client_cmds::read(a),
        Command::Tail(a) => client_cmds::tail(a),
        Command::Status(a) => client_cmds::status(a),
        Command::Bench(a) => bench::run(a),
        Command::BenchDelivery(a) => bench_delivery::run(a),
        Command::Dest(c) => delivery_cmds::dest(c),
        Command::Dlq(c) => delivery_cmds::dlq(c),
        Command::Replay(a) => delivery_cmds::replay(a),
        Command::Sim(a) => sim::run_cmd(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
