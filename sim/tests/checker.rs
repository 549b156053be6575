//! The checker is tested: deliberately broken components must be reported
//! within a short sweep, and the real system must pass the same sweep.

use std::sync::Arc;
use std::time::Duration;

use auditflow_broker::delivery::DestinationConfig;
use auditflow_broker::sinks::{Delivery, SendOutcome, Sink};
use auditflow_protocol::wire::{Ack, AppendResult, Request, Response};
use auditflow_protocol::Hash32;
use auditflow_sim::disk::SimDisk;
use auditflow_sim::sink::{SimSink, SimSinks, SinkHook};
use auditflow_sim::{run, SimOptions};
use futures::future::BoxFuture;
use rand::Rng;

fn sweep(
    seeds: std::ops::Range<u64>,
    mut tweak: impl FnMut(&mut SimOptions),
) -> Vec<(u64, Vec<String>)> {
    seeds
        .map(|seed| {
            let mut o = SimOptions::new(seed);
            o.duration = Duration::from_secs(15);
            tweak(&mut o);
            let r = run(&o);
            (seed, r.violations)
        })
        .collect()
}

#[test]
fn the_real_system_passes_a_short_sweep() {
    for (seed, violations) in sweep(100..106, |_| {}) {
        assert!(violations.is_empty(), "seed {seed}: {violations:?}");
    }
}

#[test]
fn same_seed_same_trace() {
    let a = run(&SimOptions::new(42));
    let b = run(&SimOptions::new(42));
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.acked, b.acked);
    let c = run(&SimOptions::new(43));
    assert_ne!(a.trace_hash, c.trace_hash, "another seed, another run");
}

/// Disks that acknowledge fsync but keep nothing: a power failure loses
/// acknowledged appends, and the checker must say so (G1).
#[test]
fn a_lying_disk_is_caught() {
    let results = sweep(0..20, |o| o.disk = Arc::new(|_| SimDisk::lying()));
    let caught: Vec<_> = results.iter().filter(|(_, v)| !v.is_empty()).collect();
    assert!(
        !caught.is_empty(),
        "no seed caught the lying disk: {results:?}"
    );
    assert!(
        caught.iter().any(|(_, v)| v
            .iter()
            .any(|m| m.starts_with("G1") || m.contains("G6") || m.contains("two leaders"))),
        "{caught:?}"
    );
}

/// A node that acknowledges appends before they are committed (and then
/// never commits them): the checker must report lost acknowledged events.
#[test]
fn an_ack_before_commit_is_caught() {
    let results = sweep(0..3, |o| {
        o.client_hook = Some(Arc::new(
            |request: &Request, rng: &mut rand::rngs::StdRng| {
                let Request::Append { partition, .. } = request else {
                    return None;
                };
                if !rng.gen_bool(0.05) {
                    return None;
                }
                Some(Response::Appended(vec![AppendResult::Stored(Ack {
                    partition: *partition,
                    offset: rng.gen_range(0..50),
                    hash: Hash32([7; 32]),
                    duplicate: false,
                })]))
            },
        ));
    });
    assert!(
        results
            .iter()
            .all(|(_, v)| v.iter().any(|m| m.starts_with("G1") || m.starts_with("G5"))),
        "{results:?}"
    );
}

/// A sink that reports a batch delivered as soon as it is handed over and
/// sends it in the background, ignoring the endpoint's answer: the
/// delivery actor advances its cursor before the endpoint confirmed, so an
/// outage or a refusal loses events without a trace. The checker must
/// report it (G2).
struct FireAndForget(SimSink);

impl Sink for FireAndForget {
    fn send<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, SendOutcome> {
        let sink = self.0.clone();
        let batch = batch.to_vec();
        tokio::spawn(async move {
            let _ = sink.deliver(&batch).await;
        });
        Box::pin(async { SendOutcome::Delivered })
    }
}

fn fire_and_forget() -> SinkHook {
    Arc::new(|sinks: &SimSinks| {
        let sinks = sinks.clone();
        Arc::new(move |dest: &DestinationConfig, partition: u32| {
            Ok(Box::new(FireAndForget(sinks.sink(dest, partition))) as Box<dyn Sink>)
        })
    })
}

#[test]
fn a_cursor_advanced_before_the_sink_confirmed_is_caught() {
    let results = sweep(0..3, |o| o.sinks = fire_and_forget());
    assert!(
        results
            .iter()
            .all(|(_, v)| v.iter().any(|m| m.starts_with("G2"))),
        "{results:?}"
    );
}
