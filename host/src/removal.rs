//! Removing a device, with or without an archive of its history; removing plugin versions.
//!
//! # Plugin versions
//!
//! A version can be removed once no device runs it and it is not the plugin's current
//! version (removing every version removes the plugin). It leaves the list and cannot be
//! deployed; its component and precompiled artifact are deleted from `<data>/plugins/`; the
//! journal's version record stays, so old records still say which version decided them.
//!
//! A removal stops the device's actor (after it has handled what was already in its
//! mailbox), waits until everything it wrote is durable, optionally writes the device's
//! whole journal to `<data>/archive/<id>.<ms>.jsonl`, and records the removal in the journal
//! (record kind 6). The device's records stay in the journal file: the index forgets the
//! device, its id answers `unknown-device`, and the id may be provisioned again as a new
//! device starting at seq 1. Messages other devices still owe it become undeliverable (their
//! senders' dead letters), so none reaches that new device.
//!
//! What the device itself still owes goes with it ([`Cancelled`], counted as the removal
//! record is folded into the index, so exactly what was owed at that point; the messages a
//! target had in hand then, handled and not yet durable, up to its in-flight cap, still
//! complete, and are counted there too): messages its targets have not handled (a copy on its way is dropped on arrival: the sender's index entry
//! that listed it as owed is gone), unacknowledged commands (its outbox answers 404) and
//! pending timers. Delivering the messages anyway would need the removed device's owed set
//! kept, checkpointed and retained after it, for a sender nobody can read any more. The
//! removal's answer, a warning in the log and `drover_messages_cancelled_total` say what
//! was cancelled, so a decommissioning that would drop effects is seen, not silent.
//!
//! # The archive
//!
//! JSON lines: first the device (`{"device", "plugin", "version", "config",
//! "created_at_ms", "seq", "removed_at_ms"}`), then one line per journal record in seq order
//! (`{"seq", "at", "plugin", "version", "event", "transitions"}` and `lost`, `origin`,
//! `effects` when present: what `GET /v1/devices/{id}/journal` shows of it, event and
//! transitions in the text recorded; before 2026-12-03 `at` was written `at_ms`, and before
//! 2026-12-04 the texts went through a `serde_json::Value`, which sorted their keys and
//! rounded numbers past 64 bits). Written to a temporary file, fsynced, then renamed,
//! before the removal is recorded; an archive whose removal was never recorded (a crash in
//! between) is deleted at the next start, so every archive is of a removed device.

use std::io::Write as _;
use std::path::PathBuf;

use serde::Serialize;

use crate::clock;
use crate::error::{Error, validate_id};
use crate::http::devices::RecordOut;
use crate::journal::Cancelled;
use crate::runtime::Runtime;

/// The data directory's folder of removed devices' archives.
pub(crate) const ARCHIVE_DIR: &str = "archive";

/// What a removal did.
#[derive(Debug, Clone, Serialize)]
pub struct Removal {
    pub id: String,
    /// The device's last seq.
    pub seq: u64,
    /// The archive written, if one was asked for.
    pub archive: Option<PathBuf>,
    /// What the device still owed as it went: never done now (see the module docs).
    pub cancelled: Cancelled,
}

impl Runtime {
    /// Removes device `id`; with `archive`, first writes its history to a JSON-lines file
    /// under the data directory (see the module docs). Events that reach the device during
    /// the removal either commit before it or get [`Error::UnknownDevice`].
    pub async fn remove_device(&self, id: &str, archive: bool) -> Result<Removal, Error> {
        // In a task of its own: a caller that goes away (an HTTP client hanging up) must not
        // stop a removal half-way, with the device barred from every message.
        let (rt, owned) = (self.clone(), id.to_string());
        let result = Runtime::detached(
            "removal",
            async move { rt.remove_inner(&owned, archive).await },
        )
        .await;
        self.counted(result)
    }

    async fn remove_inner(&self, id: &str, archive: bool) -> Result<Removal, Error> {
        validate_id(id)?;
        self.check_open()?;
        // No provisioning of the same id while it goes.
        let _claim = self.claim_provisioning(id).await?;
        if self.shared.journal.device(id).is_none() {
            return Err(Error::UnknownDevice(id.to_string()));
        }
        let router = &self.shared.router;
        router.stop_for_removal(id).await;
        let result = self.remove_stopped(id, archive).await;
        router.end_removal(id);
        if let Ok(r) = &result {
            let c = r.cancelled;
            if c == Cancelled::default() {
                tracing::info!(device = id, seq = r.seq, archive = ?r.archive, "device removed");
            } else {
                tracing::warn!(
                    device = id,
                    seq = r.seq,
                    archive = ?r.archive,
                    messages = c.messages,
                    commands = c.commands,
                    timers = c.timers,
                    "device removed; what it still owed is cancelled: messages its targets had \
                     not handled, commands not acknowledged, timers pending"
                );
            }
        }
        result
    }

    async fn remove_stopped(&self, id: &str, archive: bool) -> Result<Removal, Error> {
        let journal = &self.shared.journal;
        // The stopped actor's last appends (it takes no passivation snapshot) must be durable
        // before the device's history is archived and closed.
        journal.barrier().await?;
        let head = journal
            .device(id)
            .ok_or_else(|| Error::UnknownDevice(id.to_string()))?;
        let at_ms = clock::now_ms();
        // Commands past their time to live leave the outbox, as a read of it would drop them:
        // they are not owed, so the removal does not count them as cancelled.
        journal.outbox(head.num, at_ms);
        let archive = if archive {
            // File writes and fsyncs: off the async threads.
            let (rt, owned, seq) = (self.clone(), id.to_string(), head.seq);
            let written = tokio::task::spawn_blocking(move || rt.write_archive(&owned, seq, at_ms))
                .await
                .map_err(|e| Error::Internal(format!("archive task: {e}")))??;
            Some(written)
        } else {
            None
        };
        let cancelled = match journal.record_removal(head.num, at_ms).await {
            Ok(cancelled) => cancelled,
            Err(e) => {
                // Not removed: an archive would say it was (see `sweep_unfinished_archives`).
                if let Some(path) = &archive {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e.into());
            }
        };
        self.shared.metrics.messages_cancelled.fetch_add(
            cancelled.messages as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        // Its timers are gone with it: out of the wheel now rather than at their due time.
        self.shared.timers.sync(head.num, &Default::default());
        self.undeliverable_to_removed(id, at_ms).await;
        // Long polls and command streams of the device end now (they wait for this device,
        // not for a new one provisioned under its id).
        self.shared.outbox.notify(id);
        Ok(Removal {
            id: id.to_string(),
            seq: head.seq,
            archive,
            cancelled,
        })
    }

    /// Messages other devices still owe to removed device `id` become undeliverable now,
    /// while the removal still bars the id from provisioning: they were sent to this device,
    /// not to a new one provisioned later under its id, which their next redelivery (a
    /// quarantined target's come after its quarantine) would otherwise reach. The senders'
    /// dead letters say so at once, and their backpressure lifts at once. Best effort: one
    /// that cannot be recorded stays owed and is found undeliverable at its next delivery,
    /// or at the next start.
    async fn undeliverable_to_removed(&self, id: &str, at_ms: u64) {
        let journal = &self.shared.journal;
        let target: std::collections::HashSet<std::sync::Arc<str>> = [id.into()].into();
        for (sender, num, message, _) in journal.owed_to_any(&target) {
            match journal
                .record_undeliverable(num, message, id, "device removed", at_ms)
                .await
            {
                Ok(recorded) => {
                    if recorded {
                        self.shared
                            .metrics
                            .messages_undeliverable
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    tracing::warn!(%sender, to = id, seq = message.seq, index = message.index, error = %e, "recording a message to a removed device as undeliverable failed; it stays owed");
                }
            }
        }
    }

    /// Removes version `version` of plugin `plugin` (see the module docs): 409
    /// [`Error::VersionInUse`] while a device runs it or it is current.
    pub async fn remove_plugin_version(&self, plugin: &str, version: u32) -> Result<(), Error> {
        let (rt, plugin) = (self.clone(), plugin.to_string());
        let result = Runtime::detached("version removal", async move {
            rt.check_open()?;
            let v = rt.shared.registry.find(&plugin, version)?;
            rt.remove_versions(&plugin, &[v.id], false).await
        })
        .await;
        self.counted(result)
    }

    /// Removes plugin `plugin` and all its versions: 409 [`Error::VersionInUse`] while a device
    /// runs any of them. Returns the version numbers removed.
    pub async fn remove_plugin(&self, plugin: &str) -> Result<Vec<u32>, Error> {
        let (rt, plugin) = (self.clone(), plugin.to_string());
        let result = Runtime::detached("plugin removal", async move {
            rt.check_open()?;
            let registry = &rt.shared.registry;
            if registry.current(&plugin).is_none() {
                return Err(Error::UnknownPlugin(plugin));
            }
            let ids = registry.version_ids(&plugin);
            let numbers = ids
                .iter()
                .filter_map(|id| registry.version(*id).map(|v| v.number))
                .collect();
            rt.remove_versions(&plugin, &ids, true).await?;
            Ok(numbers)
        })
        .await;
        self.counted(result)
    }

    /// `whole`: every version of the plugin, removing it (see `Registry::remove_versions`).
    async fn remove_versions(&self, plugin: &str, ids: &[u32], whole: bool) -> Result<(), Error> {
        // No provisioning, deploy or rollback while versions go.
        let _binding = self.shared.binding.write().await;
        let _no_deploy = self.shared.deploying.lock().await;
        let journal = &self.shared.journal;
        let registry = &self.shared.registry;
        let users_of = |id: u32| {
            journal
                .device_ids()
                .iter()
                .filter(|d| journal.device(d).is_some_and(|h| h.version == id))
                .count()
        };
        if whole {
            let users: usize = ids.iter().map(|id| users_of(*id)).sum();
            if users > 0 {
                return Err(Error::PluginInUse {
                    plugin: plugin.to_string(),
                    why: format!("{users} device(s) run it: remove them first"),
                });
            }
        }
        let current = registry.current(plugin);
        for id in ids {
            let users = users_of(*id);
            if users == 0 {
                continue;
            }
            let why = match &current {
                // Devices behind the current version: passivated ones a deploy will move at
                // their next activation, or ones it left behind.
                Some(now) if now.id != *id => format!(
                    "{users} device(s) are still on it: a passivated one moves to the current \
                     version (v{}) at its next activation, which an event or a read of its state \
                     brings about, and one a deploy left behind stays until it can fold a \
                     version deployed to it; move or remove them first",
                    now.number
                ),
                _ => format!("{users} device(s) run it: deploy another version or remove them"),
            };
            return Err(Error::VersionInUse {
                plugin: plugin.to_string(),
                version: registry.version(*id).map_or(0, |v| v.number),
                why,
            });
        }
        let numbers: Vec<u32> = ids
            .iter()
            .filter_map(|id| registry.version(*id).map(|v| v.number))
            .collect();
        registry.remove_versions(plugin, ids, whole).await?;
        tracing::info!(plugin, versions = ?numbers, "plugin versions removed");
        Ok(())
    }

    /// Deletes the archives of devices that were not removed after all: a removal writes its
    /// archive before it records the removal, so a crash (or a failed write) between the two
    /// left an archive, whose header says `removed_at_ms`, of a device that is still served
    /// (a review found one after a SIGKILL among 60 removals). An archive is such a leftover
    /// when the journal has its device, created at the same time, at or past its seq: the
    /// same device, whose history the journal still holds in full. Run at open, before any
    /// removal; best effort (an archive that cannot be read is left alone).
    pub(crate) fn sweep_unfinished_archives(&self) {
        let dir = self.shared.data_dir.join(ARCHIVE_DIR);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) == Some("tmp") {
                // A write that never finished: never renamed into place.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
                continue;
            }
            let Some(header) = archive_header(&path) else {
                continue;
            };
            let field = |k: &str| header.get(k).and_then(serde_json::Value::as_u64);
            let (Some(id), Some(created), Some(seq)) = (
                header.get("device").and_then(serde_json::Value::as_str),
                field("created_at_ms"),
                field("seq"),
            ) else {
                continue;
            };
            let still_there = self
                .shared
                .journal
                .device(id)
                .is_some_and(|h| h.created_at_ms == created && h.seq >= seq);
            if still_there {
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::warn!(device = id, path = %path.display(), "deleted the archive of a removal that did not complete (the device is still served)")
                    }
                    Err(e) => {
                        tracing::warn!(device = id, path = %path.display(), error = %e, "cannot delete the archive of a removal that did not complete")
                    }
                }
            }
        }
    }

    /// Writes device `id`'s journal to `<data>/archive/<id>.<at_ms>.jsonl`.
    fn write_archive(&self, id: &str, seq: u64, at_ms: u64) -> Result<PathBuf, Error> {
        let io = |e: std::io::Error| Error::writing("writing the archive", e);
        let summary = self
            .summary(id)
            .ok_or_else(|| Error::UnknownDevice(id.to_string()))?;
        let dir = self.shared.data_dir.join(ARCHIVE_DIR);
        std::fs::create_dir_all(&dir).map_err(io)?;
        let path = dir.join(format!("{id}.{at_ms}.jsonl"));
        let tmp = path.with_extension("jsonl.tmp");
        // What retention kept: an archive starts at the oldest record still in the journal,
        // and no pass deletes any of it while the archive reads it.
        let _kept = self.shared.journal.pause_retention();
        let first = self
            .shared
            .journal
            .device(id)
            .map_or(1, |h| self.shared.journal.oldest_retained_seq(h.num));
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let written = self.write_archive_records(file, id, &summary, first, seq, at_ms);
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(path)
    }

    /// The archive's lines, from seq `first`, synced.
    fn write_archive_records(
        &self,
        file: std::fs::File,
        id: &str,
        summary: &crate::view::DeviceSummary,
        first: u64,
        seq: u64,
        at_ms: u64,
    ) -> Result<(), Error> {
        let io = |e: std::io::Error| Error::writing("writing the archive", e);
        let mut out = std::io::BufWriter::new(file);
        let header = serde_json::json!({
            "device": id,
            "plugin": summary.plugin,
            "version": summary.version,
            "config": summary.config,
            "created_at_ms": summary.created_at_ms,
            "seq": seq,
            "first_seq": first,
            "removed_at_ms": at_ms,
        });
        writeln!(out, "{header}").map_err(io)?;
        let mut from = first;
        while from <= seq {
            let page = self.journal_page(id, from, 1000)?;
            let next = page.next;
            for r in page.records {
                // As the journal API shows them, texts exactly as recorded (a number past
                // 64 bits, key order): through a `Value` they were re-formatted. A message
                // or timer firing says where it came from, and a record with effects lists
                // them.
                let line = RecordOut::from(r);
                serde_json::to_writer(&mut out, &line).map_err(|e| io(e.into()))?;
                writeln!(out).map_err(io)?;
            }
            match next {
                Some(next) => from = next,
                None => break,
            }
        }
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)
    }
}

/// The first line of the archive at `path`, parsed.
fn archive_header(path: &std::path::Path) -> Option<serde_json::Value> {
    use std::io::BufRead as _;
    let file = std::fs::File::open(path).ok()?;
    let mut line = String::new();
    std::io::BufReader::new(file).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}
