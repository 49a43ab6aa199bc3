//! HTTP-level counters, rendered on `/metrics` after the runtime's own.
//!
//! The runtime already counts events, latency and its errors by kind; this adds what only the
//! HTTP layer sees: requests per route and status class, requests in flight, and the errors
//! refused before the runtime was called (bad paths, bodies, queries, routes), by code.
//! Fixed arrays of atomics, so counting costs a few relaxed increments per request.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use axum::extract::{MatchedPath, Request};
use axum::response::Response;

use super::error::{ErrorMark, Origin, codes};

/// Route templates counted individually; anything else is counted as `unmatched`.
const ROUTES: [&str; 23] = [
    "/v1/devices",
    "/v1/devices/{id}",
    "/v1/devices/{id}/events",
    "/v1/devices/{id}/journal",
    "/v1/devices/{id}/resume",
    "/v1/devices/{id}/dead-letters",
    "/v1/devices/{id}/commands",
    "/v1/devices/{id}/commands/stream",
    "/v1/devices/{id}/commands/{command}/ack",
    "/v1/devices/{id}/timers",
    "/v1/devices/{id}/state",
    "/v1/events",
    "/v1/plugins",
    "/v1/plugins/{name}",
    "/v1/plugins/{name}/deploy",
    "/v1/plugins/{name}/dry-run",
    "/v1/plugins/{name}/rollback",
    "/v1/plugins/{name}/versions/{version}",
    "/v1/journal",
    "/v1/journal/retention",
    "/healthz",
    "/readyz",
    "/metrics",
];
const UNMATCHED: usize = ROUTES.len();
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// HTTP-level error codes counted here; the runtime's codes are counted by the runtime.
const HTTP_CODES: [&str; 14] = [
    codes::MALFORMED_REQUEST,
    codes::TOO_MANY_CONNECTIONS,
    codes::HEADERS_TOO_LARGE,
    codes::URI_TOO_LONG,
    codes::HTTP_VERSION_NOT_SUPPORTED,
    codes::BODY_TIMEOUT,
    codes::MALFORMED_QUERY,
    codes::NOT_FOUND,
    codes::METHOD_NOT_ALLOWED,
    codes::NOT_IMPLEMENTED,
    codes::PAYLOAD_TOO_LARGE,
    "invalid-id",
    "malformed-event",
    // A body refused as the buffered-body budget had no room for it (`http/extract.rs`).
    "overloaded",
];

/// See the module docs.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    requests: [[AtomicU64; CLASSES.len()]; ROUTES.len() + 1],
    errors: [AtomicU64; HTTP_CODES.len()],
    in_flight: AtomicI64,
    write_timeouts: AtomicU64,
}

impl HttpMetrics {
    fn record(&self, route: usize, status: u16, mark: Option<ErrorMark>) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[route.min(UNMATCHED)][class].fetch_add(1, Ordering::Relaxed);
        if let Some(mark) = mark.filter(|m| m.origin == Origin::Http)
            && let Some(i) = HTTP_CODES.iter().position(|c| *c == mark.code)
        {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A connection closed because writing its answer made no progress for
    /// `--write-timeout-secs` (a client that stopped reading): its request was counted by the
    /// status it was answered with, and the answer was cut short.
    pub(crate) fn record_write_timeout(&self) {
        self.write_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// A request hyper could not parse, answered with `code` before any route ran (see
    /// [`super::framing`]): counted under `unmatched`.
    pub(crate) fn record_unparsed(&self, status: axum::http::StatusCode, code: &'static str) {
        self.record(
            UNMATCHED,
            status.as_u16(),
            Some(ErrorMark {
                code,
                origin: Origin::Http,
            }),
        );
    }

    /// Requests answered so far on `route` (a template from the route table) with a status in
    /// `class` (`"2xx"`, `"4xx"`, ...).
    pub fn requests(&self, route: &str, class: &str) -> u64 {
        let r = ROUTES.iter().position(|t| *t == route).unwrap_or(UNMATCHED);
        CLASSES
            .iter()
            .position(|c| *c == class)
            .map_or(0, |c| self.requests[r][c].load(Ordering::Relaxed))
    }

    /// Appends the counters in Prometheus text format.
    pub fn render_into(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP drover_http_requests_total HTTP requests answered, by route and status class.\n\
             # TYPE drover_http_requests_total counter"
        );
        for (r, counters) in self.requests.iter().enumerate() {
            let route = ROUTES.get(r).copied().unwrap_or("unmatched");
            for (class, v) in CLASSES.iter().zip(counters) {
                let v = v.load(Ordering::Relaxed);
                if v > 0 {
                    let _ = writeln!(
                        out,
                        "drover_http_requests_total{{route=\"{route}\",status=\"{class}\"}} {v}"
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP drover_http_errors_total Requests refused by the HTTP layer before reaching the runtime, by code.\n\
             # TYPE drover_http_errors_total counter"
        );
        for (code, v) in HTTP_CODES.iter().zip(&self.errors) {
            let _ = writeln!(
                out,
                "drover_http_errors_total{{code=\"{code}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP drover_http_write_timeouts_total Connections closed because writing an answer made no progress for --write-timeout-secs (a client that stopped reading): the answer was cut short (its request is counted by its status above).\n\
             # TYPE drover_http_write_timeouts_total counter\n\
             drover_http_write_timeouts_total {}",
            self.write_timeouts.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP drover_http_in_flight HTTP requests being handled.\n\
             # TYPE drover_http_in_flight gauge\n\
             drover_http_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
    }
}

/// Counts `req` (see the module docs) while `answer` answers it.
pub(crate) async fn track<F>(
    metrics: &HttpMetrics,
    req: Request,
    answer: impl FnOnce(Request) -> F,
) -> Response
where
    F: Future<Output = Response>,
{
    let matched = req.extensions().get::<MatchedPath>();
    let route = matched
        .and_then(|p| ROUTES.iter().position(|t| *t == p.as_str()))
        .unwrap_or(UNMATCHED);
    // A route the router serves but this table misses would be counted as `unmatched` with
    // the 404s: the tests, which request every route, catch it.
    debug_assert!(
        matched.is_none() || route != UNMATCHED,
        "route {matched:?} is missing from the metrics table"
    );
    let guard = InFlight::enter(&metrics.in_flight);
    let response = answer(req).await;
    drop(guard);
    let mark = response.extensions().get::<ErrorMark>().copied();
    metrics.record(route, response.status().as_u16(), mark);
    response
}

/// Counts a request in flight until dropped, so a request whose client went away (and whose
/// future was dropped mid-way) is still counted out.
struct InFlight<'a>(&'a AtomicI64);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a AtomicI64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_route_class_and_http_code() {
        let m = HttpMetrics::default();
        m.record(2, 200, None);
        m.record(2, 429, None);
        m.record(
            UNMATCHED,
            404,
            Some(ErrorMark {
                code: codes::NOT_FOUND,
                origin: Origin::Http,
            }),
        );
        assert_eq!(m.requests("/v1/devices/{id}/events", "2xx"), 1);
        assert_eq!(m.requests("/v1/devices/{id}/events", "4xx"), 1);
        let mut text = String::new();
        m.render_into(&mut text);
        assert!(text.contains("drover_http_requests_total{route=\"unmatched\",status=\"4xx\"} 1"));
        assert!(text.contains("drover_http_errors_total{code=\"not-found\"} 1"));
    }
}
