//! Dry-run: what a plugin version would have decided on a device's real history.
//!
//! For each device, a sandboxed instance of the candidate version is `init`ed with the
//! device's config and given every recorded input event again, with the recorded seq, time
//! and seed in its context, through the same `decide` path and limits the live
//! actor uses. Its transitions are compared with the recorded ones, event by event, and its
//! final state with the device's recorded state (the journal folded by the device's own
//! version). Nothing is written, no live actor is involved, and the journal is only read:
//! it runs on the read side, on a blocking thread, and works on a journal opened read-only
//! beside a running server (or on an exported one in CI).
//!
//! Separately, it answers the question a deploy requires: can the candidate *fold* the
//! recorded transitions ([`crate::upgrade`]). A version that decides differently can still
//! be deployed (that is what a behavior change is); one that cannot fold cannot.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::decide::{self, Failed};
use crate::engine::Instance;
use crate::error::Error;
use crate::journal::{DeviceHead, Journal, JournalError, Origin};
use crate::registry::Registry;
use crate::replay::{self, Start};

/// Limits a dry-run applies, the same as the live actor's.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_output_bytes: usize,
    /// Time budget of one re-decided event.
    pub call_timeout: Duration,
}

/// The first event where the candidate decided differently.
#[derive(Debug, Clone, Serialize)]
pub struct Divergence {
    pub seq: u64,
    /// The recorded input event.
    pub event: Value,
    /// The transitions recorded at this seq.
    pub recorded: Vec<Value>,
    /// The candidate's transitions (absent when it refused or failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate: Option<Vec<Value>>,
    /// Why the candidate produced no transitions: a refusal (`rejected: CODE: message`), a
    /// trap, a timeout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The effects recorded at this seq, when the candidate's differ (same transitions,
    /// other commands, messages or timers: a divergence too, since effects reach the world).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recorded_effects: Vec<Value>,
    /// The candidate's effects, when they differ from the recorded ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate_effects: Option<Vec<Value>>,
}

/// One change between the recorded state and the candidate's, as an RFC 6902 JSON Patch
/// operation (`op`, `path`, `value`) plus `was`: the recorded value at `path`.
pub type StateChange = Value;

/// One device's dry-run.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceDryRun {
    pub device: String,
    /// The device's version (number) whose recorded history is compared.
    pub recorded_version: u32,
    /// Recorded events re-decided: up to and including the one the candidate failed on
    /// when that discarded its instance (see `error`), not the history folded after it.
    pub events: u64,
    /// Whether every event got the same transitions and effects and the final states are
    /// equal.
    pub identical: bool,
    /// Events whose transitions or effects differ.
    pub diverged_events: u64,
    /// Of those, the events the candidate failed on (a trap, a timeout, an oversized
    /// output: anything but a refusal, which is a decision) where the recorded version
    /// decided. A failure discards the candidate's instance, so nothing after the first one
    /// is compared, and this is 0 or 1.
    pub failed_events: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_divergence: Option<Divergence>,
    pub state_matches: bool,
    /// Whether the states were compared at all (not when the dry-run stopped before the
    /// end, e.g. the candidate's `init` failed): only then does `state_matches: false` mean
    /// the device ends in another state.
    pub state_compared: bool,
    /// Recorded state → candidate's state, when they differ.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub state_diff: Vec<StateChange>,
    /// Whether the candidate folds the recorded transitions (required for a deploy).
    pub folds: bool,
    /// The recorded seq the candidate could not fold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fold_failed_seq: Option<u64>,
    /// A failure that stopped the dry-run of this device (the candidate trapped, the
    /// journal could not be read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The dry-run stopped, before it found anything, because the server lacked a core or
    /// memory for a guest call (code `overloaded`): it says nothing about the candidate, so
    /// this device is neither identical nor diverged. Run it again when the server is less
    /// loaded.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub overloaded: bool,
    /// The candidate ran out of its time budget on this device (a decision or a fold that
    /// spins); a deploy then folds its live devices one at a time (see `crate::deploy`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
}

impl DeviceDryRun {
    /// A device's line before anything was checked: nothing found, and it folds until a
    /// fold fails (a failure elsewhere, the device's own version or a journal read, says
    /// nothing about the candidate and must not block its deploy).
    fn unchecked(device: &str, recorded_version: u32) -> DeviceDryRun {
        DeviceDryRun {
            device: device.to_string(),
            recorded_version,
            events: 0,
            identical: false,
            diverged_events: 0,
            failed_events: 0,
            first_divergence: None,
            state_matches: false,
            state_compared: false,
            state_diff: Vec::new(),
            folds: true,
            fold_failed_seq: None,
            error: None,
            overloaded: false,
            timed_out: false,
        }
    }
}

/// Dry-runs plugin version `candidate` (journal-local id) on `device`'s recorded history.
///
/// One pass over the journal. The candidate re-decides each recorded event; while its
/// transitions equal the recorded ones, its instance is also the proof that it folds them.
/// From the first divergence on, a second instance folds the recorded transitions (brought
/// up to that point by a replay), to answer "can it fold" separately.
pub fn device(
    journal: &Journal,
    registry: &Registry,
    head: &DeviceHead,
    candidate: u32,
    limits: Limits,
) -> DeviceDryRun {
    let mut out = DeviceDryRun::unchecked(
        &head.id,
        registry.version(head.version).map_or(0, |v| v.number),
    );
    match one_pass(journal, registry, head, candidate, limits, &mut out) {
        Ok(()) => {}
        // What was found before the overload stands (the candidate cannot fold, or decided
        // differently); only a run that found nothing yet says nothing.
        Err(e @ Error::Overloaded(_)) if out.folds && out.diverged_events == 0 => {
            out.overloaded = true;
            out.error = Some(candidate_says(&e));
        }
        Err(e) => {
            out.error.get_or_insert(candidate_says(&e));
        }
    }
    out.identical = out.error.is_none() && out.diverged_events == 0 && out.state_matches;
    out
}

/// An error as a dry run reports it: what the runtime words as "the device's plugin" did
/// is, here, what the candidate version did (the device's own version is not run).
fn candidate_says(e: &Error) -> String {
    e.to_string()
        .replacen("the device's plugin", "the candidate version", 1)
}

/// [`candidate_says`] of an error folding recorded transitions: a refusal there is of a
/// transition, not of an event (`apply` refused what `handle` once returned).
fn candidate_folding_says(e: &Error) -> String {
    candidate_says(e).replacen(
        "the candidate version refused the event",
        "the candidate version refused a recorded transition",
        1,
    )
}

/// The candidate's fold instance, once decisions diverged.
enum Folder {
    /// Decisions have matched so far: the deciding instance folds the same transitions.
    SameAsDecider,
    Own(Box<Instance>),
    /// It could not fold (reported); folding stops.
    Failed,
}

/// The candidate (`want`) brought up to `seq` by folding the recorded transitions; `None`
/// if it cannot fold them (recorded in `out`). A server short of a core or of memory is
/// the error: the dry run is inconclusive.
fn folded_up_to(
    journal: &Journal,
    registry: &Registry,
    want: &DeviceHead,
    seq: u64,
    start: Start,
    out: &mut DeviceDryRun,
) -> Result<Option<Instance>, Error> {
    match replay::rebuild_reporting(journal, registry, want, seq, start) {
        Ok(r) => Ok(Some(r.instance)),
        Err(f) if matches!(f.error, Error::Overloaded(_)) => Err(f.error),
        Err(f) => {
            out.timed_out |= f.timed_out;
            out.fold_failed_seq = f.seq;
            out.error.get_or_insert(format!(
                "cannot fold the recorded transitions: {}",
                candidate_folding_says(&f.error)
            ));
            out.folds = false;
            Ok(None)
        }
    }
}

fn one_pass(
    journal: &Journal,
    registry: &Registry,
    head: &DeviceHead,
    candidate: u32,
    limits: Limits,
    out: &mut DeviceDryRun,
) -> Result<(), Error> {
    // The device's own version, not the candidate, rebuilds and reads the recorded state:
    // its failure is its own (a review saw the candidate blamed for the old `query`'s panic,
    // in code the candidate no longer had).
    let recorded_state = replay::rebuild(journal, registry, head, head.seq, Start::Snapshot)
        .and_then(|mut rebuilt| Ok(parse(&rebuilt.instance.query()?)))
        .inspect_err(|e| {
            if !matches!(e, Error::Overloaded(_)) {
                out.error = Some(format!(
                    "the device's own version (v{}) could not rebuild or read its recorded \
                     state, so nothing of the candidate was checked: {e}",
                    out.recorded_version
                ));
            }
        })?;
    let mut want = head.clone();
    want.version = candidate;
    let config = std::str::from_utf8(&head.config)
        .map_err(|_| Error::Internal("stored config is not UTF-8".into()))?;
    // A candidate that cannot even start on this device cannot fold its history. Starting
    // (`init`, or `restore` below) is part of an activation, and gets an activation's budget,
    // as the deploy's upgrade and the device's next activation give it: with an event's, a
    // plugin whose `init` builds a large table was refused by every deploy (a review).
    let setup_budget = registry.engine().config().activation_timeout;
    let started = registry.compiled(candidate).and_then(|compiled| {
        let mut d = compiled.instantiate(head.id.clone())?;
        // `Rejected`'s own words speak of an event: this is the device's config.
        d.within(setup_budget, |i| i.init(&head.id, config))
            .map_err(|e| match Error::from(e) {
                Error::Rejected { code, message } => Error::ConfigRefused { code, message },
                e => e,
            })?;
        Ok(d)
    });
    let mut decider = match started {
        Ok(d) => Some(d),
        Err(e) => {
            out.folds = matches!(e, Error::Overloaded(_));
            return Err(e);
        }
    };
    let mut folder = Folder::SameAsDecider;

    // Retention deleted the start of the history: compare from the recorded version's
    // newest snapshot, which the candidate must restore (that is how a deploy would bring
    // the device up), on the events kept after it.
    let mut next = 1;
    let kept_from = journal.oldest_retained_seq(head.num);
    let start = if kept_from > 1 {
        let snap = journal
            .snapshots(head.num)
            .into_iter()
            .rev()
            .find(|s| s.version == head.version && s.seq <= head.seq)
            .ok_or(Error::Journal(JournalError::RetainedAway {
                oldest: kept_from,
            }))?;
        let data = journal.read_snapshot(snap)?;
        if let Some(d) = decider.as_mut()
            && let Err(e) = d.within(setup_budget, |i| i.restore(&data))
        {
            let e = Error::from(e);
            out.folds = matches!(e, Error::Overloaded(_));
            if !out.folds {
                // No event was refused and nothing was folded: the snapshot is the trouble.
                out.error = Some(format!(
                    "the candidate cannot restore the snapshot at seq {} (retention deleted \
                     the history before it, so the device starts from it): {}",
                    snap.seq,
                    candidate_says(&e).replacen(
                        "the candidate version refused the event",
                        "`restore` refused it",
                        1
                    )
                ));
            }
            return Err(e);
        }
        next = snap.seq + 1;
        Start::SnapshotOf(head.version)
    } else {
        Start::Genesis
    };

    const CHUNK: u64 = 1024;
    while next <= head.seq {
        let to = (next + CHUNK - 1).min(head.seq);
        for record in journal.read_events(head.num, next, to)? {
            if record.lost {
                // Destroyed by media damage: no event to re-decide, nothing was folded.
                continue;
            }
            // Re-decided only while the candidate has an instance: after it failed, the
            // recorded transitions are still folded, but no decision is compared.
            if decider.is_some() {
                out.events += 1;
            }
            let event = String::from_utf8_lossy(&record.event);
            let decided = decider.as_mut().map(|instance| {
                let origin = record
                    .fx
                    .as_ref()
                    .map_or(&Origin::External, |fx| &fx.origin);
                let ctx = decide::context(&head.id, record.seq, record.at_ms, origin);
                decide::decide(
                    instance,
                    &ctx,
                    &event,
                    limits.max_output_bytes,
                    limits.call_timeout,
                )
            });
            // Waiting for a core is no divergence: the whole dry-run is inconclusive.
            if let Some(Err(Failed {
                error: e @ Error::Overloaded(_),
                ..
            })) = &decided
            {
                return Err(e.clone());
            }
            // Effects are compared as recorded (their payloads are the plugin's JSON texts).
            let recorded_effects = record.fx.as_ref().map_or(&[][..], |fx| &fx.effects[..]);
            // A message or timer firing the candidate refuses, traps or runs out of time on
            // is consumed with nothing, as it is recorded when the recorded version did the
            // same (a poison message): no divergence. (An external event refused is not
            // recorded at all, so there it is one.)
            let consumed_alike = record
                .fx
                .as_ref()
                .is_some_and(|fx| !matches!(fx.origin, Origin::External))
                && record.transitions.is_empty()
                && recorded_effects.is_empty()
                && matches!(&decided, Some(Err(_)));
            let same = match &decided {
                Some(Ok(decided)) => {
                    let ts = &decided.transitions;
                    ts.len() == record.transitions.len()
                        && ts.iter().zip(&record.transitions).all(|(a, b)| {
                            a.as_bytes() == b.as_slice() || parse(a) == parse_bytes(b)
                        })
                }
                _ => consumed_alike,
            };
            let lost = matches!(
                &decided,
                Some(Err(Failed {
                    instance_lost: true,
                    ..
                }))
            );
            let same_effects = match &decided {
                Some(Ok(decided)) => decided.effects == recorded_effects,
                _ => true,
            };
            if same && !same_effects {
                out.diverged_events += 1;
                if out.first_divergence.is_none()
                    && let Some(Ok(decided)) = &decided
                {
                    let json =
                        |e: &crate::journal::Effect| serde_json::to_value(e).unwrap_or_default();
                    out.first_divergence = Some(Divergence {
                        seq: record.seq,
                        event: parse(&event),
                        recorded: record.transitions.iter().map(|t| parse_bytes(t)).collect(),
                        candidate: Some(decided.transitions.iter().map(|t| parse(t)).collect()),
                        error: None,
                        recorded_effects: recorded_effects.iter().map(json).collect(),
                        candidate_effects: Some(decided.effects.iter().map(json).collect()),
                    });
                }
            }
            if !same {
                // From here the decider's state is its own: fold the recorded transitions in
                // an instance of their own, brought up to just before this event.
                if matches!(folder, Folder::SameAsDecider) {
                    folder =
                        match folded_up_to(journal, registry, &want, record.seq - 1, start, out)? {
                            Some(instance) => Folder::Own(Box::new(instance)),
                            None => Folder::Failed,
                        };
                }
                if let Some(decided) = decided {
                    out.diverged_events += 1;
                    if decided
                        .as_ref()
                        .is_err_and(|f| !matches!(f.error, Error::Rejected { .. }))
                    {
                        out.failed_events += 1;
                    }
                    if out.first_divergence.is_none() {
                        out.first_divergence = Some(Divergence {
                            seq: record.seq,
                            event: parse(&event),
                            recorded: record.transitions.iter().map(|t| parse_bytes(t)).collect(),
                            candidate: decided
                                .as_ref()
                                .ok()
                                .map(|d| d.transitions.iter().map(|t| parse(t)).collect()),
                            error: decided.as_ref().err().map(|f| candidate_says(&f.error)),
                            recorded_effects: Vec::new(),
                            candidate_effects: None,
                        });
                    }
                    if let Err(Failed {
                        instance_lost: true,
                        error,
                    }) = decided
                    {
                        out.timed_out |= matches!(error, Error::Timeout { .. });
                        out.error = Some(format!(
                            "the candidate failed at seq {} (its instance is discarded, so nothing after \
                             it is compared): {}",
                            record.seq,
                            candidate_says(&error)
                        ));
                        decider = None;
                    }
                }
            }
            if consumed_alike && lost {
                // The live device rebuilds its instance from the journal at its next event:
                // so does the candidate's here, while its state is still the recorded one.
                decider = match folder {
                    Folder::SameAsDecider => {
                        let rebuilt =
                            folded_up_to(journal, registry, &want, record.seq, start, out)?;
                        if rebuilt.is_none() {
                            folder = Folder::Failed;
                        }
                        rebuilt
                    }
                    // Its state was its own already: what it would be rebuilt from is not
                    // recorded, so nothing after this is compared.
                    _ => {
                        out.error.get_or_insert(format!(
                            "the candidate failed at seq {} after its decisions had diverged \
                             (its instance is discarded, so nothing after it is compared)",
                            record.seq
                        ));
                        None
                    }
                };
            }
            if let Folder::Own(instance) = &mut folder {
                let transitions: Vec<&str> = record
                    .transitions
                    .iter()
                    .map(|t| std::str::from_utf8(t).unwrap_or_default())
                    .collect();
                let folded =
                    instance.within(limits.call_timeout, |i| decide::fold(i, &transitions));
                if let Err(e @ Error::Overloaded(_)) = folded {
                    return Err(e);
                }
                if let Err(e) = folded {
                    out.timed_out |= matches!(e, Error::Timeout { .. });
                    out.fold_failed_seq = Some(record.seq);
                    out.error.get_or_insert(format!(
                        "cannot fold the recorded transitions at seq {}: {}",
                        record.seq,
                        candidate_folding_says(&e)
                    ));
                    out.folds = false;
                    folder = Folder::Failed;
                }
            }
        }
        next = to + 1;
    }
    out.folds = !matches!(folder, Folder::Failed);
    let Some(mut decider) = decider else {
        return Ok(());
    };
    let candidate_state = parse(&decider.query()?);
    out.state_matches = candidate_state == recorded_state;
    out.state_compared = true;
    if !out.state_matches {
        out.state_diff = state_diff(&recorded_state, &candidate_state);
    }
    Ok(())
}

/// The changes from `recorded` to `candidate` as JSON Patch operations, each with the value
/// it replaces (`was`) so a reader sees both sides.
pub fn state_diff(recorded: &Value, candidate: &Value) -> Vec<StateChange> {
    let patch = json_patch::diff(recorded, candidate);
    let Ok(Value::Array(ops)) = serde_json::to_value(&patch) else {
        return Vec::new();
    };
    ops.into_iter()
        .map(|mut op| {
            let was = op
                .get("path")
                .and_then(Value::as_str)
                .and_then(|p| recorded.pointer(p))
                .cloned();
            if let (Some(was), Some(map)) = (was, op.as_object_mut()) {
                map.insert("was".into(), was);
            }
            op
        })
        .collect()
}

/// JSON text as a value; text that is not JSON stays a string, so it still compares.
fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

fn parse_bytes(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// A dry-run over several devices.
#[derive(Debug, Clone, Serialize)]
pub struct DryRunReport {
    pub plugin: String,
    pub version: u32,
    pub devices: Vec<DeviceDryRun>,
    pub totals: DryRunTotals,
    pub elapsed_ms: u64,
}

/// Fleet totals of a dry-run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DryRunTotals {
    pub devices: usize,
    pub identical: usize,
    /// Devices where some event was decided differently or the final state differs.
    pub diverged: usize,
    /// Devices where some recorded event was decided differently.
    pub decide_differently: usize,
    /// Of those, the devices where the candidate failed on an event (trapped, timed out,
    /// wrote too much) rather than decided otherwise: such a version may fold every history
    /// and still fail the fleet's next events.
    pub failed_to_decide: usize,
    /// Devices whose final state differs from the recorded one.
    pub state_differs: usize,
    /// Devices whose recorded transitions the candidate cannot fold.
    pub cannot_fold: usize,
    /// Devices whose dry-run was cut short by an overloaded server (neither identical nor
    /// diverged: see [`DeviceDryRun::overloaded`]).
    pub overloaded: usize,
    pub events: u64,
    /// Re-decided events per second of wall time.
    pub events_per_s: u64,
}

/// Dry-runs `candidate` on `heads`, one after another on the calling thread.
pub fn run(
    journal: &Journal,
    registry: &Registry,
    plugin: &str,
    candidate: u32,
    heads: &[DeviceHead],
    limits: Limits,
) -> DryRunReport {
    run_until(journal, registry, plugin, candidate, heads, limits, |_| {
        false
    })
}

/// [`run`], stopping before the next device once `stop`, given the devices dry-run so far,
/// says so (a server that stops, a candidate that spins): the report then covers those.
/// One device's dry-run is bounded by its budgets (a candidate that spins fails at its
/// first call's), so a stop waits for one.
pub fn run_until(
    journal: &Journal,
    registry: &Registry,
    plugin: &str,
    candidate: u32,
    heads: &[DeviceHead],
    limits: Limits,
    stop: impl Fn(&[DeviceDryRun]) -> bool,
) -> DryRunReport {
    let started = Instant::now();
    let mut devices: Vec<DeviceDryRun> = Vec::with_capacity(heads.len());
    for h in heads {
        if stop(&devices) {
            break;
        }
        devices.push(device(journal, registry, h, candidate, limits));
    }
    let elapsed = started.elapsed();
    let mut totals = DryRunTotals::of(&devices);
    totals.events_per_s = (totals.events as f64 / elapsed.as_secs_f64().max(1e-9)) as u64;
    DryRunReport {
        plugin: plugin.to_string(),
        version: registry.version(candidate).map_or(0, |v| v.number),
        devices,
        totals,
        elapsed_ms: elapsed.as_millis() as u64,
    }
}

impl DryRunTotals {
    /// The totals of `devices` (all but the rate).
    fn of(devices: &[DeviceDryRun]) -> DryRunTotals {
        let mut totals = DryRunTotals {
            devices: devices.len(),
            ..Default::default()
        };
        for d in devices {
            totals.events += d.events;
            if d.overloaded {
                totals.overloaded += 1;
                continue;
            }
            if d.identical {
                totals.identical += 1;
            } else {
                totals.diverged += 1;
            }
            if !d.folds {
                totals.cannot_fold += 1;
            }
            if d.diverged_events > 0 {
                totals.decide_differently += 1;
            }
            if d.failed_events > 0 {
                totals.failed_to_decide += 1;
            }
            // A device the dry-run stopped on before the end (a candidate whose `init` fails)
            // was counted here too, beside `cannot_fold`, though no state was compared.
            if d.state_compared && !d.state_matches {
                totals.state_differs += 1;
            }
        }
        totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal while folding is of a recorded transition, a refusal while deciding of an
    /// event (a fold failure read "the candidate version refused the event").
    #[test]
    fn a_refusal_while_folding_names_a_transition() {
        let refused = Error::Rejected {
            code: "invalid-transition".into(),
            message: "unknown variant".into(),
        };
        assert_eq!(
            candidate_folding_says(&refused),
            "the candidate version refused a recorded transition: invalid-transition: unknown \
             variant"
        );
        assert_eq!(
            candidate_says(&refused),
            "the candidate version refused the event: invalid-transition: unknown variant"
        );
    }

    fn device(id: &str) -> DeviceDryRun {
        DeviceDryRun {
            events: 3,
            ..DeviceDryRun::unchecked(id, 1)
        }
    }

    /// A device the dry-run stopped on before comparing states (the candidate's `init`
    /// failed) cannot fold; it does not also end in another state, which nobody compared.
    #[test]
    fn a_device_whose_states_were_not_compared_does_not_differ_in_state() {
        let init_failed = DeviceDryRun {
            folds: false,
            error: Some("init failed".into()),
            ..device("a")
        };
        let differs = DeviceDryRun {
            state_compared: true,
            ..device("b")
        };
        let same = DeviceDryRun {
            state_compared: true,
            state_matches: true,
            identical: true,
            ..device("c")
        };
        let t = DryRunTotals::of(&[init_failed, differs, same]);
        assert_eq!(
            (
                t.devices,
                t.identical,
                t.diverged,
                t.cannot_fold,
                t.state_differs
            ),
            (3, 1, 2, 1, 1)
        );
        assert_eq!(t.events, 9);
    }
}
