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
//!
//! Files: [`config`] the settings and their checks, [`sign`] AWS
//! Signature Version 4, [`response`] reading and classifying S3's
//! answers; the sink itself is here.

mod config;
mod response;
mod sign;

use std::fmt::Write as _;

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};

use super::{excerpt, http, Delivery, SendOutcome, Sink, SinkConfigError, SinkFailure};

pub use config::Config;
use config::{check_bucket, check_prefix};
pub use response::classify;
use response::{read_bounded, xml_field};
use sign::{amz_date_now, uri_encode};
pub use sign::{authorization, SigningInput};

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
}
