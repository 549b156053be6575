//! `auditflow bench --memory-clients N`: memory under overload (issue 27,
//! acceptance 7). N independent clients (each its own connections) append
//! events as fast as they can, `--window` appends at once each; the report says how many were acknowledged,
//! how many `Overloaded` answers the clients waited out, the nodes' peak
//! resident memory (sampled from their admin `/metrics`), and whether every
//! acknowledged event is stored where its ack said. `ops/bench-memory`
//! starts a cluster with a memory budget and runs this.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use auditflow_bench_workload::{make_event, run_name, WorkloadArgs};
use auditflow_client::{Client, ClientConfig};
use auditflow_protocol::wire::Ack;

/// How often the nodes' resident memory is sampled.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Events per append of a client: many at once, as a loader would.
const EVENTS_PER_APPEND: usize = 16;

/// `process_resident_memory_bytes` of the node at admin address `addr`.
async fn rss_bytes(http: &reqwest::Client, addr: &str) -> anyhow::Result<u64> {
    let url = format!("http://{addr}/metrics");
    let text = http
        .get(&url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("cannot read {url}"))?
        .text()
        .await
        .with_context(|| format!("cannot read {url}"))?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("process_resident_memory_bytes ")?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map(|v| v as u64)
        .with_context(|| format!("{url} has no process_resident_memory_bytes"))
}

/// How long the read-back of one partition keeps trying replicas that do
/// not answer or do not hold the acknowledged offsets yet.
const READ_BACK_PATIENCE: Duration = Duration::from_secs(120);

/// Partition `p`'s stored events below offset `end`: (id, hash) by offset.
///
/// Any node answers a read from its own replica, which may lag (a
/// follower that has not applied the last entries yet, or one a
/// livelocked leader cannot catch up) or not answer at all under this
/// load. Reading from whichever node the client took for the leader and
/// stopping at its first empty page reported events as missing that the
/// other replicas held. So each page is asked of the leader first and
/// then of the other nodes, in rounds a second apart, until some replica
/// serves it or [`READ_BACK_PATIENCE`] has passed.
async fn read_back(
    check: &Client,
    p: u32,
    end: u64,
) -> BTreeMap<u64, (String, auditflow_protocol::Hash32)> {
    let mut stored = BTreeMap::new();
    let deadline = Instant::now() + READ_BACK_PATIENCE;
    let mut from = 0;
    while from < end && Instant::now() < deadline {
        let mut nodes = Vec::new();
        if let Ok(meta) = check.metadata().await {
            let leader = meta.leaders.get(p as usize).copied().flatten();
            nodes = meta.nodes;
            nodes.sort_by_key(|n| Some(n.id) != leader);
        }
        let mut progressed = false;
        for node in &nodes {
            let Ok(page) = check.read_from(&node.addr, p, from, 1000, 0).await else {
                continue;
            };
            if page.events.is_empty() {
                continue;
            }
            for e in page.events {
                stored.insert(e.offset, (e.event.id, e.hash));
            }
            from = page.next_offset;
            progressed = true;
            break;
        }
        if !progressed {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    stored
}

/// Runs `clients` clients appending `workload.events` events of
/// `workload.size` bytes in all, then checks them; prints the report.
pub async fn run(
    cfg: ClientConfig,
    clients: usize,
    workload: &WorkloadArgs,
    node_metrics: &[String],
) -> anyhow::Result<()> {
    if node_metrics.is_empty() {
        bail!("--memory-clients needs --node-metrics (the nodes' admin addresses) to sample their memory");
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .context("HTTP client")?;
    let mut idle = Vec::new();
    for addr in node_metrics {
        idle.push(rss_bytes(&http, addr).await?);
    }
    let run = run_name();
    let total = workload.events;
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    // Sampler: the peak resident memory of each node during the run.
    let sampler = {
        let (http, addrs, done) = (http.clone(), node_metrics.to_vec(), Arc::clone(&done));
        tokio::spawn(async move {
            let mut peak = vec![0u64; addrs.len()];
            while !done.load(Ordering::Relaxed) {
                for (i, addr) in addrs.iter().enumerate() {
                    if let Ok(rss) = rss_bytes(&http, addr).await {
                        peak[i] = peak[i].max(rss);
                    }
                }
                tokio::time::sleep(RSS_SAMPLE_EVERY).await;
            }
            peak
        })
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..clients {
        let client = Client::connect(cfg.clone()).await.context("connect")?;
        handles.push(client.clone());
        for _ in 0..workload.window.max(1) {
            let client = client.clone();
            let (next, run, size, tenants) = (
                Arc::clone(&next),
                run.clone(),
                workload.size,
                workload.tenants,
            );
            tasks.push(tokio::spawn(async move {
                let mut acked: BTreeMap<String, Ack> = BTreeMap::new();
                let mut failed = 0usize;
                loop {
                    let first = next.fetch_add(EVENTS_PER_APPEND, Ordering::Relaxed);
                    if first >= total {
                        return (acked, failed);
                    }
                    let last = (first + EVENTS_PER_APPEND).min(total);
                    let events: Vec<_> = (first..last)
                        .map(|n| make_event(&run, n, tenants, size))
                        .collect();
                    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
                    match client.append_batch(events).await {
                        Ok(results) => {
                            for (id, r) in ids.into_iter().zip(results) {
                                match r {
                                    Ok(ack) => {
                                        acked.insert(id, ack);
                                    }
                                    Err(_) => failed += 1,
                                }
                            }
                        }
                        Err(_) => failed += last - first,
                    }
                }
            }));
        }
    }
    let mut acked = BTreeMap::new();
    let mut failed = 0;
    for task in tasks {
        let (a, f) = task.await.context("client task")?;
        acked.extend(a);
        failed += f;
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let peak = sampler.await.context("sampler")?;
    let overloaded: u64 = handles.iter().map(Client::overloaded_answers).sum();

    // Every acknowledged event, read back from the partition leaders.
    let check = handles.first().context("no client")?;
    let mut per_partition: BTreeMap<u32, Vec<(u64, &String, &Ack)>> = BTreeMap::new();
    for (id, ack) in &acked {
        per_partition
            .entry(ack.partition)
            .or_default()
            .push((ack.offset, id, ack));
    }
    let read_started = Instant::now();
    let mut missing = 0usize;
    for (p, mut want) in per_partition {
        want.sort_unstable_by_key(|(o, _, _)| *o);
        let end = want.last().map_or(0, |(o, _, _)| o + 1);
        let stored = read_back(check, p, end).await;
        for (offset, id, ack) in want {
            if stored.get(&offset) != Some(&(id.clone(), ack.hash)) {
                missing += 1;
            }
        }
    }
    let read_s = read_started.elapsed().as_secs_f64();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "memory bench: {clients} clients, {} events of {} bytes in {:.1} s ({:.0} events/s, {:.1} MiB/s)",
        acked.len(),
        workload.size,
        elapsed.as_secs_f64(),
        acked.len() as f64 / elapsed.as_secs_f64(),
        mib((acked.len() * workload.size) as u64) / elapsed.as_secs_f64(),
    );
    println!("  overloaded answers waited out by the clients: {overloaded}");
    println!("  appends given up (after the retry deadline): {failed}");
    for (i, addr) in node_metrics.iter().enumerate() {
        println!(
            "  node {addr}: idle RSS {:.1} MiB, peak RSS {:.1} MiB",
            mib(idle[i]),
            mib(peak[i])
        );
    }
    println!(
        "  acknowledged events stored at their acked offset with their hash: {} of {} (read back in {read_s:.1} s)",
        acked.len() - missing,
        acked.len()
    );
    if missing > 0 {
        bail!("{missing} acknowledged events are not stored as acknowledged");
    }
    Ok(())
}
