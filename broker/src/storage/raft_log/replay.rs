//! Opening: replaying every segment into the index, cutting off a write
//! a crash interrupted at the end of the newest one and refusing damage
//! anywhere else.

use std::collections::BTreeMap;
use std::sync::Arc;

use redb::StorageBackend;
use tracing::warn;

use super::format::{batch_after, parse, Parsed, MAGIC};
use super::index::{Segment, State};
use super::writer::roll;
use crate::storage::log_dir::LogDir;
use crate::storage::StoreError;

/// Rebuilds the index from the segments in `dir`.
pub(super) fn replay(dir: &dyn LogDir) -> Result<State, StoreError> {
    let io_err = |what: String, e: std::io::Error| StoreError::io(format!("raft log: {what}"), e);
    let mut seqs = dir
        .list()
        .map_err(|e| io_err(format!("list {}", dir.describe()), e))?;
    seqs.sort_unstable();
    let mut state = State::default();
    if seqs.is_empty() {
        roll(dir, &mut state)
            .map_err(|e| io_err(format!("create a segment in {}", dir.describe()), e))?;
        return Ok(state);
    }
    let newest = seqs[seqs.len() - 1];
    for seq in seqs {
        let what = || format!("raft log segment {seq} in {}", dir.describe());
        let file: Arc<dyn StorageBackend> =
            Arc::from(dir.open(seq).map_err(|e| io_err(what(), e))?);
        let len = file.len().map_err(|e| io_err(what(), e))?;
        let mut buf = vec![0; len as usize];
        file.read(0, &mut buf).map_err(|e| io_err(what(), e))?;
        state.segments.insert(
            seq,
            Segment {
                file: Arc::clone(&file),
                max_index: BTreeMap::new(),
            },
        );
        state.active = seq;
        if buf.len() < MAGIC.len() && seq == newest && MAGIC.starts_with(&buf) {
            // Created, and the crash came before its first sync.
            file.set_len(0)
                .and_then(|()| file.write(0, MAGIC))
                .and_then(|()| file.sync_data())
                .map_err(|e| io_err(what(), e))?;
            state.active_len = MAGIC.len() as u64;
            state.active_filled = state.active_len;
            continue;
        }
        if !buf.starts_with(MAGIC) {
            return Err(StoreError::Corrupt {
                what: what(),
                reason: "not an auditflow raft log segment (bad magic)".into(),
            });
        }
        let mut pos = MAGIC.len();
        // Where the file ends once replayed: its zeros stay, a torn write
        // is cut off.
        let mut file_end = len;
        loop {
            match parse(&buf[pos..]) {
                Parsed::End => break,
                Parsed::Record(record, _, used) => {
                    state.apply(&record, seq, pos as u64, used);
                    pos += used;
                }
                // The zeros filled ahead of the records (module docs).
                Parsed::Bad(_) if seq == newest && buf[pos..].iter().all(|b| *b == 0) => break,
                Parsed::Bad(reason) if seq == newest && batch_after(&buf, pos).is_none() => {
                    warn!(
                        "{}: cutting off {} bytes at offset {pos} ({reason}): a write the last \
                         stop interrupted",
                        what(),
                        buf.len() - pos
                    );
                    file.set_len(pos as u64)
                        .and_then(|()| file.sync_data())
                        .map_err(|e| io_err(what(), e))?;
                    file_end = pos as u64;
                    break;
                }
                Parsed::Bad(reason) => {
                    return Err(StoreError::Corrupt {
                        what: format!("{} at offset {pos}", what()),
                        reason,
                    })
                }
            }
        }
        state.active_len = pos as u64;
        state.active_filled = file_end;
    }
    Ok(state)
}
