//! The canonical encoding of an event: the exact bytes the hash chain covers.
//!
//! It is fixed and versioned so that an auditor can recompute every hash in
//! any language. Version 1, all integers big-endian:
//!
//! ```text
//! canonical(event) = "AFEV" 0x01
//!     str(id) str(tenant) i64(time_unix_nanos)
//!     str(actor.id) str(actor.type) opt(actor.name) opt(actor.ip)
//!     str(action) str(target.type) str(target.id) str(outcome)
//!     source  context  opt(data) opt(schema_version) opt(partition_key)
//! str(s)   = u32(len(s)) bytes(s)               -- UTF-8
//! opt(x)   = 0x00 | 0x01 str(x)
//! source   = 0x00 | 0x01 opt(service) opt(host)
//! context  = u32(n) (str(key) str(value))*n    -- keys in byte order
//! data     = its canonical JSON text (below)
//! ```
//!
//! Canonical JSON: objects with keys sorted by their UTF-8 bytes, no
//! whitespace, strings escaped as serde_json escapes them, numbers as
//! serde_json prints them. It never depends on map iteration order or on a
//! crate feature such as serde_json's `preserve_order`.

use crate::event::Event;

/// Magic and version prefix of canonical encoding v1.
pub const CANONICAL_PREFIX: &[u8; 5] = b"AFEV\x01";

/// Encodes `event` canonically.
pub fn encode_event(event: &Event) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(CANONICAL_PREFIX);
    put_str(&mut out, &event.id);
    put_str(&mut out, &event.tenant);
    out.extend_from_slice(&event.time.0.to_be_bytes());
    put_str(&mut out, &event.actor.id);
    put_str(&mut out, &event.actor.kind);
    put_opt(&mut out, event.actor.name.as_deref());
    put_opt(&mut out, event.actor.ip.as_deref());
    put_str(&mut out, &event.action);
    put_str(&mut out, &event.target.kind);
    put_str(&mut out, &event.target.id);
    put_str(&mut out, event.outcome.as_str());
    match &event.source {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_opt(&mut out, s.service.as_deref());
            put_opt(&mut out, s.host.as_deref());
        }
    }
    put_u32(&mut out, event.context.len());
    // BTreeMap<String, _> iterates in byte order of the keys.
    for (k, v) in &event.context {
        put_str(&mut out, k);
        put_str(&mut out, v);
    }
    put_opt(&mut out, event.data.as_ref().map(|d| d.as_str()));
    put_opt(&mut out, event.schema_version.as_deref());
    put_opt(&mut out, event.partition_key.as_deref());
    out
}

/// `encode_event(event).len()` without building the encoding: size limits
/// and batch budgets are checked on every event at several points of the
/// write path.
pub fn encoded_len(event: &Event) -> usize {
    fn str_len(s: &str) -> usize {
        4 + s.len()
    }
    fn opt_len(s: Option<&str>) -> usize {
        1 + s.map_or(0, str_len)
    }
    let source = match &event.source {
        None => 1,
        Some(s) => 1 + opt_len(s.service.as_deref()) + opt_len(s.host.as_deref()),
    };
    let context: usize = event
        .context
        .iter()
        .map(|(k, v)| str_len(k) + str_len(v))
        .sum();
    CANONICAL_PREFIX.len()
        + str_len(&event.id)
        + str_len(&event.tenant)
        + 8
        + str_len(&event.actor.id)
        + str_len(&event.actor.kind)
        + opt_len(event.actor.name.as_deref())
        + opt_len(event.actor.ip.as_deref())
        + str_len(&event.action)
        + str_len(&event.target.kind)
        + str_len(&event.target.id)
        + str_len(event.outcome.as_str())
        + source
        + 4
        + context
        + opt_len(event.data.as_ref().map(|d| d.as_str()))
        + opt_len(event.schema_version.as_deref())
        + opt_len(event.partition_key.as_deref())
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    // Validation bounds every length far below u32::MAX; saturate rather than
    // wrap so that an unvalidated giant can never alias a short value.
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

/// Appends the canonical JSON text of `v` to `out`.
pub fn write_canonical_json(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_json_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_string(k, out);
                out.push(':');
                if let Some(item) = map.get(k) {
                    write_canonical_json(item, out);
                }
            }
            out.push('}');
        }
    }
}

fn write_json_string(s: &str, out: &mut String) {
    // serde_json's string escaping is deterministic; serialising a &str
    // cannot fail.
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        Err(_) => out.push_str("\"\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_and_strips_whitespace() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{ "b": [1, {"z": 1, "a": "x"}], "a": null }"#).unwrap();
        let mut s = String::new();
        write_canonical_json(&v, &mut s);
        assert_eq!(s, r#"{"a":null,"b":[1,{"a":"x","z":1}]}"#);
    }
}
