//! Assembly: builds the configured chain of steps (LLM calls and sinks, in `config.steps`
//! order) and starts a processor with it. The processor itself only knows the step contract
//! (`crate::step`), never the concrete steps.

use std::sync::Arc;

use crate::config::{Config, ConfigError, StepConfig};
use crate::llm::step::{Accounts, LlmStep};
use crate::processor::gate::Gate;
use crate::processor::{Processor, ProcessorError};
use crate::sink::webhook::WebhookSink;
use crate::step::{Pipeline, Step};
use crate::telemetry::Metrics;
use tokio_util::sync::CancellationToken;

/// Builds every step of `config.steps`. Provider accounts (clients, limits, breakers) are
/// built once and shared by the steps that use them; their breakers report to `gate`.
pub fn build(
    config: &Config,
    metrics: &Arc<Metrics>,
    gate: &Gate,
) -> Result<Pipeline, ConfigError> {
    let accounts = Accounts::new(&config.llm, gate, metrics)?;
    config
        .steps
        .iter()
        .map(|s| -> Result<Arc<dyn Step>, ConfigError> {
            match s {
                StepConfig::Webhook(w) => Ok(Arc::new(WebhookSink::new(w)?)),
                StepConfig::Slack(c) => Ok(Arc::new(crate::sink::slack::SlackSink::new(c)?)),
                StepConfig::Kafka(c) => Ok(Arc::new(crate::sink::kafka::KafkaSink::new(
                    c,
                    &config.codec,
                    &config.kafka,
                )?)),
                StepConfig::Llm(l) => Ok(Arc::new(LlmStep::new(
                    l,
                    &config.llm,
                    &accounts,
                    gate,
                    metrics,
                )?)),
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Into::into)
}

/// Builds the steps once and throws them away: templates, output schemas and secrets are
/// checked without starting anything (`spillway processor --check`).
pub fn check(config: &Config) -> Result<(), ConfigError> {
    build(config, &Metrics::new(), &Gate::new()).map(|_| ())
}

/// Builds the steps from `config.steps` and starts a processor with them.
pub async fn start(
    config: Config,
    shutdown: CancellationToken,
) -> Result<Processor, ProcessorError> {
    config.validate()?;
    let metrics = Metrics::new();
    let gate = Gate::new();
    let steps = build(&config, &metrics, &gate)?;
    Processor::start_with(config, steps, metrics, gate, shutdown).await
}

/// Starts a processor from configuration (steps built from `config.steps`) and runs it.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ProcessorError> {
    start(config, shutdown).await?.run().await
}
