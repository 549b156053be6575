//! The audit event (DESIGN.md §2) and the stored form the broker hands back.
//!
//! One struct serves both the JSON a producer writes and the binary wire
//! encoding. Where the two must differ (timestamps are RFC 3339 strings in
//! JSON but integers on the wire; `data` is a JSON object in JSON but its
//! canonical text on the wire, because bincode cannot carry free-form JSON)
//! the type checks `is_human_readable()`.
//!
//! Wire types never use `skip_serializing_if`: bincode is positional, and a
//! skipped field would shift every field after it.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::ser::Error as _;
use serde::{Deserialize, Serialize, Serializer};

/// A point in time as nanoseconds since the Unix epoch (UTC).
///
/// JSON form: an RFC 3339 string (`2026-11-24T12:00:00.123456789Z`); integers
/// are accepted on input as Unix nanoseconds. Wire form: `i64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Nanoseconds since the Unix epoch.
    pub fn unix_nanos(self) -> i64 {
        self.0
    }

    /// Formats as RFC 3339 with nanoseconds, or as a plain number when the
    /// value lies outside what RFC 3339 can express.
    pub fn to_rfc3339(self) -> String {
        match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0)) {
            Ok(t) => t
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| self.0.to_string()),
            Err(_) => self.0.to_string(),
        }
    }

    /// Formats as RFC 3339 into `buf`, as [`Timestamp::to_rfc3339`] does;
    /// `None` where that gives a plain number instead (or `buf` is short).
    fn format_rfc3339_into(self, buf: &mut [u8]) -> Option<&str> {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0)).ok()?;
        let mut rest = &mut buf[..];
        t.format_into(&mut rest, &time::format_description::well_known::Rfc3339)
            .ok()?;
        // What the writer advanced over (the count `format_into` returns
        // fell short of the bytes written for a fraction, in time 0.3.55).
        let left = rest.len();
        let n = buf.len() - left;
        std::str::from_utf8(buf.get(..n)?).ok()
    }

    /// Parses an RFC 3339 timestamp.
    pub fn parse_rfc3339(s: &str) -> Result<Self, String> {
        let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .map_err(|e| format!("not an RFC 3339 timestamp ({e})"))?;
        i64::try_from(t.unix_timestamp_nanos())
            .map(Timestamp)
            .map_err(|_| "timestamp out of range".to_string())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            // Formatted on the stack: every delivered event has two.
            let mut buf = [0u8; 48];
            match self.format_rfc3339_into(&mut buf) {
                Some(text) => s.serialize_str(text),
                None => s.serialize_str(&self.to_rfc3339()),
            }
        } else {
            s.serialize_i64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp or Unix nanoseconds")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Timestamp, E> {
                Ok(Timestamp(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Timestamp, E> {
                i64::try_from(v)
                    .map(Timestamp)
                    .map_err(|_| E::custom("timestamp out of range"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Timestamp, E> {
                Timestamp::parse_rfc3339(v).map_err(E::custom)
            }
        }
        if d.is_human_readable() {
            d.deserialize_any(V)
        } else {
            d.deserialize_i64(V)
        }
    }
}

/// A SHA-256 digest. JSON form: lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hash32(pub [u8; 32]);

impl Hash32 {
    /// The all-zero hash: the "previous hash" of offset 0 of every partition.
    pub const ZERO: Hash32 = Hash32([0; 32]);

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|e| format!("not a 32-byte hex hash ({e})"))?;
        Ok(Hash32(out))
    }
}

impl fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash32({})", self.to_hex())
    }
}

impl fmt::Display for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Hash32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            // Hex on the stack: every delivered event has one.
            let mut buf = [0u8; 64];
            match hex::encode_to_slice(self.0, &mut buf) {
                Ok(()) => s.serialize_str(std::str::from_utf8(&buf).map_err(S::Error::custom)?),
                Err(_) => s.serialize_str(&self.to_hex()),
            }
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Hash32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            Hash32::from_hex(&s).map_err(de::Error::custom)
        } else {
            <[u8; 32]>::deserialize(d).map(Hash32)
        }
    }
}

/// A JSON object kept as its canonical text (keys sorted, no whitespace).
///
/// Keeping the canonical text rather than a parsed tree makes the hash input
/// independent of how the producer ordered its keys, and lets the binary wire
/// format carry it as a plain string.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct JsonObject(String);

impl JsonObject {
    /// Canonicalises a parsed JSON value; fails unless it is an object.
    pub fn from_value(v: &serde_json::Value) -> Result<Self, String> {
        if !v.is_object() {
            return Err("must be a JSON object".into());
        }
        let mut out = String::new();
        crate::canonical::write_canonical_json(v, &mut out);
        Ok(JsonObject(out))
    }

    /// Parses and canonicalises JSON text; fails unless it is an object.
    pub fn parse(text: &str) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("invalid JSON ({e})"))?;
        Self::from_value(&v)
    }

    /// The canonical text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The object as a parsed JSON value.
    pub fn to_value(&self) -> serde_json::Value {
        // The text was produced by our own canonical writer from a valid
        // value, so it parses; Null is only a defensive fallback.
        serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null)
    }
}

impl fmt::Debug for JsonObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JsonObject({})", self.0)
    }
}

impl Serialize for JsonObject {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            // The canonical text is what serde_json writes for the parsed
            // value (sorted keys, serde_json's numbers and escapes), so it
            // goes out verbatim instead of being parsed for every event
            // delivered or printed. JSON is the only human-readable format
            // events are written in; a `Value` serialiser parses it.
            match serde_json::from_str::<&serde_json::value::RawValue>(&self.0) {
                Ok(raw) => raw.serialize(s),
                Err(_) => self.to_value().serialize(s),
            }
        } else {
            s.serialize_str(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for JsonObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let v = serde_json::Value::deserialize(d)?;
            JsonObject::from_value(&v).map_err(de::Error::custom)
        } else {
            // Taken as is: the binary form travels between the nodes and
            // their storage, which only ever hold canonical text, and
            // re-parsing it on every decode was a measurable share of a
            // node's CPU. Text from outside (a client's append) is
            // re-canonicalised where it enters, by
            // `validate::canonicalize_event`, before it is hashed or stored.
            String::deserialize(d).map(JsonObject)
        }
    }
}

/// How the audited action ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The action was performed.
    Success,
    /// The action was attempted and failed.
    Failure,
    /// The action was refused by an authorisation decision.
    Denied,
    /// The action could not be evaluated because of an error.
    Error,
}

impl Outcome {
    /// The lowercase name used in JSON and in the canonical encoding.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }
}

/// Who performed the action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// Stable identifier of the actor (user id, service account, key id).
    pub id: String,
    /// Kind of actor, e.g. `user`, `service`, `api_key`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Display name, for humans reading the trail.
    #[serde(default)]
    pub name: Option<String>,
    /// Source IP address, IPv4 or IPv6 text form.
    #[serde(default)]
    pub ip: Option<String>,
}

/// What the action was performed on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Kind of resource, e.g. `document`, `bucket`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Identifier of the resource.
    pub id: String,
}

/// Where the event was produced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// Producing service.
    #[serde(default)]
    pub service: Option<String>,
    /// Producing host.
    #[serde(default)]
    pub host: Option<String>,
}

/// An audit event as a producer submits it (DESIGN.md §2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Producer-chosen idempotency key (≤ 128 bytes). Empty in input means
    /// "generate one": the client library fills in a UUIDv7 before sending.
    #[serde(default)]
    pub id: String,
    /// Tenant the event belongs to; also the main partitioning key.
    pub tenant: String,
    /// When the action happened, by the producer's clock.
    pub time: Timestamp,
    /// Who did it.
    pub actor: Actor,
    /// What was done, dotted lowercase, e.g. `user.login`.
    pub action: String,
    /// To what.
    pub target: Target,
    /// How it ended.
    pub outcome: Outcome,
    /// Producing service and host.
    #[serde(default)]
    pub source: Option<Source>,
    /// Free-form string attributes. A `BTreeMap` so that iteration order,
    /// and with it the canonical encoding, never depends on insertion order.
    #[serde(default)]
    pub context: BTreeMap<String, String>,
    /// Structured payload; must be a JSON object.
    #[serde(default)]
    pub data: Option<JsonObject>,
    /// Version of the producer's schema for `data`.
    #[serde(default)]
    pub schema_version: Option<String>,
    /// Optional extra partitioning key: events of one tenant with different
    /// keys may land on different partitions; order holds per partition only.
    #[serde(default)]
    pub partition_key: Option<String>,
}

/// An event as stored by the broker: the producer's event plus what the
/// broker assigned when it applied it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Partition the event lives in.
    pub partition: u32,
    /// Position in the partition, dense from 0.
    pub offset: u64,
    /// Broker time at which the partition leader accepted the event.
    pub received_at: Timestamp,
    /// Chain hash of this event (see [`crate::chain`]).
    pub hash: Hash32,
    /// The event itself.
    pub event: Event,
}

/// A [`StoredEvent`] whose event is borrowed. It serializes to the same
/// bytes as the owned form (same fields, same order), so the store can
/// encode an event it does not own without copying it first.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StoredEventRef<'a> {
    /// Partition the event lives in.
    pub partition: u32,
    /// Position in the partition.
    pub offset: u64,
    /// Broker time at which the partition leader accepted the event.
    pub received_at: Timestamp,
    /// Chain hash of this event.
    pub hash: Hash32,
    /// The event itself.
    pub event: &'a Event,
}
