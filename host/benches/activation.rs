//! Activation latency and replay throughput.
//!
//! `cargo bench -p drover --bench activation` prints:
//!
//! * **activation**: N thermostats (default 2,000) each get a snapshot followed by a tail of
//!   T transitions (default 100; snapshots every 200 transitions), are passivated, then each
//!   is read once (`Runtime::device`: activate from snapshot + tail, query, passivate again).
//!   p50/p99/max of that read, which includes the journal reads of the snapshot and the tail.
//! * **replay**: one device with L transitions (default 1,000,000) rebuilt from `init` with
//!   no snapshot (`replay::rebuild` with `Start::Genesis`, the journal opened read-only):
//!   transitions/s including the journal reads; the time to open the journal and load the
//!   plugin, paid once per process, is printed apart.
//!
//! Options (environment): `DROVER_BENCH_DEVICES`, `DROVER_BENCH_TAIL`, `DROVER_BENCH_LONG`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use drover::Runtime;
use drover::config::EngineConfig;
use drover::engine::Engine;
use drover::journal::Journal;
use drover::registry::Registry;
use drover::replay::{self, Start};
use hdrhistogram::Histogram;

#[path = "support/allocator.rs"]
mod allocator;
#[path = "support/mod.rs"]
mod common;
use common::{THERMOSTAT, env_or};

fn reading(i: u64) -> String {
    // Alternating around the setpoint: one or two transitions per event.
    format!(
        r#"{{"type":"reading","celsius":{}}}"#,
        if i.is_multiple_of(2) { 18.0 } else { 24.0 }
    )
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(activation())?;
    rt.block_on(long_replay())
}

async fn activation() -> anyhow::Result<()> {
    let devices = env_or("DROVER_BENCH_DEVICES", 2_000);
    let tail = env_or("DROVER_BENCH_TAIL", 100);
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-activation");
    let _ = std::fs::remove_dir_all(&root);
    let rt = Runtime::builder(&root)
        .plugin("thermostat", THERMOSTAT)
        .snapshot_every(200)
        .idle_timeout(Duration::from_millis(300))
        .open()
        .await?;
    // Enough events that each device's last snapshot is followed by ~`tail` transitions.
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in (0..devices).collect::<Vec<_>>().chunks(64) {
        let (rt, chunk) = (rt.clone(), chunk.to_vec());
        tasks.spawn(async move {
            for d in chunk {
                let id = format!("t-{d:05}");
                rt.provision(&id, "thermostat", &serde_json::json!({"setpoint": 21.0}))
                    .await?;
                let mut applied = 0;
                let mut i = 0;
                // Past one snapshot (at 200), then `tail` more.
                while applied < 200 + tail {
                    applied += rt.send(&id, &reading(i)).await?.transitions.len() as u64;
                    i += 1;
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    // Wait until every instance is passivated (the passivation snapshot is suppressed only
    // when nothing changed since the last one, so let the tail stay a tail: reads below are
    // measured on devices whose last snapshot came from the snapshot cadence or passivation).
    while rt.metrics().live_instances.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for d in 0..devices {
        let id = format!("t-{d:05}");
        let t = Instant::now();
        rt.device(&id).await?;
        hist.record(t.elapsed().as_micros().max(1) as u64)?;
    }
    println!(
        "activation after passivation (snapshot at the last seq; instantiate, restore, query), {devices} devices: p50 {} µs, p99 {} µs, max {} µs",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.max()
    );
    // Passivation leaves a snapshot at the last seq; a crash does not. The state just before
    // that snapshot is rebuilt from the cadence snapshot plus a tail of ~`tail` transitions:
    // the activation after a crash, through the same rebuild.
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut tails = 0u64;
    for d in 0..devices {
        let id = format!("t-{d:05}");
        let seq = rt.summary(&id).map_or(0, |s| s.seq);
        let t = Instant::now();
        rt.state_at(&id, seq - 1).await?;
        hist.record(t.elapsed().as_micros().max(1) as u64)?;
        tails += seq;
    }
    println!(
        "activation from snapshot + ~{tail} transitions of tail (read from the journal), {devices} devices: p50 {} µs, p99 {} µs, max {} µs ({} events per device)",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.max(),
        tails / devices
    );
    rt.shutdown().await;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

async fn long_replay() -> anyhow::Result<()> {
    let long = env_or("DROVER_BENCH_LONG", 1_000_000);
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-replay");
    let _ = std::fs::remove_dir_all(&root);
    let rt = Runtime::builder(&root)
        .plugin("thermostat", THERMOSTAT)
        .snapshot_every(0)
        .mailbox_capacity(4096)
        .open()
        .await?;
    rt.provision("long", "thermostat", &serde_json::json!({"setpoint": 21.0}))
        .await?;
    // Pipelined: many events in flight to the one device.
    let mut transitions = 0u64;
    let mut i = 0u64;
    let mut pending = futures::stream::FuturesOrdered::new();
    use futures::StreamExt as _;
    while transitions < long {
        while pending.len() < 512 {
            let rt = rt.clone();
            let event = reading(i);
            i += 1;
            pending.push_back(async move { rt.send("long", &event).await });
        }
        if let Some(r) = pending.next().await {
            transitions += r?.transitions.len() as u64;
        }
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    rt.shutdown().await;
    drop(rt);
    let (transitions, took, opened) = tokio::task::spawn_blocking({
        let root = root.clone();
        move || -> anyhow::Result<(u64, Duration, Duration)> {
            // Opening (scanning the journal, loading the plugin) is timed apart: it is paid
            // once per process, not per replay.
            let started = Instant::now();
            let journal = Journal::open_read_only(&root)?;
            let engine = Engine::new(EngineConfig::load(&root)?)?;
            let registry = Registry::open(engine, journal.clone(), &root)?;
            let head = journal
                .device("long")
                .ok_or_else(|| anyhow::anyhow!("no device"))?;
            let opened = started.elapsed();
            let started = Instant::now();
            let rebuilt = replay::rebuild(&journal, &registry, &head, head.seq, Start::Genesis)?;
            Ok((rebuilt.applied, started.elapsed(), opened))
        }
    })
    .await??;
    println!(
        "replay of one device from init: {transitions} transitions in {:.2} s: {:.2}M transitions/s, journal reads included (one thread; opening the journal and plugin took {:.2} s more)",
        took.as_secs_f64(),
        transitions as f64 / took.as_secs_f64() / 1e6,
        opened.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
