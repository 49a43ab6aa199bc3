//! The `drover` binary: the server, a client for the v1 API, and the tools around it.
//!
//! Only the binary needs these modules, so they live beside it rather than in the library
//! (embedders build `drover` with `--no-default-features` and get neither clap nor an HTTP
//! client nor the plugins' build):
//!
//! * [`cli`]: the command line (`serve`, the client commands, `replay`, `sim`, `demo`,
//!   `bench`); see its docs for each command.
//! * [`sim`]: the fleet simulator that drives a server over HTTP (`sim`, `demo`,
//!   `bench http`).
//! * [`embedded`]: the example plugins (thermostat, room, door-lock), built from `plugins/` by
//!   `host/build.rs` and compiled into the binary.

mod cli;
mod embedded;
mod sim;

use std::process::ExitCode;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

/// mimalloc rather than glibc's malloc: requests are allocated on the HTTP threads and freed
/// on the actor threads, which glibc pays for in arena locks and consolidation (~13% of the
/// server's CPU under load). Off with `--no-default-features --features cli`.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if cli::writes_a_stream(&cli) {
        restore_sigpipe();
    }
    // Logs go to stderr, filtered by RUST_LOG; stdout is for answers and the machine-readable
    // listening line.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(cli::default_log_level(&cli)));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colors only for a person at a terminal, not in log files and CI output.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written (stderr on a full disk) is dropped: by default
        // the subscriber reports it with `eprintln!`, which panics when stderr fails.
        .log_internal_errors(false)
        .init();
    raise_open_files_limit();
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // Runtime errors (from offline commands) lead with their stable code, like the
            // server's errors do.
            // Written without `eprintln!`, which panics when stderr cannot be written.
            let line = match e.downcast_ref::<drover::Error>() {
                Some(d) => format!("error: {}: {e:#}\n", d.code()),
                None => format!("error: {e:#}\n"),
            };
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            ExitCode::FAILURE
        }
    }
}

/// Lets a one-shot command die quietly of SIGPIPE when its reader goes away
/// (`drover devices | head`), as Unix tools do. Rust ignores SIGPIPE, so the next `println!`
/// would fail with `EPIPE` and panic instead. Long-running commands (the server, `dev`,
/// `demo`) keep ignoring it: a client that hangs up must never kill a server.
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in `main`, before any other thread exists; SIG_DFL is a
    // valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Raises the soft limit on open files to the hard one, as the Go runtime does for every
/// program: the journal keeps each segment file open and each connection is a descriptor,
/// and a soft limit of 1,024 (a common default) is a per-session convention, not a budget
/// this process was given. A failure keeps the limit as it was (logged at debug).
fn raise_open_files_limit() {
    #[cfg(unix)]
    {
        let Some(mut limit) = open_files_limit() else {
            return;
        };
        let soft = limit.rlim_cur;
        // An unlimited hard limit (macOS) is refused as a soft one: then the kernel's
        // per-process cap, at most (Go does the same with macOS's 10,240).
        for to in [limit.rlim_max, 1 << 20, 10_240] {
            if to <= soft || to > limit.rlim_max {
                continue;
            }
            limit.rlim_cur = to;
            // SAFETY: `limit` is a valid `rlimit`; raising the soft limit up to the hard
            // one needs no privilege.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
                return;
            }
        }
        if soft < limit.rlim_max {
            tracing::debug!(soft, "the open-files limit could not be raised");
        }
    }
}

/// The process's limit on open files (soft and hard), if it can be read.
#[cfg(unix)]
fn open_files_limit() -> Option<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable `rlimit` for the duration of the call.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit)
}
