//! The storage seam under the journal: where its bytes live.
//!
//! The journal needs very little from storage: positioned reads and writes, a length, a
//! durable sync, and cutting the end off. [`StorageBackend`] is exactly that (the shape of
//! redb's `StorageBackend`), so that
//!
//! * the production journal runs on a real file with `fdatasync` ([`FileBackend`]);
//! * crash and failure tests run the same journal code over a backend that fails, tears or
//!   forgets unsynced writes on command ([`FaultyBackend`], and an in-memory backend in the
//!   journal's own tests), instead of test-only switches on the production type;
//! * errors keep their [`std::io::ErrorKind`], so a full disk (`StorageFull`) is told apart
//!   from other failures all the way up to the HTTP answer.
//!
//! A clustered backend (NATS JetStream) replaces the journal as a whole, not this seam: it
//! implements the journal's domain calls over streams rather than a byte range.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::Mutex;

/// A byte range with durable syncs: what the journal file needs from storage.
///
/// Every method takes `&self`: the writer thread appends while any number of readers read
/// durable records, so implementations synchronize internally (positioned I/O on a file
/// needs nothing more).
pub trait StorageBackend: Send + Sync {
    /// Current length in bytes (including unsynced writes).
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; fails with `UnexpectedEof` if the range ends first.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the range if needed. Not durable until
    /// [`StorageBackend::sync_data`] returns.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Cuts (or extends) the range to `len` and makes the new length durable.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Where the bytes live, if on a file system: recovery saves a dropped tail next to it.
    fn path(&self) -> Option<&Path> {
        None
    }
    /// The file that holds `position`, and the byte of that file it is at: what a report
    /// of damage names, for an operator to look at. By default [`Self::path`] at the
    /// position itself (one file, no header).
    fn file_of(&self, position: u64) -> Option<(PathBuf, u64)> {
        self.path().map(|p| (p.to_path_buf(), position))
    }
    /// The first position still stored: 0 unless retention deleted the oldest segments
    /// (`journal/retention.rs`). Reads before it fail with `NotFound`.
    fn retained_from(&self) -> u64 {
        0
    }
    /// How many files hold the range.
    fn segment_count(&self) -> usize {
        1
    }
    /// Positions no file holds, `start..end` (a missing segment, in a salvage's view of
    /// the journal only): reads of them fail as unreadable media.
    fn holes(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }
    /// The first position of the segment holding `pos` (what a deletion up to `pos` keeps).
    fn segment_start(&self, _pos: u64) -> u64 {
        0
    }
    /// Deletes the oldest segments that end at or before `pos` (never the last one), and,
    /// with `written_before`, only those last written before it; says what went. Storage
    /// without segments deletes nothing.
    fn delete_before(
        &self,
        _pos: u64,
        _written_before: Option<std::time::SystemTime>,
    ) -> io::Result<Deleted> {
        Ok(Deleted::default())
    }
}

/// What [`StorageBackend::delete_before`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// Segment files deleted, and the positions they held.
    pub files: usize,
    pub bytes: u64,
    /// Whether it stopped at a segment that ends before the position but was written too
    /// recently (`written_before`).
    pub kept_recent: bool,
}

/// The journal file on a real file system.
pub struct FileBackend {
    file: File,
    path: PathBuf,
}

impl FileBackend {
    /// Opens (creating if needed) the file at `path`. A new file is followed by an fsync of
    /// its directory, so the file itself survives a crash.
    pub fn open(path: &Path) -> io::Result<FileBackend> {
        let existed = path.exists();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if !existed {
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        Ok(FileBackend {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Opens an existing file for reading only; every write fails.
    pub fn open_read_only(path: &Path) -> io::Result<FileBackend> {
        Ok(FileBackend {
            file: File::open(path)?,
            path: path.to_path_buf(),
        })
    }
}

impl StorageBackend for FileBackend {
    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // Positioned writes: after a failed commit the file is cut back and the next batch
        // lands exactly at the durable end, whatever the failed write did.
        self.file.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_all()
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
}

/// A backend that fails on command, wrapped around another one: how tests reach the journal's
/// failure paths (a full disk, a failing device, a file that cannot be cut back) through the
/// real journal and runtime code. Control it through the [`Faults`] handle.
pub struct FaultyBackend {
    inner: Box<dyn StorageBackend>,
    faults: Arc<Faults>,
}

/// What a [`FaultyBackend`] should fail next. Counters count down one per failed call.
#[derive(Debug, Default)]
pub struct Faults {
    syncs: AtomicU32,
    writes: AtomicU32,
    set_lens: AtomicU32,
    kind: Mutex<Option<io::ErrorKind>>,
    /// How long each sync waits before it is made: a disk that stopped answering.
    stall: Mutex<Option<std::time::Duration>>,
    /// Offsets whose byte reads back flipped, as a bad sector would.
    rotten: Mutex<Vec<u64>>,
    /// Byte ranges whose reads fail, with the OS error they fail with (`EIO`: an unreadable
    /// sector).
    unreadable: Mutex<Vec<(std::ops::Range<u64>, i32)>>,
}

impl Faults {
    /// Fails the next `n` syncs (the write before each one succeeds: the data is in the page
    /// cache but not durable, as when `fdatasync` reports an I/O error).
    pub fn fail_syncs(&self, n: u32) {
        self.syncs.store(n, Ordering::Release);
    }

    /// Makes every sync wait `stall` before it is made (`None`: no more), as on a disk
    /// that stopped answering for a while.
    pub fn stall_syncs(&self, stall: Option<std::time::Duration>) {
        *self.stall.lock() = stall;
    }

    /// Fails the next `n` writes.
    pub fn fail_writes(&self, n: u32) {
        self.writes.store(n, Ordering::Release);
    }

    /// Fails the next `n` attempts to cut the range back.
    pub fn fail_set_lens(&self, n: u32) {
        self.set_lens.store(n, Ordering::Release);
    }

    /// Makes the byte at `offset` read back flipped from now on (the data on storage is
    /// untouched): damage that appears after the journal was opened and checked. Rotting
    /// the same byte twice flips it back.
    pub fn rot_byte(&self, offset: u64) {
        self.rotten.lock().push(offset);
    }

    /// Makes every read that touches `range` fail with `EIO` from now on, as reads of a
    /// sector the disk can no longer read do.
    pub fn unreadable(&self, range: std::ops::Range<u64>) {
        self.fail_reads(range, EIO);
    }

    /// Makes every read that touches `range` fail with OS error `code` from now on (say
    /// `ETIMEDOUT` from a network file system: a failure that says nothing about the bytes).
    pub fn fail_reads(&self, range: std::ops::Range<u64>, code: i32) {
        self.unreadable.lock().push((range, code));
    }

    /// The error kind of injected failures (default `Other`; `StorageFull` for a full disk).
    pub fn with_kind(&self, kind: io::ErrorKind) -> &Self {
        *self.kind.lock() = Some(kind);
        self
    }

    fn take(&self, counter: &AtomicU32, what: &str) -> io::Result<()> {
        if counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            let kind = self.kind.lock().unwrap_or(io::ErrorKind::Other);
            return Err(io::Error::new(kind, format!("injected {what} failure")));
        }
        Ok(())
    }
}

impl FaultyBackend {
    /// Wraps `inner`; the returned handle injects failures.
    pub fn new(inner: impl StorageBackend + 'static) -> (FaultyBackend, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        (
            FaultyBackend {
                inner: Box::new(inner),
                faults: faults.clone(),
            },
            faults,
        )
    }
}

impl StorageBackend for FaultyBackend {
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        if let Some((_, code)) = self
            .faults
            .unreadable
            .lock()
            .iter()
            .find(|(r, _)| r.start < end && offset < r.end)
        {
            return Err(io::Error::from_raw_os_error(*code));
        }
        self.inner.read_exact_at(buf, offset)?;
        for &bad in self.faults.rotten.lock().iter() {
            if (offset..end).contains(&bad) {
                buf[(bad - offset) as usize] ^= 0x5a;
            }
        }
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.faults.take(&self.faults.writes, "write")?;
        self.inner.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        let stall = *self.faults.stall.lock();
        if let Some(stall) = stall {
            std::thread::sleep(stall);
        }
        self.faults.take(&self.faults.syncs, "fdatasync")?;
        self.inner.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.faults.take(&self.faults.set_lens, "set_len")?;
        self.inner.set_len(len)
    }

    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }

    fn file_of(&self, position: u64) -> Option<(PathBuf, u64)> {
        self.inner.file_of(position)
    }

    fn retained_from(&self) -> u64 {
        self.inner.retained_from()
    }

    fn segment_count(&self) -> usize {
        self.inner.segment_count()
    }

    fn segment_start(&self, pos: u64) -> u64 {
        self.inner.segment_start(pos)
    }

    fn delete_before(
        &self,
        pos: u64,
        written_before: Option<std::time::SystemTime>,
    ) -> io::Result<Deleted> {
        self.inner.delete_before(pos, written_before)
    }
}

/// `EIO`, the error a read of an unreadable sector fails with (Linux's number; the crate has
/// no libc dependency for one constant).
pub(super) const EIO: i32 = 5;

/// Whether a read failed because the medium cannot return those bytes (`EIO`, `ENODATA`,
/// `EBADMSG`: a bad sector, a failed checksum of the file system), as opposed to a failure
/// that says nothing about the bytes (a network file system timing out), which must not be
/// taken for damage.
pub(super) fn is_media_error(e: &io::Error) -> bool {
    const ENODATA: i32 = 61;
    const EBADMSG: i32 = 74;
    matches!(e.raw_os_error(), Some(EIO | ENODATA | EBADMSG))
}

/// Sequential reads over a backend, for the recovery scan.
pub(super) struct SeqReader<'a> {
    pub backend: &'a dyn StorageBackend,
    pub pos: u64,
    pub len: u64,
}

impl io::Read for SeqReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.backend.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A read-only view of a backend that reads through unreadable sectors: what recovery and
/// salvage scan with, so that an I/O error in the middle of the file is media damage like a
/// flipped byte (reported with its offset, skipped by salvage) instead of an error that
/// stops the scan and leaves the journal neither open nor salvageable.
///
/// A read that fails with a media error ([`is_media_error`]: `EIO` and the like; any other
/// failure is passed on) is retried one [`Tolerant::SECTOR`] at a time; a sector that still
/// fails reads as zeros, which no record checksums as, and its
/// range is remembered ([`Tolerant::unreadable`]). Writes go to the backend unchanged.
pub(super) struct Tolerant<'a> {
    inner: &'a dyn StorageBackend,
    unreadable: Mutex<Vec<(u64, u64)>>,
}

impl<'a> Tolerant<'a> {
    /// The unit an unreadable read is retried in: a page, the most a disk's bad sector can
    /// cost through the page cache.
    pub const SECTOR: u64 = 4096;

    pub fn new(inner: &'a dyn StorageBackend) -> Tolerant<'a> {
        Tolerant {
            inner,
            unreadable: Mutex::new(Vec::new()),
        }
    }

    /// The byte ranges (`start..end`, merged, ascending) that could not be read.
    pub fn unreadable(&self) -> Vec<(u64, u64)> {
        self.unreadable.lock().clone()
    }

    fn remember(&self, start: u64, end: u64, error: &io::Error) {
        let mut ranges = self.unreadable.lock();
        if ranges.iter().any(|&(a, b)| a <= start && end <= b) {
            return;
        }
        tracing::error!(offset = start, bytes = end - start, %error, "journal: unreadable bytes");
        ranges.push((start, end));
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for &(a, b) in ranges.iter() {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        *ranges = merged;
    }
}

impl StorageBackend for Tolerant<'_> {
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.inner.read_exact_at(buf, offset) {
            Err(e) if is_media_error(&e) => {}
            done => return done,
        }
        let end = offset + buf.len() as u64;
        // Pieces end at sector boundaries and at holes' edges, so the bytes beside a hole
        // read as they are; a hole is unreadable as a whole, remembered once.
        let holes = self.inner.holes();
        let edges: Vec<u64> = holes
            .iter()
            .flat_map(|&(a, b)| [a, b])
            .filter(|e| offset < *e && *e < end)
            .collect();
        let mut at = offset;
        while at < end {
            if let Some(&(hole_start, hole_end)) = holes.iter().find(|&&(a, b)| a <= at && at < b) {
                let next = hole_end.min(end);
                buf[(at - offset) as usize..(next - offset) as usize].fill(0);
                let missing = io::Error::other("no segment holds these positions");
                self.remember(hole_start, hole_end, &missing);
                at = next;
                continue;
            }
            let edge = edges
                .iter()
                .copied()
                .filter(|e| *e > at)
                .min()
                .unwrap_or(end);
            let next = ((at / Self::SECTOR + 1) * Self::SECTOR).min(end).min(edge);
            let piece = &mut buf[(at - offset) as usize..(next - offset) as usize];
            match self.inner.read_exact_at(piece, at) {
                Ok(()) => {}
                Err(e) if is_media_error(&e) => {
                    piece.fill(0);
                    self.remember(at, next, &e);
                }
                Err(e) => return Err(e),
            }
            at = next;
        }
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }

    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }

    fn file_of(&self, position: u64) -> Option<(PathBuf, u64)> {
        self.inner.file_of(position)
    }

    fn retained_from(&self) -> u64 {
        self.inner.retained_from()
    }

    fn holes(&self) -> Vec<(u64, u64)> {
        self.inner.holes()
    }
}
