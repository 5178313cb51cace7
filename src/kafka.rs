//! Kafka client construction: the one place that turns [`KafkaConfig`] into librdkafka
//! properties, for consumers, producers and the admin client.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use std::collections::BTreeMap;

use crate::config::ingress::ProducerConfig;
use crate::config::{
    ConfigError, GroupProtocol, JournalConfig, KafkaConfig, ProcessorConfig, PropertyValue,
    DEFAULT_ASSIGNMENT_STRATEGY,
};

/// Properties common to every client: brokers plus the pass-through properties, with
/// secrets resolved from the environment or files.
pub fn base_config(k: &KafkaConfig) -> Result<ClientConfig, ConfigError> {
    client_config(&k.brokers, &k.properties)
}

/// Properties common to every client, from the brokers and the pass-through `properties`
/// (the `kafka.properties` table of either service's config).
pub fn client_config(
    brokers: &str,
    properties: &BTreeMap<String, PropertyValue>,
) -> Result<ClientConfig, ConfigError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    // Warnings and errors only: commit failures (COMMITFAIL) and broker trouble are warnings.
    c.set("log_level", "4");
    for (key, value) in properties {
        c.set(key, value.resolve(&format!("kafka.properties.\"{key}\""))?);
    }
    Ok(c)
}

/// Consumer-group member properties. Offsets are *stored* by Spillway only (the finished
/// watermark); librdkafka commits stored offsets every `commit_interval_ms` and retries a
/// failed commit on the next interval, and commits revoked partitions' stored offsets when it
/// unassigns them. Shutdown also commits synchronously.
pub fn consumer_config(k: &KafkaConfig, p: &ProcessorConfig) -> Result<ClientConfig, ConfigError> {
    let mut c = base_config(k)?;
    c.set("group.id", &k.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", p.commit_interval_ms.to_string())
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", &k.auto_offset_reset)
        .set("max.poll.interval.ms", k.max_poll_interval_ms.to_string())
        .set(
            "statistics.interval.ms",
            k.statistics_interval_ms.to_string(),
        );
    match k.group_protocol {
        GroupProtocol::Classic => {
            c.set("group.protocol", "classic")
                .set("session.timeout.ms", k.session_timeout_ms.to_string())
                .set(
                    "partition.assignment.strategy",
                    k.partition_assignment_strategy
                        .as_deref()
                        .unwrap_or(DEFAULT_ASSIGNMENT_STRATEGY),
                );
        }
        // KIP-848: librdkafka refuses session.timeout.ms and the assignor here (the broker
        // owns both).
        GroupProtocol::Consumer => {
            c.set("group.protocol", "consumer");
        }
    }
    if let Some(id) = &k.group_instance_id {
        c.set("group.instance.id", id.trim());
    }
    // Keep the prefetch queue modest unless the user tuned it: buffered records are bounded by
    // the scheduler, and this bounds what librdkafka holds underneath it.
    if !k.properties.contains_key("queued.max.messages.kbytes") {
        c.set("queued.max.messages.kbytes", "16384");
    }
    Ok(c)
}

/// Idempotent producer properties (`acks=all`, bounded delivery timeout).
pub fn producer_config(k: &KafkaConfig) -> Result<ClientConfig, ConfigError> {
    let mut c = base_config(k)?;
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", k.message_timeout_ms.to_string());
    if !k.properties.contains_key("linger.ms") {
        c.set("linger.ms", "5");
    }
    Ok(c)
}

/// A transactional producer (the result-topic sink and its journal entries); the caller sets
/// `transactional.id`. `transaction.timeout.ms` is at least the delivery timeout, as
/// librdkafka requires.
pub fn transactional_producer_config(k: &KafkaConfig) -> Result<ClientConfig, ConfigError> {
    let mut c = producer_config(k)?;
    c.set(
        "transaction.timeout.ms",
        k.message_timeout_ms.max(60_000).to_string(),
    );
    Ok(c)
}

/// The ingress producer: idempotent, `acks=all`, every delivery report within
/// `message_timeout_ms`, batching for at most `linger_ms` (it adds to each response).
pub fn ingress_producer_config(k: &ProducerConfig) -> Result<ClientConfig, ConfigError> {
    let mut c = client_config(&k.brokers, &k.properties)?;
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", k.message_timeout_ms.to_string())
        .set("linger.ms", k.linger_ms.to_string());
    Ok(c)
}

/// The fatal error `producer` raised, if any: after it the producer refuses every record,
/// and retrying can never succeed (librdkafka's idempotence guarantee is gone).
pub fn fatal_error<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
) -> Option<String> {
    client
        .fatal_error()
        .map(|(code, reason)| format!("{code:?}: {reason}"))
}

/// Raises a fatal error on `producer`, as librdkafka would on lost idempotence state
/// (`SPILLWAY_FAULT=...:fatal`; tests only).
#[cfg(feature = "fault-injection")]
pub fn raise_fatal_for_test(producer: &rdkafka::producer::FutureProducer) {
    use rdkafka::producer::Producer;
    let reason = std::ffi::CString::new("injected by SPILLWAY_FAULT").unwrap_or_default();
    // SAFETY: the client pointer is valid for the producer's lifetime; librdkafka's test API
    // only records the error and its reason.
    unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(
            producer.client().native_ptr(),
            rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        );
    }
}

/// Creates `topics` with `partitions` partitions where missing. Existing topics are left alone.
pub async fn ensure_topics(
    k: &KafkaConfig,
    topics: &[&str],
    partitions: i32,
) -> Result<(), KafkaError> {
    let config = base_config(k).map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
    create_missing_topics(&config, topics, partitions).await
}

/// The journal topic's settings: compacted (one entry per dedup key) and deleted by
/// retention once every entry a segment holds has expired (`retention.ms` is the longest
/// TTL plus a margin), with segments that roll often enough for retention to reach them.
pub fn journal_topic_settings(j: &JournalConfig) -> Vec<(&'static str, String)> {
    let retention = j.retention_ms();
    vec![
        ("cleanup.policy", "compact,delete".into()),
        ("retention.ms", retention.to_string()),
        (
            "segment.ms",
            (retention / 4).clamp(1_000, 86_400_000).to_string(),
        ),
    ]
}

/// What is wrong with the existing journal topic's cleanup settings for `j`'s TTLs, one
/// sentence each; empty when they hold every entry for its TTL and delete it after.
/// `processor --check` prints these, and the processor logs them at start-up.
pub async fn journal_topic_warnings(
    k: &KafkaConfig,
    j: &JournalConfig,
) -> Result<Vec<String>, KafkaError> {
    use rdkafka::admin::ResourceSpecifier;
    let config = base_config(k).map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(&j.topic)], &opts)
        .await?;
    let entries = match described.into_iter().next() {
        Some(Ok(resource)) => resource.entries,
        Some(Err(RDKafkaErrorCode::UnknownTopicOrPartition)) | None => {
            return Ok(vec![format!(
                "journal topic {} does not exist: create it with {}",
                j.topic,
                settings_text(j)
            )])
        }
        Some(Err(code)) => return Err(KafkaError::AdminOp(code)),
    };
    let get = |name: &str| {
        entries
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    Ok(policy_warnings(
        j,
        get("cleanup.policy").as_deref().unwrap_or("delete"),
        get("retention.ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(604_800_000),
    ))
}

fn settings_text(j: &JournalConfig) -> String {
    journal_topic_settings(j)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The warnings for a journal topic with `policy` and `retention_ms`.
fn policy_warnings(j: &JournalConfig, policy: &str, retention_ms: i64) -> Vec<String> {
    let policies: Vec<&str> = policy.split(',').map(str::trim).collect();
    let mut out = Vec::new();
    let ttl_ms = j.max_ttl_secs().saturating_mul(1000);
    if policies.contains(&"delete") && retention_ms >= 0 && (retention_ms as u64) < ttl_ms {
        out.push(format!(
            "journal topic {}: retention.ms={retention_ms} is shorter than the longest TTL ({} s): entries still within their TTL would be deleted and their events run again after a restore; set retention.ms to at least {} (journal.retention_margin_secs over the TTL)",
            j.topic,
            j.max_ttl_secs(),
            j.retention_ms()
        ));
    }
    if !policies.contains(&"compact") {
        out.push(format!(
            "journal topic {}: cleanup.policy={policy} does not compact, so a restore reads every version of every entry; use {}",
            j.topic,
            settings_text(j)
        ));
    }
    if !policies.contains(&"delete") || retention_ms < 0 {
        out.push(format!(
            "journal topic {}: cleanup.policy={policy} with retention.ms={retention_ms} never deletes expired entries, so the topic and every cold restore grow for ever; use {}",
            j.topic,
            settings_text(j)
        ));
    }
    out
}

/// Creates the journal topic with [`journal_topic_settings`] and `partitions` partitions if
/// it is missing (development convenience, like [`ensure_topics`]).
pub async fn ensure_journal_topic(
    k: &KafkaConfig,
    j: &JournalConfig,
    partitions: i32,
) -> Result<(), KafkaError> {
    let config = base_config(k).map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
    let settings = journal_topic_settings(j);
    let mut new = NewTopic::new(&j.topic, partitions, TopicReplication::Fixed(1));
    for (key, value) in &settings {
        new = new.set(key, value);
    }
    create(&config, &[new]).await
}

/// Creates `new` where missing (an existing topic is left alone), then waits until every
/// one is visible with its partitions led.
async fn create(config: &ClientConfig, new: &[NewTopic<'_>]) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(new, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                tracing::error!(%topic, ?code, "could not create topic");
                return Err(KafkaError::AdminOp(code));
            }
        }
    }
    let names: Vec<&str> = new.iter().map(|t| t.name).collect();
    wait_for_topics(config, &names, TOPIC_VISIBLE_TIMEOUT).await
}

/// How long a topic just created may take to show up, with a leader for every partition, in
/// the metadata the clients see.
const TOPIC_VISIBLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until every one of `topics` is in the cluster metadata with all its partitions led.
/// CreateTopics answers once the controller has the topic; brokers learn of it a moment
/// later, and a client that looks in between sees no partitions.
async fn wait_for_topics(
    config: &ClientConfig,
    topics: &[&str],
    timeout: Duration,
) -> Result<(), KafkaError> {
    use rdkafka::producer::Producer;
    let client: rdkafka::producer::BaseProducer = config.create()?;
    let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let md = client.client().fetch_metadata(None, Duration::from_secs(5));
            let missing: Vec<&String> = match &md {
                Ok(md) => topics
                    .iter()
                    .filter(|name| {
                        !md.topics().iter().any(|t| {
                            t.name() == name.as_str()
                                && t.error().is_none()
                                && !t.partitions().is_empty()
                                && t.partitions().iter().all(|p| p.leader() >= 0)
                        })
                    })
                    .collect(),
                Err(_) => topics.iter().collect(),
            };
            if missing.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                tracing::error!(topics = ?missing, "created topics did not become visible in time");
                return Err(md.err().unwrap_or(KafkaError::AdminOp(
                    RDKafkaErrorCode::UnknownTopicOrPartition,
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .map_err(|e| KafkaError::ClientCreation(e.to_string()))?
}

/// Like [`ensure_topics`], with an explicit client configuration.
pub async fn create_missing_topics(
    config: &ClientConfig,
    topics: &[&str],
    partitions: i32,
) -> Result<(), KafkaError> {
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    create(config, &new).await
}

/// Client context for the tools' readers (`dlq`, `status`), which read to the end of
/// partitions: librdkafka may report reaching the end as a client-level `PartitionEOF`
/// error, which is expected there and is not logged as one.
pub struct ReaderContext;

impl rdkafka::client::ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF)
        {
            tracing::debug!(reason, "end of partition");
        } else {
            tracing::warn!(%error, reason, "kafka client error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReaderContext {}

/// A consumer for reading partitions to their end, with [`ReaderContext`].
pub type Reader = rdkafka::consumer::BaseConsumer<ReaderContext>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_topic_settings_that_cannot_hold_the_ttl_or_grow_for_ever_are_named() {
        let j: JournalConfig =
            serde_json::from_value(serde_json::json!({ "topic": "j", "ttl_secs": 3600 })).unwrap();
        let fine = policy_warnings(&j, "compact,delete", j.retention_ms() as i64);
        assert!(fine.is_empty(), "{fine:?}");
        let short = policy_warnings(&j, "compact,delete", 60_000);
        assert_eq!(short.len(), 1);
        assert!(
            short[0].contains("shorter than the longest TTL"),
            "{short:?}"
        );
        let forever = policy_warnings(&j, "compact", 604_800_000);
        assert!(
            forever[0].contains("never deletes expired entries"),
            "{forever:?}"
        );
        let infinite = policy_warnings(&j, "compact,delete", -1);
        assert!(infinite[0].contains("never deletes"), "{infinite:?}");
        let delete_only = policy_warnings(&j, "delete", j.retention_ms() as i64);
        assert!(
            delete_only[0].contains("does not compact"),
            "{delete_only:?}"
        );
    }

    /// The wait for created topics is bounded: a topic that never appears fails start-up
    /// after the timeout, one that is there passes at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_for_topics_ends_at_its_deadline_when_one_never_appears() {
        let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
        mock.create_topic("present", 3, 1).expect("topic");
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", mock.bootstrap_servers());
        let bound = Duration::from_millis(800);
        wait_for_topics(&config, &["present"], bound)
            .await
            .expect("an existing topic is visible");
        let started = std::time::Instant::now();
        let err = wait_for_topics(&config, &["present", "absent"], bound).await;
        assert!(err.is_err(), "a missing topic must fail the wait");
        assert!(
            started.elapsed() >= bound,
            "failed only at the deadline: {:?}",
            started.elapsed()
        );
    }
}
