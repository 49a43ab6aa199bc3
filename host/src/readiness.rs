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
//! | `commit-stalled` | one group commit (write and `fdatasync`) has been under way longer than [`Config::commit_stalled_after`](crate::Config::commit_stalled_after) (default [`COMMIT_STALLED_AFTER`](crate::config::defaults::COMMIT_STALLED_AFTER), 5 s): a disk that stopped answering, behind which every event waits (`/healthz` stays `ok`: restarting would not help) | the commit returns |
//! | `journal-read-only` | a failed commit could not be cut back off the journal, which then refuses appends | a restart (recovery cuts the torn batch) |
//! | `disk-low` | the data directory's filesystem has fewer free bytes than [`Config::min_free_space`](crate::Config::min_free_space) (default [`MIN_FREE_SPACE`](crate::config::defaults::MIN_FREE_SPACE), one record of the largest size the journal accepts) | space is freed: the check is made at each probe |
//! | `disk-unknown` | the free space of the data directory's filesystem cannot be read, or (over HTTP) its check has not returned within [`PROBE_WAIT`] | it can |
//! | `files-low` | fewer file descriptors are free under the process's open-files limit than [`Config::min_free_files`](crate::Config::min_free_files) (default [`MIN_FREE_FILES`](crate::config::defaults::MIN_FREE_FILES)): every journal segment stays open, and past the limit every commit that starts a segment fails with "Too many open files" | descriptors are freed (retention deletes segments, connections close) or the limit is raised: counted at each probe (Linux only, from `/proc/self/fd`) |
//!
//! Not ready is advice for routing, not a refusal: every request is still served as it would
//! be otherwise (reads answer; a write that finds the disk full gets its `503 journal`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
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
    /// A short stable word: `shutting-down`, `commit-stalled`, `journal-read-only`,
    /// `disk-low`, `disk-unknown`, `files-low`.
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
    /// Whether this server should be sent requests now (see the module docs), checked on
    /// the calling thread: two atomic loads, one `statvfs`, and a listing of `/proc/self/fd`
    /// (a few milliseconds at 20,000 open files). `GET /readyz` uses
    /// [`Runtime::readiness_probe`], which keeps a hung filesystem off its thread.
    pub fn readiness(&self) -> Readiness {
        let mut reasons = self.state_reasons();
        reasons.extend(self.filesystem_reasons());
        Readiness { reasons }
    }

    /// [`Runtime::readiness`] with the filesystem checks on a blocking thread, waited for
    /// at most [`PROBE_WAIT`], and at most one under way: a data directory on a network
    /// filesystem that stopped answering holds that one thread, and every probe meanwhile
    /// answers at once, not ready (`disk-unknown`), instead of holding an HTTP worker each or
    /// piling up threads behind the first.
    pub async fn readiness_probe(&self) -> Readiness {
        let mut reasons = self.state_reasons();
        let rt = self.clone();
        let dir = self.shared.data_dir.clone();
        reasons.extend(
            self.shared
                .probe
                .run(
                    PROBE_WAIT,
                    move || rt.filesystem_reasons(),
                    move |waited| NotReady {
                        code: "disk-unknown",
                        message: format!(
                            "the check of the data directory's filesystem ({}) has not returned \
                             for {:.1} s (a hung or very slow filesystem?)",
                            dir.display(),
                            waited.as_secs_f64()
                        ),
                    },
                )
                .await,
        );
        Readiness { reasons }
    }

    /// What atomics tell: a stop under way, a commit stalled, a read-only journal.
    fn state_reasons(&self) -> Vec<NotReady> {
        let mut reasons = Vec::new();
        if self.check_open().is_err() {
            reasons.push(NotReady::shutting_down());
        }
        let stalled_after = self.config().commit_stalled_after;
        if let Some(taken) = self
            .journal()
            .commit_under_way()
            .filter(|taken| *taken >= stalled_after)
        {
            reasons.push(NotReady {
                code: "commit-stalled",
                message: format!(
                    "a group commit (its write and fdatasync) has been under way for {:.1} s, \
                     over {:.1} s: the data directory's disk is not answering, and every event \
                     waits behind it",
                    taken.as_secs_f64(),
                    stalled_after.as_secs_f64()
                ),
            });
        }
        if self.journal().is_read_only() {
            reasons.push(NotReady {
                code: "journal-read-only",
                message: "a failed commit could not be cut back off the journal, which refuses \
                          appends until the server restarts (recovery cuts what it left)"
                    .into(),
            });
        }
        reasons
    }

    /// What the filesystem and the kernel tell: free space, free file descriptors.
    fn filesystem_reasons(&self) -> Vec<NotReady> {
        let mut reasons = Vec::new();
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
        reasons
    }
}

/// How long `GET /readyz` waits for its filesystem checks (see [`Runtime::readiness_probe`]).
pub const PROBE_WAIT: Duration = Duration::from_secs(2);

/// The filesystem checks of readiness probes, one under way at a time.
#[derive(Debug, Default)]
pub(crate) struct Probe {
    /// When the check under way started.
    since: Mutex<Option<Instant>>,
}

impl Probe {
    /// Runs `check` on a blocking thread and waits up to `wait` for its reasons; if it has not
    /// returned by then, or one started earlier is still under way, answers `stuck(how long)`
    /// instead (the check goes on, and the first probe after it returns starts another).
    async fn run(
        self: &Arc<Probe>,
        wait: Duration,
        check: impl FnOnce() -> Vec<NotReady> + Send + 'static,
        stuck: impl Fn(Duration) -> NotReady,
    ) -> Vec<NotReady> {
        let started = {
            let mut since = self.since.lock();
            if let Some(started) = *since {
                return vec![stuck(started.elapsed())];
            }
            let now = Instant::now();
            *since = Some(now);
            now
        };
        /// Ends the check's turn however the check ends (a panic included).
        struct Done(Arc<Probe>);
        impl Drop for Done {
            fn drop(&mut self) {
                *self.0.since.lock() = None;
            }
        }
        let done = Done(self.clone());
        let task = tokio::task::spawn_blocking(move || {
            let _done = done;
            check()
        });
        match tokio::time::timeout(wait, task).await {
            Ok(Ok(reasons)) => reasons,
            Ok(Err(e)) => vec![NotReady {
                code: "disk-unknown",
                message: format!("the check of the data directory's filesystem failed: {e}"),
            }],
            Err(_) => vec![stuck(started.elapsed())],
        }
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
        let open = match std::fs::read_dir("/proc/self/fd") {
            // The listing's own descriptor is open while it is read: not counted.
            Ok(listing) => listing.count().saturating_sub(1) as u64,
            // Not one descriptor free to list them with: every one is open. (Taken for "cannot
            // tell", this said ready exactly when every commit failed.)
            Err(e)
                if matches!(
                    rustix::io::Errno::from_io_error(&e),
                    Some(rustix::io::Errno::MFILE | rustix::io::Errno::NFILE)
                ) =>
            {
                limit
            }
            Err(_) => return None,
        };
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

    /// A check that does not return (a hung network filesystem) holds one blocking thread:
    /// the probe waiting for it answers not ready once its wait is up, probes meanwhile
    /// answer at once without starting another check, and the first probe after it returns
    /// runs a fresh one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_check_that_hangs_holds_one_thread_and_probes_answer_meanwhile() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let probe = Arc::new(Probe::default());
        let started = Arc::new(AtomicUsize::new(0));
        let (release, hung) = std::sync::mpsc::channel::<()>();
        let stuck = |waited: Duration| NotReady {
            code: "disk-unknown",
            message: format!("{waited:?}"),
        };
        let check = {
            let started = started.clone();
            move || {
                started.fetch_add(1, Ordering::SeqCst);
                let _ = hung.recv();
                vec![]
            }
        };
        let at = Instant::now();
        let first = probe.run(Duration::from_millis(100), check, stuck).await;
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].code, "disk-unknown");
        assert!(
            at.elapsed() < Duration::from_secs(5),
            "waited {:?}",
            at.elapsed()
        );
        for _ in 0..10 {
            let again = probe
                .run(Duration::from_secs(60), || panic!("not started"), stuck)
                .await;
            assert_eq!(again[0].code, "disk-unknown");
        }
        assert_eq!(started.load(Ordering::SeqCst), 1, "one check under way");

        release.send(()).expect("release");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let fresh = probe
                .run(
                    Duration::from_secs(10),
                    || vec![NotReady::shutting_down()],
                    stuck,
                )
                .await;
            if fresh[0].code == SHUTTING_DOWN {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the hung check never ended its turn"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A check that panics ends its turn too.
        let panicked = probe
            .run(Duration::from_secs(10), || panic!("boom"), stuck)
            .await;
        assert!(panicked[0].message.contains("failed"), "{:?}", panicked);
        let after = probe.run(Duration::from_secs(10), Vec::new, stuck).await;
        assert!(after.is_empty(), "{after:?}");
    }
}
