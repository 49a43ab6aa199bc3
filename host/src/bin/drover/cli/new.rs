//! `drover new NAME`: scaffolds a plugin crate that builds, tests and uploads as it is.
//!
//! The crate is a workspace of its own (it builds wherever it is put), carries the build
//! settings that make guests small and fast (`[profile.release]`), a first behavior with
//! native tests, and a README with the commands. The guest SDK is not published on a
//! registry yet, so the crate depends on it by path: the SDK this `drover` was built from
//! (`guest-sdk/` of its source tree), or `--sdk DIR`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

/// `drover new NAME [--path DIR] [--sdk DIR]`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// The plugin's name: the crate name and the name it is pushed under (letters, digits,
    /// `-` and `_`).
    pub name: String,
    /// Where to create the crate (default: `./NAME`).
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// The `drover-guest` SDK directory (default: the one of this `drover`'s source tree).
    #[arg(long, env = "DROVER_SDK")]
    pub sdk: Option<PathBuf>,
}

const CARGO_TOML: &str = include_str!("template/Cargo.toml.in");
const LIB_RS: &str = include_str!("template/lib.rs.in");
const README: &str = include_str!("template/README.md.in");

/// The SDK of the source tree this binary was built from.
fn built_in_sdk() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("guest-sdk"), |p| p.join("guest-sdk"))
}

/// Crate names (with `_` for `-`) a plugin crate links, so cannot take.
const RESERVED: &[&str] = &[
    "drover_guest",
    "serde",
    "serde_json",
    "std",
    "core",
    "alloc",
    "proc_macro",
];

/// Runs `drover new`.
pub fn run(args: NewArgs) -> anyhow::Result<ExitCode> {
    let name = args.name.as_str();
    // Lowercase: rustc warns of a crate named otherwise ("should have a snake case name")
    // at every build of the plugin, `drover dev`'s included.
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name.starts_with(|c: char| c.is_ascii_lowercase());
    if !valid {
        let lower = name.to_ascii_lowercase();
        let hint = if lower != name && lower.starts_with(|c: char| c.is_ascii_lowercase()) {
            format!(" (`{lower}`?)")
        } else {
            String::new()
        };
        anyhow::bail!(
            "`{name}` is not a valid plugin name: use a lowercase letter, then lowercase \
             letters, digits, `-` or `_` (at most 64){hint}"
        );
    }
    // A crate may not share its name with a crate it links: the template's dependencies
    // (rustc: "multiple candidates for rlib dependency `serde`"; cargo: a package collision
    // for `drover-guest`) and the standard library's crates (doc-tests cannot resolve the
    // prelude of a crate named `std`).
    let crate_name = name.replace('-', "_");
    if RESERVED.contains(&crate_name.as_str()) {
        anyhow::bail!(
            "`{name}` cannot be a plugin name: the plugin's crate would share its name with a \
             crate it links ({}); pick another",
            RESERVED.join(", ")
        );
    }
    let sdk = args.sdk.unwrap_or_else(built_in_sdk);
    let sdk = sdk.canonicalize().with_context(|| {
        format!(
            "the guest SDK is not at {} (pass --sdk DIR: the `guest-sdk` directory of a Drover \
             source tree)",
            sdk.display()
        )
    })?;
    if !sdk.join("Cargo.toml").is_file() {
        anyhow::bail!("{} holds no Cargo.toml: not the guest SDK", sdk.display());
    }
    if !sdk.join("plugin-build.rs").is_file() {
        anyhow::bail!(
            "{} holds no plugin-build.rs (the guest memory layout): an SDK older than this \
             drover; pass --sdk DIR with the `guest-sdk` of this drover's source tree",
            sdk.display()
        );
    }
    let dir = args.path.unwrap_or_else(|| PathBuf::from(name));
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!("{} is a file: pass a new or empty directory", dir.display());
    }
    if dir.exists() && std::fs::read_dir(&dir).map_or(true, |mut d| d.next().is_some()) {
        anyhow::bail!("{} already exists and is not empty", dir.display());
    }
    let lib = name.replace('-', "_");
    let fill = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{lib}}", &lib)
            .replace("{{sdk}}", &sdk.display().to_string().replace('\\', "/"))
    };
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let files = [
        ("Cargo.toml", fill(CARGO_TOML)),
        ("src/lib.rs", fill(LIB_RS)),
        ("README.md", fill(README)),
        (".gitignore", "/target\n".to_string()),
    ];
    for (file, text) in files {
        let path = dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("created plugin `{name}` in {}", dir.display());
    // Said, since it is a path on this machine the crate now depends on (`--sdk` picks
    // another): by default the SDK of the source tree this binary was built from.
    println!("  using the guest SDK at {}", sdk.display());
    println!("  cd {}", dir.display());
    println!("  cargo test");
    println!("  drover dev .        # local server; rebuilds and hot-reloads on every save");
    Ok(ExitCode::SUCCESS)
}
