//! A room that aggregates its thermostats, as a Drover device behavior: the receiving side of
//! messages between actors.
//!
//! Thermostats provisioned with `"room": "<this room's id>"` report to it (see the
//! `thermostat` plugin); each report arrives as an event whose origin is a message from that
//! thermostat, after the thermostat's own record is durable, in the order it sent them. The
//! room keeps the latest report of each thermostat and answers for the whole room: the mean
//! temperature, how many heat, how many are online.
//!
//! # Config
//!
//! None (`{}`); `{"name": "Hall"}` gives it a display name.
//!
//! # Events
//!
//! ```json
//! {"type": "report", "device": "t-1", "celsius": 19.5, "heating": true, "online": true}
//! ```
//!
//! A report may come from outside too (a gateway that speaks for a thermostat); a report
//! whose `device` is not the sender of the message is refused (`invalid-event`), so one
//! thermostat cannot speak for another.
//!
//! # Transitions
//!
//! ```json
//! {"type": "reported", "device": "t-1", "celsius": 19.5, "heating": true, "online": true, "at_ms": 1700000000000}
//! ```
//!
//! # State
//!
//! ```json
//! {"name": "Hall", "thermostats": {"t-1": {"celsius": 19.5, "heating": true, "online": true, "at_ms": ...}},
//!  "mean_celsius": 19.5, "heating": 1, "online": 1}
//! ```
#![warn(missing_docs)]

use std::collections::BTreeMap;

use drover_guest::{Context, Device, Error, Origin, codes, serde_json};
use serde::{Deserialize, Serialize};

/// The room's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Room {
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// The latest report of each thermostat, by device id.
    pub thermostats: BTreeMap<String, Report>,
}

/// What a thermostat last said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Its last reading, °C, if any.
    pub celsius: Option<f64>,
    /// Whether it heats.
    pub heating: bool,
    /// Whether its readings arrive.
    pub online: bool,
    /// When the room learnt it.
    pub at_ms: u64,
}

/// Provisioning configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
}

/// An incoming event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A thermostat's state.
    Report {
        /// The thermostat's id.
        device: String,
        /// Its last reading, °C.
        celsius: Option<f64>,
        /// Whether it heats.
        heating: bool,
        /// Whether it is online.
        online: bool,
    },
}

/// A state change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Transition {
    /// A thermostat's report was taken.
    Reported {
        /// The thermostat's id.
        device: String,
        /// Its last reading, °C.
        celsius: Option<f64>,
        /// Whether it heats.
        heating: bool,
        /// Whether it is online.
        online: bool,
        /// When.
        at_ms: u64,
    },
}

impl Device for Room {
    type Config = Config;
    type Event = Event;
    type Transition = Transition;

    fn init(_device_id: &str, config: Config) -> Result<Self, Error> {
        Ok(Room {
            name: config.name,
            thermostats: BTreeMap::new(),
        })
    }

    fn handle(&self, ctx: &Context, event: Event) -> Result<Vec<Transition>, Error> {
        let Event::Report {
            device,
            celsius,
            heating,
            online,
        } = event;
        if let Origin::Message { sender, .. } = ctx.origin()
            && *sender != device
        {
            return Err(Error::new(
                codes::INVALID_EVENT,
                format!("`{sender}` reported for `{device}`"),
            ));
        }
        if celsius.is_some_and(|c| !c.is_finite()) {
            return Err(Error::invalid("celsius must be a finite number"));
        }
        Ok(vec![Transition::Reported {
            device,
            celsius,
            heating,
            online,
            at_ms: ctx.at_ms(),
        }])
    }

    fn apply(&mut self, transition: Transition) {
        let Transition::Reported {
            device,
            celsius,
            heating,
            online,
            at_ms,
        } = transition;
        self.thermostats.insert(
            device,
            Report {
                celsius,
                heating,
                online,
                at_ms,
            },
        );
    }

    fn query(&self) -> serde_json::Value {
        let readings: Vec<f64> = self
            .thermostats
            .values()
            .filter(|r| r.online)
            .filter_map(|r| r.celsius)
            .collect();
        let mean =
            (!readings.is_empty()).then(|| readings.iter().sum::<f64>() / readings.len() as f64);
        serde_json::json!({
            "name": self.name,
            "thermostats": self.thermostats,
            "mean_celsius": mean,
            "heating": self.thermostats.values().filter(|r| r.heating).count(),
            "online": self.thermostats.values().filter(|r| r.online).count(),
        })
    }
}

drover_guest::export_device!(Room);

#[cfg(test)]
mod tests {
    use super::*;

    fn report(device: &str, celsius: f64, online: bool) -> Event {
        Event::Report {
            device: device.into(),
            celsius: Some(celsius),
            heating: celsius < 20.0,
            online,
        }
    }

    #[test]
    fn aggregates_the_latest_report_of_each_thermostat() {
        let mut room = Room::init("hall", Config::default()).unwrap();
        for (seq, e) in [
            report("t-1", 18.0, true),
            report("t-2", 22.0, true),
            report("t-1", 19.0, true),
            report("t-3", 5.0, false),
        ]
        .into_iter()
        .enumerate()
        {
            for t in room
                .handle(&Context::new("hall", seq as u64 + 1, 1000, 0), e)
                .unwrap()
            {
                room.apply(t);
            }
        }
        let q = room.query();
        assert_eq!(q["mean_celsius"], 20.5, "the offline one is left out: {q}");
        assert_eq!(q["heating"], 2);
        assert_eq!(q["online"], 2);
    }

    #[test]
    fn a_thermostat_cannot_speak_for_another() {
        let room = Room::init("hall", Config::default()).unwrap();
        let ctx = Context::new("hall", 1, 1000, 0).with_origin(Origin::Message {
            sender: "t-2".into(),
            seq: 4,
            index: 0,
        });
        let err = room.handle(&ctx, report("t-1", 18.0, true)).unwrap_err();
        assert_eq!(err.code, codes::INVALID_EVENT);
    }
}
