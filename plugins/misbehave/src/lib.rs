//! A deliberately misbehaving device, **for tests only**.
//!
//! The host's containment tests (invariant 5: a misbehaving plugin harms only its own
//! devices) need a guest that traps, spins, hoards memory or floods output on demand. Each
//! event asks for one misbehavior; well-behaved events are there to check that the device (and
//! the rest of the fleet) still works afterwards. Never deploy it outside tests.
//!
//! # Versions for the deploy tests
//!
//! Built with feature `v2`, `ok` counts by two (a behavior change: recorded histories still
//! fold, decisions differ). Built with `v3`, `apply` refuses (traps on) a count over 4, so a
//! device that counted past 4 cannot be brought up on it; with `v4`, `apply` spins for ever on
//! such a count instead (a fold that only its time budget stops). With `hashmap`, it uses a std
//! `HashMap` (whose default hasher imports `wasi:random/insecure-seed`): the upload tests'
//! example of a refused import. Only the host's deploy tests build
//! these; the default build is neither.
//!
//! # Config
//!
//! Any JSON object (or none). `{"fail_init": true}` makes `init` fail with code `rejected`;
//! `{"loop_init": true}` makes it spin forever; `{"init_spin": S}` makes it spin `S` loop
//! iterations (the `slow_apply` loop) and then succeed: a plugin whose state is costly to
//! build and whose events are cheap.
//!
//! # Events and what they do
//!
//! | event | outcome |
//! | --- | --- |
//! | `{"type": "ok"}` | one transition `{"type": "counted", "count": N}` (N = count after it) |
//! | `{"type": "reject"}` | error, code `rejected` |
//! | `{"type": "panic"}` | `panic!` (a trap in Wasm) |
//! | `{"type": "loop"}` | spins forever (stopped only by fuel or an epoch deadline) |
//! | `{"type": "alloc", "mb": N}` | allocates and touches N MiB, keeps it for the instance's lifetime, then returns `{"type": "allocated", "mb": N}`; beyond the store's memory limit this traps |
//! | `{"type": "big", "kb": N}` | one transition `{"type": "big", "payload": "xxx..."}` whose payload is N KiB |
//! | `{"type": "log", "message": "...", "level": "warn"}` | logs through the host (level defaults to `info`), no transition |
//! | `{"type": "print", "message": "..."}` | `println!` the message and `eprintln!` it with `stderr: ` before it (std's WASI stdio), no transition |
//! | `{"type": "echo"}` | one transition `{"type": "echoed", "device_id": .., "seq": .., "at_ms": .., "seed": ..}` copying the event context |
//! | `{"type": "panic_on_apply"}` | one transition `{"type": "poison"}` whose `apply` panics: handle succeeds, apply (and every replay) traps |
//! | `{"type": "refuse_on_apply"}` | transitions `{"type": "counted", "count": N}` then `{"type": "unreadable"}`, which `apply` refuses (`invalid-transition`) after applying the first |
//! | `{"type": "slow_apply", "spin": S, "count": K}` | `K` transitions `{"type": "slow", "spin": S}` whose `apply` each spins `S` loop iterations (guests have no clock: calibrate against the host's time) |
//! | `{"type": "loop_on_read"}` | one transition `{"type": "loops_on_read"}`: from then on every read of the state (`query`) spins forever |
//! | `{"type": "loop_on_snapshot"}` | one transition `{"type": "loops_on_snapshot"}`: from then on every `snapshot` spins forever |
//! | `{"type": "command", "count": K, "kb": N}` | `K` commands (default 1) `{"type": "ping"}` to its outbox, each with a `"payload"` of `N` KiB if `kb` is given, no transition |
//! | `{"type": "recurse", "depth": N}` | recurses N calls deep, each keeping 1 KiB on the guest's stack (its linear memory), no transition; past the stack (62 KiB, set by the SDK's `plugin-build.rs`) it traps |
//! | `{"type": "nested", "value": V}` | parses V (any JSON, nested as deep as serde_json allows) into a `serde_json::Value`, no transition |
//! | `{"type": "loop_on_restore"}` | one transition `{"type": "loops_on_restore"}`: from then on `restore` spins forever on a snapshot taken after it (replays from `init` still fold) |
//! | `{"type": "v2_cannot_restore"}` | one transition `{"type": "unrestorable_by_v2"}`: from then on the `v2` build's `restore` panics on a snapshot of the state (the default build's restores it) |
//! | `{"type": "fragile_after_restore"}` | one transition `{"type": "fragile"}` whose `apply` panics on a state restored from a snapshot and folds on one built from `init`: a state that, restored whole, needs more than the one built event by event (the snapshot's bytes and the state side by side in guest memory) |
//! | `{"type": "desire", "set": {...}}` | the device twin (`drover_guest::twin`): the operator desires properties; transitions `{"type": "twin", "change": {...}}`, and the delta as a command |
//! | `{"type": "report", "set": {...}, "reported_wins": false}` | the device reports properties (a local change is put back, or with `reported_wins` adopted) |
//! | `{"type": "reconnected"}` | the whole delta sent again as a command, no transition |
//! | `{"type": "accrue", "by": N}` | one transition `{"type": "accrued", "by": N}`, whose `apply` adds `N × 0.1` to the state's `accrued`: a float the state computes rather than reads, whose digits run long (0.1 + 0.2 is 0.30000000000000004) |
//!
//! # State
//!
//! `{"count": N, "applied": M}`: `ok` events counted, and transitions applied of any kind;
//! `"twin"` once the twin events were used;
//! `"loops_on_read": true` too once a `loop_on_read` event is applied (never read back: the
//! read spins), `"loops_on_snapshot": true` once a `loop_on_snapshot` one is, and
//! `"loops_on_restore": true` once a `loop_on_restore` one is, `"unrestorable_by_v2": true`
//! once a `v2_cannot_restore` one is; `"accrued"` once an `accrue` event is.
#![warn(missing_docs)]

use std::cell::RefCell;

use drover_guest::log::{self, Level};
use drover_guest::serde_json::{Map, Value};
use drover_guest::twin::{LocalChange, Twin, TwinChange};
use drover_guest::{Context, Device, Error};
use serde::{Deserialize, Serialize};

/// Error code of `reject` events and of `init` with `fail_init`.
pub const REJECTED: &str = "rejected";

std::thread_local! {
    /// Memory grabbed by `alloc` events: outside the state, so snapshots stay small.
    static BALLAST: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// The state (its snapshot and queried JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Misbehave {
    /// `ok` events applied.
    pub count: u64,
    /// Transitions applied, of any kind.
    pub applied: u64,
    /// Reads spin forever (a `loop_on_read` event was applied).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub loops_on_read: bool,
    /// Snapshots spin forever (a `loop_on_snapshot` event was applied).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub loops_on_snapshot: bool,
    /// Restoring a snapshot of this state spins forever (a `loop_on_restore` event was
    /// applied).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub loops_on_restore: bool,
    /// The `v2` build's `restore` panics on a snapshot of this state (a
    /// `v2_cannot_restore` event was applied).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unrestorable_by_v2: bool,
    /// This instance's state came from `restore` (not kept in snapshots or reads).
    #[serde(skip)]
    pub restored: bool,
    /// The device twin, once `desire` or `report` events are used (the config's
    /// `twin_ttl_ms` sets its commands' time to live).
    #[serde(default, skip_serializing_if = "twin_unused")]
    pub twin: Twin,
    /// The sum of `accrue` events' `by × 0.1`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub accrued: f64,
}

/// The state leaves `accrued` out until it is used.
fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// The state leaves the twin out until it is used.
fn twin_unused(twin: &Twin) -> bool {
    *twin == Twin::default()
}

/// Provisioning configuration.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Config {
    /// Make `init` fail.
    #[serde(default)]
    pub fail_init: bool,
    /// Make `init` spin forever.
    #[serde(default)]
    pub loop_init: bool,
    /// Loop iterations `init` spins before it succeeds.
    #[serde(default)]
    pub init_spin: u64,
    /// The time to live of the twin's commands, ms.
    #[serde(default)]
    pub twin_ttl_ms: Option<u64>,
}

/// An incoming event; see the crate docs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// Behave.
    Ok,
    /// Refuse with code `rejected`.
    Reject,
    /// Panic (trap).
    Panic,
    /// Spin forever.
    Loop,
    /// Allocate and keep `mb` MiB.
    Alloc {
        /// MiB to allocate.
        mb: u32,
    },
    /// Return a transition of `kb` KiB.
    Big {
        /// KiB of payload.
        kb: u32,
    },
    /// Print a line on stdout and on stderr, as a plugin author debugging would.
    Print {
        /// The line.
        message: String,
    },
    /// Log a line through the host.
    Log {
        /// The line.
        message: String,
        /// `trace`, `debug`, `info` (default), `warn` or `error`.
        #[serde(default)]
        level: LogLevel,
    },
    /// Return the event context as a transition.
    Echo,
    /// Add `by × 0.1` to the state's `accrued`.
    Accrue {
        /// Tenths to add.
        by: u64,
    },
    /// Return a transition whose `apply` panics.
    PanicOnApply,
    /// Return `counted` (the next count) then a transition `apply` cannot read: the state is
    /// half-changed when `apply` refuses the second.
    RefuseOnApply,
    /// Return a transition after which every read spins forever.
    LoopOnRead,
    /// Return a transition after which every snapshot spins forever.
    LoopOnSnapshot,
    /// Return a transition after which restoring a snapshot spins forever.
    LoopOnRestore,
    /// Return a transition after which the `v2` build's `restore` panics.
    V2CannotRestore,
    /// Return a transition whose `apply` panics on a restored state.
    FragileAfterRestore,
    /// Issue `count` commands (default 1), each `{"type": "ping"}`, or with `kb` a
    /// `"payload"` of that many KiB too.
    Command {
        /// Commands to issue.
        #[serde(default)]
        count: Option<u32>,
        /// KiB of payload in each.
        #[serde(default)]
        kb: Option<u32>,
    },
    /// Recurse `depth` calls deep with 1 KiB of guest stack each.
    Recurse {
        /// Calls.
        depth: u32,
    },
    /// Parse any JSON into a `serde_json::Value`: deep nesting through the SDK's parser.
    Nested {
        /// The JSON.
        value: drover_guest::serde_json::Value,
    },
    /// Return `count` transitions whose `apply` each spins `spin` iterations.
    SlowApply {
        /// Loop iterations per apply.
        spin: u64,
        /// Transitions.
        count: u32,
    },
    /// Send `event` (any of these events) to device `to`, and record `tag`: a relay, for
    /// chains of messages.
    Send {
        /// The target.
        to: String,
        /// The event it gets.
        event: drover_guest::serde_json::Value,
        /// Recorded in the transition, to follow an event along the chain.
        #[serde(default)]
        tag: u64,
    },
    /// Set timer `key` to deliver `event` (any of these events) after `after_ms`, or at
    /// `at_ms`: a timer whose firing misbehaves, or many due at once.
    Arm {
        /// The timer's key.
        key: String,
        /// Delay, ms.
        #[serde(default)]
        after_ms: u64,
        /// Due time, ms since the Unix epoch (instead of `after_ms`).
        #[serde(default)]
        at_ms: Option<u64>,
        /// Period, ms: a periodic timer (any period, the host's floor included).
        #[serde(default)]
        every_ms: Option<u64>,
        /// The event the firing delivers.
        event: drover_guest::serde_json::Value,
    },
    /// The operator desires twin properties `set`.
    Desire {
        /// The properties.
        set: Map<String, Value>,
    },
    /// The device reports twin properties `set`; with `reported_wins`, a local change of a
    /// desired property is adopted instead of put back.
    Report {
        /// The properties.
        set: Map<String, Value>,
        /// The local-change policy is `ReportedWins`.
        #[serde(default)]
        reported_wins: bool,
    },
    /// The device came back: the whole twin delta again.
    Reconnected,
}

/// Log level of a `log` event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    /// `trace`
    Trace,
    /// `debug`
    Debug,
    /// `info`
    #[default]
    Info,
    /// `warn`
    Warn,
    /// `error`
    Error,
}

/// A state change; see the crate docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Transition {
    /// An `ok` event; `count` is the count after it.
    Counted {
        /// The new count.
        count: u64,
    },
    /// `mb` MiB were allocated.
    Allocated {
        /// MiB allocated.
        mb: u32,
    },
    /// A large transition.
    Big {
        /// `kb` KiB of `x`.
        payload: String,
    },
    /// A copy of the event context.
    Echoed {
        /// The context's device id.
        device_id: String,
        /// The context's sequence number.
        seq: u64,
        /// The context's time.
        at_ms: u64,
        /// The context's seed.
        seed: u64,
    },
    /// Panics when applied.
    Poison,
    /// Written by `handle`, refused by `apply` (a schema mismatch, as a plugin bug makes
    /// one): never deserialized.
    #[serde(skip_deserializing)]
    Unreadable,
    /// A `send` event relayed its event.
    Relayed {
        /// The event's tag.
        tag: u64,
    },
    /// A change of the device twin.
    Twin {
        /// The change.
        change: TwinChange,
    },
    /// Spins `spin` iterations when applied.
    Slow {
        /// Loop iterations.
        spin: u64,
    },
    /// Every read from then on spins forever.
    LoopsOnRead,
    /// Every snapshot from then on spins forever.
    LoopsOnSnapshot,
    /// Restoring a snapshot from then on spins forever.
    LoopsOnRestore,
    /// The `v2` build's `restore` panics from then on.
    UnrestorableByV2,
    /// Panics when applied to a state restored from a snapshot.
    Fragile,
    /// `by × 0.1` added to `accrued`.
    Accrued {
        /// Tenths added.
        by: u64,
    },
}

/// How much `ok` adds to the count: see "Versions for the deploy tests".
const STEP: u64 = if cfg!(feature = "v2") { 2 } else { 1 };

impl Device for Misbehave {
    type Config = Config;
    type Event = Event;
    type Transition = Transition;

    fn init(_device_id: &str, config: Config) -> Result<Self, Error> {
        if config.fail_init {
            return Err(Error::new(REJECTED, "init failed on request (fail_init)"));
        }
        if config.loop_init {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        spin(config.init_spin);
        let mut state = Misbehave::default();
        state.twin.command_ttl_ms = config.twin_ttl_ms;
        Ok(state)
    }

    fn handle(&self, ctx: &Context, event: Event) -> Result<Vec<Transition>, Error> {
        Ok(match event {
            Event::Ok => {
                #[cfg(feature = "hashmap")]
                std::hint::black_box(std::collections::HashMap::<u8, u8>::new());
                vec![Transition::Counted {
                    count: self.count + STEP,
                }]
            }
            Event::Reject => return Err(Error::new(REJECTED, "rejected on request")),
            Event::Panic => panic!("misbehave: panic on request"),
            Event::Loop => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            Event::Alloc { mb } => {
                let bytes = usize::try_from(mb)
                    .ok()
                    .and_then(|mb| mb.checked_mul(1 << 20))
                    .unwrap_or_else(|| panic!("misbehave: {mb} MiB is not addressable"));
                // Non-zero fill so every page is really touched.
                let block = vec![0xA5u8; bytes];
                BALLAST.with_borrow_mut(|b| b.push(block));
                vec![Transition::Allocated { mb }]
            }
            Event::Big { kb } => vec![Transition::Big {
                payload: "x".repeat(kb as usize * 1024),
            }],
            Event::Print { message } => {
                println!("{message}");
                eprintln!("stderr: {message}");
                vec![]
            }
            Event::Log { message, level } => {
                let level = match level {
                    LogLevel::Trace => Level::Trace,
                    LogLevel::Debug => Level::Debug,
                    LogLevel::Info => Level::Info,
                    LogLevel::Warn => Level::Warn,
                    LogLevel::Error => Level::Error,
                };
                log::log(level, message);
                vec![]
            }
            Event::Command { count, kb } => {
                let command = match kb {
                    None => drover_guest::serde_json::json!({"type": "ping"}),
                    Some(kb) => drover_guest::serde_json::json!({
                        "type": "ping",
                        "payload": "x".repeat(kb as usize * 1024),
                    }),
                };
                for _ in 0..count.unwrap_or(1) {
                    ctx.command(&command);
                }
                vec![]
            }
            Event::Recurse { depth } => {
                std::hint::black_box(recurse(depth));
                vec![]
            }
            Event::Nested { value } => {
                std::hint::black_box(value);
                vec![]
            }
            Event::Accrue { by } => vec![Transition::Accrued { by }],
            Event::Echo => vec![Transition::Echoed {
                device_id: ctx.device_id().to_owned(),
                seq: ctx.seq(),
                at_ms: ctx.at_ms(),
                seed: ctx.seed(),
            }],
            Event::PanicOnApply => vec![Transition::Poison],
            Event::RefuseOnApply => vec![
                Transition::Counted {
                    count: self.count + STEP,
                },
                Transition::Unreadable,
            ],
            Event::SlowApply { spin, count } => {
                (0..count).map(|_| Transition::Slow { spin }).collect()
            }
            Event::LoopOnRead => vec![Transition::LoopsOnRead],
            Event::LoopOnSnapshot => vec![Transition::LoopsOnSnapshot],
            Event::LoopOnRestore => vec![Transition::LoopsOnRestore],
            Event::V2CannotRestore => vec![Transition::UnrestorableByV2],
            Event::FragileAfterRestore => vec![Transition::Fragile],
            Event::Send { to, event, tag } => {
                ctx.send(to, &event);
                vec![Transition::Relayed { tag }]
            }
            Event::Desire { set } => twin(self.twin.desire(ctx, set)),
            Event::Report { set, reported_wins } => {
                let policy = if reported_wins {
                    LocalChange::ReportedWins
                } else {
                    LocalChange::DesiredWins
                };
                twin(self.twin.report(ctx, set, policy))
            }
            Event::Reconnected => {
                self.twin.reconnected(ctx);
                Vec::new()
            }
            Event::Arm {
                key,
                after_ms,
                at_ms,
                every_ms,
                event,
            } => {
                // Version 2 arms 1 ms later: the same transitions, other effects (for the
                // dry-run, which must see that as a divergence).
                let later = u64::from(cfg!(feature = "v2"));
                let timer = match at_ms {
                    Some(at) => drover_guest::Timer::at_ms(at + later),
                    None => drover_guest::Timer::after_ms(after_ms + later),
                };
                let timer = match every_ms {
                    Some(period) => timer.every_ms(period),
                    None => timer,
                };
                ctx.set_timer(key, timer, &event);
                Vec::new()
            }
        })
    }

    fn apply(&mut self, transition: Transition) {
        self.applied += 1;
        match transition {
            Transition::Accrued { by } => self.accrued += by as f64 * 0.1,
            Transition::Counted { count } => {
                if cfg!(feature = "v3") && count > 4 {
                    panic!("misbehave v3: cannot fold a count over 4 (got {count})");
                }
                if cfg!(feature = "v4") && count > 4 {
                    let mut n: u64 = 0;
                    loop {
                        n = std::hint::black_box(n.wrapping_add(1));
                    }
                }
                self.count = count
            }
            Transition::Poison => panic!("misbehave: poison transition applied"),
            Transition::Unreadable => unreachable!("never deserialized"),
            Transition::Slow { spin: spins } => spin(spins),
            Transition::LoopsOnRead => self.loops_on_read = true,
            Transition::LoopsOnSnapshot => self.loops_on_snapshot = true,
            Transition::LoopsOnRestore => self.loops_on_restore = true,
            Transition::UnrestorableByV2 => self.unrestorable_by_v2 = true,
            Transition::Fragile if self.restored => {
                panic!("misbehave: a fragile transition applied to a restored state")
            }
            Transition::Fragile => {}
            Transition::Twin { change } => self.twin.apply(change),
            Transition::Allocated { .. }
            | Transition::Big { .. }
            | Transition::Echoed { .. }
            | Transition::Relayed { .. } => {}
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        if self.loops_on_snapshot {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        drover_guest::serde_json::to_vec(self).expect("the state serializes")
    }

    fn restore(snapshot: &[u8]) -> Result<Self, Error> {
        let state: Misbehave = drover_guest::serde_json::from_slice(snapshot).map_err(|e| {
            Error::new(
                drover_guest::codes::INVALID_SNAPSHOT,
                format!("not a state: {e}"),
            )
        })?;
        if cfg!(feature = "v2") && state.unrestorable_by_v2 {
            panic!("misbehave v2: cannot restore this snapshot");
        }
        if state.loops_on_restore {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Ok(Misbehave {
            restored: true,
            ..state
        })
    }

    fn query(&self) -> drover_guest::serde_json::Value {
        if self.loops_on_read {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        drover_guest::serde_json::to_value(self).expect("the state serializes")
    }
}

drover_guest::export_device!(Misbehave);

/// Spins `iterations` loop iterations (guests have no clock: tests calibrate the count).
fn spin(iterations: u64) {
    let mut x = 0u64;
    for i in 0..iterations {
        x = std::hint::black_box(x.wrapping_add(i));
    }
    std::hint::black_box(x);
}

/// Recurses `depth` calls deep, each frame holding 1 KiB in the guest's linear memory (the
/// buffer's address escapes, so it cannot live in wasm locals) and using it after the call
/// returns (so the recursion cannot become a loop).
#[inline(never)]
fn recurse(depth: u32) -> u64 {
    let mut frame = [0u8; 1024];
    frame[depth as usize % 1024] = depth as u8;
    let frame = std::hint::black_box(&mut frame);
    if depth == 0 {
        return 0;
    }
    recurse(depth - 1) + u64::from(frame[depth as usize % 1024])
}

/// Twin changes as transitions.
fn twin(changes: Vec<TwinChange>) -> Vec<Transition> {
    changes
        .into_iter()
        .map(|change| Transition::Twin { change })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_guest::Instance;

    fn ctx() -> Context {
        Context::new("m-1", 5, 1_000, 99)
    }

    fn ready() -> Instance<Misbehave> {
        let mut i = Instance::new();
        i.init("m-1", "").unwrap();
        i
    }

    #[test]
    fn ok_counts() {
        let mut i = ready();
        assert_eq!(
            i.handle_and_apply(&ctx(), r#"{"type":"ok"}"#).unwrap(),
            [r#"{"type":"counted","count":1}"#]
        );
        i.handle_and_apply(&ctx(), r#"{"type":"ok"}"#).unwrap();
        assert_eq!(i.query(), r#"{"applied":2,"count":2}"#);
    }

    #[test]
    fn reject_and_fail_init() {
        let i = ready();
        assert_eq!(
            i.handle(&ctx(), r#"{"type":"reject"}"#).unwrap_err().code,
            REJECTED
        );
        let err = Instance::<Misbehave>::new()
            .init("m-1", r#"{"fail_init":true}"#)
            .unwrap_err();
        assert_eq!(err.code, REJECTED);
    }

    #[test]
    #[should_panic(expected = "panic on request")]
    fn panic_panics() {
        let _ = ready().handle(&ctx(), r#"{"type":"panic"}"#);
    }

    #[test]
    #[should_panic(expected = "poison")]
    fn poison_panics_on_apply() {
        let mut i = ready();
        let out = i.handle(&ctx(), r#"{"type":"panic_on_apply"}"#).unwrap();
        assert_eq!(out, [r#"{"type":"poison"}"#]);
        let _ = i.apply(&out[0]);
    }

    #[test]
    fn refuse_on_apply_half_applies_then_refuses() {
        let mut i = ready();
        let out = i.handle(&ctx(), r#"{"type":"refuse_on_apply"}"#).unwrap();
        assert_eq!(
            out,
            [
                r#"{"type":"counted","count":1}"#,
                r#"{"type":"unreadable"}"#
            ]
        );
        i.apply(&out[0]).unwrap();
        assert_eq!(i.apply(&out[1]).unwrap_err().code, "invalid-transition");
        assert_eq!(i.query(), r#"{"applied":1,"count":1}"#);
    }

    #[test]
    fn alloc_keeps_memory() {
        let i = ready();
        i.handle(&ctx(), r#"{"type":"alloc","mb":2}"#).unwrap();
        let kept = BALLAST.with_borrow(|b| b.iter().map(Vec::len).sum::<usize>());
        assert_eq!(kept, 2 << 20);
    }

    #[test]
    fn big_transition_has_the_requested_size() {
        let out = ready().handle(&ctx(), r#"{"type":"big","kb":64}"#).unwrap();
        assert_eq!(out.len(), 1);
        assert!(out[0].len() > 64 * 1024 && out[0].len() < 64 * 1024 + 64);
    }

    #[test]
    fn echo_and_log() {
        let i = ready();
        assert_eq!(
            i.handle(&ctx(), r#"{"type":"echo"}"#).unwrap(),
            [r#"{"type":"echoed","device_id":"m-1","seq":5,"at_ms":1000,"seed":99}"#]
        );
        assert!(
            i.handle(&ctx(), r#"{"type":"log","message":"hi","level":"warn"}"#)
                .unwrap()
                .is_empty()
        );
    }
}
