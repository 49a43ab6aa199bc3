//! Requests hyper cannot parse, answered in the API's error shape.
//!
//! hyper answers a request head it cannot parse itself, before any route or service runs: a
//! broken request line or header, two different `Content-Length`s, a `Transfer-Encoding`
//! that does not end in `chunked` (`400`), more than 100 headers or a head over ~400 KiB
//! (`431`), a path and query of 65,535 bytes or more (`414`). The answer is bare (no body) and the connection is
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
//! hyper answers in the version of the last request it parsed on the connection, so after an
//! HTTP/1.0 one the line is `HTTP/1.0` and `connection: close` is left out (1.0 closes by
//! default); the replacement keeps the version.
//!
//! If a later hyper writes its answer differently, nothing breaks: the bare answer goes out
//! as before, and the test `connections::requests_hyper_cannot_parse_get_the_error_shape`
//! fails.
//!
//! One head hyper refuses without answering at all: HTTP/2's connection preface (`PRI *
//! HTTP/2.0`, what a client with prior knowledge of h2c sends first). It closes the
//! connection with nothing written, so the client cannot tell a refusal from a crash. The
//! server speaks HTTP/1.1 only, so [`ShapedErrors`] looks at the first bytes a connection
//! sends and, when they are the preface, answers `505` `http-version-not-supported` itself
//! and shows hyper the end of the stream (which it takes as a client that left). Any other
//! first byte decides it at once, without a copy; only a first read that stops inside the
//! preface's first line is held until the next. A preface after other requests on the same
//! connection still gets hyper's silence (no client sends one there).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::http::StatusCode;
use memchr::memmem;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::App;
use super::error::{ApiError, codes};

/// The header every automatic answer has, and no answer of the API's right after its status
/// line (theirs start with `content-type`).
const EMPTY_LENGTH: &[u8] = b"content-length: 0\r\n";

/// What hyper puts between the status line and [`EMPTY_LENGTH`] when the connection is
/// HTTP/1.1 (an HTTP/1.0 one closes without saying so).
const CLOSE: &[u8] = b"connection: close\r\n";

/// The end of a head.
const HEAD_END: &[u8] = b"\r\n\r\n";

/// `HTTP/1.1 ` or `HTTP/1.0 `: hyper answers in the version of the last request it parsed.
const VERSION_LEN: usize = b"HTTP/1.1 ".len();

/// Each automatic answer's status (after the version), with the error the API gives in its
/// place.
const AUTOMATIC: [(&[u8], StatusCode, &str, &str); 3] = [
    (
        b"400 Bad Request\r\n",
        StatusCode::BAD_REQUEST,
        codes::MALFORMED_REQUEST,
        "the request is not valid HTTP/1.1: a malformed request line or header, or an \
         ambiguous length (two different Content-Lengths, a Transfer-Encoding that does not \
         end in chunked); the connection is closed",
    ),
    (
        b"431 Request Header Fields Too Large\r\n",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        codes::HEADERS_TOO_LARGE,
        "the request head has more than 100 headers, a header name of 64 KiB or more, or is \
         over 400 KiB; the connection is closed",
    ),
    (
        b"414 URI Too Long\r\n",
        StatusCode::URI_TOO_LONG,
        codes::URI_TOO_LONG,
        "the request's path and query are 65,535 bytes or longer (at most 65,534); the \
         connection is closed",
    ),
];

/// The first line of HTTP/2's connection preface (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// A connection's byte stream, with hyper's automatic answers replaced by the API's (see the
/// module docs). Reads pass through untouched once the first bytes show HTTP/1; writes are
/// scanned for the automatic answer only at their end, where it would be, with one
/// substring search.
pub(crate) struct ShapedErrors<S> {
    inner: S,
    /// Told of each answer replaced (the server counts it on `/metrics`).
    on_replaced: Replaced,
    /// The answer being written in place of hyper's.
    replacing: Option<Replacement>,
    /// What the connection's first bytes showed.
    start: Start,
}

/// Whether a connection opened with HTTP/2's preface (see the module docs).
enum Start {
    /// Not known yet: the bytes read so far (none, or a beginning of the preface's first
    /// line), kept back from hyper.
    Sniffing(Vec<u8>),
    /// HTTP/1: bytes kept back while sniffing, still to hand to hyper, and how many it has.
    Releasing(Vec<u8>, usize),
    /// HTTP/1, everything handed over: reads go straight through.
    Passing,
    /// The preface: the answer being written; hyper then reads the end of the stream.
    Refusing(Replacement),
    Refused,
}

struct Replacement {
    bytes: Vec<u8>,
    written: usize,
    /// How many of hyper's bytes (its automatic answer) it stands for: reported written once
    /// the replacement is.
    stands_for: usize,
}

/// What [`ShapedErrors`] tells of an answer it replaced: its status and code.
pub(crate) type Replaced = Arc<dyn Fn(StatusCode, &'static str) + Send + Sync>;

/// A [`Replaced`] that counts on `app`'s `/metrics`.
pub(crate) fn counted_by(app: App) -> Replaced {
    Arc::new(move |status, code| app.metrics.record_unparsed(status, code))
}

impl<S> ShapedErrors<S> {
    pub(crate) fn new(inner: S, on_replaced: Replaced) -> Self {
        ShapedErrors {
            inner,
            on_replaced,
            replacing: None,
            start: Start::Sniffing(Vec::new()),
        }
    }
}

/// An automatic answer found at the end of a write.
#[derive(Debug, PartialEq, Eq)]
struct Found {
    /// Where it starts.
    start: usize,
    /// Which of [`AUTOMATIC`].
    which: usize,
    /// `HTTP/1.1` or `HTTP/1.0`, as hyper wrote it.
    version: [u8; 8],
}

/// Where hyper's automatic answer starts in `buf`, if `buf` ends with one: the status line,
/// `connection: close` (HTTP/1.1 only), `content-length: 0`, any other headers (`date`), the
/// blank line, and nothing after it.
fn automatic_answer(buf: &[u8]) -> Option<Found> {
    if !buf.ends_with(HEAD_END) {
        return None;
    }
    let length = memmem::rfind(buf, EMPTY_LENGTH)?;
    // One head from there to the end.
    let rest = &buf[length..];
    if memmem::find(rest, HEAD_END) != Some(rest.len() - HEAD_END.len())
        || length < 2
        || &buf[length - 2..length] != b"\r\n"
    {
        return None;
    }
    // Right after the status line, or after `connection: close` right after it.
    let head = &buf[..length];
    let head = head.strip_suffix(CLOSE).unwrap_or(head);
    AUTOMATIC
        .iter()
        .enumerate()
        .find_map(|(which, (status, ..))| {
            let start = head.len().checked_sub(VERSION_LEN + status.len())?;
            let line = &head[start..];
            let version: [u8; 8] = line.get(..8)?.try_into().ok()?;
            let known = &version == b"HTTP/1.1" || &version == b"HTTP/1.0";
            (known && line[8] == b' ' && &line[VERSION_LEN..] == *status).then_some(Found {
                start,
                which,
                version,
            })
        })
}

/// The API's answer in place of `found`, in the same HTTP version.
fn replacement(found: &Found) -> Option<(StatusCode, &'static str, Vec<u8>)> {
    let (_, status, code, message) = AUTOMATIC.get(found.which)?;
    let bytes = closing_answer(&found.version, *status, code, message)?;
    Some((*status, code, bytes))
}

/// A whole answer in the API's error shape that closes the connection: status line (in
/// `version`, the client's own), headers, JSON body.
fn closing_answer(
    version: &[u8],
    status: StatusCode,
    code: &'static str,
    message: &'static str,
) -> Option<Vec<u8>> {
    let body = serde_json::to_vec(&ApiError::http(status, code, message).body()).ok()?;
    let mut bytes = version.to_vec();
    bytes.extend_from_slice(
        format!(
            " {} {}\r\ncontent-type: application/json\r\nconnection: close\r\n\
             content-length: {}\r\ndate: {}\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len(),
            httpdate::fmt_http_date(std::time::SystemTime::now()),
        )
        .as_bytes(),
    );
    bytes.extend_from_slice(&body);
    Some(bytes)
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
            let Some(found) = automatic_answer(&bufs[last]) else {
                return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            };
            if found.start > 0 || bufs[..last].iter().any(|b| !b.is_empty()) {
                // What comes before it first: hyper hands the rest back afterwards.
                let mut before: Vec<IoSlice<'_>> = bufs[..last].to_vec();
                before.push(IoSlice::new(&bufs[last][..found.start]));
                return Pin::new(&mut self.inner).poll_write_vectored(cx, &before);
            }
            let Some((status, code, bytes)) = replacement(&found) else {
                return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            };
            (self.on_replaced)(status, code);
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
        // hyper retries a write with the same buffer; never claim more than it handed over.
        let handed: usize = bufs.iter().map(|b| b.len()).sum();
        let stands_for = r.stands_for.min(handed);
        self.replacing = None;
        Poll::Ready(Ok(stands_for))
    }
}

/// The API's answer to HTTP/2's preface.
fn h2_refusal() -> Option<Vec<u8>> {
    closing_answer(
        b"HTTP/1.1",
        StatusCode::HTTP_VERSION_NOT_SUPPORTED,
        codes::HTTP_VERSION_NOT_SUPPORTED,
        "this server speaks HTTP/1.1 only (HTTP/2 with prior knowledge is not served); \
         the connection is closed",
    )
}

/// Whether `bytes` could still be, or are, the start of HTTP/2's preface.
fn may_be_preface(bytes: &[u8]) -> bool {
    let n = bytes.len().min(H2_PREFACE.len());
    bytes[..n] == H2_PREFACE[..n]
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ShapedErrors<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.start {
                Start::Passing => return Pin::new(&mut this.inner).poll_read(cx, buf),
                Start::Releasing(held, given) => {
                    let n = buf.remaining().min(held.len() - *given);
                    buf.put_slice(&held[*given..*given + n]);
                    *given += n;
                    if *given == held.len() {
                        this.start = Start::Passing;
                    }
                    return Poll::Ready(Ok(()));
                }
                Start::Sniffing(held) => {
                    let before = buf.filled().len();
                    ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                    let new = &buf.filled()[before..];
                    if held.is_empty() && !(new.is_empty() || may_be_preface(new)) {
                        // Any request of HTTP/1: hyper has it as read, no copy.
                        this.start = Start::Passing;
                        return Poll::Ready(Ok(()));
                    }
                    let ended = new.is_empty();
                    held.extend_from_slice(new);
                    buf.set_filled(before);
                    if ended || !may_be_preface(held) {
                        // What was kept back goes to hyper, then the end of the stream, if
                        // that is what came.
                        let held = std::mem::take(held);
                        this.start = if held.is_empty() {
                            Start::Passing
                        } else {
                            Start::Releasing(held, 0)
                        };
                        if ended && matches!(this.start, Start::Passing) {
                            return Poll::Ready(Ok(()));
                        }
                    } else if held.len() >= H2_PREFACE.len() {
                        let Some(bytes) = h2_refusal() else {
                            this.start = Start::Refused;
                            continue;
                        };
                        (this.on_replaced)(
                            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                            codes::HTTP_VERSION_NOT_SUPPORTED,
                        );
                        tracing::debug!("refusing an HTTP/2 connection preface");
                        this.start = Start::Refusing(Replacement {
                            bytes,
                            written: 0,
                            stands_for: 0,
                        });
                    }
                    // Else a beginning of the preface's first line: read on.
                }
                Start::Refusing(r) => {
                    while r.written < r.bytes.len() {
                        let n = ready!(
                            Pin::new(&mut this.inner).poll_write(cx, &r.bytes[r.written..])
                        )?;
                        if n == 0 {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                        }
                        r.written += n;
                    }
                    this.start = Start::Refused;
                }
                // The end of the stream, for hyper: it closes the connection.
                Start::Refused => return Poll::Ready(Ok(())),
            }
        }
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

    fn found(start: usize, which: usize, version: &[u8; 8]) -> Option<Found> {
        Some(Found {
            start,
            which,
            version: *version,
        })
    }

    #[test]
    fn finds_the_automatic_answer_only_at_the_end_of_a_write() {
        assert_eq!(automatic_answer(HYPER_400), found(0, 0, b"HTTP/1.1"));
        let ours = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
            content-length: 15\r\n\r\n{\"status\":\"ok\"}";
        let both = [&ours[..], HYPER_400].concat();
        assert_eq!(automatic_answer(&both), found(ours.len(), 0, b"HTTP/1.1"));
        // Followed by anything: not hyper's last answer.
        assert_eq!(automatic_answer(&[HYPER_400, &ours[..]].concat()), None);
        assert_eq!(automatic_answer(ours), None);
        // An API answer with an empty body and the same status has a content type.
        let api = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
            connection: close\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(automatic_answer(api), None);
        let too_large = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\
            content-length: 0\r\ndate: x\r\n\r\n";
        assert_eq!(automatic_answer(too_large), found(0, 1, b"HTTP/1.1"));
        // After an HTTP/1.0 request, hyper answers in 1.0 and does not say it closes.
        let old = b"HTTP/1.0 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\
            date: x\r\n\r\n";
        assert_eq!(automatic_answer(old), found(0, 1, b"HTTP/1.0"));
        assert_eq!(
            automatic_answer(&[&ours[..], old].concat()),
            found(ours.len(), 1, b"HTTP/1.0")
        );
    }

    /// A socket that takes at most `chunk` bytes a call and is not ready every other call,
    /// and whose reads give `input`'s pieces one at a time (as much of each as fits), then
    /// the end of the stream.
    struct Socket {
        out: Vec<u8>,
        chunk: usize,
        ready: bool,
        input: std::collections::VecDeque<Vec<u8>>,
    }

    impl AsyncRead for Socket {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(mut piece) = self.input.pop_front() {
                let n = piece.len().min(buf.remaining());
                buf.put_slice(&piece[..n]);
                if n < piece.len() {
                    self.input.push_front(piece.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.ready = !self.ready;
            if !self.ready {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(self.chunk);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn shaped(
        chunk: usize,
    ) -> (
        ShapedErrors<Socket>,
        Arc<std::sync::Mutex<Vec<&'static str>>>,
    ) {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let socket = Socket {
            out: Vec::new(),
            chunk,
            ready: false,
            input: Default::default(),
        };
        let on_replaced: Replaced = Arc::new(move |_, code| {
            if let Ok(mut log) = log.lock() {
                log.push(code);
            }
        });
        (ShapedErrors::new(socket, on_replaced), seen)
    }

    /// Writes `bufs` as hyper does: again and again, from where the last write stopped.
    fn write_all(w: &mut ShapedErrors<Socket>, bufs: &[&[u8]]) {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let whole = bufs.concat();
        let mut done = 0;
        while done < whole.len() {
            // Keep the caller's slices where they are not yet written.
            let mut slices = Vec::new();
            let mut at = 0;
            for b in bufs {
                let (from, to) = (done.max(at), at + b.len());
                if from < to {
                    slices.push(IoSlice::new(&whole[from..to]));
                } else {
                    slices.push(IoSlice::new(&[]));
                }
                at = to;
            }
            match Pin::new(&mut *w).poll_write_vectored(&mut cx, &slices) {
                Poll::Ready(Ok(n)) => {
                    assert!(n > 0 && n <= whole.len() - done, "wrote {n}");
                    done += n;
                }
                Poll::Ready(Err(e)) => panic!("write failed: {e}"),
                Poll::Pending => {}
            }
        }
    }

    #[test]
    fn writes_what_comes_before_then_the_replacement_whatever_the_socket_takes() {
        let ours: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
            content-length: 15\r\n\r\n{\"status\":\"ok\"}";
        for chunk in [1, 7, 50, 4096] {
            let (mut w, seen) = shaped(chunk);
            write_all(&mut w, &[&[], ours, &[], HYPER_400]);
            let out = String::from_utf8(w.inner.out.clone()).expect("utf-8");
            let rest = out.strip_prefix(std::str::from_utf8(ours).expect("utf-8"));
            let rest = rest.unwrap_or_else(|| panic!("{chunk}: {out}"));
            assert!(
                rest.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                "{chunk}: {out}"
            );
            assert!(rest.ends_with("\"}}"), "{chunk}: {out}");
            assert_eq!(*seen.lock().expect("log"), ["malformed-request"], "{chunk}");
        }
        // Alone behind an empty slice, and the answer never claims more than it was handed.
        let (mut w, _) = shaped(10);
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let slices = [IoSlice::new(&[]), IoSlice::new(HYPER_400)];
        assert!(
            Pin::new(&mut w)
                .poll_write_vectored(&mut cx, &slices)
                .is_pending()
        );
        let other = [IoSlice::new(b"x")];
        let written = loop {
            if let Poll::Ready(r) = Pin::new(&mut w).poll_write_vectored(&mut cx, &other) {
                break r.expect("written");
            }
        };
        assert_eq!(written, 1);
        assert!(
            w.inner
                .out
                .starts_with(b"HTTP/1.1 400 Bad Request\r\ncontent-type")
        );
    }

    /// Reads everything through `w` with a buffer of `size` bytes, as hyper would.
    fn read_all(w: &mut ShapedErrors<Socket>, size: usize) -> Vec<u8> {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let mut got = Vec::new();
        loop {
            let mut space = vec![0u8; size];
            let mut buf = ReadBuf::new(&mut space);
            match Pin::new(&mut *w).poll_read(&mut cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return got,
                Poll::Ready(Ok(())) => got.extend_from_slice(buf.filled()),
                Poll::Ready(Err(e)) => panic!("read failed: {e}"),
                Poll::Pending => {}
            }
        }
    }

    #[test]
    fn http1_passes_through_and_the_http2_preface_is_refused_however_it_arrives() {
        let post: &[u8] = b"POST /v1/events HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}";
        let preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
        let splits: [&[usize]; 5] = [&[], &[1], &[1, 2], &[3, 9], &[15, 16]];
        for size in [1, 3, 8192] {
            for cuts in splits {
                let pieces = |bytes: &[u8]| {
                    let mut from = 0;
                    let mut out: Vec<Vec<u8>> = Vec::new();
                    for &cut in cuts.iter().chain([bytes.len()].iter()) {
                        out.push(bytes[from..cut].to_vec());
                        from = cut;
                    }
                    out
                };
                let (mut w, seen) = shaped(4096);
                w.inner.input = pieces(post).into();
                assert_eq!(read_all(&mut w, size), post, "{size} {cuts:?}");
                assert!(w.inner.out.is_empty());
                assert!(seen.lock().expect("log").is_empty());

                let (mut w, seen) = shaped(4096);
                w.inner.input = pieces(preface).into();
                assert_eq!(read_all(&mut w, size), b"", "{size} {cuts:?}");
                let out = String::from_utf8(w.inner.out.clone()).expect("utf-8");
                assert!(
                    out.starts_with("HTTP/1.1 505 HTTP Version Not Supported\r\n"),
                    "{out}"
                );
                assert!(out.contains("\"http-version-not-supported\""), "{out}");
                assert_eq!(*seen.lock().expect("log"), ["http-version-not-supported"]);
            }
        }
        // A beginning of the preface, then the end of the stream: handed over as it came.
        let (mut w, _) = shaped(4096);
        w.inner.input = vec![b"PRI *".to_vec()].into();
        assert_eq!(read_all(&mut w, 2), b"PRI *");
        assert!(w.inner.out.is_empty());
        // Nothing at all: the end of the stream.
        let (mut w, _) = shaped(4096);
        assert_eq!(read_all(&mut w, 64), b"");
    }

    #[test]
    fn the_replacement_is_the_error_shape_with_its_length() {
        let (status, code, bytes) = replacement(&Found {
            start: 0,
            which: 0,
            version: *b"HTTP/1.0",
        })
        .expect("a replacement");
        assert_eq!(
            (status, code),
            (StatusCode::BAD_REQUEST, "malformed-request")
        );
        let text = String::from_utf8(bytes).expect("utf-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head");
        assert!(head.starts_with("HTTP/1.0 400 Bad Request\r\n"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert!(head.contains("\r\ndate: "), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let json: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(json["error"]["code"], "malformed-request");
    }
}
