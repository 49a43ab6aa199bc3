//! Issue 9, acceptance 3: retention deletes only segments whose devices all have later
//! snapshots, and reads of a seq retained away answer clearly (410 with the oldest seq kept),
//! through a real server, across a `kill -9` and a graceful restart.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Server, poll_until};

const FLAGS: [&str; 8] = [
    "--journal-segment-bytes",
    "16384",
    "--index-checkpoint-bytes",
    "32768",
    "--snapshot-every",
    "100",
    "--retention",
    "after-snapshot",
];

/// `n` readings for each of `devices`, through the batch endpoint.
fn readings(server: &Server, devices: &[&str], n: usize) {
    let api = server.api();
    for round in 0..n.div_ceil(100) {
        let events: Vec<Value> = (0..100)
            .flat_map(|i| {
                devices.iter().map(move |d| {
                    json!({"device": d, "event": {"type": "reading", "celsius": 15.0 + ((round * 100 + i) % 13) as f64}})
                })
            })
            .collect();
        let answer = api.post("/v1/events", &json!({ "events": events }));
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(answer.body["failed"], 0, "{}", answer.text);
    }
}

#[test]
fn retention_deletes_what_every_device_has_a_later_snapshot_of_and_answers_410_for_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &FLAGS);
    let api = server.api();
    api.provision("t1", "thermostat", json!({"setpoint": 20.0}));
    api.provision("t2", "thermostat", json!({"setpoint": 18.0}));
    // `quiet` has one event and so no snapshot: it holds every segment from its event on.
    api.provision("quiet", "thermostat", json!({"setpoint": 18.0}));
    api.send("quiet", &json!({"type": "reading", "celsius": 17.0}));
    readings(&server, &["t1", "t2"], 1000);
    let pass = api.post("/v1/journal/retention", &json!({}));
    assert_eq!(pass.status, 200, "{}", pass.text);
    assert_eq!(pass.body["pinned_by"]["device"], "quiet", "{}", pass.text);
    assert_eq!(
        pass.body["pinned_by"]["reason"], "no-snapshot",
        "{}",
        pass.text
    );
    let before = api.get("/v1/journal").body;
    assert_eq!(before["retention"]["deleted_segments"], 0, "{before}");
    assert_eq!(
        api.journal("t1", 1000).first().map(|r| r["seq"].clone()),
        Some(json!(1)),
        "everything kept"
    );

    // Once `quiet` goes, only snapshots hold segments back.
    assert_eq!(
        api.call(reqwest::Method::DELETE, "/v1/devices/quiet", None)
            .status,
        200
    );
    readings(&server, &["t1", "t2"], 1000);
    let status = poll_until(Duration::from_secs(30), "segments deleted", || {
        api.post("/v1/journal/retention", &json!({}));
        let status = api.get("/v1/journal").body;
        (status["retention"]["deleted_segments"].as_u64() > Some(0)).then_some(status)
    });
    let retention = &status["retention"];
    assert_eq!(retention["policy"], "after-snapshot", "{status}");
    assert!(retention["retained_from"].as_u64() > Some(0), "{status}");
    assert!(
        retention["deleted_bytes"].as_u64() >= retention["retained_from"].as_u64(),
        "{status}"
    );
    assert!(!data.join("journal.log").exists(), "the first segment went");

    // What went: 410 with the oldest seq kept, in the error shape.
    let gone = api.get("/v1/devices/t1/journal?from=1&limit=5");
    gone.assert_error(410, "retained-away");
    let oldest = gone.body["error"]["oldest_seq"]
        .as_u64()
        .expect("oldest_seq");
    assert!(oldest > 1 && oldest <= 2000, "{}", gone.text);
    let kept = api.get(&format!("/v1/devices/t1/journal?from={oldest}&limit=5"));
    assert_eq!(kept.status, 200, "{}", kept.text);
    assert_eq!(kept.body["records"][0]["seq"], oldest, "{}", kept.text);
    // Without `from`, a page starts at the oldest record kept.
    let default = api.get("/v1/devices/t1/journal?limit=5");
    assert_eq!(
        default.body["records"][0]["seq"], oldest,
        "{}",
        default.text
    );
    let state_gone = api.get("/v1/devices/t1/state?at=1");
    state_gone.assert_error(410, "retained-away");
    let rebuildable = state_gone.body["error"]["oldest_seq"]
        .as_u64()
        .expect("oldest_seq");
    let at = api.get(&format!("/v1/devices/t1/state?at={rebuildable}"));
    assert_eq!(at.status, 200, "{}", at.text);
    assert_eq!(at.body["seq"], rebuildable);
    // An export of the whole history names what went and the way to what is kept; `--kept`
    // exports each device from its oldest record kept, which import refuses as partial.
    let data_arg = data.to_str().expect("utf-8");
    // A replay from `init` needs seq 1, and says so.
    let (ok, _, err) = support::cli(&["replay", "t1", "--data", data_arg, "--genesis"]);
    assert!(!ok);
    assert!(
        err.contains("retained-away") && err.contains("--genesis replays every transition"),
        "{err}"
    );
    let (ok, _, err) = support::cli(&["journal", "export", "--all", "--data", data_arg]);
    assert!(!ok);
    assert!(err.contains("retention") && err.contains("--kept"), "{err}");
    let kept = dir.path().join("kept.jsonl");
    let kept_arg = kept.to_str().expect("utf-8");
    let (ok, out, err) = support::cli(&[
        "journal", "export", "--all", "--kept", "--data", data_arg, "-o", kept_arg,
    ]);
    assert!(ok, "{out}{err}");
    let text = std::fs::read_to_string(&kept).expect("export written");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    for id in ["t1", "t2"] {
        let at = lines
            .iter()
            .position(|l| l["kind"] == "device" && l["device"] == id)
            .expect("device line");
        let first = lines[at]["first_seq"].as_u64().expect("first_seq");
        assert!(first > 1, "{}", lines[at]);
        assert_eq!(lines[at + 1]["seq"], first, "{id}: records from there");
        if id == "t1" {
            assert_eq!(first, oldest, "t1's oldest record kept");
        }
    }
    let (ok, _, err) = support::cli(&[
        "journal",
        "import",
        kept_arg,
        "--data",
        dir.path().join("imported").to_str().expect("utf-8"),
    ]);
    assert!(!ok);
    assert!(err.contains("partial export"), "{err}");
    let metrics = api.get("/metrics").text;
    assert!(
        metrics.contains("drover_journal_retention_deleted_segments ")
            && !metrics.contains("drover_journal_retention_deleted_segments 0\n"),
        "{metrics}"
    );

    // A kill -9, then a graceful restart: the same states, and on from there.
    let live: Vec<Value> = ["t1", "t2"]
        .iter()
        .map(|d| api.get(&format!("/v1/devices/{d}")).body["state"].clone())
        .collect();

    // A backup of the running server carries the index checkpoint a retained journal opens
    // from, and starts as a server of its own. (Idle for a moment first, so that the
    // writer's last batch is proven and the copy holds everything acknowledged.)
    support::wait_until_idle_proven(&data);
    let copy = dir.path().join("copy");
    let (ok, out, err) = support::cli(&[
        "backup",
        "--data",
        data.to_str().expect("utf-8"),
        "--to",
        copy.to_str().expect("utf-8"),
    ]);
    assert!(ok, "{out}{err}");
    // It counts the bytes it copied, which start where retention left the journal.
    let copied_from: u64 = out
        .split("(from position ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(copied_from > 0, "{out}");
    let restored = Server::start(&copy, &FLAGS);
    let copied = restored.api();
    for (d, state) in ["t1", "t2"].iter().zip(&live) {
        assert_eq!(
            &copied.get(&format!("/v1/devices/{d}")).body["state"],
            state,
            "{d} in the backup"
        );
    }
    copied
        .get("/v1/devices/t1/journal?from=1")
        .assert_error(410, "retained-away");
    drop(restored);
    server.kill();
    let mut server = Server::start(&data, &FLAGS);
    let api = server.api();
    for (d, state) in ["t1", "t2"].iter().zip(&live) {
        let now = api.get(&format!("/v1/devices/{d}")).body;
        assert_eq!(&now["state"], state, "{d} after kill -9");
        assert_eq!(now["seq"], 2000, "{d}");
    }
    api.get("/v1/devices/t1/journal?from=1")
        .assert_error(410, "retained-away");
    // A pass at start says what holds the journal back, before any index checkpoint.
    let status = poll_until(Duration::from_secs(30), "a retention pass at start", || {
        let status = api.get("/v1/journal").body;
        (status["retention"]["passes"].as_u64() >= Some(1)).then_some(status)
    });
    assert!(
        status["retention"]["pinned_by"]["reason"].is_string(),
        "{status}"
    );
    assert!(server.terminate().success());
    let server = Server::start(&data, &FLAGS);
    let api = server.api();
    assert_eq!(
        api.send("t1", &json!({"type": "reading", "celsius": 21.0}))["seq"],
        2001
    );
    assert_eq!(
        api.get("/v1/devices/t2").body["state"],
        live[1],
        "t2 after a graceful restart"
    );
    // Removed with an archive: its history from the oldest record kept, each record as the
    // journal API shows it (a review found `at_ms` in the archive for the API's `at`).
    let last = api.get("/v1/devices/t2/journal?from=2000&limit=1").body["records"][0].clone();
    assert_eq!(last["seq"], 2000, "{last}");
    let removed = api.call(reqwest::Method::DELETE, "/v1/devices/t2?archive=true", None);
    assert_eq!(removed.status, 200, "{}", removed.text);
    let archive = std::fs::read_to_string(removed.body["archive"].as_str().expect("archive"))
        .expect("archive written");
    let mut lines = archive.lines();
    let header: Value = serde_json::from_str(lines.next().expect("header")).expect("JSON");
    let first = header["first_seq"].as_u64().expect("first_seq");
    assert!(first > 1, "{header}");
    let records: Vec<Value> = lines
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(
        records.first().map(|r| r["seq"].clone()),
        Some(json!(first))
    );
    assert_eq!(records.len() as u64, 2000 - first + 1);
    assert_eq!(records.last(), Some(&last));
}

/// A runtime of the `misbehave` test plugin whose journal retains: 4 KiB segments, an index
/// checkpoint (and so a retention pass) every 16 KiB, a snapshot every 8 events; no
/// background refresher (the tests ask for refreshes when they mean to).
async fn retaining_runtime(dir: &std::path::Path, idle: Duration) -> drover::Runtime {
    retaining_runtime_refreshing(dir, idle, None).await
}

/// [`retaining_runtime`] with the background refresher looking every `refresh`.
async fn retaining_runtime_refreshing(
    dir: &std::path::Path,
    idle: Duration,
    refresh: Option<Duration>,
) -> drover::Runtime {
    use drover::journal::{Retention, RetentionPolicy};
    drover::Runtime::builder(dir)
        .plugin_dir(support::PluginDir)
        .snapshot_every(8)
        .idle_timeout(idle)
        .journal_segment_bytes(4096)
        .index_checkpoint_every(16384)
        .journal_retention(Retention {
            policy: RetentionPolicy::AfterSnapshot,
            ..Retention::default()
        })
        .retention_refresh(refresh)
        .open()
        .await
        .expect("runtime opens")
}

/// A dry run after retention starts from the recorded version's snapshot, which the
/// candidate must restore; one that cannot is reported as such, not as "refused the event"
/// (a review), nor as a fold that failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_whose_candidate_cannot_restore_the_snapshot_left_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v2_component = support::misbehave_variant("v2");
    let rt = retaining_runtime(dir.path(), Duration::from_secs(30)).await;
    rt.provision("m", "misbehave", &json!({}))
        .await
        .expect("provision");
    // The `v2` build's `restore` panics on a snapshot of this state.
    rt.send("m", r#"{"type":"v2_cannot_restore"}"#)
        .await
        .expect("handled");
    // Until retention has deleted the start of its history (which waits for an index
    // checkpoint: 16 KiB of index here).
    for _ in 0..20 {
        for _ in 0..300 {
            rt.send("m", r#"{"type":"ok"}"#).await.expect("ok");
        }
        rt.retain_now().await.expect("retention pass");
        if rt
            .journal()
            .oldest_retained_seq(rt.journal().device("m").expect("m").num)
            > 1
        {
            break;
        }
    }
    let head = rt.journal().device("m").expect("m");
    assert!(
        rt.journal().oldest_retained_seq(head.num) > 1,
        "history deleted"
    );
    let (v2, _) = rt
        .register_plugin("misbehave", v2_component, drover::registry::Origin::Upload)
        .await
        .expect("v2");
    let report = rt
        .dry_run("misbehave", v2.version, drover::Selection::Sample(1))
        .await
        .expect("dry run");
    let d = &report.devices[0];
    let error = d.error.as_deref().unwrap_or_default();
    assert!(
        error.starts_with("the candidate cannot restore the snapshot at seq ")
            && error.contains("cannot restore this snapshot"),
        "{d:?}"
    );
    assert!(!error.contains("refused the event"), "{error}");
    assert!(!d.identical && !d.folds, "{d:?}");
    rt.shutdown().await;
}

/// A deploy after retention: the history a replay into the new version needs is gone, so
/// each device comes up from its old version's latest snapshot, which the new version
/// restores; the new behavior is live and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_after_retention_starts_each_device_from_its_old_versions_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Built first: a cargo build between the events and the deploy would let the devices'
    // idle timeout run out.
    let v2_component = support::misbehave_variant("v2");
    let rt = retaining_runtime(dir.path(), Duration::from_secs(2)).await;
    let devices = ["m-0", "m-1", "m-2", "m-3"];
    for id in devices {
        rt.provision(id, "misbehave", &json!({}))
            .await
            .expect("provision");
    }
    // A dead letter in the history retention will delete: it holds nothing back, and the
    // list then says it went.
    let trapped = rt.send("m-0", r#"{"type":"panic"}"#).await;
    assert_eq!(trapped.expect_err("traps").code(), "trap");
    // Written behind the answer, through the device's lane.
    let start = std::time::Instant::now();
    while rt.dead_letters("m-0").expect("dead letters").is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "no dead letter");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rt.dead_letters_retained_away("m-0").expect("count"), 0);
    let mut senders = Vec::new();
    for id in devices {
        let rt = rt.clone();
        senders.push(tokio::spawn(async move {
            for _ in 0..602 {
                rt.send(id, r#"{"type":"ok"}"#).await.expect("ok");
            }
        }));
    }
    for s in senders {
        s.await.expect("sender");
    }
    rt.retain_now().await.expect("retention pass");
    assert!(rt.journal().retained_from() > 0, "segments deleted");
    let gone = rt.journal_page("m-0", 1, 10).expect_err("retained away");
    assert_eq!(gone.code(), "retained-away");
    assert!(rt.dead_letters("m-0").expect("dead letters").is_empty());
    assert_eq!(rt.dead_letters_retained_away("m-0").expect("count"), 1);

    // Registered (compiled: a second or more in a debug build on a busy machine) before the
    // events below, so that no device's idle timeout runs out between them and the deploy
    // (a passivation snapshot would leave the dry-run nothing to compare).
    let (v2, _) = rt
        .register_plugin("misbehave", v2_component, drover::registry::Origin::Upload)
        .await
        .expect("v2");
    // Three more events on each device, after its last snapshot: the dry-run and the
    // upgrade fold them.
    for id in devices {
        for _ in 0..3 {
            rt.send(id, r#"{"type":"ok"}"#).await.expect("ok");
        }
    }
    let report = rt
        .deploy("misbehave", v2.version, false)
        .await
        .expect("deploy");
    // The dry-run sample compared from each device's v1 snapshot (what is left of its
    // history), which v2 restores: v2 decides the events after it differently (it counts
    // by two) and folds what v1 recorded.
    for d in &report.sample.devices {
        assert_eq!(d.error, None, "{d:?}");
        assert!(
            d.folds && d.events >= 3 && d.diverged_events == d.events,
            "{d:?}"
        );
    }
    // Live devices come up on v2 now, passivated ones at their next activation: both from
    // the old version's snapshot.
    assert_eq!(report.totals.failed, 0, "{report:?}");
    assert_eq!(
        report.totals.upgraded + report.totals.pending_lazy,
        devices.len(),
        "{report:?}"
    );
    // (A device passivated meanwhile is lazy: it has no path yet, and takes the same one
    // at its next activation, below.)
    assert!(
        report
            .devices
            .iter()
            .filter(|d| d.outcome == drover::upgrade::UpgradeOutcome::Upgraded)
            .all(|d| d.path == Some(drover::upgrade::UpgradePath::Snapshot)),
        "from the old version's snapshot: {report:?}"
    );
    for id in devices {
        // v2 counts `ok` by two.
        let sent = rt.send(id, r#"{"type":"ok"}"#).await.expect("ok under v2");
        assert_eq!(sent.seq, 606);
        assert_eq!(rt.summary(id).expect("device").version, v2.version, "{id}");
        let state: Value =
            serde_json::from_str(&rt.device(id).await.expect("device").state).expect("JSON");
        assert_eq!(state["count"], 607, "{id}");
    }
    // The past, after the deploy: a rebuild into v2 reaches back to the oldest snapshot kept
    // of either version (v2 restores v1's), which is what the 410 names; the CLI's offline
    // replay, on the same data directory, rebuilds the same state there.
    let gone = rt.state_at("m-0", 1).await.expect_err("retained away");
    assert_eq!(gone.code(), "retained-away");
    let drover::Error::StateRetainedAway {
        oldest,
        events_from,
        requested: 1,
    } = gone
    else {
        panic!("{gone:?}")
    };
    let num = rt.journal().device("m-0").expect("m-0").num;
    assert_eq!(events_from, rt.journal().oldest_retained_seq(num), "{gone}");
    let v1_snapshots: Vec<u64> = {
        let num = rt.journal().device("m-0").expect("m-0").num;
        rt.journal()
            .snapshots(num)
            .iter()
            .filter(|s| s.version != v2.version)
            .map(|s| s.seq)
            .collect()
    };
    assert_eq!(v1_snapshots.first(), Some(&oldest), "{v1_snapshots:?}");
    let at = rt
        .state_at("m-0", oldest)
        .await
        .expect("oldest rebuildable");
    assert_eq!(at.seq, oldest);
    let offline = drover::replay::offline(
        dir.path(),
        "m-0",
        Some(oldest),
        drover::replay::Start::Snapshot,
    )
    .expect("offline replay");
    assert_eq!((offline.seq, &offline.state), (oldest, &at.state));
    let offline_gone = drover::replay::offline(
        dir.path(),
        "m-0",
        Some(oldest - 1),
        drover::replay::Start::Snapshot,
    )
    .expect_err("before the oldest snapshot");
    // One sentence, not the journal's repeated by the error chain; it says where the events
    // kept begin and from where states can be rebuilt.
    let text = format!("{offline_gone:#}");
    assert_eq!(text.matches("retention").count(), 1, "{text}");
    assert!(
        text.contains(&format!("before seq {events_from}"))
            && text.contains(&format!("states from seq {oldest} on")),
        "{text}"
    );
    // A rebuild from `init` needs seq 1: the journal's own answer.
    let genesis = drover::replay::offline(
        dir.path(),
        "m-0",
        Some(oldest),
        drover::replay::Start::Genesis,
    )
    .expect_err("history gone");
    let text = format!("{genesis:#}");
    assert!(
        text.contains(&format!("history before seq {events_from} was deleted")),
        "{text}"
    );
    // Passivated before v2 took a snapshot of its own: the next activation comes up from
    // the same old snapshot (a replay from `init` would need the history that went).
    let live = |rt: &drover::Runtime| {
        rt.metrics()
            .live_instances
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let start = std::time::Instant::now();
    while live(&rt) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never passivated"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in devices {
        let sent = rt
            .send(id, r#"{"type":"ok"}"#)
            .await
            .expect("ok after activation");
        assert_eq!(sent.seq, 607);
        let state: Value =
            serde_json::from_str(&rt.device(id).await.expect("device").state).expect("JSON");
        assert_eq!(state["count"], 609, "{id}");
    }
    // Each device wrote a v2 snapshot as it came up from v1's: retention is held by
    // snapshots (or by the index checkpoint, if it is lower), not by devices without one of
    // their version, which would hold it at their first event kept.
    let pass = rt.retain_now().await.expect("retention pass");
    let reason = pass.pinned_by.as_ref().map(|p| p.reason);
    assert!(
        matches!(reason, Some("snapshot" | "index-checkpoint")),
        "each device has a snapshot of its version: {pass:?}"
    );
    rt.shutdown().await;
}

/// `drover backup` of a server whose retention deletes segments (and whose index merges and
/// rewrites run files) while the backup copies: every backup succeeds and opens.
#[test]
fn backups_under_load_while_retention_deletes_all_succeed() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start(&data, &FLAGS);
    let api = server.api();
    let ids: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    for id in &ids {
        api.provision(id, "thermostat", json!({"setpoint": 20.0}));
    }
    readings(&server, &ids, 200);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let url = server.url.clone();
        std::thread::spawn(move || {
            let api = support::Api::new(&url);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let events: Vec<Value> = (0..200)
                    .map(|i| json!({"device": format!("t{}", i % 20), "event": {"type": "reading", "celsius": 15.0 + ((n + i) % 9) as f64}}))
                    .collect();
                api.post("/v1/events", &json!({ "events": events }));
                n += 1;
            }
        })
    };
    for round in 0..12 {
        let copy = dir.path().join(format!("copy-{round}"));
        let (ok, out, err) = support::cli(&[
            "backup",
            "--data",
            data.to_str().expect("utf-8"),
            "--to",
            copy.to_str().expect("utf-8"),
        ]);
        assert!(ok, "backup {round}: {out}{err}");
        let journal = drover::journal::Journal::open_read_only(&copy).expect("the copy opens");
        assert!(journal.device("t1").is_some());
    }
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load");
    let status = api.get("/v1/journal").body;
    assert!(
        status["retention"]["deleted_segments"].as_u64() > Some(0),
        "retention ran meanwhile: {status}"
    );
    assert!(
        !std::fs::read_dir(&data)
            .expect("data")
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with("backup-")),
        "the backups' links are gone"
    );
}

/// A device idle since an old snapshot holds back every later segment, until retention asks
/// it for a fresh snapshot: then those segments go, and its state is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_device_holding_retention_back_is_asked_for_a_fresh_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = retaining_runtime(dir.path(), Duration::from_millis(200)).await;
    rt.provision("quiet", "misbehave", &json!({}))
        .await
        .expect("provision");
    // A snapshot at 8, then two events after it; then quiet for good.
    for _ in 0..10 {
        rt.send("quiet", r#"{"type":"ok"}"#).await.expect("ok");
    }
    let busy = ["b-0", "b-1"];
    for id in busy {
        rt.provision(id, "misbehave", &json!({}))
            .await
            .expect("provision");
    }
    // Far enough past quiet's snapshot (taken when it passivated) that the index checkpoint
    // would let retention delete the segments before it.
    let mut senders = Vec::new();
    for id in busy {
        let rt = rt.clone();
        senders.push(tokio::spawn(async move {
            for _ in 0..1500 {
                rt.send(id, r#"{"type":"ok"}"#).await.expect("ok");
            }
        }));
    }
    for s in senders {
        s.await.expect("sender");
    }
    let pass = rt.retain_now().await.expect("pass");
    let pin = pass.pinned_by.expect("held back");
    assert_eq!(
        (pin.device.as_deref(), pin.reason),
        (Some("quiet"), "snapshot")
    );
    let held = rt.journal().retained_from();
    let before: Value =
        serde_json::from_str(&rt.device("quiet").await.expect("quiet").state).expect("JSON");

    let laggards = rt.journal().retention_laggards(10).expect("laggards");
    assert_eq!(
        laggards.first().and_then(|p| p.device.as_deref()),
        Some("quiet")
    );
    assert!(rt.refresh_retention(10).await.expect("refresh") >= 1);
    // A new snapshot record (of the same seq: nothing happened since) past the old one.
    let start = std::time::Instant::now();
    while rt
        .journal()
        .snapshots(rt.journal().device("quiet").expect("quiet").num)
        .last()
        .is_none_or(|s| s.seq != 10 || s.offset <= pin.position)
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no fresh snapshot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pass = rt.retain_now().await.expect("pass");
    assert!(
        rt.journal().retained_from() > held,
        "segments behind the old snapshot went: {pass:?}"
    );
    assert_ne!(
        pass.pinned_by.and_then(|p| p.device),
        Some("quiet".to_string()),
        "no longer held by quiet"
    );
    let after: Value =
        serde_json::from_str(&rt.device("quiet").await.expect("quiet").state).expect("JSON");
    assert_eq!(after, before, "the same state");
    assert_eq!(
        rt.send("quiet", r#"{"type":"ok"}"#).await.expect("ok").seq,
        11
    );
    rt.shutdown().await;
}

/// `drover serve` on `data` with `flags`, started under open-files limits `soft` and `hard`
/// (as a shell's `ulimit -Sn`/`-Hn` would set them).
fn start_with_open_files(data: &std::path::Path, flags: &[&str], soft: u64, hard: u64) -> Server {
    Server::start_with(data, flags, |cmd| limit_open_files(cmd, soft, hard))
}

/// Makes `cmd` run under open-files limits `soft` and `hard`.
fn limit_open_files(cmd: &mut std::process::Command, soft: u64, hard: u64) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Every segment is a file the server keeps open: under a shell's low soft limit on open
/// files (`ulimit -Sn 64`), small segments used to run it out of descriptors ("Too many open
/// files" on commit). The server raises its soft limit to the hard one at start, and a
/// segment size under the minimum is refused.
#[test]
fn small_segments_under_a_low_open_files_limit_keep_committing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut hard = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `hard` is a valid, writable `rlimit`.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) },
        0
    );
    let low = 64.min(hard.rlim_max);
    let server = start_with_open_files(
        &data,
        &["--journal-segment-bytes", "4096"],
        low,
        hard.rlim_max,
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).expect("limits");
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line")
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    assert_eq!(
        open_files[0], open_files[1],
        "soft raised to hard: {limits}"
    );
    let api = server.api();
    api.provision("t1", "thermostat", json!({"setpoint": 20.0}));
    api.provision("t2", "thermostat", json!({"setpoint": 18.0}));
    // 80 batches: a commit never spans two segments, so each batch's commit (~20 KiB) starts
    // a segment of its own; more segments than the soft limit the server was given.
    readings(&server, &["t1", "t2"], 8000);
    let segments = api.get("/v1/journal").body["retention"]["segments"]
        .as_u64()
        .expect("segments");
    assert!(segments > low, "{segments} segments");
    assert_eq!(api.get("/v1/devices/t1").body["seq"], 8000);
    drop(server);

    // Under a hard limit the segments do not fit in, the start fails saying what holds the
    // descriptors and what to raise (it said only "Too many open files").
    let under = segments / 2;
    let mut command = std::process::Command::new(support::BIN);
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data);
    limit_open_files(&mut command, under, under);
    let out = command.output().expect("run");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("ran out of file descriptors")
            && said.contains(&format!("open-files limit {under}"))
            && said.contains(&format!("{segments} segment files"))
            && said.contains("ulimit -Hn"),
        "{said}"
    );
    // Just over it: it starts, and says at once that few are free.
    let server = start_with_open_files(&data, &[], segments + 40, segments + 40);
    let log = server.log_text();
    assert!(
        log.contains("starting with few file descriptors free"),
        "{log}"
    );
    drop(server);

    // A hard limit too low for the segments and the connection cap set refuses the start,
    // saying how many fit (it was only warned of, and the server could then take in so many
    // connections that it could accept none, `/healthz` included).
    let tight = 2048.min(hard.rlim_max);
    let mut command = std::process::Command::new(support::BIN);
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--max-connections",
            "4096",
        ])
        .args(["--journal-segment-bytes", "4096", "--data"])
        .arg(&data);
    limit_open_files(&mut command, tight, tight);
    let out = command.output().expect("run");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("--max-connections 4096 does not fit the open-files limit")
            && said.contains(&format!("the journal's {segments} segment file(s)")),
        "{said}"
    );
    // Without a cap set, the default one is lowered to what the limit holds.
    let server = start_with_open_files(&data, &["--journal-segment-bytes", "4096"], tight, tight);
    let log = server.log_text();
    assert!(log.contains("connection cap lowered"), "{log}");
    assert_eq!(server.api().get("/healthz").status, 200);
    drop(server);

    let (ok, _, err) = support::cli(&[
        "serve",
        "--data",
        data.to_str().expect("utf-8"),
        "--journal-segment-bytes",
        "1",
    ]);
    assert!(!ok);
    assert!(err.contains("under the minimum of 4096"), "{err}");
}

/// Small segments walk a server towards its open-files limit, one descriptor per segment,
/// and past it every commit that starts a segment fails with "Too many open files". `/readyz`
/// used to say ready all the while. Now it says `files-low` while free descriptors are still
/// left, so a load balancer moves traffic before the first failure; nothing acknowledged is
/// lost, and a restart with a higher limit is ready again.
#[test]
fn readiness_says_files_low_before_small_segments_use_up_the_descriptors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let limit = 256;
    let server = start_with_open_files(&data, &["--journal-segment-bytes", "4096"], limit, limit);
    let api = server.api();
    api.provision("t1", "thermostat", json!({"setpoint": 20.0}));
    let codes = |api: &support::Api| -> Vec<String> {
        let answer = api.get("/readyz");
        answer.body["reasons"]
            .as_array()
            .expect("reasons")
            .iter()
            .map(|r| r["code"].as_str().expect("code").to_string())
            .collect()
    };
    assert_eq!(codes(&api), Vec::<String>::new(), "ready at first");
    let mut acknowledged = 0u64;
    let mut not_ready_at = None;
    let mut failure = None;
    // Each batch's commit (~10 KiB) starts a segment of its own.
    for batch in 0..1000 {
        let events: Vec<Value> = (0..100)
            .map(|i| json!({"device": "t1", "event": {"type": "reading", "celsius": 15.0 + (i % 13) as f64}}))
            .collect();
        let answer = api.post("/v1/events", &json!({ "events": events }));
        assert_eq!(answer.status, 200, "{}", answer.text);
        let failed = answer.body["failed"].as_u64().expect("failed");
        acknowledged += 100 - failed;
        if failed > 0 {
            failure = Some((batch, answer.text));
            break;
        }
        if not_ready_at.is_none() && codes(&api).contains(&"files-low".to_string()) {
            not_ready_at = Some(batch);
            let answer = api.get("/readyz");
            assert_eq!(answer.status, 503, "{}", answer.text);
            let message = answer.body["reasons"][0]["message"]
                .as_str()
                .expect("message");
            assert!(
                message.contains("segment files") && message.contains("ulimit -Hn"),
                "says why and what helps: {message}"
            );
        }
    }
    let not_ready_at = not_ready_at.expect("files-low before the limit");
    let (failed_at, failed) = failure.expect("commits fail at the limit");
    assert!(
        failed.contains("Too many open files"),
        "the failure is the one readiness warned of: {failed}"
    );
    assert!(
        not_ready_at + 3 < failed_at,
        "warned at batch {not_ready_at}, failed at {failed_at}"
    );
    // Every descriptor taken (idle connections take the last ones): still not ready, though
    // not even the count of descriptors can be listed then.
    let _idle: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(&server.addr).expect("connect"))
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    for _ in 0..5 {
        let events: Vec<Value> = (0..100)
            .map(|_| json!({"device": "t1", "event": {"type": "reading", "celsius": 19.0}}))
            .collect();
        let answer = api.post("/v1/events", &json!({ "events": events }));
        assert_eq!(answer.status, 200, "{}", answer.text);
        acknowledged += 100 - answer.body["failed"].as_u64().expect("failed");
        assert!(codes(&api).contains(&"files-low".to_string()));
    }
    drop(server);

    let server = Server::start(&data, &["--journal-segment-bytes", "4096"]);
    let api = server.api();
    assert_eq!(
        codes(&api),
        Vec::<String>::new(),
        "ready under a higher limit"
    );
    assert_eq!(api.get("/v1/devices/t1").body["seq"], acknowledged);
}

/// The runtime's background refresher does on its own what the test above asks for: after a
/// pass held back by an idle device's old snapshot, the device is asked for a fresh one and
/// the segments behind the old one go, its state unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_refresher_frees_what_an_idle_device_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = retaining_runtime_refreshing(
        dir.path(),
        Duration::from_millis(200),
        Some(Duration::from_millis(200)),
    )
    .await;
    rt.provision("quiet", "misbehave", &json!({}))
        .await
        .expect("provision");
    for _ in 0..10 {
        rt.send("quiet", r#"{"type":"ok"}"#).await.expect("ok");
    }
    let before: Value =
        serde_json::from_str(&rt.device("quiet").await.expect("quiet").state).expect("JSON");
    // The snapshot `quiet` takes when it passivates (after its last event) is what holds
    // retention once the busy device has written far past it.
    let quiet = rt.journal().device("quiet").expect("quiet").num;
    let start = std::time::Instant::now();
    let held = loop {
        if let Some(s) = rt.journal().snapshots(quiet).last().filter(|s| s.seq == 10) {
            break s.offset;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never passivated"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    rt.provision("busy", "misbehave", &json!({}))
        .await
        .expect("provision");
    for _ in 0..3000 {
        rt.send("busy", r#"{"type":"ok"}"#).await.expect("ok");
    }
    // Passes follow the index checkpoints; the refresher asks `quiet` for a fresh snapshot
    // and runs another pass: the segments up to (and past) its old snapshot go.
    let start = std::time::Instant::now();
    while rt.journal().retained_from() <= held {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "quiet still holds retention: {:?}",
            rt.journal().retention()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after: Value =
        serde_json::from_str(&rt.device("quiet").await.expect("quiet").state).expect("JSON");
    assert_eq!(after, before, "the same state");
    assert_eq!(
        rt.send("quiet", r#"{"type":"ok"}"#).await.expect("ok").seq,
        11
    );
    rt.shutdown().await;
}
