//! Client requests about delivery: status, DLQ listing, redrive, replay.

use auditflow_protocol::delivery::{DestinationInfo, CATALOG_PARTITION};
use auditflow_protocol::wire::{ReplayFrom, Request, RequestError, Response};
use openraft::error::{ClientWriteError, RaftError};

use crate::delivery::catalog;
use crate::node::NodeShared;
use crate::partition::{Command, CommandResponse};
use crate::replicated::delivery::DeliveryCommand;

/// Most DLQ entries one listing returns.
pub const MAX_DLQ_PAGE: u32 = 1_000;

/// Answers a delivery request.
pub async fn handle(node: &NodeShared, request: Request) -> Response {
    let result = match request {
        Request::DestStatus => node.dest_status().map(Response::DestStatus),
        Request::DlqList {
            dest,
            partition,
            from_offset,
            limit,
        } => dlq_list(node, &dest, partition, from_offset, limit).map(Response::Dlq),
        Request::Redrive {
            dest,
            partition,
            selection,
        } => {
            let cmd = DeliveryCommand::Redrive { dest, selection };
            propose(node, partition, cmd)
                .await
                .map(|(_, touched)| Response::Done { count: touched })
        }
        Request::Replay {
            dest,
            partition,
            from,
            until,
        } => {
            let window = replay_offset(node, partition, &from).and_then(|from| {
                let until = until
                    .map(|u| replay_offset(node, partition, &u))
                    .transpose()?;
                Ok((from, until))
            });
            match window {
                Ok((from, until)) => {
                    let cmd = DeliveryCommand::Replay { dest, from, until };
                    propose(node, partition, cmd)
                        .await
                        .map(|(_, touched)| Response::Done { count: touched })
                }
                Err(e) => Err(e),
            }
        }
        Request::DestAdd { config_json } => dest_add(node, &config_json).await,
        Request::DestRemove { dest } => dest_remove(node, dest).await,
        Request::DestList => Ok(Response::Destinations(dest_list(node))),
        _ => Err(RequestError::BadRequest {
            reason: "not a delivery request".into(),
        }),
    };
    result.unwrap_or_else(Response::Error)
}

fn known_dest(node: &NodeShared, dest: &str) -> Result<(), RequestError> {
    let destinations = node.destinations.borrow().clone();
    if destinations.iter().any(|d| d.name == dest) {
        Ok(())
    } else {
        let names: Vec<&str> = destinations.iter().map(|d| d.name.as_str()).collect();
        Err(RequestError::BadRequest {
            reason: format!("unknown destination {dest:?}; configured: {names:?}"),
        })
    }
}

fn is_static(node: &NodeShared, dest: &str) -> bool {
    node.config.destinations.iter().any(|d| d.name == dest)
}

/// Checks a run-time destination and proposes it to the catalog.
async fn dest_add(node: &NodeShared, config_json: &str) -> Result<Response, RequestError> {
    let dest = catalog::parse(config_json).map_err(|reason| RequestError::BadRequest { reason })?;
    if is_static(node, &dest.name) {
        return Err(RequestError::BadRequest {
            reason: format!(
                "destination {:?} is defined in node.toml; change it there",
                dest.name
            ),
        });
    }
    // Stored as re-serialised settings: what every replica parses back.
    let config_json = serde_json::to_string(&dest).map_err(RequestError::internal)?;
    let cmd = DeliveryCommand::PutDestination {
        dest: dest.name.clone(),
        config_json,
    };
    propose_unchecked(node, CATALOG_PARTITION, cmd)
        .await
        .map(|(_, touched)| Response::Done { count: touched })
}

/// Removes a run-time destination from the catalog.
async fn dest_remove(node: &NodeShared, dest: String) -> Result<Response, RequestError> {
    if is_static(node, &dest) {
        return Err(RequestError::BadRequest {
            reason: format!("destination {dest:?} is defined in node.toml; remove it there"),
        });
    }
    let cmd = DeliveryCommand::RemoveDestination { dest };
    propose_unchecked(node, CATALOG_PARTITION, cmd)
        .await
        .map(|(_, touched)| Response::Done { count: touched })
}

/// Every destination this node delivers to.
fn dest_list(node: &NodeShared) -> Vec<DestinationInfo> {
    node.destinations
        .borrow()
        .iter()
        .map(|d| DestinationInfo {
            name: d.name.clone(),
            kind: d.sink.kind().to_string(),
            runtime: !is_static(node, &d.name),
        })
        .collect()
}

fn dlq_list(
    node: &NodeShared,
    dest: &str,
    partition: u32,
    from: u64,
    limit: u32,
) -> Result<Vec<(u64, auditflow_protocol::delivery::DlqEntry)>, RequestError> {
    known_dest(node, dest)?;
    let handle = node.partition(partition)?;
    handle
        .reader
        .dlq(dest, from, limit.min(MAX_DLQ_PAGE) as usize)
        .map_err(RequestError::internal)
}

/// The offset a replay starts (or ends) at: the given one, or the first
/// event stored at or after the given time (binary search: `received_at` only
/// grows within a partition, up to clock differences between leaders).
fn replay_offset(
    node: &NodeShared,
    partition: u32,
    from: &ReplayFrom,
) -> Result<u64, RequestError> {
    let handle = node.partition(partition)?;
    match from {
        ReplayFrom::Offset(o) => Ok(*o),
        ReplayFrom::Time(t) => {
            let head = handle
                .reader
                .head()
                .map_err(RequestError::internal)?
                .next_offset;
            let (mut lo, mut hi) = (0u64, head);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                let at = handle.reader.read(mid, 1).map_err(RequestError::internal)?;
                match at.first() {
                    Some(e) if e.received_at < *t => lo = e.offset + 1,
                    _ => hi = mid,
                }
            }
            Ok(lo)
        }
    }
}

async fn propose(
    node: &NodeShared,
    partition: u32,
    cmd: DeliveryCommand,
) -> Result<(u64, u64), RequestError> {
    known_dest(node, cmd.dest())?;
    propose_unchecked(node, partition, cmd).await
}

/// Proposes a delivery command on the partition's leader.
async fn propose_unchecked(
    node: &NodeShared,
    partition: u32,
    cmd: DeliveryCommand,
) -> Result<(u64, u64), RequestError> {
    node.require_leader(partition)?;
    let handle = node.partition(partition)?;
    match handle.raft.client_write(Command::Delivery(cmd)).await {
        Ok(resp) => match resp.data {
            CommandResponse::Delivery { cursor, touched } => Ok((cursor, touched)),
            _ => Err(RequestError::internal("unexpected apply result")),
        },
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(RequestError::NotLeader {
                partition,
                leader: f.leader_id.and_then(|id| node.node_addr(id)),
            })
        }
        Err(e) => Err(RequestError::Unavailable {
            partition,
            reason: e.to_string(),
        }),
    }
}
