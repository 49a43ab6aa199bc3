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

use std::future::Future;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::engine::{EventContext, GuestEffect, Instance, Preemption};
use crate::error::{Error, validate_id};
use crate::journal::{Effect, Origin};

/// The most effects one event may produce. An event that fans out wider is a plugin bug more
/// often than a design; the bound keeps one event from flooding the fleet.
pub const MAX_EFFECTS: usize = 1024;

/// The longest timer key, in bytes.
pub const MAX_TIMER_KEY: usize = 256;

/// What deciding on one event produced, ready to journal.
#[derive(Debug, Default)]
pub struct Decided {
    /// The transitions (JSON texts), already applied to the instance.
    pub transitions: Vec<String>,
    /// The effects, checked, in the order the guest asked for them.
    pub effects: Vec<Effect>,
}

/// Why an event could not be decided, and whether the instance is still consistent.
#[derive(Debug)]
pub struct Failed {
    pub error: Error,
    /// The instance must be discarded and the device rebuilt from the journal.
    pub instance_lost: bool,
}

/// Runs `handle` on `event`, checks the output (transitions and effect payloads together)
/// against `max_output_bytes` and the effects against what the host can carry out, then
/// `apply`s each transition, all within one time budget (`budget`: the whole event, not each
/// call). Returns the transitions and effects to journal.
///
/// The guest calls hold the calling thread to the end: for a dry-run's sandboxed instances,
/// on a blocking thread of their own. The live actor uses [`decide_with`].
pub fn decide(
    instance: &mut Instance,
    ctx: &EventContext,
    event: &str,
    max_output_bytes: usize,
    budget: Duration,
) -> Result<Decided, Failed> {
    let scope = instance.begin_unit(budget, Preemption::None);
    // Not preemptible: every guest call returns before the first poll does.
    let decided = {
        let mut decided = std::pin::pin!(decide_now(instance, ctx, event, max_output_bytes));
        match decided
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(decided) => decided,
            Poll::Pending => unreachable!("a unit that is not preemptible never yields"),
        }
    };
    instance.end_unit(scope);
    decided
}

/// [`decide`], giving its thread back as `preemption` says: stopped to run again on the slow
/// lane ([`Preemption::Move`], then [`Instance::take_moved`] says so), or yielding its
/// thread at each epoch tick ([`Preemption::Yield`]) so that other devices' events go on
/// meanwhile.
pub async fn decide_with(
    instance: &mut Instance,
    ctx: &EventContext,
    event: &str,
    max_output_bytes: usize,
    budget: Duration,
    preemption: Preemption,
) -> Result<Decided, Failed> {
    let scope = instance.begin_unit(budget, preemption);
    let decided = decide_now(instance, ctx, event, max_output_bytes).await;
    instance.end_unit(scope);
    decided
}

async fn decide_now(
    instance: &mut Instance,
    ctx: &EventContext,
    event: &str,
    max_output_bytes: usize,
) -> Result<Decided, Failed> {
    let outcome = instance
        .handle_preemptible(ctx, event)
        .await
        .map_err(|e| Failed {
            instance_lost: e.is_fatal(),
            error: Error::from(e),
        })?;
    let transitions = outcome.transitions;
    let size: usize = transitions.iter().map(String::len).sum::<usize>()
        + outcome.effects.iter().map(payload_len).sum::<usize>();
    if size > max_output_bytes {
        return Err(Failed {
            error: Error::OutputTooLarge {
                size,
                limit: max_output_bytes,
            },
            instance_lost: false,
        });
    }
    let effects = effects_of(outcome.effects, ctx.at_ms).map_err(|error| Failed {
        error,
        instance_lost: false,
    })?;
    let borrowed: Vec<&str> = transitions.iter().map(String::as_str).collect();
    let mut folded = Ok(());
    for batch in batches(&borrowed, BATCH_TRANSITIONS) {
        folded = instance.apply_batch_preemptible(batch).await;
        if folded.is_err() {
            break;
        }
    }
    folded.map_err(|e| Failed {
        // `apply` refusing what its own `handle` just returned is a plugin bug, and the state
        // is half-changed: a fault like a trap (the instance goes, a dead letter is kept, a
        // message or timer firing is consumed), not a refusal the sender could act on.
        error: match Error::from(e.error) {
            Error::Rejected { code, message } => Error::Trap(format!(
                "apply refused a transition its handle returned ({code}: {message})"
            )),
            other => other,
        },
        instance_lost: true,
    })?;
    Ok(Decided {
        transitions,
        effects,
    })
}

/// The context the guest gets for event `seq` of `device` at `at_ms`, from `origin` (as the
/// journal records it, so a dry-run re-decides with the very context the record was decided
/// with).
pub fn context(device: &str, seq: u64, at_ms: u64, origin: &Origin) -> EventContext {
    use crate::engine::{MessageOrigin, Origin as Wit, TimerOrigin};
    EventContext {
        device_id: device.to_string(),
        seq,
        at_ms,
        seed: crate::clock::seed(device, seq),
        origin: match origin {
            Origin::External => Wit::External,
            Origin::Message { sender, id, .. } => Wit::Message(MessageOrigin {
                sender: sender.clone(),
                seq: id.seq,
                index: id.index,
            }),
            Origin::Timer {
                key,
                due_ms,
                missed,
                ..
            } => Wit::Timer(TimerOrigin {
                key: key.clone(),
                due_ms: *due_ms,
                missed: *missed,
            }),
        },
    }
}

fn payload_len(e: &GuestEffect) -> usize {
    match e {
        GuestEffect::Command(c) => c.payload.len(),
        GuestEffect::Send(m) => m.to.len() + m.event.len(),
        GuestEffect::SetTimer(t) => t.key.len() + t.event.len(),
        GuestEffect::CancelTimer(key) => key.len(),
    }
}

/// Checks the guest's effects, of an event at `at_ms`, and turns them into what the journal
/// records. Payloads must be JSON (they become events and commands other parties parse),
/// targets valid device ids, timer keys non-empty and short, times readable (see
/// [`MAX_TIMER_MS`]).
fn effects_of(effects: Vec<GuestEffect>, at_ms: u64) -> Result<Vec<Effect>, Error> {
    if effects.len() > MAX_EFFECTS {
        return Err(Error::InvalidEffect(format!(
            "{} effects from one event, over the limit of {MAX_EFFECTS}",
            effects.len()
        )));
    }
    let json = |what: &str, text: &str| {
        crate::json_check::check(text)
            .map_err(|e| Error::InvalidEffect(format!("{what} is not JSON: {e}")))
    };
    let key = |key: &str| {
        if key.is_empty() || key.len() > MAX_TIMER_KEY {
            Err(Error::InvalidEffect(format!(
                "a timer key must have 1 to {MAX_TIMER_KEY} bytes, not {}",
                key.len()
            )))
        } else {
            Ok(())
        }
    };
    effects
        .into_iter()
        .map(|e| {
            Ok(match e {
                GuestEffect::Command(c) => {
                    json("a command", &c.payload)?;
                    if let Some(ttl) = c.ttl_ms.filter(|t| at_ms.saturating_add(*t) > MAX_TIMER_MS)
                    {
                        return Err(Error::InvalidEffect(format!(
                            "a command's time to live of {ttl} ms ends past {MAX_TIMER_MS} ms \
                             (2^53 - 1, the integers a JSON client reads exactly; year 287396): \
                             leave the time to live out for a command that waits until \
                             acknowledged"
                        )));
                    }
                    Effect::Command {
                        payload: c.payload,
                        ttl_ms: c.ttl_ms,
                    }
                }
                GuestEffect::Send(m) => {
                    validate_id(&m.to)
                        .map_err(|e| Error::InvalidEffect(format!("a message's target: {e}")))?;
                    json("a message", &m.event)?;
                    Effect::Send {
                        to: m.to,
                        event: m.event,
                    }
                }
                GuestEffect::SetTimer(t) => {
                    key(&t.key)?;
                    json("a timer's event", &t.event)?;
                    if t.due_ms > MAX_TIMER_MS || t.every_ms.is_some_and(|p| p > MAX_TIMER_MS) {
                        return Err(Error::InvalidEffect(format!(
                            "timer `{}` is due at {} ms{}: due times and periods are at most \
                             {MAX_TIMER_MS} ms (2^53 - 1, the integers a JSON client reads \
                             exactly; year 287396)",
                            t.key,
                            t.due_ms,
                            t.every_ms
                                .map(|p| format!(" every {p} ms"))
                                .unwrap_or_default()
                        )));
                    }
                    if let Some(period) = t.every_ms.filter(|p| *p < MIN_TIMER_PERIOD_MS) {
                        return Err(Error::InvalidEffect(format!(
                            "timer `{}` repeats every {period} ms: a periodic timer repeats \
                             every {MIN_TIMER_PERIOD_MS} ms or more (each firing is an event \
                             in the journal)",
                            t.key
                        )));
                    }
                    Effect::SetTimer {
                        key: t.key,
                        due_ms: t.due_ms,
                        every_ms: t.every_ms,
                        event: t.event,
                    }
                }
                GuestEffect::CancelTimer(k) => {
                    key(&k)?;
                    Effect::CancelTimer { key: k }
                }
            })
        })
        .collect()
}

/// The latest due time, and the longest period, of a timer, and the latest time a command
/// expires: 2^53 - 1 ms, the largest integer a JSON client reading into a double
/// (JavaScript's `Number`) gets exactly, so the API's timer and outbox listings never show a
/// time a dashboard reads wrong. A guest that saturates a time
/// (`after_ms(u64::MAX)`) gets `invalid-effect`, not a timer due at a time no one can read.
pub const MAX_TIMER_MS: u64 = (1 << 53) - 1;

/// The shortest period of a periodic timer. Each firing is an event, handled and made durable
/// like any other: a period of 1 ms (what a period of 0 became before) wrote ~4,600 records a
/// second for one device (found by a review). Durable timers elsewhere have floors too
/// (Orleans' reminders: one minute by default); one second keeps heartbeats and polls, and
/// sends faster work to the device itself. One-shot timers have none.
pub const MIN_TIMER_PERIOD_MS: u64 = 1_000;

/// Most transitions in one `apply-batch` call. A call's fixed cost is spread over them;
/// beyond a few hundred the gain is below the noise (`cargo bench -p drover --bench guest`).
pub const BATCH_TRANSITIONS: usize = 256;

/// Most bytes of transitions in one `apply-batch` call (one longer transition goes alone): the
/// guest holds the whole batch in its memory, capped per instance, next to its state.
pub const BATCH_BYTES: usize = 256 * 1024;

/// `apply`s each transition in order, in batches (see [`batches`]); returns how many were
/// applied. After an error the instance's state is half-changed and must be discarded.
pub fn fold(instance: &mut Instance, transitions: &[&str]) -> Result<u64, Error> {
    for batch in batches(transitions, BATCH_TRANSITIONS) {
        instance
            .apply_batch(batch)
            .map_err(|e| Error::from(e.error))?;
    }
    Ok(transitions.len() as u64)
}

/// `transitions` cut in order into batches of at most `most` transitions and
/// [`BATCH_BYTES`] bytes (a longer transition alone), for [`Instance::apply_batch`].
pub fn batches<'s, 'a>(
    transitions: &'s [&'a str],
    most: usize,
) -> impl Iterator<Item = &'s [&'a str]> {
    let mut rest = transitions;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let n = rest
            .iter()
            .take(most)
            .take_while(|t| {
                bytes += t.len();
                bytes <= BATCH_BYTES
            })
            .count()
            .max(1);
        let (batch, tail) = rest.split_at(n);
        rest = tail;
        Some(batch)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(transitions: &[&str], most: usize) -> Vec<usize> {
        batches(transitions, most).map(<[&str]>::len).collect()
    }

    #[test]
    fn batches_keep_order_and_bounds() {
        let small = vec!["{}"; 600];
        assert_eq!(cut(&small, BATCH_TRANSITIONS), [256, 256, 88]);
        assert_eq!(cut(&small[..3], 1), [1, 1, 1]);
        assert!(cut(&[], BATCH_TRANSITIONS).is_empty());
        // By bytes: a transition that would pass the bound starts the next batch, and one
        // over the bound on its own goes alone.
        let big = "x".repeat(BATCH_BYTES / 2);
        let huge = "y".repeat(BATCH_BYTES + 1);
        let mixed = [big.as_str(), big.as_str(), "{}", huge.as_str(), "{}"];
        assert_eq!(cut(&mixed, BATCH_TRANSITIONS), [2, 1, 1, 1]);
        let flat: Vec<&str> = batches(&mixed, BATCH_TRANSITIONS)
            .flatten()
            .copied()
            .collect();
        assert_eq!(flat, mixed);
    }
}
