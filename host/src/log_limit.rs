//! Lines that a burst would repeat thousands of times, logged at most once a second with a
//! count of how many times it happened since the last one.
//!
//! A failing disk fails every commit, and each failure used to be logged where it happened:
//! one line per failed batch and one per device whose actor rebuilt after it, 56,661 lines in
//! 20 s under 8 clients (found by a review), on the very disk that was full; out of file
//! descriptors, every accept failed and was logged, 20 lines a second. Metrics count
//! every occurrence (`drover_journal_commit_failures` and others); the log says that it
//! happens, and how often.

use std::time::{Duration, Instant};

/// One kind of line, logged at most once per [`LogLimit::EVERY`]. Not a `tracing` layer: the
/// caller logs, with its own level and fields, when [`LogLimit::due`] says so.
#[derive(Debug, Default)]
pub(crate) struct LogLimit {
    unlogged: u64,
    logged_at: Option<Instant>,
}

impl LogLimit {
    /// One that has logged nothing yet (for a `static`).
    pub const fn new() -> LogLimit {
        LogLimit {
            unlogged: 0,
            logged_at: None,
        }
    }

    /// At most one line this often.
    pub const EVERY: Duration = Duration::from_secs(1);

    /// Notes one occurrence. `Some(n)` when it is to be logged now: `n` occurrences since the
    /// last line, this one included. The first occurrence is always logged.
    pub fn due(&mut self) -> Option<u64> {
        self.unlogged += 1;
        if self.logged_at.is_some_and(|at| at.elapsed() < Self::EVERY) {
            return None;
        }
        self.logged_at = Some(Instant::now());
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_is_logged_then_at_most_one_a_second_with_the_count() {
        let mut limit = LogLimit::default();
        assert_eq!(limit.due(), Some(1));
        assert_eq!(limit.due(), None);
        assert_eq!(limit.due(), None);
        limit.logged_at = Some(Instant::now() - LogLimit::EVERY);
        assert_eq!(limit.due(), Some(3), "the two held back and this one");
        assert_eq!(limit.due(), None);
    }
}
