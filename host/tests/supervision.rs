//! Supervision: an actor task that panics is replaced, and the device is rebuilt from the
//! journal by its next message. Its own test binary, because the panic is provoked through
//! the process-wide log subscriber (a log write that panics, as one on a full disk could).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use drover::Runtime;
use serde_json::json;

mod support;

/// A subscriber that panics on the first event whose message contains `TRIGGER`, once
/// armed: the way a failing log writer would take an actor down.
struct PanickyLog;

const TRIGGER: &str = "discarding the instance";
static ARMED: AtomicBool = AtomicBool::new(false);

struct Visitor(bool);

impl tracing::field::Visit for Visitor {
    fn record_debug(&mut self, _field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if format!("{value:?}").contains(TRIGGER) {
            self.0 = true;
        }
    }
}

impl tracing::Subscriber for PanickyLog {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut v = Visitor(false);
        event.record(&mut v);
        if v.0 && ARMED.swap(false, Ordering::AcqRel) {
            panic!("log writer failed");
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_actor_is_replaced_and_the_device_rebuilt_from_the_journal() {
    tracing::subscriber::set_global_default(PanickyLog).expect("one subscriber per process");
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = Runtime::builder(dir.path())
        .plugin_dir(support::plugin_dir())
        .open()
        .await
        .expect("runtime");
    rt.provision("p", "misbehave", &json!({}))
        .await
        .expect("provision");
    for seq in 1..=3 {
        assert_eq!(rt.send("p", r#"{"type":"ok"}"#).await.expect("ok").seq, seq);
    }

    // The guest traps; the actor's log line about it panics; the actor task dies.
    ARMED.store(true, Ordering::Release);
    let err = rt
        .send("p", r#"{"type":"panic"}"#)
        .await
        .expect_err("the actor died answering");
    assert_eq!(err.code(), "internal", "{err}");
    assert!(!ARMED.load(Ordering::Acquire), "the panic was provoked");
    // Counted once the task has unwound (the caller may hear of it first).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rt.metrics().actor_panics.load(Ordering::Relaxed) == 0 {
        assert!(std::time::Instant::now() < deadline, "panic never counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The next message starts a fresh actor, rebuilt from the journal: no seq lost or reused.
    let ack = rt.send("p", r#"{"type":"ok"}"#).await.expect("restarted");
    assert_eq!(ack.seq, 4);
    let view = rt.device("p").await.expect("read");
    let state: serde_json::Value = serde_json::from_str(&view.state).expect("json");
    assert_eq!(state["count"], json!(4));
    let replayed = rt.state_at("p", 4).await.expect("replay");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&replayed.state).expect("json"),
        state
    );
    tokio::time::timeout(Duration::from_secs(30), rt.shutdown())
        .await
        .expect("shuts down");
}

/// A device whose history outgrew the activation budget can still be rebuilt offline with a
/// larger one (`drover replay --activation-timeout-ms`): replay took only the budget the
/// server recorded, and failed on that device as its activations did (a review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_takes_a_larger_budget_for_a_history_that_outgrew_the_servers() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::builder(dir.path())
        .plugin_dir(support::PluginDir)
        .activation_timeout(Duration::from_millis(100))
        .open()
        .await
        .unwrap();
    rt.provision("heavy", "misbehave", &json!({}))
        .await
        .unwrap();
    // Each event's two `apply`s spin some milliseconds; all of them together, from `init`,
    // far more than 100 ms.
    for _ in 0..30 {
        rt.send("heavy", r#"{"type":"slow_apply","spin":5000000,"count":2}"#)
            .await
            .expect("each event is within its budget");
    }
    rt.shutdown().await;
    let data = dir.path().to_str().unwrap();
    let (ok, _, err) = support::cli(&["replay", "heavy", "--genesis", "--data", data]);
    assert!(!ok && err.contains("time budget"), "{err}");
    let (ok, out, err) = support::cli(&[
        "replay",
        "heavy",
        "--genesis",
        "--activation-timeout-ms",
        "600000",
        "--data",
        data,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains(r#""seq":30"#), "{out}");
}
