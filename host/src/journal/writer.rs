//! The group-commit writer: one thread that owns the append side of the journal file.
//!
//! Crash-safety rules, in the order the writer applies them to each batch:
//!
//! 1. A batch is everything queued when the writer wakes (bounded by [`MAX_BATCH_BYTES`]), so
//!    the fsync cost is shared by every device that submitted meanwhile; nobody waits for a
//!    timer.
//! 2. The batch is written with one `write` at the durable end of the file, then `fdatasync`ed.
//!    Only after `fdatasync` returns does the index learn the new records and do the
//!    completions run, in submission order. So a record is visible to readers and acknowledged
//!    only once it is durable, and acknowledgements of one device leave in seq order.
//! 3. If the write or the sync fails, every record of the batch fails, each device that had a
//!    record in it is *fenced* (its later records, already queued, fail too, so a device's
//!    durable seqs never have a hole), and the file is cut back to its last durable length.
//!    If even that fails the journal turns read-only: all later appends fail.
//! 4. Barriers complete after every record submitted before them is durable; a batch of only
//!    barriers completes without touching the disk.
//! 5. Every batch ends with a commit marker (record kind 7, in the same write), and a clean
//!    close writes one more for an empty batch. A marker names where its batch starts: the
//!    length last synced, so a batch starts only after the previous one's `fdatasync` returned
//!    and a marker proves every byte before its batch durable: only the last batch in the file
//!    can have been torn by a crash (see `journal/recovery.rs`). An idle writer's empty-batch
//!    marker is not synced (unless an index checkpoint is due, which is taken only at a
//!    synced marker), so the next batch's marker counts it as part of its own batch. A
//!    format-2 or -3 file is raised to format 4 (header rewritten and synced) before the first
//!    batch that carries a marker; a header-less format-1 file gets no markers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use parking_lot::RwLock;

use super::index::{Index, IndexEffect, MarkerAt};
use super::record::{self, Record};
use super::{JournalError, Lane, Stats, StorageBackend};

/// A batch stops growing past this many bytes, so one commit's latency stays bounded.
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// After this long without work, the writer writes the marker of an empty batch (without a
/// sync, unless an index checkpoint is due): it proves the last batch durable to a reader of
/// the file, so an online backup of an idle server copies everything acknowledged (see
/// `crate::backup`).
const IDLE_CONFIRM: Duration = Duration::from_millis(50);

/// A batch of at least this many entries means the journal is under load: the writer then
/// waits the configured commit delay before the next batch (see `run`).
const COMMIT_DELAY_MIN_BATCH: usize = 16;

/// Called exactly once with the outcome of an append or barrier, on the writer thread, after
/// the fsync that covers it. Must be quick and never block: it runs between two commits.
pub type OnDurable = Box<dyn FnOnce(Result<(), JournalError>) + Send>;

/// One unit of work for the writer.
pub enum Entry {
    /// A framed record, what the index learns once it is durable, the device lane it belongs
    /// to (with the generation it was appended under), and who to tell.
    Append {
        bytes: Vec<u8>,
        effect: IndexEffect,
        lane: Option<(Arc<Lane>, u64)>,
        done: Option<OnDurable>,
    },
    /// Completes once everything submitted before it is durable.
    Barrier(OnDurable),
}

impl Entry {
    /// Completes the entry with `err` without writing it.
    pub fn fail(self, err: JournalError) {
        match self {
            Entry::Append { lane, done, .. } => {
                if let Some((lane, _)) = lane {
                    lane.release();
                }
                if let Some(done) = done {
                    done(Err(err));
                }
            }
            Entry::Barrier(done) => done(Err(err)),
        }
    }
}

/// State shared between the writer thread and [`super::Journal`].
pub struct Shared {
    pub index: RwLock<Index>,
    pub stats: Stats,
    /// Set when the file could not be restored after a failed commit.
    pub broken: AtomicBool,
    /// Set by `close`: the writer exits once the queue is empty. Entries that race past the
    /// exit are dropped unanswered, which their submitters observe as a closed channel.
    pub closing: AtomicBool,
    /// The format the file's header names now (raised before the first batch with a marker,
    /// and by removals; see rule 5).
    pub format: AtomicU32,
    /// Held while the header is rewritten, so two raises cannot leave the lower one on disk.
    pub raising: parking_lot::Mutex<()>,
    /// Wakes the index's spiller thread (`None`: the index never spills). Taken, and so
    /// closed, when the writer exits.
    pub spiller: parking_lot::Mutex<Option<std::sync::mpsc::SyncSender<()>>>,
    /// Which history to delete (`journal/retention.rs`), and what was deleted.
    pub retention: super::Retention,
    pub retention_state: super::retention::RetentionState,
    /// The error kind and message of the last failed commit: the cause a fenced record
    /// reports (see [`JournalError::Fenced`]).
    pub last_failure: parking_lot::Mutex<Option<(std::io::ErrorKind, String)>>,
    /// Failed commits, logged at most once a second (see `crate::log_limit`).
    pub failure_log: parking_lot::Mutex<crate::log_limit::LogLimit>,
}

/// The first format whose batches end with commit markers.
pub const MARKERS_FROM: u32 = 4;

impl Shared {
    /// The error of a record refused because an earlier one of its device failed.
    pub fn fenced(&self) -> JournalError {
        let (kind, cause) = self.last_failure.lock().clone().unwrap_or((
            std::io::ErrorKind::Other,
            "the cause was not recorded".to_string(),
        ));
        JournalError::Fenced { kind, cause }
    }

    /// Makes sure the file's header names at least `format`, raising it (durably, before
    /// any record that needs it is written) if it names format 2 or later. A header-less
    /// format-1 file cannot be raised in place: `Ok(false)`.
    pub fn raise_format(&self, storage: &dyn StorageBackend, format: u32) -> std::io::Result<bool> {
        if self.format.load(Ordering::Acquire) >= format {
            return Ok(true);
        }
        let _raising = self.raising.lock();
        let now = self.format.load(Ordering::Acquire);
        if now >= format {
            return Ok(true);
        }
        if now < 2 {
            return Ok(false);
        }
        storage.write_all_at(&record::file_header_of(format), 0)?;
        storage.sync_data()?;
        self.format.fetch_max(format, Ordering::AcqRel);
        tracing::info!(from = now, to = format, "journal format raised");
        Ok(true)
    }

    fn markers(&self) -> bool {
        self.format.load(Ordering::Acquire) >= MARKERS_FROM
    }
}

pub fn run(
    storage: &dyn StorageBackend,
    mut durable_len: u64,
    mut confirmed: bool,
    commit_delay: Duration,
    rx: Receiver<Entry>,
    shared: Arc<Shared>,
) {
    let mut buf = Vec::with_capacity(1 << 20);
    let mut batch: Vec<Entry> = Vec::new();
    let mut offsets: Vec<u64> = Vec::new();
    let mut last_records = 0usize;
    // The length known synced (`Journal::open_on` synced what recovery read): a batch's marker names it as where the batch starts, so an
    // unsynced idle marker before the batch is part of what a crash can tear.
    let mut synced_len = durable_len;
    // An idle marker was tried since the last commit (written or not: not retried).
    let mut idle_done = confirmed;
    loop {
        // Work already queued when the last commit ended: the journal is under load.
        let queued = rx.try_recv().ok();
        let under_load = queued.is_some();
        // Once closing, drain what is queued without waiting, then stop.
        let first = if queued.is_some() {
            queued
        } else if shared.closing.load(Ordering::Acquire) {
            None
        } else if idle_done || !shared.markers() {
            rx.recv().ok()
        } else {
            match rx.recv_timeout(IDLE_CONFIRM) {
                Ok(entry) => Some(entry),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    // An index checkpoint is taken only at a synced marker at the end: one
                    // due but not yet taken (its thread is behind) would otherwise wait for
                    // the next commit, which an idle server may not see for hours. So that
                    // one idle marker is synced.
                    let sync = shared.index.read().wants_checkpoint();
                    confirmed = confirm(storage, &mut durable_len, &mut buf, &shared, sync);
                    if confirmed && sync {
                        synced_len = durable_len;
                    }
                    idle_done = true;
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => None,
            }
        };
        let Some(first) = first else { break };
        if under_load && last_records >= COMMIT_DELAY_MIN_BATCH {
            // Sustained load: let the next batch grow a little before paying for an fsync.
            // Fewer, larger commits cost the kernel less CPU per record, and that CPU is the
            // actors'. A quiet journal never waits, nor does the first entry after a pause,
            // however large the batch before it was (that entry waited the whole delay, a
            // second at `--commit-delay-us 1000000`, after every burst).
            if !commit_delay.is_zero() {
                std::thread::sleep(commit_delay);
            }
        }
        batch.push(first);
        let mut bytes = 0usize;
        while bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(entry) => {
                    if let Entry::Append { bytes: b, .. } = &entry {
                        bytes += b.len();
                    }
                    batch.push(entry);
                }
                Err(_) => break,
            }
        }
        last_records = batch.len();
        let before = durable_len;
        commit(
            storage,
            &mut durable_len,
            &mut synced_len,
            &mut buf,
            &mut offsets,
            &mut batch,
            &shared,
        );
        batch.clear();
        if durable_len != before {
            confirmed = false;
            idle_done = false;
        }
    }
    if !confirmed {
        // The marker of an empty batch, synced: it proves the last batch durable, so after a
        // clean stop no byte of the journal is one a crash could have torn.
        confirmed = confirm(storage, &mut durable_len, &mut buf, &shared, true);
    } else if synced_len < durable_len {
        // An idle marker not synced yet: the checkpoint below must name durable bytes only.
        confirmed = storage.sync_data().is_ok();
        if confirmed && let Some(marker) = shared.index.write().last_marker.as_mut() {
            marker.synced = true;
        }
    }
    if confirmed
        && shared.markers()
        && !shared.broken.load(Ordering::Acquire)
        && let Some(path) = storage.path()
    {
        // The length and the devices' seqs, for the next open to notice a file cut short.
        let spill = {
            let index = shared.index.read();
            if let Err(e) = super::checkpoint::write_checkpoint(path, &index, durable_len) {
                tracing::warn!(error = %e, "journal checkpoint not written");
            }
            index.spill.clone()
        };
        // And the index's, so that the next open scans nothing (journal/index_checkpoint.rs).
        if let Some(spill) = spill {
            let format = shared.format.load(Ordering::Acquire);
            spill
                .checkpoints
                .write(&shared.index, storage, format, true);
        }
    }
    // Ends the spiller thread.
    shared.spiller.lock().take();
    tracing::debug!(durable_len, "journal writer stopped");
}

/// Writes the marker of an empty batch at the durable end (synced if `sync`); returns whether
/// it is there. Called only between commits, after the last one's `fdatasync` returned, so it
/// proves that commit.
fn confirm(
    storage: &dyn StorageBackend,
    durable_len: &mut u64,
    buf: &mut Vec<u8>,
    shared: &Shared,
    sync: bool,
) -> bool {
    if !shared.markers() || shared.broken.load(Ordering::Acquire) {
        return true;
    }
    buf.clear();
    Record::Commit {
        offset: *durable_len,
        batch_start: *durable_len,
    }
    .encode_into(buf);
    let written = if sync {
        write_and_sync(storage, *durable_len, buf)
    } else {
        storage.write_all_at(buf, *durable_len)
    };
    match written {
        Ok(()) => {
            let at = *durable_len;
            *durable_len += buf.len() as u64;
            let mut index = shared.index.write();
            index.durable_len = *durable_len;
            index.last_marker = Some(MarkerAt {
                batch_start: at,
                at,
                end: *durable_len,
                synced: sync,
            });
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "journal: the marker of an empty batch was not written");
            false
        }
    }
}

fn commit(
    storage: &dyn StorageBackend,
    durable_len: &mut u64,
    synced_len: &mut u64,
    buf: &mut Vec<u8>,
    offsets: &mut Vec<u64>,
    batch: &mut Vec<Entry>,
    shared: &Shared,
) {
    buf.clear();
    offsets.clear();
    let broken = shared.broken.load(Ordering::Acquire);
    // Drop records whose device is fenced (or all of them when the journal is broken) before
    // writing, so they never reach the file.
    for entry in batch.iter_mut() {
        if let Entry::Append {
            bytes, lane, done, ..
        } = entry
        {
            let refused = if broken {
                Some(JournalError::ReadOnly)
            } else if lane.as_ref().is_some_and(|(l, g)| l.is_failed(*g)) {
                Some(shared.fenced())
            } else {
                None
            };
            match refused {
                Some(err) => {
                    // The device's in-memory state includes this record: its actor must
                    // rebuild before it answers anything else. Released before the completion
                    // runs, so whoever hears of it sees the lane settled.
                    if let Some((l, g)) = lane.take() {
                        l.fail(g);
                        l.release();
                    }
                    if let Some(done) = done.take() {
                        done(Err(err));
                    }
                    bytes.clear();
                    offsets.push(u64::MAX);
                }
                None => {
                    offsets.push(*durable_len + buf.len() as u64);
                    buf.extend_from_slice(bytes);
                }
            }
        }
    }

    // Where the batch's commit marker starts in `buf`, if it has one.
    let mut marker_at = None;
    let result = if buf.is_empty() {
        Ok(())
    } else {
        shared
            .raise_format(storage, MARKERS_FROM)
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("raising the journal's format: {e}"))
            })
            .and_then(|_| {
                if shared.markers() {
                    marker_at = Some((buf.len(), *synced_len));
                    Record::Commit {
                        offset: *durable_len + buf.len() as u64,
                        batch_start: *synced_len,
                    }
                    .encode_into(buf);
                }
                // The I/O alone is watched (`GET /readyz`, `commit-stalled`), and it is
                // over before any completion runs: a caller told its event is durable
                // finds no commit under way.
                shared.stats.commit_under_way(true);
                let written = write_and_sync(storage, *durable_len, buf);
                shared.stats.commit_under_way(false);
                written
            })
    };

    match result {
        Ok(()) => {
            let written = buf.len() as u64;
            *durable_len += written;
            if written > 0 {
                *synced_len = *durable_len;
            }
            if written > 0 {
                let mut index = shared.index.write();
                let mut offs = offsets.iter();
                for entry in batch.iter_mut() {
                    if let Entry::Append { effect, .. } = entry {
                        let off = offs.next().copied().unwrap_or(u64::MAX);
                        if off != u64::MAX {
                            index.apply(std::mem::take(effect), off);
                        }
                    }
                }
                index.durable_len = *durable_len;
                index.last_marker = marker_at.map(|(at, batch_start)| MarkerAt {
                    batch_start,
                    at: *durable_len - written + at as u64,
                    end: *durable_len,
                    synced: true,
                });
                let spill = index.wants_spill() || index.wants_checkpoint();
                drop(index);
                if spill && let Some(wake) = &*shared.spiller.lock() {
                    // Full: a wake-up is pending already.
                    let _ = wake.try_send(());
                }
                let records = offsets.iter().filter(|o| **o != u64::MAX).count() as u64;
                shared.stats.record_commit(written, records);
            }
            for entry in batch.drain(..) {
                match entry {
                    Entry::Append { lane, done, .. } => {
                        if let Some((lane, _)) = lane {
                            lane.release();
                        }
                        if let Some(done) = done {
                            done(Ok(()));
                        }
                    }
                    // A read-only journal makes no promise about what is durable.
                    Entry::Barrier(done) if broken => done(Err(JournalError::ReadOnly)),
                    Entry::Barrier(done) => done(Ok(())),
                }
            }
        }
        Err(err) => {
            if let Some(failed) = shared.failure_log.lock().due() {
                tracing::error!(
                    error = %err,
                    batch = batch.len(),
                    failed,
                    "journal commit failed ({failed} since the last such line, at most one a second)"
                );
            }
            shared.stats.commit_failures.fetch_add(1, Ordering::Relaxed);
            let restored = storage.set_len(*durable_len).is_ok();
            if !restored {
                // The failed batch may still be on disk with valid checksums; blank its first
                // header and its marker so recovery sees an unconfirmed, torn last batch and
                // stops there instead of resurrecting records whose senders were told they
                // failed.
                let blank = [0u8; record::HEADER_LEN];
                let blanked = storage
                    .write_all_at(&blank, *durable_len)
                    .and_then(|()| match marker_at {
                        Some((at, _)) => storage.write_all_at(&blank, *durable_len + at as u64),
                        None => Ok(()),
                    })
                    .and_then(|()| storage.sync_data())
                    .is_ok();
                tracing::error!(
                    blanked,
                    "journal could not be cut back to its durable length: read-only"
                );
                shared.broken.store(true, Ordering::Release);
            }
            let failure = JournalError::Commit {
                kind: err.kind(),
                message: err.to_string(),
            };
            *shared.last_failure.lock() = Some((err.kind(), err.to_string()));
            for entry in batch.drain(..) {
                // A snapshot takes no seq, so its loss leaves no hole in the device's
                // history, only a longer replay: it fences nothing. (It fenced the device:
                // on a full disk, the snapshot a read's passivation writes failed that read
                // and every later one until the device's next event.)
                if let Entry::Append {
                    lane: Some((lane, generation)),
                    effect,
                    ..
                } = &entry
                    && !matches!(effect, IndexEffect::Snapshot { .. })
                {
                    lane.fail(*generation);
                }
                entry.fail(failure.clone());
            }
        }
    }
}

/// Writes the batch at the durable end, then syncs. Errors keep their kind (a full disk
/// stays `StorageFull`) with the step that failed in the message.
fn write_and_sync(storage: &dyn StorageBackend, at: u64, buf: &[u8]) -> std::io::Result<()> {
    let step = |what: &'static str| {
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    storage.write_all_at(buf, at).map_err(step("write"))?;
    storage.sync_data().map_err(step("fdatasync"))
}

impl Stats {
    fn record_commit(&self, bytes: u64, records: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.records.fetch_add(records, Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
    }
}
