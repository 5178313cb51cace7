//! The dead-letter queue writer.
//!
//! A DLQ record carries the original key, value and headers byte for byte, plus the Kafka
//! Connect error headers and Spillway's `dlq.*` headers (see `schemas/dlq.md`). A record only
//! counts as finished once the DLQ write was acknowledged; until then it is retried, so an
//! unavailable DLQ stalls the partition (visibly) instead of losing the record.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;

use crate::kafka::KafkaConfig;
use crate::processor::config::RetryConfig;
use crate::telemetry::Metrics;

/// Why a record is dead-lettered.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Stable error code (`dlq.reason`).
    pub reason: &'static str,
    /// Where it failed: `decode` or `step.<name>` (`__connect.errors.stage`).
    pub stage: String,
    /// Error type (`__connect.errors.exception.class.name`).
    pub class: &'static str,
    /// Detail (`__connect.errors.exception.message`); never secrets, prompts or payloads.
    pub message: String,
    /// Attempts made before giving up.
    pub attempts: u32,
    /// Unix milliseconds of the first and last failure.
    pub first_failure_ms: u64,
    /// See `first_failure_ms`.
    pub last_failure_ms: u64,
    /// The pipeline that took the record (`dlq.pipeline`), if one did.
    pub pipeline: Option<std::sync::Arc<str>>,
}

impl Failure {
    /// The failure, in `pipeline`.
    pub fn in_pipeline(mut self, pipeline: &std::sync::Arc<str>) -> Failure {
        self.pipeline = Some(pipeline.clone());
        self
    }
}

/// Writes failed records to the DLQ topic with an idempotent producer.
pub struct DlqWriter {
    producer: FutureProducer,
    topic: String,
    group: String,
    retry: RetryConfig,
    metrics: Arc<Metrics>,
    health: Arc<crate::telemetry::Health>,
}

impl DlqWriter {
    /// Creates the producer.
    pub fn new(
        kafka: &KafkaConfig,
        topic: &str,
        retry: RetryConfig,
        metrics: Arc<Metrics>,
        health: Arc<crate::telemetry::Health>,
    ) -> Result<Self, KafkaError> {
        let producer: FutureProducer = crate::kafka::producer_config(kafka)
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?
            .create()?;
        Ok(DlqWriter {
            producer,
            topic: topic.to_string(),
            group: kafka.group_id.clone(),
            retry,
            metrics,
            health,
        })
    }

    /// Writes `record` to the DLQ, retrying until Kafka acknowledges it; true once it has.
    /// Cancel by dropping the future (the record then stays unfinished and is redelivered).
    /// A fatal producer error ends the retries: health is marked failed, and the answer is
    /// false (the record stays unfinished).
    pub async fn write(&self, record: &OwnedMessage, failure: &Failure) -> bool {
        let mut headers = dlq_headers(record, failure, &self.group);
        let mut with_value = true;
        let mut attempt = 0u32;
        loop {
            let mut out: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(headers.clone());
            if let Some(k) = record.key() {
                out = out.key(k);
            }
            if let Some(v) = record.payload().filter(|_| with_value) {
                out = out.payload(v);
            }
            let sent = self.producer.send(out, Timeout::Never).await;
            let e = match sent {
                Ok(_) => {
                    self.metrics
                        .dlq_records
                        .with_label_values(&[failure.reason])
                        .inc();
                    return true;
                }
                Err((e, _)) => e,
            };
            self.metrics.dlq_write_errors.inc();
            if let Some(why) = crate::kafka::fatal_error(self.producer.client()) {
                self.health.set_fatal(&format!("DLQ producer: {why}"));
                return false;
            }
            if with_value && too_large(&e) {
                // Retrying the same bytes can never succeed and would stall the partition for
                // good. Dead-letter the record without its value instead: its coordinates
                // (`__connect.errors.*`) point at the original, which stays in the source topic.
                let size = record.payload().map_or(0, <[u8]>::len).to_string();
                headers = headers
                    .insert(Header {
                        key: "dlq.payload_dropped",
                        value: Some("message_size_too_large"),
                    })
                    .insert(Header {
                        key: "dlq.original_size",
                        value: Some(size.as_str()),
                    });
                with_value = false;
                tracing::warn!(
                    error = %e,
                    topic = %self.topic,
                    "dead letter too large for Kafka; writing it without its value"
                );
                continue;
            }
            attempt += 1;
            let delay = super::retry::backoff(attempt.min(16), &self.retry, None, &mut rand::rng())
                .max(Duration::from_millis(50));
            tracing::warn!(
                error = %e,
                attempt,
                topic = %self.topic,
                "DLQ write failed; the record stays unfinished and is retried"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// Waits for queued DLQ writes to be delivered.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "DLQ producer flush incomplete");
        }
    }
}

/// Whether Kafka refused a write because the record is too large (never retriable as is).
fn too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge)
    )
}

/// The original headers followed by the Connect and `dlq.*` headers.
pub fn dlq_headers(record: &OwnedMessage, f: &Failure, group: &str) -> OwnedHeaders {
    let mut h = OwnedHeaders::new();
    if let Some(orig) = record.headers() {
        for header in orig.iter() {
            h = h.insert(Header {
                key: header.key,
                value: header.value,
            });
        }
    }
    let partition = record.partition().to_string();
    let offset = record.offset().to_string();
    let attempts = f.attempts.to_string();
    let first = f.first_failure_ms.to_string();
    let last = f.last_failure_ms.to_string();
    let fields: [(&str, &str); 11] = [
        ("__connect.errors.topic", record.topic()),
        ("__connect.errors.partition", &partition),
        ("__connect.errors.offset", &offset),
        ("__connect.errors.stage", &f.stage),
        ("__connect.errors.exception.class.name", f.class),
        ("__connect.errors.exception.message", &f.message),
        ("dlq.reason", f.reason),
        ("dlq.attempts", &attempts),
        ("dlq.first_failure_ts", &first),
        ("dlq.last_failure_ts", &last),
        ("dlq.consumer_group", group),
    ];
    let pipeline = f.pipeline.as_deref().map(|p| ("dlq.pipeline", p));
    for (key, value) in fields.into_iter().chain(pipeline) {
        h = h.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Timestamp;

    #[test]
    fn dlq_headers_keep_originals_and_add_connect_and_dlq_fields() {
        let orig = OwnedHeaders::new().insert(Header {
            key: "ce_id",
            value: Some(&b"gh:1"[..]),
        });
        let rec = OwnedMessage::new(
            Some(b"v".to_vec()),
            Some(b"k".to_vec()),
            "orders".into(),
            Timestamp::NotAvailable,
            2,
            17,
            Some(orig),
        );
        let f = Failure {
            reason: "invalid_json",
            stage: "decode".into(),
            class: "spillway::codec::CodecError",
            message: "bad".into(),
            attempts: 1,
            first_failure_ms: 10,
            last_failure_ms: 20,
            pipeline: Some("comments".into()),
        };
        let h = dlq_headers(&rec, &f, "grp");
        let get = |k: &str| {
            h.iter()
                .find(|x| x.key == k)
                .and_then(|x| x.value)
                .map(|v| String::from_utf8(v.to_vec()).unwrap())
        };
        assert_eq!(get("ce_id").as_deref(), Some("gh:1"));
        assert_eq!(get("__connect.errors.topic").as_deref(), Some("orders"));
        assert_eq!(get("__connect.errors.partition").as_deref(), Some("2"));
        assert_eq!(get("__connect.errors.offset").as_deref(), Some("17"));
        assert_eq!(get("dlq.reason").as_deref(), Some("invalid_json"));
        assert_eq!(get("dlq.consumer_group").as_deref(), Some("grp"));
        assert_eq!(get("dlq.last_failure_ts").as_deref(), Some("20"));
        assert_eq!(get("dlq.pipeline").as_deref(), Some("comments"));
    }
}
