//! A simulated disk for redb: remembers what was written and what was
//! synced, and loses the unsynced part when its node crashes.
//!
//! Every write since the last `sync_data` is recorded in an undo log; a
//! crash replays the undo log backwards, leaving exactly the synced image.
//! Each open of the disk gets a new generation: handles of a crashed
//! incarnation fail every operation, as a dead process would.
//! Faults on request: fail the next reads, writes or syncs; and, for testing the
//! checker, a lying disk whose sync acknowledges without keeping anything.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Default)]
struct State {
    data: Vec<u8>,
    /// (offset, bytes there before the write), oldest first.
    undo: Vec<(u64, Vec<u8>)>,
    len_at_sync: u64,
    generation: u64,
    fail_reads: u32,
    fail_writes: u32,
    fail_syncs: u32,
    lying_sync: bool,
    syncs: u64,
}

/// One node's disk; clones share it.
#[derive(Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

/// The redb backend of one incarnation of a node.
pub struct DiskHandle {
    disk: SimDisk,
    generation: u64,
}

impl fmt::Debug for DiskHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DiskHandle(gen {})", self.generation)
    }
}

impl SimDisk {
    /// A disk whose `sync_data` keeps nothing (a broken disk, for testing
    /// that the checker notices lost acknowledged writes).
    pub fn lying() -> SimDisk {
        let d = SimDisk::default();
        d.lock().lying_sync = true;
        d
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A backend for a new incarnation; older handles stop working.
    pub fn open(&self) -> DiskHandle {
        let mut s = self.lock();
        s.generation += 1;
        DiskHandle {
            disk: self.clone(),
            generation: s.generation,
        }
    }

    /// The node crashed: unsynced writes are lost, old handles die.
    pub fn crash(&self) {
        let mut s = self.lock();
        while let Some((offset, old)) = s.undo.pop() {
            let at = offset as usize;
            let end = at + old.len();
            if s.data.len() < end {
                s.data.resize(end, 0);
            }
            s.data[at..end].copy_from_slice(&old);
        }
        let len = s.len_at_sync as usize;
        s.data.resize(len, 0);
        s.generation += 1;
    }

    /// Fails the next `n` reads.
    pub fn fail_reads(&self, n: u32) {
        self.lock().fail_reads = n;
    }

    /// Fails the next `n` writes.
    pub fn fail_writes(&self, n: u32) {
        self.lock().fail_writes = n;
    }

    /// Fails the next `n` syncs.
    pub fn fail_syncs(&self, n: u32) {
        self.lock().fail_syncs = n;
    }

    /// Cancels write and sync failures still armed: the faults of a run
    /// end when it heals, even on a disk that did no I/O since.
    pub fn heal(&self) {
        let mut s = self.lock();
        s.fail_reads = 0;
        s.fail_writes = 0;
        s.fail_syncs = 0;
    }

    /// Syncs so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }
}

impl DiskHandle {
    fn live(&self) -> io::Result<MutexGuard<'_, State>> {
        let s = self.disk.lock();
        if s.generation != self.generation {
            return Err(io::Error::other("simulated node crashed"));
        }
        Ok(s)
    }
}

impl redb::StorageBackend for DiskHandle {
    fn len(&self) -> io::Result<u64> {
        Ok(self.live()?.data.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let mut s = self.live()?;
        if s.fail_reads > 0 {
            s.fail_reads -= 1;
            return Err(io::Error::other("simulated read failure"));
        }
        let at = offset as usize;
        let src = s
            .data
            .get(at..at + out.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past end"))?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.live()?;
        let old_len = s.data.len();
        let new_len = len as usize;
        if new_len < old_len {
            // Remember the cut tail so a crash can restore it.
            let tail = s.data[new_len..].to_vec();
            s.undo.push((len, tail));
        }
        s.data.resize(new_len, 0);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.live()?;
        if s.fail_syncs > 0 {
            s.fail_syncs -= 1;
            return Err(io::Error::other("simulated fsync failure"));
        }
        s.syncs += 1;
        if !s.lying_sync {
            s.undo.clear();
            s.len_at_sync = s.data.len() as u64;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.live()?;
        if s.fail_writes > 0 {
            s.fail_writes -= 1;
            return Err(io::Error::other("simulated write failure"));
        }
        let at = offset as usize;
        let end = at + data.len();
        if s.data.len() < end {
            s.data.resize(end, 0);
        }
        let old = s.data[at..end].to_vec();
        s.undo.push((offset, old));
        s.data[at..end].copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use redb::StorageBackend;

    use super::*;

    #[test]
    fn crash_keeps_exactly_the_synced_image() {
        let disk = SimDisk::default();
        let h = disk.open();
        h.write(0, b"hello").unwrap();
        h.sync_data().unwrap();
        h.write(2, b"XY").unwrap();
        h.write(8, b"tail").unwrap();
        disk.crash();
        assert!(h.len().is_err(), "old incarnation is dead");
        let h2 = disk.open();
        let mut out = vec![0; 5];
        h2.read(0, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert_eq!(h2.len().unwrap(), 5);
    }

    #[test]
    fn lying_disk_loses_everything() {
        let disk = SimDisk::lying();
        let h = disk.open();
        h.write(0, b"data").unwrap();
        h.sync_data().unwrap();
        disk.crash();
        assert_eq!(disk.open().len().unwrap(), 0);
    }

    #[test]
    fn redb_survives_crashes_of_unsynced_commits() {
        let disk = SimDisk::default();
        let table: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("t");
        let old = {
            let db = redb::Database::builder()
                .create_with_backend(disk.open())
                .unwrap();
            let w = db.begin_write().unwrap();
            w.open_table(table).unwrap().insert(1, 1).unwrap();
            w.commit().unwrap();
            let mut w = db.begin_write().unwrap();
            w.set_durability(redb::Durability::None).unwrap();
            w.open_table(table).unwrap().insert(2, 2).unwrap();
            w.commit().unwrap();
            db
        };
        // Crash with the database still open: its clean shutdown (which
        // would persist the non-durable commit) never happens.
        disk.crash();
        drop(old);
        let db = redb::Database::builder()
            .create_with_backend(disk.open())
            .unwrap();
        let r = redb::ReadableDatabase::begin_read(&db).unwrap();
        let t = r.open_table(table).unwrap();
        assert_eq!(t.get(1).unwrap().map(|v| v.value()), Some(1));
        assert_eq!(t.get(2).unwrap().map(|v| v.value()), None);
    }
}
