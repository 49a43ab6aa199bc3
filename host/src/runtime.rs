//! The runtime: the public face of Drover as a library.
//!
//! A [`Runtime`] owns the journal, the plugin registry, the engine and the router from device
//! ids to live actors. Everything else (the HTTP server, the CLI, the benchmarks, embedders)
//! goes through its methods. It is configured in one place, [`RuntimeBuilder`].
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let rt = drover::Runtime::builder("./data")
//!     .plugin_dir("./plugins-out")
//!     .snapshot_every(500)
//!     .open()
//!     .await?;
//! rt.provision("hall", "thermostat", &serde_json::json!({"setpoint": 21.0})).await?;
//! let ack = rt.send("hall", r#"{"type":"reading","celsius":19.0}"#).await?;
//! println!("seq {} -> {:?}", ack.seq, ack.transitions);
//! rt.shutdown().await;
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, oneshot};

use crate::actor::{self, ActorConfig, ActorHandle, Committed, Message};
use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, validate_id};
use crate::journal::{DeviceInfo, IndexEffect, Journal, Record, Recovery};
use crate::metrics::Metrics;
use crate::registry::{PluginVersion, Registry};
use crate::replay::{self, DeviceHead, Start};

/// Everything configurable about a runtime, with defaults that suit a single server.
pub struct RuntimeBuilder {
    data_dir: PathBuf,
    engine: EngineConfig,
    actor: ActorConfig,
    max_event_bytes: usize,
    plugins: Vec<(String, Vec<u8>)>,
    plugin_dirs: Vec<PathBuf>,
    salvage: bool,
}

impl RuntimeBuilder {
    /// Longest a guest call may run (default 250 ms; guest calls normally take microseconds).
    pub fn call_timeout(mut self, d: Duration) -> Self {
        self.engine.call_timeout = d;
        self
    }

    /// Cap on one instance's linear memory (default 64 MiB).
    pub fn max_guest_memory(mut self, bytes: usize) -> Self {
        self.engine.max_memory = bytes;
        self
    }

    /// Snapshot a device after this many transitions (default 1,000; 0 disables).
    pub fn snapshot_every(mut self, n: u64) -> Self {
        self.actor.snapshot_every = n;
        self
    }

    /// Messages that may wait in one device's mailbox before senders get
    /// [`Error::MailboxFull`] (default 256).
    pub fn mailbox_capacity(mut self, n: usize) -> Self {
        self.actor.mailbox = n.max(1);
        self
    }

    /// Drop a device's instance after this long without a message (default 5 minutes); the
    /// next message reactivates it from snapshot + journal tail.
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.actor.idle_timeout = d;
        self
    }

    /// Keep at most this many guest instances alive (default 14,000); past it the least
    /// recently used devices are passivated. Each instance reserves address space and memory
    /// mappings, so one process cannot hold more than ~16k with wasmtime's default memory
    /// settings (see `shared/WASMTIME-NOTES.md`).
    pub fn max_live_instances(mut self, n: usize) -> Self {
        self.actor.max_live = n.max(1);
        self
    }

    /// Records per device that may be waiting for the disk (default 128).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.actor.max_in_flight = n.max(1);
        self
    }

    /// Largest accepted event, in bytes (default 64 KiB, at most 16 MiB so that an event
    /// and its transitions always fit one journal record).
    pub fn max_event_bytes(mut self, n: usize) -> Self {
        self.max_event_bytes = n.min(MAX_PAYLOAD_LIMIT);
        self
    }

    /// Largest total size of the transitions one event may produce (default 1 MiB, at most
    /// 16 MiB).
    pub fn max_output_bytes(mut self, n: usize) -> Self {
        self.actor.max_output_bytes = n.min(MAX_PAYLOAD_LIMIT);
        self
    }

    /// Whether to open a journal that is damaged before its tail by cutting it at the first
    /// bad record (default false: such a journal is refused, since the records after the
    /// damage were acknowledged; see [`crate::journal`]).
    pub fn salvage_journal(mut self, salvage: bool) -> Self {
        self.salvage = salvage;
        self
    }

    /// Registers `bytes` under `name` at start-up (a new version if the bytes changed).
    pub fn plugin(mut self, name: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Self {
        self.plugins.push((name.into(), bytes.into()));
        self
    }

    /// Registers every `NAME.wasm` in `dir` under `NAME` at start-up.
    pub fn plugin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.plugin_dirs.push(dir.into());
        self
    }

    /// Opens the data directory (taking its lock), recovers the journal and registers the
    /// start-up plugins.
    pub async fn open(self) -> anyhow::Result<Runtime> {
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("creating {}", self.data_dir.display()))?;
        let lock = lock_data_dir(&self.data_dir)?;
        let opened = if self.salvage {
            Journal::open_salvaging(&self.data_dir)
        } else {
            Journal::open(&self.data_dir)
        };
        let (journal, recovery) = opened
            .with_context(|| format!("opening the journal in {}", self.data_dir.display()))?;
        if let Some(d) = &recovery.dropped {
            tracing::warn!(offset = d.offset, bytes = d.bytes, reason = %d.reason, "journal tail was dropped on open");
        }
        let engine = Engine::new(self.engine.clone()).context("creating the wasm engine")?;
        let registry = Registry::new(engine, journal.clone(), &self.data_dir)
            .context("opening the plugin registry")?;
        let next_device = journal.index().next_device_num();
        let shared = Arc::new(Shared {
            journal,
            registry,
            actor: self.actor,
            metrics: Metrics::default(),
            max_event_bytes: self.max_event_bytes,
            actors: RwLock::new(HashMap::new()),
            provisioning: Mutex::new(HashSet::new()),
            next_device: AtomicU32::new(next_device),
            closing: AtomicBool::new(false),
            evicting: AtomicBool::new(false),
            recovery,
            lock: Mutex::new(Some(lock)),
        });
        let rt = Runtime { shared };

        let mut plugins = self.plugins;
        for dir in &self.plugin_dirs {
            plugins.extend(read_plugin_dir(dir)?);
        }
        for (name, bytes) in plugins {
            let (v, new) = rt
                .register_plugin(&name, bytes)
                .await
                .with_context(|| format!("registering plugin `{name}`"))?;
            tracing::info!(plugin = %v.name, version = v.version, new, "plugin ready");
        }
        Ok(rt)
    }
}

/// Ceiling of the event and output limits: both at their maximum still fit one journal record
/// ([`crate::journal::record::MAX_BODY_LEN`], 64 MiB) with room to spare.
const MAX_PAYLOAD_LIMIT: usize = 16 * 1024 * 1024;

/// Reads every `NAME.wasm` in `dir`.
fn read_plugin_dir(dir: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading plugin dir {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wasm") {
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .with_context(|| format!("plugin file name {} is not UTF-8", path.display()))?
                .to_string();
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            out.push((name, bytes));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Takes an exclusive lock on the data directory so two processes never write one journal.
fn lock_data_dir(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join("LOCK");
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "data directory {} is in use by another Drover process",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// State shared by the runtime handle and every actor.
pub(crate) struct Shared {
    pub journal: Journal,
    pub registry: Registry,
    pub actor: ActorConfig,
    pub metrics: Metrics,
    max_event_bytes: usize,
    actors: RwLock<HashMap<Arc<str>, ActorHandle>>,
    provisioning: Mutex<HashSet<String>>,
    next_device: AtomicU32,
    closing: AtomicBool,
    /// Set while an LRU passivation sweep is running, so activations do not pile up sweeps.
    evicting: AtomicBool,
    recovery: Recovery,
    /// The data directory's lock, released by [`Runtime::shutdown`] so the directory can be
    /// reopened in the same process.
    lock: Mutex<Option<File>>,
}

impl Shared {
    /// Removes an idle actor from the router, if nobody can still send to it: its mailbox is
    /// empty and the router holds the only sender. Both are checked under the router's write
    /// lock, which is where every new sender is cloned, so no message can slip in afterwards.
    pub(crate) fn retire(&self, id: &str, rx: &mpsc::Receiver<Message>) -> bool {
        let mut actors = self.actors.write();
        if !rx.is_empty() || rx.sender_strong_count() > 1 {
            return false;
        }
        actors.remove(id).is_some()
    }

    /// Asks the least recently used live actors to passivate until the live count is 10%
    /// under the cap (the margin keeps a busy runtime from sweeping on every activation).
    pub(crate) fn evict_lru(self: &Arc<Self>) {
        if self.evicting.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = self.clone();
        tokio::spawn(async move {
            let cap = shared.actor.max_live as u64;
            let target = cap - cap / 10;
            let live = shared.metrics.live_instances.load(Ordering::Relaxed);
            if live > target {
                let mut candidates: Vec<(u64, mpsc::Sender<Message>)> = shared
                    .actors
                    .read()
                    .values()
                    .filter(|a| a.activity.live.load(Ordering::Relaxed))
                    .map(|a| {
                        (
                            a.activity.last_used_ms.load(Ordering::Relaxed),
                            a.tx.clone(),
                        )
                    })
                    .collect();
                candidates.sort_unstable_by_key(|c| c.0);
                let excess = (live - target) as usize;
                tracing::debug!(live, cap, excess, "passivating least recently used devices");
                for (_, tx) in candidates.into_iter().take(excess) {
                    // A full mailbox means the device is busy, hence not a good victim anyway.
                    let _ = tx.try_send(Message::Passivate);
                }
            }
            shared.evicting.store(false, Ordering::Release);
        });
    }
}

/// An id being provisioned; released on drop.
struct ProvisionClaim {
    shared: Arc<Shared>,
    id: String,
}

impl Drop for ProvisionClaim {
    fn drop(&mut self) {
        self.shared.provisioning.lock().remove(&self.id);
    }
}

/// A provisioned device as stored (no state).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceSummary {
    pub id: String,
    pub plugin: String,
    pub version: u32,
    pub seq: u64,
    pub config: serde_json::Value,
    pub created_at_ms: u64,
}

/// A device with its current state.
#[derive(Debug, Clone)]
pub struct DeviceView {
    pub summary: DeviceSummary,
    /// `active` (an instance is live) or `inactive`.
    pub status: &'static str,
    /// The guest's `query` answer, JSON text.
    pub state: String,
}

/// One journal record as shown to users.
#[derive(Debug, Clone)]
pub struct JournalEntry {
    pub seq: u64,
    pub at_ms: u64,
    pub plugin: String,
    pub version: u32,
    /// JSON text.
    pub event: String,
    /// JSON texts.
    pub transitions: Vec<String>,
}

/// One page of a device's journal.
#[derive(Debug, Clone)]
pub struct JournalPage {
    pub records: Vec<JournalEntry>,
    /// The seq to ask for next, if there are more records.
    pub next: Option<u64>,
}

/// The runtime handle. Cheap to clone; see the module docs.
#[derive(Clone)]
pub struct Runtime {
    shared: Arc<Shared>,
}

impl Runtime {
    /// Starts configuring a runtime whose journal, plugins and lock live in `data_dir`.
    pub fn builder(data_dir: impl Into<PathBuf>) -> RuntimeBuilder {
        RuntimeBuilder {
            data_dir: data_dir.into(),
            engine: EngineConfig::default(),
            actor: ActorConfig {
                mailbox: 256,
                max_in_flight: 128,
                snapshot_every: 1000,
                max_output_bytes: 1024 * 1024,
                idle_timeout: Duration::from_secs(300),
                max_live: 14_000,
            },
            max_event_bytes: 64 * 1024,
            plugins: Vec::new(),
            plugin_dirs: Vec::new(),
            salvage: false,
        }
    }

    /// What opening the journal found (a dropped tail, if any).
    pub fn recovery(&self) -> &Recovery {
        &self.shared.recovery
    }

    /// The journal (read access for tools and tests).
    pub fn journal(&self) -> &Journal {
        &self.shared.journal
    }

    /// Counters and histograms.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Validates and registers a plugin version (a no-op returning the existing version if
    /// the newest version of `name` has the same bytes). The bool says whether it is new.
    pub async fn register_plugin(
        &self,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<(PluginVersion, bool), Error> {
        self.shared.registry.register(name, bytes).await
    }

    /// Every plugin and its versions.
    pub fn plugins(&self) -> Vec<(String, Vec<PluginVersion>)> {
        self.shared.registry.list()
    }

    /// Creates device `id` running the newest version of `plugin` with `config`. Idempotent:
    /// the same plugin and config again answer the existing device with `false`; another
    /// plugin or config is a [`Error::DeviceConflict`]. The config is checked by running the
    /// plugin's `init` on it before anything is written.
    pub async fn provision(
        &self,
        id: &str,
        plugin: &str,
        config: &serde_json::Value,
    ) -> Result<(DeviceSummary, bool), Error> {
        let result = self.provision_inner(id, plugin, config).await;
        if let Err(e) = &result {
            self.shared.metrics.error(e.code());
        }
        result
    }

    async fn provision_inner(
        &self,
        id: &str,
        plugin: &str,
        config: &serde_json::Value,
    ) -> Result<(DeviceSummary, bool), Error> {
        validate_id(id)?;
        self.check_open()?;
        let config_text =
            serde_json::to_string(config).map_err(|e| Error::MalformedConfig(e.to_string()))?;
        // One provisioning per id at a time, from before the existence check until the record
        // is durable (the guard releases it on every path, cancellation included): two
        // concurrent PUTs must never both find the id free and create it twice.
        let _claim = self.claim_provisioning(id).await?;
        if let Some(existing) = self.summary(id) {
            return if existing.plugin == plugin && existing.config == *config {
                Ok((existing, false))
            } else {
                Err(Error::DeviceConflict {
                    id: id.to_string(),
                    plugin: existing.plugin,
                })
            };
        }
        let version = self
            .shared
            .registry
            .latest(plugin)
            .ok_or_else(|| Error::UnknownPlugin(plugin.to_string()))?;

        // Trial init: a config the plugin refuses would make a device that can never activate.
        let compiled = self.shared.registry.compiled(version.id)?;
        let mut trial = compiled.instantiate(Arc::from(id))?;
        trial.init(id, &config_text).map_err(|e| match e {
            crate::engine::CallError::Rejected { code, message } => {
                Error::MalformedConfig(format!("{code}: {message}"))
            }
            other => Error::from(other),
        })?;
        drop(trial);

        let num = self.shared.next_device.fetch_add(1, Ordering::Relaxed);
        let at_ms = crate::clock::now_ms();
        let record = Record::Device {
            num,
            id: id.to_string(),
            version: version.id,
            config: config_text.clone().into_bytes(),
            at_ms,
        };
        let effect = IndexEffect::Device(DeviceInfo {
            num,
            id: Arc::from(id),
            version: version.id,
            config: Arc::from(config_text.as_bytes()),
            created_at_ms: at_ms,
            events: Vec::new(),
            snapshots: Vec::new(),
        });
        self.shared.journal.append(&record, effect).await?;
        tracing::info!(
            device = id,
            plugin,
            version = version.number,
            "device provisioned"
        );
        let summary = self
            .summary(id)
            .ok_or_else(|| Error::Internal("provisioned device missing from the index".into()))?;
        Ok((summary, true))
    }

    /// Waits (briefly) until no other provisioning of `id` is under way, and claims it.
    async fn claim_provisioning(&self, id: &str) -> Result<ProvisionClaim, Error> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if self.shared.provisioning.lock().insert(id.to_string()) {
                return Ok(ProvisionClaim {
                    shared: self.shared.clone(),
                    id: id.to_string(),
                });
            }
            if Instant::now() > deadline {
                return Err(Error::Internal(format!(
                    "device `{id}` has been being provisioned for 5 s"
                )));
            }
            // The other provisioning finishes within one group commit.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The stored description of device `id`, if provisioned.
    pub fn summary(&self, id: &str) -> Option<DeviceSummary> {
        let index = self.shared.journal.index();
        let d = index.device(id)?;
        let v = index.versions.get(d.version as usize)?;
        Some(DeviceSummary {
            id: d.id.to_string(),
            plugin: v.plugin.clone(),
            version: v.number,
            seq: d.seq(),
            config: serde_json::from_slice(&d.config).unwrap_or(serde_json::Value::Null),
            created_at_ms: d.created_at_ms,
        })
    }

    /// Ids of every provisioned device, sorted.
    pub fn device_ids(&self) -> Vec<String> {
        let index = self.shared.journal.index();
        let mut ids: Vec<String> = index.by_id.keys().map(|k| k.to_string()).collect();
        ids.sort();
        ids
    }

    /// Sends one event (JSON text) to device `id` and waits until the record it produced is
    /// durable. Fails fast with [`Error::MailboxFull`] when the device is saturated.
    pub async fn send(&self, id: &str, event: &str) -> Result<Committed, Error> {
        let checked = self.check_size(event).and_then(|()| {
            serde_json::from_str::<serde::de::IgnoredAny>(event)
                .map(drop)
                .map_err(|e| Error::MalformedEvent(e.to_string()))
        });
        let result = match checked {
            Ok(()) => self.send_valid(id, event).await,
            Err(e) => Err(e),
        };
        self.count_refusal(result)
    }

    /// [`Runtime::send`] for an event that is already known to be JSON (a `RawValue` can only
    /// hold valid JSON), as in a gateway batch: skips parsing it a second time.
    pub async fn send_json(
        &self,
        id: &str,
        event: &serde_json::value::RawValue,
    ) -> Result<Committed, Error> {
        let result = match self.check_size(event.get()) {
            Ok(()) => self.send_valid(id, event.get()).await,
            Err(e) => Err(e),
        };
        self.count_refusal(result)
    }

    fn check_size(&self, event: &str) -> Result<(), Error> {
        if event.len() > self.shared.max_event_bytes {
            return Err(Error::PayloadTooLarge {
                size: event.len(),
                limit: self.shared.max_event_bytes,
            });
        }
        Ok(())
    }

    /// Counts the refusals made before the actor; errors raised inside it are counted there.
    fn count_refusal(&self, result: Result<Committed, Error>) -> Result<Committed, Error> {
        if let Err(
            e @ (Error::UnknownDevice(_)
            | Error::MalformedEvent(_)
            | Error::PayloadTooLarge { .. }
            | Error::MailboxFull
            | Error::ShuttingDown
            | Error::InvalidId(_)),
        ) = &result
        {
            self.shared.metrics.error(e.code());
        }
        result
    }

    async fn send_valid(&self, id: &str, event: &str) -> Result<Committed, Error> {
        let (reply, rx) = oneshot::channel();
        let msg = Message::Event {
            event: event.to_string(),
            accepted: Instant::now(),
            reply,
        };
        self.deliver(id, msg)?;
        rx.await.unwrap_or(Err(Error::ShuttingDown))
    }

    /// Reads device `id` with its current durable state (activating it if needed).
    pub async fn device(&self, id: &str) -> Result<DeviceView, Error> {
        let (reply, rx) = oneshot::channel();
        self.deliver(id, Message::Query { reply })?;
        let snap = rx.await.unwrap_or(Err(Error::ShuttingDown))?;
        let mut summary = self
            .summary(id)
            .ok_or_else(|| Error::UnknownDevice(id.to_string()))?;
        summary.seq = snap.seq;
        Ok(DeviceView {
            summary,
            status: "active",
            state: snap.state,
        })
    }

    /// The guest's snapshot bytes of device `id`'s current durable state, with the seq they
    /// cover. For inspection and for checking that a rebuilt device equals the live one.
    pub async fn export_snapshot(&self, id: &str) -> Result<(u64, Vec<u8>), Error> {
        let (reply, rx) = oneshot::channel();
        self.deliver(id, Message::Export { reply })?;
        rx.await.unwrap_or(Err(Error::ShuttingDown))
    }

    /// Reads up to `limit` journal records of device `id` starting at seq `from`.
    pub fn journal_page(&self, id: &str, from: u64, limit: usize) -> Result<JournalPage, Error> {
        let head = DeviceHead::load(&self.shared.journal, id)?;
        let from = from.max(1);
        let limit = limit.clamp(1, 1000) as u64;
        let last = from.saturating_add(limit - 1).min(head.seq);
        // A page also stops at ~4 MiB of records, so one request cannot pull a thousand
        // megabyte-sized records into memory; `next` continues where it stopped.
        const PAGE_BYTES: usize = 4 * 1024 * 1024;
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let mut to = from.saturating_sub(1);
        while to < last && bytes < PAGE_BYTES {
            let chunk_end = (to + 64).min(last);
            let chunk = self
                .shared
                .journal
                .read_events(head.num, to + 1, chunk_end)?;
            if chunk.is_empty() {
                break;
            }
            for r in chunk {
                bytes += r.event.len() + r.transitions.iter().map(Vec::len).sum::<usize>();
                to = r.seq;
                records.push(r);
                if bytes >= PAGE_BYTES {
                    break;
                }
            }
        }
        let versions: Vec<(String, u32)> = self
            .shared
            .journal
            .index()
            .versions
            .iter()
            .map(|v| (v.plugin.clone(), v.number))
            .collect();
        let text = |b: Vec<u8>| {
            String::from_utf8(b)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
        };
        let records: Vec<JournalEntry> = records
            .into_iter()
            .map(|r| {
                let (plugin, version) = versions
                    .get(r.version as usize)
                    .cloned()
                    .unwrap_or_default();
                JournalEntry {
                    seq: r.seq,
                    at_ms: r.at_ms,
                    plugin,
                    version,
                    event: text(r.event),
                    transitions: r.transitions.into_iter().map(text).collect(),
                }
            })
            .collect();
        let next = (to < head.seq).then_some(to + 1);
        Ok(JournalPage { records, next })
    }

    /// The state of device `id` right after record `seq` (0: right after provisioning),
    /// rebuilt from the journal without touching the live actor.
    pub async fn state_at(&self, id: &str, seq: u64) -> Result<actor::Snapshot, Error> {
        let head = DeviceHead::load(&self.shared.journal, id)?;
        if seq > head.seq {
            return Err(Error::SeqOutOfRange {
                requested: seq,
                latest: head.seq,
            });
        }
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let mut rebuilt = replay::rebuild(
                &shared.journal,
                &shared.registry,
                &head,
                seq,
                Start::Snapshot,
            )?;
            let state = rebuilt.instance.query()?;
            Ok(actor::Snapshot {
                seq: rebuilt.seq,
                state,
            })
        })
        .await
        .map_err(|e| Error::Internal(format!("replay task: {e}")))?
    }

    /// Number of devices with an actor (a task and mailbox; its instance may be passivated).
    pub fn live_actors(&self) -> usize {
        self.shared.actors.read().len()
    }

    /// Prometheus text with the runtime's counters and gauges.
    pub fn render_metrics(&self) -> String {
        let (devices, durable_len) = {
            let index = self.shared.journal.index();
            (index.devices.len() as u64, index.durable_len)
        };
        let stats = self.shared.journal.stats();
        self.shared.metrics.render(&[
            (
                "drover_live_actors",
                "Devices with a live actor.",
                self.live_actors() as u64,
            ),
            ("drover_devices", "Provisioned devices.", devices),
            (
                "drover_journal_bytes",
                "Size of the durable journal.",
                durable_len,
            ),
            (
                "drover_journal_commits",
                "Group commits (fsyncs) since start.",
                stats.commits.load(Ordering::Relaxed),
            ),
            (
                "drover_journal_commit_failures",
                "Failed group commits since start.",
                stats.commit_failures.load(Ordering::Relaxed),
            ),
        ])
    }

    /// Stops taking requests, lets every actor finish the messages already in its mailbox,
    /// waits until their records are durable, and stops the journal writer.
    pub async fn shutdown(&self) {
        if self.shared.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        let actors: Vec<ActorHandle> = self.shared.actors.write().drain().map(|(_, a)| a).collect();
        let n = actors.len();
        for a in actors {
            // Dropping the last sender closes the mailbox; the actor exits after draining it.
            a.closed().await;
        }
        if let Err(e) = self.shared.journal.barrier().await {
            tracing::error!(error = %e, "final journal flush failed");
        }
        self.shared.journal.close();
        self.shared.lock.lock().take();
        tracing::info!(actors = n, "runtime stopped");
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.shared.closing.load(Ordering::Acquire) {
            Err(Error::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// Puts `msg` into device `id`'s mailbox, starting its actor if it has none.
    fn deliver(&self, id: &str, msg: Message) -> Result<(), Error> {
        self.check_open()?;
        let tx = self.mailbox(id)?;
        match tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(Error::MailboxFull),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Error::ShuttingDown),
        }
    }

    fn mailbox(&self, id: &str) -> Result<mpsc::Sender<Message>, Error> {
        if let Some(a) = self.shared.actors.read().get(id) {
            return Ok(a.tx.clone());
        }
        let head = DeviceHead::load(&self.shared.journal, id).map_err(|e| match e {
            Error::UnknownDevice(_) if validate_id(id).is_err() => {
                validate_id(id).err().unwrap_or(e)
            }
            other => other,
        })?;
        let mut actors = self.shared.actors.write();
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let handle = actors
            .entry(head.id.clone())
            .or_insert_with(|| actor::spawn(self.shared.clone(), head));
        Ok(handle.tx.clone())
    }
}
