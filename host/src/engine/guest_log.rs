//! What a guest writes to the server's log (`host.log`, and the lines it prints), made safe
//! to put there.
//!
//! A guest is untrusted. A message holding a newline could forge a line that looks like the
//! host's own (`... ERROR drover::journal: ...`), a quote could forge a field (`device="b"`),
//! terminal escape sequences could rewrite what an operator sees, and a guest logging in a
//! loop could flood the log and the disk under it. So a guest's line is logged quoted, as
//! Rust debug-formats a string (`"a \"b\"\n\u{1b}"`: quotes, control and invisible
//! characters escaped), and one event (or other unit of guest work: an activation, a read)
//! logs at most [`LINES_PER_UNIT`] lines; the rest are dropped, counted, and reported when
//! the next unit starts.

/// Most lines one unit of guest work may log (`host.log` and printed lines together).
pub const LINES_PER_UNIT: u32 = 100;

/// The lines a guest may still log in the current unit of work.
#[derive(Debug, Default)]
pub struct Budget {
    used: u32,
    dropped: u64,
}

impl Budget {
    /// Whether one more line may be logged (counted either way). The first line refused in a
    /// unit is reported at once, so a flood shows while it happens.
    pub fn take(&mut self, device: &str) -> bool {
        if self.used < LINES_PER_UNIT {
            self.used += 1;
            return true;
        }
        self.dropped += 1;
        if self.dropped == 1 {
            let _ = std::panic::catch_unwind(|| {
                tracing::warn!(target: "drover::guest", device, limit = LINES_PER_UNIT, "the guest logs more lines than one event may: dropping the rest of this event's");
            });
        }
        false
    }

    /// A new unit of work: the budget is whole again, and the lines dropped in the last one
    /// are reported.
    pub fn renew(&mut self, device: &str) {
        self.used = 0;
        let dropped = std::mem::take(&mut self.dropped);
        if dropped > 0 {
            let _ = std::panic::catch_unwind(|| {
                tracing::warn!(target: "drover::guest", device, dropped, "guest log lines dropped (over the limit per event)");
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unit_logs_at_most_its_budget() {
        let mut b = Budget::default();
        let taken = (0..LINES_PER_UNIT + 50).filter(|_| b.take("d")).count();
        assert_eq!(taken, LINES_PER_UNIT as usize);
        b.renew("d");
        assert!(b.take("d"), "whole again in the next unit");
    }
}
