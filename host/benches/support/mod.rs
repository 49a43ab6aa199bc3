//! What the guest-running benches share: the example thermostat component as the build
//! made it, and numeric options from the environment. Included with `#[path]`.
#![allow(dead_code)]

/// The example thermostat component, as the build made it.
pub const THERMOSTAT: &[u8] = include_bytes!(concat!(
    env!("DROVER_EXAMPLE_PLUGIN_DIR"),
    "/thermostat.wasm"
));

/// The environment variable `name` as a number, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Provisions a thermostat (setpoint 21) under each of `ids`, from `tasks` concurrent tasks
/// (at least one): each provisioning runs the plugin's `init` once and writes one durable
/// record, and no instance stays live.
pub async fn provision_thermostats(
    rt: &drover::Runtime,
    ids: &[String],
    tasks: usize,
) -> anyhow::Result<()> {
    let mut provisioning = tokio::task::JoinSet::new();
    for chunk in ids.chunks(ids.len().div_ceil(tasks.max(1)).max(1)) {
        let (rt, chunk) = (rt.clone(), chunk.to_vec());
        provisioning.spawn(async move {
            for id in chunk {
                rt.provision(&id, "thermostat", &serde_json::json!({"setpoint": 21.0}))
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = provisioning.join_next().await {
        r??;
    }
    Ok(())
}
