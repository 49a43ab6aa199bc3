//! The `drover` command line: the server, a client for the v1 API, and the tools around it.
//!
//! * [`serve`]: `drover serve`, the server (the public contract's flags).
//! * [`device`]: `send`, `state`, `journal`, `provision`, `devices`: one HTTP call each.
//! * [`effects`]: `commands list|watch|ack` (a device's outbox) and `timers`.
//! * [`plugins`]: `plugin push|list|show|deploy|rollback|diff` (hot reload).
//! * [`new`]: `new NAME`, a plugin crate that builds, tests and uploads as it is.
//! * [`dev`]: `dev [DIR]`, rebuild + push + deploy on every save, against a local server.
//! * [`replay`]: `replay`, rebuilding a device from a data directory without a server.
//! * [`history`]: `journal export|import` and `backup`, from and to data directories.
//! * [`fleet`]: `sim` (the fleet simulator over HTTP), `demo` (server + simulated fleet in
//!   one process) and `bench http`.
//! * [`client`]: the blocking HTTP client the one-call commands share, and how server errors
//!   become exit codes; [`format`]: readable output.
//!
//! Client commands print readable text by default and the server's JSON with `--json`.
//! Failures print the server's error code and message on stderr and exit non-zero.

pub mod client;
pub mod dev;
pub mod device;
pub mod effects;
pub mod fleet;
pub mod format;
pub mod history;
pub mod new;
pub mod plugins;
pub mod replay;
pub mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Drover: a runtime for device fleets, one sandboxed event-sourced actor per device.
#[derive(Debug, Parser)]
#[command(name = "drover", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Every subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: the HTTP API over a data directory.
    Serve(serve::ServeArgs),
    /// Send one event (JSON) to a device and print its seq and transitions.
    Send(device::SendArgs),
    /// Print a device's state (now, or right after seq `--at`).
    State(device::StateArgs),
    /// Print a device's journal, a page at a time; `journal export|import` for portable
    /// histories.
    Journal(device::JournalArgs),
    /// Create a device running a plugin.
    Provision(device::ProvisionArgs),
    /// List the provisioned devices.
    Devices(device::DevicesArgs),
    /// End a device's quarantine now, so its next event runs its plugin again.
    Resume(device::ResumeArgs),
    /// Remove a device (its records stay in the journal; `--archive` also exports them).
    Remove(device::RemoveArgs),
    /// List the events a device's plugin failed on (trap, timeout, oversized output, invalid
    /// effect), the messages and timer firings it refused, and the messages it sent that
    /// could not be delivered.
    DeadLetters(device::DeadLettersArgs),
    /// A device's outbox: the commands its plugin issued for the physical device (list,
    /// watch as they come, acknowledge).
    Commands(effects::CommandsArgs),
    /// List a device's pending durable timers.
    Timers(effects::TimersArgs),
    /// Plugins: push a version, list, show, deploy, roll back, diff (dry-run).
    #[command(alias = "plugins")]
    Plugin(plugins::PluginsArgs),
    /// Create a plugin crate (builds, tests and uploads as it is).
    New(new::NewArgs),
    /// Develop a plugin: local server, rebuild and hot-reload into its devices on every save.
    Dev(dev::DevArgs),
    /// Rebuild a device's state from a data directory, without a server.
    Replay(replay::ReplayArgs),
    /// Copy a data directory consistently, even while its server runs.
    Backup(history::BackupArgs),
    /// Simulate a fleet against a running server.
    Sim(fleet::SimArgs),
    /// Start a server with the example plugins and a simulated fleet, in one process.
    Demo(fleet::DemoArgs),
    /// Measure throughput and latency.
    Bench(fleet::BenchArgs),
}

/// Runs the parsed command line. Errors are reported by the caller.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Send(args) => device::send(args),
        Command::State(args) => device::state(args),
        Command::Journal(args) => device::journal(args),
        Command::Provision(args) => device::provision(args),
        Command::Devices(args) => device::devices(args),
        Command::Resume(args) => device::resume(args),
        Command::Remove(args) => device::remove(args),
        Command::DeadLetters(args) => device::dead_letters(args),
        Command::Commands(args) => effects::commands(args),
        Command::Timers(args) => effects::timers(args),
        Command::Plugin(args) => plugins::run(args),
        Command::New(args) => new::run(args),
        Command::Dev(args) => dev::run(args),
        Command::Replay(args) => replay::run(args),
        Command::Backup(args) => history::backup(args),
        Command::Sim(args) => fleet::sim(args),
        Command::Demo(args) => fleet::demo(args),
        Command::Bench(args) => fleet::bench(args),
    }
}

/// Whether the command prints its answer and exits (so dying of SIGPIPE when the reader
/// leaves is right), as opposed to serving (see `main`).
pub fn writes_a_stream(cli: &Cli) -> bool {
    !matches!(
        cli.command,
        Command::Serve(_)
            | Command::Dev(_)
            | Command::Demo(_)
            | Command::Bench(_)
            | Command::Sim(_)
    )
}

/// The log filter when `RUST_LOG` is not set: the server logs at `info`; every other command
/// prints its own output on stdout and only warnings on stderr (the demo included: its
/// server's per-event logs would bury the simulator's progress line).
pub fn default_log_level(cli: &Cli) -> &'static str {
    match cli.command {
        Command::Serve(_) => "info",
        // The local server's warnings (a device that stays on its version) matter here, and
        // so does what the plugin being written prints or logs (`println!` is at info).
        Command::Dev(_) => "warn,drover::deploy=info,drover::guest=info",
        _ => "warn",
    }
}
