//! Where the Raft log's segment files live: the disk seam of the log
//! (DESIGN.md §4), beside redb's `StorageBackend` for the state machine.
//!
//! A segment is named by its sequence number. Each open segment is a
//! redb [`StorageBackend`] (positioned reads and writes, `sync_data`), so
//! the simulator's crashable disk serves the log and the database alike.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use redb::StorageBackend;

/// A directory of numbered segment files.
pub trait LogDir: Send + Sync + 'static {
    /// Names the directory (for error messages).
    fn describe(&self) -> String;
    /// The segments present, in any order.
    fn list(&self) -> io::Result<Vec<u64>>;
    /// Opens segment `segment`, creating it empty if it does not exist.
    fn open(&self, segment: u64) -> io::Result<Box<dyn StorageBackend>>;
    /// Deletes segment `segment`.
    fn remove(&self, segment: u64) -> io::Result<()>;
    /// Makes creations and removals so far durable.
    fn sync(&self) -> io::Result<()>;
    /// Size at which the log starts a new segment. The simulator's small
    /// segments make short runs roll and delete segments too.
    fn segment_bytes(&self) -> u64 {
        crate::storage::raft_log::SEGMENT_BYTES
    }
}

/// Segment files in a directory of the file system, named
/// `<sequence>.seg` with the sequence zero-padded to 20 digits so that
/// names sort like the numbers.
#[derive(Debug)]
pub struct FsLogDir {
    path: PathBuf,
    segment_bytes: u64,
}

impl FsLogDir {
    /// The directory at `path`, created if missing, with segments of
    /// `segment_bytes`.
    pub fn create(path: &Path, segment_bytes: u64) -> io::Result<FsLogDir> {
        std::fs::create_dir_all(path)?;
        Ok(FsLogDir {
            path: path.to_path_buf(),
            segment_bytes,
        })
    }

    fn file(&self, segment: u64) -> PathBuf {
        self.path.join(format!("{segment:020}.seg"))
    }
}

impl LogDir for FsLogDir {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn list(&self) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.path)? {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            // Anything else in the directory (an editor's backup, a
            // copied file) is not ours to read or delete.
            if let Some(seq) = name.strip_suffix(".seg") {
                if seq.len() == 20 {
                    if let Ok(n) = seq.parse() {
                        out.push(n);
                    }
                }
            }
        }
        Ok(out)
    }

    fn open(&self, segment: u64) -> io::Result<Box<dyn StorageBackend>> {
        let path = self.file(segment);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        Ok(Box::new(SegmentFile { file, path }))
    }

    fn remove(&self, segment: u64) -> io::Result<()> {
        std::fs::remove_file(self.file(segment))
    }

    fn sync(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_all()
    }

    fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }
}

/// One segment file.
#[derive(Debug)]
struct SegmentFile {
    file: File,
    path: PathBuf,
}

impl SegmentFile {
    fn annotate(&self, e: io::Error) -> io::Error {
        io::Error::new(e.kind(), format!("{}: {e}", self.path.display()))
    }
}

impl StorageBackend for SegmentFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata().map_err(|e| self.annotate(e))?.len())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.file
            .read_exact_at(out, offset)
            .map_err(|e| self.annotate(e))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len).map_err(|e| self.annotate(e))
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data().map_err(|e| self.annotate(e))
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| self.annotate(e))
    }
}
