//! What the guest-running benches share: the example thermostat component as the build
//! made it, and numeric options from the environment. Included with `#[path]`.
#![allow(dead_code)]

/// The example thermostat component, as the build made it.
pub const THERMOSTAT: &[u8] = include_bytes!(concat!(
    env!("DROVER_EXAMPLE_PLUGIN_DIR"),
    "/thermostat.wasm"
));

/// The environment variable `name` as a number, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
