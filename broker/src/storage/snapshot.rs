//! A partition's snapshot as a stream of records, never whole in memory.
//!
//! openraft 0.9 moves a snapshot as `AsyncRead + AsyncWrite + AsyncSeek`
//! data, sent in chunks. A partition holds everything it ever stored, so
//! neither side may hold it in memory: openraft also asks for the current
//! snapshot at every start-up (for its metadata), which used to read every
//! partition whole.
//!
//! - Sending ([`SnapshotData`] from [`current`]): the data holds one redb
//!   read transaction (a consistent view matching the metadata) and
//!   encodes rows as they are read, a bounded batch at a time. Nothing is
//!   read until openraft reads, so a snapshot whose data is never read
//!   costs one transaction.
//! - Receiving ([`SnapshotData::staging`]): chunks go to the
//!   `snapshot_staging` table, in rows of at most [`STAGE_ROW_BYTES`],
//!   through the storage writer; a retried chunk seeks back and truncates.
//! - Installing ([`InstallSource`]): one write transaction reads the
//!   stream record by record into the partition's tables, so a snapshot
//!   that is cut short or damaged fails as a whole and leaves the old
//!   state in place.
//!
//! The stream: records of `u32` little-endian length + bincode
//! [`Record`], a header first (format version, partition, head, catalog,
//! replay windows), the end record last with the number of records before
//! it and the SHA-256 of every byte before it, so a truncated or damaged
//! stream is refused rather than installed.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::future::Future;
use std::io::{self, Read, SeekFrom};
use std::ops::Bound;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use super::event_files::{Appender, EventFileMeta, EventFiles, EventRef};
use super::event_runs::{self, RunWriter};
use super::state_machine::read_sm_meta;
use super::tables::{
    CURSORS, DEDUP, DLQ, EVENTS, KEY_CATALOG, KEY_EVENT_FILE, KEY_HEAD, KEY_REPLAYS,
    SNAPSHOT_STAGING,
};
use super::writer::{Commit, StorageWriter};
use super::StoreError;
use crate::replicated::delivery::ReplayWindows;
use crate::storage::apply::PartitionHead;

/// Version of the record stream; a snapshot of another version is refused.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// The encoder stops adding records to its buffer past this size: what a
/// snapshot being sent holds in memory besides openraft's chunk.
pub const FILL_BYTES: usize = 256 * 1024;

/// A received snapshot is staged in rows of this size: what a snapshot
/// being received holds in memory besides openraft's chunk.
pub const STAGE_ROW_BYTES: usize = 1024 * 1024;

/// The largest record a stream may carry (an event is far smaller; the
/// header carries the destination catalog). A longer length prefix is
/// damage, and is refused before anything is allocated for it.
pub const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

/// Encoder fills per poll while measuring a snapshot's length: measuring
/// reads the whole partition, so it yields to other tasks between slices.
const MEASURE_FILLS_PER_POLL: usize = 8;

/// One record of the stream. Values are the stored bytes of their tables.
#[derive(Serialize, Deserialize)]
enum Record<'a> {
    Header {
        format: u32,
        partition: u32,
        head: PartitionHead,
        catalog: Vec<(String, String)>,
        replays: ReplayWindows,
    },
    Cursor {
        #[serde(borrow)]
        dest: Cow<'a, str>,
        next: u64,
    },
    Dlq {
        #[serde(borrow)]
        dest: Cow<'a, str>,
        offset: u64,
        #[serde(borrow, serialize_with = "as_bytes")]
        entry: Cow<'a, [u8]>,
    },
    Event {
        offset: u64,
        #[serde(borrow, serialize_with = "as_bytes")]
        stored: Cow<'a, [u8]>,
    },
    Dedup {
        #[serde(borrow)]
        id: Cow<'a, str>,
        #[serde(borrow, serialize_with = "as_bytes")]
        entry: Cow<'a, [u8]>,
    },
    End {
        records: u64,
        /// SHA-256 of every byte before this record.
        digest: [u8; 32],
    },
}

/// Writes a byte field as serde bytes rather than a sequence of `u8`:
/// the same bincode encoding (length, then the bytes), in one copy instead
/// of a call per byte. Reading borrows it back either way.
fn as_bytes<B: AsRef<[u8]>, S: serde::Serializer>(bytes: &B, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(bytes.as_ref())
}

fn corrupt(reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what: "snapshot".into(),
        reason: reason.into(),
    }
}

fn io_err(e: StoreError) -> io::Error {
    e.into()
}

/// Where the encoder is in the partition's tables: each section resumes
/// after the last key it wrote.
#[derive(Clone)]
enum Section {
    Header,
    Cursors(Option<String>),
    Dlq(Option<(String, u64)>),
    Events(u64),
    Dedup(Option<String>),
    End,
    Done,
}

/// Encodes one partition's rows, as read from one read transaction, into
/// the record stream; a `Read` of the stream.
#[derive(Clone)]
pub(crate) struct Encoder {
    txn: Arc<ReadTransaction>,
    events: Arc<EventFiles>,
    partition: u32,
    section: Section,
    records: u64,
    /// `None` when only measuring: the end record's digest is a fixed 32
    /// bytes, so the length does not depend on it.
    digest: Option<Sha256>,
    out: Vec<u8>,
    out_pos: usize,
}

impl Encoder {
    fn new(txn: Arc<ReadTransaction>, events: Arc<EventFiles>, partition: u32) -> Encoder {
        Encoder {
            txn,
            events,
            partition,
            section: Section::Header,
            records: 0,
            digest: Some(Sha256::new()),
            out: Vec::new(),
            out_pos: 0,
        }
    }

    fn push(&mut self, record: &Record<'_>) -> Result<(), StoreError> {
        let start = self.out.len();
        self.out.extend_from_slice(&[0; 4]);
        bincode::serde::encode_into_std_write(record, &mut self.out, bincode::config::standard())
            .map_err(|e| StoreError::Encode {
            what: "snapshot record".into(),
            reason: e.to_string(),
        })?;
        let len = self.out.len() - start - 4;
        if len > MAX_RECORD_BYTES {
            return Err(StoreError::Encode {
                what: "snapshot record".into(),
                reason: format!("{len} bytes, more than {MAX_RECORD_BYTES}"),
            });
        }
        self.out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
        if let Some(digest) = &mut self.digest {
            digest.update(&self.out[start..]);
        }
        self.records += 1;
        Ok(())
    }

    fn full(&self) -> bool {
        self.out.len() - self.out_pos >= FILL_BYTES
    }

    /// Adds records until [`FILL_BYTES`] are buffered or the stream ends.
    fn fill(&mut self) -> Result<(), StoreError> {
        let p = self.partition;
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        while !self.full() {
            let txn = Arc::clone(&self.txn);
            self.section = match std::mem::replace(&mut self.section, Section::Done) {
                Section::Header => {
                    self.push(&Record::Header {
                        format: SNAPSHOT_FORMAT,
                        partition: p,
                        head: read_sm_meta(&txn, p, KEY_HEAD)?.unwrap_or_default(),
                        catalog: read_sm_meta(&txn, p, KEY_CATALOG)?.unwrap_or_default(),
                        replays: read_sm_meta(&txn, p, KEY_REPLAYS)?.unwrap_or_default(),
                    })?;
                    Section::Cursors(None)
                }
                Section::Cursors(after) => {
                    let table = txn.open_table(CURSORS)?;
                    let from = match &after {
                        Some(dest) => Bound::Excluded((p, dest.as_str())),
                        None => Bound::Included((p, "")),
                    };
                    let mut last = None;
                    for row in table.range::<(u32, &str)>((from, Bound::Unbounded))? {
                        let (k, v) = row?;
                        let (kp, dest) = k.value();
                        if kp != p {
                            break;
                        }
                        self.push(&Record::Cursor {
                            dest: Cow::Borrowed(dest),
                            next: v.value(),
                        })?;
                        last = Some(dest.to_string());
                        if self.full() {
                            break;
                        }
                    }
                    match last {
                        Some(dest) if self.full() => Section::Cursors(Some(dest)),
                        _ => Section::Dlq(None),
                    }
                }
                Section::Dlq(after) => {
                    let table = txn.open_table(DLQ)?;
                    let from = match &after {
                        Some((dest, offset)) => Bound::Excluded((p, dest.as_str(), *offset)),
                        None => Bound::Included((p, "", 0)),
                    };
                    let mut last = None;
                    for row in table.range::<(u32, &str, u64)>((from, Bound::Unbounded))? {
                        let (k, v) = row?;
                        let (kp, dest, offset) = k.value();
                        if kp != p {
                            break;
                        }
                        self.push(&Record::Dlq {
                            dest: Cow::Borrowed(dest),
                            offset,
                            entry: Cow::Borrowed(v.value()),
                        })?;
                        last = Some((dest.to_string(), offset));
                        if self.full() {
                            break;
                        }
                    }
                    match last {
                        Some(key) if self.full() => Section::Dlq(Some(key)),
                        _ => Section::Events(0),
                    }
                }
                Section::Events(from) => {
                    // The refs of about a buffer's worth of events first,
                    // then their bytes, read back to back in one read.
                    let table = txn.open_table(EVENTS)?;
                    let budget = FILL_BYTES.saturating_sub(self.out.len() - self.out_pos);
                    let mut bytes = 0usize;
                    let mut exhausted = true;
                    let taken = event_runs::refs_from(&table, p, from, |at| {
                        if bytes >= budget {
                            exhausted = false;
                            return false;
                        }
                        // A record's framing is under 24 bytes; counting
                        // that keeps the buffer within one record of
                        // FILL_BYTES.
                        bytes += at.len as usize + 24;
                        true
                    })?;
                    drop(table);
                    let (offsets, refs): (Vec<u64>, Vec<EventRef>) = taken.into_iter().unzip();
                    let next = offsets.last().and_then(|o| o.checked_add(1));
                    let mut offsets = offsets.into_iter();
                    let events = Arc::clone(&self.events);
                    events.read_many(p, &refs, |stored| {
                        let offset = offsets.next().ok_or_else(|| corrupt("ref without row"))?;
                        self.push(&Record::Event {
                            offset,
                            stored: Cow::Borrowed(stored),
                        })
                    })?;
                    match next {
                        Some(next) if !exhausted => Section::Events(next),
                        _ => Section::Dedup(None),
                    }
                }
                Section::Dedup(after) => {
                    let table = txn.open_table(DEDUP)?;
                    let from = match &after {
                        Some(id) => Bound::Excluded((p, id.as_str())),
                        None => Bound::Included((p, "")),
                    };
                    let mut last = None;
                    for row in table.range::<(u32, &str)>((from, Bound::Unbounded))? {
                        let (k, v) = row?;
                        let (kp, id) = k.value();
                        if kp != p {
                            break;
                        }
                        self.push(&Record::Dedup {
                            id: Cow::Borrowed(id),
                            entry: Cow::Borrowed(v.value()),
                        })?;
                        last = Some(id.to_string());
                        if self.full() {
                            break;
                        }
                    }
                    match last {
                        Some(id) if self.full() => Section::Dedup(Some(id)),
                        _ => Section::End,
                    }
                }
                Section::End => {
                    let records = self.records;
                    let digest = match &self.digest {
                        Some(d) => d.clone().finalize().into(),
                        None => [0; 32],
                    };
                    self.push(&Record::End { records, digest })?;
                    Section::Done
                }
                Section::Done => return Ok(()),
            };
        }
        Ok(())
    }

    /// Drops up to `n` bytes of the stream; how many it dropped (fewer
    /// only at the end).
    fn skip(&mut self, n: u64) -> Result<u64, StoreError> {
        let mut skipped = 0;
        while skipped < n {
            if self.out_pos == self.out.len() {
                self.fill()?;
                if self.out_pos == self.out.len() {
                    break;
                }
            }
            let take = (self.out.len() - self.out_pos).min((n - skipped) as usize);
            self.out_pos += take;
            skipped += take as u64;
        }
        Ok(skipped)
    }
}

impl Read for Encoder {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.out_pos == self.out.len() {
            self.fill().map_err(io_err)?;
        }
        let n = (self.out.len() - self.out_pos).min(buf.len());
        buf[..n].copy_from_slice(&self.out[self.out_pos..self.out_pos + n]);
        self.out_pos += n;
        Ok(n)
    }
}

/// Reads the staged rows of one partition in order, as one stream.
struct StagedReader {
    txn: ReadTransaction,
    partition: u32,
    next: u64,
    row: Vec<u8>,
    row_pos: usize,
}

impl Read for StagedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.row_pos == self.row.len() {
            let table = self
                .txn
                .open_table(SNAPSHOT_STAGING)
                .map_err(|e| io_err(e.into()))?;
            let Some(row) = table
                .get((self.partition, self.next))
                .map_err(|e| io_err(e.into()))?
            else {
                return Ok(0);
            };
            self.row = row.value().to_vec();
            self.row_pos = 0;
            self.next += self.row.len() as u64;
        }
        let n = (self.row.len() - self.row_pos).min(buf.len());
        buf[..n].copy_from_slice(&self.row[self.row_pos..self.row_pos + n]);
        self.row_pos += n;
        Ok(n)
    }
}

/// What an install reads: the stream of a snapshot read from a database
/// (installed as it is, as in tests) or one staged on receipt. Each
/// [`InstallSource::open`] reads it from the start, because a writer job
/// may run more than once.
pub(crate) enum InstallSource {
    Encoded {
        txn: Arc<ReadTransaction>,
        events: Arc<EventFiles>,
        partition: u32,
    },
    Staged {
        db: Arc<Database>,
        partition: u32,
    },
}

impl InstallSource {
    fn open(&self) -> Result<Box<dyn Read>, StoreError> {
        Ok(match self {
            InstallSource::Encoded {
                txn,
                events,
                partition,
            } => Box::new(Encoder::new(
                Arc::clone(txn),
                Arc::clone(events),
                *partition,
            )),
            InstallSource::Staged { db, partition } => Box::new(StagedReader {
                txn: db.begin_read()?,
                partition: *partition,
                next: 0,
                row: Vec::new(),
                row_pos: 0,
            }),
        })
    }
}

/// Reads the next record and adds its bytes to `digest`; `None` at a clean
/// end of the stream. With the record, the digest of the bytes before it.
fn next_record<'b>(
    reader: &mut dyn Read,
    scratch: &'b mut Vec<u8>,
    digest: &mut Sha256,
) -> Result<Option<(Record<'b>, [u8; 32])>, StoreError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = reader
            .read(&mut len[got..])
            .map_err(|e| corrupt(e.to_string()))?;
        if n == 0 {
            return match got {
                0 => Ok(None),
                _ => Err(corrupt("cut inside a record length")),
            };
        }
        got += n;
    }
    let len_bytes = len;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_RECORD_BYTES {
        return Err(corrupt(format!(
            "a record of {len} bytes, more than {MAX_RECORD_BYTES}"
        )));
    }
    scratch.clear();
    scratch.resize(len, 0);
    reader
        .read_exact(scratch)
        .map_err(|e| corrupt(format!("cut inside a record: {e}")))?;
    let before = digest.clone().finalize().into();
    digest.update(len_bytes);
    digest.update(&scratch[..]);
    let (record, used) =
        bincode::serde::borrow_decode_from_slice(scratch, bincode::config::standard())
            .map_err(|e| corrupt(e.to_string()))?;
    if used != scratch.len() {
        return Err(corrupt("trailing bytes in a record"));
    }
    Ok(Some((record, before)))
}

/// The partition metadata an installed snapshot carried, for the caller
/// to store with the snapshot's log id.
pub(crate) struct Installed {
    pub(crate) head: PartitionHead,
    pub(crate) catalog: Vec<(String, String)>,
    pub(crate) replays: ReplayWindows,
    /// The generation of the partition's new event file: the caller
    /// retires older ones once the install committed.
    pub(crate) event_file: u32,
}

/// Replaces partition `partition`'s rows in `txn` with the snapshot read
/// from `source`; returns the metadata it carried. Any damage fails the
/// whole install (the caller's transaction is then dropped uncommitted).
pub(crate) fn install(
    txn: &WriteTransaction,
    files: &EventFiles,
    partition: u32,
    source: &InstallSource,
) -> Result<Installed, StoreError> {
    let p = partition;
    let mut reader = source.open()?;
    let mut scratch = Vec::new();
    let mut digest = Sha256::new();
    let (head, catalog, replays) = match next_record(&mut *reader, &mut scratch, &mut digest)? {
        Some((
            Record::Header {
                format,
                partition,
                head,
                catalog,
                replays,
            },
            _,
        )) => {
            if format != SNAPSHOT_FORMAT {
                return Err(corrupt(format!(
                    "format {format}, this build reads {SNAPSHOT_FORMAT}"
                )));
            }
            if partition != p {
                return Err(corrupt(format!(
                    "a snapshot of partition {partition}, installed into {p}"
                )));
            }
            (head, catalog, replays)
        }
        Some(_) => return Err(corrupt("does not start with its header")),
        None => return Err(corrupt("empty")),
    };
    // The events go to a file of the next generation, so that the old one
    // stays whole until this transaction is durable.
    let old: EventFileMeta =
        super::state_machine::get_sm_meta(txn, p, KEY_EVENT_FILE)?.unwrap_or_default();
    let generation = old.generation.wrapping_add(1);
    files.reset(p, generation)?;
    let mut file = Appender::new(files, p, EventFileMeta { generation, len: 0 });
    let mut events = txn.open_table(EVENTS)?;
    let mut dedup = txn.open_table(DEDUP)?;
    let mut cursors = txn.open_table(CURSORS)?;
    let mut dlq = txn.open_table(DLQ)?;
    events.retain_in((p, 0)..=(p, u64::MAX), |_, _| false)?;
    if p < u32::MAX {
        dedup.retain_in((p, "")..(p + 1, ""), |_, _| false)?;
        cursors.retain_in((p, "")..(p + 1, ""), |_, _| false)?;
        dlq.retain_in((p, "", 0)..(p + 1, "", 0), |_, _| false)?;
    } else {
        dedup.retain_in((p, "").., |_, _| false)?;
        cursors.retain_in((p, "").., |_, _| false)?;
        dlq.retain_in((p, "", 0).., |_, _| false)?;
    }
    let mut runs = RunWriter::default();
    let mut records = 1u64;
    loop {
        let Some((record, before)) = next_record(&mut *reader, &mut scratch, &mut digest)? else {
            return Err(corrupt("ends before its end record"));
        };
        match record {
            Record::Cursor { dest, next } => {
                cursors.insert((p, dest.as_ref()), next)?;
            }
            Record::Dlq {
                dest,
                offset,
                entry,
            } => {
                dlq.insert((p, dest.as_ref(), offset), entry.as_ref())?;
            }
            Record::Event { offset, stored } => {
                let event: auditflow_protocol::StoredEvent =
                    super::tables::decode(&stored, "stored event")?;
                let at = file.push(&event.event.id, |buf| {
                    buf.extend_from_slice(&stored);
                    Ok(())
                })?;
                runs.push(&mut events, p, offset, at)?;
            }
            Record::Dedup { id, entry } => {
                dedup.insert((p, id.as_ref()), entry.as_ref())?;
            }
            Record::End {
                records: expected,
                digest: expected_digest,
            } => {
                if expected != records {
                    return Err(corrupt(format!(
                        "{records} records before its end, which says {expected}"
                    )));
                }
                if expected_digest != before {
                    return Err(corrupt(
                        "its bytes do not match the SHA-256 digest it ends with",
                    ));
                }
                break;
            }
            Record::Header { .. } => return Err(corrupt("a second header")),
        }
        records += 1;
    }
    if next_record(&mut *reader, &mut scratch, &mut digest)?.is_some() {
        return Err(corrupt("records after its end record"));
    }
    drop(reader);
    runs.flush(&mut events, p)?;
    super::state_machine::put_sm_meta(txn, p, KEY_EVENT_FILE, &file.finish()?)?;
    clear_staged(txn, p)?;
    Ok(Installed {
        head,
        catalog,
        replays,
        event_file: generation,
    })
}

/// Deletes partition `partition`'s staged snapshot rows.
pub(crate) fn clear_staged(txn: &WriteTransaction, partition: u32) -> Result<(), StoreError> {
    let mut staging = txn.open_table(SNAPSHOT_STAGING)?;
    staging.retain_in((partition, 0)..=(partition, u64::MAX), |_, _| false)?;
    Ok(())
}

type WriteFuture = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// The last measured stream length of each partition, with the id of the
/// snapshot it belongs to. openraft measures a snapshot at every attempt
/// to send one; a partition that applied nothing since has the same
/// snapshot (its id fixes the applied log id, so the same id means the
/// same bytes on this node), and is not read again.
#[derive(Clone, Default)]
pub struct MeasuredLengths(Arc<Mutex<BTreeMap<u32, (String, u64)>>>);

impl MeasuredLengths {
    fn get(&self, partition: u32, id: &str) -> Option<u64> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&partition)
            .filter(|(known, _)| known == id)
            .map(|(_, len)| *len)
    }

    fn put(&self, partition: u32, id: String, len: u64) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(partition, (id, len));
    }

    /// Forgets `partition`'s length: an installed snapshot replaced its
    /// rows wholesale, so nothing measured before is trusted.
    pub(crate) fn forget(&self, partition: u32) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&partition);
    }
}

/// A snapshot read from the database as it is sent.
struct Source {
    txn: Arc<ReadTransaction>,
    events: Arc<EventFiles>,
    partition: u32,
    /// The snapshot's id, and lengths measured before.
    id: String,
    lengths: MeasuredLengths,
    /// Where the next read starts (seeks only move this).
    pos: u64,
    /// The encoder and how many bytes of the stream it has given out.
    enc: Encoder,
    enc_pos: u64,
    /// The encoder as it was where the last seek led: openraft resends a
    /// failed chunk by seeking back to its start.
    mark: Option<(u64, Encoder)>,
    mark_next_read: bool,
    /// The stream's length, once measured.
    len: Option<u64>,
    /// A measurement under way: its encoder and the bytes counted.
    measuring: Option<(Encoder, u64)>,
    /// The position a seek to the end resolves to.
    end_delta: Option<i64>,
}

impl Source {
    fn reposition(&mut self) -> Result<(), StoreError> {
        if self.pos < self.enc_pos {
            match &self.mark {
                Some((at, enc)) if *at <= self.pos => {
                    self.enc = enc.clone();
                    self.enc_pos = *at;
                }
                _ => {
                    self.enc = Encoder::new(
                        Arc::clone(&self.txn),
                        Arc::clone(&self.events),
                        self.partition,
                    );
                    self.enc_pos = 0;
                }
            }
        }
        if self.pos > self.enc_pos {
            self.enc_pos += self.enc.skip(self.pos - self.enc_pos)?;
            // Past the end: reads give nothing, as for a file.
            self.pos = self.pos.max(self.enc_pos);
        }
        if self.mark_next_read && self.pos == self.enc_pos {
            self.mark = Some((self.pos, self.enc.clone()));
            self.mark_next_read = false;
        }
        Ok(())
    }

    /// Counts the stream's bytes a slice at a time; `Pending` between
    /// slices so one measurement does not hold the thread.
    fn poll_measure(&mut self, cx: &mut Context<'_>) -> Poll<Result<u64, StoreError>> {
        if let Some(len) = self.len {
            return Poll::Ready(Ok(len));
        }
        if let Some(len) = self.lengths.get(self.partition, &self.id) {
            self.len = Some(len);
            return Poll::Ready(Ok(len));
        }
        let (mut enc, mut counted) = self.measuring.take().unwrap_or_else(|| {
            let mut enc = Encoder::new(
                Arc::clone(&self.txn),
                Arc::clone(&self.events),
                self.partition,
            );
            enc.digest = None;
            (enc, 0)
        });
        for _ in 0..MEASURE_FILLS_PER_POLL {
            enc.fill()?;
            let n = enc.out.len() - enc.out_pos;
            if n == 0 {
                self.len = Some(counted);
                self.lengths.put(self.partition, self.id.clone(), counted);
                return Poll::Ready(Ok(counted));
            }
            counted += n as u64;
            enc.out_pos = enc.out.len();
        }
        self.measuring = Some((enc, counted));
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// A received snapshot being staged.
struct Staging {
    writer: StorageWriter,
    db: Arc<Database>,
    partition: u32,
    /// Bytes not staged yet, and the stream position of the first.
    buf: Vec<u8>,
    buf_start: u64,
    /// A staging write under way; nothing else moves until it is done.
    pending: Option<WriteFuture>,
    /// A seek to apply once `pending` is done.
    seek: Option<u64>,
}

impl Staging {
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(fut) = &mut self.pending {
            let result = std::task::ready!(fut.as_mut().poll(cx));
            self.pending = None;
            result.map_err(io_err)?;
        }
        Poll::Ready(Ok(()))
    }

    /// Starts staging the buffered bytes as one row.
    fn start_flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let row = Arc::new(std::mem::take(&mut self.buf));
        let key = (self.partition, self.buf_start);
        self.buf_start += row.len() as u64;
        let writer = self.writer.clone();
        self.pending = Some(Box::pin(async move {
            writer
                .write(Commit::Now, move |txn| {
                    let mut staging = txn.open_table(SNAPSHOT_STAGING)?;
                    staging.insert(key, row.as_slice())?;
                    Ok(())
                })
                .await
        }));
    }

    /// Starts cutting the staged stream back to `to` bytes.
    fn start_truncate(&mut self, to: u64) {
        let p = self.partition;
        self.buf.clear();
        self.buf_start = to;
        let writer = self.writer.clone();
        self.pending = Some(Box::pin(async move {
            writer
                .write(Commit::Now, move |txn| {
                    let mut staging = txn.open_table(SNAPSHOT_STAGING)?;
                    let straddling = match staging.range((p, 0)..(p, to))?.next_back() {
                        Some(row) => {
                            let (k, v) = row?;
                            let start = k.value().1;
                            let bytes = v.value();
                            (start + bytes.len() as u64 > to)
                                .then(|| (start, bytes[..(to - start) as usize].to_vec()))
                        }
                        None => None,
                    };
                    if let Some((start, kept)) = straddling {
                        staging.insert((p, start), kept.as_slice())?;
                    }
                    staging.retain_in((p, to)..=(p, u64::MAX), |_, _| false)?;
                    Ok(())
                })
                .await
        }));
    }
}

enum Mode {
    Source(Box<Source>),
    Staging(Box<Staging>),
}

/// openraft's snapshot data for a partition: read from the database as it
/// is sent, or staged in the database as it is received (see the module
/// documentation).
pub struct SnapshotData {
    mode: Mode,
}

impl std::fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.mode {
            Mode::Source(s) => write!(f, "SnapshotData::Source(p{}, at {})", s.partition, s.pos),
            Mode::Staging(s) => write!(
                f,
                "SnapshotData::Staging(p{}, {} staged)",
                s.partition, s.buf_start
            ),
        }
    }
}

impl SnapshotData {
    /// The snapshot `id` of `partition` as `txn` sees it; reads nothing
    /// yet.
    pub(crate) fn source(
        txn: Arc<ReadTransaction>,
        events: Arc<EventFiles>,
        partition: u32,
        id: String,
        lengths: MeasuredLengths,
    ) -> SnapshotData {
        SnapshotData {
            mode: Mode::Source(Box::new(Source {
                enc: Encoder::new(Arc::clone(&txn), Arc::clone(&events), partition),
                txn,
                events,
                partition,
                id,
                lengths,
                pos: 0,
                enc_pos: 0,
                mark: None,
                mark_next_read: false,
                len: None,
                measuring: None,
                end_delta: None,
            })),
        }
    }

    /// An empty snapshot of `partition` to receive into; the caller has
    /// cleared its staging rows.
    pub(crate) fn staging(
        writer: StorageWriter,
        db: Arc<Database>,
        partition: u32,
    ) -> SnapshotData {
        SnapshotData {
            mode: Mode::Staging(Box::new(Staging {
                writer,
                db,
                partition,
                buf: Vec::new(),
                buf_start: 0,
                pending: None,
                seek: None,
            })),
        }
    }

    /// Bytes held in memory (besides the read transaction): bounded by
    /// about [`FILL_BYTES`] or [`STAGE_ROW_BYTES`] whatever the size of
    /// the partition.
    pub fn buffered_bytes(&self) -> usize {
        match &self.mode {
            Mode::Source(s) => {
                s.enc.out.len()
                    + s.mark.as_ref().map_or(0, |(_, e)| e.out.len())
                    + s.measuring.as_ref().map_or(0, |(e, _)| e.out.len())
            }
            Mode::Staging(s) => s.buf.len(),
        }
    }

    /// Stages what is still buffered and returns what an install reads.
    pub(crate) async fn into_install_source(self) -> Result<InstallSource, StoreError> {
        match self.mode {
            Mode::Source(s) => Ok(InstallSource::Encoded {
                txn: s.txn,
                events: s.events,
                partition: s.partition,
            }),
            Mode::Staging(mut s) => {
                // Awaited here rather than through the io::Error of
                // AsyncWrite, so a failed write keeps its own error (it is
                // not damage to the snapshot).
                if let Some(pending) = s.pending.take() {
                    pending.await?;
                }
                s.start_flush();
                if let Some(flush) = s.pending.take() {
                    flush.await?;
                }
                Ok(InstallSource::Staged {
                    db: s.db,
                    partition: s.partition,
                })
            }
        }
    }
}

impl AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().mode {
            Mode::Source(s) => {
                s.reposition().map_err(io_err)?;
                let n = s.enc.read(buf.initialize_unfilled())?;
                buf.advance(n);
                s.pos += n as u64;
                s.enc_pos += n as u64;
                Poll::Ready(Ok(()))
            }
            Mode::Staging(_) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a snapshot being received is not read back",
            ))),
        }
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().mode {
            Mode::Staging(s) => {
                std::task::ready!(s.poll_pending(cx))?;
                if s.buf.len() >= STAGE_ROW_BYTES {
                    s.start_flush();
                    std::task::ready!(s.poll_pending(cx))?;
                }
                let n = data.len().min(STAGE_ROW_BYTES - s.buf.len());
                s.buf.extend_from_slice(&data[..n]);
                Poll::Ready(Ok(n))
            }
            Mode::Source(_) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a snapshot read from the database is not written to",
            ))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().mode {
            Mode::Staging(s) => {
                std::task::ready!(s.poll_pending(cx))?;
                s.start_flush();
                s.poll_pending(cx)
            }
            Mode::Source(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
        match &mut self.get_mut().mode {
            Mode::Source(s) => {
                match position {
                    SeekFrom::Start(at) => s.pos = at,
                    SeekFrom::Current(d) => {
                        s.pos = s
                            .pos
                            .checked_add_signed(d)
                            .ok_or_else(|| invalid("seek before the start"))?
                    }
                    SeekFrom::End(d) => s.end_delta = Some(d),
                }
                s.mark_next_read = true;
                Ok(())
            }
            Mode::Staging(s) => {
                let end = s.buf_start + s.buf.len() as u64;
                let at = match position {
                    SeekFrom::Start(at) => Some(at),
                    SeekFrom::Current(d) | SeekFrom::End(d) => end.checked_add_signed(d),
                };
                match at {
                    Some(at) if at <= end => {
                        s.seek = Some(at);
                        Ok(())
                    }
                    _ => Err(invalid("a snapshot chunk would leave a gap")),
                }
            }
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        match &mut self.get_mut().mode {
            Mode::Source(s) => {
                if let Some(d) = s.end_delta {
                    let len = std::task::ready!(s.poll_measure(cx)).map_err(io_err)?;
                    s.end_delta = None;
                    s.pos = len.checked_add_signed(d).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidInput, "seek before the start")
                    })?;
                }
                Poll::Ready(Ok(s.pos))
            }
            Mode::Staging(s) => {
                std::task::ready!(s.poll_pending(cx))?;
                if let Some(at) = s.seek.take() {
                    if at >= s.buf_start {
                        s.buf.truncate((at - s.buf_start) as usize);
                    } else {
                        s.start_truncate(at);
                        std::task::ready!(s.poll_pending(cx))?;
                    }
                }
                Poll::Ready(Ok(s.buf_start + s.buf.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_fields_encode_as_a_sequence_of_u8_would() {
        // The same record with its bytes as a plain `Vec<u8>` field (a
        // serde sequence): the stream format does not depend on the
        // shortcut.
        #[derive(Serialize)]
        enum Plain {
            _Header,
            _Cursor,
            _Dlq,
            Event { offset: u64, stored: Vec<u8> },
        }
        let stored: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        let fast = Record::Event {
            offset: 300,
            stored: Cow::Borrowed(&stored),
        };
        let plain = Plain::Event {
            offset: 300,
            stored: stored.clone(),
        };
        let config = bincode::config::standard();
        let fast_bytes = bincode::serde::encode_to_vec(&fast, config).unwrap();
        assert_eq!(
            fast_bytes,
            bincode::serde::encode_to_vec(&plain, config).unwrap()
        );
        let (back, _): (Record<'_>, usize) =
            bincode::serde::borrow_decode_from_slice(&fast_bytes, config).unwrap();
        assert!(
            matches!(back, Record::Event { offset: 300, stored: ref s } if s.as_ref() == stored.as_slice())
        );
    }
}
