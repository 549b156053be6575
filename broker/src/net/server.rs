//! The QUIC accept loop: one endpoint, two ALPNs.
//!
//! Each connection's streams are independent: a malformed or oversized
//! frame fails only its own stream, answered with a clear error. Concurrent
//! streams per connection are bounded by the transport config.

use std::sync::Arc;

use auditflow_framing::{read_frame, write_frame};
use auditflow_protocol::frame::{self, DEFAULT_MAX_FRAME_BYTES};
use auditflow_protocol::wire::{Request, RequestError, Response, ALPN_PEER, PROTOCOL_VERSION};
use tracing::{debug, warn};

use crate::api::{client_api, peer_api};
use crate::node::NodeShared;
use crate::partition::transport::{
    PeerEnvelope, PeerResponse, MAX_PEER_FRAME_BYTES, PEER_PROTOCOL_VERSION,
};

/// QUIC application error code: the peer ALPN was used without a node
/// certificate.
const CLOSE_NOT_A_PEER: u32 = 0x10;
/// QUIC stream error code: the request frame was refused.
const STOP_BAD_FRAME: u32 = 0x11;

/// Accepts connections until the endpoint is closed.
pub async fn serve(endpoint: quinn::Endpoint, node: Arc<NodeShared>) {
    while let Some(incoming) = endpoint.accept().await {
        let node = Arc::clone(&node);
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) => handle_connection(conn, node).await,
                Err(e) => debug!("handshake failed: {e}"),
            }
        });
    }
}

async fn handle_connection(conn: quinn::Connection, node: Arc<NodeShared>) {
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
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(remote = %conn.remote_address(), "connection ended: {e}");
                return;
            }
        };
        let node = Arc::clone(&node);
        tokio::spawn(async move {
            if is_peer {
                peer_stream(send, recv, &node).await;
            } else {
                client_stream(send, recv, &node).await;
            }
        });
    }
}

async fn client_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    node: &NodeShared,
) {
    let response = match read_frame(&mut recv, DEFAULT_MAX_FRAME_BYTES).await {
        Err(e) => {
            // Stop the peer from sending the rest of an oversized body.
            let _ = recv.stop(STOP_BAD_FRAME.into());
            Response::Error(RequestError::BadRequest {
                reason: e.to_string(),
            })
        }
        Ok(payload) => match frame::decode::<Request>(PROTOCOL_VERSION, &payload) {
            Ok(request) => client_api::handle(node, request).await,
            Err(e) => Response::Error(RequestError::BadRequest {
                reason: e.to_string(),
            }),
        },
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
