//! `PartitionActor`: the write path of one partition on this node.
//!
//! It turns concurrent client appends into few Raft entries (group commit):
//! while fewer than [`MAX_IN_FLIGHT_WRITES`] entries are being replicated a
//! new append is proposed at once; beyond that, appends queue and the next
//! free slot proposes everything queued as one entry. Under load this makes
//! entries large and fsyncs rare; when idle, latency is one round.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use auditflow_protocol::wire::{AppendResult, NodeAddr, RequestError};
use auditflow_protocol::{canonical, Event};
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::oneshot;

use super::{Command, CommandResponse, NodeId, Raft};
use crate::clock::Clock;

/// Raft entries of one partition being replicated at once. Two lets one
/// entry fill while another is on its way, so many independent clients
/// still overlap; more made entries smaller without making anything
/// faster, since each entry costs a durable commit on every node (the
/// client keeps one request per partition in flight for the same reason).
pub const MAX_IN_FLIGHT_WRITES: usize = 2;
/// Events waiting for a slot, per partition, besides the bound in bytes
/// (`memory.queued_append_bytes_per_partition`): many tiny events cost
/// per-event work and allocations that their bytes understate.
pub const MAX_QUEUED_EVENTS: usize = 50_000;
/// Bytes counted per queued event on top of its canonical encoding: the
/// `Event` struct, its strings' allocations and the queue entry, so that
/// the byte bound holds for small events too (an `Event` with short
/// fields is about this large in memory).
pub const QUEUED_EVENT_OVERHEAD_BYTES: usize = 512;
/// Default bound on queued bytes per partition, for an actor not told
/// otherwise (`memory.queued_append_bytes_per_partition`'s default).
pub const DEFAULT_QUEUED_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// The retry hint of a full queue: about two group-commit rounds, after
/// which the queue has been proposed.
pub const QUEUE_FULL_RETRY_AFTER_MS: u32 = 50;

/// Whether an append of `events` events and `bytes` bytes fits the queue
/// that holds `queued_events` and `queued_bytes` (pure). An append to an
/// empty queue always fits: a request is at most one batch, which must go
/// through whatever the bound, and queues of one request cannot grow.
pub fn admit(
    queued_events: usize,
    queued_bytes: u64,
    events: usize,
    bytes: u64,
    bytes_max: u64,
) -> Result<(), String> {
    if queued_events == 0 {
        return Ok(());
    }
    if queued_events + events > MAX_QUEUED_EVENTS {
        return Err(format!(
            "{queued_events} events queued (at most {MAX_QUEUED_EVENTS})"
        ));
    }
    if queued_bytes.saturating_add(bytes) > bytes_max {
        return Err(format!("{queued_bytes} bytes queued (at most {bytes_max})"));
    }
    Ok(())
}
/// A proposal not committed within this time is reported as unavailable;
/// the client retries with the same ids, which dedup makes safe.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Appends validated events that all belong to this partition.
#[derive(Message, Debug)]
#[rtype(result = "Result<Vec<AppendResult>, RequestError>")]
pub struct Append {
    /// The events; each already validated and routed here.
    pub events: Vec<Event>,
}

/// Where the results of one append go.
type Reply = oneshot::Sender<Result<Vec<AppendResult>, RequestError>>;

struct Waiter {
    events: Vec<Event>,
    bytes: usize,
    reply: Reply,
}

/// The actor owning one partition's write path on this node.
pub struct PartitionActor {
    /// The partition.
    partition: u32,
    /// Its Raft group.
    raft: Raft,
    /// Source of `received_at`.
    clock: Arc<dyn Clock>,
    /// Largest Raft entry, in events and canonical bytes (the cluster's
    /// batch limits, so one entry is never larger than one request could be).
    max_entry_events: usize,
    max_entry_bytes: usize,
    /// Appends waiting for a write slot, oldest first.
    queue: VecDeque<Waiter>,
    /// Events in `queue`, for the [`MAX_QUEUED_EVENTS`] bound.
    queued_events: usize,
    /// Bytes in `queue` as [`admit`] counts them, for `queued_bytes_max`.
    queued_bytes: u64,
    /// Bound on `queued_bytes` (G8).
    queued_bytes_max: u64,
    /// Entries proposed and not yet answered.
    in_flight: usize,
    /// Node addresses, to turn openraft's leader hint into a redirect.
    nodes: Arc<Vec<NodeAddr>>,
    /// Set while leadership is being handed over (`Hold`): appends queue
    /// instead of being proposed, so the log stops growing and the next
    /// leader can hold all of it. Cleared by `Release` or when the hold's
    /// own deadline passes (the task that held it may have died).
    held: Option<SpawnHandle>,
    /// Told once no proposal of this actor is in flight, for a `Hold`
    /// whose caller waits until the log stops growing.
    drained: Vec<oneshot::Sender<()>>,
}

impl PartitionActor {
    /// An actor for `partition` proposing through `raft`.
    pub fn new(
        partition: u32,
        raft: Raft,
        clock: Arc<dyn Clock>,
        limits: auditflow_protocol::Limits,
        nodes: Arc<Vec<NodeAddr>>,
    ) -> Self {
        PartitionActor {
            partition,
            raft,
            clock,
            max_entry_events: limits.max_batch_events.max(1),
            max_entry_bytes: limits.max_batch_bytes.max(1),
            queue: VecDeque::new(),
            queued_events: 0,
            queued_bytes: 0,
            queued_bytes_max: DEFAULT_QUEUED_BYTES_MAX,
            in_flight: 0,
            nodes,
            held: None,
            drained: Vec::new(),
        }
    }

    /// Bounds the bytes of appends queued for a write slot.
    pub fn with_queued_bytes_max(mut self, bytes: u64) -> Self {
        self.queued_bytes_max = bytes;
        self
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        while self.held.is_none() && self.in_flight < MAX_IN_FLIGHT_WRITES && !self.queue.is_empty()
        {
            let mut waiters: Vec<(usize, oneshot::Sender<_>)> = Vec::new();
            let mut events: Vec<Event> = Vec::new();
            let mut bytes = 0usize;
            while let Some(next) = self.queue.front() {
                let fits = events.len() + next.events.len() <= self.max_entry_events
                    && bytes + next.bytes <= self.max_entry_bytes;
                if !events.is_empty() && !fits {
                    break;
                }
                let Some(w) = self.queue.pop_front() else {
                    break;
                };
                self.queued_events -= w.events.len();
                self.queued_bytes -= queued_bytes(w.events.len(), w.bytes);
                bytes += w.bytes;
                waiters.push((w.events.len(), w.reply));
                events.extend(w.events);
            }
            self.in_flight += 1;
            let raft = self.raft.clone();
            let cmd = Command::Append {
                received_at: self.clock.now(),
                events: events.into(),
            };
            let write =
                async move { tokio::time::timeout(WRITE_TIMEOUT, raft.client_write(cmd)).await };
            ctx.spawn(write.into_actor(self).map(move |res, act, ctx| {
                act.in_flight -= 1;
                let outcome = match res {
                    Ok(Ok(resp)) => match resp.data {
                        CommandResponse::Appended(results) => Ok(results),
                        CommandResponse::Empty | CommandResponse::Delivery { .. } => {
                            Err(RequestError::Internal {
                                reason: "append entry applied without results".into(),
                            })
                        }
                    },
                    Ok(Err(e)) => Err(act.map_write_error(e)),
                    Err(_) => Err(RequestError::Unavailable {
                        partition: act.partition,
                        reason: format!("not committed within {WRITE_TIMEOUT:?}"),
                    }),
                };
                distribute(outcome, waiters);
                if act.in_flight == 0 {
                    for tx in act.drained.drain(..) {
                        let _ = tx.send(());
                    }
                }
                act.flush(ctx);
            }));
        }
    }

    fn map_write_error(
        &self,
        e: RaftError<NodeId, ClientWriteError<NodeId, openraft::BasicNode>>,
    ) -> RequestError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => RequestError::NotLeader {
                partition: self.partition,
                leader: f
                    .leader_id
                    .and_then(|id| self.nodes.iter().find(|n| n.id == id).cloned()),
            },
            RaftError::APIError(other) => RequestError::Internal {
                reason: other.to_string(),
            },
            RaftError::Fatal(f) => RequestError::Unavailable {
                partition: self.partition,
                reason: format!("raft group stopped: {f}"),
            },
        }
    }
}

/// Bytes an append counts in the queue: its canonical bytes plus the
/// per-event overhead.
fn queued_bytes(events: usize, bytes: usize) -> u64 {
    (bytes as u64)
        .saturating_add((events as u64).saturating_mul(QUEUED_EVENT_OVERHEAD_BYTES as u64))
}

/// Hands each waiter its slice of the entry's results, in order.
fn distribute(outcome: Result<Vec<AppendResult>, RequestError>, waiters: Vec<(usize, Reply)>) {
    match outcome {
        Ok(results) => {
            let total: usize = waiters.iter().map(|(n, _)| n).sum();
            if results.len() != total {
                let err = RequestError::Internal {
                    reason: format!("{} results for {total} events", results.len()),
                };
                for (_, tx) in waiters {
                    let _ = tx.send(Err(err.clone()));
                }
                return;
            }
            let mut rest = results.into_iter();
            for (n, tx) in waiters {
                let mine: Vec<AppendResult> = rest.by_ref().take(n).collect();
                // The requester may have gone (timeout); its events are
                // stored all the same and a retry will find them by id.
                let _ = tx.send(Ok(mine));
            }
        }
        Err(e) => {
            for (_, tx) in waiters {
                let _ = tx.send(Err(e.clone()));
            }
        }
    }
}

impl Actor for PartitionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Bounded mailbox: senders wait rather than pile up messages.
        ctx.set_mailbox_capacity(1024);
    }
}

impl Handler<Append> for PartitionActor {
    type Result = ResponseFuture<Result<Vec<AppendResult>, RequestError>>;

    fn handle(&mut self, msg: Append, ctx: &mut Context<Self>) -> Self::Result {
        let bytes: usize = msg.events.iter().map(canonical::encoded_len).sum();
        let counted = queued_bytes(msg.events.len(), bytes);
        if let Err(why) = admit(
            self.queued_events,
            self.queued_bytes,
            msg.events.len(),
            counted,
            self.queued_bytes_max,
        ) {
            let partition = self.partition;
            return Box::pin(async move {
                Err(RequestError::Overloaded {
                    reason: format!("partition {partition} has {why}"),
                    retry_after_ms: QUEUE_FULL_RETRY_AFTER_MS,
                })
            });
        }
        let (tx, rx) = oneshot::channel();
        self.queued_events += msg.events.len();
        self.queued_bytes += counted;
        self.queue.push_back(Waiter {
            events: msg.events,
            bytes,
            reply: tx,
        });
        self.flush(ctx);
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                Err(RequestError::Internal {
                    reason: "partition actor stopped".into(),
                })
            })
        })
    }
}

/// Stops proposing appends for at most `for_at_most` (they queue), while
/// leadership is handed to another node (`partition::rebalance`). Answers
/// once the appends already proposed have been answered, so that they are
/// in the log (or failed) before the caller compares logs.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Hold {
    /// When the hold ends by itself if no `Release` came.
    pub for_at_most: Duration,
}

/// Ends a `Hold`: queued appends are proposed (and answered with a
/// redirect if this node is no longer the leader).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Release;

impl Handler<Hold> for PartitionActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Hold, ctx: &mut Context<Self>) -> Self::Result {
        if let Some(previous) = self.held.take() {
            ctx.cancel_future(previous);
        }
        self.held = Some(ctx.run_later(msg.for_at_most, |act, ctx| {
            act.held = None;
            act.drained.clear();
            act.flush(ctx);
        }));
        if self.in_flight == 0 {
            return Box::pin(async {});
        }
        let (tx, rx) = oneshot::channel();
        self.drained.push(tx);
        Box::pin(async move {
            // A dropped sender (the hold expired) ends the wait as well.
            let _ = rx.await;
        })
    }
}

impl Handler<Release> for PartitionActor {
    type Result = ();

    fn handle(&mut self, _: Release, ctx: &mut Context<Self>) {
        if let Some(held) = self.held.take() {
            ctx.cancel_future(held);
        }
        self.flush(ctx);
    }
}

/// Stops the Raft group when the actor stops.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for PartitionActor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Shutdown, _ctx: &mut Context<Self>) -> Self::Result {
        let raft = self.raft.clone();
        Box::pin(
            async move {
                let _ = raft.shutdown().await;
            }
            .into_actor(self)
            .map(|_, _, ctx| ctx.stop()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The queue's admission: (queued events, queued bytes, new events,
    /// new bytes, bound) → admitted, or refused naming the bound.
    #[test]
    fn appends_are_admitted_up_to_the_byte_bound() {
        /// Queued events and bytes, new events and bytes, the bound, and
        /// the refusal's text if refused.
        type Case = (usize, u64, usize, u64, u64, Option<&'static str>);
        let table: [Case; 7] = [
            (0, 0, 1, 100, 1_000, None),
            (1, 500, 1, 500, 1_000, None),
            (
                1,
                500,
                1,
                501,
                1_000,
                Some("500 bytes queued (at most 1000)"),
            ),
            // An empty queue takes a request larger than the bound: it is
            // one batch at most, and must go through.
            (0, 0, 10, 5_000, 1_000, None),
            (
                MAX_QUEUED_EVENTS - 1,
                0,
                2,
                0,
                u64::MAX,
                Some("events queued"),
            ),
            (MAX_QUEUED_EVENTS - 1, 0, 1, 0, u64::MAX, None),
            (3, u64::MAX - 1, 1, 10, u64::MAX - 5, Some("bytes queued")),
        ];
        for (qe, qb, e, b, max, refused) in table {
            let got = admit(qe, qb, e, b, max);
            match refused {
                None => assert_eq!(got, Ok(()), "{qe} {qb} {e} {b} {max}"),
                Some(needle) => {
                    let err = got.expect_err(needle);
                    assert!(err.contains(needle), "{err}");
                }
            }
        }
        // Small events count their overhead: 1,000 empty events are not
        // free.
        assert_eq!(
            queued_bytes(1_000, 0),
            1_000 * QUEUED_EVENT_OVERHEAD_BYTES as u64
        );
        assert_eq!(
            queued_bytes(2, 100),
            100 + 2 * QUEUED_EVENT_OVERHEAD_BYTES as u64
        );
    }
}
