//! Starts delivery actors where they belong: on each partition's leader,
//! one per destination, once the leader's state machine has caught up
//! (so it starts from the latest replicated cursor). Stops them when
//! leadership moves, and restarts any that died.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, Addr};
use openraft::ServerState;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::actor::{DeliveryActor, Drain, Pipeline, Source, StopDelivery};
use super::catalog::Destinations;
use super::config::DestinationConfig;
use super::status::StatusBoard;
use crate::clock::Clock;
use crate::partition::{NodeId, Raft};
use crate::sinks::{Sink, SinkConfigError};
use crate::storage::PartitionReader;

/// How often the supervisor re-checks even without a metrics change
/// (to restart dead actors and retry sinks that failed to build).
const RECHECK: Duration = Duration::from_secs(1);

/// Builds the sink of a destination for one partition: the sink seam
/// (production builds real sinks from their settings; the simulator its
/// own).
pub type SinkFactory =
    Arc<dyn Fn(&DestinationConfig, u32) -> Result<Box<dyn Sink>, SinkConfigError> + Send + Sync>;

/// The production sinks, built from each destination's settings, all with
/// this node's `ctx` (the cluster id of their idempotency keys).
pub fn real_sinks(ctx: crate::sinks::SinkContext) -> SinkFactory {
    Arc::new(move |dest: &DestinationConfig, _partition: u32| {
        dest.sink.build(&crate::sinks::SinkContext {
            max_in_flight: dest.in_flight(),
            ..ctx.clone()
        })
    })
}

/// What every supervisor of a node shares.
#[derive(Clone)]
pub struct DeliveryContext {
    /// This node.
    pub node: NodeId,
    /// The destinations (static and run-time), as they change.
    pub destinations: watch::Receiver<Destinations>,
    /// Live status.
    pub board: StatusBoard,
    /// Wall clock for records.
    pub clock: Arc<dyn Clock>,
    /// Where sinks come from.
    pub sinks: SinkFactory,
    /// Where delivery's randomness (backoff jitter) comes from: each
    /// pipeline gets its own `StdRng`, seeded from this one in the order
    /// pipelines start. Seeded from the OS in production and from the
    /// run's seed in the simulator, so a simulated run replays exactly.
    pub seeds: Arc<Mutex<StdRng>>,
    /// Turns true when the node stops cleanly: record delivery progress
    /// and stop (see [`crate::node::NodeShared::drain_delivery`]).
    pub draining: watch::Receiver<bool>,
    /// Held by every supervisor until it has drained or ended; the node
    /// waits for all of them to be dropped.
    pub running: mpsc::Sender<()>,
}

/// Supervises delivery for one partition until its Raft group shuts down.
/// Must run on the actix system (it starts actors): spawn it with
/// `actix_rt::spawn`.
pub async fn supervise(
    ctx: DeliveryContext,
    partition: u32,
    raft: Raft,
    reader: PartitionReader,
    handing_over: watch::Receiver<bool>,
) {
    // The server metrics (vote, state, leader, membership) change only
    // when leadership does; the full metrics change at every append and
    // apply, and waking on those was 2 % of a node's runtime thread under
    // load, for nothing.
    let mut metrics = raft.server_metrics();
    let mut destinations = ctx.destinations.clone();
    let mut draining = ctx.draining.clone();
    let mut running: Vec<(Arc<DestinationConfig>, Addr<DeliveryActor>)> = Vec::new();
    loop {
        let (leader, shutdown) = {
            let m = metrics.borrow_and_update();
            (
                m.state == ServerState::Leader && m.current_leader == Some(ctx.node),
                m.state == ServerState::Shutdown,
            )
        };
        if shutdown {
            break;
        }
        if *draining.borrow_and_update() {
            // Record what each actor delivered, so the next leader starts
            // exactly there; then supervise no more.
            let drains = running.drain(..).map(|(_, addr)| addr.send(Drain));
            futures::future::join_all(drains).await;
            break;
        }
        let wanted: Destinations = destinations.borrow_and_update().clone();
        // Removed or changed destinations stop; a changed one starts again
        // below with its new settings, from the replicated cursor.
        running.retain(|(dest, addr)| {
            let keep = wanted.iter().any(|d| d == dest);
            if !keep {
                info!(dest = %dest.name, partition, "destination removed or changed: stopping delivery");
                addr.do_send(StopDelivery);
                ctx.board.remove(&dest.name, partition);
            }
            keep
        });
        if leader {
            // Supervision: forget actors that died (a panic outside the
            // sink), so they are started again below.
            running.retain(|(_, addr)| addr.connected());
            let missing: Vec<Arc<DestinationConfig>> = wanted
                .iter()
                .filter(|d| !running.iter().any(|(r, _)| r.name == d.name))
                .cloned()
                .collect();
            if !missing.is_empty() && raft.ensure_linearizable().await.is_ok() {
                for dest in missing {
                    match (ctx.sinks)(&dest, partition) {
                        Ok(sink) => {
                            info!(dest = %dest.name, partition, "starting delivery");
                            let source = Source {
                                partition,
                                raft: raft.clone(),
                                reader: reader.clone(),
                                handing_over: handing_over.clone(),
                            };
                            let seed = ctx
                                .seeds
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .next_u64();
                            let pipeline = Pipeline::new(
                                Arc::clone(&dest),
                                source,
                                sink,
                                Arc::clone(&ctx.clock),
                                ctx.board.clone(),
                                StdRng::seed_from_u64(seed),
                            );
                            running.push((dest, DeliveryActor::new(pipeline).start()));
                        }
                        Err(e) => {
                            warn!(dest = %dest.name, partition, "sink not usable: {e}");
                            let msg = e.to_string();
                            ctx.board
                                .update(&dest.name, partition, |s| s.last_error = Some(msg));
                        }
                    }
                }
            }
        } else if !running.is_empty() {
            info!(partition, "leadership moved: stopping delivery");
            for (_, addr) in running.drain(..) {
                addr.do_send(StopDelivery);
            }
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { break },
            // A closed channel disables this branch: the Raft metrics
            // end the loop when the node shuts down.
            Ok(()) = destinations.changed() => {}
            Ok(()) = draining.changed() => {}
            _ = tokio::time::sleep(RECHECK) => {}
        }
    }
    for (_, addr) in running {
        addr.do_send(StopDelivery);
    }
}
