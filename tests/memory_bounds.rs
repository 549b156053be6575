//! Issue 27, point 5: memory is bounded in bytes, and past a bound clients
//! get a typed retry-later answer (`Overloaded`) instead of a node that
//! grows until it runs out of memory.
//!
//! Before, a node bounded only counts: 50,000 queued appends of up to
//! 64 KiB per partition (3 GiB), 1,024 streams of 4 MiB per connection,
//! and any number of connections. Here a real cluster runs with tight
//! bounds (bytes queued per partition, bytes of requests in flight per
//! connection and per node, client connections). Clients hammering it
//! with raw requests (no retries) see each bound answer `Overloaded`; the
//! client library rides over them with its backoff; and every event that
//! was acknowledged is stored, once, where its ack said.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use auditflow_broker::config::MemoryLimits;
use auditflow_client::{Client, ClientConfig, ClientError};
use auditflow_protocol::wire::{Ack, AppendResult, Request, RequestError, Response};
use auditflow_protocol::{Event, Limits};
use common::*;

/// Events per raw request: about 190 KiB, under the batch limit below.
const EVENTS_PER_REQUEST: usize = 12;
/// Concurrent raw requests per connection: more than its bound admits.
const LOOPS_PER_CONNECTION: usize = 4;

/// The bounds under test. A request of ~190 KiB takes ~380 KiB of room
/// (frame and decoded form): two fit a connection, four the node, and the
/// partition queue holds one beside the two entries being replicated.
fn tight() -> (Limits, MemoryLimits) {
    let limits = Limits {
        max_batch_bytes: 256 * 1024,
        ..Limits::default()
    };
    let memory = MemoryLimits {
        queued_append_bytes_per_partition: 256 * 1024,
        request_bytes_per_connection: 1024 * 1024,
        request_bytes_total: 1536 * 1024,
        max_connections: 3,
        ..MemoryLimits::default()
    };
    (limits, memory)
}

/// A ~15 KiB event: 60 context entries of 250 bytes.
fn big_event(id: &str, n: u64) -> Event {
    let mut e = event(id, "tenant-a", n);
    for k in 0..60 {
        e.context.insert(format!("k{k:02}"), "x".repeat(250));
    }
    e
}

/// Which bound an `Overloaded` answer names.
fn bound_of(reason: &str) -> &'static str {
    if reason.contains("bytes queued") {
        "partition queue"
    } else if reason.contains("on this connection") {
        "connection bytes"
    } else if reason.contains("on this node") {
        "node bytes"
    } else if reason.contains("client connections") {
        "connections"
    } else {
        "unknown"
    }
}

/// What raw requests saw.
#[derive(Default)]
struct Seen {
    acked: BTreeMap<String, Ack>,
    overloaded: BTreeMap<&'static str, usize>,
    other_errors: Vec<String>,
}

/// One raw append (no retries) of fresh events to `addr`; records the
/// outcome.
async fn raw_append(client: &Client, addr: &str, first: u64, seen: &Mutex<Seen>) {
    let events: Vec<Event> = (first..first + EVENTS_PER_REQUEST as u64)
        .map(|n| big_event(&format!("raw-{n:08}"), n))
        .collect();
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    let request = Request::Append {
        partition: 0,
        events,
    };
    let answer = client.request(addr, &request).await;
    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    match answer {
        Ok(Response::Appended(results)) => {
            for (id, r) in ids.into_iter().zip(results) {
                if let AppendResult::Stored(ack) = r {
                    seen.acked.insert(id, ack);
                }
            }
        }
        Err(ClientError::Server(RequestError::Overloaded {
            reason,
            retry_after_ms,
        })) => {
            assert!(retry_after_ms > 0, "a retry hint: {reason}");
            *seen.overloaded.entry(bound_of(&reason)).or_default() += 1;
        }
        Ok(other) => seen.other_errors.push(format!("{other:?}")),
        Err(e) => seen.other_errors.push(e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tight_bounds_answer_overloaded_and_lose_no_acknowledged_event() {
    let (limits, memory) = tight();
    let cluster = Cluster::start(ClusterOptions {
        partitions: 1,
        limits,
        memory,
        ..ClusterOptions::default()
    });
    let main = cluster.client().await;
    cluster.wait_ready(&main).await;
    let meta = main.metadata().await.expect("metadata");
    let leader = meta.leaders[0].expect("a leader");
    let addr = cluster.nodes[cluster.index_of(leader)].addr.clone();
    let cfg = ClientConfig::load(&cluster.client_config_path()).expect("client config");

    // Three connections to the leader (the bound): main and two more,
    // each with more requests at once than its bound admits.
    let others = [
        Client::open(cfg.clone()).expect("client"),
        Client::open(cfg.clone()).expect("client"),
    ];
    let clients: Vec<Client> = std::iter::once(main.clone())
        .chain(others.iter().cloned())
        .collect();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let want: BTreeSet<&str> = ["partition queue", "connection bytes", "node bytes"].into();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    wait_until(
        "every byte bound answered Overloaded",
        Duration::from_secs(90),
        || {
            let (clients, addr, seen, next, want) = (
                clients.clone(),
                addr.clone(),
                Arc::clone(&seen),
                Arc::clone(&next),
                want.clone(),
            );
            async move {
                let mut round = Vec::new();
                for client in &clients {
                    for _ in 0..LOOPS_PER_CONNECTION {
                        let first = next.fetch_add(
                            EVENTS_PER_REQUEST as u64,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                        let (client, addr, seen) =
                            (client.clone(), addr.clone(), Arc::clone(&seen));
                        round.push(tokio::spawn(async move {
                            raw_append(&client, &addr, first, &seen).await
                        }));
                    }
                }
                for task in round {
                    task.await.expect("append task");
                }
                let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                let got: BTreeSet<&str> = seen.overloaded.keys().copied().collect();
                want.is_subset(&got).then_some(())
            }
        },
    )
    .await;

    // A fourth connection is over the connection bound: its request is
    // answered Overloaded too, not left hanging.
    let fourth = Client::open(cfg.clone()).expect("client");
    raw_append(&fourth, &addr, 1 << 40, &seen).await;
    {
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(
            seen.overloaded.get("connections"),
            Some(&1),
            "{:?}",
            seen.overloaded
        );
        assert_eq!(seen.overloaded.get("unknown"), None);
        assert!(seen.other_errors.is_empty(), "{:?}", seen.other_errors);
        assert!(!seen.acked.is_empty(), "some raw appends went through");
    }

    // Once a connection closes, the fourth client's library appends ride
    // over the bounds with backoff, as do the others'.
    drop(clients);
    drop(others);
    let mut library = BTreeMap::new();
    let appends = [(0, &fourth), (1, &main)].map(|(c, client)| {
        let client = client.clone();
        tokio::spawn(async move {
            let mut acked = BTreeMap::new();
            for b in 0..4u64 {
                let events: Vec<Event> = (0..EVENTS_PER_REQUEST as u64 * 2)
                    .map(|n| big_event(&format!("lib-{c}-{b}-{n}"), n))
                    .collect();
                let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
                let results = client.append_batch(events).await.expect("library append");
                for (id, r) in ids.into_iter().zip(results) {
                    acked.insert(id, r.expect("stored"));
                }
            }
            acked
        })
    });
    for task in appends {
        library.extend(task.await.expect("library task"));
    }
    assert_eq!(library.len(), 2 * 4 * EVENTS_PER_REQUEST * 2);
    // The fourth client's library starts on the connection it was turned
    // away on (kept open for the linger): its first attempts are answered
    // Overloaded and waited out, not failed (6 in each of three runs).
    let waited = main.overloaded_answers() + fourth.overloaded_answers();
    assert!(waited > 0, "the library waited out no Overloaded answer");

    // Every acknowledged event is stored, once, at its acked offset with
    // its acked hash, on every node.
    let mut acked = seen.lock().unwrap_or_else(|p| p.into_inner()).acked.clone();
    acked.extend(library);
    verify_acked(&main, &cluster.ids_and_addrs(), 1, &acked).await;
}
