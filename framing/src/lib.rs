//! Frames over QUIC streams.
//!
//! One request per bidirectional stream: the requester writes one frame and
//! finishes its side; the responder answers with one frame. The client
//! library and the broker's `net` module (client and peer streams) share
//! these functions; they live in a crate of their own so that the broker
//! does not depend on the client library. The frame layout itself is
//! `auditflow_protocol::frame` (no I/O there).

use auditflow_protocol::frame::{self, FrameError, HEADER_BYTES};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The frame header or body is invalid (too large, too short).
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The stream ended before a whole frame arrived.
    #[error("stream ended after {got} of {want} bytes")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The QUIC stream failed (reset, connection lost).
    #[error("stream: {0}")]
    Stream(String),
}

/// Reads one frame and returns its payload (version and body, without the
/// length header), refusing a declared length over `max` before reading
/// the body.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Vec<u8>, TransportError> {
    let len = read_frame_len(recv, max).await?;
    read_frame_payload(recv, len).await
}

/// Reads a frame's header: the payload length, refused over `max`. With
/// [`read_frame_payload`], for a reader that decides whether it has room
/// for the payload before reading it.
pub async fn read_frame_len(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<usize, TransportError> {
    let mut header = [0u8; HEADER_BYTES];
    read_exact(recv, &mut header).await?;
    Ok(frame::payload_len(header, max)?)
}

/// Reads a payload of `len` bytes, the rest of a frame whose header
/// [`read_frame_len`] read.
pub async fn read_frame_payload(
    recv: &mut quinn::RecvStream,
    len: usize,
) -> Result<Vec<u8>, TransportError> {
    let mut payload = vec![0u8; len];
    read_exact(recv, &mut payload).await?;
    Ok(payload)
}

async fn read_exact(recv: &mut quinn::RecvStream, buf: &mut [u8]) -> Result<(), TransportError> {
    use quinn::ReadExactError;
    match recv.read_exact(buf).await {
        Ok(()) => Ok(()),
        Err(ReadExactError::FinishedEarly(got)) => Err(TransportError::Truncated {
            got,
            want: buf.len(),
        }),
        Err(ReadExactError::ReadError(e)) => Err(TransportError::Stream(e.to_string())),
    }
}

/// Writes an encoded frame and finishes the stream.
pub async fn write_frame(send: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), TransportError> {
    send.write_all(bytes)
        .await
        .map_err(|e| TransportError::Stream(e.to_string()))?;
    send.finish()
        .map_err(|e| TransportError::Stream(e.to_string()))?;
    Ok(())
}
