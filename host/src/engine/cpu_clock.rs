//! Thread CPU clocks, so that a guest's time budget counts the CPU time it used, not the
//! time its thread waited for a core.
//!
//! A wall-clock budget charges a guest for contention it did not cause: with six looping
//! devices on a 2-core machine, a healthy device's 150 ms event (60% of its 250 ms budget)
//! timed out, lost its instance and left a dead letter. So the epoch deadline only says when
//! to *look*: when it passes, the engine's callback reads the thread's CPU clock and gives
//! the guest what is left of its budget in CPU time (see `Instance::within`). A unit that
//! waits far longer than its budget in wall-clock time (`WALL_LIMIT` times it: a thread
//! starved for minutes, a host call stuck on a blocked log pipe) is still interrupted, and
//! told apart: `CallError::Starved`, the server's overload (`503 overloaded`).
//!
//! Reading a thread's CPU clock is a system call (~300 ns here, `CLOCK_THREAD_CPUTIME_ID`):
//! too dear for every event. A unit's starting point is therefore a *sample*: a thread that
//! runs guest code is registered here at its first unit (and unregistered when it ends), and
//! the epoch ticker reads the clocks of all registered threads once per tick. A sample is at
//! most one tick old, so a unit is charged at most one tick (10 ms by default) of CPU time it
//! did not use: it may end that much early, never late.

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
    /// The calling thread's registration, made at its first unit of guest work and undone
    /// when the thread ends (a thread's clock id may name another thread later).
    static MINE: Registration = Registration::new();
}

struct Registration(Option<Arc<Slot>>);

impl Registration {
    fn new() -> Registration {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `pthread_self` is the calling thread, alive for this call; `clock` is a
        // valid out-pointer.
        if unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) } != 0 {
            return Registration(None);
        }
        let slot = Arc::new(Slot {
            clock,
            sampled: AtomicU64::new(read(clock).unwrap_or(0)),
        });
        THREADS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(slot.clone());
        Registration(Some(slot))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            THREADS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|s| !Arc::ptr_eq(s, &slot));
        }
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

/// The calling thread's CPU time a moment ago: the ticker's last sample of it (at most one
/// epoch tick old, so never later than [`now`]). The first call on a thread registers it.
pub(crate) fn recent() -> Duration {
    MINE.try_with(|mine| match &mine.0 {
        Some(slot) => Duration::from_nanos(slot.sampled.load(Ordering::Relaxed)),
        None => now(),
    })
    // A thread already tearing down its thread-locals reads its clock.
    .unwrap_or_else(|_| now())
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

    /// Spins until this thread has used `d` of CPU time: by the wall clock, a thread the
    /// kernel preempted (the suite's other tests run beside it) used less (13.7 ms of a
    /// 30 ms spin, once).
    fn spin(d: Duration) {
        let start = now();
        while now() - start < d {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn a_thread_is_charged_for_the_cpu_it_used_and_samples_lag_behind() {
        std::thread::spawn(|| {
            // The first reading registers the thread.
            recent();
            let mine = MINE.with(|m| m.0.clone()).expect("registered");
            let sampled =
                |slot: &Arc<Slot>| THREADS.lock().unwrap().iter().any(|s| Arc::ptr_eq(s, slot));
            assert!(sampled(&mine));
            sample_all();
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
            mine
        })
        .join()
        .map(|mine| {
            // The thread ended: it is not sampled any more.
            assert!(
                !THREADS
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|s| Arc::ptr_eq(s, &mine))
            );
        })
        .expect("thread");
    }
}
