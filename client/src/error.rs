//! Client errors.

use std::path::PathBuf;

use auditflow_protocol::frame::FrameError;
use auditflow_protocol::wire::{EventError, RequestError};

use crate::transport::TransportError;

/// Why a client call failed as a whole.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The configuration file is missing or invalid.
    #[error("client config {}: {reason}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// TLS material is invalid.
    #[error("TLS: {0}")]
    Tls(String),
    /// A node could not be reached or refused the handshake.
    #[error("connect to {addr}: {reason}")]
    Connect {
        /// The node.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The TLS handshake failed: the node's certificate is not signed by
    /// the configured CA (or has expired), or the node refused ours.
    /// Retrying cannot fix this, so it is reported at once.
    #[error("TLS handshake with {addr} failed (check the CA certificate in the client config): {reason}")]
    Handshake {
        /// The node.
        addr: String,
        /// What TLS reported.
        reason: String,
    },
    /// A node did not answer in time.
    #[error("{addr} did not answer within {ms} ms")]
    Timeout {
        /// The node.
        addr: String,
        /// The limit.
        ms: u64,
    },
    /// A stream or frame failed.
    #[error("{addr}: {reason}")]
    Transport {
        /// The node.
        addr: String,
        /// Why.
        reason: String,
    },
    /// A response frame did not decode.
    #[error("{addr} sent a bad response: {source}")]
    Frame {
        /// The node.
        addr: String,
        /// The decoder's complaint.
        source: FrameError,
    },
    /// The node refused the request.
    #[error("{0}")]
    Server(RequestError),
    /// The node answered with a response of the wrong kind.
    #[error("{addr} answered with an unexpected response: {what}")]
    Unexpected {
        /// The node.
        addr: String,
        /// What came back.
        what: String,
    },
    /// No node is known or reachable.
    #[error("no reachable node (tried {tried})")]
    NoNodes {
        /// Addresses tried.
        tried: String,
    },
    /// Retries ran out of time.
    #[error("gave up after {ms} ms of retries; last error: {last}")]
    DeadlineExceeded {
        /// The deadline.
        ms: u64,
        /// The last attempt's error.
        last: String,
    },
}

impl ClientError {
    /// Whether another attempt (perhaps on another node) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::Timeout { .. }
            | ClientError::Transport { .. }
            | ClientError::NoNodes { .. } => true,
            ClientError::Server(e) => e.is_retryable(),
            _ => false,
        }
    }

    pub(crate) fn transport(addr: &str, e: TransportError) -> ClientError {
        ClientError::Transport {
            addr: addr.to_string(),
            reason: e.to_string(),
        }
    }
}

/// Why one appended event was not stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// The cluster refused this event (invalid, id reused, wrong partition).
    #[error("rejected: {0}")]
    Rejected(EventError),
    /// The request failed (after retries).
    #[error("{0}")]
    Failed(ClientError),
}
