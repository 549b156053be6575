//! What rendering one delivery body costs: the stored event as the JSON
//! text every sink writes (`sinks::Body::render`), and, for comparison,
//! decoding it from its stored bytes as a delivery read does.
//!
//! `cargo bench --bench delivery_body` renders ~512-byte sample events
//! and prints nanoseconds per event for each step. Environment: `EVENTS`
//! (default 200000), `SIZE` (512).

use std::hint::black_box;
use std::time::Instant;

use auditflow_broker::sinks::Body;
use auditflow_broker::storage::tables;
use auditflow_protocol::{sample, Hash32, StoredEvent, Timestamp};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let events = env("EVENTS", 200_000);
    let size = env("SIZE", 512);
    let stored: Vec<StoredEvent> = (0..1000)
        .map(|n| StoredEvent {
            partition: 3,
            offset: n as u64,
            received_at: Timestamp(1_764_000_000_123_456_789 + n as i64),
            hash: Hash32([n as u8; 32]),
            event: sample::sized_event(format!("{n:016}"), n, 64, size),
        })
        .collect();
    let bytes: Vec<Vec<u8>> = stored
        .iter()
        .map(|e| tables::encode(e, "stored event").expect("encode"))
        .collect();

    let started = Instant::now();
    for i in 0..events {
        let body = Body::render(&stored[i % stored.len()]).expect("render");
        black_box(body);
    }
    let render = started.elapsed();

    let started = Instant::now();
    for i in 0..events {
        let e: StoredEvent =
            tables::decode(&bytes[i % bytes.len()], "stored event").expect("decode");
        black_box(e);
    }
    let decode = started.elapsed();

    let per = |d: std::time::Duration| d.as_secs_f64() * 1e9 / events as f64;
    println!(
        "delivery body ({events} events of ~{size} bytes): render {:.0} ns/event, decode from stored bytes {:.0} ns/event",
        per(render),
        per(decode)
    );
}
