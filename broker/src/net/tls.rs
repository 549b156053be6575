//! TLS for the node: dev certificate generation (rcgen) and the rustls
//! configurations of the QUIC endpoint.
//!
//! One endpoint serves two ALPNs. Clients authenticate the node against the
//! cluster CA; nodes additionally present their certificate to each other,
//! and the peer ALPN is refused to a connection without a CA-signed client
//! certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use auditflow_protocol::wire::{ALPN_CLIENT, ALPN_PEER};
use hmac::{Hmac, Mac};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Sha256;

use crate::config::TlsConfig;

/// Validity of generated dev certificates: long enough never to expire
/// under a developer, short enough to be obviously not production material.
const DEV_CERT_VALIDITY_DAYS: i64 = 365;

/// Why TLS material could not be loaded or generated.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the expected kind.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A certificate is outside its validity period.
    #[error("{path}: certificate is not valid now (valid {not_before} .. {not_after})")]
    Expired {
        /// The file.
        path: PathBuf,
        /// Start of validity.
        not_before: String,
        /// End of validity.
        not_after: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// The client-certificate verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(String),
    /// quinn refused the crypto configuration.
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Loads every certificate of a PEM file, refusing one outside its validity
/// period with a clear error rather than a failed handshake later.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: format!("unreadable PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            reason: "no certificate found".into(),
        });
    }
    for cert in &certs {
        check_validity(path, cert)?;
    }
    Ok(certs)
}

fn check_validity(path: &Path, cert: &CertificateDer<'_>) -> Result<(), TlsError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: format!("not an X.509 certificate: {e}"),
        })?;
    let validity = parsed.validity();
    if !validity.is_valid() {
        return Err(TlsError::Expired {
            path: path.to_owned(),
            not_before: validity.not_before.to_string(),
            not_after: validity.not_after.to_string(),
        });
    }
    Ok(())
}

/// Loads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: format!("unreadable PEM: {e}"),
        })?
        .ok_or_else(|| TlsError::Pem {
            path: path.to_owned(),
            reason: "no private key found".into(),
        })
}

fn root_store(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// QUIC transport settings shared by server and peer client: keep-alives
/// well inside the idle timeout, so a silent (killed, paused, cut off) peer
/// is detected within seconds and a live idle one is never dropped.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(1000)));
    // 5 s: several missed keep-alives, yet fast failover for clients.
    t.max_idle_timeout(Some(quinn::VarInt::from_u32(5_000).into()));
    // Bounds concurrent requests per connection (one stream each): this is
    // the per-connection backpressure of the request path.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t
}

/// The endpoint's server configuration: both ALPNs, optional client certs,
/// and at most `receive_window_bytes` buffered unread per connection and
/// per stream (quinn's own default lets a connection buffer 1.25 MB per
/// stream, over a thousand streams: no bound a node could budget for).
pub fn server_config(
    tls: &TlsConfig,
    receive_window_bytes: u64,
) -> Result<quinn::ServerConfig, TlsError> {
    let certs = load_certs(&tls.cert)?;
    let key = load_key(&tls.key)?;
    let roots = Arc::new(root_store(&tls.ca_cert)?);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![ALPN_CLIENT.to_vec(), ALPN_PEER.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = transport_config();
    let window = quinn::VarInt::from_u32(u32::try_from(receive_window_bytes).unwrap_or(u32::MAX));
    transport.receive_window(window);
    transport.stream_receive_window(window);
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// The endpoint's configuration: its stateless-reset key (RFC 9000
/// §10.3) and the key its connection ids are validated with are derived
/// from the node's private key instead of drawn at random, so they are the
/// same after a restart.
///
/// A node killed and restarted at once comes back on the same address
/// before its peers' connections to it have timed out (5 s idle). Those
/// peers keep sending on the old connections. With random keys the new
/// process took their connection ids for noise and dropped the packets,
/// and the peers waited out the idle timeout: Raft sent nothing to the
/// restarted node for 5 s, long enough for it to time out and start
/// elections (the partitions its peers led went from term 1 to 3 in a
/// manual kill -9 and restart 0.2 s later under load, with a 6 s p99 for
/// appends). With these keys it recognises the ids as its own and answers
/// with a stateless reset whose token matches what the old process
/// announced, so the peer drops the connection at once and reconnects.
pub fn endpoint_config(tls: &TlsConfig) -> Result<quinn::EndpointConfig, TlsError> {
    let key = load_key(&tls.key)?;
    let secret = key.secret_der();
    let reset_key = ResetKey::new(&derive_key(secret, b"QUIC stateless reset key")?)?;
    let cid_secret = derive_key(secret, b"QUIC connection id key")?;
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid_secret[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(config)
}

/// A key for one use, derived from the node's private key: the private key
/// itself is never an HMAC key, only an input to one, under a label naming
/// the use.
fn derive_key(secret: &[u8], label: &[u8]) -> Result<[u8; 32], TlsError> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(invalid_key)?;
    mac.update(b"auditflow v1 ");
    mac.update(label);
    Ok(mac.finalize().into_bytes().into())
}

fn invalid_key(e: hmac::digest::InvalidLength) -> TlsError {
    TlsError::Quic(format!("derived key: {e}"))
}

/// HMAC-SHA256 under the derived reset key; quinn computes each connection
/// id's reset token with it.
struct ResetKey(Hmac<Sha256>);

impl ResetKey {
    fn new(key: &[u8; 32]) -> Result<ResetKey, TlsError> {
        Ok(ResetKey(
            Hmac::<Sha256>::new_from_slice(key).map_err(invalid_key)?,
        ))
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let mut mac = self.0.clone();
        mac.update(data);
        signature_out.copy_from_slice(&mac.finalize().into_bytes());
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let mut mac = self.0.clone();
        mac.update(data);
        mac.verify_slice(signature)
            .map_err(|_| quinn::crypto::CryptoError)
    }
}

/// The client configuration a node uses towards its peers: peer ALPN, the
/// node certificate as client identity.
pub fn peer_client_config(tls: &TlsConfig) -> Result<quinn::ClientConfig, TlsError> {
    let certs = load_certs(&tls.cert)?;
    let key = load_key(&tls.key)?;
    let roots = root_store(&tls.ca_cert)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)?;
    cfg.alpn_protocols = vec![ALPN_PEER.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport_config()));
    Ok(client)
}

/// File names of generated dev certificates, relative to their directory.
#[derive(Debug, Clone)]
pub struct DevCertPaths {
    /// CA certificate.
    pub ca_cert: PathBuf,
    /// Per node: (certificate, key).
    pub nodes: Vec<(PathBuf, PathBuf)>,
}

/// Generates a dev CA and one certificate per node id into `dir`, unless
/// they already exist (so `up` on the same directory keeps its identity).
/// Certificates name `localhost`, `127.0.0.1`, `::1` and
/// `auditflow-node-<id>`.
pub fn ensure_dev_certs(dir: &Path, node_ids: &[u64]) -> Result<DevCertPaths, TlsError> {
    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca.key");
    let nodes: Vec<(PathBuf, PathBuf)> = node_ids
        .iter()
        .map(|id| {
            (
                dir.join(format!("node{id}.pem")),
                dir.join(format!("node{id}.key")),
            )
        })
        .collect();
    let paths = DevCertPaths {
        ca_cert: ca_cert.clone(),
        nodes: nodes.clone(),
    };
    let all_exist =
        ca_cert.exists() && ca_key.exists() && nodes.iter().all(|(c, k)| c.exists() && k.exists());
    if all_exist {
        return Ok(paths);
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let ca_params = dev_ca_params()?;
    let ca_keypair = rcgen::KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_keypair)?;
    write(&ca_cert, ca.pem().as_bytes())?;
    write(&ca_key, ca_keypair.serialize_pem().as_bytes())?;
    let issuer = rcgen::Issuer::new(ca_params, ca_keypair);
    for (id, (cert_path, key_path)) in node_ids.iter().zip(&nodes) {
        issue_dev_node_cert(&issuer, *id, cert_path, key_path)?;
    }
    Ok(paths)
}

/// Gives node `id` of the dev certificates in `dir` a new key and a
/// certificate for it, signed by the existing dev CA (a certificate
/// rotation, as a deployment would do it); returns (certificate, key).
pub fn renew_dev_node_cert(dir: &Path, id: u64) -> Result<(PathBuf, PathBuf), TlsError> {
    let ca_key_path = dir.join("ca.key");
    let ca_key_pem = String::from_utf8(read(&ca_key_path)?).map_err(|e| TlsError::Pem {
        path: ca_key_path.clone(),
        reason: format!("not UTF-8: {e}"),
    })?;
    let ca_keypair = rcgen::KeyPair::from_pem(&ca_key_pem)?;
    // The CA's name and key are all a signature by it needs.
    let issuer = rcgen::Issuer::new(dev_ca_params()?, ca_keypair);
    let cert = dir.join(format!("node{id}.pem"));
    let key = dir.join(format!("node{id}.key"));
    issue_dev_node_cert(&issuer, id, &cert, &key)?;
    Ok((cert, key))
}

fn dev_ca_params() -> Result<rcgen::CertificateParams, TlsError> {
    let now = time::OffsetDateTime::now_utc();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "auditflow dev CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = now - time::Duration::days(1);
    ca_params.not_after = now + time::Duration::days(DEV_CERT_VALIDITY_DAYS);
    Ok(ca_params)
}

fn issue_dev_node_cert(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    id: u64,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), TlsError> {
    let now = time::OffsetDateTime::now_utc();
    let mut params = rcgen::CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
        format!("auditflow-node-{id}"),
    ])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("auditflow-node-{id}"));
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(DEV_CERT_VALIDITY_DAYS);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    write(cert_path, cert.pem().as_bytes())?;
    write(key_path, key.serialize_pem().as_bytes())?;
    Ok(())
}

fn write(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    std::fs::write(path, data).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use quinn::crypto::HmacKey;

    use super::*;

    /// Dev certificates for `ids` in `dir`, and node `ids[0]`'s TLS config.
    fn dev_tls(dir: &Path, ids: &[u64]) -> (DevCertPaths, TlsConfig) {
        let paths = ensure_dev_certs(dir, ids).unwrap();
        let (cert, key) = paths.nodes[0].clone();
        let tls = TlsConfig {
            ca_cert: paths.ca_cert.clone(),
            cert,
            key,
            server_name: "localhost".into(),
        };
        (paths, tls)
    }

    fn token(key: &ResetKey, cid: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        key.sign(cid, &mut out);
        out
    }

    /// A restarted node must compute the reset tokens its previous process
    /// announced: the same private key gives the same keys, another key
    /// others, and the two uses never share one.
    #[test]
    fn derived_keys_are_stable_per_private_key_and_use() {
        let a = derive_key(b"node key a", b"QUIC stateless reset key").unwrap();
        let a_again = derive_key(b"node key a", b"QUIC stateless reset key").unwrap();
        let b = derive_key(b"node key b", b"QUIC stateless reset key").unwrap();
        let a_cid = derive_key(b"node key a", b"QUIC connection id key").unwrap();
        assert_eq!(a, a_again);
        assert_ne!(a, b);
        assert_ne!(a, a_cid);

        let (ka, ka_again, kb) = (
            ResetKey::new(&a).unwrap(),
            ResetKey::new(&a_again).unwrap(),
            ResetKey::new(&b).unwrap(),
        );
        let cid = [7u8; 8];
        assert_eq!(token(&ka, &cid), token(&ka_again, &cid));
        assert_ne!(token(&ka, &cid), token(&kb, &cid));
        assert!(ka_again.verify(&cid, &token(&ka, &cid)).is_ok());
        assert!(kb.verify(&cid, &token(&ka, &cid)).is_err());
    }

    /// A renewed node certificate comes with a new key, and the pair is
    /// usable (a mismatched pair is refused by rustls); the CA is kept.
    #[test]
    fn renewing_a_node_certificate_changes_its_key_and_keeps_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, tls) = dev_tls(dir.path(), &[1, 2]);
        let (cert, key) = (tls.cert.clone(), tls.key.clone());
        let before = (
            std::fs::read(&key).unwrap(),
            std::fs::read(&paths.ca_cert).unwrap(),
        );
        assert_eq!(
            renew_dev_node_cert(dir.path(), 1).unwrap(),
            (cert.clone(), key.clone())
        );
        let after = (
            std::fs::read(&key).unwrap(),
            std::fs::read(&paths.ca_cert).unwrap(),
        );
        assert_ne!(before.0, after.0, "a new key");
        assert_eq!(before.1, after.1, "the same CA");
        assert!(server_config(&tls, 512 * 1024).is_ok());
    }

    /// The endpoint configuration is built from a real generated node key.
    #[test]
    fn endpoint_config_loads_the_node_key() {
        let dir = tempfile::tempdir().unwrap();
        let (_, tls) = dev_tls(dir.path(), &[1]);
        assert!(endpoint_config(&tls).is_ok());
        let missing = TlsConfig {
            key: dir.path().join("absent.key"),
            ..tls
        };
        assert!(matches!(
            endpoint_config(&missing),
            Err(TlsError::Io { .. })
        ));
    }
}
