//! `client.toml`: where the cluster is and how to trust it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ClientError;

/// Client configuration.
///
/// ```toml
/// seeds = ["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]
/// ca_cert = "certs/ca.pem"      # relative to this file
/// server_name = "localhost"     # name in the nodes' certificates
/// request_timeout_ms = 5000     # one attempt
/// retry_deadline_ms = 60000     # all attempts of one call
/// max_in_flight = 256           # requests outstanding at once
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Addresses of some nodes; the rest are learned from them.
    pub seeds: Vec<String>,
    /// PEM file of the CA that signed the nodes' certificates.
    pub ca_cert: PathBuf,
    /// TLS server name the nodes' certificates carry.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// Time limit of one request attempt.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Time limit of a call including its retries.
    #[serde(default = "default_retry_deadline_ms")]
    pub retry_deadline_ms: u64,
    /// Requests in flight at once from this client; more wait.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
}

fn default_server_name() -> String {
    "localhost".into()
}
fn default_request_timeout_ms() -> u64 {
    5_000
}
fn default_retry_deadline_ms() -> u64 {
    60_000
}
fn default_max_in_flight() -> usize {
    256
}

impl ClientConfig {
    /// A configuration for `seeds` trusting `ca_cert`, with defaults.
    pub fn new(seeds: Vec<String>, ca_cert: PathBuf) -> ClientConfig {
        ClientConfig {
            seeds,
            ca_cert,
            server_name: default_server_name(),
            request_timeout_ms: default_request_timeout_ms(),
            retry_deadline_ms: default_retry_deadline_ms(),
            max_in_flight: default_max_in_flight(),
        }
    }

    /// Reads a TOML file; a relative `ca_cert` is taken relative to the
    /// file's directory, so a config works from any working directory.
    pub fn load(path: &Path) -> Result<ClientConfig, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|e| ClientError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut cfg = Self::parse(&text).map_err(|reason| ClientError::Config {
            path: path.to_path_buf(),
            reason,
        })?;
        if cfg.ca_cert.is_relative() {
            if let Some(dir) = path.parent() {
                cfg.ca_cert = dir.join(&cfg.ca_cert);
            }
        }
        Ok(cfg)
    }

    /// Parses TOML text and checks the values.
    pub fn parse(text: &str) -> Result<ClientConfig, String> {
        let cfg: ClientConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if cfg.seeds.is_empty() {
            return Err("seeds: at least one node address is needed".into());
        }
        if cfg.max_in_flight == 0 {
            return Err("max_in_flight: must be at least 1".into());
        }
        if cfg.request_timeout_ms == 0 {
            return Err("request_timeout_ms: must be at least 1".into());
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_relative_ca() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.toml");
        std::fs::write(
            &path,
            "seeds = [\"127.0.0.1:1\"]\nca_cert = \"certs/ca.pem\"\n",
        )
        .unwrap();
        let cfg = ClientConfig::load(&path).unwrap();
        assert_eq!(cfg.ca_cert, dir.path().join("certs/ca.pem"));
        assert_eq!(cfg.server_name, "localhost");
        assert_eq!(cfg.request_timeout_ms, 5_000);
        assert_eq!(cfg.retry_deadline_ms, 60_000);
        assert_eq!(cfg.max_in_flight, 256);
    }

    #[test]
    fn bad_configs_say_why() {
        assert!(ClientConfig::parse("seeds = []\nca_cert = \"x\"")
            .unwrap_err()
            .contains("seeds"));
        assert!(
            ClientConfig::parse("seeds = [\"a\"]\nca_cert = \"x\"\nbogus = 1")
                .unwrap_err()
                .contains("bogus")
        );
        let err = ClientConfig::load(Path::new("/nonexistent/client.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/client.toml"));
    }
}
