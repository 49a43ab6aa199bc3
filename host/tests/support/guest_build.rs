//! Building the workspace's plugins into `wasm32-wasip2` components with a nested `cargo`.
//!
//! Shared, through `#[path]`, by `host/build.rs` (the example plugins, for the binary) and
//! the tests' `plugins.rs` (the test-only `misbehave`), so both run the same command.
//! Plain `std`, no `env!`: it is compiled into a build script too.
//!
//! The nested `cargo build` runs with its own target dir (an outer build holds the lock on
//! the outer one, so sharing it would deadlock) and with the outer build's environment
//! stripped, so host flags, wrappers (clippy-driver, sccache) and features do not leak into
//! the guests.
#![allow(dead_code)]

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guests' target.
pub const TARGET: &str = "wasm32-wasip2";
/// The guests' cargo profile (see the workspace `Cargo.toml`).
pub const PROFILE: &str = "plugin";

/// Environment variables cargo or the user set for the outer build (or test run) that must
/// not steer the nested guest build.
const STRIPPED_VARS: &[&str] = &[
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_TARGET_DIR",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
    "CARGO_INCREMENTAL",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "RUSTC_LINKER",
    "TARGET",
    "HOST",
    "PROFILE",
    "OPT_LEVEL",
    "DEBUG",
    "NUM_JOBS",
    "OUT_DIR",
];

/// Prefixes of variables to strip: the outer package's metadata, features, cfgs and `links`
/// data, cargo-internal switches (e.g. `cargo fix`'s), and `build.*` config (target,
/// target-dir, rustflags, wrappers) except `jobs`.
const STRIPPED_PREFIXES: &[&str] = &[
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
    "CARGO_FEATURE_",
    "CARGO_CFG_",
    "CARGO_BIN_",
    "DEP_",
    "__CARGO",
];

/// `<outer target dir>/plugins`: separate from the outer target dir's lock, shared by every
/// outer profile (and by the build script and the tests) so the guests' dependencies are
/// built once.
pub fn plugin_target_dir(workspace: &Path) -> PathBuf {
    let outer = match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir), // an absolute path replaces the workspace
        None => workspace.join("target"),
    };
    outer.join("plugins")
}

/// Builds `packages` of the workspace at `workspace` for [`TARGET`] with `cargo`, and
/// returns the directory holding their artifacts (`<package with _ for ->.wasm`). The
/// command's output is printed on stderr; a failure panics with the command.
pub fn build(cargo: OsString, workspace: &Path, target_dir: &Path, packages: &[&str]) -> PathBuf {
    build_with_features(cargo, workspace, target_dir, packages, "")
}

/// [`build`] with cargo `--features` (empty: none).
pub fn build_with_features(
    cargo: OsString,
    workspace: &Path,
    target_dir: &Path,
    packages: &[&str],
    features: &str,
) -> PathBuf {
    let mut cmd = clean_cargo(cargo);
    cmd.current_dir(workspace)
        .arg("build")
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .args(["--profile", PROFILE, "--target", TARGET])
        .arg("--target-dir")
        .arg(target_dir);
    for name in packages {
        cmd.args(["-p", name]);
    }
    if !features.is_empty() {
        cmd.args(["--features", features]);
    }

    eprintln!("running: {cmd:?}");
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the plugins: {e}"));
    // Shown by cargo when the build script fails, or with `-vv`; by the test harness when
    // a test fails.
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        panic!(
            "building the plugins failed ({}); the command and its output are above",
            output.status
        );
    }
    target_dir.join(TARGET).join(PROFILE)
}

/// A `cargo` command with the outer build's environment stripped (see the module docs).
pub fn clean_cargo(cargo: impl Into<OsString>) -> Command {
    let mut cmd = Command::new(cargo.into());
    strip_build_env(&mut cmd);
    cmd
}

/// Removes the outer build's environment from `cmd` (see the module docs).
pub fn strip_build_env(cmd: &mut Command) {
    for var in STRIPPED_VARS {
        cmd.env_remove(var);
    }
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let build_config = key.starts_with("CARGO_BUILD_") && key != "CARGO_BUILD_JOBS";
        if build_config || STRIPPED_PREFIXES.iter().any(|p| key.starts_with(p)) {
            cmd.env_remove(key);
        }
    }
}

/// The component built for `package` in `built` (from [`build`]), checked to be a component.
pub fn read_component(built: &Path, package: &str) -> Vec<u8> {
    let artifact = built.join(format!("{}.wasm", package.replace('-', "_")));
    let bytes = std::fs::read(&artifact).unwrap_or_else(|e| {
        panic!(
            "plugin `{package}` was not built at {}: {e}",
            artifact.display()
        )
    });
    // A component has the Wasm magic followed by version 0x0d and layer 1.
    if !bytes.starts_with(b"\0asm\x0d\0\x01\0") {
        panic!(
            "{} is a core Wasm module, not a component: is the `{TARGET}` target's linker \
             (wasm-component-ld) missing?",
            artifact.display()
        );
    }
    bytes
}

/// Writes `contents` to `path` unless it holds them already (so timestamps do not trigger
/// needless rebuilds), through a temporary file and a rename so that concurrent writers
/// (test processes) never expose a half-written file.
pub fn write_if_changed(path: &Path, contents: &[u8]) {
    if std::fs::read(path).is_ok_and(|old| old == contents) {
        return;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, contents)
        .and_then(|()| std::fs::rename(&tmp, path))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
