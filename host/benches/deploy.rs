//! Hot reload at fleet scale: deploy by replay, dry-run, plugin registration.
//!
//! `cargo bench -p drover --bench deploy` provisions N thermostats (default 10,000), sends
//! each E events (default 100, so ~100 transitions each, no snapshot in between), then:
//!
//! 1. registers a new version (the same component with a custom section appended: other
//!    bytes, same behavior) and prints the registration time (validate, compile, precompile,
//!    store);
//! 2. deploys it to the N live devices with no traffic: total time, per-device pause
//!    p50/p99/max (from the deploy report);
//! 3. measures durable events/s over the fleet for a few seconds, then deploys another
//!    version while the same load runs, and prints the throughput during the deploy as a
//!    share of the throughput before it;
//! 4. dry-runs a version on a sample of devices: re-decided events/s (one thread).
//!
//! Options (environment): `DROVER_BENCH_DEVICES` (default 10000), `DROVER_BENCH_HISTORY`
//! (events per device, default 100), `DROVER_BENCH_IDLE_ONLY` (stop after step 2, for
//! profiling the deploy itself).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use drover::registry::Origin;
use drover::{Runtime, Selection};

#[path = "support/allocator.rs"]
mod allocator;
#[path = "support/mod.rs"]
mod common;
use common::{THERMOSTAT, env_or};

/// The component with a custom section appended: a distinct version, identical behavior.
fn rebuild(tag: u8) -> Vec<u8> {
    let name = b"drover-bench";
    let mut out = THERMOSTAT.to_vec();
    out.extend_from_slice(&[0, (1 + name.len() + 1) as u8, name.len() as u8]);
    out.extend_from_slice(name);
    out.push(tag);
    out
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let devices = env_or("DROVER_BENCH_DEVICES", 10_000) as usize;
    let history = env_or("DROVER_BENCH_HISTORY", 100);
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-deploy");
    let _ = std::fs::remove_dir_all(&root);
    let rt = Runtime::builder(&root)
        .plugin("thermostat", THERMOSTAT)
        .mailbox_capacity(1024)
        .open()
        .await?;
    println!(
        "drover deploy bench: {devices} thermostats x {history} events, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let ids: Arc<Vec<String>> = Arc::new((0..devices).map(|i| format!("t-{i:06}")).collect());
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in ids.chunks(devices.div_ceil(256)) {
        let (rt, chunk) = (rt.clone(), chunk.to_vec());
        tasks.spawn(async move {
            for id in &chunk {
                rt.provision(id, "thermostat", &serde_json::json!({"setpoint": 21.0}))
                    .await?;
            }
            for round in 0..history {
                for id in &chunk {
                    let celsius = 19.0 + (round % 50) as f64 / 10.0;
                    rt.send(id, &format!(r#"{{"type":"reading","celsius":{celsius}}}"#))
                        .await?;
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let transitions = rt.metrics().transitions_committed.load(Ordering::Relaxed);
    println!(
        "history: {} events, {transitions} transitions ({:.0} per device)",
        devices as u64 * history,
        transitions as f64 / devices as f64
    );

    // 1. Registration.
    let t = Instant::now();
    let (v2, _) = rt
        .register_plugin("thermostat", rebuild(2), Origin::Upload)
        .await?;
    println!(
        "register (validate, compile, precompile, store): {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );

    // 2. Deploy, no traffic.
    let report = rt.deploy("thermostat", v2.version, false).await?;
    println!(
        "deploy, idle fleet: {} upgraded, {} failed in {} ms; pause p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        report.totals.upgraded,
        report.totals.failed,
        report.elapsed_ms,
        report.pause_p50_us as f64 / 1000.0,
        report.pause_p99_us as f64 / 1000.0,
        report.pause_max_us as f64 / 1000.0,
    );

    // 3. Deploy under load.
    if std::env::var_os("DROVER_BENCH_IDLE_ONLY").is_some() {
        rt.shutdown().await;
        return Ok(());
    }
    let (v3, _) = rt
        .register_plugin("thermostat", rebuild(3), Origin::Upload)
        .await?;
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for w in 0..1024usize {
        let (rt, ids, done, stop) = (rt.clone(), ids.clone(), done.clone(), stop.clone());
        load.spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let id = &ids[i % ids.len()];
                i += 1024;
                match rt.send(id, r#"{"type":"reading","celsius":20.5}"#).await {
                    Ok(_) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(drover::Error::MailboxFull) => tokio::task::yield_now().await,
                    Err(e) => return Err(anyhow::anyhow!("{id}: {e}")),
                }
            }
            anyhow::Ok(())
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (n0, t0) = (done.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = (done.load(Ordering::Relaxed) - n0) as f64 / t0.elapsed().as_secs_f64();
    let (n1, t1) = (done.load(Ordering::Relaxed), Instant::now());
    let report = rt.deploy("thermostat", v3.version, false).await?;
    let during = (done.load(Ordering::Relaxed) - n1) as f64 / t1.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = load.join_next().await {
        r??;
    }
    println!(
        "deploy under load: {} upgraded, {} failed in {} ms; pause p50 {:.2} ms, p99 {:.2} ms; \
         traffic {:.0} events/s before, {:.0} during ({:.0}%)",
        report.totals.upgraded,
        report.totals.failed,
        report.elapsed_ms,
        report.pause_p50_us as f64 / 1000.0,
        report.pause_p99_us as f64 / 1000.0,
        before,
        during,
        during / before * 100.0
    );

    // 4. Dry-run.
    let report = rt
        .dry_run("thermostat", v2.version, Selection::Sample(200))
        .await?;
    println!(
        "dry-run: {} devices, {} events re-decided in {} ms: {} events/s on one thread ({} identical)",
        report.totals.devices,
        report.totals.events,
        report.elapsed_ms,
        report.totals.events_per_s,
        report.totals.identical
    );
    rt.shutdown().await;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
