//! A heating thermostat with hysteresis, as a Drover device behavior.
//!
//! The thermostat records temperature readings, lets clients change the setpoint and the mode,
//! and switches the heating on when the temperature falls below `setpoint - hysteresis` and
//! off when it rises above `setpoint + hysteresis` (in between, the heating keeps its current
//! state, which stops it from flapping around the setpoint). Time comes only from the event
//! context, so replay reproduces the same state.
//!
//! It also shows the three kinds of effects, each switched on by its config field:
//!
//! * **a durable timer** (`offline_after_ms`): every reading (re)sets the `heartbeat` timer;
//!   if it fires, no reading came for that long and the thermostat marks itself offline
//!   (`went_offline`), until the next reading (`back_online`);
//! * **device commands** (`commands: true`): each switch of the heating also queues
//!   `{"heating": true|false}` in the device's outbox for its gateway;
//! * **messages** (`room`): each reading, switch and change of connectivity is reported to the
//!   `room` device (the `room` example plugin), which aggregates its thermostats.
//!
//! # Config
//!
//! Every field is optional; unknown fields are refused (`invalid-config`) so typos show.
//!
//! ```json
//! {"setpoint": 21.0, "hysteresis": 0.5, "min_setpoint": 5.0, "max_setpoint": 30.0, "mode": "heat"}
//! ```
//!
//! | field | default | meaning |
//! | --- | --- | --- |
//! | `setpoint` | `20.0` | target temperature, °C, within `min_setpoint..=max_setpoint` |
//! | `hysteresis` | `0.5` | half-width of the dead band around the setpoint, °C, `>= 0` |
//! | `min_setpoint`, `max_setpoint` | `5.0`, `30.0` | range accepted for setpoints |
//! | `mode` | `"heat"` | `"heat"` (regulate) or `"off"` (heating always off) |
//! | `offline_after_ms` | none | mark the thermostat offline after this long without a reading |
//! | `commands` | `false` | queue a `{"heating": bool}` command at each switch |
//! | `room` | none | the id of a `room` device to report to |
//!
//! # Events
//!
//! ```json
//! {"type": "reading", "celsius": 21.5}
//! {"type": "set_point", "celsius": 22}
//! {"type": "mode", "mode": "off"}
//! ```
//!
//! `{"type": "silent"}` is what the heartbeat timer delivers; sent from outside it is refused
//! (`invalid-event`).
//!
//! Refusals: a setpoint outside the configured range (or not finite) is `out-of-range`; a
//! reading below absolute zero (or not finite) is `invalid-reading`; anything that does not
//! parse is `invalid-event`.
//!
//! # Transitions
//!
//! ```json
//! {"type": "temperature_recorded", "celsius": 21.5, "at_ms": 1700000000000}
//! {"type": "setpoint_changed", "celsius": 22.0}
//! {"type": "mode_changed", "mode": "off"}
//! {"type": "heating_on"}
//! {"type": "heating_off"}
//! {"type": "went_offline", "at_ms": 1700000300000}
//! {"type": "back_online"}
//! ```
//!
//! A reading yields `temperature_recorded`, followed by `heating_on`/`heating_off` when it
//! crosses the band. A setpoint or mode change that moves the band past the last reading also
//! switches the heating. Re-sending the current setpoint or mode yields no transition.
//!
//! # State (what `GET /v1/devices/{id}` shows)
//!
//! ```json
//! {"device_id": "t-1", "setpoint": 21.0, "hysteresis": 0.5, "min_setpoint": 5.0,
//!  "max_setpoint": 30.0, "mode": "heat", "heating": true, "last_celsius": 19.8,
//!  "last_reading_at_ms": 1700000000000, "readings": 12, "online": true}
//! ```
#![warn(missing_docs)]

use drover_guest::{Context, Device, Error, Origin, Timer, codes, log, serde_json};
use serde::{Deserialize, Serialize};

/// Error code for a reading that cannot be a temperature.
pub const INVALID_READING: &str = "invalid-reading";

/// Lowest physically possible temperature, °C.
const ABSOLUTE_ZERO: f64 = -273.15;

/// Whether the thermostat regulates at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Heating is always off.
    Off,
    /// Heating follows the setpoint with hysteresis.
    #[default]
    Heat,
}

/// The thermostat's state (its snapshot and queried JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thermostat {
    /// The device id given at provisioning.
    pub device_id: String,
    /// Target temperature, °C.
    pub setpoint: f64,
    /// Half-width of the dead band around the setpoint, °C.
    pub hysteresis: f64,
    /// Lowest accepted setpoint, °C.
    pub min_setpoint: f64,
    /// Highest accepted setpoint, °C.
    pub max_setpoint: f64,
    /// Regulating or off.
    pub mode: Mode,
    /// Whether the heating is currently on.
    pub heating: bool,
    /// The last recorded temperature, °C.
    pub last_celsius: Option<f64>,
    /// When the last reading was accepted (host time, ms since the Unix epoch).
    pub last_reading_at_ms: Option<u64>,
    /// How many readings were recorded.
    pub readings: u64,
    /// Whether readings arrive (false after `offline_after_ms` without one).
    #[serde(default = "online")]
    pub online: bool,
    /// See [`Config::offline_after_ms`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_after_ms: Option<u64>,
    /// See [`Config::commands`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub commands: bool,
    /// See [`Config::room`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
}

fn online() -> bool {
    true
}

/// Provisioning configuration; see the crate docs for the JSON.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Initial target temperature, °C.
    #[serde(default = "default_setpoint")]
    pub setpoint: f64,
    /// Half-width of the dead band, °C.
    #[serde(default = "default_hysteresis")]
    pub hysteresis: f64,
    /// Lowest accepted setpoint, °C.
    #[serde(default = "default_min_setpoint")]
    pub min_setpoint: f64,
    /// Highest accepted setpoint, °C.
    #[serde(default = "default_max_setpoint")]
    pub max_setpoint: f64,
    /// Initial mode.
    #[serde(default)]
    pub mode: Mode,
    /// Mark the thermostat offline after this many ms without a reading.
    #[serde(default)]
    pub offline_after_ms: Option<u64>,
    /// Queue a `{"heating": bool}` command for the device at each switch.
    #[serde(default)]
    pub commands: bool,
    /// Report to this `room` device.
    #[serde(default)]
    pub room: Option<String>,
}

fn default_setpoint() -> f64 {
    20.0
}
fn default_hysteresis() -> f64 {
    0.5
}
fn default_min_setpoint() -> f64 {
    5.0
}
fn default_max_setpoint() -> f64 {
    30.0
}

/// An incoming event; see the crate docs for the JSON.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A temperature measured by the sensor.
    Reading {
        /// Measured temperature, °C.
        celsius: f64,
    },
    /// A request to change the target temperature.
    SetPoint {
        /// New target temperature, °C.
        celsius: f64,
    },
    /// A request to change the mode.
    Mode {
        /// New mode.
        mode: Mode,
    },
    /// No reading for `offline_after_ms`: delivered by the heartbeat timer only.
    Silent,
}

/// A state change; see the crate docs for the JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Transition {
    /// A reading was accepted.
    TemperatureRecorded {
        /// Measured temperature, °C.
        celsius: f64,
        /// Host time of the reading.
        at_ms: u64,
    },
    /// The target temperature changed.
    SetpointChanged {
        /// New target temperature, °C.
        celsius: f64,
    },
    /// The mode changed.
    ModeChanged {
        /// New mode.
        mode: Mode,
    },
    /// The heating was switched on.
    HeatingOn,
    /// The heating was switched off.
    HeatingOff,
    /// No reading came for `offline_after_ms`.
    WentOffline {
        /// When the heartbeat timer fired.
        at_ms: u64,
    },
    /// A reading came after the thermostat was offline.
    BackOnline,
}

/// The key of the heartbeat timer.
pub const HEARTBEAT: &str = "heartbeat";

impl Thermostat {
    /// Whether the heating should run in this state: the hysteresis rule.
    fn wants_heating(&self) -> bool {
        match (self.mode, self.last_celsius) {
            (Mode::Off, _) => false,
            (Mode::Heat, None) => self.heating,
            (Mode::Heat, Some(t)) if t < self.setpoint - self.hysteresis => true,
            (Mode::Heat, Some(t)) if t > self.setpoint + self.hysteresis => false,
            (Mode::Heat, Some(_)) => self.heating,
        }
    }
}

impl Device for Thermostat {
    type Config = Config;
    type Event = Event;
    type Transition = Transition;

    fn init(device_id: &str, config: Config) -> Result<Self, Error> {
        let Config {
            setpoint,
            hysteresis,
            min_setpoint,
            max_setpoint,
            mode,
            offline_after_ms,
            commands,
            room,
        } = config;
        if offline_after_ms == Some(0) {
            return Err(Error::invalid_config("offline_after_ms must be > 0"));
        }
        // The host's rule for device ids: refused here, or every report would fail.
        if let Some(room) = &room
            && (room.is_empty()
                || room.len() > 128
                || room == "."
                || room == ".."
                || !room
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b)))
        {
            return Err(Error::invalid_config(format!(
                "room `{room}` is not a device id (1 to 128 of letters, digits and -_.:@)"
            )));
        }
        if ![setpoint, hysteresis, min_setpoint, max_setpoint]
            .iter()
            .all(|v| v.is_finite())
        {
            return Err(Error::invalid_config("temperatures must be finite numbers"));
        }
        if hysteresis < 0.0 {
            return Err(Error::invalid_config(format!(
                "hysteresis must be >= 0, got {hysteresis}"
            )));
        }
        if min_setpoint > max_setpoint {
            return Err(Error::invalid_config(format!(
                "min_setpoint {min_setpoint} is above max_setpoint {max_setpoint}"
            )));
        }
        if !(min_setpoint..=max_setpoint).contains(&setpoint) {
            return Err(Error::invalid_config(format!(
                "setpoint {setpoint} is outside {min_setpoint}..={max_setpoint}"
            )));
        }
        Ok(Thermostat {
            device_id: device_id.to_owned(),
            setpoint,
            hysteresis,
            min_setpoint,
            max_setpoint,
            mode,
            heating: false,
            last_celsius: None,
            last_reading_at_ms: None,
            readings: 0,
            online: true,
            offline_after_ms,
            commands,
            room,
        })
    }

    fn handle(&self, ctx: &Context, event: Event) -> Result<Vec<Transition>, Error> {
        let mut out = Vec::new();
        match event {
            Event::Reading { celsius } => {
                if !celsius.is_finite() || celsius < ABSOLUTE_ZERO {
                    return Err(Error::new(
                        INVALID_READING,
                        format!("{celsius} °C is not a possible temperature"),
                    ));
                }
                out.push(Transition::TemperatureRecorded {
                    celsius,
                    at_ms: ctx.at_ms(),
                });
                if !self.online {
                    out.push(Transition::BackOnline);
                }
                if let Some(after) = self.offline_after_ms {
                    // Replaces the pending one: it fires only after `after` ms of silence.
                    ctx.set_timer(
                        HEARTBEAT,
                        Timer::after_ms(after),
                        &serde_json::json!({"type": "silent"}),
                    );
                }
            }
            Event::Silent => {
                if !matches!(ctx.origin(), Origin::Timer { .. }) {
                    return Err(Error::new(
                        codes::INVALID_EVENT,
                        "`silent` comes from the heartbeat timer, not from outside",
                    ));
                }
                if self.online {
                    out.push(Transition::WentOffline { at_ms: ctx.at_ms() });
                }
            }
            Event::SetPoint { celsius } => {
                if !(self.min_setpoint..=self.max_setpoint).contains(&celsius) {
                    return Err(Error::out_of_range(format!(
                        "setpoint {celsius} °C is outside {}..={} °C",
                        self.min_setpoint, self.max_setpoint
                    )));
                }
                if celsius != self.setpoint {
                    out.push(Transition::SetpointChanged { celsius });
                }
            }
            Event::Mode { mode } => {
                if mode != self.mode {
                    out.push(Transition::ModeChanged { mode });
                }
            }
        }

        // Decide the heating on the state these transitions lead to.
        let mut next = self.clone();
        for t in &out {
            next.apply(t.clone());
        }
        let (switch, what) = match (next.heating, next.wants_heating()) {
            (false, true) => (Transition::HeatingOn, "on"),
            (true, false) => (Transition::HeatingOff, "off"),
            _ => {
                next.report(ctx, &out);
                return Ok(out);
            }
        };
        match next.last_celsius {
            // Debug, not info: a fleet's thermostats switch all day long, and every line
            // costs a host call and, when enabled, a log write.
            Some(t) => log::debug(format_args!(
                "heating {what}: {t} °C, setpoint {} °C",
                next.setpoint
            )),
            None => log::debug(format_args!("heating {what}")),
        }
        if self.commands {
            ctx.command(&serde_json::json!({"heating": what == "on"}));
        }
        next.apply(switch.clone());
        out.push(switch);
        next.report(ctx, &out);
        Ok(out)
    }

    fn apply(&mut self, transition: Transition) {
        match transition {
            Transition::TemperatureRecorded { celsius, at_ms } => {
                self.last_celsius = Some(celsius);
                self.last_reading_at_ms = Some(at_ms);
                self.readings += 1;
            }
            Transition::SetpointChanged { celsius } => self.setpoint = celsius,
            Transition::ModeChanged { mode } => self.mode = mode,
            Transition::HeatingOn => self.heating = true,
            Transition::HeatingOff => self.heating = false,
            Transition::WentOffline { .. } => self.online = false,
            Transition::BackOnline => self.online = true,
        }
    }
}

impl Thermostat {
    /// Reports this state (the one `transitions` lead to) to the room, if there is one and
    /// anything changed.
    fn report(&self, ctx: &Context, transitions: &[Transition]) {
        let Some(room) = &self.room else { return };
        if transitions.is_empty() {
            return;
        }
        ctx.send(
            room.clone(),
            &serde_json::json!({
                "type": "report",
                "device": self.device_id,
                "celsius": self.last_celsius,
                "heating": self.heating,
                "online": self.online,
            }),
        );
    }
}

drover_guest::export_device!(Thermostat);

#[cfg(test)]
mod tests {
    use super::*;
    use drover_guest::{Instance, codes, serde_json};

    fn config() -> Config {
        Config {
            setpoint: 21.0,
            hysteresis: 0.5,
            min_setpoint: 5.0,
            max_setpoint: 30.0,
            mode: Mode::Heat,
            offline_after_ms: None,
            commands: false,
            room: None,
        }
    }

    fn ctx(seq: u64) -> Context {
        Context::new("t-1", seq, 1_700_000_000_000 + seq * 1000, 0)
    }

    /// Handles an event like the host does live and returns the transitions.
    fn send(t: &mut Thermostat, seq: u64, event: Event) -> Result<Vec<Transition>, Error> {
        let out = t.handle(&ctx(seq), event)?;
        for tr in &out {
            t.apply(tr.clone());
        }
        Ok(out)
    }

    fn reading(celsius: f64) -> Event {
        Event::Reading { celsius }
    }

    #[test]
    fn heating_follows_hysteresis() {
        let mut t = Thermostat::init("t-1", config()).unwrap();
        // inside the band with heating off: stays off
        assert_eq!(
            send(&mut t, 1, reading(20.7)).unwrap(),
            [Transition::TemperatureRecorded {
                celsius: 20.7,
                at_ms: 1_700_000_001_000
            }]
        );
        // below setpoint - h: on
        assert_eq!(
            send(&mut t, 2, reading(20.4)).unwrap()[1..],
            [Transition::HeatingOn]
        );
        assert!(t.heating);
        // back inside the band: stays on (no flapping)
        assert_eq!(send(&mut t, 3, reading(21.4)).unwrap().len(), 1);
        assert!(t.heating);
        // exactly at setpoint + h: still on
        assert_eq!(send(&mut t, 4, reading(21.5)).unwrap().len(), 1);
        // above setpoint + h: off
        assert_eq!(
            send(&mut t, 5, reading(21.6)).unwrap()[1..],
            [Transition::HeatingOff]
        );
        assert!(!t.heating);
        assert_eq!(t.readings, 5);
        assert_eq!(t.last_celsius, Some(21.6));
        assert_eq!(t.last_reading_at_ms, Some(1_700_000_005_000));
    }

    #[test]
    fn setpoint_changes_switch_heating_against_last_reading() {
        let mut t = Thermostat::init("t-1", config()).unwrap();
        // no reading yet: a setpoint change cannot decide anything
        assert_eq!(
            send(&mut t, 1, Event::SetPoint { celsius: 25.0 }).unwrap(),
            [Transition::SetpointChanged { celsius: 25.0 }]
        );
        send(&mut t, 2, reading(24.0)).unwrap();
        assert!(t.heating);
        assert_eq!(
            send(&mut t, 3, Event::SetPoint { celsius: 18.0 }).unwrap(),
            [
                Transition::SetpointChanged { celsius: 18.0 },
                Transition::HeatingOff
            ]
        );
        // same setpoint again: nothing to record
        assert!(
            send(&mut t, 4, Event::SetPoint { celsius: 18.0 })
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn mode_off_stops_heating_and_heat_resumes_it() {
        let mut t = Thermostat::init("t-1", config()).unwrap();
        send(&mut t, 1, reading(15.0)).unwrap();
        assert!(t.heating);
        assert_eq!(
            send(&mut t, 2, Event::Mode { mode: Mode::Off }).unwrap(),
            [
                Transition::ModeChanged { mode: Mode::Off },
                Transition::HeatingOff
            ]
        );
        // readings while off never heat
        assert_eq!(send(&mut t, 3, reading(10.0)).unwrap().len(), 1);
        assert!(!t.heating);
        assert!(
            send(&mut t, 4, Event::Mode { mode: Mode::Off })
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            send(&mut t, 5, Event::Mode { mode: Mode::Heat }).unwrap(),
            [
                Transition::ModeChanged { mode: Mode::Heat },
                Transition::HeatingOn
            ]
        );
    }

    #[test]
    fn refuses_bad_values() {
        let t = Thermostat::init("t-1", config()).unwrap();
        for celsius in [4.9, 30.1, f64::NAN, f64::INFINITY] {
            let err = t.handle(&ctx(1), Event::SetPoint { celsius }).unwrap_err();
            assert_eq!(err.code, codes::OUT_OF_RANGE, "{celsius}");
        }
        for celsius in [f64::NAN, f64::NEG_INFINITY, -300.0] {
            let err = t.handle(&ctx(1), reading(celsius)).unwrap_err();
            assert_eq!(err.code, INVALID_READING, "{celsius}");
        }
        // the boundaries are accepted
        assert!(t.handle(&ctx(1), Event::SetPoint { celsius: 5.0 }).is_ok());
        assert!(t.handle(&ctx(1), Event::SetPoint { celsius: 30.0 }).is_ok());
    }

    #[test]
    fn refuses_bad_configs() {
        let bad = [
            Config {
                hysteresis: -1.0,
                ..config()
            },
            Config {
                min_setpoint: 25.0,
                max_setpoint: 20.0,
                ..config()
            },
            Config {
                setpoint: 40.0,
                ..config()
            },
            Config {
                setpoint: f64::NAN,
                ..config()
            },
        ];
        for c in bad {
            let err = Thermostat::init("t-1", c.clone()).unwrap_err();
            assert_eq!(err.code, codes::INVALID_CONFIG, "{c:?}");
        }
    }

    #[test]
    fn json_shapes_through_the_host_boundary() {
        let mut i = Instance::<Thermostat>::new();
        // no config at all: every field defaults
        i.init("t-1", "").unwrap();
        assert_eq!(i.state().unwrap().setpoint, 20.0);
        i.init("t-1", r#"{"setpoint": 21, "hysteresis": 0.5}"#)
            .unwrap();
        assert_eq!(
            i.handle_and_apply(&ctx(1), r#"{"type":"reading","celsius":19.5}"#)
                .unwrap(),
            [
                r#"{"type":"temperature_recorded","celsius":19.5,"at_ms":1700000001000}"#,
                r#"{"type":"heating_on"}"#
            ]
        );
        assert_eq!(
            i.handle_and_apply(&ctx(2), r#"{"type":"set_point","celsius":22}"#)
                .unwrap(),
            [r#"{"type":"setpoint_changed","celsius":22.0}"#]
        );
        assert_eq!(
            i.handle_and_apply(&ctx(3), r#"{"type":"mode","mode":"off"}"#)
                .unwrap(),
            [
                r#"{"type":"mode_changed","mode":"off"}"#,
                r#"{"type":"heating_off"}"#
            ]
        );
        let state: serde_json::Value = serde_json::from_str(&i.query()).unwrap();
        assert_eq!(
            state,
            serde_json::json!({
                "device_id": "t-1", "setpoint": 22.0, "hysteresis": 0.5,
                "min_setpoint": 5.0, "max_setpoint": 30.0, "mode": "off", "heating": false,
                "last_celsius": 19.5, "last_reading_at_ms": 1_700_000_001_000u64, "readings": 1,
                "online": true
            })
        );

        for bad in [
            r#"{"type":"reading"}"#,
            r#"{"type":"reading","celsius":"warm"}"#,
            r#"{"type":"mode","mode":"cool"}"#,
            r#"{"celsius":20}"#,
        ] {
            assert_eq!(
                i.handle(&ctx(4), bad).unwrap_err().code,
                codes::INVALID_EVENT,
                "{bad}"
            );
        }
        let err = i.init("t-2", r#"{"set_point": 21}"#).unwrap_err();
        assert_eq!(err.code, codes::INVALID_CONFIG);
        assert!(err.message.contains("set_point"), "{err}");
    }

    #[test]
    fn replay_from_snapshot_equals_live_state() {
        let mut live = Instance::<Thermostat>::new();
        live.init("t-1", "{}").unwrap();
        let mut journal = Vec::new();
        for (seq, celsius) in [19.0, 19.2, 20.6, 21.0, 18.9].into_iter().enumerate() {
            let event = format!(r#"{{"type":"reading","celsius":{celsius}}}"#);
            journal.extend(live.handle_and_apply(&ctx(seq as u64), &event).unwrap());
        }
        let mut replayed = Instance::<Thermostat>::new();
        replayed.init("t-1", "{}").unwrap();
        for t in &journal {
            replayed.apply(t).unwrap();
        }
        assert_eq!(replayed.snapshot(), live.snapshot());

        let mut restored = Instance::<Thermostat>::new();
        restored.restore(&live.snapshot()).unwrap();
        assert_eq!(restored.state(), live.state());
    }

    #[test]
    fn effects_heartbeat_timer_commands_and_room_reports() {
        let mut t = Thermostat::init(
            "t-1",
            Config {
                offline_after_ms: Some(60_000),
                commands: true,
                room: Some("hall".into()),
                ..config()
            },
        )
        .unwrap();
        let c = ctx(1);
        let out = t.handle(&c, Event::Reading { celsius: 18.0 }).unwrap();
        assert_eq!(out.last(), Some(&Transition::HeatingOn));
        let effects = c.effects();
        assert_eq!(effects.len(), 3, "{effects:?}");
        assert!(matches!(
            &effects[0],
            drover_guest::Effect::SetTimer { key, due_ms, every_ms: None, event }
                if key == HEARTBEAT && *due_ms == c.at_ms() + 60_000 && event == r#"{"type":"silent"}"#
        ));
        assert!(
            matches!(&effects[1], drover_guest::Effect::Command { payload, .. } if payload == r#"{"heating":true}"#)
        );
        let drover_guest::Effect::Send { to, event } = &effects[2] else {
            panic!("{effects:?}")
        };
        assert_eq!(to, "hall");
        let report: serde_json::Value = serde_json::from_str(event).unwrap();
        assert_eq!(report["heating"], true);
        assert_eq!(report["celsius"], 18.0);
        for tr in out {
            t.apply(tr);
        }

        // Silence: the timer delivers `silent`; from outside it is refused.
        let err = t.handle(&ctx(2), Event::Silent).unwrap_err();
        assert_eq!(err.code, codes::INVALID_EVENT);
        let fired = ctx(2).with_origin(Origin::Timer {
            key: HEARTBEAT.into(),
            due_ms: 1,
            missed: 0,
        });
        let out = t.handle(&fired, Event::Silent).unwrap();
        assert_eq!(
            out,
            [Transition::WentOffline {
                at_ms: fired.at_ms()
            }]
        );
        assert!(matches!(
            &fired.effects()[..],
            [drover_guest::Effect::Send { .. }]
        ));
        t.apply(out[0].clone());
        assert!(!t.online);
        let out = send(&mut t, 3, Event::Reading { celsius: 18.5 }).unwrap();
        assert!(out.contains(&Transition::BackOnline));
        assert!(t.online);

        // A room that could not be a device id is refused at provisioning, not at every report.
        for room in ["", "a/b", ".."] {
            let err = Thermostat::init(
                "t-1",
                Config {
                    room: Some(room.into()),
                    ..config()
                },
            )
            .unwrap_err();
            assert_eq!(err.code, codes::INVALID_CONFIG, "{room:?}");
        }
    }
}
