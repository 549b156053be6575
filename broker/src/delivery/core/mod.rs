//! The sans-IO delivery core of one (destination, partition): every
//! decision of delivery, and no I/O.
//!
//! A driver (the actix [`super::actor::DeliveryActor`] in production and
//! in the simulator) runs one step at a time: [`Core::begin_step`], then
//! [`Core::poll`] with the time and a random source until it answers
//! [`Effect::Done`]. Each [`Effect`] is something for the driver to do:
//! read (the DLQ, events, the cursor, the replay window, the partition
//! head), wait for new events, send a batch, record the cursor, propose a
//! command through Raft, update the status board. The answers of reads,
//! waits and sends go back through [`Core::input`] before the next poll.
//! A proposal that fails ends the step in the driver (it is retried from
//! the replicated state at the next one); whatever the core planned to
//! do after it is dropped at the next [`Core::begin_step`], exactly as if
//! the step had returned there.
//!
//! Each step, in order (see the rules at each stage below):
//! 1. Redrive: DLQ entries an operator marked are sent again first;
//!    delivered ones are resolved, refused ones parked again.
//! 2. Every other step, the replay window's turn: the next batch of the
//!    window is sent; refused events are parked (the window moves on),
//!    a retryable failure backs off and the same batch is tried again.
//! 3. The live stream: the next batch after the cursor is filtered,
//!    masked and sent. Order is kept (G4): the head-of-line event blocks
//!    the ones after it until it is delivered or parked. Retryable
//!    failures back off with full jitter (the random source is an input),
//!    honour a server's Retry-After, and park the head once the retry
//!    policy gives up; a permanent failure parks at once (a whole batch
//!    refused is narrowed to single events to find the bad one). The
//!    first retry of an item comes after a few jittered milliseconds;
//!    backoff grows only while the same item keeps failing, and what was
//!    delivered before it is never sent again (recorded with the record
//!    cadence below). A circuit breaker
//!    ([`super::breaker`]) counts every request of a send (not the send
//!    as one), stops sending to a dead endpoint for a while and then
//!    probes it with one event at a time.
//!
//! With `ordering = "none"` the sink may have several requests in flight
//! and report events after a failed one as delivered. Those are kept in
//! `ahead` and left out of later sends; the cursor still moves only over
//! the fully delivered prefix, so a restart sends them again at worst
//! (at-least-once), never skips one.
//!
//! The cursor is recorded at most every [`RECORD_INTERVAL`] while events
//! stream: each record is a Raft entry and a durable commit on every
//! node. What was delivered but not yet recorded is kept here (delivery
//! continues after it) and recorded when the interval has passed (after a
//! success or a failure alike, so a head of line that keeps failing has
//! the progress before it recorded within its first backoffs), when the
//! stream has been caught up for the rest of the interval, and before the
//! node stops cleanly ([`Core::begin_flush`]).
//! The cursor never runs ahead of the sink (G2, at-least-once).

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use auditflow_protocol::{StoredEvent, Timestamp};
use rand::{Rng, RngCore};
use tokio::time::Instant;

use super::breaker::{Breaker, BreakerState, Permit};
use super::config::{DestinationConfig, Ordering};
use super::mask;
use super::status::LiveStatus;
use crate::replicated::delivery::{push_attempt, AttemptRecord, DeliveryCommand, DlqEntry};
use crate::sinks::{Body, Delivery, FailureKind, SendOutcome, SinkFailure};

/// How long an idle pipeline waits for new events before looking again.
pub const IDLE_WAIT: Duration = Duration::from_secs(1);
/// Longest a confirmed delivery stays unrecorded (unless the record
/// itself cannot be proposed).
pub const RECORD_INTERVAL: Duration = Duration::from_millis(100);
/// How long delivery pauses when the node's storage cannot be read.
pub const TROUBLE_WAIT: Duration = Duration::from_secs(1);
/// Redriven entries handled per step.
pub const REDRIVE_BATCH: usize = 100;
/// DLQ entries scanned per step looking for redrive marks.
pub const REDRIVE_SCAN: usize = 10_000;

/// The time as the core sees it: a monotonic instant for schedules
/// (backoff, breaker, record interval) and the wall clock for records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time (tokio's, so a paused clock drives it).
    pub at: Instant,
    /// Wall-clock time (the clock seam).
    pub wall: Timestamp,
}

/// When the next step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// At once.
    Now,
    /// At this instant.
    At(Instant),
}

/// What the driver is to do next.
#[derive(Clone, Debug)]
pub enum Effect {
    /// Read up to `limit` DLQ entries of the destination from offset 0;
    /// answer [`Input::Dlq`].
    ReadDlq {
        /// Most entries.
        limit: usize,
    },
    /// Read up to `limit` events from offset `from`; answer
    /// [`Input::Events`].
    ReadEvents {
        /// First offset.
        from: u64,
        /// Most events.
        limit: usize,
    },
    /// Read the destination's replicated cursor; answer [`Input::Cursor`].
    ReadCursor,
    /// Read the destination's replay window; answer [`Input::Replay`].
    ReadReplay,
    /// Read the partition's head (next offset) and start watching it for
    /// new events; answer [`Input::Head`].
    ReadHead,
    /// Wait up to this long for events after the head last read; answer
    /// [`Input::Waited`].
    WaitForEvents(Duration),
    /// Send this batch through the sink; answer [`Input::Sent`] with the
    /// batch handed back.
    Send(Vec<Delivery>),
    /// Like [`Effect::Send`], for a replay or a redrive: the sink writes
    /// the batch even where its own dedup thinks it holds it
    /// ([`crate::sinks::Sink::send_again`]).
    SendAgain(Vec<Delivery>),
    /// Record this cursor through Raft (`DeliveryCommand::Advance`) and
    /// count the record; no answer (a failure ends the step).
    Record(u64),
    /// Propose this through Raft (park to the DLQ, resolve, advance,
    /// replay advance); no answer (a failure ends the step).
    Propose(DeliveryCommand),
    /// Update the destination's live status.
    Status(StatusChange),
    /// Delivery pauses for this reason (node storage): tell the operator.
    Paused(String),
    /// The step is over; run the next one then.
    Done(Resume),
}

/// The answer to an [`Effect`] that asks for one. Errors are their text.
pub enum Input {
    /// To [`Effect::ReadDlq`]: entries by offset.
    Dlq(Result<Vec<(u64, DlqEntry)>, String>),
    /// To [`Effect::ReadEvents`]: the stored events, in offset order.
    Events(Result<Vec<StoredEvent>, String>),
    /// To [`Effect::ReadCursor`].
    Cursor(Result<u64, String>),
    /// To [`Effect::ReadReplay`]: `[next, end)`, if a window is open.
    Replay(Result<Option<(u64, u64)>, String>),
    /// To [`Effect::ReadHead`]: the partition's next offset.
    Head(u64),
    /// To [`Effect::WaitForEvents`].
    Waited {
        /// New events came within the wait.
        came: bool,
        /// The partition's state machine is gone (the node stops): waiting
        /// again would return at once.
        closed: bool,
    },
    /// To [`Effect::Send`].
    Sent {
        /// The batch that was sent.
        batch: Vec<Delivery>,
        /// What the sink said (a panic or a timeout is a retryable
        /// failure).
        outcome: SendOutcome,
        /// How long the send took.
        latency_ms: u64,
    },
}

/// A change to the live status of a (destination, partition); fields left
/// `None` stay as they are.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatusChange {
    /// New last success time.
    pub last_success: Option<Timestamp>,
    /// New last error.
    pub last_error: Option<String>,
    /// New attempt count of the head of line.
    pub attempts: Option<u32>,
    /// New breaker state.
    pub breaker: Option<BreakerState>,
    /// Events delivered, added to the count.
    pub delivered: u64,
    /// When the requests below were answered (for the status' one-minute
    /// error rate).
    pub at: Option<Timestamp>,
    /// Requests answered, added to the count.
    pub requests: u64,
    /// Of them, failed retryably.
    pub failed_requests: u64,
    /// Retries planned, added to the count.
    pub retries: u64,
    /// Time planned waiting on backoff, added (ms).
    pub backoff_wait_ms: u64,
    /// Time planned waiting on the open breaker, added (ms).
    pub breaker_wait_ms: u64,
}

impl StatusChange {
    /// Applies the change.
    pub fn apply(&self, s: &mut LiveStatus) {
        if let Some(t) = self.last_success {
            s.last_success = Some(t);
        }
        if let Some(e) = &self.last_error {
            s.last_error = Some(e.clone());
        }
        if let Some(a) = self.attempts {
            s.attempts = a;
        }
        if let Some(b) = self.breaker {
            s.breaker = b;
        }
        s.delivered += self.delivered;
        if let Some(at) = self.at {
            s.errors.add(at, self.requests, self.failed_requests);
        }
        s.retries += self.retries;
        s.backoff_wait_ms += self.backoff_wait_ms;
        s.breaker_wait_ms += self.breaker_wait_ms;
    }
}

/// Which answer the core waits for, and what it needs to take it.
enum Await {
    /// Nothing (between steps, or only planned effects are left).
    Nothing,
    RedriveScan,
    RedriveEvent {
        offset: u64,
        entry: DlqEntry,
        rest: VecDeque<(u64, DlqEntry)>,
        batch: Vec<Delivery>,
        kept: Vec<DlqEntry>,
    },
    RedriveSent {
        kept: Vec<DlqEntry>,
    },
    ReplayWindow,
    ReplayEvents {
        start: u64,
        end: u64,
    },
    ReplaySent {
        start: u64,
        last: u64,
    },
    LiveCursor,
    LiveHead {
        replicated: u64,
        cursor: u64,
    },
    /// Caught up with an unrecorded delivery: waiting out the interval.
    RecordWait,
    /// Caught up: is a replay window open?
    CaughtUpReplay,
    IdleWait,
    LiveEvents {
        replicated: u64,
    },
    LiveSent {
        replicated: u64,
        last: u64,
    },
}

/// A planned step of work: an effect to hand out, or a change of the
/// core's own state made when its turn comes (so after the proposals
/// before it went through, and with the time at that point).
enum Op {
    Emit(Effect),
    Do(Change),
}

enum Change {
    /// The cursor record went through.
    Recorded,
    /// The live stream delivered (or filtered out) a batch of this many.
    Succeeded(u64),
    /// Progress was made: the head of line is a new event.
    ResetHead,
    /// A retryable failure of the head of line: back off, or park it once
    /// the retry policy gives up.
    Failure {
        offset: u64,
        event_id: String,
        failure: SinkFailure,
        latency_ms: u64,
    },
    /// The head of line was parked after giving up.
    HeadParked,
    /// A permanently refused event was parked and the stream moved on.
    ParkedAndAdvanced(String),
    /// Redriven or replayed events were delivered.
    Delivered(u64),
    /// The replay window's batch went through.
    ReplayOk,
    /// The replay window's batch failed retryably.
    ReplayFailure(SinkFailure),
}

/// The delivery state machine of one (destination, partition).
pub struct Core {
    dest: Arc<DestinationConfig>,
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
    /// `ordering = "none"`: offsets past the head of line the sink has
    /// already confirmed, not sent again. Within a batch of the cursor
    /// (pruned at every read), so bounded by the batch size.
    ahead: BTreeSet<u64>,
    awaiting: Await,
    input: Option<Input>,
    ops: VecDeque<Op>,
}

impl Core {
    /// A core starting at the replicated cursor, at `now`.
    pub fn new(dest: Arc<DestinationConfig>, now: Instant) -> Core {
        let breaker = Breaker::new(dest.breaker.clone());
        let batch_limit = dest.batch_size;
        Core {
            dest,
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
            last_record: now,
            ahead: BTreeSet::new(),
            awaiting: Await::Nothing,
            input: None,
            ops: VecDeque::new(),
        }
    }

    /// The destination.
    pub fn dest(&self) -> &Arc<DestinationConfig> {
        &self.dest
    }

    /// Starts a step, dropping what was left of the previous one (a
    /// proposal failed).
    pub fn begin_step(&mut self) {
        self.reset();
        self.awaiting = Await::RedriveScan;
        self.emit(Effect::ReadDlq {
            limit: REDRIVE_SCAN,
        });
    }

    /// Starts recording what was delivered but not yet recorded, if
    /// anything (the node stops cleanly): the successor then starts at an
    /// exact cursor instead of one up to [`RECORD_INTERVAL`] behind.
    /// Returns whether there is anything; poll until [`Effect::Done`].
    pub fn begin_flush(&mut self) -> bool {
        self.reset();
        let any = self.unrecorded.is_some();
        self.record_ops();
        self.done(Resume::Now);
        any
    }

    /// Hands in the answer to the last effect that asked for one.
    pub fn input(&mut self, input: Input) {
        self.input = Some(input);
    }

    /// The next effect, at `now`, drawing jitter from `rng`.
    pub fn poll(&mut self, now: Now, rng: &mut dyn RngCore) -> Effect {
        loop {
            match self.ops.pop_front() {
                Some(Op::Emit(effect)) => return effect,
                Some(Op::Do(change)) => {
                    let ops = self.change(change, now, rng);
                    for op in ops.into_iter().rev() {
                        self.ops.push_front(op);
                    }
                    continue;
                }
                None => {}
            }
            match self.input.take() {
                Some(input) => self.take(input, now),
                // Polled without an answer or a step: a driver's mistake;
                // start over from the replicated state.
                None => {
                    self.reset();
                    return Effect::Done(Resume::Now);
                }
            }
        }
    }

    fn reset(&mut self) {
        self.ops.clear();
        self.input = None;
        self.awaiting = Await::Nothing;
    }

    fn emit(&mut self, effect: Effect) {
        self.ops.push_back(Op::Emit(effect));
    }

    fn then(&mut self, change: Change) {
        self.ops.push_back(Op::Do(change));
    }

    fn done(&mut self, resume: Resume) {
        self.awaiting = Await::Nothing;
        self.emit(Effect::Done(resume));
    }

    fn after(&mut self, now: Now, wait: Duration) {
        self.done(Resume::At(now.at + wait));
    }

    /// Delivery pauses: the node's storage could not be read, or an event
    /// not encoded.
    fn trouble(&mut self, now: Now, reason: String) {
        self.ops.clear();
        self.emit(Effect::Paused(reason.clone()));
        self.emit(Effect::Status(StatusChange {
            last_error: Some(format!("node storage: {reason}")),
            ..StatusChange::default()
        }));
        self.after(now, TROUBLE_WAIT);
    }

    /// Plans the cursor record of what was delivered since the last one,
    /// if anything.
    fn record_ops(&mut self) {
        if let Some((_, next_offset)) = self.unrecorded {
            self.emit(Effect::Record(next_offset));
            self.then(Change::Recorded);
        }
    }

    /// Takes the answer the core waits for.
    fn take(&mut self, input: Input, now: Now) {
        let awaiting = std::mem::replace(&mut self.awaiting, Await::Nothing);
        match (awaiting, input) {
            (Await::RedriveScan, Input::Dlq(read)) => match read {
                Ok(entries) => self.redrive_marked(entries),
                Err(e) => self.trouble(now, e),
            },
            (
                Await::RedriveEvent {
                    offset,
                    entry,
                    rest,
                    mut batch,
                    mut kept,
                },
                Input::Events(read),
            ) => match read {
                Ok(found) => {
                    match found.first() {
                        Some(e) if e.offset == offset => match to_delivery(&self.dest, e) {
                            Ok(d) => {
                                batch.push(d);
                                kept.push(entry);
                            }
                            Err(reason) => return self.trouble(now, reason),
                        },
                        // The event is gone (retention): resolve the entry,
                        // the DLQ keeps no record of an event it cannot
                        // deliver.
                        _ => self.emit(Effect::Propose(DeliveryCommand::Resolve {
                            dest: self.dest.name.clone(),
                            offsets: vec![offset],
                        })),
                    }
                    self.redrive_next(rest, batch, kept);
                }
                Err(e) => self.trouble(now, e),
            },
            (
                Await::RedriveSent { kept },
                Input::Sent {
                    batch,
                    outcome,
                    latency_ms,
                },
            ) => self.redrive_sent(batch, kept, outcome, latency_ms, now),
            (Await::ReplayWindow, Input::Replay(read)) => match read {
                Ok(None) => {
                    self.replay_limit = self.dest.batch_size;
                    self.replay_attempts = 0;
                    self.live();
                }
                Ok(Some((start, end))) => {
                    let limit = (end - start).min(self.replay_limit as u64) as usize;
                    self.awaiting = Await::ReplayEvents { start, end };
                    self.emit(Effect::ReadEvents { from: start, limit });
                }
                Err(e) => self.trouble(now, e),
            },
            (Await::ReplayEvents { start, end }, Input::Events(read)) => match read {
                Ok(events) => self.replay_read(start, end, events, now),
                Err(e) => self.trouble(now, e),
            },
            (
                Await::ReplaySent { start, last },
                Input::Sent {
                    batch,
                    outcome,
                    latency_ms,
                },
            ) => self.replay_sent(start, last, batch, outcome, latency_ms, now),
            (Await::LiveCursor, Input::Cursor(read)) => match read {
                Ok(replicated) => {
                    let cursor = match self.unrecorded {
                        Some((base, next)) if base == replicated && next > replicated => next,
                        // Moved underneath (an operator's `SetCursor`) or
                        // overtaken: the replicated cursor rules.
                        _ => {
                            self.unrecorded = None;
                            replicated
                        }
                    };
                    self.awaiting = Await::LiveHead { replicated, cursor };
                    self.emit(Effect::ReadHead);
                }
                Err(e) => self.trouble(now, e),
            },
            (Await::LiveHead { replicated, cursor }, Input::Head(head)) => {
                self.live_head(replicated, cursor, head, now)
            }
            (Await::RecordWait, Input::Waited { came, .. }) => {
                if !came {
                    self.record_ops();
                }
                self.done(Resume::Now);
            }
            (Await::CaughtUpReplay, Input::Replay(read)) => {
                if matches!(read, Ok(Some(_))) {
                    // Nothing new: the replay window's turn again.
                    self.done(Resume::Now);
                } else {
                    self.awaiting = Await::IdleWait;
                    self.emit(Effect::WaitForEvents(IDLE_WAIT));
                }
            }
            (Await::IdleWait, Input::Waited { came, closed }) => {
                if !came && closed {
                    // The state machine is gone (shutting down): waiting
                    // on it again would return at once; the supervisor
                    // stops us.
                    self.after(now, IDLE_WAIT);
                } else {
                    self.done(Resume::Now);
                }
            }
            (Await::LiveEvents { replicated }, Input::Events(read)) => match read {
                Ok(events) => self.live_read(replicated, events, now),
                Err(e) => self.trouble(now, e),
            },
            (
                Await::LiveSent { replicated, last },
                Input::Sent {
                    batch,
                    outcome,
                    latency_ms,
                },
            ) => self.live_sent(replicated, last, batch, outcome, latency_ms, now),
            // An answer to nothing asked: a driver's mistake; start over
            // from the replicated state.
            _ => self.done(Resume::Now),
        }
    }

    /// Redrive, stage 1: the entries an operator marked, if any.
    fn redrive_marked(&mut self, entries: Vec<(u64, DlqEntry)>) {
        let marked: VecDeque<(u64, DlqEntry)> = entries
            .into_iter()
            .filter(|(_, e)| e.redrive)
            .take(REDRIVE_BATCH)
            .collect();
        if marked.is_empty() {
            return self.replay();
        }
        self.redrive_next(marked, Vec::new(), Vec::new());
    }

    /// Redrive, stage 2: reads the marked events one by one, then sends
    /// the batch.
    fn redrive_next(
        &mut self,
        mut rest: VecDeque<(u64, DlqEntry)>,
        batch: Vec<Delivery>,
        kept: Vec<DlqEntry>,
    ) {
        if let Some((offset, entry)) = rest.pop_front() {
            self.awaiting = Await::RedriveEvent {
                offset,
                entry,
                rest,
                batch,
                kept,
            };
            self.emit(Effect::ReadEvents {
                from: offset,
                limit: 1,
            });
        } else if batch.is_empty() {
            self.done(Resume::Now);
        } else {
            self.awaiting = Await::RedriveSent { kept };
            self.emit(Effect::SendAgain(batch));
        }
    }

    /// Redrive, stage 3: delivered entries are resolved, refused ones
    /// parked again (unmarked, with the attempt added to their history).
    fn redrive_sent(
        &mut self,
        batch: Vec<Delivery>,
        kept: Vec<DlqEntry>,
        outcome: SendOutcome,
        latency_ms: u64,
        now: Now,
    ) {
        let results = per_item_results(outcome, batch.len());
        let mut resolved = Vec::new();
        let mut reparked = Vec::new();
        for (i, (d, mut entry)) in batch.iter().zip(kept).enumerate() {
            match results.get(i) {
                Some(Ok(())) => resolved.push(d.offset),
                Some(Err(f)) => {
                    push_attempt(&mut entry.attempts, attempt_record(f, latency_ms, now));
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
            self.emit(Effect::Propose(DeliveryCommand::Resolve {
                dest: self.dest.name.clone(),
                offsets: resolved,
            }));
            self.then(Change::Delivered(n));
        }
        if !reparked.is_empty() {
            self.emit(Effect::Propose(DeliveryCommand::Park {
                dest: self.dest.name.clone(),
                entries: reparked,
                next_offset: None,
            }));
        }
        self.done(Resume::Now);
    }

    /// Replay: every other step is the replay window's turn.
    fn replay(&mut self) {
        self.replay_turn = !self.replay_turn;
        if self.replay_turn {
            self.awaiting = Await::ReplayWindow;
            self.emit(Effect::ReadReplay);
        } else {
            self.live();
        }
    }

    /// Replay: the window's next events are read.
    fn replay_read(&mut self, start: u64, end: u64, mut events: Vec<StoredEvent>, now: Now) {
        events.retain(|e| e.offset < end);
        let advance = |dest: &str, next: u64| {
            Effect::Propose(DeliveryCommand::ReplayAdvance {
                dest: dest.to_string(),
                expect: start,
                next,
            })
        };
        let Some(last) = events.last().map(|e| e.offset) else {
            // Nothing stored in the rest of the window: it is done.
            self.emit(advance(&self.dest.name, end));
            return self.done(Resume::Now);
        };
        let mut batch = match self.batch_of(&events) {
            Ok(b) => b,
            Err(reason) => return self.trouble(now, reason),
        };
        if batch.is_empty() {
            self.emit(advance(&self.dest.name, last + 1));
            return self.done(Resume::Now);
        }
        let mut last = last;
        if !self.admit(&mut batch, &mut last, now) {
            return;
        }
        self.awaiting = Await::ReplaySent { start, last };
        self.emit(Effect::SendAgain(batch));
    }

    /// Replay: refused events are parked like the live stream's (without
    /// moving the cursor); the window moves on to the first event not
    /// delivered.
    fn replay_sent(
        &mut self,
        start: u64,
        last: u64,
        batch: Vec<Delivery>,
        outcome: SendOutcome,
        latency_ms: u64,
        now: Now,
    ) {
        self.count_requests(&outcome, batch.len(), now);
        if let SendOutcome::Failed(f) = &outcome {
            if !f.is_retryable() && batch.len() > 1 {
                // One of them is refused: find it, one event at a time.
                self.replay_limit = 1;
                return self.done(Resume::Now);
            }
        }
        let Classified {
            delivered,
            refused,
            blocked,
        } = classify(per_item_results(outcome, batch.len()), batch.len());
        let parked: Vec<(u64, DlqEntry)> = refused
            .into_iter()
            .map(|(i, f)| {
                let history = vec![attempt_record(&f, latency_ms, now)];
                let reason = format!("replay: {}", f.message);
                parked_entry(&batch[i], history, reason, now)
            })
            .collect();
        if !parked.is_empty() {
            self.emit(Effect::Propose(DeliveryCommand::Park {
                dest: self.dest.name.clone(),
                entries: parked,
                next_offset: None,
            }));
        }
        let next = match &blocked {
            Some((i, _)) => batch[*i].offset,
            None => last + 1,
        };
        if next > start {
            self.emit(Effect::Propose(DeliveryCommand::ReplayAdvance {
                dest: self.dest.name.clone(),
                expect: start,
                next,
            }));
        }
        if delivered > 0 {
            self.then(Change::Delivered(delivered));
        }
        match blocked {
            None => self.then(Change::ReplayOk),
            Some((_, f)) => self.then(Change::ReplayFailure(f)),
        }
    }

    /// Live stream, stage 1: where it stands.
    fn live(&mut self) {
        self.awaiting = Await::LiveCursor;
        self.emit(Effect::ReadCursor);
    }

    /// Live stream, stage 2: caught up, lingering for a fuller batch, or
    /// reading the next one.
    fn live_head(&mut self, replicated: u64, cursor: u64, head: u64, now: Now) {
        if cursor >= head {
            self.lingered = false;
            if self.unrecorded.is_some() {
                // Caught up. Record once no new event came for the rest of
                // the interval: a steady trickle would otherwise cost a
                // Raft entry per batch.
                let since = now.at.saturating_duration_since(self.last_record);
                let left = RECORD_INTERVAL.saturating_sub(since);
                if !left.is_zero() {
                    self.awaiting = Await::RecordWait;
                    return self.emit(Effect::WaitForEvents(left));
                }
                self.record_ops();
                return self.done(Resume::Now);
            }
            self.awaiting = Await::CaughtUpReplay;
            return self.emit(Effect::ReadReplay);
        }
        // A partial batch: give it a moment to fill, once.
        if head - cursor < self.batch_limit as u64 && !self.lingered && self.dest.linger_ms > 0 {
            self.lingered = true;
            return self.after(now, Duration::from_millis(self.dest.linger_ms));
        }
        self.lingered = false;
        self.awaiting = Await::LiveEvents { replicated };
        self.emit(Effect::ReadEvents {
            from: cursor,
            limit: self.batch_limit,
        });
    }

    /// Live stream, stage 3: the batch read is filtered, masked and sent.
    fn live_read(&mut self, replicated: u64, events: Vec<StoredEvent>, now: Now) {
        let Some(mut last) = events.last().map(|e| e.offset) else {
            return self.after(now, IDLE_WAIT);
        };
        let mut batch = match self.batch_of(&events) {
            Ok(b) => b,
            Err(reason) => return self.trouble(now, reason),
        };
        if !self.ahead.is_empty() {
            // What the sink confirmed after an earlier failure is not sent
            // again; what is below the cursor is done with.
            self.ahead = self.ahead.split_off(&events[0].offset);
            batch.retain(|d| !self.ahead.contains(&d.offset));
        }
        if batch.is_empty() {
            return self.advance(replicated, last + 1, 0, now);
        }
        if !self.admit(&mut batch, &mut last, now) {
            return;
        }
        self.awaiting = Await::LiveSent { replicated, last };
        self.emit(Effect::Send(batch));
    }

    /// Live stream, stage 4: what the sink said.
    fn live_sent(
        &mut self,
        replicated: u64,
        last: u64,
        batch: Vec<Delivery>,
        outcome: SendOutcome,
        latency_ms: u64,
        now: Now,
    ) {
        if batch.is_empty() {
            // Nothing was sent (the core never sends an empty batch).
            return self.done(Resume::Now);
        }
        self.count_requests(&outcome, batch.len(), now);
        match outcome {
            SendOutcome::Delivered => self.advance(replicated, last + 1, batch.len() as u64, now),
            SendOutcome::Failed(f) if f.is_retryable() => {
                let head = &batch[0];
                self.retry_or_park(head, f, latency_ms, now);
            }
            SendOutcome::Failed(f) => {
                if batch.len() > 1 {
                    // Which event is refused? Send one at a time until the
                    // bad one is found; the good ones go through.
                    self.batch_limit = 1;
                    return self.done(Resume::Now);
                }
                let mut history = std::mem::take(&mut self.history);
                push_attempt(&mut history, attempt_record(&f, latency_ms, now));
                let entry = parked_entry(&batch[0], history, f.message.clone(), now);
                self.emit(Effect::Propose(DeliveryCommand::Park {
                    dest: self.dest.name.clone(),
                    entries: vec![entry],
                    next_offset: Some(batch[0].offset + 1),
                }));
                self.then(Change::ParkedAndAdvanced(f.message));
                self.done(Resume::Now);
            }
            SendOutcome::PerItem(results) => {
                self.per_item(&batch, results, replicated, last, latency_ms, now)
            }
        }
    }

    /// Live stream: one result per item. Delivered items and refused ones
    /// (parked) move the stream on up to the first retryable failure,
    /// which becomes the head of line. The delivered prefix is never sent
    /// again; it is recorded with the record cadence like any delivery
    /// (a Raft round per transient failure would halve the throughput
    /// through a sink failing 5 % of requests), a parked one at once.
    fn per_item(
        &mut self,
        batch: &[Delivery],
        results: Vec<Result<(), SinkFailure>>,
        replicated: u64,
        last: u64,
        latency_ms: u64,
        now: Now,
    ) {
        if self.dest.ordering == Ordering::None {
            self.keep_ahead(batch, &results);
        }
        let Classified {
            delivered,
            refused,
            blocked,
        } = classify(results, batch.len());
        let mut parked = Vec::with_capacity(refused.len());
        for (i, f) in refused {
            // The head's earlier attempts belong to its record.
            let mut history = if i == 0 {
                std::mem::take(&mut self.history)
            } else {
                Vec::new()
            };
            push_attempt(&mut history, attempt_record(&f, latency_ms, now));
            parked.push(parked_entry(&batch[i], history, f.message, now));
        }
        let next_offset = match &blocked {
            Some((i, _)) => batch[*i].offset,
            None => last + 1,
        };
        if let Some((_, first)) = parked.first() {
            let first_failure = first.reason.clone();
            self.emit(Effect::Propose(DeliveryCommand::Park {
                dest: self.dest.name.clone(),
                entries: parked,
                next_offset: Some(next_offset),
            }));
            self.emit(Effect::Status(StatusChange {
                last_error: Some(first_failure),
                ..StatusChange::default()
            }));
        } else if next_offset > batch[0].offset {
            self.unrecorded = Some((replicated, next_offset));
        }
        match blocked {
            None => {
                self.record_due(now);
                self.then(Change::Succeeded(delivered));
                self.done(Resume::Now);
            }
            Some((i, f)) => {
                if i > 0 || delivered > 0 {
                    self.then(Change::ResetHead);
                }
                self.retry_or_park(&batch[i], f, latency_ms, now);
            }
        }
    }

    /// `ordering = "none"`: remembers the items the sink confirmed after
    /// the first retryable failure, so they are not sent again.
    fn keep_ahead(&mut self, batch: &[Delivery], results: &[Result<(), SinkFailure>]) {
        let Some(first) = results
            .iter()
            .position(|r| matches!(r, Err(f) if f.is_retryable()))
        else {
            return;
        };
        let before = self.ahead.len();
        for (d, r) in batch.iter().zip(results).skip(first + 1) {
            if r.is_ok() {
                self.ahead.insert(d.offset);
            }
        }
        let went = (self.ahead.len() - before) as u64;
        if went > 0 {
            self.emit(Effect::Status(StatusChange {
                delivered: went,
                ..StatusChange::default()
            }));
        }
    }

    /// A retryable failure of the head-of-line item: what went through
    /// before is recorded if the record interval has passed (so a head
    /// that keeps failing, backing off for longer each time, has the
    /// stream's progress recorded by its second or third attempt, while a
    /// one-off failure costs no Raft round); then back off, or park the
    /// head once the policy gives up ([`Change::Failure`]).
    fn retry_or_park(&mut self, head: &Delivery, failure: SinkFailure, latency_ms: u64, now: Now) {
        self.record_due(now);
        self.then(Change::Failure {
            offset: head.offset,
            event_id: head.event_id.clone(),
            failure,
            latency_ms,
        });
    }

    /// Moves the delivery past `next_offset - 1`, which the sink confirmed,
    /// from the `replicated` cursor this step started at. Recorded at once
    /// unless the cursor was recorded less than [`RECORD_INTERVAL`] ago.
    fn advance(&mut self, replicated: u64, next_offset: u64, delivered: u64, now: Now) {
        self.unrecorded = Some((replicated, next_offset));
        self.record_due(now);
        self.then(Change::Succeeded(delivered));
        self.done(Resume::Now);
    }

    /// Records what is unrecorded if the cursor was last recorded at least
    /// [`RECORD_INTERVAL`] ago.
    fn record_due(&mut self, now: Now) {
        if now.at.saturating_duration_since(self.last_record) >= RECORD_INTERVAL {
            self.record_ops();
        }
    }

    /// Asks the breaker whether `batch` may go: while it is open the step
    /// ends with a wait (false); while it is half-open only its first
    /// event goes, as a probe of one request (`last` moves back to it).
    fn admit(&mut self, batch: &mut Vec<Delivery>, last: &mut u64, now: Now) -> bool {
        match self.breaker.permit(now.at) {
            Permit::Wait(wait) => {
                self.emit(Effect::Status(StatusChange {
                    breaker: Some(BreakerState::Open),
                    breaker_wait_ms: wait.as_millis() as u64,
                    ..StatusChange::default()
                }));
                self.after(now, wait);
                false
            }
            Permit::Go(n) => {
                if batch.len() > n {
                    batch.truncate(n.max(1));
                    if let Some(d) = batch.last() {
                        *last = d.offset;
                    }
                }
                true
            }
        }
    }

    /// Counts the requests of a send into the breaker and the status: see
    /// [`requests_of`]. The planted per-batch breaker counts the send as
    /// one request instead.
    fn count_requests(&mut self, outcome: &SendOutcome, len: usize, now: Now) {
        let (successes, failed) = if self.dest.in_flight() > 1 {
            concurrent_requests_of(outcome, len)
        } else {
            let (successes, failed) = requests_of(outcome, len);
            (successes, u64::from(failed))
        };
        if self.breaker.per_batch() {
            self.breaker
                .record(u64::from(failed == 0), failed > 0, now.at);
        } else {
            // Concurrent answers have no order: successes first, so the
            // failures count as consecutive (the breaker errs towards
            // opening on a dead endpoint).
            self.breaker.record(successes, false, now.at);
            for _ in 0..failed {
                self.breaker.record(0, true, now.at);
            }
        }
        self.emit(Effect::Status(StatusChange {
            at: Some(now.wall),
            requests: successes + failed,
            failed_requests: failed,
            breaker: Some(self.breaker.state(now.at)),
            ..StatusChange::default()
        }));
    }

    /// The deliveries of the events the destination wants, filtered and
    /// masked.
    fn batch_of(&self, events: &[StoredEvent]) -> Result<Vec<Delivery>, String> {
        events
            .iter()
            .filter(|e| self.dest.filter.matches(&e.event))
            .map(|e| to_delivery(&self.dest, e))
            .collect()
    }

    /// Makes a planned change of the core's own state; returns what it
    /// plans next, to run before anything planned after it.
    fn change(&mut self, change: Change, now: Now, rng: &mut dyn RngCore) -> Vec<Op> {
        match change {
            Change::Recorded => {
                self.unrecorded = None;
                self.last_record = now.at;
                Vec::new()
            }
            Change::Succeeded(delivered) => {
                self.attempts = 0;
                self.history.clear();
                self.failing_since = None;
                self.batch_limit = self.dest.batch_size;
                vec![Op::Emit(Effect::Status(StatusChange {
                    last_success: Some(now.wall),
                    attempts: Some(0),
                    delivered,
                    breaker: Some(self.breaker.state(now.at)),
                    ..StatusChange::default()
                }))]
            }
            Change::ResetHead => {
                self.attempts = 0;
                self.history.clear();
                self.failing_since = None;
                Vec::new()
            }
            Change::Failure {
                offset,
                event_id,
                failure,
                latency_ms,
            } => self.failure(offset, event_id, failure, latency_ms, now, rng),
            Change::HeadParked => {
                self.attempts = 0;
                self.failing_since = None;
                Vec::new()
            }
            Change::ParkedAndAdvanced(message) => {
                self.attempts = 0;
                self.failing_since = None;
                self.batch_limit = self.dest.batch_size;
                vec![Op::Emit(Effect::Status(StatusChange {
                    last_error: Some(message),
                    attempts: Some(0),
                    ..StatusChange::default()
                }))]
            }
            Change::Delivered(n) => vec![Op::Emit(Effect::Status(StatusChange {
                last_success: Some(now.wall),
                delivered: n,
                ..StatusChange::default()
            }))],
            Change::ReplayOk => {
                self.replay_attempts = 0;
                self.replay_limit = self.dest.batch_size;
                vec![Op::Emit(Effect::Done(Resume::Now))]
            }
            Change::ReplayFailure(f) => {
                self.replay_attempts += 1;
                let delay = self
                    .dest
                    .retry
                    .delay(self.replay_attempts, rng.gen(), retry_after(&f));
                let (wait, backoff_wait_ms, breaker_wait_ms) =
                    split_wait(delay, self.breaker.wait(now.at));
                let status = Effect::Status(StatusChange {
                    last_error: Some(format!("replay: {}", f.message)),
                    retries: 1,
                    backoff_wait_ms,
                    breaker_wait_ms,
                    ..StatusChange::default()
                });
                vec![
                    Op::Emit(status),
                    Op::Emit(Effect::Done(Resume::At(now.at + wait))),
                ]
            }
        }
    }

    /// A retryable failure of the head of line at `offset`.
    fn failure(
        &mut self,
        offset: u64,
        event_id: String,
        f: SinkFailure,
        latency_ms: u64,
        now: Now,
        rng: &mut dyn RngCore,
    ) -> Vec<Op> {
        self.attempts += 1;
        let since = *self.failing_since.get_or_insert(now.at);
        push_attempt(&mut self.history, attempt_record(&f, latency_ms, now));
        let mut ops = vec![Op::Emit(Effect::Status(StatusChange {
            last_error: Some(f.message.clone()),
            attempts: Some(self.attempts),
            breaker: Some(self.breaker.state(now.at)),
            ..StatusChange::default()
        }))];
        if self.dest.retry.exhausted(self.attempts, now.at - since) {
            let history = std::mem::take(&mut self.history);
            let entry = DlqEntry {
                event_id,
                parked_at: now.wall,
                reason: format!("gave up after {} attempts: {}", self.attempts, f.message),
                attempts: history,
                redrive: false,
            };
            ops.push(Op::Emit(Effect::Propose(DeliveryCommand::Park {
                dest: self.dest.name.clone(),
                entries: vec![(offset, entry)],
                next_offset: Some(offset + 1),
            })));
            ops.push(Op::Do(Change::HeadParked));
            ops.push(Op::Emit(Effect::Done(Resume::Now)));
            return ops;
        }
        let delay = self
            .dest
            .retry
            .delay(self.attempts, rng.gen(), retry_after(&f));
        let (wait, backoff_wait_ms, breaker_wait_ms) = split_wait(delay, self.breaker.wait(now.at));
        ops.push(Op::Emit(Effect::Status(StatusChange {
            retries: 1,
            backoff_wait_ms,
            breaker_wait_ms,
            ..StatusChange::default()
        })));
        ops.push(Op::Emit(Effect::Done(Resume::At(now.at + wait))));
        ops
    }
}

/// The sink's results, one per item of a batch of `len`.
fn per_item_results(outcome: SendOutcome, len: usize) -> Vec<Result<(), SinkFailure>> {
    match outcome {
        SendOutcome::Delivered => vec![Ok(()); len],
        SendOutcome::Failed(f) => vec![Err(f); len],
        SendOutcome::PerItem(r) => r,
    }
}

/// A batch's per-item results, in the order delivery must keep (G4).
struct Classified {
    /// Items delivered before the first retryable failure.
    delivered: u64,
    /// Items refused for good before it, by index: they are parked.
    refused: Vec<(usize, SinkFailure)>,
    /// The first retryable failure (or missing result), by index: the
    /// stream stops there and it becomes the head of line.
    blocked: Option<(usize, SinkFailure)>,
}

/// Classifies the sink's per-item `results` for a batch of `len` items,
/// up to the first item that has to be tried again.
fn classify(results: Vec<Result<(), SinkFailure>>, len: usize) -> Classified {
    let mut out = Classified {
        delivered: 0,
        refused: Vec::new(),
        blocked: None,
    };
    let mut results = results.into_iter();
    for i in 0..len {
        match results.next() {
            Some(Ok(())) => out.delivered += 1,
            Some(Err(f)) if !f.is_retryable() => out.refused.push((i, f)),
            Some(Err(f)) => {
                out.blocked = Some((i, f));
                break;
            }
            None => {
                out.blocked = Some((i, SinkFailure::retryable("sink returned too few results")));
                break;
            }
        }
    }
    out
}

/// The requests a send of `len` items made, as the breaker counts them:
/// (answered, then whether one failed retryably after them). A per-item
/// result is a request up to the first retryable failure (a single-mode
/// webhook sends one request per item and stops there); a whole batch
/// delivered counts one per item; a whole batch failed retryably is one
/// failed request. A permanent refusal is an answer: the endpoint is up.
fn requests_of(outcome: &SendOutcome, len: usize) -> (u64, bool) {
    match outcome {
        SendOutcome::Delivered => (len as u64, false),
        SendOutcome::Failed(f) => (u64::from(!f.is_retryable()), f.is_retryable()),
        SendOutcome::PerItem(results) => {
            let mut answered = 0;
            for r in results.iter().take(len) {
                match r {
                    Err(f) if f.is_retryable() => return (answered, true),
                    _ => answered += 1,
                }
            }
            // Fewer results than items: the rest are missing, which the
            // stream treats as a retryable failure.
            (answered, results.len() < len)
        }
    }
}

/// Like [`requests_of`], for a sink with several requests in flight:
/// every item's result is a request of its own (answered, failed
/// retryably), since the ones after a failure were sent too. A whole
/// batch failed is one failed request.
fn concurrent_requests_of(outcome: &SendOutcome, len: usize) -> (u64, u64) {
    match outcome {
        SendOutcome::PerItem(results) => {
            let failed = results
                .iter()
                .take(len)
                .filter(|r| matches!(r, Err(f) if f.is_retryable()))
                .count() as u64;
            let answered = results.len().min(len) as u64 - failed;
            (
                answered,
                failed + (len.saturating_sub(results.len()) > 0) as u64,
            )
        }
        other => {
            let (answered, failed) = requests_of(other, len);
            (answered, u64::from(failed))
        }
    }
}

/// The wait before a retry: the longer of the backoff `delay` and the
/// breaker's open period, with the share of each (ms) for the status.
fn split_wait(delay: Duration, breaker: Duration) -> (Duration, u64, u64) {
    if breaker > delay {
        (breaker, 0, breaker.as_millis() as u64)
    } else {
        (delay, delay.as_millis() as u64, 0)
    }
}

/// A server's Retry-After hint, if it gave one.
fn retry_after(f: &SinkFailure) -> Option<Duration> {
    match &f.kind {
        FailureKind::Retryable { retry_after } => *retry_after,
        FailureKind::Permanent => None,
    }
}

/// The attempt history record of a failed send.
fn attempt_record(f: &SinkFailure, latency_ms: u64, now: Now) -> AttemptRecord {
    AttemptRecord {
        at: now.wall,
        error: f.message.clone(),
        status: f.status,
        response_excerpt: f.response_excerpt.clone(),
        latency_ms,
        permanent: !f.is_retryable(),
    }
}

/// The DLQ entry of `d`, parked at `now`.
fn parked_entry(
    d: &Delivery,
    history: Vec<AttemptRecord>,
    reason: String,
    now: Now,
) -> (u64, DlqEntry) {
    (
        d.offset,
        DlqEntry {
            event_id: d.event_id.clone(),
            parked_at: now.wall,
            reason,
            attempts: history,
            redrive: false,
        },
    )
}

/// The delivery of stored event `e` to `dest`: its body masked by the
/// destination's rules.
pub fn to_delivery(dest: &DestinationConfig, e: &StoredEvent) -> Result<Delivery, String> {
    let body = if dest.masking.is_empty() {
        // Straight to text: no `Value` to build and walk.
        Body::render(e).map_err(|err| format!("encode event: {err}"))?
    } else {
        let mut body = serde_json::to_value(e).map_err(|err| format!("encode event: {err}"))?;
        let key = dest.mask_key.as_deref().unwrap_or("").as_bytes();
        let planted =
            crate::replicated::planted::planted(crate::replicated::planted::PlantedBug::Masking);
        if let Some(event) = body.get_mut("event").filter(|_| !planted) {
            mask::apply(&dest.masking, key, event);
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

#[cfg(test)]
mod tests;
