//! The settings of a syslog destination.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Syslog severities (RFC 5424 §6.2.1), named as in syslog.conf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// 0: system is unusable.
    Emerg = 0,
    /// 1: action must be taken immediately.
    Alert = 1,
    /// 2: critical conditions.
    Crit = 2,
    /// 3: error conditions.
    Err = 3,
    /// 4: warning conditions.
    Warning = 4,
    /// 5: normal but significant condition.
    Notice = 5,
    /// 6: informational messages.
    Info = 6,
    /// 7: debug-level messages.
    Debug = 7,
}

impl Severity {
    /// The numeric code.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// Severity per event outcome, so a SIEM can alert on refusals and errors
/// by syslog severity alone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeverityMap {
    /// Outcome `success` (default `info`).
    #[serde(default = "default_success")]
    pub success: Severity,
    /// Outcome `failure`: the action was tried and failed (default
    /// `notice`).
    #[serde(default = "default_failure")]
    pub failure: Severity,
    /// Outcome `denied`: an authorisation refusal, worth a look (default
    /// `warning`).
    #[serde(default = "default_denied")]
    pub denied: Severity,
    /// Outcome `error` (default `err`).
    #[serde(default = "default_error")]
    pub error: Severity,
}

fn default_success() -> Severity {
    Severity::Info
}
fn default_failure() -> Severity {
    Severity::Notice
}
fn default_denied() -> Severity {
    Severity::Warning
}
fn default_error() -> Severity {
    Severity::Err
}

impl Default for SeverityMap {
    fn default() -> Self {
        SeverityMap {
            success: default_success(),
            failure: default_failure(),
            denied: default_denied(),
            error: default_error(),
        }
    }
}

impl SeverityMap {
    /// The severity of an outcome; `notice` when it is missing or unknown
    /// (masked away), so such events are neither hidden nor alarming.
    pub fn for_outcome(&self, outcome: Option<&str>) -> Severity {
        match outcome {
            Some("success") => self.success,
            Some("failure") => self.failure,
            Some("denied") => self.denied,
            Some("error") => self.error,
            _ => Severity::Notice,
        }
    }
}

/// TLS settings (RFC 5425). TLS 1.2 and 1.3 only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA certificate(s) the receiver's certificate must
    /// chain to. The system roots are not used: syslog receivers usually
    /// have certificates from a private CA.
    pub ca_cert: PathBuf,
    /// The name the receiver's certificate must carry (DNS name or IP).
    pub server_name: String,
}

/// Settings of a syslog destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Receiver address, `host:port` (a name is resolved at each connect,
    /// so a moved receiver is found again).
    pub addr: String,
    /// TLS; plain TCP if absent.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// APP-NAME of every message (default `auditflow`), what receivers
    /// filter on: 1 to 48 printable ASCII characters.
    #[serde(default = "default_app_name")]
    pub app_name: String,
    /// HOSTNAME of every message; the system host name if absent (`-` if
    /// that is unknown or not printable ASCII).
    #[serde(default)]
    pub hostname: Option<String>,
    /// Facility code, 0 to 23 (default 13, "log audit").
    #[serde(default = "default_facility")]
    pub facility: u8,
    /// Severity per event outcome.
    #[serde(default)]
    pub severity: SeverityMap,
    /// Put a UTF-8 BOM before each JSON body, as RFC 5424 §6.4 suggests
    /// (default off: many receivers keep it as three stray bytes in front
    /// of the JSON, which breaks their JSON parsing).
    #[serde(default)]
    pub utf8_bom: bool,
    /// Time limit of connecting, TLS handshake included (default 5 s).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time limit of writing and flushing one batch (default 10 s): a
    /// receiver that stops reading fills the TCP window, and without a
    /// limit the destination would hang instead of retrying.
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
}

fn default_app_name() -> String {
    "auditflow".into()
}
fn default_facility() -> u8 {
    13
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_write_timeout_ms() -> u64 {
    10_000
}
