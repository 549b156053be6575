//! What the dead-letter queue and delivery commands record (replicated
//! through Raft with the partition, so a new leader sees the same).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::command::CommandResponse;

pub use auditflow_protocol::delivery::{
    push_attempt, AttemptRecord, DlqEntry, RedriveSelection, MAX_ATTEMPTS_KEPT,
};

/// Delivery state changes, proposed by delivery actors and operators and
/// applied by every replica.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DeliveryCommand {
    /// Events below `next_offset` were delivered (or filtered out): move
    /// the cursor forward (never back: a stale actor cannot undo progress).
    Advance {
        /// Destination.
        dest: String,
        /// New cursor.
        next_offset: u64,
    },
    /// Park (or update) entries; optionally advance the cursor past them.
    Park {
        /// Destination.
        dest: String,
        /// Entries by offset.
        entries: Vec<(u64, DlqEntry)>,
        /// New cursor, if the stream moves on.
        next_offset: Option<u64>,
    },
    /// Mark parked entries for another delivery attempt.
    Redrive {
        /// Destination.
        dest: String,
        /// Which entries.
        selection: RedriveSelection,
    },
    /// Redriven entries were delivered: remove them from the DLQ.
    Resolve {
        /// Destination.
        dest: String,
        /// Their offsets.
        offsets: Vec<u64>,
    },
    /// Set the cursor back to `next_offset` (never forward: that would skip
    /// events). No longer proposed, replay uses a window now; kept so the
    /// log entries of earlier versions still decode and apply.
    SetCursor {
        /// Destination.
        dest: String,
        /// New cursor.
        next_offset: u64,
    },
    /// Add or replace a run-time destination in the catalog (applied by
    /// the catalog partition only).
    PutDestination {
        /// Destination.
        dest: String,
        /// Its configuration as JSON (checked before it was proposed).
        config_json: String,
    },
    /// Remove a run-time destination from the catalog.
    RemoveDestination {
        /// Destination.
        dest: String,
    },
    /// Open (or replace) the destination's replay window `[from, until)`:
    /// those events are re-delivered alongside the live stream, whose
    /// cursor does not move. `until` is clamped to the cursor when
    /// applied; an empty window closes the replay.
    Replay {
        /// Destination.
        dest: String,
        /// First offset to re-deliver.
        from: u64,
        /// End (exclusive); `None`: the cursor.
        until: Option<u64>,
    },
    /// The replay window moved on from `expect` to `next` (closed at its
    /// end). Ignored unless the window still starts at `expect`, so a
    /// stale proposal cannot skip part of a replay that replaced it.
    ReplayAdvance {
        /// Destination.
        dest: String,
        /// Where the window starts now.
        expect: u64,
        /// Where it starts next.
        next: u64,
    },
}

/// Replay windows of one partition: destination → (next offset, end).
pub type ReplayWindows = std::collections::BTreeMap<String, (u64, u64)>;

impl DeliveryCommand {
    /// The destination it concerns.
    pub fn dest(&self) -> &str {
        match self {
            DeliveryCommand::Advance { dest, .. }
            | DeliveryCommand::Park { dest, .. }
            | DeliveryCommand::Redrive { dest, .. }
            | DeliveryCommand::Resolve { dest, .. }
            | DeliveryCommand::SetCursor { dest, .. }
            | DeliveryCommand::PutDestination { dest, .. }
            | DeliveryCommand::RemoveDestination { dest }
            | DeliveryCommand::Replay { dest, .. }
            | DeliveryCommand::ReplayAdvance { dest, .. } => dest,
        }
    }
}

/// The DLQ rows of its destination that applying a command reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DlqReads<'a> {
    /// None.
    Nothing,
    /// Every entry of the destination ([`DeliveryCommand::Redrive`]).
    All,
    /// The entries at these offsets, those that exist
    /// ([`DeliveryCommand::Resolve`]).
    At(&'a [u64]),
}

/// The replicated delivery state of one destination on one partition, as
/// far as a command reads it: the state machine fills it from redb, a model
/// (the delivery core's tests) keeps all of it in memory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DestState {
    /// Next offset to deliver.
    pub cursor: u64,
    /// The open replay window `[next, end)`, if any.
    pub replay: Option<(u64, u64)>,
    /// DLQ entries by offset: at least those [`DeliveryCommand::dlq_reads`]
    /// names (more do no harm).
    pub dlq: BTreeMap<u64, DlqEntry>,
}

/// What applying a delivery command to a [`DestState`] changes; the state
/// machine writes exactly this.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DestChange {
    /// The cursor after the command.
    pub cursor: u64,
    /// The replay window after the command.
    pub replay: Option<(u64, u64)>,
    /// Whether the replay window is to be written (even if unchanged, as
    /// the state machine always did for [`DeliveryCommand::Replay`]).
    pub write_replay: bool,
    /// DLQ rows to write, in order (a later one for the same offset wins).
    pub put: Vec<(u64, DlqEntry)>,
    /// DLQ rows to remove.
    pub remove: Vec<u64>,
    /// What the proposer is answered.
    pub response: CommandResponse,
}

impl DeliveryCommand {
    /// The DLQ rows of its destination that [`apply_dest`] needs in the
    /// state it is given.
    pub fn dlq_reads(&self) -> DlqReads<'_> {
        match self {
            DeliveryCommand::Redrive { .. } => DlqReads::All,
            DeliveryCommand::Resolve { offsets, .. } => DlqReads::At(offsets),
            _ => DlqReads::Nothing,
        }
    }

    /// Whether it changes the run-time destination catalog (applied by
    /// [`apply_catalog`]) rather than one destination's delivery state.
    pub fn is_catalog(&self) -> bool {
        matches!(
            self,
            DeliveryCommand::PutDestination { .. } | DeliveryCommand::RemoveDestination { .. }
        )
    }
}

/// The cursor, DLQ and replay rules (pure): what `cmd` changes in the
/// delivery state `state` of its destination. Shared by the partition state
/// machine (which reads the state from redb and writes the change) and the
/// delivery core's tests (which keep a model replica in memory).
///
/// - The cursor only moves forward through `Advance` and `Park`, so a stale
///   leader's late proposal cannot undo progress; only the legacy
///   `SetCursor` moves it back.
/// - `Park` writes its entries (replacing any at the same offsets).
/// - `Redrive` marks the selected entries not already marked; `Resolve`
///   removes those that exist. `touched` counts what changed.
/// - `Replay` opens `[from, min(until, cursor))` or closes the window if
///   that is empty; `ReplayAdvance` moves the window on only if it still
///   starts at `expect`, and closes it at its end.
///
/// Catalog commands leave the state as it is (see [`apply_catalog`]).
pub fn apply_dest(state: &DestState, cmd: &DeliveryCommand) -> DestChange {
    let mut change = DestChange {
        cursor: state.cursor,
        replay: state.replay,
        write_replay: false,
        put: Vec::new(),
        remove: Vec::new(),
        response: CommandResponse::Empty,
    };
    let mut touched = 0u64;
    let mut reply_cursor = None;
    match cmd {
        DeliveryCommand::Advance { next_offset, .. } => {
            change.cursor = state.cursor.max(*next_offset);
        }
        DeliveryCommand::SetCursor { next_offset, .. } => {
            change.cursor = state.cursor.min(*next_offset);
        }
        DeliveryCommand::Park {
            entries,
            next_offset,
            ..
        } => {
            change.put = entries.clone();
            touched = entries.len() as u64;
            if let Some(n) = next_offset {
                change.cursor = state.cursor.max(*n);
            }
        }
        DeliveryCommand::Redrive { selection, .. } => {
            for (offset, entry) in &state.dlq {
                if !entry.redrive && selection.selects(*offset, entry) {
                    let mut marked = entry.clone();
                    marked.redrive = true;
                    change.put.push((*offset, marked));
                }
            }
            touched = change.put.len() as u64;
        }
        DeliveryCommand::Resolve { offsets, .. } => {
            let mut removed = BTreeSet::new();
            for offset in offsets {
                if state.dlq.contains_key(offset) && removed.insert(*offset) {
                    change.remove.push(*offset);
                }
            }
            touched = change.remove.len() as u64;
        }
        DeliveryCommand::Replay { from, until, .. } => {
            let end = until.map_or(state.cursor, |u| u.min(state.cursor));
            touched = end.saturating_sub(*from);
            change.replay = (touched > 0).then_some((*from, end));
            change.write_replay = true;
        }
        DeliveryCommand::ReplayAdvance { expect, next, .. } => {
            reply_cursor = Some(0);
            if let Some((start, end)) = state.replay {
                if start == *expect && *next > start {
                    touched = (*next).min(end).saturating_sub(start);
                    change.replay = (*next < end).then_some((*next, end));
                    change.write_replay = true;
                }
            }
        }
        DeliveryCommand::PutDestination { .. } | DeliveryCommand::RemoveDestination { .. } => {
            reply_cursor = Some(0);
        }
    }
    change.response = CommandResponse::Delivery {
        cursor: reply_cursor.unwrap_or(change.cursor),
        touched,
    };
    change
}

impl DestState {
    /// Applies `cmd` in memory, as every replica does in redb; returns the
    /// proposer's answer.
    pub fn apply(&mut self, cmd: &DeliveryCommand) -> CommandResponse {
        let change = apply_dest(self, cmd);
        self.cursor = change.cursor;
        self.replay = change.replay;
        for (offset, entry) in change.put {
            self.dlq.insert(offset, entry);
        }
        for offset in change.remove {
            self.dlq.remove(&offset);
        }
        change.response
    }
}

/// The run-time destination catalog rule (pure): `PutDestination` adds or
/// replaces an entry (kept sorted), `RemoveDestination` removes it. Returns
/// how many entries it touched, or `None` for other commands.
pub fn apply_catalog(catalog: &mut Vec<(String, String)>, cmd: &DeliveryCommand) -> Option<u64> {
    match cmd {
        DeliveryCommand::PutDestination { dest, config_json } => {
            catalog.retain(|(name, _)| name != dest);
            catalog.push((dest.clone(), config_json.clone()));
            catalog.sort();
            Some(1)
        }
        DeliveryCommand::RemoveDestination { dest } => {
            let before = catalog.len();
            catalog.retain(|(name, _)| name != dest);
            Some((before - catalog.len()) as u64)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use auditflow_protocol::Timestamp;

    use super::*;

    fn entry(redrive: bool) -> DlqEntry {
        DlqEntry {
            event_id: "e".into(),
            parked_at: Timestamp(0),
            reason: "r".into(),
            attempts: Vec::new(),
            redrive,
        }
    }

    /// Each row: the state before, a command, the answer and the state
    /// after (cursor, replay window, DLQ offsets with their marks).
    #[test]
    fn rules() {
        let d = || "d".to_string();
        let dlq = |marks: &[(u64, bool)]| -> BTreeMap<u64, DlqEntry> {
            marks.iter().map(|(o, m)| (*o, entry(*m))).collect()
        };
        type Row = (
            &'static str,
            DestState,
            DeliveryCommand,
            (u64, u64),
            (u64, Option<(u64, u64)>, Vec<(u64, bool)>),
        );
        let at = |cursor, replay, marks: &[(u64, bool)]| DestState {
            cursor,
            replay,
            dlq: dlq(marks),
        };
        let rows: Vec<Row> = vec![
            (
                "advance never moves back",
                at(5, None, &[]),
                DeliveryCommand::Advance {
                    dest: d(),
                    next_offset: 3,
                },
                (5, 0),
                (5, None, vec![]),
            ),
            (
                "park writes and moves on",
                at(2, None, &[]),
                DeliveryCommand::Park {
                    dest: d(),
                    entries: vec![(2, entry(false))],
                    next_offset: Some(3),
                },
                (3, 1),
                (3, None, vec![(2, false)]),
            ),
            (
                "redrive marks the unmarked selected",
                at(9, None, &[(1, false), (2, true), (3, false)]),
                DeliveryCommand::Redrive {
                    dest: d(),
                    selection: RedriveSelection::Offsets(vec![1, 2]),
                },
                (9, 1),
                (9, None, vec![(1, true), (2, true), (3, false)]),
            ),
            (
                "resolve removes what exists, once",
                at(9, None, &[(1, true)]),
                DeliveryCommand::Resolve {
                    dest: d(),
                    offsets: vec![1, 1, 4],
                },
                (9, 1),
                (9, None, vec![]),
            ),
            (
                "replay is clamped to the cursor",
                at(4, None, &[]),
                DeliveryCommand::Replay {
                    dest: d(),
                    from: 1,
                    until: Some(10),
                },
                (4, 3),
                (4, Some((1, 4)), vec![]),
            ),
            (
                "an empty replay closes the window",
                at(4, Some((1, 4)), &[]),
                DeliveryCommand::Replay {
                    dest: d(),
                    from: 4,
                    until: None,
                },
                (4, 0),
                (4, None, vec![]),
            ),
            (
                "a stale replay advance is ignored",
                at(4, Some((2, 4)), &[]),
                DeliveryCommand::ReplayAdvance {
                    dest: d(),
                    expect: 1,
                    next: 3,
                },
                (0, 0),
                (4, Some((2, 4)), vec![]),
            ),
            (
                "a replay advance to the end closes the window",
                at(4, Some((2, 4)), &[]),
                DeliveryCommand::ReplayAdvance {
                    dest: d(),
                    expect: 2,
                    next: 9,
                },
                (0, 2),
                (4, None, vec![]),
            ),
        ];
        for (name, mut state, cmd, (cursor, touched), (c, replay, marks)) in rows {
            let answer = state.apply(&cmd);
            assert_eq!(
                answer,
                CommandResponse::Delivery { cursor, touched },
                "{name}"
            );
            assert_eq!(state.cursor, c, "{name}");
            assert_eq!(state.replay, replay, "{name}");
            let got: Vec<(u64, bool)> = state.dlq.iter().map(|(o, e)| (*o, e.redrive)).collect();
            assert_eq!(got, marks, "{name}");
        }
    }
}
