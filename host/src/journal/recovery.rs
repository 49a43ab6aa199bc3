//! Recovery on open: the index rebuilt from the file, and a crash's torn tail told apart from
//! media damage.
//!
//! # What a crash can tear
//!
//! The writer appends one batch at a time: one positioned write that ends with a commit
//! marker (record kind 7, naming its own offset and where its batch starts), then one
//! `fdatasync`, and only then the next batch. So when a marker is in the file, every byte
//! before its batch was durable before the marker was even written. A crash can therefore
//! have torn only the **last batch in the file**, in any way the disk likes (a later page
//! persisted before an earlier one, a length extended over zeros):
//!
//! * bytes after the last marker: that unconfirmed batch, or
//! * when the last marker ends the file: the batch that marker closes (its `fdatasync` may
//!   not have returned). A clean close writes the marker of an empty batch, so after a
//!   graceful stop nothing at all is tearable.
//!
//! Files written before format 4 have no markers; there, as before, only the last
//! [`MAX_TORN_BYTES`] can be a torn write.
//!
//! # What a crash cannot do: make the file shorter
//!
//! A clean close also writes `journal.log.checkpoint`: the file's length then and each
//! device's last seq. The journal only grows, so that length stays a lower bound for good: a
//! file found shorter than it was cut short by something other than a crash (and the
//! tearable part never starts before it). Opening refuses such a file like any damage, and
//! salvage marks every seq the checkpoint knows of and the file no longer holds as lost.
//!
//! # What recovery does with a bad record at offset X
//!
//! It scans past X for the next intact records (the next commit marker, found by a cheap test
//! at every byte, bounds the search inside one batch; within it, a record that frames, decodes
//! and checksums is a resync point), checks the later records against a copy of the index, and
//! then:
//!
//! * **X is in the tearable part**: the tail from X is cut, saved to
//!   `journal.log.dropped-<X>`, and reported ([`super::DroppedTail`]). Nothing cut was
//!   acknowledged.
//! * **X is before it**: media damage. The journal refuses to open with a [`Damaged`] error
//!   naming the offset, the damaged ranges, the intact records after them and the devices
//!   affected; the file is left untouched. [`salvage`] (`drover serve --salvage`) rewrites the
//!   journal keeping every intact record: a device whose records were destroyed gets a kind-8
//!   record for its lost seqs (found from the seqs of its later intact records, or, after the
//!   last one, from the damaged record's own unverified header), so a seq that was once
//!   acknowledged is never handed out again. The original file is kept as
//!   `journal.log.damaged-<X>`.
//!
//! # Bytes the disk cannot read
//!
//! Recovery and salvage read through [`Tolerant`]: a read that fails with an I/O error (a bad
//! sector's `EIO`) is retried a page at a time and the pages that still fail read as zeros,
//! so they are damaged bytes like any others, found, reported ([`Damaged::unreadable`]) and
//! skipped by salvage, instead of an error that leaves the journal neither open nor
//! salvageable. They are never taken for a torn write, wherever they are.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::checkpoint::{
    Checkpoint, CheckpointDevice, read_checkpoint, read_checkpoint_of, write_checkpoint,
};
use super::index::{Inconsistency, Index, MAX_LOST_RUN, MarkerAt};
use super::index_checkpoint::{Checkpoints, Found};
use super::record::{self, DecodeError, Record};
use super::runs::Spill;
use super::segments::{SegmentInfo, SegmentedBackend};
use super::storage::{SeqReader, StorageBackend, Tolerant};
use super::{DroppedTail, FILE_NAME, FORMAT_VERSION, Recovery, writer};

/// The most bytes a crash can leave half-written at the end of a file without commit markers
/// (formats 1-3): one batch, whose last record may exceed the batch limit by up to one record.
pub(super) const MAX_TORN_BYTES: u64 =
    (writer::MAX_BATCH_BYTES + record::MAX_BODY_LEN + record::HEADER_LEN) as u64;

/// The most bytes searched for a resync point in one go where no marker bounds the search
/// (a damaged journal of format 1-3); past it the rest counts as damaged.
const MAX_RESYNC_WINDOW: u64 = 256 << 20;

/// What recovery may do to a bad tail.
#[derive(Clone, Copy)]
pub(super) enum Cut {
    /// Report it only (read-only opens).
    Never,
    /// Cut it if a crash could have torn it; refuse damage.
    Tail,
}

/// Media damage: a bad record before the part of the journal a crash could have torn, so the
/// records after it were acknowledged. Opening refuses with this (inside an `io::Error` of
/// kind `InvalidData`; [`Damaged::of`] gets it back) and leaves the file as it is.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Damaged {
    /// The journal file.
    pub path: String,
    /// Offset of the first damaged byte: its position in the journal (over all segments).
    pub offset: u64,
    /// The file that holds that byte and where in it, when the storage knows (a segment).
    pub file: Option<(String, u64)>,
    /// Why the record there was rejected.
    pub reason: String,
    /// Every damaged byte range (`start..end`) from `offset` on.
    pub ranges: Vec<(u64, u64)>,
    /// Intact records after the first damage (commit markers not counted).
    pub intact_after: u64,
    /// Devices whose records were destroyed or cannot be applied, by id (or `#num` when
    /// even the device's provisioning record is gone).
    pub devices: Vec<Affected>,
    /// Plugin-version and provisioning records that were destroyed and that salvage rebuilds
    /// (from their damaged bytes, unverified, or as placeholders), so that the records that
    /// depend on them are kept.
    pub rebuilt: Vec<String>,
    /// Damaged ranges in which no record could be recognized at all: if the last records of
    /// a device were there, their seqs cannot be known.
    pub unrecognized: usize,
    /// Byte ranges (`start..end`) the storage failed to read (an I/O error such as `EIO`: a
    /// bad sector). They read as damaged bytes and salvage skips them like any others.
    pub unreadable: Vec<(u64, u64)>,
    /// The journal's first position still stored. Past 0, retention deleted its first
    /// segments, and salvage, which reads a journal from its first record, cannot repair it:
    /// the advice is a backup instead.
    pub retained_from: u64,
}

/// One device that salvage would leave short of records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Affected {
    /// The device's id, or `#num` if its provisioning record is lost too.
    pub device: String,
    /// Seqs known lost, as inclusive ranges.
    pub lost: Vec<(u64, u64)>,
    /// Intact records that cannot be applied any more (their device or plugin version was
    /// recorded in a destroyed record): left out of a salvaged journal, kept in the original.
    pub set_aside: u64,
}

impl Damaged {
    /// The damage report inside an error returned by opening a journal, if that is the cause.
    pub fn of(err: &std::io::Error) -> Option<&Damaged> {
        err.get_ref().and_then(|e| e.downcast_ref::<Damaged>())
    }

    /// Bytes in all damaged ranges.
    pub fn damaged_bytes(&self) -> u64 {
        self.ranges.iter().map(|(a, b)| b - a).sum()
    }
}

impl std::fmt::Display for Damaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = match &self.file {
            Some((file, at)) if (file.as_str(), *at) != (self.path.as_str(), self.offset) => {
                format!(
                    "{file}: damaged record at byte {at} (journal position {})",
                    self.offset
                )
            }
            _ => format!("{}: damaged record at offset {}", self.path, self.offset),
        };
        write!(
            f,
            "{place} ({}): that is media damage, not a torn write \
             (it lies in the part of the file proven durable: before the last commit, or \
             within the length the last clean stop recorded): {} damaged byte(s) in {} \
             range(s), followed by {} intact record(s)",
            self.reason,
            self.damaged_bytes(),
            self.ranges.len(),
            self.intact_after,
        )?;
        if self.devices.is_empty() && self.unrecognized == 0 {
            write!(
                f,
                "; no device lost a seq (the damage hit records salvage can do without)"
            )?;
        } else if self.devices.is_empty() {
            write!(f, "; no device is known to have lost a seq")?;
        } else {
            write!(f, "; devices affected:")?;
            for (i, d) in self.devices.iter().enumerate() {
                if i == 8 {
                    write!(f, " and {} more", self.devices.len() - 8)?;
                    break;
                }
                write!(f, " {}", d.device)?;
                let lost: Vec<String> = d
                    .lost
                    .iter()
                    .map(|(a, b)| {
                        if a == b {
                            a.to_string()
                        } else {
                            format!("{a}-{b}")
                        }
                    })
                    .collect();
                if !lost.is_empty() {
                    write!(f, " (seq {} lost)", lost.join(","))?;
                }
                if d.set_aside > 0 {
                    write!(f, " ({} record(s) unusable)", d.set_aside)?;
                }
                if i + 1 < self.devices.len() {
                    write!(f, ",")?;
                }
            }
        }
        if !self.unreadable.is_empty() {
            let bytes: u64 = self.unreadable.iter().map(|(a, b)| b - a).sum();
            write!(
                f,
                "; {bytes} byte(s) could not be read at all (I/O error) from offset {}",
                self.unreadable[0].0
            )?;
        }
        if !self.rebuilt.is_empty() {
            write!(f, "; salvage would rebuild: {}", self.rebuilt.join("; "))?;
        }
        if self.unrecognized > 0 {
            write!(
                f,
                "; {} damaged range(s) hold no recognizable record: seqs of a device's last \
                 records there cannot be known",
                self.unrecognized
            )?;
        }
        if self.retained_from > 0 {
            return write!(
                f,
                ". Refusing to open. Keep a copy of the data directory; retention deleted this \
                 journal's history before position {}, and `drover serve --salvage` reads a \
                 journal from its first record, so it cannot repair this one: restore the data \
                 directory from a backup",
                self.retained_from
            );
        }
        write!(
            f,
            ". Refusing to open. Keep a copy of the file; `drover serve --salvage` keeps every \
             intact record, marks the lost seqs so they are never reused, and keeps the \
             original as journal.log.damaged-{}",
            self.offset
        )
    }
}

impl std::error::Error for Damaged {}

/// What [`salvage`] did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Salvaged {
    /// The damage found (what opening without salvage refused).
    pub damage: Damaged,
    /// Intact records kept from after the damage.
    pub kept: u64,
    /// Seqs marked lost (kind-8 records), over all devices.
    pub lost_seqs: u64,
    /// Where the original file was kept.
    pub original: PathBuf,
}

/// A commit marker found in the file.
#[derive(Debug, Clone, Copy)]
struct Marker {
    batch_start: u64,
    /// The marker's own offset.
    at: u64,
    end: u64,
    /// An empty batch's marker (`batch_start` is its own offset): a clean close or an idle
    /// writer's.
    empty: bool,
}

/// The valid prefix of the file and where (and why) it ends.
struct Prefix {
    index: Index,
    format: u32,
    /// Where records start (after the file header, if any).
    start: u64,
    file_len: u64,
    /// End of the valid prefix: the bad record's offset, or `file_len`.
    end: u64,
    records: u64,
    /// Why the record at `end` was rejected, and whether it looked cut short.
    bad: Option<(String, bool)>,
    last_marker: Option<Marker>,
    /// What the last clean close recorded, if anything.
    checkpoint: Option<Checkpoint>,
    /// The file header failed its checksum (its records were read as this build's format).
    bad_header: bool,
    /// The index checkpoint's position, if the scan started there.
    from_checkpoint: Option<u64>,
}

/// What a read-only open reads before it lists the segments: the last clean close's
/// checkpoint and the index checkpoint, with the runs it names opened.
///
/// A live server writes either only once the bytes it covers are in the segments, so read
/// first, neither claims more than the listing that follows holds. Read after, they could:
/// a busy server with small segments and frequent index checkpoints moves its checkpoint on
/// within the time a listing of thousands of segments takes, and every retry of the open
/// then saw a checkpoint past its listing (a journal cut short, or one retention shortened
/// that cannot open from its checkpoint: both refused as damage).
pub(super) struct ReadFirst {
    checkpoint: Option<Checkpoint>,
    index: std::io::Result<Option<Found>>,
    /// The index checkpoint file as it was when read.
    pub(super) watch: IndexWatch,
}

/// The index checkpoint file as a read-only open read it: whether a live server replaced
/// it since (and so may have deleted, by retention, what the one read needs).
#[derive(Clone)]
pub(super) struct IndexWatch {
    file: PathBuf,
    stamp: Option<FileStamp>,
}

impl IndexWatch {
    pub(super) fn changed(&self) -> bool {
        stamp_of(&self.file) != self.stamp
    }
}

/// What tells one version of a file from the next: it is replaced whole by a rename.
type FileStamp = (u64, u64, Option<std::time::SystemTime>);

fn stamp_of(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.ino(), meta.len(), meta.modified().ok()))
}

/// How many times [`ReadFirst::read`] reads the index checkpoint again when the runs it
/// names were deleted before it could open them.
const RUN_RACES: u32 = 8;

impl ReadFirst {
    /// Reads them for the journal whose first file is `origin`.
    pub(super) fn read(origin: &Path) -> ReadFirst {
        let index_dir = side_file(origin, "index");
        let checkpoints =
            Checkpoints::new(&index_dir, super::index_checkpoint::INDEX_CHECKPOINT_EVERY);
        let index_file = index_dir.join(super::index_checkpoint::FILE);
        let checkpoint = read_checkpoint_of(origin);
        let mut tries = 0;
        loop {
            let stamp = stamp_of(&index_file);
            let index = checkpoints.read();
            tries += 1;
            // A live server wrote a newer checkpoint and merged away the runs this one names
            // between the two reads: read the newer one.
            if tries < RUN_RACES
                && let Ok(Some(found)) = &index
                && found.runs_missing()
                && stamp_of(&index_file) != stamp
            {
                continue;
            }
            return ReadFirst {
                checkpoint,
                index,
                watch: IndexWatch {
                    file: index_file,
                    stamp,
                },
            };
        }
    }
}

/// Scans the journal from the start, building the index; cuts a torn tail and refuses damage
/// (see the module docs).
pub(super) fn recover(
    storage: &dyn StorageBackend,
    cut: Cut,
    spill: Option<Arc<Spill>>,
    first: Option<ReadFirst>,
) -> std::io::Result<(Index, Recovery)> {
    let tolerant = Tolerant::new(storage);
    let storage: &dyn StorageBackend = &tolerant;
    let damaged = |tail: &Tail, offset: u64, reason: String| {
        let mut damage = tail.damage(storage, offset, reason);
        damage.unreadable = tolerant.unreadable();
        std::io::Error::new(std::io::ErrorKind::InvalidData, damage)
    };
    let prefix = scan_prefix(storage, matches!(cut, Cut::Tail), spill, true, first)?;
    let confirmed_len = match prefix.last_marker {
        // The last batch in the file is proven durable by nothing after it.
        Some(m) if m.end >= prefix.end => m.batch_start,
        Some(m) => m.end,
        None => prefix.end,
    };
    let closed_cleanly = prefix.bad.is_none()
        && prefix
            .last_marker
            .is_some_and(|m| m.end == prefix.end && m.empty);
    let mut recovery = Recovery {
        records: prefix.records,
        valid_len: prefix.end,
        confirmed_len,
        closed_cleanly,
        format: prefix.format,
        from_checkpoint: prefix.from_checkpoint,
        ..Recovery::default()
    };
    let cut_short = prefix
        .checkpoint
        .as_ref()
        .is_some_and(|c| c.cut_short(prefix.file_len));
    if prefix.bad_header {
        let (mut tail, _) = scan_tail(storage, &prefix, None)?;
        if torn_after_bad_header(&prefix, &tail, tolerant.unreadable().is_empty()) {
            // Only the header is damage; the bad tail is a crash's, which salvage drops.
            tail = Tail::default();
        }
        let mut damage = tail.damage(
            storage,
            8,
            "the file header is damaged (checksum mismatch)".to_string(),
        );
        damage.ranges.insert(0, (8, record::FILE_HEADER_LEN as u64));
        damage.intact_after += prefix.records;
        damage.unreadable = tolerant.unreadable();
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, damage));
    }
    let Some((reason, torn)) = prefix.bad.clone() else {
        if cut_short {
            let (tail, _) = scan_tail(storage, &prefix, None)?;
            return Err(damaged(
                &tail,
                prefix.end,
                cut_short_reason(storage, &prefix),
            ));
        }
        let mut index = prefix.index;
        index.durable_len = prefix.end;
        index.last_marker = prefix
            .last_marker
            .filter(|m| m.end == prefix.end)
            .map(|m| MarkerAt {
                batch_start: m.batch_start,
                at: m.at,
                end: m.end,
                synced: true,
            });
        return Ok((index, recovery));
    };
    let offset = prefix.end;
    let file_len = prefix.file_len;
    let (tail, _) = scan_tail(storage, &prefix, None)?;
    // Bytes the disk cannot read are never a torn write, wherever they are: cutting them
    // would drop records that may have been acknowledged.
    let unreadable = !tolerant.unreadable().is_empty();
    if offset < tearable_from(&prefix, &tail) || cut_short || unreadable {
        let reason = if cut_short {
            format!("{reason}; {}", cut_short_reason(storage, &prefix))
        } else if unreadable {
            format!("{reason}; part of the file cannot be read (I/O error)")
        } else {
            reason
        };
        return Err(damaged(&tail, offset, reason));
    }
    let mut index = prefix.index;
    index.durable_len = offset;
    let dropped = file_len - offset;
    if matches!(cut, Cut::Never) {
        recovery.dropped = Some(DroppedTail {
            offset,
            bytes: dropped,
            reason,
            torn,
            saved_to: storage.path().map(Path::to_path_buf),
        });
        return Ok((index, recovery));
    }
    let saved_to = match storage.path() {
        Some(path) => {
            let saved_to = side_file(path, &format!("dropped-{offset}"));
            // Streamed, so a large tail does not need to fit in memory.
            let saved = File::create(&saved_to).and_then(|mut saved| {
                let mut source = SeqReader {
                    backend: storage,
                    pos: offset,
                    len: file_len,
                };
                std::io::copy(&mut source, &mut saved)?;
                saved.sync_all()
            });
            match saved {
                Ok(()) => Some(saved_to),
                // The tail is a torn write, never acknowledged: its copy is for the curious.
                // On a full disk the copy cannot be written, and the cut is what frees the
                // space; refusing the start for it kept a crashed server down until an
                // operator freed space by hand.
                Err(e) => {
                    let _ = std::fs::remove_file(&saved_to);
                    tracing::warn!(
                        file = %saved_to.display(),
                        offset,
                        bytes = dropped,
                        error = %e,
                        "cannot save a copy of the torn tail (never acknowledged); cutting it all the same"
                    );
                    None
                }
            }
        }
        None => None,
    };
    storage.set_len(offset)?;
    if prefix.format >= writer::MARKERS_FROM {
        // What is left was acknowledged: close it with an empty batch's marker, or a later
        // open would take its last batch for the tearable one again.
        let mut marker = Vec::new();
        Record::Commit {
            offset,
            batch_start: offset,
        }
        .encode_into(&mut marker);
        storage.write_all_at(&marker, offset)?;
        storage.sync_data()?;
        index.durable_len = offset + marker.len() as u64;
        index.last_marker = Some(MarkerAt {
            batch_start: offset,
            at: offset,
            end: index.durable_len,
            synced: true,
        });
        recovery.valid_len = index.durable_len;
        recovery.confirmed_len = offset;
    }
    if let Some(dir) = storage.path().and_then(Path::parent) {
        super::segments::sync_dir(dir)?;
    }
    tracing::warn!(
        offset,
        dropped,
        %reason,
        saved_to = ?saved_to,
        "journal: the last commit was torn, as a crash before it was durable leaves it: its tail, not acknowledged, was cut and not applied (damage to a durable last commit would read the same: its bytes are kept in saved_to)"
    );
    recovery.dropped = Some(DroppedTail {
        offset,
        bytes: dropped,
        reason,
        torn,
        saved_to,
    });
    Ok((index, recovery))
}

/// Rewrites a damaged journal at `path` keeping every intact record (see the module docs), or
/// does nothing (`Ok(None)`) if the journal has no damage a normal open would refuse. Crash
/// safe: the new journal is written beside the old one, synced, its checkpoint written, and
/// renamed over the old one; the original stays as `journal.log.damaged-<offset>` (a hard
/// link made before the rename).
pub fn salvage(path: &Path) -> std::io::Result<Option<Salvaged>> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let segments = SegmentedBackend::list(dir)?;
    if segments.is_empty() {
        return Ok(None);
    }
    if segments[0].first > 0 {
        // Deleted by retention (it recorded where the journal now begins), or lost.
        let begins = segments[0].first;
        let why = match super::segments::retained_floor(dir) {
            Ok(Some(floor)) if floor >= begins => {
                "retention deleted this one's first segments".to_string()
            }
            Ok(Some(floor)) if floor > 0 => format!(
                "retention deleted this one's segments before position {floor}, and those from \
                 there to position {begins} are missing"
            ),
            Ok(Some(_)) => "this one's first segment (`journal.log`, or the segments that began \
                 it) is missing, and retention deleted none"
                .to_string(),
            _ => format!(
                "this one's first segments, before position {begins}, are missing (deleted by \
                 retention, if its record of where the journal begins, `journal.retained`, was \
                 lost too; or lost)"
            ),
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!(
                "salvage reads a journal from its first record, and {why}: restore the data \
                 directory from a backup instead"
            ),
        ));
    }
    finish_interrupted_salvage(path, &segments)?;
    // A damaged segment header (its records may all be intact) or a missing segment refuses
    // a normal open: read past them here (the missing positions as unreadable bytes), and
    // rewrite the journal even if no record is damaged.
    let mut tolerated = Vec::new();
    let source = SegmentedBackend::open_for_salvage(dir, &mut tolerated)?;
    for (_, why) in &tolerated {
        tracing::warn!(damage = %why, "journal salvage: reading past a damaged segment header (at the position its file name gives) or a missing segment (as unreadable bytes)");
    }
    salvage_from_with(&source, path, tolerated.first().cloned())
}

/// Finishes a salvage killed after its new `journal.log` (every intact record of every
/// segment) was in place but before it moved the later segments aside: it moves them aside
/// now, as the salvage would have (`*.damaged-interrupted-<ms>`). Such a directory refused a
/// normal open and `--salvage` alike, with only a hand to move the files (a review killed a
/// salvage at 0.3 s). Nothing else writes a `journal.log` that reaches past the next
/// segment's first position.
///
/// Found by its [`SALVAGE_MOVING`] mark, or, for a salvage by an earlier build, by a
/// `journal.log` that reaches past the next segment's first position. That alone missed a
/// salvage that dropped damaged bytes, whose new file ends before the last segments: a
/// review killed one with two segments left, and the next salvage read their records again,
/// a snapshot taken after a lost seq among them, so a device's state differed rebuilt from
/// it or from `init`.
fn finish_interrupted_salvage(path: &Path, segments: &[SegmentInfo]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let moving = side_file(path, SALVAGE_MOVING);
    let marked = moving.exists();
    if marked && side_file(path, "salvage").exists() {
        // Killed before its new journal was renamed into place: the old one is whole, and
        // this salvage starts over.
        std::fs::remove_file(&moving)?;
        super::segments::sync_dir(dir)?;
        return Ok(());
    }
    let past_next =
        matches!(segments, [first, next, ..] if first.first == 0 && first.len > next.first);
    if !marked && !past_next {
        return Ok(());
    }
    let suffix = format!("damaged-interrupted-{}", wall_ms());
    let later: Vec<&SegmentInfo> = segments.iter().filter(|s| s.first > 0).collect();
    for segment in &later {
        std::fs::rename(&segment.path, side_file(&segment.path, &suffix))?;
    }
    super::segments::sync_dir(dir)?;
    if marked {
        std::fs::remove_file(&moving)?;
        super::segments::sync_dir(dir)?;
    }
    tracing::warn!(
        journal_log_ends = segments.first().map_or(0, |s| s.len),
        moved = later.len(),
        suffix,
        "journal salvage: an earlier salvage was interrupted after writing its new journal.log, \
         which holds every intact record; the segment files after it are moved aside as it \
         would have moved them"
    );
    Ok(())
}

/// The mark a salvage leaves (synced) from just before it renames its new `journal.log` into
/// place until it has moved every later segment aside: a crash in between leaves segment
/// files the new journal already holds the records of, which only a salvage may move.
pub(super) const SALVAGE_MOVING: &str = "salvage-moving";

/// [`salvage`], reading the damaged journal through `source` (the file at `path`, or a test's
/// view of it that fails on command); what is written goes beside `path`.
#[cfg(test)]
pub(super) fn salvage_from(
    source: &dyn StorageBackend,
    path: &Path,
) -> std::io::Result<Option<Salvaged>> {
    salvage_from_with(source, path, None)
}

/// [`salvage_from`], rewriting the journal for `forced` (what
/// [`SegmentedBackend::open_for_salvage`] read past, and the journal position it is at: a
/// damaged segment header, a missing segment) even when every record that is there reads
/// back intact.
fn salvage_from_with(
    source: &dyn StorageBackend,
    path: &Path,
    forced: Option<(u64, String)>,
) -> std::io::Result<Option<Salvaged>> {
    let tolerant = Tolerant::new(source);
    let storage = &tolerant;
    // Every record: salvage must see all the damage.
    let prefix = scan_prefix(storage, false, None, false, None)?;
    let cut_short = prefix
        .checkpoint
        .as_ref()
        .is_some_and(|c| c.cut_short(prefix.file_len));
    let reason = match prefix.bad.clone() {
        Some((reason, _)) => reason,
        None if cut_short => cut_short_reason(storage, &prefix),
        None if prefix.bad_header => "the file header is damaged (checksum mismatch)".into(),
        None => match &forced {
            Some((_, why)) => why.clone(),
            None => return Ok(None),
        },
    };
    let offset = prefix.end;
    let tmp = side_file(path, "salvage");
    let mut out = Output {
        file: BufWriter::with_capacity(1 << 20, File::create(&tmp)?),
        pos: 0,
    };
    // A header-less format-1 file gains a header: every later offset moves by its size (its
    // records hold no offsets: it has no markers).
    out.write(&record::file_header_of(FORMAT_VERSION))?;
    let mut copied = SeqReader {
        backend: storage,
        pos: prefix.start,
        len: offset,
    };
    out.pos += std::io::copy(&mut copied, &mut out.file)?;
    let (tail, shadow) = if prefix.bad_header
        && torn_after_bad_header(
            &prefix,
            &scan_tail(storage, &prefix, None)?.0,
            tolerant.unreadable().is_empty(),
        ) {
        // The header is the damage; after the intact records comes a crash's torn tail,
        // never acknowledged: left out (the original keeps it), like a normal open cuts it.
        (Tail::default(), prefix.index.clone())
    } else {
        scan_tail(storage, &prefix, Some(&mut out))?
    };
    let unreadable = tolerant.unreadable();
    if offset >= tearable_from(&prefix, &tail)
        && !cut_short
        && unreadable.is_empty()
        && !prefix.bad_header
        && forced.is_none()
    {
        // A torn tail, not damage: the normal open cuts it.
        drop(out);
        std::fs::remove_file(&tmp)?;
        return Ok(None);
    }
    // The marker of an empty batch: the file is synced before it is used, so everything
    // before the marker is durable and none of it is tearable.
    let mut marker = Vec::new();
    Record::Commit {
        offset: out.pos,
        batch_start: out.pos,
    }
    .encode_into(&mut marker);
    out.write(&marker)?;
    let out_len = out.pos;
    let file = out.file.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);

    // The first damaged byte: the header's, if that is where the damage is, or where what
    // the segments' open read past is (a damaged segment header lies before every record
    // of its segment, which the scan, reading at the positions the file names give, finds
    // intact: it ends at the end of the journal).
    let first = match &forced {
        _ if prefix.bad_header => 8,
        Some((at, _)) => offset.min(*at),
        None => offset,
    };
    // Only a header damaged (the file's, or a segment's read past): nothing is lost, and the
    // scan's count of records kept after the damage (it found none) says nothing.
    let header_only = (forced.is_some() || prefix.bad_header)
        && prefix.bad.is_none()
        && !cut_short
        && tail.lost_seqs == 0
        && unreadable.is_empty();
    let mut damage = tail.damage(storage, first, reason);
    damage.unreadable = unreadable;
    if prefix.bad_header {
        damage.ranges.insert(0, (8, record::FILE_HEADER_LEN as u64));
    }
    let mut original = side_file(path, &format!("damaged-{first}"));
    if original.exists() {
        original = side_file(path, &format!("damaged-{first}-{}", wall_ms()));
    }
    std::fs::hard_link(path, &original)?;
    // The checkpoint of the new file, before it is in place: with the old file (a crash
    // before the rename) it still refuses to open (the old file is shorter than the new one,
    // or damaged), and after the rename the two agree.
    write_checkpoint(path, &shadow, out_len)?;
    // The index checkpoint describes the old file: gone before the new one is in place.
    let index_dir = side_file(path, "index");
    match std::fs::remove_file(index_dir.join(super::index_checkpoint::FILE)) {
        Ok(()) => File::open(&index_dir)?.sync_all()?,
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let moving = side_file(path, SALVAGE_MOVING);
    File::create(&moving)?.sync_all()?;
    super::segments::sync_dir(dir)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&moving);
        return Err(e);
    }
    // The new `journal.log` holds every segment's intact records: the later segments are
    // kept aside with the original. (A crash before they are all moved leaves the mark: the
    // open refuses, saying so, the next salvage finishes the move, and nothing is lost.)
    for segment in SegmentedBackend::list(dir)? {
        if segment.first > 0 {
            let aside = side_file(&segment.path, &format!("damaged-{first}"));
            std::fs::rename(&segment.path, aside)?;
        }
    }
    super::segments::sync_dir(dir)?;
    std::fs::remove_file(&moving)?;
    super::segments::sync_dir(dir)?;
    let salvaged = Salvaged {
        kept: tail.intact - tail.set_aside,
        lost_seqs: tail.lost_seqs,
        damage,
        original,
    };
    if header_only {
        tracing::warn!(
            offset = first,
            original = %salvaged.original.display(),
            "journal salvaged: only a header was damaged (the journal file's, or a segment's, \
             read at the position its file name gives); every record kept, none lost"
        );
    } else {
        tracing::warn!(
            offset = first,
            damaged_bytes = salvaged.damage.damaged_bytes(),
            kept_after_damage = salvaged.kept,
            lost_seqs = salvaged.lost_seqs,
            original = %salvaged.original.display(),
            "journal salvaged: media damage skipped, every intact record kept, lost seqs marked"
        );
    }
    Ok(Some(salvaged))
}

/// Wall-clock milliseconds, for when a salvage ran (the journal imports nothing of the crate,
/// so not through `clock`).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(super) fn side_file(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(FILE_NAME);
    path.with_file_name(format!("{name}.{suffix}"))
}

/// With a damaged header: whether the records end in a bad tail that a crash could have torn
/// (and no byte was unreadable), so the header is the only damage.
fn torn_after_bad_header(prefix: &Prefix, tail: &Tail, readable: bool) -> bool {
    let cut_short = prefix
        .checkpoint
        .as_ref()
        .is_some_and(|c| c.cut_short(prefix.file_len));
    prefix.bad.is_some() && prefix.end >= tearable_from(prefix, tail) && !cut_short && readable
}

/// Where the part of the file a crash could have torn begins (see the module docs).
fn tearable_from(prefix: &Prefix, tail: &Tail) -> u64 {
    let checkpointed = prefix.checkpoint.as_ref().map_or(0, |c| c.len);
    checkpointed.max(match tail.last_marker.or(prefix.last_marker) {
        Some(m) if m.end >= prefix.file_len => m.batch_start,
        Some(m) => m.end,
        None => prefix
            .file_len
            .saturating_sub(MAX_TORN_BYTES)
            .max(prefix.start),
    })
}

/// Why a journal shorter than its last checkpoint recorded is refused. It names the file the
/// journal now ends in: either that file was cut, or the segment files after it are gone (a
/// deleted newest segment used to read as if the one before it were damaged).
fn cut_short_reason(storage: &dyn StorageBackend, prefix: &Prefix) -> String {
    let was = prefix.checkpoint.as_ref().map_or(0, |c| c.len);
    let ends = prefix.file_len;
    let checkpoints = "journal.log.checkpoint, or journal.log.index/checkpoint";
    match storage.file_of(ends.saturating_sub(1)) {
        Some((file, byte)) => format!(
            "the journal ends at position {ends}, the end of {} ({} bytes), but was {was} long \
             at its last checkpoint ({checkpoints}): that file was cut short, or segment files \
             after it are missing (if the data directory was restored from a backup on purpose, \
             remove those two checkpoints first)",
            file.display(),
            byte + u64::from(ends > 0),
        ),
        None => format!(
            "the journal is {ends} bytes long but was {was} at its last checkpoint \
             ({checkpoints}): it was cut short (if it was restored from a backup on purpose, \
             remove those two first)"
        ),
    }
}

/// Scans the journal into an index; from the index checkpoint on, if `from_index_checkpoint`
/// and there is one it can trust. A writable open (`writable`) writes a missing header, and
/// with `spill`, tidies the index's directory.
fn scan_prefix(
    storage: &dyn StorageBackend,
    writable: bool,
    spill: Option<Arc<Spill>>,
    from_index_checkpoint: bool,
    first: Option<ReadFirst>,
) -> std::io::Result<Prefix> {
    // An index checkpoint saves scanning what came before it (see
    // `journal/index_checkpoint.rs`); the scrub reads that part later. A read-only open (no
    // spill) uses one too, and leaves the directory as it is.
    let read_only = match (&spill, storage.path()) {
        (None, Some(path)) if !writable => Some(Checkpoints::new(
            &side_file(path, "index"),
            super::index_checkpoint::INDEX_CHECKPOINT_EVERY,
        )),
        _ => None,
    };
    let checkpoints = match (&spill, &read_only) {
        (Some(spill), _) if writable => Some(&spill.checkpoints),
        (None, Some(checkpoints)) => Some(checkpoints),
        _ => None,
    };
    // Before the length: a server closing cleanly meanwhile writes its checkpoint after its
    // last bytes, so a checkpoint read first never claims more than the length read next.
    // An index checkpoint proves its position durable just as well: the longer one counts.
    // A read-only open read both before it listed the segments (see [`ReadFirst`]).
    let (mut checkpoint, image) = match first {
        Some(first) => (first.checkpoint, checkpoints.map(|_| first.index)),
        None => (read_checkpoint(storage), checkpoints.map(|c| c.read())),
    };
    let file_len = storage.size()?;
    if let Some(Ok(Some(image))) = &image
        && file_len < record::FILE_HEADER_LEN as u64
    {
        // Not even a header: an index checkpoint says how long it was (checked below, once
        // the header is read, for longer files). Before the header is written afresh.
        if let Some(b) = Checkpoints::as_clean_close(
            image.image(),
            storage,
            record::FILE_HEADER_LEN as u64,
            file_len,
        ) && checkpoint.as_ref().is_none_or(|a| b.len > a.len)
        {
            checkpoint = Some(b);
        }
    }
    let mut bad_header = false;
    // Retention deleted the first segments (`journal/retention.rs`): the file header went
    // with them (only a current-format journal deletes anything), and only an index
    // checkpoint can open what is left.
    let retained = storage.retained_from();
    let header = if retained > 0 {
        record::FileHeader::Present {
            format: match &image {
                Some(Ok(Some(image))) => image.image().journal_format(),
                _ => FORMAT_VERSION,
            },
        }
    } else {
        record::read_file_header(storage, file_len)?
    };
    let (start, format) = match header {
        record::FileHeader::Present { format } => (record::FILE_HEADER_LEN as u64, format),
        record::FileHeader::Damaged => {
            // Which format the header named is lost; the records tell (every format since 2
            // reads as this build's), and the damage is reported like any other.
            bad_header = true;
            (record::FILE_HEADER_LEN as u64, FORMAT_VERSION)
        }
        record::FileHeader::Legacy => (0, 1),
        record::FileHeader::Missing => {
            // New (or never got past writing its header): write it, unless read-only or the
            // last clean stop's checkpoint says the file was longer (it was cut: refused
            // below, and left as it was found).
            let cut = checkpoint.as_ref().is_some_and(|c| c.cut_short(file_len));
            if writable && !cut {
                storage.set_len(0)?;
                storage.write_all_at(&record::file_header(), 0)?;
                storage.sync_data()?;
                (record::FILE_HEADER_LEN as u64, FORMAT_VERSION)
            } else {
                (0, FORMAT_VERSION)
            }
        }
    };
    let file_len = file_len.max(start);
    let image = match image {
        Some(Ok(Some(image))) => {
            // An index checkpoint of this journal proves its position durable just as well:
            // the longer of the two counts for a file cut short.
            if let Some(b) = Checkpoints::as_clean_close(image.image(), storage, start, file_len)
                && checkpoint.as_ref().is_none_or(|a| b.len > a.len)
            {
                checkpoint = Some(b);
            }
            Ok(Some(image))
        }
        Some(other) => other,
        None => Ok(None),
    };
    let mut index = Index {
        spill: spill.clone(),
        ..Index::default()
    };
    let mut offset = start;
    let mut last_marker = None;
    let mut from_checkpoint = None;
    // Why the index checkpoint was not used, for a journal that cannot open without it.
    let mut unusable: Option<String> = None;
    if let Some(checkpoints) = checkpoints.filter(|_| from_index_checkpoint) {
        let cut = checkpoint.as_ref().is_some_and(|c| c.cut_short(file_len));
        // `every == 0`: checkpoints are off; one left by an earlier run is not used either.
        let usable = checkpoints.every > 0 && !(bad_header || cut || format < writer::MARKERS_FROM);
        if let Some(c) = checkpoint.as_ref().filter(|_| cut) {
            unusable = Some(format!(
                "the journal is {file_len} bytes long but was {} when a checkpoint last \
                 recorded it: its last segment was cut short or damaged, or segment files \
                 after it are missing",
                c.len
            ));
        } else if bad_header {
            unusable = Some("the journal's file header is damaged".to_string());
        }
        let loaded = match image {
            Ok(Some(image)) if usable => checkpoints
                .load(image, storage, format, start, file_len, spill.as_ref())
                .map(Some),
            Ok(_) => Ok(None),
            Err(e) => Err(e),
        };
        let tidy = |keep: &[String]| {
            // A retained journal that cannot use its checkpoint refuses to open (below): its
            // index files are all it has, kept as they are for whoever restores it.
            if let Some(spill) = &spill
                && (retained == 0 || !keep.is_empty())
            {
                spill.tidy(keep);
            }
        };
        match loaded {
            Ok(Some(loaded)) => {
                let mut keep = loaded.keep;
                keep.push(super::index_checkpoint::FILE.to_string());
                tidy(&keep);
                tracing::info!(
                    at = loaded.at,
                    devices = loaded.index.devices.len(),
                    "journal: index checkpoint loaded; scanning only the records after it"
                );
                last_marker = Some(Marker {
                    batch_start: loaded.marker.batch_start,
                    at: loaded.marker.at,
                    end: loaded.marker.end,
                    empty: loaded.marker.batch_start == loaded.marker.at,
                });
                offset = loaded.at;
                from_checkpoint = Some(loaded.at);
                index = loaded.index;
                if spill.is_some() {
                    index.scrub = Some(super::scrub::Plan {
                        from_start: loaded.scrubbed.max(retained) <= start,
                        start: loaded.scrubbed.max(start).max(retained),
                        end: loaded.at,
                        seqs: loaded.seqs,
                        versions: index.versions.len() as u32,
                        next_num: index.next_num,
                    });
                }
            }
            // A file cut short: refused below, with the checkpoint kept as evidence.
            Ok(None) if cut => {}
            Ok(None) => {
                if usable {
                    unusable.get_or_insert_with(|| "there is none".to_string());
                }
                tidy(&[]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                tracing::warn!(error = %e, "journal: index checkpoint not trusted; scanning the whole journal");
                unusable.get_or_insert_with(|| format!("it is not trusted: {e}"));
                tidy(&[]);
            }
            // It could not be read (a transient error): scan, but leave it for the next open.
            Err(e) => {
                tracing::warn!(error = %e, "journal: index checkpoint unreadable; scanning the whole journal");
                unusable.get_or_insert_with(|| format!("it could not be read: {e}"));
            }
        }
    }
    if retained > 0 && from_checkpoint.is_none() {
        let off = checkpoints.is_none_or(|c| c.every == 0);
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            if off && spill.is_some() {
                format!(
                    "the journal's history before position {retained} was deleted by its \
                     retention policy, so it opens only from its index checkpoint, and index \
                     checkpoints are turned off (--index-checkpoint-bytes 0): start without \
                     that setting"
                )
            } else {
                format!(
                    "the journal's history before position {retained} was deleted by its \
                     retention policy, so it opens only from its index checkpoint \
                     (journal.log.index/checkpoint), which is not usable: {}; restore the data \
                     directory from a backup",
                    unusable.as_deref().unwrap_or("see the log above for why")
                )
            },
        ));
    }
    let mut cursor = Cursor::new(storage, offset, file_len).heads_only();
    let bad = loop {
        if offset == file_len {
            break None;
        }
        let record = match cursor.next() {
            Ok(r) => r,
            Err(bad) => break Some(bad),
        };
        let len = cursor.last_len();
        if let Record::Commit {
            offset: at,
            batch_start,
        } = record
        {
            if at != offset || batch_start > offset {
                break Some(("commit marker out of place".to_string(), false));
            }
            last_marker = Some(Marker {
                batch_start,
                at: offset,
                end: offset + len,
                empty: batch_start == offset,
            });
        } else {
            match index.effect_of(&record) {
                Ok(effect) => {
                    index.apply(effect, offset);
                    if index.wants_spill() {
                        index.spill_now();
                    }
                }
                Err(e) => break Some((e.to_string(), false)),
            }
        }
        offset += len;
    };
    Ok(Prefix {
        records: index.records,
        index,
        format,
        start,
        file_len,
        end: offset,
        bad,
        last_marker,
        checkpoint,
        bad_header,
        from_checkpoint,
    })
}

/// Reads records one after another through a large buffer.
pub(super) struct Cursor<'a> {
    reader: BufReader<SeqReader<'a>>,
    storage: &'a dyn StorageBackend,
    len: u64,
    buf: Vec<u8>,
    /// The framed length of the record returned last (in `buf`, unless `heads`).
    last: u64,
    /// Decode only what the index needs ([`Record::decode_head`]): the prefix scan.
    heads: bool,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(storage: &'a dyn StorageBackend, pos: u64, len: u64) -> Cursor<'a> {
        Cursor {
            reader: BufReader::with_capacity(
                1 << 20,
                SeqReader {
                    backend: storage,
                    pos,
                    len,
                },
            ),
            storage,
            len,
            buf: Vec::new(),
            last: 0,
            heads: false,
        }
    }

    /// Returns only what the index needs of events and snapshots (their payloads empty),
    /// checked as strictly.
    pub(super) fn heads_only(mut self) -> Cursor<'a> {
        self.heads = true;
        self
    }

    fn seek(&mut self, pos: u64) {
        let heads = self.heads;
        *self = Cursor::new(self.storage, pos, self.len);
        self.heads = heads;
    }

    /// The framed length of the record `next` returned last.
    pub(super) fn last_len(&self) -> u64 {
        self.last
    }

    fn decode(&self, framed: &[u8]) -> Result<Record, (String, bool)> {
        let decoded = if self.heads {
            Record::decode_head(framed)
        } else {
            Record::decode(framed)
        };
        decoded
            .map(|(r, _)| r)
            .map_err(|e| (e.to_string(), matches!(e, DecodeError::Torn(_))))
    }

    /// The next record, or why the bytes there are not one (and whether they look cut short).
    pub(super) fn next(&mut self) -> Result<Record, (String, bool)> {
        let pos = self.reader.get_ref().pos - self.reader.buffer().len() as u64;
        // Most records sit whole in the read buffer: the prefix scan decodes them where they
        // are. (The tail scan copies each into `buf`: salvage writes those bytes out.)
        let buffered = self.reader.buffer();
        if self.heads && buffered.len() >= record::HEADER_LEN {
            let header: [u8; record::HEADER_LEN] = buffered[..record::HEADER_LEN]
                .try_into()
                .map_err(|_| ("short header".to_string(), true))?;
            let len = record::body_len(&header).map_err(|e| (e.to_string(), false))?;
            let framed = record::HEADER_LEN + len;
            if buffered.len() >= framed {
                if pos + framed as u64 > self.len {
                    return Err(("record extends past end of file".into(), true));
                }
                let record = self.decode(&buffered[..framed]);
                self.reader.consume(framed);
                self.last = framed as u64;
                return record;
            }
        }
        let mut header = [0u8; record::HEADER_LEN];
        if let Err(e) = self.reader.read_exact(&mut header) {
            return Err((format!("short header: {e}"), true));
        }
        let len = record::body_len(&header).map_err(|e| (e.to_string(), false))?;
        if pos + (record::HEADER_LEN + len) as u64 > self.len {
            return Err(("record extends past end of file".into(), true));
        }
        self.buf.clear();
        self.buf.extend_from_slice(&header);
        self.buf.resize(record::HEADER_LEN + len, 0);
        if let Err(e) = self.reader.read_exact(&mut self.buf[record::HEADER_LEN..]) {
            return Err((format!("short body: {e}"), true));
        }
        self.last = self.buf.len() as u64;
        self.decode(&self.buf)
    }
}

/// Where salvage writes the rebuilt journal.
struct Output {
    file: BufWriter<File>,
    pos: u64,
}

impl Output {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }
}

/// The smallest framed record that can carry a seq (an event with an empty body is ~15 bytes):
/// how many records a number of damaged bytes can have held, at most.
const MIN_RECORD_BYTES: u64 = 16;

/// Writes `record` to the salvaged journal, if salvaging.
fn emit(out: &mut Option<&mut Output>, record: &Record) -> std::io::Result<()> {
    if let Some(out) = out.as_deref_mut() {
        let mut bytes = Vec::new();
        record.encode_into(&mut bytes);
        out.write(&bytes)?;
    }
    Ok(())
}

/// What lies after the first bad record.
#[derive(Default)]
struct Tail {
    ranges: Vec<(u64, u64)>,
    /// Records read out of damaged ranges without their checksums: unverified.
    guesses: Vec<Record>,
    /// Damaged bytes so far: how many records the damage can have held is what makes a gap
    /// in a device's seqs believable.
    damaged_bytes: u64,
    /// What salvage had to rebuild: plugin versions and devices whose own records were
    /// destroyed (reported; the devices' histories are kept).
    rebuilt: Vec<String>,
    /// Damaged ranges in which no record could be recognized: if a device's last records
    /// were there, nothing says which seqs they had.
    unrecognized: usize,
    /// Device number -> (id, plugin version id), as the last clean close's checkpoint knew.
    known: std::collections::HashMap<u32, CheckpointDevice>,
    /// Intact records (markers not counted), and of those the ones that cannot be applied.
    intact: u64,
    set_aside: u64,
    lost_seqs: u64,
    last_marker: Option<Marker>,
    /// By device number: lost seq ranges and unusable records.
    affected: BTreeMap<u32, (Vec<(u64, u64)>, u64)>,
    /// Ids of devices that were known at some point of the scan.
    names: BTreeMap<u32, Arc<str>>,
}

impl Tail {
    fn damage(&self, storage: &dyn StorageBackend, offset: u64, reason: String) -> Damaged {
        Damaged {
            path: storage
                .path()
                .map_or_else(|| "journal".to_string(), |p| p.display().to_string()),
            offset,
            file: storage
                .file_of(offset)
                .map(|(p, at)| (p.display().to_string(), at)),
            reason,
            ranges: self.ranges.clone(),
            intact_after: self.intact,
            rebuilt: self.rebuilt.clone(),
            unrecognized: self.unrecognized,
            unreadable: Vec::new(),
            retained_from: storage.retained_from(),
            devices: self
                .affected
                .iter()
                .map(|(num, (lost, set_aside))| Affected {
                    device: self
                        .names
                        .get(num)
                        .map_or_else(|| format!("#{num}"), |id| id.to_string()),
                    lost: lost.clone(),
                    set_aside: *set_aside,
                })
                .collect(),
        }
    }

    /// Marks `from..=to` of `device` lost: in the copy of the index, in the report and, when
    /// salvaging, in the new journal.
    fn lose(
        &mut self,
        shadow: &mut Index,
        out: &mut Option<&mut Output>,
        device: u32,
        from: u64,
        to: u64,
        damaged_at: u64,
    ) -> std::io::Result<()> {
        let Some(version) = shadow.devices.get(&device).map(|d| d.version) else {
            return Ok(());
        };
        let (lost, _) = self.affected.entry(device).or_default();
        lost.push((from, to));
        self.lost_seqs += to - from + 1;
        let mut first = from;
        while first <= to {
            let last = to.min(first + MAX_LOST_RUN - 1);
            let record = Record::Lost {
                device,
                from: first,
                to: last,
                version,
                damaged_at,
                at_ms: wall_ms(),
            };
            if let Ok(effect) = shadow.effect_of(&record) {
                shadow.apply(effect, 0);
            }
            if let Some(out) = out.as_deref_mut() {
                let mut bytes = Vec::new();
                record.encode_into(&mut bytes);
                out.write(&bytes)?;
            }
            first = last + 1;
        }
        Ok(())
    }

    /// Makes sure the plugin versions and the device `record` refers to are known, rebuilding
    /// destroyed ones (see [`Tail::ensure_version`], [`Tail::ensure_device`]). Without this,
    /// one damaged plugin-version or provisioning record would take every later record of its
    /// devices with it.
    fn rebuild_dependencies(
        &mut self,
        shadow: &mut Index,
        out: &mut Option<&mut Output>,
        record: &Record,
    ) -> std::io::Result<()> {
        let (version, device) = match record {
            Record::Version { id, .. } => (id.checked_sub(1), None),
            Record::Device { version, .. } => (Some(*version), None),
            Record::Event(e) => (Some(e.version), Some(e.device)),
            Record::Snapshot {
                device, version, ..
            } => (Some(*version), Some(*device)),
            Record::DeadLetter(d) => (Some(d.version), Some(d.device)),
            Record::Lost {
                device, version, ..
            } => (Some(*version), Some(*device)),
            _ => (None, None),
        };
        if let Some(version) = version {
            self.ensure_version(shadow, out, version)?;
        }
        // A record of a device the index does not know: its provisioning record was in the
        // damage (a removed device has no records after its removal).
        if let Some(num) = device
            && !shadow.devices.contains_key(&num)
        {
            self.ensure_device(shadow, out, num, version.unwrap_or(0))?;
        }
        Ok(())
    }

    /// Rebuilds the plugin-version records up to id `version` that are missing: from a guess
    /// read out of the damage if there is one (unverified), else as a placeholder. At most as
    /// many as the damage could have held.
    fn ensure_version(
        &mut self,
        shadow: &mut Index,
        out: &mut Option<&mut Output>,
        version: u32,
    ) -> std::io::Result<()> {
        let limit = (self.damaged_bytes / MIN_RECORD_BYTES + 1) as usize;
        let start = shadow.versions.len();
        while (version as usize) >= shadow.versions.len() && shadow.versions.len() < start + limit {
            let id = shadow.versions.len() as u32;
            let guessed = self.guesses.iter().find_map(|g| match g {
                Record::Version { id: gid, .. } if *gid == id => Some(g.clone()),
                _ => None,
            });
            let (rebuilt, how) = match guessed {
                Some(g) => (g, "from its damaged bytes, unverified"),
                None => (
                    Record::Version {
                        id,
                        plugin: format!("lost-version-{id}"),
                        number: 0,
                        digest: [0; 32],
                        at_ms: 0,
                    },
                    "as a placeholder (upload and deploy a version to run its devices)",
                ),
            };
            let Ok(effect) = shadow.effect_of(&rebuilt) else {
                break;
            };
            shadow.apply(effect, 0);
            self.rebuilt
                .push(format!("plugin version record {id} {how}"));
            emit(out, &rebuilt)?;
        }
        Ok(())
    }

    /// Rebuilds the provisioning record of device `num`: with the id and version the last
    /// clean close's checkpoint knew (verified when written), else from a guess read out of
    /// the damage (unverified), else as a placeholder. Its config is lost unless guessed.
    fn ensure_device(
        &mut self,
        shadow: &mut Index,
        out: &mut Option<&mut Output>,
        num: u32,
        version: u32,
    ) -> std::io::Result<()> {
        let known = self
            .known
            .get(&num)
            .filter(|d| !shadow.devices.contains_id(&d.id))
            .cloned();
        let guessed = self.guesses.iter().find_map(|g| match g {
            Record::Device { num: n, id, .. } if *n == num && !shadow.devices.contains_id(id) => {
                Some(g.clone())
            }
            _ => None,
        });
        let (rebuilt, how) = match (known, guessed) {
            (Some(known), _) => {
                // Written at a clean stop from the index: sure, unlike a guess.
                self.ensure_version(shadow, out, known.version)?;
                (
                    Record::Device {
                        num,
                        id: known.id,
                        version: known.version,
                        config: known.config,
                        at_ms: known.created_at_ms,
                    },
                    "as the last clean stop's checkpoint recorded it",
                )
            }
            (None, Some(g)) => (g, "from its damaged bytes, unverified"),
            (None, None) => (
                Record::Device {
                    num,
                    id: format!("lost-device-{num}"),
                    version,
                    config: b"{}".to_vec(),
                    at_ms: 0,
                },
                "as a placeholder: its id and config were lost",
            ),
        };
        if let Ok(effect) = shadow.effect_of(&rebuilt) {
            if let Record::Device { id, .. } = &rebuilt {
                self.names.insert(num, Arc::from(id.as_str()));
                self.rebuilt.push(format!("provisioning of `{id}` {how}"));
            }
            shadow.apply(effect, 0);
            emit(out, &rebuilt)?;
        }
        Ok(())
    }

    /// Takes one intact record after the damage: applies it to the copy of the index (after
    /// marking the seqs its device is missing), or sets it aside if it cannot be applied.
    fn admit(
        &mut self,
        shadow: &mut Index,
        out: &mut Option<&mut Output>,
        record: &Record,
        bytes: &[u8],
        damaged_at: u64,
    ) -> std::io::Result<()> {
        self.intact += 1;
        self.rebuild_dependencies(shadow, out, record)?;
        // A seq past the device's next one: the records between were destroyed, if the
        // damage was large enough to have held them.
        let missing = match record {
            Record::Event(e) => Some((e.device, e.seq.saturating_sub(1))),
            Record::Snapshot { device, seq, .. } => Some((*device, *seq)),
            _ => None,
        };
        if let Some((device, upto)) = missing
            && let Some(seq) = shadow.devices.get(&device).map(|d| d.seq())
            && upto > seq
            && upto - seq <= self.damaged_bytes / MIN_RECORD_BYTES + 1
        {
            self.lose(shadow, out, device, seq + 1, upto, damaged_at)?;
        }
        // A snapshot taken after a seq now lost holds that event's effect, which no replay
        // can reproduce: left out, so that the state rebuilt from the salvaged journal is
        // one answer whichever way it is rebuilt (from an earlier snapshot or from `init`).
        if let Record::Snapshot { device, seq, .. } = record
            && self
                .affected
                .get(device)
                .is_some_and(|(lost, _)| lost.iter().any(|&(from, _)| from <= *seq))
        {
            tracing::debug!(
                device,
                seq,
                "salvage leaves out a snapshot that covers a lost seq"
            );
            self.set_aside += 1;
            return Ok(());
        }
        match shadow.effect_of(record) {
            Ok(effect) => {
                if let Record::Device { num, id, .. } = record {
                    self.names.insert(*num, Arc::from(id.as_str()));
                }
                shadow.apply(effect, 0);
                if let Some(out) = out.as_deref_mut() {
                    out.write(bytes)?;
                }
            }
            Err(e) => {
                self.set_aside += 1;
                let device = match (record, &e) {
                    (_, Inconsistency::UnknownDevice(n)) => Some(*n),
                    (Record::Event(ev), _) => Some(ev.device),
                    (Record::Snapshot { device, .. }, _)
                    | (Record::Removed { device, .. }, _)
                    | (Record::Lost { device, .. }, _) => Some(*device),
                    (Record::DeadLetter(d), _) => Some(d.device),
                    (Record::Device { num, .. }, _) => Some(*num),
                    _ => None,
                };
                if let Some(device) = device {
                    self.affected.entry(device).or_default().1 += 1;
                }
                tracing::debug!(?record, error = %e, "record after journal damage cannot be applied");
            }
        }
        Ok(())
    }
}

/// Scans everything from the bad record at `prefix.end` to the end of the file (see the
/// module docs); with `out`, writes the salvaged tail as it goes.
fn scan_tail(
    storage: &dyn StorageBackend,
    prefix: &Prefix,
    mut out: Option<&mut Output>,
) -> std::io::Result<(Tail, Index)> {
    let file_len = prefix.file_len;
    let damaged_at = prefix.end;
    let mut shadow = prefix.index.clone();
    let mut tail = Tail {
        names: shadow
            .devices
            .iter()
            .map(|(num, d)| (*num, d.id.clone()))
            .collect(),
        known: prefix
            .checkpoint
            .iter()
            .flat_map(|c| &c.devices)
            .map(|d| (d.num, d.clone()))
            .collect(),
        ..Tail::default()
    };
    let mut pos = prefix.end;
    let mut cursor = Cursor::new(storage, pos, file_len);
    let mut markers = MarkerSearch::default();
    while pos < file_len {
        match cursor.next() {
            Ok(Record::Commit {
                offset,
                batch_start,
            }) if offset == pos && batch_start <= pos => {
                let end = pos + cursor.last_len();
                tail.last_marker = Some(Marker {
                    batch_start,
                    at: pos,
                    end,
                    empty: batch_start == pos,
                });
                pos = end;
            }
            Ok(Record::Commit { .. }) => {
                // A checksummed marker in the wrong place: nothing to apply either way.
                pos += cursor.last_len();
            }
            Ok(record) => {
                let bytes = std::mem::take(&mut cursor.buf);
                tail.admit(&mut shadow, &mut out, &record, &bytes, damaged_at)?;
                cursor.buf = bytes;
                pos += cursor.last_len();
            }
            Err(_) => {
                let bound = match markers.next_after(storage, pos + 1, file_len)? {
                    Some((_, m)) if m.batch_start > pos => m.batch_start,
                    Some((at, _)) => at,
                    None => file_len,
                };
                let resume = resync(storage, pos + 1, bound)?.unwrap_or(bound);
                let guesses = guesses_in(storage, pos, resume)?;
                if guesses.is_empty() {
                    tail.unrecognized += 1;
                }
                tail.guesses.extend(guesses);
                tail.ranges.push((pos, resume));
                tail.damaged_bytes += resume - pos;
                pos = resume;
                cursor.seek(pos);
            }
        }
    }
    // A device whose last records were destroyed shows it by nothing after them: the damaged
    // records' own (unverified) headers are the only witness. Believed only as far as the
    // damaged bytes could have held that many records.
    for guess in std::mem::take(&mut tail.guesses) {
        let (device, seq) = match guess {
            Record::Event(e) => (e.device, e.seq),
            Record::Snapshot { device, seq, .. } => (device, seq),
            _ => continue,
        };
        if let Some(now) = shadow.devices.get(&device).map(|d| d.seq())
            && seq > now
            && seq - now <= tail.damaged_bytes / MIN_RECORD_BYTES + 1
        {
            tail.lose(&mut shadow, &mut out, device, now + 1, seq, damaged_at)?;
        }
    }
    // What the last clean close knew and the file no longer holds (a file cut short).
    if let Some(checkpoint) = &prefix.checkpoint
        && checkpoint.cut_short(file_len)
    {
        tail.ranges.push((file_len, checkpoint.len));
        tail.damaged_bytes += checkpoint.len - file_len;
        for CheckpointDevice {
            num,
            id,
            version,
            seq,
            ..
        } in &checkpoint.devices
        {
            if shadow.removed.contains(num) {
                continue;
            }
            if !shadow.devices.contains_key(num) && !shadow.devices.contains_id(id) {
                tail.ensure_device(&mut shadow, &mut out, *num, *version)?;
            }
            if let Some(now) = shadow.devices.get(num).map(|d| d.seq())
                && *seq > now
            {
                tail.lose(&mut shadow, &mut out, *num, now + 1, *seq, damaged_at)?;
            }
        }
    }
    Ok((tail, shadow))
}

/// Remembers the last marker search, so a file with many damaged ranges and no marker after
/// them is scanned once, not once per range.
#[derive(Default)]
struct MarkerSearch {
    /// `(from, found)`: the search from `from` found this (or nothing).
    last: Option<(u64, Option<(u64, Marker)>)>,
}

impl MarkerSearch {
    fn next_after(
        &mut self,
        storage: &dyn StorageBackend,
        from: u64,
        file_len: u64,
    ) -> std::io::Result<Option<(u64, Marker)>> {
        if let Some((searched_from, found)) = self.last {
            let still = match found {
                Some((at, _)) => from >= searched_from && from <= at,
                None => from >= searched_from,
            };
            if still {
                return Ok(found);
            }
        }
        let found = next_marker(storage, from, file_len)?;
        self.last = Some((from, found));
        Ok(found)
    }
}

/// Every record that can be read out of the damaged range `from..to` without checksums:
/// frames that decode at any offset inside it, and the body at `from` as if the range were
/// one record (for a damaged length field). Unverified guesses, for salvage's reports and
/// lost seqs.
fn guesses_in(storage: &dyn StorageBackend, from: u64, to: u64) -> std::io::Result<Vec<Record>> {
    // Past this, a range is not searched for guesses (its seqs are reported unknown).
    const MAX_GUESS_RANGE: u64 = 4 << 20;
    let n = (to - from).min(MAX_GUESS_RANGE) as usize;
    let mut bytes = vec![0u8; n];
    storage.read_exact_at(&mut bytes, from)?;
    let mut guesses = Vec::new();
    if n > record::HEADER_LEN
        && let Some(r) = Record::decode_body_unchecked(&bytes[record::HEADER_LEN..])
    {
        guesses.push(r);
    }
    for i in 0..n.saturating_sub(record::HEADER_LEN) {
        let len = u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]) as usize;
        if len == 0
            || i + record::HEADER_LEN + len > n
            || !Record::known_kind(bytes[i + record::HEADER_LEN])
        {
            continue;
        }
        if let Some(r) = Record::decode_unchecked(&bytes[i..i + record::HEADER_LEN + len]) {
            guesses.push(r);
        }
    }
    Ok(guesses)
}

/// Whether `storage` now proves its first `len` bytes durable: an intact commit marker at or
/// after `len` whose batch starts at or after it. A batch starts at the length last synced
/// (`journal/writer.rs`, rule 5), so such a marker was written only once those bytes were.
/// Reads only what lies past `len`: how an online backup waits for the last batch it found
/// to be proven (`crate::backup`), without opening the whole journal again.
pub fn proven_durable(storage: &dyn StorageBackend, len: u64) -> std::io::Result<bool> {
    let file_len = storage.size()?;
    if file_len <= len {
        return Ok(false);
    }
    Ok(next_marker(storage, len, file_len)?.is_some_and(|(_, m)| m.batch_start >= len))
}

/// Whether all `storage` holds past `len` is the marker of one empty batch (an idle writer's,
/// or a clean close's): nothing a copy cut at `len` leaves out.
pub fn only_a_marker_after(storage: &dyn StorageBackend, len: u64) -> std::io::Result<bool> {
    let file_len = storage.size()?;
    if file_len <= len || file_len - len > record::MAX_COMMIT_LEN as u64 {
        return Ok(false);
    }
    Ok(next_marker(storage, len, file_len)?
        .is_some_and(|(at, m)| at == len && m.empty && m.end == file_len))
}

/// The next intact commit marker at or after `from`: its offset and what it says.
fn next_marker(
    storage: &dyn StorageBackend,
    from: u64,
    file_len: u64,
) -> std::io::Result<Option<(u64, Marker)>> {
    const CHUNK: usize = 1 << 20;
    let overlap = record::MAX_COMMIT_LEN as u64;
    let mut buf = vec![0u8; CHUNK];
    let mut base = from;
    while base < file_len {
        let n = (file_len - base).min(CHUNK as u64) as usize;
        storage.read_exact_at(&mut buf[..n], base)?;
        // Positions whose marker would reach past this chunk are tried in the next one.
        let last = if base + (n as u64) < file_len {
            n.saturating_sub(overlap as usize)
        } else {
            n
        };
        for i in 0..last {
            let at = base + i as u64;
            if let Some(batch_start) = Record::commit_at(&buf[i..n], at) {
                // `commit_at` checked the frame, so the length is the marker's.
                let len = u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
                let end = at + record::HEADER_LEN as u64 + u64::from(len);
                let empty = batch_start == at;
                return Ok(Some((
                    at,
                    Marker {
                        batch_start,
                        at,
                        end,
                        empty,
                    },
                )));
            }
        }
        if last == 0 {
            break;
        }
        base += last as u64;
    }
    Ok(None)
}

/// The first offset in `from..to` where an intact record starts and ends within `to`.
/// Read in chunks, so a large region costs no more memory than a chunk (a candidate longer
/// than what is left of a chunk is read on its own).
fn resync(storage: &dyn StorageBackend, from: u64, to: u64) -> std::io::Result<Option<u64>> {
    const CHUNK: u64 = 1 << 20;
    let to = to.min(from.saturating_add(MAX_RESYNC_WINDOW));
    let mut chunk = Vec::new();
    let mut base = from;
    while base < to {
        let n = (to - base).min(CHUNK) as usize;
        chunk.resize(n, 0);
        storage.read_exact_at(&mut chunk, base)?;
        for i in 0..n {
            let at = base + i as u64;
            if at + record::HEADER_LEN as u64 + 1 > to {
                return Ok(None);
            }
            const HEAD: usize = record::HEADER_LEN + 1;
            let mut head = [0u8; HEAD];
            if i + HEAD <= n {
                head.copy_from_slice(&chunk[i..i + HEAD]);
            } else {
                storage.read_exact_at(&mut head, at)?;
            }
            let len = u64::from(u32::from_le_bytes([head[0], head[1], head[2], head[3]]));
            let framed = record::HEADER_LEN as u64 + len;
            if len == 0
                || len > record::MAX_BODY_LEN as u64
                || at + framed > to
                || !Record::known_kind(head[record::HEADER_LEN])
            {
                continue;
            }
            let owned;
            let bytes: &[u8] = if i + framed as usize <= n {
                &chunk[i..i + framed as usize]
            } else {
                let mut b = vec![0u8; framed as usize];
                storage.read_exact_at(&mut b, at)?;
                owned = b;
                &owned
            };
            // The structure first: most garbage fails it long before a checksum over `len`
            // bytes.
            if Record::decode_unchecked(bytes).is_some() && Record::decode(bytes).is_ok() {
                return Ok(Some(at));
            }
        }
        base += n as u64;
    }
    Ok(None)
}
