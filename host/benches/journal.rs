//! The journal alone: how fast can records become durable, with no guest and no actors.
//!
//! `cargo bench -p drover --bench journal` keeps 4,096 event records in flight across 1,000
//! devices (a record the size of a thermostat reading: ~130 bytes framed), and prints durable
//! records/s, records per fsync, p50/p99 submit-to-durable latency, and the raw fsync cost of
//! a lone 4 KiB append on the same disk for comparison. This is the figure the README uses
//! to justify a home-made log over an embedded database.
//!
//! Then the restart: a fresh process (this binary again) opens the journal as a server start
//! does and prints how long the open took and the resident memory it added (the in-memory
//! index), in four ways, alternated over two rounds: from the index checkpoint a clean close
//! wrote (nothing left to scan); from the last periodic checkpoint, as after a `kill -9`
//! (the records after it scanned); with no checkpoint (a full scan, offsets spilled); and
//! with every offset kept in memory (the full scan of earlier builds). `DROVER_BENCH_KEEP=1` leaves the journal
//! in `target/tmp/bench-journal` (reopen it with another build: `DROVER_BENCH_REOPEN=DIR`). `DROVER_BENCH_EVENTS` sets the records written (default 2,000,000;
//! 10,000,000 for the README's restart figure); `DROVER_BENCH_CHECKPOINT_EVERY` the bytes
//! between index checkpoints while writing (0: none).
//!
//! Before all that, two comparisons made in the same run, alternated three times on fresh
//! journals of `DROVER_BENCH_COMPARE_EVENTS` records (default 1,000,000; 0 skips them):
//!
//! * **segments**: the durable append rate of the segmented journal (`Journal::open`, with
//!   32 MiB segments so that it rolls over about every 250k records) against the same journal
//!   on one plain file (`FileBackend`, as before segments);
//! * **retention**: the append rate with `--retention after-snapshot` deleting segments as
//!   it goes (each device snapshots every 100 events; 32 MiB segments and index checkpoints)
//!   against keeping everything, then one more retention pass timed on its own, with what it
//!   deleted and the bytes left on disk; offsets are spilled every 64Ki records in both, and
//!   the index's run files on disk right after the appends are printed for each.
//!
//! And the cost of one retention pass over a large fleet (`DROVER_BENCH_RETENTION_DEVICES`,
//! default 1,000,000; 0 skips it): three events per device, a snapshot after the second,
//! offsets spilled to run files; a pass with `keep_events` 0 (each device bounded by its
//! snapshot's position, in memory) and with 1 (one offset looked up per device in the runs).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use drover::journal::{Journal, JournalOptions, VersionInfo};
use hdrhistogram::Histogram;
use tokio::sync::{Semaphore, mpsc};

const DEVICES: u32 = 1000;
const IN_FLIGHT: usize = 4096;

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Copies the files of directory `from` into a new directory `to`.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

/// The child's part: open the journal in `dir` and report the time and memory it took.
fn reopen(dir: &std::path::Path) -> anyhow::Result<()> {
    let before = rss_kib();
    let t = Instant::now();
    let spill_at = std::env::var("DROVER_BENCH_SPILL_AT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(drover::journal::INDEX_SPILL_AT);
    let options = JournalOptions {
        index_spill_at: spill_at,
        ..JournalOptions::default()
    };
    let journal = Journal::open(dir, &options)?;
    let took = t.elapsed();
    let after = rss_kib();
    let len = journal.durable_len();
    println!(
        "{} {} {} {} {}",
        took.as_micros(),
        after.saturating_sub(before),
        journal.recovery().records,
        len,
        len - journal.recovery().from_checkpoint.unwrap_or(0)
    );
    journal.close();
    Ok(())
}

/// Records plugin version 0, which every device of these benches runs.
async fn record_plugin_version(journal: &Journal) -> anyhow::Result<()> {
    journal
        .record_version(&VersionInfo {
            id: 0,
            plugin: "p".into(),
            number: 1,
            digest: [0; 32],
            at_ms: 0,
        })
        .await?;
    Ok(())
}

/// Appends `records` event records round-robin over `devices` fresh devices, 4,096 in
/// flight, each device also writing a snapshot every `snapshot_every` of its events (0:
/// none); returns the time until the last is durable.
async fn fill(
    journal: &Journal,
    records: u64,
    devices: u32,
    snapshot_every: u64,
) -> anyhow::Result<std::time::Duration> {
    record_plugin_version(journal).await?;
    // Provisioned 4,096 at a time, so they share commits.
    let mut nums = vec![0u32; devices as usize];
    for from in (0..devices).step_by(IN_FLIGHT) {
        let mut set = tokio::task::JoinSet::new();
        for i in from..(from + IN_FLIGHT as u32).min(devices) {
            let journal = journal.clone();
            set.spawn(async move {
                let head = journal
                    .record_device(&format!("dev-{i:07}"), 0, b"{}", 0)
                    .await;
                (i, head)
            });
        }
        while let Some(done) = set.join_next().await {
            let (i, head) = done?;
            nums[i as usize] = head?.num;
        }
    }
    let writers: Vec<_> = nums
        .iter()
        .map(|num| journal.device_writer(*num, IN_FLIGHT))
        .collect();
    let event = r#"{"type":"reading","celsius":21.5}"#;
    let t1 = r#"{"type":"temperature_recorded","celsius":21.5,"at_ms":1764000000000}"#;
    let window = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut seqs = vec![0u64; devices as usize];
    let start = Instant::now();
    for n in 0..records {
        let permit = window.clone().acquire_owned().await?;
        let device = (n % u64::from(devices)) as usize;
        seqs[device] += 1;
        let seq = seqs[device];
        writers[device].append_event(
            seq,
            1_764_000_000_000 + n,
            0,
            event,
            vec![t1.to_string()],
            None,
            move |_, _| drop(permit),
        );
        if snapshot_every > 0 && seq.is_multiple_of(snapshot_every) {
            writers[device].append_snapshot(seq, 0, vec![7u8; 64])?;
        }
    }
    journal.barrier().await?;
    Ok(start.elapsed())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Bytes of the journal's segment files in `dir`.
fn segment_bytes_on_disk(dir: &std::path::Path) -> u64 {
    drover::journal::SegmentedBackend::list(dir)
        .map(|l| l.iter().map(|s| s.len).sum())
        .unwrap_or(0)
}

/// Bytes of the index's run files beside the journal in `dir`.
fn run_bytes_on_disk(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir.join("journal.log.index"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("run-"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The two same-run comparisons described in the module docs.
async fn compare(root: &std::path::Path, records: u64) -> anyhow::Result<()> {
    use drover::journal::{FileBackend, Retention, RetentionPolicy};
    const SEGMENT: u64 = 32 << 20;
    let base = JournalOptions {
        commit_delay: drover::config::defaults::COMMIT_DELAY,
        segment_bytes: SEGMENT,
        ..JournalOptions::default()
    };
    let rate = |d: std::time::Duration| records as f64 / d.as_secs_f64();
    let (mut segmented, mut one_file) = (Vec::new(), Vec::new());
    let (mut keep_all, mut retaining) = (Vec::new(), Vec::new());
    // The index's runs on disk right after the appends: (keep-all, retention), each round.
    let mut runs_on_disk = Vec::new();
    let mut last_pass = None;
    for _ in 0..3 {
        let dir = root.join("compare");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let journal = Journal::open(&dir, &base)?;
        segmented.push(rate(fill(&journal, records, DEVICES, 0).await?));
        journal.close();
        drop(journal);
        std::fs::remove_dir_all(&dir)?;
        std::fs::create_dir_all(&dir)?;
        let file = FileBackend::open(&dir.join(drover::journal::FILE_NAME))?;
        let journal = Journal::open_on(Arc::new(file), &base)?;
        one_file.push(rate(fill(&journal, records, DEVICES, 0).await?));
        journal.close();
        drop(journal);

        for policy in [RetentionPolicy::KeepAll, RetentionPolicy::AfterSnapshot] {
            std::fs::remove_dir_all(&dir)?;
            std::fs::create_dir_all(&dir)?;
            let options = JournalOptions {
                index_checkpoint_every: SEGMENT,
                // Offsets spilled every 64Ki records rather than 4Mi, so that the runs on
                // disk compare too (both policies alike).
                index_spill_at: 64 << 10,
                retention: Retention {
                    policy,
                    ..Retention::default()
                },
                ..base.clone()
            };
            let journal = Journal::open(&dir, &options)?;
            let took = fill(&journal, records, DEVICES, 100).await?;
            let runs = (
                run_bytes_on_disk(&dir),
                journal.index_usage().spilled_offsets,
            );
            if policy == RetentionPolicy::KeepAll {
                keep_all.push(rate(took));
                runs_on_disk.push((runs, (0, 0)));
            } else {
                if let Some(last) = runs_on_disk.last_mut() {
                    last.1 = runs;
                }
                retaining.push(rate(took));
                // Once the index's thread has written its last checkpoint.
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let before = segment_bytes_on_disk(&dir);
                let t = Instant::now();
                let pass = journal.retain_now()?;
                let secs = t.elapsed().as_secs_f64();
                let status = journal.retention();
                last_pass = Some((secs, pass, status, before, segment_bytes_on_disk(&dir)));
            }
            journal.close();
        }
    }
    let _ = std::fs::remove_dir_all(root.join("compare"));
    println!(
        "drover journal bench, same-run comparisons: {records} records over {DEVICES} devices, 3 rounds alternated, medians (all runs)"
    );
    let runs = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{:.0}k", r / 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "  segmented (32 MiB segments)     {:>8.0}k records/s ({})",
        median(segmented.clone()) / 1e3,
        runs(&segmented)
    );
    println!(
        "  one file (FileBackend)          {:>8.0}k records/s ({})",
        median(one_file.clone()) / 1e3,
        runs(&one_file)
    );
    println!(
        "  snapshots every 100, keep-all   {:>8.0}k records/s ({})",
        median(keep_all.clone()) / 1e3,
        runs(&keep_all)
    );
    println!(
        "  snapshots every 100, retention  {:>8.0}k records/s ({})",
        median(retaining.clone()) / 1e3,
        runs(&retaining)
    );
    for ((kept_bytes, kept_offsets), (retained_bytes, retained_offsets)) in &runs_on_disk {
        println!(
            "  index runs on disk after the appends: keep-all {:.1} MiB ({kept_offsets} offsets), retention {:.1} MiB ({retained_offsets} offsets)",
            *kept_bytes as f64 / (1 << 20) as f64,
            *retained_bytes as f64 / (1 << 20) as f64,
        );
    }
    if let Some((secs, pass, status, before, after)) = last_pass {
        println!(
            "  retention while appending: {} segments, {} MiB deleted; {} MiB on disk once the appends were done",
            status.deleted_segments,
            status.deleted_bytes >> 20,
            before >> 20,
        );
        println!(
            "  one more pass on its own: {:.1} ms, {} segments / {} MiB deleted ({:.0} MiB/s), {} MiB left in {} segments, pinned by {:?}",
            secs * 1e3,
            pass.deleted_segments,
            pass.deleted_bytes >> 20,
            (pass.deleted_bytes >> 20) as f64 / secs.max(1e-9),
            after >> 20,
            status.segments,
            pass.pinned_by
        );
    }
    Ok(())
}

/// The retention pass over a large fleet (see the module docs).
async fn retention_at_scale(root: &std::path::Path, devices: u32) -> anyhow::Result<()> {
    use drover::journal::{Retention, RetentionPolicy};
    let dir = root.join("retention-scale");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let options = |keep_events| JournalOptions {
        commit_delay: drover::config::defaults::COMMIT_DELAY,
        index_spill_at: u64::from(devices),
        index_checkpoint_every: 64 << 20,
        retention: Retention {
            policy: RetentionPolicy::AfterSnapshot,
            keep_events,
            ..Retention::default()
        },
        ..JournalOptions::default()
    };
    let journal = Journal::open(&dir, &options(0))?;
    let took = fill(&journal, 3 * u64::from(devices), devices, 2).await?;
    journal.close();
    drop(journal);
    println!(
        "drover journal bench, retention pass over {devices} devices ({} records written in {:.1} s)",
        3 * u64::from(devices),
        took.as_secs_f64()
    );
    for keep_events in [0, 1, 0, 1] {
        let journal = Journal::open(&dir, &options(keep_events))?;
        let t = Instant::now();
        let pass = journal.retain_now()?;
        println!(
            "  keep_events {keep_events}: pass {:.0} ms ({:.2} µs per device), {} segments deleted, pinned by {:?}",
            t.elapsed().as_secs_f64() * 1e3,
            t.elapsed().as_secs_f64() * 1e6 / f64::from(devices),
            pass.deleted_segments,
            pass.pinned_by.map(|p| p.reason)
        );
        journal.close();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    if let Some(dir) = std::env::var_os("DROVER_BENCH_REOPEN") {
        return reopen(std::path::Path::new(&dir));
    }
    let compare_records: u64 = std::env::var("DROVER_BENCH_COMPARE_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let records: u64 = std::env::var("DROVER_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-journal");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    if compare_records > 0 {
        compare(&root, compare_records).await?;
    }
    let retention_devices: u32 = std::env::var("DROVER_BENCH_RETENTION_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    if retention_devices > 0 {
        retention_at_scale(&root, retention_devices).await?;
    }

    // Raw fsync cost of a small append, for scale.
    let probe = root.join("probe");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&probe)?;
    let mut fsync_us = Vec::new();
    for _ in 0..200 {
        use std::io::Write;
        let t = Instant::now();
        (&file).write_all(&[7u8; 4096])?;
        file.sync_data()?;
        fsync_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    fsync_us.sort_by(f64::total_cmp);

    // `DROVER_BENCH_CHECKPOINT_EVERY=0` writes without index checkpoints (to compare the
    // append rate with and without them).
    let checkpoint_every = std::env::var("DROVER_BENCH_CHECKPOINT_EVERY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(drover::journal::INDEX_CHECKPOINT_EVERY);
    let journal = Journal::open(
        &root,
        &JournalOptions {
            commit_delay: drover::config::defaults::COMMIT_DELAY,
            index_checkpoint_every: checkpoint_every,
            ..JournalOptions::default()
        },
    )?;
    record_plugin_version(&journal).await?;
    let mut writers = Vec::new();
    for num in 0..DEVICES {
        let head = journal
            .record_device(&format!("dev-{num:05}"), 0, b"{}", 0)
            .await?;
        writers.push(journal.device_writer(head.num, IN_FLIGHT));
    }

    let event = r#"{"type":"reading","celsius":21.5}"#;
    let t1 = r#"{"type":"temperature_recorded","celsius":21.5,"at_ms":1764000000000}"#;
    let window = Arc::new(Semaphore::new(IN_FLIGHT));
    let (lat_tx, mut lat_rx) = mpsc::unbounded_channel::<u64>();
    let bytes_before = journal.durable_len();
    let commits_before = journal.stats().commits.load(Ordering::Relaxed);
    let mut seqs = vec![0u64; DEVICES as usize];
    let start = Instant::now();
    for n in 0..records {
        let permit = window.clone().acquire_owned().await?;
        let device = (n % u64::from(DEVICES)) as usize;
        seqs[device] += 1;
        let submitted = Instant::now();
        let lat_tx = lat_tx.clone();
        writers[device].append_event(
            seqs[device],
            1_764_000_000_000 + n,
            0,
            event,
            vec![t1.to_string()],
            None,
            move |r, _| {
                drop(permit);
                if r.is_ok() {
                    let _ = lat_tx.send(submitted.elapsed().as_micros() as u64);
                }
            },
        );
    }
    journal.barrier().await?;
    let elapsed = start.elapsed();
    // The index directory as a `kill -9` now would leave it: the last periodic checkpoint
    // (once the index's thread is done with the last spill or checkpoint).
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let index_dir = root.join("journal.log.index");
    let after_crash = root.join("index-after-crash");
    copy_dir(&index_dir, &after_crash)?;
    drop(lat_tx);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    while let Some(us) = lat_rx.recv().await {
        hist.record(us.max(1))?;
    }
    let bytes = journal.durable_len() - bytes_before;
    let commits = journal.stats().commits.load(Ordering::Relaxed) - commits_before;
    println!("drover journal bench: {records} records, {IN_FLIGHT} in flight, {DEVICES} devices");
    println!(
        "  lone 4 KiB append + fdatasync  p50 {:>8.0} µs",
        fsync_us[fsync_us.len() / 2]
    );
    println!(
        "  durable records/s              {:>12.0}",
        records as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  bytes per record               {:>12.1}",
        bytes as f64 / records as f64
    );
    println!(
        "  records per fsync              {:>12.1}",
        records as f64 / commits.max(1) as f64
    );
    println!(
        "  submit -> durable p50 / p99    {:>8} / {} µs",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99)
    );
    journal.close();
    drop(journal);
    let after_close = root.join("index-after-close");
    copy_dir(&index_dir, &after_close)?;

    // A server start, in a process of its own so the memory figure is the index alone.
    let spilling = drover::journal::INDEX_SPILL_AT;
    for round in 0..2 {
        for (what, spill_at, index) in [
            ("clean close checkpoint", spilling, Some(&after_close)),
            ("kill -9 checkpoint", spilling, Some(&after_crash)),
            ("no checkpoint", spilling, None),
            ("all in memory", 0, None),
        ] {
            let _ = std::fs::remove_dir_all(&index_dir);
            if let Some(saved) = index {
                copy_dir(saved, &index_dir)?;
            }
            let out = std::process::Command::new(std::env::current_exe()?)
                .env("DROVER_BENCH_REOPEN", &root)
                .env("DROVER_BENCH_SPILL_AT", spill_at.to_string())
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let fields: Vec<u64> = text
                .split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect();
            if let [us, kib, records, len, scanned] = fields[..] {
                println!(
                    "  restart {round}, {what:<22}: open {:.2} s, +{} MiB resident, {records} records, {} MiB journal, {} MiB scanned ({:.1} bytes of memory per record)",
                    us as f64 / 1e6,
                    kib / 1024,
                    len >> 20,
                    scanned >> 20,
                    (kib * 1024) as f64 / records.max(1) as f64
                );
            } else {
                anyhow::bail!(
                    "reopen failed: {text}{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    if std::env::var_os("DROVER_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    Ok(())
}
