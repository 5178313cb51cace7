//! Typed configuration: a TOML file plus `SPILLWAY_`-prefixed environment overrides.
//!
//! Every field is documented, carries its unit in its name, and gets its default from a
//! named function. Required settings (brokers, group, topics, DLQ topic) have no default.
//! [`Config::load`] deserializes and then [`Config::validate`]s cross-field rules, failing
//! with a message that names the offending key.
//!
//! Environment overrides use `__` as the nesting separator:
//! `SPILLWAY_KAFKA__BROKERS=broker:9092`, `SPILLWAY_PROCESSOR__MAX_IN_FLIGHT=4096`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

pub mod ingress;

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
    pub steps: Vec<StepConfig>,
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

/// Dedup by a stable event id, and a durable record of each event's finished steps.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    /// The changelog of the local stores: a topic keyed by dedup key with
    /// `cleanup.policy=compact,delete` and `retention.ms` of at least the longest TTL (see
    /// [`JournalConfig::retention_ms`]). Input partition `p` writes to journal partition
    /// `p mod <its partition count>`.
    pub topic: String,
    /// How long an event's entry is kept, and its duplicates skipped, in seconds.
    #[serde(default = "default_journal_ttl_secs")]
    pub ttl_secs: u64,
    /// TTL per event type (`ce_type`), overriding `ttl_secs`, e.g.
    /// `{ "com.example.comment" = 86400, "com.example.presence" = 3600 }`.
    #[serde(default)]
    pub ttl_by_type: BTreeMap<String, u64>,
    /// Where the stable id comes from: unset, the `ce_id` header; or a JSON pointer into the
    /// event's data (e.g. `/order/id`) for upstream topics without CloudEvents headers.
    #[serde(default)]
    pub id_field: Option<String>,
    /// Directory of the local stores: one file per assigned journal partition
    /// (`<state_dir>/<journal topic>-<partition>.redb`). Each instance needs its own; a lost
    /// or deleted directory is restored from the journal topic.
    #[serde(default = "default_journal_state_dir")]
    pub state_dir: std::path::PathBuf,
    /// Page cache of each open partition store, in bytes. The processor's memory for dedup
    /// state is this times the journal partitions it holds, whatever the number of keys.
    #[serde(default = "default_journal_store_cache_bytes")]
    pub store_cache_bytes: u64,
    /// A restore whose read position has not moved for this long, in milliseconds, marks the
    /// processor not ready (`/readyz` 503, `spillway_journal_restore_stalled`). It keeps going.
    #[serde(default = "default_journal_restore_stall_ms")]
    pub restore_stall_ms: u64,
    /// Margin of the journal topic's `retention.ms` over the longest TTL, in seconds: records
    /// are deleted by retention only once every entry they hold has expired, even with this
    /// much clock difference between the processors and the brokers.
    #[serde(default = "default_journal_retention_margin_secs")]
    pub retention_margin_secs: u64,
}

impl JournalConfig {
    /// The longest TTL of any event type.
    pub fn max_ttl_secs(&self) -> u64 {
        self.ttl_by_type
            .values()
            .copied()
            .chain([self.ttl_secs])
            .max()
            .unwrap_or(self.ttl_secs)
    }

    /// The journal topic's `retention.ms` (`cleanup.policy=compact,delete`): the longest TTL
    /// plus the margin.
    pub fn retention_ms(&self) -> u64 {
        self.max_ttl_secs()
            .saturating_add(self.retention_margin_secs)
            .saturating_mul(1000)
    }
}

fn default_journal_ttl_secs() -> u64 {
    86_400
}
fn default_journal_state_dir() -> std::path::PathBuf {
    ".spillway/state".into()
}
fn default_journal_store_cache_bytes() -> u64 {
    2 << 20
}
fn default_journal_restore_stall_ms() -> u64 {
    30_000
}
fn default_journal_retention_margin_secs() -> u64 {
    3_600
}

/// Kafka connection and consumer-group settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated (`bootstrap.servers`).
    pub brokers: String,
    /// Consumer group id (`group.id`). Instances with the same group share the partitions.
    pub group_id: String,
    /// Topics to consume. Topics written by other producers are first-class.
    pub topics: Vec<String>,
    /// Create missing topics (and the DLQ topic) at start-up with this many partitions.
    /// Meant for development; leave unset against managed clusters.
    #[serde(default)]
    pub create_topics_partitions: Option<i32>,
    /// Consumer session timeout in milliseconds (`session.timeout.ms`). Classic protocol
    /// only: with `group_protocol = "consumer"` the broker's `group.consumer.session.timeout.ms`
    /// applies instead.
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
    /// Consumer group protocol (`group.protocol`): `classic` (the default; works with every
    /// broker) or `consumer` (KIP-848, Apache Kafka 4.0+: the broker assigns partitions
    /// incrementally and owns session timing, so `session_timeout_ms` and
    /// `partition_assignment_strategy` do not apply).
    #[serde(default)]
    pub group_protocol: GroupProtocol,
    /// Classic protocol only: the assignor (`partition.assignment.strategy`). The default,
    /// `cooperative-sticky`, is incremental: a member joining or leaving revokes only the
    /// partitions that move, and the others keep processing. `range` or `roundrobin` are
    /// eager: every rebalance revokes every partition of every member and drains their work.
    #[serde(default)]
    pub partition_assignment_strategy: Option<String>,
    /// Static membership (`group.instance.id`): a stable, unique id per instance, such as a
    /// StatefulSet pod's name (`SPILLWAY_KAFKA__GROUP_INSTANCE_ID` from the downward API). A
    /// member that restarts within the session timeout gets its partitions back without a
    /// rebalance of the others; its partitions wait, unprocessed, until it is back or the
    /// session times out. Two live instances with the same id fence each other.
    #[serde(default)]
    pub group_instance_id: Option<String>,
    /// Maximum time between polls before the member is evicted (`max.poll.interval.ms`).
    /// The poll loop never waits on processing, so this only bounds stalls of the loop itself.
    #[serde(default = "default_max_poll_interval_ms")]
    pub max_poll_interval_ms: u64,
    /// Bound on how long a produce (DLQ) may take before it errors (`message.timeout.ms`).
    #[serde(default = "default_message_timeout_ms")]
    pub message_timeout_ms: u64,
    /// Where a group without committed offsets starts (`auto.offset.reset`): `earliest` or `latest`.
    #[serde(default = "default_auto_offset_reset")]
    pub auto_offset_reset: String,
    /// Interval of librdkafka statistics, which feed the lag metrics (`statistics.interval.ms`).
    #[serde(default = "default_statistics_interval_ms")]
    pub statistics_interval_ms: u64,
    /// Any other librdkafka property, passed through as-is: SASL/SSL for managed clusters,
    /// fetch tuning, and so on. Values may be literals or `{ env = "VAR" }` / `{ file = "/path" }`
    /// for secrets. Properties Spillway manages itself are rejected.
    #[serde(default)]
    pub properties: BTreeMap<String, PropertyValue>,
}

/// The consumer group protocol (`group.protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupProtocol {
    /// The classic group protocol: client-side assignors, `session.timeout.ms` from config.
    #[default]
    Classic,
    /// KIP-848: broker-side incremental assignment and session timing (Kafka 4.0+).
    Consumer,
}

/// The default assignor of the classic protocol: incremental, sticky.
pub const DEFAULT_ASSIGNMENT_STRATEGY: &str = "cooperative-sticky";

/// Processor scheduling, buffering, offsets and lifecycle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessorConfig {
    /// Global limit of events being processed at once, across all partitions.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Records a partition may hold waiting (not yet started) before it is paused.
    /// It resumes when the buffer has drained to half.
    #[serde(default = "default_max_buffered_per_partition")]
    pub max_buffered_per_partition: usize,
    /// Records all partitions together may hold waiting before intake pauses.
    #[serde(default = "default_max_buffered_total")]
    pub max_buffered_total: usize,
    /// How often finished offsets are stored and committed, in milliseconds.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// On SIGTERM/SIGINT, how long in-flight work may take to finish before it is abandoned
    /// (and redelivered later), in milliseconds.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// On a partition revoke, how long in-flight work of the revoked partitions may take to
    /// finish before their offsets are committed and the partitions released, in milliseconds.
    #[serde(default = "default_rebalance_timeout_ms")]
    pub rebalance_timeout_ms: u64,
    /// Retry policy for transient step errors.
    #[serde(default)]
    pub retry: RetryConfig,
}

/// Exponential backoff with full jitter for transient errors.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Total attempts per step, the first included. After the last, the record is dead-lettered.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Backoff cap for the first retry, in milliseconds; it doubles per attempt.
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// Upper bound of any single backoff, in milliseconds.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

/// Dead-letter queue.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqConfig {
    /// Topic that receives records that failed deterministically or exhausted their retries.
    pub topic: String,
}

/// Value decoding.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodecConfig {
    /// Expected value format: `auto` (Confluent-framed Avro if the magic byte says so, else
    /// JSON), `json` or `avro`.
    #[serde(default = "default_codec_format")]
    pub format: CodecFormat,
    /// Confluent-compatible schema registry URL; required to decode Avro.
    #[serde(default)]
    pub schema_registry_url: Option<String>,
    /// Timeout of one registry request, in milliseconds.
    #[serde(default = "default_registry_timeout_ms")]
    pub schema_registry_timeout_ms: u64,
}

/// Accepted value formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodecFormat {
    /// Avro when the first byte is the Confluent magic byte, JSON otherwise.
    Auto,
    /// Plain JSON only.
    Json,
    /// Confluent-framed Avro only.
    Avro,
}

/// One step of the per-event chain.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StepConfig {
    /// HTTP POST of the event to a URL (the generic webhook sink).
    Webhook(WebhookConfig),
    /// A call to an LLM provider; its answer is passed on to the following steps.
    Llm(LlmStepConfig),
    /// A Slack message: `chat.postMessage` with a bot token, or an incoming webhook.
    Slack(SlackConfig),
    /// A result record on a Kafka topic, written in a transaction with the journal entry.
    Kafka(KafkaSinkConfig),
}

/// The Kafka result-topic sink. Transactional (the default), it needs `[journal]`: the result
/// record and the event's journal entry are written in one Kafka transaction, so a consumer
/// reading the topic with `isolation.level=read_committed` sees exactly one result per dedup
/// key. `transactional = false` is for brokers without transactions: the record is produced
/// idempotently and acknowledged before the step finishes, so a crash can repeat it once
/// (same key, same `ce_id`) for consumers to drop, like the webhook sink's repeat.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Step name used in metrics and DLQ headers; defaults to `kafka`.
    #[serde(default = "default_kafka_sink_name")]
    pub name: String,
    /// The result topic. Records are keyed by the dedup key.
    pub topic: String,
    /// `avro` (Confluent-framed `schemas/result.avsc`; needs `codec.schema_registry_url`) or
    /// `json` (the same fields as a JSON object).
    #[serde(default = "default_result_format")]
    pub format: ResultFormat,
    /// Write the result and the journal entry in one transaction (needs a broker with Kafka
    /// transactions: Apache Kafka, Confluent, Redpanda; `false` for Kafka-protocol brokers
    /// without them, such as tansu 0.6, which lacks EndTxn).
    #[serde(default = "default_true")]
    pub transactional: bool,
}

/// How the result-topic sink encodes its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultFormat {
    /// Confluent-framed Avro of `schemas/result.avsc`.
    Avro,
    /// A JSON object with the fields of `schemas/result.avsc`.
    Json,
}

fn default_true() -> bool {
    true
}
fn default_kafka_sink_name() -> String {
    "kafka".to_string()
}
fn default_result_format() -> ResultFormat {
    ResultFormat::Avro
}

/// The Slack sink. Set `webhook_url`, or `token` and `channel`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// Step name used in metrics and DLQ headers; defaults to `slack`.
    #[serde(default = "default_slack_name")]
    pub name: String,
    /// An incoming webhook URL (a secret: from the environment or a file).
    #[serde(default)]
    pub webhook_url: Option<PropertyValue>,
    /// A bot token (`xoxb-...`) for `chat.postMessage`.
    #[serde(default)]
    pub token: Option<PropertyValue>,
    /// The channel id for `chat.postMessage`.
    #[serde(default)]
    pub channel: Option<String>,
    /// Slack's Web API base URL.
    #[serde(default = "default_slack_api_url")]
    pub api_url: String,
    /// The message, a minijinja template over `event`, `data` and `outputs`.
    pub text: String,
    /// Escape `&`, `<` and `>` in every value the template renders (Slack's rules), so event
    /// text such as `<!channel>` cannot ping a channel or forge a link. The template's own
    /// text is never escaped, and `{{ x | safe }}` renders one value as is. `false` turns it
    /// off for this template: only for values that are trusted Slack markup.
    #[serde(default = "default_true")]
    pub escape: bool,
    /// Minimum time between two posts to the channel, in milliseconds (Slack: ~1 per second).
    #[serde(default = "default_slack_pacing_ms")]
    pub pacing_ms: u64,
    /// Timeout of one request, in milliseconds.
    #[serde(default = "default_webhook_timeout_ms")]
    pub timeout_ms: u64,
    /// How many recent channel messages reconciliation looks through.
    #[serde(default = "default_slack_history")]
    pub reconcile_history: u32,
}

fn default_slack_name() -> String {
    "slack".to_string()
}
fn default_slack_api_url() -> String {
    "https://slack.com/api".to_string()
}
fn default_slack_pacing_ms() -> u64 {
    1_000
}
fn default_slack_history() -> u32 {
    100
}

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
    pub base_url: String,
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

/// The generic webhook sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Step name used in metrics and DLQ headers; defaults to `webhook`.
    #[serde(default = "default_webhook_name")]
    pub name: String,
    /// Target URL.
    pub url: String,
    /// Timeout of one attempt (connect, send and response), in milliseconds.
    #[serde(default = "default_webhook_timeout_ms")]
    pub timeout_ms: u64,
    /// Extra request headers. Values may be literals or secret references.
    #[serde(default)]
    pub headers: BTreeMap<String, PropertyValue>,
    /// Standard Webhooks secret (`whsec_<base64>`): when set, each request carries
    /// `webhook-id` (the dedup key), `webhook-timestamp` and `webhook-signature`.
    #[serde(default)]
    pub signing_secret: Option<PropertyValue>,
}

/// Metrics, health endpoints and logs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Address of the HTTP server for `/metrics`, `/healthz` and `/readyz`.
    #[serde(default = "default_metrics_addr")]
    pub metrics_addr: SocketAddr,
    /// `/healthz` fails when the poll loop has made no progress for this long, in milliseconds.
    #[serde(default = "default_liveness_timeout_ms")]
    pub liveness_timeout_ms: u64,
    /// Log format: `text` or `json`.
    #[serde(default = "default_log_format")]
    pub log_format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
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
fn env_overrides(sections: &'static [&'static str]) -> Env {
    Env::prefixed("SPILLWAY_")
        .filter(move |k| {
            let k = k.as_str().to_ascii_lowercase();
            sections.iter().any(|s| k.starts_with(&format!("{s}__")))
        })
        .split("__")
}

/// Rejects pass-through properties that Spillway manages itself.
fn check_properties(
    section: &str,
    properties: &BTreeMap<String, PropertyValue>,
) -> Result<(), ConfigError> {
    for key in properties.keys() {
        if MANAGED_KAFKA_PROPERTIES.contains(&key.as_str()) {
            return Err(ConfigError::invalid(
                format!("{section}.properties.\"{key}\""),
                "is managed by Spillway and cannot be overridden",
            ));
        }
    }
    Ok(())
}

/// librdkafka properties Spillway sets itself; passing them through would break guarantees.
pub const MANAGED_KAFKA_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.commit.interval.ms",
    "enable.idempotence",
    "enable.partition.eof",
    "acks",
    "request.required.acks",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "transactional.id",
    "isolation.level",
    "group.protocol",
    "group.instance.id",
    "partition.assignment.strategy",
    "session.timeout.ms",
];

fn default_session_timeout_ms() -> u64 {
    45_000
}
fn default_max_poll_interval_ms() -> u64 {
    300_000
}
fn default_message_timeout_ms() -> u64 {
    30_000
}
fn default_auto_offset_reset() -> String {
    "earliest".to_string()
}
fn default_statistics_interval_ms() -> u64 {
    5_000
}
fn default_max_in_flight() -> usize {
    1024
}
fn default_max_buffered_per_partition() -> usize {
    2_000
}
fn default_max_buffered_total() -> usize {
    20_000
}
fn default_commit_interval_ms() -> u64 {
    1_000
}
fn default_shutdown_timeout_ms() -> u64 {
    25_000
}
fn default_rebalance_timeout_ms() -> u64 {
    10_000
}
fn default_max_attempts() -> u32 {
    5
}
fn default_initial_backoff_ms() -> u64 {
    200
}
fn default_max_backoff_ms() -> u64 {
    30_000
}
fn default_codec_format() -> CodecFormat {
    CodecFormat::Auto
}
fn default_registry_timeout_ms() -> u64 {
    5_000
}
fn default_webhook_name() -> String {
    "webhook".to_string()
}
fn default_webhook_timeout_ms() -> u64 {
    10_000
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
fn default_metrics_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
fn default_liveness_timeout_ms() -> u64 {
    30_000
}
fn default_log_format() -> LogFormat {
    LogFormat::Text
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            max_in_flight: default_max_in_flight(),
            max_buffered_per_partition: default_max_buffered_per_partition(),
            max_buffered_total: default_max_buffered_total(),
            commit_interval_ms: default_commit_interval_ms(),
            shutdown_timeout_ms: default_shutdown_timeout_ms(),
            rebalance_timeout_ms: default_rebalance_timeout_ms(),
            retry: RetryConfig::default(),
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: default_max_attempts(),
            initial_backoff_ms: default_initial_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
        }
    }
}

impl Default for CodecConfig {
    fn default() -> Self {
        CodecConfig {
            format: default_codec_format(),
            schema_registry_url: None,
            schema_registry_timeout_ms: default_registry_timeout_ms(),
        }
    }
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

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            metrics_addr: default_metrics_addr(),
            liveness_timeout_ms: default_liveness_timeout_ms(),
            log_format: default_log_format(),
        }
    }
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

    /// Cross-field rules. Fails on the first broken rule, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(j) = &self.journal {
            self.validate_journal(j)?;
        }
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            return Err(ConfigError::invalid("kafka.brokers", "must not be empty"));
        }
        if k.group_id.trim().is_empty() {
            return Err(ConfigError::invalid("kafka.group_id", "must not be empty"));
        }
        if k.topics.is_empty() || k.topics.iter().any(|t| t.trim().is_empty()) {
            return Err(ConfigError::invalid(
                "kafka.topics",
                "must list at least one non-empty topic",
            ));
        }
        if let Some(p) = k.create_topics_partitions {
            if p < 1 {
                return Err(ConfigError::invalid(
                    "kafka.create_topics_partitions",
                    "must be at least 1",
                ));
            }
        }
        if !matches!(k.auto_offset_reset.as_str(), "earliest" | "latest") {
            return Err(ConfigError::invalid(
                "kafka.auto_offset_reset",
                "must be `earliest` or `latest`",
            ));
        }
        check_properties("kafka", &k.properties)?;
        if k.group_protocol == GroupProtocol::Consumer {
            // KIP-848: the broker assigns, times sessions and owns the protocol; librdkafka
            // refuses these at client creation, so say so here, by key.
            let refused = [
                (
                    k.partition_assignment_strategy.is_some(),
                    "kafka.partition_assignment_strategy",
                    "applies to group_protocol = \"classic\" only: with \"consumer\" (KIP-848) \
                     the broker assigns partitions",
                ),
                // librdkafka 2.12: after a crash, the restarted member is refused with a fatal
                // UNRELEASED_INSTANCE_ID until the old session expires.
                (
                    k.group_instance_id.is_some(),
                    "kafka.group_instance_id",
                    "needs group_protocol = \"classic\": under \"consumer\" (KIP-848) a member \
                     restarted after a crash is refused until its old session expires",
                ),
                (
                    k.properties.contains_key("heartbeat.interval.ms"),
                    "kafka.properties.\"heartbeat.interval.ms\"",
                    "cannot be set with group_protocol = \"consumer\" (KIP-848): the broker \
                     owns group timing",
                ),
                (
                    k.properties.contains_key("group.protocol.type"),
                    "kafka.properties.\"group.protocol.type\"",
                    "cannot be set with group_protocol = \"consumer\" (KIP-848)",
                ),
            ];
            if let Some((_, key, why)) = refused.into_iter().find(|(set, _, _)| *set) {
                return Err(ConfigError::invalid(key, why));
            }
        }
        if let Some(strategy) = &k.partition_assignment_strategy {
            let names: Vec<&str> = strategy.split(',').map(str::trim).collect();
            if names
                .iter()
                .any(|n| !matches!(*n, "cooperative-sticky" | "range" | "roundrobin"))
                || (names.len() > 1 && names.contains(&"cooperative-sticky"))
            {
                return Err(ConfigError::invalid(
                    "kafka.partition_assignment_strategy",
                    format!(
                        "is \"{strategy}\": use \"cooperative-sticky\" (incremental), or the \
                         eager \"range\", \"roundrobin\" or both, comma separated"
                    ),
                ));
            }
        }
        if k.group_instance_id
            .as_deref()
            .is_some_and(|id| id.trim().is_empty())
        {
            return Err(ConfigError::invalid(
                "kafka.group_instance_id",
                "is empty: set a stable id per instance (e.g. the pod name), or leave it unset",
            ));
        }
        let p = &self.processor;
        self.validate_bounds()?;
        if p.max_buffered_total < p.max_buffered_per_partition {
            return Err(ConfigError::invalid(
                "processor.max_buffered_total",
                "must be at least processor.max_buffered_per_partition",
            ));
        }
        // The poll thread waits inside the revoke callback for up to rebalance_timeout_ms plus
        // a 2 s hand-over margin; it must be back polling before max.poll.interval.ms.
        if p.rebalance_timeout_ms.saturating_add(2_000) >= k.max_poll_interval_ms {
            return Err(ConfigError::invalid(
                "processor.rebalance_timeout_ms",
                format!(
                    "must be at least 2000 ms below kafka.max_poll_interval_ms ({} ms): the poll \
                     loop waits for revoked work inside the rebalance callback",
                    k.max_poll_interval_ms
                ),
            ));
        }
        if p.retry.initial_backoff_ms > p.retry.max_backoff_ms {
            return Err(ConfigError::invalid(
                "processor.retry.initial_backoff_ms",
                "must not exceed processor.retry.max_backoff_ms",
            ));
        }
        if self.dlq.topic.trim().is_empty() {
            return Err(ConfigError::invalid("dlq.topic", "must not be empty"));
        }
        if k.topics.contains(&self.dlq.topic) {
            return Err(ConfigError::invalid(
                "dlq.topic",
                "must not be one of kafka.topics (a poison record would loop)",
            ));
        }
        if self.codec.format == CodecFormat::Avro && self.codec.schema_registry_url.is_none() {
            return Err(ConfigError::invalid(
                "codec.schema_registry_url",
                "is required when codec.format = \"avro\"",
            ));
        }
        self.validate_step_names()?;
        for (i, step) in self.steps.iter().enumerate() {
            match step {
                StepConfig::Webhook(w) => {
                    let key = format!("steps[{i}].url");
                    let url = reqwest::Url::parse(&w.url)
                        .map_err(|e| ConfigError::invalid(key.clone(), e.to_string()))?;
                    if !matches!(url.scheme(), "http" | "https") {
                        return Err(ConfigError::invalid(key, "must be an http(s) URL"));
                    }
                }
                StepConfig::Llm(l) => self.validate_llm_step(i, l)?,
                StepConfig::Kafka(c) => self.validate_kafka_sink(i, c)?,
                StepConfig::Slack(c) => {
                    let bot = c.token.is_some() && c.channel.is_some();
                    if bot == c.webhook_url.is_some() || (c.token.is_some() != c.channel.is_some())
                    {
                        return Err(ConfigError::invalid(
                            format!("steps[{i}].token"),
                            "set either webhook_url, or token and channel",
                        ));
                    }
                }
            }
        }
        self.validate_llm()
    }
}

impl StepConfig {
    /// The step's name: its journal entry, its output's key, its metrics label.
    pub fn name(&self) -> &str {
        match self {
            StepConfig::Webhook(c) => &c.name,
            StepConfig::Llm(c) => &c.name,
            StepConfig::Slack(c) => &c.name,
            StepConfig::Kafka(c) => &c.name,
        }
    }
}

impl Config {
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

    /// Every duration and size within bounds that keep the arithmetic on them safe.
    fn validate_bounds(&self) -> Result<(), ConfigError> {
        let (k, p) = (&self.kafka, &self.processor);
        for (key, v, min) in [
            ("kafka.session_timeout_ms", k.session_timeout_ms, 1),
            ("kafka.max_poll_interval_ms", k.max_poll_interval_ms, 1),
            ("kafka.message_timeout_ms", k.message_timeout_ms, 1),
            ("kafka.statistics_interval_ms", k.statistics_interval_ms, 0),
            ("processor.commit_interval_ms", p.commit_interval_ms, 1),
            ("processor.shutdown_timeout_ms", p.shutdown_timeout_ms, 0),
            ("processor.rebalance_timeout_ms", p.rebalance_timeout_ms, 0),
            (
                "processor.retry.initial_backoff_ms",
                p.retry.initial_backoff_ms,
                0,
            ),
            ("processor.retry.max_backoff_ms", p.retry.max_backoff_ms, 0),
            (
                "codec.schema_registry_timeout_ms",
                self.codec.schema_registry_timeout_ms,
                1,
            ),
            ("llm.breaker.window_ms", self.llm.breaker.window_ms, 1),
            ("llm.breaker.open_ms", self.llm.breaker.open_ms, 1),
            (
                "telemetry.liveness_timeout_ms",
                self.telemetry.liveness_timeout_ms,
                1,
            ),
        ] {
            duration_ms(key, v, min)?;
        }
        for (name, provider) in &self.llm.providers {
            let key = |k: &str| format!("llm.providers.{name}.{k}");
            duration_ms(&key("timeout_ms"), provider.timeout_ms, 1)?;
            duration_ms(&key("burst_ms"), provider.burst_ms, 1)?;
        }
        for (i, step) in self.steps.iter().enumerate() {
            let key = |k: &str| format!("steps[{i}].{k}");
            match step {
                StepConfig::Webhook(c) => duration_ms(&key("timeout_ms"), c.timeout_ms, 1)?,
                StepConfig::Slack(c) => {
                    duration_ms(&key("timeout_ms"), c.timeout_ms, 1)?;
                    duration_ms(&key("pacing_ms"), c.pacing_ms, 0)?;
                    // conversations.history answers at most 999 messages a page.
                    bounded(
                        &key("reconcile_history"),
                        c.reconcile_history.into(),
                        1,
                        999,
                        "messages",
                    )?;
                }
                StepConfig::Llm(c) => {
                    bounded(
                        &key("max_tokens"),
                        c.max_tokens.into(),
                        1,
                        10_000_000,
                        "tokens",
                    )?;
                    bounded(
                        &key("output.repair_attempts"),
                        c.output.repair_attempts.into(),
                        0,
                        10,
                        "attempts",
                    )?;
                }
                StepConfig::Kafka(_) => {}
            }
        }
        for (key, v, min, max) in [
            (
                "processor.max_in_flight",
                p.max_in_flight as u64,
                1,
                1_000_000,
            ),
            (
                "processor.max_buffered_per_partition",
                p.max_buffered_per_partition as u64,
                2,
                10_000_000,
            ),
            (
                "processor.max_buffered_total",
                p.max_buffered_total as u64,
                2,
                100_000_000,
            ),
            (
                "processor.retry.max_attempts",
                p.retry.max_attempts.into(),
                1,
                1_000,
            ),
            (
                "llm.breaker.failure_threshold",
                self.llm.breaker.failure_threshold.into(),
                1,
                1_000_000,
            ),
        ] {
            bounded(key, v, min, max, "")?;
        }
        Ok(())
    }

    fn validate_journal(&self, j: &JournalConfig) -> Result<(), ConfigError> {
        if j.topic.trim().is_empty() {
            return Err(ConfigError::invalid("journal.topic", "must not be empty"));
        }
        if self.kafka.topics.contains(&j.topic) || j.topic == self.dlq.topic {
            return Err(ConfigError::invalid(
                "journal.topic",
                "must differ from the input topics and the DLQ topic",
            ));
        }
        if j.ttl_secs == 0 || j.ttl_by_type.values().any(|t| *t == 0) {
            return Err(ConfigError::invalid(
                "journal.ttl_secs",
                "TTLs must be at least 1 second",
            ));
        }
        if j.id_field.as_deref().is_some_and(|f| !f.starts_with('/')) {
            return Err(ConfigError::invalid(
                "journal.id_field",
                "must be a JSON pointer such as /id",
            ));
        }
        const TEN_YEARS_SECS: u64 = 10 * 366 * 86_400;
        if j.max_ttl_secs() > TEN_YEARS_SECS || j.retention_margin_secs > TEN_YEARS_SECS {
            return Err(ConfigError::invalid(
                "journal.ttl_secs",
                "TTLs and retention_margin_secs must be at most ten years",
            ));
        }
        if j.store_cache_bytes < (1 << 20) || j.store_cache_bytes > (1 << 40) {
            return Err(ConfigError::invalid(
                "journal.store_cache_bytes",
                "must be between 1 MiB and 1 TiB",
            ));
        }
        duration_ms("journal.restore_stall_ms", j.restore_stall_ms, 1_000)?;
        if j.state_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "journal.state_dir",
                "must not be empty",
            ));
        }
        Ok(())
    }

    fn validate_kafka_sink(&self, i: usize, c: &KafkaSinkConfig) -> Result<(), ConfigError> {
        if c.transactional && self.journal.is_none() {
            return Err(ConfigError::invalid(
                format!("steps[{i}]"),
                "the kafka sink writes its result and the journal entry in one transaction; \
                 configure [journal] (or set transactional = false for at-least-once)",
            ));
        }
        let journal_topic = self.journal.as_ref().map(|j| j.topic.as_str());
        if c.topic.trim().is_empty()
            || self.kafka.topics.contains(&c.topic)
            || c.topic == self.dlq.topic
            || Some(c.topic.as_str()) == journal_topic
        {
            return Err(ConfigError::invalid(
                format!("steps[{i}].topic"),
                "must be set and differ from the input, DLQ and journal topics",
            ));
        }
        if c.format == ResultFormat::Avro && self.codec.schema_registry_url.is_none() {
            return Err(ConfigError::invalid(
                format!("steps[{i}].format"),
                "\"avro\" needs codec.schema_registry_url (or set format = \"json\")",
            ));
        }
        Ok(())
    }

    fn validate_llm_step(&self, i: usize, l: &LlmStepConfig) -> Result<(), ConfigError> {
        let targets = std::iter::once((l.provider.as_str(), l.model.as_str(), "provider".into()))
            .chain(l.fallback.iter().enumerate().map(|(j, f)| {
                (
                    f.provider.as_str(),
                    f.model.as_str(),
                    format!("fallback[{j}].provider"),
                )
            }));
        for (provider, model, key) in targets {
            if !self.llm.providers.contains_key(provider) {
                return Err(ConfigError::invalid(
                    format!("steps[{i}].{key}"),
                    format!("`{provider}` is not defined in llm.providers"),
                ));
            }
            if model.trim().is_empty() {
                return Err(ConfigError::invalid(
                    format!("steps[{i}].model"),
                    "must not be empty",
                ));
            }
        }
        if l.output.schema.is_some() && l.output.format != OutputFormat::Json {
            return Err(ConfigError::invalid(
                format!("steps[{i}].output.schema"),
                "needs output.format = \"json\"",
            ));
        }
        Ok(())
    }

    fn validate_llm(&self) -> Result<(), ConfigError> {
        for (name, p) in &self.llm.providers {
            let key = |k: &str| format!("llm.providers.{name}.{k}");
            let url = reqwest::Url::parse(&p.base_url)
                .map_err(|e| ConfigError::invalid(key("base_url"), e.to_string()))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(ConfigError::invalid(
                    key("base_url"),
                    "must be an http(s) URL",
                ));
            }
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
        for (model, price) in &self.llm.prices {
            if !(price.input_usd_per_mtok >= 0.0 && price.output_usd_per_mtok >= 0.0) {
                return Err(ConfigError::invalid(
                    format!("llm.prices.{model}"),
                    "prices must be non-negative numbers",
                ));
            }
        }
        let b = &self.llm.breaker;
        if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
            return Err(ConfigError::invalid(
                "llm.breaker.failure_ratio",
                "must be in (0, 1]",
            ));
        }
        Ok(())
    }
}

impl ProcessorConfig {
    /// Commit interval as a duration.
    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.commit_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [kafka]
        brokers = "127.0.0.1:9092"
        group_id = "g"
        topics = ["events"]
        [dlq]
        topic = "events.dlq"
    "#;

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../config/example.toml");
        let cfg = Config::from_toml(text).expect("config/example.toml must stay valid");
        assert_eq!(cfg.processor.max_in_flight, 1024);
        assert!(!cfg.steps.is_empty());
        // Its templates and output schema compile too.
        let steps = crate::pipeline::build(
            &cfg,
            &crate::telemetry::Metrics::new(),
            &crate::processor::gate::Gate::new(),
        )
        .expect("example pipeline builds");
        assert_eq!(steps.len(), cfg.steps.len());
    }

    fn refused(toml: &str) -> (String, String) {
        match Config::from_toml(toml) {
            Err(ConfigError::Invalid { key, message }) => (key, message),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn duplicate_step_names_are_refused_naming_both_steps() {
        let two_webhooks = format!(
            "{MINIMAL}
            [[steps]]
            type = \"webhook\"
            url = \"http://127.0.0.1:1/a\"
            [[steps]]
            type = \"webhook\"
            url = \"http://127.0.0.1:1/b\"
            "
        );
        let (key, message) = refused(&two_webhooks);
        assert_eq!(key, "steps[1].name");
        assert!(
            message.contains("`webhook` is also the name of steps[0]"),
            "{message}"
        );
        let two_llms = format!(
            "{MINIMAL}
            [llm.providers.p]
            api = \"openai\"
            base_url = \"http://127.0.0.1:1\"
            [[steps]]
            type = \"llm\"
            name = \"classify\"
            provider = \"p\"
            model = \"m\"
            user = \"a\"
            [[steps]]
            type = \"slack\"
            webhook_url = \"http://127.0.0.1:1/s\"
            text = \"x\"
            [[steps]]
            type = \"llm\"
            name = \"classify\"
            provider = \"p\"
            model = \"m\"
            user = \"b\"
            "
        );
        let (key, message) = refused(&two_llms);
        assert_eq!(key, "steps[2].name");
        assert!(
            message.contains("`classify` is also the name of steps[0]"),
            "{message}"
        );
        let renamed = two_webhooks.replacen(
            "url = \"http://127.0.0.1:1/b\"",
            "url = \"http://127.0.0.1:1/b\"\nname = \"audit\"",
            1,
        );
        Config::from_toml(&renamed).expect("distinct names are fine");
    }

    #[test]
    fn every_duration_and_size_from_outside_is_bounded_and_named() {
        let huge = i64::MAX.to_string();
        let in_kafka = |k: &str, v: &str| {
            MINIMAL.replacen(
                "group_id = \"g\"",
                &format!("group_id = \"g\"\n{k} = {v}"),
                1,
            )
        };
        let section = |t: &str, k: &str, v: &str| format!("{MINIMAL}\n[{t}]\n{k} = {v}\n");
        let cases = [
            (in_kafka("session_timeout_ms", &huge), "kafka.session_timeout_ms"),
            (in_kafka("max_poll_interval_ms", &huge), "kafka.max_poll_interval_ms"),
            (in_kafka("message_timeout_ms", &huge), "kafka.message_timeout_ms"),
            // `rebalance_timeout_ms + 2000` overflowed before it was compared.
            (section("processor", "rebalance_timeout_ms", &huge), "processor.rebalance_timeout_ms"),
            (section("processor", "commit_interval_ms", &huge), "processor.commit_interval_ms"),
            (section("processor", "shutdown_timeout_ms", &huge), "processor.shutdown_timeout_ms"),
            (section("processor", "max_in_flight", "100000000"), "processor.max_in_flight"),
            (section("processor.retry", "max_backoff_ms", &huge), "processor.retry.max_backoff_ms"),
            (section("processor.retry", "max_attempts", "4000000000"), "processor.retry.max_attempts"),
            (section("codec", "schema_registry_timeout_ms", &huge), "codec.schema_registry_timeout_ms"),
            // `Instant + open_ms` panicked in the breaker.
            (section("llm.breaker", "open_ms", &huge), "llm.breaker.open_ms"),
            (section("llm.breaker", "window_ms", &huge), "llm.breaker.window_ms"),
            (section("telemetry", "liveness_timeout_ms", &huge), "telemetry.liveness_timeout_ms"),
            (
                format!("{MINIMAL}\n[llm.providers.p]\napi = \"openai\"\nbase_url = \"http://h\"\ntimeout_ms = {huge}\n"),
                "llm.providers.p.timeout_ms",
            ),
            (
                format!("{MINIMAL}\n[[steps]]\ntype = \"slack\"\nwebhook_url = \"http://h/\"\ntext = \"x\"\npacing_ms = {huge}\n"),
                "steps[0].pacing_ms",
            ),
            (
                format!("{MINIMAL}\n[[steps]]\ntype = \"webhook\"\nurl = \"http://h/\"\ntimeout_ms = {huge}\n"),
                "steps[0].timeout_ms",
            ),
            (
                format!(
                    "{MINIMAL}\n[llm.providers.p]\napi = \"openai\"\nbase_url = \"http://h\"\n\
                     requests_per_minute = {huge}\n"
                ),
                "llm.providers.p.requests_per_minute",
            ),
        ];
        for (toml, expected) in cases {
            let (key, message) = refused(&toml);
            assert_eq!(key, expected, "{message}");
            assert!(message.contains("must be between"), "{key}: {message}");
        }
        // A tiny share made a limit's refill interval overflow `Duration`.
        let tiny_share = format!(
            "{MINIMAL}\n[llm.providers.p]\napi = \"openai\"\nbase_url = \"http://h\"\n\
             requests_per_minute = 1\nshare = 1e-300\n"
        );
        assert_eq!(refused(&tiny_share).0, "llm.providers.p.share");
        // The largest accepted duration still leaves every deadline computable.
        let week = section("llm.breaker", "open_ms", &MAX_DURATION_MS.to_string());
        let config = Config::from_toml(&week).unwrap();
        let _ = std::time::Instant::now() + Duration::from_millis(config.llm.breaker.open_ms);
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let cfg = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(cfg.processor.max_in_flight, 1024);
        assert_eq!(cfg.processor.commit_interval_ms, 1000);
        assert_eq!(cfg.kafka.auto_offset_reset, "earliest");
        assert_eq!(cfg.codec.format, CodecFormat::Auto);
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let text = format!("{MINIMAL}\n[processor]\nmax_inflight = 3\n");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("max_inflight"), "{err}");
    }

    #[test]
    fn zero_in_flight_names_the_key() {
        let text = format!("{MINIMAL}\n[processor]\nmax_in_flight = 0\n");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("processor.max_in_flight"), "{err}");
    }

    #[test]
    fn dlq_topic_equal_to_input_topic_is_rejected() {
        let text = MINIMAL.replace("events.dlq", "events");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("dlq.topic"), "{err}");
    }

    #[test]
    fn journal_gets_defaults_and_bad_journal_settings_name_their_key() {
        let cfg = Config::from_toml(&format!("{MINIMAL}\n[journal]\ntopic = \"j\"\n")).unwrap();
        let j = cfg.journal.expect("journal section");
        assert_eq!((j.ttl_secs, j.id_field.clone()), (86_400, None));
        // Retention outlasts the longest TTL by the margin.
        assert_eq!(j.retention_ms(), (86_400 + 3_600) * 1000);
        for (extra, key) in [
            ("topic = \"events\"", "journal.topic"),
            ("topic = \"j\"\nttl_secs = 0", "journal.ttl_secs"),
            (
                "topic = \"j\"\nttl_by_type = { \"a\" = 0 }",
                "journal.ttl_secs",
            ),
            ("topic = \"j\"\nid_field = \"order.id\"", "journal.id_field"),
            (
                "topic = \"j\"\nstore_cache_bytes = 1000",
                "journal.store_cache_bytes",
            ),
            (
                "topic = \"j\"\nrestore_stall_ms = 5",
                "journal.restore_stall_ms",
            ),
            ("topic = \"j\"\nstate_dir = \"\"", "journal.state_dir"),
            ("topic = \"j\"\nttl_secs = 999999999999", "journal.ttl_secs"),
        ] {
            let err = Config::from_toml(&format!("{MINIMAL}\n[journal]\n{extra}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn managed_kafka_property_cannot_be_overridden() {
        let text = MINIMAL.replace(
            "[dlq]",
            "[kafka.properties]\n\"enable.auto.commit\" = \"true\"\n[dlq]",
        );
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("enable.auto.commit"), "{err}");
    }

    #[test]
    fn group_settings_map_to_librdkafka_and_bad_ones_name_their_key() {
        let with = |extra: &str| {
            MINIMAL.replace(
                "topics = [\"events\"]",
                &format!("topics = [\"events\"]\n{extra}"),
            )
        };
        let props = |text: &str| {
            let c = Config::from_toml(text).unwrap();
            crate::kafka::consumer_config(&c.kafka, &c.processor).unwrap()
        };
        // Incremental by default; static membership only when asked for.
        let c = props(&with(""));
        assert_eq!(
            c.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        assert_eq!(c.get("group.protocol"), Some("classic"));
        assert_eq!(c.get("group.instance.id"), None);
        let c = props(&with("group_instance_id = \"pod-1\""));
        assert_eq!(c.get("group.instance.id"), Some("pod-1"));
        // KIP-848: librdkafka refuses session.timeout.ms and an assignor there.
        let c = props(&with("group_protocol = \"consumer\""));
        assert_eq!(c.get("group.protocol"), Some("consumer"));
        assert_eq!(c.get("session.timeout.ms"), None);
        assert_eq!(c.get("partition.assignment.strategy"), None);

        for (extra, key) in [
            (
                "group_protocol = \"consumer\"\npartition_assignment_strategy = \"range\"",
                "kafka.partition_assignment_strategy",
            ),
            (
                "partition_assignment_strategy = \"sticky\"",
                "kafka.partition_assignment_strategy",
            ),
            (
                "partition_assignment_strategy = \"range,cooperative-sticky\"",
                "kafka.partition_assignment_strategy",
            ),
            ("group_instance_id = \" \"", "kafka.group_instance_id"),
            (
                "group_protocol = \"consumer\"\ngroup_instance_id = \"pod-1\"",
                "kafka.group_instance_id",
            ),
            (
                "group_protocol = \"consumer\"\n[kafka.properties]\n\"heartbeat.interval.ms\" = 500",
                "heartbeat.interval.ms",
            ),
            ("group_protocol = \"eager\"", "group_protocol"),
        ] {
            let err = Config::from_toml(&with(extra)).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
        let err = Config::from_toml(&MINIMAL.replace(
            "[dlq]",
            "[kafka.properties]\n\"group.instance.id\" = \"x\"\n[dlq]",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("group.instance.id"), "{err}");
    }

    #[test]
    fn rebalance_timeout_must_fit_in_max_poll_interval() {
        let text = MINIMAL.replace(
            "topics = [\"events\"]",
            "topics = [\"events\"]\nmax_poll_interval_ms = 5000",
        ) + "\n[processor]\nrebalance_timeout_ms = 6000\n";
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("processor.rebalance_timeout_ms"), "{err}");
    }

    #[test]
    fn secrets_resolve_from_env_and_file_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret-from-file\n").unwrap();
        // A variable name unique to this test, so parallel tests cannot race on it.
        std::env::set_var("SPILLWAY_TEST_SECRET_RESOLVE", "s3cret-from-env");
        let text = MINIMAL.replace(
            "[dlq]",
            &format!(
                "[kafka.properties]\n\"sasl.username\" = {{ env = \"SPILLWAY_TEST_SECRET_RESOLVE\" }}\n\
                 \"sasl.password\" = {{ file = \"{}\" }}\n\"fetch.min.bytes\" = 1\n[dlq]",
                path.display()
            ),
        );
        let cfg = Config::from_toml(&text).unwrap();
        let props = &cfg.kafka.properties;
        assert_eq!(
            props["sasl.username"].resolve("u").unwrap(),
            "s3cret-from-env"
        );
        assert_eq!(
            props["sasl.password"].resolve("p").unwrap(),
            "s3cret-from-file"
        );
        assert_eq!(props["fetch.min.bytes"].resolve("f").unwrap(), "1");
        let debug = format!("{cfg:?}");
        assert!(
            !debug.contains("s3cret"),
            "secrets leaked into Debug: {debug}"
        );
    }

    #[test]
    fn missing_env_secret_names_the_key() {
        let v = PropertyValue::Env {
            env: "SPILLWAY_TEST_DEFINITELY_UNSET".into(),
        };
        let err = v.resolve("kafka.properties.sasl.password").unwrap_err();
        assert!(err.to_string().contains("kafka.properties.sasl.password"));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API fixes the closure's error type.
    fn a_duration_past_what_toml_can_hold_from_the_environment_is_refused_not_overflowed() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("spillway.toml", MINIMAL)?;
            // u64::MAX: `rebalance_timeout_ms + 2000` overflowed (a panic in debug builds).
            jail.set_env(
                "SPILLWAY_PROCESSOR__REBALANCE_TIMEOUT_MS",
                u64::MAX.to_string(),
            );
            match Config::load(Path::new("spillway.toml")) {
                Err(ConfigError::Invalid { key, .. }) => {
                    assert_eq!(key, "processor.rebalance_timeout_ms");
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API fixes the closure's error type.
    fn env_overrides_file_values() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("spillway.toml", MINIMAL)?;
            jail.set_env("SPILLWAY_PROCESSOR__MAX_IN_FLIGHT", "4096");
            jail.set_env("SPILLWAY_KAFKA__BROKERS", "other:9092");
            jail.set_env("SPILLWAY_CONFIG", "ignored.toml");
            jail.set_env("SPILLWAY_SOME_TOOL_BIN", "/usr/bin/true");
            let cfg = Config::load(Path::new("spillway.toml")).map_err(|e| e.to_string())?;
            assert_eq!(cfg.processor.max_in_flight, 4096);
            assert_eq!(cfg.kafka.brokers, "other:9092");
            Ok(())
        });
    }
}
