//! Effects after commit: messages into other devices' mailboxes, timers into the wheel,
//! commands to their outbox's watchers.
//!
//! An actor never carries out an effect itself. When a record with effects is durable, the
//! writer thread hands a [`Durable`] to the one dispatcher task (an unbounded send, so the
//! writer never waits), which takes them in commit order:
//!
//! * a `Send` becomes a [`Message::Internal`] in the target's mailbox (activating it). A full
//!   mailbox does not drop it and does not hold the dispatcher: the [`Postman`] parks the
//!   target's messages in a queue of their own, drained by a task that waits for room, and
//!   everything later for that target queues behind them. So messages from one sender
//!   arrive in the order they were sent, one slow device delays nobody else, and since no
//!   actor ever waits on another's mailbox, full mailboxes cannot deadlock. What is parked
//!   is bounded for the whole process (`ActorConfig::max_parked_bytes`): past it, a message
//!   for a target with a full mailbox is *spilled*, left to the journal that owes it (see
//!   below), and so is every later one for that target; a redelivery a second later hands
//!   their ids to the target's drain task, which reads each back from its record when there
//!   is room, in each sender's order;
//! * a target that does not exist makes the message *undeliverable*: recorded (kind 10) and
//!   listed with the sender's dead letters;
//! * a record that set, cancelled or fired a timer makes the [`TimerWheel`] re-read that
//!   device's timers from the journal's index;
//! * a `Command` wakes whoever long-polls the device's outbox ([`Outbox`]).
//!
//! # At least once, exactly once in effect
//!
//! What is still owed is in the journal's index (see `journal/effects.rs`): a message stays
//! owed until the target's record that handled it is durable. At start, before anything
//! else, the dispatcher arms every pending timer and re-sends every owed message, in order,
//! from the records themselves (with their original ids): a crash between a commit and its
//! dispatch loses nothing. The target drops a message it already handled (see the actor's
//! `message_owed`), so redelivery never runs an event twice. Replay folds transitions only
//! and dispatches nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::actor::{Durable, InternalEvent, Message};
use crate::clock;
use crate::error::Error;
use crate::journal::{Effect, EffectId, Journal, Origin};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::router::{Refused, Router};
use crate::timers::TimerWheel;

/// Puts internal events into mailboxes without losing them or blocking (see the module
/// docs).
pub struct Postman {
    router: Weak<Router>,
    journal: Journal,
    metrics: Arc<Metrics>,
    pool: tokio::runtime::Handle,
    /// Targets whose mailbox was full: their messages, in order, for the task draining
    /// them; and those whose messages are spilled.
    parked: Mutex<Parked>,
    /// Bytes `parked` may hold before messages are spilled instead.
    max_parked_bytes: usize,
    /// Devices waiting for a redelivery of what is owed to them, and when it is due (see
    /// `redeliver_later`).
    redeliveries: Mutex<HashMap<Arc<str>, std::time::Instant>>,
    me: Weak<Postman>,
}

impl Postman {
    pub fn new(
        router: Weak<Router>,
        journal: Journal,
        metrics: Arc<Metrics>,
        pool: tokio::runtime::Handle,
        max_parked_bytes: usize,
    ) -> Arc<Postman> {
        Arc::new_cyclic(|me| Postman {
            router,
            journal,
            metrics,
            pool,
            parked: Mutex::default(),
            max_parked_bytes,
            redeliveries: Mutex::new(HashMap::new()),
            me: me.clone(),
        })
    }

    /// Sends message `id` of device `sender` (number `num`) to `to`.
    pub fn send(&self, sender: &Arc<str>, num: u32, id: EffectId, to: &str, event: String) {
        self.post(to, message(sender, num, id, event));
    }

    /// The event of message `id` of device `sender` (number `num`), read from its record;
    /// `None` (logged) if the record cannot be read or holds no such message.
    fn read_owed(&self, sender: &str, num: u32, id: EffectId) -> Option<String> {
        match self.journal.read_events(num, id.seq, id.seq) {
            Ok(mut r) => sent_event(&r.pop()?, id).map(str::to_owned),
            Err(e) => {
                tracing::warn!(device = %sender, seq = id.seq, error = %e, "cannot read a record with owed messages; they stay owed");
                None
            }
        }
    }

    /// Sends again messages of device `sender` (number `num`) that are still owed, in id
    /// order, each read from its record; returns how many.
    pub fn resend(&self, sender: &Arc<str>, num: u32, mut owed: Vec<(EffectId, String)>) -> usize {
        owed.sort();
        let mut sent = 0;
        let mut i = 0;
        while i < owed.len() {
            let seq = owed[i].0.seq;
            let record = match self.journal.read_events(num, seq, seq) {
                Ok(mut r) => r.pop(),
                Err(e) => {
                    tracing::warn!(device = %sender, seq, error = %e, "cannot read a record with owed messages; they stay owed");
                    None
                }
            };
            while i < owed.len() && owed[i].0.seq == seq {
                let (id, to) = &owed[i];
                if let Some(event) = record.as_ref().and_then(|r| sent_event(r, *id)) {
                    self.send(sender, num, *id, to, event.to_owned());
                    sent += 1;
                }
                i += 1;
            }
        }
        sent
    }

    /// After `after`, sends again every message still owed to device `to` (one that was
    /// not handled: it timed out, the device was quarantined, a commit failed), in each
    /// sender's order. Finding them scans the index, so requests are gathered: due times are
    /// rounded up to a whole second, a request for a device already waiting for an earlier
    /// one is merged into it, and one scan serves every device due by then.
    pub fn redeliver_later(&self, to: Arc<str>, after: std::time::Duration) {
        let after = std::time::Duration::from_secs(after.as_millis().div_ceil(1000) as u64);
        let due = std::time::Instant::now() + after;
        {
            let mut waiting = self.redeliveries.lock();
            if waiting.get(&to).is_some_and(|at| *at <= due) {
                return;
            }
            waiting.insert(to, due);
        }
        let Some(me) = self.me.upgrade() else {
            return;
        };
        self.pool.spawn(async move {
            tokio::time::sleep(after).await;
            let now = std::time::Instant::now();
            let targets: std::collections::HashSet<Arc<str>> = {
                let mut waiting = me.redeliveries.lock();
                let due: Vec<Arc<str>> = waiting
                    .iter()
                    .filter(|(_, at)| **at <= now)
                    .map(|(to, _)| to.clone())
                    .collect();
                for to in &due {
                    waiting.remove(to);
                }
                due.into_iter().collect()
            };
            if targets.is_empty() {
                return;
            }
            // A spilled target's owed messages go to its drain task as ids, each read from its
            // record when there is room for it: sent again as messages, they would only spill
            // again while its mailbox is full. Under the lock, so that its drain cannot end
            // meanwhile and let later messages past them.
            let owed = {
                let mut parked = me.parked.lock();
                let spilled: Vec<Arc<str>> = targets
                    .iter()
                    .filter(|to| parked.spilled.contains(&***to))
                    .cloned()
                    .collect();
                for to in &spilled {
                    parked.again.remove(&**to);
                }
                let mut owed = me.journal.owed_to_any(&targets);
                let mut lists: HashMap<Arc<str>, OwedIds> = HashMap::new();
                owed.retain(|(sender, num, id, to)| {
                    if !parked.spilled.contains(&**to) {
                        return true;
                    }
                    lists
                        .entry(to.clone())
                        .or_default()
                        .push_back((sender.clone(), *num, *id));
                    false
                });
                for to in spilled {
                    let list = lists.remove(&to).unwrap_or_default();
                    parked.from_journal.insert(to.to_string(), list);
                    if !parked.queues.contains_key(&*to) {
                        parked.queues.insert(to.to_string(), VecDeque::new());
                        let me = me.clone();
                        me.pool
                            .clone()
                            .spawn(async move { me.drain(to.to_string()).await });
                    }
                }
                owed
            };
            let mut sent = 0;
            for chunk in owed.chunk_by(|a, b| a.1 == b.1) {
                let (sender, num) = (chunk[0].0.clone(), chunk[0].1);
                let ids = chunk
                    .iter()
                    .map(|(_, _, id, to)| (*id, to.to_string()))
                    .collect();
                sent += me.resend(&sender, num, ids);
            }
            if sent > 0 {
                tracing::info!(
                    devices = targets.len(),
                    messages = sent,
                    "messages not handled sent again"
                );
            }
        });
    }

    /// Puts `msg` into device `to`'s mailbox, after anything parked for it (a message to
    /// an unknown device is recorded as undeliverable).
    pub fn post(&self, to: &str, msg: Message) {
        let mut parked = self.parked.lock();
        let spillable = sent_by(&msg).is_some();
        if spillable && parked.spilled.contains(to) {
            // Its drain reads the owed ones from the journal; this one is owed too, and the
            // redelivery it asks for hands it over (see `redeliver_later`).
            parked.again.insert(to.to_string());
            drop(parked);
            return self.spill(to);
        }
        if parked.queues.contains_key(to) {
            if spillable && parked.bytes + cost(&msg) > self.max_parked_bytes {
                return self.spill_from(parked, to);
            }
            parked.push(to, msg);
            self.gauge(&parked);
            return;
        }
        let Some(router) = self.router.upgrade() else {
            return;
        };
        let counter = self.counter_of(&msg);
        match router.offer(to, msg).map_err(|r| *r) {
            Ok(()) => Self::count(counter),
            Err(Refused::Full(msg)) => {
                if spillable && parked.bytes + cost(&msg) > self.max_parked_bytes {
                    return self.spill_from(parked, to);
                }
                parked.push(to, msg);
                self.gauge(&parked);
                if let Some(me) = self.me.upgrade() {
                    let to = to.to_string();
                    self.pool.spawn(async move { me.drain(to).await });
                }
            }
            Err(Refused::Error(e, msg)) => {
                drop(parked);
                self.undeliverable(to, msg, e);
            }
        }
    }

    /// Marks `to` spilled (its messages left to the journal until a redelivery), then
    /// spills the message at hand.
    fn spill_from(&self, mut parked: parking_lot::MutexGuard<'_, Parked>, to: &str) {
        parked.again.insert(to.to_string());
        if parked.spilled.insert(to.to_string())
            && let Some(targets) = parked.spill_log.due()
        {
            tracing::info!(
                targets,
                parked_bytes = parked.bytes,
                "messages for devices with a full mailbox past the parking bound: left in the journal, sent again in a second"
            );
        }
        drop(parked);
        self.spill(to);
    }

    fn gauge(&self, parked: &Parked) {
        self.metrics
            .messages_parked_bytes
            .store(parked.bytes as u64, Ordering::Relaxed);
    }

    /// A message for spilled target `to`: still owed in the journal; a redelivery reads it
    /// back from its record.
    fn spill(&self, to: &str) {
        self.metrics
            .messages_spilled
            .fetch_add(1, Ordering::Relaxed);
        self.redeliver_later(Arc::from(to), SPILL_RETRY);
    }

    /// Delivers what is parked for `to`, oldest first, then, if it is spilled, what a
    /// redelivery found owed to it, each read from its record (see `redeliver_later`),
    /// waiting for room each time; ends when nothing is left. Later messages then go straight
    /// to the mailbox again, unless some spilled meanwhile: those wait for the redelivery
    /// they asked for, which starts a drain again.
    async fn drain(self: Arc<Self>, to: String) {
        loop {
            let next = {
                let mut parked = self.parked.lock();
                let msg = parked.pop(&to);
                self.gauge(&parked);
                match msg {
                    Some(msg) => Ok(msg),
                    None => match parked
                        .from_journal
                        .get_mut(&to)
                        .and_then(VecDeque::pop_front)
                    {
                        Some(owed) => Err(owed),
                        None => {
                            parked.from_journal.remove(&to);
                            if !parked.again.contains(&to) {
                                parked.spilled.remove(&to);
                            }
                            parked.forget(&to);
                            return;
                        }
                    },
                }
            };
            let msg = match next {
                Ok(msg) => msg,
                Err((sender, num, id)) => {
                    // Handled meanwhile (a copy was already in its mailbox): not read again.
                    if !self.journal.message_owed(num, id, &to) {
                        continue;
                    }
                    match self.read_owed(&sender, num, id) {
                        Some(event) => message(&sender, num, id, event),
                        None => continue,
                    }
                }
            };
            let Some(router) = self.router.upgrade() else {
                return;
            };
            let counter = self.counter_of(&msg);
            match router.deliver_waiting(&to, msg).await.map_err(|r| *r) {
                Ok(()) => Self::count(counter),
                Err(Refused::Full(_)) => {}
                Err(Refused::Error(Error::ShuttingDown, _)) => {
                    // Still owed in the journal: the next start sends it again.
                    let mut parked = self.parked.lock();
                    parked.forget(&to);
                    parked.unspill(&to);
                    self.gauge(&parked);
                    return;
                }
                Err(Refused::Error(e, msg)) => self.undeliverable(&to, msg, e),
            }
        }
    }

    /// What counts `msg` once it is in its target's mailbox (not before: one that turns out
    /// undeliverable, or is dropped with a removed device's timers, was never delivered).
    fn counter_of(&self, msg: &Message) -> Option<&AtomicU64> {
        match msg {
            Message::Internal(internal) => match internal.origin {
                Origin::Message { .. } => Some(&self.metrics.messages_delivered),
                Origin::Timer { .. } => Some(&self.metrics.timers_fired),
                Origin::External => None,
            },
            _ => None,
        }
    }

    fn count(counter: Option<&AtomicU64>) {
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `msg` could not be put into `to`'s mailbox for reason `e`.
    fn undeliverable(&self, to: &str, msg: Message, e: Error) {
        if !matches!(e, Error::UnknownDevice(_) | Error::InvalidId(_)) {
            // Shutting down: still owed, sent again at the next start.
            return;
        }
        if self.journal.device(to).is_some() {
            // Refused while being removed: if the removal fails, the device stays and this
            // message or timer firing is still owed to it. Try again in a moment.
            if let Some(me) = self.me.upgrade() {
                let to = to.to_string();
                self.pool.spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    me.post(&to, msg);
                });
            }
            return;
        }
        let Some((sender, num, id)) = sent_by(&msg) else {
            // A timer of a device removed meanwhile: nothing owed.
            return;
        };
        let (journal, metrics) = (self.journal.clone(), self.metrics.clone());
        let to = to.to_string();
        self.pool.spawn(async move {
            match journal
                .record_undeliverable(num, id, &to, "no such device", clock::now_ms())
                .await
            {
                // Counted once per dead letter: a message a removal settled already, or whose
                // sender is gone, is not one.
                Ok(true) => {
                    metrics.messages_undeliverable.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(sender = %sender, to, seq = id.seq, index = id.index, "message undeliverable: no such device");
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(sender = %sender, to, error = %e, "recording an undeliverable message failed; it is retried at the next start");
                }
            }
        });
    }
}

/// How long a spilled target waits before its owed messages are read back from the journal
/// (rounded as [`Postman::redeliver_later`] does; one index scan serves every target due).
const SPILL_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Bytes a parked message is counted as: its event and sender, and ~128 for the message, its
/// box and its place in the queue.
fn cost(msg: &Message) -> usize {
    const OVERHEAD: usize = 128;
    match msg {
        Message::Internal(internal) => {
            let event = internal.event.as_ref().map_or(0, String::len);
            let sender = match &internal.origin {
                Origin::Message { sender, .. } => sender.len(),
                _ => 0,
            };
            OVERHEAD + event + sender
        }
        _ => OVERHEAD,
    }
}

/// Messages owed to one target, by sender (id, number) and message id, oldest first.
type OwedIds = VecDeque<(Arc<str>, u32, EffectId)>;

/// What the [`Postman`] holds for targets whose mailbox was full.
#[derive(Default)]
struct Parked {
    /// Each such target's messages, oldest first.
    queues: HashMap<String, VecDeque<Message>>,
    /// What `queues` holds, counted by [`cost`].
    bytes: usize,
    /// Targets whose messages are spilled: left in the journal, for their drain to read back
    /// (see [`Postman::drain`]).
    spilled: std::collections::HashSet<String>,
    /// Spilled targets with a message spilled since their last redelivery's scan: their
    /// drain, once done, leaves them spilled for the next.
    again: std::collections::HashSet<String>,
    /// What a redelivery's scan found owed to each spilled target, by sender, seq and
    /// index, for its drain to read and deliver.
    from_journal: HashMap<String, OwedIds>,
    /// Targets newly spilled, logged at most once a second.
    spill_log: crate::log_limit::LogLimit,
}

impl Parked {
    fn push(&mut self, to: &str, msg: Message) {
        self.bytes += cost(&msg);
        match self.queues.get_mut(to) {
            Some(queue) => queue.push_back(msg),
            None => {
                self.queues.insert(to.to_string(), VecDeque::from([msg]));
            }
        }
    }

    fn pop(&mut self, to: &str) -> Option<Message> {
        let msg = self.queues.get_mut(to)?.pop_front()?;
        self.bytes -= cost(&msg);
        Some(msg)
    }

    /// Forgets that `to` is spilled, and what was to be read back for it (all still owed in
    /// the journal).
    fn unspill(&mut self, to: &str) {
        self.from_journal.remove(to);
        self.spilled.remove(to);
        self.again.remove(to);
    }

    /// Drops `to`'s queue (its messages stay owed in the journal).
    fn forget(&mut self, to: &str) {
        if let Some(queue) = self.queues.remove(to) {
            self.bytes -= queue.iter().map(cost).sum::<usize>();
        }
    }
}

/// Makes the wheel's entry of device `num` what the journal's index says is pending.
fn sync_timers(journal: &Journal, timers: &TimerWheel, num: u32) {
    let pending = journal
        .device_fx(num)
        .map(|fx| fx.timers)
        .unwrap_or_default();
    timers.sync(num, &pending);
}

/// The event of message `id` in its sender's `record`, if it holds one there.
fn sent_event(record: &crate::journal::EventRecord, id: EffectId) -> Option<&str> {
    match record.fx.as_ref()?.effects.get(id.index as usize)? {
        Effect::Send { event, .. } => Some(event),
        _ => None,
    }
}

/// Message `id` of device `sender` (number `num`), as it goes into its target's mailbox.
fn message(sender: &str, num: u32, id: EffectId, event: String) -> Message {
    Message::Internal(Box::new(InternalEvent {
        event: Some(event),
        origin: Origin::Message {
            sender: sender.to_string(),
            num,
            id,
        },
    }))
}

/// Who sent `msg` (id, device number) and its id, if it is a message.
fn sent_by(msg: &Message) -> Option<(String, u32, EffectId)> {
    match msg {
        Message::Internal(internal) => match &internal.origin {
            Origin::Message { sender, num, id } => Some((sender.clone(), *num, *id)),
            _ => None,
        },
        _ => None,
    }
}

/// The dispatcher task's state. See the module docs.
pub struct Dispatcher {
    journal: Journal,
    postman: Arc<Postman>,
    timers: Arc<TimerWheel>,
    outbox: Arc<Outbox>,
}

impl Dispatcher {
    pub fn new(
        journal: Journal,
        postman: Arc<Postman>,
        timers: Arc<TimerWheel>,
        outbox: Arc<Outbox>,
    ) -> Dispatcher {
        Dispatcher {
            journal,
            postman,
            timers,
            outbox,
        }
    }

    /// Arms what the journal says is pending, then carries out each durable record's
    /// effects as it comes.
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<Durable>) {
        self.resume();
        while let Some(durable) = rx.recv().await {
            self.dispatch(durable);
        }
    }

    /// At start: every pending timer into the wheel, every owed message sent again in
    /// (sender, seq, index) order, from its record.
    fn resume(&self) {
        let schedule = self.journal.timer_schedule();
        let timers = schedule.len();
        self.timers.place_all(schedule);
        let mut messages = 0usize;
        for (device, num, owed) in self.journal.owed_messages() {
            messages += self.postman.resend(&device, num, owed);
        }
        if timers + messages > 0 {
            tracing::info!(
                timers,
                messages,
                "effects owed at start: devices with timers armed, messages sent again"
            );
        }
    }

    fn dispatch(&self, d: Durable) {
        let mut commands = 0u64;
        for (index, effect) in d.effects.iter().enumerate() {
            let id = EffectId {
                seq: d.seq,
                index: index as u32,
            };
            match effect {
                Effect::Send { to, event } => {
                    self.postman.send(&d.device, d.num, id, to, event.clone())
                }
                Effect::Command { .. } => commands += 1,
                Effect::SetTimer { .. } | Effect::CancelTimer { .. } => {}
            }
        }
        if commands > 0 {
            self.postman
                .metrics
                .commands_issued
                .fetch_add(commands, std::sync::atomic::Ordering::Relaxed);
            self.outbox.notify(&d.device);
        }
        if let Some(after) = d.redeliver {
            self.postman.redeliver_later(d.device.clone(), after);
        }
        if d.retry {
            let (journal, timers) = (self.journal.clone(), self.timers.clone());
            tokio::spawn(async move {
                tokio::time::sleep(crate::actor::INTERNAL_RETRY).await;
                sync_timers(&journal, &timers, d.num);
            });
        } else if d.timers_changed {
            sync_timers(&self.journal, &self.timers, d.num);
        }
    }
}
