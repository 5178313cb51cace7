//! The command line: `spillway processor|ingress|status|dlq`. Each command loads its
//! configuration, starts logging and calls the service or tool it names; `src/main.rs` only
//! parses the arguments and calls [`main`].
//!
//! * [`dlq`]: list, show and replay dead-lettered records.
//! * [`status`]: lag, DLQ size and a running processor's state.

pub mod dlq;
pub mod status;
pub mod trace;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The `spillway` command line.
#[derive(Parser)]
#[command(
    name = "spillway",
    version,
    about = "Event-driven LLM pipelines on Kafka"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The processor's configuration file, which every command but `ingress` reads.
#[derive(clap::Args)]
struct ConfigFile {
    /// Path of the processor's TOML configuration (SPILLWAY_* environment variables override
    /// it).
    #[arg(
        short,
        long,
        env = "SPILLWAY_CONFIG",
        default_value = "config/example.toml"
    )]
    config: PathBuf,
}

/// Which DLQ records a command applies to.
#[derive(clap::Args)]
struct DlqFilter {
    #[command(flatten)]
    file: ConfigFile,
    /// Only records dead-lettered since: Unix ms, or an age such as 15m, 2h, 7d.
    #[arg(long)]
    since: Option<String>,
    /// Only records dead-lettered before: Unix ms, or an age.
    #[arg(long)]
    until: Option<String>,
    /// Only this dlq.reason (e.g. webhook_rejected, invalid_json).
    #[arg(long)]
    reason: Option<String>,
    /// Only this record key.
    #[arg(long)]
    key: Option<String>,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// One JSON line per matching record: where it came from, why, when, replays so far.
    List {
        #[command(flatten)]
        filter: DlqFilter,
        /// At most this many lines.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// One record in full: headers, key and value.
    Show {
        #[command(flatten)]
        file: ConfigFile,
        /// DLQ partition.
        #[arg(long)]
        partition: i32,
        /// DLQ offset.
        #[arg(long)]
        offset: i64,
    },
    /// Send matching records back to their original topic (or --to), paced and resumable.
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
        /// Send to this topic instead of each record's original topic.
        #[arg(long)]
        to: Option<String>,
        /// Records per second at most.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Print what would be replayed; produce and commit nothing.
        #[arg(long)]
        dry_run: bool,
        /// Refuse records whose dlq.replay_count reached this (the loop guard).
        #[arg(long, default_value_t = 3)]
        max_replays: u32,
        /// Consumer group holding the replay's progress (default: <kafka.group_id>-dlq-replay).
        #[arg(long)]
        group: Option<String>,
        /// Stop after replaying this many records; the next run resumes after them.
        #[arg(long)]
        limit: Option<u64>,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Consume the configured topics and run every event through the configured steps.
    Processor {
        #[command(flatten)]
        file: ConfigFile,
        /// Validate the configuration and exit.
        #[arg(long)]
        check: bool,
    },
    /// Receive signed webhooks and produce them to Kafka (2xx only after the Kafka ack).
    Ingress {
        /// Path of the TOML configuration (SPILLWAY_* environment variables override it).
        #[arg(
            short,
            long,
            env = "SPILLWAY_INGRESS_CONFIG",
            default_value = "config/ingress.toml"
        )]
        config: PathBuf,
        /// Validate the configuration (sources, secrets, schemas, TLS files) and exit.
        #[arg(long)]
        check: bool,
    },
    /// Print lag per partition, the DLQ's size and oldest record, and a running processor's
    /// in-flight events, paused partitions and breaker states.
    Status {
        #[command(flatten)]
        file: ConfigFile,
        /// The processor's /metrics URL (default: from telemetry.metrics_addr).
        #[arg(long)]
        metrics_url: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print one event's story: its deliveries, each pipeline's journal entry (steps done or
    /// skipped, the route, the LLM's answer, tokens and cost), its DLQ and result records.
    Trace {
        /// The event's id (`ce_id`, or `journal.id_field`) or its dedup key
        /// (`<source>|<id>`, optionally prefixed `<pipeline>/`).
        id: String,
        #[command(flatten)]
        file: ConfigFile,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Inspect the dead-letter topic and replay records from it.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

/// The multi-threaded runtime every service runs on (the scheduler's synchronous commits use
/// `block_in_place`, which needs it).
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("spillway: cannot start the async runtime: {e}");
            None
        }
    }
}

/// A start-up failure (configuration, arguments): printed, exit code 2.
fn invalid<E: std::fmt::Display>(e: E) -> ExitCode {
    eprintln!("spillway: {e}");
    ExitCode::from(2)
}

/// A failure while running: printed and logged, exit code 1.
fn failed<E: std::fmt::Display>(what: &str, e: E) -> ExitCode {
    tracing::error!(error = %e, "{what} failed");
    eprintln!("spillway: {e}");
    ExitCode::FAILURE
}

fn load(path: &std::path::Path) -> Result<crate::config::Config, ExitCode> {
    crate::config::Config::load(path).map_err(invalid)
}

/// Runs a service on a fresh runtime until it ends or SIGTERM/SIGINT stops it.
fn serve<F, Fut, E>(what: &str, run: F) -> Result<(), ExitCode>
where
    F: FnOnce(tokio_util::sync::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let runtime = runtime().ok_or(ExitCode::FAILURE)?;
    runtime
        .block_on(async { run(crate::shutdown::on_signal()).await })
        .map_err(|e| failed(what, e))
}

fn ingress(path: &std::path::Path, check: bool) -> Result<(), ExitCode> {
    let config = crate::ingress::config::IngressConfig::load(path).map_err(invalid)?;
    crate::ingress::check(&config).map_err(invalid)?;
    if check {
        println!("configuration is valid");
        return Ok(());
    }
    crate::telemetry::init_logging(config.telemetry.log_format);
    serve("ingress", |shutdown| crate::ingress::run(config, shutdown))
}

fn status(path: &std::path::Path, metrics_url: Option<String>, json: bool) -> Result<(), ExitCode> {
    let config = load(path)?;
    let url = metrics_url.unwrap_or_else(|| crate::cli::status::metrics_url(&config));
    let status = crate::cli::status::gather(&config, Some(&url)).map_err(|e| {
        eprintln!("spillway: {e}");
        ExitCode::FAILURE
    })?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
    } else {
        print!("{status}");
    }
    Ok(())
}

fn trace(path: &std::path::Path, id: &str, json: bool) -> Result<(), ExitCode> {
    let config = load(path)?;
    let story = crate::cli::trace::trace(&config, id).map_err(|e| failed("trace", e))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&story).unwrap_or_default()
        );
    } else {
        print!("{story}");
    }
    Ok(())
}

fn processor(path: &std::path::Path, check: bool) -> Result<(), ExitCode> {
    let config = load(path)?;
    if !check {
        crate::telemetry::init_logging(config.telemetry.log_format);
        return serve("processor", |shutdown| {
            crate::pipeline::run(config, shutdown)
        });
    }
    // Also compiles templates and schemas and reads secrets.
    crate::pipeline::check(&config).map_err(invalid)?;
    println!("configuration is valid");
    if let Some(j) = &config.journal {
        let runtime = runtime().ok_or(ExitCode::FAILURE)?;
        match runtime.block_on(crate::kafka::journal_topic_warnings(&config.kafka, j)) {
            Ok(warnings) => {
                for w in warnings {
                    eprintln!("warning: {w}");
                }
            }
            Err(e) => {
                eprintln!("note: the journal topic's settings were not checked (Kafka: {e})")
            }
        }
    }
    Ok(())
}

fn filter(f: &DlqFilter) -> Result<crate::cli::dlq::Filter, ExitCode> {
    let now = crate::telemetry::now_ms() as i64;
    let time = |t: &Option<String>| {
        t.as_deref()
            .map(|t| crate::cli::dlq::parse_time(t, now))
            .transpose()
            .map_err(|e| {
                eprintln!("spillway: {e}");
                ExitCode::from(2)
            })
    };
    Ok(crate::cli::dlq::Filter {
        since_ms: time(&f.since)?,
        until_ms: time(&f.until)?,
        reason: f.reason.clone(),
        key: f.key.clone(),
    })
}

fn dlq(command: DlqCommand) -> ExitCode {
    crate::telemetry::init_logging(crate::telemetry::LogFormat::Text);
    let result = match command {
        DlqCommand::List { filter: f, limit } => (|| {
            let config = load(&f.file.config)?;
            let filter = filter(&f)?;
            let lines = crate::cli::dlq::list(&config, &filter, limit).map_err(fail)?;
            for l in lines {
                println!("{l}");
            }
            Ok(())
        })(),
        DlqCommand::Show {
            file,
            partition,
            offset,
        } => (|| {
            let config = load(&file.config)?;
            let record = crate::cli::dlq::show(&config, partition, offset).map_err(fail)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&record).unwrap_or_default()
            );
            Ok(())
        })(),
        DlqCommand::Replay {
            filter: f,
            to,
            rate,
            dry_run,
            max_replays,
            group,
            limit,
        } => (|| {
            let config = load(&f.file.config)?;
            let opts = crate::cli::dlq::ReplayOptions {
                filter: filter(&f)?,
                to,
                rate,
                dry_run,
                max_replays,
                group: group.unwrap_or_else(|| format!("{}-dlq-replay", config.kafka.group_id)),
                limit,
            };
            let runtime = runtime().ok_or(ExitCode::FAILURE)?;
            let summary = runtime
                .block_on(crate::cli::dlq::replay(&config, &opts))
                .map_err(fail)?;
            println!("{}", serde_json::to_string(&summary).unwrap_or_default());
            Ok(())
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

fn fail(e: crate::cli::dlq::DlqToolError) -> ExitCode {
    eprintln!("spillway: {e}");
    ExitCode::FAILURE
}

/// Runs the command `cli` names; the exit code is 0, 1 for a failure while running, or 2 for
/// invalid configuration or arguments.
pub fn main(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Ingress { config, check } => ingress(&config, check),
        Command::Dlq { command } => return dlq(command),
        Command::Status {
            file,
            metrics_url,
            json,
        } => status(&file.config, metrics_url, json),
        Command::Processor { file, check } => processor(&file.config, check),
        Command::Trace { id, file, json } => trace(&file.config, &id, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}
