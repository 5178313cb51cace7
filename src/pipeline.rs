//! Assembly: builds the configured chain of steps (LLM calls and sinks, in `config.steps`
//! order) and starts a processor with it. The processor itself only knows the step contract
//! (`crate::step`), never the concrete steps.

use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::llm::step::Accounts;
use crate::processor::gate::Gate;
use crate::processor::{Processor, ProcessorError};
use crate::sink::StepConfig;
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

/// One `[[steps]]` entry: the step type's own settings (tagged by `type`) and when it runs.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct StepEntry {
    /// Run the step only when this expression holds: minijinja over `event`, `data` and the
    /// earlier steps' `outputs`, e.g. `outputs.classify.json.label == "negative"`. A step whose
    /// condition is false is recorded as skipped (`{"skipped": true}`) in the journal, so a
    /// redelivered event skips it too; one that cannot be evaluated for an event (a missing
    /// field) dead-letters it as `condition_error`.
    #[serde(default)]
    pub when: Option<String>,
    /// Run the step only when the nearest `type = "route"` step before it chose this case.
    #[serde(default)]
    pub route: Option<String>,
    /// The step type and its settings.
    #[serde(flatten)]
    pub step: StepConfig,
}

impl StepEntry {
    /// The step's name: its journal entry, its output's key, its metrics label.
    pub fn name(&self) -> &str {
        self.step.name()
    }

    /// The step's full condition: its `when` and its route, or `None` if it always runs.
    /// `steps` are the entries before it (for the route step it refers to).
    pub fn condition_source(&self, before: &[StepEntry]) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(when) = &self.when {
            parts.push(format!("({when})"));
        }
        if let Some(case) = &self.route {
            let router = before
                .iter()
                .rev()
                .find(|s| matches!(s.step, StepConfig::Route(_)))?;
            let outputs = format!("outputs[{}]", json_string(router.name()));
            parts.push(format!(
                "({outputs}.route is defined and {outputs}.route == {})",
                json_string(case)
            ));
        }
        (!parts.is_empty()).then(|| parts.join(" and "))
    }

    /// The entry's own rules beyond its type's: its condition compiles, and its route names a
    /// case of a route step before it. `at` is its key (`steps[2]`).
    pub fn validate(&self, at: &str, before: &[StepEntry]) -> Result<(), ConfigError> {
        if let Some(when) = &self.when {
            crate::template::Condition::new(&format!("{at}.when"), when)?;
        }
        if let Some(case) = &self.route {
            let Some(router) = before.iter().rev().find_map(|s| match &s.step {
                StepConfig::Route(r) => Some(r),
                _ => None,
            }) else {
                return Err(ConfigError::invalid(
                    format!("{at}.route"),
                    "needs a step with type = \"route\" before this one",
                ));
            };
            if !router.routes().any(|r| r == case) {
                return Err(ConfigError::invalid(
                    format!("{at}.route"),
                    format!(
                        "`{case}` is not a case of the route step `{}` (its cases: {})",
                        router.name,
                        router.routes().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `text` as a string literal (JSON's syntax, which minijinja expressions accept).
fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// A step that runs only when its condition holds (`when`, `route`); everything else is the
/// inner step's.
pub struct Conditional {
    inner: Arc<dyn Step>,
    condition: crate::template::Condition,
}

impl Conditional {
    /// `inner`, run only for events where `condition` holds.
    pub fn new(inner: Arc<dyn Step>, condition: crate::template::Condition) -> Conditional {
        Conditional { inner, condition }
    }
}

impl Step for Conditional {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn run<'a>(
        &'a self,
        ctx: &'a crate::step::EventContext,
        attempt: crate::step::Attempt,
    ) -> crate::step::BoxFuture<'a, Result<crate::step::StepOutput, crate::step::StepError>> {
        self.inner.run(ctx, attempt)
    }

    fn records_intent(&self) -> bool {
        self.inner.records_intent()
    }

    fn stages_records(&self) -> bool {
        self.inner.stages_records()
    }

    fn output_topics(&self) -> Vec<String> {
        self.inner.output_topics()
    }

    fn applies(&self, ctx: &crate::step::EventContext) -> Result<bool, crate::step::StepError> {
        self.condition.holds(ctx).map_err(|e| {
            crate::step::StepError::deterministic(
                "condition_error",
                format!(
                    "steps.{}.when `{}` cannot be evaluated for this event: {e}",
                    self.inner.name(),
                    self.condition.source()
                ),
            )
        })
    }

    fn ready(&self) -> crate::step::BoxFuture<'_, ()> {
        self.inner.ready()
    }
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
        .enumerate()
        .map(|(i, entry)| {
            let step = entry.step.kind().build(&cx)?;
            Ok(match entry.condition_source(&config.steps[..i]) {
                None => step,
                Some(source) => {
                    let key = format!("steps.{}.when", entry.name());
                    let condition = crate::template::Condition::new(&key, &source)?;
                    Arc::new(Conditional::new(step, condition)) as Arc<dyn Step>
                }
            })
        })
        .collect::<Result<Vec<_>, ConfigError>>()
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
