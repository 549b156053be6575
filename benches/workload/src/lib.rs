//! The append workload of `auditflow bench`, generic over the target, so
//! that auditflow and NATS JetStream (the `auditflow-nats-compare` binary)
//! are measured by the same code.
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
//!
//! This crate is its own library, rather than a module of either binary,
//! because the product binary must not link the NATS client: both
//! binaries depend on it, and only `auditflow-nats-compare` depends on
//! async-nats. A cargo feature of one shared crate would not do, as a
//! workspace build unifies features and would link NATS into `auditflow`
//! again.

// Both binaries build on this API: keep every public item explained.
#![warn(missing_docs)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use auditflow_protocol::{canonical, sample, Event};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The workload's parameters: the flags `auditflow bench` and
/// `auditflow-nats-compare` share, so both sides of a comparison are
/// given the same workload by construction.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct WorkloadArgs {
    /// Events to append (after warm-up).
    #[arg(long, default_value_t = 100_000)]
    pub events: usize,
    /// Approximate canonical size of each event in bytes.
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Events in flight.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Distinct tenants (spreads events over partitions).
    #[arg(long, default_value_t = 64)]
    pub tenants: usize,
    /// Open-loop target rate in events per second (default: closed loop).
    #[arg(long)]
    pub rate: Option<u64>,
}

impl WorkloadArgs {
    /// The command-line flags that give another process this workload:
    /// `auditflow bench --compare-nats` passes them to
    /// `auditflow-nats-compare`.
    pub fn to_flags(&self) -> Vec<String> {
        let mut flags = vec![
            format!("--events={}", self.events),
            format!("--size={}", self.size),
            format!("--window={}", self.window),
            format!("--tenants={}", self.tenants),
        ];
        if let Some(rate) = self.rate {
            flags.push(format!("--rate={rate}"));
        }
        flags
    }
}

/// A fresh run name for event ids (the current time in hex milliseconds),
/// so that runs against a long-lived cluster do not collide in its dedup
/// index.
pub fn run_name() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!("{ms:x}")
}

/// Event `n` of a benchmark run: ids are the run's name and a zero-padded
/// sequence number, ordered like the client's UUIDv7 ids (the dedup index
/// takes ordered ids at about half the cost of unordered ones: see
/// `benches/state_machine.rs`).
pub fn make_event(run: &str, n: usize, tenants: usize, size: usize) -> Event {
    sample::sized_event(format!("bench-{run}-{n:012}"), n, tenants, size)
}

/// The benchmark's events (warm-up first, then the measured ones) and the
/// number of warm-up events.
pub fn workload(args: &WorkloadArgs, run: &str) -> (Arc<Vec<Event>>, usize) {
    let warmup = (args.events / 10).clamp(1, 1000);
    let total = warmup + args.events;
    let events = (0..total)
        .map(|n| make_event(run, n, args.tenants, args.size))
        .collect();
    (Arc::new(events), warmup)
}

/// One append (or publish) of event `i`; the workload is generic over it.
pub type Op =
    Arc<dyn Fn(usize) -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// What one run of the workload measured.
pub struct Report {
    /// What was measured.
    pub target: String,
    events: usize,
    errors: usize,
    secs: f64,
    bytes: usize,
    hist: Histogram<u64>,
    /// CPU the cluster's nodes used over the run, when the caller could
    /// read it (`auditflow bench --node-metrics`).
    pub node_cpu: Option<NodeCpu>,
}

/// CPU the nodes used over a run.
pub struct NodeCpu {
    /// Core-seconds, summed over the nodes.
    pub seconds: f64,
    /// Nodes read.
    pub nodes: usize,
    /// Events appended between the two readings (warm-up included).
    pub events: usize,
}

impl NodeCpu {
    /// Node CPU per appended event in microseconds: on a shared machine it
    /// varies less than throughput does.
    pub fn us_per_event(&self) -> f64 {
        self.seconds * 1e6 / self.events.max(1) as f64
    }
}

impl Report {
    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    /// The numbers printed for this run. A summary rather than the
    /// histogram is what crosses from `auditflow-nats-compare` to
    /// `auditflow bench` (as JSON), so both print from it.
    pub fn summary(&self, args: &WorkloadArgs) -> Summary {
        Summary {
            target: self.target.clone(),
            events: self.events,
            errors: self.errors,
            event_bytes: args.size,
            window: args.window,
            elapsed_s: self.secs,
            events_per_s: self.events as f64 / self.secs.max(1e-9),
            mb_per_s: self.bytes as f64 / self.secs / 1e6,
            p50_ms: self.ms(0.5),
            p99_ms: self.ms(0.99),
            p999_ms: self.ms(0.999),
            max_ms: self.hist.max() as f64 / 1000.0,
            node_cpu_s: self.node_cpu.as_ref().map(|c| c.seconds),
            node_cpu_us_per_event: self.node_cpu.as_ref().map(NodeCpu::us_per_event),
            node_cpu_nodes: self.node_cpu.as_ref().map_or(0, |c| c.nodes),
        }
    }
}

/// A run's results as printed, one JSON object of `bench --json`'s array
/// (fields in the order of that object).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Summary {
    /// What was measured.
    pub target: String,
    /// Events acknowledged in the measured range.
    pub events: usize,
    /// Appends (publishes) that failed.
    pub errors: usize,
    /// Approximate canonical size of each event (`--size`).
    pub event_bytes: usize,
    /// Events in flight (`--window`).
    pub window: usize,
    /// Wall time of the measured range.
    pub elapsed_s: f64,
    /// Acknowledged events per second.
    pub events_per_s: f64,
    /// Canonical bytes per second, in MB.
    pub mb_per_s: f64,
    /// Median latency.
    pub p50_ms: f64,
    /// 99th percentile latency.
    pub p99_ms: f64,
    /// 99.9th percentile latency.
    pub p999_ms: f64,
    /// Highest latency.
    pub max_ms: f64,
    /// Core-seconds the nodes used, when read (`--node-metrics`).
    pub node_cpu_s: Option<f64>,
    /// The nodes' CPU per event in microseconds, when read.
    pub node_cpu_us_per_event: Option<f64>,
    /// Nodes whose CPU was read; only for the text output, which has
    /// always printed it while the JSON has not.
    #[serde(skip)]
    pub node_cpu_nodes: usize,
}

impl Summary {
    /// Prints the run as text.
    pub fn print(&self) {
        println!(
            "{}: {} events of ~{} bytes, {} in flight, in {:.2}s ({} errors)",
            self.target, self.events, self.event_bytes, self.window, self.elapsed_s, self.errors
        );
        println!(
            "  throughput: {:.0} events/s, {:.1} MB/s",
            self.events_per_s, self.mb_per_s
        );
        println!(
            "  latency ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            self.p50_ms, self.p99_ms, self.p999_ms, self.max_ms
        );
        if let (Some(seconds), Some(us)) = (self.node_cpu_s, self.node_cpu_us_per_event) {
            println!(
                "  node CPU: {:.2} core-seconds over {} nodes, {:.0} us per event",
                seconds, self.node_cpu_nodes, us
            );
        }
    }
}

/// Prints runs: one JSON array, or each as text followed by the ratios of
/// the first run to each of the others.
pub fn print_all(reports: &[Summary], json: bool) -> serde_json::Result<()> {
    if json {
        let all = reports
            .iter()
            .map(serde_json::to_value)
            .collect::<serde_json::Result<Vec<_>>>()?;
        println!("{}", serde_json::Value::Array(all));
        return Ok(());
    }
    for r in reports {
        r.print();
    }
    if let Some((first, others)) = reports.split_first() {
        for other in others {
            println!(
                "ratio {} / {}: throughput {:.2}x, p50 latency {:.2}x, p99 latency {:.2}x",
                first.target,
                other.target,
                first.events_per_s / other.events_per_s.max(1e-9),
                first.p50_ms / other.p50_ms.max(1e-9),
                first.p99_ms / other.p99_ms.max(1e-9),
            );
        }
    }
    Ok(())
}

/// Runs warm-up then the measured range through `op`.
pub async fn measure(
    target: &str,
    args: &WorkloadArgs,
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        workload: WorkloadArgs,
    }

    /// The flags handed to the comparison binary give back the same
    /// workload, or the two sides would not measure the same thing.
    #[test]
    fn flags_round_trip() {
        for rate in [None, Some(5000)] {
            let w = WorkloadArgs {
                events: 1234,
                size: 300,
                window: 7,
                tenants: 3,
                rate,
            };
            let parsed =
                Cli::try_parse_from(std::iter::once("x".to_string()).chain(w.to_flags())).unwrap();
            assert_eq!(parsed.workload, w);
        }
    }

    /// A summary survives the JSON between the two processes, and its
    /// JSON has the keys `bench --json` has always printed.
    #[test]
    fn summary_json_round_trip() {
        let s = Summary {
            target: "nats-jetstream (sync_interval: always)".into(),
            events: 10,
            errors: 0,
            event_bytes: 512,
            window: 4,
            elapsed_s: 0.123456789,
            events_per_s: 81.00000737,
            mb_per_s: 0.0415,
            p50_ms: 1.234,
            p99_ms: 5.678,
            p999_ms: 9.1,
            max_ms: 10.0,
            node_cpu_s: None,
            node_cpu_us_per_event: None,
            node_cpu_nodes: 0,
        };
        let v = serde_json::to_value(&s).unwrap();
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        let mut expected = vec![
            "target",
            "events",
            "errors",
            "event_bytes",
            "window",
            "elapsed_s",
            "events_per_s",
            "mb_per_s",
            "p50_ms",
            "p99_ms",
            "p999_ms",
            "max_ms",
            "node_cpu_s",
            "node_cpu_us_per_event",
        ];
        let mut got = keys.clone();
        got.sort();
        expected.sort();
        assert_eq!(got, expected);
        let back: Vec<Summary> = serde_json::from_str(&format!("[{v}]")).unwrap();
        assert_eq!(back, vec![s]);
    }
}
