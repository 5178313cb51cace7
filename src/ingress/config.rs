//! Configuration of the ingress service (`spillway ingress --config F`).
//!
//! A separate top-level type from the processor's [`crate::config::Config`]: ingress has no consumer
//! group, topics to consume or DLQ, and the processor has no listener, sources or secrets.
//! The same conventions hold: typed TOML, `deny_unknown_fields`, a documented default from a
//! named function for every optional key, `SPILLWAY_<SECTION>__<KEY>` environment overrides,
//! and a [`IngressConfig::validate`] that names the offending key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::Figment;
use serde::Deserialize;

use crate::config::{
    bounded, duration_ms, env_overrides, ConfigError, HttpUrl, Parsed, PropertyValue,
};
use crate::ingress::limit::Rate;
use crate::kafka::check_properties;
use crate::telemetry::TelemetryConfig;

/// Sections that `SPILLWAY_<SECTION>__<KEY>` environment variables may override.
const INGRESS_ENV_SECTIONS: &[&str] = &["server", "kafka", "registry", "replay", "telemetry"];

/// The whole ingress configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressConfig {
    /// The HTTPS listener, its timeouts and connection limits.
    pub server: ServerConfig,
    /// The Kafka cluster events are produced to.
    pub kafka: ProducerConfig,
    /// The Confluent-compatible schema registry the Avro envelope is registered with.
    pub registry: RegistryConfig,
    /// The cache of delivery ids that turns replays into no-ops.
    #[serde(default)]
    pub replay: ReplayConfig,
    /// Metrics, health endpoints and logs (a separate, internal listener).
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Webhook sources by name; each is served at `/webhooks/<name>`.
    pub sources: BTreeMap<String, SourceConfig>,
}

/// The webhook listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on, e.g. `0.0.0.0:8443`.
    pub listen: SocketAddr,
    /// TLS certificate chain and key (PEM). Required unless `plaintext = true`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Serve plain HTTP. Only for local development or behind a TLS-terminating proxy; it
    /// must be asked for explicitly.
    #[serde(default)]
    pub plaintext: bool,
    /// A connection must deliver a complete request head within this time, in milliseconds,
    /// counted from when the server starts waiting for it (so idle keep-alive connections
    /// are closed after it too). Cuts off slowloris clients. Also bounds the TLS handshake.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// The whole body must arrive within this time, in milliseconds, or the request gets
    /// 408 and the connection is closed.
    #[serde(default = "default_body_timeout_ms")]
    pub body_timeout_ms: u64,
    /// Open connections beyond this are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Request body bytes held in memory at once, over all connections, in bytes. A body
    /// that would go past it gets 503 with `Retry-After` (outcome `overloaded`), so memory
    /// stays bounded however many clients send large bodies at once. A body stays charged
    /// until its record's delivery report, standing for librdkafka's copy of the record once
    /// Spillway's own is freed. At least the largest `sources.*.max_body_bytes`.
    #[serde(default = "default_max_buffered_body_bytes")]
    pub max_buffered_body_bytes: usize,
    /// Cheap per-client-IP limit applied before any signature work, e.g. `100/s`. Unset: no
    /// per-IP limit (behind a load balancer every request may share one IP).
    #[serde(default)]
    pub ip_rate: Option<Parsed<Rate>>,
    /// `Retry-After` seconds on a 503 (Kafka or the schema registry could not take the event).
    #[serde(default = "default_unavailable_retry_after_secs")]
    pub unavailable_retry_after_secs: u64,
    /// On SIGTERM, how long in-flight requests may take to finish, in milliseconds. Requests
    /// already producing always get their delivery report first.
    #[serde(default = "default_ingress_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// On SIGTERM, how long to keep serving with readiness already off before the listener
    /// closes, in milliseconds, so a load balancer sees the pod unready and stops routing to
    /// it before connections are refused (Kubernetes: a few readiness periods). 0: close at
    /// once.
    #[serde(default)]
    pub shutdown_delay_ms: u64,
}

/// PEM files for the listener's TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, leaf first (PEM).
    pub cert_file: PathBuf,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// The Kafka cluster ingress produces to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProducerConfig {
    /// Bootstrap servers, comma separated (`bootstrap.servers`).
    pub brokers: String,
    /// Upper bound on a produce, from the send to the delivery report, in milliseconds
    /// (`message.timeout.ms`). Past it the request gets 503 and the sender retries; keep it
    /// below the senders' own timeouts (GitHub waits 10 s).
    #[serde(default = "default_ingress_message_timeout_ms")]
    pub message_timeout_ms: u64,
    /// Time librdkafka waits to batch records, in milliseconds (`linger.ms`). It adds
    /// directly to every response's latency.
    #[serde(default = "default_ingress_linger_ms")]
    pub linger_ms: u64,
    /// Create the sources' topics at start-up with this many partitions where missing.
    /// Meant for development; leave unset against managed clusters.
    #[serde(default)]
    pub create_topics_partitions: Option<i32>,
    /// Any other librdkafka property, passed through (SASL/SSL and so on). Values may be
    /// literals or `{ env = "VAR" }` / `{ file = "/path" }`.
    #[serde(default)]
    pub properties: BTreeMap<String, PropertyValue>,
}

/// Schema registry access.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Confluent-compatible schema registry URL.
    pub url: Parsed<HttpUrl>,
    /// Timeout of one registry request, in milliseconds.
    #[serde(default = "default_ingress_registry_timeout_ms")]
    pub timeout_ms: u64,
}

/// The replay cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    /// How long an accepted delivery id is remembered at least, in seconds (at most twice
    /// this). Must be at least twice the largest timestamp tolerance, so a replay inside the
    /// signature window always hits.
    #[serde(default = "default_replay_ttl_secs")]
    pub ttl_secs: u64,
    /// Most ids remembered at once, about 40 bytes each. When the ids of one TTL exceed half
    /// of it, older ids are forgotten early (`spillway_ingress_replay_early_rotations_total`).
    #[serde(default = "default_replay_max_ids")]
    pub max_ids: u64,
}

/// Signature schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SchemeName {
    /// Standard Webhooks 1.0 (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
    StandardWebhooks,
    /// GitHub (`X-Hub-Signature-256`, `X-GitHub-Delivery`).
    Github,
    /// Stripe (`Stripe-Signature`).
    Stripe,
    /// Slack (`X-Slack-Signature`, `X-Slack-Request-Timestamp`).
    Slack,
    /// HMAC-SHA256 of the raw body in a configurable header.
    Hmac,
}

/// Encodings of a generic HMAC signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureEncoding {
    /// Hex.
    Hex,
    /// Standard base64.
    Base64,
}

/// Where a value comes from in a request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum FieldRef {
    /// A request header.
    Header {
        /// Header name.
        header: String,
    },
    /// A JSON Pointer into the body, e.g. `/id` or `/event/event_id`.
    Json {
        /// JSON Pointer (RFC 6901).
        json: String,
    },
    /// A fixed value.
    Fixed(String),
}

/// One webhook source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Signature scheme.
    pub scheme: SchemeName,
    /// Signing secrets; any one may match, so a new secret can be added before the old one
    /// is removed. Literals or `{ env = "VAR" }` / `{ file = "/path" }`.
    pub secrets: Vec<PropertyValue>,
    /// `hmac` only: the header carrying the signature.
    #[serde(default)]
    pub signature_header: Option<String>,
    /// `hmac` only: prefix before the encoded signature, e.g. `sha256=`.
    #[serde(default)]
    pub signature_prefix: Option<String>,
    /// `hmac` only: `hex` (default) or `base64`.
    #[serde(default)]
    pub signature_encoding: Option<SignatureEncoding>,
    /// Allowed distance between a signed timestamp and now, both ways, in seconds.
    #[serde(default = "default_tolerance_secs")]
    pub tolerance_secs: u64,
    /// Largest accepted body, in bytes; larger bodies get 413 however they are framed.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Requests per period for this source after authentication, e.g. `10/min`; over it
    /// gets 429 with `Retry-After`. Unset: unlimited.
    #[serde(default)]
    pub rate: Option<Parsed<Rate>>,
    /// Where the sender's delivery id is: a header or a JSON Pointer. Defaults per scheme:
    /// `webhook-id` (Standard Webhooks), `X-GitHub-Delivery` (GitHub), `/id` (Stripe),
    /// `/event_id` (Slack). Required for `hmac`.
    #[serde(default)]
    pub delivery_id: Option<FieldRef>,
    /// The event type (`ce_type`): a fixed string, a header or a JSON Pointer.
    pub event_type: FieldRef,
    /// Optional subject (a header or a JSON Pointer), e.g. the repository.
    #[serde(default)]
    pub subject: Option<FieldRef>,
    /// Optional occurrence time (RFC 3339 text; a header or a JSON Pointer).
    #[serde(default)]
    pub time: Option<FieldRef>,
    /// Topic the events are produced to.
    pub topic: String,
    /// Optional JSON Schema file every body must satisfy (else 400 naming the paths).
    #[serde(default)]
    pub schema: Option<PathBuf>,
}

fn default_header_read_timeout_ms() -> u64 {
    5_000
}
fn default_body_timeout_ms() -> u64 {
    10_000
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_buffered_body_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_unavailable_retry_after_secs() -> u64 {
    5
}
fn default_ingress_shutdown_timeout_ms() -> u64 {
    20_000
}
fn default_ingress_message_timeout_ms() -> u64 {
    5_000
}
fn default_ingress_linger_ms() -> u64 {
    1
}
fn default_ingress_registry_timeout_ms() -> u64 {
    2_000
}
fn default_replay_ttl_secs() -> u64 {
    900
}
fn default_replay_max_ids() -> u64 {
    1_000_000
}
fn default_tolerance_secs() -> u64 {
    300
}
fn default_max_body_bytes() -> usize {
    512 * 1024
}

/// librdkafka's default `message.max.bytes`, the largest record the producer sends.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// Room a record needs beside its body: the Avro envelope's other fields (id, source, type,
/// subject and time, each at most 256 bytes), the CloudEvents headers, the key and the
/// record framing.
pub const RECORD_OVERHEAD_BYTES: usize = 16 * 1024;

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            ttl_secs: default_replay_ttl_secs(),
            max_ids: default_replay_max_ids(),
        }
    }
}

impl IngressConfig {
    /// Loads `path` (TOML) with `SPILLWAY_*` environment overrides and validates the result.
    pub fn load(path: &Path) -> Result<IngressConfig, ConfigError> {
        Self::from_figment(
            Figment::new()
                .merge(Toml::file_exact(path))
                .merge(env_overrides(INGRESS_ENV_SECTIONS)),
        )
    }

    /// Parses a TOML string (no environment overrides) and validates it.
    pub fn from_toml(toml: &str) -> Result<IngressConfig, ConfigError> {
        Self::from_figment(Figment::new().merge(Toml::string(toml)))
    }

    fn from_figment(figment: Figment) -> Result<IngressConfig, ConfigError> {
        let config: IngressConfig = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Cross-field rules. Fails on the first broken rule, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        match (&s.tls, s.plaintext) {
            (None, false) => {
                return Err(ConfigError::invalid(
                    "server.tls",
                    "is required (set cert_file and key_file), or set server.plaintext = true \
                     to serve plain HTTP for local development",
                ))
            }
            (Some(_), true) => {
                return Err(ConfigError::invalid(
                    "server.plaintext",
                    "cannot be combined with server.tls",
                ))
            }
            _ => {}
        }
        self.validate_bounds()?;
        if let Some(r) = &s.ip_rate {
            r.get("server.ip_rate")?;
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err(ConfigError::invalid("kafka.brokers", "must not be empty"));
        }
        if let Some(p) = self.kafka.create_topics_partitions {
            if p < 1 {
                return Err(ConfigError::invalid(
                    "kafka.create_topics_partitions",
                    "must be at least 1",
                ));
            }
        }
        check_properties("kafka", &self.kafka.properties)?;
        for alias in ["linger.ms", "queue.buffering.max.ms"] {
            if self.kafka.properties.contains_key(alias) {
                return Err(ConfigError::invalid(
                    format!("kafka.properties.\"{alias}\""),
                    "use kafka.linger_ms",
                ));
            }
        }
        let message_max_bytes = match self.kafka.properties.get("message.max.bytes") {
            None => DEFAULT_MESSAGE_MAX_BYTES,
            Some(PropertyValue::Text(v)) => v.trim().parse().map_err(|_| {
                ConfigError::invalid(
                    "kafka.properties.\"message.max.bytes\"",
                    format!("`{v}` is not a number of bytes"),
                )
            })?,
            Some(PropertyValue::Int(n)) => usize::try_from(*n).map_err(|_| {
                ConfigError::invalid(
                    "kafka.properties.\"message.max.bytes\"",
                    format!("`{n}` is not a number of bytes"),
                )
            })?,
            // From the environment or a file, resolved at start-up: not checked here; the
            // producer refuses an oversized record and the sender gets a 413.
            Some(_) => usize::MAX,
        };
        self.registry.url.get("registry.url")?;
        if self.sources.is_empty() {
            return Err(ConfigError::invalid(
                "sources",
                "must define at least one source",
            ));
        }
        let mut max_tolerance = 0;
        for (name, src) in &self.sources {
            validate_source(name, src)?;
            max_tolerance = max_tolerance.max(src.tolerance_secs);
            if src.max_body_bytes.saturating_add(RECORD_OVERHEAD_BYTES) > message_max_bytes {
                return Err(ConfigError::invalid(
                    format!("sources.{name}.max_body_bytes"),
                    format!(
                        "is {} bytes, but a record must fit the producer's message.max.bytes \
                         ({message_max_bytes}) with {RECORD_OVERHEAD_BYTES} bytes to spare for \
                         the envelope and headers: lower it, or raise \
                         kafka.properties.\"message.max.bytes\" (and the topic's \
                         max.message.bytes)",
                        src.max_body_bytes
                    ),
                ));
            }
            if src.max_body_bytes > s.max_buffered_body_bytes {
                return Err(ConfigError::invalid(
                    "server.max_buffered_body_bytes",
                    format!(
                        "must be at least sources.{name}.max_body_bytes ({}), or no such body \
                         could ever be read",
                        src.max_body_bytes
                    ),
                ));
            }
        }
        if self.replay.ttl_secs < max_tolerance.saturating_mul(2) {
            return Err(ConfigError::invalid(
                "replay.ttl_secs",
                format!(
                    "must be at least twice the largest sources.*.tolerance_secs ({} s), so a \
                     replay inside the signature window is always caught",
                    max_tolerance.saturating_mul(2)
                ),
            ));
        }
        Ok(())
    }
}

impl IngressConfig {
    /// Every duration and size within bounds that keep the arithmetic on them safe.
    fn validate_bounds(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        for (key, v, min) in [
            ("server.header_read_timeout_ms", s.header_read_timeout_ms, 1),
            ("server.body_timeout_ms", s.body_timeout_ms, 1),
            ("server.shutdown_timeout_ms", s.shutdown_timeout_ms, 0),
            ("server.shutdown_delay_ms", s.shutdown_delay_ms, 0),
            ("kafka.message_timeout_ms", self.kafka.message_timeout_ms, 1),
            ("registry.timeout_ms", self.registry.timeout_ms, 1),
            (
                "telemetry.liveness_timeout_ms",
                self.telemetry.liveness_timeout_ms,
                1,
            ),
        ] {
            duration_ms(key, v, min)?;
        }
        // librdkafka's own bound on linger.ms.
        bounded("kafka.linger_ms", self.kafka.linger_ms, 0, 900_000, "ms")?;
        bounded(
            "server.unavailable_retry_after_secs",
            s.unavailable_retry_after_secs,
            1,
            3_600,
            "s",
        )?;
        bounded(
            "replay.ttl_secs",
            self.replay.ttl_secs,
            1,
            366 * 86_400,
            "s",
        )?;
        bounded("replay.max_ids", self.replay.max_ids, 1, 1_000_000_000, "")?;
        bounded(
            "server.max_connections",
            s.max_connections as u64,
            1,
            1_000_000,
            "",
        )?;
        bounded(
            "server.max_buffered_body_bytes",
            s.max_buffered_body_bytes as u64,
            1,
            1 << 40,
            "bytes",
        )?;
        for (name, src) in &self.sources {
            let key = |k: &str| format!("sources.{name}.{k}");
            // Signatures are checked against `now ± tolerance` in signed seconds.
            bounded(&key("tolerance_secs"), src.tolerance_secs, 1, 86_400, "s")?;
            bounded(
                &key("max_body_bytes"),
                src.max_body_bytes as u64,
                1,
                1 << 30,
                "bytes",
            )?;
        }
        Ok(())
    }
}

fn validate_source(name: &str, src: &SourceConfig) -> Result<(), ConfigError> {
    let key = |k: &str| format!("sources.{name}.{k}");
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err(ConfigError::invalid(
            format!("sources.{name}"),
            "source names may only use a-z, 0-9, `-` and `_` (they are URL paths and metric labels)",
        ));
    }
    if src.secrets.is_empty() {
        return Err(ConfigError::invalid(
            key("secrets"),
            "must list at least one secret",
        ));
    }
    let hmac_only = [
        ("signature_header", src.signature_header.is_some()),
        ("signature_prefix", src.signature_prefix.is_some()),
        ("signature_encoding", src.signature_encoding.is_some()),
    ];
    if src.scheme == SchemeName::Hmac {
        if src
            .signature_header
            .as_deref()
            .is_none_or(|h| h.trim().is_empty())
        {
            return Err(ConfigError::invalid(
                key("signature_header"),
                "is required for scheme = \"hmac\"",
            ));
        }
        if src.delivery_id.is_none() {
            return Err(ConfigError::invalid(
                key("delivery_id"),
                "is required for scheme = \"hmac\": name the header or JSON Pointer that \
                 carries the sender's delivery id",
            ));
        }
    } else if let Some((k, _)) = hmac_only.iter().find(|(_, set)| *set) {
        return Err(ConfigError::invalid(
            key(k),
            "only applies to scheme = \"hmac\"",
        ));
    }
    if let Some(r) = &src.rate {
        r.get(&key("rate"))?;
    }
    if src.topic.trim().is_empty() {
        return Err(ConfigError::invalid(key("topic"), "must not be empty"));
    }
    let fields = [
        ("delivery_id", src.delivery_id.as_ref()),
        ("event_type", Some(&src.event_type)),
        ("subject", src.subject.as_ref()),
        ("time", src.time.as_ref()),
    ];
    for (k, field) in fields {
        match field {
            Some(FieldRef::Json { json }) if !json.starts_with('/') => {
                return Err(ConfigError::invalid(
                    key(k),
                    format!("`{json}` is not a JSON Pointer (it must start with `/`)"),
                ))
            }
            Some(FieldRef::Header { header }) if header.trim().is_empty() => {
                return Err(ConfigError::invalid(key(k), "header must not be empty"))
            }
            Some(FieldRef::Fixed(v)) if v.trim().is_empty() => {
                return Err(ConfigError::invalid(key(k), "must not be empty"))
            }
            Some(FieldRef::Fixed(_)) if k == "delivery_id" => {
                return Err(ConfigError::invalid(
                    key(k),
                    "must be { header = \"..\" } or { json = \"/..\" }: a fixed id would make \
                     every event a replay of the first",
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
