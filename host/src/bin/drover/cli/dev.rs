//! `drover dev [DIR]`: the plugin author's loop. Save a file; the new behavior is live in the
//! running devices, their state kept.
//!
//! Starts a local server (data in `DIR/target/drover-dev-data`, so devices survive restarts of
//! `drover dev`) or targets one (`--server`), then on start and after every change under
//! `DIR` (debounced; `target/` and hidden directories ignored):
//!
//! 1. **build**: `cargo build --target wasm32-wasip2` in `DIR`, with the crate's
//!    `drover-dev` profile if it has one (`drover new` writes it: release settings without
//!    LTO, incremental; 0.65 s per rebuild instead of 2.2 s), else `--release`. A failing
//!    build prints the compiler's errors; the version that was serving keeps serving.
//! 2. **push**: uploads the component as a new version (the server validates and compiles
//!    it; identical bytes are no change).
//! 3. **deploy**: moves the plugin's devices to it by replaying their journals (see the
//!    deploy report); refused, with the reason, if the new version cannot fold a sampled
//!    device's history, unless `--force`.
//! 4. **show**: the state diff of a few live devices, and where the time went.
//!
//! The machine-readable line `live: NAME vN` marks each version going live.
//!
//! SIGTERM or Ctrl-C stops it: a build under way is stopped (its cargo is sent SIGTERM, and
//! the crate's incremental cache, which a compile cut short can leave unusable, is dropped), and
//! the local server shuts down as `drover serve` does (in-flight requests answered, mailboxes
//! drained, the journal flushed and its index checkpointed), then `stopped` is printed. A
//! second signal exits at once. A `drover dev` that dies without stopping its build (a
//! `kill -9`, a crash) leaves no cargo running: the kernel sends cargo SIGTERM.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use notify_debouncer_mini::{new_debouncer, notify::RecursiveMode};
use serde_json::{Value, json};

use super::client::{
    ApiClient, ApiFailure, ClientOpts, LONG_OPERATION_TIMEOUT, query_value, segment,
};
use super::plugins::{print_deploy, refusal_in_cli_words};
use super::serve::announce;

/// Devices a save's state diff looks through for ones of the plugin (see
/// [`Dev::sample_devices`]): ten pages of the device list.
const SAMPLE_WALK: usize = 10_000;

/// `drover dev [DIR] [--server URL | --data DIR --listen ADDR]`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// The plugin crate (default: the current directory).
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// The plugin's name on the server (default: the crate's package name).
    #[arg(long)]
    pub name: Option<String>,
    /// Target this server instead of starting a local one.
    #[arg(long, env = "DROVER_SERVER")]
    pub server: Option<String>,
    /// Data directory of the local server (default: DIR/target/drover-dev-data; not
    /// `target/drover-dev`, which is cargo's own directory for the `drover-dev` profile's
    /// build scripts, and which `cargo clean --profile drover-dev` empties).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Address of the local server.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Deploy every save even when the new version cannot fold some sampled device's history
    /// (those devices stay on their version; the `live:` line counts them).
    #[arg(long)]
    pub force: bool,
    /// Quiet period after a change before rebuilding, in ms.
    #[arg(long, default_value_t = 200)]
    pub debounce_ms: u64,
    /// Build, push and deploy once, then exit: 0 if it went live on every live device, 1
    /// otherwise (a failed build, a refused deploy, devices left behind).
    #[arg(long)]
    pub once: bool,
}

/// Runs `drover dev`.
pub fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("no plugin crate at {}", args.dir.display()))?;
    let meta = cargo_metadata(&dir)?;
    let name = match &args.name {
        Some(n) => n.clone(),
        None => package_name(&dir, &meta)?,
    };
    let target_dir = meta["target_directory"]
        .as_str()
        .map_or_else(|| dir.join("target"), PathBuf::from);
    // The crates' names as rustc knows them (`-` made `_`), which name their incremental
    // caches.
    let crates = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["name"].as_str())
        .map(|n| n.replace('-', "_"))
        .collect();
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("drover-dev")
        .build()
        .context("starting the async runtime")?;
    // The local server, if any, runs on the tokio threads; this thread runs the loop with the
    // blocking client.
    let (url, local) = match &args.server {
        Some(url) => {
            // `DROVER_SERVER`, exported for the other commands, also picks it here: say so,
            // or the missing local server looks like a failure to start one.
            let from_env = !std::env::args().any(|a| a == "--server" || a.starts_with("--server="));
            if from_env {
                println!(
                    "using the server at {url} (from DROVER_SERVER); no local server is started \
                     (unset DROVER_SERVER to get one)"
                );
            }
            (url.clone(), None)
        }
        None => {
            let data = args
                .data
                .clone()
                .unwrap_or_else(|| dir.join("target").join("drover-dev-data"));
            let (rt, server) = tokio.block_on(async {
                // Bound first, as `drover serve` does: a port in use fails before the data
                // directory is created (it was left behind, empty).
                let listener = drover::http::server::bind(&args.listen).await?;
                let rt = drover::Runtime::builder(&data)
                    .open()
                    .await
                    .with_context(|| format!("opening {}", data.display()))?;
                let server =
                    drover::http::Server::start_on(rt.clone(), listener, Default::default())?;
                anyhow::Ok((rt, server))
            })?;
            announce(&server);
            (server.url(), Some((rt, server)))
        }
    };
    let api = ApiClient::new(&ClientOpts {
        server: url.clone(),
        json: false,
    })?;
    let (wake, woken) = mpsc::channel();
    let stop = Stop::default();
    // Signals end the loop; the thread running it is busy in a build or a deploy, or waits
    // for file changes, so the signal is caught on the async threads and handed over.
    tokio.spawn({
        let (wake, stop) = (wake.clone(), stop.clone());
        async move {
            drover::http::server::shutdown_signal().await;
            println!("stopping (a second Ctrl-C or SIGTERM exits at once)");
            stop.request();
            let _ = wake.send(Wake::Stop);
            drover::http::server::shutdown_signal().await;
            std::process::exit(130);
        }
    });
    let mut dev = Dev {
        api,
        dir: dir.clone(),
        name,
        force: args.force,
        live_version: None,
        stop: stop.clone(),
        target_dir,
        crates,
    };
    let mut code = ExitCode::SUCCESS;
    let outcome = if args.once {
        if !dev.cycle() {
            code = ExitCode::FAILURE;
        }
        Ok(())
    } else {
        println!(
            "watching {} (plugin `{}`, server {url}); Ctrl-C stops",
            dir.display(),
            dev.name
        );
        dev.watch(Duration::from_millis(args.debounce_ms), wake, woken)
    };
    // The local server stops gracefully however the loop ended.
    if let Some((rt, server)) = local {
        tokio.block_on(async {
            server.shutdown(Duration::from_secs(5)).await;
            rt.shutdown().await;
        });
    }
    outcome?;
    if stop.requested() {
        println!("stopped");
    }
    Ok(code)
}

/// `cargo metadata` of the crate in `dir` (its packages, its target directory).
fn cargo_metadata(dir: &Path) -> anyhow::Result<Value> {
    let output = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(dir)
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    if !output.status.success() {
        // Cargo said why above (stderr is inherited): no Cargo.toml is one reason of many.
        anyhow::bail!(
            "`cargo metadata` failed in {} (see cargo's message above); is it a cargo crate?",
            dir.display()
        );
    }
    serde_json::from_slice(&output.stdout).context("reading cargo metadata")
}

/// The crate's package name, from its `cargo metadata`.
fn package_name(dir: &Path, meta: &Value) -> anyhow::Result<String> {
    match meta["packages"].as_array().map(Vec::as_slice) {
        Some([one]) => Ok(one["name"].as_str().unwrap_or_default().to_string()),
        _ => anyhow::bail!(
            "{} holds several packages: name the plugin with --name",
            dir.display()
        ),
    }
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

struct Dev {
    api: ApiClient,
    dir: PathBuf,
    name: String,
    force: bool,
    /// The version this loop last made live.
    live_version: Option<u64>,
    stop: Stop,
    /// Cargo's target directory for the crate.
    target_dir: PathBuf,
    /// The crate's targets, by the names rustc gives them.
    crates: Vec<String>,
}

/// What wakes the watch loop.
enum Wake {
    /// The file watcher's report.
    Files(notify_debouncer_mini::DebounceEventResult),
    /// A signal: stop.
    Stop,
}

/// A stop asked for by a signal, and the cargo build to end with it.
#[derive(Clone, Default)]
struct Stop {
    requested: Arc<AtomicBool>,
    /// The process id of the cargo build under way, 0 if none.
    building: Arc<AtomicU32>,
}

impl Stop {
    fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Marks the stop and sends the build under way, if any, SIGTERM: cargo and its
    /// compilers, which run in a process group of their own.
    fn request(&self) {
        self.requested.store(true, Ordering::Release);
        self.kill_build();
    }

    fn kill_build(&self) {
        let pid = self.building.load(Ordering::Acquire);
        if let Ok(pid) = libc::pid_t::try_from(pid)
            && pid > 0
        {
            // SAFETY: a plain kill(2) of our own child's process group, recorded while it
            // runs and cleared before the child is reaped (`wait_then_clear`), so the id
            // names no other process.
            unsafe { libc::kill(-pid, libc::SIGTERM) };
        }
    }
}

impl Dev {
    /// Runs a first cycle, then one after each quiet period following a change, until the
    /// process ends. The watcher starts first and each cycle compares against the sources
    /// as they were when its build started, so a save made during a build is not lost.
    /// Ends when `woken` says stop.
    fn watch(
        &mut self,
        debounce: Duration,
        wake: mpsc::Sender<Wake>,
        woken: mpsc::Receiver<Wake>,
    ) -> anyhow::Result<()> {
        let mut debouncer = new_debouncer(debounce, move |r| {
            let _ = wake.send(Wake::Files(r));
        })
        .context("starting the file watcher")?;
        debouncer
            .watcher()
            .watch(&self.dir, RecursiveMode::Recursive)
            .with_context(|| format!("watching {}", self.dir.display()))?;
        let mut seen = self.fingerprint();
        self.cycle();
        for woke in woken {
            if self.stop.requested() {
                break;
            }
            let Wake::Files(Ok(events)) = woke else {
                continue;
            };
            // The watcher also reports reads (cargo reads the manifest on every build): only
            // a change of a source file's size or modification time counts.
            if events.iter().any(|e| self.is_source(&e.path)) {
                let now = self.fingerprint();
                if now != seen {
                    seen = now;
                    self.cycle();
                }
            }
        }
        Ok(())
    }

    /// Size and modification time of every source file of the crate.
    fn fingerprint(&self) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
        let mut out = Vec::new();
        let mut dirs = vec![self.dir.clone()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if !self.is_source(&path) {
                    continue;
                }
                match entry.metadata() {
                    Ok(m) if m.is_dir() => dirs.push(path),
                    Ok(m) => out.push((path, m.len(), m.modified().ok())),
                    Err(_) => {}
                }
            }
        }
        out.sort();
        out
    }

    /// Whether a changed path is the crate's source (not build output, not hidden files).
    fn is_source(&self, path: &Path) -> bool {
        let Ok(rel) = path.strip_prefix(&self.dir) else {
            return false;
        };
        let mut parts = rel.components().map(|c| c.as_os_str().to_string_lossy());
        match parts.next() {
            // Cargo rewrites the lock file itself; a dependency change shows in Cargo.toml.
            Some(first) if first == "target" || first == "Cargo.lock" || first.starts_with('.') => {
                false
            }
            Some(_) => !rel
                .components()
                .any(|c| c.as_os_str().to_string_lossy().starts_with('.')),
            None => false,
        }
    }

    /// Build, push, deploy, show. Failures are printed; the loop goes on. Returns whether
    /// the build went live on every live device.
    fn cycle(&mut self) -> bool {
        if self.stop.requested() {
            return false;
        }
        let started = Instant::now();
        println!("building {} ...", self.name);
        let wasm = match self.build() {
            Ok(path) => path,
            Err(_) if self.stop.requested() => {
                println!("build stopped");
                return false;
            }
            Err(e) => {
                println!("build failed: {e:#}; {}", self.serving());
                return false;
            }
        };
        let built = started.elapsed();
        match self.push_and_deploy(&wasm, started, built) {
            Ok(ok) => ok,
            Err(e) => {
                match e.downcast_ref::<ApiFailure>() {
                    // The server's message starts with "deploy refused: " itself.
                    Some(f) if f.code == "deploy-refused" => println!(
                        "{}\n  (the new version stays registered, the devices on their version)",
                        refusal_in_cli_words(&self.api, &f.message, "drover dev --force")
                    ),
                    _ => println!("push/deploy failed: {e:#}"),
                }
                false
            }
        }
    }

    /// `cargo build --release --target wasm32-wasip2`; the compiler's messages go to the
    /// terminal as usual, the artifact's path comes from cargo's JSON messages.
    fn build(&self) -> anyhow::Result<PathBuf> {
        let manifest = std::fs::read_to_string(self.dir.join("Cargo.toml")).unwrap_or_default();
        let profile = if manifest.contains("[profile.drover-dev]") {
            "drover-dev"
        } else {
            "release"
        };
        // A build this loop did not see to its end (a second Ctrl-C exits at once; a kill -9)
        // may have left the crate's incremental cache broken: dropped before building.
        let marker = self.build_marker(profile);
        if marker.exists() {
            self.forget_incremental(profile);
        }
        if let Some(dir) = marker.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::write(&marker, b"");
        let mut command = cargo();
        command
            .args([
                "build",
                "--profile",
                profile,
                "--target",
                "wasm32-wasip2",
                "--message-format=json-render-diagnostics",
            ])
            .current_dir(&self.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // A group of its own (leader: cargo), so a stop ends its compilers with it; a
            // terminal's Ctrl-C reaches this process, which stops the group.
            .process_group(0);
        // A `drover dev` that dies without stopping the build (`kill -9`, a crash) still
        // ends it: the kernel sends cargo SIGTERM when the thread that spawned it exits, and
        // this is the main thread, which lives as long as the process. Its compilers, which
        // nothing signals, end at their next write to cargo's closed pipe.
        let parent = rustix::process::getpid();
        // SAFETY: the closure makes two system calls (prctl, getppid), async-signal-safe,
        // and touches no state shared with the parent.
        unsafe {
            command.pre_exec(move || {
                use rustix::process::{Signal, getppid, set_parent_process_death_signal};
                set_parent_process_death_signal(Some(Signal::TERM))?;
                // Died before the prctl: no signal will come, so do not build at all.
                if getppid() != Some(parent) {
                    return Err(std::io::ErrorKind::Other.into());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .context("running cargo (is it installed?)")?;
        self.stop.building.store(child.id(), Ordering::Release);
        // A signal that came between the check in `cycle` and the spawn found no build.
        if self.stop.requested() {
            self.stop.kill_build();
        }
        let mut artifact = None;
        if let Some(stdout) = child.stdout.take() {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let is_cdylib = msg["target"]["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "cdylib"));
                if msg["reason"] == "compiler-artifact" && is_cdylib {
                    artifact = msg["filenames"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .find(|f| f.ends_with(".wasm"))
                        .map(PathBuf::from);
                }
            }
        }
        let status =
            wait_then_clear(&mut child, &self.stop.building).context("waiting for cargo")?;
        if !status.success() && self.stop.requested() {
            self.forget_incremental(profile);
        }
        let _ = std::fs::remove_file(&marker);
        if !status.success() {
            anyhow::bail!("cargo build exited with {status} (its errors are above)");
        }
        artifact.context(
            "cargo built no .wasm component: the crate needs `crate-type = [\"cdylib\", \"rlib\"]` \
             (and `rustup target add wasm32-wasip2`)",
        )
    }

    /// What serves while a build fails: the plugin's current version on the server (made
    /// live by this loop, an earlier one, a deploy or a rollback), as the server says now.
    fn serving(&self) -> String {
        match self.current_on_server() {
            Ok(Some(v)) => format!("v{v}, current on the server, keeps serving"),
            Ok(None) => "nothing is live yet".into(),
            Err(_) if self.live_version.is_some() => {
                "the version that was live keeps serving".into()
            }
            Err(_) => "the server did not say what is live".into(),
        }
    }

    /// The plugin's current version on the server, if it has the plugin.
    fn current_on_server(&self) -> anyhow::Result<Option<u64>> {
        let (_, list): (String, Value) = self.api.call_json(self.api.get("/v1/plugins"))?;
        Ok(list["plugins"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == self.name.as_str()))
            .and_then(|p| p["current"].as_u64()))
    }

    /// A file that says a build of this crate for `profile` is under way: one left behind
    /// means the last build ended without this loop seeing it end.
    fn build_marker(&self, profile: &str) -> PathBuf {
        self.target_dir
            .join("wasm32-wasip2")
            .join(profile)
            .join(format!(".drover-dev-building-{}", self.name))
    }

    /// Drops the crate's incremental compilation caches for `profile` (other crates' in a
    /// shared target directory stay). A build stopped part-way (Ctrl-C while rustc compiled
    /// the plugin) can leave them inconsistent: every later build of the same sources then
    /// failed to link (`relocation ... against an undefined symbol anon...`) until the
    /// sources changed, which read as an error in the plugin's code. The next build compiles
    /// the crate whole once instead.
    fn forget_incremental(&self, profile: &str) {
        let caches = self
            .target_dir
            .join("wasm32-wasip2")
            .join(profile)
            .join("incremental");
        let Ok(entries) = std::fs::read_dir(&caches) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = self.crates.iter().any(|c| {
                name.strip_prefix(c.as_str())
                    .is_some_and(|r| r.starts_with('-'))
            });
            if ours && let Err(e) = std::fs::remove_dir_all(entry.path()) {
                println!(
                    "could not remove {} after the stopped build ({e}); if the next build \
                     fails to link, remove it by hand",
                    entry.path().display()
                );
            }
        }
    }

    fn push_and_deploy(
        &mut self,
        wasm: &Path,
        started: Instant,
        built: Duration,
    ) -> anyhow::Result<bool> {
        let bytes = std::fs::read(wasm).with_context(|| format!("reading {}", wasm.display()))?;
        let size = bytes.len();
        let plugin = segment(&self.name)?;
        let req = self
            .api
            .post(&format!("/v1/plugins/{plugin}"))
            .header("content-type", "application/wasm")
            .body(bytes);
        let (status, text) = self.api.call(req)?;
        let up: Value = serde_json::from_str(&text).context("reading the upload answer")?;
        let version = up["version"].as_u64().unwrap_or(0);
        let pushed = started.elapsed();
        let current = self.current_on_server()?.unwrap_or(0);
        if status == 200 && current == version {
            println!("no change: v{version} is live");
            self.live_version = Some(version);
            return Ok(true);
        }
        let devices = self.sample_devices(3)?;
        let before = self.states(&devices);
        let mut left_behind = 0;
        if current != version {
            let req = self
                .api
                .post(&format!("/v1/plugins/{plugin}/deploy"))
                .timeout(LONG_OPERATION_TIMEOUT)
                .json(&json!({"version": version, "force": self.force}));
            let (_, report): (String, Value) = self.api.call_json(req)?;
            print_deploy(&report);
            left_behind = report["totals"]["failed"].as_u64().unwrap_or(0)
                + report["totals"]["cannot_fold"].as_u64().unwrap_or(0);
        }
        // At the seq read before the deploy, rebuilt with the device's version now: events
        // handled meanwhile (a simulated fleet keeps sending) are not the change's effect.
        for (id, old) in &before {
            let Some((seq, old)) = old else { continue };
            // One the deploy did not move (passivated, or left behind) would compare its old
            // version with itself.
            // A read that fails (the new version's `query` traps) says so, not that the
            // device is not on the version yet, which it may well be (a review).
            let device = match self
                .api
                .call_json::<Value>(self.api.get(&format!("/v1/devices/{}", segment(id)?)))
            {
                Ok((_, d)) => d,
                Err(e) => {
                    println!("  {id}: its state could not be read: {e:#}");
                    continue;
                }
            };
            let runs = device["version"].as_u64();
            if runs != Some(version) {
                let failed = device["upgrade"]["failed"] == true;
                if failed {
                    println!(
                        "  {id}: stays on v{} (v{version} could not bring it up, or was given up \
                         after slow failures; not tried again until a deploy)",
                        runs.unwrap_or(0)
                    );
                } else {
                    println!(
                        "  {id}: not on v{version} yet (it moves at its next activation, if it can)"
                    );
                }
                continue;
            }
            let Some((_, new)) = self.state(id, Some(*seq)) else {
                continue;
            };
            let diff = drover::dry_run::state_diff(old, &new);
            if diff.is_empty() {
                println!("  {id}: state unchanged");
            }
            for change in diff {
                println!(
                    "  {id} {}: {} -> {}",
                    change["path"].as_str().unwrap_or(""),
                    change.get("was").map_or("(none)".into(), Value::to_string),
                    change
                        .get("value")
                        .map_or("(removed)".into(), Value::to_string),
                );
            }
        }
        let total = started.elapsed();
        let behind = if left_behind > 0 {
            format!("; {left_behind} device(s) cannot run it and stay on their version")
        } else {
            String::new()
        };
        println!(
            "live: {} v{version} in {} ms (build {} ms, upload + compile {} ms of {} KB, deploy {} ms){behind}",
            self.name,
            total.as_millis(),
            built.as_millis(),
            (pushed - built).as_millis(),
            size / 1024,
            (total - pushed).as_millis(),
        );
        self.live_version = Some(version);
        Ok(left_behind == 0)
    }

    /// Up to `n` devices of this plugin, the first ones in id order: pages of the fleet with
    /// their plugins (`detail=true`, one request per 1,000 devices, none woken), at most
    /// [`SAMPLE_WALK`] devices deep so a save never waits on a walk of a large fleet.
    fn sample_devices(&self, n: usize) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        let mut after = String::new();
        let mut walked = 0;
        while out.len() < n && walked < SAMPLE_WALK {
            let path = format!(
                "/v1/devices?detail=true&limit=1000&after={}",
                query_value(&after)
            );
            let (_, page): (String, Value) = self.api.call_json(self.api.get(&path))?;
            for d in page["devices"].as_array().into_iter().flatten() {
                walked += 1;
                if d["plugin"] == self.name.as_str()
                    && let Some(id) = d["id"].as_str()
                {
                    out.push(id.to_string());
                    if out.len() == n {
                        break;
                    }
                }
            }
            match page["next"].as_str() {
                Some(next) => after = next.to_string(),
                None => break,
            }
        }
        Ok(out)
    }

    /// Each device's seq and state now.
    fn states(&self, ids: &[String]) -> Vec<(String, Option<(u64, Value)>)> {
        ids.iter()
            .map(|id| (id.clone(), self.state(id, None)))
            .collect()
    }

    /// Device `id`'s seq and state: now, or right after record `at`, rebuilt from the
    /// journal by the version it runs (`GET /v1/devices/{id}/state`).
    fn state(&self, id: &str, at: Option<u64>) -> Option<(u64, Value)> {
        let query = at.map_or_else(String::new, |seq| format!("?at={seq}"));
        let (_, body) = self
            .api
            .call_json::<Value>(
                self.api
                    .get(&format!("/v1/devices/{}/state{query}", segment(id).ok()?)),
            )
            .ok()?;
        Some((body["seq"].as_u64()?, body["state"].clone()))
    }
}

/// Waits for `child` to exit, clears `building`, then reaps it: until reaped its process id
/// cannot be reused, so a stop that read the id from `building` signals this child's group
/// and no other.
fn wait_then_clear(
    child: &mut std::process::Child,
    building: &AtomicU32,
) -> std::io::Result<std::process::ExitStatus> {
    let id = child.id();
    loop {
        // SAFETY: an all-zero siginfo_t is valid; waitid writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waits for our own child's exit without reaping it (`WNOWAIT`); `wait`
        // below reaps it.
        let r = unsafe { libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            building.store(0, Ordering::Release);
            return Err(e);
        }
    }
    building.store(0, Ordering::Release);
    child.wait()
}
