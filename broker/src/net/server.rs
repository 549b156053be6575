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
//! then read and thrown away chunk by chunk ([`refuse`]), never held.
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
    PeerEnvelope, PeerResponse, MAX_PEER_FRAME_BYTES, PEER_PROTOCOL_VERSION,
};

/// QUIC application error code: the peer ALPN was used without a node
/// certificate.
const CLOSE_NOT_A_PEER: u32 = 0x10;
/// QUIC stream error code: the request frame was refused.
const STOP_BAD_FRAME: u32 = 0x11;
/// QUIC application error code: too many client connections.
const CLOSE_OVERLOADED: u32 = 0x12;
/// QUIC stream error code: a refused request's body went on past its
/// bound or its deadline ([`refuse`]); it was answered already.
const STOP_OVERLOADED: u32 = 0x13;
/// How long the body of a refused request is read and thrown away. The
/// client library writes a request whole before it reads the answer, so
/// the body must be taken off it for the answer to be read; 5 s moves
/// the largest frame (8 MiB) at 13 Mbit/s. A slower sender is stopped
/// and sees a transport error, which it retries like any other.
const DISCARD_DEADLINE: Duration = Duration::from_secs(5);
/// Largest piece of a refused body read at once; what quinn hands over
/// is dropped at once, so this bounds nothing but the read call.
const DISCARD_CHUNK_BYTES: usize = 64 * 1024;
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
    // Each stream is refused in a task of its own, so that one slow body
    // does not hold up the answers to the others; the set ends them all
    // when the linger does. Its size is bounded by the streams QUIC lets
    // the connection open during the linger.
    let mut refusing = tokio::task::JoinSet::new();
    let answering = async {
        while let Ok((send, recv)) = conn.accept_bi().await {
            while refusing.try_join_next().is_some() {}
            let answer = answer.clone();
            refusing.spawn(async move {
                let whole_frame = (HEADER_BYTES + DEFAULT_MAX_FRAME_BYTES) as u64;
                refuse(send, recv, &answer, whole_frame).await;
            });
        }
    };
    let _ = tokio::time::timeout(TURN_AWAY_LINGER, answering).await;
    refusing.abort_all();
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
                    let which = if which == 0 {
                        "this connection"
                    } else {
                        "this node"
                    };
                    let answer = Response::Error(no_room(which, refused));
                    return refuse(send, recv, &answer, len as u64).await;
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

/// Answers a request the node will not handle, in a way its client
/// reads: the answer is written and the send side finished, then the
/// rest of the request (at most `body_bytes_max`, for at most
/// [`DISCARD_DEADLINE`]) is read and dropped a chunk at a time, so it
/// costs no more memory than QUIC's receive window.
///
/// Stopping the stream instead (STOP_SENDING, also what dropping an
/// unread `RecvStream` does) makes quinn fail the client's unfinished
/// write with `Stopped`: a client that writes its whole request before
/// reading, as ours does, saw a transport error instead of the answer
/// whenever the body was larger than what it had buffered.
async fn refuse(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    answer: &Response,
    body_bytes_max: u64,
) {
    respond(&mut send, PROTOCOL_VERSION, answer, DEFAULT_MAX_FRAME_BYTES).await;
    let discard = async {
        let mut read = 0u64;
        while read <= body_bytes_max {
            match recv.read_chunk(DISCARD_CHUNK_BYTES, true).await {
                Ok(Some(chunk)) => read += chunk.bytes.len() as u64,
                // Finished (all read: dropping `recv` stops nothing), or
                // reset or lost: nothing more to take.
                Ok(None) | Err(_) => return true,
            }
        }
        false
    };
    let ended = tokio::time::timeout(DISCARD_DEADLINE, discard)
        .await
        .unwrap_or(false);
    if !ended {
        debug!("refused request's body too long or too slow: stopped");
        let _ = recv.stop(STOP_OVERLOADED.into());
    }
}

async fn peer_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, node: &NodeShared) {
    let response = match read_frame(&mut recv, MAX_PEER_FRAME_BYTES).await {
        Err(e) => {
            let _ = recv.stop(STOP_BAD_FRAME.into());
            PeerResponse::Failed(e.to_string())
        }
        Ok(payload) => match frame::decode::<PeerEnvelope>(PEER_PROTOCOL_VERSION, &payload) {
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
