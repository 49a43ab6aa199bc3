//! One device's live guest instance: the calls into it, in units of work under one time
//! budget (see `unit_clock`), by the contract version its plugin exports.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::Store;

use wasmtime::component::Func;

use super::bindings::drover::device::types::DeviceError;
use super::unit_clock::UnitClock;
use super::{
    BatchRefusal, CallError, EventContext, Exports, GuestState, Outcome, Preemption, V3Exports,
    bindings, bindings_v1, bindings_v2, cpu_clock, stacks,
};

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
    use crate::engine::bindings::drover::device::types as now;
    use crate::engine::bindings_v2::drover::device::types as v2;

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
    pub(super) store: Store<GuestState>,
    pub(super) device: Exports,
    pub(super) epoch_tick: Duration,
    pub(super) call_timeout: Duration,
    /// The budget of the unit of work under way, if any: calls inside it do not re-arm.
    pub(super) unit: Option<Duration>,
    /// The store holds a fiber stack (from its first preemptible call until it drops).
    pub(super) holds_stack: bool,
    pub(super) stacks: Arc<stacks::StackPool>,
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
        self.settle("init", r)
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
        self.settle("handle", r)
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
        self.settle("apply", r)
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
        self.settle("init", r.map(|(r,)| r))
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
        self.settle("restore", r.map(|(r,)| r))
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
        self.settle("handle", r.map(|(r,)| r))
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
        self.settle("apply", r.map(|(r,)| r))
            .map_err(|error| BatchError {
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
                error: self.fault("apply-batch", e),
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
        self.settle("snapshot", r)
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
        self.settle("restore", r)
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
        self.settle("query", r)
    }

    /// Reads the state as a unit of work of its own (one call's budget) that gives its thread
    /// back as `preemption` says: on the actor pool stopped once seen slow
    /// ([`Preemption::Move`]), to be read again on the slow lane, where it runs on a fiber
    /// ([`Preemption::Yield`]) if the plugin has run slow, as [`Instance::handle_preemptible`]
    /// does. A read that uses two epoch ticks marks its plugin slow, as an event does.
    pub async fn query_unit(&mut self, preemption: Preemption) -> Result<String, CallError> {
        self.read_unit(
            preemption,
            "query",
            |exports| exports.query,
            Instance::query,
        )
        .await
    }

    /// Serializes the state as a unit of work of its own, as [`Instance::query_unit`] reads it:
    /// a `snapshot` that spins is stopped on the pool once seen slow, or yields on the slow
    /// lane, instead of holding an actor thread for a whole call budget.
    pub async fn snapshot_unit(&mut self, preemption: Preemption) -> Result<Vec<u8>, CallError> {
        self.read_unit(
            preemption,
            "snapshot",
            |exports| exports.snapshot,
            Instance::snapshot,
        )
        .await
    }

    /// A call that changes no state, taking no argument, as one unit of work of one call's
    /// budget: on a fiber through `export` (WIT's `name`) if it may be preempted, else
    /// through `sync`.
    async fn read_unit<R>(
        &mut self,
        preemption: Preemption,
        name: &'static str,
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
                self.settle(name, r.map(|(out,)| Ok(out)))
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

    /// Makes this instance's guest log lines and traps go to the debug level. For an
    /// instance that runs again what another already ran and logged (a rebuild's second
    /// pass to find which transition of a batch trapped: one fault is one warning, not
    /// two), or that probes something whose failure is information, not a fault (whether a
    /// new version reads an old version's snapshot).
    pub fn quiet(&mut self) {
        self.store.data_mut().quiet = true;
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
        let _ = self.store.data_mut().limits.take_capped();
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
        export: &'static str,
        r: wasmtime::Result<Result<T, bindings::drover::device::types::DeviceError>>,
    ) -> Result<T, CallError> {
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(CallError::Rejected {
                code: e.code,
                message: e.message,
            }),
            Err(e) => Err(self.fault(export, e)),
        }
    }

    /// What a call of `export` that did not return means: a timeout, or a trap told briefly.
    fn fault(&mut self, export: &'static str, e: wasmtime::Error) -> CallError {
        if matches!(
            e.downcast_ref::<wasmtime::Trap>(),
            Some(wasmtime::Trap::Interrupt)
        ) {
            let budget = self.unit.unwrap_or(self.call_timeout);
            if self.store.data().moved {
                return CallError::Moved;
            }
            if self.store.data().stopped {
                return CallError::Stopped;
            }
            return match self.store.data_mut().starved.take() {
                Some(used) => CallError::Starved { budget, used },
                None => CallError::Timeout { budget, export },
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
                // The error's chain without wasmtime's backtrace (frames of a plugin built
                // without names read `<wasm function 665>`; ~20 lines in every message).
                // wasmtime attaches the backtrace as the outermost context.
                let backtrace = usize::from(e.downcast_ref::<wasmtime::WasmBacktrace>().is_some());
                let raw = e
                    .chain()
                    .skip(backtrace)
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(": ");
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
        // panic message and location) and the kind of trap, and so does the log, on one
        // line; the guest's backtrace goes to the log at debug level. (It went with every
        // trap: ~20 lines each, of frames a plugin built without names shows as
        // `<wasm function 665>`, which broke line-based log processing.)
        let state = self.store.data_mut();
        tracing::debug!(device = %state.device, error = ?e, "guest trapped: the backtrace");
        let capped = state.limits.take_capped();
        if let (Some(asked), None) = (capped, &state.last_error) {
            // Out of memory before it could say so (its stderr needs memory too): the cap
            // is the story, not how the guest died (a Rust guest's abort path reads
            // `RUST_BACKTRACE`, an import it has not).
            let how = if msg.contains("unknown import") {
                "it then aborted".to_string()
            } else {
                msg
            };
            msg = format!(
                "the guest ran out of memory: it asked to grow its memory to {asked} bytes, \
                 past each instance's cap set by the server (`--max-guest-memory`) ({how})"
            );
        }
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
        if state.quiet {
            tracing::debug!(device = %state.device, trap = %msg, "guest trapped (quiet: a rerun or a probe)");
        } else {
            tracing::warn!(device = %state.device, trap = %msg, "guest trapped");
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

    /// The stack the overflow message names is the one the SDK's build script links.
    #[test]
    fn the_stack_named_in_messages_is_the_one_the_sdk_links() {
        let script = include_str!("../../../guest-sdk/plugin-build.rs");
        let line = format!(
            "const STACK_BYTES: u32 = {} * 1024;",
            super::GUEST_STACK_KIB
        );
        assert!(script.contains(&line), "plugin-build.rs lacks `{line}`");
    }
}
