//! One device moving to another plugin version: bringing a new instance up to the device's
//! seq, and what that says about the new version.
//!
//! A device's journal holds every transition it ever committed. So a new version `V` can be
//! checked against the device's real history before it runs a single new event: build an
//! instance of `V`, `init` it with the provisioned config and fold every recorded transition
//! (or restore a snapshot `V` itself took, after a rollback, and fold the tail). If that
//! works, `V` holds the state it would hold had it run from the start, and the actor swaps
//! instances between two events. If it does not, the device stays on its old version and the
//! caller learns the seq that `V` could not fold.
//!
//! Three questions are kept apart, as the journal lets us answer each:
//!
//! * **can `V` fold the recorded transitions** (required: [`bring_up`] fails otherwise);
//! * **would `V` decide differently** on the recorded inputs (information: the dry-run,
//!   `crate::dry_run`);
//! * **can `V` read the old version's snapshot** (an optimisation for later; reported as
//!   [`DeviceUpgrade::snapshot_readable`]). A snapshot taken by another version is never used
//!   to build `V`'s state: its meaning is the old version's, and only a fold of the
//!   transitions is guaranteed to equal a replay under `V`.
//!
//! The actor runs this for live devices (a deploy) and at activation for passivated ones
//! (a lazy upgrade); see `crate::deploy` for the fleet-level operation.

use serde::Serialize;

use crate::engine::Preemption;
use crate::error::{Error, ErrorKind};
use crate::journal::{DeviceHead, Journal};
use crate::registry::Registry;
use crate::replay::{self, RebuildFailure, Rebuilt, Start};

/// How a device was brought up on its new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpgradePath {
    /// Restored a snapshot the new version itself took earlier (a rollback), or, when
    /// retention deleted the history a replay needs, the old version's latest snapshot (if
    /// the new version restores it), then folded the tail.
    Snapshot,
    /// Folded every recorded transition from `init`.
    Replay,
}

/// What happened to one device in a deploy or rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpgradeOutcome {
    /// Now runs the new version.
    Upgraded,
    /// Could not be brought up on the new version; still runs its old one.
    Failed,
    /// Already on the new version.
    Unchanged,
    /// Not live (passivated, or its instance was lost meanwhile): it comes up on the new
    /// version at its next activation, and nothing of it was read. Also a live device the
    /// server was too overloaded to bring up (the line's `error` says so): it tries again
    /// shortly, before a later message.
    Lazy,
    /// Removed (`DELETE /v1/devices/{id}`) while the deploy ran: it runs no version.
    Removed,
}

/// One device's line in a deploy report.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceUpgrade {
    pub device: String,
    /// Version numbers (per plugin, as users see them).
    pub from: u32,
    pub to: u32,
    pub outcome: UpgradeOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<UpgradePath>,
    /// The device's seq when it switched (or was examined).
    pub seq: u64,
    /// Transitions the new version folded to catch up.
    pub applied: u64,
    /// The recorded seq the new version could not fold (outcome `failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the new version's `restore` accepts the old version's newest snapshot (`None`:
    /// there was none). Information only, see the module docs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_readable: Option<bool>,
    /// How long the device's mailbox waited: from taking the upgrade message to handling
    /// its next event (includes the durable write of the new binding), µs.
    pub pause_us: u64,
}

impl DeviceUpgrade {
    /// A device not moved (yet): it comes up on the new version at its next activation.
    /// Upgrades start from it and fill in what happened.
    pub fn lazy(device: &str, from: u32, to: u32, seq: u64) -> DeviceUpgrade {
        DeviceUpgrade {
            device: device.to_string(),
            from,
            to,
            outcome: UpgradeOutcome::Lazy,
            path: None,
            seq,
            applied: 0,
            failed_seq: None,
            error: None,
            snapshot_readable: None,
            pause_us: 0,
        }
    }
}

/// Why a new version could not be brought up, for a deploy's report: the new version failed,
/// not the device, so `Error::Activation`'s own words ("the device failed to activate") would
/// blame the instance that goes on running.
pub(crate) fn failure_text(error: &Error) -> String {
    match error {
        Error::Activation(why) => {
            format!("the new version cannot be brought up to the device's seq: {why}")
        }
        e => e.to_string(),
    }
}

/// A new instance of `want.version` at the device's seq `want.seq`, and whether that version
/// reads the newest snapshot of `old_version` (the device's version until now). The fold's
/// units are stopped as `preemption` says (see [`replay::rebuild_as`]): an actor on the pool
/// folds a version not yet slow with [`Preemption::Move`], and one stopped so fails as the
/// server's overload, to be folded again on the slow lane.
pub async fn bring_up(
    journal: &Journal,
    registry: &Registry,
    want: &DeviceHead,
    old_version: u32,
    preemption: Preemption,
) -> Result<(Rebuilt, Option<bool>), RebuildFailure> {
    let budget = registry.engine().config().activation_timeout;
    bring_up_within(journal, registry, want, old_version, preemption, budget).await
}

/// [`bring_up`] within `budget` rather than the activation budget (a deploy's fold check
/// spends no more than what it has left).
pub(crate) async fn bring_up_within(
    journal: &Journal,
    registry: &Registry,
    want: &DeviceHead,
    old_version: u32,
    preemption: Preemption,
    budget: std::time::Duration,
) -> Result<(Rebuilt, Option<bool>), RebuildFailure> {
    // Only snapshots taken by `want.version` itself qualify (the rebuild filters by version).
    // When the history a replay needs was deleted by retention, the newest snapshot of the
    // old version is the only start left: used if the new version restores it.
    let rebuilt = match replay::rebuild_reporting_within(
        journal,
        registry,
        want,
        want.seq,
        Start::Snapshot,
        preemption,
        budget,
    )
    .await
    {
        Err(RebuildFailure { error, .. }) if error.kind() == ErrorKind::RetainedAway => {
            replay::rebuild_reporting_within(
                journal,
                registry,
                want,
                want.seq,
                Start::SnapshotOf(old_version),
                preemption,
                budget,
            )
            .await?
        }
        other => other?,
    };
    let old_snapshot = journal
        .snapshots(want.num)
        .into_iter()
        .rev()
        .find(|s| s.seq <= want.seq && s.version == old_version);
    let snapshot_readable = match old_snapshot {
        Some(snap) => Some(
            match replay::probe_restore_with(journal, registry, want, snap, preemption).await {
                // Stopped on the pool as the version turned out slow: the fold is done again
                // on the slow lane. (Any other failure only means the old snapshot is not read.)
                Err(e @ Error::Overloaded(_))
                    if preemption == Preemption::Move && registry.setup_runs_slow(want.version) =>
                {
                    return Err(e.into());
                }
                r => r.is_ok(),
            },
        ),
        None => None,
    };
    Ok((rebuilt, snapshot_readable))
}

/// The path a rebuild took.
pub fn path_of(rebuilt: &Rebuilt) -> UpgradePath {
    if rebuilt.snapshot.is_some() {
        UpgradePath::Snapshot
    } else {
        UpgradePath::Replay
    }
}

/// The (device number, plugin version id) pairs that version could not bring up: a deploy's
/// check found the device's history unfoldable, or a live or lazy upgrade failed. Activations
/// do not try such a pair again, and the device's `upgrade` says `failed: true`, until a
/// deploy of that version (which checks afresh) or of another.
///
/// Kept in `DATA/plugins/upgrade-failures.json` (atomic replace), not only in memory: a fold
/// is deterministic, and one that spins costs the whole activation budget (5 s by default,
/// on the slow lane) per device. Forgotten at a restart, a forced deploy that left a
/// thousand devices behind on such a version cost each of them that at its first activation
/// after every restart, and a read of one waited for it. The file is a cache of conclusions
/// the journal can always reproduce: missing or unreadable, each pair is tried once more.
/// Device numbers are the journal's, never reused, so a device removed and provisioned
/// again under its id starts with a clean slate.
pub struct FailedUpgrades {
    pairs: parking_lot::Mutex<std::collections::HashSet<(u32, u32)>>,
    /// Where they are kept.
    path: std::path::PathBuf,
    /// Serializes writes of the file; each writes the set as it is when the write starts.
    writing: parking_lot::Mutex<()>,
}

/// The file's name in `DATA/plugins/`.
pub(crate) const FAILED_UPGRADES_FILE: &str = "upgrade-failures.json";

impl FailedUpgrades {
    /// The pairs recorded in `plugins_dir`, if any (a damaged file is logged and ignored).
    pub fn open(plugins_dir: &std::path::Path) -> FailedUpgrades {
        let path = plugins_dir.join(FAILED_UPGRADES_FILE);
        let pairs = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Vec<(u32, u32)>>(&bytes) {
                Ok(pairs) => pairs.into_iter().collect(),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "unreadable record of failed upgrades: ignored (each device left behind tries its upgrade once more)");
                    Default::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the record of failed upgrades: ignored");
                Default::default()
            }
        };
        FailedUpgrades {
            pairs: parking_lot::Mutex::new(pairs),
            path,
            writing: Default::default(),
        }
    }

    /// Whether version `to` failed to bring device number `num` up.
    pub fn contains(&self, num: u32, to: u32) -> bool {
        self.pairs.lock().contains(&(num, to))
    }

    /// Records that version `to` cannot bring device number `num` up.
    pub fn insert(&self, num: u32, to: u32) {
        if self.pairs.lock().insert((num, to)) {
            self.persist();
        }
    }

    /// Records several at once (one write); returns how many were not recorded before.
    pub fn insert_all(&self, pairs: impl IntoIterator<Item = (u32, u32)>) -> usize {
        let added = {
            let mut set = self.pairs.lock();
            pairs.into_iter().filter(|&p| set.insert(p)).count()
        };
        if added > 0 {
            self.persist();
        }
        added
    }

    /// Forgets that version `to` failed device number `num` (it was brought up after all).
    pub fn remove(&self, num: u32, to: u32) {
        if self.pairs.lock().remove(&(num, to)) {
            self.persist();
        }
    }

    /// Forgets every failure of the versions `versions` says: a deploy of one checks the
    /// devices afresh.
    pub fn forget_versions(&self, versions: impl Fn(u32) -> bool) {
        let removed = {
            let mut set = self.pairs.lock();
            let before = set.len();
            set.retain(|&(_, v)| !versions(v));
            set.len() != before
        };
        if removed {
            self.persist();
        }
    }

    /// Writes the set as it is now. A failed write (a full disk) is logged: the pairs stay
    /// known until a restart, as before the file existed.
    fn persist(&self) {
        let path = &self.path;
        let _one_writer = self.writing.lock();
        let mut pairs: Vec<(u32, u32)> = self.pairs.lock().iter().copied().collect();
        pairs.sort_unstable();
        let written = serde_json::to_vec(&pairs)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::registry::write_replace_if_changed(path, &bytes));
        if let Err(e) = written {
            tracing::warn!(file = %path.display(), error = %e, "cannot record a failed upgrade: it is tried once more after a restart");
        }
    }
}

/// How many folds of one version may fail in a row, each after running at least
/// [`SLOW_FAILURE`], before that version is tried on no more devices (see [`SlowFolds`]): not
/// by the deploy under way (the rest of its live devices are listed failed, `not tried`),
/// nor at later activations, until a deploy of it again.
pub const SLOW_FAILURES_BEFORE_STOPPING: usize = 3;

/// How long a failed fold must have run for it to count toward
/// [`SLOW_FAILURES_BEFORE_STOPPING`] (or half the activation budget, if less), and how long a
/// device waits for its turn to fold a version that runs slow (see [`SlowFolds`]). A version
/// that traps fails in milliseconds and costs little to try on every device; one that spins
/// fails only at the end of the activation budget (5 s by default) per device, while the
/// device's events wait.
pub const SLOW_FAILURE: std::time::Duration = std::time::Duration::from_secs(1);

/// [`SLOW_FAILURE`], or half of `activation` (the activation budget) if that is less.
pub(crate) fn slow_failure(activation: std::time::Duration) -> std::time::Duration {
    SLOW_FAILURE.min(activation / 2)
}

/// Folds of plugin versions that run slow, across the fleet: one device at a time per
/// version, and none after [`SLOW_FAILURES_BEFORE_STOPPING`] slow failures in a row.
///
/// A version whose fold spins fails a device only when the device's activation budget runs
/// out (counted in CPU time, 5 s by default), and such folds run on the slow lane, where
/// several at once only take turns. So devices left behind by a forced deploy of such a
/// version, activating together (after a restart, say), each waited for all of their folds:
/// 20 of them, about 100 s each, for their first event. Now a fold of a version that runs
/// slow takes the version's turn; a device that cannot have it within [`SLOW_FAILURE`] (or
/// half the activation budget) comes up on its own version and answers its event, its
/// upgrade put off and tried again later, as a live upgrade put off for overload is. And once
/// [`SLOW_FAILURES_BEFORE_STOPPING`] folds in a row failed after running that long, the
/// version is tried on no more devices: each is recorded as failed on it
/// ([`FailedUpgrades`]), as if its own fold had failed, until a deploy of the version again,
/// which forgets this (a fold that succeeds resets the count).
///
/// In memory only: after a restart a version that spins costs at most that many more slow
/// folds, one at a time, before it is given up again (each device it failed or was given up
/// on is in [`FailedUpgrades`], which is kept).
#[derive(Default)]
pub(crate) struct SlowFolds {
    versions: parking_lot::Mutex<std::collections::HashMap<u32, std::sync::Arc<VersionFolds>>>,
}

/// One version's turn and count of slow failures (see [`SlowFolds`]).
pub(crate) struct VersionFolds {
    turn: tokio::sync::Semaphore,
    slow_in_a_row: std::sync::atomic::AtomicUsize,
}

impl SlowFolds {
    /// Version `version`'s turn and count.
    pub(crate) fn of(&self, version: u32) -> std::sync::Arc<VersionFolds> {
        self.versions
            .lock()
            .entry(version)
            .or_insert_with(|| {
                std::sync::Arc::new(VersionFolds {
                    turn: tokio::sync::Semaphore::new(1),
                    slow_in_a_row: Default::default(),
                })
            })
            .clone()
    }

    /// Forgets what folds of the versions `versions` says showed: a deploy tries afresh.
    pub(crate) fn forget(&self, versions: impl Fn(u32) -> bool) {
        self.versions.lock().retain(|&v, _| !versions(v));
    }

    /// How many folds of `version` failed slowly in a row, if that many that it is given up.
    pub(crate) fn given_up(&self, version: u32) -> Option<usize> {
        let folds = self.versions.lock().get(&version).cloned()?;
        folds.given_up()
    }
}

impl VersionFolds {
    /// Waits up to `wait` for this version's turn to fold; `None` if it did not come.
    pub(crate) async fn turn(
        &self,
        wait: std::time::Duration,
    ) -> Option<tokio::sync::SemaphorePermit<'_>> {
        tokio::time::timeout(wait, self.turn.acquire())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Records how a fold ended: a success resets the count, a failure after running at least
    /// the slow-failure time adds to it, a quick failure leaves it.
    pub(crate) fn note(&self, succeeded: bool, failed_slowly: bool) {
        use std::sync::atomic::Ordering;
        if succeeded {
            self.slow_in_a_row.store(0, Ordering::Relaxed);
        } else if failed_slowly {
            self.slow_in_a_row.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The count of slow failures in a row, once it reached
    /// [`SLOW_FAILURES_BEFORE_STOPPING`].
    pub(crate) fn given_up(&self) -> Option<usize> {
        let n = self
            .slow_in_a_row
            .load(std::sync::atomic::Ordering::Relaxed);
        (n >= SLOW_FAILURES_BEFORE_STOPPING).then_some(n)
    }
}

/// Why a version given up (see [`SlowFolds`]) was not tried on a device.
pub(crate) fn given_up_text(
    to_number: u32,
    slow: usize,
    slow_failure: std::time::Duration,
) -> String {
    format!(
        "not tried: version {to_number} failed to fold {slow} devices in a row after running \
         over {} ms each, so it is tried on no more devices until it is deployed again",
        slow_failure.as_millis()
    )
}
