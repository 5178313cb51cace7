//! The `spillway` binary: parses the command line, loads configuration, starts telemetry
//! and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "spillway",
    version,
    about = "Event-driven LLM pipelines on Kafka"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which DLQ records a command applies to.
#[derive(clap::Args)]
struct DlqFilter {
    /// Path of the processor's TOML configuration (its kafka and dlq sections are used).
    #[arg(
        short,
        long,
        env = "SPILLWAY_CONFIG",
        default_value = "config/example.toml"
    )]
    config: PathBuf,
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
        /// Path of the processor's TOML configuration.
        #[arg(
            short,
            long,
            env = "SPILLWAY_CONFIG",
            default_value = "config/example.toml"
        )]
        config: PathBuf,
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
        /// Path of the TOML configuration (SPILLWAY_* environment variables override it).
        #[arg(
            short,
            long,
            env = "SPILLWAY_CONFIG",
            default_value = "config/example.toml"
        )]
        config: PathBuf,
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
        /// Path of the processor's TOML configuration.
        #[arg(
            short,
            long,
            env = "SPILLWAY_CONFIG",
            default_value = "config/example.toml"
        )]
        config: PathBuf,
        /// The processor's /metrics URL (default: from telemetry.metrics_addr).
        #[arg(long)]
        metrics_url: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect the dead-letter topic and replay records from it.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Run the LLM provider simulator (OpenAI and Anthropic APIs, RPM/TPM limits, faults).
    MockLlm(spillway::llm::simulator::SimulatorConfig),
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

fn load(path: &std::path::Path) -> Result<spillway::config::Config, ExitCode> {
    spillway::config::Config::load(path).map_err(invalid)
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
        .block_on(async { run(spillway::shutdown::on_signal()).await })
        .map_err(|e| failed(what, e))
}

fn ingress(path: &std::path::Path, check: bool) -> Result<(), ExitCode> {
    let config = spillway::config::ingress::IngressConfig::load(path).map_err(invalid)?;
    spillway::ingress::check(&config).map_err(invalid)?;
    if check {
        println!("configuration is valid");
        return Ok(());
    }
    spillway::telemetry::init_logging(config.telemetry.log_format);
    serve("ingress", |shutdown| {
        spillway::ingress::run(config, shutdown)
    })
}

fn status(path: &std::path::Path, metrics_url: Option<String>, json: bool) -> Result<(), ExitCode> {
    let config = load(path)?;
    let url = metrics_url.unwrap_or_else(|| spillway::status::metrics_url(&config));
    let status = spillway::status::gather(&config, Some(&url)).map_err(|e| {
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

fn processor(path: &std::path::Path, check: bool) -> Result<(), ExitCode> {
    let config = load(path)?;
    if !check {
        spillway::telemetry::init_logging(config.telemetry.log_format);
        return serve("processor", |shutdown| {
            spillway::processor::run(config, shutdown)
        });
    }
    // Also compiles templates and schemas and reads secrets.
    spillway::pipeline::check(&config).map_err(invalid)?;
    println!("configuration is valid");
    if let Some(j) = &config.journal {
        let runtime = runtime().ok_or(ExitCode::FAILURE)?;
        match runtime.block_on(spillway::kafka::journal_topic_warnings(&config.kafka, j)) {
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

fn mock_llm(config: spillway::llm::simulator::SimulatorConfig) -> Result<(), ExitCode> {
    spillway::telemetry::init_logging(spillway::config::LogFormat::Text);
    let runtime = runtime().ok_or(ExitCode::FAILURE)?;
    runtime.block_on(async {
        let shutdown = spillway::shutdown::on_signal();
        let (_, task) = spillway::llm::simulator::serve(config, shutdown)
            .await
            .map_err(invalid)?;
        let _ = task.await;
        Ok(())
    })
}

fn filter(f: &DlqFilter) -> Result<spillway::dlq_tool::Filter, ExitCode> {
    let now = spillway::telemetry::now_ms() as i64;
    let time = |t: &Option<String>| {
        t.as_deref()
            .map(|t| spillway::dlq_tool::parse_time(t, now))
            .transpose()
            .map_err(|e| {
                eprintln!("spillway: {e}");
                ExitCode::from(2)
            })
    };
    Ok(spillway::dlq_tool::Filter {
        since_ms: time(&f.since)?,
        until_ms: time(&f.until)?,
        reason: f.reason.clone(),
        key: f.key.clone(),
    })
}

fn dlq(command: DlqCommand) -> ExitCode {
    spillway::telemetry::init_logging(spillway::config::LogFormat::Text);
    let result = match command {
        DlqCommand::List { filter: f, limit } => (|| {
            let config = load(&f.config)?;
            let filter = filter(&f)?;
            let lines = spillway::dlq_tool::list(&config, &filter, limit).map_err(fail)?;
            for l in lines {
                println!("{l}");
            }
            Ok(())
        })(),
        DlqCommand::Show {
            config,
            partition,
            offset,
        } => (|| {
            let config = load(&config)?;
            let record = spillway::dlq_tool::show(&config, partition, offset).map_err(fail)?;
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
            let config = load(&f.config)?;
            let opts = spillway::dlq_tool::ReplayOptions {
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
                .block_on(spillway::dlq_tool::replay(&config, &opts))
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

fn fail(e: spillway::dlq_tool::DlqToolError) -> ExitCode {
    eprintln!("spillway: {e}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::MockLlm(config) => mock_llm(config),
        Command::Ingress { config, check } => ingress(&config, check),
        Command::Dlq { command } => return dlq(command),
        Command::Status {
            config,
            metrics_url,
            json,
        } => status(&config, metrics_url, json),
        Command::Processor { config, check } => processor(&config, check),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}
