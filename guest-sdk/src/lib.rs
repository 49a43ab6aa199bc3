//! Write Drover device behaviors in plain Rust.
//!
//! A Drover plugin is a WebAssembly component exporting the `drover:device@0.3.0` world
//! (`wit/device.wit`). That contract speaks JSON strings and snapshot bytes so the host never
//! needs to know a plugin's schema. This crate lets a plugin author forget about it: you write
//! one serde-serializable struct that *is* the device's state, implement [`Device`] for it,
//! and call [`export_device!`] once. The SDK turns JSON into your types (and malformed JSON
//! into clear [`Error`]s), keeps the instance between calls, and snapshots/restores/queries
//! the state through serde.
//!
//! The same code compiles natively, where [`export_device!`] expands to a compile-time check
//! only, so `cargo test` of a plugin is ordinary Rust: call [`Device::handle`] and
//! [`Device::apply`] directly, or drive the device through the host's JSON boundary with
//! [`Instance`].
//!
//! # Example
//!
//! ```
//! use drover_guest::{Context, Device, Error};
//! use serde::{Deserialize, Serialize};
//!
//! /// The state: a counter with an upper bound.
//! #[derive(Serialize, Deserialize)]
//! pub struct Counter {
//!     count: u64,
//!     max: u64,
//! }
//!
//! #[derive(Deserialize)]
//! pub struct Config {
//!     max: u64,
//! }
//!
//! #[derive(Deserialize)]
//! #[serde(tag = "type", rename_all = "snake_case")]
//! pub enum Event {
//!     Add { n: u64 },
//! }
//!
//! #[derive(Serialize, Deserialize)]
//! #[serde(tag = "type", rename_all = "snake_case")]
//! pub enum Transition {
//!     Added { n: u64, at_ms: u64 },
//! }
//!
//! impl Device for Counter {
//!     type Config = Config;
//!     type Event = Event;
//!     type Transition = Transition;
//!
//!     fn init(_device_id: &str, config: Config) -> Result<Self, Error> {
//!         Ok(Counter { count: 0, max: config.max })
//!     }
//!
//!     fn handle(&self, ctx: &Context, event: Event) -> Result<Vec<Transition>, Error> {
//!         match event {
//!             Event::Add { n } if self.count + n > self.max => {
//!                 Err(Error::new("out-of-range", format!("{} would exceed {}", n, self.max)))
//!             }
//!             Event::Add { n } => Ok(vec![Transition::Added { n, at_ms: ctx.at_ms() }]),
//!         }
//!     }
//!
//!     fn apply(&mut self, transition: Transition) {
//!         match transition {
//!             Transition::Added { n, .. } => self.count += n,
//!         }
//!     }
//! }
//!
//! // Generates the component exports when built for wasm32; natively it only checks that
//! // `Counter` implements `Device`.
//! drover_guest::export_device!(Counter);
//!
//! // Native test, through the same JSON boundary the host uses:
//! let mut device = drover_guest::Instance::<Counter>::new();
//! device.init("c-1", r#"{"max": 10}"#).unwrap();
//! let ctx = Context::new("c-1", 1, 1_700_000_000_000, 42);
//! let transitions = device.handle_and_apply(&ctx, r#"{"type": "add", "n": 3}"#).unwrap();
//! assert_eq!(transitions, [r#"{"type":"added","n":3,"at_ms":1700000000000}"#]);
//! assert_eq!(device.query(), r#"{"count":3,"max":10}"#);
//! let err = device.handle(&ctx, r#"{"type": "add", "n": 8}"#).unwrap_err();
//! assert_eq!(err.code, "out-of-range");
//! let err = device.handle(&ctx, r#"{"type": "sub"}"#).unwrap_err();
//! assert_eq!(err.code, drover_guest::codes::INVALID_EVENT);
//! ```
//!
//! Build the component with `cargo build --release --target wasm32-wasip2` in a crate made by
//! `drover new` (its `Cargo.toml` has the release settings guests want and names this SDK's
//! `plugin-build.rs` as its build script, which links a 62 KiB guest stack instead of 1 MiB;
//! the crate needs `crate-type = ["cdylib", "rlib"]`), or `drover dev`, which builds and
//! uploads on every save.
//! In Drover's own workspace the plugins build with `--profile plugin -p <crate>`. The SDK
//! re-exports [`serde_json`] (as `drover_guest::serde_json`), so a guest that reads or writes
//! JSON itself, in a custom `restore` say, needs no dependency of its own on it.
//!
//! # Rules for deterministic guests
//!
//! Replay must rebuild the same state bit for bit, so:
//! - take time only from [`Context::at_ms`] and randomness only from [`Context::seed`]: never
//!   `std::time`, `std::fs`, `std::env` or a random source;
//! - prefer `BTreeMap` to `HashMap` in state, events and transitions: `HashMap`'s default hasher
//!   is seeded from the WASI random interface, which both makes iteration (and so serialized
//!   JSON) order vary and adds a `wasi:random` import the host will not satisfy;
//! - [`Device::handle`] only decides; every change of state goes through a transition and
//!   [`Device::apply`], which must accept any transition `handle` ever produced (including
//!   ones produced by older versions of the plugin, seen on replay);
//! - new state fields need `#[serde(default)]` so snapshots of older versions still restore.
//!
//! # Errors, panics and output
//!
//! Refuse an event by returning an [`Error`]; nothing of it is recorded. A panic is a bug: in a
//! component the SDK sends its message and location to the host's log (error level) and the
//! instance traps, after which the host discards it and rebuilds the device from its journal.
//! `println!` and `eprintln!` work: the host logs each line under the device (at info and warn
//! level), escaped and bounded like [`log`] lines. [`log`] picks the level. A trap's message
//! quotes the last error-level or stderr line. There is no input, environment or exit (they
//! trap).
#![warn(missing_docs)]

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use serde;
pub use serde_json;

/// Well-known [`Error::code`] values.
///
/// Codes are short machine-readable words the host passes through to API clients: a
/// refused event answers `{"error": {"code": "rejected", "message": ..., "plugin": {"code":
/// CODE, "message": ...}}}`, the plugin's code under `plugin` (the outer `code` is the
/// host's, so a client tells a refusal from the server's own errors). Clients branch on
/// them, so they are constants rather than strings retyped in every plugin. Plugins may add
/// their own codes.
pub mod codes {
    /// The event is not valid JSON, does not match the plugin's event type, or makes no sense
    /// for the device.
    pub const INVALID_EVENT: &str = "invalid-event";
    /// The configuration given at provisioning is malformed or inconsistent.
    pub const INVALID_CONFIG: &str = "invalid-config";
    /// A transition handed to `apply` does not parse as the plugin's transition type.
    pub const INVALID_TRANSITION: &str = "invalid-transition";
    /// A snapshot handed to `restore` is not one this plugin version can read.
    pub const INVALID_SNAPSHOT: &str = "invalid-snapshot";
    /// `handle` or `apply` was called before `init` or `restore` gave the instance a state.
    pub const NOT_INITIALIZED: &str = "not-initialized";
    /// A value is outside the range the device accepts.
    pub const OUT_OF_RANGE: &str = "out-of-range";
    /// The plugin failed in a way of its own (a plugin bug). The SDK itself panics instead
    /// when a state, transition or effect does not serialize, so the host sees a fault.
    pub const INTERNAL: &str = "internal";
}

/// A refusal or failure the device reports on purpose.
///
/// Mirrors the WIT `device-error` record. Returning an error from [`Device::handle`] means the
/// event is refused as a whole: no transition of it is applied or journaled, and the client
/// sees the code and message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Error {
    /// Short machine-readable word, such as `"out-of-range"`; see [`codes`].
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

impl Error {
    /// An error with any code; use it for plugin-specific codes like `"wrong-code"`.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Error {
            code: code.into(),
            message: message.into(),
        }
    }

    /// An event that parses but makes no sense for the device ([`codes::INVALID_EVENT`]).
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(codes::INVALID_EVENT, message)
    }

    /// A configuration that parses but is inconsistent ([`codes::INVALID_CONFIG`]).
    pub fn invalid_config(message: impl Into<String>) -> Self {
        Error::new(codes::INVALID_CONFIG, message)
    }

    /// A value outside the accepted range ([`codes::OUT_OF_RANGE`]).
    pub fn out_of_range(message: impl Into<String>) -> Self {
        Error::new(codes::OUT_OF_RANGE, message)
    }

    /// The instance has no state yet ([`codes::NOT_INITIALIZED`]).
    pub fn not_initialized() -> Self {
        Error::new(
            codes::NOT_INITIALIZED,
            "the device has no state yet: `init` or `restore` must succeed first",
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

/// What the host tells the device about the event being handled, and where the device asks
/// for effects.
///
/// Mirrors the WIT `event-context`. It is the guest's only window on the outside world: the
/// host records it in the journal so replay reproduces the same decisions. Build one with
/// [`Context::new`] in native tests.
///
/// # Effects
///
/// Besides transitions, [`Device::handle`] may ask for effects through the context:
/// [`command`](Context::command) the physical device, [`send`](Context::send) a message to
/// another device, [`set_timer`](Context::set_timer) / [`cancel_timer`](Context::cancel_timer).
/// The host records them in the same journal record as the transitions and carries them out
/// only once that record is durable; if `handle` returns an error, they are dropped with the
/// event. Replay never carries them out again. [`Context::effects`] lists what was asked, for
/// tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    device_id: String,
    seq: u64,
    at_ms: u64,
    seed: u64,
    origin: Origin,
    effects: std::cell::RefCell<Vec<Effect>>,
}

/// Why the event is being handled (WIT `origin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// From outside: HTTP, the CLI, a gateway.
    External,
    /// A message another device sent with [`Context::send`].
    Message {
        /// The sending device's id.
        sender: String,
        /// With `index`, the message's stable id (the seq of the sender's record holding it
        /// and its place among that record's effects): the same message delivered twice (after
        /// a crash) has the same id.
        seq: u64,
        /// See `seq`.
        index: u32,
    },
    /// One of this device's timers fired.
    Timer {
        /// The key it was set under.
        key: String,
        /// When it was due (ms since the Unix epoch); [`Context::at_ms`] is never earlier.
        due_ms: u64,
        /// For a periodic timer: whole periods missed (the host was down) and folded into this
        /// one firing. 0 for a one-shot timer.
        missed: u64,
    },
}

/// When a timer fires; see [`Context::set_timer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timer {
    due: Due,
    every_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    After(u64),
    At(u64),
}

impl Timer {
    /// Fires `delay_ms` milliseconds after the event being handled ([`Context::at_ms`]).
    pub fn after_ms(delay_ms: u64) -> Timer {
        Timer {
            due: Due::After(delay_ms),
            every_ms: None,
        }
    }

    /// Fires at `at_ms` (ms since the Unix epoch), or at once if that has passed.
    pub fn at_ms(at_ms: u64) -> Timer {
        Timer {
            due: Due::At(at_ms),
            every_ms: None,
        }
    }

    /// Fires again every `period_ms` milliseconds after the first time, until cancelled or
    /// replaced. After downtime a periodic timer fires once, with the count of periods it
    /// missed ([`Origin::Timer`]'s `missed`). The host refuses a period under 1,000 ms (the
    /// event then fails with `invalid-effect`): each firing is an event in the journal.
    pub fn every_ms(mut self, period_ms: u64) -> Timer {
        self.every_ms = Some(period_ms);
        self
    }
}

/// One effect asked for while handling an event, as the host receives it (payloads are JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A command for the physical device, queued in its outbox until acknowledged.
    Command {
        /// The command, JSON.
        payload: String,
        /// Dropped unacknowledged this long after the event, if set.
        ttl_ms: Option<u64>,
    },
    /// A one-way message to another device.
    Send {
        /// The target device's id.
        to: String,
        /// The event the target's `handle` gets, JSON.
        event: String,
    },
    /// Sets (or replaces) a timer.
    SetTimer {
        /// Its key: setting a key again replaces the timer.
        key: String,
        /// When it fires, ms since the Unix epoch.
        due_ms: u64,
        /// Its period, for a periodic timer.
        every_ms: Option<u64>,
        /// The event `handle` gets when it fires, JSON.
        event: String,
    },
    /// Cancels a timer.
    CancelTimer {
        /// The timer's key.
        key: String,
    },
}

impl Context {
    /// A context as the host would pass it for an external event; lets native tests choose
    /// time, sequence and seed.
    pub fn new(device_id: impl Into<String>, seq: u64, at_ms: u64, seed: u64) -> Self {
        Context {
            device_id: device_id.into(),
            seq,
            at_ms,
            seed,
            origin: Origin::External,
            effects: Default::default(),
        }
    }

    /// The same context for an event of another origin (a message or a timer firing).
    pub fn with_origin(mut self, origin: Origin) -> Self {
        self.origin = origin;
        self
    }

    /// The device this instance embodies.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// The sequence number the event's record gets if it commits.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The host's clock when the event was accepted, in milliseconds since the Unix epoch: the
    /// only time a deterministic guest may use.
    pub fn at_ms(&self) -> u64 {
        self.at_ms
    }

    /// A deterministic per-event seed (from device id and seq), the only randomness a guest
    /// may use.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Why this event is being handled: from outside, a message, or a timer.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// Queues `command` (any serializable value, sent as JSON) for the physical device. It
    /// waits in the device's outbox until a gateway acknowledges it.
    pub fn command(&self, command: &impl Serialize) {
        self.command_with_ttl(command, None);
    }

    /// [`Context::command`], dropped unacknowledged `ttl_ms` after this event if `Some`.
    pub fn command_with_ttl(&self, command: &impl Serialize, ttl_ms: Option<u64>) {
        let payload = self.json(command);
        self.push(Effect::Command { payload, ttl_ms });
    }

    /// Sends `event` (serialized as JSON; the target parses it as its own event type) to
    /// device `to`, one way. It arrives once this event's record is durable, after every
    /// earlier message this device sent it. A message to a device that does not exist is
    /// listed with this device's dead letters.
    pub fn send(&self, to: impl Into<String>, event: &impl Serialize) {
        let event = self.json(event);
        self.push(Effect::Send {
            to: to.into(),
            event,
        });
    }

    /// Sets timer `key`: when it fires, `handle` gets `event` (this device's own event type,
    /// as JSON) with origin [`Origin::Timer`]. Setting a key again replaces the timer; a
    /// replaced or cancelled timer never fires. Timers are durable: they survive restarts.
    pub fn set_timer(&self, key: impl Into<String>, when: Timer, event: &impl Serialize) {
        let event = self.json(event);
        let due_ms = match when.due {
            Due::After(delay) => self.at_ms.saturating_add(delay),
            Due::At(at) => at,
        };
        self.push(Effect::SetTimer {
            key: key.into(),
            due_ms,
            every_ms: when.every_ms,
            event,
        });
    }

    /// Cancels timer `key` (nothing happens if it is not set).
    pub fn cancel_timer(&self, key: impl Into<String>) {
        self.push(Effect::CancelTimer { key: key.into() });
    }

    /// The effects asked for so far while handling this event, in order.
    pub fn effects(&self) -> Vec<Effect> {
        self.effects.borrow().clone()
    }

    fn push(&self, effect: Effect) {
        self.effects.borrow_mut().push(effect);
    }

    /// An effect's payload as JSON. A payload that does not serialize (a map with non-string
    /// keys, say) is the plugin's bug, not the event's: it panics, a trap in Wasm, so the host
    /// keeps the event as a dead letter and counts the failure toward a quarantine, as for
    /// any fault (a refusal would be the plugin's answer, neither).
    fn json(&self, value: &impl Serialize) -> String {
        serde_json::to_string(value)
            .unwrap_or_else(|e| panic!("drover-guest: an effect's payload does not serialize: {e}"))
    }

    /// Takes the effects out (for the host boundary).
    fn take_effects(&self) -> Vec<Effect> {
        std::mem::take(&mut *self.effects.borrow_mut())
    }
}

/// What handling one event produced, through the JSON boundary: see [`Instance::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The transitions, JSON.
    pub transitions: Vec<String>,
    /// The effects, in the order they were asked for.
    pub effects: Vec<Effect>,
}

/// A device behavior. The implementing struct is the device's whole state.
///
/// The host calls [`init`](Device::init) once for a new device (and again when replaying
/// from the start), then for every event [`handle`](Device::handle) followed by
/// [`apply`](Device::apply) of each returned transition. On replay only `apply` runs, so all
/// state changes must live in `apply` and `handle` must only decide.
///
/// Snapshots are the struct's serde JSON; a queried state is [`query`](Device::query).
pub trait Device: Serialize + DeserializeOwned + Sized {
    /// The provisioning configuration, parsed from the device's JSON config. A missing config
    /// (empty or `null`) is read as `{}` when the type cannot be built from `null`, so a config
    /// struct whose fields all have defaults needs no config at all.
    type Config: DeserializeOwned;
    /// One incoming event, parsed from the JSON the client sent.
    type Event: DeserializeOwned;
    /// One state change, journaled as JSON and re-applied on replay.
    type Transition: Serialize + DeserializeOwned;

    /// Builds the initial state. Must be deterministic: it runs again on replay.
    fn init(device_id: &str, config: Self::Config) -> Result<Self, Error>;

    /// Decides what an event means: the transitions to apply, in order, or a refusal.
    fn handle(&self, ctx: &Context, event: Self::Event) -> Result<Vec<Self::Transition>, Error>;

    /// Applies one transition. Infallible on purpose: a transition is a recorded fact, and
    /// replay must be able to apply every one the plugin ever produced.
    fn apply(&mut self, transition: Self::Transition);

    /// The state as clients read it. Defaults to the state itself; override it to hide
    /// secrets or add derived values.
    ///
    /// # Panics
    ///
    /// The default panics (a trap in Wasm: the read fails with the message) if the state does
    /// not serialize: the WIT `query` function returns the state only, and an error dressed
    /// as a state would read as one.
    fn query(&self) -> serde_json::Value {
        serde_json::to_value(self)
            .unwrap_or_else(|e| panic!("drover-guest: the device state does not serialize: {e}"))
    }

    /// Serializes the state for a snapshot. Defaults to its JSON; override it only together
    /// with [`restore`](Device::restore).
    ///
    /// # Panics
    ///
    /// The default panics (a trap in Wasm) if the state does not serialize, since the WIT
    /// `snapshot` function has no way to report an error and an empty snapshot would lose state.
    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self)
            .unwrap_or_else(|e| panic!("drover-guest: the device state does not serialize: {e}"))
    }

    /// Rebuilds the state from a snapshot, possibly taken by an older plugin version. Defaults
    /// to parsing JSON. Override it to migrate old snapshot formats; returning an error makes
    /// the host rebuild the state by replaying the journal instead.
    fn restore(snapshot: &[u8]) -> Result<Self, Error> {
        serde_json::from_slice(snapshot).map_err(|e| {
            Error::new(
                codes::INVALID_SNAPSHOT,
                format!("the snapshot is not a valid state: {e}"),
            )
        })
    }
}

/// One device instance driven through the JSON boundary the host uses.
///
/// This is what [`export_device!`] wires to the WIT exports, and it is public so native tests
/// can check exactly what the host will see: JSON in, JSON out, and the errors malformed input
/// produces. Calls that need a state before `init`/`restore` succeeded return
/// [`codes::NOT_INITIALIZED`] instead of panicking.
#[derive(Debug)]
pub struct Instance<T> {
    state: Option<T>,
}

impl<T> Default for Instance<T> {
    fn default() -> Self {
        Instance::new()
    }
}

impl<T> Instance<T> {
    /// An instance without state, as right after the host instantiates the component.
    pub const fn new() -> Self {
        Instance { state: None }
    }

    /// The current state, if `init` or `restore` succeeded; for assertions in tests.
    pub fn state(&self) -> Option<&T> {
        self.state.as_ref()
    }
}

impl<T: Device> Instance<T> {
    /// WIT `init`: parses the config and replaces any state with a fresh one.
    pub fn init(&mut self, device_id: &str, config: &str) -> Result<(), Error> {
        let config = parse_config::<T::Config>(config)?;
        self.state = Some(T::init(device_id, config)?);
        Ok(())
    }

    /// WIT `handle`: parses the event and returns the transitions as JSON, without changing
    /// the state.
    pub fn handle(&self, ctx: &Context, event: &str) -> Result<Vec<String>, Error> {
        let state = self.state.as_ref().ok_or_else(Error::not_initialized)?;
        let event = serde_json::from_str::<T::Event>(event)
            .map_err(|e| Error::new(codes::INVALID_EVENT, format!("malformed event: {e}")))?;
        // A transition that does not serialize is the plugin's bug: a panic (a trap in Wasm),
        // kept as a dead letter and counted toward a quarantine like any fault.
        Ok(state
            .handle(ctx, event)?
            .iter()
            .map(|t| {
                serde_json::to_string(t).unwrap_or_else(|e| {
                    panic!("drover-guest: a transition does not serialize: {e}")
                })
            })
            .collect())
    }

    /// WIT `apply`: parses one transition and applies it.
    pub fn apply(&mut self, transition: &str) -> Result<(), Error> {
        let state = self.state.as_mut().ok_or_else(Error::not_initialized)?;
        let transition = serde_json::from_str::<T::Transition>(transition).map_err(|e| {
            Error::new(
                codes::INVALID_TRANSITION,
                format!("malformed transition: {e}"),
            )
        })?;
        state.apply(transition);
        Ok(())
    }

    /// WIT `apply-batch`: [`Instance::apply`] of each transition in order, stopping at the
    /// first refused one. On error, the index of that transition (those before it are
    /// applied) and why.
    pub fn apply_batch<S: AsRef<str>>(&mut self, transitions: &[S]) -> Result<(), (usize, Error)> {
        for (index, t) in transitions.iter().enumerate() {
            self.apply(t.as_ref()).map_err(|e| (index, e))?;
        }
        Ok(())
    }

    /// WIT `handle` whole: the transitions as JSON and the effects `handle` asked for
    /// through `ctx` (taken out of it), without changing the state.
    pub fn decide(&self, ctx: &Context, event: &str) -> Result<Outcome, Error> {
        let transitions = self.handle(ctx, event);
        // Effects asked for before a refusal go with it.
        let effects = ctx.take_effects();
        Ok(Outcome {
            transitions: transitions?,
            effects,
        })
    }

    /// What the host does live for one event: `handle`, then `apply` of each transition.
    /// Returns the transitions as JSON (the effects stay in `ctx`: [`Context::effects`]).
    pub fn handle_and_apply(&mut self, ctx: &Context, event: &str) -> Result<Vec<String>, Error> {
        let transitions = self.handle(ctx, event)?;
        for t in &transitions {
            self.apply(t)?;
        }
        Ok(transitions)
    }

    /// WIT `snapshot`: the state's bytes ([`Device::snapshot`]); empty before `init`.
    pub fn snapshot(&self) -> Vec<u8> {
        self.state.as_ref().map(T::snapshot).unwrap_or_default()
    }

    /// WIT `restore`: replaces the state with one read from a snapshot. Works without a
    /// prior `init`. On error the previous state is kept.
    pub fn restore(&mut self, snapshot: &[u8]) -> Result<(), Error> {
        if snapshot.is_empty() {
            return Err(Error::new(
                codes::INVALID_SNAPSHOT,
                "the snapshot is empty (taken before `init`?)",
            ));
        }
        self.state = Some(T::restore(snapshot)?);
        Ok(())
    }

    /// WIT `query`: the state as a JSON document ([`Device::query`]); `null` before `init`.
    pub fn query(&self) -> String {
        match &self.state {
            Some(state) => state.query().to_string(),
            None => "null".to_owned(),
        }
    }
}

/// Parses a config; an absent config (empty or `null`) falls back to `{}` so that config
/// structs made only of defaulted fields need none.
fn parse_config<C: DeserializeOwned>(config: &str) -> Result<C, Error> {
    let trimmed = config.trim();
    let absent = trimmed.is_empty() || trimmed == "null";
    let text = if trimmed.is_empty() { "null" } else { config };
    serde_json::from_str::<C>(text)
        .or_else(|e| {
            if absent {
                serde_json::from_str::<C>("{}").map_err(|_| e)
            } else {
                Err(e)
            }
        })
        .map_err(|e| Error::new(codes::INVALID_CONFIG, format!("malformed config: {e}")))
}

/// Writing to the host's structured log.
///
/// In a component these call the WIT `host.log` import, which tags the line with the device
/// id; natively they print to stderr (captured by the test harness), so plugin code can log
/// unconditionally. Logging is not state: the host may drop or rate-limit lines, and replay
/// may log again.
///
/// ```
/// use drover_guest::log;
/// let celsius = 21.5;
/// log::info(format_args!("reading {celsius} °C"));
/// log::warn("battery low");
/// ```
pub mod log {
    use std::fmt;

    /// Severity of a log line; mirrors the WIT `log-level` enum.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub enum Level {
        /// Very detailed tracing, usually filtered out.
        Trace,
        /// Diagnostics for plugin developers.
        Debug,
        /// Normal operation worth recording.
        Info,
        /// Something unexpected that the device handled.
        Warn,
        /// Something failed.
        Error,
    }

    impl fmt::Display for Level {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(match self {
                Level::Trace => "TRACE",
                Level::Debug => "DEBUG",
                Level::Info => "INFO",
                Level::Warn => "WARN",
                Level::Error => "ERROR",
            })
        }
    }

    /// Writes one line at `level`; accepts `&str`, `String` or `format_args!(..)`.
    pub fn log(level: Level, message: impl fmt::Display) {
        #[cfg(target_arch = "wasm32")]
        {
            use crate::__private::bindings::drover::device::host::{LogLevel, log};
            let level = match level {
                Level::Trace => LogLevel::Trace,
                Level::Debug => LogLevel::Debug,
                Level::Info => LogLevel::Info,
                Level::Warn => LogLevel::Warn,
                Level::Error => LogLevel::Error,
            };
            log(level, &message.to_string());
        }
        #[cfg(not(target_arch = "wasm32"))]
        eprintln!("[{level}] {message}");
    }

    /// Writes a [`Level::Trace`] line.
    pub fn trace(message: impl fmt::Display) {
        log(Level::Trace, message)
    }

    /// Writes a [`Level::Debug`] line.
    pub fn debug(message: impl fmt::Display) {
        log(Level::Debug, message)
    }

    /// Writes a [`Level::Info`] line.
    pub fn info(message: impl fmt::Display) {
        log(Level::Info, message)
    }

    /// Writes a [`Level::Warn`] line.
    pub fn warn(message: impl fmt::Display) {
        log(Level::Warn, message)
    }

    /// Writes a [`Level::Error`] line.
    pub fn error(message: impl fmt::Display) {
        log(Level::Error, message)
    }
}

/// Exports a [`Device`] type as the component's `drover:device/device` world.
///
/// Invoke it once, at the plugin crate's top level, with the state type (any type path).
/// When compiling for `wasm32` it generates the WIT exports, backed by one [`Instance`] kept in
/// a static. Natively it expands to a compile-time check that the type implements
/// [`Device`], so plugin crates build and test as plain Rust.
///
/// ```ignore
/// drover_guest::export_device!(Thermostat);
/// ```
#[macro_export]
macro_rules! export_device {
    ($device:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            ::std::thread_local! {
                static INSTANCE: ::core::cell::RefCell<$crate::Instance<$device>> =
                    const { ::core::cell::RefCell::new($crate::Instance::new()) };
            }

            struct DroverDeviceExports;

            impl $crate::__private::Guest for DroverDeviceExports {
                fn init(
                    device_id: ::std::string::String,
                    config: ::std::string::String,
                ) -> ::core::result::Result<(), $crate::__private::DeviceError> {
                    $crate::__private::init(&INSTANCE, device_id, config)
                }

                fn handle(
                    ctx: $crate::__private::EventContext,
                    event: ::std::string::String,
                ) -> ::core::result::Result<
                    $crate::__private::Outcome,
                    $crate::__private::DeviceError,
                > {
                    $crate::__private::handle(&INSTANCE, ctx, event)
                }

                fn apply(
                    transition: ::std::string::String,
                ) -> ::core::result::Result<(), $crate::__private::DeviceError> {
                    $crate::__private::apply(&INSTANCE, transition)
                }

                $crate::__apply_batch_export!(INSTANCE);

                fn snapshot() -> ::std::vec::Vec<u8> {
                    $crate::__private::snapshot(&INSTANCE)
                }

                fn restore(
                    snapshot: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<(), $crate::__private::DeviceError> {
                    $crate::__private::restore(&INSTANCE, snapshot)
                }

                fn query() -> ::std::string::String {
                    $crate::__private::query(&INSTANCE)
                }
            }

            $crate::__private::export!(
                DroverDeviceExports with_types_in $crate::__private::bindings
            );
        };

        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            fn assert_device<T: $crate::Device>() {}
            let _ = assert_device::<$device>;
        };
    };
}

/// Glue for [`export_device!`]: the `apply-batch` export, which contracts before `0.3.0`
/// (the `contract-v0-1` and `contract-v0-2` features) do not have. Not a public API.
#[cfg(not(any(feature = "contract-v0-1", feature = "contract-v0-2")))]
#[doc(hidden)]
#[macro_export]
macro_rules! __apply_batch_export {
    ($slot:ident) => {
        fn apply_batch(
            transitions: ::std::vec::Vec<::std::string::String>,
        ) -> ::core::result::Result<(), $crate::__private::BatchRefusal> {
            $crate::__private::apply_batch(&$slot, transitions)
        }
    };
}

/// Glue for [`export_device!`]: nothing, for a contract before `0.3.0`. Not a public API.
#[cfg(any(feature = "contract-v0-1", feature = "contract-v0-2"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __apply_batch_export {
    ($slot:ident) => {};
}

/// Glue for [`export_device!`]; not a public API.
#[doc(hidden)]
pub mod __private {
    #[cfg(target_arch = "wasm32")]
    pub use self::wasm::*;

    #[cfg(target_arch = "wasm32")]
    mod wasm {
        use std::cell::RefCell;
        use std::thread::LocalKey;

        use crate::{Context, Device, Error, Instance};

        #[cfg(not(feature = "contract-v0-1"))]
        use super::bindings::drover::device::types as wit;
        pub use super::bindings::{DeviceError, EventContext, Guest, Outcome, export};
        #[cfg(not(any(feature = "contract-v0-1", feature = "contract-v0-2")))]
        pub use wit::BatchRefusal;

        /// The slot [`export_device!`] generates for the concrete device type.
        pub type Slot<T> = LocalKey<RefCell<Instance<T>>>;

        /// Routes panic messages to `host.log` at error level, with their location, so the
        /// trap the host reports quotes them; then the panic aborts as usual (a trap).
        fn ensure_panic_hook() {
            static HOOK: std::sync::Once = std::sync::Once::new();
            HOOK.call_once(|| {
                std::panic::set_hook(Box::new(|info| {
                    let message = info.payload_as_str().unwrap_or("(non-string payload)");
                    match info.location() {
                        Some(at) => crate::log::error(format_args!(
                            "guest panicked at {}:{}:{}: {message}",
                            at.file(),
                            at.line(),
                            at.column()
                        )),
                        None => crate::log::error(format_args!("guest panicked: {message}")),
                    }
                }));
            });
        }

        impl From<Error> for DeviceError {
            fn from(e: Error) -> Self {
                DeviceError {
                    code: e.code,
                    message: e.message,
                }
            }
        }

        #[cfg(feature = "contract-v0-1")]
        impl From<EventContext> for Context {
            fn from(ctx: EventContext) -> Self {
                Context::new(ctx.device_id, ctx.seq, ctx.at_ms, ctx.seed)
            }
        }

        #[cfg(not(feature = "contract-v0-1"))]
        impl From<EventContext> for Context {
            fn from(ctx: EventContext) -> Self {
                let origin = match ctx.origin {
                    wit::Origin::External => crate::Origin::External,
                    wit::Origin::Message(m) => crate::Origin::Message {
                        sender: m.sender,
                        seq: m.seq,
                        index: m.index,
                    },
                    wit::Origin::Timer(t) => crate::Origin::Timer {
                        key: t.key,
                        due_ms: t.due_ms,
                        missed: t.missed,
                    },
                };
                Context::new(ctx.device_id, ctx.seq, ctx.at_ms, ctx.seed).with_origin(origin)
            }
        }

        #[cfg(not(feature = "contract-v0-1"))]
        impl From<crate::Effect> for wit::Effect {
            fn from(e: crate::Effect) -> Self {
                match e {
                    crate::Effect::Command { payload, ttl_ms } => {
                        wit::Effect::Command(wit::Command { payload, ttl_ms })
                    }
                    crate::Effect::Send { to, event } => {
                        wit::Effect::Send(wit::Message { to, event })
                    }
                    crate::Effect::SetTimer {
                        key,
                        due_ms,
                        every_ms,
                        event,
                    } => wit::Effect::SetTimer(wit::Timer {
                        key,
                        due_ms,
                        every_ms,
                        event,
                    }),
                    crate::Effect::CancelTimer { key } => wit::Effect::CancelTimer(key),
                }
            }
        }

        pub fn init<T: Device>(
            slot: &'static Slot<T>,
            device_id: String,
            config: String,
        ) -> Result<(), DeviceError> {
            ensure_panic_hook();
            slot.with_borrow_mut(|i| i.init(&device_id, &config))
                .map_err(Into::into)
        }

        pub fn handle<T: Device>(
            slot: &'static Slot<T>,
            ctx: EventContext,
            event: String,
        ) -> Result<Outcome, DeviceError> {
            ensure_panic_hook();
            let ctx = Context::from(ctx);
            let outcome = slot.with_borrow(|i| i.decide(&ctx, &event))?;
            #[cfg(feature = "contract-v0-1")]
            {
                if !outcome.effects.is_empty() {
                    return Err(Error::new(
                        crate::codes::INTERNAL,
                        "effects need the drover:device@0.2.0 contract or later; this plugin is built \
                         against 0.1.0 (the `contract-v0-1` feature)",
                    )
                    .into());
                }
                Ok(Outcome {
                    transitions: outcome.transitions,
                })
            }
            #[cfg(not(feature = "contract-v0-1"))]
            Ok(Outcome {
                transitions: outcome.transitions,
                effects: outcome.effects.into_iter().map(Into::into).collect(),
            })
        }

        pub fn apply<T: Device>(
            slot: &'static Slot<T>,
            transition: String,
        ) -> Result<(), DeviceError> {
            ensure_panic_hook();
            slot.with_borrow_mut(|i| i.apply(&transition))
                .map_err(Into::into)
        }

        #[cfg(not(any(feature = "contract-v0-1", feature = "contract-v0-2")))]
        pub fn apply_batch<T: Device>(
            slot: &'static Slot<T>,
            transitions: Vec<String>,
        ) -> Result<(), BatchRefusal> {
            ensure_panic_hook();
            slot.with_borrow_mut(|i| i.apply_batch(&transitions))
                .map_err(|(index, e)| BatchRefusal {
                    // A batch never holds more than u32::MAX transitions (the host bounds it
                    // far lower); saturate rather than wrap if one ever did.
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    error: e.into(),
                })
        }

        pub fn snapshot<T: Device>(slot: &'static Slot<T>) -> Vec<u8> {
            ensure_panic_hook();
            slot.with_borrow(|i| i.snapshot())
        }

        pub fn restore<T: Device>(
            slot: &'static Slot<T>,
            snapshot: Vec<u8>,
        ) -> Result<(), DeviceError> {
            ensure_panic_hook();
            slot.with_borrow_mut(|i| i.restore(&snapshot))
                .map_err(Into::into)
        }

        pub fn query<T: Device>(slot: &'static Slot<T>) -> String {
            ensure_panic_hook();
            slot.with_borrow(|i| i.query())
        }
    }

    /// The wit-bindgen bindings of the `device` world.
    #[cfg(all(
        target_arch = "wasm32",
        not(any(feature = "contract-v0-1", feature = "contract-v0-2"))
    ))]
    #[allow(missing_docs, clippy::all)]
    pub mod bindings {
        wit_bindgen::generate!({
            path: "../wit",
            world: "device",
            pub_export_macro: true,
            default_bindings_module: "drover_guest::__private::bindings",
        });
    }

    /// The bindings of the frozen second contract (`wit/v0.2.0`), for the feature
    /// `contract-v0-2`: a plugin built with it is what a plugin built before `apply-batch`
    /// existed looks like to the host.
    #[cfg(all(
        target_arch = "wasm32",
        feature = "contract-v0-2",
        not(feature = "contract-v0-1")
    ))]
    #[allow(missing_docs, clippy::all)]
    pub mod bindings {
        wit_bindgen::generate!({
            path: "../wit/v0.2.0",
            world: "device",
            pub_export_macro: true,
            default_bindings_module: "drover_guest::__private::bindings",
        });
    }

    /// The bindings of the frozen first contract (`wit/v0.1.0`), for the feature
    /// `contract-v0-1`: a plugin built with it is what a plugin built before effects existed
    /// looks like to the host.
    #[cfg(all(target_arch = "wasm32", feature = "contract-v0-1"))]
    #[allow(missing_docs, clippy::all)]
    pub mod bindings {
        wit_bindgen::generate!({
            path: "../wit/v0.1.0",
            world: "device",
            pub_export_macro: true,
            default_bindings_module: "drover_guest::__private::bindings",
        });
    }
}

pub mod twin;

#[cfg(test)]
mod tests;
