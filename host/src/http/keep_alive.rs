//! Which connections stay open after an answer: only those whose request body was read to
//! its end.
//!
//! An answer given before the body was read (a declared length over the route's limit, a
//! body cut off at its limit or its read timeout, a rejection raised before the handler
//! reads) leaves unread bytes on the connection. hyper then drains what has already arrived
//! and, if the body is not complete, closes the connection, but only after the answer went
//! out without saying so: a client that pooled the connection sends its next request into a
//! socket that is closing and sees a transport error instead of an answer. Such answers
//! therefore carry `Connection: close`, which hyper honours and clients read as "do not
//! reuse", the way nginx answers its own 413s.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use http_body::{Frame, SizeHint};

/// Watches `req`'s body, if it has one: the flag is set once it has been read to its end.
pub(crate) fn watch(req: Request) -> (Request, Option<Arc<AtomicBool>>) {
    let (parts, body) = req.into_parts();
    if http_body::Body::is_end_stream(&body) {
        return (Request::from_parts(parts, body), None);
    }
    let read = Arc::new(AtomicBool::new(false));
    let body = Body::new(Watched {
        inner: body,
        read: read.clone(),
    });
    (Request::from_parts(parts, body), Some(read))
}

/// Says `Connection: close` on `response` unless the body [`watch`] watched was read to its
/// end (see the module docs).
pub(crate) fn close_unless_read(mut response: Response, read: Option<&AtomicBool>) -> Response {
    if read.is_some_and(|read| !read.load(Ordering::Acquire)) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A request body that records when it has been read to its end.
struct Watched {
    inner: Body,
    read: Arc<AtomicBool>,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.read.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
