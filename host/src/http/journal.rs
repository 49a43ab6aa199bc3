//! The journal as a whole: its segments and retention (`/v1/journal`).

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::App;
use super::error::ApiError;
use super::extract::NoQuery;

/// `GET /v1/journal`: `{"durable_bytes", "retention": {"policy", "keep_events",
/// "keep_for_secs", "retained_from", "segments", "passes", "deleted_segments",
/// "deleted_bytes", "pinned_by": {"device", "reason", "position"} | null}}` (`device` null
/// for the journal's own bounds: `index-checkpoint`, `keep-hours`; see `journal::Pin`).
pub async fn show(State(app): State<App>, _: NoQuery) -> Response {
    Json(app.rt.journal_status()).into_response()
}

/// `POST /v1/journal/retention`: runs a retention pass now (one also follows every index
/// checkpoint); answers what it deleted: `{"deleted_segments", "deleted_bytes",
/// "retained_from", "pinned_by"}`. With the policy `keep-all` it deletes nothing.
pub async fn retain(State(app): State<App>, _: NoQuery) -> Result<Response, ApiError> {
    Ok(Json(app.rt.retain_now().await?).into_response())
}
