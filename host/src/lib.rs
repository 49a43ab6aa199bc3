//! Drover: a runtime for device fleets in which every device is an isolated, event-sourced
//! actor whose behavior is a sandboxed WebAssembly component.
//!
//! Start at [`Runtime`] (configured with [`RuntimeBuilder`]); serve it over HTTP with
//! [`http::router`] or [`http::Server`]. `host/DESIGN.md` has the invariants, the journal
//! format, the crash rules and the map of threads.
//!
//! # Layout
//!
//! In dependency order: no module uses one listed after it.
//!
//! * [`clock`]: host time and per-event seeds (guests have no clock of their own).
//! * `log_limit`: lines a burst would repeat, logged at most once a second with a count.
//! * [`config`]: every setting and its default, in one place.
//! * [`view`]: what callers get back: devices, states, journal pages.
//! * [`engine`]: wasmtime setup, what guests may import, containment of bad guests.
//! * [`journal`]: the durable, group-committed, checksummed log, in domain terms, over a
//!   storage seam ([`journal::storage`]), kept in segment files ([`journal::segments`]) that
//!   retention deletes once nothing in them is needed.
//! * [`error`]: the typed errors every caller sees, and their [`ErrorKind`]s.
//! * `json_check`: the strict check of JSON text from outside (events, guests' payloads).
//! * [`registry`]: versioned, content-addressed plugins and which version is current.
//! * `decide`: the one path from an event to state (handle + apply), shared by actors,
//!   replay and dry-run.
//! * [`replay`]: rebuilding a device from snapshot + journal tail, online and offline.
//! * [`metrics`]: counters and latency histogram in Prometheus format.
//! * [`upgrade`]: one device brought up on another plugin version by folding its history.
//! * [`dry_run`]: a plugin version re-deciding a device's recorded events, compared.
//! * `actor`: the per-device actor loop: mailbox, guest calls, pipelined commits; its
//!   supervision (quarantine and backoff), the threads guest code runs on (the pool and the
//!   slow lane), moves to another plugin version, and internal events, each a file of its own.
//! * `router`: device id → actor, activation on demand, the live-instance cap.
//! * `outbox`: who waits for a device's commands (long polls, streams).
//! * `dispatch`: effects carried out after commit: messages into mailboxes (in order per
//!   sender, never lost to a full mailbox), timers into the wheel, commands to their
//!   watchers; what a crash left owed, sent again at start.
//! * `timers`: the timer wheel over every pending durable timer of the fleet.
//! * `runtime`, `builder`: the [`Runtime`] facade and its [`RuntimeBuilder`].
//! * `outbox_api`: the runtime's face of effects: a device's commands (long poll,
//!   acknowledgement) and timers.
//! * `leftovers`: files a killed process left behind, found by the process id in their name.
//! * [`readiness`]: whether an event sent now could be made durable (`GET /readyz`).
//! * `removal`: removing a device, with an archive of its history ([`Runtime::remove_device`]).
//! * `deploy`: deploy, rollback and dry-run across the fleet, while it runs
//!   ([`Runtime::deploy`], [`DeployReport`]).
//! * [`export`]: devices' histories to portable JSON lines and back into a data directory.
//! * [`backup`]: a consistent copy of a data directory while its server runs.
//! * [`http`]: the v1 HTTP API (axum) over a [`Runtime`].
//!
//! The `drover` binary (CLI, fleet simulator, embedded example plugins) lives in
//! `src/bin/drover/` and is not part of the library.

mod actor;
pub mod backup;
mod builder;
pub mod clock;
pub mod config;
mod decide;
mod deploy;
mod dispatch;
pub mod dry_run;
pub mod engine;
pub mod error;
pub mod export;
pub mod http;
pub mod journal;
mod json_check;
mod leftovers;
mod log_limit;
pub mod metrics;
mod outbox;
mod outbox_api;
pub mod readiness;
pub mod registry;
mod removal;
pub mod replay;
mod router;
mod runtime;
mod timers;
pub mod upgrade;
pub mod view;

pub use builder::RuntimeBuilder;
pub use config::Config;
pub use deploy::{DeployReport, DeployTotals, JournalCheck, SAMPLE as DEPLOY_SAMPLE, Selection};
pub use error::{Error, ErrorKind};
pub use outbox_api::{
    DEFAULT_OUTBOX_PAGE, MAX_COMMAND_WAIT, MAX_OUTBOX_PAGE, OUTBOX_PAGE_BYTES, OutboxPage,
};
pub use registry::PluginVersion;
pub use removal::Removal;
pub use runtime::Runtime;
pub use upgrade::SLOW_FAILURES_BEFORE_STOPPING;
pub use view::{
    CommandView, Committed, DeadLetterView, DeviceState, DeviceStatus, DeviceSummary, DeviceView,
    JournalEntry, JournalPage, PendingUpgrade, Resumed, TimerView,
};
