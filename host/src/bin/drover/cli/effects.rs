//! `drover commands` (a device's outbox: list, watch, acknowledge) and `drover timers`.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::Value;

use super::client::{ApiClient, ApiFailure, ClientOpts, segment};
use super::format::{quoted, timestamp};

/// `drover commands`.
#[derive(Debug, Args)]
pub struct CommandsArgs {
    #[command(subcommand)]
    pub action: CommandsAction,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// What to do with a device's outbox.
#[derive(Debug, Subcommand)]
pub enum CommandsAction {
    /// Print the commands waiting for the device (not acknowledged yet), oldest first. With
    /// `--json`, each page the server answered on a line of its own (one line unless the
    /// outbox holds more than 1,000 commands or 4 MiB of them).
    List {
        /// The device id.
        device: String,
    },
    /// Print each command as it arrives (a long poll, one JSON line per command with
    /// `--json`), until interrupted; a server that restarts or drops the connection is waited
    /// for. Acknowledges each once printed with `--ack`; without it, a command is printed
    /// once per watch and stays in the outbox (one acknowledged meanwhile by someone else is
    /// never printed).
    Watch {
        /// The device id.
        device: String,
        /// Acknowledge each command after printing it (a gateway that carried it out).
        #[arg(long)]
        ack: bool,
    },
    /// Acknowledge a command by its id (`<seq>.<index>`, as listed).
    Ack {
        /// The device id.
        device: String,
        /// The command's id.
        id: String,
    },
}

/// `{"commands":[...],"next"}`: a page of the outbox.
#[derive(Debug, Deserialize)]
struct CommandsOut {
    commands: Vec<CommandOut>,
    /// Where the next page starts (`after`), or none: this was the last.
    #[serde(default)]
    next: Option<String>,
}

/// One command as the server lists it; `watch --json` prints it whole, `rest` included
/// (`seq`, `index`, and whatever a newer server adds).
#[derive(Debug, Deserialize, serde::Serialize)]
struct CommandOut {
    id: String,
    at_ms: u64,
    expires_ms: Option<u64>,
    command: Value,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

/// How long one long poll of `watch` waits, in ms (under the client's 60 s timeout).
const WATCH_POLL_MS: u64 = 25_000;

/// How often a read of the outbox is asked again while the server answers `503 overloaded`.
const BUSY_TRIES: u32 = 30;

/// `call`, asked again a second later while the server answers `503 overloaded` (it holds as
/// many answers for slow readers as it may, say), up to [`BUSY_TRIES`] times: a gateway's
/// watch died of the first such answer (a review), where the server asked it to come back.
fn busy_retried<T>(mut call: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let mut tries = 0;
    loop {
        match call() {
            Err(e)
                if tries < BUSY_TRIES
                    && e.downcast_ref::<ApiFailure>()
                        .is_some_and(|f| f.status == 503 && f.code == "overloaded") =>
            {
                tries += 1;
                tracing::warn!(error = %e, "the server is busy; asking again in 1 s");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// Runs `drover commands`.
pub fn commands(args: CommandsArgs) -> anyhow::Result<ExitCode> {
    let api = ApiClient::new(&args.client)?;
    match args.action {
        CommandsAction::List { device } => {
            let id = segment(&device)?;
            // A page at a time (the server ends one at 1,000 commands or 4 MiB), printed as
            // it comes: an outbox past its cap is not held in memory whole here either.
            let mut after: Option<String> = None;
            let mut listed = 0usize;
            loop {
                let path = match &after {
                    None => format!("/v1/devices/{id}/commands"),
                    Some(a) => format!("/v1/devices/{id}/commands?after={a}"),
                };
                let (text, out): (String, CommandsOut) =
                    busy_retried(|| api.call_json(api.get(&path)))?;
                listed += out.commands.len();
                if args.client.json {
                    println!("{text}");
                } else {
                    for c in &out.commands {
                        print_command(c);
                    }
                }
                match out.next {
                    Some(next) => after = Some(segment(&next)?),
                    None => break,
                }
            }
            if listed == 0 && !args.client.json {
                println!("{device}: no commands waiting");
            }
        }
        CommandsAction::Watch { device, ack } => {
            let id = segment(&device)?;
            // Each poll asks for what came after the last command printed: it waits for a
            // new one rather than answering the waiting ones again.
            let mut after: Option<String> = None;
            loop {
                let path = match &after {
                    None => format!("/v1/devices/{id}/commands?wait_ms={WATCH_POLL_MS}"),
                    Some(a) => {
                        format!("/v1/devices/{id}/commands?wait_ms={WATCH_POLL_MS}&after={a}")
                    }
                };
                let out: CommandsOut = match busy_retried(|| api.call_json(api.get(&path))) {
                    Ok((_, out)) => out,
                    // The server restarting, or the connection dropping: a gateway keeps
                    // watching. An answer from the server (an unknown device) ends the watch.
                    Err(e) if e.downcast_ref::<super::client::ApiFailure>().is_none() => {
                        tracing::warn!(error = %e, "watch: the server did not answer; trying again in 1 s");
                        std::thread::sleep(std::time::Duration::from_secs(1));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                for c in out.commands {
                    after = Some(segment(&c.id)?);
                    if args.client.json {
                        println!("{}", serde_json::to_string(&c)?);
                    } else {
                        print_command(&c);
                    }
                    if ack {
                        let path = format!("/v1/devices/{id}/commands/{}/ack", segment(&c.id)?);
                        let (_, answer): (String, Value) = api.call_json(api.post(&path))?;
                        // Said on stderr, so that stdout stays one command per line.
                        if answer["acked"] == true {
                            eprintln!("{id}: command {} acknowledged", c.id);
                        } else {
                            eprintln!(
                                "{id}: command {} was acknowledged by someone else meanwhile",
                                c.id
                            );
                        }
                    }
                }
            }
        }
        CommandsAction::Ack { device, id } => {
            let path = format!(
                "/v1/devices/{}/commands/{}/ack",
                segment(&device)?,
                segment(&id)?
            );
            let (text, out): (String, Value) = api.call_json(api.post(&path))?;
            if args.client.json {
                println!("{text}");
            } else if out["acked"] == true {
                println!("{device}: command {id} acknowledged");
            } else {
                println!(
                    "{device}: command {id} was not waiting (acknowledged before, or expired)"
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_command(c: &CommandOut) {
    let expires = c
        .expires_ms
        .map(|e| format!("  expires {}", timestamp(e)))
        .unwrap_or_default();
    println!("{}  {}{expires}  {}", c.id, timestamp(c.at_ms), c.command);
}

/// `drover timers`.
#[derive(Debug, Args)]
pub struct TimersArgs {
    /// The device id.
    pub device: String,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// Lists a device's pending durable timers (`GET /v1/devices/{id}/timers`).
pub fn timers(args: TimersArgs) -> anyhow::Result<ExitCode> {
    let api = ApiClient::new(&args.client)?;
    let path = format!("/v1/devices/{}/timers", segment(&args.device)?);
    let (text, out): (String, Value) = api.call_json(api.get(&path))?;
    if args.client.json {
        println!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let timers = out["timers"].as_array().cloned().unwrap_or_default();
    if timers.is_empty() {
        println!("{}: no timers", args.device);
        return Ok(ExitCode::SUCCESS);
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let overdue = timers
        .iter()
        .any(|t| t["due_ms"].as_u64().is_some_and(|due| due < now_ms));
    for t in timers {
        let every = t["every_ms"]
            .as_u64()
            .map(|p| format!("  every {p} ms"))
            .unwrap_or_default();
        println!(
            "{}  due {}{every}  {}",
            quoted(t["key"].as_str().unwrap_or_default()),
            timestamp(t["due_ms"].as_u64().unwrap_or_default()),
            t["event"]
        );
    }
    if overdue && let Some(why) = quarantine(&api, &args.device) {
        println!("{why}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Why a device's due timers have not fired, when it is quarantined: firings wait for the
/// quarantine to end (see the README's "Effects"), so a due time in the past is no lost
/// timer. `None` when it is not quarantined or its state cannot be read for another reason
/// (the listing above stands on its own).
fn quarantine(api: &ApiClient, device: &str) -> Option<String> {
    let path = format!("/v1/devices/{}", segment(device).ok()?);
    let waits = "timers past their due time fire after it ends (a firing is tried again \
                 every 5 s)";
    match api.call_json::<Value>(api.get(&path)) {
        Ok((_, out)) => {
            let q = out.get("quarantine").filter(|q| q.is_object())?;
            Some(format!(
                "quarantined for {:.1} s more (`drover resume {device}` ends it now): {waits}; \
                 last failure: {}",
                q["ends_in_ms"].as_u64().unwrap_or_default() as f64 / 1000.0,
                q["last_error"].as_str().unwrap_or_default()
            ))
        }
        // Quarantined because it could not activate: no state to read, the reason instead.
        Err(e) => {
            let failure = e.downcast_ref::<ApiFailure>()?;
            (failure.code == "quarantined").then(|| {
                format!(
                    "quarantined (`drover resume {device}` ends it now): {waits}; {}",
                    failure.message
                )
            })
        }
    }
}
