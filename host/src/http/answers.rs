//! Answers held for their clients share a budget.
//!
//! An answer is built whole before it is written (a journal page of up to ~4 MiB of records,
//! a page of 10,000 devices in detail, an outbox page), and is held until its client has read
//! it, or until the write timeout (`--write-timeout-secs`) closes a connection whose client
//! stopped reading. Each route bounds one answer; nothing bounded them together: 250
//! connections that asked for journal pages and read nothing took a server from 170 MB to
//! 1.3 GB for those 30 s (a review), and the connection cap allows thousands.
//!
//! So every answer of [`HELD_FROM`] bytes or more takes its size from a budget
//! ([`super::Limits::max_buffered_answer_bytes`], `--max-buffered-answer-mib`) until its
//! last byte is handed to the socket or its connection ends; one that does not fit now is
//! replaced by `503 overloaded` with `Retry-After`, counted in `drover_http_errors_total`.
//! Smaller answers (events' acknowledgements, single devices, probes) are not counted: the
//! connection cap bounds them together, and they must not be refused because pages are
//! being read slowly.
//!
//! The share is owned by the answer's bytes (`Bytes::from_owner`), handed to hyper [`CHUNK`]
//! at a time: every piece hyper holds keeps it, so it is given back once hyper has handed the
//! last piece to the socket (or dropped it with its connection), whether hyper queues pieces
//! as they are or copies them into its write buffer (then it asks for the next piece only
//! while that holds less than ~400 KiB). Given a body whole, hyper copied all of it at once
//! and dropped the body: a share held by the body was given back long before the client read
//! anything. What the kernel's socket buffer has taken (megabytes, over loopback) is not the
//! process's memory, and is not counted.
//!
//! Pages are also built a few at a time ([`super::AppState::page_turn`]): held answers are
//! bounded here, answers being built there.

use axum::body::{Body, Bytes};
use axum::response::{IntoResponse as _, Response};
use http_body::Body as _;

use super::{ApiError, App};

/// Answers of at least this many bytes are counted in the budget.
pub const HELD_FROM: u64 = 64 * 1024;

/// Bytes handed to hyper at a time.
const CHUNK: usize = 64 * 1024;

/// An answer's bytes not yet handed to hyper. The share of the budget is owned by the bytes
/// themselves ([`Owned`]): every piece handed to hyper keeps it, so it is given back once
/// the last piece is written (or dropped with its connection), whether hyper queues pieces
/// as they are or copies them into its buffer.
struct Held {
    rest: Bytes,
}

/// The answer's bytes and its share of the budget, owned together.
struct Owned {
    bytes: Bytes,
    _share: tokio::sync::OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.rest.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let piece = this.rest.split_to(this.rest.len().min(CHUNK));
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// `response` holding its share of `app`'s answer budget, or `503 overloaded` if it does not
/// fit now. Streams (no exact length, such as the command stream) are left as they are:
/// each of their events is small and sent as it comes.
pub(crate) async fn hold(app: &App, response: Response) -> Response {
    hold_in(&app.answer_budget, &app.limits, response).await
}

/// [`hold`] in `budget` (KiB permits) of `limits`.
async fn hold_in(
    budget: &std::sync::Arc<tokio::sync::Semaphore>,
    limits: &super::Limits,
    response: Response,
) -> Response {
    let Some(len) = response.body().size_hint().exact() else {
        return response;
    };
    if len < HELD_FROM {
        return response;
    }
    // One larger than the whole budget takes all of it: served alone, never refused for
    // ever.
    let whole = limits.answer_budget_bytes().div_ceil(1024);
    let kib = u32::try_from(len.div_ceil(1024).min(whole as u64)).unwrap_or(u32::MAX);
    let Ok(share) = budget.clone().try_acquire_many_owned(kib) else {
        return ApiError::refused(crate::Error::Overloaded(format!(
            "the server holds as many answers for their clients as it may at once ({} MiB \
             together, `--max-buffered-answer-mib`: clients that read their answers slowly \
             hold them) and this one's {} KiB do not fit now; try again shortly",
            limits.answer_budget_bytes() >> 20,
            len.div_ceil(1024)
        )))
        .into_response();
    };
    let (parts, body) = response.into_parts();
    // A body of exact length is whole already: this does not wait for anything.
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes,
        Err(e) => {
            return ApiError::from(crate::Error::Internal(format!("answer not readable: {e}")))
                .into_response();
        }
    };
    let held = Held {
        rest: Bytes::from_owner(Owned {
            bytes,
            _share: share,
        }),
    };
    Response::from_parts(parts, Body::new(held))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn next_frame(body: &mut Body) -> Option<Bytes> {
        std::future::poll_fn(|cx| http_body::Body::poll_frame(std::pin::Pin::new(&mut *body), cx))
            .await
            .map(|frame| frame.expect("frame").into_data().expect("data"))
    }

    fn budget() -> (std::sync::Arc<tokio::sync::Semaphore>, super::super::Limits) {
        let limits = super::super::Limits {
            max_buffered_answer_bytes: 1 << 20,
            ..Default::default()
        };
        (super::super::answer_budget(&limits), limits)
    }

    /// The share lives as long as any piece of the answer hyper was handed: a share held by
    /// the body alone was given back as soon as hyper had taken every piece into its queue,
    /// long before the client read them.
    #[tokio::test]
    async fn a_share_is_held_until_the_last_piece_handed_out_is_dropped() {
        let (budget, limits) = budget();
        let answer = vec![b'x'; 300 * 1024].into_response();
        let held = hold_in(&budget, &limits, answer).await;
        assert_eq!(budget.available_permits(), 1024 - 300);
        let mut body = held.into_body();
        let mut pieces = Vec::new();
        while let Some(piece) = next_frame(&mut body).await {
            pieces.push(piece);
        }
        assert_eq!(pieces.len(), 5, "handed out {CHUNK} bytes at a time");
        assert_eq!(pieces.iter().map(Bytes::len).sum::<usize>(), 300 * 1024);
        drop(body);
        assert_eq!(budget.available_permits(), 1024 - 300, "the pieces keep it");
        pieces.truncate(1);
        assert_eq!(budget.available_permits(), 1024 - 300);
        drop(pieces);
        assert_eq!(budget.available_permits(), 1024);
    }

    /// Small answers and streams are not counted; one larger than the budget takes all of it
    /// rather than being refused for ever; past the budget, a large one is refused.
    #[tokio::test]
    async fn small_answers_pass_and_large_ones_wait_their_turn() {
        let (budget, limits) = budget();
        let small = hold_in(&budget, &limits, vec![0u8; 1000].into_response()).await;
        assert_eq!(small.status(), 200);
        assert_eq!(budget.available_permits(), 1024);
        let huge = hold_in(&budget, &limits, vec![0u8; 3 << 20].into_response()).await;
        assert_eq!(huge.status(), 200);
        assert_eq!(budget.available_permits(), 0);
        let refused = hold_in(&budget, &limits, vec![0u8; 100 * 1024].into_response()).await;
        assert_eq!(refused.status(), 503);
        let small = hold_in(&budget, &limits, vec![0u8; 1000].into_response()).await;
        assert_eq!(small.status(), 200, "small ones still pass");
        drop(huge);
        assert_eq!(budget.available_permits(), 1024);
        let body = axum::body::to_bytes(
            hold_in(&budget, &limits, vec![7u8; 100 * 1024].into_response())
                .await
                .into_body(),
            usize::MAX,
        )
        .await
        .expect("collect");
        assert_eq!(body.len(), 100 * 1024);
        assert!(body.iter().all(|b| *b == 7), "the bytes are the answer's");
    }
}
