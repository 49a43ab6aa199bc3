//! The fleet simulator: many devices streaming events to a server over HTTP.
//!
//! It provisions N devices (thermostats, door locks, or a mix) and sends them plausible
//! events, either
//!
//! * **closed loop**: K requests in flight, each worker sending its next request as soon as
//!   the previous one is answered (as fast as the server goes), or
//! * **at a rate**: requests are scheduled at fixed times for R events/s; latency is measured
//!   from the scheduled time, so a server that falls behind shows its queueing delay instead
//!   of hiding it (no coordinated omission),
//!
//! with single events (`POST /v1/devices/{id}/events`) or gateway batches of B events
//! (`POST /v1/events`), until a duration or an event count is reached. A progress line goes to
//! stderr every second (events/s, p50/p99 latency, errors) and a [`Summary`] comes back at the
//! end (printable, and serializable for scripts and benchmarks).
//!
//! Each worker owns one keep-alive HTTP/1.1 connection (a bare `hyper` client: the pooling
//! and URL handling of a general-purpose client would cost the simulator more CPU than the
//! server spends on the request, on the same cores). A connection that fails is counted as a
//! `transport` error and replaced.

use std::collections::BTreeMap;
use std::fmt;
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// A device type the simulator can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The `thermostat` example plugin: readings and the odd setpoint change.
    Thermostat,
    /// The `door-lock` example plugin: lock, unlock with the right PIN, battery reports.
    DoorLock,
}

/// The PIN the simulated door locks are provisioned with.
const DOOR_CODE: &str = "4711";

impl Kind {
    /// The plugin name.
    pub fn plugin(self) -> &'static str {
        match self {
            Kind::Thermostat => "thermostat",
            Kind::DoorLock => "door-lock",
        }
    }

    /// The provisioning config.
    pub fn config(self) -> serde_json::Value {
        match self {
            Kind::Thermostat => serde_json::json!({"setpoint": 21.0}),
            Kind::DoorLock => serde_json::json!({"code": DOOR_CODE}),
        }
    }

    /// Appends one event as JSON. Only events the plugin accepts in any state: the simulator
    /// has no per-device memory, and refusals would read as errors.
    fn event(self, rng: &mut Rng, out: &mut String) {
        use std::fmt::Write as _;
        let roll = rng.below(100);
        let _ = match self {
            Kind::Thermostat if roll < 95 => {
                let tenths = 150 + rng.below(100);
                write!(
                    out,
                    r#"{{"type":"reading","celsius":{}.{}}}"#,
                    tenths / 10,
                    tenths % 10
                )
            }
            Kind::Thermostat => write!(
                out,
                r#"{{"type":"set_point","celsius":{}}}"#,
                18 + rng.below(7)
            ),
            // The door is never opened, so `lock` is never refused; the PIN is always right,
            // so there is never a lockout.
            Kind::DoorLock if roll < 40 => {
                write!(
                    out,
                    r#"{{"type":"battery","percent":{}}}"#,
                    5 + rng.below(96)
                )
            }
            Kind::DoorLock if roll < 70 => {
                write!(out, r#"{{"type":"unlock","code":"{DOOR_CODE}"}}"#)
            }
            Kind::DoorLock => write!(out, r#"{{"type":"lock"}}"#),
        };
    }
}

/// Which device types make up the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fleet {
    /// Alternating thermostats and door locks.
    Mixed,
    /// Only this type.
    Only(Kind),
}

impl std::str::FromStr for Fleet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mixed" => Ok(Fleet::Mixed),
            "thermostat" => Ok(Fleet::Only(Kind::Thermostat)),
            "door-lock" => Ok(Fleet::Only(Kind::DoorLock)),
            other => Err(format!(
                "no event generator for `{other}` (use thermostat, door-lock or mixed)"
            )),
        }
    }
}

impl fmt::Display for Fleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fleet::Mixed => f.write_str("mixed"),
            Fleet::Only(k) => f.write_str(k.plugin()),
        }
    }
}

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// As fast as the server answers, `concurrency` requests in flight.
    Closed,
    /// This many events per second, with at most `concurrency` requests in flight.
    Rate(f64),
}

/// Everything a simulation run needs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Base URL of the server (`http://host:port`).
    pub server: String,
    /// How many devices.
    pub devices: usize,
    /// Their types.
    pub fleet: Fleet,
    /// Device ids are this prefix and a six-digit number.
    pub prefix: String,
    /// Pacing.
    pub load: Load,
    /// Requests in flight (closed loop), or the most in flight (rate).
    pub concurrency: usize,
    /// Stop after this long (measured from the first event).
    pub duration: Option<Duration>,
    /// Stop after this many events.
    pub events: Option<u64>,
    /// Events per request: 1 sends single events, more sends gateway batches.
    pub batch: usize,
    /// Print a progress line on stderr every second.
    pub progress: bool,
    /// Seed of the event generator.
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            server: "http://127.0.0.1:7070".into(),
            devices: 100,
            fleet: Fleet::Mixed,
            prefix: "sim-".into(),
            load: Load::Closed,
            concurrency: 32,
            duration: Some(Duration::from_secs(10)),
            events: None,
            batch: 1,
            progress: true,
            seed: 1,
        }
    }
}

impl SimConfig {
    /// The id and type of device `i`.
    pub fn device(&self, i: usize) -> (String, Kind) {
        let kind = match self.fleet {
            Fleet::Only(k) => k,
            Fleet::Mixed if i.is_multiple_of(2) => Kind::Thermostat,
            Fleet::Mixed => Kind::DoorLock,
        };
        (format!("{}{i:06}", self.prefix), kind)
    }
}

/// Latency figures, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub devices: usize,
    pub fleet: String,
    /// `closed-loop` or `rate`.
    pub mode: String,
    /// Target events/s in rate mode.
    pub target_rate: Option<f64>,
    pub concurrency: usize,
    pub batch: usize,
    pub elapsed_secs: f64,
    /// HTTP requests answered (or failed).
    pub requests: u64,
    pub events_ok: u64,
    pub events_failed: u64,
    /// Acknowledged (durable) events per second.
    pub events_per_sec: f64,
    /// Per request (a batch counts once).
    pub latency_us: Latency,
    /// Failed events by error code (`transport` for connection failures).
    pub errors: BTreeMap<String, u64>,
}

/// Microseconds as a short readable duration.
pub fn fmt_us(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2} s", us as f64 / 1e6)
    } else if us >= 1000 {
        format!("{:.2} ms", us as f64 / 1e3)
    } else {
        format!("{us} µs")
    }
}

/// `n` with thousands separators.
pub fn fmt_count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pacing = match self.target_rate {
            Some(r) => format!("at {} events/s", fmt_count(r as u64)),
            None => "closed loop".to_string(),
        };
        let shape = if self.batch > 1 {
            format!("batches of {}", self.batch)
        } else {
            "single events".to_string()
        };
        writeln!(
            f,
            "{} devices ({}), {pacing}, {} requests in flight, {shape}",
            self.devices, self.fleet, self.concurrency
        )?;
        writeln!(
            f,
            "  {:.1} s: {} events acknowledged, {} failed, {} requests -> {} events/s",
            self.elapsed_secs,
            fmt_count(self.events_ok),
            fmt_count(self.events_failed),
            fmt_count(self.requests),
            fmt_count(self.events_per_sec.round() as u64)
        )?;
        let l = &self.latency_us;
        writeln!(
            f,
            "  latency per request: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            fmt_us(l.p50),
            fmt_us(l.p90),
            fmt_us(l.p99),
            fmt_us(l.p999),
            fmt_us(l.max)
        )?;
        if !self.errors.is_empty() {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(code, n)| format!("{code} {}", fmt_count(*n)))
                .collect();
            writeln!(f, "  errors: {}", list.join(", "))?;
        }
        Ok(())
    }
}

/// Where the server is, as the connection needs it.
#[derive(Debug, Clone)]
struct Target {
    /// `host:port` to connect to.
    addr: String,
    /// The `Host` header.
    host: HeaderValue,
}

impl Target {
    fn parse(url: &str) -> anyhow::Result<Target> {
        let rest = match url.strip_prefix("http://") {
            Some(rest) => rest,
            None if url.starts_with("https://") => {
                bail!("the simulator speaks plain HTTP only: {url}")
            }
            None => url,
        };
        let authority = rest.split('/').next().unwrap_or(rest);
        if authority.is_empty() {
            bail!("no host in server URL `{url}`");
        }
        let addr = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Target {
            host: HeaderValue::from_str(authority)
                .with_context(|| format!("bad host in server URL `{url}`"))?,
            addr,
        })
    }
}

/// One keep-alive HTTP/1.1 connection, reopened after a failure.
struct Conn {
    target: Target,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    fn new(target: Target) -> Conn {
        Conn {
            target,
            sender: None,
        }
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let tcp = tokio::net::TcpStream::connect(&self.target.addr)
            .await
            .with_context(|| format!("connecting to {}", self.target.addr))?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "simulator connection closed");
            }
        });
        Ok(sender)
    }

    /// Sends one request and reads the whole answer.
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let result = self.try_call(method, path, body).await;
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    async fn try_call(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let sender = match &mut self.sender {
            Some(s) => s,
            None => self.sender.insert(self.connect().await?),
        };
        sender.ready().await?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.target.host.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(body))?;
        let response = sender.send_request(req).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// A small, fast, seedable generator (xorshift64*): event contents need variety, not quality.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The code in an error answer, or `http-STATUS` if the body is not the error shape.
fn error_code(status: StatusCode, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Shape {
        error: Detail,
    }
    #[derive(Deserialize)]
    struct Detail {
        code: String,
    }
    serde_json::from_slice::<Shape>(body)
        .map(|s| s.error.code)
        .unwrap_or_else(|_| format!("http-{}", status.as_u16()))
}

/// Provisions every device of `cfg` (idempotent: existing identical devices are fine).
pub async fn provision(cfg: &SimConfig) -> anyhow::Result<()> {
    let target = Target::parse(&cfg.server)?;
    let next = Arc::new(AtomicU64::new(0));
    let workers = cfg.concurrency.clamp(1, 64);
    let mut tasks = Vec::with_capacity(workers);
    for _ in 0..workers {
        let cfg = cfg.clone();
        let next = next.clone();
        let mut conn = Conn::new(target.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= cfg.devices {
                    return Ok::<(), anyhow::Error>(());
                }
                let (id, kind) = cfg.device(i);
                let body = serde_json::to_vec(
                    &serde_json::json!({"plugin": kind.plugin(), "config": kind.config()}),
                )?;
                let (status, answer) = conn
                    .call(Method::PUT, &format!("/v1/devices/{id}"), body.into())
                    .await
                    .with_context(|| format!("provisioning {id}"))?;
                if !status.is_success() {
                    bail!(
                        "provisioning {id} failed: HTTP {status}: {}",
                        String::from_utf8_lossy(&answer)
                    );
                }
            }
        }));
    }
    for t in tasks {
        t.await.context("provisioning task")??;
    }
    Ok(())
}

/// Counters shared by the workers and the progress reporter.
struct Shared {
    cfg: SimConfig,
    target: Target,
    stop: AtomicBool,
    /// Events handed out (for `--events`).
    issued: AtomicU64,
    /// Requests scheduled (rate mode).
    slots: AtomicU64,
    start: Instant,
    requests: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn fail(&self, code: String, events: u64) {
        self.failed.fetch_add(events, Ordering::Relaxed);
        *self.errors.lock().entry(code).or_default() += events;
    }
}

/// A worker's latency histograms: since the last progress line, and overall.
struct Recorder {
    interval: Histogram<u64>,
    total: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 10 min at 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid")
}

/// Runs the simulation described by `cfg` against an already provisioned fleet (see
/// [`provision`]).
pub async fn run(cfg: &SimConfig) -> anyhow::Result<Summary> {
    if cfg.devices == 0 {
        bail!("the fleet needs at least one device");
    }
    if cfg.duration.is_none() && cfg.events.is_none() {
        bail!("give a duration or an event count");
    }
    let batch = cfg.batch.max(1);
    let concurrency = cfg.concurrency.max(1);
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        target: Target::parse(&cfg.server)?,
        stop: AtomicBool::new(false),
        issued: AtomicU64::new(0),
        slots: AtomicU64::new(0),
        start: Instant::now(),
        requests: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        errors: Mutex::new(BTreeMap::new()),
    });
    let recorders: Vec<Arc<Mutex<Recorder>>> = (0..concurrency)
        .map(|_| {
            Arc::new(Mutex::new(Recorder {
                interval: histogram(),
                total: histogram(),
            }))
        })
        .collect();

    let workers: Vec<_> = recorders
        .iter()
        .enumerate()
        .map(|(w, rec)| {
            let shared = shared.clone();
            let rec = rec.clone();
            tokio::spawn(worker(shared, rec, w as u64, batch))
        })
        .collect();

    let progress = cfg
        .progress
        .then(|| tokio::spawn(report(shared.clone(), recorders.clone())));
    if let Some(d) = cfg.duration {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            shared.stop.store(true, Ordering::Relaxed);
        });
    }
    for w in workers {
        w.await.context("simulator worker")?;
    }
    let elapsed = shared.start.elapsed();
    shared.stop.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        p.abort();
        let _ = p.await;
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }

    let mut total = histogram();
    for r in &recorders {
        let _ = total.add(&r.lock().total);
    }
    let ok = shared.ok.load(Ordering::Relaxed);
    Ok(Summary {
        devices: cfg.devices,
        fleet: cfg.fleet.to_string(),
        mode: match cfg.load {
            Load::Closed => "closed-loop".into(),
            Load::Rate(_) => "rate".into(),
        },
        target_rate: match cfg.load {
            Load::Closed => None,
            Load::Rate(r) => Some(r),
        },
        concurrency,
        batch,
        elapsed_secs: elapsed.as_secs_f64(),
        requests: shared.requests.load(Ordering::Relaxed),
        events_ok: ok,
        events_failed: shared.failed.load(Ordering::Relaxed),
        events_per_sec: ok as f64 / elapsed.as_secs_f64().max(1e-9),
        latency_us: Latency::of(&total),
        errors: shared.errors.lock().clone(),
    })
}

/// One closed-loop (or paced) sender on its own connection.
async fn worker(shared: Arc<Shared>, rec: Arc<Mutex<Recorder>>, w: u64, batch: usize) {
    let cfg = &shared.cfg;
    let mut conn = Conn::new(shared.target.clone());
    let mut rng = Rng::new(cfg.seed ^ (w + 1).wrapping_mul(0xa076_1d64_78bd_642f));
    let mut body = String::with_capacity(64 * batch + 16);
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let n = match cfg.events {
            Some(limit) => {
                let t = shared.issued.fetch_add(batch as u64, Ordering::Relaxed);
                if t >= limit {
                    return;
                }
                (limit - t).min(batch as u64) as usize
            }
            None => batch,
        };
        let scheduled = match cfg.load {
            Load::Closed => Instant::now(),
            Load::Rate(rate) => {
                let slot = shared.slots.fetch_add(1, Ordering::Relaxed);
                let at = shared.start
                    + Duration::from_secs_f64(slot as f64 * batch as f64 / rate.max(1e-3));
                tokio::time::sleep_until(at.into()).await;
                if shared.stop.load(Ordering::Relaxed) {
                    return;
                }
                at
            }
        };

        body.clear();
        let (method, path) = if batch == 1 {
            let (id, kind) = cfg.device(rng.below(cfg.devices as u64) as usize);
            kind.event(&mut rng, &mut body);
            (Method::POST, format!("/v1/devices/{id}/events"))
        } else {
            body.push_str(r#"{"events":["#);
            for i in 0..n {
                let (id, kind) = cfg.device(rng.below(cfg.devices as u64) as usize);
                if i > 0 {
                    body.push(',');
                }
                body.push_str(r#"{"device":""#);
                body.push_str(&id);
                body.push_str(r#"","event":"#);
                kind.event(&mut rng, &mut body);
                body.push('}');
            }
            body.push_str("]}");
            (Method::POST, "/v1/events".to_string())
        };

        let result = conn
            .call(method, &path, Bytes::copy_from_slice(body.as_bytes()))
            .await;
        let latency = scheduled.elapsed();
        shared.requests.fetch_add(1, Ordering::Relaxed);
        match result {
            Err(e) => {
                tracing::debug!(error = %e, "request failed");
                shared.fail("transport".into(), n as u64);
                // Do not spin on a dead server.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok((status, answer)) if status == StatusCode::OK && batch > 1 => {
                count_batch(&shared, &answer, n as u64)
            }
            Ok((status, _)) if status == StatusCode::OK => {
                shared.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok((status, answer)) => shared.fail(error_code(status, &answer), n as u64),
        }
        let us = (latency.as_micros() as u64).max(1);
        let mut r = rec.lock();
        let _ = r.interval.record(us);
        let _ = r.total.record(us);
    }
}

/// Counts the per-item results of a batch answer.
fn count_batch(shared: &Shared, answer: &[u8], n: u64) {
    #[derive(Deserialize)]
    struct Counts {
        ok: u64,
        failed: u64,
    }
    #[derive(Deserialize)]
    struct Item {
        error: Option<Code>,
    }
    #[derive(Deserialize)]
    struct Code {
        code: String,
    }
    #[derive(Deserialize)]
    struct Full {
        results: Vec<Item>,
    }
    match serde_json::from_slice::<Counts>(answer) {
        Ok(c) => {
            shared.ok.fetch_add(c.ok, Ordering::Relaxed);
            if c.failed > 0 {
                match serde_json::from_slice::<Full>(answer) {
                    Ok(full) => {
                        for code in full.results.into_iter().filter_map(|i| i.error) {
                            shared.fail(code.code, 1);
                        }
                    }
                    Err(_) => shared.fail("unreadable-answer".into(), c.failed),
                }
            }
        }
        Err(_) => shared.fail("unreadable-answer".into(), n),
    }
}

/// Prints a progress line every second until aborted.
async fn report(shared: Arc<Shared>, recorders: Vec<Arc<Mutex<Recorder>>>) {
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last_ok = 0;
    let mut last = Instant::now();
    loop {
        tick.tick().await;
        let mut interval = histogram();
        for r in &recorders {
            let mut r = r.lock();
            let _ = interval.add(&r.interval);
            r.interval.reset();
        }
        let now = Instant::now();
        let ok = shared.ok.load(Ordering::Relaxed);
        let rate = (ok - last_ok) as f64 / now.duration_since(last).as_secs_f64().max(1e-9);
        let errors: u64 = shared.errors.lock().values().sum();
        let line = format!(
            "[{:>4.0} s] {:>9} events/s  p50 {:>9}  p99 {:>9}  errors {}  (total {})",
            shared.start.elapsed().as_secs_f64(),
            fmt_count(rate.round() as u64),
            fmt_us(interval.value_at_quantile(0.5)),
            fmt_us(interval.value_at_quantile(0.99)),
            fmt_count(errors),
            fmt_count(ok),
        );
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
        last_ok = ok;
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_events_are_json_the_plugins_take() {
        let mut rng = Rng::new(7);
        for kind in [Kind::Thermostat, Kind::DoorLock] {
            for _ in 0..200 {
                let mut s = String::new();
                kind.event(&mut rng, &mut s);
                let v: serde_json::Value = serde_json::from_str(&s).expect(&s);
                assert!(v["type"].is_string(), "{s}");
            }
        }
    }

    #[test]
    fn targets_and_formats() {
        let t = Target::parse("http://127.0.0.1:7070/").unwrap();
        assert_eq!(t.addr, "127.0.0.1:7070");
        assert_eq!(Target::parse("example.com").unwrap().addr, "example.com:80");
        assert!(Target::parse("https://x").is_err());
        assert_eq!(fmt_count(1234567), "1,234,567");
        assert_eq!(fmt_count(12), "12");
        assert_eq!(fmt_us(1500), "1.50 ms");
        let cfg = SimConfig::default();
        assert_eq!(cfg.device(3), ("sim-000003".to_string(), Kind::DoorLock));
    }
}
