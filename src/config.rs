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
pub use crate::pipeline::StepEntry;
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
    /// The per-event chain of steps, run in order.
    #[serde(default)]
    pub steps: Vec<StepEntry>,
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
        let config: Config = figment.extract().map_err(Box::new)?;
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
        self.validate_step_names()?;
        for (i, entry) in self.steps.iter().enumerate() {
            let at = format!("steps[{i}]");
            entry.step.kind().validate(&at, self)?;
            entry.validate(&at, &self.steps[..i])?;
        }
        Ok(())
    }

    /// Step names key the journal's entries and the outputs: two steps with one name would
    /// skip the second as done, or overwrite the first's output.
    fn validate_step_names(&self) -> Result<(), ConfigError> {
        for (i, step) in self.steps.iter().enumerate() {
            if step.name().trim().is_empty() {
                return Err(ConfigError::invalid(
                    format!("steps[{i}].name"),
                    "must not be empty",
                ));
            }
            if let Some(first) = self.steps[..i].iter().position(|s| s.name() == step.name()) {
                return Err(ConfigError::invalid(
                    format!("steps[{i}].name"),
                    format!(
                        "`{}` is also the name of steps[{first}]: step names key the journal and \
                         the outputs, so each step needs its own (steps of one type default to \
                         the same name; set `name` on one of them)",
                        step.name()
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
