//! The calls the client offers: appends (batched per partition within
//! the in-flight window), reads and tails, delivery administration.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use auditflow_protocol::delivery::{
    DestinationInfo, DestinationStatus, DlqEntry, RedriveSelection, CATALOG_PARTITION,
};
use auditflow_protocol::partition::partition_of;
use auditflow_protocol::wire::{
    Ack, AppendResult, ClusterMetadata, EventError, EventsPage, NodeStatus, ReplayFrom, Request,
    Response,
};
use auditflow_protocol::{canonical, Event, Limits, StoredEvent};
use tokio::sync::oneshot;

use crate::{AppendError, ClientError};

use super::connection::unexpected;
use super::retry::retry_pause;
use super::{lock, Client, MAX_PIPELINE};

/// Gives every event without an id a fresh UUIDv7 (time-ordered, so ids
/// sort roughly by creation). Done once, before the first attempt, so that
/// retries carry the same id.
pub fn assign_ids(events: &mut [Event]) {
    for e in events.iter_mut().filter(|e| e.id.is_empty()) {
        e.id = uuid::Uuid::now_v7().to_string();
    }
}

/// Splits `indexes` (into `events`) into requests within the cluster's
/// batch limits, keeping order. An event alone over the byte limit still
/// gets its own request, so the cluster reports it as a per-event error.
pub fn split_batches(events: &[Event], indexes: &[usize], limits: &Limits) -> Vec<Vec<usize>> {
    let max_events = limits.max_batch_events.max(1);
    // Leave room for framing and the wire encoding's own overhead.
    let max_bytes = limits.max_batch_bytes / 2;
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut bytes = 0usize;
    for &i in indexes {
        let size = canonical::encoded_len(&events[i]);
        if !current.is_empty() && (current.len() >= max_events || bytes + size > max_bytes) {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push(i);
        bytes += size;
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

impl Client {
    /// Appends one event; returns where it is stored.
    ///
    /// Concurrent appends to one partition are coalesced: while
    /// [`MAX_PIPELINE`] requests are in flight, new events wait and leave
    /// together in the next request (within the cluster's batch limits).
    pub async fn append(&self, mut event: Event) -> Result<Ack, AppendError> {
        assign_ids(std::slice::from_mut(&mut event));
        let partitions = self
            .routing_metadata()
            .await
            .map_err(AppendError::Failed)?
            .partition_count
            .max(1);
        let partition = partition_of(&event, partitions);
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.batchers)
            .entry(partition)
            .or_default()
            .queue
            .push_back((event, tx));
        self.pump(partition);
        rx.await.unwrap_or_else(|_| {
            Err(AppendError::Failed(ClientError::Unexpected {
                addr: String::new(),
                what: "append dropped".into(),
            }))
        })
    }

    /// Sends queued single appends of `partition` while pipeline slots
    /// are free.
    fn pump(&self, partition: u32) {
        let limits = self.cached_metadata().limits;
        let max_events = limits.max_batch_events.max(1);
        let max_bytes = limits.max_batch_bytes / 2;
        loop {
            let batch = {
                let mut batchers = lock(&self.inner.batchers);
                let b = batchers.entry(partition).or_default();
                if b.in_flight >= MAX_PIPELINE || b.queue.is_empty() {
                    return;
                }
                let mut batch = Vec::new();
                let mut bytes = 0;
                while let Some((e, _)) = b.queue.front() {
                    let size = canonical::encoded_len(e);
                    if !batch.is_empty() && (batch.len() >= max_events || bytes + size > max_bytes)
                    {
                        break;
                    }
                    bytes += size;
                    if let Some(item) = b.queue.pop_front() {
                        batch.push(item);
                    }
                }
                b.in_flight += 1;
                batch
            };
            let this = self.clone();
            tokio::spawn(async move {
                let (events, replies): (Vec<Event>, Vec<_>) = batch.into_iter().unzip();
                let n = events.len();
                match this.append_partition(partition, events).await {
                    Ok(results) if results.len() == n => {
                        for (r, tx) in results.into_iter().zip(replies) {
                            let _ = tx.send(match r {
                                AppendResult::Stored(ack) => Ok(ack),
                                AppendResult::Rejected(e) => Err(AppendError::Rejected(e)),
                            });
                        }
                    }
                    Ok(results) => {
                        let e = ClientError::Unexpected {
                            addr: String::new(),
                            what: format!("{} results for {n} events", results.len()),
                        };
                        for tx in replies {
                            let _ = tx.send(Err(AppendError::Failed(e.clone())));
                        }
                    }
                    Err(e) => {
                        for tx in replies {
                            let _ = tx.send(Err(AppendError::Failed(e.clone())));
                        }
                    }
                }
                if let Some(b) = lock(&this.inner.batchers).get_mut(&partition) {
                    b.in_flight -= 1;
                }
                this.pump(partition);
            });
        }
    }

    /// Appends events; one result per event, in input order. Events go to
    /// their partitions' leaders concurrently, in requests within the
    /// cluster's batch limits.
    pub async fn append_batch(
        &self,
        mut events: Vec<Event>,
    ) -> Result<Vec<Result<Ack, EventError>>, ClientError> {
        assign_ids(&mut events);
        let meta = self.routing_metadata().await?;
        let partitions = meta.partition_count.max(1);
        let mut by_partition: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, e) in events.iter().enumerate() {
            by_partition
                .entry(partition_of(e, partitions))
                .or_default()
                .push(i);
        }
        let mut requests = Vec::new();
        for (partition, indexes) in by_partition {
            for chunk in split_batches(&events, &indexes, &meta.limits) {
                let batch: Vec<Event> = chunk.iter().map(|&i| events[i].clone()).collect();
                requests.push(async move {
                    let results = self.append_partition(partition, batch).await;
                    (chunk, results)
                });
            }
        }
        let mut out: Vec<Option<Result<Ack, EventError>>> = vec![None; events.len()];
        for (chunk, results) in futures::future::join_all(requests).await {
            let results = results?;
            if results.len() != chunk.len() {
                return Err(ClientError::Unexpected {
                    addr: String::new(),
                    what: format!("{} results for {} events", results.len(), chunk.len()),
                });
            }
            for (i, r) in chunk.into_iter().zip(results) {
                out[i] = Some(match r {
                    AppendResult::Stored(ack) => Ok(ack),
                    AppendResult::Rejected(e) => Err(e),
                });
            }
        }
        out.into_iter()
            .map(|r| {
                r.ok_or_else(|| ClientError::Unexpected {
                    addr: String::new(),
                    what: "missing result".into(),
                })
            })
            .collect()
    }

    /// The metadata appends are routed and split by: the cached one, or,
    /// for a client that has not loaded any yet ([`Client::open`]), a
    /// fresh one. Without it every event went to partition 0 in requests
    /// within the default limits, which a cluster with tighter ones
    /// refused whole (`BatchTooLarge`).
    async fn routing_metadata(&self) -> Result<ClusterMetadata, ClientError> {
        let meta = self.cached_metadata();
        if meta.partition_count > 0 {
            return Ok(meta);
        }
        self.metadata().await
    }

    async fn append_partition(
        &self,
        partition: u32,
        events: Vec<Event>,
    ) -> Result<Vec<AppendResult>, ClientError> {
        let request = Request::Append { partition, events };
        match self.to_leader(partition, &request).await? {
            (_, Response::Appended(results)) => Ok(results),
            (addr, other) => Err(unexpected(&addr, &other)),
        }
    }

    /// Delivery status from every node (each reports the pairs it leads).
    pub async fn dest_status_all(
        &self,
    ) -> Vec<(String, Result<Vec<DestinationStatus>, ClientError>)> {
        let addrs = self.node_addrs();
        let asks = addrs.iter().map(|addr| async move {
            let result = match self.request(addr, &Request::DestStatus).await {
                Ok(Response::DestStatus(s)) => Ok(s),
                Ok(other) => Err(unexpected(addr, &other)),
                Err(e) => Err(e),
            };
            (addr.clone(), result)
        });
        futures::future::join_all(asks).await
    }

    /// Parked events of `dest` in `partition`, from `from_offset` on.
    pub async fn dlq_list(
        &self,
        dest: &str,
        partition: u32,
        from_offset: u64,
        limit: u32,
    ) -> Result<Vec<(u64, DlqEntry)>, ClientError> {
        let request = Request::DlqList {
            dest: dest.into(),
            partition,
            from_offset,
            limit,
        };
        match self.to_leader(partition, &request).await? {
            (_, Response::Dlq(entries)) => Ok(entries),
            (addr, other) => Err(unexpected(&addr, &other)),
        }
    }

    /// Marks parked events of `dest` in `partition` for redelivery;
    /// returns how many were marked.
    pub async fn redrive(
        &self,
        dest: &str,
        partition: u32,
        selection: RedriveSelection,
    ) -> Result<u64, ClientError> {
        let request = Request::Redrive {
            dest: dest.into(),
            partition,
            selection,
        };
        match self.to_leader(partition, &request).await? {
            (_, Response::Done { count }) => Ok(count),
            (addr, other) => Err(unexpected(&addr, &other)),
        }
    }

    /// Adds (or replaces) a run-time destination, given as the JSON of a
    /// `[[destinations]]` entry; replicated to every node.
    pub async fn dest_add(&self, config_json: &str) -> Result<(), ClientError> {
        let request = Request::DestAdd {
            config_json: config_json.into(),
        };
        match self.to_leader(CATALOG_PARTITION, &request).await? {
            (_, Response::Done { .. }) => Ok(()),
            (addr, other) => Err(unexpected(&addr, &other)),
        }
    }

    /// Removes a run-time destination; returns whether it existed.
    pub async fn dest_remove(&self, dest: &str) -> Result<bool, ClientError> {
        let request = Request::DestRemove { dest: dest.into() };
        match self.to_leader(CATALOG_PARTITION, &request).await? {
            (_, Response::Done { count }) => Ok(count > 0),
            (addr, other) => Err(unexpected(&addr, &other)),
        }
    }

    /// Every destination, as the catalog partition's leader sees them.
    pub async fn dest_list(&self) -> Result<Vec<DestinationInfo>, ClientError> {
        match self
            .to_leader(CATALOG_PARTITION, &Request::DestList)
            .await?
        {
            (_, Response::Destinations(list)) => Ok(list),
            (addr, other) => Err(unexpected(&addr, &other)),
        }
    }

    /// Re-delivers `partition`'s events `[from, until)` to `dest` (`until`
    /// defaults to, and is clamped to, the destination's cursor); returns
    /// how many offsets are queued for re-delivery.
    pub async fn replay(
        &self,
        dest: &str,
        partition: u32,
        from: ReplayFrom,
        until: Option<ReplayFrom>,
    ) -> Result<u64, ClientError> {
        let request = Request::Replay {
            dest: dest.into(),
            partition,
            from,
            until,
        };
        match self.to_leader(partition, &request).await? {
            (_, Response::Done { count }) => Ok(count),
            (addr, other) => Err(unexpected(&addr, &other)),
        }
    }

    /// Reads up to `limit` events of `partition` from `from_offset`, from
    /// the partition's leader (or any node that answers).
    pub async fn read(
        &self,
        partition: u32,
        from_offset: u64,
        limit: u32,
    ) -> Result<EventsPage, ClientError> {
        let mut addrs = self.node_addrs();
        if let Some(leader) = self.leader_addr(partition) {
            addrs.retain(|a| *a != leader);
            addrs.insert(0, leader);
        }
        let mut last = ClientError::NoNodes {
            tried: addrs.join(", "),
        };
        for addr in addrs {
            match self
                .read_from(&addr, partition, from_offset, limit, 0)
                .await
            {
                Ok(page) => return Ok(page),
                Err(e) if e.is_retryable() => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Reads from the replica on the node at `addr`; waits up to `wait_ms`
    /// for events when there are none yet at `from_offset`.
    pub async fn read_from(
        &self,
        addr: &str,
        partition: u32,
        from_offset: u64,
        limit: u32,
        wait_ms: u32,
    ) -> Result<EventsPage, ClientError> {
        let request = Request::Read {
            partition,
            from_offset,
            limit,
            wait_ms,
        };
        let timeout = Duration::from_millis(self.inner.cfg.request_timeout_ms + u64::from(wait_ms));
        match self.request_with_timeout(addr, &request, timeout).await? {
            Response::Events(page) => Ok(page),
            other => Err(unexpected(addr, &other)),
        }
    }

    /// Follows `partition` from `from_offset`: each call of
    /// [`Tail::next_page`] returns the next stored events, waiting for new
    /// ones when caught up.
    pub fn tail(&self, partition: u32, from_offset: u64) -> Tail {
        Tail {
            client: self.clone(),
            partition,
            next: from_offset,
        }
    }

    /// Status of every node, asked concurrently; unreachable nodes give
    /// their error.
    pub async fn status_all(&self) -> Vec<(String, Result<NodeStatus, ClientError>)> {
        let addrs = self.node_addrs();
        let asks = addrs.iter().map(|addr| async move {
            let result = match self.request(addr, &Request::Status).await {
                Ok(Response::Status(s)) => Ok(s),
                Ok(other) => Err(unexpected(addr, &other)),
                Err(e) => Err(e),
            };
            (addr.clone(), result)
        });
        futures::future::join_all(asks).await
    }
}

/// A cursor over one partition; see [`Client::tail`].
pub struct Tail {
    client: Client,
    partition: u32,
    next: u64,
}

/// How long one tail request waits for new events.
const TAIL_WAIT_MS: u32 = 10_000;

impl Tail {
    /// The offset the next page starts at.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// The next page of events; with `follow`, waits for new events when
    /// caught up (an empty page means none arrived within the wait).
    /// Transient failures (a node down, an election) are retried on other
    /// nodes until the client's deadline.
    pub async fn next_page(&mut self, follow: bool) -> Result<Vec<StoredEvent>, ClientError> {
        let wait = if follow { TAIL_WAIT_MS } else { 0 };
        let started = Instant::now();
        let deadline = Duration::from_millis(self.client.inner.cfg.retry_deadline_ms);
        let mut attempt = 0u32;
        loop {
            let addrs = self.client.node_addrs();
            let any = addrs.get(attempt as usize % addrs.len().max(1)).cloned();
            let Some(addr) = self.client.leader_addr(self.partition).or(any) else {
                return Err(ClientError::NoNodes {
                    tried: String::new(),
                });
            };
            match self
                .client
                .read_from(&addr, self.partition, self.next, 1000, wait)
                .await
            {
                Ok(page) => {
                    self.next = page.next_offset;
                    return Ok(page.events);
                }
                Err(e) if e.is_retryable() => {
                    self.client.set_leader(self.partition, None);
                    let pause = retry_pause(&e, attempt, rand::Rng::gen(&mut rand::thread_rng()));
                    if started.elapsed() + pause >= deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
