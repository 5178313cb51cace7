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
