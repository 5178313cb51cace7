//! Record value decoding. The only module that knows Avro and the Confluent wire format.
//!
//! A value is either Confluent-framed Avro (magic byte `0x00`, a big-endian `i32` schema id,
//! then Avro binary, resolved through a schema registry) or plain JSON. Both become an
//! [`Event`]: CloudEvents-style attributes plus a JSON payload. Attributes come from the Avro
//! envelope (`schemas/event.avsc`) when the record uses it, else from the CloudEvents Kafka
//! headers (`ce_id`, `ce_source`, `ce_type`, `ce_time`), else from the record's coordinates.
//!
//! Every failure is typed and classified: a value that can never decode is deterministic
//! (it goes to the DLQ); an unreachable registry is transient (it is retried). Nothing panics.

use std::time::Duration;

use crate::config::{duration_ms, ConfigError};
use apache_avro::types::Value as AvroValue;
use rdkafka::message::{Headers, Message, OwnedMessage};
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use serde::Deserialize;
use serde::Serialize;
use serde_json::{Map, Value as Json};

/// Confluent wire-format magic byte.
pub const MAGIC_BYTE: u8 = 0;

/// A decoded event: CloudEvents-style attributes plus its payload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Source-namespaced delivery id; the idempotency key.
    pub id: String,
    /// Where the event came from, e.g. `/webhooks/github` or `kafka://orders`.
    pub source: String,
    /// Event type, e.g. `com.github.issue_comment`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// RFC 3339 time of the occurrence, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// The payload, shared (never copied) with the templates that read it lazily.
    pub data: std::sync::Arc<Json>,
}

/// Why a value could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The record has no value (a tombstone); there is nothing to process.
    #[error("record has no value (tombstone)")]
    Tombstone,
    /// Not JSON, and not Confluent-framed Avro either.
    #[error("value is not valid JSON: {0}")]
    InvalidJson(String),
    /// Avro expected but the value is shorter than the 5-byte Confluent header.
    #[error("value is {0} bytes, shorter than the 5-byte Confluent header")]
    Truncated(usize),
    /// Avro expected but the first byte is not the Confluent magic byte.
    #[error("first byte is {0:#04x}, not the Confluent magic byte 0x00")]
    BadMagicByte(u8),
    /// An Avro value arrived but no schema registry is configured.
    #[error("Avro value with schema id {0} but codec.schema_registry_url is not set")]
    NoRegistry(u32),
    /// The registry does not know the schema id.
    #[error("schema id {0} is unknown to the schema registry")]
    UnknownSchemaId(u32),
    /// The registry refused the lookup for another non-retriable reason.
    #[error("schema registry rejected schema id {id}: {message}")]
    RegistryRejected { id: u32, message: String },
    /// The registry could not be reached or failed transiently.
    #[error("schema registry unavailable: {0}")]
    RegistryUnavailable(String),
    /// The registry refused to register or resolve the envelope schema for encoding.
    #[error("schema registry refused the envelope schema: {0}")]
    EncodeRejected(String),
    /// The Avro binary does not match its schema.
    #[error("Avro value does not match schema id {id}: {message}")]
    AvroInvalid { id: u32, message: String },
}

impl CodecError {
    /// Stable, low-cardinality code for metrics and DLQ headers.
    pub fn error_code(&self) -> &'static str {
        match self {
            CodecError::Tombstone => "tombstone",
            CodecError::InvalidJson(_) => "invalid_json",
            CodecError::Truncated(_) => "avro_truncated",
            CodecError::BadMagicByte(_) => "avro_bad_magic_byte",
            CodecError::NoRegistry(_) => "avro_without_registry",
            CodecError::UnknownSchemaId(_) => "unknown_schema_id",
            CodecError::RegistryRejected { .. } => "schema_registry_rejected",
            CodecError::RegistryUnavailable(_) => "schema_registry_unavailable",
            CodecError::EncodeRejected(_) => "schema_registry_encode_rejected",
            CodecError::AvroInvalid { .. } => "avro_invalid",
        }
    }

    /// Transient errors may succeed on retry; all others never will.
    pub fn is_transient(&self) -> bool {
        matches!(self, CodecError::RegistryUnavailable(_))
    }
}

/// Decodes record values into [`Event`]s.
pub struct Codec {
    format: CodecFormat,
    avro: Option<AvroDecoder>,
}

impl Codec {
    /// Builds a codec; the registry client is only created when a URL is configured.
    pub fn new(config: &CodecConfig) -> Result<Codec, CodecError> {
        let avro = match &config.schema_registry_url {
            Some(url) => {
                let settings = SrSettings::new_builder(url.clone())
                    .set_timeout(Duration::from_millis(config.schema_registry_timeout_ms))
                    .build()
                    .map_err(|e| CodecError::RegistryUnavailable(e.error.clone()))?;
                Some(AvroDecoder::new(settings))
            }
            None => None,
        };
        Ok(Codec {
            format: config.format,
            avro,
        })
    }

    /// Decodes one record.
    pub async fn decode(&self, record: &OwnedMessage) -> Result<Event, CodecError> {
        let bytes = record.payload().ok_or(CodecError::Tombstone)?;
        let is_avro = match self.format {
            CodecFormat::Json => false,
            CodecFormat::Avro => true,
            CodecFormat::Auto => bytes.first() == Some(&MAGIC_BYTE),
        };
        if is_avro {
            let value = self.decode_avro(bytes).await?;
            Ok(event_from_avro(value, record))
        } else {
            let data: Json = serde_json::from_slice(bytes)
                .map_err(|e| CodecError::InvalidJson(e.to_string()))?;
            Ok(event_from_headers(data, record))
        }
    }

    async fn decode_avro(&self, bytes: &[u8]) -> Result<AvroValue, CodecError> {
        let id = schema_id(bytes)?;
        let decoder = self.avro.as_ref().ok_or(CodecError::NoRegistry(id))?;
        // Resolve the schema first, so registry failures are told apart from bad data.
        if let Err(e) = decoder.get_schema(id).await {
            let text = format!("{} {}", e.error, e.cause.as_deref().unwrap_or(""));
            return Err(if e.retriable {
                CodecError::RegistryUnavailable(e.error)
            } else if text.contains("404") {
                CodecError::UnknownSchemaId(id)
            } else if text.contains("status 4") {
                CodecError::RegistryRejected {
                    id,
                    message: e.error,
                }
            } else {
                // Connection refused, timeouts and 5xx other than 502/503.
                CodecError::RegistryUnavailable(e.error)
            });
        }
        decoder
            .decode(Some(bytes))
            .await
            .map(|r| r.value)
            .map_err(|e| CodecError::AvroInvalid {
                id,
                message: e.error,
            })
    }
}

/// The Avro envelope, `schemas/event.avsc`.
pub const ENVELOPE_SCHEMA: &str = include_str!("../schemas/event.avsc");

/// One event as ingress writes it: the envelope's attributes and the sender's exact JSON.
#[derive(Debug, Clone)]
pub struct Envelope<'a> {
    /// Source-namespaced delivery id (also the record key and `ce_id`).
    pub id: &'a str,
    /// E.g. `/webhooks/github`.
    pub source: &'a str,
    /// Event type.
    pub event_type: &'a str,
    /// RFC 3339 occurrence time, if the sender gave one.
    pub time: Option<&'a str>,
    /// Optional subject within the source.
    pub subject: Option<&'a str>,
    /// The sender's own delivery id, when it is not the event's identity (it is not signed):
    /// kept in the `spillway.delivery_id` header for tracing.
    pub delivery_id: Option<&'a str>,
    /// When ingress received the request, in unix milliseconds.
    pub received_at_ms: Option<i64>,
    /// The payload, as the sender's exact JSON text.
    pub data: &'a str,
}

/// Encodes [`Envelope`]s as Confluent-framed Avro, registering `schemas/event.avsc` under
/// `<topic>-value` (TopicNameStrategy). The schema id is cached per topic after the first
/// success, so a registry outage only fails encodes for topics never encoded before.
pub struct EnvelopeEncoder {
    encoder: AvroEncoder,
}

impl EnvelopeEncoder {
    /// An encoder against the registry at `url`.
    pub fn new(url: &str, timeout: Duration) -> Result<EnvelopeEncoder, CodecError> {
        Ok(EnvelopeEncoder {
            encoder: avro_encoder(url, timeout)?,
        })
    }

    /// Drops registry failures the client cached, so the next encode asks the registry again.
    pub fn forget_errors(&self) {
        self.encoder.remove_errors_from_cache();
    }

    /// Encodes one event for `topic`. The envelope is serialized straight against the
    /// registered schema (no intermediate Avro `Value` tree, no copies of the payload): this
    /// runs once per accepted webhook.
    pub async fn encode(&self, topic: &str, e: &Envelope<'_>) -> Result<Vec<u8>, CodecError> {
        /// `schemas/event.avsc`, field for field.
        #[derive(Serialize)]
        struct Wire<'a> {
            specversion: &'static str,
            id: &'a str,
            source: &'a str,
            #[serde(rename = "type")]
            event_type: &'a str,
            time: Option<&'a str>,
            subject: Option<&'a str>,
            datacontenttype: &'static str,
            received_at: Option<i64>,
            data: &'a str,
        }
        let wire = Wire {
            specversion: "1.0",
            id: e.id,
            source: e.source,
            event_type: e.event_type,
            time: e.time,
            subject: e.subject,
            datacontenttype: "application/json",
            received_at: e.received_at_ms,
            data: e.data,
        };
        let strategy = strategy(topic, "io.spillway.Event", ENVELOPE_SCHEMA);
        self.encoder
            .encode_struct(wire, &strategy)
            .await
            .map_err(classify_encode_error)
    }
}

/// A registry-backed Avro encoder against the registry at `url`.
fn avro_encoder(url: &str, timeout: Duration) -> Result<AvroEncoder, CodecError> {
    let settings = SrSettings::new_builder(url.to_string())
        .set_timeout(timeout)
        .build()
        .map_err(|e| CodecError::RegistryUnavailable(e.error.clone()))?;
    Ok(AvroEncoder::new(settings))
}

/// Encodes `fields` as Confluent-framed Avro of `schema`, registered under `<topic>-value`.
async fn encode_record(
    encoder: &AvroEncoder,
    topic: &str,
    name: &str,
    schema: &str,
    fields: Vec<(&'static str, AvroValue)>,
) -> Result<Vec<u8>, CodecError> {
    encoder
        .encode(fields, strategy(topic, name, schema))
        .await
        .map_err(classify_encode_error)
}

/// TopicNameStrategy (`<topic>-value`) with `schema` supplied for registration.
fn strategy(topic: &str, name: &str, schema: &str) -> SubjectNameStrategy {
    SubjectNameStrategy::TopicNameStrategyWithSchema(
        topic.to_string(),
        false,
        SuppliedSchema::new(Some(name.into()), SchemaType::Avro, schema.to_string()),
    )
}

/// A registry that answered 4xx rejected the schema; anything else is the registry being
/// unavailable.
fn classify_encode_error(e: schema_registry_converter::error::SRCError) -> CodecError {
    let text = format!("{} {}", e.error, e.cause.as_deref().unwrap_or(""));
    if !e.retriable && text.contains("status 4") {
        CodecError::EncodeRejected(e.error)
    } else {
        CodecError::RegistryUnavailable(e.error)
    }
}

/// The Avro result record, `schemas/result.avsc`.
pub const RESULT_SCHEMA: &str = include_str!("../schemas/result.avsc");

/// One event's result as the Kafka result-topic sink writes it.
#[derive(Debug, Clone, Serialize)]
pub struct ResultRecord<'a> {
    /// `<source>|<id>`; also the record key.
    pub dedup_key: &'a str,
    /// The event.
    #[serde(flatten)]
    pub event: &'a Event,
    /// Where the event was read from.
    pub input_topic: &'a str,
    /// Its partition.
    pub input_partition: i32,
    /// Its offset.
    pub input_offset: i64,
    /// When the sink ran, in unix milliseconds.
    pub processed_at: i64,
    /// Earlier steps' outputs, by step name.
    pub outputs: &'a Map<String, Json>,
}

/// Encodes [`ResultRecord`]s as Confluent-framed Avro of `schemas/result.avsc` (subject
/// `<topic>-value`), with the same schema-id caching as [`EnvelopeEncoder`].
pub struct ResultEncoder {
    encoder: AvroEncoder,
}

impl ResultEncoder {
    /// An encoder against the registry at `url`.
    pub fn new(url: &str, timeout: Duration) -> Result<ResultEncoder, CodecError> {
        Ok(ResultEncoder {
            encoder: avro_encoder(url, timeout)?,
        })
    }

    /// Encodes one result for `topic`.
    pub async fn encode(&self, topic: &str, r: &ResultRecord<'_>) -> Result<Vec<u8>, CodecError> {
        let fields = vec![
            ("dedup_key", AvroValue::String(r.dedup_key.to_string())),
            ("id", AvroValue::String(r.event.id.clone())),
            ("source", AvroValue::String(r.event.source.clone())),
            ("type", AvroValue::String(r.event.event_type.clone())),
            ("input_topic", AvroValue::String(r.input_topic.to_string())),
            ("input_partition", AvroValue::Int(r.input_partition)),
            ("input_offset", AvroValue::Long(r.input_offset)),
            ("processed_at", AvroValue::TimestampMillis(r.processed_at)),
            (
                "outputs",
                AvroValue::String(Json::Object(r.outputs.clone()).to_string()),
            ),
            ("data", AvroValue::String(r.event.data.to_string())),
        ];
        encode_record(
            &self.encoder,
            topic,
            "io.spillway.Result",
            RESULT_SCHEMA,
            fields,
        )
        .await
    }
}

/// The proleptic Gregorian date (year, month, day) of a day number (days since 1970-01-01),
/// after Howard Hinnant's `civil_from_days`.
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// RFC 3339 text (UTC, millisecond precision) of a unix time in milliseconds, e.g.
/// `2026-12-04T17:03:09.123Z`: the CloudEvents `time` of an event whose sender gave none.
pub fn rfc3339_millis(unix_ms: i64) -> String {
    let (days, ms) = (
        unix_ms.div_euclid(86_400_000),
        unix_ms.rem_euclid(86_400_000),
    );
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1_000 % 60,
        ms % 1_000
    )
}

/// Decodes a Confluent-framed value against a writer schema already in hand, the way the
/// registry path does once it has resolved the frame's schema id: the frame, then the Avro
/// datum, then the event. For schemas without references; used where no registry is (tests,
/// fuzzing).
pub fn decode_framed(
    bytes: &[u8],
    schema: &apache_avro::Schema,
    record: &OwnedMessage,
) -> Result<Event, CodecError> {
    let id = schema_id(bytes)?;
    let mut datum = &bytes[5..];
    let invalid = |e: apache_avro::Error| CodecError::AvroInvalid {
        id,
        message: e.to_string(),
    };
    let value = apache_avro::reader::datum::GenericDatumReader::builder(schema)
        .build()
        .and_then(|reader| reader.read_value(&mut datum))
        .map_err(invalid)?;
    Ok(event_from_avro(value, record))
}

/// Reads the schema id of a Confluent-framed value.
pub fn schema_id(bytes: &[u8]) -> Result<u32, CodecError> {
    if bytes.len() < 5 {
        return Err(CodecError::Truncated(bytes.len()));
    }
    if bytes[0] != MAGIC_BYTE {
        return Err(CodecError::BadMagicByte(bytes[0]));
    }
    Ok(u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]))
}

/// Returns the value of a header as UTF-8, if present.
pub fn header_str<'a>(record: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    let headers = record.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

fn default_id(record: &OwnedMessage) -> String {
    format!(
        "{}/{}/{}",
        record.topic(),
        record.partition(),
        record.offset()
    )
}

fn event_from_headers(data: Json, record: &OwnedMessage) -> Event {
    Event {
        id: header_str(record, "ce_id")
            .map(str::to_string)
            .unwrap_or_else(|| default_id(record)),
        source: header_str(record, "ce_source")
            .map(str::to_string)
            .unwrap_or_else(|| format!("kafka://{}", record.topic())),
        event_type: header_str(record, "ce_type")
            .unwrap_or("spillway.record")
            .to_string(),
        time: header_str(record, "ce_time").map(str::to_string),
        data: std::sync::Arc::new(data),
    }
}

/// An Avro record using the Spillway envelope gives its attributes directly; any other Avro
/// value (an upstream topic's own schema) becomes the payload, with attributes from headers.
fn event_from_avro(value: AvroValue, record: &OwnedMessage) -> Event {
    if let AvroValue::Record(fields) = &value {
        let get = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| match v {
                    AvroValue::Union(_, inner) => inner.as_ref(),
                    other => other,
                })
        };
        let string = |name: &str| match get(name) {
            Some(AvroValue::String(s)) => Some(s.clone()),
            _ => None,
        };
        if let (Some(id), Some(source), Some(event_type), Some(data)) = (
            string("id"),
            string("source"),
            string("type"),
            string("data"),
        ) {
            let data = serde_json::from_str(&data).unwrap_or(Json::String(data));
            return Event {
                id,
                source,
                event_type,
                time: string("time"),
                data: std::sync::Arc::new(data),
            };
        }
    }
    let data = Json::try_from(value).unwrap_or(Json::Null);
    event_from_headers(data, record)
}

// ---- Configuration: `[codec]` ----

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

fn default_codec_format() -> CodecFormat {
    CodecFormat::Auto
}

fn default_registry_timeout_ms() -> u64 {
    5_000
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

impl CodecConfig {
    /// The `[codec]` section's rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        duration_ms(
            "codec.schema_registry_timeout_ms",
            self.schema_registry_timeout_ms,
            1,
        )?;
        if self.format == CodecFormat::Avro && self.schema_registry_url.is_none() {
            return Err(ConfigError::invalid(
                "codec.schema_registry_url",
                "is required when codec.format = \"avro\"",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, Timestamp};

    #[test]
    fn rfc3339_millis_formats_utc_dates_across_leap_years_and_eras() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_796_058_189_123),
            "2026-11-30T17:03:09.123Z"
        );
        assert_eq!(
            rfc3339_millis(4_107_542_399_999),
            "2100-02-28T23:59:59.999Z"
        );
        assert_eq!(rfc3339_millis(-1), "1969-12-31T23:59:59.999Z");
    }

    fn record(payload: Option<&[u8]>, headers: &[(&str, &str)]) -> OwnedMessage {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        OwnedMessage::new(
            payload.map(|p| p.to_vec()),
            Some(b"k".to_vec()),
            "orders".into(),
            Timestamp::NotAvailable,
            3,
            42,
            Some(h),
        )
    }

    fn json_codec() -> Codec {
        Codec::new(&CodecConfig::default()).unwrap()
    }

    #[tokio::test]
    async fn json_value_takes_attributes_from_cloudevents_headers() {
        let r = record(
            Some(br#"{"text":"hi"}"#),
            &[("ce_id", "gh:1"), ("ce_source", "/webhooks/github")],
        );
        let e = json_codec().decode(&r).await.unwrap();
        assert_eq!(e.id, "gh:1");
        assert_eq!(e.source, "/webhooks/github");
        assert_eq!(e.data["text"], "hi");
    }

    #[tokio::test]
    async fn json_value_without_headers_gets_coordinates_as_id() {
        let e = json_codec()
            .decode(&record(Some(b"[1,2]"), &[]))
            .await
            .unwrap();
        assert_eq!(e.id, "orders/3/42");
        assert_eq!(e.source, "kafka://orders");
    }

    #[tokio::test]
    async fn garbage_is_a_deterministic_invalid_json_error() {
        let err = json_codec()
            .decode(&record(Some(b"\xff\xfe not json"), &[]))
            .await
            .unwrap_err();
        assert_eq!(err.error_code(), "invalid_json");
        assert!(!err.is_transient());
    }

    #[tokio::test]
    async fn avro_without_registry_is_deterministic() {
        let err = json_codec()
            .decode(&record(Some(&[0, 0, 0, 0, 7, 2, 4]), &[]))
            .await
            .unwrap_err();
        assert_eq!(err.error_code(), "avro_without_registry");
        assert!(!err.is_transient());
    }

    #[tokio::test]
    async fn short_avro_frame_is_truncated_not_a_panic() {
        let cfg = CodecConfig {
            format: CodecFormat::Avro,
            ..CodecConfig::default()
        };
        let codec = Codec::new(&cfg).unwrap();
        for bytes in [&b""[..], &[0][..], &[0, 0, 0][..]] {
            let err = codec.decode(&record(Some(bytes), &[])).await.unwrap_err();
            assert_eq!(err.error_code(), "avro_truncated");
        }
        let err = codec
            .decode(&record(Some(&[1, 0, 0, 0, 1, 0]), &[]))
            .await
            .unwrap_err();
        assert_eq!(err.error_code(), "avro_bad_magic_byte");
    }

    #[tokio::test]
    async fn tombstone_is_reported() {
        let err = json_codec().decode(&record(None, &[])).await.unwrap_err();
        assert_eq!(err.error_code(), "tombstone");
    }

    #[test]
    fn schema_id_reads_big_endian() {
        assert_eq!(schema_id(&[0, 0, 0, 1, 2, 9]).unwrap(), 258);
    }
}
