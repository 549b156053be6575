//! Storage errors, by kind: what failed is in the message, what kind of
//! failure it was is the variant, so that callers branch on the variant
//! (an operator treats a full disk, a failing disk and a damaged file
//! differently) and never on the text.

use std::io;

/// Why a storage operation failed. `what` names the file or operation
/// (the database and its path, a Raft log segment, an event file).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O operation failed for a reason other than a full disk
    /// ([`StoreError::io_kind`] tells which).
    #[error("{what}: I/O error: {source}")]
    Io {
        /// What was being read or written.
        what: String,
        /// The operating system's (or storage backend's) error.
        source: io::Error,
    },
    /// The disk (or the user's quota on it) is full: writes fail until
    /// space is freed; what was stored before is intact.
    #[error("{what}: disk full: {source}")]
    FullDisk {
        /// What was being written.
        what: String,
        /// The operating system's error (`ENOSPC`, `EDQUOT`).
        source: io::Error,
    },
    /// Stored data is damaged: a checksum mismatch, a bad magic number, a
    /// value that does not decode, a file shorter than the database says,
    /// or a file that is not a database at all.
    #[error("corrupt {what}: {reason}")]
    Corrupt {
        /// What was being read.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The files are intact but not ones this build can use: another
    /// layout version, or a redb file format that needs an upgrade.
    #[error("{what}: {reason}")]
    Incompatible {
        /// The database (and its path).
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// Another process (or another handle in this one) holds the
    /// database's lock.
    #[error("{what}: {reason}")]
    Locked {
        /// The database.
        what: String,
        /// What redb reported.
        reason: String,
    },
    /// The storage stopped taking operations after an earlier failure
    /// (what the disk holds is then unknown): the node must restart and
    /// replay.
    #[error("{what}: stopped after an earlier failure: {reason}")]
    Halted {
        /// What stopped.
        what: String,
        /// The earlier failure.
        reason: String,
    },
    /// The database was closed (the node is shutting down).
    #[error("{what}: closed")]
    Closed {
        /// What was closed.
        what: String,
    },
    /// Storage refused an operation that its current state does not
    /// allow (it would lose data); a later retry may succeed.
    #[error("{what}: {reason}")]
    Refused {
        /// The refused operation.
        what: String,
        /// Why.
        reason: String,
    },
    /// A value could not be encoded, or is too large to store (a bug or
    /// an oversized input, not a disk problem).
    #[error("encode {what}: {reason}")]
    Encode {
        /// What was being encoded.
        what: String,
        /// The encoder's complaint.
        reason: String,
    },
    /// Storage was used in a way it does not allow (a poisoned
    /// transaction, a table opened twice, a thread that would not start):
    /// a bug or a resource limit, not the disk's fault.
    #[error("{what}: {reason}")]
    Internal {
        /// What failed.
        what: String,
        /// What was reported.
        reason: String,
    },
    /// The writer thread has stopped (the node is shutting down, or a
    /// previous write failed fatally).
    #[error("storage writer stopped")]
    WriterStopped,
}

/// Whether `e` says the disk (or the user's quota) is full. The raw
/// errno covers errors rebuilt by hand from a number; 28 is `ENOSPC` on
/// Linux and the BSDs.
pub fn is_full_disk(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || e.raw_os_error() == Some(28)
}

impl StoreError {
    /// An I/O error while doing `what`: [`StoreError::FullDisk`] if the
    /// disk is full, [`StoreError::Io`] otherwise.
    pub fn io(what: impl Into<String>, source: io::Error) -> StoreError {
        let what = what.into();
        if is_full_disk(&source) {
            StoreError::FullDisk { what, source }
        } else {
            StoreError::Io { what, source }
        }
    }

    /// A redb error while working on `what`, by kind. An I/O error of
    /// kind `InvalidData` is how redb says a file is not a redb database:
    /// corruption, not a failing disk.
    pub fn from_redb(what: impl Into<String>, e: impl Into<redb::Error>) -> StoreError {
        let what = what.into();
        let e: redb::Error = e.into();
        let reason = e.to_string();
        match e {
            redb::Error::Io(source) if source.kind() == io::ErrorKind::InvalidData => {
                StoreError::Corrupt {
                    what,
                    reason: source.to_string(),
                }
            }
            redb::Error::Io(source) => StoreError::io(what, source),
            // Not an io::Error, but still the backend failing to store.
            redb::Error::Backend(source) => StoreError::io(what, io::Error::other(source)),
            redb::Error::Unsupported => {
                StoreError::io(what, io::Error::new(io::ErrorKind::Unsupported, reason))
            }
            redb::Error::Corrupted(reason) => StoreError::Corrupt { what, reason },
            redb::Error::UpgradeRequired(_)
            | redb::Error::TableTypeMismatch { .. }
            | redb::Error::TypeDefinitionChanged { .. }
            | redb::Error::TableIsMultimap(_)
            | redb::Error::TableIsNotMultimap(_)
            | redb::Error::TableDoesNotExist(_) => StoreError::Incompatible { what, reason },
            redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
                StoreError::Locked { what, reason }
            }
            redb::Error::PreviousIo => StoreError::Halted { what, reason },
            redb::Error::DatabaseClosed => StoreError::Closed { what },
            redb::Error::ValueTooLarge(_) => StoreError::Encode { what, reason },
            // Misuse of redb's API (poisoned transactions and locks, a
            // table opened twice, savepoints, ...): bugs.
            _ => StoreError::Internal { what, reason },
        }
    }

    /// The kind of I/O error, for [`StoreError::Io`] and
    /// [`StoreError::FullDisk`].
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            StoreError::Io { source, .. } | StoreError::FullDisk { source, .. } => {
                Some(source.kind())
            }
            _ => None,
        }
    }

    /// A copy for each of several waiters of one failed write (an
    /// `io::Error` is not `Clone`): the same variant and message, the
    /// I/O error rebuilt with its kind.
    pub(crate) fn shared(&self) -> StoreError {
        let copy_io = |source: &io::Error| io::Error::new(source.kind(), source.to_string());
        let (what, reason) = match self {
            StoreError::Io { what, source } => {
                return StoreError::Io {
                    what: what.clone(),
                    source: copy_io(source),
                }
            }
            StoreError::FullDisk { what, source } => {
                return StoreError::FullDisk {
                    what: what.clone(),
                    source: copy_io(source),
                }
            }
            StoreError::Closed { what } => return StoreError::Closed { what: what.clone() },
            StoreError::WriterStopped => return StoreError::WriterStopped,
            StoreError::Corrupt { what, reason }
            | StoreError::Incompatible { what, reason }
            | StoreError::Locked { what, reason }
            | StoreError::Halted { what, reason }
            | StoreError::Refused { what, reason }
            | StoreError::Encode { what, reason }
            | StoreError::Internal { what, reason } => (what.clone(), reason.clone()),
        };
        match self {
            StoreError::Corrupt { .. } => StoreError::Corrupt { what, reason },
            StoreError::Incompatible { .. } => StoreError::Incompatible { what, reason },
            StoreError::Locked { .. } => StoreError::Locked { what, reason },
            StoreError::Halted { .. } => StoreError::Halted { what, reason },
            StoreError::Refused { .. } => StoreError::Refused { what, reason },
            StoreError::Encode { .. } => StoreError::Encode { what, reason },
            _ => StoreError::Internal { what, reason },
        }
    }
}

/// redb errors from the database's own operations (transactions, tables,
/// commits) name it "database"; opening it names its path instead
/// ([`StoreError::from_redb`]).
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::from_redb("database", e)
            }
        }
    )*};
}

from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// For readers that must return an `io::Error` (a snapshot streamed
/// through `AsyncRead`): the I/O kind survives (`Other` for the rest), and
/// the `StoreError` stays reachable through `get_ref`.
impl From<StoreError> for io::Error {
    fn from(e: StoreError) -> io::Error {
        let kind = match &e {
            StoreError::Corrupt { .. } => io::ErrorKind::InvalidData,
            other => other.io_kind().unwrap_or(io::ErrorKind::Other),
        };
        io::Error::new(kind, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enospc() -> io::Error {
        io::Error::from_raw_os_error(28)
    }

    #[test]
    fn enospc_is_a_full_disk() {
        let e = StoreError::io("write raft log segment 3", enospc());
        assert!(matches!(e, StoreError::FullDisk { .. }), "{e:?}");
        assert_eq!(e.io_kind(), Some(io::ErrorKind::StorageFull));
        assert!(e.to_string().contains("No space left on device"), "{e}");
        let e = StoreError::io("x", io::Error::from(io::ErrorKind::StorageFull));
        assert!(matches!(e, StoreError::FullDisk { .. }), "{e:?}");
        let e = StoreError::from_redb("database", redb::StorageError::Io(enospc()));
        assert!(matches!(e, StoreError::FullDisk { .. }), "{e:?}");
    }

    #[test]
    fn other_io_errors_keep_their_kind() {
        let denied = || io::Error::from(io::ErrorKind::PermissionDenied);
        let e = StoreError::io("open event file", denied());
        assert!(matches!(e, StoreError::Io { .. }), "{e:?}");
        assert_eq!(e.io_kind(), Some(io::ErrorKind::PermissionDenied));
        let e = StoreError::from(redb::TransactionError::Storage(redb::StorageError::Io(
            denied(),
        )));
        assert_eq!(e.io_kind(), Some(io::ErrorKind::PermissionDenied), "{e:?}");
        assert!(e.to_string().starts_with("database: I/O error: "), "{e}");
    }

    #[test]
    fn redb_corruption_is_corrupt() {
        let e = StoreError::from(redb::StorageError::Corrupted("bad page".into()));
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
        assert_eq!(e.to_string(), "corrupt database: bad page");
        // How redb says a file is not a database.
        let e = StoreError::from_redb(
            "database bad.redb",
            redb::DatabaseError::Storage(redb::StorageError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a redb file",
            ))),
        );
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
        assert!(e.to_string().contains("bad.redb"), "{e}");
    }

    #[test]
    fn other_redb_errors_by_kind() {
        let e = StoreError::from(redb::DatabaseError::UpgradeRequired(2));
        assert!(matches!(e, StoreError::Incompatible { .. }), "{e:?}");
        let e = StoreError::from(redb::DatabaseError::DatabaseAlreadyOpen);
        assert!(matches!(e, StoreError::Locked { .. }), "{e:?}");
        let e = StoreError::from(redb::StorageError::PreviousIo);
        assert!(matches!(e, StoreError::Halted { .. }), "{e:?}");
        let e = StoreError::from(redb::StorageError::DatabaseClosed);
        assert!(matches!(e, StoreError::Closed { .. }), "{e:?}");
        let e = StoreError::from(redb::StorageError::ValueTooLarge(1 << 40));
        assert!(matches!(e, StoreError::Encode { .. }), "{e:?}");
        let e = StoreError::from(redb::CommitError::TransactionPoisoned);
        assert!(matches!(e, StoreError::Internal { .. }), "{e:?}");
        let e = StoreError::from(redb::TableError::TableDoesNotExist("events".into()));
        assert!(matches!(e, StoreError::Incompatible { .. }), "{e:?}");
    }

    #[test]
    fn a_shared_copy_keeps_the_kind_and_the_message() {
        let cases = [
            StoreError::io("write", enospc()),
            StoreError::io("read", io::Error::from(io::ErrorKind::UnexpectedEof)),
            StoreError::Corrupt {
                what: "snapshot".into(),
                reason: "digest".into(),
            },
            StoreError::Closed {
                what: "database".into(),
            },
            StoreError::WriterStopped,
        ];
        for e in cases {
            let copy = e.shared();
            assert_eq!(
                std::mem::discriminant(&copy),
                std::mem::discriminant(&e),
                "{e:?}"
            );
            assert_eq!(copy.io_kind(), e.io_kind());
            assert_eq!(copy.to_string(), e.to_string());
        }
    }

    #[test]
    fn into_io_error_keeps_the_kind() {
        let e: io::Error = StoreError::io("write", enospc()).into();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        let e: io::Error = StoreError::Corrupt {
            what: "snapshot".into(),
            reason: "digest".into(),
        }
        .into();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.get_ref().is_some_and(|inner| inner.is::<StoreError>()));
    }
}
