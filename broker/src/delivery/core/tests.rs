//! Table tests of the delivery core: each row is the replicated state and
//! stored events a core starts from, the sink's answers, and the effects
//! the core must hand out.

use std::collections::BTreeMap;

use auditflow_protocol::delivery::RedriveSelection;
use auditflow_protocol::Hash32;
use rand::rngs::mock::StepRng;

use super::*;
use crate::replicated::delivery::DestState;

/// One table row: the replicated state and stored events a core starts
/// from, what the sink answers, and what the core must do.
struct Case {
    name: &'static str,
    /// Settings beyond a destination `d` with batches of 3, no linger,
    /// retries from 100 ms doubling.
    config: &'static str,
    /// Events stored: offsets `0..events`.
    events: u64,
    /// The replicated state before (cursor, DLQ, replay window).
    setup: fn(&mut DestState),
    /// The sink's answers, in order.
    outcomes: Vec<SendOutcome>,
    /// Steps to run.
    steps: usize,
    /// Steps that run before the previous step's wait has passed.
    early: &'static [usize],
    /// Show status changes in the trace.
    show_status: bool,
    /// Effects, one line each (reads are left out).
    expect: &'static [&'static str],
    /// The replicated cursor, DLQ offsets and replay window after.
    cursor: u64,
    dlq: &'static [u64],
    replay: Option<(u64, u64)>,
}

fn retryable(message: &str) -> SinkFailure {
    SinkFailure::retryable(message)
}

fn permanent(message: &str) -> SinkFailure {
    SinkFailure::permanent(message)
}

fn parked(offset: u64, parked_at: i64) -> (u64, DlqEntry) {
    (
        offset,
        DlqEntry {
            event_id: format!("e{offset}"),
            parked_at: Timestamp(parked_at),
            reason: "earlier".into(),
            attempts: Vec::new(),
            redrive: false,
        },
    )
}

fn stored(offset: u64) -> StoredEvent {
    let event = serde_json::from_value(serde_json::json!({
        "id": format!("e{offset}"),
        "tenant": "acme",
        "time": "2026-11-24T10:00:00Z",
        "actor": {"id": "u1", "type": "user"},
        "action": "user.login",
        "target": {"type": "session", "id": "s1"},
        "outcome": "success",
    }))
    .expect("valid event json");
    StoredEvent {
        partition: 0,
        offset,
        received_at: Timestamp(1_000),
        hash: Hash32([0; 32]),
        event,
    }
}

fn config(extra: &str) -> Arc<DestinationConfig> {
    let text = format!(
        "name = \"d\"\nbatch_size = 3\nlinger_ms = 0\n{extra}\n\
         sink = {{ kind = \"file\", dir = \"/nonexistent\" }}\n"
    );
    let config: DestinationConfig = toml::from_str(&text).expect("valid test config");
    Arc::new(config)
}

fn render_command(cmd: &DeliveryCommand) -> String {
    let entries = |entries: &[(u64, DlqEntry)]| {
        entries
            .iter()
            .map(|(o, e)| format!("{o}:{} x{}", e.reason, e.attempts.len()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match cmd {
        DeliveryCommand::Advance { next_offset, .. } => format!("advance {next_offset}"),
        DeliveryCommand::Park {
            entries: e,
            next_offset: Some(n),
            ..
        } => format!("park [{}] ->{n}", entries(e)),
        DeliveryCommand::Park { entries: e, .. } => format!("park [{}]", entries(e)),
        DeliveryCommand::Resolve { offsets, .. } => format!("resolve {offsets:?}"),
        DeliveryCommand::ReplayAdvance { expect, next, .. } => {
            format!("replay {expect}->{next}")
        }
        other => format!("{other:?}"),
    }
}

fn render_status(s: &StatusChange) -> String {
    let mut out = vec!["status".to_string()];
    if s.last_success.is_some() {
        out.push(format!("ok+{}", s.delivered));
    }
    if let Some(e) = &s.last_error {
        out.push(format!("err={e}"));
    }
    if let Some(a) = s.attempts {
        out.push(format!("attempts={a}"));
    }
    if let Some(b) = s.breaker {
        out.push(format!("breaker={b:?}"));
    }
    if s.at.is_some() {
        out.push(format!("req={}/{}", s.requests, s.failed_requests));
    }
    if s.retries > 0 {
        out.push(format!("retries+{}", s.retries));
    }
    if s.backoff_wait_ms > 0 {
        out.push(format!("backoff+{}ms", s.backoff_wait_ms));
    }
    if s.breaker_wait_ms > 0 {
        out.push(format!("breaker_wait+{}ms", s.breaker_wait_ms));
    }
    out.join(" ")
}

/// Drives a core against an in-memory replica (the same pure rules as
/// the state machine) and a scripted sink.
fn run(case: &Case) -> (Vec<String>, DestState) {
    let start = Instant::now();
    let mut clock = Duration::ZERO;
    let mut state = DestState::default();
    (case.setup)(&mut state);
    let mut core = Core::new(config(case.config), start);
    let mut outcomes: VecDeque<SendOutcome> = case.outcomes.iter().cloned().collect();
    // Every draw is 0.5: jitter halves the backoff bound.
    let mut rng = StepRng::new(1 << 63, 0);
    let mut trace = Vec::new();
    let mut pending_wait = Duration::ZERO;
    for step in 0..case.steps {
        if !case.early.contains(&step) {
            clock += pending_wait;
        }
        pending_wait = Duration::ZERO;
        core.begin_step();
        for _ in 0..1000 {
            let now = Now {
                at: start + clock,
                wall: Timestamp(1_000_000 + clock.as_nanos() as i64),
            };
            let input = match core.poll(now, &mut rng) {
                Effect::ReadDlq { limit } => Input::Dlq(Ok(state
                    .dlq
                    .iter()
                    .take(limit)
                    .map(|(o, e)| (*o, e.clone()))
                    .collect())),
                Effect::ReadEvents { from, limit } => {
                    Input::Events(Ok((from..case.events.min(from + limit as u64))
                        .map(stored)
                        .collect()))
                }
                Effect::ReadCursor => Input::Cursor(Ok(state.cursor)),
                Effect::ReadReplay => Input::Replay(Ok(state.replay)),
                Effect::ReadHead => Input::Head(case.events),
                Effect::WaitForEvents(d) => {
                    trace.push(format!("idle {}ms", d.as_millis()));
                    clock += d;
                    Input::Waited {
                        came: false,
                        closed: false,
                    }
                }
                effect @ (Effect::Send(_) | Effect::SendAgain(_)) => {
                    // A replay or redrive must ask the sink to write again
                    // (G3), so the trace tells the two apart.
                    let (verb, batch) = match effect {
                        Effect::SendAgain(b) => ("send again", b),
                        Effect::Send(b) => ("send", b),
                        _ => ("?", Vec::new()),
                    };
                    let offsets: Vec<String> = batch.iter().map(|d| d.offset.to_string()).collect();
                    trace.push(format!("{verb} {}", offsets.join(",")));
                    let outcome = outcomes.pop_front().unwrap_or(SendOutcome::Delivered);
                    Input::Sent {
                        batch,
                        outcome,
                        latency_ms: 1,
                    }
                }
                Effect::Record(next_offset) => {
                    trace.push(format!("record {next_offset}"));
                    state.apply(&DeliveryCommand::Advance {
                        dest: "d".into(),
                        next_offset,
                    });
                    continue;
                }
                Effect::Propose(cmd) => {
                    trace.push(render_command(&cmd));
                    state.apply(&cmd);
                    continue;
                }
                Effect::Status(s) => {
                    if case.show_status {
                        trace.push(render_status(&s));
                    }
                    continue;
                }
                Effect::Paused(reason) => {
                    trace.push(format!("paused {reason}"));
                    continue;
                }
                Effect::Done(Resume::Now) => {
                    trace.push("now".into());
                    break;
                }
                Effect::Done(Resume::At(at)) => {
                    pending_wait = at - now.at;
                    trace.push(format!("wait {}ms", pending_wait.as_millis()));
                    break;
                }
            };
            core.input(input);
        }
    }
    (trace, state)
}

fn no_state(_: &mut DestState) {}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "success, recorded once caught up for the rest of the interval",
            config: "",
            events: 5,
            setup: no_state,
            outcomes: vec![],
            steps: 3,
            early: &[],
            show_status: true,
            expect: &[
                "send 0,1,2",
                "status breaker=Closed req=3/0",
                "status ok+3 attempts=0 breaker=Closed",
                "now",
                "send 3,4",
                "status breaker=Closed req=2/0",
                "status ok+2 attempts=0 breaker=Closed",
                "now",
                "idle 100ms",
                "record 5",
                "now",
            ],
            cursor: 5,
            dlq: &[],
            replay: None,
        },
        Case {
            name: "per-item transient failure, retried, parked when the budget is spent",
            config: "retry = { initial_ms = 100, max_attempts = 2 }",
            events: 3,
            setup: no_state,
            outcomes: vec![
                SendOutcome::PerItem(vec![Ok(()), Err(retryable("busy")), Ok(())]),
                SendOutcome::Failed(retryable("busy")),
            ],
            steps: 4,
            early: &[],
            show_status: false,
            expect: &[
                "send 0,1,2",
                // What went before the failed item is not sent again; it
                // is recorded with the cadence, not at the cost of a Raft
                // round per failure.
                // The first retry is cheap: bound 5 ms, jitter 0.5.
                "wait 2ms",
                "send 1,2",
                "park [1:gave up after 2 attempts: busy x2] ->2",
                "now",
                "send 2",
                "now",
                // Recorded 3 ms in (the advance does not count).
                "idle 97ms",
                "record 3",
                "now",
            ],
            cursor: 3,
            dlq: &[1],
            replay: None,
        },
        Case {
            name: "delivered within the record interval: not recorded yet",
            config: "",
            events: 1,
            setup: no_state,
            outcomes: vec![SendOutcome::Failed(retryable("down"))],
            steps: 2,
            early: &[],
            show_status: false,
            expect: &["send 0", "wait 2ms", "send 0", "now"],
            cursor: 0,
            dlq: &[],
            replay: None,
        },
        Case {
            name: "permanent failure: a batch narrows to one, the bad one is parked at once",
            config: "",
            events: 3,
            setup: no_state,
            outcomes: vec![
                SendOutcome::Failed(permanent("bad")),
                SendOutcome::Failed(permanent("bad")),
            ],
            steps: 3,
            early: &[],
            show_status: true,
            expect: &[
                "send 0,1,2",
                // A refusal is an answer: the endpoint is up.
                "status breaker=Closed req=1/0",
                "now",
                "send 0",
                "status breaker=Closed req=1/0",
                "park [0:bad x1] ->1",
                "status err=bad attempts=0",
                "now",
                "send 1,2",
                "status breaker=Closed req=2/0",
                "status ok+2 attempts=0 breaker=Closed",
                "now",
            ],
            cursor: 1,
            dlq: &[0],
            replay: None,
        },
        Case {
            name: "unordered: items confirmed after a failed one are not sent again",
            config: "ordering = \"none\"\nmax_in_flight = 4",
            events: 4,
            setup: no_state,
            outcomes: vec![
                SendOutcome::PerItem(vec![Ok(()), Err(retryable("busy")), Ok(())]),
                SendOutcome::Delivered,
            ],
            steps: 3,
            early: &[],
            show_status: false,
            expect: &[
                "send 0,1,2",
                // The cursor moves over the delivered prefix only (not
                // recorded yet: within the interval).
                "wait 2ms",
                // 2 was confirmed: the retry sends 1 and what comes after
                // the batch.
                "send 1,3",
                "now",
                "idle 97ms",
                "record 4",
                "now",
            ],
            cursor: 4,
            dlq: &[],
            replay: None,
        },
        Case {
            name: "permanent per-item failure is parked, the rest goes through",
            config: "",
            events: 3,
            setup: no_state,
            outcomes: vec![SendOutcome::PerItem(vec![
                Ok(()),
                Err(permanent("schema")),
                Ok(()),
            ])],
            steps: 1,
            early: &[],
            show_status: false,
            expect: &["send 0,1,2", "park [1:schema x1] ->3", "now"],
            cursor: 3,
            dlq: &[1],
            replay: None,
        },
        Case {
            name: "backoff grows while the same item fails, starts over for the next one",
            config: "",
            events: 3,
            setup: no_state,
            outcomes: vec![
                SendOutcome::PerItem(vec![
                    Err(retryable("busy")),
                    Err(retryable("busy")),
                    Err(retryable("busy")),
                ]),
                SendOutcome::Failed(retryable("busy")),
                SendOutcome::Failed(retryable("busy")),
                SendOutcome::PerItem(vec![Ok(()), Err(retryable("busy")), Err(retryable("busy"))]),
            ],
            steps: 6,
            early: &[],
            show_status: false,
            expect: &[
                "send 0,1,2",
                // Bounds 5, 10, 20 ms (jitter 0.5) for the same item.
                "wait 2ms",
                "send 0,1,2",
                "wait 5ms",
                "send 0,1,2",
                "wait 10ms",
                "send 0,1,2",
                // A new head of line: cheap again.
                "wait 2ms",
                "send 1,2",
                "now",
                "idle 80ms",
                "record 3",
                "now",
            ],
            cursor: 3,
            dlq: &[],
            replay: None,
        },
        Case {
            name: "a head that keeps failing: the prefix is recorded once the interval passed",
            config: "retry = { first_retry_ms = 240 }",
            events: 3,
            setup: no_state,
            outcomes: vec![
                SendOutcome::PerItem(vec![Ok(()), Err(retryable("busy")), Err(retryable("busy"))]),
                SendOutcome::Failed(retryable("busy")),
            ],
            steps: 3,
            early: &[],
            show_status: false,
            expect: &[
                "send 0,1,2",
                "wait 120ms",
                "send 1,2",
                // 120 ms since the last record: the prefix is recorded
                // before the next backoff.
                "record 1",
                "wait 120ms",
                "send 1,2",
                "record 3",
                "now",
            ],
            cursor: 3,
            dlq: &[],
            replay: None,
        },
        Case {
            name: "Retry-After raises the backoff",
            config: "",
            events: 1,
            setup: no_state,
            outcomes: vec![SendOutcome::Failed(SinkFailure {
                kind: FailureKind::Retryable {
                    retry_after: Some(Duration::from_secs(5)),
                },
                status: Some(429),
                message: "slow down".into(),
                response_excerpt: None,
            })],
            steps: 2,
            early: &[],
            show_status: false,
            // The interval has long passed: recorded at once.
            expect: &["send 0", "wait 5000ms", "send 0", "record 1", "now"],
            cursor: 1,
            dlq: &[],
            replay: None,
        },
        Case {
            name: "breaker opens, holds sends back, probes one request at a time, closes",
            config: "breaker = { failure_threshold = 1, open_ms = 1000, half_open_successes = 2 }",
            events: 3,
            setup: no_state,
            outcomes: vec![SendOutcome::Failed(retryable("down"))],
            steps: 6,
            early: &[1],
            show_status: true,
            expect: &[
                "send 0,1,2",
                "status breaker=Open req=1/1",
                "status err=down attempts=1 breaker=Open",
                "status retries+1 breaker_wait+1000ms",
                "wait 1000ms",
                // Woken early: the breaker is still open, no send.
                "status breaker=Open breaker_wait+1000ms",
                "wait 1000ms",
                // Half-open: one event, one request, goes through.
                "send 0",
                "status breaker=HalfOpen req=1/0",
                "record 1",
                "status ok+1 attempts=0 breaker=HalfOpen",
                "now",
                // The second probe closes it.
                "send 1",
                "status breaker=Closed req=1/0",
                "status ok+1 attempts=0 breaker=Closed",
                "now",
                "send 2",
                "status breaker=Closed req=1/0",
                "status ok+1 attempts=0 breaker=Closed",
                "now",
                "idle 100ms",
                "record 3",
                "now",
            ],
            cursor: 3,
            dlq: &[],
            replay: None,
        },
        Case {
            name: "replay window: re-sent beside the live stream, refused ones parked",
            config: "",
            events: 5,
            setup: |s| {
                s.cursor = 3;
                s.apply(&DeliveryCommand::Replay {
                    dest: "d".into(),
                    from: 0,
                    until: None,
                });
            },
            outcomes: vec![
                SendOutcome::Failed(retryable("down")),
                SendOutcome::Delivered,
                SendOutcome::PerItem(vec![Ok(()), Err(permanent("gone")), Ok(())]),
            ],
            steps: 4,
            early: &[],
            show_status: false,
            expect: &[
                // Replay's turn: fails, backs off (a cheap first retry).
                "send again 0,1,2",
                "wait 2ms",
                // The live stream's turn.
                "send 3,4",
                "now",
                "send again 0,1,2",
                "park [1:replay: gone x1]",
                "replay 0->3",
                "now",
                "idle 97ms",
                "record 5",
                "now",
            ],
            cursor: 5,
            dlq: &[1],
            replay: None,
        },
        Case {
            name: "redrive by ids: delivered ones resolved, a gone event resolved",
            config: "",
            events: 3,
            setup: |s| {
                s.cursor = 3;
                s.dlq = BTreeMap::from([parked(0, 10), parked(2, 20), parked(7, 30)]);
                s.apply(&DeliveryCommand::Redrive {
                    dest: "d".into(),
                    selection: RedriveSelection::Offsets(vec![2, 7]),
                });
            },
            outcomes: vec![],
            steps: 2,
            early: &[],
            show_status: true,
            expect: &[
                "resolve [7]",
                "send again 2",
                "resolve [2]",
                "status ok+1",
                "now",
                // Nothing marked: the replay window (none), then idle.
                "idle 1000ms",
                "now",
            ],
            cursor: 3,
            dlq: &[0],
            replay: None,
        },
        Case {
            name: "redrive by time range: a failed redrive is parked again, unmarked",
            config: "",
            events: 3,
            setup: |s| {
                s.cursor = 3;
                s.dlq = BTreeMap::from([parked(0, 100), parked(1, 200)]);
                s.apply(&DeliveryCommand::Redrive {
                    dest: "d".into(),
                    selection: RedriveSelection::ParkedBetween {
                        from: Some(Timestamp(150)),
                        until: None,
                    },
                });
            },
            outcomes: vec![SendOutcome::Failed(retryable("down"))],
            steps: 2,
            early: &[],
            show_status: false,
            expect: &[
                "send again 1",
                "park [1:redrive failed: down x1]",
                "now",
                "idle 1000ms",
                "now",
            ],
            cursor: 3,
            dlq: &[0, 1],
            replay: None,
        },
    ]
}

#[test]
fn table() {
    for case in cases() {
        let (trace, state) = run(&case);
        assert_eq!(trace, case.expect, "{}: effects", case.name);
        assert_eq!(state.cursor, case.cursor, "{}: cursor", case.name);
        let dlq: Vec<u64> = state.dlq.keys().copied().collect();
        assert_eq!(dlq, case.dlq, "{}: DLQ", case.name);
        assert!(
            state.dlq.values().all(|e| !e.redrive),
            "{}: marks left",
            case.name
        );
        assert_eq!(state.replay, case.replay, "{}: replay window", case.name);
    }
}

/// The pause on unreadable storage: reported, then a fixed wait.
#[test]
fn storage_trouble_pauses() {
    let start = Instant::now();
    let mut core = Core::new(config(""), start);
    let now = Now {
        at: start,
        wall: Timestamp(0),
    };
    let mut rng = StepRng::new(0, 0);
    core.begin_step();
    assert!(matches!(core.poll(now, &mut rng), Effect::ReadDlq { .. }));
    core.input(Input::Dlq(Err("disk on fire".into())));
    assert!(matches!(core.poll(now, &mut rng), Effect::Paused(r) if r == "disk on fire"));
    assert!(matches!(
        core.poll(now, &mut rng),
        Effect::Status(StatusChange { last_error: Some(e), .. }) if e == "node storage: disk on fire"
    ));
    assert!(matches!(
        core.poll(now, &mut rng),
        Effect::Done(Resume::At(t)) if t == start + TROUBLE_WAIT
    ));
}
