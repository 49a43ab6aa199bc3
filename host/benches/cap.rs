//! Cold bursts through a small live-instance cap: many devices, each woken once, while the
//! cap holds only a few of them live.
//!
//! `cargo bench -p drover --bench cap` provisions N thermostats, then sends one event to
//! each of them from 4,096 concurrent senders, in a runtime whose live-instance cap is C:
//! every event activates its device, which must first take a slot of the cap (see
//! `host/src/actor/live_slots.rs`), waiting while the router passivates the least recently
//! used. An event that waits past the activation budget is refused `overloaded`. It prints,
//! per round: events handled per second, how many were refused, the highest live count
//! seen (sampled every millisecond; never above C if the cap holds), and the process's CPU
//! time per handled event (user + system, `/proc/self/stat`), which is where a costly sweep for
//! victims shows.
//!
//! Options (environment): `DROVER_BENCH_CAP` (default 50), `DROVER_BENCH_DEVICES` (default
//! 20000), `DROVER_BENCH_ROUNDS` (default 3; each round wakes every device once more, all
//! passivated again by then but the last C).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use drover::Runtime;

#[path = "support/mod.rs"]
mod common;
use common::{THERMOSTAT, env_or};

/// User plus system CPU time of this process so far (`/proc/self/stat`, in clock ticks).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime: fields 14 and 15 of the line, 11 and 12 (from 0) after the name.
    let total = ticks(11) + ticks(12);
    Duration::from_secs_f64(total as f64 / rustix::param::clock_ticks_per_second() as f64)
}

fn main() -> anyhow::Result<()> {
    let cap = env_or("DROVER_BENCH_CAP", 50) as usize;
    let devices = env_or("DROVER_BENCH_DEVICES", 20_000) as usize;
    let rounds = env_or("DROVER_BENCH_ROUNDS", 3);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(cap, devices, rounds))
}

async fn run(cap: usize, devices: usize, rounds: u64) -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-cap");
    let _ = std::fs::remove_dir_all(&root);
    let rt = Runtime::builder(&root)
        .plugin("thermostat", THERMOSTAT)
        .max_live_instances(cap)
        .idle_timeout(Duration::from_secs(3600))
        .open()
        .await?;
    let ids: Arc<Vec<String>> = Arc::new((0..devices).map(|i| format!("t-{i:07}")).collect());
    common::provision_thermostats(&rt, &ids, 256).await?;
    println!("cap {cap}, {devices} devices, 4096 senders, each device woken once per round");
    println!(
        "{:>5} {:>10} {:>9} {:>9} {:>9} {:>12}",
        "round", "handled/s", "handled", "refused", "peak live", "CPU µs/event"
    );
    for round in 1..=rounds {
        let next = Arc::new(AtomicU64::new(0));
        let (handled, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let peak = Arc::new(AtomicU64::new(0));
        let sampling = {
            let (rt, peak) = (rt.clone(), peak.clone());
            tokio::spawn(async move {
                loop {
                    let live = rt.metrics().live_instances.load(Ordering::Relaxed);
                    peak.fetch_max(live, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        let (cpu, started) = (cpu_time(), Instant::now());
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..4096 {
            let (rt, ids, next) = (rt.clone(), ids.clone(), next.clone());
            let (handled, refused) = (handled.clone(), refused.clone());
            workers.spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(id) = ids.get(n) else { break };
                    let event = format!(r#"{{"type":"reading","celsius":{}}}"#, 19 + n % 5);
                    match rt.send(id, &event).await {
                        Ok(_) => handled.fetch_add(1, Ordering::Relaxed),
                        Err(drover::Error::Overloaded(_)) => {
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(e) => return Err(anyhow::anyhow!("{id}: {e}")),
                    };
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = workers.join_next().await {
            r??;
        }
        let (took, cpu) = (started.elapsed(), cpu_time() - cpu);
        sampling.abort();
        let handled = handled.load(Ordering::Relaxed);
        println!(
            "{round:>5} {:>10.0} {handled:>9} {:>9} {:>9} {:>12.1}",
            handled as f64 / took.as_secs_f64(),
            refused.load(Ordering::Relaxed),
            peak.load(Ordering::Relaxed),
            cpu.as_secs_f64() * 1e6 / handled.max(1) as f64
        );
    }
    rt.shutdown().await;
    drop(rt);
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
