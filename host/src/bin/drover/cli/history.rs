//! `drover journal export|import` and `drover backup`: a data directory's history taken out,
//! brought back, and copied whole, without a server (see `drover::export` and
//! `drover::backup` for the format and the consistency argument).
//!
//! Export and backup open the journal read-only, so they run beside a live server on the same
//! directory. Import writes into a data directory no server is using (it takes its lock).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};

/// `drover journal export` / `drover journal import`.
#[derive(Debug, Subcommand)]
pub enum JournalAction {
    /// Write devices' histories (with their plugins' components) as portable JSON lines.
    Export(ExportArgs),
    /// Import an export into a data directory (its devices must not exist there yet).
    Import(ImportArgs),
}

/// `drover journal export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The device to export (or `--all`).
    #[arg(required_unless_present_any = ["all", "server"], conflicts_with = "all")]
    pub device: Option<String>,
    /// Export every device.
    #[arg(long)]
    pub all: bool,
    /// First seq of each device's records, from 1 (a partial export cannot be imported).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub from: u64,
    /// Each device from its oldest record journal retention kept (`--retention
    /// after-snapshot`): everything still readable. For reading; import refuses it.
    #[arg(long, conflicts_with = "from")]
    pub kept: bool,
    /// The data directory (a live server's is fine).
    #[arg(long, default_value = "./data")]
    pub data: PathBuf,
    /// Write to this file instead of stdout.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Not an option of `export`: taken only to say what was meant (see [`server_meant`]).
    #[arg(long, hide = true)]
    pub server: Option<String>,
}

/// `drover journal import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The export file.
    #[arg(required_unless_present = "server")]
    pub file: Option<PathBuf>,
    /// The data directory to import into (created if missing; no server may be using it).
    #[arg(long, default_value = "./data")]
    pub data: PathBuf,
    /// Not an option of `import`: taken only to say what was meant (see [`server_meant`]).
    #[arg(long, hide = true)]
    pub server: Option<String>,
}

/// The error for `drover journal export|import --server URL`: those work on data
/// directories, so it most likely names a device called `export` or `import` whose journal
/// is to be read from a server, which clap took for the subcommand (its own words, "unexpected
/// argument '--server' found", did not say how to write it).
fn server_meant(what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "`drover journal {what}` works on a data directory (`--data DIR`) and takes no \
         `--server`. (To read the journal of a device named `{what}` from a server, put the \
         options first: `drover journal --server URL {what}`)"
    )
}

/// `drover backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The data directory to copy (a live server's is fine).
    #[arg(long, default_value = "./data")]
    pub data: PathBuf,
    /// Where to put the copy: a new or empty directory.
    #[arg(long)]
    pub to: PathBuf,
}

/// Runs `drover journal export|import`.
pub fn run(action: JournalAction) -> anyhow::Result<ExitCode> {
    match action {
        JournalAction::Export(args) if args.server.is_some() => Err(server_meant("export")),
        JournalAction::Import(args) if args.server.is_some() => Err(server_meant("import")),
        JournalAction::Export(args) => export(args),
        JournalAction::Import(args) => import(args),
    }
}

fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let start = if args.kept {
        drover::export::ExportStart::Kept
    } else {
        drover::export::ExportStart::Seq(args.from)
    };
    let only = if args.all {
        None
    } else {
        args.device.as_deref()
    };
    let summary = match &args.output {
        Some(path) => {
            // Checked first: a directory was found only at the rename, after the whole
            // export had been written beside it.
            if path.is_dir() {
                anyhow::bail!(
                    "{} is a directory: give the export file's path, such as {}",
                    path.display(),
                    path.join("fleet.jsonl").display()
                );
            }
            // A device, a FIFO or a socket (`-o /dev/null`, `-o >(gzip > f)`) is written to as
            // it is: renamed over, it was replaced by a regular file (as root, `/dev/null`
            // itself, which then broke every program writing to it).
            if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                let mut out = std::io::BufWriter::new(file);
                let summary = drover::export::export(&args.data, only, start, &mut out)?;
                out.flush()
                    .with_context(|| format!("writing {}", path.display()))?;
                return finish_export(&summary, path);
            }
            // A symbolic link's target is what is replaced (or created), not the link.
            let path = &through_links(path);
            // Written beside the target and renamed over it once complete, so the target
            // never holds half an export; removed again if the export fails.
            let mut tmp = path.clone().into_os_string();
            tmp.push(".partial");
            let tmp = std::path::PathBuf::from(tmp);
            let written = (|| -> anyhow::Result<_> {
                let file = std::fs::File::create(&tmp)
                    .with_context(|| format!("creating {}", tmp.display()))?;
                let mut out = std::io::BufWriter::new(file);
                let summary = drover::export::export(&args.data, only, start, &mut out)?;
                let file = out.into_inner().map_err(|e| e.into_error())?;
                file.sync_all()?;
                std::fs::rename(&tmp, path)
                    .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
                Ok(summary)
            })();
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            written?
        }
        None => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let summary = drover::export::export(&args.data, only, start, &mut out)?;
            out.flush()?;
            summary
        }
    };
    match &args.output {
        Some(path) => finish_export(&summary, path),
        None => {
            tracing::info!(
                devices = summary.devices,
                records = summary.records,
                plugins = summary.plugins,
                "exported"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `path` with the symbolic links it is followed through, even to a target that does not
/// exist yet (which an export then creates, as a shell's `>` would).
fn through_links(path: &std::path::Path) -> std::path::PathBuf {
    let mut path = path.to_path_buf();
    // As many as the kernel follows (`ELOOP` past it).
    for _ in 0..40 {
        let Ok(target) = std::fs::read_link(&path) else {
            break;
        };
        path = match path.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
    }
    path
}

/// Logs and prints what an export to `path` wrote.
fn finish_export(
    summary: &drover::export::ExportSummary,
    path: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    tracing::info!(
        devices = summary.devices,
        records = summary.records,
        plugins = summary.plugins,
        "exported"
    );
    println!(
        "exported {} device(s), {} record(s), {} plugin version(s) to {}",
        summary.devices,
        summary.records,
        summary.plugins,
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    // Required unless `--server` was given, which `run` answers first.
    let file = args
        .file
        .ok_or_else(|| anyhow::anyhow!("the export file to import is missing"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let summary = drover::export::import(&args.data, &file).await?;
        println!(
            "imported {} device(s), {} record(s); {} plugin version(s) registered{}{}",
            summary.devices,
            summary.records,
            summary.plugins_registered,
            if summary.effects_settled > 0 {
                format!(
                    "; {} command(s) or message(s) the source no longer owed recorded as settled",
                    summary.effects_settled
                )
            } else {
                String::new()
            },
            if summary.records_reattributed > 0 {
                format!(
                    "; {} record(s) named a plugin version not in the export and were \
                     attributed to their device's version",
                    summary.records_reattributed
                )
            } else {
                String::new()
            }
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// Runs `drover backup`.
pub fn backup(args: BackupArgs) -> anyhow::Result<ExitCode> {
    let summary = drover::backup::backup(&args.data, &args.to)?;
    println!(
        "backed up {} device(s): {} journal bytes{}{}, {} plugin file(s), {} archive(s) of \
         removed devices, to {}",
        summary.devices,
        summary.journal_bytes,
        if summary.journal_from > 0 {
            format!(
                " (from position {}: retention deleted what came before)",
                summary.journal_from
            )
        } else {
            String::new()
        },
        match (summary.left_out, summary.offline) {
            (0, _) => String::new(),
            (n, true) => format!(
                " ({n} bytes of a torn tail left out, as a server starting on it would cut them)"
            ),
            (n, false) => {
                format!(" ({n} bytes the running server had not proven durable yet left out)")
            }
        },
        summary.plugin_files,
        summary.archives,
        args.to.display()
    );
    Ok(ExitCode::SUCCESS)
}
