//! Deploy, rollback and dry-run of plugin versions across the fleet, while it runs.
//!
//! A deploy of version `V` of plugin `P`:
//!
//! 1. **Sample.** Dry-runs `V` on a sample of `P`'s devices (up to [`SAMPLE`], spread over
//!    the fleet, read side only). If `V` cannot fold some device's recorded transitions, the
//!    deploy is refused ([`Error::DeployRefused`]) unless forced: those devices could never
//!    run `V`. Diverging decisions are reported, not refused: a behavior change is the point.
//! 2. **Point.** `V` becomes `P`'s current version (durably): new devices get it, and
//!    passivated devices come up on it at their next activation, without being woken or read
//!    now (lazy upgrade).
//! 3. **Swap live devices.** Every live actor of `P` gets an upgrade message in its mailbox,
//!    behind the events already there. It brings a new instance of `V` up to its seq
//!    (`crate::upgrade`), records the new binding durably and swaps between two events; a
//!    device that cannot be brought up stays on its old version, and the report says why
//!    and at which seq. Devices run their upgrades in parallel on the actor threads.
//! 4. **Report** per device (versions, path, outcome, failing seq, pause) and per fleet
//!    (totals, time, pause percentiles, devices left to upgrade lazily), with the journal
//!    check each device made before switching: the live instance's seq equals the seq of
//!    its last durable event, so no acknowledged event was lost or applied twice.
//!
//! Between 1 and 2, the devices outside the sample are folded with `V` too, as their next
//! activation will, for up to [`FOLD_CHECK_BUDGET`]: one that cannot be refuses the deploy
//! as the sample does (see [`DeployTotals::fold_checked`]).
//!
//! A rollback is a deploy of the version that was current before, the same way: checked
//! first, since the devices may have recorded transitions of the newer version that the
//! older one cannot fold.

use std::time::Instant;

use futures::StreamExt as _;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::actor::{Message, UpgradeRequest};
use crate::dry_run::{self, DryRunReport, Limits};
use crate::engine::Preemption;
use crate::error::Error;
use crate::error::ErrorKind;
use crate::journal::{DeviceHead, VersionInfo};
use crate::registry::Origin;
use crate::runtime::Runtime;
use crate::upgrade::{self, DeviceUpgrade, SLOW_FAILURES_BEFORE_STOPPING, UpgradeOutcome};
use std::sync::Arc;

/// Devices upgrading at once per actor thread (see `upgrade_parallelism`).
const UPGRADES_PER_THREAD: usize = 8;

/// Devices a deploy dry-runs before it changes anything.
pub const SAMPLE: usize = 16;

/// How long a deploy may spend folding the history of passivated devices outside its sample
/// before it changes anything (see `DeployTotals::fold_checked`). A fold is ~0.1-1 ms for a
/// device with a snapshot and a short tail, so a few thousand devices are checked; a larger
/// fleet is checked in part, a different part at each deploy.
pub const FOLD_CHECK_BUDGET: std::time::Duration = std::time::Duration::from_secs(2);

/// What [`Runtime::fold_check`] found.
struct FoldCheck {
    /// Devices whose history was folded, successfully or not.
    checked: usize,
    /// (device, seq it failed at, why) of those that could not be folded.
    cannot_fold: Vec<(String, Option<u64>, String)>,
    /// Of those, the ones whose fold ran out of its time budget.
    timed_out: usize,
}

/// Which devices a dry-run looks at.
#[derive(Debug, Clone)]
pub enum Selection {
    /// These ids (each must be a device of the plugin).
    Devices(Vec<String>),
    /// Up to this many of the plugin's devices, spread evenly over them.
    Sample(usize),
}

/// Fleet totals of a deploy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeployTotals {
    /// Devices of the plugin in the journal.
    pub devices: usize,
    /// Of them, live when the deploy started and not yet on the new version.
    pub live: usize,
    pub upgraded: usize,
    pub failed: usize,
    /// Devices already on the new version.
    pub unchanged: usize,
    /// Passivated devices of the sample that the new version cannot fold (a forced deploy):
    /// they stay on their version.
    pub cannot_fold: usize,
    /// Other devices not live now: they come up on the new version at their next activation
    /// if it can fold their history (else they stay on theirs, with a warning in the log and
    /// `drover_upgrade_failures_total`).
    pub pending_lazy: usize,
    /// Other devices not live now, behind on the new version, which was given up after
    /// failing slowly on several devices in a row (`SLOW_FAILURES_BEFORE_STOPPING`): they stay
    /// on theirs, not tried at their activation either, until a deploy of it again (live
    /// ones so left are in `failed`, `not tried`).
    pub not_tried: usize,
    /// Devices outside the sample whose history the new version was checked to fold before
    /// anything changed, as their activation will (those it could not fold are in
    /// `cannot_fold`, or `failed` if live): all of them unless the check ran out of its time
    /// budget ([`FOLD_CHECK_BUDGET`]).
    pub fold_checked: usize,
    /// Devices that came to the new version while the deploy ran without the deploy moving
    /// them: activated meanwhile (and upgraded at activation), or provisioned meanwhile.
    /// With the others above, every device of the plugin is counted once.
    pub upgraded_at_activation: usize,
    /// Quarantined devices left on the version being left whose quarantine the deploy ended
    /// (counted above too, as `pending_lazy`): the version that failed them is no longer
    /// current, so their next message brings them up on the new one rather than waiting out
    /// a quarantine earned under the old (three failures on the new one quarantine them
    /// again). Not those the new version cannot fold.
    pub quarantines_ended: usize,
    /// Live devices removed while the deploy ran (in `live`, not in `devices`): their
    /// lines say `removed`. `fold_checked` may count devices removed since too.
    pub removed: usize,
}

/// The journal check of a deploy: see the module docs.
#[derive(Debug, Clone, Serialize)]
pub struct JournalCheck {
    /// Devices that switched, each after checking its live seq against the journal.
    pub devices: usize,
    pub ok: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// What a deploy or rollback did.
#[derive(Debug, Clone, Serialize)]
pub struct DeployReport {
    pub plugin: String,
    /// The current version (number) before.
    pub from: u32,
    pub to: u32,
    pub rollback: bool,
    pub forced: bool,
    pub totals: DeployTotals,
    pub elapsed_ms: u64,
    /// How long the deploy held live devices' mailboxes (their fold, upgraded or not), µs.
    pub pause_p50_us: u64,
    pub pause_p99_us: u64,
    pub pause_max_us: u64,
    pub journal_check: JournalCheck,
    /// The dry-run sample taken before anything changed.
    pub sample: DryRunReport,
    /// Every live device the deploy touched.
    pub devices: Vec<DeviceUpgrade>,
}

impl Runtime {
    /// Moves every device of plugin `plugin` to its version `version` (see the module
    /// docs). Refused with [`Error::DeployRefused`] when the sample shows devices the version
    /// cannot fold, unless `force`.
    pub async fn deploy(
        &self,
        plugin: &str,
        version: u32,
        force: bool,
    ) -> Result<DeployReport, Error> {
        // In a task of its own (see `Runtime::detached`): a deploy half-done because its
        // caller went away would leave the fleet split between versions without a report.
        let (rt, plugin) = (self.clone(), plugin.to_string());
        let result = Runtime::detached("deploy", async move {
            rt.deploy_inner(&plugin, Some(version), force).await
        })
        .await;
        self.counted(result)
    }

    /// Returns plugin `plugin` to the version that was current before the last deploy, the
    /// same way a deploy moves devices (refused, unless `force`, when the sample shows devices
    /// whose newer transitions that version cannot fold).
    pub async fn rollback(&self, plugin: &str, force: bool) -> Result<DeployReport, Error> {
        let (rt, plugin) = (self.clone(), plugin.to_string());
        let result = Runtime::detached("rollback", async move {
            rt.deploy_inner(&plugin, None, force).await
        })
        .await;
        self.counted(result)
    }

    /// Dry-runs version `version` of `plugin` on recorded history (see `crate::dry_run`).
    /// Writes nothing and leaves live actors alone.
    pub async fn dry_run(
        &self,
        plugin: &str,
        version: u32,
        selection: Selection,
    ) -> Result<DryRunReport, Error> {
        let result = self.dry_run_inner(plugin, version, selection).await;
        self.counted(result)
    }

    async fn dry_run_inner(
        &self,
        plugin: &str,
        version: u32,
        selection: Selection,
    ) -> Result<DryRunReport, Error> {
        self.check_open()?;
        let candidate = self.shared.registry.find(plugin, version)?;
        // Its turn (see `Shared::dry_runs`); a deploy's own sample does not wait for it.
        let _turn = {
            let waiting = &self.shared.dry_runs_waiting;
            waiting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Counted down however the wait ends (its caller may go away meanwhile).
            struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
            impl Drop for Waiting<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            let _waiting = Waiting(waiting);
            self.shared
                .dry_runs
                .acquire()
                .await
                .map_err(|_| Error::ShuttingDown)?
        };
        let heads = match selection {
            Selection::Sample(n) => spread(self.devices_of(plugin), n),
            Selection::Devices(mut ids) => {
                // Each device once, in the order given.
                let mut seen = std::collections::HashSet::new();
                ids.retain(|id| seen.insert(id.clone()));
                self.heads_of(plugin, &ids)?
            }
        };
        Ok(self.sample(plugin, &candidate, heads, false).await)
    }

    /// The heads of devices `ids`, each checked to be a device of `plugin`.
    fn heads_of(&self, plugin: &str, ids: &[String]) -> Result<Vec<DeviceHead>, Error> {
        ids.iter()
            .map(|id| {
                crate::error::validate_id(id)?;
                let head = self
                    .shared
                    .journal
                    .device(id)
                    .ok_or_else(|| Error::UnknownDevice(id.clone()))?;
                let runs = self.plugin_name(head.version).unwrap_or_default();
                if runs != plugin {
                    return Err(Error::WrongPlugin {
                        device: id.clone(),
                        runs,
                        plugin: plugin.to_string(),
                    });
                }
                Ok(head)
            })
            .collect()
    }

    /// Runs a dry-run of `candidate` on `heads` on a blocking thread. A deploy's sample
    /// (`deploying`) ends early once the last [`SLOW_FAILURES_BEFORE_STOPPING`] devices ran
    /// out of time: each cost the candidate's whole budget, and what the deploy does next is
    /// settled (refused, or, forced, its live folds go one at a time and stop after as many
    /// slow failures). A dry-run asked for runs to its end.
    async fn sample(
        &self,
        plugin: &str,
        candidate: &VersionInfo,
        heads: Vec<DeviceHead>,
        deploying: bool,
    ) -> DryRunReport {
        let journal = self.shared.journal.clone();
        let registry = self.shared.registry.clone();
        let limits = Limits {
            max_output_bytes: self.shared.config.actor.max_output_bytes,
            call_timeout: self.shared.config.engine.call_timeout,
        };
        let (plugin, id) = (plugin.to_string(), candidate.id);
        // A server that starts to stop does not wait for the rest of the sample: the deploy
        // changes nothing then (see `deploy_inner`).
        let router = self.shared.router.clone();
        let task = tokio::task::spawn_blocking(move || {
            dry_run::run_until(&journal, &registry, &plugin, id, &heads, limits, |so_far| {
                let spins = so_far.len() >= SLOW_FAILURES_BEFORE_STOPPING
                    && so_far[so_far.len() - SLOW_FAILURES_BEFORE_STOPPING..]
                        .iter()
                        .all(|d| d.timed_out);
                router.upgrades_stopped() || (deploying && spins)
            })
        });
        match task.await {
            Ok(report) => report,
            Err(e) => {
                tracing::error!(error = %e, "dry-run task failed");
                DryRunReport {
                    plugin: candidate.plugin.clone(),
                    version: candidate.number,
                    devices: Vec::new(),
                    totals: Default::default(),
                    elapsed_ms: 0,
                }
            }
        }
    }

    async fn deploy_inner(
        &self,
        plugin: &str,
        version: Option<u32>,
        force: bool,
    ) -> Result<DeployReport, Error> {
        self.check_open()?;
        if self.shared.router.upgrades_stopped() {
            return Err(Error::ShuttingDown);
        }
        let _one_at_a_time = self.shared.deploying.lock().await;
        let started = Instant::now();
        let registry = &self.shared.registry;
        let current = registry
            .current(plugin)
            .ok_or_else(|| Error::UnknownPlugin(plugin.to_string()))?;
        let rollback = version.is_none();
        let target = match version {
            Some(n) => registry.find(plugin, n)?,
            None => registry.previous(plugin).ok_or_else(|| {
                Error::DeployRefused(format!(
                    "plugin `{plugin}` has no earlier current version to roll back to"
                ))
            })?,
        };

        // 1. Sample.
        let (already, others): (Vec<DeviceHead>, Vec<DeviceHead>) = self
            .devices_of(plugin)
            .into_iter()
            .partition(|h| h.version == target.id);
        let sampled = spread(others.clone(), SAMPLE);
        let planned = sampled.len();
        let sample = self.sample(plugin, &target, sampled, true).await;
        let overloaded = sample.devices.iter().filter(|d| d.overloaded).count();
        if overloaded > 0 && !force {
            // Not the candidate's fault, but nothing was proved about it either.
            return Err(Error::Overloaded(format!(
                "the dry-run of {overloaded} of {} sampled devices lacked a core or memory (the \
                 server is overloaded), so version {} of `{plugin}` was not checked and nothing \
                 was deployed; deploy again when the server is less loaded, or force the deploy",
                sample.devices.len(),
                target.number,
            )));
        }
        let unfoldable: Vec<&crate::dry_run::DeviceDryRun> =
            sample.devices.iter().filter(|d| !d.folds).collect();
        if !unfoldable.is_empty() && !force {
            let at = |d: &crate::dry_run::DeviceDryRun| match d.fold_failed_seq {
                Some(seq) => format!("{} at seq {seq}", d.device),
                None => d.device.clone(),
            };
            let first = unfoldable[0];
            // A sample cut short because the version spins says so, and what forcing it does.
            let spins = if unfoldable.iter().any(|d| d.timed_out) {
                format!(
                    " It ran out of time{}: forced, it moves only the devices it folds in \
                     time, and is given up after {SLOW_FAILURES_BEFORE_STOPPING} devices in \
                     a row failed slowly.",
                    if sample.devices.len() < planned {
                        format!(
                            " (the sample stopped after {} of {planned} devices, the last \
                             {SLOW_FAILURES_BEFORE_STOPPING} out of time)",
                            sample.devices.len()
                        )
                    } else {
                        String::new()
                    }
                )
            } else {
                String::new()
            };
            return Err(Error::DeployRefused(format!(
                "version {} of `{plugin}` cannot be brought up on {} of {} sampled devices \
                 (its `init`, `restore` or fold of their recorded transitions failed: {}); the \
                 first: {}.{spins} `drover plugin diff {plugin} {}` \
                 shows each; forced (`\"force\": true`), the deploy moves the devices it can \
                 fold and leaves these on their version",
                target.number,
                unfoldable.len(),
                sample.devices.len(),
                unfoldable
                    .iter()
                    .map(|d| at(d))
                    .collect::<Vec<_>>()
                    .join(", "),
                first.error.as_deref().unwrap_or("no detail"),
                target.number,
            )));
        }
        let mut cannot_fold: std::collections::HashSet<String> =
            unfoldable.iter().map(|d| d.device.clone()).collect();
        // The sample's findings, by device: where and why the version could not fold it.
        let sample_failures: std::collections::HashMap<String, (Option<u64>, String)> = unfoldable
            .iter()
            .map(|d| {
                let error = d.error.clone().unwrap_or_else(|| "no detail".into());
                (d.device.clone(), (d.fold_failed_seq, error))
            })
            .collect();

        // 1b. Check beyond the sample. Passivated devices move at their next activation, where
        // a history the version cannot fold leaves them on their old one after the deploy
        // reported success; the sample alone, always the same devices, missed them. So the
        // rest are folded too, as their activation would, until the budget is spent: for a
        // rollback those that ran the version being left first (their newer transitions are
        // the risk), then the live ones (the swap folds them again, but one that passivates
        // before it would be neither checked nor moved), the rest in a random order.
        let sampled: std::collections::HashSet<&str> =
            sample.devices.iter().map(|d| d.device.as_str()).collect();
        let live_now: std::collections::HashSet<Arc<str>> = self
            .shared
            .router
            .live_where(|_| true)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let unchecked: Vec<DeviceHead> = others
            .iter()
            .filter(|h| !sampled.contains(&*h.id))
            .cloned()
            .collect();
        let check = self
            .fold_check(
                unchecked,
                &live_now,
                target.id,
                current.id,
                FOLD_CHECK_BUDGET,
            )
            .await;
        if !check.cannot_fold.is_empty() && !force {
            let (first, seq, error) = &check.cannot_fold[0];
            return Err(Error::DeployRefused(format!(
                "version {} of `{plugin}` cannot be brought up on {} of the {} devices \
                 checked beyond the sample (its `init`, `restore` or fold of their recorded \
                 transitions failed: {}); the first: {first}{}: {error}. `drover \
                 plugin diff {plugin} {} --device ID` shows each; forced (`\"force\": true`), the \
                 deploy moves the devices it can fold and leaves these on their version",
                target.number,
                check.cannot_fold.len(),
                check.checked,
                check
                    .cannot_fold
                    .iter()
                    .map(|(id, _, _)| id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                seq.map_or_else(String::new, |s| format!(" at seq {s}")),
                target.number,
            )));
        }
        // Found as their activation would find it: marked failed whatever snapshots they have.
        let checked_unfoldable = check.cannot_fold;
        // Whether the checks saw the version run out of time: then it may spin on live
        // devices too (see step 3).
        let spun_in_checks = check.timed_out > 0 || sample.devices.iter().any(|d| d.timed_out);

        // The server began to stop while the checks ran: nothing is changed.
        if self.shared.router.upgrades_stopped() {
            return Err(Error::ShuttingDown);
        }

        // 2. Point.
        if rollback {
            registry.point_back(plugin)?;
        } else {
            registry.point(target.id, Origin::Upload)?;
        }
        tracing::info!(
            plugin,
            from = current.number,
            to = target.number,
            rollback,
            "deploying"
        );
        // The devices whose history the sample could not fold stay on their version, and say
        // so from now on: a fold at their next activation would fail the same way (folding is
        // deterministic), so it is not tried until a deploy (see `upgrade::FailedUpgrades`).
        // Unless the device has a snapshot the target version took itself (a rollback): the
        // sample folded from elsewhere than an activation would start. Those noted are not
        // folded again below either, live or not: the swap would spend on each what the check
        // did (the whole activation budget, for a version that spins).
        let mut known_unfoldable: std::collections::HashMap<String, (Option<u64>, String)> =
            Default::default();
        // What earlier deploys of this version found is replaced by what this one found (a
        // larger budget, or a fixed journal, may let devices through now).
        // And what versions of the plugin no longer current found is of no more use (a
        // deploy or rollback to one forgets it again first).
        let reg = registry.clone();
        let plugin_name = plugin.to_string();
        self.shared.router.forget_upgrade_failures(move |v| {
            reg.version(v)
                .is_some_and(|info| info.plugin == plugin_name)
        });
        let mut failed_nums = Vec::new();
        for id in &cannot_fold {
            if let Some(h) = self.shared.journal.device(id)
                && !self
                    .shared
                    .journal
                    .snapshots(h.num)
                    .iter()
                    .any(|snap| snap.version == target.id)
            {
                failed_nums.push(h.num);
                if let Some(found) = sample_failures.get(id) {
                    known_unfoldable.insert(id.clone(), found.clone());
                }
            }
        }
        for (id, seq, error) in checked_unfoldable {
            if let Some(h) = self.shared.journal.device(&id) {
                failed_nums.push(h.num);
                known_unfoldable.insert(id.clone(), (seq, error));
            }
            cannot_fold.insert(id);
        }
        self.shared.metrics.upgrade_failures.fetch_add(
            failed_nums.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.shared
            .router
            .note_upgrades_failed(failed_nums, target.id);

        // 3. Swap live devices, several at a time.
        let reg = registry.clone();
        let plugin_name = plugin.to_string();
        let target_id = target.id;
        let live = self.shared.router.live_where(move |v| {
            v != target_id
                && reg
                    .version(v)
                    .is_some_and(|info| info.plugin == plugin_name)
        });
        // Each one's device number: the id may be removed and provisioned again meanwhile,
        // a new device under the same id, which this deploy did not move.
        let nums: std::collections::HashMap<Arc<str>, u32> = live
            .iter()
            .filter_map(|(id, _)| Some((id.clone(), self.shared.journal.device(id)?.num)))
            .collect();
        // A bounded number of devices upgrade at a time: each one's mailbox waits only for
        // its own replay, and events of the rest of the fleet keep their share of the
        // threads.
        let in_parallel = self.upgrade_parallelism();
        let (from_number, to_number) = (current.number, target.number);
        // A version that spins in its fold fails each live device only when the device's
        // activation budget runs out, while the device's events wait; on the slow lane, where
        // such a version runs, one device after the other. Past a few such failures in a row
        // the version is given up (`upgrade::SlowFolds`, counted by the actors' folds): the
        // rest are not tried, now or at their activation, instead of each paying it.
        // And once the version shows slow (or ran out of time in the checks above), its folds
        // go to the one slow-lane thread, where several at once only take turns, each holding
        // its device's events all the while: one at a time then, the rest waiting here with
        // their mailboxes open.
        let slow_failure = upgrade::slow_failure(self.shared.config.engine.activation_timeout);
        let slow_gate = tokio::sync::Semaphore::new(1);
        // The live devices the given-up version was not tried on.
        let not_tried = parking_lot::Mutex::new(Vec::new());
        let (known_unfoldable, slow_gate, not_tried) = (&known_unfoldable, &slow_gate, &not_tried);
        let mut devices: Vec<DeviceUpgrade> = futures::stream::iter(live)
            .map(|(id, tx)| async move {
                // The version the device runs (a deploy of the current version again finds
                // devices left behind on older ones), and its seq.
                let now = || {
                    let head = self.shared.journal.device(&id);
                    let from = head
                        .as_ref()
                        .and_then(|h| registry.version(h.version))
                        .map_or(from_number, |v| v.number);
                    (from, head.map_or(0, |h| h.seq))
                };
                let line = |outcome: UpgradeOutcome, error: String| {
                    let (from, seq) = now();
                    let mut line = DeviceUpgrade::lazy(&id, from, to_number, seq);
                    line.outcome = outcome;
                    line.error = Some(error);
                    line
                };
                if let Some((seq, error)) = known_unfoldable.get(&*id) {
                    let mut line = line(
                        UpgradeOutcome::Failed,
                        format!(
                            "{error} (found by the deploy's check before the swap; a fold is \
                             deterministic, so it was not folded again)"
                        ),
                    );
                    line.failed_seq = *seq;
                    return line;
                }
                let _one_at_a_time = if spun_in_checks || registry.setup_runs_slow(target_id) {
                    slow_gate.acquire().await.ok()
                } else {
                    None
                };
                if self.check_open().is_err() || self.shared.router.upgrades_stopped() {
                    return line(
                        UpgradeOutcome::Lazy,
                        "not tried: the server is shutting down; it moves at its next \
                         activation"
                            .into(),
                    );
                }
                if let Some(slow) = self.shared.router.upgrade_given_up(target_id) {
                    // Recorded as failed below, all at once.
                    if let Some(h) = self.shared.journal.device(&id) {
                        not_tried.lock().push(h.num);
                    }
                    return line(
                        UpgradeOutcome::Failed,
                        upgrade::given_up_text(to_number, slow, slow_failure),
                    );
                }
                let (reply, rx) = oneshot::channel();
                let msg = Message::Upgrade(Box::new(UpgradeRequest {
                    version: target_id,
                    reply,
                }));
                // Waits for room: the upgrade queues behind the events already in the mailbox.
                let report = match tx.send(msg).await {
                    Ok(()) => rx.await.ok(),
                    Err(_) => None,
                };
                report.unwrap_or_else(|| DeviceUpgrade::lazy(&id, now().0, to_number, 0))
            })
            .buffer_unordered(in_parallel)
            .collect()
            .await;
        devices.sort_by(|a, b| a.device.cmp(&b.device));
        // Those the given-up version was not tried on stay on their version as if it had
        // failed on them, activations included, until it is deployed again.
        let mut not_tried = std::mem::take(&mut *not_tried.lock());
        // A live device whose fold was put off (the server lacked a core for it) before the
        // version was given up finds it given up when it tries again: it is not tried, like
        // the devices the deploy reached after the give-up, and its line says so now rather
        // than promise a retry. (One that has tried again already was recorded then, and is
        // not counted twice.)
        if let Some(slow) = self.shared.router.upgrade_given_up(target_id)
            && self.check_open().is_ok()
        {
            for d in devices
                .iter_mut()
                .filter(|d| d.outcome == UpgradeOutcome::Lazy)
            {
                let Some(h) = self.shared.journal.device(&d.device) else {
                    continue;
                };
                if h.version == target_id {
                    continue;
                }
                not_tried.push(h.num);
                d.outcome = UpgradeOutcome::Failed;
                d.error = Some(upgrade::given_up_text(to_number, slow, slow_failure));
            }
        }
        let newly = self
            .shared
            .router
            .note_upgrades_failed(not_tried, target_id);
        self.shared.router.note_upgrades_not_tried(newly as u64);
        // The new bindings were queued without waiting; the report speaks of durable ones.
        self.shared.journal.barrier().await?;
        for d in &mut devices {
            let durable = self
                .shared
                .journal
                .device(&d.device)
                .filter(|h| nums.get(d.device.as_str()) == Some(&h.num))
                .map(|h| h.version);
            if durable.is_none() {
                // Removed meanwhile (and maybe provisioned again: another device), whatever
                // its fold did: a removal is no failed commit, and the device is left behind
                // on no version.
                d.outcome = UpgradeOutcome::Removed;
                d.error = None;
            } else if d.outcome == UpgradeOutcome::Upgraded && durable != Some(target_id) {
                d.outcome = UpgradeOutcome::Failed;
                d.error = Some(
                    "journal check: the new binding was not made durable (a failed commit); \
                     the device was rebuilt from the journal on its old version and moves at \
                     its next activation"
                        .into(),
                );
            }
        }

        // 3b. End the quarantines earned under the versions being left.
        let reg = registry.clone();
        let plugin_name = plugin.to_string();
        let quarantined = self.shared.router.quarantined_where(move |v| {
            v != target_id
                && reg
                    .version(v)
                    .is_some_and(|info| info.plugin == plugin_name)
        });
        let mut quarantines_ended = 0;
        for id in quarantined {
            let Some(head) = self.shared.journal.device(&id) else {
                continue;
            };
            if cannot_fold.contains(&*id) || self.shared.router.upgrade_failed(head.num, target_id)
            {
                continue;
            }
            match self.resume(&id).await {
                Ok(_) => {
                    tracing::info!(device = %id, to = target.number, "quarantine ended by the deploy");
                    quarantines_ended += 1;
                }
                Err(e) => tracing::warn!(device = %id, error = %e, "could not end a quarantine"),
            }
        }

        // 4. Report.
        let all = self.devices_of(plugin);
        let mut totals = DeployTotals {
            devices: all.len(),
            live: devices.len(),
            fold_checked: check.checked,
            quarantines_ended,
            removed: devices
                .iter()
                .filter(|d| d.outcome == UpgradeOutcome::Removed)
                .count(),
            ..Default::default()
        };
        // Each device once, by what it is now: a device that moved during the deploy (one
        // on V activated while the check ran, and was brought up on the version being left
        // before the swap moved it back) is counted by the swap's outcome, not also as one
        // that was on V from the start.
        // A device removed meanwhile and provisioned again under its id is a new device,
        // counted as the deploy did not touch it.
        let outcomes: std::collections::HashMap<&str, UpgradeOutcome> = devices
            .iter()
            .map(|d| (d.device.as_str(), d.outcome))
            .collect();
        let before: std::collections::HashSet<&str> = already.iter().map(|h| &*h.id).collect();
        let given_up = self.shared.router.upgrade_given_up(target.id).is_some();
        for h in &all {
            match outcomes.get(&*h.id) {
                Some(UpgradeOutcome::Upgraded) => totals.upgraded += 1,
                Some(UpgradeOutcome::Failed) => totals.failed += 1,
                Some(UpgradeOutcome::Unchanged) => totals.unchanged += 1,
                Some(UpgradeOutcome::Lazy | UpgradeOutcome::Removed) | None
                    if h.version == target.id =>
                {
                    if before.contains(&*h.id) {
                        totals.unchanged += 1;
                    } else {
                        totals.upgraded_at_activation += 1;
                    }
                }
                Some(UpgradeOutcome::Lazy | UpgradeOutcome::Removed) | None
                    if cannot_fold.contains(&*h.id) =>
                {
                    totals.cannot_fold += 1;
                }
                Some(UpgradeOutcome::Lazy | UpgradeOutcome::Removed) | None if given_up => {
                    totals.not_tried += 1
                }
                Some(UpgradeOutcome::Lazy | UpgradeOutcome::Removed) | None => {
                    totals.pending_lazy += 1
                }
            }
        }
        let problems: Vec<String> = devices
            .iter()
            .filter_map(|d| {
                d.error
                    .as_ref()
                    .filter(|e| e.starts_with("journal check"))
                    .map(|e| format!("{}: {e}", d.device))
            })
            .collect();
        let (pause_p50_us, pause_p99_us, pause_max_us) = pause_percentiles(&devices);
        let report = DeployReport {
            plugin: plugin.to_string(),
            from: current.number,
            to: target.number,
            rollback,
            forced: force,
            elapsed_ms: started.elapsed().as_millis() as u64,
            pause_p50_us,
            pause_p99_us,
            pause_max_us,
            journal_check: JournalCheck {
                devices: totals.upgraded,
                ok: problems.is_empty(),
                problems,
            },
            totals,
            sample,
            devices,
        };
        tracing::info!(
            plugin,
            to = target.number,
            upgraded = report.totals.upgraded,
            failed = report.totals.failed,
            pending_lazy = report.totals.pending_lazy,
            ms = report.elapsed_ms,
            "deploy done"
        );
        Ok(report)
    }

    /// Folds the history of each of `heads` with version `target` as the device's next
    /// activation would ([`upgrade::bring_up`]), on a blocking thread, until `budget` is
    /// spent: devices that ran version `leaving` first, then the `live` ones, the rest in a
    /// random order.
    async fn fold_check(
        &self,
        mut heads: Vec<DeviceHead>,
        live: &std::collections::HashSet<Arc<str>>,
        target: u32,
        leaving: u32,
        budget: std::time::Duration,
    ) -> FoldCheck {
        let nonce = crate::clock::seed("fold-check", crate::clock::jitter().to_bits());
        heads.sort_by_cached_key(|h| {
            (
                h.version != leaving,
                !live.contains(&h.id),
                crate::clock::seed(&h.id, nonce),
            )
        });
        let (journal, registry) = (self.shared.journal.clone(), self.shared.registry.clone());
        let router = self.shared.router.clone();
        let task = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut check = FoldCheck {
                checked: 0,
                cannot_fold: Vec::new(),
                timed_out: 0,
            };
            let activation = registry.engine().config().activation_timeout;
            for head in heads {
                let left = budget.saturating_sub(started.elapsed());
                if left.is_zero() || router.upgrades_stopped() {
                    break;
                }
                let want = DeviceHead {
                    version: target,
                    ..head.clone()
                };
                // No more than the check has left (a version that spins would otherwise
                // hold it a whole activation budget past its own).
                let within = left.min(activation);
                let folded = futures::executor::block_on(upgrade::bring_up_within(
                    &journal,
                    &registry,
                    &want,
                    head.version,
                    Preemption::None,
                    within,
                ));
                match folded {
                    Ok(_) => check.checked += 1,
                    // Nothing proved either way: left to its activation.
                    Err(f) if f.error.kind() == ErrorKind::Overloaded => {}
                    // Out of the check's time, not of the activation budget: nothing proved
                    // (its activation has the whole budget), though the version runs long.
                    Err(f) if f.timed_out && within < activation => {
                        check.timed_out += 1;
                        break;
                    }
                    Err(f) => {
                        check.checked += 1;
                        check.timed_out += usize::from(f.timed_out);
                        check.cannot_fold.push((
                            head.id.to_string(),
                            f.seq,
                            upgrade::failure_text(&f.error),
                        ));
                    }
                }
            }
            check
        });
        task.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "fold check task failed");
            FoldCheck {
                checked: 0,
                cannot_fold: Vec::new(),
                timed_out: 0,
            }
        })
    }

    /// How many devices upgrade at once: a few per actor thread, enough to overlap one
    /// device's replay with another's journal reads, few enough that live traffic keeps
    /// most of the threads.
    fn upgrade_parallelism(&self) -> usize {
        let threads = match self.shared.config.actor.threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        threads * UPGRADES_PER_THREAD
    }

    /// Every device of `plugin`, from the journal (durable state; no actor is asked).
    fn devices_of(&self, plugin: &str) -> Vec<DeviceHead> {
        let journal = &self.shared.journal;
        journal
            .device_ids()
            .iter()
            .filter_map(|id| journal.device(id))
            .filter(|h| self.plugin_name(h.version).as_deref() == Some(plugin))
            .collect()
    }

    fn plugin_name(&self, version: u32) -> Option<String> {
        self.shared.registry.version(version).map(|v| v.plugin)
    }
}

/// Up to `n` of `heads`, evenly spread (every k-th), so a sample is not just the oldest.
fn spread(mut heads: Vec<DeviceHead>, n: usize) -> Vec<DeviceHead> {
    heads.sort_by(|a, b| a.id.cmp(&b.id));
    if heads.len() <= n {
        return heads;
    }
    let step = heads.len() as f64 / n as f64;
    (0..n)
        .map(|i| heads[(i as f64 * step) as usize].clone())
        .collect()
}

/// p50, p99 and max of how long the deploy held live devices' mailboxes, in µs: every device
/// it held, whatever came of it (a device that failed, or whose upgrade was put off, held its
/// events as long as its fold ran), not only the upgraded ones.
fn pause_percentiles(devices: &[DeviceUpgrade]) -> (u64, u64, u64) {
    let mut pauses: Vec<u64> = devices
        .iter()
        .map(|d| d.pause_us)
        .filter(|&p| p > 0)
        .collect();
    pauses.sort_unstable();
    let pct = |p: f64| -> u64 {
        if pauses.is_empty() {
            0
        } else {
            pauses[((pauses.len() - 1) as f64 * p).round() as usize]
        }
    };
    (pct(0.5), pct(0.99), pauses.last().copied().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_count_every_held_mailbox_not_only_the_upgraded() {
        let line = |outcome, pause_us| {
            let mut d = DeviceUpgrade::lazy("d", 1, 2, 7);
            d.outcome = outcome;
            d.pause_us = pause_us;
            d
        };
        // Every live device failed: their folds held their events all the same.
        let failed = [
            line(UpgradeOutcome::Failed, 300),
            line(UpgradeOutcome::Failed, 100),
            line(UpgradeOutcome::Lazy, 0),
        ];
        assert_eq!(pause_percentiles(&failed), (300, 300, 300));
        let mixed = [
            line(UpgradeOutcome::Upgraded, 50),
            line(UpgradeOutcome::Failed, 900),
            line(UpgradeOutcome::Lazy, 400),
            line(UpgradeOutcome::Unchanged, 0),
        ];
        assert_eq!(pause_percentiles(&mixed), (400, 900, 900));
        assert_eq!(pause_percentiles(&[]), (0, 0, 0));
    }
}
