//! The one error shape of the API and the status of every error.
//!
//! Every failure answers `{"error": {"code": STRING, "message": STRING}}`. The code is
//! [`Error::code`] for failures of the runtime, or one of the HTTP-level codes below for
//! requests that never reached it. Clients branch on the code and the status; the message is
//! for people.
//!
//! Statuses say whose move it is:
//!
//! | status | codes | meaning |
//! | --- | --- | --- |
//! | 400 | `invalid-id`, `malformed-event`, `malformed-config`, `malformed-request`, `malformed-query` | fix the request |
//! | 404 | `unknown-device`, `unknown-plugin`, `seq-out-of-range`, `not-found` | no such thing (yet) |
//! | 405 | `method-not-allowed` | |
//! | 409 | `device-conflict` | the id is taken by another plugin or config |
//! | 413 | `payload-too-large` | |
//! | 414 | `uri-too-long` | |
//! | 431 | `headers-too-large` | |
//! | 422 | `rejected`, `trap`, `timeout`, `output-too-large`, `invalid-plugin` | the request was fine, the plugin refused or failed on it |
//! | 429 | `mailbox-full`, `outbox-full`, `messages-pending` (with `Retry-After`) | slow down and retry (after acknowledging commands, for `outbox-full`; once the device's message targets catch up, for `messages-pending`) |
//! | 500 | `internal`, `activation-failed`, `journal` (read errors) | the server's fault |
//! | 501 | `not-implemented` | the body has a transfer coding other than `chunked` (`gzip`): send it uncoded |
//! | 505 | `http-version-not-supported` | the connection opened with HTTP/2's preface: speak HTTP/1.1 |
//! | 503 | `shutting-down`, `journal` (write errors; a full disk says so), `quarantined` (the plugin failed on this device repeatedly), `overloaded` (the plugin's call waited for a core over 4 times its time budget, or the fleet's guest memory budget refused it memory: the plugin is not at fault), `too-many-connections`, all with `Retry-After`; `plugin-unavailable` (the component of the device's plugin version is missing, e.g. a placeholder salvage rebuilt: deploy a version), without | retry later or elsewhere |
//!
//! A state asked for at a seq the device has not reached is 404 `seq-out-of-range`: the
//! request is well formed, the record does not exist yet.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::{Error, ErrorKind};
use crate::journal::JournalError;

/// HTTP-level codes: requests refused before the runtime saw them.
pub mod codes {
    /// The body is not what the route takes (not JSON, wrong fields, not UTF-8).
    pub const MALFORMED_REQUEST: &str = "malformed-request";
    /// A query parameter does not parse or is out of range.
    pub const MALFORMED_QUERY: &str = "malformed-query";
    /// No route has this path.
    pub const NOT_FOUND: &str = "not-found";
    /// The route exists but not with this method.
    pub const METHOD_NOT_ALLOWED: &str = "method-not-allowed";
    /// The route is reserved for a later version, or the request's transfer coding is not
    /// one the server undoes (only `chunked` is).
    pub const NOT_IMPLEMENTED: &str = "not-implemented";
    /// The body exceeds the route's limit (same code as the runtime's own size check).
    pub const PAYLOAD_TOO_LARGE: &str = "payload-too-large";
    /// The body did not arrive within the body-read timeout.
    pub const BODY_TIMEOUT: &str = "body-timeout";
    /// The server is at its connection cap; written by the accept loop, which then closes
    /// the connection (see [`super::super::server`]).
    pub const TOO_MANY_CONNECTIONS: &str = "too-many-connections";
    /// The request head has more headers or bytes than the server parses (431; see
    /// [`super::super::framing`]).
    pub const HEADERS_TOO_LARGE: &str = "headers-too-large";
    /// The request's path and query are longer than the server parses (414).
    pub const URI_TOO_LONG: &str = "uri-too-long";
    /// The connection opened with HTTP/2's preface; the server speaks HTTP/1.1 (505; see
    /// [`super::super::framing`]).
    pub const HTTP_VERSION_NOT_SUPPORTED: &str = "http-version-not-supported";
}

/// Who raised an error: counted separately on `/metrics`, since the runtime counts its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The runtime returned it (already counted in `drover_errors_total`).
    Runtime,
    /// The HTTP layer refused the request before the runtime saw it.
    Http,
}

/// An error on its way to becoming a response. Handlers return `Result<_, ApiError>`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u32>,
    pub origin: Origin,
    /// The plugin's own refusal, when the device's plugin refused the request.
    pub plugin: Option<PluginRefusal>,
    /// For `410 retained-away`: the oldest seq of the device still kept.
    pub oldest_seq: Option<u64>,
}

/// A plugin's refusal as the plugin put it: its own code (`out-of-range`, `invalid-event`,
/// ...) and message. Shown as the `plugin` field of the error, next to the API's `rejected`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PluginRefusal {
    pub code: String,
    pub message: String,
}

impl PluginRefusal {
    /// The refusal inside `e`, if `e` is one.
    pub fn of(e: &Error) -> Option<PluginRefusal> {
        match e {
            Error::Rejected { code, message } | Error::ConfigRefused { code, message } => {
                Some(PluginRefusal {
                    code: code.clone(),
                    message: message.clone(),
                })
            }
            _ => None,
        }
    }
}

/// Marker put into the extensions of an error response so the metrics middleware can count
/// HTTP-level errors by code.
#[derive(Debug, Clone, Copy)]
pub struct ErrorMark {
    pub code: &'static str,
    pub origin: Origin,
}

impl ApiError {
    /// An HTTP-level error.
    pub fn http(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            origin: Origin::Http,
            plugin: None,
            oldest_seq: None,
        }
    }

    /// A runtime error raised by the HTTP layer itself, before calling the runtime (such as
    /// an invalid id in the path): same status and code, counted as an HTTP-level error.
    pub fn refused(e: Error) -> Self {
        ApiError {
            origin: Origin::Http,
            ..ApiError::from(e)
        }
    }

    /// 400 `malformed-request`.
    pub fn malformed_request(message: impl Into<String>) -> Self {
        Self::http(StatusCode::BAD_REQUEST, codes::MALFORMED_REQUEST, message)
    }

    /// 400 `malformed-query`.
    pub fn malformed_query(message: impl Into<String>) -> Self {
        Self::http(StatusCode::BAD_REQUEST, codes::MALFORMED_QUERY, message)
    }

    /// The body of this error, as the API shows it.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
                plugin: self.plugin.as_ref(),
                oldest_seq: self.oldest_seq,
            },
        }
    }
}

/// `{"error": {...}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

/// `{"code": ..., "message": ..., "plugin": {"code", "message"}?}`.
#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    pub code: &'a str,
    pub message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin: Option<&'a PluginRefusal>,
    /// `410 retained-away`: the oldest seq of the device the journal still holds, or for a
    /// state (`state?at=`), the oldest seq whose state can still be rebuilt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_seq: Option<u64>,
}

/// The status an error of the runtime answers with (see the module docs).
pub fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::Journal(JournalError::TooLarge(_)) => StatusCode::PAYLOAD_TOO_LARGE,
        Error::Journal(JournalError::Read { .. }) => StatusCode::INTERNAL_SERVER_ERROR,
        // Retrying cannot help: the data directory's format cannot hold the request.
        Error::Journal(JournalError::Format(_)) => StatusCode::CONFLICT,
        other => status_of_kind(other.kind()),
    }
}

/// The status of each kind of error; a journal error is 503 (a write that may succeed
/// later) unless [`status_of`] knows better. Exhaustive, so a new kind needs a status.
pub fn status_of_kind(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::UnknownDevice
        | ErrorKind::UnknownPlugin
        | ErrorKind::UnknownCommand
        | ErrorKind::UnknownVersion
        | ErrorKind::SeqOutOfRange => StatusCode::NOT_FOUND,
        ErrorKind::RetainedAway => StatusCode::GONE,
        ErrorKind::InvalidId
        | ErrorKind::MalformedEvent
        | ErrorKind::MalformedConfig
        | ErrorKind::WrongPlugin => StatusCode::BAD_REQUEST,
        ErrorKind::DeviceConflict | ErrorKind::DeployRefused | ErrorKind::VersionInUse => {
            StatusCode::CONFLICT
        }
        ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::Rejected
        | ErrorKind::Trap
        | ErrorKind::Timeout
        | ErrorKind::OutputTooLarge
        | ErrorKind::InvalidEffect
        | ErrorKind::InvalidPlugin => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Quarantined
        | ErrorKind::Journal
        | ErrorKind::ShuttingDown
        | ErrorKind::Overloaded
        | ErrorKind::PluginUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::MailboxFull | ErrorKind::OutboxFull | ErrorKind::MessagesPending => {
            StatusCode::TOO_MANY_REQUESTS
        }
        ErrorKind::ActivationFailed | ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The message shown for a runtime error. Failures of the guest say so, so that nobody
/// debugs their request for a plugin bug.
pub fn message_of(e: &Error) -> String {
    match e {
        Error::Trap(_)
        | Error::Timeout { .. }
        | Error::OutputTooLarge { .. }
        | Error::InvalidEffect(_) => {
            format!("{e} (a fault of the device's plugin, not of the request)")
        }
        // The same advice as any other write that found the disk full (`Error::StorageFull`).
        Error::Journal(j) if j.is_storage_full() => {
            format!("{e}: the disk is full; retry once space is freed")
        }
        // EMFILE / ENFILE: no `ErrorKind` of its own on stable Rust, so told by its OS code.
        Error::Journal(j)
            if ["(os error 24)", "(os error 23)"]
                .iter()
                .any(|c| j.to_string().contains(c)) =>
        {
            format!(
                "{e}: the server has run out of file descriptors (each journal segment and \
                 connection holds one; `GET /readyz` says `files-low` first); retry once some \
                 are free, and raise its limit (`ulimit -n`, `LimitNOFILE=`)"
            )
        }
        _ => e.to_string(),
    }
}

/// Seconds after which sending again may succeed, for the errors that say to retry (429s and
/// 503s but `plugin-unavailable`): the `Retry-After` header of a single request, and
/// `retry_after_s` of a batch item.
pub(crate) fn retry_after(e: &Error) -> Option<u32> {
    let secs = |ms: u128| u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX).max(1);
    match (e, status_of(e)) {
        (Error::Quarantined { retry_in_ms, .. }, _) => Some(secs(u128::from(*retry_in_ms))),
        // Held back by a quarantined target: its messages arrive as the quarantine ends.
        (
            Error::MessagesPending {
                behind: Some(b), ..
            },
            _,
        ) if b.quarantined_for.is_some() => b.quarantined_for.map(|left| secs(left.as_millis())),
        // Retrying does not help until someone deploys a version.
        (Error::PluginUnavailable { .. }, _) => None,
        (_, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) => Some(1),
        _ => None,
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        // A fault of the server's own: the client gets its message, the operator a line (the
        // `drover_errors_total{code="internal"}` count alone says nothing of what failed).
        if e.kind() == ErrorKind::Internal {
            tracing::error!(error = %e, "request failed on an internal error");
        }
        let status = status_of(&e);
        let retry_after = retry_after(&e);
        ApiError {
            status,
            code: e.code(),
            message: message_of(&e),
            retry_after,
            origin: Origin::Runtime,
            plugin: PluginRefusal::of(&e),
            oldest_seq: match &e {
                Error::Journal(JournalError::RetainedAway { oldest })
                | Error::StateRetainedAway { oldest, .. } => Some(*oldest),
                _ => None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).unwrap_or_else(|_| {
            br#"{"error":{"code":"internal","message":"error not serializable"}}"#.to_vec()
        });
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response.extensions_mut().insert(ErrorMark {
            code: self.code,
            origin: self.origin,
        });
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_whose_fault_it_is() {
        let cases = [
            (Error::UnknownDevice("d".into()), 404),
            (
                Error::UnknownCommand {
                    device: "d".into(),
                    command: "3.0".into(),
                },
                404,
            ),
            (Error::InvalidId("x".into()), 400),
            (Error::MailboxFull, 429),
            (
                Error::Rejected {
                    code: "out-of-range".into(),
                    message: "no".into(),
                },
                422,
            ),
            (Error::Trap("boom".into()), 422),
            (
                Error::SeqOutOfRange {
                    requested: 9,
                    latest: 1,
                },
                404,
            ),
            (Error::ShuttingDown, 503),
            (Error::Overloaded("waited".into()), 503),
            (
                Error::Journal(JournalError::RetainedAway { oldest: 40 }),
                410,
            ),
            (
                Error::Journal(JournalError::Commit {
                    kind: std::io::ErrorKind::StorageFull,
                    message: "disk".into(),
                }),
                503,
            ),
            // A plugin upload on a full disk answered 500 internal, where an event got a
            // retryable 503.
            (
                Error::writing(
                    "storing the plugin's component",
                    std::io::Error::from(std::io::ErrorKind::StorageFull),
                ),
                503,
            ),
            (
                Error::writing(
                    "storing the plugin's component",
                    std::io::Error::from(std::io::ErrorKind::PermissionDenied),
                ),
                500,
            ),
        ];
        for (e, status) in cases {
            let api = ApiError::from(e.clone());
            assert_eq!(api.status.as_u16(), status, "{e}");
            assert_eq!(api.code, e.code());
        }
        // A sender held back by a quarantined target retries as the quarantine ends.
        let pending = |quarantined_for| Error::MessagesPending {
            pending: 2,
            limit: 2,
            behind: Some(Box::new(crate::error::Behind {
                target: "b".into(),
                owed: 2,
                quarantined_for,
            })),
        };
        let held = ApiError::from(pending(Some(std::time::Duration::from_millis(4200))));
        assert_eq!((held.status.as_u16(), held.retry_after), (429, Some(5)));
        assert!(
            held.message
                .contains("(limit 2), 2 of them to `b`, which is quarantined for another 5 s;"),
            "{}",
            held.message
        );
        assert_eq!(ApiError::from(pending(None)).retry_after, Some(1));
        let disk = ApiError::from(Error::writing(
            "writing the archive",
            std::io::Error::from(std::io::ErrorKind::QuotaExceeded),
        ));
        assert_eq!(disk.code, "journal");
        assert_eq!(disk.retry_after, Some(1));
        assert!(disk.message.contains("disk is full"), "{}", disk.message);
        let commit = ApiError::from(Error::Journal(JournalError::Commit {
            kind: std::io::ErrorKind::StorageFull,
            message: "write: No space left on device (os error 28)".into(),
        }));
        assert!(
            commit
                .message
                .ends_with("the disk is full; retry once space is freed"),
            "{}",
            commit.message
        );
        let files = ApiError::from(Error::Journal(JournalError::Commit {
            kind: std::io::ErrorKind::Other,
            message: "opening segment: Too many open files (os error 24)".into(),
        }));
        assert!(
            files.message.contains("out of file descriptors") && files.message.contains("ulimit"),
            "{}",
            files.message
        );
        let full = ApiError::from(Error::MailboxFull).into_response();
        assert_eq!(full.headers()[header::RETRY_AFTER], "1");
        assert!(message_of(&Error::Trap("x".into())).contains("plugin"));
    }

    #[test]
    fn every_error_kind_has_an_error_status_and_a_metrics_counter() {
        let metrics = crate::metrics::Metrics::default();
        for kind in ErrorKind::ALL {
            let status = status_of_kind(*kind);
            assert!(
                status.is_client_error() || status.is_server_error(),
                "{kind:?} answers {status}"
            );
            metrics.error(*kind);
            assert_eq!(metrics.errors(*kind), 1, "{kind:?}");
        }
        let text = metrics.render(&[], &[]);
        for kind in ErrorKind::ALL {
            let line = format!("drover_errors_total{{code=\"{}\"}} 1", kind.code());
            assert!(text.contains(&line), "{line}");
        }
    }
}
