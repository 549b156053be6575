//! A real `rsyslogd` for tests: started in the foreground on a free
//! loopback port (`imtcp`, octet-counted framing, optional TLS) with its
//! configuration, work directory and output file in a temp dir. It writes
//! each message it parsed as one line, which [`parse_line`] reads back.
//! Shared by the sink test and the cluster delivery test (`#[path]`).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long rsyslogd may take to start, stop or write what it received
/// on a loaded 2-core machine.
pub const SERVER_DEADLINE: Duration = Duration::from_secs(30);
/// Interval of polling the output file and the port.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

pub fn rsyslogd() -> PathBuf {
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
pub fn has_driver(name: &str) -> bool {
    let file = format!("lmnsd_{name}.so");
    let mut dirs = vec![PathBuf::from("/usr/lib/rsyslog")];
    if let Ok(entries) = fs::read_dir("/usr/lib") {
        dirs.extend(entries.flatten().map(|e| e.path().join("rsyslog")));
    }
    dirs.iter().any(|d| d.join(&file).exists())
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// Certificate files for a TLS receiver.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a CA and a server certificate for `localhost` / 127.0.0.1 in
/// `dir`, named after `name`.
pub fn make_certs(dir: &Path, name: &str) -> TlsFiles {
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
pub struct Rsyslog {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub child: Option<Child>,
}

impl Rsyslog {
    /// Writes the configuration (TLS with driver `tls.0` if given); not
    /// started.
    pub fn new(tls: Option<(&str, &TlsFiles)>) -> Rsyslog {
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

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("rsyslogd.log")
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// Starts rsyslogd and waits until it accepts connections.
    pub async fn start(&mut self) {
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
    pub fn stop(&mut self) {
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
    pub fn received(&self) -> Vec<String> {
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
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
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
pub struct Received {
    pub pri: u8,
    /// rsyslog's RFC 3339 rendering of the TIMESTAMP.
    pub time: String,
    pub hostname: String,
    pub app_name: String,
    pub procid: String,
    pub msgid: String,
    /// SD-ID → (param → unescaped value).
    pub sd: BTreeMap<String, BTreeMap<String, String>>,
    pub body: Value,
}

/// Parses structured data (RFC 5424 §6.3): the elements and the rest.
pub fn parse_sd(mut s: &str) -> (BTreeMap<String, BTreeMap<String, String>>, &str) {
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

pub fn parse_line(line: &str) -> Received {
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
