//! The QUIC accept loop: one endpoint, two ALPNs.
//!
//! Each connection's streams are independent: a malformed or oversized
//! frame fails only its own stream, answered with a clear error. Concurrent
//! streams per connection are bounded by the transport config.
//!
//! Memory is bounded in bytes (G8, [`super::budget`]): a client request's
//! room (twice its frame length) is taken from its connection's and the
//! node's request budgets once its header is read and before its body is,
//! and held until it is answered; client connections are counted against
//! `memory.max_connections`. A request or connection past a bound is
//! answered [`RequestError::Overloaded`] with a retry hint; its body is
//! never read (the stream is stopped, so QUIC drops what was buffered).
//! Peer connections are not counted: there are at most a cluster's worth.

use std::sync::Arc;
use std::time::Duration;

use auditflow_framing::{read_frame, read_frame_len, read_frame_payload, write_frame};
use auditflow_protocol::frame::{self, DEFAULT_MAX_FRAME_BYTES, HEADER_BYTES};
use auditflow_protocol::wire::{Request, RequestError, Response, ALPN_PEER, PROTOCOL_VERSION};
use tracing::{debug, warn};

use super::budget::{Refused, SharedBudget};
use crate::api::{client_api, peer_api};
use crate::config::MemoryLimits;
use crate::node::NodeShared;
use crate::partition::transport::{
    PeerRequest, PeerResponse, MAX_PEER_FRAME_BYTES, PEER_PROTOCOL_VERSION,
};

/// QUIC application error code: the peer ALPN was used without a node
/// certificate.
const CLOSE_NOT_A_PEER: u32 = 0x10;
/// QUIC stream error code: the request frame was refused.
const STOP_BAD_FRAME: u32 = 0x11;
/// QUIC application error code: too many client connections.
const CLOSE_OVERLOADED: u32 = 0x12;
/// QUIC stream error code: no room for the request; it was answered
/// `Overloaded` and its body is not wanted.
const STOP_OVERLOADED: u32 = 0x13;
/// Retry hint when a request budget is full: requests end with a commit
/// round (a few to tens of milliseconds), so room comes back soon.
const REQUEST_BYTES_RETRY_AFTER_MS: u32 = 50;
/// Retry hint when there are too many connections: connections live long,
/// so a slot comes back more slowly than request bytes do.
const CONNECTIONS_RETRY_AFTER_MS: u32 = 1_000;
/// How long a connection over the bound is kept to answer its requests
/// `Overloaded` before it is closed: long enough for a client's first
/// request to arrive and get its typed answer.
const TURN_AWAY_LINGER: Duration = Duration::from_secs(2);
/// Connections over the bound being turned away at once. Beyond it a new
/// one is closed at once without an answer: turning away costs a task and
/// a connection's state for the linger, which must be bounded too.
const MAX_TURNING_AWAY: u64 = 64;

/// The request path's bounds of a node.
struct Bounds {
    /// Client connections open.
    connections: SharedBudget,
    /// Connections over the bound being answered `Overloaded`.
    turning_away: SharedBudget,
    /// Bytes of client requests in flight on the node.
    request_bytes: SharedBudget,
    /// The settings, for each new connection's budget and for messages.
    memory: MemoryLimits,
}

/// Accepts connections until the endpoint is closed.
pub async fn serve(endpoint: quinn::Endpoint, node: Arc<NodeShared>) {
    let memory = node.config.memory;
    let bounds = Arc::new(Bounds {
        connections: SharedBudget::new(u64::from(memory.max_connections)),
        turning_away: SharedBudget::new(MAX_TURNING_AWAY),
        request_bytes: SharedBudget::new(memory.request_bytes_total),
        memory,
    });
    while let Some(incoming) = endpoint.accept().await {
        let node = Arc::clone(&node);
        let bounds = Arc::clone(&bounds);
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) => handle_connection(conn, node, bounds).await,
                Err(e) => debug!("handshake failed: {e}"),
            }
        });
    }
}

async fn handle_connection(conn: quinn::Connection, node: Arc<NodeShared>, bounds: Arc<Bounds>) {
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    let is_peer = alpn.as_deref() == Some(ALPN_PEER);
    if is_peer && conn.peer_identity().is_none() {
        warn!(remote = %conn.remote_address(), "peer ALPN without node certificate refused");
        conn.close(
            CLOSE_NOT_A_PEER.into(),
            b"peer protocol requires a node certificate",
        );
        return;
    }
    // Held while the connection lives: its slot among client connections.
    let _slot = if is_peer {
        None
    } else {
        match SharedBudget::reserve(&[&bounds.connections], 1) {
            Ok(slot) => Some(slot),
            Err(_) => return turn_away(conn, &bounds).await,
        }
    };
    let mine = SharedBudget::new(bounds.memory.request_bytes_per_connection);
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(remote = %conn.remote_address(), "connection ended: {e}");
                return;
            }
        };
        let node = Arc::clone(&node);
        let bounds = Arc::clone(&bounds);
        let mine = mine.clone();
        tokio::spawn(async move {
            if is_peer {
                peer_stream(send, recv, &node).await;
            } else {
                client_stream(send, recv, &node, &mine, &bounds).await;
            }
        });
    }
}

/// A client connection over `memory.max_connections`: its requests are
/// answered `Overloaded` for a moment, then it is closed.
async fn turn_away(conn: quinn::Connection, bounds: &Bounds) {
    let max = bounds.memory.max_connections;
    let Ok(_turning) = SharedBudget::reserve(&[&bounds.turning_away], 1) else {
        conn.close(CLOSE_OVERLOADED.into(), b"too many client connections");
        return;
    };
    debug!(remote = %conn.remote_address(), "over {max} client connections: turned away");
    let answer = Response::Error(RequestError::Overloaded {
        reason: format!("the node serves at most {max} client connections"),
        retry_after_ms: CONNECTIONS_RETRY_AFTER_MS,
    });
    let answering = async {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let _ = recv.stop(STOP_OVERLOADED.into());
            respond(
                &mut send,
                PROTOCOL_VERSION,
                &answer,
                DEFAULT_MAX_FRAME_BYTES,
            )
            .await;
        }
    };
    let _ = tokio::time::timeout(TURN_AWAY_LINGER, answering).await;
    conn.close(CLOSE_OVERLOADED.into(), b"too many client connections");
}

/// The room a request of a `len`-byte payload takes: its frame, and its
/// decoded form, about as large, which lives while it is handled.
fn request_room(len: usize) -> u64 {
    2 * (len as u64 + HEADER_BYTES as u64)
}

/// The answer to a request the bounds have no room for.
fn no_room(which: &str, refused: Refused) -> RequestError {
    match refused {
        Refused::Full { used, limit } => RequestError::Overloaded {
            reason: format!("{used} of {limit} bytes of requests in flight on {which}"),
            retry_after_ms: REQUEST_BYTES_RETRY_AFTER_MS,
        },
        // The settings are checked to make room for the largest frame, so
        // this is a request over the frame limit that slipped through.
        Refused::TooLarge { limit } => RequestError::BatchTooLarge {
            reason: format!("the request needs more than the {limit} bytes {which} allows"),
        },
    }
}

async fn client_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    node: &NodeShared,
    connection: &SharedBudget,
    bounds: &Bounds,
) {
    let bad_frame = |e: auditflow_framing::TransportError| {
        Response::Error(RequestError::BadRequest {
            reason: e.to_string(),
        })
    };
    // Held until the response is written: the request, then its answer.
    let mut _room = None;
    let response = match read_frame_len(&mut recv, DEFAULT_MAX_FRAME_BYTES).await {
        Err(e) => {
            // Stop the peer from sending the rest of an oversized body.
            let _ = recv.stop(STOP_BAD_FRAME.into());
            bad_frame(e)
        }
        Ok(len) => {
            match SharedBudget::reserve(&[connection, &bounds.request_bytes], request_room(len)) {
                Err((which, refused)) => {
                    let _ = recv.stop(STOP_OVERLOADED.into());
                    let which = if which == 0 {
                        "this connection"
                    } else {
                        "this node"
                    };
                    Response::Error(no_room(which, refused))
                }
                Ok(room) => {
                    _room = Some(room);
                    match read_frame_payload(&mut recv, len).await {
                        Err(e) => bad_frame(e),
                        Ok(payload) => match frame::decode::<Request>(PROTOCOL_VERSION, &payload) {
                            Ok(request) => {
                                drop(payload);
                                client_api::handle(node, request).await
                            }
                            Err(e) => Response::Error(RequestError::BadRequest {
                                reason: e.to_string(),
                            }),
                        },
                    }
                }
            }
        }
    };
    respond(
        &mut send,
        PROTOCOL_VERSION,
        &response,
        DEFAULT_MAX_FRAME_BYTES,
    )
    .await;
}

async fn peer_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, node: &NodeShared) {
    let response = match read_frame(&mut recv, MAX_PEER_FRAME_BYTES).await {
        Err(e) => {
            let _ = recv.stop(STOP_BAD_FRAME.into());
            PeerResponse::Failed(e.to_string())
        }
        Ok(payload) => match frame::decode::<PeerRequest>(PEER_PROTOCOL_VERSION, &payload) {
            Ok(request) => peer_api::handle(node, request).await,
            Err(e) => PeerResponse::Failed(e.to_string()),
        },
    };
    respond(
        &mut send,
        PEER_PROTOCOL_VERSION,
        &response,
        MAX_PEER_FRAME_BYTES,
    )
    .await;
}

async fn respond<T: serde::Serialize>(
    send: &mut quinn::SendStream,
    version: u16,
    response: &T,
    max: usize,
) {
    match frame::encode(version, response, max) {
        Ok(bytes) => {
            if let Err(e) = write_frame(send, &bytes).await {
                debug!("response not delivered: {e}");
            }
        }
        Err(e) => warn!("cannot encode response: {e}"),
    }
}
