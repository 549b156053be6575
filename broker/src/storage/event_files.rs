//! Stored events' bytes, kept in append-only files beside redb instead of
//! in its `events` table.
//!
//! Every node stores every event; in redb each one cost a copy of its
//! bytes into a B-tree leaf that redb copies again on write at every
//! commit, its page checksums and its share of the pages each commit
//! writes (docs/performance.md: leaving the bytes out of
//! the table took 4-16 % off the nodes' CPU per event). Here apply appends a
//! run's encoded events to the partition's file with one positioned write per MiB,
//! and the `events` table keeps an [`EventRef`] per offset: where the
//! bytes are, their CRC-32 and the event id (which evicting it from the
//! dedup window needs).
//!
//! Each partition has one current file, named by the partition and a
//! generation ([`segment`]). How far it is valid (`len`) and its
//! generation are in redb ([`EventFileMeta`], `sm_meta`), written in the
//! same transaction as the refs, so a transaction that aborts or a commit
//! that a crash loses also forgets the bytes it wrote: the next write
//! overwrites them. The files are synced before any durable redb commit
//! ([`EventFiles::sync`], called by the storage writer), so a durable
//! commit never refers to bytes a crash could lose. Installing a snapshot
//! writes the partition's events into a file of the next generation and
//! retires the old one once the install committed.
//!
//! At start-up ([`EventFiles::open`]) a file of a generation redb does not
//! name is left over (an install or a crash cut short) and is deleted; a
//! current file longer than redb's `len` is cut back to it; one shorter
//! is damage and the store refuses to open.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use redb::StorageBackend;
use serde::{Deserialize, Serialize};

use super::log_dir::LogDir;
use super::StoreError;

/// Where one stored event's bytes are: the `events` table's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRef {
    /// Generation of the partition's file.
    pub generation: u32,
    /// Byte position in it.
    pub pos: u64,
    /// Length of the encoded `StoredEvent`.
    pub len: u32,
    /// CRC-32 of those bytes, checked on every read.
    pub crc: u32,
    /// The event's id, so that evicting it from the dedup window needs no
    /// read of the file.
    pub id: String,
}

/// A partition's current event file, in `sm_meta`
/// ([`super::tables::KEY_EVENT_FILE`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventFileMeta {
    /// Its generation.
    pub generation: u32,
    /// How many of its bytes hold events (the next write's position).
    pub len: u64,
}

/// The segment number of `partition`'s file of `generation` in the
/// directory.
pub fn segment(partition: u32, generation: u32) -> u64 {
    (u64::from(partition) << 32) | u64::from(generation)
}

fn split(segment: u64) -> (u32, u32) {
    ((segment >> 32) as u32, segment as u32)
}

type Handle = Arc<dyn StorageBackend>;

/// Bytes an [`Appender`] buffers before writing them: what a long run (a
/// snapshot install) holds in memory.
const APPEND_WRITE_BYTES: usize = 1024 * 1024;

/// The event files of one node; shared by the writer and the readers.
pub struct EventFiles {
    dir: Box<dyn LogDir>,
    state: Mutex<FilesState>,
    /// The buffer of the last [`Appender`], kept for the next: apply makes
    /// one per run of entries, and growing a fresh buffer each time was
    /// 8 % of the storage writer thread (allocator page searches).
    spare: Mutex<Vec<u8>>,
}

#[derive(Default)]
struct FilesState {
    /// Open files by (partition, generation).
    open: BTreeMap<(u32, u32), Handle>,
    /// Files written since the last sync.
    dirty: BTreeSet<(u32, u32)>,
    /// A file was created or removed since the last directory sync.
    dir_dirty: bool,
}

impl EventFiles {
    /// Opens the directory and reconciles it with what redb says
    /// (`metas`: every partition's current file); see the module
    /// documentation.
    pub fn open(
        dir: Box<dyn LogDir>,
        metas: &BTreeMap<u32, EventFileMeta>,
    ) -> Result<EventFiles, StoreError> {
        let files = EventFiles {
            dir,
            state: Mutex::default(),
            spare: Mutex::default(),
        };
        let mut present = BTreeSet::new();
        for seg in files.dir.list().map_err(|e| files.io("list", e))? {
            let (partition, generation) = split(seg);
            match metas.get(&partition) {
                Some(meta) if meta.generation == generation => {
                    present.insert(partition);
                    let handle = files.adopt(partition, generation)?;
                    let len = handle.len().map_err(|e| files.io("size", e))?;
                    if len < meta.len {
                        return Err(StoreError::Corrupt {
                            what: format!("event file {}", files.name(partition, generation)),
                            reason: format!(
                                "holds {len} bytes, the database has events up to byte {}",
                                meta.len
                            ),
                        });
                    }
                    if len > meta.len {
                        // Written by a transaction that did not become
                        // durable before a crash.
                        handle
                            .set_len(meta.len)
                            .map_err(|e| files.io("truncate", e))?;
                    }
                }
                _ => {
                    files.dir.remove(seg).map_err(|e| files.io("remove", e))?;
                    files.lock().dir_dirty = true;
                }
            }
        }
        for (partition, meta) in metas {
            if meta.len > 0 && !present.contains(partition) {
                return Err(StoreError::Corrupt {
                    what: format!("event file {}", files.name(*partition, meta.generation)),
                    reason: format!(
                        "missing, the database has {} bytes of events in it",
                        meta.len
                    ),
                });
            }
        }
        Ok(files)
    }

    fn lock(&self) -> MutexGuard<'_, FilesState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spare(&self) -> MutexGuard<'_, Vec<u8>> {
        self.spare.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn name(&self, partition: u32, generation: u32) -> String {
        format!(
            "{}/{:020}.seg (partition {partition}, generation {generation})",
            self.dir.describe(),
            segment(partition, generation)
        )
    }

    fn io(&self, what: &str, e: std::io::Error) -> StoreError {
        StoreError::io(format!("event file: {what} in {}", self.dir.describe()), e)
    }

    /// Opens (partition, generation), known to exist, and keeps it open.
    fn adopt(&self, partition: u32, generation: u32) -> Result<Handle, StoreError> {
        let seg = segment(partition, generation);
        let handle: Handle = Arc::from(self.dir.open(seg).map_err(|e| self.io("open", e))?);
        self.lock()
            .open
            .insert((partition, generation), Arc::clone(&handle));
        Ok(handle)
    }

    /// The open file of (partition, generation), opened on first use and
    /// created if missing and `create`.
    fn handle(&self, partition: u32, generation: u32, create: bool) -> Result<Handle, StoreError> {
        let mut state = self.lock();
        if let Some(h) = state.open.get(&(partition, generation)) {
            return Ok(Arc::clone(h));
        }
        let seg = segment(partition, generation);
        let existed = self
            .dir
            .list()
            .map_err(|e| self.io("list", e))?
            .contains(&seg);
        if !existed && !create {
            // A reader's view from before a snapshot install replaced the
            // file: a retry reads the new one.
            return Err(StoreError::Refused {
                what: format!("event file {}", self.name(partition, generation)),
                reason: "gone (replaced by a snapshot install)".into(),
            });
        }
        let handle: Handle = Arc::from(self.dir.open(seg).map_err(|e| self.io("open", e))?);
        if !existed {
            state.dir_dirty = true;
        }
        state
            .open
            .insert((partition, generation), Arc::clone(&handle));
        Ok(handle)
    }

    /// Writes `bytes` at `pos` of `partition`'s file of `generation`; made
    /// durable by the next [`EventFiles::sync`].
    pub fn write(
        &self,
        partition: u32,
        generation: u32,
        pos: u64,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let handle = self.handle(partition, generation, true)?;
        // Marked before the write: a write that fails half-way still
        // leaves bytes a later sync must not skip.
        self.lock().dirty.insert((partition, generation));
        handle
            .write(pos, bytes)
            .map_err(|e| self.io(&format!("write partition {partition}"), e))
    }

    /// Empties `partition`'s file of `generation` (a snapshot install
    /// starts its file from nothing, whatever a cut-short one left).
    pub fn reset(&self, partition: u32, generation: u32) -> Result<(), StoreError> {
        let handle = self.handle(partition, generation, true)?;
        self.lock().dirty.insert((partition, generation));
        handle
            .set_len(0)
            .map_err(|e| self.io(&format!("truncate partition {partition}"), e))
    }

    /// Reads the stored events `refs` point to in `partition`, in order,
    /// handing each one's bytes to `each` once its CRC checked. Events
    /// that lie back to back (as a run of offsets does) are read with one
    /// positioned read.
    pub fn read_many(
        &self,
        partition: u32,
        refs: &[EventRef],
        mut each: impl FnMut(&[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut buf = Vec::new();
        let mut rest = refs;
        while let Some(first) = rest.first() {
            let mut end = first.pos + u64::from(first.len);
            let mut n = 1;
            while let Some(next) = rest.get(n) {
                if next.generation != first.generation || next.pos != end {
                    break;
                }
                end += u64::from(next.len);
                n += 1;
            }
            let (run, after) = rest.split_at(n);
            let handle = self.handle(partition, first.generation, false)?;
            buf.resize((end - first.pos) as usize, 0);
            handle
                .read(first.pos, &mut buf)
                .map_err(|e| self.io(&format!("read partition {partition}"), e))?;
            let mut at = 0usize;
            for r in run {
                let bytes = &buf[at..at + r.len as usize];
                if crc32fast::hash(bytes) != r.crc {
                    return Err(StoreError::Corrupt {
                        what: format!("event file {}", self.name(partition, r.generation)),
                        reason: format!(
                            "checksum mismatch for event {} at byte {} ({} bytes)",
                            r.id, r.pos, r.len
                        ),
                    });
                }
                each(bytes)?;
                at += r.len as usize;
            }
            rest = after;
        }
        Ok(())
    }

    /// Makes every write so far durable, and the creation and removal of
    /// files: the storage writer calls it before each durable commit.
    pub fn sync(&self) -> Result<(), StoreError> {
        let (dirty, dir_dirty) = {
            let mut state = self.lock();
            let dirty: Vec<((u32, u32), Option<Handle>)> = std::mem::take(&mut state.dirty)
                .into_iter()
                .map(|k| (k, state.open.get(&k).cloned()))
                .collect();
            (dirty, std::mem::take(&mut state.dir_dirty))
        };
        let mut failed = None;
        for handle in dirty.iter().filter_map(|(_, h)| h.as_ref()) {
            if let Err(e) = handle.sync_data() {
                failed = Some(self.io("sync", e));
                break;
            }
        }
        if failed.is_none() && dir_dirty {
            if let Err(e) = self.dir.sync() {
                failed = Some(self.io("sync directory", e));
            }
        }
        if let Some(e) = failed {
            // Kept dirty, but never synced again: the storage writer halts
            // after a failed sync (the kernel may have dropped the pages,
            // and a retried fsync would report them durable).
            let mut state = self.lock();
            state.dirty.extend(dirty.into_iter().map(|(k, _)| k));
            state.dir_dirty |= dir_dirty;
            return Err(e);
        }
        Ok(())
    }

    /// Deletes `partition`'s files of generations other than `keep`, once
    /// redb durably names `keep` (after a snapshot install). A failure is
    /// only logged: start-up deletes what is left.
    pub fn retire(&self, partition: u32, keep: u32) {
        {
            let mut state = self.lock();
            let kept = |(p, g): &(u32, u32)| *p != partition || *g == keep;
            state.open.retain(|k, _| kept(k));
            state.dirty.retain(kept);
        }
        let listed = match self.dir.list() {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!("{}", self.io("list", e));
                return;
            }
        };
        for seg in listed {
            let (p, g) = split(seg);
            if p == partition && g != keep {
                if let Err(e) = self.dir.remove(seg) {
                    tracing::warn!("{}", self.io("remove an old event file", e));
                }
                self.lock().dir_dirty = true;
            }
        }
    }
}

/// Appends stored events to a partition's event file inside one redb
/// transaction: hands out each event's [`EventRef`], writes the bytes a
/// buffer at a time, and gives the file's [`EventFileMeta`] for the
/// transaction to record. Apply and snapshot installs both append through
/// it.
pub struct Appender<'f> {
    files: &'f EventFiles,
    partition: u32,
    meta: EventFileMeta,
    /// `meta.len` when the appender was made.
    start_len: u64,
    pending: Vec<u8>,
}

impl<'f> Appender<'f> {
    /// Appends to `partition`'s file described by `meta`, at its end.
    pub fn new(files: &'f EventFiles, partition: u32, meta: EventFileMeta) -> Appender<'f> {
        Appender {
            files,
            partition,
            meta,
            start_len: meta.len,
            pending: std::mem::take(&mut *files.spare()),
        }
    }

    /// Appends, as the stored event with id `id`, the bytes `encode` adds
    /// to the buffer; returns where they are.
    pub fn push(
        &mut self,
        id: &str,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<(), StoreError>,
    ) -> Result<EventRef, StoreError> {
        let start = self.pending.len();
        encode(&mut self.pending)?;
        let bytes = &self.pending[start..];
        let at = EventRef {
            generation: self.meta.generation,
            pos: self.meta.len + start as u64,
            len: u32::try_from(bytes.len()).map_err(|_| StoreError::Encode {
                what: "stored event".into(),
                reason: format!("{} bytes", bytes.len()),
            })?,
            crc: crc32fast::hash(bytes),
            id: id.to_string(),
        };
        if self.pending.len() >= APPEND_WRITE_BYTES {
            self.flush()?;
        }
        Ok(at)
    }

    /// Whether nothing was appended.
    pub fn is_empty(&self) -> bool {
        self.meta.len == self.start_len && self.pending.is_empty()
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if !self.pending.is_empty() {
            self.files.write(
                self.partition,
                self.meta.generation,
                self.meta.len,
                &self.pending,
            )?;
            self.meta.len += self.pending.len() as u64;
            self.pending.clear();
        }
        Ok(())
    }

    /// Writes what is buffered; returns the file's meta, for the
    /// transaction to record.
    pub fn finish(mut self) -> Result<EventFileMeta, StoreError> {
        self.flush()?;
        Ok(self.meta)
    }
}

impl Drop for Appender<'_> {
    fn drop(&mut self) {
        // At most a flush's worth is kept between runs.
        if self.pending.capacity() <= 2 * APPEND_WRITE_BYTES {
            self.pending.clear();
            let mut spare = self.files.spare();
            if spare.capacity() < self.pending.capacity() {
                *spare = std::mem::take(&mut self.pending);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_numbers_round_trip() {
        for (p, g) in [(0, 0), (7, 3), (u32::MAX, u32::MAX), (1, u32::MAX)] {
            assert_eq!(split(segment(p, g)), (p, g));
        }
        assert!(segment(1, 0) > segment(0, u32::MAX));
    }
}
