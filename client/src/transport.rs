//! Frames over QUIC streams, and the client-side TLS configuration.
//!
//! One request per bidirectional stream: the requester writes one frame and
//! finishes its side; the responder answers with one frame. The broker uses
//! these same functions for both its client and peer streams.

use std::sync::Arc;
use std::time::Duration;

use auditflow_protocol::frame::{self, FrameError, HEADER_BYTES};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why a frame could not be read or written, or TLS set up.
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
    /// TLS material is invalid.
    #[error("TLS: {0}")]
    Tls(String),
}

/// Reads one frame and returns its payload (version and body, without the
/// length header), refusing a declared length over `max` before reading
/// the body.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Vec<u8>, TransportError> {
    let mut header = [0u8; HEADER_BYTES];
    read_exact(recv, &mut header).await?;
    let len = frame::payload_len(header, max)?;
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

/// QUIC transport settings shared by clients: detect a dead node within
/// seconds so requests fail over instead of hanging.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(5)) {
        t.max_idle_timeout(Some(idle));
    }
    t.max_concurrent_bidi_streams(1024u32.into());
    t
}

/// A QUIC client configuration trusting only the CA in `ca_pem` (TLS 1.3),
/// optionally presenting a client certificate, speaking `alpn`.
pub fn client_tls_config(
    ca_pem: &[u8],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    let mut reader = ca_pem;
    let mut found = 0;
    for cert in rustls_pemfile::certs(&mut reader) {
        let cert = cert.map_err(|e| TransportError::Tls(format!("CA certificate: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| TransportError::Tls(format!("CA certificate: {e}")))?;
        found += 1;
    }
    if found == 0 {
        return Err(TransportError::Tls("no certificate in the CA file".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| TransportError::Tls(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}
