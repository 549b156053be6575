//! Delivery acceptance (issue 4) against a real cluster and a real HTTP
//! receiver: events reach every matching destination filtered, masked and
//! in order; permanent failures park exactly the refused events with their
//! history and redrive delivers them; an outage of one destination does
//! not hold up the others; a leader killed during delivery is taken over
//! from the replicated cursor without gaps, and one stopped cleanly hands
//! over its exact position (nothing sent twice).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use auditflow_broker::delivery::DestinationConfig;
use auditflow_protocol::delivery::RedriveSelection;
use auditflow_protocol::wire::ReplayFrom;
use common::receiver::{Received, Receiver};
use common::*;
use serde_json::json;

fn webhook(name: &str, url: &str, extra: serde_json::Value) -> DestinationConfig {
    let mut v = json!({
        "name": name,
        "sink": { "kind": "webhook", "url": url },
        "batch_size": 50,
        "linger_ms": 5,
        "retry": { "initial_ms": 20, "max_ms": 300 },
        "breaker": { "failure_threshold": 1000, "open_ms": 100 },
    });
    if let (Some(obj), serde_json::Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    serde_json::from_value(v).expect("destination config")
}

/// Waits until `receiver` has had every id of `want`, and nothing else.
async fn wait_received(
    what: &str,
    deadline: Duration,
    receiver: &Receiver,
    want: &BTreeSet<String>,
) {
    wait_until(what, deadline, || async move {
        let got: BTreeSet<String> = receiver.received().into_iter().map(|r| r.id).collect();
        (&got == want).then_some(())
    })
    .await;
}

/// First arrival of each id, in arrival order, grouped by partition.
fn first_arrivals(received: &[Received]) -> BTreeMap<u32, Vec<(u64, String)>> {
    let mut seen = BTreeSet::new();
    let mut out: BTreeMap<u32, Vec<(u64, String)>> = BTreeMap::new();
    for r in received {
        if seen.insert(r.id.clone()) {
            out.entry(r.partition)
                .or_default()
                .push((r.offset, r.id.clone()));
        }
    }
    out
}

/// Every id arrived with one offset only; per partition, first arrivals
/// come in increasing offset order.
fn assert_ordered_without_conflicts(name: &str, received: &[Received]) {
    let mut offsets: BTreeMap<&str, (u32, u64)> = BTreeMap::new();
    for r in received {
        let prev = offsets.insert(&r.id, (r.partition, r.offset));
        if let Some(prev) = prev {
            assert_eq!(
                prev,
                (r.partition, r.offset),
                "{name}: duplicate of {} with another offset",
                r.id
            );
        }
    }
    for (p, arrivals) in first_arrivals(received) {
        for w in arrivals.windows(2) {
            assert!(
                w[0].0 < w[1].0,
                "{name}: partition {p} out of order: {:?} then {:?}",
                w[0],
                w[1]
            );
        }
    }
}

async fn append_all(
    client: &auditflow_client::Client,
    from: u64,
    to: u64,
) -> BTreeMap<String, (u32, u64)> {
    append_batches(client, from, to, delivery_event, Appends::AllStored).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_masked_ordered_parked_and_redriven() {
    let all = Receiver::start().await;
    let picky = Receiver::start().await;
    let flaky = Receiver::start().await;
    flaky.set_down(true);
    let opts = ClusterOptions {
        destinations: vec![
            webhook(
                "all",
                &all.url(),
                json!({
                    "masking": [
                        { "path": "actor.ip", "action": "hash" },
                        { "path": "context.request", "action": "drop" },
                    ],
                    "mask_key": "test-key",
                }),
            ),
            webhook(
                "picky",
                &picky.url(),
                json!({ "filter": { "tenants": ["tenant-1"] } }),
            ),
            webhook("flaky", &flaky.url(), json!({})),
        ],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(opts);
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;

    // Events of tenant-1 the picky receiver refuses permanently.
    let refused: BTreeSet<String> = (0..2000u64)
        .filter(|i| i % 4 == 1 && i % 97 == 0)
        .map(|i| format!("ev-{i:06}"))
        .collect();
    picky.reject(refused.iter().cloned());

    let acked = append_all(&client, 0, 2000).await;
    let want_all: BTreeSet<String> = acked.keys().cloned().collect();
    let want_picky: BTreeSet<String> = acked
        .keys()
        .filter(|id| {
            let n: u64 = id[3..].parse().unwrap();
            n % 4 == 1
        })
        .cloned()
        .collect();

    // "all" and "picky" flow while "flaky" is down.
    wait_received(
        "all delivered to `all`",
        Duration::from_secs(120),
        &all,
        &want_all,
    )
    .await;
    wait_received(
        "picky delivered or parked",
        Duration::from_secs(120),
        &picky,
        &want_picky
            .difference(&refused)
            .cloned()
            .collect::<BTreeSet<_>>(),
    )
    .await;
    assert!(flaky.received().is_empty(), "flaky is down");
    assert!(flaky.requests() > 0, "flaky was being retried");

    // Order and masking.
    let received = all.received();
    assert_ordered_without_conflicts("all", &received);
    for r in &received {
        assert_eq!(
            Some(&(r.partition, r.offset)),
            acked.get(&r.id),
            "offset of {}",
            r.id
        );
        let text = r.body.to_string();
        assert!(
            !text.contains("10.0.0.1"),
            "actor.ip left the node in clear: {text}"
        );
        assert!(
            r.body["event"]["context"].get("request").is_none(),
            "context.request dropped"
        );
        assert!(r.body["event"]["actor"]["ip"]
            .as_str()
            .unwrap()
            .starts_with("hmac-sha256:"));
    }
    let picky_received = picky.received();
    assert_ordered_without_conflicts("picky", &picky_received);
    assert!(
        picky_received
            .iter()
            .all(|r| r.id[3..].parse::<u64>().unwrap() % 4 == 1),
        "filter"
    );

    // Exactly the refused events are parked, with their history.
    let meta = client.metadata().await.expect("metadata");
    let mut parked = BTreeMap::new();
    for p in 0..meta.partition_count {
        for (offset, entry) in client.dlq_list("picky", p, 0, 1000).await.expect("dlq") {
            assert!(!entry.attempts.is_empty(), "attempt history kept");
            assert_eq!(entry.attempts.last().unwrap().status, Some(400));
            parked.insert(entry.event_id.clone(), (p, offset));
        }
    }
    assert_eq!(
        parked.keys().cloned().collect::<BTreeSet<_>>(),
        refused,
        "DLQ holds exactly the refused events"
    );
    for (id, at) in &parked {
        assert_eq!(Some(at), acked.get(id));
    }

    // The fix: the receiver accepts them now; redrive delivers them.
    picky.accept_all();
    for p in 0..meta.partition_count {
        client
            .redrive("picky", p, RedriveSelection::All)
            .await
            .expect("redrive");
    }
    wait_received(
        "redriven events delivered",
        Duration::from_secs(60),
        &picky,
        &want_picky,
    )
    .await;
    wait_until("DLQ empty after redrive", Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            for p in 0..meta.partition_count {
                if !client.dlq_list("picky", p, 0, 10).await.ok()?.is_empty() {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;

    // The outage ends: "flaky" receives everything, in order.
    flaky.set_down(false);
    wait_received(
        "flaky catches up",
        Duration::from_secs(120),
        &flaky,
        &want_all,
    )
    .await;
    assert_ordered_without_conflicts("flaky", &flaky.received());

    // Status shows every pair caught up, once the last deliveries are
    // recorded (at most 100 ms after the sink confirmed them).
    let pairs = 3 * meta.partition_count as usize;
    wait_until(
        "status shows every pair caught up",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            async move {
                let statuses: Vec<_> = client
                    .dest_status_all()
                    .await
                    .into_iter()
                    .flat_map(|(_, s)| s.unwrap_or_default())
                    .collect();
                let done = statuses.len() == pairs
                    && statuses
                        .iter()
                        .all(|s| s.lag_events == 0 && s.dlq_size == 0);
                done.then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_leader_resumes_delivery_from_the_replicated_cursor() {
    let sink = Receiver::start().await;
    let opts = ClusterOptions {
        destinations: vec![webhook("siem", &sink.url(), json!({}))],
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start(opts);
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;
    let mut acked = append_all(&client, 0, 1500).await;

    // Kill the node leading the most partitions while delivery runs.
    wait_until("delivery under way", Duration::from_secs(60), || {
        let sink = sink.clone();
        async move { (sink.received().len() > 100).then_some(()) }
    })
    .await;
    let idx = cluster.busiest_leader(&client).await;
    cluster.kill(idx);
    acked.extend(append_all(&client, 1500, 3000).await);
    cluster.spawn(idx);

    let want: BTreeSet<String> = acked.keys().cloned().collect();
    wait_received(
        "every event delivered",
        Duration::from_secs(180),
        &sink,
        &want,
    )
    .await;
    let received = sink.received();
    assert_ordered_without_conflicts("siem", &received);
    // No gap: per partition, first arrivals are exactly offsets 0..n.
    for (p, arrivals) in first_arrivals(&received) {
        let offsets: Vec<u64> = arrivals.iter().map(|(o, _)| *o).collect();
        let expected: Vec<u64> = (0..offsets.len() as u64).collect();
        assert_eq!(offsets, expected, "partition {p} has a gap");
    }
    let duplicates = received.len() - want.len();
    eprintln!(
        "{} deliveries for {} events ({duplicates} duplicates after failover)",
        received.len(),
        want.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_added_and_removed_at_run_time() {
    let late = Receiver::start().await;
    let marker = Receiver::start().await;
    let mut cluster = Cluster::start(ClusterOptions::default());
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;
    let mut acked = append_all(&client, 0, 500).await;

    // Bad settings are refused with a reason, and nothing is added.
    let err = client
        .dest_add(r#"{"name": "x", "sink": {"kind": "webhook"}}"#)
        .await
        .expect_err("a webhook needs a url");
    assert!(err.to_string().contains("url"), "{err}");
    assert!(client.dest_list().await.expect("list").is_empty());

    // Added at run time: it receives everything, from offset 0.
    let settings = serde_json::to_string(&webhook("late", &late.url(), json!({}))).unwrap();
    client.dest_add(&settings).await.expect("add");
    wait_until("listed", Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            let list = client.dest_list().await.ok()?;
            (list.len() == 1 && list[0].name == "late" && list[0].runtime).then_some(())
        }
    })
    .await;

    // The catalog is replicated: kill the catalog partition's leader,
    // append more, and the survivors keep delivering to it.
    let meta = client.metadata().await.expect("metadata");
    let victim = meta.leaders[0].expect("catalog leader");
    let idx = cluster.index_of(victim);
    cluster.kill(idx);
    acked.extend(append_all(&client, 500, 1000).await);
    cluster.spawn(idx);
    let want: BTreeSet<String> = acked.keys().cloned().collect();
    wait_received(
        "everything delivered to `late`",
        Duration::from_secs(120),
        &late,
        &want,
    )
    .await;
    assert_ordered_without_conflicts("late", &late.received());

    // Removed: it stops; a second destination added later shows that
    // delivery went on without it.
    assert!(client.dest_remove("late").await.expect("remove"));
    assert!(!client.dest_remove("late").await.expect("remove again"));
    wait_until("`late` stopped everywhere", Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            let gone_from_list = client.dest_list().await.ok()?.is_empty();
            let statuses = client.dest_status_all().await;
            let no_status = statuses
                .iter()
                .all(|(_, s)| s.as_ref().is_ok_and(|s| s.iter().all(|s| s.dest != "late")));
            (gone_from_list && no_status).then_some(())
        }
    })
    .await;
    let before = late.received().len();
    acked.extend(append_all(&client, 1000, 1200).await);
    let settings = serde_json::to_string(&webhook("marker", &marker.url(), json!({}))).unwrap();
    client.dest_add(&settings).await.expect("add marker");
    let want: BTreeSet<String> = acked.keys().cloned().collect();
    wait_received(
        "everything delivered to `marker`",
        Duration::from_secs(120),
        &marker,
        &want,
    )
    .await;
    assert_eq!(
        late.received().len(),
        before,
        "a removed destination gets nothing"
    );
}

/// New arrivals after `before`, as (partition, offset), in arrival order.
fn arrivals_since(r: &Receiver, before: usize) -> Vec<(u32, u64)> {
    r.received()[before..]
        .iter()
        .map(|r| (r.partition, r.offset))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_redelivers_a_range_to_one_destination_only() {
    let siem = Receiver::start().await;
    let other = Receiver::start().await;
    let opts = ClusterOptions {
        destinations: vec![
            webhook("siem", &siem.url(), json!({})),
            webhook("other", &other.url(), json!({})),
        ],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(opts);
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;
    // Four batches, so the partition holds several arrival times.
    let mut acked = BTreeMap::new();
    for b in 0..4 {
        acked.extend(append_all(&client, b * 200, (b + 1) * 200).await);
    }
    let want: BTreeSet<String> = acked.keys().cloned().collect();
    for r in [&siem, &other] {
        wait_received("all delivered", Duration::from_secs(120), r, &want).await;
    }
    let mut per_partition: BTreeMap<u32, u64> = BTreeMap::new();
    for (p, _) in acked.values() {
        *per_partition.entry(*p).or_default() += 1;
    }
    let (&p, &stored) = per_partition.iter().max_by_key(|(_, n)| **n).unwrap();
    assert!(stored > 40, "partition {p} holds {stored}");

    // Bad requests: an unknown destination; an offset without a partition
    // is the CLI's to refuse, the API always has one.
    let err = client
        .replay("nope", p, ReplayFrom::Offset(0), None)
        .await
        .expect_err("unknown destination");
    assert!(err.to_string().contains("unknown destination"), "{err}");

    // A bounded range by offset: exactly those events again, in order,
    // to this destination only; the cursor does not move.
    let (siem_before, other_before) = (siem.received().len(), other.received().len());
    let queued = client
        .replay(
            "siem",
            p,
            ReplayFrom::Offset(10),
            Some(ReplayFrom::Offset(25)),
        )
        .await
        .expect("replay");
    assert_eq!(queued, 15);
    let range: Vec<(u32, u64)> = (10..25).map(|o| (p, o)).collect();
    wait_until("range re-delivered", Duration::from_secs(60), || {
        let siem = siem.clone();
        let range = range.clone();
        async move {
            let got: BTreeSet<(u32, u64)> =
                arrivals_since(&siem, siem_before).into_iter().collect();
            (got.len() == range.len()).then_some(())
        }
    })
    .await;
    wait_until("replay window closed", Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            let all = client.dest_status_all().await;
            let s = all
                .into_iter()
                .flat_map(|(_, s)| s.unwrap_or_default())
                .find(|s| s.dest == "siem" && s.partition == p)?;
            (s.replay.is_none() && s.cursor == s.head && s.lag_events == 0).then_some(())
        }
    })
    .await;
    assert_eq!(
        arrivals_since(&siem, siem_before),
        range,
        "in order, nothing else"
    );
    assert_eq!(other.received().len(), other_before, "other untouched");

    // From a time to the cursor, while new events keep flowing live.
    let page = client.read(p, 0, 10_000).await.expect("read");
    let pivot = page.events[page.events.len() / 2].received_at;
    let start = page
        .events
        .iter()
        .find(|e| e.received_at >= pivot)
        .map(|e| e.offset)
        .unwrap();
    let (siem_before, other_before) = (siem.received().len(), other.received().len());
    let queued = client
        .replay("siem", p, ReplayFrom::Time(pivot), None)
        .await
        .expect("replay by time");
    assert_eq!(
        queued,
        stored - start,
        "from {start} to the cursor {stored}"
    );
    let more = append_all(&client, 800, 1000).await;
    let live: BTreeSet<String> = more.keys().cloned().collect();
    wait_until(
        "replayed and live events delivered",
        Duration::from_secs(120),
        || {
            let siem = siem.clone();
            let live = live.clone();
            async move {
                let since = &siem.received()[siem_before..];
                let ids: BTreeSet<String> = since.iter().map(|r| r.id.clone()).collect();
                let replayed: BTreeSet<u64> = since
                    .iter()
                    .filter(|r| r.partition == p && r.offset < stored)
                    .map(|r| r.offset)
                    .collect();
                (replayed.len() as u64 == stored - start && live.is_subset(&ids)).then_some(())
            }
        },
    )
    .await;
    let replayed: Vec<u64> = arrivals_since(&siem, siem_before)
        .into_iter()
        .filter(|(q, o)| *q == p && *o < stored)
        .map(|(_, o)| o)
        .collect();
    assert_eq!(
        replayed,
        (start..stored).collect::<Vec<_>>(),
        "replay in order"
    );
    wait_until("other got the live events", Duration::from_secs(60), || {
        let other = other.clone();
        let live = live.clone();
        async move {
            let got: BTreeSet<String> = other.received()[other_before..]
                .iter()
                .map(|r| r.id.clone())
                .collect();
            (got == live).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_backlog_records_its_cursor_less_often_than_it_sends() {
    let bulk = Receiver::start().await;
    let cluster = Cluster::start(ClusterOptions::default());
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;
    // A backlog first, then a destination with small batches: hundreds of
    // batches stream back to back.
    let acked = append_all(&client, 0, 2000).await;
    let batch = 5u64;
    let settings = serde_json::to_string(&webhook(
        "bulk",
        &bulk.url(),
        json!({ "batch_size": batch, "linger_ms": 0 }),
    ))
    .unwrap();
    client.dest_add(&settings).await.expect("add");
    let want: BTreeSet<String> = acked.keys().cloned().collect();
    wait_received(
        "the backlog delivered",
        Duration::from_secs(120),
        &bulk,
        &want,
    )
    .await;
    assert_ordered_without_conflicts("bulk", &bulk.received());
    // Caught up, the actors record the whole progress: every replicated
    // cursor reaches its head.
    wait_until(
        "cursors recorded up to the head",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            async move {
                let statuses = client.dest_status_all().await;
                let bulk: Vec<_> = statuses
                    .iter()
                    .filter_map(|(_, s)| s.as_ref().ok())
                    .flatten()
                    .filter(|s| s.dest == "bulk")
                    .collect();
                let stored: u64 = bulk.iter().map(|s| s.head).sum();
                let done = bulk.len() == client.cached_metadata().partition_count as usize
                    && stored == 2000
                    && bulk.iter().all(|s| s.cursor == s.head);
                done.then_some(())
            }
        },
    )
    .await;
    // Far fewer Raft records than batches (each record is an entry and a
    // durable commit on every node).
    let mut records = 0.0;
    for n in &cluster.nodes {
        let text = scrape_metrics(n.admin_addr).await;
        records += sum_metric(
            &text,
            "auditflow_delivery_cursor_records_total",
            &[("dest", "bulk")],
        );
    }
    let batches = acked.len() as f64 / batch as f64;
    assert!(records >= 1.0, "no cursor record at all");
    assert!(
        records < batches,
        "{records} cursor records for at least {batches} batches"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_hands_over_the_exact_cursor() {
    let sink = Receiver::start().await;
    let mut cluster = Cluster::start(ClusterOptions::default());
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;
    let acked = append_all(&client, 0, 4000).await;
    // One event per batch: the backlog streams for a while, and while it
    // does each actor's latest progress is not recorded yet (it records at
    // most every 100 ms).
    let settings = serde_json::to_string(&webhook(
        "siem",
        &sink.url(),
        json!({ "batch_size": 1, "linger_ms": 0 }),
    ))
    .unwrap();
    client.dest_add(&settings).await.expect("add");
    wait_until("delivery under way", Duration::from_secs(60), || {
        let sink = sink.clone();
        async move { (sink.received().len() > 200).then_some(()) }
    })
    .await;
    let idx = cluster.busiest_leader(&client).await;
    cluster.stop(idx);
    let at_stop = sink.received().len();
    assert!(
        at_stop < acked.len(),
        "the backlog was delivered before the stop; the test proves nothing"
    );

    let want: BTreeSet<String> = acked.keys().cloned().collect();
    wait_received(
        "every event delivered by the new leaders",
        Duration::from_secs(120),
        &sink,
        &want,
    )
    .await;
    let received = sink.received();
    assert_ordered_without_conflicts("siem", &received);
    // The stopping node recorded what it had delivered before it let go,
    // so the new leaders sent nothing twice.
    assert_eq!(
        received.len(),
        want.len(),
        "{} events delivered again after a clean stop",
        received.len() - want.len()
    );
}
