//! Rebuilding a device's state from the journal.
//!
//! The one routine behind actor activation, `GET /state?at=SEQ`, `drover replay` and the
//! determinism tests: start from the newest usable snapshot at or before the target seq (or
//! from `init` with the provisioned config), then `apply` every later committed transition in
//! order. Transitions are applied as recorded; `handle` is never called, so replay has no side
//! effects and needs no clock.

use std::future::Future;
use std::path::Path;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::config::EngineConfig;
use crate::decide;
use crate::engine::{CallError, Engine, Instance, Preemption, UnitScope, WALL_LIMIT, cpu_clock};
use crate::error::Error;
use crate::journal::{DeviceHead, Journal, JournalError, SnapshotRef};
use crate::registry::Registry;
use crate::view::DeviceState;

/// How many event records are read from the journal per step of a replay.
const CHUNK: u64 = 1024;

/// Most transitions per guest call when folding history (`apply-batch`, contract `0.3.0`).
const BATCHED: usize = decide::BATCH_TRANSITIONS;

/// Where to start a rebuild from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The newest snapshot at or before the target (falling back to `init` if it will not
    /// restore).
    Snapshot,
    /// Always `init` and replay everything: the reference that snapshots are checked against.
    Genesis,
    /// The newest snapshot taken by plugin version `0` (another version than the device's:
    /// an upgrade whose history before it was deleted by retention starts from the old
    /// version's snapshot, if the new version restores it).
    SnapshotOf(u32),
}

/// A rebuilt instance and how it was made.
pub struct Rebuilt {
    pub instance: Instance,
    /// The seq the state corresponds to.
    pub seq: u64,
    /// Timestamp of the event at `seq` (the device's creation time if none).
    pub last_at_ms: u64,
    /// The snapshot restored, if any.
    pub snapshot: Option<u64>,
    /// Whether that snapshot was taken by another plugin version than the device's (after
    /// retention deleted the history a replay needs): the caller takes a snapshot of its own
    /// at once, so later activations do not depend on the old one.
    pub foreign_snapshot: bool,
    /// A snapshot tried first would not restore (the plugin's fault, not the server's): the
    /// rebuild fell back to an older one or to `init`.
    pub snapshot_failed: bool,
    /// A snapshot tried first could not be read from the journal (media damage, found by its
    /// checksum): the rebuild fell back as for [`Rebuilt::snapshot_failed`], but the plugin is
    /// not at fault, so its snapshots go on; the caller takes one at once, so neither the next
    /// activation nor retention depends on the damaged one.
    pub snapshot_unreadable: bool,
    /// Transitions applied after the starting point.
    pub applied: u64,
}

/// Rebuilds `device`'s state as of `upto` (clamped to its latest seq).
pub fn rebuild(
    journal: &Journal,
    registry: &Registry,
    device: &DeviceHead,
    upto: u64,
    start: Start,
) -> Result<Rebuilt, Error> {
    rebuild_as(journal, registry, device, upto, start, Preemption::None)
}

/// [`rebuild`], each of its guest calls' units stopped as `preemption` says: an actor on the
/// pool activates a device of a plugin that has not run slow with [`Preemption::Move`], and a
/// rebuild stopped so (a restore, an `init` or a chunk of replayed `apply`s that used two
/// epoch ticks: the plugin is now marked slow) fails as `Error::Overloaded`, to be done
/// again on the slow lane. A healthy long replay is not stopped: each chunk of 1,024
/// records is a unit of its own.
pub fn rebuild_as(
    journal: &Journal,
    registry: &Registry,
    device: &DeviceHead,
    upto: u64,
    start: Start,
    preemption: Preemption,
) -> Result<Rebuilt, Error> {
    rebuild_reporting_as(journal, registry, device, upto, start, preemption).map_err(|f| f.error)
}

/// [`rebuild`] on the slow lane: each of its guest calls (`restore`, `init`, every batch of
/// `apply`s) runs on a fiber that yields its thread at each epoch tick once the plugin has
/// run slow ([`Preemption::Yield`]), so a rebuild that spins holds a slow-lane thread a tick
/// at a time, and the other slow devices' events, reads and activations go on meanwhile.
/// Its budget is charged what its own units used, not its thread's clock, which counts the
/// units of others run between its slices.
pub(crate) async fn rebuild_preemptible(
    journal: &Journal,
    registry: &Registry,
    device: &DeviceHead,
    upto: u64,
    start: Start,
) -> Result<Rebuilt, RebuildFailure> {
    rebuild_reporting_with(journal, registry, device, upto, start, Preemption::Yield).await
}

/// Why a rebuild failed, and at which recorded seq if it was folding the journal.
#[derive(Debug)]
pub struct RebuildFailure {
    /// The seq whose transitions the plugin could not apply (`None`: it failed before, in
    /// instantiation, `init` or reading the journal).
    pub seq: Option<u64>,
    pub error: Error,
    /// A trap inside one `apply-batch` call of several transitions: `seq` is the batch's
    /// first, not necessarily the one that trapped (see [`rebuild_reporting`]).
    pub(crate) unlocated: bool,
    /// The plugin trapped (rather than refused, timed out, or the journal failed).
    pub(crate) trapped: bool,
    /// The plugin ran out of its time budget (a fold that spins): the failure cost that
    /// budget, which a deploy weighs before folding more devices (see `crate::deploy`).
    pub(crate) timed_out: bool,
    /// A snapshot would not restore on the way (the plugin's fault), as in
    /// [`Rebuilt::snapshot_failed`]: an actor stops trying its snapshots even though the
    /// rebuild failed, so that its next activation replays from `init` with a whole budget
    /// instead of spending it on the same snapshot again.
    pub(crate) snapshot_failed: bool,
    /// The snapshot restored before the failure, if any: the failure was in folding the
    /// tail after it.
    pub(crate) restored: Option<u64>,
}

impl From<Error> for RebuildFailure {
    fn from(error: Error) -> Self {
        RebuildFailure {
            seq: None,
            timed_out: matches!(error, Error::Timeout { .. }),
            error,
            unlocated: false,
            trapped: false,
            snapshot_failed: false,
            restored: None,
        }
    }
}

impl From<JournalError> for RebuildFailure {
    fn from(e: JournalError) -> Self {
        Error::from(e).into()
    }
}

/// [`rebuild`], saying at which seq it failed: what a deploy reports per device.
pub fn rebuild_reporting(
    journal: &Journal,
    registry: &Registry,
    device: &DeviceHead,
    upto: u64,
    start: Start,
) -> Result<Rebuilt, RebuildFailure> {
    rebuild_reporting_as(journal, registry, device, upto, start, Preemption::None)
}

/// [`rebuild_reporting`], stopped as `preemption` says (see [`rebuild_as`]). Its guest calls
/// hold the calling thread to the end: [`Preemption::Yield`] is taken as
/// [`Preemption::None`] (see [`rebuild_preemptible`] for a rebuild that yields).
pub(crate) fn rebuild_reporting_as(
    journal: &Journal,
    registry: &Registry,
    device: &DeviceHead,
    upto: u64,
    start: Start,
    preemption: Preemption,
) -> Result<Rebuilt, RebuildFailure> {
    let preemption = match preemption {
        Preemption::Yield => Preemption::None,
        other => other,
    };
    let rebuilt = std::pin::pin!(rebuild_reporting_with(
        journal, registry, device, upto, start, preemption
    ));
    // Not preemptible: every guest call returns before the first poll does.
    match rebuilt.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(RebuildFailure::from(Error::Internal(
            "a rebuild that may not yield yielded".into(),
        ))),
    }
}

/// [`rebuild_reporting`], each guest call's unit giving its thread back as `preemption`
/// says: with [`Preemption::Yield`] as [`rebuild_preemptible`] does; otherwise it never
/// yields (see [`rebuild_reporting_as`]).
pub(crate) async fn rebuild_reporting_with(
    journal: &Journal,
    registry: &Registry,
    device: &DeviceHead,
    upto: u64,
    start: Start,
    preemption: Preemption,
) -> Result<Rebuilt, RebuildFailure> {
    let budget = registry.engine().config().activation_timeout;
    rebuild_reporting_within(journal, registry, device, upto, start, preemption, budget).await
}

/// [`rebuild_reporting_with`] within `budget` instead of the activation budget (plus the
/// same allowance per transition folded).
pub(crate) async fn rebuild_reporting_within(
    journal: &Journal,
    registry: &Registry,
    device: &DeviceHead,
    upto: u64,
    start: Start,
    preemption: Preemption,
    budget: Duration,
) -> Result<Rebuilt, RebuildFailure> {
    // One budget for the whole rebuild (restore, init, every replayed apply), not per call,
    // shared by the search for a trap below.
    let mut budget = Budget::start(budget, preemption);
    let first = rebuild_from(journal, registry, device, upto, start, &mut budget, None).await;
    let rebuilt = match first {
        // A trap in a batch does not say which transition trapped. Replay is deterministic:
        // once more, in batches up to that batch and one `apply` per transition from it on,
        // finds it. On the failure path only. If that ends otherwise than in a trap at or
        // after the batch (its time ran out), the first failure stands; if it succeeds, the
        // batch itself was the trouble (a guest near its memory cap), and the state stands.
        Err(first) if first.unlocated => {
            let from = first.seq;
            tracing::debug!(device = %device.id, error = %first.error, "locating a trap in a batch");
            match rebuild_from(journal, registry, device, upto, start, &mut budget, from).await {
                Err(located) if located.trapped && located.seq >= from => Err(located),
                // Stopped on the pool to be done again on the slow lane (the plugin is slow
                // now): the caller retries there. Any other failure (short of a core or of
                // memory with what little budget the search had left) leaves the trap
                // found first as the story.
                Err(located)
                    if budget.preemption == Preemption::Move
                        && matches!(located.error, Error::Overloaded(_))
                        && registry.setup_runs_slow(device.version) =>
                {
                    Err(located)
                }
                Ok(rebuilt) => {
                    tracing::warn!(
                        device = %device.id,
                        error = %first.error,
                        "a batch of transitions trapped, one at a time they fold"
                    );
                    Ok(rebuilt)
                }
                Err(_) => Err(first),
            }
        }
        other => other,
    };
    let rebuilt = match rebuilt {
        // The tail after a snapshot would not fold, though the snapshot restored: a state
        // restored whole may need more guest memory than the one built event by event did
        // (the snapshot's bytes and the state they make, side by side), and such a device,
        // fine until a restart, became unreadable at every activation after it. A replay from
        // `init`, with what is left of the budget, is the same history without the snapshot;
        // if it fails too, the first failure is the story.
        Err(first)
            if start == Start::Snapshot
                && first.restored.is_some()
                && first.seq.is_some()
                && !first.timed_out
                && journal.oldest_retained_seq(device.num) <= 1 =>
        {
            tracing::warn!(
                device = %device.id,
                snapshot = first.restored,
                error = %first.error,
                "the history after a snapshot would not fold; replaying from the start"
            );
            match rebuild_from(
                journal,
                registry,
                device,
                upto,
                Start::Genesis,
                &mut budget,
                None,
            )
            .await
            {
                Ok(rebuilt) => Ok(Rebuilt {
                    snapshot_failed: true,
                    ..rebuilt
                }),
                Err(_) => Err(first),
            }
        }
        other => other,
    };
    rebuilt.map_err(|mut f| {
        // What retention deleted is answered with the oldest seq a rebuild from a snapshot can
        // still reach, not the oldest event kept: events are of no use without a snapshot
        // before them. (A rebuild from `init` needs seq 1: the journal's answer stands.)
        if let Error::Journal(JournalError::RetainedAway {
            oldest: events_from,
        }) = f.error
            && start != Start::Genesis
        {
            f.error = Error::StateRetainedAway {
                requested: upto.min(device.seq),
                oldest: oldest_rebuildable(journal, registry, device),
                events_from,
            };
        }
        f
    })
}

/// The oldest seq whose state [`rebuild`] can produce for `device` (`0`, right after
/// provisioning, while the journal holds its whole history). Once retention deleted the
/// start of its history, that of the oldest snapshot kept that the device's version
/// restores: its own snapshots, and older ones of another version (a device upgraded after
/// retention came up from its old version's snapshot; `Start::Snapshot` tries those when
/// its history is gone) if a probe instance restores them. Probes run only here, on the
/// error path of a read of the past. The device's seq when no snapshot qualifies.
pub fn oldest_rebuildable(journal: &Journal, registry: &Registry, device: &DeviceHead) -> u64 {
    if journal.oldest_retained_seq(device.num) <= 1 {
        return 0;
    }
    let snapshots = journal.snapshots(device.num);
    let own = snapshots
        .iter()
        .filter(|s| s.version == device.version)
        .map(|s| s.seq)
        .min();
    snapshots
        .iter()
        .filter(|s| s.version != device.version && own.is_none_or(|o| s.seq < o))
        .find(|s| probe_restore(journal, registry, device, **s).is_ok())
        .map(|s| s.seq)
        .or(own)
        .unwrap_or(device.seq)
}

/// Whether a fresh instance of `device`'s version restores snapshot `snap` (of any version)
/// within one call budget: the probe behind [`oldest_rebuildable`] and an upgrade's
/// `snapshot_readable`.
pub fn probe_restore(
    journal: &Journal,
    registry: &Registry,
    device: &DeviceHead,
    snap: SnapshotRef,
) -> Result<(), Error> {
    let data = journal.read_snapshot(snap)?;
    let compiled = registry.compiled(device.version)?;
    let mut instance = compiled.instantiate(device.id.clone())?;
    // A probe's failure is its answer, not a fault to warn of (a deploy probes every device).
    instance.quiet();
    let budget = compiled.engine().config().call_timeout;
    instance.within(budget, |i| i.restore(&data))?;
    Ok(())
}

/// [`probe_restore`], its call's unit giving its thread back as `preemption` says (see
/// [`rebuild_reporting_with`]).
pub(crate) async fn probe_restore_with(
    journal: &Journal,
    registry: &Registry,
    device: &DeviceHead,
    snap: SnapshotRef,
    preemption: Preemption,
) -> Result<(), Error> {
    let data = journal.read_snapshot(snap)?;
    let compiled = registry.compiled(device.version)?;
    let mut instance = compiled.instantiate(device.id.clone())?;
    instance.quiet();
    let scope = instance.begin_setup_unit(compiled.engine().config().call_timeout, preemption);
    let restored = instance.restore_preemptible(&data).await;
    instance.end_unit(scope);
    Ok(restored?)
}

/// A rebuild's time budget: the activation budget, plus [`REPLAY_ALLOWANCE`] for each
/// transition it folds, in CPU time of the thread that runs it (guest calls and journal reads
/// alike), as each guest call's budget is; and, like theirs, at most `WALL_LIMIT` times it in
/// wall-clock time. Each step's guest calls get what is left. A rebuild whose units yield
/// ([`Preemption::Yield`], on the slow lane) is charged what its units used and ran instead:
/// between its slices its thread runs other devices' units, and a thread may resume it
/// that did not start it.
///
/// The allowance is why a long history can be folded at all: a deploy folds a device's whole
/// journal into the new version, and so does an activation without a snapshot of its
/// version. A fixed budget failed every such rebuild past a few million transitions, and
/// each retry (at every activation) spent the whole budget again. A guest that loops still
/// stops: the budget only grows with what was read from the journal.
struct Budget {
    base: Duration,
    allowance: Duration,
    /// How the rebuild's units give their thread back (see [`rebuild_as`]).
    preemption: Preemption,
    /// The CPU and wall-clock time charged before `cpu_since` and `wall_since`: with
    /// [`Preemption::Yield`], what the units that ended used and ran (their turns waited
    /// between slices not counted) and the host's work between them; otherwise nothing, the
    /// thread's clocks since the start telling it all.
    used_before: Duration,
    ran_before: Duration,
    /// The running thread's CPU clock and the wall clock where the current stretch began:
    /// the start, or (with [`Preemption::Yield`]) the end of the last unit. The host's work
    /// between two units runs on one thread without a yield.
    cpu_since: Duration,
    wall_since: Instant,
}

/// CPU time a rebuild's budget grows by per transition it folds: ten times what folding one
/// takes here (~1 µs, see the activation bench), so that only a guest far slower than a
/// healthy one runs out.
pub(crate) const REPLAY_ALLOWANCE: Duration = Duration::from_micros(10);

impl Budget {
    fn start(base: Duration, preemption: Preemption) -> Budget {
        Budget {
            base,
            allowance: Duration::ZERO,
            preemption,
            used_before: Duration::ZERO,
            ran_before: Duration::ZERO,
            cpu_since: cpu_clock::now(),
            wall_since: Instant::now(),
        }
    }

    fn total(&self) -> Duration {
        self.base + self.allowance
    }

    /// `transitions` more to fold: the budget grows by their allowance.
    fn allow(&mut self, transitions: usize) {
        let more = REPLAY_ALLOWANCE.saturating_mul(u32::try_from(transitions).unwrap_or(u32::MAX));
        self.allowance = self.allowance.saturating_add(more);
    }

    /// The CPU time the rebuild used so far (outside a unit that yields).
    fn used(&self) -> Duration {
        self.used_before + cpu_clock::now().saturating_sub(self.cpu_since)
    }

    /// The wall-clock time the rebuild ran so far (outside a unit that yields).
    fn ran(&self) -> Duration {
        self.ran_before + self.wall_since.elapsed()
    }

    /// A unit of the rebuild's guest calls begins on `instance`, with what is left. One that
    /// may yield is charged its own time when it ends (see [`Budget::end`]), not its
    /// thread's, which runs other devices' units between its slices.
    fn begin(&mut self, instance: &mut Instance) -> UnitScope {
        self.begin_within(instance, Duration::MAX)
    }

    /// [`Budget::begin`], the unit given at most `cap` of what is left.
    fn begin_within(&mut self, instance: &mut Instance, cap: Duration) -> UnitScope {
        let scope = instance.begin_setup_unit(self.left().min(cap), self.preemption);
        if self.preemption == Preemption::Yield {
            self.used_before = self.used();
            self.ran_before = self.ran();
        }
        scope
    }

    /// The unit [`Budget::begin`] began ends, charged to the budget.
    fn end(&mut self, instance: &mut Instance, scope: UnitScope) {
        if self.preemption == Preemption::Yield {
            let (used, ran) = instance.unit_spent();
            self.used_before += used;
            self.ran_before += ran;
            self.cpu_since = cpu_clock::now();
            self.wall_since = Instant::now();
        }
        instance.end_unit(scope);
    }

    /// A guest call's timeout told as the rebuild's: it ran out of the whole budget, not of
    /// the part of it that was left for that call. And a rebuild that ran past `WALL_LIMIT`
    /// times its budget within its CPU budget waited for a core: starved, though the call
    /// that noticed had nothing left (a timeout of its own).
    fn whole(&self, e: CallError) -> CallError {
        let total = self.total();
        match e {
            CallError::Timeout { .. } | CallError::Starved { .. } => {
                let used = self.used();
                let starved =
                    matches!(e, CallError::Starved { .. }) || self.ran() >= total * WALL_LIMIT;
                if starved && used < total {
                    CallError::Starved {
                        budget: total,
                        used,
                    }
                } else {
                    let export = match e {
                        CallError::Timeout { export, .. } => export,
                        _ => "the rebuild",
                    };
                    CallError::Timeout {
                        budget: total,
                        export,
                    }
                }
            }
            other => other,
        }
    }

    fn left(&self) -> Duration {
        let total = self.total();
        if self.ran() >= total * WALL_LIMIT {
            return Duration::ZERO;
        }
        total.saturating_sub(self.used())
    }
}

/// An activation that failed on a guest call: the plugin's fault (`activation-failed`), or,
/// when the guest waited for a core too long, the machine's (`overloaded`, which supervision
/// does not count toward a quarantine).
fn activation_failed(context: String, error: Error) -> Error {
    match error {
        Error::Overloaded(m) => Error::Overloaded(format!("{context}{m}")),
        // `Rejected`'s own words speak of an event: here it is a recorded transition.
        Error::Rejected { code, message } => Error::Activation(format!(
            "{context}the plugin refused the recorded transition: {code}: {message}"
        )),
        other => Error::Activation(format!("{context}{other}")),
    }
}

/// What a rebuild tried before it failed (see [`RebuildFailure`]).
#[derive(Default)]
struct Tried {
    snapshot_failed: bool,
    snapshot_unreadable: bool,
    restored: Option<u64>,
}

async fn rebuild_from(
    journal: &Journal,
    registry: &Registry,
    device: &DeviceHead,
    upto: u64,
    start: Start,
    budget: &mut Budget,
    one_by_one_from: Option<u64>,
) -> Result<Rebuilt, RebuildFailure> {
    let mut tried = Tried::default();
    rebuild_trying(
        journal,
        registry,
        device,
        upto,
        start,
        budget,
        one_by_one_from,
        &mut tried,
    )
    .await
    .map_err(|mut f| {
        // The budget named is the whole rebuild's: say where the part the replay lacked went.
        if f.timed_out
            && tried.snapshot_failed
            && tried.restored.is_none()
            && let Error::Activation(message) = &mut f.error
        {
            message.push_str(" (after snapshots that would not restore used up to half of it)");
        }
        RebuildFailure {
            snapshot_failed: tried.snapshot_failed,
            restored: tried.restored,
            ..f
        }
    })
}

#[allow(clippy::too_many_arguments)]
async fn rebuild_trying(
    journal: &Journal,
    registry: &Registry,
    device: &DeviceHead,
    upto: u64,
    start: Start,
    budget: &mut Budget,
    one_by_one_from: Option<u64>,
    tried: &mut Tried,
) -> Result<Rebuilt, RebuildFailure> {
    let upto = upto.min(device.seq);
    // A recorded version this server cannot load (its memory starts over this server's cap,
    // say) fails the activation, like an instance that cannot start.
    let compiled = registry.compiled(device.version).map_err(|e| match e {
        Error::InvalidPlugin(m) => Error::Activation(format!("its plugin cannot be loaded: {m}")),
        e => e,
    })?;
    let activation = |e: CallError| {
        if e.is_overload() {
            Error::from(e)
        } else {
            Error::Activation(e.to_string())
        }
    };

    // Newest usable snapshot first; one that will not restore falls back to the one before
    // it, and past a few failures to a full replay from `init`.
    let candidates: Vec<SnapshotRef> = match start {
        Start::Genesis => Vec::new(),
        Start::Snapshot | Start::SnapshotOf(_) => {
            let version = match start {
                Start::SnapshotOf(v) => v,
                _ => device.version,
            };
            let snapshots = journal.snapshots(device.num);
            let mut candidates: Vec<SnapshotRef> = snapshots
                .iter()
                .rev()
                .filter(|s| s.seq <= upto && s.version == version)
                .take(MAX_SNAPSHOT_TRIES)
                .copied()
                .collect();
            if start == Start::Snapshot && journal.oldest_retained_seq(device.num) > 1 {
                // Retention may have deleted the history a replay from `init` needs: a
                // device upgraded from its old version's snapshot (see `upgrade::bring_up`)
                // comes up from that same snapshot until its version takes one of its own.
                candidates.extend(
                    snapshots
                        .iter()
                        .rev()
                        .filter(|s| s.seq <= upto && s.version != version)
                        .take(MAX_SNAPSHOT_TRIES)
                        .copied(),
                );
            }
            candidates
        }
    };
    let mut restored = None;
    let mut foreign = false;
    // Whether a replay from `init` is there to fall back on: retention has not deleted the
    // start of the history.
    let from_init = journal.oldest_retained_seq(device.num) <= 1;
    // The restores together get at most half of the budget when a replay from `init` can
    // follow them, shared among the snapshots still to try: restores that spin leave the
    // replay the other half. Given all of it, the replay started with nothing and failed,
    // and every activation after spent its budget on the same snapshot again. (A healthy
    // `restore` takes a small part of its share: it only deserializes a state.)
    let at_start = budget.left();
    let restores = if from_init { at_start / 2 } else { at_start };
    // The search for a trap in a batch runs again what the first pass ran and logged.
    let instantiate = || {
        let mut instance = compiled
            .instantiate(device.id.clone())
            .map_err(activation)?;
        if one_by_one_from.is_some() {
            instance.quiet();
        }
        Ok::<_, Error>(instance)
    };
    for (i, snap) in candidates.iter().enumerate() {
        let mut instance = instantiate()?;
        // What this snapshot had: a timeout reads as the whole rebuild's budget (`whole`),
        // and one tried after another used most of it had little.
        let had = budget.left();
        let tries_left = u32::try_from(candidates.len() - i).unwrap_or(u32::MAX);
        let fallback = from_init || tries_left > 1;
        let cap = if fallback {
            restores.saturating_sub(at_start.saturating_sub(had)) / tries_left
        } else {
            had
        };
        let mut unreadable = false;
        let outcome = match journal.read_snapshot(*snap) {
            Ok(data) => {
                let scope = budget.begin_within(&mut instance, cap);
                let restored = instance.restore_preemptible(&data).await;
                budget.end(&mut instance, scope);
                restored.map_err(|e| match e {
                    CallError::Timeout { .. } if fallback => Error::Activation(format!(
                        "its `restore` ran past {cap:?}, its share of the rebuild's budget"
                    )),
                    // A refusal of the snapshot, said as one (`Rejected` speaks of an event).
                    CallError::Rejected { code, message } => Error::Activation(format!(
                        "its `restore` refused the snapshot: {code}: {message}"
                    )),
                    e => Error::from(budget.whole(e)),
                })
            }
            Err(e) => {
                unreadable = true;
                Err(Error::from(e))
            }
        };
        match outcome {
            Ok(()) => {
                restored = Some((instance, snap.seq));
                foreign = snap.version != device.version;
                break;
            }
            // The machine's fault, not the snapshot's: an older one would starve alike.
            Err(e @ Error::Overloaded(_)) => return Err(e.into()),
            Err(e) => {
                if unreadable {
                    tried.snapshot_unreadable = true;
                } else {
                    tried.snapshot_failed = true;
                }
                let next = match candidates.get(i + 1) {
                    Some(older) => format!("trying the snapshot at seq {}", older.seq),
                    None if from_init => "replaying from the start".to_string(),
                    None => "no other start: retention deleted the history before it".to_string(),
                };
                let what = if unreadable {
                    "snapshot could not be read from the journal"
                } else {
                    "snapshot did not restore"
                };
                tracing::warn!(
                    device = %device.id,
                    seq = snap.seq,
                    error = %e,
                    budget_left_ms = had.as_millis(),
                    "{what}; {next}"
                );
            }
        }
    }
    tried.restored = restored.as_ref().map(|(_, seq)| *seq);
    let (mut instance, from) = match restored {
        Some((instance, seq)) => (instance, seq),
        None => {
            let mut instance = instantiate()?;
            let config = std::str::from_utf8(&device.config)
                .map_err(|_| Error::Activation("stored config is not UTF-8".into()))?;
            let scope = budget.begin(&mut instance);
            let initialized = instance.init_preemptible(&device.id, config).await;
            budget.end(&mut instance, scope);
            initialized.map_err(|e| match budget.whole(e) {
                CallError::Rejected { code, message } => Error::Activation(format!(
                    "`init` refused the device's stored config: {code}: {message}"
                ))
                .into(),
                e @ CallError::Timeout { .. } => RebuildFailure {
                    timed_out: true,
                    ..activation(e).into()
                },
                e => activation(e).into(),
            })?;
            (instance, 0)
        }
    };

    let mut applied = 0u64;
    let mut last_at_ms = device.created_at_ms;
    let mut next = from + 1;
    while next <= upto {
        let to = (next + CHUNK - 1).min(upto);
        let records = journal.read_events(device.num, next, to)?;
        // The chunk's transitions in order, and where each record's begin, so that a batch
        // failing at one transition is blamed on the record that holds it. A record that is
        // not UTF-8 ends the chunk: what comes before it is folded first, so an earlier
        // record that will not fold is still the one named.
        let mut transitions: Vec<&str> = Vec::new();
        let mut firsts: Vec<(u64, usize)> = Vec::new();
        let mut unreadable = None;
        // Salvaged-away records have nothing to apply, and their time is the salvage's.
        'records: for record in records.iter().filter(|r| !r.lost) {
            firsts.push((record.seq, transitions.len()));
            for t in &record.transitions {
                match std::str::from_utf8(t) {
                    Ok(t) => transitions.push(t),
                    Err(_) => {
                        unreadable = Some(record.seq);
                        transitions.truncate(firsts.pop().map_or(0, |(_, first)| first));
                        break 'records;
                    }
                }
            }
        }
        budget.allow(transitions.len());
        let seq_of = |index: usize| {
            let holders = firsts.partition_point(|&(_, first)| first <= index);
            firsts[holders.saturating_sub(1)].0
        };
        // Batched, except (when locating a trap) from the batch that trapped on.
        let split = one_by_one_from.map_or(transitions.len(), |from| {
            firsts
                .iter()
                .find(|&&(seq, _)| seq >= from)
                .map_or(transitions.len(), |&(_, first)| first)
        });
        let (batched, single) = transitions.split_at(split);
        let scope = budget.begin(&mut instance);
        // Healthy `apply`s of a long chunk may add up to more than two ticks (see
        // `REPLAY_ALLOWANCE`).
        instance.expect_cpu(
            REPLAY_ALLOWANCE.saturating_mul(u32::try_from(transitions.len()).unwrap_or(u32::MAX)),
        );
        let mut done = 0;
        let mut failed = None;
        let runs = decide::batches(batched, BATCHED).chain(decide::batches(single, 1));
        for batch in runs {
            if let Err(e) = instance.apply_batch_preemptible(batch).await {
                failed = Some((e, done, batch.len()));
                break;
            }
            done += batch.len();
        }
        budget.end(&mut instance, scope);
        if let Some((e, done, len)) = failed {
            let trapped = matches!(e.error, CallError::Trap(_));
            // Running out of time (or the server out of memory, or a stop to fold on the
            // slow lane) is no record's fault: none is named as the one that cannot be
            // folded (`seq`), though the message says where.
            let out_of_time = matches!(e.error, CallError::Timeout { .. });
            let timed_out = out_of_time || e.error.is_overload();
            let error = Error::from(budget.whole(e.error));
            return Err(match e.applied {
                Some(n) => {
                    let seq = seq_of(done + n);
                    RebuildFailure {
                        seq: (!timed_out).then_some(seq),
                        error: activation_failed(format!("replaying seq {seq}: "), error),
                        unlocated: false,
                        trapped,
                        timed_out: out_of_time,
                        snapshot_failed: false,
                        restored: None,
                    }
                }
                // A trap or timeout inside one call of several transitions: a trap is
                // blamed on the batch's first record, then located (see
                // `rebuild_reporting`).
                None => {
                    let (first, last) = (seq_of(done), seq_of(done + len - 1));
                    RebuildFailure {
                        seq: (!timed_out).then_some(first),
                        error: activation_failed(
                            format!("replaying seqs {first} to {last}: "),
                            error,
                        ),
                        unlocated: trapped,
                        trapped,
                        timed_out: out_of_time,
                        snapshot_failed: false,
                        restored: None,
                    }
                }
            });
        }
        if let Some(seq) = unreadable {
            return Err(RebuildFailure {
                seq: Some(seq),
                error: Error::Activation(format!("seq {seq}: transition is not UTF-8")),
                unlocated: false,
                trapped: false,
                timed_out: false,
                snapshot_failed: false,
                restored: None,
            });
        }
        applied += transitions.len() as u64;
        if let Some(record) = records.iter().rev().find(|r| !r.lost) {
            last_at_ms = record.at_ms;
        }
        next = to + 1;
    }
    if from > 0 && from == upto {
        // Restored exactly at the target: the timestamp still comes from that event, unless
        // retention deleted it (it lies just before the snapshot, which is what retention
        // keeps): then the device's next stamps rest on the clock alone.
        match journal.read_events(device.num, upto, upto) {
            Ok(mut read) => {
                if let Some(e) = read.pop().filter(|e| !e.lost) {
                    last_at_ms = e.at_ms;
                }
            }
            Err(JournalError::RetainedAway { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Rebuilt {
        instance,
        seq: upto,
        last_at_ms,
        snapshot: restored_seq(from),
        foreign_snapshot: foreign,
        snapshot_failed: tried.snapshot_failed,
        snapshot_unreadable: tried.snapshot_unreadable,
        applied,
    })
}

/// How many snapshots a rebuild tries, newest first, before replaying from `init`.
const MAX_SNAPSHOT_TRIES: usize = 3;

fn restored_seq(from: u64) -> Option<u64> {
    (from > 0).then_some(from)
}

/// Rebuilds device `id` from the journal in `data_dir` without a running server (and without
/// disturbing one: the journal is opened read-only). Returns the seq and the guest's `query`
/// answer. `to` defaults to the latest seq.
///
/// The engine gets the settings the server recorded in the data directory (call timeout,
/// memory cap; see [`EngineConfig::load`]), so a device that the server can run never times
/// out here.
pub fn offline(
    data_dir: &Path,
    id: &str,
    to: Option<u64>,
    start: Start,
) -> anyhow::Result<DeviceState> {
    offline_within(data_dir, id, to, start, None)
}

/// [`offline`] within `budget` for the whole rebuild instead of the activation budget the
/// server recorded: a device whose history outgrew that budget (it fails to activate, and
/// is quarantined) can still be rebuilt here to see its state.
pub fn offline_within(
    data_dir: &Path,
    id: &str,
    to: Option<u64>,
    start: Start,
    budget: Option<std::time::Duration>,
) -> anyhow::Result<DeviceState> {
    use anyhow::Context as _;
    crate::export::refuse_unfinished_import(data_dir)?;
    let journal = Journal::open_read_only(data_dir)
        .with_context(|| format!("opening the journal in {}", data_dir.display()))?;
    if let Some(d) = &journal.recovery().dropped {
        tracing::warn!(offset = d.offset, reason = %d.reason, "journal has a bad tail; it is ignored");
    }
    let mut config = EngineConfig::load(data_dir)?;
    if let Some(budget) = budget {
        config.activation_timeout = budget;
    }
    let engine = Engine::new(config)?;
    let registry = Registry::open(engine, journal.clone(), data_dir)?;
    let head = journal
        .device(id)
        .ok_or_else(|| Error::UnknownDevice(id.to_string()))?;
    let upto = match to {
        Some(seq) if seq > head.seq => {
            return Err(Error::SeqOutOfRange {
                requested: seq,
                latest: head.seq,
            }
            .into());
        }
        Some(seq) => seq,
        None => head.seq,
    };
    let mut rebuilt = rebuild(&journal, &registry, &head, upto, start)?;
    let state = rebuilt.instance.query()?;
    Ok(DeviceState {
        seq: rebuilt.seq,
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rebuild past `WALL_LIMIT` times its budget that used little CPU was starved, even
    /// when the call that noticed timed out on the nothing it had left; one that used its
    /// budget timed out, whatever the clock on the wall says.
    #[test]
    fn a_rebuild_that_waited_for_cores_is_starved_not_timed_out() {
        let total = Duration::from_millis(10);
        let waited = Budget {
            base: total,
            allowance: Default::default(),
            preemption: Preemption::None,
            used_before: Duration::ZERO,
            ran_before: Duration::ZERO,
            cpu_since: cpu_clock::now(),
            wall_since: Instant::now() - total * (WALL_LIMIT + 1),
        };
        let timeout = |budget| CallError::Timeout {
            budget,
            export: "apply",
        };
        let starved = waited.whole(timeout(Duration::ZERO));
        assert!(matches!(
            starved,
            CallError::Starved { budget, .. } if budget == total
        ));
        assert!(matches!(
            activation_failed("replaying seq 7: ".into(), Error::from(starved)),
            Error::Overloaded(m) if m.starts_with("replaying seq 7: ")
        ));
        // This thread's clock must have run past twice the budget for the start below.
        while cpu_clock::now() < total * 3 {
            std::hint::spin_loop();
        }
        let busy = Budget {
            base: total,
            allowance: Default::default(),
            preemption: Preemption::None,
            used_before: Duration::ZERO,
            ran_before: Duration::ZERO,
            cpu_since: cpu_clock::now() - total * 2,
            wall_since: Instant::now() - total * (WALL_LIMIT + 1),
        };
        assert!(matches!(
            busy.whole(timeout(Duration::ZERO)),
            CallError::Timeout { budget, export: "apply" } if budget == total
        ));
        let fresh = Budget::start(total, Preemption::None);
        assert!(matches!(
            fresh.whole(timeout(Duration::from_millis(3))),
            CallError::Timeout { budget, export: "apply" } if budget == total
        ));
        assert!(matches!(
            activation_failed("replaying seq 7: ".into(), Error::Trap("boom".into())),
            Error::Activation(m) if m.starts_with("replaying seq 7: ")
        ));
    }
}
