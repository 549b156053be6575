//! Run-time destinations: added and removed through the CLI/API, stored in
//! the catalog partition's state machine (replicated by its Raft group,
//! included in its snapshots), and merged here with the destinations of
//! `node.toml`, which take precedence.
//!
//! Every node follows the catalog from its own replica of the catalog
//! partition, so each supervisor sees additions and removals within
//! [`CATALOG_POLL`] of their being applied locally.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::config::DestinationConfig;
use crate::storage::PartitionReader;

/// How often a node re-reads the catalog from its replica.
pub const CATALOG_POLL: Duration = Duration::from_millis(500);

/// The destinations a node delivers to, shared by its supervisors.
pub type Destinations = Arc<Vec<Arc<DestinationConfig>>>;

/// Parses and checks a run-time destination given as JSON.
pub fn parse(config_json: &str) -> Result<DestinationConfig, String> {
    let dest: DestinationConfig =
        serde_json::from_str(config_json).map_err(|e| format!("destination settings: {e}"))?;
    dest.check()?;
    Ok(dest)
}

/// The static destinations followed by the catalog's, in name order.
/// Catalog entries that no longer parse, or that reuse a static name, are
/// left out (and logged): the static configuration wins.
pub fn merge(
    statics: &[Arc<DestinationConfig>],
    catalog: &[(String, String)],
) -> Vec<Arc<DestinationConfig>> {
    let mut out: Vec<Arc<DestinationConfig>> = statics.to_vec();
    for (name, json) in catalog {
        if statics.iter().any(|d| &d.name == name) {
            warn!(dest = %name, "run-time destination shadowed by node.toml; ignored");
            continue;
        }
        match parse(json) {
            Ok(d) if &d.name == name => out.push(Arc::new(d)),
            Ok(d) => {
                warn!(dest = %name, other = %d.name, "catalog entry names another destination; ignored")
            }
            Err(e) => warn!(dest = %name, "catalog entry unusable: {e}"),
        }
    }
    out
}

/// Whether two destination sets are the same (by value).
fn same(a: &[Arc<DestinationConfig>], b: &[Arc<DestinationConfig>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

/// Follows the catalog partition's replica until every receiver is gone,
/// publishing the merged destination set whenever it changes.
pub async fn follow(
    reader: PartitionReader,
    statics: Vec<Arc<DestinationConfig>>,
    tx: watch::Sender<Destinations>,
) {
    let mut last_error: Option<String> = None;
    while !tx.is_closed() {
        match reader.catalog() {
            Ok(catalog) => {
                last_error = None;
                let merged = merge(&statics, &catalog);
                if !same(&merged, &tx.borrow()) {
                    info!(
                        count = merged.len(),
                        "destinations changed: {:?}",
                        merged.iter().map(|d| d.name.as_str()).collect::<Vec<_>>()
                    );
                    tx.send_replace(Arc::new(merged));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    warn!("cannot read the destination catalog: {msg}");
                }
                last_error = Some(msg);
            }
        }
        tokio::time::sleep(CATALOG_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(name: &str, url: &str) -> String {
        serde_json::json!({ "name": name, "sink": { "kind": "webhook", "url": url } }).to_string()
    }

    #[test]
    fn static_destinations_win_and_bad_entries_are_skipped() {
        let statics = vec![Arc::new(parse(&dest("siem", "http://a/")).expect("valid"))];
        let catalog = vec![
            ("extra".to_string(), dest("extra", "http://b/")),
            ("siem".to_string(), dest("siem", "http://evil/")),
            ("broken".to_string(), "{not json".to_string()),
            ("renamed".to_string(), dest("other", "http://c/")),
        ];
        let merged = merge(&statics, &catalog);
        let names: Vec<&str> = merged.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["siem", "extra"]);
        assert_eq!(merged[0], statics[0]);
    }

    #[test]
    fn parse_checks_the_settings() {
        assert!(parse(&dest("ok", "http://a/")).is_ok());
        assert!(parse("{}").is_err());
        assert!(
            parse(&serde_json::json!({ "name": "x", "sink": { "kind": "nope" } }).to_string())
                .is_err()
        );
    }
}
