//! Moving a device to another plugin version: live (a deploy's [`Message::Upgrade`]),
//! lazily at activation (a deploy that happened while it was passivated), and again later
//! when the server was too loaded to fold its history.

use super::*;

/// Why [`Actor::bring_up`] did not bring a device up on a version.
pub(super) enum NotBroughtUp {
    /// The fold failed, was stopped as the server stops, or lacked a core or memory.
    Failed(replay::RebuildFailure),
    /// The version runs slow and another device's fold of it held its turn past the wait
    /// (see [`upgrade::SlowFolds`]): nothing is known, the upgrade is put off.
    NoTurn,
    /// The version failed slowly on this many devices in a row: not tried.
    GivenUp(usize),
}

/// What an activation does about a pending upgrade (see `Actor::lazy_upgrade`).
pub(super) enum LazyUpgrade {
    /// Brought up on the plugin's current version.
    Upgraded(Box<replay::Rebuilt>),
    /// Comes up on its own version.
    Stay,
    /// Comes up on its own version and tries this one again, live, later.
    PutOff(u32),
}

/// A put-off live upgrade to try again (see `Live::upgrade_retry`).
#[derive(Debug, Clone, Copy)]
pub(super) struct UpgradeRetry {
    pub(super) due: Instant,
    /// The version it was put off for: if the plugin's current version moved since, that
    /// deploy sends its own upgrade and this one is dropped.
    pub(super) to: u32,
    /// Tries put off so far. Each fold under overload may hold the device's events up to
    /// the wall-clock bound, so they back off (`INTERNAL_RETRY` doubled each time, jittered)
    /// and stop after [`UPGRADE_RETRIES`], leaving the move to the next activation.
    pub(super) tries: u32,
}

/// How many times a put-off live upgrade is tried again before it is left to the device's
/// next activation: 5, 10, 20 and 40 s (±25%) after each put-off.
pub(super) const UPGRADE_RETRIES: u32 = 4;

impl Actor {
    /// Folds the device's history into version `want.version` ([`upgrade::bring_up`]) where its
    /// activations would run: on the slow lane if that version builds states slowly (see
    /// `CompiledPlugin::setup_runs_slow`), else on the pool,
    /// stopped there once seen slow and folded again on the slow lane, as an activation is.
    /// On the slow lane a version's folds go one device at a time, and a version that failed
    /// slowly on several devices in a row is not tried (see [`upgrade::SlowFolds`]).
    pub(super) async fn bring_up(
        &self,
        want: &DeviceHead,
        from: u32,
    ) -> Result<(replay::Rebuilt, Option<bool>), NotBroughtUp> {
        let registry = &self.env.registry;
        let folds = self.env.slow_folds.of(want.version);
        if let Some(slow) = folds.given_up() {
            return Err(NotBroughtUp::GivenUp(slow));
        }
        let slow_failure = self.slow_failure();
        let note = |r: &Result<(replay::Rebuilt, Option<bool>), replay::RebuildFailure>,
                    took: Duration| {
            match r {
                Ok(_) => folds.note(true, false),
                // Nothing is known of the version when the server stopped the fold or lacked
                // a core or memory for it.
                Err(f) if matches!(f.error, Error::ShuttingDown | Error::Overloaded(_)) => {}
                Err(f) => folds.note(false, f.timed_out || took >= slow_failure),
            }
        };
        if !registry.setup_runs_slow(want.version) {
            let started = Instant::now();
            // Boxed: a fold's future is kilobytes, and every actor task would carry it.
            let on_pool = Box::pin(upgrade::bring_up(
                &self.env.journal,
                registry,
                want,
                from,
                Preemption::Move,
            ))
            .await;
            match on_pool {
                Err(f)
                    if matches!(f.error, Error::Overloaded(_))
                        && registry.setup_runs_slow(want.version) => {}
                other => {
                    note(&other, started.elapsed());
                    return other.map_err(NotBroughtUp::Failed);
                }
            }
        }
        // The slow lane's folds of this version, one at a time: several at once would only
        // take turns on its thread, each holding its device's events until all of them end.
        let Some(_turn) = folds.turn(slow_failure).await else {
            return Err(NotBroughtUp::NoTurn);
        };
        if let Some(slow) = folds.given_up() {
            return Err(NotBroughtUp::GivenUp(slow));
        }
        let started = Instant::now();
        let (journal, registry, want) = (
            self.env.journal.clone(),
            self.env.registry.clone(),
            want.clone(),
        );
        let mut task = self.env.slow_lane.spawn(async move {
            upgrade::bring_up(&journal, &registry, &want, from, Preemption::Yield).await
        });
        // A fold on the slow lane runs for up to the activation budget. None of them holds a
        // shutdown: the fold yields at each tick of its budget, where the abort stops it.
        let finished = loop {
            tokio::select! {
                finished = &mut task => break finished,
                () = tokio::time::sleep(STOPPING_POLL) => {
                    if self.upgrades_stopped() {
                        task.abort();
                        return Err(NotBroughtUp::Failed(replay::RebuildFailure::from(
                            Error::ShuttingDown,
                        )));
                    }
                }
            }
        };
        let folded = finished
            .map_err(|e| match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => e,
            })
            .map_err(|e| {
                replay::RebuildFailure::from(Error::Internal(format!(
                    "folding a new version on the slow lane: {e}"
                )))
            })
            .and_then(|r| r);
        note(&folded, started.elapsed());
        folded.map_err(NotBroughtUp::Failed)
    }

    /// At activation: if the plugin's current version is not the one this device runs (a
    /// deploy happened while it was passivated), brings it up on the current one. Else the
    /// device activates on its own version: no deploy pending, the current version cannot
    /// fold this device's history (recorded, not tried again until a deploy) or was given up
    /// (see [`upgrade::SlowFolds`]; recorded the same way), or its turn did not come (put
    /// off: tried again, live, later).
    pub(super) async fn lazy_upgrade(&mut self) -> Result<LazyUpgrade, Error> {
        let from = self.head.version;
        let Some(to) = self.env.registry.target_of(from) else {
            return Ok(LazyUpgrade::Stay);
        };
        let failed_before = self.env.upgrade_failures.contains(self.head.num, to);
        if to == from || failed_before || self.upgrades_stopped() {
            return Ok(LazyUpgrade::Stay);
        }
        let mut want = self.head.clone();
        want.version = to;
        let number = |id: u32| self.env.registry.version(id).map_or(0, |v| v.number);
        match self.bring_up(&want, from).await {
            // The server lacked a core or memory: nothing is known about the version. The
            // device comes up on its own version (if the server has what that takes) and
            // answers; the upgrade is put off.
            Err(NotBroughtUp::Failed(f)) if matches!(f.error, Error::Overloaded(_)) => {
                tracing::info!(device = %self.head.id, from = number(from), to = number(to), error = %f.error, "upgrade at activation put off");
                Ok(LazyUpgrade::PutOff(to))
            }
            // Stopped as the server stops: nothing is known; the device comes up on its own
            // version and tries at a later activation.
            Err(NotBroughtUp::Failed(f)) if matches!(f.error, Error::ShuttingDown) => {
                Ok(LazyUpgrade::Stay)
            }
            Err(NotBroughtUp::NoTurn) => {
                tracing::info!(device = %self.head.id, from = number(from), to = number(to), "upgrade at activation put off: another device's fold of the version, which runs slow, holds its turn");
                Ok(LazyUpgrade::PutOff(to))
            }
            Err(NotBroughtUp::GivenUp(slow)) => {
                let why = upgrade::given_up_text(number(to), slow, self.slow_failure());
                tracing::warn!(device = %self.head.id, from = number(from), to = number(to), "{why}; it stays on its own version");
                self.stays_behind(to, true);
                Ok(LazyUpgrade::Stay)
            }
            Ok((rebuilt, _)) => {
                self.writer.append_rebind(&want, clock::now_ms());
                tracing::info!(device = %self.head.id, from = number(from), to = number(to), seq = want.seq, "upgraded at activation");
                self.env.metrics.upgrades.fetch_add(1, Ordering::Relaxed);
                self.head = want;
                self.activity.version.store(to, Ordering::Relaxed);
                self.moved_to_another_version();
                Ok(LazyUpgrade::Upgraded(Box::new(rebuilt)))
            }
            Err(NotBroughtUp::Failed(f)) => {
                tracing::warn!(
                    device = %self.head.id,
                    from = number(from),
                    to = number(to),
                    seq = ?f.seq,
                    error = %f.error,
                    "cannot bring the device up on its plugin's current version; it stays on its own"
                );
                self.stays_behind(to, false);
                Ok(LazyUpgrade::Stay)
            }
        }
    }

    /// Moves the live instance to version `to` between two events (see `crate::upgrade`).
    /// Events that arrive meanwhile wait in the mailbox; none is lost or reordered.
    pub(super) async fn on_upgrade(&mut self, to: u32) -> DeviceUpgrade {
        let started = Instant::now();
        let mut report = self.upgrade_live(to, started).await;
        // Every way it ended that held the device's events says for how long, not only the
        // fold that succeeded (a deploy's pause figures count them all).
        if matches!(
            report.outcome,
            UpgradeOutcome::Failed | UpgradeOutcome::Upgraded
        ) || report.error.is_some()
        {
            report.pause_us = started.elapsed().as_micros() as u64;
        }
        report
    }

    /// The upgrade itself; [`Actor::on_upgrade`] times it.
    pub(super) async fn upgrade_live(&mut self, to: u32, started: Instant) -> DeviceUpgrade {
        let registry = &self.env.registry;
        let number = |id: u32| registry.version(id).map_or(0, |v| v.number);
        let from = self.head.version;
        let mut report =
            DeviceUpgrade::lazy(&self.head.id, number(from), number(to), self.head.seq);
        if from == to {
            report.outcome = UpgradeOutcome::Unchanged;
            return report;
        }
        // Not live, or lost meanwhile: the next activation upgrades it (lazily).
        if self.live.is_none() || self.writer.is_fenced() {
            return report;
        }
        // The journal must hold everything this instance handled before it is folded anew.
        if !self.writer.is_idle()
            && let Err(e) = self.env.journal.barrier().await
        {
            report.outcome = UpgradeOutcome::Failed;
            report.error = Some(Error::from(e).to_string());
            return report;
        }
        if self.writer.is_fenced() {
            return report;
        }
        let Some(live_seq) = self.live.as_ref().map(|l| l.seq) else {
            return report;
        };
        report.seq = live_seq;
        let Some(mut want) = self.env.journal.device(&self.head.id) else {
            report.outcome = UpgradeOutcome::Failed;
            report.error = Some("the device is no longer in the journal".into());
            return report;
        };
        // Every event this instance acknowledged is durable, once: the journal's seq is the
        // instance's.
        if want.seq != live_seq {
            report.outcome = UpgradeOutcome::Failed;
            report.error = Some(format!(
                "journal check: the live instance is at seq {live_seq}, the journal at {}",
                want.seq
            ));
            return report;
        }
        want.version = to;
        match self.bring_up(&want, from).await {
            Err(NotBroughtUp::Failed(f)) if matches!(f.error, Error::Overloaded(_)) => {
                self.put_off_upgrade(&mut report, to, f.error.to_string());
            }
            Err(NotBroughtUp::NoTurn) => {
                let why = format!(
                    "put off: another device's fold of version {}, which runs slow, held its \
                     turn over {} ms",
                    number(to),
                    self.slow_failure().as_millis()
                );
                self.put_off_upgrade(&mut report, to, why);
            }
            Err(NotBroughtUp::GivenUp(slow)) => {
                report.outcome = UpgradeOutcome::Failed;
                report.error = Some(upgrade::given_up_text(
                    number(to),
                    slow,
                    self.slow_failure(),
                ));
                self.stays_behind(to, true);
            }
            Err(NotBroughtUp::Failed(f)) if matches!(f.error, Error::ShuttingDown) => {
                report.error = Some(
                    "stopped: the server is shutting down; it moves at its next activation".into(),
                );
            }
            Err(NotBroughtUp::Failed(f)) => {
                report.outcome = UpgradeOutcome::Failed;
                report.failed_seq = f.seq;
                report.error = Some(upgrade::failure_text(&f.error));
                self.stays_behind(to, false);
            }
            Ok((rebuilt, snapshot_readable)) => {
                report.path = Some(upgrade::path_of(&rebuilt));
                report.applied = rebuilt.applied;
                report.snapshot_readable = snapshot_readable;
                // Not awaited: the binding is queued before any event the new version
                // handles, and the deploy waits for the journal before it reports.
                self.writer.append_rebind(&want, clock::now_ms());
                if let Some(live) = self.live.as_mut() {
                    live.instance = rebuilt.instance;
                    live.since_snapshot = rebuilt.applied;
                    live.tail_cost = started.elapsed();
                    self.head = want;
                    self.activity.version.store(to, Ordering::Relaxed);
                    self.moved_to_another_version();
                    self.env.upgrade_failures.remove(self.head.num, to);
                    self.env.metrics.upgrades.fetch_add(1, Ordering::Relaxed);
                    report.outcome = UpgradeOutcome::Upgraded;
                    // The next activation starts from the new version's own snapshot.
                    if rebuilt.applied > 0 || rebuilt.foreign_snapshot {
                        self.snapshot().await;
                    }
                }
            }
        }
        report
    }

    /// Records that this device stays on its version rather than move to `to`, not tried
    /// again until a deploy: `to` failed to bring it up, or was given up (`given_up`, see
    /// [`upgrade::SlowFolds`]); each counted in its own metric.
    pub(super) fn stays_behind(&self, to: u32, given_up: bool) {
        self.env.upgrade_failures.insert(self.head.num, to);
        let metrics = &self.env.metrics;
        let counter = if given_up {
            &metrics.upgrades_not_tried
        } else {
            &metrics.upgrade_failures
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A live upgrade to `to` that could not be tried now, for `why`: nothing is known about
    /// the version, so the device stays as it is (not remembered as a failure) and tries again
    /// later, live (`Live::upgrade_retry`), or moves at its next activation.
    pub(super) fn put_off_upgrade(&mut self, report: &mut DeviceUpgrade, to: u32, why: String) {
        tracing::warn!(device = %self.head.id, error = %why, "upgrade put off");
        report.error = Some(format!(
            "{why}; tried again, live, before its first message once about {} s have passed \
             (then 10, 20 and 40 s after each further put-off), else at its next activation",
            INTERNAL_RETRY.as_secs()
        ));
        if let Some(live) = self.live.as_mut() {
            live.upgrade_retry = Some(UpgradeRetry {
                due: Instant::now() + INTERNAL_RETRY.mul_f64(0.75 + 0.5 * clock::jitter()),
                to,
                tries: 0,
            });
        }
    }

    /// Tries again a live upgrade that was put off (see `Live::upgrade_retry`), to the version
    /// it was put off for if that is still the plugin's current one.
    pub(super) async fn retry_upgrade(&mut self) {
        let Some(retry) = self.live.as_mut().and_then(|l| l.upgrade_retry.take()) else {
            return;
        };
        let from = self.head.version;
        // Moved since (a rollback, another deploy: that one sends its own upgrade), or
        // found unable to bring the device up.
        if self.env.registry.target_of(from) != Some(retry.to)
            || retry.to == from
            || self.env.upgrade_failures.contains(self.head.num, retry.to)
        {
            return;
        }
        let report = self.on_upgrade(retry.to).await;
        // Put off again: later, or (after the last try) at the next activation.
        if let Some(live) = self.live.as_mut()
            && let Some(again) = live.upgrade_retry.as_mut()
        {
            let tries = retry.tries + 1;
            if tries >= UPGRADE_RETRIES {
                live.upgrade_retry = None;
            } else {
                again.tries = tries;
                again.due = Instant::now()
                    + INTERNAL_RETRY
                        .saturating_mul(1 << tries)
                        .mul_f64(0.75 + 0.5 * clock::jitter());
            }
        }
        tracing::info!(
            device = %self.head.id,
            from = report.from,
            to = report.to,
            outcome = ?report.outcome,
            error = report.error.as_deref().unwrap_or(""),
            "put-off upgrade tried again"
        );
    }
}
