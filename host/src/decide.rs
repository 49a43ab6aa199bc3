//! The one path from an event to state: *decide* (`handle`) and *fold* (`apply`).
//!
//! Event sourcing splits a guest's work in two: `handle` decides what an event means and
//! returns transitions without changing state; `apply` folds one transition into the state.
//! Every place that runs a guest on events goes through these two functions, so the limits
//! and the failure rules are the same everywhere:
//!
//! * the live actor decides and folds each new event ([`decide`]);
//! * replay (activation, `state?at=`, `drover replay`) folds recorded transitions and never
//!   decides ([`fold`]): replay has no side effects and needs no clock;
//! * a dry-run of a new plugin version re-decides recorded events with their recorded
//!   context and compares ([`decide`] on a sandboxed instance).
//!
//! Failure rules: a refusal from `handle` or an output over the limit leaves the instance
//! as it was (handle does not change state); a trap or timeout in `handle`, and any failure
//! in `apply` (the state is then half-changed), loses the instance.

use std::time::Duration;

use crate::engine::{EventContext, Instance};
use crate::error::Error;

/// Why an event could not be decided, and whether the instance is still consistent.
#[derive(Debug)]
pub struct Failed {
    pub error: Error,
    /// The instance must be discarded and the device rebuilt from the journal.
    pub instance_lost: bool,
}

/// Runs `handle` on `event`, checks the output against `max_output_bytes`, then `apply`s each
/// transition, all within one time budget (`budget`: the whole event, not each call). Returns
/// the transitions (JSON texts) to journal.
pub fn decide(
    instance: &mut Instance,
    ctx: &EventContext,
    event: &str,
    max_output_bytes: usize,
    budget: Duration,
) -> Result<Vec<String>, Failed> {
    instance.within(budget, |instance| {
        decide_now(instance, ctx, event, max_output_bytes)
    })
}

fn decide_now(
    instance: &mut Instance,
    ctx: &EventContext,
    event: &str,
    max_output_bytes: usize,
) -> Result<Vec<String>, Failed> {
    let transitions = instance.handle(ctx, event).map_err(|e| Failed {
        instance_lost: e.is_fatal(),
        error: Error::from(e),
    })?;
    let size: usize = transitions.iter().map(String::len).sum();
    if size > max_output_bytes {
        return Err(Failed {
            error: Error::OutputTooLarge {
                size,
                limit: max_output_bytes,
            },
            instance_lost: false,
        });
    }
    fold(instance, transitions.iter().map(String::as_str)).map_err(|error| Failed {
        error,
        instance_lost: true,
    })?;
    Ok(transitions)
}

/// `apply`s each transition in order; returns how many were applied. After an error the
/// instance's state is half-changed and must be discarded.
pub fn fold<'a>(
    instance: &mut Instance,
    transitions: impl IntoIterator<Item = &'a str>,
) -> Result<u64, Error> {
    let mut applied = 0;
    for t in transitions {
        instance.apply(t)?;
        applied += 1;
    }
    Ok(applied)
}
