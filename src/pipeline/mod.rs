//! Assembly: builds the configured pipelines (each a chain of LLM calls and sinks, in
//! `[[steps]]` order) and starts a processor with them. The processor itself only knows the
//! step contract (`crate::step`), never the concrete steps.

pub mod config;

use std::sync::Arc;

pub use config::{PipelineConfig, StepEntry};

use crate::config::{Config, ConfigError};
use crate::llm::budget::Budgets;
use crate::llm::step::Accounts;
use crate::processor::gate::Gate;
use crate::processor::{Processor, ProcessorError};
use crate::step::{BuiltPipeline, Pipeline, Pipelines, Step};
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
                    "{} `{}` cannot be evaluated for this event: {e}",
                    self.condition.key(),
                    self.condition.source()
                ),
            )
        })
    }

    fn ready(&self) -> crate::step::BoxFuture<'_, ()> {
        self.inner.ready()
    }
}

/// Builds every pipeline of `config` (the top-level `[[steps]]` as one pipeline named
/// `default`, or each `[[pipelines]]` entry). Provider accounts (clients, limits, breakers) are
/// built once and shared by every step of every pipeline that uses them, so an account keeps
/// one admission queue and one breaker; their breakers report to `gate`.
pub fn build(
    config: &Config,
    metrics: &Arc<Metrics>,
    gate: &Gate,
) -> Result<Pipelines, ConfigError> {
    build_with(config, metrics, gate, None)
}

/// Like [`build`], with the spend budgets (`[llm.budget]`) the steps reserve against;
/// without them, budgets are built from the config but never connected to their topic.
pub fn build_with(
    config: &Config,
    metrics: &Arc<Metrics>,
    gate: &Gate,
    budgets: Option<Arc<Budgets>>,
) -> Result<Pipelines, ConfigError> {
    check_budget_scopes(config)?;
    let mut accounts = Accounts::new(&config.llm, gate, metrics)?;
    if budgets.is_some() {
        accounts = accounts.with_budgets(budgets);
    }
    let cx = Assembly {
        config,
        metrics,
        gate,
        accounts: &accounts,
    };
    if config.pipelines.is_empty() {
        let steps = build_chain(&cx, "steps", &config.steps)?;
        return Ok(vec![BuiltPipeline::single(steps)].into());
    }
    config
        .pipelines
        .iter()
        .map(|p| {
            Ok(BuiltPipeline {
                name: p.name.as_str().into(),
                topics: p.topics.clone(),
                types: p.types.clone(),
                steps: build_chain(&cx, &format!("pipelines.{}.steps", p.name), &p.steps)?,
                ttl_secs: p.journal.ttl_secs,
                ttl_by_type: p.journal.ttl_by_type.clone(),
                key_prefix: format!("{}/", p.name),
            })
        })
        .collect::<Result<Vec<_>, ConfigError>>()
        .map(Into::into)
}

/// Builds one chain of steps, each wrapped in its condition (`when`, `route`) if it has one.
/// `at` is the chain's key (`steps`, `pipelines.<name>.steps`), which condition errors name.
fn build_chain(
    cx: &Assembly<'_>,
    at: &str,
    entries: &[StepEntry],
) -> Result<Pipeline, ConfigError> {
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let step = entry.step.kind().build(cx)?;
            Ok(match entry.condition_source(&entries[..i]) {
                None => step,
                Some(source) => {
                    let key = format!("{at}.{}.when", entry.name());
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

/// Builds the pipelines from `config` and starts a processor with them.
pub async fn start(
    config: Config,
    shutdown: CancellationToken,
) -> Result<Processor, ProcessorError> {
    config.validate()?;
    let metrics = Metrics::new();
    let gate = Gate::new();
    let budgets = match &config.llm.budget {
        Some(b) => {
            check_budget_scopes(&config)?;
            let budgets = Budgets::new(b, &metrics);
            budgets.connect(&config.kafka).await?;
            Some(budgets)
        }
        None => None,
    };
    let pipelines = build_with(&config, &metrics, &gate, budgets)?;
    Processor::start_with(config, pipelines, metrics, gate, shutdown).await
}

/// A budget's `pipeline` and `step` name ones that exist: a typo would cover nothing.
fn check_budget_scopes(config: &Config) -> Result<(), ConfigError> {
    let Some(b) = &config.llm.budget else {
        return Ok(());
    };
    let chains: Vec<(&str, &[crate::pipeline::config::StepEntry])> = if config.pipelines.is_empty()
    {
        vec![("default", &config.steps)]
    } else {
        (config.pipelines.iter())
            .map(|p| (p.name.as_str(), p.steps.as_slice()))
            .collect()
    };
    for l in &b.limits {
        let key = |k: &str| format!("llm.budget.limits.{}.{k}", l.name);
        if let Some(p) = &l.pipeline {
            if !chains.iter().any(|(name, _)| name == p) {
                return Err(ConfigError::invalid(
                    key("pipeline"),
                    format!("no pipeline is named {p:?}"),
                ));
            }
        }
        if let Some(s) = &l.step {
            let found = (chains.iter())
                .filter(|(name, _)| l.pipeline.as_deref().is_none_or(|p| p == *name))
                .any(|(_, steps)| steps.iter().any(|e| e.name() == s));
            if !found {
                return Err(ConfigError::invalid(
                    key("step"),
                    format!("no step is named {s:?}"),
                ));
            }
        }
    }
    Ok(())
}

/// Starts a processor from configuration (pipelines built from `config`) and runs it.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ProcessorError> {
    start(config, shutdown).await?.run().await
}
