//! Writing a plugin without this repository: `drover new`, then `cargo test`, a build, a
//! push, and the `drover dev` loop (save → new behavior live, state kept; a broken save
//! leaves the old version serving). Real processes, real cargo, in a temporary directory
//! outside the workspace.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod support;

/// Runs a cargo command in `dir` with the shared outside target dir; panics with its output.
fn cargo(dir: &Path, args: &[&str]) -> String {
    let out = support::cargo_command()
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", support::outside_target_dir())
        .output()
        .expect("running cargo");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "cargo {args:?} failed:\n{text}");
    text
}

/// `drover dev` as a child process, its stdout lines on a channel.
struct Dev {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Dev {
    fn start(dir: &Path, data: &Path) -> Dev {
        let mut dev = Command::new(support::BIN);
        support::strip_build_env(&mut dev);
        let mut child = dev
            .arg("dev")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--debounce-ms", "100", "--data"])
            .arg(data)
            .env("CARGO_TARGET_DIR", support::outside_target_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning drover dev");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                eprintln!("dev> {line}");
                let _ = tx.send(line);
            }
        });
        Dev {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line starting with `prefix` and returns it.
    fn wait_for(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "drover dev never printed `{prefix}`; it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::new()
}

fn send(url: &str, id: &str, event: Value) -> Value {
    let r = http()
        .post(format!("{url}/v1/devices/{id}/events"))
        .json(&event)
        .send()
        .expect("send");
    assert!(r.status().is_success(), "{}", r.text().unwrap_or_default());
    r.json().expect("json")
}

fn device(url: &str, id: &str) -> Value {
    http()
        .get(format!("{url}/v1/devices/{id}"))
        .send()
        .expect("get")
        .json()
        .expect("json")
}

/// Acceptance 6 and 7 of hot reload: a scaffolded crate outside the workspace tests, builds
/// and pushes as it is; under `drover dev`, an edit goes live with the device's state kept,
/// and a syntax error leaves the running version serving.
#[test]
fn a_new_plugin_tests_builds_pushes_and_hot_reloads_on_save() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (ok, out, err) = support::cli_in(tmp.path(), &["new", "sensor"]);
    assert!(ok, "{err}");
    assert!(out.contains("created plugin `sensor`"), "{out}");
    assert!(out.contains("using the guest SDK at"), "{out}");
    let krate = tmp.path().join("sensor");

    let tested = cargo(&krate, &["test"]);
    assert!(tested.contains("2 passed"), "{tested}");
    cargo(&krate, &["build", "--release", "--target", "wasm32-wasip2"]);
    let wasm = support::outside_target_dir().join("wasm32-wasip2/release/sensor.wasm");

    let server = support::Server::start(&tmp.path().join("served"), &[]);
    let (ok, out, err) = support::cli(&[
        "plugin",
        "push",
        "sensor",
        wasm.to_str().unwrap(),
        "--server",
        &server.url,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("sensor v1 registered"), "{out}");
    drop(server);

    // The dev loop.
    let mut dev = Dev::start(&krate, &tmp.path().join("dev-data"));
    let url = dev
        .wait_for("drover listening on ")
        .trim_start_matches("drover listening on ")
        .trim()
        .to_string();
    dev.wait_for("live: sensor v1");
    let put = http()
        .put(format!("{url}/v1/devices/s1"))
        .json(&json!({"plugin": "sensor", "config": {"threshold": 30}}))
        .send()
        .unwrap();
    assert_eq!(put.status(), 201);
    send(&url, "s1", json!({"type": "reading", "value": 10}));
    send(&url, "s1", json!({"type": "reading", "value": 20}));

    // A behavior change: the alarm now needs 100 more than the threshold.
    let lib = krate.join("src/lib.rs");
    let source = std::fs::read_to_string(&lib).unwrap();
    let edited = source.replace(
        "let high = value > self.threshold;",
        "let high = value > self.threshold + 100.0;",
    );
    assert_ne!(source, edited, "the template has the line the test edits");
    std::fs::write(&lib, &edited).unwrap();
    dev.wait_for("live: sensor v2");
    // Compared at the seq s1 had before the deploy: its two readings are below both
    // thresholds, so the new version's state there is the same.
    assert!(
        dev.seen.iter().any(|l| l == "  s1: state unchanged"),
        "{}",
        dev.seen.join("\n")
    );
    let ack = send(&url, "s1", json!({"type": "reading", "value": 50}));
    assert_eq!(
        ack["transitions"].as_array().unwrap().len(),
        1,
        "no alarm: {ack}"
    );
    let s1 = device(&url, "s1");
    assert_eq!(s1["version"], 2);
    assert_eq!(
        s1["state"]["readings"], 3,
        "state kept across the reload: {s1}"
    );
    assert_eq!(s1["state"]["alarm"], false);

    // A syntax error: the build fails and v2 keeps serving.
    std::fs::write(&lib, format!("{edited}\nfn broken( {{\n")).unwrap();
    dev.wait_for("build failed");
    send(&url, "s1", json!({"type": "reading", "value": 60}));
    let s1 = device(&url, "s1");
    assert_eq!(s1["version"], 2);
    assert_eq!(s1["state"]["readings"], 4);

    // A version that cannot fold s1's history (its `recorded` transitions renamed): the
    // deploy is refused, in the words of `drover dev` and naming its server (it gave the
    // API's `"force": true` and a `drover plugin diff` that went to the default server).
    std::fs::write(&lib, edited.replace("Recorded", "Measured")).unwrap();
    let refused = dev.wait_for("deploy refused: ");
    assert!(
        refused.contains("(`drover dev --force`)")
            && refused.contains(&format!("`drover plugin diff --server {url} sensor 3`"))
            && !refused.contains("\"force\""),
        "{refused}"
    );
    assert_eq!(device(&url, "s1")["version"], 2);

    // Ctrl-C while rustc compiles the plugin: the local server stops as `drover serve` does
    // (its journal index checkpointed on the way out), and then the process. A compile cut
    // short could leave the crate's incremental cache so that every later build of the same
    // sources failed to link (`--once` below builds them).
    let fixed = edited.replace("self.threshold + 100.0", "self.threshold + 200.0");
    std::fs::write(&lib, &fixed).unwrap();
    let compiling = Instant::now() + Duration::from_secs(60);
    while !rustc_compiles("sensor") {
        assert!(
            Instant::now() < compiling,
            "rustc never compiled the plugin"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Into its code generation (a stop as it starts leaves nothing to spoil).
    std::thread::sleep(Duration::from_millis(DEV_STOP_AFTER_MS));
    let pid = libc::pid_t::try_from(dev.child.id()).expect("pid");
    // SAFETY: kill(2) of our own child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGINT) };
    dev.wait_for("stopped");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = dev.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "drover dev still runs after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(
        tmp.path().join("dev-data/journal.log.checkpoint").is_file(),
        "a graceful stop checkpoints the journal index"
    );
    drop(dev);

    let once = |data: &str| {
        let mut once = Command::new(support::BIN);
        support::strip_build_env(&mut once);
        let out = once
            .arg("dev")
            .arg(&krate)
            .args(["--once", "--listen", "127.0.0.1:0", "--data"])
            .arg(tmp.path().join(data))
            .env("CARGO_TARGET_DIR", support::outside_target_dir())
            .output()
            .expect("drover dev --once");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    // The sources the stopped build compiled build now.
    let (ok, stdout) = once("once-data");
    assert!(ok, "{stdout}");
    assert!(stdout.contains("live: sensor v1"), "{stdout}");
    // A build `drover dev` did not see end (a second Ctrl-C exits at once, a kill -9) leaves
    // its marker: the next build drops the crate's incremental cache first.
    let profile_dir = support::outside_target_dir().join("wasm32-wasip2/drover-dev");
    let planted = profile_dir.join("incremental/sensor-planted");
    std::fs::create_dir_all(&planted).unwrap();
    std::fs::write(profile_dir.join(".drover-dev-building-sensor"), b"").unwrap();
    let (ok, stdout) = once("once-data");
    assert!(ok, "{stdout}");
    assert!(!planted.exists(), "the incremental cache was kept");
    assert!(!profile_dir.join(".drover-dev-building-sensor").exists());
    // `--once` reports a failed build in its exit status, for scripts and CI, and says what
    // keeps serving: the version an earlier run made current, or nothing.
    std::fs::write(&lib, format!("{fixed}\nfn broken( {{\n")).unwrap();
    let (ok, stdout) = once("once-data");
    assert!(!ok, "{stdout}");
    assert!(
        stdout.contains("build failed")
            && stdout.contains("v1, current on the server, keeps serving"),
        "{stdout}"
    );
    let (ok, stdout) = once("fresh-data");
    assert!(!ok, "{stdout}");
    assert!(
        stdout.contains("build failed") && stdout.contains("nothing is live yet"),
        "{stdout}"
    );
}

/// `drover dev` on a port in use fails before it creates its data directory (it left one
/// behind, empty), as `drover serve` does.
#[test]
fn drover_dev_on_a_port_in_use_creates_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (ok, out, err) = support::cli_in(tmp.path(), &["new", "gauge"]);
    assert!(ok, "{out}{err}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let data = tmp.path().join("data");
    let (ok, out, err) = support::cli_in(
        tmp.path(),
        &[
            "dev",
            "gauge",
            "--once",
            "--listen",
            &addr,
            "--data",
            data.to_str().expect("utf-8"),
        ],
    );
    assert!(!ok, "{out}{err}");
    assert!(err.contains(&addr), "{err}");
    assert!(!data.exists(), "the data directory was created");
}

/// A `drover dev` killed outright (`kill -9`) while cargo builds leaves no build running (a
/// review found `cargo build` and its compilers still at work after it). Cargo here is a
/// script whose `build` sleeps for minutes, so only a stop outlives nothing.
#[test]
fn a_killed_drover_dev_leaves_no_build_running() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (ok, out, err) = support::cli_in(tmp.path(), &["new", "gauge"]);
    assert!(ok, "{out}{err}");
    let krate = tmp.path().join("gauge");
    let pid_file = tmp.path().join("build.pid");
    let real = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let script = tmp.path().join("cargo");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$1\" = build ]; then echo $$ > '{}'; exec sleep 300; fi\n\
             exec '{}' \"$@\"\n",
            pid_file.display(),
            Path::new(&real).display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut dev = Command::new(support::BIN);
    support::strip_build_env(&mut dev);
    let mut dev = dev
        .arg("dev")
        .arg(&krate)
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(tmp.path().join("data"))
        .env("CARGO", &script)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawning drover dev");
    let deadline = Instant::now() + Duration::from_secs(60);
    let build: libc::pid_t = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "drover dev never ran a build");
        std::thread::sleep(Duration::from_millis(20));
    };
    dev.kill().expect("kill -9");
    dev.wait().expect("wait");

    // Running, not a zombie waiting for a reaper (a process without a parent may be one in a
    // container whose first process reaps nothing).
    let runs = || {
        std::fs::read_to_string(format!("/proc/{build}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while runs() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = runs();
    if left {
        // SAFETY: kill(2) of the build this test started, seen running just now.
        unsafe { libc::kill(build, libc::SIGKILL) };
    }
    assert!(!left, "the build outlived `drover dev` by 10 s");
}

/// How long after rustc starts on the plugin the test stops `drover dev`.
const DEV_STOP_AFTER_MS: u64 = 200;

/// Whether a rustc compiling crate `name` for the wasm target runs now.
fn rustc_compiles(name: &str) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            return false;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        args.windows(2)
            .any(|w| w[0] == b"--crate-name" && w[1] == name.as_bytes())
            && args.iter().any(|a| a.ends_with(b"wasm32-wasip2"))
    })
}

/// `drover new` refuses, before creating anything, a name no crate can take: one that is not
/// an identifier, and one the crate would share with a crate it links (a review scaffolded
/// `serde`, `drover-guest` and `std`: none of them built).
#[test]
fn drover_new_refuses_names_a_plugin_crate_cannot_take() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for name in [
        "serde",
        "drover-guest",
        "drover_guest",
        "serde-json",
        "std",
        "core",
    ] {
        let (ok, _, err) = support::cli_in(tmp.path(), &["new", name]);
        assert!(!ok, "{name} accepted");
        assert!(err.contains("links"), "{name}: {err}");
    }
    for name in ["9lives", "a/b", "", "Parking_Spot"] {
        let (ok, _, err) = support::cli_in(tmp.path(), &["new", name]);
        assert!(
            !ok && err.contains("not a valid plugin name"),
            "{name}: {err}"
        );
    }
    // Upper case made a crate rustc warned of at every build: refused, the lowercase named.
    let (_, _, err) = support::cli_in(tmp.path(), &["new", "Parking_Spot"]);
    assert!(err.contains("(`parking_spot`?)"), "{err}");
    assert!(
        std::fs::read_dir(tmp.path()).expect("tmp").next().is_none(),
        "nothing created"
    );
}
