//! The one middleware every request passes through, around the router: it counts the request,
//! refuses framing no route can use, counts large answers in the budget of answers held for
//! their clients ([`answers`]), and closes a connection whose request body went unread.
//!
//! From the outside in: the body is watched ([`keep_alive`]), the request is counted
//! ([`metrics`]: the refusals below included), then a broken `Host` and unsupported
//! transfer codings are refused ([`extract::host`], [`extract::transfer_codings`]) before the
//! route runs. One middleware rather than one per concern: axum boxes each middleware's
//! future and the service it calls on every request, and the four layers this replaces cost a
//! single event ~4-5 µs of server CPU out of ~55 µs (see the README, "Over HTTP").

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::{App, answers, extract, keep_alive, metrics};

/// The middleware (see the module docs); the router applies it to every route and fallback.
pub async fn front_door(State(app): State<App>, req: Request, next: Next) -> Response {
    let (req, read) = keep_alive::watch(req);
    // Borrowed into the routed future: no clone of the state per request.
    let held = &app;
    let response = metrics::track(&app.metrics, req, |req| async move {
        match extract::host(&req).or_else(|| extract::transfer_codings(&req)) {
            Some(refusal) => refusal,
            None => answers::hold(held, next.run(req).await).await,
        }
    })
    .await;
    keep_alive::close_unless_read(response, read.as_deref())
}
