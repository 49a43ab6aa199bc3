//! The runtime's face of effects: a device's outbox (commands, long-polled, acknowledged by
//! id) and its pending timers. What is owed lives in the journal (`journal/effects.rs`);
//! these read it and add the waiting.

use std::time::Duration;

use crate::Runtime;
use crate::clock;
use crate::decide::MAX_EFFECTS;
use crate::error::Error;
use crate::journal::effects::MAX_EFFECT_SEQ;
use crate::journal::{DeviceHead, Effect, EffectId};
use crate::view::{CommandView, TimerView};

/// The longest a long poll of an outbox may wait.
pub const MAX_COMMAND_WAIT: Duration = Duration::from_secs(60);

/// Default number of commands in a page of an outbox ([`Runtime::commands_page`]): the
/// default outbox cap (`--max-outbox`), so a gateway within it gets everything in one read.
pub const DEFAULT_OUTBOX_PAGE: usize = 1_000;

/// Most commands in a page of an outbox: a larger `limit` is taken as this.
pub const MAX_OUTBOX_PAGE: usize = 10_000;

/// A page of an outbox also ends once its commands reach this many bytes (at least one
/// command is always answered), as a journal page does: one command may be up to 1 MiB, and
/// an outbox past its cap (messages and timer firings are never refused) may hold thousands,
/// so without it one read would pull them all into memory at once, and each concurrent read
/// once more.
pub const OUTBOX_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// A page of a device's outbox: what [`Runtime::commands_page`] answers.
#[derive(Debug, Clone)]
pub struct OutboxPage {
    /// Commands in id order (oldest first).
    pub commands: Vec<crate::view::CommandView>,
    /// The last id of this page, to pass as `after` for the next one; `None` on the last.
    pub next: Option<String>,
}

/// Which part of an outbox a read answers.
#[derive(Debug, Clone, Copy)]
struct Window {
    after: Option<EffectId>,
    limit: usize,
    bytes: usize,
}

impl Window {
    const WHOLE: Window = Window {
        after: None,
        limit: usize::MAX,
        bytes: usize::MAX,
    };

    /// A page after `after` of at most `limit` commands (clamped to 1..=[`MAX_OUTBOX_PAGE`])
    /// and [`OUTBOX_PAGE_BYTES`].
    fn page(after: Option<EffectId>, limit: usize) -> Window {
        Window {
            after,
            limit: limit.clamp(1, MAX_OUTBOX_PAGE),
            bytes: OUTBOX_PAGE_BYTES,
        }
    }
}

impl Runtime {
    /// Device `id`'s outbox: the commands its plugin issued that nobody acknowledged yet (and
    /// whose time to live has not ended), oldest first. Reading does not acknowledge: a
    /// command is delivered again at every read until [`Runtime::ack_command`].
    ///
    /// The whole outbox, whatever its size: a server answering clients reads it a page at a
    /// time with [`Runtime::commands_page`].
    pub fn commands(&self, id: &str) -> Result<Vec<CommandView>, Error> {
        let result = self
            .head(id)
            .and_then(|head| self.commands_of(&head, Window::WHOLE));
        self.counted(result).map(|page| page.commands)
    }

    /// One page of device `id`'s outbox: the commands with ids after `after` (a command id,
    /// `"<seq>.<index>"`, as listed; it need not be waiting any more), at most `limit` of
    /// them (clamped to 1..=[`MAX_OUTBOX_PAGE`]), the page ending early once they reach
    /// [`OUTBOX_PAGE_BYTES`]. A gateway that acknowledges what it read and reads again from
    /// the start gets the rest; one that does not pages through with `next`.
    pub fn commands_page(
        &self,
        id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<OutboxPage, Error> {
        let result = window(after, limit)
            .and_then(|w| self.head(id).and_then(|head| self.commands_of(&head, w)));
        self.counted(result)
    }

    /// The outbox of the device `head` names (not of whichever device has its id now), the
    /// part `w` says. Records are read only for the commands answered.
    fn commands_of(&self, head: &DeviceHead, w: Window) -> Result<OutboxPage, Error> {
        let id = &head.id;
        let journal = &self.shared.journal;
        let mut pending = journal.outbox(head.num, clock::now_ms());
        pending.retain(|(cid, _)| w.after.is_none_or(|after| *cid > after));
        pending.sort_unstable_by_key(|(cid, _)| *cid);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        // One read per record, however many commands it issued.
        let mut record: Option<crate::journal::EventRecord> = None;
        for (cid, c) in &pending {
            if out.len() == w.limit || bytes >= w.bytes {
                break;
            }
            if record.as_ref().is_none_or(|r| r.seq != cid.seq) {
                record = journal.read_events(head.num, cid.seq, cid.seq)?.pop();
            }
            let payload = record
                .as_ref()
                .and_then(|r| r.fx.as_ref())
                .and_then(|fx| fx.effects.get(cid.index as usize));
            let Some(Effect::Command { payload, .. }) = payload else {
                // Removed between the index and the read: gone, not broken.
                self.same_device(head)?;
                return Err(Error::Internal(format!(
                    "command {}.{} of `{id}` is not in its record",
                    cid.seq, cid.index
                )));
            };
            bytes = bytes.saturating_add(payload.len());
            out.push(CommandView {
                id: format!("{}.{}", cid.seq, cid.index),
                seq: cid.seq,
                index: cid.index,
                at_ms: c.at_ms,
                expires_ms: c.expires_ms,
                command: payload.clone(),
            });
        }
        let next = (out.len() < pending.len())
            .then(|| out.last().map(|c| c.id.clone()))
            .flatten();
        Ok(OutboxPage {
            commands: out,
            next,
        })
    }

    /// [`Runtime::commands`], waiting up to `wait` (at most [`MAX_COMMAND_WAIT`]) for one to
    /// arrive when there is none: a long poll, so a gateway gets a command as soon as its
    /// record is durable without polling in a loop.
    ///
    /// A wait is for the device the id named when it began: if that device is removed
    /// meanwhile, the wait ends with [`Error::UnknownDevice`], even once the id is provisioned
    /// again (a new device, whose commands are not the waiter's).
    pub async fn wait_commands(&self, id: &str, wait: Duration) -> Result<Vec<CommandView>, Error> {
        let page = self.wait_outbox(id, Ok(Window::WHOLE), wait).await?;
        Ok(page.commands)
    }

    /// [`Runtime::commands_page`], waiting up to `wait` (at most [`MAX_COMMAND_WAIT`]) for a
    /// command after `after` when there is none: a gateway that keeps the last id it read
    /// waits for new commands without acknowledging the old ones first. Removal ends the
    /// wait as in [`Runtime::wait_commands`].
    pub async fn wait_commands_page(
        &self,
        id: &str,
        after: Option<&str>,
        limit: usize,
        wait: Duration,
    ) -> Result<OutboxPage, Error> {
        self.wait_outbox(id, window(after, limit), wait).await
    }

    async fn wait_outbox(
        &self,
        id: &str,
        w: Result<Window, Error>,
        wait: Duration,
    ) -> Result<OutboxPage, Error> {
        let (head, w) = match self.head(id).and_then(|head| Ok((head, w?))) {
            Ok(hw) => hw,
            Err(e) => return self.counted(Err(e)),
        };
        let notify = self.shared.outbox.waiter(&head.id);
        let deadline = tokio::time::Instant::now() + wait.min(MAX_COMMAND_WAIT);
        loop {
            // Registered before the read, so a command that lands in between still wakes it.
            let arrived = notify.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let page = self.counted(
                self.same_device(&head)
                    .and_then(|h| self.commands_of(&h, w)),
            )?;
            if !page.commands.is_empty() || self.shared.outbox.is_closed() {
                return Ok(page);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return Ok(page);
            }
        }
    }

    /// A watch of device `id`'s outbox: each [`CommandWatch::next`] answers the commands not
    /// answered before by this watch (for a stream: each command once per connection until
    /// it is acknowledged; a new connection gets every waiting command again).
    ///
    /// Like a long poll, a watch is for the device the id named when it began: it ends
    /// (`None`) when that device is removed.
    pub fn watch_commands(&self, id: &str) -> Result<CommandWatch, Error> {
        let head = self.counted(self.head(id))?;
        Ok(CommandWatch {
            notify: self.shared.outbox.waiter(&head.id),
            rt: self.clone(),
            head,
            last: None,
        })
    }

    /// The device `head` names, as it is now; [`Error::UnknownDevice`] once it was removed,
    /// even if its id was provisioned again since (device numbers are never reused).
    fn same_device(&self, head: &DeviceHead) -> Result<DeviceHead, Error> {
        match self.head(&head.id) {
            Ok(now) if now.num == head.num => Ok(now),
            Ok(_) | Err(Error::UnknownDevice(_)) => Err(Error::UnknownDevice(head.id.to_string())),
            Err(e) => Err(e),
        }
    }

    /// Acknowledges command `command` (`"<seq>.<index>"`, as [`CommandView::id`]) of device
    /// `id`, once durable: it leaves the outbox for good. Returns whether it was still
    /// pending; acknowledging twice (a gateway retrying) is not an error, nor is one that
    /// expired. An id the device never issued is [`Error::UnknownCommand`] (where retention
    /// deleted its record, that cannot be told, and it answers `false`).
    pub async fn ack_command(&self, id: &str, command: &str) -> Result<bool, Error> {
        // In a task of its own (see `Runtime::detached`): an acknowledgement dropped while its
        // record was on its way left its command marked as being acknowledged for good.
        let (rt, id, command) = (self.clone(), id.to_string(), command.to_string());
        let result = Runtime::detached("acknowledgement", async move {
            rt.ack_inner(&id, &command).await
        })
        .await;
        self.counted(result)
    }

    async fn ack_inner(&self, id: &str, command: &str) -> Result<bool, Error> {
        self.check_open()?;
        let head = self.head(id)?;
        let cid = parse_command_id(command)?;
        // Of concurrent acknowledgements of one command, one writes and answers `true`; the
        // others find it taken (here, or gone from the outbox once it is durable).
        if !self.shared.acking.lock().insert((head.num, cid)) {
            return Ok(false);
        }
        let result = self.ack_pending(head.num, cid).await;
        self.shared.acking.lock().remove(&(head.num, cid));
        match result {
            Ok(false) if !self.issued(&head, cid).await => Err(Error::UnknownCommand {
                device: id.to_string(),
                command: command.to_string(),
            }),
            other => other,
        }
    }

    /// Whether device `head` ever issued command `cid`, as far as its journal tells: `true`
    /// when its record cannot be read (retention deleted it), since only a record says no.
    async fn issued(&self, head: &DeviceHead, cid: EffectId) -> bool {
        if cid.seq > head.seq {
            return false;
        }
        let (rt, num) = (self.clone(), head.num);
        // A read of the journal file: off the async workers.
        let read =
            tokio::task::spawn_blocking(move || rt.shared.journal.record_fx(num, cid.seq)).await;
        match read {
            Ok(Ok(fx)) => fx.is_some_and(|fx| {
                matches!(
                    fx.effects.get(cid.index as usize),
                    Some(Effect::Command { .. })
                )
            }),
            _ => true,
        }
    }

    async fn ack_pending(&self, num: u32, cid: EffectId) -> Result<bool, Error> {
        let journal = &self.shared.journal;
        if !journal
            .outbox(num, clock::now_ms())
            .iter()
            .any(|(c, _)| *c == cid)
        {
            return Ok(false);
        }
        journal
            .record_command_ack(num, cid, clock::now_ms())
            .await?;
        self.shared
            .metrics
            .commands_acked
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(true)
    }

    /// Device `id`'s pending timers, by key, with their events (read from the records that
    /// set them, each record once; a record that cannot be read gives its timers the event
    /// `null`, and is logged). Reads the journal file: call it off the async workers.
    pub fn timers(&self, id: &str) -> Result<Vec<TimerView>, Error> {
        let result = self.timers_inner(id);
        self.counted(result)
    }

    fn timers_inner(&self, id: &str) -> Result<Vec<TimerView>, Error> {
        let head = self.head(id)?;
        let journal = &self.shared.journal;
        let Some(fx) = journal.device_fx(head.num) else {
            return Ok(Vec::new());
        };
        let mut records: std::collections::HashMap<u64, Option<crate::journal::Fx>> =
            Default::default();
        Ok(fx
            .timers
            .into_iter()
            .map(|(key, t)| {
                let fx = records.entry(t.set().seq).or_insert_with(|| {
                    match journal.record_fx(head.num, t.set().seq) {
                        Ok(fx) => fx,
                        Err(e) => {
                            tracing::warn!(device = id, seq = t.set().seq, error = %e, "cannot read the record that set a timer");
                            None
                        }
                    }
                });
                TimerView {
                    key: key.into(),
                    due_ms: t.due_ms,
                    every_ms: t.every_ms.map(std::num::NonZeroU64::get),
                    event: fx
                        .as_ref()
                        .and_then(|fx| fx.timer_event(t.set().index))
                        .unwrap_or("null")
                        .to_string(),
                }
            })
            .collect())
    }

    /// Ends every long poll and command stream now, and lets none wait any more: what a
    /// server does before it drains its connections, so they do not hold the drain. Called by
    /// [`crate::http::Server::shutdown`] and [`Runtime::shutdown`].
    pub fn stop_waiting(&self) {
        self.shared.outbox.close();
    }

    /// Devices with a pending timer: the timer wheel's entries, one per device at its earliest
    /// timer (a gauge for `/metrics`).
    pub fn timer_wheel_devices(&self) -> usize {
        self.shared.timers.scheduled()
    }
}

/// See [`Runtime::watch_commands`].
pub struct CommandWatch {
    rt: Runtime,
    /// The device watched, as it was when the watch began.
    head: DeviceHead,
    notify: std::sync::Arc<tokio::sync::Notify>,
    /// The last command answered.
    last: Option<EffectId>,
}

impl CommandWatch {
    /// The commands that arrived since the last call (every waiting one the first time),
    /// waiting for one if there are none; `None` once the runtime is stopping or the device
    /// was removed.
    pub async fn next(&mut self) -> Result<Option<Vec<CommandView>>, Error> {
        loop {
            // Registered before the read, so a command that lands in between still wakes it.
            let arrived = self.notify.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if self.rt.shared.outbox.is_closed() {
                return Ok(None);
            }
            let head = match self.rt.same_device(&self.head) {
                Ok(head) => head,
                Err(Error::UnknownDevice(_)) => return Ok(None),
                Err(e) => return Err(e),
            };
            // A page at a time after the last one answered: a command issued later has a
            // later record, so a larger id, and the outbox is never read whole.
            let page = self
                .rt
                .commands_of(&head, Window::page(self.last, DEFAULT_OUTBOX_PAGE))?;
            if let Some(last) = page.commands.last() {
                self.last = Some(EffectId {
                    seq: last.seq,
                    index: last.index,
                });
                return Ok(Some(page.commands));
            }
            // Woken by a new command or a stop; looked at again now and then for expiries.
            let _ = tokio::time::timeout(MAX_COMMAND_WAIT, arrived).await;
        }
    }
}

/// The part of an outbox a page after `after` (a command id) of `limit` commands reads.
fn window(after: Option<&str>, limit: usize) -> Result<Window, Error> {
    Ok(Window::page(
        after.map(parse_command_id).transpose()?,
        limit,
    ))
}

/// `"<seq>.<index>"` → the effect id: exactly as the outbox lists ids (decimal digits, no
/// sign, no leading zero), and within what a record can hold (seq 1 to
/// [`MAX_EFFECT_SEQ`], index below [`MAX_EFFECTS`]), so an id echoed back is the id listed.
pub(crate) fn parse_command_id(text: &str) -> Result<EffectId, Error> {
    let bad = |why: &str| {
        Error::MalformedEvent(format!(
            "`{text}` is not a command id (`<seq>.<index>`, as listed by the outbox){why}"
        ))
    };
    let number = |part: &str| -> Option<u64> {
        let canonical = !part.is_empty()
            && part.bytes().all(|b| b.is_ascii_digit())
            && (part == "0" || !part.starts_with('0'));
        canonical.then(|| part.parse().ok()).flatten()
    };
    let (seq, index) = text.split_once('.').ok_or_else(|| bad(""))?;
    let (Some(seq), Some(index)) = (number(seq), number(index)) else {
        return Err(bad(""));
    };
    if seq == 0 || seq > MAX_EFFECT_SEQ || index >= MAX_EFFECTS as u64 {
        return Err(bad(&format!(
            ": no command has it (seq 1 to {MAX_EFFECT_SEQ}, index 0 to {})",
            MAX_EFFECTS - 1
        )));
    }
    Ok(EffectId {
        seq,
        index: index as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_id_is_read_only_in_the_form_the_outbox_lists() {
        let id = |seq, index| EffectId { seq, index };
        assert_eq!(parse_command_id("1.0").ok(), Some(id(1, 0)));
        assert_eq!(parse_command_id("250.17").ok(), Some(id(250, 17)));
        let top = format!("{MAX_EFFECT_SEQ}.{}", MAX_EFFECTS - 1);
        assert_eq!(
            parse_command_id(&top).ok(),
            Some(id(MAX_EFFECT_SEQ, MAX_EFFECTS as u32 - 1))
        );
        for bad in [
            "",
            ".",
            "1",
            "1.",
            ".0",
            "x.y",
            "+1.0",
            "1.+0",
            "-1.0",
            "002.000",
            "01.0",
            "1.00",
            " 1.0",
            "1.0 ",
            "1.2.3",
            "0x2.0",
            "1e3.0",
            "0.0",
            // Beyond what a record can hold.
            "4503599627370496.0",
            "18446744073709551615.0",
            "18446744073709551616.0",
            "1.1024",
            "1.65536",
            "1.4294967296",
        ] {
            let err = parse_command_id(bad).expect_err(bad);
            assert_eq!(err.code(), "malformed-event", "{bad}");
        }
    }
}
