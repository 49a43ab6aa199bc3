//! Extractors that refuse bad requests with the API's error shape.
//!
//! axum's own extractors answer plain-text rejections; these wrap them so that a bad path, a
//! bad query or an unreadable body is answered like every other error (see [`super::error`]).

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::{ApiError, codes};
use crate::error::{Error, validate_id};

/// A device id or plugin name taken from the single path parameter of a route, checked with
/// [`validate_id`]. The segment is percent-decoded first, so `%2F`, `%00` and friends are
/// refused like their literal forms.
#[derive(Debug, Clone)]
pub struct Id(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(path_rejection)?;
        validate_id(&id).map_err(ApiError::refused)?;
        Ok(Id(id))
    }
}

/// A plugin name and a version number from a `/v1/plugins/{name}/versions/{version}` path.
#[derive(Debug, Clone)]
pub struct NameAndVersion(pub String, pub u32);

impl<S: Send + Sync> FromRequestParts<S> for NameAndVersion {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path((name, version)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(path_rejection)?;
        validate_id(&name).map_err(ApiError::refused)?;
        let version = version.parse().map_err(|_| {
            ApiError::malformed_request(format!("`{version}` is not a version number"))
        })?;
        Ok(NameAndVersion(name, version))
    }
}

/// A device id and a command id from a `/v1/devices/{id}/commands/{command}/ack` path (the
/// command id is checked by the runtime).
#[derive(Debug, Clone)]
pub struct IdAndCommand(pub String, pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdAndCommand {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path((id, command)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(path_rejection)?;
        validate_id(&id).map_err(ApiError::refused)?;
        Ok(IdAndCommand(id, command))
    }
}

fn path_rejection(r: PathRejection) -> ApiError {
    // The only way a matched route's parameter fails is bad percent-encoding (not UTF-8).
    ApiError::refused(Error::InvalidId(r.body_text()))
}

/// A whole number in a query string that the route caps (a page size, a wait in ms), for
/// `#[serde(default, deserialize_with = "saturating")]`: digits only, any number of them. One
/// too large for its type is the type's maximum, which the route's cap then takes like any
/// large value: the README caps a large `limit` rather than refusing it, however many digits
/// it has (20 digits were refused as "number too large", 19 capped). Seqs are not capped:
/// one past `u64` names nothing and stays a `malformed-query`.
pub(crate) fn saturating<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr + Largest,
{
    let text = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(serde::de::Error::custom(format!(
            "`{text}` is not a whole number (digits only)"
        )));
    }
    // Digits only: the one way parsing fails is overflow.
    Ok(Some(text.parse().unwrap_or(T::LARGEST)))
}

/// The largest value of a number type (for [`saturating`]).
pub(crate) trait Largest {
    const LARGEST: Self;
}

impl Largest for u64 {
    const LARGEST: u64 = u64::MAX;
}

impl Largest for usize {
    const LARGEST: usize = usize::MAX;
}

/// For a route that takes no query parameters: any is 400 `malformed-query`, never ignored,
/// so a parameter a client expects to do something (`dead-letters?limit=5`) cannot be
/// dropped without a word. Routes that take parameters refuse the ones they do not know the
/// same way ([`QueryOf`] of a struct with `deny_unknown_fields`). `/healthz` and `/metrics`
/// do not use it: probes and scrapers add parameters of their own.
#[derive(Debug, Clone, Copy)]
pub struct NoQuery;

impl<S: Send + Sync> FromRequestParts<S> for NoQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        // `?` alone, or with nothing between its `&`s, names no parameter.
        if query.split('&').all(str::is_empty) {
            return Ok(NoQuery);
        }
        let names: Vec<String> = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .take(5)
            .map(|pair| {
                let name = pair.split('=').next().unwrap_or(pair);
                format!("`{}`", name.chars().take(64).collect::<String>())
            })
            .collect();
        Err(ApiError::malformed_query(format!(
            "{} takes no query parameters (got {})",
            parts.uri.path(),
            names.join(", ")
        )))
    }
}

/// Query parameters deserialized into `T`; a parameter that does not parse is 400
/// `malformed-query`.
#[derive(Debug, Clone)]
pub struct QueryOf<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryOf<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(t)| QueryOf(t))
            .map_err(|r: QueryRejection| ApiError::malformed_query(short_quotes(&r.body_text())))
    }
}

/// `text` with each long word it quotes cut to its start and length. serde's words for an
/// unknown query parameter name it twice (once in backticks, once as the path of the
/// error), and a 64 KiB parameter name made a 131 KB error answer (a review).
pub(crate) fn short_quotes(text: &str) -> String {
    const KEEP: usize = 48;
    let mut out = String::with_capacity(text.len().min(1024));
    let mut rest = text;
    let mut inside = false;
    while let Some(at) = rest.find('`') {
        push_part(&mut out, &rest[..at], inside, KEEP);
        out.push('`');
        rest = &rest[at + 1..];
        inside = !inside;
    }
    push_part(&mut out, rest, inside, KEEP);
    out
}

/// Appends `part` to `out`, a quoted word cut whole, an unquoted one word by word.
fn push_part(out: &mut String, part: &str, inside: bool, keep: usize) {
    let cut = |word: &str| -> String {
        if word.len() <= keep * 2 {
            return word.to_string();
        }
        let mut end = keep;
        while !word.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… ({} bytes)", &word[..end], word.len())
    };
    if inside {
        out.push_str(&cut(part));
    } else {
        // A word's trailing punctuation (the `:` after a path) is kept, not counted.
        let words: Vec<String> = part
            .split(' ')
            .map(|w| {
                let core = w.trim_end_matches([':', ',', '.', ';']);
                format!("{}{}", cut(core), &w[core.len()..])
            })
            .collect();
        out.push_str(&words.join(" "));
    }
}

/// The raw request body, within the route's limit (`limited` in `http/mod.rs`). Over the
/// limit is 413 `payload-too-large`; a body that cannot be read is 400 `malformed-request`;
/// one that does not fit in the buffered-body budget as it arrives is 503 `overloaded` (see
/// `limits.rs`). Its share of that budget is held as long as the body is.
#[derive(Debug)]
pub struct Body(pub Bytes, #[allow(dead_code)] BodyReservation);

/// A body's share of the buffered-body budget, given back when the body is dropped.
#[derive(Debug, Default)]
pub struct BodyReservation(Option<tokio::sync::OwnedSemaphorePermit>);

/// Past its first 64 KiB, a body takes the budget in steps of this many KiB (or up to the
/// route's limit, if less), so that one arriving in many small chunks does not take the
/// semaphore at each; below, it takes what it holds, so that a byte held by each of the
/// 8,192 connections allowed takes 8 MiB, not the whole budget (a review: with 64 KiB
/// taken for a first byte, 8,192 bytes would have refused every body).
const RESERVE_STEP_KIB: u32 = 64;

impl BodyReservation {
    /// Grows the share to cover `len` bytes of a body whose route allows `max`; refused as
    /// the server's overload when the budget has no room now.
    fn cover(&mut self, len: usize, max: usize, state: &super::App) -> Result<(), ApiError> {
        let kib = |b: usize| u32::try_from(b.div_ceil(1024)).unwrap_or(u32::MAX);
        let held = self.0.as_ref().map_or(0, |p| p.num_permits()) as u32;
        let needed = kib(len);
        if needed <= held {
            return Ok(());
        }
        let ask = if needed <= RESERVE_STEP_KIB {
            needed - held
        } else {
            (needed - held).max(RESERVE_STEP_KIB.min(kib(max).saturating_sub(held)))
        };
        let more = state
            .body_budget
            .clone()
            .try_acquire_many_owned(ask)
            .map_err(|_| {
                // Counted as the HTTP layer's (`drover_http_errors_total`): the runtime never
                // saw the request.
                ApiError::refused(crate::Error::Overloaded(format!(
                    "the server is buffering as many request bodies as it may at once ({} MiB \
                     together, `--max-buffered-body-mib`), and this one's next {ask} KiB did \
                     not fit; try again shortly",
                    state.limits.body_budget_bytes() >> 20,
                )))
            })?;
        match &mut self.0 {
            Some(permit) => permit.merge(more),
            None => self.0 = Some(more),
        }
        Ok(())
    }
}

impl FromRequest<super::App> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &super::App) -> Result<Self, Self::Rejection> {
        let route_limit = req.extensions().get::<RouteLimit>().map(|l| l.0);
        let limit = state.limits.body_read_timeout;
        let grace = state.limits.shutdown_grace;
        let mut stopping = state.stopping.subscribe();
        // Once the server stops, a body still arriving gets the shutdown grace and no more: a
        // small body whose bytes were in flight is handled (its client sent it before the
        // server stopped), one stalled mid-way does not hold the shutdown.
        let stopped = async move {
            if stopping.wait_for(|s| *s).await.is_err() {
                // The server went without stopping: never.
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(grace).await;
        };
        let read = tokio::select! {
            biased;
            read = tokio::time::timeout(limit, read_body(req, state, route_limit)) => read,
            // Not handled (retry later or elsewhere).
            () = stopped => return Err(crate::Error::ShuttingDown.into()),
        };
        match read {
            Ok(read) => read,
            Err(_) => Err(ApiError::http(
                StatusCode::REQUEST_TIMEOUT,
                codes::BODY_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    limit.as_secs_f64()
                ),
            )),
        }
    }
}

/// Reads the body of `req` whole, at most its route's limit, taking its room in the
/// buffered-body budget as its bytes arrive. Room taken before they arrive (the declared
/// length, or a chunked body's whole route limit) let 8 connections that sent a head for a
/// 64 MiB upload and then nothing hold the whole 512 MiB for the 60 s body timeout, and every
/// event meanwhile was refused `503 overloaded` (a review).
async fn read_body(
    req: Request,
    state: &super::App,
    route_limit: Option<usize>,
) -> Result<Body, ApiError> {
    use futures::StreamExt as _;
    let max = route_limit.unwrap_or(state.limits.max_request_bytes);
    let mut reservation = BodyReservation::default();
    let mut stream = req.into_body().into_data_stream();
    // Most bodies arrive in one chunk, kept as it is; a second one starts a copy.
    let mut first: Option<Bytes> = None;
    let mut joined: Vec<u8> = Vec::new();
    let mut len = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| unreadable_body(&e.to_string()))?;
        if chunk.is_empty() {
            continue;
        }
        len = len.saturating_add(chunk.len());
        if len > max {
            return Err(over_limit(route_limit));
        }
        reservation.cover(len, max, state)?;
        match first.take() {
            None if joined.is_empty() => first = Some(chunk),
            None => joined.extend_from_slice(&chunk),
            Some(head) => {
                joined.reserve(head.len() + chunk.len());
                joined.extend_from_slice(&head);
                joined.extend_from_slice(&chunk);
            }
        }
    }
    let bytes = match first {
        Some(only) => only,
        None => Bytes::from(joined),
    };
    Ok(Body(bytes, reservation))
}

/// Refuses, on every route and before any body is read, a request whose transfer codings
/// are not just `chunked` once. Another coding is 501 (as RFC 9112 section 6.1 asks of a
/// server that does not understand one): hyper undoes `chunked` only, and handed the route
/// the still compressed bytes of `gzip, chunked`, refused as malformed JSON, which blamed the
/// body. `chunked` twice is 400: HTTP/1.1 forbids it, and hyper undid it once, so a proxy
/// in front that read it otherwise would see another request boundary than the server.
pub(crate) fn transfer_codings(req: &Request) -> Option<axum::response::Response> {
    use axum::response::IntoResponse as _;
    let mut chunked = 0;
    let mut unknown = None;
    for coding in req
        .headers()
        .get_all(axum::http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        if coding.eq_ignore_ascii_case("chunked") {
            chunked += 1;
        } else if unknown.is_none() {
            unknown = Some(coding.to_string());
        }
    }
    if let Some(coding) = unknown {
        return Some(
            ApiError::http(
                StatusCode::NOT_IMPLEMENTED,
                codes::NOT_IMPLEMENTED,
                format!(
                    "transfer coding `{coding}` is not supported: send the body as it is, with \
                     Content-Length or Transfer-Encoding: chunked"
                ),
            )
            .into_response(),
        );
    }
    (chunked > 1).then(|| {
        ApiError::malformed_request(
            "Transfer-Encoding names `chunked` more than once; HTTP/1.1 allows it once, last",
        )
        .into_response()
    })
}

/// A route's body limit in bytes, for the message of a body found over it as it arrived.
#[derive(Debug, Clone, Copy)]
struct RouteLimit(usize);

/// Refuses a request whose declared `Content-Length` is over `max` before its body is read
/// (see `limits.rs`); the route's `DefaultBodyLimit` still counts the bytes of a body that
/// declares no length, whose refusal names `max` too.
pub async fn declared_length(
    max: usize,
    mut req: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    req.extensions_mut().insert(RouteLimit(max));
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > max as u64 => ApiError::http(
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::PAYLOAD_TOO_LARGE,
            format!("the request body of {n} bytes exceeds this route's limit of {max} bytes"),
        )
        .into_response(),
        _ => next.run(req).await,
    }
}

/// A body that went past its route's limit as it arrived.
fn over_limit(limit: Option<usize>) -> ApiError {
    ApiError::http(
        StatusCode::PAYLOAD_TOO_LARGE,
        codes::PAYLOAD_TOO_LARGE,
        match limit {
            // The body declared no length (chunked): it went over as it arrived.
            Some(max) => format!(
                "the request body exceeds this route's limit of {max} bytes (its chunks went \
                 past it as they arrived)"
            ),
            None => "the request body exceeds this route's size limit".to_string(),
        },
    )
}

/// A body that could not be read: hyper's own words ("error reading a body from
/// connection") do not say what was wrong; a body that fails here has a broken chunked
/// framing (a chunk size that is not hex, a chunk shorter than it said) or a connection that
/// broke mid-body.
fn unreadable_body(cause: &str) -> ApiError {
    ApiError::malformed_request(format!(
        "the request body could not be read: its chunked framing is malformed, or the \
         connection broke before its end ({cause})"
    ))
}

impl Body {
    /// The body as UTF-8 text, or the error `not_text` makes of the decoding failure.
    pub fn text(&self, not_text: impl FnOnce(String) -> ApiError) -> Result<&str, ApiError> {
        std::str::from_utf8(&self.0).map_err(|e| not_text(format!("the body is not UTF-8: {e}")))
    }

    /// The body parsed as JSON into `T` (borrowing from it where `T` allows); any failure is
    /// 400 `malformed-request`.
    ///
    /// Every body of the API is an object: serde would also take a struct's fields as an
    /// array in order (`[[["t2", {...}]]]` was a batch), and its refusal of other shapes
    /// named the server's own types.
    pub fn json<'a, T: serde::Deserialize<'a>>(&'a self) -> Result<T, ApiError> {
        // A refusal of what only a strict reader refuses is said as an event's is
        // (`json_check`): serde_json's own words for a lone surrogate were "unexpected end of
        // hex escape", or "lone leading surrogate" of a trailing one. Only once serde_json
        // refused the body: a batch holds its items raw, and each is refused on its own.
        let invalid = |e: serde_json::Error| {
            let strict = std::str::from_utf8(&self.0)
                .ok()
                .filter(|_| e.classify() == serde_json::error::Category::Syntax)
                .and_then(|text| crate::json_check::strict(text).err());
            ApiError::malformed_request(format!(
                "invalid JSON body: {}",
                strict.unwrap_or_else(|| e.to_string())
            ))
        };
        if self.0.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            serde_json::from_slice::<serde::de::IgnoredAny>(&self.0).map_err(invalid)?;
            return Err(ApiError::malformed_request(
                "the body must be a JSON object".to_string(),
            ));
        }
        serde_json::from_slice(&self.0).map_err(invalid)
    }
}

/// Refuses, on every route and before any body is read, a request with more than one `Host`
/// header or one that does not hold a host and optional port (or nothing, which a client
/// sends for a target with no authority), and an HTTP/1.1 request with none: 400
/// `malformed-request`, as RFC 9112 section 3.2 asks of every server. Every HTTP/1.1 client
/// sends one; a request without, or with two (or two merged into one line, `a,b`), is a
/// broken client or one probing for a proxy in front that would route it by another host than
/// the server saw. HTTP/1.0 requests, which predate the header, may leave it out.
///
/// Only requests read off a connection (those the server gives a [`Peer`](super::peer::Peer))
/// are checked: the header is the wire protocol's, and a request made in process (an embedder
/// calling [`router`](super::router) with tower's `oneshot`, the answer to a probe past the
/// connection cap) has none to give.
pub(crate) fn host(req: &Request) -> Option<axum::response::Response> {
    use axum::response::IntoResponse as _;
    req.extensions().get::<super::peer::Peer>()?;
    let mut hosts = req.headers().get_all(axum::http::header::HOST).iter();
    let refusal = match (hosts.next(), hosts.next()) {
        (None, _) if req.version() == axum::http::Version::HTTP_11 => Some(
            "the request has no Host header; HTTP/1.1 requires one (RFC 9112, section 3.2)"
                .to_string(),
        ),
        (None, _) => None,
        (Some(_), Some(_)) => Some(
            "the request has more than one Host header; HTTP allows one (RFC 9112, section 3.2)"
                .to_string(),
        ),
        (Some(value), None) => (!value.to_str().is_ok_and(is_host_and_port)).then(|| {
            format!(
                "Host `{}` is not a host and optional port (RFC 9112, section 3.2)",
                super::ops::echoed(&String::from_utf8_lossy(value.as_bytes()))
            )
        }),
    };
    refusal.map(|message| {
        // Closed, as every request refused before routing is: a client this broken (or
        // probing) is not kept on a keep-alive connection until the header timeout.
        let mut response = ApiError::malformed_request(message).into_response();
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        response
    })
}

/// Whether `value` is a `Host` field value: empty, or `uri-host [ ":" port ]` (RFC 3986): an
/// IPv6 literal in brackets or a name of unreserved characters, sub-delimiters and
/// percent-escapes, and a port of at most 65535. A comma, which RFC 3986 allows in a name, is
/// refused: it is what two Host lines merged into one look like.
fn is_host_and_port(value: &str) -> bool {
    if value.is_empty() {
        return true;
    }
    let (host, port) = if let Some(literal) = value.strip_prefix('[') {
        let Some((address, rest)) = literal.split_once(']') else {
            return false;
        };
        if address.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match rest.strip_prefix(':') {
            Some(port) => (None, Some(port)),
            None if rest.is_empty() => (None, None),
            None => return false,
        }
    } else {
        match value.rsplit_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(value), None),
        }
    };
    let name_ok = host.is_none_or(|h| {
        let bytes = h.as_bytes();
        !h.is_empty()
            && bytes.iter().enumerate().all(|(i, b)| match b {
                b'%' => bytes
                    .get(i + 1..i + 3)
                    .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)),
                b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*'
                | b'+' | b';' | b'=' => true,
                b => b.is_ascii_alphanumeric(),
            })
    });
    let port_ok = port.is_none_or(|p| {
        p.is_empty()
            || (p.len() <= 5
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u32>().is_ok_and(|n| n <= 65535))
    });
    name_ok && port_ok
}

#[cfg(test)]
mod tests {
    use super::{is_host_and_port, short_quotes};

    /// Long names are cut wherever the message has them; short ones and the rest stay.
    #[test]
    fn long_quoted_names_are_cut_to_their_start_and_length() {
        let short = "Failed to deserialize query string: x: unknown field `x`, expected `after`";
        assert_eq!(short_quotes(short), short);
        let name = "é".repeat(30_000);
        let text = format!(
            "Failed to deserialize query string: {name}: unknown field `{name}`, expected one \
             of `after`, `limit`"
        );
        let cut = short_quotes(&text);
        assert!(cut.len() < 400, "{cut}");
        assert_eq!(cut.matches("… (60000 bytes)").count(), 2, "{cut}");
        assert!(cut.ends_with("expected one of `after`, `limit`"), "{cut}");
        assert!(cut.contains("unknown field `éé"), "{cut}");
    }

    #[test]
    fn host_values_are_a_host_and_an_optional_port() {
        for ok in [
            "",
            "a",
            "a:80",
            "a:",
            "example.com:8080",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:8080",
            "xn--bcher-kva.example",
            "a%20b",
            "a_b~c!$&'()*+;=d",
            "a:65535",
        ] {
            assert!(is_host_and_port(ok), "{ok:?} refused");
        }
        for bad in [
            "a b",
            "a/b",
            "u@a",
            "a:80:90",
            "[::1",
            "a:xyz",
            "a:99999999",
            "a:65536",
            ":80",
            "a,b",
            "[zz]",
            "[::1]x",
            "a%2",
            "a%zz",
            "a?b",
            "a#b",
        ] {
            assert!(!is_host_and_port(bad), "{bad:?} accepted");
        }
    }
}
