//! Cost of the sandbox itself: guest calls into the real thermostat component, no journal.
//!
//! `cargo bench -p drover --bench guest` prints medians of: instantiate + init, handle + apply
//! of one reading, snapshot, restore, and replay throughput (`apply` per transition and
//! `apply-batch` of 256). Also handle + apply of one reading with each event going to the
//! next of many live instances in turn (`DROVER_BENCH_FLEETS`, default `1000,10000`): what a
//! call costs on an instance that has gone cold in the caches, as in a fleet where every
//! event wakes a different device; and a near-empty call round-robin the same way, the
//! host's share of that price.

use std::sync::Arc;
use std::time::Instant;

use drover::engine::{Engine, EngineConfig, EventContext};

#[path = "../tests/support/plugins.rs"]
mod plugins;

/// The example thermostat component, as the build made it.
const THERMOSTAT: &[u8] = include_bytes!(concat!(
    env!("DROVER_EXAMPLE_PLUGIN_DIR"),
    "/thermostat.wasm"
));

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    // `DROVER_BENCH_GUARD_PAGES=1`: wasmtime's default memory layout (see
    // `EngineConfig::guard_pages`), to compare with the compact default in the same session.
    let engine = Engine::new(EngineConfig {
        guard_pages: std::env::var_os("DROVER_BENCH_GUARD_PAGES").is_some(),
        ..EngineConfig::default()
    })?;
    let plugin = engine.compile(THERMOSTAT)?;
    let id: Arc<str> = Arc::from("t-1");
    let config = r#"{"setpoint":21.0}"#;

    let mut inst_us = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        let mut i = plugin.instantiate(id.clone())?;
        i.init(&id, config)?;
        inst_us.push(t.elapsed().as_secs_f64() * 1e6);
    }

    let mut i = plugin.instantiate(id.clone())?;
    i.init(&id, config)?;
    let events: Vec<String> = (0..64)
        .map(|n| {
            format!(
                r#"{{"type":"reading","celsius":{}}}"#,
                18.0 + n as f64 / 10.0
            )
        })
        .collect();
    let mut per_event = Vec::new();
    let mut transitions = Vec::new();
    for round in 0..50 {
        let n = 10_000;
        let t = Instant::now();
        for k in 0..n {
            let ctx = EventContext {
                device_id: "t-1".into(),
                seq: (round * n + k + 1) as u64,
                at_ms: 1_700_000_000_000,
                seed: 7,
                origin: drover::engine::Origin::External,
            };
            let out = i.handle(&ctx, &events[k % events.len()])?.transitions;
            for tr in &out {
                i.apply(tr)?;
            }
            if round == 0 && transitions.len() < 100_000 {
                transitions.extend(out);
            }
        }
        per_event.push(t.elapsed().as_secs_f64() * 1e6 / n as f64);
    }
    let snapshot = i.snapshot()?;
    let mut snap_us = Vec::new();
    let mut restore_us = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        let s = i.snapshot()?;
        snap_us.push(t.elapsed().as_secs_f64() * 1e6);
        let mut j = plugin.instantiate(id.clone())?;
        let t = Instant::now();
        j.restore(&s)?;
        restore_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    // Replay one call per transition (what plugins built before contract 0.3.0 get) and
    // in batches of 256 (`apply-batch`), alternated, five rounds each.
    let borrowed: Vec<&str> = transitions.iter().map(String::as_str).collect();
    let (mut one_by_one, mut batched) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let mut j = plugin.instantiate(id.clone())?;
        j.restore(&snapshot)?;
        let t = Instant::now();
        for tr in &borrowed {
            j.apply(tr)?;
        }
        one_by_one.push(borrowed.len() as f64 / t.elapsed().as_secs_f64());
        let mut j = plugin.instantiate(id.clone())?;
        j.restore(&snapshot)?;
        let t = Instant::now();
        for batch in borrowed.chunks(256) {
            j.apply_batch(batch).map_err(|e| e.error)?;
        }
        batched.push(borrowed.len() as f64 / t.elapsed().as_secs_f64());
    }

    let misbehave = engine.compile(&std::fs::read(
        plugins::plugin_dir().join("misbehave.wasm"),
    )?)?;
    // The same events round-robin over many instances, one event each per turn, as a fleet
    // whose every event wakes a different device runs them: by the time an instance's turn
    // comes again, what its call touches (its store, instances and guest pages) has left the
    // caches. Single-threaded, no actor and no journal: the cold instance's price alone.
    let fleets: Vec<usize> = std::env::var("DROVER_BENCH_FLEETS")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let mut round_robin = Vec::new();
    for &n in &fleets {
        let mut fleet = Vec::with_capacity(n);
        for _ in 0..n {
            let mut j = plugin.instantiate(id.clone())?;
            j.init(&id, config)?;
            fleet.push(j);
        }
        let mut rounds = Vec::new();
        let mut seq = 0u64;
        // At least 100,000 events per size, in at least three rounds, so the median is of runs
        // long enough to time.
        for _ in 0..(100_000 / n).max(3) {
            let t = Instant::now();
            for j in fleet.iter_mut() {
                seq += 1;
                let ctx = EventContext {
                    device_id: "t-1".into(),
                    seq,
                    at_ms: 1_700_000_000_000,
                    seed: 7,
                    origin: drover::engine::Origin::External,
                };
                // Readings that sweep the hysteresis band on every instance, as on the warm one.
                let event = &events[seq as usize % events.len()];
                for tr in j.handle(&ctx, event)?.transitions {
                    j.apply(&tr)?;
                }
            }
            rounds.push(t.elapsed().as_secs_f64() * 1e6 / n as f64);
        }
        drop(fleet);
        // The same for a call that does almost nothing (misbehave's `query`), whose guest
        // touches little memory of its own: what is left is the host's side of a cold call.
        let mut fleet = Vec::with_capacity(n);
        for _ in 0..n {
            let mut m = misbehave.instantiate(id.clone())?;
            m.init(&id, "{}")?;
            fleet.push(m);
        }
        let mut bare = Vec::new();
        for _ in 0..(100_000 / n).max(3) {
            let t = Instant::now();
            for m in fleet.iter_mut() {
                m.query()?;
            }
            bare.push(t.elapsed().as_secs_f64() * 1e6 / n as f64);
        }
        round_robin.push((n, median(rounds), median(bare)));
    }

    // The floor: a call that does almost nothing (misbehave's `query` of a two-field state).
    let mut m = misbehave.instantiate(id.clone())?;
    m.init(&id, "{}")?;
    let mut bare = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        for _ in 0..10_000 {
            m.query()?;
        }
        bare.push(t.elapsed().as_secs_f64() * 1e6 / 10_000.0);
    }

    println!("drover guest bench (thermostat component, medians)");
    println!("  near-empty call (query) {:>8.2} µs", median(bare));
    println!("  instantiate + init      {:>8.1} µs", median(inst_us));
    println!("  handle + apply (1 event){:>8.2} µs", median(per_event));
    for (n, event, bare) in round_robin {
        println!(
            "  round-robin over {n:>6} instances: handle + apply {event:>6.2} µs, near-empty call {bare:>6.2} µs"
        );
    }
    println!(
        "  snapshot                {:>8.2} µs ({} bytes)",
        median(snap_us),
        snapshot.len()
    );
    println!("  instantiate-free restore{:>8.2} µs", median(restore_us));
    println!(
        "  replay, apply per call  {:>8.0} transitions/s",
        median(one_by_one)
    );
    println!(
        "  replay, apply-batch 256 {:>8.0} transitions/s",
        median(batched)
    );
    Ok(())
}
