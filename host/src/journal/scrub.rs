//! The scrub: after an open from an index checkpoint, a background read of the records
//! before it, which that open skipped.
//!
//! Every start from a checkpoint reads the whole prefix again (damage can appear at rest in
//! bytes read intact before), but a pass cut short by a stop resumes where it got to: each
//! checkpoint carries how far the current pass has read, so frequent restarts still get the
//! whole journal read.
//!
//! An open that scans the whole journal finds media damage anywhere and refuses to start
//! (see `journal/recovery.rs`); an open from a checkpoint (`journal/index_checkpoint.rs`)
//! reads only what came after it, so that restart time does not grow with history. The
//! scrub closes that gap: a `drover-scrub` thread reads every record before the checkpoint
//! at a bounded rate ([`JournalOptions::scrub_rate`](super::JournalOptions::scrub_rate)),
//! checks each one's checksum and that every device's seqs follow one another, and compares
//! the seqs it counted with the checkpoint's.
//!
//! On damage (or a checkpoint that disagrees with the journal) it logs an error naming the
//! offset, shows it in `/metrics` and [`Journal::scrub`](super::Journal::scrub), and removes
//! the checkpoint, writing no other: the next open scans the whole journal and refuses with
//! the offset, the devices affected and the advice to `--salvage`, exactly as if the
//! damage had been found at open. Until then the server goes on: reads of a damaged record
//! fail on their own checksum, so nothing damaged is ever served as good.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::index::MAX_LOST_RUN;
use super::index_checkpoint::Checkpoints;
use super::record::Record;
use super::recovery::Cursor;
use super::storage::StorageBackend;

/// Default of [`JournalOptions::scrub_rate`](super::JournalOptions::scrub_rate): 128 MiB/s,
/// a 100M-record journal (~12 GiB) in under two minutes, leaving the disk and the cores to
/// the fleet.
pub const SCRUB_RATE: u64 = 128 << 20;

/// Bytes between two checks of the scrub's pace (a few KiB in tests, so that a slow scrub can
/// be stopped part way).
const PACE_EVERY: u64 = if cfg!(test) { 4 << 10 } else { 4 << 20 };

/// What the scrub is to check: set by an open from a checkpoint.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Where to start: the first record after the file header, or where the journal was
    /// last known intact up to.
    pub start: u64,
    /// Whether `start` is the first record: then every device's seqs are checked from 1.
    pub from_start: bool,
    /// Plugin versions and device numbers at `end`: a record naming a later one is damage.
    pub versions: u32,
    pub next_num: u32,
    /// The checkpoint's position: the scrub reads `start..end`.
    pub end: u64,
    /// Each device's seq at `end`, as the checkpoint says.
    pub seqs: Vec<(u32, u64)>,
}

/// Where the scrub is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScrubState {
    /// The open scanned the whole journal: nothing to scrub.
    NotNeeded,
    Running,
    /// Every record before the checkpoint read back intact.
    Clean,
    /// Damage at `offset`; the checkpoint was removed, so the next open refuses. `reason`
    /// begins with the file and its byte, as an open's damage report does.
    Damaged {
        offset: u64,
        reason: String,
    },
    /// A read failed for a reason other than the medium (say a timeout): nothing is known
    /// of the bytes there, so the checkpoint stays and the next open's scrub tries again.
    Failed {
        offset: u64,
        error: String,
    },
    /// Stopped by the journal's close before it finished.
    Stopped,
}

/// The scrub's progress, for `/metrics` and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubStatus {
    pub state: ScrubState,
    /// Bytes read so far.
    pub scanned: u64,
    /// Bytes to read in all.
    pub total: u64,
}

/// Shared between the scrub thread and the journal.
#[derive(Debug)]
pub struct Scrub {
    state: Mutex<ScrubState>,
    scanned: AtomicU64,
    total: u64,
    /// Set by the journal's close or drop.
    pub stop: AtomicBool,
}

impl Scrub {
    pub fn not_needed() -> Scrub {
        Scrub {
            state: Mutex::new(ScrubState::NotNeeded),
            scanned: AtomicU64::new(0),
            total: 0,
            stop: AtomicBool::new(false),
        }
    }

    pub fn running(plan: &Plan) -> Scrub {
        Scrub {
            state: Mutex::new(ScrubState::Running),
            scanned: AtomicU64::new(0),
            total: plan.end - plan.start,
            stop: AtomicBool::new(false),
        }
    }

    pub fn status(&self) -> ScrubStatus {
        ScrubStatus {
            state: self.state.lock().clone(),
            scanned: self.scanned.load(Ordering::Relaxed),
            total: self.total,
        }
    }
}

/// The scrub thread's body (see the module docs).
pub fn run(
    storage: &dyn StorageBackend,
    plan: Plan,
    rate: u64,
    scrub: &Scrub,
    checkpoints: &Checkpoints,
) {
    let began = Instant::now();
    let watched = Watched {
        inner: storage,
        failure: Mutex::new(None),
    };
    let outcome = check(&watched, &plan, rate, scrub, checkpoints);
    let failure = watched.failure.lock().take();
    let state = match outcome {
        Ok(true) => {
            // The pass is complete: the next start begins a new one.
            checkpoints.scrubbed.store(0, Ordering::Release);
            tracing::info!(
                bytes = plan.end - plan.start,
                secs = began.elapsed().as_secs_f64(),
                "journal scrub: every record before the index checkpoint is intact"
            );
            ScrubState::Clean
        }
        Ok(false) => ScrubState::Stopped,
        Err((offset, _)) if failure.is_some() && offset < storage.retained_from() => {
            // Retention deleted the rest of what it was to read: nothing left to check.
            checkpoints.scrubbed.store(0, Ordering::Release);
            tracing::info!(
                offset,
                "journal scrub: the records it had left were deleted by retention"
            );
            ScrubState::Clean
        }
        Err((offset, _)) if let Some(error) = failure => {
            tracing::warn!(offset, %error, "journal scrub: a read failed (not media damage); the next start scrubs again");
            ScrubState::Failed {
                offset,
                error: error.to_string(),
            }
        }
        Err((offset, reason)) if storage.retained_from() > 0 => {
            let reason = in_file(storage, offset, reason);
            // The journal opens only from its checkpoint (retention deleted its start): the
            // checkpoint stays, and the damage is reported here and in the metrics.
            tracing::error!(
                offset,
                %reason,
                "journal scrub: media damage before the index checkpoint; the checkpoint is \
                 kept, since retention deleted the journal's first segments and the journal \
                 opens only from it: restore the data directory from a backup"
            );
            ScrubState::Damaged { offset, reason }
        }
        Err((offset, reason)) => {
            let reason = in_file(storage, offset, reason);
            tracing::error!(
                offset,
                %reason,
                "journal scrub: media damage before the index checkpoint; the checkpoint is \
                 removed, so the next start scans the whole journal and refuses naming the \
                 damage (then start with --salvage to keep every intact record)"
            );
            checkpoints.discard();
            ScrubState::Damaged { offset, reason }
        }
    };
    *scrub.state.lock() = state;
}

/// `reason` for damage at `offset`, after the file that holds it and the byte in that file
/// (segments have their own numbering), as recovery's reports name them.
fn in_file(storage: &dyn StorageBackend, offset: u64, reason: String) -> String {
    match storage.file_of(offset) {
        Some((path, byte)) => format!(
            "{}: damaged record at byte {byte} (journal position {offset}): {reason}",
            path.display()
        ),
        None => reason,
    }
}

/// Reads `plan.start..plan.end`; `Ok(false)` if stopped, `Err((offset, why))` on damage.
/// Applies the checks of `Index::effect_of` that need no index: plugin versions and devices
/// that exist by the checkpoint, markers in place, and each device's seqs one after another
/// (from 1 when the scrub starts at the beginning; from the first one seen otherwise); at
/// the end, the seqs counted against the checkpoint's.
fn check(
    storage: &dyn StorageBackend,
    plan: &Plan,
    rate: u64,
    scrub: &Scrub,
    checkpoints: &Checkpoints,
) -> Result<bool, (u64, String)> {
    let mut cursor = Cursor::new(storage, plan.start, plan.end).heads_only();
    let mut seqs: HashMap<u32, u64> = HashMap::new();
    let mut offset = plan.start;
    let began = Instant::now();
    let mut paced = 0u64;
    while offset < plan.end {
        if scrub.stop.load(Ordering::Acquire) {
            return Ok(false);
        }
        let record = cursor.next().map_err(|(why, _)| (offset, why))?;
        let len = cursor.last_len();
        let known = |version: u32, device: u32| {
            if version >= plan.versions || device >= plan.next_num {
                Err((
                    offset,
                    format!("record of unknown device {device} or plugin version {version}"),
                ))
            } else {
                Ok(())
            }
        };
        let mut follow = |device: u32, from: u64, to: u64| {
            let before = if plan.from_start {
                0
            } else {
                from.saturating_sub(1)
            };
            let seq = seqs.entry(device).or_insert(before);
            if from != *seq + 1 || to < from || to - from >= MAX_LOST_RUN {
                return Err((
                    offset,
                    format!("device {device} expected seq {}, found {from}", *seq + 1),
                ));
            }
            *seq = to;
            Ok(())
        };
        let marker = matches!(record, Record::Commit { .. });
        match record {
            Record::Commit {
                offset: at,
                batch_start,
            } if at != offset || batch_start > offset => {
                return Err((offset, "commit marker out of place".into()));
            }
            Record::Version { id, .. } if id >= plan.versions => {
                return Err((offset, format!("unknown plugin version {id}")));
            }
            Record::Device { num, version, .. } => {
                known(version, num)?;
                if plan.from_start {
                    seqs.entry(num).or_insert(0);
                }
            }
            Record::Event(e) => {
                known(e.version, e.device)?;
                follow(e.device, e.seq, e.seq)?;
            }
            Record::Lost {
                device,
                from,
                to,
                version,
                ..
            } => {
                known(version, device)?;
                follow(device, from, to)?;
            }
            Record::Snapshot {
                device,
                seq,
                version,
                ..
            } => {
                known(version, device)?;
                if seqs.get(&device).is_some_and(|s| seq > *s) {
                    return Err((offset, format!("snapshot of device {device} past its seq")));
                }
            }
            Record::DeadLetter(d) => known(d.version, d.device)?,
            Record::Removed { device, .. } => {
                if device >= plan.next_num {
                    return Err((offset, format!("removal of unknown device {device}")));
                }
                seqs.remove(&device);
            }
            Record::Undeliverable { device, id, .. } | Record::CommandAck { device, id, .. } => {
                if device >= plan.next_num {
                    return Err((offset, format!("effect record of unknown device {device}")));
                }
                if seqs.get(&device).is_some_and(|s| id.seq > *s) {
                    return Err((
                        offset,
                        format!("effect record of device {device} past its seq"),
                    ));
                }
            }
            _ => {}
        }
        offset += len;
        scrub.scanned.fetch_add(len, Ordering::Relaxed);
        if marker {
            // Known intact up to here; kept at markers only, where a batch ends.
            checkpoints.scrubbed.fetch_max(offset, Ordering::AcqRel);
        }
        // Paced every few MiB: sleep for whatever the rate has not used up.
        if rate > 0 && offset - plan.start - paced >= PACE_EVERY {
            paced = offset - plan.start;
            let due = Duration::from_secs_f64(paced as f64 / rate as f64);
            if let Some(ahead) = due.checked_sub(began.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
    }
    if offset != plan.end {
        return Err((
            offset,
            "the last record runs past the index checkpoint".into(),
        ));
    }
    let counted = seqs.len();
    for &(num, seq) in &plan.seqs {
        let found = match seqs.remove(&num) {
            Some(found) => found,
            None if plan.from_start => 0,
            // Nothing of it in the part scrubbed now.
            None => continue,
        };
        if found != seq {
            return Err((
                plan.end,
                format!(
                    "the index checkpoint disagrees with the journal: device {num} has seq {found} \
                     before it in the journal, {seq} in the checkpoint"
                ),
            ));
        }
    }
    if plan.from_start
        && let Some(num) = seqs.keys().next()
    {
        return Err((
            plan.end,
            format!(
                "the index checkpoint disagrees with the journal: it lacks device {num} \
                 ({counted} devices in the journal, {} in the checkpoint)",
                plan.seqs.len()
            ),
        ));
    }
    Ok(true)
}

/// Starts the scrub thread, or returns `None` (logged) if it cannot start.
pub fn spawn(
    storage: Arc<dyn StorageBackend>,
    plan: Plan,
    rate: u64,
    scrub: Arc<Scrub>,
    spill: Arc<super::runs::Spill>,
) -> Option<std::thread::JoinHandle<()>> {
    let theirs = scrub.clone();
    match std::thread::Builder::new()
        .name("drover-scrub".into())
        .spawn(move || run(&*storage, plan, rate, &theirs, &spill.checkpoints))
    {
        Ok(handle) => Some(handle),
        Err(e) => {
            *scrub.state.lock() = ScrubState::Stopped;
            tracing::warn!(error = %e, "journal scrub: no thread; the records before the index checkpoint are not checked in this run");
            None
        }
    }
}

/// The storage as the scrub reads it: a failure that is not the medium's is remembered, so
/// that it is not reported as damage.
struct Watched<'a> {
    inner: &'a dyn StorageBackend,
    failure: Mutex<Option<std::io::Error>>,
}

impl StorageBackend for Watched<'_> {
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let read = self.inner.read_exact_at(buf, offset);
        if let Err(e) = &read
            && !super::storage::is_media_error(e)
        {
            *self.failure.lock() = Some(std::io::Error::new(e.kind(), e.to_string()));
        }
        read
    }

    fn write_all_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("the scrub never writes"))
    }

    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn set_len(&self, _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("the scrub never writes"))
    }
}
