//! Keeps the Raft log's segment files bounded when partitions are uneven.
//!
//! A segment file is deleted once every entry in it is purged, and a
//! partition purges only after its own snapshot (every
//! `snapshot_logs_since_last` of its entries). A quiet partition with one
//! entry in the oldest segment would keep it, and every later one, on
//! disk however busy the others are. So once the node has more than
//! [`MAX_SEGMENTS`] segments, the partitions pinning the oldest are asked
//! to snapshot (if their snapshot does not cover the pinning entries yet)
//! and then to purge up to their snapshot, less the entries the Raft
//! configuration keeps for lagging followers.

use std::time::Duration;

use tracing::info;

use super::Raft;
use crate::storage::LogUsage;

/// Segments (64 MiB each by default: 512 MiB) kept before quiet partitions
/// are asked to compact. Asking is cheap: building a snapshot reads only
/// its metadata (the state is already in redb), so this bound is about
/// disk, not about how often partitions snapshot.
pub const MAX_SEGMENTS: usize = 8;
/// How often the node looks.
const CHECK_EVERY: Duration = Duration::from_secs(10);

/// Runs until the log is closed or a Raft group has shut down. `keep` is
/// `max_in_snapshot_log_to_keep`.
pub async fn compact_quiet_partitions(usage: LogUsage, rafts: Vec<Raft>, keep: u64) {
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let Some(pins) = usage.pinning(MAX_SEGMENTS) else {
            return;
        };
        for (partition, upto) in pins {
            let Some(raft) = rafts.get(partition as usize) else {
                continue;
            };
            let snapshot = raft.metrics().borrow().snapshot;
            let result = if let Some(s) = snapshot.filter(|s| s.index >= upto) {
                // Beyond `upto` when possible: the next segments are
                // likely pinned by the same entries' successors.
                raft.trigger()
                    .purge_log(upto.max(s.index.saturating_sub(keep)))
                    .await
            } else {
                // Purged on a later round, once the snapshot is built.
                info!(
                    partition,
                    upto, "raft log: quiet partition keeps old segments, snapshotting"
                );
                raft.trigger().snapshot().await
            };
            if result.is_err() {
                return;
            }
        }
    }
}
