//! `drover serve`: the server.
//!
//! `drover serve --data DIR --listen ADDR [--plugins DIR]` is part of the public contract.
//! Without `--plugins`, the example plugins embedded in the binary are registered; with it,
//! every `NAME.wasm` in the directory is registered under `NAME` (and the embedded ones are
//! not). Once the API is listening, one line goes to stdout:
//!
//! ```text
//! drover listening on http://127.0.0.1:7070
//! ```
//!
//! so scripts and tests can start it with `--listen 127.0.0.1:0` and read the port.
//! SIGTERM or Ctrl-C shut it down gracefully (see [`drover::http::server`]); a second signal
//! during the drain exits at once (acknowledged events are durable either way).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use drover::Runtime;
use drover::http::{Limits, Server, server::shutdown_signal};

/// `drover serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data directory: journal, plugin store, lock.
    #[arg(long, default_value = "./data")]
    pub data: PathBuf,
    /// Address to listen on (port 0 picks a free port; the listening line tells which).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Register every NAME.wasm in this directory instead of the embedded example plugins.
    #[arg(long)]
    pub plugins: Option<PathBuf>,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// Runtime and HTTP knobs shared by `serve`, `demo` and `bench`.
#[derive(Debug, Clone, Args)]
pub struct Tuning {
    /// Messages that may wait in one device's mailbox before senders get 429.
    #[arg(long, default_value_t = 256)]
    pub mailbox: usize,
    /// Records per device that may be waiting for the disk.
    #[arg(long, default_value_t = 128)]
    pub max_in_flight: usize,
    /// Keep at most this many devices' instances alive; past it the least recently used are
    /// passivated (they reactivate from snapshot + journal on their next message).
    #[arg(long, default_value_t = 10_000)]
    pub max_live: usize,
    /// Passivate a device after this many seconds without a message.
    #[arg(long, default_value_t = 300)]
    pub idle_timeout_secs: u64,
    /// Snapshot a device after this many transitions (0 disables).
    #[arg(long, default_value_t = 1000)]
    pub snapshot_every: u64,
    /// Longest a guest call may run, in milliseconds.
    #[arg(long, default_value_t = 250)]
    pub call_timeout_ms: u64,
    /// Largest accepted event, in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_event_bytes: usize,
    /// Largest accepted plugin upload, in bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_plugin_bytes: usize,
    /// Most events in one `POST /v1/events` batch.
    #[arg(long, default_value_t = 10_000)]
    pub max_batch_items: usize,
    /// Seconds to let open requests finish at shutdown.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// Open a journal that is damaged in the middle (not just at its tail) by cutting it at
    /// the first bad record. Everything after it is set aside in `journal.log.dropped-*`,
    /// acknowledged events included: inspect before using this.
    #[arg(long)]
    pub salvage: bool,
}

impl Tuning {
    /// The HTTP limits these flags ask for.
    pub fn limits(&self) -> Limits {
        Limits {
            max_event_bytes: self.max_event_bytes,
            max_plugin_bytes: self.max_plugin_bytes,
            max_batch_items: self.max_batch_items,
            // Room for every item at the event limit would be absurd; 32 MiB or the items at
            // 1 KiB each, whichever is larger.
            max_batch_bytes: (32 << 20).max(self.max_batch_items.saturating_mul(1024)),
            ..Limits::default()
        }
    }

    /// Opens the runtime on `data` with these settings and `plugins` (`None`: the embedded
    /// example plugins).
    pub async fn open(&self, data: &Path, plugins: Option<&Path>) -> anyhow::Result<Runtime> {
        let mut builder = Runtime::builder(data)
            .mailbox_capacity(self.mailbox)
            .max_in_flight(self.max_in_flight)
            .max_live_instances(self.max_live)
            .idle_timeout(Duration::from_secs(self.idle_timeout_secs))
            .snapshot_every(self.snapshot_every)
            .call_timeout(Duration::from_millis(self.call_timeout_ms))
            .max_event_bytes(self.max_event_bytes)
            .salvage_journal(self.salvage);
        match plugins {
            Some(dir) => builder = builder.plugin_dir(dir),
            None => {
                for (name, bytes) in crate::embedded::EMBEDDED {
                    builder = builder.plugin(*name, *bytes);
                }
            }
        }
        builder.open().await
    }
}

/// Runs `drover serve` until SIGTERM or Ctrl-C.
pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("drover-worker")
        .build()
        .context("starting the async runtime")?;
    tokio.block_on(serve(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let rt = args
        .tuning
        .open(&args.data, args.plugins.as_deref())
        .await
        .with_context(|| format!("opening {}", args.data.display()))?;
    let server = Server::start(rt.clone(), &args.listen, args.tuning.limits()).await?;
    announce(&server)?;

    shutdown_signal().await;
    // A second signal while draining: leave now. Every acknowledged event is already durable.
    tokio::spawn(async {
        shutdown_signal().await;
        tracing::warn!("second signal: exiting without waiting for the drain");
        std::process::exit(130);
    });
    let drained = server
        .shutdown(Duration::from_secs(args.tuning.drain_timeout_secs))
        .await;
    rt.shutdown().await;
    tracing::info!(drained, "stopped");
    Ok(())
}

/// Prints the machine-readable listening line on stdout.
pub fn announce(server: &Server) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "drover listening on {}", server.url()).context("writing to stdout")?;
    out.flush().context("flushing stdout")?;
    Ok(())
}
