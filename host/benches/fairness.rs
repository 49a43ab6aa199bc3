//! Fairness: how long a healthy device's events wait while guests spin on the actor threads.
//!
//! `cargo bench -p drover --bench fairness` opens a runtime with the default actor threads
//! (one per core) and time budget (250 ms), provisions a thermostat and K `misbehave` devices,
//! and then:
//!
//! 1. **unloaded**: sends the thermostat N readings one at a time, 2 ms apart, and prints
//!    their latency (p50 / p99 / max, from the send to the answer);
//! 2. **first loopers**: each `misbehave` device sends a looping event (`{"type":"loop"}`,
//!    which spins until its budget ends) L times in a row, all devices at once, while the
//!    thermostat gets readings as in 1 until every looping event has ended. Prints the
//!    readings' latency, their p99 over the unloaded p99, and how the looping events ended.
//!    The plugin has not run slow before this round: its first slow events hold their
//!    threads to the end of their budgets (see `Instance::handle_preemptible`);
//! 3. **loopers again**: the same, now that the plugin has run slow: every looping event
//!    yields its thread at each epoch tick.
//!
//! Options (environment): `DROVER_BENCH_LOOPERS` (K, default 8), `DROVER_BENCH_LOOPS` (L,
//! default 3), `DROVER_BENCH_READINGS` (N, default 400).

use std::time::{Duration, Instant};

use drover::{ErrorKind, Runtime};

#[path = "support/mod.rs"]
mod common;
#[path = "../tests/support/plugins.rs"]
mod plugins;
use common::{THERMOSTAT, env_or};

fn main() -> anyhow::Result<()> {
    let loopers = env_or("DROVER_BENCH_LOOPERS", 8) as usize;
    let loops = env_or("DROVER_BENCH_LOOPS", 3) as usize;
    let readings = env_or("DROVER_BENCH_READINGS", 400) as usize;
    let plugins = plugins::plugin_dir();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-fairness");
        let _ = std::fs::remove_dir_all(&root);
        let rt = Runtime::builder(&root)
            .plugin("thermostat", THERMOSTAT)
            .plugin("misbehave", std::fs::read(plugins.join("misbehave.wasm"))?)
            .open()
            .await?;
        rt.provision(
            "healthy",
            "thermostat",
            &serde_json::json!({"setpoint": 21.0}),
        )
        .await?;
        // Devices of their own per round: three timeouts in a row quarantine a device.
        for round in 0..2 {
            for i in 0..loopers {
                let id = format!("looper-{round}-{i}");
                rt.provision(&id, "misbehave", &serde_json::json!({}))
                    .await?;
            }
        }
        println!(
            "drover fairness bench: {loopers} looping devices x {loops} events, {} cores, \
             latency of one thermostat's readings",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        println!(
            "{:<16} {:>9} {:>9} {:>9} {:>9} {:>12} {:>22}",
            "round",
            "readings",
            "p50 ms",
            "p99 ms",
            "max ms",
            "p99/unloaded",
            "looping events ended"
        );
        let unloaded = readings_until(&rt, Some(readings), None).await?;
        let base = percentile(&unloaded, 0.99);
        report("unloaded", &unloaded, base, "");
        for (round, name) in ["first loopers", "loopers again"].into_iter().enumerate() {
            let (lat, ended) = with_loopers(&rt, round, loopers, loops).await?;
            report(name, &lat, base, &ended);
        }
        rt.shutdown().await;
        anyhow::Ok(())
    })
}

/// Readings to the thermostat one at a time, 2 ms apart: `n` of them, or until `done`.
async fn readings_until(
    rt: &Runtime,
    n: Option<usize>,
    done: Option<&tokio::sync::watch::Receiver<bool>>,
) -> anyhow::Result<Vec<Duration>> {
    let mut latencies = Vec::new();
    for i in 0.. {
        if n.is_some_and(|n| i >= n) || done.is_some_and(|d| *d.borrow()) {
            break;
        }
        let event = format!(
            r#"{{"type":"reading","celsius":{}}}"#,
            19.0 + (i % 5) as f64
        );
        let sent = Instant::now();
        rt.send("healthy", &event).await?;
        latencies.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(latencies)
}

/// Every looper sends `loops` looping events in a row, while the thermostat gets readings:
/// their latencies, and how the looping events ended.
async fn with_loopers(
    rt: &Runtime,
    round: usize,
    loopers: usize,
    loops: usize,
) -> anyhow::Result<(Vec<Duration>, String)> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..loopers {
        let rt = rt.clone();
        tasks.spawn(async move {
            let mut kinds = Vec::new();
            for _ in 0..loops {
                match rt
                    .send(&format!("looper-{round}-{i}"), r#"{"type":"loop"}"#)
                    .await
                {
                    Ok(_) => kinds.push(None),
                    Err(e) => kinds.push(Some(e.kind())),
                }
            }
            kinds
        });
    }
    let waiter = tokio::spawn(async move {
        let mut kinds = Vec::new();
        while let Some(k) = tasks.join_next().await {
            kinds.extend(k.unwrap_or_default());
        }
        let _ = tx.send(true);
        kinds
    });
    let latencies = readings_until(rt, None, Some(&rx)).await?;
    let kinds = waiter.await?;
    let count = |k: Option<ErrorKind>| kinds.iter().filter(|x| **x == k).count();
    let ended = format!(
        "{} timeout, {} overloaded, {} other",
        count(Some(ErrorKind::Timeout)),
        count(Some(ErrorKind::Overloaded)),
        kinds.len() - count(Some(ErrorKind::Timeout)) - count(Some(ErrorKind::Overloaded)),
    );
    Ok((latencies, ended))
}

fn percentile(latencies: &[Duration], q: f64) -> Duration {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    sorted
        .get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

fn report(round: &str, latencies: &[Duration], base: Duration, ended: &str) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p99 = percentile(latencies, 0.99);
    println!(
        "{round:<16} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>12.1} {ended:>22}",
        latencies.len(),
        ms(percentile(latencies, 0.5)),
        ms(p99),
        ms(latencies.iter().copied().max().unwrap_or_default()),
        p99.as_secs_f64() / base.as_secs_f64().max(1e-9),
    );
}
