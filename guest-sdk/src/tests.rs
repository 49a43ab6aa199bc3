use serde::{Deserialize, Serialize};

use crate::{Context, Device, Error, Instance, codes};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Light {
    id: String,
    on: bool,
    switches: u64,
    #[serde(default)]
    last_at_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LightConfig {
    #[serde(default)]
    on: bool,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum LightEvent {
    Switch { on: bool },
    Explode,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum LightTransition {
    Switched { on: bool, at_ms: u64 },
}

impl Device for Light {
    type Config = LightConfig;
    type Event = LightEvent;
    type Transition = LightTransition;

    fn init(device_id: &str, config: LightConfig) -> Result<Self, Error> {
        if device_id.is_empty() {
            return Err(Error::invalid_config("empty device id"));
        }
        Ok(Light {
            id: device_id.to_owned(),
            on: config.on,
            switches: 0,
            last_at_ms: None,
        })
    }

    fn handle(&self, ctx: &Context, event: LightEvent) -> Result<Vec<LightTransition>, Error> {
        match event {
            LightEvent::Switch { on } if on == self.on => Ok(vec![]),
            LightEvent::Switch { on } => Ok(vec![LightTransition::Switched {
                on,
                at_ms: ctx.at_ms(),
            }]),
            LightEvent::Explode => Err(Error::new("boom", "lights do not explode")),
        }
    }

    fn apply(&mut self, transition: LightTransition) {
        match transition {
            LightTransition::Switched { on, at_ms } => {
                self.on = on;
                self.switches += 1;
                self.last_at_ms = Some(at_ms);
            }
        }
    }
}

crate::export_device!(Light);

fn ctx(seq: u64) -> Context {
    Context::new("l-1", seq, 1_000 + seq, 7)
}

fn ready() -> Instance<Light> {
    let mut i = Instance::new();
    i.init("l-1", "{}").unwrap();
    i
}

#[test]
fn handle_then_apply_round_trips_json() {
    let mut i = ready();
    let out = i.handle(&ctx(1), r#"{"type":"switch","on":true}"#).unwrap();
    assert_eq!(out, [r#"{"type":"switched","on":true,"at_ms":1001}"#]);
    // handle alone does not change the state
    assert!(!i.state().unwrap().on);
    i.apply(&out[0]).unwrap();
    assert_eq!(
        i.state().unwrap(),
        &Light {
            id: "l-1".into(),
            on: true,
            switches: 1,
            last_at_ms: Some(1001)
        }
    );
    assert!(
        i.handle_and_apply(&ctx(2), r#"{"type":"switch","on":true}"#)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn apply_batch_applies_in_order_and_stops_at_the_first_refusal() {
    let switched = |on: bool, at: u64| format!(r#"{{"type":"switched","on":{on},"at_ms":{at}}}"#);
    let mut i = ready();
    i.apply_batch(&[switched(true, 1), switched(false, 2), switched(true, 3)])
        .unwrap();
    let state = i.state().unwrap();
    assert_eq!(
        (state.on, state.switches, state.last_at_ms),
        (true, 3, Some(3))
    );
    // Refused at index 1: the one before it is applied, it and the one after are not.
    let (index, err) = i
        .apply_batch(&[
            switched(false, 4),
            r#"{"type":"dimmed"}"#.into(),
            switched(true, 6),
        ])
        .unwrap_err();
    assert_eq!(index, 1);
    assert_eq!(err.code, codes::INVALID_TRANSITION, "{err}");
    let state = i.state().unwrap();
    assert_eq!(
        (state.on, state.switches, state.last_at_ms),
        (false, 4, Some(4))
    );
    assert_eq!(i.apply_batch::<&str>(&[]), Ok(()));
}

#[test]
fn malformed_inputs_become_typed_errors() {
    let mut i = ready();
    for bad in [
        "",
        "nope",
        "{}",
        r#"{"type":"dim"}"#,
        r#"{"type":"switch"}"#,
    ] {
        let err = i.handle(&ctx(1), bad).unwrap_err();
        assert_eq!(err.code, codes::INVALID_EVENT, "{bad}: {err}");
        assert!(err.message.starts_with("malformed event"), "{err}");
    }
    for bad in ["", "[]", r#"{"type":"switched","on":1}"#] {
        let err = i.apply(bad).unwrap_err();
        assert_eq!(err.code, codes::INVALID_TRANSITION, "{bad}: {err}");
    }
    let mut fresh = Instance::<Light>::new();
    for bad in ["[", r#"{"on":"yes"}"#, r#"{"colour":"red"}"#] {
        let err = fresh.init("l-1", bad).unwrap_err();
        assert_eq!(err.code, codes::INVALID_CONFIG, "{bad}: {err}");
    }
    // errors from the device itself pass through unchanged
    assert_eq!(
        i.handle(&ctx(1), r#"{"type":"explode"}"#).unwrap_err(),
        Error::new("boom", "lights do not explode")
    );
    assert_eq!(
        fresh.init("", "{}").unwrap_err().code,
        codes::INVALID_CONFIG
    );
}

#[test]
fn calls_before_init_are_errors_not_panics() {
    let mut i = Instance::<Light>::new();
    assert_eq!(
        i.handle(&ctx(1), r#"{"type":"switch","on":true}"#)
            .unwrap_err()
            .code,
        codes::NOT_INITIALIZED
    );
    assert_eq!(
        i.apply(r#"{"type":"switched","on":true,"at_ms":1}"#)
            .unwrap_err()
            .code,
        codes::NOT_INITIALIZED
    );
    assert_eq!(i.query(), "null");
    assert!(i.snapshot().is_empty());
    assert_eq!(i.restore(&[]).unwrap_err().code, codes::INVALID_SNAPSHOT);
}

#[test]
fn absent_config_reads_as_empty_object() {
    for absent in ["", "  ", "null"] {
        let mut i = Instance::<Light>::new();
        i.init("l-1", absent).unwrap();
        assert!(!i.state().unwrap().on);
    }
    let mut i = Instance::<Light>::new();
    i.init("l-1", r#"{"on":true}"#).unwrap();
    assert!(i.state().unwrap().on);
}

#[test]
fn snapshot_restore_and_query() {
    let mut i = ready();
    i.handle_and_apply(&ctx(1), r#"{"type":"switch","on":true}"#)
        .unwrap();
    let snap = i.snapshot();
    assert_eq!(
        std::str::from_utf8(&snap).unwrap(),
        r#"{"id":"l-1","on":true,"switches":1,"last_at_ms":1001}"#
    );
    // query goes through serde_json::Value, whose maps are sorted by key
    assert_eq!(
        i.query(),
        r#"{"id":"l-1","last_at_ms":1001,"on":true,"switches":1}"#
    );

    // restore works without init
    let mut j = Instance::<Light>::new();
    j.restore(&snap).unwrap();
    assert_eq!(j.state(), i.state());

    // an older snapshot without the defaulted field still restores
    j.restore(br#"{"id":"l-1","on":false,"switches":9}"#)
        .unwrap();
    assert_eq!(j.state().unwrap().switches, 9);

    // a bad snapshot is refused and the previous state kept
    let err = j.restore(b"\x00garbage").unwrap_err();
    assert_eq!(err.code, codes::INVALID_SNAPSHOT);
    assert_eq!(j.state().unwrap().switches, 9);
}

#[test]
fn init_again_resets_the_state() {
    let mut i = ready();
    i.handle_and_apply(&ctx(1), r#"{"type":"switch","on":true}"#)
        .unwrap();
    i.init("l-1", "{}").unwrap();
    assert_eq!(i.state().unwrap().switches, 0);
}

#[test]
fn context_and_error_accessors() {
    let c = Context::new("d", 1, 2, 3);
    assert_eq!(
        (c.device_id(), c.seq(), c.at_ms(), c.seed()),
        ("d", 1, 2, 3)
    );
    let e = Error::invalid("nope");
    assert_eq!(e.code, codes::INVALID_EVENT);
    assert_eq!(e.to_string(), "invalid-event: nope");
    assert_eq!(Error::out_of_range("x").code, codes::OUT_OF_RANGE);
    assert_eq!(Error::not_initialized().code, codes::NOT_INITIALIZED);
    crate::log::info(format_args!("{} {}", "log", "works natively"));
}

/// A device whose state holds a float it computes (a running sum), not one it reads.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Meter {
    total: f64,
}

#[derive(Deserialize)]
struct MeterEvent {
    value: f64,
}

#[derive(Serialize, Deserialize)]
struct Added {
    value: f64,
}

impl Device for Meter {
    type Config = serde_json::Value;
    type Event = MeterEvent;
    type Transition = Added;

    fn init(_: &str, _: serde_json::Value) -> Result<Self, Error> {
        Ok(Meter { total: 0.0 })
    }

    fn handle(&self, _: &Context, event: MeterEvent) -> Result<Vec<Added>, Error> {
        Ok(vec![Added { value: event.value }])
    }

    fn apply(&mut self, t: Added) {
        self.total += t.value * t.value;
    }
}

/// The default snapshot reads back as exactly the state it was taken of, computed floats
/// included: a device restored from it is the device its journal folds to. serde_json
/// without `float_roundtrip` read about one such float in twelve back one bit off.
#[test]
fn a_snapshot_restores_computed_floats_exactly() {
    let mut live = Instance::<Meter>::new();
    live.init("m-1", "{}").unwrap();
    for i in 0..2_000u64 {
        let value = 10.0 + (i * 7_919 % 3_001) as f64 / 100.0;
        let event = format!(r#"{{"value":{value}}}"#);
        live.handle_and_apply(&ctx(i + 1), &event).unwrap();
        let mut restored = Instance::<Meter>::new();
        restored.restore(&live.snapshot()).unwrap();
        let (a, b) = (live.state().unwrap().total, restored.state().unwrap().total);
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "after {} readings: {a} came back as {b}",
            i + 1
        );
    }
}

/// A device whose state, transitions or effect payloads hold a map with non-string keys,
/// which JSON cannot write: a plugin bug the SDK turns into a panic (a trap in Wasm), not
/// into a refusal or a state. A review found a read answering 200 with
/// `{"error": {"code": "internal", ...}}` as the state, and a transition that would not
/// serialize refused like a bad event: no dead letter, no step toward a quarantine.
mod unserializable {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use crate::{Context, Device, Error, Instance};

    #[derive(Serialize, Deserialize, Default)]
    struct Grid {
        cells: Vec<u8>,
        #[serde(skip_deserializing)]
        broken: BTreeMap<(u8, u8), u8>,
    }

    #[derive(Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum GridEvent {
        BadTransition,
        BadCommand,
        BreakState,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum GridTransition {
        Mark {
            #[serde(skip_deserializing)]
            at: BTreeMap<(u8, u8), u8>,
        },
        Break,
    }

    impl Device for Grid {
        type Config = serde_json::Value;
        type Event = GridEvent;
        type Transition = GridTransition;

        fn init(_: &str, _: serde_json::Value) -> Result<Self, Error> {
            Ok(Grid::default())
        }

        fn handle(&self, ctx: &Context, event: GridEvent) -> Result<Vec<GridTransition>, Error> {
            Ok(match event {
                GridEvent::BadTransition => vec![GridTransition::Mark {
                    at: BTreeMap::from([((1, 2), 3)]),
                }],
                GridEvent::BadCommand => {
                    ctx.command(&BTreeMap::from([((1u8, 2u8), 3u8)]));
                    vec![]
                }
                GridEvent::BreakState => vec![GridTransition::Break],
            })
        }

        fn apply(&mut self, transition: GridTransition) {
            if let GridTransition::Break = transition {
                self.broken.insert((0, 0), 0);
            }
        }
    }

    fn grid() -> Instance<Grid> {
        let mut i = Instance::new();
        i.init("g-1", "{}").expect("init");
        i
    }

    fn ctx() -> Context {
        Context::new("g-1", 1, 1_000, 7)
    }

    #[test]
    #[should_panic(expected = "drover-guest: a transition does not serialize")]
    fn a_transition_that_does_not_serialize_panics() {
        let _ = grid().decide(&ctx(), r#"{"type": "bad_transition"}"#);
    }

    #[test]
    #[should_panic(expected = "drover-guest: an effect's payload does not serialize")]
    fn an_effect_that_does_not_serialize_panics() {
        let _ = grid().decide(&ctx(), r#"{"type": "bad_command"}"#);
    }

    #[test]
    #[should_panic(expected = "drover-guest: the device state does not serialize")]
    fn a_state_that_does_not_serialize_panics_when_read() {
        let mut g = grid();
        g.handle_and_apply(&ctx(), r#"{"type": "break_state"}"#)
            .expect("applied");
        let _ = g.query();
    }
}
