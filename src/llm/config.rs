//! The LLM stage's configuration: `[llm]` (provider accounts, prices, the breaker) and the
//! LLM step (`[[steps]] type = "llm"`).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::config::{bounded, duration_ms, Config, ConfigError, HttpUrl, Parsed, PropertyValue};
use crate::pipeline::{Assembly, StepKind};
use crate::step::Step;

/// LLM providers, prices and the breaker.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// Providers by name; LLM steps refer to them.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Price per model, for the cost metrics. Models without a price cost 0.
    #[serde(default)]
    pub prices: BTreeMap<String, PriceConfig>,
    /// Circuit breaker settings, applied to each provider.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Spend budgets, enforced before each call.
    #[serde(default)]
    pub budget: Option<super::budget::BudgetConfig>,
}

/// The wire API a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderApi {
    /// OpenAI-compatible `POST /v1/chat/completions` (also vLLM, Ollama, LiteLLM, llama.cpp).
    OpenAi,
    /// Anthropic `POST /v1/messages`.
    Anthropic,
}

/// One provider account: where it is, how to authenticate, and its limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// `openai` or `anthropic`.
    pub api: ProviderApi,
    /// Base URL without the API path, e.g. `https://api.openai.com`.
    pub base_url: Parsed<HttpUrl>,
    /// API key, normally `{ env = "OPENAI_API_KEY" }` or `{ file = ".." }`; never logged.
    #[serde(default)]
    pub api_key: Option<PropertyValue>,
    /// Timeout of one request attempt (connect, send, full answer), in milliseconds.
    #[serde(default = "default_llm_timeout_ms")]
    pub timeout_ms: u64,
    /// Requests per minute of the account; unset means no local request limit.
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    /// Combined tokens per minute (prompt plus `max_tokens`, OpenAI style); unset: no limit.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Input tokens per minute (Anthropic style); unset: no limit.
    #[serde(default)]
    pub input_tokens_per_minute: Option<u64>,
    /// Output tokens per minute, reserved as `max_tokens` (Anthropic style); unset: no limit.
    #[serde(default)]
    pub output_tokens_per_minute: Option<u64>,
    /// This replica's share of the account's limits, in [0.001, 1]; e.g. 0.25 for four replicas.
    #[serde(default = "default_share")]
    pub share: f64,
    /// Largest burst, as this many milliseconds' worth of each limit.
    #[serde(default = "default_burst_ms")]
    pub burst_ms: u64,
    /// Extra request headers (e.g. `OpenAI-Organization`). Values may be secret references.
    #[serde(default)]
    pub headers: BTreeMap<String, PropertyValue>,
}

/// Price of a model, in USD per million tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// USD per million input (prompt) tokens.
    pub input_usd_per_mtok: f64,
    /// USD per million output tokens.
    pub output_usd_per_mtok: f64,
}

/// Circuit breaker: closed, open after enough failures, half-open with a single probe.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Failures (5xx, 529, timeouts, connection errors) within `window_ms` that open it.
    #[serde(default = "default_breaker_failures")]
    pub failure_threshold: u32,
    /// ...and the share of the window's calls that must have failed, in (0, 1].
    #[serde(default = "default_breaker_ratio")]
    pub failure_ratio: f64,
    /// Calls older than this many milliseconds no longer count.
    #[serde(default = "default_breaker_window_ms")]
    pub window_ms: u64,
    /// How long the breaker stays open before one probe is let through, in milliseconds.
    #[serde(default = "default_breaker_open_ms")]
    pub open_ms: u64,
}

/// An LLM step.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmStepConfig {
    /// Step name used in metrics, DLQ headers and as the key of its output; default `llm`.
    #[serde(default = "default_llm_name")]
    pub name: String,
    /// Name of the primary provider in `llm.providers`.
    pub provider: String,
    /// Model of the primary provider.
    pub model: String,
    /// System prompt template (minijinja), optional.
    #[serde(default)]
    pub system: Option<String>,
    /// User prompt template (minijinja). It sees `event` (id, source, type, time), `data` (the
    /// payload) and `outputs` (earlier steps' results).
    pub user: String,
    /// Most output tokens per call; reserved against output limits at admission.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Sampling temperature; the provider's default if unset.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// What the answer must look like.
    #[serde(default)]
    pub output: OutputConfig,
    /// Ordered fallbacks, used while the providers before them are unavailable.
    #[serde(default)]
    pub fallback: Vec<FallbackConfig>,
}

/// Expected output of an LLM step.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// `text` (any answer) or `json` (a JSON value, validated against `schema` if given).
    #[serde(default = "default_output_format")]
    pub format: OutputFormat,
    /// JSON Schema the answer must satisfy (only with `format = "json"`).
    #[serde(default)]
    pub schema: Option<serde_json::Value>,
    /// Repair requests that feed the validation error back before the event is dead-lettered
    /// as `llm_invalid_output`.
    #[serde(default = "default_repair_attempts")]
    pub repair_attempts: u32,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// Free text.
    Text,
    /// A JSON value.
    Json,
}

/// One entry of a fallback chain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// Provider name in `llm.providers`.
    pub provider: String,
    /// Model to ask there.
    pub model: String,
}

fn default_llm_timeout_ms() -> u64 {
    30_000
}

fn default_share() -> f64 {
    1.0
}

fn default_burst_ms() -> u64 {
    1_000
}

fn default_breaker_failures() -> u32 {
    5
}

fn default_breaker_ratio() -> f64 {
    0.5
}

fn default_breaker_window_ms() -> u64 {
    60_000
}

fn default_breaker_open_ms() -> u64 {
    300_000
}

fn default_llm_name() -> String {
    "llm".to_string()
}

fn default_max_tokens() -> u32 {
    1_024
}

fn default_output_format() -> OutputFormat {
    OutputFormat::Text
}

fn default_repair_attempts() -> u32 {
    2
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: default_breaker_failures(),
            failure_ratio: default_breaker_ratio(),
            window_ms: default_breaker_window_ms(),
            open_ms: default_breaker_open_ms(),
        }
    }
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            format: default_output_format(),
            schema: None,
            repair_attempts: default_repair_attempts(),
        }
    }
}

impl LlmConfig {
    /// The `[llm]` section's rules: providers, prices and the breaker.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(b) = &self.budget {
            b.validate()?;
        }
        duration_ms("llm.breaker.window_ms", self.breaker.window_ms, 1)?;
        duration_ms("llm.breaker.open_ms", self.breaker.open_ms, 1)?;
        bounded(
            "llm.breaker.failure_threshold",
            self.breaker.failure_threshold.into(),
            1,
            1_000_000,
            "",
        )?;
        for (name, provider) in &self.providers {
            let key = |k: &str| format!("llm.providers.{name}.{k}");
            duration_ms(&key("timeout_ms"), provider.timeout_ms, 1)?;
            duration_ms(&key("burst_ms"), provider.burst_ms, 1)?;
        }
        for (name, p) in &self.providers {
            let key = |k: &str| format!("llm.providers.{name}.{k}");
            p.base_url.get(&key("base_url"))?;
            // Below 0.001, a limit's refill interval (60 s / (limit × share)) stops being a
            // duration anyone means, and soon one that overflows.
            if !(p.share >= 0.001 && p.share <= 1.0) {
                return Err(ConfigError::invalid(key("share"), "must be in [0.001, 1]"));
            }
            for (k, v) in [
                ("requests_per_minute", p.requests_per_minute),
                ("tokens_per_minute", p.tokens_per_minute),
                ("input_tokens_per_minute", p.input_tokens_per_minute),
                ("output_tokens_per_minute", p.output_tokens_per_minute),
            ] {
                if let Some(v) = v {
                    bounded(&key(k), v, 1, 1_000_000_000_000, "per minute")?;
                }
            }
        }
        for (model, price) in &self.prices {
            if !(price.input_usd_per_mtok >= 0.0 && price.output_usd_per_mtok >= 0.0) {
                return Err(ConfigError::invalid(
                    format!("llm.prices.{model}"),
                    "prices must be non-negative numbers",
                ));
            }
        }
        let b = &self.breaker;
        if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
            return Err(ConfigError::invalid(
                "llm.breaker.failure_ratio",
                "must be in (0, 1]",
            ));
        }
        Ok(())
    }
}

impl StepKind for LlmStepConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, at: &str, config: &Config) -> Result<(), ConfigError> {
        let l = self;
        bounded(
            &format!("{at}.max_tokens"),
            l.max_tokens.into(),
            1,
            10_000_000,
            "tokens",
        )?;
        bounded(
            &format!("{at}.output.repair_attempts"),
            l.output.repair_attempts.into(),
            0,
            10,
            "attempts",
        )?;
        let targets = std::iter::once((l.provider.as_str(), l.model.as_str(), "provider".into()))
            .chain(l.fallback.iter().enumerate().map(|(j, f)| {
                (
                    f.provider.as_str(),
                    f.model.as_str(),
                    format!("fallback[{j}].provider"),
                )
            }));
        for (provider, model, key) in targets {
            if !config.llm.providers.contains_key(provider) {
                return Err(ConfigError::invalid(
                    format!("{at}.{key}"),
                    format!("`{provider}` is not defined in llm.providers"),
                ));
            }
            if model.trim().is_empty() {
                return Err(ConfigError::invalid(
                    format!("{at}.model"),
                    "must not be empty",
                ));
            }
        }
        if l.output.schema.is_some() && l.output.format != OutputFormat::Json {
            return Err(ConfigError::invalid(
                format!("{at}.output.schema"),
                "needs output.format = \"json\"",
            ));
        }
        Ok(())
    }

    fn build(&self, cx: &Assembly<'_>) -> Result<Arc<dyn Step>, ConfigError> {
        Ok(Arc::new(super::step::LlmStep::new(
            self,
            &cx.config.llm,
            cx.accounts,
            cx.gate,
            cx.metrics,
        )?))
    }
}
