//! Kafka client construction: the one place that turns [`KafkaConfig`] into librdkafka
//! properties, for consumers, producers and the admin client.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use std::collections::BTreeMap;

use crate::config::duration_ms;
use crate::config::{ConfigError, PropertyValue};
use crate::ingress::config::ProducerConfig;
use crate::journal::config::JournalConfig;
use crate::processor::config::ProcessorConfig;
use serde::Deserialize;

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

/// Creates the spend budgets' topic where missing: one partition with the broker's default
/// replication factor, compacted (one total per budget, period and instance) and deleted after
/// [`crate::llm::budget::RETENTION_MS`].
pub async fn ensure_budget_topic(k: &KafkaConfig, topic: &str) -> Result<(), KafkaError> {
    let config = base_config(k).map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
    let retention = crate::llm::budget::RETENTION_MS.to_string();
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1))
        .set("cleanup.policy", "compact,delete")
        .set("retention.ms", &retention)
        .set("segment.ms", "86400000");
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

// ---- Configuration: `[kafka]` ----

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

/// Rejects pass-through properties that Spillway manages itself.
pub(crate) fn check_properties(
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

impl KafkaConfig {
    /// The `[kafka]` section's own rules, each error naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, v, min) in [
            ("kafka.session_timeout_ms", self.session_timeout_ms, 1),
            ("kafka.max_poll_interval_ms", self.max_poll_interval_ms, 1),
            ("kafka.message_timeout_ms", self.message_timeout_ms, 1),
            (
                "kafka.statistics_interval_ms",
                self.statistics_interval_ms,
                0,
            ),
        ] {
            duration_ms(key, v, min)?;
        }
        let k = self;
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
        Ok(())
    }
}

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
