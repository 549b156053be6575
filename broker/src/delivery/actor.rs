//! `DeliveryActor`: delivers one partition's events to one destination,
//! on that partition's leader.
//!
//! Each step reads the next batch after the replicated cursor from redb
//! (the backlog stays on disk, G8), filters and masks it, sends it through
//! the sink, and proposes the outcome through Raft: a cursor advance, or
//! parked events with their attempt history. Order is kept (G4): the
//! head-of-line event blocks the ones after it until it is delivered or
//! parked. Retryable failures back off with full jitter; a circuit breaker
//! stops hammering a dead endpoint. Redriven DLQ entries are sent before
//! the stream continues. A replay window (events an operator asked to
//! re-deliver) is worked off in batches that alternate with the live
//! stream's, so neither starves the other.
//!
//! The cursor is recorded through Raft at most every [`RECORD_INTERVAL`]
//! rather than after every batch: each record is a Raft entry and a
//! durable commit on every node, and they were a third of all entries
//! under load (half at a trickle). What was delivered but not yet recorded
//! is kept in memory (and delivery continues after it); it is recorded
//! when the interval has passed, at once when a send fails, and before
//! the node stops cleanly ([`Drain`]). A leader change in between (a
//! crash, a partition) re-delivers at most that much, as a crash between
//! a sink's confirmation and its record always could (at-least-once,
//! G2); the cursor never runs ahead of the sink.
//!
//! The actor owns its state in a [`Pipeline`] that each step takes, runs as
//! a future and puts back, so a step never overlaps another. A panic inside
//! a sink is caught and treated as a retryable failure: it must not take
//! the node down.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use auditflow_protocol::StoredEvent;
use futures::FutureExt;
use openraft::error::{ClientWriteError, RaftError};
use rand::Rng;
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::breaker::Breaker;
use super::config::DestinationConfig;
use super::mask;
use super::status::StatusBoard;
use crate::clock::Clock;
use crate::metrics::DELIVERY_CURSOR_RECORDS_TOTAL;
use crate::partition::{Command, Raft};
use crate::replicated::delivery::{push_attempt, AttemptRecord, DeliveryCommand, DlqEntry};
use crate::replicated::runtime::ThreadRng;
use crate::sinks::{Body, Delivery, SendOutcome, Sink, SinkFailure};
use crate::storage::PartitionReader;

/// Longest a single send may take before it counts as a retryable failure.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an idle actor waits for new events before looking again.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// Longest a confirmed delivery stays unrecorded (unless the record
/// itself cannot be proposed).
const RECORD_INTERVAL: Duration = Duration::from_millis(100);
/// Longest a stopping actor waits to record its progress.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Redriven entries handled per step.
const REDRIVE_BATCH: usize = 100;
/// DLQ entries scanned per step looking for redrive marks.
const REDRIVE_SCAN: usize = 10_000;

/// What to do after a step.
enum Next {
    Now,
    After(Duration),
    Stop,
}

/// Everything one (destination, partition) delivery needs.
pub struct Pipeline {
    dest: Arc<DestinationConfig>,
    partition: u32,
    raft: Raft,
    reader: PartitionReader,
    sink: Box<dyn Sink>,
    clock: Arc<dyn Clock>,
    board: StatusBoard,
    attempts: u32,
    history: Vec<AttemptRecord>,
    failing_since: Option<Instant>,
    breaker: Breaker,
    /// Shrinks to 1 to isolate the bad event when a sink refuses a whole
    /// batch permanently.
    batch_limit: usize,
    lingered: bool,
    /// Whether this step is the replay window's turn.
    replay_turn: bool,
    /// Like `batch_limit`, for the replay window.
    replay_limit: usize,
    /// Failed attempts on the replay window's head batch.
    replay_attempts: u32,
    /// Delivery confirmed by the sink but not yet recorded through Raft:
    /// the replicated cursor it was based on, and the next offset to send.
    unrecorded: Option<(u64, u64)>,
    /// When the cursor was last recorded.
    last_record: Instant,
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
    /// A pipeline starting at the replicated cursor.
    pub fn new(
        dest: Arc<DestinationConfig>,
        source: Source,
        sink: Box<dyn Sink>,
        clock: Arc<dyn Clock>,
        board: StatusBoard,
    ) -> Pipeline {
        let Source {
            partition,
            raft,
            reader,
            handing_over,
        } = source;
        let breaker = Breaker::new(dest.breaker.clone());
        let batch_limit = dest.batch_size;
        Pipeline {
            dest,
            partition,
            raft,
            reader,
            sink,
            clock,
            board,
            attempts: 0,
            history: Vec::new(),
            failing_since: None,
            breaker,
            batch_limit,
            lingered: false,
            replay_turn: false,
            replay_limit: batch_limit,
            replay_attempts: 0,
            unrecorded: None,
            last_record: Instant::now(),
            interrupt: Arc::new(Notify::new()),
            handing_over,
        }
    }

    /// Waits up to `max` for events after `watch`'s last seen head; `true`
    /// if some came, `false` on timeout, a closed state machine or an
    /// interrupt.
    async fn wait_for_events(&self, watch: &mut watch::Receiver<u64>, max: Duration) -> bool {
        tokio::select! {
            changed = tokio::time::timeout(max, watch.changed()) => matches!(changed, Ok(Ok(()))),
            () = self.interrupt.notified() => false,
        }
    }

    fn name(&self) -> &str {
        &self.dest.name
    }

    fn to_delivery(&self, e: &StoredEvent) -> Result<Delivery, String> {
        let body = if self.dest.masking.is_empty() {
            // Straight to text: no `Value` to build and walk.
            Body::render(e).map_err(|err| format!("encode event: {err}"))?
        } else {
            let mut body = serde_json::to_value(e).map_err(|err| format!("encode event: {err}"))?;
            let key = self.dest.mask_key.as_deref().unwrap_or("").as_bytes();
            if let Some(event) = body.get_mut("event") {
                mask::apply(&self.dest.masking, key, event);
            }
            Body::from_value(&body)
        };
        Ok(Delivery {
            partition: e.partition,
            offset: e.offset,
            event_id: e.event.id.clone(),
            tenant: e.event.tenant.clone(),
            received_at: e.received_at,
            hash: e.hash,
            body,
        })
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
                Err(Next::After(Duration::from_secs(1)))
            }
        }
    }

    async fn send(&mut self, batch: &[Delivery]) -> (SendOutcome, u64) {
        let started = Instant::now();
        let send = AssertUnwindSafe(self.sink.send(batch)).catch_unwind();
        let outcome = match tokio::time::timeout(SEND_TIMEOUT, send).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => SendOutcome::Failed(SinkFailure::retryable("sink panicked")),
            Err(_) => SendOutcome::Failed(SinkFailure::retryable(format!(
                "no answer within {SEND_TIMEOUT:?}"
            ))),
        };
        (outcome, started.elapsed().as_millis() as u64)
    }

    fn record(&self, f: &SinkFailure, latency_ms: u64) -> AttemptRecord {
        AttemptRecord {
            at: self.clock.now(),
            error: f.message.clone(),
            status: f.status,
            response_excerpt: f.response_excerpt.clone(),
            latency_ms,
            permanent: !f.is_retryable(),
        }
    }

    fn parked(&self, d: &Delivery, history: Vec<AttemptRecord>, reason: String) -> (u64, DlqEntry) {
        (
            d.offset,
            DlqEntry {
                event_id: d.event_id.clone(),
                parked_at: self.clock.now(),
                reason,
                attempts: history,
                redrive: false,
            },
        )
    }

    fn succeeded(&mut self, delivered: u64) {
        self.attempts = 0;
        self.history.clear();
        self.failing_since = None;
        self.breaker.success();
        self.batch_limit = self.dest.batch_size;
        let now = self.clock.now();
        self.board.update(&self.dest.name, self.partition, |s| {
            s.last_success = Some(now);
            s.attempts = 0;
            s.delivered += delivered;
            s.breaker = super::breaker::BreakerState::Closed;
        });
    }

    /// A retryable failure of the head-of-line item `head`: back off, or
    /// park it once the policy gives up. Returns what to do next.
    async fn retry_or_park(&mut self, head: &Delivery, f: &SinkFailure, latency_ms: u64) -> Next {
        // The stream stalls here: what went through before is recorded now.
        if let Err(next) = self.record_progress().await {
            return next;
        }
        let now = Instant::now();
        self.attempts += 1;
        let since = *self.failing_since.get_or_insert(now);
        let record = self.record(f, latency_ms);
        push_attempt(&mut self.history, record);
        self.breaker.failure(now);
        let attempts = self.attempts;
        let breaker = self.breaker.state(now);
        self.board.update(&self.dest.name, self.partition, |s| {
            s.last_error = Some(f.message.clone());
            s.attempts = attempts;
            s.breaker = breaker;
        });
        if self.dest.retry.exhausted(self.attempts, now - since) {
            let history = std::mem::take(&mut self.history);
            let reason = format!("gave up after {} attempts: {}", self.attempts, f.message);
            let entry = self.parked(head, history, reason);
            let cmd = DeliveryCommand::Park {
                dest: self.dest.name.clone(),
                entries: vec![entry],
                next_offset: Some(head.offset + 1),
            };
            if let Err(next) = self.propose(cmd).await {
                return next;
            }
            self.attempts = 0;
            self.failing_since = None;
            return Next::Now;
        }
        let retry_after = match &f.kind {
            crate::sinks::FailureKind::Retryable { retry_after } => *retry_after,
            crate::sinks::FailureKind::Permanent => None,
        };
        let unit: f64 = ThreadRng.gen();
        let delay = self.dest.retry.delay(self.attempts, unit, retry_after);
        Next::After(delay.max(self.breaker.wait(now)))
    }

    /// One step; see the module documentation.
    async fn step(&mut self) -> Next {
        match self.redrive_step().await {
            Ok(true) => return Next::Now,
            Ok(false) => {}
            Err(next) => return next,
        }
        self.replay_turn = !self.replay_turn;
        if self.replay_turn {
            match self.replay_step().await {
                Ok(true) => return Next::Now,
                Ok(false) => {}
                Err(next) => return next,
            }
        }
        let replicated = match self.reader.cursor(&self.dest.name) {
            Ok(c) => c,
            Err(e) => return self.storage_trouble(e),
        };
        let cursor = match self.unrecorded {
            Some((base, next)) if base == replicated && next > replicated => next,
            // Moved underneath (an operator's `SetCursor`) or overtaken:
            // the replicated cursor rules.
            _ => {
                self.unrecorded = None;
                replicated
            }
        };
        let mut watch = self.reader.watch();
        let head = *watch.borrow_and_update();
        if cursor >= head {
            self.lingered = false;
            if self.unrecorded.is_some() {
                // Caught up. Record once no new event came for the rest of
                // the interval: a steady trickle would otherwise cost a
                // Raft entry per batch.
                let left = RECORD_INTERVAL.saturating_sub(self.last_record.elapsed());
                if !left.is_zero() && self.wait_for_events(&mut watch, left).await {
                    return Next::Now;
                }
                return match self.record_progress().await {
                    Ok(()) => Next::Now,
                    Err(next) => next,
                };
            }
            if matches!(self.reader.replay(&self.dest.name), Ok(Some(_))) {
                // Nothing new: the replay window's turn again.
                return Next::Now;
            }
            if !self.wait_for_events(&mut watch, IDLE_WAIT).await && watch.has_changed().is_err() {
                // The state machine is gone (shutting down): waiting on it
                // again would return at once; the supervisor stops us.
                return Next::After(IDLE_WAIT);
            }
            return Next::Now;
        }
        // A partial batch: give it a moment to fill, once.
        if head - cursor < self.batch_limit as u64 && !self.lingered && self.dest.linger_ms > 0 {
            self.lingered = true;
            return Next::After(Duration::from_millis(self.dest.linger_ms));
        }
        self.lingered = false;
        let events = match self.reader.read(cursor, self.batch_limit) {
            Ok(e) => e,
            Err(e) => return self.storage_trouble(e),
        };
        let Some(last) = events.last().map(|e| e.offset) else {
            return Next::After(IDLE_WAIT);
        };
        let mut batch = Vec::with_capacity(events.len());
        for e in events.iter().filter(|e| self.dest.filter.matches(&e.event)) {
            match self.to_delivery(e) {
                Ok(d) => batch.push(d),
                Err(reason) => return self.storage_trouble(reason),
            }
        }
        if batch.is_empty() {
            return self.advance(replicated, last + 1, 0).await;
        }
        let wait = self.breaker.wait(Instant::now());
        if !wait.is_zero() {
            return Next::After(wait);
        }
        let (outcome, latency_ms) = self.send(&batch).await;
        match outcome {
            SendOutcome::Delivered => self.advance(replicated, last + 1, batch.len() as u64).await,
            SendOutcome::Failed(f) if f.is_retryable() => {
                let head = batch[0].clone();
                self.retry_or_park(&head, &f, latency_ms).await
            }
            SendOutcome::Failed(f) => {
                if batch.len() > 1 {
                    // Which event is refused? Send one at a time until the
                    // bad one is found; the good ones go through.
                    self.batch_limit = 1;
                    return Next::Now;
                }
                let mut history = std::mem::take(&mut self.history);
                push_attempt(&mut history, self.record(&f, latency_ms));
                let entry = self.parked(&batch[0], history, f.message.clone());
                self.park_and_advance(vec![entry], batch[0].offset + 1, &f)
                    .await
            }
            SendOutcome::PerItem(results) => self.per_item(&batch, results, last, latency_ms).await,
        }
    }

    async fn per_item(
        &mut self,
        batch: &[Delivery],
        results: Vec<Result<(), SinkFailure>>,
        last: u64,
        latency_ms: u64,
    ) -> Next {
        let mut parked = Vec::new();
        let mut delivered = 0u64;
        let mut blocked: Option<(usize, SinkFailure)> = None;
        for (i, d) in batch.iter().enumerate() {
            match results.get(i) {
                Some(Ok(())) => delivered += 1,
                Some(Err(f)) if !f.is_retryable() => {
                    let mut history = if i == 0 {
                        std::mem::take(&mut self.history)
                    } else {
                        Vec::new()
                    };
                    push_attempt(&mut history, self.record(f, latency_ms));
                    parked.push(self.parked(d, history, f.message.clone()));
                }
                Some(Err(f)) => {
                    blocked = Some((i, f.clone()));
                    break;
                }
                None => {
                    blocked = Some((i, SinkFailure::retryable("sink returned too few results")));
                    break;
                }
            }
        }
        let next_offset = match &blocked {
            Some((i, _)) => batch[*i].offset,
            None => last + 1,
        };
        let first_failure = parked
            .first()
            .map(|(_, e)| e.reason.clone())
            .unwrap_or_default();
        if !parked.is_empty() {
            let cmd = DeliveryCommand::Park {
                dest: self.dest.name.clone(),
                entries: parked,
                next_offset: Some(next_offset),
            };
            if let Err(next) = self.propose(cmd).await {
                return next;
            }
            let msg = first_failure.clone();
            self.board.update(&self.dest.name, self.partition, |s| {
                s.last_error = Some(msg)
            });
        } else if next_offset > batch[0].offset {
            let cmd = DeliveryCommand::Advance {
                dest: self.dest.name.clone(),
                next_offset,
            };
            if let Err(next) = self.propose(cmd).await {
                return next;
            }
        }
        match blocked {
            None => {
                self.succeeded(delivered);
                Next::Now
            }
            Some((i, f)) => {
                if i > 0 || delivered > 0 {
                    // Progress was made: the head of line is a new event.
                    self.attempts = 0;
                    self.history.clear();
                    self.failing_since = None;
                }
                let head = batch[i].clone();
                self.retry_or_park(&head, &f, latency_ms).await
            }
        }
    }

    async fn park_and_advance(
        &mut self,
        entries: Vec<(u64, DlqEntry)>,
        next: u64,
        f: &SinkFailure,
    ) -> Next {
        let cmd = DeliveryCommand::Park {
            dest: self.dest.name.clone(),
            entries,
            next_offset: Some(next),
        };
        if let Err(n) = self.propose(cmd).await {
            return n;
        }
        self.attempts = 0;
        self.failing_since = None;
        self.batch_limit = self.dest.batch_size;
        let msg = f.message.clone();
        self.board.update(&self.dest.name, self.partition, |s| {
            s.last_error = Some(msg);
            s.attempts = 0;
        });
        Next::Now
    }

    /// Moves the delivery past `next_offset - 1`, which the sink confirmed,
    /// from the `replicated` cursor this step started at. Recorded at once
    /// unless the cursor was recorded less than [`RECORD_INTERVAL`] ago
    /// (see the module docs).
    async fn advance(&mut self, replicated: u64, next_offset: u64, delivered: u64) -> Next {
        self.unrecorded = Some((replicated, next_offset));
        if self.last_record.elapsed() < RECORD_INTERVAL {
            self.succeeded(delivered);
            return Next::Now;
        }
        if let Err(next) = self.record_progress().await {
            return next;
        }
        self.succeeded(delivered);
        Next::Now
    }

    /// Records the delivery confirmed since the last record, if any.
    async fn record_progress(&mut self) -> Result<(), Next> {
        let Some((_, next_offset)) = self.unrecorded else {
            return Ok(());
        };
        let cmd = DeliveryCommand::Advance {
            dest: self.dest.name.clone(),
            next_offset,
        };
        self.propose(cmd).await?;
        self.unrecorded = None;
        self.last_record = Instant::now();
        metrics::counter!(
            DELIVERY_CURSOR_RECORDS_TOTAL,
            "dest" => self.dest.name.clone(),
            "partition" => self.partition.to_string()
        )
        .increment(1);
        Ok(())
    }

    /// Records what was delivered but not yet recorded, if anything, so
    /// a node that stops cleanly hands its successor an exact cursor
    /// instead of one up to [`RECORD_INTERVAL`] behind (events the
    /// successor would deliver again).
    async fn flush(&mut self) {
        if self.unrecorded.is_none() {
            return;
        }
        match tokio::time::timeout(FLUSH_TIMEOUT, self.record_progress()).await {
            Ok(Ok(())) => {}
            // Already warned or no longer leader: the next leader starts
            // from the replicated cursor (at-least-once).
            Ok(Err(_)) => {}
            Err(_) => warn!(
                dest = self.name(),
                partition = self.partition,
                "delivery progress not recorded within {FLUSH_TIMEOUT:?} while stopping"
            ),
        }
    }

    /// Sends entries an operator asked to redrive. Returns whether there
    /// were any.
    async fn redrive_step(&mut self) -> Result<bool, Next> {
        let entries = match self.reader.dlq(&self.dest.name, 0, REDRIVE_SCAN) {
            Ok(e) => e,
            Err(e) => return Err(self.storage_trouble(e)),
        };
        let marked: Vec<(u64, DlqEntry)> = entries
            .into_iter()
            .filter(|(_, e)| e.redrive)
            .take(REDRIVE_BATCH)
            .collect();
        if marked.is_empty() {
            return Ok(false);
        }
        let mut batch = Vec::new();
        let mut kept = Vec::new();
        for (offset, entry) in marked {
            match self.reader.read(offset, 1) {
                Ok(mut found) if found.first().map(|e| e.offset) == Some(offset) => {
                    if let Some(e) = found.pop() {
                        match self.to_delivery(&e) {
                            Ok(d) => {
                                batch.push(d);
                                kept.push(entry);
                            }
                            Err(reason) => return Err(self.storage_trouble(reason)),
                        }
                    }
                }
                Ok(_) => {
                    // The event is gone (retention): resolve the entry, the
                    // DLQ keeps no record of an event it cannot deliver.
                    let cmd = DeliveryCommand::Resolve {
                        dest: self.dest.name.clone(),
                        offsets: vec![offset],
                    };
                    self.propose(cmd).await?;
                }
                Err(e) => return Err(self.storage_trouble(e)),
            }
        }
        if batch.is_empty() {
            return Ok(true);
        }
        let (outcome, latency_ms) = self.send(&batch).await;
        let results: Vec<Result<(), SinkFailure>> = match outcome {
            SendOutcome::Delivered => vec![Ok(()); batch.len()],
            SendOutcome::Failed(f) => vec![Err(f); batch.len()],
            SendOutcome::PerItem(r) => r,
        };
        let mut resolved = Vec::new();
        let mut reparked = Vec::new();
        for (i, (d, mut entry)) in batch.iter().zip(kept).enumerate() {
            match results.get(i) {
                Some(Ok(())) => resolved.push(d.offset),
                Some(Err(f)) => {
                    push_attempt(&mut entry.attempts, self.record(f, latency_ms));
                    entry.redrive = false;
                    entry.reason = format!("redrive failed: {}", f.message);
                    reparked.push((d.offset, entry));
                }
                None => {
                    entry.redrive = false;
                    entry.reason = "redrive failed: sink returned too few results".into();
                    reparked.push((d.offset, entry));
                }
            }
        }
        if !resolved.is_empty() {
            let n = resolved.len() as u64;
            self.propose(DeliveryCommand::Resolve {
                dest: self.dest.name.clone(),
                offsets: resolved,
            })
            .await?;
            let now = self.clock.now();
            self.board.update(&self.dest.name, self.partition, |s| {
                s.delivered += n;
                s.last_success = Some(now);
            });
        }
        if !reparked.is_empty() {
            self.propose(DeliveryCommand::Park {
                dest: self.dest.name.clone(),
                entries: reparked,
                next_offset: None,
            })
            .await?;
        }
        Ok(true)
    }

    /// Sends the next batch of the destination's replay window, if one is
    /// open, and records the progress through Raft. Refused events are
    /// parked like the live stream's; a retryable failure backs off and
    /// the same batch is tried again. Returns whether a window was open.
    async fn replay_step(&mut self) -> Result<bool, Next> {
        let window = self
            .reader
            .replay(&self.dest.name)
            .map_err(|e| self.storage_trouble(e))?;
        let Some((start, end)) = window else {
            self.replay_limit = self.dest.batch_size;
            self.replay_attempts = 0;
            return Ok(false);
        };
        let limit = (end - start).min(self.replay_limit as u64) as usize;
        let mut events = self
            .reader
            .read(start, limit)
            .map_err(|e| self.storage_trouble(e))?;
        events.retain(|e| e.offset < end);
        let name = self.dest.name.clone();
        let advance = move |next: u64| DeliveryCommand::ReplayAdvance {
            dest: name.clone(),
            expect: start,
            next,
        };
        let Some(last) = events.last().map(|e| e.offset) else {
            // Nothing stored in the rest of the window: it is done.
            self.propose(advance(end)).await?;
            return Ok(true);
        };
        let mut batch = Vec::with_capacity(events.len());
        for e in events.iter().filter(|e| self.dest.filter.matches(&e.event)) {
            batch.push(self.to_delivery(e).map_err(|r| self.storage_trouble(r))?);
        }
        if batch.is_empty() {
            self.propose(advance(last + 1)).await?;
            return Ok(true);
        }
        let wait = self.breaker.wait(Instant::now());
        if !wait.is_zero() {
            return Err(Next::After(wait));
        }
        let (outcome, latency_ms) = self.send(&batch).await;
        let results: Vec<Result<(), SinkFailure>> = match outcome {
            SendOutcome::Delivered => vec![Ok(()); batch.len()],
            SendOutcome::Failed(f) if !f.is_retryable() && batch.len() > 1 => {
                // One of them is refused: find it, one event at a time.
                self.replay_limit = 1;
                return Ok(true);
            }
            SendOutcome::Failed(f) => vec![Err(f); batch.len()],
            SendOutcome::PerItem(r) => r,
        };
        let mut delivered = 0u64;
        let mut parked = Vec::new();
        let mut blocked: Option<(usize, SinkFailure)> = None;
        for (i, d) in batch.iter().enumerate() {
            match results.get(i) {
                Some(Ok(())) => delivered += 1,
                Some(Err(f)) if !f.is_retryable() => {
                    let history = vec![self.record(f, latency_ms)];
                    parked.push(self.parked(d, history, format!("replay: {}", f.message)));
                }
                Some(Err(f)) => {
                    blocked = Some((i, f.clone()));
                    break;
                }
                None => {
                    blocked = Some((i, SinkFailure::retryable("sink returned too few results")));
                    break;
                }
            }
        }
        if !parked.is_empty() {
            self.propose(DeliveryCommand::Park {
                dest: self.dest.name.clone(),
                entries: parked,
                next_offset: None,
            })
            .await?;
        }
        let next = match &blocked {
            Some((i, _)) => batch[*i].offset,
            None => last + 1,
        };
        if next > start {
            self.propose(advance(next)).await?;
        }
        let now = self.clock.now();
        if delivered > 0 {
            self.board.update(&self.dest.name, self.partition, |s| {
                s.delivered += delivered;
                s.last_success = Some(now);
            });
        }
        let Some((_, f)) = blocked else {
            self.replay_attempts = 0;
            self.replay_limit = self.dest.batch_size;
            self.breaker.success();
            return Ok(true);
        };
        let at = Instant::now();
        self.replay_attempts += 1;
        self.breaker.failure(at);
        let msg = format!("replay: {}", f.message);
        self.board.update(&self.dest.name, self.partition, |s| {
            s.last_error = Some(msg)
        });
        let retry_after = match &f.kind {
            crate::sinks::FailureKind::Retryable { retry_after } => *retry_after,
            crate::sinks::FailureKind::Permanent => None,
        };
        let unit: f64 = ThreadRng.gen();
        let delay = self
            .dest
            .retry
            .delay(self.replay_attempts, unit, retry_after);
        Err(Next::After(delay.max(self.breaker.wait(at))))
    }

    fn storage_trouble(&self, e: impl std::fmt::Display) -> Next {
        warn!(
            dest = self.name(),
            partition = self.partition,
            "delivery paused: {e}"
        );
        let msg = format!("node storage: {e}");
        self.board.update(&self.dest.name, self.partition, |s| {
            s.last_error = Some(msg)
        });
        Next::After(Duration::from_secs(1))
    }
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
