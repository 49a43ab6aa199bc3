//! The `drover` binary's allocator (see its `main.rs`), so that a bench measures what
//! `drover serve` runs; `--no-default-features --features cli` measures glibc's malloc.
//! Included with `#[path]` by the benches that run the runtime, except `timers` and `fleet`,
//! which use `heap.rs`: the same allocator, wrapped to count the heap in use.

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
