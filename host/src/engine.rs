//! The Wasm engine: compiling plugins and running device instances.
//!
//! One [`Engine`] per process holds the wasmtime engine, the linker that defines what guests
//! may import, and the epoch ticker that bounds how long a guest call may run. Each plugin
//! version is compiled once into a [`CompiledPlugin`] (pre-instantiated, so creating a device's
//! instance skips import resolution). Each live device owns one [`Instance`]: its own `Store`,
//! memory and state, so a device can never see or corrupt another's.
//!
//! # What guests can reach
//!
//! Only the `drover:device/host` interface. The `wasm32-wasip2` standard library also imports
//! a handful of WASI interfaces (`wasi:io/*` and `wasi:cli/*`: stdio, environment, exit);
//! those are accepted at upload. Printing works: stdout and stderr lines go to the server's
//! log under the device (`stdio`). Every other function in them (input, environment, exit)
//! traps if called. Any other import (clocks, randomness, filesystem, sockets, ...) is
//! refused when the plugin is uploaded, so nondeterminism can never creep in at run time:
//! a guest's only view of time is the event context.
//!
//! (wasmtime-wasi is not used for stdio: its synchronous bindings block on a nested tokio
//! runtime, which panics on the runtime's worker threads where actors run, and a print needs
//! six functions.)
//!
//! # Containment
//!
//! * Every event (handle plus every apply) and every other call runs under an epoch deadline
//!   ([`EngineConfig::call_timeout`]; an activation under [`EngineConfig::activation_timeout`],
//!   see [`Instance::within`]); a guest stuck in
//!   a loop traps with [`CallError::Timeout`].
//! * Each store's linear memory is capped ([`EngineConfig::max_memory`]); growing past it
//!   fails inside the guest, which typically traps.
//! * Outputs are bounded by the caller (see the actor), which refuses oversized transitions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, ComponentExportIndex, Func, HasSelf, Linker};

pub use crate::config::EngineConfig;
use wasmtime::{Store, StoreLimitsBuilder};

pub(crate) mod cpu_clock;
mod guest_log;
mod instance;
mod limits;
mod memory;
mod slow_marks;
mod stacks;
mod stdio;
mod unit_clock;

pub use instance::{BatchError, Instance, UnitScope};
pub use slow_marks::FORGIVE_AFTER;
pub(crate) use slow_marks::SlowMarks;
pub use unit_clock::Preemption;
pub(crate) use unit_clock::WALL_LIMIT;
use unit_clock::{UnitClock, deadline_reached, ticks_due};

pub use limits::GuestMemoryRefusal;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "device",
    });
}

/// The second contract, frozen: plugins built against it keep loading (see `wit/device.wit`).
mod bindings_v2 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2.0",
        world: "device",
    });
}

/// The first contract, frozen: plugins built against it keep loading (see `wit/device.wit`).
mod bindings_v1 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.0",
        world: "device",
    });
}

use bindings::drover::device::host::LogLevel;
pub use bindings::drover::device::types::{
    BatchRefusal, Command as GuestCommand, Effect as GuestEffect, EventContext,
    Message as GuestMessage, MessageOrigin, Origin, Outcome, Timer as GuestTimer, TimerOrigin,
};
use bindings::{Device, DevicePre};

/// The version of the WIT package this host's SDK builds against (the newest it links).
pub const WIT_PACKAGE: &str = "drover:device@0.3.0";

/// Every contract version the host links, oldest first.
pub const WIT_PACKAGES: [&str; 3] = [
    "drover:device@0.1.0",
    "drover:device@0.2.0",
    "drover:device@0.3.0",
];

/// Why a guest call did not return normally.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The guest refused on purpose (`result::err`). The instance is still good.
    #[error("{code}: {message}")]
    Rejected { code: String, message: String },
    /// The guest trapped (panic, unreachable, out-of-bounds, memory cap). The instance is
    /// poisoned and must be discarded.
    #[error("guest trapped: {0}")]
    Trap(String),
    /// The guest exceeded its time budget, `budget`, the whole unit's (an event's handle
    /// and applies, an activation), and was stopped in `export` (the WIT export it was
    /// running, or `instantiation`): which of a plugin's functions spins is the first thing
    /// its author asks. The instance must be discarded.
    #[error("guest exceeded its {budget:?} time budget (stopped in `{export}`)")]
    Timeout {
        budget: Duration,
        export: &'static str,
    },
    /// The guest was interrupted within its CPU budget, having waited for a core so long that
    /// its unit took `WALL_LIMIT` times its budget in wall-clock time: the machine is
    /// overloaded, the guest is not at fault. The instance must be discarded.
    #[error(
        "guest interrupted after {} times its {budget:?} budget in wall-clock time, waiting \
         for a core, having used {used:?} of CPU: the server is overloaded",
        WALL_LIMIT
    )]
    Starved { budget: Duration, used: Duration },
    /// The guest's memory could not grow: all live guest memories together had grown to the
    /// engine's budget (see `engine/limits.rs`). The server is overloaded, the guest is not
    /// at fault. The instance must be discarded.
    #[error(
        "guest memory growth refused: the live guest memories have grown {} bytes past their \
         initial sizes, of the server's guest memory budget of {} (`--guest-memory-budget-mib`), \
         and this instance asked for {} past its own: the server is overloaded",
        .0.grown,
        .0.budget,
        .0.asked
    )]
    GuestMemory(GuestMemoryRefusal),
    /// The unit of work was stopped at its first look past two epoch ticks of CPU time, to run
    /// again from the start elsewhere (see [`Preemption::Move`]). The instance must be
    /// discarded. The actor that asked for it runs the unit again; it reaches no client.
    #[error("guest call stopped after two epoch ticks, to run again on the slow lane")]
    Moved,
    /// The server is stopping ([`Engine::stop_guest_calls`]) and the unit of work had run
    /// an epoch tick of CPU time: stopped rather than left to hold the stop for the rest of
    /// its budget. Not the guest's fault, and nothing of it was written. The instance must
    /// be discarded.
    #[error("guest call stopped: the server is stopping (send it again once it is back)")]
    Stopped,
    /// The process could not get the memory or memory mappings a new instance needs (`mmap`
    /// refused with `ENOMEM`: the machine's memory, or `vm.max_map_count` with guard pages).
    /// The server is overloaded, the guest is not at fault; nothing was built.
    #[error(
        "instantiation failed: the server could not map memory for the instance ({0}): it is \
         overloaded"
    )]
    HostMemory(String),
}

impl CallError {
    /// Whether the instance must be discarded after this error.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, CallError::Rejected { .. })
    }

    /// Whether the call failed for no fault of the guest's: the server lacked what it needed
    /// (a core, memory), or it was stopped to run again on the slow lane
    /// ([`CallError::Moved`]).
    pub fn is_overload(&self) -> bool {
        matches!(
            self,
            CallError::Starved { .. }
                | CallError::GuestMemory(_)
                | CallError::Moved
                | CallError::Stopped
                | CallError::HostMemory(_)
        )
    }
}

/// Why a plugin could not be compiled or linked.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("not a valid WebAssembly component: {0}")]
    Invalid(String),
    #[error(
        "component does not fit the `device` world of drover:device@0.1.0, @0.2.0 or @0.3.0: {0}"
    )]
    Incompatible(String),
    /// The component could never be instantiated under this engine's limits (its memory
    /// starts larger than the cap on one instance's memory): refused when it is registered
    /// or loaded, rather than failing every device as if the plugin trapped.
    #[error("the plugin does not fit this server's limits: {0}")]
    Unfit(String),
}

/// Bytes in a page of WebAssembly linear memory.
const WASM_PAGE: u64 = 64 << 10;

/// Import namespaces a plugin may name: Drover's own, and the WASI interfaces the Rust
/// `wasm32-wasip2` std imports whether or not it uses them (stubbed as traps).
const ACCEPTED_IMPORTS: [&str; 3] = ["drover:device/", "wasi:io/", "wasi:cli/"];

/// Per-store data: the memory cap, and the last error the guest logged (a panicking guest
/// logs its panic message before it traps).
pub struct GuestState {
    limits: limits::GuestLimits,
    device: Arc<str>,
    last_error: Option<String>,
    /// Partial lines the guest printed (see `stdio`).
    stdio: stdio::Buffers,
    /// Lines the guest may still log in this unit of work (see `guest_log`).
    log_budget: guest_log::Budget,
    /// The time budget of the unit of work under way (see `cpu_clock`).
    clock: UnitClock,
    /// Set when the unit was interrupted by the wall-clock bound, within its CPU budget:
    /// the CPU time it had used.
    starved: Option<Duration>,
    /// Set while a call runs on a fiber of its own (see [`Instance::handle_preemptible`]):
    /// only then may the guest yield its thread at a deadline.
    on_fiber: bool,
    /// Shared by every instance of the plugin version: whether its events or its setup work
    /// run slow (see [`CompiledPlugin::ran_slow`] and [`CompiledPlugin::setup_runs_slow`]).
    slow_marks: Arc<SlowMarks>,
    /// How the unit under way may give its thread back (see [`Instance::begin_unit`]).
    preemption: Preemption,
    /// The unit under way builds a state rather than serving a live one (see
    /// [`Instance::begin_setup_unit`]): it marks, and goes by, the setup mark.
    setup: bool,
    /// The unit was stopped so ([`CallError::Moved`]), until [`Instance::take_moved`].
    moved: bool,
    /// Set by [`Engine::stop_guest_calls`], for every instance of the engine.
    stopping: Arc<AtomicBool>,
    /// The unit was interrupted because of it ([`CallError::Stopped`]).
    stopped: bool,
    /// Its guest's lines and its traps go to the debug level (see [`Instance::quiet`]).
    quiet: bool,
}

impl bindings::drover::device::host::Host for GuestState {
    fn log(&mut self, level: LogLevel, message: String) {
        let device = &*self.device;
        // Bounded, without copying: the longest char-boundary prefix of at most 4 KiB.
        let mut end = message.len().min(4096);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        if !self.log_budget.take(device) {
            return;
        }
        let message = &message[..end];
        let shown = if self.quiet { LogLevel::Debug } else { level };
        // A log line must never take down the actor: whatever the subscriber does (a full
        // disk under stderr, a panicking writer), the guest call goes on.
        let logged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match shown {
            LogLevel::Trace => tracing::trace!(target: "drover::guest", device, "{message:?}"),
            LogLevel::Debug => tracing::debug!(target: "drover::guest", device, "{message:?}"),
            LogLevel::Info => tracing::info!(target: "drover::guest", device, "{message:?}"),
            LogLevel::Warn => tracing::warn!(target: "drover::guest", device, "{message:?}"),
            LogLevel::Error => tracing::error!(target: "drover::guest", device, "{message:?}"),
        }));
        drop(logged);
        if level == LogLevel::Error {
            self.last_error = Some(message.to_string());
        }
    }
}

impl bindings::drover::device::types::Host for GuestState {}

impl bindings_v1::drover::device::host::Host for GuestState {
    fn log(&mut self, level: bindings_v1::drover::device::host::LogLevel, message: String) {
        use bindings_v1::drover::device::host::LogLevel as V1;
        let level = match level {
            V1::Trace => LogLevel::Trace,
            V1::Debug => LogLevel::Debug,
            V1::Info => LogLevel::Info,
            V1::Warn => LogLevel::Warn,
            V1::Error => LogLevel::Error,
        };
        bindings::drover::device::host::Host::log(self, level, message)
    }
}

impl bindings_v1::drover::device::types::Host for GuestState {}

impl bindings_v2::drover::device::host::Host for GuestState {
    fn log(&mut self, level: bindings_v2::drover::device::host::LogLevel, message: String) {
        use bindings_v2::drover::device::host::LogLevel as V2;
        let level = match level {
            V2::Trace => LogLevel::Trace,
            V2::Debug => LogLevel::Debug,
            V2::Info => LogLevel::Info,
            V2::Warn => LogLevel::Warn,
            V2::Error => LogLevel::Error,
        };
        bindings::drover::device::host::Host::log(self, level, message)
    }
}

impl bindings_v2::drover::device::types::Host for GuestState {}

/// The process-wide engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    engine: wasmtime::Engine,
    linker: Linker<GuestState>,
    config: EngineConfig,
    /// Shared by every instance of this engine (see `engine/limits.rs`).
    memory_budget: Arc<limits::GuestMemoryBudget>,
    /// Fiber stacks of preemptible calls (see `engine/stacks.rs`).
    stacks: Arc<stacks::StackPool>,
    stop_ticker: Arc<AtomicBool>,
    /// See [`Engine::stop_guest_calls`].
    stopping: Arc<AtomicBool>,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Release);
    }
}

impl Engine {
    /// Builds the engine and starts its epoch ticker thread.
    pub fn new(config: EngineConfig) -> anyhow::Result<Engine> {
        let mut wasm = wasmtime::Config::new();
        wasm.epoch_interruption(true);
        // Component-model concurrency makes every call ~3x dearer and Drover calls guests
        // synchronously, one event at a time.
        wasm.wasm_component_model(true);
        // Compact linear memories, so one process holds 100k+ live instances. The kernel caps
        // a process's memory mappings (`vm.max_map_count`, 65,530 by default); wasmtime's
        // defaults cost ~4 per instance (a 4 GiB reservation, guard regions, a copy-on-write
        // image of the data segments), which capped a process near 16k. Here a memory is one
        // anonymous read-write mapping (twice its size: room to grow in place), and adjacent
        // ones merge, so mappings stop being the limit (see `host/DESIGN.md`, "Live
        // instances"). The costs, measured: every access is bounds-checked (no guard pages;
        // guest calls 10-20% dearer, a few percent of an event), instantiation copies the
        // data segments (a few µs), and a memory that outgrows its mapping may have to move
        // (see `engine/memory.rs`).
        // `EngineConfig::guard_pages` trades that for faster guest code on fewer instances.
        if !config.guard_pages {
            wasm.memory_reservation(0);
            wasm.memory_reservation_for_growth(0);
            wasm.memory_guard_size(0);
            wasm.guard_before_linear_memory(false);
            wasm.memory_init_cow(false);
            // Memories with room to grow in place, moved (when they must) without copying
            // untouched pages: wasmtime's move made every page resident (`engine/memory.rs`).
            wasm.with_host_memory(Arc::new(memory::CompactMemories));
        }
        // Preemptible calls' fiber stacks, from a pool (`engine/stacks.rs`).
        let stacks = stacks::StackPool::new();
        wasm.with_host_stack(Arc::new(stacks::PooledStacks(stacks.clone())));
        let engine = wasmtime::Engine::new(&wasm)?;

        let mut linker = Linker::new(&engine);
        Device::add_to_linker::<_, HasSelf<GuestState>>(&mut linker, |s| s)?;
        bindings_v1::Device::add_to_linker::<_, HasSelf<GuestState>>(&mut linker, |s| s)?;
        bindings_v2::Device::add_to_linker::<_, HasSelf<GuestState>>(&mut linker, |s| s)?;
        stdio::add_to_linker(&mut linker)?;

        let stop_ticker = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.weak();
        let stop = stop_ticker.clone();
        // Never under 1 ms (`Config::validate` refuses less; an engine built directly gets it).
        let tick = config.epoch_tick.max(Duration::from_millis(1));
        std::thread::Builder::new()
            .name("drover-epoch".into())
            .spawn(move || {
                let started = Instant::now();
                let mut ticked = 0;
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(tick);
                    match ticker_engine.upgrade() {
                        Some(engine) => {
                            // Samples first: a deadline this tick reaches then sees them.
                            cpu_clock::sample_all();
                            // The epoch follows the wall clock, not this thread's wake-ups:
                            // on a machine starved of cores it wakes late, and a deadline
                            // counted in wake-ups came twice as late as its budget said (a
                            // starved fold held a device 39 s where 4x its budget was 20 s).
                            let due = ticks_due(started.elapsed(), tick);
                            while ticked < due {
                                engine.increment_epoch();
                                ticked += 1;
                            }
                        }
                        None => break,
                    }
                }
            })?;
        Ok(Engine {
            inner: Arc::new(EngineInner {
                engine,
                linker,
                memory_budget: limits::GuestMemoryBudget::new(config.guest_memory_budget),
                config,
                stacks,
                stop_ticker,
                stopping: Arc::default(),
            }),
        })
    }

    /// From now on, a guest call that has run an epoch tick of CPU time (10 ms by default)
    /// is stopped at its next look at its deadline, as [`CallError::Stopped`], which callers
    /// treat like the server's overload: nothing is written, the client is told to send it
    /// again, no step toward a quarantine. What a server does when it begins to stop, so
    /// that guests that spin (a trial `init`, an activation, each with a budget of seconds,
    /// queued on the slow lane) never hold the stop; short calls end as usual. Cannot be
    /// undone: the engine is stopping.
    pub fn stop_guest_calls(&self) {
        self.inner.stopping.store(true, Ordering::Release);
    }

    /// The settings this engine was built with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Bytes the live guest memories of this engine have grown past their initial sizes,
    /// and the most they may ([`EngineConfig::guest_memory_budget`]).
    pub fn guest_memory(&self) -> (u64, u64) {
        let b = &self.inner.memory_budget;
        (b.grown(), b.budget())
    }

    /// Sets what runs at each growth the guest memory budget refuses, on the thread of the
    /// guest call (keep it cheap): the runtime's passivates instances that hold memory. Once;
    /// later calls are ignored.
    pub fn on_guest_memory_refusal(&self, relieve: impl Fn() + Send + Sync + 'static) {
        self.inner.memory_budget.on_refusal(Box::new(relieve));
    }

    /// Compiles a component (or loads a precompiled artifact) and checks it against the
    /// `device` world and the imports Drover grants.
    pub fn compile(&self, bytes: &[u8]) -> Result<CompiledPlugin, PluginError> {
        check_shape(bytes)?;
        let component = Component::new(&self.inner.engine, bytes).map_err(|e| {
            let text = format!("{e:#}");
            let hint = if text.contains("unexpected end") || text.contains("out of bounds") {
                " (the file looks truncated: upload the whole .wasm file)"
            } else {
                ""
            };
            PluginError::Invalid(format!("{text}{hint}"))
        })?;
        self.prepare(component)
    }

    /// Serializes a compiled plugin so later starts can skip Cranelift (84 ms → 0.1 ms).
    pub fn precompile(&self, bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
        Ok(self.inner.engine.precompile_component(bytes)?)
    }

    /// Compiles a component once into both a ready plugin and its precompiled artifact
    /// (what an upload needs: [`Engine::compile`] then [`Engine::precompile`] would run
    /// Cranelift twice).
    pub fn compile_with_artifact(
        &self,
        bytes: &[u8],
    ) -> Result<(CompiledPlugin, Vec<u8>), PluginError> {
        check_shape(bytes)?;
        let artifact = match self.inner.engine.precompile_component(bytes) {
            Ok(a) => a,
            // Let `compile` phrase the error (with its hints).
            Err(_) => return self.compile(bytes).map(|c| (c, Vec::new())),
        };
        // SAFETY: the artifact was produced just now, in memory, by this engine's own
        // `precompile_component`; nothing else could have changed it.
        let component = unsafe { Component::deserialize(&self.inner.engine, &artifact) }
            .map_err(|e| PluginError::Invalid(format!("{e:#}")))?;
        Ok((self.prepare(component)?, artifact))
    }

    /// Loads an artifact produced by [`Engine::precompile`] and sealed with [`seal_artifact`]
    /// from a file that only Drover writes. Fails (and the caller recompiles) if its seal
    /// does not match its bytes (damaged on disk, or written before artifacts were sealed),
    /// or if it was built by another engine config or wasmtime version.
    pub fn load_precompiled(&self, path: &std::path::Path) -> Result<CompiledPlugin, PluginError> {
        let sealed = std::fs::read(path).map_err(|e| PluginError::Invalid(e.to_string()))?;
        let artifact = unseal_artifact(&sealed).ok_or_else(|| {
            PluginError::Invalid(format!(
                "{} is damaged or unsealed: its checksum does not match its bytes",
                path.display()
            ))
        })?;
        // SAFETY: the bytes are what `precompile` produced in this runtime's own data
        // directory: their seal (a sha256 of them) matches, so no byte changed on disk since,
        // and wasmtime still checks their header, version and engine settings before use.
        let component = unsafe { Component::deserialize(&self.inner.engine, artifact) }
            .map_err(|e| PluginError::Invalid(format!("{e:#}")))?;
        self.prepare(component)
    }

    fn prepare(&self, component: Component) -> Result<CompiledPlugin, PluginError> {
        let engine = &self.inner.engine;
        let cap = self.inner.config.max_memory as u64;
        if let Some(pages) = component
            .resources_required()
            .and_then(|r| r.max_initial_memory_size)
            && pages.saturating_mul(WASM_PAGE) > cap
        {
            return Err(PluginError::Unfit(format!(
                "its linear memory starts at {} bytes ({pages} pages of 64 KiB), over the cap on \
                 one instance's memory of {cap} bytes (`--max-guest-memory`): raise the cap, or \
                 build the plugin with a smaller initial memory (a Rust guest's starts with its \
                 stack, 1 MiB by default)",
                pages.saturating_mul(WASM_PAGE)
            )));
        }
        // Every refused import at once, each with its likely cause in the guest's code.
        let denied: Vec<String> = component
            .component_type()
            .imports(engine)
            .filter(|(name, _)| !ACCEPTED_IMPORTS.iter().any(|p| name.starts_with(p)))
            .map(|(name, _)| denied_import(name))
            .collect();
        if !denied.is_empty() {
            return Err(PluginError::Incompatible(format!(
                "the component imports what Drover does not grant to guests (guests are \
                 deterministic: time and seeds come from the event context, state lives in \
                 the journal):\n- {}",
                denied.join("\n- ")
            )));
        }
        // The accepted WASI imports become traps, defined on a copy of the linker so the
        // shared one only ever holds Drover's own interface.
        let mut linker = self.inner.linker.clone();
        linker
            .define_unknown_imports_as_traps(&component)
            .map_err(|e| PluginError::Incompatible(format!("{e:#}")))?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Incompatible(format!("{e:#}")))?;
        // The newest contract first; a component exporting neither is explained in terms
        // of the newest.
        let exports = match DevicePre::new(pre.clone()) {
            Ok(v3) => {
                let indices = bindings::DeviceIndices::new(v3.instance_pre())
                    .map_err(|e| PluginError::Incompatible(format!("{e:#}")))?;
                let export = |name: &str| {
                    component
                        .get_export_index(None, name)
                        .ok_or_else(|| PluginError::Incompatible(format!("no `{name}` export")))
                };
                let direct = V3Exports {
                    init: export("init")?,
                    restore: export("restore")?,
                    handle: export("handle")?,
                    apply: export("apply")?,
                    batch: export("apply-batch")?,
                    query: export("query")?,
                    snapshot: export("snapshot")?,
                };
                Pre::V3(v3, indices, Box::new(direct))
            }
            Err(e) => match bindings_v2::DevicePre::new(pre.clone()) {
                Ok(v2) => Pre::V2(v2),
                Err(_) => match bindings_v1::DevicePre::new(pre) {
                    Ok(v1) => Pre::V1(v1),
                    Err(_) => {
                        return Err(PluginError::Incompatible(format!(
                            "{e:#}: the component does not export the `device` world; a Rust \
                             plugin exports it with `drover_guest::export_device!(YourState);` \
                             at the crate's top level"
                        )));
                    }
                },
            },
        };
        Ok(CompiledPlugin {
            engine: self.clone(),
            pre: Arc::new(exports),
            slow_marks: Arc::new(SlowMarks::default()),
        })
    }
}

/// A pre-instantiated component, by the contract version it exports.
enum Pre {
    V1(bindings_v1::DevicePre<GuestState>),
    V2(bindings_v2::DevicePre<GuestState>),
    /// With where the exports called directly are (see [`V3Exports`]).
    V3(
        DevicePre<GuestState>,
        bindings::DeviceIndices,
        Box<V3Exports<ComponentExportIndex>>,
    ),
}

/// Exports of a `0.3.0` plugin called directly rather than through the bindings: `apply-batch`
/// (the bindings call it with owned strings only, and a batch is borrowed from journal
/// reads), and `init`, `restore`, `handle`, `apply`, `query` and `snapshot` when called on a
/// fiber (the bindings call either synchronously or asynchronously, not both).
struct V3Exports<F> {
    init: F,
    restore: F,
    handle: F,
    apply: F,
    batch: F,
    query: F,
    snapshot: F,
}

/// A live instance's exports, by contract version.
enum Exports {
    V1(bindings_v1::Device),
    V2(bindings_v2::Device),
    /// With the functions called directly (see [`V3Exports`]).
    V3(Device, V3Exports<Func>),
}

/// What ends a sealed artifact: this tag, then the sha256 of the bytes before it.
const SEAL: &[u8; 8] = b"DROVERCW";

/// An artifact of [`Engine::precompile`] as the registry stores it: its bytes, then
/// [`SEAL`] and their sha256. A precompiled artifact is machine code the server maps and
/// runs as it is (wasmtime checks its header, not its code); unsealed, one changed byte on
/// disk ran as the plugin's code with no warning, served wrong states and left them in
/// snapshots (a review changed one byte of a string constant).
pub fn seal_artifact(artifact: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    let mut sealed = Vec::with_capacity(artifact.len() + SEAL.len() + 32);
    sealed.extend_from_slice(artifact);
    sealed.extend_from_slice(SEAL);
    sealed.extend_from_slice(&sha2::Sha256::digest(artifact));
    sealed
}

/// The artifact inside `sealed`, if its seal matches its bytes.
fn unseal_artifact(sealed: &[u8]) -> Option<&[u8]> {
    use sha2::Digest as _;
    let body_len = sealed.len().checked_sub(SEAL.len() + 32)?;
    let (body, seal) = sealed.split_at(body_len);
    let (tag, sum) = seal.split_at(SEAL.len());
    (tag == SEAL && sha2::Sha256::digest(body).as_slice() == sum).then_some(body)
}

/// Refuses bytes that are not a component before Cranelift sees them, saying what they are
/// instead and how to build a component.
fn check_shape(bytes: &[u8]) -> Result<(), PluginError> {
    const BUILD: &str = "build the plugin for `wasm32-wasip2` (`rustup target add wasm32-wasip2`, \
                         then `cargo build --release --target wasm32-wasip2`)";
    if bytes.is_empty() {
        return Err(PluginError::Invalid(format!(
            "the upload is empty: send the `.wasm` component's bytes as the body; {BUILD}"
        )));
    }
    if !bytes.starts_with(b"\0asm") {
        return Err(PluginError::Invalid(format!(
            "not WebAssembly (no `\\0asm` header): upload the `.wasm` component; {BUILD}"
        )));
    }
    if bytes.len() < 8 {
        return Err(PluginError::Invalid(format!(
            "truncated: {} bytes; upload the whole `.wasm` file",
            bytes.len()
        )));
    }
    // Version 1, layer 0 is a core module: what `wasm32-wasip1` and `wasm32-unknown-unknown`
    // produce. A component is layer 1.
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(PluginError::Invalid(format!(
            "a core WebAssembly module, not a component (`wasm32-wasip1` and \
             `wasm32-unknown-unknown` builds are core modules); {BUILD}"
        )));
    }
    Ok(())
}

/// Explains why an import is refused, naming what in a Rust guest usually causes it.
fn denied_import(name: &str) -> String {
    let why = if name.starts_with("wasi:random/insecure-seed") {
        "a `HashMap`/`HashSet` with std's default hasher seeds itself from it: use `BTreeMap`/\
         `BTreeSet`, or a map with a fixed hasher"
    } else if name.starts_with("wasi:random") {
        "a random source (`rand`, `getrandom`, `uuid` v4): derive randomness from the event \
         context's seed (`ctx.seed()`)"
    } else if name.starts_with("wasi:clocks") {
        "`std::time::SystemTime` or `Instant`: take time from the event context (`ctx.at_ms()`)"
    } else if name.starts_with("wasi:filesystem") {
        "`std::fs` (or `std::env::current_dir`): state lives in the device's state and journal"
    } else if name.starts_with("wasi:sockets") || name.starts_with("wasi:http") {
        "network access: a device behavior only decides; effects go through the host"
    } else {
        "only the `drover:device` host interface (and inert stdio) is provided"
    };
    format!("`{name}`: {why}")
}

/// Why instantiation (the component's start code) failed: a timeout, and the server's
/// overload (a core, memory) told apart from the guest's fault, as for any call.
fn instantiation_fault(
    store: &mut Store<GuestState>,
    budget: Duration,
    e: wasmtime::Error,
) -> CallError {
    let state = store.data_mut();
    if let Some(refused) = state.limits.take_refusal() {
        return CallError::GuestMemory(refused);
    }
    if matches!(
        e.downcast_ref::<wasmtime::Trap>(),
        Some(wasmtime::Trap::Interrupt)
    ) {
        if state.stopped {
            return CallError::Stopped;
        }
        return match state.starved.take() {
            Some(used) => CallError::Starved { budget, used },
            None => CallError::Timeout {
                budget,
                export: "instantiation",
            },
        };
    }
    if short_of_memory(&e) {
        return CallError::HostMemory(format!("{e:#}"));
    }
    CallError::Trap(format!("instantiation failed: {e:#}"))
}

/// Whether an instantiation failed because the process could not map memory (`ENOMEM`):
/// the host's trouble, not a trap of the guest's, so it must not count toward a quarantine
/// (a review saw healthy devices answer `activation-failed` "guest trapped" as guard-page
/// instances neared the mapping limit).
fn short_of_memory(e: &wasmtime::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOMEM))
    }) || format!("{e:#}").contains("Cannot allocate memory")
}

/// A plugin version compiled for this engine, ready to instantiate. Cheap to clone.
#[derive(Clone)]
pub struct CompiledPlugin {
    engine: Engine,
    pre: Arc<Pre>,
    /// Whether this version's events, or its setup work, run slow (see
    /// [`CompiledPlugin::ran_slow`] and [`CompiledPlugin::setup_runs_slow`]).
    slow_marks: Arc<SlowMarks>,
}

impl CompiledPlugin {
    /// Creates a fresh instance for `device` (state not yet initialized: call
    /// [`Instance::init`] or [`Instance::restore`]).
    pub fn instantiate(&self, device: Arc<str>) -> Result<Instance, CallError> {
        let inner = &self.engine.inner;
        let state = GuestState {
            limits: limits::GuestLimits::new(
                StoreLimitsBuilder::new()
                    .memory_size(inner.config.max_memory)
                    .instances(4)
                    .tables(16)
                    .memories(1)
                    .build(),
                inner.memory_budget.clone(),
            ),
            device,
            last_error: None,
            stdio: stdio::Buffers::default(),
            log_budget: guest_log::Budget::default(),
            clock: UnitClock::start(inner.config.call_timeout, inner.config.epoch_tick),
            starved: None,
            on_fiber: false,
            slow_marks: self.slow_marks.clone(),
            preemption: Preemption::None,
            setup: false,
            moved: false,
            stopping: inner.stopping.clone(),
            stopped: false,
            quiet: false,
        };
        let mut store = Store::new(&inner.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(deadline_reached);
        // Instantiation runs the component's start code: one call's budget.
        store.set_epoch_deadline(UnitClock::ticks(
            inner.config.call_timeout,
            inner.config.epoch_tick,
        ));
        let device = match &*self.pre {
            Pre::V1(pre) => pre.instantiate(&mut store).map(Exports::V1),
            Pre::V2(pre) => pre.instantiate(&mut store).map(Exports::V2),
            Pre::V3(pre, indices, direct) => {
                pre.instance_pre()
                    .instantiate(&mut store)
                    .and_then(|instance| {
                        let device = indices.load(&mut store, &instance)?;
                        let mut func = |index| {
                            instance.get_func(&mut store, index).ok_or_else(|| {
                                wasmtime::format_err!("the component lacks an export it declares")
                            })
                        };
                        let direct = V3Exports {
                            init: func(direct.init)?,
                            restore: func(direct.restore)?,
                            handle: func(direct.handle)?,
                            apply: func(direct.apply)?,
                            batch: func(direct.batch)?,
                            query: func(direct.query)?,
                            snapshot: func(direct.snapshot)?,
                        };
                        Ok(Exports::V3(device, direct))
                    })
            }
        }
        .map_err(|e| instantiation_fault(&mut store, inner.config.call_timeout, e))?;
        Ok(Instance {
            store,
            device,
            epoch_tick: inner.config.epoch_tick,
            call_timeout: inner.config.call_timeout,
            unit: None,
            holds_stack: false,
            stacks: inner.stacks.clone(),
        })
    }

    /// Whether a unit of work on a live instance of this version (an event, a read, a
    /// snapshot) has used two epoch ticks (20 ms) of CPU time. From then on its instances'
    /// events, reads, snapshots, activations and folds run on the slow lane (see
    /// `actor::ActorPool`), their calls preemptible (see [`Instance::handle_preemptible`]);
    /// until then every call holds its thread to the end, which spares fast plugins a fiber
    /// per call and a stack per instance. Dry-runs never mark it. Cleared after
    /// [`FORGIVE_AFTER`] fast units in a row on the slow lane (see [`SlowMark`]), and at a
    /// restart. Slow setup work marks [`CompiledPlugin::setup_runs_slow`] instead.
    pub fn ran_slow(&self) -> bool {
        self.slow_marks.events_slow()
    }

    /// Whether this version's activations, deploy folds and trial `init`s run on the slow
    /// lane: it [ran slow](CompiledPlugin::ran_slow), or a unit that builds a state (a
    /// `restore` or `init`, a chunk of a fold: see [`Instance::begin_setup_unit`]) used two
    /// epoch ticks, or, for a chunk of a fold, more than its transitions' allowance (see
    /// [`Instance::expect_cpu`]: a long fold is not a slow plugin). Cleared as the other mark
    /// is, by fast setup units on the slow lane.
    pub fn setup_runs_slow(&self) -> bool {
        self.slow_marks.setup_slow()
    }

    /// ([`CompiledPlugin::ran_slow`], [`CompiledPlugin::setup_runs_slow`]) read together:
    /// the second is true whenever the first is.
    pub fn slow_marks(&self) -> (bool, bool) {
        self.slow_marks.both()
    }

    /// The engine this plugin was compiled for.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The contract version the component exports (one of [`WIT_PACKAGES`]).
    pub fn contract(&self) -> &'static str {
        match &*self.pre {
            Pre::V1(_) => WIT_PACKAGES[0],
            Pre::V2(_) => WIT_PACKAGES[1],
            Pre::V3(..) => WIT_PACKAGES[2],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An instantiation short of memory or mappings (as wasmtime reports an `mmap` that
    /// failed) is the server's overload; any other failure is the guest's trap.
    #[test]
    fn an_instantiation_short_of_memory_is_an_overload_not_a_trap() {
        let enomem = wasmtime::Error::new(std::io::Error::from_raw_os_error(libc::ENOMEM))
            .context("mmap failed to reserve 0x104000000 bytes");
        assert!(short_of_memory(&enomem));
        assert!(CallError::HostMemory(format!("{enomem:#}")).is_overload());
        let text = wasmtime::format_err!("Cannot allocate memory (os error 12)");
        assert!(short_of_memory(&text));
        let trap = wasmtime::format_err!("unreachable executed");
        assert!(!short_of_memory(&trap));
    }
}
