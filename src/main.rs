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

fn load(path: &std::path::Path) -> Result<spillway::config::Config, ExitCode> {
    spillway::config::Config::load(path).map_err(|e| {
        eprintln!("spillway: {e}");
        ExitCode::from(2)
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
    let cli = Cli::parse();
    match cli.command {
        Command::MockLlm(config) => {
            spillway::telemetry::init_logging(spillway::config::LogFormat::Text);
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            runtime.block_on(async {
                let shutdown = spillway::shutdown::on_signal();
                match spillway::llm::simulator::serve(config, shutdown).await {
                    Ok((_, task)) => {
                        let _ = task.await;
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("spillway: {e}");
                        ExitCode::from(2)
                    }
                }
            })
        }
        Command::Ingress { config, check } => {
            let config = match spillway::config::ingress::IngressConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("spillway: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Err(e) = spillway::ingress::check(&config) {
                eprintln!("spillway: {e}");
                return ExitCode::from(2);
            }
            if check {
                println!("configuration is valid");
                return ExitCode::SUCCESS;
            }
            spillway::telemetry::init_logging(config.telemetry.log_format);
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            let result = runtime.block_on(async {
                let shutdown = spillway::shutdown::on_signal();
                spillway::ingress::run(config, shutdown).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "ingress failed");
                    eprintln!("spillway: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Dlq { command } => dlq(command),
        Command::Status {
            config,
            metrics_url,
            json,
        } => {
            let config = match spillway::config::Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("spillway: {e}");
                    return ExitCode::from(2);
                }
            };
            let url = metrics_url.unwrap_or_else(|| spillway::status::metrics_url(&config));
            match spillway::status::gather(&config, Some(&url)) {
                Ok(status) if json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&status).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Ok(status) => {
                    print!("{status}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("spillway: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Processor { config, check } => {
            let config = match spillway::config::Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("spillway: {e}");
                    return ExitCode::from(2);
                }
            };
            if check {
                // Also compiles templates and schemas and reads secrets.
                if let Err(e) = spillway::pipeline::check(&config) {
                    eprintln!("spillway: {e}");
                    return ExitCode::from(2);
                }
                println!("configuration is valid");
                if let Some(j) = &config.journal {
                    let Some(runtime) = runtime() else {
                        return ExitCode::FAILURE;
                    };
                    match runtime
                        .block_on(spillway::kafka::journal_topic_warnings(&config.kafka, j))
                    {
                        Ok(warnings) => {
                            for w in warnings {
                                eprintln!("warning: {w}");
                            }
                        }
                        Err(e) => eprintln!(
                            "note: the journal topic's settings were not checked (Kafka: {e})"
                        ),
                    }
                }
                return ExitCode::SUCCESS;
            }
            spillway::telemetry::init_logging(config.telemetry.log_format);
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            let result = runtime.block_on(async {
                let shutdown = spillway::shutdown::on_signal();
                spillway::processor::run(config, shutdown).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "processor failed");
                    eprintln!("spillway: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
