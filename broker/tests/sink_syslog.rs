//! The syslog sink against a real `rsyslogd` that each test starts in the
//! foreground on a free loopback port (`imtcp`, octet-counted framing),
//! with a configuration, work directory, pid file and output file in a
//! temp dir, and stops.
//!
//! rsyslogd parses each message as RFC 5424 and writes its PRI, timestamp,
//! header fields, raw structured data and MSG as one line to a file; the
//! tests parse those lines back. So they prove what a real receiver makes
//! of the bytes: every event arrives, in offset order, with the right
//! PRI (facility 13, severity from the outcome), MSGID, structured data
//! (escaping of `"`, `\` and `]` included) and JSON body; a 20 KiB event
//! survives framing; a receiver that is down gives a retryable failure
//! (lazy connect), and after a restart on the same port the sink
//! reconnects by itself and delivers; over TLS (rsyslog's GnuTLS driver,
//! which negotiates TLS 1.2 here, and its OpenSSL driver, TLS 1.3)
//! delivery works with the right CA and fails retryably with a wrong CA
//! or server name.
//!
//! Needs Debian `rsyslog`, `rsyslog-gnutls` and `rsyslog-openssl` (listed
//! in ops/apt-packages.txt); `AUDITFLOW_RSYSLOGD` overrides the binary.

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use auditflow_broker::sinks::syslog::{Config, SeverityMap, SyslogSink, TlsConfig};
use auditflow_broker::sinks::{Delivery, SendOutcome, Sink};
use auditflow_protocol::{Hash32, Timestamp};
use serde_json::{json, Value};

/// How long rsyslogd may take to start, stop or write what it received
/// on a loaded 2-core machine.
const SERVER_DEADLINE: Duration = Duration::from_secs(30);
/// Interval of polling the output file and the port.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The sink's host name, checked in what rsyslog received.
const HOSTNAME: &str = "node-1";
/// A tenant that needs every SD-PARAM escape.
const TENANT: &str = r#"acme "blue" \ team]"#;

fn rsyslogd() -> PathBuf {
    if let Ok(path) = std::env::var("AUDITFLOW_RSYSLOGD") {
        return PathBuf::from(path);
    }
    for path in [
        "/usr/sbin/rsyslogd",
        "/sbin/rsyslogd",
        "/usr/local/sbin/rsyslogd",
    ] {
        if Path::new(path).exists() {
            return PathBuf::from(path);
        }
    }
    panic!(
        "rsyslogd not found: apt-get install rsyslog (ops/apt-packages.txt) \
         or set AUDITFLOW_RSYSLOGD"
    );
}

/// Whether rsyslog's network stream driver `name` (gtls, ossl) is
/// installed.
fn has_driver(name: &str) -> bool {
    let file = format!("lmnsd_{name}.so");
    let mut dirs = vec![PathBuf::from("/usr/lib/rsyslog")];
    if let Ok(entries) = fs::read_dir("/usr/lib") {
        dirs.extend(entries.flatten().map(|e| e.path().join("rsyslog")));
    }
    dirs.iter().any(|d| d.join(&file).exists())
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// Certificate files for a TLS receiver.
struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// Makes a CA and a server certificate for `localhost` / 127.0.0.1 in
/// `dir`, named after `name`.
fn make_certs(dir: &Path, name: &str) -> TlsFiles {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("server params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    let files = TlsFiles {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}-server.pem")),
        key: dir.join(format!("{name}-server.key")),
    };
    fs::write(&files.ca, ca.pem()).expect("write CA");
    fs::write(&files.cert, cert.pem()).expect("write cert");
    fs::write(&files.key, key.serialize_pem()).expect("write key");
    files
}

/// An rsyslogd in a temp dir; killed on drop.
struct Rsyslog {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Rsyslog {
    /// Writes the configuration (TLS with driver `tls.0` if given); not
    /// started.
    fn new(tls: Option<(&str, &TlsFiles)>) -> Rsyslog {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let d = dir.path().display();
        let (tls_global, tls_module) = match tls {
            None => (String::new(), String::new()),
            Some((driver, files)) => (
                format!(
                    " defaultNetstreamDriver=\"{driver}\" defaultNetstreamDriverCAFile=\"{}\" \
                     defaultNetstreamDriverCertFile=\"{}\" defaultNetstreamDriverKeyFile=\"{}\"",
                    files.ca.display(),
                    files.cert.display(),
                    files.key.display()
                ),
                format!(
                    " streamDriver.name=\"{driver}\" streamDriver.mode=\"1\" \
                     streamDriver.authMode=\"anon\""
                ),
            ),
        };
        // One line per message: PRI, timestamp, the header fields, the raw
        // structured data and MSG. Only messages from the TCP input are
        // written (their own ruleset), never rsyslogd's own.
        let conf = format!(
            r#"global(workDirectory="{d}" maxMessageSize="256k"{tls_global})
module(load="imtcp"{tls_module})
template(name="line" type="string"
         string="%pri% %timestamp:::date-rfc3339% %hostname% %app-name% %procid% %msgid% %structured-data% %msg%\n")
ruleset(name="remote") {{
  action(type="omfile" file="{d}/received.log" template="line")
}}
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="remote")
"#
        );
        fs::write(dir.path().join("rsyslog.conf"), conf).expect("write rsyslog.conf");
        Rsyslog {
            dir,
            port,
            child: None,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("rsyslogd.log")
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// Starts rsyslogd and waits until it accepts connections.
    async fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("open log");
        let log2 = log.try_clone().expect("clone log");
        let child = Command::new(rsyslogd())
            .arg("-n")
            .arg("-f")
            .arg(self.dir.path().join("rsyslog.conf"))
            .arg("-i")
            .arg(self.dir.path().join("rsyslogd.pid"))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("spawn rsyslogd");
        self.child = Some(child);
        let deadline = Instant::now() + SERVER_DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("rsyslogd exited with {status}: {}", self.log_text());
                }
            }
            if tokio::net::TcpStream::connect(self.addr()).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "rsyslogd did not listen on {}: {}",
                self.addr(),
                self.log_text()
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// SIGTERM (rsyslogd's orderly shutdown: it closes connections and
    /// flushes its output), waiting until the process is gone.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + SERVER_DEADLINE;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL_INTERVAL),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
            }
        }
    }

    /// The complete lines rsyslogd wrote so far.
    fn received(&self) -> Vec<String> {
        let text = fs::read_to_string(self.dir.path().join("received.log")).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |i| &text[..i]);
        complete
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Polls until at least `n` messages were written; returns them
    /// parsed.
    async fn wait_for(&self, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + SERVER_DEADLINE;
        loop {
            let lines = self.received();
            if lines.len() >= n {
                return lines.iter().map(|l| parse_line(l)).collect();
            }
            assert!(
                Instant::now() < deadline,
                "rsyslogd wrote {} of {n} messages: {lines:#?}\nrsyslogd log: {}",
                lines.len(),
                self.log_text()
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One message as rsyslogd parsed it.
#[derive(Debug)]
struct Received {
    pri: u8,
    /// rsyslog's RFC 3339 rendering of the TIMESTAMP.
    time: String,
    hostname: String,
    app_name: String,
    procid: String,
    msgid: String,
    /// SD-ID → (param → unescaped value).
    sd: BTreeMap<String, BTreeMap<String, String>>,
    body: Value,
}

/// Parses structured data (RFC 5424 §6.3): the elements and the rest.
fn parse_sd(mut s: &str) -> (BTreeMap<String, BTreeMap<String, String>>, &str) {
    let mut out = BTreeMap::new();
    while let Some(rest) = s.strip_prefix('[') {
        let id_end = rest.find([' ', ']']).expect("SD-ID end");
        let id = rest[..id_end].to_string();
        let mut rest = &rest[id_end..];
        let mut params = BTreeMap::new();
        while let Some(r) = rest.strip_prefix(' ') {
            let eq = r.find("=\"").expect("SD-PARAM =\"");
            let name = r[..eq].to_string();
            let mut value = String::new();
            let mut chars = r[eq + 2..].char_indices();
            let end = loop {
                match chars.next().expect("closing quote") {
                    (_, '\\') => value.push(chars.next().expect("escaped char").1),
                    (i, '"') => break eq + 2 + i + 1,
                    (_, c) => value.push(c),
                }
            };
            params.insert(name, value);
            rest = &r[end..];
        }
        rest = rest.strip_prefix(']').expect("SD element end");
        out.insert(id, params);
        s = rest;
    }
    (out, s)
}

fn parse_line(line: &str) -> Received {
    let mut parts = line.splitn(7, ' ');
    let mut next = || parts.next().expect("field").to_string();
    let pri = next().parse().expect("PRI");
    let (time, hostname, app_name, procid, msgid) = (next(), next(), next(), next(), next());
    let rest = next();
    let (sd, msg) = parse_sd(&rest);
    let msg = msg.strip_prefix(' ').expect("space before MSG");
    let body = serde_json::from_str(msg).unwrap_or_else(|e| panic!("MSG not JSON ({e}): {msg}"));
    Received {
        pri,
        time,
        hostname,
        app_name,
        procid,
        msgid,
        sd,
        body,
    }
}

const OUTCOMES: [&str; 4] = ["success", "failure", "denied", "error"];

/// Event time of `offset`: distinct per event, with nanoseconds that the
/// syslog timestamp (microseconds) cuts off.
fn event_time(offset: u64) -> Timestamp {
    Timestamp(1_715_000_000_123_456_789 + offset as i64 * 1_000_000_007)
}

fn delivery(partition: u32, offset: u64) -> Delivery {
    let event_id = format!("evt-{partition}-{offset} \"q\" ]");
    let received_at = Timestamp(1_716_000_000_000_000_000 + offset as i64);
    let hash = Hash32([offset as u8; 32]);
    // Offset 7 is big: far over rsyslog's default 8 KiB message size, so
    // framing and the receiver's limit are exercised.
    let blob = if offset == 7 {
        "x".repeat(20_000)
    } else {
        String::new()
    };
    let event = json!({
        "id": event_id,
        "tenant": TENANT,
        "time": event_time(offset),
        "actor": {"id": "u-1", "type": "user", "name": "Zoë"},
        "action": format!("user.login.attempt.with.a.long.name.{offset}"),
        "target": {"type": "session", "id": format!("s-{offset}")},
        "outcome": OUTCOMES[offset as usize % 4],
        "data": {"blob": blob, "line": "two\nlines"},
    });
    Delivery {
        partition,
        offset,
        event_id,
        tenant: TENANT.into(),
        received_at,
        hash,
        body: json!({
            "partition": partition,
            "offset": offset,
            "received_at": received_at,
            "hash": hash,
            "event": event,
        }),
    }
}

fn batch(partition: u32, offsets: std::ops::Range<u64>) -> Vec<Delivery> {
    offsets.map(|o| delivery(partition, o)).collect()
}

fn config(addr: String) -> Config {
    Config {
        addr,
        tls: None,
        app_name: "auditflow".into(),
        hostname: Some(HOSTNAME.into()),
        facility: 13,
        severity: SeverityMap::default(),
        utf8_bom: false,
        connect_timeout_ms: 5_000,
        write_timeout_ms: 10_000,
    }
}

/// Checks that `got` are exactly the messages of `sent`, in order.
fn assert_messages(got: &[Received], sent: &[Delivery]) {
    assert_eq!(got.len(), sent.len(), "{got:#?}");
    for (r, d) in got.iter().zip(sent) {
        let outcome = OUTCOMES[d.offset as usize % 4];
        let severity = match outcome {
            "success" => 6,
            "failure" => 5,
            "denied" => 4,
            _ => 3,
        };
        assert_eq!(r.pri, 13 * 8 + severity, "offset {}", d.offset);
        let time = Timestamp::parse_rfc3339(&r.time).expect("rsyslog timestamp");
        let micros = event_time(d.offset).unix_nanos() / 1_000 * 1_000;
        assert_eq!(time.unix_nanos(), micros, "offset {}: {}", d.offset, r.time);
        assert_eq!(r.hostname, HOSTNAME);
        assert_eq!(r.app_name, "auditflow");
        assert_eq!(r.procid, "-");
        let action = format!("user.login.attempt.with.a.long.name.{}", d.offset);
        assert_eq!(r.msgid, action[..32]);
        let sd = r.sd.get("auditflow@32473").expect("auditflow SD element");
        let expected: BTreeMap<String, String> = [
            ("id", d.event_id.clone()),
            ("partition", d.partition.to_string()),
            ("offset", d.offset.to_string()),
            ("tenant", TENANT.to_string()),
            ("hash", d.hash.to_hex()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(sd, &expected);
        assert_eq!(r.sd.len(), 1);
        assert_eq!(r.body, d.body);
    }
}

fn assert_retryable(outcome: &SendOutcome, needles: &[&str]) {
    match outcome {
        SendOutcome::Failed(f) => {
            assert!(f.is_retryable(), "not retryable: {f:?}");
            for needle in needles {
                assert!(
                    f.message.contains(needle),
                    "{needle:?} not in {:?}",
                    f.message
                );
            }
        }
        other => panic!("expected a retryable failure, got {other:?}"),
    }
}

#[tokio::test]
async fn delivers_batches_in_order_with_structured_data() {
    let mut server = Rsyslog::new(None);
    server.start().await;
    let mut sink = SyslogSink::new(config(server.addr())).expect("sink");
    let mut sent = Vec::new();
    for range in [0..5, 5..12, 12..13, 13..30] {
        let b = batch(2, range);
        assert_eq!(sink.send(&b).await, SendOutcome::Delivered);
        sent.extend(b);
    }
    let got = server.wait_for(sent.len()).await;
    assert_messages(&got, &sent);
    server.stop();
}

#[tokio::test]
async fn fails_retryably_while_down_and_reconnects_after_a_restart() {
    let mut server = Rsyslog::new(None);
    let addr = server.addr();
    // Built while the receiver is down: connecting is lazy.
    let mut sink = SyslogSink::new(config(server.addr())).expect("sink");
    let first = batch(0, 0..4);
    assert_retryable(&sink.send(&first).await, &[addr.as_str(), "connect"]);

    server.start().await;
    assert_eq!(sink.send(&first).await, SendOutcome::Delivered);
    server.wait_for(4).await;

    // The receiver goes away: the closed connection is noticed, the
    // reconnect is refused, the batch comes back as retryable.
    server.stop();
    let second = batch(0, 4..9);
    assert_retryable(&sink.send(&second).await, &[addr.as_str(), "connect"]);
    assert_retryable(&sink.send(&second).await, &[addr.as_str()]);

    // Back on the same port: the sink reconnects by itself.
    server.start().await;
    assert_eq!(sink.send(&second).await, SendOutcome::Delivered);
    let third = batch(0, 9..12);
    assert_eq!(sink.send(&third).await, SendOutcome::Delivered);
    let got = server.wait_for(12).await;
    let sent: Vec<Delivery> = first.into_iter().chain(second).chain(third).collect();
    assert_messages(&got, &sent);
}

/// TLS against one of rsyslog's drivers.
async fn tls_round_trip(driver: &str) {
    assert!(
        has_driver(driver),
        "rsyslog's {driver} driver is missing: apt-get install rsyslog-gnutls rsyslog-openssl \
         (ops/apt-packages.txt)"
    );
    let certs_dir = tempfile::tempdir().expect("temp dir");
    let good = make_certs(certs_dir.path(), "good");
    let other = make_certs(certs_dir.path(), "other");
    let mut server = Rsyslog::new(Some((driver, &good)));
    server.start().await;
    let tls_config = |ca: &Path, name: &str| Config {
        tls: Some(TlsConfig {
            ca_cert: ca.to_path_buf(),
            server_name: name.into(),
        }),
        ..config(server.addr())
    };

    // A CA that did not sign the receiver's certificate, or a name the
    // certificate does not carry: refused, retryably (an operator fixes
    // the settings or the receiver, then delivery resumes).
    let mut wrong_ca = SyslogSink::new(tls_config(&other.ca, "localhost")).expect("sink");
    assert_retryable(&wrong_ca.send(&batch(1, 0..1)).await, &["TLS handshake"]);
    let mut wrong_name = SyslogSink::new(tls_config(&good.ca, "syslog.example")).expect("sink");
    assert_retryable(&wrong_name.send(&batch(1, 0..1)).await, &["TLS handshake"]);

    let mut sink = SyslogSink::new(tls_config(&good.ca, "localhost")).expect("sink");
    let sent = batch(1, 0..10);
    assert_eq!(sink.send(&sent[..6]).await, SendOutcome::Delivered);
    assert_eq!(sink.send(&sent[6..]).await, SendOutcome::Delivered);
    let got = server.wait_for(sent.len()).await;
    assert_messages(&got, &sent);

    // A restart of a TLS receiver: reconnect with a new handshake.
    server.stop();
    server.start().await;
    let more = batch(1, 10..13);
    assert_eq!(sink.send(&more).await, SendOutcome::Delivered);
    let got = server.wait_for(13).await;
    assert_messages(&got[10..], &more);
}

#[tokio::test]
async fn tls_with_gnutls_driver() {
    tls_round_trip("gtls").await;
}

#[tokio::test]
async fn tls_with_openssl_driver() {
    tls_round_trip("ossl").await;
}
