//! Plugin routes: upload, list, deploy, rollback and dry-run (see `crate::deploy`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::App;
use super::error::ApiError;
use super::extract::{Body, Id, NameAndVersion, NoQuery};
use super::json;
use crate::Selection;
use crate::registry::{Origin, PluginVersion, Registered};

/// Answer of an upload.
#[derive(Debug, Serialize)]
struct Uploaded {
    name: String,
    version: u32,
    digest: String,
    /// The bytes of an existing version whose stored copy was damaged or missing, and is
    /// written again from them (200). Absent otherwise.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    repaired: bool,
}

/// `POST /v1/plugins/{name}`: the body is the component's raw bytes. A new version is 201;
/// bytes identical to the newest version answer that version with 200. Bytes that are not a
/// valid `device` component are 422 `invalid-plugin` and nothing is stored.
pub async fn upload(
    State(app): State<App>,
    Id(name): Id,
    _: NoQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let (v, registered) = app
        .rt
        .register_plugin_reporting(&name, body.0.to_vec(), Origin::Upload)
        .await?;
    let status = if registered == Registered::New {
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
            repaired: registered == Registered::Repaired,
        },
    ))
}

/// One plugin in the list.
#[derive(Debug, Serialize)]
struct PluginOut {
    name: String,
    /// The newest version registered.
    latest: u32,
    /// The version new devices get and devices are moved to (see `crate::registry`).
    current: u32,
    /// Every version, oldest first.
    versions: Vec<PluginVersion>,
}

/// Answer of `GET /v1/plugins`.
#[derive(Debug, Serialize)]
struct PluginList {
    plugins: Vec<PluginOut>,
}

/// `GET /v1/plugins`: every plugin with its versions, by name.
pub async fn list(State(app): State<App>, _: NoQuery) -> Response {
    let plugins = app
        .rt
        .plugins()
        .into_iter()
        .map(|(name, versions)| PluginOut {
            latest: versions.last().map_or(0, |v| v.version),
            current: app.rt.current_version(&name).unwrap_or(0),
            name,
            versions,
        })
        .collect();
    json::ok(&PluginList { plugins })
}

/// Body of a deploy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    version: u32,
    #[serde(default)]
    force: bool,
}

/// `POST /v1/plugins/{name}/deploy` `{"version": V, "force": false}`: moves every device of
/// the plugin to version V and answers the deploy report (200). 404 unknown plugin or
/// version; 409 `deploy-refused` when the dry-run sample finds devices V cannot fold.
pub async fn deploy(
    State(app): State<App>,
    Id(name): Id,
    _: NoQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let req: DeployBody = body.json()?;
    let report = app.rt.deploy(&name, req.version, req.force).await?;
    Ok(json::ok(&report))
}

/// Body of a rollback (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    #[serde(default)]
    force: bool,
}

/// `POST /v1/plugins/{name}/rollback` (body optional: `{"force": true}`): back to the version
/// current before the last deploy, the same way (sample check included); 409
/// `deploy-refused` if there is none or the sample refuses it.
pub async fn rollback(
    State(app): State<App>,
    Id(name): Id,
    _: NoQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let req: RollbackBody = if body.0.iter().all(u8::is_ascii_whitespace) {
        RollbackBody::default()
    } else {
        body.json()?
    };
    let report = app.rt.rollback(&name, req.force).await?;
    Ok(json::ok(&report))
}

/// Body of a dry-run: a version and either device ids or a sample size.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DryRunBody {
    version: u32,
    #[serde(default)]
    devices: Option<Vec<String>>,
    #[serde(default, deserialize_with = "whole_count")]
    sample: Option<usize>,
}

/// A count in a JSON body that the route caps: any whole number, however large. Past `u64`
/// serde_json reads an integer as a float (`1e20`), which a `usize` refused, though a larger
/// `sample` is documented as capped; past `usize` it is `usize::MAX`, which the cap takes.
fn whole_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    struct Whole;
    impl serde::de::Visitor<'_> for Whole {
        type Value = Option<usize>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a whole number of devices, 0 or more")
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
            Ok(Some(usize::try_from(n).unwrap_or(usize::MAX)))
        }

        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
            u64::try_from(n)
                .map(|n| Some(usize::try_from(n).unwrap_or(usize::MAX)))
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(n), &self))
        }

        fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Self::Value, E> {
            if n >= 0.0 && n.fract() == 0.0 {
                // `as` saturates: past `usize` is `usize::MAX`.
                Ok(Some(n as usize))
            } else {
                Err(E::invalid_value(serde::de::Unexpected::Float(n), &self))
            }
        }
    }
    d.deserialize_any(Whole)
}

/// Devices a dry-run samples when the body names neither devices nor a sample size.
const DEFAULT_DRY_RUN_SAMPLE: usize = 16;
/// Most devices one dry-run request may examine.
const MAX_DRY_RUN_DEVICES: usize = 1000;

/// `POST /v1/plugins/{name}/dry-run` `{"version": V, "devices": [...] | "sample": N}`:
/// re-decides the recorded events of those devices with version V, writing nothing, and
/// answers the comparison (200).
pub async fn dry_run(
    State(app): State<App>,
    Id(name): Id,
    _: NoQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let req: DryRunBody = body.json()?;
    let selection = match (req.devices, req.sample) {
        (Some(_), Some(_)) => {
            return Err(ApiError::malformed_request(
                "give either `devices` or `sample`, not both",
            ));
        }
        // A dry-run of no device checks nothing, and a script gating a deploy on its totals
        // would pass a version the deploy refuses.
        (Some(ids), None) if ids.is_empty() => {
            return Err(ApiError::malformed_request(
                "`devices` is empty: name at least one device, or give a `sample`",
            ));
        }
        (None, Some(0)) => {
            return Err(ApiError::malformed_request(format!(
                "`sample` is 0: sample 1 to {MAX_DRY_RUN_DEVICES} devices"
            )));
        }
        (Some(ids), None) if ids.len() > MAX_DRY_RUN_DEVICES => {
            return Err(ApiError::malformed_request(format!(
                "at most {MAX_DRY_RUN_DEVICES} devices per dry-run"
            )));
        }
        (Some(ids), None) => {
            let mut seen = std::collections::HashSet::with_capacity(ids.len());
            if let Some(twice) = ids.iter().find(|id| !seen.insert(id.as_str())) {
                return Err(ApiError::malformed_request(format!(
                    "device `{twice}` is listed twice: name each device once"
                )));
            }
            Selection::Devices(ids)
        }
        (None, n) => {
            Selection::Sample(n.unwrap_or(DEFAULT_DRY_RUN_SAMPLE).min(MAX_DRY_RUN_DEVICES))
        }
    };
    let report = app.rt.dry_run(&name, req.version, selection).await?;
    Ok(json::ok(&report))
}

/// `DELETE /v1/plugins/{name}`: removes the plugin and every version (see
/// `crate::removal`). 200 `{"name","removed":[versions]}`; 409 `version-in-use` while a device
/// runs one of them.
pub async fn remove(
    State(app): State<App>,
    Id(name): Id,
    _: NoQuery,
) -> Result<Response, ApiError> {
    let removed = app.rt.remove_plugin(&name).await?;
    Ok(json::ok(
        &serde_json::json!({"name": name, "removed": removed}),
    ))
}

/// `DELETE /v1/plugins/{name}/versions/{version}`: removes one version. 200
/// `{"name","removed":[version]}`; 409 `version-in-use` while a device runs it or it is the
/// current version.
pub async fn remove_version(
    State(app): State<App>,
    NameAndVersion(name, version): NameAndVersion,
    _: NoQuery,
) -> Result<Response, ApiError> {
    app.rt.remove_plugin_version(&name, version).await?;
    Ok(json::ok(
        &serde_json::json!({"name": name, "removed": [version]}),
    ))
}
