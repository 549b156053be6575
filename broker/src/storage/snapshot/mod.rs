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
//!
//! Files: [`format`] the record stream (what a record is, reading one
//! back), [`send`] the encoder and the source openraft reads from,
//! [`receive`] staging what arrives and installing it.

mod format;
mod receive;
mod send;

use std::io::{self, Read, SeekFrom};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use redb::{Database, ReadTransaction};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use super::event_files::EventFiles;
use super::writer::StorageWriter;
use super::StoreError;

use format::io_err;
pub use format::{MAX_RECORD_BYTES, SNAPSHOT_FORMAT};
use receive::Staging;
pub use receive::STAGE_ROW_BYTES;
pub(crate) use receive::{clear_staged, install, InstallSource};
pub(crate) use send::Encoder;
use send::Source;
pub use send::{MeasuredLengths, FILL_BYTES};

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
