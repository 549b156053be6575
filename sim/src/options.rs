//! What a run does: the seed, its size, the seams tests plug broken
//! components into, and the fault rates.
//!
//! Fault rates are a [`FaultOptions`] of probabilities and time spans, as
//! in TigerBeetle's VOPR: [`FaultOptions::from_seed`] draws each rate from
//! a range, so different seeds explore different mixes of faults (a seed
//! with a lossy network and few crashes, another with many power failures
//! and flaky sinks) instead of one fixed mix. The options are validated
//! before a run ([`FaultOptions::validate`]) and print on one line
//! (`Display`), so a failing seed shows what it ran with. Every rate is a
//! multiple of 1/1000 and every span a whole number of microseconds, so
//! the printed line is exact.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use auditflow_broker::partition::NodeId;
pub use auditflow_broker::replicated::planted::PlantedBug;
use auditflow_protocol::wire::{Request, Response};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use crate::disk::SimDisk;
use crate::sink::{sim_sinks, SinkHook};

/// What a run does.
#[derive(Clone)]
pub struct SimOptions {
    /// Everything random derives from it.
    pub seed: u64,
    /// Simulated time with workload and faults (a quiet period follows).
    pub duration: Duration,
    /// Partitions.
    pub partitions: u32,
    /// Concurrent clients.
    pub clients: usize,
    /// Fault rates: from the seed by default, [`FaultOptions::none`] for
    /// a fault-free baseline.
    pub faults: FaultOptions,
    /// Builds each node's disk (tests plug in broken disks here).
    pub disk: Arc<dyn Fn(NodeId) -> SimDisk + Send + Sync>,
    /// Sees every client request and may answer it instead of the
    /// cluster (tests plug in a broken node that acks before commit).
    pub client_hook: Option<ClientHook>,
    /// Builds the sink factory of every node from the run's simulated
    /// endpoints (tests plug in a broken sink here).
    pub sinks: SinkHook,
    /// How many of the trace's last lines the report keeps.
    pub trace_lines: usize,
    /// A bug planted in the broker for this run (G4, G5, G6 or masking
    /// broken on purpose), to show the checker catches it; `None` for the
    /// real system.
    pub planted_bug: Option<PlantedBug>,
}

/// See [`SimOptions::client_hook`]: given the request, returns `Some`
/// response to answer without asking the cluster.
pub type ClientHook = Arc<dyn Fn(&Request, &mut StdRng) -> Option<Response> + Send + Sync>;

impl SimOptions {
    /// Defaults for `seed`: 20 simulated seconds, 4 partitions, 4 clients,
    /// the seed's fault rates, correct disks.
    pub fn new(seed: u64) -> SimOptions {
        SimOptions {
            seed,
            duration: Duration::from_secs(20),
            partitions: 4,
            clients: 4,
            faults: FaultOptions::from_seed(seed),
            disk: Arc::new(|_| SimDisk::default()),
            client_hook: None,
            sinks: sim_sinks(),
            trace_lines: 200,
            planted_bug: None,
        }
    }

    /// Checks the run's size and its fault rates.
    pub fn validate(&self) -> Result<(), OptionsError> {
        if self.partitions == 0 {
            return Err(OptionsError::NoPartitions);
        }
        self.faults.validate()
    }
}

/// Why options were refused.
#[derive(Clone, Debug, PartialEq)]
pub enum OptionsError {
    /// A probability outside [0, 1], or not a number.
    Probability {
        /// The option, as `Display` names it.
        name: &'static str,
        /// Its value.
        value: f64,
    },
    /// A span whose shortest time exceeds its longest.
    Span {
        /// The option, as `Display` names it.
        name: &'static str,
        /// Its shortest time.
        min: Duration,
        /// Its longest time.
        max: Duration,
    },
    /// A span a loop waits between steps may not be zero: a loop that
    /// never waits never lets simulated time pass, and the run hangs.
    ZeroWait {
        /// The option, as `Display` names it.
        name: &'static str,
    },
    /// The faults one step of a nemesis chooses between (at most one per
    /// step) have probabilities that add up to more than 1.
    StepOverOne {
        /// Which nemesis: `cluster` or `sinks`.
        step: &'static str,
        /// The sum.
        sum: f64,
    },
    /// A run needs at least one partition.
    NoPartitions,
}

impl fmt::Display for OptionsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionsError::Probability { name, value } => {
                write!(f, "{name} is {value}, not a probability in [0, 1]")
            }
            OptionsError::Span { name, min, max } => {
                write!(f, "{name}: shortest {min:?} exceeds longest {max:?}")
            }
            OptionsError::ZeroWait { name } => {
                write!(f, "{name} may not be zero (the run would not advance)")
            }
            OptionsError::StepOverOne { step, sum } => write!(
                f,
                "the {step} faults of one step add up to {sum}, more than 1"
            ),
            OptionsError::NoPartitions => write!(f, "a run needs at least one partition"),
        }
    }
}

impl std::error::Error for OptionsError {}

/// A span of simulated time, both ends included: each draw picks a whole
/// number of microseconds in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Shortest.
    pub min: Duration,
    /// Longest.
    pub max: Duration,
}

impl Span {
    /// From `min` to `max` milliseconds.
    pub const fn ms(min: u64, max: u64) -> Span {
        Span {
            min: Duration::from_millis(min),
            max: Duration::from_millis(max),
        }
    }

    /// A duration in the span.
    pub fn draw(&self, rng: &mut impl Rng) -> Duration {
        let min = self.min.as_micros() as u64;
        let max = (self.max.as_micros() as u64).max(min);
        Duration::from_micros(rng.gen_range(min..=max))
    }

    fn check(&self, name: &'static str) -> Result<(), OptionsError> {
        if self.min > self.max {
            return Err(OptionsError::Span {
                name,
                min: self.min,
                max: self.max,
            });
        }
        Ok(())
    }

    /// As [`Span::check`], and the span may not be zero (the time a loop
    /// waits between steps).
    fn check_wait(&self, name: &'static str) -> Result<(), OptionsError> {
        self.check(name)?;
        if self.max.is_zero() {
            return Err(OptionsError::ZeroWait { name });
        }
        Ok(())
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_micros() as f64 / 1000.0;
        write!(f, "{}..{}ms", ms(self.min), ms(self.max))
    }
}

/// The fault rates of one run. Every `f64` is a probability in [0, 1].
#[derive(Clone, Debug, PartialEq)]
pub struct FaultOptions {
    /// Per-message faults of the simulated network.
    pub network: NetFaults,
    /// Faults of the nodes, their links and their disks.
    pub cluster: ClusterFaults,
    /// Faults of the destinations' endpoints.
    pub sinks: SinkFaults,
    /// Which storage writer the nodes run: drawn per seed, so sweeps
    /// cover the production writer (group commit and linger) as well as
    /// the inline one.
    pub writer: SimWriter,
}

/// The storage writer of a run's nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimWriter {
    /// Each job commits at once on the caller's task (one transaction,
    /// one Raft log write per job).
    Inline,
    /// The production writer's group commit and linger, in a task
    /// ([`auditflow_broker::storage::WriterMode::Task`]).
    Group,
}

impl SimWriter {
    /// The broker's writer mode for it.
    pub fn mode(self) -> auditflow_broker::storage::WriterMode {
        match self {
            SimWriter::Inline => auditflow_broker::storage::WriterMode::Inline,
            SimWriter::Group => auditflow_broker::storage::WriterMode::Task,
        }
    }
}

impl fmt::Display for SimWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SimWriter::Inline => "inline",
            SimWriter::Group => "group",
        })
    }
}

/// How the network treats each message (Raft RPC or client request).
#[derive(Clone, Debug, PartialEq)]
pub struct NetFaults {
    /// One-way delay of every message: its spread alone reorders
    /// messages.
    pub delay: Span,
    /// Probability a message is lost.
    pub loss: f64,
    /// Probability a Raft RPC is delivered twice (the copy arrives later:
    /// a stale duplicate).
    pub duplicate: f64,
    /// Probability a message is held back by an extra `reorder_delay`,
    /// so messages sent after it overtake it.
    pub reorder: f64,
    /// How long a held-back message is held.
    pub reorder_delay: Span,
}

/// The cluster nemesis: it waits `interval`, injects at most one fault,
/// and repeats until the workload ends. The probabilities are of one
/// step's fault; what is left of 1 is a step without one. At most one
/// node is down at a time outside power failures, so a quorum can always
/// come back.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterFaults {
    /// Time between steps.
    pub interval: Span,
    /// Every node crashes at once (unsynced writes lost everywhere), and
    /// restarts after `power_outage`.
    pub power_failure: f64,
    /// How long the power stays off.
    pub power_outage: Span,
    /// With every node up: one crashes (its unsynced writes are lost).
    pub crash: f64,
    /// With a node down: it restarts.
    pub restart: f64,
    /// One node is cut off from its peers and the clients, both ways.
    pub isolate: f64,
    /// One directed link between two nodes drops everything.
    pub cut: f64,
    /// Every partition and cut link heals.
    pub heal: f64,
    /// A running node's disk fails its next read, write or sync (one of
    /// the three, equally likely).
    pub disk_error: f64,
    /// A running node pauses for `pause_duration` (a GC or VM stall):
    /// what it sends and what is sent to it waits until it resumes, and
    /// arrives late (or not at all, if its sender gave up first).
    pub pause: f64,
    /// How long a pause lasts.
    pub pause_duration: Span,
    /// Of the restarts, the share whose node comes back with an empty
    /// data directory (its disk lost or replaced); the node then rejoins
    /// as a learner (`partition::rejoin`). Drawn for one seed in
    /// [`ranges::LOST_DISK_SEEDS`], 0 for the others (`auditflow sim
    /// --lost-disk P` sets it). With 0 no draw is made during the run.
    pub lost_disk: f64,
    /// Per crashed node and file with unsynced writes: the crash tears
    /// them instead of dropping them all: the writes since the last sync
    /// reach the disk in order up to one, of which only a prefix lands,
    /// and half the time a bit of what landed is flipped (damage past the
    /// synced point, which the storage must cut off or ignore).
    pub torn_write: f64,
    /// Of the restarts, the share whose node comes back with one bit
    /// flipped inside the synced part of one of its files (the Raft log,
    /// the database, an event file). Not drawn from the seed: 0 unless set
    /// (`auditflow sim --synced-damage P`). The Raft log now tells such
    /// damage from a torn tail and the partition rejoins as a learner,
    /// but a flip in an event file or the database has no repair path
    /// yet (the node refuses the read as corrupt), and the checker reads
    /// a partition whose repair has not ended by the end of the run as
    /// unreadable: `--seeds 40 --synced-damage 0.5` fails 9 seeds, 7 of
    /// them in event files. With 0 no draw is made.
    pub synced_damage: f64,
    /// A running node's wall clock jumps forward or back by
    /// `clock_jump_size` (an NTP step, a VM restored from a snapshot).
    pub clock_jump: f64,
    /// How far a clock jumps.
    pub clock_jump_size: Span,
}

/// The destinations' endpoints. The sink nemesis waits `interval`, then
/// takes one endpoint down or makes it slow for `fault_duration`; the
/// per-request faults are decided at each send.
#[derive(Clone, Debug, PartialEq)]
pub struct SinkFaults {
    /// Time between sink nemesis steps.
    pub interval: Span,
    /// Per step: an endpoint goes down (every send fails retryably).
    pub outage: f64,
    /// Per step: an endpoint gets slow (hundreds of ms to seconds a send).
    pub slow: f64,
    /// How long an outage or a slowness lasts.
    pub fault_duration: Span,
    /// Per send: a transient failure (a flaky endpoint).
    pub flaky: f64,
    /// Per transient failure: it carries a retry-after hint.
    pub retry_after: f64,
    /// Per send to a bulk endpoint: it stops part-way, the items from one
    /// on reported retryable and not stored.
    pub partial: f64,
    /// Per accepted send: the endpoint records the batch twice (as a
    /// retry after a lost answer would), which G3 allows.
    pub duplicate: f64,
    /// Per send: it is slow, though the endpoint is not.
    pub spike: f64,
    /// Share of event ids each destination refuses for good (content it
    /// can never accept), so they must end in its DLQ. A pure function of
    /// seed, destination and id, so a re-sent event is refused again.
    pub permanent: f64,
    /// Per request in the progress phase, after the run healed: a
    /// transient failure of an endpoint that is up (`checker::progress`).
    /// Each item sent to a per-item endpoint is a request (a single-mode
    /// webhook's POST), a batch to a whole-batch endpoint is one.
    pub progress_flaky: f64,
}

/// Where each seed's rates are drawn from: (fewest, most), probabilities
/// in thousandths, times in milliseconds (network delays in
/// microseconds). Each range is centred on the one rate the simulator used
/// for every seed before rates came from the seed, so every seed still
/// injects every kind of fault it did then, about as often.
mod ranges {
    /// Shortest one-way network delay (µs).
    pub const DELAY_MIN_US: (u64, u64) = (100, 500);
    /// Longest one-way network delay (µs): at a few tens of ms, a round
    /// trip nears the 50 ms heartbeat, and delay alone starts elections.
    pub const DELAY_MAX_US: (u64, u64) = (10_000, 30_000);
    /// Message loss.
    pub const LOSS: (u64, u64) = (0, 30);
    /// Duplicated Raft RPCs.
    pub const DUPLICATE: (u64, u64) = (0, 30);
    /// Messages held back.
    pub const REORDER: (u64, u64) = (0, 50);
    /// Shortest hold of a held-back message (ms).
    pub const REORDER_DELAY_MIN_MS: (u64, u64) = (20, 50);
    /// Longest hold (ms): past the 300 ms election timeout, a held vote
    /// request or append arrives a term late.
    pub const REORDER_DELAY_MAX_MS: (u64, u64) = (100, 400);

    /// Shortest wait between cluster faults (ms).
    pub const STEP_MIN_MS: (u64, u64) = (200, 400);
    /// Longest wait between cluster faults (ms).
    pub const STEP_MAX_MS: (u64, u64) = (1_500, 3_000);
    // The cluster step's faults: a seed whose draws add up past 1 has
    // them scaled down to 1 (see `scale_to_one`).
    /// Power failures.
    pub const POWER_FAILURE: (u64, u64) = (30, 80);
    /// Shortest power outage (ms).
    pub const POWER_OUTAGE_MIN_MS: (u64, u64) = (50, 200);
    /// Longest power outage (ms).
    pub const POWER_OUTAGE_MAX_MS: (u64, u64) = (500, 3_000);
    /// Crashes of one node.
    pub const CRASH: (u64, u64) = (200, 300);
    /// Restarts of a node that is down.
    pub const RESTART: (u64, u64) = (250, 350);
    /// Isolations of one node.
    pub const ISOLATE: (u64, u64) = (150, 250);
    /// Cuts of one directed link.
    pub const CUT: (u64, u64) = (50, 150);
    /// Network heals.
    pub const HEAL: (u64, u64) = (150, 250);
    /// Disk I/O errors.
    pub const DISK_ERROR: (u64, u64) = (50, 150);
    /// Node pauses (new with the options: no old rate to centre on).
    pub const PAUSE: (u64, u64) = (30, 100);
    /// Shortest pause (ms).
    pub const PAUSE_MIN_MS: (u64, u64) = (100, 300);
    /// Longest pause (ms): past the 600 ms longest election timeout, so
    /// a paused leader is deposed and comes back to a later term.
    pub const PAUSE_MAX_MS: (u64, u64) = (1_000, 4_000);
    /// Share of seeds whose restarts may lose the disk: most seeds keep
    /// their restarts plain, so the other faults keep their weight.
    pub const LOST_DISK_SEEDS: f64 = 0.25;
    /// Of those seeds' restarts, the share with a lost disk
    /// (thousandths): a rejoin takes a few seconds of the run, so a few
    /// per run at most.
    pub const LOST_DISK: (u64, u64) = (100, 400);

    /// Shortest wait between sink faults (ms).
    pub const SINK_STEP_MIN_MS: (u64, u64) = (300, 700);
    /// Longest wait between sink faults (ms).
    pub const SINK_STEP_MAX_MS: (u64, u64) = (2_000, 3_500);
    /// Sink outages (with slowness, scaled down to 1 when past it).
    pub const OUTAGE: (u64, u64) = (450, 750);
    /// Slow sinks.
    pub const SLOW: (u64, u64) = (300, 500);
    /// Shortest sink outage or slowness (ms).
    pub const SINK_FAULT_MIN_MS: (u64, u64) = (200, 500);
    /// Longest (ms): past the `siem` destination's last retry (about
    /// 2.6 s of backoff), events of a long outage end in its DLQ.
    pub const SINK_FAULT_MAX_MS: (u64, u64) = (2_000, 6_000);
    /// Transient send failures.
    pub const FLAKY: (u64, u64) = (10, 80);
    /// Retry-after hints on them.
    pub const RETRY_AFTER: (u64, u64) = (100, 500);
    /// Bulk sends that stop part-way.
    pub const PARTIAL: (u64, u64) = (10, 60);
    /// Batches recorded twice.
    pub const SINK_DUPLICATE: (u64, u64) = (0, 50);
    /// Slow sends of an endpoint that is not slow.
    pub const SPIKE: (u64, u64) = (0, 50);
    /// Event ids refused for good.
    pub const PERMANENT: (u64, u64) = (5, 40);
    /// Transient failures per request in the progress phase: 5 to 10 %,
    /// what a busy load balancer gives, which delivery must keep pace
    /// with (issue 33).
    pub const PROGRESS_FLAKY: (u64, u64) = (50, 100);

    /// Torn writes at a crash, per file with unsynced writes.
    pub const TORN_WRITE: (u64, u64) = (200, 800);
    /// Clock jumps per cluster step.
    pub const CLOCK_JUMP: (u64, u64) = (20, 80);
    /// Smallest clock jump (ms).
    pub const CLOCK_JUMP_MIN_MS: (u64, u64) = (100, 1_000);
    /// Largest clock jump (ms): up to two hours, past any retry or
    /// linger setting of the run.
    pub const CLOCK_JUMP_MAX_MS: (u64, u64) = (60_000, 7_200_000);
    /// Seeds (thousandths) whose nodes run the group-commit writer.
    pub const GROUP_WRITER: (u64, u64) = (500, 500);
}

/// Draws rates and spans from [`ranges`].
struct Draw(StdRng);

impl Draw {
    /// A probability in `range` (thousandths).
    fn p(&mut self, (lo, hi): (u64, u64)) -> f64 {
        self.0.gen_range(lo..=hi) as f64 / 1000.0
    }

    /// A time in `range` (ms).
    fn ms(&mut self, (lo, hi): (u64, u64)) -> Duration {
        Duration::from_millis(self.0.gen_range(lo..=hi))
    }

    /// A time in `range` (µs).
    fn us(&mut self, (lo, hi): (u64, u64)) -> Duration {
        Duration::from_micros(self.0.gen_range(lo..=hi))
    }

    /// A span from a shortest in `min` to a longest in `max` (ms).
    fn span_ms(&mut self, min: (u64, u64), max: (u64, u64)) -> Span {
        Span {
            min: self.ms(min),
            max: self.ms(max),
        }
    }
}

impl FaultOptions {
    /// The rates of seed `seed`: each drawn from its range with an RNG of
    /// its own (seeded by a hash of the seed), so the options do not take
    /// draws from the run itself, and a new option shifts no run's draws
    /// but the options' own.
    pub fn from_seed(seed: u64) -> FaultOptions {
        use ranges::*;
        let mut h = Sha256::new();
        h.update(b"auditflow-sim fault options");
        h.update(seed.to_le_bytes());
        let mut d = Draw(StdRng::from_seed(h.finalize().into()));
        let mut o = FaultOptions {
            network: NetFaults {
                delay: Span {
                    min: d.us(DELAY_MIN_US),
                    max: d.us(DELAY_MAX_US),
                },
                loss: d.p(LOSS),
                duplicate: d.p(DUPLICATE),
                reorder: d.p(REORDER),
                reorder_delay: d.span_ms(REORDER_DELAY_MIN_MS, REORDER_DELAY_MAX_MS),
            },
            cluster: ClusterFaults {
                interval: d.span_ms(STEP_MIN_MS, STEP_MAX_MS),
                power_failure: d.p(POWER_FAILURE),
                power_outage: d.span_ms(POWER_OUTAGE_MIN_MS, POWER_OUTAGE_MAX_MS),
                crash: d.p(CRASH),
                restart: d.p(RESTART),
                isolate: d.p(ISOLATE),
                cut: d.p(CUT),
                heal: d.p(HEAL),
                disk_error: d.p(DISK_ERROR),
                pause: d.p(PAUSE),
                pause_duration: d.span_ms(PAUSE_MIN_MS, PAUSE_MAX_MS),
                lost_disk: 0.0,
                // Drawn below, after every older option, so that adding
                // them shifted no older option's draw.
                torn_write: 0.0,
                synced_damage: 0.0,
                clock_jump: 0.0,
                clock_jump_size: Span::ms(0, 0),
            },
            sinks: SinkFaults {
                interval: d.span_ms(SINK_STEP_MIN_MS, SINK_STEP_MAX_MS),
                outage: d.p(OUTAGE),
                slow: d.p(SLOW),
                fault_duration: d.span_ms(SINK_FAULT_MIN_MS, SINK_FAULT_MAX_MS),
                flaky: d.p(FLAKY),
                retry_after: d.p(RETRY_AFTER),
                partial: d.p(PARTIAL),
                duplicate: d.p(SINK_DUPLICATE),
                spike: d.p(SPIKE),
                permanent: d.p(PERMANENT),
                progress_flaky: 0.0,
            },
            writer: SimWriter::Inline,
        };
        o.cluster.torn_write = d.p(TORN_WRITE);
        o.cluster.clock_jump = d.p(CLOCK_JUMP);
        o.cluster.clock_jump_size = d.span_ms(CLOCK_JUMP_MIN_MS, CLOCK_JUMP_MAX_MS);
        if d.0.gen_bool(GROUP_WRITER.0 as f64 / 1000.0) {
            o.writer = SimWriter::Group;
        }
        // Drawn last, so that every draw above is what it was before.
        if d.0.gen_bool(LOST_DISK_SEEDS) {
            o.cluster.lost_disk = d.p(LOST_DISK);
        }
        o.sinks.progress_flaky = d.p(PROGRESS_FLAKY);
        let c = &mut o.cluster;
        // Crash and restart exclude each other: the larger one counts.
        let node = c.crash.max(c.restart);
        scale_to_one(
            c.power_failure
                + node
                + c.isolate
                + c.cut
                + c.heal
                + c.disk_error
                + c.pause
                + c.clock_jump,
            &mut [
                &mut c.clock_jump,
                &mut c.power_failure,
                &mut c.crash,
                &mut c.restart,
                &mut c.isolate,
                &mut c.cut,
                &mut c.heal,
                &mut c.disk_error,
                &mut c.pause,
            ],
        );
        let s = &mut o.sinks;
        scale_to_one(s.outage + s.slow, &mut [&mut s.outage, &mut s.slow]);
        o
    }

    /// No faults at all: a baseline run where nothing goes wrong (no
    /// event is refused either). Network delays stay as they are by
    /// default, and the nemeses still step (doing nothing) so the run
    /// advances as usual.
    pub fn none() -> FaultOptions {
        FaultOptions {
            network: NetFaults {
                delay: Span {
                    min: Duration::from_micros(200),
                    max: Duration::from_millis(20),
                },
                loss: 0.0,
                duplicate: 0.0,
                reorder: 0.0,
                reorder_delay: Span::ms(0, 0),
            },
            cluster: ClusterFaults {
                interval: Span::ms(300, 2_500),
                power_failure: 0.0,
                power_outage: Span::ms(0, 0),
                crash: 0.0,
                restart: 0.0,
                isolate: 0.0,
                cut: 0.0,
                heal: 0.0,
                disk_error: 0.0,
                pause: 0.0,
                pause_duration: Span::ms(0, 0),
                lost_disk: 0.0,
                torn_write: 0.0,
                synced_damage: 0.0,
                clock_jump: 0.0,
                clock_jump_size: Span::ms(0, 0),
            },
            sinks: SinkFaults {
                interval: Span::ms(500, 3_000),
                outage: 0.0,
                slow: 0.0,
                fault_duration: Span::ms(0, 0),
                flaky: 0.0,
                retry_after: 0.0,
                partial: 0.0,
                duplicate: 0.0,
                spike: 0.0,
                permanent: 0.0,
                progress_flaky: 0.0,
            },
            writer: SimWriter::Inline,
        }
    }

    /// Checks every probability is in [0, 1], every span's ends are in
    /// order, the nemeses' waits are not zero, and the faults of one
    /// nemesis step add up to at most 1.
    pub fn validate(&self) -> Result<(), OptionsError> {
        let n = &self.network;
        let c = &self.cluster;
        let s = &self.sinks;
        for (name, value) in [
            ("net.loss", n.loss),
            ("net.duplicate", n.duplicate),
            ("net.reorder", n.reorder),
            ("cluster.power_failure", c.power_failure),
            ("cluster.crash", c.crash),
            ("cluster.restart", c.restart),
            ("cluster.isolate", c.isolate),
            ("cluster.cut", c.cut),
            ("cluster.heal", c.heal),
            ("cluster.disk_error", c.disk_error),
            ("cluster.pause", c.pause),
            ("cluster.lost_disk", c.lost_disk),
            ("cluster.torn_write", c.torn_write),
            ("cluster.synced_damage", c.synced_damage),
            ("cluster.clock_jump", c.clock_jump),
            ("sinks.outage", s.outage),
            ("sinks.slow", s.slow),
            ("sinks.flaky", s.flaky),
            ("sinks.retry_after", s.retry_after),
            ("sinks.partial", s.partial),
            ("sinks.duplicate", s.duplicate),
            ("sinks.spike", s.spike),
            ("sinks.permanent", s.permanent),
            ("sinks.progress_flaky", s.progress_flaky),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(OptionsError::Probability { name, value });
            }
        }
        n.delay.check("net.delay")?;
        n.reorder_delay.check("net.reorder_delay")?;
        c.interval.check_wait("cluster.interval")?;
        c.power_outage.check("cluster.power_outage")?;
        c.pause_duration.check("cluster.pause_duration")?;
        c.clock_jump_size.check("cluster.clock_jump_size")?;
        s.interval.check_wait("sinks.interval")?;
        s.fault_duration.check("sinks.fault_duration")?;
        // Crash and restart exclude each other (all up, or one down).
        let cluster = c.power_failure
            + c.crash.max(c.restart)
            + c.isolate
            + c.cut
            + c.heal
            + c.disk_error
            + c.pause
            + c.clock_jump;
        if cluster > 1.0 + STEP_SLACK {
            return Err(OptionsError::StepOverOne {
                step: "cluster",
                sum: cluster,
            });
        }
        let sinks = s.outage + s.slow;
        if sinks > 1.0 + STEP_SLACK {
            return Err(OptionsError::StepOverOne {
                step: "sinks",
                sum: sinks,
            });
        }
        Ok(())
    }
}

/// Scales the probabilities of one nemesis step down so that `sum` (what
/// they add up to) becomes at most 1, keeping their proportions; each
/// rounds down to a thousandth, so the sum stays at most 1 and the
/// printed values stay exact.
fn scale_to_one(sum: f64, probabilities: &mut [&mut f64]) {
    if sum <= 1.0 {
        return;
    }
    for p in probabilities.iter_mut() {
        **p = (**p / sum * 1000.0).floor() / 1000.0;
    }
}

/// What a step's probabilities may add up to above 1: the rounding of
/// adding a few thousandths in floating point, no more.
const STEP_SLACK: f64 = 1e-9;

impl fmt::Display for FaultOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = &self.network;
        let c = &self.cluster;
        let s = &self.sinks;
        write!(
            f,
            "net delay={} loss={} duplicate={} reorder={} reorder_delay={}; \
             cluster interval={} power_failure={} power_outage={} crash={} restart={} \
             isolate={} cut={} heal={} disk_error={} pause={} pause_duration={} lost_disk={} \
             torn_write={} synced_damage={} clock_jump={} clock_jump_size={}; \
             sinks interval={} outage={} slow={} fault_duration={} flaky={} retry_after={} \
             partial={} duplicate={} spike={} permanent={} progress_flaky={}; writer={}",
            n.delay,
            n.loss,
            n.duplicate,
            n.reorder,
            n.reorder_delay,
            c.interval,
            c.power_failure,
            c.power_outage,
            c.crash,
            c.restart,
            c.isolate,
            c.cut,
            c.heal,
            c.disk_error,
            c.pause,
            c.pause_duration,
            c.lost_disk,
            c.torn_write,
            c.synced_damage,
            c.clock_jump,
            c.clock_jump_size,
            s.interval,
            s.outage,
            s.slow,
            s.fault_duration,
            s.flaky,
            s.retry_after,
            s.partial,
            s.duplicate,
            s.spike,
            s.permanent,
            s.progress_flaky,
            self.writer,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_options() {
        for seed in [0, 1, 42, u64::MAX] {
            assert_eq!(FaultOptions::from_seed(seed), FaultOptions::from_seed(seed));
            assert_eq!(
                FaultOptions::from_seed(seed).to_string(),
                FaultOptions::from_seed(seed).to_string()
            );
        }
        assert_ne!(
            FaultOptions::from_seed(1),
            FaultOptions::from_seed(2),
            "seeds explore different mixes"
        );
    }

    /// The ranges are chosen so that whatever a seed draws is valid; a
    /// range widened past what a step allows fails here, not in a sweep.
    #[test]
    fn options_from_any_seed_are_valid() {
        for seed in (0..20_000).chain([u64::MAX - 1, u64::MAX]) {
            let o = FaultOptions::from_seed(seed);
            assert_eq!(o.validate(), Ok(()), "seed {seed}: {o}");
            assert_eq!(SimOptions::new(seed).validate(), Ok(()));
            let c = &o.cluster;
            for p in [c.power_failure, c.crash, c.restart, c.isolate, c.heal] {
                assert_eq!(
                    (p * 1000.0).round() / 1000.0,
                    p,
                    "seed {seed}: {p} prints exactly"
                );
            }
        }
        assert_eq!(FaultOptions::none().validate(), Ok(()));
    }

    /// The printed line names every rate with its exact value, so the
    /// options of a failing seed can be read off its output.
    #[test]
    fn options_print_on_one_line_with_exact_values() {
        let o = FaultOptions::from_seed(3);
        let line = o.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.contains(&format!("loss={} ", o.network.loss)),
            "{line}"
        );
        assert!(
            line.contains(&format!("crash={} ", o.cluster.crash)),
            "{line}"
        );
        assert!(line.contains(&format!("permanent={} ", o.sinks.permanent)));
        assert!(line.contains(&format!("progress_flaky={};", o.sinks.progress_flaky)));
        assert!(line.ends_with(&format!("writer={}", o.writer)));
        let span = Span {
            min: Duration::from_micros(250),
            max: Duration::from_millis(20),
        };
        assert_eq!(span.to_string(), "0.25..20ms");
    }

    /// One helper per rejected case: change one field of a valid set of
    /// options, and validation names what is wrong.
    fn check(change: impl FnOnce(&mut FaultOptions), expected: OptionsError) {
        let mut o = FaultOptions::from_seed(11);
        change(&mut o);
        assert_eq!(o.validate(), Err(expected));
    }

    #[test]
    fn validation_rejects_probabilities_outside_zero_to_one() {
        check(
            |o| o.network.loss = 1.5,
            OptionsError::Probability {
                name: "net.loss",
                value: 1.5,
            },
        );
        check(
            |o| o.cluster.crash = -0.1,
            OptionsError::Probability {
                name: "cluster.crash",
                value: -0.1,
            },
        );
        check(
            |o| o.cluster.lost_disk = 1.01,
            OptionsError::Probability {
                name: "cluster.lost_disk",
                value: 1.01,
            },
        );
        check(
            |o| o.sinks.permanent = 2.0,
            OptionsError::Probability {
                name: "sinks.permanent",
                value: 2.0,
            },
        );
        let mut o = FaultOptions::from_seed(11);
        o.sinks.flaky = f64::NAN;
        assert!(
            matches!(
                o.validate(),
                Err(OptionsError::Probability {
                    name: "sinks.flaky",
                    ..
                })
            ),
            "NaN is not a probability"
        );
        // The ends themselves are probabilities.
        let mut o = FaultOptions::none();
        o.network.loss = 1.0;
        o.sinks.flaky = 0.0;
        assert_eq!(o.validate(), Ok(()));
    }

    #[test]
    fn validation_rejects_inconsistent_bounds() {
        check(
            |o| o.network.delay = Span::ms(30, 10),
            OptionsError::Span {
                name: "net.delay",
                min: Duration::from_millis(30),
                max: Duration::from_millis(10),
            },
        );
        check(
            |o| o.cluster.power_outage = Span::ms(2, 1),
            OptionsError::Span {
                name: "cluster.power_outage",
                min: Duration::from_millis(2),
                max: Duration::from_millis(1),
            },
        );
        check(
            |o| o.sinks.interval = Span::ms(0, 0),
            OptionsError::ZeroWait {
                name: "sinks.interval",
            },
        );
        check(
            |o| o.cluster.interval = Span::ms(0, 0),
            OptionsError::ZeroWait {
                name: "cluster.interval",
            },
        );
    }

    #[test]
    fn validation_rejects_a_step_whose_faults_add_up_past_one() {
        let mut o = FaultOptions::from_seed(11);
        o.cluster.heal = 0.9;
        assert!(matches!(
            o.validate(),
            Err(OptionsError::StepOverOne { step: "cluster", sum }) if sum > 1.0
        ));
        let mut o = FaultOptions::from_seed(11);
        o.sinks.outage = 0.7;
        o.sinks.slow = 0.4;
        assert!(matches!(
            o.validate(),
            Err(OptionsError::StepOverOne { step: "sinks", .. })
        ));
        // Crash and restart exclude each other: only the larger counts.
        let mut o = FaultOptions::none();
        o.cluster.crash = 0.6;
        o.cluster.restart = 0.6;
        o.cluster.heal = 0.4;
        assert_eq!(o.validate(), Ok(()));
    }

    /// Sweeps cover both storage writers and every seed draws the new
    /// faults into its mix (synced damage stays off unless asked for).
    #[test]
    fn seeds_mix_both_writers_and_the_storage_and_clock_faults() {
        let mut writers = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let o = FaultOptions::from_seed(seed);
            writers.insert(o.writer.to_string());
            assert!(o.cluster.torn_write > 0.0, "seed {seed}");
            assert!(o.cluster.clock_jump > 0.0, "seed {seed}");
            assert_eq!(o.cluster.synced_damage, 0.0, "seed {seed}");
        }
        assert_eq!(writers.len(), 2, "{writers:?}");
    }

    #[test]
    fn a_run_needs_a_partition() {
        let mut o = SimOptions::new(1);
        o.partitions = 0;
        assert_eq!(o.validate(), Err(OptionsError::NoPartitions));
    }
}
