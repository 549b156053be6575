//! Sending: the encoder that turns one read transaction's view of a
//! partition into the record stream, and the source openraft reads,
//! seeks and measures.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use redb::ReadTransaction;
use sha2::{Digest, Sha256};

use super::format::{corrupt, io_err, Record, MAX_RECORD_BYTES, SNAPSHOT_FORMAT};
use crate::storage::event_files::{EventFiles, EventRef};
use crate::storage::event_runs;
use crate::storage::state_machine::read_sm_meta;
use crate::storage::tables::{CURSORS, DEDUP, DLQ, EVENTS, KEY_CATALOG, KEY_HEAD, KEY_REPLAYS};
use crate::storage::StoreError;

/// The encoder stops adding records to its buffer past this size: what a
/// snapshot being sent holds in memory besides openraft's chunk.
pub const FILL_BYTES: usize = 256 * 1024;

/// Encoder fills per poll while measuring a snapshot's length: measuring
/// reads the whole partition, so it yields to other tasks between slices.
const MEASURE_FILLS_PER_POLL: usize = 8;

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
    pub(super) txn: Arc<ReadTransaction>,
    pub(super) events: Arc<EventFiles>,
    pub(super) partition: u32,
    section: Section,
    pub(super) records: u64,
    /// `None` when only measuring: the end record's digest is a fixed 32
    /// bytes, so the length does not depend on it.
    pub(super) digest: Option<Sha256>,
    pub(super) out: Vec<u8>,
    out_pos: usize,
}

impl Encoder {
    pub(super) fn new(
        txn: Arc<ReadTransaction>,
        events: Arc<EventFiles>,
        partition: u32,
    ) -> Encoder {
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

    pub(super) fn push(&mut self, record: &Record<'_>) -> Result<(), StoreError> {
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

/// The last measured stream length of each partition, with the id of the
/// snapshot it belongs to. openraft measures a snapshot at every attempt
/// to send one; a partition that applied nothing since has the same
/// snapshot (its id fixes the applied log id, so the same id means the
/// same bytes on this node), and is not read again.
#[derive(Clone, Default)]
pub struct MeasuredLengths(Arc<Mutex<BTreeMap<u32, (String, u64)>>>);

impl MeasuredLengths {
    pub(super) fn get(&self, partition: u32, id: &str) -> Option<u64> {
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
pub(super) struct Source {
    pub(super) txn: Arc<ReadTransaction>,
    pub(super) events: Arc<EventFiles>,
    pub(super) partition: u32,
    /// The snapshot's id, and lengths measured before.
    pub(super) id: String,
    pub(super) lengths: MeasuredLengths,
    /// Where the next read starts (seeks only move this).
    pub(super) pos: u64,
    /// The encoder and how many bytes of the stream it has given out.
    pub(super) enc: Encoder,
    pub(super) enc_pos: u64,
    /// The encoder as it was where the last seek led: openraft resends a
    /// failed chunk by seeking back to its start.
    pub(super) mark: Option<(u64, Encoder)>,
    pub(super) mark_next_read: bool,
    /// The stream's length, once measured.
    pub(super) len: Option<u64>,
    /// A measurement under way: its encoder and the bytes counted.
    pub(super) measuring: Option<(Encoder, u64)>,
    /// The position a seek to the end resolves to.
    pub(super) end_delta: Option<i64>,
}

impl Source {
    pub(super) fn reposition(&mut self) -> Result<(), StoreError> {
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
    pub(super) fn poll_measure(&mut self, cx: &mut Context<'_>) -> Poll<Result<u64, StoreError>> {
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
