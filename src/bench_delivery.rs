//! `auditflow bench-delivery`: delivery throughput and backlog drain on a
//! local three-node cluster that the benchmark starts itself.
//!
//! Two destinations: the JSON lines file sink and a webhook (array mode) to
//! an HTTP receiver inside this process that counts events and can answer
//! 503 to simulate an outage.
//!
//! 1. Live: `--events` are appended with every destination up; reported
//!    per destination is the time from the first append until its lag is
//!    zero everywhere, and the resulting rate.
//! 2. Backlog: the receiver goes down, `--backlog` events are appended
//!    (the file destination keeps flowing), then the receiver comes back;
//!    reported is the time until the webhook's lag is zero again: the
//!    drain time of the backlog. Node memory before and after the backlog
//!    built shows that it is not held in memory.
//!
//! With `--fail-percent 1,5,20` it runs the flaky phase instead (issue
//! 33): one webhook destination with default settings (single mode, one
//! POST per event, default retry and breaker policy) to a receiver that
//! answers 503 to the given share of requests at random. For each share,
//! and for a fault-free run (0 %) in the same cluster, `--flaky-events`
//! are appended; reported are the delivered throughput (events over the
//! time from the first append until the lag is zero on every partition),
//! its ratio to the fault-free run, and the time from the last
//! acknowledged append until the lag is zero. `--rounds` repeats the
//! shares in alternating order and reports medians.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use auditflow_broker::delivery::DestinationConfig;
use auditflow_broker::partition::rebalance::preferred_leader;
use auditflow_client::Client;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;

use crate::up::{self, UpArgs};
use auditflow_bench_workload::make_event;

/// Events per append batch while filling the cluster.
const APPEND_BATCH: usize = 256;
/// Append batches in flight.
const APPEND_WINDOW: usize = 8;
/// How often lag is sampled.
const POLL: Duration = Duration::from_millis(100);

/// Arguments of `auditflow bench-delivery`.
#[derive(clap::Args, Debug)]
pub struct DeliveryBenchArgs {
    /// Events of the live phase.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Events of the backlog phase (built while the webhook is down).
    #[arg(long, default_value_t = 1_000_000)]
    backlog: usize,
    /// Approximate canonical size of each event in bytes.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Distinct tenants (spreads events over partitions).
    #[arg(long, default_value_t = 64)]
    tenants: usize,
    /// Webhook batch size (events per POST).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Directory of the benchmark cluster (default: a new one under the
    /// system temp dir, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// UDP port of node 1 (admin HTTP on +100).
    #[arg(long, default_value_t = 7501)]
    base_port: u16,
    /// Flaky phase instead of live and backlog: shares (percent, comma
    /// separated) of webhook requests answered 503 at random.
    #[arg(long, value_delimiter = ',')]
    fail_percent: Vec<u32>,
    /// Events appended per share in the flaky phase.
    #[arg(long, default_value_t = 10_000)]
    flaky_events: usize,
    /// Rounds of the flaky phase (medians are reported).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

/// Runs the benchmark.
pub fn run(args: DeliveryBenchArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(bench(args))
}

/// The in-process webhook receiver.
#[derive(Default)]
struct Receiver {
    events: AtomicU64,
    down: AtomicBool,
    /// Share of requests (percent) answered 503 at random.
    fail_percent: AtomicU32,
    /// Requests answered 503 at random (flaky phase).
    refused: AtomicU64,
}

async fn hook(State(r): State<Arc<Receiver>>, body: axum::body::Bytes) -> StatusCode {
    if r.down.load(Ordering::Relaxed) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let fail = r.fail_percent.load(Ordering::Relaxed);
    if fail > 0 && rand::random::<u32>() % 100 < fail {
        r.refused.fetch_add(1, Ordering::Relaxed);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    // An array (array mode) or one event (single mode).
    let events = match serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(&body) {
        Ok(events) => events.len(),
        Err(_) if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok() => 1,
        Err(_) => return StatusCode::BAD_REQUEST,
    };
    r.events.fetch_add(events as u64, Ordering::Relaxed);
    StatusCode::OK
}

async fn bench(args: DeliveryBenchArgs) -> anyhow::Result<ExitCode> {
    let receiver = Arc::new(Receiver::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook_addr = listener.local_addr()?;
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(Arc::clone(&receiver));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let (dir, remove_dir) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("auditflow-bench-delivery-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let settings = if args.fail_percent.is_empty() {
        serde_json::json!({
            "name": "bench-hook",
            "sink": { "kind": "webhook", "url": format!("http://{hook_addr}/hook"), "batch_mode": "array" },
            "batch_size": args.batch,
            "linger_ms": 20,
            "retry": { "initial_ms": 100, "max_ms": 1000 },
        })
    } else {
        // The new user: default settings, single mode.
        serde_json::json!({
            "name": "bench-hook",
            "sink": { "kind": "webhook", "url": format!("http://{hook_addr}/hook") },
        })
    };
    let webhook: DestinationConfig =
        serde_json::from_value(settings).context("webhook destination")?;
    let up_args = UpArgs {
        dir: dir.clone(),
        base_port: args.base_port,
        partitions: auditflow_broker::config::DEFAULT_PARTITIONS,
        no_default_destination: false,
    };
    let nodes = up::prepare(&up_args, vec![webhook])?;
    let mut children = up::spawn_nodes(&dir, &nodes)?;
    let result = if args.fail_percent.is_empty() {
        phases(&args, &dir, &receiver, &children).await
    } else {
        flaky_phases(&args, &dir, &receiver).await
    };
    up::stop_nodes(&mut children).await;
    if remove_dir {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// Connects to the cluster in `dir` with room for the benchmark's
/// appends in flight, once its leaders have settled.
async fn connect(dir: &std::path::Path) -> anyhow::Result<Client> {
    let mut cfg = auditflow_client::ClientConfig::load(&dir.join("client.toml"))?;
    cfg.max_in_flight = cfg.max_in_flight.max(APPEND_BATCH * APPEND_WINDOW);
    let client = Client::connect(cfg).await?;
    wait_for_leaders(&client).await?;
    Ok(client)
}

async fn phases(
    args: &DeliveryBenchArgs,
    dir: &std::path::Path,
    receiver: &Receiver,
    children: &[tokio::process::Child],
) -> anyhow::Result<ExitCode> {
    let client = connect(dir).await?;
    let run = format!("{:x}", std::process::id());

    // Live phase.
    println!(
        "live: appending {} events of ~{} bytes with both destinations up",
        args.events, args.size
    );
    let started = Instant::now();
    let appended = append(&client, &run, 0..args.events, args).await?;
    let append_s = started.elapsed().as_secs_f64();
    let caught_up =
        wait_caught_up(&client, &[up::DEFAULT_DESTINATION, "bench-hook"], started).await?;
    println!(
        "  appended in {append_s:.1}s ({:.0} events/s)",
        appended as f64 / append_s
    );
    for (dest, t) in &caught_up {
        println!(
            "  {dest:<11} delivered all {} in {t:.1}s from the first append: {:.0} events/s",
            args.events,
            args.events as f64 / t
        );
    }

    // Backlog phase.
    receiver.down.store(true, Ordering::Relaxed);
    let rss_before = rss_kib(children);
    println!(
        "backlog: webhook down (503), appending {} events",
        args.backlog
    );
    let started = Instant::now();
    let from = args.events;
    append(&client, &run, from..from + args.backlog, args).await?;
    let append_s = started.elapsed().as_secs_f64();
    println!(
        "  appended in {append_s:.1}s ({:.0} events/s)",
        args.backlog as f64 / append_s
    );
    let file = wait_caught_up(&client, &[up::DEFAULT_DESTINATION], started).await?;
    for (dest, t) in &file {
        println!("  {dest:<11} kept flowing: caught up {t:.1}s after the backlog began");
    }
    let rss_after = rss_kib(children);
    println!("  node RSS KiB before {rss_before:?}, with the backlog {rss_after:?}");
    let delivered_before = receiver.events.load(Ordering::Relaxed);
    receiver.down.store(false, Ordering::Relaxed);
    let back = Instant::now();
    let drained = wait_caught_up(&client, &["bench-hook"], back).await?;
    let received = receiver.events.load(Ordering::Relaxed) - delivered_before;
    for (dest, t) in &drained {
        println!(
            "  {dest:<11} drained the {} event backlog in {t:.1}s after it came back: {:.0} events/s ({received} events received)",
            args.backlog,
            args.backlog as f64 / t
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One share's measurements in the flaky phase.
#[derive(Clone, Copy, Debug)]
struct FlakyRun {
    /// Delivered events per second, first append to zero lag.
    rate: f64,
    /// Seconds from the last acknowledged append to zero lag.
    lag_to_zero_s: f64,
}

/// The flaky phase: see the module doc.
async fn flaky_phases(
    args: &DeliveryBenchArgs,
    dir: &std::path::Path,
    receiver: &Receiver,
) -> anyhow::Result<ExitCode> {
    let client = connect(dir).await?;
    let run = format!("{:x}", std::process::id());
    let mut shares = vec![0u32];
    shares.extend(
        args.fail_percent
            .iter()
            .copied()
            .filter(|p| *p > 0 && *p <= 100),
    );
    println!(
        "flaky: webhook (single mode, default policy) answering 503 to {shares:?} % of requests, {} events each, {} round(s)",
        args.flaky_events, args.rounds
    );
    // Warm-up, fault-free and not measured: the first appends and
    // deliveries of a new cluster (connections, the receiver's first
    // requests, caches) made whichever share ran first look slow.
    let warmup = args.flaky_events.clamp(1, 2_000);
    let started = Instant::now();
    append(&client, &run, 0..warmup, args).await?;
    wait_caught_up(&client, &["bench-hook"], started).await?;
    println!(
        "  warm-up: {warmup} events delivered in {:.1}s (not counted)",
        started.elapsed().as_secs_f64()
    );
    let mut runs: BTreeMap<u32, Vec<FlakyRun>> = BTreeMap::new();
    let mut next = warmup;
    for round in 0..args.rounds.max(1) {
        // Alternate the order, so drift (a warming cache, a growing log)
        // does not favour one share.
        let order: Vec<u32> = if round % 2 == 0 {
            shares.clone()
        } else {
            shares.iter().rev().copied().collect()
        };
        for pct in order {
            receiver.fail_percent.store(pct, Ordering::Relaxed);
            let received_before = receiver.events.load(Ordering::Relaxed);
            let refused_before = receiver.refused.load(Ordering::Relaxed);
            let waits_before = hook_waits(&client).await;
            let started = Instant::now();
            append(&client, &run, next..next + args.flaky_events, args).await?;
            let appended_s = started.elapsed().as_secs_f64();
            next += args.flaky_events;
            let caught_up = wait_caught_up(&client, &["bench-hook"], started).await?;
            let t = caught_up.get("bench-hook").copied().unwrap_or(f64::NAN);
            let r = FlakyRun {
                rate: args.flaky_events as f64 / t,
                lag_to_zero_s: (t - appended_s).max(0.0),
            };
            let received = receiver.events.load(Ordering::Relaxed) - received_before;
            let refused = receiver.refused.load(Ordering::Relaxed) - refused_before;
            let waits = hook_waits(&client).await;
            println!(
                "  round {round} {pct:>3} %: {:.0} events/s delivered, lag zero {:.2}s after the appends ({:.2}s appending, {received} events received, {refused} requests refused; leaders' retries {}, backoff wait {} ms, breaker wait {} ms)",
                r.rate,
                r.lag_to_zero_s,
                appended_s,
                waits.0.saturating_sub(waits_before.0),
                waits.1.saturating_sub(waits_before.1),
                waits.2.saturating_sub(waits_before.2),
            );
            runs.entry(pct).or_default().push(r);
        }
    }
    receiver.fail_percent.store(0, Ordering::Relaxed);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let base = median(
        runs.get(&0)
            .map_or(Vec::new(), |r| r.iter().map(|r| r.rate).collect()),
    );
    println!("  medians:");
    for (pct, rs) in &runs {
        let rate = median(rs.iter().map(|r| r.rate).collect());
        let lag = median(rs.iter().map(|r| r.lag_to_zero_s).collect());
        println!(
            "  {pct:>3} %: {rate:.0} events/s, ratio {:.2} to fault-free, lag zero {lag:.2}s after the appends",
            rate / base
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The webhook's retries, backoff wait (ms) and open-breaker wait (ms),
/// summed over the partitions' leaders (each counts since it took over).
async fn hook_waits(client: &Client) -> (u64, u64, u64) {
    let mut sum = (0, 0, 0);
    for (_, statuses) in client.dest_status_all().await {
        for s in statuses.unwrap_or_default() {
            if s.dest == "bench-hook" {
                sum.0 += s.retries;
                sum.1 += s.backoff_wait_ms;
                sum.2 += s.breaker_wait_ms;
            }
        }
    }
    sum
}

/// Waits until every partition has a leader, and then until each is led
/// by its preferred node. A new cluster starts with node 1 leading every
/// partition and hands them to their preferred nodes in rebalance rounds
/// some seconds later (`partition::rebalance`): a run measured before
/// that had all delivery on one node and its leadership moving in the
/// middle of the next run. If the leaders have not settled in 60 s the
/// benchmark goes on and says so.
async fn wait_for_leaders(client: &Client) -> anyhow::Result<()> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    loop {
        if let Ok(meta) = client.metadata().await {
            if meta.leaders.iter().all(Option::is_some) {
                break;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the cluster elected no leaders in 60 s"
        );
        tokio::time::sleep(POLL).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(meta) = client.metadata().await {
            let ids: Vec<u64> = meta.nodes.iter().map(|n| n.id).collect();
            let settled = meta.leaders.iter().enumerate().all(|(p, leader)| {
                let p = u32::try_from(p).unwrap_or(u32::MAX);
                leader.is_some() && *leader == preferred_leader(p, &ids)
            });
            if settled {
                println!(
                    "leaders on their preferred nodes {:.1}s after start",
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            if Instant::now() >= deadline {
                println!(
                    "warning: leaders not on their preferred nodes after 60 s ({:?}); measuring anyway",
                    meta.leaders
                );
                return Ok(());
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Appends `range` of the benchmark's events in batches; returns how many
/// were stored.
async fn append(
    client: &Client,
    run: &str,
    range: std::ops::Range<usize>,
    args: &DeliveryBenchArgs,
) -> anyhow::Result<usize> {
    let next = Arc::new(AtomicUsize::new(range.start));
    let stored = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..APPEND_WINDOW {
        let client = client.clone();
        let next = Arc::clone(&next);
        let stored = Arc::clone(&stored);
        let run = run.to_string();
        let (end, tenants, size) = (range.end, args.tenants, args.size);
        workers.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(APPEND_BATCH, Ordering::Relaxed);
                if first >= end {
                    return Ok::<(), anyhow::Error>(());
                }
                let batch: Vec<_> = (first..(first + APPEND_BATCH).min(end))
                    .map(|n| make_event(&run, n, tenants, size))
                    .collect();
                let results = client.append_batch(batch).await?;
                let ok = results.iter().filter(|r| r.is_ok()).count();
                anyhow::ensure!(ok == results.len(), "{} events refused", results.len() - ok);
                stored.fetch_add(ok, Ordering::Relaxed);
            }
        }));
    }
    for w in workers {
        w.await.context("append worker")??;
    }
    Ok(stored.load(Ordering::Relaxed))
}

/// Polls delivery status until each of `dests` has no lag on any
/// partition; returns seconds since `since` at which each got there.
async fn wait_caught_up(
    client: &Client,
    dests: &[&str],
    since: Instant,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut done = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(3600);
    while done.len() < dests.len() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "delivery did not catch up within an hour"
        );
        let mut lag: BTreeMap<&str, (u64, usize)> = BTreeMap::new();
        for (_, statuses) in client.dest_status_all().await {
            for s in statuses.unwrap_or_default() {
                if let Some(d) = dests.iter().find(|d| **d == s.dest) {
                    let e = lag.entry(d).or_default();
                    e.0 += s.lag_events;
                    e.1 += 1;
                }
            }
        }
        let partitions = auditflow_broker::config::DEFAULT_PARTITIONS as usize;
        for d in dests {
            if done.contains_key(*d) {
                continue;
            }
            // Every partition reported (by its leader) and none lags.
            if let Some((0, n)) = lag.get(d) {
                if *n >= partitions {
                    done.insert(d.to_string(), since.elapsed().as_secs_f64());
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(done)
}

/// Resident memory of each node process, KiB.
fn rss_kib(children: &[tokio::process::Child]) -> Vec<u64> {
    children
        .iter()
        .map(|c| {
            c.id()
                .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse().ok())
                })
                .unwrap_or(0)
        })
        .collect()
}
