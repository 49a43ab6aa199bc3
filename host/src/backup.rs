//! A consistent copy of a data directory, taken while its server runs.
//!
//! Nothing is stopped or locked: the journal is append-only and its commit markers say which
//! prefix is proven durable (see `journal/recovery.rs`), the plugin files are write-once, and
//! the registry's pointers are replaced atomically. So [`backup`] copies, in this order:
//!
//! 1. `plugins/current.json` (the current versions), read first: every version it names was
//!    recorded in the journal before the file named it, so the journal cut taken next holds
//!    them all;
//! 2. the journal up to its confirmed length ([`crate::journal::Recovery::confirmed_len`]): a
//!    batch boundary, and every record before it was durable before the copy started. The
//!    last batch the copy finds is proven only by the server's next marker (its next batch,
//!    or 50 ms later when it is idle), so the copy waits for that proof, up to 500 ms
//!    ([`PROOF_WAIT`]): every event acknowledged before the backup began is in it, and only
//!    a batch still being synced, or one that fails and is cut back, is left out. A
//!    directory no server runs on (its lock is free) is copied to its valid length, as a
//!    server starting on it would keep it: nothing can be
//!    mid-sync there, and a killed server's last batch, or a backup's, has no later marker;
//!    the lock is held (shared) to the end, so no server starts on it meanwhile;
//! 3. every plugin component (and its precompiled artifact), the record of failed upgrades
//!    (`plugins/upgrade-failures.json`, in device numbers the copy keeps), `engine.json`,
//!    and the archives
//!    of removed devices (`archive/`, written once each; once retention has deleted a
//!    removed device's records, its archive is the only copy of its history).
//!
//! Each file is synced, then the directory. All of it is written into a hidden directory
//! beside the target (`.NAME.backup-partial`), checked to open, and only then renamed to the
//! target and the parent synced: a backup killed part-way (out of memory, a reboot) leaves
//! no directory that looks like a backup, only the hidden one, which the next backup to the
//! same target removes. (Written in place, a killed copy held a cut journal and no plugins,
//! and a server started on it reported a torn commit and served devices that could not
//! run.) The copy is a data directory like any other: `drover serve --data <copy>` starts on
//! it (the journal's last batch shows no close marker, exactly as after a `kill -9`, which
//! recovery takes as it is).

use std::fs::File;
use std::io::Write;
use std::path::Path;

use anyhow::{Context as _, bail};

use crate::journal::{self, Journal, StorageBackend};

/// What [`backup`] copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    /// Journal bytes copied: from `journal_from` to the confirmed length.
    pub journal_bytes: u64,
    /// The first journal position copied: 0, or where the journal begins once retention
    /// deleted its first segments.
    pub journal_from: u64,
    /// Journal bytes that were past the confirmed length at the time (not copied): a batch
    /// the running server had not proven durable yet, or, with no server running
    /// (`offline`), a torn tail that a server starting on the directory would cut too.
    pub left_out: u64,
    /// Whether no server ran on the directory during the copy.
    pub offline: bool,
    /// Devices in the copied journal.
    pub devices: usize,
    /// Plugin files copied (components and precompiled artifacts).
    pub plugin_files: usize,
    /// Archives of removed devices copied.
    pub archives: usize,
}

/// Copies the data directory `data_dir` to `to`, which must not exist yet or be empty, and
/// must not be inside `data_dir`. The copy appears at `to` whole or not at all (see the
/// module docs); if it fails, what it created is removed again.
pub fn backup(data_dir: &Path, to: &Path) -> anyhow::Result<BackupSummary> {
    if journal::SegmentedBackend::list(data_dir)
        .with_context(|| format!("reading {}", data_dir.display()))?
        .is_empty()
    {
        bail!("{} holds no journal", data_dir.display());
    }
    let existed = to.exists();
    if existed
        && std::fs::read_dir(to)
            .with_context(|| format!("reading {}", to.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} is not empty: back up into a new directory",
            to.display()
        );
    }
    let (Some(name), Some(parent)) = (to.file_name(), to.parent()) else {
        bail!("{} names no directory to back up into", to.display());
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let mut staged = std::ffi::OsString::from(".");
    staged.push(name);
    staged.push(".backup-partial");
    let stage = parent.join(staged);
    // A backup to this target killed part-way.
    if stage.exists() {
        std::fs::remove_dir_all(&stage)
            .with_context(|| format!("removing {} (a backup killed part-way)", stage.display()))?;
    }
    std::fs::create_dir(&stage).with_context(|| format!("creating {}", stage.display()))?;
    // The links of a backup killed part-way keep deleted segments' bytes on disk: removed
    // by the next backup of the directory, whatever its target and journal (they were left
    // until a server restarted when the next backups took no links of their own).
    remove_stale_links(data_dir);
    // Held to the end of the copy: no server starts on the directory meanwhile.
    let offline = Offline::take(data_dir)?;
    let result = copy(data_dir, &stage, offline.is_some()).and_then(|summary| {
        // Over the empty directory if there is one (rename replaces an empty directory).
        std::fs::rename(&stage, to)
            .with_context(|| format!("renaming {} to {}", stage.display(), to.display()))?;
        File::open(parent)?.sync_all()?;
        Ok(summary)
    });
    if result.is_err() {
        // Leave nothing half-made behind, so a retry can use the same target.
        let _ = std::fs::remove_dir_all(&stage);
    }
    result
}

/// Proof that no server runs on a data directory: its lock, held (or no `LOCK` file, which
/// every server creates). A journal nobody writes is copied whole, up to its valid length:
/// its last batch has no later commit marker when its server was killed, or was itself a
/// backup (whose journal ends at its last batch), and leaving that batch out, as an online
/// copy must, lost acknowledged events at each backup of a backup.
struct Offline {
    _lock: Option<File>,
    _dir: Option<File>,
}

impl Offline {
    fn take(data_dir: &Path) -> anyhow::Result<Option<Offline>> {
        // A server holds the directory itself locked too (see `builder::lock_data_dir`):
        // one whose `LOCK` file was deleted is still running.
        let dir =
            File::open(data_dir).with_context(|| format!("opening {}", data_dir.display()))?;
        let dir = match dir.try_lock_shared() {
            Ok(()) => Some(dir),
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(_)) => None,
        };
        let path = data_dir.join("LOCK");
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Some(Offline {
                    _lock: None,
                    _dir: dir,
                }));
            }
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        match file.try_lock_shared() {
            Ok(()) => Ok(Some(Offline {
                _lock: Some(file),
                _dir: dir,
            })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
    }
}

fn copy(data_dir: &Path, to: &Path, offline: bool) -> anyhow::Result<BackupSummary> {
    let source_dir = data_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", data_dir.display()))?;
    let target_dir = to
        .canonicalize()
        .with_context(|| format!("resolving {}", to.display()))?;
    if target_dir.starts_with(&source_dir) {
        bail!(
            "{} is inside the data directory {}: back up somewhere else",
            to.display(),
            data_dir.display()
        );
    }
    std::fs::create_dir_all(to.join("plugins"))
        .with_context(|| format!("creating {}", to.display()))?;

    let pointers = data_dir.join("plugins").join("current.json");
    let pointers = match std::fs::read(&pointers) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", pointers.display())),
    };

    // Step 2: the journal's confirmed prefix, read through the same handle that measured it.
    // A journal whose first segments retention deleted opens only from its index checkpoint,
    // which the copy then needs too; retention or a newer checkpoint may change what is on
    // disk meanwhile, so that copy is checked and taken again if it does not open.
    let mut tries = 0;
    let (confirmed, size) = loop {
        tries += 1;
        match copy_journal(data_dir, to, offline) {
            Ok(done) => break done,
            // Only a copy that does not open may be one the journal changed under; a write
            // that failed (a full disk) fails the same way again, and says so at once, and
            // nothing changes under a directory no server runs on.
            Err(e) if tries < 3 && !offline && !failed_to_write(&e) => {
                // Said as what was seen: a copy found damaged says so here too, though a
                // journal damaged on disk fails every try alike (a review read "changed under
                // the copy" twice before the damage was named).
                tracing::warn!(error = %format!("{e:#}"), "backup: the copy did not open (the journal may have changed under it); taking it again");
                remove_journal_copy(to)?;
            }
            Err(e) if damaged(&e) => {
                return Err(e).context(format!(
                    "a backup copies only a journal that opens, and this one is damaged: keep a \
                     copy of the data directory as it is (`cp -a {} ...` while no server runs on \
                     it), then follow what the journal says",
                    data_dir.display()
                ));
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("copying the journal into {}", to.display()));
            }
        }
    };

    // Step 3: write-once files.
    let mut plugin_files = 0;
    for entry in std::fs::read_dir(data_dir.join("plugins"))? {
        let entry = entry?;
        let name = entry.file_name();
        let keep = name
            .to_str()
            .is_some_and(|n| n.ends_with(".wasm") || n.ends_with(".cwasm"));
        if keep {
            copy_synced(&entry.path(), &to.join("plugins").join(&name))?;
            plugin_files += 1;
        }
    }
    if let Some(bytes) = pointers {
        let mut f = File::create(to.join("plugins").join("current.json"))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    // The devices a plugin version could not bring up (`upgrade::FailedUpgrades`), in the
    // journal's device numbers, which the copy keeps. Replaced atomically, so a read sees a
    // whole file; one a moment stale costs a device at most one more fold.
    let failures = data_dir
        .join("plugins")
        .join(crate::upgrade::FAILED_UPGRADES_FILE);
    match std::fs::read(&failures) {
        Ok(bytes) => {
            let mut f = File::create(
                to.join("plugins")
                    .join(crate::upgrade::FAILED_UPGRADES_FILE),
            )?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("reading the record of failed upgrades"),
    }
    let engine = data_dir.join("engine.json");
    if engine.exists() {
        copy_synced(&engine, &to.join("engine.json"))?;
    }
    // An import stopped part-way: the note makes a server started on the copy undo it, as
    // one started on the original would. Without it the copy looked whole and served the
    // devices the import had cut short.
    let importing = data_dir.join(crate::export::IMPORTING);
    if importing.exists() {
        copy_synced(&importing, &to.join(crate::export::IMPORTING))?;
        tracing::warn!(
            "{} holds an import stopped part-way; the backup carries its note, and a server \
             started on the backup undoes it",
            data_dir.display()
        );
    }
    let mut archives = 0;
    match std::fs::read_dir(data_dir.join(crate::removal::ARCHIVE_DIR)) {
        Ok(entries) => {
            std::fs::create_dir_all(to.join(crate::removal::ARCHIVE_DIR))?;
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name();
                // Finished archives only: a `.tmp` is one being written, or a crash's.
                if name.to_str().is_some_and(|n| n.ends_with(".jsonl")) {
                    copy_synced(
                        &entry.path(),
                        &to.join(crate::removal::ARCHIVE_DIR).join(&name),
                    )?;
                    archives += 1;
                }
            }
            File::open(to.join(crate::removal::ARCHIVE_DIR))?.sync_all()?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("reading the archives of removed devices"),
    }
    File::open(to.join("plugins"))?.sync_all()?;
    File::open(to)?.sync_all()?;

    // The copy must open as it is; what it holds is what was copied.
    let copied = Journal::open_read_only(to).context("checking the copied journal")?;
    let (devices, journal_from) = (copied.device_count(), copied.retained_from());
    Ok(BackupSummary {
        journal_bytes: confirmed.saturating_sub(journal_from),
        journal_from,
        left_out: size.saturating_sub(confirmed),
        offline,
        devices,
        plugin_files,
        archives,
    })
}

/// Copies the journal's confirmed prefix into `to` (its whole valid prefix when `offline`:
/// nothing writes it) (and, for a journal that retention shortened, its index checkpoint and
/// runs, first); returns the length copied and the journal's length at the time. The copy is
/// checked to open.
fn copy_journal(data_dir: &Path, to: &Path, offline: bool) -> anyhow::Result<(u64, u64)> {
    let retained = journal::SegmentedBackend::list(data_dir)?
        .first()
        .map_or(0, |s| s.first);
    // A retained journal is read through links taken together (see `Pinned`).
    let pinned = if retained > 0 {
        Pinned::take(data_dir)?
    } else {
        None
    };
    let from = pinned.as_ref().map_or(data_dir, |p| p.dir.as_path());
    let retained = journal::SegmentedBackend::open_read_only(from)?.retained_from();
    if retained > 0 {
        copy_index(from, to)?;
    }
    let opened = Journal::open_read_only(from)
        .with_context(|| format!("opening the journal in {}", data_dir.display()))?;
    // The index checkpoint's position was synced before it was written, so it is durable
    // even when no later marker proves it yet (it may end on the marker of an idle writer),
    // and the copy must reach it to open from the copied checkpoint.
    let recovery = opened.recovery();
    let valid_len = recovery.valid_len;
    let mut confirmed = if offline {
        valid_len
    } else {
        recovery.confirmed_len
    }
    .max(recovery.from_checkpoint.unwrap_or(0));
    drop(opened);
    if confirmed < valid_len && wait_for_proof(from, confirmed, valid_len) {
        confirmed = valid_len;
    }
    // Listed after the length was read: a writer that made a new segment meanwhile (small
    // segments under load) put part of that length in a file a listing taken before it
    // lacked, and the copy read short ("failed to fill whole buffer"). A retained journal is
    // read from links taken at one moment, where nothing changes.
    let source = journal::SegmentedBackend::open_read_only(from)?;
    // What the copy leaves out: nothing, when all past the cut is an idle writer's marker
    // (an empty batch; said as bytes "not proven durable", it read as events left out).
    let size = match journal::only_a_marker_after(&source, confirmed)? {
        true => confirmed,
        false => source.size()?,
    };
    // One file: `journal.log` from position 0, or one segment from the first one kept.
    let mut copy = File::create(to.join(journal::segments::segment_name(retained)))?;
    if retained > 0 {
        copy.write_all(&journal::segments::segment_header(
            journal::FORMAT_VERSION,
            retained,
        ))?;
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut at = retained;
    while at < confirmed {
        let n = (confirmed - at).min(buf.len() as u64) as usize;
        source.read_exact_at(&mut buf[..n], at)?;
        copy.write_all(&buf[..n])?;
        at += n as u64;
    }
    copy.sync_all()?;
    // Where the copy begins is where retention had deleted to: what a server on it checks
    // its first segment against.
    journal::segments::record_retained_floor(to, retained)?;
    if retained > 0 {
        Journal::open_read_only(to).context("checking the copied journal and index")?;
    }
    Ok((confirmed, size))
}

/// How long an online backup waits for the running server to prove the last batch it found
/// durable: ten times the writer's idle marker (50 ms), and a busy writer proves each batch
/// with the next within a commit.
const PROOF_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Waits, up to [`PROOF_WAIT`], until the journal in `dir` proves its first `len` bytes
/// durable; whether it did. The last batch a copy finds has no later marker yet, though it
/// may well be durable and acknowledged: its server writes the proof with its next batch, or
/// 50 ms later when idle. Nothing is waited for when all past `confirmed`, what is proven
/// already, is an idle writer's marker: an empty batch, which no later marker proves on an
/// idle server, and which a copy cut at `confirmed` loses nothing of. A copy that did not wait left out an event acknowledged just before
/// it began (a review: 12 of 12 backups started right after an answer), and a server started
/// on it handed that seq to another event. A batch still being synced, or one that fails
/// and is cut back, is not proven within the wait, and is left out as before.
fn wait_for_proof(dir: &Path, confirmed: u64, len: u64) -> bool {
    let deadline = std::time::Instant::now() + PROOF_WAIT;
    loop {
        // Opened afresh each time: a writer that started a segment meanwhile put the proof
        // in a file an earlier listing lacks. (A retained journal is read through links
        // taken before: a proof in a segment made since is not seen, and the batch is left
        // out, as before.)
        let proven = journal::SegmentedBackend::open_read_only(dir).and_then(|storage| {
            Ok(match journal::proven_durable(&storage, len)? {
                true => Some(true),
                false if journal::only_a_marker_after(&storage, confirmed)? => Some(false),
                false => None,
            })
        });
        match proven {
            Ok(Some(proven)) => return proven,
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, "backup: cannot read the journal's tail for the proof of its last batch");
                return false;
            }
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Hard links, in a directory inside the data directory, to a retained journal's segments and
/// its index checkpoint and runs, all taken within a moment: a retention pass or a merge of
/// runs that deletes files while the copy reads them cannot take them from under it (a link
/// keeps a file's bytes). Taken again if a file vanished while linking, or the set does not
/// open (a pass deleted what the linked checkpoint needs between the two). Removed on drop.
struct Pinned {
    dir: std::path::PathBuf,
}

impl Pinned {
    /// `None` when the data directory cannot take the links (a read-only mount, a file
    /// system without hard links): the copy then reads the files in place.
    fn take(data_dir: &Path) -> anyhow::Result<Option<Pinned>> {
        static TAKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let index = format!("{}.index", journal::FILE_NAME);
        let mut last = None;
        for _ in 0..20 {
            let n = TAKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = data_dir.join(format!("backup-{}-{n}.tmp", std::process::id()));
            if let Err(e) = std::fs::create_dir(&dir) {
                tracing::warn!(error = %e, "backup: cannot link the journal's files in the data directory; copying them in place (a retention pass during the copy makes it start over)");
                return Ok(None);
            }
            // Ours from here: removed on drop.
            let pinned = Pinned { dir };
            if let Err(e) = std::fs::create_dir(pinned.dir.join(&index)) {
                tracing::warn!(error = %e, "backup: cannot link the journal's files in the data directory; copying them in place (a retention pass during the copy makes it start over)");
                return Ok(None);
            }
            let linked = (|| -> anyhow::Result<()> {
                let source = data_dir.join(&index);
                std::fs::hard_link(
                    source.join("checkpoint"),
                    pinned.dir.join(&index).join("checkpoint"),
                )?;
                for entry in std::fs::read_dir(&source)? {
                    let entry = entry?;
                    let file = entry.file_name();
                    if file.to_str().is_some_and(|n| n.starts_with("run-")) {
                        std::fs::hard_link(entry.path(), pinned.dir.join(&index).join(&file))?;
                    }
                }
                for segment in journal::SegmentedBackend::list(data_dir)? {
                    if let Some(name) = segment.path.file_name() {
                        std::fs::hard_link(&segment.path, pinned.dir.join(name))?;
                    }
                }
                Journal::open_read_only(&pinned.dir)?;
                Ok(())
            })();
            match linked {
                Ok(()) => return Ok(Some(pinned)),
                // A file deleted meanwhile, or a set that does not open (a pass deleted what
                // the linked checkpoint needs): again, a moment later.
                Err(e) => {
                    tracing::debug!(error = %e, "backup: the journal's files changed while they were linked; again");
                    last = Some(e);
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow::anyhow!("no attempt"))
            .context("the journal's files kept changing while the backup linked them"))
    }
}

/// Removes the hard links (`DATA/backup-PID-N.tmp/`) of backups whose process is gone (a
/// killed `drover backup`): at the next backup, and when a server opens the directory.
pub(crate) fn remove_stale_links(data_dir: &Path) {
    let pid_of = |name: &str| {
        name.strip_prefix("backup-")
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(|n| n.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
    };
    for entry in crate::leftovers::of_stopped_processes(data_dir, pid_of) {
        tracing::info!(dir = %entry.path().display(), "backup: removing the links of a backup that did not finish");
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Copies the index checkpoint, then the runs beside it (`journal.log.index/`).
fn copy_index(data_dir: &Path, to: &Path) -> anyhow::Result<()> {
    let name = format!("{}.index", journal::FILE_NAME);
    let (from, into) = (data_dir.join(&name), to.join(&name));
    std::fs::create_dir_all(&into)?;
    copy_synced(&from.join("checkpoint"), &into.join("checkpoint"))?;
    for entry in std::fs::read_dir(&from)? {
        let entry = entry?;
        let file = entry.file_name();
        if file.to_str().is_some_and(|n| n.starts_with("run-")) {
            copy_synced(&entry.path(), &into.join(&file))?;
        }
    }
    File::open(&into)?.sync_all()?;
    Ok(())
}

/// Whether `e` is a write the target refused for want of space or quota: not a journal that
/// changed under the copy.
fn failed_to_write(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull
                    | std::io::ErrorKind::QuotaExceeded
                    | std::io::ErrorKind::ReadOnlyFilesystem
                    | std::io::ErrorKind::PermissionDenied
            )
        })
}

/// Whether `e` is the journal refusing to open for media damage.
fn damaged(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
            journal::Damaged::of(io).is_some() || io.to_string().contains("media damage")
        })
    })
}

/// Removes what a journal copy that failed left in `to`.
fn remove_journal_copy(to: &Path) -> anyhow::Result<()> {
    for segment in journal::SegmentedBackend::list(to)? {
        std::fs::remove_file(&segment.path)?;
    }
    let index = to.join(format!("{}.index", journal::FILE_NAME));
    if index.exists() {
        std::fs::remove_dir_all(index)?;
    }
    Ok(())
}

fn copy_synced(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    File::open(to)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::failed_to_write;

    /// A full target disk is not a journal that changed under the copy: the copy is not
    /// taken again, twice, logging that it changed (a review saw exactly that on ENOSPC).
    #[test]
    fn a_full_target_is_no_journal_that_changed() {
        let full = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::StorageFull))
            .context("copying the journal");
        assert!(failed_to_write(&full));
        let changed = anyhow::Error::from(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "torn commit",
        ))
        .context("checking the copied journal");
        assert!(!failed_to_write(&changed));
    }
}
