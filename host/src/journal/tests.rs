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
        IndexEffect::Device(DeviceInfo::new(
            num,
            Arc::from(id),
            0,
            Arc::from(&b"{}"[..]),
            2,
        )),
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
            lost: false,
            fx: None,
        }),
        IndexEffect::Event {
            device,
            seq,
            fx: None,
        },
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
        None,
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

/// The file as a crash right now would leave it: every acknowledged record, and no close
/// marker (the journal is still open).
fn crash_image(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join(FILE_NAME)).expect("read journal")
}

/// The crash image of a crash right after the last batch's marker, before an idle writer
/// added the marker of an empty batch (which it does after 50 ms without work, so whether
/// one is there depends on timing): that batch is then the tearable one.
fn crash_image_before_idle(dir: &Path) -> Vec<u8> {
    let mut image = crash_image(dir);
    if let Some((at, _, Record::Commit { batch_start, .. })) = records_of(&image).last()
        && *batch_start as usize == *at
    {
        image.truncate(*at);
    }
    image
}

/// Closes `journal` and puts `image` back as its file: a `kill -9` at the moment the image
/// was taken (so without the checkpoint a clean close writes).
fn crash_with(journal: Journal, dir: &Path, image: &[u8]) {
    journal.close();
    drop(journal);
    std::fs::write(dir.join(FILE_NAME), image).expect("write journal");
    std::fs::remove_file(dir.join("journal.log.checkpoint")).expect("no checkpoint");
}

/// Every record of a journal file: `(offset, framed length, record)`, markers included.
fn records_of(bytes: &[u8]) -> Vec<(usize, usize, Record)> {
    let mut at = record::FILE_HEADER_LEN;
    let mut out = Vec::new();
    while at < bytes.len() {
        let (r, len) = Record::decode(&bytes[at..]).expect("intact record");
        out.push((at, len, r));
        at += len;
    }
    out
}

/// A journal file as a release before format 4 wrote it: no commit markers (and no header
/// for format 1), one version, device `a` and `events` events.
fn legacy_file(format: u32, events: u64) -> Vec<u8> {
    let mut bytes = if format >= 2 {
        record::file_header_of(format).to_vec()
    } else {
        Vec::new()
    };
    version_record(0).0.encode_into(&mut bytes);
    device_record(0, "a").0.encode_into(&mut bytes);
    for seq in 1..=events {
        event(0, seq).0.encode_into(&mut bytes);
    }
    bytes
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
    let file_len = std::fs::metadata(dir.path().join(FILE_NAME))
        .expect("stat")
        .len();
    assert_eq!(recovery.valid_len, file_len);
    assert!(
        file_len > len,
        "a clean close adds the marker of an empty batch"
    );
    assert_eq!(journal.read_events(0, 1, 10).expect("read"), before);
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(10));
}

/// Five records of device 0 in `dir`, then a crash in the middle of writing the fifth: only
/// its first 10 bytes arrived. Returns the four intact events and the fifth's offset.
async fn torn_fifth_record(dir: &Path) -> (Vec<record::EventRecord>, usize) {
    let journal = seeded(dir, 5).await;
    let intact = journal.read_events(0, 1, 4).expect("read");
    let last = journal.index().offset_of(0, 5).expect("offset") as usize;
    let image = crash_image(dir);
    crash_with(journal, dir, &image[..last + 10]);
    (intact, last)
}

#[tokio::test]
async fn a_torn_last_record_is_reported_and_dropped_never_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (intact, last) = torn_fifth_record(dir.path()).await;

    let (journal, recovery) = open_dir(dir.path()).expect("reopen");
    let dropped = recovery.dropped.expect("torn tail reported");
    assert!(dropped.torn, "{dropped:?}");
    assert_eq!(dropped.offset, last as u64);
    assert!(
        dropped.saved_to.as_ref().is_some_and(|p| p.exists()),
        "dropped bytes are kept for inspection"
    );
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(4));
    assert_eq!(journal.read_events(0, 1, 4).expect("read"), intact);
    let path = dir.path().join(FILE_NAME);
    // Cut there, and closed with an empty batch's marker: what is left was acknowledged and
    // is not tearable any more.
    let left = std::fs::read(&path).expect("read");
    let records = records_of(&left);
    assert_eq!(records.last().expect("records").0 as u64, dropped.offset);
    assert!(matches!(
        records.last().expect("records").2,
        Record::Commit { offset, batch_start } if offset == batch_start
    ));
    assert_eq!(recovery.valid_len, left.len() as u64);

    // The journal continues cleanly after the cut: seq 5 was never acknowledged.
    let (r, e) = event(0, 5);
    journal.append(&r, e).await.expect("append after recovery");
    journal.close();
    drop(journal);
    let (journal, recovery) = open_dir(dir.path()).expect("reopen again");
    assert!(recovery.dropped.is_none());
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(5));
}

/// A torn tail whose copy cannot be written (here its name is taken by a directory; in life,
/// a full disk) is cut all the same: it was never acknowledged, and the cut is what frees
/// the space. (The start failed with "No space left on device" and nothing else.)
#[tokio::test]
async fn a_torn_tail_whose_copy_cannot_be_written_is_cut_all_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (intact, last) = torn_fifth_record(dir.path()).await;
    let taken = dir.path().join(format!("{FILE_NAME}.dropped-{last}"));
    std::fs::create_dir(&taken).expect("the copy's name taken");

    let (journal, recovery) = open_dir(dir.path()).expect("opens");
    let dropped = recovery.dropped.expect("torn tail reported");
    assert!(dropped.torn && dropped.saved_to.is_none(), "{dropped:?}");
    assert_eq!(journal.read_events(0, 1, 4).expect("read"), intact);
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(4));
}

#[tokio::test]
async fn a_flipped_byte_in_the_last_commit_of_a_crash_is_a_torn_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 5).await;
    let intact = journal.read_events(0, 1, 4).expect("read");
    let last = journal.index().offset_of(0, 5).expect("offset");
    let mut image = crash_image_before_idle(dir.path());
    // The crash came mid-fsync: the marker's page reached the disk, the record's did not.
    image[last as usize + record::HEADER_LEN + 3] ^= 0x20;
    crash_with(journal, dir.path(), &image);

    let (journal, recovery) = open_dir(dir.path()).expect("reopen");
    let dropped = recovery.dropped.expect("reported");
    assert!(!dropped.torn);
    assert_eq!(dropped.offset, last);
    assert!(dropped.reason.contains("checksum"), "{}", dropped.reason);
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(4));
    assert_eq!(journal.read_events(0, 1, 4).expect("read"), intact);
}

#[tokio::test]
async fn every_cut_inside_the_last_commit_opens_with_what_is_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 3).await;
    // One batch holding two records of two devices, as the writer groups them.
    let (r, e) = device_record(1, "b");
    journal.append(&r, e).await.expect("device b");
    let batch_start = journal.durable_len();
    let wa = journal.device_writer(0, 8);
    let wb = journal.device_writer(1, 8);
    let (ra, rb) = (append_event(&wa, 4), append_event(&wb, 1));
    ra.await.expect("completion").expect("a4");
    rb.await.expect("completion").expect("b1");
    let image = crash_image(dir.path());
    crash_with(journal, dir.path(), &image);

    let boundaries: Vec<usize> = records_of(&image).iter().map(|(at, ..)| *at).collect();
    for end in batch_start as usize..image.len() {
        std::fs::write(dir.path().join(FILE_NAME), &image[..end]).expect("write");
        let (journal, recovery) = open_dir(dir.path())
            .unwrap_or_else(|e| panic!("a cut at {end} inside the last commit refused: {e}"));
        let a = journal.index().device("a").map(DeviceInfo::seq);
        assert!(a == Some(3) || a == Some(4), "cut at {end}: a at {a:?}");
        assert_eq!(
            recovery.dropped.is_some(),
            !boundaries.contains(&end),
            "cut at {end}"
        );
        journal.close();
        drop(journal);
        // What is left is whole: every record decodes.
        records_of(&std::fs::read(dir.path().join(FILE_NAME)).expect("read"));
        // The next round is another crash, not a clean stop.
        std::fs::remove_file(dir.path().join("journal.log.checkpoint")).expect("checkpoint");
    }
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
    let fenced = fenced.await.expect("completion").expect_err("fenced");
    assert!(
        matches!(&fenced, JournalError::Fenced { cause, .. } if cause.contains("injected")),
        "names the failure that fenced it: {fenced}"
    );
    assert!(fenced.is_storage_full(), "and its kind: {fenced:?}");
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
    let last = journal.index().offset_of(0, 3).expect("offset") as usize;
    let image = crash_image(dir.path());
    crash_with(journal, dir.path(), &image[..last + 5]);
    let path = dir.path().join(FILE_NAME);

    let journal = Journal::open_read_only(dir.path()).expect("open read-only");
    let recovery = journal.recovery().clone();
    assert!(recovery.dropped.is_some());
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(2));
    assert_eq!(
        std::fs::metadata(&path).expect("stat").len(),
        last as u64 + 5
    );
}

/// The issue's reproduction: 100 events, each its own commit; a graceful stop; one byte of
/// the 5th event's body flipped.
async fn hundred_events_with_the_fifth_damaged(dir: &Path) -> (Vec<EventRecord>, Vec<u8>, u64) {
    let journal = seeded(dir, 100).await;
    let before = journal.read_events(0, 1, 100).expect("read");
    let fifth = journal.index().offset_of(0, 5).expect("offset");
    journal.close();
    drop(journal);
    let path = dir.join(FILE_NAME);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[fifth as usize + record::HEADER_LEN + 4] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write");
    (before, bytes, fifth)
}

#[tokio::test]
async fn damage_before_the_last_commit_refuses_to_open_naming_offset_and_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, bytes, fifth) = hundred_events_with_the_fifth_damaged(dir.path()).await;
    let path = dir.path().join(FILE_NAME);

    for read_only in [false, true] {
        let err = if read_only {
            Journal::open_read_only(dir.path()).err()
        } else {
            open_dir(dir.path()).err()
        }
        .expect("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        let damage = Damaged::of(&err).expect("a damage report");
        assert_eq!(damage.offset, fifth);
        assert_eq!(damage.intact_after, 95);
        assert_eq!(damage.ranges.len(), 1);
        assert_eq!(
            damage.devices,
            vec![Affected {
                device: "a".into(),
                lost: vec![(5, 5)],
                set_aside: 0
            }]
        );
        let text = err.to_string();
        assert!(
            text.contains(&format!("offset {fifth}")) && text.contains("a (seq 5 lost)"),
            "{text}"
        );
        assert!(text.contains("--salvage"), "{text}");
        assert_eq!(std::fs::read(&path).expect("read"), bytes, "untouched");
    }
}

#[tokio::test]
async fn salvage_keeps_every_intact_record_and_never_reuses_an_acknowledged_seq() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (before, bytes, fifth) = hundred_events_with_the_fifth_damaged(dir.path()).await;

    let (journal, recovery) = open_with(dir.path(), true).expect("salvage");
    let salvaged = recovery.salvaged.expect("reported");
    assert_eq!((salvaged.kept, salvaged.lost_seqs), (95, 1));
    assert_eq!(salvaged.damage.offset, fifth);
    assert_eq!(
        std::fs::read(&salvaged.original).expect("original kept"),
        bytes
    );
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(100));
    let after = journal.read_events(0, 1, 100).expect("read");
    for (seq, (a, b)) in (1..).zip(after.iter().zip(&before)) {
        if seq == 5 {
            assert!(a.lost && a.transitions.is_empty() && a.seq == 5, "{a:?}");
        } else {
            assert_eq!(a, b, "seq {seq}");
        }
    }
    // The next event is 101: the lost seq 5 and the kept 6-100 are never handed out again.
    let (r, e) = event(0, 100);
    assert!(journal.index().effect_of(&r).is_err());
    let (r, e2) = event(0, 101);
    drop(e);
    journal.append(&r, e2).await.expect("seq 101");
    journal.close();
    drop(journal);

    let (journal, recovery) = open_dir(dir.path()).expect("a salvaged journal opens cleanly");
    assert!(recovery.dropped.is_none() && recovery.salvaged.is_none());
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(101));
    assert!(journal.read_events(0, 5, 5).expect("read")[0].lost);
}

#[tokio::test]
async fn a_flipped_byte_in_any_record_before_the_last_commit_refuses_with_its_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 0).await;
    let (r, e) = device_record(1, "b");
    journal.append(&r, e).await.expect("device b");
    let wa = journal.device_writer(0, 8);
    let wb = journal.device_writer(1, 8);
    for seq in 1..=4 {
        let (ra, rb) = (append_event(&wa, seq), append_event(&wb, seq));
        ra.await.expect("completion").expect("a");
        rb.await.expect("completion").expect("b");
    }
    let (r, e) = (
        Record::Snapshot {
            device: 0,
            seq: 4,
            version: 0,
            data: vec![9; 40],
        },
        IndexEffect::Snapshot {
            device: 0,
            seq: 4,
            version: 0,
        },
    );
    journal.append(&r, e).await.expect("snapshot");
    journal.close();
    drop(journal);
    let path = dir.path().join(FILE_NAME);
    let clean = std::fs::read(&path).expect("read");
    let records = records_of(&clean);

    // After a clean close nothing is tearable: damage to any record, markers included, is
    // refused with its offset, and salvage then opens with every other record.
    let (last, records) = records.split_last().expect("records");
    for (at, len, record) in records {
        let mut bytes = clean.clone();
        bytes[at + len / 2] ^= 0x10;
        std::fs::write(&path, &bytes).expect("write");
        let err = open_dir(dir.path())
            .err()
            .unwrap_or_else(|| panic!("damage to {record:?} at {at} opened"));
        let damage = Damaged::of(&err).unwrap_or_else(|| panic!("{err}"));
        assert_eq!(damage.offset, *at as u64, "{record:?}");

        let (journal, recovery) = open_with(dir.path(), true).expect("salvage");
        assert!(recovery.dropped.is_none(), "a salvaged journal is whole");
        let salvaged = recovery.salvaged.expect("salvaged");
        let lost_seq = matches!(record, Record::Event(_));
        assert_eq!(salvaged.lost_seqs, u64::from(lost_seq), "{record:?}");
        // Nothing but the damaged record itself is missing: a destroyed plugin-version or
        // provisioning record is rebuilt and its devices keep their histories.
        let mut seqs: Vec<u64> = journal
            .index()
            .devices
            .values()
            .map(DeviceInfo::seq)
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, [4, 4], "{record:?}: {:?}", salvaged.damage.rebuilt);
        journal.close();
        drop(journal);
        std::fs::remove_file(&salvaged.original).expect("remove kept original");
    }
    // The close marker itself is the one record a crash could have torn: cut, nothing lost.
    assert!(matches!(last.2, Record::Commit { .. }));
    let mut bytes = clean.clone();
    bytes[last.0 + last.1 / 2] ^= 0x10;
    std::fs::write(&path, &bytes).expect("write");
    let (journal, recovery) = open_dir(dir.path()).expect("opens");
    assert_eq!(recovery.dropped.expect("cut").offset, last.0 as u64);
    assert_eq!(journal.index().device("b").map(DeviceInfo::seq), Some(4));
}

#[tokio::test]
async fn a_device_whose_last_record_was_destroyed_still_never_reuses_its_seq() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 3).await;
    let (r, e) = device_record(1, "b");
    journal.append(&r, e).await.expect("device b");
    let third = journal.index().offset_of(0, 3).expect("offset");
    let wb = journal.device_writer(1, 8);
    for seq in 1..=3 {
        append_event(&wb, seq)
            .await
            .expect("completion")
            .expect("b");
    }
    journal.close();
    drop(journal);
    // `a`'s last record is damaged and nothing of `a` comes after it: only the damaged
    // record's own header says which seq it was.
    let path = dir.path().join(FILE_NAME);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[third as usize + record::HEADER_LEN + 9] ^= 0x04; // inside the event's JSON
    std::fs::write(&path, &bytes).expect("write");

    let err = open_dir(dir.path()).err().expect("refused");
    let damage = Damaged::of(&err).expect("report");
    assert_eq!(damage.devices[0].lost, vec![(3, 3)], "{err}");
    let (journal, _) = open_with(dir.path(), true).expect("salvage");
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(3));
    assert_eq!(journal.index().device("b").map(DeviceInfo::seq), Some(3));
}

#[tokio::test]
async fn damage_far_from_the_tail_of_a_file_without_markers_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A format-3 file (no commit markers): only the last MAX_TORN_BYTES can be torn.
    let mut bytes = legacy_file(3, 3);
    let first_event = records_of(&bytes)[2].0;
    bytes[first_event + record::HEADER_LEN + 2] ^= 0x01;
    let payload = vec![b'x'; 60 * 1024];
    let mut seq = 4;
    while (bytes.len() as u64) < first_event as u64 + MAX_TORN_BYTES + 1024 {
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
            lost: false,
            fx: None,
        })
        .encode_into(&mut bytes);
        seq += 1;
    }
    let path = dir.path().join(FILE_NAME);
    std::fs::write(&path, &bytes).expect("write");

    let err = open_dir(dir.path()).err().expect("refused");
    let damage = Damaged::of(&err).expect("report");
    assert_eq!(damage.offset, first_event as u64);
    assert_eq!(damage.intact_after, seq - 2);
    assert_eq!(std::fs::read(&path).expect("read"), bytes, "untouched");

    let (journal, recovery) = open_with(dir.path(), true).expect("salvage");
    assert_eq!(recovery.salvaged.expect("salvaged").lost_seqs, 1);
    assert_eq!(recovery.format, FORMAT_VERSION);
    assert_eq!(
        journal.index().device("a").map(DeviceInfo::seq),
        Some(seq - 1)
    );
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
    let path = dir.path().join(FILE_NAME);
    // The first releases wrote the same records without the header (and without markers).
    std::fs::write(&path, legacy_file(1, 3)).expect("write");
    let (journal, recovery) = open_dir(dir.path()).expect("opens");
    assert_eq!(recovery.format, 1);
    assert!(recovery.dropped.is_none());
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(3));
    assert_eq!(journal.read_events(0, 3, 3).expect("read")[0].seq, 3);
    // It takes new events as format 1 (no markers: it cannot be raised in place).
    let (r, e) = event(0, 4);
    journal.append(&r, e).await.expect("append");
    journal.close();
    drop(journal);
    let bytes = std::fs::read(&path).expect("read");
    assert_ne!(&bytes[..8], b"DROVERJL");
    let (journal, _) = open_dir(dir.path()).expect("reopens");
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(4));
}

#[tokio::test]
async fn a_format_2_journal_is_raised_before_its_first_write_and_never_reuses_a_number() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A journal written by a release before removals and commit markers.
    let path = dir.path().join(FILE_NAME);
    std::fs::write(&path, legacy_file(2, 3)).expect("write");
    let (journal, recovery) = open_dir(dir.path()).expect("opens");
    assert_eq!(recovery.format, 2, "opening alone changes nothing");
    assert_eq!(
        &std::fs::read(&path).expect("read")[8..12],
        &2u32.to_le_bytes()
    );

    journal.record_removal(0, 1).await.expect("removed");
    assert!(journal.device("a").is_none());
    // Raised as far as its writes need (commit markers), not further: an older build can
    // still open it until something of format 5 (effects) is written.
    assert_eq!(
        &std::fs::read(&path).expect("read")[8..12],
        &super::writer::MARKERS_FROM.to_le_bytes()
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
    assert_eq!(recovery.format, super::writer::MARKERS_FROM);
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
    let path = dir.path().join(FILE_NAME);
    std::fs::write(&path, legacy_file(1, 2)).expect("write");
    let (journal, _) = open_dir(dir.path()).expect("opens");
    let err = journal.record_removal(0, 1).await.expect_err("refused");
    assert!(matches!(err, JournalError::Format(_)), "{err}");
    assert!(journal.device("a").is_some());
    journal.close();
    assert_eq!(std::fs::read(&path).expect("read"), legacy_file(1, 2));
}

#[tokio::test]
async fn a_damaged_length_field_still_tells_which_seq_was_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 3).await;
    let (r, e) = device_record(1, "b");
    journal.append(&r, e).await.expect("device b");
    let third = journal.index().offset_of(0, 3).expect("offset") as usize;
    let wb = journal.device_writer(1, 8);
    for seq in 1..=3 {
        append_event(&wb, seq)
            .await
            .expect("completion")
            .expect("b");
    }
    journal.close();
    drop(journal);
    // One bit of `a`'s last record's length: its frame no longer says where it ends.
    let path = dir.path().join(FILE_NAME);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[third] ^= 0x02;
    std::fs::write(&path, &bytes).expect("write");

    let err = open_dir(dir.path()).err().expect("refused");
    let damage = Damaged::of(&err).expect("report");
    assert_eq!(damage.devices[0].lost, vec![(3, 3)], "{err}");
    let (journal, _) = open_with(dir.path(), true).expect("salvage");
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(3));
}

#[tokio::test]
async fn a_damaged_provisioning_record_keeps_the_device_and_its_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 5).await;
    journal.close();
    drop(journal);
    let path = dir.path().join(FILE_NAME);
    let mut bytes = std::fs::read(&path).expect("read");
    let records = records_of(&bytes);
    let (at, len, _) = records
        .iter()
        .find(|(_, _, r)| matches!(r, Record::Device { .. }))
        .expect("device record");
    // The last byte of its body (its at_ms): the id survives in the damaged bytes.
    bytes[at + len - 1] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write");

    let err = open_dir(dir.path()).err().expect("refused");
    assert!(err.to_string().contains("provisioning of `a`"), "{err}");
    let (journal, _) = open_with(dir.path(), true).expect("salvage");
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(5));
}

#[tokio::test]
async fn a_huge_seq_after_damage_is_not_believed_and_costs_no_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 2).await;
    let second = journal.index().offset_of(0, 2).expect("offset") as usize;
    let (r, e) = event(0, 3);
    journal.append(&r, e).await.expect("3");
    journal.close();
    drop(journal);
    // A checksummed record with an absurd seq right after a damaged one.
    let path = dir.path().join(FILE_NAME);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[second + record::HEADER_LEN + 4] ^= 0x01;
    let mut absurd = Vec::new();
    event(0, 1 << 40).0.encode_into(&mut absurd);
    bytes.extend_from_slice(&absurd);
    Record::Commit {
        offset: bytes.len() as u64,
        batch_start: bytes.len() as u64,
    }
    .encode_into(&mut bytes);
    std::fs::write(&path, &bytes).expect("write");

    let err = open_dir(dir.path()).err().expect("refused");
    let damage = Damaged::of(&err).expect("report");
    assert_eq!(damage.devices[0].lost, vec![(2, 2)], "{err}");
    assert_eq!(damage.devices[0].set_aside, 1, "{err}");
}

#[tokio::test]
async fn a_file_cut_short_after_a_clean_stop_is_refused_and_salvage_keeps_its_seqs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 10).await;
    let (r, e) = device_record(1, "b");
    journal.append(&r, e).await.expect("device b");
    let sixth = journal.index().offset_of(0, 6).expect("offset") as usize;
    journal.close();
    drop(journal);
    // Cut at a record boundary: nothing in the file itself looks wrong, but the clean stop's
    // checkpoint knows it held more (seqs 6-10 of `a`, and `b`).
    let path = dir.path().join(FILE_NAME);
    let file = OpenOptions::new().write(true).open(&path).expect("open");
    file.set_len(sixth as u64).expect("truncate");
    drop(file);

    let err = open_dir(dir.path()).err().expect("refused");
    let damage = Damaged::of(&err).expect("report");
    assert!(err.to_string().contains("cut short"), "{err}");
    assert_eq!(damage.devices[0].lost, vec![(6, 10)], "{err}");
    assert!(Journal::open_read_only(dir.path()).is_err());

    let (journal, recovery) = open_with(dir.path(), true).expect("salvage");
    assert_eq!(recovery.salvaged.expect("salvaged").lost_seqs, 10 - 5);
    // Salvage wrote the new file's checkpoint before renaming it in.
    let bytes = std::fs::read(dir.path().join("journal.log.checkpoint")).expect("checkpoint");
    // The JSON, then its checksum on a line of its own.
    let checkpoint: serde_json::Value = serde_json::Deserializer::from_slice(&bytes)
        .into_iter()
        .next()
        .expect("a value")
        .expect("json");
    assert_eq!(checkpoint["len"], serde_json::json!(recovery.valid_len));
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(10));
    assert_eq!(
        journal.index().device("b").map(DeviceInfo::seq),
        Some(0),
        "`b` comes back from the checkpoint"
    );
    journal.close();
    drop(journal);
    let (_, recovery) = open_dir(dir.path()).expect("opens cleanly after salvage");
    assert!(recovery.dropped.is_none());
}

#[tokio::test]
async fn a_destroyed_id_comes_back_from_the_checkpoint_and_stays_taken() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 5).await;
    journal.close();
    drop(journal);
    let path = dir.path().join(FILE_NAME);
    let mut bytes = std::fs::read(&path).expect("read");
    let (at, _, _) = records_of(&bytes)
        .into_iter()
        .find(|(_, _, r)| matches!(r, Record::Device { .. }))
        .expect("device record");
    // The kind byte: nothing of the record can be read back.
    bytes[at + record::HEADER_LEN] ^= 0x40;
    std::fs::write(&path, &bytes).expect("write");

    let (journal, _) = open_with(dir.path(), true).expect("salvage");
    let a = journal.device("a").expect("`a` is back");
    assert_eq!((a.seq, &a.config[..], a.created_at_ms), (5, &b"{}"[..], 2));
    assert!(
        journal.index().effect_of(&device_record(1, "a").0).is_err(),
        "the id is still taken"
    );
}

#[tokio::test]
async fn a_file_cut_inside_its_first_record_keeps_every_device_the_checkpoint_knew() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 4).await;
    journal.close();
    drop(journal);
    let path = dir.path().join(FILE_NAME);
    let file = OpenOptions::new().write(true).open(&path).expect("open");
    file.set_len(record::FILE_HEADER_LEN as u64 + 5)
        .expect("truncate");
    drop(file);

    let err = open_dir(dir.path()).err().expect("refused");
    assert_eq!(
        Damaged::of(&err).expect("report").devices[0].lost,
        vec![(1, 4)]
    );
    let (journal, recovery) = open_with(dir.path(), true).expect("salvage");
    assert_eq!(recovery.salvaged.expect("salvaged").lost_seqs, 4);
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(4));
}

#[tokio::test]
async fn an_unsynced_idle_marker_is_part_of_the_next_commit_a_crash_can_tear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 1).await;
    // Idle: the writer marks its last commit proven, without a sync (50 ms after it).
    let idle_marker = |image: &[u8]| {
        let last = records_of(image).pop();
        matches!(last, Some((_, _, Record::Commit { offset, batch_start })) if offset == batch_start)
    };
    for _ in 0..1000 {
        if idle_marker(&crash_image(dir.path())) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let idle_at = journal.durable_len() - record::MAX_COMMIT_LEN as u64;
    let image = crash_image(dir.path());
    let (at, _, idle) = records_of(&image).pop().expect("records");
    assert!(
        matches!(idle, Record::Commit { offset, batch_start } if offset == batch_start),
        "{idle:?}"
    );
    assert!(at as u64 >= idle_at);
    let (r, e) = event(0, 2);
    journal.append(&r, e).await.expect("2");
    let mut image = crash_image(dir.path());
    let (_, _, last) = records_of(&image).pop().expect("records");
    assert!(
        matches!(last, Record::Commit { batch_start, .. } if batch_start == at as u64),
        "the next batch starts at the unsynced marker: {last:?}"
    );
    // Power lost mid-commit: the idle marker's page never reached the disk, the batch's did.
    for b in &mut image[at..at + 13] {
        *b = 0;
    }
    crash_with(journal, dir.path(), &image);
    let (journal, recovery) = open_dir(dir.path()).expect("torn, not damage");
    assert_eq!(recovery.dropped.expect("cut").offset, at as u64);
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(1));
}

/// A journal of `events` events of device "a", closed cleanly, and a view of its file whose
/// reads fail with `EIO` over `unreadable` (a bad sector): returns the records as written and
/// the offset of each seq.
async fn journal_with_a_bad_sector(
    dir: &Path,
    events: u64,
    unreadable: std::ops::Range<u64>,
) -> (Vec<EventRecord>, Vec<u64>, FaultyBackend) {
    let journal = seeded(dir, events).await;
    let before = journal.read_events(0, 1, events).expect("read");
    let offsets: Vec<u64> = (1..=events)
        .map(|seq| journal.index().offset_of(0, seq).expect("offset"))
        .collect();
    journal.close();
    drop(journal);
    let file = FileBackend::open_read_only(&dir.join(FILE_NAME)).expect("file");
    let (faulty, faults) = FaultyBackend::new(file);
    faults.unreadable(unreadable);
    (before, offsets, faulty)
}

/// A sector that cannot be read (`EIO`) in the middle of the journal is media damage like a
/// flipped byte: opening refuses naming the unreadable range and the seqs in it, instead of
/// failing on the I/O error; salvage reads around it, keeps every record outside it, marks
/// the seqs inside lost, and the salvaged journal opens.
#[tokio::test]
async fn an_unreadable_sector_is_damage_that_salvage_reads_around() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sector = storage::Tolerant::SECTOR;
    let (before, offsets, faulty) =
        journal_with_a_bad_sector(dir.path(), 1000, 2 * sector..3 * sector).await;
    let path = dir.path().join(FILE_NAME);
    let bytes = std::fs::read(&path).expect("read");
    // Seqs whose records touch the sector are lost; the one that starts before it and ends in
    // it too.
    let ends: Vec<u64> = (0..offsets.len())
        .map(|i| offsets.get(i + 1).copied().unwrap_or(u64::MAX))
        .collect();
    let lost: Vec<u64> = (1..=1000u64)
        .filter(|&seq| {
            let i = (seq - 1) as usize;
            offsets[i] < 3 * sector && ends[i] > 2 * sector
        })
        .collect();
    assert!(lost.len() > 10 && *lost.last().expect("some") < 1000);

    let faulty = Arc::new(faulty);
    let err = Journal::open_on(faulty.clone(), &JournalOptions::default())
        .err()
        .expect("refused");
    let damage = Damaged::of(&err).expect("a damage report");
    assert_eq!(damage.unreadable, vec![(2 * sector, 3 * sector)]);
    assert!(damage.offset <= 2 * sector, "{}", damage.offset);
    let (first, last) = (lost[0], *lost.last().expect("some"));
    assert_eq!(damage.devices.len(), 1);
    assert_eq!(damage.devices[0].lost, vec![(first, last)], "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("{sector} byte(s) could not be read")),
        "{text}"
    );
    assert_eq!(std::fs::read(&path).expect("read"), bytes, "untouched");

    let salvaged = recovery::salvage_from(&*faulty, &path)
        .expect("salvage")
        .expect("something to salvage");
    assert_eq!(salvaged.lost_seqs, lost.len() as u64);
    assert_eq!(salvaged.damage.unreadable, vec![(2 * sector, 3 * sector)]);
    let (journal, recovery) = open_dir(dir.path()).expect("the salvaged journal opens");
    assert!(recovery.dropped.is_none());
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(1000));
    let after = journal.read_events(0, 1, 1000).expect("read");
    for (a, b) in after.iter().zip(&before) {
        if lost.contains(&a.seq) {
            assert!(a.lost, "seq {} should be lost", a.seq);
        } else {
            assert_eq!(a, b, "seq {}", a.seq);
        }
    }
}

/// Unreadable bytes inside the last commit are not taken for a torn write and cut: they may
/// hold acknowledged records, so opening refuses.
#[tokio::test]
async fn an_unreadable_last_commit_is_refused_not_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 3).await;
    let third = journal.index().offset_of(0, 3).expect("offset");
    // Seq 3's batch is the tearable one.
    let image = crash_image_before_idle(dir.path());
    match records_of(&image).last() {
        Some((_, _, Record::Commit { batch_start, .. })) => assert!(*batch_start <= third),
        other => panic!("the file should end with seq 3's batch marker: {other:?}"),
    }
    crash_with(journal, dir.path(), &image);
    let file = FileBackend::open(&dir.path().join(FILE_NAME)).expect("file");
    let len = file.size().expect("size");
    let (faulty, faults) = FaultyBackend::new(file);
    faults.unreadable(third..third + 1);
    let err = Journal::open_on(Arc::new(faulty), &JournalOptions::default())
        .err()
        .expect("refused");
    let damage = Damaged::of(&err).expect("a damage report");
    assert!(!damage.unreadable.is_empty(), "{err}");
    let path = dir.path().join(FILE_NAME);
    assert_eq!(
        std::fs::metadata(&path).expect("stat").len(),
        len,
        "not cut"
    );
}

fn open_spilling(dir: &Path, spill_at: u64) -> Journal {
    let options = JournalOptions {
        index_spill_at: spill_at,
        ..JournalOptions::default()
    };
    Journal::open(dir, &options).expect("open")
}

/// The event `append_event` records for seq `seq`.
fn expected_event(seq: u64) -> Vec<u8> {
    format!(r#"{{"n":{seq}}}"#).into_bytes()
}

/// Checks every device's whole history and a few ranges that cross run boundaries.
fn check_histories(journal: &Journal, devices: u32, events: u64) {
    for device in 0..devices {
        let all = journal.read_events(device, 1, events).expect("read");
        assert_eq!(all.len() as u64, events, "device {device}");
        for (seq, e) in (1..).zip(&all) {
            assert_eq!((e.device, e.seq), (device, seq));
            assert_eq!(e.event, expected_event(seq));
        }
        for (from, to) in [(1, 1), (63, 66), (100, 357), (events - 3, events + 10)] {
            let part = journal.read_events(device, from, to).expect("read");
            let seqs: Vec<u64> = part.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, (from..=to.min(events)).collect::<Vec<_>>());
        }
    }
}

/// `devices` devices with `events` events each, interleaved, written with a tiny spill size
/// so that the index spills and merges many runs while the writer runs.
async fn spilled_fleet(dir: &Path, devices: u32, events: u64, spill_at: u64) -> Journal {
    let journal = open_spilling(dir, spill_at);
    let (r, e) = version_record(0);
    journal.append(&r, e).await.expect("version");
    for num in 0..devices {
        let (r, e) = device_record(num, &format!("d{num}"));
        journal.append(&r, e).await.expect("device");
    }
    let writers: Vec<DeviceWriter> = (0..devices).map(|n| journal.device_writer(n, 64)).collect();
    for seq in 1..=events {
        let mut pending = Vec::new();
        for w in &writers {
            w.room().await;
            pending.push(append_event(w, seq));
        }
        if seq % 50 == 0 {
            for p in pending {
                p.await.expect("completion").expect("durable");
            }
        }
    }
    journal.barrier().await.expect("barrier");
    journal
}

/// The index spills old offsets to run files and merges them while events keep coming:
/// every record reads back exactly, from runs, from the in-memory tail and across both,
/// during the writes, after them and after a restart (which rebuilds the runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_spilled_to_runs_read_back_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (devices, events, spill_at) = (5u32, 600u64, 64u64);
    let journal = spilled_fleet(dir.path(), devices, events, spill_at).await;
    // The spiller runs beside the writer: wait until it has caught up.
    index_settled(&journal).await;
    {
        let index = journal.index();
        assert!(index.tail_entries < spill_at, "{}", index.tail_entries);
        assert!(index.runs.len() >= 1);
        // Merged in tiers: far fewer runs than spills.
        assert!(index.runs.len() <= 8, "{} runs", index.runs.len());
        assert_eq!(
            index.runs.entries() + index.tail_entries,
            u64::from(devices) * events
        );
    }
    check_histories(&journal, devices, events);
    journal.close();
    drop(journal);

    let journal = open_spilling(dir.path(), spill_at);
    assert!(journal.index().runs.len() >= 1, "recovery spills too");
    check_histories(&journal, devices, events);
    // Without spilling, the same.
    journal.close();
    drop(journal);
    let journal = open_spilling(dir.path(), 0);
    assert_eq!(journal.index().runs.len(), 0);
    check_histories(&journal, devices, events);
}

/// Reads racing the spiller (which swaps runs in and tails out under the index lock) always
/// see each seq exactly once, at its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_during_spills_see_every_record_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = open_spilling(dir.path(), 16);
    let (r, e) = version_record(0);
    journal.append(&r, e).await.expect("version");
    let (r, e) = device_record(0, "a");
    journal.append(&r, e).await.expect("device");
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (journal, stop) = (journal.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Acquire) {
                let seq = journal.device("a").map_or(0, |h| h.seq);
                if seq == 0 {
                    continue;
                }
                let from = seq.saturating_sub(40).max(1);
                let got = journal.read_events(0, from, seq).expect("read");
                let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
                assert_eq!(seqs, (from..=seq).collect::<Vec<_>>());
                for e in &got {
                    assert_eq!(e.event, expected_event(e.seq));
                }
                reads += 1;
            }
            reads
        })
    };
    let writer = journal.device_writer(0, 32);
    for seq in 1..=3000 {
        writer.room().await;
        let done = append_event(&writer, seq);
        if seq % 32 == 0 {
            done.await.expect("completion").expect("durable");
        }
    }
    journal.barrier().await.expect("barrier");
    stop.store(true, Ordering::Release);
    let reads = reader.join().expect("reader");
    assert!(reads > 10, "{reads} reads");
    index_settled(&journal).await;
    assert!(journal.index().runs.len() >= 1);
}

/// A spill that cannot be written (here the runs' directory is gone, as on a full or broken
/// disk) loses nothing: the offsets stay in memory, every record reads back, and a later spill
/// succeeds once the directory is writable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_spill_keeps_the_offsets_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = open_spilling(dir.path(), 32);
    let runs_dir = dir.path().join("journal.log.index");
    std::fs::remove_dir_all(&runs_dir).expect("remove the runs' directory");
    std::fs::write(&runs_dir, b"not a directory").expect("a file in its place");
    let (r, e) = version_record(0);
    journal.append(&r, e).await.expect("version");
    let (r, e) = device_record(0, "a");
    journal.append(&r, e).await.expect("device");
    let writer = journal.device_writer(0, 8);
    for seq in 1..=200 {
        writer.room().await;
        append_event(&writer, seq)
            .await
            .expect("completion")
            .expect("durable");
    }
    assert_eq!(journal.index().runs.len(), 0);
    assert_eq!(journal.index().tail_entries, 200);
    check_histories(&journal, 1, 200);

    std::fs::remove_file(&runs_dir).expect("remove the file");
    std::fs::create_dir(&runs_dir).expect("the directory back");
    // The spiller waits a second after a failure before it tries again.
    let mut seq = 200;
    for _ in 0..400 {
        seq += 1;
        writer.room().await;
        append_event(&writer, seq)
            .await
            .expect("completion")
            .expect("durable");
        if journal.index().runs.len() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(journal.index().runs.len() > 0, "spilled once it could");
    check_histories(&journal, 1, seq);
}

/// A journal opens even where its index cannot spill at all (the runs' directory cannot be
/// made): every offset stays in memory.
#[tokio::test]
async fn a_journal_whose_runs_directory_cannot_be_made_still_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    seeded(dir.path(), 50).await.close();
    let runs_dir = dir.path().join("journal.log.index");
    std::fs::remove_dir_all(&runs_dir).expect("remove the runs' directory");
    std::fs::write(&runs_dir, b"a file").expect("a file in its place");
    let journal = open_spilling(dir.path(), 8);
    assert_eq!(journal.index().runs.len(), 0);
    assert!(journal.index().spill.is_none());
    check_histories(&journal, 1, 50);
}

/// Recovery's own spills: a failure leaves the offsets in memory and waits for another
/// spill's worth before trying again; the next one that can be written takes them all.
#[test]
fn a_failed_spill_during_recovery_keeps_the_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runs_dir = dir.path().join("runs");
    let mut index = Index {
        spill: Some(Arc::new(runs::Spill::open(&runs_dir, 4, 0).expect("spill"))),
        ..Index::default()
    };
    for (r, _) in [version_record(0), device_record(0, "a")] {
        let effect = index.effect_of(&r).expect("fits");
        index.apply(effect, 0);
    }
    let apply = |index: &mut Index, seq: u64| {
        let (r, _) = event(0, seq);
        let effect = index.effect_of(&r).expect("fits");
        index.apply(effect, seq * 100);
    };
    std::fs::remove_dir_all(&runs_dir).expect("remove");
    std::fs::write(&runs_dir, b"a file").expect("a file in its place");
    for seq in 1..=4 {
        apply(&mut index, seq);
    }
    assert!(index.wants_spill());
    index.spill_now();
    assert_eq!((index.runs.len(), index.tail_entries), (0, 4));
    assert_eq!(index.offset_of(0, 3), Some(300));
    apply(&mut index, 5);
    assert!(!index.wants_spill(), "waits for another spill's worth");
    std::fs::remove_file(&runs_dir).expect("remove the file");
    std::fs::create_dir(&runs_dir).expect("the directory back");
    for seq in 6..=8 {
        apply(&mut index, seq);
    }
    assert!(index.wants_spill());
    index.spill_now();
    assert_eq!((index.runs.len(), index.tail_entries), (1, 0));
    for seq in 1..=8 {
        assert_eq!(index.offset_of(0, seq), Some(seq * 100));
    }
}

/// A checkpoint edited or damaged after a clean stop is ignored (it carries a checksum), not
/// taken for proof that a healthy journal was cut short.
#[tokio::test]
async fn a_damaged_checkpoint_is_ignored_not_taken_for_a_cut_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    seeded(dir.path(), 20).await.close();
    let path = dir.path().join("journal.log.checkpoint");
    let text = std::fs::read_to_string(&path).expect("checkpoint");
    let len = std::fs::metadata(dir.path().join(FILE_NAME))
        .expect("stat")
        .len();
    let edited = text.replace(
        &format!("\"len\":{len}"),
        &format!("\"len\":{}", len + 20_000),
    );
    assert_ne!(edited, text, "{text}");
    std::fs::write(&path, edited).expect("edit");
    let (journal, recovery) = open_dir(dir.path()).expect("opens");
    assert!(recovery.dropped.is_none());
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(20));
}

/// A journal cut inside its file header after a clean stop is refused as it is: opening
/// writes no new header over it, and the report gives the length found.
#[tokio::test]
async fn a_journal_cut_inside_its_header_is_refused_and_left_as_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    seeded(dir.path(), 5).await.close();
    let path = dir.path().join(FILE_NAME);
    for len in [0u64, 5] {
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.set_len(len).expect("cut");
        drop(file);
        let err = open_dir(dir.path()).err().expect("refused");
        assert!(err.to_string().contains("cut short"), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("the end of {} ({len} bytes)", path.display())),
            "{err}"
        );
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            len,
            "untouched"
        );
    }
    let (journal, recovery) = open_with(dir.path(), true).expect("salvage");
    assert_eq!(recovery.salvaged.expect("salvaged").lost_seqs, 5);
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(5));
}

/// A damaged byte in the file header (its format field or its checksum) is media damage like
/// any other: opening refuses naming the header, and salvage writes a new header and keeps
/// every record.
#[tokio::test]
async fn a_damaged_file_header_is_refused_and_salvaged() {
    for at in [9usize, 12] {
        let dir = tempfile::tempdir().expect("tempdir");
        let before = {
            let journal = seeded(dir.path(), 30).await;
            let before = journal.read_events(0, 1, 30).expect("read");
            journal.close();
            before
        };
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[at] ^= 0x04;
        std::fs::write(&path, &bytes).expect("write");

        let err = open_dir(dir.path()).err().expect("refused");
        let damage = Damaged::of(&err).expect("a damage report");
        assert_eq!(damage.offset, 8, "{err}");
        assert!(err.to_string().contains("file header"), "{err}");
        assert!(err.to_string().contains("--salvage"), "{err}");
        assert_eq!(std::fs::read(&path).expect("read"), bytes, "untouched");

        let (journal, recovery) = open_with(dir.path(), true).expect("salvage");
        let salvaged = recovery.salvaged.expect("salvaged");
        assert_eq!(salvaged.lost_seqs, 0);
        assert_eq!(journal.read_events(0, 1, 30).expect("read"), before);
        journal.close();
        drop(journal);
        let (_, recovery) = open_dir(dir.path()).expect("opens cleanly");
        assert!(recovery.salvaged.is_none() && recovery.dropped.is_none());
    }
}

/// A checkpoint file of any shape (here eight hex digits alone, which look like a CRC line)
/// is read or ignored, never a panic.
#[tokio::test]
async fn a_checkpoint_of_any_shape_never_panics_the_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    seeded(dir.path(), 3).await.close();
    for text in [
        "deadbeef\n",
        "deadbeef",
        "\n",
        "{}\n00000000\n",
        "x\ndeadbeef\n",
    ] {
        std::fs::write(dir.path().join("journal.log.checkpoint"), text).expect("write");
        let (journal, _) = open_dir(dir.path()).expect("opens");
        assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(3));
        journal.close();
    }
}

/// A damaged header on a journal whose last batch a crash tore: the header is the damage
/// refused, and salvage keeps every acknowledged record and leaves the torn tail out.
#[tokio::test]
async fn a_damaged_header_with_a_torn_tail_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 10).await;
    let before = journal.read_events(0, 1, 9).expect("read");
    let tenth = journal.index().offset_of(0, 10).expect("offset") as usize;
    let mut image = crash_image(dir.path());
    // Torn inside seq 10's batch (never acknowledged, as far as a crash can tell).
    image.truncate(tenth + 6);
    image[9] ^= 0x02;
    crash_with(journal, dir.path(), &image);

    let err = open_dir(dir.path()).err().expect("refused");
    let damage = Damaged::of(&err).expect("a damage report");
    assert_eq!(damage.offset, 8, "{err}");
    assert!(damage.devices.is_empty(), "{err}");

    let (journal, recovery) = open_with(dir.path(), true).expect("salvage");
    assert_eq!(recovery.salvaged.expect("salvaged").lost_seqs, 0);
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(9));
    assert_eq!(journal.read_events(0, 1, 9).expect("read"), before);
}

/// A read failure that is not the medium's (a network file system timing out) is passed on
/// as the error it is, not taken for damage: opening fails and says why, and nothing is
/// reported lost.
#[tokio::test]
async fn a_read_failure_that_is_not_media_damage_is_not_called_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    seeded(dir.path(), 20).await.close();
    let file = FileBackend::open_read_only(&dir.path().join(FILE_NAME)).expect("file");
    let (faulty, faults) = FaultyBackend::new(file);
    const ETIMEDOUT: i32 = 110;
    faults.fail_reads(100..101, ETIMEDOUT);
    let err = Journal::open_on(Arc::new(faulty), &JournalOptions::default())
        .err()
        .expect("fails");
    assert!(Damaged::of(&err).is_none(), "{err}");
    assert_eq!(err.raw_os_error(), Some(ETIMEDOUT), "{err}");
}

// ---- index checkpoints and the scrub (journal/index_checkpoint.rs, journal/scrub.rs) ----

/// A journal that spills after `spill_at` offsets and checkpoints its index every `every`
/// bytes; its scrub runs unthrottled.
fn open_checkpointing(dir: &Path, spill_at: u64, every: u64) -> std::io::Result<Journal> {
    let options = JournalOptions {
        index_spill_at: spill_at,
        index_checkpoint_every: every,
        scrub_rate: 0,
        ..JournalOptions::default()
    };
    Journal::open(dir, &options)
}

/// Version 0 and devices `d0..d{devices}` (numbers `0..devices`).
async fn provision(journal: &Journal, devices: u32) {
    let (r, e) = version_record(0);
    journal.append(&r, e).await.expect("version");
    for num in 0..devices {
        let head = journal
            .record_device(&format!("d{num}"), 0, b"{}", 2)
            .await
            .expect("device");
        assert_eq!(head.num, num);
    }
}

/// Events `seqs` of every device, interleaved, each seq of all devices one commit or more.
async fn write_events(journal: &Journal, devices: u32, seqs: std::ops::RangeInclusive<u64>) {
    let writers: Vec<DeviceWriter> = (0..devices).map(|n| journal.device_writer(n, 64)).collect();
    let mut pending = Vec::new();
    for seq in seqs {
        pending.extend(writers.iter().map(|w| append_event(w, seq)));
        if seq % 16 == 0 {
            for p in pending.drain(..) {
                p.await.expect("completion").expect("durable");
            }
        }
    }
    for p in pending {
        p.await.expect("completion").expect("durable");
    }
}

/// `devices` devices with events `1..=events` each, in a journal that checkpoints every
/// `every` bytes (spilling after 64 offsets), closed; returns its length.
async fn closed_fleet(dir: &Path, devices: u32, events: u64, every: u64) -> u64 {
    let journal = open_checkpointing(dir, 64, every).expect("open");
    provision(&journal, devices).await;
    write_events(&journal, devices, 1..=events).await;
    journal.close();
    journal.durable_len()
}

/// Waits until the index's thread has nothing left to do (no spill or checkpoint due).
async fn index_settled(journal: &Journal) {
    for _ in 0..3000 {
        {
            let index = journal.index();
            if !index.wants_spill() && !index.wants_checkpoint() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the index's thread never caught up");
}

/// Waits for the scrub to finish.
async fn scrubbed(journal: &Journal) -> ScrubStatus {
    for _ in 0..1000 {
        let status = journal.scrub();
        if status.state != ScrubState::Running {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the scrub never finished: {:?}", journal.scrub());
}

fn index_dir(dir: &Path) -> PathBuf {
    dir.join("journal.log.index")
}

/// The files of the index's directory, by name. A file that goes between the listing and
/// its read (the writer's index thread replacing its checkpoint) is left out.
fn index_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(index_dir(dir))
        .expect("index dir")
        .flatten()
        .filter_map(|e| {
            let bytes = std::fs::read(e.path()).ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), bytes))
        })
        .collect();
    files.sort();
    files
}

/// [`index_files`] once a writable journal's index thread has settled: two listings 50 ms
/// apart agree (a checkpoint or merge it started just before is finished).
async fn settled_index_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut last = index_files(dir);
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = index_files(dir);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the index directory never settled");
}

fn restore_index_files(dir: &Path, files: &[(String, Vec<u8>)]) {
    let _ = std::fs::remove_dir_all(index_dir(dir));
    std::fs::create_dir_all(index_dir(dir)).expect("index dir");
    for (name, bytes) in files {
        std::fs::write(index_dir(dir).join(name), bytes).expect("write");
    }
}

/// Each device's seq as the index has it.
fn seqs(journal: &Journal) -> Vec<(u32, u64)> {
    let index = journal.index();
    let mut seqs: Vec<(u32, u64)> = index.devices.values().map(|d| (d.num, d.seq)).collect();
    seqs.sort_unstable();
    seqs
}

/// Everything an open derives from the journal, for comparing an open from a checkpoint with
/// a full scan (of the same bytes: the lengths and whether the file ended cleanly are left
/// out when `lengths` is false, for a file a close has added a marker to since).
fn fingerprint_of(journal: &Journal, lengths: bool) -> String {
    let index = journal.index();
    let mut devices: Vec<String> = index
        .devices
        .values()
        .map(|d| {
            format!(
                "{} {} v{} {:?} {} seq {} {:?} {:?}",
                d.num,
                d.id,
                d.version,
                d.config,
                d.created_at_ms,
                d.seq,
                d.snapshots,
                d.dead_letters()
            )
        })
        .collect();
    devices.sort();
    let mut removed: Vec<u32> = index.removed.iter().copied().collect();
    removed.sort_unstable();
    let r = journal.recovery();
    let lengths = if lengths {
        format!(
            " valid {} confirmed {} clean {}",
            r.valid_len, r.confirmed_len, r.closed_cleanly
        )
    } else {
        String::new()
    };
    format!(
        "{:?}\n{devices:#?}\nremoved {removed:?} next {} records {}{lengths}",
        index.versions, index.next_num, r.records
    )
}

fn fingerprint(journal: &Journal) -> String {
    fingerprint_of(journal, true)
}

/// Besides events: snapshots, dead letters, a lost seq, a second plugin version and a rebind,
/// a removal and the id provisioned again under a new number.
async fn mixed_history(journal: &Journal) {
    let d0 = journal.device_writer(0, 8);
    d0.append_snapshot(100, 0, b"snapshot of d0 at 100".to_vec())
        .expect("snapshot");
    for n in 0..3 {
        d0.append_dead_letter(DeadLetter {
            device: 0,
            after_seq: 100,
            at_ms: 5,
            version: 0,
            event: format!("{{\"bad\":{n}}}").into_bytes(),
            code: "trap".into(),
            message: "boom".into(),
        });
    }
    let seq3 = journal.device("d3").expect("d3").seq;
    let (tx, rx) = tokio::sync::oneshot::channel();
    journal
        .device_writer(3, 8)
        .append_lost(seq3 + 1, 7, 0, move |r| {
            let _ = tx.send(r);
        });
    rx.await.expect("completion").expect("lost seq durable");
    let (r, e) = version_record(1);
    journal.append(&r, e).await.expect("version 1");
    let mut head = journal.device("d1").expect("d1");
    head.version = 1;
    journal.device_writer(1, 8).append_rebind(&head, 9);
    journal.barrier().await.expect("barrier");
    let num = journal.device("d2").expect("d2").num;
    journal.record_removal(num, 10).await.expect("removal");
    journal
        .record_device("d2", 1, b"{\"again\":true}", 11)
        .await
        .expect("provisioned again");
}

/// After a clean close, and after a crash, an open reads the index checkpoint and scans only
/// what came after it, and derives exactly what a full scan does (snapshots, dead letters,
/// lost seqs, versions, rebinds, removals included); the scrub finds the skipped part intact.
/// Runs merged away after the checkpoint stay on disk while it names them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_from_an_index_checkpoint_scans_only_what_came_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (devices, every) = (4u32, 8 << 10);
    let journal = open_checkpointing(dir.path(), 64, every).expect("open");
    provision(&journal, devices).await;
    write_events(&journal, devices, 1..=300).await;
    mixed_history(&journal).await;
    index_settled(&journal).await;
    assert!(
        journal.index().checkpoint_at >= every,
        "a checkpoint was written"
    );
    journal.close();
    let end = journal.index().durable_len;
    drop(journal);

    // A clean close checkpointed at its very end: nothing to scan.
    let journal = open_checkpointing(dir.path(), 64, every).expect("reopen");
    let recovery = journal.recovery().clone();
    assert_eq!(recovery.from_checkpoint, Some(end));
    assert_eq!(recovery.valid_len, end);
    assert!(recovery.dropped.is_none());
    check_histories_of(&journal, 0, 300);
    let from_checkpoint = fingerprint(&journal);
    assert_eq!(journal.dead_letters(0).expect("dead letters").len(), 3);
    let snapshot = journal.snapshot_at(0, 300, 0).expect("snapshot");
    assert_eq!(
        journal.read_snapshot(snapshot).expect("read"),
        b"snapshot of d0 at 100"
    );
    assert!(journal.read_events(3, 301, 301).expect("lost")[0].lost);
    let status = scrubbed(&journal).await;
    assert_eq!(status.state, ScrubState::Clean, "{status:?}");
    assert_eq!(status.scanned, status.total);
    assert!(status.total > 0);
    // A read-only open beside it uses the checkpoint as well, and touches nothing. (After
    // the scrub, which records its progress by writing the index checkpoint again.)
    let before = settled_index_files(dir.path()).await;
    let reader = Journal::open_read_only(dir.path()).expect("read-only");
    assert_eq!(reader.recovery().from_checkpoint, Some(end));
    assert_eq!(fingerprint(&reader), from_checkpoint);
    drop(reader);
    assert_eq!(index_files(dir.path()), before);
    journal.close();
    drop(journal);
    // A full scan (no spilling: no checkpoint) finds the same.
    let journal = open_spilling(dir.path(), 0);
    assert_eq!(journal.recovery().from_checkpoint, None);
    assert_eq!(fingerprint(&journal), from_checkpoint);
    journal.close();
    drop(journal);

    // Reopened, with the next checkpoint far away: events enough for spills and merges (of
    // the checkpoint's runs too) but not for a checkpoint, then a crash. The runs the checkpoint names must
    // still be there.
    let journal = open_checkpointing(dir.path(), 16, 1 << 20).expect("reopen");
    assert_eq!(journal.recovery().from_checkpoint, Some(end));
    let runs_before = journal.index().runs.list().to_vec();
    // Which spills merge into the checkpoint's runs depends on how the index's thread batches
    // them (timing), so write in rounds until one has; the merge runs after the spill, so a
    // round waits for it a while before writing more.
    let merged_away = || {
        let runs_after = journal.index().runs.list().to_vec();
        runs_before
            .iter()
            .any(|r| !runs_after.iter().any(|a| Arc::ptr_eq(r, a)))
    };
    let mut last = 300;
    while !merged_away() {
        assert!(last < 3000, "no run the checkpoint names was merged away");
        write_events(&journal, 2, last + 1..=last + 100).await;
        last += 100;
        index_settled(&journal).await;
        for _ in 0..100 {
            if merged_away() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(journal.index().checkpoint_at, end, "no checkpoint since");
    let image = crash_image(dir.path());
    let index_image = index_files(dir.path());
    crash_with(journal, dir.path(), &image);
    restore_index_files(dir.path(), &index_image);
    let journal = open_checkpointing(dir.path(), 64, every).expect("after the crash");
    assert_eq!(journal.recovery().from_checkpoint, Some(end));
    check_histories_of(&journal, 0, last);
    check_histories_of(&journal, 1, last);
    let after_crash = fingerprint_of(&journal, false);
    assert_eq!(scrubbed(&journal).await.state, ScrubState::Clean);
    journal.close();
    drop(journal);
    let journal = open_spilling(dir.path(), 0);
    assert_eq!(
        fingerprint_of(&journal, false),
        after_crash,
        "a full scan agrees"
    );
    journal.close();
    drop(journal);

    // Writing goes on, checkpoints included.
    let journal = open_checkpointing(dir.path(), 64, every).expect("reopen");
    write_events(&journal, 2, last + 1..=last + 200).await;
    index_settled(&journal).await;
    assert!(journal.index().checkpoint_at > end);
    check_histories_of(&journal, 0, last + 200);
}

/// A journal smaller than one interval is never checkpointed: its opens scan (and check)
/// every record.
#[tokio::test]
async fn a_small_journal_is_never_checkpointed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = open_checkpointing(dir.path(), 64, 1 << 20).expect("open");
    provision(&journal, 2).await;
    write_events(&journal, 2, 1..=50).await;
    journal.close();
    drop(journal);
    assert!(!index_dir(dir.path()).join("checkpoint").exists());
    let journal = open_checkpointing(dir.path(), 64, 1 << 20).expect("reopen");
    assert_eq!(journal.recovery().from_checkpoint, None);
    assert_eq!(journal.scrub().state, ScrubState::NotNeeded);
}

/// Media damage before the checkpoint, which an open from it does not read: the scrub finds
/// it and removes the checkpoint, so the next open scans everything and refuses naming the
/// offset, exactly as without checkpoints; `--salvage` then keeps every intact record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrub_finds_damage_before_the_checkpoint_and_the_next_open_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (devices, every) = (3u32, 8 << 10);
    closed_fleet(dir.path(), devices, 1500, every).await;
    // Flip a byte inside the body of device 1's seq 700 (away from both ends, whose bytes
    // the checkpoint's identity check covers).
    let mut bytes = std::fs::read(dir.path().join(FILE_NAME)).expect("read");
    let (at, len) = records_of(&bytes)
        .into_iter()
        .find_map(|(at, len, r)| match r {
            Record::Event(e) if e.device == 1 && e.seq == 700 => Some((at, len)),
            _ => None,
        })
        .expect("seq 700");
    bytes[at + len / 2] ^= 0x40;
    std::fs::write(dir.path().join(FILE_NAME), &bytes).expect("write");
    // Salvage never trusts the checkpoint: it reads every record (on a copy here).
    let copy = tempfile::tempdir().expect("tempdir");
    std::fs::copy(dir.path().join(FILE_NAME), copy.path().join(FILE_NAME)).expect("copy");
    restore_index_files(copy.path(), &index_files(dir.path()));
    let salvaged = Journal::open(
        copy.path(),
        &JournalOptions {
            salvage: true,
            ..JournalOptions::default()
        },
    )
    .expect("salvage");
    let report = salvaged
        .recovery()
        .salvaged
        .clone()
        .expect("salvage found the damage");
    assert_eq!(report.damage.offset, at as u64);
    // A read-only open (`drover replay`, `export`) starts from the checkpoint too.
    let reader = Journal::open_read_only(dir.path()).expect("read-only");
    assert!(reader.recovery().from_checkpoint.is_some());
    check_histories_of(&reader, 0, 1500);
    // Its read of the damaged record says what happens next as it is: it removes no
    // checkpoint (a review was told the next start would check the whole journal).
    let said = reader
        .read_events(1, 700, 700)
        .expect_err("damaged")
        .to_string();
    assert!(
        said.contains("this read-only open changes nothing")
            && !said.contains("the next start checks the whole journal"),
        "{said}"
    );
    drop(reader);

    let journal = open_checkpointing(dir.path(), 64, every).expect("opens from the checkpoint");
    assert!(journal.recovery().from_checkpoint.is_some());
    let status = scrubbed(&journal).await;
    match &status.state {
        ScrubState::Damaged { offset, reason } => {
            assert_eq!(*offset, at as u64);
            let file = dir.path().join(FILE_NAME).display().to_string();
            assert!(
                reason.starts_with(&format!("{file}: damaged record at byte {at} ")),
                "names the file and byte: {reason}"
            );
        }
        other => panic!("the scrub should find the damage: {other:?}"),
    }
    assert!(!index_dir(dir.path()).join("checkpoint").exists());
    // Reads of the damaged record fail; nothing damaged is served as good.
    assert!(journal.read_events(1, 700, 700).is_err());
    check_histories_of(&journal, 0, 1500);
    // Appends go on, and the close writes no new checkpoint over the damage.
    write_events(&journal, devices, 1501..=1510).await;
    journal.close();
    drop(journal);
    assert!(!index_dir(dir.path()).join("checkpoint").exists());

    let err = open_checkpointing(dir.path(), 64, every)
        .err()
        .expect("the next open refuses");
    let damage = Damaged::of(&err).unwrap_or_else(|| panic!("{err}"));
    assert_eq!(damage.offset, at as u64);
    assert_eq!(damage.devices[0].device, "d1");
    let journal = Journal::open(
        dir.path(),
        &JournalOptions {
            salvage: true,
            index_checkpoint_every: every,
            index_spill_at: 64,
            ..JournalOptions::default()
        },
    )
    .expect("salvaged");
    assert_eq!(journal.recovery().from_checkpoint, None);
    check_histories_of(&journal, 0, 1510);
    check_histories_of(&journal, 2, 1510);
    assert_eq!(journal.device("d1").expect("d1").seq, 1510);
}

/// One device's whole history reads back.
fn check_histories_of(journal: &Journal, device: u32, events: u64) {
    let all = journal.read_events(device, 1, events).expect("read");
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events).collect::<Vec<_>>(), "device {device}");
    for e in &all {
        assert_eq!(e.event, expected_event(e.seq));
    }
}

/// A checkpoint that cannot be trusted (damaged, naming a missing run, or taken of another
/// journal) is not used: the open scans the whole journal, with the same result, and clears
/// the stale files out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_checkpoint_is_ignored_for_a_full_scan() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (devices, every) = (3u32, 8 << 10);
    closed_fleet(dir.path(), devices, 200, every).await;
    let files = index_files(dir.path());
    let run = files
        .iter()
        .find(|(n, _)| n.starts_with("run-"))
        .map(|(n, _)| n.clone())
        .expect("a run");

    type Spoil = Box<dyn Fn(&Path)>;
    let other = tempfile::tempdir().expect("tempdir");
    {
        // Another journal with a commit marker elsewhere.
        let journal = open_checkpointing(other.path(), 64, every).expect("open");
        provision(&journal, 1).await;
        write_events(&journal, 1, 1..=1000).await;
        journal.close();
    }
    let other_journal = std::fs::read(other.path().join(FILE_NAME)).expect("read");
    let own_len = std::fs::metadata(dir.path().join(FILE_NAME))
        .expect("len")
        .len();
    assert!(
        other_journal.len() as u64 > own_len,
        "longer than the checkpoint's position"
    );

    // The files as they are load (the control for what follows).
    let journal = open_checkpointing(dir.path(), 64, every).expect("open");
    assert_eq!(journal.recovery().from_checkpoint, Some(own_len));
    journal.close();
    drop(journal);
    // With checkpoints off, one left by an earlier run is not used either.
    let journal = open_checkpointing(dir.path(), 64, 0).expect("open");
    assert_eq!(journal.recovery().from_checkpoint, None);
    check_histories(&journal, devices, 200);
    journal.close();
    drop(journal);
    // A shorter journal of another directory beside the checkpoint: not taken for this one
    // cut short (its first bytes differ), but opened as what it is.
    let shorter = tempfile::tempdir().expect("tempdir");
    {
        let journal = open_checkpointing(shorter.path(), 64, every).expect("open");
        provision(&journal, 1).await;
        write_events(&journal, 1, 1..=300).await;
        journal.close();
    }
    let shorter_len = std::fs::metadata(shorter.path().join(FILE_NAME))
        .expect("len")
        .len();
    // Long enough to hold the first bytes the checkpoint's identity covers, shorter than it.
    assert!(shorter_len > 5000 && shorter_len < own_len, "{shorter_len}");
    let own = std::fs::read(dir.path().join(FILE_NAME)).expect("read");
    let checkpoint = std::fs::read(dir.path().join("journal.log.checkpoint")).expect("read");
    std::fs::copy(shorter.path().join(FILE_NAME), dir.path().join(FILE_NAME)).expect("swap");
    std::fs::remove_file(dir.path().join("journal.log.checkpoint")).expect("remove");
    restore_index_files(dir.path(), &files);
    let journal = open_checkpointing(dir.path(), 64, every).expect("another, shorter journal");
    assert_eq!(journal.recovery().from_checkpoint, None);
    check_histories(&journal, 1, 300);
    journal.close();
    drop(journal);
    std::fs::write(dir.path().join(FILE_NAME), &own).expect("put back");
    std::fs::write(dir.path().join("journal.log.checkpoint"), &checkpoint).expect("put back");
    let spoils: Vec<(&str, Spoil)> = vec![
        (
            "a flipped byte",
            Box::new(|d: &Path| {
                let path = index_dir(d).join("checkpoint");
                let mut bytes = std::fs::read(&path).expect("read");
                let at = bytes.len() / 2;
                bytes[at] ^= 1;
                std::fs::write(&path, bytes).expect("write");
            }),
        ),
        (
            "a missing run",
            Box::new(move |d: &Path| {
                std::fs::remove_file(index_dir(d).join(&run)).expect("remove");
            }),
        ),
    ];
    for (what, spoil) in spoils {
        restore_index_files(dir.path(), &files);
        std::fs::write(index_dir(dir.path()).join("run-stale"), b"x").expect("stale");
        spoil(dir.path());
        let journal = open_checkpointing(dir.path(), 64, every).expect(what);
        assert_eq!(journal.recovery().from_checkpoint, None, "{what}");
        check_histories(&journal, devices, 200);
        assert!(
            !index_dir(dir.path()).join("run-stale").exists(),
            "{what}: stale files are cleared"
        );
        journal.close();
    }
    // The checkpoint of this journal beside another journal (as big, or bigger).
    restore_index_files(dir.path(), &files);
    std::fs::write(dir.path().join(FILE_NAME), &other_journal).expect("swap");
    let _ = std::fs::remove_file(dir.path().join("journal.log.checkpoint"));
    let journal = open_checkpointing(dir.path(), 64, every).expect("another journal");
    assert_eq!(journal.recovery().from_checkpoint, None);
    check_histories(&journal, 1, 1000);
}

/// A journal found shorter than its index checkpoint's position was cut by something other
/// than a crash (the checkpoint proves those bytes were synced): refused as damage, with the
/// checkpoint kept, even without the clean close's own checkpoint; salvage then marks the
/// seqs the checkpoint knew of as lost, so none is reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_shorter_than_its_index_checkpoint_is_refused_as_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (devices, every) = (2u32, 8 << 10);
    closed_fleet(dir.path(), devices, 200, every).await;
    std::fs::remove_file(dir.path().join("journal.log.checkpoint")).expect("remove");
    let bytes = std::fs::read(dir.path().join(FILE_NAME)).expect("read");
    // Cut at the start of device 1's seq 150.
    let cut = records_of(&bytes)
        .into_iter()
        .find_map(|(at, _, r)| match r {
            Record::Event(e) if e.device == 1 && e.seq == 150 => Some(at),
            _ => None,
        })
        .expect("seq 150");
    // Cut so short that it no longer holds the bytes the checkpoint's identity covers (or
    // not even a header): refused all the same, never opened as an empty journal.
    for short in [0, 10, 1000] {
        std::fs::write(dir.path().join(FILE_NAME), &bytes[..short]).expect("cut");
        let err = open_checkpointing(dir.path(), 64, every)
            .err()
            .unwrap_or_else(|| panic!("a journal cut to {short} bytes is refused"));
        assert!(Damaged::of(&err).is_some(), "{short}: {err}");
        assert_eq!(
            std::fs::metadata(dir.path().join(FILE_NAME))
                .expect("len")
                .len(),
            short as u64,
            "left as found"
        );
    }
    std::fs::write(dir.path().join(FILE_NAME), &bytes[..cut]).expect("cut");
    let err = open_checkpointing(dir.path(), 64, every)
        .err()
        .expect("refused");
    let damage = Damaged::of(&err).unwrap_or_else(|| panic!("{err}"));
    assert!(damage.reason.contains("cut short"), "{err}");
    assert!(index_dir(dir.path()).join("checkpoint").exists(), "kept");
    let journal = Journal::open(
        dir.path(),
        &JournalOptions {
            salvage: true,
            index_spill_at: 64,
            index_checkpoint_every: every,
            ..JournalOptions::default()
        },
    )
    .expect("salvaged");
    assert_eq!(journal.device("d1").expect("d1").seq, 200, "no seq reused");
    assert_eq!(journal.device("d0").expect("d0").seq, 200);
    let events = journal.read_events(1, 149, 200).expect("read");
    assert!(!events[0].lost && events[1].lost && events[51].lost);
}

/// After an open from a checkpoint, what came after it gets the usual recovery: a torn last
/// commit is cut, and damage before the last commit refuses to open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_checkpoint_recovery_cuts_torn_tails_and_refuses_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (devices, every) = (2u32, 8 << 10);
    closed_fleet(dir.path(), devices, 200, every).await;
    // Reopened from the close's checkpoint with checkpoints too far apart to write another:
    // ten more seqs after it, then a crash.
    let journal = open_checkpointing(dir.path(), 64, 1 << 40).expect("reopen");
    let at = journal
        .recovery()
        .from_checkpoint
        .expect("from the checkpoint");
    for seq in 201..=210 {
        // One commit each: seq 202's is not the last.
        write_events(&journal, devices, seq..=seq).await;
    }
    let image = crash_image(dir.path());
    let index_image = index_files(dir.path());
    let records = records_of(&image);
    let (last_at, last_len) = records
        .iter()
        .rev()
        .find(|(_, _, r)| matches!(r, Record::Event(_)))
        .map(|(a, l, _)| (*a, *l))
        .expect("an event");
    let (early_at, early_len) = records
        .iter()
        .find(|(a, _, r)| *a as u64 > at && matches!(r, Record::Event(e) if e.seq == 202))
        .map(|(a, l, _)| (*a, *l))
        .expect("seq 202");

    // Torn: the last event cut in half.
    crash_with(journal, dir.path(), &image[..last_at + last_len / 2]);
    restore_index_files(dir.path(), &index_image);
    let journal = open_checkpointing(dir.path(), 64, every).expect("torn tail cut");
    assert_eq!(journal.recovery().from_checkpoint, Some(at));
    let dropped = journal.recovery().dropped.clone().expect("dropped");
    assert_eq!(dropped.offset, last_at as u64);
    assert_eq!(seqs(&journal), vec![(0, 210), (1, 209)]);

    // Damaged: a flipped byte in seq 202 (not in the last commit).
    let mut damaged = image.clone();
    damaged[early_at + early_len / 2] ^= 0x10;
    crash_with(journal, dir.path(), &damaged);
    restore_index_files(dir.path(), &index_image);
    let err = open_checkpointing(dir.path(), 64, every)
        .err()
        .expect("refused");
    let damage = Damaged::of(&err).unwrap_or_else(|| panic!("{err}"));
    assert_eq!(damage.offset, early_at as u64);
}

/// Every start from a checkpoint reads the whole prefix again (damage can appear at rest in
/// bytes read intact before), and a pass cut short by a stop resumes where it got to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_start_scrubs_again_and_a_stopped_pass_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (devices, every) = (3u32, 8 << 10);
    let prefix =
        closed_fleet(dir.path(), devices, 1000, every).await - record::FILE_HEADER_LEN as u64;
    let with_rate = |rate: u64| {
        Journal::open(
            dir.path(),
            &JournalOptions {
                index_spill_at: 64,
                index_checkpoint_every: every,
                scrub_rate: rate,
                ..JournalOptions::default()
            },
        )
        .expect("open")
    };
    // A slow scrub (about 6 s for the whole prefix), stopped part way by a close once it has
    // passed a few commit markers (where its progress is kept).
    let journal = with_rate(16 << 10);
    for _ in 0..1000 {
        if journal.scrub().scanned >= 8 << 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    journal.close();
    let stopped = journal.scrub();
    drop(journal);
    assert_eq!(stopped.state, ScrubState::Stopped, "{stopped:?}");
    assert!(
        stopped.scanned > 0 && stopped.scanned < prefix,
        "{stopped:?}"
    );
    // The next start resumes it: less than the whole prefix is left.
    let journal = with_rate(0);
    let status = scrubbed(&journal).await;
    assert_eq!(status.state, ScrubState::Clean);
    assert!(
        status.total < prefix && status.total > 0,
        "{status:?} of {prefix}"
    );
    journal.close();
    drop(journal);
    // That pass complete, the next start reads everything again.
    let journal = with_rate(0);
    let status = scrubbed(&journal).await;
    assert_eq!((status.state, status.total), (ScrubState::Clean, prefix));
}

/// A damaged run file (the offsets it holds are not checksummed) never serves another
/// record as the one asked for: the read fails naming the damage, the checkpoint is removed,
/// and the next open rebuilds the index from the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_run_is_caught_on_read_and_the_next_open_rebuilds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (devices, every) = (1u32, 8 << 10);
    closed_fleet(dir.path(), devices, 300, every).await;
    // Swap the first two offsets of every run: seqs 1 and 2 (of some run) point at each
    // other's records.
    for (name, mut bytes) in index_files(dir.path()) {
        if name.starts_with("run-") && bytes.len() >= 16 {
            let (a, b) = bytes.split_at_mut(8);
            a.swap_with_slice(&mut b[..8]);
            std::fs::write(index_dir(dir.path()).join(&name), &bytes).expect("write");
        }
    }
    let journal = open_checkpointing(dir.path(), 64, every).expect("opens");
    assert!(journal.recovery().from_checkpoint.is_some());
    let err = journal
        .read_events(0, 1, 300)
        .expect_err("the swap is noticed");
    assert!(err.to_string().contains("the index is damaged"), "{err}");
    assert!(!index_dir(dir.path()).join("checkpoint").exists());
    journal.close();
    drop(journal);
    let journal = open_checkpointing(dir.path(), 64, every).expect("reopen");
    assert_eq!(journal.recovery().from_checkpoint, None);
    check_histories_of(&journal, 0, 300);
}

/// A checkpoint that cannot be written (the index's directory unusable, as on a full or
/// broken disk) costs nothing but the checkpoint: every append succeeds and reads back, and
/// checkpoints resume once the directory is usable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_that_cannot_be_written_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (devices, every) = (2u32, 8 << 10);
    let journal = open_checkpointing(dir.path(), 1 << 20, every).expect("open");
    std::fs::remove_dir_all(index_dir(dir.path())).expect("remove the index directory");
    std::fs::write(index_dir(dir.path()), b"not a directory").expect("a file in its place");
    provision(&journal, devices).await;
    write_events(&journal, devices, 1..=200).await;
    index_settled(&journal).await;
    let tried = journal.index().checkpoint_at;
    assert!(tried > 0, "a checkpoint was tried");
    check_histories_of(&journal, 1, 200);
    std::fs::remove_file(index_dir(dir.path())).expect("remove the file");
    std::fs::create_dir(index_dir(dir.path())).expect("the directory again");
    write_events(&journal, devices, 201..=400).await;
    index_settled(&journal).await;
    assert!(index_dir(dir.path()).join("checkpoint").exists());
    journal.close();
    drop(journal);
    let journal = open_checkpointing(dir.path(), 1 << 20, every).expect("reopen");
    assert!(journal.recovery().from_checkpoint.is_some());
    check_histories_of(&journal, 0, 400);
    check_histories_of(&journal, 1, 400);
}

/// A snapshot taken after a seq that salvage finds lost holds that event's effect, which no
/// replay can reproduce: salvage leaves it out (one taken before stays), so the salvaged
/// journal rebuilds to one state whichever way it is rebuilt.
#[tokio::test]
async fn salvage_leaves_out_snapshots_that_cover_a_lost_seq() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 10).await;
    let writer = journal.device_writer(0, 8);
    for seq in [3, 10] {
        writer
            .append_snapshot(seq, 0, format!("state at {seq}").into_bytes())
            .expect("snapshot");
    }
    journal.barrier().await.expect("barrier");
    let fifth = journal.index().offset_of(0, 5).expect("offset");
    assert_eq!(journal.snapshots(0).len(), 2);
    journal.close();
    drop(journal);
    let path = dir.path().join(FILE_NAME);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[fifth as usize + record::HEADER_LEN + 4] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write");
    let (journal, recovery) = open_with(dir.path(), true).expect("salvage");
    assert_eq!(recovery.salvaged.expect("salvaged").lost_seqs, 1);
    let kept: Vec<u64> = journal.snapshots(0).iter().map(|s| s.seq).collect();
    assert_eq!(kept, vec![3]);
    assert_eq!(journal.device("a").expect("a").seq, 10);
}

// ---- effects (journal/effects.rs) ----

/// Appends event `seq` of `writer`'s device with `fx`, and waits until it is durable.
async fn append_fx(writer: &DeviceWriter, seq: u64, at_ms: u64, fx: Fx) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    writer.append_event(seq, at_ms, 0, "{}", vec![], Some(fx), move |r, _| {
        let _ = tx.send(r);
    });
    rx.await.expect("completion").expect("durable");
}

fn set_timer(key: &str, due_ms: u64, every_ms: Option<u64>) -> Effect {
    Effect::SetTimer {
        key: key.into(),
        due_ms,
        every_ms,
        event: format!(r#"{{"timer":"{key}"}}"#),
    }
}

fn external(effects: Vec<Effect>) -> Fx {
    Fx {
        origin: Origin::External,
        effects,
    }
}

/// What every device owes, comparable.
fn owed(journal: &Journal) -> Vec<(String, DeviceFx)> {
    let mut all: Vec<(String, DeviceFx)> = journal
        .pending_fx()
        .into_iter()
        .map(|(id, num, fx)| {
            // The index keeps no events: each pending timer's is read from its record.
            for (key, t) in fx.timers.iter() {
                let fx = journal.record_fx(num, t.set().seq).expect("read");
                assert_eq!(
                    fx.as_ref().and_then(|fx| fx.timer_event(t.set().index)),
                    Some(format!(r#"{{"timer":"{key}"}}"#).as_str()),
                    "{id}: the event of timer {key}"
                );
            }
            (id.to_string(), fx)
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// A history that leaves one of everything owed: timers (one replaced, one cancelled, one
/// fired and gone, one periodic moved on), a message handled, one undeliverable and one
/// still owed, a command acknowledged and one waiting.
async fn effects_history(journal: &Journal) {
    let a = journal.device_writer(0, 64);
    let b = journal.device_writer(1, 64);
    append_fx(
        &a,
        1,
        1000,
        external(vec![
            set_timer("once", 5000, None),
            set_timer("gone", 6000, None),
            set_timer("tick", 2000, Some(1000)),
            Effect::Send {
                to: "d1".into(),
                event: r#"{"hello":1}"#.into(),
            },
            Effect::Send {
                to: "nobody".into(),
                event: "{}".into(),
            },
            Effect::Command {
                payload: r#"{"heat":true}"#.into(),
                ttl_ms: None,
            },
            Effect::Command {
                payload: r#"{"heat":false}"#.into(),
                ttl_ms: None,
            },
        ]),
    )
    .await;
    // Replaced, cancelled, and one more message for d1.
    append_fx(
        &a,
        2,
        1100,
        external(vec![
            set_timer("once", 7000, None),
            Effect::CancelTimer { key: "gone".into() },
            Effect::Send {
                to: "d1".into(),
                event: r#"{"hello":2}"#.into(),
            },
        ]),
    )
    .await;
    // The periodic timer fires late, two periods missed: next due 2000 + 3 * 1000.
    append_fx(
        &a,
        3,
        4500,
        Fx {
            origin: Origin::Timer {
                key: "tick".into(),
                set: EffectId { seq: 1, index: 2 },
                due_ms: 2000,
                missed: 2,
            },
            effects: vec![],
        },
    )
    .await;
    // d1 handles the first message.
    append_fx(
        &b,
        1,
        1200,
        Fx {
            origin: Origin::Message {
                sender: "d0".into(),
                num: 0,
                id: EffectId { seq: 1, index: 3 },
            },
            effects: vec![],
        },
    )
    .await;
    journal
        .record_undeliverable(
            0,
            EffectId { seq: 1, index: 4 },
            "nobody",
            "no such device",
            1300,
        )
        .await
        .expect("undeliverable");
    journal
        .record_command_ack(0, EffectId { seq: 1, index: 5 }, 1400)
        .await
        .expect("ack");
}

fn expected_owed() -> Vec<(String, DeviceFx)> {
    let mut fx = DeviceFx::default();
    fx.timers.insert(
        "once".into(),
        TimerEntry::new(7000, None, EffectId { seq: 2, index: 0 }).expect("indexable"),
    );
    fx.timers.insert(
        "tick".into(),
        TimerEntry::new(
            5000,
            std::num::NonZeroU64::new(1000),
            EffectId { seq: 1, index: 2 },
        )
        .expect("indexable"),
    );
    fx.sent.insert(
        EffectId { seq: 2, index: 2 },
        effects::Sent::To("d1".into()),
    );
    fx.outbox.insert(
        EffectId { seq: 1, index: 6 },
        effects::CommandEntry {
            at_ms: 1000,
            expires_ms: None,
        },
    );
    vec![("d0".into(), fx)]
}

#[tokio::test]
async fn what_effects_leave_owed_is_the_same_live_after_a_full_scan_and_from_a_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = open_checkpointing(dir.path(), 64, 1).expect("open");
    provision(&journal, 2).await;
    effects_history(&journal).await;
    assert_eq!(owed(&journal), expected_owed(), "live");
    let dead = journal.dead_letters(0).expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].code, "undeliverable");
    assert_eq!(dead[0].event, b"{}");
    assert!(dead[0].message.contains("nobody"), "{}", dead[0].message);
    journal.close();
    drop(journal);

    // A clean close wrote an index checkpoint: the next open starts from it.
    let journal = open_checkpointing(dir.path(), 64, 1).expect("reopen");
    assert!(
        journal.recovery().from_checkpoint.is_some(),
        "{:?}",
        journal.recovery()
    );
    assert_eq!(owed(&journal), expected_owed(), "from the checkpoint");
    assert_eq!(scrubbed(&journal).await.state, ScrubState::Clean);
    journal.close();
    drop(journal);

    // Without it, the full scan rebuilds the same.
    std::fs::remove_dir_all(dir.path().join(format!("{FILE_NAME}.index"))).expect("rm index");
    let (journal, recovery) = open_dir(dir.path()).expect("full scan");
    assert!(recovery.from_checkpoint.is_none());
    assert_eq!(owed(&journal), expected_owed(), "full scan");
    assert_eq!(recovery.format, FORMAT_VERSION);
}

#[tokio::test]
async fn the_first_effect_raises_a_format_4_journal_and_a_format_1_one_refuses_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(FILE_NAME);
    std::fs::write(&path, legacy_file(2, 3)).expect("write");
    let (journal, _) = open_dir(dir.path()).expect("opens");
    let w = journal.device_writer(0, 8);
    // A plain event raises it only to markers.
    let rx = append_event(&w, 4);
    rx.await.expect("completion").expect("durable");
    assert_eq!(journal.recovery().format, 2);
    assert_eq!(
        &std::fs::read(&path).expect("read")[8..12],
        &super::writer::MARKERS_FROM.to_le_bytes()
    );
    append_fx(&w, 5, 2000, external(vec![set_timer("t", 9000, None)])).await;
    assert_eq!(
        &std::fs::read(&path).expect("read")[8..12],
        &FORMAT_VERSION.to_le_bytes()
    );
    journal.close();
    drop(journal);

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(FILE_NAME), legacy_file(1, 3)).expect("write");
    let (journal, _) = open_dir(dir.path()).expect("opens");
    let w = journal.device_writer(0, 8);
    let (tx, rx) = tokio::sync::oneshot::channel();
    w.append_event(
        4,
        2000,
        0,
        "{}",
        vec![],
        Some(external(vec![set_timer("t", 9000, None)])),
        move |r, _| {
            let _ = tx.send(r);
        },
    );
    let err = rx.await.expect("completion").expect_err("refused");
    assert!(matches!(err, JournalError::Format(_)), "{err}");
    assert!(
        w.is_fenced(),
        "the actor's state has the event: it must rebuild"
    );
    assert_eq!(journal.device("a").map(|d| d.seq), Some(3));
}

/// Two parties finding one message undeliverable at once (a removal's sweep and a
/// redelivery): one dead letter, recorded by whoever came first. Both passed the check that
/// it was owed before either record was durable, and it got two (a review's removal of a
/// room with 3,000 senders).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_found_undeliverable_twice_at_once_gets_one_dead_letter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = open_checkpointing(dir.path(), 64, 0).expect("open");
    provision(&journal, 1).await;
    let w = journal.device_writer(0, 8);
    append_fx(
        &w,
        1,
        1000,
        external(vec![Effect::Send {
            to: "x".into(),
            event: "{}".into(),
        }]),
    )
    .await;
    let id = EffectId { seq: 1, index: 0 };
    let (a, b) = tokio::join!(
        journal.record_undeliverable(0, id, "x", "device removed", 1100),
        journal.record_undeliverable(0, id, "x", "no such device", 1200),
    );
    let recorded = [a.expect("first"), b.expect("second")];
    assert_eq!(recorded.iter().filter(|r| **r).count(), 1, "{recorded:?}");
    assert_eq!(journal.dead_letters(0).expect("dead letters").len(), 1);
    assert!(owed(&journal).is_empty());
}

#[tokio::test]
async fn an_acknowledgement_or_undeliverable_racing_a_removal_is_no_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = open_checkpointing(dir.path(), 64, 0).expect("open");
    provision(&journal, 1).await;
    let w = journal.device_writer(0, 8);
    append_fx(
        &w,
        1,
        1000,
        external(vec![
            Effect::Command {
                payload: "{}".into(),
                ttl_ms: None,
            },
            Effect::Send {
                to: "x".into(),
                event: "{}".into(),
            },
        ]),
    )
    .await;
    journal.record_removal(0, 1100).await.expect("removed");
    // What a gateway's acknowledgement and the postman could still write afterwards.
    journal
        .record_command_ack(0, EffectId { seq: 1, index: 0 }, 1200)
        .await
        .expect("ack");
    journal
        .record_undeliverable(0, EffectId { seq: 1, index: 1 }, "x", "gone", 1300)
        .await
        .expect("undeliverable");
    journal.close();
    drop(journal);
    let (journal, recovery) = open_dir(dir.path()).expect("opens: no damage");
    assert!(recovery.dropped.is_none());
    assert!(journal.device("d0").is_none());
    assert!(owed(&journal).is_empty());
}

/// A journal in `dir` whose segments roll over every `segment_bytes`, with `events` events of
/// device `a`, each its own commit, closed.
async fn segmented(dir: &Path, segment_bytes: u64, events: u64) -> Vec<EventRecord> {
    let options = JournalOptions {
        segment_bytes,
        ..JournalOptions::default()
    };
    let journal = Journal::open(dir, &options).expect("open");
    let (r, e) = version_record(0);
    journal.append(&r, e).await.expect("version");
    let (r, e) = device_record(0, "a");
    journal.append(&r, e).await.expect("device");
    for seq in 1..=events {
        let (r, e) = event(0, seq);
        journal.append(&r, e).await.expect("event");
    }
    let all = journal.read_events(0, 1, events).expect("read");
    journal.close();
    all
}

fn open_segmented(dir: &Path, segment_bytes: u64, salvage: bool) -> std::io::Result<Journal> {
    let options = JournalOptions {
        segment_bytes,
        salvage,
        ..JournalOptions::default()
    };
    Journal::open(dir, &options)
}

#[tokio::test]
async fn segments_roll_over_and_a_reopen_reads_every_record_across_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let before = segmented(dir.path(), 512, 300).await;
    let segments = SegmentedBackend::list(dir.path()).expect("list");
    assert!(segments.len() > 20, "{} segments", segments.len());
    assert_eq!(segments[0].path, dir.path().join(FILE_NAME));

    let journal = open_segmented(dir.path(), 512, false).expect("reopen");
    assert!(journal.recovery().dropped.is_none());
    assert_eq!(journal.read_events(0, 1, 300).expect("read"), before);
    // And on: the next record goes to the last segment or a new one.
    let (r, e) = event(0, 301);
    journal.append(&r, e).await.expect("event 301");
    journal.close();
    drop(journal);

    // A crash that tore the last commit (here the close's marker of an empty batch): only
    // that commit is dropped.
    std::fs::remove_file(dir.path().join("journal.log.checkpoint")).expect("checkpoint");
    let last = SegmentedBackend::list(dir.path())
        .expect("list")
        .pop()
        .expect("last");
    let len = std::fs::metadata(&last.path).expect("meta").len();
    OpenOptions::new()
        .write(true)
        .open(&last.path)
        .and_then(|f| f.set_len(len - 5))
        .expect("tear");
    let journal = open_segmented(dir.path(), 512, false).expect("torn tail cut");
    let dropped = journal.recovery().dropped.clone().expect("dropped");
    assert!(dropped.torn, "{dropped:?}");
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(301));
    assert_eq!(journal.read_events(0, 1, 300).expect("read"), before);
}

/// Opens `dir` read-only while `writer`, between the reader's first listing of the segments
/// and its reading them, appends device 0's events `seqs` and closes (recording the longer
/// journal): a live server moving on under an export. Returns what the open gave and how
/// many listings it made. Needs a multi-threaded runtime (the writer runs inside the hook).
fn open_read_only_while(
    dir: &Path,
    writer: &Journal,
    seqs: std::ops::RangeInclusive<u64>,
) -> (std::io::Result<Journal>, u32) {
    let mut attempts = 0;
    let reader = Journal::open_read_only_with(dir, |attempt| {
        attempts += 1;
        if attempt == 0 {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    for seq in seqs.clone() {
                        let (r, e) = event(0, seq);
                        writer.append(&r, e).await.expect("event");
                    }
                })
            });
            writer.close();
        }
    });
    (reader, attempts)
}

/// A read-only open beside a live writer (`drover journal export` beside `drover serve`): the
/// writer adds segments and records a longer journal (its clean close) between the reader's
/// listing of the segments and its reading them. The reader read that record before it
/// listed, so it opens the journal as it was listed, not refused as cut short of what the
/// newer record proves durable; the next open sees everything. At rest, the same shortfall
/// is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_open_beside_a_writer_that_moves_on_opens_without_reporting_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    segmented(dir.path(), 512, 100).await;
    let writer = open_segmented(dir.path(), 512, false).expect("the live writer");
    let (reader, attempts) = open_read_only_while(dir.path(), &writer, 101..=200);
    let reader = reader.expect("opened, not refused as damage");
    assert_eq!(attempts, 1);
    let seen = reader.index().device("a").map(DeviceInfo::seq).expect("a");
    assert!((100..=200).contains(&seen), "{seen}");
    let events = reader.read_events(0, 1, seen).expect("read");
    assert_eq!(events.len() as u64, seen);
    drop((reader, writer));
    let reader = Journal::open_read_only(dir.path()).expect("at rest");
    assert_eq!(reader.index().device("a").map(DeviceInfo::seq), Some(200));
    assert_eq!(reader.read_events(0, 200, 200).expect("read")[0].seq, 200);
    drop(reader);

    // At rest, the newest segment deleted: refused, naming the segment the journal now ends
    // in and what may be wrong (it used to read as damage in that segment only).
    let mut segments = SegmentedBackend::list(dir.path()).expect("list");
    let newest = segments.pop().expect("newest");
    let before = segments.last().expect("the one before");
    std::fs::rename(&newest.path, dir.path().join("aside")).expect("aside");
    let err = Journal::open_read_only(dir.path()).err().expect("refused");
    let said = err.to_string();
    assert!(
        said.contains(&format!(
            "the journal ends at position {}, the end of {} (",
            newest.first,
            before.path.display()
        )) && said.contains("segment files after it are missing"),
        "{said}"
    );
    std::fs::rename(dir.path().join("aside"), &newest.path).expect("back");

    // At rest: the last segment cut short of what the clean close recorded is damage, found
    // on the first open, which does not start again.
    let last = SegmentedBackend::list(dir.path())
        .expect("list")
        .pop()
        .expect("last");
    let len = std::fs::metadata(&last.path).expect("meta").len();
    OpenOptions::new()
        .write(true)
        .open(&last.path)
        .and_then(|f| f.set_len(len - 40))
        .expect("cut");
    let mut attempts = 0;
    let err = Journal::open_read_only_with(dir.path(), |_| attempts += 1)
        .err()
        .expect("refused");
    assert!(Damaged::of(&err).is_some(), "{err}");
    assert_eq!(attempts, 1);
}

/// `drover replay` or an export beside a busy server with small segments and frequent index
/// checkpoints: each time the open lists the segments, the server writes on and writes an
/// index checkpoint past the listing before the open reads it. Read after the listing, that
/// checkpoint made every try look cut short (or, in a journal retention shortened, left it
/// no checkpoint it could open from), and the open failed as damaged. Read before, it never
/// claims more than the listing holds, with or without retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_open_is_not_refused_when_the_writer_checkpoints_past_each_listing() {
    for retained in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer = if retained {
            let writer = retaining(dir.path(), 10).expect("open");
            a_alone_past_the_checkpoints_identity_bytes(&writer).await;
            writer.retain_now().expect("pass");
            assert!(writer.retained_from() > 0, "retention deleted segments");
            writer
        } else {
            let writer = Journal::open(dir.path(), &keep_all_checkpointing()).expect("open");
            snapshotting_fleet(&writer, 400).await;
            writer
        };
        let mut next = writer.index().device("a").map(DeviceInfo::seq).expect("a") + 1;
        let written_at = writer.index().checkpoint_at;
        assert!(written_at > 0, "an index checkpoint");
        let mut attempts = 0;
        let reader = Journal::open_read_only_with(dir.path(), |_| {
            attempts += 1;
            let before = writer.index().checkpoint_at;
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    // Until the writer has written a newer checkpoint.
                    let device = writer.device_writer(0, 8);
                    for _ in 0..100 {
                        let acks: Vec<_> = (next..next + 40)
                            .map(|seq| append_event(&device, seq))
                            .collect();
                        for ack in acks {
                            ack.await.expect("answered").expect("durable");
                        }
                        next += 40;
                        index_settled(&writer).await;
                        if writer.index().checkpoint_at > before {
                            return;
                        }
                    }
                    panic!("no newer index checkpoint");
                })
            });
        });
        let reader = reader.unwrap_or_else(|e| panic!("retained: {retained}: refused: {e}"));
        assert_eq!(attempts, 1, "retained: {retained}");
        let seen = reader.index().device("a").map(DeviceInfo::seq).expect("a");
        assert!(seen < next, "{seen}");
        let oldest = reader.oldest_retained_seq(0);
        let events = reader.read_events(0, oldest, seen).expect("read");
        assert_eq!(
            events.len() as u64,
            seen - oldest + 1,
            "retained: {retained}"
        );
        drop((reader, writer));
    }
}

/// Beside a server whose retention deletes segments as it goes: between the open's reading
/// the index checkpoint and its listing the segments, the server writes newer checkpoints
/// and retention deletes the bytes the one read is tied to. The listing, made after that,
/// matches the directory, so the refusal ("not usable ... restore the data directory from a
/// backup") used to be believed; the checkpoint file was replaced meanwhile, so the open now
/// starts again and opens from the newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_open_starts_again_when_retention_deletes_what_its_checkpoint_needs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = retaining(dir.path(), 10).expect("open");
    a_alone_past_the_checkpoints_identity_bytes(&writer).await;
    writer.retain_now().expect("pass");
    let read_at = writer.index().checkpoint_at;
    let mut next = 3001;
    let mut listings = 0;
    let reader = Journal::open_read_only_hooked(
        dir.path(),
        |attempt| {
            if attempt > 0 {
                return;
            }
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    let device = writer.device_writer(0, 8);
                    for _ in 0..200 {
                        if writer.retained_from() > read_at - (64 << 10) {
                            return;
                        }
                        let acks: Vec<_> = (next..next + 50)
                            .map(|seq| append_event(&device, seq))
                            .collect();
                        device
                            .append_snapshot(next + 49, 0, b"state".to_vec())
                            .expect("snapshot");
                        for ack in acks {
                            ack.await.expect("answered").expect("durable");
                        }
                        next += 50;
                        writer.barrier().await.expect("snapshot durable");
                        index_settled(&writer).await;
                        writer.retain_now().expect("pass");
                    }
                    panic!("retention never deleted the checkpoint's bytes");
                })
            });
        },
        |_| listings += 1,
    );
    let reader = reader.unwrap_or_else(|e| panic!("refused: {e}"));
    assert_eq!(listings, 2, "opened again");
    let seen = reader.index().device("a").map(DeviceInfo::seq).expect("a");
    assert!(seen >= next - 1, "{seen} of {}", next - 1);
    drop((reader, writer));
}

/// The segment files a salvage set aside in `dir`: each one's first position, its path now,
/// and the path it had.
fn segments_set_aside(dir: &Path) -> Vec<(u64, std::path::PathBuf, std::path::PathBuf)> {
    std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (seg, _) = name.split_once(".damaged-")?;
            let position: u64 = seg
                .strip_prefix("journal.")?
                .strip_suffix(".seg")?
                .parse()
                .ok()?;
            Some((position, e.path(), dir.join(seg)))
        })
        .collect()
}

/// A salvage of a journal whose `journal.log` was deleted by hand says that, not that
/// retention deleted it (a review: `journal.retained` said 0).
#[tokio::test]
async fn a_salvage_without_the_first_segment_says_whether_retention_deleted_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    segmented(dir.path(), 512, 100).await;
    std::fs::remove_file(dir.path().join(FILE_NAME)).expect("removed");
    let err = open_segmented(dir.path(), 512, true)
        .err()
        .expect("refused");
    let said = err.to_string();
    assert!(
        said.contains("is missing, and retention deleted none") && said.contains("backup"),
        "{said}"
    );
    // Without the record of where the journal begins, it cannot tell (a second review: it
    // said "retention deleted none" all the same).
    std::fs::remove_file(dir.path().join(segments::RETAINED_FILE)).expect("removed");
    let said = open_segmented(dir.path(), 512, true)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        said.contains("are missing (deleted by retention, if its record")
            && !said.contains("retention deleted none"),
        "{said}"
    );
}

/// A salvage killed while it moved the later segments aside, with its new `journal.log`
/// ending before the segments left (it dropped unreadable bytes): the open refuses, and the
/// next salvage finishes the move rather than read those segments' records again (a review
/// killed one so, and the second salvage brought back records the first had set aside).
#[tokio::test]
async fn a_salvage_killed_while_moving_segments_aside_is_finished_not_read_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    segmented(dir.path(), 512, 300).await;
    let segments = SegmentedBackend::list(dir.path()).expect("list");
    assert!(segments.len() > 4, "{}", segments.len());
    // A missing segment in the middle: the salvage reads past it as unreadable bytes, so its
    // new journal is a segment shorter than the old one.
    std::fs::remove_file(&segments[segments.len() / 2].path).expect("removed");
    let journal = open_segmented(dir.path(), 512, true).expect("salvage");
    assert!(journal.recovery().salvaged.is_some());
    let salvaged = journal.read_events(0, 1, 300).expect("read");
    journal.close();
    drop(journal);

    // As if killed before it moved the last segment aside.
    let last_aside = segments_set_aside(dir.path())
        .into_iter()
        .max()
        .expect("segments set aside");
    std::fs::rename(&last_aside.1, &last_aside.2).expect("back");
    std::fs::write(dir.path().join("journal.log.salvage-moving"), b"").expect("mark");
    assert!(
        std::fs::metadata(dir.path().join(FILE_NAME))
            .expect("stat")
            .len()
            < last_aside.0,
        "the new journal ends before the segment left"
    );

    let err = open_segmented(dir.path(), 512, false)
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("--salvage was interrupted"),
        "{err}"
    );
    let journal = open_segmented(dir.path(), 512, true).expect("the salvage finished");
    assert_eq!(SegmentedBackend::list(dir.path()).expect("list").len(), 1);
    assert!(!dir.path().join("journal.log.salvage-moving").exists());
    assert_eq!(journal.read_events(0, 1, 300).expect("read"), salvaged);
    journal.close();
    drop(journal);

    // Killed before its rename: the mark and the partial new journal are left, and the old
    // journal is whole; a plain start removes both and opens it.
    let partial = dir.path().join("journal.log.salvage");
    std::fs::write(&partial, vec![7u8; 4096]).expect("partial");
    std::fs::write(dir.path().join("journal.log.salvage-moving"), b"").expect("mark");
    let journal = open_segmented(dir.path(), 512, false).expect("opens");
    assert!(!partial.exists() && !dir.path().join("journal.log.salvage-moving").exists());
    assert_eq!(journal.read_events(0, 1, 300).expect("read"), salvaged);
    journal.close();
}

#[tokio::test]
async fn damage_in_an_earlier_segment_refuses_and_salvage_keeps_the_later_segments_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let before = segmented(dir.path(), 512, 300).await;
    let segments = SegmentedBackend::list(dir.path()).expect("list");
    // A segment in the middle that starts with an event (a segment starts a commit; one
    // may start with an idle writer's empty batch marker instead).
    let at = segments::SEGMENT_HEADER_LEN as usize;
    let first_event = |s: &SegmentInfo| {
        let bytes = std::fs::read(&s.path).expect("read");
        match Record::decode(&bytes[at..]) {
            Ok((Record::Event(e), _)) => Some((bytes, e)),
            _ => None,
        }
    };
    let middle = segments.len() / 2;
    // `journal.log` (index 0) has no segment header.
    let mut nearest: Vec<usize> = (1..segments.len()).collect();
    nearest.sort_by_key(|i| i.abs_diff(middle));
    let (victim, (mut bytes, damaged)) = nearest
        .into_iter()
        .find_map(|i| first_event(&segments[i]).map(|found| (&segments[i], found)))
        .expect("a segment starting with an event record");
    bytes[at + record::HEADER_LEN + 4] ^= 0x01;
    std::fs::write(&victim.path, &bytes).expect("write");

    let err = open_segmented(dir.path(), 512, false)
        .err()
        .expect("refused");
    let damage = Damaged::of(&err).expect("a damage report");
    assert_eq!(damage.offset, victim.first, "the position, across segments");
    // The report names the segment file and the byte in it, not `journal.log`.
    let victim_path = victim.path.display().to_string();
    assert_eq!(
        damage.file,
        Some((victim_path.clone(), segments::SEGMENT_HEADER_LEN))
    );
    let said = err.to_string();
    assert!(
        said.contains(&format!(
            "{victim_path}: damaged record at byte 32 (journal position {})",
            victim.first
        )),
        "{said}"
    );
    assert_eq!(
        damage.devices,
        vec![Affected {
            device: "a".into(),
            lost: vec![(damaged.seq, damaged.seq)],
            set_aside: 0
        }]
    );

    let journal = open_segmented(dir.path(), 512, true).expect("salvage");
    let salvaged = journal.recovery().salvaged.clone().expect("salvaged");
    assert_eq!(salvaged.lost_seqs, 1);
    let after = journal.read_events(0, 1, 300).expect("read");
    for (a, b) in after.iter().zip(&before) {
        if a.seq == damaged.seq {
            assert!(a.lost, "{a:?}");
        } else {
            assert_eq!(a, b);
        }
    }
    // The later segments are kept aside with the original; the journal is one file again,
    // and rolls over from there.
    assert_eq!(SegmentedBackend::list(dir.path()).expect("list").len(), 1);
    let aside = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".seg.damaged-"))
        .count();
    assert_eq!(aside, segments.len() - 1);

    // A salvage killed after its new `journal.log` was in place but before the later
    // segments were moved aside: the open says what happened and what to do, not that a
    // segment is missing.
    journal.close();
    drop(journal);
    let moved = segments_set_aside(dir.path());
    for (_, aside, back) in &moved {
        std::fs::rename(aside, back).expect("back");
    }
    let err = open_segmented(dir.path(), 512, false)
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("--salvage was interrupted"),
        "{err}"
    );
    // `--salvage` finishes it: the segments go aside as the salvage would have moved them
    // (it refused too, with the same words, and only a hand could move them).
    let journal = open_segmented(dir.path(), 512, true).expect("the salvage finished");
    assert!(
        journal.recovery().salvaged.is_none(),
        "nothing left to salvage"
    );
    assert_eq!(SegmentedBackend::list(dir.path()).expect("list").len(), 1);
    let finished = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .contains(".seg.damaged-interrupted-")
        })
        .count();
    assert_eq!(finished, moved.len());
    let read = journal.read_events(0, 1, 300).expect("read");
    assert_eq!(read.len(), 300);
    journal.close();
    drop(journal);
    // A partial new journal a salvage killed earlier left is removed by a plain start.
    let partial = dir.path().join("journal.log.salvage");
    std::fs::write(&partial, vec![7u8; 4096]).expect("partial");
    let journal = open_segmented(dir.path(), 512, false).expect("opens");
    assert!(!partial.exists(), "left behind");
    let (r, e) = event(0, 301);
    journal.append(&r, e).await.expect("event 301");
    journal.close();
    drop(journal);
    let journal = open_segmented(dir.path(), 512, false).expect("opens cleanly");
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(301));
}

/// A damaged segment header (a byte flipped in its 32) refuses a normal open, and salvage
/// repairs it: the header only repeats the segment's position, which its file name gives,
/// so every record is kept. A review found salvage refusing it with the same error as a
/// plain open, leaving 32 damaged bytes no tool could get past.
#[tokio::test]
async fn a_damaged_segment_header_is_salvaged_with_every_record_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let before = segmented(dir.path(), 512, 300).await;
    let segments = SegmentedBackend::list(dir.path()).expect("list");
    let victim = &segments[segments.len() / 2];
    let mut bytes = std::fs::read(&victim.path).expect("read");
    bytes[20] ^= 0x01;
    std::fs::write(&victim.path, &bytes).expect("write");

    let err = open_segmented(dir.path(), 512, false)
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains(&victim.path.display().to_string()),
        "{err}"
    );

    let journal = open_segmented(dir.path(), 512, true).expect("salvaged");
    let salvaged = journal.recovery().salvaged.clone().expect("a salvage ran");
    assert_eq!(salvaged.lost_seqs, 0);
    // Reported where the damaged header is, not at the end of the journal, where the scan
    // of the records (all intact) ended (a review read a salvage report that named the end,
    // and the files set aside under it).
    assert_eq!(salvaged.damage.offset, victim.first, "{salvaged:?}");
    assert!(
        salvaged
            .original
            .to_string_lossy()
            .ends_with(&format!("damaged-{}", victim.first)),
        "{salvaged:?}"
    );
    assert_eq!(journal.read_events(0, 1, 300).expect("read"), before);
    journal.close();
    drop(journal);
    let journal = open_segmented(dir.path(), 512, false).expect("opens as it is");
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(300));
}

/// A segment cut down to its header or less (a bad copy, a damaged disk), or a `journal.log`
/// cut to nothing, is refused as a segment cut short, and salvage reads past it, its seqs
/// marked lost. Before, listing the segments inserted such a file after itself for ever:
/// every reader of the journal (serve, salvage, backup, export, replay) spun, silent.
#[tokio::test]
async fn a_segment_cut_to_its_header_is_refused_not_spun_on() {
    for (victim, cut) in [(1usize, 32u64), (1, 10), (0, 0)] {
        let dir = tempfile::tempdir().expect("tempdir");
        segmented(dir.path(), 512, 300).await;
        let segments = SegmentedBackend::list(dir.path()).expect("list");
        let path = segments[segments.len() / 2 * victim].path.clone();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(cut))
            .expect("cut");
        // On a thread of its own with a deadline: a regression fails, it does not hang.
        let (tx, rx) = std::sync::mpsc::channel();
        let at = dir.path().to_path_buf();
        std::thread::spawn(move || {
            let listed = SegmentedBackend::list(&at).map(|l| l.len());
            let plain = open_segmented(&at, 512, false).map(drop);
            let _ = tx.send((listed, plain));
        });
        let (listed, plain) = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the journal is read, not spun on");
        assert_eq!(
            listed.expect("listed"),
            segments.len(),
            "{}",
            path.display()
        );
        let err = plain.expect_err("refused");
        assert!(
            err.to_string().contains("cut short") || err.to_string().contains("begins at position"),
            "{}: {err}",
            path.display()
        );
    }
}

/// A segment missing from the middle refuses a normal open, and salvage marks the seqs it
/// held lost and keeps every other record (it refused, as a plain open does).
#[tokio::test]
async fn a_missing_segment_is_salvaged_as_lost_seqs_and_the_rest_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let before = segmented(dir.path(), 512, 300).await;
    let segments = SegmentedBackend::list(dir.path()).expect("list");
    let victim = &segments[segments.len() / 2];
    std::fs::remove_file(&victim.path).expect("remove");

    let err = open_segmented(dir.path(), 512, false)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("a segment is missing"), "{err}");

    let journal = open_segmented(dir.path(), 512, true).expect("salvaged");
    let salvaged = journal.recovery().salvaged.clone().expect("a salvage ran");
    assert!(salvaged.lost_seqs > 0, "{salvaged:?}");
    let after = journal.read_events(0, 1, 300).expect("read");
    assert_eq!(after.len(), before.len());
    let lost = after.iter().filter(|a| a.lost).count() as u64;
    assert_eq!(lost, salvaged.lost_seqs);
    // The lost seqs are the missing segment's, in one run; the rest are as written.
    let first_lost = after.iter().position(|a| a.lost).expect("some lost");
    assert!(
        after[first_lost..first_lost + lost as usize]
            .iter()
            .all(|a| a.lost)
    );
    for (a, b) in after.iter().zip(&before) {
        if !a.lost {
            assert_eq!(a, b);
        }
    }
    journal.close();
    drop(journal);
    let journal = open_segmented(dir.path(), 512, false).expect("opens as it is");
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(300));
}

fn snapshot(device: u32, seq: u64) -> (Record, IndexEffect) {
    (
        Record::Snapshot {
            device,
            seq,
            version: 0,
            data: format!("state at {seq}").into_bytes(),
        },
        IndexEffect::Snapshot {
            device,
            seq,
            version: 0,
        },
    )
}

/// [`retaining`]'s small segments and frequent index checkpoints, with every record kept.
fn keep_all_checkpointing() -> JournalOptions {
    JournalOptions {
        segment_bytes: 2048,
        index_spill_at: 64,
        index_checkpoint_every: 8192,
        scrub_rate: 0,
        ..JournalOptions::default()
    }
}

fn retaining(dir: &Path, keep_events: u64) -> std::io::Result<Journal> {
    retaining_for(dir, keep_events, Duration::ZERO)
}

fn retaining_for(dir: &Path, keep_events: u64, keep_for: Duration) -> std::io::Result<Journal> {
    let options = JournalOptions {
        segment_bytes: 2048,
        index_spill_at: 64,
        index_checkpoint_every: 8192,
        scrub_rate: 0,
        retention: Retention {
            policy: RetentionPolicy::AfterSnapshot,
            keep_events,
            keep_for,
        },
        ..JournalOptions::default()
    };
    Journal::open(dir, &options)
}

/// Devices `a` (snapshot every 50 events) and `b` (none), `events` events each.
async fn snapshotting_fleet(journal: &Journal, events: u64) {
    let (r, e) = version_record(0);
    journal.append(&r, e).await.expect("version");
    for (num, id) in [(0, "a"), (1, "b")] {
        let (r, e) = device_record(num, id);
        journal.append(&r, e).await.expect("device");
    }
    for seq in 1..=events {
        for num in [0, 1] {
            let (r, e) = event(num, seq);
            journal.append(&r, e).await.expect("event");
        }
        if seq % 50 == 0 {
            let (r, e) = snapshot(0, seq);
            journal.append(&r, e).await.expect("snapshot");
        }
    }
    index_settled(journal).await;
}

#[tokio::test]
async fn retention_keeps_what_a_device_without_a_later_snapshot_needs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = retaining(dir.path(), 0).expect("open");
    snapshotting_fleet(&journal, 400).await;
    let pass = journal.retain_now().expect("pass");
    // `b` never took a snapshot: its first event holds everything.
    assert_eq!(pass.deleted_segments, 0, "{pass:?}");
    let pin = pass.pinned_by.expect("pinned");
    assert_eq!(
        (pin.device.as_deref(), pin.reason),
        (Some("b"), "no-snapshot")
    );
    assert_eq!(journal.retained_from(), 0);
    assert_eq!(journal.read_events(1, 1, 400).expect("b").len(), 400);
    assert_eq!(journal.retention().pinned_by, Some(pin));
}

// Two workers: the last part runs a writer while a read-only open blocks this thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_segments_behind_every_snapshot_and_reads_say_what_is_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = retaining(dir.path(), 10).expect("open");
    a_alone_past_the_checkpoints_identity_bytes(&journal).await;
    // The pass after each index checkpoint deleted segments already; one more finds the
    // same mark. `a` needs only its last ten events: what holds the rest is the index
    // checkpoint, whose last 64 KiB an open reads back (the next checkpoint moves it).
    let pass = journal.retain_now().expect("pass");
    let status = journal.retention();
    assert!(status.deleted_segments > 0, "{status:?}");
    assert!(
        !dir.path().join(FILE_NAME).exists(),
        "the first segment went"
    );
    assert_eq!(
        SegmentedBackend::list(dir.path()).expect("list").len(),
        status.segments
    );
    let pin = pass.pinned_by.clone().expect("pinned");
    assert_eq!(
        (pin.device.as_deref(), pin.reason),
        (None, "index-checkpoint"),
        "{pass:?}"
    );
    let checkpoint_at = journal.index().checkpoint_at;
    assert_eq!(pin.position, checkpoint_at - (64 << 10), "{pass:?}");
    let from = journal.retained_from();
    assert!(from > 0 && from <= pin.position, "{pass:?}");
    // Deleted up to the segment holding that position.
    let segments = SegmentedBackend::list(dir.path()).expect("list");
    assert_eq!(segments[0].first, from);
    assert!(
        segments.get(1).is_none_or(|s| s.first > pin.position),
        "{pass:?}"
    );
    assert_eq!(from, pass.retained_from);
    a_reads_say_what_is_gone(journal, dir.path(), from).await;
}

/// `--retention-keep-hours`: a segment written within the window stays whatever it holds,
/// and `pinned_by` says so.
#[tokio::test]
async fn retention_keeps_recent_segments_and_names_that_as_what_holds_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = retaining_for(dir.path(), 10, Duration::from_secs(3600)).expect("open");
    a_alone_past_the_checkpoints_identity_bytes(&journal).await;
    let pass = journal.retain_now().expect("pass");
    assert_eq!(pass.deleted_segments, 0, "{pass:?}");
    assert_eq!(journal.retention().deleted_segments, 0);
    let pin = pass.pinned_by.expect("pinned");
    assert_eq!(
        (pin.device, pin.reason, pin.position),
        (None, "keep-hours", 0)
    );
    assert_eq!(journal.read_events(0, 1, 1).expect("kept").len(), 1);
}

/// The fleet of [`snapshotting_fleet`], then `b` removed and `a` written on (a snapshot
/// every 50 events) past the index checkpoint's identity bytes (64 KiB).
async fn a_alone_past_the_checkpoints_identity_bytes(journal: &Journal) {
    snapshotting_fleet(journal, 400).await;
    // `b` goes: only `a`, with its snapshots, is left to hold segments.
    let (r, e) = (
        Record::Removed {
            device: 1,
            at_ms: 5,
        },
        IndexEffect::Removed {
            device: 1,
            cancelled: None,
        },
    );
    journal.append(&r, e).await.expect("remove b");
    // Eight at a time: commits (and so segments, which end at a commit) stay small, so
    // `a`'s bound at its end and the checkpoint's 64 KiB before it never share a segment.
    a_writes(journal, 401..=3000, 8).await;
}

/// Device `a`'s events `seqs`, `at_once` in flight, with a snapshot every 50; then waits until
/// they are durable and the index's thread is idle.
async fn a_writes(journal: &Journal, seqs: std::ops::RangeInclusive<u64>, at_once: usize) {
    let writer = journal.device_writer(0, at_once);
    let last = *seqs.end();
    let mut acks = Vec::new();
    for seq in seqs {
        acks.push(append_event(&writer, seq));
        if seq % 50 == 0 {
            writer
                .append_snapshot(seq, 0, format!("state at {seq}").into_bytes())
                .expect("snapshot");
        }
        if seq % at_once as u64 == 0 || seq == last {
            for ack in acks.drain(..) {
                ack.await.expect("answered").expect("durable");
            }
        }
    }
    journal.barrier().await.expect("snapshots durable");
    index_settled(journal).await;
}

/// What `a_alone_past_the_checkpoints_identity_bytes` left, after retention deleted the
/// segments before `from`.
async fn a_reads_say_what_is_gone(journal: Journal, dir: &Path, from: u64) {
    // What `a` needs is there: its latest snapshot, 10 events before it, everything after.
    let latest = journal.snapshot_at(0, 3000, 0).expect("latest snapshot");
    assert_eq!(latest.seq, 3000);
    assert!(journal.read_snapshot(latest).is_ok());
    let oldest = journal.oldest_retained_seq(0);
    assert!(oldest <= 2991, "keep_events: {oldest}");
    assert!(oldest > 1);
    let kept = journal.read_events(0, oldest, 3000).expect("kept");
    assert_eq!(kept.first().map(|e| e.seq), Some(oldest));
    assert_eq!(kept.len() as u64, 3000 - oldest + 1);
    // What went answers with the oldest seq kept.
    assert_eq!(
        journal.read_events(0, 1, 3000),
        Err(JournalError::RetainedAway { oldest })
    );
    assert!(journal.snapshots(0).iter().all(|s| s.offset >= from));
    assert_eq!(journal.snapshot_at(0, 100, 0), None, "retained away");
    journal.close();
    drop(journal);

    // A restart opens from the index checkpoint, and goes on.
    let journal = retaining(dir, 10).expect("reopen");
    assert_eq!(journal.retained_from(), from);
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(3000));
    assert_eq!(journal.read_events(0, oldest, 3000).expect("kept"), kept);
    let (r, e) = event(0, 3001);
    journal.append(&r, e).await.expect("event 3001");
    journal.close();
    drop(journal);
    let reader = Journal::open_read_only(dir).expect("read-only");
    assert_eq!(reader.index().device("a").map(DeviceInfo::seq), Some(3001));
    drop(reader);

    // Without its index checkpoint it cannot open, and says why.
    let index = dir.join("journal.log.index");
    std::fs::rename(index.join("checkpoint"), dir.join("kept")).expect("move");
    let err = retaining(dir, 10).err().expect("refused");
    assert!(
        err.to_string().contains("deleted by its retention policy")
            && err
                .to_string()
                .contains("which is not usable: there is none"),
        "{err}"
    );
    std::fs::rename(dir.join("kept"), index.join("checkpoint")).expect("back");
    let journal = retaining(dir, 10).expect("opens again");
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(3001));
    journal.close();
    drop(journal);

    // Its last segment cut short: refused, saying so rather than pointing at a log.
    let last = SegmentedBackend::list(dir)
        .expect("list")
        .pop()
        .expect("last");
    let whole = std::fs::read(&last.path).expect("read");
    std::fs::write(&last.path, &whole[..whole.len() - 40]).expect("cut");
    let err = retaining(dir, 10).err().expect("refused");
    assert!(
        err.to_string().contains(
            "its last segment was cut short or damaged, or segment files after it are missing"
        ),
        "{err}"
    );
    std::fs::write(&last.path, &whole).expect("restored");

    // A flipped bit in the bytes that tie the index checkpoint to the journal (its last
    // 64 KiB): the only way to open it is gone, and the refusal says where to look (it used
    // to name no file and no position).
    let at = Journal::open_read_only(dir)
        .expect("read-only")
        .recovery()
        .from_checkpoint
        .expect("from its checkpoint");
    let spoilt = at - 100;
    let holder = SegmentedBackend::list(dir)
        .expect("list")
        .into_iter()
        .rfind(|s| s.first <= spoilt)
        .expect("a segment holds it");
    let byte = spoilt - holder.first + segments::SEGMENT_HEADER_LEN;
    let whole = std::fs::read(&holder.path).expect("read");
    let mut bytes = whole.clone();
    bytes[byte as usize] ^= 0x10;
    std::fs::write(&holder.path, &bytes).expect("spoil");
    let err = retaining(dir, 10).err().expect("refused");
    let said = err.to_string();
    // The range named ends at the checkpoint's position, in whichever segment holds it.
    let last_byte = SegmentedBackend::list(dir)
        .expect("list")
        .into_iter()
        .rfind(|s| s.first < at)
        .expect("a segment holds it");
    assert!(
        said.contains("media damage there")
            && said.contains(&format!(
                "to {} byte {})",
                last_byte.path.display(),
                at - 1 - last_byte.first + segments::SEGMENT_HEADER_LEN
            )),
        "{said}"
    );
    std::fs::write(&holder.path, &whole).expect("restored");

    // A damaged segment header: salvage cannot repair a journal retention shortened (it
    // reads from the first record), so the refusal points to a backup, not to `--salvage`
    // (which then refused).
    let first = SegmentedBackend::list(dir)
        .expect("list")
        .into_iter()
        .next()
        .expect("a first segment");
    let whole = std::fs::read(&first.path).expect("read");
    let mut bytes = whole.clone();
    bytes[3] ^= 0x01;
    std::fs::write(&first.path, &bytes).expect("spoil");
    let said = retaining(dir, 10).err().expect("refused").to_string();
    assert!(
        said.contains("restore the data directory from a backup") && !said.contains("keeps every"),
        "{said}"
    );
    std::fs::write(&first.path, &whole).expect("restored");

    // Beside a live writer that moves on between a reader's listing of the segments and its
    // reading them (had the reader read the index checkpoint it must open from after the
    // listing, it would have found the journal cut short of it): the reader opens the
    // journal as listed, and the next open sees the rest.
    let writer = retaining(dir, 10).expect("the live writer");
    let (reader, attempts) = open_read_only_while(dir, &writer, 3002..=3400);
    let reader = reader.expect("opened, not refused");
    assert_eq!(attempts, 1);
    let seen = reader.index().device("a").map(DeviceInfo::seq).expect("a");
    assert!((3001..=3400).contains(&seen), "{seen}");
    drop((reader, writer));
    let reader = Journal::open_read_only(dir).expect("read-only");
    assert_eq!(reader.index().device("a").map(DeviceInfo::seq), Some(3400));
    drop(reader);

    // Salvage reads from position 0, which is gone: refused, nothing touched.
    let before = SegmentedBackend::list(dir).expect("list");
    let err = open_with(dir, true).err().expect("salvage refused");
    assert_eq!(err.kind(), std::io::ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("retention"), "{err}");
    assert_eq!(SegmentedBackend::list(dir).expect("list"), before);
}

#[tokio::test]
async fn retention_keeps_the_record_of_a_pending_timer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = retaining(dir.path(), 0).expect("open");
    let (r, e) = version_record(0);
    journal.append(&r, e).await.expect("version");
    let (r, e) = device_record(0, "a");
    journal.append(&r, e).await.expect("device");
    // Event 1 sets a timer due in a year; the snapshots after it do not free its record.
    first_event_with(
        &journal,
        Effect::SetTimer {
            key: "yearly".into(),
            due_ms: 365 * 86_400_000,
            every_ms: None,
            event: r#"{"type":"report"}"#.into(),
        },
    )
    .await;
    let set = journal.index().offset_of(0, 1).expect("offset");
    let writer = journal.device_writer(0, 4096);
    let mut acks = Vec::new();
    for seq in 2..=3000 {
        acks.push(append_event(&writer, seq));
        if seq % 50 == 0 {
            writer
                .append_snapshot(seq, 0, b"s".to_vec())
                .expect("snapshot");
        }
    }
    for ack in acks {
        ack.await.expect("answered").expect("durable");
    }
    journal.barrier().await.expect("durable");
    index_settled(&journal).await;
    let pass = journal.retain_now().expect("pass");
    let pin = pass.pinned_by.expect("pinned");
    assert_eq!((pin.reason, pin.position), ("pending-effects", set));
    assert!(journal.retained_from() <= set);
    assert!(journal.record_fx(0, 1).expect("readable").is_some());
}

/// Appends device 0's event 1 (an external event at 1001 ms) with `effect`.
async fn first_event_with(journal: &Journal, effect: Effect) {
    let fx = Fx {
        origin: Origin::External,
        effects: vec![effect],
    };
    let record = Record::Event(EventRecord {
        device: 0,
        seq: 1,
        at_ms: 1001,
        version: 0,
        event: b"{}".to_vec(),
        transitions: vec![],
        lost: false,
        fx: Some(fx.clone()),
    });
    let effect = IndexEffect::Event {
        device: 0,
        seq: 1,
        fx: Some(Box::new((1001, fx))),
    };
    journal.append(&record, effect).await.expect("event 1");
}

/// A command pins the record that issued it while it waits for its acknowledgement, and
/// no longer once past its time to live, even if nobody read the outbox (which is what
/// drops it from the index): such a command held every later segment for good.
#[tokio::test]
async fn retention_lets_go_of_a_command_past_its_time_to_live() {
    for (ttl_ms, pinned) in [(None, true), (Some(500), false)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = retaining(dir.path(), 0).expect("open");
        let (r, e) = version_record(0);
        journal.append(&r, e).await.expect("version");
        let (r, e) = device_record(0, "a");
        journal.append(&r, e).await.expect("device");
        first_event_with(
            &journal,
            Effect::Command {
                payload: r#"{"type":"ping"}"#.into(),
                ttl_ms,
            },
        )
        .await;
        let issued = journal.index().offset_of(0, 1).expect("offset");
        events_with_snapshots(&journal, 0, 2, 3000, 50).await;
        index_settled(&journal).await;
        let pass = journal.retain_now().expect("pass");
        let pin = pass.pinned_by.expect("pinned");
        assert_eq!(
            pin.reason == "pending-effects",
            pinned,
            "ttl {ttl_ms:?}: {pin:?}"
        );
        assert_eq!(journal.retained_from() <= issued, pinned, "ttl {ttl_ms:?}");
        // The outbox was never read: the expired command is still in the index.
        assert_eq!(journal.outbox_len(0), 1, "ttl {ttl_ms:?}");
    }
}

/// Events `from..=to` of device `num` and a snapshot every `every` (0: none), pipelined 100
/// at a time (so they take many commits, and segments roll over between them).
async fn events_with_snapshots(journal: &Journal, num: u32, from: u64, to: u64, every: u64) {
    let writer = journal.device_writer(num, 4096);
    let mut acks = Vec::new();
    for seq in from..=to {
        acks.push(append_event(&writer, seq));
        if every > 0 && seq % every == 0 {
            writer
                .append_snapshot(seq, 0, format!("state at {seq}").into_bytes())
                .expect("snapshot");
        }
        if seq % 100 == 0 || seq == to {
            for ack in acks.drain(..) {
                ack.await.expect("answered").expect("durable");
            }
        }
    }
    journal.barrier().await.expect("durable");
    index_settled(journal).await;
}

#[tokio::test]
async fn a_read_of_what_a_retention_pass_just_deleted_answers_retained_away_and_keeps_the_checkpoint()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = JournalOptions {
        segment_bytes: 2048,
        index_spill_at: 64,
        index_checkpoint_every: 8192,
        scrub_rate: 0,
        ..JournalOptions::default()
    };
    // Keep everything while writing, so the old snapshot is still there when it is looked
    // up; then a journal that retains.
    let journal = Journal::open(dir.path(), &options).expect("open");
    let (r, e) = version_record(0);
    journal.append(&r, e).await.expect("version");
    let (r, e) = device_record(0, "a");
    journal.append(&r, e).await.expect("device");
    events_with_snapshots(&journal, 0, 1, 3000, 50).await;
    // The index keeps the last 8 snapshots (2650 to 3000); 2000 events after them push the
    // index checkpoint far enough on that a pass deletes the segments of the older ones.
    events_with_snapshots(&journal, 0, 3001, 5000, 0).await;
    journal.close();
    drop(journal);
    let journal = retaining(dir.path(), 0).expect("reopen retaining");
    let oldest = journal.snapshots(0)[0];
    let pass = journal.retain_now().expect("pass");
    assert!(pass.deleted_segments > 0, "{pass:?}");
    assert!(oldest.offset < journal.retained_from());
    assert_eq!(
        journal.read_snapshot(oldest),
        Err(JournalError::RetainedAway {
            oldest: oldest.seq + 1
        })
    );
    journal.close();
    drop(journal);
    let journal = retaining(dir.path(), 0).expect("still opens from its checkpoint");
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(5000));

    // A record that will not read back in a journal retention shortened: its checkpoint is
    // kept (the journal opens only from it), so the answer does not promise that the next
    // start checks the whole journal (it did, and the restart served the same error).
    let newest = *journal.snapshots(0).last().expect("a snapshot");
    assert!(newest.offset >= journal.retained_from());
    let holder = SegmentedBackend::list(dir.path())
        .expect("list")
        .into_iter()
        .rfind(|s| s.first <= newest.offset)
        .expect("a segment holds it");
    let byte = newest.offset + 12 - holder.first + segments::SEGMENT_HEADER_LEN;
    let mut bytes = std::fs::read(&holder.path).expect("read");
    bytes[byte as usize] ^= 0x10;
    std::fs::write(&holder.path, &bytes).expect("spoil");
    match journal.read_snapshot(newest) {
        Err(JournalError::Read { reason, .. }) => assert!(
            reason.contains("restore the data directory from a backup")
                && !reason.contains("the next start checks"),
            "{reason}"
        ),
        other => panic!("read back: {other:?}"),
    }
}

#[tokio::test]
async fn retention_raises_an_older_journal_to_the_current_format_before_deleting_its_header() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(FILE_NAME), legacy_file(3, 3)).expect("write");
    let journal = retaining(dir.path(), 0).expect("open");
    events_with_snapshots(&journal, 0, 4, 3000, 50).await;
    journal.retain_now().expect("pass");
    // Format raised; the deletion waited for a checkpoint taken at it.
    events_with_snapshots(&journal, 0, 3001, 6000, 50).await;
    journal.retain_now().expect("pass");
    assert!(journal.retained_from() > 0, "segments deleted");
    assert!(!dir.path().join(FILE_NAME).exists());
    journal
        .require_format(FORMAT_VERSION)
        .expect("already current");
    journal.close();
    drop(journal);
    let journal = retaining(dir.path(), 0).expect("reopens");
    assert_eq!(journal.recovery().format, FORMAT_VERSION);
    assert_eq!(journal.index().device("a").map(DeviceInfo::seq), Some(6000));
}

/// Dead letters are listed in the order of the device's history (`after_seq`), whatever the
/// order their records were written in (a message found undeliverable after a later one).
#[tokio::test]
async fn dead_letters_are_listed_in_the_order_of_the_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = seeded(dir.path(), 6).await;
    let writer = journal.device_writer(0, 8);
    for after_seq in [5, 3, 6] {
        writer.append_dead_letter(DeadLetter {
            device: 0,
            after_seq,
            at_ms: 5,
            version: 0,
            event: b"{}".to_vec(),
            code: "undeliverable".into(),
            message: format!("sent at {after_seq}"),
        });
    }
    journal.barrier().await.expect("durable");
    let listed: Vec<u64> = journal
        .dead_letters(0)
        .expect("dead letters")
        .iter()
        .map(|d| d.after_seq)
        .collect();
    assert_eq!(listed, [3, 5, 6]);
}

/// A page of ids is the same as slicing the sorted list of every id, wherever it starts and
/// however long it is, and paging through with `next` visits each id once, in order.
#[tokio::test]
async fn a_page_of_device_ids_is_a_slice_of_the_sorted_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open_dir(dir.path()).expect("open");
    provision(&journal, 500).await;
    let all = journal.device_ids();
    assert_eq!(all.len(), 500);
    for after in [
        None,
        Some(""),
        Some("d1"),
        Some("d250"),
        Some("d3x"),
        Some("d499"),
        Some("z"),
    ] {
        for limit in [0, 1, 7, 100, 499, 500, 10_000] {
            let start = after.map_or(0, |a| all.partition_point(|id| &**id <= a));
            let want: Vec<Arc<str>> = all[start..].iter().take(limit).cloned().collect();
            let (page, more) = journal.device_ids_page(after, limit);
            assert_eq!(page, want, "after {after:?}, limit {limit}");
            assert_eq!(
                more,
                all.len() - start > limit,
                "after {after:?}, limit {limit}"
            );
        }
    }
    let (mut seen, mut after) = (Vec::new(), None::<Arc<str>>);
    loop {
        let (page, more) = journal.device_ids_page(after.as_deref(), 33);
        seen.extend(page.iter().cloned());
        if !more {
            break;
        }
        after = page.last().cloned();
    }
    assert_eq!(seen, all);
}

/// A closed journal in `dir` whose first segments one retention pass deleted; where it now
/// begins.
async fn retained_once(dir: &Path) -> u64 {
    let journal = retaining(dir, 10).expect("open");
    a_alone_past_the_checkpoints_identity_bytes(&journal).await;
    journal.retain_now().expect("pass");
    let from = journal.retained_from();
    assert!(from > 0, "retention deleted segments");
    journal.close();
    from
}

/// A journal whose first segments are gone though retention did not delete them (deleted by
/// hand, lost in a copy) refuses to open, naming the missing positions: under `keep-all`,
/// whose index checkpoint used to open what was left as if retention had deleted the rest
/// (every record in the lost files then read as "retained away"), and after retention
/// alike. What retention deleted opens as before.
#[tokio::test]
async fn first_segments_lost_to_anything_but_retention_refuse_to_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keep_all = keep_all_checkpointing();
    let journal = Journal::open(dir.path(), &keep_all).expect("open");
    // Long enough that the index checkpoint's own checks lie past the first segment.
    snapshotting_fleet(&journal, 3000).await;
    assert!(journal.index().checkpoint_at > 0, "an index checkpoint");
    journal.close();
    drop(journal);
    assert_eq!(segments::retained_floor(dir.path()).expect("read"), Some(0));
    std::fs::remove_file(dir.path().join(FILE_NAME)).expect("remove");
    let missing = |opened: std::io::Result<Journal>| {
        let Err(e) = opened else {
            panic!("opened without its first segments");
        };
        let said = e.to_string();
        assert!(
            said.contains("begins at position") && said.contains("are missing"),
            "{said}"
        );
    };
    missing(Journal::open(dir.path(), &keep_all));
    missing(Journal::open_read_only(dir.path()));

    let dir = tempfile::tempdir().expect("tempdir");
    let from = retained_once(dir.path()).await;
    assert_eq!(
        segments::retained_floor(dir.path()).expect("read"),
        Some(from)
    );
    let journal = retaining(dir.path(), 10).expect("what retention deleted opens");
    journal.close();
    drop(journal);
    let first = SegmentedBackend::list(dir.path()).expect("list")[0]
        .path
        .clone();
    std::fs::remove_file(first).expect("remove");
    missing(retaining(dir.path(), 10));

    // The first segment lost with the record of where the journal may begin: refused alike,
    // under `keep-all` too, saying how to go on if retention did delete them (it recorded
    // where the journal then began and opened, every lost record read as retained away).
    let dir = tempfile::tempdir().expect("tempdir");
    let from = retained_once(dir.path()).await;
    std::fs::remove_file(dir.path().join("journal.retained")).expect("remove");
    for opened in [
        retaining(dir.path(), 10),
        Journal::open(dir.path(), &keep_all),
    ] {
        let Err(e) = opened else {
            panic!("opened without the record of where it begins");
        };
        let said = e.to_string();
        assert!(
            said.contains(&format!("begins at position {from}"))
                && said.contains(
                    "journal.retained, which records where retention let it begin, is missing"
                )
                && said.contains(&format!("write {from} into")),
            "{said}"
        );
    }
    assert!(
        !dir.path().join("journal.retained").exists(),
        "nothing recorded"
    );
    // Written back as the message says, it opens as retention left it.
    std::fs::write(dir.path().join("journal.retained"), format!("{from}\n")).expect("write");
    let journal = retaining(dir.path(), 10).expect("opens");
    assert_eq!(journal.retained_from(), from);
    journal.close();
}

/// A listing that missed a segment (a directory walked while a writer created files: one
/// created behind the walk is not seen, the next one is) gets it back by name, so a
/// read-only open beside a live server does not take it for a missing segment; only a file
/// that truly is not there stays missing.
#[tokio::test]
async fn a_segment_a_listing_missed_is_found_by_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    segmented(dir.path(), 512, 300).await;
    let all = SegmentedBackend::list(dir.path()).expect("list");
    assert!(all.len() > 4, "{} segments", all.len());
    let key = |l: &[segments::SegmentInfo]| -> Vec<(u64, u64)> {
        l.iter().map(|s| (s.first, s.len)).collect()
    };
    let mut missed: Vec<_> = SegmentedBackend::list(dir.path()).expect("list");
    missed.remove(2);
    missed.remove(2);
    segments::fill_gaps(dir.path(), &mut missed).expect("fill");
    assert_eq!(key(&missed), key(&all));
    // One really gone stays gone (the open reports it).
    std::fs::remove_file(&all[2].path).expect("remove");
    let listed = SegmentedBackend::list(dir.path()).expect("list");
    assert_eq!(listed.len(), all.len() - 1);
    assert!(listed.iter().all(|s| s.first != all[2].first));
}

/// Damage in a journal retention shortened: salvage reads from the first record, which is
/// gone, so the report advises a backup (it advised `--salvage`, which then refused).
#[test]
fn damage_in_a_journal_retention_shortened_advises_a_backup_not_salvage() {
    let damage = Damaged {
        path: "journal.log".into(),
        offset: 5000,
        file: None,
        reason: "checksum mismatch".into(),
        ranges: vec![(5000, 5010)],
        intact_after: 0,
        devices: Vec::new(),
        rebuilt: Vec::new(),
        unrecognized: 0,
        unreadable: Vec::new(),
        retained_from: 4096,
    };
    let said = damage.to_string();
    assert!(
        said.contains("restore the data directory from a backup")
            && said.contains("before position 4096")
            && !said.contains("keeps every"),
        "{said}"
    );
    let said = Damaged {
        retained_from: 0,
        ..damage
    }
    .to_string();
    assert!(
        said.contains("`drover serve --salvage` keeps every"),
        "{said}"
    );
}

/// Bytes of the index's run files beside the journal in `dir`.
fn run_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("journal.log.index"))
        .expect("runs' directory")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("run-"))
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum()
}

/// Retention deletes the index's runs with the segments they point into: after a long
/// history the run files hold about what the journal keeps, not 8 bytes of every event ever
/// written. Reads of what went still answer `RetainedAway` with the oldest seq kept, also
/// after a restart (which opens from a checkpoint whose runs start past seq 1) and from a
/// read-only open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_the_index_runs_that_point_only_into_deleted_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = retaining(dir.path(), 10).expect("open");
    a_alone_past_the_checkpoints_identity_bytes(&journal).await;
    let last = 20_000;
    a_writes(&journal, 3001..=last, 64).await;
    journal.retain_now().expect("pass");
    let writer = journal.device_writer(0, 64);
    // The spiller drops runs after each of its passes; one more spill's worth wakes it.
    for seq in last + 1..=last + 200 {
        append_event(&writer, seq)
            .await
            .expect("answered")
            .expect("durable");
    }
    let last = last + 200;
    index_settled(&journal).await;
    // The index checkpoint those writes made starts a pass of its own; one asked for now
    // comes after it, so nothing moves under the reads below (a CI run saw a restart begin
    // 192 events later than the journal had said before it).
    journal.retain_now().expect("pass");

    let oldest = journal.oldest_retained_seq(0);
    assert!(
        oldest > 3000,
        "retention went past the first events: {oldest}"
    );
    // 20,600 events were written (400 of a device since removed). The runs hold what the
    // journal keeps, and what it kept when they were written or last merged whole (retention
    // moves on after each index checkpoint): a small multiple, far from all of them.
    let usage = journal.index_usage();
    let kept = last - oldest + 1;
    let bound = 4 * kept + 4 * 64;
    assert!(
        usage.spilled_offsets <= bound,
        "{usage:?}, {kept} events kept"
    );
    // Files only the checkpoint on disk still names stay until the next one.
    assert!(
        run_bytes(dir.path()) <= 2 * 8 * bound,
        "{} bytes of runs on disk, {kept} events kept",
        run_bytes(dir.path())
    );
    let expect_gone = Err(JournalError::RetainedAway { oldest });
    assert_eq!(journal.read_events(0, 1, last), expect_gone);
    assert_eq!(journal.read_events(0, oldest - 1, oldest), expect_gone);
    let events = journal.read_events(0, oldest, last).expect("kept");
    assert_eq!(events.len() as u64, kept);
    assert!(events.iter().zip(oldest..).all(|(e, seq)| e.seq == seq));
    journal.close();
    drop(journal);

    // A restart opens from the index checkpoint, whose runs hold `a` from past seq 1.
    let journal = retaining(dir.path(), 10).expect("reopen");
    assert_eq!(journal.oldest_retained_seq(0), oldest);
    assert_eq!(journal.read_events(0, 1, last), expect_gone);
    assert_eq!(journal.read_events(0, oldest, last).expect("kept"), events);
    journal.close();
    drop(journal);
    let reader = Journal::open_read_only(dir.path()).expect("read-only");
    assert_eq!(reader.oldest_retained_seq(0), oldest);
    assert_eq!(reader.read_events(0, oldest, last).expect("kept"), events);
}

/// A retention pass asked for after the journal closed deletes nothing, and one under way
/// when it closes finishes first: a server logged segments deleted after it said it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_pass_asked_for_after_close_deletes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = retaining(dir.path(), 0).expect("open");
    // `a` snapshots as it goes; `b` never does, so the passes after each index checkpoint
    // delete nothing.
    snapshotting_fleet(&journal, 1500).await;
    assert_eq!(journal.retention().deleted_segments, 0);
    // `b`'s first snapshot frees every segment but the last ones: the next pass may go.
    let (r, e) = snapshot(1, 1500);
    journal.append(&r, e).await.expect("snapshot of b");
    let segments = SegmentedBackend::list(dir.path()).expect("list").len();
    journal.close();
    let pass = journal.retain_now().expect("pass");
    assert_eq!(pass.deleted_segments, 0, "{pass:?}");
    assert_eq!(
        SegmentedBackend::list(dir.path()).expect("list").len(),
        segments
    );
    drop(journal);
    // What it held back goes at the next start's pass.
    let journal = retaining(dir.path(), 0).expect("reopen");
    let pass = journal.retain_now().expect("pass");
    assert!(pass.deleted_segments > 0, "{pass:?}");
}

/// Runs go with what retention deletes also when nothing more is written: after a restart
/// with a lower `keep_events`, the pass at start deletes most of the journal, and the runs
/// loaded from the index checkpoint (which know only the checkpoint's position as a bound on
/// their offsets) are read for their largest offsets and dropped (found by a verification
/// run: 15.9 MB of runs stayed beside a 680 KB journal until 8 MB more were written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_dropped_after_a_restart_that_lowers_keep_events_without_new_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = retaining(dir.path(), 100_000).expect("open");
    a_alone_past_the_checkpoints_identity_bytes(&journal).await;
    let last = 12_000;
    a_writes(&journal, 3001..=last, 64).await;
    assert_eq!(
        journal.retention().deleted_segments,
        0,
        "keeps 100,000 events"
    );
    let spilled = journal.index_usage().spilled_offsets;
    assert!(spilled > 10_000, "{spilled} offsets spilled");
    journal.close();
    drop(journal);

    for round in 0..2 {
        let journal = retaining(dir.path(), 10).expect("reopen");
        journal.retain_now().expect("pass");
        let oldest = journal.oldest_retained_seq(0);
        assert!(oldest > 10_000, "round {round}: oldest {oldest}");
        let kept = last - oldest + 1;
        let usage = journal.index_usage();
        assert!(
            usage.spilled_offsets <= 4 * kept + 4 * 64,
            "round {round}: {usage:?}, {kept} events kept"
        );
        // Their files too: the checkpoint on disk named them, and a new one is written at
        // once (the verification run found them kept until the next interval of writes).
        assert!(
            run_bytes(dir.path()) <= 8 * (4 * kept + 4 * 64),
            "round {round}: {} bytes of runs on disk, {kept} events kept",
            run_bytes(dir.path())
        );
        assert_eq!(
            journal.read_events(0, 1, last),
            Err(JournalError::RetainedAway { oldest })
        );
        assert_eq!(
            journal.read_events(0, oldest, last).expect("kept").len() as u64,
            kept
        );
        journal.close();
    }
}

/// A device that needs what retention already deleted (its `keep_events` raised since) holds
/// the journal where it now begins, and `pinned_by` says so: it named a position before the
/// journal's start (found by a verification run: `position: 0`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_needing_deleted_history_pins_where_the_journal_begins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = retaining(dir.path(), 10).expect("open");
    a_alone_past_the_checkpoints_identity_bytes(&journal).await;
    journal.retain_now().expect("pass");
    let from = journal.retained_from();
    assert!(from > 0);
    journal.close();
    drop(journal);
    let journal = retaining(dir.path(), 100_000).expect("reopen");
    let pass = journal.retain_now().expect("pass");
    assert_eq!(pass.deleted_segments, 0, "{pass:?}");
    let pin = pass.pinned_by.expect("pinned");
    assert_eq!(
        (pin.device.as_deref(), pin.reason, pin.position),
        (Some("a"), "keep-events", from),
        "{pin:?}"
    );
}

/// The commit delay is for a journal under load only: the first append after a pause is
/// committed at once, however large the batch before the pause was. The writer looked only at
/// the last batch's size, so after any burst the next lone event waited the whole delay (a
/// review: a second, at `--commit-delay-us 1000000`, after 10 s of quiet). Three rounds: one
/// slow fsync on a busy machine does not fail it; without the rule every round waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_append_after_a_pause_does_not_wait_the_commit_delay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let delay = Duration::from_millis(100);
    let options = JournalOptions {
        commit_delay: delay,
        ..JournalOptions::default()
    };
    let journal = Journal::open(dir.path(), &options).expect("open");
    let (r, e) = version_record(0);
    journal.append(&r, e).await.expect("version");
    let (r, e) = device_record(0, "a");
    journal.append(&r, e).await.expect("device");
    let writer = journal.device_writer(0, 1024);
    let mut seq = 0;
    let mut lone = Vec::new();
    for _ in 0..3 {
        let burst: Vec<_> = (0..64)
            .map(|_| {
                seq += 1;
                append_event(&writer, seq)
            })
            .collect();
        for done in burst {
            done.await.expect("completion").expect("burst");
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        seq += 1;
        let started = std::time::Instant::now();
        append_event(&writer, seq)
            .await
            .expect("completion")
            .expect("lone");
        lone.push(started.elapsed());
    }
    assert!(
        lone.iter().any(|took| *took < delay),
        "every lone append after a pause waited the commit delay: {lone:?}"
    );
}
