//! Frames over QUIC streams (re-exported from `auditflow-framing`), and the
//! client-side TLS configuration.

use std::sync::Arc;
use std::time::Duration;

pub use auditflow_framing::{read_frame, write_frame, TransportError};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why a client TLS configuration could not be built from the given CA and
/// identity (an unreadable or empty CA file, a key that does not match).
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(pub String);

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
) -> Result<quinn::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let mut reader = ca_pem;
    let mut found = 0;
    for cert in rustls_pemfile::certs(&mut reader) {
        let cert = cert.map_err(|e| TlsError(format!("CA certificate: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| TlsError(format!("CA certificate: {e}")))?;
        found += 1;
    }
    if found == 0 {
        return Err(TlsError("no certificate in the CA file".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(e.to_string()))?
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}
