//! The RFC 5424 message of one delivery and its octet-counting frame
//! (RFC 6587 §3.4.1).

use auditflow_protocol::Timestamp;
use serde_json::Value;

use super::config::{Severity, SeverityMap};
use crate::sinks::Delivery;

/// The SD-ID of the structured data element every message carries.
pub const SD_ID: &str = "auditflow@32473";

/// Longest APP-NAME (RFC 5424 §6).
pub const APP_NAME_MAX: usize = 48;
/// Longest HOSTNAME (RFC 5424 §6).
pub const HOSTNAME_MAX: usize = 255;
/// Longest MSGID (RFC 5424 §6).
pub const MSGID_MAX: usize = 32;
/// Largest facility code (RFC 5424 §6.2.1: 0 to 23).
pub const FACILITY_MAX: u8 = 23;

/// The UTF-8 byte order mark RFC 5424 §6.4 puts before a UTF-8 MSG.
pub(super) const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The per-destination parts of every message, checked once at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Facility code, at most [`FACILITY_MAX`].
    pub facility: u8,
    /// Severity per outcome.
    pub severity: SeverityMap,
    /// HOSTNAME field: printable ASCII, or `-`.
    pub hostname: String,
    /// APP-NAME field: printable ASCII.
    pub app_name: String,
    /// Whether MSG starts with a UTF-8 BOM.
    pub utf8_bom: bool,
}

/// PRI value: facility × 8 + severity (RFC 5424 §6.2.1).
pub fn pri(facility: u8, severity: Severity) -> u8 {
    debug_assert!(facility <= FACILITY_MAX, "facility {facility} out of range");
    facility * 8 + severity.code()
}

/// Whether `s` is a valid header field of at most `max` characters:
/// non-empty printable US-ASCII (RFC 5424 PRINTUSASCII, no spaces).
pub fn is_header_field(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Escapes an SD-PARAM value: `"`, `\` and `]` get a backslash (RFC 5424
/// §6.3.3).
pub fn escape_sd_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// MSGID from an event action: at most [`MSGID_MAX`] characters, anything
/// but printable ASCII replaced by `_`; `-` (NILVALUE) if there is none.
pub fn msgid(action: Option<&str>) -> String {
    let id: String = action
        .unwrap_or("")
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .take(MSGID_MAX)
        .collect();
    if id.is_empty() {
        "-".into()
    } else {
        id
    }
}

/// RFC 5424 TIMESTAMP in UTC with microseconds (the most fractional digits
/// it allows), or `-` if the time cannot be expressed.
pub fn format_timestamp(t: Timestamp) -> String {
    let Ok(dt) = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(t.unix_nanos())) else {
        return "-".into();
    };
    if !(0..=9999).contains(&dt.year()) {
        return "-".into();
    }
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.microsecond()
    )
}

/// Appends the RFC 5424 message of one delivery to `out`.
pub fn format_message(
    header: &Header,
    d: &Delivery,
    out: &mut Vec<u8>,
) -> Result<(), serde_json::Error> {
    let body = d.body.to_value();
    let event = body.get("event");
    let field = |name: &str| event.and_then(|e| e.get(name)).and_then(Value::as_str);
    let severity = header.severity.for_outcome(field("outcome"));
    let time = field("time")
        .and_then(|s| Timestamp::parse_rfc3339(s).ok())
        .unwrap_or(d.received_at);
    let head = format!(
        "<{pri}>1 {ts} {host} {app} - {msgid} [{SD_ID} id=\"{id}\" partition=\"{p}\" \
         offset=\"{o}\" tenant=\"{tenant}\" hash=\"{hash}\"] ",
        pri = pri(header.facility, severity),
        ts = format_timestamp(time),
        host = header.hostname,
        app = header.app_name,
        msgid = msgid(field("action")),
        id = escape_sd_value(&d.event_id),
        p = d.partition,
        o = d.offset,
        tenant = escape_sd_value(&d.tenant),
        hash = d.hash.to_hex(),
    );
    out.extend_from_slice(head.as_bytes());
    if header.utf8_bom {
        out.extend_from_slice(BOM);
    }
    serde_json::to_writer(&mut *out, &d.body)
}

/// Appends `msg` with octet-counting framing (RFC 6587 §3.4.1):
/// the length in decimal, a space, the message.
pub fn frame(msg: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(msg.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(msg);
}

/// The system host name, or `-` if unknown or not a valid HOSTNAME.
pub(super) fn system_hostname() -> String {
    // Linux exposes it here; no unsafe `gethostname` call needed. Other
    // systems fall back to the environment.
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let name = name.trim();
    if is_header_field(name, HOSTNAME_MAX) {
        name.to_string()
    } else {
        "-".into()
    }
}
