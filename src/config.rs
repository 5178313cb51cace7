//! Typed configuration: a TOML file plus `SPILLWAY_`-prefixed environment overrides.
//!
//! This module holds the processor's top-level [`Config`], loading, secrets
//! ([`PropertyValue`]) and the bound checks; each section's type and rules live with the
//! component that uses it (`kafka`, `processor::config`, `codec`, `journal::config`,
//! `llm::config`, `telemetry`, and each step type's file, registered in `sink`).
//!
//! Every field is documented, carries its unit in its name, and gets its default from a
//! named function. Required settings (brokers, group, topics, DLQ topic) have no default.
//! [`Config::load`] deserializes and then [`Config::validate`]s cross-field rules, failing
//! with a message that names the offending key.
//!
//! Environment overrides use `__` as the nesting separator:
//! `SPILLWAY_KAFKA__BROKERS=broker:9092`, `SPILLWAY_PROCESSOR__MAX_IN_FLIGHT=4096`.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

use crate::codec::CodecConfig;
use crate::journal::config::JournalConfig;
use crate::kafka::KafkaConfig;
use crate::llm::config::LlmConfig;
pub use crate::pipeline::{PipelineConfig, StepEntry};
use crate::processor::config::{DlqConfig, ProcessorConfig};
pub use crate::sink::StepConfig;
use crate::telemetry::TelemetryConfig;

/// Configuration errors. Each message names the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or the environment could not be parsed into the typed config.
    #[error("invalid configuration: {0}")]
    Parse(#[from] Box<figment::Error>),
    /// A value parsed but breaks a rule; the message names the key.
    #[error("invalid configuration: {key}: {message}")]
    Invalid { key: String, message: String },
    /// A secret referenced from the environment or a file could not be read.
    #[error("invalid configuration: {key}: {message}")]
    Secret { key: String, message: String },
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Longest duration any `*_ms` setting may have: a week. Every deadline the services compute
/// (`Instant + duration`, sums of timeouts) then stays far from overflow, and no setting
/// that long is meaningful for a timeout, an interval or a backoff.
pub const MAX_DURATION_MS: u64 = 7 * 86_400_000;

/// Checks that `value` of setting `key` lies in `min..=max`, saying both bounds and the unit.
pub(crate) fn bounded(
    key: &str,
    value: u64,
    min: u64,
    max: u64,
    unit: &str,
) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    Err(ConfigError::invalid(
        key,
        format!("is {value}{unit}; it must be between {min} and {max}{unit}"),
    ))
}

/// [`bounded`] for a duration in milliseconds, at least `min_ms` and at most
/// [`MAX_DURATION_MS`].
pub(crate) fn duration_ms(key: &str, value: u64, min_ms: u64) -> Result<(), ConfigError> {
    bounded(key, value, min_ms, MAX_DURATION_MS, "ms")
}

/// A setting written as text and parsed once, when the configuration is read (a URL, a rate).
/// A value that does not parse keeps its error, so the section's rules name its key
/// ([`Parsed::get`]); the component then takes the parsed value, never the text again.
#[derive(Clone)]
pub struct Parsed<T> {
    text: String,
    value: Result<T, String>,
}

impl<T> Parsed<T> {
    /// The setting as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The parsed value, or an error that names `key` and says why it did not parse.
    pub fn get(&self, key: &str) -> Result<&T, ConfigError> {
        self.value
            .as_ref()
            .map_err(|message| ConfigError::invalid(key, message.clone()))
    }
}

impl<T: std::str::FromStr> From<&str> for Parsed<T>
where
    T::Err: fmt::Display,
{
    fn from(text: &str) -> Self {
        Parsed {
            text: text.to_string(),
            value: text.parse().map_err(|e: T::Err| e.to_string()),
        }
    }
}

impl<'de, T: std::str::FromStr> Deserialize<'de> for Parsed<T>
where
    T::Err: fmt::Display,
{
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|text| Parsed::from(text.as_str()))
    }
}

impl<T> fmt::Debug for Parsed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

/// An `http` or `https` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl(pub reqwest::Url);

impl std::str::FromStr for HttpUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let url = reqwest::Url::parse(text).map_err(|e| e.to_string())?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("must be an http(s) URL".to_string());
        }
        Ok(HttpUrl(url))
    }
}

/// The whole service configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Kafka connection, consumer group and topics.
    pub kafka: KafkaConfig,
    /// Scheduling, buffering, offsets and lifecycle of the processor.
    #[serde(default)]
    pub processor: ProcessorConfig,
    /// Where records that cannot be processed go.
    pub dlq: DlqConfig,
    /// How record values are decoded.
    #[serde(default)]
    pub codec: CodecConfig,
    /// The per-event chain of steps, run in order: one pipeline, named `default`, that takes
    /// every event. Use either this or `[[pipelines]]`.
    #[serde(default)]
    pub steps: Vec<StepEntry>,
    /// Several pipelines in one processor, each taking events by topic and/or type with its
    /// own steps and journal TTLs; an event runs the first that takes it.
    #[serde(default)]
    pub pipelines: Vec<PipelineConfig>,
    /// LLM providers, prices and the circuit breaker, shared by every LLM step.
    #[serde(default)]
    pub llm: LlmConfig,
    /// Metrics, health endpoints and logs.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Dedup and the step journal (exactly-once effects). Without it, processing is
    /// at-least-once: a redelivered event runs every step again.
    #[serde(default)]
    pub journal: Option<JournalConfig>,
}

/// `true`, for `#[serde(default = ...)]`.
pub(crate) fn default_true() -> bool {
    true
}

/// A configuration value that may be a secret kept outside the file.
#[derive(Clone, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    /// Read from an environment variable at start-up.
    Env {
        /// Variable name.
        env: String,
    },
    /// Read from a file at start-up (trailing newline trimmed), e.g. a mounted secret.
    File {
        /// File path.
        file: PathBuf,
    },
    /// A literal string.
    Text(String),
    /// A literal integer.
    Int(i64),
    /// A literal boolean.
    Bool(bool),
}

impl fmt::Debug for PropertyValue {
    // Secrets must never reach logs: only say where a value comes from.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PropertyValue::Env { env } => write!(f, "<from env {env}>"),
            PropertyValue::File { file } => write!(f, "<from file {}>", file.display()),
            PropertyValue::Text(_) | PropertyValue::Int(_) | PropertyValue::Bool(_) => {
                f.write_str("<literal>")
            }
        }
    }
}

impl PropertyValue {
    /// Resolves the value; `key` is only used to name it in errors.
    pub fn resolve(&self, key: &str) -> Result<String, ConfigError> {
        match self {
            PropertyValue::Text(s) => Ok(s.clone()),
            PropertyValue::Int(i) => Ok(i.to_string()),
            PropertyValue::Bool(b) => Ok(b.to_string()),
            PropertyValue::Env { env } => std::env::var(env).map_err(|_| ConfigError::Secret {
                key: key.to_string(),
                message: format!("environment variable {env} is not set"),
            }),
            PropertyValue::File { file } => std::fs::read_to_string(file)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|e| ConfigError::Secret {
                    key: key.to_string(),
                    message: format!("cannot read {}: {e}", file.display()),
                }),
        }
    }
}

/// Sections that `SPILLWAY_<SECTION>__<KEY>` environment variables may override.
const ENV_SECTIONS: &[&str] = &[
    "kafka",
    "processor",
    "dlq",
    "codec",
    "telemetry",
    "llm",
    "journal",
];

/// `SPILLWAY_<SECTION>__<KEY>` overrides for the given sections. Only `SECTION__KEY`
/// variables are overrides; other SPILLWAY_* variables (SPILLWAY_CONFIG, tooling) are not
/// configuration keys.
pub(crate) fn env_overrides(sections: &'static [&'static str]) -> Env {
    Env::prefixed("SPILLWAY_")
        .filter(move |k| {
            let k = k.as_str().to_ascii_lowercase();
            sections.iter().any(|s| k.starts_with(&format!("{s}__")))
        })
        .split("__")
}

impl Config {
    /// Loads `path` (TOML) with `SPILLWAY_*` environment overrides and validates the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::from_figment(
            Figment::new()
                .merge(Toml::file_exact(path))
                .merge(env_overrides(ENV_SECTIONS)),
        )
    }

    /// Parses a TOML string (no environment overrides) and validates it.
    pub fn from_toml(toml: &str) -> Result<Config, ConfigError> {
        Self::from_figment(Figment::new().merge(Toml::string(toml)))
    }

    fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let mut config: Config = figment.extract().map_err(Box::new)?;
        let ttls: Vec<u64> = config
            .pipelines
            .iter()
            .flat_map(|p| p.ttls_secs())
            .collect();
        if let Some(j) = config.journal.as_mut() {
            j.pipeline_ttls_secs = ttls;
        }
        config.validate()?;
        Ok(config)
    }

    /// Every rule, section by section, then each step's own (its config type checks itself,
    /// [`crate::pipeline::StepKind::validate`]). Fails on the first broken rule, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(j) = &self.journal {
            j.validate(&self.kafka.topics, &self.dlq.topic)?;
        }
        self.kafka.validate()?;
        self.processor.validate(&self.kafka)?;
        self.codec.validate()?;
        self.llm.validate()?;
        self.telemetry.validate()?;
        self.dlq.validate(&self.kafka.topics)?;
        self.validate_pipelines()?;
        for (at, steps) in self.chains() {
            validate_chain(&at, steps, self)?;
        }
        Ok(())
    }

    /// Each chain of steps with its key: `steps`, or `pipelines[i].steps`.
    fn chains(&self) -> Vec<(String, &[StepEntry])> {
        if self.pipelines.is_empty() {
            return vec![("steps".to_string(), &self.steps)];
        }
        (self.pipelines.iter().enumerate())
            .map(|(i, p)| (format!("pipelines[{i}].steps"), p.steps.as_slice()))
            .collect()
    }

    /// `[[pipelines]]`' own rules: not beside top-level `[[steps]]`, names that can be a label
    /// and a journal namespace, topics that are inputs, TTLs in range.
    fn validate_pipelines(&self) -> Result<(), ConfigError> {
        if self.pipelines.is_empty() {
            return Ok(());
        }
        if !self.steps.is_empty() {
            return Err(ConfigError::invalid(
                "steps",
                "use either top-level [[steps]] (one pipeline) or [[pipelines]] with their own \
                 [[pipelines.steps]], not both",
            ));
        }
        for (i, p) in self.pipelines.iter().enumerate() {
            let at = format!("pipelines[{i}]");
            let valid_name = !p.name.is_empty()
                && p.name != crate::processor::worker::NO_PIPELINE
                && p.name.len() <= 64
                && p.name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !valid_name {
                return Err(ConfigError::invalid(
                    format!("{at}.name"),
                    format!(
                        "`{}` must be 1 to 64 characters of a-z, 0-9, _ and - (it is a metrics \
                         label and the journal namespace; `none` labels events no pipeline took)",
                        p.name
                    ),
                ));
            }
            if let Some(first) = self.pipelines[..i].iter().position(|q| q.name == p.name) {
                return Err(ConfigError::invalid(
                    format!("{at}.name"),
                    format!("`{}` is also the name of pipelines[{first}]", p.name),
                ));
            }
            if let Some(t) = p.topics.iter().find(|t| !self.kafka.topics.contains(t)) {
                return Err(ConfigError::invalid(
                    format!("{at}.topics"),
                    format!("`{t}` is not one of kafka.topics, so no event of it arrives"),
                ));
            }
            if let Some(all) =
                (self.pipelines[..i].iter()).position(|q| q.topics.is_empty() && q.types.is_empty())
            {
                return Err(ConfigError::invalid(
                    at.clone(),
                    format!(
                        "is never reached: pipelines[{all}] before it takes every event (give it \
                         topics or types, or move it last)"
                    ),
                ));
            }
            if p.steps.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{at}.steps"),
                    "needs at least one step",
                ));
            }
            const TEN_YEARS_SECS: u64 = 10 * 366 * 86_400;
            if p.ttls_secs().any(|t| t == 0 || t > TEN_YEARS_SECS) {
                return Err(ConfigError::invalid(
                    format!("{at}.journal.ttl_secs"),
                    "TTLs must be between 1 second and ten years",
                ));
            }
            if p.ttls_secs().next().is_some() && self.journal.is_none() {
                return Err(ConfigError::invalid(
                    format!("{at}.journal"),
                    "sets journal TTLs, but there is no [journal]",
                ));
            }
        }
        Ok(())
    }
}

/// One chain's steps: names, each step type's rules and each entry's condition. `at` is the
/// chain's key (`steps`, `pipelines[1].steps`).
fn validate_chain(at: &str, steps: &[StepEntry], config: &Config) -> Result<(), ConfigError> {
    validate_step_names(at, steps)?;
    for (i, entry) in steps.iter().enumerate() {
        let at = format!("{at}[{i}]");
        entry.step.kind().validate(&at, config)?;
        entry.validate(&at, &steps[..i])?;
    }
    Ok(())
}

/// Step names key the journal's entries and the outputs: two steps of one chain with one name
/// would skip the second as done, or overwrite the first's output.
fn validate_step_names(at: &str, steps: &[StepEntry]) -> Result<(), ConfigError> {
    for (i, step) in steps.iter().enumerate() {
        if step.name().trim().is_empty() {
            return Err(ConfigError::invalid(
                format!("{at}[{i}].name"),
                "must not be empty",
            ));
        }
        if let Some(first) = steps[..i].iter().position(|s| s.name() == step.name()) {
            return Err(ConfigError::invalid(
                format!("{at}[{i}].name"),
                format!(
                    "`{}` is also the name of {at}[{first}]: step names key the journal and \
                     the outputs, so each step needs its own (steps of one type default to \
                     the same name; set `name` on one of them)",
                    step.name()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
