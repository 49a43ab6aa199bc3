//! The `drover` binary: see [`drover::cli`] for the commands.

use std::process::ExitCode;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = drover::cli::Cli::parse();
    // Logs go to stderr, filtered by RUST_LOG; stdout is for answers and the machine-readable
    // listening line.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(drover::cli::default_log_level(&cli)));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colors only for a person at a terminal, not in log files and CI output.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match drover::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // Runtime errors (from offline commands) lead with their stable code, like the
            // server's errors do.
            match e.downcast_ref::<drover::Error>() {
                Some(d) => eprintln!("error: {}: {e:#}", d.code()),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}
