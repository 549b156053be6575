//! Length-prefixed framing of wire messages.
//!
//! ```text
//! frame   = u32_be(len(payload)) payload
//! payload = u16_be(version) bincode2_standard(message)
//! ```
//!
//! The length is checked against a maximum before any byte of the payload is
//! read, so an oversized or garbage header costs nothing but the four bytes.
//! The version sits outside the bincode body so that a peer speaking another
//! version gets a clear `UnsupportedVersion` rather than a decode error.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Bytes of the length header.
pub const HEADER_BYTES: usize = 4;
/// Bytes of the version prefix inside the payload.
pub const VERSION_BYTES: usize = 2;
/// Default largest payload: a 4 MiB batch plus generous room for the
/// envelope and per-event overhead of bincode.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;
/// Hard ceiling bincode enforces while decoding, whatever the configured
/// maximum: no message may make the decoder claim more than this.
const DECODE_LIMIT_BYTES: usize = 64 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT_BYTES>()
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The declared or actual payload exceeds the maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Declared payload length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A payload too short to hold the version prefix.
    #[error("frame of {len} bytes is too short to hold a version")]
    TooShort {
        /// Payload length.
        len: usize,
    },
    /// The peer speaks a protocol version we do not.
    #[error("unsupported protocol version {got} (this side speaks {supported})")]
    UnsupportedVersion {
        /// Version found in the frame.
        got: u16,
        /// Version this side speaks.
        supported: u16,
    },
    /// The body is not a valid encoding of the expected message.
    #[error("malformed frame body: {0}")]
    Malformed(String),
    /// The body decoded but left bytes unread.
    #[error("malformed frame body: {0} trailing bytes")]
    Trailing(usize),
    /// The message could not be encoded (a programming error).
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// Encodes `msg` as a complete frame (header included).
pub fn encode<T: Serialize>(version: u16, msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER_BYTES];
    out.extend_from_slice(&version.to_be_bytes());
    let body = bincode::serde::encode_to_vec(msg, config())
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    out.extend_from_slice(&body);
    let len = out.len() - HEADER_BYTES;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let len32 = u32::try_from(len).map_err(|_| FrameError::TooLarge { len, max })?;
    out[..HEADER_BYTES].copy_from_slice(&len32.to_be_bytes());
    Ok(out)
}

/// Reads the payload length from a header, refusing lengths over `max`.
pub fn payload_len(header: [u8; HEADER_BYTES], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if len < VERSION_BYTES {
        return Err(FrameError::TooShort { len });
    }
    Ok(len)
}

/// Decodes a payload (without its header) of the given protocol version.
pub fn decode<T: DeserializeOwned>(supported: u16, payload: &[u8]) -> Result<T, FrameError> {
    if payload.len() < VERSION_BYTES {
        return Err(FrameError::TooShort { len: payload.len() });
    }
    let got = u16::from_be_bytes([payload[0], payload[1]]);
    if got != supported {
        return Err(FrameError::UnsupportedVersion { got, supported });
    }
    let body = &payload[VERSION_BYTES..];
    let (msg, used) = bincode::serde::decode_from_slice::<T, _>(body, config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(FrameError::Trailing(body.len() - used));
    }
    Ok(msg)
}

/// Splits a complete frame into its payload, checking header and length.
pub fn payload_of(frame: &[u8], max: usize) -> Result<&[u8], FrameError> {
    if frame.len() < HEADER_BYTES {
        return Err(FrameError::TooShort { len: frame.len() });
    }
    let mut header = [0u8; HEADER_BYTES];
    header.copy_from_slice(&frame[..HEADER_BYTES]);
    let len = payload_len(header, max)?;
    let payload = &frame[HEADER_BYTES..];
    if payload.len() != len {
        return Err(FrameError::Malformed(format!(
            "header says {len} bytes, frame holds {}",
            payload.len()
        )));
    }
    Ok(payload)
}
