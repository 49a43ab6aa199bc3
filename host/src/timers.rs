//! The timer wheel: every pending durable timer of the fleet, ordered by due time, and the one
//! task that fires them.
//!
//! Timers are durable because the journal says so: a timer is pending from the record whose
//! effect set it until the record of its firing (or of its cancellation or replacement) is
//! durable, and the journal's index keeps each device's pending timers (see
//! `journal/effects.rs`). The wheel is only a schedule over that truth: one ordered map for
//! the whole fleet rather than a task or a tokio timer per timer, re-synced per device from
//! the index whenever a record of that device touched its timers (see `crate::dispatch`),
//! and loaded whole at start, where timers that fell due while the process was down fire at
//! once.
//!
//! Firing a timer puts a [`Message::Internal`] with origin `timer` into the device's mailbox
//! (activating it). The actor checks it against the journal before handling it, so a timer
//! cancelled or replaced after it left the wheel never fires. A timer never fires early: it
//! leaves the wheel only once the host's clock has reached its due time, and the event's
//! `at_ms` is taken after that.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::actor::Message;
use crate::clock;
use crate::dispatch::Postman;
use crate::journal::effects::VecMap;
use crate::journal::{EffectId, Origin, TimerEntry};
use crate::metrics::Metrics;

/// The longest the wheel sleeps without looking again, so a wall clock stepped forward is
/// noticed within this.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// The most firings taken in one turn before the task yields.
const BATCH: usize = 4096;

/// See the module docs.
#[derive(Default)]
pub struct TimerWheel {
    state: Mutex<Wheel>,
    wake: Notify,
}

#[derive(Default)]
struct Wheel {
    /// (due, device, key) → the firing.
    due: BTreeMap<(u64, Arc<str>, String), Firing>,
    /// Each device's entries in `due`, to replace them all at a sync.
    by_device: HashMap<Arc<str>, Vec<(u64, String)>>,
}

struct Firing {
    set: EffectId,
    event: String,
}

impl TimerWheel {
    /// Makes `device`'s entries exactly `timers` (its pending timers, as the index has them).
    pub fn sync(&self, device: &Arc<str>, timers: &VecMap<String, TimerEntry>) {
        let mut wheel = self.state.lock();
        let earliest = wheel.due.first_key_value().map(|(k, _)| k.0);
        if let Some(old) = wheel.by_device.remove(device) {
            for (due, key) in old {
                wheel.due.remove(&(due, device.clone(), key));
            }
        }
        if timers.is_empty() {
            return;
        }
        let mut mine = Vec::with_capacity(timers.len());
        for (key, t) in timers.iter() {
            wheel.due.insert(
                (t.due_ms, device.clone(), key.clone()),
                Firing {
                    set: t.set,
                    event: t.event.clone(),
                },
            );
            mine.push((t.due_ms, key.clone()));
        }
        wheel.by_device.insert(device.clone(), mine);
        let now_first = wheel.due.first_key_value().map(|(k, _)| k.0);
        drop(wheel);
        if now_first < earliest || earliest.is_none() {
            self.wake.notify_one();
        }
    }

    /// Timers scheduled.
    pub fn scheduled(&self) -> usize {
        self.state.lock().due.len()
    }

    /// Fires timers as they fall due, forever (the runtime aborts it at shutdown).
    pub async fn run(self: Arc<Self>, postman: Arc<Postman>, metrics: Arc<Metrics>) {
        loop {
            // Registered before looking, so a sync between the look and the sleep wakes it.
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let now = clock::now_ms();
            let (due, next) = self.take_due(now);
            let fired = due.len();
            for (device, key, due_ms, firing) in due {
                postman.post(
                    &device,
                    Message::Internal {
                        event: firing.event,
                        origin: Origin::Timer {
                            key,
                            set: firing.set,
                            due_ms,
                            missed: 0,
                        },
                    },
                );
            }
            if fired > 0 {
                metrics
                    .timers_fired
                    .fetch_add(fired as u64, std::sync::atomic::Ordering::Relaxed);
                if fired == BATCH {
                    tokio::task::yield_now().await;
                    continue;
                }
            }
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

    /// Takes up to [`BATCH`] timers due at `now`, and says when the next one is due.
    #[allow(clippy::type_complexity)]
    fn take_due(&self, now: u64) -> (Vec<(Arc<str>, String, u64, Firing)>, Option<u64>) {
        let mut wheel = self.state.lock();
        let mut out = Vec::new();
        while out.len() < BATCH {
            match wheel.due.first_key_value() {
                Some(((due, _, _), _)) if *due <= now => {}
                _ => break,
            }
            let Some(((due, device, key), firing)) = wheel.due.pop_first() else {
                break;
            };
            if let Some(mine) = wheel.by_device.get_mut(&device) {
                mine.retain(|(d, k)| !(*d == due && *k == key));
                if mine.is_empty() {
                    wheel.by_device.remove(&device);
                }
            }
            out.push((device, key, due, firing));
        }
        let next = wheel.due.first_key_value().map(|(k, _)| k.0);
        (out, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timer(due_ms: u64, seq: u64) -> TimerEntry {
        TimerEntry {
            due_ms,
            every_ms: None,
            event: "{}".into(),
            set: EffectId { seq, index: 0 },
        }
    }

    #[test]
    fn a_sync_replaces_a_devices_timers_and_only_due_ones_are_taken() {
        let wheel = TimerWheel::default();
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        let map = |entries: Vec<(&str, TimerEntry)>| -> VecMap<String, TimerEntry> {
            entries
                .into_iter()
                .map(|(k, t)| (k.to_string(), t))
                .collect()
        };
        wheel.sync(&a, &map(vec![("x", timer(100, 1)), ("y", timer(300, 1))]));
        wheel.sync(&b, &map(vec![("x", timer(200, 1))]));
        // `a` replaces x and cancels y.
        wheel.sync(&a, &map(vec![("x", timer(150, 2))]));
        assert_eq!(wheel.scheduled(), 2);
        let (due, next) = wheel.take_due(149);
        assert!(due.is_empty());
        assert_eq!(next, Some(150));
        let (due, next) = wheel.take_due(200);
        let fired: Vec<(&str, u64, u64)> = due
            .iter()
            .map(|(d, _, at, f)| (&**d, *at, f.set.seq))
            .collect();
        assert_eq!(fired, [("a", 150, 2), ("b", 200, 1)]);
        assert_eq!(next, None);
        assert_eq!(wheel.scheduled(), 0);
        wheel.sync(&b, &VecMap::default());
        assert!(wheel.state.lock().by_device.is_empty());
    }
}
