//! In-process end-to-end throughput of the actor core with the durable journal.
//!
//! `cargo bench -p drover --bench core` prints, for 1k and 10k devices with 4,096 events in
//! flight: durable events/s, p50/p99 latency from send to durable ack, journal bytes per
//! event, and events per fsync. Every event goes through the real path: mailbox, guest
//! `handle` + `apply` in the thermostat component, record encoding, group commit with
//! `fdatasync`, ack. The data directory lives under `target/` (a real disk, not tmpfs).
//!
//! Options (environment): `DROVER_BENCH_EVENTS` (per size, default 1,000,000),
//! `DROVER_BENCH_SIZES` (default `1000,10000`), `DROVER_BENCH_INFLIGHT` (default 4096),
//! `DROVER_BENCH_WARMUP` (events per device before measuring, default 5),
//! `DROVER_BENCH_GUARD_PAGES` (set: wasmtime's default memory layout, see
//! `EngineConfig::guard_pages`).
//! `DROVER_BENCH_BATCH` (default 0: every event is its own task's `send`, awaited before
//! that task sends the next; N > 0: `DROVER_BENCH_INFLIGHT / N` tasks (at least one) each put
//! N events, to N consecutive devices, into their mailboxes at once and then await them in
//! turn, as `POST /v1/events` does with a gateway's batch, so the caller wakes once per group
//! commit instead of once per event; latency is then from the start of the event's batch).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use drover::Runtime;
use hdrhistogram::Histogram;

#[path = "support/allocator.rs"]
mod allocator;
#[path = "support/mod.rs"]
mod common;
use common::{THERMOSTAT, env_or};

fn main() -> anyhow::Result<()> {
    let events = env_or("DROVER_BENCH_EVENTS", 1_000_000);
    let in_flight = env_or("DROVER_BENCH_INFLIGHT", 4096) as usize;
    let sizes: Vec<usize> = std::env::var("DROVER_BENCH_SIZES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "drover core bench: {events} events per size, {in_flight} in flight, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:>8} {:>12} {:>10} {:>10} {:>12} {:>12}",
        "devices", "events/s", "p50 µs", "p99 µs", "bytes/event", "events/fsync"
    );
    for devices in sizes {
        rt.block_on(run(devices, events, in_flight))?;
    }
    Ok(())
}

async fn run(devices: usize, events: u64, in_flight: usize) -> anyhow::Result<()> {
    let root =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-core-{devices}"));
    let _ = std::fs::remove_dir_all(&root);
    let rt = Runtime::builder(&root)
        .plugin("thermostat", THERMOSTAT)
        .mailbox_capacity(1024)
        .snapshot_every(1000)
        .guard_pages(std::env::var_os("DROVER_BENCH_GUARD_PAGES").is_some())
        .open()
        .await?;
    let ids: Arc<Vec<String>> = Arc::new((0..devices).map(|i| format!("t-{i:06}")).collect());
    common::provision_thermostats(&rt, &ids, devices.div_ceil(256)).await?;
    // Warm up: a few events per device, so that every instance is active and has touched
    // the guest memory pages it keeps using (the first write to a page is a copy-on-write
    // fault with a TLB shootdown); the measurement is then the steady state.
    let warmup = env_or("DROVER_BENCH_WARMUP", 5);
    let mut warm = tokio::task::JoinSet::new();
    for chunk in ids.chunks(devices.div_ceil(64)) {
        let rt = rt.clone();
        let chunk = chunk.to_vec();
        warm.spawn(async move {
            for round in 0..warmup {
                for id in &chunk {
                    let event =
                        format!(r#"{{"type":"reading","celsius":{}}}"#, 19.0 + round as f64);
                    rt.send(id, &event).await?;
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = warm.join_next().await {
        r??;
    }

    let bytes_before = rt.journal().durable_len();
    let commits_before = rt.journal().stats().commits.load(Ordering::Relaxed);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    let batch = env_or("DROVER_BENCH_BATCH", 0) as usize;
    // None without batches (0), else at least one.
    let batchers = in_flight.checked_div(batch).map_or(0, |n| n.max(1));
    for _ in 0..batchers {
        let (rt, ids, next) = (rt.clone(), ids.clone(), next.clone());
        workers.spawn(async move {
            let mut samples: Vec<u32> = Vec::with_capacity(events as usize / batchers + batch);
            loop {
                // Events `first..first + batch`, to as many consecutive devices: every device
                // gets one event per pass over the fleet, as in the unbatched mode.
                let first = next.fetch_add(batch as u64, Ordering::Relaxed);
                if first >= events {
                    break;
                }
                let t = Instant::now();
                let mut sends = Vec::with_capacity(batch);
                {
                    // Not `Send`: dropped before the first await.
                    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                    let rt = &rt;
                    for n in first..(first + batch as u64).min(events) {
                        let id = &ids[n as usize % ids.len()];
                        let event = reading(n, ids.len());
                        let mut send = Box::pin(async move { (n, id, rt.send(id, &event).await) });
                        // The first poll puts the event into the mailbox, in order.
                        let polled = std::future::Future::poll(send.as_mut(), &mut cx);
                        sends.push((send, polled));
                    }
                }
                for (send, polled) in sends {
                    let (n, id, mut sent) = match polled {
                        std::task::Poll::Ready(r) => r,
                        std::task::Poll::Pending => send.await,
                    };
                    // Refused, not queued: the same event again (it may now follow a later
                    // one of its device, which the thermostat takes in any order).
                    while let Err(drover::Error::MailboxFull) = sent {
                        tokio::task::yield_now().await;
                        sent = rt.send(id, &reading(n, ids.len())).await;
                    }
                    if let Err(e) = sent {
                        return Err(anyhow::anyhow!("{id}: {e}"));
                    }
                    samples.push(t.elapsed().as_micros().clamp(1, u32::MAX as u128) as u32);
                }
            }
            anyhow::Ok(samples)
        });
    }
    for w in (0..in_flight).filter(|_| batch == 0) {
        let rt = rt.clone();
        let ids = ids.clone();
        let next = next.clone();
        workers.spawn(async move {
            // Raw samples, merged at the end: a histogram per worker would be 4,096 × 240 KB of
            // counters, and the cache misses would be measured instead of Drover.
            let mut samples: Vec<u32> = Vec::with_capacity((events as usize / in_flight) + 1);
            let mut i = w;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= events {
                    break;
                }
                let id = &ids[i % ids.len()];
                i += in_flight;
                let event = reading(n, ids.len());
                let t = Instant::now();
                loop {
                    match rt.send(id, &event).await {
                        Ok(_) => break,
                        Err(drover::Error::MailboxFull) => tokio::task::yield_now().await,
                        Err(e) => return Err(anyhow::anyhow!("{id}: {e}")),
                    }
                }
                samples.push(t.elapsed().as_micros().clamp(1, u32::MAX as u128) as u32);
            }
            anyhow::Ok(samples)
        });
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    while let Some(r) = workers.join_next().await {
        for us in r?? {
            hist.record(u64::from(us))?;
        }
    }
    let elapsed = start.elapsed();
    let bytes = rt.journal().durable_len() - bytes_before;
    let commits = rt.journal().stats().commits.load(Ordering::Relaxed) - commits_before;
    println!(
        "{:>8} {:>12.0} {:>10} {:>10} {:>12.1} {:>12.1}",
        devices,
        events as f64 / elapsed.as_secs_f64(),
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        bytes as f64 / events as f64,
        events as f64 / commits.max(1) as f64,
    );
    rt.shutdown().await;
    let _ = std::fs::remove_dir_all(&root);
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

/// Event `n` of the run over `devices` devices. Each device's readings drift slowly through
/// the hysteresis band, as a real sensor's would: mostly one transition per event, sometimes
/// two.
fn reading(n: u64, devices: usize) -> String {
    let step = n / devices as u64;
    let celsius = 19.0 + (step % 50) as f64 / 10.0;
    format!(r#"{{"type":"reading","celsius":{celsius}}}"#)
}
