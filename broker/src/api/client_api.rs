//! The client API: what a node answers to each [`Request`].
//!
//! Appends are validated here, per event, before anything reaches Raft
//! (G7): an invalid event is answered with its reason and the rest of the
//! batch proceeds. Only the partition leader proposes; any other node
//! redirects.

use std::time::Duration;

use auditflow_protocol::partition::partition_of;
use auditflow_protocol::validate::{canonicalize_event, validate_event};
use auditflow_protocol::wire::{
    AppendResult, EventError, EventsPage, Request, RequestError, Response,
};
use auditflow_protocol::{canonical, Event, StoredEvent};

use crate::node::NodeShared;
use crate::partition::actor::Append;

/// Most events one read returns.
pub const MAX_READ_EVENTS: u32 = 1_000;
/// Most canonical event bytes one read returns: keeps a response well under
/// the frame limit whatever the event sizes.
pub const MAX_READ_BYTES: usize = 4 * 1024 * 1024;
/// Longest long-poll wait a reader may ask for.
pub const MAX_READ_WAIT: Duration = Duration::from_secs(30);

/// Answers one client request.
pub async fn handle(node: &NodeShared, request: Request) -> Response {
    match request {
        Request::Append { partition, events } => match append(node, partition, events).await {
            Ok(results) => Response::Appended(results),
            Err(e) => Response::Error(e),
        },
        Request::Read {
            partition,
            from_offset,
            limit,
            wait_ms,
        } => match read(node, partition, from_offset, limit, wait_ms).await {
            Ok(page) => Response::Events(page),
            Err(e) => Response::Error(e),
        },
        Request::Metadata => Response::Metadata(node.metadata()),
        Request::Status => Response::Status(node.status()),
        Request::DestStatus
        | Request::DlqList { .. }
        | Request::Redrive { .. }
        | Request::Replay { .. }
        | Request::DestAdd { .. }
        | Request::DestRemove { .. }
        | Request::DestList => super::delivery_api::handle(node, request).await,
    }
}

/// Appends a batch and records its metrics (`crate::metrics`).
async fn append(
    node: &NodeShared,
    partition: u32,
    events: Vec<Event>,
) -> Result<Vec<AppendResult>, RequestError> {
    let started = std::time::Instant::now();
    let count = events.len();
    let outcome = append_events(node, partition, events).await;
    crate::metrics::record_append(partition, count, &outcome, started.elapsed());
    outcome
}

async fn append_events(
    node: &NodeShared,
    partition: u32,
    events: Vec<Event>,
) -> Result<Vec<AppendResult>, RequestError> {
    let handle = node.partition(partition)?;
    let limits = node.config.limits;
    if events.len() > limits.max_batch_events {
        return Err(RequestError::BatchTooLarge {
            reason: format!(
                "{} events, at most {} per batch",
                events.len(),
                limits.max_batch_events
            ),
        });
    }
    let bytes: usize = events.iter().map(canonical::encoded_len).sum();
    if bytes > limits.max_batch_bytes {
        return Err(RequestError::BatchTooLarge {
            reason: format!(
                "{bytes} bytes, at most {} per batch",
                limits.max_batch_bytes
            ),
        });
    }
    node.require_leader(partition)?;
    // Slots for every input event; valid ones are filled after the write.
    let mut results: Vec<Option<AppendResult>> = Vec::with_capacity(events.len());
    let mut valid: Vec<Event> = Vec::new();
    let count = node.config.partitions;
    for mut event in events {
        let expected = partition_of(&event, count);
        let checked = canonicalize_event(&mut event).and_then(|()| validate_event(&event, &limits));
        if let Err(e) = checked {
            results.push(Some(AppendResult::Rejected(EventError::Invalid(e))));
        } else if expected != partition {
            results.push(Some(AppendResult::Rejected(EventError::WrongPartition {
                expected,
            })));
        } else {
            results.push(None);
            valid.push(event);
        }
    }
    if !valid.is_empty() {
        let stored = handle
            .actor
            .send(Append { events: valid })
            .await
            .map_err(|e| RequestError::Unavailable {
                partition,
                reason: format!("partition actor unavailable: {e}"),
            })??;
        let mut stored = stored.into_iter();
        for slot in results.iter_mut().filter(|s| s.is_none()) {
            *slot = stored.next();
        }
    }
    results
        .into_iter()
        .map(|r| {
            r.ok_or_else(|| RequestError::Internal {
                reason: "fewer results than events".into(),
            })
        })
        .collect()
}

async fn read(
    node: &NodeShared,
    partition: u32,
    from_offset: u64,
    limit: u32,
    wait_ms: u32,
) -> Result<EventsPage, RequestError> {
    let handle = node.partition(partition)?;
    let limit = limit.clamp(1, MAX_READ_EVENTS) as usize;
    let mut watch = handle.reader.watch();
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(u64::from(wait_ms)).min(MAX_READ_WAIT);
    loop {
        let head = handle.reader.head().map_err(RequestError::internal)?;
        if from_offset < head.next_offset || wait_ms == 0 {
            let events = handle
                .reader
                .read(from_offset, limit)
                .map_err(RequestError::internal)?;
            let events = within_budget(events);
            let next_offset = events.last().map(|e| e.offset + 1).unwrap_or(from_offset);
            return Ok(EventsPage {
                partition,
                events,
                next_offset,
                head_offset: head.next_offset,
            });
        }
        // Nothing new yet: wait for the state machine to apply more, or
        // for the deadline, then answer with whatever is there.
        match tokio::time::timeout_at(deadline, watch.changed()).await {
            Ok(Ok(())) => {}
            // The partition's state machine is gone (the node is shutting
            // down): waiting again would return at once, for ever.
            Ok(Err(_)) => {
                return Err(RequestError::Unavailable {
                    partition,
                    reason: "the partition is shutting down on this node".into(),
                })
            }
            Err(_) => {
                return Ok(EventsPage {
                    partition,
                    events: Vec::new(),
                    next_offset: from_offset,
                    head_offset: head.next_offset,
                })
            }
        }
    }
}

/// Keeps a prefix of `events` within [`MAX_READ_BYTES`] (at least one).
fn within_budget(mut events: Vec<StoredEvent>) -> Vec<StoredEvent> {
    let mut total = 0usize;
    let mut keep = 0usize;
    for e in &events {
        total += canonical::encoded_len(&e.event);
        if keep > 0 && total > MAX_READ_BYTES {
            break;
        }
        keep += 1;
    }
    events.truncate(keep);
    events
}
