//! The example plugins (thermostat, room, door-lock), compiled from `plugins/` by `host/build.rs`
//! and embedded in the binary, so `drover serve` has device types out of the box.

include!(concat!(env!("OUT_DIR"), "/embedded_plugins.rs"));
