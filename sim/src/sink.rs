//! Simulated sinks: the endpoints the real delivery engine delivers to.
//!
//! Every [`SimSink`] of a run shares one [`SimSinks`]: the recorder of
//! every accepted delivery in arrival order (what the checker verifies G2
//! and G4 against) and the state of each destination's endpoint. What goes
//! wrong is decided by a seeded RNG derived from the run's seed, at the
//! rates of the run's [`SinkFaults`], and happens in simulated time, so a
//! seed replays exactly:
//!
//! - outages: every send to the endpoint fails retryably (HTTP 503) until
//!   the sink nemesis ends it;
//! - slowness: sends take hundreds of milliseconds to seconds, while the
//!   nemesis says so or now and then;
//! - transient errors: a send fails retryably now and then (a flaky
//!   endpoint), a bulk send stops part-way;
//! - refused events: a share of event ids is refused permanently by each
//!   destination (content it can never accept), so they must end in that
//!   destination's DLQ;
//! - duplicate acceptance: the endpoint records a batch twice (a retry
//!   after a lost answer), which the checker must tolerate (G3);
//! - flaky requests, in the progress phase only: each request fails
//!   transiently at a fixed rate while the endpoint is up (every item of
//!   a per-item endpoint is a request, as a single-mode webhook's POSTs
//!   are, and the first failure stops the rest).
//!
//! The sink kind in a destination's configuration is ignored: the
//! simulator's [`SinkFactory`] always builds a [`SimSink`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use auditflow_broker::delivery::supervisor::SinkFactory;
use auditflow_broker::delivery::DestinationConfig;
use auditflow_broker::sinks::{Delivery, FailureKind, SendOutcome, Sink, SinkFailure};
use futures::future::BoxFuture;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use crate::options::SinkFaults;
use crate::trace::Trace;

/// How an endpoint tells the sender it refuses some events of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The whole batch is refused (a webhook answering 400): the delivery
    /// actor has to narrow the batch down to find the bad event.
    WholeBatch,
    /// One result per item (a bulk API): the rest of the batch goes in.
    PerItem,
}

/// One accepted delivery, as the endpoint saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// Destination name.
    pub dest: Arc<str>,
    /// Partition the event is stored in.
    pub partition: u32,
    /// Its offset there.
    pub offset: u64,
    /// Its id (the idempotency key).
    pub event_id: String,
    /// The body as sent (masked by the destination's rules), so the
    /// checker can hold masking to account.
    pub body: Arc<str>,
}

struct Endpoint {
    refusal: Refusal,
    down: bool,
    slow: bool,
}

struct State {
    rng: StdRng,
    /// Per-send fault rates (errors, duplicates, random slowness); all
    /// zero once the run heals, so delivery can finish.
    rates: SinkFaults,
    endpoints: BTreeMap<String, Endpoint>,
    arrivals: Vec<Arrival>,
    sends: u64,
    /// Per request: a transient failure (the progress phase's flaky
    /// endpoints; 0 otherwise).
    per_request: f64,
    /// Per (destination, partition) that ever failed a request for one of
    /// the run's own faults (an outage, a transient error, a bulk send cut
    /// short): the requests answered since the last such failure, counted
    /// as the breaker counts them. The progress checker asks it whether
    /// such a failure can still be among a breaker's last requests.
    since_fault: BTreeMap<(Arc<str>, u32), u64>,
}

impl State {
    /// Counts the `requests` of a send to (`dest`, `partition`); if
    /// `fault`, the last of them failed for one of the run's own faults.
    fn count(&mut self, dest: &Arc<str>, partition: u32, requests: u64, fault: bool) {
        let key = (Arc::clone(dest), partition);
        if fault {
            self.since_fault.insert(key, 0);
        } else if let Some(since) = self.since_fault.get_mut(&key) {
            *since = since.saturating_add(requests);
        }
    }
}

struct Shared {
    seed: u64,
    /// Share of event ids refused permanently: fixed for the whole run,
    /// healing included (it is the events' content, not a fault).
    permanent: f64,
    start: tokio::time::Instant,
    trace: Arc<Mutex<Trace>>,
    state: Mutex<State>,
}

/// The endpoints of one run and the recorder they share; clones share
/// them.
#[derive(Clone)]
pub struct SimSinks {
    shared: Arc<Shared>,
}

/// Builds a run's [`SinkFactory`] from its [`SimSinks`]: the seam where
/// tests plug in a broken sink (see `SimOptions::sinks`).
pub type SinkHook = Arc<dyn Fn(&SimSinks) -> SinkFactory + Send + Sync>;

/// The correct hook: every destination gets a plain [`SimSink`].
pub fn sim_sinks() -> SinkHook {
    Arc::new(|sinks: &SimSinks| sinks.factory())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SimSinks {
    /// Endpoints for `destinations` (name and how each refuses events),
    /// with faults at `rates` decided by an RNG seeded with `rng_seed`.
    /// `seed` fixes which events are refused.
    pub(crate) fn new(
        seed: u64,
        rng_seed: u64,
        rates: &SinkFaults,
        destinations: &[(String, Refusal)],
        start: tokio::time::Instant,
        trace: Arc<Mutex<Trace>>,
    ) -> SimSinks {
        let endpoints = destinations
            .iter()
            .map(|(name, refusal)| {
                (
                    name.clone(),
                    Endpoint {
                        refusal: *refusal,
                        down: false,
                        slow: false,
                    },
                )
            })
            .collect();
        SimSinks {
            shared: Arc::new(Shared {
                seed,
                permanent: rates.permanent,
                start,
                trace,
                state: Mutex::new(State {
                    rng: StdRng::seed_from_u64(rng_seed),
                    rates: rates.clone(),
                    endpoints,
                    arrivals: Vec::new(),
                    sends: 0,
                    per_request: 0.0,
                    since_fault: BTreeMap::new(),
                }),
            }),
        }
    }

    /// The plain sink of `dest` for `partition`.
    pub fn sink(&self, dest: &DestinationConfig, partition: u32) -> SimSink {
        SimSink {
            shared: Arc::clone(&self.shared),
            dest: Arc::from(dest.name.as_str()),
            partition,
        }
    }

    /// A factory that ignores the configured sink kind and builds
    /// [`SimSink`]s.
    pub fn factory(&self) -> SinkFactory {
        let sinks = self.clone();
        Arc::new(move |dest: &DestinationConfig, partition: u32| {
            Ok(Box::new(sinks.sink(dest, partition)) as Box<dyn Sink>)
        })
    }

    /// Whether `dest` refuses `event_id` permanently. A pure function of
    /// the seed, so the checker asks the same question afterwards and a
    /// re-sent event is refused again.
    pub fn refuses(&self, dest: &str, event_id: &str) -> bool {
        let mut h = Sha256::new();
        h.update(self.shared.seed.to_le_bytes());
        h.update(dest.as_bytes());
        h.update([0]);
        h.update(event_id.as_bytes());
        let digest = h.finalize();
        let mut first = [0; 8];
        first.copy_from_slice(&digest[..8]);
        // The top 53 bits, a uniform fraction in [0, 1) exact as an f64.
        let fraction = (u64::from_le_bytes(first) >> 11) as f64 / (1u64 << 53) as f64;
        fraction < self.shared.permanent
    }

    /// Every accepted delivery so far, in arrival order.
    pub fn arrivals(&self) -> Vec<Arrival> {
        lock(&self.shared.state).arrivals.clone()
    }

    /// Sends made so far (accepted or not).
    pub fn sends(&self) -> u64 {
        lock(&self.shared.state).sends
    }

    /// Destination names.
    pub(crate) fn destinations(&self) -> Vec<String> {
        lock(&self.shared.state).endpoints.keys().cloned().collect()
    }

    /// Takes `dest`'s endpoint down (every send fails) or brings it back.
    pub(crate) fn set_down(&self, dest: &str, down: bool) {
        if let Some(e) = lock(&self.shared.state).endpoints.get_mut(dest) {
            e.down = down;
        }
    }

    /// Makes `dest`'s endpoint slow or fast again.
    pub(crate) fn set_slow(&self, dest: &str, slow: bool) {
        if let Some(e) = lock(&self.shared.state).endpoints.get_mut(dest) {
            e.slow = slow;
        }
    }

    /// From now on every request fails transiently at `rate` (0 to 1),
    /// the endpoints otherwise up: the progress phase's flaky endpoints.
    pub(crate) fn set_per_request_failures(&self, rate: f64) {
        lock(&self.shared.state).per_request = rate;
    }

    /// Whether one of the run's own faults (not the progress phase's
    /// flaky requests) failed one of the last `window` requests to `dest`
    /// for `partition`: a breaker counting its last `window` requests may
    /// then still hold that failure, and rightly open on it.
    pub(crate) fn fault_within(&self, dest: &str, partition: u32, window: u64) -> bool {
        lock(&self.shared.state)
            .since_fault
            .get(&(Arc::from(dest), partition))
            .is_some_and(|since| *since < window)
    }

    /// Every endpoint up, fast and without transient faults from now on
    /// (refused events stay refused: that is their content, not a fault).
    pub(crate) fn heal(&self) {
        let mut s = lock(&self.shared.state);
        s.rates = SinkFaults {
            permanent: s.rates.permanent,
            ..quiet()
        };
        for e in s.endpoints.values_mut() {
            e.down = false;
            e.slow = false;
        }
    }

    fn trace(&self, text: String) {
        let at = self.shared.start.elapsed();
        lock(&self.shared.trace).line(at, text);
    }
}

/// A simulated endpoint of one destination, used by one (destination,
/// partition) delivery actor. Clones deliver to the same endpoint.
#[derive(Clone)]
pub struct SimSink {
    shared: Arc<Shared>,
    dest: Arc<str>,
    partition: u32,
}

/// What the endpoint decided before the batch "travels".
struct Plan {
    latency: Duration,
}

impl SimSink {
    fn sinks(&self) -> SimSinks {
        SimSinks {
            shared: Arc::clone(&self.shared),
        }
    }

    fn plan(&self) -> Plan {
        let mut s = lock(&self.shared.state);
        s.sends += 1;
        let spike = s.rates.spike;
        let slow = s.endpoints.get(&*self.dest).is_some_and(|e| e.slow);
        let mut latency = Duration::from_millis(s.rng.gen_range(1..10));
        if slow || s.rng.gen_bool(spike) {
            latency += Duration::from_millis(s.rng.gen_range(200..2000));
        }
        Plan { latency }
    }

    /// Delivers `batch` to the endpoint: waits the endpoint's latency in
    /// simulated time, then decides the outcome and records what was
    /// accepted. Public so tests can wrap it in a broken sink.
    pub async fn deliver(&self, batch: &[Delivery]) -> SendOutcome {
        let plan = self.plan();
        tokio::time::sleep(plan.latency).await;
        let sinks = self.sinks();
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return SendOutcome::Delivered;
        };
        let what = format!(
            "sink {} p{} o{}..o{} ({})",
            self.dest,
            self.partition,
            first.offset,
            last.offset,
            batch.len()
        );
        let refused: Vec<bool> = batch
            .iter()
            .map(|d| sinks.refuses(&self.dest, &d.event_id))
            .collect();
        let mut s = lock(&self.shared.state);
        let (down, refusal) = match s.endpoints.get(&*self.dest) {
            Some(e) => (e.down, e.refusal),
            None => (false, Refusal::WholeBatch),
        };
        let rates = s.rates.clone();
        if down {
            s.count(&self.dest, self.partition, 0, true);
            drop(s);
            sinks.trace(format!("{what}: endpoint down"));
            return SendOutcome::Failed(unavailable("endpoint down"));
        }
        if s.rng.gen_bool(rates.flaky) {
            let hint = s
                .rng
                .gen_bool(rates.retry_after)
                .then(|| Duration::from_millis(s.rng.gen_range(50..500)));
            s.count(&self.dest, self.partition, 0, true);
            drop(s);
            sinks.trace(format!("{what}: transient error"));
            let mut f = unavailable("transient error");
            f.kind = FailureKind::Retryable { retry_after: hint };
            return SendOutcome::Failed(f);
        }
        // A whole-batch endpoint takes one request per batch.
        if refusal == Refusal::WholeBatch && s.per_request > 0.0 {
            let rate = s.per_request;
            if s.rng.gen_bool(rate) {
                s.count(&self.dest, self.partition, 1, false);
                drop(s);
                sinks.trace(format!("{what}: flaky request failed"));
                return SendOutcome::Failed(unavailable("flaky request failed"));
            }
        }
        let outcome = match refusal {
            Refusal::WholeBatch if refused.iter().any(|r| *r) => {
                // A refusal is an answer: the endpoint is up.
                s.count(&self.dest, self.partition, 1, false);
                drop(s);
                sinks.trace(format!("{what}: batch refused"));
                let mut f = SinkFailure::permanent("the endpoint refuses an event of the batch");
                f.status = Some(400);
                return SendOutcome::Failed(f);
            }
            Refusal::WholeBatch => {
                s.count(&self.dest, self.partition, batch.len() as u64, false);
                SendOutcome::Delivered
            }
            Refusal::PerItem => {
                // An ordered bulk endpoint: a retryable item failure stops
                // the items after it (they are reported retryable and not
                // stored), so arrival order stays offset order.
                let partial = if s.rng.gen_bool(rates.partial) {
                    Some(s.rng.gen_range(0..batch.len()))
                } else {
                    None
                };
                let mut cut = partial;
                // One request per item: the first that fails stops the
                // rest, as a single-mode sender stops at a failure.
                if s.per_request > 0.0 {
                    let rate = s.per_request;
                    let flaky = (0..batch.len()).find(|_| s.rng.gen_bool(rate));
                    cut = match (cut, flaky) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                // Answered up to the cut, which failed: a fault of the
                // run's if the bulk send was cut short there.
                match cut {
                    Some(c) => {
                        let fault = partial == Some(c);
                        s.count(&self.dest, self.partition, c as u64 + 1, fault);
                    }
                    None => s.count(&self.dest, self.partition, batch.len() as u64, false),
                }
                let results: Vec<Result<(), SinkFailure>> = refused
                    .iter()
                    .enumerate()
                    .map(|(i, refused)| {
                        if cut.is_some_and(|c| i >= c) {
                            Err(unavailable("item not processed: endpoint busy"))
                        } else if *refused {
                            let mut f = SinkFailure::permanent("the endpoint refuses this event");
                            f.status = Some(400);
                            Err(f)
                        } else {
                            Ok(())
                        }
                    })
                    .collect();
                SendOutcome::PerItem(results)
            }
        };
        let accepted: Vec<&Delivery> = match &outcome {
            SendOutcome::PerItem(results) => batch
                .iter()
                .zip(results)
                .filter(|(_, r)| r.is_ok())
                .map(|(d, _)| d)
                .collect(),
            _ => batch.iter().collect(),
        };
        let copies = if s.rng.gen_bool(rates.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            for d in &accepted {
                s.arrivals.push(Arrival {
                    dest: Arc::clone(&self.dest),
                    partition: d.partition,
                    offset: d.offset,
                    event_id: d.event_id.clone(),
                    body: Arc::from(d.body.as_str()),
                });
            }
        }
        drop(s);
        sinks.trace(format!(
            "{what}: {} accepted{}",
            accepted.len(),
            if copies > 1 { " twice" } else { "" }
        ));
        outcome
    }
}

/// Per-send rates with nothing going wrong.
fn quiet() -> SinkFaults {
    crate::options::FaultOptions::none().sinks
}

fn unavailable(message: &str) -> SinkFailure {
    let mut f = SinkFailure::retryable(message);
    f.status = Some(503);
    f
}

impl Sink for SimSink {
    fn send<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, SendOutcome> {
        Box::pin(self.deliver(batch))
    }
}
