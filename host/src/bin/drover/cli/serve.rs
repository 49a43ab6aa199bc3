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

use drover::config::{MAX_PAYLOAD_LIMIT, defaults};
use drover::http::{Limits, Server, server::shutdown_signal};
use drover::{Runtime, RuntimeBuilder};

/// `drover serve`.
#[derive(Debug, Args)]
// A negative value is one for its flag to refuse by its range, not an unknown flag `-1`.
#[command(allow_negative_numbers = true)]
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

/// `"{what} [default: {default}]"`: the help of a tuning flag, whose default is the library's
/// (`drover::config::defaults`), so that the help cannot drift from what the flag does.
/// `--retention`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RetentionArg {
    KeepAll,
    AfterSnapshot,
}

fn help(what: &str, default: impl std::fmt::Display) -> String {
    format!("{what} [default: {default}]")
}

/// Runtime and HTTP knobs shared by `serve`, `demo` and `bench`.
///
/// Every flag is an optional override: left out, the setting is the library's default (the
/// one of `Runtime::builder` for the runtime, of `Limits::default` for the HTTP layer, both
/// from [`drover::config::defaults`]), which the help text shows. There is no second copy of
/// any default here.
/// The longest any of the server's timeouts may be set to: a day, in seconds.
const MAX_TIMEOUT_SECS: u64 = 86_400;

/// The most a guest's time budget (a call's, an activation's) may be set to: an hour, in ms.
const MAX_GUEST_BUDGET_MS: u64 = 3_600_000;

/// The least a guest's time budget may be set to, in ms: the deadline clock's tick
/// (`defaults::EPOCH_TICK`), the granularity at which a budget is looked at.
const MIN_GUEST_BUDGET_MS: u64 = defaults::EPOCH_TICK.as_millis() as u64;

/// The most `--commit-delay-us` takes (`defaults::MAX_COMMIT_DELAY`).
const MAX_COMMIT_DELAY_US: u64 = defaults::MAX_COMMIT_DELAY.as_micros() as u64;

/// Counts that must be at least 1 (0 refused every event, or served none).
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..=usize::MAX as u64)
}

/// Event and output limits: 1 byte to `config::MAX_PAYLOAD_LIMIT` (16 MiB).
fn payload_limit() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new()
        .range(1..=drover::config::MAX_PAYLOAD_LIMIT as u64)
}

#[derive(Debug, Clone, Default, Args)]
pub struct Tuning {
    // Bounded: past tokio's semaphore limit (2^61) every event panicked a worker.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000), help = help(
        "Messages that may wait in one device's mailbox before senders get 429 (1 to 1,000,000)",
        defaults::MAILBOX,
    ))]
    pub mailbox: Option<usize>,
    #[arg(long, value_parser = at_least_one(), help = help(
        "Unacknowledged commands per device before its events get 429 outbox-full (at least 1)",
        defaults::MAX_OUTBOX,
    ))]
    pub max_outbox: Option<usize>,
    #[arg(long, value_parser = at_least_one(), help = help(
        "Messages per device not yet handled by their targets before its events get 429 messages-pending (at least 1)",
        defaults::MAX_MESSAGES_PENDING,
    ))]
    pub max_messages_pending: Option<usize>,
    #[arg(long, value_parser = at_least_one(), help = help(
        "Records per device that may be waiting for the disk (at least 1)",
        defaults::MAX_IN_FLIGHT,
    ))]
    pub max_in_flight: Option<usize>,
    #[arg(long, value_parser = at_least_one(), help = help(
        "Keep at most this many devices' instances alive; past it the least recently used are \
         passivated (they reactivate from snapshot + journal on their next message). The default \
         is what this machine holds: half its memory at 96 KiB per live actor (at least 1)",
        defaults::max_live(),
    ))]
    pub max_live: Option<usize>,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=u64::MAX), help = help(
        "Passivate a device after this many seconds without a message (at least 1)",
        defaults::IDLE_TIMEOUT.as_secs(),
    ))]
    pub idle_timeout_secs: Option<u64>,
    #[arg(long, help = help(
        "Snapshot a device after this many transitions (0: never by count; a device is still \
         snapshotted when it passivates, so that it reactivates from there)",
        defaults::SNAPSHOT_EVERY,
    ))]
    pub snapshot_every: Option<u64>,
    // At most an hour: with u64::MAX a looping guest held its thread, and a shutdown, for
    // ever.
    #[arg(long, value_parser = clap::value_parser!(u64).range(MIN_GUEST_BUDGET_MS..=MAX_GUEST_BUDGET_MS), help = help(
        "Most CPU time one event (handle plus every apply) or other guest call may use, in \
         milliseconds (4 times it in wall-clock time at most; 10, the deadline clock's tick, \
         to 3,600,000)",
        defaults::CALL_TIMEOUT.as_millis(),
    ))]
    pub call_timeout_ms: Option<u64>,
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
        .range(drover::config::MIN_GUEST_MEMORY..=drover::config::MAX_GUEST_MEMORY_CAP), help = help(
        "Cap on one guest instance's linear memory, in bytes (65,536, one wasm page, to 4 GiB)",
        defaults::MAX_GUEST_MEMORY,
    ))]
    pub max_guest_memory: Option<usize>,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_BUDGET_MIB), help = help(
        "Most MiB all live guest memories together may grow past their initial sizes; a \
         growth past it fails that event with 503 overloaded. The default is a quarter of this \
         machine's memory",
        defaults::guest_memory_budget() >> 20,
    ))]
    pub guest_memory_budget_mib: Option<u64>,
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=MAX_PARKED_MIB), help = help(
        "Most MiB of messages between devices held in memory for targets whose mailbox is \
         full (0 to 1,048,576); past it they are left in the journal and read back from it, \
         from a second later, as their target makes room",
        defaults::MAX_PARKED_BYTES >> 20,
    ))]
    pub max_parked_mib: Option<u64>,
    #[arg(long, value_parser = payload_limit(), help = help(
        "Largest accepted event, in bytes (1 to 16 MiB)",
        defaults::MAX_EVENT_BYTES,
    ))]
    pub max_event_bytes: Option<usize>,
    #[arg(long, value_parser = payload_limit(), help = help(
        "Largest total size of the transitions of one event, in bytes (1 to 16 MiB)",
        defaults::MAX_OUTPUT_BYTES,
    ))]
    pub max_output_bytes: Option<usize>,
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=MAX_COMMIT_DELAY_US), help = help(
        "Microseconds the journal writer lets a batch grow while it is under load (a batch of \
         16 records or more, and the next already waiting; 0 commits as soon as the previous \
         fsync returns; 0 to 100,000)",
        defaults::COMMIT_DELAY.as_micros(),
    ))]
    pub commit_delay_us: Option<u64>,
    // 0 refused every upload.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1 << 30), help = help(
        "Largest accepted plugin upload, in bytes (1 to 1 GiB)",
        defaults::MAX_PLUGIN_BYTES,
    ))]
    pub max_plugin_bytes: Option<usize>,
    // At least 1 (0 refused every batch but the empty one), at most 1,000,000: the body
    // limit follows at 1 KiB per item, and 100,000,000 made it ~95 GiB.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000), help = help(
        "Most events in one `POST /v1/events` batch (1 to 1,000,000)",
        defaults::MAX_BATCH_ITEMS,
    ))]
    pub max_batch_items: Option<usize>,
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1 << 20), help = help(
        "MiB of request bodies buffered at once, all connections together; a body that does \
         not fit now is refused 503 overloaded (1 to 1,048,576; raised to the largest body \
         limit)",
        defaults::MAX_BUFFERED_BODY_BYTES >> 20,
    ))]
    pub max_buffered_body_mib: Option<usize>,
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1 << 20), help = help(
        "MiB of answers (of 64 KiB or more) held for their clients at once, all connections \
         together; one that does not fit now is refused 503 overloaded (1 to 1,048,576)",
        defaults::MAX_BUFFERED_ANSWER_BYTES >> 20,
    ))]
    pub max_buffered_answer_mib: Option<usize>,
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=MAX_TIMEOUT_SECS), help = help(
        "Seconds to let open requests finish at shutdown (0 to 86,400)",
        defaults::DRAIN_TIMEOUT.as_secs(),
    ))]
    pub drain_timeout_secs: Option<u64>,
    // Timeouts are 1 s to a day: 0 was taken as 1, and u64::MAX overflowed the deadline, which
    // dropped every connection unanswered.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS), help = help(
        "Seconds a client may take to send a request head (and a keep-alive connection may \
         stay idle; 1 to 86,400)",
        defaults::HEADER_READ_TIMEOUT.as_secs(),
    ))]
    pub header_read_timeout_secs: Option<u64>,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS), help = help(
        "Seconds a client may take to send a request body (1 to 86,400)",
        defaults::BODY_READ_TIMEOUT.as_secs(),
    ))]
    pub body_read_timeout_secs: Option<u64>,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS), help = help(
        "Seconds writing an answer may make no progress (a client that stops reading) before \
         its connection is closed (1 to 86,400)",
        defaults::WRITE_TIMEOUT.as_secs(),
    ))]
    pub write_timeout_secs: Option<u64>,
    // 0 served one connection; u64::MAX panicked at start.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000), help = help(
        "Most open HTTP connections; past it new ones get 503 too-many-connections (1 to \
         1,000,000, and at most what the open-files limit leaves room for)",
        defaults::MAX_CONNECTIONS,
    ))]
    pub max_connections: Option<usize>,
    #[arg(long, value_parser = clap::value_parser!(u64).range(MIN_GUEST_BUDGET_MS..=MAX_GUEST_BUDGET_MS), help = help(
        "Longest one activation (restore a snapshot, replay the tail) may run, in milliseconds, \
         plus 10 us per transition it replays (its guest calls count CPU time, not waits for a \
         core; 10 to 3,600,000)",
        defaults::ACTIVATION_TIMEOUT.as_millis(),
    ))]
    pub activation_timeout_ms: Option<u64>,
    #[arg(long, help = help(
        "Bytes of journal between checkpoints of its index (a restart reads the last one and \
         scans only the records after it; 0: never, else at least 4096)",
        drover::journal::INDEX_CHECKPOINT_EVERY,
    ))]
    pub index_checkpoint_bytes: Option<u64>,
    #[arg(long, help = help(
        "MiB per second the scrub reads, after a restart from an index checkpoint, of the \
         records the restart skipped (0: unbounded)",
        drover::journal::SCRUB_RATE >> 20,
    ))]
    pub scrub_mib_per_sec: Option<u64>,
    #[arg(long, help = help(
        "Bytes after which the journal starts a new segment file (`journal.<position>.seg`); \
         whole segments are what retention deletes",
        drover::journal::SEGMENT_BYTES,
    ))]
    pub journal_segment_bytes: Option<u64>,
    #[arg(long, help = help(
        "Free bytes on the data directory's filesystem under which GET /readyz answers 503 \
         disk-low (a probe for load balancers; writes are tried whatever the free space)",
        defaults::MIN_FREE_SPACE,
    ))]
    pub ready_min_free_bytes: Option<u64>,
    #[arg(long, help = help(
        "Free file descriptors under the open-files limit under which GET /readyz answers 503 \
         files-low (every journal segment stays open; past the limit every commit fails)",
        defaults::MIN_FREE_FILES,
    ))]
    pub ready_min_free_files: Option<u64>,
    /// Which journal history to delete: `keep-all` (every seq stays readable and
    /// replayable), or `after-snapshot` (whole segments once every device in them has a
    /// later snapshot and nothing pending in them; see `GET /v1/journal`) [default: keep-all]
    #[arg(long, value_enum)]
    pub retention: Option<RetentionArg>,
    /// With `--retention after-snapshot`: events kept before each device's latest snapshot
    /// [default: 0]
    #[arg(long)]
    pub retention_keep_events: Option<u64>,
    /// With `--retention after-snapshot`: segments written within this many hours are kept
    /// whatever they hold [default: 0]
    #[arg(long)]
    pub retention_keep_hours: Option<u64>,
    /// Lay guest memories out with guard pages: guest code runs ~20% faster, but a process
    /// then holds at most 14,000 live instances (the live cap is lowered to it).
    #[arg(long)]
    pub guard_pages: bool,
    /// Open a journal with media damage (a bad record before the last commit, which a plain
    /// start refuses, naming the offset and the devices affected) by rewriting it: every
    /// intact record is kept, the seqs whose records were destroyed are marked lost and never
    /// reused, and the original file is kept as `journal.log.damaged-<offset>`.
    #[arg(long)]
    pub salvage: bool,
}

impl Tuning {
    /// The HTTP limits these flags ask for: [`Limits::default`] with the flags given applied.
    pub fn limits(&self) -> Limits {
        let mut limits = Limits::default();
        if let Some(n) = self.max_event_bytes {
            // The runtime caps its own limit the same way; both layers refuse the same events.
            limits.max_event_bytes = n.min(MAX_PAYLOAD_LIMIT);
        }
        if let Some(n) = self.max_plugin_bytes {
            limits.max_plugin_bytes = n;
        }
        if let Some(mib) = self.max_buffered_body_mib {
            limits.max_buffered_body_bytes = mib << 20;
        }
        if let Some(mib) = self.max_buffered_answer_mib {
            limits.max_buffered_answer_bytes = mib << 20;
        }
        if let Some(n) = self.max_batch_items {
            limits.max_batch_items = n;
            // Room for every item at the event limit would be absurd; the default body limit
            // or the items at 1 KiB each, whichever is larger.
            limits.max_batch_bytes = limits.max_batch_bytes.max(n.saturating_mul(1024));
        }
        if let Some(secs) = self.header_read_timeout_secs {
            limits.header_read_timeout = Duration::from_secs(secs);
        }
        if let Some(secs) = self.body_read_timeout_secs {
            limits.body_read_timeout = Duration::from_secs(secs);
        }
        if let Some(secs) = self.write_timeout_secs {
            limits.write_timeout = Duration::from_secs(secs);
        }
        if let Some(n) = self.max_connections {
            limits.max_connections = n;
        }
        limits
    }

    /// How long a graceful shutdown lets open requests finish.
    pub fn drain_timeout(&self) -> Duration {
        self.drain_timeout_secs
            .map_or(defaults::DRAIN_TIMEOUT, Duration::from_secs)
    }

    /// A runtime builder on `data`: [`Runtime::builder`]'s defaults with the flags given
    /// applied over them.
    pub fn builder(&self, data: &Path) -> RuntimeBuilder {
        let mut b = Runtime::builder(data).salvage_journal(self.salvage);
        if let Some(n) = self.mailbox {
            b = b.mailbox_capacity(n);
        }
        if let Some(n) = self.max_outbox {
            b = b.max_outbox(n);
        }
        if let Some(n) = self.max_messages_pending {
            b = b.max_messages_pending(n);
        }
        if let Some(n) = self.max_in_flight {
            b = b.max_in_flight(n);
        }
        // Before `--max-live`: guard pages lower the cap, an explicit one over it is refused.
        if self.guard_pages {
            b = b.guard_pages(true);
        }
        if let Some(n) = self.max_live {
            b = b.max_live_instances(n);
        }
        if let Some(s) = self.idle_timeout_secs {
            b = b.idle_timeout(Duration::from_secs(s));
        }
        if let Some(n) = self.snapshot_every {
            b = b.snapshot_every(n);
        }
        if let Some(ms) = self.call_timeout_ms {
            b = b.call_timeout(Duration::from_millis(ms));
        }
        if let Some(ms) = self.activation_timeout_ms {
            b = b.activation_timeout(Duration::from_millis(ms));
        }
        if let Some(n) = self.max_guest_memory {
            b = b.max_guest_memory(n);
        }
        if let Some(mib) = self.guest_memory_budget_mib {
            b = b.guest_memory_budget(mib << 20);
        }
        if let Some(mib) = self.max_parked_mib {
            b = b.max_parked_bytes((mib << 20) as usize);
        }
        if let Some(n) = self.max_event_bytes {
            b = b.max_event_bytes(n);
        }
        if let Some(n) = self.max_output_bytes {
            b = b.max_output_bytes(n);
        }
        if let Some(us) = self.commit_delay_us {
            b = b.commit_delay(Duration::from_micros(us));
        }
        if let Some(bytes) = self.index_checkpoint_bytes {
            b = b.index_checkpoint_every(bytes);
        }
        if let Some(mib) = self.scrub_mib_per_sec {
            b = b.scrub_rate(mib.saturating_mul(1 << 20));
        }
        if let Some(bytes) = self.journal_segment_bytes {
            b = b.journal_segment_bytes(bytes);
        }
        if let Some(bytes) = self.ready_min_free_bytes {
            b = b.min_free_space(bytes);
        }
        if let Some(files) = self.ready_min_free_files {
            b = b.min_free_files(files);
        }
        if self.retention.is_some()
            || self.retention_keep_events.is_some()
            || self.retention_keep_hours.is_some()
        {
            let mut r = b.config().retention.clone();
            if let Some(policy) = self.retention {
                r.policy = match policy {
                    RetentionArg::KeepAll => drover::journal::RetentionPolicy::KeepAll,
                    RetentionArg::AfterSnapshot => drover::journal::RetentionPolicy::AfterSnapshot,
                };
            }
            if let Some(n) = self.retention_keep_events {
                r.keep_events = n;
            }
            if let Some(h) = self.retention_keep_hours {
                r.keep_for = Duration::from_secs(h.saturating_mul(3600));
            }
            b = b.journal_retention(r);
        }
        b
    }

    /// Opens the runtime on `data` with these settings and `plugins` (`None`: the embedded
    /// example plugins).
    pub async fn open(&self, data: &Path, plugins: Option<&Path>) -> anyhow::Result<Runtime> {
        let mut builder = self.builder(data);
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
    // The address first: a bad one or a port in use fails before the data directory is
    // created, locked or scanned.
    let listener = drover::http::server::bind(&args.listen).await?;
    // Settings out of range are the flags' fault, said before the data directory is looked
    // at (they read "opening DIR: invalid runtime settings", which blamed the directory).
    args.tuning
        .builder(&args.data)
        .config()
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid settings: {e}"))?;
    if args.data.exists() && !args.data.is_dir() {
        anyhow::bail!(
            "--data {} is a file, not a directory: give the directory to keep the journal and plugins in",
            args.data.display()
        );
    }
    // Checked before the open, against the segment files already there: a cap that cannot
    // fit is refused before anything starts.
    let mut limits = args.tuning.limits();
    let segments = drover::journal::SegmentedBackend::list(&args.data).map_or(0, |s| s.len());
    fit_to_open_files(
        segments.max(1),
        &mut limits,
        args.tuning.max_connections.is_some(),
    )?;
    let rt = match args.tuning.open(&args.data, args.plugins.as_deref()).await {
        Ok(rt) => rt,
        Err(e) if format!("{e:#}").contains("Too many open files") => {
            return Err(e.context(out_of_descriptors(&args.data)));
        }
        Err(e) => return Err(e.context(format!("opening {}", args.data.display()))),
    };
    // Few descriptors free (a limit close to the segments' count, or a threshold over the
    // limit): said at start, not only by `/readyz`.
    for reason in rt.readiness().reasons {
        if reason.code == "files-low" {
            tracing::warn!(reason = %reason.message, "starting with few file descriptors free: GET /readyz answers 503 files-low until more are");
        }
    }
    let server = Server::start_on(rt.clone(), listener, limits)?;
    announce(&server);

    shutdown_signal().await;
    // A second signal while draining: leave now. Every acknowledged event is already durable.
    tokio::spawn(async {
        shutdown_signal().await;
        tracing::warn!("second signal: exiting without waiting for the drain");
        std::process::exit(130);
    });
    // One deadline for the whole stop: connections first, then the actors (their final
    // snapshots), with at least the shutdown grace left for those.
    let drain = args.tuning.drain_timeout();
    let deadline = std::time::Instant::now() + drain;
    let drained = server.shutdown(drain).await;
    rt.shutdown_by(
        deadline.max(std::time::Instant::now() + drover::config::defaults::SHUTDOWN_GRACE),
    )
    .await;
    tracing::info!(drained, "stopped");
    Ok(())
}

/// What a start that ran out of file descriptors says: how many segments hold one each,
/// and what to raise.
fn out_of_descriptors(data: &Path) -> String {
    let segments = drover::journal::SegmentedBackend::list(data).map_or(0, |s| s.len());
    #[cfg(unix)]
    let limit =
        crate::open_files_limit().map_or_else(|| "unknown".to_string(), |l| l.rlim_cur.to_string());
    #[cfg(not(unix))]
    let limit = "unknown";
    format!(
        "opening {}: the process ran out of file descriptors (open-files limit {limit}): each of \
         the journal's {segments} segment files is kept open, beside the index's files and the \
         connections; raise the limit (ulimit -Hn, or LimitNOFILE= under systemd)",
        data.display()
    )
}

/// Descriptors kept for what is neither a segment nor a connection under the cap: the
/// index's run files, plugin files, archives, logs, the listener, and the connections
/// answered past the cap (at most 256 at once, `http/overflow.rs`).
const OTHER_DESCRIPTORS: usize = 1024;

/// The largest `--guest-memory-budget-mib` whose bytes fit a `u64`.
const MAX_BUDGET_MIB: u64 = u64::MAX >> 20;

/// The most `--max-parked-mib` takes: 1 TiB.
const MAX_PARKED_MIB: u64 = 1 << 20;

/// Fits the connection cap to the open-files limit (already raised to the hard one, see
/// `main`), beside the journal's segment files, each of which stays open: past the limit,
/// accepting fails and commits fail with "Too many open files", where past the cap a client
/// gets a clear 503. The default cap (8,192) is lowered to what fits (at least 64), with a
/// log line; a cap set with `--max-connections` that does not fit refuses the start (it was
/// kept with a warning, and a flood of idle connections then left the server answering
/// nothing, `/healthz` included, for as long as they stayed).
fn fit_to_open_files(
    segments: usize,
    limits: &mut drover::http::Limits,
    explicit: bool,
) -> anyhow::Result<()> {
    #[cfg(unix)]
    if let Some(limit) = crate::open_files_limit() {
        let open_files = usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX);
        match fit_cap(open_files, segments, limits.max_connections, explicit) {
            Ok(cap) if cap == limits.max_connections => {}
            Ok(cap) => {
                tracing::info!(
                    open_files_limit = open_files,
                    segments,
                    max_connections = cap,
                    "connection cap lowered to fit the open-files limit (raise ulimit -Hn for more)"
                );
                limits.max_connections = cap;
            }
            Err(e) => anyhow::bail!(e),
        }
    }
    Ok(())
}

/// The fewest connections a cap is lowered to, however little room the open-files limit
/// leaves by the count above ([`OTHER_DESCRIPTORS`] is a generous reserve: a server under a
/// limit of 300 served 64 connections).
const MIN_FITTED_CONNECTIONS: usize = 64;

/// The connection cap that fits `open_files` descriptors beside `segments` segment files
/// and [`OTHER_DESCRIPTORS`] (at least [`MIN_FITTED_CONNECTIONS`]): `cap` if it fits; else,
/// for the default cap, what fits; for a cap set explicitly, why the start is refused. One
/// rule for both (an explicit 64 was refused where the default was lowered to 64 and ran).
fn fit_cap(
    open_files: usize,
    segments: usize,
    cap: usize,
    explicit: bool,
) -> Result<usize, String> {
    let room = open_files
        .saturating_sub(segments + OTHER_DESCRIPTORS)
        .max(MIN_FITTED_CONNECTIONS);
    if cap <= room {
        Ok(cap)
    } else if explicit {
        Err(format!(
            "--max-connections {cap} does not fit the open-files limit of {open_files}: beside \
             the journal's {segments} segment file(s) and {OTHER_DESCRIPTORS} other \
             descriptors it leaves room for {room} connections, and past the limit the server \
             cannot accept any connection, `/healthz` included; lower --max-connections to at \
             most {room}, or raise the hard limit (ulimit -Hn, or LimitNOFILE= under systemd)"
        ))
    } else {
        Ok(room)
    }
}

/// Prints the machine-readable listening line on stdout. A stdout that cannot take it (a
/// full disk, a pipe whose reader is gone) is logged, and the server serves all the same:
/// output can never take the server down (it used to exit at once).
pub fn announce(server: &Server) {
    let mut out = std::io::stdout().lock();
    let written = writeln!(out, "drover listening on {}", server.url()).and_then(|()| out.flush());
    if let Err(e) = written {
        tracing::warn!(url = %server.url(), error = %e, "cannot write the listening line to stdout; serving all the same");
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn serve(flags: &[&str]) -> ServeArgs {
        let argv = ["drover", "serve"].iter().chain(flags);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Serve(args) => args,
            other => panic!("not serve: {other:?}"),
        }
    }

    /// A cap set past what the open-files limit leaves room for refuses the start: it was
    /// kept with a warning, and the server then answered nothing (found by a review).
    #[test]
    fn a_connection_cap_set_past_the_open_files_limit_refuses_the_start() {
        let refused = fit_cap(20_000, 1, 1_000_000, true).unwrap_err();
        assert!(
            refused
                .contains("--max-connections 1000000 does not fit the open-files limit of 20000")
                && refused.contains("room for 18975 connections"),
            "{refused}"
        );
        assert_eq!(fit_cap(20_000, 1, 18_975, true), Ok(18_975));
        // The default is lowered to what fits, at least 64.
        assert_eq!(fit_cap(4_096, 10, 8_192, false), Ok(3_062));
        assert_eq!(fit_cap(1_024, 10, 8_192, false), Ok(64));
        assert_eq!(fit_cap(1 << 20, 10, 8_192, false), Ok(8_192));
        // One rule for a cap set and the default: 64 fit where the default is lowered to 64
        // (it was refused, "at most 0", which the flag's range cannot take).
        assert_eq!(fit_cap(1_000, 1, 64, true), Ok(64));
        let refused = fit_cap(1_000, 1, 65, true).unwrap_err();
        assert!(refused.contains("at most 64"), "{refused}");
    }

    /// One source of truth: `drover serve` without flags runs exactly the library's defaults.
    #[test]
    fn no_flags_means_the_library_defaults() {
        let args = serve(&[]);
        let data = Path::new("unused");
        assert_eq!(
            args.tuning.builder(data).config(),
            Runtime::builder(data).config()
        );
        assert_eq!(args.tuning.limits(), Limits::default());
        assert_eq!(args.tuning.drain_timeout(), defaults::DRAIN_TIMEOUT);
        assert_eq!(args.data, Path::new("./data"));
        assert_eq!(args.listen, "127.0.0.1:7070");
    }

    /// A budget whose bytes do not fit 64 bits is refused by the parser, not saturated into
    /// a budget of 16 EiB.
    #[test]
    fn a_guest_memory_budget_too_large_for_its_bytes_is_refused() {
        let parse = |mib: &str| {
            Cli::try_parse_from(["drover", "serve", "--guest-memory-budget-mib", mib])
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let err = parse("99999999999999999").expect_err("overflows");
        assert!(err.contains("--guest-memory-budget-mib"), "{err}");
        parse("0").expect_err("at least 1");
        let args = serve(&["--guest-memory-budget-mib", &(u64::MAX >> 20).to_string()]);
        let config = args.tuning.builder(Path::new("unused")).config().clone();
        assert_eq!(config.engine.guest_memory_budget, (u64::MAX >> 20) << 20);
    }

    #[test]
    fn a_flag_overrides_its_setting_only() {
        let args = serve(&[
            "--max-live",
            "5",
            "--commit-delay-us",
            "0",
            "--max-event-bytes",
            "1000",
            "--max-output-bytes",
            "2000",
            "--max-guest-memory",
            "1048576",
            "--drain-timeout-secs",
            "3",
        ]);
        let data = Path::new("unused");
        let config = args.tuning.builder(data).config().clone();
        let expected = Runtime::builder(data)
            .max_live_instances(5)
            .commit_delay(Duration::ZERO)
            .max_event_bytes(1000)
            .max_output_bytes(2000)
            .max_guest_memory(1 << 20)
            .config()
            .clone();
        assert_eq!(config, expected);
        assert_eq!(config.actor.max_live, 5);
        assert_eq!(config.commit_delay, Duration::ZERO);
        assert_eq!(
            args.tuning.limits(),
            Limits {
                max_event_bytes: 1000,
                ..Limits::default()
            }
        );
        assert_eq!(args.tuning.drain_timeout(), Duration::from_secs(3));
    }

    /// Each flag refuses what the runtime cannot take by its own name and range, before any
    /// directory is opened: a review found `--commit-delay-us` unbounded (u64::MAX stopped
    /// every commit and held a shutdown for ever), budgets under the deadline tick refused
    /// by the runtime though the help said "1 to", zeros refused as "opening DIR: invalid
    /// runtime settings", and `-1` taken for an unknown flag.
    #[test]
    fn out_of_range_values_are_refused_by_their_flags() {
        let refused = |flag: &str, value: &str| {
            let err = Cli::try_parse_from(["drover", "serve", flag, value])
                .map(|_| ())
                .expect_err(&format!("{flag} {value} is refused"))
                .to_string();
            assert!(err.contains(flag), "{flag} {value}: {err}");
        };
        for flag in [
            "--max-outbox",
            "--max-messages-pending",
            "--max-in-flight",
            "--max-live",
            "--idle-timeout-secs",
            "--max-event-bytes",
            "--max-output-bytes",
        ] {
            refused(flag, "0");
            refused(flag, "-1");
        }
        refused("--commit-delay-us", "100001");
        refused("--commit-delay-us", "18446744073709551615");
        refused("--max-event-bytes", "16777217");
        refused("--max-parked-mib", "1048577");
        refused("--max-parked-mib", "-1");
        let parked = serve(&["--max-parked-mib", "3"]);
        let config = parked.tuning.builder(Path::new("unused")).config().clone();
        assert_eq!(config.actor.max_parked_bytes, 3 << 20);
        for flag in ["--call-timeout-ms", "--activation-timeout-ms"] {
            refused(flag, "9");
            assert_eq!(
                serve(&[flag, "10"])
                    .tuning
                    .builder(Path::new("unused"))
                    .config()
                    .validate(),
                Ok(()),
                "{flag} 10, the tick, is taken"
            );
        }
        let most = serve(&["--commit-delay-us", "100000"]);
        let config = most.tuning.builder(Path::new("unused")).config().clone();
        assert_eq!(config.commit_delay, defaults::MAX_COMMIT_DELAY);
        assert_eq!(config.validate(), Ok(()));
        // An embedder's builder is held to the same bound.
        let over = Runtime::builder(Path::new("unused"))
            .commit_delay(Duration::from_secs(10))
            .config()
            .validate()
            .expect_err("over the most");
        assert!(over.contains("--commit-delay-us"), "{over}");
    }

    /// The help states each default from the library's constant.
    #[test]
    fn help_shows_the_library_defaults() {
        let err = Cli::try_parse_from(["drover", "serve", "--help"]).unwrap_err();
        let help = err.to_string();
        assert!(
            help.contains(&format!("[default: {}]", defaults::max_live())),
            "{help}"
        );
        assert!(help.contains("--commit-delay-us"), "{help}");
    }
}
