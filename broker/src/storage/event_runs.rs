//! The `events` table's rows: where stored events' bytes are, one row per
//! run of consecutive offsets.
//!
//! An apply job writes its events back to back into the partition's event
//! file, so their locations are one start position and a list of lengths.
//! Storing them as one row per run (keyed by the run's first offset)
//! instead of one row per event makes an apply job cost one `events`
//! insert instead of one per event: the per-event inserts were about 15 %
//! of a storage writer's time at W=256 (docs/performance.md).
//!
//! A run never changes once written (only a snapshot install deletes a
//! partition's runs, and writes its own); runs of a partition do not
//! overlap, and together they cover every offset below the partition's
//! head.

use redb::{ReadableTable, Table};
use serde::{Deserialize, Serialize};

use super::event_files::EventRef;
use super::tables;
use super::StoreError;

/// Most events in one run, so that a row stays small to read back (about
/// 50 bytes an event, with its id).
pub const MAX_RUN_EVENTS: usize = 512;

/// One `events` row: events of consecutive offsets, from the row key's
/// offset on, whose bytes lie back to back in one event file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRun {
    /// Generation of the partition's event file.
    pub generation: u32,
    /// Byte position of the first event in it.
    pub pos: u64,
    /// The events, in offset order.
    pub events: Vec<RunEvent>,
}

/// One event of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEvent {
    /// Length of the encoded `StoredEvent`.
    pub len: u32,
    /// CRC-32 of those bytes, checked on every read.
    pub crc: u32,
    /// The event's id, so that evicting it from the dedup window needs no
    /// read of the file.
    pub id: String,
}

impl EventRun {
    /// The run's events as refs, with their offsets, if the run starts at
    /// `first`.
    fn into_refs(self, first: u64) -> impl Iterator<Item = (u64, EventRef)> {
        let generation = self.generation;
        let mut pos = self.pos;
        self.events
            .into_iter()
            .zip(first..)
            .map(move |(e, offset)| {
                let at = EventRef {
                    generation,
                    pos,
                    len: e.len,
                    crc: e.crc,
                    id: e.id,
                };
                pos += u64::from(e.len);
                (offset, at)
            })
    }

    /// The id of the event at `offset`, if the run starting at `first`
    /// holds it.
    fn id_at(&self, first: u64, offset: u64) -> Option<&str> {
        let i = usize::try_from(offset.checked_sub(first)?).ok()?;
        self.events.get(i).map(|e| e.id.as_str())
    }
}

/// Gathers the refs of one apply job (or snapshot install) into runs and
/// writes each run as a row once it is complete.
#[derive(Default)]
pub struct RunWriter {
    /// The run being gathered and its first offset.
    open: Option<(u64, EventRun)>,
    /// Where the open run's bytes end.
    end: u64,
    /// Reused encoding buffer.
    buf: Vec<u8>,
}

impl RunWriter {
    /// Adds the event at `offset`, stored at `at`. It joins the open run
    /// if it follows it (next offset, same file, next bytes); otherwise
    /// the open run is written and a new one begins.
    pub fn push(
        &mut self,
        table: &mut Table<'_, (u32, u64), &'static [u8]>,
        partition: u32,
        offset: u64,
        at: EventRef,
    ) -> Result<(), StoreError> {
        let event = RunEvent {
            len: at.len,
            crc: at.crc,
            id: at.id,
        };
        if let Some((first, run)) = &mut self.open {
            if *first + run.events.len() as u64 == offset
                && run.generation == at.generation
                && self.end == at.pos
                && run.events.len() < MAX_RUN_EVENTS
            {
                self.end += u64::from(event.len);
                run.events.push(event);
                return Ok(());
            }
        }
        self.flush(table, partition)?;
        self.end = at.pos + u64::from(event.len);
        self.open = Some((
            offset,
            EventRun {
                generation: at.generation,
                pos: at.pos,
                events: vec![event],
            },
        ));
        Ok(())
    }

    /// The id of the event at `offset` if the open run holds it.
    pub fn id_at(&self, offset: u64) -> Option<&str> {
        let (first, run) = self.open.as_ref()?;
        run.id_at(*first, offset)
    }

    /// Writes the open run, if any.
    pub fn flush(
        &mut self,
        table: &mut Table<'_, (u32, u64), &'static [u8]>,
        partition: u32,
    ) -> Result<(), StoreError> {
        if let Some((first, run)) = self.open.take() {
            tables::encode_into(&run, &mut self.buf, "event run")?;
            table.insert((partition, first), self.buf.as_slice())?;
        }
        Ok(())
    }
}

/// The run holding `offset` in `partition`, with its first offset.
pub fn run_at(
    table: &impl ReadableTable<(u32, u64), &'static [u8]>,
    partition: u32,
    offset: u64,
) -> Result<Option<(u64, EventRun)>, StoreError> {
    let Some(row) = table
        .range((partition, 0)..=(partition, offset))?
        .next_back()
    else {
        return Ok(None);
    };
    let (k, v) = row?;
    let first = k.value().1;
    let run: EventRun = tables::decode(v.value(), "event run")?;
    Ok((run.id_at(first, offset).is_some()).then_some((first, run)))
}

/// Looks up ids by offset for dedup eviction, keeping the last run it read:
/// evictions come in offset order, so most hit it.
#[derive(Default)]
pub struct IdLookup {
    last: Option<(u64, EventRun)>,
}

impl IdLookup {
    /// The id stored at `offset` in `partition`: looked up in `open` (the
    /// run an apply job is still gathering), the last run read, or the
    /// table.
    pub fn id_at(
        &mut self,
        table: &impl ReadableTable<(u32, u64), &'static [u8]>,
        open: &RunWriter,
        partition: u32,
        offset: u64,
    ) -> Result<Option<String>, StoreError> {
        if let Some(id) = open.id_at(offset) {
            return Ok(Some(id.to_string()));
        }
        if let Some((first, run)) = &self.last {
            if let Some(id) = run.id_at(*first, offset) {
                return Ok(Some(id.to_string()));
            }
        }
        self.last = run_at(table, partition, offset)?;
        Ok(self
            .last
            .as_ref()
            .and_then(|(first, run)| run.id_at(*first, offset))
            .map(str::to_string))
    }
}

/// The refs of `partition`'s events from offset `from` on, in order, with
/// their offsets, until `take` (asked about each next one) says no.
pub fn refs_from(
    table: &impl ReadableTable<(u32, u64), &'static [u8]>,
    partition: u32,
    from: u64,
    mut take: impl FnMut(&EventRef) -> bool,
) -> Result<Vec<(u64, EventRef)>, StoreError> {
    // The run holding `from` starts at or before it.
    let start = match table.range((partition, 0)..=(partition, from))?.next_back() {
        Some(row) => row?.0.value().1,
        None => from,
    };
    let mut out = Vec::new();
    for row in table.range((partition, start)..=(partition, u64::MAX))? {
        let (k, v) = row?;
        let run: EventRun = tables::decode(v.value(), "event run")?;
        for (offset, at) in run.into_refs(k.value().1) {
            if offset < from {
                continue;
            }
            if !take(&at) {
                return Ok(out);
            }
            out.push((offset, at));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(generation: u32, pos: u64, len: u32, id: &str) -> EventRef {
        EventRef {
            generation,
            pos,
            len,
            crc: len ^ 7,
            id: id.into(),
        }
    }

    /// Writes `events` (offset, ref) through a RunWriter into a fresh
    /// table of partition 3 (and a decoy row each in partitions 2 and 4),
    /// then hands the table to `check`.
    fn with_table(
        events: &[(u64, EventRef)],
        check: impl Fn(&Table<'_, (u32, u64), &'static [u8]>, &RunWriter),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(tables::EVENTS).unwrap();
            let decoy = tables::encode(
                &EventRun {
                    generation: 0,
                    pos: 0,
                    events: vec![RunEvent {
                        len: 1,
                        crc: 0,
                        id: "decoy".into(),
                    }],
                },
                "run",
            )
            .unwrap();
            table.insert((2, u64::MAX), decoy.as_slice()).unwrap();
            table.insert((4, 0), decoy.as_slice()).unwrap();
            let mut w = RunWriter::default();
            for (offset, r) in events {
                w.push(&mut table, 3, *offset, r.clone()).unwrap();
            }
            check(&table, &w);
            w.flush(&mut table, 3).unwrap();
            check(&table, &w);
        }
        txn.abort().unwrap();
    }

    #[test]
    fn a_run_breaks_where_offsets_files_or_bytes_do_not_follow() {
        let events = vec![
            (0, at(0, 0, 10, "a")),
            (1, at(0, 10, 5, "b")),
            // A gap in the bytes.
            (2, at(0, 20, 5, "c")),
            // Another file.
            (3, at(1, 25, 5, "d")),
            // A gap in the offsets.
            (5, at(1, 30, 5, "e")),
        ];
        with_table(&events, |_, _| {});
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        let mut table = txn.open_table(tables::EVENTS).unwrap();
        let mut w = RunWriter::default();
        for (offset, r) in &events {
            w.push(&mut table, 0, *offset, r.clone()).unwrap();
        }
        w.flush(&mut table, 0).unwrap();
        let keys: Vec<u64> = table
            .iter()
            .unwrap()
            .map(|r| r.unwrap().0.value().1)
            .collect();
        assert_eq!(keys, [0, 2, 3, 5]);
    }

    #[test]
    fn a_run_holds_at_most_max_run_events() {
        let events: Vec<_> = (0..MAX_RUN_EVENTS as u64 * 2 + 1)
            .map(|i| (i, at(0, i * 4, 4, &format!("id-{i}"))))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        let mut table = txn.open_table(tables::EVENTS).unwrap();
        let mut w = RunWriter::default();
        for (offset, r) in &events {
            w.push(&mut table, 0, *offset, r.clone()).unwrap();
        }
        w.flush(&mut table, 0).unwrap();
        let keys: Vec<u64> = table
            .iter()
            .unwrap()
            .map(|r| r.unwrap().0.value().1)
            .collect();
        let max = MAX_RUN_EVENTS as u64;
        assert_eq!(keys, [0, max, 2 * max]);
    }

    proptest! {
        /// Whatever the breaks between runs, reading from any offset gives
        /// back exactly the refs written from there on, and every id is
        /// found by offset, before the last run is written and after.
        #[test]
        fn refs_and_ids_read_back_as_written(
            steps in proptest::collection::vec((1u64..3, 0u64..3, 1u32..50, prop::bool::weighted(0.1)), 1..300),
            from_frac in 0.0f64..1.2,
            limit in 1usize..400,
        ) {
            let mut events = Vec::new();
            let (mut offset, mut pos, mut generation) = (0u64, 0u64, 0u32);
            for (i, (doff, dpos, len, new_file)) in steps.into_iter().enumerate() {
                if new_file {
                    generation += 1;
                }
                events.push((offset, at(generation, pos, len, &format!("id-{i}"))));
                // Mostly consecutive: a step of 1 and no gap.
                offset += if doff == 2 { 2 } else { 1 };
                pos += u64::from(len) + if dpos == 2 { 3 } else { 0 };
            }
            let from = (offset as f64 * from_frac) as u64;
            let expected: Vec<_> = events
                .iter()
                .filter(|(o, _)| *o >= from)
                .take(limit)
                .cloned()
                .collect();
            with_table(&events, |table, open| {
                let mut lookup = IdLookup::default();
                for (o, r) in &events {
                    let id = lookup.id_at(table, open, 3, *o).unwrap();
                    assert_eq!(id.as_deref(), Some(r.id.as_str()), "offset {o}");
                }
                assert_eq!(lookup.id_at(table, open, 3, offset + 10).unwrap(), None);
                if open.open.is_none() {
                    let mut n = 0;
                    let got = refs_from(table, 3, from, |_| {
                        n += 1;
                        n <= limit
                    })
                    .unwrap();
                    assert_eq!(&got, &expected);
                }
            });
        }
    }
}
