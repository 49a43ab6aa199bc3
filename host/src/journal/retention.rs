//! Retention: deleting the oldest segments once nothing still needs them.
//!
//! A fleet writes without end; a device needs only its latest snapshot and the events after
//! it to come back, so history before that can go, as whole segment files
//! (`journal/segments.rs`): nothing is rewritten.
//!
//! # What a segment must hold on to
//!
//! A pass finds the lowest position anything still needs (the low-water mark) and deletes
//! the segments that end at or before it. For each device bound to a plugin version:
//!
//! * its latest snapshot taken by that version, and the events after it: a device with no
//!   such snapshot keeps its whole history (`no-snapshot`);
//! * [`Retention::keep_events`] more events before that snapshot;
//! * the records of its pending effects (a timer's event, a message or a command is read
//!   from the record that made it: `pending-effects`).
//!
//! Plugin versions, provisioning, and every device's head are in the index checkpoint, which
//! a retained journal cannot open without: a pass deletes nothing past the last index
//! checkpoint written (less the bytes its identity check reads back), and an open of a
//! journal whose start was deleted refuses without a checkpoint it trusts, saying so. Older
//! snapshots, dead letters and events before the mark are gone: reads of them answer
//! [`JournalError::RetainedAway`](super::JournalError::RetainedAway) with the oldest seq
//! still there. [`Retention::keep_for`] keeps every segment written more recently than that.
//!
//! # When
//!
//! After each index checkpoint the index's thread writes, and on request
//! ([`Journal::retain_now`](super::Journal::retain_now)). The pass copies what it needs out
//! of the index under its read lock, then looks up the offsets (which may read run files)
//! without it, so commits do not wait for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};

use super::index::{Index, Located};

/// Which history a journal deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RetentionPolicy {
    /// Keep everything (the default): every seq of every device can be read and replayed.
    #[default]
    KeepAll,
    /// Delete segments once every device whose records they hold has a later snapshot
    /// (see the module docs for what else pins a segment).
    AfterSnapshot,
}

/// How much history a journal keeps (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    pub policy: RetentionPolicy,
    /// Events kept before each device's latest snapshot (0: none).
    pub keep_events: u64,
    /// Segments last written more recently than this are kept, whatever they hold.
    pub keep_for: Duration,
}

/// What holds the low-water mark where it is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pin {
    /// The device.
    pub device: String,
    /// `no-snapshot`, `snapshot` (its latest snapshot, or the events kept before it) or
    /// `pending-effects`.
    pub reason: &'static str,
    /// The position it holds.
    pub position: u64,
}

/// What retention did so far, and what holds it back.
#[derive(Debug, Default)]
pub struct RetentionState {
    /// Segments and bytes deleted since open.
    pub deleted_segments: AtomicU64,
    pub deleted_bytes: AtomicU64,
    /// Passes run since open.
    pub passes: AtomicU64,
    /// What held the last pass back (`None` before the first pass, or if nothing did).
    pub pinned_by: Mutex<Option<Pin>>,
    /// Passes take turns.
    pub running: Mutex<()>,
}

impl RetentionState {
    pub fn pinned_by(&self) -> Option<Pin> {
        self.pinned_by.lock().clone()
    }
}

/// One device's bound, as the pass copies it out of the index.
struct Bound {
    device: Arc<str>,
    /// Its snapshot's position, if that is its bound so far.
    snapshot: Option<u64>,
    /// The seq whose record it still needs, located (read outside the lock), and why.
    needed: Option<(Located, &'static str)>,
}

/// The lowest position the devices in `index` still need under `retention`, and what holds
/// it there; `None` if nothing does (every device is empty). `Err` if an offset could not
/// be read (the pass then deletes nothing).
pub(super) fn low_water(
    index: &RwLock<Index>,
    retention: &Retention,
) -> Result<Option<Pin>, String> {
    let bounds: Vec<Bound> = {
        let index = index.read();
        index
            .devices
            .values()
            .filter_map(|d| {
                let snapshot = d
                    .snapshots
                    .iter()
                    .rev()
                    .find(|s| s.version == d.version)
                    .copied();
                let (first, why) = match snapshot {
                    Some(s) => (
                        (s.seq + 1).saturating_sub(retention.keep_events).max(1),
                        "snapshot",
                    ),
                    None => (1, "no-snapshot"),
                };
                let pending = d.fx.as_deref().and_then(|fx| {
                    fx.timers
                        .values()
                        .map(|t| t.set.seq)
                        .chain(
                            fx.sent
                                .iter()
                                .filter(|(_, s)| s.owed_to().is_some())
                                .map(|(id, _)| id.seq),
                        )
                        .chain(fx.outbox.keys().map(|id| id.seq))
                        .min()
                });
                let (needed, why) = match pending {
                    Some(p) if p < first => (p, "pending-effects"),
                    _ => (first, why),
                };
                let located = (needed <= d.seq)
                    .then(|| index.locate(d.num, needed, needed))
                    .flatten()
                    .map(|l| (l, why));
                (located.is_some() || snapshot.is_some()).then(|| Bound {
                    device: d.id.clone(),
                    snapshot: snapshot.map(|s| s.offset),
                    needed: located,
                })
            })
            .collect()
    };
    let mut low: Option<Pin> = None;
    for b in bounds {
        let mut keep = |position: u64, reason: &'static str| {
            if low.as_ref().is_none_or(|l| position < l.position) {
                low = Some(Pin {
                    device: b.device.to_string(),
                    reason,
                    position,
                });
            }
        };
        if let Some(at) = b.snapshot {
            keep(at, "snapshot");
        }
        if let Some((located, why)) = b.needed {
            let offsets = located
                .offsets()
                .map_err(|e| format!("reading the index of device {}: {e}", b.device))?;
            let Some(&at) = offsets.first() else {
                return Err(format!("no offset for a seq of device {}", b.device));
            };
            keep(at, why);
        }
    }
    Ok(low)
}

/// The newest write time a segment may have to be deleted under `retention` (`None`: any).
pub(super) fn written_before(retention: &Retention) -> Option<SystemTime> {
    if retention.keep_for.is_zero() {
        return None;
    }
    Some(
        SystemTime::now()
            .checked_sub(retention.keep_for)
            .unwrap_or(SystemTime::UNIX_EPOCH),
    )
}

/// Counts a pass's deletions.
pub(super) fn record(state: &RetentionState, files: usize, bytes: u64, pin: Option<Pin>) {
    state.passes.fetch_add(1, Ordering::Relaxed);
    state
        .deleted_segments
        .fetch_add(files as u64, Ordering::Relaxed);
    state.deleted_bytes.fetch_add(bytes, Ordering::Relaxed);
    *state.pinned_by.lock() = pin;
}
