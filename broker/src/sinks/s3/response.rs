//! S3's answers: reading a bounded error body, its XML error fields, and
//! classifying the failure (transient, a configuration problem to fix,
//! or permanent).

use std::time::Duration;

use crate::sinks::{FailureKind, SinkFailure};

/// Longest error body read from a failed request: enough for S3's XML
/// error document, bounded whatever the server sends.
const ERROR_BODY_BYTES_MAX: usize = 16 * 1024;

/// The text between `<tag>` and `</tag>` in an S3 XML error document.
pub(super) fn xml_field<'a>(body: &'a str, tag: &str) -> Option<&'a str> {
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

/// Reads at most [`ERROR_BODY_BYTES_MAX`] of an error answer.
pub(super) async fn read_bounded(mut response: reqwest::Response) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

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
