//! Operational routes: liveness, metrics, and the answers for unknown routes and methods.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use serde::Serialize;

use super::error::{ApiError, codes};
use super::{App, json};
use crate::readiness::{NotReady, SHUTTING_DOWN};

/// `GET /healthz`: 200 `{"status":"ok"}` while the server takes requests.
pub async fn healthz() -> Response {
    json_static(r#"{"status":"ok"}"#)
}

/// Answer of `GET /readyz`.
#[derive(Serialize)]
struct Ready<'a> {
    /// `ready` or `not-ready`.
    status: &'static str,
    /// Why not, each `{"code","message"}` (see `crate::readiness`); empty when ready.
    reasons: &'a [NotReady],
}

/// `GET /readyz`: 200 `{"status":"ready","reasons":[]}` when an event sent now can be made
/// durable; otherwise 503 `{"status":"not-ready","reasons":[{"code","message"}, ...]}` with
/// `Retry-After: 1` (see `crate::readiness`). Unlike `/healthz`, a full disk or a stop under
/// way makes it fail, so a load balancer sends requests elsewhere without restarting this
/// server, which would not help.
pub async fn readyz(State(app): State<App>) -> Response {
    let mut readiness = app.rt.readiness_probe().await;
    let stopping = *app.stopping.borrow();
    if stopping && !readiness.reasons.iter().any(|r| r.code == SHUTTING_DOWN) {
        readiness.reasons.insert(0, NotReady::shutting_down());
    }
    let (status, word) = if readiness.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not-ready")
    };
    let mut response = json::reply(
        status,
        &Ready {
            status: word,
            reasons: &readiness.reasons,
        },
    );
    if !readiness.is_ready() {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(1u32));
    }
    response
}

fn json_static(body: &'static str) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// `GET /metrics`: the runtime's counters, then the HTTP layer's, in Prometheus text format.
pub async fn metrics(State(app): State<App>) -> Response {
    let mut text = app.rt.render_metrics();
    app.metrics.render_into(&mut text);
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// Any path no route has: 404 `not-found`. A request target that is no path (`CONNECT
/// host:port`, `OPTIONS *`) is named as sent: its path is empty.
pub async fn not_found(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    let target = match uri.path() {
        "" | "/" if uri.authority().is_some() || uri == "*" => uri.to_string(),
        path => path.to_string(),
    };
    ApiError::http(
        StatusCode::NOT_FOUND,
        codes::NOT_FOUND,
        format!(
            "no route for {} {}",
            echoed(method.as_str()),
            echoed(&target)
        ),
    )
}

/// The most of a client's method or path an error message repeats: a 100 KB method made a
/// 100 KB answer.
const ECHOED: usize = 200;

/// `text` as an error message repeats it: whole up to [`ECHOED`] bytes, else its start
/// and how long it was.
pub(crate) fn echoed(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= ECHOED {
        return text.into();
    }
    let mut end = ECHOED;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len()).into()
}

/// A route called with a method it does not take: 405 `method-not-allowed`.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::http(
        StatusCode::METHOD_NOT_ALLOWED,
        codes::METHOD_NOT_ALLOWED,
        format!(
            "{} does not take {}",
            echoed(uri.path()),
            echoed(method.as_str())
        ),
    )
}
