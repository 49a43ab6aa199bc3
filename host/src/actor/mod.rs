//! The device actor: one task, one guest instance, one bounded mailbox per live device.
//!
//! The actor takes messages from its mailbox strictly one at a time, which is what makes a
//! device free of races by construction: the guest never sees two events at once, and seqs
//! are assigned in handling order.
//!
//! # Pipelining
//!
//! Handling an event costs microseconds; making it durable costs an fsync (about a
//! millisecond). So the actor does not wait for the journal: it hands the record to the
//! group-commit writer and moves on to its next message. The writer acknowledges records in
//! submission order once they are durable, so a device's acks still leave in seq order and
//! only after durability. At most [`ActorConfig::max_in_flight`] records per device may be
//! waiting for the disk (the journal's [`DeviceWriter`] counts them); past that the actor stops
//! taking messages, its mailbox fills, and senders get [`Error::MailboxFull`]: backpressure
//! reaches the client instead of memory growing.
//!
//! # What an actor is given
//!
//! An [`ActorEnv`] (journal, registry, metrics, limits) and a [`Directory`], the narrow view of
//! the router it needs (retire an idle actor, report that the live-instance cap is exceeded).
//! It knows nothing else of the runtime.
//!
//! # Layout
//!
//! This file has the loop (messages, activation, events, snapshots, passivation, reads);
//! `supervision.rs` counts failures and quarantines; `lanes.rs` has the threads guest code
//! runs on (the pool and the slow lane); `versions.rs` moves a device to another plugin
//! version; `effects.rs` checks internal events against the journal and applies the outbox
//! caps.
//!
//! # When things break
//!
//! * The guest refuses an event: the sender gets [`Error::Rejected`]; no seq is used and
//!   nothing is written. The instance is kept (refusing is normal behavior).
//! * The guest traps or times out (in `handle` or in `apply`): the instance is discarded, the
//!   event fails with nothing written, and the next message rebuilds the device from the
//!   journal (invariant 2: in-memory state always equals the journal's).
//! * A commit fails: the writer fails every unacknowledged record of this device and fences
//!   its generation; the actor notices before its next message and rebuilds from the journal.

use std::num::NonZeroU64;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::clock;
pub use crate::config::ActorConfig;
use crate::decide::{self, Failed};
use crate::engine::{CallError, EventContext, Instance, Preemption};
use crate::error::Error;
use crate::journal::{
    DeadLetter, DeviceHead, DeviceWriter, Effect, EffectId, Fx, Journal, JournalError, MessageTurn,
    Origin, TimerEntry,
};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::replay::{self, Start};
use crate::upgrade::{self, DeviceUpgrade, UpgradeOutcome};
use crate::view::{Committed, DeviceState, DeviceStatus, QuarantineView};

mod effects;
mod lanes;
mod live_slots;
mod supervision;
mod versions;

use effects::EffectsInFlight;
pub use lanes::ActorPool;
use lanes::*;
use live_slots::LiveSlot;
pub(crate) use live_slots::LiveSlots;
use supervision::*;
use versions::*;

/// Everything an actor uses, shared by all actors of a runtime.
pub struct ActorEnv {
    pub journal: Journal,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub config: ActorConfig,
    /// Time budget of one event (handle plus every apply).
    pub call_timeout: Duration,
    /// Time budget of one activation (restore and the replay of the tail after it): a device
    /// snapshots before its tail could take a quarter of it to replay (see `Live::tail_cost`).
    pub activation_timeout: Duration,
    /// The router, seen through what actors may ask of it. Weak: the router owns the actors.
    pub directory: Weak<dyn Directory>,
    /// Set when the router stops taking messages. A flag of its own rather than a question
    /// to the router: upgrading the `Weak` above is an atomic read-modify-write of one cache
    /// line every actor thread shares, and internal events ask it once each.
    pub closing: Arc<AtomicBool>,
    /// Where actors run: a runtime of their own, so guest code never holds the threads that
    /// accept connections and answer `/healthz` (see [`ActorPool`]).
    pub pool: tokio::runtime::Handle,
    /// Where the events of plugins that have run slow run (see [`ActorPool`]).
    pub slow_lane: tokio::runtime::Handle,
    /// (device number, plugin version id) pairs that failed to upgrade: activations do not
    /// retry them (actors come and go; this outlives them, and restarts too).
    pub upgrade_failures: upgrade::FailedUpgrades,
    /// Turns and counts of slow failures of versions' folds (see [`upgrade::SlowFolds`]).
    pub slow_folds: upgrade::SlowFolds,
    /// Set when the server starts to stop (before it drains its connections): no fold of a
    /// new version starts, and those under way stop, so a version that spins never holds
    /// the drain. Devices stay on their version and move at a later activation. And an
    /// event nobody waits for any more (its connection closed, a batch answered at the
    /// drain timeout) is not handled from then on: never acknowledged, and a batch cut short
    /// told its caller so.
    pub upgrades_stopped: AtomicBool,
    /// (device number, plugin version id) pairs whose snapshots failed, taken (a trap or a
    /// timeout in `snapshot`) or restored (at an activation): no more are taken, and
    /// activations replay the device's history rather than try its snapshots, until the
    /// process restarts. Without it, a device whose snapshots spin on `restore` spent the
    /// whole activation budget at every activation, and wrote another such snapshot when it
    /// was passivated again; one whose `snapshot` spins lost its instance at every snapshot.
    pub snapshots_off: parking_lot::Mutex<std::collections::HashSet<(u32, u32)>>,
    /// Where a record with effects goes once it is durable (see `crate::dispatch`).
    pub dispatch: mpsc::UnboundedSender<Durable>,
    /// Actors rebuilt after a failed commit, logged at most once a second: a failing disk
    /// fails every device's commits at once (see `crate::log_limit`).
    pub rebuild_log: parking_lot::Mutex<crate::log_limit::LogLimit>,
    /// Messages and timer firings plugins refused, logged at most once a second: a periodic
    /// timer a new version refuses is refused every period, on every device that set it.
    pub refused_log: parking_lot::Mutex<crate::log_limit::LogLimit>,
    /// The live-instance cap's slots: an instance is built only with one (see `live_slots`).
    pub(crate) live_slots: LiveSlots,
}

/// A durable record whose effects are owed: what the actor hands the dispatcher from the
/// writer thread (an unbounded send: it never blocks the writer).
#[derive(Debug)]
pub struct Durable {
    pub device: Arc<str>,
    pub num: u32,
    pub seq: u64,
    pub effects: Vec<Effect>,
    /// The record fired or changed a timer: the timer wheel re-reads the device's timers.
    pub timers_changed: bool,
    /// Not a record: a timer firing of this device ended without one, so the wheel re-reads
    /// its timers after [`INTERNAL_RETRY`] (`effects` is empty, `seq` 0).
    pub retry: bool,
    /// Not a record: a message to this device was not handled (it timed out, the device was
    /// quarantined, ...), so every message still owed to it is sent again after this long.
    pub redeliver: Option<Duration>,
}

impl Durable {
    /// Not a record: `head`'s timers are to be put back in the wheel after
    /// [`INTERNAL_RETRY`].
    fn timer_retry(head: &DeviceHead) -> Durable {
        Durable {
            device: head.id.clone(),
            num: head.num,
            seq: 0,
            effects: Vec::new(),
            timers_changed: true,
            retry: true,
            redeliver: None,
        }
    }

    /// Not a record: the messages owed to `head` are to be sent again after `after`.
    fn redeliver(head: &DeviceHead, after: Duration) -> Durable {
        Durable {
            device: head.id.clone(),
            num: head.num,
            seq: 0,
            effects: Vec::new(),
            timers_changed: false,
            retry: false,
            redeliver: Some(after),
        }
    }
}

/// How long a timer firing or a message that was not recorded (the guest timed out on it, the
/// device could not activate, a commit failed) waits before it comes again. A quarantined
/// device gets its messages again when the quarantine ends.
pub const INTERNAL_RETRY: Duration = Duration::from_secs(5);

/// How often an actor waiting for a fold on the slow lane looks whether the server is
/// stopping (see `Actor::bring_up`).
const STOPPING_POLL: Duration = Duration::from_millis(100);

/// Size of an actor's set of handled messages past which the durable ones are dropped from
/// it (at most `max_in_flight` are not).
const HANDLED_PRUNE: usize = 256;

/// What an actor may ask of the router that owns it.
pub trait Directory: Send + Sync {
    /// Removes the idle actor of `id` from the router if nobody can still send to it (its
    /// mailbox `rx` is empty and the router holds the only sender). Returns whether it did:
    /// then the actor's task ends.
    fn retire(&self, id: &str, rx: &mpsc::Receiver<Message>) -> bool;
    /// The live-instance cap is reached (an activation took the last slot, or found none):
    /// passivate the least recently used.
    fn over_capacity(&self);
    /// How long device `id` is still quarantined for, if it is (a sender held back by it
    /// says so, and when to retry).
    fn quarantine_left(&self, id: &str) -> Option<Duration>;
}

/// A message in an actor's mailbox: 16 bytes, every variant's payload one pointer at most.
/// Each live actor's mailbox keeps a first block of room for 32 messages whether it is used
/// or not, so the message's size is paid 32 times per live actor (48-byte messages made that
/// block 1.5 KiB); boxing an event costs one small allocation beside its text's.
pub enum Message {
    /// An event from outside.
    Event(Box<ExternalEvent>),
    /// The durable state and the lifecycle status as the read found it.
    Query {
        reply: oneshot::Sender<Result<QueryAnswer, Error>>,
    },
    /// The guest's snapshot bytes of the current durable state, with its seq.
    Export {
        reply: oneshot::Sender<Result<(u64, Vec<u8>), Error>>,
    },
    /// Drop the instance now: the runtime is over its live-instance cap and this device is
    /// among the least recently used.
    Passivate,
    /// End a quarantine now (an operator fixed the cause): the next event runs the guest.
    Resume {
        reply: oneshot::Sender<Result<crate::view::Resumed, Error>>,
    },
    /// An event from inside: a message another device sent (after its record was durable)
    /// or a timer of this device firing. Handled like an event, except that it is checked
    /// first (a message already handled or a timer replaced meanwhile is dropped), a refusal
    /// consumes it (recorded with no transitions, so it is not delivered again), and nobody
    /// waits for an answer. See `crate::dispatch`.
    Internal(Box<InternalEvent>),
    /// Write a snapshot of the current state now (activating the device if it is not live):
    /// retention asks a device whose old snapshot holds back the deletion of old segments
    /// (see `Runtime::refresh_retention`). Nobody waits for it.
    Snapshot,
    /// Move to plugin version `version` between two events (a deploy or rollback): see
    /// `crate::upgrade`.
    Upgrade(Box<UpgradeRequest>),
}

/// [`Message::Event`]: the event's JSON text, when it was accepted, and who waits.
pub struct ExternalEvent {
    pub event: String,
    pub accepted: Instant,
    pub reply: oneshot::Sender<Result<Committed, Error>>,
}

/// [`Message::Internal`].
pub struct InternalEvent {
    /// The event; `None` for a timer firing, whose event the actor reads from the record
    /// that set the timer (the wheel and the index do not keep timers' events).
    pub event: Option<String>,
    pub origin: Origin,
}

/// [`Message::Upgrade`]: the plugin version to move to, and who waits for the report.
pub struct UpgradeRequest {
    pub version: u32,
    pub reply: oneshot::Sender<DeviceUpgrade>,
}

/// A read's answer: the durable state, the lifecycle status as the read found it, and, while
/// quarantined, why.
pub type QueryAnswer = (DeviceState, DeviceStatus, Option<QuarantineView>);

/// Ticks once per message any actor takes, process-wide: the order of use the live cap
/// passivates by ([`Activity::last_used`]). One shared counter costs an atomic add per
/// message, far below the message itself.
pub static USE_CLOCK: AtomicU64 = AtomicU64::new(1);

/// What the router can see of an actor without asking it: for least-recently-used
/// passivation and for the status of a device.
#[derive(Debug, Default)]
pub struct Activity {
    /// When the actor last took a message, as a tick of [`USE_CLOCK`]: an order, not a time.
    /// Milliseconds tied for actors used within the same one, and the cap then passivated
    /// one of them in no particular order (a review saw a device evicted before one used
    /// the millisecond before it).
    pub last_used: AtomicU64,
    /// Whether it holds an instance.
    pub live: AtomicBool,
    /// Until when it sits out a quarantine, in ms of [`crate::clock::mono_ms`] (0: none).
    /// An end time rather than a flag: a quarantine ends by itself, with no message to the
    /// actor that would lower a flag, and a listing must not go on showing it.
    pub quarantined_until_ms: AtomicU64,
    /// The plugin version (journal-local id) it runs, or will run at activation.
    pub version: AtomicU32,
    /// Bytes its instance's memory has grown past its initial size (its share of the guest
    /// memory budget, as of its last event or activation; 0 when not live): what passivating
    /// it would give back under memory pressure.
    pub grown_memory: AtomicU64,
    /// What started the quarantine `quarantined_until_ms` bounds: the failures in a row and
    /// the last one's error, for listings that show the quarantined with their reason
    /// without a message to each actor. Boxed: set only for a device that failed, and every
    /// actor carries the field.
    pub quarantine_cause: parking_lot::Mutex<Option<Box<QuarantineCause>>>,
    /// Set by the router before it closes the mailbox of a device being removed: the actor
    /// drains it and drops its instance without the passivation snapshot, which nothing would
    /// ever read (a removal closes the device's history for good).
    pub removing: AtomicBool,
    /// Set by the router when it puts a [`Message::Passivate`] in the mailbox, cleared by
    /// the actor as it takes it: the router's sweeps pass over an actor already asked. Each
    /// sweep (one per activation over the live cap) asked the least recently used again,
    /// and an actor slow to take its messages got one per sweep until its mailbox was full
    /// and its events were refused `429 mailbox-full` (a review saw it with 32 requests in
    /// flight).
    pub passivation_asked: AtomicBool,
}

impl Activity {
    /// Puts a [`Message::Passivate`] in `tx`, the mailbox of the actor this is the activity
    /// of, unless one is there already; false if it is, or if the mailbox is full (a device
    /// that busy is no good victim anyway).
    pub(crate) fn ask_to_passivate(&self, tx: &mpsc::Sender<Message>) -> bool {
        if self.passivation_asked.swap(true, Ordering::AcqRel) {
            return false;
        }
        if tx.try_send(Message::Passivate).is_ok() {
            return true;
        }
        self.passivation_asked.store(false, Ordering::Release);
        false
    }
}

/// See [`Activity::quarantine_cause`].
#[derive(Debug)]
pub struct QuarantineCause {
    pub failures: u32,
    pub last_error: String,
}

/// The sending side of a live actor, and its task.
pub struct ActorHandle {
    pub tx: mpsc::Sender<Message>,
    pub activity: Arc<Activity>,
    task: tokio::task::JoinHandle<()>,
}

impl ActorHandle {
    /// Closes the mailbox and waits until the actor has handled everything already in it.
    pub async fn closed(self) {
        Self::stopped(self.close()).await;
    }

    /// Closes the mailbox: the actor stops once it has handled what is already in it and
    /// taken its final snapshot. Await the task with [`ActorHandle::stopped`].
    pub fn close(self) -> tokio::task::JoinHandle<()> {
        drop(self.tx);
        self.task
    }

    /// Waits for a task [`ActorHandle::close`] returned.
    pub async fn stopped(task: tokio::task::JoinHandle<()>) {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "actor task failed");
        }
    }
}

/// Starts the actor for `head` and returns its handle. `after_crash`: an earlier actor of
/// this device died without draining its appends, so the first activation waits for the
/// journal to settle them.
pub fn spawn(env: Arc<ActorEnv>, head: DeviceHead, after_crash: bool) -> ActorHandle {
    let (tx, rx) = mpsc::channel(env.config.mailbox);
    let activity = Arc::new(Activity::default());
    activity.version.store(head.version, Ordering::Relaxed);
    let writer = env
        .journal
        .device_writer(head.num, env.config.max_in_flight);
    let pool = env.pool.clone();
    let metrics = env.metrics.clone();
    let device = head.id.clone();
    // What a panic lost from the mailbox is still owed: asked for again (see below).
    let (dispatch, lost) = (env.dispatch.clone(), head.clone());
    let actor = Actor {
        activity: activity.clone(),
        failures: 0,
        last_failure: None,
        quarantine: None,
        writer,
        env,
        head,
        live: None,
        must_sync: after_crash,
        handled: Default::default(),
        timeouts: Default::default(),
        commands: None,
        sends: None,
        in_flight: None,
        timer_record: None,
    };
    // No span around the task: entering one on every poll showed up at ~2.5% of the hot
    // path. The few log lines an actor writes name the device themselves.
    //
    // Supervision: a panic anywhere in the actor (a bug, a failing log write) ends this task
    // only. Its mailbox closes, its instance is dropped, callers waiting on it get an error,
    // and the router starts a fresh actor, rebuilt from the journal, for the next message.
    //
    // A combinator, not an `async` block: a block keeps what it captures for as long as it
    // runs, beside the future it awaits, so every live actor's task held the actor (or its
    // whole future) twice.
    use futures::FutureExt as _;
    let fut = std::panic::AssertUnwindSafe(actor.run(rx))
        .catch_unwind()
        .map(move |ended| {
            let Err(panic) = ended else { return };
            metrics.actor_panics.fetch_add(1, Ordering::Relaxed);
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(device = %device, panic = %what, "actor panicked; the next message restarts it from the journal");
            // Timer firings and messages waiting in its mailbox went with it.
            let _ = dispatch.send(Durable::timer_retry(&lost));
            let _ = dispatch.send(Durable::redeliver(&lost, INTERNAL_RETRY));
        });
    // Every live actor keeps this; what it awaits per message is boxed (`Actor::on_message`).
    debug_assert!(
        std::mem::size_of_val(&fut) <= TASK_BYTES,
        "an actor's task takes {} bytes, over {TASK_BYTES}: is something awaited in place in `Actor::run`?",
        std::mem::size_of_val(&fut)
    );
    let task = pool.spawn(fut);
    ActorHandle { tx, activity, task }
}

/// The most an actor's task may take (its future, not counting the scheduler's header), checked
/// in debug builds (so by every test that starts an actor): 1,320 bytes on x86-64 when it was
/// set, of which the [`Actor`] is 864 and its idle timer 112; it was 4,736 when message
/// handling was awaited in place.
const TASK_BYTES: usize = 1536;

struct Actor {
    activity: Arc<Activity>,
    /// Consecutive fatal guest failures (traps, timeouts, failed activations).
    failures: u32,
    /// When the last of them happened.
    last_failure: Option<Instant>,
    /// While set and in the future, events fail fast without running the guest.
    quarantine: Option<Quarantine>,
    env: Arc<ActorEnv>,
    head: DeviceHead,
    live: Option<Live>,
    writer: DeviceWriter,
    /// Wait for the journal before the first activation (see [`spawn`]).
    must_sync: bool,
    /// Messages (sender's device number, id) this actor handled whose records may not be
    /// durable yet, when the journal still lists them as owed: a second copy is dropped (see
    /// `message_turn`). Pruned of durable ones as it grows; emptied at every rebuild.
    handled: std::collections::HashSet<(u32, EffectId)>,
    /// How many times the guest timed out on each internal event that has not become a
    /// record yet (see [`TIMEOUTS_BEFORE_CONSUMED`]).
    timeouts: std::collections::HashMap<InternalKey, u32>,
    /// The device has issued commands (in this actor's life, or before: checked at the first
    /// event): only then is its outbox checked against the cap, so devices that never
    /// command pay nothing per event.
    commands: Option<bool>,
    /// The same for messages sent and not yet handled by their targets.
    sends: Option<bool>,
    /// Commands and messages of this device's events submitted to the journal and not yet
    /// durable (nor failed); created at the first event with either.
    in_flight: Option<Arc<EffectsInFlight>>,
    /// The last record read for a timer's event, if it set several timers (see
    /// `timer_event`); dropped at passivation.
    timer_record: Option<(u64, Fx)>,
}

/// Counts live instances for the `drover_live_instances` gauge and holds the instance's
/// slot of the live-instance cap (none for a read's short-lived one, see `live_slots`);
/// decrements and gives the slot back on drop, so every way an instance dies (passivation,
/// trap, fenced commit, a panic) is counted.
struct LiveToken {
    env: Arc<ActorEnv>,
    activity: Arc<Activity>,
    /// Given back when dropped.
    _slot: Option<LiveSlot>,
}

impl LiveToken {
    fn new(env: &Arc<ActorEnv>, activity: &Arc<Activity>, slot: Option<LiveSlot>) -> LiveToken {
        env.metrics.live_instances.fetch_add(1, Ordering::Relaxed);
        activity.live.store(true, Ordering::Relaxed);
        LiveToken {
            env: env.clone(),
            activity: activity.clone(),
            _slot: slot,
        }
    }
}

impl Drop for LiveToken {
    fn drop(&mut self) {
        self.activity.live.store(false, Ordering::Relaxed);
        self.activity.grown_memory.store(0, Ordering::Relaxed);
        self.env
            .metrics
            .live_instances
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The instance and the bookkeeping that is only meaningful while it lives.
struct Live {
    _token: LiveToken,
    instance: Instance,
    /// Seq of the last event handled (possibly not yet durable).
    seq: u64,
    /// Timestamp of that event; stamps never go backwards within a device.
    last_at_ms: u64,
    since_snapshot: u64,
    /// Guest time spent on what the last snapshot does not cover (`handle`s included: an
    /// over-estimate of replaying it). Past a quarter of the activation budget a snapshot is
    /// taken whatever `snapshot_every` says: a tail of slow `apply`s, each well within its
    /// event's budget, could otherwise add up to more than an activation may take, and the
    /// device could never be rebuilt after a trap or a crash.
    tail_cost: Duration,
    /// What `Activity::grown_memory` was last told.
    grown_memory: u64,
    /// A live upgrade was put off because the server was overloaded: when to try it again.
    /// A busy device may not passivate for hours, and its next activation is what would
    /// otherwise move it; an idle one passivates and moves at activation (this goes with it).
    upgrade_retry: Option<UpgradeRetry>,
}

/// Time one message may hold an actor thread before the actor lets others run before its
/// next message: a tenth of the default event budget, far above a healthy event (µs).
const YIELD_AFTER: Duration = Duration::from_millis(25);

impl Actor {
    // Not an `async fn`: one keeps its arguments twice in its state (rust-lang/rust#62958),
    // and this state is every live actor's task; the block uses the actor where it captured it.
    #[allow(clippy::manual_async_fn)]
    fn run(mut self, mut rx: mpsc::Receiver<Message>) -> impl Future<Output = ()> + Send {
        async move {
            let idle = self.env.config.idle_timeout;
            let mut last_activity = tokio::time::Instant::now();
            // One timer per actor, re-armed lazily: a message only records the time, and the timer
            // only looks at it when it fires. So the hot path never touches the timer wheel.
            let sleep = tokio::time::sleep(idle);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    biased;
                    msg = rx.recv() => {
                        let Some(msg) = msg else { break };
                        last_activity = tokio::time::Instant::now();
                        self.activity
                            .last_used
                            .store(USE_CLOCK.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
                        // One allocation per message, sized for what handling it awaits: in
                        // place, that state would be part of every live actor's task, idle or not
                        // (see `on_message`).
                        Box::pin(self.on_message(msg, last_activity)).await;
                        if sleep.is_elapsed() {
                            sleep.as_mut().reset(last_activity + idle);
                        }
                    }
                    () = &mut sleep => {
                        let now = tokio::time::Instant::now();
                        let deadline = last_activity + idle;
                        if now < deadline {
                            sleep.as_mut().reset(deadline);
                        } else if self.live.is_some() {
                            self.passivate().await;
                            sleep.as_mut().reset(now + idle);
                        } else if !self.in_quarantine()
                            // What supervision counts lives in this task: retired, a device
                            // whose retries come less often than two idle periods would start
                            // each one from zero and never be quarantined, nor its timer
                            // firing ever consumed.
                            && self.forgets_nothing()
                            && self.writer.is_idle()
                            && self
                                .env
                                .directory
                                .upgrade()
                                .is_some_and(|d| d.retire(&self.head.id, &rx))
                        {
                            // Idle for two periods: the task and mailbox go too, so a fleet of
                            // millions costs memory only for the devices that are in use. The
                            // next message starts a new actor.
                            break;
                        } else {
                            sleep.as_mut().reset(now + idle);
                        }
                    }
                }
            }
            // The mailbox is closed and drained: leave a snapshot so the next start replays
            // less, unless the device is being removed (the instance goes with the actor).
            if !self.activity.removing.load(Ordering::Acquire) {
                self.passivate().await;
            }
        }
    }

    /// Handles one message from the mailbox, `at` the time it was taken.
    ///
    /// A function of its own so that its state (an event's handling awaits the guest, the
    /// journal's room, an activation) is boxed for the time of one message rather than kept in
    /// the task every live actor holds while it waits: that took the task from 4.7 KB to
    /// 1.2 KB per live actor (the fleet bench's heap per live actor), for one allocation per
    /// message.
    async fn on_message(&mut self, msg: Message, at: tokio::time::Instant) {
        // Not before an upgrade (a deploy's own: its report would read
        // `unchanged`) or a passivation (which makes it moot), nor while stopping.
        if self
            .live
            .as_ref()
            .and_then(|l| l.upgrade_retry)
            .is_some_and(|r| at.into_std() >= r.due)
            && !matches!(msg, Message::Upgrade(_) | Message::Passivate)
            && !self.stopping()
        {
            Box::pin(self.retry_upgrade()).await;
        }
        match msg {
            Message::Passivate => {
                self.activity
                    .passivation_asked
                    .store(false, Ordering::Release);
                // Only the router asks: the live cap, or the guest memory budget.
                if self.passivate().await {
                    self.env.metrics.evictions.fetch_add(1, Ordering::Relaxed);
                }
            }
            Message::Resume { reply } => {
                let was_quarantined = self.quarantine.is_some();
                let failures_forgotten = self.failures;
                if was_quarantined {
                    tracing::info!(device = %self.head.id, "quarantine lifted on request");
                    // Messages dropped meanwhile come now, not at its planned end.
                    let _ = self
                        .env
                        .dispatch
                        .send(Durable::redeliver(&self.head, Duration::ZERO));
                } else if failures_forgotten > 0 {
                    // Not quarantined yet: its count starts afresh all the same (a review
                    // resumed a device with two failures, and its next one quarantined it).
                    tracing::info!(device = %self.head.id, failures = failures_forgotten, "failures in a row forgotten on request");
                }
                self.recovered();
                let _ = reply.send(Ok(crate::view::Resumed {
                    status: self.status(),
                    was_quarantined,
                    failures_forgotten,
                }));
            }
            // Stopping, and nobody waits for the answer (the server closed its
            // connection at the drain timeout, answered a batch cut short there, or the
            // caller went away): never acknowledged, so not handled either, lest a
            // mailbox of slow events hold the stop for minutes, or a batch's items
            // answered `shutting-down` be made durable after all.
            Message::Event(e) if e.reply.is_closed() && self.upgrades_stopped() => drop(e),
            // One reading of the clock: a quarantine ending between two would
            // drop the reply unanswered.
            Message::Event(e) => match self.quarantined() {
                Some(refused) => {
                    let _ = e.reply.send(Err(refused));
                }
                None => {
                    let ExternalEvent {
                        event,
                        accepted,
                        reply,
                    } = *e;
                    self.on_event(event, Origin::External, None, accepted, Some(reply), 0)
                        .await;
                }
            },
            Message::Internal(_) if self.stopping() => {
                // Still owed in the journal: the next start sends it again. A
                // stop answers the events it accepted from outside; it does not
                // wait for a burst of timer firings or messages to be handled.
                self.env
                    .metrics
                    .internal_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
            Message::Internal(internal) if self.in_quarantine() => {
                // Still owed in the journal: a timer is put back in the wheel for
                // later, a message is delivered again when the quarantine ends.
                self.env
                    .metrics
                    .internal_dropped
                    .fetch_add(1, Ordering::Relaxed);
                self.internal_not_handled(&internal.origin);
            }
            Message::Internal(internal) => {
                let InternalEvent { event, origin } = *internal;
                self.on_internal(event, origin).await
            }
            // The rare requests' futures are boxed, so the task every live actor
            // keeps is sized for the event path only.
            Message::Query { reply } => Box::pin(self.on_query(reply)).await,
            Message::Snapshot => Box::pin(self.on_snapshot_request()).await,
            // A fold of a new version can take the whole activation budget: not started while
            // stopping, where nothing would use it (the device moves at its next activation).
            Message::Upgrade(request) if self.upgrades_stopped() => {
                let registry = &self.env.registry;
                let number = |id: u32| registry.version(id).map_or(0, |v| v.number);
                let mut report = DeviceUpgrade::lazy(
                    &self.head.id,
                    number(self.head.version),
                    number(request.version),
                    self.head.seq,
                );
                report.error = Some(
                    "not tried: the server is shutting down; it moves at its next activation"
                        .into(),
                );
                let _ = request.reply.send(report);
            }
            Message::Upgrade(request) => {
                let report = Box::pin(self.on_upgrade(request.version)).await;
                let _ = request.reply.send(report);
            }
            Message::Export { reply } => Box::pin(self.on_export(reply)).await,
        }
        self.note_memory();
        // A message that held this thread long (a slow or spinning guest) lets
        // the other actors waiting for a thread go first: a device with a backlog
        // of such events would otherwise keep the thread for all of them (tokio
        // counts a task's messages, not their time), and healthy devices' events
        // wait behind the whole backlog.
        if at.elapsed() >= YIELD_AFTER {
            tokio::task::yield_now().await;
        }
    }

    /// After each message: tells the router how much memory the live instance has grown
    /// past its initial size, if that changed (an event, a snapshot, a read, an upgrade's new
    /// instance may all grow it). From a copy of its own, so the event path adds no store.
    fn note_memory(&mut self) {
        if let Some(live) = self.live.as_mut() {
            let grown = live.instance.grown_memory();
            if grown != live.grown_memory {
                live.grown_memory = grown;
                self.activity.grown_memory.store(grown, Ordering::Relaxed);
            }
        }
    }

    /// Drops the instance after snapshotting what the last snapshot does not cover. The task
    /// and its mailbox stay for one more idle period (then they are retired too); the next
    /// message reactivates the device from snapshot + tail. Whether there was an instance.
    async fn passivate(&mut self) -> bool {
        self.timer_record = None;
        if self.live.as_ref().is_some_and(|l| l.since_snapshot > 0) {
            self.snapshot().await;
        }
        if self.live.take().is_some() {
            tracing::debug!(device = %self.head.id, "passivated");
            self.env
                .metrics
                .passivations
                .fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Makes sure a consistent instance is live, rebuilding it from the journal if there is
    /// none or a commit of the current one failed.
    /// `transient`: the instance is for one read and is dropped right after it (see
    /// `live_slots`).
    async fn ensure_live(&mut self, transient: bool) -> Result<(), Error> {
        if self.live.is_some() && self.writer.is_fenced() {
            if let Some(rebuilt) = self.env.rebuild_log.lock().due() {
                tracing::warn!(
                    device = %self.head.id,
                    rebuilt,
                    "commit failed under this actor: rebuilding from the journal ({rebuilt} \
                     rebuilds since the last such line, at most one a second)"
                );
            }
            self.live = None;
        }
        if self.live.is_some() {
            return Ok(());
        }
        // Boxed: an activation's future (a lazy upgrade's fold, a snapshot) is kilobytes,
        // and every actor task would carry it; one allocation per activation is nothing
        // beside an instantiation.
        Box::pin(self.activate(true, transient)).await
    }

    /// Rebuilds the instance from the journal (see [`Actor::ensure_live`]). One that came
    /// up from another version's snapshot takes one of its own at once if `own_snapshot`.
    async fn activate(&mut self, own_snapshot: bool, transient: bool) -> Result<(), Error> {
        // Records this actor already submitted must be durable (or failed) before the journal
        // is read, or the rebuild would miss them. Nothing in flight: no round trip.
        if self.must_sync || !self.writer.is_idle() {
            match self.env.journal.barrier().await {
                // Settled either way: what failed is not in the journal the rebuild reads.
                // (A failed commit failed the activation, and on a full disk the read that
                // came while the previous read's passivation snapshot was in flight.)
                Ok(()) | Err(JournalError::Commit { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            self.must_sync = false;
        }
        // Nothing of this actor is in flight now: the journal alone says what is owed (a
        // message whose commit failed is owed again).
        self.handled.clear();
        self.writer.next_generation();
        let fresh = self
            .env
            .journal
            .device(&self.head.id)
            .ok_or_else(|| Error::UnknownDevice(self.head.id.to_string()))?;
        // This actor writes under its device's number: if the id now names another device
        // (removed and provisioned again), it must not write for it.
        if fresh.num != self.head.num {
            return Err(Error::UnknownDevice(self.head.id.to_string()));
        }
        self.head = fresh;
        // A slot of the live-instance cap before any instance is built (a lazy upgrade's
        // fold builds one too).
        let slot = if transient {
            self.env.live_slots.try_take()
        } else {
            let sweep = || {
                if let Some(directory) = self.env.directory.upgrade() {
                    directory.over_capacity();
                }
            };
            Some(
                self.env
                    .live_slots
                    .take(sweep, self.env.activation_timeout)
                    .await?,
            )
        };
        // A failed upgrade may have advertised a version this device does not run.
        self.activity
            .version
            .store(self.head.version, Ordering::Relaxed);
        // Runs on this worker: snapshots keep the tail short, so activation is tens of µs.
        // A plugin that has run slow, or built a state slowly (see
        // `CompiledPlugin::setup_runs_slow`), folds on the slow lane: its `restore` or
        // `apply`s may be slow too, and an activation's budget is seconds. One that turns out slow here
        // (a unit of the rebuild used two epoch ticks) is stopped and folded there afresh.
        let started = Instant::now();
        let version = self.head.version;
        // Snapshots that would not restore are not tried again (see `snapshots_off`), unless
        // retention deleted the history a replay from `init` needs.
        let start =
            if self.snapshots_off() && self.env.journal.oldest_retained_seq(self.head.num) <= 1 {
                Start::Genesis
            } else {
                Start::Snapshot
            };
        let (upgraded, put_off) = match self.lazy_upgrade().await? {
            LazyUpgrade::Upgraded(rebuilt) => (Some(*rebuilt), None),
            LazyUpgrade::Stay => (None, None),
            LazyUpgrade::PutOff(to) => (None, Some(to)),
        };
        let rebuilt = match upgraded {
            Some(rebuilt) => rebuilt,
            None if self.env.registry.setup_runs_slow(version) => {
                self.activate_on_slow_lane(start).await?
            }
            None => match replay::rebuild_reporting_as(
                &self.env.journal,
                &self.env.registry,
                &self.head,
                self.head.seq,
                start,
                Preemption::Move,
            ) {
                // Stopped as its plugin turned out slow, or short of a core or of memory
                // while it is now marked slow: either way the slow lane is where it goes.
                Err(f)
                    if matches!(f.error, Error::Overloaded(_))
                        && self.env.registry.setup_runs_slow(version) =>
                {
                    self.activate_on_slow_lane(start).await?
                }
                other => self.after_rebuild(other)?,
            },
        };
        if rebuilt.snapshot_failed {
            self.turn_snapshots_off("a snapshot would not restore");
        }
        self.env.metrics.activations.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            device = %self.head.id,
            seq = rebuilt.seq,
            snapshot = ?rebuilt.snapshot,
            applied = rebuilt.applied,
            "activated"
        );
        let foreign = rebuilt.foreign_snapshot;
        // A snapshot damaged on disk was passed over: a new one now, so the next activation
        // does not read past it again, and retention is not held back by it (its segment
        // stays needed until a newer snapshot exists). Its snapshots stay on: before, media
        // damage was taken for a `restore` that fails, and turned them off until a restart,
        // which pinned retention for the whole time.
        let unreadable = rebuilt.snapshot_unreadable;
        let grown_memory = rebuilt.instance.grown_memory();
        self.activity
            .grown_memory
            .store(grown_memory, Ordering::Relaxed);
        self.live = Some(Live {
            grown_memory,
            _token: LiveToken::new(&self.env, &self.activity, slot),
            instance: rebuilt.instance,
            seq: rebuilt.seq,
            last_at_ms: rebuilt.last_at_ms,
            since_snapshot: rebuilt.applied,
            tail_cost: if rebuilt.applied > 0 {
                started.elapsed()
            } else {
                Duration::ZERO
            },
            upgrade_retry: put_off.map(|to| UpgradeRetry {
                due: Instant::now() + INTERNAL_RETRY.mul_f64(0.75 + 0.5 * clock::jitter()),
                to,
                tries: 0,
            }),
        });
        if (foreign || unreadable) && own_snapshot {
            // Came up from another version's snapshot (retention deleted the history a
            // replay needs): a snapshot of its own version, so the next activation does not
            // depend on that one, and retention is not held back until the next one is due.
            self.snapshot().await;
            if self.live.is_none() {
                // The snapshot lost the instance (stopped on the pool as its plugin turned
                // out slow, or trapped): activate again, once, on the slow lane if it is
                // slow now, and leave the snapshot to when one is next due.
                return Box::pin(self.activate(false, transient)).await;
            }
        }
        // A deploy or rollback that moved the plugin's current version while this device was
        // activating did not see it live (it was not yet), so it counted on the activation to
        // move it, which read the version before: move it now, as the deploy would have.
        // (The live flag is set above before this read, the deploy sets the version before it
        // reads the flags, both under locks: one of the two sees the other.)
        // (Not one whose upgrade was just put off: its turn would not come now either.)
        let from = self.head.version;
        if let Some(to) = self.env.registry.target_of(from)
            && to != from
            && put_off.is_none()
            && !self.env.upgrade_failures.contains(self.head.num, to)
        {
            let report = Box::pin(self.on_upgrade(to)).await;
            tracing::info!(device = %self.head.id, outcome = ?report.outcome, "moved to the version a deploy made current while it activated");
        }
        Ok(())
    }

    /// Rebuilds the device on the slow lane, where an activation of a plugin slow to build a state
    /// holds a slow-lane thread rather than one of the pool's.
    async fn activate_on_slow_lane(&self, start: Start) -> Result<replay::Rebuilt, Error> {
        self.env
            .metrics
            .slow_lane_activations
            .fetch_add(1, Ordering::Relaxed);
        let (journal, registry) = (self.env.journal.clone(), self.env.registry.clone());
        let head = self.head.clone();
        let task = self.env.slow_lane.spawn(async move {
            replay::rebuild_preemptible(&journal, &registry, &head, head.seq, start).await
        });
        let rebuilt = on_slow_lane(task)
            .await
            .map_err(|e| Error::Internal(format!("activation on the slow lane: {e}")))?;
        self.after_rebuild(rebuilt)
    }

    /// An activation's rebuild, done: a snapshot that would not restore is not tried again
    /// (see `snapshots_off`), whether the rebuild then succeeded or not. Kept on after a
    /// failure, a snapshot whose `restore` spins cost every activation after it that time
    /// again, and left the replay from `init` too little to finish: the device never came
    /// up, though its history folds.
    fn after_rebuild(
        &self,
        rebuilt: Result<replay::Rebuilt, replay::RebuildFailure>,
    ) -> Result<replay::Rebuilt, Error> {
        match rebuilt {
            Ok(rebuilt) => Ok(rebuilt),
            Err(f) => {
                if f.snapshot_failed {
                    self.turn_snapshots_off("a snapshot would not restore");
                }
                Err(f.error)
            }
        }
    }

    /// How long a fold must have run for its failure to count toward giving its version up,
    /// and how long a device waits for a slow version's turn (see [`upgrade::SlowFolds`]).
    fn slow_failure(&self) -> Duration {
        upgrade::slow_failure(self.env.activation_timeout)
    }

    /// Whether the runtime is shutting down.
    fn stopping(&self) -> bool {
        self.env.closing.load(Ordering::Acquire) || self.env.directory.strong_count() == 0
    }

    /// Whether folds of new versions must not start or go on (see
    /// [`ActorEnv::upgrades_stopped`]).
    fn upgrades_stopped(&self) -> bool {
        self.stopping() || self.env.upgrades_stopped.load(Ordering::Acquire)
    }

    /// Handles one event; returns whether its record was submitted to the journal.
    /// `every_ms` is the period of the timer an `Origin::Timer` event fires (looked up with
    /// the check that it is owed, so not a second time here). `moves`: how many times this
    /// event was already stopped to run on the slow lane (see [`MAX_MOVES`]).
    async fn on_event(
        &mut self,
        event: String,
        origin: Origin,
        every_ms: Option<u64>,
        accepted: Instant,
        reply: Option<oneshot::Sender<Result<Committed, Error>>>,
        moves: u32,
    ) -> bool {
        let answer = |reply: Option<oneshot::Sender<Result<Committed, Error>>>, r| {
            if let Some(reply) = reply {
                let _ = reply.send(r);
            }
        };
        self.writer.room().await;
        if origin == Origin::External
            && let Err(e) = self.outbox_room().and_then(|()| self.sent_room())
        {
            answer(reply, Err(e));
            return false;
        }
        if let Err(e) = self.ensure_live(false).await {
            if matches!(e, Error::Activation(_)) {
                self.record_failure(&e);
            }
            answer(reply, Err(e));
            return false;
        }
        let Some(live) = self.live.as_mut() else {
            answer(reply, Err(Error::Internal("no live instance".into())));
            return false;
        };
        let seq = live.seq + 1;
        let at_ms = clock::now_ms().max(live.last_at_ms);
        // A periodic timer that fires late folds the periods it missed into this firing.
        let origin = match origin {
            Origin::Timer {
                key,
                set,
                due_ms,
                missed: _,
            } => Origin::Timer {
                missed: every_ms.map_or(0, |p| at_ms.saturating_sub(due_ms) / p.max(1)),
                key,
                set,
                due_ms,
            },
            other => other,
        };
        let ctx = decide::context(&self.head.id, seq, at_ms, &origin);
        let max_output = self.env.config.max_output_bytes;
        let budget = self.env.call_timeout;
        let internal = origin != Origin::External;
        // A message or timer firing that trapped: consumed, then the instance is dropped.
        let mut poisoned: Option<(Error, bool)> = None;
        // One refused, or whose output was refused: consumed, but no success either, so the
        // failures counted toward a quarantine stand (as after a refused external event).
        let mut refused = false;
        let started = Instant::now();
        let decided =
            decide_live(&mut self.live, &self.env, &ctx, &event, max_output, budget).await;
        if decided.is_err()
            && moves < MAX_MOVES
            && self.live.as_mut().is_some_and(|l| l.instance.take_moved())
        {
            // Its plugin turned out slow during this event, on the pool: stopped there. The
            // instance may be half-changed and goes; the event is handled afresh, as after
            // any lost instance: the device rebuilt (on the slow lane now), its seq and clock
            // read again (a commit that failed meanwhile, a version that moved, show there).
            self.live = None;
            return Box::pin(self.on_event(event, origin, every_ms, accepted, reply, moves + 1))
                .await;
        }
        let took = started.elapsed();
        let key = InternalKey::of(&origin);
        let timed_out_enough = match (&decided, key) {
            // The server's overload (a core, memory) is no fault of the event's: it comes
            // again, uncounted.
            (
                Err(Failed {
                    error: Error::Overloaded(_),
                    ..
                }),
                _,
            ) => false,
            (
                Err(Failed {
                    error: Error::Timeout { .. },
                    ..
                }),
                Some(key),
            ) => {
                // Bounded: a device has few internal events failing at once; a burst of
                // distinct ones that each timed out once is forgotten rather than kept.
                if self.timeouts.len() >= 1024 {
                    self.timeouts.clear();
                }
                let n = self.timeouts.entry(key).or_default();
                *n += 1;
                *n >= TIMEOUTS_BEFORE_CONSUMED
            }
            (_, Some(key)) => {
                if !self.timeouts.is_empty() {
                    self.timeouts.remove(&key);
                }
                false
            }
            (_, None) => false,
        };
        let decided = match decided {
            Ok(d) => d,
            // A message or timer the plugin refuses is consumed all the same (recorded with no
            // transitions), or it would come back at every start. No sender hears of it, so it
            // is kept as a dead letter: before, only a debug line told, and a periodic timer
            // that a new version refused was refused every period with nothing to see.
            Err(Failed {
                error: error @ Error::Rejected { .. },
                instance_lost: false,
            }) if internal => {
                self.dead_letter(seq - 1, at_ms, event.clone().into_bytes(), &error);
                if let Some(refusals) = self.env.refused_log.lock().due() {
                    tracing::info!(device = %self.head.id, seq, ?origin, error = %error, refusals, "a message or timer firing refused by the plugin: consumed, kept as a dead letter (refusals since the last such line, at most one a second: {refusals})");
                }
                refused = true;
                decide::Decided::default()
            }
            // So is one whose output the host refuses (too large, an invalid effect): the
            // same event would fail the same way at every delivery. Kept as a dead letter.
            Err(Failed {
                error: error @ (Error::OutputTooLarge { .. } | Error::InvalidEffect(_)),
                instance_lost: false,
            }) if internal => {
                self.dead_letter(seq - 1, at_ms, event.clone().into_bytes(), &error);
                refused = true;
                decide::Decided::default()
            }
            // And so is one the guest traps on: a trap is deterministic (the same state and
            // event trap again), so a poison message would come back at every start and let
            // its sender's later messages overtake it, and a poison timer would fire every
            // few seconds forever (a periodic one moves on to its next period). Kept as a
            // dead letter. A timeout is not deterministic (a loaded machine): that one is
            // tried again, up to `TIMEOUTS_BEFORE_CONSUMED` times.
            Err(Failed {
                error,
                instance_lost,
            }) if internal && (matches!(error, Error::Trap(_)) || timed_out_enough) => {
                self.dead_letter(seq - 1, at_ms, event.clone().into_bytes(), &error);
                tracing::warn!(device = %self.head.id, seq, ?origin, error = %error, "internal event trapped or kept timing out: consumed, kept as a dead letter");
                poisoned = Some((error, instance_lost));
                decide::Decided::default()
            }
            Err(Failed {
                error,
                instance_lost,
            }) => {
                // A refusal is the plugin's answer; anything else is a fault on this input:
                // kept as a dead letter so it is visible and can be re-sent after a fix. Not
                // a message or timer firing that comes again (a timeout, below the count that
                // consumes it): one that later succeeds is no dead letter, and re-sending it
                // would handle it twice.
                let mut lettered = false;
                if internal {
                    self.env
                        .metrics
                        .internal_retried
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(device = %self.head.id, seq, ?origin, error = %error, "internal event failed: it comes again");
                } else if !matches!(error, Error::Rejected { .. } | Error::Overloaded(_)) {
                    // (An overloaded server is no fault of the event's: re-sending it is
                    // what the 503 asks for.)
                    self.dead_letter(seq - 1, at_ms, event.into_bytes(), &error);
                    lettered = true;
                }
                if instance_lost {
                    // Interrupted mid-call, the instance is discarded whatever the reason;
                    // only the plugin's own failures count toward a quarantine.
                    if !matches!(error, Error::Overloaded(_)) {
                        self.record_failure(&error);
                    }
                    tracing::warn!(
                        device = %self.head.id,
                        seq,
                        error = %error,
                        "guest failed: discarding the instance"
                    );
                    self.live = None;
                }
                if lettered && reply.is_some() {
                    // Answered once the dead letter is durable, so a client that reads the
                    // list on its error finds it there (a review's script found it missing
                    // in 24 of 30 tries, 0.3-1 ms before it was). Whether it was written or
                    // not, the error is the event's own.
                    self.writer
                        .when_durable(Box::new(move |_| answer(reply, Err(error))));
                } else {
                    answer(reply, Err(error));
                }
                return false;
            }
        };
        let Some(live) = self.live.as_mut() else {
            // Lost on the slow lane (it stopped under it): the next event rebuilds the device.
            answer(
                reply,
                Err(Error::Internal("the live instance was lost".into())),
            );
            return false;
        };
        let count = decided.transitions.len() as u64;
        live.seq = seq;
        live.last_at_ms = at_ms;
        live.since_snapshot += count;
        if count > 0 {
            live.tail_cost += took;
        }
        let take_snapshot = poisoned.is_none()
            && ((self.env.config.snapshot_every > 0
                && live.since_snapshot >= self.env.config.snapshot_every)
                || live.tail_cost >= self.env.activation_timeout / 4);
        match &poisoned {
            None if refused => {}
            None => self.recovered(),
            Some((error, lost)) => {
                // The record below consumes the event; the next event rebuilds the device
                // from the journal (which waits for that record) if the trap cost the
                // instance.
                self.record_failure(error);
                if *lost {
                    self.live = None;
                }
            }
        }

        let (mut commands, mut sends) = (0, 0);
        for e in &decided.effects {
            match e {
                Effect::Command { .. } => commands += 1,
                Effect::Send { .. } => sends += 1,
                Effect::SetTimer { .. } | Effect::CancelTimer { .. } => {}
            }
        }
        if commands > 0 {
            self.commands = Some(true);
        }
        if sends > 0 {
            self.sends = Some(true);
        }
        let settle = (commands + sends > 0).then(|| {
            let in_flight = self.in_flight.get_or_insert_with(Default::default).clone();
            in_flight.commands.fetch_add(commands, Ordering::AcqRel);
            in_flight.sends.fetch_add(sends, Ordering::AcqRel);
            (in_flight, commands, sends)
        });
        let timers_changed = matches!(origin, Origin::Timer { .. })
            || decided
                .effects
                .iter()
                .any(|e| matches!(e, Effect::SetTimer { .. } | Effect::CancelTimer { .. }));
        let owed = (timers_changed || !decided.effects.is_empty()).then(|| Durable {
            device: self.head.id.clone(),
            num: self.head.num,
            seq,
            effects: decided.effects.clone(),
            timers_changed,
            retry: false,
            redeliver: None,
        });
        let fx = Fx {
            origin,
            effects: decided.effects,
        };
        let env = self.env.clone();
        // A timer firing or message whose record fails is still owed: it comes again later.
        let retry = match fx.origin {
            Origin::External => None,
            Origin::Timer { .. } => Some(Durable::timer_retry(&self.head)),
            Origin::Message { .. } => Some(Durable::redeliver(&self.head, INTERNAL_RETRY)),
        };
        self.writer.append_event(
            seq,
            at_ms,
            self.head.version,
            &event,
            decided.transitions,
            Some(fx),
            move |r: Result<(), JournalError>, transitions| {
                // Durable (and folded into the index, which now counts them) or failed.
                if let Some((in_flight, commands, sends)) = settle {
                    in_flight.commands.fetch_sub(commands, Ordering::AcqRel);
                    in_flight.sends.fetch_sub(sends, Ordering::AcqRel);
                }
                let r = match r {
                    Ok(()) => {
                        env.metrics.committed(count, accepted.elapsed());
                        if let Some(owed) = owed {
                            // The dispatcher outlives actors; it is gone only at shutdown,
                            // when what is owed stays in the journal for the next start.
                            let _ = env.dispatch.send(owed);
                        }
                        Ok(Committed {
                            seq,
                            at_ms,
                            transitions,
                        })
                    }
                    Err(e) => {
                        if let Some(retry) = retry {
                            let _ = env.dispatch.send(retry);
                        }
                        Err(Error::Journal(e))
                    }
                };
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
            },
        );

        if take_snapshot {
            self.snapshot().await;
        }
        true
    }

    /// Keeps `event`, which the plugin failed on with `error`, as a dead letter (best
    /// effort: its sender, if any, has the error already) and counts it.
    fn dead_letter(&self, after_seq: u64, at_ms: u64, event: Vec<u8>, error: &Error) {
        self.env.metrics.dead_letter(error.kind());
        self.writer.append_dead_letter(DeadLetter {
            device: self.head.num,
            after_seq,
            at_ms,
            version: self.head.version,
            event,
            code: error.code().to_string(),
            message: error.to_string(),
        });
    }

    /// A snapshot asked for by retention: taken through this actor's lane, after every
    /// record it submitted, so it lands after the events it covers. Skipped while
    /// quarantined or stopping (retention asks again later). Like a read, it does not change
    /// the lifecycle: a device activated for it is passivated again right after.
    async fn on_snapshot_request(&mut self) {
        if self.in_quarantine() || self.stopping() {
            return;
        }
        let was_live = self.live.is_some();
        if let Err(e) = self.ensure_live(!was_live).await {
            tracing::debug!(device = %self.head.id, error = %e, "no snapshot for retention: the device did not activate");
            return;
        }
        self.snapshot().await;
        if !was_live {
            self.passivate().await;
        }
    }

    /// Submits a snapshot of the current state. Best effort: a failure only means a longer
    /// replay at the next activation. Taken where an event would be decided (see
    /// [`read_live`]); one stopped on the pool as its plugin turned out slow is not taken
    /// again: the instance is lost with it, and the next one is taken on the slow lane.
    async fn snapshot(&mut self) {
        if self.snapshots_off() {
            return;
        }
        let taken = read_live(&mut self.live, &self.env, snapshot_unit, None).await;
        let Some(live) = self.live.as_mut() else {
            if let Err(lost) = taken {
                tracing::warn!(device = %self.head.id, error = %lost, "snapshot not taken");
            }
            return;
        };
        match taken {
            Err(_) => {}
            Ok(Ok(data)) => {
                let bytes = data.len();
                match self
                    .writer
                    .append_snapshot(live.seq, self.head.version, data)
                {
                    Ok(()) => {
                        live.since_snapshot = 0;
                        live.tail_cost = Duration::ZERO;
                        self.env.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
                    }
                    // Would not fit a journal record; the device just replays a longer tail.
                    Err(e) => tracing::warn!(
                        device = %self.head.id,
                        bytes,
                        error = %e,
                        "snapshot not written"
                    ),
                }
            }
            Ok(Err(e)) => {
                if e.is_fatal() && live.instance.take_moved() {
                    tracing::debug!(
                        device = %self.head.id,
                        "snapshot stopped as its plugin turned out slow; discarding the instance"
                    );
                } else {
                    tracing::warn!(
                        device = %self.head.id,
                        error = %e,
                        "snapshot failed; discarding the instance"
                    );
                    if !e.is_overload() {
                        self.turn_snapshots_off("a snapshot failed");
                    }
                }
                if e.is_fatal() {
                    self.live = None;
                }
            }
        }
    }

    /// Whether this device's snapshots are off on its version (see `ActorEnv::snapshots_off`).
    fn snapshots_off(&self) -> bool {
        self.env
            .snapshots_off
            .lock()
            .contains(&(self.head.num, self.head.version))
    }

    /// Turns this device's snapshots off on its version, `why`: counted and logged once.
    fn turn_snapshots_off(&self, why: &str) {
        self.env
            .metrics
            .snapshot_failures
            .fetch_add(1, Ordering::Relaxed);
        if self
            .env
            .snapshots_off
            .lock()
            .insert((self.head.num, self.head.version))
        {
            // The plugin and its version number as the API shows them, not the journal's
            // id of the version (a review matched `version=2` against the wrong one).
            let (plugin, number) = self
                .env
                .registry
                .version(self.head.version)
                .map_or((String::new(), 0), |v| (v.plugin, v.number));
            tracing::warn!(
                device = %self.head.id,
                plugin,
                version = number,
                "{why}: no more snapshots are taken of this device on this plugin version \
                 until the server restarts, and its activations replay its history"
            );
        }
    }

    /// Answers a read with the durable state. A read does not change the lifecycle: a
    /// passivated device is activated for the read and passivated again right after, so a
    /// dashboard polling every device neither fills the live-instance cap nor evicts the
    /// devices that are busy.
    async fn on_query(&mut self, reply: oneshot::Sender<Result<QueryAnswer, Error>>) {
        if let Some(e) = self.unreadable() {
            let _ = reply.send(Err(e));
            return;
        }
        // One reading of the clock for both: a quarantine ending between two would show a
        // `quarantined` status without its reason.
        let quarantine = self.quarantine_view();
        let status = match quarantine {
            Some(_) => DeviceStatus::Quarantined,
            None => self.status(),
        };
        let result = self
            .read_state(query_unit, true, status != DeviceStatus::Active)
            .await
            .map(|(seq, state)| (DeviceState { seq, state }, status, quarantine));
        // Passivated before it is answered, so that the answer finds it as it says it is;
        // the snapshot the passivation writes (best effort) failing on a full disk fails
        // nothing (see `DeviceWriter::when_durable`).
        if status != DeviceStatus::Active {
            self.passivate().await;
        }
        match result {
            Ok(answer) => self.reply_when_durable(answer, reply),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Answers a read once everything this actor submitted before it is durable. The state
    /// read may include events still on their way to disk: a read must never show what a crash
    /// could take back, nor anything of an event whose commit failed.
    fn reply_when_durable<T: Send + 'static>(
        &self,
        value: T,
        reply: oneshot::Sender<Result<T, Error>>,
    ) {
        if self.writer.is_idle() && !self.writer.is_fenced() {
            let _ = reply.send(Ok(value));
            return;
        }
        self.writer.when_durable(Box::new(move |r| {
            let _ = reply.send(r.map(|()| value).map_err(Error::from));
        }));
    }

    /// Runs `unit` (a read of the state, a snapshot for an export) on the device's live
    /// instance, activating it first if need be, and returns it with the seq it reflects.
    /// `counted`: a run on the slow lane counts in `drover_slow_lane_reads_total`;
    /// `transient`: an instance it activates is dropped right after (see `live_slots`).
    ///
    /// A unit stopped on the pool as its plugin turned out slow (see `on_event`) is run again,
    /// on the slow lane, from a rebuilt instance; past [`MAX_MOVES`] it is answered as the
    /// server's overload. Any other failure of the guest discards the instance. A device that
    /// cannot activate has the failure counted as one an event met: reads of it quarantine it
    /// too, and are then answered at once (`unreadable`).
    async fn read_state<R: Send + 'static>(
        &mut self,
        unit: ReadUnit<R>,
        counted: bool,
        transient: bool,
    ) -> Result<(u64, R), Error> {
        let mut moves = 0;
        loop {
            if let Err(e) = self.ensure_live(transient).await {
                if matches!(e, Error::Activation(_)) {
                    self.record_failure(&e);
                }
                return Err(e);
            }
            let slow_lane = counted.then_some(&self.env.metrics.slow_lane_reads);
            match read_live(&mut self.live, &self.env, unit, slow_lane).await {
                Err(lost) => return Err(Error::Internal(lost)),
                Ok(Ok(out)) => {
                    let seq = self.live.as_ref().map_or(self.head.seq, |live| live.seq);
                    return Ok((seq, out));
                }
                Ok(Err(e)) => {
                    if e.is_fatal() {
                        let moved = self
                            .live
                            .take()
                            .is_some_and(|mut l| l.instance.take_moved());
                        if moved && moves < MAX_MOVES {
                            moves += 1;
                            continue;
                        }
                        if !moved {
                            tracing::warn!(
                                device = %self.head.id,
                                error = %e,
                                "guest failed on a read: discarding the instance"
                            );
                        }
                    }
                    return Err(Error::from(e));
                }
            }
        }
    }

    /// Answers [`Message::Export`]: the guest's snapshot bytes, taken as a read is (see
    /// [`Actor::on_query`]).
    async fn on_export(&mut self, reply: oneshot::Sender<Result<(u64, Vec<u8>), Error>>) {
        if let Some(e) = self.unreadable() {
            let _ = reply.send(Err(e));
            return;
        }
        let result = self.read_state(snapshot_unit, false, false).await;
        match result {
            Ok(answer) => self.reply_when_durable(answer, reply),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every live actor's mailbox keeps room for 32 messages (see [`Message`]).
    #[test]
    fn a_mailbox_message_is_two_words() {
        assert_eq!(std::mem::size_of::<Message>(), 16);
    }

    /// An actor is asked to passivate once until it takes the request, however many sweeps
    /// pick it: sweeps came one per activation over the live cap, and an actor slow to take
    /// its messages got a request from each until its mailbox was full and its events were
    /// refused `429 mailbox-full`. A full mailbox takes no request and leaves none pending.
    #[test]
    fn an_actor_is_asked_to_passivate_once_until_it_takes_the_request() {
        let (tx, mut rx) = mpsc::channel(4);
        let activity = Activity::default();
        assert!(activity.ask_to_passivate(&tx));
        for _ in 0..10 {
            assert!(!activity.ask_to_passivate(&tx), "asked already");
        }
        assert_eq!(rx.len(), 1);
        // What the actor does as it takes it.
        assert!(matches!(rx.try_recv(), Ok(Message::Passivate)));
        activity.passivation_asked.store(false, Ordering::Release);
        assert!(activity.ask_to_passivate(&tx), "asked again once taken");
        let _ = rx.try_recv();
        activity.passivation_asked.store(false, Ordering::Release);
        for _ in 0..4 {
            tx.try_send(Message::Snapshot).expect("room");
        }
        assert!(!activity.ask_to_passivate(&tx), "full");
        assert!(
            !activity.passivation_asked.load(Ordering::Acquire),
            "nothing pending"
        );
    }
}
