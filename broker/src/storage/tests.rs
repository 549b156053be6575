//! Storage tests: openraft's own conformance suite over the redb store,
//! and the behaviour the node relies on (reopen keeps data, snapshots
//! round-trip, corrupt files are refused).

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftSnapshotBuilder, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader};

use super::*;
use crate::storage::types::{Command, Entry, LogId, Snapshot, StorageError, TypeConfig};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().map_err(|e| {
            StorageError::from_io_error(
                openraft::ErrorSubject::Store,
                openraft::ErrorVerb::Write,
                e,
            )
        })?;
        let store = Store::open(&dir.path().join("test.redb")).map_err(|e| {
            StorageError::from_io_error(
                openraft::ErrorSubject::Store,
                openraft::ErrorVerb::Write,
                std::io::Error::other(e.to_string()),
            )
        })?;
        Ok((dir, store.log_store(3), store.state_machine(3, 1000)))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(Builder) {
        panic!("openraft storage suite: {e}");
    }
}

/// The store as a node's follower side runs it: every apply of entries
/// another node proposed may wait to share a commit (`Commit::Soon`).
struct LingeringBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for LingeringBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let (dir, log, sm) = Builder.build().await?;
        // No entry of the suite is proposed by node 99.
        Ok((dir, log, sm.sharing_followers_commits(99)))
    }
}

#[test]
fn openraft_storage_suite_with_lingering_applies() {
    if let Err(e) = Suite::test_all(LingeringBuilder) {
        panic!("openraft storage suite, lingering applies: {e}");
    }
}

fn event(id: &str) -> auditflow_protocol::Event {
    serde_json::from_value(serde_json::json!({
        "id": id,
        "tenant": "acme",
        "time": "2026-11-24T10:00:00Z",
        "actor": {"id": "u1", "type": "user"},
        "action": "user.login",
        "target": {"type": "session", "id": "s1"},
        "outcome": "success",
    }))
    .expect("valid event json")
}

fn append_entry(index: u64, ids: &[&str]) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Command::Append {
            received_at: auditflow_protocol::Timestamp(1_700_000_000_000_000_000),
            events: ids.iter().map(|id| event(id)).collect::<Vec<_>>().into(),
        }),
    }
}

/// Only applies of entries other nodes proposed may wait for a shared
/// commit: a client waits on the node that proposed an entry.
#[test]
fn applies_linger_only_when_another_node_proposed_every_entry() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db.redb")).unwrap();
    let from_node = |node: u64, index: u64| {
        let mut e = append_entry(index, &["a"]);
        e.log_id = LogId::new(CommittedLeaderId::new(1, node), index);
        e
    };
    let theirs = [from_node(2, 1), from_node(3, 2)];
    let mixed = [from_node(2, 1), from_node(1, 2)];
    let plain = store.state_machine(0, 10);
    assert_eq!(plain.apply_commit(&theirs), writer::Commit::Now);
    let node1 = store.state_machine(0, 10).sharing_followers_commits(1);
    assert_eq!(node1.apply_commit(&theirs), writer::Commit::Soon);
    assert_eq!(node1.apply_commit(&mixed), writer::Commit::Now);
    assert_eq!(node1.apply_commit(&[from_node(1, 1)]), writer::Commit::Now);
}

/// Appends entries `indexes` (one event "x" each) to `log`, synced.
async fn append_entries(log: &mut LogStore, indexes: std::ops::RangeInclusive<u64>) {
    for i in indexes {
        log.blocking_append([append_entry(i, &["x"])])
            .await
            .unwrap();
    }
}

/// Applies entries 1..=n to `sm`, entry i holding one event with id `e{i}`.
async fn apply_numbered(sm: &mut StateMachine, n: u64) {
    let names: Vec<String> = (1..=n).map(|i| format!("e{i}")).collect();
    sm.apply((1..=n).map(|i| append_entry(i, &[names[i as usize - 1].as_str()])))
        .await
        .unwrap();
}

#[tokio::test]
async fn applied_events_survive_reopen_and_snapshot_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    {
        let store = Store::open(&path).unwrap();
        let mut sm = store.state_machine(0, 1000);
        let out = sm
            .apply([append_entry(1, &["a", "b"]), append_entry(2, &["b", "c"])])
            .await
            .unwrap();
        assert_eq!(out.len(), 2);
        let reader = store.reader(0);
        assert_eq!(reader.head().unwrap().next_offset, 3);
        assert_eq!(*reader.watch().borrow(), 3);
    }
    let store = Store::open(&path).unwrap();
    let reader = store.reader(0);
    let events = reader.read(0, 10).unwrap();
    let ids: Vec<_> = events.iter().map(|e| e.event.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);

    // A built snapshot (what openraft purges the log up to) carries only
    // metadata; what a follower is sent is the current snapshot, read when
    // needed, with the same metadata.
    let mut sm = store.state_machine(0, 1000);
    let built = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(built.snapshot.buffered_bytes(), 0, "no events were read");
    let snap = sm
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("a snapshot");
    assert_eq!(snap.meta, built.meta);
    // Snapshot of partition 0 installed into another store.
    let other = Store::open(&dir.path().join("other.redb")).unwrap();
    let mut sm1 = other.state_machine(0, 1000);
    sm1.install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    assert_eq!(other.reader(0).read(0, 10).unwrap(), events);
    // The dedup index came along: re-applying "a" is a duplicate.
    let out = sm1.apply([append_entry(3, &["a", "d"])]).await.unwrap();
    match &out[0] {
        crate::replicated::CommandResponse::Appended(r) => {
            assert!(
                matches!(r[0], auditflow_protocol::wire::AppendResult::Stored(ref a) if a.duplicate && a.offset == 0)
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(other.reader(0).head().unwrap().next_offset, 4);
}

#[tokio::test]
async fn log_entries_readable_before_flush_and_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    {
        let store = Store::open(&path).unwrap();
        let mut log = store.log_store(2);
        let entries: Vec<Entry> = (1..=5).map(|i| append_entry(i, &["x"])).collect();
        for e in entries {
            log.blocking_append([e]).await.unwrap();
        }
        let got = log.try_get_log_entries(1..6).await.unwrap();
        assert_eq!(got.len(), 5);
        log.truncate(LogId::new(CommittedLeaderId::new(1, 1), 4))
            .await
            .unwrap();
        log.purge(LogId::new(CommittedLeaderId::new(1, 1), 1))
            .await
            .unwrap();
    }
    let store = Store::open(&path).unwrap();
    let mut log = store.log_store(2);
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(1));
    assert_eq!(state.last_log_id.map(|l| l.index), Some(3));
    let got = log.try_get_log_entries(0..10).await.unwrap();
    assert_eq!(
        got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
        [2, 3]
    );
}

#[tokio::test]
async fn cached_reads_match_the_stored_log_across_truncation_and_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let leader = |term| CommittedLeaderId::new(term, 1);
    let store = Store::open(&path).unwrap();
    let mut log = store.log_store(4);
    // More entries than the cache keeps, so reads mix cache and redb.
    let n = 1500u64;
    for i in 1..=n {
        log.blocking_append([append_entry(i, &[&format!("e{i}")])])
            .await
            .unwrap();
    }
    // A truncation, then different entries (a newer term) at those indexes.
    log.truncate(LogId::new(leader(1), n - 9)).await.unwrap();
    for i in (n - 9)..=n {
        let mut e = append_entry(i, &[&format!("new{i}")]);
        e.log_id = LogId::new(leader(2), i);
        log.blocking_append([e]).await.unwrap();
    }
    let cached = log.try_get_log_entries(1..n + 1).await.unwrap();
    let partial = log.try_get_log_entries(n - 20..n - 5).await.unwrap();
    drop(log);
    drop(store);
    // A fresh store has an empty cache: everything comes from redb.
    let store = Store::open(&path).unwrap();
    let mut fresh = store.log_store(4);
    let stored = fresh.try_get_log_entries(1..n + 1).await.unwrap();
    assert_eq!(cached.len() as u64, n);
    assert_eq!(cached, stored);
    assert_eq!(partial, stored[(n - 21) as usize..(n - 6) as usize]);
    assert_eq!(stored.last().map(|e| e.log_id.leader_id), Some(leader(2)));
}

#[test]
fn garbage_file_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.redb");
    std::fs::write(&path, vec![0x5a; 64 * 1024]).unwrap();
    let err = Store::open(&path).err().expect("refused");
    assert!(err.to_string().contains("bad.redb"), "{err}");
}

fn delivery_entry(index: u64, cmd: crate::replicated::delivery::DeliveryCommand) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Command::Delivery(cmd)),
    }
}

#[tokio::test]
async fn replay_windows_are_clamped_to_the_cursor_and_ignore_stale_advances() {
    use crate::replicated::delivery::DeliveryCommand as D;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db.redb")).unwrap();
    let mut sm = store.state_machine(0, 1000);
    let ids: Vec<String> = (0..10).map(|i| format!("e{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    sm.apply([append_entry(1, &ids)]).await.unwrap();
    let reader = store.reader(0);
    let d = |dest: &str| dest.to_string();
    let mut index = 1;
    let mut apply = |cmd: D| {
        index += 1;
        delivery_entry(index, cmd)
    };
    let entries = vec![
        apply(D::Advance {
            dest: d("siem"),
            next_offset: 6,
        }),
        // Past the cursor: clamped to it (6), never skipping ahead.
        apply(D::Replay {
            dest: d("siem"),
            from: 2,
            until: Some(9),
        }),
    ];
    sm.apply(entries).await.unwrap();
    assert_eq!(reader.replay("siem").unwrap(), Some((2, 6)));
    assert_eq!(
        reader.cursor("siem").unwrap(),
        6,
        "the cursor does not move"
    );
    assert_eq!(reader.replay("other").unwrap(), None);

    // A stale advance (window started elsewhere) is ignored; a current
    // one moves it; reaching the end closes it.
    let entries = vec![
        apply(D::ReplayAdvance {
            dest: d("siem"),
            expect: 0,
            next: 5,
        }),
        apply(D::ReplayAdvance {
            dest: d("siem"),
            expect: 2,
            next: 4,
        }),
    ];
    sm.apply(entries).await.unwrap();
    assert_eq!(reader.replay("siem").unwrap(), Some((4, 6)));

    // Snapshots carry windows.
    let snap = sm
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("a snapshot");
    let other = Store::open(&dir.path().join("other.redb")).unwrap();
    let mut sm1 = other.state_machine(0, 1000);
    sm1.install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    assert_eq!(other.reader(0).replay("siem").unwrap(), Some((4, 6)));

    let entries = vec![apply(D::ReplayAdvance {
        dest: d("siem"),
        expect: 4,
        next: 6,
    })];
    sm.apply(entries).await.unwrap();
    assert_eq!(reader.replay("siem").unwrap(), None);

    // An empty window (from at or past the cursor) closes nothing open
    // and opens nothing; the old SetCursor only ever moves back.
    let entries = vec![
        apply(D::Replay {
            dest: d("siem"),
            from: 7,
            until: None,
        }),
        apply(D::SetCursor {
            dest: d("siem"),
            next_offset: 9,
        }),
    ];
    sm.apply(entries).await.unwrap();
    assert_eq!(reader.replay("siem").unwrap(), None);
    assert_eq!(reader.cursor("siem").unwrap(), 6);
}

#[tokio::test]
async fn a_purge_never_passes_what_the_state_machine_holds() {
    let dir = tempfile::tempdir().unwrap();
    let id = |index| LogId::new(CommittedLeaderId::new(1, 1), index);
    // A snapshot at index 8, taken from another store.
    let source = Store::open(&dir.path().join("source.redb")).unwrap();
    let mut source_sm = source.state_machine(0, 1000);
    apply_numbered(&mut source_sm, 8).await;
    let snapshot = source_sm.get_current_snapshot().await.unwrap().unwrap();

    let store = Store::open(&dir.path().join("db.redb")).unwrap();
    let mut log = store.log_store(0);
    let mut sm = store.state_machine(0, 1000);
    append_entries(&mut log, 1..=12).await;
    sm.apply([append_entry(1, &["e1"])]).await.unwrap();

    // openraft asks to purge up to a snapshot it is still installing: the
    // purge waits for the install instead of dropping entries the state
    // machine does not hold yet.
    let _ = sm.begin_receiving_snapshot().await.unwrap();
    let mut purge = tokio::spawn({
        let mut log = log.clone();
        async move { log.purge(id(8)).await }
    });
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), &mut purge)
            .await
            .is_err(),
        "the purge waits while the install is pending"
    );
    sm.install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    purge.await.unwrap().unwrap();
    let purged = |state: openraft::storage::LogState<TypeConfig>| state.last_purged_log_id;
    assert_eq!(purged(log.get_log_state().await.unwrap()), Some(id(8)));

    // An install that never completes: the purge fails and purges nothing.
    let _ = sm.begin_receiving_snapshot().await.unwrap();
    assert!(log.purge(id(11)).await.is_err());
    assert_eq!(purged(log.get_log_state().await.unwrap()), Some(id(8)));
    let entries = log.try_get_log_entries(9..13).await.unwrap();
    assert_eq!(entries.len(), 4, "entries past the state machine are kept");

    // An install that fails (a cut snapshot) ends the wait: the purge
    // fails and purges nothing.
    let mut received = sm.begin_receiving_snapshot().await.unwrap();
    let purge = tokio::spawn({
        let mut log = log.clone();
        async move { log.purge(id(11)).await }
    });
    {
        use tokio::io::AsyncWriteExt;
        received.write_all(b"\x05\0\0\0ab").await.unwrap();
        received.shutdown().await.unwrap();
    }
    let meta = snapshot.meta.clone();
    assert!(sm.install_snapshot(&meta, received).await.is_err());
    assert!(purge.await.unwrap().is_err());
    // Until another install completes, a purge past the state machine
    // fails at once.
    assert!(log.purge(id(12)).await.is_err());
    assert_eq!(purged(log.get_log_state().await.unwrap()), Some(id(8)));
    let entries = log.try_get_log_entries(9..13).await.unwrap();
    assert_eq!(entries.len(), 4, "entries past the state machine are kept");
}

/// A range whose start was purged (a deposed leader's replication task
/// reading after its node purged as a follower) gives replication nothing,
/// never a run that does not start where AppendEntries says it does.
#[tokio::test]
async fn replication_reads_only_an_unbroken_run_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db.redb")).unwrap();
    let mut log = store.log_store(0);
    let mut sm = store.state_machine(0, 1000);
    append_entries(&mut log, 1..=20).await;
    apply_numbered(&mut sm, 12).await;
    log.purge(LogId::new(CommittedLeaderId::new(1, 1), 10))
        .await
        .unwrap();
    let indexes = |entries: Vec<Entry>| entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>();
    // What openraft's own reads may get: what is left of the range.
    assert_eq!(
        indexes(log.try_get_log_entries(5..15).await.unwrap()),
        (11..15).collect::<Vec<_>>()
    );
    // What replication may send after prev_log_id 4: nothing.
    assert!(log.limited_get_log_entries(5, 15).await.unwrap().is_empty());
    assert_eq!(
        indexes(log.limited_get_log_entries(11, 21).await.unwrap()),
        (11..21).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn replication_reads_are_capped_in_bytes() {
    use crate::storage::log_store::{entry_bytes, MAX_APPEND_ENTRIES_BYTES};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db.redb")).unwrap();
    let mut log = store.log_store(0);
    // Twelve entries of about 1 MiB: replication asks for all of them.
    for i in 1..=12u64 {
        let first = (i as usize) * 1000;
        log.blocking_append([sized_entry(i, first..first + 1000)])
            .await
            .unwrap();
    }
    let one = entry_bytes(&sized_entry(1, 0..1000));
    assert!(
        one > 1_000_000 && one < MAX_APPEND_ENTRIES_BYTES / 3,
        "{one}"
    );
    let sent = log.limited_get_log_entries(1, 13).await.unwrap();
    let bytes: usize = sent.iter().map(entry_bytes).sum();
    assert_eq!(sent.len(), MAX_APPEND_ENTRIES_BYTES / one);
    assert!(bytes <= MAX_APPEND_ENTRIES_BYTES);
    let indexes: Vec<u64> = sent.iter().map(|e| e.log_id.index).collect();
    assert_eq!(indexes, (1..=sent.len() as u64).collect::<Vec<_>>());
    // An entry larger than the cap still goes, alone.
    log.blocking_append([sized_entry(13, 100_000..105_000)])
        .await
        .unwrap();
    let big = log.limited_get_log_entries(13, 14).await.unwrap();
    assert_eq!(big.len(), 1);
    assert!(entry_bytes(&big[0]) > MAX_APPEND_ENTRIES_BYTES);
}

#[tokio::test]
async fn replication_reads_small_entries_whole() {
    // Read in growing chunks, all of openraft's range.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db.redb")).unwrap();
    let mut log = store.log_store(0);
    append_entries(&mut log, 1..=300).await;
    let sent = log.limited_get_log_entries(1, 301).await.unwrap();
    let indexes: Vec<u64> = sent.iter().map(|e| e.log_id.index).collect();
    assert_eq!(indexes, (1..=300).collect::<Vec<_>>());
}

/// An entry appending events `numbers` of about 1 KiB each.
fn sized_entry(index: u64, numbers: std::ops::Range<usize>) -> Entry {
    let events: Vec<_> = numbers
        .map(|i| auditflow_protocol::sample::sized_event(format!("ev-{i:08}"), i, 4, 1024))
        .collect();
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Command::Append {
            received_at: auditflow_protocol::Timestamp(1_700_000_000_000_000_000),
            events: events.into(),
        }),
    }
}

/// A partition with `n` events of about 1 KiB, a cursor and a parked
/// event, applied to partition 0 of a new store at `path`.
async fn filled_store(path: &std::path::Path, n: usize) -> Store {
    use crate::replicated::delivery::DeliveryCommand as D;
    let store = Store::open(path).unwrap();
    let mut sm = store.state_machine(0, 1_000_000);
    let mut index = 0;
    for start in (0..n).step_by(100) {
        index += 1;
        sm.apply([sized_entry(index, start..n.min(start + 100))])
            .await
            .unwrap();
    }
    let parked = auditflow_protocol::delivery::DlqEntry {
        event_id: "ev-00000003".into(),
        parked_at: auditflow_protocol::Timestamp(5),
        reason: "HTTP 400".into(),
        attempts: Vec::new(),
        redrive: false,
    };
    sm.apply([
        delivery_entry(
            index + 1,
            D::Park {
                dest: "siem".into(),
                entries: vec![(3, parked)],
                next_offset: Some(7),
            },
        ),
        delivery_entry(
            index + 2,
            D::Advance {
                dest: "archive".into(),
                next_offset: 40,
            },
        ),
    ])
    .await
    .unwrap();
    store
}

/// What the sender does with chunk `n` in [`transfer`].
#[derive(Clone, Copy, PartialEq, Debug)]
enum Step {
    Once,
    /// Sent twice: its answer was lost, so both sides seek back.
    Twice,
    /// Sent once, then the stream starts over from offset 0, as openraft
    /// does on a snapshot mismatch (honoured once per transfer).
    FromStart,
}

/// Every third chunk sent twice.
fn every_third_twice(n: u64) -> Step {
    if n % 3 == 2 {
        Step::Twice
    } else {
        Step::Once
    }
}

/// Moves `snap` into `into`'s partition 0 the way openraft's chunked
/// transport does: the sender measures it, then sends chunks of
/// `chunk` bytes, each after seeking to its offset, as `plan` says.
/// `damage` may change each chunk on the way. Returns the most the sending
/// and the receiving side held in memory at once.
async fn transfer(
    snap: Snapshot,
    into: &Store,
    chunk: usize,
    mut plan: impl FnMut(u64) -> Step,
    mut damage: impl FnMut(u64, &mut Vec<u8>),
) -> (Result<(), StorageError>, (usize, usize)) {
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
    let Snapshot { meta, snapshot } = snap;
    let mut data = snapshot;
    let mut sm = into.state_machine(0, 1_000_000);
    let mut received = sm.begin_receiving_snapshot().await.unwrap();
    let end = data.seek(std::io::SeekFrom::End(0)).await.unwrap();
    let mut most = (0, 0);
    let mut offset = 0;
    let mut n_chunk = 0;
    let mut restarted = false;
    while offset < end {
        let step = plan(n_chunk);
        for _ in 0..(1 + usize::from(step == Step::Twice)) {
            data.seek(std::io::SeekFrom::Start(offset)).await.unwrap();
            let mut buf = Vec::with_capacity(chunk);
            while buf.len() < chunk {
                if (&mut data)
                    .take((chunk - buf.len()) as u64)
                    .read_to_end(&mut buf)
                    .await
                    .unwrap()
                    == 0
                {
                    break;
                }
            }
            damage(offset, &mut buf);
            received
                .seek(std::io::SeekFrom::Start(offset))
                .await
                .unwrap();
            received.write_all(&buf).await.unwrap();
            most.0 = most.0.max(data.buffered_bytes());
            most.1 = most.1.max(received.buffered_bytes());
            if offset + buf.len() as u64 == end {
                break;
            }
        }
        let mut probe = Vec::new();
        data.seek(std::io::SeekFrom::Start(offset)).await.unwrap();
        (&mut data)
            .take(chunk as u64)
            .read_to_end(&mut probe)
            .await
            .unwrap();
        offset += probe.len() as u64;
        n_chunk += 1;
        if step == Step::FromStart && !restarted {
            restarted = true;
            offset = 0;
        }
    }
    received.shutdown().await.unwrap();
    (sm.install_snapshot(&meta, received).await, most)
}

#[tokio::test]
async fn a_snapshot_streams_through_retried_chunks_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let source = filled_store(&dir.path().join("source.redb"), 3000).await;
    let mut sm = source.state_machine(0, 1_000_000);
    let snap = sm
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("a snapshot");
    assert_eq!(
        snap.snapshot.buffered_bytes(),
        0,
        "nothing read before it is sent"
    );
    // Events applied after the snapshot was taken are not in it.
    let expected = source.reader(0).read(0, 10_000).unwrap();
    let expected_head = source.reader(0).head().unwrap();
    sm.apply([append_entry(1000, &["late"])]).await.unwrap();

    let target = Store::open(&dir.path().join("target.redb")).unwrap();
    let (installed, most) = transfer(snap, &target, 300 * 1024, every_third_twice, |_, _| {}).await;
    installed.unwrap();
    // The encoder's buffer and the copy kept for a resent chunk, each at
    // most one record past FILL_BYTES; one staging row.
    assert!(
        most.0 <= 2 * (snapshot::FILL_BYTES + 2048) && most.1 <= snapshot::STAGE_ROW_BYTES,
        "held {most:?} bytes of a {} byte partition",
        expected.len() * 1024
    );
    let reader = target.reader(0);
    assert_eq!(reader.read(0, 10_000).unwrap(), expected);
    assert_eq!(reader.head().unwrap(), expected_head);
    assert_eq!(reader.cursor("siem").unwrap(), 7);
    assert_eq!(reader.cursor("archive").unwrap(), 40);
    assert_eq!(reader.dlq("siem", 0, 10).unwrap()[0].0, 3);
    // The dedup index came along; nothing is left staged.
    let mut sm1 = target.state_machine(0, 1_000_000);
    let out = sm1.apply([sized_entry(2000, 10..11)]).await.unwrap();
    match &out[0] {
        crate::replicated::CommandResponse::Appended(r) => assert!(
            matches!(r[0], auditflow_protocol::wire::AppendResult::Stored(ref a) if a.duplicate && a.offset == 10)
        ),
        other => panic!("{other:?}"),
    }
    let txn = target.db.begin_read().unwrap();
    let staged = txn.open_table(tables::SNAPSHOT_STAGING).unwrap();
    assert_eq!(staged.iter().unwrap().count(), 0);
}

#[tokio::test]
async fn a_damaged_or_cut_snapshot_is_refused_and_the_old_state_kept() {
    let dir = tempfile::tempdir().unwrap();
    let source = filled_store(&dir.path().join("source.redb"), 500).await;
    let target = filled_store(&dir.path().join("target.redb"), 20).await;
    let before = target.reader(0).read(0, 1000).unwrap();
    let current = || async {
        source
            .state_machine(0, 1_000_000)
            .get_current_snapshot()
            .await
            .unwrap()
            .unwrap()
    };
    // One bit flipped inside an event (in its id).
    let (flipped, _) = transfer(
        current().await,
        &target,
        64 * 1024,
        every_third_twice,
        |_, buf| {
            if let Some(at) = buf.windows(11).position(|w| w == b"ev-00000200") {
                buf[at + 3] ^= 1;
            }
        },
    )
    .await;
    let err = flipped
        .expect_err("a damaged snapshot is refused")
        .to_string();
    assert!(err.contains("digest"), "{err}");
    // The end of the last chunk lost.
    let end = {
        use tokio::io::AsyncSeekExt;
        let mut data = current().await.snapshot;
        data.seek(std::io::SeekFrom::End(0)).await.unwrap()
    };
    let (cut, _) = transfer(
        current().await,
        &target,
        64 * 1024,
        every_third_twice,
        |offset, buf| {
            if offset + buf.len() as u64 == end {
                buf.truncate(buf.len() - 10);
            }
        },
    )
    .await;
    let err = cut.expect_err("a cut snapshot is refused").to_string();
    assert!(err.contains("record"), "{err}");
    assert_eq!(target.reader(0).read(0, 1000).unwrap(), before);
    assert_eq!(target.reader(0).head().unwrap().next_offset, 20);
}

#[tokio::test]
async fn a_snapshot_of_an_unchanged_partition_is_measured_once() {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let dir = tempfile::tempdir().unwrap();
    let store = filled_store(&dir.path().join("db.redb"), 300).await;
    let mut sm = store.state_machine(0, 1_000_000);
    // Measured length and, read to the end, the real one.
    async fn lengths(snap: Snapshot) -> (u64, u64) {
        let mut data = snap.snapshot;
        let measured = data.seek(std::io::SeekFrom::End(0)).await.unwrap();
        data.seek(std::io::SeekFrom::Start(0)).await.unwrap();
        let mut bytes = Vec::new();
        data.read_to_end(&mut bytes).await.unwrap();
        (measured, bytes.len() as u64)
    }
    let (first, real) = lengths(sm.get_current_snapshot().await.unwrap().unwrap()).await;
    assert_eq!(first, real);
    // A row written behind the state machine's back keeps the snapshot id
    // (nothing was applied): the length comes from the last measurement.
    {
        let txn = store.db.begin_write().unwrap();
        let mut events = txn.open_table(tables::EVENTS).unwrap();
        let first = events.get((0, 0)).unwrap().unwrap().value().to_vec();
        events.insert((0, 10_000), first.as_slice()).unwrap();
        drop(events);
        txn.commit().unwrap();
    }
    let (second, real) = lengths(sm.get_current_snapshot().await.unwrap().unwrap()).await;
    assert_eq!(second, first, "not measured again");
    assert!(real > first);
    // An installed snapshot (here of the same state, so the same id)
    // replaces the rows: the length is measured afresh.
    let snap = sm.get_current_snapshot().await.unwrap().unwrap();
    sm.install_snapshot(&snap.meta.clone(), snap.snapshot)
        .await
        .unwrap();
    let (after_install, real_after) =
        lengths(sm.get_current_snapshot().await.unwrap().unwrap()).await;
    assert_eq!(after_install, real_after);
    assert_eq!(
        after_install, real,
        "the row written behind its back now counts"
    );
    // An applied entry makes a new snapshot, measured afresh.
    sm.apply([sized_entry(1000, 300..301)]).await.unwrap();
    let (third, real) = lengths(sm.get_current_snapshot().await.unwrap().unwrap()).await;
    assert_eq!(third, real);
    assert!(third > after_install + 1024);
}

/// The event files of the store at `path`, by name.
fn event_files_of(path: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(Store::events_dir_of(path))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn event_bytes_live_in_event_files_checked_at_open_and_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let before = {
        let store = filled_store(&path, 250).await;
        let events = store.reader(0).read(0, 1000).unwrap();
        assert_eq!(events.len(), 250);
        events
    };
    let files = event_files_of(&path);
    assert_eq!(files.len(), 1, "one file for partition 0: {files:?}");
    let file = &files[0];
    let len = std::fs::metadata(file).unwrap().len();
    assert!(len > 250 * 100, "the events' bytes are in the file ({len})");

    // Bytes past what the database knows (a transaction a crash lost) are
    // cut off at open, and a later append overwrites nothing it needs.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(file).unwrap();
        f.write_all(&[0xAB; 777]).unwrap();
    }
    {
        let store = Store::open(&path).unwrap();
        assert_eq!(std::fs::metadata(file).unwrap().len(), len);
        assert_eq!(store.reader(0).read(0, 1000).unwrap(), before);
        let mut sm = store.state_machine(0, 1_000_000);
        sm.apply([sized_entry(100, 250..260)]).await.unwrap();
        let after = store.reader(0).read(0, 1000).unwrap();
        assert_eq!(after.len(), 260);
        assert_eq!(after[..250], before[..]);
    }

    // A damaged byte fails the read of that event with the file's name;
    // the others still read.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(file)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 10).unwrap();
        f.write_all_at(&[b[0] ^ 0xFF], 10).unwrap();
    }
    {
        let store = Store::open(&path).unwrap();
        let err = store.reader(0).read(0, 1).expect_err("damaged").to_string();
        assert!(err.contains("checksum") && err.contains(".seg"), "{err}");
        assert_eq!(store.reader(0).read(1, 1000).unwrap().len(), 259);
    }

    // A file shorter than the database says is refused at open, naming it,
    // and the store's files are left as they were.
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let err = Store::open(&path).err().expect("refused").to_string();
    assert!(err.contains("event file") && err.contains("holds"), "{err}");
    assert_eq!(std::fs::metadata(file).unwrap().len(), len / 2);
    // So is a missing one.
    std::fs::remove_file(file).unwrap();
    let err = Store::open(&path).err().expect("refused").to_string();
    assert!(err.contains("missing"), "{err}");
}

#[tokio::test]
async fn an_installed_snapshot_gets_a_new_event_file_and_the_old_one_goes() {
    let dir = tempfile::tempdir().unwrap();
    let source = filled_store(&dir.path().join("source.redb"), 120).await;
    let target_path = dir.path().join("target.redb");
    let target = filled_store(&target_path, 30).await;
    let old = event_files_of(&target_path);
    assert_eq!(old.len(), 1);
    // A file of a generation the database does not name (an install cut
    // short) is removed at open.
    let stray =
        Store::events_dir_of(&target_path).join(format!("{:020}.seg", event_files::segment(0, 7)));
    std::fs::write(&stray, b"left over").unwrap();
    drop(target);
    let target = Store::open(&target_path).unwrap();
    assert_eq!(event_files_of(&target_path), old);

    let snap = source
        .state_machine(0, 1_000_000)
        .get_current_snapshot()
        .await
        .unwrap()
        .unwrap();
    let mut sm = target.state_machine(0, 1_000_000);
    sm.install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    let now = event_files_of(&target_path);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, old, "a new generation replaced the old file");
    let expected = source.reader(0).read(0, 1000).unwrap();
    assert_eq!(target.reader(0).read(0, 1000).unwrap(), expected);
    // Appends after the install go to the new file, and all of it reopens.
    sm.apply([sized_entry(1000, 120..125)]).await.unwrap();
    drop(sm);
    drop(target);
    let target = Store::open(&target_path).unwrap();
    let read = target.reader(0).read(0, 1000).unwrap();
    assert_eq!(read.len(), 125);
    assert_eq!(read[..120], expected[..]);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 32, ..Default::default() })]

    /// Whatever the partition's size, the chunk size, and which chunks are
    /// resent or restart the stream, the install holds what was sent.
    #[test]
    fn any_chunking_and_resending_installs_the_same_partition(
        events in 0usize..1500,
        chunk in 1024usize..400_000,
        plan in proptest::collection::vec(0u8..4, 1..16),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let source = filled_store(&dir.path().join("source.redb"), events).await;
            let snap = source.state_machine(0, 1_000_000).get_current_snapshot().await.unwrap().unwrap();
            let target = filled_store(&dir.path().join("target.redb"), 7).await;
            let step = |n: u64| match plan[n as usize % plan.len()] {
                0 => Step::Twice,
                1 => Step::FromStart,
                _ => Step::Once,
            };
            let (installed, _) = transfer(snap, &target, chunk, step, |_, _| {}).await;
            installed.unwrap();
            let (from, to) = (source.reader(0), target.reader(0));
            assert_eq!(to.read(0, 1000).unwrap(), from.read(0, 1000).unwrap());
            assert_eq!(to.head().unwrap(), from.head().unwrap());
            for dest in ["siem", "archive"] {
                assert_eq!(to.cursor(dest).unwrap(), from.cursor(dest).unwrap());
                assert_eq!(to.dlq(dest, 0, 10).unwrap(), from.dlq(dest, 0, 10).unwrap());
            }
        });
    }
}

/// A directory of event files on a disk that can fill up: while `full`,
/// every write fails as a full disk does (`ENOSPC`). While `failing`,
/// every file sync fails (`EIO`); `syncs` counts the file syncs tried.
struct FillingDir {
    inner: FsLogDir,
    full: Arc<std::sync::atomic::AtomicBool>,
    failing: Arc<std::sync::atomic::AtomicBool>,
    syncs: Arc<std::sync::atomic::AtomicUsize>,
}

struct FillingFile {
    inner: Box<dyn redb::StorageBackend>,
    full: Arc<std::sync::atomic::AtomicBool>,
    failing: Arc<std::sync::atomic::AtomicBool>,
    syncs: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for FillingFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FillingFile")
    }
}

impl redb::StorageBackend for FillingFile {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        self.syncs.fetch_add(1, SeqCst);
        if self.failing.load(SeqCst) {
            return Err(std::io::Error::from_raw_os_error(5));
        }
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if self.full.load(std::sync::atomic::Ordering::SeqCst) {
            // Half of it lands, as a write cut short by a full disk may.
            let half = &data[..data.len() / 2];
            self.inner.write(offset, half)?;
            return Err(std::io::Error::from_raw_os_error(28));
        }
        self.inner.write(offset, data)
    }
}

impl LogDir for FillingDir {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn list(&self) -> std::io::Result<Vec<u64>> {
        self.inner.list()
    }
    fn open(&self, segment: u64) -> std::io::Result<Box<dyn redb::StorageBackend>> {
        Ok(Box::new(FillingFile {
            inner: self.inner.open(segment)?,
            full: Arc::clone(&self.full),
            failing: Arc::clone(&self.failing),
            syncs: Arc::clone(&self.syncs),
        }))
    }
    fn remove(&self, segment: u64) -> std::io::Result<()> {
        self.inner.remove(segment)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
}

#[tokio::test]
async fn a_full_disk_fails_the_apply_with_its_cause_and_keeps_what_was_stored() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("db.redb");
    let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let open = |full: &Arc<std::sync::atomic::AtomicBool>| {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&db_path)
            .unwrap();
        Store::with_backend(
            redb::backends::FileBackend::new(file).unwrap(),
            FsLogDir::create(&Store::log_dir_of(&db_path), raft_log::SEGMENT_BYTES).unwrap(),
            FillingDir {
                inner: FsLogDir::create(&Store::events_dir_of(&db_path), 0).unwrap(),
                full: Arc::clone(full),
                failing: Arc::default(),
                syncs: Arc::default(),
            },
            "db.redb",
            WriterMode::Thread,
        )
        .unwrap()
    };
    let before = {
        let store = open(&full);
        let mut sm = store.state_machine(0, 1_000_000);
        sm.apply([sized_entry(1, 0..40)]).await.unwrap();
        full.store(true, Ordering::SeqCst);
        let err = sm
            .apply([sized_entry(2, 40..80)])
            .await
            .expect_err("the disk is full")
            .to_string();
        assert!(err.contains("No space left on device"), "{err}");
        // Nothing of the failed apply is visible; what was stored reads.
        let reader = store.reader(0);
        assert_eq!(reader.head().unwrap().next_offset, 40);
        let events = reader.read(0, 1000).unwrap();
        assert_eq!(events.len(), 40);
        events
    };
    // Space freed and the node restarted: the entry applies again (as
    // openraft re-applies it from the log) over the half-written bytes.
    full.store(false, Ordering::SeqCst);
    let store = open(&full);
    let reader = store.reader(0);
    assert_eq!(reader.read(0, 1000).unwrap(), before);
    let mut sm = store.state_machine(0, 1_000_000);
    sm.apply([sized_entry(2, 40..80)]).await.unwrap();
    let after = reader.read(0, 1000).unwrap();
    assert_eq!(after.len(), 80);
    assert_eq!(after[..40], before[..]);
    assert!(after.iter().enumerate().all(|(i, e)| e.offset == i as u64));
}

/// The offsets `sm.apply(entries)` acknowledged, per event, marked `d`
/// where the event was a duplicate.
async fn applied_offsets(sm: &mut StateMachine, entries: Vec<Entry>) -> Vec<String> {
    use crate::storage::types::CommandResponse;
    use auditflow_protocol::wire::AppendResult;
    let mut out = Vec::new();
    for response in sm.apply(entries).await.unwrap() {
        let CommandResponse::Appended(results) = response else {
            continue;
        };
        for r in results {
            match r {
                AppendResult::Stored(ack) if ack.duplicate => out.push(format!("{}d", ack.offset)),
                AppendResult::Stored(ack) => out.push(ack.offset.to_string()),
                AppendResult::Rejected(e) => out.push(format!("{e:?}")),
            }
        }
    }
    out
}

#[tokio::test]
async fn ids_leave_the_dedup_window_and_reads_cross_runs_from_any_offset() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db.redb")).unwrap();
    let ids = |p: u32| -> Vec<String> {
        let r = store.reader(p).read(0, 1000).unwrap();
        for (i, e) in r.iter().enumerate() {
            assert_eq!(e.offset, i as u64);
        }
        r.into_iter().map(|e| e.event.id).collect()
    };
    // Window 4, one apply job of three entries: after [a b c] [d e] the
    // head is 5, so offset 0 (a) has left the window and a is stored
    // again; e is still in it.
    let mut sm = store.state_machine(0, 4);
    let got = applied_offsets(
        &mut sm,
        vec![
            append_entry(1, &["a", "b", "c"]),
            append_entry(2, &["d", "e"]),
            append_entry(3, &["a", "e"]),
        ],
    )
    .await;
    assert_eq!(got, ["0", "1", "2", "3", "4", "5", "4d"]);
    // A later job evicts from the table's runs. Ids leave after each
    // entry: b (offset 1) left with the head at 6, c (2) is still in the
    // window for the entry that moves the head to 7, and d (3) for the
    // next.
    let got = applied_offsets(
        &mut sm,
        vec![append_entry(4, &["b", "c"]), append_entry(5, &["d", "f"])],
    )
    .await;
    assert_eq!(got, ["6", "2d", "3d", "7"]);
    let got = applied_offsets(&mut sm, vec![append_entry(6, &["c", "d"])]).await;
    assert_eq!(got, ["8", "9"]);
    assert_eq!(ids(0), ["a", "b", "c", "d", "e", "a", "b", "f", "c", "d"]);
    // Reads from every offset, with every limit, across the jobs' runs.
    let all = store.reader(0).read(0, 1000).unwrap();
    for from in 0..=all.len() {
        for limit in 1..=all.len() + 1 {
            let got = store.reader(0).read(from as u64, limit).unwrap();
            let want: Vec<_> = all.iter().skip(from).take(limit).cloned().collect();
            assert_eq!(got, want, "from {from} limit {limit}");
        }
    }
    // Window 1: ids leave it inside the job that stored them, before its
    // run is written.
    let mut sm1 = store.state_machine(1, 1);
    let got = applied_offsets(
        &mut sm1,
        vec![
            append_entry(1, &["p", "q", "r"]),
            append_entry(2, &["p", "r"]),
        ],
    )
    .await;
    assert_eq!(got, ["0", "1", "2", "3", "2d"]);
    assert_eq!(ids(1), ["p", "q", "r", "p"]);
    // And both survive a reopen.
    drop((sm, sm1));
    drop(store);
    let store = Store::open(&dir.path().join("db.redb")).unwrap();
    assert_eq!(store.reader(0).read(0, 1000).unwrap(), all);
}

/// Before fail-stop, a failed event-file sync left the files dirty and the
/// next durable commit synced them again: a retried fsync can report
/// success for pages the kernel dropped after the first failure, so the
/// node believed lost bytes durable; and the store kept taking writes.
/// Now the first failed sync halts the store: it is never retried, every
/// later write fails as halted, and the halt names the cause. The same
/// with every writer: the production thread, the task the simulator runs
/// it as, and the inline one.
#[tokio::test]
async fn a_failed_sync_halts_the_store_and_is_never_retried() {
    for mode in [WriterMode::Thread, WriterMode::Task, WriterMode::Inline] {
        a_failed_sync_halts(mode).await;
    }
}

async fn a_failed_sync_halts(mode: WriterMode) {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("db.redb");
    let events = FillingDir {
        inner: FsLogDir::create(&Store::events_dir_of(&db_path), 0).unwrap(),
        full: Arc::default(),
        failing: Arc::default(),
        syncs: Arc::default(),
    };
    let (failing, syncs) = (Arc::clone(&events.failing), Arc::clone(&events.syncs));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&db_path)
        .unwrap();
    let store = Store::with_backend(
        redb::backends::FileBackend::new(file).unwrap(),
        FsLogDir::create(&Store::log_dir_of(&db_path), raft_log::SEGMENT_BYTES).unwrap(),
        events,
        "db.redb",
        mode,
    )
    .unwrap();
    let mut halted = store.halt().subscribe();
    let mut sm = store.state_machine(0, 1_000_000);
    sm.apply([sized_entry(1, 0..4)]).await.unwrap();
    assert!(store.halt().cause().is_none());

    failing.store(true, SeqCst);
    let durable = || store.writer.write(Commit::Durable, |_| Ok(()));
    let err = durable().await.expect_err("the sync fails");
    assert!(matches!(err, StoreError::Io { .. }), "{mode:?}: {err:?}");
    halted.changed().await.unwrap();
    let cause = store.halt().cause().expect("halted");
    assert!(cause.to_string().contains("sync"), "{cause}");
    let tried = syncs.load(SeqCst);
    assert!(tried >= 1);

    // The disk recovers; the store does not pretend it did.
    failing.store(false, SeqCst);
    let err = durable().await.expect_err("halted");
    assert!(
        matches!(err, StoreError::Halted { .. }),
        "{mode:?}: {err:?}"
    );
    let err = sm.apply([sized_entry(2, 4..8)]).await.expect_err("halted");
    assert!(err.to_string().contains("sync"), "{mode:?}: {err}");
    assert_eq!(
        syncs.load(SeqCst),
        tried,
        "{mode:?}: a failed fsync is never retried"
    );
}

/// A Raft log write that fails (a full disk) halts the whole store, as
/// the node must then stop (fail-stop), and names the cause; with the log
/// writer as a thread, a task or inline.
#[tokio::test]
async fn a_failed_log_write_halts_the_store() {
    for mode in [WriterMode::Thread, WriterMode::Task, WriterMode::Inline] {
        a_failed_log_write_halts(mode).await;
    }
}

async fn a_failed_log_write_halts(mode: WriterMode) {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("db.redb");
    let log_dir = FillingDir {
        inner: FsLogDir::create(&Store::log_dir_of(&db_path), 1 << 20).unwrap(),
        full: Arc::default(),
        failing: Arc::default(),
        syncs: Arc::default(),
    };
    let full = Arc::clone(&log_dir.full);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&db_path)
        .unwrap();
    let store = Store::with_backend(
        redb::backends::FileBackend::new(file).unwrap(),
        log_dir,
        FsLogDir::create(&Store::events_dir_of(&db_path), 0).unwrap(),
        "db.redb",
        mode,
    )
    .unwrap();
    let mut log = store.log_store(0);
    append_entries(&mut log, 1..=3).await;
    assert!(store.halt().cause().is_none());
    full.store(true, SeqCst);
    assert!(log
        .blocking_append([append_entry(4, &["y"])])
        .await
        .is_err());
    let cause = store.halt().cause().expect("halted");
    assert!(
        matches!(*cause, StoreError::FullDisk { .. }),
        "{mode:?}: {cause:?}"
    );
    assert!(cause.to_string().contains("raft log"), "{mode:?}: {cause}");
}

/// Seed 6115: a node's first sync of a new database failed between
/// redb's two creation steps, leaving a header without its magic number,
/// and every later start refused the file ("Not a redb database"), so
/// the node never came back. Such a file (magic bytes zero, no log
/// beside it) is created again; a foreign file, or zeroes beside a Raft
/// log, is still refused.
#[test]
fn an_unfinished_creation_is_created_again_and_nothing_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node.redb");
    std::fs::write(&path, vec![0u8; 4096]).expect("write");
    let store = Store::open(&path).expect("an unfinished creation opens as a new database");
    drop(store);
    Store::open(&path).expect("and opens again");

    let foreign = dir.path().join("foreign.redb");
    std::fs::write(&foreign, b"not a database at all").expect("write");
    assert!(Store::open(&foreign).is_err(), "a foreign file is refused");

    let beside_log = dir.path().join("logged.redb");
    std::fs::create_dir_all(Store::log_dir_of(&beside_log)).expect("mkdir");
    std::fs::write(
        Store::log_dir_of(&beside_log).join(format!("{:020}.seg", 1)),
        b"x",
    )
    .expect("write");
    std::fs::write(&beside_log, vec![0u8; 4096]).expect("write");
    assert!(
        Store::open(&beside_log).is_err(),
        "zeroes beside a Raft log are refused"
    );
}
