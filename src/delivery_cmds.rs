//! Delivery commands: `dest status`, `dlq list|show|redrive`, `replay`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Context};
use auditflow_client::Client;
use auditflow_protocol::delivery::{DestinationStatus, RedriveSelection};
use auditflow_protocol::wire::ReplayFrom;
use auditflow_protocol::Timestamp;
use serde_json::json;

use crate::client_cmds::ConfigArg;

/// `auditflow dest ...`
#[derive(clap::Subcommand, Debug)]
pub enum DestCommand {
    /// Per destination and partition: cursor, lag, last success and error,
    /// attempts, breaker, DLQ size.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add (or replace) a run-time destination from a TOML (or `.json`)
    /// file holding one destination, in the shape of a `[[destinations]]`
    /// entry of `node.toml`. Replicated to every node; delivery starts
    /// from offset 0 of every partition (or from its kept cursor).
    Add {
        #[command(flatten)]
        config: ConfigArg,
        /// The destination's settings.
        #[arg(long)]
        file: std::path::PathBuf,
    },
    /// Remove a run-time destination (its cursors and DLQ are kept).
    Remove {
        #[command(flatten)]
        config: ConfigArg,
        /// Destination.
        dest: String,
    },
    /// Every destination, with its sink kind and where it was defined.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `auditflow dlq ...`
#[derive(clap::Subcommand, Debug)]
pub enum DlqCommand {
    /// Parked events of a destination (all partitions, or one).
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Destination.
        dest: String,
        /// Only this partition.
        #[arg(long)]
        partition: Option<u32>,
        /// Most entries per partition.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// One parked event with its full attempt history.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// Destination.
        dest: String,
        /// Partition.
        #[arg(long)]
        partition: u32,
        /// Offset.
        #[arg(long)]
        offset: u64,
    },
    /// Deliver parked events again.
    Redrive {
        #[command(flatten)]
        config: ConfigArg,
        /// Destination.
        dest: String,
        /// These event ids.
        #[arg(long, value_delimiter = ',', conflicts_with_all = ["all", "from", "until"])]
        ids: Vec<String>,
        /// Every parked event.
        #[arg(long)]
        all: bool,
        /// Parked at or after this time (RFC 3339).
        #[arg(long)]
        from: Option<String>,
        /// Parked before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Only this partition.
        #[arg(long)]
        partition: Option<u32>,
    },
}

/// Arguments of `auditflow replay`.
#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Destination to re-deliver to (others are not touched).
    dest: String,
    /// Start: an offset, or an RFC 3339 time (first event stored at or
    /// after it).
    #[arg(long)]
    from: String,
    /// End (exclusive): an offset, or an RFC 3339 time (events stored
    /// before it). Default and upper bound: the destination's cursor
    /// (events after it are still to be delivered by the live stream).
    #[arg(long)]
    until: Option<String>,
    /// Only this partition (default: all; with an offset, one partition
    /// must be given).
    #[arg(long)]
    partition: Option<u32>,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn partitions(client: &Client, one: Option<u32>) -> anyhow::Result<Vec<u32>> {
    let count = client.cached_metadata().partition_count;
    match one {
        Some(p) if p >= count => bail!("no partition {p}; the cluster has {count}"),
        Some(p) => Ok(vec![p]),
        None => Ok((0..count).collect()),
    }
}

fn time_arg(name: &str, v: &Option<String>) -> anyhow::Result<Option<Timestamp>> {
    v.as_deref()
        .map(|s| Timestamp::parse_rfc3339(s).map_err(|e| anyhow::anyhow!("--{name} {s:?}: {e}")))
        .transpose()
}

/// Reads one destination's settings from a TOML or JSON file as JSON.
fn destination_json(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let value: serde_json::Value = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
    } else {
        let v: toml::Value =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        serde_json::to_value(v)?
    };
    Ok(value.to_string())
}

/// Runs `auditflow dest ...`.
pub fn dest(cmd: DestCommand) -> anyhow::Result<ExitCode> {
    let (config, json) = match cmd {
        DestCommand::Status { config, json } => (config, json),
        DestCommand::Add { config, file } => {
            let settings = destination_json(&file)?;
            let cfg = config.load()?;
            return runtime()?.block_on(async move {
                let client = Client::connect(cfg).await?;
                client.dest_add(&settings).await?;
                println!("added; every node starts delivering within a second");
                Ok(ExitCode::SUCCESS)
            });
        }
        DestCommand::Remove { config, dest } => {
            let cfg = config.load()?;
            return runtime()?.block_on(async move {
                let client = Client::connect(cfg).await?;
                if client.dest_remove(&dest).await? {
                    println!("removed {dest:?}; its cursors and DLQ are kept");
                    Ok(ExitCode::SUCCESS)
                } else {
                    eprintln!("no run-time destination {dest:?}");
                    Ok(ExitCode::FAILURE)
                }
            });
        }
        DestCommand::List { config, json } => {
            let cfg = config.load()?;
            return runtime()?.block_on(async move {
                let client = Client::connect(cfg).await?;
                let list = client.dest_list().await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&list)?);
                } else {
                    for d in &list {
                        let from = if d.runtime { "run-time" } else { "node.toml" };
                        println!("{:<24} {:<14} {from}", d.name, d.kind);
                    }
                }
                Ok(ExitCode::SUCCESS)
            });
        }
    };
    let cfg = config.load()?;
    runtime()?.block_on(async move {
        let client = Client::connect(cfg).await?;
        let mut all: Vec<DestinationStatus> = Vec::new();
        let mut unreachable = Vec::new();
        for (addr, r) in client.dest_status_all().await {
            match r {
                Ok(s) => all.extend(s),
                Err(e) => unreachable.push((addr, e.to_string())),
            }
        }
        all.sort_by(|a, b| (&a.dest, a.partition).cmp(&(&b.dest, b.partition)));
        let mut out = std::io::stdout().lock();
        if json {
            let v = json!({
                "destinations": all,
                "unreachable": unreachable.iter().map(|(a, e)| json!({"addr": a, "error": e})).collect::<Vec<_>>(),
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        } else {
            writeln!(
                out,
                "{:<16} {:>4} {:>4} {:>10} {:>8} {:>10} {:>6} {:>9} {:>6} {:>15} {:>7} {:>8} {:>10} {:>10}  last error",
                "destination", "part", "node", "cursor", "lag", "oldest_ms", "tries", "breaker", "dlq", "replay",
                "err_1m", "retries", "backoff_ms", "breaker_ms"
            )?;
            for s in &all {
                writeln!(
                    out,
                    "{:<16} {:>4} {:>4} {:>10} {:>8} {:>10} {:>6} {:>9} {:>6} {:>15} {:>6.1}% {:>8} {:>10} {:>10}  {}",
                    s.dest,
                    s.partition,
                    s.node,
                    s.cursor,
                    s.lag_events,
                    s.oldest_undelivered_age_ms.map_or("-".into(), |v| v.to_string()),
                    s.attempts,
                    s.breaker,
                    s.dlq_size,
                    s.replay.map_or("-".into(), |(next, end)| format!("{next}..{end}")),
                    s.error_rate_1m() * 100.0,
                    s.retries,
                    s.backoff_wait_ms,
                    s.breaker_wait_ms,
                    s.last_error.as_deref().unwrap_or("-")
                )?;
            }
            for (addr, e) in &unreachable {
                writeln!(out, "node {addr}: unreachable: {e}")?;
            }
        }
        Ok(if unreachable.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        })
    })
}

/// Runs `auditflow dlq ...`.
pub fn dlq(cmd: DlqCommand) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        match cmd {
            DlqCommand::List {
                config,
                dest,
                partition,
                limit,
            } => {
                let client = Client::connect(config.load()?).await?;
                let mut out = std::io::stdout().lock();
                for p in partitions(&client, partition)? {
                    for (offset, e) in client.dlq_list(&dest, p, 0, limit).await? {
                        let v = json!({
                            "partition": p, "offset": offset, "id": e.event_id,
                            "parked_at": e.parked_at, "reason": e.reason,
                            "attempts": e.attempts.len(), "redrive": e.redrive,
                        });
                        writeln!(out, "{v}")?;
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            DlqCommand::Show {
                config,
                dest,
                partition,
                offset,
            } => {
                let client = Client::connect(config.load()?).await?;
                let found = client.dlq_list(&dest, partition, offset, 1).await?;
                match found.into_iter().find(|(o, _)| *o == offset) {
                    Some((offset, e)) => {
                        let event = client.read(partition, offset, 1).await?.events.into_iter().next();
                        let v = json!({"partition": partition, "offset": offset, "entry": e, "event": event});
                        println!("{}", serde_json::to_string_pretty(&v)?);
                        Ok(ExitCode::SUCCESS)
                    }
                    None => bail!("no parked event at {dest} partition {partition} offset {offset}"),
                }
            }
            DlqCommand::Redrive {
                config,
                dest,
                ids,
                all,
                from,
                until,
                partition,
            } => {
                let client = Client::connect(config.load()?).await?;
                let from = time_arg("from", &from)?;
                let until = time_arg("until", &until)?;
                if ids.is_empty() && !all && from.is_none() && until.is_none() {
                    bail!("say which events: --ids, --all, or --from/--until");
                }
                let mut total = 0;
                for p in partitions(&client, partition)? {
                    let selection = if !ids.is_empty() {
                        // The DLQ is keyed by offset: find the ids' offsets.
                        let offsets: Vec<u64> = client
                            .dlq_list(&dest, p, 0, u32::MAX)
                            .await?
                            .into_iter()
                            .filter(|(_, e)| ids.contains(&e.event_id))
                            .map(|(o, _)| o)
                            .collect();
                        if offsets.is_empty() {
                            continue;
                        }
                        RedriveSelection::Offsets(offsets)
                    } else if all {
                        RedriveSelection::All
                    } else {
                        RedriveSelection::ParkedBetween { from, until }
                    };
                    total += client.redrive(&dest, p, selection).await?;
                }
                println!("{}", json!({"dest": dest, "marked": total}));
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

/// Runs `auditflow replay`.
pub fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.config.load()?;
    let from = replay_point("from", &args.from, args.partition)?;
    let until = args
        .until
        .as_deref()
        .map(|u| replay_point("until", u, args.partition))
        .transpose()?;
    runtime()?.block_on(async move {
        let client = Client::connect(cfg).await?;
        let mut out = std::io::stdout().lock();
        for p in partitions(&client, args.partition)? {
            let queued = client
                .replay(&args.dest, p, from.clone(), until.clone())
                .await?;
            writeln!(
                out,
                "{}",
                json!({"dest": args.dest, "partition": p, "queued": queued})
            )?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `--from`/`--until`: an offset (one partition only) or an RFC 3339 time.
fn replay_point(name: &str, value: &str, partition: Option<u32>) -> anyhow::Result<ReplayFrom> {
    match value.parse::<u64>() {
        Ok(o) => {
            if partition.is_none() {
                bail!("--{name} OFFSET needs --partition (offsets are per partition)");
            }
            Ok(ReplayFrom::Offset(o))
        }
        Err(_) => Ok(ReplayFrom::Time(Timestamp::parse_rfc3339(value).map_err(
            |e| anyhow::anyhow!("--{name} {value:?}: not an offset or a time: {e}"),
        )?)),
    }
}
