//! The runtime's typed errors.
//!
//! Every way a request can fail has its own variant with a stable machine-readable
//! [`Error::code`], so the HTTP layer, the CLI and embedders can react without parsing text.

use crate::engine::{CallError, PluginError};
use crate::journal::JournalError;

/// Why a runtime operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("unknown device `{0}`")]
    UnknownDevice(String),
    #[error("unknown plugin `{0}`")]
    UnknownPlugin(String),
    #[error("invalid id: {0}")]
    InvalidId(String),
    #[error("device `{id}` already exists with plugin `{plugin}` and another configuration")]
    DeviceConflict { id: String, plugin: String },
    #[error("malformed event: {0}")]
    MalformedEvent(String),
    #[error("malformed configuration: {0}")]
    MalformedConfig(String),
    #[error("payload of {size} bytes exceeds the limit of {limit}")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("the device's plugin refused the event: {code}: {message}")]
    Rejected { code: String, message: String },
    #[error("the device's plugin trapped: {0}")]
    Trap(String),
    #[error("the device's plugin exceeded its time budget of {0:?}")]
    Timeout(std::time::Duration),
    #[error("the device's plugin produced {size} bytes of transitions, over the limit of {limit}")]
    OutputTooLarge { size: usize, limit: usize },
    #[error("the device's mailbox is full; retry later")]
    MailboxFull,
    #[error(
        "the device is quarantined after {failures} consecutive plugin failures (last: {last}); \
         it is retried in {retry_in_ms} ms"
    )]
    Quarantined {
        failures: u32,
        last: String,
        retry_in_ms: u64,
    },
    #[error("invalid plugin: {0}")]
    InvalidPlugin(String),
    #[error("seq {requested} is past the device's latest seq {latest}")]
    SeqOutOfRange { requested: u64, latest: u64 },
    #[error("journal: {0}")]
    Journal(#[from] JournalError),
    #[error("the device failed to activate: {0}")]
    Activation(String),
    #[error("the runtime is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// A short stable word naming the kind of error, as used in the HTTP error shape.
    pub fn code(&self) -> &'static str {
        match self {
            Error::UnknownDevice(_) => "unknown-device",
            Error::UnknownPlugin(_) => "unknown-plugin",
            Error::InvalidId(_) => "invalid-id",
            Error::DeviceConflict { .. } => "device-conflict",
            Error::MalformedEvent(_) => "malformed-event",
            Error::MalformedConfig(_) => "malformed-config",
            Error::PayloadTooLarge { .. } => "payload-too-large",
            Error::Rejected { .. } => "rejected",
            Error::Trap(_) => "trap",
            Error::Timeout(_) => "timeout",
            Error::OutputTooLarge { .. } => "output-too-large",
            Error::MailboxFull => "mailbox-full",
            Error::Quarantined { .. } => "quarantined",
            Error::InvalidPlugin(_) => "invalid-plugin",
            Error::SeqOutOfRange { .. } => "seq-out-of-range",
            Error::Journal(_) => "journal",
            Error::Activation(_) => "activation-failed",
            Error::ShuttingDown => "shutting-down",
            Error::Internal(_) => "internal",
        }
    }
}

impl From<CallError> for Error {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Rejected { code, message } => Error::Rejected { code, message },
            CallError::Trap(m) => Error::Trap(m),
            CallError::Timeout(d) => Error::Timeout(d),
        }
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
