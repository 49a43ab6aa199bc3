//! Drover host.
pub mod engine;
pub mod journal;
