//! Storage errors.

use std::path::PathBuf;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened: missing permissions, a
    /// truncated or corrupted file, or a file that is not a redb database.
    #[error("cannot open database {}: {source}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// What redb reported.
        source: redb::DatabaseError,
    },
    /// The file is a redb database but not one this version can use.
    #[error("database {}: {reason}", path.display())]
    Incompatible {
        /// The database file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// redb failed: I/O error, full disk, corruption found while reading.
    #[error("database: {0}")]
    Db(#[from] redb::Error),
    /// A stored value does not decode: the file was altered or damaged.
    #[error("corrupt {what}: {reason}")]
    Corrupt {
        /// What was being decoded.
        what: String,
        /// The decoder's complaint.
        reason: String,
    },
    /// A value could not be encoded (a bug, not an input problem).
    #[error("encode {what}: {reason}")]
    Encode {
        /// What was being encoded.
        what: String,
        /// The encoder's complaint.
        reason: String,
    },
    /// The Raft log could not be read or written (I/O error, full disk),
    /// or stopped taking writes after such an error.
    #[error("raft log: {0}")]
    Log(String),
    /// An event file could not be read, written or synced (I/O error,
    /// full disk).
    #[error("event file: {0}")]
    EventFile(String),
    /// The writer thread has stopped (the node is shutting down, or a
    /// previous write failed fatally).
    #[error("storage writer stopped")]
    WriterStopped,
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}

from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl StoreError {
    /// A copy suitable for several waiters of one failed transaction
    /// (redb errors are not `Clone`).
    pub(crate) fn shared(&self) -> StoreError {
        match self {
            StoreError::WriterStopped => StoreError::WriterStopped,
            StoreError::Log(reason) => StoreError::Log(reason.clone()),
            StoreError::EventFile(reason) => StoreError::EventFile(reason.clone()),
            other => StoreError::Corrupt {
                what: "transaction".into(),
                reason: other.to_string(),
            },
        }
    }
}
