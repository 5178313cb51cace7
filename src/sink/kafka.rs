//! The Kafka result-topic sink: one result record per event (`schemas/result.avsc`, keyed by
//! the dedup key).
//!
//! - **Transactional** (default). The step only renders the record and hands it to the worker
//!   (`StepOutput::staged`); the worker commits it in one Kafka transaction with the entry that marks
//!   the step finished ([`crate::journal::Journal::write_atomic`]). A crash before the commit
//!   leaves nothing visible to `read_committed` readers and the event runs the step again; a
//!   crash after it leaves a journal entry that makes the redelivery skip the step. Either
//!   way a `read_committed` consumer of the result topic sees one result per dedup key.
//! - **`transactional = false`**, for brokers without transactions. The step produces the
//!   record itself (idempotent, `acks=all`) and finishes once Kafka acknowledged it. A crash
//!   between the ack and the journal entry repeats the record once, with the same key and
//!   `ce_id`; a compacted result topic or a consumer keyed on `ce_id` drops it.

use std::time::Duration;

use crate::codec::{CodecError, ResultEncoder, ResultRecord};
use crate::config::ConfigError;
use crate::codec::CodecConfig;
use crate::step::{Attempt, BoxFuture, EventContext, OutRecord, Step, StepError, StepOutput};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::producer::Producer;
use serde::Deserialize;
use std::sync::Arc;
use crate::config::{default_true, Config};
use crate::pipeline::{Assembly, StepKind};
use crate::template::{Escape, Templates};

/// Where a result goes.
enum Topic {
    /// Always this topic.
    Fixed(String),
    /// A template rendered per event, checked against the allow-list.
    Template {
        template: Box<Templates>,
        allowed: Vec<String>,
    },
}

/// Renders each event's result for the result topic.
pub struct KafkaSink {
    name: String,
    topic: Topic,
    encoder: Option<ResultEncoder>,
    /// The producer of the non-transactional mode.
    direct: Option<FutureProducer>,
}

impl KafkaSink {
    /// Builds the sink; Avro needs the codec's schema registry.
    pub fn new(
        config: &KafkaSinkConfig,
        codec: &CodecConfig,
        kafka: &crate::kafka::KafkaConfig,
    ) -> Result<Self, ConfigError> {
        let encoder = match config.format {
            ResultFormat::Json => None,
            ResultFormat::Avro => {
                let url = codec.schema_registry_url.as_deref().ok_or_else(|| {
                    ConfigError::invalid(
                        format!("steps.{}.format", config.name),
                        "\"avro\" needs codec.schema_registry_url",
                    )
                })?;
                Some(
                    ResultEncoder::new(
                        url,
                        Duration::from_millis(codec.schema_registry_timeout_ms),
                    )
                    .map_err(|e| {
                        ConfigError::invalid("codec.schema_registry_url", e.to_string())
                    })?,
                )
            }
        };
        let direct = if config.transactional {
            None
        } else {
            Some(
                crate::kafka::producer_config(kafka)?
                    .create()
                    .map_err(|e| {
                        ConfigError::invalid(format!("steps.{}", config.name), e.to_string())
                    })?,
            )
        };
        let topic = if config.topics.is_empty() {
            Topic::Fixed(config.topic.clone())
        } else {
            Topic::Template {
                template: Box::new(Templates::new(
                    &config.name,
                    &[("topic", &config.topic)],
                    Escape::None,
                )?),
                allowed: config.topics.clone(),
            }
        };
        Ok(KafkaSink {
            name: config.name.clone(),
            topic,
            encoder,
            direct,
        })
    }

    /// The topic of this event's result.
    fn topic_for(&self, ctx: &EventContext) -> Result<&str, StepError> {
        let (template, allowed) = match &self.topic {
            Topic::Fixed(topic) => return Ok(topic),
            Topic::Template { template, allowed } => (template, allowed),
        };
        let rendered = template.render("topic", ctx).map_err(|e| {
            StepError::deterministic("kafka_topic_template", format!("steps.{}.{e}", self.name))
        })?;
        let rendered = rendered.trim();
        match allowed.iter().find(|t| *t == rendered) {
            Some(topic) => Ok(topic),
            // The rendered text may be model output: it stays out of the DLQ headers.
            None => Err(StepError::deterministic(
                "kafka_topic_not_allowed",
                format!(
                    "steps.{}: the templated topic rendered to a topic outside steps.{}.topics ({})",
                    self.name,
                    self.name,
                    allowed.join(", ")
                ),
            )),
        }
    }

    async fn stage(&self, ctx: &EventContext) -> Result<StepOutput, StepError> {
        let topic = self.topic_for(ctx)?;
        let result = ResultRecord {
            dedup_key: &ctx.dedup_key,
            event: &ctx.event,
            input_topic: ctx.record.topic(),
            input_partition: ctx.record.partition(),
            input_offset: ctx.record.offset(),
            processed_at: crate::telemetry::now_ms() as i64,
            outputs: &ctx.outputs,
        };
        let (payload, content_type) = match &self.encoder {
            None => (
                serde_json::to_vec(&result).map_err(|e| {
                    StepError::deterministic("result_encode", format!("cannot serialize: {e}"))
                })?,
                "application/json",
            ),
            Some(encoder) => (
                encoder
                    .encode(topic, &result)
                    .await
                    .map_err(|e| match e {
                        CodecError::RegistryUnavailable(_) => {
                            StepError::transient("registry_unavailable", e.to_string())
                        }
                        other => StepError::deterministic("result_encode", other.to_string()),
                    })?,
                "application/avro",
            ),
        };
        let headers = vec![
            ("ce_id".to_string(), ctx.dedup_key.clone().into_bytes()),
            (
                "ce_source".to_string(),
                ctx.event.source.clone().into_bytes(),
            ),
            (
                "ce_type".to_string(),
                ctx.event.event_type.clone().into_bytes(),
            ),
            ("ce_specversion".to_string(), b"1.0".to_vec()),
            ("content-type".to_string(), content_type.as_bytes().to_vec()),
        ];
        let record = OutRecord {
            topic: topic.to_string(),
            partition: None,
            key: ctx.dedup_key.clone(),
            payload,
            headers,
        };
        let mut output = StepOutput::value(serde_json::json!({ "topic": topic }));
        match &self.direct {
            None => output.staged.push(record),
            Some(producer) => Self::produce(producer, &record).await?,
        }
        Ok(output)
    }
}

impl KafkaSink {
    /// Produces `r` and waits for Kafka's acknowledgement (non-transactional mode).
    async fn produce(producer: &FutureProducer, r: &OutRecord) -> Result<(), StepError> {
        producer
            .send(r.to_future_record(), Duration::from_secs(0))
            .await
            .map(|_| ())
            .map_err(
                |(e, _)| match crate::kafka::fatal_error(producer.client()) {
                    // Lost idempotence state: every later record would be refused too.
                    Some(why) => StepError::fatal("kafka_producer_fatal", why),
                    None => StepError::transient("kafka_produce", e.to_string()),
                },
            )
    }
}

impl Step for KafkaSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn run<'a>(
        &'a self,
        ctx: &'a EventContext,
        _attempt: Attempt,
    ) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(self.stage(ctx))
    }

    fn stages_records(&self) -> bool {
        self.direct.is_none()
    }

    fn output_topics(&self) -> Vec<String> {
        match &self.topic {
            Topic::Fixed(topic) => vec![topic.clone()],
            Topic::Template { allowed, .. } => allowed.clone(),
        }
    }
}

// ---- Configuration: `[[steps]] type = "kafka"` ----

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
    /// The result topic. Records are keyed by the dedup key. It may be a template over
    /// `event`, `data` and `outputs` (e.g. `tickets.{{ outputs.route.route }}`, to route by the
    /// LLM's answer); the rendered topic must then be one of `topics`.
    pub topic: String,
    /// With a templated `topic`: the topics it may render to (the allow-list). A rendered
    /// topic outside it dead-letters the event as `kafka_topic_not_allowed`.
    #[serde(default)]
    pub topics: Vec<String>,
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

fn default_kafka_sink_name() -> String {
    "kafka".to_string()
}

fn default_result_format() -> ResultFormat {
    ResultFormat::Avro
}

impl StepKind for KafkaSinkConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, at: &str, config: &Config) -> Result<(), ConfigError> {
        let c = self;
        if c.transactional && config.journal.is_none() {
            return Err(ConfigError::invalid(
                at.to_string(),
                "the kafka sink writes its result and the journal entry in one transaction; \
                 configure [journal] (or set transactional = false for at-least-once)",
            ));
        }
        let journal_topic = config.journal.as_ref().map(|j| j.topic.as_str());
        let templated = c.topic.contains("{{") || c.topic.contains("{%");
        let (key, targets) = if templated {
            if c.topics.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{at}.topics"),
                    "must list the topics the templated topic may render to",
                ));
            }
            Templates::new(&c.name, &[("topic", &c.topic)], Escape::None)?;
            (format!("{at}.topics"), c.topics.as_slice())
        } else {
            if !c.topics.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{at}.topics"),
                    "applies only to a templated topic (one with {{ }})",
                ));
            }
            (format!("{at}.topic"), std::slice::from_ref(&c.topic))
        };
        if targets.iter().any(|t| {
            t.trim().is_empty()
                || config.kafka.topics.contains(t)
                || *t == config.dlq.topic
                || Some(t.as_str()) == journal_topic
        }) {
            return Err(ConfigError::invalid(
                key,
                "must be set and differ from the input, DLQ and journal topics",
            ));
        }
        if c.format == ResultFormat::Avro && config.codec.schema_registry_url.is_none() {
            return Err(ConfigError::invalid(
                format!("{at}.format"),
                "\"avro\" needs codec.schema_registry_url (or set format = \"json\")",
            ));
        }
        Ok(())
    }

    fn build(&self, cx: &Assembly<'_>) -> Result<Arc<dyn Step>, ConfigError> {
        Ok(Arc::new(KafkaSink::new(
            self,
            &cx.config.codec,
            &cx.config.kafka,
        )?))
    }
}
