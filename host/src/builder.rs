//! Configuring and opening a [`Runtime`]: the one builder, in the wasmtime style (every
//! setting a method over [`Config::default`], whose figures live in
//! [`crate::config::defaults`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::config::Config;
use crate::journal::{Journal, JournalOptions, StorageBackend};
use crate::runtime::Runtime;

/// Everything configurable about a runtime, with defaults that suit a single server (see
/// [`crate::config::defaults`] for each figure and where it comes from).
pub struct RuntimeBuilder {
    data_dir: PathBuf,
    config: Config,
    plugins: Vec<(String, Vec<u8>)>,
    plugin_dirs: Vec<PathBuf>,
    storage: Option<Arc<dyn StorageBackend>>,
}

impl RuntimeBuilder {
    /// The settings as configured so far.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Longest one event (its `handle` and every `apply`) or one other guest call may run
    /// (default 250 ms; guest calls normally take microseconds).
    pub fn call_timeout(mut self, d: Duration) -> Self {
        self.config.engine.call_timeout = d;
        self
    }

    /// Longest one activation (snapshot restore plus the replayed tail) may run (default 5 s).
    pub fn activation_timeout(mut self, d: Duration) -> Self {
        self.config.engine.activation_timeout = d;
        self
    }

    /// Cap on one instance's linear memory (default 64 MiB).
    pub fn max_guest_memory(mut self, bytes: usize) -> Self {
        self.config.engine.max_memory = bytes;
        self
    }

    /// Most bytes all live instances' memories together may grow past their initial sizes
    /// (default a quarter of the machine's memory: see
    /// [`defaults::guest_memory_budget`](crate::config::defaults::guest_memory_budget)).
    pub fn guest_memory_budget(mut self, bytes: u64) -> Self {
        self.config.engine.guest_memory_budget = bytes;
        self
    }

    /// Snapshot a device after this many transitions (default 1,000; 0 disables).
    pub fn snapshot_every(mut self, n: u64) -> Self {
        self.config.actor.snapshot_every = n;
        self
    }

    /// Messages that may wait in one device's mailbox before senders get
    /// [`crate::Error::MailboxFull`] (default 256).
    pub fn mailbox_capacity(mut self, n: usize) -> Self {
        self.config.actor.mailbox = n;
        self
    }

    /// Commands that may wait unacknowledged in one device's outbox before its events from
    /// outside are refused with [`crate::Error::OutboxFull`] (default 1,000), counting the
    /// commands of its events not yet durable. Messages and timer firings are never refused
    /// for it.
    pub fn max_outbox(mut self, n: usize) -> Self {
        self.config.actor.max_outbox = n;
        self
    }

    /// Messages one device may have sent that their targets have not handled yet before its
    /// events from outside are refused with [`crate::Error::MessagesPending`] (default
    /// 1,000): backpressure from a target that falls behind (or is quarantined) to the
    /// devices feeding it. The messages of its events not yet durable count. Messages and
    /// timer firings are never refused for it.
    pub fn max_messages_pending(mut self, n: usize) -> Self {
        self.config.actor.max_messages_pending = n;
        self
    }

    /// Bytes of messages between devices the process holds for targets whose mailbox is
    /// full (default 64 MiB, a message counted as its event, its sender's id and 128 bytes).
    /// Past it, a message for such a target is left in the journal, which owes it anyway,
    /// and so is every later one for that target; from about a second later they are read
    /// back from their records one at a time, as its mailbox makes room, in each sender's
    /// order (`drover_messages_spilled_total`). 0 holds none.
    pub fn max_parked_bytes(mut self, bytes: usize) -> Self {
        self.config.actor.max_parked_bytes = bytes;
        self
    }

    /// Drop a device's instance after this long without a message (default 5 minutes); the
    /// next message reactivates it from snapshot + journal tail.
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.config.actor.idle_timeout = d;
        self
    }

    /// Lay guest memories out with guard pages (see [`crate::config::EngineConfig::guard_pages`]):
    /// faster guest code, at most [`crate::config::defaults::GUARD_PAGES_MAX_LIVE`] live
    /// instances (the cap is lowered to it).
    pub fn guard_pages(mut self, on: bool) -> Self {
        self.config.engine.guard_pages = on;
        if on {
            self.config.actor.max_live = self
                .config
                .actor
                .max_live
                .min(crate::config::defaults::GUARD_PAGES_MAX_LIVE);
        }
        self
    }

    /// Keep at most this many guest instances alive; past it the least recently used
    /// devices are passivated. The default is what the machine can hold
    /// ([`crate::config::defaults::max_live`]: half its memory at ~96 KiB per live actor).
    pub fn max_live_instances(mut self, n: usize) -> Self {
        self.config.actor.max_live = n;
        self
    }

    /// Threads that run actors and guest code, apart from the caller's (HTTP) threads
    /// (default 0: one per core).
    pub fn actor_threads(mut self, n: usize) -> Self {
        self.config.actor.threads = n;
        self
    }

    /// Threads of the slow lane, where the events of plugins that have run slow run (default
    /// 0: half the actor threads, at least one, so that slow guests never take every core
    /// from healthy devices; see `actor::ActorPool`).
    pub fn slow_lane_threads(mut self, n: usize) -> Self {
        self.config.actor.slow_threads = n;
        self
    }

    /// Records per device that may be waiting for the disk (default 128).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.config.actor.max_in_flight = n;
        self
    }

    /// Largest accepted event, in bytes (default 64 KiB, at most 16 MiB so that an event
    /// and its transitions always fit one journal record).
    pub fn max_event_bytes(mut self, n: usize) -> Self {
        self.config.max_event_bytes = n;
        self
    }

    /// Largest total size of the transitions one event may produce (default 1 MiB, at most
    /// 16 MiB).
    pub fn max_output_bytes(mut self, n: usize) -> Self {
        self.config.actor.max_output_bytes = n;
        self
    }

    /// How long the journal writer lets a batch grow once it is under load (default 500 µs;
    /// zero commits as soon as the previous fsync returns).
    pub fn commit_delay(mut self, d: Duration) -> Self {
        self.config.commit_delay = d;
        self
    }

    /// How many record offsets (8 bytes each) the journal index keeps in memory before it
    /// spills the older ones to run files beside the journal (default 4Mi, 32 MiB; 0 keeps
    /// every offset in memory). See `host/src/journal/runs.rs`.
    pub fn index_spill_at(mut self, offsets: u64) -> Self {
        self.config.index_spill_at = offsets;
        self
    }

    /// Bytes of journal between index checkpoints (default 256 MiB; 0: never). A restart
    /// reads the last one and scans only the records after it, so restart time does not grow
    /// with history; a background scrub then reads the records it skipped. See
    /// `host/src/journal/index_checkpoint.rs`. Needs the index to spill (see
    /// [`RuntimeBuilder::index_spill_at`]).
    pub fn index_checkpoint_every(mut self, bytes: u64) -> Self {
        self.config.index_checkpoint_every = bytes;
        self
    }

    /// How fast the scrub after a restart from an index checkpoint reads the records the
    /// restart skipped (default 128 MiB/s; 0: unbounded). See `host/src/journal/scrub.rs`.
    pub fn scrub_rate(mut self, bytes_per_sec: u64) -> Self {
        self.config.scrub_rate = bytes_per_sec;
        self
    }

    /// Bytes after which the journal starts a new segment file (default 256 MiB). Segments
    /// are what retention deletes and backups copy; see `host/src/journal/segments.rs`.
    pub fn journal_segment_bytes(mut self, bytes: u64) -> Self {
        self.config.segment_bytes = bytes;
        self
    }

    /// Which history the journal deletes (default: none). See
    /// `host/src/journal/retention.rs`: whole segments go once every device they hold has a
    /// later snapshot, and nothing it needs to restart.
    pub fn journal_retention(mut self, retention: crate::journal::Retention) -> Self {
        self.config.retention = retention;
        self
    }

    /// How often the runtime looks for devices whose old snapshot held a retention pass back,
    /// to ask them for a fresh snapshot (default 5 s; `None`: never, and segments such a
    /// device holds stay until it snapshots on its own or
    /// [`Runtime::refresh_retention`](crate::Runtime::refresh_retention) is called).
    pub fn retention_refresh(mut self, every: Option<Duration>) -> Self {
        self.config.retention_refresh = every;
        self
    }

    /// Free bytes on the data directory's filesystem under which
    /// [`Runtime::readiness`](crate::Runtime::readiness) (`GET /readyz`) says the server is
    /// not ready (default 64 MiB: one record of the largest size the journal accepts). A
    /// probe, not a limit: writes are tried whatever the free space.
    pub fn min_free_space(mut self, bytes: u64) -> Self {
        self.config.min_free_space = bytes;
        self
    }

    /// Free file descriptors under the process's open-files limit under which
    /// [`Runtime::readiness`](crate::Runtime::readiness) (`GET /readyz`) says the server is
    /// not ready (default [`MIN_FREE_FILES`](crate::config::defaults::MIN_FREE_FILES)). A
    /// probe, not a limit. Checked where the process's descriptors can be counted (Linux's
    /// `/proc/self/fd`).
    pub fn min_free_files(mut self, files: u64) -> Self {
        self.config.min_free_files = files;
        self
    }

    /// How long one group commit (write and `fdatasync`) may be under way before
    /// [`Runtime::readiness`](crate::Runtime::readiness) (`GET /readyz`) says the server is not
    /// ready, `commit-stalled` (default
    /// [`COMMIT_STALLED_AFTER`](crate::config::defaults::COMMIT_STALLED_AFTER)): a disk that
    /// stopped answering holds every event, and the probe is the operator's sign of it. A
    /// probe, not a limit: the commit goes on.
    pub fn commit_stalled_after(mut self, after: Duration) -> Self {
        self.config.commit_stalled_after = after;
        self
    }

    /// Whether to open a journal with media damage by first rewriting it with every intact
    /// record and the lost seqs marked (default false: such a journal is refused, since the
    /// records after the damage were acknowledged; see [`crate::journal::salvage`]). Needs
    /// the journal on its file (not [`RuntimeBuilder::journal_storage`]).
    pub fn salvage_journal(mut self, salvage: bool) -> Self {
        self.config.salvage = salvage;
        self
    }

    /// Registers `bytes` under `name` at start-up (a new version if the bytes changed).
    pub fn plugin(mut self, name: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Self {
        self.plugins.push((name.into(), bytes.into()));
        self
    }

    /// Keeps the journal on `storage` instead of `DATA/journal.log` (failure tests wrap the
    /// file in a [`crate::journal::FaultyBackend`]).
    pub fn journal_storage(mut self, storage: Arc<dyn StorageBackend>) -> Self {
        self.storage = Some(storage);
        self
    }

    /// Registers every `NAME.wasm` in `dir` under `NAME` at start-up.
    pub fn plugin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.plugin_dirs.push(dir.into());
        self
    }

    /// Opens the data directory (taking its lock), recovers the journal, records the engine
    /// settings for offline tools and registers the start-up plugins.
    ///
    /// Settings out of range (see [`Config::validate`]) are refused here, before anything is
    /// opened, with a message naming the setting: a zero output limit, say, would otherwise
    /// fail every event and blame the plugin.
    pub async fn open(self) -> anyhow::Result<Runtime> {
        self.config
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid runtime settings: {e}"))?;
        // Read (and their names checked) before anything is opened or written: a plugin
        // directory the start refuses must leave the data directory as it was.
        let mut plugins = self.plugins;
        for plugin_dir in &self.plugin_dirs {
            plugins.extend(read_plugin_dir(plugin_dir)?);
        }
        let dir = &self.data_dir;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let lock = lock_data_dir(dir)?;
        // A killed `drover backup`'s hard links hold the bytes of segments retention deletes,
        // which it would count as freed.
        crate::backup::remove_stale_links(dir);
        let options = JournalOptions {
            salvage: self.config.salvage,
            commit_delay: self.config.commit_delay,
            index_spill_at: self.config.index_spill_at,
            index_checkpoint_every: self.config.index_checkpoint_every,
            scrub_rate: self.config.scrub_rate,
            segment_bytes: self.config.segment_bytes,
            retention: self.config.retention.clone(),
        };
        let journal = match self.storage {
            Some(_) if options.salvage => {
                anyhow::bail!("salvage rewrites the journal's file: it needs the journal on disk")
            }
            Some(storage) => Journal::open_on(storage, &options),
            None => Journal::open(dir, &options),
        }
        .with_context(|| format!("opening the journal in {}", dir.display()))?;
        // Before anything serves or dispatches: an import stopped part-way is undone.
        crate::export::undo_interrupted_import(dir, &journal).await?;
        self.config
            .engine
            .store(dir)
            .with_context(|| format!("recording the engine settings in {}", dir.display()))?;
        let rt = Runtime::start(dir, journal, self.config, lock)?;

        for (name, bytes) in plugins {
            let before = rt.current_version(&name);
            let (v, new) = rt
                .register_plugin(&name, bytes, crate::registry::Origin::Startup)
                .await
                .with_context(|| format!("registering plugin `{name}`"))?;
            tracing::info!(plugin = %v.name, version = v.version, new, "plugin ready");
            let after = rt.current_version(&name);
            if let (Some(before), Some(after)) = (before, after)
                && before != after
            {
                // A start-up file that changed replaces the current version without the
                // dry-run a deploy makes: say so, the operator may not have meant it.
                tracing::warn!(
                    plugin = %v.name,
                    version = after,
                    was = before,
                    "this plugin's start-up file is not the version that was current: it is \
                     current now, without a dry-run; devices move to it at their next \
                     activation (`drover plugin rollback` returns to the one before)"
                );
            }
        }
        // A version registered by an earlier start is loaded at its first use (a start-up
        // file with the same bytes is not compiled again): one that does not fit this start's
        // limits (a lower `--max-guest-memory`) would show only as its devices failing to
        // activate, one by one. Each current version's precompiled artifact says so at once.
        for v in rt.shared.registry.currents() {
            if let Some(why) = rt.shared.registry.unfit_by_artifact(v.id) {
                tracing::warn!(
                    plugin = %v.plugin,
                    version = v.number,
                    why,
                    "this plugin's current version does not fit this server's limits: its \
                     devices will fail to activate (and be quarantined) until the limits allow \
                     it or another version is deployed"
                );
            }
        }
        Ok(rt)
    }
}

impl Runtime {
    /// Starts configuring a runtime whose journal, plugins and lock live in `data_dir`.
    pub fn builder(data_dir: impl Into<PathBuf>) -> RuntimeBuilder {
        RuntimeBuilder {
            data_dir: data_dir.into(),
            config: Config::default(),
            plugins: Vec::new(),
            plugin_dirs: Vec::new(),
            storage: None,
        }
    }
}

/// Reads every `NAME.wasm` in `dir`.
fn read_plugin_dir(dir: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading plugin dir {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wasm") {
            // Hidden files are an editor's or a copy's leftovers (`.#x.wasm`, `._x.wasm`),
            // not plugins: `.x` would have become a plugin named so.
            if path
                .file_name()
                .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
            {
                tracing::debug!(file = %path.display(), "hidden file in the plugin directory: skipped");
                continue;
            }
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .with_context(|| format!("plugin file name {} is not UTF-8", path.display()))?
                .to_string();
            crate::error::validate_id(&name)
                .map_err(|e| anyhow::anyhow!("{}: not a plugin name: {e}", path.display()))?;
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            out.push((name, bytes));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The exclusive lock on a data directory, held while a runtime (or an import) writes it.
pub(crate) struct DataDirLock {
    _file: File,
    _dir: Option<File>,
}

/// Takes an exclusive lock on the data directory so two processes never write one journal.
///
/// Two locks: one on the `LOCK` file, and one on the directory itself. The file alone was
/// defeated by deleting it while a server ran (a review): the next server created a new
/// `LOCK`, locked that, and both wrote the journal, acknowledging the same seqs for
/// different events. The directory cannot be replaced under a running server that way. (A
/// file system that cannot lock a directory keeps the file's lock alone, with a warning.)
pub(crate) fn lock_data_dir(dir: &Path) -> anyhow::Result<DataDirLock> {
    let in_use = || {
        anyhow::anyhow!(
            "data directory {} is in use by another Drover process",
            dir.display()
        )
    };
    let directory = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let directory = match directory.try_lock() {
        Ok(()) => Some(directory),
        Err(std::fs::TryLockError::WouldBlock) => return Err(in_use()),
        Err(std::fs::TryLockError::Error(e)) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot lock the data directory itself; relying on its LOCK file alone");
            None
        }
    };
    let path = dir.join("LOCK");
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(DataDirLock {
            _file: file,
            _dir: directory,
        }),
        Err(std::fs::TryLockError::WouldBlock) => Err(in_use()),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}
