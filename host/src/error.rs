//! The runtime's typed errors.
//!
//! Every way a request can fail has its own variant with a stable machine-readable
//! [`Error::code`], so the HTTP layer, the CLI and embedders can react without parsing text.

use crate::engine::{CallError, PluginError};
use crate::journal::JournalError;

/// Why a runtime operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("unknown device `{0}`")]
    UnknownDevice(String),
    #[error("unknown plugin `{0}`")]
    UnknownPlugin(String),
    /// A command id no event of the device ever issued (its seq is past the device's, or
    /// its record holds no command at that index): a gateway acknowledging the wrong ids.
    #[error("device `{device}` never issued command `{command}`")]
    UnknownCommand { device: String, command: String },
    #[error("plugin `{plugin}` has no version {version}")]
    UnknownVersion { plugin: String, version: u32 },
    #[error("invalid id: {0}")]
    InvalidId(String),
    /// The id is taken by a device of plugin `plugin`; `asked` is the plugin the request
    /// named when it is another, and `other_config` whether the configuration differs.
    #[error("{}", conflict_message(id, plugin, asked.as_deref(), *other_config))]
    DeviceConflict {
        id: String,
        plugin: String,
        asked: Option<String>,
        other_config: bool,
    },
    #[error("malformed event: {0}")]
    MalformedEvent(String),
    #[error("malformed configuration: {0}")]
    MalformedConfig(String),
    /// The plugin's `init` refused the configuration (kind [`ErrorKind::MalformedConfig`]),
    /// with its own code and message.
    #[error("malformed configuration: the plugin refused it: {code}: {message}")]
    ConfigRefused { code: String, message: String },
    #[error("payload of {size} bytes exceeds the limit of {limit}")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("the device's plugin refused the event: {code}: {message}")]
    Rejected { code: String, message: String },
    #[error("the device's plugin trapped: {0}")]
    Trap(String),
    /// `export`: the plugin's function it was stopped in (see `CallError::Timeout`).
    #[error("the device's plugin exceeded its time budget of {budget:?} (stopped in `{export}`)")]
    Timeout {
        budget: std::time::Duration,
        export: &'static str,
    },
    /// The server lacked a resource the guest needed, not through the plugin's fault nor the
    /// request's: a guest interrupted within its CPU budget because it waited for a core too
    /// long (see `engine/cpu_clock.rs`), or a memory growth the fleet's guest memory budget
    /// refused (see `engine/limits.rs`). Code `overloaded` (503, retry later); supervision
    /// does not count it (no dead letter, no step toward a quarantine, an internal event
    /// comes again).
    #[error("{0}")]
    Overloaded(String),
    #[error(
        "the device's plugin produced {size} bytes of output (transitions and effects), over the \
         limit of {limit}"
    )]
    OutputTooLarge { size: usize, limit: usize },
    /// The plugin asked for an effect the host cannot carry out (a message to an id that
    /// cannot exist, an empty timer key, too many effects): a plugin bug, kept as a dead
    /// letter like a trap, but the instance stays good.
    #[error("the device's plugin asked for an invalid effect: {0}")]
    InvalidEffect(String),
    #[error("the device's mailbox is full; retry later")]
    MailboxFull,
    /// The device's outbox holds `pending` unacknowledged commands, at or over `limit`:
    /// its gateway is not acknowledging, so its events wait until it does.
    #[error(
        "the device's outbox holds {pending} unacknowledged commands (limit {limit}); \
         acknowledge them (POST /v1/devices/ID/commands/CMD/ack), then retry"
    )]
    OutboxFull { pending: usize, limit: usize },
    /// The device sent `pending` messages that their targets have not handled yet, at or
    /// over `limit`: a target is behind (or quarantined), so this device's events wait.
    /// `behind`: the target owed the most of them, if one is known.
    #[error(
        "the device has {pending} messages its targets have not handled yet (limit {limit}){}; \
         retry once they catch up",
        behind.as_ref().map_or(String::new(), |b| b.to_string())
    )]
    MessagesPending {
        pending: usize,
        limit: usize,
        behind: Option<Box<Behind>>,
    },
    #[error(
        "the device is quarantined after {failures} consecutive plugin failures (last: {last}); \
         it accepts events again in {retry_in_ms} ms"
    )]
    Quarantined {
        failures: u32,
        last: String,
        retry_in_ms: u64,
    },
    #[error("invalid plugin: {0}")]
    InvalidPlugin(String),
    /// A deploy or rollback that would leave devices unable to run: the dry-run sample
    /// found recorded transitions the new version cannot fold, or there is nothing to roll
    /// back to. `force` overrides the first.
    #[error("deploy refused: {0}")]
    DeployRefused(String),
    /// A plugin version cannot be removed while devices run it (or while it is current).
    #[error("version {version} of plugin `{plugin}` cannot be removed: {why}")]
    VersionInUse {
        plugin: String,
        version: u32,
        why: String,
    },
    /// A plugin cannot be removed while devices run any of its versions.
    #[error("plugin `{plugin}` cannot be removed: {why}")]
    PluginInUse { plugin: String, why: String },
    /// A plugin operation named a device that runs another plugin.
    #[error("device `{device}` runs plugin `{runs}`, not `{plugin}`")]
    WrongPlugin {
        device: String,
        runs: String,
        plugin: String,
    },
    #[error("seq {requested} is past the device's latest seq {latest}")]
    SeqOutOfRange { requested: u64, latest: u64 },
    /// The state at `requested` cannot be rebuilt: journal retention deleted the start of the
    /// device's history (its events from `events_from` on are kept), and a rebuild starts
    /// from a snapshot, the oldest the index keeps (its last 8) being at `oldest`. Code
    /// `retained-away`, like the journal's own.
    #[error("{}", state_retained_away(*requested, *oldest, *events_from))]
    StateRetainedAway {
        requested: u64,
        oldest: u64,
        events_from: u64,
    },
    // Not `#[from]`: that would also make it the `source`, and error chains (`{:#}` in the
    // CLI) would print its sentence twice.
    #[error("{}", journal_message(.0))]
    Journal(JournalError),
    #[error("the device failed to activate: {0}")]
    Activation(String),
    /// The component of the plugin version a device runs is not in the data directory (a
    /// version record rebuilt by salvage as a placeholder, or a file removed by hand) or is
    /// damaged: nothing can run the device until that version's file is uploaded again
    /// (which writes it afresh), or another version is uploaded and deployed.
    #[error(
        "version {version} of plugin `{plugin}` cannot run: {why}; upload that version's \
         plugin file again (it is written afresh), or upload a version of the plugin and \
         deploy it, to run this device"
    )]
    PluginUnavailable {
        plugin: String,
        version: u32,
        why: String,
    },
    /// A write to the data directory outside the journal (a plugin's component, the record
    /// of current plugin versions, a removed device's archive) found the disk full: code
    /// `journal` and 503 like a commit on a full disk, since it is the same condition and
    /// clears the same way.
    #[error("{what}: the disk is full ({message}); retry once space is freed")]
    StorageFull { what: String, message: String },
    #[error("the runtime is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

/// The target a sender held back by [`Error::MessagesPending`] owes the most messages to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behind {
    pub target: String,
    /// Of the sender's messages not handled yet, those owed to it.
    pub owed: usize,
    /// What is left of its quarantine, if that is what holds the messages (they arrive as it
    /// ends): the refusal's `Retry-After`.
    pub quarantined_for: Option<std::time::Duration>,
}

impl std::fmt::Display for Behind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, ", {} of them to `{}`", self.owed, self.target)?;
        if let Some(left) = self.quarantined_for {
            write!(
                f,
                ", which is quarantined for another {} s",
                left.as_millis().div_ceil(1000)
            )?;
        }
        Ok(())
    }
}

/// Declares [`ErrorKind`] from one list, so [`ErrorKind::ALL`] holds every variant by
/// construction: the metrics count each kind and the HTTP layer maps each to a status, and a
/// new kind cannot be forgotten by either.
macro_rules! error_kinds {
    ($($(#[$doc:meta])* $variant:ident => $code:literal,)*) => {
        /// The kind of an [`Error`], without its details: what metrics count and clients
        /// branch on.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorKind {
            $($(#[$doc])* $variant,)*
        }

        impl ErrorKind {
            /// Every kind, in declaration order (`ALL[k as usize] == k`).
            pub const ALL: &'static [ErrorKind] = &[$(ErrorKind::$variant,)*];

            /// The short stable word used in the HTTP error shape and the metrics labels.
            pub fn code(self) -> &'static str {
                match self {
                    $(ErrorKind::$variant => $code,)*
                }
            }
        }
    };
}

error_kinds! {
    UnknownDevice => "unknown-device",
    UnknownPlugin => "unknown-plugin",
    /// A command id the device never issued.
    UnknownCommand => "unknown-command",
    UnknownVersion => "unknown-version",
    InvalidId => "invalid-id",
    DeviceConflict => "device-conflict",
    MalformedEvent => "malformed-event",
    MalformedConfig => "malformed-config",
    PayloadTooLarge => "payload-too-large",
    Rejected => "rejected",
    Trap => "trap",
    Timeout => "timeout",
    OutputTooLarge => "output-too-large",
    InvalidEffect => "invalid-effect",
    MailboxFull => "mailbox-full",
    OutboxFull => "outbox-full",
    MessagesPending => "messages-pending",
    Quarantined => "quarantined",
    InvalidPlugin => "invalid-plugin",
    DeployRefused => "deploy-refused",
    WrongPlugin => "wrong-plugin",
    VersionInUse => "version-in-use",
    SeqOutOfRange => "seq-out-of-range",
    /// The history asked for was deleted by the journal's retention policy.
    RetainedAway => "retained-away",
    Journal => "journal",
    ActivationFailed => "activation-failed",
    PluginUnavailable => "plugin-unavailable",
    /// The server lacked a core (a guest call waited too long for one) or memory (the fleet's
    /// guest memory budget refused a growth) for a guest call.
    Overloaded => "overloaded",
    ShuttingDown => "shutting-down",
    Internal => "internal",
}

/// What [`Error::Journal`] says: the journal's error, named as the journal's once ("journal:
/// journal commit failed" said it twice).
fn journal_message(e: &JournalError) -> String {
    let said = e.to_string();
    if said.starts_with("journal") {
        said
    } else {
        format!("journal: {said}")
    }
}

/// What [`Error::DeviceConflict`] says: what differs, the plugin, the configuration or both.
fn conflict_message(id: &str, plugin: &str, asked: Option<&str>, other_config: bool) -> String {
    match (asked, other_config) {
        (Some(asked), true) => format!(
            "device `{id}` already exists with plugin `{plugin}` (not `{asked}`) and another \
             configuration"
        ),
        (Some(asked), false) => {
            format!("device `{id}` already exists with plugin `{plugin}`, not `{asked}`")
        }
        (None, _) => {
            format!("device `{id}` already exists with plugin `{plugin}` and another configuration")
        }
    }
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::UnknownDevice(_) => ErrorKind::UnknownDevice,
            Error::UnknownPlugin(_) => ErrorKind::UnknownPlugin,
            Error::UnknownCommand { .. } => ErrorKind::UnknownCommand,
            Error::UnknownVersion { .. } => ErrorKind::UnknownVersion,
            Error::InvalidId(_) => ErrorKind::InvalidId,
            Error::DeviceConflict { .. } => ErrorKind::DeviceConflict,
            Error::MalformedEvent(_) => ErrorKind::MalformedEvent,
            Error::MalformedConfig(_) | Error::ConfigRefused { .. } => ErrorKind::MalformedConfig,
            Error::PayloadTooLarge { .. } => ErrorKind::PayloadTooLarge,
            Error::Rejected { .. } => ErrorKind::Rejected,
            Error::Trap(_) => ErrorKind::Trap,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Overloaded(_) => ErrorKind::Overloaded,
            Error::OutputTooLarge { .. } => ErrorKind::OutputTooLarge,
            Error::InvalidEffect(_) => ErrorKind::InvalidEffect,
            Error::MailboxFull => ErrorKind::MailboxFull,
            Error::OutboxFull { .. } => ErrorKind::OutboxFull,
            Error::MessagesPending { .. } => ErrorKind::MessagesPending,
            Error::Quarantined { .. } => ErrorKind::Quarantined,
            Error::InvalidPlugin(_) => ErrorKind::InvalidPlugin,
            Error::DeployRefused(_) => ErrorKind::DeployRefused,
            Error::WrongPlugin { .. } => ErrorKind::WrongPlugin,
            Error::VersionInUse { .. } | Error::PluginInUse { .. } => ErrorKind::VersionInUse,
            Error::SeqOutOfRange { .. } => ErrorKind::SeqOutOfRange,
            Error::Journal(JournalError::RetainedAway { .. }) | Error::StateRetainedAway { .. } => {
                ErrorKind::RetainedAway
            }
            Error::Journal(_) | Error::StorageFull { .. } => ErrorKind::Journal,
            Error::Activation(_) => ErrorKind::ActivationFailed,
            Error::PluginUnavailable { .. } => ErrorKind::PluginUnavailable,
            Error::ShuttingDown => ErrorKind::ShuttingDown,
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

    /// A short stable word naming the kind of error, as used in the HTTP error shape.
    pub fn code(&self) -> &'static str {
        self.kind().code()
    }
}

impl Error {
    /// A failed write of `what` to the data directory: [`Error::StorageFull`] when the disk
    /// (or the user's quota) is full, which clears once space is freed; internal otherwise.
    pub(crate) fn writing(what: &str, e: std::io::Error) -> Error {
        use std::io::ErrorKind::{QuotaExceeded, StorageFull};
        match e.kind() {
            StorageFull | QuotaExceeded => Error::StorageFull {
                what: what.to_string(),
                message: e.to_string(),
            },
            // The process or the machine ran short of descriptors or memory for a moment (a
            // flood of connections, a burst of activations): nothing was written, and a retry
            // soon may well succeed, as with any overload. (A review saw a removal's archive
            // answer `500 internal` at `--max-connections`' descriptor reserve.)
            _ if matches!(
                e.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
            ) =>
            {
                Error::Overloaded(format!("{what}: {e}; try again shortly"))
            }
            _ => Error::Internal(format!("{what}: {e}")),
        }
    }
}

impl From<CallError> for Error {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Rejected { code, message } => Error::Rejected { code, message },
            CallError::Trap(m) => Error::Trap(m),
            CallError::Timeout { budget, export } => Error::Timeout { budget, export },
            e @ (CallError::Starved { .. } | CallError::GuestMemory(_)) => {
                Error::Overloaded(e.to_string())
            }
            // Only past `actor::MAX_MOVES`: not the plugin's fault, and it comes again.
            e @ CallError::Moved => Error::Overloaded(e.to_string()),
            // Overload's handling fits (nothing written, not the guest's fault, comes again),
            // and a stopping server is short of what the call needs: its time.
            e @ CallError::Stopped => Error::Overloaded(e.to_string()),
            e @ CallError::HostMemory(_) => Error::Overloaded(e.to_string()),
        }
    }
}

/// The message of [`Error::StateRetainedAway`].
fn state_retained_away(requested: u64, oldest: u64, events_from: u64) -> String {
    let gone = format!(
        "the state at seq {requested} cannot be rebuilt: journal retention deleted the \
         device's history before seq {events_from}, and a rebuild starts from a snapshot"
    );
    if requested < oldest {
        format!(
            "{gone}, the oldest the index keeps (its last 8) being at seq {oldest}; states from \
             seq {oldest} on can be rebuilt"
        )
    } else {
        // The snapshots before it are there but did not restore (damaged, or of a version
        // the device's own cannot read).
        format!("{gone}, and none kept before it restores")
    }
}

impl From<JournalError> for Error {
    fn from(e: JournalError) -> Self {
        Error::Journal(e)
    }
}

impl From<PluginError> for Error {
    fn from(e: PluginError) -> Self {
        Error::InvalidPlugin(e.to_string())
    }
}

/// Checks a device or plugin id: it becomes a URL path segment and a log field, so it must be
/// short, printable and unambiguous.
pub fn validate_id(id: &str) -> Result<(), Error> {
    const MAX: usize = 128;
    if id.is_empty() {
        return Err(Error::InvalidId("empty".into()));
    }
    if id.len() > MAX {
        return Err(Error::InvalidId(format!(
            "{} bytes long, the limit is {MAX}",
            id.len()
        )));
    }
    if id == "." || id == ".." {
        return Err(Error::InvalidId(format!("`{id}` is reserved")));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@')))
    {
        return Err(Error::InvalidId(format!(
            "character {c:?} is not allowed (use letters, digits, `-`, `_`, `.`, `:`, `@`)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Out of descriptors or memory for a moment is an overload (503 with `Retry-After`),
    /// not an internal error; a full disk keeps its own code; anything else is internal.
    #[test]
    fn a_write_short_of_descriptors_or_memory_is_an_overload() {
        let writing = |errno| Error::writing("writing x", std::io::Error::from_raw_os_error(errno));
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOMEM] {
            assert_eq!(writing(errno).kind(), ErrorKind::Overloaded, "{errno}");
        }
        assert!(matches!(writing(libc::ENOSPC), Error::StorageFull { .. }));
        assert_eq!(writing(libc::EIO).kind(), ErrorKind::Internal);
    }

    #[test]
    fn kinds_are_listed_in_order_with_distinct_codes() {
        for (i, kind) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, i);
        }
        let codes: std::collections::HashSet<_> = ErrorKind::ALL.iter().map(|k| k.code()).collect();
        assert_eq!(codes.len(), ErrorKind::ALL.len());
    }

    #[test]
    fn a_journal_error_names_the_journal_once() {
        let commit = Error::Journal(JournalError::Commit {
            kind: std::io::ErrorKind::Other,
            message: "write: Too many open files (os error 24)".into(),
        });
        assert_eq!(
            commit.to_string(),
            "journal commit failed: write: Too many open files (os error 24)"
        );
        let too_large = Error::Journal(JournalError::TooLarge(9));
        assert_eq!(
            too_large.to_string(),
            "journal: record of 9 bytes exceeds the journal's limit"
        );
    }

    #[test]
    fn ids_refuse_path_tricks_and_control_characters() {
        for good in ["dev-1", "thermo_7", "site:a.b@3", "x"] {
            assert!(validate_id(good).is_ok(), "{good}");
        }
        let long = "a".repeat(129);
        for bad in [
            "",
            "a/b",
            "..",
            ".",
            "a\0b",
            "a\nb",
            "a b",
            "é",
            long.as_str(),
            "a%2Fb",
        ] {
            let err = validate_id(bad).expect_err(bad);
            assert_eq!(err.code(), "invalid-id");
        }
    }
}
