//! `drover plugins`: list plugins, or upload a new version.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde::Deserialize;

use super::client::{ApiClient, ClientOpts, segment};
use super::format::timestamp;

/// `drover plugins [upload NAME FILE]`.
#[derive(Debug, Args)]
pub struct PluginsArgs {
    #[command(subcommand)]
    pub action: Option<PluginsAction>,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// What to do with plugins (default: list them).
#[derive(Debug, Subcommand)]
pub enum PluginsAction {
    /// List every plugin and its versions.
    List,
    /// Upload a component as the next version of plugin NAME.
    Upload {
        /// The plugin name (device type).
        name: String,
        /// The `.wasm` component file.
        file: PathBuf,
    },
}

#[derive(Debug, Deserialize)]
struct Version {
    version: u32,
    digest: String,
    registered_at_ms: u64,
}

#[derive(Debug, Deserialize)]
struct Plugin {
    name: String,
    latest: u32,
    versions: Vec<Version>,
}

#[derive(Debug, Deserialize)]
struct PluginList {
    plugins: Vec<Plugin>,
}

#[derive(Debug, Deserialize)]
struct Uploaded {
    name: String,
    version: u32,
    digest: String,
}

/// Runs `drover plugins`.
pub fn run(args: PluginsArgs) -> anyhow::Result<ExitCode> {
    let api = ApiClient::new(&args.client)?;
    match args.action.unwrap_or(PluginsAction::List) {
        PluginsAction::List => {
            let (text, list): (String, PluginList) = api.call_json(api.get("/v1/plugins"))?;
            if args.client.json {
                println!("{text}");
                return Ok(ExitCode::SUCCESS);
            }
            if list.plugins.is_empty() {
                println!("no plugins");
            }
            for p in &list.plugins {
                println!("{} (latest v{})", p.name, p.latest);
                for v in &p.versions {
                    println!(
                        "  v{:<4} {}  {}",
                        v.version,
                        timestamp(v.registered_at_ms),
                        v.digest
                    );
                }
            }
        }
        PluginsAction::Upload { name, file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let req = api
                .post(&format!("/v1/plugins/{}", segment(&name)))
                .header("content-type", "application/wasm")
                .body(bytes);
            let (status, text) = api.call(req)?;
            if args.client.json {
                println!("{text}");
                return Ok(ExitCode::SUCCESS);
            }
            let u: Uploaded = serde_json::from_str(&text)
                .with_context(|| format!("unexpected answer: {text}"))?;
            if status == 201 {
                println!("{} v{} registered ({})", u.name, u.version, u.digest);
            } else {
                println!(
                    "{} v{} already has these bytes ({}): unchanged",
                    u.name, u.version, u.digest
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
