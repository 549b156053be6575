//! Samples a node's partition and delivery state into the metrics gauges
//! (`crate::metrics` names and records them; this reads [`NodeShared`]).

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use tracing::warn;

use crate::metrics::{record_destinations, record_partition, DeliveredTracker, SAMPLE_INTERVAL};
use crate::node::NodeShared;

/// Samples the node once: partition gauges from `status()`, delivery
/// gauges from `dest_status()`.
pub fn sample(node: &NodeShared, tracker: &mut DeliveredTracker) {
    for p in &node.status().partitions {
        record_partition(node.id, p);
    }
    match node.dest_status() {
        Ok(dests) => record_destinations(&dests, tracker),
        Err(e) => warn!("delivery metrics not sampled: {e}"),
    }
}

/// Samples the node every [`SAMPLE_INTERVAL`] and runs the exporter's
/// upkeep (draining histogram samples), for as long as the process runs.
pub async fn run_sampler(node: Arc<NodeShared>, handle: &'static PrometheusHandle) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tracker = DeliveredTracker::default();
    loop {
        tick.tick().await;
        sample(&node, &mut tracker);
        handle.run_upkeep();
    }
}
