//! Prometheus metrics: names, descriptions, the process-wide recorder and
//! what records into it. A leaf: it imports nothing of the broker, so
//! storage, delivery, partition and net can all record without importing
//! each other or admin.
//!
//! Appends are counted where they are answered (`api::client_api`); the
//! Raft and delivery gauges are sampled once a second by
//! `admin::sampler::run_sampler` from the same views `/status` and
//! `/destinations` serve, so the numbers on a dashboard and in
//! `auditflow status` agree.
//!
//! The recorder is installed once per process ([`install`]); recording
//! before that (or in a process without an admin server, such as the
//! simulator) goes to the `metrics` no-op recorder and costs next to
//! nothing.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use auditflow_protocol::delivery::DestinationStatus;
use auditflow_protocol::wire::{AppendResult, PartitionStatus, RequestError, Role};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

/// Events answered by `append`, by `partition` and `result`
/// (`stored`, `duplicate`, `rejected`).
pub const APPEND_EVENTS_TOTAL: &str = "auditflow_append_events_total";
/// Time to answer one append batch, in seconds.
pub const APPEND_BATCH_SECONDS: &str = "auditflow_append_batch_seconds";
/// 1 where this node leads the partition, else 0.
pub const PARTITION_LEADER: &str = "auditflow_partition_leader";
/// Current Raft term of the partition on this node.
pub const RAFT_TERM: &str = "auditflow_raft_term";
/// Index of the last Raft log entry of the partition on this node.
pub const RAFT_LAST_LOG_INDEX: &str = "auditflow_raft_last_log_index";
/// Index of the last entry applied to the partition's state machine.
pub const RAFT_APPLIED_INDEX: &str = "auditflow_raft_applied_index";
/// Next event offset the partition will assign, as this node knows it.
pub const PARTITION_NEXT_OFFSET: &str = "auditflow_partition_next_offset";
/// Events stored but not yet delivered, per destination and partition.
pub const DELIVERY_LAG_EVENTS: &str = "auditflow_delivery_lag_events";
/// Age of the oldest undelivered event, in seconds (0 when none).
pub const DELIVERY_OLDEST_UNDELIVERED_SECONDS: &str =
    "auditflow_delivery_oldest_undelivered_seconds";
/// Parked events (dead-letter queue) per destination and partition.
pub const DELIVERY_DLQ_SIZE: &str = "auditflow_delivery_dlq_size";
/// Failed attempts on the current head-of-line batch.
pub const DELIVERY_ATTEMPTS: &str = "auditflow_delivery_attempts";
/// 1 while the destination's circuit breaker is open, else 0.
pub const DELIVERY_BREAKER_OPEN: &str = "auditflow_delivery_breaker_open";
/// Share of requests to the destination that failed retryably over the
/// last minute (0 to 1).
pub const DELIVERY_ERROR_RATE_1M: &str = "auditflow_delivery_error_rate_1m";
/// Retries since the partition's leader took over.
pub const DELIVERY_RETRIES: &str = "auditflow_delivery_retries";
/// Time spent waiting on backoff since the leader took over (seconds).
pub const DELIVERY_BACKOFF_WAIT_SECONDS: &str = "auditflow_delivery_backoff_wait_seconds";
/// Time spent waiting on the open breaker since the leader took over
/// (seconds).
pub const DELIVERY_BREAKER_WAIT_SECONDS: &str = "auditflow_delivery_breaker_wait_seconds";
/// Events this node delivered, per destination and partition.
pub const DELIVERED_EVENTS_TOTAL: &str = "auditflow_delivered_events_total";
/// Cursor advances a delivery actor recorded through Raft after confirmed
/// deliveries (fewer than batches sent while a backlog streams).
pub const DELIVERY_CURSOR_RECORDS_TOTAL: &str = "auditflow_delivery_cursor_records_total";

/// redb transactions the storage writer committed, by `durability`
/// (`immediate`: fsynced; `none`: made visible, persisted by the next
/// immediate one).
pub const STORAGE_COMMITS_TOTAL: &str = "auditflow_storage_commits_total";
/// Writer jobs (applies, snapshot installs, checkpoints) packed into one
/// committed transaction: how well group commit is batching.
pub const STORAGE_COMMIT_JOBS: &str = "auditflow_storage_commit_jobs";
/// Time to run and commit one writer transaction, fsync included.
pub const STORAGE_COMMIT_SECONDS: &str = "auditflow_storage_commit_seconds";
/// Writes of the Raft log writer, each followed by fdatasync.
pub const RAFT_LOG_WRITES_TOTAL: &str = "auditflow_raft_log_writes_total";
/// Records (entries, votes, commit points, truncations, purges) of all
/// partitions written with one write: how well group commit is batching.
pub const RAFT_LOG_WRITE_RECORDS: &str = "auditflow_raft_log_write_records";
/// Time to write (and sync) one batch of Raft log records.
pub const RAFT_LOG_WRITE_SECONDS: &str = "auditflow_raft_log_write_seconds";
/// Raft log segment files on this node.
pub const RAFT_LOG_SEGMENTS: &str = "auditflow_raft_log_segments";
/// Damaged spans of synced Raft log records replay found (each one lost
/// acknowledged data on this node; see storage-format.md).
pub const RAFT_LOG_DAMAGE_TOTAL: &str = "auditflow_raft_log_damage_total";
/// Partitions whose Raft log is damaged and not yet repaired: they do not
/// vote, campaign or serve reads.
pub const RAFT_LOG_DAMAGED_PARTITIONS: &str = "auditflow_raft_log_damaged_partitions";
/// Leadership handovers this node started (`partition::rebalance`), by
/// partition and `result` (`done`, `failed`).
pub const LEADER_HANDOVERS_TOTAL: &str = "auditflow_leader_handovers_total";
/// Connections to a peer this node dropped and dialled again because RPCs
/// on them kept timing out (`net::peer`), by `peer` id.
pub const PEER_REDIALS_TOTAL: &str = "auditflow_peer_redials_total";
/// Runs of RPCs to a peer that kept timing out while its connection still
/// received datagrams: a slow (overloaded) peer, kept rather than redialled
/// (`net::peer`), by `peer` id.
pub const PEER_SLOW_TIMEOUT_RUNS_TOTAL: &str = "auditflow_peer_slow_timeout_runs_total";

/// How often [`run_sampler`] samples Raft and delivery state: well under
/// a typical 10–15 s scrape interval, and cheap (a metrics borrow and a
/// few redb reads per partition).
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// A gauge not set for this long disappears from `/metrics`: a node that
/// stopped delivering a (destination, partition) because leadership moved
/// must not keep reporting its last lag. Many sample intervals, so a slow
/// sample never makes live series flicker.
pub const GAUGE_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bucket bounds of [`APPEND_BATCH_SECONDS`]: an fsync-bound replicated
/// append takes milliseconds; the top buckets catch stalls up to the
/// partition actor's write timeout.
pub const APPEND_BATCH_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Bucket bounds of [`STORAGE_COMMIT_JOBS`]: a powers-of-two ladder up to
/// the writer's cap of jobs per transaction.
pub const STORAGE_COMMIT_JOBS_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];
/// Bucket bounds of [`RAFT_LOG_WRITE_RECORDS`]: the writer packs up to
/// 1024 jobs, each with one or more records.
pub const RAFT_LOG_WRITE_RECORDS_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];
/// Bucket bounds of [`STORAGE_COMMIT_SECONDS`] and
/// [`RAFT_LOG_WRITE_SECONDS`]: from a cached non-durable commit to a
/// stalled disk.
pub const STORAGE_COMMIT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The recorder this process installed, or why it could not.
static RECORDER: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// The exporter configuration: histogram buckets and gauge idle timeout.
pub fn builder() -> Result<PrometheusBuilder, String> {
    let buckets: [(&str, &[f64]); 5] = [
        (APPEND_BATCH_SECONDS, APPEND_BATCH_BUCKETS),
        (STORAGE_COMMIT_JOBS, STORAGE_COMMIT_JOBS_BUCKETS),
        (STORAGE_COMMIT_SECONDS, STORAGE_COMMIT_BUCKETS),
        (RAFT_LOG_WRITE_RECORDS, RAFT_LOG_WRITE_RECORDS_BUCKETS),
        (RAFT_LOG_WRITE_SECONDS, STORAGE_COMMIT_BUCKETS),
    ];
    buckets
        .into_iter()
        .try_fold(PrometheusBuilder::new(), |b, (name, bounds)| {
            b.set_buckets_for_metric(Matcher::Full(name.into()), bounds)
        })
        .map(|b| b.idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE_TIMEOUT)))
        .map_err(|e| e.to_string())
}

/// Installs the Prometheus recorder as this process's global `metrics`
/// recorder on the first call and describes every metric; later calls
/// return the same handle. Fails (every time, with the same reason) when
/// another global recorder was installed first.
pub fn install() -> Result<&'static PrometheusHandle, &'static str> {
    RECORDER
        .get_or_init(|| {
            let handle = builder()?
                .install_recorder()
                .map_err(|e| format!("cannot install the Prometheus recorder: {e}"))?;
            describe();
            Ok(handle)
        })
        .as_ref()
        .map_err(String::as_str)
}

/// The process metrics (`process_cpu_seconds_total` and the other
/// standard Prometheus names), without a prefix.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Records the process metrics as they are now; called at each scrape, so
/// CPU time and memory are current rather than a sampler tick old.
pub fn collect_process() {
    process_collector().collect();
}

/// Describes every metric to the current recorder (units and help text).
pub fn describe() {
    process_collector().describe();
    describe_counter!(
        APPEND_EVENTS_TOTAL,
        Unit::Count,
        "Events answered by append on this node, by partition and result (stored, duplicate, rejected)."
    );
    describe_histogram!(
        APPEND_BATCH_SECONDS,
        Unit::Seconds,
        "Time this node took to answer one append batch it leads."
    );
    describe_counter!(
        STORAGE_COMMITS_TOTAL,
        Unit::Count,
        "redb (state machine) transactions the storage writer committed, by durability (immediate = fsynced checkpoint, none = persisted by the next immediate one)."
    );
    describe_histogram!(
        STORAGE_COMMIT_JOBS,
        Unit::Count,
        "Writer jobs (applies, snapshot installs, checkpoints) packed into one committed transaction."
    );
    describe_histogram!(
        STORAGE_COMMIT_SECONDS,
        Unit::Seconds,
        "Time to run and commit one storage writer transaction, fsync included."
    );
    describe_counter!(
        RAFT_LOG_WRITES_TOTAL,
        Unit::Count,
        "Writes of the Raft log writer, each followed by fdatasync (group commit: many records per write)."
    );
    describe_histogram!(
        RAFT_LOG_WRITE_RECORDS,
        Unit::Count,
        "Raft log records of all partitions written with one write (group commit)."
    );
    describe_histogram!(
        RAFT_LOG_WRITE_SECONDS,
        Unit::Seconds,
        "Time to write one batch of Raft log records, fdatasync included."
    );
    describe_gauge!(
        RAFT_LOG_SEGMENTS,
        Unit::Count,
        "Raft log segment files on this node."
    );
    describe_counter!(
        RAFT_LOG_DAMAGE_TOTAL,
        Unit::Count,
        "Damaged spans of synced Raft log records found at start-up (acknowledged data lost on this node)."
    );
    describe_gauge!(
        RAFT_LOG_DAMAGED_PARTITIONS,
        Unit::Count,
        "Partitions whose Raft log is damaged and not yet repaired from their leader: they neither vote nor serve reads."
    );
    describe_counter!(
        PEER_SLOW_TIMEOUT_RUNS_TOTAL,
        Unit::Count,
        "Runs of RPCs to a peer that timed out several times in a row while the connection still received data (a slow peer, not redialled), by peer id."
    );
    describe_counter!(
        PEER_REDIALS_TOTAL,
        Unit::Count,
        "Connections to a peer dropped and dialled again after RPCs on them timed out several times in a row, by peer id."
    );
    describe_counter!(
        LEADER_HANDOVERS_TOTAL,
        Unit::Count,
        "Leadership handovers to a partition's preferred node this node started, by partition and result (done, failed)."
    );
    describe_gauge!(
        PARTITION_LEADER,
        Unit::Count,
        "1 if this node leads the partition, else 0."
    );
    describe_gauge!(
        RAFT_TERM,
        Unit::Count,
        "Current Raft term of the partition."
    );
    describe_gauge!(
        RAFT_LAST_LOG_INDEX,
        Unit::Count,
        "Index of the last Raft log entry of the partition on this node."
    );
    describe_gauge!(
        RAFT_APPLIED_INDEX,
        Unit::Count,
        "Index of the last Raft entry applied to the partition's state machine on this node."
    );
    describe_gauge!(
        PARTITION_NEXT_OFFSET,
        Unit::Count,
        "Next event offset of the partition as this node has applied it."
    );
    describe_gauge!(
        DELIVERY_LAG_EVENTS,
        Unit::Count,
        "Events stored but not yet delivered, filtered out or parked, per destination and partition (reported by the partition leader)."
    );
    describe_gauge!(
        DELIVERY_OLDEST_UNDELIVERED_SECONDS,
        Unit::Seconds,
        "Age of the oldest undelivered event per destination and partition; 0 when caught up."
    );
    describe_gauge!(
        DELIVERY_DLQ_SIZE,
        Unit::Count,
        "Parked (dead-lettered) events per destination and partition."
    );
    describe_gauge!(
        DELIVERY_ATTEMPTS,
        Unit::Count,
        "Failed attempts on the current head-of-line batch per destination and partition."
    );
    describe_gauge!(
        DELIVERY_BREAKER_OPEN,
        Unit::Count,
        "1 while the destination's circuit breaker is open for the partition, else 0."
    );
    describe_gauge!(
        DELIVERY_ERROR_RATE_1M,
        Unit::Count,
        "Share of requests that failed retryably over the last minute, per destination and partition."
    );
    describe_gauge!(
        DELIVERY_RETRIES,
        Unit::Count,
        "Retries since the partition's leader took over, per destination and partition."
    );
    describe_gauge!(
        DELIVERY_BACKOFF_WAIT_SECONDS,
        Unit::Seconds,
        "Time spent waiting on retry backoff since the partition's leader took over."
    );
    describe_gauge!(
        DELIVERY_BREAKER_WAIT_SECONDS,
        Unit::Seconds,
        "Time spent waiting on the open circuit breaker since the partition's leader took over."
    );
    describe_counter!(
        DELIVERED_EVENTS_TOTAL,
        Unit::Count,
        "Events this node delivered, per destination and partition."
    );
    describe_counter!(
        DELIVERY_CURSOR_RECORDS_TOTAL,
        Unit::Count,
        "Delivery cursor advances recorded through Raft, per destination and partition."
    );
}

/// Records one answered append call: a verdict per event and, for a
/// batch that got per-event results, its duration. A batch refused as too
/// large counts all its events as rejected; a redirect or an unavailable
/// partition records nothing (it is no verdict on the events: the client
/// retries elsewhere, and counting would count them twice).
pub fn record_append(
    partition: u32,
    events: usize,
    outcome: &Result<Vec<AppendResult>, RequestError>,
    elapsed: Duration,
) {
    let (mut stored, mut duplicate, mut rejected) = (0u64, 0u64, 0u64);
    match outcome {
        Ok(results) => {
            for r in results {
                match r {
                    AppendResult::Stored(ack) if ack.duplicate => duplicate += 1,
                    AppendResult::Stored(_) => stored += 1,
                    AppendResult::Rejected(_) => rejected += 1,
                }
            }
            metrics::histogram!(APPEND_BATCH_SECONDS).record(elapsed.as_secs_f64());
        }
        Err(RequestError::BatchTooLarge { .. }) => rejected = events as u64,
        Err(_) => {}
    }
    let partition = partition.to_string();
    for (result, n) in [
        ("stored", stored),
        ("duplicate", duplicate),
        ("rejected", rejected),
    ] {
        if n > 0 {
            counter!(APPEND_EVENTS_TOTAL, "partition" => partition.clone(), "result" => result)
                .increment(n);
        }
    }
}

/// Sets the Raft gauges of one partition as node `node` sees it.
pub fn record_partition(node: u64, p: &PartitionStatus) {
    let partition = p.partition.to_string();
    let leads = p.role == Role::Leader && p.leader == Some(node);
    let set = |name: &'static str, v: f64| {
        gauge!(name, "partition" => partition.clone()).set(v);
    };
    set(PARTITION_LEADER, if leads { 1.0 } else { 0.0 });
    set(RAFT_TERM, p.term as f64);
    set(RAFT_LAST_LOG_INDEX, p.last_log_index.unwrap_or(0) as f64);
    set(RAFT_APPLIED_INDEX, p.applied_index.unwrap_or(0) as f64);
    set(PARTITION_NEXT_OFFSET, p.next_offset as f64);
}

/// Turns the per-actor `delivered` counts of successive samples into
/// increments of a counter that never goes down. An actor's count
/// restarts at 0 when it is restarted (leadership moved away and back),
/// which a Prometheus counter must not show as a decrease.
#[derive(Debug, Default)]
pub struct DeliveredTracker {
    last: BTreeMap<(String, u32), u64>,
}

impl DeliveredTracker {
    /// The increments since the previous sample, per (destination,
    /// partition) present in `now`; forgets pairs absent from it (their
    /// actor stopped, so the next one counts from 0).
    pub fn deltas(&mut self, now: &[DestinationStatus]) -> Vec<((String, u32), u64)> {
        let mut next = BTreeMap::new();
        let mut out = Vec::with_capacity(now.len());
        for d in now {
            let key = (d.dest.clone(), d.partition);
            let delta = match self.last.get(&key) {
                Some(&prev) if d.delivered >= prev => d.delivered - prev,
                // First sample of this actor, or a restarted one.
                _ => d.delivered,
            };
            out.push((key.clone(), delta));
            next.insert(key, d.delivered);
        }
        self.last = next;
        out
    }
}

/// Sets the delivery gauges and advances the delivered counters.
pub fn record_destinations(now: &[DestinationStatus], tracker: &mut DeliveredTracker) {
    for d in now {
        let labels = [
            ("dest", d.dest.clone()),
            ("partition", d.partition.to_string()),
        ];
        let set = |name: &'static str, v: f64| gauge!(name, &labels).set(v);
        set(DELIVERY_LAG_EVENTS, d.lag_events as f64);
        set(
            DELIVERY_OLDEST_UNDELIVERED_SECONDS,
            d.oldest_undelivered_age_ms.unwrap_or(0) as f64 / 1000.0,
        );
        set(DELIVERY_DLQ_SIZE, d.dlq_size as f64);
        set(DELIVERY_ATTEMPTS, f64::from(d.attempts));
        set(
            DELIVERY_BREAKER_OPEN,
            if d.breaker == "open" { 1.0 } else { 0.0 },
        );
        set(DELIVERY_ERROR_RATE_1M, d.error_rate_1m());
        set(DELIVERY_RETRIES, d.retries as f64);
        set(
            DELIVERY_BACKOFF_WAIT_SECONDS,
            d.backoff_wait_ms as f64 / 1000.0,
        );
        set(
            DELIVERY_BREAKER_WAIT_SECONDS,
            d.breaker_wait_ms as f64 / 1000.0,
        );
    }
    for ((dest, partition), delta) in tracker.deltas(now) {
        // Touch the counter even at 0 so the series exists from the start.
        counter!(DELIVERED_EVENTS_TOTAL, "dest" => dest, "partition" => partition.to_string())
            .increment(delta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use auditflow_protocol::wire::{Ack, EventError};
    use auditflow_protocol::Hash32;

    /// Runs `f` against a fresh local recorder and returns what it renders.
    fn render(f: impl FnOnce()) -> String {
        let recorder = builder().expect("valid builder").build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe();
            f();
        });
        handle.render()
    }

    fn dest(name: &str, partition: u32, delivered: u64) -> DestinationStatus {
        DestinationStatus {
            dest: name.into(),
            partition,
            node: 1,
            cursor: 10,
            head: 15,
            lag_events: 5,
            oldest_undelivered_age_ms: Some(2_500),
            last_success: None,
            last_error: None,
            attempts: 3,
            breaker: "open".into(),
            dlq_size: 2,
            delivered,
            replay: None,
            requests_1m: 400,
            failed_requests_1m: 20,
            retries: 7,
            backoff_wait_ms: 250,
            breaker_wait_ms: 2000,
        }
    }

    fn ack(duplicate: bool) -> AppendResult {
        AppendResult::Stored(Ack {
            partition: 2,
            offset: 0,
            hash: Hash32::ZERO,
            duplicate,
        })
    }

    #[test]
    fn append_results_are_counted_by_verdict() {
        let text = render(|| {
            let results = vec![
                ack(false),
                ack(false),
                ack(true),
                AppendResult::Rejected(EventError::WrongPartition { expected: 1 }),
            ];
            record_append(2, 4, &Ok(results), Duration::from_millis(3));
            let too_large = RequestError::BatchTooLarge { reason: "x".into() };
            record_append(2, 7, &Err(too_large), Duration::ZERO);
            let redirect = RequestError::NotLeader {
                partition: 2,
                leader: None,
            };
            record_append(2, 5, &Err(redirect), Duration::ZERO);
        });
        assert!(text.contains("# TYPE auditflow_append_events_total counter"));
        for line in [
            r#"auditflow_append_events_total{partition="2",result="stored"} 2"#,
            r#"auditflow_append_events_total{partition="2",result="duplicate"} 1"#,
            r#"auditflow_append_events_total{partition="2",result="rejected"} 8"#,
            "# TYPE auditflow_append_batch_seconds histogram",
            r#"auditflow_append_batch_seconds_bucket{le="0.005"} 1"#,
            "auditflow_append_batch_seconds_count 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn partition_gauges_follow_the_status() {
        let status = |partition, role, leader| PartitionStatus {
            partition,
            role,
            leader,
            term: 4,
            last_log_index: Some(17),
            applied_index: Some(16),
            snapshot_index: None,
            purged_index: None,
            next_offset: 12,
            last_hash: Hash32::ZERO,
        };
        let text = render(|| {
            record_partition(1, &status(0, Role::Leader, Some(1)));
            record_partition(1, &status(1, Role::Follower, Some(2)));
        });
        for line in [
            r#"auditflow_partition_leader{partition="0"} 1"#,
            r#"auditflow_partition_leader{partition="1"} 0"#,
            r#"auditflow_raft_term{partition="1"} 4"#,
            r#"auditflow_raft_last_log_index{partition="0"} 17"#,
            r#"auditflow_raft_applied_index{partition="0"} 16"#,
            r#"auditflow_partition_next_offset{partition="0"} 12"#,
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn destination_gauges_and_delivered_counter() {
        let mut tracker = DeliveredTracker::default();
        let text = render(|| {
            record_destinations(&[dest("hook", 3, 40)], &mut tracker);
            record_destinations(&[dest("hook", 3, 45)], &mut tracker);
        });
        for line in [
            r#"auditflow_delivery_lag_events{dest="hook",partition="3"} 5"#,
            r#"auditflow_delivery_oldest_undelivered_seconds{dest="hook",partition="3"} 2.5"#,
            r#"auditflow_delivery_dlq_size{dest="hook",partition="3"} 2"#,
            r#"auditflow_delivery_attempts{dest="hook",partition="3"} 3"#,
            r#"auditflow_delivery_breaker_open{dest="hook",partition="3"} 1"#,
            r#"auditflow_delivered_events_total{dest="hook",partition="3"} 45"#,
            r#"auditflow_delivery_error_rate_1m{dest="hook",partition="3"} 0.05"#,
            r#"auditflow_delivery_retries{dest="hook",partition="3"} 7"#,
            r#"auditflow_delivery_backoff_wait_seconds{dest="hook",partition="3"} 0.25"#,
            r#"auditflow_delivery_breaker_wait_seconds{dest="hook",partition="3"} 2"#,
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn delivered_tracker_never_goes_down() {
        let mut t = DeliveredTracker::default();
        let check = |t: &mut DeliveredTracker, counts: &[(&str, u64)], want: &[u64]| {
            let now: Vec<_> = counts.iter().map(|(d, n)| dest(d, 0, *n)).collect();
            let got: Vec<u64> = t.deltas(&now).into_iter().map(|(_, d)| d).collect();
            assert_eq!(got, want, "after {counts:?}");
        };
        check(&mut t, &[("a", 10)], &[10]);
        check(&mut t, &[("a", 15), ("b", 1)], &[5, 1]);
        // The actor restarted and counts from 0 again.
        check(&mut t, &[("a", 3), ("b", 1)], &[3, 0]);
        // "a" stopped (absent), then came back: it counts from scratch.
        check(&mut t, &[("b", 2)], &[1]);
        check(&mut t, &[("a", 4), ("b", 2)], &[4, 0]);
    }
}
