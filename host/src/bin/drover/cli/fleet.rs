//! `drover sim`, `drover demo` and `drover bench http`: the fleet simulator from the command
//! line, alone, with a server in the same process, and as a benchmark.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use super::serve::{Tuning, announce};
use crate::sim::{self, Custom, Fleet, Load, SimConfig, Summary, fmt_count, fmt_us};
use drover::http::{Server, server::shutdown_signal};

/// Pacing and shape options shared by `sim` and `demo`.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Number of devices.
    #[arg(long, default_value_t = 300)]
    pub devices: usize,
    /// Device types: thermostat, door-lock, mixed (built-in event generators), or the name
    /// of any plugin on the server, with `--event` or `--events-file` templates.
    #[arg(long, default_value = "mixed")]
    pub plugin: String,
    /// Provisioning config of a plugin without a built-in generator (JSON; default `{}`).
    #[arg(long)]
    pub config: Option<String>,
    /// An event template (JSON; repeatable). Strings `{{int:LO:HI}}`, `{{float:LO:HI}}`,
    /// `{{pick:A|B}}` and `{{bool}}` inside it become random values per event (an integer, a
    /// number rounded to 2 decimals, one of the words as a string, `true` or `false`); a
    /// placeholder is a whole string.
    #[arg(long = "event", value_name = "JSON")]
    pub event_templates: Vec<String>,
    /// Event templates from a file: a JSON array, or one JSON event per line.
    #[arg(long)]
    pub events_file: Option<std::path::PathBuf>,
    /// Prefix of the device ids (followed by a six-digit number).
    #[arg(long, default_value = "sim-")]
    pub prefix: String,
    /// Send this many events per second (default: closed loop, as fast as answered).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Requests in flight (closed loop), or at most in flight (with --rate); 1 to 4,096,
    /// each on a connection of its own.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds to run (default 10 unless --events is given).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Stop after this many events.
    #[arg(long)]
    pub events: Option<u64>,
    /// Events per request: above 1, gateway batches via POST /v1/events.
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub batch: usize,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
    /// Seed of the event generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl LoadArgs {
    fn config(&self, server: &str) -> anyhow::Result<SimConfig> {
        let fleet: Fleet = self
            .plugin
            .parse()
            .map_err(|e: String| anyhow::anyhow!(e))?;
        let mut templates = Vec::new();
        for t in &self.event_templates {
            templates.extend(Custom::parse_templates(t).context("--event")?);
        }
        if let Some(path) = &self.events_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            templates.extend(
                Custom::parse_templates(&text).with_context(|| format!("in {}", path.display()))?,
            );
        }
        let custom = match fleet {
            Fleet::Custom if templates.is_empty() => anyhow::bail!(
                "no built-in events for plugin `{}`: give templates with --event JSON or \
                 --events-file FILE",
                self.plugin
            ),
            Fleet::Custom => Some(std::sync::Arc::new(Custom {
                plugin: self.plugin.clone(),
                config: serde_json::from_str(self.config.as_deref().unwrap_or("{}"))
                    .context("--config is not JSON")?,
                templates,
            })),
            _ if !templates.is_empty() => anyhow::bail!(
                "--event and --events-file are for plugins without a built-in generator; `{}` \
                 has one",
                self.plugin
            ),
            // A built-in generator provisions with the config its events are made for.
            _ if self.config.is_some() => anyhow::bail!(
                "--config is for plugins without a built-in generator; `{}` has one (and \
                 provisions with its own config)",
                self.plugin
            ),
            _ => None,
        };
        let duration = match (self.duration, self.events) {
            (Some(d), _) => Some(Duration::from_secs_f64(d.max(0.0))),
            (None, Some(_)) => None,
            (None, None) => Some(Duration::from_secs(10)),
        };
        Ok(SimConfig {
            server: server.to_string(),
            devices: self.devices,
            fleet,
            prefix: self.prefix.clone(),
            load: self.rate.map_or(Load::Closed, Load::Rate),
            concurrency: self.concurrency,
            duration,
            events: self.events,
            batch: self.batch,
            progress: !self.quiet,
            seed: self.seed,
            custom,
        })
    }
}

/// `drover sim`.
#[derive(Debug, Args)]
pub struct SimArgs {
    /// Base URL of the server.
    #[arg(long, env = "DROVER_SERVER", default_value = "http://127.0.0.1:7070")]
    pub server: String,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Do not provision the devices first (they exist already).
    #[arg(long)]
    pub no_provision: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

fn tokio_runtime(name: &str, workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all().thread_name(name);
    if let Some(n) = workers {
        b.worker_threads(n);
    }
    b.build().context("starting the async runtime")
}

/// Provisions and runs a simulated fleet against a server, then prints the summary. Exits
/// non-zero if no event at all was acknowledged.
pub fn sim(args: SimArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.load.config(&args.server)?;
    cfg.check()?;
    let summary = tokio_runtime("drover-sim", None)?.block_on(async {
        if !args.no_provision {
            eprintln!(
                "provisioning {} devices ({}) ...",
                cfg.devices,
                cfg.fleet_name()
            );
            sim::provision(&cfg).await?;
        }
        // Ctrl-C ends the run with its summary, as load tools do.
        sim::run_until(&cfg, shutdown_signal()).await
    })?;
    print_summary(&summary, args.json)?;
    if summary.events_ok == 0 && summary.stopped_early.is_none() {
        eprintln!("error: no event was acknowledged");
    }
    Ok(
        // 128 + SIGINT, as a shell reports a command a Ctrl-C ended.
        if summary.interrupted {
            ExitCode::from(130)
        } else if summary.events_ok > 0 && summary.stopped_early.is_none() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

fn print_summary(summary: &Summary, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(summary)?);
    } else {
        print!("{summary}");
    }
    Ok(())
}

/// `drover demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Data directory of the demo server.
    #[arg(long, default_value = "./data")]
    pub data: PathBuf,
    /// Address the demo server listens on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Stop after the simulation instead of serving until Ctrl-C.
    #[arg(long)]
    pub exit: bool,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// The README's "run" command: a server on the embedded example plugins and a simulated
/// fleet in one process, then directions for looking around.
pub fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    tokio_runtime("drover-demo", None)?.block_on(run_demo(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    let listener = drover::http::server::bind(&args.listen).await?;
    let rt = args
        .tuning
        .open(&args.data, None)
        .await
        .with_context(|| format!("opening {}", args.data.display()))?;
    let server = Server::start_on(rt.clone(), listener, args.tuning.limits())?;
    announce(&server);
    let url = server.url();
    let cfg = args.load.config(&url)?;
    println!(
        "simulating {} devices ({}) for {} ...",
        cfg.devices,
        cfg.fleet_name(),
        match (cfg.duration, cfg.events) {
            (Some(d), _) => format!("{:.0} s", d.as_secs_f64()),
            (None, Some(n)) => format!("{} events", fmt_count(n)),
            (None, None) => "a while".into(),
        }
    );
    // Listening from the start: a Ctrl-C during the simulation stops it and then the demo
    // (it was ignored until the simulation had run its course, and then served on).
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let outcome = async {
        tokio::select! {
            provisioned = sim::provision(&cfg) => provisioned?,
            () = &mut stop => {
                let _ = stop_tx.send(());
                anyhow::bail!("interrupted while provisioning");
            }
        }
        let interrupted = async {
            (&mut stop).await;
            let _ = stop_tx.send(());
        };
        sim::run_until(&cfg, interrupted).await
    }
    .await;
    let interrupted = stop_rx.await.is_ok();
    match &outcome {
        Ok(summary) => {
            println!();
            print!("{summary}");
            if args.exit || interrupted {
                print_offline_directions(&cfg, &args.data);
            } else {
                print_directions(&cfg, &url, &args.data);
            }
        }
        Err(_) if interrupted => println!("\ninterrupted before the simulation started"),
        Err(e) => tracing::error!(error = %e, "simulation failed"),
    }
    if !args.exit && !interrupted {
        println!("\nserving on {url} until Ctrl-C");
        stop.await;
    }
    server.shutdown(Duration::from_secs(5)).await;
    rt.shutdown().await;
    if interrupted {
        return Ok(());
    }
    outcome.map(|_| ())
}

fn print_directions(cfg: &SimConfig, url: &str, data: &Path) {
    let (first, kind) = cfg.device(0);
    // Events that device takes: the thermostat's readings would be refused by a door lock
    // or any other plugin's device.
    let examples: Vec<String> = cfg.examples(kind).iter().map(|e| word(e)).collect();
    let other = (0..cfg.devices)
        .map(|i| cfg.device(i))
        .find(|(_, k)| *k != kind);
    let server = if url == "http://127.0.0.1:7070" {
        String::new()
    } else {
        format!(" --server {url}")
    };
    println!("\nLook at a device:");
    println!("  curl -s {url}/v1/devices/{first}");
    println!("  curl -s '{url}/v1/devices/{first}/journal?from=1&limit=5'");
    println!("  curl -s '{url}/v1/devices/{first}/state?at=1'");
    if let Some(event) = examples.first() {
        println!("  curl -s -X POST {url}/v1/devices/{first}/events -d {event}");
    }
    println!("  curl -s {url}/metrics | grep drover_events_total");
    println!("or with the CLI:");
    println!("  {}", drover("state", &server, &[&first]));
    println!(
        "  {}",
        drover("journal", &format!(" --limit 5{server}"), &[&first])
    );
    if let Some(event) = examples.last() {
        println!("  {}", drover("send", &server, &[&first, event]));
    }
    if let Some((id, kind)) = other
        && let Some(event) = cfg.examples(kind).first()
    {
        println!("  {}", drover("send", &server, &[&id, &word(event)]));
    }
    let data = format!(" --data {}", word(&data.display().to_string()));
    println!(
        "  {}   # offline, from the journal",
        drover("replay", &data, &[&first])
    );
}

/// A `drover` command line to print: `drover CMD ARGS OPTIONS`, or, when the first argument
/// (a device id from `--prefix`) starts with `-` and would be read as an option,
/// `drover CMD OPTIONS -- ARGS`.
fn drover(command: &str, options: &str, args: &[&str]) -> String {
    let args = args.join(" ");
    if args.starts_with('-') {
        format!("drover {command}{options} -- {args}")
    } else {
        format!("drover {command} {args}{options}")
    }
}

/// `text` as one word for a POSIX shell, so that a printed command can be pasted: as it is
/// if it is plain, else in single quotes, each of its own closed and escaped (a custom event
/// template may hold one).
fn word(text: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./:@%+=,-".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// What to look at once a demo run with `--exit` has stopped its server.
fn print_offline_directions(cfg: &SimConfig, data: &Path) {
    let (first, _) = cfg.device(0);
    println!(
        "\nThe server has stopped; the fleet is in {}:",
        data.display()
    );
    println!(
        "  {}   # a device rebuilt from the journal",
        drover(
            "replay",
            &format!(" --data {}", word(&data.display().to_string())),
            &[&first]
        )
    );
    println!(
        "  drover serve --data {}   # serve it again",
        word(&data.display().to_string())
    );
}

/// `drover bench ...`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

/// What to measure.
#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Events/s and latency over HTTP with keep-alive: single events and gateway batches.
    Http(BenchHttpArgs),
}

/// `drover bench http`.
#[derive(Debug, Args)]
pub struct BenchHttpArgs {
    /// Fleet sizes to measure (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub devices: Vec<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of warm-up before each fleet size (activates the actors; 0: none).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Requests in flight for single events.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Events per batch.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Batches in flight.
    #[arg(long, default_value_t = 4)]
    pub batch_concurrency: usize,
    /// Device type: thermostat, door-lock or mixed.
    #[arg(long, default_value = "thermostat", value_parser = builtin_fleet)]
    pub plugin: Fleet,
    /// Measure this server instead of starting one in this process.
    #[arg(long)]
    pub server: Option<String>,
    /// Data directory of the in-process server (default: a fresh temporary one, removed after).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run the clients on their own async runtime with this many worker threads instead of
    /// on the in-process server's (0: share the server's, the default: on a small machine the
    /// cross-runtime wake-ups cost more than they isolate).
    #[arg(long, default_value_t = 0)]
    pub client_threads: usize,
    /// Print the results as JSON (one summary per line).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// One measurement of `drover bench http`.
#[derive(Debug, serde::Serialize)]
struct Measured {
    summary: Summary,
    /// CPU time of this whole process (the in-process server and the clients) per
    /// acknowledged event: unlike events/s, it does not depend on what else the machine runs.
    cpu_us_per_event: Option<f64>,
}

/// Runs one simulation and the process CPU time it took.
async fn measure(cfg: &SimConfig) -> anyhow::Result<Measured> {
    let before = process_cpu();
    let summary = sim::run(cfg).await?;
    let cpu_us_per_event = match (before, process_cpu()) {
        (Some(a), Some(b)) if summary.events_ok > 0 => {
            Some((b - a).as_secs_f64() * 1e6 / summary.events_ok as f64)
        }
        _ => None,
    };
    Ok(Measured {
        summary,
        cpu_us_per_event,
    })
}

/// User + system CPU time of this process so far (Linux; `None` elsewhere).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesized command name; utime and stime are the 14th and 15th
    // fields overall, in USER_HZ (100 per second on Linux).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Runs `drover bench`.
/// A fleet with a built-in event generator (the HTTP bench compares runs of those).
fn builtin_fleet(s: &str) -> Result<Fleet, String> {
    match s.parse()? {
        Fleet::Custom => Err(format!(
            "no built-in events for `{s}`: the bench drives thermostat, door-lock or mixed"
        )),
        f => Ok(f),
    }
}

pub fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.what {
        BenchWhat::Http(a) => bench_http(a),
    }
}

fn bench_http(args: BenchHttpArgs) -> anyhow::Result<ExitCode> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cfg!(debug_assertions) {
        eprintln!("warning: debug build; use `cargo run --release -- bench http` for real figures");
    }
    // The server gets its own async runtime (as `drover serve` would have its own process);
    // the clients get another. Both share the machine's cores, as they would on one box.
    let server_rt = tokio_runtime("drover-server", None)?;
    let temp = args.data.is_none() && args.server.is_none();
    let data = args.data.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("drover-bench-{}", std::process::id()))
    });
    let started = match &args.server {
        Some(_) => None,
        None => Some(server_rt.block_on(async {
            let rt = args.tuning.open(&data, None).await?;
            let server = Server::start(rt.clone(), "127.0.0.1:0", args.tuning.limits()).await?;
            anyhow::Ok((rt, server))
        })?),
    };
    let url = match &started {
        Some((_, server)) => server.url(),
        None => args.server.clone().unwrap_or_default(),
    };
    eprintln!(
        "drover bench http: {cores} cores, {} build, server {} ({})",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        url,
        if started.is_some() {
            format!("in this process, data in {}", data.display())
        } else {
            "external".to_string()
        }
    );

    let client_rt = match args.client_threads {
        0 if started.is_some() => None,
        n => Some(tokio_runtime("drover-bench", Some(n.max(1)))?),
    };
    let work = async {
        let mut results: Vec<Measured> = Vec::new();
        for &devices in &args.devices {
            let base = SimConfig {
                server: url.clone(),
                devices,
                fleet: args.plugin,
                prefix: "bench-".into(),
                load: Load::Closed,
                concurrency: args.concurrency,
                duration: Some(Duration::from_secs_f64(args.duration)),
                events: None,
                batch: 1,
                progress: false,
                seed: devices as u64,
                custom: None,
            };
            eprintln!("{devices} devices: provisioning ...");
            sim::provision(&base).await?;
            // Warm-up: every device activated, caches and connections hot (none with 0).
            if args.warmup > 0.0 {
                let warmup = SimConfig {
                    duration: Some(Duration::from_secs_f64(args.warmup)),
                    ..base.clone()
                };
                sim::run(&warmup).await?;
            }
            let single = base.clone();
            eprintln!("{devices} devices: single events ...");
            results.push(measure(&single).await?);
            let batched = SimConfig {
                concurrency: args.batch_concurrency,
                batch: args.batch,
                ..single
            };
            eprintln!("{devices} devices: batches of {} ...", args.batch);
            results.push(measure(&batched).await?);
        }
        anyhow::Ok(results)
    };
    let results = match &client_rt {
        Some(rt) => rt.block_on(work),
        None => server_rt.block_on(work),
    };

    if let Some((rt, server)) = started {
        server_rt.block_on(async {
            server.shutdown(Duration::from_secs(5)).await;
            rt.shutdown().await;
        });
    }
    if temp {
        let _ = std::fs::remove_dir_all(&data);
    }
    let results = results?;

    if args.json {
        for r in &results {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!(
            "{:>8}  {:<7} {:>6} {:>6} {:>12} {:>10} {:>10} {:>10} {:>12}  errors",
            "devices", "mode", "conc", "batch", "events/s", "p50", "p99", "max", "CPU/event"
        );
        for Measured {
            summary: r,
            cpu_us_per_event,
        } in &results
        {
            let errors: u64 = r.errors.values().sum();
            println!(
                "{:>8}  {:<7} {:>6} {:>6} {:>12} {:>10} {:>10} {:>10} {:>12}  {}",
                r.devices,
                if r.batch > 1 { "batch" } else { "single" },
                r.concurrency,
                r.batch,
                fmt_count(r.events_per_sec.round() as u64),
                fmt_us(r.latency_us.p50),
                fmt_us(r.latency_us.p99),
                fmt_us(r.latency_us.max),
                cpu_us_per_event.map_or("-".to_string(), |us| format!("{us:.1} µs")),
                errors
            );
        }
        let whose = if args.server.is_some() {
            "the clients only: the server is another process"
        } else {
            "server and clients together"
        };
        println!(
            "(latency is per request: a batch counts once; CPU/event is this process's CPU \
             time, {whose}, per acknowledged event)"
        );
    }
    Ok(ExitCode::SUCCESS)
}
