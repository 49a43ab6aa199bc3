//! Guest linear memories laid out compactly, grown without copying.
//!
//! By default (`EngineConfig::guard_pages` off) every guest memory is one anonymous read-write
//! mapping of exactly its current size: no reservation beyond it, no guard pages, so adjacent
//! memories merge into few kernel mappings and one process holds 100k+ live instances (see
//! `host/DESIGN.md`, "Live instances"). The price is that a memory that grows must move.
//!
//! wasmtime moves such a memory by mapping a new region and copying the old contents into it.
//! The copy writes every byte of the old size, so every page of the new region becomes
//! resident, including the pages the guest never touched: a Rust guest's memory starts at
//! 1 MiB of stack plus its data and heap (~1.06 MiB), of which an idle actor has touched
//! ~40 KiB. One `memory.grow` (a transition or an event of a few dozen KiB is enough) made
//! that actor ~1.2 MiB resident until passivation, 20x its size, and a fleet of them would
//! run the machine out of memory well under its live-instance cap.
//!
//! [`CompactMemories`] creates the memories instead. Growth is `mremap(MREMAP_MAYMOVE)`: the
//! kernel extends the mapping in place when the address space after it is free and otherwise
//! moves its page tables, so pages never touched stay unbacked and nothing is copied. Memory
//! is the guest's, so only the host's bookkeeping lives here; bounds checks are in the
//! compiled code (no guard region is promised, see [`CompactMemories::new_memory`]).

use std::ffi::c_void;
use std::ptr::NonNull;

use rustix::mm::{self, MapFlags, MremapFlags, ProtFlags};
use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

/// The [`MemoryCreator`] of the compact layout: see the module docs.
pub(crate) struct CompactMemories;

// SAFETY: every memory it returns is zero-filled, at least `minimum` bytes, and honours the
// contract of `CompactMemory` below; it refuses the configurations it cannot honour (a
// reservation or a guard region, which compiled code would rely on to skip bounds checks).
unsafe impl MemoryCreator for CompactMemories {
    fn new_memory(
        &self,
        _ty: MemoryType,
        minimum: usize,
        _maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        if reserved_size_in_bytes.unwrap_or(0) != 0 || guard_size_in_bytes != 0 {
            return Err(format!(
                "compact memories take no reservation ({reserved_size_in_bytes:?} bytes asked) \
                 and no guard region ({guard_size_in_bytes} bytes asked)"
            ));
        }
        CompactMemory::new(minimum)
            .map(|m| Box::new(m) as Box<dyn LinearMemory>)
            .map_err(|e| format!("cannot map a guest memory of {minimum} bytes: {e}"))
    }
}

/// One guest memory: `mapped` bytes at `base` (a multiple of the host's page size, 0 for a
/// memory of size 0, which maps nothing), of which the guest sees `size`.
pub(crate) struct CompactMemory {
    base: NonNull<u8>,
    mapped: usize,
    size: usize,
}

// SAFETY: the memory is plain bytes owned by this value; wasmtime serialises access to it
// through its store.
unsafe impl Send for CompactMemory {}
// SAFETY: as above; `&self` methods only read the bookkeeping.
unsafe impl Sync for CompactMemory {}

fn page_size() -> usize {
    rustix::param::page_size()
}

fn round_up(bytes: usize) -> Option<usize> {
    let page = page_size();
    bytes.checked_add(page - 1).map(|b| b / page * page)
}

impl CompactMemory {
    pub(crate) fn new(size: usize) -> std::io::Result<CompactMemory> {
        let mapped = round_up(size).ok_or(std::io::ErrorKind::OutOfMemory)?;
        if mapped == 0 {
            return Ok(CompactMemory {
                base: NonNull::dangling(),
                mapped: 0,
                size,
            });
        }
        // SAFETY: a fresh private anonymous mapping at an address the kernel picks: it
        // aliases nothing.
        let ptr = unsafe {
            mm::mmap_anonymous(
                std::ptr::null_mut(),
                mapped,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )?
        };
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(std::io::ErrorKind::OutOfMemory)?;
        Ok(CompactMemory { base, mapped, size })
    }
}

// SAFETY: `as_ptr` points at `byte_capacity` bytes, readable, writable and zero-filled where
// never written; growth within `byte_capacity` never moves `as_ptr`; growth beyond it keeps
// the contents (mremap moves page tables, not data).
unsafe impl LinearMemory for CompactMemory {
    fn byte_size(&self) -> usize {
        self.size
    }

    fn byte_capacity(&self) -> usize {
        self.mapped
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        if new_size <= self.mapped {
            self.size = self.size.max(new_size);
            return Ok(());
        }
        let new_mapped = round_up(new_size)
            .ok_or_else(|| wasmtime::format_err!("memory size {new_size} overflows"))?;
        if self.mapped == 0 {
            *self = CompactMemory::new(new_size)?;
            return Ok(());
        }
        // SAFETY: `base..base + mapped` is this value's own mapping; after the call only the
        // returned address is used. The kernel keeps the contents and zero-fills the rest.
        let ptr = unsafe {
            mm::mremap(
                self.base.as_ptr().cast::<c_void>(),
                self.mapped,
                new_mapped,
                MremapFlags::MAYMOVE,
            )?
        };
        self.base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| wasmtime::format_err!("mremap returned a null address"))?;
        self.mapped = new_mapped;
        self.size = new_size;
        Ok(())
    }

    fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }
}

impl Drop for CompactMemory {
    fn drop(&mut self) {
        if self.mapped == 0 {
            return;
        }
        // SAFETY: the mapping is this value's own and nothing uses it after the drop.
        if let Err(e) = unsafe { mm::munmap(self.base.as_ptr().cast::<c_void>(), self.mapped) } {
            tracing::warn!(error = %e, bytes = self.mapped, "unmapping a guest memory failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WASM_PAGE: usize = 64 * 1024;

    /// Pages of `m` the kernel holds in memory.
    fn resident_pages(m: &CompactMemory) -> usize {
        let pages = m.mapped / page_size();
        let mut vec = vec![0u8; pages];
        // SAFETY: `vec` has one byte per page of the mapping, which is `m`'s own.
        let r = unsafe { libc::mincore(m.as_ptr().cast(), m.mapped, vec.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|b| **b & 1 == 1).count()
    }

    #[test]
    fn growth_keeps_contents_and_leaves_untouched_pages_unbacked() {
        // A Rust guest's shape: 17 wasm pages (1 MiB of stack, then data and heap), of which
        // an idle actor touches a few.
        let mut m = CompactMemory::new(17 * WASM_PAGE).unwrap();
        assert_eq!(m.byte_size(), 17 * WASM_PAGE);
        // SAFETY: within the memory.
        unsafe {
            m.as_ptr().add(16 * WASM_PAGE).write(7);
            m.as_ptr().add(17 * WASM_PAGE - 1).write(9);
        }
        let before = resident_pages(&m);
        assert!(before <= 2, "{before} pages resident after two writes");

        m.grow_to(18 * WASM_PAGE).unwrap();
        assert_eq!(m.byte_size(), 18 * WASM_PAGE);
        assert!(m.byte_capacity() >= 18 * WASM_PAGE);
        // SAFETY: within the memory.
        unsafe {
            assert_eq!(m.as_ptr().add(16 * WASM_PAGE).read(), 7);
            assert_eq!(m.as_ptr().add(17 * WASM_PAGE - 1).read(), 9);
            assert_eq!(
                m.as_ptr().add(17 * WASM_PAGE).read(),
                0,
                "new pages read as zero"
            );
            m.as_ptr().add(18 * WASM_PAGE - 1).write(1);
        }
        // The read and the write above touched one new page each (a read maps the shared
        // zero page, which mincore counts). A copying move would have made all 18 wasm pages
        // (288 host pages) resident.
        let after = resident_pages(&m);
        assert!(
            after <= before + 2,
            "{after} pages resident after growing (was {before})"
        );
    }

    #[test]
    fn a_memory_of_size_zero_maps_nothing_and_grows() {
        let mut m = CompactMemory::new(0).unwrap();
        assert_eq!((m.byte_size(), m.byte_capacity()), (0, 0));
        m.grow_to(WASM_PAGE).unwrap();
        assert_eq!(m.byte_size(), WASM_PAGE);
        // SAFETY: within the memory.
        unsafe {
            assert_eq!(m.as_ptr().read(), 0);
            m.as_ptr().write(3);
        }
        m.grow_to(3 * WASM_PAGE).unwrap();
        // SAFETY: within the memory.
        assert_eq!(unsafe { m.as_ptr().read() }, 3);
    }

    #[test]
    fn a_reservation_or_guard_region_is_refused() {
        let ty = MemoryType::new(1, None);
        assert!(
            CompactMemories
                .new_memory(ty.clone(), WASM_PAGE, None, Some(1 << 32), 0)
                .is_err()
        );
        assert!(
            CompactMemories
                .new_memory(ty, WASM_PAGE, None, Some(0), 64 * 1024)
                .is_err()
        );
    }
}
