//! Index checkpoints: the whole index written beside the journal now and then, so that a
//! restart reads it and scans only the records written after it.
//!
//! Without one, every open scans the whole journal to rebuild the index: ~0.2 s per million
//! records on this machine, so a fleet's history of a few hundred million records would keep
//! a restart from serving for a minute. With one, the open reads the checkpoint (devices,
//! plugin versions, each device's recent offsets, snapshots and dead letters, and the
//! directories of the run files that hold the older offsets, see `journal/runs.rs`) and
//! scans from the position it was taken at: restart time follows the number of devices and
//! the checkpoint interval, not the length of history.
//!
//! # File
//!
//! `journal.log.index/checkpoint`, beside the runs it names:
//!
//! ```text
//! "DRVIXCK3"   8 bytes, magic and version of this file
//! image        postcard encoding of `Image` (below)
//! crc32        4 bytes LE, CRC-32 of the image bytes
//! ```
//!
//! # When
//!
//! The index's thread (`drover-index`) writes one each time the journal has grown by
//! [`JournalOptions::index_checkpoint_every`](super::JournalOptions::index_checkpoint_every)
//! bytes (256 MiB by default), and a clean close writes one; never for a journal smaller than
//! that interval, which a full scan opens in a fraction of a second anyway. Each is taken at
//! a commit marker that is synced (the end of a durable batch), written to a new file,
//! synced, renamed over the old one, and the directory synced. The run files it names are
//! synced first, and stay on disk until a newer checkpoint no longer names them
//! (`Run::pinned`).
//!
//! # Trust
//!
//! An open uses a checkpoint only if it is whole (magic, CRC), names this journal format, and
//! its position is inside the file at the end of the very commit marker it recorded (read
//! back and decoded, checksum and offset included); if its runs exist with the lengths and
//! directories it gives, and every device's runs and tail add up to its seq. Anything else
//! is logged and the open scans the whole journal, as if there were none. A checkpoint is
//! never needed: deleting the directory costs one full scan.
//!
//! What an open from a checkpoint does not do is read the records before it, so damage
//! there would not be found at open. A background scrub (`journal/scrub.rs`) reads them
//! after the open, and on damage discards the checkpoint so that the next open scans
//! everything and refuses as the module docs of `journal/recovery.rs` describe.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::checkpoint::{Checkpoint, CheckpointDevice};
use super::effects::DeviceFx;
use super::index::{
    DEAD_LETTERS_KEPT, DeviceInfo, Index, MarkerAt, SNAPSHOTS_KEPT, SnapshotRef, VersionInfo,
};
use super::record::{FILE_HEADER_LEN, MAX_COMMIT_LEN, Record};
use super::runs::{Block, Run, Runs, Spill};
use super::storage::StorageBackend;

/// Default of [`JournalOptions::index_checkpoint_every`](super::JournalOptions::index_checkpoint_every):
/// 256 MiB of journal, about two million records of the thermostat's size, which a restart
/// scans in ~0.3 s.
pub const INDEX_CHECKPOINT_EVERY: u64 = 256 << 20;

/// The checkpoint's file name in the runs' directory.
pub const FILE: &str = "checkpoint";

/// Version 2 added each device's pending effects, version 3 left timers' events out of them
/// (they are read from their records). An older file is not read: the start scans the
/// journal once and writes a version-3 checkpoint.
const MAGIC: &[u8; 8] = b"DRVIXCK3";

/// How many bytes at each end of the checkpointed prefix its CRCs cover.
const IDENTITY_BYTES: u64 = 64 << 10;

/// The bytes `small_crc` covers: the first plugin versions and devices.
const IDENTITY_SMALL: u64 = 4 << 10;

/// CRC-32 of the journal's bytes `from..to`.
fn crc_of(storage: &dyn StorageBackend, from: u64, to: u64) -> io::Result<u32> {
    let mut bytes = vec![0u8; to.saturating_sub(from) as usize];
    storage.read_exact_at(&mut bytes, from)?;
    Ok(crc32fast::hash(&bytes))
}

/// The CRCs of the first and last [`IDENTITY_BYTES`] of `start..at`.
fn identity(storage: &dyn StorageBackend, start: u64, at: u64) -> io::Result<(u32, u32)> {
    Ok((
        crc_of(storage, start, at.min(start + IDENTITY_BYTES))?,
        crc_of(storage, at.saturating_sub(IDENTITY_BYTES).max(start), at)?,
    ))
}

/// The index at one position of the journal, as the file holds it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Image {
    /// The journal's format version.
    journal_format: u32,
    /// The position: the end of the commit marker at `marker_at`.
    at: u64,
    marker_at: u64,
    /// What that marker says its batch started at.
    batch_start: u64,
    /// Records (not counting markers) before `at`.
    records: u64,
    /// CRC-32 of the journal's first bytes after its header (up to [`IDENTITY_BYTES`]) and of
    /// its last bytes before `at` (as many): which journal this is, beyond the marker.
    head_crc: u32,
    end_crc: u32,
    /// CRC-32 of the first [`IDENTITY_SMALL`] bytes after the header: to tell this journal
    /// from another when the file is found too short for `head_crc`.
    small_crc: u32,
    /// How far the current scrub pass has read the journal (0: no pass under way). A pass
    /// cut short by a stop resumes here; a complete one starts the next from the beginning.
    scrubbed: u64,
    next_num: u32,
    versions: Vec<VersionInfo>,
    devices: Vec<DeviceImage>,
    removed: Vec<u32>,
    runs: Vec<RunImage>,
}

#[derive(Debug, Serialize, Deserialize)]
struct DeviceImage {
    num: u32,
    id: String,
    version: u32,
    config: Vec<u8>,
    created_at_ms: u64,
    seq: u64,
    tail: Vec<u64>,
    snapshots: Vec<SnapshotRef>,
    dead_letters: Vec<u64>,
    /// Pending timers, undelivered messages, unacknowledged commands.
    fx: Option<DeviceFx>,
}

#[derive(Debug, Serialize, Deserialize)]
struct RunImage {
    name: String,
    blocks: Vec<Block>,
}

impl Image {
    /// The journal format it was taken of (what names the format of a journal whose first
    /// segment, and its header, retention deleted).
    pub fn journal_format(&self) -> u32 {
        self.journal_format
    }

    fn of(index: &Index, journal_format: u32, marker: MarkerAt, scrubbed: u64) -> Image {
        let mut devices: Vec<DeviceImage> = index
            .devices
            .values()
            .map(|d| DeviceImage {
                num: d.num,
                id: d.id.to_string(),
                version: d.version,
                config: d.config.to_vec(),
                created_at_ms: d.created_at_ms,
                seq: d.seq,
                tail: d.tail.to_vec(),
                snapshots: d.snapshots.to_vec(),
                dead_letters: d.dead_letters().to_vec(),
                fx: d.fx(),
            })
            .collect();
        devices.sort_unstable_by_key(|d| d.num);
        let mut removed: Vec<u32> = index.removed.iter().copied().collect();
        removed.sort_unstable();
        Image {
            journal_format,
            at: marker.end,
            marker_at: marker.at,
            batch_start: marker.batch_start,
            records: index.records,
            head_crc: 0,
            end_crc: 0,
            small_crc: 0,
            scrubbed: scrubbed.min(marker.end),
            next_num: index.next_num,
            versions: index.versions.clone(),
            devices,
            removed,
            runs: index
                .runs
                .list()
                .iter()
                .map(|r| RunImage {
                    name: r.name().to_string(),
                    blocks: r.blocks().to_vec(),
                })
                .collect(),
        }
    }
}

/// Writes and loads one journal's index checkpoints (see the module docs). Owned by the
/// index's [`Spill`], whose directory it shares.
#[derive(Debug)]
pub struct Checkpoints {
    dir: PathBuf,
    /// Take one each time the journal has grown by this many bytes; 0: never.
    pub every: u64,
    /// The runs the checkpoint on disk names, kept from removal; the lock also makes
    /// writers take turns, so checkpoints are written in the order of their positions.
    pinned: Mutex<Vec<Arc<Run>>>,
    /// Set when the scrub found damage before the checkpoint: no further checkpoint is
    /// written, so the next open scans the whole journal and reports it.
    disabled: AtomicBool,
    /// How far the current scrub pass has read (see `Image::scrubbed`).
    pub scrubbed: AtomicU64,
    /// What the checkpoint on disk says of it: a close writes a new checkpoint when it
    /// changed, so the next scrub resumes (or starts anew) as it should.
    scrubbed_on_disk: AtomicU64,
    /// The position of the checkpoint on disk (0: none known), and the journal format it
    /// was taken of.
    on_disk_at: AtomicU64,
    on_disk_format: std::sync::atomic::AtomicU32,
    /// The index no longer uses a run the checkpoint on disk names (dropped after retention,
    /// `runs.rs`): the next checkpoint is due at once, whatever the journal grew, so that the
    /// run's file goes rather than wait for writes.
    runs_released: AtomicBool,
}

/// A checkpoint as [`Checkpoints::read`] found it: its image, and its runs opened.
pub struct Found {
    image: Image,
    runs: io::Result<Vec<Arc<Run>>>,
}

impl Found {
    /// The index image the file holds.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// Whether a run it names was not there to open.
    pub fn runs_missing(&self) -> bool {
        matches!(&self.runs, Err(e) if e.kind() == io::ErrorKind::NotFound)
    }
}

/// What an open takes from a checkpoint it trusts.
pub struct Loaded {
    /// The index at the checkpoint's position, its runs in place.
    pub index: Index,
    /// The position: the scan goes on from here.
    pub at: u64,
    /// The commit marker that ends at `at`.
    pub marker: MarkerAt,
    /// For the scrub: each device's seq at `at`.
    pub seqs: Vec<(u32, u64)>,
    /// For the scrub: the journal was read intact up to here before.
    pub scrubbed: u64,
    /// File names in the directory to keep.
    pub keep: Vec<String>,
}

impl Checkpoints {
    pub fn new(dir: &Path, every: u64) -> Checkpoints {
        Checkpoints {
            dir: dir.to_path_buf(),
            every,
            pinned: Mutex::new(Vec::new()),
            disabled: AtomicBool::new(false),
            scrubbed: AtomicU64::new(0),
            scrubbed_on_disk: AtomicU64::new(0),
            on_disk_at: AtomicU64::new(0),
            on_disk_format: std::sync::atomic::AtomicU32::new(0),
            runs_released: AtomicBool::new(false),
        }
    }

    /// Notes that the index dropped a run the checkpoint on disk names (see
    /// `Checkpoints::runs_released`).
    pub fn release_runs(&self) {
        self.runs_released.store(true, Ordering::Release);
    }

    /// The first position the checkpoint on disk needs to be trusted by an open (its
    /// identity check reads the bytes before its position back); 0 if there is none.
    /// Retention deletes nothing from here on (`journal/retention.rs`).
    pub fn identity_from(&self) -> u64 {
        let _turn = self.pinned.lock();
        if self.disabled.load(Ordering::Acquire) {
            return 0;
        }
        let at = self.on_disk_at.load(Ordering::Acquire);
        // A journal whose first segment went has no header to name its format but this
        // checkpoint's: only one taken at the current format lets retention go that far.
        if at == 0 || self.on_disk_format.load(Ordering::Acquire) != super::FORMAT_VERSION {
            return 0;
        }
        at.saturating_sub(IDENTITY_BYTES)
            .max(FILE_HEADER_LEN as u64)
    }

    /// Whether `index` is due a checkpoint: at a synced marker, the journal at least one
    /// interval long and grown by one since the last checkpoint (by anything, when closing;
    /// not at all, when the index dropped runs the last one names).
    pub fn due(&self, index: &Index, closing: bool) -> bool {
        if self.every == 0 || self.disabled.load(Ordering::Acquire) {
            return false;
        }
        let at_marker = index
            .last_marker
            .is_some_and(|m| m.synced && m.end == index.durable_len);
        let grown = self.runs_released.load(Ordering::Acquire)
            || if closing {
                index.durable_len > index.checkpoint_at
                    || self.scrubbed.load(Ordering::Acquire)
                        != self.scrubbed_on_disk.load(Ordering::Acquire)
            } else {
                index.durable_len >= index.checkpoint_at.saturating_add(self.every)
            };
        at_marker && grown && index.durable_len >= self.every
    }

    /// Writes a checkpoint of the index behind `lock` if it is due (see [`Checkpoints::due`]);
    /// returns its position. The read lock is held only while the index is copied. A
    /// failure (a full disk) is logged; the checkpoint on disk, if any, stays as good, and
    /// the next try waits for another interval.
    pub fn write(
        &self,
        lock: &RwLock<Index>,
        storage: &dyn StorageBackend,
        journal_format: u32,
        closing: bool,
    ) -> Option<u64> {
        let mut pinned = self.pinned.lock();
        let scrubbed = self.scrubbed.load(Ordering::Acquire);
        let (mut image, runs) = {
            let index = lock.read();
            if !self.due(&index, closing) {
                return None;
            }
            // Taken now: a run dropped after this copy makes the next one due again. A
            // failed write waits for another interval, as for any checkpoint.
            self.runs_released.store(false, Ordering::Release);
            let marker = index.last_marker?;
            (
                Image::of(&index, journal_format, marker, scrubbed),
                index.runs.list().to_vec(),
            )
        };
        let at = image.at;
        let written = runs.iter().try_for_each(|r| r.sync()).and_then(|()| {
            let start = FILE_HEADER_LEN as u64;
            if storage.retained_from() > start {
                // The first bytes were deleted by retention: only the last ones tie it.
                image.end_crc = crc_of(storage, at.saturating_sub(IDENTITY_BYTES).max(start), at)?;
            } else {
                let (head, end) = identity(storage, start, at)?;
                image.head_crc = head;
                image.end_crc = end;
                image.small_crc = crc_of(storage, start, at.min(start + IDENTITY_SMALL))?;
            }
            self.write_file(&image)
        });
        lock.write().checkpoint_at = at;
        match written {
            Ok(bytes) => {
                // The new checkpoint is durable: its runs are kept, and those only the old
                // one named are released (removed once the index no longer uses them).
                for run in &runs {
                    run.pinned.store(true, Ordering::Release);
                }
                for old in pinned.drain(..) {
                    if !runs.iter().any(|r| Arc::ptr_eq(r, &old)) {
                        old.pinned.store(false, Ordering::Release);
                    }
                }
                *pinned = runs;
                self.scrubbed_on_disk
                    .store(image.scrubbed, Ordering::Release);
                self.on_disk_at.store(at, Ordering::Release);
                self.on_disk_format
                    .store(image.journal_format, Ordering::Release);
                tracing::debug!(
                    at,
                    bytes,
                    devices = image.devices.len(),
                    "journal index checkpoint written"
                );
                Some(at)
            }
            Err(e) => {
                tracing::warn!(at, error = %e, "journal index checkpoint not written; the next try waits for another interval");
                None
            }
        }
    }

    fn write_file(&self, image: &Image) -> io::Result<u64> {
        let body = postcard::to_stdvec(image).map_err(io::Error::other)?;
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let written = (|| {
            let mut file = std::io::BufWriter::new(File::create(&tmp)?);
            file.write_all(MAGIC)?;
            file.write_all(&body)?;
            file.write_all(&crc32fast::hash(&body).to_le_bytes())?;
            let file = file.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            drop(file);
            std::fs::rename(&tmp, self.dir.join(FILE))?;
            File::open(&self.dir)?.sync_all()
        })();
        if written.is_err() {
            // A full disk must not keep the space a half-written checkpoint took.
            let _ = std::fs::remove_file(&tmp);
        }
        written.map(|()| (MAGIC.len() + body.len() + 4) as u64)
    }

    /// Reads the checkpoint file (see [`Checkpoints::read_image`]) and opens the runs it
    /// names, so that [`Checkpoints::load`] can use them even if the server that owns them
    /// deletes them meanwhile (an open file stays readable).
    pub fn read(&self) -> io::Result<Option<Found>> {
        let Some(mut image) = self.read_image()? else {
            return Ok(None);
        };
        let at = image.at;
        let runs = std::mem::take(&mut image.runs)
            .into_iter()
            .map(|r| Run::load(&self.dir, &r.name, r.blocks, at))
            .collect();
        Ok(Some(Found { image, runs }))
    }

    /// Reads and decodes the checkpoint file, checking only that it is whole. Read before
    /// the journal's length (a server beside a read-only open may write a newer one).
    fn read_image(&self) -> io::Result<Option<Image>> {
        let bytes = match std::fs::read(self.dir.join(FILE)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if bytes.len() < MAGIC.len() + 4 || &bytes[..MAGIC.len()] != MAGIC {
            return Err(untrusted("not an index checkpoint (bad magic)".into()));
        }
        let (body, crc) = bytes[MAGIC.len()..].split_at(bytes.len() - MAGIC.len() - 4);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err(untrusted("checksum mismatch".into()));
        }
        postcard::from_bytes(body)
            .map(Some)
            .map_err(|e| untrusted(e.to_string()))
    }

    /// What `image` says of the journal's length and devices, in the form a clean close
    /// records (`journal/checkpoint.rs`): the index checkpoint proves that much durable too,
    /// so a file found shorter was cut by something other than a crash, and salvage marks
    /// the seqs it lost. `None` if the journal is not the one it was taken of (its CRC of the
    /// journal's first bytes differs: another journal left beside this one). A file too
    /// short to hold those bytes cannot be told apart, and is taken as this one cut: refused,
    /// with advice to remove the checkpoint if it is another journal.
    pub fn as_clean_close(
        image: &Image,
        storage: &dyn StorageBackend,
        start: u64,
        file_len: u64,
    ) -> Option<Checkpoint> {
        let head_end = image.at.min(start + IDENTITY_BYTES);
        let small_end = image.at.min(start + IDENTITY_SMALL);
        let tied = if storage.retained_from() > start {
            // The first bytes were deleted by retention: the load checks the last ones.
            true
        } else if file_len >= head_end {
            crc_of(storage, start, head_end).ok()? == image.head_crc
        } else if file_len >= small_end {
            crc_of(storage, start, small_end).ok()? == image.small_crc
        } else {
            true
        };
        tied.then(|| Checkpoint {
            format: 2,
            len: image.at,
            devices: image
                .devices
                .iter()
                .map(|d| CheckpointDevice {
                    num: d.num,
                    id: d.id.clone(),
                    version: d.version,
                    config: d.config.clone(),
                    created_at_ms: d.created_at_ms,
                    seq: d.seq,
                })
                .collect(),
        })
    }

    /// The checkpoint in the directory, if there is one and it can be trusted for the
    /// journal on `storage` (see the module docs); `Err` says why one was found but not used.
    /// The index it returns spills into `spill`; a read-only open passes `None` (and its
    /// runs, opened here, stay readable even if the server that owns them removes them).
    pub fn load(
        &self,
        found: Found,
        storage: &dyn StorageBackend,
        journal_format: u32,
        start: u64,
        file_len: u64,
        spill: Option<&Arc<Spill>>,
    ) -> io::Result<Loaded> {
        let bad = untrusted;
        let Found { image, runs } = found;
        if image.journal_format != journal_format {
            return Err(bad(format!(
                "taken of a format-{} journal; this one is format {journal_format}",
                image.journal_format
            )));
        }
        if image.scrubbed > image.at {
            return Err(bad("its scrub position is past it".into()));
        }
        let marker_len = image.at.saturating_sub(image.marker_at);
        if !(start <= image.marker_at
            && image.marker_at < image.at
            && image.at <= file_len
            && marker_len <= MAX_COMMIT_LEN as u64)
        {
            return Err(bad(format!(
                "its position {} is not inside the journal ({file_len} bytes)",
                image.at
            )));
        }
        let mut marker = vec![0u8; marker_len as usize];
        storage.read_exact_at(&mut marker, image.marker_at)?;
        match Record::decode(&marker) {
            Ok((
                Record::Commit {
                    offset,
                    batch_start,
                },
                len,
            )) if offset == image.marker_at
                && batch_start == image.batch_start
                && len == marker.len() => {}
            _ => {
                return Err(bad(format!(
                    "the journal holds no commit marker at offset {} (a different or rewritten journal)",
                    image.marker_at
                )));
            }
        }
        // After retention deleted the journal's first bytes, the bytes before the position
        // (which retention keeps) and the marker tie the checkpoint to this journal.
        let retained = storage.retained_from();
        let end_from = image.at.saturating_sub(IDENTITY_BYTES).max(start);
        if end_from < retained {
            return Err(bad(format!(
                "the bytes before its position were deleted by retention (the journal starts at \
                 position {retained})"
            )));
        }
        let head_end = image.at.min(start + IDENTITY_BYTES);
        let head_ok = retained > start || crc_of(storage, start, head_end)? == image.head_crc;
        let differ = if !head_ok {
            Some((start, head_end))
        } else if crc_of(storage, end_from, image.at)? != image.end_crc {
            Some((end_from, image.at))
        } else {
            None
        };
        if let Some((from, to)) = differ {
            // Where: a journal retention shortened opens only from this checkpoint, so this
            // is what an operator gets to go on.
            let place = |at: u64| match storage.file_of(at) {
                Some((file, byte)) => format!("{} byte {byte}", file.display()),
                None => format!("position {at}"),
            };
            return Err(bad(format!(
                "the journal's bytes from position {from} to {to} ({} to {}) differ from those \
                 it was taken of: media damage there, or a different or rewritten journal",
                place(from),
                place(to.saturating_sub(1)),
            )));
        }
        let runs = runs.map_err(|e| bad(format!("a run it names: {e}")))?;
        let keep: Vec<String> = runs.iter().map(|r| r.name().to_string()).collect();
        // Each device's runs hold its seqs from 1 on, in order, without gaps or overlaps:
        // the next seq after them, per device. In a journal retention shortened, from any
        // seq on (the runs that held the first ones may have been dropped: `runs.rs`).
        let shed = retained > start;
        let mut in_runs: HashMap<u32, u64> = HashMap::new();
        for run in &runs {
            for b in run.blocks() {
                let next = in_runs
                    .entry(b.num)
                    .or_insert(if shed { b.first_seq } else { 1 });
                if b.first_seq != *next {
                    return Err(bad(format!(
                        "the runs of device {} are not in order",
                        b.num
                    )));
                }
                *next += u64::from(b.count);
            }
        }

        let mut index = Index {
            spill: spill.cloned(),
            ..Index::default()
        };
        for (i, v) in image.versions.iter().enumerate() {
            if v.id as usize != i {
                return Err(bad(format!("plugin version ids out of order at {i}")));
            }
        }
        index.versions = image.versions;
        index.removed = image.removed.into_iter().collect::<HashSet<u32>>();
        let mut seqs = Vec::with_capacity(image.devices.len());
        for d in image.devices {
            let consistent = (d.version as usize) < index.versions.len()
                && d.num < image.next_num
                && !index.removed.contains(&d.num)
                && d.tail.len() as u64 <= d.seq
                && in_runs
                    .get(&d.num)
                    .map_or(shed || d.tail.len() as u64 == d.seq, |next| {
                        next - 1 + d.tail.len() as u64 == d.seq
                    })
                && d.snapshots.len() <= SNAPSHOTS_KEPT
                && d.dead_letters.len() <= DEAD_LETTERS_KEPT
                && d.tail.iter().chain(&d.dead_letters).all(|&o| o < image.at)
                && d.snapshots
                    .iter()
                    .all(|s| s.seq <= d.seq && s.offset < image.at)
                && d.fx.as_ref().is_none_or(|fx| {
                    fx.is_well_formed()
                        && fx.timers.values().all(|t| t.set().seq <= d.seq)
                        && fx
                            .sent
                            .iter()
                            .filter(|(_, s)| s.owed_to().is_some())
                            .map(|(id, _)| id)
                            .chain(fx.outbox.keys())
                            .all(|id| id.seq <= d.seq)
                });
            if !consistent {
                return Err(bad(format!("device {} does not add up", d.num)));
            }
            let id: Arc<str> = Arc::from(d.id.as_str());
            if index.devices.contains_id(&id) {
                return Err(bad(format!("device `{id}` listed twice")));
            }
            seqs.push((d.num, d.seq));
            index.tail_entries += d.tail.len() as u64;
            let mut info = DeviceInfo::new(
                d.num,
                id,
                d.version,
                super::intern::CONFIGS.intern(&d.config),
                d.created_at_ms,
            );
            info.seq = d.seq;
            info.tail = d.tail.into();
            info.snapshots = d.snapshots.into();
            info.set_dead_letters(d.dead_letters.into());
            if let Some(fx) = d.fx {
                info.set_fx(fx);
            }
            if index.devices.insert(d.num, info).is_some() {
                return Err(bad(format!("device {} listed twice", d.num)));
            }
        }
        let marker = MarkerAt {
            batch_start: image.batch_start,
            at: image.marker_at,
            end: image.at,
            synced: true,
        };
        index.next_num = image.next_num;
        index.runs = Runs::from_list(runs.clone(), shed);
        index.durable_len = image.at;
        index.records = image.records;
        index.checkpoint_at = image.at;
        index.last_marker = Some(marker);
        *self.pinned.lock() = runs;
        self.on_disk_at.store(image.at, Ordering::Release);
        self.on_disk_format
            .store(image.journal_format, Ordering::Release);
        self.scrubbed.store(image.scrubbed, Ordering::Release);
        self.scrubbed_on_disk
            .store(image.scrubbed, Ordering::Release);
        Ok(Loaded {
            index,
            at: image.at,
            marker,
            seqs,
            scrubbed: image.scrubbed,
            keep,
        })
    }

    /// Removes the checkpoint on disk and writes no other (the scrub found damage before
    /// it: the next open must scan everything to report it).
    pub fn discard(&self) {
        self.disabled.store(true, Ordering::Release);
        let _pinned = self.pinned.lock();
        match std::fs::remove_file(self.dir.join(FILE)) {
            Ok(()) => {
                if let Ok(dir) = File::open(&self.dir) {
                    let _ = dir.sync_all();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(error = %e, dir = %self.dir.display(), "journal: the index checkpoint could not be removed; remove it by hand so that the next open scans the whole journal")
            }
        }
    }
}

/// A checkpoint that was found but cannot be trusted (as opposed to one that could not be
/// read): the open scans the whole journal and replaces it.
fn untrusted(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}
