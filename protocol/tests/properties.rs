//! Property tests of the protocol crate: wire round trips, canonical
//! encoding stability, and validation reasons.

use std::collections::BTreeMap;

use auditflow_protocol::frame::{self, DEFAULT_MAX_FRAME_BYTES};
use auditflow_protocol::validate::{canonicalize_event, validate_event, Limits};
use auditflow_protocol::wire::{Request, PROTOCOL_VERSION};
use auditflow_protocol::{
    canonical, Actor, Event, Hash32, JsonObject, Outcome, Source, StoredEvent, StoredEventRef,
    Target, Timestamp,
};
use proptest::prelude::*;

fn ident() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9][a-zA-Z0-9._-]{0,20}"
}

fn text() -> impl Strategy<Value = String> {
    // Printable, including non-ASCII: canonical encoding must be byte-exact.
    "[a-zA-Z0-9 _.:/@é漢-]{1,30}"
}

fn json_object() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        text().prop_map(serde_json::Value::String),
    ];
    let value = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(ident(), inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    prop::collection::btree_map(ident(), value, 0..5)
        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect()))
}

prop_compose! {
    fn valid_event()(
        id in ident(),
        tenant in ident(),
        time in 1i64..7_000_000_000_000_000_000,
        actor_id in text(),
        actor_kind in ident(),
        actor_name in proptest::option::of(text()),
        ip in proptest::option::of(prop_oneof![Just("10.0.0.1".to_string()), Just("::1".to_string())]),
        action in "[a-z]{1,8}(\\.[a-z]{1,8}){0,3}",
        target_kind in ident(),
        target_id in text(),
        outcome in prop_oneof![Just(Outcome::Success), Just(Outcome::Failure), Just(Outcome::Denied), Just(Outcome::Error)],
        service in proptest::option::of(text()),
        context in prop::collection::btree_map(text(), text(), 0..5),
        data in proptest::option::of(json_object()),
        partition_key in proptest::option::of(text()),
    ) -> Event {
        Event {
            id,
            tenant,
            time: Timestamp(time),
            actor: Actor { id: actor_id, kind: actor_kind, name: actor_name, ip },
            action,
            target: Target { kind: target_kind, id: target_id },
            outcome,
            source: service.map(|s| Source { service: Some(s), host: None }),
            context,
            data: data.map(|d| JsonObject::from_value(&d).expect("object")),
            schema_version: None,
            partition_key,
        }
    }
}

/// Reverses the key order of every object in `v`, recursively.
fn reorder(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(m) => {
            let parts: Vec<String> = m
                .iter()
                .rev()
                .map(|(k, v)| format!("{}:{}", serde_json::Value::String(k.clone()), reorder(v)))
                .collect();
            format!("{{{}}}", parts.join(" , "))
        }
        serde_json::Value::Array(a) => {
            format!("[{}]", a.iter().map(reorder).collect::<Vec<_>>().join(","))
        }
        other => other.to_string(),
    }
}

proptest! {
    /// The JSON forms of timestamps and hashes (formatted on the stack)
    /// are exactly their text forms, for every value (Unix nanoseconds in
    /// an i64 span the years 1677 to 2262, all of which RFC 3339 can
    /// express), and a timestamp reads back from its JSON.
    #[test]
    fn json_timestamps_and_hashes_are_their_text_forms(
        nanos in prop_oneof![any::<i64>(), Just(i64::MIN), Just(i64::MAX), Just(0i64), -1_000_000_000i64..1_000_000_000],
        bytes in any::<[u8; 32]>(),
    ) {
        let t = Timestamp(nanos);
        prop_assert_eq!(serde_json::to_value(t).unwrap(), serde_json::Value::String(t.to_rfc3339()));
        let h = Hash32(bytes);
        prop_assert_eq!(serde_json::to_value(h).unwrap(), serde_json::Value::String(h.to_hex()));
        let back: Timestamp = serde_json::from_value(serde_json::to_value(t).unwrap()).unwrap();
        prop_assert_eq!(back, t);
    }
}

proptest! {
    #[test]
    fn generated_events_are_valid(e in valid_event()) {
        prop_assert_eq!(validate_event(&e, &Limits::default()), Ok(()));
    }

    #[test]
    fn wire_frame_round_trips(events in prop::collection::vec(valid_event(), 1..8), partition in 0u32..64) {
        let req = Request::Append { partition, events };
        let bytes = frame::encode(PROTOCOL_VERSION, &req, DEFAULT_MAX_FRAME_BYTES).unwrap();
        let payload = frame::payload_of(&bytes, DEFAULT_MAX_FRAME_BYTES).unwrap();
        let back: Request = frame::decode(PROTOCOL_VERSION, payload).unwrap();
        prop_assert_eq!(back, req);
    }

    #[test]
    fn json_round_trips_and_keeps_canonical_bytes(e in valid_event()) {
        let text = serde_json::to_string(&e).unwrap();
        let back: Event = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(canonical::encode_event(&back), canonical::encode_event(&e));
        prop_assert_eq!(back, e);
    }

    #[test]
    fn json_text_is_what_serde_json_writes_for_the_parsed_value(
        e in valid_event(),
        floats in prop::collection::btree_map(ident(), any::<f64>().prop_filter("finite", |f| f.is_finite()), 0..4),
    ) {
        // `data` goes out as its canonical text, verbatim; it must be the
        // text serde_json would write for the parsed value, floats included.
        let mut e = e;
        if !floats.is_empty() {
            let mut data = e.data.as_ref().map(|d| d.to_value()).unwrap_or_else(|| serde_json::json!({}));
            for (k, f) in floats {
                data[k.as_str()] = serde_json::json!(f);
            }
            e.data = Some(JsonObject::from_value(&data).unwrap());
        }
        let text = serde_json::to_string(&e.data).unwrap();
        let via_value = serde_json::to_string(&e.data.as_ref().map(|d| d.to_value())).unwrap();
        prop_assert_eq!(text, via_value);
        // And the event's text parses back to the same event.
        let back: Event = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        prop_assert_eq!(back, e);
    }

    #[test]
    fn a_borrowed_stored_event_encodes_as_the_owned_one(e in valid_event(), offset in any::<u64>(), at in any::<i64>()) {
        // The store writes the borrowed form and reads the owned one back.
        let owned = StoredEvent { partition: 5, offset, received_at: Timestamp(at), hash: Hash32([7; 32]), event: e };
        let borrowed = StoredEventRef {
            partition: owned.partition,
            offset: owned.offset,
            received_at: owned.received_at,
            hash: owned.hash,
            event: &owned.event,
        };
        let config = bincode::config::standard();
        prop_assert_eq!(
            bincode::serde::encode_to_vec(borrowed, config).unwrap(),
            bincode::serde::encode_to_vec(&owned, config).unwrap()
        );
        prop_assert_eq!(serde_json::to_string(&borrowed).unwrap(), serde_json::to_string(&owned).unwrap());
    }

    #[test]
    fn encoded_len_is_the_length_of_the_encoding(e in valid_event()) {
        prop_assert_eq!(canonical::encoded_len(&e), canonical::encode_event(&e).len());
    }

    #[test]
    fn canonical_encoding_ignores_key_order(e in valid_event()) {
        let value = serde_json::to_value(&e).unwrap();
        let shuffled: Event = serde_json::from_str(&reorder(&value)).unwrap();
        prop_assert_eq!(canonical::encode_event(&shuffled), canonical::encode_event(&e));
    }

    #[test]
    fn binary_data_is_canonicalized_where_it_enters(e in valid_event()) {
        // The binary decoder takes JSON text as is (inside the cluster it is
        // canonical already); what a client sends is rewritten on entry.
        let Some(data) = &e.data else { return Ok(()) };
        let messy = reorder(&data.to_value());
        let wire = bincode::serde::encode_to_vec(&messy, bincode::config::standard()).unwrap();
        let (raw, _): (JsonObject, usize) =
            bincode::serde::decode_from_slice(&wire, bincode::config::standard()).unwrap();
        let mut received = e.clone();
        received.data = Some(raw);
        canonicalize_event(&mut received).unwrap();
        prop_assert_eq!(canonical::encode_event(&received), canonical::encode_event(&e));
    }

    #[test]
    fn distinct_events_encode_distinctly(a in valid_event(), b in valid_event()) {
        prop_assume!(a != b);
        prop_assert_ne!(canonical::encode_event(&a), canonical::encode_event(&b));
    }

    #[test]
    fn truncated_or_flipped_frames_never_panic(e in valid_event(), cut in 0usize..200, flip in 0usize..200) {
        let req = Request::Append { partition: 1, events: vec![e] };
        let mut bytes = frame::encode(PROTOCOL_VERSION, &req, DEFAULT_MAX_FRAME_BYTES).unwrap();
        let i = flip % bytes.len();
        bytes[i] ^= 0xa5;
        bytes.truncate(bytes.len().saturating_sub(cut));
        if let Ok(payload) = frame::payload_of(&bytes, DEFAULT_MAX_FRAME_BYTES) {
            let _ = frame::decode::<Request>(PROTOCOL_VERSION, payload);
        }
    }

    /// Each kind of invalid field is rejected, naming that field.
    #[test]
    fn invalid_fields_are_rejected_with_their_name(e in valid_event(), which in 0usize..10, bad in prop_oneof![Just(String::new()), Just("a\u{7}b".to_string()), Just("x".repeat(600))]) {
        let mut e = e;
        let field = match which {
            0 => { e.id = bad.clone(); "id" }
            1 => { e.tenant = bad.clone(); "tenant" }
            2 => { e.actor.id = bad.clone(); "actor.id" }
            3 => { e.actor.kind = bad.clone(); "actor.type" }
            4 => { e.action = bad.clone(); "action" }
            5 => { e.target.kind = bad.clone(); "target.type" }
            6 => { e.target.id = bad.clone(); "target.id" }
            7 => { e.actor.ip = Some(format!("{bad}not-an-ip")); "actor.ip" }
            8 => { e.time = Timestamp(-5); "time" }
            _ => { e.action = "user..login".into(); "action" }
        };
        let err = validate_event(&e, &Limits::default()).unwrap_err();
        prop_assert_eq!(err.field.as_str(), field, "reason: {}", err.reason);
        prop_assert!(!err.reason.is_empty());
    }
}

#[test]
fn oversized_event_is_rejected_as_a_whole() {
    let mut context = BTreeMap::new();
    for i in 0..20 {
        context.insert(format!("k{i}"), "v".repeat(4000));
    }
    let e = Event {
        id: "x".into(),
        tenant: "t".into(),
        time: Timestamp(1),
        actor: Actor {
            id: "a".into(),
            kind: "user".into(),
            name: None,
            ip: None,
        },
        action: "a.b".into(),
        target: Target {
            kind: "k".into(),
            id: "i".into(),
        },
        outcome: Outcome::Success,
        source: None,
        context,
        data: None,
        schema_version: None,
        partition_key: None,
    };
    let err = validate_event(&e, &Limits::default()).unwrap_err();
    assert_eq!(err.field, "event", "{err}");
}

#[test]
fn binary_data_that_is_not_a_json_object_is_rejected_on_entry() {
    for text in ["{\"a\":", "[1,2]", "not json"] {
        let wire = bincode::serde::encode_to_vec(text, bincode::config::standard()).unwrap();
        let (raw, _): (JsonObject, usize) =
            bincode::serde::decode_from_slice(&wire, bincode::config::standard()).unwrap();
        let mut e: Event = serde_json::from_str(
            r#"{"id":"x","tenant":"t","time":"2026-01-01T00:00:00Z","actor":{"id":"u","type":"user"},"action":"a.b","target":{"type":"doc","id":"d"},"outcome":"success"}"#,
        )
        .unwrap();
        e.data = Some(raw);
        let err = canonicalize_event(&mut e).unwrap_err();
        assert_eq!(err.field, "data", "{text}: {err}");
    }
}
