//! Guest linear memories laid out compactly, grown without making untouched pages resident.
//!
//! By default (`EngineConfig::guard_pages` off) every guest memory is one anonymous read-write
//! mapping: no `PROT_NONE` reservation, no guard pages, so adjacent memories merge into few
//! kernel mappings and one process holds 100k+ live instances (see `host/DESIGN.md`, "Live
//! instances"). The price is that a memory that outgrows its mapping must move.
//!
//! wasmtime moves such a memory by mapping a new region and copying the old contents into it.
//! The copy writes every byte of the old size, so every page of the new region becomes
//! resident, including the pages the guest never touched: a Rust guest's memory starts at
//! 1 MiB of stack plus its data and heap (~1.06 MiB; 128 KiB with the 62 KiB stack the SDK's
//! `plugin-build.rs` links), of which an idle actor has touched ~40 KiB. One `memory.grow` (a transition or an event of a few dozen KiB is enough) made
//! that actor ~1.2 MiB resident until passivation, 20x its size, and a fleet of them would
//! run the machine out of memory well under its live-instance cap.
//!
//! [`CompactMemories`] creates the memories instead, each mapped with room to double in
//! place (see [`CompactMemory`]). Past that a memory grows in place if the address space
//! after it is free (`mremap` without `MREMAP_MAYMOVE`), and otherwise into a fresh mapping
//! into which only the pages that hold something are copied, so pages the guest never
//! touched stay unbacked. (Moving it with `MREMAP_MAYMOVE` would copy nothing either, but a
//! moved region never merges with its neighbours again: each grown memory would cost one of
//! the process's 65,530 mappings, the limit this layout exists to avoid.) Memory is the
//! guest's, so only the host's bookkeeping lives here; bounds checks are in the compiled code
//! (no guard region is promised, see [`CompactMemories::new_memory`]).

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
///
/// The mapping is twice the size it was made for or last outgrew, read-write throughout: the
/// guest cannot reach past `size` (every access is bounds-checked against it), pages never
/// touched cost no memory, and a read-write tail merges with the neighbours as a `PROT_NONE`
/// reservation would not. So the common growths (a guest's allocator asks for 64 KiB at a
/// time) happen in place, and a memory moves, leaving a hole in the address space that may
/// split a merged mapping, only each time it doubles.
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
    /// A memory of `size` bytes, mapped with room to grow to twice that in place.
    pub(crate) fn new(size: usize) -> std::io::Result<CompactMemory> {
        let mapped = size
            .checked_mul(2)
            .and_then(round_up)
            .ok_or(std::io::ErrorKind::OutOfMemory)?;
        if mapped == 0 {
            return Ok(CompactMemory {
                base: NonNull::dangling(),
                mapped: 0,
                size,
            });
        }
        // `NORESERVE`: the room to grow is address space, not memory, so it is not charged
        // against the commit limit (in the kernel's default overcommit modes; a host with
        // `vm.overcommit_memory = 2` charges it all the same, as it charged the megabyte of
        // guest stack before).
        // SAFETY: a fresh private anonymous mapping at an address the kernel picks: it
        // aliases nothing.
        let ptr = unsafe {
            mm::mmap_anonymous(
                std::ptr::null_mut(),
                mapped,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )?
        };
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(std::io::ErrorKind::OutOfMemory)?;
        let memory = CompactMemory { base, mapped, size };
        // No transparent huge pages. Merged, the memories of many actors form one large
        // mapping; on a host whose THP setting is `always` the first touch of any page in
        // an aligned 2 MiB of it would back all 2 MiB, a few of one actor's pages and the
        // untouched room of its neighbours alike, and make an idle actor cost its whole
        // mapping. Every guest memory carries the same advice, so they still merge. Advice
        // only: a kernel built without huge pages refuses it (`EINVAL`), and has none to give.
        // SAFETY: advice on this value's own mapping; it changes no contents.
        if let Err(e) = unsafe { mm::madvise(ptr, mapped, mm::Advice::LinuxNoHugepage) } {
            tracing::debug!(error = %e, "no MADV_NOHUGEPAGE for a guest memory");
        }
        Ok(memory)
    }
}

// SAFETY: `as_ptr` points at `byte_capacity` bytes, readable, writable and zero-filled where
// never written; growth within `byte_capacity` never moves `as_ptr`; growth beyond it keeps
// the contents (extended in place, or every non-zero page copied).
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
        // Room to double again, as at creation.
        let new_mapped = new_size
            .checked_mul(2)
            .and_then(round_up)
            .ok_or_else(|| wasmtime::format_err!("memory size {new_size} overflows"))?;
        if self.mapped == 0 {
            *self = CompactMemory::new(new_size)?;
            return Ok(());
        }
        // In place when the address space after the mapping is free: the mapping just
        // extends (and stays mergeable with its neighbours).
        // SAFETY: `base..base + mapped` is this value's own mapping; without `MAYMOVE` the
        // kernel either extends it where it is or fails and leaves it as it was.
        let in_place = unsafe {
            mm::mremap(
                self.base.as_ptr().cast::<c_void>(),
                self.mapped,
                new_mapped,
                MremapFlags::empty(),
            )
        };
        if in_place.is_ok() {
            self.mapped = new_mapped;
            self.size = new_size;
            return Ok(());
        }
        // Elsewhere: a fresh mapping, into which only the pages holding something are
        // copied. Not `mremap(MREMAP_MAYMOVE)`: a moved region keeps its own page offset
        // and anonymous-memory record and never merges with its new neighbours again, so
        // each grown memory would cost a kernel mapping (`vm.max_map_count`, see the module
        // docs). Reading a page the guest never touched maps the kernel's shared zero page,
        // which costs no memory; a page that reads as zeros needs no copy, since the new
        // mapping reads as zeros too. Pages swapped out are read back, not skipped.
        // Only up to the current size: the guest never reached past it.
        let grown = CompactMemory::new(new_size)?;
        let page = page_size();
        let used = round_up(self.size).unwrap_or(self.mapped).min(self.mapped);
        for offset in (0..used).step_by(page) {
            // SAFETY: both ranges are within their own mappings, and they do not overlap
            // (two distinct live mappings). Mappings are page-aligned, so the words are
            // aligned.
            unsafe {
                let src = std::slice::from_raw_parts(self.base.as_ptr().add(offset), page);
                let words = std::slice::from_raw_parts(src.as_ptr().cast::<u64>(), page / 8);
                if words.iter().fold(0, |acc, w| acc | w) != 0 {
                    std::ptr::copy_nonoverlapping(
                        src.as_ptr(),
                        grown.base.as_ptr().add(offset),
                        page,
                    );
                }
            }
        }
        // The old mapping goes with the old value.
        *self = grown;
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

        let base = m.as_ptr();
        assert!(m.byte_capacity() >= 34 * WASM_PAGE, "room to double");
        m.grow_to(18 * WASM_PAGE).unwrap();
        assert_eq!(m.as_ptr(), base, "a first growth happens in place");
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
        // zero page, which mincore counts). A move that copied the whole memory would have
        // made the 17 old wasm pages (272 host pages) resident.
        let after = resident_pages(&m);
        assert!(
            after <= before + 2,
            "{after} pages resident after growing (was {before})"
        );
    }

    #[test]
    fn a_memory_with_no_room_after_it_moves_and_copies_only_what_it_holds() {
        let mut m = CompactMemory::new(17 * WASM_PAGE).unwrap();
        // Take the address space right after the memory, so it cannot grow in place.
        // SAFETY: `MAP_FIXED_NOREPLACE` never replaces a mapping; if the range is taken
        // already (by the kernel's placement of an earlier mapping), it is blocked anyway.
        let blocker = unsafe {
            mm::mmap_anonymous(
                m.as_ptr().add(m.mapped).cast(),
                page_size(),
                ProtFlags::READ,
                MapFlags::PRIVATE | MapFlags::FIXED_NOREPLACE,
            )
        };
        // SAFETY: within the memory.
        unsafe {
            m.as_ptr().add(3 * WASM_PAGE + 5).write(42);
            m.as_ptr().add(16 * WASM_PAGE).write(7);
        }
        let before = m.as_ptr();
        let past_room = m.byte_capacity() + WASM_PAGE;
        m.grow_to(past_room).unwrap();
        assert_ne!(m.as_ptr(), before, "no room after it: the memory moved");
        assert_eq!(m.byte_size(), past_room);
        // SAFETY: within the memory.
        unsafe {
            assert_eq!(m.as_ptr().add(3 * WASM_PAGE + 5).read(), 42);
            assert_eq!(m.as_ptr().add(16 * WASM_PAGE).read(), 7);
        }
        // Only the two pages written were copied; reading them back above touched nothing
        // else.
        let resident = resident_pages(&m);
        assert!(resident <= 2, "{resident} pages resident after the move");
        if let Ok(p) = blocker {
            // SAFETY: the test's own page.
            unsafe { mm::munmap(p, page_size()).unwrap() };
        }
    }

    /// The `VmFlags` of the kernel mapping that holds `addr` (`/proc/self/smaps`).
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = lo <= addr && addr < hi;
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.trim().to_string();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn memories_are_advised_against_huge_pages_through_growth() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            return; // a kernel without huge pages: nothing to advise against
        }
        let mut m = CompactMemory::new(17 * WASM_PAGE).unwrap();
        let flags = vm_flags(m.as_ptr() as usize);
        assert!(flags.split(' ').any(|f| f == "nh"), "VmFlags: {flags}");
        // Past its room, into a fresh mapping or extended in place: advised all the same.
        m.grow_to(m.byte_capacity() + WASM_PAGE).unwrap();
        let end = m.as_ptr() as usize + m.byte_size() - 1;
        let flags = vm_flags(end);
        assert!(flags.split(' ').any(|f| f == "nh"), "VmFlags: {flags}");
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
