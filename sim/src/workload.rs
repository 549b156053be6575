//! The client workload: writers that append new events and re-send old
//! ones (same id, same content, so G5 is exercised), following redirects
//! and retrying through faults; and a reader that reads at random and
//! tails every partition from node to node. What they were told
//! (acknowledgements, events read) is what the checker holds the cluster
//! to.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use auditflow_broker::partition::NodeId;
use auditflow_protocol::partition::partition_of;
use auditflow_protocol::wire::{AppendResult, Request, RequestError, Response};
use auditflow_protocol::{Actor, Event, Hash32, Outcome, Target, Timestamp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::world::{lock, World, EPOCH_NANOS};

/// An acknowledged append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Acked {
    /// Partition the cluster said it stored the event in.
    pub partition: u32,
    /// Offset it said.
    pub offset: u64,
    /// Chain hash it said.
    pub hash: Hash32,
}

/// An event a read or a tail returned: it must be the one the log keeps
/// at that offset (no read ever sees data that is later lost or changed).
#[derive(Clone, Debug)]
pub(crate) struct Observed {
    /// The node that answered the read.
    pub node: NodeId,
    /// Partition read.
    pub partition: u32,
    /// Offset of the event in it.
    pub offset: u64,
    /// The event's id.
    pub id: String,
    /// Its chain hash.
    pub hash: Hash32,
}

/// A client: appends new events and re-sends old ones (same content, same
/// id), following redirects and retrying; records acknowledgements.
pub(crate) async fn client(world: Arc<World>, c: usize, end: Duration) {
    let mut leaders: BTreeMap<u32, NodeId> = BTreeMap::new();
    let mut hook_rng = StdRng::seed_from_u64(world.gen_range(0..u64::MAX));
    let mut n = 0u64;
    while world.now() < end {
        let resend = world.gen_bool(0.1) && !lock(&world.sent).is_empty();
        let event = if resend {
            let sent = lock(&world.sent);
            let i = lock(&world.rng).gen_range(0..sent.len());
            sent[i].clone()
        } else {
            n += 1;
            let e = event(&world, c as u64 * 1_000_000_000 + n);
            lock(&world.sent).push(e.clone());
            e
        };
        let partition = partition_of(&event, world.opts.partitions);
        let mut attempts = 0;
        while attempts < 50 && world.now() < end + Duration::from_secs(5) {
            attempts += 1;
            let up = world.ids();
            let target = leaders
                .get(&partition)
                .copied()
                .unwrap_or_else(|| up[world.gen_range(0..up.len() as u64) as usize]);
            let request = Request::Append {
                partition,
                events: vec![event.clone()],
            };
            let hooked = world
                .opts
                .client_hook
                .as_ref()
                .and_then(|h| h(&request, &mut hook_rng));
            let response = match hooked {
                Some(r) => r,
                None => {
                    world
                        .net
                        .client_request(target, request, Duration::from_secs(2))
                        .await
                }
            };
            match response {
                Response::Appended(results) => {
                    match results.into_iter().next() {
                        Some(AppendResult::Stored(ack)) => record_ack(&world, &event.id, ack),
                        Some(AppendResult::Rejected(e)) => {
                            world.violation(format!("event {} rejected: {e}", event.id))
                        }
                        None => world.violation("append answered without a result".into()),
                    }
                    break;
                }
                Response::Error(RequestError::NotLeader {
                    leader: Some(l), ..
                }) => {
                    leaders.insert(partition, l.id);
                }
                Response::Error(_) => {
                    leaders.remove(&partition);
                    let pause = world.gen_range(5..100);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                other => {
                    world.violation(format!("unexpected answer to an append: {other:?}"));
                    break;
                }
            }
        }
        let think = world.gen_range(0..30);
        tokio::time::sleep(Duration::from_millis(think)).await;
    }
}

/// A reader: random reads from any node, and a tail of every partition
/// that follows its position from node to node (long polls), as a client
/// failing over would. Records what it saw for the checker; a tail must
/// get its events contiguously from where it asked.
pub(crate) async fn reader(world: Arc<World>, end: Duration) {
    let partitions = world.opts.partitions;
    let mut tails: BTreeMap<u32, u64> = (0..partitions).map(|p| (p, 0)).collect();
    while world.now() < end {
        let up = world.ids();
        let node = up[world.gen_range(0..up.len() as u64) as usize];
        let partition = world.gen_range(0..u64::from(partitions)) as u32;
        let tail = world.gen_bool(0.5);
        let from_offset = if tail {
            tails[&partition]
        } else {
            world.gen_range(0..tails[&partition] + 20)
        };
        let request = Request::Read {
            partition,
            from_offset,
            limit: 50,
            wait_ms: if tail { 500 } else { 0 },
        };
        let response = world
            .net
            .client_request(node, request, Duration::from_secs(2))
            .await;
        if let Response::Events(page) = response {
            let mut expect = from_offset;
            for e in &page.events {
                if e.partition != partition || e.offset != expect {
                    world.violation(format!(
                        "read: node {node} p{partition} from o{from_offset} returned p{} o{} where o{expect} was due",
                        e.partition, e.offset
                    ));
                    break;
                }
                expect += 1;
                lock(&world.observed).push(Observed {
                    node,
                    partition,
                    offset: e.offset,
                    id: e.event.id.clone(),
                    hash: e.hash,
                });
            }
            if tail && expect > from_offset {
                world.trace(format!(
                    "tail p{partition} o{from_offset}..o{expect} from node {node}"
                ));
                tails.insert(partition, expect);
            }
        }
        let think = world.gen_range(10..200);
        tokio::time::sleep(Duration::from_millis(think)).await;
    }
}

/// Appends `count` new events in batches of `per_request` (ids
/// `b{first}`.. on, unique in the run), to each partition's leader,
/// following redirects and retrying; records acknowledgements. A burst
/// that builds a delivery backlog fast (the progress phase).
pub(crate) async fn burst(world: Arc<World>, first: u64, count: u64, per_request: usize) {
    let partitions = world.opts.partitions;
    let mut by_partition: BTreeMap<u32, Vec<Event>> = BTreeMap::new();
    for n in first..first + count {
        let mut e = event(&world, n);
        e.id = format!("b{n}");
        by_partition
            .entry(partition_of(&e, partitions))
            .or_default()
            .push(e);
    }
    let mut leaders: BTreeMap<u32, NodeId> = BTreeMap::new();
    for (partition, events) in by_partition {
        for chunk in events.chunks(per_request.max(1)) {
            let mut attempts = 0;
            while attempts < 50 {
                attempts += 1;
                let up = world.ids();
                let target = leaders
                    .get(&partition)
                    .copied()
                    .unwrap_or_else(|| up[world.gen_range(0..up.len() as u64) as usize]);
                let request = Request::Append {
                    partition,
                    events: chunk.to_vec(),
                };
                match world
                    .net
                    .client_request(target, request, Duration::from_secs(2))
                    .await
                {
                    Response::Appended(results) => {
                        if results.len() != chunk.len() {
                            world.violation(format!(
                                "append of {} events answered with {} results",
                                chunk.len(),
                                results.len()
                            ));
                        }
                        for (e, r) in chunk.iter().zip(results) {
                            match r {
                                AppendResult::Stored(ack) => record_ack(&world, &e.id, ack),
                                AppendResult::Rejected(err) => {
                                    world.violation(format!("event {} rejected: {err}", e.id))
                                }
                            }
                        }
                        break;
                    }
                    Response::Error(RequestError::NotLeader {
                        leader: Some(l), ..
                    }) => {
                        leaders.insert(partition, l.id);
                    }
                    Response::Error(_) => {
                        leaders.remove(&partition);
                        let pause = world.gen_range(5..100);
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                    other => {
                        world.violation(format!("unexpected answer to an append: {other:?}"));
                        break;
                    }
                }
            }
        }
    }
}

fn record_ack(world: &World, id: &str, ack: auditflow_protocol::wire::Ack) {
    let got = Acked {
        partition: ack.partition,
        offset: ack.offset,
        hash: ack.hash,
    };
    let mut acked = lock(&world.acked);
    match acked.get(id) {
        Some(prev) if *prev != got => {
            let msg = format!("G5: {id} acknowledged at {prev:?} and again at {got:?}");
            drop(acked);
            world.violation(msg);
        }
        Some(_) => {}
        None => {
            acked.insert(id.to_string(), got.clone());
            drop(acked);
            world.trace(format!(
                "ack {id} p{} o{} {}",
                got.partition,
                got.offset,
                &got.hash.to_hex()[..12]
            ));
        }
    }
}

/// The `n`th new event: unique id, random tenant and actor, so the
/// destinations' tenant filters match some and not others.
fn event(world: &World, n: u64) -> Event {
    let tenant = format!("t{}", world.gen_range(0..7));
    Event {
        id: format!("e{n}"),
        tenant,
        time: Timestamp(EPOCH_NANOS + n as i64),
        actor: Actor {
            id: format!("u{}", world.gen_range(0..50)),
            kind: "user".into(),
            name: None,
            ip: None,
        },
        action: "doc.read".into(),
        target: Target {
            kind: "doc".into(),
            id: format!("d{n}"),
        },
        outcome: Outcome::Success,
        source: None,
        context: Default::default(),
        data: None,
        schema_version: None,
        partition_key: None,
    }
}
