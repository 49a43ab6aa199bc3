//! Supervision of one device: failures counted in a row, quarantine with exponential,
//! jittered backoff, and the lifecycle status a read reports.
//!
//! Traps, timeouts and failed activations count toward a quarantine ([`QUARANTINE_AFTER`]
//! in a row); a success resets the count. A quarantined device fails its events fast without
//! running the guest, still answers reads of its last durable state (unless it is
//! quarantined for failing to activate at all), and comes back by itself when the quarantine
//! ends or at once when resumed (`Message::Resume`). An actor task that panics is rebuilt by
//! the router at the next message (see [`spawn`]). Internal events (messages, timer firings)
//! the guest timed out on are tried again, and consumed as dead letters after
//! [`TIMEOUTS_BEFORE_CONSUMED`] tries.

use super::*;

/// After this many consecutive fatal failures a device is quarantined: a plugin that traps
/// or spins on every event would otherwise spend a worker's time on each one (up to the call
/// timeout), which on a small machine is time taken from the whole fleet.
pub(super) const QUARANTINE_AFTER: u32 = 3;

/// First quarantine; each further failure right after one doubles it, up to the maximum.
pub(super) const QUARANTINE_FIRST: Duration = Duration::from_secs(5);

pub(super) const QUARANTINE_MAX: Duration = Duration::from_secs(300);

/// How long an idle actor with failures counted keeps its task (and so the counts) before
/// it may be retired: twice the longest quarantine, so every retry of a timer firing or
/// message and the end of any quarantine come while the counts are still there.
pub(super) const REMEMBER_FAILURES: Duration = Duration::from_secs(600);

/// A timeout is not deterministic (a loaded machine), so a message or timer firing the guest
/// timed out on is tried again; after this many timeouts it is consumed like one the guest
/// traps on (a record with no transitions and a dead letter `timeout`), or a message the
/// guest always spins on would hold back its sender's later messages to this device for
/// ever. Three tries span at least two `INTERNAL_RETRY` periods.
pub(super) const TIMEOUTS_BEFORE_CONSUMED: u32 = 3;

/// An internal event, as the timeout count knows it: a message by (sender, id), a timer
/// firing by (setting effect, due time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum InternalKey {
    Message(u32, EffectId),
    Timer(EffectId, u64),
}

impl InternalKey {
    pub(super) fn of(origin: &Origin) -> Option<InternalKey> {
        match origin {
            Origin::External => None,
            Origin::Message { num, id, .. } => Some(InternalKey::Message(*num, *id)),
            Origin::Timer { set, due_ms, .. } => Some(InternalKey::Timer(*set, *due_ms)),
        }
    }
}

/// A quarantine's length before and after jitter, after one whose length before jitter was
/// `previous` (none: the first since the device last recovered). Exponential, `QUARANTINE_FIRST`
/// doubled on each relapse up to `QUARANTINE_MAX`, with ±25% jitter (`jitter` in `[0, 1)`)
/// so devices that failed together (one bad plugin version) do not all come back in the same
/// instant. The jitter is applied to the length it returns only: doubled jittered lengths
/// compounded it, drifting a fourth quarantine to 53 s where the rule says 30-50 s.
pub(super) fn quarantine_length(previous: Option<Duration>, jitter: f64) -> (Duration, Duration) {
    let nominal = previous.map_or(QUARANTINE_FIRST, |p| (p * 2).min(QUARANTINE_MAX));
    (nominal, nominal.mul_f64(0.75 + 0.5 * jitter))
}

/// A device sitting out a quarantine.
pub(super) struct Quarantine {
    pub(super) until: Instant,
    /// Its length before jitter: the next one is twice it (see [`quarantine_length`]).
    pub(super) nominal: Duration,
    /// The last failure was an activation: reads answer at once instead of trying it again
    /// (each try may hold a thread for the whole activation budget, and fails the same way).
    pub(super) activation: bool,
}

impl Actor {
    /// Whether a quarantine is under way (no error built: checked for every event).
    pub(super) fn in_quarantine(&self) -> bool {
        self.quarantine
            .as_ref()
            .is_some_and(|q| Instant::now() < q.until)
    }

    /// The error to answer events with while quarantined.
    pub(super) fn quarantined(&self) -> Option<Error> {
        let q = self.quarantine_view()?;
        Some(Error::Quarantined {
            failures: q.failures,
            last: q.last_error,
            retry_in_ms: q.ends_in_ms,
        })
    }

    /// Why the device is quarantined and for how long, while it is.
    pub(super) fn quarantine_view(&self) -> Option<QuarantineView> {
        let q = self.quarantine.as_ref()?;
        let now = Instant::now();
        (now < q.until).then(|| QuarantineView {
            failures: self.failures,
            // Set with the quarantine and cleared with it (`record_failure`, `recovered`).
            last_error: self
                .activity
                .quarantine_cause
                .lock()
                .as_ref()
                .map_or_else(String::new, |c| c.last_error.clone()),
            ends_in_ms: (q.until - now).as_millis() as u64,
        })
    }

    /// The error to answer a read with instead of activating: quarantined by failed
    /// activations and not live. (A device quarantined for failing events still activates
    /// for a read: its last durable state is readable.)
    pub(super) fn unreadable(&self) -> Option<Error> {
        let activation = self.quarantine.as_ref().is_some_and(|q| q.activation);
        if activation && self.live.is_none() {
            self.quarantined()
        } else {
            None
        }
    }

    /// The status a read reports.
    pub(super) fn status(&self) -> DeviceStatus {
        if self.in_quarantine() {
            DeviceStatus::Quarantined
        } else if self.live.is_some() {
            DeviceStatus::Active
        } else {
            DeviceStatus::Passivated
        }
    }

    /// Counts a fatal guest failure; enough in a row start (or lengthen) a quarantine. A
    /// success resets the count (in `on_event`).
    pub(super) fn record_failure(&mut self, e: &Error) {
        self.failures += 1;
        self.last_failure = Some(Instant::now());
        if self.failures >= QUARANTINE_AFTER {
            let (nominal, length) =
                quarantine_length(self.quarantine.as_ref().map(|q| q.nominal), clock::jitter());
            tracing::warn!(
                device = %self.head.id,
                failures = self.failures,
                seconds = length.as_secs_f64(),
                error = %e,
                "device quarantined"
            );
            let until = Instant::now() + length;
            self.quarantine = Some(Quarantine {
                until,
                nominal,
                activation: matches!(e, Error::Activation(_)),
            });
            *self.activity.quarantine_cause.lock() = Some(Box::new(QuarantineCause {
                failures: self.failures,
                last_error: e.to_string(),
            }));
            // Release: a listing that sees the end time sees the cause set before it. Rounded
            // up to the next millisecond: truncated, a listing would see the quarantine end
            // up to a millisecond before the actor does, and a read right after would still
            // answer `quarantined`.
            self.activity
                .quarantined_until_ms
                .store(clock::mono_ms(until) + 1, Ordering::Release);
        }
    }

    /// Whether retiring the task loses nothing supervision still needs: no failures counted
    /// (toward a quarantine, or toward consuming an internal event that timed out), or
    /// none for [`REMEMBER_FAILURES`], longer than any retry or quarantine takes to come.
    pub(super) fn forgets_nothing(&self) -> bool {
        (self.failures == 0 && self.timeouts.is_empty())
            || self
                .last_failure
                .is_some_and(|t| t.elapsed() > REMEMBER_FAILURES)
    }

    /// The device now runs another plugin version (a deploy or a rollback moved it, live or
    /// at its activation): failures under the version it left, and the doubling of their
    /// quarantines, say nothing of this one, so its count starts afresh, as a `resume` does.
    /// A deploy ends the quarantines under way itself; this also covers one that ran out
    /// before the deploy looked (its count and length stood, so one failure on the new
    /// version quarantined the device again, for twice as long), and failures that had not
    /// yet reached a quarantine.
    pub(super) fn moved_to_another_version(&mut self) {
        if self.failures == 0 && self.quarantine.is_none() {
            return;
        }
        if self.in_quarantine() {
            // Messages held back meanwhile come now, not at its planned end.
            let _ = self
                .env
                .dispatch
                .send(Durable::redeliver(&self.head, Duration::ZERO));
        }
        tracing::info!(device = %self.head.id, failures = self.failures, "failures counted under the plugin version left are forgotten");
        self.recovered();
    }

    pub(super) fn recovered(&mut self) {
        self.failures = 0;
        if self.quarantine.take().is_some() {
            self.activity
                .quarantined_until_ms
                .store(0, Ordering::Relaxed);
            *self.activity.quarantine_cause.lock() = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each quarantine is `QUARANTINE_FIRST` doubled per relapse, capped, within ±25%,
    /// whatever the jitter drew before: it does not compound.
    #[test]
    fn quarantine_lengths_double_with_a_jitter_that_does_not_compound() {
        for jitter in [0.0, 0.5, 0.999_999] {
            let mut previous = None;
            for relapse in 0..10 {
                let (nominal, length) = quarantine_length(previous, jitter);
                let rule = (QUARANTINE_FIRST * 2u32.pow(relapse)).min(QUARANTINE_MAX);
                assert_eq!(nominal, rule);
                assert!(
                    length >= rule.mul_f64(0.75) && length <= rule.mul_f64(1.25),
                    "relapse {relapse}, jitter {jitter}: {length:?} outside {rule:?} ±25%"
                );
                previous = Some(nominal);
            }
        }
    }
}
