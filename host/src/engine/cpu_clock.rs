//! Thread CPU clocks, so that a guest's time budget counts the CPU time it used, not the
//! time its thread waited for a core.
//!
//! A wall-clock budget charges a guest for contention it did not cause: with six looping
//! devices on a 2-core machine, a healthy device's 150 ms event (60% of its 250 ms budget)
//! timed out, lost its instance and left a dead letter. So the epoch deadline only says when
//! to *look*: when it passes, the engine's callback reads the thread's CPU clock and gives
//! the guest what is left of its budget in CPU time (see `Instance::within`). A unit that
//! waits far longer than its budget in wall-clock time (`WALL_LIMIT` times it: a thread
//! starved for minutes, a host call stuck on a blocked log pipe) still ends as a timeout.
//!
//! Reading a thread's CPU clock is a system call (~300 ns here, `CLOCK_THREAD_CPUTIME_ID`):
//! too dear for every event. A unit's starting point is therefore a *sample*: threads that
//! run guest code all the time (the actor pool's) are registered here, and the epoch ticker
//! reads their clocks once per tick. A sample is at most one tick old, so a unit is charged
//! at most one tick (10 ms by default) of CPU time it did not use: it may end that much
//! early, never late. Other threads (a deploy's, `drover replay`'s) read their clock at the
//! start of each unit.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One registered thread: its CPU clock, and the ticker's last reading of it.
struct Slot {
    clock: libc::clockid_t,
    /// Nanoseconds of CPU time, as last sampled.
    sampled: AtomicU64,
}

/// Every registered thread (the actor pool's, a few): the ticker samples them all.
static THREADS: Mutex<Vec<Arc<Slot>>> = Mutex::new(Vec::new());

thread_local! {
    static MINE: RefCell<Option<Arc<Slot>>> = const { RefCell::new(None) };
}

/// Registers the calling thread, whose units of guest work then start from the ticker's
/// samples instead of a clock read. For threads that run guest code all along (the actor
/// pool's `on_thread_start`); undone by [`unregister_current_thread`].
pub fn register_current_thread() {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `pthread_self` is the calling thread, alive for this call; `clock` is a valid
    // out-pointer.
    if unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) } != 0 {
        return;
    }
    let slot = Arc::new(Slot {
        clock,
        sampled: AtomicU64::new(read(clock).unwrap_or(0)),
    });
    THREADS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(slot.clone());
    MINE.with_borrow_mut(|mine| *mine = Some(slot));
}

/// Undoes [`register_current_thread`] (the pool's `on_thread_stop`): a thread that ended
/// must not be sampled, its clock id may name another thread later.
pub fn unregister_current_thread() {
    if let Some(slot) = MINE.with_borrow_mut(Option::take) {
        THREADS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|s| !Arc::ptr_eq(s, &slot));
    }
}

/// Samples every registered thread's clock: the epoch ticker calls it once per tick.
pub(crate) fn sample_all() {
    for slot in THREADS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        if let Some(ns) = read(slot.clock) {
            slot.sampled.store(ns, Ordering::Relaxed);
        }
    }
}

/// The calling thread's CPU time now (a clock read).
pub(crate) fn now() -> Duration {
    Duration::from_nanos(read(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or(0))
}

/// The calling thread's CPU time a moment ago: the last sample of a registered thread (at
/// most one epoch tick old, so never later than [`now`]), else a clock read.
pub(crate) fn recent() -> Duration {
    MINE.with_borrow(|mine| match mine {
        Some(slot) => Duration::from_nanos(slot.sampled.load(Ordering::Relaxed)),
        None => now(),
    })
}

fn read(clock: libc::clockid_t) -> Option<u64> {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid out-pointer; an invalid clock id (a thread that ended) is an
    // error return, not undefined behaviour.
    if unsafe { libc::clock_gettime(clock, &mut t) } != 0 {
        return None;
    }
    Some(t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(d: Duration) {
        let start = std::time::Instant::now();
        while start.elapsed() < d {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn a_thread_is_charged_for_the_cpu_it_used_and_samples_lag_behind() {
        std::thread::spawn(|| {
            register_current_thread();
            let before = recent();
            spin(Duration::from_millis(30));
            // Not sampled since: the sample has not moved, the clock has.
            assert_eq!(recent(), before);
            let used = now() - before;
            assert!(used >= Duration::from_millis(20), "{used:?}");
            sample_all();
            assert!(recent() >= before + Duration::from_millis(20));
            assert!(recent() <= now());
            // Sleeping costs no CPU time.
            let before = now();
            std::thread::sleep(Duration::from_millis(30));
            assert!(now() - before < Duration::from_millis(10));
            let registered = THREADS.lock().unwrap().len();
            unregister_current_thread();
            assert_eq!(THREADS.lock().unwrap().len(), registered - 1);
            // Unregistered, the thread reads its clock: no lag any more.
            let before = recent();
            spin(Duration::from_millis(30));
            assert!(recent() - before >= Duration::from_millis(20));
        })
        .join()
        .expect("thread");
    }
}
