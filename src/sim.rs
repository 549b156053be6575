//! `auditflow sim`: run the deterministic simulator for one seed or a
//! sweep of seeds; a failing seed prints the command that replays it.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use auditflow_sim::{run, FaultOptions, PlantedBug, SimOptions};

/// The names `--planted-bug` takes, with their bugs.
const PLANTED_BUGS: [(&str, PlantedBug); 5] = [
    ("g4", PlantedBug::G4Order),
    ("g5", PlantedBug::G5Duplicates),
    ("g6", PlantedBug::G6Chain),
    ("masking", PlantedBug::Masking),
    ("breaker", PlantedBug::BreakerPerBatch),
];

fn parse_planted_bug(name: &str) -> Result<PlantedBug, String> {
    PLANTED_BUGS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bug)| *bug)
        .ok_or_else(|| format!("unknown planted bug {name}: one of g4, g5, g6, masking, breaker"))
}

fn planted_bug_name(bug: PlantedBug) -> &'static str {
    PLANTED_BUGS
        .iter()
        .find(|(_, b)| *b == bug)
        .map_or("?", |(n, _)| n)
}

/// Arguments of `auditflow sim`.
#[derive(clap::Args, Debug)]
pub struct SimArgs {
    /// Run this one seed (and print its trace).
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Sweep this many seeds.
    #[arg(long, default_value_t = 20)]
    seeds: u64,
    /// First seed of a sweep.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Simulated seconds of workload and faults per seed.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Partitions.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// No faults (a baseline).
    #[arg(long)]
    no_faults: bool,
    /// Share of restarts whose node comes back with an empty data
    /// directory (a lost disk), 0 to 1. By default drawn per seed (a
    /// quarter of the seeds lose disks); 0 turns it off.
    #[arg(long)]
    lost_disk: Option<f64>,
    /// Share of restarts whose node comes back with one bit flipped in
    /// the synced part of a file (Raft log, database, event file), 0 to 1.
    /// Off by default: until replay tells such damage from a torn tail and
    /// the node repairs from a peer (issue 27), a sweep with it finds
    /// failures.
    #[arg(long, default_value_t = 0.0)]
    synced_damage: f64,
    /// Plant a known bug in the broker (g4: delivery order, g5: append
    /// dedup, g6: hash chain, masking, breaker: the per-batch breaker of
    /// before issue 33), to see the checker catch it: the sweep must fail.
    #[arg(long, value_parser = parse_planted_bug)]
    planted_bug: Option<PlantedBug>,
    /// Lines of the trace printed for a failing (or single) seed.
    #[arg(long, default_value_t = 200)]
    trace_lines: usize,
}

/// Runs the simulator.
pub fn run_cmd(args: SimArgs) -> anyhow::Result<ExitCode> {
    let options = |seed: u64| {
        let mut o = SimOptions::new(seed);
        o.duration = Duration::from_secs(args.duration);
        o.partitions = args.partitions;
        if args.no_faults {
            o.faults = FaultOptions::none();
        }
        if let Some(p) = args.lost_disk {
            o.faults.cluster.lost_disk = p;
        }
        o.faults.cluster.synced_damage = args.synced_damage;
        o.planted_bug = args.planted_bug;
        o.trace_lines = args.trace_lines;
        o
    };
    let replay = |seed: u64| {
        format!(
            "auditflow sim --seed {seed} --duration {} --partitions {}{}{}{}{}",
            args.duration,
            args.partitions,
            if args.no_faults { " --no-faults" } else { "" },
            match args.lost_disk {
                Some(p) => format!(" --lost-disk {p}"),
                None => String::new(),
            },
            if args.synced_damage > 0.0 {
                format!(" --synced-damage {}", args.synced_damage)
            } else {
                String::new()
            },
            match args.planted_bug {
                Some(bug) => format!(" --planted-bug {}", planted_bug_name(bug)),
                None => String::new(),
            }
        )
    };
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => (args.from..args.from + args.seeds).collect(),
    };
    let started = Instant::now();
    let mut simulated = Duration::ZERO;
    let mut failed = Vec::new();
    for seed in &seeds {
        let t = Instant::now();
        let report = run(&options(*seed));
        simulated += report.simulated;
        let ok = report.violations.is_empty();
        println!(
            "seed {seed}: {} acked {} delivered {} (sends {}) faults {} messages {} simulated {:.1}s real {:.2}s trace {}",
            if ok { "ok  " } else { "FAIL" },
            report.acked,
            report.deliveries,
            report.sink_sends,
            report.faults,
            report.messages,
            report.simulated.as_secs_f64(),
            t.elapsed().as_secs_f64(),
            &report.trace_hash[..16.min(report.trace_hash.len())]
        );
        if !ok || args.seed.is_some() {
            println!("  options: {}", report.options);
            for v in &report.violations {
                println!("  violation: {v}");
            }
            if !ok || seeds.len() == 1 {
                println!("  trace (last {} lines):", report.trace_tail.len());
                for line in &report.trace_tail {
                    println!("    {line}");
                }
            }
        }
        if !ok {
            println!("  replay: {}", replay(*seed));
            failed.push(*seed);
        }
    }
    let real = started.elapsed().as_secs_f64();
    println!(
        "{} seeds, {} failed, {:.1} seeds/min, simulated/real time {:.1}x",
        seeds.len(),
        failed.len(),
        seeds.len() as f64 / real.max(1e-9) * 60.0,
        simulated.as_secs_f64() / real.max(1e-9)
    );
    for seed in &failed {
        println!("replay: {}", replay(*seed));
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
