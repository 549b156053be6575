//! The client commands: `append`, `read`, `tail`, `status`. Thin wrappers
//! over `auditflow_client` that speak JSON lines on stdin/stdout.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use auditflow_client::{Client, ClientConfig};
use auditflow_protocol::wire::Role;
use auditflow_protocol::{Event, StoredEvent};
use serde_json::json;

/// Where the client configuration comes from.
#[derive(clap::Args, Debug, Clone)]
pub struct ConfigArg {
    /// Client configuration (written by `auditflow up` as DIR/client.toml).
    #[arg(
        long,
        env = "AUDITFLOW_CONFIG",
        default_value = ".auditflow/client.toml"
    )]
    pub config: PathBuf,
}

impl ConfigArg {
    pub(crate) fn load(&self) -> anyhow::Result<ClientConfig> {
        Ok(ClientConfig::load(&self.config)?)
    }
}

/// Arguments of `auditflow append`.
#[derive(clap::Args, Debug)]
pub struct AppendArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Read events from this file instead of stdin (JSON lines).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Events sent per request batch.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
}

/// Arguments of `auditflow read`.
#[derive(clap::Args, Debug)]
pub struct ReadArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Partition to read.
    #[arg(long)]
    partition: u32,
    /// First offset.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Most events to print.
    #[arg(long, default_value_t = 1000)]
    limit: u32,
    /// Read this node's replica (address) instead of the leader's.
    #[arg(long)]
    node: Option<String>,
}

/// Arguments of `auditflow tail`.
#[derive(clap::Args, Debug)]
pub struct TailArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Partition to follow.
    #[arg(long)]
    partition: u32,
    /// First offset.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Keep waiting for new events (until Ctrl-C).
    #[arg(long)]
    follow: bool,
}

/// Arguments of `auditflow status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn print_line(out: &mut impl Write, value: &serde_json::Value) -> anyhow::Result<()> {
    writeln!(out, "{value}").context("write to stdout")
}

/// One input line: an event, or why it is not one.
enum Line {
    Event(Box<Event>),
    Bad { line: usize, error: String },
}

fn parse_line(n: usize, text: &str) -> Option<Line> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    Some(match serde_json::from_str::<Event>(text) {
        Ok(e) => Line::Event(Box::new(e)),
        Err(e) => Line::Bad {
            line: n,
            error: format!("not a valid event: {e}"),
        },
    })
}

/// `auditflow append`: prints one JSON ack per input line, in order.
pub fn append(args: AppendArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.config.load()?;
    let input: Box<dyn BufRead> = match &args.file {
        Some(path) => Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    let batch_size = args.batch.max(1);
    runtime()?.block_on(async move {
        let client = Client::connect(cfg).await?;
        let mut out = std::io::stdout().lock();
        let mut failed = false;
        let mut pending: Vec<Line> = Vec::new();
        let mut lines = input.lines().enumerate();
        loop {
            let next = lines.next();
            let at_end = next.is_none();
            if let Some((n, line)) = next {
                let line = line.context("read input")?;
                if let Some(l) = parse_line(n + 1, &line) {
                    pending.push(l);
                }
            }
            if pending.len() >= batch_size || (at_end && !pending.is_empty()) {
                failed |= flush(&client, std::mem::take(&mut pending), &mut out).await?;
            }
            if at_end {
                break;
            }
        }
        out.flush().context("write to stdout")?;
        Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    })
}

/// Appends a batch of lines and prints their results; true if any failed.
async fn flush(client: &Client, lines: Vec<Line>, out: &mut impl Write) -> anyhow::Result<bool> {
    let mut events: Vec<Event> = lines
        .iter()
        .filter_map(|l| match l {
            Line::Event(e) => Some((**e).clone()),
            Line::Bad { .. } => None,
        })
        .collect();
    // Assign ids here so the output can name them, and retries reuse them.
    auditflow_client::client::assign_ids(&mut events);
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    let results = match client.append_batch(events).await {
        Ok(r) => r
            .into_iter()
            .map(|r| r.map_err(|e| e.to_string()))
            .collect(),
        Err(e) => vec![Err(e.to_string()); ids.len()],
    };
    let mut results = ids.into_iter().zip(results);
    let mut failed = false;
    for line in lines {
        match line {
            Line::Bad { line, error } => {
                failed = true;
                print_line(out, &json!({ "line": line, "error": error }))?;
            }
            Line::Event(_) => {
                let Some((id, result)) = results.next() else {
                    break;
                };
                match result {
                    Ok(ack) => {
                        let mut v = json!({
                            "id": id,
                            "partition": ack.partition,
                            "offset": ack.offset,
                            "hash": ack.hash.to_hex(),
                        });
                        if ack.duplicate {
                            v["duplicate"] = json!(true);
                        }
                        print_line(out, &v)?;
                    }
                    Err(error) => {
                        failed = true;
                        print_line(out, &json!({ "id": id, "error": error }))?;
                    }
                }
            }
        }
    }
    Ok(failed)
}

fn print_events(out: &mut impl Write, events: &[StoredEvent]) -> anyhow::Result<()> {
    for e in events {
        writeln!(out, "{}", serde_json::to_string(e)?).context("write to stdout")?;
    }
    out.flush().context("write to stdout")
}

/// `auditflow read`: one page of stored events as JSON lines.
pub fn read(args: ReadArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.config.load()?;
    runtime()?.block_on(async move {
        let client = Client::connect(cfg).await?;
        let page = match &args.node {
            Some(addr) => {
                client
                    .read_from(addr, args.partition, args.from, args.limit, 0)
                    .await?
            }
            None => client.read(args.partition, args.from, args.limit).await?,
        };
        print_events(&mut std::io::stdout().lock(), &page.events)?;
        Ok(ExitCode::SUCCESS)
    })
}

/// `auditflow tail`: events from an offset to the head, then (with
/// `--follow`) new ones as they are stored.
pub fn tail(args: TailArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.config.load()?;
    runtime()?.block_on(async move {
        let client = Client::connect(cfg).await?;
        let mut tail = client.tail(args.partition, args.from);
        loop {
            let events = tokio::select! {
                r = tail.next_page(args.follow) => r?,
                _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            };
            print_events(&mut std::io::stdout().lock(), &events)?;
            if events.is_empty() && !args.follow {
                return Ok(ExitCode::SUCCESS);
            }
        }
    })
}

/// `auditflow status`: every node's view of every partition.
pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.config.load()?;
    runtime()?.block_on(async move {
        // One request timeout to learn every node's address, not the whole
        // retry deadline (60 s by default): a status query must say soon
        // which nodes are unreachable, and without metadata it asks the
        // seeds themselves.
        let ask = Duration::from_millis(cfg.request_timeout_ms);
        let client = Client::open(cfg)?;
        match tokio::time::timeout(ask, client.metadata()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if !e.is_retryable() => return Err(e.into()),
            Ok(Err(_)) | Err(_) => {}
        }
        let statuses = client.status_all().await;
        let mut out = std::io::stdout().lock();
        let mut unreachable = false;
        if args.json {
            let v: Vec<serde_json::Value> = statuses
                .iter()
                .map(|(addr, r)| match r {
                    Ok(s) => json!({ "addr": addr, "status": s }),
                    Err(e) => {
                        json!({ "addr": addr, "error": e.to_string() })
                    }
                })
                .collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            unreachable = statuses.iter().any(|(_, r)| r.is_err());
        } else {
            for (addr, r) in &statuses {
                match r {
                    Err(e) => {
                        unreachable = true;
                        writeln!(out, "node {addr}: unreachable: {e}")?;
                    }
                    Ok(s) => {
                        writeln!(out, "node {} ({addr})", s.node.id)?;
                        writeln!(
                            out,
                            "  {:>4} {:<9} {:>6} {:>6} {:>10} {:>10} {:>10} {:>12}",
                            "part",
                            "role",
                            "leader",
                            "term",
                            "last_log",
                            "applied",
                            "snapshot",
                            "next_offset"
                        )?;
                        for p in &s.partitions {
                            let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
                            writeln!(
                                out,
                                "  {:>4} {:<9} {:>6} {:>6} {:>10} {:>10} {:>10} {:>12}",
                                p.partition,
                                role_name(p.role),
                                opt(p.leader),
                                p.term,
                                opt(p.last_log_index),
                                opt(p.applied_index),
                                opt(p.snapshot_index),
                                p.next_offset
                            )?;
                        }
                    }
                }
            }
        }
        Ok(if unreachable {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        })
    })
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
        Role::Learner => "learner",
        Role::Shutdown => "shutdown",
    }
}
