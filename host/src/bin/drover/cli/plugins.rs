//! `drover plugin`: push, list, show, deploy, roll back and diff plugin versions.
//!
//! `drover plugins` and `drover plugin upload` are kept as aliases of `plugin list` and
//! `plugin push`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::client::{
    ApiClient, ApiFailure, ClientOpts, DEFAULT_SERVER, LONG_OPERATION_TIMEOUT, segment,
};
use super::format::{pretty, timestamp};

/// `drover plugin [push|list|show|deploy|rollback|diff]`.
#[derive(Debug, Args)]
pub struct PluginsArgs {
    #[command(subcommand)]
    pub action: Option<PluginsAction>,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// What to do with plugins (default: list them).
#[derive(Debug, Subcommand)]
pub enum PluginsAction {
    /// List every plugin: its current version (what devices run) and its versions.
    List,
    /// Upload a component as a new version of plugin NAME. Devices keep running their
    /// version until `deploy`; the first version of a plugin is current at once.
    #[command(alias = "upload")]
    Push {
        /// The plugin name (device type).
        name: String,
        /// The `.wasm` component file (built for `wasm32-wasip2`).
        file: PathBuf,
        /// Deploy it right away (refused if it cannot fold sampled devices' history).
        #[arg(long)]
        deploy: bool,
        /// With `--deploy`: deploy even if devices cannot fold the version (those stay on
        /// their version), as `deploy --force` does.
        #[arg(long, requires = "deploy")]
        force: bool,
    },
    /// One plugin's versions and which is current.
    Show { name: String },
    /// Move every device of plugin NAME to VERSION, by replaying each live device's journal
    /// into the new version (passivated devices upgrade at their next activation). Exits 1
    /// if devices were left on their version.
    Deploy {
        name: String,
        #[arg(value_parser = version_number)]
        version: u32,
        /// Deploy even if the dry-run sample finds devices the version cannot fold (those
        /// stay on their version).
        #[arg(long)]
        force: bool,
    },
    /// Return plugin NAME to the version that was current before the last deploy (checked on
    /// a sample like a deploy; exits 1 if devices were left behind).
    Rollback {
        name: String,
        /// Roll back even if the older version cannot fold some sampled device's history.
        #[arg(long)]
        force: bool,
    },
    /// Remove VERSION of plugin NAME, or the whole plugin (refused while devices run it).
    #[command(alias = "rm")]
    Remove {
        name: String,
        #[arg(value_parser = version_number)]
        version: Option<u32>,
    },
    /// Dry-run VERSION of plugin NAME on recorded history: would it decide the same, can it
    /// fold, and how would the state differ. Writes nothing. Exits 1 when some device cannot
    /// fold it (a deploy would be refused), so a script can gate a deploy on it.
    Diff {
        name: String,
        #[arg(value_parser = version_number)]
        version: u32,
        /// Devices to compare (default: a sample spread over the plugin's devices).
        #[arg(long = "device", value_name = "ID")]
        devices: Vec<String>,
        /// How many devices to sample when none are named (1 to 1,000).
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
        sample: u32,
    },
}

/// Runs `drover plugin`.
pub fn run(args: PluginsArgs) -> anyhow::Result<ExitCode> {
    let api = ApiClient::new(&args.client)?;
    let json_out = args.client.json;
    match args.action.unwrap_or(PluginsAction::List) {
        PluginsAction::List => {
            let (text, list): (String, Value) = api.call_json(api.get("/v1/plugins"))?;
            if json_out {
                println!("{text}");
                return Ok(ExitCode::SUCCESS);
            }
            let plugins = list["plugins"].as_array().cloned().unwrap_or_default();
            if plugins.is_empty() {
                println!("no plugins");
            }
            for p in &plugins {
                print_plugin(p);
            }
        }
        PluginsAction::Show { name } => {
            let (_, list): (String, Value) = api.call_json(api.get("/v1/plugins"))?;
            let Some(p) = list["plugins"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == name.as_str()))
            else {
                anyhow::bail!("no plugin `{name}` on this server");
            };
            if json_out {
                // This plugin's entry of the list, not the whole list.
                println!("{p}");
                return Ok(ExitCode::SUCCESS);
            }
            print_plugin(p);
        }
        PluginsAction::Push {
            name,
            file,
            deploy,
            force,
        } => {
            // The server's own rule, checked before a large upload is sent for nothing.
            drover::error::validate_id(&name)?;
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let req = api
                .post(&format!("/v1/plugins/{}", segment(&name)?))
                .header("content-type", "application/wasm")
                .body(bytes);
            let (status, text) = api.call(req)?;
            let u: Value = serde_json::from_str(&text)
                .with_context(|| format!("unexpected answer: {text}"))?;
            if json_out && !deploy {
                println!("{text}");
                return Ok(ExitCode::SUCCESS);
            }
            let (n, v, digest) = (
                u["name"].as_str().unwrap_or("?"),
                u["version"].as_u64().unwrap_or(0),
                u["digest"].as_str().unwrap_or("?"),
            );
            // With --deploy and --json, stdout is the deploy report alone (one JSON document);
            // the upload's line goes to stderr.
            let line = if status == 201 {
                format!("{n} v{v} registered ({digest})")
            } else if u["repaired"] == true {
                format!(
                    "{n} v{v} already has these bytes ({digest}): its stored copy was damaged \
                     or missing and is written again from them (repaired)"
                )
            } else {
                format!("{n} v{v} already has these bytes ({digest}): unchanged")
            };
            if json_out {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
            if deploy {
                let version = u["version"].as_u64().unwrap_or(0);
                let path = format!("/v1/plugins/{}/deploy", segment(&name)?);
                return deploy_and_print(
                    &api,
                    &path,
                    json!({"version": version, "force": force}),
                    json_out,
                );
            }
        }
        PluginsAction::Deploy {
            name,
            version,
            force,
        } => {
            let path = format!("/v1/plugins/{}/deploy", segment(&name)?);
            return deploy_and_print(
                &api,
                &path,
                json!({"version": version, "force": force}),
                json_out,
            );
        }
        PluginsAction::Rollback { name, force } => {
            let path = format!("/v1/plugins/{}/rollback", segment(&name)?);
            return deploy_and_print(&api, &path, json!({"force": force}), json_out);
        }
        PluginsAction::Remove { name, version } => {
            let path = match version {
                Some(v) => format!("/v1/plugins/{}/versions/{v}", segment(&name)?),
                None => format!("/v1/plugins/{}", segment(&name)?),
            };
            let (text, out): (String, Value) = api.call_json(api.delete(&path))?;
            if json_out {
                println!("{text}");
            } else {
                let versions: Vec<String> = out["removed"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| format!("v{v}"))
                    .collect();
                println!("removed {name} {}", versions.join(", "));
            }
        }
        PluginsAction::Diff {
            name,
            version,
            devices,
            sample,
        } => {
            let body = if devices.is_empty() {
                json!({"version": version, "sample": sample})
            } else {
                json!({"version": version, "devices": devices})
            };
            let req = api
                .post(&format!("/v1/plugins/{}/dry-run", segment(&name)?))
                .timeout(LONG_OPERATION_TIMEOUT)
                .json(&body);
            let (text, report): (String, Value) = api.call_json(req)?;
            if json_out {
                println!("{text}");
            } else {
                print_dry_run(&report);
            }
            if report["totals"]["cannot_fold"].as_u64().unwrap_or(0) > 0 {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Posts a deploy or rollback (`path`) and prints its report.
fn deploy_and_print(
    api: &ApiClient,
    path: &str,
    body: Value,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    let req = api.post(path).timeout(LONG_OPERATION_TIMEOUT).json(&body);
    let (text, report): (String, Value) =
        api.call_json(req)
            .map_err(|e| match e.downcast::<ApiFailure>() {
                Ok(mut f) if f.code == "deploy-refused" => {
                    f.message = refusal_in_cli_words(api, &f.message, "--force");
                    f.into()
                }
                Ok(f) => f.into(),
                Err(e) => e,
            })?;
    if json_out {
        println!("{text}");
    } else {
        print_deploy(&report);
    }
    Ok(outcome(&report))
}

/// How the server's deploy refusals say a deploy can be forced: the API's words.
const FORCE_IN_API: &str = "(`\"force\": true`)";

/// A deploy refusal in a command's words. The server names the API's `"force": true` where
/// forcing would help (not where nothing can, such as a rollback with no earlier version);
/// `force` is what does it from this command (`--force`, `drover dev --force`). The `drover
/// plugin diff` it suggests names this command's server unless it is the default one, so
/// that it can be run as printed.
pub fn refusal_in_cli_words(api: &ApiClient, message: &str, force: &str) -> String {
    let mut message = message.replace(FORCE_IN_API, &format!("(`{force}`)"));
    if api.base() != DEFAULT_SERVER {
        message = message.replace(
            "`drover plugin diff ",
            &format!("`drover plugin diff --server {} ", api.base()),
        );
    }
    message
}

/// A deploy that left devices behind (failed, or a forced deploy whose devices cannot fold
/// the new version) exits with 1, so scripts notice.
fn outcome(report: &Value) -> ExitCode {
    let totals = &report["totals"];
    let left_behind =
        totals["failed"].as_u64().unwrap_or(0) + totals["cannot_fold"].as_u64().unwrap_or(0);
    if left_behind > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_plugin(p: &Value) {
    let current = p["current"].as_u64().unwrap_or(0);
    println!(
        "{} (current v{current}, latest v{})",
        p["name"].as_str().unwrap_or("?"),
        p["latest"]
    );
    for v in p["versions"].as_array().into_iter().flatten() {
        let n = v["version"].as_u64().unwrap_or(0);
        println!(
            "  {} v{n:<4} {}  {}{}",
            if n == current { "*" } else { " " },
            timestamp(v["registered_at_ms"].as_u64().unwrap_or(0)),
            v["digest"].as_str().unwrap_or(""),
            if v["slow_lane"].as_bool() == Some(true) {
                "  (slow lane)"
            } else if v["slow_setup"].as_bool() == Some(true) {
                "  (activations on the slow lane)"
            } else {
                ""
            }
        );
    }
}

/// What a deploy report says of the passivated devices that move at their next activation:
/// how many of them the version was checked to fold beforehand.
fn checked_beforehand(r: &Value) -> String {
    let (t, n) = (&r["totals"], |v: &Value| v.as_u64().unwrap_or(0));
    match (n(&t["pending_lazy"]), n(&t["fold_checked"])) {
        (0, _) => String::new(),
        // The sample took every device not already on the version: each was checked (this
        // said "none checked beforehand", counting only those beyond the sample).
        _ if n(&r["sample"]["totals"]["devices"]) + n(&t["unchanged"]) >= n(&t["devices"]) => {
            " (each checked beforehand, in the sample)".to_string()
        }
        (_, 0) => " (none beyond the sample checked beforehand)".to_string(),
        (_, 1) => " (1 device beyond the sample checked beforehand)".to_string(),
        (_, k) => format!(" ({k} devices beyond the sample checked beforehand)"),
    }
}

/// A version number as the CLI prints it, `4` or `v4` (`plugin list`, deploy reports and
/// `drover dev` show `v4`; a review's `deploy sensor v4` got "invalid digit found in string").
fn version_number(s: &str) -> Result<u32, String> {
    s.strip_prefix(['v', 'V'])
        .unwrap_or(s)
        .parse::<u32>()
        .map_err(|_| format!("`{s}` is not a version number: give one such as 4 (or v4)"))
}

/// Most sampled devices whose failures [`sample_failures`] lists one by one.
const SAMPLE_FAILURES_SHOWN: usize = 3;

/// What a dry-run's `decide differently` adds about the devices where the candidate failed
/// (`totals.failed_to_decide`: a trap, a timeout) rather than decided otherwise: nothing when none did.
fn by_failing(failed: u64) -> String {
    match failed {
        0 => String::new(),
        k => format!(" ({k} of them by failing: a trap or a timeout)"),
    }
}

/// Lines for the sampled devices on which the new version failed while it re-decided their
/// recorded events (a trap, a timeout) though it folds their history: such a version is
/// deployed, and its next events are likely to fail alike. The totals count them among
/// those that "decide differently" (and in `failed_to_decide`), and a save whose `handle` trapped on
/// every event went live under `drover dev` with nothing else said (a review found it).
fn sample_failures(report: &Value) -> Vec<String> {
    let sample = &report["sample"];
    let failed: Vec<&Value> = sample["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["folds"] == true && d["overloaded"] != true && d["error"].is_string())
        .collect();
    let mut lines: Vec<String> = failed
        .iter()
        .take(SAMPLE_FAILURES_SHOWN)
        .map(|d| {
            format!(
                "  sampled {}: {}",
                d["device"].as_str().unwrap_or("?"),
                d["error"].as_str().unwrap_or("")
            )
        })
        .collect();
    if failed.len() > SAMPLE_FAILURES_SHOWN {
        // Named as a command: `drover dev` prints this report too, and has no `--json`.
        lines.push(format!(
            "  and {} more sampled device(s) it failed on (`drover plugin diff {} {} --json` \
             lists each)",
            failed.len() - SAMPLE_FAILURES_SHOWN,
            report["plugin"].as_str().unwrap_or("NAME"),
            report["to"]
                .as_u64()
                .map_or("VERSION".to_string(), |v| v.to_string()),
        ));
    }
    lines
}

/// Prints a deploy report as a few readable lines (the JSON has every detail).
pub fn print_deploy(r: &Value) {
    let t = &r["totals"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    println!(
        "{} v{} -> v{}{}: of {} device{}, {} upgraded live, {} failed (stay on their version), {} already on it, {} move at their next activation{}{}{}{}{}{} ({} ms)",
        r["plugin"].as_str().unwrap_or("?"),
        r["from"],
        r["to"],
        if r["rollback"] == true {
            " (rollback)"
        } else {
            ""
        },
        n(&t["devices"]),
        if n(&t["devices"]) == 1 { "" } else { "s" },
        n(&t["upgraded"]),
        n(&t["failed"]),
        n(&t["unchanged"]),
        n(&t["pending_lazy"]),
        checked_beforehand(r),
        match n(&t["not_tried"]) {
            0 => String::new(),
            k => format!(
                ", {k} passivated not tried (the version was given up after failing slowly; they \
                 stay on theirs)"
            ),
        },
        match n(&t["cannot_fold"]) {
            0 => String::new(),
            k => format!(", {k} cannot fold it and stay on theirs"),
        },
        match n(&t["upgraded_at_activation"]) {
            0 => String::new(),
            k => format!(", {k} came to it at an activation meanwhile"),
        },
        match n(&t["quarantines_ended"]) {
            0 => String::new(),
            1 => ", 1 quarantine ended".to_string(),
            k => format!(", {k} quarantines ended"),
        },
        match n(&t["removed"]) {
            0 => String::new(),
            k => format!(", {k} removed meanwhile"),
        },
        n(&r["elapsed_ms"]),
    );
    if n(&t["upgraded"]) > 0 {
        println!(
            "  pause per device: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; journal check {} ({} upgraded)",
            n(&r["pause_p50_us"]) as f64 / 1000.0,
            n(&r["pause_p99_us"]) as f64 / 1000.0,
            n(&r["pause_max_us"]) as f64 / 1000.0,
            if r["journal_check"]["ok"] == true {
                "ok"
            } else {
                "FAILED"
            },
            n(&r["journal_check"]["devices"]),
        );
    }
    let s = &r["sample"]["totals"];
    if n(&s["devices"]) > 0 {
        println!(
            "  dry-run sample of {}: {} identical, {} decide differently{}, {} end in another state, {} cannot fold{}",
            n(&s["devices"]),
            n(&s["identical"]),
            n(&s["decide_differently"]),
            by_failing(n(&s["failed_to_decide"])),
            n(&s["state_differs"]),
            n(&s["cannot_fold"]),
            match n(&s["overloaded"]) {
                0 => String::new(),
                k => format!(", {k} not checked (the server was overloaded)"),
            },
        );
        for line in sample_failures(r) {
            println!("{line}");
        }
    }
    for d in r["devices"].as_array().into_iter().flatten() {
        if d["outcome"] == "failed" {
            // The seq the new version failed at, not the device's own.
            let at = d["failed_seq"]
                .as_u64()
                .map(|s| format!(", failing at seq {s}"))
                .unwrap_or_default();
            let error = d["error"].as_str().unwrap_or("");
            // A version given up after slow failures elsewhere was never run on this one.
            let why = if error.starts_with("not tried") {
                "was not tried on it".to_string()
            } else {
                format!("cannot bring it up{at}")
            };
            println!(
                "  {} stays on v{} (v{} {why}): {error}",
                d["device"].as_str().unwrap_or("?"),
                d["from"],
                d["to"],
            );
        }
    }
    for line in left_unfolded(r) {
        println!("{line}");
    }
}

/// Lines for the sampled devices a forced deploy left on their version because the new one
/// cannot fold their history, and that it did not try to move live (those are listed with
/// the devices it touched): passivated ones, which it only counted (a review found them
/// named nowhere but in the JSON).
fn left_unfolded(r: &Value) -> Vec<String> {
    let touched: std::collections::HashSet<&str> = r["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["device"].as_str())
        .collect();
    r["sample"]["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["folds"] == false && d["overloaded"] != true)
        .filter(|d| d["device"].as_str().is_some_and(|id| !touched.contains(id)))
        .map(|d| {
            format!(
                "  {} stays on v{} (v{} cannot fold its history{}): {}",
                d["device"].as_str().unwrap_or("?"),
                d["recorded_version"],
                r["to"],
                d["fold_failed_seq"]
                    .as_u64()
                    .map(|s| format!(", failing at seq {s}"))
                    .unwrap_or_default(),
                d["error"].as_str().unwrap_or("no detail"),
            )
        })
        .collect()
}

/// What a dry run found on one device that is not identical, in a few words.
fn dry_run_findings(d: &Value) -> String {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let events = n(&d["events"]);
    let mut what = Vec::new();
    if d["folds"] != true {
        what.push(match d["fold_failed_seq"].as_u64() {
            Some(seq) => format!("cannot fold its recorded transitions at seq {seq}"),
            // Failed before the first event: the config or the snapshot, not a transition.
            None if events == 0 => {
                "cannot start on this device (its `init` or `restore` failed)".to_string()
            }
            None => "cannot fold its recorded transitions".to_string(),
        });
    }
    if n(&d["diverged_events"]) > 0 {
        what.push(format!(
            "decides differently on {} of {events} event{}",
            n(&d["diverged_events"]),
            if events == 1 { "" } else { "s" }
        ));
    }
    // A candidate that could not fold has no state of its own to compare, and one whose
    // run stopped before the end (its `error` says why) compared none.
    if d["state_matches"] != true && d["folds"] == true && d["state_compared"] == true {
        what.push("ends in another state".to_string());
    }
    if what.is_empty() {
        what.push("not checked to the end (see the error)".to_string());
    }
    what.join("; ")
}

/// Prints a dry-run report: totals, then each device's first divergence and state diff.
pub fn print_dry_run(r: &Value) {
    let t = &r["totals"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let plural = |k: u64, one: &str, many: &str| format!("{k} {}", if k == 1 { one } else { many });
    println!(
        "{} v{} on {}: {} identical, {} decide differently{}, {} end in another state, {} cannot fold ({} re-decided, {} events/s)",
        r["plugin"].as_str().unwrap_or("?"),
        r["version"],
        plural(n(&t["devices"]), "device", "devices"),
        n(&t["identical"]),
        n(&t["decide_differently"]),
        by_failing(n(&t["failed_to_decide"])),
        n(&t["state_differs"]),
        n(&t["cannot_fold"]),
        plural(n(&t["events"]), "event", "events"),
        n(&t["events_per_s"]),
    );
    if n(&t["overloaded"]) > 0 {
        println!(
            "{} not checked: the server is overloaded (guest calls lacked a core or memory); run it again when it is less loaded",
            plural(n(&t["overloaded"]), "device", "devices")
        );
    }
    let version = r["version"].as_u64().unwrap_or(0);
    for d in r["devices"].as_array().into_iter().flatten() {
        let id = d["device"].as_str().unwrap_or("?");
        let events = plural(n(&d["events"]), "event", "events");
        if d["identical"] == true {
            println!("{id}: identical ({events})");
            continue;
        }
        if d["overloaded"] == true {
            println!(
                "{id}: not checked, the server is overloaded: {}",
                d["error"].as_str().unwrap_or("")
            );
            continue;
        }
        // One header per device, so every detail below is under the device it belongs to.
        println!("{id}: {}", dry_run_findings(d));
        if let Some(f) = d["first_divergence"].as_object() {
            let line = |v: Option<&Value>| v.map_or_else(String::new, |v| v.to_string());
            println!("  first at seq {}", f.get("seq").map_or(0, n));
            println!("  event      {}", line(f.get("event")));
            println!("  recorded   {}", line(f.get("recorded")));
            match f.get("candidate") {
                Some(c) => println!("  v{version:<9} {c}"),
                None => println!("  v{version:<9} {}", line(f.get("error"))),
            }
            // Same transitions, other effects (a command, a message, a timer): the effects
            // are the divergence, and the lines above alone looked identical (a review).
            if let Some(c) = f.get("candidate_effects") {
                println!("  recorded effects  {}", line(f.get("recorded_effects")));
                println!("  v{version} effects  {c}");
            }
        }
        if let Some(e) = d["error"].as_str() {
            println!("  error: {e}");
        }
        for change in d["state_diff"].as_array().into_iter().flatten() {
            let path = change["path"].as_str().unwrap_or("");
            match change["op"].as_str().unwrap_or("") {
                "replace" => println!("  state {path}: {} -> {}", change["was"], change["value"]),
                "add" => println!("  state {path}: added {}", change["value"]),
                "remove" => println!("  state {path}: removed (was {})", change["was"]),
                _ => println!("{}", pretty(change, "  ")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deploy_that_left_devices_behind_exits_1_whether_they_failed_or_cannot_fold() {
        let report = |failed: u64, cannot_fold: u64| serde_json::json!({"totals": {"failed": failed, "cannot_fold": cannot_fold, "upgraded": 3}});
        assert_eq!(outcome(&report(0, 0)), ExitCode::SUCCESS);
        assert_eq!(outcome(&report(1, 0)), ExitCode::from(1));
        assert_eq!(outcome(&report(0, 1)), ExitCode::from(1));
    }

    /// A device whose dry run stopped before its state was compared (its own version could
    /// not rebuild the state retention left) read "ends in another state" (a review).
    #[test]
    fn a_dry_run_that_compared_no_state_does_not_say_it_differs() {
        let device = |compared: bool, diverged: u64| {
            json!({"device": "d", "events": 3, "folds": true, "diverged_events": diverged,
                   "state_matches": false, "state_compared": compared,
                   "error": if compared { Value::Null } else { json!("cannot be rebuilt") }})
        };
        assert_eq!(
            dry_run_findings(&device(false, 0)),
            "not checked to the end (see the error)"
        );
        assert_eq!(
            dry_run_findings(&device(false, 1)),
            "decides differently on 1 of 3 events"
        );
        assert_eq!(dry_run_findings(&device(true, 0)), "ends in another state");
    }

    #[test]
    fn versions_are_taken_as_printed() {
        assert_eq!(version_number("4"), Ok(4));
        assert_eq!(version_number("v4"), Ok(4));
        assert_eq!(version_number("V4"), Ok(4));
        let err = version_number("four").expect_err("not a number");
        assert!(err.contains("such as 4 (or v4)"), "{err}");
        assert!(version_number("v").is_err() && version_number("-1").is_err());
    }

    /// Sampled devices the new version failed on while re-deciding their events are listed,
    /// at most three; devices it cannot fold, or did not check, are said elsewhere.
    #[test]
    fn sampled_devices_a_version_failed_on_are_listed() {
        let device = |id: &str, folds: bool, error: Option<&str>| serde_json::json!({"device": id, "folds": folds, "overloaded": false, "error": error});
        let trap = "the candidate failed at seq 3 (...): the candidate version trapped";
        let trapped = Some(trap);
        let report = serde_json::json!({"plugin": "sensor", "to": 4, "sample": {"devices": [
            device("a", true, trapped),
            device("b", true, None),
            device("c", false, Some("cannot fold the recorded transitions at seq 2: ...")),
        ]}});
        assert_eq!(sample_failures(&report), [format!("  sampled a: {trap}")]);
        let many: Vec<Value> = (0..5)
            .map(|i| device(&format!("d{i}"), true, trapped))
            .collect();
        let lines = sample_failures(
            &serde_json::json!({"plugin": "sensor", "to": 4, "sample": {"devices": many}}),
        );
        assert_eq!(lines.len(), 4, "{lines:?}");
        // A command that exists wherever the report is printed (`drover dev` has no `--json`).
        assert_eq!(
            lines[3],
            "  and 2 more sampled device(s) it failed on (`drover plugin diff sensor 4 --json` lists each)"
        );
    }

    /// A forced deploy names the passivated devices it left because it cannot fold them, as
    /// it names the live ones (it only counted them); those it touched are not named twice.
    #[test]
    fn passivated_devices_a_forced_deploy_left_behind_are_named() {
        let report = serde_json::json!({
            "to": 2,
            "devices": [{"device": "live", "outcome": "failed"}],
            "sample": {"devices": [
                {"device": "r1", "recorded_version": 1, "folds": false, "fold_failed_seq": 4,
                 "error": "cannot fold the recorded transitions at seq 4: refused"},
                {"device": "live", "recorded_version": 1, "folds": false, "error": "x"},
                {"device": "ok", "recorded_version": 1, "folds": true},
            ]},
        });
        assert_eq!(
            left_unfolded(&report),
            [
                "  r1 stays on v1 (v2 cannot fold its history, failing at seq 4): cannot fold the \
              recorded transitions at seq 4: refused"
            ]
        );
    }

    /// Passivated devices the sample covered count as checked: a deploy to 6 passivated
    /// devices, all sampled, said "(none checked beforehand)" (a review found it).
    #[test]
    fn devices_checked_in_the_sample_count_as_checked_beforehand() {
        let report = |devices: u64, sampled: u64, pending: u64, beyond: u64| {
            serde_json::json!({
                "totals": {"devices": devices, "unchanged": 0, "pending_lazy": pending, "fold_checked": beyond},
                "sample": {"totals": {"devices": sampled}},
            })
        };
        assert_eq!(
            checked_beforehand(&report(6, 6, 6, 0)),
            " (each checked beforehand, in the sample)"
        );
        assert_eq!(
            checked_beforehand(&report(60, 16, 50, 0)),
            " (none beyond the sample checked beforehand)"
        );
        assert_eq!(
            checked_beforehand(&report(60, 16, 50, 44)),
            " (44 devices beyond the sample checked beforehand)"
        );
        assert_eq!(checked_beforehand(&report(6, 6, 0, 0)), "");
    }
}
