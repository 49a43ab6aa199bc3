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
//! * [`embedded`]: the example plugins, built from `plugins/` and embedded in the binary.
//! * [`engine`]: wasmtime setup, what guests may import, containment of bad guests.
//! * [`metrics`]: counters and latency histogram in Prometheus format.
//! * [`error`]: the typed errors every caller sees.
//! * [`clock`]: host time and per-event seeds (guests have no clock of their own).
//! * [`http`]: the v1 HTTP API (axum) over a [`Runtime`].
//! * [`cli`]: the `drover` command line: server, client commands, replay, demo, benches.
//! * [`sim`]: the fleet simulator that drives a server over HTTP.

pub mod actor;
pub mod cli;
pub mod clock;
pub mod embedded;
pub mod engine;
pub mod error;
pub mod http;
pub mod journal;
pub mod metrics;
pub mod registry;
pub mod replay;
pub mod runtime;
pub mod sim;

pub use actor::{Committed, Snapshot};
pub use error::Error;
pub use registry::PluginVersion;
pub use runtime::{DeviceSummary, DeviceView, JournalEntry, JournalPage, Runtime, RuntimeBuilder};
