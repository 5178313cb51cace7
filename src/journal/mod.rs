//! The step journal: what each event has already done, so a redelivered or duplicated event
//! skips it. No second LLM call for an answer already paid for, no second post for an event
//! already finished.
//!
//! - **Dedup key.** `<ce_source>|<stable id>`: the id is the event's `ce_id` (`Event::id`),
//!   or, with `journal.id_field`, a JSON pointer into the event's data (upstream topics).
//! - **Entries** record each finished step's output (the LLM answer with its usage; a sink's
//!   receipt) and whether the whole event is done. They expire with the event type's TTL.
//! - **Durable store.** A compacted Kafka topic keyed by dedup key, Kafka Streams changelog
//!   style: an input partition `p` writes to journal partition `p mod J`, and when `p` is
//!   assigned, the first record of it waits until that journal partition has been read from
//!   the beginning to its end. Entries are written with `acks=all` and awaited
//!   before the event moves on, so an entry is durable before the step after it starts and
//!   before any offset past it is committed.
//! - **Fast layer.** A moka cache in front, bounded by `max_entries`, expiring each entry at
//!   its own deadline.
//! - **In flight.** Two copies of one event running at once (duplicates with different Kafka
//!   keys) would both miss the journal; the second waits for the first to finish instead.
//! - **Transactions** ([`txn`]). A step whose effect is a Kafka record (the result-topic
//!   sink) hands its records to the worker, which writes them and the step's entry in one
//!   transaction. Restores read `read_committed`, so an aborted result never counts as done.

pub mod txn;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use tokio::sync::{Notify, OnceCell};

use crate::codec::Event;
use crate::config::{JournalConfig, KafkaConfig};
use crate::telemetry::{now_ms, Metrics};

/// Journal failures. All are transient for the event: it waits and tries again.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Producing or reading the journal topic failed.
    #[error("journal topic: {0}")]
    Kafka(#[from] KafkaError),
    /// Restoring a partition did not reach its high watermark in time.
    #[error("restoring journal partition {partition} did not finish within {timeout_ms} ms")]
    RestoreTimeout {
        /// The journal partition.
        partition: i32,
        /// `journal.restore_timeout_ms`.
        timeout_ms: u64,
    },
    /// A transaction (a Kafka sink's records with the journal entry) did not commit.
    #[error("journal transaction: {0}")]
    Transaction(String),
    /// The journal topic is missing or has no partitions.
    #[error("journal topic {0} does not exist or has no partitions; create it compacted (cleanup.policy=compact)")]
    MissingTopic(String),
}

/// What an event has done so far. Serialized as JSON on the journal topic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Format version.
    pub v: u8,
    /// Unix ms after which the entry is ignored (the event type's TTL from its first step).
    pub expires_at_ms: u64,
    /// Every step finished: a redelivery is a duplicate and is skipped.
    pub done: bool,
    /// Output of each finished step, by step name (`null` for steps without output).
    pub steps: Map<String, Json>,
    /// Steps that were about to act (a post that may have happened if no result follows).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub intents: Vec<String>,
}

impl Entry {
    /// `self` and `other` together: every step either holds, `done` if either is, the later
    /// deadline. Entries only ever gain steps, so this is never behind either of them.
    pub fn merged(&self, other: &Entry) -> Entry {
        let mut out = self.clone();
        for (step, output) in &other.steps {
            out.steps
                .entry(step.clone())
                .or_insert_with(|| output.clone());
        }
        for intent in &other.intents {
            if !out.intents.contains(intent) {
                out.intents.push(intent.clone());
            }
        }
        out.done |= other.done;
        out.v = out.v.max(other.v);
        out.expires_at_ms = out.expires_at_ms.max(other.expires_at_ms);
        out
    }
}

/// One shared read of a journal partition.
type RestoreCell = Arc<OnceCell<()>>;

struct ByDeadline;

impl moka::Expiry<String, Arc<Entry>> for ByDeadline {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(Duration::from_millis(
            value.expires_at_ms.saturating_sub(now_ms()),
        ))
    }

    fn expire_after_update(
        &self,
        key: &String,
        value: &Arc<Entry>,
        updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, updated_at)
    }
}

/// The journal: cache, durable topic, restore state and in-flight claims.
pub struct Journal {
    config: JournalConfig,
    producer: FutureProducer,
    /// Client properties for the restore consumers (`read_committed`).
    restore_client: rdkafka::ClientConfig,
    /// A `read_uncommitted` client for the log end (a `read_committed` ListOffsets answers
    /// the last stable offset, which stops before an open transaction). Created once: a new
    /// client costs a connection per restore.
    ends: Arc<crate::kafka::Reader>,
    partitions: i32,
    cache: Cache<String, Arc<Entry>>,
    /// One restore per journal partition per assignment and fence generation; reset on
    /// assign. The `u64` is the fence generation the read was made for.
    restored: Mutex<HashMap<i32, (u64, RestoreCell)>>,
    /// Per journal partition, how many lanes writing to it have fenced a previous owner. A
    /// lane bumps it before it takes writes; a restore made for an older generation is
    /// made again, so every transactional write follows a read made after its lane's fence.
    fences: Arc<Mutex<HashMap<i32, u64>>>,
    inflight: Mutex<HashMap<String, Arc<Notify>>>,
    /// Transactional lanes, when a step writes Kafka records with its entry.
    txns: Option<txn::Transactions>,
    metrics: Arc<Metrics>,
}

/// Held while an event runs; dropping it lets a waiting copy re-check the journal.
pub struct Claim<'a> {
    journal: &'a Journal,
    key: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let notify = self
            .journal
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        if let Some(n) = notify {
            n.notify_waiters();
        }
    }
}

impl Journal {
    /// Connects to the journal topic and reads its partition count. With `transactional`,
    /// entries that carry a sink's records are written in Kafka transactions
    /// ([`Journal::write_atomic`]).
    pub async fn new(
        config: &JournalConfig,
        kafka: &KafkaConfig,
        transactional: bool,
        metrics: Arc<Metrics>,
    ) -> Result<Journal, JournalError> {
        let producer: FutureProducer = crate::kafka::producer_config(kafka)
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?
            .create()?;
        let mut restore_client = crate::kafka::base_config(kafka)
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        restore_client
            .set("group.id", format!("{}-journal-restore", kafka.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("fetch.wait.max.ms", "50")
            // Entries of aborted transactions (a result-topic sink's) must never count.
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest");
        let mut end_client = restore_client.clone();
        end_client.set("isolation.level", "read_uncommitted");
        let ends = Arc::new(end_client.create_with_context(crate::kafka::ReaderContext)?);
        let topic = config.topic.clone();
        let p = producer.clone();
        let partitions = tokio::task::spawn_blocking(move || {
            let md = p
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            Ok::<_, KafkaError>(
                md.topics()
                    .iter()
                    .find(|t| t.name() == topic)
                    .map_or(0, |t| t.partitions().len() as i32),
            )
        })
        .await
        .map_err(|e| KafkaError::ClientCreation(e.to_string()))??;
        if partitions == 0 {
            return Err(JournalError::MissingTopic(config.topic.clone()));
        }
        let fences: Arc<Mutex<HashMap<i32, u64>>> = Arc::default();
        Ok(Journal {
            config: config.clone(),
            producer,
            restore_client,
            ends,
            partitions,
            cache: Cache::builder()
                .max_capacity(config.max_entries)
                .expire_after(ByDeadline)
                .build(),
            restored: Mutex::new(HashMap::new()),
            fences: fences.clone(),
            inflight: Mutex::new(HashMap::new()),
            txns: if transactional {
                let (fences, j) = (fences.clone(), partitions);
                let on_fence: txn::OnFence = Arc::new(move |input_partition: i32| {
                    let mut f = fences.lock().unwrap_or_else(|e| e.into_inner());
                    let g = f.entry(input_partition.rem_euclid(j)).or_insert(0);
                    *g += 1;
                    *g
                });
                Some(txn::Transactions::new(kafka, on_fence, metrics.clone())?)
            } else {
                None
            },
            metrics,
        })
    }

    /// The event's dedup key: `<source>|<id>`.
    pub fn key(&self, event: &Event) -> String {
        let id = self
            .config
            .id_field
            .as_deref()
            .and_then(|ptr| event.data.pointer(ptr))
            .and_then(|v| match v {
                Json::String(s) => Some(s.clone()),
                Json::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .unwrap_or_else(|| event.id.clone());
        format!("{}|{id}", event.source)
    }

    /// How long entries of `event_type` are kept.
    pub fn ttl(&self, event_type: &str) -> Duration {
        Duration::from_secs(
            self.config
                .ttl_by_type
                .get(event_type)
                .copied()
                .unwrap_or(self.config.ttl_secs),
        )
    }

    fn journal_partition(&self, input_partition: i32) -> i32 {
        input_partition.rem_euclid(self.partitions)
    }

    /// Input partitions were (re)assigned: their journal partitions are read again before
    /// their next record, because another instance may have written to them meanwhile, and
    /// their transactional lanes start over (fencing the previous owner).
    pub fn assigned(&self, input_partitions: &[(String, i32)]) {
        {
            let mut restored = self.restored.lock().unwrap_or_else(|e| e.into_inner());
            for (_, p) in input_partitions {
                restored.remove(&self.journal_partition(*p));
            }
        }
        self.revoked(input_partitions);
        if let Some(t) = &self.txns {
            // Fence every previous owner now, not at each partition's first record: a
            // crashed owner's open transaction holds back `read_committed` reads of its
            // journal partition, which other input partitions may share.
            t.prepare_all(input_partitions.iter().map(|(t, p)| (t.as_str(), *p)));
        }
    }

    /// Input partitions were revoked: their transactional producers are closed.
    pub fn revoked(&self, input_partitions: &[(String, i32)]) {
        if let Some(t) = &self.txns {
            t.reset(input_partitions.iter().map(|(t, p)| (t.as_str(), *p)));
        }
    }

    /// Resolves once the journal partition of `input_partition` has been read to its end in
    /// this assignment, after the last fence of a lane writing to it; returns that fence
    /// generation. Concurrent callers share one read. With transactions, the partition's lane
    /// first fences its previous owner, which settles any transaction a crashed owner left
    /// open (a `read_committed` read stops at it).
    pub async fn restore(&self, topic: &str, input_partition: i32) -> Result<u64, JournalError> {
        let jp = self.journal_partition(input_partition);
        if let Some(t) = &self.txns {
            t.prepare(topic, input_partition)
                .await
                .map_err(JournalError::Transaction)?;
        }
        let generation = self
            .fences
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&jp)
            .copied()
            .unwrap_or(0);
        let (generation, cell) = {
            let mut restored = self.restored.lock().unwrap_or_else(|e| e.into_inner());
            let slot = restored
                .entry(jp)
                .or_insert_with(|| (generation, Arc::default()));
            if slot.0 < generation {
                // A lane fenced a previous owner after this read began: what that owner
                // committed until the fence must be read too.
                *slot = (generation, Arc::default());
            }
            (slot.0, slot.1.clone())
        };
        cell.get_or_try_init(|| async {
            let started = Instant::now();
            let (client, end) = (self.restore_client.clone(), self.ends.clone());
            let topic = self.config.topic.clone();
            let timeout = Duration::from_millis(self.config.restore_timeout_ms);
            let records = tokio::task::spawn_blocking(move || {
                read_partition(&client, &end, &topic, jp, timeout)
            })
            .await
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))??;
            let (mut loaded, now) = (0u64, now_ms());
            for m in &records {
                let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                    continue;
                };
                match m.payload() {
                    None => self.cache.invalidate(key),
                    Some(bytes) => match serde_json::from_slice::<Entry>(bytes) {
                        Ok(e) if e.expires_at_ms > now => {
                            loaded += 1;
                            // Entries only grow: a read that began before this process
                            // wrote a newer entry must not replace it with an older one.
                            let merged = match self.cache.get(key) {
                                Some(current) => current.merged(&e),
                                None => e,
                            };
                            self.cache.insert(key.to_string(), Arc::new(merged));
                        }
                        // Expired: leave the cache alone (it expires its own copy).
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(%key, error = %e, "unreadable journal entry ignored")
                        }
                    },
                }
            }
            self.metrics
                .journal_restores
                .observe(started.elapsed().as_secs_f64());
            self.metrics
                .journal_restored_records
                .inc_by(records.len() as u64);
            tracing::info!(
                journal_partition = jp,
                records = records.len(),
                live_entries = loaded,
                ms = started.elapsed().as_millis() as u64,
                "journal partition restored"
            );
            Ok::<(), JournalError>(())
        })
        .await
        .map(|_| generation)
        .inspect_err(|_| {
            // A failed restore is tried again by the next record.
            let mut restored = self.restored.lock().unwrap_or_else(|e| e.into_inner());
            if restored
                .get(&jp)
                .is_some_and(|(_, c)| Arc::ptr_eq(c, &cell))
            {
                restored.remove(&jp);
            }
        })
    }

    /// The live entry for `key`, if any.
    pub fn get(&self, key: &str) -> Option<Arc<Entry>> {
        self.cache.get(key).filter(|e| e.expires_at_ms > now_ms())
    }

    /// Claims `key` for this task. If another copy of the event is running, waits for it to
    /// finish first (the caller then re-reads the journal).
    pub async fn claim(&self, key: &str) -> Claim<'_> {
        loop {
            let waiting = {
                let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
                match inflight.get(key) {
                    Some(n) => n.clone(),
                    None => {
                        inflight.insert(key.to_string(), Arc::new(Notify::new()));
                        return Claim {
                            journal: self,
                            key: key.to_string(),
                        };
                    }
                }
            };
            // A `Notified` receives `notify_waiters` from its creation on. The holder removes
            // its entry under the lock before notifying, so if the entry is still there after
            // this point, the wakeup is still to come; if not, look again.
            let notified = waiting.notified();
            let still_held = self
                .inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(key)
                .is_some_and(|n| Arc::ptr_eq(n, &waiting));
            if still_held {
                self.metrics.journal_waits.inc();
                notified.await;
            }
        }
    }

    /// Writes `entry` for `key` (to the journal partition of `input_partition`) and waits for
    /// Kafka's acknowledgement; only then is it visible in the cache.
    pub async fn write(
        &self,
        input_partition: i32,
        key: &str,
        entry: Entry,
    ) -> Result<(), JournalError> {
        let value = serde_json::to_vec(&entry).unwrap_or_default();
        let started = Instant::now();
        let record = FutureRecord::to(&self.config.topic)
            .key(key)
            .payload(&value)
            .partition(self.journal_partition(input_partition));
        let result = self
            .producer
            .send(record, Duration::from_secs(0))
            .await
            .map(|_| ())
            .map_err(|(e, _)| JournalError::Kafka(e));
        self.metrics
            .journal_writes
            .with_label_values(&[if result.is_ok() { "ok" } else { "error" }])
            .inc();
        self.metrics
            .journal_write_duration
            .observe(started.elapsed().as_secs_f64());
        result?;
        self.cache.insert(key.to_string(), Arc::new(entry));
        Ok(())
    }

    /// Writes `entry` together with a sink's `records` in one Kafka transaction of the lane of
    /// the input partition: both are visible to `read_committed` readers, or neither is.
    pub async fn write_atomic(
        &self,
        input: (&str, i32),
        key: &str,
        entry: Entry,
        step: &str,
        records: &[txn::OutRecord],
    ) -> Result<(), JournalError> {
        let Some(txns) = &self.txns else {
            return Err(JournalError::Transaction(
                "the journal was built without transactions".into(),
            ));
        };
        // After a lane closed (fenced, or a commit with an unknown outcome), the new lane's
        // fence settles the old transaction and the restore reads the partition again: a
        // step it shows as committed is not written twice.
        let generation = self.restore(input.0, input.1).await?;
        if self.get(key).is_some_and(|e| e.steps.contains_key(step)) {
            return Ok(());
        }
        let mut all = records.to_vec();
        all.push(txn::OutRecord {
            topic: self.config.topic.clone(),
            partition: Some(self.journal_partition(input.1)),
            key: key.to_string(),
            payload: serde_json::to_vec(&entry).unwrap_or_default(),
            headers: Vec::new(),
        });
        let result = txns
            .write(input.0, input.1, generation, step, all)
            .await
            .map_err(JournalError::Transaction);
        self.metrics
            .journal_writes
            .with_label_values(&[if result.is_ok() { "ok" } else { "error" }])
            .inc();
        result?;
        self.cache.insert(key.to_string(), Arc::new(entry));
        Ok(())
    }

    /// Waits for queued journal writes (shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "journal flush did not finish");
        }
    }
}

/// Reads `partition` of `topic` (at `read_committed`) from the beginning to its end. The end
/// is the log end taken at the start through `ends` (`read_uncommitted`: past every
/// transaction already open then, so a result committed by a fenced owner is not missed),
/// and it is reached when the consumer's position has passed it *and* a fetch has come back
/// empty. The position, not the last record, because transaction markers and aborted
/// records take offsets but are never delivered; the empty fetch because some
/// Kafka-protocol brokers (tansu 0.6, the earlier test broker) answer ListOffsets with the
/// base offset of the last batch. `PartitionEOF` is not relied on: librdkafka may report it as a client-level error.
fn read_partition(
    client: &rdkafka::ClientConfig,
    ends: &crate::kafka::Reader,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> Result<Vec<OwnedMessage>, JournalError> {
    const IDLE: Duration = Duration::from_millis(300);
    let started = Instant::now();
    let deadline = started + timeout;
    let (low, high) = ends.fetch_watermarks(topic, partition, timeout)?;
    let at_watermarks = started.elapsed();
    let mut first_record = None;
    let consumer: crate::kafka::Reader = client.create_with_context(crate::kafka::ReaderContext)?;
    let mut tpl = TopicPartitionList::new();
    // From the low watermark itself: `Offset::Beginning` costs an offset lookup first.
    tpl.add_partition_offset(topic, partition, Offset::Offset(low))?;
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let (mut next, mut last_record) = (low, Instant::now());
    loop {
        if Instant::now() >= deadline {
            return Err(JournalError::RestoreTimeout {
                partition,
                timeout_ms: timeout.as_millis() as u64,
            });
        }
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                next = m.offset() + 1;
                // Only records below the end taken at the start hold the read open: on a
                // journal partition that other instances keep writing to, newer records
                // never stop arriving (they are merged all the same).
                if m.offset() < high {
                    last_record = Instant::now();
                }
                first_record.get_or_insert_with(|| started.elapsed());
                out.push(m.detach());
            }
            Some(Err(KafkaError::PartitionEOF(_))) | None => {
                if let Some(Offset::Offset(at)) = consumer
                    .position()
                    .ok()
                    .and_then(|tpl| tpl.find_partition(topic, partition).map(|e| e.offset()))
                {
                    next = next.max(at);
                }
                if next >= high && last_record.elapsed() >= IDLE {
                    tracing::debug!(
                        partition,
                        watermarks_ms = at_watermarks.as_millis() as u64,
                        first_record_ms = first_record.map(|d| d.as_millis() as u64),
                        last_record_ms = (last_record - started).as_millis() as u64,
                        "journal partition read"
                    );
                    return Ok(out);
                }
            }
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(steps: &[&str], done: bool, expires: u64) -> Entry {
        Entry {
            v: 1,
            expires_at_ms: expires,
            done,
            steps: steps
                .iter()
                .map(|s| (s.to_string(), serde_json::json!({ "step": s })))
                .collect(),
            intents: Vec::new(),
        }
    }

    #[test]
    fn an_older_entry_read_back_never_undoes_a_newer_one() {
        // The re-read after a fence returns the LLM-only entry a zombie wrote after this
        // process's `done` entry: the merge keeps the event done.
        let newer = entry(&["classify", "publish"], true, 2_000);
        let older = entry(&["classify"], false, 1_000);
        for merged in [newer.merged(&older), older.merged(&newer)] {
            assert!(merged.done);
            assert_eq!(
                merged.steps.keys().collect::<Vec<_>>(),
                vec!["classify", "publish"]
            );
            assert_eq!(merged.expires_at_ms, 2_000);
        }
    }

    #[test]
    fn merging_keeps_intents_once_and_the_first_output_of_a_step() {
        let mut a = entry(&["classify"], false, 10);
        a.intents.push("alert".into());
        let mut b = entry(&["classify"], false, 10);
        b.steps
            .insert("classify".into(), serde_json::json!({ "other": true }));
        b.intents.push("alert".into());
        let m = a.merged(&b);
        assert_eq!(m.intents, vec!["alert".to_string()]);
        assert_eq!(
            m.steps["classify"],
            serde_json::json!({ "step": "classify" })
        );
    }
}
