//! Connections (one per node, made lazily and again after a failure)
//! and single requests on them, without retries.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use auditflow_protocol::frame::{self, DEFAULT_MAX_FRAME_BYTES};
use auditflow_protocol::wire::{Request, RequestError, Response, PROTOCOL_VERSION};

use crate::transport::{read_frame, write_frame};
use crate::ClientError;

use super::{lock, Client};

impl Client {
    pub(super) async fn connection(&self, addr: &str) -> Result<quinn::Connection, ClientError> {
        let slot = Arc::clone(lock(&self.inner.conns).entry(addr.to_string()).or_default());
        let mut slot = slot.lock().await;
        if let Some(conn) = slot.as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let target = resolve(addr).await?;
        let timeout = Duration::from_millis(self.inner.cfg.request_timeout_ms);
        let connecting = self
            .inner
            .endpoint
            .connect(target, &self.inner.cfg.server_name)
            .map_err(|e| ClientError::Connect {
                addr: addr.into(),
                reason: e.to_string(),
            })?;
        let conn = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) if is_handshake_failure(&e) => {
                return Err(ClientError::Handshake {
                    addr: addr.into(),
                    reason: e.to_string(),
                })
            }
            Ok(Err(e)) => {
                return Err(ClientError::Connect {
                    addr: addr.into(),
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                return Err(ClientError::Timeout {
                    addr: addr.into(),
                    ms: self.inner.cfg.request_timeout_ms,
                })
            }
        };
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Sends one request to `addr` and returns its response; a
    /// [`Response::Error`] becomes [`ClientError::Server`]. No retries.
    pub async fn request(&self, addr: &str, request: &Request) -> Result<Response, ClientError> {
        let timeout_ms = self.inner.cfg.request_timeout_ms;
        self.request_with_timeout(addr, request, Duration::from_millis(timeout_ms))
            .await
    }

    pub(super) async fn request_with_timeout(
        &self,
        addr: &str,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let _permit = self
            .inner
            .window
            .acquire()
            .await
            .map_err(|_| ClientError::NoNodes {
                tried: "client closed".into(),
            })?;
        let bytes =
            frame::encode(PROTOCOL_VERSION, request, DEFAULT_MAX_FRAME_BYTES).map_err(|e| {
                ClientError::Server(RequestError::BatchTooLarge {
                    reason: e.to_string(),
                })
            })?;
        let conn = self.connection(addr).await?;
        let exchange = async {
            let (mut send, mut recv) =
                conn.open_bi().await.map_err(|e| ClientError::Transport {
                    addr: addr.into(),
                    reason: e.to_string(),
                })?;
            let written = write_frame(&mut send, &bytes).await;
            let read = read_frame(&mut recv, DEFAULT_MAX_FRAME_BYTES).await;
            // A node that stops reading a request (STOP_SENDING fails the
            // write) may have answered it first, as one refusing a frame
            // does: the answer counts; without one the write's failure is
            // the error.
            let payload = match (written, read) {
                (_, Ok(payload)) => payload,
                (Err(e), Err(_)) | (Ok(()), Err(e)) => return Err(ClientError::transport(addr, e)),
            };
            frame::decode::<Response>(PROTOCOL_VERSION, &payload).map_err(|source| {
                ClientError::Frame {
                    addr: addr.into(),
                    source,
                }
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(Response::Error(e))) => Err(ClientError::Server(e)),
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout {
                addr: addr.into(),
                ms: timeout.as_millis() as u64,
            }),
        }
    }
}

pub(super) fn unexpected(addr: &str, response: &Response) -> ClientError {
    let what = match response {
        Response::Appended(_) => "Appended",
        Response::Events(_) => "Events",
        Response::Metadata(_) => "Metadata",
        Response::Status(_) => "Status",
        Response::DestStatus(_) => "DestStatus",
        Response::Dlq(_) => "Dlq",
        Response::Done { .. } => "Done",
        Response::Destinations(_) => "Destinations",
        Response::Error(_) => "Error",
    };
    ClientError::Unexpected {
        addr: addr.into(),
        what: what.into(),
    }
}

/// Whether a connection failed in the TLS handshake (a TLS alert, which
/// QUIC carries as a "crypto" error code 0x100..=0x1ff, RFC 9001 §4.8),
/// sent by either side, rather than on the way (timeouts, resets).
pub(super) fn is_handshake_failure(e: &quinn::ConnectionError) -> bool {
    let code = match e {
        quinn::ConnectionError::TransportError(t) => u64::from(t.code),
        quinn::ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
        _ => return false,
    };
    (0x100..=0x1ff).contains(&code)
}

pub(super) async fn resolve(addr: &str) -> Result<SocketAddr, ClientError> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    let mut found = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| ClientError::Connect {
            addr: addr.into(),
            reason: format!("cannot resolve: {e}"),
        })?;
    found.next().ok_or_else(|| ClientError::Connect {
        addr: addr.into(),
        reason: "name resolves to no address".into(),
    })
}
