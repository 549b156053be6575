//! Syslog: RFC 5424 messages over TCP with octet-counting framing
//! (RFC 6587 §3.4.1: `LEN SP MSG`), optionally over TLS (RFC 5425 uses
//! the same framing).
//!
//! One message per event:
//!
//! ```text
//! <PRI>1 TIMESTAMP HOSTNAME APP-NAME - MSGID [auditflow@32473 id="…" partition="…" offset="…" tenant="…" hash="…"] JSON
//! ```
//!
//! - PRI = facility × 8 + severity; the severity comes from the event's
//!   outcome through [`SeverityMap`].
//! - TIMESTAMP is the event's own `time` (when the audited action
//!   happened), or the broker's `received_at` if the body has none; UTC
//!   with microseconds, the finest RFC 5424 allows.
//! - PROCID is the NILVALUE `-`: the node's process id says nothing about
//!   the event.
//! - MSGID is the event's action, cut to 32 printable ASCII characters.
//! - The structured data element carries the event id (the key receivers
//!   deduplicate on, G3), its position and tenant, and its chain hash.
//!   32473 is the example Private Enterprise Number of RFC 5612.
//! - MSG is the delivered JSON body (`Delivery::body`), optionally after a
//!   UTF-8 BOM. Receivers must accept messages as long as the largest
//!   event (rsyslog: `global(maxMessageSize=…)`, 8 KiB by default).
//!
//! Delivery guarantees: syslog over TCP has no per-message acknowledgement
//! (that is what RELP adds). A batch counts as delivered once it is
//! written and flushed to the connection. When the connection breaks, the
//! batch is reported as a retryable failure and re-sent whole on a new
//! connection, so a receiver can see duplicates (deduplicate on the `id`
//! parameter); and bytes that were in flight when a receiver crashed can
//! be lost without the sink knowing. Before each batch the sink checks
//! whether the receiver has closed the connection, which catches a
//! receiver restart between batches.
//!
//! Files: [`config`] the settings, [`format`] the RFC 5424 message and
//! its octet-counting frame, [`conn`] the connection (TLS, liveness
//! check); the sink itself is here.

mod config;
mod conn;
mod format;

use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{Delivery, SendOutcome, Sink, SinkConfigError, SinkFailure};

pub use config::{Config, Severity, SeverityMap, TlsConfig};
use conn::{load_tls, peer_gone, Stream, Tls};
use format::system_hostname;
pub use format::{
    escape_sd_value, format_message, format_timestamp, frame, is_header_field, msgid, pri, Header,
    APP_NAME_MAX, FACILITY_MAX, HOSTNAME_MAX, MSGID_MAX, SD_ID,
};

/// The syslog sink: one connection, made lazily and again after any error.
pub struct SyslogSink {
    /// Receiver address.
    addr: String,
    /// TLS client, if configured.
    tls: Option<Tls>,
    /// Fixed message fields.
    header: Header,
    /// Connect (and handshake) time limit.
    connect_timeout: Duration,
    /// Write-and-flush time limit per batch.
    write_timeout: Duration,
    /// The open connection, if any.
    conn: Option<Box<dyn Stream>>,
}

impl SyslogSink {
    /// Checks the settings and loads the CA certificate; connects on the
    /// first send, so a receiver that is down does not stop the node.
    pub fn new(config: Config) -> Result<SyslogSink, SinkConfigError> {
        let bad = |reason: String| SinkConfigError {
            kind: "syslog",
            reason,
        };
        match config.addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => return Err(bad(format!("addr {:?}: expected host:port", config.addr))),
        }
        if !is_header_field(&config.app_name, APP_NAME_MAX) {
            return Err(bad(format!(
                "app_name {:?}: 1 to {APP_NAME_MAX} printable ASCII characters",
                config.app_name
            )));
        }
        let hostname = match config.hostname {
            Some(h) if is_header_field(&h, HOSTNAME_MAX) => h,
            Some(h) => {
                return Err(bad(format!(
                    "hostname {h:?}: 1 to {HOSTNAME_MAX} printable ASCII characters"
                )))
            }
            None => system_hostname(),
        };
        if config.facility > FACILITY_MAX {
            return Err(bad(format!(
                "facility {}: 0 to {FACILITY_MAX}",
                config.facility
            )));
        }
        if config.connect_timeout_ms == 0 || config.write_timeout_ms == 0 {
            return Err(bad("timeouts must be positive".into()));
        }
        let tls = config.tls.as_ref().map(load_tls).transpose().map_err(bad)?;
        Ok(SyslogSink {
            addr: config.addr,
            tls,
            header: Header {
                facility: config.facility,
                severity: config.severity,
                hostname,
                app_name: config.app_name,
                utf8_bom: config.utf8_bom,
            },
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            write_timeout: Duration::from_millis(config.write_timeout_ms),
            conn: None,
        })
    }

    async fn connect(&self) -> Result<Box<dyn Stream>, String> {
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // Each batch is flushed whole; without Nagle its last segment
        // leaves at once instead of waiting for an ACK.
        tcp.set_nodelay(true)
            .map_err(|e| format!("set TCP_NODELAY: {e}"))?;
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some(tls) => {
                let stream = tls
                    .connector
                    .connect(tls.server_name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS handshake: {e}"))?;
                Ok(Box::new(stream))
            }
        }
    }

    /// Writes `bytes` on the connection, connecting first if needed.
    async fn deliver(&mut self, bytes: &[u8]) -> Result<(), String> {
        if let Some(conn) = self.conn.as_mut() {
            // tokio learns of a FIN or RST only when its driver polls the
            // OS; yielding lets it do so, otherwise a receiver that closed
            // since the last batch would still look open and the first
            // write would vanish into the kernel's buffer.
            tokio::task::yield_now().await;
            if let Some(why) = peer_gone(conn.as_mut()).await {
                tracing::debug!(addr = %self.addr, "syslog connection lost ({why}); reconnecting");
                self.conn = None;
            }
        }
        let conn = match self.conn.take() {
            Some(c) => c,
            None => tokio::time::timeout(self.connect_timeout, self.connect())
                .await
                .map_err(|_| {
                    format!(
                        "connect timed out after {} ms",
                        self.connect_timeout.as_millis()
                    )
                })??,
        };
        let conn = self.conn.insert(conn);
        let write = async {
            conn.write_all(bytes).await?;
            conn.flush().await
        };
        match tokio::time::timeout(self.write_timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write: {e}")),
            Err(_) => Err(format!(
                "write timed out after {} ms",
                self.write_timeout.as_millis()
            )),
        }
    }
}

impl Sink for SyslogSink {
    fn send<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, SendOutcome> {
        Box::pin(async move {
            let mut bytes = Vec::new();
            let mut msg = Vec::new();
            for d in batch {
                msg.clear();
                if let Err(e) = format_message(&self.header, d, &mut msg) {
                    return SendOutcome::Failed(SinkFailure::permanent(format!(
                        "event {} does not encode as JSON: {e}",
                        d.event_id
                    )));
                }
                frame(&msg, &mut bytes);
            }
            match self.deliver(&bytes).await {
                Ok(()) => SendOutcome::Delivered,
                Err(why) => {
                    // The connection may hold half a batch: never reuse it.
                    self.conn = None;
                    SendOutcome::Failed(SinkFailure::retryable(format!(
                        "syslog {}: {why}",
                        self.addr
                    )))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use auditflow_protocol::Hash32;
    use proptest::prelude::*;

    use auditflow_protocol::Timestamp;
    use serde_json::Value;

    use super::*;

    fn header() -> Header {
        Header {
            facility: 13,
            severity: SeverityMap::default(),
            hostname: "node-1".into(),
            app_name: "auditflow".into(),
            utf8_bom: false,
        }
    }

    fn delivery(event: Value) -> Delivery {
        Delivery {
            partition: 3,
            offset: 42,
            event_id: "ev-1".into(),
            tenant: "acme".into(),
            received_at: Timestamp(1_700_000_000_123_456_789),
            hash: Hash32([0xab; 32]),
            body: crate::sinks::Body::from_value(
                &serde_json::json!({"partition": 3, "offset": 42, "event": event}),
            ),
        }
    }

    /// Splits octet-counted frames; `None` if the bytes are not exactly a
    /// sequence of frames.
    fn deframe(mut bytes: &[u8]) -> Option<Vec<&[u8]>> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let sp = bytes.iter().position(|b| *b == b' ')?;
            let len: usize = std::str::from_utf8(&bytes[..sp]).ok()?.parse().ok()?;
            let rest = &bytes[sp + 1..];
            if rest.len() < len {
                return None;
            }
            out.push(&rest[..len]);
            bytes = &rest[len..];
        }
        Some(out)
    }

    /// Reads an escaped SD-PARAM value up to its closing quote: the value
    /// and the rest after the quote.
    fn unescape_sd_value(s: &str) -> Option<(String, &str)> {
        let mut out = String::new();
        let mut chars = s.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => out.push(chars.next()?.1),
                '"' => return Some((out, &s[i + 1..])),
                ']' => return None,
                c => out.push(c),
            }
        }
        None
    }

    #[test]
    fn pri_is_facility_times_eight_plus_severity() {
        assert_eq!(pri(13, Severity::Info), 110);
        assert_eq!(pri(0, Severity::Emerg), 0);
        assert_eq!(pri(23, Severity::Debug), 191);
        assert_eq!(pri(4, Severity::Crit), 34); // RFC 5424 §6.5 example 1
    }

    #[test]
    fn severities_follow_outcomes() {
        let m = SeverityMap::default();
        assert_eq!(m.for_outcome(Some("success")), Severity::Info);
        assert_eq!(m.for_outcome(Some("failure")), Severity::Notice);
        assert_eq!(m.for_outcome(Some("denied")), Severity::Warning);
        assert_eq!(m.for_outcome(Some("error")), Severity::Err);
        assert_eq!(m.for_outcome(None), Severity::Notice);
    }

    #[test]
    fn escaping_and_msgid() {
        for (raw, escaped) in [
            ("plain", "plain"),
            (r#"a"b"#, r#"a\"b"#),
            (r"a\b", r"a\\b"),
            ("a]b", r"a\]b"),
            ("[x=é]", r"[x=é\]"),
        ] {
            assert_eq!(escape_sd_value(raw), escaped, "{raw}");
        }
        assert_eq!(msgid(Some("user.login")), "user.login");
        assert_eq!(msgid(Some("a b\té")), "a_b__");
        assert_eq!(msgid(Some("")), "-");
        assert_eq!(msgid(None), "-");
        assert_eq!(msgid(Some(&"x".repeat(40))), "x".repeat(32));
    }

    #[test]
    fn timestamps_are_utc_with_microseconds() {
        assert_eq!(
            format_timestamp(Timestamp(1_700_000_000_123_456_789)),
            "2023-11-14T22:13:20.123456Z"
        );
        assert_eq!(
            format_timestamp(Timestamp(0)),
            "1970-01-01T00:00:00.000000Z"
        );
        assert_eq!(
            format_timestamp(Timestamp(-1)),
            "1969-12-31T23:59:59.999999Z"
        );
    }

    #[test]
    fn formats_a_whole_message() {
        let d = delivery(serde_json::json!({
            "action": "user.login",
            "outcome": "denied",
            "time": "2024-05-06T07:08:09.5Z",
        }));
        let mut out = Vec::new();
        format_message(&header(), &d, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let expected_head = format!(
            "<108>1 2024-05-06T07:08:09.500000Z node-1 auditflow - user.login \
             [auditflow@32473 id=\"ev-1\" partition=\"3\" offset=\"42\" tenant=\"acme\" \
             hash=\"{}\"] ",
            "ab".repeat(32)
        );
        assert_eq!(&text[..expected_head.len()], expected_head);
        let body: Value = serde_json::from_str(&text[expected_head.len()..]).unwrap();
        assert_eq!(body, d.body.to_value());

        // No event time: the broker's receive time; BOM when asked.
        let mut h = header();
        h.utf8_bom = true;
        let mut out = Vec::new();
        format_message(&h, &delivery(serde_json::json!({})), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("<109>1 2023-11-14T22:13:20.123456Z node-1 auditflow - - ["),
            "{text}"
        );
        assert!(text.contains("] \u{feff}{"), "{text}");
    }

    #[test]
    fn frames_count_octets_not_characters() {
        let mut out = Vec::new();
        frame("é".as_bytes(), &mut out);
        frame(b"", &mut out);
        assert_eq!(out, b"2 \xC3\xA90 ");
    }

    #[test]
    fn config_defaults_and_checks() {
        let c: Config = toml::from_str("addr = \"127.0.0.1:514\"").unwrap();
        assert_eq!(c.app_name, "auditflow");
        assert_eq!(c.facility, 13);
        assert_eq!(c.severity, SeverityMap::default());
        assert_eq!(c.tls, None);
        assert!(!c.utf8_bom);
        let c: Config = toml::from_str(
            "addr = \"h:1\"\nseverity = { denied = \"err\" }\ntls = { ca_cert = \"/ca.pem\", server_name = \"h\" }",
        )
        .unwrap();
        assert_eq!(c.severity.denied, Severity::Err);
        assert_eq!(c.severity.success, Severity::Info);
        assert!(toml::from_str::<Config>("addr = \"h:1\"\nport = 1").is_err());
        let ok = || Config {
            tls: None,
            ..toml::from_str::<Config>("addr = \"127.0.0.1:514\"").unwrap()
        };
        assert!(SyslogSink::new(ok()).is_ok());
        for bad in [
            Config {
                addr: "nohost".into(),
                ..ok()
            },
            Config {
                addr: "h:99999".into(),
                ..ok()
            },
            Config {
                app_name: "two words".into(),
                ..ok()
            },
            Config {
                app_name: "x".repeat(49),
                ..ok()
            },
            Config {
                hostname: Some(String::new()),
                ..ok()
            },
            Config {
                facility: 24,
                ..ok()
            },
            Config {
                write_timeout_ms: 0,
                ..ok()
            },
            Config {
                tls: Some(TlsConfig {
                    ca_cert: "/nonexistent/ca.pem".into(),
                    server_name: "h".into(),
                }),
                ..ok()
            },
        ] {
            assert!(SyslogSink::new(bad.clone()).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn frames_round_trip(msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)) {
            let mut out = Vec::new();
            for m in &msgs {
                frame(m, &mut out);
            }
            let got = deframe(&out).unwrap();
            prop_assert_eq!(got, msgs.iter().map(|m| m.as_slice()).collect::<Vec<_>>());
        }

        #[test]
        fn sd_values_unescape_to_the_original(s in any::<String>()) {
            let escaped = escape_sd_value(&s);
            let quoted = format!("{escaped}\"rest");
            let (value, rest) = unescape_sd_value(&quoted).unwrap();
            prop_assert_eq!(value, s);
            prop_assert_eq!(rest, "rest");
        }

        #[test]
        fn messages_parse_back(
            action in any::<String>(),
            tenant in any::<String>(),
            id in any::<String>(),
            outcome in prop_oneof![Just("success"), Just("failure"), Just("denied"), Just("error"), Just("other")],
        ) {
            let mut d = delivery(serde_json::json!({"action": action, "outcome": outcome}));
            d.tenant = tenant.clone();
            d.event_id = id.clone();
            let mut out = Vec::new();
            format_message(&header(), &d, &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            // Six space-separated header fields of printable ASCII.
            let mut parts = text.splitn(7, ' ');
            let pri_ver = parts.next().unwrap();
            let sev = SeverityMap::default().for_outcome(Some(outcome));
            prop_assert_eq!(pri_ver, format!("<{}>1", pri(13, sev)));
            let fields: Vec<&str> = parts.by_ref().take(5).collect();
            prop_assert_eq!(fields.len(), 5);
            for f in &fields {
                prop_assert!(!f.is_empty() && f.bytes().all(|b| b.is_ascii_graphic()), "{:?}", f);
            }
            prop_assert!(fields[4].len() <= MSGID_MAX);
            // The structured data parses back to the original values.
            let sd = parts.next().unwrap();
            let sd = sd.strip_prefix(&format!("[{SD_ID} id=\"")).unwrap();
            let (got_id, sd) = unescape_sd_value(sd).unwrap();
            prop_assert_eq!(got_id, id);
            let sd = sd.strip_prefix(" partition=\"3\" offset=\"42\" tenant=\"").unwrap();
            let (got_tenant, sd) = unescape_sd_value(sd).unwrap();
            prop_assert_eq!(got_tenant, tenant);
            let sd = sd.strip_prefix(&format!(" hash=\"{}\"] ", "ab".repeat(32))).unwrap();
            let body: Value = serde_json::from_str(sd).unwrap();
            prop_assert_eq!(body, d.body.to_value());
        }
    }
}
