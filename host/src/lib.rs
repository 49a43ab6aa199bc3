//! Drover: a runtime for device fleets in which every device is an isolated, event-sourced
//! actor whose behavior is a sandboxed WebAssembly component.
//!
//! # Layout
//!
//! * [`runtime`]: the public entry point; [`Runtime`] and its one builder.
//! * [`actor`]: the per-device actor loop: mailbox, guest calls, pipelined commits.
//! * [`journal`]: the durable, group-committed, checksummed event log and its index.
//! * [`replay`]: rebuilding a device from snapshot + journal tail.
//! * [`registry`]: versioned, content-addressed plugins.
//! * [`engine`]: wasmtime setup, what guests may import, containment of bad guests.
//! * [`metrics`]: counters and latency histogram in Prometheus format.
//! * [`error`]: the typed errors every caller sees.
//! * [`clock`]: host time and per-event seeds (guests have no clock of their own).
//! * [`http`]: the v1 HTTP API (axum) over a [`Runtime`].

pub mod actor;
mod builder;
pub mod clock;
pub mod config;
pub mod decide;
pub mod engine;
pub mod error;
pub mod http;
pub mod journal;
pub mod metrics;
pub mod registry;
pub mod replay;
pub mod router;
pub mod runtime;
pub mod view;

pub use builder::RuntimeBuilder;
pub use config::Config;
pub use error::{Error, ErrorKind};
pub use registry::PluginVersion;
pub use runtime::Runtime;
pub use view::{
    Committed, DeviceState, DeviceStatus, DeviceSummary, DeviceView, JournalEntry, JournalPage,
};
