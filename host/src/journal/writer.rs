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

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;

use parking_lot::RwLock;

use super::index::{Index, IndexEffect};
use super::{JournalError, Stats};

/// A batch stops growing past this many bytes, so one commit's latency stays bounded.
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// A batch of at least this many entries means the journal is under load (see `run`).
const COMMIT_DELAY_MIN_BATCH: usize = 64;

/// How long the writer lets a batch grow under load: 500 µs, or `DROVER_COMMIT_DELAY_US`.
fn commit_delay() -> std::time::Duration {
    static DELAY: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        let us = std::env::var("DROVER_COMMIT_DELAY_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(500);
        std::time::Duration::from_micros(us)
    })
}

/// Called exactly once with the outcome of an append or barrier, on the writer thread.
pub type Done = Box<dyn FnOnce(Result<(), JournalError>) + Send>;

/// A device's commit fence, shared by its actor and the writer.
///
/// Each actor incarnation appends with its own generation number. When a commit fails the
/// writer raises `failed_gen` to that generation, which fails every later record of the
/// same incarnation and tells the actor to rebuild from the journal under a new generation.
#[derive(Debug, Default)]
pub struct Fence {
    failed_gen: AtomicU64,
}

impl Fence {
    /// Whether records of incarnation `generation` are refused.
    pub fn is_failed(&self, generation: u64) -> bool {
        self.failed_gen.load(Ordering::Acquire) >= generation
    }

    fn fail(&self, generation: u64) {
        self.failed_gen.fetch_max(generation, Ordering::AcqRel);
    }

    /// The lowest generation a rebuilt incarnation may use.
    pub fn next_generation(&self) -> u64 {
        self.failed_gen.load(Ordering::Acquire) + 1
    }
}

/// One unit of work for the writer.
pub enum Entry {
    /// A framed record, what the index learns once it is durable, and who to tell.
    Append {
        bytes: Vec<u8>,
        effect: IndexEffect,
        fence: Option<(Arc<Fence>, u64)>,
        done: Option<Done>,
    },
    /// Completes once everything submitted before it is durable.
    Barrier(Done),
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
    /// Test hook: the next this-many commits fail after their write.
    pub inject_failures: AtomicU32,
}

pub fn run(mut file: File, mut durable_len: u64, rx: Receiver<Entry>, shared: Arc<Shared>) {
    let mut buf = Vec::with_capacity(1 << 20);
    let mut batch: Vec<Entry> = Vec::new();
    let mut offsets: Vec<u64> = Vec::new();
    let mut last_records = 0usize;
    loop {
        // Once closing, drain what is queued without waiting, then stop.
        let first = if shared.closing.load(Ordering::Acquire) {
            rx.try_recv().ok()
        } else {
            rx.recv().ok()
        };
        let Some(first) = first else { break };
        if last_records >= COMMIT_DELAY_MIN_BATCH {
            // Sustained load: let the next batch grow a little before paying for an fsync.
            // Fewer, larger commits cost the kernel less CPU per record, and that CPU is the
            // actors'. A quiet journal never waits.
            std::thread::sleep(commit_delay());
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
        commit(
            &mut file,
            &mut durable_len,
            &mut buf,
            &mut offsets,
            &mut batch,
            &shared,
        );
        batch.clear();
    }
    tracing::debug!(durable_len, "journal writer stopped");
}

fn commit(
    file: &mut File,
    durable_len: &mut u64,
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
            bytes, fence, done, ..
        } = entry
        {
            let refused = if broken {
                Some(JournalError::ReadOnly)
            } else if fence.as_ref().is_some_and(|(f, g)| f.is_failed(*g)) {
                Some(JournalError::Fenced)
            } else {
                None
            };
            match refused {
                Some(err) => {
                    if let Some(done) = done.take() {
                        done(Err(err));
                    }
                    // The device's in-memory state includes this record: its actor must
                    // rebuild before it answers anything else.
                    if let Some((f, g)) = fence.take() {
                        f.fail(g);
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

    let result = if buf.is_empty() {
        Ok(())
    } else {
        write_and_sync(file, *durable_len, buf, shared)
    };

    match result {
        Ok(()) => {
            let written = buf.len() as u64;
            *durable_len += written;
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
                drop(index);
                let records = offsets.iter().filter(|o| **o != u64::MAX).count() as u64;
                shared.stats.record_commit(written, records);
            }
            for entry in batch.drain(..) {
                match entry {
                    Entry::Append { done, .. } => {
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
            tracing::error!(error = %err, batch = batch.len(), "journal commit failed");
            shared.stats.commit_failures.fetch_add(1, Ordering::Relaxed);
            let restored = file
                .set_len(*durable_len)
                .and_then(|()| file.sync_all())
                .is_ok();
            if !restored {
                // The failed batch may still be on disk with valid checksums; blank the first
                // header so recovery stops there instead of resurrecting records whose
                // senders were told they failed.
                let blanked = file
                    .write_all_at(&[0u8; super::record::HEADER_LEN], *durable_len)
                    .and_then(|()| file.sync_data())
                    .is_ok();
                tracing::error!(
                    blanked,
                    "journal could not be cut back to its durable length: read-only"
                );
                shared.broken.store(true, Ordering::Release);
            }
            for entry in batch.drain(..) {
                match entry {
                    Entry::Append { fence, done, .. } => {
                        if let Some((fence, generation)) = fence {
                            fence.fail(generation);
                        }
                        if let Some(done) = done {
                            done(Err(JournalError::Commit(err.clone())));
                        }
                    }
                    Entry::Barrier(done) => done(Err(JournalError::Commit(err.clone()))),
                }
            }
        }
    }
}

fn write_and_sync(file: &File, at: u64, buf: &[u8], shared: &Shared) -> Result<(), String> {
    // Positioned writes: after a failed commit the file is cut back and the next batch lands
    // exactly at the durable end, whatever the failed write did to a file cursor.
    file.write_all_at(buf, at)
        .map_err(|e| format!("write: {e}"))?;
    let injected = shared
        .inject_failures
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok();
    if injected {
        return Err("fdatasync: injected failure".into());
    }
    file.sync_data().map_err(|e| format!("fdatasync: {e}"))
}

impl Stats {
    fn record_commit(&self, bytes: u64, records: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.records.fetch_add(records, Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
    }
}
