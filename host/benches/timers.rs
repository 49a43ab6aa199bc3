//! Durable timers at fleet scale: what they cost in memory, what setting them costs, how
//! late they fire, and how soon they fire again after a restart.
//!
//! `cargo bench -p drover --bench timers` first measures the memory of the timer index alone,
//! with M timers over M devices (default 1,000,000): it writes two journals straight through
//! the journal API (no guest runs), M devices with one event each, setting a timer due in an
//! hour in one and no timer in the other, then opens them side by side and prints the heap
//! in use per timer (see `heap_bytes`): of the journal's index (each device's pending
//! timers), and of a runtime (index plus the timer wheel), and how long the runtime took to
//! arm them all at open. Once the timers are overdue it opens that journal again and prints
//! how soon the first fired and how many fired in the next five seconds.
//!
//! Then it provisions N thermostats with a heartbeat timer (`offline_after_ms`) and N
//! without, in one process, and:
//!
//! 1. **baseline**: one reading to each device without a timer (activation + event + commit);
//! 2. **schedule**: one reading to each device with one: the same, plus a kind-9 record and a
//!    timer set, its index entry and its place in the wheel. Prints both rates and the heap
//!    memory per pending timer: growth of the heap in use (`heap_bytes`, which leaves out
//!    guest memories) over round 2 minus over round 1, divided by N;
//! 3. **firing**: waits until every timer fired (the thermostat marks itself offline) and
//!    prints the lateness of each firing (its record's `at_ms` minus its due time) p50 /
//!    p99 / max, and how long the whole wave took from the first due time;
//! 4. **restart**: sets every timer again, stops the runtime, waits until they are all
//!    overdue, opens it again and prints the time from the open to the first firing and to
//!    the last.
//!
//! Options (environment): `DROVER_BENCH_TIMERS` (N, default 100,000),
//! `DROVER_BENCH_TIMER_INDEX` (M, default 1,000,000; 0 skips that part),
//! `DROVER_BENCH_TIMER_PARTS` (which parts run, default `index,burst,devices`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use drover::Runtime;
use drover::journal::{Effect, Fx, Journal, JournalOptions, Origin};

#[path = "support/mod.rs"]
mod common;
#[path = "support/heap.rs"]
mod heap;
use heap::heap_bytes;
#[path = "../tests/support/plugins.rs"]
mod plugins;
use common::{THERMOSTAT, env_or};

async fn open(root: &std::path::Path, n: usize) -> anyhow::Result<Runtime> {
    Runtime::builder(root)
        .plugin("thermostat", THERMOSTAT)
        // Every device stays live: no passivation frees memory in the middle of a round.
        .max_live_instances(2 * n + 1024)
        .idle_timeout(Duration::from_secs(3600))
        .open()
        .await
}

/// Runs `f(id)` for every id, 4,096 tasks at a time; returns the rate per second.
async fn each(
    rt: &Runtime,
    ids: &Arc<Vec<String>>,
    f: impl Fn(Runtime, String) -> futures::future::BoxFuture<'static, anyhow::Result<()>>
    + Send
    + Sync
    + 'static,
) -> anyhow::Result<f64> {
    let f = Arc::new(f);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in ids.chunks(ids.len().div_ceil(4096).max(1)) {
        let (rt, chunk, f) = (rt.clone(), chunk.to_vec(), f.clone());
        tasks.spawn(async move {
            for id in chunk {
                f(rt.clone(), id).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(ids.len() as f64 / started.elapsed().as_secs_f64())
}

fn reading(rt: Runtime, id: String) -> futures::future::BoxFuture<'static, anyhow::Result<()>> {
    send(rt, id, r#"{"type":"reading","celsius":20.0}"#.into())
}

/// Sends `event` to `id`, again while its mailbox is full.
fn send(
    rt: Runtime,
    id: String,
    event: String,
) -> futures::future::BoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
        loop {
            match rt.send(&id, &event).await {
                Ok(_) => return Ok(()),
                Err(drover::Error::MailboxFull) => tokio::task::yield_now().await,
                Err(e) => return Err(anyhow::anyhow!("{id}: {e}")),
            }
        }
    })
}

/// Waits until `committed` events in all are durable (timer firings included).
async fn committed(rt: &Runtime, committed: u64, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    while rt
        .metrics()
        .events_committed
        .load(std::sync::atomic::Ordering::Relaxed)
        < committed
    {
        if started.elapsed() > limit {
            anyhow::bail!("timer firings not committed within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Lateness (ms) of each device's last timer firing, sorted.
fn lateness(rt: &Runtime, ids: &[String]) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let seq = rt.journal().device(id).map_or(0, |d| d.seq);
        let page = rt.journal_page(id, seq, 1)?;
        let r = page
            .records
            .first()
            .ok_or_else(|| anyhow::anyhow!("{id} has no record"))?;
        let origin: serde_json::Value =
            serde_json::from_str(r.origin.as_deref().unwrap_or("null"))?;
        let due = origin["due_ms"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("{id}: the last record is not a timer firing"))?;
        out.push(r.at_ms.saturating_sub(due));
    }
    out.sort_unstable();
    Ok(out)
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// Writes `n` thermostats straight through the journal, each with one event record; with
/// `due`, that record sets a timer due then (as a thermostat's heartbeat does).
async fn write_fleet(root: &std::path::Path, n: usize, due: Option<u64>) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(root);
    // Registered as a runtime does, so that a runtime opens this journal afterwards.
    let rt = open(root, 0).await?;
    let version = rt
        .journal()
        .versions()
        .last()
        .map(|v| v.id)
        .ok_or_else(|| anyhow::anyhow!("no plugin version recorded"))?;
    rt.shutdown().await;
    drop(rt);
    let journal = Journal::open(root, &JournalOptions::default())?;
    let at = drover::clock::now_ms();
    let fx = Fx {
        origin: Origin::External,
        effects: vec![Effect::SetTimer {
            key: "heartbeat".into(),
            due_ms: due.unwrap_or(0),
            every_ms: None,
            event: r#"{"type":"silent"}"#.into(),
        }],
    };
    let ids: Vec<String> = (0..n).map(|i| format!("t-{i:07}")).collect();
    for chunk in ids.chunks(4096) {
        let heads = futures::future::try_join_all(
            chunk
                .iter()
                .map(|id| journal.record_device(id, version, b"{}", at)),
        )
        .await?;
        for head in heads {
            journal.device_writer(head.num, 1).append_event(
                1,
                at,
                version,
                r#"{"type":"reading","celsius":20.0}"#,
                vec![format!(
                    r#"{{"type":"temperature_recorded","celsius":20.0,"at_ms":{at}}}"#
                )],
                due.map(|_| fx.clone()),
                |_, _| {},
            );
        }
    }
    journal.barrier().await?;
    journal.close();
    Ok(())
}

/// The memory of `m` pending timers, without guests: see the module docs.
async fn index_memory(m: usize) -> anyhow::Result<()> {
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (plain, timed) = (
        base.join("bench-timers-plain"),
        base.join("bench-timers-timed"),
    );
    let started = Instant::now();
    write_fleet(&plain, m, None).await?;
    // Due once the memory has been measured (writing the second journal and opening both
    // take less than five times writing the first, with a margin for a loaded machine), so
    // that a restart then finds them all overdue.
    let due = drover::clock::now_ms() + 5 * started.elapsed().as_millis() as u64 + 30_000;
    write_fleet(&timed, m, Some(due)).await?;
    println!(
        "timer index: wrote 2 x {m} devices with one record each in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let per_timer =
        |h: [u64; 3]| ((h[2] as f64 - h[1] as f64) - (h[1] as f64 - h[0] as f64)) / m as f64;
    let options = JournalOptions::default();
    let h0 = heap_bytes();
    let a = Journal::open(&plain, &options)?;
    let h1 = heap_bytes();
    let b = Journal::open(&timed, &options)?;
    let h2 = heap_bytes();
    let index = per_timer([h0, h1, h2]);
    println!(
        "journal index without timers: heap per device {:.0} B (one event record each)",
        (h1 as f64 - h0 as f64) / m as f64
    );
    for j in [a, b] {
        j.close();
    }
    let h0 = heap_bytes();
    let a = open(&plain, 0).await?;
    let h1 = heap_bytes();
    let started = Instant::now();
    let b = open(&timed, 0).await?;
    let opened = started.elapsed();
    while b.timer_wheel_devices() < m {
        if started.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("timers not armed within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let armed = started.elapsed();
    let h2 = heap_bytes();
    let total = per_timer([h0, h1, h2]);
    println!(
        "timer index, {m} timers over {m} devices: heap per pending timer {total:.0} B \
         ({:.0} MB in all): the journal's index {index:.0} B, the timer wheel {:.0} B; \
         open {:.2} s, all armed {:.2} s after it",
        total * m as f64 / 1e6,
        total - index,
        opened.as_secs_f64(),
        (armed - opened).as_secs_f64()
    );
    for rt in [a, b] {
        rt.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&plain);
    anyhow::ensure!(
        drover::clock::now_ms() < due,
        "the timers fell due before the memory was measured: the figures above are not valid"
    );

    // A restart with every one of them overdue: how soon the first fires, and how many
    // fire (each activating its cold device) in the next five seconds.
    let wait = due.saturating_sub(drover::clock::now_ms()) + 100;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let started = Instant::now();
    let rt = open(&timed, 0).await?;
    let opened = started.elapsed();
    committed(&rt, 1, Duration::from_secs(600)).await?;
    let first = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let fired = rt
        .metrics()
        .events_committed
        .load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "restart with {m} timers overdue: open {:.2} s, first firing {:.2} s after the open, \
         {fired} fired in the 5 s after that",
        opened.as_secs_f64(),
        (first - opened).as_secs_f64()
    );
    let stopping = Instant::now();
    rt.shutdown().await;
    println!(
        "  (shutdown with the rest still due took {:.2} s)",
        stopping.elapsed().as_secs_f64()
    );
    drop(rt);
    let _ = std::fs::remove_dir_all(&timed);
    Ok(())
}

/// `n` timers on `n` live devices (the test plugin `misbehave`, whose `arm` event sets a
/// timer at a given time), due at the same instant (`spread_ms` 0) or spread evenly over
/// `spread_ms` (issue 10's "due in the same second"): how long after the last due time the
/// wheel had handed them all out, and all their firings were handled and durable, and each
/// firing's lateness (its record's time minus its own due time).
async fn burst(n: usize, spread_ms: u64) -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-timers-burst");
    let _ = std::fs::remove_dir_all(&root);
    let misbehave = std::fs::read(plugins::plugin_dir().join("misbehave.wasm"))?;
    let rt = Runtime::builder(&root)
        .plugin("misbehave", misbehave)
        .max_live_instances(n + 1024)
        .idle_timeout(Duration::from_secs(3600))
        .open()
        .await?;
    let ids: Arc<Vec<String>> = Arc::new((0..n).map(|i| format!("m-{i:07}")).collect());
    each(&rt, &ids, |rt, id| {
        Box::pin(async move {
            rt.provision(&id, "misbehave", &serde_json::json!({}))
                .await?;
            send(rt, id, r#"{"type":"ok"}"#.into()).await
        })
    })
    .await?;
    // Every device is live now; arming them takes a fraction of activating them.
    let started = Instant::now();
    let first = drover::clock::now_ms() + 5_000;
    // The last one due.
    let due = first + spread_ms;
    each(&rt, &ids, move |rt, id| {
        // Device `m-{i}` is due `i / n` of the spread after the first.
        let i: u64 = id.trim_start_matches("m-").parse().unwrap_or(0);
        let at_ms = first + i * spread_ms / n as u64;
        let arm = format!(r#"{{"type":"arm","key":"k","at_ms":{at_ms},"event":{{"type":"ok"}}}}"#);
        send(rt, id, arm)
    })
    .await?;
    let armed = drover::clock::now_ms();
    anyhow::ensure!(
        armed < first,
        "arming {n} live devices took {:.1} s: due time passed before all were set",
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "armed {n} timers; the first due in {} ms",
        first.saturating_sub(drover::clock::now_ms())
    );
    let committed_before = rt
        .metrics()
        .events_committed
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut handed_out = None;
    loop {
        let now = drover::clock::now_ms();
        let metrics = rt.metrics();
        let fired = metrics
            .timers_fired
            .load(std::sync::atomic::Ordering::Relaxed);
        if handed_out.is_none() && fired >= n as u64 {
            handed_out = Some(now.saturating_sub(due));
        }
        let committed = metrics
            .events_committed
            .load(std::sync::atomic::Ordering::Relaxed);
        if committed >= committed_before + n as u64 {
            let late = lateness(&rt, &ids)?;
            let when = if spread_ms == 0 {
                "due at once".to_string()
            } else {
                format!("due evenly over {spread_ms} ms")
            };
            println!(
                "burst of {n} timers {when} on live devices: all handed out {} ms after \
                 the last due time, all handled and durable {} ms after it; lateness p50 {} \
                 ms, p99 {} ms, max {} ms",
                handed_out.unwrap_or(0),
                now.saturating_sub(due),
                pct(&late, 0.5),
                pct(&late, 0.99),
                pct(&late, 1.0)
            );
            break;
        }
        anyhow::ensure!(
            now < due + 600_000,
            "the burst was not handled within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    rt.shutdown().await;
    drop(rt);
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let n = env_or("DROVER_BENCH_TIMERS", 100_000) as usize;
    let m = env_or("DROVER_BENCH_TIMER_INDEX", 1_000_000) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let parts =
        std::env::var("DROVER_BENCH_TIMER_PARTS").unwrap_or_else(|_| "index,burst,devices".into());
    let part = |name: &str| parts.split(',').any(|p| p.trim() == name);
    if m > 0 && part("index") {
        rt.block_on(index_memory(m))?;
    }
    if n == 0 {
        return Ok(());
    }
    if part("burst") {
        rt.block_on(burst(n, 0))?;
        rt.block_on(burst(n, 1_000))?;
    }
    if part("devices") {
        rt.block_on(run(n))?;
    }
    Ok(())
}

async fn run(n: usize) -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-timers");
    let _ = std::fs::remove_dir_all(&root);
    let rt = open(&root, n).await?;
    println!(
        "drover timers bench: {n} timers over {n} devices ({} cores)",
        std::thread::available_parallelism().map_or(1, |c| c.get())
    );
    // Long enough that every timer is set before the first falls due.
    let due_after_ms = (n as u64 / 5).max(5_000);
    let plain: Arc<Vec<String>> = Arc::new((0..n).map(|i| format!("p-{i:07}")).collect());
    let timed: Arc<Vec<String>> = Arc::new((0..n).map(|i| format!("t-{i:07}")).collect());
    let started = Instant::now();
    each(&rt, &plain, |rt, id| {
        Box::pin(async move {
            rt.provision(&id, "thermostat", &serde_json::json!({}))
                .await?;
            Ok(())
        })
    })
    .await?;
    each(&rt, &timed, move |rt, id| {
        Box::pin(async move {
            let config = serde_json::json!({"offline_after_ms": due_after_ms});
            rt.provision(&id, "thermostat", &config).await?;
            Ok(())
        })
    })
    .await?;
    println!(
        "provisioned {} devices in {:.1} s",
        2 * n,
        started.elapsed().as_secs_f64()
    );

    let before = heap_bytes();
    let baseline = each(&rt, &plain, reading).await?;
    let after_plain = heap_bytes();
    let first_due = drover::clock::now_ms() + due_after_ms;
    let schedule = each(&rt, &timed, reading).await?;
    // Let the dispatcher put the last ones in the wheel.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_timed = heap_bytes();
    let extra = (after_timed as f64 - after_plain as f64) - (after_plain as f64 - before as f64);
    println!(
        "events/s, one reading each: without a timer {baseline:.0}, setting one {schedule:.0}; \
         devices in the timer wheel {}",
        rt.timer_wheel_devices()
    );
    println!(
        "heap in use per device: {:.0} B after a reading without a timer, {:.0} B with one: \
         {:.0} B per pending timer (index entry and wheel)",
        (after_plain as f64 - before as f64) / n as f64,
        (after_timed as f64 - after_plain as f64) / n as f64,
        extra / n as f64
    );

    let limit = Duration::from_millis(due_after_ms) + Duration::from_secs(600);
    committed(&rt, 3 * n as u64, limit).await?;
    let wave = drover::clock::now_ms().saturating_sub(first_due);
    let late = lateness(&rt, &timed)?;
    println!(
        "fired {n}: lateness p50 {} ms, p99 {} ms, max {} ms; last firing handled {:.2} s \
         after the first was due",
        pct(&late, 0.5),
        pct(&late, 0.99),
        late[late.len() - 1],
        wave as f64 / 1000.0
    );

    // Restart with every timer overdue.
    each(&rt, &timed, reading).await?;
    let due_by = drover::clock::now_ms() + due_after_ms;
    rt.shutdown().await;
    drop(rt);
    let wait = due_by.saturating_sub(drover::clock::now_ms()) + 100;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let started = Instant::now();
    let rt = open(&root, n).await?;
    let opened = started.elapsed();
    committed(&rt, 1, Duration::from_secs(600)).await?;
    let first = started.elapsed();
    committed(&rt, n as u64, Duration::from_secs(600)).await?;
    let all = started.elapsed();
    println!(
        "restart with {n} overdue: open {:.2} s, first firing {:.2} s, all fired {:.2} s",
        opened.as_secs_f64(),
        first.as_secs_f64(),
        all.as_secs_f64()
    );
    rt.shutdown().await;
    drop(rt);
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
