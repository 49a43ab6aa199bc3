//! The device twin: what the operator wants of a device (*desired*) against what the device
//! last said it is (*reported*), and the commands that close the gap.
//!
//! Keep a [`Twin`] in the device's state and put [`TwinChange`] in its transitions; the three
//! calls below decide, and [`Twin::apply`] folds. Properties are the keys of a JSON object
//! (`{"setpoint": 21, "mode": "eco"}`).
//!
//! * [`Twin::desire`]: the operator sets some properties. The desired version goes up by
//!   one (strictly increasing, so a device can ignore a stale command), and the **delta** (the
//!   desired properties the device does not report yet) is sent as a command:
//!   `{"twin": {"version": V, "set": {delta}}}`.
//! * [`Twin::report`]: the device reports properties. Once nothing desired differs from what
//!   is reported, a [`TwinChange::Reached`] records that version as reached. While something
//!   still differs, the delta is sent again, so commands keep going until reported matches
//!   desired (one per report, not a flood).
//! * [`Twin::reconnected`]: the device (or its gateway) came back: the **whole** delta is sent
//!   again, since commands sent while it was away may be lost to it.
//!
//! **When the device changes a desired property on its own** (someone turns the knob), a report
//! contradicts the desired value. [`LocalChange`] states the policy: [`LocalChange::DesiredWins`]
//! (the default) keeps the desired value and sends it again, so the device is put back;
//! [`LocalChange::ReportedWins`] adopts the device's value as the new desired one (a new
//! version), so the knob wins and nothing is sent.
//!
//! Unlike cloud device shadows, nothing is lost while the device is away (the delta is
//! computed, never queued as notices) and the delta is computed here, not left to the device.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Context;

/// Desired and reported properties of a device, with the desired version. See the module
/// docs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Twin {
    /// What the operator wants, by property.
    #[serde(default)]
    pub desired: Map<String, Value>,
    /// What the device last reported, by property.
    #[serde(default)]
    pub reported: Map<String, Value>,
    /// The desired version: 0 before any desire, then up by one at each change.
    #[serde(default)]
    pub version: u64,
    /// The last desired version the device's reports matched.
    #[serde(default)]
    pub reached: Option<u64>,
    /// The time to live of the commands the twin sends, in ms (`None`: until acknowledged).
    /// A delta sent again supersedes the one before, but both stay in the device's outbox
    /// until acknowledged, and count toward its cap: with a time to live, superseded ones a
    /// gateway never acknowledged leave by themselves. Set it when the twin is made (in
    /// `init`, say): it is part of the state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_ttl_ms: Option<u64>,
}

/// A change of a [`Twin`]: journal it inside the plugin's own transition type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TwinChange {
    /// The desired properties `set` changed; the desired version is now `version`.
    Desired {
        /// The new desired version.
        version: u64,
        /// The properties set.
        set: Map<String, Value>,
    },
    /// The device reported the properties `set`.
    Reported {
        /// The properties reported.
        set: Map<String, Value>,
    },
    /// Everything desired at `version` is reported.
    Reached {
        /// The version reached.
        version: u64,
    },
}

/// What to do when a report contradicts a desired property: see the module docs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LocalChange {
    /// Keep the desired value and send it again.
    #[default]
    DesiredWins,
    /// Take the device's value as the new desired value.
    ReportedWins,
}

impl Twin {
    /// The desired properties that the device does not report (with the desired value).
    pub fn delta(&self) -> Map<String, Value> {
        self.desired
            .iter()
            .filter(|(k, v)| self.reported.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Whether what is reported matches everything desired.
    pub fn in_sync(&self) -> bool {
        self.delta().is_empty()
    }

    /// The operator wants `set`: the changes to journal, and the delta sent as a command.
    /// Setting what is already desired changes nothing and sends nothing.
    pub fn desire(&self, ctx: &Context, set: Map<String, Value>) -> Vec<TwinChange> {
        let set: Map<String, Value> = set
            .into_iter()
            .filter(|(k, v)| self.desired.get(k) != Some(v))
            .collect();
        if set.is_empty() {
            return Vec::new();
        }
        let mut next = self.clone();
        let mut out = vec![TwinChange::Desired {
            version: self.version + 1,
            set,
        }];
        next.apply(out[0].clone());
        if next.in_sync() {
            out.push(TwinChange::Reached {
                version: next.version,
            });
        } else {
            next.send_delta(ctx);
        }
        out
    }

    /// The device reports `set`: the changes to journal; while something desired still
    /// differs, the delta is sent again. `policy` settles a report that contradicts a desired
    /// value.
    pub fn report(
        &self,
        ctx: &Context,
        set: Map<String, Value>,
        policy: LocalChange,
    ) -> Vec<TwinChange> {
        let mut next = self.clone();
        let mut out = vec![TwinChange::Reported { set: set.clone() }];
        next.apply(out[0].clone());
        if policy == LocalChange::ReportedWins {
            // The device's own changes of desired properties become what is desired.
            let adopted: Map<String, Value> = set
                .into_iter()
                .filter(|(k, v)| next.desired.get(k).is_some_and(|d| d != v))
                .collect();
            if !adopted.is_empty() {
                let change = TwinChange::Desired {
                    version: next.version + 1,
                    set: adopted,
                };
                next.apply(change.clone());
                out.push(change);
            }
        }
        if next.in_sync() {
            if next.version > 0 && next.reached != Some(next.version) {
                let reached = TwinChange::Reached {
                    version: next.version,
                };
                out.push(reached);
            }
        } else {
            next.send_delta(ctx);
        }
        out
    }

    /// The device came back (reconnected, rebooted): the whole delta is sent again. Changes
    /// nothing in the twin.
    pub fn reconnected(&self, ctx: &Context) {
        if !self.in_sync() {
            self.send_delta(ctx);
        }
    }

    /// Folds one change.
    pub fn apply(&mut self, change: TwinChange) {
        match change {
            TwinChange::Desired { version, set } => {
                self.desired.extend(set);
                self.version = version;
            }
            TwinChange::Reported { set } => self.reported.extend(set),
            TwinChange::Reached { version } => self.reached = Some(version),
        }
    }

    fn send_delta(&self, ctx: &Context) {
        ctx.command_with_ttl(
            &serde_json::json!({
                "twin": {"version": self.version, "set": self.delta()}
            }),
            self.command_ttl_ms,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Effect;
    use serde_json::json;

    fn props(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn commands(ctx: &Context) -> Vec<Value> {
        ctx.effects()
            .into_iter()
            .filter_map(|e| match e {
                Effect::Command { payload, .. } => serde_json::from_str(&payload).ok(),
                _ => None,
            })
            .collect()
    }

    fn fold(twin: &mut Twin, changes: Vec<TwinChange>) {
        for c in changes {
            twin.apply(c);
        }
    }

    #[test]
    fn desired_state_yields_commands_until_the_device_reports_the_same() {
        let mut twin = Twin::default();
        let ctx = Context::new("t", 1, 0, 0);
        let changes = twin.desire(&ctx, props(json!({"setpoint": 21, "mode": "eco"})));
        assert_eq!(
            commands(&ctx),
            [json!({"twin": {"version": 1, "set": {"setpoint": 21, "mode": "eco"}}})]
        );
        fold(&mut twin, changes);

        // Half done: the rest is sent again.
        let ctx = Context::new("t", 2, 0, 0);
        let changes = twin.report(&ctx, props(json!({"setpoint": 21})), LocalChange::default());
        assert_eq!(
            commands(&ctx),
            [json!({"twin": {"version": 1, "set": {"mode": "eco"}}})]
        );
        fold(&mut twin, changes);
        assert_eq!(twin.reached, None);

        // Reconnect: the whole delta again, nothing journaled.
        let ctx = Context::new("t", 3, 0, 0);
        twin.reconnected(&ctx);
        assert_eq!(commands(&ctx).len(), 1);

        // Done: reached, no command.
        let ctx = Context::new("t", 4, 0, 0);
        let changes = twin.report(&ctx, props(json!({"mode": "eco"})), LocalChange::default());
        assert!(commands(&ctx).is_empty());
        assert_eq!(changes.last(), Some(&TwinChange::Reached { version: 1 }));
        fold(&mut twin, changes);
        assert!(twin.in_sync());

        // Desiring what is desired does nothing.
        let ctx = Context::new("t", 5, 0, 0);
        assert!(twin.desire(&ctx, props(json!({"setpoint": 21}))).is_empty());
        assert!(commands(&ctx).is_empty());
    }

    #[test]
    fn twin_commands_carry_the_twins_time_to_live_and_old_states_read_without_one() {
        let ttls = |ctx: &Context| -> Vec<Option<u64>> {
            ctx.effects()
                .into_iter()
                .filter_map(|e| match e {
                    Effect::Command { ttl_ms, .. } => Some(ttl_ms),
                    _ => None,
                })
                .collect()
        };
        let mut twin = Twin::default();
        let ctx = Context::new("t", 1, 0, 0);
        let changes = twin.desire(&ctx, props(json!({"mode": "eco"})));
        fold(&mut twin, changes);
        assert_eq!(ttls(&ctx), [None]);
        twin.command_ttl_ms = Some(60_000);
        let ctx = Context::new("t", 2, 0, 0);
        twin.reconnected(&ctx);
        assert_eq!(ttls(&ctx), [Some(60_000)]);
        // A state written before the field existed reads as no time to live, and one without
        // a time to live is written as before.
        let old: Twin = serde_json::from_value(
            json!({"desired": {}, "reported": {}, "version": 3, "reached": 3}),
        )
        .expect("reads");
        assert_eq!(old.command_ttl_ms, None);
        assert!(
            serde_json::to_value(&old)
                .expect("writes")
                .get("command_ttl_ms")
                .is_none()
        );
    }

    #[test]
    fn a_local_change_is_put_back_or_adopted_by_policy() {
        let mut twin = Twin::default();
        let ctx = Context::new("t", 1, 0, 0);
        let changes = twin.desire(&ctx, props(json!({"setpoint": 21})));
        fold(&mut twin, changes);
        let changes = twin.report(&ctx, props(json!({"setpoint": 21})), LocalChange::default());
        fold(&mut twin, changes);
        assert_eq!(twin.reached, Some(1));

        // Someone turns the knob to 25. Desired wins: told again, version unchanged.
        let ctx = Context::new("t", 2, 0, 0);
        let changes = twin.report(
            &ctx,
            props(json!({"setpoint": 25})),
            LocalChange::DesiredWins,
        );
        assert_eq!(
            commands(&ctx),
            [json!({"twin": {"version": 1, "set": {"setpoint": 21}}})]
        );
        let mut put_back = twin.clone();
        fold(&mut put_back, changes);
        assert_eq!(put_back.desired["setpoint"], 21);

        // Reported wins: 25 becomes desired at version 2, reached at once, nothing sent.
        let ctx = Context::new("t", 2, 0, 0);
        let changes = twin.report(
            &ctx,
            props(json!({"setpoint": 25})),
            LocalChange::ReportedWins,
        );
        assert!(commands(&ctx).is_empty());
        fold(&mut twin, changes);
        assert_eq!((twin.version, twin.reached), (2, Some(2)));
        assert_eq!(twin.desired["setpoint"], 25);
    }
}
