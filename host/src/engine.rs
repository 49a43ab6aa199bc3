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
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, ComponentExportIndex, Func, HasSelf, Linker};

pub use crate::config::EngineConfig;
use wasmtime::{Store, StoreLimitsBuilder, UpdateDeadline};

pub(crate) mod cpu_clock;
mod guest_log;
mod limits;
mod memory;
mod stacks;
mod stdio;

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
use bindings::drover::device::types::DeviceError;
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
    /// The guest exceeded its time budget. The instance must be discarded.
    #[error("guest exceeded its {0:?} time budget")]
    Timeout(Duration),
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
            CallError::Starved { .. } | CallError::GuestMemory(_) | CallError::Moved
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
}

/// One of a plugin version's two marks (see [`SlowMarks`]): whether its events, or its setup
/// work, run slow, shared by its instances.
///
/// Set by a unit of its kind that showed it slow ([`UnitClock::shows_slow`]); cleared again
/// once [`FORGIVE_AFTER`] units of its kind in a row on the slow lane, while it was set, ended
/// without showing it slow, so that one slow event, or a mark
/// set wrongly, does not keep a fleet on half the cores until the process restarts. A
/// plugin slow on one event in more than that many stays there; one slow more rarely comes
/// back to the pool and, on its next slow event, moves again (two or three ticks of a pool
/// thread).
#[derive(Debug, Default)]
struct SlowMark {
    slow: AtomicBool,
    /// Units in a row on the slow lane that ended without showing the version slow. (Not
    /// "without a look at their deadline": a thread held off its core for a tick in the
    /// middle of a fast unit is looked at, and on a loaded machine that broke every streak.)
    fast_streak: AtomicU32,
}

/// A plugin version's two marks. A unit that builds a state (an activation's `restore`,
/// `init` and replayed `apply`s, a deploy's fold, provisioning's trial `init`: see
/// [`Instance::begin_setup_unit`]) marks `setup`; the rest (events, reads, snapshots: work on
/// a live instance) mark `events`. Apart because the two are paid for differently: a plugin
/// whose `init` builds a large table, or whose large states take 20 ms to `restore`, has
/// slow activations and fast events, and its fleet's events belong on the pool; with one
/// mark, each activation sent them all to the slow lane (half the cores, a fiber per call)
/// and, as activations are frequent, kept them there.
#[derive(Debug, Default)]
pub(crate) struct SlowMarks {
    events: SlowMark,
    setup: SlowMark,
}

impl SlowMarks {
    /// The mark a unit of this kind sets and clears.
    fn of(&self, setup: bool) -> &SlowMark {
        if setup { &self.setup } else { &self.events }
    }

    /// A unit of this kind on the slow lane ended (see [`SlowMark::unit_ended`]); a mark it
    /// cleared is logged.
    fn unit_ended(&self, setup: bool, seen_slow: bool, device: &str) {
        if !self.of(setup).unit_ended(seen_slow) {
            return;
        }
        if setup {
            tracing::info!(
                device,
                units = FORGIVE_AFTER,
                "this device's plugin version built states fast on its last activations, folds \
                 and trial inits on the slow lane: they run on the actor pool again, unless its \
                 events are still marked slow"
            );
        } else {
            tracing::info!(
                device,
                units = FORGIVE_AFTER,
                "this device's plugin version ran fast on its last units on the slow \
                 lane: its devices' events and reads run on the actor pool again"
            );
        }
    }

    /// (`events_slow`, `setup_slow`), each mark read once, so the second includes the first.
    fn both(&self) -> (bool, bool) {
        let events = self.events_slow();
        (events, events || self.setup.slow.load(Ordering::Relaxed))
    }

    fn events_slow(&self) -> bool {
        self.events.slow.load(Ordering::Relaxed)
    }

    /// Setup work goes where slow events go too: a fold's `apply`s are the events' own.
    fn setup_slow(&self) -> bool {
        self.both().1
    }
}

/// Units of a version in a row on the slow lane that end without showing it slow, after which the
/// version is no longer taken to run slow (see [`SlowMark`]).
pub const FORGIVE_AFTER: u32 = 10_000;

impl SlowMark {
    /// Sets the mark; whether it was clear. The streak starts afresh: units that ran fast on
    /// the slow lane while it was clear (there for the other mark) do not count toward
    /// forgiving it.
    fn set(&self) -> bool {
        let was_clear = !self.slow.swap(true, Ordering::Relaxed);
        if was_clear {
            self.fast_streak.store(0, Ordering::Relaxed);
        }
        was_clear
    }

    /// A unit on the slow lane ended; `seen_slow`: a look at its deadline showed it slow.
    /// Whether that cleared the mark (see [`FORGIVE_AFTER`]).
    fn unit_ended(&self, seen_slow: bool) -> bool {
        if seen_slow {
            self.fast_streak.store(0, Ordering::Relaxed);
            return false;
        }
        if !self.slow.load(Ordering::Relaxed) {
            return false;
        }
        if self.fast_streak.fetch_add(1, Ordering::Relaxed) + 1 >= FORGIVE_AFTER {
            self.fast_streak.store(0, Ordering::Relaxed);
            return self.slow.swap(false, Ordering::Relaxed);
        }
        false
    }
}

/// How a unit of work may give its thread back (see [`Instance::begin_unit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preemption {
    /// Never: every call holds its thread to the end (a dry-run's re-decisions, `state?at=`
    /// and `drover replay` rebuilds, on blocking threads).
    None,
    /// Stopped at its first look past two epoch ticks of CPU time ([`CallError::Moved`]), to
    /// run again from the start elsewhere, and the plugin marked slow: the actor pool's events,
    /// reads, snapshots, activations, deploy folds and trial `init`s, whose plugin had not run
    /// slow when they began. `handle`, `query` and `snapshot` change no state, an activation
    /// or a fold builds a fresh instance, and the journal holds all the rest, so running any
    /// of them again is safe; the instance goes.
    Move,
    /// Each call runs on a fiber that yields its thread at every epoch tick, if the plugin has
    /// run slow (see [`Instance::handle_preemptible`]): the slow lane's events, reads,
    /// snapshots, activations, folds and trial `init`s.
    Yield,
}

/// A unit of work's time budget, in CPU time of the thread that runs it, and where it began.
///
/// A unit on a fiber runs in slices, one per poll, each perhaps on another thread: what the
/// earlier slices used is kept apart from where the current one began, in the CPU clock of
/// the thread running it (a thread's clock starts at zero when the thread does, so the two
/// cannot be folded into one start point).
#[derive(Debug, Clone, Copy)]
struct UnitClock {
    budget: Duration,
    epoch_tick: Duration,
    /// CPU time the unit's earlier slices used.
    cpu_before: Duration,
    /// The running thread's CPU time when the current slice began (for the first, a recent
    /// sample: never later than the start).
    cpu_start: Duration,
    /// Wall-clock time the earlier slices ran, waiting for a core included, waiting for
    /// their turn between slices not.
    wall_before: Duration,
    /// When the current slice began.
    wall_start: Instant,
    /// CPU time the earlier slices surely used: counted from clock readings only.
    sure_before: Duration,
    /// The running thread's CPU clock as read at the current slice's first look, or at its
    /// resumption: where what it surely used is counted from (see [`UnitClock::surely_used`]).
    sure_start: Option<Duration>,
    /// The unit yielded its thread at its last look: the next look, due at once after it is
    /// resumed, begins a slice on whatever thread resumed it.
    yielded: bool,
    /// A look showed it slow (see [`UnitClock::shows_slow`] and [`SlowMark`]).
    seen_slow: bool,
    /// CPU time the unit may use before it shows its plugin slow, if more than two ticks:
    /// a chunk of a fold, as long as the history it folds (see [`Instance::expect_cpu`]).
    slow_floor: Duration,
}

/// How many times its budget a unit may take in wall-clock time, waiting for a core included,
/// before it is interrupted whatever CPU time it used (as `CallError::Starved` within its CPU
/// budget): a bound for a thread starved for long, or a host call that blocks (a log line
/// into a full pipe). Time a preemptible unit waited for its turn between slices does not
/// count: that is the server being fair, not short of cores, and the guests ahead of it
/// are charged for their own turns (so many guests spinning at once still time out on their
/// CPU budgets, and a plugin doing that is quarantined, rather than each being told the
/// server is overloaded and coming again).
pub(crate) const WALL_LIMIT: u32 = 4;

/// Epoch ticks of CPU time a unit that may be preempted must use, as seen at a look at its
/// deadline, for its plugin to count as having run slow (see [`UnitClock::shows_slow`]).
const SLOW_TICKS: u32 = 2;

impl UnitClock {
    fn start(budget: Duration, epoch_tick: Duration) -> UnitClock {
        let now = Instant::now();
        UnitClock {
            budget,
            epoch_tick,
            cpu_before: Duration::ZERO,
            cpu_start: cpu_clock::recent(),
            wall_before: Duration::ZERO,
            wall_start: now,
            sure_before: Duration::ZERO,
            sure_start: None,
            yielded: false,
            seen_slow: false,
            slow_floor: Duration::ZERO,
        }
    }

    /// CPU time the unit used, the running thread's clock reading `cpu_now` at `now`. A
    /// slice is charged at most its wall-clock time: its start point may be a sample taken
    /// before it began, and a ticker that woke late leaves the sample older than a tick.
    fn used(&self, cpu_now: Duration, now: Instant) -> Duration {
        let slice = cpu_now.saturating_sub(self.cpu_start);
        self.cpu_before + slice.min(now.saturating_duration_since(self.wall_start))
    }

    /// CPU time past which a unit shows its plugin slow: two epoch ticks (a unit's first
    /// start point is a sample up to a tick old), or half its budget if that is less; or a
    /// fold's chunk's allowance if that is more (see [`Instance::expect_cpu`]).
    fn slow_after(&self) -> Duration {
        (self.epoch_tick * SLOW_TICKS)
            .min(self.budget / 2)
            .max(self.slow_floor)
    }

    /// CPU time the unit surely used, the running thread's clock reading `cpu_now`: counted
    /// from clock readings only, never from a sample, so from the current slice's first look
    /// (which this is, if none was before) or its resumption. Less than [`UnitClock::used`]
    /// by the first slice's time before its first look.
    fn surely_used(&mut self, cpu_now: Duration) -> Duration {
        let start = *self.sure_start.get_or_insert(cpu_now);
        self.sure_before + cpu_now.saturating_sub(start)
    }

    /// Whether a unit that used `used` by its estimate and `surely` by clock readings shows its
    /// plugin slow: past [`UnitClock::slow_after`], and a quarter of it (half a tick) surely.
    ///
    /// The estimate alone is not enough. Its start point is a sample that may be a tick old,
    /// or more when the ticker woke late, and charges the unit for what its thread ran before
    /// it, up to what the slice lasted in wall-clock time. On a machine short of cores a
    /// thread preempted in the middle of a 5 µs event for 20 ms was charged 20 ms: with four
    /// busy processes beside a server on two cores, the thermostat was marked slow within
    /// seconds, and its whole fleet went to the slow lane.
    fn shows_slow(&self, used: Duration, surely: Duration) -> bool {
        used >= self.slow_after() && surely >= self.slow_after() / 4
    }

    /// Wall-clock time the unit ran, not counting the turns it waited between slices.
    fn ran(&self, now: Instant) -> Duration {
        self.wall_before + now.saturating_duration_since(self.wall_start)
    }

    /// The unit yields its thread, having used `used` of CPU (`surely` of it surely, see
    /// [`UnitClock::surely_used`]) and run `ran`.
    fn suspend(&mut self, used: Duration, surely: Duration, ran: Duration) {
        self.cpu_before = used;
        self.sure_before = surely;
        self.wall_before = ran;
        self.yielded = true;
    }

    /// The unit was resumed on a thread whose CPU clock reads `cpu_now`: a slice begins.
    fn resume(&mut self, cpu_now: Duration, now: Instant) {
        self.cpu_start = cpu_now;
        self.sure_start = Some(cpu_now);
        self.wall_start = now;
        self.yielded = false;
    }

    /// Epoch ticks until the deadline is first looked at: within two epoch ticks, so that a
    /// unit running long is seen (and, on a fiber, yields) early; or its whole budget if that
    /// is shorter.
    fn first_look(budget: Duration, epoch_tick: Duration) -> u64 {
        UnitClock::ticks(budget.min(epoch_tick), epoch_tick)
    }

    /// [`UnitClock::first_look`] for a unit that gives its thread back as `preemption` says.
    /// A unit on the actor pool that may be moved is first looked at the next tick, within
    /// one: that look reads the thread's clock, from which what the unit surely used is
    /// counted (see [`UnitClock::surely_used`]), so a spinning unit is seen slow two or three
    /// ticks in, not three or four. A unit shorter than a tick is looked at only if a tick
    /// ends during it (a 5 µs event: one in 2,000).
    fn first_look_for(budget: Duration, epoch_tick: Duration, preemption: Preemption) -> u64 {
        match preemption {
            Preemption::Move => 1,
            Preemption::None | Preemption::Yield => UnitClock::first_look(budget, epoch_tick),
        }
    }

    /// Epoch ticks until the deadline should next be looked at for `left` of budget: one
    /// more than it spans, since the current tick may be about to end.
    fn ticks(left: Duration, epoch_tick: Duration) -> u64 {
        (left.as_nanos() / epoch_tick.as_nanos().max(1)).max(1) as u64 + 1
    }
}

/// Whole epoch ticks of `tick` in `elapsed` of wall-clock time: where the epoch should be.
fn ticks_due(elapsed: Duration, tick: Duration) -> u64 {
    (elapsed.as_nanos() / tick.as_nanos().max(1)) as u64
}

/// What a look at a unit's deadline decided (see [`UnitClock::look`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Go on; look again in this many ticks.
    Continue(u64),
    /// Yield the thread (on a fiber); look again at once when resumed.
    Yield,
    /// Past its CPU budget: a timeout.
    Timeout,
    /// Far past its budget in wall-clock time within its CPU budget, having used this much.
    Starved(Duration),
    /// Stop, to run again on the slow lane ([`Preemption::Move`]).
    Move,
}

impl UnitClock {
    /// A look at the unit's clocks, the running thread's CPU clock reading `cpu_now` at `now`:
    /// what to do, and, if the unit shows its plugin slow (a unit that may be preempted, see
    /// [`UnitClock::shows_slow`]; a unit that times out shows it too), the CPU time it used and
    /// surely used.
    fn look(
        &mut self,
        cpu_now: Duration,
        now: Instant,
        preemption: Preemption,
        on_fiber: bool,
    ) -> (Verdict, Option<(Duration, Duration)>) {
        if self.yielded {
            // The first look after a yield (the deadline was due at once).
            self.resume(cpu_now, now);
            return (Verdict::Continue(1), None);
        }
        let used = self.used(cpu_now, now);
        let surely = self.surely_used(cpu_now);
        let timed_out = used >= self.budget;
        // A timeout marks its plugin without the sure part: with a budget under three ticks
        // the first look, where nothing is sure yet, may be the last.
        // A unit with no budget at all (a rebuild that has waited its wall-clock bound out)
        // times out at its first look, having shown nothing of its plugin.
        let slow = preemption != Preemption::None
            && !self.budget.is_zero()
            && (self.shows_slow(used, surely) || (timed_out && used >= self.slow_after()));
        let verdict = if timed_out {
            Verdict::Timeout
        } else if self.ran(now) >= self.budget * WALL_LIMIT {
            Verdict::Starved(used)
        } else if preemption == Preemption::Move {
            // Looked at each tick until it is seen slow, or ends.
            if slow {
                Verdict::Move
            } else {
                Verdict::Continue(1)
            }
        } else if on_fiber {
            self.suspend(used, surely, self.ran(now));
            Verdict::Yield
        } else {
            Verdict::Continue(UnitClock::ticks(self.budget - used, self.epoch_tick))
        };
        self.seen_slow |= slow;
        (verdict, slow.then_some((used, surely)))
    }
}

/// The epoch deadline passed: a look at the unit's clocks ([`UnitClock::look`]). Interrupts a
/// unit past its CPU budget (a timeout) or far past it in wall-clock time (starved). An
/// unit that may be preempted and has used two ticks marks its plugin slow, and one on the
/// actor pool is then stopped, to run again on the slow lane ([`Preemption::Move`]).
/// Otherwise the guest goes on: on a fiber, after yielding its thread to whatever else waits
/// for one; otherwise for what is left of its budget.
fn deadline_reached(
    mut store: wasmtime::StoreContextMut<'_, GuestState>,
) -> wasmtime::Result<UpdateDeadline> {
    let state = store.data_mut();
    let (cpu_now, now) = (cpu_clock::now(), Instant::now());
    let (verdict, slow) = state
        .clock
        .look(cpu_now, now, state.preemption, state.on_fiber);
    // Marked even if the unit ends here: a plugin whose events time out is slow too.
    if let Some((used, surely)) = slow
        && state.slow_marks.of(state.setup).set()
    {
        let (cpu_ms, surely_ms) = (used.as_secs_f64() * 1e3, surely.as_secs_f64() * 1e3);
        if state.setup {
            tracing::warn!(
                device = %state.device,
                cpu_ms,
                surely_ms,
                "building this device's state (`restore`, `init` or replayed `apply`s) ran \
                 slow: from now on its plugin version's activations, folds and trial inits run \
                 on the slow lane (its events stay where they are)"
            );
        } else {
            tracing::warn!(
                device = %state.device,
                cpu_ms,
                surely_ms,
                "a guest call of this device's plugin version ran slow: from now on its \
                 devices' events, reads and activations run on the slow lane"
            );
        }
    }
    match verdict {
        Verdict::Continue(ticks) => Ok(UpdateDeadline::Continue(ticks)),
        Verdict::Yield => Ok(UpdateDeadline::Yield(0)),
        Verdict::Timeout => Err(wasmtime::Trap::Interrupt.into()),
        Verdict::Starved(used) => {
            state.starved = Some(used);
            Err(wasmtime::Trap::Interrupt.into())
        }
        Verdict::Move => {
            state.moved = true;
            Err(wasmtime::Trap::Interrupt.into())
        }
    }
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
        // A log line must never take down the actor: whatever the subscriber does (a full
        // disk under stderr, a panicking writer), the guest call goes on.
        let logged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match level {
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
            }),
        })
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
        return match state.starved.take() {
            Some(used) => CallError::Starved { budget, used },
            None => CallError::Timeout(budget),
        };
    }
    CallError::Trap(format!("instantiation failed: {e:#}"))
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

fn v1_error(
    e: bindings_v1::drover::device::types::DeviceError,
) -> bindings::drover::device::types::DeviceError {
    bindings::drover::device::types::DeviceError {
        code: e.code,
        message: e.message,
    }
}

fn v2_error(
    e: bindings_v2::drover::device::types::DeviceError,
) -> bindings::drover::device::types::DeviceError {
    bindings::drover::device::types::DeviceError {
        code: e.code,
        message: e.message,
    }
}

/// The `0.2.0` shapes of the event context and the outcome: the same as today's, in the
/// frozen package's own types.
mod v2_shapes {
    use super::bindings::drover::device::types as now;
    use super::bindings_v2::drover::device::types as v2;

    pub(super) fn context(ctx: &now::EventContext) -> v2::EventContext {
        v2::EventContext {
            device_id: ctx.device_id.clone(),
            seq: ctx.seq,
            at_ms: ctx.at_ms,
            seed: ctx.seed,
            origin: match &ctx.origin {
                now::Origin::External => v2::Origin::External,
                now::Origin::Message(m) => v2::Origin::Message(v2::MessageOrigin {
                    sender: m.sender.clone(),
                    seq: m.seq,
                    index: m.index,
                }),
                now::Origin::Timer(t) => v2::Origin::Timer(v2::TimerOrigin {
                    key: t.key.clone(),
                    due_ms: t.due_ms,
                    missed: t.missed,
                }),
            },
        }
    }

    pub(super) fn outcome(o: v2::Outcome) -> now::Outcome {
        now::Outcome {
            transitions: o.transitions,
            effects: o
                .effects
                .into_iter()
                .map(|e| match e {
                    v2::Effect::Command(c) => now::Effect::Command(now::Command {
                        payload: c.payload,
                        ttl_ms: c.ttl_ms,
                    }),
                    v2::Effect::Send(m) => now::Effect::Send(now::Message {
                        to: m.to,
                        event: m.event,
                    }),
                    v2::Effect::SetTimer(t) => now::Effect::SetTimer(now::Timer {
                        key: t.key,
                        due_ms: t.due_ms,
                        every_ms: t.every_ms,
                        event: t.event,
                    }),
                    v2::Effect::CancelTimer(key) => now::Effect::CancelTimer(key),
                })
                .collect(),
        }
    }
}

/// Why [`Instance::apply_batch`] stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    /// How many of the batch's transitions were applied before the one that failed, when
    /// that is known: for a refusal of a transition in the batch, and for every error of a
    /// plugin built before `0.3.0` (applied one call each). Unknown (`None`) for a trap or
    /// timeout inside one `apply-batch` call, and for a refusal naming a transition the batch
    /// does not hold (then a [`CallError::Trap`]): the instance is lost then, and the caller
    /// may replay one by one to find the transition (see `replay`).
    pub applied: Option<usize>,
    pub error: CallError,
}

/// One device's live guest instance. Not `Sync`: exactly one actor owns it.
///
/// # Time budgets
///
/// A guest call runs under an epoch deadline. Work that takes several calls (an event:
/// `handle` then its transitions applied; an activation: `restore` then the replayed
/// transitions) runs inside [`Instance::within`], which gives the whole unit one budget:
/// otherwise a `handle` returning thousands of transitions whose `apply`s each stay just under
/// the per-call deadline could hold a thread for hours. Outside a unit each call gets
/// [`EngineConfig::call_timeout`] (an `apply-batch` is one call).
///
/// Budgets count the CPU time of the thread that runs the guest, not the time it waited for
/// a core (see `engine/cpu_clock.rs`): the epoch deadline passing only makes the engine look
/// at the thread's CPU clock and let the guest go on for what is left. A unit that takes
/// `WALL_LIMIT` (4) times its budget in wall-clock time ends as a timeout regardless.
pub struct Instance {
    store: Store<GuestState>,
    device: Exports,
    epoch_tick: Duration,
    call_timeout: Duration,
    /// The budget of the unit of work under way, if any: calls inside it do not re-arm.
    unit: Option<Duration>,
    /// The store holds a fiber stack (from its first preemptible call until it drops).
    holds_stack: bool,
    stacks: Arc<stacks::StackPool>,
}

/// Most fiber stacks held by stores at once, across the engine: each is two memory mappings
/// (stack and guard page) and the pages its calls touched, held by its store until the store
/// drops. Past it, units of slow plugins' instances that hold no stack yet run as before, not
/// preemptible. 4,096 stacks are 8,192 of the kernel's 65,530 mappings a process may have.
const MAX_FIBER_STACKS: usize = 4096;

/// What [`Instance::begin_unit`] put aside: the enclosing unit, if any, to be restored.
pub struct UnitScope {
    outer: Option<Duration>,
    outer_clock: UnitClock,
    outer_preemption: Preemption,
    outer_setup: bool,
}

impl Instance {
    /// Builds the initial state from the device's JSON configuration.
    pub fn init(&mut self, device_id: &str, config: &str) -> Result<(), CallError> {
        self.arm();
        let r = match &self.device {
            Exports::V1(d) => d
                .call_init(&mut self.store, device_id, config)
                .map(|r| r.map_err(v1_error)),
            Exports::V2(d) => d
                .call_init(&mut self.store, device_id, config)
                .map(|r| r.map_err(v2_error)),
            Exports::V3(d, _) => d.call_init(&mut self.store, device_id, config),
        };
        self.settle(r)
    }

    /// Asks the guest what `event` means: the transitions (JSON documents) and effects. A
    /// plugin built against `0.1.0` returns no effects and does not see the context's origin.
    pub fn handle(&mut self, ctx: &EventContext, event: &str) -> Result<Outcome, CallError> {
        self.arm();
        let r = match &self.device {
            Exports::V1(d) => {
                let ctx = bindings_v1::drover::device::types::EventContext {
                    device_id: ctx.device_id.clone(),
                    seq: ctx.seq,
                    at_ms: ctx.at_ms,
                    seed: ctx.seed,
                };
                d.call_handle(&mut self.store, &ctx, event).map(|r| {
                    r.map(|o| Outcome {
                        transitions: o.transitions,
                        effects: Vec::new(),
                    })
                    .map_err(v1_error)
                })
            }
            Exports::V2(d) => d
                .call_handle(&mut self.store, &v2_shapes::context(ctx), event)
                .map(|r| r.map(v2_shapes::outcome).map_err(v2_error)),
            Exports::V3(d, _) => d.call_handle(&mut self.store, ctx, event),
        };
        self.settle(r)
    }

    /// Applies one transition.
    pub fn apply(&mut self, transition: &str) -> Result<(), CallError> {
        self.arm();
        let r = match &self.device {
            Exports::V1(d) => d
                .call_apply(&mut self.store, transition)
                .map(|r| r.map_err(v1_error)),
            Exports::V2(d) => d
                .call_apply(&mut self.store, transition)
                .map(|r| r.map_err(v2_error)),
            Exports::V3(d, _) => d.call_apply(&mut self.store, transition),
        };
        self.settle(r)
    }

    /// Applies transitions in order, as [`Instance::apply`] of each would, in one guest call
    /// for a plugin built against `0.3.0` (one call each before). Callers bound a batch (see
    /// `decide::batches`): the guest holds all of it in its memory at once. Meant
    /// to run inside a unit ([`Instance::within`]); outside one, the whole batch gets one
    /// call's budget.
    pub fn apply_batch(&mut self, transitions: &[&str]) -> Result<(), BatchError> {
        let batch = match &self.device {
            Exports::V3(_, direct) if transitions.len() > 1 => direct.batch,
            _ => {
                for (applied, t) in transitions.iter().enumerate() {
                    self.apply(t).map_err(|error| BatchError {
                        applied: Some(applied),
                        error,
                    })?;
                }
                return Ok(());
            }
        };
        self.arm();
        // Type-checked per call rather than trusted: a walk of two small types, little
        // against the calls a batch saves.
        let r = batch
            .typed::<(&[&str],), (Result<(), BatchRefusal>,)>(&self.store)
            .and_then(|f| f.call(&mut self.store, (transitions,)));
        self.batch_outcome(r, transitions.len())
    }

    /// [`Instance::init`], preemptible as [`Instance::handle_preemptible`] is: an activation or
    /// a trial `init` on the slow lane that spins holds its thread a tick at a time.
    pub async fn init_preemptible(
        &mut self,
        device_id: &str,
        config: &str,
    ) -> Result<(), CallError> {
        let init = match &self.device {
            Exports::V3(_, direct) if self.may_preempt() => direct.init,
            _ => return self.init(device_id, config),
        };
        let r = self
            .call_on_fiber::<(&str, &str), (Result<(), DeviceError>,)>(init, (device_id, config))
            .await;
        self.settle(r.map(|(r,)| r))
    }

    /// [`Instance::restore`], preemptible as [`Instance::handle_preemptible`] is.
    pub async fn restore_preemptible(&mut self, snapshot: &[u8]) -> Result<(), CallError> {
        let restore = match &self.device {
            Exports::V3(_, direct) if self.may_preempt() => direct.restore,
            _ => return self.restore(snapshot),
        };
        let r = self
            .call_on_fiber::<(&[u8],), (Result<(), DeviceError>,)>(restore, (snapshot,))
            .await;
        self.settle(r.map(|(r,)| r))
    }

    /// [`Instance::handle`], preemptible when the unit under way is (see
    /// [`Instance::begin_unit`]): the guest then runs on a fiber and yields its thread at
    /// each epoch tick, so a guest that spins holds an actor thread a tick at a time while
    /// other devices' events go on, instead of for its whole budget.
    pub async fn handle_preemptible(
        &mut self,
        ctx: &EventContext,
        event: &str,
    ) -> Result<Outcome, CallError> {
        let handle = match &self.device {
            Exports::V3(_, direct) if self.may_preempt() => direct.handle,
            _ => return self.handle(ctx, event),
        };
        let r = self
            .call_on_fiber::<(&EventContext, &str), (Result<Outcome, DeviceError>,)>(
                handle,
                (ctx, event),
            )
            .await;
        self.settle(r.map(|(r,)| r))
    }

    /// [`Instance::apply_batch`], preemptible as [`Instance::handle_preemptible`] is.
    pub async fn apply_batch_preemptible(
        &mut self,
        transitions: &[&str],
    ) -> Result<(), BatchError> {
        let (apply, batch) = match &self.device {
            Exports::V3(_, direct) if self.may_preempt() => (direct.apply, direct.batch),
            _ => return self.apply_batch(transitions),
        };
        let [one] = transitions else {
            if transitions.is_empty() {
                return Ok(());
            }
            let r = self
                .call_on_fiber::<(&[&str],), (Result<(), BatchRefusal>,)>(batch, (transitions,))
                .await;
            return self.batch_outcome(r, transitions.len());
        };
        let r = self
            .call_on_fiber::<(&str,), (Result<(), DeviceError>,)>(apply, (*one,))
            .await;
        self.settle(r.map(|(r,)| r)).map_err(|error| BatchError {
            applied: Some(0),
            error,
        })
    }

    /// Calls `func` on a fiber, where the guest may yield at a deadline. Its types are checked
    /// per call, as `apply-batch`'s are. Afterwards the store holds a fiber stack (see
    /// `engine/stacks.rs`), unless the call never began (the types did not check).
    async fn call_on_fiber<P, R>(&mut self, func: Func, params: P) -> wasmtime::Result<R>
    where
        P: wasmtime::component::ComponentNamedList + wasmtime::component::Lower + Send + Sync,
        R: wasmtime::component::ComponentNamedList
            + wasmtime::component::Lift
            + Send
            + Sync
            + 'static,
    {
        self.arm();
        let typed = func.typed::<P, R>(&self.store)?;
        self.store.data_mut().on_fiber = true;
        // Boxed: wasmtime's future of a call on a fiber is large, and every future that may
        // make one (an actor's event, read or activation) would carry it, though only the
        // calls of slow plugins run so.
        let r = Box::pin(typed.call_async(&mut self.store, params)).await;
        self.store.data_mut().on_fiber = false;
        self.holds_stack = true;
        r
    }

    /// What an `apply-batch` call of `len` transitions returned, as [`Instance::apply_batch`]
    /// tells it.
    fn batch_outcome(
        &mut self,
        r: wasmtime::Result<(Result<(), BatchRefusal>,)>,
        len: usize,
    ) -> Result<(), BatchError> {
        match r {
            Ok((Ok(()),)) => Ok(()),
            Ok((Err(refusal),)) => match usize::try_from(refusal.index) {
                Ok(applied) if applied < len => Err(BatchError {
                    applied: Some(applied),
                    error: CallError::Rejected {
                        code: refusal.error.code,
                        message: refusal.error.message,
                    },
                }),
                // A refusal of a transition the batch does not hold: nothing it says about
                // its state can be trusted.
                _ => Err(BatchError {
                    applied: None,
                    error: CallError::Trap(format!(
                        "apply-batch refused transition {} of a batch of {len} ({}: {})",
                        refusal.index, refusal.error.code, refusal.error.message
                    )),
                }),
            },
            Err(e) => Err(BatchError {
                applied: None,
                error: self.fault(e),
            }),
        }
    }

    /// Serializes the state.
    pub fn snapshot(&mut self) -> Result<Vec<u8>, CallError> {
        self.arm();
        let r = match &self.device {
            Exports::V1(d) => d.call_snapshot(&mut self.store),
            Exports::V2(d) => d.call_snapshot(&mut self.store),
            Exports::V3(d, _) => d.call_snapshot(&mut self.store),
        }
        .map(Ok);
        self.settle(r)
    }

    /// Replaces the state with a snapshot.
    pub fn restore(&mut self, snapshot: &[u8]) -> Result<(), CallError> {
        self.arm();
        let r = match &self.device {
            Exports::V1(d) => d
                .call_restore(&mut self.store, snapshot)
                .map(|r| r.map_err(v1_error)),
            Exports::V2(d) => d
                .call_restore(&mut self.store, snapshot)
                .map(|r| r.map_err(v2_error)),
            Exports::V3(d, _) => d.call_restore(&mut self.store, snapshot),
        };
        self.settle(r)
    }

    /// The state as JSON text.
    pub fn query(&mut self) -> Result<String, CallError> {
        self.arm();
        let r = match &self.device {
            Exports::V1(d) => d.call_query(&mut self.store),
            Exports::V2(d) => d.call_query(&mut self.store),
            Exports::V3(d, _) => d.call_query(&mut self.store),
        }
        .map(Ok);
        self.settle(r)
    }

    /// Reads the state as a unit of work of its own (one call's budget) that gives its thread
    /// back as `preemption` says: on the actor pool stopped once seen slow
    /// ([`Preemption::Move`]), to be read again on the slow lane, where it runs on a fiber
    /// ([`Preemption::Yield`]) if the plugin has run slow, as [`Instance::handle_preemptible`]
    /// does. A read that uses two epoch ticks marks its plugin slow, as an event does.
    pub async fn query_unit(&mut self, preemption: Preemption) -> Result<String, CallError> {
        self.read_unit(preemption, |exports| exports.query, Instance::query)
            .await
    }

    /// Serializes the state as a unit of work of its own, as [`Instance::query_unit`] reads it:
    /// a `snapshot` that spins is stopped on the pool once seen slow, or yields on the slow
    /// lane, instead of holding an actor thread for a whole call budget.
    pub async fn snapshot_unit(&mut self, preemption: Preemption) -> Result<Vec<u8>, CallError> {
        self.read_unit(preemption, |exports| exports.snapshot, Instance::snapshot)
            .await
    }

    /// A call that changes no state, taking no argument, as one unit of work of one call's
    /// budget: on a fiber through `export` if it may be preempted, else through `sync`.
    async fn read_unit<R>(
        &mut self,
        preemption: Preemption,
        export: fn(&V3Exports<Func>) -> Func,
        sync: fn(&mut Instance) -> Result<R, CallError>,
    ) -> Result<R, CallError>
    where
        R: wasmtime::component::ComponentType + wasmtime::component::Lift + Send + Sync + 'static,
    {
        let scope = self.begin_unit(self.call_timeout, preemption);
        let r = match &self.device {
            Exports::V3(_, direct) if self.may_preempt() => {
                let func = export(direct);
                let r = self.call_on_fiber::<(), (R,)>(func, ()).await;
                self.settle(r.map(|(out,)| Ok(out)))
            }
            _ => sync(self),
        };
        self.end_unit(scope);
        r
    }

    /// Runs `f` as one unit of work: every guest call inside shares one deadline, `budget`
    /// from now (see the type's docs). Its calls are not preemptible.
    pub fn within<T>(&mut self, budget: Duration, f: impl FnOnce(&mut Instance) -> T) -> T {
        self.within_as(budget, Preemption::None, f)
    }

    /// [`Instance::within`], stopped as `preemption` says: with [`Preemption::Move`], at its
    /// first look past two epoch ticks ([`CallError::Moved`], the plugin marked slow). The
    /// calls inside are synchronous: with [`Preemption::Yield`] they hold the thread as with
    /// [`Preemption::None`], though a look may still mark the plugin slow.
    pub fn within_as<T>(
        &mut self,
        budget: Duration,
        preemption: Preemption,
        f: impl FnOnce(&mut Instance) -> T,
    ) -> T {
        let scope = self.begin_unit(budget, preemption);
        let out = f(self);
        self.end_unit(scope);
        out
    }

    /// Starts a unit of work of `budget` (see [`Instance::within`]), which gives its thread
    /// back as `preemption` says. With [`Preemption::Yield`] its calls through the
    /// `*_preemptible` and `*_unit` methods ([`Instance::handle_preemptible`],
    /// [`Instance::restore_preemptible`], ...) run preemptible once the plugin has run slow
    /// (see [`CompiledPlugin::ran_slow`]; for a unit that builds a state,
    /// [`Instance::begin_setup_unit`]). End it with [`Instance::end_unit`].
    pub fn begin_unit(&mut self, budget: Duration, preemption: Preemption) -> UnitScope {
        let state = self.store.data_mut();
        let scope = UnitScope {
            outer: self.unit.replace(budget),
            outer_clock: state.clock,
            outer_preemption: state.preemption,
            outer_setup: state.setup,
        };
        state.preemption = preemption;
        state.setup = false;
        state.moved = false;
        if scope.outer.is_none() {
            self.renew_log_budget();
        }
        self.start_clock(budget, preemption);
        scope
    }

    /// [`Instance::begin_unit`] for a unit that builds a state rather than serving a live one:
    /// an activation's `restore`, `init` or chunk of replayed `apply`s, a deploy's fold,
    /// provisioning's trial `init`. It marks [`CompiledPlugin::setup_runs_slow`] rather than
    /// [`CompiledPlugin::ran_slow`], and its calls are preemptible on the slow lane if either
    /// mark is set.
    pub fn begin_setup_unit(&mut self, budget: Duration, preemption: Preemption) -> UnitScope {
        let scope = self.begin_unit(budget, preemption);
        self.store.data_mut().setup = true;
        scope
    }

    /// The CPU time the unit under way used so far, and the wall-clock time it ran (the turns
    /// it waited between slices not counted): what a rebuild whose units yield is charged
    /// (see `replay::Budget`), where the thread's clock also counts the units of others.
    pub fn unit_spent(&self) -> (Duration, Duration) {
        let clock = &self.store.data().clock;
        if clock.yielded {
            // Resumed and returned without a look at its deadline since: its last slice
            // began on a thread this may not be, and the turn it waited is not to be charged.
            // (Its run since the resumption is short: a look comes at once, at the next
            // loop head or call.)
            return (clock.cpu_before, clock.wall_before);
        }
        let now = Instant::now();
        (clock.used(cpu_clock::now(), now), clock.ran(now))
    }

    /// Lets the unit under way use `floor` of CPU time before it shows its plugin slow, if
    /// that is more than two epoch ticks: a chunk of a fold holds as many `apply`s as its
    /// history has transitions (up to 1,024 records' worth), and one whose healthy `apply`s
    /// add up to two ticks shows no slow plugin.
    pub fn expect_cpu(&mut self, floor: Duration) {
        self.store.data_mut().clock.slow_floor = floor;
    }

    /// Whether the last unit was stopped to run again elsewhere ([`CallError::Moved`]); the
    /// mark is cleared.
    pub fn take_moved(&mut self) -> bool {
        std::mem::take(&mut self.store.data_mut().moved)
    }

    /// Ends the unit [`Instance::begin_unit`] started.
    pub fn end_unit(&mut self, scope: UnitScope) {
        let state = self.store.data();
        if state.preemption == Preemption::Yield {
            state
                .slow_marks
                .unit_ended(state.setup, state.clock.seen_slow, &state.device);
        }
        self.unit = scope.outer;
        self.store.data_mut().preemption = scope.outer_preemption;
        self.store.data_mut().setup = scope.outer_setup;
        // The outer unit's deadline may now come early: looked at then, it goes on.
        self.store.data_mut().clock = scope.outer_clock;
    }

    /// Whether the plugin version has run slow (see [`CompiledPlugin::ran_slow`]).
    pub fn ran_slow(&self) -> bool {
        self.store.data().slow_marks.events_slow()
    }

    /// Whether a call may run preemptible: its unit asked ([`Preemption::Yield`]), the plugin
    /// has run slow at work of this unit's kind (a unit that builds a state: see
    /// [`CompiledPlugin::setup_runs_slow`]), and this store holds a fiber stack or one is to
    /// be had within [`MAX_FIBER_STACKS`]. Fast plugins' calls stay synchronous: a fiber
    /// costs a switch each way (~130 ns a call) and a stack per store.
    fn may_preempt(&self) -> bool {
        let state = self.store.data();
        state.preemption == Preemption::Yield
            && if state.setup {
                state.slow_marks.setup_slow()
            } else {
                state.slow_marks.events_slow()
            }
            && matches!(self.device, Exports::V3(..))
            && (self.holds_stack || self.stacks.held() < MAX_FIBER_STACKS)
    }

    /// A budget starts: its clock, and the first time the deadline is looked at (see
    /// [`UnitClock::first_look_for`]).
    fn start_clock(&mut self, budget: Duration, preemption: Preemption) {
        self.store.data_mut().clock = UnitClock::start(budget, self.epoch_tick);
        self.store.data_mut().starved = None;
        self.store.set_epoch_deadline(UnitClock::first_look_for(
            budget,
            self.epoch_tick,
            preemption,
        ));
    }

    /// Bytes this instance's memory has grown past its initial size: its share of the
    /// engine's guest memory budget (see `engine/limits.rs`).
    pub fn grown_memory(&self) -> u64 {
        self.store.data().limits.taken()
    }

    /// Before each guest call: its unit's clock if it is a unit of its own; and a memory
    /// growth refused in an earlier call that returned is forgotten, so that only a failure
    /// of the call it happened in is blamed on it.
    fn arm(&mut self) {
        let _ = self.store.data_mut().limits.take_refusal();
        // A preemptible call dropped before it returned left this set.
        self.store.data_mut().on_fiber = false;
        if self.unit.is_none() {
            self.renew_log_budget();
            self.start_clock(self.call_timeout, Preemption::None);
        }
    }

    /// A new unit of work: its log budget is whole again, and what an earlier unit last
    /// said on error is not quoted by a trap of this one.
    fn renew_log_budget(&mut self) {
        let state = self.store.data_mut();
        state.log_budget.renew(&state.device);
        state.last_error = None;
    }

    fn settle<T>(
        &mut self,
        r: wasmtime::Result<Result<T, bindings::drover::device::types::DeviceError>>,
    ) -> Result<T, CallError> {
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(CallError::Rejected {
                code: e.code,
                message: e.message,
            }),
            Err(e) => Err(self.fault(e)),
        }
    }

    /// What a call that did not return means: a timeout, or a trap told briefly.
    fn fault(&mut self, e: wasmtime::Error) -> CallError {
        if matches!(
            e.downcast_ref::<wasmtime::Trap>(),
            Some(wasmtime::Trap::Interrupt)
        ) {
            let budget = self.unit.unwrap_or(self.call_timeout);
            if self.store.data().moved {
                return CallError::Moved;
            }
            return match self.store.data_mut().starved.take() {
                Some(used) => CallError::Starved { budget, used },
                None => CallError::Timeout(budget),
            };
        }
        if let Some(refused) = self.store.data_mut().limits.take_refusal() {
            // Whatever the guest did next (a Rust guest aborts), the budget was the cause.
            tracing::warn!(device = %self.store.data().device, error = %e, "guest failed after the guest memory budget refused a growth");
            return CallError::GuestMemory(refused);
        }
        let mut msg = match e.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::MemoryOutOfBounds) if looks_like_recursion(&e) => format!(
                "{}: the guest's stack overflowed, it seems (one function repeats down \
                 the backtrace); plugins built with the SDK's `plugin-build.rs` have \
                 {} KiB of stack, others Rust's 1 MiB",
                wasmtime::Trap::MemoryOutOfBounds,
                GUEST_STACK_KIB
            ),
            Some(trap) => trap.to_string(),
            None => {
                let raw = format!("{e:#}");
                if raw.contains("unknown import") {
                    format!(
                        "{raw}: guests have no input, environment or exit (print, or \
                         log through the host's `log`, instead)"
                    )
                } else {
                    raw
                }
            }
        };
        // Clients get the short story: the guest's own last words (a Rust guest's
        // panic message and location) and the kind of trap. The full error, with the
        // guest's backtrace, goes to the server log.
        let state = self.store.data_mut();
        tracing::warn!(device = %state.device, error = ?e, "guest trapped");
        if let Some(logged) = state.last_error.take() {
            msg = if msg.contains("unknown import") {
                // An abort (Rust's out-of-memory path) that tripped over an import on
                // its way out: the guest's last words are the story, not the import.
                format!("{logged} (the guest aborted)")
            } else {
                format!("{logged} ({msg})")
            };
            if logged.starts_with("memory allocation of") {
                msg.push_str(
                    "; each instance's memory is capped by the server \
                     (`--max-guest-memory`)",
                );
            }
        }
        CallError::Trap(msg)
    }
}

/// The guest stack `guest-sdk/plugin-build.rs` links, for the message of a likely overflow
/// (a unit test checks the two agree).
const GUEST_STACK_KIB: u32 = 62;

/// Whether a trap's backtrace reads as runaway recursion: some function makes up at least 8
/// of its frames. A Rust guest's stack is first in its memory, so running off it is an
/// out-of-bounds access like any other, which on its own tells a plugin author nothing;
/// wasmtime keeps the innermost 20 frames, and a plain bad access is rarely that deep in one
/// function (mutual recursion of up to two functions still shows).
fn looks_like_recursion(e: &wasmtime::Error) -> bool {
    let Some(trace) = e.downcast_ref::<wasmtime::WasmBacktrace>() else {
        return false;
    };
    let mut counts = std::collections::HashMap::<u32, usize>::new();
    for frame in trace.frames() {
        *counts.entry(frame.func_index()).or_default() += 1;
    }
    counts.values().any(|&n| n >= 8)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{FORGIVE_AFTER, Preemption, SlowMarks, UnitClock, Verdict, ticks_due};
    use std::sync::atomic::Ordering;

    /// The stack the overflow message names is the one the SDK's build script links.
    #[test]
    fn the_stack_named_in_messages_is_the_one_the_sdk_links() {
        let script = include_str!("../../guest-sdk/plugin-build.rs");
        let line = format!(
            "const STACK_BYTES: u32 = {} * 1024;",
            super::GUEST_STACK_KIB
        );
        assert!(script.contains(&line), "plugin-build.rs lacks `{line}`");
    }

    /// Each mark is cleared by `FORGIVE_AFTER` fast units of its own kind in a row on the
    /// slow lane, counted only while it is set: fast setup units there while only the events
    /// mark was set do not forgive a setup mark set later, and a slow unit starts the count
    /// afresh.
    #[test]
    fn each_mark_is_forgiven_by_fast_units_of_its_kind_while_it_is_set() {
        let marks = SlowMarks::default();
        let setup_set = |m: &SlowMarks| m.setup.slow.load(Ordering::Relaxed);
        assert!(marks.of(false).set());
        assert_eq!(marks.both(), (true, true), "setup work follows slow events");
        for _ in 0..FORGIVE_AFTER / 2 {
            marks.unit_ended(true, false, "d");
        }
        assert!(marks.of(true).set(), "it was clear");
        assert!(!marks.of(true).set(), "set already");
        for _ in 1..FORGIVE_AFTER {
            marks.unit_ended(true, false, "d");
        }
        assert!(setup_set(&marks), "forgiven by units run before it was set");
        marks.unit_ended(true, false, "d");
        assert!(!setup_set(&marks));
        assert_eq!(marks.both(), (true, true), "the events' mark stands");

        for _ in 1..FORGIVE_AFTER {
            marks.unit_ended(false, false, "d");
        }
        marks.unit_ended(false, true, "d");
        for _ in 1..FORGIVE_AFTER {
            marks.unit_ended(false, false, "d");
        }
        assert_eq!(marks.both(), (true, true), "a slow unit restarts the count");
        marks.unit_ended(false, false, "d");
        assert_eq!(marks.both(), (false, false));
    }

    /// A ticker that wakes late (its thread starved of a core) catches up to the wall clock
    /// at once, so deadlines counted in ticks keep to wall-clock time.
    #[test]
    fn the_epoch_follows_the_wall_clock_through_late_wake_ups() {
        let tick = Duration::from_millis(10);
        assert_eq!(ticks_due(Duration::from_millis(9), tick), 0);
        assert_eq!(ticks_due(Duration::from_millis(10), tick), 1);
        // Woken 20 s late: 2,000 ticks due, not one.
        assert_eq!(ticks_due(Duration::from_millis(20_015), tick), 2_001);
    }

    /// A unit resumed on another thread, whose CPU clock reads less than the unit had used
    /// (a younger thread), is charged what it used before plus its new slice; and the turn it
    /// waited between slices is not counted as running time.
    #[test]
    fn a_unit_is_charged_its_slices_wherever_they_ran() {
        let ms = Duration::from_millis;
        let mut unit = UnitClock::start(ms(250), ms(10));
        // Began on a thread whose clock read 500 ms; used 100 ms there, ran 120 ms.
        unit.cpu_start = ms(500);
        let began = unit.wall_start;
        assert_eq!(unit.used(ms(600), began + ms(120)), ms(100));
        unit.suspend(ms(100), ms(90), ms(120));
        // Resumed 300 ms later on a thread whose clock reads 10 ms.
        let resumed = began + ms(420);
        unit.resume(ms(10), resumed);
        assert_eq!(unit.used(ms(15), resumed + ms(5)), ms(105));
        assert_eq!(unit.ran(resumed + ms(5)), ms(125));
    }

    /// A start point sampled long before the unit began (a ticker that woke late) does not
    /// charge the unit for the CPU time the thread used before it: a slice is charged at most
    /// its wall-clock time.
    #[test]
    fn a_stale_sample_charges_no_more_than_the_slice_lasted() {
        let ms = Duration::from_millis;
        let mut unit = UnitClock::start(ms(250), ms(10));
        // The sample is 80 ms of other work old; the unit has run 3 ms.
        unit.cpu_start = ms(1000);
        assert_eq!(unit.used(ms(1083), unit.wall_start + ms(3)), ms(3));
        // Below the slow mark, which is two ticks, or half a short budget.
        assert_eq!(unit.slow_after(), ms(20));
        assert_eq!(
            UnitClock::start(ms(15), ms(10)).slow_after(),
            ms(7) + ms(1) / 2
        );
    }

    /// A unit that may be moved off the pool is first looked at within a tick, so that what
    /// it surely used is counted from early on; others within two.
    #[test]
    fn a_unit_that_may_move_is_looked_at_within_a_tick() {
        let ms = Duration::from_millis;
        let first = |p| UnitClock::first_look_for(ms(250), ms(10), p);
        assert_eq!(first(Preemption::Move), 1);
        assert_eq!(first(Preemption::Yield), 2);
        assert_eq!(first(Preemption::None), 2);
    }

    /// Through [`UnitClock::look`], as the deadline callback decides: on the actor pool, a
    /// unit held up by the kernel with a stale start sample goes on and marks nothing; one
    /// that spins is moved and marks its plugin at its next look; one that runs out of a
    /// short budget at its first look times out and marks its plugin.
    #[test]
    fn a_look_moves_a_spinning_unit_but_not_one_held_up_by_the_kernel() {
        let ms = Duration::from_millis;
        let mut unit = UnitClock::start(ms(250), ms(10));
        unit.cpu_start = ms(1000);
        let began = unit.wall_start;
        let first = unit.look(ms(1030), began + ms(25), Preemption::Move, false);
        assert_eq!(first, (Verdict::Continue(1), None));
        let next = unit.look(ms(1040), began + ms(35), Preemption::Move, false);
        assert_eq!(next, (Verdict::Move, Some((ms(35), ms(10)))));
        // A unit that may not be preempted (a dry-run's): never marks, never moves.
        let mut fold = UnitClock::start(ms(250), ms(10));
        fold.cpu_start = ms(1000);
        fold.look(ms(1030), began + ms(25), Preemption::None, false);
        let (verdict, slow) = fold.look(ms(1040), began + ms(35), Preemption::None, false);
        assert!(matches!(verdict, Verdict::Continue(_)) && slow.is_none());
        // A 15 ms budget runs out at the first look.
        let mut short = UnitClock::start(ms(15), ms(10));
        short.cpu_start = ms(1000);
        let out = short.look(ms(1016), short.wall_start + ms(16), Preemption::Move, false);
        assert_eq!(out, (Verdict::Timeout, Some((ms(16), ms(0)))));
        // On a fiber the unit yields, and the look after its resumption goes on.
        let mut fiber = UnitClock::start(ms(250), ms(10));
        fiber.cpu_start = ms(1000);
        let yielded = fiber.look(ms(1012), fiber.wall_start + ms(12), Preemption::Yield, true);
        assert_eq!(yielded.0, Verdict::Yield);
        let resumed = fiber.look(ms(3), fiber.wall_start + ms(40), Preemption::Yield, true);
        assert_eq!(resumed, (Verdict::Continue(1), None));
        // A chunk of a fold allowed 30 ms goes on past two ticks, and moves past its floor.
        let mut chunk = UnitClock::start(ms(250), ms(10));
        chunk.slow_floor = ms(30);
        chunk.cpu_start = ms(1000);
        let at = chunk.wall_start;
        chunk.look(ms(1010), at + ms(10), Preemption::Move, false);
        let two_ticks = chunk.look(ms(1025), at + ms(25), Preemption::Move, false);
        assert_eq!(two_ticks, (Verdict::Continue(1), None));
        let past = chunk.look(ms(1035), at + ms(35), Preemption::Move, false);
        assert_eq!(past, (Verdict::Move, Some((ms(35), ms(25)))));
        // No budget left (a rebuild past its wall-clock bound): a timeout that marks nothing.
        let mut none_left = UnitClock::start(Duration::ZERO, ms(10));
        none_left.cpu_start = ms(1000);
        let out = none_left.look(
            ms(1030),
            none_left.wall_start + ms(30),
            Preemption::Move,
            false,
        );
        assert_eq!(out, (Verdict::Timeout, None));
    }

    /// A unit whose thread was preempted for long in the middle of a short call, its start
    /// point a sample from well before it began, is charged two ticks by its estimate; it is
    /// not seen slow, since the clock readings from its first look on show it used nothing
    /// more. A unit that spins is seen slow at its next look.
    #[test]
    fn a_unit_held_up_by_the_kernel_is_not_seen_slow() {
        let ms = Duration::from_millis;
        let mut unit = UnitClock::start(ms(250), ms(10));
        // Sampled 30 ms of other work ago; its thread was then preempted for 25 ms.
        unit.cpu_start = ms(1000);
        let first_look = unit.wall_start + ms(25);
        let used = unit.used(ms(1030), first_look);
        assert_eq!(used, ms(25));
        let surely = unit.surely_used(ms(1030));
        assert_eq!(surely, Duration::ZERO);
        assert!(!unit.shows_slow(used, surely));
        // A spinning unit, a tick later: 10 ms more, surely.
        let (cpu, next_look) = (ms(1040), first_look + ms(10));
        let (used, surely) = (unit.used(cpu, next_look), unit.surely_used(cpu));
        assert_eq!((used, surely), (ms(35), ms(10)));
        assert!(unit.shows_slow(used, surely));
        // What a slice surely used is kept across a yield; the next slice counts from its
        // resumption.
        unit.suspend(used, surely, unit.ran(next_look));
        unit.resume(ms(7), next_look + ms(100));
        assert_eq!(unit.surely_used(ms(9)), ms(12));
    }
}
