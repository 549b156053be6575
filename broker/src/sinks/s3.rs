//! S3-compatible object storage (AWS S3, MinIO, Ceph RGW, ...): one NDJSON
//! object per batch.
//!
//! Key: `{prefix}/p{partition:05}/{first_offset:020}-{last_offset:020}.ndjson`.
//! Offsets are zero-padded so keys list in offset order, and a re-sent
//! identical batch (after a retry or a leader change) overwrites the same
//! key instead of adding a copy (G3). A batch re-sent with different bounds
//! (the batch size changed) makes overlapping objects: readers deduplicate
//! on the event id, as with any at-least-once source.
//!
//! Each line is one [`Delivery::body`]. Headers: `content-type:
//! application/x-ndjson`, and user metadata `x-amz-meta-first-event-id`,
//! `-last-event-id`, `-partition`, `-first-offset`, `-last-offset`,
//! `-count`. Event ids are producer-chosen and S3 metadata must be visible
//! ASCII, so `%`, spaces, control and non-ASCII bytes in them are
//! percent-encoded (`%XX`); plain ids (UUIDs) are unchanged.
//!
//! Requests are signed with AWS Signature Version 4, written here over the
//! HMAC and SHA-256 crates the node already has. Why not a crate: `aws-sigv4`
//! 1.6 needs a newer rustc than the workspace's 1.85 and brings the smithy
//! runtime; `object_store` and `rust-s3` retry with their own backoff and
//! fold HTTP statuses into their error types, while the delivery actor owns
//! retries and we need the S3 error code to classify. One signed `PUT` is a
//! small, fully specified algorithm; the unit tests check it against AWS's
//! published examples and the integration test against a server that
//! verifies signatures.
//!
//! Classification: transport errors, 5xx (503 SlowDown), 408, 409 and 429
//! are transient. 403 (AccessDenied, SignatureDoesNotMatch, ...), 404
//! (NoSuchBucket) and the 400/301 codes that mean wrong credentials, region
//! or endpoint are configuration problems an operator fixes: *retryable*,
//! with a message saying what to fix, because parking good events for them
//! would be wrong. Other 4xx (malformed request, entity too large) are
//! permanent.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    excerpt, http, Delivery, FailureKind, SendOutcome, Sink, SinkConfigError, SinkFailure,
};

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

/// Longest error body read from a failed request: enough for S3's XML
/// error document, bounded whatever the server sends.
const ERROR_BODY_BYTES_MAX: usize = 16 * 1024;

/// The S3 sink.
pub struct S3Sink {
    config: Config,
    /// The prefix without leading/trailing `/`.
    prefix: String,
    /// Endpoint URL, checked.
    endpoint: reqwest::Url,
    client: reqwest::Client,
}

/// The object key of a batch.
pub fn object_key(prefix: &str, partition: u32, first_offset: u64, last_offset: u64) -> String {
    let name = format!("p{partition:05}/{first_offset:020}-{last_offset:020}.ndjson");
    if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    }
}

/// Percent-encodes as SigV4 wants: everything but RFC 3986 unreserved
/// characters, and `/` too unless `keep_slash`.
fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let unreserved = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~');
        if unreserved || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A metadata value: visible ASCII stays, `%` and anything else is `%XX`.
fn metadata_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length: new_from_slice cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return Vec::new();
    };
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// What SigV4 signs of one request.
pub struct SigningInput<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// The path exactly as sent (already percent-encoded).
    pub canonical_uri: &'a str,
    /// The canonical query string (empty for a plain PUT).
    pub canonical_query: &'a str,
    /// Headers to sign, names lowercase; must include `host`,
    /// `x-amz-date` and `x-amz-content-sha256`.
    pub headers: &'a [(String, String)],
    /// Hex SHA-256 of the payload (the `x-amz-content-sha256` value).
    pub payload_sha256: &'a str,
    /// `YYYYMMDDTHHMMSSZ`, the `x-amz-date` value.
    pub amz_date: &'a str,
    /// Signing region.
    pub region: &'a str,
    /// Service (`s3`).
    pub service: &'a str,
    /// Access key id.
    pub access_key_id: &'a str,
    /// Secret access key.
    pub secret_access_key: &'a str,
}

/// The `Authorization` header value (AWS Signature Version 4,
/// <https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html>).
pub fn authorization(input: &SigningInput<'_>) -> String {
    let mut headers: Vec<(String, String)> = input
        .headers
        .iter()
        .map(|(k, v)| {
            // Canonical value: trimmed, inner runs of spaces collapsed.
            let value = v.split_whitespace().collect::<Vec<_>>().join(" ");
            (k.to_ascii_lowercase(), value)
        })
        .collect();
    headers.sort();
    let signed_headers = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let mut canonical = format!(
        "{}\n{}\n{}\n",
        input.method, input.canonical_uri, input.canonical_query
    );
    for (k, v) in &headers {
        let _ = writeln!(canonical, "{k}:{v}");
    }
    let _ = write!(canonical, "\n{signed_headers}\n{}", input.payload_sha256);
    let date = input.amz_date.get(..8).unwrap_or(input.amz_date);
    let scope = format!("{date}/{}/{}/aws4_request", input.region, input.service);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
        input.amz_date,
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let k_date = hmac_sha256(
        format!("AWS4{}", input.secret_access_key).as_bytes(),
        date.as_bytes(),
    );
    let k_region = hmac_sha256(&k_date, input.region.as_bytes());
    let k_service = hmac_sha256(&k_region, input.service.as_bytes());
    let k_signing = hmac_sha256(&k_service, b"aws4_request");
    let signature = hex::encode(hmac_sha256(&k_signing, string_to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
        input.access_key_id
    )
}

/// The `x-amz-date` form of now.
fn amz_date_now() -> String {
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    time::OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_default()
}

/// The text between `<tag>` and `</tag>` in an S3 XML error document.
fn xml_field<'a>(body: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = body.find(&open)? + open.len();
    let end = body[start..].find(&format!("</{tag}>"))? + start;
    Some(body[start..end].trim())
}

/// Classifies an S3 answer: `None` for 2xx, else the failure.
pub fn classify(
    status: u16,
    code: Option<&str>,
    bucket: &str,
    retry_after: Option<Duration>,
) -> Option<SinkFailure> {
    if (200..300).contains(&status) {
        return None;
    }
    let code_str = code.unwrap_or("");
    // Configuration problems: retried until an operator fixes them.
    let setup: Option<String> = match (status, code_str) {
        (403, "RequestTimeTooSkewed") => {
            Some("the node's clock is too far from the server's: fix NTP".into())
        }
        (403, "SignatureDoesNotMatch") => {
            Some("signature rejected: check secret_access_key and region".into())
        }
        (403, "InvalidAccessKeyId") | (400, "InvalidAccessKeyId") => {
            Some("unknown access_key_id".into())
        }
        (403, _) | (401, _) => Some(format!(
            "access denied: the credentials need s3:PutObject on bucket {bucket:?} under the prefix"
        )),
        (404, "NoSuchBucket") => Some(format!("bucket {bucket:?} does not exist: create it")),
        (404, _) => Some("not found: check endpoint, bucket and path_style".into()),
        (400, "AuthorizationHeaderMalformed") | (400, "InvalidRegion") => {
            Some("wrong region for this bucket: check region".into())
        }
        (400, "ExpiredToken") | (400, "InvalidToken") | (400, "TokenRefreshRequired") => {
            Some("session credentials expired or invalid: refresh them".into())
        }
        (300..=399, _) => Some(
            "redirected (PermanentRedirect: wrong region or endpoint): check endpoint, region and path_style"
                .into(),
        ),
        _ => None,
    };
    let transient = status >= 500
        || matches!(status, 408 | 409 | 429)
        || (status == 400 && matches!(code_str, "RequestTimeout" | "SlowDown"));
    let label = if code_str.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status} {code_str}")
    };
    let (kind, message) = match setup {
        Some(hint) => (
            FailureKind::Retryable { retry_after },
            format!("{label}: {hint}"),
        ),
        None if transient => (FailureKind::Retryable { retry_after }, label),
        None => (FailureKind::Permanent, label),
    };
    Some(SinkFailure {
        kind,
        status: Some(status),
        message,
        response_excerpt: None,
    })
}

/// Checks a bucket name against S3's rules (3–63 of `a-z 0-9 . -`,
/// starting and ending with a letter or digit).
fn check_bucket(bucket: &str) -> Result<(), String> {
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
fn check_prefix(prefix: &str) -> Result<String, String> {
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

impl S3Sink {
    /// Checks the settings and builds the HTTP client. Does not contact the
    /// server: the first send does.
    pub fn new(config: Config) -> Result<S3Sink, SinkConfigError> {
        let bad = |reason: String| SinkConfigError { kind: "s3", reason };
        let endpoint =
            reqwest::Url::parse(&config.endpoint).map_err(|e| bad(format!("endpoint: {e}")))?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            return Err(bad("endpoint must be http or https".into()));
        }
        if endpoint.host_str().is_none()
            || endpoint.query().is_some()
            || endpoint.fragment().is_some()
            || !endpoint.username().is_empty()
        {
            return Err(bad(
                "endpoint: scheme://host[:port][/path] without credentials, query or fragment"
                    .into(),
            ));
        }
        check_bucket(&config.bucket).map_err(bad)?;
        let prefix = check_prefix(&config.prefix).map_err(bad)?;
        if config.region.is_empty()
            || !config
                .region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(bad(format!("region {:?}: a-z, 0-9 and `-`", config.region)));
        }
        if config.access_key_id.trim().is_empty() || config.secret_access_key.is_empty() {
            return Err(bad(
                "access_key_id and secret_access_key are required".into()
            ));
        }
        let header_safe = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
        if !header_safe(&config.access_key_id)
            || !config.session_token.as_deref().is_none_or(header_safe)
        {
            return Err(bad(
                "access_key_id and session_token must be visible ASCII".into()
            ));
        }
        if config.timeout_ms == 0 {
            return Err(bad("timeout_ms must be positive".into()));
        }
        let client = http::client("s3", config.timeout_ms, config.tls_ca.as_ref())?;
        Ok(S3Sink {
            config,
            prefix,
            endpoint,
            client,
        })
    }

    /// The URL of `key`, path-style or virtual-hosted.
    fn object_url(&self, key: &str) -> Result<reqwest::Url, SinkFailure> {
        let mut url = self.endpoint.clone();
        let base = url.path().trim_end_matches('/').to_string();
        let encoded_key = uri_encode(key, true);
        if self.config.path_style {
            url.set_path(&format!("{base}/{}/{encoded_key}", self.config.bucket));
        } else {
            let host = url.host_str().unwrap_or_default().to_string();
            url.set_host(Some(&format!("{}.{host}", self.config.bucket)))
                .map_err(|e| SinkFailure::permanent(format!("bucket host name: {e}")))?;
            url.set_path(&format!("{base}/{encoded_key}"));
        }
        Ok(url)
    }

    async fn put(
        &self,
        batch: &[Delivery],
        first: &Delivery,
        last: &Delivery,
    ) -> Result<(), SinkFailure> {
        let mut body = Vec::new();
        for d in batch {
            serde_json::to_writer(&mut body, &d.body).map_err(|e| {
                SinkFailure::permanent(format!("event {} does not encode as JSON: {e}", d.event_id))
            })?;
            body.push(b'\n');
        }
        let key = object_key(&self.prefix, first.partition, first.offset, last.offset);
        let url = self.object_url(&key)?;
        let shown = format!("s3 {}/{key}", self.config.bucket);
        let host = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_string(),
        };
        let payload_sha256 = hex::encode(Sha256::digest(&body));
        let amz_date = amz_date_now();
        let mut headers: Vec<(String, String)> = vec![
            ("content-type".into(), "application/x-ndjson".into()),
            ("host".into(), host),
            ("x-amz-content-sha256".into(), payload_sha256.clone()),
            ("x-amz-date".into(), amz_date.clone()),
            ("x-amz-meta-count".into(), batch.len().to_string()),
            (
                "x-amz-meta-first-event-id".into(),
                metadata_value(&first.event_id),
            ),
            ("x-amz-meta-first-offset".into(), first.offset.to_string()),
            (
                "x-amz-meta-last-event-id".into(),
                metadata_value(&last.event_id),
            ),
            ("x-amz-meta-last-offset".into(), last.offset.to_string()),
            ("x-amz-meta-partition".into(), first.partition.to_string()),
        ];
        if let Some(token) = &self.config.session_token {
            headers.push(("x-amz-security-token".into(), token.clone()));
        }
        let authorization = authorization(&SigningInput {
            method: "PUT",
            canonical_uri: url.path(),
            canonical_query: "",
            headers: &headers,
            payload_sha256: &payload_sha256,
            amz_date: &amz_date,
            region: &self.config.region,
            service: "s3",
            access_key_id: &self.config.access_key_id,
            secret_access_key: &self.config.secret_access_key,
        });
        let mut request = self.client.put(url.clone());
        for (k, v) in &headers {
            // reqwest derives Host from the URL, the same value we signed.
            if k != "host" {
                request = request.header(k.as_str(), v.as_str());
            }
        }
        let response = request
            .header(reqwest::header::AUTHORIZATION, authorization)
            .body(body)
            .send()
            .await
            .map_err(|e| http::transport_failure(&shown, &e))?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let hint = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| http::retry_after(v, std::time::SystemTime::now()));
        let text = read_bounded(response).await;
        let code = xml_field(&text, "Code");
        let mut failure = classify(status, code, &self.config.bucket, hint)
            .unwrap_or_else(|| SinkFailure::retryable(format!("HTTP {status}")));
        failure.message = match xml_field(&text, "Message") {
            Some(m) if !m.is_empty() => format!("{shown}: {} ({m})", failure.message),
            _ => format!("{shown}: {}", failure.message),
        };
        failure.response_excerpt = (!text.is_empty()).then(|| excerpt(&text));
        Err(failure)
    }
}

/// Reads at most [`ERROR_BODY_BYTES_MAX`] of an error answer.
async fn read_bounded(mut response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = ERROR_BODY_BYTES_MAX - bytes.len();
        bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if bytes.len() >= ERROR_BODY_BYTES_MAX {
            break;
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Sink for S3Sink {
    fn send<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, SendOutcome> {
        Box::pin(async move {
            let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
                return SendOutcome::Delivered;
            };
            // The key names one partition: the delivery actor sends one
            // partition per batch, in offset order.
            debug_assert!(batch.iter().all(|d| d.partition == first.partition));
            debug_assert!(batch.windows(2).all(|w| w[0].offset < w[1].offset));
            match self.put(batch, first, last).await {
                Ok(()) => SendOutcome::Delivered,
                Err(f) => SendOutcome::Failed(f),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        toml::from_str(
            r#"
            endpoint = "http://127.0.0.1:9000"
            bucket = "audit"
            access_key_id = "AKID"
            secret_access_key = "secret"
            "#,
        )
        .unwrap()
    }

    #[test]
    fn defaults_and_unknown_fields() {
        let c = config();
        assert_eq!(c.region, "us-east-1");
        assert_eq!(c.prefix, "auditflow");
        assert!(c.path_style);
        assert_eq!(c.timeout_ms, 30_000);
        assert_eq!(c.session_token, None);
        assert!(toml::from_str::<Config>(
            "endpoint = \"http://x\"\nbucket = \"b\"\naccess_key_id = \"a\"\nsecret_access_key = \"s\"\nbukket = \"b\""
        )
        .is_err());
    }

    #[test]
    fn keys_sort_by_offset() {
        assert_eq!(
            object_key("auditflow", 3, 7, 12),
            "auditflow/p00003/00000000000000000007-00000000000000000012.ndjson"
        );
        assert_eq!(
            object_key("", 0, 0, u64::MAX),
            "p00000/00000000000000000000-18446744073709551615.ndjson"
        );
        let a = object_key("x", 1, 9, 9);
        let b = object_key("x", 1, 10, 11);
        assert!(a < b);
    }

    #[test]
    fn settings_are_checked() {
        assert!(S3Sink::new(config()).is_ok());
        let with = |f: &dyn Fn(&mut Config)| {
            let mut c = config();
            f(&mut c);
            S3Sink::new(c)
        };
        assert!(with(&|c| c.endpoint = "ftp://x".into()).is_err());
        assert!(with(&|c| c.endpoint = "http://x/?a=b".into()).is_err());
        assert!(with(&|c| c.bucket = "Upper".into()).is_err());
        assert!(with(&|c| c.bucket = "ab".into()).is_err());
        assert!(with(&|c| c.bucket = "-ab".into()).is_err());
        assert!(with(&|c| c.prefix = "a//b".into()).is_err());
        assert!(with(&|c| c.prefix = "a/../b".into()).is_err());
        assert!(with(&|c| c.prefix = "a b".into()).is_err());
        assert!(with(&|c| c.region = String::new()).is_err());
        assert!(with(&|c| c.secret_access_key = String::new()).is_err());
        assert!(with(&|c| c.timeout_ms = 0).is_err());
        let sink = with(&|c| c.prefix = "/logs/prod/".into()).unwrap();
        assert_eq!(sink.prefix, "logs/prod");
        let sink = with(&|c| c.prefix = String::new()).unwrap();
        assert_eq!(sink.prefix, "");
    }

    #[test]
    fn urls_path_and_virtual_hosted() {
        let sink = S3Sink::new(config()).unwrap();
        assert_eq!(
            sink.object_url("a/b.ndjson").unwrap().as_str(),
            "http://127.0.0.1:9000/audit/a/b.ndjson"
        );
        let mut c = config();
        c.endpoint = "https://s3.eu-west-1.amazonaws.com/".into();
        c.path_style = false;
        let sink = S3Sink::new(c).unwrap();
        assert_eq!(
            sink.object_url("a/b.ndjson").unwrap().as_str(),
            "https://audit.s3.eu-west-1.amazonaws.com/a/b.ndjson"
        );
        let mut c = config();
        c.endpoint = "http://proxy:8080/s3/".into();
        let sink = S3Sink::new(c).unwrap();
        assert_eq!(
            sink.object_url("k").unwrap().as_str(),
            "http://proxy:8080/s3/audit/k"
        );
    }

    #[test]
    fn metadata_values_are_visible_ascii() {
        assert_eq!(metadata_value("0190a1b2-c3d4"), "0190a1b2-c3d4");
        assert_eq!(metadata_value("a b%c"), "a%20b%25c");
        assert_eq!(metadata_value("é\n"), "%C3%A9%0A");
        assert_eq!(uri_encode("a/b$c d", true), "a/b%24c%20d");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
    }

    const AKID: &str = "AKIAIOSFODNN7EXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// AWS's published "GET Object" example of header-based SigV4.
    #[test]
    fn sigv4_matches_aws_get_example() {
        let h = headers(&[
            ("host", "examplebucket.s3.amazonaws.com"),
            ("range", "bytes=0-9"),
            ("x-amz-content-sha256", EMPTY_SHA256),
            ("x-amz-date", "20130524T000000Z"),
        ]);
        let auth = authorization(&SigningInput {
            method: "GET",
            canonical_uri: "/test.txt",
            canonical_query: "",
            headers: &h,
            payload_sha256: EMPTY_SHA256,
            amz_date: "20130524T000000Z",
            region: "us-east-1",
            service: "s3",
            access_key_id: AKID,
            secret_access_key: SECRET,
        });
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    /// AWS's published "PUT Object" example (a key with `$`, a date header).
    #[test]
    fn sigv4_matches_aws_put_example() {
        let payload = "Welcome to Amazon S3.";
        let payload_sha256 = hex::encode(Sha256::digest(payload.as_bytes()));
        assert_eq!(
            payload_sha256,
            "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
        );
        let h = headers(&[
            ("date", "Fri, 24 May 2013 00:00:00 GMT"),
            ("host", "examplebucket.s3.amazonaws.com"),
            ("x-amz-content-sha256", &payload_sha256),
            ("x-amz-date", "20130524T000000Z"),
            ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
        ]);
        let auth = authorization(&SigningInput {
            method: "PUT",
            canonical_uri: &format!("/{}", uri_encode("test$file.text", true)),
            canonical_query: "",
            headers: &h,
            payload_sha256: &payload_sha256,
            amz_date: "20130524T000000Z",
            region: "us-east-1",
            service: "s3",
            access_key_id: AKID,
            secret_access_key: SECRET,
        });
        assert!(
            auth.ends_with(
                "SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class, \
             Signature=98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"
            ),
            "{auth}"
        );
    }

    #[test]
    fn answers_are_classified() {
        let retryable = |s: u16, c: Option<&str>| classify(s, c, "b", None).unwrap().is_retryable();
        assert!(classify(200, None, "b", None).is_none());
        for (s, c) in [
            (500, None),
            (503, Some("SlowDown")),
            (429, None),
            (408, None),
            (409, Some("OperationAborted")),
            (400, Some("RequestTimeout")),
            (403, Some("AccessDenied")),
            (403, Some("SignatureDoesNotMatch")),
            (403, Some("RequestTimeTooSkewed")),
            (404, Some("NoSuchBucket")),
            (400, Some("AuthorizationHeaderMalformed")),
            (400, Some("ExpiredToken")),
            (301, Some("PermanentRedirect")),
        ] {
            assert!(retryable(s, c), "{s} {c:?}");
        }
        for (s, c) in [
            (400, Some("MalformedXML")),
            (400, Some("EntityTooLarge")),
            (400, Some("InvalidArgument")),
            (400, None),
            (411, Some("MissingContentLength")),
            (413, None),
        ] {
            assert!(!retryable(s, c), "{s} {c:?}");
        }
        let f = classify(404, Some("NoSuchBucket"), "audit", None).unwrap();
        assert!(
            f.message.contains("\"audit\" does not exist"),
            "{}",
            f.message
        );
        let f = classify(503, Some("SlowDown"), "b", Some(Duration::from_secs(2))).unwrap();
        assert_eq!(
            f.kind,
            FailureKind::Retryable {
                retry_after: Some(Duration::from_secs(2))
            }
        );
    }

    #[test]
    fn xml_error_fields() {
        let body = "<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code>\
                    <Message>The specified bucket does not exist</Message></Error>";
        assert_eq!(xml_field(body, "Code"), Some("NoSuchBucket"));
        assert_eq!(
            xml_field(body, "Message"),
            Some("The specified bucket does not exist")
        );
        assert_eq!(xml_field("garbage", "Code"), None);
    }
}
