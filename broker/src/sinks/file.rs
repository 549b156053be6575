//! JSON lines files: one file set per partition, rotated by size or age.
//!
//! The current file of partition `p` is `{prefix}-p{p}.jsonl`; a rotated
//! file is renamed `{prefix}-p{p}-{first:020}-{last:020}.jsonl` (offsets of
//! its first and last line), so rotated files sort by offset; should that
//! name be taken (the same range written twice by a replay), `.1`, `.2`,
//! ... goes before `.jsonl`. Each line is the delivered event's JSON body
//! (`Delivery::body`) and a newline. Within a file, offsets only go up: a
//! line at or below the current file's last one (a replay, a redrive)
//! starts a new file, so a file's last line is its highest offset.
//!
//! Idempotent by offset (G3), but only over what the files really hold:
//! the sink remembers the highest offset written per partition (recovered
//! from the last line of the current file and the rotated files' names),
//! and a live batch with an offset at or below it (a re-send after a
//! failover) skips the lines the files hold, so none is written twice.
//! Before it skips anything it looks at the directory again (files an
//! operator moved away no longer count) and reads the lines of the files
//! whose range meets the batch (a range has gaps: parked and filtered
//! events); it also re-reads the partition's state whenever the current
//! file is not the length it wrote. Replays and redrives (`Sink::send_again`) skip
//! nothing: a redriven event was parked, so never written, and a replay
//! is an operator asking for the events again.
//!
//! Crash safety:
//! - A batch is one append write, then (policy `always`) one `fdatasync`
//!   before it is confirmed. If the write or the sync fails, the file is
//!   cut back to its length before the batch, so the re-sent batch is
//!   written again in full instead of half-skipped.
//! - Recovery cuts a torn last line (a crash in the middle of a write:
//!   that batch was never confirmed and will be re-sent) and, with policy
//!   `always`, syncs the file before trusting its last offset, because
//!   lines it skips on a re-send are confirmed without being written again.
//! - Creating and renaming files syncs the directory (policy `always`), so
//!   the names survive a power loss together with the data.
//!
//! Rotation is checked when a batch arrives: a file can exceed `max_bytes`
//! by at most one batch, and an idle partition's file is not rotated until
//! its next event. The age of a file counts from when this process started
//! writing it (file systems do not reliably record creation times).
//!
//! Each partition's file set must have one writer: the delivery actor of
//! that (destination, partition), which lives on the partition leader.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{Delivery, SendOutcome, Sink, SinkConfigError, SinkFailure};

/// Chunk size of the backwards scan for the last line at recovery: large
/// enough that a typical last line (events are at most 64 KiB by default)
/// is found in one or two reads, small enough to keep recovery's memory
/// flat whatever the file size.
const SCAN_CHUNK_BYTES: u64 = 64 * 1024;

/// When to fsync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// After every batch, before confirming it (nothing confirmed is lost).
    #[default]
    Always,
    /// Leave it to the OS (faster; a power loss may lose confirmed lines).
    Never,
}

/// Settings of a file destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of the files (created if missing).
    pub dir: PathBuf,
    /// File name prefix, so several destinations can share a directory.
    /// ASCII letters, digits, `-`, `_` and `.` only: it ends up in file
    /// names and must not smuggle in a path separator.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Rotate the current file once it reaches this size (default 64 MiB),
    /// so files stay small enough to ship, compress and delete one by one.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Rotate the current file once it is this old (seconds), so a quiet
    /// partition still produces closed files for downstream collectors.
    /// No time rotation if absent.
    #[serde(default)]
    pub max_age_secs: Option<u64>,
    /// When to fsync: `always` (default, confirmed lines survive a power
    /// loss) or `never`.
    #[serde(default)]
    pub fsync: FsyncPolicy,
}

fn default_prefix() -> String {
    "events".into()
}

fn default_max_bytes() -> u64 {
    64 * 1024 * 1024
}

/// An I/O error with what the sink was doing and on which path, so the
/// attempt history tells an operator what to fix.
#[derive(Debug)]
struct FileError {
    /// The operation, e.g. "append to".
    op: &'static str,
    /// The file or directory.
    path: PathBuf,
    /// What the OS said.
    source: io::Error,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.op, self.path.display(), self.source)
    }
}

/// Attaches an operation and a path to an I/O error.
fn at<T>(op: &'static str, path: &Path, r: io::Result<T>) -> Result<T, FileError> {
    r.map_err(|source| FileError {
        op,
        path: path.to_path_buf(),
        source,
    })
}

/// Rotated names tried for one file before giving up: the same offset
/// range rotated this often means an operator replayed it that often, and
/// a retry later (after files were moved away) finds a free name.
const MAX_NAME_SUFFIX: u32 = 1000;

/// State of one partition's current file.
struct Current {
    /// Highest offset written, if any (in any file of the partition): the
    /// live stream skips what is at or below it.
    last: Option<u64>,
    /// First offset in the current file, for the rotated file's name.
    first_in_file: Option<u64>,
    /// Offset of the current file's last line: its highest, since offsets
    /// only go up within a file. A line at or below it starts a new file.
    last_in_file: Option<u64>,
    /// Size of the current file; equals its length on disk, because this
    /// sink is the only writer.
    bytes: u64,
    /// When this process started writing the current file.
    opened: Instant,
}

/// The file sink.
pub struct FileSink {
    /// The checked settings.
    config: Config,
    /// Known state per partition; a partition is missing until its first
    /// batch and after a failed one, and is then recovered from disk.
    partitions: BTreeMap<u32, Current>,
}

impl FileSink {
    /// Checks the settings; the directory and files are opened on first
    /// send, so a missing mount at start-up does not stop the node.
    pub fn new(config: Config) -> Result<FileSink, SinkConfigError> {
        let bad = |reason: String| SinkConfigError {
            kind: "file",
            reason,
        };
        if config.dir.as_os_str().is_empty() {
            return Err(bad("dir must not be empty".into()));
        }
        if config.prefix.is_empty()
            || !config
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(bad(format!(
                "prefix {:?}: ASCII letters, digits, '-', '_' or '.'",
                config.prefix
            )));
        }
        if config.max_bytes == 0 {
            return Err(bad("max_bytes must be positive".into()));
        }
        if config.max_age_secs == Some(0) {
            return Err(bad(
                "max_age_secs must be positive (leave it out for no time rotation)".into(),
            ));
        }
        Ok(FileSink {
            config,
            partitions: BTreeMap::new(),
        })
    }
}

fn current_path(config: &Config, partition: u32) -> PathBuf {
    config
        .dir
        .join(format!("{}-p{partition}.jsonl", config.prefix))
}

/// Name of a rotated file.
pub fn rotated_name(prefix: &str, partition: u32, first: u64, last: u64) -> String {
    format!("{prefix}-p{partition}-{first:020}-{last:020}.jsonl")
}

/// Name of a rotated file whose plain name is taken: `suffix` (≥ 1) goes
/// before `.jsonl`.
fn rotated_name_with(prefix: &str, partition: u32, first: u64, last: u64, suffix: u32) -> String {
    if suffix == 0 {
        return rotated_name(prefix, partition, first, last);
    }
    format!("{prefix}-p{partition}-{first:020}-{last:020}.{suffix}.jsonl")
}

/// Parses a rotated file name of `partition` (with or without a `.n`
/// suffix): its (first, last) offsets.
pub fn parse_rotated(prefix: &str, partition: u32, name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix(&format!("{prefix}-p{partition}-"))?;
    let rest = rest.strip_suffix(".jsonl")?;
    let rest = match rest.split_once('.') {
        Some((range, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => range,
        Some(_) => return None,
        None => rest,
    };
    let (first, last) = rest.split_once('-')?;
    if first.len() != 20
        || last.len() != 20
        || !first.bytes().all(|b| b.is_ascii_digit())
        || !last.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some((first.parse().ok()?, last.parse().ok()?))
}

/// The `offset` field of a written line.
fn offset_of_line(line: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    v.get("offset")?.as_u64()
}

/// Position of the last `\n` in `file[..end]`, scanning backwards in
/// bounded chunks.
fn last_newline_before(file: &mut File, end: u64) -> io::Result<Option<u64>> {
    let mut hi = end;
    let mut buf = Vec::new();
    while hi > 0 {
        let lo = hi.saturating_sub(SCAN_CHUNK_BYTES);
        file.seek(SeekFrom::Start(lo))?;
        buf.clear();
        (&mut *file).take(hi - lo).read_to_end(&mut buf)?;
        if buf.len() as u64 != hi - lo {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being read",
            ));
        }
        if let Some(i) = buf.iter().rposition(|b| *b == b'\n') {
            return Ok(Some(lo + i as u64));
        }
        hi = lo;
    }
    Ok(None)
}

/// Reads `file[start..end]`.
fn read_range(file: &mut File, start: u64, end: u64) -> io::Result<Vec<u8>> {
    file.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    (&mut *file).take(end - start).read_to_end(&mut buf)?;
    Ok(buf)
}

/// The partition's rotated files now in the directory (created if
/// missing), each with the (first, last) offsets its name gives.
fn rotated_files(config: &Config, partition: u32) -> Result<Vec<(u64, u64, PathBuf)>, FileError> {
    let dir = &config.dir;
    at("create directory", dir, std::fs::create_dir_all(dir))?;
    let mut files = Vec::new();
    for entry in at("list directory", dir, std::fs::read_dir(dir))? {
        let name = at("list directory", dir, entry)?.file_name();
        if let Some((first, last)) =
            parse_rotated(&config.prefix, partition, &name.to_string_lossy())
        {
            files.push((first, last, dir.join(name)));
        }
    }
    Ok(files)
}

/// Recovers a partition's state from disk (see the module docs).
fn recover(config: &Config, partition: u32) -> Result<Current, FileError> {
    let last_rotated = rotated_files(config, partition)?
        .into_iter()
        .map(|(_, last, _)| last)
        .max();
    let path = current_path(config, partition);
    let empty = |last| Current {
        last,
        first_in_file: None,
        last_in_file: None,
        bytes: 0,
        opened: Instant::now(),
    };
    let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(empty(last_rotated)),
        Err(e) => return at("open", &path, Err(e)),
    };
    let len = at("inspect", &path, file.metadata())?.len();
    let complete = at("read", &path, last_newline_before(&mut file, len))?.map_or(0, |i| i + 1);
    if complete < len {
        // A torn line from a crash in the middle of a write: its batch
        // was never confirmed and will be re-sent in full.
        at("cut torn last line of", &path, file.set_len(complete))?;
    }
    if complete == 0 {
        return Ok(empty(last_rotated));
    }
    if config.fsync == FsyncPolicy::Always {
        // Lines found here are skipped when re-sent and so confirmed
        // without being written again: make sure they are durable.
        at("sync", &path, file.sync_data())?;
    }
    let start =
        at("read", &path, last_newline_before(&mut file, complete - 1))?.map_or(0, |i| i + 1);
    let last_line = at("read", &path, read_range(&mut file, start, complete - 1))?;
    at("read", &path, file.seek(SeekFrom::Start(0)))?;
    let mut first_line = Vec::new();
    at(
        "read",
        &path,
        BufReader::new(&mut file)
            .take(complete)
            .read_until(b'\n', &mut first_line),
    )?;
    let no_offset = |which: &str| FileError {
        op: "recover last offset from",
        path: path.clone(),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "its {which} line has no \"offset\" field, so the sink cannot tell what was \
                 already written; move the file away to continue"
            ),
        ),
    };
    let last_current = offset_of_line(&last_line).ok_or_else(|| no_offset("last"))?;
    let first_in_file = offset_of_line(&first_line).ok_or_else(|| no_offset("first"))?;
    Ok(Current {
        last: Some(last_current).max(last_rotated),
        first_in_file: Some(first_in_file),
        last_in_file: Some(last_current),
        bytes: complete,
        opened: Instant::now(),
    })
}

/// Syncs a directory, so names created or renamed in it survive a power
/// loss.
fn sync_dir(dir: &Path) -> Result<(), FileError> {
    let d = at("open directory", dir, File::open(dir))?;
    at("sync directory", dir, d.sync_all())
}

/// Whether the current file is still the one this sink wrote: as long as
/// the state says. A file moved away, replaced or cut by someone else
/// means the state no longer tells what the files hold.
fn still_current(config: &Config, partition: u32, state: &Current) -> bool {
    match std::fs::metadata(current_path(config, partition)) {
        Ok(m) => m.len() == state.bytes,
        Err(e) => e.kind() == io::ErrorKind::NotFound && state.bytes == 0,
    }
}

/// Closes the current file under its rotated name (a free one) and starts
/// a new one.
fn rotate(config: &Config, partition: u32, state: &mut Current) -> Result<(), FileError> {
    let path = current_path(config, partition);
    if let (Some(first), Some(last)) = (state.first_in_file, state.last_in_file) {
        let mut suffix = 0;
        let rotated = loop {
            let name = rotated_name_with(&config.prefix, partition, first, last, suffix);
            let candidate = config.dir.join(name);
            // The sink is the only writer of these names, so a name free
            // now is free at the rename.
            if !at("inspect", &candidate, candidate.try_exists())? {
                break candidate;
            }
            suffix += 1;
            if suffix > MAX_NAME_SUFFIX {
                return at(
                    "rotate",
                    &path,
                    Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{MAX_NAME_SUFFIX} files already hold offsets {first}..={last}"),
                    )),
                );
            }
        };
        at("rotate", &path, std::fs::rename(&path, &rotated))?;
        if config.fsync == FsyncPolicy::Always {
            sync_dir(&config.dir)?;
        }
    }
    state.bytes = 0;
    state.first_in_file = None;
    state.last_in_file = None;
    state.opened = Instant::now();
    Ok(())
}

/// Splits `lines` into runs that can each go to one file: offsets strictly
/// ascending within a run, so a run starts wherever an offset does not go
/// up (a replayed range behind the live stream, an unordered batch).
fn ascending_runs(lines: &[(u64, Vec<u8>)]) -> Vec<&[(u64, Vec<u8>)]> {
    let mut runs = Vec::new();
    let mut start = 0;
    for (i, pair) in lines.windows(2).enumerate() {
        if pair[1].0 <= pair[0].0 {
            runs.push(&lines[start..=i]);
            start = i + 1;
        }
    }
    if start < lines.len() {
        runs.push(&lines[start..]);
    }
    runs
}

/// Which of `wanted` the partition's files hold now, read from their
/// lines. Only files whose offset range (the current file's state, a
/// rotated file's name) meets `wanted` are read, but a range is not taken
/// for its lines: it has gaps (parked or filtered events, a replay beside
/// the live stream, a line an operator cut out), and a line skipped
/// because of one would be confirmed without ever being written.
fn held(
    config: &Config,
    partition: u32,
    state: &Current,
    wanted: &BTreeSet<u64>,
) -> Result<BTreeSet<u64>, FileError> {
    let (Some(lo), Some(hi)) = (wanted.first(), wanted.last()) else {
        return Ok(BTreeSet::new());
    };
    let mut files = rotated_files(config, partition)?;
    if let (Some(first), Some(last)) = (state.first_in_file, state.last_in_file) {
        files.push((first, last, current_path(config, partition)));
    }
    let mut held = BTreeSet::new();
    for (first, last, path) in files {
        if first <= *hi && *lo <= last {
            offsets_in(&path, wanted, &mut held)?;
        }
    }
    Ok(held)
}

/// Adds to `held` the offsets of `wanted` that `path` has whole lines of.
/// A file gone meanwhile (moved away) holds nothing; a torn last line
/// (a write in progress elsewhere, a crash) does not count.
fn offsets_in(
    path: &Path,
    wanted: &BTreeSet<u64>,
    held: &mut BTreeSet<u64>,
) -> Result<(), FileError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return at("open", path, Err(e)),
    };
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    loop {
        line.clear();
        at("read", path, reader.read_until(b'\n', &mut line))?;
        let Some(body) = line.strip_suffix(b"\n") else {
            return Ok(());
        };
        if let Some(offset) = offset_of_line(body).filter(|o| wanted.contains(o)) {
            held.insert(offset);
        }
    }
}

/// Writes `lines` (with their offsets) to the partition's current file,
/// rotating first if due, and before any line that would not go above the
/// file's last one. Runs on a blocking thread.
fn write_batch(
    config: &Config,
    partition: u32,
    state: &mut Current,
    lines: &[(u64, Vec<u8>)],
) -> Result<(), FileError> {
    for run in ascending_runs(lines) {
        write_run(config, partition, state, run)?;
    }
    Ok(())
}

/// Writes one ascending run (see [`write_batch`]).
fn write_run(
    config: &Config,
    partition: u32,
    state: &mut Current,
    lines: &[(u64, Vec<u8>)],
) -> Result<(), FileError> {
    let path = current_path(config, partition);
    let always = config.fsync == FsyncPolicy::Always;
    let too_old = config
        .max_age_secs
        .is_some_and(|s| state.opened.elapsed() >= Duration::from_secs(s));
    let goes_back = match (lines.first(), state.last_in_file) {
        (Some((first, _)), Some(last)) => *first <= last,
        _ => false,
    };
    if state.bytes > 0 && (state.bytes >= config.max_bytes || too_old || goes_back) {
        rotate(config, partition, state)?;
    }
    let mut buf = Vec::with_capacity(lines.iter().map(|(_, l)| l.len() + 1).sum());
    for (_, line) in lines {
        buf.extend_from_slice(line);
        buf.push(b'\n');
    }
    let new_file = state.bytes == 0;
    let mut f = at(
        "open",
        &path,
        OpenOptions::new().create(true).append(true).open(&path),
    )?;
    let written = f
        .write_all(&buf)
        .and_then(|()| if always { f.sync_data() } else { Ok(()) });
    if let Err(e) = written {
        // Cut back to before the batch (best effort; recovery also cuts a
        // torn line), so the re-sent batch is written again in full rather
        // than partly skipped as already present.
        let _ = f.set_len(state.bytes);
        return at("append to", &path, Err(e));
    }
    if new_file && always {
        sync_dir(&config.dir)?;
    }
    state.bytes += buf.len() as u64;
    if state.first_in_file.is_none() {
        state.first_in_file = lines.first().map(|(o, _)| *o);
    }
    if let Some((o, _)) = lines.last() {
        state.last_in_file = Some(*o);
        state.last = state.last.max(Some(*o));
    }
    Ok(())
}

impl FileSink {
    /// Writes a batch; `again` (a replay or redrive) skips nothing.
    async fn write(&mut self, batch: &[Delivery], again: bool) -> SendOutcome {
        let Some(partition) = batch.first().map(|d| d.partition) else {
            return SendOutcome::Delivered;
        };
        if let Some(d) = batch.iter().find(|d| d.partition != partition) {
            // The caller broke the contract (one partition per batch);
            // writing would mix file sets, so refuse the batch.
            return SendOutcome::Failed(SinkFailure::permanent(format!(
                "batch mixes partitions {partition} and {}",
                d.partition
            )));
        }
        let lines: Vec<(u64, Vec<u8>)> = batch
            .iter()
            .map(|d| (d.offset, d.body.as_str().as_bytes().to_vec()))
            .collect();
        let config = self.config.clone();
        let state = self.partitions.remove(&partition);
        let result = tokio::task::spawn_blocking(move || {
            let mut state = match state {
                Some(s) if still_current(&config, partition, &s) => s,
                _ => recover(&config, partition)?,
            };
            let may_skip = lines
                .iter()
                .any(|(o, _)| state.last.is_some_and(|l| *o <= l));
            let fresh = if again || !may_skip {
                lines
            } else {
                // A re-sent batch: skip only what the files hold now
                // (files may have been moved away since the state was
                // read), so read it again from the directory.
                state = recover(&config, partition)?;
                let wanted = lines.iter().map(|(o, _)| *o).collect();
                let held = held(&config, partition, &state, &wanted)?;
                lines
                    .into_iter()
                    .filter(|(o, _)| !held.contains(o))
                    .collect()
            };
            if !fresh.is_empty() {
                write_batch(&config, partition, &mut state, &fresh)?;
            }
            Ok::<_, FileError>(state)
        })
        .await;
        match result {
            Ok(Ok(state)) => {
                self.partitions.insert(partition, state);
                SendOutcome::Delivered
            }
            // The in-memory state is dropped: the next send recovers
            // it from what actually reached the disk. Every I/O error
            // is retryable: a full disk or a wrong permission is fixed
            // by an operator, and then delivery resumes by itself.
            Ok(Err(e)) => SendOutcome::Failed(SinkFailure::retryable(format!(
                "file sink partition {partition}: cannot {e}"
            ))),
            Err(e) => SendOutcome::Failed(SinkFailure::retryable(format!(
                "file sink partition {partition}: writer task failed: {e}"
            ))),
        }
    }
}

impl Sink for FileSink {
    fn send<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, SendOutcome> {
        Box::pin(self.write(batch, false))
    }

    fn send_again<'a>(&'a mut self, batch: &'a [Delivery]) -> BoxFuture<'a, SendOutcome> {
        Box::pin(self.write(batch, true))
    }
}

#[cfg(test)]
mod tests {
    use auditflow_protocol::{Hash32, Timestamp};
    use proptest::prelude::*;

    use super::*;

    fn delivery(partition: u32, offset: u64) -> Delivery {
        Delivery {
            partition,
            offset,
            event_id: format!("e{offset}"),
            tenant: "t".into(),
            received_at: Timestamp(1),
            hash: Hash32::ZERO,
            body: crate::sinks::Body::from_value(
                &serde_json::json!({"partition": partition, "offset": offset, "event": {"id": format!("e{offset}")}}),
            ),
        }
    }

    fn lines(path: &Path) -> Vec<u64> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| offset_of_line(l.as_bytes()))
            .collect()
    }

    fn config(dir: &Path) -> Config {
        Config {
            dir: dir.to_path_buf(),
            prefix: "events".into(),
            max_bytes: 1 << 20,
            max_age_secs: None,
            fsync: FsyncPolicy::Always,
        }
    }

    #[test]
    fn config_defaults_and_unknown_fields() {
        let c: Config = toml::from_str("dir = \"/x\"").unwrap();
        assert_eq!(c.prefix, "events");
        assert_eq!(c.max_bytes, 64 * 1024 * 1024);
        assert_eq!(c.max_age_secs, None);
        assert_eq!(c.fsync, FsyncPolicy::Always);
        assert!(toml::from_str::<Config>("dir = \"/x\"\nfsync = \"never\"").is_ok());
        assert!(toml::from_str::<Config>("dir = \"/x\"\nmax_size = 1").is_err());
        assert!(FileSink::new(Config {
            prefix: "../x".into(),
            ..config(Path::new("/x"))
        })
        .is_err());
    }

    /// A crash in the middle of a write leaves a torn last line; recovery
    /// must cut it, or the next line would be glued to it and the torn
    /// event would never be written whole.
    #[tokio::test]
    async fn recovery_cuts_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events-p1.jsonl");
        let mut sink = FileSink::new(config(dir.path())).unwrap();
        let b: Vec<_> = (0..3).map(|o| delivery(1, o)).collect();
        assert_eq!(sink.send(&b).await, SendOutcome::Delivered);
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(b"{\"partition\":1,\"offs");
        std::fs::write(&path, &text).unwrap();
        let mut again = FileSink::new(config(dir.path())).unwrap();
        let b: Vec<_> = (2..5).map(|o| delivery(1, o)).collect();
        assert_eq!(again.send(&b).await, SendOutcome::Delivered);
        assert_eq!(lines(&path), (0..5).collect::<Vec<_>>());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 5, "{text}");
    }

    /// Every offset in every file of partition `p` (current and rotated),
    /// sorted, duplicates kept.
    fn all_offsets(dir: &Path, p: u32) -> Vec<u64> {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name == format!("events-p{p}.jsonl") || parse_rotated("events", p, &name).is_some() {
                all.extend(lines(&path));
            }
        }
        all.sort_unstable();
        all
    }

    fn batch(p: u32, offsets: impl IntoIterator<Item = u64>) -> Vec<Delivery> {
        offsets.into_iter().map(|o| delivery(p, o)).collect()
    }

    #[tokio::test]
    async fn unordered_or_mixed_batches_write_no_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::new(config(dir.path())).unwrap();
        let b = [delivery(0, 3), delivery(0, 1), delivery(0, 4)];
        assert_eq!(sink.send(&b).await, SendOutcome::Delivered);
        // Nothing held is skipped; the line going back starts a new file.
        assert_eq!(all_offsets(dir.path(), 0), vec![1, 3, 4]);
        assert_eq!(sink.send(&b).await, SendOutcome::Delivered);
        assert_eq!(all_offsets(dir.path(), 0), vec![1, 3, 4]);
        match sink.send(&[delivery(0, 5), delivery(1, 6)]).await {
            SendOutcome::Failed(f) => assert!(!f.is_retryable()),
            other => panic!("{other:?}"),
        }
    }

    /// The bug (issue 27): the sink skipped every offset at or below the
    /// last one it had written, whatever the files still held, so after
    /// the delivered files were moved away a replay reported events
    /// queued and wrote none, and a DLQ redrive (an event parked, so
    /// never written) was resolved without a line.
    #[tokio::test]
    async fn replay_and_redrive_write_again_what_the_files_do_not_hold() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::new(config(dir.path())).unwrap();
        // Offset 2 is parked, so the live stream goes on without it.
        for b in [batch(0, [0, 1]), batch(0, [3, 4])] {
            assert_eq!(sink.send(&b).await, SendOutcome::Delivered);
        }
        // Redrive: the parked event is written although 4 is.
        assert_eq!(
            sink.send_again(&batch(0, [2])).await,
            SendOutcome::Delivered
        );
        assert_eq!(all_offsets(dir.path(), 0), vec![0, 1, 2, 3, 4]);
        // The live stream goes on where it was; a re-send (failover) of
        // what the files hold writes nothing twice.
        assert_eq!(sink.send(&batch(0, 3..7)).await, SendOutcome::Delivered);
        assert_eq!(all_offsets(dir.path(), 0), vec![0, 1, 2, 3, 4, 5, 6]);
        // The delivered files are moved away: a replay writes them all
        // again, and so does the live re-send of a batch, through the
        // same sink and through a new one (a restarted node).
        let moved = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            std::fs::rename(&path, moved.path().join(path.file_name().unwrap())).unwrap();
        }
        assert_eq!(
            sink.send_again(&batch(0, 0..7)).await,
            SendOutcome::Delivered
        );
        assert_eq!(all_offsets(dir.path(), 0), (0..7).collect::<Vec<_>>());
        let mut restarted = FileSink::new(config(dir.path())).unwrap();
        assert_eq!(
            restarted.send(&batch(0, 5..9)).await,
            SendOutcome::Delivered
        );
        assert_eq!(all_offsets(dir.path(), 0), (0..9).collect::<Vec<_>>());
    }

    /// A replay while the files still hold the range writes it again (an
    /// operator asked for it) into files of its own, whose names stay
    /// unique, and the live stream neither repeats nor loses a line.
    #[tokio::test]
    async fn a_replay_beside_held_files_gets_files_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::new(config(dir.path())).unwrap();
        assert_eq!(sink.send(&batch(0, 0..2)).await, SendOutcome::Delivered);
        for _ in 0..2 {
            assert_eq!(
                sink.send_again(&batch(0, 0..2)).await,
                SendOutcome::Delivered
            );
        }
        assert_eq!(all_offsets(dir.path(), 0), vec![0, 0, 0, 1, 1, 1]);
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                rotated_name_with("events", 0, 0, 1, 1),
                rotated_name("events", 0, 0, 1),
                "events-p0.jsonl".to_string(),
            ]
        );
        // Each file's lines go up, so a restarted sink knows the highest.
        let mut restarted = FileSink::new(config(dir.path())).unwrap();
        assert_eq!(
            restarted.send(&batch(0, 1..4)).await,
            SendOutcome::Delivered
        );
        assert_eq!(all_offsets(dir.path(), 0), vec![0, 0, 0, 1, 1, 1, 2, 3]);
    }

    /// A live re-send skips only the ranges still in the directory: a
    /// rotated file moved away no longer counts.
    #[tokio::test]
    async fn a_resend_skips_only_files_still_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::new(Config {
            max_bytes: 1,
            ..config(dir.path())
        })
        .unwrap();
        for b in [batch(0, 0..2), batch(0, 2..4)] {
            assert_eq!(sink.send(&b).await, SendOutcome::Delivered);
        }
        std::fs::remove_file(dir.path().join(rotated_name("events", 0, 0, 1))).unwrap();
        assert_eq!(sink.send(&batch(0, 0..5)).await, SendOutcome::Delivered);
        assert_eq!(all_offsets(dir.path(), 0), (0..5).collect::<Vec<_>>());
    }

    /// A range is not its lines: with offset 2 parked, the files span
    /// 0..=4 but hold no line 2, so a live re-send holding 2 writes it
    /// (before, the range alone decided, and 2 was confirmed unwritten).
    /// Likewise a line cut out of the current file.
    #[tokio::test]
    async fn a_resend_skips_only_the_lines_the_files_hold() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::new(config(dir.path())).unwrap();
        for b in [batch(0, [0, 1]), batch(0, [3, 4])] {
            assert_eq!(sink.send(&b).await, SendOutcome::Delivered);
        }
        assert_eq!(sink.send(&batch(0, 1..6)).await, SendOutcome::Delivered);
        assert_eq!(all_offsets(dir.path(), 0), (0..6).collect::<Vec<_>>());

        let path = dir.path().join("events-p1.jsonl");
        assert_eq!(sink.send(&batch(1, 0..4)).await, SendOutcome::Delivered);
        let text = std::fs::read_to_string(&path).unwrap();
        let kept: String = text
            .lines()
            .filter(|l| offset_of_line(l.as_bytes()) != Some(1))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&path, kept).unwrap();
        assert_eq!(sink.send(&batch(1, 0..4)).await, SendOutcome::Delivered);
        assert_eq!(all_offsets(dir.path(), 1), (0..4).collect::<Vec<_>>());
    }

    proptest! {
        #[test]
        fn rotated_names_round_trip(p in 0u32..1000, a in any::<u64>(), b in any::<u64>()) {
            let name = rotated_name("events", p, a, b);
            prop_assert_eq!(parse_rotated("events", p, &name), Some((a, b)));
            prop_assert_eq!(parse_rotated("events", p + 1, &name), None);
            prop_assert_eq!(parse_rotated("event", p, &name), None);
            let n = rotated_name_with("events", p, a, b, p + 1);
            prop_assert_eq!(parse_rotated("events", p, &n), Some((a, b)));
            prop_assert_eq!(parse_rotated("events", p, &n.replace(".jsonl", "x.jsonl")), None);
        }
    }
}
