//! The build script of every Drover plugin: the guest's memory layout.
//!
//! A plugin crate points at this file (`build = ".../guest-sdk/plugin-build.rs"` in its
//! `Cargo.toml`; `drover new` writes that line), so the layout comes with the SDK and changes
//! with it. It only acts on the component (`wasm32` targets); native builds, such as a
//! plugin's tests, keep the platform's stack.
//!
//! **A 62 KiB stack instead of Rust's 1 MiB.** Rust links a wasm guest's stack first in its
//! linear memory, then its data, then its heap. Every live actor's memory is its own mapping
//! in the server, so the stack's size sets how far apart the few pages an idle actor touches
//! lie (~8 pages: the stack's top, the data, the heap's first bytes and the allocator's
//! trailing record). With 1 MiB of stack a memory is 1.06 MiB (17 pages of 64 KiB) and each
//! live actor takes a page-table page (4 KiB) of its own, which the resident set does not
//! show; with 62 KiB it is 128 KiB and eight actors share one. Measured with the fleet bench
//! (`cargo bench -p drover --bench fleet`), see the README's "Performance".
//!
//! **62 KiB, not 64.** The stack ends, and the data begins, half way into a 4 KiB page, so
//! the top 2 KiB of the stack (most calls go no deeper) shares a page with the start of the
//! data, where 64 KiB would put them on two. On the thermostat that is one page fewer per
//! live actor. Never more pages than a page-aligned stack: a deeper call touches the page
//! below, as it would have.
//!
//! **What a guest may do with it.** The stack holds what wasm code keeps in memory rather than
//! in locals (arrays, structs passed by reference, buffers on the stack), not every frame:
//! parsing JSON nested 128 deep (serde_json's limit) takes a few KiB. A guest that recurses
//! deeper than its stack traps (the stack is first, so it runs off the bottom of memory, never
//! into the data; the server's message says the stack overflowed, it seems, when one function
//! fills the backtrace): the event is rejected with the trap, the instance is rebuilt from the
//! journal and the device goes on. A plugin that needs more sets its own
//! `-zstack-size=BYTES` here (a multiple of 16).

/// Bytes of guest stack: 64 KiB less half a page (see the module docs).
const STACK_BYTES: u32 = 62 * 1024;

fn main() {
    // Nothing here reads the plugin's sources: rerun only when its manifest (or, as cargo
    // does by itself, this script) changes, not on every save.
    println!("cargo::rerun-if-changed=Cargo.toml");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("wasm32") {
        println!("cargo::rustc-link-arg-cdylib=-zstack-size={STACK_BYTES}");
    }
}
