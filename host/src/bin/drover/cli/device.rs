//! Device commands: `send`, `state`, `journal`, `provision`, `devices`.

use std::io::Read as _;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::client::{ApiClient, ClientOpts, query_value, segment};
use super::format::{one_line, pretty, quoted, timestamp};

/// `drover send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The device id.
    pub device: String,
    /// The event, a JSON value (`-` reads it from stdin).
    // A negative number is a JSON value too (`drover send t1 -5`), not a flag.
    #[arg(allow_negative_numbers = true)]
    pub event: String,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// An event's acknowledgement.
#[derive(Debug, Deserialize)]
struct Ack {
    seq: u64,
    at: u64,
    /// Raw, so they print exactly as the plugin wrote them.
    transitions: Vec<Box<RawValue>>,
}

/// Sends one event and prints the acknowledgement.
pub fn send(args: SendArgs) -> anyhow::Result<ExitCode> {
    let api = ApiClient::new(&args.client)?;
    let event = if args.event == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the event from stdin")?;
        s
    } else {
        args.event
    };
    let path = format!("/v1/devices/{}/events", segment(&args.device)?);
    let (text, ack): (String, Ack) = api.call_json(
        api.post(&path)
            .header("content-type", "application/json")
            .body(event),
    )?;
    if args.client.json {
        println!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let n = ack.transitions.len();
    println!(
        "{} seq {} at {}: {n} transition{}",
        args.device,
        ack.seq,
        timestamp(ack.at),
        if n == 1 { "" } else { "s" }
    );
    for t in &ack.transitions {
        println!("  {}", t.get());
    }
    Ok(ExitCode::SUCCESS)
}

/// `drover state`.
#[derive(Debug, Args)]
pub struct StateArgs {
    /// The device id.
    pub device: String,
    /// Show the state right after this seq (0: right after provisioning) instead of now.
    #[arg(long)]
    pub at: Option<u64>,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// `GET /v1/devices/{id}`.
#[derive(Debug, Deserialize)]
struct DeviceOut {
    id: String,
    plugin: String,
    version: u32,
    seq: u64,
    status: String,
    state: Value,
    /// `{"to", "failed"}` when behind its plugin's current version (absent from older
    /// servers).
    #[serde(default)]
    upgrade: Option<Upgrade>,
    /// While quarantined (absent from older servers).
    #[serde(default)]
    quarantine: Option<Quarantine>,
}

/// `{"failures","last_error","ends_in_ms"}`.
#[derive(Debug, Deserialize)]
struct Quarantine {
    failures: u32,
    last_error: String,
    ends_in_ms: u64,
}

#[derive(Debug, Deserialize)]
struct Upgrade {
    to: u32,
    failed: bool,
}

/// `{"seq","state"}`.
#[derive(Debug, Deserialize)]
struct StateOut {
    seq: u64,
    state: Value,
}

/// Prints a device's state.
pub fn state(args: StateArgs) -> anyhow::Result<ExitCode> {
    let api = ApiClient::new(&args.client)?;
    let id = segment(&args.device)?;
    match args.at {
        Some(at) => {
            let (text, out): (String, StateOut) =
                api.call_json(api.get(&format!("/v1/devices/{id}/state?at={at}")))?;
            if args.client.json {
                println!("{text}");
            } else {
                println!("{} at seq {}", args.device, out.seq);
                println!("{}", pretty(&out.state, ""));
            }
        }
        None => {
            let (text, out): (String, DeviceOut) =
                api.call_json(api.get(&format!("/v1/devices/{id}")))?;
            if args.client.json {
                println!("{text}");
            } else {
                let behind = match out.upgrade {
                    Some(Upgrade { to, failed: false }) => {
                        format!("  (headed for v{to}, the current version)")
                    }
                    Some(Upgrade { to, failed: true }) => {
                        format!(
                            "  (stays: v{to}, the current version, could not bring it up, or \
                             was given up after failing slowly on other devices)"
                        )
                    }
                    None => String::new(),
                };
                println!(
                    "{}  {} v{}  seq {}  {}{behind}",
                    out.id, out.plugin, out.version, out.seq, out.status
                );
                if let Some(q) = out.quarantine {
                    println!(
                        "quarantined after {} failures in a row, for {:.1} s more (`drover resume {}` ends it now); last: {}",
                        q.failures,
                        q.ends_in_ms as f64 / 1000.0,
                        out.id,
                        q.last_error
                    );
                }
                println!("{}", pretty(&out.state, ""));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `drover journal`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct JournalArgs {
    #[command(subcommand)]
    pub action: Option<super::history::JournalAction>,
    /// The device id.
    #[arg(required = true)]
    pub device: Option<String>,
    /// First seq to show [default: the oldest kept: 1 unless the journal's retention
    /// deleted history]
    #[arg(long)]
    pub from: Option<u64>,
    /// Records per page (the server caps it).
    #[arg(long, default_value_t = 100, value_parser = page_size)]
    pub limit: usize,
    /// Follow the pages to the end of the journal instead of stopping after one.
    #[arg(long)]
    pub all: bool,
    // `ClientOpts` by hand rather than flattened: its flags are global, and `journal
    // export|import` work on data directories, so they must not offer `--server`/`--json`.
    /// Base URL of the server.
    #[arg(long, env = "DROVER_SERVER", default_value = "http://127.0.0.1:7070")]
    pub server: String,
    /// Print the server's JSON answer as is instead of readable text (with `--all`, JSON
    /// lines: one record each).
    #[arg(long)]
    pub json: bool,
}

/// A page size as given: digits, any number of them; one past `usize` is `usize::MAX`, which
/// the server caps like any large one (clap's own parser refused it as "too large" though
/// `--help` says the server caps it).
fn page_size(text: &str) -> Result<usize, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{text}` is not a whole number"));
    }
    Ok(text.parse().unwrap_or(usize::MAX))
}

/// One journal record.
#[derive(Debug, Deserialize)]
struct RecordOut {
    seq: u64,
    at: u64,
    event: Box<RawValue>,
    transitions: Vec<Box<RawValue>>,
    plugin: String,
    version: u32,
    /// A seq whose record was destroyed by media damage and salvaged away.
    #[serde(default)]
    lost: bool,
    /// A message or timer firing: where the event came from.
    #[serde(default)]
    origin: Option<Value>,
    /// What the event asked for besides transitions.
    #[serde(default)]
    effects: Vec<Value>,
}

/// One line for a record's origin, as `drover journal` prints it.
fn origin_line(o: &Value) -> String {
    match o["type"].as_str() {
        Some("message") => format!(
            "message from {} (its #{}, effect {})",
            o["sender"].as_str().unwrap_or("?"),
            o["id"]["seq"],
            o["id"]["index"]
        ),
        Some("timer") => {
            let missed = o["missed"].as_u64().unwrap_or(0);
            let missed = if missed > 0 {
                format!(", {missed} periods missed")
            } else {
                String::new()
            };
            format!(
                "timer {} due {}{missed}",
                quoted(o["key"].as_str().unwrap_or("?")),
                timestamp(o["due_ms"].as_u64().unwrap_or(0))
            )
        }
        _ => o.to_string(),
    }
}

/// One line for an effect, as `drover journal` prints it.
fn effect_line(e: &Value) -> String {
    let text = |v: &Value| one_line(v.as_str().unwrap_or(""));
    match e["type"].as_str() {
        Some("send") => format!("send to {}: {}", text(&e["to"]), text(&e["event"])),
        Some("command") => format!("command: {}", text(&e["payload"])),
        Some("set_timer") => {
            let every = e["every_ms"]
                .as_u64()
                .map(|p| format!(" every {p} ms"))
                .unwrap_or_default();
            format!(
                "timer {} at {}{every}: {}",
                quoted(e["key"].as_str().unwrap_or("")),
                timestamp(e["due_ms"].as_u64().unwrap_or(0)),
                text(&e["event"])
            )
        }
        Some("cancel_timer") => format!("cancel timer {}", quoted(e["key"].as_str().unwrap_or(""))),
        _ => e.to_string(),
    }
}

/// One page.
#[derive(Debug, Deserialize)]
struct PageOut {
    records: Vec<RecordOut>,
    next: Option<u64>,
}

/// Prints a device's journal.
pub fn journal(args: JournalArgs) -> anyhow::Result<ExitCode> {
    if let Some(action) = args.action {
        return super::history::run(action);
    }
    let device = args.device.unwrap_or_default();
    let api = ApiClient::new(&ClientOpts {
        server: args.server.clone(),
        json: args.json,
    })?;
    let id = segment(&device)?;
    let mut from = args.from;
    let mut first_page = true;
    let mut read_again = false;
    loop {
        let start = from.map(|f| format!("from={f}&")).unwrap_or_default();
        let (text, page): (String, PageOut) = api.call_json(api.get(&format!(
            "/v1/devices/{id}/journal?{start}limit={}",
            args.limit
        )))?;
        if args.json && args.all {
            // Every page: JSON lines, one record each (a document per page did not parse as
            // one).
            for r in raw_items(&text, "records")? {
                println!("{r}");
            }
        } else if args.json {
            println!("{text}");
        } else if let Some(from) = args.from.filter(|_| first_page && page.records.is_empty()) {
            println!("{device}: no records from seq {from}");
        } else if first_page && page.records.is_empty() {
            // Nothing at all: a new device, or one whose whole history retention deleted.
            let (_, summary): (String, Value) =
                api.call_json(api.get(&format!("/v1/devices/{id}")))?;
            match summary["seq"].as_u64().unwrap_or(0) {
                0 => println!("{device}: no records yet"),
                // Its first records may have come in between the two reads.
                _ if !read_again => {
                    read_again = true;
                    continue;
                }
                seq => println!(
                    "{device}: no records kept: journal retention deleted its history up to seq \
                     {seq} (its state lives on in its latest snapshot)"
                ),
            }
        } else {
            for r in &page.records {
                if r.lost {
                    println!(
                        "#{:<6} lost: its record was destroyed by media damage (salvaged {})",
                        r.seq,
                        timestamp(r.at)
                    );
                    continue;
                }
                println!(
                    "#{:<6} {}  {} v{}  {}",
                    r.seq,
                    timestamp(r.at),
                    r.plugin,
                    r.version,
                    r.event.get()
                );
                if let Some(origin) = &r.origin {
                    println!("          <- {}", origin_line(origin));
                }
                for t in &r.transitions {
                    println!("          -> {}", t.get());
                }
                for e in &r.effects {
                    println!("          => {}", effect_line(e));
                }
            }
        }
        first_page = false;
        match page.next {
            Some(next) if args.all => from = Some(next),
            Some(next) => {
                if !args.json {
                    println!("(more: --from {next}, or --all)");
                }
                break;
            }
            None => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `drover provision`.
#[derive(Debug, Args)]
pub struct ProvisionArgs {
    /// The new device's id.
    pub device: String,
    /// The plugin (device type) it runs.
    #[arg(long)]
    pub plugin: String,
    /// Its configuration, a JSON object.
    #[arg(long, default_value = "{}")]
    pub config: String,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// The stored device.
#[derive(Debug, Deserialize)]
struct Provisioned {
    id: String,
    plugin: String,
    version: u32,
    seq: u64,
}

/// Creates a device.
pub fn provision(args: ProvisionArgs) -> anyhow::Result<ExitCode> {
    let api = ApiClient::new(&args.client)?;
    let config: Value = serde_json::from_str(&args.config)
        .with_context(|| format!("--config is not JSON: {}", args.config))?;
    let body = serde_json::json!({"plugin": args.plugin, "config": config});
    let req = api
        .put(&format!("/v1/devices/{}", segment(&args.device)?))
        .json(&body);
    let (status, text) = api.call(req)?;
    if args.client.json {
        println!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let d: Provisioned =
        serde_json::from_str(&text).with_context(|| format!("unexpected answer: {text}"))?;
    if status == 201 {
        println!("created {} ({} v{})", d.id, d.plugin, d.version);
    } else {
        println!(
            "{} already exists ({} v{}, seq {}): unchanged",
            d.id, d.plugin, d.version, d.seq
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `drover devices`.
#[derive(Debug, Args)]
pub struct DevicesArgs {
    /// Only the ids, one per line (for scripts).
    #[arg(long)]
    pub ids: bool,
    /// Only the devices quarantined now, each with its last failure and how long it has
    /// left (`drover resume ID` ends one now).
    #[arg(long)]
    pub quarantined: bool,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// A page of devices.
#[derive(Debug, Deserialize)]
struct DeviceList {
    devices: Vec<DeviceLine>,
    next: Option<String>,
}

/// One device of a detailed listing.
#[derive(Debug, Deserialize)]
struct DeviceLine {
    id: String,
    plugin: String,
    version: u32,
    seq: u64,
    status: String,
    #[serde(default)]
    upgrade: Option<Upgrade>,
    /// While quarantined (absent from older servers).
    #[serde(default)]
    quarantine: Option<Quarantine>,
}

impl Quarantine {
    /// The quarantined listing's last column: how many failures, how long left, the last.
    fn column(&self) -> String {
        format!(
            "{} failures, {:.0} s left: {}",
            self.failures,
            (self.ends_in_ms as f64 / 1000.0).ceil(),
            self.last_error
        )
    }
}

impl Upgrade {
    /// The listing's last column: `-> vN`, with `(failed)` when nothing will move it.
    fn column(&self) -> String {
        if self.failed {
            format!("-> v{} (failed)", self.to)
        } else {
            format!("-> v{}", self.to)
        }
    }
}

/// Lists every device: id, plugin and version, status, seq (a page of requests at a time;
/// no device is woken to be listed).
pub fn devices(args: DevicesArgs) -> anyhow::Result<ExitCode> {
    let api = ApiClient::new(&args.client)?;
    let mut after: Option<String> = None;
    let mut header = !args.ids && !args.client.json;
    loop {
        let filter = if args.quarantined {
            "&status=quarantined"
        } else {
            ""
        };
        let path = match &after {
            Some(a) => format!("/v1/devices?detail=true{filter}&after={}", query_value(a)),
            None => format!("/v1/devices?detail=true{filter}"),
        };
        let (text, page): (String, DeviceList) = api.call_json(api.get(&path))?;
        if args.client.json {
            // JSON lines, one per device whatever the paging (a document per page did not
            // parse as one): each device as the server lists it, or with `--ids` its id.
            for d in raw_items(&text, "devices")? {
                if args.ids {
                    let d: Value = serde_json::from_str(d.get())?;
                    println!("{}", d["id"]);
                } else {
                    println!("{d}");
                }
            }
        } else {
            let width = page
                .devices
                .iter()
                .map(|d| d.id.len())
                .max()
                .unwrap_or(2)
                .max(2);
            if header {
                let last = if args.quarantined {
                    "QUARANTINE"
                } else {
                    "UPGRADE"
                };
                println!(
                    "{:<width$}  {:<20} {:<11} {:>10}  {last}",
                    "ID", "PLUGIN", "STATUS", "SEQ"
                );
                header = false;
            }
            for d in &page.devices {
                if args.ids {
                    println!("{}", d.id);
                } else {
                    let plugin = format!("{} v{}", d.plugin, d.version);
                    let last = if args.quarantined {
                        d.quarantine.as_ref().map(Quarantine::column)
                    } else {
                        d.upgrade.as_ref().map(Upgrade::column)
                    };
                    println!(
                        "{:<width$}  {plugin:<20} {:<11} {:>10}  {}",
                        d.id,
                        d.status,
                        d.seq,
                        last.unwrap_or_default()
                    );
                }
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The items of the array `field` of a JSON answer, each as the server wrote it: through a
/// `Value` an object's keys came out sorted, so a recorded event sent as
/// `{"type":"reading","celsius":19.5}` was printed as `{"celsius":19.5,"type":"reading"}`,
/// not the raw answer `--json` promises.
fn raw_items<'a>(
    text: &'a str,
    field: &str,
) -> anyhow::Result<Vec<&'a serde_json::value::RawValue>> {
    let answer: std::collections::HashMap<String, &serde_json::value::RawValue> =
        serde_json::from_str(text).context("reading the server's answer")?;
    match answer.get(field) {
        Some(items) => Ok(serde_json::from_str(items.get())
            .with_context(|| format!("reading the answer's `{field}`"))?),
        None => Ok(Vec::new()),
    }
}

/// `drover resume`.
#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// The device id.
    pub device: String,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// `{"id","status"}`.
#[derive(Debug, Deserialize)]
struct ResumedOut {
    id: String,
    status: String,
    #[serde(default)]
    was_quarantined: bool,
    #[serde(default)]
    failures_forgotten: u32,
}

/// Ends a device's quarantine now (`POST /v1/devices/{id}/resume`).
pub fn resume(args: ResumeArgs) -> anyhow::Result<ExitCode> {
    let api = ApiClient::new(&args.client)?;
    let id = segment(&args.device)?;
    let (text, out): (String, ResumedOut) =
        api.call_json(api.post(&format!("/v1/devices/{id}/resume")))?;
    if args.client.json {
        println!("{text}");
    } else {
        let what = match (out.was_quarantined, out.failures_forgotten) {
            (true, _) => "quarantine lifted".to_string(),
            (false, 0) => "was not quarantined, and had no failures: nothing to do".to_string(),
            (false, 1) => "was not quarantined; its 1 failure is forgotten".to_string(),
            (false, n) => format!("was not quarantined; its {n} failures in a row are forgotten"),
        };
        println!("{}  {}  ({what})", out.id, out.status);
    }
    Ok(ExitCode::SUCCESS)
}

/// `drover remove`.
#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// The device id.
    pub device: String,
    /// First write the device's history to `DATA/archive/ID.MS.jsonl` on the server: from
    /// the oldest record the journal kept, which is all of it unless retention deleted its
    /// start (the file's header says where it begins, `first_seq`).
    #[arg(long)]
    pub archive: bool,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// Removes a device (`DELETE /v1/devices/{id}`).
pub fn remove(args: RemoveArgs) -> anyhow::Result<ExitCode> {
    let api = ApiClient::new(&args.client)?;
    let id = segment(&args.device)?;
    let path = if args.archive {
        format!("/v1/devices/{id}?archive=true")
    } else {
        format!("/v1/devices/{id}")
    };
    let (text, out): (String, serde_json::Value) = api.call_json(api.delete(&path))?;
    if args.client.json {
        println!("{text}");
    } else {
        match out["archive"].as_str() {
            Some(archive) => println!(
                "removed {} at seq {}; its history, from the oldest record the journal kept \
                 (`first_seq` in the file's header), is archived in {archive} on the server",
                args.device, out["seq"]
            ),
            None => println!("removed {} at seq {}", args.device, out["seq"]),
        }
        let c = &out["cancelled"];
        let count = |k: &str| c[k].as_u64().unwrap_or(0);
        if count("messages") + count("commands") + count("timers") > 0 {
            println!(
                "cancelled with it: {} message(s) its targets had not handled, {} command(s) \
                 not acknowledged, {} timer(s) pending",
                count("messages"),
                count("commands"),
                count("timers")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `drover dead-letters`.
#[derive(Debug, Args)]
pub struct DeadLettersArgs {
    /// The device id.
    pub device: String,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// `{"dead_letters":[...],"retained_away":n}`.
#[derive(Debug, Deserialize)]
struct DeadLettersOut {
    dead_letters: Vec<DeadLetterOut>,
    /// Absent from servers before it was added.
    #[serde(default)]
    retained_away: usize,
}

#[derive(Debug, Deserialize)]
struct DeadLetterOut {
    after_seq: u64,
    at_ms: u64,
    plugin: String,
    version: u32,
    code: String,
    message: String,
    event: Value,
}

/// Lists the events a device's plugin failed on (`GET /v1/devices/{id}/dead-letters`).
pub fn dead_letters(args: DeadLettersArgs) -> anyhow::Result<ExitCode> {
    let api = ApiClient::new(&args.client)?;
    let id = segment(&args.device)?;
    let (text, out): (String, DeadLettersOut) =
        api.call_json(api.get(&format!("/v1/devices/{id}/dead-letters")))?;
    if args.client.json {
        println!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    if out.retained_away > 0 {
        println!(
            "{}: {} older dead letter(s) deleted by journal retention",
            args.device, out.retained_away
        );
    } else if out.dead_letters.is_empty() {
        println!("{}: no dead letters", args.device);
    }
    for d in out.dead_letters {
        println!(
            "after seq {}  {}  {} v{}  {}: {}",
            d.after_seq,
            timestamp(d.at_ms),
            d.plugin,
            d.version,
            d.code,
            d.message
        );
        println!("  {}", d.event);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use crate::cli::{Cli, Command};

    #[test]
    fn an_event_that_is_a_negative_number_is_not_taken_for_a_flag() {
        let cli = Cli::try_parse_from(["drover", "send", "t1", "-5"]).expect("parses");
        let Command::Send(args) = cli.command else {
            panic!("not send: {:?}", cli.command);
        };
        assert_eq!((args.device.as_str(), args.event.as_str()), ("t1", "-5"));
        // A device id that starts with `-` still needs `--`, as clap's own tip says.
        let cli = Cli::try_parse_from(["drover", "send", "--", "-t1", "-2.5e3"]).expect("parses");
        let Command::Send(args) = cli.command else {
            panic!("not send: {:?}", cli.command);
        };
        assert_eq!(
            (args.device.as_str(), args.event.as_str()),
            ("-t1", "-2.5e3")
        );
    }
}
