//! The v1 HTTP API: how clients, gateways and the CLI talk to a [`Runtime`].
//!
//! The routes and their bodies are the public contract in `host/DESIGN.md` ("The public contract
//! (v1)"); this module only translates between HTTP and the runtime and adds nothing the
//! runtime does not already guarantee: an event is answered once its record is durable, a
//! full mailbox is a 429 with `Retry-After`, and every failure, including the ones axum
//! raises before a handler runs (bad path, bad query, unreadable body, unknown route, wrong
//! method), has the one error shape `{"error": {"code", "message"}}` (see [`error`]).
//!
//! | call | answer |
//! | --- | --- |
//! | `PUT /v1/devices/{id}` | 201 created / 200 unchanged: the device |
//! | `DELETE /v1/devices/{id}[?archive=true]` | 200 `{"id","seq","archive"}`: removed (see `crate::removal`) |
//! | `GET /v1/devices?after=ID&limit=N` | 200 a page of device ids |
//! | `GET /v1/devices/{id}` | 200 `{"id","plugin","version","seq","status","state",...}` |
//! | `POST /v1/devices/{id}/events` | 200 `{"seq","at","transitions"}` once durable |
//! | `GET /v1/devices/{id}/journal?from=&limit=` | 200 `{"records":[...],"next"}` |
//! | `POST /v1/devices/{id}/resume` | 200 `{"id","status"}`: ends a quarantine now |
//! | `GET /v1/devices/{id}/dead-letters` | 200 `{"dead_letters":[...],"retained_away":n}`: events the plugin failed on, undeliverable messages |
//! | `GET /v1/devices/{id}/commands[?wait_ms=N][&after=ID][&limit=N]` | 200 `{"commands":[...],"next"}`: the outbox, a page at a time, long-polled |
//! | `GET /v1/devices/{id}/commands/stream` | 200 `text/event-stream`: each command as it arrives |
//! | `POST /v1/devices/{id}/commands/{command}/ack` | 200 `{"id","acked"}`: the command leaves the outbox |
//! | `GET /v1/devices/{id}/timers` | 200 `{"timers":[...]}`: pending durable timers |
//! | `GET /v1/devices/{id}/state?at=SEQ` | 200 `{"seq","state"}` |
//! | `POST /v1/events` | 200 per-item results of a gateway batch (see [`batch`]) |
//! | `POST /v1/plugins/{name}` | 201 new version / 200 same bytes: `{"name","version","digest"}` |
//! | `GET /v1/plugins` | 200 the plugins and their versions |
//! | `DELETE /v1/plugins/{name}[/versions/{v}]` | 200 `{"name","removed"}`; 409 `version-in-use` |
//! | `POST /v1/plugins/{name}/deploy` | `{"version","force"}`: 200 the deploy report; 409 `deploy-refused` |
//! | `POST /v1/plugins/{name}/rollback` | 200 the deploy report of the return to the previous version |
//! | `POST /v1/plugins/{name}/dry-run` | `{"version","devices"|"sample"}`: 200 the comparison |
//! | `GET /v1/journal` | 200 `{"durable_bytes","retention":{...}}`: segments and retention |
//! | `POST /v1/journal/retention` | 200 `{"deleted_segments","deleted_bytes","retained_from","pinned_by"}` |
//! | `GET /healthz`, `GET /metrics` | liveness; Prometheus text |
//! | `GET /readyz` | readiness: 200 ready, 503 `{"status":"not-ready","reasons":[...]}` (see [`crate::readiness`]) |
//!
//! Layout: [`server`] binds, serves and shuts down; [`devices`], [`batch`], [`plugins`],
//! [`journal`] and [`ops`] hold the handlers; [`extract`] the extractors that turn axum's rejections into the
//! error shape; `framing` the same shape for requests hyper cannot parse; [`error`] the status mapping; [`limits`] the size limits; [`keep_alive`] which
//! connections stay open after an answer; `answers` the budget of answers held for their
//! clients; [`front`] the one middleware around every route that applies those and the
//! counting; [`peer`] whether a waiting request's client is
//! still there; `overflow` what a connection past the cap gets (probes are still answered); [`json`] the
//! raw-JSON helpers that keep guest output off the parse/reserialize path; [`metrics`] the
//! HTTP-level counters.
//!
//! [`Runtime`]: crate::Runtime

mod answers;
pub mod batch;
pub mod devices;
pub mod error;
pub mod extract;
mod framing;
pub mod front;
pub mod journal;
pub mod json;
pub mod keep_alive;
pub mod limits;
pub mod metrics;
pub mod ops;
mod overflow;
pub mod peer;
pub mod plugins;
pub mod server;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{MethodRouter, get, post, put};

use crate::Runtime;

pub use error::ApiError;
pub use limits::Limits;
pub use server::Server;

/// What every handler can reach: the runtime, the limits and the HTTP counters.
pub struct AppState {
    /// The runtime the API is a view of.
    pub rt: Runtime,
    /// Body and page size limits.
    pub limits: Limits,
    /// Request counters rendered after the runtime's own on `/metrics`.
    pub metrics: metrics::HttpMetrics,
    /// Set when the server stops: a request body still arriving is waited for a short grace
    /// and no longer (then the request gets 503 `shutting-down`, so a client stalled
    /// mid-body does not hold the shutdown).
    pub stopping: Arc<tokio::sync::watch::Sender<bool>>,
    /// Set at the drain timeout, a moment before the connections still open are closed: a
    /// batch still waiting answers at once with what it has, each item not yet durable
    /// `503 shutting-down` (`http/batch.rs`). Closed without an answer, a gateway could not
    /// tell the items that were made durable (often most of the batch) from the rest, and
    /// resent them all.
    pub cut_short: Arc<tokio::sync::watch::Sender<bool>>,
    /// The buffered-body budget, in KiB (see `limits.rs`).
    pub body_budget: Arc<tokio::sync::Semaphore>,
    /// The budget of answers held for their clients, in KiB (see `answers.rs`).
    pub answer_budget: Arc<tokio::sync::Semaphore>,
    /// Turns to build a page that may be large (a journal page, a page of devices, dead
    /// letters): two per core at a time (see `AppState::page_turn`).
    pub page_builds: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// A turn to build a page that may be large, waited for. A page is built whole (its
    /// records, then its JSON) before it is held for its client (`answers.rs`): 250 clients
    /// asking for 4 MiB journal pages at once built them all at once, and took a server past
    /// 1 GB before the answer budget could refuse any (a review).
    pub(crate) async fn page_turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
        self.page_builds
            .acquire()
            .await
            .map_err(|_| ApiError::from(crate::Error::ShuttingDown))
    }
}

/// [`AppState::page_builds`]: two turns per core.
pub(crate) fn page_builds() -> Arc<tokio::sync::Semaphore> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    Arc::new(tokio::sync::Semaphore::new(2 * cores))
}

/// [`AppState::body_budget`] for `limits`: one permit per KiB.
pub(crate) fn body_budget(limits: &Limits) -> Arc<tokio::sync::Semaphore> {
    kib_budget(limits.body_budget_bytes())
}

/// [`AppState::answer_budget`] for `limits`: one permit per KiB.
pub(crate) fn answer_budget(limits: &Limits) -> Arc<tokio::sync::Semaphore> {
    kib_budget(limits.answer_budget_bytes())
}

fn kib_budget(bytes: usize) -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(
        bytes
            .div_ceil(1024)
            .min(tokio::sync::Semaphore::MAX_PERMITS)
            .min(u32::MAX as usize),
    ))
}

/// The state as handlers receive it.
pub type App = Arc<AppState>;

/// `route` with a body limit of `max` bytes: the declared length checked before the body is
/// read, then the bytes counted as they arrive by the `Body` extractor (see `limits.rs`).
fn limited(route: MethodRouter<App>, max: usize) -> MethodRouter<App> {
    route
        .layer(DefaultBodyLimit::max(max))
        .layer(axum::middleware::from_fn(move |req, next| {
            extract::declared_length(max, req, next)
        }))
}

/// Builds the v1 router for `rt`. Separate from [`Server`] so tests and embedders can mount
/// it on their own listener or inside a larger router.
pub fn router(rt: Runtime, limits: Limits) -> Router {
    router_of(Arc::new(AppState {
        rt,
        body_budget: body_budget(&limits),
        answer_budget: answer_budget(&limits),
        page_builds: page_builds(),
        limits,
        metrics: metrics::HttpMetrics::default(),
        stopping: Arc::new(tokio::sync::watch::Sender::new(false)),
        cut_short: Arc::new(tokio::sync::watch::Sender::new(false)),
    }))
}

/// The v1 router over `app`: the server keeps `app` too, to count what it answers before
/// routing (see [`framing`]).
pub(crate) fn router_of(app: App) -> Router {
    let limits = app.limits.clone();
    Router::new()
        .route("/v1/devices", get(devices::list))
        .route(
            "/v1/devices/{id}",
            limited(
                put(devices::provision)
                    .get(devices::show)
                    .delete(devices::remove),
                limits.max_request_bytes,
            ),
        )
        .route(
            "/v1/devices/{id}/events",
            limited(post(devices::send), limits.max_event_bytes),
        )
        .route("/v1/devices/{id}/journal", get(devices::journal))
        .route("/v1/devices/{id}/resume", post(devices::resume))
        .route("/v1/devices/{id}/dead-letters", get(devices::dead_letters))
        .route("/v1/devices/{id}/commands", get(devices::commands))
        .route(
            "/v1/devices/{id}/commands/stream",
            get(devices::commands_stream),
        )
        .route(
            "/v1/devices/{id}/commands/{command}/ack",
            post(devices::ack_command),
        )
        .route("/v1/devices/{id}/timers", get(devices::timers))
        .route("/v1/devices/{id}/state", get(devices::state))
        .route(
            "/v1/events",
            limited(post(batch::ingest), limits.max_batch_bytes),
        )
        .route("/v1/plugins", get(plugins::list))
        .route(
            "/v1/plugins/{name}",
            limited(
                post(plugins::upload).delete(plugins::remove),
                limits.max_plugin_bytes,
            ),
        )
        .route(
            "/v1/plugins/{name}/deploy",
            limited(post(plugins::deploy), limits.max_request_bytes),
        )
        .route(
            "/v1/plugins/{name}/dry-run",
            limited(post(plugins::dry_run), limits.max_request_bytes),
        )
        .route(
            "/v1/plugins/{name}/rollback",
            limited(post(plugins::rollback), limits.max_request_bytes),
        )
        .route(
            "/v1/plugins/{name}/versions/{version}",
            axum::routing::delete(plugins::remove_version),
        )
        .route("/v1/journal", get(journal::show))
        .route("/v1/journal/retention", post(journal::retain))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            front::front_door,
        ))
        .with_state(app)
}
