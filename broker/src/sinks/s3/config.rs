//! The settings of an S3 destination and their checks.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Settings of an S3 destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Base URL of the S3 API: `https://s3.eu-west-1.amazonaws.com`,
    /// `http://127.0.0.1:9000` (MinIO), ... A path after the host is kept
    /// (a proxy mounting S3 under a path).
    pub endpoint: String,
    /// Signing region. MinIO and most compatible servers accept the default.
    #[serde(default = "default_region")]
    pub region: String,
    /// Bucket to write to. It must exist: the sink never creates buckets
    /// (that needs broader rights than writing objects).
    pub bucket: String,
    /// Key prefix (a "folder"); empty puts partitions at the bucket's root.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Access key id of credentials that may `s3:PutObject` under the prefix.
    pub access_key_id: String,
    /// Its secret.
    pub secret_access_key: String,
    /// Session token of temporary (STS) credentials, if they are.
    #[serde(default)]
    pub session_token: Option<String>,
    /// Path-style URLs (`endpoint/bucket/key`), which every S3-compatible
    /// server understands and which need no wildcard DNS; `false` for
    /// virtual-hosted style (`bucket.endpoint/key`).
    #[serde(default = "default_path_style")]
    pub path_style: bool,
    /// Time limit of one request.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Extra CA certificate (PEM) to trust for an https endpoint.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
}

fn default_region() -> String {
    "us-east-1".into()
}

fn default_prefix() -> String {
    "auditflow".into()
}

fn default_path_style() -> bool {
    true
}

fn default_timeout_ms() -> u64 {
    30_000
}

/// Longest key S3 accepts, in bytes.
const KEY_BYTES_MAX: usize = 1024;

/// Longest prefix we accept: leaves room for the partition and offsets
/// part of the key (`/p00000/` + 2 × 20 digits + `-` + `.ndjson` = 56).
const PREFIX_BYTES_MAX: usize = KEY_BYTES_MAX - 64;

/// Checks a bucket name against S3's rules (3–63 of `a-z 0-9 . -`,
/// starting and ending with a letter or digit).
pub(super) fn check_bucket(bucket: &str) -> Result<(), String> {
    let ok_len = (3..=63).contains(&bucket.len());
    let ok_chars = bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    let ends = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok_len && ok_chars && ends(bucket.bytes().next()) && ends(bucket.bytes().last()) {
        Ok(())
    } else {
        Err(format!(
            "bucket {bucket:?}: 3 to 63 of a-z, 0-9, `.`, `-`, starting and ending with a letter or digit"
        ))
    }
}

/// Checks the prefix and returns it without surrounding `/`.
pub(super) fn check_prefix(prefix: &str) -> Result<String, String> {
    let trimmed = prefix.trim_matches('/');
    if trimmed.len() > PREFIX_BYTES_MAX {
        return Err(format!("prefix is longer than {PREFIX_BYTES_MAX} bytes"));
    }
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    for segment in trimmed.split('/') {
        // Empty, `.` and `..` segments are rewritten by some servers and
        // proxies, which would put objects where readers do not look.
        let ok = !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'=' | b'+')
            });
        if !ok {
            return Err(format!(
                "prefix {prefix:?}: segments of letters, digits, `-`, `_`, `.`, `=`, `+` separated by single `/`"
            ));
        }
    }
    Ok(trimmed.to_string())
}
