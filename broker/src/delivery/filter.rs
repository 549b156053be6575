//! Which events a destination wants (pure).

use auditflow_protocol::Event;

use super::config::Filter;

impl Filter {
    /// Whether `event` passes: every non-empty criterion must match.
    pub fn matches(&self, event: &Event) -> bool {
        (self.tenants.is_empty() || self.tenants.contains(&event.tenant))
            && (self.action_prefixes.is_empty()
                || self
                    .action_prefixes
                    .iter()
                    .any(|p| event.action.starts_with(p.as_str())))
            && (self.outcomes.is_empty() || self.outcomes.contains(&event.outcome))
    }
}

#[cfg(test)]
mod tests {
    use auditflow_protocol::{Actor, Outcome, Target, Timestamp};
    use proptest::prelude::*;

    use super::*;

    fn event(tenant: &str, action: &str, outcome: Outcome) -> Event {
        Event {
            id: "e".into(),
            tenant: tenant.into(),
            time: Timestamp(1),
            actor: Actor {
                id: "a".into(),
                kind: "user".into(),
                name: None,
                ip: None,
            },
            action: action.into(),
            target: Target {
                kind: "k".into(),
                id: "t".into(),
            },
            outcome,
            source: None,
            context: Default::default(),
            data: None,
            schema_version: None,
            partition_key: None,
        }
    }

    #[test]
    fn criteria_combine_with_and() {
        let f = Filter {
            tenants: vec!["acme".into()],
            action_prefixes: vec!["user.".into()],
            outcomes: vec![Outcome::Denied],
        };
        assert!(f.matches(&event("acme", "user.login", Outcome::Denied)));
        assert!(!f.matches(&event("other", "user.login", Outcome::Denied)));
        assert!(!f.matches(&event("acme", "doc.read", Outcome::Denied)));
        assert!(!f.matches(&event("acme", "user.login", Outcome::Success)));
    }

    proptest! {
        #[test]
        fn empty_filter_matches_everything(t in "[a-z]{1,8}", a in "[a-z]{1,5}\\.[a-z]{1,5}") {
            prop_assert!(Filter::default().matches(&event(&t, &a, Outcome::Error)));
        }
    }
}
