//! Plugins that change while the fleet runs: deploy by replay, refusal, partial failure,
//! rollback, lazy upgrade, dry-run, and which version a restart keeps current.
//!
//! The versions are real builds of the test-only `misbehave` plugin: v1 the default, v2
//! with feature `v2` (`ok` counts by two: a behavior change whose history still folds), v3
//! with feature `v3` (cannot fold a count over 4).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use drover::registry::Origin;
use drover::replay::{self, Start};
use drover::upgrade::UpgradeOutcome;
use drover::{ErrorKind, Runtime, Selection};
use serde_json::{Value, json};

mod support;

const OK: &str = r#"{"type":"ok"}"#;

async fn open(dir: &Path) -> Runtime {
    Runtime::builder(dir)
        .plugin_dir(support::PluginDir)
        .snapshot_every(8)
        .mailbox_capacity(4096)
        .open()
        .await
        .expect("runtime opens")
}

async fn count(rt: &Runtime, id: &str) -> u64 {
    let view = rt.device(id).await.expect("device reads");
    let state: Value = serde_json::from_str(&view.state).expect("state is JSON");
    state["count"].as_u64().expect("count")
}

/// Waits (up to 5 s) until every instance is passivated.
async fn until_passivated(rt: &Runtime) {
    for _ in 0..100 {
        if rt.metrics().live_instances.load(Ordering::Relaxed) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Registers misbehave's `v2` build as an upload.
async fn register_v2(rt: &Runtime) -> drover::PluginVersion {
    support::upload_misbehave(rt, support::misbehave_variant("v2"))
        .await
        .0
}

/// A runtime whose idle devices passivate within a tenth of a second.
async fn open_passivating(dir: &Path) -> Runtime {
    Runtime::builder(dir)
        .plugin_dir(support::PluginDir)
        .snapshot_every(8)
        .idle_timeout(Duration::from_millis(100))
        .open()
        .await
        .unwrap()
}

fn version(rt: &Runtime, id: &str) -> u32 {
    rt.summary(id).expect("device").version
}

/// The device's live state equals a replay of its whole journal from `init` by the version
/// it is bound to, read beside the running server.
async fn assert_live_equals_full_replay(rt: &Runtime, dir: &Path, id: &str) {
    let live = rt.device(id).await.expect("device reads");
    let replayed = replay::offline(dir, id, None, Start::Genesis).expect("offline replay");
    assert_eq!(live.summary.seq, replayed.seq, "{id}");
    assert_eq!(
        serde_json::from_str::<Value>(&live.state).unwrap(),
        serde_json::from_str::<Value>(&replayed.state).unwrap(),
        "{id}: live state differs from a full replay"
    );
}

/// A live device removed while a deploy runs is reported `removed`, not as a failed commit:
/// a review removed 200 devices during a deploy and got lines saying "the new binding was
/// not made durable (a failed commit)", a failed journal check, and totals of 0 failed. So
/// is one removed and provisioned again under its id: that is another device, which the
/// deploy did not move (a second review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_removed_while_a_deploy_runs_is_reported_removed_not_failed() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::builder(dir.path())
        .plugin_dir(support::PluginDir)
        .call_timeout(Duration::from_secs(5))
        .open()
        .await
        .unwrap();
    for id in ["gone", "back", "slow", "stays"] {
        rt.provision(id, "misbehave", &json!({})).await.unwrap();
        rt.send(id, OK).await.unwrap();
    }
    let spin = support::spins_for(&rt, "slow", 1.5).await;
    let v2 = register_v2(&rt).await;
    // The deploy's upgrade of `slow` waits behind this event in its mailbox: the deploy
    // runs for as long, and `gone` is upgraded and removed meanwhile.
    let slow_event = tokio::spawn({
        let rt = rt.clone();
        async move { rt.send("slow", &support::slow_apply(spin, 1)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let deploy = tokio::spawn({
        let rt = rt.clone();
        async move { rt.deploy("misbehave", v2.version, false).await }
    });
    let started = std::time::Instant::now();
    while version(&rt, "gone") != v2.version || version(&rt, "back") != v2.version {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never upgraded"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    rt.remove_device("gone", false).await.unwrap();
    rt.remove_device("back", false).await.unwrap();
    rt.provision("back", "misbehave", &json!({})).await.unwrap();
    assert!(!deploy.is_finished(), "removed while the deploy runs");
    let report = deploy.await.unwrap().expect("deploys");
    slow_event
        .await
        .unwrap()
        .expect("the slow event is handled");
    let line = |id: &str| {
        report
            .devices
            .iter()
            .find(|d| d.device == id)
            .unwrap_or_else(|| panic!("{id} listed: {report:?}"))
    };
    for id in ["gone", "back"] {
        assert_eq!(line(id).outcome, UpgradeOutcome::Removed, "{report:?}");
        assert_eq!(line(id).error, None);
    }
    assert_eq!(line("slow").outcome, UpgradeOutcome::Upgraded);
    assert_eq!(line("stays").outcome, UpgradeOutcome::Upgraded);
    assert!(report.journal_check.ok, "{:?}", report.journal_check);
    let t = &report.totals;
    assert_eq!((t.devices, t.live, t.removed), (3, 4, 2), "{t:?}");
    assert_eq!((t.upgraded, t.failed), (2, 0), "{t:?}");
    // The new `back`, provisioned on the current version while the deploy ran.
    assert_eq!(t.upgraded_at_activation, 1, "{t:?}");
    assert_eq!(version(&rt, "slow"), v2.version);
    rt.shutdown().await;
}

/// A deploy's totals count every device of the plugin once, those that came to the new
/// version by an activation while the deploy ran included (a fresh-user trial saw 10 of 23
/// accounted for with a live cap of 5 under load: the others had been upgraded at their
/// activations meanwhile and fell in no total).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_counts_every_device_once_even_those_that_activate_while_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::builder(dir.path())
        .plugin_dir(support::PluginDir)
        .max_live_instances(4)
        .mailbox_capacity(4096)
        .open()
        .await
        .expect("runtime opens");
    let ids: Arc<Vec<String>> = Arc::new((0..24).map(|i| format!("a-{i:02}")).collect());
    for id in ids.iter() {
        rt.provision(id, "misbehave", &json!({})).await.unwrap();
        rt.send(id, OK).await.unwrap();
    }
    rt.register_plugin(
        "misbehave",
        support::misbehave_variant("v2"),
        Origin::Upload,
    )
    .await
    .unwrap();
    // Load over every device: with 4 live at most, devices keep passivating and activating,
    // so some activate (and move to v2 at activation) while the deploy runs.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (rt, ids, stop) = (rt.clone(), ids.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                rt.send(&ids[i % ids.len()], OK)
                    .await
                    .expect("acknowledged");
                i += 4;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = rt.deploy("misbehave", 2, false).await.expect("deploy");
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let t = &report.totals;
    assert_eq!(t.devices, 24);
    assert_eq!(
        t.upgraded
            + t.failed
            + t.unchanged
            + t.cannot_fold
            + t.pending_lazy
            + t.not_tried
            + t.upgraded_at_activation,
        t.devices,
        "every device counted once: {t:?}"
    );
    rt.shutdown().await;
}

/// Acceptance 2: while clients send events to 1,000 devices, deploying v2 moves every live
/// device; every acknowledged event is in the journal exactly once and in order; afterwards
/// each device runs v2, its state equals a full replay under v2, and the new behavior is live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_under_load_moves_every_live_device_and_loses_no_event() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    let ids: Arc<Vec<String>> = Arc::new((0..1000).map(|i| format!("m-{i:04}")).collect());
    for id in ids.iter() {
        rt.provision(id, "misbehave", &json!({})).await.unwrap();
        rt.send(id, OK).await.unwrap();
    }
    let (v2, new) = rt
        .register_plugin(
            "misbehave",
            support::misbehave_variant("v2"),
            Origin::Upload,
        )
        .await
        .unwrap();
    assert!(new);
    assert_eq!(v2.version, 2);
    assert_eq!(
        rt.current_version("misbehave"),
        Some(1),
        "an upload does not change what devices run"
    );

    // Load: 8 clients, each over its own slice of the devices, recording every ack.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..8 {
        let (rt, ids, stop) = (rt.clone(), ids.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut acks: Vec<(String, u64, Vec<String>, std::time::Instant)> = Vec::new();
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                let id = &ids[i % ids.len()];
                i += 8;
                let ack = rt.send(id, OK).await.expect("event acknowledged");
                acks.push((
                    id.clone(),
                    ack.seq,
                    ack.transitions,
                    std::time::Instant::now(),
                ));
            }
            acks
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deploying = std::time::Instant::now();
    let report = rt.deploy("misbehave", 2, false).await.expect("deploy");
    let deployed = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acks = Vec::new();
    for c in clients {
        acks.extend(c.await.unwrap());
    }

    assert_eq!((report.from, report.to), (1, 2));
    assert_eq!(report.totals.devices, 1000);
    assert_eq!(report.totals.failed, 0, "{:?}", report.devices);
    assert_eq!(report.totals.upgraded, report.totals.live);
    assert!(report.totals.upgraded > 900, "{:?}", report.totals);
    assert!(report.journal_check.ok, "{:?}", report.journal_check);
    assert_eq!(report.sample.totals.cannot_fold, 0);
    assert!(
        report.sample.totals.diverged > 0,
        "v2 decides differently on recorded events: {:?}",
        report.sample.totals
    );
    // Counted by when, not how many: a slow disk makes fewer acks in the same time.
    let during = acks
        .iter()
        .filter(|a| (deploying..deployed).contains(&a.3))
        .count();
    assert!(during > 0, "the load ran during the deploy");

    // Every acknowledged event is in the journal exactly once, at its seq, in order.
    let mut per_device: HashMap<&str, Vec<(u64, &Vec<String>)>> = HashMap::new();
    for (id, seq, transitions, _) in &acks {
        per_device.entry(id).or_default().push((*seq, transitions));
    }
    for id in ids.iter() {
        let page = rt.journal_page(id, 1, 1000).expect("journal");
        let acked = per_device.remove(id.as_str()).unwrap_or_default();
        // The provisioning-time event plus every ack, nothing else.
        assert_eq!(page.records.len(), acked.len() + 1, "{id}");
        for (i, r) in page.records.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1, "{id}: seqs are dense");
        }
        for (seq, transitions) in acked {
            assert_eq!(
                &page.records[seq as usize - 1].transitions,
                transitions,
                "{id} seq {seq}"
            );
        }
        assert_eq!(version(&rt, id), 2, "{id} runs v2");
    }

    // The new behavior is live and the state kept: `ok` now adds two.
    let before = count(&rt, "m-0007").await;
    rt.send("m-0007", OK).await.unwrap();
    assert_eq!(count(&rt, "m-0007").await, before + 2);
    for id in ["m-0000", "m-0007", "m-0500", "m-0999"] {
        assert_live_equals_full_replay(&rt, dir.path(), id).await;
    }
    rt.shutdown().await;
}

/// Acceptance 3: a version whose replay traps for some devices is refused unless forced;
/// forced, those devices stay on their version and are listed with the seq, the rest
/// upgrade; rollback brings everyone back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_cannot_fold_some_histories_is_refused_then_partial_then_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    let v2 = register_v2(&rt).await;
    rt.deploy("misbehave", v2.version, false).await.unwrap();
    // Under v2: two `ok`s count to 4 (v3 folds it), three count to 6 (v3 traps at seq 3).
    for i in 0..12 {
        let id = format!("d-{i:02}");
        rt.provision(&id, "misbehave", &json!({})).await.unwrap();
        for _ in 0..(if i < 6 { 2 } else { 3 }) {
            rt.send(&id, OK).await.unwrap();
        }
    }
    let (v3, _) = support::upload_misbehave(&rt, support::misbehave_variant("v3")).await;

    let refused = rt.deploy("misbehave", v3.version, false).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::DeployRefused, "{refused}");
    assert!(refused.to_string().contains("at seq 3"), "{refused}");
    assert_eq!(rt.current_version("misbehave"), Some(2), "nothing changed");
    assert!((0..12).all(|i| version(&rt, &format!("d-{i:02}")) == 2));

    let report = rt.deploy("misbehave", v3.version, true).await.unwrap();
    assert!(report.forced);
    assert_eq!(report.totals.upgraded, 6, "{:?}", report.devices);
    assert_eq!(report.totals.failed, 6, "{:?}", report.devices);
    for d in &report.devices {
        let i: usize = d.device[2..].parse().unwrap();
        if i < 6 {
            assert_eq!(d.outcome, UpgradeOutcome::Upgraded, "{d:?}");
        } else {
            assert_eq!(d.outcome, UpgradeOutcome::Failed, "{d:?}");
            assert_eq!(d.failed_seq, Some(3), "{d:?}");
            assert!(
                d.error.as_deref().unwrap().contains("count over 4"),
                "{d:?}"
            );
        }
    }
    assert_eq!(report.totals.pending_lazy, 0);
    // The pause figures count every mailbox the deploy held, the failed devices' too.
    assert_eq!(
        Some(report.pause_max_us),
        report.devices.iter().map(|d| d.pause_us).max(),
        "{:?}",
        report.devices
    );
    // A device left on v2 keeps working on v2.
    let before = count(&rt, "d-09").await;
    rt.send("d-09", OK).await.unwrap();
    assert_eq!(count(&rt, "d-09").await, before + 2);
    assert_eq!(version(&rt, "d-09"), 2);
    assert_eq!(version(&rt, "d-00"), 3);
    // The ones left behind say where they are headed, and that nothing moves them now.
    let upgrade = |id: &str| rt.summary(id).and_then(|d| d.upgrade);
    assert_eq!(
        upgrade("d-09"),
        Some(drover::PendingUpgrade {
            to: 3,
            failed: true
        })
    );
    assert_eq!(upgrade("d-00"), None, "on the current version");

    assert_eq!(
        (
            report.totals.unchanged,
            report.totals.cannot_fold,
            report.totals.pending_lazy
        ),
        (0, 0, 0),
        "{:?}",
        report.totals
    );
    let back = rt.rollback("misbehave", false).await.unwrap();
    assert!(back.rollback);
    assert_eq!((back.from, back.to), (3, 2));
    assert_eq!(back.totals.upgraded, 6, "{:?}", back.devices);
    assert_eq!(back.totals.failed, 0);
    assert_eq!(back.totals.unchanged, 6, "the ones left on v2 are counted");
    assert_eq!(rt.current_version("misbehave"), Some(2));
    for i in 0..12 {
        let id = format!("d-{i:02}");
        assert_eq!(version(&rt, &id), 2, "{id}");
        assert_eq!(upgrade(&id), None, "{id}");
        assert_live_equals_full_replay(&rt, dir.path(), &id).await;
    }
    // Back to v1, and nothing further to roll back to.
    rt.rollback("misbehave", false).await.unwrap();
    assert_eq!(rt.current_version("misbehave"), Some(1));
    let none = rt.rollback("misbehave", false).await.unwrap_err();
    assert_eq!(none.kind(), ErrorKind::DeployRefused);
    rt.shutdown().await;
}

/// Provisions misbehave devices `s-00` .. (`devices` of them), each sent 5 `ok` events (a
/// count of 5, which misbehave's `v4` spins for ever folding).
async fn counted_to_five(rt: &Runtime, devices: usize) {
    let sends = (0..devices).map(|i| {
        let rt = rt.clone();
        async move {
            let id = format!("s-{i:02}");
            rt.provision(&id, "misbehave", &json!({})).await.unwrap();
            for _ in 0..5 {
                rt.send(&id, OK).await.unwrap();
            }
        }
    });
    futures::future::join_all(sends).await;
}

/// `DEVICES` live misbehave devices that each counted to 5, which misbehave's `v4` spins
/// for ever folding, and `v4` uploaded (not deployed).
async fn fleet_v4_cannot_fold(dir: &Path, activation: Duration) -> (Runtime, u32) {
    let rt = Runtime::builder(dir)
        .plugin_dir(support::PluginDir)
        .activation_timeout(activation)
        .actor_threads(2)
        .mailbox_capacity(4096)
        .open()
        .await
        .expect("runtime opens");
    counted_to_five(&rt, DEVICES).await;
    let (v4, _) = support::upload_misbehave(&rt, support::misbehave_variant("v4")).await;
    (rt, v4.version)
}

const DEVICES: usize = 80;

/// A forced deploy of misbehave's version `v` in a task of its own, to act while it runs.
fn spawn_forced_deploy(
    rt: &Runtime,
    v: u32,
) -> tokio::task::JoinHandle<Result<drover::DeployReport, drover::Error>> {
    let rt = rt.clone();
    tokio::spawn(async move { rt.deploy("misbehave", v, true).await })
}

/// A forced deploy of a version whose fold spins does not spend the activation budget on
/// every live device in turn (each device's events waiting all the while): devices the
/// sample or the fold check already found unable to fold are not folded again, and past a
/// few slow failures in a row the version is tried on no more devices. Nothing moves,
/// nothing is lost, and the devices keep working on their version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_deploy_of_a_version_that_spins_in_its_fold_stops_folding_it() {
    let dir = tempfile::tempdir().unwrap();
    let (rt, v4) = fleet_v4_cannot_fold(dir.path(), Duration::from_millis(200)).await;
    // Unforced, it is refused once three sampled devices in a row ran out of time, saying
    // so and what forcing it would do.
    // (A sampled device the server lacked a core for, on a busy machine, refuses it as
    // overloaded instead: nothing was proved.)
    let refused = rt.deploy("misbehave", v4, false).await.unwrap_err();
    let why = refused.to_string();
    match refused.kind() {
        ErrorKind::DeployRefused => assert!(
            why.contains("ran out of time") && why.contains("given up after 3"),
            "{why}"
        ),
        ErrorKind::Overloaded => {}
        other => panic!("{other:?}: {why}"),
    }
    assert_eq!(rt.current_version("misbehave"), Some(1));
    let report = rt.deploy("misbehave", v4, true).await.unwrap();
    assert_eq!(report.devices.len(), DEVICES, "every device was live");
    assert_eq!(report.totals.upgraded, 0, "{:?}", report.totals);
    let said = |d: &drover::upgrade::DeviceUpgrade, what: &str| {
        d.error.as_deref().is_some_and(|e| e.contains(what))
    };
    let known: Vec<_> = report
        .devices
        .iter()
        .filter(|d| said(d, "found by the deploy's check"))
        .collect();
    let not_tried = report
        .devices
        .iter()
        .filter(|d| said(d, "not tried"))
        .count();
    let folded = report
        .devices
        .iter()
        .filter(|d| {
            d.outcome == UpgradeOutcome::Failed && !said(d, "found by") && !said(d, "not tried")
        })
        .count();
    // Put off: the server lacked a core for the fold (a busy test machine), nothing known.
    let put_off = report
        .devices
        .iter()
        .filter(|d| d.outcome == UpgradeOutcome::Lazy && said(d, "tried again"))
        .count();
    // The sample's: it stopped after three devices in a row ran out of time (but those
    // whose dry-run lacked a core).
    let slow = drover::SLOW_FAILURES_BEFORE_STOPPING;
    let unchecked = report
        .sample
        .devices
        .iter()
        .filter(|d| d.overloaded)
        .count();
    assert!(known.len() + unchecked >= slow, "{:?}", report.devices);
    assert!(
        report.sample.devices.len() < drover::DEPLOY_SAMPLE,
        "{:?}",
        report.sample
    );
    assert!(
        known
            .iter()
            .all(|d| d.outcome == UpgradeOutcome::Failed && d.seq == 5 && d.pause_us == 0),
        "{known:?}"
    );
    // The sample saw the version run out of time: one device at a time, and none after
    // three slow failures.
    assert!(folded <= slow, "{folded} folded: {:?}", report.devices);
    assert!(not_tried >= 1 || folded < slow, "{:?}", report.devices);
    assert_eq!(
        known.len() + not_tried + folded + put_off,
        DEVICES,
        "{:?}",
        report.devices
    );
    // Those not tried stay on their version as if it had failed on them: not tried at
    // their activation either.
    assert_eq!(report.totals.pending_lazy, put_off, "{:?}", report.totals);
    assert_eq!(
        report.totals.failed,
        DEVICES - put_off,
        "{:?}",
        report.totals
    );
    assert_eq!(
        rt.metrics().upgrades_not_tried.load(Ordering::Relaxed),
        not_tried as u64
    );
    // A deploy of the same version again tries afresh, and names each device's own version
    // as the one it comes from (the plugin's current one is already the target).
    let again = rt.deploy("misbehave", v4, true).await.unwrap();
    assert_eq!(again.from, again.to);
    assert_eq!(again.devices.len(), DEVICES, "{:?}", again.totals);
    assert!(
        again
            .devices
            .iter()
            .all(|d| d.from == 1 && d.to == again.to),
        "{:?}",
        again.devices
    );
    assert_eq!(again.totals.upgraded, 0, "{:?}", again.totals);
    for i in [0, DEVICES / 2, DEVICES - 1] {
        let id = format!("s-{i:02}");
        assert_eq!(version(&rt, &id), 1, "{id}");
        rt.send(&id, OK).await.unwrap();
        assert_eq!(count(&rt, &id).await, 6, "{id}");
        assert_live_equals_full_replay(&rt, dir.path(), &id).await;
    }
    rt.shutdown().await;
}

/// Devices behind on a version whose fold spins, activating together, do not wait for each
/// other's folds: they fold it one at a time, a device whose turn does not come soon comes up
/// on its own version and answers its event, and after three slow failures in a row the
/// version is tried on no more devices. (They used to fold it all at once on the slow lane,
/// taking turns at its thread: 20 devices' first events each waited for all 20 folds.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_activating_together_on_a_version_that_spins_fold_it_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::builder(dir.path())
        .plugin_dir(support::PluginDir)
        .activation_timeout(Duration::from_millis(300))
        .idle_timeout(Duration::from_millis(100))
        .mailbox_capacity(4096)
        .open()
        .await
        .expect("runtime opens");
    counted_to_five(&rt, DEVICES).await;
    until_passivated(&rt).await;
    let (v4, _) = support::upload_misbehave(&rt, support::misbehave_variant("v4")).await;
    // The checks fold a part of the passivated fleet (each fold spins for its whole budget);
    // the rest are left to their activation.
    let report = rt.deploy("misbehave", v4.version, true).await.unwrap();
    assert_eq!(report.totals.live, 0, "{:?}", report.totals);
    let pending = |failed| {
        Some(drover::PendingUpgrade {
            to: v4.version,
            failed,
        })
    };
    let upgrade = |id: &str| rt.summary(id).and_then(|d| d.upgrade);
    let behind: Vec<String> = (0..DEVICES)
        .map(|i| format!("s-{i:02}"))
        .filter(|id| upgrade(id) == pending(false))
        .collect();
    assert!(behind.len() >= 24, "{:?}", report.totals);
    let (burst, later) = behind.split_at(20);

    let failures = || rt.metrics().upgrade_failures.load(Ordering::Relaxed);
    let not_tried = || rt.metrics().upgrades_not_tried.load(Ordering::Relaxed);
    let before = failures();
    let started = std::time::Instant::now();
    let answered = futures::future::join_all(burst.iter().map(|id| {
        let rt = rt.clone();
        async move { rt.send(id, OK).await }
    }))
    .await;
    eprintln!("20 first events answered in {:?}", started.elapsed());
    // Events each device handled, of those sent.
    let mut sent: std::collections::HashMap<String, u64> = Default::default();
    for (id, r) in burst.iter().zip(&answered) {
        assert!(r.is_ok(), "{id}: {r:?}");
        assert_eq!(version(&rt, id), 1, "{id}");
        sent.insert(id.clone(), 6);
    }
    let slow = drover::SLOW_FAILURES_BEFORE_STOPPING as u64;
    assert!(
        failures() - before <= slow,
        "{} folds of the version ran",
        failures() - before
    );

    // Their next activations try it again, one at a time, until it is given up. (A fold the
    // server lacked a core for, on a busy machine, says nothing and is put off again.)
    for _round in 0..5 {
        let left: Vec<&String> = burst
            .iter()
            .filter(|id| upgrade(id) == pending(false))
            .collect();
        if left.is_empty() {
            break;
        }
        until_passivated(&rt).await;
        for id in left {
            rt.send(id, OK).await.expect("handled on its own version");
            assert_eq!(version(&rt, id), 1, "{id}");
            *sent.entry(id.clone()).or_default() += 1;
        }
    }
    assert_eq!(failures() - before, slow, "three slow failures, no more");
    assert!(
        burst.iter().all(|id| upgrade(id) == pending(true)),
        "every device stays on its version, recorded as failed"
    );
    // Each of the others is counted as it activates after the give-up: all of them, unless
    // a busy machine put one's turn off (it came up on its own version, and shows the
    // give-up at once, like a device that has not activated since: counted at its next
    // activation).
    let counted = not_tried();
    assert!(counted <= burst.len() as u64 - slow, "{counted}");
    // Given up for the devices that have not activated since, too: they say so at once.
    assert_eq!(upgrade(&later[1]), pending(true));
    rt.send(&later[0], OK).await.expect("handled");
    assert_eq!(upgrade(&later[0]), pending(true));
    assert_eq!(failures() - before, slow);
    assert_eq!(not_tried(), counted + 1);
    assert_eq!(count(&rt, &later[0]).await, 6);
    for id in burst {
        assert_eq!(count(&rt, id).await, sent[id], "{id}: no event lost");
    }
    assert_live_equals_full_replay(&rt, dir.path(), &later[0]).await;
    rt.shutdown().await;
}

/// The deploy's fold check stays within its budget (`FOLD_CHECK_BUDGET`, 2 s): a fold of a
/// version that spins started near its end gets only what is left, and one cut short so
/// proves nothing (its device is left to its activation, not marked unable to fold). It
/// used to get the whole activation budget and overrun the check by that much.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fold_check_stays_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::builder(dir.path())
        .plugin_dir(support::PluginDir)
        .call_timeout(Duration::from_millis(50))
        .activation_timeout(Duration::from_millis(1500))
        .idle_timeout(Duration::from_millis(100))
        .open()
        .await
        .expect("runtime opens");
    counted_to_five(&rt, 24).await;
    until_passivated(&rt).await;
    let (v4, _) = support::upload_misbehave(&rt, support::misbehave_variant("v4")).await;
    let report = rt.deploy("misbehave", v4.version, true).await.unwrap();
    let sampled_unfoldable = report
        .sample
        .devices
        .iter()
        .filter(|d| !d.folds && !d.overloaded)
        .count();
    // The first fold outside the sample spins for its whole 1.5 s budget; the next gets what
    // is left of the check's 2 s and is cut short.
    assert!(report.totals.fold_checked <= 1, "{:?}", report.totals);
    assert!(
        report.totals.cannot_fold <= sampled_unfoldable + 1,
        "{:?}",
        report.totals
    );
    eprintln!(
        "deploy {} ms, of which the sample {} ms",
        report.elapsed_ms, report.sample.elapsed_ms
    );
    // Those left are tried at their activation, with the whole budget (and found unable).
    let behind: Vec<String> = (0..24)
        .map(|i| format!("s-{i:02}"))
        .filter(|id| {
            rt.summary(id)
                .and_then(|d| d.upgrade)
                .is_some_and(|u| !u.failed)
        })
        .collect();
    assert!(!behind.is_empty());
    rt.send(&behind[0], OK)
        .await
        .expect("handled on its own version");
    assert_eq!(version(&rt, &behind[0]), 1);
    assert_eq!(
        rt.summary(&behind[0])
            .and_then(|d| d.upgrade)
            .map(|u| u.failed),
        Some(true)
    );
    rt.shutdown().await;
}

/// A server that starts to stop (before it drains its connections) stops such a deploy's
/// folds: the one under way ends, no other starts, the deploy answers at once, events go on
/// being served meanwhile, and each device stays on its version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_server_stops_a_deploy_folding_a_version_that_spins() {
    let dir = tempfile::tempdir().unwrap();
    // One fold at a time (the checks saw the version spin), 6 s of CPU each, up to three.
    let (rt, v4) = fleet_v4_cannot_fold(dir.path(), Duration::from_secs(6)).await;
    let deploy = spawn_forced_deploy(&rt, v4);
    // The version is pointed at right before the live devices get their upgrades.
    while rt.current_version("misbehave") != Some(v4) {
        assert!(!deploy.is_finished(), "{:?}", deploy.await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    rt.stop_upgrades();
    let report = deploy.await.unwrap().unwrap();
    let took = started.elapsed();
    // The fold under way had over 5 s of its budget left.
    assert!(
        took < Duration::from_secs(4),
        "the deploy ended {took:?} after the stop"
    );
    assert_eq!(report.totals.upgraded, 0, "{:?}", report.totals);
    let stopped = report
        .devices
        .iter()
        .filter(|d| {
            d.outcome == UpgradeOutcome::Lazy
                && d.error
                    .as_deref()
                    .is_some_and(|e| e.contains("shutting down"))
        })
        .count();
    assert!(stopped > 0, "{:?}", report.devices);
    // Still serving, on the old version.
    rt.send("s-07", OK).await.unwrap();
    assert_eq!(version(&rt, "s-07"), 1);
    rt.shutdown().await;
    drop(rt);
    let rt = open(dir.path()).await;
    for i in 0..DEVICES {
        let id = format!("s-{i:02}");
        assert_eq!(version(&rt, &id), 1, "{id}");
    }
    assert_eq!(count(&rt, "s-07").await, 6);
    assert_live_equals_full_replay(&rt, dir.path(), "s-07").await;
    rt.shutdown().await;
}

/// A server that starts to stop while the deploy's checks run changes nothing: the version
/// is not made current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_whose_checks_a_stop_overtakes_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (rt, v4) = fleet_v4_cannot_fold(dir.path(), Duration::from_millis(300)).await;
    let deploy = spawn_forced_deploy(&rt, v4);
    // The sample alone takes 16 calls of 250 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped = std::time::Instant::now();
    rt.stop_upgrades();
    let err = deploy.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ShuttingDown, "{err}");
    // The sample stops before its next device (each fails within its 300 ms budget; the
    // whole sample and fold check would take 5-7 s).
    let took = stopped.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "answered {took:?} after the stop"
    );
    assert_eq!(rt.current_version("misbehave"), Some(1));
    rt.shutdown().await;
}

/// A device quarantined under the version being left is let out by the deploy: the version
/// that failed it is no longer current, and its next event runs on the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_ends_the_quarantines_earned_under_the_version_it_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    // Built and registered first: the quarantine lasts 5 s (±25%).
    let v2 = register_v2(&rt).await;
    rt.provision("q", "misbehave", &json!({})).await.unwrap();
    rt.send("q", OK).await.unwrap();
    for i in 0..3 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let err = rt.send("q", r#"{"type":"panic"}"#).await.unwrap_err();
        assert_eq!(err.code(), "trap", "failure {i}: {err}");
    }
    let err = rt.send("q", OK).await.unwrap_err();
    assert_eq!(err.code(), "quarantined", "{err}");
    assert_eq!(rt.status("q"), drover::view::DeviceStatus::Quarantined);

    let report = rt.deploy("misbehave", v2.version, false).await.unwrap();
    assert_eq!(report.totals.quarantines_ended, 1, "{:?}", report.totals);
    assert_eq!(report.totals.pending_lazy, 1, "{:?}", report.totals);
    assert_ne!(rt.status("q"), drover::view::DeviceStatus::Quarantined);
    // v2 counts by two: the event ran on the new version.
    rt.send("q", OK).await.unwrap();
    assert_eq!(version(&rt, "q"), 2);
    assert_eq!(count(&rt, "q").await, 3);
    assert_live_equals_full_replay(&rt, dir.path(), "q").await;
    rt.shutdown().await;
}

/// Failures counted under a version say nothing of the next: a device whose quarantine ran
/// out before the deploy (so the deploy had none to end) starts its count afresh on the new
/// version, and so do failures a rollback moves a device away from before they reached a
/// quarantine. (One trap on the new version used to quarantine it again, for twice as long.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_device_counts_its_failures_afresh_on_the_new_version() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    let v2 = register_v2(&rt).await;
    rt.provision("q", "misbehave", &json!({})).await.unwrap();
    rt.send("q", OK).await.unwrap();
    let trap = |why: &'static str| {
        let rt = rt.clone();
        async move {
            let err = rt.send("q", r#"{"type":"panic"}"#).await.unwrap_err();
            assert_eq!(err.code(), "trap", "{why}: {err}");
        }
    };
    for _ in 0..3 {
        trap("under v1").await;
    }
    assert_eq!(rt.status("q"), drover::view::DeviceStatus::Quarantined);
    // The first quarantine lasts 5 s ±25%.
    let ran_out = std::time::Instant::now() + Duration::from_secs(8);
    while rt.status("q") == drover::view::DeviceStatus::Quarantined {
        assert!(
            std::time::Instant::now() < ran_out,
            "the quarantine never ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = rt.deploy("misbehave", v2.version, false).await.unwrap();
    assert_eq!(report.totals.quarantines_ended, 0, "{:?}", report.totals);
    trap("one failure under v2").await;
    // v2 counts by two: the event ran on the new version, whose count had one failure.
    rt.send("q", OK).await.unwrap();
    assert_eq!(version(&rt, "q"), 2);
    assert_eq!(count(&rt, "q").await, 3);

    // Two failures under v2, then a rollback: one more under v1 is its first there.
    trap("first under v2").await;
    trap("second under v2").await;
    rt.rollback("misbehave", false).await.unwrap();
    trap("one failure back under v1").await;
    rt.send("q", OK).await.unwrap();
    assert_eq!(version(&rt, "q"), 1);
    assert_eq!(count(&rt, "q").await, 4);
    assert_live_equals_full_replay(&rt, dir.path(), "q").await;
    rt.shutdown().await;
}

/// Passivated devices whose history the deploy's sample could not fold stay on their version
/// and say so at once (`upgrade.failed`), and their next activation does not fold the whole
/// history again to fail the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passivated_devices_the_sample_cannot_fold_are_marked_failed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open_passivating(dir.path()).await;
    let v2 = register_v2(&rt).await;
    rt.deploy("misbehave", v2.version, false).await.unwrap();
    // Under v2: one `ok` counts to 2 (v3 folds it, and takes one more), three count to 6
    // (v3 traps at seq 3).
    for i in 0..4 {
        let id = format!("c-{i:02}");
        rt.provision(&id, "misbehave", &json!({})).await.unwrap();
        for _ in 0..(if i < 2 { 1 } else { 3 }) {
            rt.send(&id, OK).await.unwrap();
        }
    }
    until_passivated(&rt).await;
    let (v3, _) = support::upload_misbehave(&rt, support::misbehave_variant("v3")).await;
    let report = rt.deploy("misbehave", v3.version, true).await.unwrap();
    assert_eq!(report.totals.live, 0, "{report:?}");
    assert_eq!(report.totals.cannot_fold, 2, "{:?}", report.totals);
    let upgrade = |id: &str| rt.summary(id).and_then(|d| d.upgrade);
    let pending = |failed| {
        Some(drover::PendingUpgrade {
            to: v3.version,
            failed,
        })
    };
    assert_eq!(
        upgrade("c-03"),
        pending(true),
        "the sample found it cannot fold"
    );
    assert_eq!(
        upgrade("c-00"),
        pending(false),
        "moves at its next activation"
    );

    let failures = rt.metrics().upgrade_failures.load(Ordering::Relaxed);
    rt.send("c-03", OK)
        .await
        .expect("handled on its own version");
    assert_eq!(version(&rt, "c-03"), 2);
    assert_eq!(
        rt.metrics().upgrade_failures.load(Ordering::Relaxed),
        failures,
        "its activation did not fold the history again"
    );
    rt.send("c-00", OK).await.expect("handled");
    assert_eq!(version(&rt, "c-00"), v3.version);
    assert_eq!(upgrade("c-00"), None);
    rt.shutdown().await;
    drop(rt);

    // A restart remembers: the failed device is not folded again at its activation (a
    // version that spins would cost it the whole activation budget after every restart).
    let rt = open_passivating(dir.path()).await;
    let upgrade = |id: &str| rt.summary(id).and_then(|d| d.upgrade);
    assert_eq!(
        upgrade("c-03"),
        pending(true),
        "still known after a restart"
    );
    rt.send("c-03", OK)
        .await
        .expect("handled on its own version");
    assert_eq!(version(&rt, "c-03"), 2);
    assert_eq!(
        rt.metrics().upgrade_failures.load(Ordering::Relaxed),
        0,
        "its activation after the restart did not fold the history again"
    );
    // A deploy of the same version again checks afresh (and finds the same).
    until_passivated(&rt).await;
    let again = rt.deploy("misbehave", v3.version, true).await.unwrap();
    assert_eq!(again.totals.cannot_fold, 2, "{:?}", again.totals);
    assert_eq!(upgrade("c-03"), pending(true));
    // A backup carries the record: a server started on the copy does not fold it again.
    let copy_root = tempfile::tempdir().unwrap();
    let copy = copy_root.path().join("copy");
    let source = dir.path().to_path_buf();
    let to = copy.clone();
    tokio::task::spawn_blocking(move || drover::backup::backup(&source, &to))
        .await
        .unwrap()
        .expect("backup");
    rt.shutdown().await;
    drop(rt);
    let restored = open_passivating(&copy).await;
    assert_eq!(
        restored.summary("c-03").and_then(|d| d.upgrade),
        pending(true),
        "known in the backup"
    );
    restored
        .send("c-03", OK)
        .await
        .expect("handled on its own version");
    assert_eq!(version(&restored, "c-03"), 2);
    assert_eq!(
        restored.metrics().upgrade_failures.load(Ordering::Relaxed),
        0,
        "its activation on the copy did not fold the history again"
    );
    restored.shutdown().await;
    drop(restored);

    // The record is a cache: damaged, it is ignored, and the device tries once more.
    std::fs::write(
        dir.path().join("plugins/upgrade-failures.json"),
        b"{not json",
    )
    .unwrap();
    let rt = open_passivating(dir.path()).await;
    let upgrade = |id: &str| rt.summary(id).and_then(|d| d.upgrade);
    assert_eq!(
        upgrade("c-03"),
        pending(false),
        "forgotten with the damaged file"
    );
    rt.send("c-03", OK)
        .await
        .expect("handled on its own version");
    assert_eq!(version(&rt, "c-03"), 2);
    assert_eq!(rt.metrics().upgrade_failures.load(Ordering::Relaxed), 1);
    assert_eq!(upgrade("c-03"), pending(true), "found again");
    rt.shutdown().await;
}

/// A passivated device outside the deploy's sample whose history the version cannot fold
/// refuses the deploy too (it found none before: the sample is always the same 16 devices,
/// and such a device stayed on its old version at its next activation while the deploy
/// reported success); forced, the deploy leaves it on its version at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passivated_device_the_sample_misses_is_checked_before_the_deploy() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open_passivating(dir.path()).await;
    let v2 = register_v2(&rt).await;
    rt.deploy("misbehave", v2.version, false).await.unwrap();
    // Under v2 one `ok` counts to 2 (v3 folds it); three count to 6 (v3 traps at seq 3). Of
    // 40 devices the sample takes every 2.5th by id: c-01 is not one of them.
    for i in 0..40 {
        let id = format!("c-{i:02}");
        rt.provision(&id, "misbehave", &json!({})).await.unwrap();
        for _ in 0..(if i == 1 { 3 } else { 1 }) {
            rt.send(&id, OK).await.unwrap();
        }
    }
    until_passivated(&rt).await;
    let (v3, _) = support::upload_misbehave(&rt, support::misbehave_variant("v3")).await;
    let diff = rt
        .dry_run(
            "misbehave",
            v3.version,
            Selection::Sample(drover::DEPLOY_SAMPLE),
        )
        .await
        .unwrap();
    assert!(
        diff.devices.iter().all(|d| d.device != "c-01" && d.folds),
        "the sample misses it: {:?}",
        diff.devices
    );
    // Asked about it, the dry run blames the candidate, not the device's own version.
    let diff = rt
        .dry_run(
            "misbehave",
            v3.version,
            Selection::Devices(vec!["c-01".into()]),
        )
        .await
        .unwrap();
    let error = diff.devices[0].error.as_deref().unwrap_or_default();
    // It decides otherwise (from its own count), and fails only folding.
    assert_eq!(
        (diff.devices[0].failed_events, diff.totals.failed_to_decide),
        (0, 0),
        "{:?}",
        diff.devices
    );
    assert!(
        error.contains("the candidate version trapped")
            && !error.contains("device's plugin")
            && !diff.devices[0].folds,
        "{:?}",
        diff.devices
    );

    let refused = rt.deploy("misbehave", v3.version, false).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::DeployRefused, "{refused}");
    let message = refused.to_string();
    assert!(
        message.contains("1 of the 24 devices checked beyond the sample (its `init`, `restore` or fold of their recorded transitions failed: c-01)")
            && message.contains("at seq 3"),
        "{message}"
    );
    assert_eq!(
        rt.current_version("misbehave"),
        Some(v2.version),
        "nothing changed"
    );

    let report = rt.deploy("misbehave", v3.version, true).await.unwrap();
    assert_eq!(
        (
            report.totals.fold_checked,
            report.totals.cannot_fold,
            report.totals.pending_lazy
        ),
        (24, 1, 39),
        "{:?}",
        report.totals
    );
    assert_eq!(
        rt.summary("c-01").and_then(|d| d.upgrade),
        Some(drover::PendingUpgrade {
            to: v3.version,
            failed: true
        })
    );
    rt.send("c-01", OK)
        .await
        .expect("handled on its own version");
    assert_eq!(version(&rt, "c-01"), v2.version);
    rt.send("c-02", OK).await.expect("handled");
    assert_eq!(version(&rt, "c-02"), v3.version);
    rt.shutdown().await;
}

/// Acceptance 4: passivated devices are not woken by a deploy; they come back on the new
/// version at their next activation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passivated_devices_upgrade_lazily_at_their_next_activation() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open_passivating(dir.path()).await;
    for i in 0..20 {
        let id = format!("p-{i:02}");
        rt.provision(&id, "misbehave", &json!({})).await.unwrap();
        for _ in 0..3 {
            rt.send(&id, OK).await.unwrap();
        }
    }
    let live = |rt: &Runtime| rt.metrics().live_instances.load(Ordering::Relaxed);
    until_passivated(&rt).await;
    assert_eq!(live(&rt), 0, "every device passivated");
    let v2 = register_v2(&rt).await;
    let activations = rt.metrics().activations.load(Ordering::Relaxed);
    let report = rt.deploy("misbehave", v2.version, false).await.unwrap();
    assert_eq!(report.totals.live, 0);
    assert_eq!(report.totals.pending_lazy, 20);
    assert_eq!(
        rt.metrics().activations.load(Ordering::Relaxed),
        activations,
        "the deploy woke nobody"
    );
    assert_eq!(live(&rt), 0);
    assert_eq!(version(&rt, "p-05"), 1, "not upgraded until it activates");
    assert_eq!(
        rt.summary("p-05").and_then(|d| d.upgrade),
        Some(drover::PendingUpgrade {
            to: 2,
            failed: false
        })
    );

    for i in 0..20 {
        let id = format!("p-{i:02}");
        rt.send(&id, OK).await.unwrap();
        assert_eq!(version(&rt, &id), 2, "{id}");
        assert_eq!(
            count(&rt, &id).await,
            5,
            "{id}: 3 under v1, then +2 under v2"
        );
        assert_live_equals_full_replay(&rt, dir.path(), &id).await;
    }
    rt.shutdown().await;
}

/// A rollback that lands while a device is being brought up on the new version at its
/// activation still moves that device back. The activation read the current version before
/// its instance was live, and a deploy swaps only the devices live when it points: the device
/// stayed on the version rolled back from until it was next passivated (found by a review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_activating_while_a_rollback_lands_ends_on_the_version_rolled_back_to() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::builder(dir.path())
        .plugin_dir(support::PluginDir)
        .call_timeout(Duration::from_secs(5))
        .activation_timeout(Duration::from_secs(20))
        .idle_timeout(Duration::from_millis(100))
        .open()
        .await
        .unwrap();
    rt.provision("s", "misbehave", &json!({})).await.unwrap();
    let spin = support::spins_for(&rt, "s", 0.2).await;
    // A history whose fold takes ~0.8 s: what bringing the device up on another version
    // replays.
    rt.send("s", &support::slow_apply(spin, 4)).await.unwrap();
    until_passivated(&rt).await;
    assert_eq!(
        rt.metrics().live_instances.load(Ordering::Relaxed),
        0,
        "passivated"
    );
    let v2 = register_v2(&rt).await;
    let report = rt.deploy("misbehave", v2.version, false).await.unwrap();
    assert_eq!(report.totals.pending_lazy, 1);

    // The next event brings it up on v2 at its activation; the rollback lands meanwhile.
    let event = tokio::spawn({
        let rt = rt.clone();
        async move { rt.send("s", OK).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = rt.rollback("misbehave", false).await.unwrap();
    assert_eq!(
        report.totals.live, 0,
        "not live yet when the rollback pointed"
    );
    event.await.unwrap().expect("acknowledged");
    assert_eq!(
        version(&rt, "s"),
        1,
        "handled on the version rolled back to"
    );
    assert_eq!(count(&rt, "s").await, 1, "v1 counts by one");
    assert_live_equals_full_replay(&rt, dir.path(), "s").await;
    rt.shutdown().await;
}

/// An upload whose caller goes away (an HTTP client hanging up) is registered all the same:
/// one cut short while its version record was on its way to disk used to leave the version
/// in the journal but not in the registry, so the next upload was given the same version id
/// and the next open refused the journal as damaged (found by a review). An upload of the
/// same bytes again answers the version it made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_caller_goes_away_is_registered_once() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    let bytes = support::identical_rebuild(&support::misbehave_v1());
    let cut = tokio::time::timeout(
        Duration::from_millis(1),
        rt.register_plugin("misbehave", bytes.clone(), Origin::Upload),
    )
    .await;
    assert!(cut.is_err(), "compiling takes longer than 1 ms");
    let misbehave_versions = |rt: &Runtime| {
        rt.plugins()
            .iter()
            .find(|(name, _)| name == "misbehave")
            .map_or(0, |(_, v)| v.len())
    };
    let mut versions = 0;
    for _ in 0..200 {
        versions = misbehave_versions(&rt);
        if versions == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(versions, 2, "registered although its caller went away");
    let (again, new) = rt
        .register_plugin("misbehave", bytes, Origin::Upload)
        .await
        .unwrap();
    assert!(!new);
    assert_eq!(again.version, 2);
    let (other, _) = rt
        .register_plugin(
            "misbehave",
            support::misbehave_variant("v2"),
            Origin::Upload,
        )
        .await
        .unwrap();
    assert_eq!(other.version, 3);
    rt.shutdown().await;
    drop(rt);
    let rt = open(dir.path()).await;
    assert_eq!(misbehave_versions(&rt), 3);
    rt.shutdown().await;
}

/// A candidate that fails on a recorded event (here a trap in the `apply` of what it decided)
/// where the recorded version decided is counted apart from one that decides otherwise:
/// deploy reports said only "decide differently" of a version that traps on every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_counts_the_devices_a_candidate_fails_on_apart() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    rt.provision("f-5", "misbehave", &json!({})).await.unwrap();
    rt.provision("f-2", "misbehave", &json!({})).await.unwrap();
    for _ in 0..8 {
        rt.send("f-5", OK).await.unwrap();
    }
    for _ in 0..2 {
        rt.send("f-2", OK).await.unwrap();
    }
    // v3 counts as v1 does, and traps applying a count over 4: f-5's fifth `ok`. Its
    // instance is then discarded: the three events after it are not re-decided, and are not
    // counted as if they were (a review saw "299 events re-decided" for a failure at seq 5).
    let (v3, _) = support::upload_misbehave(&rt, support::misbehave_variant("v3")).await;
    let report = rt
        .dry_run("misbehave", v3.version, Selection::Sample(10))
        .await
        .unwrap();
    let f5 = report.devices.iter().find(|d| d.device == "f-5").unwrap();
    assert_eq!((f5.diverged_events, f5.failed_events), (1, 1), "{f5:?}");
    assert_eq!(f5.events, 5, "{f5:?}");
    assert_eq!(report.totals.events, 5 + 2, "{:?}", report.totals);
    let first = f5.first_divergence.as_ref().unwrap();
    assert_eq!(first.seq, 5);
    assert!(
        first
            .error
            .as_deref()
            .is_some_and(|e| e.contains("trapped")),
        "{first:?}"
    );
    let f2 = report.devices.iter().find(|d| d.device == "f-2").unwrap();
    assert!(f2.identical && f2.failed_events == 0, "{f2:?}");
    assert_eq!(
        (
            report.totals.decide_differently,
            report.totals.failed_to_decide,
            report.totals.identical
        ),
        (1, 1, 1),
        "{:?}",
        report.totals
    );
}

/// A candidate whose `init` takes longer than an event's budget, and well under an
/// activation's, is checked within an activation's, as its devices are brought up: a review
/// found a device with a slow `init` refused by every deploy ("exceeded its time budget of
/// 250ms"), and forced, left behind for good as unable to fold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_init_is_checked_within_an_activations_budget_not_an_events() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::builder(dir.path())
        .plugin_dir(support::PluginDir)
        .call_timeout(Duration::from_millis(10))
        .open()
        .await
        .unwrap();
    // ~25-300 ms of spinning, past the 10 ms event budget, on any machine the tests run on.
    rt.provision("slow", "misbehave", &json!({"init_spin": 50_000_000u64}))
        .await
        .expect("a trial init gets an activation's budget");
    rt.send("slow", OK).await.unwrap();
    let v2 = register_v2(&rt).await;
    let report = rt
        .dry_run("misbehave", v2.version, Selection::Sample(4))
        .await
        .unwrap();
    let d = &report.devices[0];
    assert!(d.folds && d.error.is_none() && !d.timed_out, "{d:?}");
    let report = rt
        .deploy("misbehave", v2.version, false)
        .await
        .expect("deploy");
    let t = &report.totals;
    assert_eq!((t.upgraded, t.failed, t.cannot_fold), (1, 0, 0), "{t:?}");
    assert_eq!(version(&rt, "slow"), v2.version);
    rt.shutdown().await;
}

/// A dry run whose device's own version cannot read the recorded state (its `query`
/// spins) says so, and does not blame the candidate: a review saw "the candidate version
/// trapped" for a panic in the old version's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_blames_the_devices_own_version_for_its_own_failure() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::builder(dir.path())
        .plugin_dir(support::PluginDir)
        .call_timeout(Duration::from_millis(50))
        .open()
        .await
        .unwrap();
    rt.provision("r", "misbehave", &json!({})).await.unwrap();
    rt.send("r", OK).await.unwrap();
    rt.send("r", r#"{"type":"loop_on_read"}"#).await.unwrap();
    let v2 = register_v2(&rt).await;
    let report = rt
        .dry_run("misbehave", v2.version, Selection::Sample(4))
        .await
        .unwrap();
    let d = &report.devices[0];
    let error = d.error.as_deref().unwrap_or_default();
    assert!(
        error.starts_with("the device's own version (v1) could not rebuild or read")
            && !error.contains("candidate version"),
        "{d:?}"
    );
    assert!(d.folds && !d.identical, "{d:?}");
    rt.shutdown().await;
}

/// Acceptance 5: a behavior change yields the expected divergences with the first seq and a
/// diff; an identical rebuild yields none; a dry-run writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_reports_divergences_and_an_identical_rebuild_has_none() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    for i in 0..5 {
        let id = format!("r-{i}");
        rt.provision(&id, "misbehave", &json!({})).await.unwrap();
        for _ in 0..4 {
            rt.send(&id, OK).await.unwrap();
        }
        rt.send(&id, r#"{"type":"echo"}"#).await.unwrap();
    }
    let v2 = register_v2(&rt).await;
    let (same, new) =
        support::upload_misbehave(&rt, support::identical_rebuild(&support::misbehave_v1())).await;
    assert!(new, "other bytes are another version");
    let written = support::records_written(&rt);

    let report = rt
        .dry_run("misbehave", v2.version, Selection::Sample(10))
        .await
        .unwrap();
    assert_eq!(report.totals.devices, 5);
    assert_eq!(report.totals.diverged, 5);
    assert_eq!(report.totals.cannot_fold, 0);
    assert_eq!(report.totals.events, 25);
    let d = &report.devices[0];
    assert!(d.folds && !d.identical && !d.state_matches);
    assert_eq!(d.diverged_events, 4, "the four `ok`s, not the echo");
    assert_eq!(
        (d.failed_events, report.totals.failed_to_decide),
        (0, 0),
        "v2 decides otherwise; it fails on nothing"
    );
    let first = d.first_divergence.as_ref().unwrap();
    assert_eq!(first.seq, 1);
    assert_eq!(first.recorded, [json!({"type": "counted", "count": 1})]);
    assert_eq!(
        first.candidate.as_deref(),
        Some(&[json!({"type": "counted", "count": 2})][..])
    );
    assert!(
        d.state_diff
            .contains(&json!({"op": "replace", "path": "/count", "value": 8, "was": 4})),
        "{:?}",
        d.state_diff
    );

    let report = rt
        .dry_run(
            "misbehave",
            same.version,
            Selection::Devices(vec!["r-1".into(), "r-3".into()]),
        )
        .await
        .unwrap();
    assert_eq!(report.totals.devices, 2);
    assert_eq!(report.totals.identical, 2, "{:?}", report.devices);
    assert!(report.devices.iter().all(|d| d.first_divergence.is_none()));

    let unknown = rt
        .dry_run("misbehave", 99, Selection::Sample(1))
        .await
        .unwrap_err();
    assert_eq!(unknown.kind(), ErrorKind::UnknownVersion);
    assert_eq!(
        support::records_written(&rt),
        written,
        "a dry-run writes nothing"
    );
    rt.shutdown().await;
}

/// Acceptance 8: restarting with the start-up plugins after an upload keeps the uploaded
/// version current; a start-up plugin replaces only a start-up version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_never_replaces_an_uploaded_current_version() {
    let dir = tempfile::tempdir().unwrap();
    // The builder logs on the thread that opens it: this one.
    let (logs, _logging) = support::Logs::capture();
    const REPLACED: &str = "is not the version that was current";
    let startup = |bytes: Vec<u8>| Runtime::builder(dir.path()).plugin("m", bytes).open();
    let rt = startup(support::misbehave_v1()).await.unwrap();
    rt.provision("a", "m", &json!({})).await.unwrap();
    rt.send("a", OK).await.unwrap();
    rt.shutdown().await;
    drop(rt);
    assert!(
        !logs.text().contains(REPLACED),
        "a first version replaces nothing"
    );

    // New start-up bytes over a start-up version: they become current, with a warning (no
    // dry-run checked them).
    let rt = startup(support::identical_rebuild(&support::misbehave_v1()))
        .await
        .unwrap();
    assert_eq!(rt.current_version("m"), Some(2));
    let warned: Vec<String> = logs
        .text()
        .lines()
        .filter(|l| l.contains(REPLACED))
        .map(str::to_string)
        .collect();
    assert!(
        warned.len() == 1 && warned[0].contains("WARN") && warned[0].contains("was=1"),
        "{warned:?}"
    );
    // An upload, deployed.
    let (v3, _) = rt
        .register_plugin("m", support::misbehave_variant("v2"), Origin::Upload)
        .await
        .unwrap();
    rt.deploy("m", v3.version, false).await.unwrap();
    assert_eq!(rt.current_version("m"), Some(3));
    rt.shutdown().await;
    drop(rt);

    // Restarting with the original start-up plugin keeps the deployed upload current, and
    // so warns of nothing.
    let rt = startup(support::misbehave_v1()).await.unwrap();
    assert_eq!(rt.current_version("m"), Some(3));
    assert_eq!(logs.text().matches(REPLACED).count(), 1);
    rt.send("a", OK).await.unwrap();
    assert_eq!(version(&rt, "a"), 3);
    assert_eq!(
        count(&rt, "a").await,
        3,
        "1 under v1, then +2 under v2's code"
    );
    rt.shutdown().await;
}

/// Acceptance 1 (the part that needs a real build): a plugin whose code uses std's
/// `HashMap` imports `wasi:random/insecure-seed`; the upload is refused naming the import,
/// its likely cause and the fix, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_with_a_refused_import_names_its_cause_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    let before = rt.plugins();
    let err = rt
        .register_plugin(
            "hashy",
            support::misbehave_variant("hashmap"),
            Origin::Upload,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidPlugin);
    let message = err.to_string();
    for hint in ["wasi:random/insecure-seed", "HashMap", "BTreeMap"] {
        assert!(message.contains(hint), "no `{hint}` in: {message}");
    }
    assert_eq!(rt.plugins(), before, "nothing registered");
    rt.shutdown().await;
}

/// Removing a version keeps the rollback history a stack of real steps back, also across a
/// restart: after v1 → v2 → v3 → v2 and the removal of v3, a rollback goes to v1 (it went
/// to v2, the version already current, and changed nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_after_a_version_is_removed_still_goes_one_step_back() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    let register = |bytes: Vec<u8>| {
        let rt = rt.clone();
        async move {
            let (v, _) = rt
                .register_plugin("misbehave", bytes, Origin::Upload)
                .await
                .unwrap();
            v.version
        }
    };
    let v2 = register(support::identical_rebuild(&support::misbehave_v1())).await;
    let v3 = register(support::misbehave_variant("v2")).await;
    for v in [v2, v3, v2] {
        rt.deploy("misbehave", v, false).await.unwrap();
    }
    rt.remove_plugin_version("misbehave", v3).await.unwrap();
    rt.shutdown().await;
    drop(rt);
    let rt = open(dir.path()).await;
    assert_eq!(rt.current_version("misbehave"), Some(v2));
    let back = rt.rollback("misbehave", false).await.unwrap();
    assert_eq!((back.from, back.to), (v2, 1));
    assert_eq!(rt.current_version("misbehave"), Some(1));
    let none = rt.rollback("misbehave", false).await.unwrap_err();
    assert_eq!(none.kind(), ErrorKind::DeployRefused, "{none}");
    rt.shutdown().await;
}

/// A plugin version can be removed once no device runs it and it is not current; a plugin,
/// once no device runs any of its versions. Removals survive a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_versions_are_removed_only_when_unused() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    rt.provision("d", "misbehave", &json!({})).await.unwrap();
    rt.send("d", OK).await.unwrap();
    let (v2, _) = rt
        .register_plugin(
            "misbehave",
            support::identical_rebuild(&support::misbehave_v1()),
            Origin::Upload,
        )
        .await
        .unwrap();
    let (v3, _) = rt
        .register_plugin(
            "misbehave",
            support::misbehave_variant("v2"),
            Origin::Upload,
        )
        .await
        .unwrap();
    let in_use = |e: drover::Error| {
        assert_eq!(e.kind(), ErrorKind::VersionInUse, "{e}");
        e.to_string()
    };
    let why = in_use(rt.remove_plugin_version("misbehave", 1).await.unwrap_err());
    assert!(why.contains("1 device(s) run it"), "{why}");

    rt.remove_plugin_version("misbehave", v2.version)
        .await
        .unwrap();
    let listed: Vec<u32> = rt
        .plugins()
        .into_iter()
        .find(|(n, _)| n == "misbehave")
        .unwrap()
        .1
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(listed, [1, v3.version]);
    let gone = rt.deploy("misbehave", v2.version, false).await.unwrap_err();
    assert_eq!(gone.kind(), ErrorKind::UnknownVersion);

    rt.deploy("misbehave", v3.version, false).await.unwrap();
    in_use(
        rt.remove_plugin_version("misbehave", v3.version)
            .await
            .unwrap_err(),
    );
    rt.remove_plugin_version("misbehave", 1).await.unwrap();
    in_use(rt.remove_plugin("misbehave").await.unwrap_err());
    rt.remove_device("d", false).await.unwrap();
    // The only version, current and unused, is refused by its number too (it removed the
    // whole plugin, found by a review); the plugin's removal takes it.
    let why = in_use(
        rt.remove_plugin_version("misbehave", v3.version)
            .await
            .unwrap_err(),
    );
    assert!(
        why.contains("only version") && why.contains("DELETE /v1/plugins/misbehave"),
        "{why}"
    );
    assert!(rt.plugins().iter().any(|(n, _)| n == "misbehave"));
    // The current version goes only with the whole plugin.
    let thermostat = std::fs::read(support::plugin_dir().join("thermostat.wasm")).unwrap();
    rt.register_plugin(
        "thermostat",
        support::identical_rebuild(&thermostat),
        Origin::Upload,
    )
    .await
    .unwrap();
    let why = in_use(rt.remove_plugin_version("thermostat", 1).await.unwrap_err());
    assert!(why.contains("current"), "{why}");
    assert_eq!(rt.remove_plugin("misbehave").await.unwrap(), [v3.version]);
    assert!(rt.plugins().iter().all(|(n, _)| n != "misbehave"));
    assert_eq!(
        rt.provision("e", "misbehave", &json!({}))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::UnknownPlugin
    );

    // The same bytes under another plugin name share the stored file: removing one keeps
    // the other loadable.
    rt.register_plugin("twin-a", support::misbehave_v1(), Origin::Upload)
        .await
        .unwrap();
    rt.register_plugin("twin-b", support::misbehave_v1(), Origin::Upload)
        .await
        .unwrap();
    rt.remove_plugin("twin-a").await.unwrap();
    rt.shutdown().await;
    drop(rt);
    let rt = Runtime::builder(dir.path()).open().await.unwrap();
    rt.provision("t", "twin-b", &json!({}))
        .await
        .expect("twin-b still loads");
    rt.shutdown().await;
    drop(rt);

    // Still removed after a restart; an upload brings the name back as a new version.
    let rt = Runtime::builder(dir.path()).open().await.unwrap();
    assert!(rt.plugins().iter().all(|(n, _)| n != "misbehave"));
    let (back, new) = rt
        .register_plugin("misbehave", support::misbehave_v1(), Origin::Upload)
        .await
        .unwrap();
    assert!(new);
    assert_eq!(back.version, v3.version + 1);
    assert_eq!(rt.current_version("misbehave"), Some(back.version));
    rt.shutdown().await;
}

/// An import numbers a plugin's versions in the source's order: the source's latest is the
/// target's latest, each number names the same component (by digest) on both sides, and the
/// devices run the same components. (Registered in a hash map's order, a source's v3 could
/// become the target's v1.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_numbers_plugin_versions_in_the_sources_order() {
    let root = tempfile::tempdir().unwrap();
    let source = root.path().join("source");
    let rt = open(&source).await;
    rt.provision("d1", "misbehave", &json!({})).await.unwrap();
    rt.send("d1", OK).await.unwrap();
    let v2 = support::misbehave_variant("v2");
    for bytes in [v2.clone(), support::identical_rebuild(&v2)] {
        let (v, _) = rt
            .register_plugin("misbehave", bytes, Origin::Upload)
            .await
            .unwrap();
        rt.deploy("misbehave", v.version, false).await.unwrap();
        rt.provision(&format!("d{}", v.version), "misbehave", &json!({}))
            .await
            .unwrap();
        rt.send("d1", OK).await.unwrap();
    }
    let digests = |rt: &Runtime| -> Vec<(u32, [u8; 32])> {
        rt.journal()
            .versions()
            .into_iter()
            .filter(|v| v.plugin == "misbehave")
            .map(|v| (v.number, v.digest))
            .collect()
    };
    let before = digests(&rt);
    assert_eq!(before.len(), 3);
    let runs = |rt: &Runtime| -> Vec<u32> {
        ["d1", "d2", "d3"]
            .iter()
            .map(|id| version(rt, id))
            .collect()
    };
    let ran = runs(&rt);
    rt.shutdown().await;
    drop(rt);

    let file = root.path().join("fleet.jsonl");
    let mut out = std::fs::File::create(&file).unwrap();
    drover::export::export(&source, None, drover::export::ExportStart::Seq(1), &mut out)
        .expect("export");
    drop(out);
    let target = root.path().join("target");
    drover::export::import(&target, &file)
        .await
        .expect("import");
    // Opened without a plugin directory, whose files would become current at start.
    let rt = Runtime::builder(&target)
        .open()
        .await
        .expect("runtime opens");
    let mut after = digests(&rt);
    after.sort();
    assert_eq!(after, before, "the same numbers for the same components");
    assert_eq!(rt.current_version("misbehave"), Some(3));
    assert_eq!(runs(&rt), ran);
    rt.shutdown().await;
}

/// The record of each plugin's current version (`plugins/current.json`) lost: the newest
/// version stands and no start-up file moves it back (it undid a deploy without a word);
/// damaged: the start is refused naming the file (it named only serde's complaint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_record_of_current_versions_undoes_no_deploy() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    rt.provision("d", "misbehave", &json!({})).await.unwrap();
    let v2 = register_v2(&rt).await;
    rt.deploy("misbehave", v2.version, false).await.unwrap();
    rt.send("d", OK).await.unwrap();
    assert_eq!(version(&rt, "d"), v2.version);
    rt.shutdown().await;
    drop(rt);
    let pointers = dir.path().join("plugins/current.json");

    std::fs::write(&pointers, b"{\"current\": [").unwrap();
    let refused = Runtime::builder(dir.path())
        .plugin_dir(support::PluginDir)
        .open()
        .await
        .err()
        .expect("a damaged record refuses the start");
    let message = format!("{refused:#}");
    assert!(
        message.contains("current.json is damaged") && message.contains("backup"),
        "{message}"
    );

    std::fs::remove_file(&pointers).unwrap();
    let rt = open(dir.path()).await;
    assert_eq!(rt.current_version("misbehave"), Some(v2.version));
    rt.send("d", OK).await.unwrap();
    assert_eq!(
        version(&rt, "d"),
        v2.version,
        "moved back by the start-up file"
    );
    rt.shutdown().await;
}

/// Dry-runs asked for run one per core at a time, the others waiting their turn: each holds
/// a device's history and instances of the candidate while it runs, and 30 at once on a
/// device of 240 MB of history took a server to 1.4 GB (a review). A deploy's own sample
/// does not wait for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_asked_for_take_turns_one_per_core() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = Runtime::builder(dir.path())
        .plugin_dir(support::PluginDir)
        .call_timeout(Duration::from_millis(300))
        .open()
        .await
        .expect("runtime opens");
    counted_to_five(&rt, 4).await;
    let (v4, _) = support::upload_misbehave(&rt, support::misbehave_variant("v4")).await;
    let turns = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let gauge = |name: &str| -> u64 {
        let text = rt.render_metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    // Each folds four devices whose histories v4 spins on: over a second each.
    let ids: Vec<String> = (0..4).map(|i| format!("s-{i:02}")).collect();
    let runs: Vec<_> = (0..=turns)
        .map(|_| {
            let (rt, ids) = (rt.clone(), ids.clone());
            tokio::spawn(async move {
                rt.dry_run("misbehave", v4.version, Selection::Devices(ids))
                    .await
            })
        })
        .collect();
    support::poll_until(Duration::from_secs(20), "one dry-run waiting", || {
        (gauge("drover_dry_runs_waiting") == 1 && gauge("drover_dry_runs_running") == turns as u64)
            .then_some(())
    });
    for run in runs {
        let report = run.await.expect("task").expect("dry-run");
        assert_eq!(report.devices.len(), 4);
    }
    assert_eq!(gauge("drover_dry_runs_waiting"), 0);
    assert_eq!(gauge("drover_dry_runs_running"), 0);
    rt.shutdown().await;
}
