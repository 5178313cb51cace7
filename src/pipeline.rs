//! Builds the configured chain of steps: LLM calls and sinks, in `config.steps` order.

use std::sync::Arc;

use crate::config::{Config, ConfigError, StepConfig};
use crate::llm::step::{Accounts, LlmStep};
use crate::processor::gate::Gate;
use crate::processor::step::{Pipeline, Step};
use crate::sink::webhook::WebhookSink;
use crate::telemetry::Metrics;

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
