//! Portable history: a data directory's devices exported to JSON lines, and imported into
//! another data directory, so a production history becomes a regression test and a backup
//! can be restored record for record.
//!
//! # Format (version 1)
//!
//! One JSON object per line, each with a `kind`:
//!
//! ```text
//! {"kind":"drover-export","format":1,"exported_at_ms":1764500000000,"from":1}
//! {"kind":"plugin","plugin":"thermostat","version":1,"digest":"<sha256 hex>","current":true,"component":"<base64>"}
//! {"kind":"device","device":"t1","plugin":"thermostat","version":1,"config":{...},"created_at_ms":...,"seq":100,"owed":{"commands":[{"seq":98,"index":0}],"messages":[]}}
//! {"kind":"record","seq":1,"at_ms":...,"plugin":"thermostat","version":1,"event":{...},"transitions":[{...}]}
//! {"kind":"record","seq":5,"at_ms":...,"plugin":"thermostat","version":1,"lost":true}
//! {"kind":"record","seq":6,...,"fx":{"origin":{"type":"timer","key":"hb","set":{"seq":4,"index":0},"due_ms":...,"missed":0},"effects":[{"type":"send","to":"room-1","event":"{...}"}]}}
//! {"kind":"end","devices":1,"records":100}
//! ```
//!
//! * Plugin lines come first: every version a device runs or a record names, with the
//!   component's bytes (so an import needs nothing else). A version whose file was removed
//!   from the source has no `component`.
//! * Each device line is followed by its records in seq order, from the header's `from`,
//!   or from the device line's `first_seq` when that is later (an export of what journal
//!   retention kept, [`ExportStart::Kept`]: each device from its oldest record kept).
//!   Events, transitions and configs are embedded as the exact JSON text recorded (so an
//!   import reproduces the journal byte for byte); a text that is not JSON (a transition from
//!   a plugin that printed something else), or is JSON spread over several lines (an event
//!   sent pretty-printed), is given as a string under `event_text`, `transitions_text` or
//!   `config_text` instead. `fx` holds the origin and effects of an event that was a message
//!   or a timer firing or produced effects (absent: an external event without effects), as
//!   the journal records them (payloads are JSON texts). `lost` marks a seq destroyed by media
//!   damage and salvaged away (see `journal::salvage`).
//! * `owed` on a device line lists the effects the device still owed when exported: commands
//!   not acknowledged (nor expired) and messages not yet handled by their targets. An import
//!   records every other command and message its records issued as settled (kind 11), so an
//!   acknowledged command is not delivered again and a message handled by a device outside
//!   the file, or found undeliverable in the source, is not sent again. Absent in files from
//!   before it existed: their effects are then owed as their records say.
//! * The `end` line counts what came before it, so a cut-short file is refused.
//!
//! Snapshots and dead letters are not exported: snapshots are derived (an import replays),
//! and dead letters are not part of any device's state.
//!
//! # Import
//!
//! [`import`] reads the whole file once to check it (format, digests of the components, the
//! end line, dense seqs, valid device ids, no id twice, and none already in the target, read
//! without opening it for writing), so a bad file changes nothing. Then it registers the
//! plugin versions (the export's current version becomes current only for a plugin the
//! target did not have), writes each device's provisioning and records straight into the
//! target journal (no guest runs: the recorded transitions are the truth; an event edited by
//! hand is imported as it is), waits until they are durable, and rebuilds every imported
//! device with its plugin to check that the history folds. If writing or that check fails,
//! the devices written so far are removed again (their records stay in the journal, belonging
//! to no device) so a retry starts from where it began. A partial export (`from` > 1, or a
//! device whose `first_seq` > 1) cannot be imported.
//!
//! An import stopped part-way (killed, the machine lost) cannot undo itself, so it leaves a
//! note: before its first write it puts `IMPORTING.json` in the data directory (written
//! atomically: temp file, fsync, rename, fsync of the directory), `{"export": PATH,
//! "devices": [ID, ...]}`, the ids of every device the file holds, none of which the target
//! had (checked under the directory's lock). It removes the note once the import succeeded
//! or was undone. Whatever opens the directory for writing next (a server, another import)
//! finds the note first and removes every device it lists that exists, as the undo above
//! would, before anything else runs ([`undo_interrupted_import`]), with a warning; so the
//! retry starts from where the first import began, and no server serves a device whose
//! history was cut short. (Before, a killed import left devices provisioned with part of
//! their history or none, which a server then served and extended at seqs the source had
//! used, and a retry refused as already there.)

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest as _, Sha256};

use crate::engine::{Engine, EngineConfig};
use crate::journal::{EffectId, Fx, Journal, JournalError, VersionInfo};
use crate::registry::{Origin, Registry};
use crate::runtime::Runtime;

/// The export format this build writes and reads.
pub const EXPORT_FORMAT: u32 = 1;

/// What [`export`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportSummary {
    pub plugins: usize,
    pub devices: usize,
    pub records: u64,
}

/// What [`import`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportSummary {
    /// Plugin versions registered (new to the target).
    pub plugins_registered: usize,
    pub devices: usize,
    pub records: u64,
    /// Records whose plugin version was not in the export (removed from the source): they
    /// are attributed to their device's version.
    pub records_reattributed: u64,
    /// Commands and messages the records issued that the source no longer owed
    /// (acknowledged, handled by a device not in the export, undeliverable): recorded as
    /// settled, so they are not carried out again.
    pub effects_settled: usize,
}

#[derive(Serialize, Deserialize)]
struct Header {
    kind: String,
    format: u32,
    exported_at_ms: u64,
    from: u64,
}

#[derive(Serialize, Deserialize)]
struct PluginLine {
    kind: String,
    plugin: String,
    version: u32,
    digest: String,
    #[serde(default)]
    current: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    component: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct DeviceLine {
    kind: String,
    device: String,
    plugin: String,
    version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    config: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    config_text: Option<String>,
    created_at_ms: u64,
    seq: u64,
    /// What the device still owed when exported; absent in exports made before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owed: Option<Owed>,
    /// The device's number in the source journal, which messages it sent name (an id
    /// removed and provisioned again is another number); absent in older exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    num: Option<u32>,
    /// The seq of the device's first record in the file, when later than the header's
    /// `from` (journal retention deleted the ones before); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    first_seq: Option<u64>,
}

/// Where each device's records in an export start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportStart {
    /// From this seq (1: the whole history, which retention may have deleted the start
    /// of: the export then fails naming the device and its oldest seq kept).
    Seq(u64),
    /// Each device from its oldest record journal retention kept (the whole history where
    /// nothing was deleted): everything still readable, for reading; import refuses a
    /// device that does not start at seq 1.
    Kept,
}

/// The effects a device still owed when it was exported, by id: an import settles every
/// other command and message its records issued (acknowledged, delivered elsewhere, or found
/// undeliverable in the source), so they are not carried out a second time.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Owed {
    /// Commands not yet acknowledged (nor expired).
    commands: Vec<EffectId>,
    /// Messages not yet handled by their targets.
    messages: Vec<EffectId>,
}

#[derive(Serialize, Deserialize)]
struct RecordLine {
    kind: String,
    seq: u64,
    at_ms: u64,
    plugin: String,
    version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event_text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    transitions: Option<Vec<Box<RawValue>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    transitions_text: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    lost: bool,
    /// The origin and effects of an event that did not come from outside or produced
    /// effects (see `journal/effects.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fx: Option<Fx>,
}

#[derive(Serialize, Deserialize)]
struct EndLine {
    kind: String,
    devices: usize,
    records: u64,
}

#[derive(Deserialize)]
struct Kind {
    kind: String,
}

/// JSON text as a raw value if it is JSON on one line that a strict reader reads (see
/// `crate::json_check`), else as a string for the `*_text` field: a JSON text with line
/// breaks (an event a client sent pretty-printed) would break the one-line-per-record format,
/// and re-serializing it would change its bytes; one with a lone surrogate escape or a number
/// past `f64` (an older server recorded such events) would make the line unreadable to a
/// strict reader, and an import refuses it as JSON.
fn raw_or_text(bytes: &[u8]) -> (Option<Box<RawValue>>, Option<String>) {
    match std::str::from_utf8(bytes)
        .ok()
        .filter(|s| !s.contains(['\n', '\r']) && crate::json_check::strict(s).is_ok())
        .and_then(|s| RawValue::from_string(s.to_string()).ok())
    {
        Some(raw) => (Some(raw), None),
        None => (None, Some(String::from_utf8_lossy(bytes).into_owned())),
    }
}

/// Writes the devices `only` (all when `None`) of the data directory `data_dir`, their
/// records from seq `from`, to `out` in the format above. The journal is opened read-only, so
/// this runs beside a live server (it sees what is durable when it starts).
pub fn export(
    data_dir: &Path,
    only: Option<&str>,
    start: ExportStart,
    out: &mut dyn Write,
) -> anyhow::Result<ExportSummary> {
    refuse_unfinished_import(data_dir)?;
    let journal = Journal::open_read_only(data_dir)
        .with_context(|| format!("opening the journal in {}", data_dir.display()))?;
    let engine = Engine::new(EngineConfig::load(data_dir)?)?;
    let registry = Registry::open(engine, journal.clone(), data_dir)?;
    let versions: HashMap<u32, VersionInfo> =
        journal.versions().into_iter().map(|v| (v.id, v)).collect();
    let ids: Vec<Arc<str>> = match only {
        Some(id) => {
            if journal.device(id).is_none() {
                bail!("no device `{id}` in {}", data_dir.display());
            }
            vec![Arc::from(id)]
        }
        None => journal.device_ids(),
    };
    let from = match start {
        ExportStart::Seq(from) => from.max(1),
        ExportStart::Kept => 1,
    };
    let first_of = |num: u32| match start {
        ExportStart::Seq(_) => from,
        ExportStart::Kept => journal.oldest_retained_seq(num).max(1),
    };
    let name = |id: u32| -> anyhow::Result<&VersionInfo> {
        versions
            .get(&id)
            .with_context(|| format!("plugin version id {id} is not in the journal"))
    };

    // Every version a device runs or one of its records names, before any device.
    let mut used: Vec<u32> = Vec::new();
    for id in &ids {
        let Some(head) = journal.device(id) else {
            continue;
        };
        used.push(head.version);
        let mut next = first_of(head.num);
        while next <= head.seq {
            let to = (next + 1023).min(head.seq);
            used.extend(
                journal
                    .read_events(head.num, next, to)
                    .map_err(|e| match e {
                        crate::journal::JournalError::RetainedAway { oldest } => anyhow::anyhow!(
                            "device `{}`: its history before seq {oldest} was deleted by the \
                             journal's retention policy; `--kept` exports each device from its \
                             oldest record kept (`--from {oldest}` this one; for reading: \
                             import refuses either)",
                            head.id
                        ),
                        other => anyhow::Error::from(other),
                    })?
                    .iter()
                    .map(|r| r.version),
            );
            next = to + 1;
        }
        used.sort_unstable();
        used.dedup();
    }
    let header = Header {
        kind: "drover-export".into(),
        format: EXPORT_FORMAT,
        exported_at_ms: crate::clock::now_ms(),
        from,
    };
    serde_json::to_writer(&mut *out, &header)?;
    out.write_all(b"\n")?;
    let plugins_dir = data_dir.join("plugins");
    for id in &used {
        let v = name(*id)?;
        let hex = hex::encode(v.digest);
        let file = plugins_dir.join(format!("{hex}.wasm"));
        // A component whose bytes no longer match its digest is damaged: exported as
        // missing (the import says so), never under a digest that is not its own.
        let component = std::fs::read(&file)
            .ok()
            .filter(|b| {
                use sha2::Digest as _;
                let intact = <[u8; 32]>::from(sha2::Sha256::digest(b)) == v.digest;
                if !intact {
                    tracing::warn!(file = %file.display(), "plugin component damaged (its bytes do not match their sha256): exported without it");
                }
                intact
            })
            .map(|b| base64::engine::general_purpose::STANDARD.encode(b));
        if component.is_none() {
            // Said here, where it can still be fixed (by restoring the file), not only by the
            // import, which attributes those records to another version.
            tracing::warn!(
                plugin = %v.plugin,
                version = v.number,
                file = %file.display(),
                "records of this version are exported without its component (removed from \
                 this server, or damaged): an import attributes them to their device's version"
            );
        }
        let line = PluginLine {
            kind: "plugin".into(),
            plugin: v.plugin.clone(),
            version: v.number,
            digest: hex,
            current: registry.current(&v.plugin).is_some_and(|c| c.id == v.id),
            component,
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
    }

    let mut summary = ExportSummary {
        plugins: used.len(),
        ..ExportSummary::default()
    };
    for id in &ids {
        let Some(head) = journal.device(id) else {
            continue;
        };
        let bound = name(head.version)?;
        let first = first_of(head.num);
        let (config, config_text) = raw_or_text(&head.config);
        let fx = journal.device_fx(head.num).unwrap_or_default();
        let now = crate::clock::now_ms();
        let owed = Owed {
            commands: fx
                .outbox
                .iter()
                .filter(|(id, c)| id.seq <= head.seq && c.expires_ms.is_none_or(|e| e > now))
                .map(|(id, _)| *id)
                .collect(),
            messages: fx
                .sent
                .iter()
                .filter(|(id, s)| id.seq <= head.seq && s.owed_to().is_some())
                .map(|(id, _)| *id)
                .collect(),
        };
        let line = DeviceLine {
            kind: "device".into(),
            device: id.to_string(),
            plugin: bound.plugin.clone(),
            version: bound.number,
            config,
            config_text,
            created_at_ms: head.created_at_ms,
            seq: head.seq,
            owed: Some(owed),
            num: Some(head.num),
            first_seq: (first > from).then_some(first),
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
        summary.devices += 1;
        let mut next = first;
        while next <= head.seq {
            let to = (next + 1023).min(head.seq);
            for r in journal.read_events(head.num, next, to)? {
                let v = name(r.version)?;
                let mut line = RecordLine {
                    kind: "record".into(),
                    seq: r.seq,
                    at_ms: r.at_ms,
                    plugin: v.plugin.clone(),
                    version: v.number,
                    event: None,
                    event_text: None,
                    transitions: None,
                    transitions_text: None,
                    lost: r.lost,
                    fx: r.fx.clone(),
                };
                if !r.lost {
                    (line.event, line.event_text) = raw_or_text(&r.event);
                    let raw: Option<Vec<Box<RawValue>>> =
                        r.transitions.iter().map(|t| raw_or_text(t).0).collect();
                    match raw {
                        Some(raw) => line.transitions = Some(raw),
                        None => {
                            line.transitions_text = Some(
                                r.transitions
                                    .iter()
                                    .map(|t| String::from_utf8_lossy(t).into_owned())
                                    .collect(),
                            )
                        }
                    }
                }
                serde_json::to_writer(&mut *out, &line)?;
                out.write_all(b"\n")?;
                summary.records += 1;
            }
            next = to + 1;
        }
    }
    let end = EndLine {
        kind: "end".into(),
        devices: summary.devices,
        records: summary.records,
    };
    serde_json::to_writer(&mut *out, &end)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(summary)
}

/// One parsed line of an export.
enum Line {
    Header(Header),
    Plugin(PluginLine),
    Device(DeviceLine),
    Record(RecordLine),
    End(EndLine),
}

fn parse(n: usize, text: &str) -> anyhow::Result<Line> {
    let at = || format!("line {n}");
    let kind: Kind = serde_json::from_str(text).with_context(at)?;
    Ok(match kind.kind.as_str() {
        "drover-export" => Line::Header(serde_json::from_str(text).with_context(at)?),
        "plugin" => Line::Plugin(serde_json::from_str(text).with_context(at)?),
        "device" => Line::Device(serde_json::from_str(text).with_context(at)?),
        "record" => Line::Record(serde_json::from_str(text).with_context(at)?),
        "end" => Line::End(serde_json::from_str(text).with_context(at)?),
        other => bail!("line {n}: unknown kind `{other}`"),
    })
}

/// Reads the export at `path` line by line.
fn lines(path: &Path) -> anyhow::Result<impl Iterator<Item = anyhow::Result<Line>>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(std::io::BufReader::new(file)
        .lines()
        .enumerate()
        .map(|(i, l)| parse(i + 1, &l.with_context(|| format!("line {}", i + 1))?)))
}

/// The components of the export, checked against their digests: `(plugin, number) ->
/// (digest, bytes, current)`. Ordered: an import registers them in the source's version
/// order, so the target numbers them in that order too (a hash map's order made a source's
/// latest version an older number in the target).
type Components = std::collections::BTreeMap<(String, u32), (String, Option<Vec<u8>>, bool)>;

/// JSON of an export line that a strict reader reads (see [`raw_or_text`]): the server
/// refuses any other as an event, and an export writes such text recorded before it did as a
/// string under `*_text`, never as JSON.
fn strictly_json(raw: &RawValue) -> anyhow::Result<()> {
    crate::json_check::strict(raw.get()).map_err(|e| {
        anyhow::anyhow!(
            "not JSON a strict reader reads back ({e}); text recorded so is given as a string, \
             under `event_text`, `transitions_text` or `config_text`"
        )
    })
}

/// Checks the whole export before anything is written (see the module docs); `exists` says
/// whether a device id is already in the target; with `engine`, every component is also
/// compiled (what registering it would do first). Returns the components and the device ids.
fn check(
    path: &Path,
    exists: &dyn Fn(&str) -> bool,
    engine: Option<&Engine>,
) -> anyhow::Result<(Components, Vec<String>)> {
    let mut components = Components::new();
    let mut ids: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut devices = 0usize;
    let mut records = 0u64;
    let mut device: Option<(String, u64)> = None;
    let mut ended = false;
    let mut it = lines(path)?;
    let first = it.next().transpose().map_err(|e| {
        anyhow::anyhow!(
            "{}: not a Drover export (its first line: {e:#})",
            path.display()
        )
    })?;
    match first {
        Some(Line::Header(h)) if h.kind == "drover-export" => {
            if h.format != EXPORT_FORMAT {
                bail!(
                    "{}: export format {} (this build reads {EXPORT_FORMAT})",
                    path.display(),
                    h.format
                );
            }
            if h.from > 1 {
                bail!(
                    "{}: a partial export (from seq {}) lacks the devices' earlier history and \
                     cannot be imported",
                    path.display(),
                    h.from
                );
            }
        }
        _ => bail!("{}: not a Drover export (no header line)", path.display()),
    }
    let close = |device: &Option<(String, u64)>, expected: u64| -> anyhow::Result<()> {
        if let Some((id, next)) = device
            && *next != expected + 1
        {
            bail!(
                "device `{id}`: records end at seq {} but the device is at {expected}",
                next - 1
            );
        }
        Ok(())
    };
    let mut expected_seq = 0u64;
    for line in it {
        if ended {
            bail!("{}: lines after the end line", path.display());
        }
        match line? {
            Line::Header(_) => bail!("a second header line"),
            Line::Plugin(p) => {
                if device.is_some() {
                    bail!(
                        "plugin `{}` v{} after the first device",
                        p.plugin,
                        p.version
                    );
                }
                crate::error::validate_id(&p.plugin)
                    .with_context(|| format!("plugin name `{}`", p.plugin))?;
                let bytes = match &p.component {
                    Some(b64) => {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(b64)
                            .with_context(|| {
                                format!("plugin `{}` v{}: component", p.plugin, p.version)
                            })?;
                        let digest = hex::encode(Sha256::digest(&bytes));
                        if digest != p.digest {
                            bail!(
                                "plugin `{}` v{}: the component's sha256 is {digest}, the export says {}",
                                p.plugin,
                                p.version,
                                p.digest
                            );
                        }
                        if let Some(engine) = engine {
                            engine.compile(&bytes).map_err(|e| {
                                anyhow::anyhow!(
                                    "plugin `{}` v{}: the component does not load: {e}",
                                    p.plugin,
                                    p.version
                                )
                            })?;
                        }
                        Some(bytes)
                    }
                    None => None,
                };
                components.insert((p.plugin, p.version), (p.digest, bytes, p.current));
            }
            Line::Device(d) => {
                close(&device, expected_seq)?;
                crate::error::validate_id(&d.device)
                    .with_context(|| format!("device id `{}`", d.device))?;
                if !seen.insert(d.device.clone()) {
                    bail!("device `{}` appears twice in the export", d.device);
                }
                if exists(&d.device) {
                    bail!(
                        "device `{}` already exists in the target data directory",
                        d.device
                    );
                }
                ids.push(d.device.clone());
                match components.get(&(d.plugin.clone(), d.version)) {
                    Some((_, Some(_), _)) => {}
                    _ => bail!(
                        "device `{}` runs `{}` v{}, whose component is not in the export",
                        d.device,
                        d.plugin,
                        d.version
                    ),
                }
                if d.config.is_none() && d.config_text.is_none() {
                    bail!("device `{}`: no config", d.device);
                }
                if let Some(config) = &d.config {
                    strictly_json(config)
                        .with_context(|| format!("device `{}`: config", d.device))?;
                }
                if let Some(first) = d.first_seq.filter(|f| *f > 1) {
                    bail!(
                        "{}: device `{}` starts at seq {first} (journal retention deleted its \
                         earlier history in the source): a partial export cannot be imported",
                        path.display(),
                        d.device
                    );
                }
                expected_seq = d.seq;
                device = Some((d.device, 1));
                devices += 1;
            }
            Line::Record(r) => {
                let Some((id, next)) = device.as_mut() else {
                    bail!("a record before any device");
                };
                if r.seq != *next {
                    bail!("device `{id}`: expected seq {next}, found {}", r.seq);
                }
                if !r.lost && r.event.is_none() && r.event_text.is_none() {
                    bail!("device `{id}` seq {}: no event", r.seq);
                }
                if let Some(event) = &r.event {
                    strictly_json(event)
                        .with_context(|| format!("device `{id}` seq {}: event", r.seq))?;
                }
                for (i, t) in r.transitions.iter().flatten().enumerate() {
                    strictly_json(t)
                        .with_context(|| format!("device `{id}` seq {}: transition {i}", r.seq))?;
                }
                if let Some(fx) = &r.fx
                    && fx.effects.len() > crate::decide::MAX_EFFECTS
                {
                    bail!(
                        "device `{id}` seq {}: {} effects, over the limit of {} per event",
                        r.seq,
                        fx.effects.len(),
                        crate::decide::MAX_EFFECTS
                    );
                }
                *next += 1;
                records += 1;
            }
            Line::End(e) => {
                close(&device, expected_seq)?;
                if (e.devices, e.records) != (devices, records) {
                    bail!(
                        "the end line counts {} devices and {} records; the file holds {devices} and {records}",
                        e.devices,
                        e.records
                    );
                }
                ended = true;
            }
        }
    }
    if !ended {
        bail!("{}: no end line: the export was cut short", path.display());
    }
    Ok((components, ids))
}

/// Imports the export at `path` into the data directory `data_dir` (created if missing; no
/// server may be using it). See the module docs: the file is checked whole before the
/// directory is even opened for writing, and if anything fails once writing began, the
/// devices written so far are removed again, so a retry starts from where it began.
pub async fn import(data_dir: &Path, path: &Path) -> anyhow::Result<ImportSummary> {
    // A directory a server runs on (it has a `LOCK`) is refused as such, before its devices
    // are compared with the file's; the writing below takes the lock for good. Without a
    // `LOCK` nothing runs there, and none is left behind by a check that fails.
    if data_dir.join("LOCK").exists() {
        drop(crate::builder::lock_data_dir(data_dir)?);
    }
    // An earlier import of this directory that was stopped part-way is undone first (by the
    // runtime's open, see the module docs), so that its devices do not count as existing.
    if data_dir.join(IMPORTING).exists() {
        Runtime::builder(data_dir).open().await?.shutdown().await;
    }
    let existing: Option<Journal> = if data_dir.join(crate::journal::FILE_NAME).exists() {
        Some(
            Journal::open_read_only(data_dir)
                .with_context(|| format!("opening the journal in {}", data_dir.display()))?,
        )
    } else {
        None
    };
    let exists = |id: &str| existing.as_ref().is_some_and(|j| j.device(id).is_some());
    // The target's own engine settings, if it has any: what registering will use.
    let config = if data_dir.join("engine.json").exists() {
        EngineConfig::load(data_dir)?
    } else {
        EngineConfig::default()
    };
    let engine = Engine::new(config)?;
    check(path, &exists, Some(&engine))?;
    drop((existing, engine));

    let rt = Runtime::builder(data_dir).open().await?;
    let result = write(&rt, path).await;
    rt.shutdown().await;
    result
}

/// The note an import leaves in its target data directory while it writes (see the module
/// docs).
pub(crate) const IMPORTING: &str = "IMPORTING.json";

/// Refuses to read a data directory holding an import stopped part-way: its devices' histories
/// are cut short, and the next server start (or the import run again) undoes them. An export
/// of it carried a valid end line and imported cleanly elsewhere, with the devices cut short.
pub(crate) fn refuse_unfinished_import(data_dir: &Path) -> anyhow::Result<()> {
    if data_dir.join(IMPORTING).exists() {
        bail!(
            "{} holds an import that was stopped part-way ({IMPORTING}): its devices are \
             incomplete. Run the import again, or start `drover serve` on the directory, \
             which undoes it; then read it",
            data_dir.display()
        );
    }
    Ok(())
}

/// What [`IMPORTING`] holds.
#[derive(Debug, Serialize, Deserialize)]
struct Importing {
    /// The export being imported, for the warning.
    export: String,
    /// Every device of the export: none was in the target before.
    devices: Vec<String>,
}

fn remove_note(note: &Path) -> anyhow::Result<()> {
    std::fs::remove_file(note).with_context(|| format!("removing {}", note.display()))?;
    if let Some(dir) = note.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))?;
    }
    Ok(())
}

/// Undoes an import into `dir` that was stopped part-way, if its note is there: removes every
/// device the note lists that `journal` has, then the note (see the module docs). Runs when a
/// data directory is opened for writing, before anything else does.
pub(crate) async fn undo_interrupted_import(dir: &Path, journal: &Journal) -> anyhow::Result<()> {
    let note = dir.join(IMPORTING);
    let bytes = match std::fs::read(&note) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", note.display())),
    };
    let importing: Importing = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{} (left by an import stopped part-way) is not readable; it lists the devices \
             that import wrote: remove them and the file by hand",
            note.display()
        )
    })?;
    let mut removed = 0usize;
    for id in &importing.devices {
        if let Some(head) = journal.device(id) {
            journal
                .record_removal(head.num, crate::clock::now_ms())
                .await
                .with_context(|| format!("undoing the unfinished import of device `{id}`"))?;
            removed += 1;
        }
    }
    remove_note(&note)?;
    tracing::warn!(
        export = %importing.export,
        devices = removed,
        "an import into this data directory was stopped before it finished: the devices it \
         had written are removed again (their records stay in the journal, belonging to no \
         device); run the import again"
    );
    Ok(())
}

/// The writing half of [`import`], on the target's runtime.
async fn write(rt: &Runtime, path: &Path) -> anyhow::Result<ImportSummary> {
    // Checked again under the data directory's lock: nobody can add a device meanwhile.
    let journal = rt.journal().clone();
    let (components, devices) = check(path, &|id| journal.device(id).is_some(), None)?;
    // The note that undoes this import if it is stopped part-way, durable before the first
    // write (see the module docs).
    let note = rt.shared.data_dir.join(IMPORTING);
    let importing = Importing {
        export: path.display().to_string(),
        devices,
    };
    crate::registry::write_replace(&note, &serde_json::to_vec(&importing)?)
        .with_context(|| format!("writing {}", note.display()))?;
    let mut left_behind = false;
    let result = write_noted(rt, path, components, &mut left_behind).await;
    // Done, or undone: nothing is left to undo. Devices the undo could not remove keep the
    // note, for the next open to remove.
    if !left_behind {
        remove_note(&note)?;
    }
    result
}

/// The rest of [`write`], once its note is down; sets `left_behind` if it fails and cannot
/// remove every device it wrote.
async fn write_noted(
    rt: &Runtime,
    path: &Path,
    components: Components,
    left_behind: &mut bool,
) -> anyhow::Result<ImportSummary> {
    let journal = rt.journal().clone();
    journal
        .require_format(crate::journal::FORMAT_VERSION)
        .context("the target journal cannot hold lost seqs")?;
    let mut summary = ImportSummary::default();

    // (plugin, number in the export) -> journal version id in the target.
    let mut ids: HashMap<(String, u32), u32> = HashMap::new();
    let mut current = Vec::new();
    // The export's current version becomes current only for a plugin new to the target: an
    // import never changes what the target's own devices run or get. Decided before any is
    // registered (once its first version is, a plugin is no longer new).
    let new_plugins: std::collections::HashSet<String> = components
        .keys()
        .map(|(plugin, _)| plugin.clone())
        .filter(|plugin| rt.shared.registry.current(plugin).is_none())
        .collect();
    for ((plugin, number), (digest, bytes, is_current)) in components {
        let Some(bytes) = bytes else { continue };
        let new_plugin = new_plugins.contains(&plugin);
        let (_, new) = rt
            .register_plugin(&plugin, bytes, Origin::Upload)
            .await
            .with_context(|| format!("registering `{plugin}` v{number}"))?;
        summary.plugins_registered += usize::from(new);
        let id = journal
            .versions()
            .into_iter()
            .rev()
            .find(|v| v.plugin == plugin && hex::encode(v.digest) == digest)
            .map(|v| v.id)
            .with_context(|| format!("`{plugin}` v{number} is not in the target journal"))?;
        if is_current && new_plugin {
            current.push(id);
        }
        ids.insert((plugin, number), id);
    }
    for id in current {
        rt.shared.registry.point(id, Origin::Upload)?;
    }

    let mut written: Vec<(u32, String, u64)> = Vec::new();
    let result = write_devices(rt, path, &ids, &mut written, &mut summary).await;
    let result = match result {
        // The recorded transitions are the truth; check that the plugin can fold them.
        Ok(()) => {
            let mut folded = Ok(());
            for (_, id, seq) in &written {
                if let Err(e) = rt.state_at(id, *seq).await {
                    folded = Err(anyhow::Error::new(e)
                        .context(format!("device `{id}`: rebuilding the imported history")));
                    break;
                }
            }
            folded
        }
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        // Leave the target's devices as they were: the ones written so far are removed (their
        // records stay in the journal, belonging to no device; their ids are free again). The
        // plugin versions registered stay (content-addressed, used by nothing).
        let mut left = Vec::new();
        for (num, id, _) in &written {
            if let Err(removal) = journal.record_removal(*num, crate::clock::now_ms()).await {
                tracing::error!(device = %id, error = %removal, "could not undo an imported device");
                left.push(id.as_str());
            }
        }
        if !left.is_empty() {
            *left_behind = true;
            return Err(e.context(format!(
                "import failed and could not be fully undone: devices {} remain in the \
                 target; the next server or import on it removes them first",
                left.join(", ")
            )));
        }
        return Err(e.context("import undone: no device of the export was kept"));
    }
    Ok(summary)
}

async fn write_devices(
    rt: &Runtime,
    path: &Path,
    ids: &HashMap<(String, u32), u32>,
    written: &mut Vec<(u32, String, u64)>,
    summary: &mut ImportSummary,
) -> anyhow::Result<()> {
    let journal = rt.journal().clone();
    // Every device first, so that each has its number here before any record names it (a
    // message's sender may come later in the file than its target).
    let mut nums: HashMap<String, u32> = HashMap::new();
    // Id -> number in the source: a message's sender is that device only if it matches.
    let mut source_nums: HashMap<String, Option<u32>> = HashMap::new();
    let mut owed_by: Vec<(u32, Owed)> = Vec::new();
    for line in lines(path)? {
        let Line::Device(mut d) = line? else { continue };
        let bound = ids[&(d.plugin.clone(), d.version)];
        let config = match (&d.config, &d.config_text) {
            (Some(raw), _) => raw.get().as_bytes().to_vec(),
            (None, Some(text)) => text.as_bytes().to_vec(),
            (None, None) => Vec::new(),
        };
        if journal.device(&d.device).is_some() {
            bail!("device `{}` already exists in the target", d.device);
        }
        let head = journal
            .record_device(&d.device, bound, &config, d.created_at_ms)
            .await?;
        nums.insert(d.device.clone(), head.num);
        source_nums.insert(d.device.clone(), d.num);
        if let Some(owed) = d.owed.take() {
            owed_by.push((head.num, owed));
        }
        written.push((head.num, d.device, d.seq));
        summary.devices += 1;
    }
    let mut writer = None;
    let mut bound = 0u32;
    let failure: Arc<parking_lot::Mutex<Option<JournalError>>> = Arc::default();
    for line in lines(path)? {
        match line? {
            Line::Device(d) => {
                if writer.is_some() {
                    journal.barrier().await?;
                }
                bound = ids[&(d.plugin.clone(), d.version)];
                let num = nums
                    .get(&d.device)
                    .with_context(|| format!("device `{}` was not provisioned", d.device))?;
                writer = Some(journal.device_writer(*num, 1024));
            }
            Line::Record(r) => {
                let Some(w) = writer.as_ref() else { continue };
                let version = match ids.get(&(r.plugin.clone(), r.version)) {
                    Some(id) => *id,
                    None => {
                        summary.records_reattributed += 1;
                        bound
                    }
                };
                w.room().await;
                let failed = failure.clone();
                let done = move |result: Result<(), JournalError>| {
                    if let Err(e) = result {
                        failed.lock().get_or_insert(e);
                    }
                };
                if r.lost {
                    w.append_lost(r.seq, r.at_ms, version, done);
                } else {
                    let event = match (&r.event, &r.event_text) {
                        (Some(raw), _) => raw.get().to_string(),
                        (None, Some(text)) => text.clone(),
                        (None, None) => String::new(),
                    };
                    let transitions: Vec<String> = match (&r.transitions, &r.transitions_text) {
                        (Some(raw), _) => raw.iter().map(|t| t.get().to_string()).collect(),
                        (None, Some(texts)) => texts.clone(),
                        (None, None) => Vec::new(),
                    };
                    // Device numbers are journal-local: a message's sender is renumbered to
                    // its number here if this import brought that very device (same id and
                    // source number); otherwise `u32::MAX`, nobody: a device of the target
                    // with the same id, or one the source removed and provisioned again, is
                    // another device, which owes nothing of this. Its sending record may come
                    // later in the file: the index then notes it as handled ahead.
                    let fx = r.fx.clone().map(|mut fx| {
                        if let crate::journal::Origin::Message { sender, num, .. } = &mut fx.origin
                        {
                            let same = source_nums
                                .get(sender.as_str())
                                .is_some_and(|source| source.is_none_or(|n| n == *num));
                            *num = nums
                                .get(sender.as_str())
                                .filter(|_| same)
                                .copied()
                                .unwrap_or(u32::MAX);
                        }
                        fx
                    });
                    w.append_event(
                        r.seq,
                        r.at_ms,
                        version,
                        &event,
                        transitions,
                        fx,
                        move |r, _| done(r),
                    );
                }
                summary.records += 1;
            }
            _ => {}
        }
    }
    journal.barrier().await?;
    if let Some(e) = failure.lock().take() {
        return Err(e).context("writing the imported records");
    }
    summary.effects_settled = settle(&journal, owed_by).await?;
    Ok(())
}

/// Records as settled every command and message the imported records left owed that the
/// source did not owe any more (see [`Owed`]); returns how many. After every record is
/// written, so that messages handled by an imported target are already struck.
async fn settle(journal: &Journal, owed_by: Vec<(u32, Owed)>) -> anyhow::Result<usize> {
    let at_ms = crate::clock::now_ms();
    let mut settle: Vec<(u32, EffectId)> = Vec::new();
    for (num, owed) in owed_by {
        let Some(fx) = journal.device_fx(num) else {
            continue;
        };
        let keep: std::collections::HashSet<EffectId> = owed
            .commands
            .iter()
            .chain(&owed.messages)
            .copied()
            .collect();
        let owed_here = fx.outbox.keys().copied().chain(
            fx.sent
                .iter()
                .filter(|(_, s)| s.owed_to().is_some())
                .map(|(id, _)| *id),
        );
        settle.extend(
            owed_here
                .filter(|id| !keep.contains(id))
                .map(|id| (num, id)),
        );
    }
    // Concurrently, so that they share commits.
    for chunk in settle.chunks(1024) {
        futures::future::try_join_all(
            chunk
                .iter()
                .map(|(num, id)| journal.record_command_ack(*num, *id, at_ms)),
        )
        .await
        .context("recording settled effects")?;
    }
    Ok(settle.len())
}
