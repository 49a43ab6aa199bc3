//! The router: device id → actor, activation on demand, and the live-instance cap.
//!
//! Every message to a device goes through [`Router::deliver`], which finds the device's actor
//! or starts one (the *virtual actor* model: a device has an actor whenever someone talks to
//! it, and callers never manage its lifecycle). Actors leave the table on their own after two
//! idle periods ([`Directory::retire`]), and the router passivates the least recently used
//! instances when an activation finds the live-instance cap reached
//! ([`Directory::over_capacity`]; the cap itself is held by `actor/live_slots.rs`).
//!
//! The table is a `RwLock<HashMap>`: the hot path takes the read lock and clones a sender;
//! the write lock is taken only to start or retire an actor, which is also where a sender
//! could be cloned, so retiring can prove that nobody can still send to the actor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::RwLock;
use tokio::sync::mpsc;

use crate::actor::{self, Activity, ActorEnv, ActorHandle, Directory, Message};
use crate::error::{Error, validate_id};

/// Why [`Router::offer`] did not take a message.
pub enum Refused {
    /// The mailbox is full: here is the message back.
    Full(Message),
    /// Any other reason (unknown device, shutting down): the error and the message back.
    Error(Error, Message),
}

/// Device id → its actor. Hashed with foldhash (randomly seeded per process) rather than
/// SipHash: the lookup is on every message's path, and at 10k devices the router's share
/// of an event's CPU was ~4%. Ids are provisioned devices', so the table holds no key an
/// outside client chose freely (an unknown id is refused before it is ever inserted).
type ActorTable = HashMap<Arc<str>, ActorHandle, foldhash::quality::RandomState>;

/// What offering a message to a device's mailbox came to.
enum Offered {
    Sent,
    /// The mailbox is full: the message back.
    Full(Message),
    /// The actor is dead (its mailbox closed): its sender, for [`Router::restart`] to
    /// recognise, and the message back.
    Dead(mpsc::Sender<Message>, Message),
    /// Refused as [`Router::mailbox`] refuses: the error and the message back.
    Refused(Error, Message),
}

/// The least time between two LRU sweeps of the live-instance cap (see
/// [`Router::evict_lru`]): short against an activation (a thermostat's takes ~100 µs, a cold
/// burst's waiters ask again every 50 ms), long against a sweep's walk of every actor.
const SWEEP_GAP: std::time::Duration = std::time::Duration::from_millis(2);

/// See the module docs.
pub struct Router {
    env: Arc<ActorEnv>,
    actors: RwLock<ActorTable>,
    /// Set while an LRU passivation sweep is running, so activations do not pile up sweeps.
    evicting: AtomicBool,
    /// When the last LRU sweep started, µs after `born`: sweeps start at most every
    /// [`SWEEP_GAP`] (see [`Router::evict_lru`]).
    last_sweep_us: AtomicU64,
    /// Set while a sweep put off by [`SWEEP_GAP`] waits for its turn: one is enough.
    sweep_due: AtomicBool,
    born: std::time::Instant,
    /// Set while a passivation sweep for memory is running (see `relieve_memory`), so that a
    /// burst of refusals runs one at a time.
    relieving: AtomicBool,
    /// Devices being removed: no actor may start for them (see [`Router::stop_for_removal`]).
    removing: parking_lot::Mutex<std::collections::HashSet<String>>,
    me: Weak<Router>,
}

impl Router {
    /// Whether bringing device number `num` up on version `to` failed (see
    /// `ActorEnv::upgrade_failures`): then nothing tries again until a deploy.
    /// A version given up after slow failures (see `upgrade::SlowFolds`) counts as failed
    /// for every device still behind on it: none of them is tried.
    pub fn upgrade_failed(&self, num: u32, to: u32) -> bool {
        self.env.upgrade_failures.contains(num, to) || self.env.slow_folds.given_up(to).is_some()
    }

    /// Remembers that version `to` cannot bring these devices (numbers) up (a deploy's
    /// checks folded their histories and failed), so that their activations do not try again
    /// until a deploy, and their `upgrade` says so.
    pub fn note_upgrades_failed(&self, nums: impl IntoIterator<Item = u32>, to: u32) -> usize {
        self.env
            .upgrade_failures
            .insert_all(nums.into_iter().map(|num| (num, to)))
    }

    /// See [`crate::Runtime::stop_upgrades`].
    pub fn stop_upgrades(&self) {
        self.env.upgrades_stopped.store(true, Ordering::Release);
    }

    /// Whether [`Router::stop_upgrades`] was called.
    pub fn upgrades_stopped(&self) -> bool {
        self.env.upgrades_stopped.load(Ordering::Acquire)
    }

    /// Forgets which devices the versions `versions` says could not bring up, and whether
    /// they were given up after slow failures (see `upgrade::SlowFolds`): a deploy checks its
    /// version afresh, and what versions no longer current failed is of no more use.
    pub fn forget_upgrade_failures(&self, versions: impl Fn(u32) -> bool) {
        self.env.upgrade_failures.forget_versions(&versions);
        self.env.slow_folds.forget(versions);
    }

    /// How many folds of version `to` failed slowly in a row, if so many that it is tried on
    /// no more devices (see `upgrade::SlowFolds`).
    pub fn upgrade_given_up(&self, to: u32) -> Option<usize> {
        self.env.slow_folds.given_up(to)
    }

    /// Counts devices a given-up version was not tried on (see `Router::upgrade_given_up`).
    pub fn note_upgrades_not_tried(&self, devices: u64) {
        self.env
            .metrics
            .upgrades_not_tried
            .fetch_add(devices, Ordering::Relaxed);
    }

    /// A router whose actors get `env` (with its directory pointed back at this router).
    pub fn new(make_env: impl FnOnce(Weak<dyn Directory>) -> ActorEnv) -> Arc<Router> {
        Arc::new_cyclic(|me: &Weak<Router>| {
            let directory: Weak<dyn Directory> = me.clone();
            Router {
                env: Arc::new(make_env(directory)),
                actors: RwLock::new(ActorTable::default()),
                evicting: AtomicBool::new(false),
                last_sweep_us: AtomicU64::new(0),
                sweep_due: AtomicBool::new(false),
                born: std::time::Instant::now(),
                relieving: AtomicBool::new(false),
                removing: Default::default(),
                me: me.clone(),
            }
        })
    }

    /// Puts `msg` into device `id`'s mailbox, starting its actor if it has none. Fails fast:
    /// [`Error::MailboxFull`] when the mailbox is full, [`Error::UnknownDevice`] (or
    /// [`Error::InvalidId`] for an id that could never exist) when it is not provisioned.
    ///
    /// An actor whose task died (a panic: see [`actor::spawn`]) has a closed mailbox; it is
    /// replaced by a fresh one here, so the device is rebuilt by its next message.
    pub fn deliver(&self, id: &str, msg: Message) -> Result<(), Error> {
        if self.env.closing.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let (tx, msg) = match self.try_offer(id, msg) {
            Offered::Sent => return Ok(()),
            Offered::Full(_) => return Err(Error::MailboxFull),
            Offered::Dead(tx, msg) => (tx, msg),
            Offered::Refused(e, _) => return Err(e),
        };
        if self.env.closing.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let tx = self.restart(id, &tx)?;
        match tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(Error::MailboxFull),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Error::ShuttingDown),
        }
    }

    /// [`Router::deliver`] that hands the message back when the mailbox is full, for the
    /// dispatcher, which must not lose it (see `crate::dispatch`).
    pub fn offer(&self, id: &str, msg: Message) -> Result<(), Box<Refused>> {
        if self.env.closing.load(Ordering::Acquire) {
            return Err(Box::new(Refused::Error(Error::ShuttingDown, msg)));
        }
        let (tx, msg) = match self.try_offer(id, msg) {
            Offered::Sent => return Ok(()),
            Offered::Full(msg) => return Err(Box::new(Refused::Full(msg))),
            Offered::Dead(tx, msg) => (tx, msg),
            Offered::Refused(e, msg) => return Err(Box::new(Refused::Error(e, msg))),
        };
        let tx = match self.restart(id, &tx) {
            Ok(tx) => tx,
            Err(e) => return Err(Box::new(Refused::Error(e, msg))),
        };
        match tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(msg)) => Err(Box::new(Refused::Full(msg))),
            Err(mpsc::error::TrySendError::Closed(msg)) => {
                Err(Box::new(Refused::Error(Error::ShuttingDown, msg)))
            }
        }
    }

    /// Puts `msg` into device `id`'s mailbox, waiting for room. Only for the dispatcher's
    /// tasks: an actor never waits on another's mailbox, so no cycle of full mailboxes can
    /// deadlock.
    pub async fn deliver_waiting(&self, id: &str, msg: Message) -> Result<(), Box<Refused>> {
        let tx = match self.mailbox(id) {
            Ok(tx) => tx,
            Err(e) => return Err(Box::new(Refused::Error(e, msg))),
        };
        let Err(mpsc::error::SendError(msg)) = tx.send(msg).await else {
            return Ok(());
        };
        let tx = match self.restart(id, &tx) {
            Ok(tx) => tx,
            Err(e) => return Err(Box::new(Refused::Error(e, msg))),
        };
        tx.send(msg).await.map_err(|mpsc::error::SendError(msg)| {
            Box::new(Refused::Error(Error::ShuttingDown, msg))
        })
    }

    /// Replaces the dead actor whose sender is `dead` (unless someone already did).
    fn restart(
        &self,
        id: &str,
        dead: &mpsc::Sender<Message>,
    ) -> Result<mpsc::Sender<Message>, Error> {
        let mut actors = self.actors.write();
        if self.env.closing.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        self.refuse_if_removing(id)?;
        // Read under the lock, after the removal check: a head read before could belong to
        // a device removed (and its id provisioned again) meanwhile.
        let head = self
            .env
            .journal
            .device(id)
            .ok_or_else(|| Error::UnknownDevice(id.to_string()))?;
        match actors.get(id) {
            Some(a) if !a.tx.same_channel(dead) => return Ok(a.tx.clone()),
            _ => {}
        }
        tracing::warn!(
            device = id,
            "restarting the device's actor after it stopped"
        );
        let handle = actor::spawn(self.env.clone(), head.clone(), true);
        let tx = handle.tx.clone();
        actors.insert(head.id, handle);
        Ok(tx)
    }

    /// Offers `msg` to device `id`'s mailbox without waiting, starting its actor if it has
    /// none. The hot path (the actor is in the table) offers it under the read lock, without
    /// cloning the sender: two atomic operations on a cache line the actor's thread also
    /// writes.
    fn try_offer(&self, id: &str, msg: Message) -> Offered {
        let offered = |tx: &mpsc::Sender<Message>, msg| match tx.try_send(msg) {
            Ok(()) => Offered::Sent,
            Err(mpsc::error::TrySendError::Full(msg)) => Offered::Full(msg),
            Err(mpsc::error::TrySendError::Closed(msg)) => Offered::Dead(tx.clone(), msg),
        };
        if let Some(a) = self.actors.read().get(id) {
            return offered(&a.tx, msg);
        }
        match self.mailbox(id) {
            Ok(tx) => offered(&tx, msg),
            Err(e) => Offered::Refused(e, msg),
        }
    }

    fn mailbox(&self, id: &str) -> Result<mpsc::Sender<Message>, Error> {
        if self.env.closing.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        if let Some(a) = self.actors.read().get(id) {
            return Ok(a.tx.clone());
        }
        if self.env.journal.device(id).is_none() {
            validate_id(id)?;
            return Err(Error::UnknownDevice(id.to_string()));
        }
        let mut actors = self.actors.write();
        if self.env.closing.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        self.refuse_if_removing(id)?;
        // Read under the lock, after the removal check (see `restart`).
        let head = self
            .env
            .journal
            .device(id)
            .ok_or_else(|| Error::UnknownDevice(id.to_string()))?;
        let handle = actors
            .entry(head.id.clone())
            .or_insert_with(|| actor::spawn(self.env.clone(), head, false));
        Ok(handle.tx.clone())
    }

    /// Stops device `id`'s actor for its removal: from now on no actor starts for it (its
    /// messages get [`Error::UnknownDevice`]), and this waits until the actor has handled
    /// what was already in its mailbox. [`Router::end_removal`] lifts the bar.
    pub async fn stop_for_removal(&self, id: &str) {
        self.removing.lock().insert(id.to_string());
        let handle = self.actors.write().remove(id);
        if let Some(handle) = handle {
            handle.activity.removing.store(true, Ordering::Release);
            handle.closed().await;
        }
    }

    /// Ends what [`Router::stop_for_removal`] started (removed or not).
    pub fn end_removal(&self, id: &str) {
        self.removing.lock().remove(id);
    }

    fn refuse_if_removing(&self, id: &str) -> Result<(), Error> {
        if self.removing.lock().contains(id) {
            return Err(Error::UnknownDevice(id.to_string()));
        }
        Ok(())
    }

    /// The mailboxes of the actors holding a live instance whose version satisfies `pick`
    /// (a deploy's targets). Passivated actors are left out: they upgrade lazily.
    pub fn live_where(&self, pick: impl Fn(u32) -> bool) -> Vec<(Arc<str>, mpsc::Sender<Message>)> {
        self.actors
            .read()
            .iter()
            .filter(|(_, a)| {
                a.activity.live.load(Ordering::Relaxed)
                    && pick(a.activity.version.load(Ordering::Relaxed))
            })
            .map(|(id, a)| (id.clone(), a.tx.clone()))
            .collect()
    }

    /// Where device `id` is in its lifecycle, as its actor last recorded it, without asking
    /// (or waking) it: no actor or no instance is passivated.
    pub fn status(&self, id: &str) -> crate::view::DeviceStatus {
        self.status_and_quarantine(id).0
    }

    /// [`Router::status`] and, while quarantined, why and for how long (from the actor's
    /// shared activity: no message to the actor, which may be busy). One read of both, so
    /// a listing never shows a reason beside another status.
    pub fn status_and_quarantine(
        &self,
        id: &str,
    ) -> (
        crate::view::DeviceStatus,
        Option<crate::view::QuarantineView>,
    ) {
        use crate::view::{DeviceStatus, QuarantineView};
        let actors = self.actors.read();
        let Some(a) = actors.get(id) else {
            return (DeviceStatus::Passivated, None);
        };
        let until = a.activity.quarantined_until_ms.load(Ordering::Acquire);
        let now = crate::clock::mono_ms(std::time::Instant::now());
        if until > now {
            // The cause is set before the end time is stored (release), so it is there
            // unless a resume is clearing both right now.
            let view = a
                .activity
                .quarantine_cause
                .lock()
                .as_ref()
                .map(|c| QuarantineView {
                    failures: c.failures,
                    last_error: c.last_error.clone(),
                    ends_in_ms: until - now,
                });
            (DeviceStatus::Quarantined, view)
        } else if a.activity.live.load(Ordering::Relaxed) {
            (DeviceStatus::Active, None)
        } else {
            (DeviceStatus::Passivated, None)
        }
    }

    /// The ids of the devices quarantined now whose version (the one they run, or will run at
    /// activation) satisfies `pick` (a deploy's devices left behind).
    pub fn quarantined_where(&self, pick: impl Fn(u32) -> bool) -> Vec<Arc<str>> {
        let now = crate::clock::mono_ms(std::time::Instant::now());
        self.actors
            .read()
            .iter()
            .filter(|(_, a)| {
                a.activity.quarantined_until_ms.load(Ordering::Relaxed) > now
                    && pick(a.activity.version.load(Ordering::Relaxed))
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The ids of the devices quarantined now, in byte order. Only actors can be (a
    /// quarantined actor is not retired), so this walks the actors, not the fleet.
    pub fn quarantined(&self) -> Vec<String> {
        let now = crate::clock::mono_ms(std::time::Instant::now());
        let mut ids: Vec<String> = self
            .actors
            .read()
            .iter()
            .filter(|(_, a)| a.activity.quarantined_until_ms.load(Ordering::Relaxed) > now)
            .map(|(id, _)| id.to_string())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Number of devices with an actor (a task and mailbox; its instance may be passivated).
    pub fn actors(&self) -> usize {
        self.actors.read().len()
    }

    /// Stops taking messages, closes every mailbox and waits until each actor has handled
    /// what was already in it and taken its final snapshot, until `deadline` if there is one.
    /// Returns how many actors there were, and how many were still stopping at the deadline.
    ///
    /// Those are left to the actor threads' own stop (`ActorPool`'s drop cancels them at
    /// their next await). Nothing acknowledged is at stake: an event is answered only once
    /// durable. What they give up is their final snapshot, a saving for the next start (it
    /// replays a longer tail), which a guest whose snapshots spin to their time budget would
    /// otherwise make cost a budget per device, one after another.
    pub async fn shutdown(&self, deadline: Option<tokio::time::Instant>) -> (usize, usize) {
        self.env.closing.store(true, Ordering::Release);
        let actors: Vec<ActorHandle> = self.actors.write().drain().map(|(_, a)| a).collect();
        let n = actors.len();
        // Every mailbox closed at once: the actors stop side by side, not one after another.
        let tasks: Vec<_> = actors.into_iter().map(ActorHandle::close).collect();
        let mut stopped = 0;
        let all = async {
            for task in tasks {
                ActorHandle::stopped(task).await;
                stopped += 1;
            }
        };
        match deadline {
            Some(deadline) => {
                let _ = tokio::time::timeout_at(deadline, all).await;
            }
            None => all.await,
        }
        (n, n - stopped)
    }

    /// The live actors whose activity passes `keep`, least recently used first, each with
    /// its grown memory, a sender and its activity: the victims of the sweeps below, which
    /// count those already asked to passivate (see [`Activity::ask_to_passivate`]) as
    /// passivating rather than ask them again.
    fn least_recently_used(
        &self,
        keep: impl Fn(&Activity) -> bool,
    ) -> Vec<(u64, mpsc::Sender<Message>, Arc<Activity>)> {
        let mut live: Vec<(u64, u64, mpsc::Sender<Message>, Arc<Activity>)> = self
            .actors
            .read()
            .values()
            .filter(|a| a.activity.live.load(Ordering::Relaxed) && keep(&a.activity))
            .map(|a| {
                (
                    a.activity.last_used.load(Ordering::Relaxed),
                    a.activity.grown_memory.load(Ordering::Relaxed),
                    a.tx.clone(),
                    a.activity.clone(),
                )
            })
            .collect();
        live.sort_unstable_by_key(|c| c.0);
        live.into_iter()
            .map(|(_, memory, tx, activity)| (memory, tx, activity))
            .collect()
    }

    /// The guest memory budget refused a growth (the engine's refusal hook calls this, see
    /// `Runtime`'s construction): asks the least recently used live actors that hold some of
    /// it to passivate, until what they give back brings it to half taken (the margin keeps a
    /// fleet near the budget from sweeping at every growth). One sweep at a time. Instances
    /// are a cache of the journal, so this is the live cap's eviction, by memory.
    pub(crate) fn relieve_memory(self: Arc<Self>) {
        if self.relieving.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = self.env.pool.clone();
        pool.spawn(async move {
            let (grown, budget) = self.env.registry.engine().guest_memory();
            let need = grown.saturating_sub(budget / 2);
            let (mut freed, mut asked) = (0u64, 0usize);
            for (memory, tx, activity) in self.least_recently_used(|a| a.grown_memory.load(Ordering::Relaxed) > 0) {
                if freed >= need {
                    break;
                }
                if activity.passivation_asked.load(Ordering::Acquire) {
                    // Asked by an earlier sweep: what it holds is as good as freed.
                    freed += memory;
                } else if activity.ask_to_passivate(&tx) {
                    freed += memory;
                    asked += 1;
                }
            }
            if asked > 0 {
                tracing::info!(
                    grown,
                    budget,
                    passivating = asked,
                    freeing = freed,
                    "guest memory budget refused a growth: passivating least recently used instances that hold memory"
                );
            }
            self.relieving.store(false, Ordering::Release);
        });
    }

    /// Asks the least recently used live actors to passivate until the slots of the cap in
    /// use, with the activations waiting for one counted in, are 10% under the cap (at least
    /// one under: the margin keeps a busy runtime from sweeping on every activation).
    ///
    /// At most one sweep every [`SWEEP_GAP`]: one asked for sooner runs when the gap ends.
    /// Each sweep walks every actor (live or not) for the least recently used live ones, and
    /// a burst of cold activations waiting for slots asks for one each, again every 50 ms
    /// (`live_slots`): with the cap at 50 and 4,096 senders waking 20,000 devices, sweeps
    /// ran back to back and the process spent 260-370 µs of CPU per event (`cargo bench
    /// --bench cap`).
    fn evict_lru(self: Arc<Self>) {
        let now = self.born.elapsed().as_micros() as u64;
        let since = now.saturating_sub(self.last_sweep_us.load(Ordering::Relaxed));
        if since < SWEEP_GAP.as_micros() as u64 {
            if !self.sweep_due.swap(true, Ordering::AcqRel) {
                let wait = SWEEP_GAP.saturating_sub(std::time::Duration::from_micros(since));
                let pool = self.env.pool.clone();
                pool.spawn(async move {
                    tokio::time::sleep(wait).await;
                    self.sweep_due.store(false, Ordering::Release);
                    self.evict_lru();
                });
            }
            return;
        }
        if self.evicting.swap(true, Ordering::AcqRel) {
            return;
        }
        self.last_sweep_us.store(now, Ordering::Relaxed);
        let pool = self.env.pool.clone();
        pool.spawn(async move {
            let cap = self.env.config.max_live as u64;
            let target = cap - (cap / 10).max(1);
            let live = self.env.live_slots.demand() as u64;
            if live > target {
                let excess = (live - target) as usize;
                tracing::debug!(live, cap, excess, "passivating least recently used devices");
                let candidates = self.least_recently_used(|_| true);
                let asked = |a: &Activity| a.passivation_asked.load(Ordering::Acquire);
                // Those an earlier sweep asked are on their way out: they count.
                let pending = candidates.iter().filter(|c| asked(&c.2)).count();
                let victims = candidates.into_iter().filter(|c| !asked(&c.2));
                for (_, tx, activity) in victims.take(excess.saturating_sub(pending)) {
                    activity.ask_to_passivate(&tx);
                }
            }
            self.evicting.store(false, Ordering::Release);
        });
    }
}

impl Directory for Router {
    fn retire(&self, id: &str, rx: &mpsc::Receiver<Message>) -> bool {
        let mut actors = self.actors.write();
        if !rx.is_empty() || rx.sender_strong_count() > 1 {
            return false;
        }
        actors.remove(id).is_some()
    }

    fn over_capacity(&self) {
        if let Some(me) = self.me.upgrade() {
            me.evict_lru();
        }
    }

    fn quarantine_left(&self, id: &str) -> Option<std::time::Duration> {
        let until = self
            .actors
            .read()
            .get(id)?
            .activity
            .quarantined_until_ms
            .load(Ordering::Acquire);
        let now = crate::clock::mono_ms(std::time::Instant::now());
        (until > now).then(|| std::time::Duration::from_millis(until - now))
    }
}
