//! Every tunable of a runtime, its default, and why the default is what it is.
//!
//! This is the one source of truth: [`crate::RuntimeBuilder`] starts from [`Config::default`],
//! the `drover serve` flags are optional overrides applied over the builder, and the HTTP
//! limits start from [`defaults`] too. A test checks that the command line's defaults equal
//! the builder's.

use std::time::Duration;

/// The default of every setting, with where the figure comes from.
pub mod defaults {
    use std::time::Duration;

    /// Messages that may wait in one device's mailbox before senders get `mailbox-full`. A
    /// device handles an event in microseconds, so 256 waiting is a burst, not a backlog.
    pub const MAILBOX: usize = 256;
    /// Commands that may wait unacknowledged in one device's outbox before its events are
    /// refused (429 `outbox-full`). A gateway that is away for a while leaves a few dozen
    /// (one per heating switch, say); a thousand means nobody acknowledges, and the
    /// device's record of commands should not grow without bound meanwhile.
    pub const MAX_OUTBOX: usize = 1_000;
    /// Messages one device may have sent that their targets have not handled yet before its
    /// events from outside are refused (429 `messages-pending`). A device reports to a
    /// handful of others, each handling a message in microseconds; a thousand waiting means
    /// a target is stuck (quarantined, say) or far slower than its senders, and what waits
    /// for it is held in memory until it catches up.
    pub const MAX_MESSAGES_PENDING: usize = 1_000;
    /// Bytes of messages the process holds for targets whose mailbox is full before it
    /// leaves further ones in the journal, read back a second later (`crate::dispatch`).
    /// Each sender is bounded by [`MAX_MESSAGES_PENDING`], but a million senders are not:
    /// 64 MiB holds ~400k small messages (~150 B each counted), far more than a burst, and
    /// is a small share of the memory the live actors take.
    pub const MAX_PARKED_BYTES: usize = 64 << 20;
    /// Records of one device that may be waiting for the disk (pipelining depth). Past it the
    /// actor stops taking messages, so backpressure reaches the sender.
    pub const MAX_IN_FLIGHT: usize = 128;
    /// Transitions between two snapshots of a device: at ~2M applies/s, reactivation replays
    /// at most ~0.5 ms of tail.
    pub const SNAPSHOT_EVERY: u64 = 1000;
    /// Largest total size of the transitions of one event.
    pub const MAX_OUTPUT_BYTES: usize = 1024 * 1024;
    /// A device without messages for this long drops its instance (passivation).
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
    /// Memory budgeted per live actor when sizing the default live-instance cap: the fleet
    /// bench measures ~74 KiB resident per live thermostat (guest pages it touched, its
    /// store and instance, mailbox and actor), so this leaves headroom for larger guests.
    pub const LIVE_ACTOR_BUDGET_BYTES: u64 = 96 * 1024;
    /// Share of the machine's (or the cgroup's) memory the default cap may spend on live
    /// actors; passivated devices cost ~0.2 KiB each and stay outside this budget.
    pub const LIVE_MEMORY_SHARE: f64 = 0.5;
    /// Bounds of the default cap, whatever the machine.
    pub const MAX_LIVE_RANGE: (usize, usize) = (1_000, 1_000_000);

    /// Address space charged per live actor against the commit limit of a host with
    /// `vm.overcommit_memory = 2` (strict accounting), where every mapped byte counts
    /// whether touched or not: a guest memory is mapped at twice its size (room to grow in
    /// place, see `engine/memory.rs`), and the thermostat's is ~1.1 MiB (1 MiB of it the
    /// stack Rust guests reserve).
    pub const STRICT_COMMIT_PER_ACTOR_BYTES: u64 = 3 * 1024 * 1024;

    /// Default live-instance cap: what this machine can hold, half its memory at
    /// [`LIVE_ACTOR_BUDGET_BYTES`] each (131,072 on a 24 GiB machine), within
    /// [`MAX_LIVE_RANGE`]. Instances no longer cost memory mappings (see
    /// [`crate::engine::Engine::new`]), so memory is the limit. Reads `/proc/meminfo` and the
    /// cgroup v2 limit; 100,000 where neither can be read. On a host with strict overcommit
    /// accounting, also at most half its commit limit at [`STRICT_COMMIT_PER_ACTOR_BYTES`]
    /// each: past that, instantiating fails (`ENOMEM`) where the cap would have passivated
    /// the least recently used actor instead.
    pub fn max_live() -> usize {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
        let overcommit = std::fs::read_to_string("/proc/sys/vm/overcommit_memory").ok();
        let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok();
        max_live_of(meminfo.as_deref(), overcommit.as_deref(), cgroup.as_deref())
    }

    /// Share of the machine's (or the cgroup's) memory the default guest memory budget
    /// allows live guest memories to grow by, beside the [`LIVE_MEMORY_SHARE`] the default
    /// live-instance cap spends on actors as they start.
    pub const GUEST_MEMORY_SHARE: f64 = 0.25;
    /// The default guest memory budget where the machine's memory cannot be read.
    pub const GUEST_MEMORY_BUDGET_UNKNOWN: u64 = 4 << 30;

    /// Default [`super::EngineConfig::guest_memory_budget`]: [`GUEST_MEMORY_SHARE`] of this
    /// machine's memory, or its cgroup's limit if lower (6 GiB on a 24 GiB machine).
    pub fn guest_memory_budget() -> u64 {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
        let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok();
        guest_memory_budget_of(meminfo.as_deref(), cgroup.as_deref())
    }

    /// This machine's memory, or its cgroup's limit if that is lower, where it can be read.
    pub fn memory() -> Option<u64> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
        let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok();
        machine_memory(meminfo.as_deref(), cgroup.as_deref())
    }

    /// [`guest_memory_budget`] from the contents of `/proc/meminfo` and the cgroup's
    /// `memory.max`, where they could be read.
    pub(crate) fn guest_memory_budget_of(meminfo: Option<&str>, cgroup: Option<&str>) -> u64 {
        machine_memory(meminfo, cgroup).map_or(GUEST_MEMORY_BUDGET_UNKNOWN, |m| {
            (m as f64 * GUEST_MEMORY_SHARE) as u64
        })
    }

    /// `MemTotal` (or another `/proc/meminfo` field), in bytes.
    fn meminfo_field(meminfo: Option<&str>, name: &str) -> Option<u64> {
        let kib: u64 = meminfo?
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    /// The machine's memory, or its cgroup's limit if that is lower.
    fn machine_memory(meminfo: Option<&str>, cgroup: Option<&str>) -> Option<u64> {
        let cgroup = cgroup.and_then(|v| v.trim().parse::<u64>().ok());
        match (meminfo_field(meminfo, "MemTotal:"), cgroup) {
            (Some(m), Some(c)) => Some(m.min(c)),
            (m, c) => m.or(c),
        }
    }

    /// [`max_live`] from the contents of `/proc/meminfo`, `/proc/sys/vm/overcommit_memory`
    /// and the cgroup's `memory.max`, where they could be read.
    pub(crate) fn max_live_of(
        meminfo: Option<&str>,
        overcommit: Option<&str>,
        cgroup: Option<&str>,
    ) -> usize {
        let field = |name: &str| meminfo_field(meminfo, name);
        let Some(memory) = machine_memory(meminfo, cgroup) else {
            return 100_000;
        };
        let mut n = (memory as f64 * LIVE_MEMORY_SHARE) as u64 / LIVE_ACTOR_BUDGET_BYTES;
        if overcommit.map(str::trim) == Some("2")
            && let Some(limit) = field("CommitLimit:")
        {
            let strict = (limit as f64 * LIVE_MEMORY_SHARE) as u64 / STRICT_COMMIT_PER_ACTOR_BYTES;
            n = n.min(strict);
        }
        (n as usize).clamp(MAX_LIVE_RANGE.0, MAX_LIVE_RANGE.1)
    }
    /// Most live instances with [`super::EngineConfig::guard_pages`]: each instance then
    /// costs ~4 memory mappings and `vm.max_map_count` (65,530) caps a process near 16k.
    pub const GUARD_PAGES_MAX_LIVE: usize = 14_000;
    /// Largest accepted event. At most [`super::MAX_PAYLOAD_LIMIT`].
    pub const MAX_EVENT_BYTES: usize = 64 * 1024;
    /// Most CPU time one event (its `handle` and every `apply`) or one other guest call may
    /// use (and 4 times it in wall-clock time); guest calls normally take microseconds.
    pub const CALL_TIMEOUT: Duration = Duration::from_millis(250);
    /// Longest one activation (restore a snapshot, replay the tail) may run in CPU time,
    /// before the allowance each replayed transition adds (`replay::REPLAY_ALLOWANCE`, 10 µs).
    pub const ACTIVATION_TIMEOUT: Duration = Duration::from_secs(5);
    /// Cap on one instance's linear memory.
    pub const MAX_GUEST_MEMORY: usize = 64 * 1024 * 1024;
    /// Granularity of the guest deadline clock: one wakeup per tick for the whole process.
    pub const EPOCH_TICK: Duration = Duration::from_millis(10);
    /// How long the journal writer lets a batch grow once it is under load (a batch of 16
    /// records or more; it was 64 until 10k devices were measured committing ~40 records per
    /// fsync, below it). Fewer, larger fsyncs cost the kernel less CPU per record: measured
    /// with the core bench, this was the second largest throughput win of the skeleton.
    pub const COMMIT_DELAY: Duration = Duration::from_micros(500);
    /// The longest commit delay a journal takes: every commit under load waits it, and so
    /// does a stop's last commit. Unbounded, `u64::MAX` µs stopped every commit and held a
    /// shutdown for ever, and 10 s held a 1 s drain 20 s.
    pub const MAX_COMMIT_DELAY: Duration = Duration::from_millis(100);

    /// Largest JSON request body other than events and batches (provisioning, deploy).
    pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
    /// Largest gateway batch body (`POST /v1/events`).
    pub const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;
    /// Most items in one gateway batch.
    pub const MAX_BATCH_ITEMS: usize = 10_000;
    /// Largest plugin upload; the example plugins are ~260 KB.
    pub const MAX_PLUGIN_BYTES: usize = 64 * 1024 * 1024;
    /// Most bytes of request bodies the server buffers at once, all connections together: 8
    /// plugin uploads, or 16 gateway batches, at their largest. Each route's limit bounds one
    /// request; without this, 16 connections each sending a 60 MiB upload held 1 GiB (a
    /// review), and the connection cap allows thousands.
    pub const MAX_BUFFERED_BODY_BYTES: usize = 512 * 1024 * 1024;
    /// Most bytes of answers of 64 KiB or more held for their clients at once, all
    /// connections together (`http/answers.rs`): 128 journal pages at their largest. Without
    /// it, 250 connections that asked for journal pages and read nothing held 1.1 GB for
    /// the write timeout (a review).
    pub const MAX_BUFFERED_ANSWER_BYTES: usize = 512 * 1024 * 1024;
    /// Most records one journal page may ask for.
    pub const MAX_PAGE: usize = 1000;
    /// How long a client may take to send a request head, and how long a keep-alive
    /// connection may sit idle between requests: past it the connection is closed, so a
    /// client that never finishes its head holds neither a connection nor the shutdown.
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// How long a client may take to send a request body once its head is in: past it the
    /// request gets 408 `body-timeout` and the connection is closed, so a stalled upload
    /// holds neither a connection nor the shutdown. 64 MiB (the largest plugin) at 10 Mbit/s
    /// takes ~54 s.
    pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);
    /// How long writing an answer may make no progress (the client does not read it): past
    /// it the connection is closed, so a client that stops reading holds neither a
    /// connection nor the unsent answer (a journal page is up to ~4 MiB) nor the shutdown.
    /// Twice the command stream's 15 s keep-alive comment, so an idle stream never trips it.
    pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
    /// How long, once the server stops, a connection with no request being handled may stay
    /// open (a request head still arriving, an answer still being written), and how long a
    /// request body still arriving may take before its 503 `shutting-down`. Long enough for
    /// bytes already in flight when the server stopped; short, so a stalled client does not
    /// hold the shutdown for the read or write timeouts.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
    /// How often the runtime looks for devices whose old snapshot held a retention pass back
    /// (it acts only after a pass: one per index checkpoint, and one at start).
    pub const RETENTION_REFRESH_EVERY: Duration = Duration::from_secs(5);
    /// Free bytes on the data directory's filesystem under which `/readyz` answers not ready
    /// (`disk-low`, see `crate::readiness`): one record of the largest size the journal
    /// accepts (`journal::record::MAX_BODY_LEN`), so a ready server can take any event.
    pub const MIN_FREE_SPACE: u64 = 64 << 20;
    /// Free file descriptors under which `/readyz` answers not ready (`files-low`, see
    /// `crate::readiness`): room for the next journal segment, the index's next run files and
    /// a snapshot being written, with a margin for descriptors other threads open meanwhile.
    /// Every journal segment stays open, so small segments (`--journal-segment-bytes`) walk a
    /// server towards its limit, and past it every commit fails with "Too many open files".
    pub const MIN_FREE_FILES: u64 = 64;
    /// How long one group commit (its write and `fdatasync`) may be under way before
    /// `GET /readyz` says the disk is not answering (`commit-stalled`). A healthy commit takes
    /// milliseconds; an 8 MiB batch on this project's VMs under a second.
    pub const COMMIT_STALLED_AFTER: Duration = Duration::from_secs(5);
    /// Open HTTP connections. Past it new connections get a 503 `too-many-connections` and
    /// are closed. Well under the process's file limit (20,000 on this machine's kind);
    /// `drover serve` lowers it to what a lower limit holds beside the journal's segments.
    pub const MAX_CONNECTIONS: usize = 8192;
    /// How long a graceful shutdown lets open requests finish.
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
}

/// Ceiling of the event and output limits: both at their maximum still fit one journal record
/// (64 MiB) with room to spare.
pub const MAX_PAYLOAD_LIMIT: usize = 16 * 1024 * 1024;

/// Settings of the wasm engine. Precompiled plugin artifacts are only valid for the settings
/// they were built with (wasmtime checks this when loading them), and a replay must use the
/// server's call timeout and memory cap or it could fail where the server succeeded: the
/// runtime records them in the data directory for offline tools (see [`crate::replay`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct EngineConfig {
    /// Most CPU time one event (`handle` plus every `apply`), or one other guest call, may use
    /// before it is interrupted (and 4 times it in wall-clock time, waiting for a core
    /// included; see `engine/cpu_clock.rs`).
    #[serde(with = "millis")]
    pub call_timeout: Duration,
    /// Longest one activation (restore plus the replayed tail) may run in CPU time, plus
    /// 10 µs per transition it replays (see `replay.rs`, `Budget`).
    #[serde(with = "millis")]
    pub activation_timeout: Duration,
    /// Cap on one instance's linear memory, in bytes.
    pub max_memory: usize,
    /// Most bytes all live instances' linear memories together may grow past their initial
    /// sizes; a growth past it fails the guest call with `overloaded` (see
    /// `engine/limits.rs`). Absent from settings recorded before it: the default.
    #[serde(default = "defaults::guest_memory_budget")]
    pub guest_memory_budget: u64,
    /// Lay linear memories out the wasmtime-default way (a 4 GiB reservation with guard
    /// regions each) instead of compactly: guest code skips explicit bounds checks and runs
    /// ~20% faster (the guest bench: handle + apply 2.3-2.5 µs instead of 2.75-3.2 µs), but each
    /// instance costs ~4 memory mappings, which caps a process near 16k live instances
    /// (`vm.max_map_count`). See `host/DESIGN.md`, "Live instances".
    pub guard_pages: bool,
    /// Granularity of the deadline clock. Smaller is more precise and costs a wakeup each tick.
    #[serde(with = "millis")]
    pub epoch_tick: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            call_timeout: defaults::CALL_TIMEOUT,
            activation_timeout: defaults::ACTIVATION_TIMEOUT,
            max_memory: defaults::MAX_GUEST_MEMORY,
            guest_memory_budget: defaults::guest_memory_budget(),
            guard_pages: false,
            epoch_tick: defaults::EPOCH_TICK,
        }
    }
}

impl EngineConfig {
    /// File in the data directory where a runtime records its engine settings.
    pub const FILE_NAME: &'static str = "engine.json";

    /// The settings recorded in `data_dir` by the runtime that owns it, or the defaults if
    /// none were recorded.
    pub fn load(data_dir: &std::path::Path) -> std::io::Result<EngineConfig> {
        let path = data_dir.join(Self::FILE_NAME);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} is damaged ({e}): it records the server's guest settings (time \
                         budgets, memory cap); a server started on the directory writes it \
                         again from its flags, or restore it from a backup",
                        path.display()
                    ),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(EngineConfig::default()),
            Err(e) => Err(e),
        }
    }

    /// Records these settings in `data_dir` (atomically: temp file, fsync, rename), for
    /// offline tools that must run guests exactly as the server does. Settings already
    /// recorded as they are write nothing (see `registry::write_replace_if_changed`).
    pub fn store(&self, data_dir: &std::path::Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::registry::write_replace_if_changed(&data_dir.join(Self::FILE_NAME), &bytes)
    }
}

/// Per-actor limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorConfig {
    /// Messages that may wait in a device's mailbox.
    pub mailbox: usize,
    /// Records per device that may be waiting for the disk.
    pub max_in_flight: usize,
    /// Take a snapshot after this many transitions since the last one (0: never).
    pub snapshot_every: u64,
    /// Largest total size of the transitions one event may produce.
    pub max_output_bytes: usize,
    /// An actor with no message for this long drops its instance (passivation).
    pub idle_timeout: Duration,
    /// Past this many live instances, the least recently used are passivated.
    pub max_live: usize,
    /// Threads that run actors and guest code (0: one per core).
    pub threads: usize,
    /// Threads of the slow lane, which runs the events of plugins that have run slow (0:
    /// half of `threads`, at least one; see `actor::ActorPool`).
    pub slow_threads: usize,
    /// Unacknowledged commands per device past which its external events are refused.
    pub max_outbox: usize,
    /// Messages per device not yet handled by their targets past which its external events
    /// are refused.
    pub max_messages_pending: usize,
    /// Bytes of messages held for targets with a full mailbox past which further ones are
    /// left in the journal until a redelivery (0: never held).
    pub max_parked_bytes: usize,
}

impl ActorConfig {
    /// The slow lane's threads beside `threads` actor threads: as set, or half as many (at
    /// least one), so that slow guests never hold every core and a healthy device's event
    /// finds one (see `actor::ActorPool`).
    pub fn slow_lane_threads(&self, threads: usize) -> usize {
        match self.slow_threads {
            0 => (threads / 2).max(1),
            n => n,
        }
    }
}

impl Default for ActorConfig {
    fn default() -> Self {
        ActorConfig {
            mailbox: defaults::MAILBOX,
            max_in_flight: defaults::MAX_IN_FLIGHT,
            snapshot_every: defaults::SNAPSHOT_EVERY,
            max_output_bytes: defaults::MAX_OUTPUT_BYTES,
            idle_timeout: defaults::IDLE_TIMEOUT,
            max_live: defaults::max_live(),
            threads: 0,
            slow_threads: 0,
            max_outbox: defaults::MAX_OUTBOX,
            max_messages_pending: defaults::MAX_MESSAGES_PENDING,
            max_parked_bytes: defaults::MAX_PARKED_BYTES,
        }
    }
}

/// Every setting of a runtime. Built through [`crate::RuntimeBuilder`]; readable with
/// [`crate::RuntimeBuilder::config`] and [`crate::Runtime::config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub engine: EngineConfig,
    pub actor: ActorConfig,
    /// Largest accepted event, in bytes.
    pub max_event_bytes: usize,
    /// How long the journal writer lets a batch grow under load.
    pub commit_delay: Duration,
    /// Open a journal damaged before its tail by cutting it at the first bad record.
    pub salvage: bool,
    /// Record offsets the journal index keeps in memory before spilling them to disk (see
    /// [`crate::journal::JournalOptions::index_spill_at`]; 0: never spill).
    pub index_spill_at: u64,
    /// Bytes of journal between index checkpoints (see
    /// [`crate::journal::JournalOptions::index_checkpoint_every`]; 0: never).
    pub index_checkpoint_every: u64,
    /// How fast the scrub after an open from an index checkpoint reads (bytes per second;
    /// see [`crate::journal::JournalOptions::scrub_rate`]; 0: unbounded).
    pub scrub_rate: u64,
    /// Bytes after which the journal starts a new segment file (see
    /// [`crate::journal::JournalOptions::segment_bytes`]).
    pub segment_bytes: u64,
    /// Which history the journal deletes (see [`crate::journal::Retention`]).
    pub retention: crate::journal::Retention,
    /// How often the runtime looks for devices whose old snapshot held a retention pass back,
    /// to ask them for a fresh one (`None`: never; see `Runtime::refresh_retention`).
    pub retention_refresh: Option<Duration>,
    /// Free bytes on the data directory's filesystem under which the server says it is not
    /// ready (see `crate::readiness`).
    pub min_free_space: u64,
    /// Free file descriptors (under the process's open-files limit) under which the server
    /// says it is not ready (see `crate::readiness`).
    pub min_free_files: u64,
    /// How long one group commit may be under way before the server says it is not ready
    /// (`commit-stalled`, see `crate::readiness`).
    pub commit_stalled_after: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            engine: EngineConfig::default(),
            actor: ActorConfig::default(),
            max_event_bytes: defaults::MAX_EVENT_BYTES,
            commit_delay: defaults::COMMIT_DELAY,
            salvage: false,
            index_spill_at: crate::journal::INDEX_SPILL_AT,
            index_checkpoint_every: crate::journal::INDEX_CHECKPOINT_EVERY,
            scrub_rate: crate::journal::SCRUB_RATE,
            segment_bytes: crate::journal::SEGMENT_BYTES,
            retention: crate::journal::Retention::default(),
            retention_refresh: Some(defaults::RETENTION_REFRESH_EVERY),
            min_free_space: defaults::MIN_FREE_SPACE,
            commit_stalled_after: defaults::COMMIT_STALLED_AFTER,
            min_free_files: defaults::MIN_FREE_FILES,
        }
    }
}

/// The smallest cap on one guest memory: one page of WebAssembly memory.
pub const MIN_GUEST_MEMORY: u64 = 64 << 10;
/// The largest cap on one guest memory: all a 32-bit memory can address.
pub const MAX_GUEST_MEMORY_CAP: u64 = 4 << 30;

/// `n` bytes for a message: whole MiB as such, anything else exactly.
fn bytes(n: u64) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

impl Config {
    /// Checks every setting is in range: counts and sizes at least 1, the event and output
    /// limits at most [`MAX_PAYLOAD_LIMIT`], time budgets at least one deadline tick.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("mailbox capacity (--mailbox)", self.actor.mailbox),
            ("max in flight (--max-in-flight)", self.actor.max_in_flight),
            ("max live instances (--max-live)", self.actor.max_live),
            ("max outbox (--max-outbox)", self.actor.max_outbox),
            (
                "max messages pending (--max-messages-pending)",
                self.actor.max_messages_pending,
            ),
            ("max event bytes (--max-event-bytes)", self.max_event_bytes),
            (
                "max output bytes (--max-output-bytes)",
                self.actor.max_output_bytes,
            ),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.segment_bytes < crate::journal::MIN_SEGMENT_BYTES {
            return Err(format!(
                "journal segment bytes (--journal-segment-bytes) is {}, under the minimum of \
                 {}: each segment is a file the server keeps open, and smaller ones make a file \
                 per commit",
                self.segment_bytes,
                crate::journal::MIN_SEGMENT_BYTES
            ));
        }
        if (1..crate::journal::MIN_SEGMENT_BYTES).contains(&self.index_checkpoint_every) {
            return Err(format!(
                "index checkpoint bytes (--index-checkpoint-bytes) is {}, under the minimum of \
                 {} (or 0: never): each checkpoint writes the whole index, every device's head, \
                 so a smaller interval would write one after nearly every commit",
                self.index_checkpoint_every,
                crate::journal::MIN_SEGMENT_BYTES
            ));
        }
        let retaining = self.retention.policy != crate::journal::RetentionPolicy::KeepAll;
        if retaining && (self.index_spill_at == 0 || self.index_checkpoint_every == 0) {
            return Err(
                "journal retention needs index checkpoints (a journal whose first segments were \
                 deleted opens only from one): --index-checkpoint-bytes must not be 0 (nor \
                 RuntimeBuilder::index_spill_at)"
                    .into(),
            );
        }
        if retaining && self.actor.snapshot_every == 0 {
            return Err(
                "journal retention after-snapshot deletes only what a snapshot covers: \
                 --snapshot-every must not be 0"
                    .into(),
            );
        }
        if !retaining && (self.retention.keep_events > 0 || !self.retention.keep_for.is_zero()) {
            return Err(
                "--retention-keep-events and --retention-keep-hours apply to --retention \
                 after-snapshot; with keep-all nothing is deleted"
                    .into(),
            );
        }
        for (name, v) in [
            ("max event bytes", self.max_event_bytes),
            ("max output bytes", self.actor.max_output_bytes),
        ] {
            if v > MAX_PAYLOAD_LIMIT {
                return Err(format!(
                    "{name} is {v}, over the limit of {MAX_PAYLOAD_LIMIT} (an event and its \
                     transitions must fit one journal record)"
                ));
            }
        }
        if self.engine.guard_pages && self.actor.max_live > defaults::GUARD_PAGES_MAX_LIVE {
            return Err(format!(
                "max live instances (--max-live) is {}, but with guard pages (--guard-pages) \
                 each instance costs ~4 memory mappings, and the kernel's limit of 65,530 stops a \
                 process near 16k: set it to at most {}, which leaves room for the rest",
                self.actor.max_live,
                defaults::GUARD_PAGES_MAX_LIVE
            ));
        }
        let tick = self.engine.epoch_tick;
        // The ticker thread wakes once a tick and advances the epoch to the wall clock.
        if tick < std::time::Duration::from_millis(1) {
            return Err(format!(
                "the deadline clock's tick is {tick:?}, under the minimum of 1 ms"
            ));
        }
        for (name, d) in [
            ("call timeout (--call-timeout-ms)", self.engine.call_timeout),
            (
                "activation timeout (--activation-timeout-ms)",
                self.engine.activation_timeout,
            ),
        ] {
            if d < tick {
                return Err(format!(
                    "{name} is {d:?}, shorter than the deadline clock's tick of {tick:?}"
                ));
            }
        }
        if self.actor.idle_timeout.is_zero() {
            return Err("idle timeout (--idle-timeout-secs) must be more than zero".into());
        }
        if self.commit_delay > defaults::MAX_COMMIT_DELAY {
            return Err(format!(
                "commit delay (--commit-delay-us) is {:?}, over the most of {:?}: every commit \
                 under load waits it, and a stop's last one too",
                self.commit_delay,
                defaults::MAX_COMMIT_DELAY
            ));
        }
        // A guest memory is made of 64 KiB pages, and a 32-bit one holds at most 4 GiB.
        let max_memory = self.engine.max_memory as u64;
        if !(MIN_GUEST_MEMORY..=MAX_GUEST_MEMORY_CAP).contains(&max_memory) {
            return Err(format!(
                "max guest memory is {}, outside {} to {}: a guest's linear memory is made of \
                 64 KiB pages, and a 32-bit one holds at most 4 GiB",
                bytes(max_memory),
                bytes(MIN_GUEST_MEMORY),
                bytes(MAX_GUEST_MEMORY_CAP)
            ));
        }
        // Below one instance's cap, an event that needs the cap could never be handled, and
        // would be told `overloaded` (retry) for ever.
        if self.engine.guest_memory_budget < max_memory {
            return Err(format!(
                "the guest memory budget ({}) is below one instance's memory cap ({}): raise \
                 it, or lower the cap",
                bytes(self.engine.guest_memory_budget),
                bytes(max_memory)
            ));
        }
        Ok(())
    }
}

/// Durations as whole milliseconds in the engine settings file.
mod millis {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms = <u64 as serde::Deserialize>::deserialize(d)?;
        Ok(Duration::from_millis(ms))
    }
}

#[cfg(test)]
mod tests {
    use super::ActorConfig;
    use super::defaults::*;

    /// A damaged `engine.json` is named in the error (it said only serde's complaint, and
    /// `drover replay` printed "EOF while parsing a string at line 3 column 15").
    #[test]
    fn a_damaged_engine_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(super::EngineConfig::FILE_NAME),
            b"{\n  \"call_timeout\": \"",
        )
        .expect("write");
        let e = super::EngineConfig::load(dir.path()).expect_err("damaged");
        assert!(e.to_string().contains("engine.json is damaged"), "{e}");
    }

    const MEMINFO_24G: &str = "MemTotal:       25165824 kB\nMemFree:        20000000 kB\n\
                               CommitLimit:    12582912 kB\nCommitted_AS:    1000000 kB\n";

    #[test]
    fn the_default_live_cap_follows_memory_the_cgroup_and_a_strict_commit_limit() {
        // Half of 24 GiB at 96 KiB each.
        assert_eq!(max_live_of(Some(MEMINFO_24G), Some("0\n"), None), 131_072);
        // Heuristic overcommit (1) is treated like the default.
        assert_eq!(max_live_of(Some(MEMINFO_24G), Some("1\n"), None), 131_072);
        // A cgroup limit of 2 GiB below the machine's memory.
        assert_eq!(
            max_live_of(Some(MEMINFO_24G), Some("0"), Some("2147483648\n")),
            10_922
        );
        // `max` in the cgroup means no limit.
        assert_eq!(max_live_of(Some(MEMINFO_24G), None, Some("max\n")), 131_072);
        // Strict accounting: half of a 12 GiB commit limit at 3 MiB each.
        assert_eq!(max_live_of(Some(MEMINFO_24G), Some("2\n"), None), 2_048);
        // Strict accounting without a commit limit to read changes nothing.
        assert_eq!(
            max_live_of(Some("MemTotal: 25165824 kB\n"), Some("2"), None),
            131_072
        );
        // Never below the floor, and a fixed figure where nothing can be read.
        assert_eq!(
            max_live_of(
                Some("MemTotal: 1024 kB\nCommitLimit: 1024 kB\n"),
                Some("2"),
                None
            ),
            MAX_LIVE_RANGE.0
        );
        assert_eq!(max_live_of(None, None, None), 100_000);
    }

    /// A guest memory budget below one instance's cap is refused with both figures: an event
    /// that needs the cap could never be handled, and would answer `overloaded` for ever.
    #[test]
    fn a_guest_memory_budget_below_one_instance_cap_is_refused() {
        let mut config = super::Config::default();
        config.engine.max_memory = 64 << 20;
        config.engine.guest_memory_budget = 16 << 20;
        let err = config.validate().expect_err("below the cap");
        assert!(err.contains("16 MiB") && err.contains("64 MiB"), "{err}");
        config.engine.guest_memory_budget = 64 << 20;
        assert_eq!(config.validate(), Ok(()));
        // Not rounded to whole MiB, which made both figures read "64 MiB".
        config.engine.max_memory = (64 << 20) + 1;
        let err = config.validate().expect_err("one byte below the cap");
        assert!(
            err.contains("(64 MiB)") && err.contains(&format!("({} bytes)", (64 << 20) + 1)),
            "{err}"
        );
    }

    /// By default the slow lane has half the actor threads, at least one, so that spinning
    /// guests never hold every core; a setting overrides it.
    #[test]
    fn the_slow_lane_has_half_the_actor_threads_by_default() {
        let actor = ActorConfig::default();
        assert_eq!(
            [1, 2, 3, 8].map(|n| actor.slow_lane_threads(n)),
            [1, 1, 1, 4]
        );
        let set = ActorConfig {
            slow_threads: 3,
            ..ActorConfig::default()
        };
        assert_eq!(set.slow_lane_threads(2), 3);
    }

    #[test]
    fn a_guest_memory_cap_is_between_one_wasm_page_and_4_gib() {
        let mut config = super::Config::default();
        // Whatever this machine's memory makes the default.
        config.engine.guest_memory_budget = 8 << 30;
        for refused in [0, 100, (64 << 10) - 1, (4 << 30) + 1] {
            config.engine.max_memory = refused;
            let err = config.validate().expect_err("out of range");
            assert!(err.contains("64 KiB pages"), "{refused}: {err}");
        }
        for accepted in [64 << 10, 4 << 30] {
            config.engine.max_memory = accepted;
            assert_eq!(config.validate(), Ok(()), "{accepted}");
        }
    }

    /// `--index-checkpoint-bytes 1` was accepted, and wrote the whole index after every
    /// commit.
    #[test]
    fn an_index_checkpoint_interval_under_the_minimum_is_refused_and_zero_is_not() {
        let mut config = super::Config::default();
        for bytes in [1, crate::journal::MIN_SEGMENT_BYTES - 1] {
            config.index_checkpoint_every = bytes;
            let err = config.validate().expect_err("too small");
            assert!(
                err.contains("--index-checkpoint-bytes") && err.contains("minimum of 4096"),
                "{err}"
            );
        }
        for bytes in [0, crate::journal::MIN_SEGMENT_BYTES] {
            config.index_checkpoint_every = bytes;
            assert_eq!(config.validate(), Ok(()), "{bytes}");
        }
    }

    #[test]
    fn a_deadline_tick_under_a_millisecond_is_refused() {
        let mut config = super::Config::default();
        config.engine.epoch_tick = std::time::Duration::ZERO;
        let err = config.validate().expect_err("no tick");
        assert!(err.contains("1 ms"), "{err}");
        config.engine.epoch_tick = std::time::Duration::from_millis(1);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn the_default_guest_memory_budget_is_a_quarter_of_memory_or_the_cgroup() {
        assert_eq!(guest_memory_budget_of(Some(MEMINFO_24G), None), 6 << 30);
        assert_eq!(
            guest_memory_budget_of(Some(MEMINFO_24G), Some("2147483648\n")),
            512 << 20
        );
        assert_eq!(
            guest_memory_budget_of(Some(MEMINFO_24G), Some("max\n")),
            6 << 30
        );
        assert_eq!(
            guest_memory_budget_of(None, None),
            GUEST_MEMORY_BUDGET_UNKNOWN
        );
    }

    /// Settings already recorded as they are write nothing (a server restarted on a full
    /// disk could not start, failing on this file); changed ones replace the file.
    #[test]
    fn engine_settings_recorded_as_they_are_are_not_written_again() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(super::EngineConfig::FILE_NAME);
        let mut engine = super::EngineConfig::default();
        engine.store(dir.path()).expect("recorded");
        let first = std::fs::metadata(&path).expect("file").ino();
        engine.store(dir.path()).expect("recorded again");
        assert_eq!(
            std::fs::metadata(&path).expect("file").ino(),
            first,
            "rewritten"
        );
        engine.max_memory += 65536;
        engine.store(dir.path()).expect("changed");
        assert_ne!(
            std::fs::metadata(&path).expect("file").ino(),
            first,
            "not rewritten"
        );
        // No temp file left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);
    }
}
