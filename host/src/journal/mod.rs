//! The journal: Drover's durable, append-only record of everything that happened.
//!
//! One file, `journal.log`, holds every record (see [`record`] for the format): plugin
//! versions, device provisioning, handled events with their transitions, and snapshots. It is
//! the single source of truth; actors, snapshots and reads are all derived from it.
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
//!   [`writer`] for the batch rules, the fence that keeps a device's seqs gap-free, and what
//!   happens when a commit fails).
//! * On open, the file is scanned from the start. The first record that is torn (cut short:
//!   the process died mid-write) or corrupt (checksum mismatch, or a record that does not fit
//!   the ones before it) ends the valid prefix. It and everything after it is **never
//!   applied**: those bytes are copied to `journal.log.dropped-<offset>` for inspection, the
//!   file is cut back to the valid prefix and synced, and [`Recovery`] reports it. Every record
//!   before it is intact and served.
//! * A freshly created file is followed by an fsync of its directory, so the file itself
//!   survives a crash.

pub mod index;
pub mod record;
mod writer;

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::thread::JoinHandle;

use parking_lot::{Mutex, RwLock, RwLockReadGuard};

pub use index::{DeviceInfo, Index, IndexEffect, SnapshotRef, VersionInfo};
pub use record::{DecodeError, EventRecord, Record};
pub use writer::{Done, Entry, Fence};

/// File name of the journal inside the data directory.
pub const FILE_NAME: &str = "journal.log";

/// Why a journal operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// Writing or syncing a batch failed; nothing of the batch is durable.
    #[error("journal commit failed: {0}")]
    Commit(String),
    /// An earlier record of the same device failed to commit, so this one was not written
    /// either (it would have left a hole in the device's seqs).
    #[error("an earlier record of this device failed to commit")]
    Fenced,
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
}

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
}

/// What opening the journal found.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Valid records read.
    pub records: u64,
    /// Length of the valid prefix.
    pub valid_len: u64,
    /// The record that ended the valid prefix, if the file did not end cleanly.
    pub dropped: Option<DroppedTail>,
}

/// A torn or corrupt tail found on open.
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
    /// Where the dropped bytes were saved.
    pub saved_to: PathBuf,
}

/// The journal handle. Cheap to clone; the writer stops when the last clone is dropped or
/// [`Journal::close`] is called.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    reader: File,
    shared: Arc<writer::Shared>,
    /// `None` for a read-only journal. A plain `Sender` (it is `Sync`): submitting is one
    /// channel push, with no lock in front of it.
    tx: Option<Sender<Entry>>,
    writer: Mutex<Option<JoinHandle<()>>>,
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
    }
}

impl Journal {
    /// Opens (or creates) the journal in `dir`, recovering its index and cutting any torn or
    /// corrupt tail (see the module docs).
    pub fn open(dir: &Path) -> Result<(Journal, Recovery), std::io::Error> {
        Journal::open_with(dir, false)
    }

    /// Like [`Journal::open`], but also opens a journal damaged *before* its tail, by cutting
    /// it at the first bad record. The records after it were acknowledged once; they are
    /// set aside in `journal.log.dropped-<offset>`, not applied.
    pub fn open_salvaging(dir: &Path) -> Result<(Journal, Recovery), std::io::Error> {
        Journal::open_with(dir, true)
    }

    fn open_with(dir: &Path, salvage: bool) -> Result<(Journal, Recovery), std::io::Error> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE_NAME);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        if !existed {
            file.sync_all()?;
            File::open(dir)?.sync_all()?;
        }
        let (index, recovery) = recover(&file, &path, Cut::Tail { salvage })?;
        let reader = File::open(&path)?;
        let shared = Arc::new(writer::Shared {
            index: RwLock::new(index),
            stats: Stats::default(),
            broken: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            inject_failures: AtomicU32::new(0),
        });
        let (tx, rx) = channel();
        let writer_shared = shared.clone();
        let durable_len = recovery.valid_len;
        let handle = std::thread::Builder::new()
            .name("drover-journal".into())
            .spawn(move || writer::run(file, durable_len, rx, writer_shared))?;
        Ok((
            Journal {
                inner: Arc::new(Inner {
                    path,
                    reader,
                    shared,
                    tx: Some(tx),
                    writer: Mutex::new(Some(handle)),
                }),
            },
            recovery,
        ))
    }

    /// Opens the journal for reading only: no writer, no lock needed, and a bad tail is
    /// reported but left on disk (the owner of the directory cuts it on its next open). For
    /// offline tools such as `drover replay`, which may run beside a live server.
    pub fn open_read_only(dir: &Path) -> Result<(Journal, Recovery), std::io::Error> {
        let path = dir.join(FILE_NAME);
        let file = File::open(&path)?;
        let (index, recovery) = recover(&file, &path, Cut::Never)?;
        let shared = Arc::new(writer::Shared {
            index: RwLock::new(index),
            stats: Stats::default(),
            broken: AtomicBool::new(true),
            closing: AtomicBool::new(true),
            inject_failures: AtomicU32::new(0),
        });
        Ok((
            Journal {
                inner: Arc::new(Inner {
                    path,
                    reader: file,
                    shared,
                    tx: None,
                    writer: Mutex::new(None),
                }),
            },
            recovery,
        ))
    }

    /// Path of the journal file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Queues an entry for the writer. Never blocks; the entry's completion reports the
    /// outcome (immediately, with [`JournalError::Closed`], if the journal is closed).
    pub fn submit(&self, entry: Entry) {
        let entry = match &self.inner.tx {
            Some(tx) => match tx.send(entry) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => entry,
        };
        match entry {
            Entry::Append { done, .. } => {
                if let Some(done) = done {
                    done(Err(JournalError::Closed));
                }
            }
            Entry::Barrier(done) => done(Err(JournalError::Closed)),
        }
    }

    /// Appends one record and waits until it is durable.
    pub async fn append(&self, record: &Record, effect: IndexEffect) -> Result<(), JournalError> {
        let mut bytes = Vec::new();
        record.encode_into(&mut bytes);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Entry::Append {
            bytes,
            effect,
            fence: None,
            done: Some(Box::new(move |r| {
                let _ = tx.send(r);
            })),
        });
        rx.await.unwrap_or(Err(JournalError::Closed))
    }

    /// Waits until everything submitted so far is durable.
    pub async fn barrier(&self) -> Result<(), JournalError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Entry::Barrier(Box::new(move |r| {
            let _ = tx.send(r);
        })));
        rx.await.unwrap_or(Err(JournalError::Closed))
    }

    /// Read access to the index of durable records.
    pub fn index(&self) -> RwLockReadGuard<'_, Index> {
        self.inner.shared.index.read()
    }

    /// Reads the record at `offset` (an offset the index handed out).
    pub fn read_at(&self, offset: u64) -> Result<Record, JournalError> {
        let err = |reason: String| JournalError::Read { offset, reason };
        let mut header = [0u8; record::HEADER_LEN];
        self.inner
            .reader
            .read_exact_at(&mut header, offset)
            .map_err(|e| err(e.to_string()))?;
        let len = record::body_len(&header).map_err(|e| err(e.to_string()))?;
        let mut buf = vec![0u8; record::HEADER_LEN + len];
        buf[..record::HEADER_LEN].copy_from_slice(&header);
        self.inner
            .reader
            .read_exact_at(
                &mut buf[record::HEADER_LEN..],
                offset + record::HEADER_LEN as u64,
            )
            .map_err(|e| err(e.to_string()))?;
        Record::decode(&buf)
            .map(|(r, _)| r)
            .map_err(|e| err(e.to_string()))
    }

    /// Reads the event record at `offset`.
    pub fn read_event(&self, offset: u64) -> Result<EventRecord, JournalError> {
        match self.read_at(offset)? {
            Record::Event(e) => Ok(e),
            other => Err(JournalError::Read {
                offset,
                reason: format!("expected an event record, found {other:?}"),
            }),
        }
    }

    /// Reads the events of device `num` with seqs in `from..=to` (clamped to what exists).
    pub fn read_events(
        &self,
        num: u32,
        from: u64,
        to: u64,
    ) -> Result<Vec<EventRecord>, JournalError> {
        let offsets: Vec<u64> = {
            let index = self.index();
            let Some(d) = index.devices.get(&num) else {
                return Ok(Vec::new());
            };
            let from = from.max(1);
            let to = to.min(d.seq());
            if from > to {
                return Ok(Vec::new());
            }
            d.events[(from - 1) as usize..to as usize].to_vec()
        };
        offsets.into_iter().map(|o| self.read_event(o)).collect()
    }

    /// Reads the snapshot data at `offset`.
    pub fn read_snapshot(&self, offset: u64) -> Result<Vec<u8>, JournalError> {
        match self.read_at(offset)? {
            Record::Snapshot { data, .. } => Ok(data),
            other => Err(JournalError::Read {
                offset,
                reason: format!("expected a snapshot record, found {other:?}"),
            }),
        }
    }

    /// Write counters.
    pub fn stats(&self) -> &Stats {
        &self.inner.shared.stats
    }

    /// Length of the durable prefix of the file.
    pub fn durable_len(&self) -> u64 {
        self.index().durable_len
    }

    /// Makes the next `n` commits fail after writing, as a full disk would. For tests of the
    /// failure path; never called by the runtime itself.
    #[doc(hidden)]
    pub fn inject_commit_failures(&self, n: u32) {
        self.inner
            .shared
            .inject_failures
            .store(n, Ordering::Release);
    }

    /// Stops the writer after everything queued so far is durable. Later submissions fail with
    /// [`JournalError::Closed`].
    pub fn close(&self) {
        self.inner.shared.closing.store(true, Ordering::Release);
        if let Some(tx) = &self.inner.tx {
            let _ = tx.send(Entry::Barrier(Box::new(|_| {})));
        }
        if let Some(handle) = self.inner.writer.lock().take() {
            let _ = handle.join();
        }
    }
}

/// Scans `file` from the start, building the index; cuts a bad tail (see module docs).
/// What recovery may do to a bad tail.
#[derive(Clone, Copy)]
enum Cut {
    /// Report it only (read-only opens).
    Never,
    /// Cut it if it can be a torn write: no longer than the largest batch a crash can tear.
    /// Damage further from the end is refused unless `salvage`.
    Tail { salvage: bool },
}

/// The most bytes a crash can leave half-written at the end of the file: one batch, whose
/// last record may exceed the batch limit by up to one record.
const MAX_TORN_BYTES: u64 =
    (writer::MAX_BATCH_BYTES + record::MAX_BODY_LEN + record::HEADER_LEN) as u64;

fn recover(file: &File, path: &Path, cut: Cut) -> Result<(Index, Recovery), std::io::Error> {
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut index = Index::default();
    let mut recovery = Recovery::default();
    let mut offset = 0u64;
    let mut buf = Vec::new();
    let bad: Option<(String, bool)> = loop {
        if offset == file_len {
            break None;
        }
        let mut header = [0u8; record::HEADER_LEN];
        if let Err(e) = read_fully(&mut reader, &mut header) {
            break Some((format!("short header: {e}"), true));
        }
        let len = match record::body_len(&header) {
            Ok(len) => len,
            Err(e) => break Some((e.to_string(), false)),
        };
        if offset + (record::HEADER_LEN + len) as u64 > file_len {
            break Some(("record extends past end of file".into(), true));
        }
        buf.clear();
        buf.extend_from_slice(&header);
        buf.resize(record::HEADER_LEN + len, 0);
        if let Err(e) = read_fully(&mut reader, &mut buf[record::HEADER_LEN..]) {
            break Some((format!("short body: {e}"), true));
        }
        let record = match Record::decode(&buf) {
            Ok((r, _)) => r,
            Err(e) => break Some((e.to_string(), matches!(e, DecodeError::Torn(_)))),
        };
        match index.effect_of(&record) {
            Ok(effect) => index.apply(effect, offset),
            Err(e) => break Some((e.to_string(), false)),
        }
        offset += buf.len() as u64;
        recovery.records += 1;
    };
    recovery.valid_len = offset;
    index.durable_len = offset;
    let dropped = file_len - offset;
    if let (Some((reason, _)), Cut::Tail { salvage: false }) = (&bad, cut)
        && dropped > MAX_TORN_BYTES
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{}: bad record at offset {offset} ({reason}) with {dropped} bytes after it: \
                 that is damage, not a torn write, and the records after it were \
                 acknowledged. Refusing to open; inspect the file, or open with salvage \
                 (`drover serve --salvage`) to cut it there and set the rest aside",
                path.display()
            ),
        ));
    }
    if let Some((reason, torn)) = bad.clone().filter(|_| matches!(cut, Cut::Never)) {
        recovery.dropped = Some(DroppedTail {
            offset,
            bytes: file_len - offset,
            reason,
            torn,
            saved_to: path.to_path_buf(),
        });
    } else if let Some((reason, torn)) = bad {
        let saved_to = path.with_file_name(format!("{FILE_NAME}.dropped-{offset}"));
        // Streamed, so a large salvage does not need the tail in memory.
        let mut saved = File::create(&saved_to)?;
        let mut source = file.try_clone()?;
        std::io::Seek::seek(&mut source, std::io::SeekFrom::Start(offset))?;
        std::io::copy(&mut source, &mut saved)?;
        saved.sync_all()?;
        file.set_len(offset)?;
        file.sync_all()?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        tracing::warn!(
            offset,
            dropped,
            %reason,
            saved_to = %saved_to.display(),
            "journal tail dropped on open: not applied"
        );
        recovery.dropped = Some(DroppedTail {
            offset,
            bytes: dropped,
            reason,
            torn,
            saved_to,
        });
    }
    Ok((index, recovery))
}

fn read_fully(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<()> {
    reader.read_exact(buf)
}

#[cfg(test)]
mod tests;
