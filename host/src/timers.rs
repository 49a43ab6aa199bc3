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
//! per timer: `(earliest due time, device number)` in a B-tree (12 bytes, ~14 with the
//! tree's nodes when it is built whole at start), plus 8 bytes per device number up to the
//! highest that ever had a timer (numbers are not reused), where each device's entry is.
//! When an entry falls due the wheel asks the index which of that device's timers are due
//! (and puts the device back at the next one); the timer's event is not in memory at all,
//! the actor reads it from the record that set the timer. The index keeps 32 bytes per
//! timer: the timer and a pointer to its shared key, in a box of its own when it is the
//! device's only one (see [`crate::journal::TimerEntry`]).
//!
//! Firing a timer puts a [`Message::Internal`] with origin `timer` into the device's mailbox
//! (activating it). The actor checks it against the journal before handling it, so a timer
//! cancelled or replaced after it left the wheel never fires.
//!
//! # Handed out once
//!
//! A timer handed to its device stays pending in the index until the record of its firing is
//! durable, and every such record syncs the device's entry. Were the entry put back at the
//! earliest pending timer, a device with N timers due together would have the N − 1 still
//! in its mailbox handed out again after each firing: N²/2 messages (5,000 timers made 7.6M,
//! and periodic ones did it every period). So the wheel remembers, per device, what it last
//! handed out as a watermark ([`Handed`]: when, and the last record whose timers it
//! covered), and a sync schedules only timers past it. What was handed out is left to the
//! actor, which handles it, consumes it, or asks for it again itself (a quarantine, a
//! timeout: `Durable::timer_retry`); if it is still pending [`HANDED_OUT_FOR`] later (lost
//! with an actor task that panicked, or a long backlog) it is handed out again.
//!
//! A timer never fires early: it leaves the wheel only once the host's clock has reached its
//! due time, and the event's `at_ms` is taken after that.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::actor::{InternalEvent, Message};
use crate::clock;
use crate::dispatch::Postman;
use crate::journal::effects::VecMap;
use crate::journal::{Journal, Origin, TimerEntry, TimerKey};

/// The longest the wheel sleeps without looking again, so a wall clock stepped forward is
/// noticed within this.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// The most devices taken in one turn before the task yields.
const BATCH: usize = 4096;

/// How long timers handed to a device are left to its actor before the wheel hands out the
/// ones still pending again, ms: the actor's own retry of a firing it could not handle
/// (`crate::actor::INTERNAL_RETRY`, 5 s) comes first.
const HANDED_OUT_FOR: u64 = 5_000;

/// See the module docs.
#[derive(Default)]
pub struct TimerWheel {
    state: Mutex<Wheel>,
    wake: Notify,
}

#[derive(Default)]
struct Wheel {
    /// Each device with pending timers once, at its earliest.
    due: BTreeSet<Slot>,
    /// Each device's place in `due`, by device number ([`NOWHERE`]: not in it). Device
    /// numbers are dense journal-local ids, so a vector costs 8 bytes per device up to the
    /// highest number with a timer; a hash map cost ~34 per device with one (entries padded
    /// to 16 bytes, a table at most 7/8 full that doubles).
    at: Vec<u64>,
    /// What was last handed out to each device whose firings may still be in its mailbox
    /// (see "Handed out once"): few devices at a time, so a map.
    handed: std::collections::HashMap<u32, Handed>,
}

/// Timers handed to a device: every timer due by `at_ms` that a record up to `seq` set.
/// A timer set later, even one due earlier, is not among them (its record came after).
#[derive(Debug, Clone, Copy)]
struct Handed {
    at_ms: u64,
    seq: u64,
}

impl Handed {
    fn covers(self, t: &TimerEntry) -> bool {
        t.due_ms <= self.at_ms && t.set().seq <= self.seq
    }

    /// Whether it is time to hand out again what is still pending.
    fn stale(self, now_ms: u64) -> bool {
        now_ms >= self.at_ms.saturating_add(HANDED_OUT_FOR)
    }
}

/// An entry of [`Wheel::due`]: a due time and a device number, ordered by due time, then
/// device. Twelve bytes with 4-byte alignment where `(u64, u32)` takes sixteen: the B-tree
/// keeps eleven entries per node, so a million devices' worth of entries is ~4 MB smaller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Slot {
    // Field order is the order: the derived `Ord` compares the due time's high half, then
    // its low half, then the device.
    due_hi: u32,
    due_lo: u32,
    num: u32,
}

impl Slot {
    fn new(due_ms: u64, num: u32) -> Slot {
        Slot {
            due_hi: (due_ms >> 32) as u32,
            due_lo: due_ms as u32,
            num,
        }
    }

    fn due_ms(self) -> u64 {
        (u64::from(self.due_hi) << 32) | u64::from(self.due_lo)
    }
}

/// In [`Wheel::at`]: the device has no entry. A timer due at `u64::MAX` ms never falls due,
/// so a device whose earliest timer is due then needs no entry either.
const NOWHERE: u64 = u64::MAX;

impl Wheel {
    /// Puts device `num` at `due_ms` (or nowhere); returns whether that is now the earliest
    /// entry of all, so the task must look again.
    fn place(&mut self, num: u32, due_ms: Option<u64>) -> bool {
        self.unplace(num);
        let Some(due_ms) = due_ms.filter(|&d| d != NOWHERE) else {
            return false;
        };
        self.mark(num, due_ms);
        let slot = Slot::new(due_ms, num);
        self.due.insert(slot);
        self.due.first() == Some(&slot)
    }

    /// Takes device `num`'s entry, if it has one, out of `due`.
    fn unplace(&mut self, num: u32) {
        if let Some(old) = self.at.get_mut(num as usize)
            && *old != NOWHERE
        {
            self.due.remove(&Slot::new(*old, num));
            *old = NOWHERE;
        }
    }

    /// Records that device `num`'s entry is at `due_ms` (the caller puts it in `due`).
    fn mark(&mut self, num: u32, due_ms: u64) {
        let i = num as usize;
        if self.at.len() <= i {
            self.at.resize(i + 1, NOWHERE);
        }
        self.at[i] = due_ms;
    }

    /// Whether device `num` has an entry.
    fn placed(&self, num: u32) -> bool {
        self.at.get(num as usize).is_some_and(|&d| d != NOWHERE)
    }

    /// When device `num` must be looked at next, given its pending `timers`: its earliest
    /// timer not handed out yet, or, while some handed out are still pending, when they go
    /// stale. Forgets a hand-out that is stale or fully resolved.
    fn next_look(
        &mut self,
        num: u32,
        timers: &VecMap<TimerKey, TimerEntry>,
        now_ms: u64,
    ) -> Option<u64> {
        let earliest = |skip: Option<Handed>| {
            timers
                .values()
                .filter(|t| !skip.is_some_and(|h| h.covers(t)))
                .map(|t| t.due_ms)
                .min()
        };
        let Some(&handed) = self.handed.get(&num) else {
            return earliest(None);
        };
        if handed.stale(now_ms) || !timers.values().any(|t| handed.covers(t)) {
            self.handed.remove(&num);
            return earliest(None);
        }
        let again = handed.at_ms.saturating_add(HANDED_OUT_FOR);
        Some(earliest(Some(handed)).map_or(again, |e| e.min(again)))
    }
}

impl TimerWheel {
    /// Makes device `num`'s entry match `timers` (its pending timers, as the index has them).
    pub fn sync(&self, num: u32, timers: &VecMap<TimerKey, TimerEntry>) {
        let now = clock::now_ms();
        let mut wheel = self.state.lock();
        let next = wheel.next_look(num, timers, now);
        if wheel.place(num, next) {
            drop(wheel);
            self.wake.notify_one();
        }
    }

    /// Places each `(device number, earliest due)` at once: the whole fleet at start.
    pub fn place_all(&self, mut schedule: Vec<(u32, u64)>) {
        if schedule.is_empty() {
            return;
        }
        // One entry per device: the last one given wins, as if placed one by one.
        schedule.reverse();
        schedule.sort_by_key(|&(num, _)| num);
        schedule.dedup_by_key(|&mut (num, _)| num);
        {
            let mut wheel = self.state.lock();
            if let Some(&(top, _)) = schedule.last()
                && wheel.at.len() <= top as usize
            {
                wheel.at.resize(top as usize + 1, NOWHERE);
            }
            let mut fresh = Vec::with_capacity(schedule.len());
            for (num, due) in schedule {
                wheel.unplace(num);
                if due != NOWHERE {
                    wheel.mark(num, due);
                    fresh.push(Slot::new(due, num));
                }
            }
            // Built whole from sorted entries, a B-tree's nodes are full; inserted one by one
            // in order, each split leaves a node about half full: the wheel of a million
            // devices, vector included, measured 32 bytes per device instead of 52.
            let mut fresh: BTreeSet<Slot> = fresh.into_iter().collect();
            wheel.due.append(&mut fresh);
        }
        self.wake.notify_one();
    }

    /// Devices with a timer scheduled.
    pub fn scheduled(&self) -> usize {
        self.state.lock().due.len()
    }

    /// Fires timers as they fall due, forever (the runtime aborts it at shutdown).
    pub async fn run(self: Arc<Self>, journal: Journal, postman: Arc<Postman>) {
        loop {
            // Registered before looking, so a sync between the look and the sleep wakes it.
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let now = clock::now_ms();
            let (devices, next) = self.take_due(now);
            let due = journal.due_timers(&devices, now);
            if due.len() < devices.len() {
                // Devices removed meanwhile: nothing of theirs is pending any more.
                let found: std::collections::HashSet<u32> = due.iter().map(|(n, _)| *n).collect();
                let mut wheel = self.state.lock();
                for num in devices.iter().filter(|n| !found.contains(n)) {
                    wheel.handed.remove(num);
                }
            }
            let mut next_of = Vec::with_capacity(due.len());
            for (num, timers) in due {
                let handed = self.hand_out(num, &timers.due, now);
                for (key, t) in timers.due {
                    if handed.is_some_and(|h| h.covers(&t)) {
                        // In its mailbox already, from an earlier hand-out still fresh.
                        continue;
                    }
                    postman.post(
                        &timers.device,
                        Message::Internal(Box::new(InternalEvent {
                            // Read by the actor from the record that set the timer.
                            event: None,
                            origin: Origin::Timer {
                                key: key.into(),
                                set: t.set(),
                                due_ms: t.due_ms,
                                missed: 0,
                            },
                        })),
                    );
                }
                next_of.push((num, timers.next_ms));
            }
            // The due ones are back at their next due time (or gone) once their firing
            // records are durable (a sync); until then each device waits for its others, or
            // until what it was handed goes stale.
            {
                let mut wheel = self.state.lock();
                for (num, next_ms) in next_of {
                    if !wheel.placed(num) {
                        let again = wheel
                            .handed
                            .get(&num)
                            .map(|h| h.at_ms.saturating_add(HANDED_OUT_FOR));
                        wheel.place(num, next_ms.into_iter().chain(again).min());
                    }
                }
            }
            if devices.len() == BATCH {
                tokio::task::yield_now().await;
                continue;
            }
            let next = self.state.lock().due.first().map(|e| e.due_ms()).or(next);
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

    /// Records that device `num` is handed its `due` timers at `now`; returns the hand-out
    /// still fresh before it, whose timers are in the mailbox already (`None` if it was
    /// stale: what it covered is handed out again).
    fn hand_out(&self, num: u32, due: &[(TimerKey, TimerEntry)], now: u64) -> Option<Handed> {
        let seq = due.iter().map(|(_, t)| t.set().seq).max()?;
        let mut wheel = self.state.lock();
        let before = wheel.handed.get(&num).copied().filter(|h| !h.stale(now));
        let seq = before.map_or(seq, |h| h.seq.max(seq));
        wheel.handed.insert(num, Handed { at_ms: now, seq });
        before
    }

    /// Takes up to [`BATCH`] devices with an entry due at `now`, and says when the next
    /// entry is due.
    fn take_due(&self, now: u64) -> (Vec<u32>, Option<u64>) {
        let mut wheel = self.state.lock();
        let mut out = Vec::new();
        while out.len() < BATCH {
            match wheel.due.first() {
                Some(&slot) if slot.due_ms() <= now => {
                    wheel.due.pop_first();
                    wheel.at[slot.num as usize] = NOWHERE;
                    out.push(slot.num);
                }
                _ => break,
            }
        }
        let next = wheel.due.first().map(|e| e.due_ms());
        (out, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::EffectId;

    fn timer(due_ms: u64, seq: u64) -> TimerEntry {
        TimerEntry::new(due_ms, None, EffectId { seq, index: 0 }).expect("indexable")
    }

    fn map(entries: Vec<(&str, TimerEntry)>) -> VecMap<TimerKey, TimerEntry> {
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
        assert!(state.at.iter().all(|&d| d == NOWHERE) && state.due.is_empty());
    }

    #[test]
    fn devices_placed_at_start_move_and_leave_like_any_other() {
        let wheel = TimerWheel::default();
        wheel.place_all(vec![(7, 300), (3, 100), (0, 200)]);
        assert_eq!(wheel.scheduled(), 3);
        // Device 7 gets an earlier timer; device 0 cancels its own.
        wheel.sync(7, &map(vec![("x", timer(50, 2))]));
        wheel.sync(0, &VecMap::default());
        assert_eq!(wheel.scheduled(), 2);
        let (due, next) = wheel.take_due(100);
        assert_eq!(due, [7, 3]);
        assert_eq!(next, None);
        // A device far past any placed so far.
        wheel.sync(1_000, &map(vec![("x", timer(400, 1))]));
        assert_eq!(wheel.take_due(400).0, [1_000]);
        assert_eq!(wheel.scheduled(), 0);
        // Placed twice in one go, and again over an entry it has: the last place wins.
        wheel.sync(9, &map(vec![("x", timer(900, 1))]));
        wheel.place_all(vec![(9, 500), (8, 600), (9, 20)]);
        assert_eq!(wheel.scheduled(), 2);
        assert_eq!(wheel.take_due(599), (vec![9], Some(600)));
    }

    #[test]
    fn timers_handed_out_are_not_handed_out_again_until_stale() {
        let wheel = TimerWheel::default();
        // Three timers set by record 1, due together at 100; one set by record 2 at 900.
        let pending = map(vec![
            ("a", timer(100, 1)),
            ("b", timer(100, 1)),
            ("c", timer(100, 1)),
            ("d", timer(900, 2)),
        ]);
        wheel.state.lock().place(3, Some(100));
        assert_eq!(wheel.take_due(200).0, [3]);
        let due: Vec<_> = pending
            .iter()
            .filter(|(_, t)| t.due_ms <= 200)
            .map(|(k, t)| (k.clone(), *t))
            .collect();
        assert!(
            wheel.hand_out(3, &due, 200).is_none(),
            "nothing handed before"
        );
        let look = |pending: &VecMap<TimerKey, TimerEntry>, now| {
            wheel.state.lock().next_look(3, pending, now)
        };
        // `a` fired: its record's sync finds `b` and `c` pending, handed out, so the device
        // waits for `d`, not for them.
        let mut left = pending.clone();
        left.remove(&TimerKey::from("a"));
        assert_eq!(look(&left, 250), Some(900));
        // A timer set afterwards (record 5), due in the past, is not among those handed out.
        let mut late = left.clone();
        late.insert("e".into(), timer(50, 5));
        assert_eq!(look(&late, 260), Some(50));
        // Handed out again only once stale, if still pending.
        let mut stuck = left.clone();
        stuck.remove(&TimerKey::from("d"));
        assert_eq!(look(&stuck, 300), Some(200 + HANDED_OUT_FOR));
        assert_eq!(look(&stuck, 200 + HANDED_OUT_FOR), Some(100));
        assert!(
            wheel.state.lock().handed.is_empty(),
            "a stale hand-out is forgotten"
        );
        // A hand-out whose timers all fired is forgotten at the next sync.
        assert!(wheel.hand_out(3, &due, 300).is_none());
        assert_eq!(look(&map(vec![("d", timer(900, 2))]), 400), Some(900));
        assert!(wheel.state.lock().handed.is_empty());
        // Handed out while an earlier hand-out is fresh: the earlier one's timers are skipped.
        assert!(wheel.hand_out(3, &due, 400).is_none());
        let before = wheel.hand_out(3, &due, 500).expect("fresh");
        assert!(due.iter().all(|(_, t)| before.covers(t)));
    }

    #[test]
    fn a_timer_due_at_the_end_of_time_never_falls_due_and_takes_no_place() {
        let wheel = TimerWheel::default();
        wheel.sync(4, &map(vec![("x", timer(u64::MAX, 1))]));
        assert_eq!(wheel.scheduled(), 0);
        // A device placed earlier and moved there leaves the wheel.
        wheel.sync(5, &map(vec![("x", timer(10, 1))]));
        wheel.sync(5, &map(vec![("x", timer(u64::MAX, 2))]));
        assert_eq!(wheel.scheduled(), 0);
        assert_eq!(wheel.take_due(u64::MAX).0, Vec::<u32>::new());
    }

    #[test]
    fn slots_order_by_due_time_across_the_halves_then_by_device() {
        let dues = [
            0,
            1,
            u64::from(u32::MAX),
            1 << 32,
            (1 << 32) + 1,
            u64::MAX - 1,
        ];
        for (i, &a) in dues.iter().enumerate() {
            assert_eq!(Slot::new(a, 7).due_ms(), a);
            for &b in &dues[i + 1..] {
                assert!(Slot::new(a, u32::MAX) < Slot::new(b, 0), "{a} before {b}");
            }
            assert!(Slot::new(a, 1) < Slot::new(a, 2));
        }
        assert_eq!(std::mem::size_of::<Slot>(), 12);
    }
}
