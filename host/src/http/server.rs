//! The listener: binding, serving, and the graceful shutdown sequence.
//!
//! Shutdown is ordered so that nothing acknowledged is lost and nothing accepted is dropped:
//!
//! 1. stop accepting connections (the listening socket is closed);
//! 2. let in-flight requests finish and close idle keep-alive connections (each request is
//!    answered once its event is durable, so a drained request is a durable one);
//! 3. the caller then runs [`Runtime::shutdown`](crate::Runtime::shutdown), which drains the
//!    mailboxes and flushes the journal.
//!
//! Step 2 is bounded by a drain timeout so a client that never finishes its request cannot
//! hold the process up; requests cut off there were never acknowledged.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::serve::ListenerExt as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::Limits;
use crate::Runtime;

/// A running HTTP server. Dropping it without [`Server::shutdown`] stops nothing: the serving
/// task keeps running until the process exits.
pub struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Server {
    /// Binds `listen` (`host:port`; port 0 picks a free one) and starts serving the v1 API of
    /// `rt` on the current tokio runtime.
    pub async fn start(rt: Runtime, listen: &str, limits: Limits) -> anyhow::Result<Server> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        let listener = listener.tap_io(|tcp| {
            // Answers are small and written once: do not let Nagle hold them back.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY");
            }
        });
        let app = super::router(rt, limits);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        tracing::info!(%addr, "HTTP API listening");
        Ok(Server {
            addr,
            stop: Some(stop),
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
        match tokio::time::timeout(drain, &mut self.task).await {
            Ok(_) => true,
            Err(_) => {
                tracing::warn!(
                    ?drain,
                    "connections still open after the drain timeout; closing them"
                );
                self.task.abort();
                false
            }
        }
    }
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
