//! Hands accepted events to Kafka: encodes the Avro envelope (Confluent framing, through the
//! schema registry), sets the CloudEvents headers, produces with the idempotent `acks=all`
//! producer keyed by the event id, and waits for the delivery report. A request is answered
//! 2xx only when [`Producer::produce`] returned `Ok`, so every 2xx'd event is in Kafka.
//!
//! It also owns the producer's health: a background probe fetches metadata every second and
//! drives readiness and `spillway_ingress_kafka_up`; a fatal idempotence error makes the
//! service un-live, so the orchestrator replaces it with a fresh producer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::ClientContext;
use tokio_util::sync::CancellationToken;

use crate::codec::{CodecError, Envelope, EnvelopeEncoder};
use crate::config::ConfigError;
use crate::ingress::config::IngressConfig;
use crate::telemetry::{Health, IngressMetrics};

/// Header carrying the ingress receive time in unix milliseconds (the record timestamp is
/// set to the same instant), where end-to-end latency starts.
pub const RECEIVED_HEADER: &str = "spillway.received_ms";
/// Header with the sender's unsigned delivery id (e.g. `X-GitHub-Delivery`), for tracing:
/// such an id is not the event's identity (`ce_id`), a digest of the signed body is.
pub const DELIVERY_ID_HEADER: &str = "spillway.delivery_id";

/// Why an event could not be handed to Kafka.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The registry could not register or look up the envelope schema in time.
    #[error("schema registry unavailable: {0}")]
    RegistryUnavailable(String),
    /// The registry refused the envelope schema (e.g. an incompatible subject).
    #[error("schema registry rejected the envelope schema: {0}")]
    RegistryRejected(String),
    /// Kafka did not acknowledge the record (queue full, broker down, timed out).
    #[error("kafka did not acknowledge the record: {0}")]
    Kafka(KafkaError),
    /// The record is larger than the producer or the topic accepts: retrying cannot help.
    #[error("the record is too large for kafka: {0}")]
    TooLarge(KafkaError),
    /// No delivery report arrived within the bound.
    #[error("no delivery report within {0:?}")]
    Timeout(Duration),
}

impl ProduceError {
    /// Stable outcome code for metrics and the response.
    pub fn code(&self) -> &'static str {
        match self {
            ProduceError::RegistryUnavailable(_) => "registry_unavailable",
            ProduceError::RegistryRejected(_) => "registry_rejected",
            ProduceError::Kafka(_) | ProduceError::Timeout(_) => "kafka_unavailable",
            ProduceError::TooLarge(_) => "too_large",
        }
    }
}

/// Librdkafka callbacks: logs client errors (a fatal one is also seen by the health probe
/// through `fatal_error()`).
#[derive(Default)]
pub struct ProducerContext;

impl ClientContext for ProducerContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(rdkafka::types::RDKafkaErrorCode::Fatal)
        ) {
            tracing::error!(%error, reason, "fatal producer error: the service goes un-live");
        } else {
            tracing::warn!(%error, reason, "kafka client error");
        }
    }
}

/// A record librdkafka has taken, waiting for its delivery report.
pub struct Sent {
    delivery: rdkafka::producer::DeliveryFuture,
    start: Instant,
    /// The source's `spillway_ingress_produce_duration_seconds` series.
    duration: prometheus::Histogram,
}

/// The idempotent producer plus the envelope encoder.
pub struct Producer {
    producer: FutureProducer<ProducerContext>,
    encoder: EnvelopeEncoder,
    metrics: Arc<IngressMetrics>,
    report_bound: Duration,
    probe_topic: String,
}

impl Producer {
    /// Builds the producer and the encoder. Nothing is contacted yet.
    pub fn new(
        config: &IngressConfig,
        metrics: Arc<IngressMetrics>,
    ) -> Result<Producer, ConfigError> {
        let producer = crate::kafka::ingress_producer_config(&config.kafka)?
            .create_with_context(ProducerContext)
            .map_err(|e| ConfigError::Invalid {
                key: "kafka".into(),
                message: format!("cannot create the producer: {e}"),
            })?;
        let encoder = EnvelopeEncoder::new(
            config.registry.url.text(),
            Duration::from_millis(config.registry.timeout_ms),
        )
        .map_err(|e| ConfigError::Invalid {
            key: "registry.url".into(),
            message: e.to_string(),
        })?;
        Ok(Producer {
            producer,
            encoder,
            metrics,
            // librdkafka reports every record within message.timeout.ms; the margin only
            // guards against a report that never comes.
            report_bound: Duration::from_millis(config.kafka.message_timeout_ms)
                + Duration::from_secs(5),
            // One topic's metadata is enough to prove the cluster answers, and stays cheap on
            // clusters with many topics.
            probe_topic: config
                .sources
                .values()
                .next()
                .map(|s| s.topic.clone())
                .unwrap_or_default(),
        })
    }

    /// Encodes `event` and hands it to the producer for `topic`, keyed by its id. On `Ok`
    /// librdkafka holds its own copy, so the caller may free the event's text;
    /// [`Producer::acknowledged`] then waits for the delivery report.
    pub async fn send(
        &self,
        source: &str,
        topic: &str,
        event: &Envelope<'_>,
    ) -> Result<Sent, ProduceError> {
        let value = self
            .encoder
            .encode(topic, event)
            .await
            .map_err(|e| match e {
                CodecError::EncodeRejected(m) => ProduceError::RegistryRejected(m),
                other => {
                    // Whatever the registry client cached about this failure is dropped, so
                    // the next request asks the registry again instead of reusing it.
                    self.encoder.forget_errors();
                    ProduceError::RegistryUnavailable(other.to_string())
                }
            })?;
        let received = event.received_at_ms.unwrap_or_default();
        let received_text = received.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(9)
            .insert(Header {
                key: "ce_specversion",
                value: Some("1.0"),
            })
            .insert(Header {
                key: "ce_id",
                value: Some(event.id),
            })
            .insert(Header {
                key: "ce_source",
                value: Some(event.source),
            })
            .insert(Header {
                key: "ce_type",
                value: Some(event.event_type),
            });
        if let Some(time) = event.time {
            headers = headers.insert(Header {
                key: "ce_time",
                value: Some(time),
            });
        }
        if let Some(subject) = event.subject {
            headers = headers.insert(Header {
                key: "ce_subject",
                value: Some(subject),
            });
        }
        if let Some(delivery_id) = event.delivery_id {
            headers = headers.insert(Header {
                key: DELIVERY_ID_HEADER,
                value: Some(delivery_id),
            });
        }
        headers = headers
            .insert(Header {
                // Binary mode: the media type of the record value (Confluent-framed Avro), not
                // `application/cloudevents+avro`, which would announce structured mode.
                key: "content-type",
                value: Some("application/avro"),
            })
            .insert(Header {
                key: RECEIVED_HEADER,
                value: Some(&received_text),
            });
        let record = FutureRecord::to(topic)
            .key(event.id)
            .payload(&value)
            .headers(headers)
            .timestamp(received);
        let start = Instant::now();
        // `send_result` never waits: a full local queue is an immediate 503, not a stall.
        let delivery = self
            .producer
            .send_result(record)
            .map_err(|(e, _)| kafka_error(e))?;
        Ok(Sent {
            delivery,
            start,
            duration: self.metrics.produce_duration.with_label_values(&[source]),
        })
    }

    /// Waits for the delivery report of a [`Producer::send`]. `Ok` means Kafka acknowledged
    /// the record (`acks=all`).
    pub async fn acknowledged(&self, sent: Sent) -> Result<(), ProduceError> {
        let Sent {
            delivery,
            start,
            duration,
        } = sent;
        let result = match tokio::time::timeout(self.report_bound, delivery).await {
            Err(_) => Err(ProduceError::Timeout(self.report_bound)),
            Ok(Err(_canceled)) => Err(ProduceError::Kafka(KafkaError::Canceled)),
            Ok(Ok(Err((e, _)))) => Err(kafka_error(e)),
            Ok(Ok(Ok(_))) => Ok(()),
        };
        duration.observe(start.elapsed().as_secs_f64());
        result
    }

    /// Whether the producer hit a fatal (idempotence) error and must be replaced.
    pub fn is_fatal(&self) -> bool {
        self.producer.client().fatal_error().is_some()
    }

    /// Whether a metadata request to the cluster succeeds within `timeout` (blocking).
    fn reaches_kafka(&self, timeout: Duration) -> bool {
        self.producer
            .client()
            .fetch_metadata(Some(&self.probe_topic), timeout)
            .is_ok()
    }

    /// Waits for every queued record's delivery report, up to `timeout` (blocking).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}

/// Classifies a produce error: a record too large for the producer (`message.max.bytes`) or
/// the topic (`max.message.bytes`) is the sender's problem; anything else is Kafka's.
fn kafka_error(e: KafkaError) -> ProduceError {
    match e.rdkafka_error_code() {
        Some(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge) => ProduceError::TooLarge(e),
        _ => ProduceError::Kafka(e),
    }
}

/// Probes Kafka every second until `stop`: sets readiness (also gated by `serving`) and
/// `spillway_ingress_kafka_up`, and stamps liveness unless the producer is fatally broken.
pub async fn watch_health(
    producer: Arc<Producer>,
    health: Arc<Health>,
    serving: Arc<AtomicBool>,
    metrics: Arc<IngressMetrics>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let p = producer.clone();
        let up = tokio::task::spawn_blocking(move || p.reaches_kafka(Duration::from_secs(2)))
            .await
            .unwrap_or(false);
        let fatal = producer.is_fatal();
        if !fatal {
            health.progress();
        }
        metrics.kafka_up.set(i64::from(up));
        health.set_ready(up && !fatal && serving.load(Ordering::Relaxed));
    }
}
