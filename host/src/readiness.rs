//! Readiness: whether a load balancer should send this server requests now (`GET /readyz`).
//!
//! Liveness and readiness answer different questions, as Kubernetes' probes do. `/healthz`
//! says the process answers; when it stops, restarting the process is the remedy. `/readyz`
//! says whether an event sent now could be made durable. A server that answers but whose disk
//! is full should be sent nothing new until space is freed, and restarting it would not help:
//! so `/healthz` stays `ok` through a full disk, and `/readyz` answers 503 saying why.
//!
//! | code | when | until |
//! | --- | --- | --- |
//! | `shutting-down` | a stop has begun ([`Runtime::shutdown`], or the HTTP server's: `drover serve` closes its listener at once, so over HTTP only a request already arriving sees it, and a probe after it is refused its connection) | the process exits |
//! | `journal-read-only` | a failed commit could not be cut back off the journal, which then refuses appends | a restart (recovery cuts the torn batch) |
//! | `disk-low` | the data directory's filesystem has fewer free bytes than [`Config::min_free_space`](crate::Config::min_free_space) (default [`MIN_FREE_SPACE`](crate::config::defaults::MIN_FREE_SPACE), one record of the largest size the journal accepts) | space is freed: the check is made at each probe |
//! | `disk-unknown` | the free space of the data directory's filesystem cannot be read | it can |
//! | `files-low` | fewer file descriptors are free under the process's open-files limit than [`Config::min_free_files`](crate::Config::min_free_files) (default [`MIN_FREE_FILES`](crate::config::defaults::MIN_FREE_FILES)): every journal segment stays open, and past the limit every commit that starts a segment fails with "Too many open files" | descriptors are freed (retention deletes segments, connections close) or the limit is raised: counted at each probe (Linux only, from `/proc/self/fd`) |
//!
//! Not ready is advice for routing, not a refusal: every request is still served as it would
//! be otherwise (reads answer; a write that finds the disk full gets its `503 journal`).

use std::path::Path;

use serde::Serialize;

use crate::Runtime;

/// What `GET /readyz` reports: ready, or every reason it is not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    /// The reasons this server should not be sent requests now; empty when it is ready.
    pub reasons: Vec<NotReady>,
}

impl Readiness {
    /// Whether events sent now can be made durable, as far as the server can tell.
    pub fn is_ready(&self) -> bool {
        self.reasons.is_empty()
    }
}

/// One reason a server is not ready (see the module docs for the codes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotReady {
    /// A short stable word: `shutting-down`, `journal-read-only`, `disk-low`, `disk-unknown`,
    /// `files-low`.
    pub code: &'static str,
    /// For humans: what is wrong and what clears it.
    pub message: String,
}

/// The code of a stop under way.
pub const SHUTTING_DOWN: &str = "shutting-down";

impl NotReady {
    /// A stop has begun: of the runtime, or of the HTTP server in front of it.
    pub fn shutting_down() -> NotReady {
        NotReady {
            code: SHUTTING_DOWN,
            message: "the server is stopping; send requests to another".into(),
        }
    }
}

impl Runtime {
    /// Whether this server should be sent requests now (see the module docs). Cheap enough
    /// for a probe every second: two atomic loads, one `statvfs`, and a listing of
    /// `/proc/self/fd` (a few milliseconds at 20,000 open files).
    pub fn readiness(&self) -> Readiness {
        let mut reasons = Vec::new();
        if self.check_open().is_err() {
            reasons.push(NotReady::shutting_down());
        }
        if self.journal().is_read_only() {
            reasons.push(NotReady {
                code: "journal-read-only",
                message: "a failed commit could not be cut back off the journal, which refuses \
                          appends until the server restarts (recovery cuts what it left)"
                    .into(),
            });
        }
        let dir = &self.shared.data_dir;
        let min = self.config().min_free_space;
        match free_bytes(dir) {
            Ok(free) if free < min => reasons.push(NotReady {
                code: "disk-low",
                message: format!(
                    "the data directory's filesystem ({}) has {free} bytes free, under the \
                     {min} bytes a commit may need (--ready-min-free-bytes); events would fail \
                     with a full disk until space is freed",
                    dir.display()
                ),
            }),
            Ok(_) => {}
            Err(e) => reasons.push(NotReady {
                code: "disk-unknown",
                message: format!(
                    "the free space of the data directory's filesystem ({}) cannot be read: {e}",
                    dir.display()
                ),
            }),
        }
        if let Some(files) = open_files() {
            let min = self.config().min_free_files;
            let free = files.limit.saturating_sub(files.open);
            if free < min {
                reasons.push(NotReady {
                    code: "files-low",
                    message: format!(
                        "{} of the process's {} file descriptors are open ({} of them the \
                         journal's segment files, each kept open), leaving {free}, under \
                         --ready-min-free-files ({min}); past the limit commits fail with \
                         \"Too many open files\": raise the hard limit (ulimit -Hn), use \
                         larger --journal-segment-bytes, or let retention delete segments",
                        files.open,
                        files.limit,
                        self.journal().retention().segments,
                    ),
                });
            }
        }
        Readiness { reasons }
    }
}

/// The process's open file descriptors and its (soft) limit on them.
struct OpenFiles {
    open: u64,
    limit: u64,
}

/// `None` where they cannot be counted: outside Linux, or without `/proc`.
fn open_files() -> Option<OpenFiles> {
    #[cfg(target_os = "linux")]
    {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current?;
        // The listing's own descriptor is open while it is read: not counted.
        let open = std::fs::read_dir("/proc/self/fd")
            .ok()?
            .count()
            .saturating_sub(1) as u64;
        Some(OpenFiles { open, limit })
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Bytes the server's writes may still take on `dir`'s filesystem. The blocks reserved for
/// the superuser count when the server runs as root, since its writes may use them.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    let blocks = if rustix::process::geteuid().is_root() {
        stat.f_bfree
    } else {
        stat.f_bavail
    };
    Ok(blocks.saturating_mul(stat.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_bytes_are_those_of_the_filesystem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let free = free_bytes(dir.path()).expect("statvfs");
        assert!(
            free > 0,
            "a filesystem the test could create a directory on"
        );
        let gone = dir.path().join("no-such-dir");
        assert!(free_bytes(&gone).is_err());
    }
}
