//! Runtime counters and the end-to-end latency histogram, rendered in Prometheus text format.
//!
//! Plain atomics: recording is a few relaxed increments on the hot path, and a scrape reads
//! them without stopping anyone.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::ErrorKind;

/// Upper bounds of the latency buckets, in microseconds.
const BUCKETS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000,
];

/// See the module docs.
#[derive(Debug, Default)]
pub struct Metrics {
    pub events_committed: AtomicU64,
    pub transitions_committed: AtomicU64,
    pub activations: AtomicU64,
    pub snapshots: AtomicU64,
    /// Snapshots that failed to be taken (`snapshot` trapped or timed out) or to restore at
    /// an activation: each turns its device's snapshots off on that version until restart.
    pub snapshot_failures: AtomicU64,
    pub passivations: AtomicU64,
    /// Actor tasks that panicked (each is restarted by the next message).
    pub actor_panics: AtomicU64,
    /// Events of plugins that have run slow, decided on the slow lane (see
    /// `actor::ActorPool`).
    pub slow_lane_events: AtomicU64,
    /// Activations of devices of plugins that have run slow, on the slow lane.
    pub slow_lane_activations: AtomicU64,
    /// Reads of live state (`query`) run on the slow lane.
    pub slow_lane_reads: AtomicU64,
    /// Provisioning's trial `init`s run on the slow lane.
    pub slow_lane_provisions: AtomicU64,
    /// Devices moved to another plugin version (deploy, rollback, or lazily at activation).
    pub upgrades: AtomicU64,
    /// Devices that could not be brought up on a new version and stayed on their old one.
    pub upgrade_failures: AtomicU64,
    /// Devices a version was not tried on when their turn came (live in a deploy, or at an
    /// activation), given up after failing slowly on several devices in a row (see
    /// `SLOW_FAILURES_BEFORE_STOPPING`); each stays on its own version, recorded as failed on
    /// that one. (A deploy's `totals.not_tried` counts the passivated devices instead, whose
    /// turn has not come.)
    pub upgrades_not_tried: AtomicU64,
    /// Instances the router had passivated: past the live-instance cap, or to give guest
    /// memory back to its budget (also among `passivations`).
    pub evictions: AtomicU64,
    /// Guest instances alive right now (a gauge).
    pub live_instances: AtomicU64,
    /// Messages put into other devices' mailboxes, redeliveries included (see
    /// `crate::dispatch`).
    pub messages_delivered: AtomicU64,
    /// Messages found undeliverable (unknown or removed target), counted once each when its
    /// dead letter is recorded.
    pub messages_undeliverable: AtomicU64,
    /// Messages left in the journal for a redelivery because what is parked for full
    /// mailboxes was at its bound (`dispatch::Postman`).
    pub messages_spilled: AtomicU64,
    /// What the messages parked for full mailboxes hold now, counted as the bound counts
    /// them (a gauge).
    pub messages_parked_bytes: AtomicU64,
    /// Messages a removed device still owed: cancelled with it (see `crate::removal`).
    pub messages_cancelled: AtomicU64,
    /// Timer firings put into their device's mailbox (not those of a device removed
    /// meanwhile).
    pub timers_fired: AtomicU64,
    /// Internal events (messages, timer firings) dropped on arrival: already handled, timer
    /// replaced or cancelled meanwhile, the device quarantined (delivered again when the
    /// quarantine ends), or the runtime stopping (again at the next start).
    pub internal_dropped: AtomicU64,
    /// Messages and timer firings that failed in a way that may pass (a timeout short of the
    /// count that consumes it, the server's overload) and come again.
    pub internal_retried: AtomicU64,
    /// Commands for devices that became durable (entered an outbox).
    pub commands_issued: AtomicU64,
    /// Commands acknowledged.
    pub commands_acked: AtomicU64,
    errors: [AtomicU64; ErrorKind::ALL.len()],
    /// Dead letters kept, by the kind of the failure (see [`Metrics::dead_letter`]).
    dead_letters: [AtomicU64; ErrorKind::ALL.len()],
    latency_buckets: [AtomicU64; BUCKETS_US.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
}

impl Metrics {
    /// Counts one failed request by the kind of its error.
    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Errors of `kind` counted so far.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors[kind as usize].load(Ordering::Relaxed)
    }

    /// Counts one dead letter kept by the kind of its failure: an event the plugin failed
    /// on, or a message or timer firing consumed as poison. These fail inside the server,
    /// with no request to count them in `errors`: without this, a poison message showed only
    /// by polling each device's dead letters.
    pub fn dead_letter(&self, kind: ErrorKind) {
        self.dead_letters[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Dead letters of `kind` kept so far.
    pub fn dead_letters(&self, kind: ErrorKind) -> u64 {
        self.dead_letters[kind as usize].load(Ordering::Relaxed)
    }

    /// Counts one durable event with `transitions` transitions, acknowledged `latency` after
    /// it was accepted.
    pub fn committed(&self, transitions: u64, latency: Duration) {
        self.events_committed.fetch_add(1, Ordering::Relaxed);
        self.transitions_committed
            .fetch_add(transitions, Ordering::Relaxed);
        self.latency(latency);
    }

    /// Records the latency of one committed event, from acceptance to acknowledgement.
    pub fn latency(&self, d: Duration) {
        let us = d.as_micros() as u64;
        if let Some(i) = BUCKETS_US.iter().position(|b| us <= *b) {
            self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Renders everything in Prometheus text format; `gauges` adds point-in-time values and
    /// `counters` running totals kept elsewhere (the journal's), each `(name, help, value)`.
    pub fn render(&self, gauges: &[(&str, &str, u64)], counters: &[(&str, &str, u64)]) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        };
        counter(
            &mut out,
            "drover_events_total",
            "Events committed to the journal.",
            &self.events_committed,
        );
        counter(
            &mut out,
            "drover_transitions_total",
            "Transitions committed.",
            &self.transitions_committed,
        );
        counter(
            &mut out,
            "drover_activations_total",
            "Actor activations (instantiate + restore + replay).",
            &self.activations,
        );
        counter(
            &mut out,
            "drover_snapshots_total",
            "Snapshots written.",
            &self.snapshots,
        );
        counter(
            &mut out,
            "drover_snapshot_failures_total",
            "Snapshots that trapped or timed out when taken, or would not restore at an activation; each turns its device's snapshots off on that plugin version until restart.",
            &self.snapshot_failures,
        );
        counter(
            &mut out,
            "drover_passivations_total",
            "Instances dropped: idle timeout, live-instance cap, or the end of a read of a passivated device.",
            &self.passivations,
        );
        counter(
            &mut out,
            "drover_evictions_total",
            "Instances passivated to keep the live count under the live-instance cap (--max-live) or to give guest memory back to its budget, least recently used first; also counted in drover_passivations_total.",
            &self.evictions,
        );
        counter(
            &mut out,
            "drover_actor_panics_total",
            "Actor tasks that panicked and were restarted from the journal.",
            &self.actor_panics,
        );
        counter(
            &mut out,
            "drover_slow_lane_events_total",
            "Events decided on the slow lane: those of plugin versions that have run an event or a read of over two epoch ticks (20 ms) of CPU time, whose guest calls yield their thread at each tick.",
            &self.slow_lane_events,
        );
        counter(
            &mut out,
            "drover_slow_lane_activations_total",
            "Activations folded on the slow lane: those of devices of plugin versions that have run slow.",
            &self.slow_lane_activations,
        );
        counter(
            &mut out,
            "drover_slow_lane_reads_total",
            "Reads of devices' state run on the slow lane: those of plugin versions that have run slow.",
            &self.slow_lane_reads,
        );
        counter(
            &mut out,
            "drover_slow_lane_provisions_total",
            "Provisioning's trial inits run on the slow lane: those of plugin versions that have run slow, and those that turned out slow on the actor pool.",
            &self.slow_lane_provisions,
        );
        counter(
            &mut out,
            "drover_messages_delivered_total",
            "Messages between devices put into their target's mailbox, redeliveries included (a copy already handled is dropped on arrival).",
            &self.messages_delivered,
        );
        counter(
            &mut out,
            "drover_messages_undeliverable_total",
            "Messages whose target does not exist or was removed: one per dead letter of the sender's.",
            &self.messages_undeliverable,
        );
        counter(
            &mut out,
            "drover_messages_spilled_total",
            "Messages for a device with a full mailbox left in the journal, not held in memory, because the messages parked for full mailboxes were at their bound (--max-parked-mib); from about a second later each is read back from its record when its target has room.",
            &self.messages_spilled,
        );
        counter(
            &mut out,
            "drover_messages_cancelled_total",
            "Messages a removed device had sent that their targets had not handled durably when the removal was recorded: cancelled with the device (those a target had in hand then, up to its in-flight cap, still complete), the rest never delivered (the removal's answer counts them too).",
            &self.messages_cancelled,
        );
        counter(
            &mut out,
            "drover_timers_fired_total",
            "Timer firings delivered to their device.",
            &self.timers_fired,
        );
        counter(
            &mut out,
            "drover_internal_dropped_total",
            "Messages and timer firings dropped on arrival: already handled, timer replaced or cancelled, device quarantined (delivered again when the quarantine ends), or the runtime stopping (again at the next start).",
            &self.internal_dropped,
        );
        counter(
            &mut out,
            "drover_internal_retried_total",
            "Messages and timer firings that timed out (short of the third timeout, which consumes one as a dead letter) or met an overloaded server, and come again.",
            &self.internal_retried,
        );
        counter(
            &mut out,
            "drover_commands_issued_total",
            "Commands for devices that became durable and entered their outbox.",
            &self.commands_issued,
        );
        counter(
            &mut out,
            "drover_commands_acked_total",
            "Commands acknowledged (each once).",
            &self.commands_acked,
        );
        counter(
            &mut out,
            "drover_upgrades_total",
            "Devices moved to another plugin version (deploy, rollback, or lazily at activation).",
            &self.upgrades,
        );
        counter(
            &mut out,
            "drover_upgrade_failures_total",
            "Devices that could not be brought up on a new plugin version and stayed on their old one.",
            &self.upgrade_failures,
        );
        counter(
            &mut out,
            "drover_upgrades_not_tried_total",
            "Devices a plugin version was not tried on when their turn came (live in a deploy, or at an activation), given up after failing slowly on several devices in a row; each stays on its old version.",
            &self.upgrades_not_tried,
        );
        let _ = writeln!(
            out,
            "# HELP drover_live_instances Guest instances alive now.\n# TYPE drover_live_instances gauge\ndrover_live_instances {}",
            self.live_instances.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP drover_errors_total Requests (and batch items) the runtime failed, by error code; what the HTTP layer refuses before the runtime sees it (a body over its limit, an invalid id in the path, malformed framing) is in drover_http_errors_total instead.\n# TYPE drover_errors_total counter"
        );
        for (kind, v) in ErrorKind::ALL.iter().zip(&self.errors) {
            let _ = writeln!(
                out,
                "drover_errors_total{{code=\"{}\"}} {}",
                kind.code(),
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP drover_dead_letters_total Dead letters kept, by error code: events the plugin failed on (a trap, a timeout, output the host refused) and messages or timer firings consumed as poison or refused by the plugin (code rejected); a message to no device is in drover_messages_undeliverable_total instead.\n# TYPE drover_dead_letters_total counter"
        );
        for (kind, v) in ErrorKind::ALL.iter().zip(&self.dead_letters) {
            let v = v.load(Ordering::Relaxed);
            // The codes dead letters usually have, from the start (so a rate over them has a
            // first sample), and any other once it occurs: every error code would be mostly
            // zeros that can never move.
            let usual = matches!(
                kind,
                ErrorKind::Trap
                    | ErrorKind::Timeout
                    | ErrorKind::OutputTooLarge
                    | ErrorKind::InvalidEffect
                    | ErrorKind::Rejected
            );
            if usual || v > 0 {
                let _ = writeln!(
                    out,
                    "drover_dead_letters_total{{code=\"{}\"}} {v}",
                    kind.code()
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP drover_event_latency_seconds Time from accepting an event to its durable acknowledgement.\n# TYPE drover_event_latency_seconds histogram"
        );
        let mut cumulative = 0;
        for (bound, v) in BUCKETS_US.iter().zip(&self.latency_buckets) {
            cumulative += v.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "drover_event_latency_seconds_bucket{{le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "drover_event_latency_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "drover_event_latency_seconds_sum {}",
            self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "drover_event_latency_seconds_count {count}");
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_is_counted() {
        let m = Metrics::default();
        for kind in ErrorKind::ALL {
            m.error(*kind);
        }
        let text = m.render(&[("drover_live_actors", "Live actors.", 3)], &[]);
        for kind in ErrorKind::ALL {
            let code = kind.code();
            assert!(
                text.contains(&format!("drover_errors_total{{code=\"{code}\"}} 1")),
                "{code}"
            );
        }
        assert!(text.contains("drover_live_actors 3"));
    }
}
