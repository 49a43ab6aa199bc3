//! The journal: Drover's durable, append-only record of everything that happened.
//!
//! One range of positions, kept in segment files (`journal.log`, then
//! `journal.<position>.seg`), holds every record: plugin versions, device provisioning,
//! handled events with their transitions, snapshots, dead letters, removals, commit markers
//! and lost seqs (the format is in `host/DESIGN.md` and `journal/record.rs`). It is the single
//! source of truth; actors, snapshots and reads are all derived from it.
//!
//! # Layout
//!
//! * this file: the domain API ([`Journal`], [`DeviceWriter`]);
//! * [`storage`]: the byte-level seam ([`StorageBackend`]) and its file and faulty backends;
//! * [`segments`]: the production backend, the range kept as bounded segment files;
//! * `retention.rs` (private): retention passes: which segments may go, and deleting them;
//! * `record.rs` (private): the record format and the file header;
//! * `index.rs` (private): the in-memory index of durable records; `device_table.rs` holds
//!   its devices by number and id, `intern.rs` the cache that shares configs and timer keys
//!   among the devices that use the same ones;
//! * `writer.rs` (private): the group-commit thread and its commit markers;
//! * `recovery.rs` (private): the scan on open, torn tail versus media damage ([`Damaged`]),
//!   and [`salvage`];
//! * `checkpoint.rs` (private): what a clean close records, so a file cut short is noticed;
//! * `runs.rs` (private): the old offsets of the index, spilled to sorted files;
//! * `index_checkpoint.rs` (private): the index written out now and then, so that a restart
//!   scans only what came after it;
//! * `scrub.rs` (private): after such a restart, the background check of what it skipped.
//!
//! # Why a home-made log
//!
//! The workload is append-only with strictly ordered per-device sequences, read back by device
//! and by offset. A framed log with a CRC per record and a group-committing writer thread does
//! exactly that with one `write` + one `fdatasync` per batch and no write amplification; an
//! embedded B-tree or LSM store would add a second log (its WAL) and compaction behind the same
//! fsync. The README has the measurement.
//!
//! # Crash-safety rules
//!
//! * A record is acknowledged only after the `fdatasync` that covers it returned (see
//!   `journal/writer.rs` for the batch rules, the fence that keeps a device's seqs gap-free,
//!   and what happens when a commit fails).
//! * Every batch ends with a commit marker, so on open recovery knows exactly which bytes a
//!   crash could have torn: those of the last commit. A bad record there (torn, corrupt, or
//!   not fitting the records before it) ends the valid prefix; it and everything after it is
//!   **never applied**: those bytes are copied to `journal.log.dropped-<offset>`, the file is
//!   cut back and synced, and [`Recovery`] reports it. A bad record anywhere before is media
//!   damage: opening refuses with [`Damaged`] (offset, ranges, devices affected) unless
//!   salvaging (see `journal/recovery.rs`).
//! * A freshly created file is followed by an fsync of its directory, so the file itself
//!   survives a crash.

mod checkpoint;
mod device_table;
pub mod effects;
mod index;
mod index_checkpoint;
mod intern;
mod record;
mod recovery;
mod retention;
mod runs;
mod scrub;
pub mod segments;
pub mod storage;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use tokio::sync::Notify;

pub use effects::{
    DeviceFx, DueTimers, Effect, EffectId, Fx, MessageTurn, Origin, Sent, TimerEntry, TimerKey,
};
pub use index::{Cancelled, SnapshotRef, VersionInfo};
use index::{DeviceInfo, Index, IndexEffect};
pub use index_checkpoint::INDEX_CHECKPOINT_EVERY;
use record::Record;
pub use record::{DeadLetter, EventRecord, FORMAT_VERSION};
#[cfg(test)]
use recovery::MAX_TORN_BYTES;
pub use recovery::{Affected, Damaged, Salvaged, only_a_marker_after, proven_durable, salvage};
use recovery::{Cut, recover};
pub use retention::{Pin, Retention, RetentionPass, RetentionPolicy, RetentionStatus};
pub use scrub::{SCRUB_RATE, ScrubState, ScrubStatus};
pub use segments::{MIN_SEGMENT_BYTES, SEGMENT_BYTES, SegmentInfo, SegmentedBackend};
pub use storage::{Faults, FaultyBackend, FileBackend, StorageBackend};
use writer::Entry;
pub use writer::OnDurable;

/// File name of the journal inside the data directory.
pub const FILE_NAME: &str = "journal.log";

/// Why a journal operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// Writing or syncing a batch failed; nothing of the batch is durable. `kind` is the
    /// storage's own error kind: `StorageFull` is a full disk.
    #[error("journal commit failed: {message}")]
    Commit {
        kind: std::io::ErrorKind,
        message: String,
    },
    /// An earlier record of the same device failed to commit, so this one was not written
    /// either (it would have left a hole in the device's seqs). `kind` and `cause` are those
    /// of the journal's last failed commit, most likely that record's: a device whose
    /// activation after a restart on a full disk could not write its marker said only "an
    /// earlier record failed" to a read that had sent nothing, without naming the disk.
    #[error(
        "an earlier record of this device failed to commit ({cause}): one of its events', or the \
         marker an activation writes (a read activates a device too); nothing more of it is \
         written until it is rebuilt from the journal at its next message"
    )]
    Fenced {
        kind: std::io::ErrorKind,
        cause: String,
    },
    /// The journal could not be restored after a failed commit and refuses further appends.
    #[error("journal is read-only after an unrecoverable write failure")]
    ReadOnly,
    /// The journal was closed.
    #[error("journal is closed")]
    Closed,
    /// A record could not be read back.
    #[error("journal read failed at offset {offset}: {reason}")]
    Read { offset: u64, reason: String },
    /// A record exceeds the size limit.
    #[error("record of {0} bytes exceeds the journal's limit")]
    TooLarge(usize),
    /// The journal's file format cannot hold this record (a format-1 journal and a removal).
    #[error("{0}")]
    Format(String),
    /// The records asked for were deleted by retention (`journal/retention.rs`): this
    /// device's history is kept from seq `oldest` on (past its last seq if none is left).
    #[error("history before seq {oldest} was deleted by the journal's retention policy")]
    RetainedAway { oldest: u64 },
    /// A retention pass failed (nothing was deleted, or only some segments were).
    #[error("journal retention: {0}")]
    Retention(String),
}

impl JournalError {
    /// Whether the failure is the storage being full (it clears when space returns).
    pub fn is_storage_full(&self) -> bool {
        matches!(
            self,
            JournalError::Commit {
                kind: std::io::ErrorKind::StorageFull,
                ..
            } | JournalError::Fenced {
                kind: std::io::ErrorKind::StorageFull,
                ..
            }
        )
    }
}

/// A device that owes messages (see [`Journal::owed_messages`]): its id, its number, and the
/// messages (id, target).
pub type OwedMessages = (Arc<str>, u32, Vec<(EffectId, String)>);

/// Counters about what the journal wrote.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes made durable since open.
    pub bytes: AtomicU64,
    /// Records made durable since open.
    pub records: AtomicU64,
    /// fsyncs (group commits) since open.
    pub commits: AtomicU64,
    /// Failed commits since open.
    pub commit_failures: AtomicU64,
    /// When the group commit under way began, in microseconds since `origin`, plus one (0:
    /// none under way): how long a stalled disk has held the writer (see
    /// [`Journal::commit_under_way`]).
    commit_since_us: AtomicU64,
    /// The moment `commit_since_us` counts from: the first commit's.
    origin: std::sync::OnceLock<std::time::Instant>,
}

impl Stats {
    fn origin(&self) -> std::time::Instant {
        *self.origin.get_or_init(std::time::Instant::now)
    }

    /// Marks a group commit begun (`true`) or ended.
    pub(crate) fn commit_under_way(&self, begun: bool) {
        let since = if begun {
            self.origin().elapsed().as_micros() as u64 + 1
        } else {
            0
        };
        self.commit_since_us.store(since, Ordering::Release);
    }
}

/// What opening the journal found.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Valid records read.
    pub records: u64,
    /// Length of the valid prefix.
    pub valid_len: u64,
    /// Length of the prefix proven durable by a later commit marker (see
    /// `journal/recovery.rs`): a consistent cut even while a writer is appending, which is
    /// what an online backup copies. Equal to `valid_len` for files without markers.
    pub confirmed_len: u64,
    /// Whether the file ends with the marker of an empty batch (a clean close, an idle
    /// writer, or a recovery that cut a torn tail): nothing in it is tearable.
    pub closed_cleanly: bool,
    /// The file's format version (1: the header-less format of the first releases).
    pub format: u32,
    /// The torn tail of the last commit, cut because a crash could have left it so.
    pub dropped: Option<DroppedTail>,
    /// What salvage did before this open, if the journal was damaged and opened with
    /// [`JournalOptions::salvage`].
    pub salvaged: Option<Salvaged>,
    /// The position of the index checkpoint the open started from (it scanned only the
    /// records after it; the scrub reads those before: [`Journal::scrub`]); `None`: the
    /// open scanned the whole journal.
    pub from_checkpoint: Option<u64>,
}

/// A torn tail found on open: the part of the last commit a crash left behind.
#[derive(Debug, Clone)]
pub struct DroppedTail {
    /// Offset of the first bad record.
    pub offset: u64,
    /// Bytes cut from the file (saved next to it).
    pub bytes: u64,
    /// Why the record was rejected.
    pub reason: String,
    /// Whether it was torn (a cut-short write) rather than corrupt.
    pub torn: bool,
    /// Where the dropped bytes were saved (for a read-only open: the journal itself, which
    /// still holds them; `None` for storage without a file system path).
    pub saved_to: Option<PathBuf>,
}

/// Where the index keeps record offsets (see `journal/runs.rs`), for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexUsage {
    /// Offsets held in memory (8 bytes each), bounded by [`JournalOptions::index_spill_at`]
    /// plus what arrives while a spill is written.
    pub memory_offsets: u64,
    /// Run files on disk.
    pub runs: u64,
    /// Offsets held in run files.
    pub spilled_offsets: u64,
    /// Memory taken by the runs' directories (24 bytes per device per run).
    pub run_directory_bytes: u64,
}

/// How to open a journal.
#[derive(Debug, Clone)]
pub struct JournalOptions {
    /// Open a journal with media damage (see [`Damaged`]) by first rewriting it with every
    /// intact record ([`salvage`]); without it such a journal refuses to open. Only
    /// [`Journal::open`] (a journal on a file) can salvage.
    pub salvage: bool,
    /// How long the writer lets a batch grow once it is under load (see `journal/writer.rs`).
    pub commit_delay: Duration,
    /// How many record offsets the index keeps in memory before it spills them to a run
    /// file beside the journal (`journal.log.index/`; see `journal/runs.rs`): 8 bytes each.
    /// 0 keeps them all in memory (and writes no index checkpoints).
    pub index_spill_at: u64,
    /// Write an index checkpoint each time the journal has grown by this many bytes, and at
    /// a clean close, so that an open scans only what came after the last one
    /// (`journal/index_checkpoint.rs`). A journal smaller than this is never checkpointed:
    /// a full scan of it takes a fraction of a second and checks every record. 0: never.
    pub index_checkpoint_every: u64,
    /// After an open from an index checkpoint, read the records before it at most this fast
    /// (bytes per second; 0: unbounded) to find damage the open skipped (`journal/scrub.rs`).
    pub scrub_rate: u64,
    /// Start a new segment file once the last one holds this many bytes (see
    /// `journal/segments.rs`). A commit is never split, so a segment may pass it by one.
    pub segment_bytes: u64,
    /// Which history to delete, and when (`journal/retention.rs`; default: none). Needs
    /// index checkpoints.
    pub retention: Retention,
}

/// Default of [`JournalOptions::index_spill_at`]: 4Mi offsets, 32 MiB of memory, spilled in
/// a run of 32 MiB (written in well under a second).
pub const INDEX_SPILL_AT: u64 = 1 << 22;

/// Opens [`Journal::open_read_only`] makes when a live writer keeps changing the files under
/// it: each one that finds damage while the files changed starts again.
const READ_ONLY_TRIES: u32 = 8;

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            salvage: false,
            commit_delay: Duration::ZERO,
            index_spill_at: INDEX_SPILL_AT,
            index_checkpoint_every: INDEX_CHECKPOINT_EVERY,
            scrub_rate: SCRUB_RATE,
            segment_bytes: SEGMENT_BYTES,
            retention: Retention::default(),
        }
    }
}

/// What the journal knows of one device: enough to activate, replay or describe it, copied
/// out so no lock is held while a guest runs.
#[derive(Debug, Clone)]
pub struct DeviceHead {
    /// Dense, journal-local number that the device's records refer to.
    pub num: u32,
    pub id: Arc<str>,
    /// The plugin version (journal-local id, see [`VersionInfo::id`]) the device runs.
    pub version: u32,
    /// JSON configuration given at provisioning.
    pub config: Arc<[u8]>,
    /// Latest durable seq (0: none yet).
    pub seq: u64,
    pub created_at_ms: u64,
}

impl DeviceHead {
    fn of(d: &DeviceInfo) -> DeviceHead {
        DeviceHead {
            num: d.num,
            id: d.id.clone(),
            version: d.version,
            config: d.config.clone(),
            seq: d.seq(),
            created_at_ms: d.created_at_ms,
        }
    }
}

/// The journal handle. Cheap to clone; the writer stops when the last clone is dropped or
/// [`Journal::close`] is called.
///
/// The write side speaks the domain's terms ([`Journal::record_version`],
/// [`Journal::record_device`], and a [`DeviceWriter`] per actor for events and snapshots);
/// record encoding, the index and the writer thread are private. The read side
/// ([`Journal::device`], [`Journal::read_events`], [`Journal::snapshot_at`], ...) only ever
/// sees durable records, and works the same on a journal opened read-only beside a running
/// server ([`Journal::open_read_only`]).
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

struct Inner {
    storage: Arc<dyn StorageBackend>,
    shared: Arc<writer::Shared>,
    /// `None` for a read-only journal. A plain `Sender` (it is `Sync`): submitting is one
    /// channel push, with no lock in front of it.
    tx: Option<Sender<Entry>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// The thread that spills the index's offsets to runs (see [`spiller`]).
    spiller: Mutex<Option<JoinHandle<()>>>,
    /// After an open from an index checkpoint: the scrub and its thread.
    scrub: Arc<scrub::Scrub>,
    scrubber: Mutex<Option<JoinHandle<()>>>,
    next_device: AtomicU32,
    recovery: Recovery,
    /// Messages (sender, id) whose undeliverable record is on its way: the check that a
    /// message is still owed and its record are not one step, and a removal's sweep and a
    /// redelivery finding the target gone could both pass the check (two dead letters for
    /// one message, seen by a review). Whoever marks it here first records it.
    settling: parking_lot::Mutex<std::collections::HashSet<(u32, EffectId)>>,
}

/// A message's mark in `Inner::settling` while its undeliverable record is written, let go
/// when dropped: when the record is durable, fails, or its caller goes away.
struct SettlingMark<'a> {
    marks: &'a parking_lot::Mutex<std::collections::HashSet<(u32, EffectId)>>,
    key: (u32, EffectId),
}

impl<'a> SettlingMark<'a> {
    /// The mark, unless someone holds it already.
    fn take(
        marks: &'a parking_lot::Mutex<std::collections::HashSet<(u32, EffectId)>>,
        key: (u32, EffectId),
    ) -> Option<SettlingMark<'a>> {
        // Not `then_some`: it would build (and drop, unmarking) a mark for a refusal too.
        let marked = marks.lock().insert(key);
        marked.then(|| SettlingMark { marks, key })
    }
}

impl Drop for SettlingMark<'_> {
    fn drop(&mut self) {
        self.marks.lock().remove(&self.key);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        if let Some(tx) = &self.tx {
            // Wakes the writer so it sees the flag.
            let _ = tx.send(Entry::Barrier(Box::new(|_| {})));
        }
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
        // The writer dropped its wake-up sender on exit, which ends the spiller; dropped here
        // too in case the writer never got that far.
        self.shared.spiller.lock().take();
        if let Some(handle) = self.spiller.lock().take() {
            let _ = handle.join();
        }
        self.scrub.stop.store(true, Ordering::Release);
        if let Some(handle) = self.scrubber.lock().take() {
            let _ = handle.join();
        }
    }
}

/// The spiller thread: each time the writer wakes it (the index's tails have grown to the
/// spill size), moves the tails into a run file and merges runs as `journal/runs.rs`
/// describes. The index lock is held only to copy the tails out and to swap the result in,
/// never while writing a file. A failure (a full disk) leaves the offsets in memory, where
/// they are as good, and the next try waits for another spill's worth of offsets.
fn spiller(
    shared: &writer::Shared,
    storage: &dyn StorageBackend,
    spill: &runs::Spill,
    woken: &std::sync::mpsc::Receiver<()>,
) {
    while woken.recv().is_ok() {
        // A checkpoint due spills the tails first, whatever their size: the checkpoint then
        // holds O(devices) (the tails would be up to 32 MiB, copied under the index lock and
        // written again in every checkpoint), and the runs hold the offsets once.
        let checkpoint = shared.index.read().wants_checkpoint();
        spill_once(shared, storage, spill, checkpoint);
        let written = spill.checkpoints.write(
            &shared.index,
            storage,
            shared.format.load(Ordering::Acquire),
            false,
        );
        if written.is_some()
            && let Err(e) = retention::retain(shared, storage, spill, false)
        {
            tracing::warn!(error = %e, "journal retention: nothing deleted this time");
        }
        drop_retained_runs(shared, storage, spill, true);
    }
}

/// Drops the runs that point only into segments retention deleted, so that the index on
/// disk shrinks with the journal (see "Retention" in `journal/runs.rs`): on the index's
/// thread after each of its passes, and after a pass asked for elsewhere (`retain_now`),
/// which does not `wait` for a spill or merge under way (the index's thread drops them after
/// it). Files no checkpoint names go at once; when the checkpoint on disk names one, a new
/// checkpoint is written at once, which lets them go.
fn drop_retained_runs(
    shared: &writer::Shared,
    storage: &dyn StorageBackend,
    spill: &runs::Spill,
    wait: bool,
) {
    let retained_from = storage.retained_from();
    if retained_from == 0 || shared.closing.load(Ordering::Acquire) {
        return;
    }
    let _changing = if wait {
        spill.changing.lock()
    } else {
        match spill.changing.try_lock() {
            Some(guard) => guard,
            None => return,
        }
    };
    // Worked out on a copy, without the index lock (runs loaded from an index checkpoint
    // know only a bound on their offsets, and learn them from their files): the runs cannot
    // change meanwhile, `changing` is held.
    let runs = shared.index.read().runs.clone();
    if let Err(e) = runs.learn_max_offsets(retained_from) {
        tracing::warn!(error = %e, "journal index: reading a run file failed; it is kept");
    }
    let Some(kept) = runs.without_retained(retained_from) else {
        return;
    };
    let (before, after) = (runs.len(), kept.len());
    let pinned = runs.list()[..before - after]
        .iter()
        .any(|r| r.pinned.load(Ordering::Acquire));
    let replaced = std::mem::replace(&mut shared.index.write().runs, kept);
    // Their files are removed as the last reference goes: not under the index lock.
    drop((replaced, runs));
    if pinned {
        // The checkpoint on disk names them, which keeps their files: a new one, now, lets
        // them go without waiting for an interval of writes (a quiet server after a pass
        // that deleted most of the journal).
        spill.checkpoints.release_runs();
        spill.checkpoints.write(
            &shared.index,
            storage,
            shared.format.load(Ordering::Acquire),
            false,
        );
    }
    tracing::debug!(
        runs = before - after,
        retained_from,
        "journal index: dropped runs that point only into deleted segments"
    );
}

/// One spill and the merge it calls for, if the index wants one (or has any tails, if
/// `force`).
fn spill_once(
    shared: &writer::Shared,
    storage: &dyn StorageBackend,
    spill: &runs::Spill,
    force: bool,
) {
    let _changing = spill.changing.lock();
    {
        // A wake-up sent while the last spill ran may be stale.
        let plan = {
            let index = shared.index.read();
            let wanted = index.wants_spill() || (force && index.tail_entries > 0);
            if !wanted {
                return;
            }
            index.spill_plan()
        };
        let run = match spill.write(plan.devices()) {
            Ok(run) => run,
            Err(e) => {
                shared.index.write().spill_failed(&e);
                return;
            }
        };
        shared.index.write().spilled(plan, run);
        let (now, removed) = {
            let index = shared.index.read();
            (index.runs.clone(), index.removed.clone())
        };
        if let Some(merged) = spill.merge_tier(&now, &removed, storage.retained_from()) {
            shared.index.write().runs = merged;
        }
    }
}

impl Journal {
    /// Opens (or creates) the journal in `dir` (`journal.log` and the segments after it),
    /// recovering its index and cutting any torn or corrupt tail (see the module docs).
    pub fn open(dir: &Path, options: &JournalOptions) -> std::io::Result<Journal> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE_NAME);
        let salvaged = if options.salvage {
            salvage(&path).map_err(|e| {
                // Its new journal, cut short, is no use to anyone and holds the space a
                // retry needs.
                let partial = recovery::side_file(&path, "salvage");
                let _ = std::fs::remove_file(&partial);
                if e.kind() == std::io::ErrorKind::StorageFull {
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "salvage writes a new journal beside the damaged one, as large as \
                             its intact records, and the disk is full ({e}); nothing was \
                             changed: free as much space as the journal takes and start again"
                        ),
                    )
                } else {
                    e
                }
            })?
        } else {
            // What a salvage killed before it finished left: its new journal, never put in
            // place, which only holds the space (a salvage writes it afresh).
            let partial = recovery::side_file(&path, "salvage");
            let moving = recovery::side_file(&path, recovery::SALVAGE_MOVING);
            if moving.exists() {
                if !partial.exists() {
                    // Its new journal is in place, and segments it holds the records of may
                    // be left: reading on would count their records twice.
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "{}: a --salvage was interrupted after writing its new journal.log, \
                             which holds every intact record, before it moved the segment \
                             files after it aside. Start again with --salvage, which finishes \
                             it",
                            path.display()
                        ),
                    ));
                }
                // Killed before the rename: the old journal is whole. The mark goes
                // durably before the partial file does: a mark without it reads as a
                // salvage past its rename.
                std::fs::remove_file(&moving)?;
                segments::sync_dir(dir)?;
            }
            if partial.exists() {
                tracing::warn!(file = %partial.display(), "journal: removing the partial new journal a --salvage killed before it finished left");
                std::fs::remove_file(&partial)?;
            }
            None
        };
        let storage = SegmentedBackend::open(dir, options.segment_bytes, FORMAT_VERSION)?;
        Journal::start(Arc::new(storage), options, salvaged)
    }

    /// Opens a journal on any storage (a [`FaultyBackend`] in failure tests).
    pub fn open_on(
        storage: Arc<dyn StorageBackend>,
        options: &JournalOptions,
    ) -> std::io::Result<Journal> {
        Journal::start(storage, options, None)
    }

    fn start(
        storage: Arc<dyn StorageBackend>,
        options: &JournalOptions,
        salvaged: Option<Salvaged>,
    ) -> std::io::Result<Journal> {
        let spill = match storage.path() {
            Some(path) if options.index_spill_at > 0 => {
                let dir = recovery::side_file(path, "index");
                match runs::Spill::open(
                    &dir,
                    options.index_spill_at,
                    options.index_checkpoint_every,
                ) {
                    Ok(spill) => Some(Arc::new(spill)),
                    // The offsets stay in memory: the journal opens all the same.
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "journal index: cannot spill offsets to disk; keeping them all in memory");
                        None
                    }
                }
            }
            _ => None,
        };
        let (mut index, mut recovery) = recover(&*storage, Cut::Tail, spill.clone(), None)?;
        recovery.salvaged = salvaged;
        let scrub_plan = index.scrub.take();
        let durable_len = recovery.valid_len;
        let confirmed = recovery.closed_cleanly;
        // What recovery read may sit in the page cache only (after a kill -9): synced before
        // the writer starts, so its first batch's marker proves only durable bytes.
        storage.sync_data()?;
        let next_device = index.next_device_num();
        let shared = Arc::new(writer::Shared {
            index: RwLock::new(index),
            stats: Stats::default(),
            broken: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            format: AtomicU32::new(recovery.format),
            raising: Mutex::new(()),
            spiller: Mutex::new(None),
            retention: options.retention.clone(),
            retention_state: Default::default(),
            last_failure: Default::default(),
            failure_log: Default::default(),
        });
        let (tx, rx) = channel();
        // The spiller's wake-up sender is in place before the writer runs; the spiller starts
        // after it, so a writer that cannot start leaves no thread behind.
        let woken = spill.as_ref().map(|_| {
            let (wake, woken) = std::sync::mpsc::sync_channel(1);
            *shared.spiller.lock() = Some(wake);
            woken
        });
        let handle = {
            let shared = shared.clone();
            let storage = storage.clone();
            let delay = options.commit_delay;
            std::thread::Builder::new()
                .name("drover-journal".into())
                .spawn(move || writer::run(&*storage, durable_len, confirmed, delay, rx, shared))
        };
        let handle = match handle {
            Ok(handle) => handle,
            Err(e) => {
                shared.spiller.lock().take();
                return Err(e);
            }
        };
        let (scrub, scrubber) = match (scrub_plan, &spill) {
            (Some(plan), Some(spill)) => {
                let scrub = Arc::new(scrub::Scrub::running(&plan));
                let handle = scrub::spawn(
                    storage.clone(),
                    plan,
                    options.scrub_rate,
                    scrub.clone(),
                    spill.clone(),
                );
                (scrub, handle)
            }
            _ => (Arc::new(scrub::Scrub::not_needed()), None),
        };
        let spiller = match (spill, woken) {
            (Some(spill), Some(woken)) => {
                let theirs = shared.clone();
                let storage = storage.clone();
                match std::thread::Builder::new()
                    .name("drover-index".into())
                    .spawn(move || spiller(&theirs, &*storage, &spill, &woken))
                {
                    Ok(handle) => Some(handle),
                    // Without it the offsets stay in memory; the journal works all the same.
                    Err(e) => {
                        tracing::warn!(error = %e, "journal index: no spiller thread; offsets stay in memory");
                        shared.spiller.lock().take();
                        None
                    }
                }
            }
            _ => None,
        };
        Ok(Journal {
            inner: Arc::new(Inner {
                storage,
                shared,
                tx: Some(tx),
                writer: Mutex::new(Some(handle)),
                spiller: Mutex::new(spiller),
                scrub,
                scrubber: Mutex::new(scrubber),
                next_device: AtomicU32::new(next_device),
                settling: Default::default(),
                recovery,
            }),
        })
    }

    /// Opens the journal in `dir` for reading only: no writer, no lock needed, and a bad tail
    /// is reported but left on disk (the owner of the directory cuts it on its next open).
    /// For offline tools such as `drover replay`, which may run beside a live server.
    ///
    /// A live server goes on writing while the open lists and reads the segments. The
    /// records of how long the journal was (a clean close's checkpoint, the index
    /// checkpoint) are read before the listing: the server writes each only once the bytes it
    /// covers exist, so they never claim more than the listing holds, and the open sees the
    /// journal as it was listed. Retention may still delete a segment the open listed, or the
    /// bytes an index checkpoint read first is tied to: a refusal while the directory's files
    /// changed under the open is not believed, and the open starts again (up to
    /// [`READ_ONLY_TRIES`] times).
    pub fn open_read_only(dir: &Path) -> std::io::Result<Journal> {
        Self::open_read_only_with(dir, |_| {})
    }

    /// [`Journal::open_read_only`], calling `listed(attempt)` after each listing of the
    /// segments and before reading them: where a test makes a writer move meanwhile.
    pub(crate) fn open_read_only_with(
        dir: &Path,
        listed: impl FnMut(u32),
    ) -> std::io::Result<Journal> {
        Self::open_read_only_hooked(dir, |_| {}, listed)
    }

    /// [`Journal::open_read_only_with`], also calling `read_first(attempt)` after the
    /// checkpoints are read and before the segments are listed.
    pub(crate) fn open_read_only_hooked(
        dir: &Path,
        mut read_first: impl FnMut(u32),
        mut listed: impl FnMut(u32),
    ) -> std::io::Result<Journal> {
        let mut attempt = 0;
        let (storage, index, recovery) = loop {
            let first = recovery::ReadFirst::read(&dir.join(FILE_NAME));
            let watch = first.watch.clone();
            read_first(attempt);
            let storage = match SegmentedBackend::open_read_only(dir) {
                Ok(storage) => Arc::new(storage),
                // Segments that do not line up, or one gone before it could be opened, listed
                // while a writer created and (retention) deleted them: listed again before it
                // is believed.
                Err(e)
                    if attempt + 1 < READ_ONLY_TRIES
                        && (e.kind() == std::io::ErrorKind::InvalidData
                            || (e.kind() == std::io::ErrorKind::NotFound
                                && SegmentedBackend::list(dir).is_ok_and(|s| !s.is_empty()))) =>
                {
                    tracing::info!(error = %e, "journal: segments changed while listing them read-only (a live writer); listing again");
                    attempt += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            listed(attempt);
            match recover(&*storage, Cut::Never, None, Some(first)) {
                Ok((index, recovery)) => break (storage, index, recovery),
                // Damage, or a retained journal refused for looking cut short of its index
                // checkpoint, or whose checkpoint's bytes retention deleted once a newer one
                // was written: all `InvalidData`.
                Err(e)
                    if attempt + 1 < READ_ONLY_TRIES
                        && e.kind() == std::io::ErrorKind::InvalidData
                        && (storage.changed_since_listed() || watch.changed()) =>
                {
                    tracing::info!(error = %e, "journal: files changed while opening them read-only (a live writer); opening again");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };
        let shared = Arc::new(writer::Shared {
            index: RwLock::new(index),
            stats: Stats::default(),
            broken: AtomicBool::new(true),
            closing: AtomicBool::new(true),
            format: AtomicU32::new(recovery.format),
            raising: Mutex::new(()),
            spiller: Mutex::new(None),
            retention: Retention::default(),
            retention_state: Default::default(),
            last_failure: Default::default(),
            failure_log: Default::default(),
        });
        Ok(Journal {
            inner: Arc::new(Inner {
                storage,
                shared,
                tx: None,
                writer: Mutex::new(None),
                spiller: Mutex::new(None),
                scrub: Arc::new(scrub::Scrub::not_needed()),
                scrubber: Mutex::new(None),
                next_device: AtomicU32::new(u32::MAX),
                settling: Default::default(),
                recovery,
            }),
        })
    }

    /// What opening the journal found.
    pub fn recovery(&self) -> &Recovery {
        &self.inner.recovery
    }

    /// Where the scrub of the records an open from an index checkpoint skipped is (see
    /// `journal/scrub.rs`).
    pub fn scrub(&self) -> ScrubStatus {
        self.inner.scrub.status()
    }

    // ---- write side -------------------------------------------------------------------

    /// Records a new plugin version and waits until it is durable. `v.id` must be the next
    /// free version id (the registry allocates them, one registration at a time).
    pub async fn record_version(&self, v: &VersionInfo) -> Result<(), JournalError> {
        let record = Record::Version {
            id: v.id,
            plugin: v.plugin.clone(),
            number: v.number,
            digest: v.digest,
            at_ms: v.at_ms,
        };
        self.append(&record, IndexEffect::Version(v.clone())).await
    }

    /// Records a newly provisioned device bound to plugin version `version` and waits until
    /// it is durable. The caller makes sure `id` is not provisioned yet (one provisioning per
    /// id at a time).
    pub async fn record_device(
        &self,
        id: &str,
        version: u32,
        config: &[u8],
        at_ms: u64,
    ) -> Result<DeviceHead, JournalError> {
        let num = self.inner.next_device.fetch_add(1, Ordering::Relaxed);
        let record = Record::Device {
            num,
            id: id.to_string(),
            version,
            config: config.to_vec(),
            at_ms,
        };
        let info = DeviceInfo::new(
            num,
            Arc::from(id),
            version,
            intern::CONFIGS.intern(config),
            at_ms,
        );
        let head = DeviceHead::of(&info);
        self.append(&record, IndexEffect::Device(info)).await?;
        Ok(head)
    }

    /// Records that device `num` is removed, and waits until it is durable. Its records stay
    /// in the file; the index forgets it, and its id may be provisioned again as a new device
    /// (with a new number: numbers are never reused). The caller makes sure nothing else
    /// writes for the device meanwhile (its actor is stopped). Returns what the device still
    /// owed as the removal became durable, which is never done now.
    pub async fn record_removal(&self, num: u32, at_ms: u64) -> Result<Cancelled, JournalError> {
        self.require_format(3)?;
        let cancelled = Arc::new(std::sync::OnceLock::new());
        self.append(
            &Record::Removed { device: num, at_ms },
            IndexEffect::Removed {
                device: num,
                cancelled: Some(cancelled.clone()),
            },
        )
        .await?;
        Ok(cancelled.get().copied().unwrap_or_default())
    }

    /// Makes sure the file's header names at least `format` before a record that needs it is
    /// submitted (see `Shared::raise_format`); a header-less format-1 file cannot be raised.
    pub fn require_format(&self, format: u32) -> Result<(), JournalError> {
        let shared = &self.inner.shared;
        match shared.raise_format(&*self.inner.storage, format) {
            Ok(true) => Ok(()),
            Ok(false) => Err(JournalError::Format(format!(
                "this journal is in format {} (from the first releases, without a file \
                 header) and cannot hold this record: export its devices and import them into \
                 a new data directory",
                shared.format.load(Ordering::Acquire)
            ))),
            Err(e) => Err(JournalError::Commit {
                kind: e.kind(),
                message: format!("raising the journal's format to {format}: {e}"),
            }),
        }
    }

    /// The write lane of one device, for its actor: see [`DeviceWriter`].
    pub fn device_writer(&self, device: u32, max_in_flight: usize) -> DeviceWriter {
        DeviceWriter {
            journal: self.clone(),
            device,
            lane: Arc::new(Lane {
                max_in_flight: max_in_flight.max(1),
                ..Lane::default()
            }),
            generation: 1,
        }
    }

    /// Waits until everything submitted so far is durable.
    pub async fn barrier(&self) -> Result<(), JournalError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Entry::Barrier(Box::new(move |r| {
            let _ = tx.send(r);
        })));
        rx.await.unwrap_or(Err(JournalError::Closed))
    }

    /// Stops the writer after everything queued so far is durable. Later submissions fail with
    /// [`JournalError::Closed`].
    pub fn close(&self) {
        self.inner.shared.closing.store(true, Ordering::Release);
        self.inner.scrub.stop.store(true, Ordering::Release);
        let spill = self.index().spill.clone();
        if let Some(spill) = spill {
            spill.stopping.store(true, Ordering::Release);
        }
        // The scrub first: the checkpoint the writer writes as it stops records how far it
        // got.
        if let Some(handle) = self.inner.scrubber.lock().take() {
            let _ = handle.join();
        }
        if let Some(tx) = &self.inner.tx {
            let _ = tx.send(Entry::Barrier(Box::new(|_| {})));
        }
        if let Some(handle) = self.inner.writer.lock().take() {
            let _ = handle.join();
        }
        // The writer dropped the spiller's wake-up sender: it ends after its current spill
        // (a merge gives up). Joined so that a reopen in this process finds it gone.
        if let Some(handle) = self.inner.spiller.lock().take() {
            let _ = handle.join();
        }
        // A pass asked for elsewhere (`retain_now`) that is under way finishes before the
        // close returns, so what it deletes is done and logged before the caller says it
        // stopped; later ones do nothing (they check `closing` under this lock).
        drop(self.inner.shared.retention_state.running.lock());
    }

    /// Queues an entry for the writer. Never blocks; the entry's completion reports the
    /// outcome (immediately, with [`JournalError::Closed`], if the journal is closed).
    fn submit(&self, entry: Entry) {
        let entry = match &self.inner.tx {
            Some(tx) => match tx.send(entry) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => entry,
        };
        entry.fail(JournalError::Closed);
    }

    /// Appends one record and waits until it is durable.
    async fn append(&self, record: &Record, effect: IndexEffect) -> Result<(), JournalError> {
        let mut bytes = Vec::new();
        record.encode_into(&mut bytes);
        if bytes.len() > record::HEADER_LEN + record::MAX_BODY_LEN {
            return Err(JournalError::TooLarge(bytes.len()));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Entry::Append {
            bytes,
            effect,
            lane: None,
            done: Some(Box::new(move |r| {
                let _ = tx.send(r);
            })),
        });
        rx.await.unwrap_or(Err(JournalError::Closed))
    }

    // ---- read side (durable records only) ----------------------------------------------

    /// The device with this id, as of its latest durable record.
    pub fn device(&self, id: &str) -> Option<DeviceHead> {
        self.index().device(id).map(DeviceHead::of)
    }

    /// Ids of every provisioned device, sorted.
    pub fn device_ids(&self) -> Vec<Arc<str>> {
        let mut ids: Vec<Arc<str>> = self
            .index()
            .devices
            .values()
            .map(|d| d.id.clone())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// One page of [`Journal::device_ids`]: the first `limit` ids in order strictly after
    /// `after`, and whether more follow. Without sorting every id (the `limit + 1` smallest
    /// are kept in a bounded heap: O(n log limit) and no copy of the rest), so paging through
    /// a fleet of a million costs a scan per page, not a sort and a million copies per page.
    pub fn device_ids_page(&self, after: Option<&str>, limit: usize) -> (Vec<Arc<str>>, bool) {
        let index = self.index();
        let mut smallest: std::collections::BinaryHeap<&Arc<str>> =
            std::collections::BinaryHeap::with_capacity(limit.saturating_add(1).min(1 << 16));
        for d in index.devices.values() {
            if after.is_some_and(|a| &*d.id <= a) {
                continue;
            }
            if smallest.len() <= limit {
                smallest.push(&d.id);
            } else if smallest.peek().is_some_and(|largest| d.id < **largest) {
                smallest.pop();
                smallest.push(&d.id);
            }
        }
        let mut ids: Vec<Arc<str>> = smallest.into_sorted_vec().into_iter().cloned().collect();
        let more = ids.len() > limit;
        ids.truncate(limit);
        (ids, more)
    }

    /// Number of provisioned devices.
    pub fn device_count(&self) -> usize {
        self.index().devices.len()
    }

    /// Every plugin version recorded, in id order.
    pub fn versions(&self) -> Vec<VersionInfo> {
        self.index().versions.clone()
    }

    /// The events of device `num` with seqs in `from..=to` (clamped to what exists).
    pub fn read_events(
        &self,
        num: u32,
        from: u64,
        to: u64,
    ) -> Result<Vec<EventRecord>, JournalError> {
        let from = from.max(1);
        let (located, end) = {
            let index = self.index();
            let Some(located) = index.locate(num, from, to) else {
                return Ok(Vec::new());
            };
            (located, index.durable_len)
        };
        let offsets = located.offsets().map_err(|e| JournalError::Read {
            offset: 0,
            reason: format!("reading the index: {e}"),
        })?;
        if offsets.first().is_some_and(|at| *at < self.retained_from()) {
            return Err(JournalError::RetainedAway {
                oldest: self.oldest_retained_seq(num),
            });
        }
        let mut window = Window::default();
        (0..offsets.len())
            .zip(from..)
            .map(|(i, seq)| {
                match window
                    .record(self, &offsets[i..], end)
                    .map_err(|e| self.unreadable(e, || self.oldest_retained_seq(num)))?
                {
                    Record::Event(e) if e.device == num && e.seq == seq => Ok(e),
                    Record::Lost {
                        device,
                        version,
                        at_ms,
                        from,
                        to,
                        ..
                    } if device == num && (from..=to).contains(&seq) => Ok(EventRecord {
                        device,
                        seq,
                        at_ms,
                        version,
                        event: b"null".to_vec(),
                        transitions: Vec::new(),
                        lost: true,
                        fx: None,
                    }),
                    other => Err(self.index_damaged(
                        offsets[i],
                        format!("device {num} seq {seq}"),
                        &other,
                    )),
                }
            })
            .collect()
    }

    /// Removes the index checkpoint and writes no other, so that the next start scans and
    /// checks the whole journal. False where it is kept: a journal retention shortened opens
    /// only from it, so the next start cannot check or rebuild anything.
    fn discard_checkpoint(&self) -> bool {
        // Not while a retention pass may delete the journal's start (`try_lock`: an archive
        // that paused retention may be the reader that failed, on this very thread; the
        // pass re-checks the checkpoint right before it deletes).
        let _no_pass = self.inner.shared.retention_state.running.try_lock();
        if self.retained_from() > 0 {
            // Retention deleted the journal's start: it opens only from this checkpoint, so
            // it stays (the next start cannot check the whole journal anyway).
            tracing::error!(
                retained_from = self.retained_from(),
                "journal: the index checkpoint is kept although a read failed, since the \
                 journal opens only from it (retention deleted its first segments)"
            );
            return false;
        }
        // The index guard is dropped first: `discard` takes the checkpoint lock, which a
        // checkpoint being written holds while it takes the index lock.
        let spill = self.index().spill.clone();
        if let Some(spill) = spill {
            spill.checkpoints.discard();
        }
        true
    }

    /// A record the index pointed at could not be read back: media damage in the journal, or
    /// a damaged index (a run file's offset into the middle of a record). Logged; the index
    /// checkpoint is removed, so that the next start scans and checks the whole journal: it
    /// refuses naming journal damage (then `--salvage`), or rebuilds a damaged index.
    fn unreadable(&self, e: JournalError, oldest: impl FnOnce() -> u64) -> JournalError {
        let JournalError::Read { offset, reason } = e else {
            return e;
        };
        if offset < self.retained_from() {
            // Deleted by a retention pass between the index lookup and the read: what went
            // is answered as such, and is no sign of damage.
            return JournalError::RetainedAway { oldest: oldest() };
        }
        tracing::error!(
            offset,
            %reason,
            "journal: a record could not be read back (media damage, or a damaged index)"
        );
        // A retained journal's next start opens from the same checkpoint and reads the same
        // record: promising it a check that it cannot make sent operators round in circles.
        let next = if self.is_read_only() && self.retained_from() == 0 {
            // An offline tool writes nothing, the checkpoint included: the server's next
            // start opens from it as before and does not see this (a review: it was told it
            // would).
            "this read-only open changes nothing: the server's next start opens from its \
             index checkpoint as before, and finds the damage only when it reads this record \
             or its scrub reaches it; to check the whole journal now, start it once with \
             --index-checkpoint-bytes 0"
        } else if self.discard_checkpoint() {
            "the next start checks the whole journal, and refuses naming the damage or \
             rebuilds the index"
        } else {
            "retention deleted the journal's first segments, so a restart opens from the same \
             index checkpoint and cannot check or rebuild anything: restore the data directory \
             from a backup"
        };
        JournalError::Read {
            offset,
            reason: format!("{reason} (media damage, or a damaged index: {next})"),
        }
    }

    /// A read found another record than the index said: the index (a run file, or the
    /// checkpoint it came from) is damaged, since records are checksummed. Logged; the
    /// index checkpoint is removed so that the next start rebuilds the index from the
    /// journal.
    fn index_damaged(&self, offset: u64, wanted: String, found: &Record) -> JournalError {
        let found = match found {
            Record::Event(e) => format!("device {} seq {}", e.device, e.seq),
            Record::Lost {
                device, from, to, ..
            } => format!("device {device} seqs {from}-{to} (lost)"),
            Record::Snapshot { device, seq, .. } => {
                format!("a snapshot of device {device} at seq {seq}")
            }
            Record::DeadLetter(d) => format!("a dead letter of device {}", d.device),
            Record::Version { .. } => "a plugin version".to_string(),
            Record::Device { num, .. } => format!("the provisioning of device {num}"),
            Record::Removed { device, .. } => format!("the removal of device {device}"),
            Record::Commit { .. } => "a commit marker".to_string(),
            Record::Undeliverable { device, id, .. } => format!(
                "an undeliverable message of device {device} ({}.{})",
                id.seq, id.index
            ),
            Record::CommandAck { device, .. } => {
                format!("a command acknowledgement of device {device}")
            }
        };
        // A read-only open (`drover replay`, an export) has no checkpoint of its own to remove:
        // it must not say it removed the server's.
        if self.index().spill.is_some() {
            tracing::error!(
                offset,
                %wanted,
                %found,
                "journal: the index points at the wrong record; its checkpoint is removed so the next start rebuilds it from the journal"
            );
        } else {
            tracing::error!(
                offset,
                %wanted,
                %found,
                "journal: the index points at the wrong record (read-only: its checkpoint is left; a server started on the directory trusts it until it reads this record, then removes it)"
            );
        }
        let next = if self.discard_checkpoint() {
            "restart the server to rebuild the index from the journal"
        } else {
            "retention deleted the journal's first segments, so a restart opens from the same \
             index checkpoint and cannot rebuild it: restore the data directory from a backup"
        };
        JournalError::Read {
            offset,
            reason: format!(
                "the index is damaged: it gave this offset for {wanted}, which holds {found} \
                 ({next})"
            ),
        }
    }

    /// The newest snapshot of device `num` taken by plugin version `version` at or before
    /// `seq`.
    pub fn snapshot_at(&self, num: u32, seq: u64, version: u32) -> Option<SnapshotRef> {
        let from = self.retained_from();
        self.index()
            .devices
            .get(&num)
            .and_then(|d| d.snapshot_at(seq, version))
            .filter(|s| s.offset >= from)
    }

    /// Every snapshot of device `num` still stored, oldest first.
    pub fn snapshots(&self, num: u32) -> Vec<SnapshotRef> {
        let from = self.retained_from();
        self.index()
            .devices
            .get(&num)
            .map(|d| {
                d.snapshots
                    .iter()
                    .filter(|s| s.offset >= from)
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The first position still stored: 0 unless retention deleted old segments.
    pub fn retained_from(&self) -> u64 {
        self.inner.storage.retained_from()
    }

    /// Runs a retention pass now (one also follows every index checkpoint the index's
    /// thread writes); see `journal/retention.rs`.
    pub fn retain_now(&self) -> Result<RetentionPass, JournalError> {
        let spill = self.index().spill.clone();
        match spill {
            Some(spill) if !self.inner.shared.broken.load(Ordering::Acquire) => {
                let pass =
                    retention::retain(&self.inner.shared, &*self.inner.storage, &spill, true)
                        .map_err(JournalError::Retention)?;
                // Also when this pass deleted nothing: an earlier one may have, before runs
                // loaded from an index checkpoint learned how far their offsets go.
                drop_retained_runs(&self.inner.shared, &*self.inner.storage, &spill, false);
                Ok(pass)
            }
            _ => Ok(RetentionPass {
                retained_from: self.retained_from(),
                ..RetentionPass::default()
            }),
        }
    }

    /// Up to `max` devices, lowest first, whose bound holds retention back from what the
    /// index checkpoint would let it delete, and that a snapshot taken now would free: those
    /// idle since an old snapshot (or with events after it) and those without one. Not those
    /// held by pending effects. The runtime asks them for a snapshot (see
    /// `Runtime::refresh_retention`); empty under `keep-all`.
    pub fn retention_laggards(&self, max: usize) -> Result<Vec<Pin>, JournalError> {
        let shared = &self.inner.shared;
        if shared.retention.policy == RetentionPolicy::KeepAll {
            return Ok(Vec::new());
        }
        let Some(spill) = self.index().spill.clone() else {
            return Ok(Vec::new());
        };
        let below = spill.checkpoints.identity_from();
        if below <= self.retained_from() {
            return Ok(Vec::new());
        }
        retention::laggards(&shared.index, &shared.retention, below, max)
            .map_err(JournalError::Retention)
    }

    /// Holds retention passes off until the guard drops (a pass under way finishes first):
    /// for a reader that must see a device's kept history whole, such as an archive.
    pub fn pause_retention(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.inner.shared.retention_state.running.lock()
    }

    /// The retention policy, what it deleted since open and what holds it back.
    pub fn retention(&self) -> RetentionStatus {
        let shared = &self.inner.shared;
        let state = &shared.retention_state;
        RetentionStatus {
            policy: match shared.retention.policy {
                RetentionPolicy::KeepAll => "keep-all",
                RetentionPolicy::AfterSnapshot => "after-snapshot",
            },
            keep_events: shared.retention.keep_events,
            keep_for_secs: shared.retention.keep_for.as_secs(),
            retained_from: self.retained_from(),
            segments: self.inner.storage.segment_count(),
            passes: state.passes.load(Ordering::Relaxed),
            deleted_segments: state.deleted_segments.load(Ordering::Relaxed),
            deleted_bytes: state.deleted_bytes.load(Ordering::Relaxed),
            pinned_by: state.pinned_by(),
        }
    }

    /// The oldest seq of device `num` whose record is still stored (its seq + 1 if none
    /// is; 1 if nothing was ever deleted).
    pub fn oldest_retained_seq(&self, num: u32) -> u64 {
        let from = self.retained_from();
        let seq = self.index().devices.get(&num).map_or(0, |d| d.seq);
        if from == 0 {
            return 1;
        }
        // Offsets grow with seqs: the first seq whose record is at or after `from`.
        let (mut lo, mut hi) = (1u64, seq + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let located = self.index().locate(num, mid, mid);
            let at = located
                .and_then(|l| l.offsets().ok())
                .and_then(|o| o.first().copied());
            match at {
                Some(at) if at >= from => hi = mid,
                _ => lo = mid + 1,
            }
        }
        lo
    }

    /// The guest's snapshot bytes behind `at`.
    pub fn read_snapshot(&self, at: SnapshotRef) -> Result<Vec<u8>, JournalError> {
        match self
            .read_at(at.offset)
            .map_err(|e| self.unreadable(e, || at.seq + 1))?
        {
            Record::Snapshot {
                data, seq, version, ..
            } if seq == at.seq && version == at.version => Ok(data),
            other => Err(self.index_damaged(
                at.offset,
                format!("the snapshot at seq {} (version {})", at.seq, at.version),
                &other,
            )),
        }
    }

    /// How many of device `num`'s most recent dead letters (those [`Journal::dead_letters`]
    /// would list) retention deleted with their segments: a dead letter pins nothing, so
    /// reads say what went rather than leave it out silently.
    pub fn dead_letters_retained_away(&self, num: u32) -> usize {
        let from = self.retained_from();
        self.index().devices.get(&num).map_or(0, |d| {
            d.dead_letters().iter().filter(|o| **o < from).count()
        })
    }

    /// The most recent dead letters of device `num` (at most 100), in the order of the
    /// device's history (`after_seq`; a message found undeliverable after a later one was is
    /// listed before it): events its plugin failed on, and messages it sent that could not be
    /// delivered (code `undeliverable`, `after_seq` the seq of the record that sent it,
    /// `event` the message).
    pub fn dead_letters(&self, num: u32) -> Result<Vec<DeadLetter>, JournalError> {
        let from = self.retained_from();
        let offsets: Vec<u64> = self
            .index()
            .devices
            .get(&num)
            .map(|d| {
                d.dead_letters()
                    .iter()
                    .copied()
                    .filter(|o| *o >= from)
                    .collect()
            })
            .unwrap_or_default();
        offsets
            .into_iter()
            .map(|offset| {
                match self
                    .read_at(offset)
                    .map_err(|e| self.unreadable(e, || self.oldest_retained_seq(num)))?
                {
                    Record::DeadLetter(d) if d.device == num => Ok(d),
                    Record::Undeliverable {
                        device,
                        id,
                        at_ms,
                        to,
                        reason,
                    } if device == num => {
                        let sent = match self.read_events(num, id.seq, id.seq) {
                            Ok(mut sent) => sent.pop(),
                            Err(JournalError::RetainedAway { .. }) => None,
                            Err(e) => return Err(e),
                        };
                        let (version, event) = match sent.as_ref().and_then(|e| {
                            let effect = e.fx.as_ref()?.effects.get(id.index as usize)?;
                            Some((e.version, effect))
                        }) {
                            Some((version, Effect::Send { event, .. })) => {
                                (version, event.clone().into_bytes())
                            }
                            _ => (0, b"null".to_vec()),
                        };
                        Ok(DeadLetter {
                            device,
                            after_seq: id.seq,
                            at_ms,
                            version,
                            event,
                            code: "undeliverable".into(),
                            message: format!("message {}.{} to `{to}`: {reason}", id.seq, id.index),
                        })
                    }
                    other => Err(self.index_damaged(
                        offset,
                        format!("a dead letter of device {num}"),
                        &other,
                    )),
                }
            })
            // One deleted by a retention pass since the offsets were copied: gone.
            .filter(|r| !matches!(r, Err(JournalError::RetainedAway { .. })))
            .collect::<Result<Vec<DeadLetter>, JournalError>>()
            .map(|mut letters| {
                letters.sort_by_key(|d| d.after_seq);
                letters
            })
    }

    /// What device `num` still owes: pending timers, undelivered messages, unacknowledged
    /// commands (durable records only).
    pub fn device_fx(&self, num: u32) -> Option<DeviceFx> {
        self.index().devices.get(&num).and_then(|d| d.fx())
    }

    /// Whether message `id` of device `num` is still owed to device `to` (sent to it,
    /// durable, and neither handled nor found undeliverable).
    pub fn message_owed(&self, num: u32, id: EffectId, to: &str) -> bool {
        self.index()
            .devices
            .get(&num)
            .and_then(|d| d.sent()?.get(&id))
            .is_some_and(|sent| sent.owed_to() == Some(to))
    }

    /// Where message `id` of device `num` stands for its target `to`: owed and next in
    /// the sender's order, owed behind an earlier message to `to` that is still owed (and
    /// for which `in_flight` says no: the target has not handled it yet), or not owed.
    pub fn message_turn(
        &self,
        num: u32,
        id: EffectId,
        to: &str,
        in_flight: impl Fn(EffectId) -> bool,
    ) -> MessageTurn {
        self.index()
            .devices
            .get(&num)
            .and_then(|d| d.sent())
            .map_or(MessageTurn::NotOwed, |sent| {
                DeviceFx::turn_in(sent, id, to, in_flight)
            })
    }

    /// Device `num`'s outbox: its commands not yet acknowledged, oldest first. Commands whose
    /// time to live ended by `now_ms` are dropped from the index here (expiry needs no
    /// record: a rebuild from the journal drops them again at their first read).
    pub fn outbox(&self, num: u32, now_ms: u64) -> Vec<(EffectId, effects::CommandEntry)> {
        let expired = self
            .index()
            .devices
            .get(&num)
            .and_then(|d| d.outbox())
            .is_some_and(|outbox| {
                outbox
                    .values()
                    .any(|c| c.expires_ms.is_some_and(|e| e <= now_ms))
            });
        if expired {
            let mut index = self.inner.shared.index.write();
            if let Some(d) = index.devices.get_mut(&num) {
                d.with_fx(|fx| fx.expire(now_ms));
            }
        }
        self.index()
            .devices
            .get(&num)
            .and_then(|d| d.outbox())
            .map(|outbox| outbox.iter().map(|(id, c)| (*id, *c)).collect())
            .unwrap_or_default()
    }

    /// How many commands of device `num` wait unacknowledged (expired ones included until
    /// the next read of its outbox drops them).
    pub fn outbox_len(&self, num: u32) -> usize {
        self.index()
            .devices
            .get(&num)
            .and_then(|d| d.outbox())
            .map_or(0, |outbox| outbox.len())
    }

    /// Every message still owed to any of `targets`: (sender's id and number, the message's
    /// id, its target), in (sender number, id) order. Scans every device of the index: for
    /// redeliveries after failures, gathered (see `crate::dispatch`), not for each message.
    pub fn owed_to_any(
        &self,
        targets: &std::collections::HashSet<Arc<str>>,
    ) -> Vec<(Arc<str>, u32, EffectId, Arc<str>)> {
        let index = self.index();
        let mut out: Vec<(Arc<str>, u32, EffectId, Arc<str>)> = index
            .devices
            .values()
            .filter_map(|d| Some((d, d.sent()?)))
            .flat_map(|(d, sent)| {
                sent.iter().filter_map(|(id, sent)| {
                    let to = targets.get(sent.owed_to()?)?;
                    Some((d.id.clone(), d.num, *id, to.clone()))
                })
            })
            .collect();
        out.sort_by_key(|(_, num, id, _)| (*num, *id));
        out
    }

    /// How many messages device `num` sent that their targets have not handled yet (nor
    /// found undeliverable).
    pub fn sent_len(&self, num: u32) -> usize {
        self.index()
            .devices
            .get(&num)
            .and_then(|d| d.sent())
            .map_or(0, |sent| {
                sent.values().filter(|s| s.owed_to().is_some()).count()
            })
    }

    /// The target owed the most of the messages device `num` sent that their targets have not
    /// handled yet, with how many it is owed (ties: the least id). Walks the device's owed
    /// messages: for a refusal that names the target, not for each event.
    pub fn most_owed_target(&self, num: u32) -> Option<(Arc<str>, usize)> {
        let index = self.index();
        let sent = index.devices.get(&num)?.sent()?;
        let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
        for to in sent.values().filter_map(|s| s.owed_to()) {
            *counts.entry(to).or_default() += 1;
        }
        let (to, n) = counts
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))?;
        Some((Arc::from(to), n))
    }

    /// Device `num`'s pending timer `key`, as durable.
    pub fn timer(&self, num: u32, key: &str) -> Option<TimerEntry> {
        self.index()
            .devices
            .get(&num)
            .and_then(|d| d.timers.get(key).copied())
    }

    /// For each device of `nums`, its pending timers due by `now_ms`, with the device's id
    /// and when the earliest of its other timers is due: what the timer wheel needs when the
    /// devices' entries fall due. Devices that no longer exist are left out. One turn of the
    /// index lock for the whole batch: the wheel hands out a burst of thousands of devices,
    /// and a turn each would contend with the writer thread's updates thousands of times.
    pub fn due_timers(&self, nums: &[u32], now_ms: u64) -> Vec<(u32, DueTimers)> {
        let index = self.index();
        nums.iter()
            .filter_map(|&num| {
                let d = index.devices.get(&num)?;
                Some((num, Self::due_of(d, now_ms)))
            })
            .collect()
    }

    fn due_of(d: &index::DeviceInfo, now_ms: u64) -> DueTimers {
        let mut due = Vec::new();
        let mut next_ms: Option<u64> = None;
        for (key, t) in d.timers.iter() {
            if t.due_ms <= now_ms {
                due.push((key.clone(), *t));
            } else {
                next_ms = Some(next_ms.map_or(t.due_ms, |n| n.min(t.due_ms)));
            }
        }
        DueTimers {
            device: d.id.clone(),
            due,
            next_ms,
        }
    }

    /// The origin and effects of device `num`'s record `seq` (`None`: an external event
    /// without effects, or no such record): where a timer's event is read when it fires
    /// (the index keeps timers without their events, see [`Fx::timer_event`]).
    pub fn record_fx(&self, num: u32, seq: u64) -> Result<Option<Fx>, JournalError> {
        Ok(self.read_events(num, seq, seq)?.pop().and_then(|r| r.fx))
    }

    /// Each device with pending timers, with when its earliest is due: what a start arms the
    /// timer wheel with (16 bytes per device, not a copy of every timer).
    pub fn timer_schedule(&self) -> Vec<(u32, u64)> {
        self.index()
            .devices
            .values()
            .filter_map(|d| {
                let earliest = d.timers.values().map(|t| t.due_ms).min()?;
                Some((d.num, earliest))
            })
            .collect()
    }

    /// Each device that owes messages, with them (id and target), in (device id, message
    /// id) order: what a start sends again.
    pub fn owed_messages(&self) -> Vec<OwedMessages> {
        let mut out: Vec<OwedMessages> = self
            .index()
            .devices
            .values()
            .filter_map(|d| {
                let owed: Vec<(EffectId, String)> = d
                    .sent()?
                    .iter()
                    .filter_map(|(id, s)| Some((*id, s.owed_to()?.to_string())))
                    .collect();
                (!owed.is_empty()).then(|| (d.id.clone(), d.num, owed))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Every device that owes something, with what it owes.
    pub fn pending_fx(&self) -> Vec<(Arc<str>, u32, DeviceFx)> {
        self.index()
            .devices
            .values()
            .filter_map(|d| Some((d.id.clone(), d.num, d.fx()?)))
            .collect()
    }

    /// Records that message `id` of device `num` could not be delivered to `to`, and waits
    /// until it is durable: it stops being owed and is listed with the dead letters. `false`
    /// when there was nothing to record: the message is no longer owed (settled already, or
    /// its sender removed).
    pub async fn record_undeliverable(
        &self,
        num: u32,
        id: EffectId,
        to: &str,
        reason: &str,
        at_ms: u64,
    ) -> Result<bool, JournalError> {
        if !self.index().devices.contains_key(&num) {
            // The sender is gone (removed): nothing of it is owed any more.
            return Ok(false);
        }
        let Some(_mark) = SettlingMark::take(&self.inner.settling, (num, id)) else {
            // Being recorded by someone else right now.
            return Ok(false);
        };
        if !self.message_owed(num, id, to) {
            // Settled already (a removal found it undeliverable before a redelivery did):
            // one dead letter per message.
            return Ok(false);
        }
        self.require_format(record::EFFECTS_FROM)?;
        self.append(
            &Record::Undeliverable {
                device: num,
                id,
                at_ms,
                to: to.to_string(),
                reason: reason.to_string(),
            },
            IndexEffect::Undeliverable { device: num, id },
        )
        .await
        .map(|()| true)
    }

    /// Records that command `id` of device `num` was acknowledged, and waits until it is
    /// durable: it leaves the outbox for good. The same record (kind 11) settles a message
    /// `id` of the device, which is then no longer owed: what an import writes for a message
    /// the exporting journal no longer owed (see `crate::export`).
    pub async fn record_command_ack(
        &self,
        num: u32,
        id: EffectId,
        at_ms: u64,
    ) -> Result<(), JournalError> {
        self.require_format(record::EFFECTS_FROM)?;
        self.append(
            &Record::CommandAck {
                device: num,
                id,
                at_ms,
            },
            IndexEffect::CommandAck { device: num, id },
        )
        .await
    }

    /// Write counters.
    pub fn stats(&self) -> &Stats {
        &self.inner.shared.stats
    }

    /// How long the group commit under way (its write and `fdatasync`) has taken so far;
    /// `None` when none is. A disk that stopped answering shows here first: every event
    /// waits behind that commit (`GET /readyz` says `commit-stalled`).
    pub fn commit_under_way(&self) -> Option<Duration> {
        let stats = &self.inner.shared.stats;
        let since = stats.commit_since_us.load(Ordering::Acquire);
        (since != 0).then(|| {
            let began = Duration::from_micros(since - 1);
            stats.origin().elapsed().saturating_sub(began)
        })
    }

    /// Whether the journal refuses appends: a failed commit could not be cut back off the
    /// file (or the journal was opened read-only). Cleared only by opening it again.
    pub fn is_read_only(&self) -> bool {
        self.inner.shared.broken.load(Ordering::Acquire)
    }

    /// Length of the durable prefix of the journal.
    pub fn durable_len(&self) -> u64 {
        self.index().durable_len
    }

    /// How the index holds the records' offsets now.
    pub fn index_usage(&self) -> IndexUsage {
        let index = self.index();
        IndexUsage {
            memory_offsets: index.tail_entries,
            runs: index.runs.len() as u64,
            spilled_offsets: index.runs.entries(),
            run_directory_bytes: index.runs.directory_bytes() as u64,
        }
    }

    fn index(&self) -> RwLockReadGuard<'_, Index> {
        self.inner.shared.index.read()
    }

    /// Reads the record at `offset` (an offset the index handed out).
    fn read_at(&self, offset: u64) -> Result<Record, JournalError> {
        let err = |reason: String| JournalError::Read { offset, reason };
        let storage = &*self.inner.storage;
        let mut header = [0u8; record::HEADER_LEN];
        storage
            .read_exact_at(&mut header, offset)
            .map_err(|e| err(e.to_string()))?;
        let len = record::body_len(&header).map_err(|e| err(e.to_string()))?;
        let mut buf = vec![0u8; record::HEADER_LEN + len];
        buf[..record::HEADER_LEN].copy_from_slice(&header);
        storage
            .read_exact_at(
                &mut buf[record::HEADER_LEN..],
                offset + record::HEADER_LEN as u64,
            )
            .map_err(|e| err(e.to_string()))?;
        Record::decode(&buf)
            .map(|(r, _)| r)
            .map_err(|e| err(e.to_string()))
    }

    /// Reads the record at `offset` with one read when it is small: the header and a guess
    /// of the body together, clamped to `end` (the durable length), then the rest if the
    /// guess was short. A replay reads records one by one (a device's records are spread
    /// between other devices'), so this halves its system calls.
    fn read_into(&self, offset: u64, end: u64, buf: &mut Vec<u8>) -> Result<Record, JournalError> {
        /// Header plus a typical event record's body (~100 bytes).
        const GUESS: usize = 256;
        let err = |reason: String| JournalError::Read { offset, reason };
        let storage = &*self.inner.storage;
        let guess = GUESS.min(end.saturating_sub(offset) as usize);
        if guess < record::HEADER_LEN {
            return self.read_at(offset);
        }
        buf.clear();
        buf.resize(guess, 0);
        storage
            .read_exact_at(buf, offset)
            .map_err(|e| err(e.to_string()))?;
        let mut header = [0u8; record::HEADER_LEN];
        header.copy_from_slice(&buf[..record::HEADER_LEN]);
        let len = record::body_len(&header).map_err(|e| err(e.to_string()))?;
        let total = record::HEADER_LEN + len;
        if total > guess {
            buf.resize(total, 0);
            storage
                .read_exact_at(&mut buf[guess..], offset + guess as u64)
                .map_err(|e| err(e.to_string()))?;
        }
        Record::decode(&buf[..total])
            .map(|(r, _)| r)
            .map_err(|e| err(e.to_string()))
    }
}

/// A read-ahead buffer for reading one device's records in seq order. Its records sit at
/// rising offsets, often close together (a device that was busy, or alone in the journal), so
/// one read covering the next few usually serves many of them: a replay pays one system call
/// per window instead of one per record. A window spans only records known to be wanted (at
/// most [`Window::SIZE`]), so a device whose records are far apart reads no more than before.
#[derive(Default)]
struct Window {
    start: u64,
    bytes: Vec<u8>,
    /// For records that do not fit a window.
    scratch: Vec<u8>,
}

impl Window {
    const SIZE: u64 = 64 * 1024;
    /// Bytes read past the last wanted record's start: a typical record's length.
    const TAIL: u64 = 256;

    /// The record at `wanted[0]`; `wanted` are the offsets still to be read, ascending.
    fn record(
        &mut self,
        journal: &Journal,
        wanted: &[u64],
        end: u64,
    ) -> Result<Record, JournalError> {
        let offset = wanted[0];
        let err = |reason: String| JournalError::Read { offset, reason };
        let within = |w: &Window, len: u64| {
            offset >= w.start && offset + len <= w.start + w.bytes.len() as u64
        };
        if !within(self, record::HEADER_LEN as u64) {
            let last = wanted
                .iter()
                .take_while(|o| **o + Self::TAIL <= offset + Self::SIZE)
                .last()
                .copied()
                .unwrap_or(offset);
            let n = (last + Self::TAIL).min(end).saturating_sub(offset) as usize;
            if n < record::HEADER_LEN {
                return journal.read_into(offset, end, &mut self.scratch);
            }
            self.bytes.resize(n, 0);
            journal
                .inner
                .storage
                .read_exact_at(&mut self.bytes, offset)
                .map_err(|e| err(e.to_string()))?;
            self.start = offset;
        }
        let at = (offset - self.start) as usize;
        let header: [u8; record::HEADER_LEN] = self.bytes[at..at + record::HEADER_LEN]
            .try_into()
            .map_err(|_| err("short header".into()))?;
        let len = record::body_len(&header).map_err(|e| err(e.to_string()))?;
        let framed = (record::HEADER_LEN + len) as u64;
        if !within(self, framed) {
            // Longer than what the window holds of it: read it on its own.
            return journal.read_into(offset, end, &mut self.scratch);
        }
        Record::decode(&self.bytes[at..at + framed as usize])
            .map(|(r, _)| r)
            .map_err(|e| err(e.to_string()))
    }
}

/// One device's write lane, owned by its actor: appends its events and snapshots in seq
/// order, bounds how many may wait for the disk, and fences it when a commit fails.
///
/// # Pipelining and backpressure
///
/// [`DeviceWriter::append_event`] queues the record and returns at once; the completion runs
/// on the journal's writer thread once the record is durable (or failed). At most
/// `max_in_flight` records of the lane may be waiting; [`DeviceWriter::room`] waits until
/// there is room, which is how backpressure reaches the actor's mailbox and then the sender.
///
/// # Fencing
///
/// Each incarnation of the device's state (each rebuild from the journal) appends under its
/// own generation. When a commit fails, the writer fences the lane at that generation: its
/// later records, already queued, fail too (so a device's durable seqs never have a hole),
/// and [`DeviceWriter::is_fenced`] tells the actor to rebuild and call
/// [`DeviceWriter::next_generation`].
pub struct DeviceWriter {
    journal: Journal,
    device: u32,
    lane: Arc<Lane>,
    generation: u64,
}

/// What a lane shares with the writer thread.
#[derive(Default)]
struct Lane {
    /// The highest failed generation.
    failed_gen: AtomicU64,
    /// Records waiting for the disk. A counter plus a `Notify` that is only touched when the
    /// lane is at its limit: cheaper than a semaphore, whose release takes a lock on every
    /// acknowledgement.
    in_flight: AtomicUsize,
    freed: Notify,
    max_in_flight: usize,
}

impl Lane {
    fn is_failed(&self, generation: u64) -> bool {
        self.failed_gen.load(Ordering::Acquire) >= generation
    }

    fn fail(&self, generation: u64) {
        self.failed_gen.fetch_max(generation, Ordering::AcqRel);
    }

    /// Called by the writer when one of the lane's records is durable or failed.
    fn release(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) >= self.max_in_flight {
            // `notify_one` keeps a permit if the actor is not waiting yet: no lost wakeup.
            self.freed.notify_one();
        }
    }
}

impl DeviceWriter {
    /// Whether a commit of the current generation failed: the caller's in-memory state
    /// includes a record that is not in the journal, so it must rebuild.
    pub fn is_fenced(&self) -> bool {
        self.lane.is_failed(self.generation)
    }

    /// Starts a new generation after the caller rebuilt its state from the journal (and
    /// after [`Journal::barrier`], so nothing of the old generation is still queued).
    pub fn next_generation(&mut self) {
        self.generation = self
            .lane
            .failed_gen
            .load(Ordering::Acquire)
            .max(self.generation)
            + 1;
    }

    /// Waits until fewer than `max_in_flight` records of this lane are waiting for the disk.
    pub async fn room(&self) {
        let lane = &*self.lane;
        loop {
            if lane.in_flight.load(Ordering::Acquire) < lane.max_in_flight {
                return;
            }
            let freed = lane.freed.notified();
            if lane.in_flight.load(Ordering::Acquire) < lane.max_in_flight {
                return;
            }
            freed.await;
        }
    }

    /// Whether every record this lane submitted is durable (or failed): a read or a rebuild
    /// then needs no round trip through the writer.
    pub fn is_idle(&self) -> bool {
        self.lane.in_flight.load(Ordering::Acquire) == 0
    }

    /// Appends the outcome of one handled event: the input `event` (JSON text) at `seq`,
    /// stamped `at_ms`, decided by plugin version `version`, its `transitions` (JSON texts)
    /// and, for an event that did not come from outside or produced effects, its [`Fx`].
    /// `on_durable` runs on the writer thread once the record is durable or failed, and gets
    /// the transitions back (so the caller can answer with them without a copy); it must be
    /// quick and never block (send on a channel, bump a counter).
    ///
    /// A record with effects needs journal format 5: an older file's header is raised first,
    /// and a header-less format-1 file refuses it (`on_durable` gets the error).
    #[allow(clippy::too_many_arguments)]
    pub fn append_event<F>(
        &self,
        seq: u64,
        at_ms: u64,
        version: u32,
        event: &str,
        transitions: Vec<String>,
        fx: Option<Fx>,
        on_durable: F,
    ) where
        F: FnOnce(Result<(), JournalError>, Vec<String>) + Send + 'static,
    {
        let fx = fx.filter(|fx| !fx.is_empty());
        if fx.is_some()
            && let Err(e) = self.journal.require_format(record::EFFECTS_FROM)
        {
            // Fenced like a failed commit: the actor's state includes this event.
            self.lane.fail(self.generation);
            on_durable(Err(e), transitions);
            return;
        }
        let block = fx.as_ref().map(Fx::encode);
        let mut bytes = Vec::with_capacity(
            64 + event.len()
                + block.as_ref().map_or(0, Vec::len)
                + transitions.iter().map(String::len).sum::<usize>(),
        );
        record::encode_event(
            &mut bytes,
            record::EventHead {
                device: self.device,
                seq,
                at_ms,
                version,
            },
            event.as_bytes(),
            block.as_deref(),
            transitions.iter().map(String::as_bytes),
        );
        self.submit(
            bytes,
            IndexEffect::Event {
                device: self.device,
                seq,
                fx: fx.map(|fx| Box::new((at_ms, fx))),
            },
            Some(Box::new(move |r| on_durable(r, transitions))),
        );
    }

    /// Appends a snapshot of the guest's state right after `seq`, taken by plugin version
    /// `version`. Best effort: a snapshot that fails only means a longer replay later.
    pub fn append_snapshot(
        &self,
        seq: u64,
        version: u32,
        data: Vec<u8>,
    ) -> Result<(), JournalError> {
        if data.len() > record::MAX_BODY_LEN - 64 {
            return Err(JournalError::TooLarge(data.len()));
        }
        let mut bytes = Vec::with_capacity(data.len() + 32);
        Record::Snapshot {
            device: self.device,
            seq,
            version,
            data,
        }
        .encode_into(&mut bytes);
        self.submit(
            bytes,
            IndexEffect::Snapshot {
                device: self.device,
                seq,
                version,
            },
            None,
        );
        Ok(())
    }

    /// Records that the device now runs plugin version `head.version` (a deploy, rollback or
    /// lazy upgrade), in order with its events: an event the new version handles is queued
    /// after this record, so it can never be durable without it. Does not wait; a commit
    /// failure fences the lane like any of its records (the actor then rebuilds from the
    /// journal, on the binding that is durable).
    pub fn append_rebind(&self, head: &DeviceHead, at_ms: u64) {
        let mut bytes = Vec::with_capacity(64 + head.id.len() + head.config.len());
        Record::Device {
            num: head.num,
            id: head.id.to_string(),
            version: head.version,
            config: head.config.to_vec(),
            at_ms,
        }
        .encode_into(&mut bytes);
        let info = DeviceInfo::new(
            head.num,
            head.id.clone(),
            head.version,
            head.config.clone(),
            head.created_at_ms,
        );
        self.submit(bytes, IndexEffect::Device(info), None);
    }

    /// Records that seq `seq`'s record is lost (a kind-8 record, as salvage writes): for an
    /// import of a history that had such seqs. `on_durable` runs once it is durable.
    pub fn append_lost<F>(&self, seq: u64, at_ms: u64, version: u32, on_durable: F)
    where
        F: FnOnce(Result<(), JournalError>) + Send + 'static,
    {
        let mut bytes = Vec::new();
        Record::Lost {
            device: self.device,
            from: seq,
            to: seq,
            version,
            damaged_at: 0,
            at_ms,
        }
        .encode_into(&mut bytes);
        self.submit(
            bytes,
            IndexEffect::Lost {
                device: self.device,
                from: seq,
                to: seq,
            },
            Some(Box::new(on_durable)),
        );
    }

    /// Records an event the plugin failed on (see [`DeadLetter`]). Best effort: the sender
    /// already has its error; this makes the failure visible afterwards.
    pub fn append_dead_letter(&self, letter: DeadLetter) {
        let mut bytes = Vec::with_capacity(64 + letter.event.len() + letter.message.len());
        let device = letter.device;
        Record::DeadLetter(letter).encode_into(&mut bytes);
        if bytes.len() > record::HEADER_LEN + record::MAX_BODY_LEN {
            return;
        }
        self.submit(bytes, IndexEffect::DeadLetter { device }, None);
    }

    /// Runs `done` once everything this lane submitted so far is durable, with an error if
    /// any of it failed (so a read answered through it never shows what a crash or a failed
    /// commit could take back).
    ///
    /// A failed commit fails it only if it fenced the lane: a batch that failed with none of
    /// the lane's records that fence (its snapshots fence nothing, see `writer.rs`) took
    /// nothing a read could show. On a full disk, the barrier of a read that came while the
    /// previous read's passivation snapshot was in flight failed with that batch, and the
    /// read with it.
    pub fn when_durable(&self, done: OnDurable) {
        let lane = self.lane.clone();
        let shared = self.journal.inner.shared.clone();
        let generation = self.generation;
        self.journal.submit(Entry::Barrier(Box::new(move |r| {
            let r = match r {
                Err(JournalError::Commit { .. }) | Ok(()) if !lane.is_failed(generation) => Ok(()),
                Ok(()) => Err(shared.fenced()),
                Err(e) => Err(e),
            };
            done(r);
        })));
    }

    fn submit(&self, bytes: Vec<u8>, effect: IndexEffect, done: Option<OnDurable>) {
        self.lane.in_flight.fetch_add(1, Ordering::AcqRel);
        self.journal.submit(Entry::Append {
            bytes,
            effect,
            lane: Some((self.lane.clone(), self.generation)),
            done,
        });
    }
}

#[cfg(test)]
mod tests;
