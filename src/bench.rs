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
use auditflow_protocol::{canonical, Actor, Event, JsonObject, Outcome, Target, Timestamp};
use hdrhistogram::Histogram;

use crate::client_cmds::ConfigArg;

/// Arguments of `auditflow bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Events to append (after warm-up).
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Approximate canonical size of each event in bytes.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Events in flight.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Distinct tenants (spreads events over partitions).
    #[arg(long, default_value_t = 64)]
    tenants: usize,
    /// Open-loop target rate in events per second (default: closed loop).
    #[arg(long)]
    rate: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) fn make_event(run: &str, n: usize, tenants: usize, size: usize) -> Event {
    let mut e = Event {
        id: format!("bench-{run}-{n}"),
        tenant: format!("tenant-{}", n % tenants.max(1)),
        time: Timestamp(1_764_000_000_000_000_000 + n as i64),
        actor: Actor {
            id: format!("user-{}", n % 1000),
            kind: "user".into(),
            name: None,
            ip: Some("10.1.2.3".into()),
        },
        action: "document.read".into(),
        target: Target {
            kind: "document".into(),
            id: format!("doc-{n}"),
        },
        outcome: Outcome::Success,
        source: None,
        context: Default::default(),
        data: None,
        schema_version: None,
        partition_key: None,
    };
    let base = canonical::encode_event(&e).len();
    let pad = size.saturating_sub(base + 16);
    if pad > 0 {
        let v = serde_json::json!({ "pad": "x".repeat(pad) });
        e.data = JsonObject::from_value(&v).ok();
    }
    e
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

async fn bench(args: BenchArgs, cfg: auditflow_client::ClientConfig) -> anyhow::Result<ExitCode> {
    let client = Client::connect(cfg).await?;
    let run = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let warmup = (args.events / 10).clamp(1, 1000);
    let total = warmup + args.events;
    let events: Arc<Vec<Event>> = Arc::new(
        (0..total)
            .map(|n| make_event(&run, n, args.tenants, args.size))
            .collect(),
    );
    let bytes: usize = events[warmup..]
        .iter()
        .map(|e| canonical::encode_event(e).len())
        .sum();

    // Warm-up: connections, leaders, and the expected service time.
    let mut warm = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let warm_results = drive(&client, &events, 0..warmup, args.window, None).await;
    for r in &warm_results.latencies_us {
        warm.record(*r).ok();
    }
    let expected_us = warm.value_at_quantile(0.5).max(1);

    let started = Instant::now();
    let results = drive(&client, &events, warmup..total, args.window, args.rate).await;
    let elapsed = started.elapsed();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for v in &results.latencies_us {
        if args.rate.is_some() {
            hist.record(*v).ok();
        } else {
            hist.record_correct(*v, expected_us).ok();
        }
    }
    let n = results.latencies_us.len();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    if args.json {
        let v = serde_json::json!({
            "events": n, "errors": results.errors, "event_bytes": args.size,
            "window": args.window, "elapsed_s": secs,
            "events_per_s": n as f64 / secs, "mb_per_s": bytes as f64 / secs / 1e6,
            "p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999),
            "max_ms": hist.max() as f64 / 1000.0,
        });
        println!("{v}");
    } else {
        println!(
            "appended {n} events of ~{} bytes, {} in flight, in {secs:.2}s ({} errors)",
            args.size, args.window, results.errors
        );
        println!(
            "throughput: {:.0} events/s, {:.1} MB/s",
            n as f64 / secs,
            bytes as f64 / secs / 1e6
        );
        println!(
            "latency ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            ms(0.5),
            ms(0.99),
            ms(0.999),
            hist.max() as f64 / 1000.0
        );
    }
    Ok(if results.errors > 0 {
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
    client: &Client,
    events: &Arc<Vec<Event>>,
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
        let client = client.clone();
        let events = Arc::clone(events);
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
                match client.append(events[i].clone()).await {
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
