//! What applying committed entries costs one node: the state machine's
//! redb writes, hashing and dedup, without network or Raft.
//!
//! `cargo bench --bench state_machine` applies 256-event batches of
//! ~512-byte events into a fresh store and prints microseconds per event.
//! Every node of a cluster does this for every event, so it bounds what a
//! cluster can take in on a machine. Environment: `EVENTS` (default
//! 200000), `BATCH` (32), `IDS=random` for ids in no particular order (the
//! default is time-ordered, like the client's UUIDv7 ids), `WINDOW` (the
//! dedup window, default 1000000; a smaller one makes every append also
//! forget old ids, as a long-running partition does).

use std::time::Instant;

use auditflow_broker::storage::types::{Command, Entry, LogId};
use auditflow_broker::storage::Store;
use auditflow_protocol::{sample, Event, Timestamp};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn event(n: usize, random_ids: bool) -> Event {
    let id = if random_ids {
        // A fixed permutation of n: ids land all over the dedup index.
        format!("{:016x}", (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    } else {
        format!("{n:016}")
    };
    sample::sized_event(id, n, 64, 512)
}

fn main() {
    let events = env("EVENTS", 200_000);
    let batch = env("BATCH", 32).max(1);
    let random_ids = std::env::var("IDS").is_ok_and(|v| v == "random");
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = Store::open(&dir.path().join("bench.redb")).expect("open store");
    let window = env("WINDOW", 1_000_000) as u64;
    let mut sm = store.state_machine(0, window);
    let entries: Vec<Entry> = (0..events.div_ceil(batch))
        .map(|i| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), i as u64 + 1),
            payload: EntryPayload::Normal(Command::Append {
                received_at: Timestamp(1_764_000_000_000_000_000),
                events: (i * batch..((i + 1) * batch).min(events))
                    .map(|n| event(n, random_ids))
                    .collect::<Vec<_>>()
                    .into(),
            }),
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    runtime.block_on(async {
        // Two entries per apply call, as openraft hands over what committed
        // together.
        let mut rest = entries.into_iter().peekable();
        while rest.peek().is_some() {
            let chunk: Vec<Entry> = rest.by_ref().take(2).collect();
            sm.apply(chunk).await.expect("apply");
        }
    });
    let took = started.elapsed();
    println!(
        "state machine: {events} events in batches of {batch} ({} ids, window {window}): {:.2} us/event, {:.0} events/s",
        if random_ids { "random" } else { "ordered" },
        took.as_secs_f64() * 1e6 / events as f64,
        events as f64 / took.as_secs_f64()
    );
}
