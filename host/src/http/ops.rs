//! Operational routes: liveness, metrics, and the answers for unknown routes and methods.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::App;
use super::error::{ApiError, codes};

/// `GET /healthz`: 200 `{"status":"ok"}` while the server takes requests.
pub async fn healthz() -> Response {
    json_static(r#"{"status":"ok"}"#)
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
        format!("no route for {method} {target}"),
    )
}

/// A route called with a method it does not take: 405 `method-not-allowed`.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::http(
        StatusCode::METHOD_NOT_ALLOWED,
        codes::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}
