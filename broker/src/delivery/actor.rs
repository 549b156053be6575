//! `DeliveryActor`: delivers one partition's events to one destination,
//! on that partition's leader.
//!
//! The actor is a thin driver of the sans-IO [`Core`] (every decision is
//! the core's; see [`super::core`] for the rules): it reads what the core
//! asks for from redb (the backlog stays on disk, G8), waits for new
//! events, sends batches through the sink, proposes the core's commands
//! through Raft, updates the status board and sleeps as long as the core
//! says. Its random source, the backoff jitter, is a `StdRng` seeded by
//! the supervisor (from the OS in production, from the run's seed in the
//! simulator), so a simulated run replays exactly.
//!
//! The actor owns its state in a [`Pipeline`] that each step takes, runs as
//! a future and puts back, so a step never overlaps another. A panic inside
//! a sink is caught and treated as a retryable failure: it must not take
//! the node down. A clean stop ([`Drain`]) records what was delivered but
//! not yet recorded first.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures::FutureExt;
use openraft::error::{ClientWriteError, RaftError};
use rand::rngs::StdRng;
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::config::DestinationConfig;
use super::core::{Core, Effect, Input, Now, Resume};
use super::status::StatusBoard;
use crate::clock::Clock;
use crate::metrics::DELIVERY_CURSOR_RECORDS_TOTAL;
use crate::partition::{Command, Raft};
use crate::replicated::delivery::DeliveryCommand;
use crate::sinks::{Delivery, SendOutcome, Sink, SinkFailure};
use crate::storage::PartitionReader;

/// Longest a single send may take before it counts as a retryable failure.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a stopping actor waits to record its progress.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait before trying again when progress cannot be proposed.
const PROPOSE_RETRY: Duration = Duration::from_secs(1);

/// What to do after a step.
enum Next {
    Now,
    After(Duration),
    Stop,
}

/// Everything one (destination, partition) delivery needs: the core and
/// the I/O it drives.
pub struct Pipeline {
    dest: Arc<DestinationConfig>,
    partition: u32,
    raft: Raft,
    reader: PartitionReader,
    sink: Box<dyn Sink>,
    clock: Arc<dyn Clock>,
    board: StatusBoard,
    core: Core,
    /// The core's random source (backoff jitter).
    rng: StdRng,
    /// Cuts short a wait for new events when the actor is told to drain.
    interrupt: Arc<Notify>,
    /// Raised while the partition's leadership is being handed over;
    /// progress records wait for it to fall.
    handing_over: watch::Receiver<bool>,
}

/// The partition a pipeline delivers from.
pub struct Source {
    /// Its index.
    pub partition: u32,
    /// Its Raft group, through which progress is recorded.
    pub raft: Raft,
    /// Read access to its events.
    pub reader: PartitionReader,
    /// Raised while its leadership is being handed over
    /// (`partition::rebalance`).
    pub handing_over: watch::Receiver<bool>,
}

impl Pipeline {
    /// A pipeline starting at the replicated cursor, drawing its jitter
    /// from `rng`.
    pub fn new(
        dest: Arc<DestinationConfig>,
        source: Source,
        sink: Box<dyn Sink>,
        clock: Arc<dyn Clock>,
        board: StatusBoard,
        rng: StdRng,
    ) -> Pipeline {
        let Source {
            partition,
            raft,
            reader,
            handing_over,
        } = source;
        let core = Core::new(Arc::clone(&dest), Instant::now());
        Pipeline {
            dest,
            partition,
            raft,
            reader,
            sink,
            clock,
            board,
            core,
            rng,
            interrupt: Arc::new(Notify::new()),
            handing_over,
        }
    }

    fn name(&self) -> &str {
        &self.dest.name
    }

    /// One step; see [`super::core`].
    async fn step(&mut self) -> Next {
        self.core.begin_step();
        self.drive().await
    }

    /// Records what was delivered but not yet recorded, if anything, so a
    /// node that stops cleanly hands its successor an exact cursor.
    async fn flush(&mut self) {
        if !self.core.begin_flush() {
            return;
        }
        match tokio::time::timeout(FLUSH_TIMEOUT, self.drive()).await {
            Ok(_) => {}
            // Already warned or no longer leader: the next leader starts
            // from the replicated cursor (at-least-once).
            Err(_) => warn!(
                dest = self.name(),
                partition = self.partition,
                "delivery progress not recorded within {FLUSH_TIMEOUT:?} while stopping"
            ),
        }
    }

    /// Does what the core asks until it ends the step.
    async fn drive(&mut self) -> Next {
        // The head's watch, from when the core read the head: a wait for
        // new events is for events after that.
        let mut watch: Option<watch::Receiver<u64>> = None;
        loop {
            let now = Now {
                at: Instant::now(),
                wall: self.clock.now(),
            };
            let input = match self.core.poll(now, &mut self.rng) {
                Effect::ReadDlq { limit } => {
                    Input::Dlq(self.reader.dlq(&self.dest.name, 0, limit).map_err(text))
                }
                Effect::ReadEvents { from, limit } => {
                    Input::Events(self.reader.read(from, limit).map_err(text))
                }
                Effect::ReadCursor => {
                    Input::Cursor(self.reader.cursor(&self.dest.name).map_err(text))
                }
                Effect::ReadReplay => {
                    Input::Replay(self.reader.replay(&self.dest.name).map_err(text))
                }
                Effect::ReadHead => {
                    let w = watch.insert(self.reader.watch());
                    Input::Head(*w.borrow_and_update())
                }
                Effect::WaitForEvents(max) => {
                    let w = watch.get_or_insert_with(|| self.reader.watch());
                    let came = tokio::select! {
                        changed = tokio::time::timeout(max, w.changed()) => matches!(changed, Ok(Ok(()))),
                        () = self.interrupt.notified() => false,
                    };
                    let closed = w.has_changed().is_err();
                    Input::Waited { came, closed }
                }
                Effect::Send(batch) => {
                    let (outcome, latency_ms) = self.send(&batch, false).await;
                    Input::Sent {
                        batch,
                        outcome,
                        latency_ms,
                    }
                }
                Effect::SendAgain(batch) => {
                    let (outcome, latency_ms) = self.send(&batch, true).await;
                    Input::Sent {
                        batch,
                        outcome,
                        latency_ms,
                    }
                }
                Effect::Record(next_offset) => {
                    let cmd = DeliveryCommand::Advance {
                        dest: self.dest.name.clone(),
                        next_offset,
                    };
                    if let Err(next) = self.propose(cmd).await {
                        return next;
                    }
                    metrics::counter!(
                        DELIVERY_CURSOR_RECORDS_TOTAL,
                        "dest" => self.dest.name.clone(),
                        "partition" => self.partition.to_string()
                    )
                    .increment(1);
                    continue;
                }
                Effect::Propose(cmd) => {
                    if let Err(next) = self.propose(cmd).await {
                        return next;
                    }
                    continue;
                }
                Effect::Status(change) => {
                    self.board
                        .update(&self.dest.name, self.partition, |s| change.apply(s));
                    continue;
                }
                Effect::Paused(reason) => {
                    warn!(
                        dest = self.name(),
                        partition = self.partition,
                        "delivery paused: {reason}"
                    );
                    continue;
                }
                Effect::Done(Resume::Now) => return Next::Now,
                Effect::Done(Resume::At(at)) => {
                    return Next::After(at.saturating_duration_since(Instant::now()))
                }
            };
            self.core.input(input);
        }
    }

    async fn propose(&self, cmd: DeliveryCommand) -> Result<(), Next> {
        crate::partition::rebalance::wait_out_handover(&self.handing_over).await;
        match self.raft.client_write(Command::Delivery(cmd)).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                debug!(
                    dest = self.name(),
                    partition = self.partition,
                    "no longer leader"
                );
                Err(Next::Stop)
            }
            Err(e) => {
                warn!(
                    dest = self.name(),
                    partition = self.partition,
                    "cannot record delivery progress: {e}"
                );
                Err(Next::After(PROPOSE_RETRY))
            }
        }
    }

    /// Sends through the sink (`again`: a replay or redrive, see
    /// `Sink::send_again`), bounded in time, a panic turned into a
    /// retryable failure.
    async fn send(&mut self, batch: &[Delivery], again: bool) -> (SendOutcome, u64) {
        let started = Instant::now();
        let swapped;
        let batch = if batch.len() >= 2
            && crate::replicated::planted::planted(crate::replicated::planted::PlantedBug::G4Order)
        {
            let mut b = batch.to_vec();
            b.swap(0, 1);
            swapped = b;
            &swapped[..]
        } else {
            batch
        };
        let send = if again {
            self.sink.send_again(batch)
        } else {
            self.sink.send(batch)
        };
        let send = AssertUnwindSafe(send).catch_unwind();
        let outcome = match tokio::time::timeout(SEND_TIMEOUT, send).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => SendOutcome::Failed(SinkFailure::retryable("sink panicked")),
            Err(_) => SendOutcome::Failed(SinkFailure::retryable(format!(
                "no answer within {SEND_TIMEOUT:?}"
            ))),
        };
        (outcome, started.elapsed().as_millis() as u64)
    }
}

/// An error as the text the core records.
fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Runs one step.
#[derive(Message)]
#[rtype(result = "()")]
struct Step;

/// The actor of one (destination, partition).
pub struct DeliveryActor {
    pipeline: Option<Pipeline>,
    dest: String,
    partition: u32,
    board: StatusBoard,
    /// The pipeline's: wakes a step that waits for events.
    interrupt: Arc<Notify>,
    /// A [`Drain`] came: record progress and stop instead of stepping on.
    draining: bool,
    /// Replies of [`Drain`]s waiting for the running step; dropped (which
    /// answers them) when the actor stops.
    drain_waiters: Vec<oneshot::Sender<()>>,
}

impl DeliveryActor {
    /// An actor over `pipeline`.
    pub fn new(pipeline: Pipeline) -> DeliveryActor {
        DeliveryActor {
            dest: pipeline.dest.name.clone(),
            partition: pipeline.partition,
            board: pipeline.board.clone(),
            interrupt: Arc::clone(&pipeline.interrupt),
            pipeline: Some(pipeline),
            draining: false,
            drain_waiters: Vec::new(),
        }
    }
}

impl Actor for DeliveryActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Bounded mailbox: only Step (self-sent, one at a time) and Stop.
        ctx.set_mailbox_capacity(16);
        self.board.update(&self.dest, self.partition, |_| {});
        ctx.notify(Step);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.board.remove(&self.dest, self.partition);
        self.drain_waiters.clear();
    }
}

impl Handler<Step> for DeliveryActor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Step, _ctx: &mut Context<Self>) -> Self::Result {
        if self.draining {
            return Box::pin(fut::ready(()));
        }
        let Some(mut pipeline) = self.pipeline.take() else {
            return Box::pin(fut::ready(()));
        };
        let step = async move {
            let next = pipeline.step().await;
            (pipeline, next)
        };
        Box::pin(step.into_actor(self).map(|(pipeline, next), act, ctx| {
            act.pipeline = Some(pipeline);
            if act.draining {
                ctx.notify(Flush);
                return;
            }
            match next {
                Next::Now => ctx.notify(Step),
                Next::After(d) => {
                    ctx.notify_later(Step, d);
                }
                Next::Stop => ctx.stop(),
            }
        }))
    }
}

/// Records what was delivered but not yet recorded, then stops; answers
/// once the actor has stopped (a node stopping cleanly). A step under way
/// finishes first.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

impl Handler<Drain> for DeliveryActor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) -> Self::Result {
        self.draining = true;
        self.interrupt.notify_one();
        let (tx, rx) = oneshot::channel();
        self.drain_waiters.push(tx);
        if self.pipeline.is_some() {
            // Otherwise the running step sends Flush when it returns.
            ctx.notify(Flush);
        }
        Box::pin(
            async move {
                let _ = rx.await;
            }
            .into_actor(self),
        )
    }
}

/// Records progress and stops (sent to itself while draining).
#[derive(Message)]
#[rtype(result = "()")]
struct Flush;

impl Handler<Flush> for DeliveryActor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Flush, _ctx: &mut Context<Self>) -> Self::Result {
        let Some(mut pipeline) = self.pipeline.take() else {
            return Box::pin(fut::ready(()));
        };
        let flush = async move {
            pipeline.flush().await;
            pipeline
        };
        Box::pin(flush.into_actor(self).map(|pipeline, act, ctx| {
            act.pipeline = Some(pipeline);
            ctx.stop();
        }))
    }
}

/// Stops the actor (leadership moved, node shutting down).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopDelivery;

impl Handler<StopDelivery> for DeliveryActor {
    type Result = ();

    fn handle(&mut self, _: StopDelivery, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
