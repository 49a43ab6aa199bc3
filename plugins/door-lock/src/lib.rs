//! A smart door lock with a PIN code, lockout, forced-entry and low-battery alarms, as a
//! Drover device behavior.
//!
//! - `unlock` needs the PIN from the config. A wrong PIN is **recorded**, not refused: it
//!   yields an `unlock_failed` transition with the count of consecutive failures, and the
//!   `max_attempts`-th one also yields `locked_out`. (A refusal could not be counted: a refused
//!   event leaves no trace in the journal, and the count must survive restarts and replay.)
//! - While locked out, `unlock` is refused with `locked-out`. The lockout ends `lockout_ms`
//!   after it started, measured with the event context's time (the next `unlock` after that
//!   yields `lockout_ended` first). A correct PIN resets the failure count.
//! - `lock` is refused with `door-open` while the door is open.
//! - The door sensor opening the door while the lock is locked raises `forced_entry`.
//! - Battery reports below `low_battery_percent` raise `low_battery` once; a report at or above
//!   it afterwards yields `battery_ok`.
//!
//! Repeated reports of the current condition (lock when locked, door_opened when open)
//! yield no transition.
//!
//! # Config
//!
//! ```json
//! {"code": "4711", "max_attempts": 3, "lockout_ms": 300000, "low_battery_percent": 20, "locked": true}
//! ```
//!
//! | field | default | meaning |
//! | --- | --- | --- |
//! | `code` | required | the PIN: 4 to 12 ASCII digits |
//! | `max_attempts` | `3` | consecutive wrong PINs that trigger a lockout, `>= 1` |
//! | `lockout_ms` | `300000` | how long a lockout lasts, ms |
//! | `low_battery_percent` | `20` | battery level below which the alarm is raised, `0..=100` |
//! | `locked` | `true` | whether the lock starts locked |
//!
//! Unknown fields are refused (`invalid-config`).
//!
//! # Events
//!
//! ```json
//! {"type": "lock"}
//! {"type": "unlock", "code": "4711"}
//! {"type": "door_opened"}
//! {"type": "door_closed"}
//! {"type": "battery", "percent": 15}
//! ```
//!
//! Refusals (error codes): `locked-out`, `door-open`, `out-of-range` (battery above 100),
//! `invalid-event` (does not parse).
//!
//! # Transitions
//!
//! ```json
//! {"type": "locked"}
//! {"type": "unlocked"}
//! {"type": "unlock_failed", "attempts": 2}
//! {"type": "locked_out", "until_ms": 1700000300000}
//! {"type": "lockout_ended"}
//! {"type": "door_opened"}
//! {"type": "door_closed"}
//! {"type": "forced_entry"}
//! {"type": "battery_reported", "percent": 15}
//! {"type": "low_battery", "percent": 15}
//! {"type": "battery_ok", "percent": 80}
//! ```
//!
//! # State (what `GET /v1/devices/{id}` shows)
//!
//! The PIN is part of the snapshot but never of the queried state. It is not a secret from
//! API clients all the same: the host shows every device's provisioning config (here the PIN)
//! in `GET /v1/devices/{id}`, and the journal API shows each `unlock` event as sent, PIN
//! included. Anyone who can read the API can read the PIN; protect the API accordingly.
//!
//! ```json
//! {"device_id": "front-door", "locked": true, "door_open": false, "failed_attempts": 0,
//!  "locked_out_until_ms": null, "battery_percent": 80, "low_battery": false,
//!  "forced_entries": 0, "max_attempts": 3, "lockout_ms": 300000, "low_battery_percent": 20}
//! ```
#![warn(missing_docs)]

use drover_guest::serde_json::{self, Value};
use drover_guest::{Context, Device, Error, log};
use serde::{Deserialize, Serialize};

/// Error code: `unlock` while a lockout is running.
pub const LOCKED_OUT: &str = "locked-out";
/// Error code: `lock` while the door is open.
pub const DOOR_OPEN: &str = "door-open";

/// The lock's state (its snapshot; the queried JSON omits `code`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoorLock {
    /// The device id given at provisioning.
    pub device_id: String,
    /// The PIN.
    pub code: String,
    /// Consecutive wrong PINs that trigger a lockout.
    pub max_attempts: u32,
    /// How long a lockout lasts, ms.
    pub lockout_ms: u64,
    /// Battery level below which the alarm is raised, percent.
    pub low_battery_percent: u8,
    /// Whether the bolt is locked.
    pub locked: bool,
    /// Whether the door sensor reports the door open.
    pub door_open: bool,
    /// Consecutive wrong PINs so far.
    pub failed_attempts: u32,
    /// End of the running lockout (host time, ms since the Unix epoch), if any.
    pub locked_out_until_ms: Option<u64>,
    /// The last reported battery level, percent.
    pub battery_percent: Option<u8>,
    /// Whether the low-battery alarm is raised.
    pub low_battery: bool,
    /// How many forced entries were detected.
    pub forced_entries: u64,
}

/// Provisioning configuration; see the crate docs for the JSON.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The PIN: 4 to 12 ASCII digits.
    pub code: String,
    /// Consecutive wrong PINs that trigger a lockout.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// How long a lockout lasts, ms.
    #[serde(default = "default_lockout_ms")]
    pub lockout_ms: u64,
    /// Battery level below which the alarm is raised, percent.
    #[serde(default = "default_low_battery_percent")]
    pub low_battery_percent: u8,
    /// Whether the lock starts locked.
    #[serde(default = "default_locked")]
    pub locked: bool,
}

fn default_max_attempts() -> u32 {
    3
}
fn default_lockout_ms() -> u64 {
    300_000
}
fn default_low_battery_percent() -> u8 {
    20
}
fn default_locked() -> bool {
    true
}

/// An incoming event; see the crate docs for the JSON.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// Lock the bolt (no PIN needed).
    Lock,
    /// Unlock the bolt with a PIN.
    Unlock {
        /// The PIN entered.
        code: String,
    },
    /// The door sensor saw the door open.
    DoorOpened,
    /// The door sensor saw the door close.
    DoorClosed,
    /// A battery level report.
    Battery {
        /// Battery level, percent (`0..=100`).
        percent: u8,
    },
}

/// A state change; see the crate docs for the JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Transition {
    /// The bolt was locked.
    Locked,
    /// The bolt was unlocked (or a correct PIN reset the failure count).
    Unlocked,
    /// A wrong PIN was entered.
    UnlockFailed {
        /// Consecutive wrong PINs, this one included.
        attempts: u32,
    },
    /// Alarm: too many wrong PINs; `unlock` is refused until `until_ms`.
    LockedOut {
        /// End of the lockout (host time, ms since the Unix epoch).
        until_ms: u64,
    },
    /// The lockout is over; the failure count starts again from zero.
    LockoutEnded,
    /// The door opened.
    DoorOpened,
    /// The door closed.
    DoorClosed,
    /// Alarm: the door opened while locked.
    ForcedEntry,
    /// A battery level was reported.
    BatteryReported {
        /// Battery level, percent.
        percent: u8,
    },
    /// Alarm: the battery fell below the threshold.
    LowBattery {
        /// Battery level, percent.
        percent: u8,
    },
    /// The battery is back at or above the threshold.
    BatteryOk {
        /// Battery level, percent.
        percent: u8,
    },
}

impl Device for DoorLock {
    type Config = Config;
    type Event = Event;
    type Transition = Transition;

    fn init(device_id: &str, config: Config) -> Result<Self, Error> {
        let Config {
            code,
            max_attempts,
            lockout_ms,
            low_battery_percent,
            locked,
        } = config;
        if !(4..=12).contains(&code.len()) || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::invalid_config("code must be 4 to 12 digits"));
        }
        if max_attempts == 0 {
            return Err(Error::invalid_config("max_attempts must be at least 1"));
        }
        if low_battery_percent > 100 {
            return Err(Error::invalid_config(format!(
                "low_battery_percent must be 0..=100, got {low_battery_percent}"
            )));
        }
        Ok(DoorLock {
            device_id: device_id.to_owned(),
            code,
            max_attempts,
            lockout_ms,
            low_battery_percent,
            locked,
            door_open: false,
            failed_attempts: 0,
            locked_out_until_ms: None,
            battery_percent: None,
            low_battery: false,
            forced_entries: 0,
        })
    }

    fn handle(&self, ctx: &Context, event: Event) -> Result<Vec<Transition>, Error> {
        // Decisions look at the state the earlier transitions of this event lead to.
        let mut next = self.clone();
        let mut out = Vec::new();
        let mut emit = |next: &mut DoorLock, t: Transition| {
            next.apply(t.clone());
            out.push(t);
        };
        match event {
            Event::Lock => {
                if next.door_open {
                    return Err(Error::new(DOOR_OPEN, "cannot lock while the door is open"));
                }
                if !next.locked {
                    emit(&mut next, Transition::Locked);
                }
            }
            Event::Unlock { code } => {
                if let Some(until) = next.locked_out_until_ms {
                    if ctx.at_ms() < until {
                        let secs = (until - ctx.at_ms()).div_ceil(1000);
                        return Err(Error::new(
                            LOCKED_OUT,
                            format!("too many wrong codes; try again in {secs} s"),
                        ));
                    }
                    emit(&mut next, Transition::LockoutEnded);
                }
                if code_matches(&code, &next.code) {
                    if next.locked || next.failed_attempts > 0 {
                        emit(&mut next, Transition::Unlocked);
                    }
                } else {
                    let attempts = next.failed_attempts + 1;
                    emit(&mut next, Transition::UnlockFailed { attempts });
                    if attempts >= next.max_attempts {
                        let until_ms = ctx.at_ms().saturating_add(next.lockout_ms);
                        log::warn(format_args!("{attempts} wrong codes: locked out"));
                        emit(&mut next, Transition::LockedOut { until_ms });
                    }
                }
            }
            Event::DoorOpened => {
                if !next.door_open {
                    emit(&mut next, Transition::DoorOpened);
                    if next.locked {
                        log::warn("door opened while locked: forced entry");
                        emit(&mut next, Transition::ForcedEntry);
                    }
                }
            }
            Event::DoorClosed => {
                if next.door_open {
                    emit(&mut next, Transition::DoorClosed);
                }
            }
            Event::Battery { percent } => {
                if percent > 100 {
                    return Err(Error::out_of_range(format!(
                        "battery level {percent}% is above 100%"
                    )));
                }
                emit(&mut next, Transition::BatteryReported { percent });
                let low = percent < next.low_battery_percent;
                if low && !next.low_battery {
                    emit(&mut next, Transition::LowBattery { percent });
                } else if !low && next.low_battery {
                    emit(&mut next, Transition::BatteryOk { percent });
                }
            }
        }
        Ok(out)
    }

    fn apply(&mut self, transition: Transition) {
        match transition {
            Transition::Locked => self.locked = true,
            Transition::Unlocked => {
                self.locked = false;
                self.failed_attempts = 0;
            }
            Transition::UnlockFailed { attempts } => self.failed_attempts = attempts,
            Transition::LockedOut { until_ms } => self.locked_out_until_ms = Some(until_ms),
            Transition::LockoutEnded => {
                self.locked_out_until_ms = None;
                self.failed_attempts = 0;
            }
            Transition::DoorOpened => self.door_open = true,
            Transition::DoorClosed => self.door_open = false,
            Transition::ForcedEntry => self.forced_entries += 1,
            Transition::BatteryReported { percent } => self.battery_percent = Some(percent),
            Transition::LowBattery { .. } => self.low_battery = true,
            Transition::BatteryOk { .. } => self.low_battery = false,
        }
    }

    /// The state without the PIN: reads are for dashboards, not for secrets.
    fn query(&self) -> Value {
        let mut state = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(fields) = &mut state {
            fields.remove("code");
        }
        state
    }
}

/// Compares PINs without stopping at the first differing digit.
fn code_matches(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

drover_guest::export_device!(DoorLock);

#[cfg(test)]
mod tests {
    use super::*;
    use drover_guest::{Instance, codes};

    const T0: u64 = 1_700_000_000_000;

    fn config() -> Config {
        Config {
            code: "4711".into(),
            max_attempts: 3,
            lockout_ms: 60_000,
            low_battery_percent: 20,
            locked: true,
        }
    }

    fn at(ms: u64) -> Context {
        Context::new("front-door", 1, T0 + ms, 0)
    }

    fn send(d: &mut DoorLock, ms: u64, event: Event) -> Result<Vec<Transition>, Error> {
        let out = d.handle(&at(ms), event)?;
        for t in &out {
            d.apply(t.clone());
        }
        Ok(out)
    }

    fn unlock(code: &str) -> Event {
        Event::Unlock { code: code.into() }
    }

    #[test]
    fn lock_and_unlock() {
        let mut d = DoorLock::init("front-door", config()).unwrap();
        assert!(d.locked);
        assert_eq!(
            send(&mut d, 0, unlock("4711")).unwrap(),
            [Transition::Unlocked]
        );
        assert!(!d.locked);
        assert!(send(&mut d, 1, unlock("4711")).unwrap().is_empty());
        assert_eq!(send(&mut d, 2, Event::Lock).unwrap(), [Transition::Locked]);
        assert!(send(&mut d, 3, Event::Lock).unwrap().is_empty());
        assert!(d.locked);
    }

    #[test]
    fn wrong_codes_count_and_lock_out() {
        let mut d = DoorLock::init("front-door", config()).unwrap();
        assert_eq!(
            send(&mut d, 0, unlock("0000")).unwrap(),
            [Transition::UnlockFailed { attempts: 1 }]
        );
        assert_eq!(
            send(&mut d, 1, unlock("47111")).unwrap(),
            [Transition::UnlockFailed { attempts: 2 }]
        );
        assert_eq!(
            send(&mut d, 2, unlock("")).unwrap(),
            [
                Transition::UnlockFailed { attempts: 3 },
                Transition::LockedOut {
                    until_ms: T0 + 60_002
                }
            ]
        );
        assert!(d.locked);

        // even the right code is refused during the lockout, and nothing is recorded
        let err = send(&mut d, 30_000, unlock("4711")).unwrap_err();
        assert_eq!(err.code, LOCKED_OUT);
        assert!(err.message.contains("31 s"), "{err}");
        assert_eq!(d.failed_attempts, 3);

        // after it, the next unlock ends the lockout and proceeds
        assert_eq!(
            send(&mut d, 60_002, unlock("4711")).unwrap(),
            [Transition::LockoutEnded, Transition::Unlocked]
        );
        assert_eq!(
            (d.locked, d.failed_attempts, d.locked_out_until_ms),
            (false, 0, None)
        );
    }

    #[test]
    fn a_wrong_code_after_a_lockout_starts_counting_again() {
        let mut d = DoorLock::init(
            "front-door",
            Config {
                max_attempts: 1,
                ..config()
            },
        )
        .unwrap();
        send(&mut d, 0, unlock("1111")).unwrap();
        assert_eq!(
            send(&mut d, 60_000, unlock("2222")).unwrap(),
            [
                Transition::LockoutEnded,
                Transition::UnlockFailed { attempts: 1 },
                Transition::LockedOut {
                    until_ms: T0 + 120_000
                }
            ]
        );
    }

    #[test]
    fn a_correct_code_resets_the_failure_count() {
        let mut d = DoorLock::init("front-door", config()).unwrap();
        send(&mut d, 0, unlock("0000")).unwrap();
        send(&mut d, 1, unlock("0000")).unwrap();
        send(&mut d, 2, unlock("4711")).unwrap();
        assert_eq!(d.failed_attempts, 0);
        // also when already unlocked
        send(&mut d, 3, unlock("0000")).unwrap();
        assert_eq!(
            send(&mut d, 4, unlock("4711")).unwrap(),
            [Transition::Unlocked]
        );
        assert_eq!(d.failed_attempts, 0);
    }

    #[test]
    fn door_sensor_and_forced_entry() {
        let mut d = DoorLock::init("front-door", config()).unwrap();
        assert_eq!(
            send(&mut d, 0, Event::DoorOpened).unwrap(),
            [Transition::DoorOpened, Transition::ForcedEntry]
        );
        assert!(send(&mut d, 1, Event::DoorOpened).unwrap().is_empty());
        assert_eq!(d.forced_entries, 1);
        assert_eq!(
            send(&mut d, 2, Event::DoorClosed).unwrap(),
            [Transition::DoorClosed]
        );
        assert!(send(&mut d, 3, Event::DoorClosed).unwrap().is_empty());

        send(&mut d, 4, unlock("4711")).unwrap();
        assert_eq!(
            send(&mut d, 5, Event::DoorOpened).unwrap(),
            [Transition::DoorOpened]
        );
        let err = send(&mut d, 6, Event::Lock).unwrap_err();
        assert_eq!(err.code, DOOR_OPEN);
        send(&mut d, 7, Event::DoorClosed).unwrap();
        assert_eq!(send(&mut d, 8, Event::Lock).unwrap(), [Transition::Locked]);
        assert_eq!(d.forced_entries, 1);
    }

    #[test]
    fn battery_alarm_is_raised_once_and_cleared() {
        let mut d = DoorLock::init("front-door", config()).unwrap();
        let battery = |percent| Event::Battery { percent };
        assert_eq!(
            send(&mut d, 0, battery(80)).unwrap(),
            [Transition::BatteryReported { percent: 80 }]
        );
        assert_eq!(
            send(&mut d, 1, battery(19)).unwrap(),
            [
                Transition::BatteryReported { percent: 19 },
                Transition::LowBattery { percent: 19 }
            ]
        );
        assert_eq!(send(&mut d, 2, battery(12)).unwrap().len(), 1);
        assert!(d.low_battery);
        assert_eq!(
            send(&mut d, 3, battery(20)).unwrap(),
            [
                Transition::BatteryReported { percent: 20 },
                Transition::BatteryOk { percent: 20 }
            ]
        );
        assert!(!d.low_battery);
        assert_eq!(d.battery_percent, Some(20));
        assert_eq!(
            send(&mut d, 4, battery(101)).unwrap_err().code,
            codes::OUT_OF_RANGE
        );
    }

    #[test]
    fn refuses_bad_configs() {
        for c in [
            Config {
                code: "12a4".into(),
                ..config()
            },
            Config {
                code: "123".into(),
                ..config()
            },
            Config {
                max_attempts: 0,
                ..config()
            },
            Config {
                low_battery_percent: 101,
                ..config()
            },
        ] {
            let err = DoorLock::init("front-door", c.clone()).unwrap_err();
            assert_eq!(err.code, codes::INVALID_CONFIG, "{c:?}");
        }
        let err = Instance::<DoorLock>::new().init("d", "{}").unwrap_err();
        assert_eq!(err.code, codes::INVALID_CONFIG);
        assert!(err.message.contains("code"), "{err}");
    }

    #[test]
    fn json_shapes_and_query_hides_the_code() {
        let mut i = Instance::<DoorLock>::new();
        i.init("front-door", r#"{"code": "4711", "max_attempts": 2}"#)
            .unwrap();
        let ctx = at(0);
        let mut send = |event: &str| i.handle_and_apply(&ctx, event);
        assert_eq!(
            send(r#"{"type":"unlock","code":"1"}"#).unwrap(),
            [r#"{"type":"unlock_failed","attempts":1}"#]
        );
        assert_eq!(
            send(r#"{"type":"unlock","code":"2"}"#).unwrap(),
            [
                r#"{"type":"unlock_failed","attempts":2}"#,
                r#"{"type":"locked_out","until_ms":1700000300000}"#
            ]
        );
        assert_eq!(
            send(r#"{"type":"door_opened"}"#).unwrap(),
            [r#"{"type":"door_opened"}"#, r#"{"type":"forced_entry"}"#]
        );
        assert_eq!(
            send(r#"{"type":"battery","percent":5}"#).unwrap(),
            [
                r#"{"type":"battery_reported","percent":5}"#,
                r#"{"type":"low_battery","percent":5}"#
            ]
        );
        for bad in [
            r#"{"type":"unlock"}"#,
            r#"{"type":"battery","percent":-1}"#,
            r#"{"type":"open_sesame"}"#,
        ] {
            assert_eq!(send(bad).unwrap_err().code, codes::INVALID_EVENT, "{bad}");
        }

        let state: Value = serde_json::from_str(&i.query()).unwrap();
        assert_eq!(
            state,
            serde_json::json!({
                "device_id": "front-door", "locked": true, "door_open": true,
                "failed_attempts": 2, "locked_out_until_ms": 1_700_000_300_000u64,
                "battery_percent": 5, "low_battery": true, "forced_entries": 1,
                "max_attempts": 2, "lockout_ms": 300_000, "low_battery_percent": 20
            })
        );
        // the snapshot keeps it, so a restored lock still knows its PIN
        let mut restored = Instance::<DoorLock>::new();
        restored.restore(&i.snapshot()).unwrap();
        assert_eq!(restored.state().unwrap().code, "4711");
        assert_eq!(restored.state(), i.state());
    }
}
