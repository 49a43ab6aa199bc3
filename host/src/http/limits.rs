//! Size limits of the HTTP API.
//!
//! Every body is buffered before a handler sees it, so every route has a cap: the runtime's own
//! event limit for single events, a larger one for gateway batches and plugin uploads. A body
//! over its cap is refused with 413 `payload-too-large` before it is fully read, so a client
//! cannot make the server hold an arbitrary amount of memory; a declared `Content-Length`
//! over the cap is refused before the body is read at all (a client that sent
//! `Expect: 100-continue` gets the 413 instead of a `100 Continue`). A body that does not
//! arrive within [`Limits::body_read_timeout`] is 408 `body-timeout`. And all bodies being
//! buffered at once share a budget ([`Limits::max_buffered_body_bytes`]): each request takes
//! its room as its bytes arrive, and one whose next bytes do not fit is `503 overloaded` with
//! `Retry-After`, so many connections together cannot make the server hold more than that
//! either. Room is taken for bytes received, not declared: reserving the declared length (a
//! chunked body's whole route limit) before any byte came let eight heads of 64 MiB uploads
//! that sent nothing hold the whole budget for the body timeout, refusing every event.

use crate::config::defaults;

/// See the module docs. Defaults suit a single server; `drover serve` flags override them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest single event body (`POST /v1/devices/{id}/events`). Keep it equal to the
    /// runtime's `max_event_bytes` so both layers refuse the same events.
    pub max_event_bytes: usize,
    /// Largest other JSON request body (provisioning, deploy).
    pub max_request_bytes: usize,
    /// Largest gateway batch body (`POST /v1/events`).
    pub max_batch_bytes: usize,
    /// Most items in one gateway batch.
    pub max_batch_items: usize,
    /// Largest plugin upload (`POST /v1/plugins/{name}`).
    pub max_plugin_bytes: usize,
    /// Most bytes of request bodies buffered at once, all connections together (at least
    /// the largest route limit, so one request at its limit always fits; see
    /// [`Limits::body_budget_bytes`]). A request whose body's next bytes do not fit now is
    /// refused `503 overloaded` with `Retry-After`.
    pub max_buffered_body_bytes: usize,
    /// Most bytes of answers held for their clients at once, all connections together (at
    /// least 1 MiB; see `http/answers.rs`). An answer of 64 KiB or more that does not fit
    /// now is replaced by `503 overloaded` with `Retry-After`; one larger than the whole
    /// budget takes all of it.
    pub max_buffered_answer_bytes: usize,
    /// Most records one journal page may ask for.
    pub max_page: usize,
    /// Longest a client may take to send a request head, and longest a keep-alive
    /// connection may stay idle.
    pub header_read_timeout: std::time::Duration,
    /// Most open connections; past it new ones are refused with 503.
    pub max_connections: usize,
    /// Longest a client may take to send a request body.
    pub body_read_timeout: std::time::Duration,
    /// Longest writing an answer may make no progress (a client that stops reading).
    pub write_timeout: std::time::Duration,
    /// Once the server stops: how long a connection with no request being handled may stay
    /// open (a request head still arriving, an answer still being written) and a request
    /// body may still arrive (then 503 `shutting-down`).
    pub shutdown_grace: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_event_bytes: defaults::MAX_EVENT_BYTES,
            max_request_bytes: defaults::MAX_REQUEST_BYTES,
            max_batch_bytes: defaults::MAX_BATCH_BYTES,
            max_batch_items: defaults::MAX_BATCH_ITEMS,
            max_plugin_bytes: defaults::MAX_PLUGIN_BYTES,
            max_buffered_body_bytes: defaults::MAX_BUFFERED_BODY_BYTES,
            max_buffered_answer_bytes: defaults::MAX_BUFFERED_ANSWER_BYTES,
            max_page: defaults::MAX_PAGE,
            header_read_timeout: defaults::HEADER_READ_TIMEOUT,
            max_connections: defaults::MAX_CONNECTIONS,
            body_read_timeout: defaults::BODY_READ_TIMEOUT,
            write_timeout: defaults::WRITE_TIMEOUT,
            shutdown_grace: defaults::SHUTDOWN_GRACE,
        }
    }
}

impl Limits {
    /// The buffered-body budget in effect: [`Limits::max_buffered_body_bytes`], raised to the
    /// largest route limit so that a single request at its limit is never refused by it.
    pub fn body_budget_bytes(&self) -> usize {
        self.max_buffered_body_bytes
            .max(self.max_plugin_bytes)
            .max(self.max_batch_bytes)
            .max(self.max_request_bytes)
            .max(self.max_event_bytes)
    }

    /// The budget of answers held in effect: [`Limits::max_buffered_answer_bytes`], at least
    /// 1 MiB.
    pub fn answer_budget_bytes(&self) -> usize {
        self.max_buffered_answer_bytes.max(1 << 20)
    }
}
