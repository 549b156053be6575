//! The status page at `/`: plain HTML tables of this node's partitions and
//! deliveries, refreshed by the browser every few seconds. No scripts.

use std::fmt::Write;

use auditflow_protocol::delivery::DestinationStatus;
use auditflow_protocol::wire::{NodeStatus, Role};

/// Seconds between the page's automatic reloads.
pub const REFRESH_SECONDS: u32 = 2;

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "–".into())
}

/// Renders the page from this node's status and its delivery status (or
/// why the latter could not be read).
pub fn render(status: &NodeStatus, dests: Result<&[DestinationStatus], String>) -> String {
    let node = &status.node;
    let title = format!("auditflow node {} ({})", node.id, escape(&node.addr));
    let mut html = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <title>{title}</title><style>\
         body{{font-family:system-ui,sans-serif;margin:1.5em}}\
         table{{border-collapse:collapse;margin-bottom:1.5em}}\
         th,td{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}\
         th{{background:#f3f3f3}}td.l,th.l{{text-align:left}}\
         .leader{{font-weight:bold}}.bad{{color:#b00}}\
         </style></head><body>\n<h1>{title}</h1>\n\
         <p><a href=\"/status\">status JSON</a> · <a href=\"/destinations\">destinations JSON</a> · \
         <a href=\"/metrics\">metrics</a> · <a href=\"/readyz\">readyz</a></p>\n"
    );
    html.push_str(
        "<h2>Partitions</h2>\n<table><tr><th>partition</th><th class=\"l\">role</th>\
         <th>leader</th><th>term</th><th>last log</th><th>applied</th><th>snapshot</th>\
         <th>next offset</th><th class=\"l\">last hash</th></tr>\n",
    );
    for p in &status.partitions {
        let class = if p.role == Role::Leader {
            " class=\"leader\""
        } else {
            ""
        };
        let leader = match p.leader {
            Some(l) => l.to_string(),
            None => "<span class=\"bad\">none</span>".into(),
        };
        let hash = p.last_hash.to_hex();
        let _ = writeln!(
            html,
            "<tr{class}><td>{}</td><td class=\"l\">{:?}</td><td>{leader}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"l\"><code>{}…</code></td></tr>",
            p.partition,
            p.role,
            p.term,
            opt(p.last_log_index),
            opt(p.applied_index),
            opt(p.snapshot_index),
            p.next_offset,
            &hash[..hash.len().min(16)],
        );
    }
    html.push_str("</table>\n<h2>Destinations (partitions this node leads)</h2>\n");
    match dests {
        Err(e) => {
            let _ = writeln!(
                html,
                "<p class=\"bad\">delivery status unavailable: {}</p>",
                escape(&e)
            );
        }
        Ok([]) => html.push_str("<p>No delivery runs on this node.</p>\n"),
        Ok(dests) => {
            html.push_str(
                "<table><tr><th class=\"l\">destination</th><th>partition</th><th>cursor</th>\
                 <th>head</th><th>lag</th><th>oldest undelivered</th><th>DLQ</th>\
                 <th>attempts</th><th class=\"l\">breaker</th><th>delivered</th><th>replay</th>\
                 <th>errors (1 min)</th><th>retries</th><th>backoff wait</th><th>breaker wait</th>\
                 <th class=\"l\">last success</th><th class=\"l\">last error</th></tr>\n",
            );
            for d in dests {
                let breaker = if d.breaker == "closed" {
                    escape(&d.breaker)
                } else {
                    format!("<span class=\"bad\">{}</span>", escape(&d.breaker))
                };
                let _ = writeln!(
                    html,
                    "<tr><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                     <td>{}</td><td>{}</td><td>{}</td><td class=\"l\">{breaker}</td><td>{}</td><td>{}</td>\
                     <td>{:.1} % of {}</td><td>{}</td><td>{:.1} s</td><td>{:.1} s</td>\
                     <td class=\"l\">{}</td><td class=\"l\">{}</td></tr>",
                    escape(&d.dest),
                    d.partition,
                    d.cursor,
                    d.head,
                    d.lag_events,
                    opt(d
                        .oldest_undelivered_age_ms
                        .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))),
                    d.dlq_size,
                    d.attempts,
                    d.delivered,
                    opt(d.replay.map(|(next, end)| format!("{next}..{end}"))),
                    d.error_rate_1m() * 100.0,
                    d.requests_1m,
                    d.retries,
                    d.backoff_wait_ms as f64 / 1000.0,
                    d.breaker_wait_ms as f64 / 1000.0,
                    opt(d.last_success.map(|t| t.to_rfc3339())),
                    escape(d.last_error.as_deref().unwrap_or("")),
                );
            }
            html.push_str("</table>\n");
        }
    }
    html.push_str("</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;
    use auditflow_protocol::wire::{NodeAddr, PartitionStatus};
    use auditflow_protocol::Hash32;

    fn status() -> NodeStatus {
        NodeStatus {
            node: NodeAddr {
                id: 2,
                addr: "127.0.0.1:7102".into(),
            },
            partitions: vec![PartitionStatus {
                partition: 0,
                role: Role::Leader,
                leader: Some(2),
                term: 3,
                last_log_index: Some(9),
                applied_index: Some(9),
                snapshot_index: None,
                purged_index: None,
                next_offset: 5,
                last_hash: Hash32([0xab; 32]),
            }],
        }
    }

    #[test]
    fn page_lists_partitions_and_escapes_destination_text() {
        let d = DestinationStatus {
            dest: "<hook>".into(),
            partition: 0,
            node: 2,
            cursor: 1,
            head: 5,
            lag_events: 4,
            oldest_undelivered_age_ms: Some(1500),
            last_success: None,
            last_error: Some("HTTP 500: <html>\"boom\"".into()),
            attempts: 2,
            breaker: "open".into(),
            dlq_size: 0,
            delivered: 1,
            replay: None,
            requests_1m: 200,
            failed_requests_1m: 10,
            retries: 12,
            backoff_wait_ms: 1500,
            breaker_wait_ms: 0,
        };
        let html = render(&status(), Ok(std::slice::from_ref(&d)));
        assert!(html.contains("<meta http-equiv=\"refresh\" content=\"2\">"));
        assert!(html.contains("<h1>auditflow node 2 (127.0.0.1:7102)</h1>"));
        assert!(html.contains("<td class=\"l\">Leader</td>"));
        assert!(html.contains("abababababababab…"));
        assert!(html.contains("&lt;hook&gt;"));
        assert!(html.contains("HTTP 500: &lt;html&gt;&quot;boom&quot;"));
        assert!(html.contains("1.5 s"));
        assert!(html.contains("<td>5.0 % of 200</td><td>12</td><td>1.5 s</td><td>0.0 s</td>"));
        assert!(!html.contains("<hook>"));
        assert!(!html.contains("<script"));
    }

    #[test]
    fn page_says_when_nothing_is_delivered_or_status_failed() {
        assert!(render(&status(), Ok(&[])).contains("No delivery runs on this node."));
        let html = render(&status(), Err("disk <gone>".into()));
        assert!(html.contains("delivery status unavailable: disk &lt;gone&gt;"));
    }
}
