//! The v1 HTTP API over real HTTP against a real `drover serve` process: the round trip of
//! both example plugins, restarts, bad input, backpressure and misbehaving plugins.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Barrier};

use reqwest::Method;
use serde_json::{Value, json};
use support::{Answer, Api, Server, cli, raw_request};

fn reading(celsius: f64) -> Value {
    json!({"type": "reading", "celsius": celsius})
}

/// Acceptance 1: provision devices of both plugins, send events, read back the state, the
/// journal page by page and past states; the CLI reads the same.
#[test]
fn provision_send_and_read_back_both_plugins() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let api = server.api();

    let t = api.provision("hall", "thermostat", json!({"setpoint": 21.0}));
    assert_eq!(t["id"], "hall");
    assert_eq!(t["plugin"], "thermostat");
    assert_eq!(t["version"], 1);
    assert_eq!(t["seq"], 0);
    // Same again: 200, unchanged. Another config: 409.
    let again = api.put(
        "/v1/devices/hall",
        &json!({"plugin": "thermostat", "config": {"setpoint": 21.0}}),
    );
    assert_eq!(again.status, 200, "{}", again.text);
    api.put(
        "/v1/devices/hall",
        &json!({"plugin": "thermostat", "config": {"setpoint": 25.0}}),
    )
    .assert_error(409, "device-conflict");
    api.provision("front", "door-lock", json!({"code": "4711"}));

    let temps = [19.0, 19.5, 20.2, 21.7, 22.0, 18.4, 20.9];
    let mut acks = Vec::new();
    for (i, c) in temps.iter().enumerate() {
        let ack = api.send("hall", &reading(*c));
        assert_eq!(ack["seq"], i as u64 + 1);
        assert!(ack["at"].as_u64().unwrap() > 0);
        assert_eq!(ack["transitions"][0]["type"], "temperature_recorded");
        assert_eq!(ack["transitions"][0]["celsius"], *c);
        acks.push(ack);
    }
    // 19.0 < 20.5: the first reading turns the heating on.
    assert_eq!(acks[0]["transitions"][1]["type"], "heating_on");

    let lock_events = [
        json!({"type": "unlock", "code": "0000"}),
        json!({"type": "unlock", "code": "4711"}),
        json!({"type": "door_opened"}),
        json!({"type": "door_closed"}),
        json!({"type": "lock"}),
        json!({"type": "battery", "percent": 12}),
    ];
    for e in &lock_events {
        api.send("front", e);
    }
    // A refusal by the plugin is 422 `rejected` and uses no seq.
    api.send("front", &json!({"type": "door_opened"}));
    let refused = api.post("/v1/devices/front/events", &json!({"type": "lock"}));
    refused.assert_error(422, "rejected");
    // The plugin's own code and message, as a structured field.
    assert_eq!(
        refused.body["error"]["plugin"],
        json!({"code": "door-open", "message": "cannot lock while the door is open"}),
        "{}",
        refused.text
    );

    let hall = api.get("/v1/devices/hall");
    assert_eq!(hall.status, 200);
    for field in ["id", "plugin", "version", "seq", "status", "state"] {
        assert!(hall.body.get(field).is_some(), "{field} in {}", hall.text);
    }
    assert_eq!(hall.body["seq"], temps.len() as u64);
    assert_eq!(hall.body["state"]["readings"], temps.len() as u64);
    assert_eq!(hall.body["state"]["last_celsius"], 20.9);
    let front = api.get("/v1/devices/front").body;
    assert_eq!(front["plugin"], "door-lock");
    assert_eq!(front["seq"], 7);
    // Locked, then opened: forced entry, and the lock still reports locked.
    assert_eq!(front["state"]["locked"], true);
    assert_eq!(front["state"]["door_open"], true);
    assert_eq!(front["state"]["forced_entries"], 1);
    assert_eq!(front["state"]["low_battery"], true);
    assert_eq!(front["state"]["failed_attempts"], 0);
    assert!(front["state"].get("code").is_none(), "the PIN never shows");

    // The journal, three records a page.
    let records = api.journal("hall", 3);
    assert_eq!(records.len(), temps.len());
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1);
        assert_eq!(r["event"], reading(temps[i]));
        assert_eq!(r["transitions"], acks[i]["transitions"]);
        assert_eq!(r["at"], acks[i]["at"]);
        assert_eq!(r["plugin"], "thermostat");
        assert_eq!(r["version"], 1);
    }
    let page = api.get("/v1/devices/hall/journal?from=6&limit=3").body;
    assert_eq!(page["records"].as_array().unwrap().len(), 2);
    assert_eq!(page["next"], Value::Null);
    let past = api.get("/v1/devices/hall/journal?from=100").body;
    assert_eq!(past["records"], json!([]));
    assert_eq!(past["next"], Value::Null);

    // Past states.
    let s0 = api.get("/v1/devices/hall/state?at=0").body;
    assert_eq!(s0["seq"], 0);
    assert_eq!(s0["state"]["readings"], 0);
    assert_eq!(s0["state"]["setpoint"], 21.0);
    let s3 = api.get("/v1/devices/hall/state?at=3").body;
    assert_eq!(s3["seq"], 3);
    assert_eq!(s3["state"]["readings"], 3);
    assert_eq!(s3["state"]["last_celsius"], 20.2);
    let now = api.get("/v1/devices/hall/state").body;
    assert_eq!(now["seq"], temps.len() as u64);
    assert_eq!(now["state"], hall.body["state"]);

    // Lists.
    let devices = api.get("/v1/devices?limit=1").body;
    assert_eq!(devices["devices"], json!(["front"]));
    assert_eq!(devices["next"], "front");
    let rest = api.get("/v1/devices?after=front").body;
    assert_eq!(rest["devices"], json!(["hall"]));
    assert_eq!(rest["next"], Value::Null);
    let plugins = api.get("/v1/plugins").body;
    let names: Vec<&str> = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["door-lock", "misbehave", "room", "thermostat"]);
    assert!(
        plugins["plugins"][2]["versions"][0]["digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );

    // Uploading the same bytes again answers the existing version with 200.
    let bytes = std::fs::read(support::plugin_dir().join("thermostat.wasm")).unwrap();
    let up = api.call(Method::POST, "/v1/plugins/thermostat", Some(bytes.clone()));
    assert_eq!(up.status, 200, "{}", up.text);
    assert_eq!(up.body["version"], 1);
    // Garbage is not a component: 422, nothing registered.
    api.call(Method::POST, "/v1/plugins/junk", Some(b"not wasm".to_vec()))
        .assert_error(422, "invalid-plugin");
    assert_eq!(
        api.get("/v1/plugins").body["plugins"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    // Hot reload over HTTP: an upload does not change what runs; dry-run, deploy, rollback.
    let mut rebuilt = bytes.clone();
    let name = b"drover-test";
    rebuilt.extend_from_slice(&[0, (1 + name.len()) as u8, name.len() as u8]);
    rebuilt.extend_from_slice(name);
    let up = api.call(Method::POST, "/v1/plugins/thermostat", Some(rebuilt));
    assert_eq!(up.status, 201, "{}", up.text);
    assert_eq!(up.body["version"], 2);
    let listed = api.get("/v1/plugins").body;
    assert_eq!(listed["plugins"][3]["latest"], 2);
    assert_eq!(listed["plugins"][3]["current"], 1);
    let dry = api.post(
        "/v1/plugins/thermostat/dry-run",
        &json!({"version": 2, "devices": ["hall"]}),
    );
    assert_eq!(dry.status, 200, "{}", dry.text);
    assert_eq!(dry.body["totals"]["identical"], 1, "{}", dry.text);
    api.post(
        "/v1/plugins/thermostat/dry-run",
        &json!({"version": 2, "devices": ["hall"], "sample": 3}),
    )
    .assert_error(400, "malformed-request");
    // A sample past every cap is capped, however large (past u64 JSON reads it as a float,
    // which was refused); one that is no count of devices is refused.
    for (sample, status) in [
        ("99999999999999999999", 200),
        ("null", 200),
        ("-1", 400),
        ("1.5", 400),
        ("\"3\"", 400),
    ] {
        let body = format!(r#"{{"version": 2, "sample": {sample}}}"#);
        let answer = api.post_raw("/v1/plugins/thermostat/dry-run", body.as_bytes());
        assert_eq!(answer.status, status, "sample {sample}: {}", answer.text);
    }
    // A dry-run of no device checks nothing: a script gating a deploy on it would pass.
    for nothing in [
        json!({"version": 2, "sample": 0}),
        json!({"version": 2, "devices": []}),
    ] {
        api.post("/v1/plugins/thermostat/dry-run", &nothing)
            .assert_error(400, "malformed-request");
    }
    api.post("/v1/plugins/thermostat/deploy", &json!({"version": 9}))
        .assert_error(404, "unknown-version");
    api.post("/v1/plugins/thermostat/deploy", &json!({"versoin": 2}))
        .assert_error(400, "malformed-request");
    let deployed = api.post("/v1/plugins/thermostat/deploy", &json!({"version": 2}));
    assert_eq!(deployed.status, 200, "{}", deployed.text);
    assert_eq!(deployed.body["to"], 2);
    assert_eq!(deployed.body["totals"]["failed"], 0);
    let hall = api.get("/v1/devices/hall").body;
    assert_eq!(hall["version"], 2);
    assert_eq!(
        hall.get("upgrade"),
        Some(&Value::Null),
        "on the current version: {hall}"
    );
    let listed = api.get("/v1/devices?detail=true").body;
    assert!(
        listed["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d.get("upgrade") == Some(&Value::Null)),
        "{listed}"
    );
    let back = api.post("/v1/plugins/thermostat/rollback", &json!({}));
    assert_eq!(back.status, 200, "{}", back.text);
    assert_eq!(back.body["to"], 1);
    assert_eq!(api.get("/v1/devices/hall").body["version"], 1);
    api.post("/v1/plugins/thermostat/rollback", &json!({}))
        .assert_error(409, "deploy-refused");

    // The CLI against the same server.
    let url = server.url.as_str();
    let (ok, out, err) = cli(&["state", "hall", "--server", url]);
    assert!(ok, "{err}");
    assert!(out.contains("hall  thermostat v1  seq 7  active"), "{out}");
    let (ok, out, err) = cli(&["state", "hall", "--at", "3", "--json", "--server", url]);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), s3);
    // Listings: JSON lines, one device (or id) each, whatever the paging.
    let (ok, out, err) = cli(&["devices", "--json", "--server", url]);
    assert!(ok, "{err}");
    let listed: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        listed
            .iter()
            .any(|d| d["id"] == "hall" && d["plugin"] == "thermostat"),
        "{out}"
    );
    let (ok, out, err) = cli(&["devices", "--ids", "--json", "--server", url]);
    assert!(ok, "{err}");
    let ids: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ids.len(), listed.len(), "{out}");
    assert!(ids.contains(&json!("hall")), "{out}");
    let (ok, out, err) = cli(&["journal", "hall", "--all", "--json", "--server", url]);
    assert!(ok, "{err}");
    let records: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 7, "{out}");
    assert_eq!(records[0]["seq"], 1);
    // Each record as the server wrote it, byte for byte as in the page's own answer
    // (through a `Value` the keys came out sorted: `{"at":..` first, and an event's too).
    let (ok, page, err) = cli(&["journal", "hall", "--json", "--server", url]);
    assert!(ok, "{err}");
    for line in out.lines() {
        assert!(page.contains(line), "{line} is not in {page}");
    }
    assert!(out.starts_with(r#"{"seq":1,"#), "{out}");
    // A page size past any cap goes to the server, which caps it.
    let (ok, out, err) = cli(&[
        "journal",
        "hall",
        "--limit",
        "99999999999999999999",
        "--server",
        url,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("#7 "), "{out}");
    let (ok, out, err) = cli(&["devices", "--json", "--server", url]);
    assert!(ok, "{err}");
    assert!(
        out.lines().any(|l| l.starts_with(r#"{"id":"hall","#)),
        "{out}"
    );
    let (ok, out, err) = cli(&[
        "send",
        "hall",
        r#"{"type":"set_point","celsius":23}"#,
        "--server",
        url,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("hall seq 8 at "), "{out}");
    assert!(out.contains("setpoint_changed"), "{out}");
    let (ok, out, err) = cli(&["journal", "hall", "--from", "7", "--server", url]);
    assert!(ok, "{err}");
    assert!(out.contains("#7") && out.contains("#8"), "{out}");
    let (ok, out, err) = cli(&[
        "provision",
        "porch",
        "--plugin",
        "thermostat",
        "--server",
        url,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("created porch (thermostat v1)"), "{out}");
    let (ok, out, err) = cli(&["journal", "porch", "--server", url]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "porch: no records yet");
    let (ok, out, err) = cli(&["journal", "porch", "--from", "1", "--server", url]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "porch: no records from seq 1");
    let (ok, out, err) = cli(&["plugins", "--server", url]);
    assert!(ok, "{err}");
    assert!(out.contains("misbehave (current v1, latest v1)"), "{out}");
    assert!(out.contains("thermostat (current v1, latest v2)"), "{out}");
    assert!(!out.contains("slow lane"), "no event here ran slow: {out}");
    let (ok, out, err) = cli(&["plugin", "diff", "thermostat", "2", "--server", url]);
    assert!(ok, "{err}");
    assert!(
        out.contains("thermostat v2 on 2 devices: 2 identical, 0 decide differently"),
        "{out}"
    );
    // A version some device cannot fold: the diff says so and exits 1, as the deploy it
    // stands for would be refused (a review found it exiting 0).
    api.provision("m", "misbehave", json!({}));
    for _ in 0..5 {
        api.send("m", &json!({"type": "ok"}));
    }
    let up = api.call(
        Method::POST,
        "/v1/plugins/misbehave",
        Some(support::misbehave_variant("v3")),
    );
    assert_eq!(up.status, 201, "{}", up.text);
    let (ok, out, _) = cli(&[
        "plugin",
        "diff",
        "misbehave",
        "2",
        "--device",
        "m",
        "--server",
        url,
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("1 cannot fold"), "{out}");
    // The deploy it stands for is refused: the server's reason first, then how to force it,
    // once, in the CLI's words (the hint came first, and the advice twice, found by reviews).
    let (ok, _, err) = cli(&["plugin", "deploy", "misbehave", "2", "--server", url]);
    assert!(!ok, "{err}");
    let reason = err.find("deploy refused");
    let hint = err.find("forced (`--force`), the deploy moves the devices it can fold");
    assert!(
        matches!((reason, hint), (Some(r), Some(h)) if r < h)
            && err.matches("force").count() == 2
            && err.contains("(deploy-refused, HTTP 409)"),
        "{err}"
    );
    // The diff it suggests names this server, which is not the default, so that it runs as
    // printed (it went to 127.0.0.1:7070).
    assert!(
        err.contains(&format!("`drover plugin diff --server {url} misbehave 2`")),
        "{err}"
    );
    // A version whose decisions, and so its state, differ: the diff says both (it said
    // "not checked to the end (see the error)" for a device with no error, reading a field
    // the server did not send: a review).
    let up = api.call(
        Method::POST,
        "/v1/plugins/misbehave",
        Some(support::misbehave_variant("v2")),
    );
    assert_eq!(up.status, 201, "{}", up.text);
    let (ok, out, err) = cli(&[
        "plugin",
        "diff",
        "misbehave",
        "3",
        "--device",
        "m",
        "--server",
        url,
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("m: decides differently on 5 of 5 events; ends in another state")
            && !out.contains("see the error"),
        "{out}"
    );
    // Same transitions, other effects (v2 arms a timer 1 ms later): the effects are shown,
    // or the divergence printed two identical lines (a review).
    api.provision("t", "misbehave", json!({}));
    api.send(
        "t",
        &json!({"type": "arm", "key": "k", "after_ms": 600_000, "event": {"type": "ok"}}),
    );
    let (_, out, _) = cli(&[
        "plugin",
        "diff",
        "misbehave",
        "3",
        "--device",
        "t",
        "--server",
        url,
    ]);
    assert!(
        out.contains("  recorded effects  [") && out.contains("  v3 effects  ["),
        "{out}"
    );
    let gone = api.call(Method::DELETE, "/v1/devices/t", None);
    assert_eq!(gone.status, 200, "{}", gone.text);
    // `push --deploy` is refused alike, and takes the `--force` it is told of (it did not).
    let v3_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(v3_file.path(), support::misbehave_variant("v3")).unwrap();
    let v3_path = v3_file.path().to_str().unwrap();
    let (ok, out, err) = cli(&[
        "plugin",
        "push",
        "misbehave",
        v3_path,
        "--deploy",
        "--server",
        url,
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("misbehave v2 already has these bytes") && err.contains("(`--force`)"),
        "{out}{err}"
    );
    let (ok, _, err) = cli(&["plugin", "push", "misbehave", v3_path, "--force"]);
    assert!(!ok && err.contains("--deploy"), "{err}");
    // Its stored copy damaged, the same push repairs it and says so (it said "unchanged").
    let v3_bytes = std::fs::read(v3_file.path()).unwrap();
    let digest = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&v3_bytes))
    };
    let stored = server.data.join("plugins").join(format!("{digest}.wasm"));
    std::fs::write(&stored, b"rotten").expect("damage the stored copy");
    let (ok, out, err) = cli(&["plugin", "push", "misbehave", v3_path, "--server", url]);
    assert!(
        ok && out.contains("is written again from them (repaired)"),
        "{out}{err}"
    );
    assert_eq!(std::fs::read(&stored).unwrap(), v3_bytes);
    let (ok, out, err) = cli(&["plugin", "push", "misbehave", v3_path, "--server", url]);
    assert!(ok && out.ends_with(": unchanged\n"), "{out}{err}");
    let removed = api.call(Method::DELETE, "/v1/devices/m", None);
    assert_eq!(removed.status, 200, "{}", removed.text);
    // A device quarantined under the version left: the deploy's lines say it was let out.
    api.provision("mq", "misbehave", json!({}));
    for _ in 0..3 {
        let trapped = api.post("/v1/devices/mq/events", &json!({"type": "panic"}));
        trapped.assert_error(422, "trap");
    }
    let (ok, out, err) = cli(&["plugin", "deploy", "misbehave", "2", "--server", url]);
    assert!(ok, "{out}{err}");
    assert!(out.contains(", 1 quarantine ended"), "{out}");
    let removed = api.call(Method::DELETE, "/v1/devices/mq", None);
    assert_eq!(removed.status, 200, "{}", removed.text);
    let (ok, out, err) = cli(&["plugin", "deploy", "thermostat", "2", "--server", url]);
    assert!(ok, "{err}");
    assert!(out.contains("thermostat v1 -> v2: of 2 devices"), "{out}");
    assert!(out.contains("0 failed"), "{out}");
    let (ok, out, err) = cli(&["plugin", "rollback", "thermostat", "--server", url]);
    assert!(ok, "{err}");
    assert!(out.contains("thermostat v2 -> v1 (rollback)"), "{out}");
    // Nothing left to roll back to: no `--force` hint, which cannot help there (it had one).
    let (ok, _, err) = cli(&["plugin", "rollback", "thermostat", "--server", url]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("no earlier current version") && !err.contains("force"),
        "{err}"
    );
    // A rollback refused alike says so in the CLI's words too (it printed the API's).
    let (ok, _, err) = cli(&["plugin", "deploy", "misbehave", "1", "--server", url]);
    assert!(ok, "{err}");
    api.provision("m5", "misbehave", json!({}));
    for _ in 0..5 {
        api.send("m5", &json!({"type": "ok"}));
    }
    let (ok, _, err) = cli(&["plugin", "rollback", "misbehave", "--server", url]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("(`--force`)") && !err.contains("\"force\": true"),
        "{err}"
    );
    // A plugin in use names itself, not one version (it named the version m5 runs).
    let (ok, _, err) = cli(&["plugin", "rm", "misbehave", "--server", url]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("plugin `misbehave` cannot be removed: 1 device(s) run it"),
        "{err}"
    );
    // Forced from `push --deploy`: m5 stays on v1, which the deploy left behind (exit 1).
    let (ok, out, err) = cli(&[
        "plugin",
        "push",
        "misbehave",
        v3_path,
        "--deploy",
        "--force",
        "--server",
        url,
    ]);
    assert!(!ok, "{err}");
    assert!(out.contains("misbehave v1 -> v2"), "{out}{err}");
    // The version it left devices on says how they move on, not to deploy another.
    let (ok, _, err) = cli(&["plugin", "rm", "misbehave", "1", "--server", url]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("1 device(s) are still on it")
            && err.contains("current version (v2)")
            && !err.contains("deploy another"),
        "{err}"
    );
    let (ok, _, err) = cli(&["plugin", "deploy", "misbehave", "1", "--server", url]);
    assert!(ok, "{err}");
    let removed = api.call(Method::DELETE, "/v1/devices/m5", None);
    assert_eq!(removed.status, 200, "{}", removed.text);
    let (ok, out, _) = cli(&["devices", "--ids", "--server", url]);
    assert!(ok);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["front", "hall", "porch"]);
    let (ok, out, _) = cli(&["devices", "--server", url]);
    assert!(ok);
    let table: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        table[0],
        ["ID", "PLUGIN", "STATUS", "SEQ", "UPGRADE"],
        "{out}"
    );
    assert_eq!(table[2][0], "hall", "{out}");
    assert_eq!(table[2][1..3], ["thermostat", "v1"], "{out}");
    assert_eq!(table[2][4], "8", "{out}");
    // The simulator drives any plugin from event templates.
    let (ok, out, err) = cli(&[
        "sim",
        "--server",
        url,
        "--plugin",
        "misbehave",
        "--prefix",
        "custom-",
        "--event",
        r#"{"type": "{{pick:ok|echo}}"}"#,
        "--devices",
        "3",
        "--events",
        "30",
        "--quiet",
    ]);
    assert!(ok, "{out}\n{err}");
    let custom = api.get("/v1/devices/custom-000001").body;
    assert_eq!(custom["plugin"], "misbehave", "{custom}");
    let (ok, _, err) = cli(&["sim", "--server", url, "--plugin", "misbehave", "--quiet"]);
    assert!(!ok && err.contains("--event"), "{err}");
    // A slow rate ends with its duration: each of the 32 workers used to sleep to its next
    // slot first, 16 s past a 2 s run at 2 events/s.
    let paced = |extra: &[&str]| {
        let mut args = vec![
            "sim",
            "--server",
            url,
            "--plugin",
            "misbehave",
            "--prefix",
            "paced-",
            "--event",
            r#"{"type": "ok"}"#,
            "--quiet",
        ];
        args.extend_from_slice(extra);
        cli(&args)
    };
    let started = std::time::Instant::now();
    let (ok, out, err) = paced(&["--devices", "3", "--rate", "2", "--duration", "2", "--json"]);
    assert!(ok, "{out}\n{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "a 2 s run took {:?}",
        started.elapsed()
    );
    // And it lasts its duration: the rate it reports is over the whole of it, not over the
    // time until its last slot's answer (2 events over 3 s at 0.5 events/s read "1 events/s").
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["events_ok"], 4, "{summary}");
    assert!(
        summary["elapsed_secs"].as_f64().unwrap() >= 2.0
            && summary["events_per_sec"].as_f64().unwrap() <= 2.0,
        "{summary}"
    );
    // Settings no run can honour are refused before anything is provisioned.
    for (extra, says) in [
        (&["--rate", "0", "--duration", "2"][..], "--rate"),
        (&["--rate=-1"], "--rate"),
        (&["--concurrency", "0"], "--concurrency"),
        (&["--concurrency", "100000"], "--concurrency"),
        (&["--devices", "0"], "at least one device"),
        (&["--duration", "0"], "--duration"),
        (&["--events", "0"], "--events"),
    ] {
        let (ok, _, err) = paced(extra);
        assert!(!ok && err.contains(says), "{extra:?}: {err}");
        assert!(!err.contains("provisioning"), "{extra:?}: {err}");
    }
    // A reader that goes away early (`drover devices | head`): no panic, just gone.
    let mut child = std::process::Command::new(support::BIN)
        .args(["devices", "--server", url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Removing a device, with an archive of its history on the server.
    let (ok, out, err) = cli(&["remove", "porch", "--archive", "--server", url]);
    assert!(ok, "{err}");
    assert!(out.contains("removed porch at seq"), "{out}");
    assert!(out.contains("archive"), "{out}");
    api.get("/v1/devices/porch")
        .assert_error(404, "unknown-device");
    api.call(Method::DELETE, "/v1/devices/porch", None)
        .assert_error(404, "unknown-device");
    // Errors: the server's code and message, non-zero exit.
    let (ok, _, err) = cli(&["state", "nobody", "--server", url]);
    assert!(!ok);
    assert!(
        err.contains("unknown-device") && err.contains("nobody"),
        "{err}"
    );
    let (ok, _, err) = cli(&["send", "hall", "{not json", "--server", url]);
    assert!(!ok);
    assert!(
        err.contains("malformed-event") && err.contains("not JSON"),
        "{err}"
    );
}

/// Acceptance 2: a graceful restart on the same data directory serves every device with the
/// same seq, state and journal as before.
#[test]
fn restart_on_the_same_data_dir_keeps_every_state() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Snapshots every 5 transitions, so the restart restores snapshots and replays tails.
    let flags = ["--snapshot-every", "5"];
    let mut server = Server::start(&data, &flags);
    let api = server.api();
    let ids: Vec<String> = (0..8).map(|i| format!("dev-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        if i % 2 == 0 {
            api.provision(id, "thermostat", json!({"setpoint": 20.0 + i as f64}));
        } else {
            api.provision(id, "door-lock", json!({"code": "1234", "max_attempts": 2}));
        }
    }
    // Through the batch route: 25 events per device in 5 batches.
    for round in 0..5 {
        let mut events = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            for k in 0..5 {
                let n = round * 5 + k;
                let event = if i % 2 == 0 {
                    reading(15.0 + (n * 7 % 11) as f64)
                } else {
                    match n % 5 {
                        0 => json!({"type": "unlock", "code": "9999"}),
                        1 => json!({"type": "unlock", "code": "1234"}),
                        2 => json!({"type": "battery", "percent": 90 - n}),
                        3 => json!({"type": "lock"}),
                        _ => json!({"type": "door_closed"}),
                    }
                };
                events.push(json!({"device": id, "event": event}));
            }
        }
        let a = api.post("/v1/events", &json!({"events": events}));
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.body["failed"], 0, "{}", a.text);
    }

    let before: HashMap<&String, (Value, Vec<Value>)> = ids
        .iter()
        .map(|id| {
            let d = api.get(&format!("/v1/devices/{id}")).body;
            assert_eq!(d["seq"], 25);
            (id, (d, api.journal(id, 10)))
        })
        .collect();

    let status = server.terminate();
    assert!(status.success(), "graceful exit: {status}");
    let server = Server::start(&data, &flags);
    let api = server.api();
    for id in &ids {
        let d = api.get(&format!("/v1/devices/{id}")).body;
        let (old, journal) = &before[id];
        assert_eq!(d["seq"], old["seq"], "{id}");
        assert_eq!(d["state"], old["state"], "{id}");
        assert_eq!(d["plugin"], old["plugin"], "{id}");
        assert_eq!(&api.journal(id, 7), journal, "{id}");
    }
    // And the devices keep going from where they were.
    assert_eq!(api.send(&ids[0], &reading(30.0))["seq"], 26);
}

/// Acceptance 4: bad input gets a clear 4xx in the error shape and writes nothing; the server
/// stays healthy.
#[test]
fn bad_input_is_refused_with_the_error_shape_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let api = server.api();
    api.provision("t1", "thermostat", json!({}));
    api.send("t1", &reading(20.0));
    // An idle writer closes its last batch with an empty commit marker within 50 ms: the
    // length to compare against is the one after it.
    let mut journal_len = server.journal_len();
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(150));
        let now = server.journal_len();
        if now == journal_len {
            break;
        }
        journal_len = now;
    }
    let state = api.get("/v1/devices/t1").body;

    let long = "a".repeat(129);
    let cases: Vec<(Answer, u16, &str, &str)> =
        vec![
        (
            api.post_raw("/v1/devices/t1/events", b"{\"type\":"),
            400,
            "malformed-event",
            "truncated JSON",
        ),
        (
            api.post_raw("/v1/devices/t1/events", b"reading 20"),
            400,
            "malformed-event",
            "not JSON",
        ),
        (
            api.post_raw("/v1/devices/t1/events", b""),
            400,
            "malformed-event",
            "empty body",
        ),
        (
            api.post_raw("/v1/devices/t1/events", b"{\"a\":\"\xff\xfe\"}"),
            400,
            "malformed-event",
            "not UTF-8",
        ),
        (
            api.post_raw(
                "/v1/devices/t1/events",
                br#"{"type":"reading","celsius":20,"note":"\udc00"}"#,
            ),
            400,
            "malformed-event",
            "surrogate",
        ),
        (
            api.post_raw(
                "/v1/devices/t1/events",
                br#"{"type":"reading","celsius":-1e400}"#,
            ),
            400,
            "malformed-event",
            "number out of range",
        ),
        (
            api.post_raw("/v1/devices/t1/events", &vec![b' '; 65 * 1024]),
            413,
            "payload-too-large",
            "oversized event",
        ),
        (
            api.post("/v1/devices/ghost/events", &reading(1.0)),
            404,
            "unknown-device",
            "unknown device",
        ),
        (
            api.post(
                "/v1/events",
                &json!({"events": vec![json!({"device": "t1", "event": reading(1.0)}); 10_001]}),
            ),
            413,
            "payload-too-large",
            "a batch of more items than the limit",
        ),
        (
            api.get("/v1/devices/ghost"),
            404,
            "unknown-device",
            "unknown device read",
        ),
        (
            api.get("/v1/devices/ghost/journal"),
            404,
            "unknown-device",
            "unknown device journal",
        ),
        (
            api.put("/v1/devices/t2", &json!({"plugin": "toaster"})),
            404,
            "unknown-plugin",
            "unknown plugin",
        ),
        (
            api.put("/v1/devices/t2", &json!({"config": {}})),
            400,
            "malformed-request",
            "no plugin",
        ),
        (
            api.put(
                "/v1/devices/t2",
                &json!({"plugin": "thermostat", "confg": {}}),
            ),
            400,
            "malformed-request",
            "unknown field",
        ),
        (
            api.call(Method::PUT, "/v1/devices/t2", Some(b"\xff".to_vec())),
            400,
            "malformed-request",
            "provision not UTF-8",
        ),
        (
            api.put(
                "/v1/devices/t2",
                &json!({"plugin": "thermostat", "config": {"setpoint": 99}}),
            ),
            400,
            "malformed-config",
            "config the plugin refuses",
        ),
        (
            api.put(
                &format!("/v1/devices/{long}"),
                &json!({"plugin": "thermostat"}),
            ),
            400,
            "invalid-id",
            "id too long",
        ),
        (
            api.put("/v1/devices/a%2Fb", &json!({"plugin": "thermostat"})),
            400,
            "invalid-id",
            "id with /",
        ),
        (
            api.put("/v1/devices/a%00b", &json!({"plugin": "thermostat"})),
            400,
            "invalid-id",
            "id with NUL",
        ),
        (
            api.put("/v1/devices/a%0Ab", &json!({"plugin": "thermostat"})),
            400,
            "invalid-id",
            "id with newline",
        ),
        (
            api.put("/v1/devices/a%FFb", &json!({"plugin": "thermostat"})),
            400,
            "invalid-id",
            "id not UTF-8",
        ),
        (
            api.get("/v1/devices/t1/journal?from=-1"),
            400,
            "malformed-query",
            "from=-1",
        ),
        (
            api.get("/v1/devices/t1/journal?limit=abc"),
            400,
            "malformed-query",
            "limit=abc",
        ),
        (
            api.get("/v1/devices/t1/journal?limit=0"),
            400,
            "malformed-query",
            "limit=0",
        ),
        (
            api.get("/v1/devices/t1/journal?limit=-1"),
            400,
            "malformed-query",
            "limit=-1",
        ),
        (
            api.get("/v1/devices/t1/journal?from=99999999999999999999999"),
            400,
            "malformed-query",
            "from overflows",
        ),
        (
            api.get("/v1/devices/t1/state?at=2"),
            404,
            "seq-out-of-range",
            "state at a future seq",
        ),
        (
            api.get("/v1/devices/t1/state?at=x"),
            400,
            "malformed-query",
            "state at=x",
        ),
        (
            api.post("/v1/events", &json!({"events": [{"device": "t1"}]})),
            400,
            "malformed-request",
            "batch item without event",
        ),
        (
            api.post_raw("/v1/events", b"[1,2"),
            400,
            "malformed-request",
            "batch not JSON",
        ),
        // serde took a struct's fields as an array too: this one was a batch of one event.
        (
            api.post_raw(
                "/v1/events",
                br#"[[["t1",{"type":"reading","celsius":19}]]]"#,
            ),
            400,
            "malformed-request",
            "batch as an array",
        ),
        (
            api.post_raw("/v1/events", br#"{"events":[["t1",{"type":"reading","celsius":19}]]}"#),
            400,
            "malformed-request",
            "batch item as an array",
        ),
        (
            api.call(
                Method::PUT,
                "/v1/devices/t9",
                Some(br#"["thermostat"]"#.to_vec()),
            ),
            400,
            "malformed-request",
            "provisioning body as an array",
        ),
        (api.get("/v1/nothing"), 404, "not-found", "unknown route"),
        (
            api.call(Method::PATCH, "/v1/devices/t1", None),
            405,
            "method-not-allowed",
            "wrong method",
        ),
    ];
    for (answer, status, code, what) in &cases {
        eprintln!("case: {what}");
        answer.assert_error(*status, code);
    }
    // Any JSON body's lone surrogate is said as an event's is (serde_json called this
    // trailing half "lone leading surrogate").
    let config = api.call(
        Method::PUT,
        "/v1/devices/t2",
        Some(br#"{"plugin":"thermostat","config":{"\udc00":1}}"#.to_vec()),
    );
    config.assert_error(400, "malformed-request");
    assert!(
        config
            .text
            .contains("the trailing half of a UTF-16 surrogate pair"),
        "{}",
        config.text
    );
    // A page size past every cap is capped, however many digits it has (20 were a 400).
    for path in [
        "/v1/devices/t1/journal?limit=99999999999999999999",
        "/v1/devices?limit=99999999999999999999",
    ] {
        let page = api.get(path);
        assert_eq!(page.status, 200, "{path}: {}", page.text);
    }
    // Paths a URL library would normalize: sent raw.
    for (path, what) in [
        ("/v1/devices/..", "id `..`"),
        ("/v1/devices/../events", "id `..` with a suffix"),
        ("/v1/devices/a%00/events", "NUL in an event path"),
        ("/v1/devices/x%2F..%2Fy/journal", "encoded traversal"),
    ] {
        let (status, body) = raw_request(&server.addr, "POST", path, b"{}");
        assert!(
            status == 400 || status == 404 || status == 405,
            "{what}: status {status}"
        );
        assert!(body["error"]["code"].is_string(), "{what}: {body}");
    }
    let (status, body) = raw_request(&server.addr, "GET", "/v1/devices/..", b"");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid-id"))
    );
    // An unknown route is named with its method and target, a target that is no path too
    // (it said "no route for " with nothing after it).
    for (method, target, said) in [
        ("GET", "/v1/nothing", "no route for GET /v1/nothing"),
        (
            "CONNECT",
            "example.org:80",
            "no route for CONNECT example.org:80",
        ),
    ] {
        let (status, body) = raw_request(&server.addr, method, target, b"");
        assert_eq!(status, 404, "{method} {target}: {body}");
        assert_eq!(body["error"]["message"], said, "{body}");
    }
    // A long method or path is not repeated whole (a 100 KB method made a 100 KB answer).
    let long = "A".repeat(100_000);
    let (status, body) = raw_request(&server.addr, &long, "/", b"");
    assert_eq!(status, 404, "{body}");
    let said = body["error"]["message"].as_str().expect("message");
    assert!(said.len() < 400, "{} bytes", said.len());
    assert!(said.ends_with("... (100000 bytes) /"), "{said}");
    // A batch: per-item errors, the good item goes through.
    let batch = api.post(
        "/v1/events",
        &json!({"events": [
            {"device": "ghost", "event": {}},
            {"device": "a/b", "event": {}},
            {"device": "t1", "event": {"type": "set_point", "celsius": 99}},
        ]}),
    );
    assert_eq!(batch.status, 200, "{}", batch.text);
    assert_eq!(batch.body["ok"], 0);
    let codes: Vec<&str> = batch.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["error"]["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["unknown-device", "invalid-id", "rejected"]);
    assert_eq!(
        batch.body["results"][2]["error"]["plugin"]["code"], "out-of-range",
        "{}",
        batch.text
    );
    assert!(batch.body["results"][0]["error"].get("plugin").is_none());
    // Items a batch holds as raw JSON are checked as strictly as a single event.
    let batch = api.post_raw(
        "/v1/events",
        br#"{"events":[{"device":"t1","event":{"type":"reading","celsius":20,"n":"\ud800"}},
                       {"device":"t1","event":{"type":"reading","celsius":1e400}}]}"#,
    );
    assert_eq!(batch.status, 200, "{}", batch.text);
    for result in batch.body["results"].as_array().expect("results") {
        assert_eq!(result["error"]["code"], "malformed-event", "{}", batch.text);
    }

    // Nothing was written, nothing changed, and the server is fine.
    assert_eq!(
        server.journal_len(),
        journal_len,
        "the journal did not grow"
    );
    assert_eq!(api.get("/v1/devices/t1").body, state);
    assert_eq!(api.get("/v1/devices").body["devices"], json!(["t1"]));
    let health = api.get("/healthz");
    assert_eq!(
        (health.status, health.body["status"].as_str()),
        (200, Some("ok"))
    );
    let metrics = api.get("/metrics").text;
    assert!(
        metrics.contains("drover_http_errors_total{code=\"invalid-id\"}"),
        "{metrics}"
    );
    // Every 413 is counted: the body-size ones and the batch of too many items alike.
    assert!(
        metrics.contains("drover_http_errors_total{code=\"payload-too-large\"} 2"),
        "{metrics}"
    );
    assert_eq!(api.send("t1", &reading(21.0))["seq"], 2);
}

/// Acceptance 5: flooding one device with a tiny mailbox yields 429 + Retry-After, memory
/// stays bounded, and every accepted event is handled in order: per client, acks come back
/// with increasing seqs, and the journal holds exactly the accepted events, gap-free.
#[test]
fn backpressure_floods_get_429_and_accepted_events_stay_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--mailbox", "1", "--max-in-flight", "1"],
    );
    let api = server.api();
    api.provision("hot", "thermostat", json!({}));
    api.send("hot", &reading(20.0)); // activates the actor
    let rss_before = server.rss_kib();

    const CLIENTS: usize = 12;
    const PER_CLIENT: usize = 40;
    let start = Arc::new(Barrier::new(CLIENTS));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let api = Api::new(&server.url);
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let mut acked = Vec::new();
                let mut refused = 0;
                for n in 0..PER_CLIENT {
                    let event =
                        json!({"type": "reading", "celsius": 20.0, "nonce": format!("c{c}-{n}")});
                    let a = api.post("/v1/devices/hot/events", &event);
                    match a.status {
                        200 => acked.push((a.body["seq"].as_u64().unwrap(), format!("c{c}-{n}"))),
                        429 => {
                            a.assert_error(429, "mailbox-full");
                            assert_eq!(a.headers.get("retry-after").unwrap(), "1");
                            refused += 1;
                        }
                        other => panic!("unexpected {other}: {}", a.text),
                    }
                }
                (acked, refused)
            })
        })
        .collect();
    let mut acked: Vec<(u64, String)> = Vec::new();
    let mut refused = 0;
    for t in threads {
        let (a, r) = t.join().unwrap();
        // One client's acks come back in the order it sent: increasing seqs.
        assert!(
            a.windows(2).all(|w| w[0].0 < w[1].0),
            "per-client order: {a:?}"
        );
        acked.extend(a);
        refused += r;
    }
    assert!(
        refused > 0,
        "a flood of {CLIENTS} clients on a mailbox of 1 must see 429s"
    );
    assert!(!acked.is_empty());

    // A batch of 60 events for the same device: a prefix is accepted in order, then every
    // later item is refused with mailbox-full.
    let events: Vec<Value> = (0..60)
        .map(|n| json!({"device": "hot", "event": {"type": "reading", "celsius": 21.0, "nonce": format!("b-{n}")}}))
        .collect();
    let batch = api.post("/v1/events", &json!({"events": events}));
    assert_eq!(batch.status, 200, "{}", batch.text);
    let results = batch.body["results"].as_array().unwrap();
    let first_refused = results
        .iter()
        .position(|r| r.get("error").is_some())
        .expect("a batch of 60 on a mailbox of 1 is refused in part");
    assert!(first_refused >= 1, "the first item fits");
    for (n, r) in results.iter().enumerate() {
        if n < first_refused {
            let seq = r["seq"].as_u64().expect("accepted");
            acked.push((seq, format!("b-{n}")));
        } else {
            assert_eq!(r["error"]["code"], "mailbox-full", "item {n}: {r}");
            // What the single send's `Retry-After` says, per item.
            assert_eq!(r["error"]["retry_after_s"], 1, "item {n}: {r}");
        }
    }
    assert_eq!(
        batch
            .headers
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1"),
        "a batch with items to resend says when"
    );
    let batch_seqs: Vec<u64> = results[..first_refused]
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert!(
        batch_seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "batch order: {batch_seqs:?}"
    );

    // The journal holds exactly the accepted events, each once, at its acked seq, gap-free.
    let journal = api.journal("hot", 1000);
    assert_eq!(journal.len(), acked.len() + 1);
    for (i, r) in journal.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1);
    }
    for (seq, nonce) in &acked {
        assert_eq!(
            journal[*seq as usize - 1]["event"]["nonce"],
            *nonce,
            "seq {seq}"
        );
    }
    let rss_after = server.rss_kib();
    assert!(
        rss_after < rss_before + 64 * 1024,
        "memory stays bounded: {rss_before} KiB -> {rss_after} KiB"
    );
    let metrics = api.get("/metrics").text;
    assert!(
        !metrics.contains("drover_errors_total{code=\"mailbox-full\"} 0\n"),
        "429s are counted"
    );
}

/// Invariant 5 over HTTP: a plugin that traps, spins or floods its output gets 422 with a
/// code that says so; its device recovers, and other devices never notice.
#[test]
fn misbehaving_plugin_gets_422_and_harms_only_its_own_device() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &["--call-timeout-ms", "300"]);
    let api = server.api();
    api.provision("bad", "misbehave", json!({}));
    api.provision("good", "thermostat", json!({}));
    assert_eq!(api.send("bad", &json!({"type": "ok"}))["seq"], 1);
    let cases = [
        (json!({"type": "panic"}), "trap"),
        (json!({"type": "loop"}), "timeout"),
        (json!({"type": "big", "kb": 2048}), "output-too-large"),
        (json!({"type": "reject"}), "rejected"),
    ];
    for (event, code) in cases {
        let a = api.post("/v1/devices/bad/events", &event);
        a.assert_error(422, code);
        if code != "rejected" {
            let msg = a.body["error"]["message"].as_str().unwrap();
            assert!(msg.contains("plugin"), "says whose fault it is: {msg}");
        }
        assert_eq!(
            api.send("good", &reading(19.0))["transitions"][0]["type"],
            "temperature_recorded"
        );
    }
    // The looping event showed the plugin slow: its version says so, the thermostat's not.
    let plugins = api.get("/v1/plugins").body;
    // Its activations follow its events to the slow lane.
    let marks = |name: &str| {
        plugins["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name)
            .map(|p| {
                let v = &p["versions"][0];
                (v["slow_lane"].clone(), v["slow_setup"].clone())
            })
    };
    assert_eq!(
        marks("misbehave"),
        Some((json!(true), json!(true))),
        "{plugins}"
    );
    assert_eq!(
        marks("thermostat"),
        Some((json!(false), json!(false))),
        "{plugins}"
    );
    // The bad device was rebuilt from its journal and goes on at seq 2.
    let ack = api.send("bad", &json!({"type": "ok"}));
    assert_eq!(ack["seq"], 2);
    assert_eq!(ack["transitions"][0]["count"], 2);
    assert_eq!(api.get("/v1/devices/good").body["seq"], 4);
    // The three failures (not the refusal) are dead letters, oldest first, each with the
    // event it failed on; none was deleted by retention.
    let dead = support::poll_until(
        std::time::Duration::from_secs(20),
        "three dead letters",
        || {
            let body = api.get("/v1/devices/bad/dead-letters").body;
            (body["dead_letters"].as_array().map(Vec::len) == Some(3)).then_some(body)
        },
    );
    let codes: Vec<&str> = dead["dead_letters"]
        .as_array()
        .expect("list")
        .iter()
        .map(|d| d["code"].as_str().expect("code"))
        .collect();
    assert_eq!(codes, ["trap", "timeout", "output-too-large"], "{dead}");
    assert_eq!(dead["dead_letters"][0]["event"], json!({"type": "panic"}));
    assert_eq!(dead["dead_letters"][0]["after_seq"], 1);
    assert_eq!(dead["retained_away"], 0, "{dead}");
    // And counted, by code, for alerts (a poison message or timer has no request whose
    // error would count it).
    let metrics = api.get("/metrics").text;
    for code in ["trap", "timeout", "output-too-large"] {
        assert!(
            metrics.contains(&format!("drover_dead_letters_total{{code=\"{code}\"}} 1\n")),
            "{metrics}"
        );
    }
    assert!(
        metrics.contains("drover_dead_letters_total{code=\"invalid-effect\"} 0\n"),
        "{metrics}"
    );
    // Events from outside the plugin refused are no dead letters: their senders heard.
    assert!(
        metrics.contains("drover_dead_letters_total{code=\"rejected\"} 0\n"),
        "{metrics}"
    );

    // A guest's `println!` / `eprintln!` go to the server's log under the device, instead of
    // trapping.
    let printed = api.send("bad", &json!({"type": "print", "message": "debugging 42"}));
    assert_eq!(printed["seq"], 3, "{printed}");
    let log = server.log_text();
    let line = |needle: &str| log.lines().any(|l| l.contains(needle) && l.contains("bad"));
    assert!(
        line("debugging 42") && line("stderr: debugging 42"),
        "{log}"
    );
}

/// The README's table of metrics names every metric the server lists (it named a third of
/// them: a review found `drover_messages_delivered_total` and others only on `/metrics`).
#[test]
fn the_readme_names_every_metric() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let metrics = server.api().get("/metrics").text;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README");
    let names: Vec<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert!(names.len() > 50, "{metrics}");
    let missing: Vec<&&str> = names
        .iter()
        .filter(|n| !readme.contains(&format!("| `{n}` |")))
        .collect();
    assert!(missing.is_empty(), "not in the README's table: {missing:?}");
}

/// `drover commands watch --json` prints each command as the server lists it, every field
/// included (it printed four of the six, without `seq` and `index`).
#[test]
fn commands_watch_json_prints_the_servers_commands_whole() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let api = server.api();
    api.provision("g", "misbehave", json!({}));
    api.send("g", &json!({"type": "command"}));
    let listed = api.get("/v1/devices/g/commands").body["commands"][0].clone();
    let mut watch = support::Reaped(
        std::process::Command::new(support::BIN)
            .args(["commands", "watch", "g", "--json", "--server", &server.url])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(watch.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let printed: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(printed, listed, "{line}");
    assert!(
        printed["seq"].is_u64() && printed["index"].is_u64(),
        "{line}"
    );
}

/// An outbox is read a page at a time: a page ends at `limit` commands or once they reach 4
/// MiB, and `next` continues it. Before, one read answered every command at once: 1,000
/// commands of ~100 KB made a 100 MB answer, and ten concurrent reads took the server from
/// 53 MB to 1.3 GB. `after` also lets a long poll wait for new commands without
/// acknowledging the old ones, and `drover commands list` follows `next` to the end.
#[test]
fn an_outbox_is_read_a_bounded_page_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let api = server.api();
    api.provision("o", "misbehave", json!({}));
    // 48 commands of 100 KiB: ~4.8 MB, past one page's 4 MiB.
    for _ in 0..6 {
        api.send("o", &json!({"type": "command", "count": 8, "kb": 100}));
    }
    let ids = |a: &Answer| -> Vec<String> {
        a.body["commands"]
            .as_array()
            .unwrap_or_else(|| panic!("{}", &a.text[..a.text.len().min(300)]))
            .iter()
            .map(|c| c["id"].as_str().expect("id").to_string())
            .collect()
    };
    let first = api.get("/v1/devices/o/commands");
    assert_eq!(first.status, 200);
    let page1 = ids(&first);
    assert!(
        (40..48).contains(&page1.len()),
        "a page ends once its commands reach 4 MiB: {} of 48",
        page1.len()
    );
    assert!(
        first.text.len() < 4 * 1024 * 1024 + 120 * 1024,
        "{}",
        first.text.len()
    );
    assert_eq!(first.body["next"], json!(page1.last().unwrap()));
    let second = api.get(&format!(
        "/v1/devices/o/commands?after={}",
        page1.last().unwrap()
    ));
    let page2 = ids(&second);
    assert_eq!(second.body["next"], Value::Null, "the last page");
    let all: Vec<String> = page1.iter().chain(&page2).cloned().collect();
    let expected: Vec<String> = (1..=6)
        .flat_map(|seq| (0..8).map(move |i| format!("{seq}.{i}")))
        .collect();
    assert_eq!(all, expected, "every command once, in order");

    let five = api.get("/v1/devices/o/commands?limit=5&after=3.6");
    assert_eq!(ids(&five), ["3.7", "4.0", "4.1", "4.2", "4.3"]);
    // A position, not a command that must be waiting (one acknowledged, say).
    let between = api.get("/v1/devices/o/commands?limit=2&after=3.9");
    assert_eq!(ids(&between), ["4.0", "4.1"]);
    assert_eq!(five.body["next"], "4.3");
    let past = api.get("/v1/devices/o/commands?after=99.0");
    assert_eq!(ids(&past), Vec::<String>::new());
    assert_eq!(past.body["next"], Value::Null);
    api.get("/v1/devices/o/commands?limit=0")
        .assert_error(400, "malformed-query");
    for bad in ["x", "3", "3.", "03.1", "-1.0", "0.0"] {
        let answer = api.get(&format!("/v1/devices/o/commands?after={bad}"));
        answer.assert_error(400, "malformed-query");
        assert!(
            answer.body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("after") && m.contains("<seq>.<index>")),
            "{}",
            answer.text
        );
    }
    api.get("/v1/devices/nobody/commands?after=1.0")
        .assert_error(404, "unknown-device");
    // A long one is not echoed whole.
    let long = api.get(&format!(
        "/v1/devices/o/commands?after={}",
        "7".repeat(20_000)
    ));
    long.assert_error(400, "malformed-query");
    assert!(long.text.len() < 1000, "{}", long.text.len());

    // A long poll after the last command waits for a new one, and answers only it.
    let url = format!(
        "{}/v1/devices/o/commands?after=6.7&wait_ms=20000",
        server.url
    );
    let poll = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let body: Value = reqwest::blocking::get(url).unwrap().json().unwrap();
        (started.elapsed(), body)
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    api.send("o", &json!({"type": "command"}));
    let (took, body) = poll.join().unwrap();
    assert_eq!(body["commands"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body["commands"][0]["id"], "7.0", "{body}");
    assert!(took < std::time::Duration::from_secs(15), "{took:?}");

    // The CLI lists them all, across pages.
    let (ok, out, err) = cli(&["commands", "list", "o", "--server", &server.url]);
    assert!(ok, "{err}");
    let listed: Vec<&str> = out.lines().filter_map(|l| l.split("  ").next()).collect();
    let mut expected = expected;
    expected.push("7.0".to_string());
    assert_eq!(listed, expected);

    // The stream sends them all too, a page at a time, each once.
    let stream = reqwest::blocking::Client::new()
        .get(format!("{}/v1/devices/o/commands/stream", server.url))
        .timeout(std::time::Duration::from_secs(60))
        .send()
        .unwrap();
    let mut streamed = Vec::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stream)) {
        let line = line.unwrap();
        if let Some(id) = line.strip_prefix("id: ") {
            streamed.push(id.to_string());
            if streamed.len() == expected.len() {
                break;
            }
        }
    }
    assert_eq!(streamed, expected);
}

/// A timer's key is the guest's choice of up to 256 bytes: the CLI prints its control
/// characters escaped, so a key cannot forge lines of `drover timers` or `drover journal`, or
/// send the terminal escape sequences.
#[test]
fn timer_keys_cannot_forge_cli_output() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let api = server.api();
    api.provision("k", "misbehave", json!({}));
    let key = "evil\nfake  due 1970  {}\u{1b}[31mRED";
    let arm = json!({"type": "arm", "key": key, "after_ms": 600_000, "event": {"type": "ok"}});
    api.send("k", &arm);
    for args in [["timers", "k"], ["journal", "k"]] {
        let (ok, out, err) = cli(&[args[0], args[1], "--server", &server.url]);
        assert!(ok, "{err}");
        assert!(!out.contains('\u{1b}'), "{out:?}");
        assert!(
            out.lines().all(|l| !l.starts_with("fake")),
            "a forged line: {out}"
        );
        assert!(out.contains("evil\\nfake"), "{out}");
    }
}

/// `drover timers` on a quarantined device says why a timer past its due time has not
/// fired: firings wait for the quarantine to end. The listing alone showed a due time in the
/// past, which reads as a lost timer.
#[test]
fn timers_of_a_quarantined_device_say_why_they_wait() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let api = server.api();
    api.provision("q", "misbehave", json!({}));
    let arm = json!({"type": "arm", "key": "later", "after_ms": 300, "event": {"type": "ok"}});
    api.send("q", &arm);
    let (ok, out, err) = cli(&["timers", "q", "--server", &server.url]);
    assert!(ok, "{err}");
    assert!(out.starts_with("\"later\"  due "), "{out}");
    assert!(
        !out.contains("quarantined"),
        "not due yet, not quarantined: {out}"
    );

    for _ in 0..3 {
        api.post("/v1/devices/q/events", &json!({"type": "panic"}))
            .assert_error(422, "trap");
    }
    // Past its due time, inside the quarantine (5 s, less a quarter at most).
    std::thread::sleep(std::time::Duration::from_millis(600));
    let (ok, out, err) = cli(&["timers", "q", "--server", &server.url]);
    assert!(ok, "{err}");
    assert!(out.starts_with("\"later\"  due "), "{out}");
    assert!(
        out.contains("quarantined for") && out.contains("`drover resume q`"),
        "{out}"
    );
    assert!(out.contains("fire after it ends"), "{out}");

    // Resumed, the timer fires and the listing is empty.
    let (ok, out, err) = cli(&["resume", "q", "--server", &server.url]);
    assert!(ok, "{err}");
    assert!(out.contains("(quarantine lifted)"), "{out}");
    support::poll_until(std::time::Duration::from_secs(20), "the firing", || {
        let (_, out, _) = cli(&["timers", "q", "--server", &server.url]);
        out.contains("no timers").then_some(())
    });

    // A device not quarantined yet has its failures in a row forgotten too, and says so:
    // resumed after two, it was quarantined by the next one (a review).
    for _ in 0..2 {
        api.post("/v1/devices/q/events", &json!({"type": "panic"}))
            .assert_error(422, "trap");
    }
    let resumed = api.post("/v1/devices/q/resume", &json!({}));
    assert_eq!(
        resumed.body["was_quarantined"],
        json!(false),
        "{}",
        resumed.text
    );
    assert_eq!(
        resumed.body["failures_forgotten"],
        json!(2),
        "{}",
        resumed.text
    );
    api.post("/v1/devices/q/events", &json!({"type": "panic"}))
        .assert_error(422, "trap");
    assert_ne!(
        api.get("/v1/devices/q").body["status"],
        json!("quarantined"),
        "one failure after the resume"
    );
    let (ok, out, err) = cli(&["resume", "q", "--server", &server.url]);
    assert!(ok, "{err}");
    assert!(
        out.contains("was not quarantined; its 1 failure is forgotten"),
        "{out}"
    );
    let (ok, out, err) = cli(&["resume", "q", "--server", &server.url]);
    assert!(ok, "{err}");
    assert!(out.contains("nothing to do"), "{out}");
}

/// Logging can never take down the server: with stderr on a full disk (`/dev/full`) it
/// starts, provisions, handles events and answers reads (it used to panic at start-up).
#[test]
fn a_server_whose_stderr_is_a_full_disk_keeps_serving() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let mut child = std::process::Command::new(support::BIN)
        .arg("serve")
        .arg("--data")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--plugins"])
        .arg(support::plugin_dir())
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(full)
        .spawn()
        .expect("spawning drover serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("listening line");
    let url = line
        .trim()
        .strip_prefix("drover listening on ")
        .unwrap_or_else(|| panic!("no listening line: {line:?}"))
        .to_string();
    let api = Api::new(&url);
    api.provision("full", "misbehave", json!({}));
    for seq in 1..=3 {
        let ack = api.send(
            "full",
            &json!({"type": "log", "message": "to a full disk", "level": "error"}),
        );
        assert_eq!(ack["seq"], json!(seq));
    }
    assert_eq!(api.send("full", &json!({"type": "ok"}))["seq"], 4);
    let device = api.get("/v1/devices/full");
    assert_eq!(device.status, 200, "{}", device.text);
    assert_eq!(api.get("/healthz").status, 200);
    let _ = child.kill();
    let _ = child.wait();
}

/// Nor can its stdout: on a full disk, or a pipe whose reader is gone, the listening line is
/// lost (and logged) and the server serves all the same (it used to exit at once, code 1,
/// "writing to stdout").
#[test]
fn a_server_whose_stdout_cannot_be_written_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    for (case, stdout) in [
        (
            "full disk",
            std::process::Stdio::from(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open("/dev/full")
                    .expect("/dev/full"),
            ),
        ),
        ("closed pipe", std::process::Stdio::piped()),
    ] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut child = std::process::Command::new(support::BIN)
            .arg("serve")
            .arg("--data")
            .arg(dir.path().join(case.replace(' ', "-")))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--plugins"])
            .arg(support::plugin_dir())
            .stdout(stdout)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawning drover serve");
        // The reader goes away before the server writes its line.
        drop(child.stdout.take());
        let api = Api::new(&format!("http://127.0.0.1:{port}"));
        let up = (0..200).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(
                child.try_wait().expect("status").is_none(),
                "{case}: the server exited"
            );
            api.try_call(reqwest::Method::GET, "/healthz", None)
                .is_ok_and(|r| r.status == 200)
        });
        assert!(up, "{case}: never served");
        api.provision("out", "misbehave", json!({}));
        assert_eq!(api.send("out", &json!({"type": "ok"}))["seq"], 1, "{case}");
        assert!(
            child.try_wait().expect("status").is_none(),
            "{case}: exited"
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// `/readyz` says whether events sent now can be made durable; `/healthz` only that the
/// process answers. With less free space on the data directory's filesystem than the
/// threshold (here one no disk has), the server is not ready (`disk-low`, with `Retry-After`)
/// while it still serves every request. (A review filled a tmpfs: `/healthz` said ok and
/// nothing but the metrics told a load balancer that every event would fail.)
#[test]
fn readiness_says_when_the_disk_is_too_full_to_take_events() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]);
    let ready = server.api().get("/readyz");
    assert_eq!(ready.status, 200, "{}", ready.text);
    assert_eq!(ready.body, json!({"status": "ready", "reasons": []}));
    drop(server);

    let server = Server::start(&data, &["--ready-min-free-bytes", &u64::MAX.to_string()]);
    let api = server.api();
    let not = api.get("/readyz");
    assert_eq!(not.status, 503, "{}", not.text);
    assert_eq!(not.body["status"], "not-ready", "{}", not.text);
    let reasons = not.body["reasons"].as_array().expect("reasons");
    assert_eq!(reasons.len(), 1, "{}", not.text);
    assert_eq!(reasons[0]["code"], "disk-low", "{}", not.text);
    let message = reasons[0]["message"].as_str().expect("message");
    assert!(
        message.contains(&data.display().to_string()) && message.contains("bytes free"),
        "says where and how much: {message}"
    );
    assert_eq!(
        not.headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert_eq!(api.get("/healthz").status, 200, "alive all the same");
    api.provision("t", "thermostat", json!({}));
    assert_eq!(
        api.send("t", &reading(20.0))["seq"],
        1,
        "advice, not a refusal"
    );
    let metrics = api.get("/metrics").text;
    assert!(
        metrics.contains(r#"route="/readyz""#),
        "counted under its route"
    );
}

/// A client command whose body the server refuses before reading it (a component over the
/// upload limit) says why and exits 1. The server answers and closes the connection
/// mid-upload, and the client's next write raised SIGPIPE, which one-shot commands do not
/// ignore: it died silently with status 141. A bad plugin name is now refused before the
/// upload.
#[test]
fn an_upload_the_server_refuses_before_reading_it_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let url = server.url.as_str();
    // Far more than the socket buffers take before the server has answered.
    let big = dir.path().join("big.wasm");
    std::fs::write(&big, vec![0u8; 8 << 20]).expect("big file");
    let big = big.to_str().expect("utf-8 path");
    let (ok, out, err) = cli(&["plugin", "push", "bad/name", big, "--server", url]);
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("invalid-id"), "says why: {err}");
    let huge = dir.path().join("huge.wasm");
    std::fs::write(&huge, vec![0u8; (64 << 20) + 1]).expect("huge file");
    let huge = huge.to_str().expect("utf-8 path");
    let out = std::process::Command::new(support::BIN)
        .args(["plugin", "push", "huge", huge, "--server", url])
        .output()
        .expect("running drover");
    assert_eq!(out.status.code(), Some(1), "{:?}", out.status);
    // Either the server's answer, when the client read it before its write failed, or what
    // the closed connection means (the answer is lost with it).
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("payload-too-large, HTTP 413")
            || err.contains("refused the request without reading it"),
        "says why: {err}"
    );
}

/// A client command pointed at something that is not a Drover server says so, instead of
/// printing the other server's page whole (or nothing, for an empty body); a server address
/// without its scheme is refused saying what to add.
#[test]
fn a_client_pointed_at_another_server_says_so() {
    for (status, body) in [
        ("404 Not Found", ""),
        (
            "404 Not Found",
            "<!DOCTYPE HTML>\n<html><body>\n<h1>Not Found</h1></body></html>",
        ),
        ("200 OK", "<html>hi</html>"),
    ] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let other = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut head = [0u8; 4096];
            let _ = std::io::Read::read(&mut conn, &mut head);
            std::io::Write::write_all(&mut conn, answer.as_bytes()).expect("answer");
        });
        let (ok, _, err) = cli(&["state", "hall", "--server", &url]);
        other.join().expect("other server");
        assert!(!ok, "{err}");
        assert!(err.contains("is a Drover server at that address"), "{err}");
        assert!(
            !err.contains('\n') || err.trim_end().lines().count() == 1,
            "one line: {err}"
        );
    }
    let (ok, _, err) = cli(&["state", "hall", "--server", "127.0.0.1:9"]);
    assert!(!ok && err.contains("http://127.0.0.1:9"), "{err}");
}

/// Connections refused over the cap are logged at most once a second, with their count: a
/// client opening connections in a loop cannot flood the log (it wrote one line each).
#[test]
fn refused_connections_do_not_flood_the_log() {
    use std::io::{Read as _, Write as _};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &["--max-connections", "2"]);
    let addr = server.addr.clone();
    let held: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
        .collect();
    // Each is accepted before the next is refused.
    std::thread::sleep(std::time::Duration::from_millis(200));
    for _ in 0..50 {
        let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
        // Not a probe: those are answered past the cap.
        let _ = conn.write_all(b"GET /v1/devices HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut answer = String::new();
        let _ = conn.read_to_string(&mut answer);
        assert!(answer.contains("too-many-connections"), "{answer}");
    }
    drop(held);
    let log = server.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("too many open connections"))
        .count();
    assert!(
        (1..=3).contains(&lines),
        "{lines} lines for 50 refusals:\n{log}"
    );
}

/// `drover serve` checks its address and its data directory before it touches anything: a
/// port in use fails without creating the data directory, and a `--data` that is a file
/// says so.
#[test]
fn serve_refuses_a_bad_address_or_data_path_before_creating_anything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let data = dir.path().join("data");
    let (ok, _, err) = cli(&[
        "serve",
        "--listen",
        &addr,
        "--data",
        data.to_str().expect("utf-8"),
    ]);
    assert!(!ok);
    assert!(err.contains(&format!("binding {addr}")), "{err}");
    assert!(!data.exists(), "the data directory was created");

    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").expect("file");
    let (ok, _, err) = cli(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data",
        file.to_str().expect("utf-8"),
    ]);
    assert!(!ok);
    assert!(err.contains("is a file, not a directory"), "{err}");

    // A batch limit of 0 refused every batch; one of 100,000,000 allowed ~95 GiB bodies.
    for n in ["0", "100000000"] {
        let (ok, _, err) = cli(&[
            "serve",
            "--max-batch-items",
            n,
            "--data",
            data.to_str().expect("utf-8"),
        ]);
        assert!(!ok, "--max-batch-items {n}");
        assert!(err.contains("1..=1000000"), "{err}");
        assert!(!data.exists(), "the data directory was created");
    }
    // 0 was taken as 1; past the bounds a worker or the start panicked.
    for (flag, n, range) in [
        ("--header-read-timeout-secs", "0", "1..=86400"),
        (
            "--header-read-timeout-secs",
            "18446744073709551615",
            "1..=86400",
        ),
        ("--body-read-timeout-secs", "0", "1..=86400"),
        ("--write-timeout-secs", "0", "1..=86400"),
        ("--drain-timeout-secs", "86401", "0..=86400"),
        ("--max-connections", "0", "1..=1000000"),
        ("--max-connections", "18446744073709551615", "1..=1000000"),
        ("--mailbox", "2305843009213693952", "1..=1000000"),
        ("--call-timeout-ms", "18446744073709551615", "10..=3600000"),
        ("--activation-timeout-ms", "0", "10..=3600000"),
        ("--max-plugin-bytes", "0", "1..=1073741824"),
        ("--max-guest-memory", "0", "65536..=4294967296"),
        ("--commit-delay-us", "18446744073709551615", "0..=100000"),
    ] {
        let (ok, _, err) = cli(&["serve", flag, n, "--data", data.to_str().expect("utf-8")]);
        assert!(!ok, "{flag} {n}");
        assert!(err.contains(range), "{flag} {n}: {err}");
        assert!(!data.exists(), "the data directory was created");
    }
    // Settings only the runtime checks are the flags' fault too, said before the directory
    // is looked at (they read "opening DIR: invalid runtime settings").
    let (ok, _, err) = cli(&[
        "serve",
        "--journal-segment-bytes",
        "0",
        "--data",
        data.to_str().expect("utf-8"),
    ]);
    assert!(!ok);
    assert!(
        err.contains("invalid settings: journal segment bytes (--journal-segment-bytes)")
            && !err.contains("opening"),
        "{err}"
    );
    assert!(!data.exists(), "the data directory was created");
}

/// A simulator whose server answers nothing (here: nothing listens) stops after a few
/// seconds with a clear reason and a failing exit code, instead of counting failures to the
/// end of its run.
#[test]
fn the_simulator_stops_when_the_server_answers_nothing() {
    // Kept bound (no other test's server can take the port), closing every connection
    // unanswered.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    let started = std::time::Instant::now();
    let (ok, out, err) = cli(&[
        "sim",
        "--server",
        &format!("http://127.0.0.1:{port}"),
        "--no-provision",
        "--duration",
        "120",
        "--quiet",
    ]);
    assert!(!ok, "{out}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "ran {:?}",
        started.elapsed()
    );
    assert!(
        out.contains("stopped early") || err.contains("stopped early"),
        "{out}{err}"
    );
}

/// Ctrl-C ends a simulation with its summary, as load tools do, in `drover sim` (exit 130)
/// and in `drover demo`, which then stops instead of serving on. `sim` printed nothing, and
/// `demo` ignored the Ctrl-C until its simulation had run its course, then served on.
#[test]
fn a_simulation_interrupted_by_ctrl_c_reports_what_it_did() {
    let wait = |child: &mut std::process::Child, what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what} runs on after Ctrl-C"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let interrupt = |child: &std::process::Child| {
        // SAFETY: kill(2) of our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let mut sim = support::Reaped(
        std::process::Command::new(support::BIN)
            .args(["sim", "--server", &server.url, "--devices", "5"])
            .args([
                "--duration",
                "120",
                "--concurrency",
                "2",
                "--quiet",
                "--json",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    support::poll_until(
        std::time::Duration::from_secs(30),
        "acknowledged events",
        || (server.journal_len() > 0).then_some(()),
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    interrupt(&sim);
    let status = wait(&mut sim, "drover sim");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut sim.stdout.take().unwrap(), &mut out).unwrap();
    assert_eq!(status.code(), Some(130), "{out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["stopped_early"], "interrupted", "{summary}");
    assert!(summary["events_ok"].as_u64().unwrap() > 0, "{summary}");
    assert!(
        summary["elapsed_secs"].as_f64().unwrap() < 60.0,
        "{summary}"
    );
    drop(server);

    let mut demo = support::Reaped(
        std::process::Command::new(support::BIN)
            .args(["demo", "--listen", "127.0.0.1:0", "--devices", "4"])
            .args([
                "--duration",
                "120",
                "--concurrency",
                "2",
                "--quiet",
                "--data",
            ])
            .arg(dir.path().join("demo"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(demo.stdout.take().unwrap()));
    for line in lines.by_ref() {
        if line.unwrap().starts_with("simulating") {
            break;
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    interrupt(&demo);
    let status = wait(&mut demo, "drover demo");
    let printed: Vec<String> = lines.map(Result::unwrap).collect();
    assert!(status.success(), "{status}: {printed:?}");
    assert!(
        printed
            .iter()
            .any(|l| l.contains("stopped early: interrupted")),
        "{printed:?}"
    );
    assert!(
        !printed.iter().any(|l| l.starts_with("serving on")),
        "{printed:?}"
    );
}

/// Every command `drover demo` prints for looking around works on the fleet it just ran, run
/// as printed: each `curl` answers 200 and each `drover` command succeeds. A door-lock
/// fleet was once told to send thermostat readings (422), and a custom event template holds
/// what a shell would take apart unless it is quoted.
#[test]
fn the_commands_demo_prints_work_for_every_fleet() {
    let custom = r#"{"type":"report","device":"it's t-1","celsius":"{{float:18:24}}","heating":false,"online":true}"#;
    let fleets: [&[&str]; 3] = [
        &[],
        // Ids that start with `-` are not taken for options.
        &["--plugin", "door-lock", "--prefix=-"],
        &["--plugin", "room", "--event", custom],
    ];
    for fleet in fleets {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut demo = support::Reaped(
            std::process::Command::new(support::BIN)
                .args(["demo", "--listen", "127.0.0.1:0", "--devices", "4"])
                .args(["--duration", "1", "--concurrency", "2", "--quiet", "--data"])
                .arg(&data)
                .args(fleet)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let stdout = std::io::BufReader::new(demo.stdout.take().unwrap());
        let mut printed = Vec::new();
        for line in std::io::BufRead::lines(stdout) {
            let line = line.unwrap();
            let serving = line.starts_with("serving on");
            printed.push(line);
            if serving {
                break;
            }
        }
        assert!(
            printed.iter().any(|l| l.starts_with("serving on")),
            "{fleet:?}: {printed:?}"
        );
        let client = reqwest::blocking::Client::new();
        let (mut curls, mut sends) = (0, 0);
        // The directions are the indented lines.
        for line in printed.iter().filter(|l| l.starts_with("  ")) {
            let Some(words) = shlex::split(line.trim()) else {
                continue;
            };
            // A pipe into grep ends the command.
            let words: Vec<&str> = words
                .iter()
                .map(String::as_str)
                .take_while(|w| *w != "|")
                .collect();
            match words.first() {
                Some(&"curl") => {
                    let url = words.iter().find(|w| w.starts_with("http://")).unwrap();
                    let body = words.iter().position(|w| *w == "-d").map(|i| words[i + 1]);
                    let answer = match body {
                        Some(body) => client.post(*url).body(body.to_string()).send(),
                        None => client.get(*url).send(),
                    }
                    .unwrap();
                    let status = answer.status();
                    assert_eq!(status, 200, "{fleet:?}: {line}: {}", answer.text().unwrap());
                    curls += 1;
                }
                Some(&"drover") => {
                    let (ok, out, err) = cli(&words[1..]);
                    assert!(ok, "{fleet:?}: {line}: {out}{err}");
                    sends += usize::from(words.get(1) == Some(&"send"));
                }
                _ => {}
            }
        }
        assert!(curls >= 4 && sends >= 1, "{fleet:?}: {printed:?}");
        // Ctrl-C stops it gracefully.
        unsafe { libc::kill(demo.id() as i32, libc::SIGINT) };
        assert!(demo.wait().unwrap().success(), "{fleet:?}");
    }
}

/// A `--max-connections` past what the open-files limit leaves room for refuses the start,
/// before the data directory is opened: it was kept with a warning, and a flood of idle
/// connections then left the server answering nothing, `/healthz` included (a review held
/// 20,400 with `--max-connections 1000000` under a limit of 20,000).
#[test]
fn a_connection_cap_the_open_files_limit_cannot_hold_refuses_the_start() {
    use std::os::unix::process::CommandExt as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut serve = std::process::Command::new(support::BIN);
    serve.arg("serve").arg("--data").arg(&data).args([
        "--listen",
        "127.0.0.1:0",
        "--max-connections",
        "5000",
    ]);
    // SAFETY: setrlimit(2) only, in the child between fork and exec.
    unsafe {
        serve.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 2048,
                rlim_max: 2048,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let out = serve.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--max-connections 5000 does not fit the open-files limit of 2048")
            && err.contains("room for 1023 connections"),
        "{err}"
    );
    assert!(!data.exists(), "nothing was opened");
}
