//! Device routes: provisioning, events, reads of the state and of the journal.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::App;
use super::error::ApiError;
use super::extract::{Body, Id, NoQuery, QueryOf, saturating};
use super::json::{self, Json};
use crate::error::Error;
use crate::view::{
    CommandView, Committed, DeadLetterView, DeviceStatus, DeviceSummary, JournalEntry,
    PendingUpgrade, QuarantineView, TimerView,
};

/// Body of `PUT /v1/devices/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvisionBody {
    plugin: String,
    /// Defaults to `{}`: an absent config and an empty one are the same device.
    #[serde(default = "empty_object")]
    config: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// `PUT /v1/devices/{id}`: creates the device (201) or confirms an identical one (200). The
/// answer is the stored device: `{"id","plugin","version","seq","config","created_at_ms",
/// "upgrade"}`.
pub async fn provision(
    State(app): State<App>,
    Id(id): Id,
    _: NoQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let req: ProvisionBody = body.json()?;
    let (summary, created) = app.rt.provision(&id, &req.plugin, &req.config).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json::reply(status, &summary))
}

/// The acknowledgement of one durable event.
#[derive(Debug, Serialize)]
pub struct Ack {
    pub seq: u64,
    /// When the event was handled: host time in ms since the Unix epoch, as journaled.
    pub at: u64,
    pub transitions: Vec<Json>,
}

impl From<Committed> for Ack {
    fn from(c: Committed) -> Self {
        Ack {
            seq: c.seq,
            at: c.at_ms,
            transitions: json::all(c.transitions),
        }
    }
}

/// `POST /v1/devices/{id}/events`: the body is the event (any JSON value). Answers
/// `{"seq","at","transitions"}` once the record is durable.
pub async fn send(
    State(app): State<App>,
    Id(id): Id,
    _: NoQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let event = body.text(|m| ApiError::refused(Error::MalformedEvent(m)))?;
    let committed = app.rt.send(&id, event).await?;
    Ok(json::ok(&Ack::from(committed)))
}

/// Answer of `GET /v1/devices/{id}`.
#[derive(Debug, Serialize)]
struct DeviceOut {
    id: String,
    plugin: String,
    version: u32,
    seq: u64,
    /// `active`, `passivated` or `quarantined`, as the read found the device.
    status: DeviceStatus,
    state: Json,
    config: serde_json::Value,
    created_at_ms: u64,
    /// `{"to", "failed"}` when the device does not run its plugin's current version, else
    /// null (see [`PendingUpgrade`]).
    upgrade: Option<PendingUpgrade>,
    /// `{"failures", "last_error", "ends_in_ms"}` while quarantined, else null (see
    /// [`QuarantineView`]).
    quarantine: Option<QuarantineView>,
}

/// `GET /v1/devices/{id}`: the device with its current durable state.
pub async fn show(State(app): State<App>, Id(id): Id, _: NoQuery) -> Result<Response, ApiError> {
    let view = app.rt.device(&id).await?;
    let DeviceSummary {
        id,
        plugin,
        version,
        seq,
        config,
        created_at_ms,
        upgrade,
    } = view.summary;
    Ok(json::ok(&DeviceOut {
        id,
        plugin,
        version,
        seq,
        status: view.status,
        state: Json(view.state),
        config,
        created_at_ms,
        upgrade,
        quarantine: view.quarantine,
    }))
}

/// Query of `GET /v1/devices`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Ids strictly after this one (the previous page's `next`).
    after: Option<String>,
    /// Page size, 1..=10000 (default 1000).
    #[serde(default, deserialize_with = "saturating")]
    limit: Option<usize>,
    /// `true`: each device as `{"id","plugin","version","seq","status","upgrade"}` instead of
    /// its id.
    /// Read from the journal and the router: no device is woken.
    #[serde(default)]
    detail: bool,
    /// `quarantined`: only the devices quarantined now (found among the actors, not by a
    /// walk of the fleet), paged the same way.
    status: Option<String>,
}

/// One page of device ids.
#[derive(Debug, Serialize)]
struct DeviceList<T> {
    devices: Vec<T>,
    /// Pass as `after` for the next page; `null` on the last page.
    next: Option<String>,
}

/// A device in a detailed listing.
#[derive(Debug, Serialize)]
struct DeviceLine {
    id: String,
    plugin: String,
    version: u32,
    seq: u64,
    status: DeviceStatus,
    /// As in `GET /v1/devices/{id}`: where a device behind its plugin's current version is
    /// headed, else null; so a fleet's stragglers are found without reading each device.
    upgrade: Option<PendingUpgrade>,
    /// As in `GET /v1/devices/{id}`: why and for how long it is quarantined, else null; so
    /// `?status=quarantined&detail=true` gives each one's reason in one request.
    quarantine: Option<QuarantineView>,
}

/// `GET /v1/devices?after=ID&limit=N`: device ids in order, a page at a time.
pub async fn list(
    State(app): State<App>,
    QueryOf(q): QueryOf<ListQuery>,
) -> Result<Response, ApiError> {
    let limit = page_size(q.limit, 1000, 10_000)?;
    let _turn = app.page_turn().await?;
    let (page, more) = match q.status.as_deref() {
        None => app.rt.device_ids_page(q.after.as_deref(), limit),
        Some("quarantined") => {
            let mut ids = app.rt.quarantined_devices();
            if let Some(after) = q.after.as_deref() {
                ids.retain(|id| id.as_str() > after);
            }
            let more = ids.len() > limit;
            ids.truncate(limit);
            (ids, more)
        }
        Some(other) => {
            return Err(ApiError::malformed_query(format!(
                "status={other} is not a filter: the one is `quarantined` (the active and the \
                 passivated are most of the fleet: list them all with detail=true)"
            )));
        }
    };
    let next = more.then(|| page.last().cloned()).flatten();
    if !q.detail {
        return Ok(json::ok(&DeviceList {
            devices: page,
            next,
        }));
    }
    let devices = page
        .into_iter()
        .filter_map(|id| {
            let s = app.rt.summary(&id)?;
            let (status, quarantine) = app.rt.status_and_quarantine(&id);
            Some(DeviceLine {
                status,
                quarantine,
                id,
                plugin: s.plugin,
                version: s.version,
                seq: s.seq,
                upgrade: s.upgrade,
            })
        })
        .collect();
    Ok(json::ok(&DeviceList { devices, next }))
}

/// Checks a page size: absent is `default`, 0 is refused, above `max` is clamped.
fn page_size(limit: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    match limit {
        None => Ok(default),
        Some(0) => Err(ApiError::malformed_query("limit must be at least 1")),
        Some(n) => Ok(n.min(max)),
    }
}

/// Query of `GET /v1/devices/{id}/journal`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalQuery {
    /// First seq of the page (default: the oldest kept, 1 unless retention deleted history).
    from: Option<u64>,
    /// Records per page, 1..=the server's page limit (default 100; larger is clamped).
    #[serde(default, deserialize_with = "saturating")]
    limit: Option<usize>,
}

/// One journal record as the API shows it (and a removal's archive writes it).
#[derive(Debug, Serialize)]
pub(crate) struct RecordOut {
    seq: u64,
    /// Host time of the event, ms since the Unix epoch.
    at: u64,
    event: Json,
    transitions: Vec<Json>,
    plugin: String,
    version: u32,
    /// Present (`true`) only for a seq whose record was destroyed by media damage and
    /// salvaged away: no event, no transitions.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    lost: bool,
    /// Present for a message (`{"type":"message","sender","id":{"seq","index"}}`) or a timer
    /// firing (`{"type":"timer","key","set","due_ms","missed"}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    origin: Option<Json>,
    /// Present when the event produced effects, in order: `{"type":"command","payload",
    /// "ttl_ms"}`, `{"type":"send","to","event"}`, `{"type":"set_timer","key","due_ms",
    /// "every_ms","event"}`, `{"type":"cancel_timer","key"}` (payloads are JSON texts).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    effects: Vec<Json>,
}

impl From<JournalEntry> for RecordOut {
    fn from(e: JournalEntry) -> Self {
        RecordOut {
            seq: e.seq,
            at: e.at_ms,
            event: Json(e.event),
            transitions: json::all(e.transitions),
            plugin: e.plugin,
            version: e.version,
            lost: e.lost,
            origin: e.origin.map(Json),
            effects: json::all(e.effects),
        }
    }
}

/// One page of the journal.
#[derive(Debug, Serialize)]
struct JournalOut {
    records: Vec<RecordOut>,
    /// The `from` of the next page; `null` when this page reaches the device's latest seq.
    next: Option<u64>,
}

/// `GET /v1/devices/{id}/journal?from=SEQ&limit=N`: the device's records in seq order.
pub async fn journal(
    State(app): State<App>,
    Id(id): Id,
    QueryOf(q): QueryOf<JournalQuery>,
) -> Result<Response, ApiError> {
    let limit = page_size(q.limit, 100, app.limits.max_page)?;
    // Absent: from the oldest record kept (seq 1 unless retention deleted history).
    let from = q.from.unwrap_or(0);
    let _turn = app.page_turn().await?;
    let rt = app.rt.clone();
    // Pages are read from the journal file: keep the reads off the async workers.
    let page = tokio::task::spawn_blocking(move || rt.journal_page(&id, from, limit))
        .await
        .map_err(|e| Error::Internal(format!("journal read task: {e}")))??;
    Ok(json::ok(&JournalOut {
        records: page.records.into_iter().map(RecordOut::from).collect(),
        next: page.next,
    }))
}

/// Query of `GET /v1/devices/{id}/state`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateQuery {
    /// The seq to rebuild the state at (0: right after provisioning). Absent: now.
    at: Option<u64>,
}

/// `{"seq","state"}`.
#[derive(Debug, Serialize)]
struct StateOut {
    seq: u64,
    state: Json,
}

/// `GET /v1/devices/{id}/state?at=SEQ`: the state right after record SEQ, rebuilt from the
/// journal; without `at`, the current durable state. A seq past the latest is 404
/// `seq-out-of-range`.
pub async fn state(
    State(app): State<App>,
    Id(id): Id,
    QueryOf(q): QueryOf<StateQuery>,
) -> Result<Response, ApiError> {
    let snapshot = match q.at {
        Some(seq) => app.rt.state_at(&id, seq).await?,
        None => {
            let view = app.rt.device(&id).await?;
            crate::view::DeviceState {
                seq: view.summary.seq,
                state: view.state,
            }
        }
    };
    Ok(json::ok(&StateOut {
        seq: snapshot.seq,
        state: Json(snapshot.state),
    }))
}

/// Answer of `POST /v1/devices/{id}/resume`.
#[derive(Debug, Serialize)]
struct Resumed {
    id: String,
    #[serde(flatten)]
    what: crate::view::Resumed,
}

/// `POST /v1/devices/{id}/resume`: ends the device's quarantine now (after fixing what made
/// its plugin fail), so its next event runs the guest again, and starts its count of
/// failures afresh (also when it is not quarantined). 200
/// `{"id","status","was_quarantined","failures_forgotten"}`.
pub async fn resume(State(app): State<App>, Id(id): Id, _: NoQuery) -> Result<Response, ApiError> {
    let what = app.rt.resume(&id).await?;
    Ok(json::ok(&Resumed { id, what }))
}

/// Query of `DELETE /v1/devices/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    /// Write the device's history to `<data>/archive/` first.
    #[serde(default)]
    archive: bool,
}

/// `DELETE /v1/devices/{id}[?archive=true]`: removes the device (see `crate::removal`).
/// 200 `{"id","seq","archive"}` with the archive's path or `null`; 404 if unknown.
pub async fn remove(
    State(app): State<App>,
    Id(id): Id,
    QueryOf(q): QueryOf<RemoveQuery>,
) -> Result<Response, ApiError> {
    let removal = app.rt.remove_device(&id, q.archive).await?;
    Ok(json::ok(&removal))
}

/// One dead letter as answered: the view plus the event as JSON.
#[derive(Debug, Serialize)]
struct DeadLetterOut {
    #[serde(flatten)]
    letter: DeadLetterView,
    event: Json,
}

/// Answer of `GET /v1/devices/{id}/dead-letters`.
#[derive(Debug, Serialize)]
struct DeadLetters {
    dead_letters: Vec<DeadLetterOut>,
    /// Of the most recent 100, how many journal retention deleted (not listed).
    retained_away: usize,
}

/// `GET /v1/devices/{id}/dead-letters`: the most recent events the device's plugin failed on
/// (trap, timeout, oversized output; a message or timer firing it refused), and messages it
/// sent that could not be delivered, oldest first, at most 100:
/// `{"dead_letters": [{"after_seq","at_ms","plugin","version","code","message","event"}],
/// "retained_away": n}`.
pub async fn dead_letters(
    State(app): State<App>,
    Id(id): Id,
    _: NoQuery,
) -> Result<Response, ApiError> {
    let _turn = app.page_turn().await?;
    let rt = app.rt.clone();
    let (letters, retained_away) = tokio::task::spawn_blocking(move || {
        // Listed first: a retention pass between the two reads may count a letter listed,
        // but never hides one from both.
        let letters = rt.dead_letters(&id)?;
        Ok::<_, Error>((letters, rt.dead_letters_retained_away(&id)?))
    })
    .await
    .map_err(|e| ApiError::from(Error::Internal(format!("read task: {e}"))))??;
    let dead_letters = letters
        .into_iter()
        .map(|mut letter| DeadLetterOut {
            event: Json(std::mem::take(&mut letter.event)),
            letter,
        })
        .collect();
    Ok(json::ok(&DeadLetters {
        dead_letters,
        retained_away,
    }))
}

/// One command as answered: the view plus the command as JSON.
#[derive(Debug, Serialize)]
struct CommandOut {
    #[serde(flatten)]
    view: CommandView,
    command: Json,
}

/// Answer of `GET /v1/devices/{id}/commands`.
#[derive(Debug, Serialize)]
struct Commands {
    commands: Vec<CommandOut>,
    /// Pass as `after` for the next page; `null` on the last page.
    next: Option<String>,
}

/// Query of `GET /v1/devices/{id}/commands`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsQuery {
    /// With nothing to answer, wait up to this many ms (at most 60,000) for a command: a
    /// long poll. Absent or 0: answer at once.
    #[serde(default, deserialize_with = "saturating")]
    wait_ms: Option<u64>,
    /// Commands with ids after this one (`"<seq>.<index>"`, the previous page's `next`, or
    /// the last id a gateway read).
    after: Option<String>,
    /// Page size, 1..=10,000 (default 1,000; larger is clamped).
    #[serde(default, deserialize_with = "saturating")]
    limit: Option<usize>,
}

/// `GET /v1/devices/{id}/commands[?wait_ms=N][&after=ID][&limit=N]`: the device's outbox, the
/// commands its plugin issued that nobody acknowledged yet, oldest first, a page at a time:
/// `{"commands":[{"id":"<seq>.<index>","seq","index","at_ms","expires_ms","command"}],
/// "next"}`. A page holds up to `limit` commands and ends early once they reach 4 MiB
/// (`drover::OUTBOX_PAGE_BYTES`). Reading does not acknowledge: a command is answered again
/// until `POST /v1/devices/{id}/commands/{command}/ack`.
///
/// A waiting poll whose client goes (a reset, or its side closed) ends at once: it held its
/// connection's place under the connection cap until the wait ran out (see `http/peer.rs`).
pub async fn commands(
    State(app): State<App>,
    peer: Option<axum::Extension<super::peer::Peer>>,
    Id(id): Id,
    QueryOf(q): QueryOf<CommandsQuery>,
) -> Result<Response, ApiError> {
    let wait = std::time::Duration::from_millis(q.wait_ms.unwrap_or(0));
    let limit = page_size(q.limit, crate::DEFAULT_OUTBOX_PAGE, crate::MAX_OUTBOX_PAGE)?;
    if let Some(after) = q.after.as_deref()
        && let Err(Error::MalformedEvent(why)) = crate::outbox_api::parse_command_id(after)
    {
        return Err(ApiError::malformed_query(super::extract::short_quotes(
            &format!("after: {why}"),
        )));
    }
    let after = q.after.as_deref();
    let page = tokio::select! {
        page = app.rt.wait_commands_page(&id, after, limit, wait) => page?,
        // What the outbox holds now: a client that only closed its side still reads it.
        () = super::peer::gone(peer.map(|p| p.0)) => {
            app.rt.commands_page(&id, after, limit)?
        }
    };
    Ok(json::ok(&Commands {
        commands: page
            .commands
            .into_iter()
            .map(|mut view| CommandOut {
                command: Json(std::mem::take(&mut view.command)),
                view,
            })
            .collect(),
        next: page.next,
    }))
}

/// `POST /v1/devices/{id}/commands/{command}/ack`: the command was carried out (or will
/// never be): it leaves the outbox once that is durable. 200 `{"id","acked"}`, `acked`
/// false when it was no longer pending (acknowledged before, or expired).
pub async fn ack_command(
    State(app): State<App>,
    super::extract::IdAndCommand(id, command): super::extract::IdAndCommand,
    _: NoQuery,
) -> Result<Response, ApiError> {
    let acked = app.rt.ack_command(&id, &command).await?;
    Ok(json::ok(
        &serde_json::json!({"id": command, "acked": acked}),
    ))
}

/// One timer as answered.
#[derive(Debug, Serialize)]
struct TimerOut {
    #[serde(flatten)]
    view: TimerView,
    event: Json,
}

/// `GET /v1/devices/{id}/timers`: the device's pending durable timers:
/// `{"timers":[{"key","due_ms","every_ms","event"}]}`.
pub async fn timers(State(app): State<App>, Id(id): Id, _: NoQuery) -> Result<Response, ApiError> {
    let rt = app.rt.clone();
    // Events are read from the records that set the timers: off the async workers.
    let timers = tokio::task::spawn_blocking(move || rt.timers(&id))
        .await
        .map_err(|e| ApiError::from(Error::Internal(format!("read task: {e}"))))??;
    let timers: Vec<TimerOut> = timers
        .into_iter()
        .map(|mut view| TimerOut {
            event: Json(std::mem::take(&mut view.event)),
            view,
        })
        .collect();
    Ok(json::ok(&serde_json::json!({ "timers": timers })))
}

/// `GET /v1/devices/{id}/commands/stream`: the outbox as server-sent events. Every waiting
/// command is sent at once, then each new one as it becomes durable: `event: command`, `id:
/// <seq>.<index>`, `data:` the command view as JSON (as in `GET .../commands`). A command is
/// sent once per connection; until acknowledged, a new connection gets it again. A comment
/// line every 15 s keeps proxies from closing an idle stream; the stream ends when the
/// server stops.
///
/// It takes no query parameters (`wait_ms` is the list's): any is 400 `malformed-query`. The
/// stream also ends when the device is removed.
pub async fn commands_stream(
    State(app): State<App>,
    peer: Option<axum::Extension<super::peer::Peer>>,
    Id(id): Id,
    _: NoQuery,
) -> Result<Response, ApiError> {
    use axum::response::IntoResponse;
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures::StreamExt as _;
    let watch = app.rt.watch_commands(&id)?;
    let stream = futures::stream::unfold(
        (watch, std::collections::VecDeque::new()),
        |(mut watch, mut ready)| async move {
            loop {
                if let Some(event) = ready.pop_front() {
                    return Some((Ok::<Event, std::convert::Infallible>(event), (watch, ready)));
                }
                let fresh = match watch.next().await {
                    Ok(Some(fresh)) => fresh,
                    Ok(None) | Err(_) => return None,
                };
                for mut view in fresh {
                    let command = Json(std::mem::take(&mut view.command));
                    let id = view.id.clone();
                    let data =
                        serde_json::to_string(&CommandOut { view, command }).unwrap_or_default();
                    ready.push_back(Event::default().event("command").id(id).data(data));
                }
            }
        },
    );
    // Ends when the client goes, not at the next comment it would fail to write.
    let stream = stream.take_until(super::peer::gone(peer.map(|p| p.0)));
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::CommandsQuery;

    fn wait_ms(query: &str) -> Result<Option<u64>, String> {
        let uri: axum::http::Uri = format!("/v1/devices/t/commands?{query}")
            .parse()
            .expect("uri");
        axum::extract::Query::<CommandsQuery>::try_from_uri(&uri)
            .map(|q| q.0.wait_ms)
            .map_err(|e| e.body_text())
    }

    /// The README: more than 60,000 is taken as 60,000, however many digits it has; what is
    /// not digits is refused.
    #[test]
    fn a_long_poll_wait_saturates_and_only_digits_are_one() {
        assert_eq!(wait_ms(""), Ok(None));
        assert_eq!(wait_ms("wait_ms=0"), Ok(Some(0)));
        assert_eq!(wait_ms("wait_ms=25000"), Ok(Some(25_000)));
        assert_eq!(wait_ms("wait_ms=18446744073709551615"), Ok(Some(u64::MAX)));
        assert_eq!(
            wait_ms("wait_ms=99999999999999999999999"),
            Ok(Some(u64::MAX))
        );
        for bad in ["-1", "1.5", "0x10", "", "%201", "ten"] {
            let err = wait_ms(&format!("wait_ms={bad}")).expect_err(bad);
            assert!(err.contains("is not a whole number"), "{bad}: {err}");
        }
    }
}
