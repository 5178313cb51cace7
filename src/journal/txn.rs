//! Kafka transactions for sinks whose effect is itself a Kafka record (the result-topic
//! sink): the result records and the event's journal entry commit together or not at all.
//!
//! - **One lane per input partition.** Each assigned input partition `(topic, p)` gets its own
//!   transactional producer, `transactional.id = <group.id>.spillway.<topic>.<p>` (Kafka
//!   Streams' original exactly-once scheme). When the partition moves, the new owner's
//!   `init_transactions` fences the old owner and aborts whatever transaction it left open,
//!   so a stalled instance that wakes up cannot commit a result its successor also writes.
//! - **Group commit.** A lane's task takes every request waiting in its queue (up to
//!   [`MAX_BATCH`]) into one transaction, so throughput does not pay one commit per event.
//!   All requests of a transaction get its outcome.
//! - **Failures** are transient for the events: the transaction is aborted (or the producer
//!   rebuilt, which aborts it too), the events retry, and nothing of the batch is visible to a
//!   `read_committed` reader.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::{mpsc, oneshot};

use crate::config::KafkaConfig;
use crate::telemetry::Metrics;

/// Requests taken into one transaction at most.
pub const MAX_BATCH: usize = 512;
/// Time allowed for `init_transactions`, `commit_transaction` and `abort_transaction`.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// One record to write inside a transaction.
#[derive(Debug, Clone)]
pub struct OutRecord {
    /// Target topic.
    pub topic: String,
    /// Target partition; `None` lets the partitioner choose by key.
    pub partition: Option<i32>,
    /// Record key.
    pub key: String,
    /// Record value.
    pub payload: Vec<u8>,
    /// Record headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl OutRecord {
    /// The record for a producer's `send`.
    pub fn to_future_record(&self) -> FutureRecord<'_, String, Vec<u8>> {
        let mut headers = OwnedHeaders::new_with_capacity(self.headers.len());
        for (k, v) in &self.headers {
            headers = headers.insert(rdkafka::message::Header {
                key: k,
                value: Some(v),
            });
        }
        let record = FutureRecord::to(&self.topic)
            .key(&self.key)
            .payload(&self.payload)
            .headers(headers);
        match self.partition {
            Some(p) => record.partition(p),
            None => record,
        }
    }
}

struct Request {
    /// The step whose records these are (for the `before_commit` crash point).
    step: String,
    records: Vec<OutRecord>,
    reply: oneshot::Sender<Result<(), String>>,
}

#[derive(Clone)]
struct Lane {
    tx: mpsc::Sender<Request>,
    /// The producer has run `init_transactions` (the previous owner is fenced).
    ready: Arc<AtomicBool>,
}

/// The transactional lanes of the assigned input partitions.
pub struct Transactions {
    config: rdkafka::ClientConfig,
    id_prefix: String,
    lanes: Mutex<HashMap<(String, i32), Lane>>,
    metrics: Arc<Metrics>,
}

impl Transactions {
    /// Lanes are created on first use; `kafka` gives the brokers and the id prefix.
    pub fn new(kafka: &KafkaConfig, metrics: Arc<Metrics>) -> Result<Transactions, KafkaError> {
        let config = crate::kafka::transactional_producer_config(kafka)
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        Ok(Transactions {
            config,
            id_prefix: format!("{}.spillway", kafka.group_id),
            lanes: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    fn lane(&self, topic: &str, partition: i32) -> Lane {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        lanes
            .entry((topic.to_string(), partition))
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(MAX_BATCH);
                let ready = Arc::new(AtomicBool::new(false));
                let lane = LaneTask {
                    id: format!("{}.{topic}.{partition}", self.id_prefix),
                    config: self.config.clone(),
                    producer: None,
                    ready: ready.clone(),
                    metrics: self.metrics.clone(),
                };
                tokio::spawn(lane.run(rx));
                Lane { tx, ready }
            })
            .clone()
    }

    /// The input partitions were assigned or revoked: their lanes are closed, so the next use
    /// starts a new producer whose `init_transactions` fences whoever held them meanwhile.
    pub fn reset<'a>(&self, partitions: impl IntoIterator<Item = (&'a str, i32)>) {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, p) in partitions {
            lanes.remove(&(topic.to_string(), p));
        }
    }

    /// Makes sure the lane of `(topic, partition)` has fenced the partition's previous owner
    /// and aborted its open transaction. Until then a `read_committed` read of the journal
    /// cannot get past that transaction. `Ok(true)` when the fence happened just now: what
    /// the previous owner committed up to then must be read again.
    pub async fn prepare(&self, topic: &str, partition: i32) -> Result<bool, String> {
        let lane = self.lane(topic, partition);
        if lane.ready.load(Ordering::Acquire) {
            return Ok(false);
        }
        Self::send(lane, String::new(), Vec::new())
            .await
            .map(|()| true)
    }

    /// Writes `records` in a transaction of the lane of `(topic, partition)`; `Ok` once the
    /// transaction committed.
    pub async fn write(
        &self,
        topic: &str,
        partition: i32,
        step: &str,
        records: Vec<OutRecord>,
    ) -> Result<(), String> {
        Self::send(self.lane(topic, partition), step.to_string(), records).await
    }

    async fn send(lane: Lane, step: String, records: Vec<OutRecord>) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        lane.tx
            .send(Request {
                step,
                records,
                reply,
            })
            .await
            .map_err(|_| "transaction lane stopped".to_string())?;
        rx.await
            .map_err(|_| "transaction lane stopped".to_string())?
    }
}

struct LaneTask {
    id: String,
    config: rdkafka::ClientConfig,
    producer: Option<FutureProducer>,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl LaneTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let result = self.transaction(&batch).await;
            for r in batch {
                let _ = r.reply.send(result.clone());
            }
        }
        // Every sender is gone (the partition was reassigned or the processor stopped).
        // No transaction is open between batches; dropping the producer closes it.
    }

    /// Creates the producer and runs `init_transactions` if it has not been done.
    async fn producer(&mut self) -> Result<FutureProducer, String> {
        if let Some(p) = &self.producer {
            return Ok(p.clone());
        }
        let mut config = self.config.clone();
        config.set("transactional.id", &self.id);
        let producer: FutureProducer = config.create().map_err(|e| e.to_string())?;
        let p = producer.clone();
        let started = Instant::now();
        blocking(move || p.init_transactions(TXN_TIMEOUT)).await?;
        tracing::info!(
            transactional_id = %self.id,
            ms = started.elapsed().as_millis() as u64,
            "transactional producer ready (previous owner fenced)"
        );
        self.ready.store(true, Ordering::Release);
        self.producer = Some(producer.clone());
        Ok(producer)
    }

    async fn transaction(&mut self, batch: &[Request]) -> Result<(), String> {
        let producer = self.producer().await.inspect_err(|e| {
            tracing::warn!(transactional_id = %self.id, error = %e, "init_transactions failed");
        })?;
        let count: usize = batch.iter().map(|r| r.records.len()).sum();
        if count == 0 {
            return Ok(());
        }
        let started = Instant::now();
        let result = self.commit(&producer, batch).await;
        let outcome = match &result {
            Ok(()) => "committed",
            Err(e) => {
                if e.contains("not supported by broker") {
                    tracing::error!(transactional_id = %self.id, error = %e,
                        "the broker does not support Kafka transactions; events wait and retry. \
                         Use a broker with transactions, or set transactional = false on the kafka sink");
                } else {
                    tracing::warn!(transactional_id = %self.id, error = %e, "transaction failed; aborting");
                }
                let p = producer.clone();
                if let Err(abort) = blocking(move || p.abort_transaction(TXN_TIMEOUT)).await {
                    // A new producer with the same id aborts the transaction when it starts.
                    tracing::warn!(transactional_id = %self.id, error = %abort, "abort failed; rebuilding the producer");
                    self.producer = None;
                    self.ready.store(false, Ordering::Release);
                }
                "aborted"
            }
        };
        self.metrics
            .journal_transactions
            .with_label_values(&[outcome])
            .inc();
        self.metrics
            .journal_transaction_records
            .observe(count as f64);
        self.metrics
            .journal_write_duration
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn commit(&self, producer: &FutureProducer, batch: &[Request]) -> Result<(), String> {
        let p = producer.clone();
        blocking(move || p.begin_transaction()).await?;
        let mut deliveries = Vec::with_capacity(batch.len());
        for r in batch.iter().flat_map(|r| r.records.iter()) {
            let record = r.to_future_record();
            match producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((e, _)) => return Err(format!("enqueue: {e}")),
            }
        }
        for d in deliveries {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(format!("delivery: {e}")),
                Err(_) => return Err("delivery report lost".to_string()),
            }
        }
        if let Some(first) = batch.first() {
            crate::fault::point("before_commit", &first.step);
        }
        let p = producer.clone();
        blocking(move || p.commit_transaction(TXN_TIMEOUT)).await
    }
}

async fn blocking(
    f: impl FnOnce() -> Result<(), KafkaError> + Send + 'static,
) -> Result<(), String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}
