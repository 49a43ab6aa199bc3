//! Journal segments: the journal's one byte range, kept as a sequence of bounded files.
//!
//! The rest of the journal sees a single range of positions (offsets) from 0, as it always
//! did; [`SegmentedBackend`] maps a position to a file. Bounded files are what lets old
//! history be archived or deleted (retention) and copied piece by piece (backups), without
//! rewriting anything.
//!
//! # Files
//!
//! * `journal.log` is the first segment: positions from 0, starting with the journal's own
//!   file header (`journal/record.rs`). A journal written before segments existed is exactly
//!   this one file, so it opens unchanged, whatever its size.
//! * `journal.<first position, 20 digits>.seg` holds the positions from its first one. It
//!   starts with a 32-byte header:
//!
//!   | bytes | field |
//!   | --- | --- |
//!   | 0..8 | magic `DRVSEG\0\x01` |
//!   | 8..12 | journal format version, u32 LE |
//!   | 12..20 | first position, u64 LE (the same as in the name) |
//!   | 20..24 | CRC-32 of bytes 0..20 |
//!   | 24..32 | zero |
//!
//! # Rules
//!
//! * A new segment starts only at the start of a write at the end of the range, once the
//!   last segment holds [`SegmentedBackend::segment_bytes`] or more. The writer writes a whole
//!   commit (its records and its marker) in one write, so a commit never spans two files and
//!   a file ends on a commit boundary.
//! * Before a segment is created, the one before it is synced, and after, the new file (its
//!   header) and the directory are: so on any open the segments are contiguous (each starts
//!   where the one before ends), and a gap, a missing file or a bad header is damage, never a
//!   crash. The one exception is a crash while creating a segment: a last segment no longer
//!   than its header holds no record and is removed.
//! * Cutting the range back (a torn tail, a failed commit) removes whole segments after the
//!   new end and cuts the one it falls in.
//! * `journal.retained` ([`RETAINED_FILE`]) holds the position the journal may begin at: 0,
//!   or how far retention deleted. Retention writes it (durably, replacing it whole) before
//!   it unlinks a segment, so a journal whose first segment begins past it lost its first
//!   files to something else (deleted by hand, a bad copy) and refuses to open, naming the
//!   missing positions: without it, the index checkpoint opened what was left as if
//!   retention had deleted the rest, and every acknowledged record in the lost files read as
//!   "retained away", under `keep-all` too. A directory without it (written before it
//!   existed) gets one at its first writable open, at where the journal then begins.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use super::FILE_NAME;
use super::storage::{Deleted, StorageBackend};

/// The file holding the position the journal may begin at (see the module's rules).
pub const RETAINED_FILE: &str = "journal.retained";

/// The position recorded in `dir`'s [`RETAINED_FILE`], if it has one.
pub fn retained_floor(dir: &Path) -> io::Result<Option<u64>> {
    let path = dir.join(RETAINED_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| {
            damaged(format!(
                "{} does not hold a journal position (it says {:?}): restore it from a backup, \
                 or write there the first position of the first journal segment left",
                path.display(),
                text.chars().take(40).collect::<String>()
            ))
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Records durably that the journal in `dir` may begin at `position` (see
/// [`RETAINED_FILE`]): written beside it, synced, renamed over it, the directory synced.
pub fn record_retained_floor(dir: &Path, position: u64) -> io::Result<()> {
    let path = dir.join(RETAINED_FILE);
    let temp = dir.join(format!("{RETAINED_FILE}.{}.tmp", std::process::id()));
    {
        let mut file = File::create(&temp)?;
        std::io::Write::write_all(&mut file, format!("{position}\n").as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&temp, &path)?;
    sync_dir(dir)
}

/// Bytes of a segment header (`journal.log` has none: it starts at position 0).
pub const SEGMENT_HEADER_LEN: u64 = 32;
const SEGMENT_MAGIC: [u8; 8] = *b"DRVSEG\0\x01";

/// Default [`SegmentedBackend::segment_bytes`]: 256 MiB. Small enough that retention frees
/// space in useful steps and a backup copies files of a manageable size; large enough that
/// a busy journal (a few hundred MB a minute) creates a file every minute or so, not every
/// second, and a year of history is thousands of files, not millions.
pub const SEGMENT_BYTES: u64 = 256 << 20;

/// The smallest segment size a runtime accepts (`Config::validate`): 4 KiB. Every segment is
/// a file kept open, and a commit never spans two segments, so a smaller size would make a
/// file of nearly every commit and run a process out of file descriptors.
pub const MIN_SEGMENT_BYTES: u64 = 4096;

/// The name of the segment that starts at `first` (`journal.log` for 0).
pub fn segment_name(first: u64) -> String {
    if first == 0 {
        FILE_NAME.to_string()
    } else {
        format!("journal.{first:020}.seg")
    }
}

/// The first position named by a segment file name, if it is one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    if name == FILE_NAME {
        return Some(0);
    }
    let digits = name.strip_prefix("journal.")?.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|first| *first > 0)
}

/// The header of a segment holding positions from `first` (see the module docs).
pub fn segment_header(format: u32, first: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&format.to_le_bytes());
    h[12..20].copy_from_slice(&first.to_le_bytes());
    let crc = crc32fast::hash(&h[..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment header; returns its format version and first position.
fn parse_segment_header(h: &[u8]) -> Result<(u32, u64), String> {
    if h.len() < SEGMENT_HEADER_LEN as usize {
        return Err(format!("header cut short ({} bytes)", h.len()));
    }
    if h[..8] != SEGMENT_MAGIC {
        return Err("not a journal segment (bad magic)".into());
    }
    let crc = u32::from_le_bytes(h[20..24].try_into().unwrap_or_default());
    if crc32fast::hash(&h[..20]) != crc {
        return Err("header checksum mismatch".into());
    }
    let format = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default());
    let first = u64::from_le_bytes(h[12..20].try_into().unwrap_or_default());
    Ok((format, first))
}

/// One file of the range.
struct Segment {
    /// Its first position.
    first: u64,
    /// Bytes before position `first` in the file: 0 for `journal.log`, else the header.
    header: u64,
    file: File,
    path: PathBuf,
}

impl Segment {
    fn data_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len().saturating_sub(self.header))
    }
}

/// What a segment file looks like on disk (see [`SegmentedBackend::list`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub path: PathBuf,
    /// Its first position.
    pub first: u64,
    /// Positions it holds (file length less its header).
    pub len: u64,
}

/// The journal's range over segment files in one directory; see the module docs.
pub struct SegmentedBackend {
    dir: PathBuf,
    origin: PathBuf,
    segment_bytes: u64,
    format: u32,
    read_only: bool,
    segments: RwLock<Vec<Arc<Segment>>>,
    /// The range's length: the last segment's first position plus its data.
    end: AtomicU64,
    /// Earlier segments written since the last sync (a format raise rewrites the header of
    /// `journal.log`): synced with the last one.
    dirty: Mutex<Vec<Arc<Segment>>>,
    /// Positions no segment holds (a segment missing or cut short), `start..end`: only in a
    /// salvage's view ([`SegmentedBackend::open_for_salvage`]), which reads them as `EIO`, so
    /// salvage takes them for unreadable media and marks the seqs there lost.
    holes: Vec<(u64, u64)>,
}

impl SegmentedBackend {
    /// Opens the segments in `dir` (creating `journal.log` if there are none), new ones
    /// starting once the last holds `segment_bytes`. New segment headers name `format`.
    pub fn open(dir: &Path, segment_bytes: u64, format: u32) -> io::Result<SegmentedBackend> {
        SegmentedBackend::open_with(dir, segment_bytes, format, false, None)
    }

    /// Opens the segments in `dir` for reading; every write fails. A torn last segment
    /// header is left on disk (and its segment ignored).
    pub fn open_read_only(dir: &Path) -> io::Result<SegmentedBackend> {
        SegmentedBackend::open_with(dir, u64::MAX, 0, true, None)
    }

    /// [`SegmentedBackend::open_read_only`] for salvage: a segment whose header is damaged
    /// (or names another position) is read all the same, at the position its file name
    /// gives, since the header only repeats that (and the format, which the records do not
    /// depend on), and positions no segment holds (one missing or cut short) read as
    /// unreadable media (see `holes`). Each such fault is described in `tolerated`, with
    /// the journal position it is at. A normal open refuses them, and salvage, which
    /// rewrites the journal, is what repairs them.
    pub fn open_for_salvage(
        dir: &Path,
        tolerated: &mut Vec<(u64, String)>,
    ) -> io::Result<SegmentedBackend> {
        SegmentedBackend::open_with(dir, u64::MAX, 0, true, Some(tolerated))
    }

    fn open_with(
        dir: &Path,
        segment_bytes: u64,
        format: u32,
        read_only: bool,
        mut tolerated: Option<&mut Vec<(u64, String)>>,
    ) -> io::Result<SegmentedBackend> {
        let origin = dir.join(FILE_NAME);
        let mut found = SegmentedBackend::list(dir)?;
        if found.is_empty() {
            if read_only {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no journal in {}", dir.display()),
                ));
            }
            found.push(SegmentInfo {
                path: origin.clone(),
                first: 0,
                len: 0,
            });
        }
        let mut segments = Vec::with_capacity(found.len());
        let mut holes = Vec::new();
        let last = found.len() - 1;
        for (i, info) in found.iter().enumerate() {
            let header = if info.first == 0 {
                0
            } else {
                SEGMENT_HEADER_LEN
            };
            let file = if read_only {
                File::open(&info.path)
            } else {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(info.first == 0)
                    .truncate(false)
                    .open(&info.path)
            }
            .map_err(|e| {
                // Each segment holds a file descriptor while the journal is open.
                io::Error::new(
                    e.kind(),
                    format!(
                        "opening journal segment {} ({} of {}): {e}",
                        info.path.display(),
                        i + 1,
                        found.len()
                    ),
                )
            })?;
            if header > 0 {
                let size = file.metadata()?.len();
                let mut h = vec![0u8; size.min(SEGMENT_HEADER_LEN) as usize];
                file.read_exact_at(&mut h, 0)?;
                let parsed = parse_segment_header(&h);
                if i == last && size <= SEGMENT_HEADER_LEN && parsed.is_err() {
                    // A crash while this segment was created: its header is synced before
                    // any record goes in, so it holds nothing that was acknowledged.
                    if !read_only {
                        tracing::warn!(file = %info.path.display(), "journal: removing a segment whose creation a crash interrupted");
                        std::fs::remove_file(&info.path)?;
                        sync_dir(dir)?;
                    }
                    continue;
                }
                let why = match parsed {
                    Ok((_, first)) if first == info.first => None,
                    Ok((_, first)) => Some(format!(
                        "journal segment {} says it starts at position {first}, not {}",
                        info.path.display(),
                        info.first
                    )),
                    Err(why) => Some(format!("journal segment {}: {why}", info.path.display())),
                };
                if let Some(why) = why {
                    match tolerated.as_deref_mut() {
                        Some(tolerated) => tolerated.push((info.first, why)),
                        None => return Err(damaged(format!("{why}; {}", advice(&found)))),
                    }
                }
            }
            segments.push(Arc::new(Segment {
                first: info.first,
                header,
                file,
                path: info.path.clone(),
            }));
        }
        if segments.is_empty() {
            // Only a torn first segment after a retention removed `journal.log`: cannot be.
            return Err(damaged(format!(
                "no usable journal segment in {}",
                dir.display()
            )));
        }
        for pair in segments.windows(2) {
            let end = pair[0].first + pair[0].data_len()?;
            if pair[0].first == 0 && end > pair[1].first {
                // Only a salvage writes a `journal.log` past the first segment: it holds every
                // intact record of all of them, and a crash came before it moved them aside.
                return Err(damaged(format!(
                    "{} ends at position {end}, past the start of the next segment, {} ({}): \
                     a --salvage was interrupted after writing its new journal.log, which \
                     holds every intact record. Start again with --salvage, which finishes \
                     it (moving the segment files after it aside, as a completed salvage \
                     does)",
                    pair[0].path.display(),
                    pair[1].path.display(),
                    pair[1].first
                )));
            }
            if end != pair[1].first {
                let why = format!(
                    "journal segment {} ends at position {end} but the next one, {}, starts at {}: \
                     a segment is missing or was cut short",
                    pair[0].path.display(),
                    pair[1].path.display(),
                    pair[1].first
                );
                match tolerated.as_deref_mut() {
                    // Salvage reads the missing positions as unreadable bytes: the seqs whose
                    // records were there are marked lost, every other record is kept.
                    Some(damaged) if end < pair[1].first => {
                        damaged.push((end, why));
                        holes.push((end, pair[1].first));
                    }
                    None if end < pair[1].first => {
                        return Err(self::damaged(format!("{why}; {}", advice(&found))));
                    }
                    _ => return Err(self::damaged(why)),
                }
            }
        }
        if !read_only && found.first().is_some_and(|f| f.first == 0 && f.len == 0) {
            // A new `journal.log`: the file itself must survive a crash.
            segments[0].file.sync_all()?;
            sync_dir(dir)?;
        }
        // Where the journal may begin: past what retention recorded, its first files were
        // lost to something else.
        let begins = segments[0].first;
        match retained_floor(dir)? {
            Some(floor) if begins <= floor => {}
            Some(floor) => {
                let why = format!(
                    "the journal in {} begins at position {begins} ({}), but retention deleted \
                     it only up to position {floor} ({RETAINED_FILE}): the segment files for \
                     positions {floor} to {begins} are missing (deleted by hand, or lost in a \
                     copy) and every record in them with them. Restore them from a backup; \
                     `drover serve --salvage` cannot bring them back",
                    dir.display(),
                    segments[0].path.display(),
                );
                match tolerated {
                    Some(tolerated) => tolerated.push((begins, why)),
                    None => return Err(damaged(why)),
                }
            }
            None if read_only => {}
            None if begins == 0 => record_retained_floor(dir, 0)?,
            // Every journal records its floor at its first open, so one that begins past 0
            // with no record lost its first files and the record of where it may begin, both
            // (to a hand, or a copy). It used to record where it now began and open: the lost
            // records then read as retained away, even under `keep-all` (a review found it).
            None => {
                let why = format!(
                    "the journal in {} begins at position {begins} ({}), but {RETAINED_FILE}, \
                     which records where retention let it begin, is missing: the segment files \
                     for positions 0 to {begins} are missing with it (deleted by hand, or lost \
                     in a copy) and every record in them, unless retention deleted them and \
                     only {RETAINED_FILE} was lost. Restore them from a backup; if retention \
                     did delete them, write {begins} into {} and start again",
                    dir.display(),
                    segments[0].path.display(),
                    dir.join(RETAINED_FILE).display(),
                );
                match tolerated {
                    Some(tolerated) => tolerated.push((begins, why)),
                    None => return Err(damaged(why)),
                }
            }
        }
        let last = segments
            .last()
            .map_or(Ok(0), |s| s.data_len().map(|len| s.first + len))?;
        Ok(SegmentedBackend {
            dir: dir.to_path_buf(),
            origin,
            segment_bytes: segment_bytes.max(1),
            format,
            read_only,
            segments: RwLock::new(segments),
            end: AtomicU64::new(last),
            dirty: Mutex::new(Vec::new()),
            holes,
        })
    }

    /// The segment files in `dir`, in position order (their headers unchecked).
    pub fn list(dir: &Path) -> io::Result<Vec<SegmentInfo>> {
        let mut found = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Some(first) = entry.file_name().to_str().and_then(parse_segment_name) else {
                continue;
            };
            // Deleted by retention since the listing (a reader beside a live server).
            let size = match entry.metadata() {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let header = if first == 0 { 0 } else { SEGMENT_HEADER_LEN };
            found.push(SegmentInfo {
                path: entry.path(),
                first,
                len: size.saturating_sub(header),
            });
        }
        found.sort_by_key(|s| s.first);
        fill_gaps(dir, &mut found)?;
        Ok(found)
    }

    /// The size at which a new segment starts.
    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    /// Whether the directory's segments differ from those this backend listed when it
    /// opened (one more, one fewer, or one of another length): a writer moved meanwhile. What
    /// cannot be listed counts as changed.
    pub fn changed_since_listed(&self) -> bool {
        let Ok(now) = SegmentedBackend::list(&self.dir) else {
            return true;
        };
        let seen = self.segments();
        // An empty last segment (torn while it was being created) is left out of a read-only
        // open: not a change either.
        let now: Vec<SegmentInfo> = now
            .into_iter()
            .filter(|s| s.len > 0 || seen.iter().any(|x| x.first == s.first))
            .collect();
        now.len() != seen.len()
            || now
                .iter()
                .zip(&seen)
                .any(|(a, b)| (a.first, a.len) != (b.first, b.len))
    }

    /// The segments as they are now.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        let end = self.end.load(Ordering::Acquire);
        let segments = self.segments.read();
        segments
            .iter()
            .enumerate()
            .map(|(i, s)| SegmentInfo {
                path: s.path.clone(),
                first: s.first,
                len: segments.get(i + 1).map_or(end, |next| next.first) - s.first,
            })
            .collect()
    }

    /// The segment holding `pos` and the end of its positions (the range's end for the last).
    fn locate(&self, pos: u64) -> io::Result<(Arc<Segment>, u64)> {
        let segments = self.segments.read();
        let i = segments.partition_point(|s| s.first <= pos);
        if i == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("journal position {pos} is before the first segment"),
            ));
        }
        let end = segments.get(i).map_or(u64::MAX, |next| next.first);
        Ok((segments[i - 1].clone(), end))
    }

    /// Starts a segment at `first` (the range's end): the last one synced first, then the
    /// new file with its header and the directory.
    fn roll_over(&self, first: u64) -> io::Result<Arc<Segment>> {
        let mut segments = self.segments.write();
        if let Some(last) = segments.last() {
            last.file.sync_data()?;
        }
        let path = self.dir.join(segment_name(first));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let made = file
            .write_all_at(&segment_header(self.format, first), 0)
            .and_then(|()| file.sync_all())
            .and_then(|()| sync_dir(&self.dir));
        if let Err(e) = made {
            // Nothing was written after the header: gone, the range ends where it did.
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        tracing::debug!(first, file = %path.display(), "journal: new segment");
        let segment = Arc::new(Segment {
            first,
            header: SEGMENT_HEADER_LEN,
            file,
            path,
        });
        segments.push(segment.clone());
        Ok(segment)
    }

    fn refuse_write(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the journal is open for reading only",
            ));
        }
        Ok(())
    }
}

impl StorageBackend for SegmentedBackend {
    fn size(&self) -> io::Result<u64> {
        Ok(self.end.load(Ordering::Acquire))
    }

    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        if self
            .holes
            .iter()
            .any(|&(start, end)| offset < end && start < offset + len)
        {
            const EIO: i32 = 5;
            return Err(io::Error::from_raw_os_error(EIO));
        }
        while !buf.is_empty() {
            let (segment, end) = self.locate(offset)?;
            let n = (buf.len() as u64).min(end - offset) as usize;
            let (now, rest) = buf.split_at_mut(n);
            segment
                .file
                .read_exact_at(now, segment.header + offset - segment.first)?;
            buf = rest;
            offset += n as u64;
        }
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.refuse_write()?;
        let end = self.end.load(Ordering::Acquire);
        let (mut segment, mut limit) = self.locate(offset.min(end))?;
        if offset >= end && !buf.is_empty() && end - segment.first >= self.segment_bytes {
            segment = self.roll_over(end)?;
            limit = u64::MAX;
        }
        if offset + buf.len() as u64 > limit {
            // Only a header raise writes before the end, and it stays in `journal.log`.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a journal write at {offset} of {} bytes would cross into the next segment",
                    buf.len()
                ),
            ));
        }
        segment
            .file
            .write_all_at(buf, segment.header + offset - segment.first)?;
        if limit != u64::MAX {
            self.dirty.lock().push(segment);
        }
        self.end
            .fetch_max(offset + buf.len() as u64, Ordering::AcqRel);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let earlier: Vec<Arc<Segment>> = std::mem::take(&mut *self.dirty.lock());
        for segment in earlier {
            segment.file.sync_data()?;
        }
        let last = self.segments.read().last().cloned();
        match last {
            Some(last) => last.file.sync_data(),
            None => Ok(()),
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.refuse_write()?;
        let mut segments = self.segments.write();
        let mut removed = false;
        while segments.len() > 1 && segments.last().is_some_and(|s| s.first > len) {
            if let Some(s) = segments.pop() {
                std::fs::remove_file(&s.path)?;
                removed = true;
            }
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        let Some(last) = segments.last() else {
            return Ok(());
        };
        if len < last.first {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot cut the journal to {len}: before its first segment"),
            ));
        }
        last.file.set_len(last.header + len - last.first)?;
        last.file.sync_all()?;
        self.end.store(len, Ordering::Release);
        Ok(())
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.origin)
    }

    fn file_of(&self, position: u64) -> Option<(PathBuf, u64)> {
        let segments = self.segments.read();
        let i = segments
            .partition_point(|s| s.first <= position)
            .checked_sub(1)?;
        let s = &segments[i];
        Some((s.path.clone(), s.header + (position - s.first)))
    }

    fn retained_from(&self) -> u64 {
        self.segments.read().first().map_or(0, |s| s.first)
    }

    fn holes(&self) -> Vec<(u64, u64)> {
        self.holes.clone()
    }

    fn segment_count(&self) -> usize {
        self.segments.read().len()
    }

    fn segment_start(&self, pos: u64) -> u64 {
        let segments = self.segments.read();
        let after = segments.partition_point(|s| s.first <= pos);
        segments.get(after.saturating_sub(1)).map_or(0, |s| s.first)
    }

    fn delete_before(
        &self,
        pos: u64,
        written_before: Option<std::time::SystemTime>,
    ) -> io::Result<Deleted> {
        self.refuse_write()?;
        // Taken out of the list under the lock (so no new read finds them), unlinked after
        // it: the writer and readers never wait for the file system. A reader already
        // holding one keeps reading it (an open file outlives its name).
        let mut kept_recent = false;
        // Where the journal will begin: recorded before anything is unlinked (see
        // `RETAINED_FILE`), outside the lock. The list only grows at its end meanwhile (the
        // writer), or is cut back far past `pos` (a failed commit at the tail).
        let begins = {
            let segments = self.segments.read();
            let mut n = 0;
            while n + 1 < segments.len() && segments[n + 1].first <= pos {
                if let Some(cutoff) = written_before
                    && segments[n].file.metadata()?.modified()? > cutoff
                {
                    kept_recent = true;
                    break;
                }
                n += 1;
            }
            (n > 0).then(|| segments[n].first)
        };
        let Some(begins) = begins else {
            return Ok(Deleted {
                files: 0,
                bytes: 0,
                kept_recent,
            });
        };
        record_retained_floor(&self.dir, begins)?;
        let gone: Vec<(Arc<Segment>, u64)> = {
            let mut segments = self.segments.write();
            // The segment `begins` starts stays first (`n` is never past the last).
            let n = segments
                .partition_point(|s| s.first < begins)
                .min(segments.len().saturating_sub(1));
            let ends: Vec<u64> = segments[1..=n].iter().map(|s| s.first).collect();
            segments.drain(..n).zip(ends).collect()
        };
        let (mut files, mut bytes) = (0, 0);
        // Oldest first, the directory synced after each: whatever a crash or a failure
        // leaves on disk is one contiguous range (a segment the list lost but the disk kept
        // is the oldest one there, and goes at a later pass after the next start).
        for (segment, end) in gone {
            std::fs::remove_file(&segment.path)?;
            sync_dir(&self.dir)?;
            files += 1;
            bytes += end - segment.first;
            tracing::info!(file = %segment.path.display(), first = segment.first, "journal: segment deleted by retention");
        }
        Ok(Deleted {
            files,
            bytes,
            kept_recent,
        })
    }
}

/// Adds to a sorted listing of segments the ones it missed. A directory listing beside a
/// live writer can miss a file created during it (a hashed directory is walked in hash
/// order: a segment created behind the walk is not seen, the next one, created ahead of it,
/// is), which read as a missing segment, media damage, to `drover replay`, `journal export`
/// and `backup` beside a server writing small segments. A segment's name says where it
/// starts, so the one that should follow each is looked up by name (a path lookup has no
/// such race); only a segment that truly is not there is left for the open to report.
pub(crate) fn fill_gaps(dir: &Path, found: &mut Vec<SegmentInfo>) -> io::Result<()> {
    let mut i = 0;
    while i + 1 < found.len() {
        let header = if found[i].first == 0 {
            0
        } else {
            SEGMENT_HEADER_LEN
        };
        // Its length now: listed while it was the last, it may have grown since.
        let len = match std::fs::metadata(&found[i].path) {
            Ok(m) => m.len().saturating_sub(header),
            Err(e) if e.kind() == io::ErrorKind::NotFound => found[i].len,
            Err(e) => return Err(e),
        };
        let end = found[i].first + len;
        // Not when it holds nothing (cut down to its header, or less): the segment at its end
        // would be itself, inserted again after itself for ever (a review saw every journal
        // reader spin at 100% CPU, silent, on such a file).
        if len > 0 && end < found[i + 1].first {
            let path = dir.join(segment_name(end));
            match std::fs::metadata(&path) {
                Ok(m) => found.insert(
                    i + 1,
                    SegmentInfo {
                        path,
                        first: end,
                        len: m.len().saturating_sub(SEGMENT_HEADER_LEN),
                    },
                ),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        i += 1;
    }
    Ok(())
}

/// What a refusal for a damaged segment header or a missing segment adds: salvage reads past
/// both (see [`SegmentedBackend::open_for_salvage`]).
const SALVAGE_READS_ON: &str = "media damage, not a torn write: keep a copy of the data \
     directory; `drover serve --salvage` keeps every intact record, marks the seqs whose \
     records are lost so they are never reused, and sets the damaged files aside";

/// What a refusal for damage in `segments` advises: salvage, unless retention deleted the
/// journal's start, which salvage reads from.
fn advice(segments: &[SegmentInfo]) -> String {
    match segments.first() {
        Some(first) if first.first > 0 => format!(
            "media damage, not a torn write: keep a copy of the data directory; retention \
             deleted this journal's history before position {}, and `drover serve --salvage` \
             reads a journal from its first record, so it cannot repair this one: restore the \
             data directory from a backup",
            first.first
        ),
        _ => SALVAGE_READS_ON.to_string(),
    }
}

fn damaged(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Makes the directory's entries (files created, renamed or removed in it) durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(segment_name(0), "journal.log");
        assert_eq!(parse_segment_name("journal.log"), Some(0));
        let name = segment_name(4096);
        assert_eq!(name, "journal.00000000000000004096.seg");
        assert_eq!(parse_segment_name(&name), Some(4096));
        for other in [
            "journal.log.checkpoint",
            "journal.4096.seg",
            "journal.00000000000000000000.seg",
            "journal.0000000000000000409x.seg",
        ] {
            assert_eq!(parse_segment_name(other), None, "{other}");
        }
    }

    #[test]
    fn writes_roll_over_at_write_boundaries_and_read_back_across_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = SegmentedBackend::open(dir.path(), 100, 5).expect("open");
        let mut all = Vec::new();
        for i in 0..10u8 {
            let chunk = bytes(40 + usize::from(i), i);
            b.write_all_at(&chunk, all.len() as u64).expect("write");
            all.extend_from_slice(&chunk);
        }
        b.sync_data().expect("sync");
        let segments = b.segments();
        assert!(segments.len() >= 4, "{segments:?}");
        // Each segment but the last holds at least the bound, and ends where a write ended.
        for pair in segments.windows(2) {
            assert!(pair[0].len >= 100, "{segments:?}");
            assert_eq!(pair[0].first + pair[0].len, pair[1].first);
        }
        let mut back = vec![0u8; all.len()];
        b.read_exact_at(&mut back, 0).expect("read all");
        assert_eq!(back, all);
        // A read across a boundary.
        let at = segments[1].first - 3;
        let mut six = [0u8; 6];
        b.read_exact_at(&mut six, at).expect("read across");
        assert_eq!(&six[..], &all[at as usize..at as usize + 6]);
        drop(b);

        // Reopened: the same range, from the files and their headers.
        let b = SegmentedBackend::open(dir.path(), 100, 5).expect("reopen");
        assert_eq!(b.size().expect("size"), all.len() as u64);
        assert_eq!(b.segments(), segments);
        let mut back = vec![0u8; all.len()];
        b.read_exact_at(&mut back, 0).expect("read all");
        assert_eq!(back, all);
        let ro = SegmentedBackend::open_read_only(dir.path()).expect("read-only");
        assert!(ro.write_all_at(b"x", all.len() as u64).is_err());
        let mut back = vec![0u8; all.len()];
        ro.read_exact_at(&mut back, 0).expect("read all");
        assert_eq!(back, all);

        // What a reader listed is what is there: no change. A segment whose creation a crash
        // tore (a few bytes of header) is left out of a read-only open, and is no change
        // either; a writer's next bytes are one.
        assert!(!ro.changed_since_listed());
        let torn = dir.path().join(segment_name(all.len() as u64));
        std::fs::write(&torn, &segment_header(5, all.len() as u64)[..7]).expect("torn");
        let ro = SegmentedBackend::open_read_only(dir.path()).expect("read-only");
        assert_eq!(ro.segments(), segments);
        assert!(!ro.changed_since_listed());
        std::fs::remove_file(&torn).expect("remove");
        b.write_all_at(b"more", all.len() as u64).expect("write");
        b.sync_data().expect("sync");
        assert!(ro.changed_since_listed());
    }

    #[test]
    fn cutting_back_removes_later_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = SegmentedBackend::open(dir.path(), 64, 5).expect("open");
        let mut all = Vec::new();
        for i in 0..8u8 {
            let chunk = bytes(50, i);
            b.write_all_at(&chunk, all.len() as u64).expect("write");
            all.extend_from_slice(&chunk);
        }
        let before = b.segments();
        let cut = before[1].first + 10;
        b.set_len(cut).expect("cut");
        assert_eq!(b.size().expect("size"), cut);
        assert_eq!(b.segments().len(), 2);
        assert_eq!(SegmentedBackend::list(dir.path()).expect("list").len(), 2);
        // The next write lands at the new end, in the segment it falls in.
        b.write_all_at(b"tail", cut).expect("write");
        drop(b);
        let b = SegmentedBackend::open(dir.path(), 64, 5).expect("reopen");
        let mut back = vec![0u8; cut as usize + 4];
        b.read_exact_at(&mut back, 0).expect("read");
        assert_eq!(&back[..cut as usize], &all[..cut as usize]);
        assert_eq!(&back[cut as usize..], b"tail");
    }

    #[test]
    fn a_missing_or_damaged_segment_refuses_and_a_torn_new_one_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = SegmentedBackend::open(dir.path(), 64, 5).expect("open");
        let mut at = 0;
        for i in 0..8u8 {
            b.write_all_at(&bytes(50, i), at).expect("write");
            at += 50;
        }
        let segments = b.segments();
        drop(b);
        assert!(segments.len() >= 4);

        // A crash while creating the next segment: a header cut short.
        let torn = dir.path().join(segment_name(at));
        std::fs::write(&torn, &segment_header(5, at)[..10]).expect("write");
        let b = SegmentedBackend::open(dir.path(), 64, 5).expect("opens");
        assert_eq!(b.size().expect("size"), at);
        assert!(!torn.exists(), "removed");
        drop(b);

        // A damaged header of a segment that holds records.
        let victim = &segments[2].path;
        let original = std::fs::read(victim).expect("read");
        let mut spoiled = original.clone();
        spoiled[13] ^= 0xff;
        std::fs::write(victim, &spoiled).expect("write");
        let err = SegmentedBackend::open(dir.path(), 64, 5)
            .err()
            .expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("checksum"), "{err}");
        assert!(err.to_string().contains("--salvage"), "{err}");
        std::fs::write(victim, &original).expect("put back");

        // A missing segment in the middle.
        std::fs::rename(victim, dir.path().join("aside")).expect("move");
        let err = SegmentedBackend::open(dir.path(), 64, 5)
            .err()
            .expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(err.to_string().contains("--salvage"), "{err}");
        std::fs::rename(dir.path().join("aside"), victim).expect("back");
        SegmentedBackend::open(dir.path(), 64, 5).expect("whole again");
    }
}
