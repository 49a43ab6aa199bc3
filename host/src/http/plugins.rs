//! Plugin routes: upload and list. Deploy and dry-run are reserved (501) until hot reload.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;

use super::App;
use super::error::{ApiError, codes};
use super::extract::{Body, Id};
use super::json;
use crate::registry::PluginVersion;

/// Answer of an upload.
#[derive(Debug, Serialize)]
struct Uploaded {
    name: String,
    version: u32,
    digest: String,
}

/// `POST /v1/plugins/{name}`: the body is the component's raw bytes. A new version is 201;
/// bytes identical to the newest version answer that version with 200. Bytes that are not a
/// valid `device` component are 422 `invalid-plugin` and nothing is stored.
pub async fn upload(
    State(app): State<App>,
    Id(name): Id,
    body: Body,
) -> Result<Response, ApiError> {
    let (v, new) = app.rt.register_plugin(&name, body.0.to_vec()).await?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json::reply(
        status,
        &Uploaded {
            name: v.name,
            version: v.version,
            digest: v.digest,
        },
    ))
}

/// One plugin in the list.
#[derive(Debug, Serialize)]
struct PluginOut {
    name: String,
    /// The version new devices get.
    latest: u32,
    /// Every version, oldest first.
    versions: Vec<PluginVersion>,
}

/// Answer of `GET /v1/plugins`.
#[derive(Debug, Serialize)]
struct PluginList {
    plugins: Vec<PluginOut>,
}

/// `GET /v1/plugins`: every plugin with its versions, by name.
pub async fn list(State(app): State<App>) -> Response {
    let plugins = app
        .rt
        .plugins()
        .into_iter()
        .map(|(name, versions)| PluginOut {
            latest: versions.last().map_or(0, |v| v.version),
            name,
            versions,
        })
        .collect();
    json::ok(&PluginList { plugins })
}

fn not_yet(what: &str) -> ApiError {
    ApiError::http(
        StatusCode::NOT_IMPLEMENTED,
        codes::NOT_IMPLEMENTED,
        format!("{what} is not implemented yet (it comes with hot reload)"),
    )
}

/// `POST /v1/plugins/{name}/deploy`: reserved, 501.
pub async fn deploy(Id(_name): Id) -> ApiError {
    not_yet("deploy")
}

/// `POST /v1/plugins/{name}/dry-run`: reserved, 501.
pub async fn dry_run(Id(_name): Id) -> ApiError {
    not_yet("dry-run")
}
