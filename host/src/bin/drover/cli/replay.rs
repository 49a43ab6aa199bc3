//! `drover replay`: rebuild a device's state from a data directory, without a server.
//!
//! The journal is opened read-only, so this runs beside a live server on the same directory
//! (a debugging session on production data) and after a crash (before the server is
//! restarted). The output is the same `{"seq","state"}` JSON as `GET /v1/devices/{id}/state`,
//! so the two can be compared directly.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use drover::replay::{self, Start};

/// `drover replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The device id.
    pub device: String,
    /// The server's data directory.
    #[arg(long, default_value = "./data")]
    pub data: PathBuf,
    /// Rebuild the state right after this seq (default: the latest).
    #[arg(long)]
    pub to: Option<u64>,
    /// Ignore snapshots and replay every transition from `init` (the reference rebuild).
    #[arg(long)]
    pub genesis: bool,
    /// Milliseconds the whole rebuild may take, instead of the server's activation budget
    /// (`--activation-timeout-ms`, recorded in the data directory): to rebuild a device whose
    /// history outgrew it (1 to 86,400,000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    pub activation_timeout_ms: Option<u64>,
}

#[derive(serde::Serialize)]
struct Out {
    seq: u64,
    state: drover::http::json::Json,
}

/// Prints `{"seq","state"}` for the device.
pub fn run(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let start = if args.genesis {
        Start::Genesis
    } else {
        Start::Snapshot
    };
    let budget = args
        .activation_timeout_ms
        .map(std::time::Duration::from_millis);
    let snap =
        replay::offline_within(&args.data, &args.device, args.to, start, budget).map_err(|e| {
            let retained = e
                .downcast_ref::<drover::Error>()
                .is_some_and(|d| d.kind() == drover::ErrorKind::RetainedAway);
            if args.genesis && retained {
                e.context(
                    "--genesis replays every transition from seq 1; without it, a rebuild starts \
                 from a snapshot kept",
                )
            } else {
                e
            }
        })?;
    let out = Out {
        seq: snap.seq,
        state: drover::http::json::Json(snap.state),
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(ExitCode::SUCCESS)
}
