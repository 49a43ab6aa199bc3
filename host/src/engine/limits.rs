//! What guest instances may take: each store's own limits (wasmtime's `StoreLimits`: one
//! linear memory capped at [`EngineConfig::max_memory`], a few tables and instances) and one
//! limit the whole process shares, the guest memory budget
//! ([`EngineConfig::guest_memory_budget`]).
//!
//! Why a shared limit: an instance's cap (64 MiB) bounds one device, not a fleet. 100k live
//! actors of a plugin that keeps what it allocates could ask for terabytes, and the kernel's
//! OOM killer would end the process: every device unavailable until a restart, which could
//! run into the same. Growth past the budget is refused like growth past an instance's cap;
//! the guest then fails (a Rust guest aborts) and the engine tells why
//! ([`super::CallError::GuestMemory`]): the server's fault, `503 overloaded`, no step toward
//! the device's quarantine. The budget comes back as instances are dropped (passivation,
//! eviction, the failed call itself), and a refusal makes the router passivate the least
//! recently used instances that hold some of it (`Router::relieve_memory`).
//!
//! What is counted is each linear memory's size past its initial size, not resident pages.
//! An initial memory (a Rust guest's ~1.06 MiB, or 128 KiB with the SDK's build script, mostly
//! stack it never touches) costs only the pages touched, which the live-instance cap budgets
//! for; grown memory is what a guest asked for, and a Rust guest grows its heap to use it.
//!
//! [`EngineConfig::max_memory`]: crate::config::EngineConfig::max_memory
//! [`EngineConfig::guest_memory_budget`]: crate::config::EngineConfig::guest_memory_budget

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use wasmtime::{ResourceLimiter, StoreLimits};

/// The bytes all live guest memories of one engine have grown past their initial sizes, and
/// the most they may.
pub(crate) struct GuestMemoryBudget {
    budget: u64,
    grown: AtomicU64,
    /// Called at each refusal, on the thread of the guest call (so it must be cheap: the
    /// runtime's spawns the router's relief, see `Router::relieve_memory`).
    on_refusal: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl GuestMemoryBudget {
    pub(crate) fn new(budget: u64) -> Arc<GuestMemoryBudget> {
        Arc::new(GuestMemoryBudget {
            budget,
            grown: AtomicU64::new(0),
            on_refusal: std::sync::OnceLock::new(),
        })
    }

    /// Takes `bytes` of the budget, or nothing if they do not fit.
    fn take(&self, bytes: u64) -> bool {
        self.grown
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |grown| {
                grown
                    .checked_add(bytes)
                    .filter(|&after| after <= self.budget)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: u64) {
        self.grown.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Bytes taken now.
    pub(crate) fn grown(&self) -> u64 {
        self.grown.load(Ordering::Acquire)
    }

    pub(crate) fn budget(&self) -> u64 {
        self.budget
    }

    /// Sets what to do at each refusal (once: later calls are ignored).
    pub(crate) fn on_refusal(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.on_refusal.set(f);
    }
}

/// A growth the budget refused, kept until the call it happened in ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestMemoryRefusal {
    /// Bytes the memory would have grown past its initial size.
    pub asked: u64,
    /// The budget's bytes taken when it was refused.
    pub grown: u64,
    pub budget: u64,
}

/// One store's limiter: its own limits, then its share of the engine's budget, given back
/// when the store is dropped.
pub(crate) struct GuestLimits {
    store: StoreLimits,
    budget: Arc<GuestMemoryBudget>,
    /// The memory's size when it was created (the first growth asked for: from 0).
    initial: Option<usize>,
    /// Bytes of the budget this store holds.
    taken: u64,
    /// Bytes the last allowed growth took, given back if wasmtime then reports it failed.
    /// (wasmtime also reports failures it never asked about, for memories with custom page
    /// sizes, which the engine does not enable; then this is 0 or an earlier growth's.)
    pending: u64,
    /// Set when the budget refused a growth (see [`GuestLimits::take_refusal`]).
    refused: Option<GuestMemoryRefusal>,
    /// The size a growth the instance's own cap refused asked for, kept until the call it
    /// happened in ends (see [`GuestLimits::take_capped`]).
    capped: Option<usize>,
}

impl GuestLimits {
    pub(crate) fn new(store: StoreLimits, budget: Arc<GuestMemoryBudget>) -> GuestLimits {
        GuestLimits {
            store,
            budget,
            initial: None,
            taken: 0,
            pending: 0,
            refused: None,
            capped: None,
        }
    }

    /// Bytes of the budget this store holds: its memory's growth past its initial size.
    pub(crate) fn taken(&self) -> u64 {
        self.taken
    }

    /// The budget's refusal since the last call, if any (and forgets it).
    pub(crate) fn take_refusal(&mut self) -> Option<GuestMemoryRefusal> {
        self.refused.take()
    }

    /// The size (bytes) of a growth past the instance's own memory cap asked for since the
    /// last call, if any (and forgets it): a guest that then fails ran out of memory,
    /// whatever it did next (a Rust guest reads `RUST_BACKTRACE` on its way to abort, a
    /// trap naming the environment import that told its author nothing).
    pub(crate) fn take_capped(&mut self) -> Option<usize> {
        self.capped.take()
    }
}

impl ResourceLimiter for GuestLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if !self.store.memory_growing(current, desired, maximum)? {
            self.capped = Some(desired);
            return Ok(false);
        }
        let initial = *self.initial.get_or_insert(desired);
        let past = desired.saturating_sub(initial) as u64;
        self.pending = 0;
        if past <= self.taken {
            return Ok(true);
        }
        let more = past - self.taken;
        if self.budget.take(more) {
            self.taken = past;
            self.pending = more;
            Ok(true)
        } else {
            if let Some(relieve) = self.budget.on_refusal.get() {
                relieve();
            }
            self.refused = Some(GuestMemoryRefusal {
                asked: past,
                grown: self.budget.grown(),
                budget: self.budget.budget(),
            });
            Ok(false)
        }
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        // Allowed, then the mapping failed: the memory kept its size.
        let pending = std::mem::take(&mut self.pending);
        self.budget.give_back(pending);
        self.taken -= pending;
        self.store.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.store.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.store.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.store.instances()
    }

    fn tables(&self) -> usize {
        self.store.tables()
    }

    fn memories(&self) -> usize {
        self.store.memories()
    }
}

impl Drop for GuestLimits {
    fn drop(&mut self) {
        self.budget.give_back(self.taken);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::StoreLimitsBuilder;

    const MIB: usize = 1024 * 1024;

    fn limits(budget: &Arc<GuestMemoryBudget>) -> GuestLimits {
        GuestLimits::new(
            StoreLimitsBuilder::new().memory_size(64 * MIB).build(),
            budget.clone(),
        )
    }

    /// Initial memories are free, growth is counted once per byte past them, a growth past
    /// the budget is refused and said so, a failed growth and a dropped store give back what
    /// they held, and an instance's own cap still applies first.
    #[test]
    fn growth_past_initial_sizes_shares_one_budget() {
        let budget = GuestMemoryBudget::new(4 * MIB as u64);
        let mut a = limits(&budget);
        let mut b = limits(&budget);
        assert!(a.memory_growing(0, 2 * MIB, None).unwrap(), "initial");
        assert!(b.memory_growing(0, 2 * MIB, None).unwrap(), "initial");
        assert_eq!(budget.grown(), 0);
        assert!(a.memory_growing(2 * MIB, 5 * MIB, None).unwrap());
        assert_eq!(budget.grown(), 3 * MIB as u64);
        assert!(
            !b.memory_growing(2 * MIB, 4 * MIB, None).unwrap(),
            "3 + 2 > 4"
        );
        assert_eq!(
            b.take_refusal(),
            Some(GuestMemoryRefusal {
                asked: 2 * MIB as u64,
                grown: 3 * MIB as u64,
                budget: 4 * MIB as u64
            })
        );
        assert_eq!(b.take_refusal(), None, "told once");
        assert!(
            b.memory_growing(2 * MIB, 3 * MIB, None).unwrap(),
            "3 + 1 fits"
        );
        assert_eq!(budget.grown(), 4 * MIB as u64);
        // A growth allowed, then failed by the mapping: given back.
        assert!(
            a.memory_growing(5 * MIB, 5 * MIB + 1, None)
                .is_ok_and(|ok| !ok)
        );
        let _ = a.take_refusal();
        assert!(b.memory_growing(3 * MIB, 3 * MIB, None).unwrap());
        b.memory_grow_failed(wasmtime::format_err!("no room"))
            .unwrap();
        assert_eq!(budget.grown(), 4 * MIB as u64, "b holds its 1 MiB still");
        drop(a);
        assert_eq!(budget.grown(), MIB as u64);
        // Past the instance's own cap: refused by it, not by the budget.
        assert!(!b.memory_growing(3 * MIB, 65 * MIB, None).unwrap());
        assert_eq!(b.take_refusal(), None);
        drop(b);
        assert_eq!(budget.grown(), 0);
    }

    #[test]
    fn a_failed_growth_gives_its_bytes_back() {
        let budget = GuestMemoryBudget::new(4 * MIB as u64);
        let mut a = limits(&budget);
        assert!(a.memory_growing(0, MIB, None).unwrap());
        assert!(a.memory_growing(MIB, 3 * MIB, None).unwrap());
        assert!(a.memory_growing(3 * MIB, 4 * MIB, None).unwrap());
        assert_eq!(budget.grown(), 3 * MIB as u64);
        a.memory_grow_failed(wasmtime::format_err!("no room"))
            .unwrap();
        assert_eq!(budget.grown(), 2 * MIB as u64, "the last growth only");
        a.memory_grow_failed(wasmtime::format_err!("again"))
            .unwrap();
        assert_eq!(budget.grown(), 2 * MIB as u64, "given back once");
    }
}
