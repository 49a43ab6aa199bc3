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
//! ([`Journal::retain_now`](super::Journal::retain_now); a runtime asks for one at start,
//! and after asking devices that held a pass back for fresh snapshots). The pass reads the
//! index under its read lock in turns of 4,096 devices, and looks up the offsets it needs
//! (which may read run files) between turns, without the lock, so commits wait for a turn
//! at most. A device
//! bounded by its snapshot needs no lookup: the snapshot's position is in the index. With
//! `keep_events` > 0, or without a snapshot, one offset is looked up per device (measured in
//! `cargo bench -p drover --bench journal`: see the README).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};

use super::index::{Index, Located};
use super::record::FORMAT_VERSION;
use super::storage::{Deleted, StorageBackend};

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

/// What holds retention where it is: a device, or one of the journal's own bounds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pin {
    /// The device, for the device reasons; `None` for the journal's own bounds.
    pub device: Option<String>,
    /// A device's: `no-snapshot`, `snapshot` (its latest snapshot), `keep-events` (the
    /// [`Retention::keep_events`] events kept before it) or `pending-effects`. The journal's
    /// own: `index-checkpoint` (a pass never deletes past the index checkpoint on disk, less
    /// the 64 KiB before it that an open reads back to trust it: the next checkpoint moves
    /// it) or `keep-hours` (a segment written within [`Retention::keep_for`]).
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
    /// What held the last pass back (`None` before the first pass: a pass under
    /// `after-snapshot` always names something, if only the index checkpoint).
    pub pinned_by: Mutex<Option<Pin>>,
    /// Passes take turns.
    pub running: Mutex<()>,
}

impl RetentionState {
    pub fn pinned_by(&self) -> Option<Pin> {
        self.pinned_by.lock().clone()
    }
}

/// One device's bound as a turn copies it out of the index: its snapshot's position, and the
/// seq whose record it still needs, located (read outside the lock), and why.
struct Bound {
    device: Arc<str>,
    snapshot: Option<u64>,
    lookup: Option<(Located, &'static str)>,
    /// Whether a snapshot taken now would raise the bound (see [`laggards`]).
    refreshable: bool,
}

/// Devices bounded per turn of the index's read lock: the writer waits for the lock to
/// update the index after each commit, so a pass over a million devices takes it in short
/// turns rather than once for half a second.
const DEVICES_PER_TURN: usize = 4096;

/// Calls `visit` with each device's bound under `retention`: the lowest position it still
/// needs, and why. `Err` if an offset could not be read.
fn bounds(
    index: &RwLock<Index>,
    retention: &Retention,
    mut visit: impl FnMut(Pin, bool),
) -> Result<(), String> {
    let nums: Vec<u32> = index.read().devices.keys().copied().collect();
    // A command past its time to live is no longer owed, though it stays in the index until
    // a read of its outbox drops it: it pins nothing (an outbox nobody reads held every
    // later segment for good).
    let now_ms = crate::clock::now_ms();
    let mut turn_bounds = Vec::new();
    for turn in nums.chunks(DEVICES_PER_TURN) {
        let index = index.read();
        turn_bounds.clear();
        for d in turn.iter().filter_map(|num| index.devices.get(num)) {
            let snapshot = d
                .snapshots
                .iter()
                .rev()
                .find(|s| s.version == d.version)
                .copied();
            let (first, why) = match snapshot {
                Some(s) if retention.keep_events > 0 => (
                    (s.seq + 1).saturating_sub(retention.keep_events).max(1),
                    "keep-events",
                ),
                Some(s) => (s.seq + 1, "snapshot"),
                None => (1, "no-snapshot"),
            };
            let pending = d
                .timers
                .values()
                .map(|t| t.set().seq)
                .chain(
                    d.sent()
                        .into_iter()
                        .flat_map(|sent| sent.iter())
                        .filter(|(_, s)| s.owed_to().is_some())
                        .map(|(id, _)| id.seq),
                )
                .chain(
                    d.outbox()
                        .into_iter()
                        .flat_map(|o| o.iter())
                        .filter(|(_, c)| c.expires_ms.is_none_or(|e| e > now_ms))
                        .map(|(id, _)| id.seq),
                )
                .min();
            let (needed, why) = match pending {
                Some(p) if p < first => (p, "pending-effects"),
                _ => (first, why),
            };
            // A snapshot's record follows the event it was taken after and comes before the
            // next one (the actor writes it in between), so when the device needs nothing
            // before the event after its snapshot, the snapshot's own position bounds it: no
            // offset to look up.
            let after_snapshot = snapshot.is_some_and(|s| needed == s.seq + 1);
            let lookup = (needed <= d.seq && !after_snapshot)
                .then(|| index.locate(d.num, needed, needed))
                .flatten()
                .map(|l| (l, why));
            // A snapshot taken now is at the device's seq: it raises the bound if there are
            // events after the last one, if there is none, or (keeping no events before it)
            // by its own, newer position. Not if pending effects hold the bound.
            let refreshable = why != "pending-effects"
                && match snapshot {
                    None => d.seq > 0,
                    Some(s) => d.seq > s.seq || retention.keep_events == 0,
                };
            if snapshot.is_some() || lookup.is_some() {
                turn_bounds.push(Bound {
                    device: d.id.clone(),
                    snapshot: snapshot.map(|s| s.offset),
                    lookup,
                    refreshable,
                });
            }
        }
        drop(index);
        // Looked up without the lock (a lookup may read a run file).
        for b in turn_bounds.drain(..) {
            let mut pin = b.snapshot.map(|position| Pin {
                device: Some(b.device.to_string()),
                reason: "snapshot",
                position,
            });
            if let Some((located, reason)) = b.lookup {
                let offsets = located
                    .offsets()
                    .map_err(|e| format!("reading the index of device {}: {e}", b.device))?;
                let Some(&position) = offsets.first() else {
                    return Err(format!("no offset for a seq of device {}", b.device));
                };
                if pin.as_ref().is_none_or(|p| position < p.position) {
                    pin = Some(Pin {
                        device: Some(b.device.to_string()),
                        reason,
                        position,
                    });
                }
            }
            if let Some(pin) = pin {
                visit(pin, b.refreshable);
            }
        }
    }
    Ok(())
}

/// The lowest position the devices in `index` still need under `retention`, and what holds
/// it there; `None` if nothing does (every device is empty). `Err` if an offset could not
/// be read (the pass then deletes nothing).
pub(super) fn low_water(
    index: &RwLock<Index>,
    retention: &Retention,
) -> Result<Option<Pin>, String> {
    let mut low: Option<Pin> = None;
    bounds(index, retention, |pin, _| {
        if low.as_ref().is_none_or(|l| pin.position < l.position) {
            low = Some(pin);
        }
    })?;
    Ok(low)
}

/// Up to `max` devices, lowest first, that hold retention below `below` and that a fresh
/// snapshot would free (not those held by pending effects): see
/// [`Journal::retention_laggards`](super::Journal::retention_laggards).
pub(super) fn laggards(
    index: &RwLock<Index>,
    retention: &Retention,
    below: u64,
    max: usize,
) -> Result<Vec<Pin>, String> {
    // The `max` lowest, kept in a max-heap by position.
    let mut heap: std::collections::BinaryHeap<(u64, String, &'static str)> =
        std::collections::BinaryHeap::new();
    bounds(index, retention, |pin, refreshable| {
        let Some(device) = pin.device else {
            return;
        };
        if pin.position >= below || !refreshable || max == 0 {
            return;
        }
        if heap.len() < max {
            heap.push((pin.position, device, pin.reason));
        } else if heap.peek().is_some_and(|top| pin.position < top.0) {
            heap.pop();
            heap.push((pin.position, device, pin.reason));
        }
    })?;
    Ok(heap
        .into_sorted_vec()
        .into_iter()
        .map(|(position, device, reason)| Pin {
            device: Some(device),
            reason,
            position,
        })
        .collect())
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

/// The journal's retention, as `GET /v1/journal` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RetentionStatus {
    /// `keep-all` or `after-snapshot`.
    pub policy: &'static str,
    pub keep_events: u64,
    pub keep_for_secs: u64,
    /// The first position still stored.
    pub retained_from: u64,
    /// Segment files now.
    pub segments: usize,
    /// Since open.
    pub passes: u64,
    pub deleted_segments: u64,
    pub deleted_bytes: u64,
    /// What held the last pass back.
    pub pinned_by: Option<Pin>,
}

/// What a retention pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetentionPass {
    /// Segment files deleted, and the bytes they held.
    pub deleted_segments: usize,
    pub deleted_bytes: u64,
    /// The first position still stored after it.
    pub retained_from: u64,
    /// What holds the rest back.
    pub pinned_by: Option<Pin>,
}

/// One retention pass (see `journal/retention.rs`): deletes the segments that end before
/// both the lowest position a device still needs and the index checkpoint on disk. With
/// `unless_closing`, nothing once the journal is closing (a pass asked for from outside, which
/// a close waits for: see `Journal::close`).
pub(super) fn retain(
    shared: &super::writer::Shared,
    storage: &dyn StorageBackend,
    spill: &super::runs::Spill,
    unless_closing: bool,
) -> Result<RetentionPass, String> {
    let retention = &shared.retention;
    if retention.policy == RetentionPolicy::KeepAll {
        return Ok(RetentionPass {
            retained_from: storage.retained_from(),
            ..RetentionPass::default()
        });
    }
    let _turn = shared.retention_state.running.lock();
    if unless_closing && shared.closing.load(Ordering::Acquire) {
        return Ok(RetentionPass {
            retained_from: storage.retained_from(),
            ..RetentionPass::default()
        });
    }
    // The first segment holds the header that names the journal's format: before it can go,
    // the format is raised to the current one, and the deletion waits for an index
    // checkpoint taken at it (see `Checkpoints::identity_from`).
    match shared.raise_format(storage, FORMAT_VERSION) {
        Ok(true) => {}
        Ok(false) => {
            return Err(
                "a format-1 journal (no header) cannot be raised to the current format: \
                 export its devices and import them into a new data directory to use retention"
                    .into(),
            );
        }
        Err(e) => return Err(format!("raising the journal's format: {e}")),
    }
    // The checkpoint a restart opens from must stay usable: its identity check reads back
    // the bytes just before its position.
    let limit = spill.checkpoints.identity_from();
    let device = low_water(&shared.index, retention)?;
    // Again, right before deleting: a checkpoint discarded meanwhile (damage found while
    // the journal was still whole) lets nothing go.
    let limit = limit.min(spill.checkpoints.identity_from());
    // Whole segments go: the device is what holds them unless the checkpoint's bound lies in
    // an earlier segment than the device's.
    let mut pin = match device {
        Some(p) if storage.segment_start(p.position) <= storage.segment_start(limit) => p,
        _ => Pin {
            device: None,
            reason: "index-checkpoint",
            position: limit,
        },
    };
    let mark = pin.position.min(limit);
    // A device may need what is already gone (its `keep_events` raised since): it holds the
    // journal where it now begins; its lookup answered an offset before that (`runs::SHED`).
    pin.position = pin.position.max(storage.retained_from());
    let Deleted {
        files,
        bytes,
        kept_recent,
    } = storage
        .delete_before(mark, written_before(retention))
        .map_err(|e| format!("deleting segments: {e}"))?;
    if kept_recent {
        pin = Pin {
            device: None,
            reason: "keep-hours",
            position: storage.retained_from(),
        };
    }
    let pin = Some(pin);
    if files > 0 {
        tracing::info!(
            files,
            bytes,
            retained_from = storage.retained_from(),
            pinned_by = ?pin,
            "journal retention: segments deleted"
        );
    }
    record(&shared.retention_state, files, bytes, pin.clone());
    Ok(RetentionPass {
        deleted_segments: files,
        deleted_bytes: bytes,
        retained_from: storage.retained_from(),
        pinned_by: pin,
    })
}
