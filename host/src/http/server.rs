//! The listener: binding, serving, and the graceful shutdown sequence.
//!
//! Shutdown is ordered so that nothing acknowledged is lost and nothing accepted is dropped:
//!
//! 1. stop accepting connections (the listening socket is closed);
//! 2. let in-flight requests finish and close idle keep-alive connections (each request is
//!    answered once its event is durable, so a drained request is a durable one); a request
//!    body still arriving gets a short grace ([`Limits::shutdown_grace`], 1 s) and is then answered 503
//!    `shutting-down`, and a connection with no request being handled (a head still
//!    arriving, an answer not read) is closed after the same grace;
//! 3. the caller then runs [`Runtime::shutdown`](crate::Runtime::shutdown), which drains the
//!    mailboxes and flushes the journal (`drover serve` runs
//!    [`Runtime::shutdown_by`](crate::Runtime::shutdown_by) with what is left of the drain
//!    timeout, so that guests whose final snapshots are slow cannot hold the stop either).
//!
//! Step 2 is bounded by a drain timeout so a client that never finishes its request cannot
//! hold the process up; requests cut off there were never acknowledged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;
use tokio_io_timeout::TimeoutStream;

use super::Limits;
use super::framing::{self, ShapedErrors};
use super::overflow;
use crate::Runtime;

/// A running HTTP server. Dropping it without [`Server::shutdown`] stops nothing: the serving
/// task keeps running until the process exits.
pub struct Server {
    rt: Runtime,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    /// Set when the drain timeout passes: every connection still open is closed.
    abandon: Arc<tokio::sync::watch::Sender<bool>>,
    /// Set at the drain timeout first: batches answer with what they have
    /// ([`super::AppState::cut_short`]).
    cut_short: Arc<tokio::sync::watch::Sender<bool>>,
    /// How long those answers get to be made and written before every connection still open
    /// is closed: the shutdown grace ([`Limits::shutdown_grace`]).
    cut_short_write: Duration,
    task: JoinHandle<()>,
}

/// Connections refused over the cap, logged at most once a second with how many there were
/// since the last line: one line each let a client opening connections in a loop flood the
/// log (436 lines for 436 refusals in a review). `drover_http_errors_total` counts each.
#[derive(Default)]
struct Refusals(crate::log_limit::LogLimit);

impl Refusals {
    fn note(&mut self, peer: SocketAddr) {
        if let Some(refused) = self.0.due() {
            tracing::warn!(
                %peer,
                refused,
                "too many open connections: refused {refused} since the last such line (at most one a second)",
            );
        }
    }
}

/// What one connection is doing, for [`closed_when_idle`].
#[derive(Clone, Default)]
struct Busy {
    /// Requests whose handler runs (an event waiting for its durability, a deploy...).
    handling: Arc<AtomicUsize>,
    /// Answers made so far (a handler done): one made after the server began to stop may
    /// still be in hyper's buffer, see [`closed_when_idle`].
    answers: Arc<AtomicUsize>,
    /// Answers whose body is still being written.
    answering: Arc<AtomicUsize>,
}

/// An answer's body, counted in [`Busy::answering`] until written (or dropped).
struct Answer {
    body: axum::body::Body,
    _writing: InFlight,
}

impl http_body::Body for Answer {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<axum::body::Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Counts something under way on a connection while it lives (cancellation included).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(busy: &Arc<AtomicUsize>) -> InFlight {
        busy.fetch_add(1, Ordering::AcqRel);
        InFlight(busy.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Completes once the connection may be closed at shutdown: the server is stopping,
/// `grace` ([`Limits::shutdown_grace`]) has passed, no request is being handled (one being handled is waited
/// for, bounded by the drain timeout; its body, if still arriving, only for the same grace:
/// then `extract::Body` answers 503 `shutting-down`), and every answer was written or had
/// one more grace to be.
/// Until then hyper serves the connection, and closes it itself after an answer.
async fn closed_when_idle(
    mut stopping: tokio::sync::watch::Receiver<bool>,
    busy: &Busy,
    grace: Duration,
) {
    if stopping.wait_for(|s| *s).await.is_err() {
        // The server went without stopping: nothing to do.
        return std::future::pending().await;
    }
    let answers = busy.answers.load(Ordering::Acquire);
    tokio::time::sleep(grace).await;
    let poll = Duration::from_millis(20);
    while busy.handling.load(Ordering::Acquire) > 0 {
        tokio::time::sleep(poll).await;
    }
    let written_by = tokio::time::Instant::now() + grace;
    while busy.answering.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < written_by {
        tokio::time::sleep(poll).await;
    }
    if busy.answers.load(Ordering::Acquire) != answers {
        // hyper takes an answer's body whole and writes it from its own buffer: the body is
        // done before the bytes are sent. Its graceful close ends the connection once they
        // are; closed here at once, a large answer (a batch's) was cut off mid-body.
        tokio::time::sleep_until(written_by).await;
    }
}

impl Server {
    /// Binds `listen` (`host:port`; port 0 picks a free one) and starts serving the v1 API of
    /// `rt` on the current tokio runtime.
    ///
    /// Each connection is served by hyper's HTTP/1 with a header-read timeout
    /// ([`Limits::header_read_timeout`]), which also bounds how long a keep-alive connection
    /// may sit idle, and a write timeout ([`Limits::write_timeout`]) for clients that stop
    /// reading; at most [`Limits::max_connections`] are open at once.
    pub async fn start(rt: Runtime, listen: &str, limits: Limits) -> anyhow::Result<Server> {
        Server::start_on(rt, bind(listen).await?, limits)
    }

    /// [`Server::start`] on a listener bound already: `drover serve` binds before it opens
    /// the data directory, so a bad address or a port in use fails before anything is
    /// created or locked.
    pub fn start_on(
        rt: Runtime,
        listener: tokio::net::TcpListener,
        limits: Limits,
    ) -> anyhow::Result<Server> {
        let addr = listener.local_addr().context("reading the bound address")?;
        let header_timeout = limits.header_read_timeout;
        let write_timeout = limits.write_timeout;
        let grace = limits.shutdown_grace;
        let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let stopping = Arc::new(tokio::sync::watch::Sender::new(false));
        let abandon = Arc::new(tokio::sync::watch::Sender::new(false));
        let abandoning = abandon.clone();
        let cut_short = Arc::new(tokio::sync::watch::Sender::new(false));
        let state: super::App = Arc::new(super::AppState {
            rt: rt.clone(),
            body_budget: super::body_budget(&limits),
            answer_budget: super::answer_budget(&limits),
            page_builds: super::page_builds(),
            limits,
            metrics: super::metrics::HttpMetrics::default(),
            stopping: stopping.clone(),
            cut_short: cut_short.clone(),
        });
        let replaced = framing::counted_by(state.clone());
        let counted = state.clone();
        let app = super::router_of(state);
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let graceful = GracefulShutdown::new();
            let refusals = Arc::new(parking_lot::Mutex::new(Refusals::default()));
            let probes_past_cap = Arc::new(Semaphore::new(overflow::PROBES_PAST_CAP));
            let answered_past_cap = Arc::new(Semaphore::new(overflow::ANSWERED_PAST_CAP));
            // Out of file descriptors, every accept fails for as long as it lasts.
            let mut accept_failures = crate::log_limit::LogLimit::default();
            let write_timeouts = Arc::new(parking_lot::Mutex::new(
                crate::log_limit::LogLimit::default(),
            ));
            loop {
                let (tcp, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors and the like: back off, keep serving.
                            if let Some(failed) = accept_failures.due() {
                                tracing::warn!(
                                    error = %e,
                                    failed,
                                    "accept failed ({failed} since the last such line, at most \
                                     one a second)"
                                );
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = &mut stopped => break,
                };
                // Answers are small and written once: do not let Nagle hold them back.
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "could not set TCP_NODELAY");
                }
                let client = super::peer::Peer::new(std::os::fd::AsRawFd::as_raw_fd(&tcp));
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    let refuse = {
                        let (replaced, refusals) = (replaced.clone(), refusals.clone());
                        move || {
                            refusals.lock().note(peer);
                            // Counted as the API's other refusals are, so it can be alerted on.
                            replaced(
                                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                super::error::codes::TOO_MANY_CONNECTIONS,
                            );
                        }
                    };
                    // Too many answered already: closed at once, its descriptor freed.
                    let Ok(answering) = answered_past_cap.clone().try_acquire_owned() else {
                        drop(tcp);
                        refuse();
                        continue;
                    };
                    // A probe is answered all the same (see `http/overflow.rs`).
                    let probe_place = probes_past_cap.clone().try_acquire_owned().ok();
                    let app = app.clone();
                    tokio::spawn(async move {
                        let _answering = answering;
                        overflow::answer(tcp, probe_place, app, refuse).await;
                    });
                    continue;
                };
                // hyper has no write timeout: a client that stops reading would hold its
                // connection and the unsent answer for ever. A write that makes no progress
                // for `write_timeout` fails, and the connection with it.
                let mut io = TimeoutStream::new(tcp);
                io.set_write_timeout(Some(write_timeout));
                // hyper's bare answer to a head it cannot parse becomes the API's error.
                let io = ShapedErrors::new(Box::pin(io), replaced.clone());
                // Requests being handled, and answers being written, on this connection (see
                // `closed_when_idle`).
                let busy = Busy::default();
                let service = {
                    let (tower, busy) = (TowerToHyperService::new(app.clone()), busy.clone());
                    hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                        req.extensions_mut().insert(client);
                        let handling = InFlight::enter(&busy.handling);
                        let answer = hyper::service::Service::call(&tower, req);
                        let answering = busy.answering.clone();
                        let answers = busy.answers.clone();
                        async move {
                            let answer = answer.await.map(|response| {
                                response.map(|body| Answer {
                                    body,
                                    _writing: InFlight::enter(&answering),
                                })
                            });
                            drop(handling);
                            answers.fetch_add(1, Ordering::AcqRel);
                            answer
                        }
                    })
                };
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    // A client that shuts down its side once its request is sent (`nc -N`,
                    // some scripts) still gets the answer; hyper would close at once, after
                    // its request was handled (an event made durable) but never answered.
                    .half_close(true)
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(io), service);
                let conn = graceful.watch(conn);
                let stopping = stopping.subscribe();
                let mut abandoned = abandoning.subscribe();
                let (counted, write_timeouts) = (counted.clone(), write_timeouts.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        served = conn => if let Err(e) = served {
                            if timed_out_writing(&e) {
                                // The operator's only trace of an answer cut short: counted,
                                // and logged at most once a second.
                                counted.metrics.record_write_timeout();
                                if let Some(cut) = write_timeouts.lock().due() {
                                    tracing::info!(
                                        %peer,
                                        cut,
                                        timeout = ?write_timeout,
                                        "an answer made no progress for the write timeout (the \
                                         client stopped reading): connection closed, the answer \
                                         cut short ({cut} since the last such line, at most one \
                                         a second; drover_http_write_timeouts_total)"
                                    );
                                }
                            } else {
                                tracing::debug!(%peer, error = %e, "connection closed with an error");
                            }
                        },
                        () = closed_when_idle(stopping, &busy, grace) => {
                            tracing::debug!(%peer, "connection closed at shutdown: no request was being handled");
                        }
                        // The drain timeout passed: closed whatever it is doing (its request,
                        // if any, was never answered, so never acknowledged).
                        _ = abandoned.wait_for(|a| *a) => {}
                    }
                    drop(permit);
                });
            }
            // Step 1 done (the listener is dropped here); step 2: idle connections close
            // now, busy ones after their current request, and the rest (a request head or
            // an answer still on its way) after a short grace.
            drop(listener);
            stopping.send_replace(true);
            graceful.shutdown().await;
        });
        tracing::info!(%addr, "HTTP API listening");
        Ok(Server {
            rt,
            addr,
            stop: Some(stop),
            abandon,
            cut_short,
            cut_short_write: grace,
            task,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL of the API, `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Steps 1 and 2 of the module docs: stops accepting, then waits up to `drain` for the
    /// open requests and connections to finish. Returns whether everything drained in time.
    pub async fn shutdown(mut self, drain: Duration) -> bool {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Long polls and command streams would otherwise hold their connections (and the
        // drain) until they time out.
        self.rt.stop_waiting();
        // A deploy's folds of a version that spins would hold the drain to its end.
        self.rt.stop_upgrades();
        if tokio::time::timeout(drain, &mut self.task).await.is_ok() {
            return true;
        }
        // Guest calls still running (guests that spin in trial `init`s or activations, with
        // seconds of budget each, in turn on the slow lane) are stopped, so their requests
        // get an answer within the grace instead of being closed without one; batches still
        // waiting answer with what they have. Both get a moment to be written.
        self.rt.stop_guest_calls();
        self.cut_short.send_replace(true);
        if tokio::time::timeout(self.cut_short_write, &mut self.task)
            .await
            .is_ok()
        {
            tracing::warn!(
                ?drain,
                "requests still waiting at the drain timeout were answered 503: shutting-down, or overloaded where their guest call was stopped"
            );
            return false;
        }
        tracing::warn!(
            ?drain,
            "connections still open after the drain timeout; closing them"
        );
        self.abandon.send_replace(true);
        self.task.abort();
        false
    }
}

/// Connections the kernel may hold, handshaken, before the server accepts them (clamped by
/// the kernel to `net.core.somaxconn`). std's and tokio's `bind` ask for 128: a burst of a
/// thousand clients connecting at once (a gateway fleet reconnecting after a network blip)
/// then overflowed it, and each dropped handshake cost its client a 1 s SYN retransmission
/// (a review measured p90 1.05 s). The accept loop drains the queue quickly; past the
/// connection cap its refusals are answered there (`http/overflow.rs`).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `listen` (`host:port`; port 0 picks a free one), for [`Server::start_on`]: the
/// first of its addresses that binds, as `TcpListener::bind` does.
pub async fn bind(listen: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let bind_one = |addr: std::net::SocketAddr| -> std::io::Result<tokio::net::TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As std's listeners do on Unix: a restart can bind while old connections linger.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    let mut last = None;
    for addr in tokio::net::lookup_host(listen)
        .await
        .with_context(|| format!("binding {listen}"))?
    {
        match bind_one(addr) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => anyhow::Error::new(e),
        None => anyhow::anyhow!("the name resolved to no address"),
    })
    .with_context(|| format!("binding {listen}"))
}

/// Resolves at the first SIGTERM or Ctrl-C (SIGINT).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received: shutting down"),
        () = term => tracing::info!("SIGTERM received: shutting down"),
    }
}

/// Whether a connection's error is its write timeout (`--write-timeout-secs`): an I/O error
/// of kind `TimedOut` under hyper's, which only the timed stream around the socket raises
/// (hyper's own header timeout is not an I/O error).
fn timed_out_writing(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::TimedOut;
        }
        source = s.source();
    }
    false
}
