//! The connection to the receiver: plain or TLS (RFC 5425), and the
//! check that the receiver has not closed it.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsConnector;

use super::config::TlsConfig;

/// Reads done at most when checking whether the receiver closed the
/// connection. Receivers do not talk in syslog; a bound keeps a chatty
/// one from holding the sender in the check.
const LIVENESS_READS_MAX: usize = 16;

/// A connection, plain or TLS. `Sync` so that `&SyslogSink` is `Send`
/// across awaits (the sink future must be `Send`).
pub(super) trait Stream: AsyncRead + AsyncWrite + Send + Sync + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> Stream for T {}

/// A ready TLS client.
pub(super) struct Tls {
    /// Client configuration with the destination's CA.
    pub(super) connector: TlsConnector,
    /// The name to verify.
    pub(super) server_name: ServerName<'static>,
}

pub(super) fn load_tls(c: &TlsConfig) -> Result<Tls, String> {
    let path = c.ca_cert.display();
    let pem = std::fs::read(&c.ca_cert).map_err(|e| format!("tls.ca_cert {path}: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| format!("tls.ca_cert {path}: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("tls.ca_cert {path}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("tls.ca_cert {path}: no PEM certificate in it"));
    }
    // An explicit provider rather than the process default, so the sink
    // does not depend on who installed what first.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server_name = ServerName::try_from(c.server_name.clone())
        .map_err(|e| format!("tls.server_name {:?}: {e}", c.server_name))?;
    Ok(Tls {
        connector: TlsConnector::from(Arc::new(config)),
        server_name,
    })
}

/// Whether the receiver has closed or broken the connection: one
/// non-waiting read. `Some(why)` if the connection is unusable.
pub(super) async fn peer_gone(conn: &mut dyn Stream) -> Option<String> {
    let mut scratch = [0u8; 512];
    poll_fn(|cx| {
        for _ in 0..LIVENESS_READS_MAX {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *conn).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Ready(None),
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    return Poll::Ready(Some("closed by the receiver".to_string()))
                }
                // Unexpected bytes from the receiver: ignore them.
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Some(e.to_string())),
            }
        }
        Poll::Ready(None)
    })
    .await
}
