//! Planted bugs: each breaks one guarantee in the real broker on purpose
//! (`auditflow_broker::replicated::planted`), and a short sweep must
//! report a violation of that guarantee. A checker that misses one would
//! let the real bug through too.

use std::time::Duration;

use auditflow_sim::{run, PlantedBug, SimOptions};

/// Seeds a planted bug gets to show itself.
const SEEDS: u64 = 20;

/// Runs seeds with `bug` planted until one reports a violation that
/// starts with `guarantee`; fails if none does within [`SEEDS`] (what
/// `auditflow sim --planted-bug NAME --seeds 20` runs).
fn caught(bug: PlantedBug, guarantee: &str) {
    let mut seen = Vec::new();
    for seed in 0..SEEDS {
        let mut o = SimOptions::new(seed);
        o.duration = Duration::from_secs(10);
        o.planted_bug = Some(bug);
        let r = run(&o);
        if r.violations.iter().any(|v| v.starts_with(guarantee)) {
            return;
        }
        seen.push((seed, r.violations));
    }
    panic!("{bug:?} not reported as {guarantee} in {SEEDS} seeds: {seen:?}");
}

#[test]
fn delivery_out_of_order_is_caught() {
    caught(PlantedBug::G4Order, "G4");
}

#[test]
fn a_duplicate_append_is_caught() {
    caught(PlantedBug::G5Duplicates, "G5");
}

#[test]
fn a_broken_chain_is_caught() {
    caught(PlantedBug::G6Chain, "G6");
}

#[test]
fn unmasked_delivery_is_caught() {
    caught(PlantedBug::Masking, "masking");
}

#[test]
fn a_breaker_that_trips_on_a_flaky_endpoint_is_caught() {
    caught(PlantedBug::BreakerPerBatch, "progress");
}
