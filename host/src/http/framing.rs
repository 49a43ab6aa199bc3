//! Requests hyper cannot parse, answered in the API's error shape.
//!
//! hyper answers a request head it cannot parse itself, before any route or service runs: a
//! broken request line or header, two different `Content-Length`s, a `Transfer-Encoding`
//! that does not end in `chunked` (`400`), more than 100 headers or a head over ~400 KiB
//! (`431`), a path over 64 KiB (`414`). The answer is bare (no body) and the connection is
//! closed after it; hyper 1 has no hook to shape it. A client that branches on the API's
//! `{"error": {"code", "message"}}` then found nothing to read.
//!
//! [`ShapedErrors`] sits between hyper and the socket and recognizes that answer on its way
//! out. hyper writes it as the status line, `connection: close`, `content-length: 0` (then
//! `date`), and it is the last thing written on the connection. No answer of the API's
//! handlers looks like that (theirs carry `content-type` and a JSON body), and no body the
//! API writes holds a raw CR LF (JSON escapes them inside strings and allows no letters
//! outside; `/metrics` and the event streams end their lines with LF). It writes the API's
//! error of the same status instead (codes `malformed-request`, `headers-too-large`,
//! `uri-too-long`), still with `connection: close`, and counts it on `/metrics`
//! (`drover_http_errors_total`, and `drover_http_requests_total` under `unmatched`).
//!
//! If a later hyper writes its answer differently, nothing breaks: the bare answer goes out
//! as before, and the test `connections::requests_hyper_cannot_parse_get_the_error_shape`
//! fails.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::http::StatusCode;
use memchr::memmem;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::App;
use super::error::{ApiError, codes};

/// What follows the status line in hyper's automatic answer (hyper 1.12).
const AUTOMATIC_HEADERS: &[u8] = b"\r\nconnection: close\r\ncontent-length: 0\r\n";

/// The end of a head.
const HEAD_END: &[u8] = b"\r\n\r\n";

/// Each automatic answer's status line, with the error the API gives in its place.
const AUTOMATIC: [(&[u8], StatusCode, &str, &str); 3] = [
    (
        b"HTTP/1.1 400 Bad Request",
        StatusCode::BAD_REQUEST,
        codes::MALFORMED_REQUEST,
        "the request is not valid HTTP/1.1: a malformed request line or header, or an \
         ambiguous length (two different Content-Lengths, a Transfer-Encoding that does not \
         end in chunked); the connection is closed",
    ),
    (
        b"HTTP/1.1 431 Request Header Fields Too Large",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        codes::HEADERS_TOO_LARGE,
        "the request head has more than 100 headers or is over 400 KiB; the connection is \
         closed",
    ),
    (
        b"HTTP/1.1 414 URI Too Long",
        StatusCode::URI_TOO_LONG,
        codes::URI_TOO_LONG,
        "the request's path and query are over 64 KiB; the connection is closed",
    ),
];

/// A connection's byte stream, with hyper's automatic answers replaced by the API's (see the
/// module docs). Reads pass through untouched; writes are scanned for the automatic answer
/// only at their end, where it would be, with one substring search.
pub(crate) struct ShapedErrors<S> {
    inner: S,
    app: App,
    /// The answer being written in place of hyper's.
    replacing: Option<Replacement>,
}

struct Replacement {
    bytes: Vec<u8>,
    written: usize,
    /// How many of hyper's bytes (its automatic answer) it stands for: reported written once
    /// the replacement is.
    stands_for: usize,
}

impl<S> ShapedErrors<S> {
    pub(crate) fn new(inner: S, app: App) -> Self {
        ShapedErrors {
            inner,
            app,
            replacing: None,
        }
    }
}

/// Where hyper's automatic answer starts in `buf`, if `buf` ends with one, and which one.
fn automatic_answer(buf: &[u8]) -> Option<(usize, usize)> {
    if !buf.ends_with(HEAD_END) {
        return None;
    }
    let headers = memmem::rfind(buf, AUTOMATIC_HEADERS)?;
    // Exactly one head from there to the end: the date line, then the blank line.
    let rest = &buf[headers + AUTOMATIC_HEADERS.len() - 2..];
    if memmem::find(rest, HEAD_END) != Some(rest.len() - HEAD_END.len()) {
        return None;
    }
    AUTOMATIC.iter().enumerate().find_map(|(i, (line, ..))| {
        let start = headers.checked_sub(line.len())?;
        (&buf[start..headers] == *line).then_some((start, i))
    })
}

/// The API's answer in place of automatic answer `which`.
fn replacement(which: usize) -> Option<(StatusCode, &'static str, Vec<u8>)> {
    let (_, status, code, message) = AUTOMATIC.get(which)?;
    let body = serde_json::to_vec(&ApiError::http(*status, code, *message).body()).ok()?;
    let mut bytes = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(&body);
    Some((*status, code, bytes))
}

impl<S: AsyncWrite + Unpin> ShapedErrors<S> {
    /// Writes `bufs`, or what comes before an automatic answer at their end, or the API's
    /// answer in its place.
    fn poll_write_slices(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.replacing.is_none() {
            let Some(last) = bufs.iter().rposition(|b| !b.is_empty()) else {
                return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            };
            let Some((start, which)) = automatic_answer(&bufs[last]) else {
                return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            };
            if last > 0 || start > 0 {
                // What comes before it first: hyper hands the rest back afterwards.
                let mut before: Vec<IoSlice<'_>> = bufs[..last].to_vec();
                before.push(IoSlice::new(&bufs[last][..start]));
                return Pin::new(&mut self.inner).poll_write_vectored(cx, &before);
            }
            let Some((status, code, bytes)) = replacement(which) else {
                return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            };
            self.app.metrics.record_unparsed(status, code);
            tracing::debug!(%status, "answering a request hyper could not parse");
            self.replacing = Some(Replacement {
                bytes,
                written: 0,
                stands_for: bufs[last].len(),
            });
        }
        let Some(r) = self.replacing.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        while r.written < r.bytes.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &r.bytes[r.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            r.written += n;
        }
        let stands_for = r.stands_for;
        self.replacing = None;
        Poll::Ready(Ok(stands_for))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ShapedErrors<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ShapedErrors<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_slices(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_slices(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYPER_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\
        content-length: 0\r\ndate: Thu, 03 Dec 2026 13:18:13 GMT\r\n\r\n";

    #[test]
    fn finds_the_automatic_answer_only_at_the_end_of_a_write() {
        assert_eq!(automatic_answer(HYPER_400), Some((0, 0)));
        let ours = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
            content-length: 15\r\n\r\n{\"status\":\"ok\"}";
        let both = [&ours[..], HYPER_400].concat();
        assert_eq!(automatic_answer(&both), Some((ours.len(), 0)));
        // Followed by anything: not hyper's last answer.
        assert_eq!(automatic_answer(&[HYPER_400, &ours[..]].concat()), None);
        assert_eq!(automatic_answer(ours), None);
        // An API answer with an empty body and the same status has a content type.
        let api = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
            connection: close\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(automatic_answer(api), None);
        let too_large = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\
            content-length: 0\r\ndate: x\r\n\r\n";
        assert_eq!(automatic_answer(too_large), Some((0, 1)));
    }

    #[test]
    fn the_replacement_is_the_error_shape_with_its_length() {
        let (status, code, bytes) = replacement(0).expect("a replacement");
        assert_eq!(
            (status, code),
            (StatusCode::BAD_REQUEST, "malformed-request")
        );
        let text = String::from_utf8(bytes).expect("utf-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head");
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let json: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(json["error"]["code"], "malformed-request");
    }
}
