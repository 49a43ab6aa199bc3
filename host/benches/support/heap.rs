//! The heap in use, for the benches that measure memory per device (`timers`, `fleet`):
//! mimalloc (the `drover` binary's allocator) wrapped to count the blocks it hands out, or,
//! built with `--no-default-features --features cli`, glibc's malloc and its counters.
//! Included with `#[path]` in place of `allocator.rs`.

/// Bytes the allocator has handed out and not taken back: heap in use, which, unlike the
/// resident set, goes down when memory is freed and leaves out the guests' linear memories
/// (mappings of their own, see `host/src/engine/memory.rs`). With mimalloc (the binary's allocator, on by default), the
/// usable size of every live block as [`Counting`] tracks it; with glibc's malloc
/// (`--no-default-features --features cli`), its `mallinfo2` counters.
pub fn heap_bytes() -> u64 {
    #[cfg(feature = "mimalloc")]
    {
        counting::in_use()
    }
    #[cfg(not(feature = "mimalloc"))]
    {
        // SAFETY: `mallinfo2` only reads the allocator's counters.
        let info = unsafe { libc::mallinfo2() };
        (info.uordblks + info.hblkhd) as u64
    }
}

/// mimalloc, as the binary runs it, counting the usable size of the blocks it hands out
/// (size-class rounding included, as glibc's counters include chunk overhead). The counts
/// are spread over cache-line-sized shards picked per thread, so threads do not contend on
/// one counter on every allocation.
#[cfg(feature = "mimalloc")]
mod counting {
    use std::alloc::{GlobalAlloc, Layout};
    use std::cell::Cell;
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

    use mimalloc::MiMalloc;

    const SHARDS: usize = 64;

    #[repr(align(64))]
    struct Shard(AtomicI64);

    static SHARD: [Shard; SHARDS] = [const { Shard(AtomicI64::new(0)) }; SHARDS];
    static NEXT: AtomicUsize = AtomicUsize::new(0);

    thread_local! {
        // `const` and without a destructor: safe to touch from inside the allocator.
        static MINE: Cell<usize> = const { Cell::new(usize::MAX) };
    }

    fn add(bytes: i64) {
        let i = MINE
            .try_with(|m| {
                if m.get() == usize::MAX {
                    m.set(NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
                }
                m.get()
            })
            .unwrap_or(0);
        SHARD[i].0.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn in_use() -> u64 {
        SHARD
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum::<i64>()
            .max(0) as u64
    }

    pub struct Counting;

    // SAFETY: every call is forwarded to mimalloc; the counting only reads the blocks' sizes.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: forwarded with the caller's guarantees.
            let p = unsafe { MiMalloc.alloc(layout) };
            if !p.is_null() {
                // SAFETY: `p` is a live block of mimalloc's.
                add(unsafe { MiMalloc.usable_size(p) } as i64);
            }
            p
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            // SAFETY: forwarded with the caller's guarantees.
            let p = unsafe { MiMalloc.alloc_zeroed(layout) };
            if !p.is_null() {
                // SAFETY: `p` is a live block of mimalloc's.
                add(unsafe { MiMalloc.usable_size(p) } as i64);
            }
            p
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` is a live block of mimalloc's until the call below.
            add(-(unsafe { MiMalloc.usable_size(ptr) } as i64));
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { MiMalloc.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: `ptr` is a live block of mimalloc's until the call below.
            let before = unsafe { MiMalloc.usable_size(ptr) } as i64;
            // SAFETY: forwarded with the caller's guarantees.
            let p = unsafe { MiMalloc.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                // SAFETY: `p` is a live block of mimalloc's.
                add(unsafe { MiMalloc.usable_size(p) } as i64 - before);
            }
            p
        }
    }

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;
}
