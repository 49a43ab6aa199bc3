//! Effects on the device's side: internal events (messages from other devices, timer
//! firings) checked against the journal before they are handled, and the outbox and
//! backpressure caps an event's commands and messages must pass.

use super::*;

/// Commands and messages issued by a device's events whose records are on their way to disk.
/// The journal's index counts what a device owes once a record is durable, and events are
/// pipelined: each of the events in flight would pass the outbox and backpressure caps
/// against a count the ones before it had not moved yet (a review drove 10 commands past a
/// cap of 5 that way, and 28 with `drover sim`). So the caps count these too; the writer
/// folds a record into the index before it runs the record's callback, which takes its
/// effects off here, so nothing is ever counted in neither place.
#[derive(Default)]
pub(super) struct EffectsInFlight {
    pub(super) commands: AtomicUsize,
    pub(super) sends: AtomicUsize,
}

impl EffectsInFlight {
    pub(super) fn commands(this: &Option<Arc<EffectsInFlight>>) -> usize {
        this.as_ref()
            .map_or(0, |f| f.commands.load(Ordering::Acquire))
    }

    pub(super) fn sends(this: &Option<Arc<EffectsInFlight>>) -> usize {
        this.as_ref().map_or(0, |f| f.sends.load(Ordering::Acquire))
    }
}

/// How many commands or messages a device still owes, by `count`, when it may owe any:
/// `flag` says whether it issued some (unknown until the first look). `None` while it owes
/// none, and then the flag goes down until the device issues some again, so devices that
/// never command or send pay nothing per event.
pub(super) fn owing(flag: &mut Option<bool>, count: impl Fn() -> usize) -> Option<usize> {
    if *flag == Some(false) {
        return None;
    }
    let n = count();
    *flag = Some(n > 0);
    (n > 0).then_some(n)
}

impl Actor {
    /// Checks an internal event (see [`Message::Internal`]) against the journal, then
    /// handles it like an event.
    pub(super) async fn on_internal(&mut self, event: Option<String>, origin: Origin) {
        // With nothing in flight (or everything in flight failed), the journal alone says
        // what is owed: a message whose record failed is owed again.
        if !self.handled.is_empty() && (self.writer.is_idle() || self.writer.is_fenced()) {
            self.handled = Default::default();
        }
        // After a crash of this device's previous actor, its records may still be on their way
        // to disk: the checks below read the journal, so wait for them first.
        if self.must_sync {
            if self.env.journal.barrier().await.is_err() {
                self.internal_not_handled(&origin);
                return;
            }
            self.must_sync = false;
        }
        // A periodic timer's period, read with the check that it is still owed.
        let mut every_ms = None;
        let owed = match &origin {
            Origin::External => true,
            Origin::Message { num, id, .. } => match self.message_turn(*num, *id) {
                MessageTurn::Next => true,
                MessageTurn::NotOwed => false,
                MessageTurn::Behind(earlier) => {
                    // An earlier message of this sender was not handled and is on its way
                    // again (every drop asks for one); this one comes again after it.
                    tracing::debug!(device = %self.head.id, ?origin, ?earlier, "held back behind an earlier message of its sender");
                    self.internal_not_handled(&origin);
                    return;
                }
            },
            Origin::Timer {
                key, set, due_ms, ..
            } => match self.timer_owed(key, *set, *due_ms).await {
                Some(t) => {
                    every_ms = t.every_ms.map(NonZeroU64::get);
                    true
                }
                None => false,
            },
        };
        if !owed {
            self.env
                .metrics
                .internal_dropped
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(device = %self.head.id, ?origin, "dropped: already handled, or replaced");
            return;
        }
        let event = match (event, &origin) {
            (Some(event), _) => event,
            (None, Origin::Timer { key, set, .. }) => {
                match self.timer_event(*set) {
                    Ok(Some(event)) => event,
                    Ok(None) => {
                        // The device was removed meanwhile (its records are no longer
                        // indexed): nothing is owed.
                        tracing::debug!(device = %self.head.id, key, seq = set.seq, "timer's record gone; dropped");
                        return;
                    }
                    Err(e) => {
                        // Damaged: the read has already logged it and removed the index
                        // checkpoint, so the next start checks the whole journal. Until
                        // then the timer is tried again every few seconds.
                        tracing::warn!(device = %self.head.id, key, error = %e, "cannot read the event of a timer that fired; it fires again later");
                        self.internal_not_handled(&origin);
                        return;
                    }
                }
            }
            (None, _) => {
                tracing::error!(device = %self.head.id, ?origin, "an internal event without its event; dropped");
                return;
            }
        };
        let submitted = self
            .on_event(event, origin.clone(), every_ms, Instant::now(), None, 0)
            .await;
        match origin {
            // Handled (its record is on its way): a second copy in the mailbox is dropped.
            Origin::Message { num, id, .. } if submitted => {
                if self.handled.len() >= HANDLED_PRUNE {
                    let (journal, me) = (&self.env.journal, &self.head.id);
                    self.handled
                        .retain(|(sender, id)| journal.message_owed(*sender, *id, me));
                }
                self.handled.insert((num, id));
            }
            _ if !submitted => self.internal_not_handled(&origin),
            _ => {}
        }
    }

    /// A timer firing or a message ended without a record (the guest timed out on it, the
    /// device is quarantined or could not activate, ...): still owed in the journal, but no
    /// longer in the wheel or on its way. Ask for it to come again, after [`INTERNAL_RETRY`]
    /// (or when the quarantine ends) so an event that always fails does not spin. Every
    /// message owed to the device comes again then, in each sender's order; those already
    /// handled meanwhile are dropped on arrival.
    pub(super) fn internal_not_handled(&self, origin: &Origin) {
        let d = match origin {
            Origin::External => return,
            Origin::Timer { .. } => Durable::timer_retry(&self.head),
            Origin::Message { .. } => {
                let after = match &self.quarantine {
                    // As the quarantine ends, not up to `INTERNAL_RETRY` after: a message
                    // dropped late in it came ~5 s after the device took events again.
                    Some(q) => q
                        .until
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                    None => INTERNAL_RETRY,
                };
                Durable::redeliver(&self.head, after)
            }
        };
        let _ = self.env.dispatch.send(d);
    }

    /// Refuses an event from outside while the device's outbox is at its cap, counting the
    /// commands of its events in flight (see [`EffectsInFlight`]).
    pub(super) fn outbox_room(&mut self) -> Result<(), Error> {
        let journal = &self.env.journal;
        let num = self.head.num;
        let in_flight = EffectsInFlight::commands(&self.in_flight);
        let Some(pending) = owing(&mut self.commands, || journal.outbox_len(num) + in_flight)
        else {
            return Ok(());
        };
        let limit = self.env.config.max_outbox;
        if pending >= limit {
            // Expired commands leave at a read of the outbox: look again after one.
            let pending = journal.outbox(num, clock::now_ms()).len() + in_flight;
            if pending >= limit {
                return Err(Error::OutboxFull { pending, limit });
            }
        }
        Ok(())
    }

    /// The event of the timer set by effect `set`, read from the record that set it. A
    /// record that set several timers (which often fall due together) is kept until another
    /// is read, so it is decoded once, not once per timer.
    pub(super) fn timer_event(&mut self, set: EffectId) -> Result<Option<String>, JournalError> {
        if let Some((seq, fx)) = &self.timer_record
            && *seq == set.seq
        {
            return Ok(fx.timer_event(set.index).map(str::to_owned));
        }
        let fx = self.env.journal.record_fx(self.head.num, set.seq)?;
        let event = fx
            .as_ref()
            .and_then(|fx| fx.timer_event(set.index))
            .map(str::to_owned);
        self.timer_record = fx
            .filter(|fx| {
                fx.effects
                    .iter()
                    .filter(|e| matches!(e, Effect::SetTimer { .. }))
                    .count()
                    > 1
            })
            .map(|fx| (set.seq, fx));
        Ok(event)
    }

    /// Refuses an event from outside while this device has sent messages that their targets
    /// have not handled, at the cap: backpressure from a target that falls behind (or is
    /// quarantined) to what feeds it. The messages of its events in flight count too (see
    /// [`EffectsInFlight`]).
    pub(super) fn sent_room(&mut self) -> Result<(), Error> {
        let journal = &self.env.journal;
        let num = self.head.num;
        let in_flight = EffectsInFlight::sends(&self.in_flight);
        let Some(pending) = owing(&mut self.sends, || journal.sent_len(num) + in_flight) else {
            return Ok(());
        };
        let limit = self.env.config.max_messages_pending;
        if pending >= limit {
            // Named, with its quarantine if that is what holds it: before, the sender's
            // client had to find which device was behind on its own.
            let behind = journal.most_owed_target(num).map(|(target, owed)| {
                let quarantined_for = self
                    .env
                    .directory
                    .upgrade()
                    .and_then(|d| d.quarantine_left(&target));
                Box::new(crate::error::Behind {
                    target: target.to_string(),
                    owed,
                    quarantined_for,
                })
            });
            return Err(Error::MessagesPending {
                pending,
                limit,
                behind,
            });
        }
        Ok(())
    }

    /// Whether message `id` of `sender` is still owed to this device (the sender's journal
    /// still lists it as undelivered, and this incarnation has not handled it: its record
    /// may still be on its way to disk), and whether it is its turn (every earlier message
    /// of that sender to this device is handled). A message that was not handled comes
    /// again with every later one of its sender, so `handled` is a set of ids, not the last
    /// one per sender.
    pub(super) fn message_turn(&self, sender: u32, id: EffectId) -> MessageTurn {
        if self.handled.contains(&(sender, id)) {
            return MessageTurn::NotOwed;
        }
        self.env
            .journal
            .message_turn(sender, id, &self.head.id, |earlier| {
                self.handled.contains(&(sender, earlier))
            })
    }

    /// Timer `key` if it is still set by effect `set` and due at `due_ms`: not cancelled,
    /// replaced or fired since. Waits for this device's records in flight first, since one of
    /// them may have changed it.
    pub(super) async fn timer_owed(
        &mut self,
        key: &str,
        set: EffectId,
        due_ms: u64,
    ) -> Option<TimerEntry> {
        if !self.writer.is_idle() {
            let (tx, rx) = oneshot::channel();
            self.writer.when_durable(Box::new(move |r| {
                let _ = tx.send(r);
            }));
            if !matches!(rx.await, Ok(Ok(()))) {
                // A record of this device failed: the timer is still pending, but out of the
                // wheel. Back in later (the actor rebuilds from the journal meanwhile).
                let _ = self.env.dispatch.send(Durable::timer_retry(&self.head));
                return None;
            }
        }
        self.env
            .journal
            .timer(self.head.num, key)
            .filter(|t| t.set() == set && t.due_ms == due_ms)
    }
}
