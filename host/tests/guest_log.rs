//! What a guest logs reaches the server's log escaped and bounded. Its own test binary: the
//! test captures the log through a subscriber of its own thread, and tracing caches, per
//! call site, whether anyone listens; other tests running the same call sites on other
//! threads at the same time made it miss lines.

use std::time::Duration;

use serde_json::json;

mod support;

use drover::engine::{CompiledPlugin, Engine, EngineConfig, EventContext, Instance, Origin};

/// The `misbehave` test plugin, compiled.
fn misbehave() -> CompiledPlugin {
    let engine = Engine::new(EngineConfig::default()).expect("engine");
    let bytes =
        std::fs::read(support::plugin_dir().join("misbehave.wasm")).expect("misbehave built");
    engine.compile(&bytes).expect("compiles")
}

/// The journal and plugins of a stopped server's data directory, as `drover replay` opens
/// them.
fn offline(dir: &std::path::Path) -> (drover::journal::Journal, drover::registry::Registry) {
    let journal = drover::journal::Journal::open_read_only(dir).expect("journal");
    let engine = Engine::new(EngineConfig::default()).expect("engine");
    let registry =
        drover::registry::Registry::open(engine, journal.clone(), dir).expect("registry");
    (journal, registry)
}

/// A fresh instance of device `m`, initialised.
fn device_m(plugin: &CompiledPlugin) -> Instance {
    let mut m = plugin.instantiate("m".into()).expect("instance");
    m.init("m", "{}").expect("init");
    m
}

/// The context of device `m`'s first event.
fn first_event_of_m() -> EventContext {
    EventContext {
        device_id: "m".into(),
        seq: 1,
        at_ms: 1_700_000_000_000,
        seed: 7,
        origin: Origin::External,
    }
}

/// A guest's log lines cannot pass for the host's, nor flood the log: control characters in
/// what it logs or prints are escaped, so a message holding a newline and a fake timestamp
/// stays one line of `drover::guest` (a fresh-user trial forged an `ERROR drover::journal`
/// line), and one event logs at most 100 lines, the rest counted in one warning.
#[test]
fn a_guest_cannot_forge_log_lines_or_flood_the_log() {
    let (logs, _logging) = support::Logs::capture();
    let plugin = misbehave();
    let mut m = device_m(&plugin);
    let ctx = first_event_of_m();
    let forged =
        "one\n2026-12-02T00:00:00.000000Z ERROR drover::journal: FORGED\u{1b}[2K device=\"good\"";
    for event in [
        json!({"type": "log", "level": "error", "message": forged}),
        json!({"type": "print", "message": forged}),
    ] {
        m.within(Duration::from_secs(5), |m| {
            m.handle(&ctx, &event.to_string())
        })
        .expect("handled");
    }
    let text = logs.text();
    let forged_lines: Vec<&str> = text.lines().filter(|l| l.contains("FORGED")).collect();
    // The log line (its newline escaped: one line), and the printed line and its `stderr: `
    // copy (printing splits at newlines, each line labelled): all the guest's.
    assert_eq!(forged_lines.len(), 3, "{text}");
    assert!(forged_lines[0].contains(r"one\n2026"), "{text}");
    for line in forged_lines {
        assert!(line.contains("drover::guest"), "{line}");
        assert!(
            line.contains(r"\u{1b}[2K"),
            "the escape sequence escaped: {line}"
        );
        assert!(!line.contains('\u{1b}'), "{line}");
        // A quote cannot forge a field: the guest's line is quoted, its quotes escaped.
        assert!(line.contains(r#"device=\"good\""#), "{line}");
        assert!(
            line.ends_with(r#"device="m""#) || line.contains(r#"device="m" stream="#),
            "{line}"
        );
    }

    // 150 lines printed (and copied to stderr) in one event: 100 logged, then one warning.
    let flood = (0..150)
        .map(|i| format!("flood {i}"))
        .collect::<Vec<_>>()
        .join("\n");
    let event = json!({"type": "print", "message": flood});
    m.within(Duration::from_secs(5), |m| {
        m.handle(&ctx, &event.to_string())
    })
    .expect("handled");
    let text = logs.text();
    assert_eq!(text.lines().filter(|l| l.contains("flood ")).count(), 100);
    assert!(text.contains("dropping the rest of this event's"), "{text}");
    // The next event may log again, and hears how many were dropped.
    let event = json!({"type": "log", "message": "after the flood"});
    m.within(Duration::from_secs(5), |m| {
        m.handle(&ctx, &event.to_string())
    })
    .expect("handled");
    let text = logs.text();
    assert!(text.contains("after the flood"), "{text}");
    assert!(text.contains("dropped=200"), "{text}");
}

/// A trap is one warning line naming the device and the trap, beside the guest's own last
/// words; its backtrace goes to the debug level. Each trap wrote ~20 lines at warn, mostly
/// frames a plugin built without names shows as `<wasm function 665>` (a review).
#[test]
fn a_trap_is_one_log_line() {
    let (logs, _logging) = support::Logs::capture();
    let plugin = misbehave();
    let mut m = device_m(&plugin);
    let ctx = first_event_of_m();
    let event = json!({"type": "panic"}).to_string();
    m.within(Duration::from_secs(5), |m| m.handle(&ctx, &event))
        .expect_err("it traps");
    let text = logs.text();
    let trapped: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("guest trapped"))
        .collect();
    assert_eq!(trapped.len(), 1, "{text}");
    assert!(
        trapped[0].contains("device=m ") && trapped[0].contains("unreachable"),
        "{text}"
    );
    assert!(!text.contains("wasm backtrace"), "{text}");
    assert!(text.lines().count() <= 3, "{text}");

    // An abort that trips over an import the host does not give (Rust's out-of-memory path):
    // one line too, saying what the client is told, the guest's last words first.
    let mut m = device_m(&plugin);
    let event = json!({"type": "alloc", "mb": 100}).to_string();
    m.within(Duration::from_secs(5), |m| m.handle(&ctx, &event))
        .expect_err("it aborts");
    let text = logs.text();
    let trapped: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("guest trapped"))
        .collect();
    assert_eq!(trapped.len(), 2, "{text}");
    assert!(
        trapped[1].contains("memory allocation") && trapped[1].contains("the guest aborted"),
        "{text}"
    );
    assert!(!text.contains("wasm function"), "{text}");
    assert!(text.lines().count() <= 6, "{text}");
}

/// A batch of replayed transitions that traps is replayed again one `apply` at a time to
/// find the one that trapped; that second pass meets the same trap, and logged it as a
/// second warning, with the guest's panic message a second time (a review). It logs at the
/// debug level: one fault, one warning.
#[test]
fn a_trap_found_again_by_a_rebuilds_search_is_not_logged_twice() {
    use drover::replay::{self, Start};
    let dir = tempfile::tempdir().expect("tempdir");
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    tokio.block_on(async {
        let rt = drover::Runtime::builder(dir.path())
            .plugin_dir(support::PluginDir)
            .snapshot_every(3)
            .open()
            .await
            .expect("runtime");
        rt.provision("f", "misbehave", &json!({}))
            .await
            .expect("provision");
        // A snapshot at seq 3, then two transitions that trap on a restored state (and fold
        // on one built from `init`), then one more and the next snapshot.
        for event in [
            "ok",
            "ok",
            "ok",
            "fragile_after_restore",
            "fragile_after_restore",
            "ok",
        ] {
            rt.send("f", &json!({ "type": event }).to_string())
                .await
                .expect("handled");
        }
        rt.shutdown().await;
    });
    drop(tokio);

    let (journal, registry) = offline(dir.path());
    let head = journal.device("f").expect("head");
    assert!(
        journal.snapshots(head.num).iter().any(|s| s.seq == 3),
        "{:?}",
        journal.snapshots(head.num)
    );
    let (logs, _logging) = support::Logs::capture();
    // From the snapshot at 3, the batch of 4 and 5 traps; the search finds 4; the replay
    // from `init` the rebuild falls back on folds them.
    let rebuilt = replay::rebuild(&journal, &registry, &head, 5, Start::Snapshot).expect("rebuilt");
    assert_eq!(rebuilt.snapshot, None, "the fallback from `init`");
    let text = logs.text();
    let lines = |what: &[&str]| {
        text.lines()
            .filter(|l| what.iter().all(|w| l.contains(w)))
            .count()
    };
    assert_eq!(lines(&[" WARN ", "guest trapped"]), 1, "{text}");
    // The guest's own panic message (an error it logged on its way out), once.
    assert_eq!(
        lines(&["drover::guest:", "fragile transition applied"]),
        1,
        "{text}"
    );
}

/// Whether a new version restores an old version's snapshot is probed for each device a
/// deploy moves (the report's `snapshot_readable`); a probe that fails is the answer, not a
/// fault. A deploy of a version that cannot restore the old snapshots logged each probe as
/// a guest panic and a `guest trapped` warning: 3,849 of each over a deploy of 2,065
/// devices that failed none (a review).
#[test]
fn a_snapshot_probe_that_fails_logs_no_warning() {
    use drover::replay;
    let dir = tempfile::tempdir().expect("tempdir");
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    let v2 = tokio.block_on(async {
        let rt = drover::Runtime::builder(dir.path())
            .plugin_dir(support::PluginDir)
            .open()
            .await
            .expect("runtime");
        rt.provision("p", "misbehave", &json!({}))
            .await
            .expect("provision");
        for event in ["ok", "v2_cannot_restore", "ok"] {
            rt.send("p", &json!({ "type": event }).to_string())
                .await
                .expect("handled");
        }
        let v2 = support::upload_misbehave(&rt, support::misbehave_variant("v2"))
            .await
            .0;
        // The stop passivates the device, which takes a snapshot on version 1.
        rt.shutdown().await;
        v2
    });
    drop(tokio);

    let (journal, registry) = offline(dir.path());
    let head = journal.device("p").expect("head");
    let snapshot = *journal.snapshots(head.num).last().expect("a snapshot");
    let on_v2 = drover::journal::DeviceHead {
        version: registry.find("misbehave", v2.version).expect("v2").id,
        ..head.clone()
    };
    let (logs, _logging) = support::Logs::capture();
    let err = replay::probe_restore(&journal, &registry, &on_v2, snapshot)
        .expect_err("v2 cannot restore it");
    assert!(
        err.to_string().contains("cannot restore this snapshot"),
        "{err}"
    );
    replay::probe_restore(&journal, &registry, &head, snapshot).expect("v1 restores it");
    let text = logs.text();
    assert!(!text.contains("guest trapped"), "{text}");
    assert!(!text.contains("cannot restore this snapshot"), "{text}");
}
