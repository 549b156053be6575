//! Synthetic events of a chosen size, for the benchmarks (`auditflow
//! bench`, `bench-delivery`, `benches/`), so that every measurement uses
//! the same workload.

use crate::{canonical, Actor, Event, JsonObject, Outcome, Target, Timestamp};

/// Event number `n` of a workload: id `id`, one of `tenants` tenants
/// (round robin), and a `data` object padded so that the canonical
/// encoding is about `size` bytes (never less than the event without
/// `data`).
pub fn sized_event(id: String, n: usize, tenants: usize, size: usize) -> Event {
    let mut e = Event {
        id,
        tenant: format!("tenant-{}", n % tenants.max(1)),
        time: Timestamp(1_764_000_000_000_000_000 + n as i64),
        actor: Actor {
            id: format!("user-{}", n % 1000),
            kind: "user".into(),
            name: None,
            ip: Some("10.1.2.3".into()),
        },
        action: "document.read".into(),
        target: Target {
            kind: "document".into(),
            id: format!("doc-{n}"),
        },
        outcome: Outcome::Success,
        source: None,
        context: Default::default(),
        data: None,
        schema_version: None,
        partition_key: None,
    };
    // 16 bytes: the `data` field's presence byte, length and `{"pad":""}`.
    let pad = size.saturating_sub(canonical::encoded_len(&e) + 16);
    if pad > 0 {
        let v = serde_json::json!({ "pad": "x".repeat(pad) });
        e.data = JsonObject::from_value(&v).ok();
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_out_at_the_size_asked_for() {
        for size in [256, 512, 4096] {
            let e = sized_event("id-1".into(), 7, 64, size);
            let len = canonical::encoded_len(&e);
            assert!(len.abs_diff(size) <= 2, "asked {size}, got {len}");
            assert!(crate::validate::validate_event(&e, &crate::Limits::default()).is_ok());
        }
        assert!(sized_event("id-1".into(), 7, 64, 10).data.is_none());
    }
}
