//! Retries: backoff with full jitter, following the partition leader
//! through redirects, and the cluster metadata that routes requests.

use std::time::{Duration, Instant};

use auditflow_protocol::wire::{ClusterMetadata, Request, RequestError, Response};
use rand::Rng;
use tracing::debug;

use crate::ClientError;

use super::connection::unexpected;
use super::Client;

/// First retry delay.
pub(super) const BACKOFF_BASE: Duration = Duration::from_millis(20);
/// Largest retry delay.
pub(super) const BACKOFF_CAP: Duration = Duration::from_secs(1);
/// Redirects followed in a row before backing off (two nodes that each
/// think the other leads, during an election).
const MAX_FREE_REDIRECTS: u32 = 3;

/// Upper bound of the `attempt`-th retry delay (exponential, capped); the
/// actual delay is uniform in `[0, bound]` (full jitter), which spreads
/// retrying clients apart after a leader change.
pub fn backoff_bound(attempt: u32) -> Duration {
    let factor = 1u32 << attempt.min(16);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_CAP)
}

pub(super) fn jittered(attempt: u32) -> Duration {
    let bound = backoff_bound(attempt).as_micros() as u64;
    Duration::from_micros(rand::thread_rng().gen_range(0..=bound))
}

/// Longest wait an overloaded node's hint can impose, so that a wrong hint
/// cannot stall a client for long; the retry deadline still applies.
pub const OVERLOAD_PAUSE_CAP: Duration = Duration::from_secs(5);

/// The pause before the next attempt after `error` (pure: `unit` is a
/// uniform draw in `[0, 1]` from the caller's RNG). A node that answered
/// [`RequestError::Overloaded`] said how long until it has room: wait at
/// least that, plus up to as much again (or the backoff bound, whichever
/// is larger) as jitter, so the clients it turned away do not all come
/// back at the same instant. Anything else: full jitter up to
/// [`backoff_bound`].
pub fn retry_pause(error: &ClientError, attempt: u32, unit: f64) -> Duration {
    let unit = unit.clamp(0.0, 1.0);
    match error {
        ClientError::Server(RequestError::Overloaded { retry_after_ms, .. }) => {
            let hint = Duration::from_millis(u64::from(*retry_after_ms)).min(OVERLOAD_PAUSE_CAP);
            let spread = hint.max(backoff_bound(attempt));
            (hint + spread.mul_f64(unit)).min(OVERLOAD_PAUSE_CAP)
        }
        _ => backoff_bound(attempt).mul_f64(unit),
    }
}

/// Whether `error` says the node asked is overloaded: it is still the
/// partition's leader, so the client keeps sending there.
fn overloaded(error: &ClientError) -> bool {
    matches!(error, ClientError::Server(RequestError::Overloaded { .. }))
}

impl Client {
    /// Fresh metadata from the first node that answers (retrying until the
    /// deadline); also refreshes the cache used for routing.
    pub async fn metadata(&self) -> Result<ClusterMetadata, ClientError> {
        let started = Instant::now();
        let deadline = Duration::from_millis(self.inner.cfg.retry_deadline_ms);
        let mut attempt = 0u32;
        loop {
            let mut addrs = self.node_addrs();
            for seed in &self.inner.cfg.seeds {
                if !addrs.contains(seed) {
                    addrs.push(seed.clone());
                }
            }
            let mut last = ClientError::NoNodes {
                tried: addrs.join(", "),
            };
            // A round in which every node failed for a reason retrying
            // cannot fix (an untrusted certificate) ends the call at once.
            let mut all_fatal = !addrs.is_empty();
            for (i, addr) in addrs.iter().enumerate() {
                // Bound each attempt by what is left of the deadline, so
                // that unreachable seeds (each costing a handshake timeout)
                // cannot stretch `connect` far past `retry_deadline_ms`;
                // the first address of the first round is always tried,
                // even with a zero deadline.
                let left = deadline.saturating_sub(started.elapsed());
                let first = attempt == 0 && i == 0;
                if left.is_zero() && !first {
                    break;
                }
                let budget = if left.is_zero() {
                    Duration::from_millis(self.inner.cfg.request_timeout_ms)
                } else {
                    left
                };
                match tokio::time::timeout(budget, self.request(addr, &Request::Metadata)).await {
                    Ok(Ok(Response::Metadata(meta))) => {
                        *self.inner.meta.write().unwrap_or_else(|p| p.into_inner()) = meta.clone();
                        return Ok(meta);
                    }
                    Ok(Ok(other)) => {
                        all_fatal = false;
                        last = unexpected(addr, &other);
                    }
                    Ok(Err(e)) => {
                        debug!("metadata from {addr}: {e}");
                        all_fatal &= !e.is_retryable();
                        last = e;
                    }
                    Err(_) => {
                        all_fatal = false;
                        last = ClientError::Timeout {
                            addr: addr.clone(),
                            ms: budget.as_millis() as u64,
                        }
                    }
                }
            }
            if all_fatal {
                return Err(last);
            }
            let pause = jittered(attempt);
            if started.elapsed() + pause >= deadline {
                return Err(ClientError::DeadlineExceeded {
                    ms: deadline.as_millis() as u64,
                    last: last.to_string(),
                });
            }
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    /// Sends `request` to the leader of `partition`, following redirects
    /// and retrying retryable failures until the deadline. Returns the
    /// answering node and its response.
    pub async fn to_leader(
        &self,
        partition: u32,
        request: &Request,
    ) -> Result<(String, Response), ClientError> {
        let started = Instant::now();
        let deadline = Duration::from_millis(self.inner.cfg.retry_deadline_ms);
        let mut redirect: Option<String> = None;
        let mut attempt = 0u32;
        let mut redirects = 0u32;
        loop {
            let addr = match redirect.take().or_else(|| self.leader_addr(partition)) {
                Some(a) => a,
                None => {
                    let addrs = self.node_addrs();
                    let start = rand::thread_rng().gen_range(0..addrs.len().max(1));
                    match addrs.get((start + attempt as usize) % addrs.len().max(1)) {
                        Some(a) => a.clone(),
                        None => {
                            return Err(ClientError::NoNodes {
                                tried: String::new(),
                            })
                        }
                    }
                }
            };
            let error = match self.request(&addr, request).await {
                Ok(response) => return Ok((addr, response)),
                Err(ClientError::Server(RequestError::NotLeader {
                    leader: Some(leader),
                    ..
                })) if redirects < MAX_FREE_REDIRECTS && leader.addr != addr => {
                    self.set_leader(partition, Some(leader.id));
                    redirect = Some(leader.addr);
                    redirects += 1;
                    continue;
                }
                Err(e) if e.is_retryable() => e,
                Err(e) => return Err(e),
            };
            debug!(partition, %addr, "attempt {attempt} failed: {error}");
            redirects = 0;
            if overloaded(&error) {
                // Still the leader, only busy: come back to it.
                self.inner
                    .overloaded
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                redirect = Some(addr);
            } else {
                self.set_leader(partition, None);
            }
            let pause = retry_pause(&error, attempt, rand::thread_rng().gen());
            if started.elapsed() + pause >= deadline {
                return Err(ClientError::DeadlineExceeded {
                    ms: deadline.as_millis() as u64,
                    last: error.to_string(),
                });
            }
            tokio::time::sleep(pause).await;
            attempt += 1;
            // Learn the new leaders while waiting out an election.
            if attempt.is_multiple_of(4) {
                let this = self.clone();
                tokio::spawn(async move {
                    let _ = this.refresh_metadata_once().await;
                });
            }
        }
    }

    async fn refresh_metadata_once(&self) -> Result<(), ClientError> {
        for addr in self.node_addrs() {
            if let Ok(Response::Metadata(meta)) = self.request(&addr, &Request::Metadata).await {
                *self.inner.meta.write().unwrap_or_else(|p| p.into_inner()) = meta;
                return Ok(());
            }
        }
        Err(ClientError::NoNodes {
            tried: self.node_addrs().join(", "),
        })
    }
}
