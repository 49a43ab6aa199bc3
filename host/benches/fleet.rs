//! Memory and throughput of a large fleet in one process: live actors, passivated devices.
//!
//! `cargo bench -p drover --bench fleet` provisions N thermostats (each provisioning runs
//! the plugin's `init` once and writes one durable record; no instance stays live), then
//! activates every one of them with one event, then sends events uniformly at random over
//! all of them. It prints, per N:
//!
//! * RSS (resident set, `/proc/self/status`) and PSS after provisioning and after activation;
//!   **per live actor** = RSS growth over activation / N: everything the process keeps per
//!   live device (the instance with its store, the guest pages it touched, the actor and its
//!   mailbox).
//! * the heap in use (`support/heap.rs`: the allocator's own count of live blocks, which
//!   leaves out the guests' linear memories, which are mappings of their own): **per passivated
//!   device** = growth over provisioning / N (journal index, router entry), and **heap per
//!   live actor** = growth over activation / N (the host's side of a live actor). RSS is
//!   too coarse for the first: the allocator keeps freed pages for reuse, and growth under
//!   1 KiB per device is lost in them.
//! * page tables per live actor (`VmPTE` growth over activation / N): not in the resident
//!   set, but memory all the same, spent on mapping each actor's scattered guest pages.
//! * memory mappings (`/proc/self/maps` lines) with N live: the kernel caps a process at
//!   `vm.max_map_count` (65,530 here), which is what limited live instances before.
//! * events/s over the N live actors (durable, 4,096 in flight).
//!
//! Last, **growth**: 1,000 devices of the test plugin `misbehave`, live after one small
//! event each, then one event each whose transition is 64 KiB, which makes the guest grow its
//! memory: prints the resident growth per actor and the memory mappings before and after
//! (what a grown memory costs; see `host/src/engine/memory.rs`).
//!
//! Options (environment): `DROVER_BENCH_LIVE` (sizes, default `10000,100000`),
//! `DROVER_BENCH_PROVISIONED` (devices provisioned per size, default: the size; e.g.
//! `1000000` with size 100000 measures 1M provisioned, 100k live), `DROVER_BENCH_EVENTS`
//! (events of the throughput round, default 500,000).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use drover::Runtime;

#[path = "support/mod.rs"]
mod common;
#[path = "support/heap.rs"]
mod heap;
#[path = "../tests/support/plugins.rs"]
mod plugins;
use common::{THERMOSTAT, env_or};
use heap::heap_bytes;

/// Field `name` (e.g. `VmRSS:`) of a `/proc` status-like `text`, in KiB (0 if absent).
fn kib_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// (RSS, PSS, page tables) of this process in KiB. Page tables are not part of the resident
/// set, but they are memory the kernel spends on the process's mappings: a live actor's few
/// touched guest pages need a page-table page of their own unless neighbours share it.
fn memory_kib() -> (u64, u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    (
        kib_field(&status, "VmRSS:"),
        kib_field(&rollup, "Pss:"),
        kib_field(&status, "VmPTE:"),
    )
}

/// The peak resident set (`VmHWM`) in KiB since the last [`reset_peak`].
fn peak_kib() -> u64 {
    kib_field(
        &std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
        "VmHWM:",
    )
}

/// Resets the peak resident set to the current one (`clear_refs` value 5, Linux 4.0+), so
/// each size's peak is its own.
fn reset_peak() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        tracing::debug!(error = %e, "cannot reset the peak resident set");
    }
}

fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count())
}

fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::var("DROVER_BENCH_LIVE")
        .unwrap_or_else(|_| "10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "drover fleet bench: {} cores; memory in KiB; per-device figures are growth / devices",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:>9} {:>8} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10} {:>10} {:>10} {:>9} {:>10} {:>10}",
        "provisnd",
        "live",
        "RSS idle",
        "RSS live",
        "RSS peak",
        "B/passivatd",
        "B/live RSS",
        "B/live PSS",
        "B/live heap",
        "B/live PTE",
        "mappings",
        "events/s",
        "activate/s"
    );
    for live in sizes {
        let provisioned = env_or("DROVER_BENCH_PROVISIONED", live as u64).max(live as u64);
        rt.block_on(run(provisioned as usize, live))?;
    }
    rt.block_on(growth(1000))?;
    Ok(())
}

/// Resident growth per live actor when each guest grows its memory once.
async fn growth(n: usize) -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-fleet-growth");
    let _ = std::fs::remove_dir_all(&root);
    let misbehave = std::fs::read(plugins::plugin_dir().join("misbehave.wasm"))?;
    let rt = Runtime::builder(&root)
        .plugin("misbehave", misbehave)
        .idle_timeout(Duration::from_secs(3600))
        .open()
        .await?;
    let ids: Vec<String> = (0..n).map(|i| format!("m-{i:05}")).collect();
    for id in &ids {
        rt.provision(id, "misbehave", &serde_json::json!({}))
            .await?;
        rt.send(id, r#"{"type":"ok"}"#).await?;
    }
    let ((before, _, _), maps_before) = (memory_kib(), mappings());
    for id in &ids {
        rt.send(id, r#"{"type":"big","kb":64}"#).await?;
    }
    let ((after, _, _), maps_after) = (memory_kib(), mappings());
    println!(
        "growth: {n} live misbehave actors, one 64 KiB transition each (the guest grows its \
         memory): {:.0} KiB more resident per actor; memory mappings {maps_before} -> \
         {maps_after}",
        after.saturating_sub(before) as f64 / n as f64
    );
    rt.shutdown().await;
    drop(rt);
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

async fn run(provisioned: usize, live: usize) -> anyhow::Result<()> {
    let root =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-fleet-{live}"));
    let _ = std::fs::remove_dir_all(&root);
    reset_peak();
    let rt = Runtime::builder(&root)
        .plugin("thermostat", THERMOSTAT)
        .max_live_instances(live + 1024)
        .idle_timeout(Duration::from_secs(3600))
        .open()
        .await?;
    let ids: Arc<Vec<String>> = Arc::new((0..provisioned).map(|i| format!("t-{i:07}")).collect());
    let base_heap = heap_bytes();
    common::provision_thermostats(&rt, &ids, 512).await?;
    let (idle_rss, idle_pss, idle_pte) = memory_kib();
    let idle_heap = heap_bytes();

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let live_ids: Arc<Vec<String>> = Arc::new(ids[..live].to_vec());
    for chunk in live_ids.chunks(live.div_ceil(1024)) {
        let rt = rt.clone();
        let chunk = chunk.to_vec();
        tasks.spawn(async move {
            for id in chunk {
                rt.send(&id, r#"{"type":"reading","celsius":20.0}"#).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let activate_rate = live as f64 / started.elapsed().as_secs_f64();
    let (live_rss, live_pss, live_pte) = memory_kib();
    let live_heap = heap_bytes();
    let maps = mappings();
    if let Ok(out) = std::env::var("DROVER_BENCH_MAPS_OUT") {
        std::fs::copy("/proc/self/maps", out)?;
    }
    let actually_live = rt.live_actors();

    let events = env_or("DROVER_BENCH_EVENTS", 500_000);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..4096u64 {
        let rt = rt.clone();
        let ids = live_ids.clone();
        let next = next.clone();
        workers.spawn(async move {
            // A per-worker xorshift: uniformly random devices, no shared state.
            let mut x = w.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= events {
                    break;
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let id = &ids[(x % ids.len() as u64) as usize];
                let event = format!(r#"{{"type":"reading","celsius":{}}}"#, 19 + n % 5);
                loop {
                    match rt.send(id, &event).await {
                        Ok(_) => break,
                        Err(drover::Error::MailboxFull) => tokio::task::yield_now().await,
                        Err(e) => return Err(anyhow::anyhow!("{id}: {e}")),
                    }
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = workers.join_next().await {
        r??;
    }
    let rate = events as f64 / start.elapsed().as_secs_f64();
    println!(
        "{:>9} {:>8} {:>10} {:>10} {:>10} {:>12.0} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>9} {:>10.0} {:>10.0}",
        provisioned,
        actually_live,
        idle_rss,
        live_rss,
        peak_kib(),
        idle_heap.saturating_sub(base_heap) as f64 / provisioned as f64,
        (live_rss.saturating_sub(idle_rss) * 1024) as f64 / live as f64,
        (live_pss.saturating_sub(idle_pss) * 1024) as f64 / live as f64,
        live_heap.saturating_sub(idle_heap) as f64 / live as f64,
        (live_pte.saturating_sub(idle_pte) * 1024) as f64 / live as f64,
        maps,
        rate,
        activate_rate,
    );
    rt.shutdown().await;
    drop(rt);
    let _ = std::fs::remove_dir_all(&root);
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}
