//! What callers see of devices: the answers of [`crate::Runtime`]'s methods.
//!
//! Plain data, shared by the runtime, the HTTP API and embedders. JSON produced by guests is
//! kept as text (`String`) so it travels to the client without a parse/reserialize round
//! trip.

use serde::Serialize;

/// An event that is durable: what the sender gets back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub seq: u64,
    /// When the event was handled: host time in ms since the Unix epoch, as journaled.
    pub at_ms: u64,
    /// The transitions, each one JSON document.
    pub transitions: Vec<String>,
}

/// A device's state as of a durable seq (the guest's `query` answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    pub seq: u64,
    /// JSON text.
    pub state: String,
}

/// Where a device is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    /// A guest instance is live and takes events without an activation.
    Active,
    /// No instance: the next event activates the device from snapshot + journal tail.
    Passivated,
    /// The plugin failed on this device repeatedly; events are refused until the quarantine
    /// ends. Reads still answer the last durable state.
    Quarantined,
}

impl DeviceStatus {
    /// The lowercase word used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Active => "active",
            DeviceStatus::Passivated => "passivated",
            DeviceStatus::Quarantined => "quarantined",
        }
    }
}

/// A provisioned device as stored (no state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceSummary {
    pub id: String,
    pub plugin: String,
    pub version: u32,
    pub seq: u64,
    pub config: serde_json::Value,
    pub created_at_ms: u64,
    /// Set when the device does not run its plugin's current version: where it is headed.
    pub upgrade: Option<PendingUpgrade>,
}

/// A device behind its plugin's current version (after a deploy or a rollback), and why.
///
/// A deploy moves the live devices it can and leaves the rest to their next activation; one
/// that version could not fold (a forced deploy) stays on its own. Without this, such a
/// device showed only an older `version`, and which of them would never move was in a log
/// line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PendingUpgrade {
    /// The plugin's current version (number): where the device is headed.
    pub to: u32,
    /// `true`: bringing the device up on `to` failed (its history does not fold, or `init`
    /// or `restore` failed), so it stays on its own version and is not tried again, restarts
    /// included, until a deploy of that version or another. `false`: it moves at its next activation (or, live,
    /// shortly: a live upgrade put off for overload tries again).
    pub failed: bool,
}

/// Why a device is quarantined and until when: what an operator needs to decide whether to
/// fix the plugin, wait, or resume the device. (Before, only the events refused during the
/// quarantine carried the reason; a read said `quarantined` and nothing more.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuarantineView {
    /// Guest failures in a row that led to it (three start a quarantine; each failure after
    /// it ends doubles the next one).
    pub failures: u32,
    /// The last of them, as the event that met it was answered (e.g. `the device's plugin
    /// trapped: ...`).
    pub last_error: String,
    /// Milliseconds until the device takes events again by itself (a resume ends it now).
    pub ends_in_ms: u64,
}

/// A device with its current durable state. (Non-exhaustive: reads gain fields, as
/// `quarantine` came.)
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeviceView {
    pub summary: DeviceSummary,
    /// The lifecycle status when the read arrived. A read does not change it: reading a
    /// passivated device answers from a temporary instance and leaves it passivated.
    pub status: DeviceStatus,
    /// Set when `status` is [`DeviceStatus::Quarantined`]: why, and for how long.
    pub quarantine: Option<QuarantineView>,
    /// The guest's `query` answer, JSON text.
    pub state: String,
}

/// One journal record as shown to users.
#[derive(Debug, Clone)]
pub struct JournalEntry {
    pub seq: u64,
    pub at_ms: u64,
    pub plugin: String,
    pub version: u32,
    /// JSON text.
    pub event: String,
    /// JSON texts.
    pub transitions: Vec<String>,
    /// The record of this seq was destroyed by media damage and salvaged away: `event` is
    /// `null`, there are no transitions, and `at_ms` is when the salvage ran.
    pub lost: bool,
    /// Where the event came from, JSON text (`{"type":"message","sender",...}` or
    /// `{"type":"timer","key",...}`); `None` for an event from outside.
    pub origin: Option<String>,
    /// The effects the event produced, JSON texts (`{"type":"send","to","event"}`, ...).
    pub effects: Vec<String>,
}

/// The journal as `GET /v1/journal` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JournalStatus {
    /// Bytes of journal written and durable (positions, including any deleted by retention).
    pub durable_bytes: u64,
    /// Segments, the retention policy, what it deleted since start and what holds it back.
    pub retention: crate::journal::RetentionStatus,
}

/// One page of a device's journal.
#[derive(Debug, Clone)]
pub struct JournalPage {
    pub records: Vec<JournalEntry>,
    /// The seq to ask for next, if there are more records.
    pub next: Option<u64>,
}

/// An event a device's plugin failed on (trapped, ran out of time, produced too much): not
/// applied, no seq used. Kept in the journal so the failure stays visible and the event can
/// be re-sent once the plugin is fixed.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterView {
    /// The device's last durable seq when the event failed.
    pub after_seq: u64,
    /// When it failed, ms since the Unix epoch.
    pub at_ms: u64,
    pub plugin: String,
    pub version: u32,
    /// The event, JSON text as received.
    #[serde(skip)]
    pub event: String,
    /// The error's code and message, as the sender got them.
    pub code: String,
    pub message: String,
}

/// What [`crate::Runtime::resume`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Resumed {
    /// The device's status after.
    pub status: DeviceStatus,
    /// Whether it was quarantined (and its quarantine was lifted).
    pub was_quarantined: bool,
    /// Its failures in a row that were forgotten: a device not quarantined may have some (the
    /// next one would have quarantined it), and one whose quarantine ran out keeps its count
    /// until an event succeeds.
    pub failures_forgotten: u32,
}

/// A command waiting in a device's outbox (see `GET /v1/devices/{id}/commands`).
#[derive(Debug, Clone, Serialize)]
pub struct CommandView {
    /// Its stable id, `"<seq>.<index>"`: the seq of the record that issued it and its place
    /// among that record's effects. Acknowledge it by this id; a command delivered twice
    /// (redelivery until acknowledged) has the same id both times.
    pub id: String,
    pub seq: u64,
    pub index: u32,
    /// When it was issued (its event's time), ms since the Unix epoch.
    pub at_ms: u64,
    /// When it is dropped unacknowledged, if ever.
    pub expires_ms: Option<u64>,
    /// The command, JSON text as the plugin wrote it.
    #[serde(skip)]
    pub command: String,
}

/// A pending durable timer of a device (see `GET /v1/devices/{id}/timers`).
#[derive(Debug, Clone, Serialize)]
pub struct TimerView {
    pub key: String,
    /// When it fires next, ms since the Unix epoch.
    pub due_ms: u64,
    /// Its period, for a periodic timer.
    pub every_ms: Option<u64>,
    /// The event it hands the device, JSON text.
    #[serde(skip)]
    pub event: String,
}
