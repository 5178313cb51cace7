//! The step journal: what each event has already done, so a redelivered or duplicated event
//! skips it. No second LLM call for an answer already paid for, no second post for an event
//! already finished.
//!
//! - **Dedup key.** `<ce_source>|<stable id>`: the id is the event's `ce_id` (`Event::id`),
//!   or, with `journal.id_field`, a JSON pointer into the event's data (upstream topics). The
//!   worker prefixes it with `<pipeline>/` for `[[pipelines]]`, so each pipeline has its own
//!   entries.
//! - **Entries** record each finished step's output (the LLM answer with its usage; a sink's
//!   receipt) and whether the whole event is done. They expire with the event type's TTL.
//! - **State on disk, the topic as its changelog** (Kafka Streams' model). An input partition
//!   `p` writes to journal partition `p mod J`. Each journal partition this instance holds has
//!   a local store ([`store`]), the source of truth for skip decisions: no key within its TTL
//!   is forgotten because memory is short. The [`changelog`] reader keeps each store in step
//!   with the topic from its checkpoint on, so a restart on the same disk reads only the tail
//!   and an empty disk restores from the topic.
//! - **Write ahead.** Entries are produced with `acks=all` and awaited, then recorded in the
//!   store, before the event moves on: an entry is durable before the step after it starts
//!   and before any offset past it is committed.
//! - **A bounded topic.** The topic is `cleanup.policy=compact,delete` with `retention.ms` the
//!   longest TTL plus a margin; the stores sweep expired entries themselves.
//! - **In flight.** Two copies of one event running at once (duplicates with different Kafka
//!   keys) would both miss the journal; the second waits for the first to finish instead.
//! - **Transactions** ([`txn`]). A step whose effect is a Kafka record (the result-topic
//!   sink) hands its records to the worker, which writes them and the step's entry in one
//!   transaction. The changelog is read `read_committed`, so an aborted result never counts
//!   as done.

mod changelog;
pub mod config;
mod session;
pub mod store;
pub mod txn;

pub use session::{Begin, Claim, Session};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use tokio::sync::{Notify, OnceCell};

use crate::codec::Event;
use crate::journal::config::JournalConfig;
use crate::kafka::KafkaConfig;
use crate::telemetry::{now_ms, Health, Metrics};
use store::{Opened, Store, StoreError};

/// Journal failures. All but [`JournalError::TooLarge`] are transient for the event: it waits
/// and tries again.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Producing or reading the journal topic failed.
    #[error("journal topic: {0}")]
    Kafka(#[from] KafkaError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The journal partition's store is not open (it was revoked meanwhile, or not yet
    /// restored): restore it first.
    #[error("journal partition {0} is not open here")]
    NotOpen(i32),
    /// A transaction (a Kafka sink's records with the journal entry) did not commit.
    #[error("journal transaction: {0}")]
    Transaction(String),
    /// A record (a sink's result or the entry itself) is too large for Kafka: it never fits,
    /// so the event goes to the DLQ.
    #[error("{0}")]
    TooLarge(String),
    /// The journal producer failed fatally: it refuses every record from now on. The
    /// processor stops (liveness fails) without finishing the event.
    #[error("the journal producer failed fatally: {0}")]
    Fatal(String),
    /// The journal topic is missing or has no partitions.
    #[error("journal topic {0} does not exist or has no partitions; create it compacted (cleanup.policy=compact)")]
    MissingTopic(String),
}

impl JournalError {
    /// Whether writing again can never succeed (the event goes to the DLQ).
    pub fn is_deterministic(&self) -> bool {
        matches!(self, JournalError::TooLarge(_))
    }

    /// Whether the process cannot go on (the event is left unfinished).
    pub fn is_fatal(&self) -> bool {
        matches!(self, JournalError::Fatal(_))
    }

    /// Stable reason for metrics and DLQ headers.
    pub fn error_code(&self) -> &'static str {
        match self {
            JournalError::TooLarge(_) => "record_too_large",
            _ => "journal_unavailable",
        }
    }
}

impl From<txn::LaneError> for JournalError {
    fn from(e: txn::LaneError) -> Self {
        match e {
            txn::LaneError::TooLarge(why) => JournalError::TooLarge(why),
            txn::LaneError::Failed(why) => JournalError::Transaction(why),
        }
    }
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

/// Store reads and writes on the blocking pool at once: each takes microseconds, unless the
/// changelog reader holds the store's write transaction.
const STORE_OPS: usize = 8;

/// One shared read of a journal partition.
type RestoreCell = Arc<OnceCell<()>>;

/// The journal: the partition stores, the changelog reader, restores and in-flight claims.
pub struct Journal {
    config: JournalConfig,
    producer: FutureProducer,
    /// A `read_uncommitted` client for the log ends (a `read_committed` ListOffsets answers
    /// the last stable offset, which stops before an open transaction).
    ends: Arc<crate::kafka::Reader>,
    partitions: i32,
    /// The open store of each journal partition held here.
    stores: Mutex<HashMap<i32, Arc<Store>>>,
    /// Opening a store is one at a time (a second open of a file is refused by redb).
    opening: tokio::sync::Mutex<()>,
    /// Store reads and writes running at once on the blocking pool, at most.
    store_ops: tokio::sync::Semaphore,
    /// The input partitions assigned here; a journal partition stays open while one of them
    /// maps to it.
    owned: Mutex<HashSet<(String, i32)>>,
    /// Commands to the changelog reader thread.
    changelog: Mutex<std::sync::mpsc::Sender<changelog::Command>>,
    changelog_stop: Arc<AtomicBool>,
    changelog_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// One catch-up per journal partition per assignment and fence generation; reset on
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
    health: Arc<Health>,
}

impl Journal {
    /// Connects to the journal topic, reads its partition count and starts the changelog
    /// reader. With `transactional`, entries that carry a sink's records are written in Kafka
    /// transactions ([`Journal::write_atomic`]). A restore that stalls marks `health` not ready.
    pub async fn new(
        config: &JournalConfig,
        kafka: &KafkaConfig,
        transactional: bool,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<Journal, JournalError> {
        let producer: FutureProducer = crate::kafka::producer_config(kafka)
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?
            .create()?;
        let mut reader_client = crate::kafka::base_config(kafka)
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        reader_client
            .set("group.id", format!("{}-journal-restore", kafka.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("fetch.wait.max.ms", "100")
            // Entries of aborted transactions (a result-topic sink's) must never count.
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest");
        if !kafka.properties.contains_key("queued.max.messages.kbytes") {
            // What librdkafka prefetches for the changelog reader is bounded, like the main
            // consumer's queue: memory does not grow with the journal.
            reader_client.set("queued.max.messages.kbytes", "16384");
        }
        let mut end_client = reader_client.clone();
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
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let min_ttl = config.min_ttl_secs();
        let reader = changelog::Reader {
            consumer: reader_client.create_with_context(crate::kafka::ReaderContext)?,
            topic: config.topic.clone(),
            stall_after: Duration::from_millis(config.restore_stall_ms),
            // Expired entries leave the store within a quarter of the shortest TTL.
            sweep_every: Duration::from_secs((min_ttl / 4).clamp(1, 60)),
            metrics: metrics.clone(),
            health: health.clone(),
            stop: stop.clone(),
        };
        let on_panic = health.clone();
        let thread = std::thread::Builder::new()
            .name("spillway-changelog".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| reader.run(rx));
                if std::panic::catch_unwind(run).is_err() {
                    // Nothing would answer a restore again: stop rather than wait for ever.
                    on_panic.set_fatal("the journal changelog reader panicked");
                }
            })
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        let fences: Arc<Mutex<HashMap<i32, u64>>> = Arc::default();
        Ok(Journal {
            config: config.clone(),
            producer,
            ends,
            partitions,
            stores: Mutex::new(HashMap::new()),
            opening: tokio::sync::Mutex::new(()),
            store_ops: tokio::sync::Semaphore::new(STORE_OPS),
            owned: Mutex::new(HashSet::new()),
            changelog: Mutex::new(tx),
            changelog_stop: stop,
            changelog_thread: Mutex::new(Some(thread)),
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
            health,
        })
    }

    /// The event's dedup key: `<source>|<id>`.
    pub fn key(&self, event: &Event) -> String {
        self.config.dedup_key(event)
    }

    /// How long entries of `event_type` are kept: a pipeline's TTLs against `[journal]`'s
    /// ([`crate::step::BuiltPipeline::ttl`]).
    pub fn ttl(&self, pipeline: &crate::step::BuiltPipeline, event_type: &str) -> Duration {
        let by_type = self.config.ttl_by_type.get(event_type).copied();
        pipeline.ttl(event_type, by_type, self.config.ttl_secs)
    }

    fn journal_partition(&self, input_partition: i32) -> i32 {
        input_partition.rem_euclid(self.partitions)
    }

    fn send(&self, command: changelog::Command) {
        // The reader only stops when the journal is closed.
        let _ = self
            .changelog
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(command);
    }

    /// Input partitions were (re)assigned: their journal partitions catch up with the topic
    /// again before their next record, because another instance may have written to them
    /// meanwhile, and their transactional lanes start over (fencing the previous owner).
    pub fn assigned(&self, input_partitions: &[(String, i32)]) {
        {
            let mut restored = self.restored.lock().unwrap_or_else(|e| e.into_inner());
            for (_, p) in input_partitions {
                restored.remove(&self.journal_partition(*p));
            }
        }
        self.owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(input_partitions.iter().cloned());
        if let Some(t) = &self.txns {
            t.reset(input_partitions.iter().map(|(t, p)| (t.as_str(), *p)));
            // Fence every previous owner now, not at each partition's first record: a
            // crashed owner's open transaction holds back `read_committed` reads of its
            // journal partition, which other input partitions may share.
            t.prepare_all(input_partitions.iter().map(|(t, p)| (t.as_str(), *p)));
        }
    }

    /// Input partitions were revoked: their transactional producers are closed, and the
    /// stores of journal partitions no assigned input partition maps to any more are closed
    /// (made durable at their checkpoint; a later assignment catches up from it).
    pub fn revoked(&self, input_partitions: &[(String, i32)]) {
        if let Some(t) = &self.txns {
            t.reset(input_partitions.iter().map(|(t, p)| (t.as_str(), *p)));
        }
        let still: HashSet<i32> = {
            let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
            for ip in input_partitions {
                owned.remove(ip);
            }
            owned
                .iter()
                .map(|(_, p)| self.journal_partition(*p))
                .collect()
        };
        let closing: Vec<i32> = {
            let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
            let closing: Vec<i32> = stores
                .keys()
                .copied()
                .filter(|jp| !still.contains(jp))
                .collect();
            for jp in &closing {
                stores.remove(jp);
            }
            closing
        };
        let mut restored = self.restored.lock().unwrap_or_else(|e| e.into_inner());
        for jp in closing {
            restored.remove(&jp);
            self.send(changelog::Command::Close { partition: jp });
        }
    }

    fn store(&self, jp: i32) -> Option<Arc<Store>> {
        self.stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&jp)
            .cloned()
    }

    /// The store of journal partition `jp`, opened (and handed to the changelog reader) if it
    /// is not open yet. A store whose checkpoint is past the topic's end (the topic was
    /// recreated) is rebuilt.
    async fn open_store(&self, jp: i32) -> Result<Arc<Store>, JournalError> {
        if let Some(s) = self.store(jp) {
            return Ok(s);
        }
        let _one = self.opening.lock().await;
        if let Some(s) = self.store(jp) {
            return Ok(s);
        }
        let path = Store::path(&self.config.state_dir, &self.config.topic, jp);
        let cache = self.config.store_cache_bytes;
        let (ends, topic) = (self.ends.clone(), self.config.topic.clone());
        let (store, opened, from) = tokio::task::spawn_blocking(move || {
            let (low, high) = ends.fetch_watermarks(&topic, jp, Duration::from_secs(10))?;
            let (store, opened) = Store::open(&path, cache, high)?;
            let checkpoint = store.checkpoint()?;
            // Records below the log start were deleted by retention: every entry in them
            // had expired.
            let from = checkpoint.unwrap_or(low).max(low);
            Ok::<_, JournalError>((store, opened, from))
        })
        .await
        .map_err(|e| KafkaError::ClientCreation(e.to_string()))?
        .inspect_err(|e| {
            if matches!(e, JournalError::Store(StoreError::InUse(_))) {
                tracing::error!(journal_partition = jp, error = %e, "journal store held by another process; not ready until it is free");
                self.health.set_store_unavailable(true);
            }
        })?;
        self.health.set_store_unavailable(false);
        match &opened {
            Opened::Rebuilt(why) => {
                self.metrics.journal_store_rebuilds.inc();
                tracing::warn!(journal_partition = jp, file = %store.file().display(), reason = %why,
                    "journal store unusable; rebuilding it from the topic");
            }
            how => {
                tracing::info!(journal_partition = jp, file = %store.file().display(), from, opened = ?how,
                "journal store open; reading the changelog from its checkpoint")
            }
        }
        let store = Arc::new(store);
        self.stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(jp, store.clone());
        self.send(changelog::Command::Open {
            partition: jp,
            store: store.clone(),
            from,
        });
        Ok(store)
    }

    /// Resolves once the store of the journal partition of `input_partition` holds the topic
    /// up to its end, as of after the last fence of a lane writing to it; returns that fence
    /// generation. Concurrent callers share one catch-up. With transactions, the partition's
    /// lane first fences its previous owner, which settles any transaction a crashed owner
    /// left open (a `read_committed` read stops at it). There is no deadline: a catch-up that
    /// does not move is reported (not ready), and the event waits.
    pub async fn restore(&self, topic: &str, input_partition: i32) -> Result<u64, JournalError> {
        let jp = self.journal_partition(input_partition);
        if let Some(t) = &self.txns {
            t.prepare(topic, input_partition).await?;
        }
        self.open_store(jp).await?;
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
            let (ends, topic) = (self.ends.clone(), self.config.topic.clone());
            // The end as of now, `read_uncommitted`: past every transaction already open, so
            // a result committed by a fenced owner is not missed.
            let (_, high) = tokio::task::spawn_blocking(move || {
                ends.fetch_watermarks(&topic, jp, Duration::from_secs(10))
            })
            .await
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))??;
            let (reply, done) = tokio::sync::oneshot::channel();
            self.send(changelog::Command::CatchUp {
                partition: jp,
                target: high,
                reply,
            });
            done.await.map_err(|_| JournalError::NotOpen(jp))
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

    /// The live entry for `key` of an event from `input_partition`, if any. The partition's
    /// store must be open ([`Journal::restore`]). The other open stores are asked too, so a
    /// copy of an event that arrived under another Kafka key (another input partition held
    /// here) finds it as well.
    pub async fn get(
        &self,
        input_partition: i32,
        key: &str,
    ) -> Result<Option<Entry>, JournalError> {
        let jp = self.journal_partition(input_partition);
        let own = self.store(jp).ok_or(JournalError::NotOpen(jp))?;
        let others: Vec<Arc<Store>> = self
            .stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(p, _)| **p != jp)
            .map(|(_, s)| s.clone())
            .collect();
        let key = key.to_string();
        // Few blocking threads for the stores: while the changelog reader holds a store's
        // write transaction, waiting writes queue here, not as one thread each.
        let _permit = self.store_ops.acquire().await;
        let found = tokio::task::spawn_blocking(move || {
            let now = now_ms();
            let mut found: Option<Entry> = None;
            for store in std::iter::once(&own).chain(&others) {
                if let Some(e) = store.get(&key, now)? {
                    found = Some(match found {
                        Some(f) => f.merged(&e),
                        None => e,
                    });
                }
            }
            Ok::<_, StoreError>(found)
        })
        .await
        .map_err(|e| KafkaError::ClientCreation(e.to_string()))??;
        Ok(found)
    }

    /// Records an entry Kafka acknowledged in the store of its journal partition. A store
    /// closed meanwhile (the partition was revoked) is left alone: the entry is on the topic.
    async fn record(&self, jp: i32, key: &str, entry: Entry) -> Result<(), JournalError> {
        let Some(store) = self.store(jp) else {
            return Ok(());
        };
        let key = key.to_string();
        let _permit = self.store_ops.acquire().await;
        tokio::task::spawn_blocking(move || store.record(&key, &entry, now_ms()))
            .await
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))??;
        Ok(())
    }

    /// Raises a fatal error on the journal producer (`SPILLWAY_FAULT=journal_write:<step>:<n>:fatal`).
    #[cfg(feature = "fault-injection")]
    pub fn raise_fatal_for_test(&self) {
        crate::kafka::raise_fatal_for_test(&self.producer);
    }

    /// Stops the changelog reader and makes every open store durable at its checkpoint
    /// (shutdown). Blocks for as long as the reader's current batch takes.
    pub fn close(&self) {
        self.changelog_stop.store(true, Ordering::Release);
        let thread = self
            .changelog_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = thread {
            let _ = t.join();
        }
        if let Err(e) = self.producer.flush(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "journal flush did not finish");
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.changelog_stop.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests;
