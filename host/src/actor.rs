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
//! waiting for the disk; past that the actor stops taking messages, its mailbox fills, and
//! senders get [`Error::MailboxFull`]: backpressure reaches the client instead of memory
//! growing.
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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::{Notify, mpsc, oneshot};

use crate::clock;
use crate::engine::{EventContext, Instance};
use crate::error::Error;
use crate::journal::{Entry, Fence, IndexEffect, JournalError, Record, record};
use crate::replay::{self, DeviceHead, Start};
use crate::runtime::Shared;

/// Per-actor limits, taken from the runtime builder.
#[derive(Debug, Clone)]
pub struct ActorConfig {
    /// Messages that may wait in a device's mailbox.
    pub mailbox: usize,
    /// Records per device that may be waiting for the disk.
    pub max_in_flight: usize,
    /// Take a snapshot after this many transitions since the last one (0: never).
    pub snapshot_every: u64,
    /// Largest total size of the transitions one event may produce.
    pub max_output_bytes: usize,
    /// An actor with no message for this long drops its instance (passivation).
    pub idle_timeout: std::time::Duration,
    /// Past this many live instances, the least recently used are passivated.
    pub max_live: usize,
}

/// An event that is durable: what the sender gets back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub seq: u64,
    pub at_ms: u64,
    /// The transitions, each one JSON document.
    pub transitions: Vec<String>,
}

/// The state of a device as of a durable seq.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub seq: u64,
    /// The guest's `query` answer (JSON text).
    pub state: String,
}

/// A message in an actor's mailbox.
pub enum Message {
    Event {
        event: String,
        accepted: Instant,
        reply: oneshot::Sender<Result<Committed, Error>>,
    },
    Query {
        reply: oneshot::Sender<Result<Snapshot, Error>>,
    },
    /// The guest's snapshot bytes of the current durable state, with its seq.
    Export {
        reply: oneshot::Sender<Result<(u64, Vec<u8>), Error>>,
    },
    /// Drop the instance now: the runtime is over its live-instance cap and this device is
    /// among the least recently used.
    Passivate,
}

/// What the runtime can see of an actor without asking it: for least-recently-used
/// passivation when the live-instance cap is reached.
#[derive(Debug, Default)]
pub struct Activity {
    /// When the actor last took a message, in ms of [`crate::clock::mono_ms`].
    pub last_used_ms: AtomicU64,
    /// Whether it holds an instance.
    pub live: AtomicBool,
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
        drop(self.tx);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "actor task failed");
        }
    }
}

/// Starts the actor for `head` and returns its handle.
pub(crate) fn spawn(shared: Arc<Shared>, head: DeviceHead) -> ActorHandle {
    let (tx, rx) = mpsc::channel(shared.actor.mailbox);
    let activity = Arc::new(Activity::default());
    let actor = Actor {
        activity: activity.clone(),
        failures: 0,
        quarantine: None,
        in_flight: Arc::new(InFlight::default()),
        shared,
        head,
        live: None,
        fence: Arc::new(Fence::default()),
        generation: 0,
    };
    // No span around the task: entering one on every poll showed up at ~2.5% of the hot
    // path. The few log lines an actor writes name the device themselves.
    let task = tokio::spawn(actor.run(rx));
    ActorHandle { tx, activity, task }
}

struct Actor {
    activity: Arc<Activity>,
    /// Consecutive fatal guest failures (traps, timeouts, failed activations).
    failures: u32,
    /// While set and in the future, messages fail fast without running the guest.
    quarantine: Option<Quarantine>,
    shared: Arc<Shared>,
    head: DeviceHead,
    live: Option<Live>,
    fence: Arc<Fence>,
    generation: u64,
    in_flight: Arc<InFlight>,
}

/// Records of one actor waiting for the disk. A counter plus a `Notify` that is only touched
/// when the actor is at its limit: cheaper than a semaphore, whose release takes a lock on
/// every acknowledgement.
#[derive(Default)]
struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    freed: Notify,
}

impl InFlight {
    /// Waits until fewer than `max` records are in flight, then counts one more.
    async fn acquire(&self, max: usize) {
        loop {
            if self.count.load(Ordering::Acquire) < max {
                break;
            }
            let freed = self.freed.notified();
            if self.count.load(Ordering::Acquire) < max {
                break;
            }
            freed.await;
        }
        // Only the actor increments, so the check above still holds.
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    /// Called by the journal writer when a record is acknowledged (or failed).
    fn release(&self, max: usize) {
        if self.count.fetch_sub(1, Ordering::AcqRel) >= max {
            // `notify_one` keeps a permit if the actor is not waiting yet: no lost wakeup.
            self.freed.notify_one();
        }
    }
}

/// After this many consecutive fatal failures a device is quarantined: a plugin that traps
/// or spins on every event would otherwise spend a worker's time on each one (up to the call
/// timeout), which on a small machine is time taken from the whole fleet.
const QUARANTINE_AFTER: u32 = 3;
/// First quarantine; each further failure right after one doubles it, up to the maximum.
const QUARANTINE_FIRST: std::time::Duration = std::time::Duration::from_secs(5);
const QUARANTINE_MAX: std::time::Duration = std::time::Duration::from_secs(300);

/// A device sitting out a quarantine.
struct Quarantine {
    until: Instant,
    length: std::time::Duration,
    last: String,
}

/// Counts live instances for the `drover_live_instances` gauge; decrements on drop, so
/// every way an instance dies (passivation, trap, fenced commit) is counted.
struct LiveToken(Arc<Shared>, Arc<Activity>);

impl LiveToken {
    fn new(shared: &Arc<Shared>, activity: &Arc<Activity>) -> LiveToken {
        let live = shared
            .metrics
            .live_instances
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        activity.live.store(true, Ordering::Relaxed);
        if live > shared.actor.max_live as u64 {
            shared.evict_lru();
        }
        LiveToken(shared.clone(), activity.clone())
    }
}

impl Drop for LiveToken {
    fn drop(&mut self) {
        self.1.live.store(false, Ordering::Relaxed);
        self.0
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
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        let idle = self.shared.actor.idle_timeout;
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
                        .last_used_ms
                        .store(clock::mono_ms(last_activity.into_std()), Ordering::Relaxed);
                    if !matches!(msg, Message::Passivate)
                        && let Some(e) = self.quarantined()
                    {
                        msg.refuse(e);
                        continue;
                    }
                    match msg {
                        Message::Passivate => self.passivate(),
                        Message::Event {
                            event,
                            accepted,
                            reply,
                        } => self.on_event(event, accepted, reply).await,
                        Message::Query { reply } => self.on_query(reply).await,
                        Message::Export { reply } => self.on_export(reply).await,
                    }
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
                        self.passivate();
                        sleep.as_mut().reset(now + idle);
                    } else if self.quarantine.is_none() && self.shared.retire(&self.head.id, &rx) {
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
        // The mailbox is closed and drained: leave a snapshot so the next start replays less.
        self.passivate();
    }

    /// The error to answer with while quarantined.
    fn quarantined(&self) -> Option<Error> {
        let q = self.quarantine.as_ref()?;
        let now = Instant::now();
        (now < q.until).then(|| Error::Quarantined {
            failures: self.failures,
            last: q.last.clone(),
            retry_in_ms: (q.until - now).as_millis() as u64,
        })
    }

    /// Counts a fatal guest failure; enough in a row start (or lengthen) a quarantine. A
    /// success resets the count (in `on_event`).
    fn record_failure(&mut self, e: &Error) {
        self.failures += 1;
        if self.failures >= QUARANTINE_AFTER {
            let length = match &self.quarantine {
                Some(q) => (q.length * 2).min(QUARANTINE_MAX),
                None => QUARANTINE_FIRST,
            };
            tracing::warn!(
                device = %self.head.id,
                failures = self.failures,
                seconds = length.as_secs(),
                error = %e,
                "device quarantined"
            );
            self.quarantine = Some(Quarantine {
                until: Instant::now() + length,
                length,
                last: e.to_string(),
            });
        }
    }

    /// Drops the instance after snapshotting what the last snapshot does not cover. The task
    /// and its mailbox stay for one more idle period (then they are retired too); the next
    /// message reactivates the device from snapshot + tail.
    fn passivate(&mut self) {
        if self.live.as_ref().is_some_and(|l| l.since_snapshot > 0) {
            self.snapshot();
        }
        if self.live.take().is_some() {
            tracing::debug!(device = %self.head.id, "passivated");
            self.shared
                .metrics
                .passivations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Makes sure a consistent instance is live, rebuilding it from the journal if there is
    /// none or the journal fenced the current one.
    async fn ensure_live(&mut self) -> Result<(), Error> {
        let fenced = self.generation > 0 && self.fence.is_failed(self.generation);
        if fenced {
            tracing::warn!(
                device = %self.head.id,
                "commit failed under this actor: rebuilding from the journal"
            );
            self.live = None;
        }
        if self.live.is_none() {
            // Records this actor already submitted must be durable (or failed) before the
            // journal is read, or the rebuild would miss them.
            self.shared.journal.barrier().await?;
            self.generation = self.fence.next_generation();
            self.head = DeviceHead::load(&self.shared.journal, &self.head.id)?;
            let shared = self.shared.clone();
            let head = self.head.clone();
            // Runs on this worker: snapshots keep the tail short, so activation is tens of µs.
            let rebuilt = replay::rebuild(
                &shared.journal,
                &shared.registry,
                &head,
                head.seq,
                Start::Snapshot,
            )?;
            self.shared
                .metrics
                .activations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(
                device = %self.head.id,
                seq = rebuilt.seq,
                snapshot = ?rebuilt.snapshot,
                applied = rebuilt.applied,
                "activated"
            );
            self.live = Some(Live {
                _token: LiveToken::new(&self.shared, &self.activity),
                instance: rebuilt.instance,
                seq: rebuilt.seq,
                last_at_ms: rebuilt.last_at_ms,
                since_snapshot: rebuilt.applied,
            });
        }
        Ok(())
    }

    async fn on_event(
        &mut self,
        event: String,
        accepted: Instant,
        reply: oneshot::Sender<Result<Committed, Error>>,
    ) {
        let max_in_flight = self.shared.actor.max_in_flight;
        self.in_flight.acquire(max_in_flight).await;
        let permit = InFlightPermit(self.in_flight.clone(), max_in_flight);
        if let Err(e) = self.ensure_live().await {
            if matches!(e, Error::Activation(_)) {
                self.record_failure(&e);
            }
            self.shared.metrics.error(e.code());
            let _ = reply.send(Err(e));
            return;
        }
        let Some(live) = self.live.as_mut() else {
            let _ = reply.send(Err(Error::Internal("no live instance".into())));
            return;
        };
        let seq = live.seq + 1;
        let at_ms = clock::now_ms().max(live.last_at_ms);
        let ctx = EventContext {
            device_id: self.head.id.to_string(),
            seq,
            at_ms,
            seed: clock::seed(&self.head.id, seq),
        };
        let outcome = decide(live, &ctx, &event, self.shared.actor.max_output_bytes);
        let transitions = match outcome {
            Ok(t) => t,
            Err((e, fatal)) => {
                if fatal {
                    self.record_failure(&e);
                    tracing::warn!(
                        device = %self.head.id,
                        seq,
                        error = %e,
                        "guest failed: discarding the instance"
                    );
                    self.live = None;
                }
                self.shared.metrics.error(e.code());
                let _ = reply.send(Err(e));
                return;
            }
        };

        // A success ends any failure streak (fields, not a method: `live` is borrowed).
        self.failures = 0;
        self.quarantine = None;
        let mut bytes = Vec::with_capacity(
            64 + event.len() + transitions.iter().map(String::len).sum::<usize>(),
        );
        record::encode_event(
            &mut bytes,
            self.head.num,
            seq,
            at_ms,
            self.head.version,
            event.as_bytes(),
            transitions.iter().map(String::as_bytes),
        );
        let count = transitions.len() as u64;
        live.seq = seq;
        live.last_at_ms = at_ms;
        live.since_snapshot += count;
        let take_snapshot = self.shared.actor.snapshot_every > 0
            && live.since_snapshot >= self.shared.actor.snapshot_every;

        let metrics = self.shared.clone();
        self.shared.journal.submit(Entry::Append {
            bytes,
            effect: IndexEffect::Event {
                device: self.head.num,
                seq,
            },
            fence: Some((self.fence.clone(), self.generation)),
            done: Some(Box::new(move |r: Result<(), JournalError>| {
                drop(permit);
                let answer = match r {
                    Ok(()) => {
                        use std::sync::atomic::Ordering::Relaxed;
                        metrics.metrics.events_committed.fetch_add(1, Relaxed);
                        metrics
                            .metrics
                            .transitions_committed
                            .fetch_add(count, Relaxed);
                        metrics.metrics.latency(accepted.elapsed());
                        Ok(Committed {
                            seq,
                            at_ms,
                            transitions,
                        })
                    }
                    Err(e) => {
                        metrics.metrics.error("journal");
                        Err(Error::Journal(e))
                    }
                };
                let _ = reply.send(answer);
            })),
        });

        if take_snapshot {
            self.snapshot();
        }
    }

    /// Submits a snapshot of the current state. Best effort: a failure only means a longer
    /// replay at the next activation.
    fn snapshot(&mut self) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        match live.instance.snapshot() {
            Ok(data) if data.len() > record::MAX_BODY_LEN - 64 => {
                // Would not fit a journal record; the device just replays a longer tail.
                tracing::warn!(
                    device = %self.head.id,
                    bytes = data.len(),
                    "snapshot too large for the journal; not written"
                );
            }
            Ok(data) => {
                live.since_snapshot = 0;
                let mut bytes = Vec::with_capacity(data.len() + 32);
                Record::Snapshot {
                    device: self.head.num,
                    seq: live.seq,
                    version: self.head.version,
                    data,
                }
                .encode_into(&mut bytes);
                self.shared
                    .metrics
                    .snapshots
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.shared.journal.submit(Entry::Append {
                    bytes,
                    effect: IndexEffect::Snapshot {
                        device: self.head.num,
                        seq: live.seq,
                        version: self.head.version,
                    },
                    fence: Some((self.fence.clone(), self.generation)),
                    done: None,
                });
            }
            Err(e) => {
                tracing::warn!(
                    device = %self.head.id,
                    error = %e,
                    "snapshot failed; discarding the instance"
                );
                if e.is_fatal() {
                    self.live = None;
                }
            }
        }
    }

    async fn on_query(&mut self, reply: oneshot::Sender<Result<Snapshot, Error>>) {
        let result = match self.ensure_live().await {
            Ok(()) => match self
                .live
                .as_mut()
                .map(|live| (live.seq, live.instance.query()))
            {
                None => Err(Error::Internal("no live instance".into())),
                Some((seq, Ok(state))) => Ok(Snapshot { seq, state }),
                Some((_, Err(e))) => {
                    if e.is_fatal() {
                        self.live = None;
                    }
                    Err(Error::from(e))
                }
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(snapshot) => self.reply_when_durable(snapshot, reply),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

impl Actor {
    /// Answers a read once everything this actor submitted before it is durable. The state
    /// read may include events still on their way to disk: a read must never show what a crash
    /// could take back, nor anything of an event whose commit failed (the fence says so).
    fn reply_when_durable<T: Send + 'static>(
        &self,
        value: T,
        reply: oneshot::Sender<Result<T, Error>>,
    ) {
        let fence = self.fence.clone();
        let generation = self.generation;
        self.shared
            .journal
            .submit(Entry::Barrier(Box::new(move |r| {
                let r = r.and_then(|()| {
                    if fence.is_failed(generation) {
                        Err(JournalError::Fenced)
                    } else {
                        Ok(())
                    }
                });
                let _ = reply.send(r.map(|()| value).map_err(Error::from));
            })));
    }

    async fn on_export(&mut self, reply: oneshot::Sender<Result<(u64, Vec<u8>), Error>>) {
        if let Err(e) = self.ensure_live().await {
            let _ = reply.send(Err(e));
            return;
        }
        let Some(live) = self.live.as_mut() else {
            let _ = reply.send(Err(Error::Internal("no live instance".into())));
            return;
        };
        match live.instance.snapshot() {
            Ok(bytes) => {
                let seq = live.seq;
                self.reply_when_durable((seq, bytes), reply);
            }
            Err(e) => {
                if e.is_fatal() {
                    self.live = None;
                }
                let _ = reply.send(Err(e.into()));
            }
        }
    }
}

impl Message {
    /// Answers the message with `e` without handling it.
    fn refuse(self, e: Error) {
        match self {
            Message::Event { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Message::Query { reply } => {
                let _ = reply.send(Err(e));
            }
            Message::Export { reply } => {
                let _ = reply.send(Err(e));
            }
            Message::Passivate => {}
        }
    }
}

/// One counted in-flight record; releases on drop, whichever way the event ends.
struct InFlightPermit(Arc<InFlight>, usize);

impl Drop for InFlightPermit {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

/// Runs `handle` and then `apply` for each transition. The error's flag says whether the
/// instance must be discarded.
fn decide(
    live: &mut Live,
    ctx: &EventContext,
    event: &str,
    max_output: usize,
) -> Result<Vec<String>, (Error, bool)> {
    let transitions = live
        .instance
        .handle(ctx, event)
        .map_err(|e| (e.is_fatal(), Error::from(e)))
        .map_err(|(f, e)| (e, f))?;
    let size: usize = transitions.iter().map(String::len).sum();
    if size > max_output {
        // `handle` must not change state, so the instance is still consistent.
        return Err((
            Error::OutputTooLarge {
                size,
                limit: max_output,
            },
            false,
        ));
    }
    for t in &transitions {
        // A failed apply leaves the state half-changed: always fatal.
        live.instance.apply(t).map_err(|e| (Error::from(e), true))?;
    }
    Ok(transitions)
}
