//! `spillway-mock-llm`: serves the provider simulator until SIGTERM or Ctrl-C.
//! Options: `spillway-mock-llm --help`.

use clap::Parser;
use spillway_mock_llm::SimulatorConfig;
use tokio_util::sync::CancellationToken;

/// The LLM provider simulator: OpenAI and Anthropic APIs, RPM/TPM limits, latency and faults.
#[derive(Parser)]
#[command(name = "spillway-mock-llm", version)]
struct Cli {
    #[command(flatten)]
    config: SimulatorConfig,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let config = Cli::parse().config;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("the runtime has a signal driver (tokio::main enables it)");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        stop.cancel();
    });
    match spillway_mock_llm::serve(config, shutdown).await {
        Ok((_, task)) => {
            let _ = task.await;
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("spillway-mock-llm: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
