//! Effects under `kill -9` (issue 10, acceptance 1 and 2): a `drover serve` whose
//! thermostats set heartbeat timers, report to a room and issue commands is killed with
//! SIGKILL at a random moment, round after round, while timers fall due and messages are on
//! their way. At the end, from the journal alone:
//!
//! * every timer fired at most once, and never after a later reading replaced it;
//! * the last heartbeat of every thermostat fired, exactly once (none lost);
//! * every report a thermostat sent reached the room exactly once, in the order it was sent;
//! * every command is still in the outbox (none acknowledged, none lost), with its id.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{Value, json};
use support::{Rng, Server, poll_until};

const ROUNDS: usize = 50;
const THERMOSTATS: usize = 4;
const ROOM: &str = "k-room";

fn thermostat(i: usize) -> String {
    format!("k-t{i}")
}

/// `(seq, index)` of an effect id as the journal API shows it.
fn id_of(v: &Value) -> (u64, u64) {
    (
        v["seq"].as_u64().expect("seq"),
        v["index"].as_u64().expect("index"),
    )
}

#[test]
fn timers_messages_and_commands_survive_kill_9_without_loss_or_duplicates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut rng = Rng(0xe77ec75);

    let mut server = Server::start(&data, &[]);
    let api = server.api();
    assert!(
        api.put(&format!("/v1/devices/{ROOM}"), &json!({"plugin": "room"}))
            .status
            < 300
    );
    for i in 0..THERMOSTATS {
        let config = json!({
            "plugin": "thermostat",
            "config": {"offline_after_ms": 40 + 60 * i as u64, "room": ROOM, "commands": true}
        });
        assert!(
            api.put(&format!("/v1/devices/{}", thermostat(i)), &config)
                .status
                < 300
        );
    }
    server.kill();

    for round in 0..ROUNDS {
        let mut server = Server::start(&data, &[]);
        let api = server.api();
        for _ in 0..1 + rng.below(4) {
            let device = thermostat(rng.below(THERMOSTATS as u64) as usize);
            let celsius = 15.0 + rng.below(100) as f64 / 10.0;
            let a = api.post(
                &format!("/v1/devices/{device}/events"),
                &json!({"type": "reading", "celsius": celsius}),
            );
            assert_eq!(a.status, 200, "round {round}: {}", a.text);
        }
        // Timers fall due, firings and reports are being committed and dispatched.
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        server.kill();
    }

    // The last start: whatever is owed is carried out.
    let mut server = Server::start(&data, &[]);
    let api = server.api();
    poll_until(Duration::from_secs(30), "every timer fired", || {
        (0..THERMOSTATS)
            .all(|i| {
                let t = api.get(&format!("/v1/devices/{}/timers", thermostat(i)));
                t.body["timers"].as_array().is_some_and(Vec::is_empty)
            })
            .then_some(())
    });

    let mut sent: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    let mut commands = 0;
    for i in 0..THERMOSTATS {
        let device = thermostat(i);
        let records = api.journal(&device, 500);
        // Each reading's heartbeat: (setting effect id, seq of the record that replaced it).
        let mut sets: Vec<((u64, u64), Option<u64>)> = Vec::new();
        let mut fired: Vec<((u64, u64), u64)> = Vec::new();
        for r in &records {
            let seq = r["seq"].as_u64().expect("seq");
            if let Some(origin) = r.get("origin")
                && origin["type"] == "timer"
            {
                fired.push((id_of(&origin["set"]), seq));
            }
            for (index, e) in r["effects"].as_array().into_iter().flatten().enumerate() {
                let id = (seq, index as u64);
                match e["type"].as_str() {
                    Some("set_timer") => {
                        if let Some(last) = sets.last_mut() {
                            last.1 = Some(seq);
                        }
                        sets.push((id, None));
                    }
                    Some("send") => sent.entry(device.clone()).or_default().push(id),
                    Some("command") => commands += 1,
                    _ => {}
                }
            }
        }
        let mut once = HashSet::new();
        for (set, at) in &fired {
            assert!(once.insert(*set), "{device}: timer {set:?} fired twice");
            let (_, replaced) = sets
                .iter()
                .find(|(id, _)| id == set)
                .unwrap_or_else(|| panic!("{device}: firing of unknown timer {set:?}"));
            if let Some(by) = replaced {
                assert!(
                    at < by,
                    "{device}: timer {set:?} fired at {at}, after seq {by} replaced it"
                );
            }
        }
        if let Some((last, _)) = sets.last() {
            assert!(
                once.contains(last),
                "{device}: its last heartbeat {last:?} never fired"
            );
        }
        let state = api.get(&format!("/v1/devices/{device}")).body;
        assert_eq!(state["state"]["online"], false, "{device}: {state}");
    }

    // Every report reached the room exactly once, in order per sender. (The last firings'
    // reports, and those owed since a crash, are dispatched after their commits: waited for,
    // as long as what the room has is a prefix of what was sent.)
    let room_got = || {
        let mut got: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
        for r in &api.journal(ROOM, 500) {
            let origin = &r["origin"];
            assert_eq!(origin["type"], "message", "{r}");
            got.entry(origin["sender"].as_str().expect("sender").to_string())
                .or_default()
                .push(id_of(&origin["id"]));
        }
        got
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = room_got();
        let pending = got.iter().all(|(sender, ids)| {
            sent.get(sender)
                .is_some_and(|s| s.len() >= ids.len() && s[..ids.len()] == ids[..])
        }) && got != sent;
        if !pending || std::time::Instant::now() > deadline {
            assert_eq!(got, sent, "reports sent vs reports the room handled");
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // No command was acknowledged, so every one is still waiting.
    let waiting: usize = (0..THERMOSTATS)
        .map(|i| {
            api.get(&format!("/v1/devices/{}/commands", thermostat(i)))
                .body["commands"]
                .as_array()
                .map_or(0, Vec::len)
        })
        .sum();
    assert_eq!(waiting, commands);

    // Over HTTP: the stream sends every waiting command with its id; acknowledging one
    // takes it out, once.
    let device = thermostat(0);
    let listed: Vec<String> = api.get(&format!("/v1/devices/{device}/commands")).body["commands"]
        .as_array()
        .expect("commands")
        .iter()
        .map(|c| c["id"].as_str().expect("id").to_string())
        .collect();
    assert!(!listed.is_empty(), "{device} issued commands");
    let streamed = stream_ids(&server.addr, &device, listed.len());
    assert_eq!(streamed, listed);
    let ack = |id: &str| {
        api.post(
            &format!("/v1/devices/{device}/commands/{id}/ack"),
            &json!({}),
        )
    };
    let first = ack(&listed[0]);
    assert_eq!(
        (first.status, first.body["acked"].clone()),
        (200, json!(true)),
        "{}",
        first.text
    );
    assert_eq!(ack(&listed[0]).body["acked"], false, "acknowledged twice");
    ack("nonsense").assert_error(400, "malformed-event");
    let left = api.get(&format!("/v1/devices/{device}/commands")).body["commands"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(left, listed.len() - 1);

    // A gateway still connected to the stream does not hold a graceful stop.
    let mut watcher = std::net::TcpStream::connect(&server.addr).expect("connect");
    std::io::Write::write_all(
        &mut watcher,
        format!("GET /v1/devices/{device}/commands/stream HTTP/1.1\r\nHost: drover\r\n\r\n")
            .as_bytes(),
    )
    .expect("request");
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    assert!(server.terminate().success());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "SIGTERM took {:?} with a stream open",
        started.elapsed()
    );
}

/// Reads `n` command ids from `device`'s server-sent-event stream.
fn stream_ids(addr: &str, device: &str, n: usize) -> Vec<String> {
    use std::io::{BufRead, BufReader, Write};
    let mut conn = std::net::TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        conn,
        "GET /v1/devices/{device}/commands/stream HTTP/1.1\r\nHost: drover\r\n\r\n"
    )
    .expect("request");
    let mut ids = Vec::new();
    let mut saw_event = false;
    for line in BufReader::new(conn).lines() {
        let line = line.expect("a line within 10 s");
        if line.contains("text/event-stream") {
            saw_event = true;
        }
        if let Some(id) = line.strip_prefix("id: ") {
            ids.push(id.trim().to_string());
            if ids.len() == n {
                break;
            }
        }
    }
    assert!(saw_event, "the answer is an event stream");
    ids
}
