//! Crash simulations and failure-path tests for the journal.

use std::fs::OpenOptions;
use std::sync::Arc;

use super::*;

/// Opens `dir`'s journal (as the runtime does) and returns it with what recovery found.
fn open_dir(dir: &Path) -> std::io::Result<(Journal, Recovery)> {
    open_with(dir, false)
}

fn open_with(dir: &Path, salvage: bool) -> std::io::Result<(Journal, Recovery)> {
    let options = JournalOptions {
        salvage,
        ..JournalOptions::default()
    };
    let journal = Journal::open(dir, &options)?;
    let recovery = journal.recovery().clone();
    Ok((journal, recovery))
}

/// A journal in `dir` whose storage fails on command.
fn open_faulty(dir: &Path) -> (Journal, Arc<Faults>) {
    let file = FileBackend::open(&dir.join(FILE_NAME)).expect("file");
    let (faulty, faults) = FaultyBackend::new(file);
    let journal = Journal::open_on(Arc::new(faulty), &JournalOptions::default()).expect("open");
    (journal, faults)
}

fn version_record(id: u32) -> (Record, IndexEffect) {
    let info = VersionInfo {
        id,
        plugin: "p".into(),
        number: id + 1,
        digest: [id as u8; 32],
        at_ms: 1,
    };
    (
        Record::Version {
            id,
            plugin: info.plugin.clone(),
            number: info.number,
            digest: info.digest,
            at_ms: 1,
        },
        IndexEffect::Version(info),
    )
}

fn device_record(num: u32, id: &str) -> (Record, IndexEffect) {
    (
        Record::Device {
            num,
            id: id.into(),
            version: 0,
            config: b"{}".to_vec(),
            at_ms: 2,
        },
        IndexEffect::Device(DeviceInfo {
            num,
            id: Arc::from(id),
            version: 0,
            config: Arc::from(&b"{}"[..]),
            created_at_ms: 2,
            events: Vec::new(),
            snapshots: Vec::new(),
            dead_letters: Default::default(),
        }),
    )
}

fn event(device: u32, seq: u64) -> (Record, IndexEffect) {
    (
        Record::Event(EventRecord {
            device,
            seq,
            at_ms: 1000 + seq,
            version: 0,
            event: format!(r#"{{"n":{seq}}}"#).into_bytes(),
            transitions: vec![format!(r#"{{"t":{seq}}}"#).into_bytes()],
        }),
        IndexEffect::Event { device, seq },
    )
}

/// Appends event `seq` through `writer` without waiting; the receiver yields the outcome.
fn append_event(
    writer: &DeviceWriter,
    seq: u64,
) -> tokio::sync::oneshot::Receiver<Result<(), JournalError>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    writer.append_event(
        seq,
        1000 + seq,
        0,
        &format!(r#"{{"n":{seq}}}"#),
        vec![format!(r#"{{"t":{seq}}}"#)],
        move |r, _| {
            let _ = tx.send(r);
        },
    );
    rx
}

async fn seeded(dir: &Path, events: u64) -> Journal {
    let (journal, recovery) = open_dir(dir).expect("open");
    assert!(recovery.dropped.is_none());
    let (r, e) = version_record(0);
    journal.append(&r, e).await.expect("version");
    let (r, e) = device_record(0, "a");
    journal.append(&r, e).await.expect("device");
    for seq in 1..=events {
        let (r, e) = event(0, seq);
        journal.append(&r, e).await.expect("event");
    }
    journal
}

#[tokio::test]
async fn records_survive_reopen_with_the_same_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 10).await;
    let before = journal.read_events(0, 1, 10).expect("read");
    let len = journal.durable_len();
    journal.close();
    drop(journal);

    let (journal, recovery) = open_dir(dir.path()).expect("reopen");
    assert!(recovery.dropped.is_none());
    assert_eq!(recovery.records, 12);
    assert_eq!(recovery.valid_len, len);
    assert_eq!(journal.read_events(0, 1, 10).expect("read"), before);
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(10));
}

#[tokio::test]
async fn a_torn_last_record_is_reported_and_dropped_never_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 5).await;
    let intact = journal.read_events(0, 1, 4).expect("read");
    let len = journal.durable_len();
    journal.close();
    drop(journal);

    // The process died in the middle of writing record 5: its last 3 bytes never arrived.
    let path = dir.path().join(FILE_NAME);
    let file = OpenOptions::new().write(true).open(&path).expect("open");
    file.set_len(len - 3).expect("truncate");
    drop(file);

    let (journal, recovery) = open_dir(dir.path()).expect("reopen");
    let dropped = recovery.dropped.expect("torn tail reported");
    assert!(dropped.torn, "{dropped:?}");
    assert!(
        dropped.saved_to.as_ref().is_some_and(|p| p.exists()),
        "dropped bytes are kept for inspection"
    );
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(4));
    assert_eq!(journal.read_events(0, 1, 4).expect("read"), intact);
    assert_eq!(
        std::fs::metadata(&path).expect("stat").len(),
        dropped.offset
    );

    // The journal continues cleanly after the cut: seq 5 is free again.
    let (r, e) = event(0, 5);
    journal.append(&r, e).await.expect("append after recovery");
    journal.close();
    drop(journal);
    let (journal, recovery) = open_dir(dir.path()).expect("reopen again");
    assert!(recovery.dropped.is_none());
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(5));
}

#[tokio::test]
async fn a_flipped_byte_in_the_last_record_is_reported_and_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 5).await;
    let intact = journal.read_events(0, 1, 4).expect("read");
    let last_offset = journal.index().device("a").expect("device").events[4];
    let len = journal.durable_len();
    journal.close();
    drop(journal);

    let path = dir.path().join(FILE_NAME);
    let mut bytes = std::fs::read(&path).expect("read file");
    let mid = (last_offset + (len - last_offset) / 2) as usize;
    bytes[mid] ^= 0x20;
    std::fs::write(&path, &bytes).expect("write file");

    let (journal, recovery) = open_dir(dir.path()).expect("reopen");
    let dropped = recovery.dropped.expect("corruption reported");
    assert!(!dropped.torn);
    assert_eq!(dropped.offset, last_offset);
    assert!(dropped.reason.contains("checksum"), "{}", dropped.reason);
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(4));
    assert_eq!(journal.read_events(0, 1, 4).expect("read"), intact);
}

#[tokio::test]
async fn a_well_formed_record_that_does_not_fit_is_not_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 2).await;
    journal.close();
    drop(journal);
    // A record with a valid checksum but a seq gap (3 is missing).
    let mut bytes = Vec::new();
    event(0, 4).0.encode_into(&mut bytes);
    let path = dir.path().join(FILE_NAME);
    let file = OpenOptions::new().append(true).open(&path).expect("open");
    std::io::Write::write_all(&mut &file, &bytes).expect("append");
    drop(file);

    let (journal, recovery) = open_dir(dir.path()).expect("reopen");
    let dropped = recovery.dropped.expect("gap reported");
    assert!(
        dropped.reason.contains("expected seq 3"),
        "{}",
        dropped.reason
    );
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(2));
}

#[tokio::test]
async fn concurrent_appends_share_fsyncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 0).await;
    let devices = 200u32;
    for num in 1..=devices {
        let (r, e) = device_record(num, &format!("d{num}"));
        journal.append(&r, e).await.expect("device");
    }
    let commits_before = journal.stats().commits.load(Ordering::Relaxed);
    let writers: Vec<DeviceWriter> = (1..=devices)
        .map(|num| journal.device_writer(num, 64))
        .collect();
    let mut pending = Vec::new();
    for seq in 1..=5 {
        for writer in &writers {
            pending.push(append_event(writer, seq));
        }
    }
    for rx in pending {
        rx.await.expect("completion").expect("committed");
    }
    let commits = journal.stats().commits.load(Ordering::Relaxed) - commits_before;
    assert!(commits < 1000 / 4, "1000 records took {commits} commits");
    for num in 1..=devices {
        assert_eq!(
            journal
                .index()
                .device(&format!("d{num}"))
                .map(DeviceInfo::seq),
            Some(5)
        );
    }
}

#[tokio::test]
async fn a_failed_commit_fails_the_batch_and_fences_the_device_without_a_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    seeded(dir.path(), 3).await.close();
    let (journal, faults) = open_faulty(dir.path());
    let len = journal.durable_len();
    let mut writer = journal.device_writer(0, 64);

    faults
        .with_kind(std::io::ErrorKind::StorageFull)
        .fail_syncs(1);
    let failed = append_event(&writer, 4);
    let err = failed.await.expect("completion").expect_err("commit fails");
    assert!(
        err.is_storage_full(),
        "the disk-full kind survives: {err:?}"
    );
    assert!(writer.is_fenced());

    // The same incarnation's next record (seq 5) must not land after the missing seq 4.
    let fenced = append_event(&writer, 5);
    assert_eq!(fenced.await.expect("completion"), Err(JournalError::Fenced));
    assert_eq!(
        journal.durable_len(),
        len,
        "nothing of the failed batch stays"
    );
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(3));
    assert!(writer.is_idle(), "failed records are released");

    // A rebuilt incarnation continues at seq 4.
    writer.next_generation();
    assert!(!writer.is_fenced());
    let ok = append_event(&writer, 4);
    ok.await
        .expect("completion")
        .expect("committed after rebuild");
    journal.close();
    drop(journal);

    let (journal, recovery) = open_dir(dir.path()).expect("reopen");
    assert!(recovery.dropped.is_none(), "{:?}", recovery.dropped);
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(4));
}

#[tokio::test]
async fn a_commit_that_cannot_be_cut_back_turns_the_journal_read_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    seeded(dir.path(), 2).await.close();
    let (journal, faults) = open_faulty(dir.path());
    let writer = journal.device_writer(0, 64);
    faults.fail_syncs(1);
    faults.fail_set_lens(1);
    assert!(append_event(&writer, 3).await.expect("completion").is_err());
    // Nothing is accepted any more, and a barrier does not pretend durability.
    let mut other = journal.device_writer(0, 64);
    other.next_generation();
    assert_eq!(
        append_event(&other, 3).await.expect("completion"),
        Err(JournalError::ReadOnly)
    );
    assert_eq!(journal.barrier().await, Err(JournalError::ReadOnly));
    journal.close();
    drop(journal);

    // The failed batch was blanked, so reopening never resurrects seq 3.
    let (journal, _) = open_dir(dir.path()).expect("reopen");
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(2));
}

#[tokio::test]
async fn a_barrier_completes_after_earlier_records_are_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 0).await;
    let writer = journal.device_writer(0, 64);
    let rx = append_event(&writer, 1);
    journal.barrier().await.expect("barrier");
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(1));
    rx.await.expect("completion").expect("committed");
}

#[tokio::test]
async fn submissions_after_close_fail_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 1).await;
    journal.close();
    let (r, e) = event(0, 2);
    assert_eq!(journal.append(&r, e).await, Err(JournalError::Closed));
    assert_eq!(journal.barrier().await, Err(JournalError::Closed));
}

#[tokio::test]
async fn read_only_open_reports_a_bad_tail_but_leaves_the_file_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 3).await;
    let len = journal.durable_len();
    journal.close();
    drop(journal);
    let path = dir.path().join(FILE_NAME);
    let file = OpenOptions::new().write(true).open(&path).expect("open");
    file.set_len(len - 1).expect("truncate");
    drop(file);

    let journal = Journal::open_read_only(dir.path()).expect("open read-only");
    let recovery = journal.recovery().clone();
    assert!(recovery.dropped.is_some());
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(2));
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), len - 1);
}

#[tokio::test]
async fn damage_far_from_the_tail_is_refused_unless_salvaging() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 3).await;
    let first_event = journal.index().device("a").expect("device").events[0];
    journal.close();
    drop(journal);

    // Flip a byte in seq 1, then put more than any torn write could leave after it: valid
    // records for seqs 4.. that were (as far as anyone knows) acknowledged.
    let path = dir.path().join(FILE_NAME);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[first_event as usize + record::HEADER_LEN + 2] ^= 0x01;
    let payload = vec![b'x'; 60 * 1024];
    let mut seq = 4;
    while (bytes.len() as u64) < first_event + MAX_TORN_BYTES + 1024 {
        let mut event = br#"{"pad":""#.to_vec();
        event.extend_from_slice(&payload);
        event.extend_from_slice(br#""}"#);
        Record::Event(EventRecord {
            device: 0,
            seq,
            at_ms: seq,
            version: 0,
            event,
            transitions: vec![],
        })
        .encode_into(&mut bytes);
        seq += 1;
    }
    std::fs::write(&path, &bytes).expect("write");

    let err = open_dir(dir.path()).err().expect("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("Refusing to open"), "{err}");
    assert_eq!(
        std::fs::metadata(&path).expect("stat").len(),
        bytes.len() as u64,
        "untouched"
    );

    let (journal, recovery) = open_with(dir.path(), true).expect("salvage");
    let dropped = recovery.dropped.expect("reported");
    assert_eq!(dropped.offset, first_event);
    assert_eq!(
        std::fs::metadata(dropped.saved_to.expect("saved to a file"))
            .expect("saved")
            .len(),
        bytes.len() as u64 - first_event
    );
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(0));
}

#[tokio::test]
async fn a_new_journal_starts_with_a_versioned_header_and_a_newer_format_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    seeded(dir.path(), 1).await.close();
    let path = dir.path().join(FILE_NAME);
    let mut bytes = std::fs::read(&path).expect("read");
    assert_eq!(&bytes[..8], b"DROVERJL");
    let (journal, recovery) = open_dir(dir.path()).expect("reopen");
    assert_eq!(recovery.format, FORMAT_VERSION);
    journal.close();
    drop(journal);

    // A format this build does not know: refused, the file untouched.
    bytes[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let crc = crc32fast::hash(&bytes[..12]);
    bytes[12..16].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).expect("write");
    let err = open_dir(dir.path()).err().expect("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("newer Drover"), "{err}");
    assert_eq!(std::fs::read(&path).expect("read"), bytes);
}

#[tokio::test]
async fn a_header_less_format_1_journal_still_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    seeded(dir.path(), 3).await.close();
    let path = dir.path().join(FILE_NAME);
    let bytes = std::fs::read(&path).expect("read");
    // The first releases wrote the same records without the header.
    std::fs::write(&path, &bytes[record::FILE_HEADER_LEN..]).expect("write");
    let (journal, recovery) = open_dir(dir.path()).expect("opens");
    assert_eq!(recovery.format, 1);
    assert!(recovery.dropped.is_none());
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(3));
    assert_eq!(journal.read_events(0, 3, 3).expect("read")[0].seq, 3);
}

#[tokio::test]
async fn a_removal_raises_a_format_2_journal_to_3_and_never_reuses_the_number() {
    let dir = tempfile::tempdir().expect("tempdir");
    seeded(dir.path(), 3).await.close();
    // Mark the file format 2, as a journal written by the previous release.
    let path = dir.path().join(FILE_NAME);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[..record::FILE_HEADER_LEN].copy_from_slice(&record::file_header_of(2));
    std::fs::write(&path, &bytes).expect("write");
    let (journal, recovery) = open_dir(dir.path()).expect("opens");
    assert_eq!(recovery.format, 2, "opening alone changes nothing");
    assert_eq!(
        &std::fs::read(&path).expect("read")[8..12],
        &2u32.to_le_bytes()
    );

    journal.record_removal(0, 1).await.expect("removed");
    assert!(journal.device("a").is_none());
    assert_eq!(
        &std::fs::read(&path).expect("read")[8..12],
        &3u32.to_le_bytes()
    );
    // The id can come back, as a new device with a new number.
    let head = journal
        .record_device("a", 0, b"{}", 2)
        .await
        .expect("again");
    assert_eq!((head.num, head.seq), (1, 0));
    journal.close();
    drop(journal);

    let (journal, recovery) = open_dir(dir.path()).expect("reopens");
    assert_eq!(recovery.format, 3);
    let a = journal.device("a").expect("the new `a`");
    assert_eq!((a.num, a.seq), (1, 0));
    assert_eq!(journal.index().next_device_num(), 2);
    // A removal of a device that does not exist does not fit the records before it.
    assert!(
        journal
            .index()
            .effect_of(&Record::Removed {
                device: 0,
                at_ms: 3
            })
            .is_err()
    );
}

#[tokio::test]
async fn a_format_1_journal_refuses_a_removal_and_stays_as_it_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    seeded(dir.path(), 2).await.close();
    let path = dir.path().join(FILE_NAME);
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[record::FILE_HEADER_LEN..]).expect("write");
    let (journal, _) = open_dir(dir.path()).expect("opens");
    let err = journal.record_removal(0, 1).await.expect_err("refused");
    assert!(matches!(err, JournalError::Format(_)), "{err}");
    assert!(journal.device("a").is_some());
    journal.close();
    assert_eq!(
        std::fs::read(&path).expect("read"),
        &bytes[record::FILE_HEADER_LEN..]
    );
}
