//! Receiving: staging the chunks that arrive in the database, and
//! installing a staged (or encoded) stream into a partition's tables.

use std::future::Future;
use std::io::{self, Read};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, WriteTransaction};
use sha2::{Digest, Sha256};

use super::format::{corrupt, io_err, next_record, Record, SNAPSHOT_FORMAT};
use super::send::Encoder;
use crate::replicated::delivery::ReplayWindows;
use crate::storage::apply::PartitionHead;
use crate::storage::event_files::{Appender, EventFileMeta, EventFiles};
use crate::storage::event_runs::RunWriter;
use crate::storage::tables::{CURSORS, DEDUP, DLQ, EVENTS, KEY_EVENT_FILE, SNAPSHOT_STAGING};
use crate::storage::writer::{Commit, StorageWriter};
use crate::storage::StoreError;

/// A received snapshot is staged in rows of this size: what a snapshot
/// being received holds in memory besides openraft's chunk.
pub const STAGE_ROW_BYTES: usize = 1024 * 1024;

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
                return Err(StoreError::Incompatible {
                    what: "snapshot".into(),
                    reason: format!("format {format}, this build reads {SNAPSHOT_FORMAT}"),
                });
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
        crate::storage::state_machine::get_sm_meta(txn, p, KEY_EVENT_FILE)?.unwrap_or_default();
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
                    crate::storage::tables::decode(&stored, "stored event")?;
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
    crate::storage::state_machine::put_sm_meta(txn, p, KEY_EVENT_FILE, &file.finish()?)?;
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

/// A received snapshot being staged.
pub(super) struct Staging {
    pub(super) writer: StorageWriter,
    pub(super) db: Arc<Database>,
    pub(super) partition: u32,
    /// Bytes not staged yet, and the stream position of the first.
    pub(super) buf: Vec<u8>,
    pub(super) buf_start: u64,
    /// A staging write under way; nothing else moves until it is done.
    pub(super) pending: Option<WriteFuture>,
    /// A seek to apply once `pending` is done.
    pub(super) seek: Option<u64>,
}

impl Staging {
    pub(super) fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(fut) = &mut self.pending {
            let result = std::task::ready!(fut.as_mut().poll(cx));
            self.pending = None;
            result.map_err(io_err)?;
        }
        Poll::Ready(Ok(()))
    }

    /// Starts staging the buffered bytes as one row.
    pub(super) fn start_flush(&mut self) {
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
    pub(super) fn start_truncate(&mut self, to: u64) {
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
