//! Whether a plugin version runs slow: the two marks its instances share, which send its
//! units of work to the slow lane (see `actor::ActorPool`), and their forgiveness.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// One of a plugin version's two marks (see [`SlowMarks`]): whether its events, or its setup
/// work, run slow, shared by its instances.
///
/// Set by a unit of its kind that showed it slow ([`UnitClock::shows_slow`]); cleared again
/// once [`FORGIVE_AFTER`] units of its kind in a row on the slow lane, while it was set, ended
/// without showing it slow, so that one slow event, or a mark
/// set wrongly, does not keep a fleet on half the cores until the process restarts. A
/// plugin slow on one event in more than that many stays there; one slow more rarely comes
/// back to the pool and, on its next slow event, moves again (two or three ticks of a pool
/// thread).
#[derive(Debug, Default)]
pub(super) struct SlowMark {
    slow: AtomicBool,
    /// Units in a row on the slow lane that ended without showing the version slow. (Not
    /// "without a look at their deadline": a thread held off its core for a tick in the
    /// middle of a fast unit is looked at, and on a loaded machine that broke every streak.)
    fast_streak: AtomicU32,
}

/// A plugin version's two marks. A unit that builds a state (an activation's `restore`,
/// `init` and replayed `apply`s, a deploy's fold, provisioning's trial `init`: see
/// [`Instance::begin_setup_unit`]) marks `setup`; the rest (events, reads, snapshots: work on
/// a live instance) mark `events`. Apart because the two are paid for differently: a plugin
/// whose `init` builds a large table, or whose large states take 20 ms to `restore`, has
/// slow activations and fast events, and its fleet's events belong on the pool; with one
/// mark, each activation sent them all to the slow lane (half the cores, a fiber per call)
/// and, as activations are frequent, kept them there.
#[derive(Debug, Default)]
pub(crate) struct SlowMarks {
    events: SlowMark,
    setup: SlowMark,
}

impl SlowMarks {
    /// The mark a unit of this kind sets and clears.
    pub(super) fn of(&self, setup: bool) -> &SlowMark {
        if setup { &self.setup } else { &self.events }
    }

    /// A unit of this kind on the slow lane ended (see [`SlowMark::unit_ended`]); a mark it
    /// cleared is logged.
    pub(super) fn unit_ended(&self, setup: bool, seen_slow: bool, device: &str) {
        if !self.of(setup).unit_ended(seen_slow) {
            return;
        }
        if setup {
            tracing::info!(
                device,
                units = FORGIVE_AFTER,
                "this device's plugin version built states fast on its last activations, folds \
                 and trial inits on the slow lane: they run on the actor pool again, unless its \
                 events are still marked slow"
            );
        } else {
            tracing::info!(
                device,
                units = FORGIVE_AFTER,
                "this device's plugin version ran fast on its last units on the slow \
                 lane: its devices' events and reads run on the actor pool again"
            );
        }
    }

    /// (`events_slow`, `setup_slow`), each mark read once, so the second includes the first.
    pub(super) fn both(&self) -> (bool, bool) {
        let events = self.events_slow();
        (events, events || self.setup.slow.load(Ordering::Relaxed))
    }

    pub(super) fn events_slow(&self) -> bool {
        self.events.slow.load(Ordering::Relaxed)
    }

    /// Setup work goes where slow events go too: a fold's `apply`s are the events' own.
    pub(super) fn setup_slow(&self) -> bool {
        self.both().1
    }
}

/// Units of a version in a row on the slow lane that end without showing it slow, after which the
/// version is no longer taken to run slow (see [`SlowMark`]).
pub const FORGIVE_AFTER: u32 = 10_000;

impl SlowMark {
    /// Sets the mark; whether it was clear. The streak starts afresh: units that ran fast on
    /// the slow lane while it was clear (there for the other mark) do not count toward
    /// forgiving it.
    pub(super) fn set(&self) -> bool {
        let was_clear = !self.slow.swap(true, Ordering::Relaxed);
        if was_clear {
            self.fast_streak.store(0, Ordering::Relaxed);
        }
        was_clear
    }

    /// A unit on the slow lane ended; `seen_slow`: a look at its deadline showed it slow.
    /// Whether that cleared the mark (see [`FORGIVE_AFTER`]).
    fn unit_ended(&self, seen_slow: bool) -> bool {
        if seen_slow {
            self.fast_streak.store(0, Ordering::Relaxed);
            return false;
        }
        if !self.slow.load(Ordering::Relaxed) {
            return false;
        }
        if self.fast_streak.fetch_add(1, Ordering::Relaxed) + 1 >= FORGIVE_AFTER {
            self.fast_streak.store(0, Ordering::Relaxed);
            return self.slow.swap(false, Ordering::Relaxed);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::{FORGIVE_AFTER, SlowMarks};

    /// Each mark is cleared by `FORGIVE_AFTER` fast units of its own kind in a row on the
    /// slow lane, counted only while it is set: fast setup units there while only the events
    /// mark was set do not forgive a setup mark set later, and a slow unit starts the count
    /// afresh.
    #[test]
    fn each_mark_is_forgiven_by_fast_units_of_its_kind_while_it_is_set() {
        let marks = SlowMarks::default();
        let setup_set = |m: &SlowMarks| m.setup.slow.load(Ordering::Relaxed);
        assert!(marks.of(false).set());
        assert_eq!(marks.both(), (true, true), "setup work follows slow events");
        for _ in 0..FORGIVE_AFTER / 2 {
            marks.unit_ended(true, false, "d");
        }
        assert!(marks.of(true).set(), "it was clear");
        assert!(!marks.of(true).set(), "set already");
        for _ in 1..FORGIVE_AFTER {
            marks.unit_ended(true, false, "d");
        }
        assert!(setup_set(&marks), "forgiven by units run before it was set");
        marks.unit_ended(true, false, "d");
        assert!(!setup_set(&marks));
        assert_eq!(marks.both(), (true, true), "the events' mark stands");

        for _ in 1..FORGIVE_AFTER {
            marks.unit_ended(false, false, "d");
        }
        marks.unit_ended(false, true, "d");
        for _ in 1..FORGIVE_AFTER {
            marks.unit_ended(false, false, "d");
        }
        assert_eq!(marks.both(), (true, true), "a slow unit restarts the count");
        marks.unit_ended(false, false, "d");
        assert_eq!(marks.both(), (false, false));
    }
}
