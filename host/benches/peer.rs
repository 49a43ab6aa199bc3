//! The native peer: the same load as the core bench, through the design a team would write
//! without Drover, so that Drover's figures have a baseline measured in the same session.
//!
//! `cargo bench -p drover --bench peer` prints, for 1k and 10k devices with 4,096 events in
//! flight: durable events/s, p50/p99 latency from send to durable ack, database growth per
//! event, and events per commit. Run `cargo bench -p drover --bench core` with the same
//! options right before or after it (not at the same time) and compare the two tables.
//!
//! The peer is the plain native design of the fan-out issue: "a tokio task per device with
//! native serde logic, one SQLite writer with group commit, ack after commit". Concretely:
//!
//! - each device is a tokio task with a bounded mailbox (1,024, like the core bench's
//!   actors); a full mailbox is refused and the sender retries, as with Drover;
//! - the task parses the event with `serde_json`, runs the thermostat plugin's `handle` in
//!   native Rust (the same hysteresis logic, see `plugins/thermostat`), serializes the
//!   transitions as JSON, hands a row to the writer and waits for its commit; then it applies
//!   the transitions to its state and acks the sender. A device handles its next event only
//!   once the previous one is durable, so its in-memory state is always what the database says
//!   (the straightforward way; no pipelining);
//! - one writer thread owns the SQLite connection (WAL, `synchronous=FULL`, so that a commit
//!   is durable like Drover's `fdatasync`), takes every row queued, inserts them in one
//!   transaction (group commit), commits, then completes each row's ack. SQLite's defaults
//!   otherwise, automatic WAL checkpoints included.
//!
//! The driver is the core bench's: the same reading events drifting through the hysteresis
//! band, the same in-flight window spread round-robin over the devices, the same warmup. The
//! database lives under `target/` (a real disk, not tmpfs). Nothing here touches Drover's
//! runtime: it is the baseline, not a test of it.
//!
//! The peer slows down as its table grows: once the `(device, seq)` index outgrows SQLite's
//! default page cache (2 MB), each commit reads and rewrites thousands of scattered index
//! pages into the WAL (several KB written per event at 10k devices, against Drover's 124
//! bytes). Compare only runs with the same `DROVER_BENCH_EVENTS`.
//!
//! Options (environment), as for the core bench: `DROVER_BENCH_EVENTS` (per size, default
//! 1,000,000), `DROVER_BENCH_SIZES` (default `1000,10000`), `DROVER_BENCH_INFLIGHT` (default
//! 4096), `DROVER_BENCH_WARMUP` (events per device before measuring, default 5).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

#[path = "support/allocator.rs"]
mod allocator;
#[path = "support/mod.rs"]
mod common;
use common::env_or;

/// Like the core bench's `mailbox_capacity(1024)`.
const MAILBOX: usize = 1024;

fn main() -> anyhow::Result<()> {
    let events = env_or("DROVER_BENCH_EVENTS", 1_000_000);
    let in_flight = env_or("DROVER_BENCH_INFLIGHT", 4096) as usize;
    let sizes: Vec<usize> = std::env::var("DROVER_BENCH_SIZES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "native peer bench (tokio task per device, SQLite group commit): {events} events per \
         size, {in_flight} in flight, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:>8} {:>12} {:>10} {:>10} {:>15} {:>14}",
        "devices", "events/s", "p50 µs", "p99 µs", "db bytes/event", "events/commit"
    );
    for devices in sizes {
        rt.block_on(run(devices, events, in_flight))?;
    }
    Ok(())
}

async fn run(devices: usize, events: u64, in_flight: usize) -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-peer-{devices}"));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let db = root.join("peer.sqlite");
    let ids: Arc<Vec<String>> = Arc::new((0..devices).map(|i| format!("t-{i:06}")).collect());
    let config = serde_json::json!({"setpoint": 21.0}).to_string();
    let (peer, writer) = Peer::open(&db, &ids, &config)?;
    let peer = Arc::new(peer);

    // Warm up as the core bench does: a few events per device, so that every task, its
    // mailbox and the database's pages exist before the measurement.
    let warmup = env_or("DROVER_BENCH_WARMUP", 5);
    let mut warm = tokio::task::JoinSet::new();
    for chunk in ids.chunks(devices.div_ceil(64)) {
        let peer = peer.clone();
        let chunk = chunk.to_vec();
        warm.spawn(async move {
            for round in 0..warmup {
                for id in &chunk {
                    let event =
                        format!(r#"{{"type":"reading","celsius":{}}}"#, 19.0 + round as f64);
                    peer.send(id, &event)
                        .await
                        .map_err(|e| anyhow::anyhow!("{id}: {e:?}"))?;
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = warm.join_next().await {
        r??;
    }

    let bytes_before = database_bytes(&db)?;
    let commits_before = peer.commits.load(Ordering::Relaxed);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..in_flight {
        let peer = peer.clone();
        let ids = ids.clone();
        let next = next.clone();
        workers.spawn(async move {
            // Raw samples, merged at the end, as in the core bench.
            let mut samples: Vec<u32> = Vec::with_capacity((events as usize / in_flight) + 1);
            let mut i = w;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= events {
                    break;
                }
                let id = &ids[i % ids.len()];
                i += in_flight;
                // The core bench's readings: drifting slowly through the hysteresis band.
                let step = n / ids.len() as u64;
                let celsius = 19.0 + (step % 50) as f64 / 10.0;
                let event = format!(r#"{{"type":"reading","celsius":{celsius}}}"#);
                let t = Instant::now();
                loop {
                    match peer.send(id, &event).await {
                        Ok(_) => break,
                        Err(SendError::MailboxFull) => tokio::task::yield_now().await,
                        Err(SendError::Failed(e)) => return Err(anyhow::anyhow!("{id}: {e}")),
                    }
                }
                samples.push(t.elapsed().as_micros().clamp(1, u32::MAX as u128) as u32);
            }
            anyhow::Ok(samples)
        });
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    while let Some(r) = workers.join_next().await {
        for us in r?? {
            hist.record(u64::from(us))?;
        }
    }
    let elapsed = start.elapsed();
    let bytes = database_bytes(&db)?.saturating_sub(bytes_before);
    let commits = peer.commits.load(Ordering::Relaxed) - commits_before;
    println!(
        "{:>8} {:>12.0} {:>10} {:>10} {:>15.1} {:>14.1}",
        devices,
        events as f64 / elapsed.as_secs_f64(),
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        bytes as f64 / events as f64,
        events as f64 / commits.max(1) as f64,
    );

    // Closing every mailbox ends the device tasks; their writer handles go with them, which
    // ends the writer.
    drop(peer);
    tokio::task::spawn_blocking(move || writer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the writer thread panicked"))?;
    let _ = std::fs::remove_dir_all(&root);
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

/// The size of the database as its last commit left it (WAL included): page count × page
/// size, read on a connection of its own.
fn database_bytes(path: &Path) -> anyhow::Result<u64> {
    let conn = Connection::open(path)?;
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
    let size: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    Ok(u64::try_from(pages * size)?)
}

// --- The peer: device tasks and the writer ---------------------------------------------------

/// What a durable event returns to its sender, like Drover's `Committed` (the driver only
/// waits for it).
#[derive(Debug)]
#[allow(dead_code)]
struct Committed {
    seq: u64,
    at_ms: u64,
    /// The transitions, one JSON array.
    transitions: String,
}

#[derive(Debug)]
enum SendError {
    /// The device's mailbox is full: retry.
    MailboxFull,
    /// Refused, or the peer is stopping.
    Failed(String),
}

/// An event in a device's mailbox.
struct Request {
    event: String,
    reply: oneshot::Sender<Result<Committed, String>>,
}

/// A row for the writer and the way to tell its device that it is committed (handing back
/// the transitions for the ack).
struct Write {
    device: Arc<str>,
    seq: u64,
    at_ms: u64,
    event: String,
    transitions: String,
    committed: oneshot::Sender<Result<String, String>>,
}

struct Peer {
    devices: HashMap<String, mpsc::Sender<Request>>,
    /// Transactions committed by the writer.
    commits: Arc<AtomicU64>,
}

impl Peer {
    /// Creates the database and the writer, and provisions `ids` with `config`: one task
    /// each. Returns the writer's thread, which ends once the peer is dropped.
    fn open(
        db: &Path,
        ids: &[String],
        config: &str,
    ) -> anyhow::Result<(Self, std::thread::JoinHandle<()>)> {
        let conn = Connection::open(db).with_context(|| format!("opening {}", db.display()))?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        anyhow::ensure!(mode.eq_ignore_ascii_case("wal"), "journal_mode is {mode}");
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE events (
                device TEXT NOT NULL,
                seq INTEGER NOT NULL,
                at_ms INTEGER NOT NULL,
                event TEXT NOT NULL,
                transitions TEXT NOT NULL,
                PRIMARY KEY (device, seq)
            )",
        )?;
        let commits = Arc::new(AtomicU64::new(0));
        let (queue, rows) = std::sync::mpsc::channel();
        let writer = {
            let commits = commits.clone();
            std::thread::Builder::new()
                .name("peer-writer".into())
                .spawn(move || write_loop(conn, rows, &commits))?
        };
        let mut devices = HashMap::with_capacity(ids.len());
        for id in ids {
            let state = Thermostat::init(id, serde_json::from_str(config)?)
                .map_err(|e| anyhow::anyhow!("{id}: {e}"))?;
            let (mailbox, inbox) = mpsc::channel(MAILBOX);
            tokio::spawn(device_task(
                Arc::from(id.as_str()),
                state,
                inbox,
                queue.clone(),
            ));
            devices.insert(id.clone(), mailbox);
        }
        Ok((Self { devices, commits }, writer))
    }

    /// Sends `event` to device `id`; answers once it is committed.
    async fn send(&self, id: &str, event: &str) -> Result<Committed, SendError> {
        let mailbox = self
            .devices
            .get(id)
            .ok_or_else(|| SendError::Failed(format!("unknown device {id}")))?;
        let (reply, answer) = oneshot::channel();
        let request = Request {
            event: event.to_owned(),
            reply,
        };
        mailbox.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::MailboxFull,
            mpsc::error::TrySendError::Closed(_) => SendError::Failed("device stopped".into()),
        })?;
        answer
            .await
            .map_err(|_| SendError::Failed("device dropped the event".into()))?
            .map_err(SendError::Failed)
    }
}

/// One device: handles its mailbox one event at a time, each acked once committed.
async fn device_task(
    id: Arc<str>,
    mut state: Thermostat,
    mut inbox: mpsc::Receiver<Request>,
    writer: std::sync::mpsc::Sender<Write>,
) {
    let mut seq = 0;
    while let Some(Request { event, reply }) = inbox.recv().await {
        let result = handle_one(&id, &mut state, seq + 1, event, &writer).await;
        if result.is_ok() {
            seq += 1;
        }
        let _ = reply.send(result);
    }
}

async fn handle_one(
    id: &Arc<str>,
    state: &mut Thermostat,
    seq: u64,
    event: String,
    writer: &std::sync::mpsc::Sender<Write>,
) -> Result<Committed, String> {
    let parsed: Event = serde_json::from_str(&event).map_err(|e| format!("invalid-event: {e}"))?;
    let at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let transitions = state.handle(at_ms, parsed)?;
    let json = serde_json::to_string(&transitions).map_err(|e| e.to_string())?;
    let (committed, done) = oneshot::channel();
    writer
        .send(Write {
            device: id.clone(),
            seq,
            at_ms,
            event,
            transitions: json,
            committed,
        })
        .map_err(|_| "the writer stopped".to_string())?;
    let json = done
        .await
        .map_err(|_| "the writer dropped the row".to_string())??;
    for t in transitions {
        state.apply(t);
    }
    Ok(Committed {
        seq,
        at_ms,
        transitions: json,
    })
}

/// The writer: every row queued goes into one transaction; each is acked after the commit.
fn write_loop(mut conn: Connection, rows: std::sync::mpsc::Receiver<Write>, commits: &AtomicU64) {
    let mut batch = Vec::new();
    while let Ok(first) = rows.recv() {
        batch.push(first);
        batch.extend(rows.try_iter());
        let result = commit(&mut conn, &batch).map_err(|e| format!("commit failed: {e}"));
        if result.is_ok() {
            commits.fetch_add(1, Ordering::Relaxed);
        }
        for w in batch.drain(..) {
            let _ = w.committed.send(result.clone().map(|()| w.transitions));
        }
    }
}

fn commit(conn: &mut Connection, batch: &[Write]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO events (device, seq, at_ms, event, transitions) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for w in batch {
            // SQLite integers are i64; a seq or a time in ms is far below i64::MAX.
            insert.execute((
                &*w.device,
                w.seq as i64,
                w.at_ms as i64,
                &w.event,
                &w.transitions,
            ))?;
        }
    }
    tx.commit()
}

// --- The thermostat, native: plugins/thermostat/src/lib.rs without the Wasm boundary ---------

/// Lowest physically possible temperature, °C.
const ABSOLUTE_ZERO: f64 = -273.15;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    Off,
    #[default]
    Heat,
}

#[derive(Debug, Clone, PartialEq)]
struct Thermostat {
    device_id: String,
    setpoint: f64,
    hysteresis: f64,
    min_setpoint: f64,
    max_setpoint: f64,
    mode: Mode,
    heating: bool,
    last_celsius: Option<f64>,
    last_reading_at_ms: Option<u64>,
    readings: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_setpoint")]
    setpoint: f64,
    #[serde(default = "default_hysteresis")]
    hysteresis: f64,
    #[serde(default = "default_min_setpoint")]
    min_setpoint: f64,
    #[serde(default = "default_max_setpoint")]
    max_setpoint: f64,
    #[serde(default)]
    mode: Mode,
}

fn default_setpoint() -> f64 {
    20.0
}
fn default_hysteresis() -> f64 {
    0.5
}
fn default_min_setpoint() -> f64 {
    5.0
}
fn default_max_setpoint() -> f64 {
    30.0
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    Reading { celsius: f64 },
    SetPoint { celsius: f64 },
    Mode { mode: Mode },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Transition {
    TemperatureRecorded { celsius: f64, at_ms: u64 },
    SetpointChanged { celsius: f64 },
    ModeChanged { mode: Mode },
    HeatingOn,
    HeatingOff,
}

impl Thermostat {
    fn init(device_id: &str, config: Config) -> Result<Self, String> {
        let Config {
            setpoint,
            hysteresis,
            min_setpoint,
            max_setpoint,
            mode,
        } = config;
        if ![setpoint, hysteresis, min_setpoint, max_setpoint]
            .iter()
            .all(|v| v.is_finite())
        {
            return Err("invalid-config: temperatures must be finite numbers".into());
        }
        if hysteresis < 0.0 {
            return Err(format!(
                "invalid-config: hysteresis must be >= 0, got {hysteresis}"
            ));
        }
        if min_setpoint > max_setpoint {
            return Err(format!(
                "invalid-config: min_setpoint {min_setpoint} is above max_setpoint {max_setpoint}"
            ));
        }
        if !(min_setpoint..=max_setpoint).contains(&setpoint) {
            return Err(format!(
                "invalid-config: setpoint {setpoint} is outside {min_setpoint}..={max_setpoint}"
            ));
        }
        Ok(Thermostat {
            device_id: device_id.to_owned(),
            setpoint,
            hysteresis,
            min_setpoint,
            max_setpoint,
            mode,
            heating: false,
            last_celsius: None,
            last_reading_at_ms: None,
            readings: 0,
        })
    }

    /// The hysteresis rule.
    fn wants_heating(&self) -> bool {
        match (self.mode, self.last_celsius) {
            (Mode::Off, _) => false,
            (Mode::Heat, None) => self.heating,
            (Mode::Heat, Some(t)) if t < self.setpoint - self.hysteresis => true,
            (Mode::Heat, Some(t)) if t > self.setpoint + self.hysteresis => false,
            (Mode::Heat, Some(_)) => self.heating,
        }
    }

    /// The plugin's `handle`, with the context's time as `at_ms`.
    fn handle(&self, at_ms: u64, event: Event) -> Result<Vec<Transition>, String> {
        let mut out = Vec::new();
        match event {
            Event::Reading { celsius } => {
                if !celsius.is_finite() || celsius < ABSOLUTE_ZERO {
                    return Err(format!(
                        "invalid-reading: {celsius} °C is not a possible temperature"
                    ));
                }
                out.push(Transition::TemperatureRecorded { celsius, at_ms });
            }
            Event::SetPoint { celsius } => {
                if !(self.min_setpoint..=self.max_setpoint).contains(&celsius) {
                    return Err(format!(
                        "out-of-range: setpoint {celsius} °C is outside {}..={} °C",
                        self.min_setpoint, self.max_setpoint
                    ));
                }
                if celsius != self.setpoint {
                    out.push(Transition::SetpointChanged { celsius });
                }
            }
            Event::Mode { mode } => {
                if mode != self.mode {
                    out.push(Transition::ModeChanged { mode });
                }
            }
        }
        // Decide the heating on the state these transitions lead to, as the plugin does.
        let mut next = self.clone();
        for t in &out {
            next.apply(t.clone());
        }
        let switch = match (next.heating, next.wants_heating()) {
            (false, true) => Transition::HeatingOn,
            (true, false) => Transition::HeatingOff,
            _ => return Ok(out),
        };
        tracing::debug!(device = %self.device_id, ?switch, "heating switched");
        out.push(switch);
        Ok(out)
    }

    /// The plugin's `apply`.
    fn apply(&mut self, transition: Transition) {
        match transition {
            Transition::TemperatureRecorded { celsius, at_ms } => {
                self.last_celsius = Some(celsius);
                self.last_reading_at_ms = Some(at_ms);
                self.readings += 1;
            }
            Transition::SetpointChanged { celsius } => self.setpoint = celsius,
            Transition::ModeChanged { mode } => self.mode = mode,
            Transition::HeatingOn => self.heating = true,
            Transition::HeatingOff => self.heating = false,
        }
    }
}
