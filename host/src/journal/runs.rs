//! Where the index keeps the offsets of old records: sorted files on disk ("runs"), so that
//! its memory is bounded by the number of devices rather than the length of history.
//!
//! The index needs, for every device, the file offset of each of its records (seq `s` of
//! device `d` is at offset `o`). Kept in memory that costs 8 bytes per event forever: a fleet
//! writing a billion events a day would need gigabytes after a day. So only the offsets of
//! recent records stay in memory (each device's *tail*, bounded in total by
//! [`Spill::flush_at`]); when the tails hold that many, they are written out as one run:
//!
//! ```text
//! run file:  for each device in the run, ascending by number: its offsets as u64 LE,
//!            consecutive seqs, nothing else (the file is the offsets; no header)
//! in memory: per run, per device in it: (num, first seq, count, position in the file)
//! ```
//!
//! A device's seqs are spread over the runs in order (older runs hold lower seqs) and then
//! its in-memory tail. Runs are merged in size tiers (a run is merged into the one before it
//! when that one is not more than twice its size, as a binary counter carries), so there are
//! about log2(history / flush size) runs, each record's offset is rewritten as many times,
//! and the memory per device is one 24-byte entry per run that holds it.
//!
//! # Retention
//!
//! Retention (`journal/retention.rs`) deletes the oldest segments, and with them the records
//! whose offsets the oldest runs hold: without more, the runs would keep 8 bytes of every
//! event ever written while the journal itself stays small. So once retention has deleted
//! everything a run points into (its largest offset is below the first position still
//! stored), the run is dropped, oldest runs first. A run holds every device's tail as it was
//! when it was written, so its largest offset is the journal's length then, and later runs
//! have larger ones: the runs dropped are a prefix of the list, and each device's seqs in the
//! runs left stay consecutive, starting past 1. A lookup of a seq before a device's first one
//! in the runs answers [`SHED`], an offset below any the journal still stores, and the read
//! answers what retention deleted as it always has (`RetainedAway`). Runs are dropped after
//! every retention pass (`Journal::retain_now` and the index's thread); a run loaded from an
//! index checkpoint knows only the checkpoint's position as a bound on its offsets, until
//! its file is read once for the largest; and the checkpoint on disk, which keeps the files
//! it names, is rewritten at once when a run it names is dropped.
//!
//! Runs are derived data: the journal is the truth. They are synced before an index checkpoint
//! (`journal/index_checkpoint.rs`) names them (most are merged away before); a run that no checkpoint
//! names is removed once the index no longer uses it, and on open every file of the
//! directory that the checkpoint in use does not name is removed (an open without one
//! rebuilds the runs from the journal). A journal opened read-only or on storage without a
//! path keeps every offset in memory.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::index_checkpoint::Checkpoints;

/// One device's offsets within a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Block {
    pub num: u32,
    pub count: u32,
    pub first_seq: u64,
    /// Byte position of the first offset in the run file.
    pub pos: u64,
}

/// An immutable run file and its directory.
#[derive(Debug)]
pub struct Run {
    file: File,
    path: PathBuf,
    /// Ascending by device number.
    blocks: Vec<Block>,
    entries: u64,
    /// No offset in the run is larger (see "Retention" in the module docs): exact for a run
    /// written by this open; for one loaded from an index checkpoint, the checkpoint's
    /// position (every offset it holds is before it) until [`Run::learn_max_offset`] reads
    /// the file.
    max_offset: AtomicU64,
    /// `max_offset` is the largest offset in the run, not only a bound.
    max_exact: AtomicBool,
    /// Named by the index checkpoint on disk: its file outlives it (see the module docs).
    pub(super) pinned: AtomicBool,
    /// Its file is synced (done before a checkpoint names it: [`Run::sync`]).
    synced: AtomicBool,
    /// A sync of its file failed: it is never synced again, nor named by a checkpoint.
    sync_failed: AtomicBool,
}

impl Drop for Run {
    fn drop(&mut self) {
        // Merged away or the journal closed, and no checkpoint names it: readers that still
        // hold it are gone too.
        if !self.pinned.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes a run file block by block. Dropped before [`RunWriter::finish`] (a write failed),
/// it removes its file: a failed spill on a nearly full disk must not keep the space it took.
struct RunWriter {
    /// `None` once finished.
    out: Option<BufWriter<File>>,
    path: PathBuf,
    blocks: Vec<Block>,
    pos: u64,
    /// The largest offset appended.
    max_offset: u64,
    /// Offsets encoded, written with one call.
    bytes: Vec<u8>,
}

impl Drop for RunWriter {
    fn drop(&mut self) {
        if let Some(out) = self.out.take() {
            // Discard what is buffered rather than write it, then remove the file.
            drop(out.into_parts());
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl RunWriter {
    fn create(path: PathBuf) -> io::Result<RunWriter> {
        // Never over a file that exists: it may be a run an index checkpoint names.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(RunWriter {
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            path,
            blocks: Vec::new(),
            pos: 0,
            max_offset: 0,
            bytes: Vec::new(),
        })
    }

    /// Adds device `num`'s offsets of seqs `first_seq..first_seq + offsets.len()`, extending
    /// its last block when they follow it. Devices must come in ascending order, and a
    /// device's seqs in ascending order.
    fn append(&mut self, num: u32, first_seq: u64, offsets: &[u64]) -> io::Result<()> {
        let Some(out) = self.out.as_mut() else {
            return Err(io::Error::other("run already finished"));
        };
        let mut seq = first_seq;
        let mut rest = offsets;
        while !rest.is_empty() {
            let room = match self.blocks.last() {
                Some(b)
                    if b.num == num
                        && b.first_seq + u64::from(b.count) == seq
                        && b.count < u32::MAX =>
                {
                    (u32::MAX - b.count) as usize
                }
                _ => {
                    self.blocks.push(Block {
                        num,
                        count: 0,
                        first_seq: seq,
                        pos: self.pos,
                    });
                    u32::MAX as usize
                }
            };
            let (chunk, after) = rest.split_at(rest.len().min(room));
            self.bytes.clear();
            self.bytes.reserve(chunk.len() * 8);
            for o in chunk {
                self.bytes.extend_from_slice(&o.to_le_bytes());
                self.max_offset = self.max_offset.max(*o);
            }
            out.write_all(&self.bytes)?;
            self.pos += chunk.len() as u64 * 8;
            if let Some(b) = self.blocks.last_mut() {
                b.count += chunk.len() as u32;
            }
            seq += chunk.len() as u64;
            rest = after;
        }
        Ok(())
    }

    fn finish(mut self) -> io::Result<Arc<Run>> {
        let Some(out) = self.out.as_mut() else {
            return Err(io::Error::other("run already finished"));
        };
        out.flush()?;
        let file = match self.out.take().map(BufWriter::into_parts) {
            Some((file, Ok(_))) => file,
            _ => return Err(io::Error::other("run buffer lost")),
        };
        // Not synced here: most runs are merged away before any checkpoint names one, and
        // syncing tens of MiB stalls the journal's own fsyncs behind it.
        Ok(Arc::new(Run {
            file,
            path: std::mem::take(&mut self.path),
            blocks: std::mem::take(&mut self.blocks),
            entries: self.pos / 8,
            max_offset: AtomicU64::new(self.max_offset),
            max_exact: AtomicBool::new(true),
            pinned: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            sync_failed: AtomicBool::new(false),
        }))
    }
}

impl Run {
    /// Opens the run file `name` in `dir` as an index checkpoint at position `at` describes
    /// it, pinned. Checks that the directory fits the file (ascending devices, blocks inside
    /// it, no overlaps), so a damaged or stale description fails here rather than on a read.
    pub fn load(dir: &Path, name: &str, blocks: Vec<Block>, at: u64) -> io::Result<Arc<Run>> {
        if name.contains('/') || !name.starts_with("run-") {
            return Err(io::Error::other(format!("`{name}` is not a run file name")));
        }
        let path = dir.join(name);
        let file = File::open(&path)?;
        let len = file.metadata()?.len();
        let mut pos = 0u64;
        let mut last: Option<(u32, u64)> = None;
        for b in &blocks {
            let fits = b.count > 0
                && b.first_seq > 0
                && b.first_seq.checked_add(u64::from(b.count)).is_some()
                && b.pos == pos
                && last
                    .is_none_or(|(num, end)| num < b.num || (num == b.num && end == b.first_seq));
            if !fits {
                return Err(io::Error::other(format!(
                    "run `{name}`: its directory is inconsistent"
                )));
            }
            pos += u64::from(b.count) * 8;
            last = Some((b.num, b.first_seq + u64::from(b.count)));
        }
        if pos != len {
            return Err(io::Error::other(format!(
                "run `{name}` is {len} bytes long; its directory says {pos}"
            )));
        }
        Ok(Arc::new(Run {
            file,
            path,
            blocks,
            entries: pos / 8,
            max_offset: AtomicU64::new(at),
            max_exact: AtomicBool::new(false),
            pinned: AtomicBool::new(true),
            synced: AtomicBool::new(true),
            sync_failed: AtomicBool::new(false),
        }))
    }

    /// Reads the file for its largest offset, unless that is known: a run loaded from an index
    /// checkpoint knows only a bound, the checkpoint's position, which retention passes long
    /// before its offsets (a stop after a burst, then a quiet server). One sequential read of
    /// the file, once per run; without the index lock.
    fn learn_max_offset(&self) -> io::Result<u64> {
        if self.max_exact.load(Ordering::Acquire) {
            return Ok(self.max_offset.load(Ordering::Acquire));
        }
        let mut max = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        let len = self.entries * 8;
        while at < len {
            let n = (len - at).min(buf.len() as u64) as usize;
            self.file.read_exact_at(&mut buf[..n], at)?;
            for c in buf[..n].chunks_exact(8) {
                max = max.max(u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
            }
            at += n as u64;
        }
        self.max_offset.store(max, Ordering::Release);
        self.max_exact.store(true, Ordering::Release);
        Ok(max)
    }

    /// Syncs the run's file, once: before an index checkpoint names it.
    pub fn sync(&self) -> io::Result<()> {
        if self.sync_failed.load(Ordering::Acquire) {
            // After a failed fsync the kernel may have dropped the dirty pages and report
            // the next one as a success: no checkpoint names this run (until merged away).
            return Err(io::Error::other(format!(
                "run `{}` failed to sync before",
                self.name()
            )));
        }
        if !self.synced.load(Ordering::Acquire) {
            if let Err(e) = self.file.sync_data() {
                self.sync_failed.store(true, Ordering::Release);
                return Err(e);
            }
            self.synced.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// The file's name in the runs' directory.
    pub fn name(&self) -> &str {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    }

    /// The run's directory, ascending by device.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// The blocks of device `num` in this run (one, unless it held more than 2^32 seqs).
    fn blocks_of(&self, num: u32) -> &[Block] {
        let start = self.blocks.partition_point(|b| b.num < num);
        let end = start + self.blocks[start..].partition_point(|b| b.num == num);
        &self.blocks[start..end]
    }

    /// Appends the offsets of seqs `from..=to` of `block` (clamped to it) to `out`.
    fn read(&self, block: &Block, from: u64, to: u64, out: &mut Vec<u64>) -> io::Result<()> {
        let last = block.first_seq + u64::from(block.count) - 1;
        let (from, to) = (from.max(block.first_seq), to.min(last));
        if from > to {
            return Ok(());
        }
        let n = (to - from + 1) as usize;
        let mut bytes = vec![0u8; n * 8];
        self.file
            .read_exact_at(&mut bytes, block.pos + (from - block.first_seq) * 8)?;
        out.extend(
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))),
        );
        Ok(())
    }
}

/// What a lookup answers for a seq whose offset was dropped with its run after retention
/// deleted its record (see "Retention" in the module docs): below any position the journal
/// still stores, so a read of it answers what retention deleted.
pub const SHED: u64 = 0;

/// The runs of one index, oldest first, shared by the index and its readers.
#[derive(Debug, Clone, Default)]
pub struct Runs {
    list: Vec<Arc<Run>>,
    /// Runs were dropped after retention (or may have been, in a journal retention
    /// shortened): a device's seqs in the runs may start past 1, and the seqs before its
    /// first read as [`SHED`].
    shed: bool,
}

impl Runs {
    /// Offsets of seqs `from..=to` of device `num` held in runs, appended to `out` in seq
    /// order. The runs hold a prefix of the device's seqs (after retention, the seqs before
    /// the first they hold read as [`SHED`]); the caller adds the tail.
    pub fn read(&self, num: u32, from: u64, to: u64, out: &mut Vec<u64>) -> io::Result<()> {
        if self.shed {
            let first = self
                .list
                .iter()
                .find_map(|r| r.blocks_of(num).first().map(|b| b.first_seq));
            let shed_to = first.map_or(to, |f| to.min(f - 1));
            if from <= shed_to {
                out.extend(std::iter::repeat_n(SHED, (shed_to - from + 1) as usize));
            }
        }
        for run in &self.list {
            for block in run.blocks_of(num) {
                run.read(block, from, to, out)?;
            }
        }
        Ok(())
    }

    /// Number of runs (for tests and metrics).
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// The runs, oldest first.
    pub fn list(&self) -> &[Arc<Run>] {
        &self.list
    }

    /// Runs made of `list`, oldest first (loaded from an index checkpoint); `shed`: of a
    /// journal retention shortened, whose devices' seqs in them may start past 1.
    pub fn from_list(list: Vec<Arc<Run>>, shed: bool) -> Runs {
        Runs { list, shed }
    }

    /// Learns the largest offset of the oldest runs whose bound does not show them below
    /// `retained_from` (runs loaded from an index checkpoint), as far as
    /// [`Runs::without_retained`] could drop: call it without the index lock, before that.
    pub fn learn_max_offsets(&self, retained_from: u64) -> io::Result<()> {
        for run in &self.list {
            if run.max_offset.load(Ordering::Acquire) >= retained_from
                && run.learn_max_offset()? >= retained_from
            {
                break;
            }
        }
        Ok(())
    }

    /// `self` without its oldest runs that point only into what retention deleted (every
    /// offset below `retained_from`, the first position still stored), or `None` if there
    /// are none. See "Retention" in the module docs.
    pub fn without_retained(&self, retained_from: u64) -> Option<Runs> {
        let gone = self
            .list
            .iter()
            .take_while(|r| r.max_offset.load(Ordering::Acquire) < retained_from)
            .count();
        (gone > 0).then(|| Runs {
            list: self.list[gone..].to_vec(),
            shed: true,
        })
    }

    /// Entries held in all runs.
    pub fn entries(&self) -> u64 {
        self.list.iter().map(|r| r.entries).sum()
    }

    /// Bytes of memory the runs' directories take.
    pub fn directory_bytes(&self) -> usize {
        self.list
            .iter()
            .map(|r| r.blocks.capacity() * std::mem::size_of::<Block>())
            .sum()
    }
}

/// Where and when an index spills its tails into runs, and checkpoints itself.
#[derive(Debug)]
pub struct Spill {
    dir: PathBuf,
    /// Spill once the tails hold this many offsets in all.
    pub flush_at: u64,
    /// The index checkpoints written to (and read from) the same directory.
    pub checkpoints: Checkpoints,
    /// Set when the journal closes: a merge in progress gives up.
    pub stopping: AtomicBool,
    /// Held by whoever is changing the index's runs (the index's thread while it spills and
    /// merges, a retention pass asked for elsewhere while it drops runs): a merge swaps in
    /// runs computed from the list it started with, which must not have changed meanwhile.
    pub changing: parking_lot::Mutex<()>,
    next_id: std::sync::atomic::AtomicU64,
    /// Which open this is: run files of other opens (earlier processes, whose files a
    /// checkpoint may name, or an earlier open in this process whose runs are dropped late)
    /// never share a name with this open's.
    open: String,
}

/// Counts the spilling opens in this process (see [`Spill::open`]).
static OPENS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Spill {
    /// Spills into `dir` once the tails hold `flush_at` offsets, and checkpoints the index
    /// there every `checkpoint_every` bytes of journal (0: never). What the directory holds
    /// is left alone until [`Spill::tidy`].
    pub fn open(dir: &Path, flush_at: u64, checkpoint_every: u64) -> io::Result<Spill> {
        std::fs::create_dir_all(dir)?;
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros();
        Ok(Spill {
            dir: dir.to_path_buf(),
            flush_at: flush_at.max(1),
            checkpoints: Checkpoints::new(dir, checkpoint_every),
            stopping: AtomicBool::new(false),
            changing: parking_lot::Mutex::new(()),
            next_id: Default::default(),
            open: format!(
                "{started:x}-{}",
                OPENS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
        })
    }

    /// Removes every file of the directory but `keep` (the runs and checkpoint an open
    /// uses): runs of earlier opens, a half-written checkpoint. Failures are logged only.
    pub fn tidy(&self, keep: &[String]) {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "journal index: cannot list the runs' directory");
                return;
            }
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if keep.iter().any(|k| *k == name) {
                continue;
            }
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(file = %entry.path().display(), error = %e, "journal index: cannot remove a stale file");
            }
        }
    }

    fn path(&self) -> PathBuf {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dir.join(format!("run-{}-{id}", self.open))
    }

    /// Writes a new run holding, for each `(num, first_seq, offsets)` (ascending by `num`,
    /// no device twice), the offsets of seqs `first_seq..first_seq + offsets.len()`.
    pub fn write<'a>(
        &self,
        devices: impl IntoIterator<Item = (u32, u64, &'a [u64])>,
    ) -> io::Result<Arc<Run>> {
        let mut run = RunWriter::create(self.path())?;
        for (num, first_seq, offsets) in devices {
            run.append(num, first_seq, offsets)?;
        }
        run.finish()
    }

    /// After `runs` grew by a run: `runs` with the runs that call for it merged into one
    /// (see [`Spill::to_merge`]), or `None` when nothing needs merging or the merge failed
    /// (logged; the runs stay as they are, as good). The caller swaps the result in; only one
    /// thread ever changes an index's runs, so nothing can have changed them meanwhile.
    /// `retained_from`: the first position the journal still stores (see [`Spill::merge`]).
    pub fn merge_tier(
        &self,
        runs: &Runs,
        removed: &std::collections::HashSet<u32>,
        retained_from: u64,
    ) -> Option<Runs> {
        let n = Spill::to_merge(runs);
        if n == 0 {
            return None;
        }
        match self.merge(runs, n, removed, retained_from) {
            Ok(merged) => {
                let all = n == runs.list.len();
                let mut runs = runs.merged(n, merged);
                runs.shed |= all && retained_from > 0;
                Some(runs)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!(error = %e, "journal index: merging runs failed; kept as they are");
                }
                None
            }
        }
    }

    /// The runs that should be merged into one after `runs` grew by a run: the newest ones,
    /// as far back as a run is not more than twice the size of all newer ones together.
    /// Zero if nothing needs merging.
    fn to_merge(runs: &Runs) -> usize {
        let mut newer = 0u64;
        let mut take = 0;
        for run in runs.list.iter().rev() {
            if take > 0 && run.entries > 2 * newer {
                break;
            }
            newer += run.entries;
            take += 1;
        }
        if take > 1 { take } else { 0 }
    }

    /// Merges the last `n` runs of `runs` into one new run (the device blocks of older runs
    /// first, since they hold lower seqs), leaving out the devices in `removed`. Copies at most
    /// [`MERGE_CHUNK`] offsets at a time, so a device with a long history costs no memory.
    ///
    /// A merge of every run also leaves out the offsets below `retained_from` (records
    /// retention deleted): no older run holds the device's earlier seqs, so its seqs in the
    /// runs stay consecutive, starting past 1 (see "Retention" in the module docs). A merge of
    /// fewer keeps them: leaving them out would open a gap after the older runs' seqs.
    pub fn merge(
        &self,
        runs: &Runs,
        n: usize,
        removed: &std::collections::HashSet<u32>,
        retained_from: u64,
    ) -> io::Result<Arc<Run>> {
        let shed_below = if n == runs.list.len() {
            retained_from
        } else {
            0
        };
        let merged = &runs.list[runs.list.len() - n..];
        let mut nums: Vec<u32> = merged
            .iter()
            .flat_map(|r| r.blocks.iter().map(|b| b.num))
            .filter(|num| !removed.contains(num))
            .collect();
        nums.sort_unstable();
        nums.dedup();
        let mut run = RunWriter::create(self.path())?;
        let mut offsets = Vec::new();
        for num in nums {
            if self.stopping.load(Ordering::Acquire) {
                // The journal is closing: a merge can take seconds, and is only an
                // optimisation. The unfinished run removes its file.
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "journal closing",
                ));
            }
            for old in merged {
                for block in old.blocks_of(num) {
                    let last = block.first_seq + u64::from(block.count) - 1;
                    let mut from = block.first_seq;
                    while from <= last {
                        let to = last.min(from + MERGE_CHUNK - 1);
                        offsets.clear();
                        old.read(block, from, to, &mut offsets)?;
                        // A device's offsets grow with its seqs: those deleted come first.
                        let gone = offsets.partition_point(|o| *o < shed_below);
                        run.append(num, from + gone as u64, &offsets[gone..])?;
                        from = to + 1;
                    }
                }
            }
        }
        run.finish()
    }
}

/// Offsets a merge copies at a time (8 MiB; a handful in tests, so that they cross chunks).
const MERGE_CHUNK: u64 = if cfg!(test) { 7 } else { 1 << 20 };

impl Runs {
    /// `self` with `run` added as the newest.
    pub fn with(&self, run: Arc<Run>) -> Runs {
        let mut list = self.list.clone();
        list.push(run);
        Runs {
            list,
            shed: self.shed,
        }
    }

    /// `self` with its last `n` runs replaced by `merged`.
    pub fn merged(&self, n: usize, merged: Arc<Run>) -> Runs {
        let mut list = self.list[..self.list.len() - n].to_vec();
        list.push(merged);
        Runs {
            list,
            shed: self.shed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets of seqs `from..from + n` of a device: ten times the seq.
    fn offsets(from: u64, n: u64) -> Vec<u64> {
        (from..from + n).map(|s| s * 10).collect()
    }

    /// A run of device 1's seqs 1..=20 and device 2's 1..=3.
    fn first_run(spill: &Spill) -> Arc<Run> {
        spill
            .write([(1, 1, &offsets(1, 20)[..]), (2, 1, &offsets(1, 3)[..])])
            .expect("run")
    }

    /// A run whose writing fails part way (dropped before `finish`) leaves no file behind.
    #[test]
    fn an_unfinished_run_removes_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run");
        let mut run = RunWriter::create(path.clone()).expect("create");
        run.append(1, 1, &[10, 20, 30]).expect("append");
        assert!(path.exists());
        drop(run);
        assert!(!path.exists(), "removed");
    }

    /// Appends that follow a device's last block extend it; a merge of several runs copies
    /// each device's offsets in chunks and keeps them in seq order, leaving removed devices
    /// out.
    #[test]
    fn merges_keep_every_offset_in_order_and_drop_removed_devices() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spill = Spill::open(&dir.path().join("runs"), 4, 0).expect("spill");
        let first = first_run(&spill);
        let second = spill
            .write([(1, 21, &offsets(21, 9)[..]), (3, 1, &offsets(1, 5)[..])])
            .expect("run");
        let runs = Runs::default().with(first).with(second);
        let removed = std::collections::HashSet::from([3u32]);
        let merged = spill.merge(&runs, 2, &removed, 0).expect("merge");
        assert_eq!(merged.blocks_of(1).len(), 1, "one block per device");
        assert!(merged.blocks_of(3).is_empty());
        let runs = runs.merged(2, merged);
        assert_eq!(runs.len(), 1);
        let mut out = Vec::new();
        runs.read(1, 1, 29, &mut out).expect("read");
        assert_eq!(out, offsets(1, 29));
        out.clear();
        runs.read(1, 5, 23, &mut out).expect("read");
        assert_eq!(out, offsets(5, 19));
        out.clear();
        runs.read(2, 1, 3, &mut out).expect("read");
        assert_eq!(out, offsets(1, 3));
    }

    /// After retention deleted the journal's start: the oldest runs whose every offset is
    /// below what is still stored are dropped (and no others), a lookup of the seqs they held
    /// answers [`SHED`], and a merge of every run leaves such offsets out, but a merge of
    /// fewer keeps them (the older runs hold the device's earlier seqs).
    #[test]
    fn runs_behind_retention_are_dropped_and_their_seqs_read_as_shed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spill = Spill::open(&dir.path().join("runs"), 4, 0).expect("spill");
        let first = first_run(&spill);
        let second = spill.write([(1, 21, &offsets(21, 15)[..])]).expect("run");
        let runs = Runs::default().with(first).with(second);
        let mut out = Vec::new();
        assert!(runs.without_retained(200).is_none(), "offset 200 is stored");
        let kept = runs.without_retained(201).expect("the first run went");
        assert_eq!(kept.len(), 1);
        assert!(kept.without_retained(350).is_none());
        kept.read(1, 18, 22, &mut out).expect("read");
        assert_eq!(out, [SHED, SHED, SHED, 210, 220]);
        out.clear();
        kept.read(2, 1, 3, &mut out).expect("read");
        assert_eq!(out, [SHED; 3], "every run that held it went");
        out.clear();
        runs.read(2, 1, 3, &mut out).expect("read");
        assert_eq!(
            out,
            offsets(1, 3),
            "nothing is shed before a run is dropped"
        );

        let none = std::collections::HashSet::new();
        let whole = spill.merge(&runs, 2, &none, 155).expect("merge");
        assert_eq!(whole.blocks_of(1)[0].first_seq, 16);
        assert!(whole.blocks_of(2).is_empty(), "all of it was deleted");
        assert!(runs.merged(2, whole).without_retained(155).is_none());
        let merged = spill.merge_tier(&runs, &none, 155).expect("merged");
        out.clear();
        merged.read(1, 14, 17, &mut out).expect("read");
        assert_eq!(out, [SHED, SHED, 160, 170]);

        let third = spill.write([(1, 36, &offsets(36, 2)[..])]).expect("run");
        let three = runs.with(third);
        let newer = spill.merge(&three, 2, &none, 255).expect("merge");
        assert_eq!(
            newer.blocks_of(1)[0].first_seq,
            21,
            "the first run holds 1..=20"
        );
    }
}
