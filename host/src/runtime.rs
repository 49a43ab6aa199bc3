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

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::actor::{ActorEnv, ActorPool, ExternalEvent, Message};
use crate::config::Config;
use crate::dispatch::{Dispatcher, Postman};
use crate::engine::{CallError, Engine, Preemption};
use crate::error::{Error, validate_id};
use crate::journal::{DeviceHead, Journal, Recovery, ScrubState};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::registry::{Origin, PluginVersion, Registered, Registry};
use crate::replay::{self, Start};
use crate::router::Router;
use crate::timers::TimerWheel;
use crate::view::{
    Committed, DeadLetterView, DeviceState, DeviceStatus, DeviceSummary, DeviceView, JournalEntry,
    JournalPage, JournalStatus, PendingUpgrade, QuarantineView,
};

/// The runtime handle. Cheap to clone; see the module docs.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) shared: Arc<Shared>,
}

/// What every clone of the handle shares.
pub(crate) struct Shared {
    pub(crate) journal: Journal,
    pub(crate) registry: Arc<Registry>,
    pub(crate) router: Arc<Router>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) config: Config,
    /// Set once shutdown starts: new requests are refused.
    pub(crate) closing: AtomicBool,
    /// Ids being provisioned right now (see [`Runtime::provision`]).
    pub(crate) provisioning: Mutex<HashSet<String>>,
    /// The data directory's lock, released by [`Runtime::shutdown`] so the directory can be
    /// reopened in the same process.
    pub(crate) lock: Mutex<Option<crate::builder::DataDirLock>>,
    /// The actors' threads; stopped by [`Runtime::shutdown`] (or when the last handle goes).
    pub(crate) pool: Mutex<Option<ActorPool>>,
    /// One deploy or rollback at a time (see `crate::deploy`).
    pub(crate) deploying: tokio::sync::Mutex<()>,
    /// Dry-runs asked for (not a deploy's own sample) run this many at a time, one per core;
    /// the others wait their turn. Each holds a device's history and instances of the
    /// candidate while it runs: 30 at once on a device of 240 MB of history took a server
    /// to 1.4 GB (a review).
    pub(crate) dry_runs: tokio::sync::Semaphore,
    /// Turns of [`Shared::dry_runs`]: how many there are, and how many dry-runs wait for one.
    pub(crate) dry_run_turns: usize,
    pub(crate) dry_runs_waiting: std::sync::atomic::AtomicUsize,
    /// The data directory (archives of removed devices go under it).
    pub(crate) data_dir: std::path::PathBuf,
    /// Provisioning holds it shared, removing plugin versions exclusively: no device can be
    /// bound to a version while it is being removed.
    pub(crate) binding: tokio::sync::RwLock<()>,
    /// Every pending timer of the fleet, by due time (see `crate::timers`).
    pub(crate) timers: Arc<TimerWheel>,
    /// Who waits for which device's commands (see `crate::outbox`).
    pub(crate) outbox: Arc<Outbox>,
    /// The dispatcher and the timer wheel's task, stopped at shutdown.
    pub(crate) effect_tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Devices retention asked for a snapshot, with the pass count then: not asked again
    /// for [`RETENTION_ASK_AGAIN_AFTER`] passes (one that cannot snapshot, or is busy, is
    /// not asked at every pass).
    retention_asked: Mutex<std::collections::HashMap<String, u64>>,
    /// Commands being acknowledged right now (device number, command id): see
    /// `Runtime::ack_command`.
    pub(crate) acking: Mutex<HashSet<(u32, crate::journal::EffectId)>>,
    /// The filesystem checks of `GET /readyz`, one at a time (see `crate::readiness`).
    pub(crate) probe: Arc<crate::readiness::Probe>,
}

/// An id being provisioned; released on drop.
pub(crate) struct ProvisionClaim {
    shared: Arc<Shared>,
    id: String,
}

impl Drop for ProvisionClaim {
    fn drop(&mut self) {
        self.shared.provisioning.lock().remove(&self.id);
    }
}

impl Runtime {
    /// Wires the parts together over an opened journal (see [`crate::RuntimeBuilder::open`]).
    pub(crate) fn start(
        data_dir: &Path,
        journal: Journal,
        config: Config,
        lock: crate::builder::DataDirLock,
    ) -> anyhow::Result<Runtime> {
        if let Some(memory) = crate::config::defaults::memory()
            && config.engine.guest_memory_budget > memory
        {
            tracing::warn!(
                budget_bytes = config.engine.guest_memory_budget,
                machine_bytes = memory,
                "the guest memory budget is larger than this machine's memory: the kernel may \
                 kill the server before the budget refuses a growth"
            );
        }
        let engine = Engine::new(config.engine.clone()).context("creating the wasm engine")?;
        let registry = Arc::new(
            Registry::open(engine, journal.clone(), data_dir)
                .context("opening the plugin registry")?,
        );
        let metrics = Arc::new(Metrics::default());
        let threads = match config.actor.threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let pool = ActorPool::new(threads, config.actor.slow_lane_threads(threads))
            .context("starting the actor threads")?;
        let handle = pool.handle();
        let (dispatch, owed) = tokio::sync::mpsc::unbounded_channel();
        let router = Router::new(|directory| ActorEnv {
            journal: journal.clone(),
            registry: registry.clone(),
            metrics: metrics.clone(),
            config: config.actor.clone(),
            call_timeout: config.engine.call_timeout,
            activation_timeout: config.engine.activation_timeout,
            directory,
            closing: Default::default(),
            pool: handle.clone(),
            slow_lane: pool.slow_lane(),
            upgrade_failures: crate::upgrade::FailedUpgrades::open(&data_dir.join("plugins")),
            slow_folds: Default::default(),
            snapshots_off: Default::default(),
            upgrades_stopped: Default::default(),
            dispatch,
            rebuild_log: Default::default(),
            refused_log: Default::default(),
            live_slots: crate::actor::LiveSlots::new(config.actor.max_live),
        });
        // A growth the guest memory budget refuses, wherever it happens (an event, a read, a
        // snapshot, a dry-run), makes the router passivate instances that hold memory.
        let relief = Arc::downgrade(&router);
        registry.engine().on_guest_memory_refusal(move || {
            if let Some(router) = relief.upgrade() {
                router.relieve_memory();
            }
        });
        let postman = Postman::new(
            Arc::downgrade(&router),
            journal.clone(),
            metrics.clone(),
            handle.clone(),
            config.actor.max_parked_bytes,
        );
        let timers = Arc::new(TimerWheel::default());
        let outbox = Arc::new(Outbox::default());
        let dispatcher = Dispatcher::new(
            journal.clone(),
            postman.clone(),
            timers.clone(),
            outbox.clone(),
        );
        let mut effect_tasks = vec![
            handle.spawn(dispatcher.run(owed)),
            handle.spawn(timers.clone().run(journal.clone(), postman)),
        ];
        let dry_run_turns = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let rt = Runtime {
            shared: Arc::new(Shared {
                journal,
                registry,
                router,
                metrics,
                config,
                closing: AtomicBool::new(false),
                provisioning: Mutex::new(HashSet::new()),
                lock: Mutex::new(Some(lock)),
                pool: Mutex::new(Some(pool)),
                deploying: tokio::sync::Mutex::new(()),
                dry_runs: tokio::sync::Semaphore::new(dry_run_turns),
                dry_run_turns,
                dry_runs_waiting: Default::default(),
                data_dir: data_dir.to_path_buf(),
                binding: tokio::sync::RwLock::new(()),
                timers,
                outbox,
                effect_tasks: Mutex::new(Vec::new()),
                retention_asked: Mutex::new(std::collections::HashMap::new()),
                acking: Mutex::new(HashSet::new()),
                probe: Default::default(),
            }),
        };
        if rt.shared.config.retention.policy != crate::journal::RetentionPolicy::KeepAll {
            effect_tasks.push(handle.spawn(refresh_retention(Arc::downgrade(&rt.shared))));
        }
        *rt.shared.effect_tasks.lock() = effect_tasks;
        rt.sweep_unfinished_archives();
        Ok(rt)
    }

    /// The settings this runtime was opened with.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// What opening the journal found (a dropped tail, if any).
    pub fn recovery(&self) -> &Recovery {
        self.shared.journal.recovery()
    }

    /// The journal's read side (for tools and tests; appends go through the actors).
    pub fn journal(&self) -> &Journal {
        &self.shared.journal
    }

    /// Counters and histograms.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Counts an error returned to a caller: every public method answers through here, so
    /// each failure is counted exactly once, whatever raised it.
    pub(crate) fn counted<T>(&self, result: Result<T, Error>) -> Result<T, Error> {
        if let Err(e) = &result {
            self.shared.metrics.error(e.kind());
        }
        result
    }

    /// Runs `work` in a task of its own and waits for it. For work that writes to the journal
    /// and then updates what the runtime holds in memory: a caller that goes away (an HTTP
    /// client hanging up, a timeout) drops its future at any await, and half-done work of
    /// this kind left them disagreeing (a version id or a device id given twice, which the
    /// next open refuses as damage). The task finishes whatever happens to the caller.
    pub(crate) async fn detached<T: Send + 'static>(
        what: &str,
        work: impl Future<Output = Result<T, Error>> + Send + 'static,
    ) -> Result<T, Error> {
        tokio::spawn(work)
            .await
            .unwrap_or_else(|e| Err(Error::Internal(format!("{what} task: {e}"))))
    }

    /// Validates and registers a plugin version (a no-op returning the existing version if
    /// a version of `name` has the same bytes). The bool says whether it is new. Whether it
    /// becomes the current version depends on `origin` (see [`crate::registry`]): an upload
    /// never changes what devices run; [`Runtime::deploy`] does.
    pub async fn register_plugin(
        &self,
        name: &str,
        bytes: Vec<u8>,
        origin: Origin,
    ) -> Result<(PluginVersion, bool), Error> {
        self.register_plugin_reporting(name, bytes, origin)
            .await
            .map(|(v, registered)| (v, registered == Registered::New))
    }

    /// [`Runtime::register_plugin`], saying also whether the bytes of an existing version
    /// repaired its stored copy (see [`Registered`]).
    pub async fn register_plugin_reporting(
        &self,
        name: &str,
        bytes: Vec<u8>,
        origin: Origin,
    ) -> Result<(PluginVersion, Registered), Error> {
        let (rt, name) = (self.clone(), name.to_string());
        let result = Runtime::detached("registration", async move {
            rt.check_open()?;
            rt.shared
                .registry
                .register_reporting(&name, bytes, origin)
                .await
        })
        .await;
        self.counted(result)
    }

    /// The current version (number) of `plugin`: what new devices get.
    pub fn current_version(&self, plugin: &str) -> Option<u32> {
        self.shared.registry.current(plugin).map(|v| v.number)
    }

    /// Every plugin and its versions.
    pub fn plugins(&self) -> Vec<(String, Vec<PluginVersion>)> {
        self.shared.registry.list()
    }

    /// Creates device `id` running the current version of `plugin` with `config`.
    /// Idempotent: the same plugin and config again answer the existing device with `false`;
    /// another plugin or config is a [`Error::DeviceConflict`]. The config is checked by
    /// running the plugin's `init` on it before anything is written.
    pub async fn provision(
        &self,
        id: &str,
        plugin: &str,
        config: &serde_json::Value,
    ) -> Result<(DeviceSummary, bool), Error> {
        let (rt, id, plugin, config) = (
            self.clone(),
            id.to_string(),
            plugin.to_string(),
            config.clone(),
        );
        let result = Runtime::detached("provisioning", async move {
            rt.provision_inner(&id, &plugin, &config).await
        })
        .await;
        self.counted(result)
    }

    async fn provision_inner(
        &self,
        id: &str,
        plugin: &str,
        config: &serde_json::Value,
    ) -> Result<(DeviceSummary, bool), Error> {
        validate_id(id)?;
        // A name no plugin can have (`../x`) is refused as such, not looked up.
        validate_id(plugin).map_err(|e| match e {
            Error::InvalidId(why) => Error::InvalidId(format!("the plugin name: {why}")),
            other => other,
        })?;
        self.check_open()?;
        // An object, as the API and the CLI say: a plugin's serde reads a struct from an
        // array as readily (`[1]` became a setpoint of 1.0, found by a review), and `null`
        // is no configuration.
        if !config.is_object() {
            let kind = match config {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::Object(_) => "an object",
            };
            return Err(Error::MalformedConfig(format!(
                "the configuration is {kind}: it must be a JSON object (`{{}}` for none)"
            )));
        }
        let config_text =
            serde_json::to_string(config).map_err(|e| Error::MalformedConfig(e.to_string()))?;
        // One provisioning per id at a time, from before the existence check until the record
        // is durable: two concurrent PUTs must never both find the id free and create it
        // twice. (This runs in a task of its own, so a caller going away does not release
        // the claim before the record is durable.)
        let _claim = self.claim_provisioning(id).await?;
        let _binding = self.shared.binding.read().await;
        // A plugin that does not exist is the first thing wrong with the request, whether or
        // not the id is taken (a conflict named it as if it could be provisioned).
        let version = self
            .shared
            .registry
            .current(plugin)
            .ok_or_else(|| Error::UnknownPlugin(plugin.to_string()))?;
        if let Some(existing) = self.summary(id) {
            let other_config = !same_json(&existing.config, config);
            return if existing.plugin == plugin && !other_config {
                Ok((existing, false))
            } else {
                Err(Error::DeviceConflict {
                    id: id.to_string(),
                    asked: (existing.plugin != plugin).then(|| plugin.to_string()),
                    plugin: existing.plugin,
                    other_config,
                })
            };
        }

        // Trial init: a config the plugin refuses would make a device that can never activate.
        // Guest code, so where activations run: on the actor pool, stopped there once seen
        // slow (`Preemption::Move`) and tried again on the slow lane, where a plugin slow to
        // build a state runs it from the start.
        let compiled = self.shared.registry.compiled(version.id)?;
        let (trial_id, trial_config) = (id.to_string(), config_text.clone());
        let on_the_pool = !compiled.setup_runs_slow();
        let marks = compiled.clone();
        // On the pool stopped once seen slow; on the slow lane yielding at each tick, so that
        // an `init` that spins holds a slow-lane thread a tick at a time.
        let trial = Arc::new(move |preemption| {
            let (compiled, trial_id, trial_config) =
                (compiled.clone(), trial_id.clone(), trial_config.clone());
            async move {
                let mut trial = compiled.instantiate(Arc::from(trial_id.as_str()))?;
                // An activation's budget: the same `init` runs again at the device's first
                // activation, within that budget; a trial held to one event's budget refused
                // devices that would have activated (an `init` of 250 ms to 5 s).
                let budget = compiled.engine().config().activation_timeout;
                let scope = trial.begin_setup_unit(budget, preemption);
                let init = trial.init_preemptible(&trial_id, &trial_config).await;
                trial.end_unit(scope);
                Ok::<_, Error>(init)
            }
        });
        let task_failed =
            |e: tokio::task::JoinError| Error::Internal(format!("trial init task: {e}"));
        // A plugin slow to build a state (or slow at all) goes to the slow lane at once, as if
        // stopped on the pool.
        let mut init = Err(CallError::Moved);
        if on_the_pool {
            let trial = trial.clone();
            init = self
                .pool()?
                .spawn(async move {
                    // Marked slow while this waited for a pool thread (the first of many
                    // provisions at once, each spinning its two ticks before it is stopped):
                    // straight to the slow lane, as activations and events go once marked.
                    if marks.setup_runs_slow() {
                        return Ok(Err(CallError::Moved));
                    }
                    trial(Preemption::Move).await
                })
                .await
                .map_err(task_failed)??;
        }
        if matches!(init, Err(CallError::Moved)) {
            self.shared
                .metrics
                .slow_lane_provisions
                .fetch_add(1, Ordering::Relaxed);
            init = self
                .slow_lane()?
                .spawn(async move { trial(Preemption::Yield).await })
                .await
                .map_err(task_failed)??;
        }
        init.map_err(|e| {
            tracing::info!(device = id, plugin, error = %e, "provisioning refused: the plugin's `init` failed on its config");
            match e {
                CallError::Rejected { code, message } => Error::ConfigRefused { code, message },
                other => Error::from(other),
            }
        })?;

        let head = self
            .shared
            .journal
            .record_device(
                id,
                version.id,
                config_text.as_bytes(),
                crate::clock::now_ms(),
            )
            .await?;
        tracing::info!(
            device = id,
            plugin,
            version = version.number,
            "device provisioned"
        );
        Ok((self.describe(&head), true))
    }

    /// Waits (briefly) until no other provisioning of `id` is under way, and claims it.
    pub(crate) async fn claim_provisioning(&self, id: &str) -> Result<ProvisionClaim, Error> {
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
        self.shared.journal.device(id).map(|h| self.describe(&h))
    }

    /// Device `id`'s lifecycle status as last recorded, without waking it (a listing of a
    /// fleet must not activate it). [`Runtime::device`] is exact: it asks the actor.
    pub fn status(&self, id: &str) -> DeviceStatus {
        self.shared.router.status(id)
    }

    /// [`Runtime::status`] and, while quarantined, why and for how long (as a read's
    /// `quarantine`); wakes nothing.
    pub fn status_and_quarantine(&self, id: &str) -> (DeviceStatus, Option<QuarantineView>) {
        self.shared.router.status_and_quarantine(id)
    }

    /// The ids of the devices quarantined now, in byte order (see [`Runtime::resume`]).
    pub fn quarantined_devices(&self) -> Vec<String> {
        self.shared.router.quarantined()
    }

    /// Plugin name and version number of the version with journal-local id `id`.
    fn plugin_of(&self, id: u32) -> (String, u32) {
        self.shared
            .registry
            .version(id)
            .map_or_else(|| (String::new(), 0), |v| (v.plugin, v.number))
    }

    fn describe(&self, head: &DeviceHead) -> DeviceSummary {
        let (plugin, version) = self.plugin_of(head.version);
        let upgrade = self
            .shared
            .registry
            .target_of(head.version)
            .filter(|&to| to != head.version)
            .map(|to| PendingUpgrade {
                to: self.plugin_of(to).1,
                failed: self.shared.router.upgrade_failed(head.num, to),
            });
        DeviceSummary {
            upgrade,
            id: head.id.to_string(),
            plugin,
            version,
            seq: head.seq,
            config: serde_json::from_slice(&head.config).unwrap_or(serde_json::Value::Null),
            created_at_ms: head.created_at_ms,
        }
    }

    /// Ids of every provisioned device, sorted.
    pub fn device_ids(&self) -> Vec<String> {
        self.shared
            .journal
            .device_ids()
            .iter()
            .map(|id| id.to_string())
            .collect()
    }

    /// One page of [`Runtime::device_ids`]: the first `limit` ids strictly after `after`, and
    /// whether more follow (see [`Journal::device_ids_page`]).
    pub fn device_ids_page(&self, after: Option<&str>, limit: usize) -> (Vec<String>, bool) {
        let (ids, more) = self.shared.journal.device_ids_page(after, limit);
        (ids.iter().map(|id| id.to_string()).collect(), more)
    }

    /// Sends one event (JSON text) to device `id` and waits until the record it produced is
    /// durable. Fails fast with [`Error::MailboxFull`] when the device is saturated.
    pub async fn send(&self, id: &str, event: &str) -> Result<Committed, Error> {
        let result = match self.check_event(event, false) {
            Ok(()) => self.send_valid(id, event).await,
            Err(e) => Err(e),
        };
        self.counted(result)
    }

    /// [`Runtime::send`] for an event already held as a `RawValue`, as in a gateway batch.
    /// Its syntax is known good, but a `RawValue` passes what a strict reader refuses (a lone
    /// UTF-16 surrogate, a number past `f64`; see `json_check`), so that much is checked.
    pub async fn send_json(
        &self,
        id: &str,
        event: &serde_json::value::RawValue,
    ) -> Result<Committed, Error> {
        let result = match self.check_event(event.get(), true) {
            Ok(()) => self.send_valid(id, event.get()).await,
            Err(e) => Err(e),
        };
        self.counted(result)
    }

    /// An event within the size limit, one JSON document a strict reader reads back
    /// (`syntax_checked`: its syntax is known good, and only the strict reading is left).
    fn check_event(&self, event: &str, syntax_checked: bool) -> Result<(), Error> {
        let limit = self.shared.config.max_event_bytes;
        if event.len() > limit {
            return Err(Error::PayloadTooLarge {
                size: event.len(),
                limit,
            });
        }
        let checked = if syntax_checked {
            crate::json_check::strict(event)
        } else {
            crate::json_check::check(event)
        };
        checked.map_err(|e| Error::MalformedEvent(format!("not JSON: {e}")))
    }

    async fn send_valid(&self, id: &str, event: &str) -> Result<Committed, Error> {
        let (reply, rx) = oneshot::channel();
        let msg = Message::Event(Box::new(ExternalEvent {
            event: event.to_string(),
            accepted: Instant::now(),
            reply,
        }));
        self.shared.router.deliver(id, msg)?;
        rx.await.unwrap_or_else(|_| Err(self.actor_gone()))
    }

    /// The error for a request whose actor dropped it unanswered: the runtime is stopping, or
    /// the actor panicked (and the next message restarts it).
    fn actor_gone(&self) -> Error {
        if self.shared.closing.load(Ordering::Acquire) {
            Error::ShuttingDown
        } else {
            Error::Internal(
                "the device's actor stopped unexpectedly; the next request restarts it".into(),
            )
        }
    }

    /// Reads device `id` with its current durable state and its lifecycle status. Reading a
    /// passivated device does not keep it live.
    pub async fn device(&self, id: &str) -> Result<DeviceView, Error> {
        let result = self.device_inner(id).await;
        self.counted(result)
    }

    async fn device_inner(&self, id: &str) -> Result<DeviceView, Error> {
        let (reply, rx) = oneshot::channel();
        self.shared.router.deliver(id, Message::Query { reply })?;
        let (state, status, quarantine) = rx.await.unwrap_or_else(|_| Err(self.actor_gone()))?;
        let mut summary = self
            .summary(id)
            .ok_or_else(|| Error::UnknownDevice(id.to_string()))?;
        summary.seq = state.seq;
        Ok(DeviceView {
            summary,
            status,
            quarantine,
            state: state.state,
        })
    }

    /// The most recent events device `id`'s plugin failed on, oldest first (at most 100).
    pub fn dead_letters(&self, id: &str) -> Result<Vec<DeadLetterView>, Error> {
        let result = self.head(id).and_then(|head| {
            let letters = self.shared.journal.dead_letters(head.num)?;
            Ok(letters
                .into_iter()
                .map(|d| {
                    let (plugin, version) = self.plugin_of(d.version);
                    DeadLetterView {
                        after_seq: d.after_seq,
                        at_ms: d.at_ms,
                        plugin,
                        version,
                        event: String::from_utf8_lossy(&d.event).into_owned(),
                        code: d.code,
                        message: d.message,
                    }
                })
                .collect())
        });
        self.counted(result)
    }

    /// How many of device `id`'s most recent dead letters retention deleted with their
    /// segments (see [`Journal::dead_letters_retained_away`]).
    pub fn dead_letters_retained_away(&self, id: &str) -> Result<usize, Error> {
        let result = self
            .head(id)
            .map(|head| self.shared.journal.dead_letters_retained_away(head.num));
        self.counted(result)
    }

    /// Ends device `id`'s quarantine now, so its next event runs the guest again, and starts
    /// its count of failures in a row, and the doubling of its quarantines, afresh: a device
    /// that is not quarantined has its failures forgotten too (they were kept: its next
    /// failure would have quarantined it). Answers what it did and the status after.
    pub async fn resume(&self, id: &str) -> Result<crate::view::Resumed, Error> {
        let (reply, rx) = oneshot::channel();
        let result = match self.shared.router.deliver(id, Message::Resume { reply }) {
            Ok(()) => rx.await.unwrap_or_else(|_| Err(self.actor_gone())),
            Err(e) => Err(e),
        };
        self.counted(result)
    }

    /// The guest's snapshot bytes of device `id`'s current durable state, with the seq they
    /// cover. For inspection and for checking that a rebuilt device equals the live one.
    pub async fn export_snapshot(&self, id: &str) -> Result<(u64, Vec<u8>), Error> {
        let (reply, rx) = oneshot::channel();
        let result = match self.shared.router.deliver(id, Message::Export { reply }) {
            Ok(()) => rx.await.unwrap_or_else(|_| Err(self.actor_gone())),
            Err(e) => Err(e),
        };
        self.counted(result)
    }

    pub(crate) fn head(&self, id: &str) -> Result<DeviceHead, Error> {
        self.shared
            .journal
            .device(id)
            .ok_or_else(|| match validate_id(id) {
                Err(e) => e,
                Ok(()) => Error::UnknownDevice(id.to_string()),
            })
    }

    /// Reads up to `limit` journal records of device `id` starting at seq `from` (0: the
    /// oldest one kept; a seq retention deleted is `RetainedAway`).
    pub fn journal_page(&self, id: &str, from: u64, limit: usize) -> Result<JournalPage, Error> {
        let result = self.journal_page_inner(id, from, limit);
        self.counted(result)
    }

    fn journal_page_inner(&self, id: &str, from: u64, limit: usize) -> Result<JournalPage, Error> {
        let head = self.head(id)?;
        // 0: from the oldest record kept (retention may have deleted the first ones).
        let from = match from {
            0 => self.shared.journal.oldest_retained_seq(head.num),
            from => from,
        };
        let limit = limit.clamp(1, 1000) as u64;
        let last = from.saturating_add(limit - 1).min(head.seq);
        // A page also stops at ~4 MiB of records, so one request cannot pull a thousand
        // megabyte-sized records into memory; `next` continues where it stopped.
        const PAGE_BYTES: usize = 4 * 1024 * 1024;
        let journal = &self.shared.journal;
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let mut to = from.saturating_sub(1);
        while to < last && bytes < PAGE_BYTES {
            let chunk = journal.read_events(head.num, to + 1, (to + 64).min(last))?;
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
        let text = |b: Vec<u8>| {
            String::from_utf8(b)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
        };
        let records: Vec<JournalEntry> = records
            .into_iter()
            .map(|r| {
                let (plugin, version) = self.plugin_of(r.version);
                JournalEntry {
                    seq: r.seq,
                    at_ms: r.at_ms,
                    plugin,
                    version,
                    event: text(r.event),
                    transitions: r.transitions.into_iter().map(text).collect(),
                    lost: r.lost,
                    origin: r
                        .fx
                        .as_ref()
                        .filter(|fx| fx.origin != crate::journal::Origin::External)
                        .and_then(|fx| serde_json::to_string(&fx.origin).ok()),
                    effects: r
                        .fx
                        .iter()
                        .flat_map(|fx| &fx.effects)
                        .filter_map(|e| serde_json::to_string(e).ok())
                        .collect(),
                }
            })
            .collect();
        let next = (to < head.seq).then_some(to + 1);
        Ok(JournalPage { records, next })
    }

    /// The journal's size, segments and retention (`GET /v1/journal`).
    pub fn journal_status(&self) -> JournalStatus {
        let journal = &self.shared.journal;
        JournalStatus {
            durable_bytes: journal.durable_len(),
            retention: journal.retention(),
        }
    }

    /// Asks up to `max` devices whose old snapshot (or lack of one) holds back the journal's
    /// retention for a snapshot of their current state (`Journal::retention_laggards`): each
    /// activates if it must and writes one through its own lane, after the records it
    /// covers, so the next pass can delete the segments behind it. Returns how many were
    /// asked. A background task does this after each retention pass that was held back.
    pub async fn refresh_retention(&self, max: usize) -> Result<usize, Error> {
        let journal = self.shared.journal.clone();
        // A scan of every device's bound, which may read run files: off the async workers.
        let laggards = tokio::task::spawn_blocking(move || journal.retention_laggards(2 * max))
            .await
            .map_err(|e| Error::Internal(format!("retention task: {e}")))??;
        let pass = self.shared.journal.retention().passes;
        let laggards: Vec<String> = {
            let mut recent = self.shared.retention_asked.lock();
            recent.retain(|_, at| pass < at.saturating_add(RETENTION_ASK_AGAIN_AFTER));
            let fresh: Vec<String> = laggards
                .into_iter()
                .filter_map(|p| p.device)
                .filter(|device| !recent.contains_key(device))
                .take(max)
                .collect();
            for device in &fresh {
                recent.insert(device.clone(), pass);
            }
            fresh
        };
        let mut asked = 0;
        for device in &laggards {
            // A full mailbox is a busy device: it snapshots on its own soon enough.
            if self.shared.router.offer(device, Message::Snapshot).is_ok() {
                asked += 1;
            }
        }
        if asked > 0 {
            tracing::info!(
                asked,
                lowest = ?laggards.first(),
                "journal retention: devices asked for a snapshot so that old segments can go"
            );
        }
        Ok(asked)
    }

    /// Runs a journal retention pass now (one also follows every index checkpoint).
    pub async fn retain_now(&self) -> Result<crate::journal::RetentionPass, Error> {
        let journal = self.shared.journal.clone();
        let result = tokio::task::spawn_blocking(move || journal.retain_now())
            .await
            .map_err(|e| Error::Internal(format!("retention task: {e}")))?
            .map_err(Error::from);
        self.counted(result)
    }

    /// The state of device `id` right after record `seq` (0: right after provisioning),
    /// rebuilt from the journal without touching the live actor.
    pub async fn state_at(&self, id: &str, seq: u64) -> Result<DeviceState, Error> {
        let result = self.state_at_inner(id, seq).await;
        self.counted(result)
    }

    async fn state_at_inner(&self, id: &str, seq: u64) -> Result<DeviceState, Error> {
        let head = self.head(id)?;
        if seq > head.seq {
            return Err(Error::SeqOutOfRange {
                requested: seq,
                latest: head.seq,
            });
        }
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            // What retention deleted answers with `replay::oldest_rebuildable`.
            let mut rebuilt = replay::rebuild(
                &shared.journal,
                &shared.registry,
                &head,
                seq,
                Start::Snapshot,
            )?;
            let state = rebuilt.instance.query()?;
            Ok(DeviceState {
                seq: rebuilt.seq,
                state,
            })
        })
        .await
        .map_err(|e| Error::Internal(format!("replay task: {e}")))?
    }

    /// Number of devices with an actor (a task and mailbox; its instance may be passivated).
    pub fn live_actors(&self) -> usize {
        self.shared.router.actors()
    }

    /// Prometheus text with the runtime's counters and gauges.
    pub fn render_metrics(&self) -> String {
        let journal = &self.shared.journal;
        let stats = journal.stats();
        let recovery = journal.recovery();
        let salvaged = recovery.salvaged.as_ref();
        let index = journal.index_usage();
        let scrub = journal.scrub();
        let retention = journal.retention();
        let load = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
        let (guest_grown, guest_budget) = self.shared.registry.engine().guest_memory();
        self.shared.metrics.render(
            &[
            (
                "drover_live_actors",
                "Devices with a live actor.",
                self.live_actors() as u64,
            ),
            (
                "drover_quarantined_devices",
                "Devices quarantined now: their plugin failed on them repeatedly, their events are refused until the quarantine ends or POST /v1/devices/{id}/resume.",
                self.shared.router.quarantined().len() as u64,
            ),
            (
                "drover_dry_runs_running",
                "Dry-runs asked for (POST /v1/plugins/{name}/dry-run) running now: one per core at a time.",
                (self.shared.dry_run_turns - self.shared.dry_runs.available_permits()) as u64,
            ),
            (
                "drover_dry_runs_waiting",
                "Dry-runs asked for waiting for their turn (one per core runs at a time).",
                self.shared.dry_runs_waiting.load(Ordering::Relaxed) as u64,
            ),
            (
                "drover_guest_memory_grown_bytes",
                "Bytes the live guest memories have grown past their initial sizes (counted against the guest memory budget).",
                guest_grown,
            ),
            (
                "drover_guest_memory_budget_bytes",
                "Most bytes the live guest memories may grow past their initial sizes (--guest-memory-budget-mib).",
                guest_budget,
            ),
            (
                "drover_messages_parked_bytes",
                "Messages between devices held in memory for targets whose mailbox is full, in bytes (each counted as its event, its sender's id and 128); bounded by --max-parked-mib.",
                load(&self.shared.metrics.messages_parked_bytes),
            ),
            (
                "drover_devices",
                "Provisioned devices.",
                journal.device_count() as u64,
            ),
            (
                "drover_timer_wheel_devices",
                "Devices with a pending durable timer: the timer wheel's entries (one per device, at its earliest timer).",
                self.timer_wheel_devices() as u64,
            ),
            (
                "drover_journal_bytes",
                "Where the durable journal ends, in bytes from its first byte ever: retention-deleted bytes included (minus drover_journal_retained_from_bytes, what is on disk).",
                journal.durable_len(),
            ),
            (
                "drover_journal_torn_tail_recoveries",
                "1 if this start cut a last commit torn by a crash (never acknowledged), else 0.",
                u64::from(recovery.dropped.is_some()),
            ),
            (
                "drover_journal_torn_tail_bytes",
                "Bytes of a torn last commit cut at this start.",
                recovery.dropped.as_ref().map_or(0, |d| d.bytes),
            ),
            (
                "drover_journal_salvages",
                "1 if this start salvaged a journal with media damage (--salvage), else 0.",
                u64::from(recovery.salvaged.is_some()),
            ),
            (
                "drover_journal_salvaged_damaged_bytes",
                "Damaged bytes skipped by this start's salvage.",
                salvaged.map_or(0, |s| s.damage.damaged_bytes()),
            ),
            (
                "drover_journal_index_memory_offsets",
                "Record offsets the journal index holds in memory (8 bytes each; older ones are spilled to run files).",
                index.memory_offsets,
            ),
            (
                "drover_journal_index_spilled_offsets",
                "Record offsets the journal index holds in run files beside the journal.",
                index.spilled_offsets,
            ),
            (
                "drover_journal_index_runs",
                "Run files of the journal index (merged in size tiers: about log2 of history / spill size).",
                index.runs,
            ),
            (
                "drover_journal_index_checkpoint_start",
                "1 if this start opened from an index checkpoint (scanning only the records after it), else 0.",
                u64::from(recovery.from_checkpoint.is_some()),
            ),
            (
                "drover_journal_scanned_bytes",
                "Bytes of journal this start scanned (after its index checkpoint, if it had one).",
                recovery.valid_len - recovery.from_checkpoint.unwrap_or(0),
            ),
            (
                "drover_journal_scrub_bytes",
                "Bytes the scrub has read of what this start skipped (those before its index checkpoint).",
                scrub.scanned,
            ),
            (
                "drover_journal_scrub_pending_bytes",
                "Bytes before the index checkpoint the scrub has yet to read (0 once done or stopped).",
                match scrub.state {
                    ScrubState::Running => scrub.total - scrub.scanned,
                    _ => 0,
                },
            ),
            (
                "drover_journal_scrub_damaged",
                "1 if the scrub found media damage before the index checkpoint (logged with its offset; the next start refuses until salvaged), else 0.",
                u64::from(matches!(scrub.state, ScrubState::Damaged { .. })),
            ),
            (
                "drover_journal_segments",
                "Segment files the journal is kept in (journal.log, then journal.<position>.seg).",
                retention.segments as u64,
            ),
            (
                "drover_journal_retained_from_bytes",
                "The journal's first position still stored: 0 unless retention deleted segments.",
                retention.retained_from,
            ),
            (
                "drover_journal_salvaged_lost_seqs",
                "Acknowledged seqs whose records this start's salvage found destroyed (marked lost, never reused).",
                salvaged.map_or(0, |s| s.lost_seqs),
            ),
            ],
            // Running totals since start: counters, though kept by the journal.
            &[
            (
                "drover_journal_commits",
                "Group commits (fsyncs) since start.",
                load(&stats.commits),
            ),
            (
                "drover_journal_commit_failures",
                "Failed group commits since start.",
                load(&stats.commit_failures),
            ),
            (
                "drover_journal_retention_deleted_segments",
                "Segment files retention deleted since start.",
                retention.deleted_segments,
            ),
            (
                "drover_journal_retention_deleted_bytes",
                "Bytes of journal retention deleted since start.",
                retention.deleted_bytes,
            ),
            ],
        )
    }

    /// Stops taking requests, lets every actor finish the messages already in its mailbox
    /// and take its final snapshot, waits until their records are durable, and stops the
    /// journal writer.
    pub async fn shutdown(&self) {
        self.stop(None).await;
    }

    /// [`Runtime::shutdown`], waiting for the actors until `deadline` at most: a server's
    /// stop within its drain timeout (`drover serve --drain-timeout-secs`). Actors still
    /// stopping then are left without their final snapshot (see `Router::shutdown`); what
    /// they made durable stays durable, and their next activation replays a longer tail.
    pub async fn shutdown_by(&self, deadline: std::time::Instant) {
        self.stop(Some(deadline.into())).await;
    }

    async fn stop(&self, deadline: Option<tokio::time::Instant>) {
        if self.shared.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.stop_upgrades();
        // Past the deadline, guest calls still running are stopped rather than waited for.
        // (The engine alone: a clone of the runtime would keep it alive until the deadline.)
        let stop_calls = deadline.map(|deadline| {
            let engine = self.shared.registry.engine().clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline).await;
                engine.stop_guest_calls();
            })
        });
        // No more dispatching: whatever is still owed stays in the journal, for the next start.
        for task in self.shared.effect_tasks.lock().drain(..) {
            task.abort();
        }
        self.shared.outbox.close();
        let (n, still_stopping) = self.shared.router.shutdown(deadline).await;
        if still_stopping > 0 {
            tracing::warn!(
                actors = still_stopping,
                "actors still stopping at the deadline (the drain timeout) are left without \
                 their final snapshot: what they made durable stays, and their next \
                 activation replays a longer tail"
            );
        }
        if let Err(e) = self.shared.journal.barrier().await {
            tracing::error!(error = %e, "final journal flush failed");
        }
        self.shared.journal.close();
        self.shared.pool.lock().take();
        self.shared.lock.lock().take();
        if let Some(task) = stop_calls {
            task.abort();
        }
        tracing::info!(actors = n, "runtime stopped");
    }

    /// Starts no more folds of new plugin versions and stops those under way (a deploy's
    /// live upgrades, lazy upgrades at activation): the devices stay on their versions and
    /// move at a later activation. What a server does before it drains its connections, so a
    /// version whose fold spins never holds the drain; events go on being served meanwhile.
    /// Called by [`crate::http::Server::shutdown`] and [`Runtime::shutdown`].
    pub fn stop_upgrades(&self) {
        self.shared.router.stop_upgrades();
    }

    /// Stops every guest call that runs an epoch tick of CPU time or more from now on
    /// (`Engine::stop_guest_calls`): its request is answered `503 overloaded`, nothing
    /// written, and a message or timer firing stays owed. Short calls end as usual. What a
    /// server does when its drain timeout has passed: guests that spin in trial `init`s or
    /// activations (seconds of budget each, one after another on the slow lane) held their
    /// requests past it, which were then closed without an answer, and the stop after it.
    /// Called by [`crate::http::Server::shutdown`] at its drain timeout and by
    /// [`Runtime::shutdown_by`] at its deadline; cannot be undone.
    pub fn stop_guest_calls(&self) {
        self.shared.registry.engine().stop_guest_calls();
    }

    /// The actor pool's threads (see [`ActorPool`]).
    pub(crate) fn pool(&self) -> Result<tokio::runtime::Handle, Error> {
        self.actor_threads(ActorPool::handle)
    }

    /// The actor pool's slow lane (see [`ActorPool`]).
    pub(crate) fn slow_lane(&self) -> Result<tokio::runtime::Handle, Error> {
        self.actor_threads(ActorPool::slow_lane)
    }

    fn actor_threads(
        &self,
        which: fn(&ActorPool) -> tokio::runtime::Handle,
    ) -> Result<tokio::runtime::Handle, Error> {
        let pool = self.shared.pool.lock();
        pool.as_ref().map(which).ok_or(Error::ShuttingDown)
    }

    pub(crate) fn check_open(&self) -> Result<(), Error> {
        if self.shared.closing.load(Ordering::Acquire) {
            Err(Error::ShuttingDown)
        } else {
            Ok(())
        }
    }
}

/// JSON equality as a reader means it: `21` and `21.0` are the same number (serde_json's
/// `Value` tells an integer from a float), so re-provisioning with a config written by another
/// tool is not a conflict.
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x == y || ((x.is_f64() || y.is_f64()) && x.as_f64() == y.as_f64())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// Devices asked for a snapshot per refresh: each may cost an activation (~100 µs of CPU and
/// an instance until it passivates again), so a fleet of idle devices is refreshed in
/// steps, oldest first, one step per retention pass.
const RETENTION_REFRESH_MAX: usize = 1000;

/// Passes after which a device retention asked for a snapshot may be asked again.
const RETENTION_ASK_AGAIN_AFTER: u64 = 10;

/// Runs a retention pass at start (so that `pinned_by` says what holds the journal back
/// before the first index checkpoint, and what the last run left deletable goes); then
/// (every `Config::retention_refresh`, unless that is `None`), after each pass (one per
/// index checkpoint) that left segments the checkpoint would let go, asks the devices
/// holding them for a fresh snapshot, waits a moment for those to be
/// durable and runs another pass. Holds the runtime only while it works, never across a
/// sleep; ends with it.
async fn refresh_retention(shared: std::sync::Weak<Shared>) {
    let mut seen = 0;
    let runtime = |shared: &std::sync::Weak<Shared>| {
        shared
            .upgrade()
            .map(|shared| Runtime { shared })
            .filter(|rt| !rt.shared.closing.load(Ordering::Acquire))
    };
    if let Some(rt) = runtime(&shared)
        && let Err(e) = rt.retain_now().await
    {
        tracing::warn!(error = %e, "journal retention at start");
    }
    let Some(every) = runtime(&shared).and_then(|rt| rt.shared.config.retention_refresh) else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        let asked = {
            let Some(rt) = runtime(&shared) else {
                return;
            };
            let passes = rt.shared.journal.retention().passes;
            if passes == seen {
                continue;
            }
            seen = passes;
            match rt.refresh_retention(RETENTION_REFRESH_MAX).await {
                Ok(asked) => asked,
                Err(e) => {
                    tracing::warn!(error = %e, "journal retention: finding the devices that hold it back");
                    0
                }
            }
        };
        if asked == 0 {
            continue;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(rt) = runtime(&shared) else {
            return;
        };
        if let Err(e) = rt.retain_now().await {
            tracing::warn!(error = %e, "journal retention after a refresh");
        }
        seen = rt.shared.journal.retention().passes;
    }
}
