//! Masking (pure): what of an event must not leave the node in clear.
//!
//! A rule names a path into the event's JSON form (`actor.ip`,
//! `context.session`, `data.card.number`; `*` matches any key or array
//! element, e.g. `data.cards.*.number`) and an action: drop the field,
//! replace it with a keyed hash (HMAC-SHA256 of its canonical JSON, so the
//! same value always masks to the same token and can still be correlated,
//! but cannot be recovered without the key), or replace it with a
//! `"[REDACTED]"` marker.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

/// What to do with a matched field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskAction {
    /// Remove the field.
    Drop,
    /// Replace with `hmac-sha256:<hex>` of its canonical JSON.
    Hash,
    /// Replace with `"[REDACTED]"`.
    Redact,
}

/// One masking rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskRule {
    /// Dot-separated path into the event; `*` matches any key or element.
    pub path: String,
    /// What to do with it.
    pub action: MaskAction,
}

/// What a redacted value becomes.
pub const REDACTED: &str = "[REDACTED]";

impl MaskRule {
    /// Checks the path: non-empty segments, and never the event id, which
    /// receivers need to deduplicate.
    pub fn check(&self) -> Result<(), String> {
        let segments: Vec<&str> = self.path.split('.').collect();
        if segments.iter().any(|s| s.is_empty()) {
            return Err(format!("path {:?}: empty segment", self.path));
        }
        if segments == ["id"] {
            return Err("the event id cannot be masked: receivers deduplicate on it".into());
        }
        Ok(())
    }

    /// Whether the rule needs the destination's `mask_key`.
    pub fn needs_key(&self) -> bool {
        self.action == MaskAction::Hash
    }
}

/// Applies `rules` in order to `event` (the event's JSON object).
pub fn apply(rules: &[MaskRule], key: &[u8], event: &mut Value) {
    for rule in rules {
        let segments: Vec<&str> = rule.path.split('.').collect();
        mask_at(event, &segments, rule.action, key);
    }
}

fn mask_at(value: &mut Value, path: &[&str], action: MaskAction, key: &[u8]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        match value {
            Value::Object(map) => {
                let keys: Vec<String> = if *first == "*" {
                    map.keys().cloned().collect()
                } else if map.contains_key(*first) {
                    vec![first.to_string()]
                } else {
                    Vec::new()
                };
                for k in keys {
                    if action == MaskAction::Drop {
                        map.remove(&k);
                    } else if let Some(v) = map.get_mut(&k) {
                        *v = masked(v, action, key);
                    }
                }
            }
            Value::Array(items) => {
                if *first == "*" {
                    if action == MaskAction::Drop {
                        items.clear();
                    } else {
                        for v in items.iter_mut() {
                            *v = masked(v, action, key);
                        }
                    }
                } else if let Ok(i) = first.parse::<usize>() {
                    if i < items.len() {
                        if action == MaskAction::Drop {
                            items.remove(i);
                        } else {
                            items[i] = masked(&items[i], action, key);
                        }
                    }
                }
            }
            _ => {}
        }
        return;
    }
    match value {
        Value::Object(map) => {
            if *first == "*" {
                for v in map.values_mut() {
                    mask_at(v, rest, action, key);
                }
            } else if let Some(v) = map.get_mut(*first) {
                mask_at(v, rest, action, key);
            }
        }
        Value::Array(items) => {
            if *first == "*" {
                for v in items.iter_mut() {
                    mask_at(v, rest, action, key);
                }
            } else if let Some(v) = first.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                mask_at(v, rest, action, key);
            }
        }
        _ => {}
    }
}

fn masked(value: &Value, action: MaskAction, key: &[u8]) -> Value {
    match action {
        MaskAction::Redact => Value::String(REDACTED.into()),
        MaskAction::Hash => Value::String(keyed_hash(key, value)),
        // Drop is handled by the caller, which owns the container.
        MaskAction::Drop => Value::Null,
    }
}

/// `hmac-sha256:<hex>` of the canonical JSON of `value` under `key`.
pub fn keyed_hash(key: &[u8], value: &Value) -> String {
    let mut text = String::new();
    auditflow_protocol::canonical::write_canonical_json(value, &mut text);
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return "hmac-sha256:invalid-key".into(),
    };
    mac.update(text.as_bytes());
    format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn rule(path: &str, action: MaskAction) -> MaskRule {
        MaskRule {
            path: path.into(),
            action,
        }
    }

    #[test]
    fn drop_hash_and_redact() {
        let mut e = json!({
            "id": "x",
            "actor": {"id": "u", "ip": "10.0.0.1"},
            "context": {"session": "s1", "keep": "k"},
            "data": {"cards": [{"number": "4111", "exp": "12/30"}, {"number": "5500"}]}
        });
        apply(
            &[
                rule("actor.ip", MaskAction::Hash),
                rule("context.session", MaskAction::Drop),
                rule("data.cards.*.number", MaskAction::Redact),
            ],
            b"k",
            &mut e,
        );
        assert_eq!(
            e["actor"]["ip"],
            json!(keyed_hash(b"k", &json!("10.0.0.1")))
        );
        assert!(e["context"].get("session").is_none());
        assert_eq!(e["context"]["keep"], "k");
        assert_eq!(e["data"]["cards"][0]["number"], REDACTED);
        assert_eq!(e["data"]["cards"][1]["number"], REDACTED);
        assert_eq!(e["data"]["cards"][0]["exp"], "12/30");
    }

    #[test]
    fn id_cannot_be_masked() {
        assert!(rule("id", MaskAction::Drop).check().is_err());
        assert!(rule("data..x", MaskAction::Drop).check().is_err());
        assert!(rule("data.x", MaskAction::Drop).check().is_ok());
    }

    proptest! {
        /// A masked secret never appears anywhere in the masked event.
        #[test]
        fn secret_never_survives(secret in "[a-z0-9]{12,20}", action in prop_oneof![Just(MaskAction::Drop), Just(MaskAction::Hash), Just(MaskAction::Redact)]) {
            let mut e = json!({"id": "x", "data": {"a": {"secret": secret.clone()}, "list": [{"secret": secret.clone()}]}});
            apply(&[rule("data.a.secret", action), rule("data.list.*.secret", action)], b"key", &mut e);
            prop_assert!(!e.to_string().contains(&secret));
        }

        #[test]
        fn hash_is_stable_and_keyed(v in "[a-z]{1,10}") {
            let a = keyed_hash(b"k1", &json!(v));
            prop_assert_eq!(&a, &keyed_hash(b"k1", &json!(v)));
            prop_assert_ne!(a, keyed_hash(b"k2", &json!(v)));
        }
    }
}
