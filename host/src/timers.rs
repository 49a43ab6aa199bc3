//! The timer wheel: every pending durable timer of the fleet, ordered by due time, and the one
//! task that fires them.
//!
//! Timers are durable because the journal says so: a timer is pending from the record whose
//! effect set it until the record of its firing (or of its cancellation or replacement) is
//! durable, and the journal's index keeps each device's pending timers (see
//! `journal/effects.rs`). The wheel is only a schedule over that truth: one ordered set for
//! the whole fleet rather than a task or a tokio timer per timer, re-synced per device from
//! the index whenever a record of that device touched its timers (see `crate::dispatch`),
//! and loaded whole at start, where timers that fell due while the process was down fire at
//! once.
//!
//! # Small by design
//!
//! A fleet may have a million pending timers, so the wheel holds one entry per *device*, not
//! per timer: `(earliest due time, device number)`, 16 bytes in a B-tree plus 16 in a map
//! from the device to its entry. When an entry falls due the wheel asks the index which of
//! that device's timers are due (and puts the device back at the next one); the timer's
//! event is not in memory at all, the actor reads it from the record that set the timer.
//! The index keeps 40 bytes and the key per timer (see [`crate::journal::TimerEntry`]).
//!
//! Firing a timer puts a [`Message::Internal`] with origin `timer` into the device's mailbox
//! (activating it). The actor checks it against the journal before handling it, so a timer
//! cancelled or replaced after it left the wheel never fires. A timer never fires early: it
//! leaves the wheel only once the host's clock has reached its due time, and the event's
//! `at_ms` is taken after that.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::actor::Message;
use crate::clock;
use crate::dispatch::Postman;
use crate::journal::effects::VecMap;
use crate::journal::{Journal, Origin, TimerEntry};
use crate::metrics::Metrics;

/// The longest the wheel sleeps without looking again, so a wall clock stepped forward is
/// noticed within this.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// The most devices taken in one turn before the task yields.
const BATCH: usize = 4096;

/// See the module docs.
#[derive(Default)]
pub struct TimerWheel {
    state: Mutex<Wheel>,
    wake: Notify,
}

#[derive(Default)]
struct Wheel {
    /// (due, device number): each device with pending timers once, at its earliest.
    due: BTreeSet<(u64, u32)>,
    /// Each device's place in `due`.
    at: HashMap<u32, u64>,
}

impl Wheel {
    /// Puts device `num` at `due_ms` (or nowhere); returns whether that is now the earliest
    /// entry of all, so the task must look again.
    fn place(&mut self, num: u32, due_ms: Option<u64>) -> bool {
        if let Some(old) = self.at.remove(&num) {
            self.due.remove(&(old, num));
        }
        let Some(due_ms) = due_ms else {
            return false;
        };
        self.at.insert(num, due_ms);
        self.due.insert((due_ms, num));
        self.due.first() == Some(&(due_ms, num))
    }
}

impl TimerWheel {
    /// Makes device `num`'s entry match `timers` (its pending timers, as the index has them).
    pub fn sync(&self, num: u32, timers: &VecMap<Box<str>, TimerEntry>) {
        let earliest = timers.values().map(|t| t.due_ms).min();
        if self.state.lock().place(num, earliest) {
            self.wake.notify_one();
        }
    }

    /// Places each `(device number, earliest due)` at once: the whole fleet at start.
    pub fn place_all(&self, mut schedule: Vec<(u32, u64)>) {
        if schedule.is_empty() {
            return;
        }
        // In the set's order: a B-tree filled in order packs its nodes fuller.
        schedule.sort_unstable_by_key(|&(num, due)| (due, num));
        {
            let mut wheel = self.state.lock();
            for (num, due) in schedule {
                wheel.place(num, Some(due));
            }
        }
        self.wake.notify_one();
    }

    /// Devices with a timer scheduled.
    pub fn scheduled(&self) -> usize {
        self.state.lock().due.len()
    }

    /// Fires timers as they fall due, forever (the runtime aborts it at shutdown).
    pub async fn run(
        self: Arc<Self>,
        journal: Journal,
        postman: Arc<Postman>,
        metrics: Arc<Metrics>,
    ) {
        loop {
            // Registered before looking, so a sync between the look and the sleep wakes it.
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let now = clock::now_ms();
            let (devices, next) = self.take_due(now);
            let mut fired = 0u64;
            let due = journal.due_timers(&devices, now);
            let mut next_of = Vec::with_capacity(due.len());
            for (num, timers) in due {
                for (key, t) in timers.due {
                    fired += 1;
                    postman.post(
                        &timers.device,
                        Message::Internal {
                            // Read by the actor from the record that set the timer.
                            event: None,
                            origin: Origin::Timer {
                                key: key.into(),
                                set: t.set,
                                due_ms: t.due_ms,
                                missed: 0,
                            },
                        },
                    );
                }
                next_of.push((num, timers.next_ms));
            }
            // The due ones are back at their next due time (or gone) once their firing
            // records are durable (a sync); until then each device waits for its others.
            {
                let mut wheel = self.state.lock();
                for (num, next_ms) in next_of {
                    if !wheel.at.contains_key(&num) {
                        wheel.place(num, next_ms);
                    }
                }
            }
            if fired > 0 {
                metrics
                    .timers_fired
                    .fetch_add(fired, std::sync::atomic::Ordering::Relaxed);
            }
            if devices.len() == BATCH {
                tokio::task::yield_now().await;
                continue;
            }
            let next = self.state.lock().due.first().map(|e| e.0).or(next);
            let sleep = match next {
                Some(at) => Duration::from_millis(at.saturating_sub(now)).min(MAX_SLEEP),
                None => MAX_SLEEP,
            };
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                () = &mut woken => {}
            }
        }
    }

    /// Takes up to [`BATCH`] devices with an entry due at `now`, and says when the next
    /// entry is due.
    fn take_due(&self, now: u64) -> (Vec<u32>, Option<u64>) {
        let mut wheel = self.state.lock();
        let mut out = Vec::new();
        while out.len() < BATCH {
            match wheel.due.first() {
                Some(&(due, num)) if due <= now => {
                    wheel.due.pop_first();
                    wheel.at.remove(&num);
                    out.push(num);
                }
                _ => break,
            }
        }
        let next = wheel.due.first().map(|e| e.0);
        (out, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::EffectId;

    fn timer(due_ms: u64, seq: u64) -> TimerEntry {
        TimerEntry {
            due_ms,
            every_ms: None,
            set: EffectId { seq, index: 0 },
        }
    }

    fn map(entries: Vec<(&str, TimerEntry)>) -> VecMap<Box<str>, TimerEntry> {
        entries.into_iter().map(|(k, t)| (k.into(), t)).collect()
    }

    #[test]
    fn a_device_is_in_the_wheel_once_at_its_earliest_and_a_sync_moves_it() {
        let wheel = TimerWheel::default();
        wheel.sync(1, &map(vec![("x", timer(100, 1)), ("y", timer(300, 1))]));
        wheel.sync(2, &map(vec![("x", timer(200, 1))]));
        assert_eq!(wheel.scheduled(), 2);
        // Device 1 replaces x and cancels y.
        wheel.sync(1, &map(vec![("x", timer(150, 2))]));
        assert_eq!(wheel.scheduled(), 2);
        let (due, next) = wheel.take_due(149);
        assert!(due.is_empty());
        assert_eq!(next, Some(150));
        let (due, next) = wheel.take_due(200);
        assert_eq!(due, [1, 2]);
        assert_eq!(next, None);
        assert_eq!(wheel.scheduled(), 0);
        wheel.sync(2, &VecMap::default());
        let state = wheel.state.lock();
        assert!(state.at.is_empty() && state.due.is_empty());
    }
}
