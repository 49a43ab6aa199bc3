//! Issue 9, acceptance 4: a history taken out and brought back. `drover journal export` of a
//! live server's data directory, `drover journal import` into a fresh one, and a server
//! started on the import serves every device with the same journal and the same state.
//! `drover backup` of a server under load gives a directory a server starts on, holding a
//! prefix of every device's acknowledged history, with nothing acknowledged after the copy
//! pretending to be in it. Bad exports are refused before anything is written.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};
use support::{Server, cli};

/// A small fleet with some history: two thermostats, a door lock, a device removed.
fn fleet(server: &Server) {
    let api = server.api();
    api.provision("t1", "thermostat", json!({"setpoint": 20.0}));
    api.provision("t2", "thermostat", json!({"setpoint": 18.5}));
    api.provision("lock", "door-lock", json!({"code": "1234"}));
    for i in 0..40 {
        let celsius = 15.0 + f64::from(i % 10) * 0.7;
        api.send("t1", &json!({"type": "reading", "celsius": celsius}));
        api.send("t2", &json!({"type": "reading", "celsius": celsius + 1.0}));
    }
    api.send("lock", &json!({"type": "unlock", "code": "1234"}));
    api.send("lock", &json!({"type": "lock"}));
    // Sent pretty-printed: recorded as sent, line breaks and all, and exported on one line.
    let pretty = api.post_raw(
        "/v1/devices/t2/events",
        b"{\n  \"type\": \"reading\",\r\n  \"celsius\": 19.25\n}",
    );
    assert_eq!(pretty.status, 200, "{}", pretty.text);
}

/// `text` with its first component replaced by bytes that are not WebAssembly (and the
/// digest to match, so only loading it can tell).
fn not_wasm(text: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let bytes = b"not a component".to_vec();
    let digest = hex::encode(sha2::Sha256::digest(&bytes));
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    text.lines()
        .map(|l| {
            if l.contains(r#""kind":"plugin""#) && l.contains(r#""plugin":"thermostat""#) {
                let mut v: Value = serde_json::from_str(l).expect("plugin line");
                v["component"] = json!(b64);
                v["digest"] = json!(digest);
                v.to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `drover journal export --all --data SOURCE -o FILE`: (success, stdout, stderr).
fn export_all(source: &Path, file: &Path) -> (bool, String, String) {
    cli(&[
        "journal",
        "export",
        "--all",
        "--data",
        source.to_str().expect("utf-8"),
        "-o",
        file.to_str().expect("utf-8"),
    ])
}

/// `drover journal import FILE --data DATA`: (success, stdout, stderr).
fn import(file: &Path, data: &Path) -> (bool, String, String) {
    cli(&[
        "journal",
        "import",
        file.to_str().expect("utf-8"),
        "--data",
        data.to_str().expect("utf-8"),
    ])
}

/// `drover backup --data DATA --to TO`: (success, stdout, stderr).
fn backup(data: &Path, to: &Path) -> (bool, String, String) {
    cli(&[
        "backup",
        "--data",
        data.to_str().expect("utf-8"),
        "--to",
        to.to_str().expect("utf-8"),
    ])
}

fn states(server: &Server, ids: &[&str]) -> Vec<(Vec<Value>, Value)> {
    let api = server.api();
    ids.iter()
        .map(|id| {
            let state = api.get(&format!("/v1/devices/{id}"));
            assert_eq!(state.status, 200, "{}", state.text);
            (api.journal(id, 1000), state.body["state"].clone())
        })
        .collect()
}

/// What an import killed part-way leaves in `target`: its note, and some of the file's
/// devices with part of their history (`t1`, 3 of its 41 records) or none (`lock`).
fn a_killed_import(target: &Path, file: &Path) {
    let server = Server::start(target, &[]);
    let api = server.api();
    api.provision("t1", "thermostat", json!({"setpoint": 20.0}));
    for i in 0..3 {
        api.send(
            "t1",
            &json!({"type": "reading", "celsius": 15.0 + f64::from(i) * 0.7}),
        );
    }
    api.provision("lock", "door-lock", json!({"code": "1234"}));
    drop(server);
    let note = json!({"export": file, "devices": ["t1", "t2", "lock"]});
    std::fs::write(target.join("IMPORTING.json"), note.to_string()).expect("note");
}

/// A backup of a directory no server runs on holds its whole journal: one of a killed
/// server's directory, and one of that backup, and so on. Its last batch has no later commit
/// marker, which an online copy must leave out; copied that way, each backup of a backup
/// lost the last acknowledged batch (a review: seq 3, then 2). And a directory holding an
/// import stopped part-way is not read as if it were whole: export and replay refuse it, and
/// its backup carries the import's note, so a server on the backup undoes the import too (a
/// review's backup dropped the note and served the cut-short devices at seq 0).
#[test]
fn backups_of_stopped_directories_hold_everything_and_an_unfinished_import_stays_unfinished() {
    let root = tempfile::tempdir().expect("tempdir");
    let source = root.path().join("source");
    let mut server = Server::start(&source, &[]);
    server.api().provision("k1", "thermostat", json!({}));
    for i in 0..3 {
        let ack = server.api().send(
            "k1",
            &json!({"type": "reading", "celsius": 18.0 + f64::from(i)}),
        );
        assert_eq!(ack["seq"], i + 1);
    }
    let before = states(&server, &["k1"]);
    server.kill();
    let mut from = source;
    for n in 1..=3 {
        let to = root.path().join(format!("backup{n}"));
        let (ok, out, err) = backup(&from, &to);
        assert!(ok, "backup {n}: {out}{err}");
        assert!(!out.contains("left out"), "backup {n}: {out}");
        from = to;
    }
    let server = Server::start(&from, &[]);
    assert_eq!(
        states(&server, &["k1"]),
        before,
        "a backup of a backup of a backup"
    );
    drop(server);

    // An export into a directory is refused before anything is written beside it.
    let (ok, _, err) = export_all(&from, root.path());
    assert!(!ok && err.contains("is a directory"), "{err}");
    let mut partial = root.path().as_os_str().to_owned();
    partial.push(".partial");
    assert!(!std::path::Path::new(&partial).exists());
    let file = root.path().join("fleet.jsonl");
    let (ok, out, err) = export_all(&from, &file);
    assert!(ok, "{out}{err}");
    let cut = root.path().join("cut");
    a_killed_import(&cut, &file);
    let (ok, _, err) = export_all(&cut, &root.path().join("again.jsonl"));
    assert!(!ok && err.contains("stopped part-way"), "export: {err}");
    let (ok, _, err) = cli(&["replay", "t1", "--data", cut.to_str().expect("utf-8")]);
    assert!(!ok && err.contains("stopped part-way"), "replay: {err}");
    let copy = root.path().join("copy");
    let (ok, out, err) = backup(&cut, &copy);
    assert!(ok, "{out}{err}");
    assert!(copy.join("IMPORTING.json").exists(), "the note travels");
    let server = Server::start(&copy, &[]);
    server
        .api()
        .get("/v1/devices/t1")
        .assert_error(404, "unknown-device");
}

/// An import stopped part-way (a review killed one: 206 of 2,000 devices were left at seq 0,
/// served, and extended at seqs the source had used; importing again was refused as
/// "already exists") is undone by whatever opens its directory next: a server starts
/// without the cut-short devices, and importing again reproduces every device exactly.
/// A backup of a stopped directory whose journal is damaged refuses at once and says what to
/// do: it warned twice that the journal "changed under the copy" (nothing runs on it) and
/// then failed with the damage alone, though the damage report advises keeping a copy.
#[test]
fn a_backup_of_a_stopped_damaged_directory_says_why_at_once() {
    let root = tempfile::tempdir().expect("tempdir");
    let source = root.path().join("source");
    let mut server = Server::start(&source, &["--journal-segment-bytes", "4096"]);
    let api = server.api();
    api.provision("k1", "thermostat", json!({}));
    for i in 0..150 {
        api.send(
            "k1",
            &json!({"type": "reading", "celsius": 18.0 + f64::from(i % 7)}),
        );
    }
    assert!(server.terminate().success());
    let segments = drover::journal::SegmentedBackend::list(&source).expect("list");
    assert!(segments.len() > 4, "{} segments", segments.len());
    let victim = &segments[segments.len() / 2].path;
    let mut bytes = std::fs::read(victim).expect("read");
    bytes[40] ^= 0x20;
    std::fs::write(victim, &bytes).expect("spoil");
    let to = root.path().join("copy");
    let (ok, out, err) = backup(&source, &to);
    assert!(!ok, "{out}{err}");
    assert!(!err.contains("taking it again"), "{err}");
    assert!(
        err.contains("a backup copies only a journal that opens") && err.contains("--salvage"),
        "{err}"
    );
    assert!(!err.contains("says::"), "{err}");
    assert!(!to.exists());
}

#[test]
fn an_import_stopped_part_way_is_undone_by_the_next_open() {
    let root = tempfile::tempdir().expect("tempdir");
    let source = root.path().join("source");
    let server = Server::start(&source, &[]);
    fleet(&server);
    let ids = ["t1", "t2", "lock"];
    let before = states(&server, &ids);
    drop(server);
    let file = root.path().join("fleet.jsonl");
    let (ok, out, err) = export_all(&source, &file);
    assert!(ok, "{out}{err}");

    // A server on it first: the cut-short devices are gone, with a warning.
    let served = root.path().join("served");
    a_killed_import(&served, &file);
    let server = Server::start(&served, &[]);
    for id in ids {
        server
            .api()
            .get(&format!("/v1/devices/{id}"))
            .assert_error(404, "unknown-device");
    }
    assert!(!served.join("IMPORTING.json").exists());
    assert!(
        server
            .log_text()
            .contains("an import into this data directory was stopped before it finished"),
        "{}",
        server.log_text()
    );
    drop(server);
    let (ok, out, err) = import(&file, &served);
    assert!(ok, "{out}{err}");
    let server = Server::start(&served, &[]);
    assert_eq!(states(&server, &ids), before);
    drop(server);

    // Or the import again, at once.
    let retried = root.path().join("retried");
    a_killed_import(&retried, &file);
    let (ok, out, err) = import(&file, &retried);
    assert!(ok, "{out}{err}");
    assert!(out.contains("imported 3 device(s), 83 record(s)"), "{out}");
    assert!(!retried.join("IMPORTING.json").exists());
    let server = Server::start(&retried, &[]);
    assert_eq!(states(&server, &ids), before);
    let ack = server
        .api()
        .send("t1", &json!({"type": "reading", "celsius": 30.0}));
    assert_eq!(
        ack["seq"],
        json!(41),
        "t1 goes on from the source's history"
    );
}

#[test]
fn export_then_import_reproduces_every_device_exactly() {
    let root = tempfile::tempdir().expect("tempdir");
    let source = root.path().join("source");
    let server = Server::start(&source, &[]);
    fleet(&server);
    let ids = ["t1", "t2", "lock"];
    let before = states(&server, &ids);

    // Exported beside the live server.
    let file = root.path().join("fleet.jsonl");
    let (ok, out, err) = export_all(&source, &file);
    assert!(ok, "{out}{err}");
    assert!(out.contains("exported 3 device(s), 83 record(s)"), "{out}");
    let text = std::fs::read_to_string(&file).expect("export");
    assert!(
        text.starts_with(r#"{"kind":"drover-export","format":1"#),
        "{text:.200}"
    );
    // Header, 2 plugins, 3 devices, 83 records, end.
    assert_eq!(
        text.lines().count(),
        1 + 2 + 3 + 83 + 1,
        "one line per record"
    );
    assert!(
        text.contains(r#""event_text":"{\n  \"type\": \"reading\",\r\n  \"celsius\": 19.25\n}""#),
        "the pretty-printed event as its exact text"
    );

    let target = root.path().join("target");
    let (ok, out, err) = import(&file, &target);
    assert!(ok, "{out}{err}");
    assert!(out.contains("imported 3 device(s), 83 record(s)"), "{out}");

    // A server on the import: the same journals, record for record, and the same states; and
    // the devices go on from their next seq.
    let imported = Server::start(&target, &[]);
    assert_eq!(states(&imported, &ids), before);
    let ack = imported
        .api()
        .send("t1", &json!({"type": "reading", "celsius": 30.0}));
    assert_eq!(ack["seq"], json!(41));

    // Into a directory its server runs on: refused as such (not as devices that exist).
    let (ok, _, err) = import(&file, &target);
    assert!(!ok);
    assert!(err.contains("is in use by another Drover process"), "{err}");

    // Importing again is refused before anything is written.
    drop(imported);
    let len = std::fs::metadata(target.join("journal.log"))
        .expect("stat")
        .len();
    let (ok, _, err) = import(&file, &target);
    assert!(!ok);
    assert!(err.contains("already exists in the target"), "{err}");
    assert!(
        std::fs::metadata(target.join("journal.log"))
            .expect("stat")
            .len()
            <= len + 64
    );

    // Bad exports are refused before the target is even created.
    let fresh = root.path().join("fresh");
    let bad = root.path().join("bad.jsonl");
    let lines = text.lines().collect::<Vec<_>>();
    let t1 = lines
        .iter()
        .position(|l| l.contains(r#""kind":"device","device":"t1""#))
        .expect("t1's line");
    let t1_end = lines[t1 + 1..]
        .iter()
        .position(|l| !l.contains(r#""kind":"record""#))
        .map_or(lines.len(), |n| t1 + 1 + n);
    let mut twice = lines[..lines.len() - 1].to_vec();
    twice.extend_from_slice(&lines[t1..t1_end]);
    let end = format!(
        r#"{{"kind":"end","devices":4,"records":{}}}"#,
        83 + (t1_end - t1 - 1)
    );
    twice.push(&end);
    // A record with more effects than an event may have (this host cannot write one).
    let cancel = r#"{"type":"cancel_timer","key":"k"}"#;
    let effects = vec![cancel; 1025].join(",");
    let too_many = text.replacen(
        r#"{"kind":"record","#,
        &format!(
            r#"{{"kind":"record","fx":{{"origin":{{"type":"external"}},"effects":[{effects}]}},"#
        ),
        1,
    );
    let cases = [
        (lines[..lines.len() - 1].join("\n"), "cut short"),
        (
            text.replacen(r#""component":""#, r#""component":"AAAA"#, 1),
            "sha256",
        ),
        (
            text.replacen(r#""from":1"#, r#""from":2"#, 1),
            "partial export",
        ),
        (twice.join("\n"), "appears twice"),
        (
            text.replacen(r#""device":"t2""#, r#""device":"../t2""#, 1),
            "device id",
        ),
        (r#"{"a":1}"#.to_string(), "not a Drover export"),
        (too_many, "1025 effects, over the limit of 1024 per event"),
        (not_wasm(&text), "does not load"),
        (
            text.replace(r#""plugin":"door-lock""#, r#""plugin":"../evil""#),
            "plugin name",
        ),
        // JSON only a strict reader refuses, where the server would refuse it as an event.
        (
            text.replacen(r#""event":{"#, r#""event":{"huge":1e400,"#, 1),
            "event: not JSON a strict reader reads back (number out of range",
        ),
        (
            text.replacen(r#""transitions":[{"#, r#""transitions":[{"n":"\ud800","#, 1),
            "transition 0: not JSON a strict reader reads back (`\\ud800`",
        ),
    ];
    for (contents, why) in cases {
        std::fs::write(&bad, contents).expect("write");
        let (ok, _, err) = import(&bad, &fresh);
        assert!(!ok, "{why}");
        assert!(err.contains(why), "{why}: {err}");
        assert!(!fresh.exists(), "{why}: nothing was written");
    }
    // Into an existing empty directory: refused the same, and it stays empty (no `LOCK`).
    std::fs::create_dir(&fresh).expect("mkdir");
    std::fs::write(&bad, r#"{"a":1}"#).expect("write");
    let (ok, _, err) = import(&bad, &fresh);
    assert!(!ok && err.contains("not a Drover export"), "{err}");
    assert_eq!(std::fs::read_dir(&fresh).expect("dir").count(), 0);
    std::fs::remove_dir(&fresh).expect("rmdir");

    // A history the plugin cannot fold is written, found out, and undone: a retry with the
    // good file then imports everything.
    std::fs::write(
        &bad,
        text.replacen("temperature_recorded", "bogus_transition", 1),
    )
    .expect("write");
    let (ok, _, err) = import(&bad, &fresh);
    assert!(!ok);
    assert!(err.contains("import undone"), "{err}");
    let (ok, out, err) = import(&file, &fresh);
    assert!(ok, "{out}{err}");
    let again = Server::start(&fresh, &[]);
    assert_eq!(states(&again, &ids), before);
    drop(again);
    drop(server);

    // An event an older server recorded though a strict reader refuses it (`1e400`), brought
    // in as text: served, and exported again, as a string, never as JSON (a review saw it
    // served raw, which made the whole journal page unreadable to such a reader).
    let odd_event = r#"{"type":"reading","celsius":19.25,"n":1e400}"#;
    let odd_file = root.path().join("odd.jsonl");
    let pretty = r#""event_text":"{\n  \"type\": \"reading\",\r\n  \"celsius\": 19.25\n}""#;
    let odd_line = format!(r#""event_text":{}"#, json!(odd_event));
    std::fs::write(&odd_file, text.replacen(pretty, &odd_line, 1)).expect("write");
    let odd = root.path().join("odd");
    let (ok, out, err) = import(&odd_file, &odd);
    assert!(ok, "{out}{err}");
    let served = Server::start(&odd, &[]);
    let records = served.api().journal("t2", 1000);
    assert!(
        records.iter().any(|r| r["event"] == json!(odd_event)),
        "served as a string"
    );
    drop(served);
    let exported = root.path().join("odd-again.jsonl");
    let (ok, out, err) = export_all(&odd, &exported);
    assert!(ok, "{out}{err}");
    let text = std::fs::read_to_string(&exported).expect("export");
    assert!(text.contains(&odd_line), "exported as text");
}

#[test]
fn a_backup_under_load_starts_and_holds_a_prefix_of_every_history() {
    let root = tempfile::tempdir().expect("tempdir");
    let source = root.path().join("source");
    // Small segments: the backup reads a journal spread over many files.
    let server = Server::start(&source, &["--journal-segment-bytes", "4096"]);
    fleet(&server);

    // Load while the backup runs.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let url = server.url.clone();
        std::thread::spawn(move || {
            let api = support::Api::new(&url);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                api.send(
                    "t2",
                    &json!({"type": "reading", "celsius": 20.0 + (n % 7) as f64}),
                );
                n += 1;
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let copy = root.path().join("copy");
    let (ok, out, err) = backup(&source, &copy);
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load");
    assert!(ok, "{out}{err}");
    assert!(out.contains("backed up 3 device(s)"), "{out}");

    let live = states(&server, &["t1", "t2", "lock"]);

    // Once the server is idle, a backup holds everything acknowledged.
    support::wait_until_idle_proven(&source);
    let idle = root.path().join("idle");
    let (ok, out, err) = backup(&source, &idle);
    assert!(ok, "{out}{err}");
    // Into the data directory itself: refused, and nothing left there.
    let (ok, _, err) = backup(&source, &source.join("inner"));
    assert!(!ok);
    assert!(err.contains("inside the data directory"), "{err}");
    assert!(!source.join("inner").exists());
    drop(server);
    let segments = drover::journal::SegmentedBackend::list(&source).expect("segments");
    assert!(segments.len() > 3, "{segments:?}");
    let whole = Server::start(&idle, &[]);
    assert_eq!(states(&whole, &["t1", "t2", "lock"]), live);
    drop(whole);

    let restored = Server::start(&copy, &[]);
    let copied = states(&restored, &["t1", "t2", "lock"]);
    for ((live_journal, _), (copied_journal, _)) in live.iter().zip(&copied) {
        assert!(copied_journal.len() <= live_journal.len());
        assert_eq!(
            copied_journal[..],
            live_journal[..copied_journal.len()],
            "the copy is a prefix of the history"
        );
    }
    assert_eq!(copied[0], live[0], "t1 was idle: copied whole");
    // The copy is a working data directory.
    let api = restored.api();
    let seq = copied[1].0.len() as u64;
    assert_eq!(
        api.send("t2", &json!({"type": "reading", "celsius": 1.0}))["seq"],
        json!(seq + 1)
    );

    // A backup into a non-empty directory is refused.
    let (ok, _, err) = backup(&source, &copy);
    assert!(!ok);
    assert!(err.contains("not empty"), "{err}");
}

/// A backup taken right after an answer holds the acknowledged event. The last batch it finds
/// is proven durable only by the server's next marker (50 ms later on an idle server), and a
/// backup that did not wait for it left the event out, saying it "had not proven durable
/// yet" (a review: 12 of 12 backups started right after an answer); a server on the copy
/// then handed its seq to another event. And a killed backup's links are removed by the next
/// backup of the directory, whatever its target (they stayed until a restart).
#[test]
fn a_backup_right_after_an_answer_holds_the_acknowledged_event() {
    let root = tempfile::tempdir().expect("tempdir");
    let source = root.path().join("source");
    let server = Server::start(&source, &[]);
    let api = server.api();
    api.provision("t1", "thermostat", json!({"setpoint": 20.0}));
    let stale = source.join(format!("backup-{}-0.tmp", u32::MAX));
    std::fs::create_dir(&stale).expect("a killed backup's links");
    for round in 0..5 {
        let seq = api.send("t1", &json!({"type": "reading", "celsius": 20.5}))["seq"].clone();
        let copy = root.path().join(format!("copy-{round}"));
        let (ok, out, err) = backup(&source, &copy);
        assert!(ok, "{out}{err}");
        // An idle writer's marker after the event is no event left out.
        if round == 0 {
            assert!(!out.contains("left out"), "{out}");
        }
        let journal = drover::journal::Journal::open_read_only(&copy).expect("the copy opens");
        assert_eq!(
            journal.device("t1").map(|h| json!(h.seq)),
            Some(seq),
            "round {round}: {out}"
        );
        assert!(!stale.exists(), "removed by the first backup");
    }
}

/// A backup appears at its target whole or not at all: it is written beside it, hidden, and
/// renamed into place once it opens, so one killed part-way leaves only the hidden directory,
/// which the next backup to the same target removes. (Written in place, a killed copy held a
/// cut journal and no plugins, and a server started on it without a word.) Archives of
/// removed devices are copied too: once retention has deleted their records, they are the
/// only copy of those histories.
#[test]
fn a_backup_appears_whole_or_not_at_all_and_carries_the_archives() {
    let root = tempfile::tempdir().expect("tempdir");
    let source = root.path().join("source");
    let server = Server::start(&source, &[]);
    fleet(&server);
    let api = server.api();
    api.provision("gone", "thermostat", json!({}));
    api.send("gone", &json!({"type": "reading", "celsius": 12.5}));
    let removed = api.call(
        reqwest::Method::DELETE,
        "/v1/devices/gone?archive=true",
        None,
    );
    assert_eq!(removed.status, 200, "{}", removed.text);
    support::wait_until_idle_proven(&source);

    // What a backup killed part-way left: a hidden stage with part of a copy.
    let copy = root.path().join("copy");
    let stage = root.path().join(".copy.backup-partial");
    std::fs::create_dir_all(stage.join("plugins")).expect("stage");
    std::fs::write(stage.join("journal.log"), b"DROVERJL cut short").expect("stage");
    assert!(!copy.exists());

    let (ok, out, err) = backup(&source, &copy);
    assert!(ok, "{out}{err}");
    assert!(out.contains("1 archive(s)"), "{out}");
    assert!(!stage.exists(), "the stage is left behind");
    let archives: Vec<_> = std::fs::read_dir(copy.join("archive"))
        .expect("archives copied")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(archives.len(), 1, "{archives:?}");
    assert!(
        archives[0].to_str().is_some_and(|n| n.starts_with("gone.")),
        "{archives:?}"
    );
    // Where the copy's journal may begin goes with it (see `journal/segments.rs`).
    assert_eq!(
        std::fs::read_to_string(copy.join("journal.retained")).expect("carried"),
        "0\n"
    );
    // The links a killed backup left in a data directory (a process id no process can
    // have) go when a server opens it: they would hold the bytes of segments retention
    // deletes.
    let links = copy.join("backup-4194305-0.tmp");
    std::fs::create_dir_all(&links).expect("links");
    std::fs::write(links.join("journal.log"), b"a link").expect("link");
    let live = states(&server, &["t1", "t2", "lock"]);
    drop(server);
    let restored = Server::start(&copy, &[]);
    assert_eq!(states(&restored, &["t1", "t2", "lock"]), live);
    assert!(!links.exists(), "a killed backup's links were kept");
}

/// `journal export|import` and `backup` work on data directories: their help offers no
/// server flags that they would silently ignore, while reading a journal page does.
#[test]
fn the_data_directory_commands_offer_no_server_flags() {
    for command in [
        &["journal", "export", "--help"][..],
        &["journal", "import", "--help"],
        &["backup", "--help"],
    ] {
        let (ok, out, err) = cli(command);
        assert!(ok, "{command:?}: {err}");
        assert!(out.contains("--data"), "{command:?}: {out}");
        assert!(
            !out.contains("--server") && !out.contains("--json"),
            "{command:?} offers flags it ignores: {out}"
        );
    }
    let (ok, out, err) = cli(&["journal", "--help"]);
    assert!(ok, "{err}");
    assert!(out.contains("--server"), "{out}");
    // `--server` after `export` most likely means a device named `export` on a server: the
    // error says how to write that (clap's own words were "unexpected argument").
    for what in ["export", "import"] {
        let (ok, out, err) = cli(&["journal", what, "--server", "http://127.0.0.1:1"]);
        assert!(!ok, "{out}");
        assert!(
            err.contains(&format!(
                "put the options first: `drover journal --server URL {what}`"
            )),
            "{err}"
        );
    }
}

/// An export that fails (an unknown device, a directory with no journal) exits non-zero with
/// the reason and leaves no file behind, complete or partial.
/// Records of a plugin version removed from the source (its devices moved on, then `plugin
/// rm NAME V`) have no component in an export: the export warns, where restoring the file
/// can still fix it, and the import says how many records it attributed to their device's
/// version. The export said nothing before.
#[test]
fn records_of_a_removed_version_are_exported_with_a_warning_and_reattributed_on_import() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source");
    let mut server = Server::start(&source, &[]);
    let api = server.api();
    api.provision("m", "misbehave", serde_json::json!({}));
    for _ in 0..3 {
        api.send("m", &serde_json::json!({"type": "ok"}));
    }
    let up = api.call(
        reqwest::Method::POST,
        "/v1/plugins/misbehave",
        Some(support::misbehave_variant("v2")),
    );
    assert_eq!(up.status, 201, "{}", up.text);
    let deployed = api.post(
        "/v1/plugins/misbehave/deploy",
        &serde_json::json!({"version": 2}),
    );
    assert_eq!(deployed.status, 200, "{}", deployed.text);
    api.send("m", &serde_json::json!({"type": "ok"}));
    let removed = api.call(
        reqwest::Method::DELETE,
        "/v1/plugins/misbehave/versions/1",
        None,
    );
    assert_eq!(removed.status, 200, "{}", removed.text);
    assert!(server.terminate().success());

    let file = dir.path().join("m.jsonl");
    let (ok, _, err) = export_all(&source, &file);
    assert!(ok, "{err}");
    assert!(
        err.contains("exported without its component") && err.contains("misbehave"),
        "{err}"
    );
    let (ok, out, err) = import(&file, &dir.path().join("imported"));
    assert!(ok, "{err}");
    assert!(
        out.contains("3 record(s) named a plugin version not in the export"),
        "{out}"
    );
}

#[test]
fn a_failed_export_leaves_no_file() {
    let root = tempfile::tempdir().expect("tempdir");
    let source = root.path().join("source");
    let server = Server::start(&source, &[]);
    server.api().provision("t1", "thermostat", json!({}));
    for (data, device) in [(&source, "nosuch"), (&root.path().join("empty"), "t1")] {
        let out = root.path().join("out.jsonl");
        let (ok, stdout, err) = cli(&[
            "journal",
            "export",
            device,
            "--data",
            data.to_str().expect("utf-8"),
            "-o",
            out.to_str().expect("utf-8"),
        ]);
        assert!(!ok, "{stdout}");
        assert!(!err.is_empty());
        let left: Vec<String> = std::fs::read_dir(root.path())
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("out"))
            .collect();
        assert!(left.is_empty(), "{device}: left {left:?}: {err}");
    }
}

/// `-o` naming something other than a regular file: a FIFO (or a device such as `/dev/null`)
/// is written to as it is, and a symbolic link's target gets the export. The export was
/// written beside the path and renamed over it, which replaced the FIFO, the link, or, run
/// as root with `-o /dev/null`, the system's `/dev/null` with a regular file.
#[test]
fn an_export_to_a_fifo_or_a_link_writes_through_it() {
    use std::os::unix::fs::FileTypeExt as _;
    let root = tempfile::tempdir().expect("tempdir");
    let source = root.path().join("source");
    let server = Server::start(&source, &[]);
    server.api().provision("t1", "thermostat", json!({}));
    server
        .api()
        .send("t1", &json!({"type": "reading", "celsius": 19.0}));
    drop(server);
    let fifo = root.path().join("pipe");
    let c_path = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("path");
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo).expect("read the fifo"))
    };
    let export = |to: &Path| {
        cli(&[
            "journal",
            "export",
            "t1",
            "--data",
            source.to_str().expect("utf-8"),
            "-o",
            to.to_str().expect("utf-8"),
        ])
    };
    let (ok, out, err) = export(&fifo);
    assert!(ok, "{out}{err}");
    // Before joining the reader: had the export not written to the fifo, it waits for ever.
    let kind = std::fs::symlink_metadata(&fifo)
        .expect("still there")
        .file_type();
    assert!(kind.is_fifo(), "the fifo was replaced: {kind:?}");
    let through_fifo = reader.join().expect("reader");
    assert!(
        through_fifo.ends_with("{\"kind\":\"end\",\"devices\":1,\"records\":1}\n"),
        "the whole export came through the fifo"
    );

    let target = root.path().join("real.jsonl");
    std::fs::write(&target, "old").expect("write");
    let link = root.path().join("link.jsonl");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let (ok, out, err) = export(&link);
    assert!(ok, "{out}{err}");
    let is_link = |path: &std::path::Path| {
        std::fs::symlink_metadata(path)
            .expect("link")
            .file_type()
            .is_symlink()
    };
    assert!(is_link(&link), "the link was replaced");
    // A link whose target does not exist yet: the target is created, the link kept.
    let dangling = root.path().join("dangling.jsonl");
    std::os::unix::fs::symlink("later.jsonl", &dangling).expect("symlink");
    let (ok, out, err) = export(&dangling);
    assert!(ok, "{out}{err}");
    assert!(is_link(&dangling), "the dangling link was replaced");
    assert!(
        root.path().join("later.jsonl").is_file(),
        "its target created"
    );
    let written = std::fs::read_to_string(&target).expect("target");
    assert!(
        written.starts_with(r#"{"kind":"drover-export""#)
            && written.contains(r#""device":"t1""#)
            && written.ends_with("{\"kind\":\"end\",\"devices\":1,\"records\":1}\n"),
        "the link's target holds the export: {}",
        &written[written.len().saturating_sub(200)..]
    );
}
