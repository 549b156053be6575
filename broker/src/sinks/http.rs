//! What the HTTP sinks (webhook, Splunk HEC, Elasticsearch) share: the
//! client, a bounded exchange, `Retry-After`, how an HTTP status becomes a
//! retryable or permanent failure, and sending items one at a time.
//!
//! Each sink knows its protocol better than a generic status table, so the
//! pieces are separate: [`exchange`] only fails on transport errors and
//! hands back the status, the hint and a bounded body; the sink classifies.
//! [`classify`] is the default table (the webhook's).

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::{excerpt, Delivery, FailureKind, SendOutcome, SinkConfigError, SinkFailure};

/// Longest connect phase, whatever the request timeout: a peer that does
/// not complete a TCP/TLS handshake in 10 s is down, and waiting longer
/// only delays the retry.
const CONNECT_TIMEOUT_MS_MAX: u64 = 10_000;

/// How the HTTP client of a sink is built.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions<'a> {
    /// Time limit of one request, from connecting to the end of the answer.
    pub timeout_ms: u64,
    /// Extra CA certificate (PEM) to trust, for private PKIs.
    pub tls_ca: Option<&'a PathBuf>,
    /// Accept any server certificate. Only for test clusters with
    /// self-signed certificates: it gives up authenticating the endpoint.
    pub insecure_skip_verify: bool,
}

/// Builds an HTTP client with a timeout, optionally trusting an extra CA.
pub fn client(
    kind: &'static str,
    timeout_ms: u64,
    ca: Option<&PathBuf>,
) -> Result<reqwest::Client, SinkConfigError> {
    client_with(
        kind,
        &ClientOptions {
            timeout_ms,
            tls_ca: ca,
            insecure_skip_verify: false,
        },
    )
}

/// Builds an HTTP client from [`ClientOptions`]. Connections are made
/// lazily, so an endpoint that is down now does not stop the node.
pub fn client_with(
    kind: &'static str,
    options: &ClientOptions<'_>,
) -> Result<reqwest::Client, SinkConfigError> {
    let bad = |reason: String| SinkConfigError { kind, reason };
    if options.timeout_ms == 0 {
        return Err(bad("timeout_ms must be at least 1".into()));
    }
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_millis(options.timeout_ms))
        .connect_timeout(Duration::from_millis(
            options.timeout_ms.min(CONNECT_TIMEOUT_MS_MAX),
        ))
        // Redirects would re-send audit data to wherever a (possibly
        // compromised) endpoint points; an operator should fix the URL.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(path) = options.tls_ca {
        let pem =
            std::fs::read(path).map_err(|e| bad(format!("CA file {}: {e}", path.display())))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| bad(format!("CA file {}: {e}", path.display())))?;
        builder = builder.add_root_certificate(cert);
    }
    if options.insecure_skip_verify {
        builder = builder.danger_accept_invalid_certs(true);
    }
    builder
        .build()
        .map_err(|e| bad(format!("HTTP client: {e}")))
}

/// Checks that `url` is an absolute http(s) URL.
pub fn parse_url(kind: &'static str, url: &str) -> Result<reqwest::Url, SinkConfigError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| SinkConfigError {
        kind,
        reason: format!("url {url:?}: {e}"),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(SinkConfigError {
            kind,
            reason: format!("url {url:?} must be http or https"),
        });
    }
    Ok(parsed)
}

/// Joins a base URL and a path without doubling or dropping the slash
/// (`https://h:8088/` and `https://h:8088` both give `https://h:8088/p`),
/// keeping any path prefix of the base (a reverse proxy's).
pub fn join(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

/// Parses `Retry-After`: delay seconds, or an HTTP date relative to `now`
/// (a date in the past means "now").
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) is RFC 2822 syntax
    // with the obsolete `GMT` zone, which the parser accepts.
    let format = time::format_description::well_known::Rfc2822;
    let at = time::OffsetDateTime::parse(value, &format).ok()?;
    let now = time::OffsetDateTime::from(now);
    let secs = (at - now).whole_seconds();
    Some(Duration::from_secs(secs.max(0).unsigned_abs()))
}

/// A retryable failure, with the endpoint's hint.
pub fn retryable_with(
    status: Option<u16>,
    message: String,
    retry_after: Option<Duration>,
    body: &str,
) -> SinkFailure {
    SinkFailure {
        kind: FailureKind::Retryable { retry_after },
        status,
        message,
        response_excerpt: (!body.is_empty()).then(|| excerpt(body)),
    }
}

/// A permanent failure with a status and the start of the answer.
pub fn permanent_with(status: Option<u16>, message: String, body: &str) -> SinkFailure {
    SinkFailure {
        kind: FailureKind::Permanent,
        status,
        message,
        response_excerpt: (!body.is_empty()).then(|| excerpt(body)),
    }
}

/// Classifies an HTTP status: 2xx is success (`None`); 408, 429 and 5xx
/// are retryable (the endpoint is slow, overloaded or broken: later can
/// work); other 4xx are permanent (the endpoint refuses this content and
/// will refuse it again). 1xx/3xx cannot be final answers here (redirects
/// are not followed), so they are retryable: the URL needs fixing, not the
/// event.
pub fn classify(
    status: u16,
    body: &str,
    retry_after_hint: Option<Duration>,
) -> Option<SinkFailure> {
    if (200..300).contains(&status) {
        return None;
    }
    let message = format!("HTTP {status}");
    let retryable = status == 408 || status == 429 || !(400..500).contains(&status);
    Some(if retryable {
        retryable_with(Some(status), message, retry_after_hint, body)
    } else {
        permanent_with(Some(status), message, body)
    })
}

/// A transport error (connect, timeout, reset): always retryable.
pub fn transport_failure(url: &str, e: &reqwest::Error) -> SinkFailure {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    // reqwest's Display includes the URL already for most errors; the
    // source chain has the useful part (e.g. "Connection refused").
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    SinkFailure::retryable(format!("{url}: {what}: {detail}"))
}

/// An endpoint's answer, read up to a bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// The `Retry-After` hint, parsed.
    pub retry_after: Option<Duration>,
    /// The body as text (lossy UTF-8), at most the bound given.
    pub body: String,
    /// Whether `body` is the whole answer: false when it was cut at the
    /// bound or the connection broke while reading it. Sinks that parse
    /// the answer must not trust a partial one.
    pub complete: bool,
}

/// Sends a prepared request; fails only on transport errors. Reads at most
/// `body_bytes_max` bytes of the answer, so a misbehaving endpoint cannot
/// make the node buffer an unbounded body (G8).
pub async fn exchange(
    url: &str,
    request: reqwest::RequestBuilder,
    body_bytes_max: usize,
) -> Result<Answer, SinkFailure> {
    let mut response = request
        .send()
        .await
        .map_err(|e| transport_failure(url, &e))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry_after(v, SystemTime::now()));
    let mut bytes = Vec::new();
    let mut complete = true;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = body_bytes_max.saturating_sub(bytes.len());
                if chunk.len() > room {
                    bytes.extend_from_slice(&chunk[..room]);
                    complete = false;
                    break;
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(_) => {
                complete = false;
                break;
            }
        }
    }
    Ok(Answer {
        status,
        retry_after,
        body: String::from_utf8_lossy(&bytes).into_owned(),
        complete,
    })
}

/// Body bytes kept from an answer whose content does not matter beyond
/// the excerpt in a failure record.
pub const EXCERPT_READ_BYTES_MAX: usize = 4096;

/// Sends a prepared request and classifies the answer with [`classify`];
/// `Ok` carries the (bounded) body.
pub async fn send(url: &str, request: reqwest::RequestBuilder) -> Result<String, SinkFailure> {
    let answer = exchange(url, request, EXCERPT_READ_BYTES_MAX).await?;
    match classify(answer.status, &answer.body, answer.retry_after) {
        None => Ok(answer.body),
        Some(mut f) => {
            f.message = format!("{url}: {}", f.message);
            Err(f)
        }
    }
}

/// Sends items one at a time, in order, for endpoints that answer per
/// request. A permanent failure only fails its item; the first retryable
/// failure stops the run and every later item gets the same failure,
/// because sending them past a blocked one would break order (G4).
pub async fn one_by_one<'a, F, Fut>(batch: &'a [Delivery], mut send_one: F) -> SendOutcome
where
    F: FnMut(&'a Delivery) -> Fut,
    Fut: Future<Output = Result<(), SinkFailure>>,
{
    let mut results = Vec::with_capacity(batch.len());
    for d in batch {
        let result = send_one(d).await;
        let blocked = matches!(&result, Err(f) if f.is_retryable());
        results.push(result);
        if blocked {
            break;
        }
    }
    per_item_outcome(results, batch.len())
}

/// Builds an outcome from results for the first items of a batch of
/// `len`: all present and ok is `Delivered`; otherwise `PerItem`, with the
/// missing tail filled with the last failure (they wait behind it).
pub fn per_item_outcome(mut results: Vec<Result<(), SinkFailure>>, len: usize) -> SendOutcome {
    if results.len() == len && results.iter().all(Result::is_ok) {
        return SendOutcome::Delivered;
    }
    let filler = match results.last() {
        Some(Err(f)) => f.clone(),
        _ => SinkFailure::retryable("not sent: an earlier item is blocked"),
    };
    results.resize(len, Err(filler));
    SendOutcome::PerItem(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        assert!(classify(200, "", None).is_none());
        assert!(classify(204, "", None).is_none());
        for s in [408, 429, 500, 502, 503, 301, 101] {
            assert!(classify(s, "", None).unwrap().is_retryable(), "{s}");
        }
        for s in [400, 401, 403, 404, 413, 422] {
            assert!(!classify(s, "", None).unwrap().is_retryable(), "{s}");
        }
        let f = classify(503, &"x".repeat(5000), Some(Duration::from_secs(3))).unwrap();
        assert_eq!(
            f.kind,
            FailureKind::Retryable {
                retry_after: Some(Duration::from_secs(3))
            }
        );
        assert_eq!(f.status, Some(503));
        assert_eq!(
            f.response_excerpt.unwrap().len(),
            super::super::MAX_EXCERPT_BYTES
        );
        let f = classify(400, "bad", None).unwrap();
        assert_eq!(f.kind, FailureKind::Permanent);
        assert_eq!(f.response_excerpt.as_deref(), Some("bad"));
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(" 0 ", now), Some(Duration::ZERO));
        // now + 20 s, in both the numeric-zone and the HTTP (GMT) form.
        let date = "Tue, 14 Nov 2023 22:13:40 +0000";
        assert_eq!(retry_after(date, now), Some(Duration::from_secs(20)));
        let http_date = "Tue, 14 Nov 2023 22:13:40 GMT";
        assert_eq!(retry_after(http_date, now), Some(Duration::from_secs(20)));
        // A date in the past: retry now.
        let past = "Tue, 14 Nov 2023 22:00:00 GMT";
        assert_eq!(retry_after(past, now), Some(Duration::ZERO));
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("-5", now), None);
    }

    #[test]
    fn urls_join_with_one_slash() {
        assert_eq!(join("https://h:8088", "/x/y"), "https://h:8088/x/y");
        assert_eq!(join("https://h:8088/", "x/y"), "https://h:8088/x/y");
        assert_eq!(join("https://h/es/", "/_bulk"), "https://h/es/_bulk");
        assert!(parse_url("t", "ftp://h").is_err());
        assert!(parse_url("t", "nope").is_err());
        assert!(parse_url("t", "http://h:1/p").is_ok());
    }

    #[test]
    fn per_item_outcome_fills_the_tail_behind_the_blocker() {
        assert_eq!(
            per_item_outcome(vec![Ok(()), Ok(())], 2),
            SendOutcome::Delivered
        );
        let busy = SinkFailure::retryable("busy");
        let out = per_item_outcome(vec![Ok(()), Err(busy.clone())], 4);
        assert_eq!(
            out,
            SendOutcome::PerItem(vec![
                Ok(()),
                Err(busy.clone()),
                Err(busy.clone()),
                Err(busy)
            ])
        );
        let bad = SinkFailure::permanent("bad");
        let out = per_item_outcome(vec![Err(bad.clone()), Ok(())], 2);
        assert_eq!(out, SendOutcome::PerItem(vec![Err(bad), Ok(())]));
    }

    #[test]
    fn a_bad_timeout_or_ca_is_refused() {
        assert!(client("t", 0, None).is_err());
        let missing = PathBuf::from("/nonexistent/ca.pem");
        assert!(client("t", 1000, Some(&missing)).is_err());
        assert!(client("t", 1000, None).is_ok());
    }
}
