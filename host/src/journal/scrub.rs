//! The scrub: after an open from an index checkpoint, a background read of the records
//! before it, which that open skipped.
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

use super::index_checkpoint::Checkpoints;
use super::record::Record;
use super::recovery::Cursor;
use super::storage::StorageBackend;

/// Default of [`JournalOptions::scrub_rate`](super::JournalOptions::scrub_rate): 128 MiB/s,
/// a 100M-record journal (~12 GiB) in under two minutes, leaving the disk and the cores to
/// the fleet.
pub const SCRUB_RATE: u64 = 128 << 20;

/// What the scrub is to check: set by an open from a checkpoint.
#[derive(Debug, Clone)]
pub struct Plan {
    /// First record's offset (after the file header).
    pub start: u64,
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
    /// Damage at `offset`; the checkpoint was removed, so the next open refuses.
    Damaged {
        offset: u64,
        reason: String,
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
    let outcome = check(storage, &plan, rate, scrub);
    let state = match outcome {
        Ok(true) => {
            tracing::info!(
                bytes = plan.end - plan.start,
                secs = began.elapsed().as_secs_f64(),
                "journal scrub: every record before the index checkpoint is intact"
            );
            ScrubState::Clean
        }
        Ok(false) => ScrubState::Stopped,
        Err((offset, reason)) => {
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

/// Reads `plan.start..plan.end`; `Ok(false)` if stopped, `Err((offset, why))` on damage.
fn check(
    storage: &dyn StorageBackend,
    plan: &Plan,
    rate: u64,
    scrub: &Scrub,
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
        match record {
            Record::Commit { offset: at, .. } if at != offset => {
                return Err((offset, "commit marker out of place".into()));
            }
            Record::Device { num, .. } => {
                seqs.entry(num).or_insert(0);
            }
            Record::Event(e) => {
                let seq = seqs.entry(e.device).or_insert(0);
                if e.seq != *seq + 1 {
                    return Err((
                        offset,
                        format!(
                            "device {} expected seq {}, found {}",
                            e.device,
                            *seq + 1,
                            e.seq
                        ),
                    ));
                }
                *seq = e.seq;
            }
            Record::Lost {
                device, from, to, ..
            } => {
                let seq = seqs.entry(device).or_insert(0);
                if from != *seq + 1 || to < from {
                    return Err((offset, format!("device {device}: lost seqs out of order")));
                }
                *seq = to;
            }
            Record::Removed { device, .. } => {
                seqs.remove(&device);
            }
            _ => {}
        }
        offset += len;
        scrub.scanned.fetch_add(len, Ordering::Relaxed);
        // Paced every 4 MiB: sleep for whatever the rate has not used up.
        if rate > 0 && offset - plan.start - paced >= 4 << 20 {
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
        let found = seqs.remove(&num).unwrap_or(0);
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
    if let Some(num) = seqs.keys().next() {
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
