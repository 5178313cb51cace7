//! Assembly: builds the configured chain of steps (LLM calls and sinks, in `config.steps`
//! order) and starts a processor with it. The processor itself only knows the step contract
//! (`crate::step`), never the concrete steps.

use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::llm::step::Accounts;
use crate::processor::gate::Gate;
use crate::processor::{Processor, ProcessorError};
use crate::step::{Pipeline, Step};
use crate::telemetry::Metrics;
use tokio_util::sync::CancellationToken;

/// What every step type's config provides to assembly. Implemented next to each step's code
/// (`sink::webhook::WebhookConfig`, `llm::config::LlmStepConfig`, ...) and registered with one
/// line of [`step_types!`](crate::step_types) in `sink`.
pub trait StepKind {
    /// The step's name: its journal entry, its output's key, its metrics label.
    fn name(&self) -> &str;

    /// The step's own rules, and its settings against the rest of `config`; `at` is its key
    /// (`steps[2]`), which every error names.
    fn validate(&self, at: &str, config: &Config) -> Result<(), ConfigError>;

    /// Builds the step.
    fn build(&self, cx: &Assembly<'_>) -> Result<Arc<dyn Step>, ConfigError>;
}

/// What a step may use when it is built: the whole config and the shared pieces, each built
/// once (metrics, the intake gate, the LLM provider accounts).
pub struct Assembly<'a> {
    /// The whole configuration.
    pub config: &'a Config,
    /// The processor's collectors.
    pub metrics: &'a Arc<Metrics>,
    /// The intake gate dependency checks close.
    pub gate: &'a Gate,
    /// Provider accounts (clients, limits, breakers), shared by the LLM steps that name them.
    pub accounts: &'a Accounts,
}

/// Declares the step types: the `StepConfig` enum (`[[steps]]`, tagged by `type`) and the
/// dispatch to each variant's [`StepKind`]. `Variant(Type) in mod m` also declares module
/// `m`; used once, in `sink`.
#[macro_export]
macro_rules! step_types {
    ($( $(#[$doc:meta])* $variant:ident($config:ty) $(in mod $module:ident)? ),+ $(,)?) => {
        $( $(pub mod $module;)? )+

        /// One step of the per-event chain: `[[steps]]` with `type = "<variant>"`.
        #[derive(Debug, Clone, serde::Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        pub enum StepConfig {
            $( $(#[$doc])* $variant($config), )+
        }

        impl StepConfig {
            /// The step type's name, rules and builder.
            pub fn kind(&self) -> &dyn $crate::pipeline::StepKind {
                match self {
                    $( StepConfig::$variant(c) => c, )+
                }
            }

            /// The step's name: its journal entry, its output's key, its metrics label.
            pub fn name(&self) -> &str {
                self.kind().name()
            }
        }
    };
}

/// Builds every step of `config.steps`. Provider accounts (clients, limits, breakers) are
/// built once and shared by the steps that use them; their breakers report to `gate`.
pub fn build(
    config: &Config,
    metrics: &Arc<Metrics>,
    gate: &Gate,
) -> Result<Pipeline, ConfigError> {
    let accounts = Accounts::new(&config.llm, gate, metrics)?;
    let cx = Assembly {
        config,
        metrics,
        gate,
        accounts: &accounts,
    };
    config
        .steps
        .iter()
        .map(|s| s.kind().build(&cx))
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
