//! Shared helpers of the HTTP integration tests: a real `drover serve` child process, a small
//! JSON client, raw HTTP for requests a URL library would normalize away, poll loops, and
//! the plugin directory every test loads ([`plugin_dir`], see `plugins.rs`).
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

mod plugins;

#[allow(unused_imports)] // each test binary uses its own part of the support code
pub use plugins::{
    cargo_command, misbehave_variant, outside_target_dir, plugin_dir, strip_build_env,
    thermostat_v0_1, thermostat_v0_2,
};

/// [`plugin_dir`] where a constant is wanted: converts to the directory's path (for
/// `RuntimeBuilder::plugin_dir`) and derefs to it.
#[derive(Debug, Clone, Copy)]
pub struct PluginDir;

impl From<PluginDir> for PathBuf {
    fn from(_: PluginDir) -> PathBuf {
        plugin_dir().to_path_buf()
    }
}

impl AsRef<Path> for PluginDir {
    fn as_ref(&self) -> &Path {
        plugin_dir()
    }
}

impl std::ops::Deref for PluginDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        plugin_dir()
    }
}

/// The `drover` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_drover");

/// A `drover serve` child process on a free port. Killed (SIGKILL) when dropped; when the
/// test is failing, the tail of its log is printed first.
pub struct Server {
    child: Option<Child>,
    pub url: String,
    /// `host:port`.
    pub addr: String,
    pub data: PathBuf,
    log: PathBuf,
}

impl Server {
    /// Starts `drover serve` on `data` with every test plugin (thermostat, door-lock,
    /// misbehave) and `extra` flags, and waits for its listening line.
    pub fn start(data: &Path, extra: &[&str]) -> Server {
        Server::start_with(data, extra, |_| {})
    }

    /// [`Server::start`], with `configure` applied to the command before it is spawned.
    pub fn start_with(data: &Path, extra: &[&str], configure: impl FnOnce(&mut Command)) -> Server {
        let log = data.with_extension("log");
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("opening the server log");
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .arg("--data")
            .arg(data)
            .args(["--listen", "127.0.0.1:0", "--plugins"])
            .arg(plugin_dir())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        configure(&mut command);
        let mut child = command.spawn().expect("spawning drover serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let url = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("drover listening on ") {
                        break url.trim().to_string();
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "drover serve did not announce its address; log:\n{}",
                        tail(&log, 40)
                    );
                }
            }
        };
        let addr = url.trim_start_matches("http://").to_string();
        Server {
            child: Some(child),
            url,
            addr,
            data: data.to_path_buf(),
            log,
        }
    }

    /// Everything the server has logged so far (its stderr).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL, as `kill -9` (what `std::process::Child::kill` sends on Unix).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reaping the server");
        }
    }

    /// SIGTERM, then waits for the graceful exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server running");
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "sending SIGTERM");
        poll_until(
            Duration::from_secs(60),
            "graceful exit after SIGTERM",
            || child.try_wait().expect("waiting for the server"),
        )
    }

    /// Resident memory of the server process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("reading /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// A JSON client for this server.
    pub fn api(&self) -> Api {
        Api::new(&self.url)
    }

    /// Size of the journal file on disk.
    pub fn journal_len(&self) -> u64 {
        std::fs::metadata(self.data.join("journal.log"))
            .map(|m| m.len())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- server log ({}) ---\n{}",
                self.log.display(),
                tail(&self.log, 60)
            );
        }
        self.kill();
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Calls `f` until it returns `Some`, at most for `timeout`.
pub fn poll_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An answer: status, headers and the body as JSON (`Value::Null` if it is not JSON).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Answer {
    /// Asserts this is an error with `status` and `code` in the API's error shape.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "status of {}", self.text);
        assert_eq!(self.body["error"]["code"], code, "code of {}", self.text);
        assert!(
            self.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "message of {}",
            self.text
        );
        assert_eq!(
            self.body.as_object().map(|o| o.len()),
            Some(1),
            "only `error` at the top: {}",
            self.text
        );
        assert_eq!(
            self.headers
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "content type of {}",
            self.text
        );
    }
}

/// A blocking JSON client (keep-alive) for one server.
#[derive(Clone)]
pub struct Api {
    base: String,
    http: reqwest::blocking::Client,
}

impl Api {
    pub fn new(base: &str) -> Api {
        Api {
            base: base.to_string(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("HTTP client"),
        }
    }

    /// Sends a request; `Err` only for transport failures.
    pub fn try_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> reqwest::Result<Answer> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        let response = req.send()?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text()?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Answer {
            status,
            headers,
            body,
            text,
        })
    }

    pub fn call(&self, method: reqwest::Method, path: &str, body: Option<Vec<u8>>) -> Answer {
        self.try_call(method.clone(), path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub fn get(&self, path: &str) -> Answer {
        self.call(reqwest::Method::GET, path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Answer {
        self.call(
            reqwest::Method::POST,
            path,
            Some(body.to_string().into_bytes()),
        )
    }

    pub fn post_raw(&self, path: &str, body: &[u8]) -> Answer {
        self.call(reqwest::Method::POST, path, Some(body.to_vec()))
    }

    pub fn put(&self, path: &str, body: &Value) -> Answer {
        self.call(
            reqwest::Method::PUT,
            path,
            Some(body.to_string().into_bytes()),
        )
    }

    /// Provisions a device, asserting 201.
    pub fn provision(&self, id: &str, plugin: &str, config: Value) -> Value {
        let a = self.put(
            &format!("/v1/devices/{id}"),
            &serde_json::json!({"plugin": plugin, "config": config}),
        );
        assert_eq!(a.status, 201, "provisioning {id}: {}", a.text);
        a.body
    }

    /// Sends an event, asserting 200; returns the acknowledgement.
    pub fn send(&self, id: &str, event: &Value) -> Value {
        let a = self.post(&format!("/v1/devices/{id}/events"), event);
        assert_eq!(a.status, 200, "sending to {id}: {}", a.text);
        a.body
    }

    /// Every journal record of a device, following `next` with pages of `limit`.
    pub fn journal(&self, id: &str, limit: usize) -> Vec<Value> {
        let mut out = Vec::new();
        let mut from = 1;
        loop {
            let a = self.get(&format!(
                "/v1/devices/{id}/journal?from={from}&limit={limit}"
            ));
            assert_eq!(a.status, 200, "journal of {id}: {}", a.text);
            out.extend(
                a.body["records"]
                    .as_array()
                    .expect("records")
                    .iter()
                    .cloned(),
            );
            match a.body["next"].as_u64() {
                Some(next) => {
                    assert_eq!(next, from + limit as u64, "next of a full page");
                    from = next;
                }
                None => return out,
            }
        }
    }
}

/// Sends one raw HTTP/1.1 request (for paths a URL library would normalize, such as `..`)
/// and returns the status and body.
pub fn raw_request(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).expect("connecting");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("writing");
    s.write_all(body).expect("writing");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).expect("reading");
    let text = String::from_utf8_lossy(&answer);
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Runs the `drover` CLI with `args`; returns (success, stdout, stderr).
pub fn cli(args: &[&str]) -> (bool, String, String) {
    cli_in(Path::new("."), args)
}

/// [`cli`] in the working directory `dir`.
pub fn cli_in(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .env_remove("DROVER_SERVER")
        .output()
        .expect("running drover");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A small xorshift generator: deterministic for a given seed, so a workload can be replayed
/// (tests print the seed when it comes from the clock).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Waits (up to 30 s) until the journal in `data` ends with the marker of an empty batch,
/// which an idle writer adds 50 ms after its last commit: everything acknowledged is then
/// proven durable, and an online backup copies all of it.
pub fn wait_until_idle_proven(data: &Path) {
    poll_until(Duration::from_secs(30), "the last batch proven", || {
        let journal = drover::journal::Journal::open_read_only(data).ok()?;
        journal.recovery().closed_cleanly.then_some(())
    });
}

/// Records `rt`'s journal made durable since it opened. Records, not bytes: an idle writer
/// adds the marker of an empty batch on its own, so "wrote nothing" is checked with this.
pub fn records_written(rt: &drover::Runtime) -> u64 {
    rt.journal()
        .stats()
        .records
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// What a test's subscriber wrote, shared with the test.
#[derive(Clone, Default)]
pub struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    /// A subscriber writing here, the default of the calling thread while the guard lives.
    pub fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let guard = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(logs.clone())
                .with_ansi(false)
                .finish(),
        );
        (logs, guard)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

/// A misbehave `slow_apply` event: `count` transitions whose `apply` each spins `spin` times.
pub fn slow_apply(spin: u64, count: u32) -> String {
    format!(r#"{{"type":"slow_apply","spin":{spin},"count":{count}}}"#)
}

/// How many `slow_apply` spins take `seconds` on this machine, measured on device `id` (a
/// misbehave device; the probe event is committed). Guests have no clock, so tests calibrate.
pub async fn spins_for(rt: &drover::Runtime, id: &str, seconds: f64) -> u64 {
    let probe = 20_000_000u64;
    let started = Instant::now();
    rt.send(id, &slow_apply(probe, 1)).await.expect("probe");
    let per_spin = started.elapsed().as_secs_f64() / probe as f64;
    (seconds / per_spin.max(1e-12)) as u64
}

/// Busy threads that keep every core oversubscribed while alive: `per_core` spinning threads
/// per core, stopped and joined on drop. Tests of CPU-time budgets use them to make a guest
/// wait for a core (its wall-clock time grows, its CPU time does not).
pub struct Hogs {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Hogs {
    pub fn start(per_core: usize) -> Hogs {
        use std::sync::atomic::{AtomicBool, Ordering};
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let threads = (0..per_core * cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Hogs { stop, threads }
    }
}

/// A child process killed (SIGKILL) and reaped when dropped, so that a test that fails
/// part-way leaves none running.
pub struct Reaped(pub Child);

impl std::ops::Deref for Reaped {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Uploads `bytes` as a version of the `misbehave` plugin: the version, and whether it is new.
pub async fn upload_misbehave(
    rt: &drover::Runtime,
    bytes: Vec<u8>,
) -> (drover::PluginVersion, bool) {
    rt.register_plugin("misbehave", bytes, drover::registry::Origin::Upload)
        .await
        .expect("the upload registers")
}

/// The `misbehave` test plugin's default build.
pub fn misbehave_v1() -> Vec<u8> {
    std::fs::read(plugin_dir().join("misbehave.wasm")).expect("misbehave built")
}

/// The same component with a custom section appended: other bytes (another version),
/// identical behavior. A component-level custom section is id 0, a LEB128 size, then a
/// name and a payload.
pub fn identical_rebuild(bytes: &[u8]) -> Vec<u8> {
    let name = b"drover-test-rebuild";
    let payload = b"same code, other bytes";
    let mut out = bytes.to_vec();
    out.push(0);
    out.push((1 + name.len() + payload.len()) as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(payload);
    out
}
