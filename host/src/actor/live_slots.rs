//! The live-instance cap (`--max-live`) as admission: an actor takes a slot before it builds
//! its instance and gives it back when the instance is dropped.
//!
//! Asking the least recently used actors to passivate once the count went over the cap
//! (what the cap was before) let it overshoot: a passivation waits behind the events already
//! in its victim's mailbox, while every concurrent activation went on building instances. A
//! review measured 6x a cap of 50 under one gateway batch, and with guard pages (a cap of
//! 14,000 against the ~16,000 instances the mapping limit allows) healthy devices failed to
//! activate for want of memory mappings. With slots the cap holds: an activation that finds
//! none asks the router to passivate the least recently used instances (down to 90% of the
//! cap, so a busy fleet does not sweep at every activation) and waits, at most an
//! activation's budget, for one to be given back; past that its event is refused as the
//! server's overload (`503 overloaded`, which no quarantine counts), not the device's fault.
//!
//! A read of a passivated device builds an instance for the read only and drops it right
//! after (see `Actor::on_query`): it takes a slot if one is free, and goes on without one if
//! none is, rather than evict busy devices to make room for an instance that is about to go.
//! Such reads run one turn of an actor each, so they overshoot the cap by at most the
//! reads under way at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::Error;

/// How often an activation still waiting for a slot asks for another sweep: the one it
/// asked for first may have freed fewer than were waiting (instances asked to passivate
/// also take new events first), and newly live actors become candidates once idle.
const SWEEP_AGAIN: Duration = Duration::from_millis(50);

/// The slots of the live-instance cap; see the module docs.
pub(crate) struct LiveSlots {
    slots: Arc<Semaphore>,
    cap: usize,
    /// Activations waiting for a slot now: a sweep frees room for them too.
    waiting: AtomicUsize,
}

/// A slot taken; given back when dropped.
pub(crate) type LiveSlot = OwnedSemaphorePermit;

impl LiveSlots {
    pub(crate) fn new(cap: usize) -> LiveSlots {
        let cap = cap.clamp(1, Semaphore::MAX_PERMITS);
        LiveSlots {
            slots: Arc::new(Semaphore::new(cap)),
            cap,
            waiting: AtomicUsize::new(0),
        }
    }

    /// Slots taken now, and the activations waiting for one up to half the cap: what a sweep
    /// brings under the cap. (Not the live instances: an activation holds its slot before its
    /// instance exists, and a read's short-lived instance may have none.) Counted whole, a
    /// burst of 25,000 cold devices at a cap of 50 made every sweep passivate every live
    /// instance, busy ones included, and halved the rate the burst was served at (a review;
    /// 1.4-1.7k against 2.7-2.9k activations a second with half the cap).
    pub(crate) fn demand(&self) -> usize {
        let waiting = self
            .waiting
            .load(Ordering::Relaxed)
            .min(self.cap.div_ceil(2));
        self.cap - self.slots.available_permits().min(self.cap) + waiting
    }

    /// A slot if one is free now, for a read's short-lived instance (see the module docs).
    pub(crate) fn try_take(&self) -> Option<LiveSlot> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Takes a slot for an instance about to be built, asking `sweep` (the router's
    /// eviction of the least recently used) for room when there is none or it took the last,
    /// and waiting up to `patience` for one.
    pub(crate) async fn take(
        &self,
        sweep: impl Fn(),
        patience: Duration,
    ) -> Result<LiveSlot, Error> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            if self.slots.available_permits() == 0 {
                // The last one: make room before the next activation has to wait.
                sweep();
            }
            return Ok(slot);
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waited = Waiting(&self.waiting);
        let deadline = Instant::now() + patience;
        loop {
            sweep();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Overloaded(format!(
                    "the live-instance cap (--max-live {}) is reached and no live instance \
                     passivated within {patience:?} to make room for this device's; try again \
                     shortly",
                    self.cap
                )));
            }
            match tokio::time::timeout(left.min(SWEEP_AGAIN), self.slots.clone().acquire_owned())
                .await
            {
                Ok(Ok(slot)) => return Ok(slot),
                // Never closed: the semaphore lives as long as the runtime's actors.
                Ok(Err(_closed)) => {
                    return Err(Error::Internal("the live-instance slots are closed".into()));
                }
                Err(_elapsed) => {}
            }
        }
    }
}

/// Counts an activation as waiting for as long as it waits, however the wait ends (its
/// future dropped included).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// The cap holds: with every slot taken, an activation waits (asking for sweeps) until
    /// one is given back, and past its patience is refused as an overload.
    #[tokio::test]
    async fn the_cap_holds_and_a_wait_past_its_patience_is_an_overload() {
        let slots = Arc::new(LiveSlots::new(2));
        let sweeps = Arc::new(AtomicU32::new(0));
        let sweep = {
            let sweeps = sweeps.clone();
            move || {
                sweeps.fetch_add(1, Ordering::Relaxed);
            }
        };
        let first = slots.take(&sweep, Duration::ZERO).await.expect("free");
        assert_eq!(sweeps.load(Ordering::Relaxed), 0, "room left: no sweep");
        let second = slots.take(&sweep, Duration::ZERO).await.expect("free");
        assert_eq!(
            sweeps.load(Ordering::Relaxed),
            1,
            "the last slot asks for room"
        );
        assert!(slots.try_take().is_none());

        let refused = slots
            .take(&sweep, Duration::from_millis(120))
            .await
            .expect_err("no slot comes back");
        assert!(
            matches!(&refused, Error::Overloaded(m) if m.contains("--max-live 2")),
            "{refused:?}"
        );
        assert!(
            sweeps.load(Ordering::Relaxed) >= 3,
            "it asked again while waiting"
        );
        assert_eq!(slots.demand(), 2);

        let waiter = tokio::spawn({
            let slots = slots.clone();
            async move { slots.take(|| {}, Duration::from_secs(30)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(slots.demand(), 3, "two taken, one waiting");
        drop(first);
        let third = waiter.await.unwrap().expect("the slot given back");
        assert_eq!(slots.demand(), 2);
        drop((second, third));
        assert!(slots.try_take().is_some());
    }
}
