//! A unit of work's time budget and the epoch deadline's looks at it: what a guest call
//! that runs long is charged (CPU time of the threads that ran it, see `cpu_clock`), when it
//! is stopped, yields its thread or moves to the slow lane.

use std::time::{Duration, Instant};

use wasmtime::UpdateDeadline;

use super::{GuestState, cpu_clock};

/// How a unit of work may give its thread back (see [`Instance::begin_unit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preemption {
    /// Never: every call holds its thread to the end (a dry-run's re-decisions, `state?at=`
    /// and `drover replay` rebuilds, on blocking threads).
    None,
    /// Stopped at its first look past two epoch ticks of CPU time ([`CallError::Moved`]), to
    /// run again from the start elsewhere, and the plugin marked slow: the actor pool's events,
    /// reads, snapshots, activations, deploy folds and trial `init`s, whose plugin had not run
    /// slow when they began. `handle`, `query` and `snapshot` change no state, an activation
    /// or a fold builds a fresh instance, and the journal holds all the rest, so running any
    /// of them again is safe; the instance goes.
    Move,
    /// Each call runs on a fiber that yields its thread at every epoch tick, if the plugin has
    /// run slow (see [`Instance::handle_preemptible`]): the slow lane's events, reads,
    /// snapshots, activations, folds and trial `init`s.
    Yield,
}

/// A unit of work's time budget, in CPU time of the thread that runs it, and where it began.
///
/// A unit on a fiber runs in slices, one per poll, each perhaps on another thread: what the
/// earlier slices used is kept apart from where the current one began, in the CPU clock of
/// the thread running it (a thread's clock starts at zero when the thread does, so the two
/// cannot be folded into one start point).
#[derive(Debug, Clone, Copy)]
pub(super) struct UnitClock {
    budget: Duration,
    epoch_tick: Duration,
    /// CPU time the unit's earlier slices used.
    pub(super) cpu_before: Duration,
    /// The running thread's CPU time when the current slice began (for the first, a recent
    /// sample: never later than the start).
    cpu_start: Duration,
    /// Wall-clock time the earlier slices ran, waiting for a core included, waiting for
    /// their turn between slices not.
    pub(super) wall_before: Duration,
    /// When the current slice began.
    wall_start: Instant,
    /// CPU time the earlier slices surely used: counted from clock readings only.
    sure_before: Duration,
    /// The running thread's CPU clock as read at the current slice's first look, or at its
    /// resumption: where what it surely used is counted from (see [`UnitClock::surely_used`]).
    sure_start: Option<Duration>,
    /// The unit yielded its thread at its last look: the next look, due at once after it is
    /// resumed, begins a slice on whatever thread resumed it.
    pub(super) yielded: bool,
    /// A look showed it slow (see [`UnitClock::shows_slow`] and [`SlowMark`]).
    pub(super) seen_slow: bool,
    /// CPU time the unit may use before it shows its plugin slow, if more than two ticks:
    /// a chunk of a fold, as long as the history it folds (see [`Instance::expect_cpu`]).
    pub(super) slow_floor: Duration,
}

/// How many times its budget a unit may take in wall-clock time, waiting for a core included,
/// before it is interrupted whatever CPU time it used (as `CallError::Starved` within its CPU
/// budget): a bound for a thread starved for long, or a host call that blocks (a log line
/// into a full pipe). Time a preemptible unit waited for its turn between slices does not
/// count: that is the server being fair, not short of cores, and the guests ahead of it
/// are charged for their own turns (so many guests spinning at once still time out on their
/// CPU budgets, and a plugin doing that is quarantined, rather than each being told the
/// server is overloaded and coming again).
pub(crate) const WALL_LIMIT: u32 = 4;

/// Epoch ticks of CPU time a unit that may be preempted must use, as seen at a look at its
/// deadline, for its plugin to count as having run slow (see [`UnitClock::shows_slow`]).
const SLOW_TICKS: u32 = 2;

impl UnitClock {
    pub(super) fn start(budget: Duration, epoch_tick: Duration) -> UnitClock {
        let now = Instant::now();
        UnitClock {
            budget,
            epoch_tick,
            cpu_before: Duration::ZERO,
            cpu_start: cpu_clock::recent(),
            wall_before: Duration::ZERO,
            wall_start: now,
            sure_before: Duration::ZERO,
            sure_start: None,
            yielded: false,
            seen_slow: false,
            slow_floor: Duration::ZERO,
        }
    }

    /// CPU time the unit used, the running thread's clock reading `cpu_now` at `now`. A
    /// slice is charged at most its wall-clock time: its start point may be a sample taken
    /// before it began, and a ticker that woke late leaves the sample older than a tick.
    pub(super) fn used(&self, cpu_now: Duration, now: Instant) -> Duration {
        let slice = cpu_now.saturating_sub(self.cpu_start);
        self.cpu_before + slice.min(now.saturating_duration_since(self.wall_start))
    }

    /// CPU time past which a unit shows its plugin slow: two epoch ticks (a unit's first
    /// start point is a sample up to a tick old), or half its budget if that is less; or a
    /// fold's chunk's allowance if that is more (see [`Instance::expect_cpu`]).
    fn slow_after(&self) -> Duration {
        (self.epoch_tick * SLOW_TICKS)
            .min(self.budget / 2)
            .max(self.slow_floor)
    }

    /// CPU time the unit surely used, the running thread's clock reading `cpu_now`: counted
    /// from clock readings only, never from a sample, so from the current slice's first look
    /// (which this is, if none was before) or its resumption. Less than [`UnitClock::used`]
    /// by the first slice's time before its first look.
    fn surely_used(&mut self, cpu_now: Duration) -> Duration {
        let start = *self.sure_start.get_or_insert(cpu_now);
        self.sure_before + cpu_now.saturating_sub(start)
    }

    /// Whether a unit that used `used` by its estimate and `surely` by clock readings shows its
    /// plugin slow: past [`UnitClock::slow_after`], and a quarter of it (half a tick) surely.
    ///
    /// The estimate alone is not enough. Its start point is a sample that may be a tick old,
    /// or more when the ticker woke late, and charges the unit for what its thread ran before
    /// it, up to what the slice lasted in wall-clock time. On a machine short of cores a
    /// thread preempted in the middle of a 5 µs event for 20 ms was charged 20 ms: with four
    /// busy processes beside a server on two cores, the thermostat was marked slow within
    /// seconds, and its whole fleet went to the slow lane.
    fn shows_slow(&self, used: Duration, surely: Duration) -> bool {
        used >= self.slow_after() && surely >= self.slow_after() / 4
    }

    /// Wall-clock time the unit ran, not counting the turns it waited between slices.
    pub(super) fn ran(&self, now: Instant) -> Duration {
        self.wall_before + now.saturating_duration_since(self.wall_start)
    }

    /// The unit yields its thread, having used `used` of CPU (`surely` of it surely, see
    /// [`UnitClock::surely_used`]) and run `ran`.
    fn suspend(&mut self, used: Duration, surely: Duration, ran: Duration) {
        self.cpu_before = used;
        self.sure_before = surely;
        self.wall_before = ran;
        self.yielded = true;
    }

    /// The unit was resumed on a thread whose CPU clock reads `cpu_now`: a slice begins.
    fn resume(&mut self, cpu_now: Duration, now: Instant) {
        self.cpu_start = cpu_now;
        self.sure_start = Some(cpu_now);
        self.wall_start = now;
        self.yielded = false;
    }

    /// Epoch ticks until the deadline is first looked at: within two epoch ticks, so that a
    /// unit running long is seen (and, on a fiber, yields) early; or its whole budget if that
    /// is shorter.
    fn first_look(budget: Duration, epoch_tick: Duration) -> u64 {
        UnitClock::ticks(budget.min(epoch_tick), epoch_tick)
    }

    /// [`UnitClock::first_look`] for a unit that gives its thread back as `preemption` says.
    /// A unit on the actor pool that may be moved is first looked at the next tick, within
    /// one: that look reads the thread's clock, from which what the unit surely used is
    /// counted (see [`UnitClock::surely_used`]), so a spinning unit is seen slow two or three
    /// ticks in, not three or four. A unit shorter than a tick is looked at only if a tick
    /// ends during it (a 5 µs event: one in 2,000).
    pub(super) fn first_look_for(
        budget: Duration,
        epoch_tick: Duration,
        preemption: Preemption,
    ) -> u64 {
        match preemption {
            Preemption::Move => 1,
            Preemption::None | Preemption::Yield => UnitClock::first_look(budget, epoch_tick),
        }
    }

    /// Epoch ticks until the deadline should next be looked at for `left` of budget: one
    /// more than it spans, since the current tick may be about to end.
    pub(super) fn ticks(left: Duration, epoch_tick: Duration) -> u64 {
        (left.as_nanos() / epoch_tick.as_nanos().max(1)).max(1) as u64 + 1
    }
}

/// Whole epoch ticks of `tick` in `elapsed` of wall-clock time: where the epoch should be.
pub(super) fn ticks_due(elapsed: Duration, tick: Duration) -> u64 {
    (elapsed.as_nanos() / tick.as_nanos().max(1)) as u64
}

/// What a look at a unit's deadline decided (see [`UnitClock::look`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Go on; look again in this many ticks.
    Continue(u64),
    /// Yield the thread (on a fiber); look again at once when resumed.
    Yield,
    /// Past its CPU budget: a timeout.
    Timeout,
    /// Far past its budget in wall-clock time within its CPU budget, having used this much.
    Starved(Duration),
    /// Stop, to run again on the slow lane ([`Preemption::Move`]).
    Move,
    /// Stop: the server is stopping and the unit has run a tick ([`CallError::Stopped`]).
    Stopped,
}

/// Most epoch ticks between two looks at a unit's deadline, so that a unit that runs long
/// sees a stop ([`crate::engine::Engine::stop_guest_calls`]) within about this many: a unit
/// that is neither moved nor on a fiber would otherwise be looked at next when its budget
/// ends, seconds away. A look reads a thread's CPU clock (~100 ns).
const MAX_TICKS_BETWEEN_LOOKS: u64 = 10;

impl UnitClock {
    /// A look at the unit's clocks, the running thread's CPU clock reading `cpu_now` at `now`:
    /// what to do, and, if the unit shows its plugin slow (a unit that may be preempted, see
    /// [`UnitClock::shows_slow`]; a unit that times out shows it too), the CPU time it used and
    /// surely used.
    pub(super) fn look(
        &mut self,
        cpu_now: Duration,
        now: Instant,
        preemption: Preemption,
        on_fiber: bool,
        stopping: bool,
    ) -> (Verdict, Option<(Duration, Duration)>) {
        if self.yielded {
            // The first look after a yield (the deadline was due at once).
            self.resume(cpu_now, now);
            return (Verdict::Continue(1), None);
        }
        let used = self.used(cpu_now, now);
        let surely = self.surely_used(cpu_now);
        let timed_out = used >= self.budget;
        // A timeout marks its plugin without the sure part: with a budget under three ticks
        // the first look, where nothing is sure yet, may be the last.
        // A unit with no budget at all (a rebuild that has waited its wall-clock bound out)
        // times out at its first look, having shown nothing of its plugin.
        let slow = preemption != Preemption::None
            && !self.budget.is_zero()
            && (self.shows_slow(used, surely) || (timed_out && used >= self.slow_after()));
        let verdict = if timed_out {
            Verdict::Timeout
        } else if stopping && used >= self.epoch_tick {
            Verdict::Stopped
        } else if self.ran(now) >= self.budget * WALL_LIMIT {
            Verdict::Starved(used)
        } else if preemption == Preemption::Move {
            // Looked at each tick until it is seen slow, or ends.
            if slow {
                Verdict::Move
            } else {
                Verdict::Continue(1)
            }
        } else if on_fiber {
            self.suspend(used, surely, self.ran(now));
            Verdict::Yield
        } else {
            Verdict::Continue(
                UnitClock::ticks(self.budget - used, self.epoch_tick).min(MAX_TICKS_BETWEEN_LOOKS),
            )
        };
        self.seen_slow |= slow;
        (verdict, slow.then_some((used, surely)))
    }
}

/// The epoch deadline passed: a look at the unit's clocks ([`UnitClock::look`]). Interrupts a
/// unit past its CPU budget (a timeout) or far past it in wall-clock time (starved). An
/// unit that may be preempted and has used two ticks marks its plugin slow, and one on the
/// actor pool is then stopped, to run again on the slow lane ([`Preemption::Move`]).
/// Otherwise the guest goes on: on a fiber, after yielding its thread to whatever else waits
/// for one; otherwise for what is left of its budget.
pub(super) fn deadline_reached(
    mut store: wasmtime::StoreContextMut<'_, GuestState>,
) -> wasmtime::Result<UpdateDeadline> {
    let state = store.data_mut();
    let (cpu_now, now) = (cpu_clock::now(), Instant::now());
    let stopping = state.stopping.load(std::sync::atomic::Ordering::Acquire);
    let (verdict, slow) =
        state
            .clock
            .look(cpu_now, now, state.preemption, state.on_fiber, stopping);
    // Marked even if the unit ends here: a plugin whose events time out is slow too.
    if let Some((used, surely)) = slow
        && state.slow_marks.of(state.setup).set()
    {
        let (cpu_ms, surely_ms) = (used.as_secs_f64() * 1e3, surely.as_secs_f64() * 1e3);
        if state.setup {
            tracing::warn!(
                device = %state.device,
                cpu_ms,
                surely_ms,
                "building this device's state (`restore`, `init` or replayed `apply`s) ran \
                 slow: from now on its plugin version's activations, folds and trial inits run \
                 on the slow lane (its events stay where they are)"
            );
        } else {
            tracing::warn!(
                device = %state.device,
                cpu_ms,
                surely_ms,
                "a guest call of this device's plugin version ran slow: from now on its \
                 devices' events, reads and activations run on the slow lane"
            );
        }
    }
    match verdict {
        Verdict::Continue(ticks) => Ok(UpdateDeadline::Continue(ticks)),
        Verdict::Yield => Ok(UpdateDeadline::Yield(0)),
        Verdict::Timeout => Err(wasmtime::Trap::Interrupt.into()),
        Verdict::Starved(used) => {
            state.starved = Some(used);
            Err(wasmtime::Trap::Interrupt.into())
        }
        Verdict::Move => {
            state.moved = true;
            Err(wasmtime::Trap::Interrupt.into())
        }
        Verdict::Stopped => {
            state.stopped = true;
            Err(wasmtime::Trap::Interrupt.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{MAX_TICKS_BETWEEN_LOOKS, Preemption, UnitClock, Verdict, ticks_due};

    /// A ticker that wakes late (its thread starved of a core) catches up to the wall clock
    /// at once, so deadlines counted in ticks keep to wall-clock time.
    #[test]
    fn the_epoch_follows_the_wall_clock_through_late_wake_ups() {
        let tick = Duration::from_millis(10);
        assert_eq!(ticks_due(Duration::from_millis(9), tick), 0);
        assert_eq!(ticks_due(Duration::from_millis(10), tick), 1);
        // Woken 20 s late: 2,000 ticks due, not one.
        assert_eq!(ticks_due(Duration::from_millis(20_015), tick), 2_001);
    }

    /// A unit resumed on another thread, whose CPU clock reads less than the unit had used
    /// (a younger thread), is charged what it used before plus its new slice; and the turn it
    /// waited between slices is not counted as running time.
    #[test]
    fn a_unit_is_charged_its_slices_wherever_they_ran() {
        let ms = Duration::from_millis;
        let mut unit = UnitClock::start(ms(250), ms(10));
        // Began on a thread whose clock read 500 ms; used 100 ms there, ran 120 ms.
        unit.cpu_start = ms(500);
        let began = unit.wall_start;
        assert_eq!(unit.used(ms(600), began + ms(120)), ms(100));
        unit.suspend(ms(100), ms(90), ms(120));
        // Resumed 300 ms later on a thread whose clock reads 10 ms.
        let resumed = began + ms(420);
        unit.resume(ms(10), resumed);
        assert_eq!(unit.used(ms(15), resumed + ms(5)), ms(105));
        assert_eq!(unit.ran(resumed + ms(5)), ms(125));
    }

    /// A start point sampled long before the unit began (a ticker that woke late) does not
    /// charge the unit for the CPU time the thread used before it: a slice is charged at most
    /// its wall-clock time.
    #[test]
    fn a_stale_sample_charges_no_more_than_the_slice_lasted() {
        let ms = Duration::from_millis;
        let mut unit = UnitClock::start(ms(250), ms(10));
        // The sample is 80 ms of other work old; the unit has run 3 ms.
        unit.cpu_start = ms(1000);
        assert_eq!(unit.used(ms(1083), unit.wall_start + ms(3)), ms(3));
        // Below the slow mark, which is two ticks, or half a short budget.
        assert_eq!(unit.slow_after(), ms(20));
        assert_eq!(
            UnitClock::start(ms(15), ms(10)).slow_after(),
            ms(7) + ms(1) / 2
        );
    }

    /// A unit that may be moved off the pool is first looked at within a tick, so that what
    /// it surely used is counted from early on; others within two.
    #[test]
    fn a_unit_that_may_move_is_looked_at_within_a_tick() {
        let ms = Duration::from_millis;
        let first = |p| UnitClock::first_look_for(ms(250), ms(10), p);
        assert_eq!(first(Preemption::Move), 1);
        assert_eq!(first(Preemption::Yield), 2);
        assert_eq!(first(Preemption::None), 2);
    }

    /// Through [`UnitClock::look`], as the deadline callback decides: on the actor pool, a
    /// unit held up by the kernel with a stale start sample goes on and marks nothing; one
    /// that spins is moved and marks its plugin at its next look; one that runs out of a
    /// short budget at its first look times out and marks its plugin.
    #[test]
    fn a_look_moves_a_spinning_unit_but_not_one_held_up_by_the_kernel() {
        let ms = Duration::from_millis;
        let mut unit = UnitClock::start(ms(250), ms(10));
        unit.cpu_start = ms(1000);
        let began = unit.wall_start;
        let first = unit.look(ms(1030), began + ms(25), Preemption::Move, false, false);
        assert_eq!(first, (Verdict::Continue(1), None));
        let next = unit.look(ms(1040), began + ms(35), Preemption::Move, false, false);
        assert_eq!(next, (Verdict::Move, Some((ms(35), ms(10)))));
        // A unit that may not be preempted (a dry-run's): never marks, never moves.
        let mut fold = UnitClock::start(ms(250), ms(10));
        fold.cpu_start = ms(1000);
        fold.look(ms(1030), began + ms(25), Preemption::None, false, false);
        let (verdict, slow) = fold.look(ms(1040), began + ms(35), Preemption::None, false, false);
        assert!(matches!(verdict, Verdict::Continue(_)) && slow.is_none());
        // A 15 ms budget runs out at the first look.
        let mut short = UnitClock::start(ms(15), ms(10));
        short.cpu_start = ms(1000);
        let out = short.look(
            ms(1016),
            short.wall_start + ms(16),
            Preemption::Move,
            false,
            false,
        );
        assert_eq!(out, (Verdict::Timeout, Some((ms(16), ms(0)))));
        // On a fiber the unit yields, and the look after its resumption goes on.
        let mut fiber = UnitClock::start(ms(250), ms(10));
        fiber.cpu_start = ms(1000);
        let yielded = fiber.look(
            ms(1012),
            fiber.wall_start + ms(12),
            Preemption::Yield,
            true,
            false,
        );
        assert_eq!(yielded.0, Verdict::Yield);
        let resumed = fiber.look(
            ms(3),
            fiber.wall_start + ms(40),
            Preemption::Yield,
            true,
            false,
        );
        assert_eq!(resumed, (Verdict::Continue(1), None));
        // A chunk of a fold allowed 30 ms goes on past two ticks, and moves past its floor.
        let mut chunk = UnitClock::start(ms(250), ms(10));
        chunk.slow_floor = ms(30);
        chunk.cpu_start = ms(1000);
        let at = chunk.wall_start;
        chunk.look(ms(1010), at + ms(10), Preemption::Move, false, false);
        let two_ticks = chunk.look(ms(1025), at + ms(25), Preemption::Move, false, false);
        assert_eq!(two_ticks, (Verdict::Continue(1), None));
        let past = chunk.look(ms(1035), at + ms(35), Preemption::Move, false, false);
        assert_eq!(past, (Verdict::Move, Some((ms(35), ms(25)))));
        // No budget left (a rebuild past its wall-clock bound): a timeout that marks nothing.
        let mut none_left = UnitClock::start(Duration::ZERO, ms(10));
        none_left.cpu_start = ms(1000);
        let out = none_left.look(
            ms(1030),
            none_left.wall_start + ms(30),
            Preemption::Move,
            false,
            false,
        );
        assert_eq!(out, (Verdict::Timeout, None));
    }

    /// A stopping server stops a unit that has run a tick of CPU time, whatever may preempt
    /// it, and lets a shorter one go on; a unit that is never moved nor yields is looked at
    /// at least every `MAX_TICKS_BETWEEN_LOOKS` ticks, so it sees the stop within them.
    #[test]
    fn a_stop_stops_a_unit_that_ran_a_tick_and_is_seen_within_ten_ticks() {
        let ms = Duration::from_millis;
        for preemption in [Preemption::None, Preemption::Move, Preemption::Yield] {
            let mut unit = UnitClock::start(ms(5_000), ms(10));
            unit.cpu_start = ms(1000);
            let began = unit.wall_start;
            let early = unit.look(ms(1004), began + ms(4), preemption, false, true);
            assert!(
                matches!(early.0, Verdict::Continue(_)),
                "{preemption:?}: {early:?}"
            );
            let late = unit.look(ms(1012), began + ms(12), preemption, false, true);
            assert_eq!(late.0, Verdict::Stopped, "{preemption:?}");
        }
        // Not stopping: a 5 s budget's unit is looked at again within ten ticks, not 500.
        let mut unit = UnitClock::start(ms(5_000), ms(10));
        unit.cpu_start = ms(1000);
        let began = unit.wall_start;
        let next = unit.look(ms(1012), began + ms(12), Preemption::None, false, false);
        assert_eq!(next, (Verdict::Continue(MAX_TICKS_BETWEEN_LOOKS), None));
    }

    /// A unit whose thread was preempted for long in the middle of a short call, its start
    /// point a sample from well before it began, is charged two ticks by its estimate; it is
    /// not seen slow, since the clock readings from its first look on show it used nothing
    /// more. A unit that spins is seen slow at its next look.
    #[test]
    fn a_unit_held_up_by_the_kernel_is_not_seen_slow() {
        let ms = Duration::from_millis;
        let mut unit = UnitClock::start(ms(250), ms(10));
        // Sampled 30 ms of other work ago; its thread was then preempted for 25 ms.
        unit.cpu_start = ms(1000);
        let first_look = unit.wall_start + ms(25);
        let used = unit.used(ms(1030), first_look);
        assert_eq!(used, ms(25));
        let surely = unit.surely_used(ms(1030));
        assert_eq!(surely, Duration::ZERO);
        assert!(!unit.shows_slow(used, surely));
        // A spinning unit, a tick later: 10 ms more, surely.
        let (cpu, next_look) = (ms(1040), first_look + ms(10));
        let (used, surely) = (unit.used(cpu, next_look), unit.surely_used(cpu));
        assert_eq!((used, surely), (ms(35), ms(10)));
        assert!(unit.shows_slow(used, surely));
        // What a slice surely used is kept across a yield; the next slice counts from its
        // resumption.
        unit.suspend(used, surely, unit.ran(next_look));
        unit.resume(ms(7), next_look + ms(100));
        assert_eq!(unit.surely_used(ms(9)), ms(12));
    }
}
