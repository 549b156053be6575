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
/// Events waiting for a slot, per partition. Beyond this, appends get
/// `RetryLater`: memory per partition stays bounded however fast clients
/// push (G8).
pub const MAX_QUEUED_EVENTS: usize = 50_000;
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
            in_flight: 0,
            nodes,
            held: None,
            drained: Vec::new(),
        }
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
        if self.queued_events + msg.events.len() > MAX_QUEUED_EVENTS {
            let partition = self.partition;
            return Box::pin(async move {
                Err(RequestError::RetryLater {
                    reason: format!("partition {partition} has {MAX_QUEUED_EVENTS} events queued"),
                })
            });
        }
        let bytes = msg.events.iter().map(canonical::encoded_len).sum();
        let (tx, rx) = oneshot::channel();
        self.queued_events += msg.events.len();
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
