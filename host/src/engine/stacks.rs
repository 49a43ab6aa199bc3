//! Fiber stacks for preemptible guest calls, reused across instances through a pool.
//!
//! A preemptible call (see `Instance::handle_preemptible`) runs the guest on a fiber of its
//! own, so that it can yield its thread at an epoch tick and be resumed later, possibly on
//! another thread. wasmtime takes a stack for a store's first such call and keeps it until
//! the store drops (wasmtime 48 offers no public way to give it back sooner). Each is two
//! memory mappings (stack and guard page) and the pages its calls touched: the engine caps
//! the stacks held at once (`MAX_FIBER_STACKS`), and only instances of plugins that have run
//! slow take one.
//!
//! A stack given back (its store dropped: the device passivated, evicted or failed) comes
//! here, its pages released (`MADV_DONTNEED`), and is handed to the next store that needs
//! one instead of a fresh mapping; at most [`KEEP`] wait unused, the rest are unmapped.
//!
//! Reusing a stack across devices shows a guest nothing of another: a guest reaches only its
//! own linear memory, never the native stack its compiled code runs on.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustix::mm::{self, MapFlags, MprotectFlags, ProtFlags};
use wasmtime::{StackCreator, StackMemory};

/// Most unused stacks kept for reuse; more are unmapped when given back.
const KEEP: usize = 64;

/// The pool: hands out stacks of one size, and takes them back when wasmtime drops them.
pub(crate) struct StackPool {
    free: Mutex<Vec<Stack>>,
    /// Stacks handed out and not yet given back: held by stores.
    held: AtomicUsize,
}

impl StackPool {
    pub(crate) fn new() -> Arc<StackPool> {
        Arc::new(StackPool {
            free: Mutex::new(Vec::new()),
            held: AtomicUsize::new(0),
        })
    }

    /// Stacks held by stores now.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    fn give_back(&self, stack: Stack) {
        self.held.fetch_sub(1, Ordering::Relaxed);
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < KEEP {
            // Its touched pages go back to the system; the next use faults in zeroes.
            // SAFETY: the stack's own usable range, which nothing runs on any more.
            let released = unsafe {
                mm::madvise(
                    stack.usable_start().cast(),
                    stack.usable(),
                    mm::Advice::LinuxDontNeed,
                )
            };
            if released.is_ok() {
                free.push(stack);
            }
        }
        // Otherwise dropped here, unmapped.
    }

    /// Unused stacks held (for tests).
    #[cfg(test)]
    fn unused(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// What wasmtime is given: the pool, behind an `Arc` so each stack can find its way back.
pub(crate) struct PooledStacks(pub(crate) Arc<StackPool>);

// SAFETY: every stack handed out is a private mapping of `size` usable bytes above a
// `PROT_NONE` guard page, page-aligned, owned by the `PooledStack` until wasmtime drops it.
unsafe impl StackCreator for PooledStacks {
    fn new_stack(&self, size: usize, zeroed: bool) -> wasmtime::Result<Box<dyn StackMemory>> {
        let reused = {
            let mut free = self.0.free.lock().unwrap_or_else(|e| e.into_inner());
            // One engine asks for one size; a stack of another would wait here unused.
            let at = free.iter().rposition(|s| s.usable() == size);
            at.map(|i| free.swap_remove(i))
        };
        let stack = match reused {
            Some(stack) => {
                if zeroed {
                    // SAFETY: the usable range is this stack's own read-write memory, unused.
                    unsafe { std::ptr::write_bytes(stack.usable_start(), 0, stack.usable()) };
                }
                stack
            }
            // A fresh anonymous mapping is zero-filled already.
            None => Stack::map(size)?,
        };
        self.0.held.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(PooledStack {
            stack: Some(stack),
            pool: self.0.clone(),
        }))
    }
}

/// One stack while wasmtime holds it; back to the pool when dropped.
struct PooledStack {
    stack: Option<Stack>,
    pool: Arc<StackPool>,
}

impl Drop for PooledStack {
    fn drop(&mut self) {
        if let Some(stack) = self.stack.take() {
            self.pool.give_back(stack);
        }
    }
}

// SAFETY: the ranges describe the mapping this value owns for as long as it lives.
unsafe impl StackMemory for PooledStack {
    fn top(&self) -> *mut u8 {
        let s = self.stack.as_ref().expect("held until dropped");
        // SAFETY: one past the end of the mapping this stack owns.
        unsafe { s.base.add(s.len) }
    }

    fn range(&self) -> Range<usize> {
        let s = self.stack.as_ref().expect("held until dropped");
        let start = s.usable_start() as usize;
        start..start + s.usable()
    }

    fn guard_range(&self) -> Range<*mut u8> {
        let s = self.stack.as_ref().expect("held until dropped");
        s.base..s.usable_start()
    }
}

/// A mapping: one guard page at the bottom (stacks grow down), then the usable stack.
struct Stack {
    base: *mut u8,
    len: usize,
    guard: usize,
}

// SAFETY: a `Stack` owns its mapping alone; nothing about it is tied to a thread.
unsafe impl Send for Stack {}
unsafe impl Sync for Stack {}

impl Stack {
    fn map(size: usize) -> wasmtime::Result<Stack> {
        let page = rustix::param::page_size();
        let len = size.div_ceil(page) * page + page;
        // SAFETY: a new private anonymous mapping; no existing memory is touched.
        let base = unsafe {
            mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .map_err(|e| wasmtime::format_err!("could not map a {len}-byte fiber stack: {e}"))?;
        let stack = Stack {
            base: base.cast(),
            len,
            guard: page,
        };
        // SAFETY: the first page of the mapping just made (dropped with `stack` on error).
        unsafe { mm::mprotect(base, page, MprotectFlags::empty()) }.map_err(|e| {
            wasmtime::format_err!("could not protect a fiber stack's guard page: {e}")
        })?;
        Ok(stack)
    }

    fn usable(&self) -> usize {
        self.len - self.guard
    }

    fn usable_start(&self) -> *mut u8 {
        // SAFETY: within the mapping (the guard is its first page).
        unsafe { self.base.add(self.guard) }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping this value made and owns; nothing uses it any more.
        if let Err(e) = unsafe { mm::munmap(self.base.cast(), self.len) } {
            tracing::warn!(error = %e, "could not unmap a fiber stack");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stack given back is handed out again, not mapped anew; the pool keeps at most
    /// `KEEP` unused.
    #[test]
    fn stacks_are_reused_and_the_unused_are_bounded() {
        let pool = StackPool::new();
        let creator = PooledStacks(pool.clone());
        let first = creator.new_stack(64 << 10, false).expect("stack");
        let top = first.top();
        assert_eq!(first.range().len(), 64 << 10);
        assert_eq!(first.range().end, top as usize);
        assert_eq!(first.guard_range().end as usize, first.range().start);
        assert_eq!(pool.held(), 1);
        drop(first);
        assert_eq!(pool.unused(), 1);
        assert_eq!(pool.held(), 0);
        let again = creator.new_stack(64 << 10, true).expect("stack");
        assert_eq!(again.top(), top, "the stack given back is reused");
        assert_eq!(pool.unused(), 0);
        drop(again);
        let many: Vec<_> = (0..KEEP + 8)
            .map(|_| creator.new_stack(64 << 10, false).expect("stack"))
            .collect();
        drop(many);
        assert_eq!(pool.unused(), KEEP);
    }
}
