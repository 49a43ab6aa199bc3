//! The example plugins, compiled from `plugins/` by the build and embedded in the binary, so
//! `drover serve` has device types out of the box.

include!(concat!(env!("OUT_DIR"), "/embedded_plugins.rs"));
