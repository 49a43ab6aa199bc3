//! The plugin directory of the tests: the example plugins the build made for the binary
//! (`DROVER_EXAMPLE_PLUGIN_DIR`) plus the test-only `misbehave`, built here on first use
//! with the same nested `cargo` as `host/build.rs` (see `guest_build.rs`).
//!
//! `misbehave` traps, spins, hoards memory and floods output on demand; it is never part of
//! the binary, so the build script does not build it and only test processes pay for it
//! (once per process: a no-op cargo run once it is built).
//!
//! Shared by the integration tests (through `support`) and by the `guest` bench, which
//! includes this file with `#[path]`.
#![allow(dead_code)]

#[path = "guest_build.rs"]
mod guest_build;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The example plugins, as the build script made them.
pub const EXAMPLES: &[&str] = &["thermostat", "door-lock", "room"];
/// The test-only plugins, built by [`plugin_dir`].
pub const TEST_ONLY: &[&str] = &["misbehave"];

/// A directory holding `thermostat.wasm`, `door-lock.wasm` and `misbehave.wasm`: a
/// ready-made `--plugins` dir (or `RuntimeBuilder::plugin_dir`) for tests. Built once per
/// process; panics with the cargo output if the plugins do not build.
pub fn plugin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(make_plugin_dir)
}

fn make_plugin_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ lives in the workspace root");
    // The cargo running the tests, else the one that built them.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let target_dir = guest_build::plugin_target_dir(workspace);
    let built = guest_build::build(cargo, workspace, &target_dir, TEST_ONLY);

    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("drover-test-plugins");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    for name in EXAMPLES {
        let file = format!("{name}.wasm");
        let from = Path::new(env!("DROVER_EXAMPLE_PLUGIN_DIR")).join(&file);
        let bytes =
            std::fs::read(&from).unwrap_or_else(|e| panic!("cannot read {}: {e}", from.display()));
        guest_build::write_if_changed(&dir.join(file), &bytes);
    }
    for name in TEST_ONLY {
        let bytes = guest_build::read_component(&built, name);
        guest_build::write_if_changed(&dir.join(format!("{name}.wasm")), &bytes);
    }
    dir
}

/// The test-only `misbehave` plugin built with cargo `features` (`"v2"`, `"v3"`: see its
/// crate docs), for the deploy tests. Built in a target directory of their own (one
/// dependency build, then only the plugin crate per variant), one variant at a time, so the
/// default artifact other tests use is never overwritten.
pub fn misbehave_variant(features: &str) -> Vec<u8> {
    variant("variants", "misbehave", &format!("misbehave/{features}"))
}

/// The `thermostat` example built against the frozen first contract,
/// `drover:device@0.1.0` (the SDK's `contract-v0-1` feature): what a plugin built before
/// effects existed looks like to the host. In a target directory of its own.
pub fn thermostat_v0_1() -> Vec<u8> {
    variant("contract-v0-1", "thermostat", "drover-guest/contract-v0-1")
}

/// The `thermostat` example built against the frozen second contract,
/// `drover:device@0.2.0` (the SDK's `contract-v0-2` feature): effects, but no `apply-batch`,
/// so the host replays it one `apply` call per transition. In a target directory of its own.
pub fn thermostat_v0_2() -> Vec<u8> {
    variant("contract-v0-2", "thermostat", "drover-guest/contract-v0-2")
}

/// Plugin `package` built with cargo `features` in target directory `dir` (under the
/// plugins' own), one build at a time.
fn variant(dir: &str, package: &str, features: &str) -> Vec<u8> {
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ lives in the workspace root");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let target_dir = guest_build::plugin_target_dir(workspace).join(dir);
    let built =
        guest_build::build_with_features(cargo, workspace, &target_dir, &[package], features);
    guest_build::read_component(&built, package)
}

/// A `cargo` command for building crates outside the workspace (a scaffolded plugin), with
/// the test run's environment stripped, and the cargo that runs the tests.
pub fn cargo_command() -> std::process::Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    guest_build::clean_cargo(cargo)
}

/// Removes the test run's cargo environment from `cmd` (for a process that runs cargo).
pub fn strip_build_env(cmd: &mut std::process::Command) {
    guest_build::strip_build_env(cmd);
}

/// A target directory for crates the tests build outside the workspace, shared across runs
/// so their dependencies are built once.
pub fn outside_target_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ lives in the workspace root");
    guest_build::plugin_target_dir(workspace).join("outside")
}
