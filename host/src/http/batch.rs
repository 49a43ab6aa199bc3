//! Batch ingest for gateways: `POST /v1/events`.
//!
//! A gateway forwards the events of many devices at once; one request per event would spend
//! most of the server's time on HTTP framing. A batch carries them all:
//!
//! ```json
//! {"events": [{"device": "hall", "event": {"type": "reading", "celsius": 19.5}},
//!             {"device": "door-3", "event": {"type": "lock"}}, ...]}
//! ```
//!
//! and is answered, once every accepted event is durable, with one result per item **in
//! request order**:
//!
//! ```json
//! {"ok": 1, "failed": 1,
//!  "results": [{"seq": 12, "at": 1700000000000, "transitions": [...]},
//!              {"error": {"code": "mailbox-full", "message": "..."}}]}
//! ```
//!
//! # Semantics
//!
//! * **Per item, not all or nothing.** Each item succeeds or fails on its own, exactly as the
//!   same event sent alone to `POST /v1/devices/{id}/events` would; an item's error has the
//!   API's error shape and code. The request itself is 200 whenever its body is a valid
//!   batch; only a malformed or oversized body (400 / 413) fails it as a whole.
//! * **Order within a device.** A device's items are put into its mailbox in request order
//!   before the handler waits for any of them, so they are handled (and get seqs) in request
//!   order. Different devices proceed concurrently, each on its own actor, and their commits
//!   share the journal's group commits: a batch of N events costs about one fsync, not N.
//! * **Backpressure keeps order.** If an item is refused because its device's mailbox is full,
//!   every later item of that device in the batch is refused with `mailbox-full` too, even if
//!   the mailbox drained meanwhile. So the refused items of a device are a suffix of its
//!   accepted-or-refused sequence, and resending them in order (after `Retry-After`: the
//!   answer carries one, the soonest of its items', when any item was refused for a reason
//!   that retrying cures, and each such item its own `retry_after_s`) keeps the
//!   device's order intact. (Items refused for their own content, such as a malformed event or
//!   a plugin refusal, do not hold back later items, as with single sends.)
//! * **Bounded.** At most [`Limits::max_batch_items`] items and
//!   [`Limits::max_batch_bytes`] bytes per request; a device's items beyond its mailbox
//!   capacity are refused with `mailbox-full`, so a gateway's batch can never queue more
//!   work than the mailboxes hold.
//!
//! # How
//!
//! The body is parsed once, borrowing: each item's event is a [`RawValue`] slice of the body,
//! handed to the runtime as text without being re-serialized. [`Runtime::send`] puts its
//! message into the mailbox on its first poll (and fails fast there with `mailbox-full`);
//! the handler polls every item's future once, in request order, which enqueues all of them
//! in order, then awaits them in turn (they proceed concurrently meanwhile: each device's
//! actor works through its own mailbox whether or not the handler is polling).
//!
//! [`Limits::max_batch_items`]: super::Limits::max_batch_items
//! [`Limits::max_batch_bytes`]: super::Limits::max_batch_bytes
//! [`Runtime::send`]: crate::Runtime::send

use std::borrow::Cow;
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::State;
use axum::response::Response;
use futures::FutureExt as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::App;
use super::devices::Ack;
use super::error::{ApiError, PluginRefusal, message_of, retry_after};
use super::extract::{Body, NoQuery};
use super::json;
use crate::error::{Error, validate_id};
use crate::view::Committed;

/// Body of `POST /v1/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchIn<'a> {
    #[serde(borrow)]
    events: Vec<ItemIn<'a>>,
}

/// One item of a batch: an object, never serde's array form of a struct (see [`ItemIn`]'s
/// `Deserialize`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemFields<'a> {
    #[serde(borrow)]
    device: Cow<'a, str>,
    #[serde(borrow)]
    event: &'a RawValue,
}

/// One item of a batch, as the body has it.
#[derive(Debug)]
struct ItemIn<'a>(ItemFields<'a>);

/// Only a JSON object makes an item. Derived, serde would also take the fields as an array in
/// order (`["t1", {...}]`), a shape no client means and the API documents nowhere; asking for
/// a map decides while parsing, with no second pass over a batch of thousands of items.
impl<'de: 'a, 'a> Deserialize<'de> for ItemIn<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object<'a>(std::marker::PhantomData<ItemFields<'a>>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Object<'a> {
            type Value = ItemIn<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"an object {"device": ID, "event": ANY JSON}"#)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                ItemFields::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(ItemIn)
            }
        }
        deserializer.deserialize_map(Object(std::marker::PhantomData))
    }
}

/// One item's result.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum ItemOut {
    Ok(Ack),
    Err { error: ErrorOut },
}

/// A per-item error: `{"code","message","plugin"?,"retry_after_s"?}`, the detail of the
/// API's error shape; `retry_after_s` is what the same error's `Retry-After` header says on a
/// single send (`mailbox-full` and the other 429s, `quarantined`, ...).
#[derive(Debug, Serialize)]
struct ErrorOut {
    code: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    plugin: Option<PluginRefusal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_s: Option<u32>,
}

impl From<Result<Committed, Error>> for ItemOut {
    fn from(r: Result<Committed, Error>) -> Self {
        match r {
            Ok(c) => ItemOut::Ok(Ack::from(c)),
            Err(e) => ItemOut::Err {
                error: ErrorOut {
                    code: e.code(),
                    message: message_of(&e),
                    plugin: PluginRefusal::of(&e),
                    retry_after_s: retry_after(&e),
                },
            },
        }
    }
}

impl ItemOut {
    /// An item still waiting for durability when the server's drain timeout cut the batch
    /// short (see [`super::AppState::cut_short`]).
    fn cut_short() -> ItemOut {
        ItemOut::Err {
            error: ErrorOut {
                code: Error::ShuttingDown.code(),
                message: "the server stopped at its drain timeout before this event was \
                          durable: not acknowledged; its device may have been handling it \
                          then, and then it is durable (read the device's journal before \
                          sending it again)"
                    .to_string(),
                plugin: None,
                retry_after_s: None,
            },
        }
    }
}

/// How long a batch cut short waits for the commits under way before it answers.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

/// Resolves once the server's drain timeout cuts batches short; never if it does not.
async fn cut_short_signal(cut: &mut tokio::sync::watch::Receiver<bool>) {
    if cut.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The answer to a batch.
#[derive(Debug, Serialize)]
struct BatchOut {
    ok: usize,
    failed: usize,
    results: Vec<ItemOut>,
}

type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<Committed, Error>> + Send + 'a>>;

/// Starts every item's send in request order (see the module docs). Returns the results
/// known already (validation, fail-fast refusals) and the futures still waiting for
/// durability, with their item's index.
#[allow(clippy::type_complexity)]
fn enqueue<'a>(
    app: &'a App,
    items: &'a [ItemIn<'a>],
) -> (
    Vec<Option<Result<Committed, Error>>>,
    Vec<(usize, SendFuture<'a>)>,
) {
    let mut results = Vec::with_capacity(items.len());
    let mut pending = Vec::with_capacity(items.len());
    let mut full: HashSet<&str> = HashSet::new();
    // Not `Send`: lives only in this synchronous function, never across an await.
    let mut cx = Context::from_waker(std::task::Waker::noop());
    for (i, item) in items.iter().enumerate() {
        let device: &str = &item.0.device;
        let refused = match validate_id(device) {
            Err(e) => Some(e),
            Ok(()) if !full.is_empty() && full.contains(device) => Some(Error::MailboxFull),
            Ok(()) => None,
        };
        if let Some(e) = refused {
            // Counted like the runtime counts the refusals it makes itself.
            app.rt.metrics().error(e.kind());
            results.push(Some(Err(e)));
            continue;
        }
        let mut send: SendFuture<'a> = Box::pin(app.rt.send_json(device, item.0.event));
        // The first poll puts the event into the mailbox (or fails fast): in request order.
        // Polling with a no-op waker is fine: `join_all` polls again with a real one.
        match send.as_mut().poll(&mut cx) {
            Poll::Ready(r) => {
                if matches!(r, Err(Error::MailboxFull)) {
                    full.insert(device);
                }
                results.push(Some(r));
            }
            Poll::Pending => {
                results.push(None);
                pending.push((i, send));
            }
        }
    }
    (results, pending)
}

/// `POST /v1/events`: see the module docs.
pub async fn ingest(State(app): State<App>, _: NoQuery, body: Body) -> Result<Response, ApiError> {
    let batch: BatchIn<'_> = body.json()?;
    let n = batch.events.len();
    let max = app.limits.max_batch_items;
    if n > max {
        let mut api = ApiError::from(Error::PayloadTooLarge {
            size: n,
            limit: max,
        });
        api.message = format!("a batch may carry at most {max} events, this one has {n}");
        // Refused here, before the runtime saw it: counted with the HTTP layer's refusals.
        api.origin = super::error::Origin::Http;
        return Err(api);
    }
    let (mut results, pending) = enqueue(&app, &batch.events);
    // Every item is in its mailbox already; awaiting them one after the other costs one
    // wake-up per group commit (the rest are ready when their turn comes), fewer than a
    // `join_all` that tracks each future as its own task. At the server's drain timeout the
    // batch answers with what it has (see `cut_short`); the items still waiting stay `None`.
    let mut cut = app.cut_short.subscribe();
    let mut cut_short = false;
    // Once cut short, each item's reply is looked at once: outside tokio's cooperative
    // budget, which after 128 looks in one poll says "not yet" to every later one (a review
    // saw items durable long before the cut answered `shutting-down`).
    let look = |send: &mut SendFuture<'_>| tokio::task::unconstrained(send.as_mut()).now_or_never();
    for (i, mut send) in pending {
        results[i] = if cut_short {
            look(&mut send)
        } else {
            tokio::select! {
                r = &mut send => Some(r),
                () = cut_short_signal(&mut cut) => {
                    cut_short = true;
                    // Items already handed to the journal are durable within a commit or
                    // two: waited for, they are answered with their seq, not as cut off.
                    tokio::time::sleep(SETTLE).await;
                    look(&mut send)
                }
            }
        };
    }

    let mut ok = 0;
    // The soonest any refused item may go again: a gateway that resends them all at once
    // waits this long (each item's own `retry_after_s` says more).
    let mut soonest: Option<u32> = None;
    let results: Vec<ItemOut> = results
        .into_iter()
        .map(|r| {
            let Some(r) = r else {
                return ItemOut::cut_short();
            };
            ok += usize::from(r.is_ok());
            if let Err(e) = &r
                && let Some(secs) = retry_after(e)
            {
                soonest = Some(soonest.map_or(secs, |s| s.min(secs)));
            }
            ItemOut::from(r)
        })
        .collect();
    let mut response = json::ok(&BatchOut {
        ok,
        failed: n - ok,
        results,
    });
    if let Some(secs) = soonest {
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from(secs),
        );
    }
    Ok(response)
}
