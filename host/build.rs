//! Builds the workspace's plugins into `wasm32-wasip2` components for the host.
//!
//! The host embeds the example plugins (so `drover serve` has device types out of the box) and
//! its tests load every plugin, including the deliberately broken `misbehave`, from a
//! directory. Building them here keeps the components in step with the SDK and the WIT
//! contract on every `cargo build`/`cargo test`, with no extra command to remember.
//!
//! A nested `cargo build` runs with its own target dir (the outer build holds the lock on the
//! outer one, so sharing it would deadlock) and with the outer build's environment stripped,
//! so host flags, wrappers (clippy-driver, sccache) and features do not leak into the guests.
//!
//! Output in `OUT_DIR`: `<package>.wasm` for each plugin and `embedded_plugins.rs` with
//! `EMBEDDED` (the example plugins' bytes) and `TEST_PLUGIN_DIR` (the directory with all of
//! them).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";
const PROFILE: &str = "plugin";

/// (package name, embedded in the binary?)
const PLUGINS: &[(&str, bool)] = &[
    ("thermostat", true),
    ("door-lock", true),
    ("misbehave", false),
];

/// Environment variables cargo or the user set for the outer build that must not steer the
/// nested guest build.
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
    "DEP_",
    "__CARGO",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .expect("host/ lives in the workspace root")
        .to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));

    for watched in ["plugins", "guest-sdk", "wit", "Cargo.toml", "Cargo.lock"] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    check_target_installed();

    let target_dir = plugin_target_dir(&workspace);
    build_plugins(&workspace, &target_dir);

    let built = target_dir.join(TARGET).join(PROFILE);
    for (name, _) in PLUGINS {
        let artifact = built.join(format!("{}.wasm", name.replace('-', "_")));
        let bytes = fs::read(&artifact).unwrap_or_else(|e| {
            panic!(
                "plugin `{name}` was not built at {}: {e}",
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
        write_if_changed(&out_dir.join(format!("{name}.wasm")), &bytes);
    }

    write_if_changed(
        &out_dir.join("embedded_plugins.rs"),
        generated_source(&out_dir).as_bytes(),
    );
}

/// Fails early, with the fix, when the guest target's standard library is absent.
fn check_target_installed() {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let output = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", TARGET])
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {rustc:?}: {e}"));
    let libdir = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let installed = output.status.success()
        && fs::read_dir(&libdir)
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false);
    if !installed {
        panic!(
            "\n\nThe `{TARGET}` target is not installed, and the host embeds plugins built for \
             it.\nrun `rustup target add {TARGET}`\n\n"
        );
    }
}

/// `<outer target dir>/plugins`: separate from the outer target dir's lock, shared by every
/// outer profile so the guests are built once.
fn plugin_target_dir(workspace: &Path) -> PathBuf {
    let outer = match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir), // an absolute path replaces the workspace
        None => workspace.join("target"),
    };
    outer.join("plugins")
}

fn build_plugins(workspace: &Path, target_dir: &Path) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .arg("build")
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .args(["--profile", PROFILE, "--target", TARGET])
        .arg("--target-dir")
        .arg(target_dir);
    for (name, _) in PLUGINS {
        cmd.args(["-p", name]);
    }
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

    eprintln!("running: {cmd:?}");
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the plugins: {e}"));
    // Shown by cargo when the build script fails, or with `-vv`.
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        panic!(
            "building the plugins failed ({}); the command and its output are above",
            output.status
        );
    }
}

fn generated_source(out_dir: &Path) -> String {
    let out_dir = out_dir.to_str().expect("OUT_DIR is not UTF-8");
    let mut src = String::from(
        "// @generated by host/build.rs: the plugins of this workspace, built for wasm32-wasip2.\n\n\
         /// The example plugins compiled into the binary as (name, component bytes), so a\n\
         /// fresh install has device types to provision without a plugin directory.\n\
         pub const EMBEDDED: &[(&str, &[u8])] = &[\n",
    );
    for (name, embedded) in PLUGINS {
        if *embedded {
            let path = Path::new(out_dir).join(format!("{name}.wasm"));
            let path = path.to_str().expect("OUT_DIR is not UTF-8");
            writeln!(src, "    ({name:?}, include_bytes!({path:?})),").unwrap();
        }
    }
    src.push_str("];\n\n");
    let all = PLUGINS
        .iter()
        .map(|(name, _)| format!("`{name}.wasm`"))
        .collect::<Vec<_>>()
        .join(", ");
    writeln!(
        src,
        "/// The directory holding every plugin of the workspace ({all}), including the\n\
         /// test-only ones, as `NAME.wasm`: a ready-made `--plugins` dir for tests.\n\
         pub const TEST_PLUGIN_DIR: &str = {out_dir:?};"
    )
    .unwrap();
    src
}

/// Leaves unchanged files alone so their timestamps do not trigger needless rebuilds.
fn write_if_changed(path: &Path, contents: &[u8]) {
    if fs::read(path).is_ok_and(|old| old == contents) {
        return;
    }
    fs::write(path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
