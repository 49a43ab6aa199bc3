//! The server's overload, told apart from the plugin's faults: a guest call that waits for a
//! core past 4 times its budget within its CPU budget, or a memory growth past the fleet's
//! guest memory budget, is `503 overloaded` (no dead letter, no step toward a quarantine, no
//! dry-run divergence, no deploy on an unproved sample); budgets count CPU time, not waits
//! for a core, and a rebuild's grows with the history it folds.
//!
//! These tests oversubscribe the cores on purpose (busy threads, see `support::Hogs`), which
//! would starve tests running beside them: they run one at a time ([`serial`]), in a test
//! binary of their own (cargo runs test binaries one after another).

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use drover::replay::{self, Start};
use drover::{DeviceStatus, ErrorKind, Runtime, Selection};
use serde_json::{Value, json};

mod support;

const PLUGINS: support::PluginDir = support::PluginDir;

/// Held for a whole test: one at a time. (An async lock: each test has its own runtime, and
/// one that fails releases it as it unwinds.)
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

async fn open(dir: &Path, snapshot_every: u64) -> Runtime {
    Runtime::builder(dir)
        .plugin_dir(PLUGINS)
        .snapshot_every(snapshot_every)
        .call_timeout(Duration::from_millis(300))
        .mailbox_capacity(4096)
        .open()
        .await
        .expect("runtime opens")
}

/// How many `slow_apply` spins take `seconds` here, measured on device `id`: the least
/// contended of three probes (probes only ever run slow), the closest to the machine's speed.
async fn calibrated(rt: &Runtime, id: &str, seconds: f64) -> u64 {
    let mut spin = 0;
    for _ in 0..3 {
        spin = spin.max(support::spins_for(rt, id, seconds).await);
    }
    spin
}

/// A runtime from `builder` whose events and activations each get `budget`, with a device
/// `s` whose history is one event that needs `share` of it (calibrated on a device `probe`
/// of its own), and an identical rebuild of its plugin registered: what a dry-run, a deploy
/// or an upgrade then compares.
async fn one_slow_device(
    builder: drover::RuntimeBuilder,
    budget: Duration,
    share: f64,
) -> (Runtime, drover::PluginVersion) {
    let rt = builder
        .plugin_dir(PLUGINS)
        .call_timeout(budget)
        .activation_timeout(budget)
        .snapshot_every(100_000)
        .open()
        .await
        .expect("runtime opens");
    rt.provision("probe", "misbehave", &json!({}))
        .await
        .unwrap();
    let spin = calibrated(&rt, "probe", share * budget.as_secs_f64()).await;
    rt.provision("s", "misbehave", &json!({})).await.unwrap();
    rt.send("s", &support::slow_apply(spin, 1))
        .await
        .expect("within its budget");
    let (same, _) =
        support::upload_misbehave(&rt, support::identical_rebuild(&support::misbehave_v1())).await;
    (rt, same)
}

/// Leaves in `dir` a misbehave device `spinner`, passivated, whose snapshots' `restore`
/// spins (its history from `init` still folds).
async fn a_snapshot_whose_restore_spins(dir: &Path) {
    let rt = open(dir, 1).await;
    rt.provision("spinner", "misbehave", &json!({}))
        .await
        .unwrap();
    rt.send("spinner", r#"{"type":"loop_on_restore"}"#)
        .await
        .expect("handled");
    rt.shutdown().await;
}

/// The misbehave plugin's versions marked slow (see `PluginVersion::slow_lane`).
fn slow_versions(rt: &Runtime) -> Vec<u32> {
    misbehave_versions(rt, |v| v.slow_lane)
}

/// The misbehave plugin's versions whose activations and folds run on the slow lane (see
/// `PluginVersion::slow_setup`).
fn slow_setup_versions(rt: &Runtime) -> Vec<u32> {
    misbehave_versions(rt, |v| v.slow_setup)
}

fn misbehave_versions(rt: &Runtime, marked: fn(&drover::PluginVersion) -> bool) -> Vec<u32> {
    rt.plugins()
        .into_iter()
        .filter(|(name, _)| name == "misbehave")
        .flat_map(|(_, versions)| versions)
        .filter(marked)
        .map(|v| v.version)
        .collect()
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).expect("valid JSON")
}

/// A time budget counts the CPU time a guest used, not the time its thread waited for a
/// core: an event that needs 40% of its budget is handled while the machine is oversubscribed
/// three times over, though it takes longer than its budget in wall-clock time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_budget_counts_the_cpu_time_used_not_the_wait_for_a_core() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let budget = Duration::from_millis(300);
    let rt = open(dir.path(), 1_000).await;
    rt.provision("s", "misbehave", &json!({}))
        .await
        .expect("provision");
    let spin = calibrated(&rt, "s", 0.4 * budget.as_secs_f64()).await;
    // Busy threads per core, while the event is handled.
    let hogged = async |per_core: usize, event: String| {
        let hogs = support::Hogs::start(per_core);
        let started = std::time::Instant::now();
        let handled = rt.send("s", &event).await;
        let took = started.elapsed();
        drop(hogs);
        (handled, took)
    };

    // More busy threads until the event waits for a core long enough to outlast its budget
    // in wall-clock time (three per core usually do); handled each time.
    let mut waited = None;
    for per_core in [3, 6, 9] {
        let (handled, took) = hogged(per_core, support::slow_apply(spin, 1)).await;
        handled.expect("handled: 40% of its budget in CPU time");
        if took > budget {
            waited = Some(took);
            break;
        }
    }
    assert!(
        waited.is_some(),
        "the event never waited for a core long enough: this test proves nothing"
    );

    // A guest that does use its whole budget still times out. (Twenty times the 40% event:
    // over its budget whatever the calibration's error, since probes only ever run slow.)
    let err = rt
        .send("s", &support::slow_apply(spin * 20, 1))
        .await
        .expect_err("over its budget");
    assert_eq!(err.code(), "timeout", "{err}");
    // And says which of the plugin's functions spun (a slow `apply`, not `handle`).
    assert!(
        err.to_string()
            .contains("exceeded its time budget of 300ms (stopped in `apply`)"),
        "{err}"
    );

    // Starved of cores for over four times its budget, an event within its CPU budget (60% of
    // it) is interrupted all the same, and told apart: the machine is overloaded, the guest is
    // not at fault.
    // (32 busy threads per core: starved even if a slow probe made the event far cheaper.)
    let letters = async || {
        rt.journal().barrier().await.expect("settled");
        rt.dead_letters("s").map_or(0, |d| d.len())
    };
    assert_eq!(letters().await, 1, "the timeout is a dead letter");
    let (starved, _) = hogged(32, support::slow_apply(spin * 3 / 2, 1)).await;
    let err = starved.expect_err("waited too long for a core");
    assert_eq!(err.code(), "overloaded", "{err}");
    assert!(
        err.to_string().contains("waiting for a core") && err.to_string().contains("overloaded"),
        "{err}"
    );
    // Nor does supervision count it: no dead letter (re-sending it is the remedy), and no step
    // toward a quarantine, so a timeout after it is the second failure, not the third.
    assert_eq!(letters().await, 1, "no dead letter for a starved event");
    let err = rt
        .send("s", &support::slow_apply(spin * 20, 1))
        .await
        .expect_err("over its budget");
    assert_eq!(err.code(), "timeout", "{err}");
    assert_eq!(letters().await, 2);
    rt.send("s", &support::slow_apply(1, 1))
        .await
        .expect("two failures in a row do not quarantine");
    rt.shutdown().await;
}

/// A rebuild's budget is CPU time across all of it: a replay longer than one journal chunk
/// (1,024 records) that needs half its budget is not cut off for waiting for a core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_replay_is_charged_the_cpu_time_it_used_across_journal_chunks() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let budget = Duration::from_secs(2);
    let rt = Runtime::builder(dir.path())
        .plugin_dir(PLUGINS)
        .call_timeout(Duration::from_secs(1))
        .activation_timeout(budget)
        .snapshot_every(100_000)
        .open()
        .await
        .expect("runtime");
    rt.provision("long", "misbehave", &json!({}))
        .await
        .expect("provision");
    let spin = calibrated(&rt, "long", 0.3).await;
    // ~0.6 s of folding in each of two chunks: slow records first, then enough cheap ones
    // to fill the first chunk, then slow ones again.
    let slow = async |n| {
        for _ in 0..n {
            rt.send("long", &support::slow_apply(spin, 1))
                .await
                .expect("slow");
        }
    };
    slow(2).await;
    for _ in 0..1_100 {
        rt.send("long", r#"{"type":"ok"}"#).await.expect("ok");
    }
    slow(2).await;
    rt.shutdown().await;
    drop(rt);

    let hogs = support::Hogs::start(3);
    let started = std::time::Instant::now();
    let replayed = replay::offline(dir.path(), "long", None, Start::Genesis);
    let took = started.elapsed();
    drop(hogs);
    assert!(
        took > budget,
        "the replay waited for a core, or this test proves nothing: {took:?}"
    );
    let replayed = replayed.expect("about half its budget in CPU time");
    assert_eq!(replayed.seq, 1_107);
    assert_eq!(parse(&replayed.state)["applied"], json!(1_107));
}

/// All live guest memories share one budget of growth past their initial sizes: a growth
/// past it fails that event with `overloaded`, the server's fault, not the plugin's (no dead
/// letter), passivates the least recently used instances holding memory so that a retry finds
/// room, and the budget comes back when the instance holding it goes. Without it, many devices of a plugin that keeps what it
/// allocates could each take up to their own cap (64 MiB) until the kernel killed the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_memories_share_one_budget_and_a_growth_past_it_is_overloaded() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = Runtime::builder(dir.path())
        .plugin_dir(PLUGINS)
        .max_guest_memory(12 << 20)
        .guest_memory_budget(12 << 20)
        .open()
        .await
        .expect("runtime");
    let grown = |rt: &Runtime| -> u64 {
        let metrics = rt.render_metrics();
        let line = metrics
            .lines()
            .find(|l| l.starts_with("drover_guest_memory_grown_bytes "))
            .expect("the metric");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert!(
        rt.render_metrics()
            .contains("drover_guest_memory_budget_bytes 12582912")
    );
    for id in ["a", "b"] {
        rt.provision(id, "misbehave", &json!({}))
            .await
            .expect("provision");
    }
    let alloc = r#"{"type":"alloc","mb":8}"#;
    rt.send("a", alloc).await.expect("8 of the 12 MiB");
    assert!(grown(&rt) >= 8 << 20, "{}", grown(&rt));
    let err = rt.send("b", alloc).await.expect_err("16 > 12 MiB");
    assert_eq!(err.code(), "overloaded", "{err}");
    assert!(err.to_string().contains("guest memory budget"), "{err}");
    rt.journal().barrier().await.expect("settled");
    assert_eq!(rt.dead_letters("b").map_or(0, |d| d.len()), 0);
    // The refusal passivates the least recently used instance that holds memory (a), so
    // the retry the 503 asks for finds room.
    let mut retried = 0;
    while let Err(e) = rt.send("b", alloc).await {
        assert_eq!(e.code(), "overloaded", "{e}");
        retried += 1;
        assert!(retried < 50, "never relieved: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = rt.device("a").await.expect("a reads");
    assert_eq!(
        a.status,
        drover::DeviceStatus::Passivated,
        "a gave its memory back"
    );
    assert_eq!(
        parse(&a.state)["applied"],
        json!(1),
        "its state kept: {}",
        a.state
    );
    // Given back when the instance goes (here, removed with its device).
    rt.remove_device("b", false).await.expect("remove");
    assert!(grown(&rt) < 1 << 20, "given back: {}", grown(&rt));
    rt.shutdown().await;
}

/// A rebuild's budget grows with the history it folds (10 µs of CPU time per transition on
/// top of the activation budget): a history too long for the activation budget alone still
/// folds, where before every such rebuild (a deploy's, an activation without a snapshot)
/// failed, and failed again at each retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_history_folds_within_a_budget_that_grows_with_it() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = Runtime::builder(dir.path())
        .plugin_dir(PLUGINS)
        .activation_timeout(Duration::from_millis(10))
        .snapshot_every(0)
        .open()
        .await
        .expect("runtime");
    rt.provision("long", "misbehave", &json!({}))
        .await
        .expect("provision");
    // 50,000 transitions: well over 10 ms to read and fold (~1 µs each in the guest alone),
    // well within 10 ms + 500 ms.
    for _ in 0..50 {
        rt.send("long", &support::slow_apply(0, 1_000))
            .await
            .expect("a thousand transitions");
    }
    rt.shutdown().await;
    drop(rt);
    let replayed =
        replay::offline(dir.path(), "long", None, Start::Genesis).expect("folds in its budget");
    assert_eq!(replayed.seq, 50);
    assert_eq!(parse(&replayed.state)["applied"], json!(50_000));
}

/// A dry-run whose guest calls wait for a core too long (an overloaded server) proves
/// nothing about the candidate: the device is reported `overloaded`, neither identical nor
/// diverged, and a deploy is refused with 503 `overloaded` instead of moving devices or
/// calling a sound version one that cannot fold (both happened before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_starved_of_cores_is_overloaded_not_diverged() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let (rt, same) = one_slow_device(
        Runtime::builder(dir.path()),
        Duration::from_millis(300),
        0.6,
    )
    .await;
    let current = rt.current_version("misbehave");
    let only_s = || Selection::Devices(vec!["s".into()]);
    let report = rt
        .dry_run("misbehave", same.version, only_s())
        .await
        .unwrap();
    assert_eq!(report.totals.identical, 1, "unloaded: {:?}", report.devices);

    // 32 busy threads per core: each guest call waits for a core past 4 times its budget.
    let hogs = support::Hogs::start(32);
    let report = rt
        .dry_run("misbehave", same.version, only_s())
        .await
        .unwrap();
    let refused = rt.deploy("misbehave", same.version, false).await;
    drop(hogs);
    let d = &report.devices[0];
    assert!(d.overloaded && d.folds && !d.identical, "{d:?}");
    assert!(
        d.error.as_deref().is_some_and(|e| e.contains("overloaded")),
        "{d:?}"
    );
    assert_eq!(
        (
            report.totals.overloaded,
            report.totals.diverged,
            report.totals.cannot_fold,
            report.totals.state_differs
        ),
        (1, 0, 0, 0)
    );
    let refused = refused.expect_err("not deployed on an unproved dry-run");
    assert_eq!(refused.kind(), ErrorKind::Overloaded, "{refused}");
    assert!(refused.to_string().contains("less loaded"), "{refused}");
    assert_eq!(rt.current_version("misbehave"), current, "nothing moved");
    rt.shutdown().await;
}

/// A live device whose upgrade the server lacks a core for is put off, not failed: the
/// deploy reports it `lazy` (it moves at its next activation) and it does move then. Before,
/// it was remembered as unable to run the new version, and stayed behind until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_starved_of_cores_is_put_off_not_failed() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    // Long enough to stay live through the deploy (its sample is starved too) and between
    // the events below.
    let idle = Duration::from_secs(6);
    // A quarter of its budget, not more: starved, its fold still waits for a core past 4
    // times the budget, and the retry's fold keeps a wide margin of CPU time.
    let (rt, same) = one_slow_device(
        Runtime::builder(dir.path()).idle_timeout(idle),
        Duration::from_millis(300),
        0.25,
    )
    .await;
    // Without the calibration's device: its history (three probes of up to the whole budget)
    // cannot fold within it, and its own put-off upgrade, tried again as `s`'s is, held the
    // version's turn (a fold of a slow version goes one device at a time) just when `s`'s
    // retry came, so that was put off again, past the deadline (CI saw it twice).
    rt.remove_device("probe", false).await.expect("removed");

    let hogs = support::Hogs::start(32);
    let report = rt.deploy("misbehave", same.version, true).await;
    drop(hogs);
    let report = report.expect("a forced deploy goes on");
    let s = report
        .devices
        .iter()
        .find(|d| d.device == "s")
        .expect("s was live");
    assert_eq!(s.outcome, drover::upgrade::UpgradeOutcome::Lazy, "{s:?}");
    // Starved of cores, or of the version's turn (the probe's fold of the same slow version
    // held it, starved too): put off either way, nothing known about the version.
    assert!(
        s.error
            .as_deref()
            .is_some_and(|e| e.contains("overloaded") || e.contains("put off")),
        "{s:?}"
    );
    assert_eq!(report.totals.failed, 0, "{report:?}");

    // Kept busy, it never passivates: the put-off upgrade is tried again while it stays
    // live (`INTERNAL_RETRY` after it was put off), so it does not wait for an idle period
    // that may never come.
    // (Activations, not passivations: the idle probe passivates meanwhile.)
    // Tried again ~5 s after it was put off, and, put off once more by a loaded machine (a
    // CI run saw it), ~10 s after that (±25% each): 25 s covers both.
    let activations = rt.metrics().activations.load(Relaxed);
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    loop {
        rt.send("s", r#"{"type":"ok"}"#).await.expect("handled");
        if rt.summary("s").map(|d| d.version) == Some(same.version) {
            break;
        }
        if std::time::Instant::now() >= deadline {
            let m = rt.metrics();
            let pending = rt.device("s").await.map(|d| d.summary.upgrade);
            panic!(
                "still on the old version 25 s after the upgrade was put off (upgrade \
                 failures {}, not tried {}; s's upgrade: {pending:?})",
                m.upgrade_failures.load(Relaxed),
                m.upgrades_not_tried.load(Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        rt.metrics().activations.load(Relaxed),
        activations,
        "moved while live, not at an activation"
    );
    rt.shutdown().await;
}

/// A device with a backlog of slow events lets other devices' events through between them:
/// on one actor thread, a healthy device's event sent while the backlog runs is answered
/// before the backlog is done, not after all of it (a fresh-user trial saw a thermostat wait
/// 2.2 s behind eight looping devices' backlogs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_slow_events_does_not_keep_the_actor_thread() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::builder(dir.path())
        .plugin_dir(PLUGINS)
        .actor_threads(1)
        .open()
        .await
        .expect("runtime opens");
    rt.provision("slow", "misbehave", &json!({})).await.unwrap();
    rt.provision("ok", "misbehave", &json!({})).await.unwrap();
    rt.send("ok", r#"{"type":"ok"}"#).await.expect("live");
    // ~80 ms each, within the 250 ms budget: slow, not failing.
    let spin = calibrated(&rt, "slow", 0.08).await;
    let backlog: Vec<_> = (0..6)
        .map(|_| {
            let rt = rt.clone();
            let event = support::slow_apply(spin, 1);
            tokio::spawn(async move {
                rt.send("slow", &event).await.expect("handled");
                std::time::Instant::now()
            })
        })
        .collect();
    // The backlog is queued and its first event running.
    tokio::time::sleep(Duration::from_millis(30)).await;
    rt.send("ok", r#"{"type":"ok"}"#).await.expect("handled");
    let healthy_done = std::time::Instant::now();
    let mut last = healthy_done;
    for done in backlog {
        last = last.max(done.await.unwrap());
    }
    assert!(
        healthy_done + Duration::from_millis(100) < last,
        "the healthy event waited for the slow device's whole backlog ({:?} before its end)",
        last.saturating_duration_since(healthy_done)
    );
    rt.shutdown().await;
}

/// A runtime on one actor thread (and one slow-lane thread) whose events get `budget`, with
/// misbehave devices `first`, `spinner` and `ok` and a thermostat `thermo`, all live.
async fn one_thread(dir: &Path, budget: Duration) -> Runtime {
    one_thread_from(Runtime::builder(dir), budget).await
}

/// [`one_thread`] from `builder`.
async fn one_thread_from(builder: drover::RuntimeBuilder, budget: Duration) -> Runtime {
    let rt = builder
        .plugin_dir(PLUGINS)
        .actor_threads(1)
        .call_timeout(budget)
        .open()
        .await
        .expect("runtime opens");
    for id in ["first", "spinner", "ok"] {
        rt.provision(id, "misbehave", &json!({})).await.unwrap();
    }
    rt.provision("thermo", "thermostat", &json!({"setpoint": 21.0}))
        .await
        .unwrap();
    rt.send("ok", r#"{"type":"ok"}"#).await.expect("live");
    rt.send("thermo", r#"{"type":"reading","celsius":20.0}"#)
        .await
        .expect("live");
    rt
}

/// [`one_thread`], the misbehave plugin marked slow by a looping event of `first` (moved to
/// the slow lane, see `a_plugins_first_slow_event_moves_to_the_slow_lane`).
async fn one_thread_and_a_slow_plugin(dir: &Path, budget: Duration) -> Runtime {
    let rt = one_thread(dir, budget).await;
    let first = rt
        .send("first", r#"{"type":"loop"}"#)
        .await
        .expect_err("loops");
    assert_eq!(first.kind(), ErrorKind::Timeout, "{first}");
    assert_eq!(rt.metrics().slow_lane_events.load(Relaxed), 1);
    rt
}

/// Starts `slow` (a request whose guest work spins) in a task of its own and, once it has run
/// 100 ms, runs `healthy`: how long `healthy` took, what it answered, what `slow` answered,
/// and how long `slow` took from its start.
async fn while_spinning<S: Send + 'static, H>(
    slow: impl Future<Output = S> + Send + 'static,
    healthy: impl Future<Output = H>,
) -> (Duration, H, S, Duration) {
    let started = std::time::Instant::now();
    let slow = tokio::spawn(slow);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sent = std::time::Instant::now();
    let answer = healthy.await;
    let waited = sent.elapsed();
    let slow = slow.await.expect("the slow request's task");
    (waited, answer, slow, started.elapsed())
}

/// The thermostat `thermo`'s next reading, which must be handled.
async fn a_reading(rt: &Runtime) {
    rt.send("thermo", r#"{"type":"reading","celsius":20.5}"#)
        .await
        .expect("handled");
}

/// Sends a looping event to `spinner` and, once it runs, one event `event` to `id`: how long
/// that waited, and how the looping event ended and after how long.
async fn beside_a_spinner(
    rt: &Runtime,
    spinner: &str,
    id: &str,
    event: &str,
) -> (Duration, drover::Error, Duration) {
    let (rt2, spinner) = (rt.clone(), spinner.to_string());
    let (waited, _, looped, took) = while_spinning(
        async move { rt2.send(&spinner, r#"{"type":"loop"}"#).await },
        async { rt.send(id, event).await.expect("handled") },
    )
    .await;
    (waited, looped.expect_err("loops"), took)
}

/// Once a plugin has run slow, its events run on the slow lane: a healthy device of another
/// plugin, on the only actor thread, is answered while one of them spins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_ran_slow_runs_on_the_slow_lane() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let budget = Duration::from_millis(1200);
    let rt = one_thread_and_a_slow_plugin(dir.path(), budget).await;
    let (waited, looped, _) = beside_a_spinner(
        &rt,
        "spinner",
        "thermo",
        r#"{"type":"reading","celsius":20.5}"#,
    )
    .await;
    assert!(
        waited < Duration::from_millis(400),
        "the thermostat waited {waited:?} for a spinning guest"
    );
    assert_eq!(looped.kind(), ErrorKind::Timeout, "{looped}");
    // The looping event went to the slow lane; the thermostat's did not.
    assert_eq!(rt.metrics().slow_lane_events.load(Relaxed), 2);
    rt.shutdown().await;
}

/// Guests on the slow lane take turns: each call yields its thread at every epoch tick, so
/// on one slow-lane thread another device of the slow plugin is answered while a guest
/// spins, long before that guest's budget ends; and the looping event still ends as a
/// `timeout` after its budget of CPU time, counted across the slices it ran in (the time
/// it waited to be resumed is neither charged nor called the server's overload).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spinning_guests_on_the_slow_lane_take_turns() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let budget = Duration::from_millis(1200);
    let rt = one_thread_and_a_slow_plugin(dir.path(), budget).await;
    let (waited, looped, looped_for) =
        beside_a_spinner(&rt, "spinner", "ok", r#"{"type":"ok"}"#).await;
    assert!(
        waited < Duration::from_millis(400),
        "the slow plugin's healthy event waited {waited:?} for a spinning guest"
    );
    assert_eq!(looped.kind(), ErrorKind::Timeout, "{looped}");
    assert!(looped_for >= budget, "timed out after {looped_for:?}");
    assert_eq!(rt.metrics().slow_lane_events.load(Relaxed), 3);
    rt.shutdown().await;
}

/// A plugin's first slow event, on the actor pool, is stopped there once seen past two epoch
/// ticks and runs again from the start on the slow lane, its device rebuilt there: a healthy
/// device on the only actor thread is answered meanwhile, and the looping event still ends
/// as a `timeout` after its whole budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_first_slow_event_moves_to_the_slow_lane() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let budget = Duration::from_millis(1200);
    let rt = one_thread(dir.path(), budget).await;
    let on_slow_lane = |rt: &Runtime| -> Vec<(String, bool)> {
        rt.plugins()
            .into_iter()
            .filter(|(name, _)| name == "misbehave" || name == "thermostat")
            .map(|(name, versions)| (name, versions.iter().any(|v| v.slow_lane)))
            .collect()
    };
    assert_eq!(
        on_slow_lane(&rt),
        [("misbehave".into(), false), ("thermostat".into(), false)]
    );
    let (waited, looped, looped_for) = beside_a_spinner(
        &rt,
        "first",
        "thermo",
        r#"{"type":"reading","celsius":20.5}"#,
    )
    .await;
    assert!(
        waited < Duration::from_millis(400),
        "the thermostat waited {waited:?} for the plugin's first slow event"
    );
    assert_eq!(looped.kind(), ErrorKind::Timeout, "{looped}");
    assert!(looped_for >= budget, "timed out after {looped_for:?}");
    assert_eq!(rt.metrics().slow_lane_events.load(Relaxed), 1);
    assert_eq!(rt.metrics().slow_lane_activations.load(Relaxed), 1);
    // The listing says which plugin runs there.
    assert_eq!(
        on_slow_lane(&rt),
        [("misbehave".into(), true), ("thermostat".into(), false)]
    );
    // The device's healthy events go on, on the slow lane, from the state it had.
    let ack = rt.send("first", r#"{"type":"ok"}"#).await.expect("handled");
    assert_eq!(parse(&ack.transitions[0])["count"], json!(1));
    rt.shutdown().await;
}

/// A read whose `query` spins is stopped on the actor pool once seen slow and read again on
/// the slow lane, where it yields at each tick: a healthy device on the only actor thread is
/// answered meanwhile, and the read still ends as a `timeout` after its whole budget. The
/// plugin is marked slow by it, so its reads and events go to the slow lane from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_read_moves_to_the_slow_lane() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let budget = Duration::from_millis(1200);
    let rt = one_thread(dir.path(), budget).await;
    rt.send("spinner", r#"{"type":"loop_on_read"}"#)
        .await
        .expect("recorded");
    let reader = rt.clone();
    let (waited, (), read, took) = while_spinning(
        async move { reader.device("spinner").await },
        a_reading(&rt),
    )
    .await;
    let looped = read.expect_err("the read loops");
    assert!(
        waited < Duration::from_millis(400),
        "the thermostat waited {waited:?} for a spinning read"
    );
    assert_eq!(looped.kind(), ErrorKind::Timeout, "{looped}");
    assert!(took >= budget, "timed out after {took:?}");
    assert_eq!(rt.metrics().slow_lane_reads.load(Relaxed), 1);
    assert_eq!(rt.metrics().slow_lane_events.load(Relaxed), 0);
    assert!(
        !slow_versions(&rt).is_empty(),
        "the read marked its plugin slow"
    );
    // Another device of the plugin reads its state, on the slow lane now.
    let ok = rt.device("ok").await.expect("reads");
    assert_eq!(parse(&ok.state), json!({"count": 1, "applied": 1}));
    assert_eq!(rt.metrics().slow_lane_reads.load(Relaxed), 2);
    rt.shutdown().await;
}

/// A plugin marked slow whose units then all end within a tick, `FORGIVE_AFTER` of them in a
/// row on the slow lane, is no longer taken to run slow: its devices' events run on the
/// actor pool again. One slow event, or a mark set wrongly, does not keep a fleet on half
/// the cores until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_plugin_whose_events_run_fast_again_returns_to_the_pool() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let rt = one_thread_and_a_slow_plugin(dir.path(), Duration::from_millis(600)).await;
    let slow = |rt: &Runtime| !slow_versions(rt).is_empty();
    assert!(slow(&rt));
    let ids: Vec<String> = (0..16).map(|i| format!("fast-{i}")).collect();
    for id in &ids {
        rt.provision(id, "misbehave", &json!({})).await.unwrap();
    }
    let per_device = drover::engine::FORGIVE_AFTER as usize / ids.len() + 1;
    let senders: Vec<_> = ids
        .iter()
        .map(|id| {
            let (rt, id) = (rt.clone(), id.clone());
            tokio::spawn(async move {
                for _ in 0..per_device {
                    rt.send(&id, r#"{"type":"ok"}"#).await.expect("handled");
                }
            })
        })
        .collect();
    for s in senders {
        s.await.unwrap();
    }
    assert!(
        !slow(&rt),
        "still marked slow after {} fast events",
        per_device * ids.len()
    );
    let on_lane = rt.metrics().slow_lane_events.load(Relaxed);
    let ack = rt.send("ok", r#"{"type":"ok"}"#).await.expect("handled");
    assert_eq!(parse(&ack.transitions[0])["count"], json!(2));
    assert_eq!(
        rt.metrics().slow_lane_events.load(Relaxed),
        on_lane,
        "ran on the pool"
    );
    // Slow again: the next looping event moves it back.
    let looped = rt
        .send("spinner", r#"{"type":"loop"}"#)
        .await
        .expect_err("loops");
    assert_eq!(looped.kind(), ErrorKind::Timeout, "{looped}");
    assert!(slow(&rt));
    rt.shutdown().await;
}

/// Many guests looping at once on the slow lane each end as a `timeout` on their own CPU
/// budget, however long they waited for their turns: a plugin doing that is quarantined,
/// where being told the server is overloaded would let it loop, and come again, for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_guests_looping_at_once_on_the_slow_lane_each_time_out() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let budget = Duration::from_millis(100);
    let rt = one_thread_and_a_slow_plugin(dir.path(), budget).await;
    // Twenty turns of 100 ms on the one slow-lane thread: the last waits ~2 s, 20x its budget.
    let ids: Vec<String> = (0..20).map(|i| format!("loop-{i}")).collect();
    for id in &ids {
        rt.provision(id, "misbehave", &json!({})).await.unwrap();
    }
    let looping: Vec<_> = ids
        .iter()
        .map(|id| {
            let (rt, id) = (rt.clone(), id.clone());
            tokio::spawn(async move { rt.send(&id, r#"{"type":"loop"}"#).await })
        })
        .collect();
    let mut kinds = Vec::new();
    for l in looping {
        kinds.push(l.await.unwrap().expect_err("loops").kind());
    }
    assert!(
        kinds.iter().all(|k| *k == ErrorKind::Timeout),
        "every looping event times out: {kinds:?}"
    );
    rt.shutdown().await;
}

/// A device of a plugin that has run slow activates on the slow lane too (an activation's
/// budget is seconds, and its `apply`s may be as slow as the events'), and comes up with
/// the state it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_ran_slow_activates_on_the_slow_lane() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let rt = one_thread_and_a_slow_plugin(dir.path(), Duration::from_millis(600)).await;
    let before = rt.metrics().slow_lane_activations.load(Relaxed);
    // `first` lost its instance to the timeout: its next event activates it.
    let ack = rt
        .send("first", r#"{"type":"ok"}"#)
        .await
        .expect("activates");
    assert_eq!(parse(&ack.transitions[0])["count"], json!(1));
    assert_eq!(rt.metrics().slow_lane_activations.load(Relaxed), before + 1);
    rt.shutdown().await;
}

/// An activation whose `restore` spins, of a plugin that has not run slow, is stopped on the
/// actor pool once seen slow and done again on the slow lane: a healthy device on the only
/// actor thread is answered meanwhile. There the snapshot times out after the activation's
/// budget and the device comes up by replaying its history from `init`, as a snapshot that
/// will not restore always does; the plugin is marked slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_first_slow_activation_moves_to_the_slow_lane() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    a_snapshot_whose_restore_spins(dir.path()).await;
    let budget = Duration::from_millis(1500);
    let rt = Runtime::builder(dir.path())
        .plugin_dir(PLUGINS)
        .actor_threads(1)
        .activation_timeout(budget)
        .open()
        .await
        .expect("runtime opens");
    rt.provision("thermo", "thermostat", &json!({"setpoint": 21.0}))
        .await
        .unwrap();
    rt.send("thermo", r#"{"type":"reading","celsius":20.0}"#)
        .await
        .expect("live");
    let sender = rt.clone();
    let (waited, (), ack, took) = while_spinning(
        async move { sender.send("spinner", r#"{"type":"ok"}"#).await },
        a_reading(&rt),
    )
    .await;
    let ack = ack.expect("activates from its history");
    assert!(
        waited < Duration::from_millis(400),
        "the thermostat waited {waited:?} for the plugin's first slow activation"
    );
    assert!(took >= budget / 2, "the restore ended after {took:?}");
    assert_eq!(parse(&ack.transitions[0])["count"], json!(1));
    assert_eq!(rt.metrics().slow_lane_activations.load(Relaxed), 1);
    assert!(
        !slow_setup_versions(&rt).is_empty(),
        "the plugin's activations are marked slow"
    );
    assert_eq!(slow_versions(&rt), Vec::<u32>::new(), "its events are not");
    rt.shutdown().await;
}

/// A chunk of a fold holds as many `apply`s as its records have transitions: a deploy's fold
/// of a live device whose one chunk of healthy `apply`s (~2 µs each, 20,000 of them, ~40 ms)
/// adds up to more than two epoch ticks is no slow plugin: it is neither stopped on the pool
/// nor marks the new version slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_chunk_of_healthy_applies_does_not_mark_its_plugin_slow() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path(), 100_000).await;
    rt.provision("probe", "misbehave", &json!({}))
        .await
        .unwrap();
    rt.provision("long", "misbehave", &json!({})).await.unwrap();
    // ~2 µs each, a fifth of what a fold allows a transition (10 µs): a CI run saw the
    // version marked slow with ~4 µs calibrated (the calibration keeps the fastest of its
    // probes, and a busy core's spin takes more CPU time).
    let spin = calibrated(&rt, "probe", 2e-6).await.max(1);
    // Its own history is slow (each probe ~20 ms in one `apply`): not part of the deploy.
    rt.remove_device("probe", false).await.expect("removed");
    for _ in 0..80 {
        rt.send("long", &support::slow_apply(spin, 250))
            .await
            .expect("250 healthy applies");
    }
    let (same, _) =
        support::upload_misbehave(&rt, support::identical_rebuild(&support::misbehave_v1())).await;
    let report = rt
        .deploy("misbehave", same.version, true)
        .await
        .expect("deployed");
    let long = report
        .devices
        .iter()
        .find(|d| d.device == "long")
        .expect("long was live");
    assert_eq!(
        long.outcome,
        drover::upgrade::UpgradeOutcome::Upgraded,
        "{long:?}"
    );
    assert_eq!(long.applied, 20_000, "{long:?}");
    assert!(
        long.pause_us >= 25_000,
        "the fold took under two ticks and a half, or this test proves nothing: {long:?}"
    );
    // A fold marks the setup mark, if any: neither is set.
    for slow in [slow_versions(&rt), slow_setup_versions(&rt)] {
        assert!(
            !slow.contains(&same.version),
            "a long fold marked its version {} slow: {slow:?}",
            same.version
        );
    }
    rt.shutdown().await;
}

/// A plugin slow to build a state and quick at its events (an `init` that spins ~100 ms, as
/// one that builds a large table would) has its activations and trial `init`s on the slow
/// lane and its events on the pool: slow setup work marks its own mark. (With one mark, the
/// trial `init` sent every event of the plugin to the slow lane.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_slow_to_build_its_state_keeps_its_events_on_the_pool() {
    use std::sync::atomic::Ordering::Relaxed;
    let _serial = serial().await;
    // Calibrated on a runtime of its own: the probe's slow `apply`s mark its plugin slow.
    let spin = {
        let dir = tempfile::tempdir().unwrap();
        let rt = open(dir.path(), 1_000).await;
        rt.provision("probe", "misbehave", &json!({}))
            .await
            .unwrap();
        let spin = calibrated(&rt, "probe", 0.1).await;
        rt.shutdown().await;
        spin
    };
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::builder(dir.path())
        .plugin_dir(PLUGINS)
        .call_timeout(Duration::from_secs(2))
        .snapshot_every(100_000)
        .open()
        .await
        .expect("runtime opens");
    rt.provision("heavy", "misbehave", &json!({ "init_spin": spin }))
        .await
        .expect("a slow init is no failed one");
    let metrics = rt.metrics();
    assert_eq!(metrics.slow_lane_provisions.load(Relaxed), 1);
    for _ in 0..20 {
        rt.send("heavy", r#"{"type":"ok"}"#).await.expect("handled");
    }
    assert_eq!(
        metrics.slow_lane_events.load(Relaxed),
        0,
        "a slow `init` sent the plugin's events to the slow lane"
    );
    assert_eq!(metrics.slow_lane_activations.load(Relaxed), 1);
    assert_eq!(slow_versions(&rt), Vec::<u32>::new());
    assert_eq!(slow_setup_versions(&rt).len(), 1);
    // The device is what its events made it.
    let view = rt.device("heavy").await.expect("read");
    assert_eq!(parse(&view.state)["count"], json!(20));
    rt.shutdown().await;
}

/// On the slow lane an activation yields its thread at each epoch tick, as an event does:
/// while a device of a slow plugin activates from a snapshot whose `restore` spins, another
/// device of that plugin, on the only slow-lane thread, is answered long before the
/// activation's budget ends; the activation still times out on that snapshot after its
/// budget of CPU time and comes up from its history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_activation_on_the_slow_lane_lets_other_slow_devices_go_on() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    a_snapshot_whose_restore_spins(dir.path()).await;
    let budget = Duration::from_millis(1500);
    let rt = Runtime::builder(dir.path())
        .plugin_dir(PLUGINS)
        .actor_threads(1)
        .slow_lane_threads(1)
        .call_timeout(Duration::from_millis(300))
        .activation_timeout(budget)
        .open()
        .await
        .expect("runtime opens");
    for id in ["first", "ok"] {
        rt.provision(id, "misbehave", &json!({})).await.unwrap();
    }
    let first = rt
        .send("first", r#"{"type":"loop"}"#)
        .await
        .expect_err("loops");
    assert_eq!(first.kind(), ErrorKind::Timeout, "{first}");
    rt.send("ok", r#"{"type":"ok"}"#).await.expect("live");
    let activations = rt.metrics().slow_lane_activations.load(Relaxed);
    let sender = rt.clone();
    let (waited, healthy, ack, took) = while_spinning(
        async move { sender.send("spinner", r#"{"type":"ok"}"#).await },
        async { rt.send("ok", r#"{"type":"ok"}"#).await.expect("handled") },
    )
    .await;
    assert_eq!(parse(&healthy.transitions[0])["count"], json!(2));
    let ack = ack.expect("activates from its history");
    assert!(
        waited < Duration::from_millis(400),
        "a slow plugin's healthy event waited {waited:?} for a spinning activation"
    );
    assert!(took >= budget / 2, "the restore ended after {took:?}");
    assert_eq!(parse(&ack.transitions[0])["count"], json!(1));
    assert!(rt.metrics().slow_lane_activations.load(Relaxed) > activations);
    rt.shutdown().await;
}

/// A device whose snapshots will not restore (its `restore` spins) pays for them once: the
/// first activation spends half its budget on the newest snapshot and replays from `init`; from
/// then on the device's snapshots are off on that version, so its passivation writes no
/// other such snapshot and the next activation replays at once. (Before, every read of the
/// passivated device took the whole activation budget and wrote one more such snapshot.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_snapshots_will_not_restore_pays_for_them_once() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    a_snapshot_whose_restore_spins(dir.path()).await;
    let budget = Duration::from_millis(800);
    let rt = Runtime::builder(dir.path())
        .plugin_dir(PLUGINS)
        .activation_timeout(budget)
        .open()
        .await
        .expect("runtime opens");
    let read = async || {
        let started = std::time::Instant::now();
        let view = rt.device("spinner").await.expect("reads from its history");
        assert_eq!(view.status, DeviceStatus::Passivated);
        started.elapsed()
    };
    let first = read().await;
    assert!(first >= budget / 2, "the first read took {first:?}");
    let written = support::records_written(&rt);
    let second = read().await;
    assert!(
        second < budget / 2,
        "the snapshot that will not restore was tried again: {second:?}"
    );
    assert_eq!(
        support::records_written(&rt),
        written,
        "a read of a passivated device wrote a snapshot"
    );
    assert_eq!(rt.metrics().snapshot_failures.load(Relaxed), 1);
    rt.shutdown().await;
}

/// A device whose `snapshot` spins loses its instance to the first snapshot that times out,
/// not to every one: its snapshots are then off on that version, and it stays live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_snapshot_fails_stops_taking_them() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path(), 2).await;
    rt.provision("s", "misbehave", &json!({})).await.unwrap();
    rt.send("s", r#"{"type":"loop_on_snapshot"}"#)
        .await
        .expect("handled");
    // The first snapshot is moved off the pool (the plugin turns slow), the next one times
    // out on the slow lane: snapshots off.
    for _ in 0..5 {
        rt.send("s", r#"{"type":"ok"}"#).await.expect("handled");
    }
    assert_eq!(rt.metrics().snapshot_failures.load(Relaxed), 1);
    let started = std::time::Instant::now();
    for _ in 0..4 {
        rt.send("s", r#"{"type":"ok"}"#).await.expect("handled");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(250),
        "snapshots were still taken: {took:?}"
    );
    let view = rt.device("s").await.expect("reads");
    assert_eq!(view.status, DeviceStatus::Active);
    assert_eq!(parse(&view.state)["count"], json!(9));
    rt.shutdown().await;
}

/// A snapshot whose `snapshot` spins, of a plugin that has not run slow, is stopped on the
/// actor pool once seen slow (its instance lost with it, as after any failed snapshot): a
/// healthy device on the only actor thread is answered meanwhile. The plugin is marked slow,
/// and the device's next events, and their snapshots, run on the slow lane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_first_slow_snapshot_is_stopped_on_the_pool() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let budget = Duration::from_millis(1200);
    let rt = Runtime::builder(dir.path())
        .plugin_dir(PLUGINS)
        .actor_threads(1)
        .call_timeout(budget)
        .snapshot_every(1)
        .open()
        .await
        .expect("runtime opens");
    rt.provision("spinner", "misbehave", &json!({}))
        .await
        .unwrap();
    rt.provision("thermo", "thermostat", &json!({"setpoint": 21.0}))
        .await
        .unwrap();
    rt.send("thermo", r#"{"type":"reading","celsius":20.0}"#)
        .await
        .expect("live");
    // Handled and acknowledged; the snapshot after it spins.
    rt.send("spinner", r#"{"type":"loop_on_snapshot"}"#)
        .await
        .expect("handled");
    let sent = std::time::Instant::now();
    a_reading(&rt).await;
    let waited = sent.elapsed();
    assert!(
        waited < Duration::from_millis(400),
        "the thermostat waited {waited:?} for the plugin's first slow snapshot"
    );
    assert!(!slow_versions(&rt).is_empty(), "the plugin is marked slow");
    // The device goes on from its history, on the slow lane; its snapshots still fail.
    let events = rt.metrics().slow_lane_events.load(Relaxed);
    let ack = rt
        .send("spinner", r#"{"type":"ok"}"#)
        .await
        .expect("handled");
    assert_eq!(parse(&ack.transitions[0])["count"], json!(1));
    assert_eq!(rt.metrics().slow_lane_events.load(Relaxed), events + 1);
    rt.shutdown().await;
}

/// Provisioning's trial `init` runs where events do: one that spins, of a plugin that has not
/// run slow, is stopped on the actor pool once seen slow and tried again on the slow lane. A
/// healthy device on the only actor thread is answered meanwhile, and the provisioning fails
/// as a timeout after an activation's budget (the `init` runs again in one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trial_init_that_spins_moves_to_the_slow_lane() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let budget = Duration::from_millis(1200);
    let builder = Runtime::builder(dir.path()).activation_timeout(budget);
    let rt = one_thread_from(builder, Duration::from_millis(300)).await;
    let provisioner = rt.clone();
    let (waited, (), provisioned, took) = while_spinning(
        async move {
            provisioner
                .provision("looper", "misbehave", &json!({"loop_init": true}))
                .await
        },
        a_reading(&rt),
    )
    .await;
    let refused = provisioned.expect_err("init spins");
    assert!(
        waited < Duration::from_millis(400),
        "the thermostat waited {waited:?} for a spinning trial init"
    );
    assert_eq!(refused.kind(), ErrorKind::Timeout, "{refused}");
    assert!(took >= budget, "timed out after {took:?}");
    assert_eq!(rt.metrics().slow_lane_provisions.load(Relaxed), 1);
    let unknown = rt.device("looper").await.expect_err("not provisioned");
    assert_eq!(unknown.kind(), ErrorKind::UnknownDevice, "{unknown}");
    rt.shutdown().await;
}

/// A deploy's fold of a live device runs where its events do: one of a version not yet slow
/// that uses two epoch ticks is stopped on the actor pool, the version marked slow, and
/// folded again on the slow lane. A healthy device on the only actor thread is answered
/// meanwhile, and the device is upgraded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_deploy_fold_moves_to_the_slow_lane() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let budget = Duration::from_millis(2000);
    let (rt, same) =
        one_slow_device(Runtime::builder(dir.path()).actor_threads(1), budget, 0.6).await;
    rt.provision("thermo", "thermostat", &json!({"setpoint": 21.0}))
        .await
        .unwrap();
    rt.send("thermo", r#"{"type":"reading","celsius":20.0}"#)
        .await
        .expect("live");
    let started = std::time::Instant::now();
    let deploy = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.deploy("misbehave", same.version, true).await })
    };
    // The deploy first checks the fold on a blocking thread, then `s` folds its history
    // into the new version: readings all along, the longest wait kept.
    let mut waited = Duration::ZERO;
    while !deploy.is_finished() {
        let sent = std::time::Instant::now();
        a_reading(&rt).await;
        waited = waited.max(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = deploy.await.unwrap().expect("deployed");
    let took = started.elapsed();
    assert!(
        waited < Duration::from_millis(400),
        "the thermostat waited {waited:?} for a slow deploy fold"
    );
    let s = report
        .devices
        .iter()
        .find(|d| d.device == "s")
        .expect("s was live");
    assert_eq!(
        s.outcome,
        drover::upgrade::UpgradeOutcome::Upgraded,
        "{s:?}"
    );
    assert!(took >= budget * 3 / 5, "folded in {took:?}");
    let slow = slow_setup_versions(&rt);
    assert!(slow.contains(&same.version), "folds marked slow: {slow:?}");
    let slow = slow_versions(&rt);
    assert!(
        !slow.contains(&same.version),
        "events marked slow: {slow:?}"
    );
    rt.shutdown().await;
}

/// Leaves in `dir` a misbehave device `spinner`, passivated, whose history from `init`
/// folds in about `replay` of CPU time (five `slow_apply` events) and whose three newest
/// snapshots' `restore` spins. Returns what handling the five events took: no less than
/// folding them again takes, a better measure than the calibration's.
async fn snapshots_that_spin_over_a_slow_history(dir: &Path, replay: Duration) -> Duration {
    let rt = Runtime::builder(dir)
        .plugin_dir(PLUGINS)
        .snapshot_every(1)
        .call_timeout(Duration::from_secs(2))
        .open()
        .await
        .expect("runtime opens");
    rt.provision("probe", "misbehave", &json!({}))
        .await
        .unwrap();
    let spin = calibrated(&rt, "probe", replay.as_secs_f64() / 5.0).await;
    rt.provision("spinner", "misbehave", &json!({}))
        .await
        .unwrap();
    let mut took = Duration::ZERO;
    for _ in 0..5 {
        let started = std::time::Instant::now();
        rt.send("spinner", &support::slow_apply(spin, 1))
            .await
            .expect("within its call budget");
        took += started.elapsed();
    }
    // A snapshot after each event: the newest three are taken after this one.
    for event in [
        r#"{"type":"loop_on_restore"}"#,
        r#"{"type":"ok"}"#,
        r#"{"type":"ok"}"#,
    ] {
        rt.send("spinner", event).await.expect("handled");
    }
    rt.shutdown().await;
    took
}

/// Snapshots whose `restore` spins take at most half of an activation's budget together: the
/// replay from `init` that follows has the other half. (Before, the newest one took the
/// whole budget, the replay failed at its first look at the clock, and so did every
/// activation after it: a device whose history folds in a fifth of its budget never came up.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_whose_restore_spins_leave_the_replay_half_the_budget() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let took =
        snapshots_that_spin_over_a_slow_history(dir.path(), Duration::from_millis(300)).await;
    // The replay needs at most a fifth of it.
    let budget = took * 5;
    let rt = Runtime::builder(dir.path())
        .plugin_dir(PLUGINS)
        .activation_timeout(budget)
        .open()
        .await
        .expect("runtime opens");
    let started = std::time::Instant::now();
    let ack = rt
        .send("spinner", r#"{"type":"ok"}"#)
        .await
        .expect("activates from its history in the same activation");
    let took = started.elapsed();
    assert_eq!(ack.seq, 9);
    assert_eq!(parse(&ack.transitions[0])["count"], json!(3));
    assert!(took >= budget / 2, "the restores ended after {took:?}");
    assert_eq!(rt.metrics().snapshot_failures.load(Relaxed), 1);
    rt.shutdown().await;
}

/// An activation that fails after a snapshot would not restore still stops trying the
/// device's snapshots: the next one replays from `init` with the whole budget. Here the
/// restores take half of it and the replay needs about 75%: the first activation fails, the
/// second comes up. (Before, every activation spent its budget on the same snapshot again,
/// and the device was quarantined after three, though its history folds.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_that_fails_after_a_snapshot_would_not_restore_stops_trying_it() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let took =
        snapshots_that_spin_over_a_slow_history(dir.path(), Duration::from_millis(1500)).await;
    // The replay needs at most 75% of it (what handling the events took).
    let budget = took.mul_f64(4.0 / 3.0);
    let rt = Runtime::builder(dir.path())
        .plugin_dir(PLUGINS)
        .activation_timeout(budget)
        .open()
        .await
        .expect("runtime opens");
    // The calibration is coarse: a replay that did fit in the half left proves nothing here,
    // and the device is up (checked below all the same).
    match rt.send("spinner", r#"{"type":"ok"}"#).await {
        Err(first) => {
            assert_eq!(first.kind(), ErrorKind::ActivationFailed, "{first}");
            assert!(
                first
                    .to_string()
                    .contains("snapshots that would not restore"),
                "{first}"
            );
        }
        Ok(ack) => {
            eprintln!("the replay fit in half the budget: the second activation is not shown");
            assert_eq!(ack.seq, 9);
            rt.shutdown().await;
            return;
        }
    }
    let ack = rt
        .send("spinner", r#"{"type":"ok"}"#)
        .await
        .expect("replays from `init` with the whole budget");
    assert_eq!(ack.seq, 9);
    assert_eq!(parse(&ack.transitions[0])["count"], json!(3));
    rt.shutdown().await;
}
